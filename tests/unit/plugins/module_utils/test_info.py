# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for plugins/module_utils/_info.py (backup_info) on synthetic repositories.

Only manifests and verify sidecars are written: the catalog never reads the data files. Each
set has a domain.xml of 5 bytes and one disk file per disk whose size the test chooses, so a
set's ``bytes`` is known independently of the code under test.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import shutil
import sys
import typing as t

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _catalog
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _info
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

UTC = dt.timezone.utc
VM = "2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
OTHER_VM = "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
THIRD_VM = "4d3c2b1a-0f9e-4d8c-8b7a-6f5e4d3c2b1a"
CHAIN = "0123456789ab"
CHAIN2 = "ba9876543210"
T0 = dt.datetime(2026, 11, 25, 0, 0, 0, tzinfo=UTC)
NOW = T0 + dt.timedelta(days=2)
SHA = "a" * 64
DOMAIN_XML = 5


def _raises(code: str, func, *args, **kwargs) -> VmBackupError:
    with pytest.raises(VmBackupError) as info:
        func(*args, **kwargs)
    assert info.value.error_code == code, info.value.msg
    return info.value


class Repo:
    """Writes committed sets and verdicts the way export and verify lay them out."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.repo = repo_mod.Repository(path)
        self.repo.initialise()

    def add(self, hour: int, set_type: str = "full", parent: str | None = None, *, vm_uuid: str = VM, name: str = "web-01",
            chain_id: str | None = CHAIN, series: str | None = "default", disk_bytes: int = 1000, period: str | None = None,
            edit: t.Callable[[dict[str, t.Any]], None] | None = None) -> str:
        """A set started at T0 + ``hour`` hours and completed five minutes later; returns its id."""
        started = T0 + dt.timedelta(hours=hour)
        set_id = f"{started:%Y%m%dT%H%M%SZ}-001"
        method = "copy" if set_type == "copy" else set_type
        files = {"domain.xml": {"size": DOMAIN_XML, "sha256": SHA, "role": "domain"},
                 "disks/vda.qcow2": {"size": disk_bytes, "sha256": SHA, "role": "disk"}}
        disks = [{"target": "vda", "method": method, "format": "qcow2", "virtual_size": 1 << 30,
                  "file": "disks/vda.qcow2", "size": disk_bytes, "sha256": SHA}]
        manifest = _manifest.build_manifest(
            set_id=set_id, vm_uuid=vm_uuid, vm_name=name, host="hv1", started=started,
            completed=started + dt.timedelta(minutes=5), set_type=set_type,
            chain_id=None if set_type == "copy" else chain_id,
            parent={"set_id": parent, "manifest_sha256": self.sha(parent, vm_uuid)} if parent else None,
            checkpoint=None if set_type == "copy" else f"vmbackup-{chain_id}-{hour}", consistency="crash", period=period,
            disks=disks, skipped_disks=[], files=files, tool={"name": "vmbackup.libvirt"}, stats={},
            series=series or "default",
        )
        if series is None:  # a set written before series existed
            del manifest["series"]
        if edit is not None:
            edit(manifest)
        self.write(set_id, _manifest.dumps(manifest), vm_uuid)
        return set_id

    def write(self, set_id: str, data: bytes, vm_uuid: str = VM) -> None:
        self.repo.prepare_vm(vm_uuid)
        set_dir = self.repo.set_dir(vm_uuid, set_id)
        os.makedirs(set_dir, exist_ok=True)
        with open(os.path.join(set_dir, _manifest.MANIFEST_NAME), "wb") as fh:
            fh.write(data)

    def sha(self, set_id: str, vm_uuid: str = VM) -> str:
        return _manifest.sha256_bytes(self.repo.read_manifest_bytes(vm_uuid, set_id))

    def rewrite(self, set_id: str, edit: t.Callable[[dict[str, t.Any]], None], vm_uuid: str = VM) -> None:
        manifest = json.loads(self.repo.read_manifest_bytes(vm_uuid, set_id))
        edit(manifest)
        self.write(set_id, _manifest.dumps(manifest), vm_uuid)

    def verdict(self, set_id: str, outcome: str = "ok", *, at: dt.datetime = NOW - dt.timedelta(hours=1), level: str = "data",
                codes: list[str] | None = None, stale: bool = False, vm_uuid: str = VM, raw: bytes | None = None,
                findings: list[dict[str, t.Any]] | None = None) -> None:
        """A sidecar as verify writes it; ``stale`` records the sha256 of another manifest."""
        data = raw if raw is not None else _manifest.dumps({
            "format": "vmbackup.libvirt/verify", "format_version": 1, "set_id": set_id, "verified": _manifest.iso(at),
            "host": "hv1", "level": level, "outcome": outcome, "codes": codes or [], "findings": findings or [],
            "manifest_sha256": "b" * 64 if stale else self.sha(set_id, vm_uuid), "bytes_read": 0,
        })
        with open(os.path.join(self.repo.sets_dir(vm_uuid), f"{set_id}.verify.json"), "wb") as fh:
            fh.write(data)

    def info(self, now: dt.datetime = NOW, **params: t.Any) -> dict[str, t.Any]:
        """What the module returns (without changed/msg), read through the backend's own path."""
        p = _info.InfoParams(repository=self.path, **params)
        catalogs, verdicts, _warnings = _info.read_vms(self.repo, p.name, p.uuid)
        return _info.describe(self.path, catalogs, verdicts, now, p.series, asked_for_vm=bool(p.name or p.uuid))


