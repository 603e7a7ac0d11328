#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: backup_info
short_description: The catalog of a backup repository - VMs, series, chains, sets, verdicts and restorable points
version_added: 0.1.0
author:
  - vmbackup.libvirt contributors (@vmbackup)
description:
  - Reads the committed backup sets of a repository - of every VM, of one VM (O(name) or O(uuid)), and of every series
    or one (O(series)) - and returns them as one structure - per VM its sets (oldest first), its series with their
    chains, its newest restorable point and totals, and totals for the repository.
  - Each set has its type, series, period, chain, parent, times, age, size (the sum of the file sizes its manifest
    lists), consistency, its last verify verdict with the verdict's age and whether the manifest is still the one that
    was verified, and whether the point is restorable and, if not, why.
  - A point is restorable when every set of its restore path (the point back to its chain's full) has a readable
    manifest, every parent link is sound (the parent is committed and hashes to what the child recorded, same chain,
    same disk sizes), and none of those sets has a verify verdict other than C(ok). A C(failed) or unreadable verdict
    blocks the point even when it is stale (recorded for a manifest that has changed since) - a changed manifest
    repairs no file, only a new M(vmbackup.libvirt.verify) run clears it. This is the same rule
    M(vmbackup.libvirt.export) applies before it extends a chain. A point never verified is restorable as far as the
    catalog knows (see RV(vms[].sets[].verdict)).
  - Each VM also has its newest restore drill (RV(vms[].drill), from the proofs M(vmbackup.libvirt.drill) writes beside
    the sets) and its age, so that a policy can require "drilled within N days".
  - Only manifests, verify verdicts and drill proofs are read, never the data files - the catalog is cheap on thousands of sets.
    Use M(vmbackup.libvirt.verify) to prove the data.
  - The module writes nothing at all (no lock file, no verdict); the file system may update access times, as for any reader.
  - An empty repository gives an empty RV(vms) list. A VM or series that is asked for and has no committed set fails
    with C(SET_NOT_FOUND), as M(vmbackup.libvirt.verify) does. A missing repository fails with C(REPOSITORY_NOT_FOUND).
  - The module does not need libvirt; a VM is found in the repository by its UUID or by the name its newest set records.
extends_documentation_fragment:
  - vmbackup.libvirt._repository
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
      - Always C(changed=false). Ages are computed against the host's clock at the call, so two calls differ in
        RV(generated) and in every C(age_seconds).
options:
  name:
    description:
      - Only the VM with this name, as its newest readable set records it. At most one of O(name) and O(uuid).
      - Without O(name) and O(uuid), every VM of the repository is listed.
    type: str
  uuid:
    description:
      - Only the VM with this UUID.
    type: str
  series:
    description:
      - Only the sets of this series (such as C(weekly)); sets written before series existed are in C(default).
      - A set whose manifest is unreadable has no known series, so it is listed only when O(series) is not given.
      - VMs without a readable set of the series are left out; when no VM asked for has one, the module fails with
        C(SET_NOT_FOUND).
    type: str
  query:
    description:
      - A L(JMESPath,https://jmespath.org/) expression applied on the managed host to the result (the keys
        RV(repository), RV(generated), RV(vms) and RV(totals)); its value is returned in RV(query_result).
      - Evaluated where the module runs, so a large catalog need not travel to the controller to be filtered there.
        The full result is returned as well.
      - Needs the C(jmespath) Python library on the managed host (C(MISSING_DEPENDENCY) otherwise). An expression
        that does not parse, or fails on the data (a type error), fails with C(INVALID_ARGUMENT) and jmespath's message.
    type: str
  list_sets:
    description:
      - With V(false), each VM's RV(vms[].sets) list and each chain's RV(vms[].series[].chains[].sets) list are left
        out of the result (and out of what O(query) sees); everything else - the series with their counts, bytes,
        newest and newest restorable set, the chains' base, newest and bytes, each VM's newest restorable point, drills
        and totals - is computed the same way from every set.
      - The result then grows with the number of VMs and chains, not of sets. Ansible's own handling of a module result
        costs about as much as the module on large catalogs (about 40 values per set), so on thousands of sets this is
        what makes a call fast (see C(benchmarks/README.md)).
    type: bool
    default: true
    version_added: 0.2.0
  lock_timeout:
    description:
      - Accepted for C(module_defaults) and validated (between 0 and 604800), but not used - this module takes no lock
        (see the notes).
    type: float
    default: 60
  uri:
    description:
      - Not used; the catalog is read from the repository only. Accepted so that C(module_defaults) of the
        C(group/vmbackup.libvirt.libvirt) action group can set it for all modules.
    type: str
    default: qemu:///system
notes:
  - The module takes no lock, not even a shared one, so a long export, verify or prune of a VM never makes the catalog
    wait or fail with C(VM_LOCKED) - a catalog is most needed while backups run. Reading without the lock is safe
    because every change of a repository is a rename - export commits a set by renaming its staging directory into
    C(sets/) after the manifest was written and synced, verify replaces a verdict by renaming a complete file, and
    prune renames a set out of C(sets/) before it deletes it - so each set and each verdict is seen whole or not at
    all. Taking a shared lock would also create the lock file of a VM that has none, which is a write.
  - A set that disappears between the listing and the reading of its manifest (a prune running at the same time) is
    detected - after reading a VM's manifests and verdicts, its committed set ids are listed again and the VM is read
    again when they changed (up to three times, then a warning says that the result may mix two states).
  - Ages (C(age_seconds)) are seconds from the set's completion (or the verdict's time) to the managed host's clock at
    the call; a negative age means a set or verdict dated in the future (a clock that was, or is, wrong).
