#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: snapshot_info
short_description: List the snapshots, checkpoints and active disk chains of libvirt VMs
version_added: 0.1.0
author:
  - vmbackup.libvirt contributors (@vmbackup)
description:
  - For one VM (O(name) or O(uuid)) or every VM of O(uri), lists its snapshots (the collection's, whose libvirt name starts
    with C(vmbackup-snap-), and foreign ones), with each disk's overlay image and its sizes; its checkpoints (the
    collection's backup checkpoints C(vmbackup-<chain>-<seq>) and foreign ones) with the disks they hold a dirty bitmap
    for; and each disk's current active backing chain as C(qemu-img info --backing-chain -U) reads it.
  - A VM backed up while it runs on an overlay is backed up whole through its chain; see the collection's
    C(docs/snapshots-and-backups.md) for what an external snapshot and its merge mean for the backup chains.
  - Only reads; it never changes a domain, an image or a bitmap. Images are read with C(-U) (no lock), so a running VM is
    not disturbed; the sizes of a running VM's images are a moment's reading.
  - A disk whose chain cannot be read (a missing image) has an empty RV(vms[].disks[].chain) and the reason in
    RV(vms[].disks[].chain_error); the other disks and VMs are still listed.
extends_documentation_fragment:
  - vmbackup.libvirt._connection
  - vmbackup.libvirt._attributes
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - The module only reads; check mode returns the same result as a normal run.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
    support: full
    details:
      - Always C(changed=false). Sizes and dirty byte counts of a running VM change with its writes.
options:
  name:
    description:
      - Only the VM with this name. At most one of O(name) and O(uuid); without either, every VM of O(uri) is listed.
    type: str
  uuid:
    description:
      - Only the VM with this UUID.
    type: str
requirements:
  - libvirt-python (on the managed host; the module re-runs itself under a system Python that has it)
  - qemu-img (package qemu-utils)
seealso:
  - module: vmbackup.libvirt.snapshot
  - module: vmbackup.libvirt.export
  - module: vmbackup.libvirt.domain_info
"""

EXAMPLES = r"""
- name: Snapshots, checkpoints and disk chains of one VM
  vmbackup.libvirt.snapshot_info:
    name: web01
  register: web01

- name: Fail when a disk of web01 still runs on an overlay
  ansible.builtin.assert:
    that: web01.vms[0].disks | map(attribute='chain') | map('length') | max == 1
    fail_msg: "web01 still runs on a snapshot overlay: {{ web01.vms[0].snapshots | map(attribute='name') }}"

- name: Every VM of the host that has a snapshot of the collection
  vmbackup.libvirt.snapshot_info:
  register: all_vms

- name: Show them
  ansible.builtin.debug:
    msg: "{{ all_vms.vms | selectattr('snapshots') | map(attribute='name') }}"
"""

RETURN = r"""
uri:
  description: The libvirt URI that was read.
  returned: success
  type: str
  sample: qemu:///system
