# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for plugins/module_utils/_catalog.py on repositories of manifests in temporary directories.

Only manifests are written (a catalog never reads the data files). The default VM has a qcow2
disk vda (full, then incremental) and a raw disk vdb (stored whole in every set).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import typing as t

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _catalog
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

UTC = dt.timezone.utc
VM = "2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
OTHER_VM = "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
CHAIN = "0123456789ab"
T0 = dt.datetime(2026, 11, 25, 7, 0, 0, tzinfo=UTC)
GIB = 1024 ** 3
SHA = "a" * 64


def _raises(code: str, func, *args, **kwargs) -> VmBackupError:
    with pytest.raises(VmBackupError) as info:
        func(*args, **kwargs)
    assert info.value.error_code == code, info.value.msg
    return info.value


def set_id_at(hour: int, minute: int = 0) -> str:
    return f"{(T0.replace(hour=hour, minute=minute)):%Y%m%dT%H%M%SZ}-001"


class RepoBuilder:
    """Writes committed sets (directory + manifest.json) the way export lays them out."""

    def __init__(self, path: str) -> None:
        self.repo = repo_mod.Repository(path)
        self.repo.initialise()

    def add(self, hour: int, set_type: str = "full", parent: str | None = None, *, vm_uuid: str = VM,
            name: str = "web-01", chain_id: str | None = CHAIN, sizes: dict[str, int] | None = None,
            edit: t.Callable[[dict[str, t.Any]], None] | None = None) -> str:
        """A set started at ``hour``:00 and completed five minutes later; returns its id."""
        set_id = set_id_at(hour)
        sizes = sizes or {"vda": 10 * GIB, "vdb": GIB}
        disks, files = [], {"domain.xml": {"size": 5, "sha256": SHA, "role": "domain"}}
        for target, virtual_size in sizes.items():
            raw = target == "vdb"
            method = "copy" if set_type == "copy" else "full" if raw or set_type == "full" else "incremental"
            rel = f"disks/{target}.qcow2"
            disks.append({"target": target, "method": method, "format": "raw" if raw else "qcow2",
                          "virtual_size": virtual_size, "file": rel, "size": 100, "sha256": SHA})
            files[rel] = {"size": 100, "sha256": SHA, "role": "disk"}
        started = T0.replace(hour=hour)
        manifest = _manifest.build_manifest(
            set_id=set_id, vm_uuid=vm_uuid, vm_name=name, host="hv1", started=started,
            completed=started + dt.timedelta(minutes=5), set_type=set_type,
            chain_id=None if set_type == "copy" else chain_id,
            parent={"set_id": parent, "manifest_sha256": self.sha(parent, vm_uuid)} if parent else None,
            checkpoint=None if set_type == "copy" else f"vmbackup-{chain_id}-{hour}", consistency="crash", period=None,
            disks=disks, skipped_disks=[], files=files, tool={"name": "vmbackup.libvirt"}, stats={},
        )
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

    def catalog(self, vm_uuid: str = VM) -> _catalog.Catalog:
        return _catalog.Catalog(self.repo, vm_uuid)


@pytest.fixture
def builder(tmp_path) -> RepoBuilder:
    return RepoBuilder(str(tmp_path / "repo"))


@pytest.fixture
def chain(builder) -> dict[str, str]:
    """full (07:00), i1 (08:00), i2 (09:00), i3 (10:00): one chain, each set completed at :05."""
    ids = {"full": builder.add(7)}
    ids["i1"] = builder.add(8, "incremental", ids["full"])
    ids["i2"] = builder.add(9, "incremental", ids["i1"])
    ids["i3"] = builder.add(10, "incremental", ids["i2"])
    return ids


def _rename(manifest: dict[str, t.Any]) -> None:
    manifest["vm"]["name"] = "edited"


# --------------------------------------------------------------------------- loading
def test_catalog_loads_committed_sets_oldest_first(builder, chain):
    os.makedirs(os.path.join(builder.repo.staging_root(VM), set_id_at(11)))  # staged: not a set
    os.makedirs(builder.repo.set_dir(VM, set_id_at(12)))  # no manifest: not committed
    catalog = builder.catalog()
    assert catalog.ids() == [chain["full"], chain["i1"], chain["i2"], chain["i3"]]
    entry = catalog.sets[chain["i1"]]
    assert entry.error is None and entry.manifest["set_id"] == chain["i1"]
    assert entry.manifest_sha256 == builder.sha(chain["i1"])
    assert entry.parent_id == chain["full"] and catalog.sets[chain["full"]].parent_id is None
    assert entry.disk("vdb")["method"] == "full" and entry.disk("vdz") is None


