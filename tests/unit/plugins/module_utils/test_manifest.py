# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for plugins/module_utils/_manifest.py (pure logic, no I/O)."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import re

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 25, 7, 35, 12, tzinfo=UTC)
S0 = "20261125T073512Z"  # T0 as a set id stamp
SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64


def _raises(code: str, func, *args, **kwargs) -> VmBackupError:
    with pytest.raises(VmBackupError) as info:
        func(*args, **kwargs)
    assert info.value.error_code == code, info.value.msg
    return info.value


# --------------------------------------------------------------------------- new_set_id


@pytest.mark.parametrize(
    "now, existing, expected",
    [
        pytest.param(T0, [], f"{S0}-001", id="first-ever"),
        pytest.param(T0, ["20261125T073511Z-004"], f"{S0}-001", id="later-second-restarts-sequence"),
        pytest.param(T0, ["20250101T000000Z-999"], f"{S0}-001", id="999-in-an-older-second-is-fine"),
        pytest.param(T0, [f"{S0}-001"], f"{S0}-002", id="same-second"),
        pytest.param(T0, [f"{S0}-003", f"{S0}-001", f"{S0}-002"], f"{S0}-004", id="same-second-unordered-input"),
        pytest.param(T0, [f"{S0}-009"], f"{S0}-010", id="same-second-carries-digit"),
        pytest.param(T0, [f"{S0}-998"], f"{S0}-999", id="same-second-last-allowed"),
        pytest.param(T0, ["20261125T080000Z-001"], "20261125T080000Z-002", id="clock-went-back-an-hour"),
        pytest.param(T0, ["20270101T000000Z-005", "20261125T073511Z-001"], "20270101T000000Z-006", id="clock-went-back-a-year"),
        pytest.param(
            dt.datetime(2026, 11, 25, 8, 35, 12, tzinfo=dt.timezone(dt.timedelta(hours=1))),
            [],
            f"{S0}-001",
            id="non-utc-now-is-converted",
        ),
        pytest.param(T0.replace(microsecond=999999), [], f"{S0}-001", id="microseconds-dropped"),
    ],
)
def test_new_set_id(now, existing, expected):
    result = _manifest.new_set_id(now, iter(existing))  # any iterable, even a one-shot one
    assert result == expected
    assert _manifest.is_set_id(result)
    assert result not in existing
    assert all(result > other for other in existing), "a new id must sort after every existing one"


@pytest.mark.parametrize(
    "now, existing",
    [
        pytest.param(T0, [f"{S0}-999"], id="same-second"),
        pytest.param(T0, [f"{S0}-001", f"{S0}-999", f"{S0}-500"], id="same-second-unordered"),
        pytest.param(T0, ["20300101T000000Z-999"], id="clock-went-back"),
    ],
)
def test_new_set_id_more_than_999_in_one_second(now, existing):
    err = _raises("INVALID_ARGUMENT", _manifest.new_set_id, now, existing)
    assert "999" in err.msg


@pytest.mark.parametrize(
    "clock",
    [
        pytest.param([T0] * 30, id="all-in-one-second"),
        pytest.param([T0 + dt.timedelta(seconds=s) for s in (0, 0, 1, 1, 1, 5, 5)], id="forward"),
        pytest.param([T0 + dt.timedelta(seconds=s) for s in (10, 10, 3, 3, -100, 11, 12, 12)], id="backwards-and-forwards"),
    ],
)
def test_new_set_id_sequence_always_sorts_in_creation_order(clock):
    ids: list[str] = []
    for now in clock:
        ids.append(_manifest.new_set_id(now, ids))
    assert len(set(ids)) == len(ids)
    assert sorted(ids) == ids


# --------------------------------------------------------------------------- is_set_id


