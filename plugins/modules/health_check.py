#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: health_check
short_description: Check that a VM runs, that its guest agent answers, and that a probe command succeeds in it
version_added: 0.1.0
author:
  - vmbackup.libvirt contributors (@vmbackup)
description:
  - Checks a libvirt VM, typically one just restored and started, in this order, and stops at the first check that fails.
  - "C(running): the domain is running (or blocked), waiting up to O(timeout) seconds for it (O(running=false) skips it)."
  - "C(agent): the QEMU guest agent answers C(guest-ping), asked again until O(timeout) (counted from the start of the
    module, so it is one budget for C(running) and C(agent)). With O(agent=auto) the check runs only when the domain has the
    agent's channel (C(org.qemu.guest_agent.0)) and is skipped otherwise; O(agent=required) fails without the channel;
    O(agent=never) skips it."
  - "C(probe), with O(probe): the command is run in the guest through the agent (C(guest-exec), no shell, the guest's
    C(PATH) searched) and must end within O(probe_timeout) with exit code O(probe_expect_rc) and, with
    O(probe_expect_stdout), print that text. A probe that does not end in time is killed in the guest (C(kill -9) through
    the agent, best effort)."
  - "A failed check fails the module with C(AGENT_UNAVAILABLE) (the agent did not answer, or the VM has no agent channel
    where one is needed) or C(HEALTH_CHECK_FAILED) (the VM does not run, the probe's exit code or output is not the
    expected one, it could not be run or did not end); RV(failed_check) names the check and RV(checks) has each check's
    outcome so far."
  - The module never changes the VM or its definition; what a probe command does in the guest is the probe's business.
    libvirt records each agent command sent this way as a C(custom-ga-command) taint in the domain's log.
extends_documentation_fragment:
  - vmbackup.libvirt._connection
  - vmbackup.libvirt._attributes
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - Looks the VM up (C(VM_NOT_FOUND) when it does not exist) and reports the checks it would run, each with
        C(outcome=skipped) and a detail starting C(check mode), and RV(healthy=null); it waits for nothing and runs no probe.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
    support: full
    details:
      - It never reports a change.
options:
  name:
    description:
      - The name of the domain to check. Exactly one of O(name) and O(uuid).
    type: str
  uuid:
    description:
      - The UUID of the domain to check.
    type: str
  running:
    description:
      - Check that the domain runs, waiting up to O(timeout) for it. C(false) skips the check (the agent and probe checks
        still need a running VM).
    type: bool
    default: true
  agent:
    description:
      - C(auto) checks the guest agent when the domain has its channel, and skips the check when it has none.
      - C(required) fails with C(AGENT_UNAVAILABLE) when the domain has no agent channel or the agent does not answer.
      - C(never) does not ask the agent; it cannot be combined with O(probe) (C(INVALID_ARGUMENT)).
    type: str
    choices: [auto, required, never]
    default: auto
  timeout:
    description:
      - Seconds to wait for the domain to run and its agent to answer, together. Above 0, at most 3600.
    type: float
    default: 60
  probe:
    description:
      - A command to run in the guest through the agent, as a list - the program, then its arguments (no shell; use
        C([sh, -c, "..."]) for one).
      - It runs as the agent's user (root in most guests).
    type: list
    elements: str
  probe_expect_rc:
    description:
      - The exit code the probe must end with (0 to 255). A probe killed by signal N counts as 128+N.
    type: int
    default: 0
  probe_expect_stdout:
    description:
      - Text the probe's standard output must contain (a plain substring, not a pattern). Needs O(probe).
    type: str
  probe_timeout:
    description:
      - Seconds the probe may run. Above 0, at most 3600.
    type: float
    default: 30
notes:
  - The probe's stdout and stderr are kept up to 64 KiB each (RV(probe.truncated) says when more was cut).
seealso:
  - module: vmbackup.libvirt.restore
"""

EXAMPLES = r"""
- name: Check that the restored copy runs and its guest agent answers
  vmbackup.libvirt.health_check:
    name: web01-restored
    timeout: 120

- name: Check that the database answers in the restored VM
  vmbackup.libvirt.health_check:
    name: db01-restored
    agent: required
    probe: [sh, -c, "pg_isready -h 127.0.0.1"]
    probe_timeout: 20

- name: A file written before the backup is back
  vmbackup.libvirt.health_check:
    name: app01-restored
    probe: [cat, /etc/machine-role]
    probe_expect_stdout: app-server
"""

RETURN = r"""
healthy:
  description: Whether every check that ran passed. C(null) in check mode (nothing was checked).
  returned: always
  type: bool
checks:
  description: Each check in order, up to the one that failed.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: C(running), C(agent) or C(probe).
      type: str
    outcome:
      description: C(ok), C(failed) or C(skipped).
      type: str
    seconds:
      description: How long the check took.
      type: float
    detail:
      description: What was seen, or why the check was skipped.
      type: str
  sample:
    - {name: running, outcome: ok, seconds: 0.0, detail: the VM is running}
    - {name: agent, outcome: ok, seconds: 3.2, detail: the guest agent answered guest-ping after 3.2s}
failed_check:
  description: The name of the check that failed.
  returned: failure
  type: str
  sample: agent
vm:
  description: Name, UUID and state of the domain (its state after the checks).
  returned: always
  type: dict
agent_channel:
  description: Whether the domain has the guest agent's channel.
  returned: always
  type: bool
probe:
  description: What the probe gave; C(null) when no probe ran.
  returned: always
  type: dict
  contains:
    rc:
      description: Its exit code (128+N when killed by signal N); C(null) when it could not be run or did not end in time.
      type: int
    stdout:
      description: Its standard output (text, up to 64 KiB).
      type: str
    stderr:
      description: Its standard error (text, up to 64 KiB).
      type: str
    seconds:
      description: How long it ran.
      type: float
    truncated:
      description: Whether output was cut.
      type: bool
    error:
      description: Why it has no exit code (the agent refused to run it, or it did not end within O(probe_timeout)).
      type: str
error_code:
  description:
    - C(AGENT_UNAVAILABLE), C(HEALTH_CHECK_FAILED), or C(VM_NOT_FOUND), C(INVALID_ARGUMENT), C(INVALID_NAME),
      C(LIBVIRT_UNAVAILABLE), C(MISSING_DEPENDENCY).
  returned: failure
  type: str
  sample: HEALTH_CHECK_FAILED
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmbackup.libvirt.plugins.module_utils._args import CONNECTION_ARGSPEC
from ansible_collections.vmbackup.libvirt.plugins.module_utils._guest import AGENT_POLICIES, HealthCheck, HealthParams
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import run_module


def main() -> None:
    argument_spec = dict(
        name=dict(type="str"),
        uuid=dict(type="str"),
        running=dict(type="bool", default=True),
        agent=dict(type="str", choices=list(AGENT_POLICIES), default="auto"),
        timeout=dict(type="float", default=60.0),
        probe=dict(type="list", elements="str"),
        probe_expect_rc=dict(type="int", default=0),
        probe_expect_stdout=dict(type="str"),
        probe_timeout=dict(type="float", default=30.0),
    )
    argument_spec.update(CONNECTION_ARGSPEC)
    module = AnsibleModule(
        argument_spec=argument_spec,
        mutually_exclusive=[("name", "uuid")],
        required_one_of=[("name", "uuid")],
        supports_check_mode=True,
    )
    run_module(module, HealthParams, HealthCheck, needs_qemu_img=False)


if __name__ == "__main__":
    main()
