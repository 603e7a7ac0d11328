# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The verify backend: prove that committed sets are whole, and record the verdict beside them.

This module is private to the vmbackup.libvirt collection; it is not a public API.

Checks, per set: the manifest parses and has this collection's format; every file it lists
exists with its size and sha256 (streamed, files in parallel); every disk image passes
``qemu-img check``; the link to the parent is sound (the parent is committed and its manifest
hashes to what the child recorded). A finding names the file and the set, and lists every point
(set) whose restore would read the damaged part. ``level: restore`` also reads every point
through its whole backing chain. The verdict goes to ``sets/<set-id>.verify.json``, never into
the committed set.

For schedules (a nightly verify), :func:`select` decides which sets need reading at all: a set
whose verdict is current (``outcome: ok``, recorded for the manifest it has now, at a level at
least the one asked of it, younger than ``skip_verified_within``) is skipped and its sidecar left
as it is, so a run over an unchanged repository reads nothing. ``restore_points: newest`` asks
``level: restore`` only of the newest point of each VM and series. The selection is a pure
function of the sets' views and the clock. A skip is withdrawn when a finding of the run affects
the skipped set (a damaged set it builds on), or when a later point does not read through a
chain that holds it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import errno
import hashlib
import json
import os
import socket
import stat
import threading
import time
import typing as t

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _retention
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._catalog import Catalog, resolve_vms, validate_selection
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._lock import VmLock, validate_timeout
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import Backend
from ansible_collections.vmbackup.libvirt.plugins.module_utils._progress import Phases, Progress, human_bytes
from ansible_collections.vmbackup.libvirt.plugins.module_utils._qemu_img import chain_spec

SIDECAR_FORMAT = "vmbackup.libvirt/verify"
SIDECAR_VERSION = 1
LEVELS = ("data", "restore")
RESTORE_POINTS = ("all", "newest")
MIB = 1024 * 1024
# Reads into one 64 KiB buffer per file: it stays in the CPU cache between read and hash, and a
# small buffer comes from the heap (a multi-MiB one is a fresh mmap per file, measured slower).
_CHUNK = 64 * 1024
# Progress is counted in batches of this many bytes (a lock and a clock read per 64 KiB would cost
# more than the line is worth).
_PROGRESS_BATCH = 8 * MIB
# Severity order of codes when one must be reported for many findings.
_CODE_ORDER = ("REPOSITORY_FORMAT", "CHAIN_BROKEN", "FILE_MISSING", "SIZE_MISMATCH", "CHECKSUM_MISMATCH", "IMAGE_INVALID", "IO_ERROR")


@dataclasses.dataclass
class VerifyParams:
    repository: str
    name: str | None = None
    uuid: str | None = None
    set_id: str | None = None
    level: str = "data"
    workers: int | None = None
    fail_on_error: bool = True
    record: bool = True
    lock_timeout: float = 60.0
    allow_unsafe_permissions: bool = False
    series: str | None = None
    skip_verified_within: t.Any = None  # a duration (see parse_duration); parsed by validate_params
    restore_points: str = "all"


@dataclasses.dataclass
class FileJob:
    """One file a set's manifest lists, to be checked against its recorded size and sha256."""

    vm_uuid: str
    set_id: str
    rel: str
    path: str
    size: int
    sha256: str
    target: str | None  # the disk target when the file is a disk image


@dataclasses.dataclass
class FileOutcome:
    job: FileJob
    code: str | None  # None when the file is sound
    msg: str
    bytes_read: int
    seconds: float


def sha256_stream(path: str, progress: Progress | None = None, stop: threading.Event | None = None) -> tuple[str, int]:
    """Streamed sha256 and size of a file, not through a link in its place; memory does not grow
    with the file. ``progress`` (thread-safe) gets the bytes read as they are hashed; ``stop``,
    once set, ends the read early (InterruptedError): the run was cancelled."""
    digest = hashlib.sha256()
    size = pending = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while True:
            n = os.readv(fd, [buf])
            if not n:
                break
            digest.update(view[:n])
            size += n
            pending += n
            if pending >= _PROGRESS_BATCH:
                if progress is not None:
                    progress.add(pending)
                pending = 0
                if stop is not None and stop.is_set():
                    raise InterruptedError(errno.EINTR, "stopped", path)
    finally:
        os.close(fd)
        if progress is not None and pending:
            progress.add(pending)
    return digest.hexdigest(), size


