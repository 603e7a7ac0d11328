# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The on-disk repository (format version 1): layout, safety checks, listing and committing sets.

This module is private to the vmbackup.libvirt collection; it is not a public API.

Layout::

    <repo>/vmbackup-repo.json
    <repo>/vms/<vm-uuid>/lock
    <repo>/vms/<vm-uuid>/sets/<set-id>/manifest.json, disks/<target>.qcow2, domain.xml, ...
    <repo>/vms/<vm-uuid>/sets/<set-id>.verify.json
    <repo>/vms/<vm-uuid>/.incomplete/<set-id>/   (staging)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import typing as t
import uuid

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

REPO_MARKER = "vmbackup-repo.json"
REPO_FORMAT = "vmbackup.libvirt/repository"
REPO_VERSION = 1

# Directories on the path to a staging directory must be traversable (not listable) by QEMU,
# which runs as libvirt-qemu and writes push-mode backup targets itself. Committed sets are 0700.
DIR_MODE_TRAVERSE = 0o711
DIR_MODE_PRIVATE = 0o700
FILE_MODE = 0o600
FILE_MODE_COMMITTED = 0o400

# 64 KiB: the buffer stays in the CPU cache between read and hash, and (below malloc's mmap
# threshold) costs no fresh pages per file. Measured here: 1 GiB in 0.93 s with 64 KiB,
# 1.25 s with 256 KiB-4 MiB buffers; a plain read(4 MiB) loop took 0.94-1.15 s.
_HASH_CHUNK = 64 * 1024


def validate_repository_path(path: t.Any) -> str:
    """An absolute, normalised path with no ``..``: PATH_ESCAPE otherwise. Pure, no I/O."""
    if not isinstance(path, str) or not path:
        raise VmBackupError("PATH_ESCAPE", "repository must be an absolute path")
    if "\x00" in path or "\n" in path:
        raise VmBackupError("PATH_ESCAPE", "repository path contains a NUL or newline character")
    if not path.startswith("/"):
        raise VmBackupError("PATH_ESCAPE", f"repository {path!r} is relative; give an absolute path")
    parts = path.split("/")
    if ".." in parts:
        raise VmBackupError("PATH_ESCAPE", f"repository {path!r} contains '..'")
    # normpath keeps a leading "//" (POSIX allows it a special meaning); Linux does not.
    norm = "/" + os.path.normpath(path).lstrip("/")
    if norm == "/":
        raise VmBackupError("PATH_ESCAPE", "repository cannot be the root directory")
    return norm


def trusted_owners() -> set[int]:
    """Users who may own a directory root acts in: root and the module's own user."""
    return {0, os.geteuid()}


def check_trusted_path(path: str, what: str, allow_unsafe_permissions: bool = False) -> None:
    """Refuse (UNSAFE_TARGET) a directory that another user could influence.

    Every existing component of ``path``, from ``/`` down, must be a real directory (not a
    symbolic link) owned by root or the module's user. The directory itself must not be
    writable by group or others; a directory above it may be world-writable only when it is
    sticky and root-owned (``/tmp``, ``/var/tmp``) and the next component is ours, because the
    sticky bit then keeps others from renaming or removing that component.
    ``allow_unsafe_permissions`` relaxes only the write-permission rules, never ownership or links.
    Components that do not exist yet are not checked (the caller creates them private).
    """
    owners = trusted_owners()
    current = "/"
    parts = [p for p in path.split("/") if p]
    for index, part in enumerate([""] + parts):
        current = os.path.join(current, part) if part else "/"
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return
        last = index == len(parts)
        if stat.S_ISLNK(st.st_mode):
            raise VmBackupError("UNSAFE_TARGET", f"{what} {path}: {current} is a symbolic link; give the real path",
                                unsafe_path=current)
        if not stat.S_ISDIR(st.st_mode):
            raise VmBackupError("UNSAFE_TARGET", f"{what} {path}: {current} is not a directory", unsafe_path=current)
        if st.st_uid not in owners:
            raise VmBackupError(
                "UNSAFE_TARGET",
                f"{what} {path}: {current} is owned by uid {st.st_uid}, not by root; that user could replace what "
                "root writes there", unsafe_path=current)
        mode = stat.S_IMODE(st.st_mode)
        writable = mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky_ok = not last and bool(mode & stat.S_ISVTX) and st.st_uid == 0
        if writable and not sticky_ok and not allow_unsafe_permissions:
            who = "world" if mode & stat.S_IWOTH else "group"
            raise VmBackupError(
                "UNSAFE_TARGET",
                f"{what} {path}: {current} is {who}-writable (mode {mode:04o}); other users could replace what root "
                "writes there. chmod it, or set allow_unsafe_permissions", unsafe_path=current)


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


@dataclasses.dataclass
class RepoState:
    path: str
    exists: bool
    repo_id: str | None
    free_bytes: int
    warnings: list[str]


