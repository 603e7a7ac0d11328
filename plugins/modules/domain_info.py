#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: domain_info
short_description: List the libvirt VMs of a host and select those a backup run takes
version_added: 0.1.0
author:
  - vmbackup.libvirt contributors (@vmbackup)
description:
  - Lists every libvirt domain of O(uri) with its name, UUID, state, whether it is persistent, active and autostarted,
    its disks, and the collection's backup metadata element.
  - Applies the selection rules of a backup run to each domain and says for each whether it is selected and why.
    The C(vmbackup.libvirt.backup) role backs up exactly RV(selected).
  - "The rules, in this order: (1) the name must match one of O(include) and none of O(exclude); (2) a VM whose
    metadata says C(enabled=\"no\") is skipped, whatever the patterns say (an opt-out); (3) with O(require_opt_in), only
    VMs whose metadata says C(enabled=\"yes\") are taken; (4) with O(tiers), only VMs whose tier is listed are taken
    (a VM without a tier has tier C(default)); (5) transient domains are skipped unless O(include_transient);
    (6) shut-off domains are taken (backed up as a copy) unless O(include_shutoff=false); (7) malformed metadata never
    skips a VM (when in doubt, back it up): RV(domains[].reason) and a warning say what is wrong."
  - "The metadata element is set per VM with
    C(virsh metadata VM https://vmbackup.libvirt/schema/1 --key vmbackup --config --set '<backup enabled=\"no\" tier=\"gold\"/>')
    (add C(--live) for a running VM to change its live definition too; the persistent definition is read first).
    Every attribute is optional; C(enabled) takes C(yes) or C(no); a tier is a name of letters, digits, C(_), C(.) and C(-);
    C(quiesce) takes C(auto), C(required) or C(never) - the VM's own quiesce policy, which the C(vmbackup.libvirt.backup)
    role passes to M(vmbackup.libvirt.export) in place of its C(vmbackup_backup_quiesce) (see RV(domains[].metadata.quiesce)).
    A malformed value is ignored and reported, as a malformed tier is.
    C(virsh metadata VM https://vmbackup.libvirt/schema/1 --config --remove) removes it."
  - Only reads; it never changes a domain.
  - It is not in the C(group/vmbackup.libvirt.libvirt) action group, whose C(module_defaults) usually set a repository
    that this module does not read; give O(uri) to it directly.
extends_documentation_fragment:
  - vmbackup.libvirt._connection
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - The module only reads, in check mode as in a real run.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
    support: full
    details:
      - It never reports a change.
options:
  include:
    description:
      - Shell-style patterns (C(fnmatch), case-sensitive) of the VM names to select. By default every name.
      - A pattern other than C(*) that matches no domain at all gives a warning and is listed in RV(unmatched_patterns).
    type: list
    elements: str
  exclude:
    description:
      - Shell-style patterns of VM names never to select; they win over O(include).
    type: list
    elements: str
    default: []
  tiers:
    description:
      - Select only VMs whose metadata tier is one of these. A VM without a tier in its metadata has tier C(default).
      - Empty (the default) selects every tier.
    type: list
    elements: str
    default: []
  require_opt_in:
    description:
      - Select only VMs whose metadata element says C(enabled="yes").
    type: bool
    default: false
  include_transient:
    description:
      - Also select transient domains (those without a persistent definition). They are skipped by default - their
        definition vanishes when they stop, and whatever created them (an orchestrator, a CI job) is expected to create
        them again.
    type: bool
    default: false
  include_shutoff:
    description:
      - Select shut-off VMs too. M(vmbackup.libvirt.export) backs them up as a copy of their disks.
    type: bool
    default: true
  metadata_namespace:
    description:
      - The XML namespace of the metadata element. Change it only to keep two independent selections on one host.
    type: str
    default: https://vmbackup.libvirt/schema/1
requirements:
  - libvirt-python (on the managed host; the module re-runs itself under a system Python that has it)
seealso:
  - module: vmbackup.libvirt.export
  - name: virsh metadata
    description: Setting a domain's metadata element.
    link: https://libvirt.org/manpages/virsh.html#metadata
"""

EXAMPLES = r"""
- name: List the VMs of the host and which of them a backup takes
  vmbackup.libvirt.domain_info:
  register: found

- name: Show the selection
  ansible.builtin.debug:
    msg: "{{ found.selected }}"

- name: Only the production web and database VMs of the gold tier, never the scratch ones
  vmbackup.libvirt.domain_info:
    uri: qemu:///system
    include: ["web*", "db*"]
    exclude: ["*-scratch"]
    tiers: [gold]
  register: gold

- name: Back up the database VM only application-consistent (fail rather than take a crash-consistent backup)
  ansible.builtin.command:
    argv: [virsh, metadata, db01, "https://vmbackup.libvirt/schema/1", --key, vmbackup, --config,
           --set, '<backup tier="gold" quiesce="required"/>']
  changed_when: true

- name: Opt a VM out of backups (a command, since the collection only reads the metadata)
  ansible.builtin.command:
    argv: [virsh, metadata, test01, "https://vmbackup.libvirt/schema/1", --key, vmbackup, --config, --live,
           --set, '<backup enabled="no"/>']
  changed_when: true
"""

RETURN = r"""
uri:
  description: The libvirt URI that was read.
  returned: success
  type: str
  sample: qemu:///system
domains:
  description: Every domain of the host, sorted by name.
  returned: success
  type: list
  elements: dict
  contains:
    name:
      description: The domain's name.
      type: str
    uuid:
      description: The domain's UUID.
      type: str
    state:
      description: C(running), C(paused), C(shutoff), ... as libvirt reports it.
      type: str
    active:
      description: Whether the domain runs (or is paused).
      type: bool
    persistent:
      description: Whether the domain has a persistent definition (false for a transient domain).
      type: bool
    autostart:
      description: Whether libvirt starts the domain with the host.
      type: bool
    tier:
      description: The tier from the metadata, or C(default).
      type: str
    metadata:
      description: The collection's metadata element.
      type: dict
      contains:
        present:
          description: Whether the element exists.
          type: bool
        enabled:
          description: C(true) or C(false) as the element says, or C(null) when it does not say.
          type: bool
        tier:
          description: The tier the element names, or C(null).
          type: str
        quiesce:
          description: The quiesce policy the element names (C(auto), C(required) or C(never)), or C(null) when it names none
            or a malformed one.
          type: str
        error:
          description: What is malformed in the element, or C(null).
          type: str
        xml:
          description: The element as libvirt returns it, or C(null).
          type: str
    disks:
      description: The domain's disks (live definition for a running domain).
      type: list
      elements: dict
      contains:
        target:
          description: The disk target, such as C(vda).
          type: str
        device:
          description: C(disk), C(cdrom), C(floppy) or C(lun).
          type: str
        source:
          description: The file, block device or volume, or C(null) for an empty drive.
          type: str
        source_type:
          description: C(file), C(block), C(network), C(volume), ...
          type: str
        format:
          description: The driver type, such as C(qcow2) or C(raw).
          type: str
        readonly:
          description: Whether the disk is read-only.
          type: bool
        backup:
          description: Whether M(vmbackup.libvirt.export) backs this disk up by default.
          type: bool
        skip_reason:
          description: Why export skips it, or C(null).
          type: str
    selected:
      description: Whether a backup run with these options takes this VM.
      type: bool
    reason:
      description: Why it is selected or skipped.
      type: str
      sample: "opted out by its metadata (enabled=no)"
selected:
  description: Names of the selected domains, sorted.
  returned: success
  type: list
  elements: str
not_selected:
  description: The domains not selected, with the reason. (Not named C(skipped), which Ansible reads as a skipped task.)
  returned: success
  type: list
  elements: dict
  contains:
    name:
      description: The domain's name.
      type: str
    reason:
      description: Why it is skipped.
      type: str
unmatched_patterns:
  description: Patterns of O(include) (other than C(*)) and O(exclude) that match no domain at all.
  returned: success
  type: list
  elements: str
error_code:
  description: Why the module failed (C(LIBVIRT_UNAVAILABLE), C(INVALID_ARGUMENT), C(INVALID_NAME), C(MISSING_DEPENDENCY)).
  returned: failure
  type: str
  sample: LIBVIRT_UNAVAILABLE
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmbackup.libvirt.plugins.module_utils._args import CONNECTION_ARGSPEC
from ansible_collections.vmbackup.libvirt.plugins.module_utils._deps import ensure_libvirt
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._inventory import METADATA_NAMESPACE, InventoryParams, discover


def main() -> None:
    argument_spec = dict(
        include=dict(type="list", elements="str"),
        exclude=dict(type="list", elements="str", default=[]),
        tiers=dict(type="list", elements="str", default=[]),
        require_opt_in=dict(type="bool", default=False),
        include_transient=dict(type="bool", default=False),
        include_shutoff=dict(type="bool", default=True),
        metadata_namespace=dict(type="str", default=METADATA_NAMESPACE),
    )
    argument_spec.update(CONNECTION_ARGSPEC)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    ensure_libvirt(module)
    params = InventoryParams(**{key: module.params[key] for key in InventoryParams.__dataclass_fields__})
    try:
        result, warnings = discover(params)
    except VmBackupError as exc:
        module.fail_json(**exc.to_result())
    for warning in warnings:
        module.warn(warning)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