def check_file(job: FileJob, progress: Progress | None = None, stop: threading.Event | None = None) -> FileOutcome:
    """Size first (cheap), then a streamed sha256; memory does not grow with the file."""
    started = time.monotonic()

    def outcome(code: str | None, msg: str, read: int = 0) -> FileOutcome:
        return FileOutcome(job, code, msg, read, time.monotonic() - started)

    try:
        st = os.lstat(job.path)
    except FileNotFoundError:
        return outcome("FILE_MISSING", f"{job.rel} of set {job.set_id} is missing")
    except OSError as exc:
        return outcome("IO_ERROR", f"cannot stat {job.rel} of set {job.set_id}: {exc.strerror}")
    if not stat.S_ISREG(st.st_mode):
        return outcome("FILE_MISSING", f"{job.rel} of set {job.set_id} is not a regular file")
    if st.st_size != job.size:
        return outcome("SIZE_MISMATCH", f"{job.rel} of set {job.set_id} has {st.st_size} bytes, the manifest says {job.size}")
    try:
        digest, read = sha256_stream(job.path, progress, stop)
    except OSError as exc:
        return outcome("IO_ERROR", f"cannot read {job.rel} of set {job.set_id}: {exc.strerror}")
    if read != job.size:
        return outcome("SIZE_MISMATCH", f"{job.rel} of set {job.set_id} changed size while it was read", read)
    if digest != job.sha256:
        return outcome("CHECKSUM_MISMATCH", f"{job.rel} of set {job.set_id} has sha256 {digest}, the manifest says {job.sha256}", read)
    return outcome(None, "ok", read)


def check_files(jobs: list[FileJob], workers: int, progress: Progress | None = None,
                then: t.Callable[[FileOutcome], None] | None = None) -> list[FileOutcome]:
    """Check files in parallel, largest first so that one big disk does not start last.
    hashlib and reads release the GIL, so threads scale with cores.

    ``then`` runs in the calling thread on each outcome as soon as it is known (verify's
    ``qemu-img check`` of an image), while the workers hash the next files. Outcomes come back
    in the order of the jobs (largest first), whatever order they finished in.
    """
    ordered = sorted(jobs, key=lambda j: j.size, reverse=True)
    if not ordered:
        return []
    if len(ordered) == 1 and then is None:
        return [check_file(ordered[0], progress)]
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(ordered))))
    try:
        futures = [pool.submit(check_file, job, progress, stop) for job in ordered]
        for future in concurrent.futures.as_completed(futures):
            if then is not None:
                then(future.result())
        return [f.result() for f in futures]
    finally:
        # A cancel (or a failure in ``then``) does not wait for every queued file: the queued
        # ones are dropped and the running ones stop at their next batch.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def file_jobs(catalog: Catalog, set_id: str) -> list[FileJob]:
    """A job for every file the set's manifest lists."""
    manifest = catalog.sets[set_id].manifest
    set_dir = catalog.repo.set_dir(catalog.vm_uuid, set_id)
    disk_of = {d["file"]: d["target"] for d in manifest["disks"]}
    return [
        FileJob(catalog.vm_uuid, set_id, rel, os.path.join(set_dir, rel), entry["size"], entry["sha256"], disk_of.get(rel))
        for rel, entry in sorted(manifest["files"].items())
    ]


def unlisted_files(catalog: Catalog, set_id: str) -> list[str]:
    """Files in the set directory that its manifest does not list (they are never read)."""
    manifest = catalog.sets[set_id].manifest
    set_dir = catalog.repo.set_dir(catalog.vm_uuid, set_id)
    found = []
    for root, _dirs, names in os.walk(set_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), set_dir)
            if rel != _manifest.MANIFEST_NAME and rel not in manifest["files"]:
                found.append(rel)
    return sorted(found)


# ---------------------------------------------------------------------- durations
def parse_duration(value: t.Any, option: str = "duration") -> dt.timedelta:
    """``14d``, ``36h``, ``2w``, ``90m``, ``1w2d`` or a bare number (of days, also a YAML number) -> timedelta:
    retention's syntax (one parser for the collection), and here it must be more than zero.
    INVALID_ARGUMENT names ``option``."""
    try:
        delta = _retention.parse_duration(value)
    except VmBackupError as exc:
        raise VmBackupError("INVALID_ARGUMENT", f"{option}: {exc.msg}") from None
    if delta <= dt.timedelta(0):
        raise VmBackupError("INVALID_ARGUMENT", f"{option} must be a positive duration, not {value!r}")
    return delta