@pytest.fixture
def repo(tmp_path) -> Repo:
    return Repo(str(tmp_path / "repo"))


@pytest.fixture
def chain(repo) -> dict[str, str]:
    """full (00:00), i1 (01:00), i2 (02:00), i3 (03:00) in series default."""
    ids = {"full": repo.add(0, disk_bytes=10_000)}
    ids["i1"] = repo.add(1, "incremental", ids["full"], disk_bytes=100)
    ids["i2"] = repo.add(2, "incremental", ids["i1"], disk_bytes=200)
    ids["i3"] = repo.add(3, "incremental", ids["i2"], disk_bytes=300)
    return ids


def _vm(result: dict[str, t.Any], uuid: str = VM) -> dict[str, t.Any]:
    return next(vm for vm in result["vms"] if vm["uuid"] == uuid)


def _sets(result: dict[str, t.Any], uuid: str = VM) -> dict[str, dict[str, t.Any]]:
    return {s["set_id"]: s for s in _vm(result, uuid)["sets"]}


def backend(path: str, check_mode: bool = False, **params: t.Any) -> _info.InfoBackend:
    return _info.InfoBackend(_info.InfoParams(repository=path, **params), run=None, qemu_img_path="qemu-img", check_mode=check_mode)


# --------------------------------------------------------------------------- one chain
def test_a_chain_lists_every_set_oldest_first_with_its_fields(repo, chain):
    result = repo.info()
    assert result["repository"] == repo.path and result["generated"] == "2026-11-27T00:00:00Z"
    vm = _vm(result)
    assert (vm["uuid"], vm["name"], vm["host"]) == (VM, "web-01", "hv1")
    assert [s["set_id"] for s in vm["sets"]] == [chain["full"], chain["i1"], chain["i2"], chain["i3"]]
    i2 = _sets(result)[chain["i2"]]
    assert i2 == {
        "set_id": chain["i2"], "type": "incremental", "series": "default", "period": None, "chain_id": CHAIN,
        "parent": chain["i1"], "started": "2026-11-25T02:00:00Z", "completed": "2026-11-25T02:05:00Z",
        "age_seconds": 2 * 86400 - 2 * 3600 - 300, "bytes": 200 + DOMAIN_XML, "consistency": "crash",
        "readable": True, "error": None, "verdict": None, "restorable": True, "restore_fault": None,
    }
    assert _sets(result)[chain["full"]]["parent"] is None
    assert vm["newest_restorable"] == {"set_id": chain["i3"], "series": "default", "started": "2026-11-25T03:00:00Z",
                                       "completed": "2026-11-25T03:05:00Z", "age_seconds": 2 * 86400 - 3 * 3600 - 300}
    total = 10_000 + 100 + 200 + 300 + 4 * DOMAIN_XML
    assert vm["totals"] == {"sets": 4, "bytes": total}
    assert result["totals"] == {"vms": 1, "sets": 4, "bytes": total}
    assert vm["series"] == [{
        "name": "default", "sets": 4, "bytes": total, "newest": chain["i3"], "newest_restorable": chain["i3"],
        "chains": [{"chain_id": CHAIN, "base": chain["full"], "newest": chain["i3"],
                    "sets": [chain["full"], chain["i1"], chain["i2"], chain["i3"]], "bytes": total}],
    }]


def test_bytes_is_the_sum_of_the_files_the_manifest_lists(repo):
    def extra(m):
        m["files"]["nvram.fd"] = {"size": 131072, "sha256": SHA, "role": "nvram"}
        m["files"]["tpm/tpm2-00.permall"] = {"size": 9, "sha256": SHA, "role": "tpm"}
    set_id = repo.add(0, disk_bytes=7, edit=extra)
    assert _sets(repo.info())[set_id]["bytes"] == 7 + DOMAIN_XML + 131072 + 9


def test_period_and_application_consistency_are_shown(repo):
    set_id = repo.add(0, period="2026-W48", edit=lambda m: m.update(consistency="application"))
    s = _sets(repo.info())[set_id]
    assert (s["period"], s["consistency"]) == ("2026-W48", "application")


@pytest.mark.parametrize("now, expected", [
    (T0 + dt.timedelta(minutes=5), 0),
    (T0 + dt.timedelta(minutes=6, seconds=1), 61),
    (T0, -300),  # completed after the host's clock: a negative age, not a failure
], ids=["just-completed", "a-minute-later", "dated-in-the-future"])
def test_ages_are_relative_to_the_clock_at_the_call(repo, now, expected):
    set_id = repo.add(0)
    repo.verdict(set_id, at=T0 + dt.timedelta(minutes=5))
    s = _sets(repo.info(now=now))[set_id]
    assert s["age_seconds"] == expected and s["verdict"]["age_seconds"] == expected


