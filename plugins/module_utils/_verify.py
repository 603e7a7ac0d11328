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
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import socket
import stat
import time
import typing as t

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._catalog import Catalog, resolve_vms
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._lock import VmLock, validate_timeout
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import Backend
from ansible_collections.vmbackup.libvirt.plugins.module_utils._qemu_img import chain_spec

SIDECAR_FORMAT = "vmbackup.libvirt/verify"
SIDECAR_VERSION = 1
LEVELS = ("data", "restore")
MIB = 1024 * 1024
_CHUNK = 4 * MIB
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


def check_file(job: FileJob) -> FileOutcome:
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
        digest, read = repo_mod.sha256_file(job.path)
    except OSError as exc:
        return outcome("IO_ERROR", f"cannot read {job.rel} of set {job.set_id}: {exc.strerror}")
    if read != job.size:
        return outcome("SIZE_MISMATCH", f"{job.rel} of set {job.set_id} changed size while it was read", read)
    if digest != job.sha256:
        return outcome("CHECKSUM_MISMATCH", f"{job.rel} of set {job.set_id} has sha256 {digest}, the manifest says {job.sha256}", read)
    return outcome(None, "ok", read)


def check_files(jobs: list[FileJob], workers: int) -> list[FileOutcome]:
    """Check files in parallel, largest first so that one big disk does not start last.
    hashlib and reads release the GIL, so threads scale with cores."""
    ordered = sorted(jobs, key=lambda j: j.size, reverse=True)
    if workers <= 1 or len(ordered) <= 1:
        return [check_file(j) for j in ordered]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check_file, ordered))


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


