# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The drill role's contract: meta/argument_specs.yml documents exactly the keys and defaults of
defaults/main.yml, every public variable carries the prefix, every one is in the README, and every
task is named and uses a fully qualified action."""

from __future__ import annotations

import pathlib

import pytest
import yaml

ROLE = pathlib.Path(__file__).resolve().parents[3] / "roles" / "drill"
DEFAULTS = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
OPTIONS = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
TASK_KEYWORDS = {"name", "when", "vars", "loop", "loop_control", "register", "block", "rescue", "always", "check_mode",
                 "changed_when", "failed_when", "ignore_errors", "until", "retries", "delay", "async", "poll", "throttle",
                 "tags", "become", "no_log", "delegate_to", "run_once", "notify", "environment"}


def test_defaults_and_argument_specs_have_the_same_keys():
    assert sorted(DEFAULTS) == sorted(OPTIONS)


@pytest.mark.parametrize("key", sorted(OPTIONS))
def test_each_option(key):
    spec = OPTIONS[key]
    assert key.startswith("vmbackup_drill_")
    assert spec.get("default") == DEFAULTS[key]
    assert spec.get("description")
    assert f"`{key}`" in (ROLE / "README.md").read_text()


def _tasks(tasks):
    for task in tasks or []:
        yield task
        for section in ("block", "rescue", "always"):
            yield from _tasks(task.get(section))


@pytest.mark.parametrize("path", sorted(p.name for p in (ROLE / "tasks").glob("*.yml")))
def test_every_task_is_named_and_fully_qualified(path):
    for task in _tasks(yaml.safe_load((ROLE / "tasks" / path).read_text())):
        assert task.get("name"), task
        actions = [k for k in task if k not in TASK_KEYWORDS]
        if "block" in task:
            assert not actions, task
            continue
        assert len(actions) == 1 and actions[0].count(".") == 2, (path, task["name"], actions)
