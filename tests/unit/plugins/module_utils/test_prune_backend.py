# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""plugins/module_utils/_prune.py on repositories of real directories in temporary directories.

Sets are written the way export lays them out (a directory with a manifest and a data file);
the data is not real qcow2 (prune never reads it). What prune removed is checked on disk.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import typing as t

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _prune
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._lock import VmLock

UTC = dt.timezone.utc
VM = "2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
OTHER_VM = "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
SHA = "a" * 64
DAY0 = dt.datetime(2026, 11, 2, 2, 0, 0, tzinfo=UTC)  # a Monday


def _raises(code: str, func, *args, **kwargs) -> VmBackupError:
    with pytest.raises(VmBackupError) as info:
        func(*args, **kwargs)
    assert info.value.error_code == code, info.value.msg
    return info.value


class RepoBuilder:
    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.repo = repo_mod.Repository(path)
        self.repo.initialise()

    def add(self, day: int, set_type: str = "full", parent: str | None = None, *, vm_uuid: str = VM, name: str = "web-01",
            chain_id: str = "0123456789ab", series: str | None = None, data: int = 1000,
            started: dt.datetime | None = None) -> str:
        started = started or DAY0 + dt.timedelta(days=day)
        existing = set(self.repo.all_ids(vm_uuid))
        seq = 1
        while f"{started:%Y%m%dT%H%M%SZ}-{seq:03d}" in existing:
            seq += 1
        set_id = f"{started:%Y%m%dT%H%M%SZ}-{seq:03d}"
        rel = "disks/vda.qcow2"
        method = "copy" if set_type == "copy" else set_type
        disks = [{"target": "vda", "method": method, "format": "qcow2", "virtual_size": 1 << 30,
                  "file": rel, "size": data, "sha256": SHA}]
        manifest = _manifest.build_manifest(
            set_id=set_id, vm_uuid=vm_uuid, vm_name=name, host="hv1", started=started,
            completed=started + dt.timedelta(minutes=5), set_type=set_type,
            chain_id=None if set_type == "copy" else chain_id,
            parent={"set_id": parent, "manifest_sha256": self.sha(parent, vm_uuid)} if parent else None,
            checkpoint=None if set_type == "copy" else f"vmbackup-{chain_id}-{day}", consistency="crash", period=None,
            disks=disks, skipped_disks=[], files={rel: {"size": data, "sha256": SHA, "role": "disk"}},
            tool={"name": "vmbackup.libvirt"}, stats={}, **({"series": series} if series else {}))
        self.repo.prepare_vm(vm_uuid)
        set_dir = self.repo.set_dir(vm_uuid, set_id)
        os.makedirs(os.path.join(set_dir, "disks"))
        with open(os.path.join(set_dir, rel), "wb") as fh:
            fh.write(b"x" * data)
        with open(os.path.join(set_dir, _manifest.MANIFEST_NAME), "wb") as fh:
            fh.write(_manifest.dumps(manifest))
        # Committed sets are read-only, as export leaves them.
        os.chmod(os.path.join(set_dir, rel), 0o400)
        os.chmod(os.path.join(set_dir, "disks"), 0o500)
        return set_id

    def chain(self, days: list[int], **kw: t.Any) -> list[str]:
        ids = [self.add(days[0], "full", **kw)]
        for day in days[1:]:
            ids.append(self.add(day, "incremental", ids[-1], **kw))
        return ids

    def sha(self, set_id: str, vm_uuid: str = VM) -> str:
        return _manifest.sha256_bytes(self.repo.read_manifest_bytes(vm_uuid, set_id))

    def verdict(self, set_id: str, outcome: str, vm_uuid: str = VM) -> str:
        path = os.path.join(self.repo.sets_dir(vm_uuid), f"{set_id}.verify.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"set_id": set_id, "outcome": outcome, "level": "data", "verified": "2026-11-30T00:00:00Z",
                       "manifest_sha256": self.sha(set_id, vm_uuid)}, fh)
        return path

    def on_disk(self, vm_uuid: str = VM) -> list[str]:
        return sorted(os.listdir(self.repo.sets_dir(vm_uuid)))


