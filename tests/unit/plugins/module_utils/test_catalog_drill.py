# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for the drill proof reader of plugins/module_utils/_catalog.py (and _repository.read_sidecars),
the drill view of backup_info (_info.drill_view / describe) and prune taking a proof with its set."""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _catalog
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _info
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _prune
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod

VM = "2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
T0 = dt.datetime(2026, 11, 25, tzinfo=dt.timezone.utc)
NOW = T0 + dt.timedelta(days=3)
SHA = "a" * 64


class Repo:
    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.repo = repo_mod.Repository(path)
        self.repo.initialise()
        self.repo.prepare_vm(VM)

    def add(self, hour: int) -> str:
        started = T0 + dt.timedelta(hours=hour)
        set_id = f"{started:%Y%m%dT%H%M%SZ}-001"
        manifest = _manifest.build_manifest(
            set_id=set_id, vm_uuid=VM, vm_name="web-01", host="hv1", started=started, completed=started + dt.timedelta(minutes=5),
            set_type="copy", chain_id=None, parent=None, checkpoint=None, consistency="crash", period=None,
            disks=[{"target": "vda", "method": "copy", "format": "qcow2", "virtual_size": 1 << 30, "file": "disks/vda.qcow2",
                    "size": 3, "sha256": SHA}],
            skipped_disks=[], files={"disks/vda.qcow2": {"size": 3, "sha256": SHA, "role": "disk"}}, tool={}, stats={})
        set_dir = self.repo.set_dir(VM, set_id)
        os.makedirs(os.path.join(set_dir, "disks"))
        with open(os.path.join(set_dir, "disks", "vda.qcow2"), "wb") as fh:
            fh.write(b"xyz")
        with open(os.path.join(set_dir, "manifest.json"), "wb") as fh:
            fh.write(_manifest.dumps(manifest))
        return set_id

    def proof(self, set_id: str, outcome: str = "ok", completed: dt.datetime = NOW - dt.timedelta(hours=2), *,
              raw: bytes | None = None, stale: bool = False, **extra) -> str:
        path = os.path.join(self.repo.sets_dir(VM), f"{set_id}.drill.json")
        data = raw if raw is not None else _manifest.dumps(dict({
            "format": "vmbackup.libvirt/drill", "format_version": 1, "set_id": set_id, "outcome": outcome, "host": "hv2",
            "completed": _manifest.iso(completed), "failed_check": None if outcome == "ok" else "restore",
            "error_code": None if outcome == "ok" else "CHECKSUM_MISMATCH",
            "manifest_sha256": "b" * 64 if stale else _manifest.sha256_bytes(self.repo.read_manifest_bytes(VM, set_id)),
        }, **extra))
        with open(path, "wb") as fh:
            fh.write(data)
        return path


@pytest.fixture
def repo(tmp_path) -> Repo:
    return Repo(str(tmp_path / "base" / "repo"))


@pytest.mark.parametrize("raw, outcome", [
    (b"", "unreadable"),
    (b"[1]", "unreadable"),
    (b'{"outcome": "ok"}', "unreadable"),  # not this collection's format
    (b'{"format": "vmbackup.libvirt/drill", "outcome": "great"}', "unreadable"),
    (b"\xff\xfe", "unreadable"),
    (None, "unreadable"),
    (b'{"format": "vmbackup.libvirt/drill", "outcome": "failed"}', "failed"),
])
def test_parse_drill_proof(raw, outcome):
    assert _catalog.parse_drill_proof(raw)["outcome"] == outcome


def test_proofs_of_committed_sets_only_and_never_through_a_link(repo, tmp_path):
    a, b = repo.add(0), repo.add(1)
    repo.proof(a)
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"format": "vmbackup.libvirt/drill", "outcome": "ok"}))
    os.symlink(outside, os.path.join(repo.repo.sets_dir(VM), f"{b}.drill.json"))
    orphan = "20261120T000000Z-001"
    repo.proof(a, raw=b"{}")  # rewritten: unreadable
    with open(os.path.join(repo.repo.sets_dir(VM), f"{orphan}.drill.json"), "wb") as fh:
        fh.write(b'{"format": "vmbackup.libvirt/drill", "outcome": "ok"}')
    proofs = _catalog.drill_proofs(_catalog.Catalog(repo.repo, VM))
    assert proofs == {a: {"outcome": "unreadable"}, b: {"outcome": "unreadable"}}  # the link read as unreadable, the orphan not shown


def test_newest_drill_is_by_completion_not_by_set(repo):
    a, b, c = repo.add(0), repo.add(1), repo.add(2)
    repo.proof(a, "ok", NOW - dt.timedelta(hours=1))  # a random older point drilled last
    repo.proof(b, "failed", NOW - dt.timedelta(hours=5))
    repo.proof(c, "ok", NOW - dt.timedelta(days=2))
    proofs = _catalog.drill_proofs(_catalog.Catalog(repo.repo, VM))
    assert _catalog.newest_drill(proofs)[0] == a
    assert _catalog.newest_drill(proofs, "failed")[0] == b
    assert _catalog.newest_drill({}) is None and _catalog.newest_drill({a: {"outcome": "unreadable"}}) is None


def info(repo: Repo) -> dict:
    drills: dict = {}
    catalogs, verdicts, dummy = _info.read_vms(repo.repo, None, None, drills)
    return _info.describe(repo.repo.path, catalogs, verdicts, NOW, drills=drills)["vms"][0]


def test_backup_info_shows_the_newest_drill_and_its_age(repo):
    a, b = repo.add(0), repo.add(1)
    vm = info(repo)
    assert (vm["drill"], vm["drill_ok"], vm["drills"]) == (None, None, 0)
    repo.proof(a, "ok", NOW - dt.timedelta(days=2))
    repo.proof(b, "failed", NOW - dt.timedelta(hours=1), stale=True)
    vm = info(repo)
    assert vm["drill"] == {"set_id": b, "completed": _manifest.iso(NOW - dt.timedelta(hours=1)), "age_seconds": 3600,
                           "outcome": "failed", "host": "hv2", "failed_check": "restore", "error_code": "CHECKSUM_MISMATCH",
                           "current": False}
    assert vm["drill_ok"]["set_id"] == a and vm["drill_ok"]["age_seconds"] == 2 * 86400 and vm["drill_ok"]["current"] is True
    assert vm["drills"] == 2


def test_a_proof_with_nonsense_fields_is_shown_without_crashing(repo):
    a = repo.add(0)
    repo.proof(a, "ok", completed=NOW, host=7, failed_check=["x"], error_code={})
    repo.proof(a, raw=_manifest.dumps({"format": "vmbackup.libvirt/drill", "outcome": "ok", "completed": "yesterday", "host": 7}))
    vm = info(repo)
    assert vm["drill"]["completed"] == "yesterday" and vm["drill"]["age_seconds"] is None and vm["drill"]["host"] is None


def test_prune_takes_the_proof_with_its_set_and_removes_orphans(repo):
    a, b = repo.add(0), repo.add(1)
    repo.proof(a)
    repo.proof(b)
    orphan = os.path.join(repo.repo.sets_dir(VM), "20261120T000000Z-001.drill.json")
    with open(orphan, "wb") as fh:
        fh.write(b"{}")
    backend = _prune.Pruner(_prune.PruneParams(repository=repo.repo.path, keep_last=1), run=None,
                            qemu_img_path="/usr/bin/qemu-img", check_mode=True)
    checked = backend.run()
    assert checked["removed"] == [a] and any("20261120T000000Z-001.drill.json" in c for c in checked["cleaned_up"])
    assert os.path.exists(orphan)
    size_with_proof = next(s["bytes"] for s in checked["sets"] if s["set_id"] == a)
    backend = _prune.Pruner(_prune.PruneParams(repository=repo.repo.path, keep_last=1), run=None,
                            qemu_img_path="/usr/bin/qemu-img", check_mode=False)
    real = backend.run()
    assert real["removed"] == [a] and next(s["bytes"] for s in real["sets"] if s["set_id"] == a) == size_with_proof
    assert sorted(os.listdir(repo.repo.sets_dir(VM))) == [b, f"{b}.drill.json"]
    assert size_with_proof > 3 + os.path.getsize(os.path.join(repo.repo.set_dir(VM, b), "manifest.json"))
