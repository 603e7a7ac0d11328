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

Trust: the module runs as root, so whoever can change a directory root writes in can make root
write, chmod or delete elsewhere (a symbolic link planted for ``lock`` or ``.incomplete``).
``check_trusted_path`` refuses a repository that anyone but root (or the module's user) owns or
can write, on every component from ``/``. Everything this module then does inside it goes
through directory file descriptors: each directory is opened ``O_DIRECTORY | O_NOFOLLOW``
relative to its parent and its owner and mode are checked on the open descriptor (``fstat``),
files are opened ``O_NOFOLLOW`` relative to that descriptor, and modes are set with ``fchmod``.
No component is looked up twice by name, so none can be swapped for a link between check and use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import stat
import typing as t
import uuid

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

REPO_MARKER = "vmbackup-repo.json"
REPO_FORMAT = "vmbackup.libvirt/repository"
REPO_VERSION = 1

# Directories on the path to a staging directory must be traversable (not listable) by QEMU,
# which runs as libvirt-qemu and writes push-mode backup targets itself: the repository, vms/,
# vms/<uuid>/, .incomplete/ and the staging directory with its disks/. Everything else (sets/,
# committed sets) is 0700, every file 0600 from its creation (umask 077), committed files 0400.
DIR_MODE_TRAVERSE = 0o711
DIR_MODE_PRIVATE = 0o700
FILE_MODE = 0o600
FILE_MODE_COMMITTED = 0o400

# 64 KiB: the buffer stays in the CPU cache between read and hash, and (below malloc's mmap
# threshold) costs no fresh pages per file. Measured here: 1 GiB in 0.93 s with 64 KiB,
# 1.25 s with 256 KiB-4 MiB buffers; a plain read(4 MiB) loop took 0.94-1.15 s.
_HASH_CHUNK = 64 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted in place of a file must not hang the run on open.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Manifests, markers, sidecars and run files are small; a larger one is not ours.
_SMALL_FILE_LIMIT = 64 * 1024 * 1024


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


# --------------------------------------------------------------------------- trusted directory walks


def _check_dir(st: os.stat_result, what: str, path: str, current: str, *, target: bool, modes: bool,
               allow_unsafe_permissions: bool, owners: bool = True) -> None:
    """The trust rules for one directory, applied to the stat of its open descriptor.

    ``target``: ``current`` is the directory acted in (no sticky exception for it).
    ``modes``: check write permissions too (False: links and owners only).
    ``owners``: check the owner (False: links only, for directories libvirt gives to its own
    users, such as the NVRAM directory, where every name is created exclusively instead).
    """
    if not stat.S_ISDIR(st.st_mode):
        raise VmBackupError("UNSAFE_TARGET", f"{what} {path}: {current} is not a directory", unsafe_path=current)
    if owners and st.st_uid not in trusted_owners():
        raise VmBackupError(
            "UNSAFE_TARGET",
            f"{what} {path}: {current} is owned by uid {st.st_uid}, not by root; that user could replace what "
            "root writes there", unsafe_path=current)
    if not modes or allow_unsafe_permissions:
        return
    mode = stat.S_IMODE(st.st_mode)
    writable = mode & (stat.S_IWGRP | stat.S_IWOTH)
    # A root-owned sticky directory (/tmp, /var/tmp) above: others cannot rename or remove the
    # next component, which is checked to be ours in turn.
    sticky_ok = not target and bool(mode & stat.S_ISVTX) and st.st_uid == 0
    if writable and not sticky_ok:
        who = "world" if mode & stat.S_IWOTH else "group"
        raise VmBackupError(
            "UNSAFE_TARGET",
            f"{what} {path}: {current} is {who}-writable (mode {mode:04o}); other users could replace what root "
            "writes there. chmod it, or set allow_unsafe_permissions", unsafe_path=current)


def _open_child(parent_fd: int, name: str, what: str, path: str, current: str) -> int:
    """Open directory ``name`` under ``parent_fd`` without following a link (FileNotFoundError if missing)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except OSError:
            raise exc from None
        if stat.S_ISLNK(st.st_mode):
            raise VmBackupError("UNSAFE_TARGET", f"{what} {path}: {current} is a symbolic link; give the real path",
                                unsafe_path=current) from None
        raise VmBackupError("UNSAFE_TARGET", f"{what} {path}: {current} is not a directory", unsafe_path=current) from None


_MAX_ROOT_LINKS = 16


def _root_link(parent_fd: int, name: str) -> str | None:
    """The target of ``name`` when it is a symbolic link that only root could have made and can
    change: owned by root, in a root-owned directory nobody else may write. None otherwise."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except OSError:
        return None
    parent = os.fstat(parent_fd)
    if not stat.S_ISLNK(st.st_mode) or st.st_uid != 0 or parent.st_uid != 0 or parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None
    return os.readlink(name, dir_fd=parent_fd)


def _walk(path: str, what: str, *, modes: bool, allow_unsafe_permissions: bool, target: bool,
          missing_ok: bool, shown: str | None = None, owners: bool = True,
          create_mode: int | None = None, follow_root_links: bool = False, root_links: int = 0) -> tuple[int, str]:
    """Open ``path`` from ``/``, one component at a time, each checked on its descriptor.

    Returns the descriptor of the deepest directory reached and its path: ``path`` itself, or with
    ``missing_ok`` the deepest existing ancestor (a missing component is FileNotFoundError otherwise).
    With ``create_mode``, a missing last component is created with exactly that mode.

    With ``follow_root_links`` (libvirt's own directories), a link that only root controls (see
    _root_link) is followed, so that an administrator's ``/var/lib/libvirt -> /srv/libvirt`` works;
    any other link on the way is UNSAFE_TARGET. ``root_links`` counts the links followed so far.
    """
    shown = shown or path
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", _DIR_FLAGS)
    current = "/"
    checks = {"modes": modes, "allow_unsafe_permissions": allow_unsafe_permissions, "owners": owners}
    try:
        _check_dir(os.fstat(fd), what, shown, current, target=target and not parts, **checks)
        for index, part in enumerate(parts):
            nxt = os.path.join(current, part)
            last = index == len(parts) - 1
            link = _root_link(fd, part) if follow_root_links else None
            if link is not None:
                if root_links >= _MAX_ROOT_LINKS:
                    raise VmBackupError("UNSAFE_TARGET", f"{what} {shown}: too many symbolic links", unsafe_path=nxt)
                resolved = os.path.normpath(os.path.join(current, link, *parts[index + 1:]))
                os.close(fd)
                fd = -1
                return _walk(resolved, what, modes=modes, allow_unsafe_permissions=allow_unsafe_permissions, target=target,
                             missing_ok=missing_ok, shown=shown, owners=owners, create_mode=create_mode,
                             follow_root_links=True, root_links=root_links + 1)
            try:
                child = _open_child(fd, part, what, shown, nxt)
            except FileNotFoundError:
                if missing_ok:
                    return fd, current
                if create_mode is None or not last:
                    raise
                child, _created = _ensure_dir_at(fd, part, create_mode, what, shown, nxt)
            os.close(fd)
            fd, current = child, nxt
            _check_dir(os.fstat(fd), what, shown, current, target=target and last, **checks)
        return fd, current
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


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
    fd, _reached = _walk(path, what, modes=True, allow_unsafe_permissions=allow_unsafe_permissions, target=True,
                         missing_ok=True)
    os.close(fd)


def open_dir(path: str, what: str = "directory", *, modes: bool = False, allow_unsafe_permissions: bool = False,
             target: bool = True, shown: str | None = None, owners: bool = True, create_mode: int | None = None,
             follow_root_links: bool = False) -> int:
    """A descriptor of the existing directory ``path``, reached without following any link, every
    component owned by root or the module's user (unless ``owners`` is False; with ``modes`` not
    writable by others either). The caller closes it. FileNotFoundError when a component is
    missing; with ``create_mode`` a missing last component is created with exactly that mode."""
    fd, _reached = _walk(path, what, modes=modes, allow_unsafe_permissions=allow_unsafe_permissions, target=target,
                         missing_ok=False, shown=shown, owners=owners, create_mode=create_mode,
                         follow_root_links=follow_root_links)
    return fd


@contextlib.contextmanager
def opened_dir(path: str, what: str = "directory", **kwargs: t.Any) -> t.Iterator[int]:
    fd = open_dir(path, what, **kwargs)
    try:
        yield fd
    finally:
        os.close(fd)


def _ensure_dir_at(parent_fd: int, name: str, mode: int | None, what: str, path: str, current: str,
                   allow_unsafe_permissions: bool = True) -> tuple[int, bool]:
    """mkdir ``name`` under ``parent_fd`` (or take the existing one), open it without following a
    link, check its owner (and, unless allowed, its mode) and give it exactly ``mode`` (None: a new
    directory is 0700, an existing one keeps its mode). Returns (descriptor, created)."""
    created = True
    try:
        os.mkdir(name, DIR_MODE_PRIVATE, dir_fd=parent_fd)
    except FileExistsError:
        created = False
    fd = _open_child(parent_fd, name, what, path, current)
    try:
        st = os.fstat(fd)
        _check_dir(st, what, path, current, target=True, modes=not created,
                   allow_unsafe_permissions=allow_unsafe_permissions)
        want = mode if mode is not None else (DIR_MODE_PRIVATE if created else stat.S_IMODE(st.st_mode))
        if stat.S_IMODE(st.st_mode) != want:
            os.fchmod(fd, want)
    except BaseException:
        os.close(fd)
        raise
    return fd, created


def _read_at(dir_fd: int, name: str, limit: int = _SMALL_FILE_LIMIT) -> bytes:
    """The bytes of regular file ``name`` under ``dir_fd``, never through a link (OSError otherwise)."""
    fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", name)
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", name)
        chunks = []
        while True:
            chunk = os.read(fd, 1024 * 1024)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write_at(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Temporary name (created exclusively, never through a link), fsync, rename, fsync the directory."""
    tmp = f"{name}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)  # a killed run's file of the same pid; unlink never follows a link
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o600, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


def _seal_tree(dir_fd: int, where: str) -> None:
    """Make a staged tree read-only before commit: files 0400, directories 0700, through descriptors.
    A link or special file in it is refused: nothing in a set is ever followed."""
    for name in sorted(os.listdir(dir_fd)):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        shown = os.path.join(where, name)
        if stat.S_ISDIR(st.st_mode):
            fd = _open_child(dir_fd, name, "staging", where, shown)
            try:
                _seal_tree(fd, shown)
                os.fchmod(fd, DIR_MODE_PRIVATE)
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode):
            fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise VmBackupError("UNSAFE_TARGET", f"{shown} changed while the set was committed", unsafe_path=shown)
                os.fchmod(fd, FILE_MODE_COMMITTED)
            finally:
                os.close(fd)
        else:
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise VmBackupError("UNSAFE_TARGET", f"{shown} in the staging directory is {kind}; the set is not committed",
                                unsafe_path=shown)


def _remove_at(parent_fd: int, name: str) -> None:
    """Remove ``name`` under ``parent_fd``: a link or file is unlinked (never followed), a directory
    emptied through its own descriptor. Read-only directories are made writable first when needed
    (committed sets are 0500-0700, and only root may ignore that)."""
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            for child in os.listdir(fd):
                _remove_at(fd, child)
        finally:
            os.close(fd)
        remove = os.rmdir
    else:
        remove = os.unlink
    try:
        remove(name, dir_fd=parent_fd)
    except PermissionError:
        os.fchmod(parent_fd, stat.S_IMODE(os.fstat(parent_fd).st_mode) | stat.S_IRWXU)
        remove(name, dir_fd=parent_fd)


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


# --------------------------------------------------------------------------- the repository as a whole


@dataclasses.dataclass
class RepoState:
    path: str
    exists: bool
    repo_id: str | None
    free_bytes: int
    warnings: list[str]


def inspect_repository(path: str, allow_unsafe_permissions: bool = False, create: bool = True) -> RepoState:
    """Look at a repository (to write in) without changing anything; raise on anything unsafe.

    Trust first (UNSAFE_TARGET for a link, a foreign owner or a directory others can write, on
    any component). A missing repository is REPOSITORY_NOT_FOUND unless ``create``; a missing
    parent is REPOSITORY_NOT_FOUND always (an unmounted share must not become a local repository).
    An existing empty directory is accepted (it becomes a repository), a non-empty one only when it is one.
    """
    warnings: list[str] = []
    check_trusted_path(path, "repository", allow_unsafe_permissions)
    check_expected_mounts(path)
    exists = os.path.isdir(path)
    if not exists:
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise VmBackupError(
                "REPOSITORY_NOT_FOUND",
                f"repository {path}: its parent directory {parent} does not exist; check the path and that its file "
                "system is mounted (a repository is created only inside an existing directory)")
        if not create:
            raise VmBackupError(
                "REPOSITORY_NOT_FOUND",
                f"repository {path} does not exist; check the path and that its file system is mounted, or set "
                "create_repository to create a new repository there")
    repo_id = None
    if exists:
        with opened_dir(path, "repository") as fd:
            try:
                os.stat(REPO_MARKER, dir_fd=fd, follow_symlinks=False)
                has_marker = True
            except FileNotFoundError:
                has_marker = False
            if has_marker:
                repo_id = read_marker(path)["repo_id"]
            elif os.listdir(fd):
                raise VmBackupError(
                    "UNSAFE_TARGET",
                    f"{path} is not empty and is not a vmbackup repository (no {REPO_MARKER}); "
                    "give an empty or new directory",
                )
    vfs = os.statvfs(_nearest_existing(path))
    return RepoState(path=path, exists=exists, repo_id=repo_id, free_bytes=vfs.f_bavail * vfs.f_frsize, warnings=warnings)


def open_repository(path: str, allow_unsafe_permissions: bool = False) -> "Repository":
    """An existing repository to read (verify, restore): trusted like a target, since restore defines
    a VM from what it holds. REPOSITORY_NOT_FOUND for a path that is not one, REPOSITORY_FORMAT for
    a marker this collection cannot read."""
    check_trusted_path(path, "repository", allow_unsafe_permissions)
    check_expected_mounts(path)
    hint = "check the path, and that its file system is mounted"
    if not os.path.isdir(path):
        raise VmBackupError("REPOSITORY_NOT_FOUND", f"repository {path} does not exist; {hint}")
    with opened_dir(path, "repository") as fd:
        try:
            os.stat(REPO_MARKER, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            raise VmBackupError(
                "REPOSITORY_NOT_FOUND",
                f"{path} is not a vmbackup repository (it has no {REPO_MARKER}); {hint}") from None
    read_marker(path)
    return Repository(path, allow_unsafe_permissions)


FSTAB = "/etc/fstab"
MOUNTINFO = "/proc/self/mountinfo"
# fstab entries that are not file systems at a directory.
_NOT_A_MOUNT = ("none", "swap", "")


def _unescape_mount_path(field: str) -> str:
    """fstab and mountinfo write a space as \\040, a tab as \\011 (octal escapes)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount_points(mountinfo: str = MOUNTINFO) -> set[str]:
    """Directories something is mounted on now (bind mounts too, which os.path.ismount misses)."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as fh:
            return {_unescape_mount_path(line.split()[4]) for line in fh if len(line.split()) > 4}
    except OSError:
        return set()


def is_mount_point(path: str, mountinfo: str = MOUNTINFO) -> bool:
    return os.path.ismount(path) or path in _mount_points(mountinfo)


def check_expected_mounts(path: str, fstab: str = FSTAB, mountinfo: str = MOUNTINFO) -> None:
    """REPOSITORY_NOT_MOUNTED when /etc/fstab names a mount point at or above the repository that
    is not mounted now: the repository would be (or is) the empty directory the share left on the
    file system below, which is the classic way backups fill / and are lost with the host."""
    try:
        with open(fstab, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return
    mounted = None
    for line in lines:
        fields = line.split()
        if not fields or fields[0].startswith("#") or len(fields) < 3:
            continue
        where = _unescape_mount_path(fields[1])
        if fields[2] in _NOT_A_MOUNT or not where.startswith("/") or where in _NOT_A_MOUNT:
            continue
        where = "/" + os.path.normpath(where).lstrip("/")
        if where == "/" or not (path == where or path.startswith(where + "/")):
            continue
        if mounted is None:
            mounted = _mount_points(mountinfo)
        if where not in mounted and not os.path.ismount(where):
            raise VmBackupError(
                "REPOSITORY_NOT_MOUNTED",
                f"repository {path} is below {where}, which {fstab} lists ({fields[0]}, {fields[2]}) but which is not "
                "mounted now; mount it first (nothing was written)", required_mount=where)


def check_required_mount(path: str, required_mount: str | None) -> None:
    """REPOSITORY_NOT_MOUNTED unless ``required_mount`` is a mount point now and the repository
    ``path`` is below it, on the file system mounted there (an unmounted share leaves an empty
    directory of the root file system in its place, which must not be written to)."""
    if required_mount is None:
        return
    if not isinstance(required_mount, str) or not required_mount.startswith("/") or "\x00" in required_mount:
        raise VmBackupError("INVALID_ARGUMENT", f"required_mount {required_mount!r} must be an absolute path")
    mount = "/" + os.path.normpath(required_mount).lstrip("/")
    if mount != "/" and not (path == mount or path.startswith(mount + "/")):
        raise VmBackupError(
            "REPOSITORY_NOT_MOUNTED", f"repository {path} is not below required_mount {mount}", required_mount=mount)
    if not is_mount_point(mount):
        raise VmBackupError(
            "REPOSITORY_NOT_MOUNTED",
            f"required_mount {mount} is not a mount point now (is the share mounted?); nothing was written to "
            f"repository {path}", required_mount=mount)
    probe = _nearest_existing(path)
    if os.stat(probe).st_dev != os.stat(mount).st_dev:
        raise VmBackupError(
            "REPOSITORY_NOT_MOUNTED",
            f"repository {path} ({probe}) is on another file system than the one mounted at required_mount {mount}",
            required_mount=mount)


def read_marker(path: str) -> dict[str, t.Any]:
    marker = os.path.join(path, REPO_MARKER)
    try:
        with opened_dir(path, "repository") as fd:
            data = json.loads(_read_at(fd, REPO_MARKER).decode("utf-8"))
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise VmBackupError("REPOSITORY_FORMAT", f"cannot read {marker}: {reason}") from None
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
    Components that do not exist yet are not checked (a push run creates them 0711).
    """
    current = "/"
    for part in [p for p in path.split("/") if p]:
        current = os.path.join(current, part)
        if not os.path.exists(current):
            break
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def blocked_for(path: str, uid: int, gid: int) -> str | None:
    """The first existing directory on ``path`` that user ``uid`` (group ``gid``) cannot traverse,
    or None (QEMU's user must reach the run directory to create its NBD socket)."""
    current = "/"
    for part in [p for p in path.split("/") if p]:
        current = os.path.join(current, part)
        try:
            st = os.stat(current)
        except FileNotFoundError:
            break
        if uid == 0:
            continue
        bit = stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH
        if not st.st_mode & bit:
            return current
    return None


# --------------------------------------------------------------------------- files by path


def fsync_dir(path: str) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, data: bytes, mode: int = FILE_MODE) -> None:
    """Temporary name, fsync, rename, fsync the directory: never a half file under its name.

    The directory is reached without following a link on any component and must be owned by
    root or the module's user; the temporary file is created exclusively (a planted name or link
    is never written through) and private until it has its final ``mode``.
    """
    with opened_dir(os.path.dirname(path), "directory of", shown=path) as fd:
        _write_at(fd, os.path.basename(path), data, mode)


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


def copy_regular_at(src_dir_fd: int, name: str, dst: str) -> bool:
    """Copy the regular file ``name`` of ``src_dir_fd`` to the new private file ``dst``.

    The source is opened without following a link (and without blocking on a FIFO) and must be
    a regular file: a host directory that another user owns (libvirt-qemu's NVRAM, swtpm's TPM
    state) could otherwise make root copy any file of the host into a backup. False when the
    source is a link or not a regular file (nothing is written then).
    """
    try:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            return False
        raise
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            return False
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        try:
            while os.sendfile(out, src, None, 1 << 24):
                pass
        finally:
            os.close(out)
    finally:
        os.close(src)
    return True


def makedir(path: str, mode: int) -> bool:
    """mkdir with an exact mode (umask ignored); False when it already existed.

    Neither the new directory nor its parents are followed through a link, and an existing one
    must be owned by root or the module's user before its mode is set.
    """
    with opened_dir(os.path.dirname(path), "directory of", shown=path) as parent:
        fd, created = _ensure_dir_at(parent, os.path.basename(path), mode, "directory", path, path)
        os.close(fd)
    return created


def remove_tree(path: str) -> None:
    """Remove a tree even where committed files were made read-only.

    A link is removed itself, never followed; the directory holding ``path`` is reached without
    following a link and each directory below is emptied through its own descriptor.
    """
    with opened_dir(os.path.dirname(path), "directory of", shown=path) as parent:
        _remove_at(parent, os.path.basename(path))
        os.fsync(parent)


# --------------------------------------------------------------------------- run directories (pull mode)
# A pull-mode run keeps the NBD socket QEMU serves and one scratch file per disk in a private run
# directory <scratch_dir>/<vm-uuid>/<set-id>.<pid>, mode 0700, owned by the user QEMU runs as for
# the domain (QEMU creates the socket, libvirt the scratch files as that user); root reaches it
# as root. <scratch_dir> and <scratch_dir>/<vm-uuid> are root's (0711). The default scratch_dir
# lies in libvirt's own /var/lib/libvirt/qemu (owned by libvirt-qemu): the directories above
# <scratch_dir> are checked for links only (as libvirt's NVRAM directory), <scratch_dir> and
# everything below on their descriptors (owner, mode, no link).
SCRATCH_MODE = 0o711
RUN_DIR_MODE = 0o700
_RUN_DIR_RE = re.compile(r"^(?P<set_id>[0-9]{8}T[0-9]{6}Z-[0-9]{3})\.(?P<pid>[1-9][0-9]{0,9})$")


def validate_scratch_dir(path: t.Any) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\x00" in path or os.path.normpath(path) in ("/", "//"):
        raise VmBackupError("INVALID_ARGUMENT", f"scratch_dir must be an absolute directory path other than /, not {path!r}")
    return os.path.normpath(path)


def run_dir_name(set_id: str, pid: int) -> str:
    return f"{set_id}.{pid}"


def parse_run_dir_name(name: str) -> tuple[str, int] | None:
    """(set id, pid) of a run directory's name, or None when it is not one."""
    match = _RUN_DIR_RE.fullmatch(name)
    return (match["set_id"], int(match["pid"])) if match else None


@contextlib.contextmanager
def _scratch_vm_dir(scratch_dir: str, vm_uuid: str, create: bool) -> t.Iterator[int | None]:
    """The descriptor of <scratch_dir>/<vm-uuid> (created when ``create``; None when missing)."""
    scratch_dir = validate_scratch_dir(scratch_dir)
    parent, name = os.path.dirname(scratch_dir), os.path.basename(scratch_dir)
    try:
        pfd = open_dir(parent, "scratch_dir", owners=False, follow_root_links=True, shown=scratch_dir)
    except FileNotFoundError:
        if not create:
            yield None
            return
        raise VmBackupError("INVALID_ARGUMENT", f"scratch_dir {scratch_dir}: its parent directory {parent} does not exist") from None
    try:
        if create:
            root, _created = _ensure_dir_at(pfd, name, SCRATCH_MODE, "scratch_dir", scratch_dir, scratch_dir, False)
        else:
            try:
                root = _open_child(pfd, name, "scratch_dir", scratch_dir, scratch_dir)
            except FileNotFoundError:
                yield None
                return
            _check_dir(os.fstat(root), "scratch_dir", scratch_dir, scratch_dir, target=True, modes=True,
                       allow_unsafe_permissions=False)
        try:
            where = os.path.join(scratch_dir, vm_uuid)
            if create:
                vm_fd, _created = _ensure_dir_at(root, vm_uuid, SCRATCH_MODE, "scratch_dir", scratch_dir, where, False)
            else:
                try:
                    vm_fd = _open_child(root, vm_uuid, "scratch_dir", scratch_dir, where)
                except FileNotFoundError:
                    yield None
                    return
                _check_dir(os.fstat(vm_fd), "scratch_dir", scratch_dir, where, target=True, modes=True,
                           allow_unsafe_permissions=False)
            try:
                yield vm_fd
            finally:
                os.close(vm_fd)
        finally:
            os.close(root)
    finally:
        os.close(pfd)


def create_run_dir(scratch_dir: str, vm_uuid: str, name: str, uid: int, gid: int) -> str:
    """Create the run directory ``name`` (mode 0700, owned by uid:gid: QEMU's user for the domain)."""
    if parse_run_dir_name(name) is None:
        raise VmBackupError("PATH_ESCAPE", f"{name!r} is not a run directory name")
    with _scratch_vm_dir(scratch_dir, vm_uuid, create=True) as vm_fd:
        os.mkdir(name, RUN_DIR_MODE, dir_fd=vm_fd)  # FileExistsError for any existing name, link or not
        fd = _open_child(vm_fd, name, "scratch_dir", scratch_dir, os.path.join(scratch_dir, vm_uuid, name))
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, RUN_DIR_MODE)
        finally:
            os.close(fd)
        os.fsync(vm_fd)
    return os.path.join(validate_scratch_dir(scratch_dir), vm_uuid, name)