# --------------------------------------------------------------------------- chains and copies
def test_two_chains_and_copies_are_grouped_in_their_series(repo):
    f1 = repo.add(0)
    i1 = repo.add(1, "incremental", f1)
    c1 = repo.add(2, "copy")
    f2 = repo.add(3, chain_id=CHAIN2)
    i2 = repo.add(4, "incremental", f2, chain_id=CHAIN2)
    c2 = repo.add(5, "copy")
    chains = _vm(repo.info())["series"][0]["chains"]
    assert [(c["chain_id"], c["base"], c["newest"], c["sets"]) for c in chains] == [
        (CHAIN, f1, i1, [f1, i1]), (None, c1, c1, [c1]), (CHAIN2, f2, i2, [f2, i2]), (None, c2, c2, [c2])]
    assert all(s["restorable"] for s in _vm(repo.info())["sets"])


def test_a_chain_whose_full_is_gone_has_no_base_and_its_points_are_not_restorable(repo, chain):
    shutil.rmtree(repo.repo.set_dir(VM, chain["full"]))
    result = repo.info()
    assert _vm(result)["series"][0]["chains"][0]["base"] is None
    sets = _sets(result)
    assert not any(s["restorable"] for s in sets.values())
    assert f"parent set {chain['full']} of set {chain['i1']} is missing" in sets[chain["i3"]]["restore_fault"]
    assert _vm(result)["newest_restorable"] is None


# --------------------------------------------------------------------------- series
@pytest.fixture
def two_series(repo) -> dict[str, str]:
    """weekly and monthly chains interleaved, plus a set from before series (series default)."""
    ids = {"old": repo.add(0, series=None, disk_bytes=1)}
    ids["w1"] = repo.add(1, series="weekly", chain_id=CHAIN, disk_bytes=10)
    ids["m1"] = repo.add(2, series="monthly", chain_id=CHAIN2, disk_bytes=100)
    ids["w2"] = repo.add(3, "incremental", ids["w1"], series="weekly", chain_id=CHAIN, disk_bytes=20)
    ids["m2"] = repo.add(4, "incremental", ids["m1"], series="monthly", chain_id=CHAIN2, disk_bytes=200)
    ids["w3"] = repo.add(5, "incremental", ids["w2"], series="weekly", chain_id=CHAIN, disk_bytes=30)
    return ids


def test_each_series_has_its_own_entry_with_chains(repo, two_series):
    vm = _vm(repo.info())
    ids = two_series
    assert [(s["name"], s["sets"], s["bytes"], s["newest"], s["newest_restorable"]) for s in vm["series"]] == [
        ("default", 1, 1 + DOMAIN_XML, ids["old"], ids["old"]),
        ("monthly", 2, 300 + 2 * DOMAIN_XML, ids["m2"], ids["m2"]),
        ("weekly", 3, 60 + 3 * DOMAIN_XML, ids["w3"], ids["w3"]),
    ]
    weekly = vm["series"][2]["chains"]
    assert [(c["chain_id"], c["base"], c["sets"], c["bytes"]) for c in weekly] == [
        (CHAIN, ids["w1"], [ids["w1"], ids["w2"], ids["w3"]], 60 + 3 * DOMAIN_XML)]
    assert _sets(repo.info())[ids["old"]]["series"] == "default"
    assert vm["newest_restorable"]["set_id"] == ids["w3"] and vm["newest_restorable"]["series"] == "weekly"


@pytest.mark.parametrize("series, expected", [
    ("weekly", ["w1", "w2", "w3"]),
    ("monthly", ["m1", "m2"]),
    ("default", ["old"]),
])
def test_one_series_lists_only_its_sets_and_totals(repo, two_series, series, expected):
    result = repo.info(series=series)
    vm = _vm(result)
    assert [s["set_id"] for s in vm["sets"]] == [two_series[k] for k in expected]
    assert [s["name"] for s in vm["series"]] == [series]
    assert vm["totals"]["sets"] == len(expected) == result["totals"]["sets"]
    assert vm["totals"]["bytes"] == vm["series"][0]["bytes"] == result["totals"]["bytes"]
    assert vm["newest_restorable"]["set_id"] == two_series[expected[-1]]


def test_a_series_no_vm_has_is_set_not_found(repo, two_series):
    err = _raises("SET_NOT_FOUND", repo.info, series="yearly")
    assert "yearly" in err.msg and err.details["series"] == "yearly"
    _raises("SET_NOT_FOUND", repo.info, series="yearly", name="web-01")


def test_a_series_leaves_out_vms_without_it(repo, two_series):
    repo.add(6, vm_uuid=OTHER_VM, name="db-01", series="weekly")
    repo.add(7, vm_uuid=THIRD_VM, name="mail-01")
    assert [vm["name"] for vm in repo.info(series="weekly")["vms"]] == ["db-01", "web-01"]
    assert [vm["name"] for vm in repo.info(series="default")["vms"]] == ["mail-01", "web-01"]


