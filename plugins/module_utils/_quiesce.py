# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Quiescing a running guest through the QEMU guest agent (fsfreeze) around a point in time.

This module is private to the vmbackup.libvirt collection; it is not a public API.

``frozen()`` freezes the guest's file systems, lets the caller take its point in time (a
backup job's start, a snapshot), and thaws. A frozen guest blocks every write of its
applications, so the thaw is guaranteed three times over:

1. ``finally``: the context manager thaws on every way out, a signal (Cancelled) included.
2. A guard process: before the freeze a small child (a fresh interpreter, its own libvirt
   connection, its own session so that a kill of the module's process group misses it) waits
   on a pipe. The module tells it ``freeze <timeout>`` before freezing and ``done`` after its
   own thaw. End of file without ``done`` (the module died, even by SIGKILL), the timeout
   passing, or a signal to the guard: the guard thaws, retrying for a while.
3. A marker: a per-VM file in a root-owned runtime directory, flock-ed by the freezing run for
   the whole freeze and filled with what was frozen (domain id, pid, time). The kernel drops
   the flock when the run dies. A later run that can take the flock and finds the marker filled
   knows the freeze was left by a dead run (guard killed too) and thaws first
   (``thaw_leftover``). The flock also keeps two runs of the collection (an export and a
   snapshot) from freezing, or thawing, one guest at once.

The frozen time is bounded by ``timeout``, counted from the freeze request: the guard thaws at
that moment whatever the module is doing, and the module reports ``crash`` (or fails, with
``required``) when its point in time may have come after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import select
import stat
import subprocess
import sys
import threading
import time
import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _libvirt as lv
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._deps import libvirt
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

try:  # ships with libvirt-python; only the read-only agent probe (guest-ping) needs it
    import libvirt_qemu
except ImportError:
    libvirt_qemu = None

QUIESCE_POLICIES = ("auto", "required", "never")
DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 600.0
# How long a thaw is retried (the agent may still be busy finishing a late freeze, or libvirt
# may hold the domain's agent job for the freeze call that timed out).
THAW_RETRY_SECONDS = 30.0
GUARD_READY_SECONDS = 20.0
LOCK_WAIT_SECONDS = 60.0
PROBE_SECONDS = 5
# Root's marker directory lives in /run: a tmpfs emptied at boot, when every guest has restarted
# (and a restarted guest is not frozen).
ROOT_STATE_DIR = "/run/vmbackup-libvirt"

# libvirt error codes by value (the module imports without the binding for unit tests and docs).
VIR_ERR_OPERATION_INVALID = 55
VIR_ERR_ARGUMENT_UNSUPPORTED = 74
VIR_ERR_OPERATION_UNSUPPORTED = 84
VIR_ERR_AGENT_UNRESPONSIVE = 86
VIR_ERR_OPERATION_TIMEOUT = 68
VIR_ERR_NO_SUPPORT = 3
AGENT_CHANNEL = "org.qemu.guest_agent.0"
NO_CHANNEL = f"the VM has no guest agent channel ({AGENT_CHANNEL})"
FREEZABLE_STATES = ("running", "blocked")
NOT_RUNNING_STATES = ("shutoff", "shutdown", "crashed", "nostate")


@dataclasses.dataclass
class Quiesce:
    """What quiescing did for one point in time; ``public()`` goes into a module's result."""

    policy: str
    consistency: str = "crash"  # application | crash (the manifest's field)
    frozen: bool = False  # the guest's file systems were frozen at the point in time
    frozen_seconds: float | None = None  # from the freeze's answer to the thaw's answer
    freeze_seconds: float | None = None  # the freeze request itself (the guest's freeze hooks run in it)
    filesystems: int | None = None  # file systems the agent froze
    reason: str | None = None  # why the point is only crash-consistent
    thawed_leftover: bool = False  # a freeze left by a killed run was thawed first

    def public(self) -> dict[str, t.Any]:
        return {
            "policy": self.policy,
            "consistency": self.consistency,
            "frozen": self.frozen,
            "frozen_seconds": None if self.frozen_seconds is None else round(self.frozen_seconds, 3),
            "freeze_seconds": None if self.freeze_seconds is None else round(self.freeze_seconds, 3),
            "filesystems": self.filesystems,
            "reason": self.reason,
            "thawed_leftover": self.thawed_leftover,
        }


# ---------------------------------------------------------------------- pure parts (unit-tested)
def validate(policy: t.Any, timeout: t.Any) -> tuple[str, float]:
    """``quiesce`` and ``quiesce_timeout`` as options: a known policy, a timeout in (0, 600] seconds."""
    if policy not in QUIESCE_POLICIES:
        raise VmBackupError("INVALID_ARGUMENT", f"quiesce {policy!r} is not one of {', '.join(QUIESCE_POLICIES)}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or not 0 < timeout <= MAX_TIMEOUT:
        raise VmBackupError("INVALID_ARGUMENT", f"quiesce_timeout must be above 0 and at most {MAX_TIMEOUT:g} seconds, not {timeout!r}")
    return policy, float(timeout)


def skip_reason(policy: str, vm_state: str) -> tuple[str | None, bool]:
    """(why no freeze is attempted, whether that fails ``required``); (None, False) = try to freeze.

    A VM that does not run has no guest to quiesce: its disks are as the guest (or its crash)
    left them, which ``required`` accepts (a backup policy covers shut-off VMs too). A paused
    guest cannot answer the agent: ``required`` fails.
    """
    if policy == "never":
        return "quiesce=never", False
    if vm_state in FREEZABLE_STATES:
        return None, False
    if vm_state in NOT_RUNNING_STATES:
        return f"the VM is {vm_state}: no guest runs to be quiesced", False
    return f"the VM is {vm_state}: its guest agent cannot answer", True


def has_agent_channel(xml: str) -> bool:
    """Whether the domain XML has the guest agent's virtio-serial channel (without it no agent can
    ever answer, and no guard process is worth starting)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return True  # in doubt, ask libvirt
    return any(target.get("name") == AGENT_CHANNEL for target in root.findall("./devices/channel/target"))


def describe_error(code: int | None, message: str) -> str:
    """Why a guest-agent call failed, in an operator's words (from libvirt's error code)."""
    message = (message or "").strip()
    if code == VIR_ERR_ARGUMENT_UNSUPPORTED or "not configured" in message:
        return f"{NO_CHANNEL}: {message}"
    if code == VIR_ERR_AGENT_UNRESPONSIVE:
        return f"the guest agent is not connected or does not answer: {message}"
    if code in (VIR_ERR_OPERATION_UNSUPPORTED, VIR_ERR_NO_SUPPORT):
        return f"the guest agent cannot freeze file systems: {message}"
    if code == VIR_ERR_OPERATION_INVALID:
        return f"the VM cannot be quiesced now: {message}"
    if code == VIR_ERR_OPERATION_TIMEOUT:
        return f"libvirt is busy with another call on the VM: {message}"
    return f"the guest agent failed to freeze: {message}"


def marker_verdict(marker: dict[str, t.Any] | None, active: bool, dom_id: int) -> str:
    """What a marker left by a dead run calls for: ``none`` (nothing left), ``stale`` (the VM
    stopped or restarted since: nothing frozen by us, just clear it) or ``thaw``."""
    if not marker:
        return "none"
    if not active or marker.get("dom_id") != dom_id:
        return "stale"
    return "thaw"


def within_deadline(freeze_requested: float, point_taken: float, timeout: float) -> bool:
    """Whether the point in time certainly came before the guard's deadline thaw. The guard's
    clock starts when it reads ``freeze``, after ``freeze_requested``: its deadline is later."""
    return point_taken - freeze_requested <= timeout


# ---------------------------------------------------------------------- marker and lock
def state_dir() -> str:
    """Where the per-VM markers live: root's in /run, another user's in its own runtime directory."""
    if os.geteuid() == 0:
        return ROOT_STATE_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "vmbackup-libvirt")
    return f"/tmp/vmbackup-libvirt-{os.geteuid()}"


class Marker:
    """The per-VM freeze marker and lock (see the module's notes). Never deleted (two runs must
    lock one inode); emptied when nothing is frozen."""

    def __init__(self, vm_uuid: str, directory: str | None = None) -> None:
        self.vm_uuid = _manifest.normalize_uuid(vm_uuid)
        self.directory = directory or state_dir()
        self.path = os.path.join(self.directory, f"freeze-{self.vm_uuid}")
        self.fd: int | None = None

    def open(self, create: bool) -> bool:
        """Open without following a link, in a directory only root (or the module's user) can
        write; False when the marker does not exist and ``create`` is False."""
        if create:
            dir_fd = repo_mod.open_dir(self.directory, "quiesce state directory", modes=True, create_mode=0o700)
        else:
            try:
                dir_fd = repo_mod.open_dir(self.directory, "quiesce state directory", modes=True)
            except FileNotFoundError:
                return False
        try:
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
            try:
                fd = os.open(os.path.basename(self.path), flags, 0o600, dir_fd=dir_fd)
            except FileNotFoundError:
                return False
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise VmBackupError("UNSAFE_TARGET", f"quiesce marker {self.path} is a symbolic link; refusing it",
                                        unsafe_path=self.path) from None
                raise
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) and st.st_uid in repo_mod.trusted_owners() and st.st_nlink == 1):
            os.close(fd)
            raise VmBackupError("UNSAFE_TARGET", f"quiesce marker {self.path} is not a private regular file of root's",
                                unsafe_path=self.path)
        self.fd = fd
        return True

    def lock(self, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def read(self) -> dict[str, t.Any] | None:
        try:
            raw = os.pread(self.fd, 65536, 0)
            value = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (OSError, ValueError):
            return {"unreadable": True}  # filled but garbled: still a freeze of a dead run
        return value if isinstance(value, dict) or value is None else {"unreadable": True}

    def write(self, value: dict[str, t.Any] | None) -> None:
        os.ftruncate(self.fd, 0)
        if value is not None:
            os.pwrite(self.fd, json.dumps(value, sort_keys=True).encode("utf-8"), 0)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
            self.fd = None


# ---------------------------------------------------------------------- the guard process
# Run as ``python -c GUARD_SOURCE uri uuid retry marker``: self-contained (the module's files are
# in a zip it cannot import from), only the libvirt binding. After a thaw it empties the marker
# when it can take its lock, i.e. when the module is dead (a live module holds it).
GUARD_SOURCE = r'''
import fcntl, os, select, signal, sys, time
import libvirt
libvirt.registerErrorHandler(lambda ctx, err: None, None)
uri, vm_uuid, retry, marker = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]

class Thaw(Exception):
    pass

def on_signal(signum, frame):
    raise Thaw("signal")

def say(text):
    try:
        os.write(1, (text + "\n").encode())
    except OSError:
        pass

for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, on_signal)
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
conn = libvirt.open(uri)
dom = conn.lookupByUUIDString(vm_uuid)
say("ready")
armed_until = None
why = None
buf = b""
try:
    while why is None:
        wait = None if armed_until is None else max(0.0, armed_until - time.monotonic())
        ready = select.select([0], [], [], wait)[0]
        if not ready:
            why = "deadline"
            break
        data = os.read(0, 4096)
        if not data:
            if armed_until is None:
                sys.exit(0)  # the module ended before it froze anything
            why = "eof"
            break
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            words = line.decode().split()
            if words and words[0] == "freeze":
                armed_until = time.monotonic() + float(words[1])
            elif words and words[0] == "done":
                sys.exit(0)
except Thaw:
    why = "signal"
for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, signal.SIG_IGN)
if armed_until is None:
    sys.exit(0)
give_up = time.monotonic() + retry
while True:
    try:
        count = dom.fsThaw(None, 0)
        say("thawed %s %d" % (why, count))
        try:
            fd = os.open(marker, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.fsync(fd)
        except OSError:
            pass
        sys.exit(0)
    except libvirt.libvirtError as exc:
        try:
            if not dom.isActive():
                sys.exit(0)
        except libvirt.libvirtError:
            pass
        if time.monotonic() >= give_up:
            say("failed %s %s" % (why, exc.get_error_message()))
            sys.exit(1)
        time.sleep(0.5)
'''


class Guard:
    """The guard child (see the module's notes)."""

    def __init__(self, uri: str, vm_uuid: str, marker: str) -> None:
        self.uri = uri
        self.vm_uuid = vm_uuid
        self.marker = marker
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the guard and wait until it holds its own connection; VmBackupError when it cannot."""
        try:
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                [sys.executable, "-c", GUARD_SOURCE, self.uri, self.vm_uuid, str(THAW_RETRY_SECONDS), self.marker],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            raise VmBackupError("QUIESCE_FAILED", f"cannot start the thaw guard: {exc}") from None
        line = self._read_line(GUARD_READY_SECONDS)
        if line != "ready":
            self.stop()
            raise VmBackupError("QUIESCE_FAILED", "the thaw guard did not start (it could not connect to libvirt or find the VM)")

    def _read_line(self, timeout: float) -> str | None:
        if self.proc is None or self.proc.stdout is None:
            return None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            buf += chunk
        return buf.split(b"\n", 1)[0].decode("utf-8", "replace").strip()

    def _send(self, text: str) -> None:
        if self.proc is None or self.proc.stdin is None:
            return
        try:
            self.proc.stdin.write(text.encode("utf-8") + b"\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # the guard already thawed at its deadline and ended

    def arm(self, timeout: float) -> None:
        self._send(f"freeze {timeout!r}")

    def release(self) -> None:
        """The module thawed: the guard ends without thawing."""
        self._send("done")
        self.stop()

    def detach(self) -> None:
        """Leave an armed guard to thaw on its own (the pipe's end tells it to), without waiting."""
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.proc = None

    def stop(self) -> bool:
        """Close the pipe (an armed guard thaws on its end) and reap the guard; whether it said it
        thawed the guest."""
        if self.proc is None:
            return False
        thawed = False
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=THAW_RETRY_SECONDS + 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            try:
                os.set_blocking(self.proc.stdout.fileno(), False)
                thawed = b"\nthawed " in b"\n" + (self.proc.stdout.read() or b"")
            except OSError:
                pass
            self.proc.stdout.close()
        self.proc = None
        return thawed


# ---------------------------------------------------------------------- libvirt calls
def _error(exc: Exception) -> tuple[int | None, str]:
    get_code = getattr(exc, "get_error_code", None)
    get_msg = getattr(exc, "get_error_message", None)
    return (get_code() if get_code else None), (get_msg() if get_msg else str(exc)) or str(exc)


def thaw(dom, retry: float = THAW_RETRY_SECONDS) -> int:
    """fsThaw, retried while the agent or libvirt is busy; the number of file systems thawed
    (0 when nothing was frozen). VmBackupError QUIESCE_FAILED when it keeps failing."""
    give_up = time.monotonic() + retry
    while True:
        try:
            return int(dom.fsThaw(None, 0))
        except libvirt.libvirtError as exc:
            if not dom.isActive():
                return 0  # no guest any more, nothing frozen
            if time.monotonic() >= give_up:
                code, msg = _error(exc)
                raise VmBackupError(
                    "QUIESCE_FAILED",
                    f"cannot thaw the guest's file systems ({describe_error(code, msg)}); the guest may still be frozen: "
                    "the next run of the collection thaws it, or run `virsh domfsthaw` on the VM", phase="thaw",
                ) from None
            time.sleep(0.5)


def probe(dom, timeout: int = PROBE_SECONDS) -> str | None:
    """Read-only: None when the guest agent answers guest-ping, else why not (check mode's
    prediction and the preflight of ``required``). None too when it cannot be asked (no
    libvirt_qemu): the freeze then finds out."""
    if libvirt_qemu is None:
        return None
    try:
        libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-ping"}), timeout, 0)
    except libvirt.libvirtError as exc:
        return describe_error(*_error(exc))
    return None


def may_have_frozen(code: int | None, message: str) -> bool:
    """Whether a failed freeze call may still have frozen something (or may yet): only errors that
    say the command never reached a working agent rule that out. A timeout does not: the agent
    may be busy in a slow freeze hook and freeze later."""
    message = message or ""
    if code in (VIR_ERR_ARGUMENT_UNSUPPORTED, VIR_ERR_OPERATION_UNSUPPORTED, VIR_ERR_NO_SUPPORT, VIR_ERR_OPERATION_INVALID):
        return False
    return not (code == VIR_ERR_AGENT_UNRESPONSIVE and "not connected" in message)


def freeze_status(dom, timeout: int = PROBE_SECONDS) -> str | None:
    """Read-only: the agent's ``guest-fsfreeze-status`` (``thawed`` | ``frozen``), None when it
    cannot be asked or does not answer."""
    if libvirt_qemu is None:
        return None
    try:
        answer = libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-fsfreeze-status"}), timeout, 0)
        return json.loads(answer).get("return")
    except (libvirt.libvirtError, ValueError, AttributeError):
        return None


def _freeze_bounded(dom, timeout: float) -> tuple[int | None, str | None, bool]:
    """fsFreeze, waited for at most ``timeout`` seconds: (file systems frozen, why it failed,
    whether the guest may be (or become) frozen all the same)."""
    outcome: dict[str, t.Any] = {}

    def call() -> None:
        try:
            outcome["count"] = int(dom.fsFreeze(None, 0))
        except Exception as exc:  # pylint: disable=broad-exception-caught
            outcome["error"] = _error(exc)

    worker = threading.Thread(target=call, name="vmbackup-fsfreeze", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return None, f"the guest did not freeze within quiesce_timeout ({timeout:g}s)", True
    if "error" in outcome:
        return None, describe_error(*outcome["error"]), may_have_frozen(*outcome["error"])
    if outcome["count"] <= 0:
        return 0, "the guest agent froze no file system", True
    return outcome["count"], None, True


def _clear_leftover(dom, marker: Marker) -> bool:
    """Under the marker's lock: thaw a freeze a dead run left; True when the guest was frozen."""
    verdict = marker_verdict(marker.read(), bool(dom.isActive()), dom.ID() if dom.isActive() else -1)
    if verdict == "none":
        return False
    thawed = thaw(dom) > 0 if verdict == "thaw" else False
    marker.write(None)
    return thawed


def leftover(dom, directory: str | None = None) -> bool:
    """Read-only (check mode): whether a freeze marker of a dead run would make the next real
    run thaw the guest."""
    if lv.domain_state(dom) not in FREEZABLE_STATES:
        return False
    marker = Marker(dom.UUIDString(), directory)
    try:
        if not marker.open(create=False):
            return False
        if not marker.lock(0):
            return False  # a live run is quiescing the guest right now
        try:
            active = bool(dom.isActive())
            if marker_verdict(marker.read(), active, dom.ID() if active else -1) != "thaw":
                return False
            # A guard may have thawed already without emptying the marker (it could not lock it).
            return freeze_status(dom) != "thawed"
        finally:
            fcntl.flock(marker.fd, fcntl.LOCK_UN)
    finally:
        marker.close()


def thaw_leftover(dom, uri: str = "", directory: str | None = None) -> bool:  # pylint: disable=unused-argument
    """Thaw a guest left frozen by a run that was killed (module and guard); True when it was
    frozen. Called first by export and snapshot. A live run that is quiescing the guest now
    holds the marker's lock: then nothing is touched. A paused guest's agent cannot answer: its
    marker waits for a run that finds the guest running."""
    if lv.domain_state(dom) not in FREEZABLE_STATES:
        return False
    marker = Marker(dom.UUIDString(), directory)
    try:
        if not marker.open(create=False):
            return False
        if not marker.lock(0):
            return False
        return _clear_leftover(dom, marker)
    finally:
        marker.close()


@contextlib.contextmanager
def frozen(dom, policy: str, timeout: float, uri: str, directory: str | None = None) -> t.Iterator[Quiesce]:
    """Freeze the guest for the caller's point in time (the body), then thaw.

    ``never`` or a VM that is not running: no freeze, crash consistency, the reason says why.
    ``auto``: when the freeze cannot be had (no agent channel, the agent does not answer,
    nothing frozen, not within ``timeout``) the body runs unfrozen and the Quiesce says why.
    ``required``: VmBackupError QUIESCE_FAILED instead, before the body. After the body:
    ``application`` only when the body returned within ``timeout`` of the freeze request (the
    guard thaws then); later, ``crash`` with ``auto`` and QUIESCE_FAILED with ``required``.
    The Quiesce is complete once the ``with`` block has ended.
    """
    q = Quiesce(policy=policy)
    skip, fails = skip_reason(policy, lv.domain_state(dom))
    if skip is not None:
        if fails and policy == "required":
            raise VmBackupError("QUIESCE_FAILED", f"quiesce=required: {skip}", phase="freeze")
        q.reason = skip
        yield q
        return

    def give_up(why: str) -> None:
        if policy == "required":
            raise VmBackupError("QUIESCE_FAILED", f"quiesce=required but the guest cannot be frozen: {why}", phase="freeze",
                                quiesce=dataclasses.replace(q, reason=why).public())
        q.reason = why

    if not has_agent_channel(dom.XMLDesc(0)):
        give_up(NO_CHANNEL)
        yield q
        return
    marker = Marker(dom.UUIDString(), directory)
    marker.open(create=True)
    guard = None
    armed = late = False
    try:
        if not marker.lock(LOCK_WAIT_SECONDS):
            give_up("another run of the collection is quiescing this VM")
        else:
            q.thawed_leftover = _clear_leftover(dom, marker)
            guard = Guard(uri, dom.UUIDString(), marker.path)
            try:
                guard.start()
            except VmBackupError as exc:
                guard = None
                give_up(exc.msg)
        if guard is not None:
            marker.write({"vm_uuid": dom.UUIDString(), "dom_id": dom.ID(), "pid": os.getpid(), "uri": uri,
                          "since": _manifest.iso(_manifest.utcnow()), "timeout": timeout})
            requested = time.monotonic()
            guard.arm(timeout)
            armed = True
            count, why, maybe = _freeze_bounded(dom, timeout)
            answered = time.monotonic()
            q.freeze_seconds = answered - requested
            if why is not None:
                try:
                    if maybe:
                        # A late or partial freeze may still complete in the guest: thaw now (retried).
                        thaw(dom)
                except VmBackupError as exc:
                    # Still frozen, perhaps: the guard (armed, its pipe closed) keeps thawing, and
                    # the marker stays for the next run. The point itself is crash-consistent.
                    guard.detach()
                    guard = None
                    why += f"; and {exc.msg}"
                else:
                    guard.release()
                    marker.write(None)
                armed = False
                give_up(why)
            else:
                q.frozen, q.filesystems = True, count
        try:
            yield q
        finally:
            if armed:
                taken = time.monotonic()
                thaw(dom)  # raises QUIESCE_FAILED when it cannot: the guard (pipe end) keeps trying, the marker stays
                q.frozen_seconds = time.monotonic() - answered
                guard.release()
                marker.write(None)
                armed = False
                if not within_deadline(requested, taken, timeout):
                    q.frozen, late = False, True
                    q.reason = (f"the point in time came {taken - requested:.1f}s after the freeze request, past "
                                f"quiesce_timeout ({timeout:g}s), when the guard may have thawed the guest")
        if q.frozen:
            q.consistency = "application"
        elif late and policy == "required":
            raise VmBackupError("QUIESCE_FAILED", f"quiesce=required: {q.reason}", phase="freeze", quiesce=q.public())
    finally:
        if guard is not None:
            # Still armed here only when the thaw failed or the freeze was interrupted (a cancel):
            # the guard then thaws on the pipe's end, and its thaw settles the marker.
            if guard.stop() and armed:
                marker.write(None)
        marker.close()


def predict(dom, policy: str) -> Quiesce:
    """Read-only: what ``frozen`` would most likely give (check mode, and the preflight that lets
    ``required`` fail before anything is written). Raises QUIESCE_FAILED when ``required`` cannot
    be met: the VM cannot answer, or its agent does not answer guest-ping."""
    q = Quiesce(policy=policy)
    skip, fails = skip_reason(policy, lv.domain_state(dom))
    if skip is None:
        skip = probe(dom) if has_agent_channel(dom.XMLDesc(0)) else NO_CHANNEL
        fails = skip is not None
    if skip is not None and fails and policy == "required":
        raise VmBackupError("QUIESCE_FAILED", f"quiesce=required but the guest cannot be frozen: {skip}", phase="preflight",
                            quiesce=dataclasses.replace(q, reason=skip).public())
    if skip is None:
        q.consistency = "application"
    q.reason = skip
    return q


def no_agent_channel(reason: str | None) -> bool:
    """Whether a fallback's reason is the VM having no agent channel at all (a deliberate setup,
    not an anomaly worth a warning)."""
    return bool(reason) and reason.startswith(NO_CHANNEL)
