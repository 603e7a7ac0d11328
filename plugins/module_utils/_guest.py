# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Talking to a running guest through the QEMU guest agent: wait until it answers, run a command
in the guest, read its file systems. Used by the health_check module and by drills.

This module is private to the vmbackup.libvirt collection; it is not a public API.

Every call goes through libvirt (``libvirt_qemu.qemuAgentCommand``, as ``_quiesce.probe`` does);
libvirt notes such custom agent commands as a taint of the running domain in its log, nothing
else changes. A command run with ``exec_command`` runs in the guest as the agent's user (root):
what it does is the caller's business.
"""

from __future__ import annotations

import base64
import json
import math
import time
import typing as t

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _quiesce
from ansible_collections.vmbackup.libvirt.plugins.module_utils._deps import libvirt
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

# The agent channel test is _quiesce's; one definition of what "has an agent" means.
has_agent_channel = _quiesce.has_agent_channel
AGENT_CHANNEL = _quiesce.AGENT_CHANNEL
NO_CHANNEL = _quiesce.NO_CHANNEL

# Output kept of a command's stdout and stderr each (the agent itself caps at 16 MiB, and libvirt
# refuses an agent reply above 4 MiB: a probe's answer is meant to be short).
MAX_OUTPUT = 64 * 1024
# guest-exec input is sent in one agent message; one of 256 KiB or more left the agent channel
# dead for the rest of the guest's life (qemu-ga 7.2, libvirt 9.0; tests/integration/guest.py).
MAX_INPUT = 128 * 1024
PING_SECONDS = 2
POLL_MIN, POLL_MAX = 0.02, 0.25


def _describe(code: int | None, message: str) -> str:
    """Why an agent call failed, in an operator's words."""
    message = (message or "").strip()
    if code == _quiesce.VIR_ERR_ARGUMENT_UNSUPPORTED or "not configured" in message:
        return f"{NO_CHANNEL}: {message}"
    if code == _quiesce.VIR_ERR_AGENT_UNRESPONSIVE:
        return f"the guest agent is not connected or does not answer: {message}"
    if code == _quiesce.VIR_ERR_OPERATION_INVALID:
        return f"the VM is not running: {message}"
    if code == _quiesce.VIR_ERR_OPERATION_TIMEOUT:
        return f"libvirt is busy with another call on the VM: {message}"
    return f"the guest agent call failed: {message}"


def _unreachable(code: int | None, message: str) -> bool:
    """Whether a failed call says the agent cannot be reached at all (as opposed to the agent
    answering with an error of the command's, such as a program that does not exist)."""
    return code in (_quiesce.VIR_ERR_ARGUMENT_UNSUPPORTED, _quiesce.VIR_ERR_AGENT_UNRESPONSIVE,
                    _quiesce.VIR_ERR_OPERATION_INVALID, _quiesce.VIR_ERR_OPERATION_TIMEOUT) \
        or "not configured" in (message or "")


def _seconds(timeout: float) -> int:
    """libvirt's agent timeout: whole seconds, at least 1 (0 and below mean "don't wait" / "default")."""
    return max(1, int(math.ceil(timeout)))


def agent_command(dom, command: str, arguments: dict[str, t.Any] | None = None, timeout: float = 5) -> t.Any:
    """One agent command; its ``return`` value. Raises libvirt.libvirtError as libvirt does."""
    if _quiesce.libvirt_qemu is None:
        raise VmBackupError("MISSING_DEPENDENCY", "the libvirt_qemu module of libvirt-python is needed to talk to the guest agent")
    msg: dict[str, t.Any] = {"execute": command}
    if arguments is not None:
        msg["arguments"] = arguments
    answer = _quiesce.libvirt_qemu.qemuAgentCommand(dom, json.dumps(msg), _seconds(timeout), 0)
    try:
        return json.loads(answer).get("return") if answer else None
    except (ValueError, AttributeError):
        raise VmBackupError("AGENT_UNAVAILABLE", f"the guest agent answered {command} with something that is not JSON: {answer[:200]!r}",
                            command=command) from None


def _agent_error(exc: Exception, what: str) -> VmBackupError:
    code, message = _quiesce._error(exc)  # pylint: disable=protected-access
    return VmBackupError("AGENT_UNAVAILABLE", f"{what}: {_describe(code, message)}", libvirt_error_code=code)


def wait_agent(dom, timeout: float) -> float:
    """Seconds until the guest agent answered ``guest-ping``, asking again until ``timeout``.

    Raises VmBackupError AGENT_UNAVAILABLE when it has not answered by then, at once when the VM
    has no agent channel or is not running (nothing to wait for).
    """
    start = time.monotonic()
    deadline = start + timeout
    last = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        try:
            agent_command(dom, "guest-ping", timeout=min(PING_SECONDS, max(remaining, 1)))
            return time.monotonic() - start
        except libvirt.libvirtError as exc:
            code, message = _quiesce._error(exc)  # pylint: disable=protected-access
            last = _describe(code, message)
            if code == _quiesce.VIR_ERR_ARGUMENT_UNSUPPORTED or "not configured" in (message or "") \
                    or code == _quiesce.VIR_ERR_OPERATION_INVALID or not dom.isActive():
                raise VmBackupError("AGENT_UNAVAILABLE", f"the guest agent cannot answer: {last}",
                                    libvirt_error_code=code, seconds=round(time.monotonic() - start, 3)) from None
        if time.monotonic() >= deadline:
            raise VmBackupError("AGENT_UNAVAILABLE", f"the guest agent did not answer guest-ping within {timeout:g}s: {last}",
                                seconds=round(time.monotonic() - start, 3))
        time.sleep(0.2)


