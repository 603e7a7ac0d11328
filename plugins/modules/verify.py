#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: verify
short_description: Prove that backup sets in a repository are whole
version_added: 0.1.0
author:
  - vmbackup.libvirt contributors (@vmbackup)
description:
  - Checks committed backup sets of a repository - one set, the sets of one VM, or every set.
  - For each set - the manifest parses and has a supported format; every file it lists exists (C(FILE_MISSING)), has
    its recorded size (C(SIZE_MISMATCH)) and sha256 (C(CHECKSUM_MISMATCH)); no disk references a file without a
    checksum; every disk image passes C(qemu-img check) (C(IMAGE_INVALID)); the set's parent is committed and its
    manifest hashes to what the set recorded when it was taken (C(CHAIN_BROKEN)).
  - Each finding names the set and the file, and lists in C(affected) every point (set) whose restore reads the
    damaged part - the set itself and the later incrementals of the chain that build on it.
  - Files are read as streams (memory does not grow with disk size), several at a time (O(workers)).
  - With O(level=restore), every sound point is also read through its whole backing chain (as a restore reads it)
    into a null device, which proves that the chain composes.
  - The verdict of each set is written beside it, to C(sets/<set-id>.verify.json) (time, level, outcome, findings),
    never into the committed set. M(vmbackup.libvirt.export) does not take a set whose last verify failed as the
    parent of an incremental.
  - When a set is given, the sets it builds on (its chain back to the full) are checked too, since restoring it reads them.
  - The module does not need libvirt; a VM is found in the repository by its UUID or by the name its newest set records.
extends_documentation_fragment:
  - vmbackup.libvirt._repository
  - vmbackup.libvirt._attributes
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - Verifies everything and writes nothing (no verdict file, no lock). Reports C(changed=true) when a real run would
        record verdicts (O(record=true) and at least one set checked).
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
    support: none
    details:
      - Each run records a new verdict (with its time) beside the sets it checked, and reports C(changed=true) for that
        alone; set O(record=false) for a run that writes nothing.
options:
  name:
    description:
      - Verify the sets of the VM with this name (as its newest set records it). At most one of O(name) and O(uuid).
      - Without O(name) and O(uuid), every VM of the repository is verified.
    type: str
  uuid:
    description:
      - Verify the sets of the VM with this UUID.
    type: str
  set_id:
    description:
      - Verify this set (and the sets of its chain that it builds on) instead of all sets.
    type: str
  level:
    description:
      - C(data) checks manifests, chain links, sizes, sha256 checksums and C(qemu-img check) of every image.
      - C(restore) also reads every point that passed through its full backing chain.
    type: str
    choices: [data, restore]
    default: data
  workers:
    description:
      - Files checked at the same time. Defaults to the number of CPUs of the managed host.
    type: int
  fail_on_error:
    description:
      - Fail the task when a set fails verification. With V(false) the task succeeds and returns the findings,
        for a report.
    type: bool
    default: true
  record:
    description:
      - Write each set's verdict to C(sets/<set-id>.verify.json). V(false) writes nothing (for a read-only repository).
    type: bool
    default: true
  uri:
    description:
      - Not used; verify reads only the repository. Accepted so that C(module_defaults) of the
        C(group/vmbackup.libvirt.libvirt) action group can set it for all modules.
    type: str
    default: qemu:///system
notes:
  - Verify takes a shared lock per VM, so verifies and restores run side by side, while an export of the same VM
    into the same repository waits for it (and it for the export), up to O(lock_timeout).
requirements:
  - qemu-img (package qemu-utils)
seealso:
  - module: vmbackup.libvirt.export
  - module: vmbackup.libvirt.restore
"""

EXAMPLES = r"""
- name: Verify every set of every VM in the repository
  vmbackup.libvirt.verify:
    repository: /srv/vmbackup

- name: Prove that every point of web01 restores, without failing the play
  vmbackup.libvirt.verify:
    repository: /srv/vmbackup
    name: web01
    level: restore
    fail_on_error: false
  register: verified