@pytest.mark.parametrize(
    "text, expected",
    [
        (f"{S0}-001", True),
        ("19700101T000000Z-999", True),
        (f"{S0}-000", True),
        ("", False),
        (None, False),
        (S0, False),
        (f"{S0}-1", False),
        (f"{S0}-0001", False),
        ("20261125T073512-001", False),
        ("20261125t073512Z-001", False),
        ("20261125T073512z-001", False),
        ("2026-11-25T07:35:12Z-001", False),
        (f"x{S0}-001", False),
        (f"{S0}-001x", False),
        (f"{S0}-001.verify.json", False),
        (f"{S0}-001/..", False),
        (f" {S0}-001", False),
    ],
)
def test_is_set_id(text, expected):
    assert _manifest.is_set_id(text) is expected


# Set ids, targets, periods and checkpoint names become path components; Python's "$" also
# matches before a trailing newline, so each of these currently accepts "<valid>\n".


def test_is_set_id_rejects_trailing_newline():
    assert _manifest.is_set_id(f"{S0}-001\n") is False


# --------------------------------------------------------------------------- checkpoint names


@pytest.mark.parametrize(
    "chain_id, seq, expected",
    [
        ("0123456789ab", 0, "vmbackup-0123456789ab-0"),
        ("abcdefabcdef", 1, "vmbackup-abcdefabcdef-1"),
        ("000000000000", 12345, "vmbackup-000000000000-12345"),
    ],
)
def test_checkpoint_name_round_trip(chain_id, seq, expected):
    name = _manifest.checkpoint_name(chain_id, seq)
    assert name == expected
    assert _manifest.parse_checkpoint_name(name) == (chain_id, seq)


def test_new_chain_id_is_a_valid_chain_id():
    first, second = _manifest.new_chain_id(), _manifest.new_chain_id()
    assert re.fullmatch(r"[0-9a-f]{12}", first)
    assert first != second
    assert _manifest.parse_checkpoint_name(_manifest.checkpoint_name(first, 3)) == (first, 3)


@pytest.mark.parametrize(
    "chain_id, seq",
    [
        ("0123456789AB", 1),  # upper case
        ("0123456789a", 1),  # 11 characters
        ("0123456789abc", 1),  # 13 characters
        ("0123456789ag", 1),  # not hex
        ("", 1),
        ("../../etc/pa", 1),
        ("0123456789ab", -1),
    ],
)
def test_checkpoint_name_rejects_bad_input(chain_id, seq):
    with pytest.raises(ValueError):
        _manifest.checkpoint_name(chain_id, seq)


@pytest.mark.parametrize(
    "name",
    [
        "",
        None,
        "backup-1",
        "vmbackup",
        "vmbackup-0123456789ab",
        "vmbackup-0123456789ab-",
        "vmbackup-0123456789ab-x",
        "vmbackup-0123456789ab--1",
        "vmbackup-0123456789AB-1",
        "vmbackup-0123456789abc-1",
        "vmbackup-0123456789a-1",
        "Vmbackup-0123456789ab-1",
        "other-vmbackup-0123456789ab-1",
        "vmbackup-0123456789ab-1-extra",
        "vmbackup_0123456789ab_1",
        "virt-backup-2026-11-25",
    ],
)
def test_parse_checkpoint_name_ignores_foreign_names(name):
    assert _manifest.parse_checkpoint_name(name) is None


def test_parse_checkpoint_name_rejects_trailing_newline():
    assert _manifest.parse_checkpoint_name("vmbackup-0123456789ab-1\n") is None


# --------------------------------------------------------------------------- validate_target


@pytest.mark.parametrize("target", ["vda", "sdb", "hdc", "xvdaa", "vdz", "sdaa", "nvme0n1", "fd0", "a", "abcd" + "x" * 12])
def test_validate_target_accepts(target):
    assert _manifest.validate_target(target) == target