requirements:
  - jmespath (only with O(query))
seealso:
  - module: vmbackup.libvirt.export
  - module: vmbackup.libvirt.verify
  - module: vmbackup.libvirt.restore
"""

EXAMPLES = r"""
- name: Read the whole catalog
  vmbackup.libvirt.backup_info:
    repository: /srv/vmbackup
  register: catalog

- name: Fail when a VM has no restorable point younger than 26 hours
  ansible.builtin.assert:
    that:
      - item.newest_restorable is not none
      - item.newest_restorable.age_seconds < 26 * 3600
    fail_msg: "{{ item.name }} has no recent restorable backup"
    quiet: true
  loop: "{{ catalog.vms }}"
  loop_control:
    label: "{{ item.name }}"

- name: The weekly series of web01 only
  vmbackup.libvirt.backup_info:
    repository: /srv/vmbackup
    name: web01
    series: weekly

- name: Points that are not restorable, filtered on the host
  vmbackup.libvirt.backup_info:
    repository: /srv/vmbackup
    query: "vms[].sets[?!restorable].{set: set_id, why: restore_fault}[]"
  register: broken

- name: VMs not drilled successfully within 7 days (vmbackup.libvirt.drill)
  vmbackup.libvirt.backup_info:
    repository: /srv/vmbackup
    query: "vms[?drill == null || drill.outcome != 'ok' || drill.age_seconds > `604800`].name"

- name: The newest restorable point of every VM, without the list of every set (fast on thousands of sets)
  vmbackup.libvirt.backup_info:
    repository: /srv/vmbackup
    list_sets: false
  register: overview

- name: Sets whose verdict is missing or stale
  vmbackup.libvirt.backup_info:
    repository: /srv/vmbackup
    query: "vms[].sets[?verdict == null || !verdict.current].set_id[]"
"""

RETURN = r"""
repository:
  description: The repository that was read.
  returned: success
  type: str
  sample: /srv/vmbackup
generated:
  description: The host's UTC time when the catalog was read; every C(age_seconds) is relative to it.
  returned: success
  type: str
  sample: "2026-11-25T08:00:00Z"