- name: List damaged sets
  ansible.builtin.debug:
    msg: "{{ verified.findings | map(attribute='msg') | list }}"
  when: verified.outcome != 'ok'
"""

RETURN = r"""
outcome:
  description: C(ok) when every checked set passed, else C(failed).
  returned: always
  type: str
  sample: ok
level:
  description: The level that was checked.
  returned: always
  type: str
sets:
  description: One entry per checked set, oldest first per VM.
  returned: always
  type: list
  elements: dict
  contains:
    vm_uuid:
      description: The VM's UUID.
      type: str
    vm_name:
      description: The VM's name as the set records it.
      type: str
    set_id:
      description: The set.
      type: str
    type:
      description: C(full), C(incremental) or C(copy).
      type: str
    outcome:
      description: C(ok), or C(failed) when a finding affects this point (its own files, or a set it builds on).
      type: str
    codes:
      description: Error codes of the findings that affect this point.
      type: list
      elements: str
    finding_refs:
      description: Indexes into RV(findings) of the findings that affect this point (each finding is listed once).
      type: list
      elements: int
    files_checked:
      description: Files of this set that were checked.
      type: int
    bytes_read:
      description: Bytes of this set's files that were read.
      type: int
    duration_s:
      description: Seconds spent reading this set's files.
      type: float
    throughput_mib_s:
      description: MiB of this set read per second.
      type: float
findings:
  description: Every fault found.
  returned: always
  type: list
  elements: dict
  contains:
    code:
      description: C(REPOSITORY_FORMAT), C(CHAIN_BROKEN), C(FILE_MISSING), C(SIZE_MISMATCH), C(CHECKSUM_MISMATCH),
        C(IMAGE_INVALID) or C(IO_ERROR).
      type: str
    vm_uuid:
      description: The VM.
      type: str
    set_id:
      description: The set where the fault is (for C(CHAIN_BROKEN), the child whose link to its parent is bad).
      type: str
    file:
      description: The file, relative to the set directory.
      type: str
    msg:
      description: What is wrong.
      type: str
    affected:
      description: Every point whose restore reads the damaged part.
      type: list
      elements: str
    parent:
      description: For C(CHAIN_BROKEN), the parent set id the child names.
      type: str
sets_checked:
  description: Number of sets checked.
  returned: always
  type: int
sets_ok:
  description: Number of sets that passed.
  returned: always
  type: int
sets_failed:
  description: Number of sets that failed.
  returned: always
  type: int
failed_sets:
  description: Ids of the sets that failed.
  returned: always
  type: list
  elements: str
bytes_read:
  description: Bytes read in all.
  returned: always
  type: int
duration_s:
  description: Seconds the whole run took.
  returned: always
  type: float
throughput_mib_s:
  description: MiB read per second while checking.
  returned: always
  type: float
workers:
  description: Files checked at the same time.
  returned: always
  type: int
sidecars:
  description: Verdict files written (empty in check mode and with O(record=false)).
  returned: always
  type: list
  elements: str
error_code:
  description: The code of the first finding (or of the failure).
  returned: failure
  type: str
  sample: CHECKSUM_MISMATCH
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmbackup.libvirt.plugins.module_utils._args import CONNECTION_ARGSPEC, REPOSITORY_ARGSPEC
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import run_module
from ansible_collections.vmbackup.libvirt.plugins.module_utils._verify import LEVELS, Verifier, VerifyParams


def main() -> None:
    argument_spec = dict(
        name=dict(type="str"),
        uuid=dict(type="str"),
        set_id=dict(type="str"),
        level=dict(type="str", choices=list(LEVELS), default="data"),
        workers=dict(type="int"),
        fail_on_error=dict(type="bool", default=True),
        record=dict(type="bool", default=True),
    )
    argument_spec.update(CONNECTION_ARGSPEC)
    argument_spec.update(REPOSITORY_ARGSPEC)
    module = AnsibleModule(argument_spec=argument_spec, mutually_exclusive=[("name", "uuid")], supports_check_mode=True)
    run_module(module, VerifyParams, Verifier, needs_libvirt=False)


if __name__ == "__main__":
    main()