def tree(root: str) -> dict[str, tuple[int, int]]:
    """Every path with its mode and size; a real run's lock file (created empty) is not content."""
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(base, name)
            if name == "lock" and os.path.getsize(path) == 0:
                continue
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_size)
    return out


@pytest.fixture
def builder(tmp_path) -> RepoBuilder:
    return RepoBuilder(str(tmp_path / "base" / "repo"))


def prune(builder: RepoBuilder, check: bool = False, **params: t.Any) -> tuple[dict[str, t.Any], _prune.Pruner]:
    backend = _prune.Pruner(_prune.PruneParams(repository=builder.repo.path, **params), run=None,
                            qemu_img_path="/usr/bin/qemu-img", check_mode=check)
    return backend.run(), backend


def decisions(result: dict[str, t.Any]) -> dict[str, tuple[str, list[str]]]:
    return {s["set_id"]: (s["action"], s["reasons"]) for s in result["sets"]}


def test_check_mode_predicts_the_real_run_and_the_rerun_changes_nothing(builder):
    first = builder.chain([0, 1, 2])  # W45
    second = builder.chain([7, 8], chain_id="bbbbbbbbbbbb")  # W46
    before = tree(builder.repo.path)
    checked, dummy = prune(builder, check=True, keep_weekly=1)
    assert tree(builder.repo.path) == before, "check mode changed the repository"
    assert not os.path.exists(builder.repo.lock_path(VM)), "check mode created the lock file"
    assert checked["removed"] == first and checked["kept"] == second and checked["changed"] is True
    assert checked["removed_bytes"] == sum(s["bytes"] for s in checked["sets"] if s["action"] == "remove") > 3000
    real, dummy = prune(builder, keep_weekly=1)
    for key in ("sets", "removed", "kept", "removed_bytes", "cleaned_up", "changed", "vms", "diff"):
        assert real[key] == checked[key], key
    assert builder.on_disk() == second
    assert not os.path.exists(os.path.join(builder.repo.vm_dir(VM), _prune.REMOVING))
    again, dummy = prune(builder, keep_weekly=1)
    assert again["changed"] is False and again["removed"] == [] and again["cleaned_up"] == []
    assert again["diff"]["before"] == again["diff"]["after"]


def test_result_lists_every_set_with_reasons(builder):
    ids = builder.chain([0, 1, 2])
    result, dummy = prune(builder, check=True, keep_last=1)
    assert decisions(result) == {
        ids[0]: ("keep", [f"parent of {ids[1]}"]),
        ids[1]: ("keep", [f"parent of {ids[2]}"]),
        ids[2]: ("keep", ["newest", "newest restorable", "last 1"]),
    }
    assert result["changed"] is False
    vm = result["vms"][0]
    assert vm["uuid"] == VM and vm["name"] == "web-01" and vm["sets"] == 3 and vm["removed"] == []
    assert vm["series"] == [{"name": "default", "kept": 3, "removed": 0, "removed_bytes": 0}]


def test_verdict_goes_with_its_set_and_failed_points_fill_no_bucket(builder):
    bad = builder.chain([0, 1])
    builder.verdict(bad[0], "failed")  # the full failed: the whole chain is unrestorable
    good = builder.chain([2, 3], chain_id="cccccccccccc")
    sidecar = builder.verdict(good[1], "ok")
    result, dummy = prune(builder, keep_daily=3)
    got = decisions(result)
    assert got[bad[0]][0] == got[bad[1]][0] == "remove"
    assert [s["restore_fault"] for s in result["sets"][:2]] == [
        "its last verify verdict is failed", f"set {bad[0]}'s last verify verdict is failed"]
    assert builder.on_disk() == sorted(good + [os.path.basename(sidecar)])