def format_duration(delta: dt.timedelta) -> str:
    """A short human duration, truncated: the largest unit and the next when not zero (``8d 2h``,
    ``3h 5m``, ``7d``, ``12s``)."""
    seconds = max(0, int(delta.total_seconds()))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for i, (unit, size) in enumerate(units):
        if seconds >= size or unit == "s":
            text = f"{seconds // size}{unit}"
            if i + 1 < len(units):
                nxt, nsize = units[i + 1]
                rest = seconds % size // nsize
                if rest:
                    text += f" {rest}{nxt}"
            return text
    return "0s"  # not reached


# ---------------------------------------------------------------------- which sets to read
# A verdict dated this far in the future still counts (clocks of hosts sharing a repository
# differ a little); further ahead it is not trusted and the set is checked again.
CLOCK_TOLERANCE = dt.timedelta(minutes=5)
_LEVEL_RANK = {level: rank for rank, level in enumerate(LEVELS)}


@dataclasses.dataclass(frozen=True)
class SetView:
    """What the selection needs to know of one set in scope."""

    set_id: str
    series: str | None  # None when the manifest is unreadable
    manifest_sha256: str | None
    link_fault: str | None = None  # why the link to its parent is broken, None when sound (or a base)
    verdict: dict[str, t.Any] | None = None  # its sidecar as read, None when never verified

    @property
    def readable(self) -> bool:
        return self.series is not None


@dataclasses.dataclass
class Choice:
    """The decision for one set: read it (``check``) at ``level``, or leave it (``skip``), and why."""

    set_id: str
    level: str
    action: str  # check | skip
    reason: str
    verified: str | None = None  # a skipped set's standing verdict time


def asked_levels(views: list[SetView], level: str, restore_points: str) -> dict[str, str]:
    """The level asked of each set: with level restore and restore_points newest, only the newest
    readable point of each series reads its whole chain; every other set gets data."""
    if level != "restore" or restore_points == "all":
        return {v.set_id: level for v in views}
    newest: dict[str, str] = {}
    for view in views:
        if view.readable and view.set_id > newest.get(view.series, ""):
            newest[view.series] = view.set_id
    chosen = set(newest.values())
    return {v.set_id: "restore" if v.set_id in chosen else "data" for v in views}


def verdict_standing(view: SetView, level: str, within: dt.timedelta, now: dt.datetime) -> tuple[bool, str]:
    """(True, why) when the set's verdict makes reading it again unnecessary; else (False, why it is read).

    Current means: a verdict of this collection's format with outcome ok, recorded for the manifest
    the set has now, at a level at least ``level``, younger than ``within``, and the link to the
    parent still sound (the parent's manifest may have changed since). A failed verdict is never
    current: the set is read again until it passes.
    """
    if not view.readable:
        return False, "its manifest is unreadable"
    if view.link_fault is not None:
        return False, f"its link to its parent is broken ({view.link_fault})"
    v = view.verdict
    if v is None:
        return False, "never verified"
    if v.get("outcome") == "unreadable":
        return False, "its verdict file is unreadable"
    if v.get("format") != SIDECAR_FORMAT or v.get("format_version") != SIDECAR_VERSION:
        return False, "its verdict file is not in this collection's format"
    if v.get("outcome") != "ok":
        codes = v.get("codes") if isinstance(v.get("codes"), list) else []
        detail = f" ({', '.join(str(c) for c in codes)})" if codes else ""
        return False, f"its last verdict is {v.get('outcome')!s}{detail}; a failed set is checked again"
    if not view.manifest_sha256 or v.get("manifest_sha256") != view.manifest_sha256:
        return False, "its manifest changed since its last verdict"
    if _LEVEL_RANK.get(v.get("level"), -1) < _LEVEL_RANK[level]:
        return False, f"its last verdict is at level {v.get('level')}, level {level} is asked of it"
    try:
        verified = _manifest.parse_iso(v.get("verified"))
    except (TypeError, ValueError):
        return False, "its verdict has no valid time"
    age = now - verified
    if age < -CLOCK_TOLERANCE:
        return False, f"its last verdict is dated in the future ({v['verified']}): the clock went back"
    if age >= within:
        return False, f"its last verdict ({v['verified']}) is {format_duration(age)} old, not within {format_duration(within)}"
    return True, (f"verified ok at level {v['level']} {format_duration(age)} ago ({v['verified']}), within "
                  f"{format_duration(within)}; manifest unchanged")