def split_run_dir(path: t.Any, vm_uuid: str) -> tuple[str, str] | None:
    """(scratch_dir, name) of a run directory path as a run recorded it, or None when it is not
    ``<scratch_dir>/<vm_uuid>/<set-id>.<pid>`` (a damaged record is never followed anywhere)."""
    if not isinstance(path, str) or not path.startswith("/") or os.path.normpath(path) != path:
        return None
    vm_dir, name = os.path.split(path)
    scratch_dir, uuid_part = os.path.split(vm_dir)
    if uuid_part != vm_uuid or parse_run_dir_name(name) is None or scratch_dir in ("", "/"):
        return None
    return scratch_dir, name


def remove_run_dir(scratch_dir: str, vm_uuid: str, name: str) -> bool:
    """Remove a run directory and what is in it (never through a link); False when it was gone."""
    if parse_run_dir_name(name) is None:
        raise VmBackupError("PATH_ESCAPE", f"{name!r} is not a run directory name")
    with _scratch_vm_dir(scratch_dir, vm_uuid, create=False) as vm_fd:
        if vm_fd is None:
            return False
        try:
            _remove_at(vm_fd, name)
        except FileNotFoundError:
            return False
        os.fsync(vm_fd)
    return True


def list_run_dirs(scratch_dir: str, vm_uuid: str) -> list[tuple[str, str, int]]:
    """(name, set id, pid) of every run directory of the VM under ``scratch_dir``."""
    with _scratch_vm_dir(scratch_dir, vm_uuid, create=False) as vm_fd:
        if vm_fd is None:
            return []
        out = []
        for name in sorted(os.listdir(vm_fd)):
            parsed = parse_run_dir_name(name)
            if parsed is not None:
                out.append((name, parsed[0], parsed[1]))
        return out