def test_newest_set_is_kept_even_when_it_failed(builder):
    ids = builder.chain([0, 1, 2])
    builder.verdict(ids[2], "unreadable")
    result, dummy = prune(builder, keep_last=1)
    assert decisions(result)[ids[2]] == ("keep", ["newest"])
    assert decisions(result)[ids[1]] == ("keep", ["newest restorable", "last 1", f"parent of {ids[2]}"])
    assert result["removed"] == []


def test_series_never_touch_each_other(builder):
    weekly = builder.chain([0, 7, 14], series="weekly", chain_id="111111111111")
    monthly = builder.chain([1, 8], series="monthly", chain_id="222222222222")
    result, dummy = prune(builder, series="weekly", keep_last=1)
    assert decisions(result)[monthly[0]] == ("keep", ["series monthly not selected", f"parent of {monthly[1]}"])
    assert decisions(result)[monthly[1]] == ("keep", ["series monthly not selected"])
    assert result["removed"] == []  # weekly is one chain: its newest keeps it whole
    builder.add(21, series="weekly", chain_id="333333333333")
    result, dummy = prune(builder, series="weekly", keep_last=1)
    assert result["removed"] == weekly
    assert sorted(set(builder.on_disk()) & set(monthly)) == monthly


def test_interrupted_prune_is_finished_by_the_next(builder):
    old = builder.chain([0, 1])
    new = builder.chain([7], chain_id="dddddddddddd")
    builder.verdict(old[1], "ok")
    repo = builder.repo
    # What a prune killed after step 1 of removing old[1] leaves: the set in .removing/, its sidecar in sets/.
    removing = os.path.join(repo.vm_dir(VM), _prune.REMOVING)
    os.mkdir(removing, 0o700)
    os.rename(repo.set_dir(VM, old[1]), os.path.join(removing, old[1]))
    checked, dummy = prune(builder, check=True, keep_last=1)
    assert os.path.isdir(os.path.join(removing, old[1])), "check mode finished the removal"
    assert sorted(checked["cleaned_up"]) == sorted([
        f"finished removing {removing}/{old[1]} (left by an interrupted prune)",
        f"removed {repo.sets_dir(VM)}/{old[1]}.verify.json (a verdict whose set is gone)"])
    assert checked["removed"] == [old[0]]
    real, dummy = prune(builder, keep_last=1)
    assert real["cleaned_up"] == checked["cleaned_up"] and real["removed"] == [old[0]]
    assert builder.on_disk() == new and not os.path.exists(removing)


def test_staging_of_dead_runs(builder):
    builder.chain([0])
    repo = builder.repo
    root = repo.staging_root(VM)
    copy = os.path.join(root, "20261130T010000Z-001")  # a shut-off VM's copy: no checkpoint
    os.makedirs(os.path.join(copy, "disks"))
    with open(os.path.join(copy, "run.json"), "w", encoding="utf-8") as fh:
        json.dump({"set_id": "20261130T010000Z-001", "checkpoint": None}, fh)
    early = os.path.join(root, "20261130T020000Z-001")  # died before run.json
    os.makedirs(early)
    live = os.path.join(root, "20261130T030000Z-001")  # a live backup: its checkpoint is export's to delete
    os.makedirs(live)
    with open(os.path.join(live, "run.json"), "w", encoding="utf-8") as fh:
        json.dump({"set_id": "20261130T030000Z-001", "checkpoint": "vmbackup-0123456789ab-9"}, fh)
    checked, dummy = prune(builder, check=True, keep_last=1)
    assert os.path.isdir(copy) and os.path.isdir(early)
    real, backend = prune(builder, keep_last=1)
    expected = [f"removed incomplete set {copy} (staging of a dead run)", f"removed incomplete set {early} (staging of a dead run)"]
    assert checked["cleaned_up"] == real["cleaned_up"] == expected
    assert real["changed"] is True
    assert os.listdir(root) == [os.path.basename(live)]
    assert [s["path"] for s in real["staging_left"]] == [live]
    assert "vmbackup-0123456789ab-9" in real["staging_left"][0]["reason"] and backend.warnings