@pytest.mark.parametrize(
    "target",
    [
        "",
        "../x",
        "..",
        ".",
        "vd a",
        "VDA",
        "Vda",
        "a/b",
        "/vda",
        "vda.qcow2",
        "vda\x00",
        "1vda",
        "vd-a",
        "abcd" + "x" * 13,  # 17 characters
        "v" * 200,
        None,
        5,
        b"vda",
    ],
)
def test_validate_target_rejects(target):
    err = _raises("INVALID_NAME", _manifest.validate_target, target)
    assert "disk target" in err.msg


def test_validate_target_rejects_trailing_newline():
    _raises("INVALID_NAME", _manifest.validate_target, "vda\n")


# --------------------------------------------------------------------------- validate_period


@pytest.mark.parametrize("period", ["2026-W48", "2026-11", "2026-11-25", "daily", "a", "0", "x.y_z:1+2-3", "A" * 64])
def test_validate_period_accepts(period):
    assert _manifest.validate_period(period) == period


def test_validate_period_none_means_no_period():
    assert _manifest.validate_period(None) is None


@pytest.mark.parametrize(
    "period",
    ["", "-2026", ".hidden", "_x", "A" * 65, "a/b", "../x", "a b", "2026 W48", "ä", "a*", "a\x00", 2026, ["2026"]],
)
def test_validate_period_rejects(period):
    err = _raises("INVALID_NAME", _manifest.validate_period, period)
    assert "period" in err.msg


def test_validate_period_rejects_trailing_newline():
    _raises("INVALID_NAME", _manifest.validate_period, "2026-W48\n")


# --------------------------------------------------------------------------- normalize_uuid


@pytest.mark.parametrize(
    "text",
    [
        "2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f",
        "2F1C7D6E-1A2B-4C3D-8E9F-0A1B2C3D4E5F",
        "2f1c7d6e1a2b4c3d8e9f0a1b2c3d4e5f",
        "  2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f\n",
        "2f1c7d6e1a2b-4c3d-8e9f0a1b2c3d4e5f",
    ],
)
def test_normalize_uuid(text):
    assert _manifest.normalize_uuid(text) == "2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not-a-uuid",
        "2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5",  # one short
        "2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f0",  # one long
        "gf1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f",
        "{2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f}",
        "urn:uuid:2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f",
        "2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f/..",
        None,
        12345,
    ],
)
def test_normalize_uuid_rejects(text):
    _raises("INVALID_NAME", _manifest.normalize_uuid, text)


# --------------------------------------------------------------------------- dumps / iso


@pytest.mark.parametrize(
    "first, second",
    [
        ({"b": 1, "a": 2}, {"a": 2, "b": 1}),
        ({"z": {"y": [1, {"d": 1, "c": 2}], "x": None}, "a": "é"}, {"a": "é", "z": {"x": None, "y": [1, {"c": 2, "d": 1}]}}),
    ],
)
def test_dumps_is_canonical(first, second):
    data = _manifest.dumps(first)
    assert isinstance(data, bytes)
    assert data == _manifest.dumps(second)
    assert _manifest.sha256_bytes(data) == _manifest.sha256_bytes(_manifest.dumps(second))
    assert data.endswith(b"\n")
    assert json.loads(data.decode("utf-8")) == first


def test_dumps_sorts_keys_and_keeps_utf8():
    data = _manifest.dumps({"b": 1, "a": "é"})
    assert data.index(b'"a"') < data.index(b'"b"')
    assert "é".encode("utf-8") in data  # not \u00e9


def test_sha256_bytes():
    assert _manifest.sha256_bytes(b"abc") == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize(
    "ts, text",
    [
        (T0, "2026-11-25T07:35:12Z"),
        (T0.replace(microsecond=123456), "2026-11-25T07:35:12Z"),
        (dt.datetime(2026, 11, 25, 2, 35, 12, tzinfo=dt.timezone(dt.timedelta(hours=-5))), "2026-11-25T07:35:12Z"),
    ],
)
def test_iso(ts, text):
    assert _manifest.iso(ts) == text
    assert _manifest.parse_iso(text) == ts.replace(microsecond=0)