def inspect_repository(path: str, allow_unsafe_permissions: bool = False) -> RepoState:
    """Look at a repository without changing anything; raise on anything unsafe."""
    warnings: list[str] = []
    if os.path.islink(path):
        raise VmBackupError("UNSAFE_TARGET", f"repository {path} is a symbolic link; give the real path")
    # Check the nearest existing ancestor too: a new repository must not be created through a link.
    probe = _nearest_existing(path)
    real = os.path.realpath(probe)
    if real != probe:
        raise VmBackupError(
            "UNSAFE_TARGET", f"repository {path} passes through a symbolic link ({probe} resolves to {real}); give the real path"
        )
    st = os.stat(probe)
    if not stat.S_ISDIR(st.st_mode):
        raise VmBackupError("UNSAFE_TARGET", f"{probe} exists and is not a directory")
    exists = probe == path
    if exists:
        _check_mode(path, st, allow_unsafe_permissions)
    repo_id = None
    if exists:
        marker = os.path.join(path, REPO_MARKER)
        if os.path.lexists(marker):
            repo_id = read_marker(path)["repo_id"]
        elif _not_empty(path):
            raise VmBackupError(
                "UNSAFE_TARGET",
                f"{path} is not empty and is not a vmbackup repository (no {REPO_MARKER}); "
                "give an empty or new directory",
            )
    vfs = os.statvfs(probe)
    return RepoState(path=path, exists=exists, repo_id=repo_id, free_bytes=vfs.f_bavail * vfs.f_frsize, warnings=warnings)


def _not_empty(path: str) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is not None


def _check_mode(path: str, st: os.stat_result, allow_unsafe_permissions: bool) -> None:
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not allow_unsafe_permissions:
        who = "world" if st.st_mode & stat.S_IWOTH else "group"
        raise VmBackupError(
            "UNSAFE_TARGET",
            f"repository {path} is {who}-writable (mode {stat.S_IMODE(st.st_mode):04o}); "
            "other users could replace backup data. chmod it or set allow_unsafe_permissions",
        )


