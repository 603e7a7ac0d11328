# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""A read-only view of a VM's committed sets: parent links, chains and the points they serve.

This module is private to the vmbackup.libvirt collection; it is not a public API.

A *point* is a committed set. Restoring point k of a disk reads the disk's chain: the run of
sets from k back to the nearest set in which that disk was stored whole (method ``full`` or
``copy``). Each link of the chain is a child's record of its parent: the parent's set id and
the sha256 of the parent's manifest bytes (a hash chain). Nothing here writes anything.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import typing as t

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

WHOLE_METHODS = ("full", "copy")


@dataclasses.dataclass
class SetEntry:
    """One committed set: its manifest (None when unreadable) and the sha256 of its bytes."""

    set_id: str
    manifest: dict[str, t.Any] | None
    manifest_sha256: str | None
    error: VmBackupError | None = None

    @property
    def series(self) -> str | None:
        """The set's series (``default`` for sets older than series); None when unreadable."""
        return _manifest.series_of(self.manifest) if self.manifest is not None else None

    @property
    def parent_id(self) -> str | None:
        parent = (self.manifest or {}).get("parent")
        return parent.get("set_id") if isinstance(parent, dict) else None

    def disk(self, target: str) -> dict[str, t.Any] | None:
        for disk in (self.manifest or {}).get("disks", []):
            if disk.get("target") == target:
                return disk
        return None


@dataclasses.dataclass
class Link:
    """A fault in the link from ``child`` to its parent (CHAIN_BROKEN)."""

    child: str
    parent: str | None
    msg: str


