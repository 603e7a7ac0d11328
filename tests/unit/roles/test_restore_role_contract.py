# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The restore role's contract: argument_specs and defaults agree, every variable is prefixed and
in the README's table with its default, survey-facing yes/no and numeric variables accept text
(type raw), every task is named with a fully qualified action, and the playbook wraps the role."""

from __future__ import annotations

import pathlib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[3]
ROLE = ROOT / "roles" / "restore"
DEFAULTS = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
OPTIONS = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
README = (ROLE / "README.md").read_text()


def test_same_keys():
    assert sorted(DEFAULTS) == sorted(OPTIONS)


@pytest.mark.parametrize("key", sorted(OPTIONS))
def test_each_option(key):
    spec = OPTIONS[key]
    assert key.startswith("vmbackup_restore_") and spec.get("description")
    assert spec.get("default") == DEFAULTS[key]
    # Booleans and numbers come from surveys as text: the role parses them itself.
    if isinstance(DEFAULTS[key], (bool, int, float)) or key.endswith(("network_map", "probe")):
        assert spec["type"] == "raw", key
    row = next((line for line in README.splitlines() if line.startswith(f"| `{key}` |")), None)
    assert row is not None, key
    shown = row.split("|")[2].strip().strip("`")
    assert yaml.safe_load(shown or '""') == DEFAULTS[key], (key, shown)


def _tasks(tasks):
    for task in tasks or []:
        yield task
        for section in ("block", "rescue", "always"):
            yield from _tasks(task.get(section))


@pytest.mark.parametrize("path", sorted(p.name for p in (ROLE / "tasks").glob("*.yml")))
def test_tasks_named_and_qualified(path):
    keywords = {"name", "when", "vars", "loop", "loop_control", "register", "block", "rescue", "always", "check_mode"}
    for task in _tasks(yaml.safe_load((ROLE / "tasks" / path).read_text())):
        assert task.get("name"), task
        actions = [k for k in task if k not in keywords]
        assert (not actions) if "block" in task else (len(actions) == 1 and actions[0].count(".") == 2), (path, task)


def test_playbook_wraps_the_role_on_the_named_host():
    plays = yaml.safe_load((ROOT / "playbooks" / "restore.yml").read_text())
    assert plays[-1]["hosts"] == "{{ vmbackup_restore_host | default('localhost') }}"
    assert "vmbackup_restore_host" in str(plays[0]["tasks"][0]["ansible.builtin.assert"]["that"])
    assert plays[-1]["roles"] == [{"role": "vmbackup.libvirt.restore"}]


def test_known_variables_list_is_complete():
    known = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["_vmbackup_restore_known_vars"]
    assert sorted(known) == sorted(list(DEFAULTS) + ["vmbackup_restore_host"])
