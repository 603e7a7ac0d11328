# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""plugins/filter/retention.py: retention_preview over backup_info-shaped data, and the same
decisions as the prune backend on one repository."""

from __future__ import annotations

import copy
import datetime as dt
import pathlib
import sys

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.vmbackup.libvirt.plugins.filter.retention import FilterModule, retention_preview
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _prune

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "module_utils"))
from test_prune_backend import RepoBuilder  # noqa: E402  pylint: disable=wrong-import-position

VM1 = "2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"


def info_set(set_id, started, series="weekly", parent=None, restorable=True, readable=True, type_="incremental"):
    return {"set_id": set_id, "started": started, "series": series if readable else None, "parent": parent,
            "type": type_ if readable else None, "chain_id": "c1", "readable": readable, "restorable": restorable,
            "verdict": None, "bytes": 10}


BACKUP_INFO = {
    "repository": "/srv/vmbackup",
    "generated": "2026-11-30T12:00:00Z",
    "vms": [{
        "uuid": VM1, "name": "web01", "host": "hv1",
        "sets": [
            info_set("20261101T020000Z-001", "2026-11-01T02:00:00Z", type_="full"),
            info_set("20261108T020000Z-001", "2026-11-08T02:00:00Z", parent="20261101T020000Z-001"),
            info_set("20261115T020000Z-001", "2026-11-15T02:00:00Z", type_="full"),
            info_set("20261116T020000Z-001", "2026-11-16T02:00:00Z", series="monthly", type_="full"),
            info_set("20261122T020000Z-001", "2026-11-22T02:00:00Z", parent="20261115T020000Z-001", restorable=False),
            info_set("20261129T020000Z-001", "2026-11-29T02:00:00Z", type_="full"),
        ],
    }],
}


def by_id(decisions):
    return {d["set_id"]: (d["action"], d["reasons"]) for d in decisions}


def test_filter_is_registered():
    assert FilterModule().filters()["retention_preview"] is retention_preview


def test_preview_of_a_whole_backup_info_result():
    got = by_id(retention_preview(BACKUP_INFO, {"keep_weekly": 2}))
    assert got == {
        "20261101T020000Z-001": ("remove", []),
        "20261108T020000Z-001": ("remove", []),
        # Sundays: 11-01 W44, 11-08 W45, 11-15 W46, 11-22 W47 (not restorable: fills no bucket), 11-29 W48.
        "20261115T020000Z-001": ("keep", ["weekly 2026-W46"]),
        # The monthly series is selected on its own with the same rules (a Monday of W47).
        "20261116T020000Z-001": ("keep", ["newest", "newest restorable", "weekly 2026-W47"]),
        "20261122T020000Z-001": ("remove", []),
        "20261129T020000Z-001": ("keep", ["newest", "newest restorable", "weekly 2026-W48"]),
    }


@pytest.mark.parametrize("shape", ["result", "vms", "vm", "sets"])
def test_every_input_shape_gives_the_same_decisions(shape):
    data = {"result": BACKUP_INFO, "vms": BACKUP_INFO["vms"], "vm": BACKUP_INFO["vms"][0],
            "sets": BACKUP_INFO["vms"][0]["sets"]}[shape]
    got = retention_preview(data, {"keep_last": 1, "series": "weekly"}, now="2026-11-30T12:00:00Z")
    assert [d["set_id"] for d in got if d["action"] == "keep"] == [
        "20261116T020000Z-001", "20261129T020000Z-001"]
    assert next(d for d in got if d["set_id"] == "20261116T020000Z-001")["reasons"] == ["series monthly not selected"]
    if shape != "sets":
        assert {d["vm_name"] for d in got} == {"web01"}


def test_now_defaults_to_the_hosts_generated_time():
    data = copy.deepcopy(BACKUP_INFO)
    data["generated"] = "2026-11-29T01:00:00Z"  # before the newest set: the host's clock says skew
    with pytest.raises(AnsibleFilterError, match="CLOCK_SKEW"):
        retention_preview(data, {"keep_last": 1})


@pytest.mark.parametrize("policy, match", [
    ({}, "RETENTION_POLICY_EMPTY"), ({"keep_daily": 0}, "RETENTION_POLICY_EMPTY"),
    ({"keep_dialy": 3}, "INVALID_ARGUMENT"), ({"keep_within": "1y"}, "INVALID_ARGUMENT"), ("keep 3", "must be a dict"),
])
def test_refusals(policy, match):
    with pytest.raises(AnsibleFilterError, match=match):
        retention_preview(BACKUP_INFO, policy)


def test_unreadable_set_without_started():
    sets = [info_set("20261101T020000Z-001", None, readable=False, restorable=False),
            info_set("20261102T020000Z-001", "2026-11-02T02:00:00Z", type_="full")]
    got = by_id(retention_preview(sets, {"keep_last": 1}, now="2026-11-03T00:00:00Z"))
    assert got["20261101T020000Z-001"] == ("keep", ["unreadable (never removed)"])


def test_bad_input():
    with pytest.raises(AnsibleFilterError):
        retention_preview("nope", {"keep_last": 1})
    with pytest.raises(AnsibleFilterError):
        retention_preview([{"started": "x"}], {"keep_last": 1})


@pytest.mark.parametrize("policy", [
    {"keep_last": 1}, {"keep_daily": 2}, {"keep_weekly": 1, "keep_within": "3d"}, {"keep_monthly": 1, "timezone": "America/Los_Angeles"},
])
def test_same_decisions_as_prune_on_a_repository(tmp_path, policy):
    """The filter over prune's own set rows (the fields backup_info has) decides as prune did."""
    builder = RepoBuilder(str(tmp_path / "base" / "repo"))
    ids = builder.chain([0, 1, 2])
    builder.verdict(ids[1], "failed")
    builder.chain([6, 7, 13], chain_id="bbbbbbbbbbbb", series="weekly")
    builder.chain([14, 15], chain_id="cccccccccccc")
    params = dict(policy)
    backend = _prune.Pruner(_prune.PruneParams(repository=builder.repo.path, **params), run=None,
                            qemu_img_path="/usr/bin/qemu-img", check_mode=True)
    result = backend.run()
    assert result["removed"], "the case must remove something to compare"
    preview = retention_preview(result["sets"], policy, now=result["now"])
    assert by_id(preview) == {s["set_id"]: (s["action"], s["reasons"]) for s in result["sets"]}
    assert dt.datetime.fromisoformat(result["now"][:-1]) > dt.datetime(2026, 11, 30)