class Catalog:
    """The committed sets of one VM in one repository, loaded once."""

    def __init__(self, repo: repo_mod.Repository, vm_uuid: str) -> None:
        self.repo = repo
        self.vm_uuid = vm_uuid
        self.sets: dict[str, SetEntry] = {}
        committed, self._sidecars = repo.read_committed(vm_uuid)
        for set_id, data in committed:
            if isinstance(data, VmBackupError):
                self.sets[set_id] = SetEntry(set_id, None, None, data)
                continue
            sha = _manifest.sha256_bytes(data)
            try:
                self.sets[set_id] = SetEntry(set_id, _manifest.loads(data, set_id), sha)
            except VmBackupError as exc:
                self.sets[set_id] = SetEntry(set_id, None, sha, exc)
        self._children: dict[str, list[str]] = {}
        for entry in self.sets.values():
            if entry.parent_id is not None:
                self._children.setdefault(entry.parent_id, []).append(entry.set_id)

    # ------------------------------------------------------------------ names and points
    def vm_name(self) -> str | None:
        """The VM's name as the newest readable manifest records it."""
        for entry in reversed(list(self.sets.values())):
            if entry.manifest is not None:
                return entry.manifest.get("vm", {}).get("name")
        return None

    def ids(self) -> list[str]:
        return list(self.sets)

    def manifests(self, series: str | None = None) -> list[dict[str, t.Any]]:
        """The readable manifests, oldest first, of one series or of all (an unreadable set is verify's to report)."""
        return [entry.manifest for entry in self.sets.values()
                if entry.manifest is not None and (series is None or entry.series == series)]

    def series_names(self) -> list[str]:
        """The series that have a readable set, sorted."""
        return sorted({entry.series for entry in self.sets.values() if entry.series is not None})

    def latest(self, series: str | None = None) -> str | None:
        """The newest set id; of one series, the newest readable set of that series."""
        if series is None:
            return next(reversed(self.sets), None)
        return next((sid for sid in reversed(self.sets) if self.sets[sid].series == series), None)

    def verdict(self, set_id: str) -> dict[str, t.Any] | None:
        """The last verify verdict recorded beside ``set_id`` (its sidecar), None when never verified.

        An unreadable sidecar reads as ``{"outcome": "unreadable"}``: not a pass.
        """
        if set_id not in self._sidecars:  # none when the sets were listed: never verified
            return None
        return repo_mod.parse_verify_sidecar(self._sidecars[set_id])

    def as_of(self, when: dt.datetime) -> str | None:
        """The newest set completed at or before ``when``.

        Set ids start with the UTC start time, so ids after ``when`` are skipped outright; the
        manifest's completion time decides for the rest (a set is a point when it completed).
        """
        for set_id in reversed(self.ids()):
            entry = self.sets[set_id]
            # A valid manifest has a completion time; an unreadable one is ordered by its id.
            completed = _manifest.parse_iso(entry.manifest["completed"]) if entry.manifest else set_id_time(set_id)
            if completed <= when:
                return set_id
        return None

    # ------------------------------------------------------------------ links and chains
    def descendants(self, set_id: str) -> list[str]:
        """Every set that names ``set_id`` as an ancestor by set id, sorted (whatever the hashes say)."""
        found, todo = set(), [set_id]
        while todo:
            for child in self._children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return sorted(found)

    def link_fault(self, set_id: str) -> Link | None:
        """What is wrong with the link from ``set_id`` to its parent, or None (also for a chain base)."""
        entry = self.sets[set_id]
        m = entry.manifest
        if m is None or m["type"] != "incremental":
            return None
        parent_ref = m["parent"]
        pid = parent_ref["set_id"]
        parent = self.sets.get(pid)
        if parent is None:
            return Link(set_id, pid, f"parent set {pid} of set {set_id} is missing (not a committed set)")
        if parent.manifest_sha256 != parent_ref["manifest_sha256"]:
            return Link(set_id, pid, f"the manifest of set {pid} differs from what its child {set_id} recorded "
                                     "(edited or replaced after the child was taken)")
        if parent.manifest is None:
            return Link(set_id, pid, f"the manifest of parent set {pid} is unreadable")
        if parent.manifest.get("chain_id") != m.get("chain_id"):
            return Link(set_id, pid, f"set {set_id} (chain {m.get('chain_id')}) names parent {pid} of another chain "
                                     f"({parent.manifest.get('chain_id')})")
        for disk in m["disks"]:
            if disk["method"] != "incremental":
                continue
            base = parent.disk(disk["target"])
            if base is None:
                return Link(set_id, pid, f"disk {disk['target']} of set {set_id} is incremental but parent {pid} has no such disk")
            if base.get("virtual_size") != disk.get("virtual_size"):
                return Link(set_id, pid, f"disk {disk['target']} changed size between set {pid} and set {set_id}")
        return None

    def sets_of_chain(self, set_id: str) -> list[str]:
        """Set ids from the chain base to ``set_id`` (base first); CHAIN_BROKEN naming the first bad link.

        Walking from the point towards the base, the first fault met is reported: it is the one
        nearest the point, so the message names the newest set that cannot be restored past it.
        """
        if set_id not in self.sets:
            raise VmBackupError("SET_NOT_FOUND", f"set {set_id} is not a committed set of VM {self.vm_uuid}", set_id=set_id)
        chain = [set_id]
        current = set_id
        while True:
            entry = self.sets[current]
            if entry.manifest is None:
                raise VmBackupError("REPOSITORY_FORMAT", entry.error.msg if entry.error else f"set {current} is unreadable",
                                    set_id=current, affected=self._affected(set_id, current))
            fault = self.link_fault(current)
            if fault is not None:
                raise VmBackupError("CHAIN_BROKEN", fault.msg, set_id=fault.child, parent=fault.parent,
                                    affected=[current] + self.descendants(current))
            if entry.manifest["type"] != "incremental":
                return list(reversed(chain))
            current = entry.parent_id
            if current in chain:  # a loop cannot come from export; refuse rather than spin
                raise VmBackupError("CHAIN_BROKEN", f"set {set_id}'s chain loops at {current}", set_id=set_id)
            chain.append(current)

    def disk_chain(self, point: str, target: str) -> list[tuple[str, dict[str, t.Any]]]:
        """(set id, disk entry) pairs whose files, base first, compose ``target`` at ``point``.

        Assumes ``sets_of_chain(point)`` passed: links and manifests are sound.
        """
        out: list[tuple[str, dict[str, t.Any]]] = []
        current: str | None = point
        while current is not None:
            entry = self.sets[current]
            disk = entry.disk(target)
            if disk is None:
                raise VmBackupError("CHAIN_BROKEN", f"disk {target} is missing from set {current} of the chain of {point}",
                                    set_id=current)
            out.append((current, disk))
            if disk["method"] in WHOLE_METHODS:
                return list(reversed(out))
            current = entry.parent_id
        raise VmBackupError("CHAIN_BROKEN", f"disk {target} of set {point} has no full base", set_id=point)

    def points_using(self, set_id: str, target: str | None) -> list[str]:
        """Points whose restore reads a file of ``set_id``: the set itself, plus, for a disk file,
        each later point whose chain for that disk passes through ``set_id``."""
        affected = [set_id]
        if target is None:
            return affected
        for later in self.descendants(set_id):
            current: str | None = later
            while current is not None and current != set_id:
                entry = self.sets.get(current)
                disk = entry.disk(target) if entry is not None else None
                if disk is None or disk.get("method") in WHOLE_METHODS:
                    current = None
                else:
                    current = entry.parent_id
            if current == set_id:
                affected.append(later)
        return affected

    def _affected(self, point: str, broken: str) -> list[str]:
        return [broken] + self.descendants(broken) if broken != point else [point] + self.descendants(point)