def test_unreadable_manifest_is_kept_with_its_error(builder, chain):
    builder.write(chain["i2"], b"{not json")
    entry = builder.catalog().sets[chain["i2"]]
    assert entry.manifest is None and entry.parent_id is None
    assert entry.manifest_sha256 == _manifest.sha256_bytes(b"{not json")
    assert entry.error.error_code == "REPOSITORY_FORMAT"


def test_catalog_of_a_vm_without_sets_is_empty(builder):
    catalog = builder.catalog()
    assert catalog.ids() == [] and catalog.latest() is None and catalog.vm_name() is None
    assert catalog.as_of(T0) is None


# --------------------------------------------------------------------------- chains
@pytest.mark.parametrize("point, expected", [("full", ["full"]), ("i1", ["full", "i1"]), ("i3", ["full", "i1", "i2", "i3"])])
def test_sets_of_chain_is_base_first(builder, chain, point, expected):
    assert builder.catalog().sets_of_chain(chain[point]) == [chain[label] for label in expected]


def test_sets_of_chain_of_a_copy_and_of_a_new_chain(builder, chain):
    copy = builder.add(11, "copy")
    full2 = builder.add(12, chain_id="ba9876543210")
    inc2 = builder.add(13, "incremental", full2, chain_id="ba9876543210")
    catalog = builder.catalog()
    assert catalog.sets_of_chain(copy) == [copy]
    assert catalog.sets_of_chain(inc2) == [full2, inc2]
    assert catalog.sets_of_chain(chain["i3"])[0] == chain["full"]


def test_sets_of_chain_unknown_set(builder, chain):
    err = _raises("SET_NOT_FOUND", builder.catalog().sets_of_chain, "20300101T000000Z-001")
    assert err.details["set_id"] == "20300101T000000Z-001"
    assert chain["full"] not in err.msg


def _broken(builder, point: str) -> VmBackupError:
    return _raises("CHAIN_BROKEN", builder.catalog().sets_of_chain, point)


def test_missing_parent_breaks_the_chain(builder, chain):
    shutil.rmtree(builder.repo.set_dir(VM, chain["i1"]))
    err = _broken(builder, chain["i3"])
    # The fault nearest the point is named: i2 cannot reach its parent i1.
    assert (err.details["set_id"], err.details["parent"]) == (chain["i2"], chain["i1"])
    assert err.details["affected"] == [chain["i2"], chain["i3"]]
    assert "missing" in err.msg
    assert builder.catalog().sets_of_chain(chain["full"]) == [chain["full"]]


def test_edited_parent_manifest_breaks_the_chain(builder, chain):
    builder.rewrite(chain["full"], _rename)
    err = _broken(builder, chain["i2"])
    assert (err.details["set_id"], err.details["parent"]) == (chain["i1"], chain["full"])
    assert err.details["affected"] == [chain["i1"], chain["i2"], chain["i3"]]
    assert "differs from what its child" in err.msg
    assert builder.catalog().sets_of_chain(chain["full"]) == [chain["full"]]


def test_parent_of_another_chain_breaks_the_chain(builder):
    full = builder.add(7)
    inc = builder.add(8, "incremental", full, chain_id="ba9876543210")
    err = _broken(builder, inc)
    assert (err.details["set_id"], err.details["parent"]) == (inc, full)
    assert "another chain" in err.msg


def test_resized_disk_breaks_the_chain(builder):
    full = builder.add(7)
    inc = builder.add(8, "incremental", full, sizes={"vda": 20 * GIB, "vdb": GIB})
    err = _broken(builder, inc)
    assert (err.details["set_id"], err.details["parent"]) == (inc, full)
    assert "vda changed size" in err.msg


def test_resized_raw_disk_does_not_break_the_chain(builder):
    """A disk stored whole in the child does not read the parent's file."""
    full = builder.add(7)
    inc = builder.add(8, "incremental", full, sizes={"vda": 10 * GIB, "vdb": 2 * GIB})
    assert builder.catalog().sets_of_chain(inc) == [full, inc]


def test_incremental_disk_the_parent_lacks_breaks_the_chain(builder):
    full = builder.add(7, sizes={"vda": GIB, "vdb": GIB})
    inc = builder.add(8, "incremental", full, sizes={"vda": GIB, "vdb": GIB, "vdc": GIB})
    err = _broken(builder, inc)
    assert "disk vdc" in err.msg and "no such disk" in err.msg