vms:
  description: One entry per VM, sorted by name, then UUID (VMs without a name last).
  returned: success
  type: list
  elements: dict
  contains:
    uuid:
      description: The VM's UUID (its directory in the repository).
      type: str
    name:
      description: The VM's name as its newest readable set records it; null when no set is readable.
      type: str
    host:
      description: The host that took the newest readable set.
      type: str
    sets:
      description:
        - Every committed set, oldest first, readable or not (of the series asked for, if one is).
        - Left out with O(list_sets=false).
        - A VM directory without any committed set (its first export failed) is listed with no sets when no series is asked for.
      type: list
      elements: dict
      contains:
        set_id:
          description: The set id (UTC start time and a sequence).
          type: str
        type:
          description: C(full), C(incremental) or C(copy); null when the manifest is unreadable (so are the other fields
            read from the manifest).
          type: str
        series:
          description: The series the set belongs to.
          type: str
        period:
          description: The period key export was given (such as C(2026-W48)), or null.
          type: str
        chain_id:
          description: The chain; null for a copy.
          type: str
        parent:
          description: The parent set id of an incremental, else null.
          type: str
        started:
          description: When the backup started (UTC); the VM's point in time.
          type: str
        completed:
          description: When the set was committed (UTC).
          type: str
        age_seconds:
          description: Seconds from RV(vms[].sets[].completed) to RV(generated).
          type: int
        bytes:
          description: The sum of the sizes of the files the manifest lists (what the set holds on disk, manifest excluded).
          type: int
        consistency:
          description: C(application) (file systems frozen by the guest agent) or C(crash).
          type: str
        readable:
          description: Whether the manifest could be read and is valid.
          type: bool
        error:
          description: Why the manifest is unreadable, or null.
          type: str
        verdict:
          description: The last verify verdict recorded beside the set, or null when it was never verified.
          type: dict
          contains:
            outcome:
              description: C(ok), C(failed), or C(unreadable) (a verdict file that cannot be read; then the other fields
                are null, C(current) false and C(codes) empty).
              type: str
            level:
              description: C(data) or C(restore).
              type: str
            verified:
              description: When the verdict was recorded (UTC).
              type: str
            age_seconds:
              description: Seconds from RV(vms[].sets[].verdict.verified) to RV(generated).
              type: int
            current:
              description: Whether the verdict was recorded for the manifest as it is now (same sha256); false means the
                manifest changed since and the verdict is stale.
              type: bool
            codes:
              description: The error codes the verdict found.
              type: list
              elements: str
            first_finding:
              description: The message of the verdict's first finding (which names the damaged file and its set; a point's
                verdict also fails for damage in a set it builds on), or null.
              type: str
        restorable:
          description: Whether the point can be restored as far as the catalog knows (see the description).
          type: bool
        restore_fault:
          description: Why the point is not restorable (the fault nearest the point), or null.
          type: str
    series:
      description: One entry per series of the VM's readable sets, sorted by name.
      type: list
      elements: dict
      contains:
        name:
          description: The series.
          type: str
        sets:
          description: Number of sets of the series.
          type: int
        bytes:
          description: Bytes of the series' sets.
          type: int
        newest:
          description: The newest set of the series.
          type: str
        newest_restorable:
          description: The newest restorable set of the series, or null.
          type: str
        chains:
          description: The series' chains, oldest first; each copy is a chain of its own with C(chain_id) null.
          type: list
          elements: dict
          contains:
            chain_id:
              description: The chain id.
              type: str
            base:
              description: The chain's full (or the copy); null when no full of the chain is committed any more.
              type: str
            newest:
              description: The newest set of the chain.
              type: str
            sets:
              description: The chain's set ids, oldest first (left out with O(list_sets=false)).
              type: list
              elements: str
            bytes:
              description: Bytes of the chain's sets.
              type: int
    newest_restorable:
      description: The newest restorable point of the VM (of the series asked for, if one is), or null.
      type: dict
      contains:
        set_id:
          description: The set.
          type: str
        series:
          description: Its series.
          type: str
        started:
          description: When it started.
          type: str
        completed:
          description: When it completed.
          type: str
        age_seconds:
          description: Seconds since it completed.
          type: int
    totals:
      description: C(sets) (count) and C(bytes) of the VM's listed sets (unreadable sets count as sets with no bytes).
      type: dict
    drill:
      description:
        - The VM's newest restore drill (M(vmbackup.libvirt.drill)), whatever its outcome, from the proofs
          C(sets/<set-id>.drill.json) beside its committed sets; null when none of its sets was drilled.
        - Newest means the proof completed last (a drill of an older point, chosen at random, can be the newest drill).
        - "A policy of 'drilled within N days': C(drill.outcome == 'ok' and drill.age_seconds < N * 86400), or use
          RV(vms[].drill_ok) to accept an older passed drill after a failed one."
      type: dict
      contains:
        set_id:
          description: The drilled set.
          type: str
        completed:
          description: When the drill completed (UTC).
          type: str
        age_seconds:
          description: Seconds since it completed.
          type: int
        outcome:
          description: C(ok), C(failed) (a check found the point wanting), C(error) (the drill could not run) or C(unreadable).
          type: str
        host:
          description: The host the drill ran on.
          type: str
        failed_check:
          description: The check that failed (C(image), C(restore), C(fsck), C(boot), C(agent), C(fsinfo), C(probe)), or null.
          type: str
        error_code:
          description: The error code of the failed check (such as C(CHECKSUM_MISMATCH)), or null.
          type: str
        current:
          description: Whether the proof names the set's manifest as it is now (its sha256).
          type: bool
    drill_ok:
      description: The VM's newest drill whose outcome is C(ok), with the keys of RV(vms[].drill); null when none passed.
      type: dict
    drills:
      description: How many of the VM's committed sets have a drill proof.
      type: int
totals:
  description: C(vms), C(sets) and C(bytes) of everything listed.
  returned: success
  type: dict
  sample: {"vms": 2, "sets": 14, "bytes": 2147483648}
query_result:
  description: The value of O(query) applied to the result.
  returned: when O(query) is given
  type: raw
error_code:
  description: Why the module failed (C(REPOSITORY_NOT_FOUND), C(SET_NOT_FOUND), C(INVALID_ARGUMENT), C(MISSING_DEPENDENCY)...).
  returned: failure
  type: str
  sample: SET_NOT_FOUND
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmbackup.libvirt.plugins.module_utils._args import CONNECTION_ARGSPEC, REPOSITORY_ARGSPEC
from ansible_collections.vmbackup.libvirt.plugins.module_utils._info import InfoBackend, InfoParams
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import run_module


def main() -> None:
    argument_spec = dict(
        name=dict(type="str"),
        uuid=dict(type="str"),
        series=dict(type="str"),
        query=dict(type="str"),
        list_sets=dict(type="bool", default=True),
    )
    argument_spec.update(CONNECTION_ARGSPEC)
    argument_spec.update(REPOSITORY_ARGSPEC)
    module = AnsibleModule(argument_spec=argument_spec, mutually_exclusive=[("name", "uuid")], supports_check_mode=True)
    run_module(module, InfoParams, InfoBackend, needs_libvirt=False, needs_qemu_img=False)


if __name__ == "__main__":
    main()