def test_a_failed_verdict_in_one_series_leaves_the_other_restorable(repo, two_series):
    repo.verdict(two_series["w1"], "failed", codes=["CHECKSUM_MISMATCH"])
    vm = _vm(repo.info())
    by_name = {s["name"]: s for s in vm["series"]}
    assert by_name["weekly"]["newest_restorable"] is None
    assert by_name["monthly"]["newest_restorable"] == two_series["m2"]
    # The VM's newest restorable point is then the monthly one, though weekly sets are newer.
    assert vm["newest_restorable"]["set_id"] == two_series["m2"]


# --------------------------------------------------------------------------- broken links
def _edit_name(m):
    m["vm"]["name"] = "edited"


@pytest.mark.parametrize("damage, broken, fault", [
    (lambda r, c: shutil.rmtree(r.repo.set_dir(VM, c["i1"])), ["i2", "i3"], "parent set {i1} of set {i2} is missing"),
    (lambda r, c: r.rewrite(c["i1"], _edit_name), ["i2", "i3"], "the manifest of set {i1} differs from what its child {i2}"),
    (lambda r, c: r.write(c["i1"], b"{not json"), ["i1", "i2", "i3"], None),
    (lambda r, c: r.rewrite(c["i2"], lambda m: m.update(chain_id=CHAIN2)), ["i2", "i3"], "names parent {i1} of another chain"),
], ids=["missing-parent", "edited-parent", "unreadable-manifest", "parent-of-another-chain"])
def test_a_broken_link_makes_every_later_point_of_the_chain_unrestorable(repo, chain, damage, broken, fault):
    damage(repo, chain)
    sets = _sets(repo.info())
    for label, set_id in chain.items():
        if set_id not in sets:
            continue
        s = sets[set_id]
        assert s["restorable"] is (label not in broken), (label, s["restore_fault"])
        assert (s["restore_fault"] is None) is s["restorable"]
    if fault is not None:
        assert fault.format(**chain) in sets[chain["i2"]]["restore_fault"]
    # The fault nearest the point is named: i3's own link is sound, its chain is not.
    assert sets[chain["i3"]]["restore_fault"]


def test_an_unreadable_manifest_is_listed_with_its_error_and_no_manifest_fields(repo, chain):
    repo.write(chain["i2"], b"{not json")
    result = repo.info()
    s = _sets(result)[chain["i2"]]
    assert s["readable"] is False and "not valid JSON" in s["error"]
    assert all(s[k] is None for k in ("type", "series", "period", "chain_id", "parent", "started", "completed",
                                      "age_seconds", "bytes", "consistency"))
    assert s["restorable"] is False and "not valid JSON" in s["restore_fault"]
    # It counts as a set with no bytes; it belongs to no series (its series is unknown).
    vm = _vm(result)
    assert vm["totals"] == {"sets": 4, "bytes": 10_000 + 100 + 300 + 3 * DOMAIN_XML}
    assert vm["series"][0]["sets"] == 3 and chain["i2"] not in vm["series"][0]["chains"][0]["sets"]
    assert chain["i2"] not in [x["set_id"] for x in _vm(repo.info(series="default"))["sets"]]
    assert vm["newest_restorable"]["set_id"] == chain["i1"]


def test_a_vm_whose_only_set_is_unreadable_has_no_name(repo):
    repo.add(0, vm_uuid=OTHER_VM, name="a-vm")
    set_id = repo.add(0)
    repo.write(set_id, b"[]")
    result = repo.info()
    assert [vm["name"] for vm in result["vms"]] == ["a-vm", None]  # unnamed last
    assert _vm(result)["host"] is None and _vm(result)["series"] == []


# --------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize("on, outcome, stale, blocked, fault", [
    ("full", "ok", False, [], None),
    ("full", "ok", True, [], None),
    ("full", "failed", False, ["full", "i1", "i2", "i3"], "set {full}, which set {i3} builds on, failed verification"),
    ("i2", "failed", False, ["i2", "i3"], "set {i2}, which set {i3} builds on, failed verification on 2026-11-26T23:00:00Z "
                                          "(CHECKSUM_MISMATCH)"),
    ("i2", "failed", True, ["i2", "i3"], "the manifest changed since, verify again to clear it"),
    ("i3", "failed", False, ["i3"], "set {i3} failed verification"),
], ids=["ok", "ok-stale", "failed-full", "failed-middle", "failed-stale-still-blocks", "failed-newest"])
def test_a_failed_verdict_blocks_its_point_and_every_later_point(repo, chain, on, outcome, stale, blocked, fault):
    repo.verdict(chain[on], outcome, stale=stale, codes=["CHECKSUM_MISMATCH"] if outcome == "failed" else [])
    sets = _sets(repo.info())
    v = sets[chain[on]]["verdict"]
    assert v == {"outcome": outcome, "level": "data", "verified": "2026-11-26T23:00:00Z", "age_seconds": 3600,
                 "current": not stale, "codes": ["CHECKSUM_MISMATCH"] if outcome == "failed" else [], "first_finding": None}
    for label, set_id in chain.items():
        assert sets[set_id]["restorable"] is (label not in blocked), label
    if fault is not None:
        assert fault.format(**chain) in sets[chain["i3"]]["restore_fault"]


