# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The ``retention_preview`` filter: what a prune policy would keep and remove, from ``backup_info`` output.

It runs ``_retention.select``, the same code ``vmbackup.libvirt.prune`` runs on the host, over
the sets that ``vmbackup.libvirt.backup_info`` returned (docs in retention_preview.yml).
"""

from __future__ import annotations

import datetime as dt
import typing as t

from ansible.errors import AnsibleFilterError

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _retention
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

_UTC = dt.timezone.utc


def _parse_time(value: t.Any, what: str) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=_UTC)
    if not isinstance(value, str):
        raise AnsibleFilterError(f"retention_preview: {what} {value!r} is not an ISO 8601 UTC time")
    text = value.strip()
    try:
        parsed = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise AnsibleFilterError(f"retention_preview: {what} {value!r} is not an ISO 8601 UTC time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_UTC)


def _id_time(set_id: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(set_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=_UTC)
    except (TypeError, ValueError):
        raise AnsibleFilterError(f"retention_preview: {set_id!r} is not a set id (like 20261125T073512Z-001)") from None


def point_of(entry: t.Mapping[str, t.Any]) -> _retention.Point:
    """A retention point from one ``backup_info`` set entry (as prune builds it from the catalog)."""
    if not isinstance(entry, t.Mapping) or not isinstance(entry.get("set_id"), str):
        raise AnsibleFilterError("retention_preview: each set needs a set_id (give backup_info's vms, or one VM's sets)")
    readable = entry.get("readable", True) is not False
    started = entry.get("started")
    return _retention.Point(
        set_id=entry["set_id"],
        time=_parse_time(started, f"started of set {entry['set_id']}") if readable and started else _id_time(entry["set_id"]),
        series=entry.get("series") if readable else None,
        chain_id=entry.get("chain_id"),
        parent_id=entry.get("parent") if isinstance(entry.get("parent"), str) else None,
        type=entry.get("type"),
        restorable=bool(entry.get("restorable", True)) and readable,
        readable=readable,
    )


def _vms_of(data: t.Any) -> list[t.Mapping[str, t.Any]]:
    if isinstance(data, t.Mapping) and "vms" in data:
        data = data["vms"]
    if isinstance(data, t.Mapping) and "sets" in data:
        data = [data]
    if not isinstance(data, (list, tuple)):
        raise AnsibleFilterError("retention_preview: give backup_info's result, its vms, one VM of it, or one VM's sets")
    if all(isinstance(item, t.Mapping) and "sets" in item for item in data):
        return list(data)
    return [{"uuid": None, "name": None, "sets": list(data)}]


def retention_preview(data: t.Any, policy: t.Mapping[str, t.Any], now: t.Any = None,
                      series: str | None = None) -> list[dict[str, t.Any]]:
    """One decision per set (keep/remove with reasons), per VM in input order, oldest first.

    ``now`` defaults to backup_info's ``generated`` (the managed host's clock, as prune uses)
    when the whole result is given, else to the controller's current UTC time.
    """
    if not isinstance(policy, t.Mapping):
        raise AnsibleFilterError("retention_preview: the policy must be a dict such as {'keep_weekly': 5}")
    if now is None and isinstance(data, t.Mapping) and data.get("generated"):
        now = data["generated"]
    when = _parse_time(now, "now") if now is not None else dt.datetime.now(_UTC)
    try:
        values = dict(policy)
        policy_series = values.pop("series", None)  # a policy dict may carry its series, as the role's policies do
        series = series if series is not None else policy_series
        parsed = _retention.make_policy(values)
        out = []
        for vm in _vms_of(data):
            points = [point_of(entry) for entry in vm.get("sets") or []]
            for decision in _retention.select(points, parsed, when, series=series):
                out.append(dict(decision.as_dict(), vm_uuid=vm.get("uuid"), vm_name=vm.get("name")))
        return out
    except VmBackupError as exc:
        raise AnsibleFilterError(f"retention_preview: {exc.error_code}: {exc.msg}") from None


class FilterModule:
    """vmbackup.libvirt retention filters."""

    def filters(self) -> dict[str, t.Callable[..., t.Any]]:
        return {"retention_preview": retention_preview}
