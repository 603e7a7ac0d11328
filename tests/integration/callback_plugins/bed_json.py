# -*- coding: utf-8 -*-
"""A test-only callback: the playbook's results as one JSON document written to the file named by
VMBACKUP_BED_JSON (the layout of ansible.posix.json, which this tool chain does not ship). The
default stdout callback keeps printing for people. Used by tests/integration/testbed.py."""

from __future__ import annotations

import json
import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: bed_json
type: aggregate
short_description: playbook results as JSON in a file (tests only)
description: plays, tasks, per-host results, stats and custom stats written to $VMBACKUP_BED_JSON.
requirements: [enable it with ANSIBLE_CALLBACKS_ENABLED]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "bed_json"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, display=None):
        super().__init__(display)
        self.plays = []

    def _task(self, task):
        return {"task": {"name": task.get_name(), "action": task.action, "id": str(task._uuid)}, "hosts": {}}

    def v2_playbook_on_play_start(self, play):
        self.plays.append({"play": {"name": play.get_name(), "id": str(play._uuid)}, "tasks": []})

    def v2_playbook_on_task_start(self, task, is_conditional):
        if self.plays:
            self.plays[-1]["tasks"].append(self._task(task))

    def v2_playbook_on_handler_task_start(self, task):
        self.v2_playbook_on_task_start(task, False)

    def _record(self, result, **extra):
        if not self.plays:
            return
        tasks = self.plays[-1]["tasks"]
        if not tasks or tasks[-1]["task"]["id"] != str(result._task._uuid):
            tasks.append(self._task(result._task))
        res = dict(result._result)
        res.update(extra)
        res.pop("_ansible_verbose_always", None)
        tasks[-1]["hosts"][result._host.get_name()] = res

    def v2_runner_on_ok(self, result, **kwargs):
        self._record(result)

    def v2_runner_on_failed(self, result, ignore_errors=False, **kwargs):
        self._record(result, failed=True, ignore_errors=ignore_errors)

    def v2_runner_on_unreachable(self, result):
        self._record(result, unreachable=True)

    def v2_runner_on_skipped(self, result, **kwargs):
        self._record(result, skipped=True)

    def v2_playbook_on_stats(self, stats):
        hosts = sorted(stats.processed.keys())
        out = {
            "plays": self.plays,
            "stats": {h: stats.summarize(h) for h in hosts},
            "custom_stats": stats.custom,
            "global_custom_stats": stats.custom.get("_run", {}),
        }
        path = os.environ.get("VMBACKUP_BED_JSON")
        if path:
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(out, handle, default=str)
