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
  - For schedules (a nightly verify that costs what changed, like the Proxmox Backup Server verify job's
    C(ignore-verified)/C(outdated-after)), O(skip_verified_within) leaves alone every set whose verdict is current, and
    O(restore_points=newest) reads only the newest point of each VM and series through its whole chain. A second run over
    an unchanged repository then reads no data and writes nothing; after one new export it reads the new set (and, at
    O(level=restore) with O(restore_points=newest), the chain of that point).
extends_documentation_fragment:
  - vmbackup.libvirt._repository
  - vmbackup.libvirt._attributes
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - Verifies everything a real run would check (the same selection of sets to check or skip) and writes nothing (no
        verdict file, no lock). Reports C(changed=true) when a real run would record verdicts (O(record=true) and at least
        one set checked).
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
    support: partial
    details:
      - Each run records a new verdict (with its time) beside the sets it checked, and reports C(changed=true) for that
        alone; set O(record=false) for a run that writes nothing.
      - With O(skip_verified_within), a second run within that duration finds every verdict the first one wrote current,
        checks nothing, writes nothing and reports C(changed=false) - unless a set failed (a failed set is checked again on
        every run) or the repository changed in between.
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
      - With O(restore_points=newest), only the newest point of each VM and series gets the C(restore) level; the others
        are checked at C(data).
    type: str
    choices: [data, restore]
    default: data
  series:
    description:
      - Verify only the sets of this series (the C(series) option of M(vmbackup.libvirt.export)).
        Sets written before series existed are in series C(default).
      - A set whose manifest is unreadable has no known series; it is in the scope of every series, so that it is reported.
      - Fails with C(SET_NOT_FOUND) when no VM in scope has a set of this series (a mistyped name would otherwise verify
        nothing, successfully, every night).
      - With O(set_id), that set must be of this series.
    type: str
  skip_verified_within:
    description:
      - Do not read a set again whose verdict is current and younger than this duration; report it C(skipped) with the
        reason, and leave its verdict file exactly as it is (its time does not move, so it ages until it is due again).
      - A duration - V(14d), V(36h), V(2w), V(90m), or a number of days (V(7), V(1.5)). It must be positive.
      - A verdict is current when it is C(ok), was recorded for the manifest the set has now (its C(manifest_sha256)),
        is at least at the level asked of the set (a C(data) verdict does not spare a point that is asked C(restore)),
        and the set's link to its parent is still sound. A C(failed) or unreadable verdict is never current - such a
        set is read on every run until it passes.
      - Age is exact - now minus the verdict's C(verified) time; a verdict dated more than 5 minutes in the future is not
        trusted. Proxmox Backup Server counts whole days instead (C(outdated-after)); to re-verify each set on every
        Nth run of a schedule, give a little less than N intervals, such as V(156h) for every 7th nightly run.
      - Skipping never hides a set from the others - the link from a set to its parent is checked for every set in
        scope; a finding in a set that a skipped set builds on withdraws the skip and the skipped set is checked too; a
        point read at level C(restore) reads the files of the sets below it whole, skipped or not, and when it does not
        read, those sets lose their skip as well, so that the damaged file itself is found. What a skip does trust is the
        data of the skipped set itself - damage to it is found when its verdict falls due.
      - Unset (the default), every set in scope is checked.
    type: raw
  restore_points:
    description:
      - Which points O(level=restore) reads through their whole chain - V(all) of them, or only the V(newest) readable
        point of each VM and series (the others get the C(data) level). With O(set_id), the newest point is that set.
      - Has no effect with O(level=data).
    type: str
    choices: [all, newest]
    default: all
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

- name: Nightly - read only what changed, and prove that the newest point of each series restores
  vmbackup.libvirt.verify:
    repository: /srv/vmbackup
    level: restore
    restore_points: newest
    skip_verified_within: 156h  # re-read every set about once a week
  register: nightly

- name: Show what the nightly verify read
  ansible.builtin.debug:
    msg: "{{ nightly.sets_checked }} checked, {{ nightly.sets_skipped }} skipped, {{ nightly.bytes_read }} bytes read"

- name: Verify the monthly series only
  vmbackup.libvirt.verify:
    repository: /srv/vmbackup
    series: monthly
    skip_verified_within: 30d

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
  description: The level that was asked (O(level)); each set's own level is in RV(sets[].level).
  returned: always
  type: str
restore_points:
  description: The value of O(restore_points).
  returned: always
  type: str
  sample: newest
series:
  description: The value of O(series) (null for every series).
  returned: always
  type: str