# --------------------------------------------------------------------------- build / load / validate


def _manifest_kwargs(set_type: str = "full", set_id: str = f"{S0}-001") -> dict:
    incremental = set_type == "incremental"
    method = {"full": "full", "incremental": "incremental", "copy": "copy"}[set_type]
    return dict(
        set_id=set_id,
        vm_uuid="2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f",
        vm_name="web-01",
        host="hv1.example.org",
        started=T0,
        completed=T0 + dt.timedelta(minutes=3, seconds=4),
        set_type=set_type,
        chain_id=None if set_type == "copy" else "0123456789ab",
        parent={"set_id": "20261124T073512Z-001", "manifest_sha256": SHA_C} if incremental else None,
        checkpoint=None if set_type == "copy" else "vmbackup-0123456789ab-1",
        consistency="crash",
        period="2026-W48",
        disks=[
            {"target": "vda", "method": method, "format": "qcow2", "file": "disks/vda.qcow2", "size": 10, "virtual_size": 1 << 30},
            {"target": "vdb", "method": "full" if incremental else method, "format": "raw", "file": "disks/vdb.qcow2", "size": 20,
             "virtual_size": 1 << 29},
        ],
        skipped_disks=[{"target": "sda", "reason": "cdrom device"}],
        files={
            "disks/vda.qcow2": {"size": 10, "sha256": SHA_A},
            "disks/vdb.qcow2": {"size": 20, "sha256": SHA_B},
            "domain.xml": {"size": 5, "sha256": SHA_C},
        },
        tool={"collection": "vmbackup.libvirt", "version": "0.1.0"},
        stats={"bytes": 30},
    )


@pytest.fixture
def manifest() -> dict:
    return _manifest.build_manifest(**_manifest_kwargs())


@pytest.mark.parametrize("set_type", ["full", "incremental", "copy"])
def test_build_manifest_and_loads_round_trip(set_type):
    kwargs = _manifest_kwargs(set_type)
    built = _manifest.build_manifest(**kwargs)
    assert built["format"] == "vmbackup.libvirt/set"
    assert built["format_version"] == 1
    assert built["set_id"] == kwargs["set_id"]
    assert built["type"] == set_type
    assert built["vm"] == {"uuid": kwargs["vm_uuid"], "name": "web-01"}
    assert built["started"] == "2026-11-25T07:35:12Z"
    assert built["completed"] == "2026-11-25T07:38:16Z"
    assert built["parent"] == kwargs["parent"]
    data = _manifest.dumps(built)
    assert _manifest.loads(data, kwargs["set_id"]) == built
    assert _manifest.loads(data) == built
    # The bytes are stable: re-serialising what was loaded hashes the same (parents record this hash).
    assert _manifest.dumps(_manifest.loads(data)) == data


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param({"set_type": "differential"}, "type", id="unknown-type"),
        pytest.param({"set_id": "latest"}, "set_id", id="bad-set-id"),
        pytest.param({"disks": []}, "disks is empty", id="no-disks"),
    ],
)
def test_build_manifest_validates(change, message):
    kwargs = _manifest_kwargs()
    kwargs.update(change)
    err = _raises("REPOSITORY_FORMAT", _manifest.build_manifest, **kwargs)
    assert message in err.msg


def test_validate_manifest_accepts_valid(manifest):
    assert _manifest.validate_manifest(copy.deepcopy(manifest)) == manifest
    assert _manifest.validate_manifest(copy.deepcopy(manifest), f"{S0}-001") == manifest