def set_id_time(set_id: str) -> dt.datetime:
    return dt.datetime.strptime(set_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)


def parse_as_of(text: str) -> dt.datetime:
    """An ``as_of`` value: ISO 8601 with a zone (``2026-11-25T07:00:00Z``, ``+01:00``) or a naive
    time taken as UTC; a date alone means the end of that day in UTC."""
    if not isinstance(text, str) or not text.strip():
        raise VmBackupError("INVALID_ARGUMENT", "as_of must be an ISO 8601 time such as 2026-11-25T07:00:00Z")
    value = text.strip()
    try:
        date_only = re.fullmatch(r"(\d{4})-?(\d{2})-?(\d{2})", value)
        if date_only:
            day = dt.date(*(int(g) for g in date_only.groups()))
            return dt.datetime.combine(day, dt.time(23, 59, 59), tzinfo=dt.timezone.utc)
        parsed = dt.datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
    except ValueError:
        raise VmBackupError("INVALID_ARGUMENT", f"as_of {text!r} is not an ISO 8601 time such as 2026-11-25T07:00:00Z") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    try:
        return parsed.astimezone(dt.timezone.utc)
    except OverflowError:  # 9999-12-31T23:59:59-23:59 is past the last representable UTC time
        raise VmBackupError("INVALID_ARGUMENT", f"as_of {text!r} is out of range once converted to UTC") from None


def validate_selection(name: str | None, vm_uuid: str | None, series: str | None = None) -> str | None:
    """Check a request's VM (at most one of name and uuid) and series before anything is read;
    returns the normalised uuid (None when not given)."""
    if name is not None and vm_uuid is not None:
        raise VmBackupError("INVALID_ARGUMENT", "give at most one of name and uuid")
    if name is not None and (not name or "\x00" in name):
        raise VmBackupError("INVALID_NAME", "name must be a non-empty string without NUL characters")
    if series is not None:
        _manifest.validate_series(series)
    return _manifest.normalize_uuid(vm_uuid) if vm_uuid is not None else None


def vm_uuids(repo: repo_mod.Repository) -> list[str]:
    """UUIDs of the VMs that have a directory in the repository."""
    root = os.path.join(repo.path, "vms")
    if not os.path.isdir(root):
        return []
    out = []
    for entry in os.scandir(root):
        try:
            if entry.is_dir(follow_symlinks=False) and _manifest.normalize_uuid(entry.name) == entry.name:
                out.append(entry.name)
        except VmBackupError:
            continue
    return sorted(out)