def _decode(data: str | None, truncated: bool) -> tuple[str, bool]:
    raw = base64.b64decode(data or "")
    if len(raw) > MAX_OUTPUT:
        raw, truncated = raw[:MAX_OUTPUT], True
    return raw.decode("utf-8", errors="replace"), truncated


def exec_command(dom, argv: list[str], timeout: float, input: bytes | None = None) -> dict[str, t.Any]:  # pylint: disable=redefined-builtin
    """Run ``argv`` in the guest (guest-exec, the guest's PATH searched) and wait for it at most
    ``timeout`` seconds.

    Returns ``{rc, stdout, stderr, seconds, truncated, error}``: ``rc`` the exit code (128+N
    when killed by signal N), stdout/stderr text capped at MAX_OUTPUT bytes each (``truncated``
    says so). ``rc`` is None and ``error`` says why when the agent refused to run it (no such
    program) or it did not end within ``timeout`` (it is then killed with ``kill -9`` through the
    agent, best effort). Raises VmBackupError AGENT_UNAVAILABLE when the agent cannot be reached,
    INVALID_ARGUMENT for an empty argv or too large an input.
    """
    if not argv or not all(isinstance(a, str) for a in argv) or not argv[0]:
        raise VmBackupError("INVALID_ARGUMENT", f"a guest command must be a non-empty list of strings, not {argv!r}")
    args: dict[str, t.Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
    if input is not None:
        if len(input) > MAX_INPUT:
            raise VmBackupError("INVALID_ARGUMENT", f"input of {len(input)} bytes is above the {MAX_INPUT} a guest command may be given")
        args["input-data"] = base64.b64encode(input).decode("ascii")
    start = time.monotonic()
    result: dict[str, t.Any] = {"rc": None, "stdout": "", "stderr": "", "seconds": 0.0, "truncated": False, "error": None}
    try:
        pid = int(agent_command(dom, "guest-exec", args, timeout=min(30, max(timeout, 5)))["pid"])
    except libvirt.libvirtError as exc:
        code, message = _quiesce._error(exc)  # pylint: disable=protected-access
        if _unreachable(code, message):
            raise _agent_error(exc, f"cannot run {argv[0]} in the guest") from None
        result.update(error=f"the guest agent refused to run {argv[0]}: {(message or '').strip()}",
                      seconds=round(time.monotonic() - start, 3))
        return result
    except (TypeError, KeyError, ValueError):
        raise VmBackupError("AGENT_UNAVAILABLE", "the guest agent answered guest-exec without a pid") from None
    deadline = start + timeout
    interval = POLL_MIN
    while True:
        try:
            status = agent_command(dom, "guest-exec-status", {"pid": pid}, timeout=10) or {}
        except libvirt.libvirtError as exc:
            raise _agent_error(exc, f"lost the guest agent while {argv[0]} ran (guest pid {pid})") from None
        if status.get("exited"):
            break
        if time.monotonic() >= deadline:
            try:
                agent_command(dom, "guest-exec", {"path": "kill", "arg": ["-9", str(pid)]}, timeout=5)
            except libvirt.libvirtError:
                pass
            result.update(error=f"{argv[0]} did not end within {timeout:g}s (guest pid {pid}; killed)",
                          seconds=round(time.monotonic() - start, 3))
            return result
        time.sleep(interval)
        interval = min(interval * 2, POLL_MAX)
    stdout, out_cut = _decode(status.get("out-data"), bool(status.get("out-truncated")))
    stderr, err_cut = _decode(status.get("err-data"), bool(status.get("err-truncated")))
    rc = status["exitcode"] if "exitcode" in status else 128 + int(status.get("signal", 0))
    result.update(rc=int(rc), stdout=stdout, stderr=stderr, truncated=out_cut or err_cut,
                  seconds=round(time.monotonic() - start, 3))
    return result


def fsinfo(dom, timeout: float = 10) -> list[dict[str, t.Any]]:
    """The guest's mounted file systems (guest-get-fsinfo): per file system ``mountpoint``,
    ``type``, ``name`` (the guest's device), ``used`` and ``total`` bytes (None when the agent
    does not say), ``disks`` (the guest's device names of the disks under it). Raises
    VmBackupError AGENT_UNAVAILABLE when the agent cannot be reached or refuses."""
    try:
        answer = agent_command(dom, "guest-get-fsinfo", timeout=timeout) or []
    except libvirt.libvirtError as exc:
        raise _agent_error(exc, "cannot read the guest's file systems") from None
    filesystems = []
    for fs in answer if isinstance(answer, list) else []:
        if not isinstance(fs, dict):
            continue
        filesystems.append({
            "mountpoint": fs.get("mountpoint"),
            "type": fs.get("type"),
            "name": fs.get("name"),
            "used": fs.get("used-bytes"),
            "total": fs.get("total-bytes"),
            "disks": [d.get("dev") for d in fs.get("disk") or [] if isinstance(d, dict) and d.get("dev")],
        })
    return sorted(filesystems, key=lambda f: str(f["mountpoint"]))
