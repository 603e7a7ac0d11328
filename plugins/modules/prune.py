#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: prune
short_description: Apply a retention policy to the backup sets of VMs in a repository
version_added: 0.1.0
author:
  - vmbackup.libvirt contributors (@vmbackup)
description:
  - Decides for every committed set of one VM (or of every VM of the repository) whether it is kept or removed,
    with every reason, and removes the sets that no rule keeps.
  - "Rules as in restic C(forget) and Proxmox Backup Server C(prune): O(keep_last) keeps the N newest points;
    O(keep_hourly), O(keep_daily), O(keep_weekly), O(keep_monthly) and O(keep_yearly) keep the newest point of each of
    the N newest hours, days, ISO weeks, months or years that have points; O(keep_within) keeps every point taken
    within that duration before now. A point kept by several rules lists every reason (C(weekly 2026-W47),
    C(monthly 2026-11), C(last 1), C(within 14d), C(newest), C(parent of <set id>))."
  - Buckets are computed from the sets' own UTC start times seen in one IANA time zone (O(timezone), default C(UTC)),
    so the decision never depends on the C(TZ) of the host or the controller.
  - Each series (see M(vmbackup.libvirt.export) O(vmbackup.libvirt.export#module:series)) is selected on its own; with
    O(series), only that series is pruned and the other series' sets are kept.
  - A kept incremental keeps every set it builds on, back to its full (C(parent of ...)), whatever series it is in.
  - A point that cannot be restored (a failed or unreadable verify verdict on any set its restore reads, a broken or
    unreadable link) fills no bucket; the next older restorable point does.
  - Never removed - the newest set of each series (it holds the series' live checkpoint and is the next parent), the
    newest restorable set of each series, and sets whose manifest cannot be read (their series is unknown).
  - Refuses - an empty policy (C(RETENTION_POLICY_EMPTY)); a set dated after the host's clock (C(CLOCK_SKEW)); a VM
    whose lock another run (an export) holds past O(lock_timeout) (C(VM_LOCKED)). Every VM is decided before any set
    is removed, so a refusal removes nothing anywhere.
  - Sets are removed descendants before ancestors, each first renamed out of C(sets/) into C(vms/<uuid>/.removing/)
    (an atomic step), with its verify verdict, then deleted without following links. An interrupted prune leaves only
    sound chains in C(sets/); the next prune finishes what is in C(.removing/) and reports it in RV(cleaned_up).
  - Staging directories of dead runs (C(.incomplete/*)) are removed and reported in RV(cleaned_up), except those of
    an interrupted live backup, which record a libvirt checkpoint (C(run.json)); those are left for the next
    M(vmbackup.libvirt.export), which deletes that checkpoint, and are listed in RV(staging_left). Prune never
    touches libvirt.
  - See C(docs/retention.md) in the collection for the exact rules and a worked example.
extends_documentation_fragment:
  - vmbackup.libvirt._repository
  - vmbackup.libvirt._attributes
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - Decides exactly as a real run and removes nothing, creates nothing (no lock file, no C(.removing/)). When the
        VM's lock file exists, check mode takes a shared lock on it, so a running export is C(VM_LOCKED) in check mode
        as it is for the real run. RV(sets), RV(removed), RV(removed_bytes) and RV(cleaned_up) are those the real run
        then has, as long as no set is added or verified in between.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: full
    details:
      - The diff lists the sets before and after (one line per set - VM, series, set id, type).
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
    support: full
    details:
      - A second run with the same policy at nearly the same time removes nothing and reports C(changed=false). As time
        passes, a later run may remove more (a point leaves O(keep_within) or its bucket is no longer among the N newest).
options:
  name:
    description:
      - Prune the sets of the VM with this name (as its newest set records it). At most one of O(name) and O(uuid).
      - Without O(name) and O(uuid), every VM of the repository is pruned (each on its own).
    type: str
  uuid:
    description:
      - Prune the sets of the VM with this UUID.
    type: str
  series:
    description:
      - Prune only this series; other series' sets are kept. Default - every series, each on its own.
    type: str
  keep_last:
    description:
      - Keep the N newest restorable points.
    type: int
  keep_hourly:
    description:
      - Keep the newest restorable point of each of the N newest hours that have one. An hour carries its UTC offset, so
        the hour a DST change repeats is two hours.
    type: int
  keep_daily:
    description:
      - Keep the newest restorable point of each of the N newest days (in O(timezone)) that have one.
    type: int
  keep_weekly:
    description:
      - Keep the newest restorable point of each of the N newest ISO weeks (C(%G-W%V), Monday to Sunday) that have one.
    type: int
  keep_monthly:
    description:
      - Keep the newest restorable point of each of the N newest months that have one.
    type: int
  keep_yearly:
    description:
      - Keep the newest restorable point of each of the N newest years that have one.
    type: int
  keep_within:
    description:
      - Keep every restorable point taken at or after now minus this duration, such as C(14d), C(36h), C(2w), C(90m)
        (C(m) is minutes), C(1w2d), or a plain number of days. Months and years are refused (no fixed length); give days.
    type: str
  timezone:
    description:
      - The IANA time zone in which hours, days, weeks, months and years are counted, such as C(Europe/Berlin).
    type: str
    default: UTC
  uri:
    description:
      - Not used; prune works on the repository only. Accepted so that C(module_defaults) of the
        C(group/vmbackup.libvirt.libvirt) action group can set it for all modules.
    type: str
    default: qemu:///system
notes:
  - With every C(keep_*) option unset or 0 and no O(keep_within), the module fails with C(RETENTION_POLICY_EMPTY)
    rather than keep only what it never removes; C(keep_last=1) keeps just the newest set.
  - Prune takes each VM's lock exclusively for the whole run (all VMs first, in UUID order), so it waits for a running
    export, verify or restore of the same VM, and they wait for it.
seealso:
  - module: vmbackup.libvirt.export
  - module: vmbackup.libvirt.verify
  - module: vmbackup.libvirt.backup_info
"""

EXAMPLES = r"""
- name: Keep five weekly points of the weekly series of every VM
  vmbackup.libvirt.prune:
    repository: /srv/vmbackup
    series: weekly
    keep_weekly: 5

- name: A year of monthly points and three yearly ones, counted in Berlin time
  vmbackup.libvirt.prune:
    repository: /srv/vmbackup
    name: web01
    series: monthly
    keep_monthly: 12
    keep_yearly: 3
    timezone: Europe/Berlin

- name: Show what a policy would remove, without removing anything
  vmbackup.libvirt.prune:
    repository: /srv/vmbackup
    keep_daily: 7
    keep_within: 3d
  check_mode: true
  diff: true
  register: preview

- name: List the sets that would go, and why the others stay
  ansible.builtin.debug:
    msg: "{{ preview.sets | selectattr('action', 'eq', 'remove') | map(attribute='set_id') | list }}"
"""

RETURN = r"""
sets:
  description: Every committed set of the selected VMs, with the decision and its reasons (per VM, oldest first).
  returned: always
  type: list
  elements: dict
  contains:
    vm_uuid:
      description: The VM's UUID.
      type: str
    vm_name:
      description: The VM's name as its newest set records it.
      type: str
    set_id:
      description: The set.
      type: str
    series:
      description: The set's series (null when its manifest is unreadable).
      type: str
    type:
      description: C(full), C(incremental) or C(copy) (null when unreadable).
      type: str
    chain_id:
      description: The chain the set belongs to.
      type: str
    parent:
      description: The set id of its parent (incrementals).
      type: str
    started:
      description: The backup's point in time (UTC), the time buckets are computed from.
      type: str
    bytes:
      description: Sum of the sizes of the set's files, verify verdict included.
      type: int
    readable:
      description: Whether the set's manifest can be read.
      type: bool
    restorable:
      description: Whether the point can be restored (no failed verdict on its restore path, chain sound).
      type: bool
    restore_fault:
      description: Why the point cannot be restored, or null.
      type: str
    action:
      description: C(keep) or C(remove).
      type: str
    reasons:
      description: Every reason the set is kept (empty when removed), such as C(weekly 2026-W47), C(daily 2026-11-20),
        C(last 1), C(within 14d), C(newest), C(newest restorable), C(parent of 20261120T020000Z-001),
        C(series monthly not selected), C(unreadable (never removed)).
      type: list
      elements: str
removed:
  description: Ids of the sets removed (in check mode - that would be removed).
  returned: always
  type: list
  elements: str
kept:
  description: Ids of the sets kept.
  returned: always
  type: list
  elements: str
removed_bytes:
  description: Bytes of the removed sets' files.
  returned: always
  type: int
cleaned_up:
  description: Leftovers removed (in check mode - that would be removed) - what an interrupted prune left in
    C(.removing/), verdict files whose set is gone, staging directories of dead runs.
  returned: always
  type: list
  elements: str
staging_left:
  description: Staging directories of interrupted live backups left for export's cleanup (they name a libvirt checkpoint).
  returned: always
  type: list
  elements: dict
  contains:
    vm_uuid:
      description: The VM.
      type: str
    path:
      description: The staging directory.
      type: str
    reason:
      description: Why it was left.
      type: str
vms:
  description: Per VM - its sets, what was kept and removed, per series.
  returned: always
  type: list
  elements: dict
  contains:
    uuid:
      description: The VM's UUID.
      type: str
    name:
      description: The VM's name.
      type: str
    sets:
      description: Number of sets before the prune.
      type: int
    kept:
      description: Ids of the kept sets.
      type: list
      elements: str
    removed:
      description: Ids of the removed sets.
      type: list
      elements: str
    removed_bytes:
      description: Bytes removed.
      type: int
    series:
      description: Per series - C(name), C(kept), C(removed) (counts) and C(removed_bytes).
      type: list
      elements: dict
now:
  description: The host time (UTC) the decision was made at.
  returned: always
  type: str
policy:
  description: The policy applied (keep_within as a duration text).
  returned: always
  type: dict
series:
  description: The series pruned (null - every series).
  returned: always
  type: str
timings:
  description: Seconds spent waiting for locks (C(lock_s)), reading and deciding (C(decide_s)), removing (C(remove_s))
    and in all (C(total_s)).
  returned: always
  type: dict
duration_s:
  description: Seconds the whole run took.
  returned: always
  type: float
diff:
  description: The set lists before and after.
  returned: always
  type: dict
error_code:
  description: Why the module failed.
  returned: failure
  type: str
  sample: VM_LOCKED
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmbackup.libvirt.plugins.module_utils._args import CONNECTION_ARGSPEC, REPOSITORY_ARGSPEC
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import run_module
from ansible_collections.vmbackup.libvirt.plugins.module_utils._prune import Pruner, PruneParams


def main() -> None:
    argument_spec = dict(
        name=dict(type="str"),
        uuid=dict(type="str"),
        series=dict(type="str"),
        keep_last=dict(type="int"),
        keep_hourly=dict(type="int"),
        keep_daily=dict(type="int"),
        keep_weekly=dict(type="int"),
        keep_monthly=dict(type="int"),
        keep_yearly=dict(type="int"),
        keep_within=dict(type="str"),
        timezone=dict(type="str", default="UTC"),
    )
    argument_spec.update(CONNECTION_ARGSPEC)
    argument_spec.update(REPOSITORY_ARGSPEC)
    module = AnsibleModule(argument_spec=argument_spec, mutually_exclusive=[("name", "uuid")], supports_check_mode=True)
    run_module(module, PruneParams, Pruner, needs_libvirt=False, needs_qemu_img=False)


if __name__ == "__main__":
    main()