def test_clock_skew_removes_nothing_on_any_vm(builder):
    builder.chain([0, 7], chain_id="eeeeeeeeeeee", vm_uuid=OTHER_VM, name="db")
    builder.chain([0])
    builder.chain([7], chain_id="ffffffffffff")
    future = builder.add(0, started=_manifest.utcnow() + dt.timedelta(hours=2), chain_id="999999999999")
    before = tree(builder.repo.path)
    error = _raises("CLOCK_SKEW", prune, builder, keep_last=1)
    assert error.details["future_sets"] == [future]
    assert tree(builder.repo.path) == before


def test_vm_locked_removes_nothing(builder):
    builder.chain([0])
    builder.chain([7], chain_id="ffffffffffff")
    builder.chain([0], vm_uuid=OTHER_VM, name="db", chain_id="eeeeeeeeeeee")
    builder.chain([7], vm_uuid=OTHER_VM, name="db", chain_id="dddddddddddd")
    with VmLock(builder.repo.lock_path(VM), 0, "export (test)"):
        before = tree(builder.repo.path)
        error = _raises("VM_LOCKED", prune, builder, keep_last=1, lock_timeout=0.0)
        assert error.details["lock_holder"]["purpose"] == "export (test)"
        # Check mode sees the same lock (shared, on the existing file).
        _raises("VM_LOCKED", prune, builder, check=True, keep_last=1, lock_timeout=0.0)
        assert tree(builder.repo.path) == before
    result, dummy = prune(builder, keep_last=1)
    assert len(result["removed"]) == 2


def test_unreadable_set_is_never_removed(builder):
    ids = builder.chain([0])
    builder.chain([7], chain_id="ffffffffffff")
    manifest = os.path.join(builder.repo.set_dir(VM, ids[0]), _manifest.MANIFEST_NAME)
    with open(manifest, "wb") as fh:
        fh.write(b"{broken")
    result, dummy = prune(builder, keep_last=1)
    assert decisions(result)[ids[0]] == ("keep", ["unreadable (never removed)"])
    assert ids[0] in builder.on_disk()


def test_a_link_in_a_set_is_removed_not_followed(builder, tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "file").write_bytes(b"keep me")
    old = builder.add(0)
    builder.add(7, chain_id="ffffffffffff")
    link_dir = builder.repo.set_dir(VM, old)
    os.chmod(link_dir, 0o700)
    os.symlink(str(outside), os.path.join(link_dir, "evil"))
    result, dummy = prune(builder, keep_last=1)
    assert result["removed"] == [old]
    assert (outside / "file").read_bytes() == b"keep me"


@pytest.mark.parametrize("params, code", [
    ({}, "RETENTION_POLICY_EMPTY"),
    ({"keep_last": 0, "keep_weekly": 0}, "RETENTION_POLICY_EMPTY"),
    ({"keep_last": -1}, "INVALID_ARGUMENT"),
    ({"keep_last": 1, "keep_within": "1y"}, "INVALID_ARGUMENT"),
    ({"keep_last": 1, "timezone": "Nowhere/Land"}, "INVALID_ARGUMENT"),
    ({"keep_last": 1, "series": "Bad Series"}, "INVALID_NAME"),
    ({"keep_last": 1, "name": "a", "uuid": VM}, "INVALID_ARGUMENT"),
    ({"keep_last": 1, "uuid": "nope"}, "INVALID_NAME"),
    ({"keep_last": 1, "lock_timeout": float("nan")}, "INVALID_ARGUMENT"),
    ({"keep_last": 1, "name": "nobody"}, "SET_NOT_FOUND"),
])
def test_refusals_before_anything(builder, params, code):
    builder.chain([0])
    before = tree(builder.repo.path)
    _raises(code, prune, builder, **params)
    assert tree(builder.repo.path) == before


