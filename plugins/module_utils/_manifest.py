# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The backup set manifest (format version 1): names, ids, serialisation and validation.

Pure logic, no I/O beyond hashing bytes. This module is private to the vmbackup.libvirt
collection; it is not a public API.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import typing as t
import uuid

from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

MANIFEST_FORMAT = "vmbackup.libvirt/set"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"

SET_TYPES = ("full", "incremental", "copy")
# full: data of a disk on its own (chain base); incremental: changed clusters over the same
# disk of the parent set; copy: a shut-off VM's disk copied with qemu-img (full, no checkpoint).
DISK_METHODS = ("full", "incremental", "copy")

_SET_ID_RE = re.compile(r"^(\d{8}T\d{6}Z)-(\d{3})$")
_CHAIN_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_CHECKPOINT_RE = re.compile(r"^vmbackup-([0-9a-f]{12})-(\d+)$")
# Disk targets become file names; libvirt's own targets (vda, sdb, hdc, xvdaa, ...) fit this.
_TARGET_RE = re.compile(r"^[a-z]{1,4}[a-z0-9]{0,12}$")
_PERIOD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}$")
# A series names one schedule's chains (weekly, monthly, offsite): a label in reports and metrics.
_SERIES_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
DEFAULT_SERIES = "default"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CONSISTENCY = ("crash", "application")
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(ts: dt.datetime) -> str:
    """An ISO 8601 UTC timestamp with second precision, e.g. 2026-11-25T07:35:12Z."""
    return ts.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def new_set_id(now: dt.datetime, existing: t.Iterable[str]) -> str:
    """A set id for ``now`` that sorts after every id in ``existing`` and is unique among them.

    Ids are ``YYYYMMDDTHHMMSSZ-NNN``: UTC time plus a sequence for runs in the same second.
    If the clock went backwards, the id still sorts last, so "newest" never depends on mtimes.
    """
    stamp = now.astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    existing = sorted(existing)
    last = existing[-1] if existing else None
    if last is not None and last[:16] >= stamp:
        seq = int(last[17:]) + 1
        if seq > 999:
            raise VmBackupError("INVALID_ARGUMENT", "more than 999 sets in one second")
        return f"{last[:16]}-{seq:03d}"
    return f"{stamp}-001"


def is_set_id(text: str) -> bool:
    return bool(isinstance(text, str) and _SET_ID_RE.fullmatch(text))


def new_chain_id() -> str:
    return uuid.uuid4().hex[:12]


def checkpoint_name(chain_id: str, seq: int) -> str:
    """Our checkpoints carry the collection prefix and the chain, so foreign ones are never touched."""
    if not _CHAIN_ID_RE.fullmatch(chain_id) or seq < 0:
        raise ValueError(f"bad chain id {chain_id!r} or sequence {seq!r}")
    return f"vmbackup-{chain_id}-{seq}"


def parse_checkpoint_name(name: str) -> tuple[str, int] | None:
    """(chain_id, seq) for a checkpoint of this collection, None for any other name."""
    match = _CHECKPOINT_RE.fullmatch(name) if isinstance(name, str) else None
    if not match:
        return None
    return match.group(1), int(match.group(2))


def validate_target(target: str) -> str:
    if not isinstance(target, str) or not _TARGET_RE.fullmatch(target):
        raise VmBackupError("INVALID_NAME", f"disk target {target!r} is not a valid disk target name (like vda, sdb)")
    return target


def validate_period(period: str | None) -> str | None:
    if period is None:
        return None
    if not isinstance(period, str) or not _PERIOD_RE.fullmatch(period):
        raise VmBackupError(
            "INVALID_NAME",
            f"period {period!r} is not valid: 1-64 characters of letters, digits and . _ : + -, such as 2026-W48",
        )
    return period