# --------------------------------------------------------------------------- Repository
def parse_verify_sidecar(raw: bytes | None) -> dict[str, t.Any]:
    """A verify sidecar's content; ``{"outcome": "unreadable"}`` for bytes that are not a JSON object."""
    try:
        data = json.loads(raw.decode("utf-8")) if raw is not None else None
    except ValueError:
        return {"outcome": "unreadable"}
    return data if isinstance(data, dict) else {"outcome": "unreadable"}


class Repository:
    """A repository on this host. Read-only methods never create anything.

    Every method reaches what it touches from the repository's root through checked directory
    descriptors (see the module docstring); the paths it returns are for messages and for tools
    that open by name (qemu-img, QEMU), which the trust check on the whole path makes safe.
    """

    def __init__(self, path: str, allow_unsafe_permissions: bool = False, private: bool = False) -> None:
        self.path = path
        self.allow_unsafe_permissions = allow_unsafe_permissions
        # private: no run of this process lets QEMU write into the repository (pull mode, copies of
        # a shut-off VM), so new directories are 0700 and existing ones keep their mode; else
        # (push mode) the directories on the way to a staging directory are made 0711.
        self.private = private

    @property
    def _traverse_mode(self) -> int | None:
        return None if self.private else DIR_MODE_TRAVERSE

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

    # -- descriptors ----------------------------------------------------------
    @contextlib.contextmanager
    def _open(self, *parts: str) -> t.Iterator[int]:
        """The descriptor of ``<repo>/<parts...>``: the repository checked from ``/`` like a target,
        then each part opened without following a link and checked (owner, not writable by others).
        FileNotFoundError when a part is missing."""
        fd = open_dir(self.path, "repository", modes=True, allow_unsafe_permissions=self.allow_unsafe_permissions)
        try:
            current = self.path
            for part in parts:
                current = os.path.join(current, part)
                child = _open_child(fd, part, "repository", self.path, current)
                os.close(fd)
                fd = child
                _check_dir(os.fstat(fd), "repository", self.path, current, target=True, modes=True,
                           allow_unsafe_permissions=self.allow_unsafe_permissions)
            yield fd
        finally:
            os.close(fd)

    def _ensure(self, parent_fd: int, name: str, mode: int | None, where: str) -> int:
        fd, _created = _ensure_dir_at(parent_fd, name, mode, "repository", self.path, os.path.join(where, name),
                                      self.allow_unsafe_permissions)
        return fd

    def _listdir(self, *parts: str) -> list[str]:
        try:
            with self._open(*parts) as fd:
                return sorted(os.listdir(fd))
        except FileNotFoundError:
            return []

    # -- creation -----------------------------------------------------------
    def initialise(self) -> bool:
        """Make the repository (mode 0711 whatever the umask) with its marker; True if anything was
        created. Only the repository directory itself is created, never a missing parent: the
        caller decides (create_repository) whether a missing one may be created at all."""
        parent = os.path.dirname(self.path)
        with opened_dir(parent, "repository", modes=True, allow_unsafe_permissions=self.allow_unsafe_permissions,
                        target=False, shown=self.path) as pfd:
            fd, created = _ensure_dir_at(pfd, os.path.basename(self.path), self._traverse_mode, "repository", self.path,
                                         self.path, self.allow_unsafe_permissions)
        try:
            try:
                os.stat(REPO_MARKER, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                data = {
                    "format": REPO_FORMAT,
                    "format_version": REPO_VERSION,
                    "repo_id": str(uuid.uuid4()),
                    "created": _manifest.iso(_manifest.utcnow()),
                }
                _write_at(fd, REPO_MARKER, _manifest.dumps(data), FILE_MODE if self.private else 0o644)
                created = True
            os.close(self._ensure(fd, "vms", self._traverse_mode, self.path))
        finally:
            os.close(fd)
        return created

    def prepare_vm(self, vm_uuid: str) -> None:
        with self._open("vms") as vms:
            vm_fd = self._ensure(vms, vm_uuid, self._traverse_mode, os.path.join(self.path, "vms"))
            try:
                os.close(self._ensure(vm_fd, "sets", DIR_MODE_PRIVATE, self.vm_dir(vm_uuid)))
                os.close(self._ensure(vm_fd, ".incomplete", self._traverse_mode, self.vm_dir(vm_uuid)))
            finally:
                os.close(vm_fd)

    # -- reading ------------------------------------------------------------
    def set_ids(self, vm_uuid: str) -> list[str]:
        """Committed set ids, oldest first. A set is committed when its manifest exists.
        Anything that is not a real directory holding a regular manifest (a link) is ignored."""
        try:
            with self._open("vms", vm_uuid, "sets") as fd:
                ids = []
                for name in os.listdir(fd):
                    if not _manifest.is_set_id(name):
                        continue
                    try:
                        if not stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                            continue
                        st = os.stat(f"{name}/{_manifest.MANIFEST_NAME}", dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        ids.append(name)
        except FileNotFoundError:
            return []
        return sorted(ids)

    def read_committed(self, vm_uuid: str) -> tuple[list[tuple[str, bytes | VmBackupError]], dict[str, bytes | None]]:
        """Every committed set's manifest bytes (or why they cannot be read), oldest first, and the ids
        that have a verify sidecar, all through one descriptor of ``sets/``.

        The same sets as ``set_ids`` and the same checks as ``read_manifest_bytes`` (each set directory
        opened without following a link and checked on its descriptor), without walking the repository
        from ``/`` again for every set: a catalog of thousands of sets costs what it reads.
        """
        out: list[tuple[str, bytes | VmBackupError]] = []
        try:
            with self._open("vms", vm_uuid, "sets") as fd:
                names = os.listdir(fd)
                sets_path = self.sets_dir(vm_uuid)
                for name in sorted(n for n in names if _manifest.is_set_id(n)):
                    try:
                        set_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        continue  # a link or not a directory: not a set (set_ids skips it too)
                    try:
                        try:
                            st = os.stat(_manifest.MANIFEST_NAME, dir_fd=set_fd, follow_symlinks=False)
                        except OSError:
                            continue  # not committed
                        if not stat.S_ISREG(st.st_mode):
                            continue
                        try:  # as read_manifest_bytes: an unsafe set is that set's fault, not the catalog's
                            _check_dir(os.fstat(set_fd), "repository", self.path, os.path.join(sets_path, name), target=True,
                                       modes=True, allow_unsafe_permissions=self.allow_unsafe_permissions)
                        except VmBackupError as exc:
                            out.append((name, exc))
                            continue
                        try:
                            out.append((name, _read_at(set_fd, _manifest.MANIFEST_NAME)))
                        except OSError as exc:
                            out.append((name, VmBackupError("SET_NOT_FOUND", f"cannot read the manifest of set {name}: "
                                                                             f"{exc.strerror}", set_id=name)))
                    finally:
                        os.close(set_fd)
                sidecars: dict[str, bytes | None] = {}
                for name in names:
                    if name.endswith(".verify.json") and _manifest.is_set_id(name[:-len(".verify.json")]):
                        try:
                            sidecars[name[:-len(".verify.json")]] = _read_at(fd, name)
                        except FileNotFoundError:
                            continue
                        except OSError:
                            sidecars[name[:-len(".verify.json")]] = None  # unreadable
        except FileNotFoundError:
            return [], {}
        return out, sidecars

    def all_ids(self, vm_uuid: str) -> list[str]:
        """Every set id in use for the VM, committed or staged (to pick a new unique one)."""
        ids = [n for n in self._listdir("vms", vm_uuid, "sets") + self._listdir("vms", vm_uuid, ".incomplete")
               if _manifest.is_set_id(n)]
        return sorted(ids)

    def read_manifest_bytes(self, vm_uuid: str, set_id: str) -> bytes:
        try:
            with self._open("vms", vm_uuid, "sets", set_id) as fd:
                return _read_at(fd, _manifest.MANIFEST_NAME)
        except OSError as exc:
            raise VmBackupError("SET_NOT_FOUND", f"cannot read the manifest of set {set_id}: {exc.strerror}", set_id=set_id) from None

    def read_manifest(self, vm_uuid: str, set_id: str) -> tuple[dict[str, t.Any], str]:
        """The parsed manifest and the sha256 of its bytes (what a child records as its parent)."""
        data = self.read_manifest_bytes(vm_uuid, set_id)
        return _manifest.loads(data, set_id), _manifest.sha256_bytes(data)

    def read_set_file(self, vm_uuid: str, set_id: str, rel: str) -> bytes:
        """A small file of a committed set (checkpoint.xml, domain.xml), never through a link."""
        parts = [p for p in rel.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise VmBackupError("PATH_ESCAPE", f"{rel!r} is not a path inside set {set_id}")
        with self._open("vms", vm_uuid, "sets", set_id, *parts[:-1]) as fd:
            return _read_at(fd, parts[-1])

    def read_staging_file(self, vm_uuid: str, name: str, rel: str) -> bytes:
        """A small file (run.json) of the staging directory ``name``, never through a link (OSError otherwise)."""
        if "/" in name or "/" in rel or name in (".", "..") or rel in (".", ".."):
            raise VmBackupError("PATH_ESCAPE", f"{name}/{rel} is not a file of a staging directory")
        with self._open("vms", vm_uuid, ".incomplete", name) as fd:
            return _read_at(fd, rel)

    def read_verify_sidecar(self, vm_uuid: str, set_id: str) -> dict[str, t.Any] | None:
        try:
            with self._open("vms", vm_uuid, "sets") as fd:
                raw = _read_at(fd, f"{set_id}.verify.json")
        except FileNotFoundError:
            return None
        except OSError:
            return {"outcome": "unreadable"}
        return parse_verify_sidecar(raw)

    # -- staging and commit ---------------------------------------------------
    def leftovers(self, vm_uuid: str) -> list[str]:
        root = self.staging_root(vm_uuid)
        return [os.path.join(root, name) for name in self._listdir("vms", vm_uuid, ".incomplete")]

    def remove_leftovers(self, vm_uuid: str) -> list[str]:
        """Remove everything in the staging root; a link there is removed itself, never followed."""
        removed = []
        try:
            with self._open("vms", vm_uuid, ".incomplete") as fd:
                for name in sorted(os.listdir(fd)):
                    _remove_at(fd, name)
                    removed.append(os.path.join(self.staging_root(vm_uuid), name))
                if removed:
                    os.fsync(fd)
        except FileNotFoundError:
            return removed
        return removed

    def create_staging(self, vm_uuid: str, set_id: str) -> str:
        staging = os.path.join(self.staging_root(vm_uuid), set_id)
        with self._open("vms", vm_uuid, ".incomplete") as root:
            os.mkdir(set_id, DIR_MODE_PRIVATE, dir_fd=root)  # FileExistsError for any existing name, link or not
            fd = _open_child(root, set_id, "repository", self.path, staging)
            try:
                os.fchmod(fd, DIR_MODE_PRIVATE if self.private else DIR_MODE_TRAVERSE)
                os.close(self._ensure(fd, "disks", DIR_MODE_PRIVATE if self.private else DIR_MODE_TRAVERSE, staging))
            finally:
                os.close(fd)
        return staging

    def commit(self, vm_uuid: str, set_id: str, staging: str, manifest: dict[str, t.Any]) -> str:
        """Seal the staged files, write the manifest last, then rename the staging directory into sets/."""
        if staging != os.path.join(self.staging_root(vm_uuid), set_id):
            raise VmBackupError("PATH_ESCAPE", f"{staging} is not the staging directory of set {set_id}")
        with self._open("vms", vm_uuid) as vm_fd:
            inc = _open_child(vm_fd, ".incomplete", "repository", self.path, self.staging_root(vm_uuid))
            sets = None
            try:
                sets = _open_child(vm_fd, "sets", "repository", self.path, self.sets_dir(vm_uuid))
                for fd, where in ((inc, self.staging_root(vm_uuid)), (sets, self.sets_dir(vm_uuid))):
                    _check_dir(os.fstat(fd), "repository", self.path, where, target=True, modes=True,
                               allow_unsafe_permissions=self.allow_unsafe_permissions)
                sfd = _open_child(inc, set_id, "repository", self.path, staging)
                try:
                    _seal_tree(sfd, staging)
                    os.fchmod(sfd, DIR_MODE_PRIVATE)
                    _write_at(sfd, _manifest.MANIFEST_NAME, _manifest.dumps(manifest), FILE_MODE_COMMITTED)
                finally:
                    os.close(sfd)
                os.rename(set_id, set_id, src_dir_fd=inc, dst_dir_fd=sets)
                os.fsync(sets)
                os.fsync(inc)
            finally:
                os.close(inc)
                if sets is not None:
                    os.close(sets)
        return self.set_dir(vm_uuid, set_id)


# --------------------------------------------------------------------------- sidecars by suffix (drill proofs)
def read_sidecars(repo: Repository, vm_uuid: str, suffix: str) -> dict[str, bytes | None]:
    """The bytes of every ``sets/<set-id><suffix>`` of a VM (None when unreadable), through one
    checked descriptor of ``sets/``, each file opened without following a link; {} when none."""
    out: dict[str, bytes | None] = {}
    try:
        with repo._open("vms", vm_uuid, "sets") as fd:  # pylint: disable=protected-access
            for name in sorted(os.listdir(fd)):
                if not name.endswith(suffix) or not _manifest.is_set_id(name[:-len(suffix)]):
                    continue
                try:
                    out[name[:-len(suffix)]] = _read_at(fd, name, 1024 * 1024)
                except FileNotFoundError:
                    continue
                except OSError:
                    out[name[:-len(suffix)]] = None
    except FileNotFoundError:
        return {}
    return out