def read_marker(path: str) -> dict[str, t.Any]:
    marker = os.path.join(path, REPO_MARKER)
    try:
        with open(marker, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise VmBackupError("REPOSITORY_FORMAT", f"cannot read {marker}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != REPO_FORMAT:
        raise VmBackupError("REPOSITORY_FORMAT", f"{marker} is not a vmbackup.libvirt repository marker")
    if not isinstance(data.get("repo_id"), str):
        raise VmBackupError("REPOSITORY_FORMAT", f"{marker} has no repo_id")
    if data.get("format_version") != REPO_VERSION:
        raise VmBackupError(
            "REPOSITORY_FORMAT",
            f"repository format version {data.get('format_version')!r} is not supported (this collection reads {REPO_VERSION})",
        )
    return data


def qemu_can_traverse(path: str) -> str | None:
    """The first directory on ``path`` that others cannot traverse, or None when all can.

    QEMU runs as an unprivileged user (libvirt-qemu) and opens push-mode targets by path.
    """
    current = "/"
    for part in [p for p in path.split("/") if p]:
        current = os.path.join(current, part)
        if not os.path.exists(current):
            break
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, data: bytes, mode: int = FILE_MODE) -> None:
    """Temporary name, fsync, rename, fsync the directory: never a half file under its name."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))


def sha256_file(path: str) -> tuple[str, int]:
    """Streamed sha256 and size of a file; memory does not grow with the file.

    Read sequentially in 64 KiB chunks, without following a symbolic link in place of the file.
    """
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(_HASH_CHUNK)
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
    finally:
        os.close(fd)
    return digest.hexdigest(), size


def makedir(path: str, mode: int) -> bool:
    """mkdir with an exact mode (umask ignored); False when it already existed."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        os.chmod(path, mode)
        return False
    os.chmod(path, mode)
    return True


class Repository:
    """A repository on this host. Read-only methods never create anything."""

    def __init__(self, path: str) -> None:
        self.path = path

    # -- layout -------------------------------------------------------------
    def vm_dir(self, vm_uuid: str) -> str:
        return os.path.join(self.path, "vms", vm_uuid)

    def sets_dir(self, vm_uuid: str) -> str:
        return os.path.join(self.vm_dir(vm_uuid), "sets")

    def staging_root(self, vm_uuid: str) -> str:
        return os.path.join(self.vm_dir(vm_uuid), ".incomplete")

    def set_dir(self, vm_uuid: str, set_id: str) -> str:
        return os.path.join(self.sets_dir(vm_uuid), set_id)

    def lock_path(self, vm_uuid: str) -> str:
        return os.path.join(self.vm_dir(vm_uuid), "lock")

    # -- creation -----------------------------------------------------------
    def initialise(self) -> bool:
        """Create the repository (and missing parents, 0711 whatever the umask) with its marker;
        True if anything was created."""
        created = False
        missing = []
        probe = self.path
        while not os.path.isdir(probe):
            missing.append(probe)
            probe = os.path.dirname(probe)
        for path in reversed(missing):
            makedir(path, DIR_MODE_TRAVERSE)
            created = True
        os.chmod(self.path, DIR_MODE_TRAVERSE)
        marker = os.path.join(self.path, REPO_MARKER)
        if not os.path.exists(marker):
            data = {
                "format": REPO_FORMAT,
                "format_version": REPO_VERSION,
                "repo_id": str(uuid.uuid4()),
                "created": _manifest.iso(_manifest.utcnow()),
            }
            write_file_atomic(marker, _manifest.dumps(data), 0o644)
            created = True
        makedir(os.path.join(self.path, "vms"), DIR_MODE_TRAVERSE)
        return created

    def prepare_vm(self, vm_uuid: str) -> None:
        makedir(self.vm_dir(vm_uuid), DIR_MODE_TRAVERSE)
        makedir(self.sets_dir(vm_uuid), DIR_MODE_PRIVATE)
        makedir(self.staging_root(vm_uuid), DIR_MODE_TRAVERSE)

    # -- reading ------------------------------------------------------------
    def set_ids(self, vm_uuid: str) -> list[str]:
        """Committed set ids, oldest first. A set is committed when its manifest exists."""
        sets_dir = self.sets_dir(vm_uuid)
        if not os.path.isdir(sets_dir):
            return []
        ids = []
        for entry in os.scandir(sets_dir):
            if entry.is_dir(follow_symlinks=False) and _manifest.is_set_id(entry.name):
                if os.path.isfile(os.path.join(entry.path, _manifest.MANIFEST_NAME)):
                    ids.append(entry.name)
        return sorted(ids)

    def all_ids(self, vm_uuid: str) -> list[str]:
        """Every set id in use for the VM, committed or staged (to pick a new unique one)."""
        ids = []
        for root in (self.sets_dir(vm_uuid), self.staging_root(vm_uuid)):
            if os.path.isdir(root):
                ids.extend(e.name for e in os.scandir(root) if _manifest.is_set_id(e.name))
        return sorted(ids)

    def read_manifest_bytes(self, vm_uuid: str, set_id: str) -> bytes:
        path = os.path.join(self.set_dir(vm_uuid, set_id), _manifest.MANIFEST_NAME)
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise VmBackupError("SET_NOT_FOUND", f"cannot read the manifest of set {set_id}: {exc.strerror}", set_id=set_id) from None

    def read_manifest(self, vm_uuid: str, set_id: str) -> tuple[dict[str, t.Any], str]:
        """The parsed manifest and the sha256 of its bytes (what a child records as its parent)."""
        data = self.read_manifest_bytes(vm_uuid, set_id)
        return _manifest.loads(data, set_id), _manifest.sha256_bytes(data)

    def read_verify_sidecar(self, vm_uuid: str, set_id: str) -> dict[str, t.Any] | None:
        path = os.path.join(self.sets_dir(vm_uuid), f"{set_id}.verify.json")
        try:
            with open(path, "rb") as fh:
                data = json.loads(fh.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"outcome": "unreadable"}
        return data if isinstance(data, dict) else {"outcome": "unreadable"}

    # -- staging and commit ---------------------------------------------------
    def leftovers(self, vm_uuid: str) -> list[str]:
        root = self.staging_root(vm_uuid)
        if not os.path.isdir(root):
            return []
        return sorted(os.path.join(root, e.name) for e in os.scandir(root))

    def remove_leftovers(self, vm_uuid: str) -> list[str]:
        removed = []
        for path in self.leftovers(vm_uuid):
            remove_tree(path)
            removed.append(path)
        if removed:
            fsync_dir(self.staging_root(vm_uuid))
        return removed

    def create_staging(self, vm_uuid: str, set_id: str) -> str:
        staging = os.path.join(self.staging_root(vm_uuid), set_id)
        os.mkdir(staging, DIR_MODE_TRAVERSE)
        os.chmod(staging, DIR_MODE_TRAVERSE)
        makedir(os.path.join(staging, "disks"), DIR_MODE_TRAVERSE)
        return staging

    def commit(self, vm_uuid: str, set_id: str, staging: str, manifest: dict[str, t.Any]) -> str:
        """Write the manifest last, then rename the staging directory into sets/."""
        for root, dirs, files in os.walk(staging):
            for name in files:
                os.chmod(os.path.join(root, name), FILE_MODE_COMMITTED)
            for name in dirs:
                os.chmod(os.path.join(root, name), DIR_MODE_PRIVATE)
        os.chmod(staging, DIR_MODE_PRIVATE)
        write_file_atomic(os.path.join(staging, _manifest.MANIFEST_NAME), _manifest.dumps(manifest), FILE_MODE_COMMITTED)
        final = self.set_dir(vm_uuid, set_id)
        os.rename(staging, final)
        fsync_dir(self.sets_dir(vm_uuid))
        fsync_dir(self.staging_root(vm_uuid))
        return final


def remove_tree(path: str) -> None:
    """Remove a staging tree even where committed files were made read-only."""
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return

    def _onerror(func, p, _exc):
        os.chmod(os.path.dirname(p), DIR_MODE_PRIVATE)
        func(p)

    shutil.rmtree(path, onerror=_onerror)  # pylint: disable=deprecated-argument
