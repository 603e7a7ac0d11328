#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: policy_check
short_description: Judge a backup repository against a backup policy - RPO, verify, chain, restore points, consistency, drills
version_added: 0.3.0
author:
  - vmbackup.libvirt contributors (@vmbackup)
description:
  - Reads the catalog of a repository exactly as M(vmbackup.libvirt.backup_info) does (no lock, nothing written) and
    judges every VM against a backup policy - one case per VM and rule, C(passed), C(failed) or C(skipped), with a
    message saying why in words an operator acts on (for instance C(newest point 2026-11-20T02:00:07Z (set ...) is 171 h
    old, the policy allows 26 h)), the measured RV(cases[].value) and the policy's RV(cases[].limit).
  - "The built-in rules (O(policy.rules)): C(rpo_hours) - the newest readable point started less than this many hours
    ago; C(verify_days) - no verify verdict other than C(ok) on the restore path of the newest point, and the newest
    C(ok) verdict of the VM (of any of its sets) is younger than this many days and C(current) (recorded for the manifest
    as it is now); C(chain) - the newest point is restorable (its restore path complete and unblocked, as
    RV(vmbackup.libvirt.backup_info#module:vms[].sets[].restorable) says); C(min_points) - at least this many restorable
    points; C(consistency) - C(application) requires the newest point to be application-consistent, C(crash) accepts
    either; C(drill_days) - a restore drill (M(vmbackup.libvirt.drill)) passed less than this many days ago and the
    newest drill did not fail (a drill that could not run, outcome C(error), does not block when an older one passed).
    Rules the built-ins do not cover are L(JMESPath,https://jmespath.org/) expressions over the VM's backup_info entry."
  - The VMs judged are those of the repository and those of O(vms), the VMs libvirt has (as
    M(vmbackup.libvirt.domain_info) lists them on the hypervisors). A VM of O(vms) without any backup in the repository
    fails every rule that is on. A VM whose libvirt metadata opted it out (RV(vmbackup.libvirt.domain_info#module:domains[].metadata.enabled)
    false) and a VM whose name matches O(policy.exclude) are reported with C(skipped) cases that say why.
  - The C(vmbackup.libvirt.policy_check) playbook runs it over the hypervisors and repositories and writes JUnit XML,
    JSON and Markdown reports (the C(vmbackup.libvirt.policy_junit) and C(vmbackup.libvirt.policy_markdown) filters) for
    CI. See C(docs/policy-check.md).
  - The module does not need libvirt.
extends_documentation_fragment:
  - vmbackup.libvirt._repository
  - vmbackup.libvirt._attributes
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - The module only reads; check mode runs the same evaluation and returns the same result.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
    support: full
    details:
      - Always C(changed=false). Ages are measured against the managed host's clock at the call, so a later call can judge
        differently (a point grows older).
options:
  policy:
    description:
      - The backup policy. Validated strictly - an unknown key anywhere (a misspelt rule) fails with C(INVALID_ARGUMENT)
        naming the key, before the repository is read.
      - "O(policy.rules) - the rules of every VM: C(rpo_hours) (number, default 26), C(verify_days) (number, default 8),
        C(chain) (bool, default true), C(min_points) (whole number, default 1), C(consistency) (C(crash) or C(application),
        default C(crash)), C(drill_days) (number, default 35), C(expressions) (list, default none). A rule left out keeps
        its default; a rule set to null (or C(chain=false)) is off and has no case."
      - "Each expression is C({name, expr, message}) - C(name) names its case (letters, digits, C(_), C(.), C(-); not the
        name of a built-in rule), C(expr) is evaluated over the VM's entry of RV(vmbackup.libvirt.backup_info#module:vms)
        (keys such as C(sets), C(series), C(drill), C(newest_restorable)), and the rule passes when the value is true in
        JMESPath's sense (false, null, empty strings, lists and objects fail; 0 passes). C(message) (optional) is the
        failure message. An expression that does not parse fails the module with C(INVALID_ARGUMENT); one that fails on a
        VM's data (a type error) fails that VM's case."
      - "O(policy.classes) - a list of C({name, match, rules}); the first class whose C(match) holds sets the VM's rules:
        its C(rules) laid over O(policy.rules) (a class's C(expressions) replace the default ones). C(match) keys, all of
        which must hold - C(tier) (a tier or a list; the tier of O(vms[].tier), C(default) without one), C(names) (name
        patterns, C(fnmatch), case-sensitive), C(groups) (any of O(vms[].groups), the inventory groups of the VM's
        hypervisor). A VM found only in the repository has no tier and no groups - only C(names) classes match it."
      - "O(policy.include) - name patterns of the VMs to judge at all (default C(['*'])); other VMs are left out of the
        result. O(policy.exclude) - name patterns of VMs reported with C(skipped) cases. A pattern or class that matches
        no VM gives a warning."
      - Omitted or empty, every default applies.
    type: dict
    default: {}
  vms:
    description:
      - The VMs libvirt has, typically built from M(vmbackup.libvirt.domain_info) on every hypervisor (the
        C(vmbackup.libvirt.policy_check) playbook does that). Each is joined with the repository's VMs by O(vms[].uuid),
        or by name when no UUID is given.
      - Without it, only the VMs of the repository are judged, and a VM that was never backed up goes unnoticed.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: The VM's name.
        type: str
        required: true
      uuid:
        description: The VM's UUID.
        type: str
      host:
        description: The hypervisor it is defined on.
        type: str
      tier:
        description: Its tier (the libvirt metadata's); C(default) when not given.
        type: str
      enabled:
        description: The metadata's C(enabled) - false (opted out) makes its cases C(skipped); true or null judges it.
        type: bool
      groups:
        description: The inventory groups of its hypervisor, for O(policy.classes) C(match.groups).
        type: list
        elements: str
        default: []
  discovery_failures:
    description:
      - Hypervisors whose VMs could not be listed (unreachable, libvirt down). Each gives a failed case with rule
        C(discovery) - a VM there without a backup cannot be seen, so the check must not pass.
    type: list
    elements: dict
    default: []
    suboptions:
      host:
        description: The hypervisor.
        type: str
        required: true
      msg:
        description: Why its VMs could not be listed.
        type: str
  fail_on_violation:
    description:
      - Fail with C(POLICY_VIOLATED) when any case failed; the failure result still has every return value.
      - The playbook sets it to false, writes its reports, and then fails.
    type: bool
    default: true
  lock_timeout:
    description:
      - Accepted for C(module_defaults) and validated (between 0 and 604800), but not used - this module takes no lock.
    type: float
    default: 60
  uri:
    description:
      - Not used; the catalog is read from the repository only. Accepted so that C(module_defaults) of the
        C(group/vmbackup.libvirt.libvirt) action group can set it for all modules.
    type: str
    default: qemu:///system
notes:
  - Reading without a lock is safe for the reasons M(vmbackup.libvirt.backup_info) gives (every change of a repository is a
    rename); the module never creates a file, not even a lock file, so running it changes nothing anywhere.
  - Ages are measured against the managed host's clock; a point or verdict dated in the future fails its rule (a wrong
    clock is reported, not trusted).
requirements:
  - jmespath (only with O(policy) expressions)
seealso:
  - module: vmbackup.libvirt.backup_info
  - module: vmbackup.libvirt.domain_info
  - module: vmbackup.libvirt.verify
  - module: vmbackup.libvirt.drill
  - plugin: vmbackup.libvirt.policy_junit
    plugin_type: filter
  - plugin: vmbackup.libvirt.policy_markdown
    plugin_type: filter
"""

EXAMPLES = r"""
- name: Judge the repository against the default policy (fails with POLICY_VIOLATED on a violation)
  vmbackup.libvirt.policy_check:
    repository: /srv/vmbackup

- name: A policy with a gold tier, judged against the VMs libvirt has, reported rather than failed
  vmbackup.libvirt.policy_check:
    repository: /srv/vmbackup
    vms: "{{ libvirt_vms }}"  # [{name, uuid, host, tier, enabled, groups}]
    fail_on_violation: false
    policy:
      rules:
        rpo_hours: 26
        verify_days: 8
        min_points: 2
        drill_days: 35
        expressions:
          - name: weekly_series
            expr: "length(series[?name=='weekly']) > `0`"
            message: the VM has no weekly series
      classes:
        - name: gold
          match: {tier: gold}
          rules: {rpo_hours: 25, consistency: application, drill_days: 8}
        - name: scratch
          match: {names: ["tmp-*"]}
          rules: {drill_days: null, min_points: 1}
      exclude: ["scratch-*"]
  register: policy

- name: Write the JUnit report for CI
  ansible.builtin.copy:
    content: "{{ policy | vmbackup.libvirt.policy_junit }}"
    dest: policy.junit.xml
    mode: "0644"
  delegate_to: localhost
"""

RETURN = r"""
passed:
  description: Whether no case failed.
  returned: always
  type: bool
  sample: false
repository:
  description: The repository judged.
  returned: always
  type: str
  sample: /srv/vmbackup
generated:
  description: The managed host's UTC time when the catalog was read; every age is relative to it.
  returned: always
  type: str
  sample: "2026-11-27T08:00:00Z"
cases:
  description: One per VM and rule that is on (failed discovery of a hypervisor first), VMs sorted by name.
  returned: always
  type: list
  elements: dict
  contains:
    vm:
      description: The VM's name (its UUID when no name is known); null for a C(discovery) case.
      type: str
    uuid:
      description: The VM's UUID (null for a libvirt VM given without one that has no backup).
      type: str
    host:
      description: The hypervisor (from O(vms), else the host that took the newest set).
      type: str
    class:
      description: The policy class that set the VM's rules, C(default) when none matched.
      type: str
    rule:
      description: C(rpo_hours), C(verify_days), C(chain), C(min_points), C(consistency), C(drill_days), an expression's
        name, or C(discovery).
      type: str
    outcome:
      description: C(passed), C(failed) or C(skipped).
      type: str
    message:
      description: Why, in an operator's words.
      type: str
      sample: "newest point 2026-11-20T02:00:07Z (set 20261120T020007Z-001) is 171 h old, the policy allows 26 h"
    value:
      description: What was measured - hours (C(rpo_hours)), days (C(verify_days), C(drill_days)), a count
        (C(min_points)), a consistency, a bool (C(chain)), an expression's value; null when there is nothing to measure.
      type: raw
    limit:
      description: The policy's limit for the rule (the expression for an expression rule).
      type: raw
vms:
  description: One entry per VM judged or skipped, sorted by name.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The VM's name.
      type: str
    uuid:
      description: Its UUID.
      type: str
    host:
      description: Its hypervisor.
      type: str
    class:
      description: Its policy class.
      type: str
    in_libvirt:
      description: Whether O(vms) lists it.
      type: bool
    in_repository:
      description: Whether the repository has a directory for it.
      type: bool
    skipped:
      description: Why its cases are skipped (excluded, opted out), or null.
      type: str
    passed:
      description: Whether none of its cases failed.
      type: bool
    failed_rules:
      description: The rules it fails.
      type: list
      elements: str
summary:
  description: Counts - C(vms), C(cases), C(passed), C(failed), C(skipped) (cases) and C(failed_vms).
  returned: always
  type: dict
  sample: {"vms": 5, "cases": 30, "passed": 24, "failed": 5, "skipped": 1, "failed_vms": 3}
policy:
  description: The policy as applied - every rule with its default filled in, each class with its merged rules.
  returned: always
  type: dict
error_code:
  description: Why the module failed (C(POLICY_VIOLATED), C(INVALID_ARGUMENT), C(REPOSITORY_NOT_FOUND),
    C(MISSING_DEPENDENCY)...).
  returned: failure
  type: str
  sample: POLICY_VIOLATED
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmbackup.libvirt.plugins.module_utils._args import CONNECTION_ARGSPEC, REPOSITORY_ARGSPEC
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import run_module
from ansible_collections.vmbackup.libvirt.plugins.module_utils._policy import PolicyBackend, PolicyParams


def main() -> None:
    argument_spec = dict(
        policy=dict(type="dict", default={}),
        vms=dict(type="list", elements="dict", default=[], options=dict(
            name=dict(type="str", required=True),
            uuid=dict(type="str"),
            host=dict(type="str"),
            tier=dict(type="str"),
            enabled=dict(type="bool"),
            groups=dict(type="list", elements="str", default=[]),
        )),
        discovery_failures=dict(type="list", elements="dict", default=[], options=dict(
            host=dict(type="str", required=True),
            msg=dict(type="str"),
        )),
        fail_on_violation=dict(type="bool", default=True),
    )
    argument_spec.update(CONNECTION_ARGSPEC)
    argument_spec.update(REPOSITORY_ARGSPEC)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    run_module(module, PolicyParams, PolicyBackend, needs_libvirt=False, needs_qemu_img=False)


if __name__ == "__main__":
    main()
