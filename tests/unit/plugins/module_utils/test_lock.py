# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for plugins/module_utils/_lock.py.

flock locks belong to an open file description, so two VmLock objects in one process
(each opens the file itself) conflict exactly as two processes would.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _lock
from ansible_collections.vmbackup.libvirt.plugins.module_utils._lock import VmLock


@pytest.fixture
def lock_path(tmp_path) -> str:
    return str(tmp_path / "lock")


def _content(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def test_acquire_writes_holder_and_release_clears_it(lock_path):
    lock = VmLock(lock_path, timeout=1, purpose="export 2f1c7d6e")
    lock.acquire()
    try:
        holder = json.loads(_content(lock_path))
        assert holder["pid"] == os.getpid()
        assert holder["host"] == socket.gethostname()
        assert holder["purpose"] == "export 2f1c7d6e"
        assert abs(holder["since"] - time.time()) < 60
        assert stat.S_IMODE(os.stat(lock_path).st_mode) & 0o077 == 0, "the lock file must be private"
    finally:
        lock.release()
    assert os.path.exists(lock_path), "the lock file is never deleted"
    assert _content(lock_path) == b""
    lock.release()  # a second release is harmless


@pytest.mark.parametrize("timeout", [0, 0.2])
def test_second_lock_in_the_same_process_is_refused(lock_path, timeout):
    with VmLock(lock_path, timeout=5, purpose="export first"):
        second = VmLock(lock_path, timeout=timeout, purpose="export second")
        started = time.monotonic()
        with pytest.raises(VmBackupError) as info:
            second.acquire()
        waited = time.monotonic() - started
        err = info.value
        assert err.error_code == "VM_LOCKED"
        assert f"pid {os.getpid()}" in err.msg
        assert "export first" in err.msg
        assert f"waited {timeout:g}s" in err.msg
        assert err.details["lock_path"] == lock_path
        assert err.details["lock_holder"]["pid"] == os.getpid()
        assert err.details["lock_holder"]["purpose"] == "export first"
        assert timeout <= waited < timeout + 2
        # The refused attempt did not disturb the holder's record.
        assert json.loads(_content(lock_path))["purpose"] == "export first"
    # Released: a new lock gets it at once, and records itself.
    with VmLock(lock_path, timeout=0, purpose="export third"):
        assert json.loads(_content(lock_path))["purpose"] == "export third"


def test_lock_is_released_when_the_body_raises(lock_path):
    with pytest.raises(RuntimeError):
        with VmLock(lock_path, timeout=0, purpose="first") as lock:
            assert isinstance(lock, VmLock)
            raise RuntimeError("boom")
    with VmLock(lock_path, timeout=0, purpose="second"):
        pass


def test_waits_for_the_holder_to_release(lock_path):
    first = VmLock(lock_path, timeout=0, purpose="first")
    first.acquire()
    timer = threading.Timer(0.3, first.release)
    timer.start()
    try:
        started = time.monotonic()
        with VmLock(lock_path, timeout=10, purpose="second"):
            waited = time.monotonic() - started
            assert json.loads(_content(lock_path))["purpose"] == "second"
    finally:
        timer.join()
    assert 0.25 <= waited < 5


def test_holder_in_another_process(lock_path):
    """The holder's record names the other process, not this one."""
    script = (
        "import fcntl, json, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'other-host', 'purpose': 'restore x'}).encode())\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, lock_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(VmBackupError) as info:
            VmLock(lock_path, timeout=0.2, purpose="export").acquire()
        assert info.value.error_code == "VM_LOCKED"
        assert f"pid {child.pid} on other-host, restore x" in info.value.msg
        assert info.value.details["lock_holder"]["pid"] == child.pid
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    # The holder died (its flock went with it): the lock is free again.
    with VmLock(lock_path, timeout=0, purpose="export"):
        assert json.loads(_content(lock_path))["pid"] == os.getpid()


@pytest.mark.parametrize(
    "content",
    [pytest.param(b"", id="empty"), pytest.param(b"{garbage", id="not-json"), pytest.param(b"[1, 2]", id="not-a-mapping")],
)
def test_unknown_holder(lock_path, content):
    with open(lock_path, "wb") as fh:
        fh.write(content)
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(VmBackupError) as info:
            VmLock(lock_path, timeout=0, purpose="export").acquire()
        assert info.value.error_code == "VM_LOCKED"
        assert "holder unknown" in info.value.msg
    finally:
        os.close(fd)


def test_lock_file_in_missing_directory_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        VmLock(str(tmp_path / "missing" / "lock"), timeout=0, purpose="export").acquire()


# --------------------------------------------------------------------------- shared (reader) locks


def test_two_shared_locks_coexist_and_write_nothing(lock_path):
    with open(lock_path, "wb") as fh:
        fh.write(b'{"pid": 1, "purpose": "an old record"}')
    with VmLock(lock_path, timeout=0, purpose="verify", shared=True):
        with VmLock(lock_path, timeout=0, purpose="restore", shared=True) as second:
            assert second.shared
            assert _content(lock_path) == b'{"pid": 1, "purpose": "an old record"}'
    assert _content(lock_path) == b'{"pid": 1, "purpose": "an old record"}', "a reader never writes the file"


def test_shared_lock_creates_a_missing_lock_file(lock_path):
    with VmLock(lock_path, timeout=0, purpose="verify", shared=True):
        assert stat.S_IMODE(os.stat(lock_path).st_mode) == 0o600
    assert _content(lock_path) == b""


@pytest.mark.parametrize("timeout", [0, 0.3])
def test_exclusive_lock_waits_for_shared_holders_then_times_out(lock_path, timeout):
    with VmLock(lock_path, timeout=0, purpose="verify", shared=True):
        with VmLock(lock_path, timeout=0, purpose="restore", shared=True):
            writer = VmLock(lock_path, timeout=timeout, purpose="export")
            started = time.monotonic()
            with pytest.raises(VmBackupError) as info:
                writer.acquire()
            waited = time.monotonic() - started
    assert info.value.error_code == "VM_LOCKED"
    assert f"waited {timeout:g}s" in info.value.msg
    assert timeout <= waited < timeout + 2
    # Readers leave no record, so the holder cannot be named.
    assert "holder unknown" in info.value.msg
    assert _content(lock_path) == b"", "the refused writer wrote nothing"
    with VmLock(lock_path, timeout=0, purpose="export"):
        assert json.loads(_content(lock_path))["purpose"] == "export"


def test_exclusive_lock_gets_the_lock_when_the_last_reader_leaves(lock_path):
    reader = VmLock(lock_path, timeout=0, purpose="verify", shared=True)
    reader.acquire()
    timer = threading.Timer(0.3, reader.release)
    timer.start()
    try:
        started = time.monotonic()
        with VmLock(lock_path, timeout=10, purpose="export"):
            waited = time.monotonic() - started
            assert json.loads(_content(lock_path))["purpose"] == "export"
    finally:
        timer.join()
    assert 0.25 <= waited < 5


def test_shared_lock_waits_for_an_exclusive_holder_and_names_it(lock_path):
    with VmLock(lock_path, timeout=0, purpose="export 2f1c7d6e"):
        with pytest.raises(VmBackupError) as info:
            VmLock(lock_path, timeout=0.2, purpose="verify", shared=True).acquire()
    assert info.value.error_code == "VM_LOCKED"
    assert f"pid {os.getpid()}" in info.value.msg and "export 2f1c7d6e" in info.value.msg
    assert info.value.details["lock_holder"]["purpose"] == "export 2f1c7d6e"


@pytest.fixture
def no_write_to_read_only_files(monkeypatch):
    """Refuse to open a file without a write permission bit for writing, as the kernel does for
    anyone but root (the tests may run as root). Stands in for a read-only file or mount."""
    real_open = os.open
    opened: list[int] = []

    def fake_open(path, flags, *args, **kwargs):
        opened.append(flags)
        wants_write = flags & (os.O_WRONLY | os.O_RDWR)
        if wants_write and os.path.exists(path) and not os.stat(path).st_mode & stat.S_IWUSR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    return opened


def test_shared_lock_on_a_read_only_lock_file(lock_path, no_write_to_read_only_files):
    with open(lock_path, "wb") as fh:
        fh.write(b"")
    os.chmod(lock_path, 0o400)
    before = os.stat(lock_path)
    with VmLock(lock_path, timeout=0, purpose="verify", shared=True):
        with VmLock(lock_path, timeout=0, purpose="restore", shared=True):
            # It still excludes writers (which could not open the file here anyway).
            fd = os.open(lock_path, os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
    assert no_write_to_read_only_files and not any(f & (os.O_WRONLY | os.O_RDWR) for f in no_write_to_read_only_files)
    after = os.stat(lock_path)
    assert (after.st_mode, after.st_size, after.st_mtime_ns) == (before.st_mode, before.st_size, before.st_mtime_ns)


# --------------------------------------------------------------------------- trust: a planted lock file


def _victim(tmp_path) -> tuple[str, tuple]:
    path = str(tmp_path / "victim")
    with open(path, "wb") as fh:
        fh.write(b"precious data\n")
    os.chmod(path, 0o644)
    return path, _victim_state(path)


def _victim_state(path: str) -> tuple:
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_size, _content(path)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("kind", ["symlink", "hardlink", "dangling-symlink"])
def test_a_planted_lock_link_is_refused_and_its_target_untouched(tmp_path, lock_path, shared, kind):
    victim, before = _victim(tmp_path)
    if kind == "symlink":
        os.symlink(victim, lock_path)
    elif kind == "hardlink":
        os.link(victim, lock_path)
    else:
        os.symlink(str(tmp_path / "created-by-root"), lock_path)
    with pytest.raises(VmBackupError) as info:
        VmLock(lock_path, timeout=0, purpose="export", shared=shared).acquire()
    assert info.value.error_code == "UNSAFE_TARGET"
    assert _victim_state(victim) == before
    assert not os.path.exists(tmp_path / "created-by-root")


def test_a_fifo_as_lock_is_refused_without_hanging(lock_path):
    os.mkfifo(lock_path)
    for shared in (True, False):
        with pytest.raises(VmBackupError) as info:
            VmLock(lock_path, timeout=0, purpose="verify", shared=shared).acquire()
        assert info.value.error_code == "UNSAFE_TARGET" and "not a regular file" in info.value.msg


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_lock_file_of_another_user_is_refused(lock_path):
    with open(lock_path, "wb") as fh:
        fh.write(b"")
    os.chown(lock_path, 65534, 65534)
    with pytest.raises(VmBackupError) as info:
        VmLock(lock_path, timeout=0, purpose="export").acquire()
    assert info.value.error_code == "UNSAFE_TARGET" and "uid 65534" in info.value.msg


def test_a_lock_directory_behind_a_symlink_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "vm").symlink_to(real)
    with pytest.raises(VmBackupError) as info:
        VmLock(str(tmp_path / "vm" / "lock"), timeout=0, purpose="export").acquire()
    assert info.value.error_code == "UNSAFE_TARGET"
    assert os.listdir(real) == []


@pytest.mark.parametrize("value", [0.0, 0.5, 60.0, 7 * 24 * 3600.0])
def test_validate_timeout_accepts(value):
    assert _lock.validate_timeout(value) == value


@pytest.mark.parametrize("value", [-1.0, -0.001, float("nan"), float("inf"), float("-inf"), 1e308, 7 * 24 * 3600.0 + 1])
def test_validate_timeout_rejects_what_would_wait_forever_or_never(value):
    with pytest.raises(VmBackupError) as info:
        _lock.validate_timeout(value)
    assert info.value.error_code == "INVALID_ARGUMENT" and "lock_timeout" in info.value.msg