@pytest.mark.parametrize("raw", [
    b"{not json", b"[1, 2]", json.dumps({"outcome": "maybe"}).encode(), json.dumps({"verified": "x"}).encode(),
], ids=["not-json", "not-an-object", "unknown-outcome", "no-outcome"])
def test_an_unreadable_verdict_blocks_like_a_failed_one(repo, chain, raw):
    repo.verdict(chain["i1"], raw=raw)
    sets = _sets(repo.info())
    assert sets[chain["i1"]]["verdict"] == {"outcome": "unreadable", "level": None, "verified": None, "age_seconds": None,
                                            "current": False, "codes": [], "first_finding": None}
    assert [sets[chain[k]]["restorable"] for k in ("full", "i1", "i2", "i3")] == [True, False, False, False]
    assert f"the verify verdict of set {chain['i1']}, which set {chain['i3']} builds on, is unreadable" in \
        sets[chain["i3"]]["restore_fault"]


def test_a_verdict_of_a_restore_level_and_a_verdict_without_manifest_hash(repo, chain):
    repo.verdict(chain["i1"], level="restore")
    raw = json.loads(open(os.path.join(repo.repo.sets_dir(VM), f"{chain['i1']}.verify.json"), "rb").read())
    del raw["manifest_sha256"]
    repo.verdict(chain["i2"], raw=json.dumps(raw).encode())
    sets = _sets(repo.info())
    assert sets[chain["i1"]]["verdict"]["level"] == "restore" and sets[chain["i1"]]["verdict"]["current"] is True
    assert sets[chain["i2"]]["verdict"]["current"] is False and sets[chain["i2"]]["verdict"]["outcome"] == "ok"
    assert sets[chain["i2"]]["restorable"] is True


def test_the_fault_names_the_first_finding_of_the_verdict(repo, chain):
    """verify fails i3's verdict for a damaged file of i2: the fault says where the damage is."""
    finding = {"code": "CHECKSUM_MISMATCH", "set_id": chain["i2"], "file": "disks/vda.qcow2",
               "msg": f"disks/vda.qcow2 of set {chain['i2']} has sha256 x, the manifest says y", "affected": [chain["i2"], chain["i3"]]}
    repo.verdict(chain["i3"], "failed", codes=["CHECKSUM_MISMATCH"], findings=[finding])
    s = _sets(repo.info())[chain["i3"]]
    assert s["verdict"]["first_finding"] == finding["msg"]
    assert s["restore_fault"] == (f"set {chain['i3']} failed verification on 2026-11-26T23:00:00Z (CHECKSUM_MISMATCH): "
                                  f"disks/vda.qcow2 of set {chain['i2']} has sha256 x, the manifest says y")


def test_newest_restorable_skips_a_newest_point_that_failed(repo, chain):
    repo.verdict(chain["i3"], "failed")
    assert _vm(repo.info())["newest_restorable"]["set_id"] == chain["i2"]


# --------------------------------------------------------------------------- VMs and totals
def test_vms_are_sorted_by_name_then_uuid_and_totals_add_up(repo):
    repo.add(0, vm_uuid=OTHER_VM, name="b", disk_bytes=1)
    repo.add(1, vm_uuid=THIRD_VM, name="a", disk_bytes=2)
    repo.add(2, vm_uuid=VM, name="b", disk_bytes=3)
    repo.add(3, vm_uuid=VM, name="b", disk_bytes=4, chain_id=CHAIN2)
    result = repo.info()
    assert [(vm["name"], vm["uuid"]) for vm in result["vms"]] == [("a", THIRD_VM), ("b", VM), ("b", OTHER_VM)]
    assert [vm["totals"] for vm in result["vms"]] == [
        {"sets": 1, "bytes": 2 + DOMAIN_XML}, {"sets": 2, "bytes": 7 + 2 * DOMAIN_XML}, {"sets": 1, "bytes": 1 + DOMAIN_XML}]
    assert result["totals"] == {"vms": 3, "sets": 4, "bytes": 10 + 4 * DOMAIN_XML}


@pytest.mark.parametrize("params, expected", [
    ({"name": "b"}, [VM, OTHER_VM]),
    ({"uuid": THIRD_VM.upper()}, [THIRD_VM]),
    ({"name": "a"}, [THIRD_VM]),
])
def test_one_vm_by_name_or_uuid(repo, params, expected):
    repo.add(0, vm_uuid=OTHER_VM, name="b")
    repo.add(1, vm_uuid=THIRD_VM, name="a")
    repo.add(2, vm_uuid=VM, name="b")
    result = backend(repo.path, **params).run()
    assert sorted(vm["uuid"] for vm in result["vms"]) == sorted(expected)