def test_parent_that_cannot_be_parsed_although_its_hash_matches(builder):
    """The child recorded the hash of bytes this collection cannot read (say, a newer format)."""
    full = builder.add(7)
    builder.rewrite(full, lambda m: m.update(format_version=2))
    inc = builder.add(8, "incremental", full)
    assert builder.catalog().sets[full].manifest is None
    err = _broken(builder, inc)
    assert (err.details["set_id"], err.details["parent"]) == (inc, full)
    assert "unreadable" in err.msg


def test_unreadable_point_is_repository_format(builder, chain):
    builder.write(chain["i2"], b"[]")
    err = _raises("REPOSITORY_FORMAT", builder.catalog().sets_of_chain, chain["i2"])
    assert err.details["set_id"] == chain["i2"]
    assert err.details["affected"] == [chain["i2"], chain["i3"]]
    # The child of an unreadable set fails at its link (the bytes it recorded changed).
    err = _broken(builder, chain["i3"])
    assert (err.details["set_id"], err.details["parent"], err.details["affected"]) == (chain["i3"], chain["i2"], [chain["i3"]])


# --------------------------------------------------------------------------- disks and points
def test_disk_chain_follows_the_incremental_disk_to_the_full(builder, chain):
    catalog = builder.catalog()
    vda = catalog.disk_chain(chain["i2"], "vda")
    assert [sid for sid, _disk in vda] == [chain["full"], chain["i1"], chain["i2"]]
    assert [disk["method"] for _sid, disk in vda] == ["full", "incremental", "incremental"]
    assert all(disk["target"] == "vda" for _sid, disk in vda)
    assert [sid for sid, _disk in catalog.disk_chain(chain["full"], "vda")] == [chain["full"]]


def test_disk_chain_of_a_raw_disk_is_its_own_set(builder, chain):
    """A raw disk (method full in an incremental set) is its own base."""
    vdb = builder.catalog().disk_chain(chain["i2"], "vdb")
    assert [(sid, disk["method"]) for sid, disk in vdb] == [(chain["i2"], "full")]


def test_disk_chain_of_a_copy(builder):
    copy = builder.add(7, "copy")
    assert [(sid, d["method"]) for sid, d in builder.catalog().disk_chain(copy, "vda")] == [(copy, "copy")]


def test_disk_chain_of_a_disk_the_point_lacks(builder, chain):
    err = _raises("CHAIN_BROKEN", builder.catalog().disk_chain, chain["i1"], "vdz")
    assert err.details["set_id"] == chain["i1"] and "vdz" in err.msg


@pytest.mark.parametrize(
    "damaged, target, expected",
    [
        pytest.param("full", "vda", ["full", "i1", "i2", "i3"], id="full-qcow2-disk"),
        pytest.param("i1", "vda", ["i1", "i2", "i3"], id="incremental-disk"),
        pytest.param("i3", "vda", ["i3"], id="newest-disk"),
        pytest.param("full", "vdb", ["full"], id="raw-disk-stored-whole-every-time"),
        pytest.param("i1", "vdb", ["i1"], id="raw-disk-of-an-incremental"),
        pytest.param("full", None, ["full"], id="not-a-disk"),
        pytest.param("i2", None, ["i2"], id="side-file-of-an-incremental"),
    ],
)
def test_points_using(builder, chain, damaged, target, expected):
    builder.add(11, chain_id="ba9876543210")  # a new chain reads nothing of the old one
    assert builder.catalog().points_using(chain[damaged], target) == [chain[label] for label in expected]


def test_points_using_stops_at_a_disk_the_later_set_stores_whole(builder):
    full = builder.add(7)

    def vda_whole(manifest):
        manifest["disks"][0]["method"] = "full"  # e.g. its bitmap was lost: stored whole again

    i1 = builder.add(8, "incremental", full, edit=vda_whole)
    i2 = builder.add(9, "incremental", i1)
    catalog = builder.catalog()
    assert catalog.points_using(full, "vda") == [full]
    assert catalog.points_using(i1, "vda") == [i1, i2]
    assert [sid for sid, _d in catalog.disk_chain(i2, "vda")] == [i1, i2]