def select(views: list[SetView], level: str, restore_points: str, within: dt.timedelta | None,
           now: dt.datetime) -> list[Choice]:
    """Decide, for each set in scope (oldest first), whether to read it and at which level.

    Without ``within`` every set is read (the run is a full verify). Skipping a set never hides
    it from the chain checks of the others: the caller still sees it in the catalog, a restore
    read of a later point reads its files, and a finding there withdraws the skip.
    """
    levels = asked_levels(views, level, restore_points)
    out = []
    for view in views:
        asked = levels[view.set_id]
        if within is None:
            out.append(Choice(view.set_id, asked, "check", "skip_verified_within is not set"))
            continue
        current, why = verdict_standing(view, asked, within, now)
        if current:
            out.append(Choice(view.set_id, asked, "skip", why, verified=view.verdict["verified"]))
        else:
            out.append(Choice(view.set_id, asked, "check", why))
    return out


def validate_params(p: VerifyParams) -> str:
    path = repo_mod.validate_repository_path(p.repository)
    p.uuid = validate_selection(p.name, p.uuid)
    if p.set_id is not None and not _manifest.is_set_id(p.set_id):
        raise VmBackupError("INVALID_NAME", f"set_id {p.set_id!r} is not a set id (like 20261125T073512Z-001)")
    if p.level not in LEVELS:
        raise VmBackupError("INVALID_ARGUMENT", f"level {p.level!r} is not one of {', '.join(LEVELS)}")
    if p.workers is not None and p.workers < 1:
        raise VmBackupError("INVALID_ARGUMENT", "workers must be 1 or more")
    validate_timeout(p.lock_timeout)
    if p.series is not None:
        _manifest.validate_series(p.series)
    if p.restore_points not in RESTORE_POINTS:
        raise VmBackupError("INVALID_ARGUMENT", f"restore_points {p.restore_points!r} is not one of {', '.join(RESTORE_POINTS)}")
    if p.skip_verified_within is not None and not isinstance(p.skip_verified_within, dt.timedelta):
        p.skip_verified_within = parse_duration(p.skip_verified_within, "skip_verified_within")
    return path


def open_for_reading(path: str, allow_unsafe_permissions: bool) -> repo_mod.Repository:
    """An existing repository, trusted like a target (UNSAFE_TARGET: a link, another owner or a
    directory others can write on its path), since restore defines a VM from what it holds.
    REPOSITORY_NOT_FOUND for a path that holds no repository (a typo, an unmounted share),
    REPOSITORY_FORMAT only for a marker this collection cannot read."""
    return repo_mod.open_repository(path, allow_unsafe_permissions)


