# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The export backend: decide what backup to take (plan), then take and commit it (execute).

This module is private to the vmbackup.libvirt collection; it is not a public API.

``Exporter.run()`` observes (VM, disks, repository, parent), decides (type and reason), and
only then acts, under one check-mode gate. Every side effect of a failed run is undone before
the error propagates; a run killed outright leaves staging data and a checkpoint that the next
run recognises (``run.json`` in the staging directory) and removes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import errno
import hashlib
import json
import math
import os
import socket
import stat
import threading
import time
import typing as t

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _libvirt as lv
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _quiesce
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._catalog import Catalog
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._lock import VmLock, validate_timeout
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import Backend
from ansible_collections.vmbackup.libvirt.plugins.module_utils._progress import Phases, Progress

try:  # the incremental pull-mode copier (libnbd: python3-libnbd)
    from ansible_collections.vmbackup.libvirt.plugins.module_utils import _nbd
except ImportError:  # pragma: no cover - the collection always ships it
    _nbd = None  # type: ignore[assignment]


COLLECTION_VERSION = "0.1.0"
MIB = 1024 * 1024
# Room kept free beyond the estimate: qcow2 metadata, side files, and the file system's own needs.
SPACE_HEADROOM = 16 * MIB
SPACE_FACTOR = 1.05
RUN_FILE = "run.json"
# An image whose mtime or ctime is this close to the moment its state was recorded may still be
# written within the same timestamp tick ("racy git"): its state is not recorded for the economy.
RACY_NS = 1_000_000_000
IMAGE_STATE_KEYS = ("path", "size", "mtime_ns", "ctime_ns", "ino", "dev")
FIRMWARE_ROLES = ("nvram", "tpm")
THAWED_NOTE = "thawed the guest's file systems, left frozen by an interrupted run"
THAW_NOTE = "thaw the guest's file systems, left frozen by an interrupted run"
MOUNTINFO = "/proc/self/mountinfo"
# File systems on which an image's stat is trusted for the economy: local ones, whose attributes
# change with every write. On anything else (NFS, CIFS, FUSE, a btrfs subvolume whose st_dev no
# mount shows, ...) a shut-off VM is always copied.
LOCAL_FS = frozenset(("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "zfs", "f2fs", "bcachefs", "jfs", "overlay"))
TRANSPORTS = ("auto", "pull", "push")
COMPRESSIONS = ("none", "zstd")
DEFAULT_SCRATCH_DIR = "/var/lib/libvirt/qemu/vmbackup"
NBD_SOCKET = "nbd.sock"
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


@dataclasses.dataclass
class ExportParams:
    repository: str
    name: str | None = None
    uuid: str | None = None
    mode: str = "auto"
    uri: str = "qemu:///system"
    disks: list[str] | None = None
    exclude_disks: list[str] | None = None
    period: str | None = None
    lock_timeout: float = 60.0
    allow_unsafe_permissions: bool = False
    workers: int | None = None
    create_repository: bool = False
    required_mount: str | None = None
    series: str = _manifest.DEFAULT_SERIES
    full_every_sets: int | None = None
    full_every_days: float | None = None
    skip_unchanged: bool = True
    quiesce: str = "auto"
    quiesce_timeout: float = _quiesce.DEFAULT_TIMEOUT
    transport: str = "auto"
    compress: str = "none"
    scratch_dir: str = DEFAULT_SCRATCH_DIR


@dataclasses.dataclass
class PlannedDisk:
    disk: lv.Disk
    method: str  # full | incremental | copy
    virtual_size: int
    allocated_bytes: int
    estimated_bytes: int
    images: list[str] | None = None  # every image of the disk's backing chain, top first (None: not plain files)

    def public(self) -> dict[str, t.Any]:
        return {
            "target": self.disk.target,
            "source": self.disk.source,
            "format": self.disk.driver_type,
            "method": self.method,
            "virtual_size": self.virtual_size,
            "allocated_bytes": self.allocated_bytes,
            "estimated_bytes": self.estimated_bytes,
        }


@dataclasses.dataclass
class Plan:
    set_type: str
    reason: str
    chain_id: str | None
    seq: int
    parent: dict[str, t.Any] | None  # set_id, manifest_sha256, checkpoint
    checkpoint: str | None
    disks: list[PlannedDisk]
    skipped: list[dict[str, t.Any]]
    all_targets: list[str]
    estimated_bytes: int
    vm_state: str

    def public(self) -> dict[str, t.Any]:
        return {
            "type": self.set_type,
            "reason": self.reason,
            "chain_id": self.chain_id,
            "parent": self.parent["set_id"] if self.parent else None,
            "checkpoint": self.checkpoint,
            "disks": [d.public() for d in self.disks],
            "skipped_disks": self.skipped,
            "estimated_bytes": self.estimated_bytes,
        }


def _disk_result(disk: dict[str, t.Any]) -> dict[str, t.Any]:
    """A manifest disk entry as the module returns it."""
    keys = ("target", "method", "format", "virtual_size", "allocated_bytes", "file", "size")
    return dict({k: disk.get(k) for k in keys}, bytes=disk["size"])


def validate_params(p: ExportParams) -> str:
    """Checks that need no I/O; returns the normalised repository path."""
    path = repo_mod.validate_repository_path(p.repository)
    if (p.name is None) == (p.uuid is None):
        raise VmBackupError("INVALID_ARGUMENT", "give exactly one of name or uuid")
    if p.name is not None and (not p.name or "\x00" in p.name):
        raise VmBackupError("INVALID_NAME", "name must be a non-empty string without NUL characters")
    if p.uuid is not None:
        p.uuid = _manifest.normalize_uuid(p.uuid)
    if p.mode not in ("auto", "full", "incremental"):
        raise VmBackupError("INVALID_ARGUMENT", f"mode {p.mode!r} is not one of auto, full, incremental")
    for target in (p.disks or []) + (p.exclude_disks or []):
        _manifest.validate_target(target)
    _manifest.validate_period(p.period)
    _manifest.validate_series(p.series)
    validate_timeout(p.lock_timeout)
    _quiesce.validate(p.quiesce, p.quiesce_timeout)
    if p.workers is not None and p.workers < 1:
        raise VmBackupError("INVALID_ARGUMENT", "workers must be 1 or more")
    if p.full_every_sets is not None and (isinstance(p.full_every_sets, bool) or p.full_every_sets < 1):
        raise VmBackupError("INVALID_ARGUMENT", f"full_every_sets must be 1 or more (or null), not {p.full_every_sets!r}")
    if p.full_every_days is not None and not (math.isfinite(p.full_every_days) and 0 < p.full_every_days <= 36600):
        raise VmBackupError("INVALID_ARGUMENT", f"full_every_days must be a number of days above 0 (or null), not {p.full_every_days!r}")
    if p.transport not in TRANSPORTS:
        raise VmBackupError("INVALID_ARGUMENT", f"transport {p.transport!r} is not one of {', '.join(TRANSPORTS)}")
    if p.compress not in COMPRESSIONS:
        raise VmBackupError("INVALID_ARGUMENT", f"compress {p.compress!r} is not one of {', '.join(COMPRESSIONS)}")
    p.scratch_dir = repo_mod.validate_scratch_dir(p.scratch_dir)
    longest = os.path.join(p.scratch_dir, "0" * 36, repo_mod.run_dir_name("00000000T000000Z-000", 4194304), NBD_SOCKET)
    if len(longest.encode("utf-8")) > SOCKET_PATH_MAX:
        raise VmBackupError(
            "INVALID_ARGUMENT",
            f"scratch_dir {p.scratch_dir} is too long: the NBD socket QEMU creates in it (such as {longest}) must have a path "
            f"of at most {SOCKET_PATH_MAX} bytes (a unix socket's limit); choose a shorter directory")
    return path


def nbd_import_error() -> str | None:
    """None when the incremental pull-mode copier can run (the libnbd binding imports)."""
    if _nbd is None:
        return "the module_utils _nbd is missing"
    return _nbd.IMPORT_ERROR


def resolve_transport(transport: str, nbd_error: str | None) -> tuple[str, str | None]:
    """(transport used, warning or None). ``auto`` is pull when libnbd imports, else push with a
    warning; an explicit choice is kept (pull without libnbd still takes fulls, see _plan)."""
    if transport != "auto":
        return transport, None
    if nbd_error is None:
        return "pull", None
    return "push", ("transport=auto: python3-libnbd (the libnbd Python binding) is not importable, so the slower libvirt "
                    "push mode is used; install python3-libnbd for pull mode")


def pull_full_without_nbd(plan_type: str, methods: t.Iterable[str]) -> bool:
    """Whether a pull-mode plan needs no libnbd: no disk is read as an incremental."""
    return plan_type != "incremental" or all(m != "incremental" for m in methods)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def inside_any(paths: t.Iterable[str], dirs: t.Iterable[str]) -> bool:
    """Whether every one of ``paths`` (at least one) lies inside one of ``dirs``."""
    paths, prefixes = list(paths), [d.rstrip("/") + "/" for d in dirs]
    return bool(paths) and all(any(os.path.normpath(p).startswith(pre) for pre in prefixes) for p in paths)


# ---------------------------------------------------------------------- pure decisions (unit-tested)
def periodic_full_reason(chain: list[dict[str, t.Any]], now: dt.datetime, every_sets: int | None,
                         every_days: float | None) -> str | None:
    """Why the chain ``chain`` (its manifests, full first) must not grow, or None.

    ``every_sets``: a chain holds at most that many sets, its full included. ``every_days``: a
    chain whose full started more than that many days before ``now`` gets no further set.
    """
    base, last = chain[0], chain[-1]
    if every_sets is not None and len(chain) >= every_sets:
        return f"the chain of set {last['set_id']} has {len(chain)} sets (full_every_sets={every_sets})"
    if every_days is not None:
        age = now - _manifest.parse_iso(base["started"])
        if age > dt.timedelta(days=every_days):
            return (f"the full {base['set_id']} of the chain started {age.total_seconds() / 86400:.1f} days ago "
                    f"(full_every_days={every_days:g})")
    return None


def series_checkpoints(manifests: t.Iterable[dict[str, t.Any]]) -> dict[str, str]:
    """Per series, the checkpoint of its newest set, when that set has one (``manifests`` oldest first).

    That is the checkpoint each series keeps: its next incremental starts from it. A series whose
    newest set is a copy of the shut-off VM keeps none: its next run of the running VM is a full.
    The set holding a kept checkpoint is always its series' newest, which prune never removes; a
    checkpoint whose chain had been pruned away would no longer be recognised as ours.
    """
    out: dict[str, str | None] = {}
    for manifest in manifests:
        out[_manifest.series_of(manifest)] = manifest.get("checkpoint")
    return {series: checkpoint for series, checkpoint in out.items() if checkpoint}


def image_state(path: str) -> dict[str, t.Any] | None:
    """What identifies an image file's content without reading it: size, mtime, ctime, inode and
    device. None when it is not a regular file (a block device's times say nothing about writes)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino, "dev": st.st_dev}


def fs_type_of_dev(dev: int, mountinfo: str) -> str | None:
    """The file system type mounted from device ``dev`` (a file's st_dev), from mountinfo text."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == want and " - " in line:
            return line.split(" - ", 1)[1].split()[0]
    return None


def chain_states(paths: list[str] | None, mountinfo: str = MOUNTINFO) -> list[dict[str, t.Any]] | None:
    """image_state of every image of a chain; None when any is not a regular file on a local file
    system (a network file system may serve cached attributes while another host writes)."""
    if not paths:
        return None
    states = [image_state(path) for path in paths]
    if any(s is None for s in states):
        return None
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    if any(fs_type_of_dev(s["dev"], text) not in LOCAL_FS for s in states):  # type: ignore[index]
        return None
    return states  # type: ignore[return-value]


def is_racy(states: list[dict[str, t.Any]], recorded_at_ns: int) -> bool:
    """Whether a write could still follow unseen: a time this close to the recording may be
    shared by a later write within the same timestamp tick."""
    return any(max(s["mtime_ns"], s["ctime_ns"]) > recorded_at_ns - RACY_NS for s in states)


def recorded_images(disk: dict[str, t.Any]) -> list[dict[str, t.Any]] | None:
    """The ``images`` a set's disk entry recorded, or None when absent or malformed (an additive
    field that only this economy reads: a bad one means "copy", never an unreadable set)."""
    images = disk.get("images")
    if not isinstance(images, list) or not images:
        return None
    for image in images:
        if not isinstance(image, dict) or set(image) != set(IMAGE_STATE_KEYS) or not isinstance(image["path"], str):
            return None
        if not all(isinstance(image[k], int) and not isinstance(image[k], bool) for k in IMAGE_STATE_KEYS[1:]):
            return None
    return images


@dataclasses.dataclass
class OfflineState:
    """A shut-off VM as observed for the economy: what a copy would read."""

    domain_xml_sha256: str
    disks: dict[str, dict[str, t.Any]]  # target -> {format, virtual_size, images (chain_states or None)}
    firmware: dict[str, str] | None  # set-relative path -> sha256; None when a file cannot be read safely


def unchanged_since(manifest: dict[str, t.Any], verdict: dict[str, t.Any] | None, now: OfflineState) -> str | None:
    """None when the shut-off VM is exactly as set ``manifest`` recorded it; else what differs.

    Safe by construction: every doubt (no recorded state, a failed verdict, anything different)
    is a difference, so the caller copies.
    """
    set_id = manifest["set_id"]
    if manifest["type"] != "copy":
        return f"the last set {set_id} of the series was taken from the running VM ({manifest['type']})"
    if verdict is not None and verdict.get("outcome") != "ok":
        return f"the last verify of set {set_id} did not pass ({verdict.get('outcome')})"
    old = {d["target"]: d for d in manifest["disks"]}
    if set(old) != set(now.disks):
        return f"the disks changed since set {set_id} ({sorted(old)} -> {sorted(now.disks)})"
    for target in sorted(old):
        recorded, current = recorded_images(old[target]), now.disks[target]
        if recorded is None:
            return f"set {set_id} recorded no file state for disk {target}"
        if current["images"] is None:
            return f"disk {target} is not a chain of regular image files"
        if (old[target].get("format"), old[target].get("virtual_size")) != (current["format"], current["virtual_size"]):
            return f"disk {target} changed format or size since set {set_id}"
        if [i["path"] for i in recorded] != [i["path"] for i in current["images"]]:
            return f"the image chain of disk {target} changed since set {set_id}"
        for was, cur in zip(recorded, current["images"]):
            differs = [k for k in IMAGE_STATE_KEYS[1:] if was[k] != cur[k]]
            if differs:
                return f"image {cur['path']} of disk {target} changed since set {set_id} ({', '.join(differs)})"
    domain = manifest["files"].get("domain.xml") or {}
    if domain.get("sha256") != now.domain_xml_sha256:
        return f"the domain XML changed since set {set_id}"
    if now.firmware is None:
        return "a firmware file (NVRAM, TPM state) is a link or not a regular file"
    saved = {rel: e["sha256"] for rel, e in manifest["files"].items() if e.get("role") in FIRMWARE_ROLES}
    if saved != now.firmware:
        return f"the NVRAM or TPM state changed since set {set_id}"
    return None


def chain_files(chain: list[dict[str, t.Any]]) -> list[str] | None:
    """The files of a ``qemu-img info --backing-chain`` answer, top first; None unless every
    image is a plain local file (no protocol, no json: spec, no external data file)."""
    files = []
    for info in chain:
        name = info.get("filename")
        data = (info.get("format-specific") or {}).get("data") or {}
        if not isinstance(name, str) or not name.startswith("/") or "data-file" in data:
            return None
        files.append(name)
    return files or None


def free_bytes(path: str, fallback: int) -> int:
    """Free space of the file system holding ``path`` (for unprivileged users, as df shows it)."""
    try:
        vfs = os.statvfs(path)
    except OSError:
        return fallback
    return vfs.f_bavail * vfs.f_frsize


def sha256_regular_at(dir_fd: int, name: str) -> str | bool | None:
    """sha256 of the regular file ``name`` opened without following a link; None when absent,
    False when it is a link or not a regular file."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            return False
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        digest = hashlib.sha256()
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)
    finally:
        os.close(fd)


class Exporter(Backend):
    """Takes one backup of one VM (an OSError after rollback becomes IO_ERROR in run_module)."""

    _thawed = False  # this run thawed a guest a killed run had left frozen
    _would_thaw = False  # check mode: a real run would

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.phases = Phases()
        self.transport = "push"  # resolved from the transport option by run()

    # ------------------------------------------------------------------ entry point
    def run(self) -> dict[str, t.Any]:
        result = self._run()
        result["timings"] = self.phases.public()
        result.setdefault("compress", self.p.compress)
        return result

    def _run(self) -> dict[str, t.Any]:
        started_mono = time.monotonic()
        repo_path = validate_params(self.p)
        self.transport, warning = resolve_transport(self.p.transport, nbd_import_error())
        if warning:
            self.warnings.append(warning)
        # The repository before anything else, in check mode too: trusted on every component from
        # / (UNSAFE_TARGET), on the file system the user expects (REPOSITORY_NOT_MOUNTED), and new
        # only when asked for or an existing empty directory (REPOSITORY_NOT_FOUND).
        repo_mod.check_required_mount(repo_path, self.p.required_mount)
        repo_state = repo_mod.inspect_repository(repo_path, self.p.allow_unsafe_permissions, create=self.p.create_repository)
        # Pull mode: QEMU never writes into the repository, which may be private (0700 directories).
        repo = repo_mod.Repository(repo_path, self.p.allow_unsafe_permissions, private=self.transport == "pull")
        with lv.session(self.p.uri) as conn:
            dom = lv.lookup_domain(conn, name=self.p.name, vm_uuid=self.p.uuid)
            vm = {"name": dom.name(), "uuid": dom.UUIDString()}
            # First of all, outside the gate on purpose: a guest left frozen by a killed run (this
            # collection's export or snapshot) blocks every write of its applications. Thawing it
            # is recovery, not this run's change; check mode only reports it.
            self._thaw_leftover(dom)

            # Observe and decide before anything is written: bad input fails here, untouched.
            with self.phases.phase("plan"):
                done = self._period_match(repo, vm["uuid"])
                if done is not None:
                    return self._unchanged_result(repo, repo_state, vm, done, started_mono, lv.domain_state(dom), self._period_reason())
                same, copy_note = self._economy(dom, repo, vm["uuid"])
                if same is not None:
                    return self._unchanged_result(repo, repo_state, vm, same[0], started_mono, lv.domain_state(dom), same[1])
                plan = self._plan(dom, repo, vm["uuid"], dry=True, copy_note=copy_note)
                self._check_space(plan, repo_state)
                self._check_transport(plan)
                if plan.vm_state != "shutoff":
                    if self.transport == "push":
                        self._check_qemu_access(repo_path)
                    self._check_no_foreign_job(dom, self._our_job_dirs(repo, vm["uuid"]))
                # Read-only: required fails here, before anything is written, when the guest agent does
                # not answer; check mode predicts the consistency.
                predicted = None
                if plan.set_type != "copy" and (self.check_mode or self.p.quiesce == "required"):
                    predicted = _quiesce.predict(dom, self.p.quiesce)
            if self.check_mode:
                return self._check_mode_result(repo, vm, plan, repo_state, started_mono, predicted)

            # The one gate: everything below changes state. The mount is checked again: planning
            # took a while, and a share unmounted meanwhile must not receive a new repository.
            repo_mod.check_required_mount(repo_path, self.p.required_mount)
            repo_mod.inspect_repository(repo_path, self.p.allow_unsafe_permissions, create=self.p.create_repository)
            repo.initialise()
            repo.prepare_vm(vm["uuid"])
            self.phases.add("lock", 0.0)
            lock_started = time.monotonic()
            with VmLock(repo.lock_path(vm["uuid"]), self.p.lock_timeout, f"export {vm['uuid']}"):
                self.phases.add("lock", time.monotonic() - lock_started)
                with self.phases.phase("cleanup"):
                    self._clean_leftovers(dom, repo, vm["uuid"])
                # Re-decide under the lock: another run may have committed a set meanwhile.
                with self.phases.phase("plan"):
                    done = self._period_match(repo, vm["uuid"])
                    if done is not None:
                        return self._unchanged_result(repo, repo_state, vm, done, started_mono, lv.domain_state(dom),
                                                      self._period_reason())
                    same, copy_note = self._economy(dom, repo, vm["uuid"])
                    if same is not None:
                        return self._unchanged_result(repo, repo_state, vm, same[0], started_mono, lv.domain_state(dom), same[1])
                    plan = self._plan(dom, repo, vm["uuid"], copy_note=copy_note)
                    self._check_space(plan, repo_mod.inspect_repository(repo_path, self.p.allow_unsafe_permissions))
                    self._check_transport(plan)
                    if plan.vm_state != "shutoff":
                        self._check_no_foreign_job(dom, None)
                result = self._execute(dom, repo, vm, plan, started_mono)
                with self.phases.phase("commit"):
                    self._retire_checkpoints(dom, repo, vm["uuid"], keep=plan.checkpoint)
            result["repository_free_bytes"] = free_bytes(repo_path, repo_state.free_bytes)
            return result

    def _transport_of(self, plan: Plan) -> str:
        """How the plan's data is read: pull or push for a running VM, offline for a copy."""
        return "offline" if plan.set_type == "copy" else self.transport

    def _check_transport(self, plan: Plan) -> None:
        """What the chosen transport cannot do, refused before anything is written."""
        if plan.set_type == "copy":
            return
        if self.transport == "push" and self.p.compress != "none":
            raise VmBackupError(
                "INVALID_ARGUMENT",
                f"compress={self.p.compress} needs transport pull for a running VM (push mode writes the backup through "
                "libvirt, uncompressed); install python3-libnbd for transport auto to choose pull, or set compress=none")
        if self.transport == "pull" and not pull_full_without_nbd(plan.set_type, [d.method for d in plan.disks]):
            error = nbd_import_error()
            if error is not None:
                raise VmBackupError(
                    "MISSING_DEPENDENCY",
                    "an incremental backup in pull mode reads the dirty blocks through libnbd, whose Python binding "
                    f"(python3-libnbd) does not import: {error.strip().splitlines()[-1]}; install python3-libnbd, or use "
                    "transport push or mode full")

    # ------------------------------------------------------------------ decide
    def _period_match(self, repo: repo_mod.Repository, vm_uuid: str) -> dict[str, t.Any] | None:
        """The newest set of this series with this period (another series' set does not count)."""
        if self.p.period is None:
            return None
        for manifest in reversed(Catalog(repo, vm_uuid).manifests(self.p.series)):
            if manifest.get("period") == self.p.period:
                return manifest
        return None

    def _period_reason(self) -> str:
        return f"a committed set of period {self.p.period} exists in series {self.p.series}"

    def _economy(self, dom, repo: repo_mod.Repository, vm_uuid: str) -> tuple[tuple[dict[str, t.Any], str] | None, str]:
        """((manifest, reason), "") when a shut-off VM is unchanged since its series' newest set,
        else (None, why a copy is taken; "" when the economy does not apply)."""
        if lv.is_active(dom) or self.p.mode != "auto":
            return None, ""
        if not self.p.skip_unchanged:
            return None, "skip_unchanged=false"
        catalog = Catalog(repo, vm_uuid)
        set_id = catalog.latest(self.p.series)
        if set_id is None:
            return None, ""
        manifest = catalog.sets[set_id].manifest
        why = unchanged_since(manifest, catalog.verdict(set_id), self._observe_offline(dom))
        if why is not None:
            return None, why
        reason = (f"unchanged since set {set_id}: the VM is shut off, and the size, mtime, ctime and inode of every image "
                  "of its disks, its domain XML and its firmware files are as that set recorded")
        return (manifest, reason), ""

    def _observe_offline(self, dom) -> OfflineState:
        """The shut-off VM as a copy would read it (selection as in _plan)."""
        xml = lv.domain_xml(dom, inactive=True)
        selected, _skipped = self._select_disks(lv.parse_disks(xml))
        disks = {}
        for disk in selected:
            chain = self.qemu_img.info_chain(disk.source, disk.driver_type, force_share=False)
            disks[disk.target] = {"format": disk.driver_type, "virtual_size": int(chain[0]["virtual-size"]),
                                  "images": chain_states(chain_files(chain))}
        return OfflineState(domain_xml_sha256=_manifest.sha256_bytes(xml.encode("utf-8")), disks=disks,
                            firmware=self._firmware_digests(xml, dom.UUIDString()))

    def _select_disks(self, disks: list[lv.Disk]) -> tuple[list[lv.Disk], list[dict[str, t.Any]]]:
        by_target = {d.target: d for d in disks}
        for target in (self.p.disks or []) + (self.p.exclude_disks or []):
            if target not in by_target:
                raise VmBackupError(
                    "DISK_NOT_FOUND", f"disk {target!r} is not a disk of the VM (it has: {', '.join(sorted(by_target))})"
                )
        selected, skipped = [], []
        for disk in disks:
            reason = disk.skip_reason()
            if reason is None and self.p.disks and disk.target not in self.p.disks:
                reason = "not in disks"
            if reason is None and disk.target in (self.p.exclude_disks or []):
                reason = "in exclude_disks"
            if reason is None:
                _manifest.validate_target(disk.target)  # it becomes a file name
                selected.append(disk)
            else:
                skipped.append({"target": disk.target, "device": disk.device, "source": disk.source, "reason": reason})
        if not selected:
            raise VmBackupError("NO_DISKS", "the VM has no disk to back up after selection", skipped_disks=skipped)
        return selected, skipped

    def _plan(self, dom, repo: repo_mod.Repository, vm_uuid: str, dry: bool = False, copy_note: str = "") -> Plan:
        """Decide the backup. ``dry`` plans change nothing in libvirt (check mode, pre-lock preflight).
        ``copy_note`` says why a shut-off VM is copied again (the economy's finding)."""
        active = lv.is_active(dom)
        state = lv.domain_state(dom)
        disks = lv.parse_disks(lv.domain_xml(dom, inactive=not active))
        selected, skipped = self._select_disks(disks)
        sizes, images = {}, {}
        for disk in selected:
            chain = self.qemu_img.info_chain(disk.source, disk.driver_type, force_share=active)
            # Data bytes from the allocation map, not the files' actual-size (compressed images).
            sizes[disk.target] = (int(chain[0]["virtual-size"]),
                                  self.qemu_img.allocated_bytes(disk.source, disk.driver_type, force_share=active))
            images[disk.target] = chain_files(chain)

        def planned(disk: lv.Disk, method: str, dirty: dict[str, int] | None = None) -> PlannedDisk:
            virtual, allocated = sizes[disk.target]
            estimate = dirty.get(disk.target, allocated) if (dirty is not None and method == "incremental") else allocated
            return PlannedDisk(disk, method, virtual, allocated, estimate, images[disk.target])

        def finish(set_type, reason, chain_id, seq, parent, pdisks) -> Plan:
            checkpoint = _manifest.checkpoint_name(chain_id, seq) if chain_id else None
            return Plan(
                set_type=set_type, reason=reason, chain_id=chain_id, seq=seq, parent=parent, checkpoint=checkpoint,
                disks=pdisks, skipped=skipped, all_targets=[d.target for d in disks],
                estimated_bytes=sum(d.estimated_bytes for d in pdisks), vm_state=state,
            )

        if not active:
            if self.p.mode == "incremental":
                raise VmBackupError(
                    "PARENT_CHECKPOINT_INVALID",
                    "mode=incremental needs a running VM (libvirt keeps no dirty bitmap for a shut-off VM); "
                    "use mode=auto or full to take a copy",
                )
            reason = "the VM is shut off: a full copy without checkpoint" + (f" ({copy_note})" if copy_note else "")
            return finish("copy", reason, None, 0, None, [planned(d, "copy") for d in selected])

        checkpointable = [d for d in selected if d.checkpointable]
        if not checkpointable:
            # Nothing can carry a bitmap (all raw): every run is a full without checkpoint chain.
            if self.p.mode == "incremental":
                raise VmBackupError("PARENT_CHECKPOINT_INVALID", "no selected disk is qcow2, so no incremental backup is possible")
            return finish("full", "no selected disk is qcow2: full data every run", None, 0, None,
                          [planned(d, "full") for d in selected])

        parent, why_not = (None, "mode=full was requested") if self.p.mode == "full" else self._find_parent(dom, repo, vm_uuid, selected, sizes, dry)
        if parent is None:
            if self.p.mode == "incremental":
                code = "TOPOLOGY_CHANGED" if why_not.startswith("the disks changed") else "PARENT_CHECKPOINT_INVALID"
                raise VmBackupError(code, f"mode=incremental but no valid parent: {why_not}")
            chain_id = _manifest.new_chain_id()
            reason = "full: " + why_not
            return finish("full", reason, chain_id, 0, None, [planned(d, "full") for d in selected])

        dirty = lv.checkpoint_dirty_bytes(dom, parent["checkpoint"])
        pdisks = [planned(d, "incremental" if d.checkpointable else "full", dirty) for d in selected]
        reason = f"incremental: valid parent {parent['set_id']} (checkpoint {parent['checkpoint']}"
        reason += ", redefined in libvirt from the set)" if parent["redefined"] else ")"
        return finish("incremental", reason, parent["chain_id"], parent["seq"] + 1,
                      {k: parent[k] for k in ("set_id", "manifest_sha256", "checkpoint")}, pdisks)

    def _find_parent(self, dom, repo, vm_uuid, selected, sizes, dry) -> tuple[dict[str, t.Any] | None, str]:
        """The newest readable set of the series if it can be this run's parent, else (None, why not)."""
        catalog = Catalog(repo, vm_uuid)
        series = self.p.series
        set_id = catalog.latest(series)
        # A damaged set is never a parent, and not a reason to fail every run. Its series is not
        # known: when it was this series', the older set's checkpoint was retired with it, which
        # the checkpoint and bitmap checks below find (a full then); otherwise that one serves.
        damaged = [sid for sid in catalog.ids() if catalog.sets[sid].manifest is None and (set_id is None or sid > set_id)]
        if set_id is None:
            if damaged:
                entry = catalog.sets[damaged[-1]]
                return None, f"the last set {entry.set_id} is unreadable ({entry.error.msg if entry.error else 'no manifest'})"
            if not catalog.sets:
                return None, "no committed set of this VM in the repository"
            return None, f"no committed set of series {series} of this VM in the repository"
        warning = (f"set(s) {', '.join(damaged)} are unreadable (series unknown); "
                   f"set {set_id} is the newest readable set of series {series}")
        if damaged and warning not in self.warnings:  # planned twice in a real run (before and under the lock)
            self.warnings.append(warning)
        entry = catalog.sets[set_id]
        manifest, sha = entry.manifest, entry.manifest_sha256
        if manifest["type"] == "copy" or not manifest.get("checkpoint"):
            return None, f"the last set {set_id} is a {manifest['type']} without checkpoint"
        # The new set would build on every set of the parent's chain: each must be sound as far
        # as we know (links intact, no failed verdict), or a damaged chain would be extended.
        try:
            chain = catalog.sets_of_chain(set_id)
        except VmBackupError as exc:
            return None, f"the chain of set {set_id} is broken ({exc.msg})"
        for member in reversed(chain):
            sidecar = catalog.verdict(member)
            if sidecar is not None and sidecar.get("outcome") != "ok":
                where = "" if member == set_id else f", which set {set_id} builds on,"
                return None, f"the last verify of set {member}{where} did not pass ({sidecar.get('outcome')})"
        if self.p.mode == "auto":
            rule = periodic_full_reason([catalog.sets[sid].manifest for sid in chain], _manifest.utcnow(),
                                        self.p.full_every_sets, self.p.full_every_days)
            if rule is not None:
                return None, rule
        checkpoint = manifest["checkpoint"]
        parsed = _manifest.parse_checkpoint_name(checkpoint)
        if parsed is None:
            return None, f"set {set_id} names no checkpoint of this collection"
        old = {d["target"]: d for d in manifest["disks"]}
        new = {d.target: d for d in selected}
        if set(old) != set(new):
            return None, f"the disks changed since set {set_id} ({sorted(old)} -> {sorted(new)})"
        for target, disk in new.items():
            if old[target].get("virtual_size") != sizes[target][0]:
                return None, f"the disks changed since set {set_id}: {target} was resized"
            if (old[target]["method"] == "incremental" or disk.checkpointable) and old[target].get("format") != disk.driver_type:
                return None, f"the disks changed since set {set_id}: {target} format changed"
        redefined = False
        if lv.lookup_checkpoint(dom, checkpoint) is None:
            try:  # the saved XML, read without following a link
                saved = repo.read_set_file(vm_uuid, set_id, "checkpoint.xml").decode("utf-8")
            except (OSError, UnicodeDecodeError):
                return None, f"checkpoint {checkpoint} of set {set_id} no longer exists in libvirt"
            if dry:
                # A real run will try to redefine it; its bitmap can only be checked then.
                return self._parent(set_id, sha, manifest, parsed, redefined=True), ""
            error = lv.redefine_checkpoint(dom, saved)
            if error:
                return None, f"checkpoint {checkpoint} of set {set_id} no longer exists in libvirt and cannot be redefined ({error})"
            self.warnings.append(f"checkpoint {checkpoint} was missing from libvirt and was redefined from set {set_id}")
            redefined = True
        bitmaps = lv.checkpoint_bitmap_disks(dom, checkpoint) or set()
        wanted = {d.target for d in selected if d.checkpointable}
        if bitmaps != wanted:
            return None, f"the disks changed since set {set_id}: checkpoint covers {sorted(bitmaps)}, now {sorted(wanted)}"
        why_not = self._check_bitmaps(dom, set_id, checkpoint, sorted(wanted), dry,
                                      {tg: old[tg].get("source") for tg in wanted})
        if why_not:
            return None, why_not
        return self._parent(set_id, sha, manifest, parsed, redefined), ""

    @staticmethod
    def _parent(set_id: str, sha: str, manifest: dict[str, t.Any], parsed: tuple[str, int], redefined: bool) -> dict[str, t.Any]:
        return {"set_id": set_id, "manifest_sha256": sha, "checkpoint": manifest["checkpoint"],
                "chain_id": manifest["chain_id"], "seq": parsed[1], "redefined": redefined}

    def _check_bitmaps(self, dom, set_id: str, checkpoint: str, targets: list[str], dry: bool,
                       sources: dict[str, str | None] | None = None) -> str:
        """Why the parent checkpoint's bitmaps cannot give a correct incremental, or "".

        1. Every bitmap must be usable: after QEMU died (kill, host crash) a bitmap is missing
           (never stored) or loaded as inconsistent (stored in-use), and a disk replaced by
           another image has none; libvirt then reports no dirty size for it. Such a checkpoint
           can never serve again, so it is deleted here (not in check mode) instead of failing
           every later run.
        2. Every disk's size sentinel must be intact: a bitmap does not notice a shrink followed
           by a grow back (see _libvirt's sentinel notes). libvirt keeps a checkpoint's bitmaps
           across an external snapshot and its merge, but not the sentinel (_libvirt's snapshot
           notes): a disk moved to an overlay or back since the set (``sources``: each disk's
           source then) therefore starts a new chain unless the sentinel was carried along, and
           the reason says so.
        """
        report = lv.checkpoint_bitmap_report(dom, checkpoint)
        if report is None:  # not a verdict on the bitmaps (the VM stopped, libvirt failed): keep it
            return f"cannot read the bitmaps of checkpoint {checkpoint} of set {set_id} from libvirt"
        broken = [tg for tg in targets if report.get(tg) is None]
        if broken:
            # The same reason in check mode and in the real run; the deletion is in cleaned_up.
            why = (f"checkpoint {checkpoint} of set {set_id} has a missing or broken bitmap for {', '.join(broken)} "
                   "(QEMU stopped without storing it, or the disk image was replaced), so the checkpoint is removed")
            if not dry:
                error = self._delete_checkpoint(dom, checkpoint)
                if error:
                    self.warnings.append(f"could not delete the broken checkpoint {checkpoint}: {error}")
                else:
                    self.cleaned.append(f"deleted the broken checkpoint {checkpoint}")
            return why
        try:
            nodes = lv.block_nodes(dom)
        except VmBackupError as exc:
            return f"the disks changed since set {set_id}: cannot read their size sentinels ({exc.msg})"
        for target in targets:
            node = nodes.get(target)
            state = "is not known to QEMU by its node" if node is None else lv.sentinel_state(node, checkpoint)
            if state and node is not None and lv.sentinel_name(checkpoint) not in node.bitmaps:
                state = self._snapshot_note(dom, target, checkpoint, (sources or {}).get(target)) or state
            if state:
                return f"the disks changed since set {set_id}: {target} {state}"
        return ""

    @staticmethod
    def _snapshot_note(dom, target: str, checkpoint: str, then: str | None) -> str | None:
        """Why ``target`` has no size sentinel when an external snapshot explains it, else None."""
        try:
            chain = lv.disk_chains(dom).get(target) or []
        except VmBackupError:
            chain = []
        below = lv.sentinel_below(chain, checkpoint)
        now = lv.parse_disks(lv.domain_xml(dom, inactive=False))
        source = next((d.source for d in now if d.target == target), None)
        if below is not None:
            return (f"runs on an overlay ({source}) created after checkpoint {checkpoint} (an external snapshot): libvirt "
                    "carried the checkpoint's bitmap into the overlay but not the size sentinel that proves the disk was "
                    "not shrunk since, so a new chain starts")
        if then and source and then != source:
            return (f"has no size sentinel on its image {source} (it was {then} at the set: an external snapshot was "
                    "created or merged since, or the image was replaced); libvirt keeps a checkpoint's bitmap across a "
                    "snapshot and its merge but not the size sentinel, so a new chain starts")
        return None

    def _check_space(self, plan: Plan, repo_state: repo_mod.RepoState) -> None:
        need = int(plan.estimated_bytes * SPACE_FACTOR) + SPACE_HEADROOM
        if repo_state.free_bytes < need:
            raise VmBackupError(
                "TARGET_NO_SPACE",
                f"repository {repo_state.path} has {repo_state.free_bytes // MIB} MiB free, the backup needs about "
                f"{need // MIB} MiB ({plan.set_type}, {plan.estimated_bytes} bytes allocated)",
                free_bytes=repo_state.free_bytes,
                needed_bytes=need,
            )

    def _check_qemu_access(self, repo_path: str) -> None:
        blocked = repo_mod.qemu_can_traverse(repo_path)
        if blocked:
            raise VmBackupError(
                "TARGET_NOT_ACCESSIBLE",
                f"{blocked} is not traversable by others (no o+x), so QEMU (libvirt-qemu) cannot write the live "
                "backup into the repository in push mode; use transport pull (QEMU then never touches the repository, "
                "which may stay private), chmod o+x that directory, or choose another repository",
            )

    def _our_job_dirs(self, repo: repo_mod.Repository, vm_uuid: str) -> list[str]:
        """Where a job of an interrupted run of this repository writes or serves: the staging root
        (push mode) and the run directories the interrupted runs recorded (pull mode)."""
        dirs = [repo.staging_root(vm_uuid)]
        for path in repo.leftovers(vm_uuid):
            record = self._run_record(repo, vm_uuid, path)
            split_run = repo_mod.split_run_dir(record.get("run_dir"), vm_uuid)
            if split_run:
                dirs.append(os.path.join(split_run[0], vm_uuid, split_run[1]))
        return dirs

    @staticmethod
    def _run_record(repo: repo_mod.Repository, vm_uuid: str, path: str) -> dict[str, t.Any]:
        """The run.json of an interrupted run's staging directory ({} when unreadable)."""
        try:  # read without following a link
            record = json.loads(repo.read_staging_file(vm_uuid, os.path.basename(path), RUN_FILE))
        except (OSError, ValueError, VmBackupError):
            return {}
        return record if isinstance(record, dict) else {}

    def _check_no_foreign_job(self, dom, ours: list[str] | None) -> None:
        """Fail when a job runs on the VM, unless it is an interrupted run's backup whose every file
        lies in ``ours`` (its staging root or run directory), which the run removes once it holds the lock."""
        job = lv.active_job(dom)
        if job is not None and ours is not None:
            if inside_any(lv.backup_targets(dom) or [], ours):
                return
        if job is not None:
            raise VmBackupError(
                "BACKUP_JOB_ACTIVE",
                "another job (not this repository's) is running on the VM; retry when it has finished",
                job={k: v for k, v in job.items() if isinstance(v, (int, str))},
            )
        # A block job (a snapshot merge not yet pivoted, a copy) is not a domain job, but libvirt
        # refuses a backup of its disk; say so before anything is written, in check mode too.
        blocks = lv.block_jobs(dom, [d.target for d in lv.parse_disks(lv.domain_xml(dom, inactive=False))])
        if blocks:
            raise VmBackupError(
                "BACKUP_JOB_ACTIVE",
                "a block job runs on " + ", ".join(f"disk {k} ({v})" for k, v in sorted(blocks.items()))
                + " (a snapshot merge or a copy in progress); retry when it has finished",
                block_jobs=blocks,
            )

    # ------------------------------------------------------------------ clean up earlier runs
    def _clean_leftovers(self, dom, repo: repo_mod.Repository, vm_uuid: str) -> None:
        """Undo what an interrupted run left: its job, its checkpoint, its run directory (pull
        mode: NBD socket, scratch files), its staging directory; then sweep run directories of dead
        runs that no job uses."""
        leftovers = repo.leftovers(vm_uuid)
        records = {path: self._run_record(repo, vm_uuid, path) for path in leftovers}
        run_dirs = {path: repo_mod.split_run_dir(rec.get("run_dir"), vm_uuid) for path, rec in records.items()}
        # Only a job that writes into one interrupted run's staging directory (push) or serves from
        # its run directory (pull) is ours to abort.
        if lv.is_active(dom):
            mine = list(leftovers) + [os.path.join(split[0], vm_uuid, split[1]) for split in run_dirs.values() if split]
            if any(lv.abort_backup_into(dom, path) for path in mine):
                self.cleaned.append("aborted the backup job of an interrupted run")
        for path, split in run_dirs.items():
            if split and repo_mod.remove_run_dir(split[0], vm_uuid, split[1]):
                self.cleaned.append(f"removed the run directory {os.path.join(split[0], vm_uuid, split[1])} of an interrupted run")
        self._sweep_run_dirs(dom, vm_uuid)
        if not leftovers:
            return
        for path in leftovers:
            checkpoint = records[path].get("checkpoint")
            if not isinstance(checkpoint, str):
                checkpoint = None
            # The interrupted run's own checkpoint only: never one a committed set relies on.
            if (checkpoint and _manifest.parse_checkpoint_name(checkpoint) and lv.lookup_checkpoint(dom, checkpoint)
                    and checkpoint not in self._committed_checkpoints(repo, vm_uuid)):
                error = self._delete_checkpoint(dom, checkpoint)
                if error:
                    self.warnings.append(f"could not delete checkpoint {checkpoint} of an interrupted run: {error}")
                else:
                    self.cleaned.append(f"deleted checkpoint {checkpoint} of an interrupted run")
        for path in repo.remove_leftovers(vm_uuid):
            self.cleaned.append(f"removed incomplete set {path}")

    def _sweep_run_dirs(self, dom, vm_uuid: str) -> None:
        """Remove the run directories under scratch_dir of runs whose process is gone and that no
        running job of the domain uses: those of a killed run whose staging directory is gone (or
        is in another repository, whose next run would abort its job first: a directory a job still
        serves from is kept). A live run's directory (another repository's) is never touched."""
        try:
            found = repo_mod.list_run_dirs(self.p.scratch_dir, vm_uuid)
        except (OSError, VmBackupError) as exc:
            self.warnings.append(f"cannot look for leftover run directories in {self.p.scratch_dir}: {getattr(exc, 'msg', exc)}")
            return
        if not found:
            return
        used = (lv.backup_targets(dom) or []) if lv.is_active(dom) else []
        for name, _set_id, pid in found:
            path = os.path.join(self.p.scratch_dir, vm_uuid, name)
            if pid == os.getpid() or pid_alive(pid) or any(inside_any([u], [path]) for u in used):
                continue
            if repo_mod.remove_run_dir(self.p.scratch_dir, vm_uuid, name):
                self.cleaned.append(f"removed the run directory {path} of an interrupted run")

    @staticmethod
    def _committed_checkpoints(repo: repo_mod.Repository, vm_uuid: str) -> set[str]:
        return {m["checkpoint"] for m in Catalog(repo, vm_uuid).manifests() if m.get("checkpoint")}

    def _retire_checkpoints(self, dom, repo: repo_mod.Repository, vm_uuid: str, keep: str | None) -> None:
        """Delete this repository's checkpoints that no future run can use: each is a live
        dirty bitmap QEMU updates on every guest write. Each series keeps the checkpoint of its
        newest set (series_checkpoints), and ``keep`` (this run's) is kept. Other
        repositories' and foreign checkpoints (other chain ids or names) are never touched."""
        catalog = Catalog(repo, vm_uuid)
        kept = set(series_checkpoints(catalog.manifests()).values()) | ({keep} if keep else set())
        ours = {m["chain_id"] for m in catalog.manifests() if m.get("chain_id")}
        for entry in catalog.sets.values():
            if entry.manifest is None:
                # A damaged set still names its checkpoint in its saved checkpoint.xml; without
                # this, that live bitmap would outlive the set forever.
                try:
                    saved = repo.read_set_file(vm_uuid, entry.set_id, "checkpoint.xml").decode("utf-8")
                except (OSError, UnicodeDecodeError, VmBackupError):
                    continue
                parsed = _manifest.parse_checkpoint_name(lv.checkpoint_xml_name(saved) or "")
                if parsed is not None:
                    ours.add(parsed[0])
        for name in lv.checkpoint_names(dom):
            parsed = _manifest.parse_checkpoint_name(name)
            if parsed is None or parsed[0] not in ours or name in kept:
                continue
            error = self._delete_checkpoint(dom, name)
            if error:
                self.warnings.append(f"could not delete old checkpoint {name}: {error}")
        if not lv.is_active(dom):
            return
        # Bitmaps of our chains whose checkpoint libvirt no longer has: a checkpoint lost for good
        # (not redefinable) leaves a bitmap QEMU updates on every guest write forever, and a run
        # killed between arming its size sentinels and starting its job leaves those. A series'
        # kept checkpoint that libvirt lost is not orphaned: its next run redefines it from its set.
        try:
            nodes = lv.block_nodes(dom)
        except VmBackupError:
            return
        live = set(lv.checkpoint_names(dom))
        for node in nodes.values():
            for bitmap in node.bitmaps:
                checkpoint = bitmap[:-len(lv.SENTINEL_SUFFIX)] if bitmap.endswith(lv.SENTINEL_SUFFIX) else bitmap
                parsed = _manifest.parse_checkpoint_name(checkpoint)
                if parsed is None or parsed[0] not in ours or checkpoint in live or checkpoint in kept:
                    continue
                error = lv.remove_bitmap_live(dom, node.node, bitmap)
                if error:
                    self.warnings.append(f"could not remove the orphaned bitmap {bitmap} of {node.target}: {error}")
                else:
                    self.cleaned.append(f"removed the orphaned bitmap {bitmap} of {node.target}")

    def _delete_checkpoint(self, dom, name: str) -> str | None:
        """Delete one of our checkpoints and its size sentinels. libvirt cannot delete the bitmaps
        of a shut-off VM, so then its metadata goes and qemu-img removes the bitmaps from each image."""
        active = lv.is_active(dom)
        disks = [] if active else [d for d in lv.parse_disks(lv.domain_xml(dom, inactive=True))
                                   if d.checkpointable and d.source_type == "file" and d.source]
        error = lv.delete_checkpoint(dom, name)
        if error:
            return error
        if active:
            return self._remove_sentinels(dom, {name})
        for disk in disks:
            try:
                present = self.qemu_img.bitmaps(disk.source)
                for bitmap in (name, lv.sentinel_name(name)):
                    if bitmap in present:
                        self.qemu_img.remove_bitmap(disk.source, bitmap)
            except VmBackupError as exc:
                return exc.msg
        return None

    @staticmethod
    def _remove_sentinels(dom, checkpoints: set[str]) -> str | None:
        """Remove the size sentinels of ``checkpoints`` from a running VM's disks."""
        try:
            nodes = lv.block_nodes(dom)
        except VmBackupError as exc:
            return exc.msg
        for node in nodes.values():
            for checkpoint in sorted(checkpoints):
                if lv.sentinel_name(checkpoint) in node.bitmaps:
                    error = lv.remove_bitmap_live(dom, node.node, lv.sentinel_name(checkpoint))
                    if error:
                        return error
        return None

    # ------------------------------------------------------------------ act
    def _execute(self, dom, repo: repo_mod.Repository, vm: dict[str, str], plan: Plan, started_mono: float) -> dict[str, t.Any]:
        started = _manifest.utcnow()
        set_id = _manifest.new_set_id(started, repo.all_ids(vm["uuid"]))
        transport = self._transport_of(plan)
        compress = self.p.compress == "zstd"
        staging = repo.create_staging(vm["uuid"], set_id)
        checkpoint_is_ours = False
        armed: list[tuple[str, str]] = []  # (disk target, QEMU node) of each sentinel this run created
        # Pull mode: the run directory (NBD socket, scratch files), recorded before it exists.
        run_name = repo_mod.run_dir_name(set_id, os.getpid())
        run_dir = os.path.join(self.p.scratch_dir, vm["uuid"], run_name) if transport == "pull" else None
        run_dir_made = False
        try:
            repo_mod.write_file_atomic(
                os.path.join(staging, RUN_FILE),
                _manifest.dumps({"set_id": set_id, "checkpoint": plan.checkpoint, "pid": os.getpid(), "started": _manifest.iso(started),
                                 "transport": transport, "run_dir": run_dir}),
            )
            files: dict[str, str] = {}  # relative path -> role
            per_disk_file = {d.disk.target: f"disks/{d.disk.target}.qcow2" for d in plan.disks}
            copy_started = time.monotonic()
            image_states: dict[str, list[dict[str, t.Any]]] = {}  # target -> state of its images (the economy's record)
            progress = Progress(self.log, f"export {vm['name']} ({plan.set_type}, {transport})", plan.estimated_bytes)
            if plan.set_type == "copy":
                quiesce = _quiesce.Quiesce(self.p.quiesce, reason=_quiesce.skip_reason(self.p.quiesce, plan.vm_state)[0])
                before = {pd.disk.target: chain_states(pd.images) for pd in plan.disks}
                with self.phases.phase("transfer"):
                    for pd in plan.disks:
                        self.qemu_img.convert(pd.disk.source, pd.disk.driver_type, os.path.join(staging, per_disk_file[pd.disk.target]),
                                              compress=compress)
                        progress.add(pd.estimated_bytes)
                # Recorded only when nothing touched the images during the copy, the VM stayed off,
                # and no write can still share a timestamp with the state recorded.
                recorded_at = time.time_ns()
                after = {pd.disk.target: chain_states(pd.images) for pd in plan.disks}
                if not lv.is_active(dom):
                    image_states = {tg: st for tg, st in after.items()
                                    if st is not None and st == before[tg] and not is_racy(st, recorded_at)}
                job_stats: dict[str, t.Any] = {}
            else:
                targets = {pd.disk.target: os.path.join(staging, per_disk_file[pd.disk.target]) for pd in plan.disks}
                skip = [tg for tg in plan.all_targets if tg not in targets and tg in self._disk_targets(plan)]
                cxml = None
                if plan.checkpoint:
                    cxml = lv.checkpoint_xml(plan.checkpoint, [pd.disk.target for pd in plan.disks if pd.disk.checkpointable],
                                             list(targets) + skip)
                full_targets = [pd.disk.target for pd in plan.disks if pd.method == "full"]
                incremental = plan.parent["checkpoint"] if plan.parent else None
                if run_dir is not None:
                    uid, gid = lv.qemu_owner(lv.domain_xml(dom, inactive=False))
                    blocked = repo_mod.blocked_for(self.p.scratch_dir, uid, gid)
                    if blocked:
                        raise VmBackupError(
                            "TARGET_NOT_ACCESSIBLE",
                            f"QEMU runs as {uid}:{gid} for this VM and cannot traverse {blocked}, so it cannot create its NBD "
                            f"socket in scratch_dir {self.p.scratch_dir}; choose a scratch_dir QEMU can reach (the default "
                            f"{DEFAULT_SCRATCH_DIR} lies in libvirt's own directory)")
                    repo_mod.create_run_dir(self.p.scratch_dir, vm["uuid"], run_name, uid, gid)
                    run_dir_made = True
                    bxml = lv.pull_backup_xml(os.path.join(run_dir, NBD_SOCKET),
                                              {tg: os.path.join(run_dir, f"{tg}.scratch") for tg in targets},
                                              skip, incremental, full_targets)
                else:
                    bxml = lv.backup_xml(targets, skip, incremental, full_targets)
                if plan.checkpoint:
                    # Only a checkpoint that did not exist before is this run's to delete on failure.
                    if lv.lookup_checkpoint(dom, plan.checkpoint) is not None:
                        raise VmBackupError("BACKUP_FAILED", f"checkpoint {plan.checkpoint} exists already; it is not this run's")
                    checkpoint_is_ours = True
                    self._arm_sentinels(dom, plan, armed)
                # The point in time: the job's start. The guest is frozen only around it (QEMU serves
                # or copies its point-in-time view afterwards, while the guest runs on).
                with self.phases.phase("freeze"):
                    with _quiesce.frozen(dom, self.p.quiesce, self.p.quiesce_timeout, self.p.uri) as quiesce:
                        lv.begin_backup(dom, bxml, cxml)
                self._note_quiesce(quiesce)
                with self.phases.phase("transfer"):
                    if run_dir is not None:
                        job_stats = self._pull_transfer(dom, plan, targets, run_dir, progress, compress)
                    else:
                        job_stats = lv.wait_backup(dom)
                        progress.add(plan.estimated_bytes)
                with self.phases.phase("finish"):
                    if run_dir is not None:
                        lv.end_pull_job(dom)
                    else:
                        for pd in plan.disks:
                            if pd.method == "incremental":
                                self.qemu_img.drop_backing_reference(targets[pd.disk.target])
                    if plan.checkpoint:
                        cp = lv.lookup_checkpoint(dom, plan.checkpoint)
                        if cp is None:
                            raise VmBackupError("BACKUP_FAILED", f"checkpoint {plan.checkpoint} vanished after the backup job")
                        self._write_side(staging, "checkpoint.xml", cp.getXMLDesc(0).encode("utf-8"))
                        files["checkpoint.xml"] = "checkpoint_xml"
                    if run_dir_made:
                        repo_mod.remove_run_dir(self.p.scratch_dir, vm["uuid"], run_name)
                        run_dir_made = False
            copy_seconds = time.monotonic() - copy_started
            transferred = progress.finish()
            with self.phases.phase("finish"):
                self._write_side(staging, "domain.xml", lv.domain_xml(dom, inactive=True).encode("utf-8"))
                files["domain.xml"] = "domain_xml"
                if lv.is_active(dom):
                    self._write_side(staging, "domain-live.xml", lv.domain_xml(dom, inactive=False).encode("utf-8"))
                    files["domain-live.xml"] = "domain_live_xml"
                files.update(self._copy_firmware(dom, staging, vm["uuid"]))
            for rel in per_disk_file.values():
                files[rel] = "disk"
            with self.phases.phase("hash"):
                hashes = self._hash_all(staging, list(files))
            commit_started = time.monotonic()
            completed = _manifest.utcnow()
            duration = time.monotonic() - started_mono
            data_bytes = sum(hashes[per_disk_file[pd.disk.target]][1] for pd in plan.disks)
            total_bytes = sum(size for _sha, size in hashes.values())
            disks_out = []
            for pd in plan.disks:
                rel = per_disk_file[pd.disk.target]
                entry = pd.public()
                entry.pop("estimated_bytes")
                entry.update(file=rel, size=hashes[rel][1], sha256=hashes[rel][0], compression=self.p.compress)
                if pd.disk.target in image_states:
                    entry["images"] = image_states[pd.disk.target]
                disks_out.append(entry)
            manifest = _manifest.build_manifest(
                set_id=set_id, vm_uuid=vm["uuid"], vm_name=vm["name"], host=socket.gethostname(),
                started=started, completed=completed, set_type=plan.set_type, chain_id=plan.chain_id,
                parent={"set_id": plan.parent["set_id"], "manifest_sha256": plan.parent["manifest_sha256"]} if plan.parent else None,
                checkpoint=plan.checkpoint, consistency=quiesce.consistency, period=self.p.period, series=self.p.series, disks=disks_out,
                skipped_disks=plan.skipped,
                files={rel: {"size": hashes[rel][1], "sha256": hashes[rel][0], "role": role} for rel, role in files.items()},
                tool={"name": "vmbackup.libvirt", "version": COLLECTION_VERSION, "qemu_img": self.qemu_img.version()},
                stats={"duration_s": round(duration, 3), "copy_s": round(copy_seconds, 3), "bytes_written": total_bytes,
                       "data_bytes": data_bytes, "job_data_processed": int(job_stats.get("data_processed", 0) or 0),
                       "transport": transport, "compress": self.p.compress, "timings": self.phases.public()},
            )
            os.unlink(os.path.join(staging, RUN_FILE))
            final = repo.commit(vm["uuid"], set_id, staging, manifest)
            self.phases.add("commit", time.monotonic() - commit_started)
        except BaseException:
            # Undo this run (failure contract): its job, checkpoint, sentinels, run directory,
            # staging data; never another tool's job (one may have started after ours ended) or a
            # checkpoint that existed before. Then re-raise.
            # Each step on its own: libvirt failing (the domain undefined meanwhile) must not keep
            # the run directory and staging data below from being removed.
            try:
                if plan.set_type != "copy" and lv.is_active(dom):
                    lv.abort_backup_into(dom, run_dir if run_dir is not None else staging)
            except Exception as exc:  # pylint: disable=broad-exception-caught
                self.warnings.append(f"could not abort the backup job of the failed run: {exc}")
            try:
                if checkpoint_is_ours and lv.lookup_checkpoint(dom, plan.checkpoint) is not None:
                    error = self._delete_checkpoint(dom, plan.checkpoint)
                    if error:
                        self.warnings.append(f"could not delete checkpoint {plan.checkpoint} of the failed run: {error}")
                if armed:
                    self._remove_armed(dom, plan, armed)
            except Exception as exc:  # pylint: disable=broad-exception-caught
                self.warnings.append(f"could not undo the checkpoint {plan.checkpoint} of the failed run: {exc}")
            if run_dir_made:
                try:
                    repo_mod.remove_run_dir(self.p.scratch_dir, vm["uuid"], run_name)
                except (OSError, VmBackupError) as exc:
                    self.warnings.append(f"could not remove the run directory {run_dir} of the failed run: {exc}")
            if os.path.isdir(staging):
                repo_mod.remove_tree(staging)
            raise
        duration = time.monotonic() - started_mono
        return {
            "changed": True,
            "msg": f"{plan.set_type} backup {set_id} of {vm['name']} committed: {total_bytes} bytes in {duration:.1f}s",
            "set_id": set_id,
            "type": plan.set_type,
            "reason": plan.reason,
            "chain_id": plan.chain_id,
            "parent": plan.parent["set_id"] if plan.parent else None,
            "checkpoint": plan.checkpoint,
            "disks": [_disk_result(d) for d in disks_out],
            "skipped_disks": plan.skipped,
            "bytes_written": total_bytes,
            "data_bytes": data_bytes,
            "duration_s": round(duration, 3),
            "throughput_mib_s": round(data_bytes / MIB / copy_seconds, 1) if copy_seconds > 0 else None,
            "read_mib_s": transferred["mib_s"],
            "estimated_bytes": plan.estimated_bytes,
            "repository_path": final,
            "vm": dict(vm, state=plan.vm_state),
            "period": self.p.period,
            "series": self.p.series,
            "consistency": quiesce.consistency,
            "quiesce": quiesce.public(),
            "transport": transport,
            "compress": self.p.compress,
            "cleaned_up": self.cleaned,
            "would_clean_up": [],
        }

    def _pull_transfer(self, dom, plan: Plan, targets: dict[str, str], run_dir: str, progress: Progress,
                       compress: bool) -> dict[str, t.Any]:
        """Read every disk of a running pull-mode job into its staging file, disks in parallel up to
        ``workers``: a full disk with qemu-img convert over NBD, an incremental one's dirty extents
        (the parent checkpoint's bitmap) with _nbd.copy_extents. A failure stops the other disks'
        copies (their job is aborted, which ends every NBD connection) before it propagates."""
        exports = lv.pull_exports(dom)
        missing = [pd.disk.target for pd in plan.disks if pd.disk.target not in exports]
        if missing:
            raise VmBackupError("BACKUP_FAILED", f"the pull-mode job exports no disk {', '.join(missing)}", phase="backup-begin")
        cancel = threading.Event()
        bytes_read = {}

        def one(pd: PlannedDisk) -> None:
            export = exports[pd.disk.target]
            dst = targets[pd.disk.target]
            if pd.method == "incremental":
                if not export.bitmap:
                    raise VmBackupError("BACKUP_FAILED", f"the pull-mode job exports no dirty bitmap for disk {pd.disk.target}",
                                        phase="transfer")
                extents = _nbd.dirty_extents(export.socket, export.export, export.bitmap, pd.virtual_size)
                stats = _nbd.copy_extents(export.socket, export.export, extents, dst, pd.virtual_size, work_dir=run_dir,
                                          compress=compress, workers=min(16, self.p.workers or 4), progress=progress,
                                          qemu_img=self.qemu_img.binary, cancel=cancel)
                bytes_read[pd.disk.target] = int(stats.get("bytes_read", 0))
                return
            done = [0]

            def advance(fraction: float) -> None:
                now = int(fraction * pd.estimated_bytes)
                if now > done[0]:
                    progress.add(now - done[0])
                    done[0] = now

            self.qemu_img.convert_nbd(export.socket, export.export, dst, compress=compress, on_progress=advance, cancel=cancel)
            advance(1.0)
            bytes_read[pd.disk.target] = pd.allocated_bytes

        workers = max(1, min(self.p.workers or os.cpu_count() or 1, len(plan.disks)))
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
        try:
            futures = [pool.submit(one, pd) for pd in plan.disks]
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except BaseException as exc:
            cancel.set()
            try:
                lv.abort_backup_into(dom, run_dir)  # ends the readers' NBD connections
            except Exception:  # pylint: disable=broad-exception-caught
                pass  # the domain is gone: so is its job (the rollback says what it could not undo)
            pool.shutdown(wait=True)
            if isinstance(exc, VmBackupError) and not lv.active_or_false(dom):
                raise VmBackupError("VM_STOPPED_DURING_BACKUP", f"the VM stopped while its backup was read: {exc.msg}",
                                    phase="transfer") from None
            raise
        finally:
            pool.shutdown(wait=True)
        return {"data_processed": sum(bytes_read.values())}

    # ------------------------------------------------------------------ quiesce
    def _thaw_leftover(self, dom) -> None:
        """Thaw (check mode: report) a guest that a killed run left frozen."""
        if not lv.is_active(dom):
            return
        if self.check_mode:
            self._would_thaw = _quiesce.leftover(dom)
        elif _quiesce.thaw_leftover(dom, self.p.uri):
            self._thawed = True
            self.cleaned.append(THAWED_NOTE)

    def _note_quiesce(self, quiesce: _quiesce.Quiesce) -> None:
        quiesce.thawed_leftover = quiesce.thawed_leftover or self._thawed
        if quiesce.thawed_leftover and not self._thawed:
            self.cleaned.append(THAWED_NOTE)
        # auto's fallback says so: in the result always, as a warning when it is an anomaly (an
        # agent channel that does not answer, a freeze too slow), not a VM without any agent.
        if self.p.quiesce == "auto" and quiesce.consistency == "crash" and not _quiesce.no_agent_channel(quiesce.reason):
            self.warnings.append(f"quiesce=auto: the backup is crash-consistent only: {quiesce.reason}")

    @staticmethod
    def _arm_sentinels(dom, plan: Plan, armed: list[tuple[str, str]]) -> None:
        """Give the new checkpoint a size sentinel on every disk it has a bitmap for, before the
        job creates the checkpoint: a shrink in between clears it, which errs on the safe side."""
        nodes = lv.block_nodes(dom)
        for pd in plan.disks:
            if not pd.disk.checkpointable:
                continue
            node = nodes.get(pd.disk.target)
            if node is None:
                raise VmBackupError("BACKUP_FAILED", f"QEMU runs no block node libvirt names for disk {pd.disk.target}")
            name = lv.sentinel_name(plan.checkpoint)
            if name in node.bitmaps:
                # A stale one of an interrupted run (its checkpoint does not exist): start afresh.
                error = lv.remove_bitmap_live(dom, node.node, name)
                if error:
                    raise VmBackupError("BACKUP_FAILED", f"cannot remove the stale size sentinel {name} of {pd.disk.target}: {error}")
            lv.arm_sentinel(dom, node, plan.checkpoint)
            armed.append((pd.disk.target, node.node))

    def _remove_armed(self, dom, plan: Plan, armed: list[tuple[str, str]]) -> None:
        """Remove the sentinels this run armed (rollback); from the images when QEMU is gone."""
        name = lv.sentinel_name(plan.checkpoint)
        sources = {pd.disk.target: pd.disk.source for pd in plan.disks}
        for target, node in armed:
            try:
                if lv.is_active(dom):
                    lv.remove_bitmap_live(dom, node, name)  # fails harmlessly when already gone
                elif name in self.qemu_img.bitmaps(sources[target]):
                    self.qemu_img.remove_bitmap(sources[target], name)
            except VmBackupError as exc:
                self.warnings.append(f"could not remove the size sentinel {name} of {target} of the failed run: {exc.msg}")

    @staticmethod
    def _disk_targets(plan: Plan) -> set[str]:
        # Only real disks may be named in <domainbackup>; cdroms and empty drives may not.
        return {s["target"] for s in plan.skipped if s["device"] in ("disk", "lun") and s["source"]}

    @staticmethod
    def _write_side(staging: str, rel: str, data: bytes) -> None:
        repo_mod.write_file_atomic(os.path.join(staging, rel), data)

    @staticmethod
    def _firmware_sources(xml: str, vm_uuid: str) -> t.Iterator[tuple[str, int, str, str]]:
        """(path in the set, directory descriptor, name, shown path) of each NVRAM and TPM file.

        Their directories belong to libvirt-qemu and swtpm: the TPM tree is walked without ever
        descending into a link, and each file must be opened relative to its descriptor without
        following a link. A descriptor is valid until the next item is asked for.
        """
        nvram = lv.nvram_path(xml)
        if nvram:
            try:
                dir_fd = os.open(os.path.dirname(nvram), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                dir_fd = None
            if dir_fd is not None:
                try:
                    yield "nvram.fd", dir_fd, os.path.basename(nvram), nvram
                finally:
                    os.close(dir_fd)
        tpm_dir = f"/var/lib/libvirt/swtpm/{vm_uuid}"
        if not lv.has_tpm(xml):
            return
        try:
            tpm_fd = os.open(tpm_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return  # no state yet (or a link in its place: not followed)
        try:
            for root, _dirs, names, root_fd in os.fwalk(".", dir_fd=tpm_fd, follow_symlinks=False):
                for name in sorted(names):
                    rel = os.path.normpath(os.path.join("tpm", root, name))
                    yield rel, root_fd, name, f"{tpm_dir}/{os.path.relpath(rel, 'tpm')}"
        finally:
            os.close(tpm_fd)

    def _copy_firmware(self, dom, staging: str, vm_uuid: str) -> dict[str, str]:
        """NVRAM and TPM state into the staging set; a file that is a link (or a FIFO) is skipped
        with a warning, never followed."""
        files = {}
        for rel, dir_fd, name, shown in self._firmware_sources(lv.domain_xml(dom, inactive=True), vm_uuid):
            if rel == "nvram.fd":
                try:
                    copied = repo_mod.copy_regular_at(dir_fd, name, os.path.join(staging, rel))
                except FileNotFoundError:
                    copied = None
                if copied:
                    files[rel] = "nvram"
                elif copied is False:
                    self.warnings.append(f"NVRAM {shown} is a link or not a regular file; it is not backed up")
                continue
            os.makedirs(os.path.dirname(os.path.join(staging, rel)), repo_mod.DIR_MODE_PRIVATE, exist_ok=True)
            if repo_mod.copy_regular_at(dir_fd, name, os.path.join(staging, rel)):
                files[rel] = "tpm"
            else:
                self.warnings.append(f"TPM state {shown} is a link or not a regular file; it is not backed up")
        return files

    def _firmware_digests(self, xml: str, vm_uuid: str) -> dict[str, str] | None:
        """sha256 of each NVRAM and TPM file as _copy_firmware would store it; None when one is a
        link or not a regular file (in doubt: the economy then copies)."""
        digests = {}
        for rel, dir_fd, name, _shown in self._firmware_sources(xml, vm_uuid):
            digest = sha256_regular_at(dir_fd, name)
            if digest is False:
                return None
            if digest is not None:
                digests[rel] = digest
        return digests

    def _hash_all(self, staging: str, rels: list[str]) -> dict[str, tuple[str, int]]:
        """fsync and sha256 every file of the set, disks in parallel (hashlib drops the GIL).

        The fsyncs run beside the checksums (the disk writes back what the hash reads from the
        page cache: measured on 2 GiB here, fsync 1.0 s then sha256 2.0 s one after the other);
        both are complete before this returns, so nothing is committed before it is durable.
        """
        workers = self.p.workers or os.cpu_count() or 1
        paths = {rel: os.path.join(staging, rel) for rel in rels}
        for path in paths.values():
            os.chmod(path, repo_mod.FILE_MODE)

        def one(rel: str) -> tuple[str, tuple[str, int]]:
            return rel, repo_mod.sha256_file(paths[rel])

        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool, \
                concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(rels), 4))) as syncer:
            synced = [syncer.submit(repo_mod.fsync_file, paths[rel]) for rel in rels]
            hashes = dict(pool.map(one, rels))
            for future in synced:
                future.result()
        return hashes

    # ------------------------------------------------------------------ results without a new set
    def _unchanged_result(self, repo, repo_state, vm, manifest: dict[str, t.Any], started_mono: float, vm_state: str,
                          reason: str) -> dict[str, t.Any]:
        """An existing set (of the period, or of an unchanged shut-off VM), with every field a
        run that takes a set returns."""
        set_id = manifest["set_id"]
        return {
            "changed": False,
            "msg": f"set {set_id} is kept, nothing to do: {reason}",
            "set_id": set_id,
            "type": manifest["type"],
            "reason": reason,
            "chain_id": manifest.get("chain_id"),
            "parent": (manifest.get("parent") or {}).get("set_id"),
            "checkpoint": manifest.get("checkpoint"),
            "disks": [_disk_result(d) for d in manifest["disks"]],
            "skipped_disks": manifest.get("skipped_disks", []),
            "bytes_written": 0,
            "data_bytes": 0,
            "duration_s": round(time.monotonic() - started_mono, 3),
            "throughput_mib_s": None,
            "read_mib_s": None,
            "estimated_bytes": 0,
            "repository_path": repo.set_dir(vm["uuid"], set_id),
            "vm": dict(vm, state=vm_state),
            "period": self.p.period,
            "series": self.p.series,
            "repository_free_bytes": free_bytes(repo.path, repo_state.free_bytes),
            "consistency": manifest.get("consistency"),
            "quiesce": None,  # no new point in time was taken
            "transport": None,  # nothing was read
            "cleaned_up": self.cleaned,
            "would_clean_up": [THAW_NOTE] if self._would_thaw else [],
        }

    def _check_mode_result(self, repo, vm, plan: Plan, repo_state, started_mono: float,
                           predicted: _quiesce.Quiesce | None) -> dict[str, t.Any]:
        leftovers = repo.leftovers(vm["uuid"]) if repo_state.exists else []
        if self._would_thaw:
            leftovers = [THAW_NOTE] + leftovers
        if predicted is None:
            predicted = _quiesce.Quiesce(self.p.quiesce, reason=_quiesce.skip_reason(self.p.quiesce, plan.vm_state)[0])
        predicted.thawed_leftover = self._would_thaw
        would = plan.public()
        return {
            "changed": True,
            "msg": f"would take a {plan.set_type} backup of {vm['name']} ({plan.estimated_bytes} bytes estimated): {plan.reason}",
            "set_id": None,
            "type": plan.set_type,
            "reason": plan.reason,
            "chain_id": plan.chain_id,
            "parent": would["parent"],
            "checkpoint": plan.checkpoint,
            # The fields of a committed disk (no file yet; the estimate as size and bytes).
            "disks": [_disk_result(dict(d, file=None, size=d["estimated_bytes"])) for d in would["disks"]],
            "skipped_disks": plan.skipped,
            "estimated_bytes": plan.estimated_bytes,
            "bytes_written": 0,
            "data_bytes": 0,
            "duration_s": round(time.monotonic() - started_mono, 3),
            "throughput_mib_s": None,
            "read_mib_s": None,
            "repository_path": None,
            "vm": dict(vm, state=plan.vm_state),
            "period": self.p.period,
            "series": self.p.series,
            # Of the repository, or of the nearest existing directory when it does not exist yet.
            "repository_free_bytes": repo_state.free_bytes,
            # A prediction: the consistency a real run would most likely get (the agent answered
            # guest-ping); nothing was frozen.
            "consistency": predicted.consistency,
            "quiesce": predicted.public(),
            "transport": self._transport_of(plan),
            "cleaned_up": [],
            "would_clean_up": leftovers,
        }