def test_descendants(builder, chain):
    full2 = builder.add(11, chain_id="ba9876543210")
    catalog = builder.catalog()
    assert catalog.descendants(chain["full"]) == [chain["i1"], chain["i2"], chain["i3"]]
    assert catalog.descendants(chain["i2"]) == [chain["i3"]]
    assert catalog.descendants(chain["i3"]) == [] and catalog.descendants(full2) == []
    assert catalog.descendants("20300101T000000Z-001") == []


def test_descendants_follow_set_ids_whatever_the_hashes_say(builder, chain):
    builder.rewrite(chain["i1"], _rename)
    builder.write(chain["i2"], b"garbage")  # its own parent is unknown now; its child still names it
    catalog = builder.catalog()
    assert catalog.descendants(chain["full"]) == [chain["i1"]]
    assert catalog.descendants(chain["i1"]) == []
    assert catalog.descendants(chain["i2"]) == [chain["i3"]]


def test_descendants_of_a_branch(builder, chain):
    """Two children of one set (only hand-made repositories have them) are both descendants."""
    branch = builder.add(11, "incremental", chain["i1"])
    assert builder.catalog().descendants(chain["i1"]) == [chain["i2"], chain["i3"], branch]


# --------------------------------------------------------------------------- names and time
def test_latest_and_vm_name(builder, chain):
    builder.add(11, "copy", name="web-01-renamed")
    builder.write(set_id_at(12), b"garbage")
    catalog = builder.catalog()
    assert catalog.latest() == set_id_at(12)  # the newest set, readable or not
    assert catalog.vm_name() == "web-01-renamed"  # the newest readable manifest
    assert chain["full"] in catalog.ids()


@pytest.mark.parametrize(
    "when, expected",
    [
        pytest.param(T0.replace(hour=7, minute=5), "full", id="exactly-at-completion"),
        pytest.param(T0.replace(hour=8, minute=4, second=59), "full", id="next-set-started-not-completed"),
        pytest.param(T0.replace(hour=8, minute=5), "i1", id="exactly-at-next-completion"),
        pytest.param(T0.replace(hour=8, minute=30), "i1", id="between-sets"),
        pytest.param(T0.replace(hour=9, minute=30, tzinfo=dt.timezone(dt.timedelta(hours=1))), "i1", id="other-zone"),
        pytest.param(T0.replace(year=2030), "i3", id="long-after"),
        pytest.param(T0.replace(hour=7, minute=4, second=59), None, id="before-the-first-completed"),
        pytest.param(T0.replace(hour=6), None, id="before-the-first-started"),
    ],
)
def test_as_of(builder, chain, when, expected):
    assert builder.catalog().as_of(when) == (chain[expected] if expected else None)


def test_as_of_uses_the_set_id_time_of_an_unreadable_manifest(builder, chain):
    builder.write(chain["i2"], b"garbage")
    catalog = builder.catalog()
    assert catalog.as_of(T0.replace(hour=9)) == chain["i2"]  # started 09:00, completion unknown
    assert catalog.as_of(T0.replace(hour=8, minute=59)) == chain["i1"]


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("2026-11-25T07:00:00Z", dt.datetime(2026, 11, 25, 7, tzinfo=UTC), id="zulu"),
        pytest.param("2026-11-25T07:00:00z", dt.datetime(2026, 11, 25, 7, tzinfo=UTC), id="lower-zulu"),
        pytest.param("2026-11-25T08:00:00+01:00", dt.datetime(2026, 11, 25, 7, tzinfo=UTC), id="plus-one-hour"),
        pytest.param("2026-11-25T02:00:00-05:00", dt.datetime(2026, 11, 25, 7, tzinfo=UTC), id="minus-five-hours"),
        pytest.param("2026-11-25T00:30:00+01:00", dt.datetime(2026, 11, 24, 23, 30, tzinfo=UTC), id="zone-crosses-midnight"),
        pytest.param("2026-11-25T07:00:00", dt.datetime(2026, 11, 25, 7, tzinfo=UTC), id="naive-is-utc"),
        pytest.param("2026-11-25 07:00", dt.datetime(2026, 11, 25, 7, tzinfo=UTC), id="space-no-seconds"),
        pytest.param("2026-11-25T07:00:00.250Z", dt.datetime(2026, 11, 25, 7, 0, 0, 250000, tzinfo=UTC), id="fraction"),
        pytest.param("2026-11-25", dt.datetime(2026, 11, 25, 23, 59, 59, tzinfo=UTC), id="date-is-end-of-day"),
        pytest.param("20261125", dt.datetime(2026, 11, 25, 23, 59, 59, tzinfo=UTC), id="basic-date-is-end-of-day"),
        pytest.param("  2026-11-25T07:00:00Z\n", dt.datetime(2026, 11, 25, 7, tzinfo=UTC), id="surrounding-space"),
    ],
)
def test_parse_as_of(text, expected):
    parsed = _catalog.parse_as_of(text)
    assert parsed == expected
    assert parsed.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "yesterday", "2026-13-01", "2026-11-31", "2026-11-25T25:00:00Z", "2026-11-25T07:00:00+25:00", "Z",
     "2026-11-25X", None, 1764054000, dt.datetime(2026, 11, 25, tzinfo=UTC)],
)
def test_parse_as_of_rejects(text):
    err = _raises("INVALID_ARGUMENT", _catalog.parse_as_of, text)
    assert "ISO 8601" in err.msg