def test_the_name_is_the_one_the_newest_set_records(repo):
    repo.add(0, name="old-name")
    repo.add(1, name="new-name")
    assert _vm(repo.info(name="new-name"))["name"] == "new-name"
    _raises("SET_NOT_FOUND", repo.info, name="old-name")


def test_an_empty_repository_is_an_empty_catalog(repo):
    assert repo.info() == {"repository": repo.path, "generated": "2026-11-27T00:00:00Z", "vms": [],
                           "totals": {"vms": 0, "sets": 0, "bytes": 0}}


def test_a_vm_directory_without_a_committed_set_is_listed_empty(repo):
    repo.repo.prepare_vm(OTHER_VM)  # its first export failed before the commit
    vm = _vm(repo.info(), OTHER_VM)
    assert vm["sets"] == [] and vm["series"] == [] and vm["newest_restorable"] is None and vm["name"] is None


@pytest.mark.parametrize("params", [{"name": "nobody"}, {"uuid": OTHER_VM}], ids=["name", "uuid"])
def test_a_vm_asked_for_without_sets_is_set_not_found(repo, chain, params):
    _raises("SET_NOT_FOUND", repo.info, **params)


# --------------------------------------------------------------------------- the backend
def test_the_backend_result_is_the_catalog_with_changed_false(repo, chain):
    result = backend(repo.path).run()
    assert result["changed"] is False and "4 sets of 1 VMs" in result["msg"]
    assert [s["set_id"] for s in _vm(result)["sets"]] == list(chain.values())
    generated = _manifest.parse_iso(result["generated"])
    assert abs((generated - _manifest.utcnow()).total_seconds()) < 5


@pytest.mark.parametrize("params, code", [
    ({"name": "a", "uuid": VM}, "INVALID_ARGUMENT"),
    ({"name": ""}, "INVALID_NAME"),
    ({"uuid": "not-a-uuid"}, "INVALID_NAME"),
    ({"series": "Weekly"}, "INVALID_NAME"),
    ({"series": "a" * 33}, "INVALID_NAME"),
    ({"lock_timeout": -1.0}, "INVALID_ARGUMENT"),
    ({"lock_timeout": float("nan")}, "INVALID_ARGUMENT"),
    ({"query": ""}, "INVALID_ARGUMENT"),
], ids=["name-and-uuid", "empty-name", "bad-uuid", "upper-case-series", "long-series", "negative-timeout", "nan-timeout",
        "empty-query"])
def test_bad_parameters_fail_before_anything_is_read(tmp_path, params, code):
    # The repository does not exist: a parameter error must come first.
    _raises(code, backend(str(tmp_path / "missing"), **params).run)


@pytest.mark.parametrize("path, code", [("relative/repo", "PATH_ESCAPE"), ("/nonexistent/vmbackup", "REPOSITORY_NOT_FOUND")])
def test_a_missing_repository_fails_as_for_verify(path, code):
    _raises(code, backend(path).run)


def test_a_directory_that_is_no_repository_is_repository_not_found(tmp_path):
    (tmp_path / "plain").mkdir(mode=0o700)
    _raises("REPOSITORY_NOT_FOUND", backend(str(tmp_path / "plain")).run)