vms:
  description: The VMs, sorted by name.
  returned: success
  type: list
  elements: dict
  contains:
    name:
      description: The VM's name.
      type: str
    uuid:
      description: The VM's UUID.
      type: str
    state:
      description: C(running), C(paused), C(shutoff), ... as libvirt reports it.
      type: str
    snapshots:
      description: Every libvirt snapshot of the VM, parents before children.
      type: list
      elements: dict
      contains:
        name:
          description: The snapshot's libvirt name (the collection's carry the prefix C(vmbackup-snap-)).
          type: str
        ours:
          description: Whether the collection made it (the name has the prefix).
          type: bool
        current:
          description: Whether it is libvirt's current snapshot.
          type: bool
        parent:
          description: The name of its parent snapshot, or C(null).
          type: str
        created:
          description: When it was taken, UTC ISO 8601.
          type: str
          sample: "2026-12-01T14:30:00Z"
        state:
          description: The VM's state when it was taken (C(running), C(shutoff), C(disk-snapshot), ...).
          type: str
        memory:
          description: C(none), C(external) or C(internal).
          type: str
        memory_file:
          description: The external memory state file, or C(null).
          type: str
        description:
          description: The snapshot's description, or C(null).
          type: str
        disks:
          description: Per disk the snapshot covers.
          type: list
          elements: dict
          contains:
            target:
              description: The disk target, such as C(vda).
              type: str
            kind:
              description: C(external), C(internal) or C(no) (the disk is not in the snapshot).
              type: str
            overlay:
              description: The overlay image the snapshot created for the disk (external only), or C(null).
              type: str
            base:
              description: The backing file the overlay's qcow2 header names, or C(null).
              type: str
            virtual_size:
              description: The overlay's virtual size in bytes, or C(null) when it cannot be read.
              type: int
            allocated_bytes:
              description: Bytes the overlay occupies on the host (qemu-img's actual-size), or C(null).
              type: int
            file_bytes:
              description: The overlay file's length in bytes, or C(null) when it is missing or not a regular file.
              type: int
            in_active_chain:
              description: Whether the overlay is part of a disk's current active chain.
              type: bool
    checkpoints:
      description: Every libvirt checkpoint of the VM, parents before children.
      type: list
      elements: dict
      contains:
        name:
          description: The checkpoint's name.
          type: str
        ours:
          description: Whether it is a backup checkpoint of the collection (C(vmbackup-<chain>-<seq>)).
          type: bool
        created:
          description: When it was created, UTC ISO 8601.
          type: str
        parent:
          description: The name of its parent checkpoint, or C(null).
          type: str
        description:
          description: The checkpoint's description, or C(null).
          type: str
        disks:
          description: Per disk of the checkpoint.
          type: list
          elements: dict
          contains:
            target:
              description: The disk target.
              type: str
            bitmap:
              description: The name of the disk's dirty bitmap, or C(null) when the checkpoint holds none for it.
              type: str
            dirty_bytes:
              description: Bytes written since the checkpoint (running VM), or C(null) when unknown (shut-off VM, or a
                missing or broken bitmap).
              type: int
    disks:
      description: The VM's file and block disks (live definition for a running VM) with their active chain.
      type: list
      elements: dict
      contains:
        target:
          description: The disk target.
          type: str
        source:
          description: The disk's active image (an overlay while a snapshot is in place).
          type: str
        format:
          description: The driver type, such as C(qcow2).
          type: str
        chain:
          description: The active backing chain, top image first.
          type: list
          elements: dict
          contains:
            filename:
              description: The image.
              type: str
            format:
              description: Its format.
              type: str
            virtual_size:
              description: Its virtual size in bytes.
              type: int
            allocated_bytes:
              description: Bytes it occupies on the host (qemu-img's actual-size).
              type: int
            file_bytes:
              description: The file's length, or C(null) when it is not a regular file.
              type: int
            backing_filename:
              description: Its backing file, or C(null) at the bottom of the chain.
              type: str
            bitmaps:
              description: Names of the persistent dirty bitmaps stored in the image (as last written to it; a running
                QEMU may hold newer ones in memory).
              type: list
              elements: str
        chain_error:
          description: Why the chain could not be read, or C(null).
          type: str
error_code:
  description: Why the module failed (C(VM_NOT_FOUND), C(LIBVIRT_UNAVAILABLE), C(INVALID_NAME), C(INVALID_ARGUMENT),
    C(MISSING_DEPENDENCY)).
  returned: failure
  type: str
  sample: VM_NOT_FOUND
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmbackup.libvirt.plugins.module_utils._args import CONNECTION_ARGSPEC
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import run_module
from ansible_collections.vmbackup.libvirt.plugins.module_utils._snapshot_info import SnapshotInfo, SnapshotInfoParams


def main() -> None:
    argument_spec = dict(
        name=dict(type="str"),
        uuid=dict(type="str"),
    )
    argument_spec.update(CONNECTION_ARGSPEC)
    module = AnsibleModule(argument_spec=argument_spec, mutually_exclusive=[("name", "uuid")], supports_check_mode=True)
    run_module(module, SnapshotInfoParams, SnapshotInfo)


if __name__ == "__main__":
    main()
