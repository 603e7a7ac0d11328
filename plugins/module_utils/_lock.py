# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Per-VM repository lock (flock): released by the kernel when the holder dies.

This module is private to the vmbackup.libvirt collection; it is not a public API.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
import typing as t

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError


# A week: longer is a typo (or an overflow) rather than a wish to wait.
MAX_TIMEOUT = 7 * 24 * 3600.0


def validate_timeout(value: float) -> float:
    """``lock_timeout`` in seconds: 0 up to a week. NaN and infinity fail (a NaN deadline never passes)."""
    if not 0 <= value <= MAX_TIMEOUT:  # also False for NaN
        raise VmBackupError("INVALID_ARGUMENT", f"lock_timeout must be between 0 and {MAX_TIMEOUT:g} seconds, not {value!r}")
    return value


class VmLock:
    """An exclusive flock on ``<repo>/vms/<uuid>/lock``.

    The lock file is never deleted: removing it would let two runs lock two different inodes.
    The holder's pid, host and purpose are written inside, so VM_LOCKED can name the holder.

    ``shared=True`` takes a shared lock (readers: verify, restore): readers run side by side,
    and a writer (export, prune) waits for them and they for it. A shared holder writes nothing,
    so a reader also works on a repository it may not write (a read-only mount).
    """

    def __init__(self, path: str, timeout: float, purpose: str, shared: bool = False) -> None:
        self.path = path
        self.timeout = timeout
        self.purpose = purpose
        self.shared = shared
        self._fd: int | None = None

    def _open(self) -> int:
        """Open (or create) the lock file without following a link on any component.

        Root truncates and writes this file: a link or a hard link planted in its place would make
        it truncate what the link points to. The directory is reached through descriptors (no link,
        owned by root or the module's user), the file is opened O_NOFOLLOW relative to it, and it
        must be a regular file of ours with a single link before anything is written to it.
        """
        parent, name = os.path.split(self.path)
        flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        dir_fd = repo_mod.open_dir(parent, "lock directory", shown=self.path)
        try:
            fd = None
            if self.shared:
                try:
                    fd = os.open(name, os.O_RDONLY | flags, dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
            if fd is None:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | flags, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise VmBackupError("UNSAFE_TARGET", f"lock file {self.path} is a symbolic link; refusing to open it",
                                    unsafe_path=self.path) from None
            raise
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        why = None
        if not stat.S_ISREG(st.st_mode):
            why = "is not a regular file"
        elif st.st_uid not in repo_mod.trusted_owners():
            why = f"is owned by uid {st.st_uid}, not by root"
        elif st.st_nlink != 1:
            why = f"has {st.st_nlink} hard links (another name for the same file)"
        if why is not None:
            os.close(fd)
            raise VmBackupError("UNSAFE_TARGET", f"lock file {self.path} {why}; refusing to use it", unsafe_path=self.path)
        return fd

    @staticmethod
    def _holder(fd: int) -> dict[str, t.Any] | None:
        try:
            return json.loads(os.pread(fd, 65536, 0).decode("utf-8") or "null")
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        fd = self._open()
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    holder = self._holder(fd)
                    os.close(fd)
                    raise VmBackupError(
                        "VM_LOCKED",
                        f"the VM is locked in this repository by another run ({_describe(holder)}); "
                        f"waited {self.timeout:g}s (lock_timeout)",
                        lock_path=self.path,
                        lock_holder=holder,
                    ) from None
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        self._fd = fd
        if self.shared:
            return
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": int(time.time()), "purpose": self.purpose}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        if not self.shared:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "VmLock":
        self.acquire()
        return self

    def __exit__(self, *exc: t.Any) -> None:
        self.release()


def _describe(holder: dict[str, t.Any] | None) -> str:
    if not isinstance(holder, dict):
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, {holder.get('purpose')}"