def _tree(root: str) -> dict[str, tuple]:
    """Every path with its inode, mode, size, content, mtime and ctime (atime left out: reads change it)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["."] if dirpath == root else []:
            st = os.lstat(dirpath)
            state["."] = (st.st_ino, st.st_mode, st.st_mtime_ns, st.st_ctime_ns)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            content = open(path, "rb").read() if os.path.isfile(path) else None
            state[os.path.relpath(path, root)] = (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, content)
    return state


@pytest.mark.parametrize("check_mode", [False, True], ids=["run", "check-mode"])
def test_the_backend_writes_nothing_not_even_a_lock_file(repo, chain, check_mode):
    repo.verdict(chain["i1"], "failed")
    repo.repo.prepare_vm(OTHER_VM)
    before = _tree(repo.path)
    assert not any(p.endswith("/lock") for p in before)  # a shared lock would create it
    result = backend(repo.path, check_mode, query="totals").run()
    assert _tree(repo.path) == before
    assert result["query_result"] == result["totals"]


def test_check_mode_gives_the_same_result(repo, two_series):
    repo.verdict(two_series["w2"], "failed")
    real, check = backend(repo.path).run(), backend(repo.path, True).run()
    real.pop("generated"), check.pop("generated")
    strip = json.dumps(real, sort_keys=True), json.dumps(check, sort_keys=True)
    # Ages may differ by the second that passed between the two calls; nothing else may.
    assert _drop_ages(real) == _drop_ages(check), strip


def _drop_ages(value: t.Any) -> t.Any:
    if isinstance(value, dict):
        return {k: _drop_ages(v) for k, v in value.items() if k != "age_seconds"}
    if isinstance(value, list):
        return [_drop_ages(v) for v in value]
    return value


# --------------------------------------------------------------------------- reading while others write
def test_a_set_pruned_while_the_catalog_is_read_is_read_again(repo, chain, monkeypatch):
    """A prune renames i3 away after the listing and before the verdicts were read."""
    original = _catalog.Catalog.verdict
    moved = []

    def verdict(self, set_id):
        if not moved:
            moved.append(set_id)
            os.rename(repo.repo.set_dir(VM, chain["i3"]), os.path.join(repo.path, "pruned"))
        return original(self, set_id)

    monkeypatch.setattr(_catalog.Catalog, "verdict", verdict)
    catalogs, verdicts, warnings = _info.read_vms(repo.repo, None, None)
    assert moved and warnings == []
    assert catalogs[0].ids() == [chain["full"], chain["i1"], chain["i2"]]
    assert set(verdicts[VM]) == set(catalogs[0].ids())


def test_sets_that_keep_changing_give_a_warning(repo, chain, monkeypatch):
    counter = iter(range(100))

    def verdict(self, set_id):
        if set_id == chain["full"]:
            repo.add(10 + next(counter))  # an export commits a set on every read
        return None

    monkeypatch.setattr(_catalog.Catalog, "verdict", verdict)
    dummy, dummy2, warnings = _info.read_vms(repo.repo, None, None)
    assert len(warnings) == 1 and "kept changing" in warnings[0]


# --------------------------------------------------------------------------- query
@pytest.mark.parametrize("query, expected", [
    ("totals.sets", lambda c: 4),
    ("vms[].sets[?!restorable].set_id[]", lambda c: [c["i2"], c["i3"]]),
    ("vms[0].series[0].chains[0].base", lambda c: c["full"]),
    ("length(vms[].sets[?verdict.outcome == 'failed'][])", lambda c: 1),
    ("vms[?name == 'nobody']", lambda c: []),
    ("vms[0].newest_restorable.set_id", lambda c: c["i1"]),
], ids=["totals", "unrestorable", "base", "failed-count", "nothing", "newest-restorable"])
def test_query_is_applied_to_the_result(repo, chain, query, expected):
    repo.verdict(chain["i2"], "failed")
    result = backend(repo.path, query=query).run()
    assert result["query_result"] == expected(chain)
    assert "vms" in result  # the full result is returned as well


def test_no_query_no_query_result(repo, chain):
    assert "query_result" not in backend(repo.path).run()


@pytest.mark.parametrize("query, message", [
    ("vms[", "Incomplete expression"),
    ("vms[?", "Incomplete expression"),
    ("vms[?name = 'x']", "Unknown token"),
], ids=["unclosed", "unclosed-filter", "single-equals"])
def test_a_query_that_does_not_parse_is_invalid_argument_with_jmespath_message(tmp_path, query, message):
    err = _raises("INVALID_ARGUMENT", backend(str(tmp_path / "missing"), query=query).run)
    assert query in err.msg and message.lower() in err.msg.lower()


@pytest.mark.parametrize("query, message", [
    ("sum(vms[].name)", "invalid type"),
    ("frobnicate(vms)", "unknown function"),
], ids=["type-error", "unknown-function"])
def test_a_query_that_fails_on_the_data_is_invalid_argument(repo, chain, query, message):
    err = _raises("INVALID_ARGUMENT", backend(repo.path, query=query).run)
    assert message in err.msg.lower() and query in err.msg


@pytest.fixture
def without_jmespath(monkeypatch):
    """_info imported as on a host without the jmespath library; restored afterwards."""
    monkeypatch.setitem(sys.modules, "jmespath", None)  # import jmespath now raises ImportError
    module = importlib.reload(_info)
    yield module
    monkeypatch.undo()
    importlib.reload(_info)


def test_without_jmespath_a_query_is_missing_dependency(repo, chain, without_jmespath):
    assert without_jmespath.jmespath is None and "import jmespath" in without_jmespath.JMESPATH_IMPORT_ERROR
    params = without_jmespath.InfoParams(repository=repo.path, query="totals")
    err = _raises("MISSING_DEPENDENCY", without_jmespath.InfoBackend(params, run=None, qemu_img_path="q", check_mode=False).run)
    assert "jmespath" in err.msg and "Failed to import the required Python library" in err.msg
    assert "import jmespath" in err.details["exception"]
    # Without a query, the catalog needs no jmespath.
    params = without_jmespath.InfoParams(repository=repo.path)
    assert without_jmespath.InfoBackend(params, run=None, qemu_img_path="q", check_mode=False).run()["totals"]["sets"] == 4


# --------------------------------------------------------------------------- the memoised restore paths
def _sets_of_chain_fault(catalog: _catalog.Catalog, set_id: str) -> str | None:
    try:
        catalog.sets_of_chain(set_id)
    except VmBackupError as exc:
        return exc.msg
    return None


@pytest.mark.parametrize("damage", [
    lambda r, c: None,
    lambda r, c: shutil.rmtree(r.repo.set_dir(VM, c["i1"])),
    lambda r, c: shutil.rmtree(r.repo.set_dir(VM, c["full"])),
    lambda r, c: r.rewrite(c["full"], _edit_name),
    lambda r, c: (r.rewrite(c["full"], _edit_name), r.rewrite(c["i2"], _edit_name)),
    lambda r, c: r.write(c["i1"], b"[]"),
    lambda r, c: r.write(c["i3"], b"[]"),
    lambda r, c: r.rewrite(c["i2"], lambda m: m["disks"][0].update(virtual_size=2 << 30)),
], ids=["sound", "missing-middle", "missing-full", "edited-full", "two-edits", "unreadable-middle", "unreadable-newest",
        "resized-disk"])
def test_restore_paths_agree_with_sets_of_chain_on_every_point(repo, chain, damage):
    """The memoised walk gives sets_of_chain's answer for every point, whatever order the points are asked in."""
    damage(repo, chain)
    repo.add(5, "copy")
    catalog = _catalog.Catalog(repo.repo, VM)
    for order in (catalog.ids(), list(reversed(catalog.ids()))):
        paths = _info.RestorePaths(catalog, {})
        assert {sid: paths.chain_fault(sid) for sid in order} == {sid: _sets_of_chain_fault(catalog, sid) for sid in order}