def validate_series(series: str) -> str:
    if not isinstance(series, str) or not _SERIES_RE.fullmatch(series):
        raise VmBackupError(
            "INVALID_NAME",
            f"series {series!r} is not valid: 1-32 lower-case letters, digits, _ and -, starting with a letter or digit, such as weekly",
        )
    return series


def series_of(manifest: dict[str, t.Any]) -> str:
    """The series a set belongs to; sets written before series existed are in ``default``."""
    return manifest.get("series") or DEFAULT_SERIES


def normalize_uuid(text: str) -> str:
    if not isinstance(text, str) or not _UUID_RE.fullmatch(text.strip()):
        raise VmBackupError("INVALID_NAME", f"{text!r} is not a UUID")
    return str(uuid.UUID(text.strip()))


def dumps(data: dict[str, t.Any]) -> bytes:
    """Canonical JSON bytes: sorted keys, so equal content hashes equally."""
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_manifest(
    *,
    set_id: str,
    vm_uuid: str,
    vm_name: str,
    host: str,
    started: dt.datetime,
    completed: dt.datetime,
    set_type: str,
    chain_id: str | None,
    parent: dict[str, str] | None,
    checkpoint: str | None,
    consistency: str,
    period: str | None,
    disks: list[dict[str, t.Any]],
    series: str = DEFAULT_SERIES,
    skipped_disks: list[dict[str, t.Any]],
    files: dict[str, dict[str, t.Any]],
    tool: dict[str, t.Any],
    stats: dict[str, t.Any],
) -> dict[str, t.Any]:
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "set_id": set_id,
        "vm": {"uuid": vm_uuid, "name": vm_name},
        "host": host,
        "started": iso(started),
        "completed": iso(completed),
        "type": set_type,
        "chain_id": chain_id,
        "parent": parent,
        "checkpoint": checkpoint,
        "consistency": consistency,
        "period": period,
        "series": series,
        "disks": disks,
        "skipped_disks": skipped_disks,
        "files": files,
        "tool": tool,
        "stats": stats,
    }
    validate_manifest(manifest)
    return manifest


def _require(cond: bool, what: str, set_id: str | None, **details: t.Any) -> None:
    if not cond:
        where = f" of set {set_id}" if set_id else ""
        raise VmBackupError("REPOSITORY_FORMAT", f"manifest{where} is invalid: {what}", set_id=set_id, **details)


