#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: snapshot
short_description: Create, merge back (delete) or revert to an external disk snapshot of a libvirt VM
version_added: 0.1.0
author:
  - vmbackup.libvirt contributors (@vmbackup)
description:
  - Declarative point-in-time states of a VM, such as "snapshot before I patch, roll back if the patch fails".
  - The collection's snapshots are named C(vmbackup-snap-<snapshot>) in libvirt. Snapshots made by other tools
    (foreign ones) are never touched unless O(foreign=true) names one by its exact libvirt name.
  - O(state=present) creates an external, disk-only snapshot of every writable file-backed disk at one instant (libvirt's
    ATOMIC flag), running or shut off; each disk's new overlay is C(<base image>.vmbackup-snap-<snapshot>.qcow2) in the
    directory of the disk's own image, and the VM then writes into the overlays. A running guest is frozen through its
    guest agent around the snapshot (O(quiesce)). CD-ROM, floppy, read-only and empty drives get no overlay.
  - O(state=absent) merges the snapshot back into the image below it and deletes it. libvirt 9.0 does the merge (an active
    block commit and pivot on a running VM, C(qemu-img commit) when shut off, an intermediate commit for a snapshot that
    has later ones); the module first checks that each overlay is in its disk's active chain, and afterwards that no disk
    (live or persistent definition) still uses a merged overlay. Merged overlays are removed; a file another domain still
    uses (as a disk or a backing file) is never removed. A merge that fails (such as a full file system under a base
    image) is abandoned with C(COMMIT_FAILED); the VM keeps running on its overlays, a consistent chain.
  - O(state=reverted) returns the VM to the snapshot, discarding what was written since. The VM is stopped (forced off),
    later snapshots of the collection are dropped (metadata, overlays, memory files), each overlay of the snapshot is
    recreated empty on its base image, and the VM is started in O(run_state). libvirt 9.0 cannot revert external
    snapshots itself; this is the module's own implementation.
  - See the collection's C(docs/snapshots.md) for the files on disk, the limits on libvirt 9.0 and how snapshots interplay
    with backups and checkpoints.
extends_documentation_fragment:
  - vmbackup.libvirt._connection
  - vmbackup.libvirt._attributes
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - Predicts the action, the overlays, the files to be removed and the snapshot list afterwards, and refuses what a real
        run would refuse. Nothing is changed (no freeze, no file, no snapshot, no domain definition).
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: full
    details:
      - The diff is the list of the VM's snapshot names (libvirt names) before and after.
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
    support: partial
    details:
      - O(state=present) of an existing snapshot and O(state=absent) of a missing one report C(changed=false). An existing
        snapshot is not compared with the options (O(description), O(memory)).
      - O(state=reverted) reports C(changed=false) when the VM runs on the snapshot's overlays, nothing was written into them,
        no later snapshot exists, and the VM is in the asked run state; a running guest that writes anything makes the next
        revert change it again.