def _set(path: tuple, value):
    def mutate(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path: tuple):
    def mutate(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


def _add_file(rel: str, entry=None):
    return _set(("files", rel), entry if entry is not None else {"size": 1, "sha256": SHA_A})


def _make_incremental(parent):
    def mutate(m):
        m["type"] = "incremental"
        if parent is _MISSING:
            m.pop("parent", None)
        else:
            m["parent"] = parent

    return mutate


_MISSING = object()

_REJECTIONS = [
    pytest.param(_set(("format",), "vmbackup.libvirt/repository"), "format is", id="wrong-format"),
    pytest.param(_set(("format",), None), "format is", id="null-format"),
    pytest.param(_delete(("format",)), "format is", id="missing-format"),
    pytest.param(_set(("format_version",), 2), "format_version 2 is not supported", id="format-version-2"),
    pytest.param(_set(("format_version",), "1"), "format_version '1' is not supported", id="format-version-string"),
    pytest.param(_delete(("format_version",)), "format_version", id="missing-format-version"),
    pytest.param(_set(("set_id",), "20261125-001"), "set_id is malformed", id="malformed-set-id"),
    pytest.param(_delete(("set_id",)), "set_id is malformed", id="missing-set-id"),
    pytest.param(_set(("type",), "differential"), "type 'differential' is unknown", id="unknown-type"),
    pytest.param(_delete(("vm", "uuid")), "vm.uuid is missing", id="missing-vm-uuid"),
    pytest.param(_set(("vm",), "web-01"), "vm.uuid is missing", id="vm-not-a-mapping"),
    pytest.param(_set(("files",), []), "files is not a mapping", id="files-is-a-list"),
    pytest.param(_add_file("../x"), "escapes the set", id="file-dotdot"),
    pytest.param(_add_file("disks/../../x"), "escapes the set", id="file-dotdot-inside"),
    pytest.param(_add_file(".."), "escapes the set", id="file-just-dotdot"),
    pytest.param(_add_file("/abs"), "escapes the set", id="file-absolute"),
    pytest.param(_add_file("/etc/shadow"), "escapes the set", id="file-absolute-deep"),
    pytest.param(_add_file("./x"), "escapes the set", id="file-dot"),
    pytest.param(_add_file("a//b"), "escapes the set", id="file-empty-component"),
    pytest.param(_add_file("disks/"), "escapes the set", id="file-trailing-slash"),
    pytest.param(_add_file(""), "escapes the set", id="file-empty"),
    pytest.param(_delete(("files", "disks/vda.qcow2", "sha256")), "has no size or sha256", id="missing-sha256"),
    pytest.param(_set(("files", "disks/vda.qcow2", "sha256"), "a" * 63), "has no size or sha256", id="short-sha256"),
    pytest.param(_set(("files", "disks/vda.qcow2", "sha256"), None), "has no size or sha256", id="null-sha256"),
    pytest.param(_delete(("files", "disks/vda.qcow2", "size")), "has no size or sha256", id="missing-size"),
    pytest.param(_set(("files", "disks/vda.qcow2", "size"), "10"), "has no size or sha256", id="size-is-a-string"),
    pytest.param(_set(("files", "domain.xml"), SHA_A), "has no size or sha256", id="entry-not-a-mapping"),
    pytest.param(_set(("disks",), []), "disks is empty", id="empty-disks"),
    pytest.param(_delete(("disks",)), "disks is empty", id="missing-disks"),
    pytest.param(_set(("disks", 0, "method"), "snapshot"), "no valid method", id="unknown-disk-method"),
    pytest.param(_set(("disks", 0), "vda"), "no valid method", id="disk-not-a-mapping"),
    pytest.param(_set(("disks", 1, "file"), "disks/vdc.qcow2"), "'vdb' references a file without a checksum", id="disk-file-not-in-files"),
    pytest.param(_delete(("files", "disks/vda.qcow2")), "'vda' references a file without a checksum", id="disk-file-removed-from-files"),
    pytest.param(_make_incremental(None), "no parent reference", id="incremental-null-parent"),
    pytest.param(_make_incremental(_MISSING), "no parent reference", id="incremental-missing-parent"),
    pytest.param(_make_incremental({"set_id": "20261124T073512Z-001"}), "no parent reference", id="incremental-parent-without-hash"),
    pytest.param(
        _make_incremental({"set_id": "20261124T073512Z-001", "manifest_sha256": "abc"}), "no parent reference", id="incremental-parent-short-hash"
    ),
    pytest.param(_make_incremental({"set_id": "latest", "manifest_sha256": SHA_A}), "no parent reference", id="incremental-parent-bad-set-id"),
    pytest.param(_make_incremental("20261124T073512Z-001"), "no parent reference", id="incremental-parent-is-a-string"),
    # Every field a reader indexes is checked here, so verify and restore never meet a KeyError.
    pytest.param(_delete(("disks", 0, "virtual_size")), "disk vda has no virtual_size", id="missing-virtual-size"),
    pytest.param(_set(("disks", 0, "virtual_size"), "1G"), "disk vda has no virtual_size", id="virtual-size-is-a-string"),
    pytest.param(_set(("disks", 0, "virtual_size"), 0), "disk vda has no virtual_size", id="virtual-size-zero"),
    pytest.param(_set(("disks", 0, "virtual_size"), True), "disk vda has no virtual_size", id="virtual-size-is-a-bool"),
    pytest.param(_delete(("disks", 0, "size")), "disk vda has no size", id="disk-without-size"),
    pytest.param(_set(("disks", 0, "size"), "11"), "disk vda has no size", id="disk-size-is-a-string"),
    pytest.param(_delete(("disks", 0, "target")), "invalid target None", id="disk-without-target"),
    pytest.param(_set(("disks", 0, "target"), "../vda"), "invalid target", id="disk-target-is-a-path"),
    pytest.param(_set(("disks", 1, "target"), "vda"), "disk vda is listed twice", id="disk-listed-twice"),
    pytest.param(_set(("disks", 0, "method"), "copy"), "method copy in a full set", id="method-does-not-fit-type"),
    pytest.param(_set(("disks", 0, "format"), 2), "format that is not a string", id="disk-format-is-a-number"),
    pytest.param(_set(("files", "disks/vda.qcow2", "size"), -1), "has no size or sha256", id="negative-size"),
    pytest.param(_set(("files", "disks/vda.qcow2", "sha256"), "A" * 64), "has no size or sha256", id="uppercase-sha256"),
    pytest.param(_set(("files", "domain.xml", "role"), 1), "role that is not a string", id="role-is-a-number"),
    pytest.param(_set(("vm", "uuid"), "web-01"), "vm.uuid is not a UUID", id="vm-uuid-not-a-uuid"),
    pytest.param(_set(("vm", "name"), ["web-01"]), "vm.name is not a string", id="vm-name-is-a-list"),
    pytest.param(_delete(("completed",)), "completed is not a UTC timestamp", id="missing-completed"),
    pytest.param(_set(("started",), "yesterday"), "started is not a UTC timestamp", id="started-not-a-time"),
    pytest.param(_set(("chain_id",), "xyz"), "chain_id is malformed", id="bad-chain-id"),
    pytest.param(_set(("checkpoint",), 5), "checkpoint is not a string", id="checkpoint-is-a-number"),
    pytest.param(_set(("period",), 5), "period is not a string", id="period-is-a-number"),
    pytest.param(_set(("consistency",), "shutoff"), "consistency 'shutoff' is unknown", id="unknown-consistency"),
    pytest.param(_set(("skipped_disks",), "none"), "skipped_disks is not a list", id="skipped-disks-not-a-list"),
]


@pytest.mark.parametrize("mutate, message", _REJECTIONS)
def test_validate_manifest_rejects(manifest, mutate, message):
    broken = copy.deepcopy(manifest)
    mutate(broken)
    assert broken != manifest
    err = _raises("REPOSITORY_FORMAT", _manifest.validate_manifest, broken, f"{S0}-001")
    assert message in err.msg
    assert f"set {S0}-001" in err.msg
    # A disk without a checksum also names its file (verify reports it as unchecked).
    expected = {"set_id": f"{S0}-001"}
    if "without a checksum" in message:
        (expected["unchecked_file"],) = {d["file"] for d in broken["disks"]} - set(broken["files"])
    assert err.details == expected
    # The same fault is found when the manifest comes from disk.
    err = _raises("REPOSITORY_FORMAT", _manifest.loads, _manifest.dumps(broken))
    assert message in err.msg


@pytest.mark.parametrize("value", [[], "manifest", 1, None])
def test_validate_manifest_rejects_non_objects(value):
    err = _raises("REPOSITORY_FORMAT", _manifest.validate_manifest, value)
    assert "not a JSON object" in err.msg


@pytest.mark.parametrize("directory", [f"{S0}-002", "20261125T073513Z-001", "20251125T073512Z-001"])
def test_validate_manifest_set_id_must_match_directory(manifest, directory):
    err = _raises("REPOSITORY_FORMAT", _manifest.validate_manifest, manifest, directory)
    assert "does not match its directory" in err.msg
    assert err.details["set_id"] == directory
    err = _raises("REPOSITORY_FORMAT", _manifest.loads, _manifest.dumps(manifest), directory)
    assert "does not match its directory" in err.msg


# A manifest is read from disk, so any JSON value may sit in any field; the contract is
# REPOSITORY_FORMAT, never a TypeError traceback.
@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(_set(("set_id",), 20261125), id="set-id-is-a-number"),
        pytest.param(_set(("disks", 0, "file"), ["disks/vda.qcow2"]), id="disk-file-is-a-list"),
        pytest.param(_make_incremental({"set_id": "20261124T073512Z-001", "manifest_sha256": None}), id="parent-hash-null"),
        pytest.param(_make_incremental({"set_id": 1, "manifest_sha256": SHA_A}), id="parent-set-id-is-a-number"),
    ],
)
def test_validate_manifest_wrong_json_types_are_repository_format(manifest, mutate):
    broken = copy.deepcopy(manifest)
    mutate(broken)
    _raises("REPOSITORY_FORMAT", _manifest.loads, _manifest.dumps(broken))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"not json at all", id="text"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b'{"format": "vmbackup.libvirt/set",', id="cut-mid-object"),
        pytest.param(b"[1, 2]", id="json-array"),
        pytest.param(b"null", id="json-null"),
    ],
)
def test_loads_rejects_non_manifests(data):
    err = _raises("REPOSITORY_FORMAT", _manifest.loads, data, f"{S0}-001")
    assert err.details == {"set_id": f"{S0}-001"}
    assert f"{S0}-001" in err.msg