def validate_params(p: VerifyParams) -> str:
    path = repo_mod.validate_repository_path(p.repository)
    if p.name is not None and p.uuid is not None:
        raise VmBackupError("INVALID_ARGUMENT", "give at most one of name and uuid")
    if p.name is not None and (not p.name or "\x00" in p.name):
        raise VmBackupError("INVALID_NAME", "name must be a non-empty string without NUL characters")
    if p.uuid is not None:
        p.uuid = _manifest.normalize_uuid(p.uuid)
    if p.set_id is not None and not _manifest.is_set_id(p.set_id):
        raise VmBackupError("INVALID_NAME", f"set_id {p.set_id!r} is not a set id (like 20261125T073512Z-001)")
    if p.level not in LEVELS:
        raise VmBackupError("INVALID_ARGUMENT", f"level {p.level!r} is not one of {', '.join(LEVELS)}")
    if p.workers is not None and p.workers < 1:
        raise VmBackupError("INVALID_ARGUMENT", "workers must be 1 or more")
    validate_timeout(p.lock_timeout)
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

    def run(self) -> dict[str, t.Any]:
        started = time.monotonic()
        repo = open_for_reading(validate_params(self.p), self.p.allow_unsafe_permissions)
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
                # Under the lock, read the sets again: they may have changed while we waited.
                catalogs = [Catalog(repo, c.vm_uuid) for c in catalogs]
                scope = self._scope(catalogs)
            read_started = time.monotonic()
            outcomes = self._check(catalogs, scope)
            bytes_read = sum(o.bytes_read for o in outcomes)
            if self.p.level == "restore":
                bytes_read += self._compose(catalogs, scope)
            read_seconds = time.monotonic() - read_started
            sets = self._set_results(catalogs, scope, outcomes)
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

    # ------------------------------------------------------------------ what to check
    def _scope(self, catalogs: list[Catalog]) -> dict[str, list[str]]:
        """Set ids to check per VM: all, or one point with every ancestor it reads."""
        scope: dict[str, list[str]] = {}
        for catalog in catalogs:
            if self.p.set_id is None:
                scope[catalog.vm_uuid] = catalog.ids()
            elif self.p.set_id in catalog.sets:
                ids, current = [], self.p.set_id
                while current in catalog.sets and current not in ids:
                    ids.append(current)
                    current = catalog.sets[current].parent_id
                scope[catalog.vm_uuid] = sorted(ids)
            else:
                scope[catalog.vm_uuid] = []
        if self.p.set_id is not None and not any(scope.values()):
            raise VmBackupError("SET_NOT_FOUND", f"set {self.p.set_id} is not a committed set in repository {self.p.repository}",
                                set_id=self.p.set_id)
        return scope

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
        outcomes = check_files(jobs, self.p.workers or os.cpu_count() or 1)
        by_uuid = {c.vm_uuid: c for c in catalogs}
        for out in outcomes:
            job = out.job
            catalog = by_uuid[job.vm_uuid]
            if out.code is None and job.target is not None:
                problem = self._image_check(job.path)
                if problem:
                    out.code, out.msg = "IMAGE_INVALID", f"qemu-img check of {job.rel} of set {job.set_id} failed: {problem}"
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

    def _compose(self, catalogs: list[Catalog], scope: dict[str, list[str]]) -> int:
        """level=restore: read every sound point through its backing chain, as restore will."""
        failed = {(f["vm_uuid"], s) for f in self.findings for s in f["affected"]}
        read = 0
        for catalog in catalogs:
            for point in scope[catalog.vm_uuid]:
                if (catalog.vm_uuid, point) in failed:
                    continue  # already known to be unrestorable; do not pile up findings
                for disk in catalog.sets[point].manifest["disks"]:
                    chain = catalog.disk_chain(point, disk["target"])
                    files = [os.path.join(catalog.repo.set_dir(catalog.vm_uuid, sid), d["file"]) for sid, d in chain]
                    try:
                        self.qemu_img.read_all(chain_spec(files), int(disk["virtual_size"]))
                    except VmBackupError as exc:
                        self._find(catalog, "IMAGE_INVALID", point, f"disk {disk['target']} of point {point} does not read "
                                   f"through its chain: {exc.msg}", [point], file=disk["file"])
                    read += sum(d["size"] for _sid, d in chain)
        return read

    # ------------------------------------------------------------------ verdicts
    def _set_results(self, catalogs: list[Catalog], scope: dict[str, list[str]], outcomes: list[FileOutcome]) -> list[dict[str, t.Any]]:
        per_set: dict[tuple[str, str], list[FileOutcome]] = {}
        for out in outcomes:
            per_set.setdefault((out.job.vm_uuid, out.job.set_id), []).append(out)
        results = []
        for catalog in catalogs:
            for set_id in scope[catalog.vm_uuid]:
                entry = catalog.sets[set_id]
                mine = [f for f in self.findings if f["vm_uuid"] == catalog.vm_uuid and set_id in f["affected"]]
                done = per_set.get((catalog.vm_uuid, set_id), [])
                read = sum(o.bytes_read for o in done)
                seconds = sum(o.seconds for o in done)
                results.append({
                    "vm_uuid": catalog.vm_uuid,
                    "vm_name": (entry.manifest or {}).get("vm", {}).get("name") or catalog.vm_name(),
                    "set_id": set_id,
                    "type": (entry.manifest or {}).get("type"),
                    "outcome": "failed" if mine else "ok",
                    "codes": sorted({f["code"] for f in mine}, key=_code_rank),
                    "findings": mine,
                    "files_checked": len(done),
                    "bytes_read": read,
                    "duration_s": round(seconds, 3),
                    "throughput_mib_s": round(read / MIB / seconds, 1) if seconds > 0 and read else None,
                    "manifest_sha256": entry.manifest_sha256,
                })
        return results

    def _record(self, catalogs: list[Catalog], sets: list[dict[str, t.Any]]) -> list[str]:
        """Write each verdict beside its set (sets/<set-id>.verify.json); the set stays untouched."""
        repos = {c.vm_uuid: c.repo for c in catalogs}
        now = _manifest.iso(_manifest.utcnow())
        written = []
        for res in sets:
            repo = repos[res["vm_uuid"]]
            path = os.path.join(repo.sets_dir(res["vm_uuid"]), f"{res['set_id']}.verify.json")
            sidecar = {
                "format": SIDECAR_FORMAT,
                "format_version": SIDECAR_VERSION,
                "set_id": res["set_id"],
                "verified": now,
                "host": socket.gethostname(),
                "level": self.p.level,
                "outcome": res["outcome"],
                "codes": res["codes"],
                "findings": res["findings"],
                "manifest_sha256": res["manifest_sha256"],
                "bytes_read": res["bytes_read"],
            }
            repo_mod.write_file_atomic(path, _manifest.dumps(sidecar), repo_mod.FILE_MODE)
            written.append(path)
        return written

    def _result(self, sets, written, bytes_read, read_seconds, seconds) -> dict[str, t.Any]:
        failed = [s for s in sets if s["outcome"] != "ok"]
        findings = sorted(self.findings, key=lambda f: (f["vm_uuid"], f["set_id"], _code_rank(f["code"]), f["file"] or ""))
        # Each finding is listed once, at the top; a set refers to those that affect it by index
        # (a bit flip in a full would otherwise be copied into every point of its chain).
        index = {id(f): i for i, f in enumerate(findings)}
        sets = [dict({k: v for k, v in s.items() if k != "findings"}, finding_refs=sorted(index[id(f)] for f in s["findings"]))
                for s in sets]
        # A real run records a verdict beside every set it checks: that is the change check mode predicts.
        changed = bool(sets) and self.p.record if self.check_mode else bool(written)
        result: dict[str, t.Any] = {
            "changed": changed,
            "outcome": "failed" if failed else "ok",
            "level": self.p.level,
            "sets": sets,
            "findings": findings,
            "sets_checked": len(sets),
            "sets_ok": len(sets) - len(failed),
            "sets_failed": len(failed),
            "failed_sets": [s["set_id"] for s in failed],
            "bytes_read": bytes_read,
            "duration_s": round(seconds, 3),
            "throughput_mib_s": round(bytes_read / MIB / read_seconds, 1) if read_seconds > 0 and bytes_read else None,
            "workers": self.p.workers or os.cpu_count() or 1,
            "sidecars": written,
        }
        if failed:
            first = findings[0]
            result["error_code"] = first["code"]
            result["msg"] = (f"{len(failed)} of {len(sets)} sets failed verification; first: {first['code']} {first['msg']} "
                             f"(affects {', '.join(first['affected'])})")
        else:
            result["msg"] = f"{len(sets)} sets verified ({self.p.level}): {bytes_read} bytes read in {seconds:.1f}s"
        return result


def _code_rank(code: str) -> int:
    return _CODE_ORDER.index(code) if code in _CODE_ORDER else len(_CODE_ORDER)