sets:
  description: One entry per set in scope, checked or skipped, oldest first per VM.
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
      description: C(full), C(incremental) or C(copy) (null when the manifest is unreadable).
      type: str
    series:
      description: The set's series (null when the manifest is unreadable).
      type: str
    action:
      description: C(checked) (read in this run) or C(skipped) (its verdict is current, see O(skip_verified_within)).
      type: str
      sample: skipped
    reason:
      description: Why the set was checked or skipped, such as C(never verified), C(its manifest changed since its last
        verdict), C(its last verdict is at level data, level restore is asked of it), or C(verified ok at level restore 3h 5m
        ago (2026-11-25T02:00:31Z), within 6d 12h; manifest unchanged).
      type: str
    level:
      description: The level asked of this set - C(data), or C(restore) for the points that are read through their chain.
      type: str
    outcome:
      description: C(ok), or C(failed) when a finding affects this point (its own files, or a set it builds on). A skipped
        set is C(ok) (its standing verdict); a finding that affects it withdraws the skip.
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
      description: Bytes of this set's files that were read (0 when skipped).
      type: int
    chain_bytes_read:
      description: Bytes read to compose this point through its backing chains at level C(restore) (the files of every
        set of the chain, skipped ones included); 0 at level C(data) or when skipped.
      type: int
    verified:
      description: Time (UTC) of the set's verdict after this run - the one recorded now for a checked set, the standing
        one for a skipped set; null for a checked set when nothing is recorded (check mode, O(record=false)).
      type: str
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
  description: Number of sets checked (read) in this run.
  returned: always
  type: int
sets_skipped:
  description: Number of sets skipped because their verdict is current.
  returned: always
  type: int
sets_ok:
  description: Number of checked sets that passed.
  returned: always
  type: int
sets_failed:
  description: Number of checked sets that failed.
  returned: always
  type: int
checked_sets:
  description: Ids of the sets checked.
  returned: always
  type: list
  elements: str
skipped_sets:
  description: Ids of the sets skipped.
  returned: always
  type: list
  elements: str
failed_sets:
  description: Ids of the sets that failed.
  returned: always
  type: list
  elements: str
bytes_read:
  description: Bytes read in all (the sum of RV(sets[].bytes_read) and RV(sets[].chain_bytes_read)); 0 when every set
    was skipped.
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
timings:
  description:
    - Wall-clock seconds per phase of the run, in the order they ran; together they make up about RV(duration_s).
    - While the run goes on, a line says what it will read, then its progress (bytes read of the total, MiB/s, time left;
      at most every 5 seconds, and at the end) goes to the managed host's log (syslog or the journal, identifier
      C(ansible-verify)), since Ansible shows a module's result only when it ends.
  returned: always
  type: dict
  version_added: 0.2.0
  contains:
    plan_s:
      description: Trust checks, reading the catalogs and verdicts, the locks (waiting included) and the choice of the sets to read.
      type: float
    hash_s:
      description:
        - Sizes and streamed sha256 of every file of the checked sets (O(workers) at a time), with C(qemu-img check) of
          each image as soon as its hash is done. Absent when no set was checked.
      type: float
    chain_s:
      description:
        - O(level=restore) - reading the points through their backing chains (zero with O(level=data)). Absent when no
          set was checked.
      type: float
    record_s:
      description: The per-set results and the verdict files written beside the sets.
      type: float
  sample: {"plan_s": 0.012, "hash_s": 1.104, "chain_s": 0.0, "record_s": 0.004}
sidecars:
  description: Verdict files written, one per checked set (empty in check mode and with O(record=false); a skipped
    set's file is never rewritten).
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
from ansible_collections.vmbackup.libvirt.plugins.module_utils._verify import LEVELS, RESTORE_POINTS, Verifier, VerifyParams


def main() -> None:
    argument_spec = dict(
        name=dict(type="str"),
        uuid=dict(type="str"),
        set_id=dict(type="str"),
        level=dict(type="str", choices=list(LEVELS), default="data"),
        workers=dict(type="int"),
        fail_on_error=dict(type="bool", default=True),
        record=dict(type="bool", default=True),
        series=dict(type="str"),
        skip_verified_within=dict(type="raw"),
        restore_points=dict(type="str", choices=list(RESTORE_POINTS), default="all"),
    )
    argument_spec.update(CONNECTION_ARGSPEC)
    argument_spec.update(REPOSITORY_ARGSPEC)
    module = AnsibleModule(argument_spec=argument_spec, mutually_exclusive=[("name", "uuid")], supports_check_mode=True)
    run_module(module, VerifyParams, Verifier, needs_libvirt=False)


if __name__ == "__main__":
    main()