# --------------------------------------------------------------------------- series
@pytest.mark.parametrize("series", ["default", "weekly", "monthly", "offsite-1", "a", "0", "x_y", "a" * 32])
def test_validate_series_accepts(series):
    assert _manifest.validate_series(series) == series


@pytest.mark.parametrize("series", ["", "Weekly", "-weekly", "_x", "a" * 33, "week ly", "week/ly", "weekly\n", None, 7])
def test_validate_series_rejects(series):
    err = _raises("INVALID_NAME", _manifest.validate_series, series)
    assert "series" in err.msg


def test_a_manifest_without_series_is_in_the_default_series():
    m = _manifest.build_manifest(**_manifest_kwargs())
    del m["series"]
    assert _manifest.validate_manifest(m) is m
    assert _manifest.series_of(m) == "default"


def test_a_manifest_records_its_series():
    kwargs = _manifest_kwargs()
    kwargs["series"] = "monthly"
    assert _manifest.series_of(_manifest.build_manifest(**kwargs)) == "monthly"


@pytest.mark.parametrize("bad", ["Monthly", "", 3, "a" * 33])
def test_a_manifest_with_a_bad_series_is_refused(bad):
    m = _manifest.build_manifest(**_manifest_kwargs())
    m["series"] = bad
    err = _raises("REPOSITORY_FORMAT", _manifest.validate_manifest, m)
    assert "series" in err.msg