class Verifier(Backend):
    """Checks committed sets and records a verdict beside each."""

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.findings: list[dict[str, t.Any]] = []
        self.phases = Phases()
        self.progress = Progress(None, "verify", 0)

    def run(self) -> dict[str, t.Any]:
        started = time.monotonic()
        self.phases = Phases()
        repo = open_for_reading(validate_params(self.p), self.p.allow_unsafe_permissions)
        if self.p.level != "restore" and self.p.restore_points != "all":
            self.warnings.append(f"restore_points={self.p.restore_points} has no effect with level=data")
        catalogs = resolve_vms(repo, self.p.name, self.p.uuid)
        scope = self._scope(catalogs)
        locks = []
        try:
            if not self.check_mode:
                # Readers share the lock; an export or prune of the same VM waits for them.
                for catalog in catalogs:
                    if scope[catalog.vm_uuid]:
                        lock = VmLock(repo.lock_path(catalog.vm_uuid), self.p.lock_timeout, "verify", shared=True)
                        lock.acquire()
                        locks.append(lock)
                # Under the lock, read the sets (and their verdicts) again: they may have changed while we waited.
                catalogs = [Catalog(repo, c.vm_uuid) for c in catalogs]
                scope = self._scope(catalogs)
            choices = self._select(catalogs, scope)
            read_started = time.monotonic()
            # Everything before the reading: trust checks, catalogs, the lock (waiting included), the selection.
            self.phases.add("plan", read_started - started)
            outcomes: list[FileOutcome] = []
            chain_read: dict[tuple[str, str], int] = {}
            todo = self._to_check(choices)
            self.progress = Progress(self.log, self._what(catalogs), 0)
            self._announce(catalogs, choices, todo)
            while any(todo.values()):
                outcomes += self._check_until_settled(catalogs, choices, todo)
                with self.phases.phase("chain"):
                    read, unread = self._compose(catalogs, choices, done=set(chain_read))
                chain_read.update(read)
                # A point that does not read through its chain: the sets of that chain lose their skip,
                # so that the damaged file itself is found (the point's finding only says it does not read).
                todo = self._withdraw(choices, [
                    (vm_uuid, chain, f"skip withdrawn: point {point} does not read through its chain, which holds this set")
                    for vm_uuid, point, chain in unread])
            bytes_read = sum(o.bytes_read for o in outcomes) + sum(chain_read.values())
            read_seconds = time.monotonic() - read_started
            self.progress.finish()
            with self.phases.phase("record"):
                sets = self._set_results(catalogs, choices, outcomes, chain_read)
                written = [] if self.check_mode or not self.p.record else self._record(catalogs, sets)
        finally:
            for lock in locks:
                lock.release()
        result = self._result(sets, written, bytes_read, read_seconds, time.monotonic() - started)
        if result["outcome"] != "ok" and self.p.fail_on_error:
            details = dict(result)
            raise VmBackupError(details.pop("error_code"), details.pop("msg"), **details)
        result.pop("error_code", None)
        return result

    def _what(self, catalogs: list[Catalog]) -> str:
        """How the progress lines name this run: the VM (or how many), the level."""
        if len(catalogs) == 1:
            who = catalogs[0].vm_name() or catalogs[0].vm_uuid
        else:
            who = f"{len(catalogs)} VMs"
        return f"verify {who} ({self.p.level})"

    def _announce(self, catalogs: list[Catalog], choices: dict[str, dict[str, Choice]], todo: dict[str, list[str]]) -> None:
        """One line before the reading starts: what will be read (the progress lines follow)."""
        if self.log is None:
            return
        checked = sum(len(v) for v in todo.values())
        skipped = sum(1 for per_vm in choices.values() for c in per_vm.values() if c.action == "skip")
        size = sum(j.size for c in catalogs for sid in todo.get(c.vm_uuid, []) if c.sets[sid].manifest is not None
                   for j in file_jobs(c, sid))
        text = (f"{self.progress.what}: {checked} sets to check ({human_bytes(size)} of files), {skipped} skipped, "
                f"workers {self.p.workers or os.cpu_count() or 1}")
        try:
            self.log(text)
        except Exception:  # pylint: disable=broad-exception-caught
            pass  # the log is a courtesy (as in Progress)

    # ------------------------------------------------------------------ what to check
    def _scope(self, catalogs: list[Catalog]) -> dict[str, list[str]]:
        """Set ids in scope per VM, oldest first: all (of the series), or one point with every ancestor it reads.

        With a series, an unreadable set is in every series' scope (its series cannot be told, and
        it may be a point of this one): it is reported, never silently left out.
        """
        scope: dict[str, list[str]] = {}
        for catalog in catalogs:
            if self.p.set_id is None:
                scope[catalog.vm_uuid] = [sid for sid in catalog.ids()
                                          if self.p.series is None or catalog.sets[sid].series in (self.p.series, None)]
            elif self.p.set_id in catalog.sets and self.p.series in (None, catalog.sets[self.p.set_id].series):
                ids, current = [], self.p.set_id
                while current in catalog.sets and current not in ids:
                    ids.append(current)
                    current = catalog.sets[current].parent_id
                scope[catalog.vm_uuid] = sorted(ids)
            else:
                scope[catalog.vm_uuid] = []
        if self.p.set_id is not None and not any(scope.values()):
            of_series = f" of series {self.p.series}" if self.p.series is not None else ""
            raise VmBackupError("SET_NOT_FOUND", f"set {self.p.set_id} is not a committed set{of_series} in repository "
                                f"{self.p.repository}", set_id=self.p.set_id)
        if self.p.series is not None and not any(catalog.sets[sid].series == self.p.series
                                                 for catalog in catalogs for sid in scope[catalog.vm_uuid]):
            # A mistyped series would otherwise verify nothing, successfully, every night.
            raise VmBackupError("SET_NOT_FOUND", f"no committed set of series {self.p.series} in repository {self.p.repository}"
                                + (f" for VM {self.p.name or self.p.uuid}" if self.p.name or self.p.uuid else ""))
        return scope

    def _select(self, catalogs: list[Catalog], scope: dict[str, list[str]]) -> dict[str, dict[str, Choice]]:
        """Per VM, per set in scope: check or skip, at which level, and why (see select())."""
        now = _manifest.utcnow()
        choices: dict[str, dict[str, Choice]] = {}
        for catalog in catalogs:
            views = []
            for set_id in scope[catalog.vm_uuid]:
                entry = catalog.sets[set_id]
                fault = catalog.link_fault(set_id) if entry.manifest is not None else None
                # Without skipping, no sidecar needs reading.
                verdict = catalog.verdict(set_id) if self.p.skip_verified_within is not None else None
                views.append(SetView(set_id, entry.series, entry.manifest_sha256, fault.msg if fault else None, verdict))
            picked = select(views, self.p.level, self.p.restore_points, self.p.skip_verified_within, now)
            choices[catalog.vm_uuid] = {c.set_id: c for c in picked}
        return choices

    @staticmethod
    def _to_check(choices: dict[str, dict[str, Choice]]) -> dict[str, list[str]]:
        return {vm: [sid for sid, c in per_vm.items() if c.action == "check"] for vm, per_vm in choices.items()}

    @staticmethod
    def _withdraw(choices: dict[str, dict[str, Choice]], suspects: list[tuple[str, list[str], str]]) -> dict[str, list[str]]:
        """Turn the skipped sets among ``suspects`` ((vm, set ids, why) triples) into checks; returns them per VM."""
        withdrawn: dict[str, list[str]] = {}
        for vm_uuid, set_ids, reason in suspects:
            for set_id in set_ids:
                choice = choices.get(vm_uuid, {}).get(set_id)
                if choice is not None and choice.action == "skip":
                    choice.action, choice.verified, choice.reason = "check", None, reason
                    withdrawn.setdefault(vm_uuid, []).append(set_id)
        return withdrawn

    def _check_until_settled(self, catalogs: list[Catalog], choices: dict[str, dict[str, Choice]],
                             first: dict[str, list[str]]) -> list[FileOutcome]:
        """Check the sets in ``first``; a skipped set that a finding affects (a damaged file of a set
        it builds on) loses its skip and is checked too, until no finding reaches a skipped set."""
        outcomes: list[FileOutcome] = []
        todo = first
        while any(todo.values()):
            outcomes += self._check(catalogs, {c.vm_uuid: sorted(todo.get(c.vm_uuid, [])) for c in catalogs})
            todo = self._withdraw(choices, [
                (f["vm_uuid"], f["affected"], f"skip withdrawn: a {f['code']} finding in set {f['set_id']} affects it")
                for f in self.findings])
        return outcomes

    def _find(self, catalog: Catalog, code: str, set_id: str, msg: str, affected: list[str], file: str | None = None,
              **extra: t.Any) -> None:
        finding = {"code": code, "vm_uuid": catalog.vm_uuid, "set_id": set_id, "file": file, "msg": msg, "affected": affected}
        finding.update(extra)
        self.findings.append(finding)

    # ------------------------------------------------------------------ the checks
    def _check(self, catalogs: list[Catalog], scope: dict[str, list[str]]) -> list[FileOutcome]:
        jobs: list[FileJob] = []
        for catalog in catalogs:
            for set_id in scope[catalog.vm_uuid]:
                entry = catalog.sets[set_id]
                if entry.manifest is None:
                    error = entry.error
                    unchecked = error.details.get("unchecked_file") if error else None
                    code = "CHECKSUM_MISMATCH" if unchecked else "REPOSITORY_FORMAT"
                    self._find(catalog, code, set_id, error.msg if error else "unreadable manifest",
                               [set_id] + catalog.descendants(set_id), file=unchecked or _manifest.MANIFEST_NAME)
                    continue
                fault = catalog.link_fault(set_id)
                if fault is not None:
                    self._find(catalog, "CHAIN_BROKEN", set_id, fault.msg, [set_id] + catalog.descendants(set_id),
                               file=_manifest.MANIFEST_NAME, parent=fault.parent)
                for rel in unlisted_files(catalog, set_id):
                    self.warnings.append(f"set {set_id} holds {rel}, which its manifest does not list (it is never read)")
                jobs.extend(file_jobs(catalog, set_id))

        def image_check(out: FileOutcome) -> None:
            # In this thread, while the workers hash the next files.
            if out.code is None and out.job.target is not None:
                problem = self._image_check(out.job.path)
                if problem:
                    out.code, out.msg = "IMAGE_INVALID", f"qemu-img check of {out.job.rel} of set {out.job.set_id} failed: {problem}"

        self.progress.total += sum(j.size for j in jobs)
        with self.phases.phase("hash"):
            outcomes = check_files(jobs, self.p.workers or os.cpu_count() or 1, self.progress, then=image_check)
        by_uuid = {c.vm_uuid: c for c in catalogs}
        for out in outcomes:
            job = out.job
            catalog = by_uuid[job.vm_uuid]
            if out.code is not None:
                self._find(catalog, out.code, job.set_id, out.msg, catalog.points_using(job.set_id, job.target), file=job.rel)
        return outcomes

    def _image_check(self, path: str) -> str | None:
        rc, out, err = self.qemu_img.run_raw(["check", "-f", "qcow2", "--output=json", path])
        # rc 3: leaked clusters only; they waste space but every cluster still reads correctly.
        if rc in (0, 3):
            if rc == 3:
                self.warnings.append(f"{path} has leaked clusters (harmless, reported by qemu-img check)")
            return None
        try:
            data = json.loads(out)
            return f"{data.get('corruptions', '?')} corruptions, {data.get('check-errors', '?')} check errors"
        except ValueError:
            return (err or out).strip()[:300] or f"rc={rc}"

    def _compose(self, catalogs: list[Catalog], choices: dict[str, dict[str, Choice]], done: set[tuple[str, str]]
                 ) -> tuple[dict[tuple[str, str], int], list[tuple[str, str, list[str]]]]:
        """Each checked point asked at level restore is read through its backing chains, as restore
        will (files of skipped sets included: the chain is read whole). Returns the bytes read per
        point (not those in ``done``, read before), and (vm, point, set ids of the chain) for each
        disk that did not read."""
        failed = {(f["vm_uuid"], s) for f in self.findings for s in f["affected"]}
        read: dict[tuple[str, str], int] = {}
        unread: list[tuple[str, str, list[str]]] = []
        for catalog in catalogs:
            for point, choice in choices[catalog.vm_uuid].items():
                key = (catalog.vm_uuid, point)
                if choice.action != "check" or choice.level != "restore" or key in failed or key in done:
                    continue  # a failed point is already known to be unrestorable; do not pile up findings
                total = 0
                self.progress.total += sum(d["size"] for disk in catalog.sets[point].manifest["disks"]
                                           for _sid, d in catalog.disk_chain(point, disk["target"]))
                for disk in catalog.sets[point].manifest["disks"]:
                    chain = catalog.disk_chain(point, disk["target"])
                    files = [os.path.join(catalog.repo.set_dir(catalog.vm_uuid, sid), d["file"]) for sid, d in chain]
                    try:
                        self.qemu_img.read_all(chain_spec(files), int(disk["virtual_size"]))
                    except VmBackupError as exc:
                        self._find(catalog, "IMAGE_INVALID", point, f"disk {disk['target']} of point {point} does not read "
                                   f"through its chain: {exc.msg}", [point], file=disk["file"])
                        unread.append((catalog.vm_uuid, point, [sid for sid, _d in chain if sid != point]))
                    total += sum(d["size"] for _sid, d in chain)
                    self.progress.add(sum(d["size"] for _sid, d in chain))
                read[key] = total
        return read, unread

    # ------------------------------------------------------------------ verdicts
    def _set_results(self, catalogs: list[Catalog], choices: dict[str, dict[str, Choice]], outcomes: list[FileOutcome],
                     chain_read: dict[tuple[str, str], int]) -> list[dict[str, t.Any]]:
        per_set: dict[tuple[str, str], list[FileOutcome]] = {}
        for out in outcomes:
            per_set.setdefault((out.job.vm_uuid, out.job.set_id), []).append(out)
        results = []
        for catalog in catalogs:
            for set_id, choice in choices[catalog.vm_uuid].items():
                entry = catalog.sets[set_id]
                checked = choice.action == "check"
                mine = [f for f in self.findings if f["vm_uuid"] == catalog.vm_uuid and set_id in f["affected"]]
                done = per_set.get((catalog.vm_uuid, set_id), [])
                read = sum(o.bytes_read for o in done)
                seconds = sum(o.seconds for o in done)
                results.append({
                    "vm_uuid": catalog.vm_uuid,
                    "vm_name": (entry.manifest or {}).get("vm", {}).get("name") or catalog.vm_name(),
                    "set_id": set_id,
                    "type": (entry.manifest or {}).get("type"),
                    "series": entry.series,
                    "action": "checked" if checked else "skipped",
                    "reason": choice.reason,
                    "level": choice.level,
                    # A skipped set keeps the verdict it had (ok, current); findings always withdraw a skip.
                    "outcome": "failed" if mine else "ok",
                    "codes": sorted({f["code"] for f in mine}, key=_code_rank),
                    "findings": mine,
                    "files_checked": len(done),
                    "bytes_read": read,
                    "chain_bytes_read": chain_read.get((catalog.vm_uuid, set_id), 0),
                    "duration_s": round(seconds, 3),
                    "throughput_mib_s": round(read / MIB / seconds, 1) if seconds > 0 and read else None,
                    "verified": choice.verified,
                    "manifest_sha256": entry.manifest_sha256,
                })
        return results

    def _record(self, catalogs: list[Catalog], sets: list[dict[str, t.Any]]) -> list[str]:
        """Write the verdict of each checked set beside it (sets/<set-id>.verify.json); the set stays
        untouched, and so does the sidecar of a skipped set (its time must not move)."""
        repos = {c.vm_uuid: c.repo for c in catalogs}
        now = _manifest.iso(_manifest.utcnow())
        written = []
        for res in sets:
            if res["action"] != "checked":
                continue
            repo = repos[res["vm_uuid"]]
            path = os.path.join(repo.sets_dir(res["vm_uuid"]), f"{res['set_id']}.verify.json")
            sidecar = {
                "format": SIDECAR_FORMAT,
                "format_version": SIDECAR_VERSION,
                "set_id": res["set_id"],
                "verified": now,
                "host": socket.gethostname(),
                "level": res["level"],  # the level this set was read at, not the run's (restore_points: newest)
                "outcome": res["outcome"],
                "codes": res["codes"],
                "findings": res["findings"],
                "manifest_sha256": res["manifest_sha256"],
                "bytes_read": res["bytes_read"],
            }
            repo_mod.write_file_atomic(path, _manifest.dumps(sidecar), repo_mod.FILE_MODE)
            res["verified"] = now
            written.append(path)
        return written

    def _result(self, sets, written, bytes_read, read_seconds, seconds) -> dict[str, t.Any]:
        checked = [s for s in sets if s["action"] == "checked"]
        skipped = [s for s in sets if s["action"] == "skipped"]
        failed = [s for s in checked if s["outcome"] != "ok"]
        findings = sorted(self.findings, key=lambda f: (f["vm_uuid"], f["set_id"], _code_rank(f["code"]), f["file"] or ""))
        # Each finding is listed once, at the top; a set refers to those that affect it by index
        # (a bit flip in a full would otherwise be copied into every point of its chain).
        index = {id(f): i for i, f in enumerate(findings)}
        sets = [dict({k: v for k, v in s.items() if k != "findings"}, finding_refs=sorted(index[id(f)] for f in s["findings"]))
                for s in sets]
        # A real run records a verdict beside every set it checks: that is the change check mode
        # predicts. Skipped sets are not written, so a run that skips everything changes nothing.
        changed = bool(checked) and self.p.record if self.check_mode else bool(written)
        result: dict[str, t.Any] = {
            "changed": changed,
            "outcome": "failed" if failed else "ok",
            "level": self.p.level,
            "restore_points": self.p.restore_points,
            "series": self.p.series,
            "sets": sets,
            "findings": findings,
            "sets_checked": len(checked),
            "sets_skipped": len(skipped),
            "sets_ok": len(checked) - len(failed),
            "sets_failed": len(failed),
            "checked_sets": [s["set_id"] for s in checked],
            "skipped_sets": [s["set_id"] for s in skipped],
            "failed_sets": [s["set_id"] for s in failed],
            "bytes_read": bytes_read,
            "duration_s": round(seconds, 3),
            "throughput_mib_s": round(bytes_read / MIB / read_seconds, 1) if read_seconds > 0 and bytes_read else None,
            "workers": self.p.workers or os.cpu_count() or 1,
            "sidecars": written,
            "timings": self.phases.public(),
        }
        skip_note = f", {len(skipped)} skipped (verified within {format_duration(self.p.skip_verified_within)})" if skipped else ""
        if failed:
            first = findings[0]
            result["error_code"] = first["code"]
            result["msg"] = (f"{len(failed)} of {len(checked)} checked sets failed verification{skip_note}; first: {first['code']} "
                             f"{first['msg']} (affects {', '.join(first['affected'])})")
        else:
            result["msg"] = (f"{len(checked)} sets verified ({self.p.level}){skip_note}: {bytes_read} bytes read "
                             f"in {seconds:.1f}s")
        return result


def _code_rank(code: str) -> int:
    return _CODE_ORDER.index(code) if code in _CODE_ORDER else len(_CODE_ORDER)