def _is_count(value: t.Any) -> bool:
    """A non-negative integer from JSON (``true`` is not a size)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value: t.Any) -> bool:
    return isinstance(value, str) and bool(_SHA256_RE.fullmatch(value))


_TIMESTAMP_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")


def _is_timestamp(value: t.Any) -> bool:
    """What parse_iso reads; the form is checked first (strptime is slow on thousands of manifests)."""
    if not isinstance(value, str) or not _TIMESTAMP_RE.fullmatch(value):
        return False
    try:
        dt.datetime.fromisoformat(value[:-1])
    except ValueError:
        return False
    return True


# Which disk methods each set type may hold: a full or incremental set copies raw disks in full.
_METHODS_OF_TYPE = {"full": ("full",), "incremental": ("incremental", "full"), "copy": ("copy",)}


def validate_manifest(m: t.Any, expected_set_id: str | None = None) -> dict[str, t.Any]:
    """Check every field of a parsed manifest that the collection reads; raise REPOSITORY_FORMAT
    naming the first fault. After this, readers may index the fields without further checks."""
    sid = expected_set_id
    _require(isinstance(m, dict), "not a JSON object", sid)
    _require(m.get("format") == MANIFEST_FORMAT, f"format is {m.get('format')!r}", sid)
    _require(
        m.get("format_version") == MANIFEST_VERSION,
        f"format_version {m.get('format_version')!r} is not supported (this collection reads {MANIFEST_VERSION})",
        sid,
    )
    _require(is_set_id(m.get("set_id")), "set_id is malformed", sid)
    if expected_set_id is not None:
        _require(m["set_id"] == expected_set_id, f"set_id {m['set_id']!r} does not match its directory", sid)
    _require(m.get("type") in SET_TYPES, f"type {m.get('type')!r} is unknown", sid)
    vm = m.get("vm")
    _require(isinstance(vm, dict) and "uuid" in vm, "vm.uuid is missing", sid)
    _require(isinstance(vm["uuid"], str) and bool(_UUID_RE.fullmatch(vm["uuid"])), "vm.uuid is not a UUID", sid)
    _require(vm.get("name") is None or isinstance(vm.get("name"), str), "vm.name is not a string", sid)
    for key in ("started", "completed"):
        _require(_is_timestamp(m.get(key)), f"{key} is not a UTC timestamp like 2026-11-25T07:35:12Z", sid)
    _require(m.get("chain_id") is None or bool(isinstance(m["chain_id"], str) and _CHAIN_ID_RE.fullmatch(m["chain_id"])),
             "chain_id is malformed", sid)
    _require(m.get("checkpoint") is None or isinstance(m["checkpoint"], str), "checkpoint is not a string", sid)
    _require(m.get("period") is None or isinstance(m["period"], str), "period is not a string", sid)
    _require(m.get("series") is None or (isinstance(m["series"], str) and bool(_SERIES_RE.fullmatch(m["series"]))),
             f"series {m.get('series')!r} is not a valid series name", sid)
    _require(m.get("consistency") in CONSISTENCY, f"consistency {m.get('consistency')!r} is unknown", sid)
    _require(isinstance(m.get("skipped_disks", []), list), "skipped_disks is not a list", sid)
    files = m.get("files")
    _require(isinstance(files, dict), "files is not a mapping", sid)
    for rel, entry in files.items():
        _require(_is_safe_relpath(rel), f"file path {rel!r} escapes the set", sid)
        _require(
            isinstance(entry, dict) and _is_count(entry.get("size")) and _is_sha256(entry.get("sha256")),
            f"file {rel!r} has no size or sha256",
            sid,
        )
        _require(entry.get("role") is None or isinstance(entry["role"], str), f"file {rel!r} has a role that is not a string", sid)
    disks = m.get("disks")
    _require(isinstance(disks, list) and disks, "disks is empty", sid)
    targets = set()
    for disk in disks:
        _require(isinstance(disk, dict) and disk.get("method") in DISK_METHODS, "a disk has no valid method", sid)
        target = disk.get("target")
        _require(isinstance(target, str) and bool(_TARGET_RE.fullmatch(target)), f"a disk has an invalid target {target!r}", sid)
        _require(target not in targets, f"disk {target} is listed twice", sid)
        targets.add(target)
        _require(
            isinstance(disk.get("file"), str) and disk["file"] in files,
            f"disk {target!r} references a file without a checksum",
            sid,
            unchecked_file=disk.get("file"),
        )
        _require(disk["method"] in _METHODS_OF_TYPE[m["type"]],
                 f"disk {target} has method {disk['method']} in a {m['type']} set", sid)
        _require(_is_count(disk.get("virtual_size")) and disk["virtual_size"] > 0,
                 f"disk {target} has no virtual_size", sid)
        _require(_is_count(disk.get("size")), f"disk {target} has no size", sid)
        _require(disk.get("format") is None or isinstance(disk["format"], str), f"disk {target} has a format that is not a string", sid)
    if m["type"] == "incremental":
        parent = m.get("parent")
        _require(
            isinstance(parent, dict) and is_set_id(parent.get("set_id")) and _is_sha256(parent.get("manifest_sha256")),
            "an incremental set has no parent reference",
            sid,
        )
    return m


def _is_safe_relpath(rel: t.Any) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def loads(data: bytes, expected_set_id: str | None = None) -> dict[str, t.Any]:
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise VmBackupError(
            "REPOSITORY_FORMAT", f"manifest of set {expected_set_id} is not valid JSON: {exc}", set_id=expected_set_id
        ) from None
    return validate_manifest(parsed, expected_set_id)