options:
  name:
    description:
      - The VM's libvirt name. Exactly one of O(name) and O(uuid) is required.
    type: str
  uuid:
    description:
      - The VM's UUID. Exactly one of O(name) and O(uuid) is required.
    type: str
  snapshot:
    description:
      - The snapshot's name. The snapshot is C(vmbackup-snap-<snapshot>) in libvirt, so 1-64 letters, digits, C(_), C(.) and
        C(-), starting with a letter or digit (it becomes part of the overlays' file names).
      - With O(foreign=true), the exact libvirt name of a snapshot made by another tool.
    type: str
    required: true
  state:
    description:
      - C(present) creates the snapshot, C(absent) merges it back and deletes it, C(reverted) returns the VM to it.
    type: str
    choices: [present, absent, reverted]
    default: present
  quiesce:
    description:
      - For O(state=present) of a running VM, freeze the guest's file systems through the QEMU guest agent around the
        snapshot.
      - C(auto) freezes when the agent answers and otherwise takes a crash-consistent snapshot; RV(consistency) and
        RV(quiesce) say which. C(required) fails with C(QUIESCE_FAILED) (and no snapshot) when the guest cannot be frozen.
        C(never) does not try.
      - A shut-off VM's disks are as its guest left them; C(required) accepts that.
    type: str
    choices: [auto, required, never]
    default: auto
  quiesce_timeout:
    description:
      - Seconds the guest may stay frozen, counted from the freeze request (above 0, at most 600). A guard thaws the guest
        then, even when the module is killed; a snapshot taken later than that is crash-consistent (C(auto)) or undone
        with C(QUIESCE_FAILED) (C(required)).
    type: float
    default: 10
  memory:
    description:
      - Also save the running VM's memory into C(<first disk's base image>.vmbackup-snap-<snapshot>.mem) (the VM keeps
        running). O(state=reverted) then restores the VM from that file, unless O(run_state=shutoff).
    type: bool
    default: false
  description:
    description:
      - A description stored with a new snapshot.
    type: str
  run_state:
    description:
      - For O(state=reverted), the VM's run state afterwards. C(as_snapshot) is the state the snapshot was taken in
        (C(shutoff) for a snapshot of a shut-off VM, C(running) otherwise).
    type: str
    choices: [running, shutoff, paused, as_snapshot]
    default: as_snapshot
  foreign:
    description:
      - Act on a snapshot made by another tool, named exactly by O(snapshot) (without the collection's prefix), for
        O(state=absent) and O(state=reverted). Without it a foreign snapshot is listed but never changed, also when its
        name equals a bare O(snapshot).
      - The foreign snapshot must be an external disk snapshot; internal ones fail with C(SNAPSHOT_UNSUPPORTED).
    type: bool
    default: false
  lock_timeout:
    description:
      - Seconds to wait for another run of this module on the same VM (a per-VM lock in C(/run/vmbackup)); then the
        module fails with C(VM_LOCKED). Between 0 and 604800. Check mode takes no lock.
    type: float
    default: 60
notes:
  - libvirt 9.0 refuses a disk snapshot of a shut-off VM that has checkpoints (the backup bitmaps of
    M(vmbackup.libvirt.export)); the module fails with C(SNAPSHOT_UNSUPPORTED) before changing anything. Running VMs with
    checkpoints are fine.
  - Backups stay incremental across a create, a merge and a revert of a running VM. libvirt carries the checkpoint
    bitmaps into a new overlay and back; the module re-arms the size sentinels of M(vmbackup.libvirt.export) that were
    intact right before (RV(sentinels_kept)). In a shut-off VM's merge no sentinel can be re-armed (no QEMU runs); a sentinel
    armed on the overlay itself may then be lost, and the next export of that checkpoint is a full that says why.
  - A revert keeps the checkpoints made before the snapshot valid (their bitmaps are carried into the fresh overlays, see
    RV(bitmaps_kept)). A checkpoint made after the snapshot cannot survive a revert (its point in time was discarded);
    libvirt then reports its bitmap as broken and M(vmbackup.libvirt.export) starts a new chain with a full that says why.
  - A merge that failed part-way has already written part of the overlay into its base image; the snapshot's point in time is
    gone. When the image below changed during the failed attempt, the module marks the snapshot's description and refuses to
    revert to it (C(SNAPSHOT_UNSUPPORTED)); delete it again once the cause is fixed.
  - libvirt 9.0 cannot merge an older snapshot of a shut-off VM while a later one is on top of it; the module refuses that
    with C(SNAPSHOT_UNSUPPORTED) (start the VM, or merge the later snapshots first).
  - A running libvirt job on the VM (such as a backup of M(vmbackup.libvirt.export)) fails every change with
    C(BACKUP_JOB_ACTIVE) before anything is done.
  - A revert creates and removes files only in directories nobody but root can write (C(UNSAFE_TARGET) otherwise); a
    merge removes a leftover only there (otherwise it is kept with a warning).
  - No time limit applies to a merge; libvirt waits for the block commit, which copies what was written since the snapshot.
seealso:
  - name: libvirt snapshot XML
    description: External disk snapshots.
    link: https://libvirt.org/formatsnapshot.html
"""

EXAMPLES = r"""
- name: Snapshot the VM before patching it (guest frozen when its agent answers)
  vmbackup.libvirt.snapshot:
    name: web01
    snapshot: before-patch
    description: before the kernel update
  register: snap

- name: Say how consistent the snapshot is
  ansible.builtin.debug:
    msg: "{{ snap.snapshot }} is {{ snap.consistency }}-consistent"

- name: Roll back when the patch failed
  vmbackup.libvirt.snapshot:
    name: web01
    snapshot: before-patch
    state: reverted
    run_state: running

- name: Keep the patch; merge the snapshot back into the disks
  vmbackup.libvirt.snapshot:
    name: web01
    snapshot: before-patch
    state: absent

- name: Merge a snapshot made with virsh (named exactly)
  vmbackup.libvirt.snapshot:
    name: web01
    snapshot: manual-1
    foreign: true
    state: absent
"""

RETURN = r"""
snapshot:
  description: The snapshot's libvirt name.
  returned: always
  type: str
  sample: vmbackup-snap-before-patch
state:
  description: The O(state) of the run.
  returned: success
  type: str
reason:
  description: Why the run changes (or changed) something, or why nothing needs to change.
  returned: success
  type: str
  sample: snapshot vmbackup-snap-before-patch exists
vm:
  description: The VM's C(name), C(uuid) and run C(state) after the run (in check mode, the predicted state).
  returned: success
  type: dict
disks:
  description:
    - The snapshot's disks with an overlay (for O(state=absent), the ones merged).
  returned: success
  type: list
  elements: dict
  contains:
    target:
      description: Disk target.
      type: str
    overlay:
      description: The overlay file of the snapshot.
      type: str
    base:
      description: The image below the overlay.
      type: str
memory_file:
  description: The snapshot's memory file; None for a disk-only snapshot.
  returned: success
  type: str
dropped_snapshots:
  description: Later snapshots a revert dropped (or would drop, in check mode).
  returned: success
  type: list
  elements: str
removed_files:
  description: Files removed (or, in check mode, to be removed), that is merged or discarded overlays and memory files.
  returned: success
  type: list
  elements: str
snapshots:
  description: The VM's snapshot names (libvirt names, ours and foreign) after the run.
  returned: success
  type: list
  elements: str
bitmaps_kept:
  description:
    - For O(state=reverted), the checkpoint bitmaps (C(<target>:<checkpoint>)) carried into the fresh overlays, so that
      the checkpoints made before the snapshot stay valid for the next incremental backup.
  returned: success
  type: list
  elements: str
  sample: ["vda:vmbackup-3f2a9c1e-4"]
sentinels_kept:
  description:
    - Checkpoints (C(<target>:<checkpoint>)) whose size sentinel (see M(vmbackup.libvirt.export)) was re-armed on the disk's
      new top image after a create or a merge, or carried into the fresh overlay of a revert. libvirt carries only the
      checkpoint bitmaps; without the sentinel the next export would be a full.
  returned: success
  type: list
  elements: str
quiesce:
  description:
    - What quiescing did when a snapshot was created (C(policy), C(consistency), C(frozen), C(frozen_seconds),
      C(freeze_seconds), C(filesystems), C(reason), C(thawed_leftover)); None otherwise.
  returned: success
  type: dict
consistency:
  description: C(application) (the guest was frozen) or C(crash) for a created snapshot; None otherwise.
  returned: success
  type: str
cleaned_up:
  description: What the run cleaned up besides its work (a guest freeze left by a killed run, an undone snapshot).
  returned: always
  type: list
  elements: str
error_code:
  description: A stable code for the failure; see the collection's error code table.
  returned: failure
  type: str
  sample: COMMIT_FAILED
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmbackup.libvirt.plugins.module_utils._args import CONNECTION_ARGSPEC
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import run_module
from ansible_collections.vmbackup.libvirt.plugins.module_utils._snapshot import SnapshotBackend, SnapshotParams


def main() -> None:
    argument_spec = dict(
        name=dict(type="str"),
        uuid=dict(type="str"),
        snapshot=dict(type="str", required=True),
        state=dict(type="str", choices=["present", "absent", "reverted"], default="present"),
        quiesce=dict(type="str", choices=["auto", "required", "never"], default="auto"),
        quiesce_timeout=dict(type="float", default=10.0),
        memory=dict(type="bool", default=False),
        description=dict(type="str"),
        run_state=dict(type="str", choices=["running", "shutoff", "paused", "as_snapshot"], default="as_snapshot"),
        foreign=dict(type="bool", default=False),
        lock_timeout=dict(type="float", default=60.0),
    )
    argument_spec.update(CONNECTION_ARGSPEC)
    module = AnsibleModule(
        argument_spec=argument_spec,
        mutually_exclusive=[("name", "uuid")],
        required_one_of=[("name", "uuid")],
        supports_check_mode=True,
    )
    run_module(module, SnapshotParams, SnapshotBackend)


if __name__ == "__main__":
    main()