@pytest.mark.parametrize("text", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"])
def test_parse_as_of_out_of_range_offset_is_invalid_argument(text):
    err = _raises("INVALID_ARGUMENT", _catalog.parse_as_of, text)
    assert "out of range" in err.msg and text in err.msg


# --------------------------------------------------------------------------- which VMs
def test_resolve_vms_by_uuid(builder, chain):
    builder.add(7, vm_uuid=OTHER_VM, name="db-01")
    (catalog,) = _catalog.resolve_vms(builder.repo, None, VM.upper())
    assert catalog.vm_uuid == VM and catalog.ids() == list(chain.values())


def test_resolve_vms_by_name_uses_the_newest_manifest(builder, chain):
    builder.add(11, "copy", name="web-01-renamed")
    builder.add(7, vm_uuid=OTHER_VM, name="db-01")
    (catalog,) = _catalog.resolve_vms(builder.repo, "web-01-renamed", None)
    assert catalog.vm_uuid == VM and chain["full"] in catalog.ids()
    assert [c.vm_uuid for c in _catalog.resolve_vms(builder.repo, "db-01", None)] == [OTHER_VM]
    err = _raises("SET_NOT_FOUND", _catalog.resolve_vms, builder.repo, "web-01", None)
    assert "web-01" in err.msg


def test_resolve_vms_by_a_name_two_vms_carry(builder):
    builder.add(7, name="twin")
    builder.add(7, vm_uuid=OTHER_VM, name="twin")
    assert [c.vm_uuid for c in _catalog.resolve_vms(builder.repo, "twin", None)] == sorted([VM, OTHER_VM])


def test_resolve_vms_without_a_name_gives_every_vm(builder, chain, tmp_path):
    builder.add(7, vm_uuid=OTHER_VM, name="db-01")
    vms_dir = os.path.join(builder.repo.path, "vms")
    os.makedirs(os.path.join(vms_dir, "not-a-uuid"))
    os.makedirs(os.path.join(vms_dir, VM.replace("-", "")))  # a UUID, but not as the repository spells it
    os.makedirs(os.path.join(vms_dir, OTHER_VM.upper()))
    with open(os.path.join(vms_dir, "9c8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"), "w", encoding="utf-8") as fh:
        fh.write("a file, not a VM directory")
    os.symlink(str(tmp_path), os.path.join(vms_dir, "1c8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"))
    assert _catalog.vm_uuids(builder.repo) == sorted([VM, OTHER_VM])
    catalogs = _catalog.resolve_vms(builder.repo, None, None)
    assert [c.vm_uuid for c in catalogs] == sorted([VM, OTHER_VM])
    assert catalogs[[c.vm_uuid for c in catalogs].index(VM)].ids() == list(chain.values())


def test_resolve_vms_finds_nothing(builder, tmp_path):
    assert _catalog.resolve_vms(builder.repo, None, None) == []
    _raises("SET_NOT_FOUND", _catalog.resolve_vms, builder.repo, "web-01", None)
    err = _raises("SET_NOT_FOUND", _catalog.resolve_vms, builder.repo, None, VM)
    assert VM in err.msg
    builder.repo.prepare_vm(OTHER_VM)  # a directory without sets
    _raises("SET_NOT_FOUND", _catalog.resolve_vms, builder.repo, None, OTHER_VM)
    _raises("INVALID_NAME", _catalog.resolve_vms, builder.repo, None, "not-a-uuid")
    assert _catalog.vm_uuids(repo_mod.Repository(str(tmp_path / "nothing"))) == []


@pytest.mark.parametrize("completed", [123, None, ["2026-11-25T09:05:00Z"], "09:05", "2026-11-25T09:05:00+01:00"],
                         ids=["number", "null", "list", "time-only", "with-zone"])
def test_as_of_falls_back_to_the_set_id_time_for_a_malformed_completion_time(builder, chain, completed):
    """A hand-edited ``completed`` makes the manifest invalid (REPOSITORY_FORMAT); as_of still
    orders that set by its id's time and does not crash."""
    builder.rewrite(chain["i2"], lambda m: m.update(completed=completed))
    catalog = builder.catalog()
    entry = catalog.sets[chain["i2"]]
    assert entry.manifest is None and entry.error.error_code == "REPOSITORY_FORMAT" and "completed" in entry.error.msg
    assert catalog.as_of(T0.replace(hour=9)) == chain["i2"]
    assert catalog.as_of(T0.replace(hour=8, minute=59)) == chain["i1"]


# --------------------------------------------------------------------------- series
def _in_series(name: str) -> t.Callable[[dict[str, t.Any]], None]:
    def edit(manifest: dict[str, t.Any]) -> None:
        manifest["series"] = name
    return edit


def _without_series(manifest: dict[str, t.Any]) -> None:
    del manifest["series"]


def test_series_are_kept_apart_and_old_sets_are_default(builder):
    old = builder.add(6, edit=_without_series)
    weekly = builder.add(7, edit=_in_series("weekly"), chain_id="aaaaaaaaaaaa")
    monthly = builder.add(8, edit=_in_series("monthly"), chain_id="bbbbbbbbbbbb")
    weekly2 = builder.add(9, "incremental", weekly, edit=_in_series("weekly"), chain_id="aaaaaaaaaaaa")
    builder.write(set_id_at(10), b"{broken")
    catalog = builder.catalog()
    assert catalog.series_names() == ["default", "monthly", "weekly"]
    assert catalog.sets[old].series == "default"
    assert catalog.sets[set_id_at(10)].series is None
    assert catalog.latest() == set_id_at(10)
    assert catalog.latest("weekly") == weekly2
    assert catalog.latest("monthly") == monthly
    assert catalog.latest("default") == old
    assert catalog.latest("offsite") is None
    assert [m["set_id"] for m in catalog.manifests("weekly")] == [weekly, weekly2]
    assert len(catalog.manifests()) == 4


def test_verdict_reads_the_sidecar_and_an_unreadable_one_is_no_pass(builder, chain):
    catalog = builder.catalog()
    assert catalog.verdict(chain["i1"]) is None
    sets_dir = builder.repo.sets_dir(VM)
    with open(os.path.join(sets_dir, f"{chain['i1']}.verify.json"), "w", encoding="utf-8") as fh:
        json.dump({"outcome": "ok", "verified": "2026-11-26T00:00:00Z"}, fh)
    with open(os.path.join(sets_dir, f"{chain['i2']}.verify.json"), "w", encoding="utf-8") as fh:
        fh.write("{not json")
    assert catalog.verdict(chain["i1"]) is None  # verdicts are read with the sets: a catalog is one snapshot
    catalog = builder.catalog()
    assert catalog.verdict(chain["i1"])["outcome"] == "ok"
    assert catalog.verdict(chain["i2"]) == {"outcome": "unreadable"}


# --------------------------------------------------------------------------- resolve_vm_uuids
def test_resolve_vm_uuids_gives_resolve_vms_answer_without_reading_manifests_by_uuid(builder, chain, monkeypatch):
    repo = builder.catalog().repo
    vm_uuid = builder.catalog().vm_uuid
    assert _catalog.resolve_vm_uuids(repo, None, None) == [c.vm_uuid for c in _catalog.resolve_vms(repo, None, None)]
    name = builder.catalog().vm_name()
    assert _catalog.resolve_vm_uuids(repo, name, None) == [vm_uuid]
    for args in ((f"{name}-nope", None), (None, "00000000-0000-4000-8000-000000000000")):
        with pytest.raises(VmBackupError) as a:
            _catalog.resolve_vms(repo, *args)
        with pytest.raises(VmBackupError) as b:
            _catalog.resolve_vm_uuids(repo, *args)
        assert (a.value.error_code, a.value.msg) == (b.value.error_code, b.value.msg) and a.value.error_code == "SET_NOT_FOUND"
    monkeypatch.setattr(repo, "read_committed", lambda *a: pytest.fail("a manifest was read"))
    assert _catalog.resolve_vm_uuids(repo, None, vm_uuid.upper()) == [vm_uuid]