def resolve_vms(repo: repo_mod.Repository, name: str | None, vm_uuid: str | None) -> list[Catalog]:
    """Catalogs of the VMs a request names: by UUID, by the name the newest manifest records,
    or every VM of the repository when neither is given. The VM need not exist in libvirt."""
    if vm_uuid is not None:
        vm_uuid = _manifest.normalize_uuid(vm_uuid)
        catalog = Catalog(repo, vm_uuid)
        if not catalog.sets:
            raise VmBackupError("SET_NOT_FOUND", f"VM {vm_uuid} has no committed set in repository {repo.path}")
        return [catalog]
    catalogs = [Catalog(repo, u) for u in vm_uuids(repo)]
    if name is None:
        return catalogs
    named = [c for c in catalogs if c.vm_name() == name]
    if not named:
        raise VmBackupError("SET_NOT_FOUND", f"no VM named {name!r} has a committed set in repository {repo.path}")
    return named


def resolve_vm_uuids(repo: repo_mod.Repository, name: str | None, vm_uuid: str | None) -> list[str]:
    """The UUIDs ``resolve_vms`` would give, with the same errors, reading manifests only where a name
    must be matched: by UUID a listing of ``sets/`` is enough, for every VM the listing of ``vms/``.
    For a caller that reads the catalogs afterwards anyway (prune, under the VMs' locks): each
    manifest is read and validated once, not twice."""
    if vm_uuid is not None:
        vm_uuid = _manifest.normalize_uuid(vm_uuid)
        if not repo.set_ids(vm_uuid):  # the same committed sets Catalog reads (Repository.read_committed)
            raise VmBackupError("SET_NOT_FOUND", f"VM {vm_uuid} has no committed set in repository {repo.path}")
        return [vm_uuid]
    if name is None:
        return vm_uuids(repo)
    return [c.vm_uuid for c in resolve_vms(repo, name, None)]


# ---------------------------------------------------------------------- drill proofs (sets/<set-id>.drill.json)
DRILL_PROOF_FORMAT = "vmbackup.libvirt/drill"
DRILL_PROOF_SUFFIX = ".drill.json"
DRILL_OUTCOMES = ("ok", "failed", "error")


def parse_drill_proof(raw: bytes | None) -> dict[str, t.Any]:
    """A drill proof's content; ``{"outcome": "unreadable"}`` for bytes that are not a proof of this
    collection's format (never a pass)."""
    try:
        data = json.loads(raw.decode("utf-8")) if raw is not None else None
    except (ValueError, UnicodeDecodeError):
        return {"outcome": "unreadable"}
    if not isinstance(data, dict) or data.get("format") != DRILL_PROOF_FORMAT or data.get("outcome") not in DRILL_OUTCOMES:
        return {"outcome": "unreadable"}
    return data


def drill_proofs(catalog: Catalog) -> dict[str, dict[str, t.Any]]:
    """set id -> its drill proof, for the committed sets of ``catalog`` that have one (an orphan proof,
    whose set is gone, is prune's to remove and is not shown)."""
    raw = repo_mod.read_sidecars(catalog.repo, catalog.vm_uuid, DRILL_PROOF_SUFFIX)
    return {sid: parse_drill_proof(data) for sid, data in raw.items() if sid in catalog.sets}


def newest_drill(proofs: dict[str, dict[str, t.Any]], outcome: str | None = None) -> tuple[str, dict[str, t.Any]] | None:
    """(set id, proof) of the drill that completed last (of one ``outcome``, or any readable one); None without any.
    Ordered by the proof's completion time (UTC, ISO 8601 with Z: they sort as text), then by set id."""
    readable = [(p.get("completed") if isinstance(p.get("completed"), str) else "", sid, p) for sid, p in proofs.items()
                if p.get("outcome") in DRILL_OUTCOMES and (outcome is None or p.get("outcome") == outcome)]
    if not readable:
        return None
    _when, sid, proof = max(readable, key=lambda x: (x[0], x[1]))
    return sid, proof