def test_a_long_chain_costs_each_link_once(repo, monkeypatch):
    ids = [repo.add(0)]
    for hour in range(1, 400):
        ids.append(repo.add(hour, "incremental", ids[-1], disk_bytes=1))
    repo.verdict(ids[100], "failed")
    calls = []
    original = _catalog.Catalog.link_fault
    monkeypatch.setattr(_catalog.Catalog, "link_fault", lambda self, sid: calls.append(sid) or original(self, sid))
    sets = _sets(repo.info())
    assert len(calls) == len(ids)  # sets_of_chain per point would make 400 * 401 / 2 calls
    assert [sets[sid]["restorable"] for sid in ids] == [True] * 100 + [False] * 300
    assert sets[ids[-1]]["restore_fault"].startswith(f"set {ids[100]}, which set {ids[-1]} builds on, failed verification")


# --------------------------------------------------------------------------- trust
def test_a_repository_reached_through_a_symbolic_link_is_refused(repo, chain, tmp_path):
    os.symlink(repo.path, tmp_path / "link")
    _raises("UNSAFE_TARGET", backend(str(tmp_path / "link")).run)


def test_a_group_writable_repository_is_refused_unless_allowed(repo, chain):
    os.chmod(repo.path, 0o775)
    _raises("UNSAFE_TARGET", backend(repo.path).run)
    assert backend(repo.path, allow_unsafe_permissions=True).run()["totals"]["sets"] == 4


def test_planted_links_are_never_followed(repo, chain, tmp_path):
    """A verdict that is a link reads as unreadable (and blocks); a set whose manifest is a link is not a set."""
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"outcome": "ok", "verified": "2026-11-26T00:00:00Z"}))
    os.symlink(outside, os.path.join(repo.repo.sets_dir(VM), f"{chain['i2']}.verify.json"))
    planted = repo.repo.set_dir(VM, "20261125T200000Z-001")
    os.makedirs(planted)
    os.symlink(os.path.join(repo.repo.set_dir(VM, chain["full"]), "manifest.json"), os.path.join(planted, "manifest.json"))
    sets = _sets(repo.info())
    assert list(sets) == list(chain.values())
    assert sets[chain["i2"]]["verdict"]["outcome"] == "unreadable" and not sets[chain["i2"]]["restorable"]


# --------------------------------------------------------------------------- list_sets
@pytest.mark.parametrize("series", [None, "weekly"])
def test_without_set_lists_everything_else_is_the_full_result(repo, two_series, series):
    """list_sets=false drops exactly the per-set lists; every count, newest point and chain summary stays."""
    repo.verdict(two_series["w2"], "failed", codes=["CHECKSUM_MISMATCH"])  # w2 and w3 not restorable
    params = {} if series is None else {"series": series}
    full = backend(repo.path, **params).run()
    short = backend(repo.path, list_sets=False, **params).run()
    assert all("sets" not in vm for vm in short["vms"])
    assert all("sets" not in chain for vm in short["vms"] for s in vm["series"] for chain in s["chains"])
    for vm in full["vms"]:
        del vm["sets"]
        for s in vm["series"]:
            for chain in s["chains"]:
                del chain["sets"]
    assert short == full
    weekly = next(s for s in _vm(short)["series"] if s["name"] == "weekly")
    assert (weekly["newest"], weekly["newest_restorable"]) == (two_series["w3"], two_series["w1"])


def test_without_set_lists_the_query_sees_the_short_result(repo, two_series):
    result = backend(repo.path, list_sets=False, query="vms[0].series[?name=='weekly'].{n: sets, newest: newest}").run()
    assert result["query_result"] == [{"n": 3, "newest": two_series["w3"]}]
    assert backend(repo.path, list_sets=False, query="vms[0].sets").run()["query_result"] is None