def test_descendants_before_ancestors(builder, monkeypatch):
    ids = builder.chain([0, 1, 2, 3])
    builder.chain([7], chain_id="ffffffffffff")
    order = []
    real = _prune.remove_set

    def spy(repo, vm_uuid, set_id):
        # Whenever a set goes, every set left in sets/ still has its parent there.
        order.append(set_id)
        real(repo, vm_uuid, set_id)
        left = set(builder.on_disk())
        for child, parent in zip(ids[1:], ids[:-1]):
            assert child not in left or parent in left

    monkeypatch.setattr(_prune, "remove_set", spy)
    prune(builder, keep_last=1)
    assert order == list(reversed(ids))


def test_vm_directory_without_sets(builder):
    builder.chain([0])
    os.makedirs(os.path.join(builder.repo.path, "vms", OTHER_VM), mode=0o711)  # a VM dir with nothing (no sets/)
    result, dummy = prune(builder, keep_last=1)
    assert result["changed"] is False
    assert sorted(v["uuid"] for v in result["vms"]) == sorted([VM, OTHER_VM])
    assert [v["sets"] for v in result["vms"] if v["uuid"] == OTHER_VM] == [0]


@pytest.mark.parametrize("outcome, restorable", [("ok", True), ("failed", False), ("unreadable", False), ("weird", False)])
def test_verdict_outcomes(builder, outcome, restorable):
    ids = builder.chain([0, 1])
    builder.verdict(ids[0], outcome)
    result, dummy = prune(builder, check=True, keep_last=5)
    assert [s["restorable"] for s in result["sets"]] == [restorable, restorable]


def test_a_series_without_sets_warns(builder):
    builder.chain([0], series="weekly")
    result, backend = prune(builder, series="weelky", keep_last=1)
    assert result["removed"] == [] and result["changed"] is False
    assert backend.warnings == ["no selected VM has a set of series 'weelky' (series found: weekly); nothing of it was pruned"]
    dummy, backend = prune(builder, series="weekly", keep_last=1)
    assert backend.warnings == []


def test_removing_planted_as_a_link_is_refused(builder, tmp_path):
    builder.chain([0])
    builder.chain([7], chain_id="ffffffffffff")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "file").write_bytes(b"keep")
    os.symlink(str(elsewhere), os.path.join(builder.repo.vm_dir(VM), _prune.REMOVING))
    before = tree(builder.repo.path)
    _raises("UNSAFE_TARGET", prune, builder, keep_last=1)
    assert tree(builder.repo.path) == before and (elsewhere / "file").read_bytes() == b"keep"


@pytest.mark.parametrize("select", ["uuid", "all", "name"])
def test_each_manifest_is_validated_once_per_run_under_the_lock(builder, monkeypatch, select):
    """The catalogs are read under the VMs' locks, once (by UUID and for every VM the selection
    needs listings only; a name needs the manifests to match it, then they are read again)."""
    ids = builder.chain([1, 2, 3])
    other = builder.add(4, vm_uuid=OTHER_VM, name="db-01")
    calls = []
    real = _manifest.validate_manifest
    monkeypatch.setattr(_manifest, "validate_manifest", lambda m, *a, **kw: calls.append(m["set_id"]) or real(m, *a, **kw))
    params = {"uuid": {"uuid": VM}, "all": {}, "name": {"name": "web-01"}}[select]
    result, dummy = prune(builder, keep_last=1, **params)
    expected = {"uuid": ids, "all": ids + [other], "name": ids + [other] + ids}[select]
    assert sorted(calls) == sorted(expected)
    assert set(ids) <= {s["set_id"] for s in result["sets"]} and not result["removed"]  # the closure keeps the chain
