# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What every module of the collection does around its backend: find qemu-img, build the
parameters, run the backend, and turn its outcome into exit_json or fail_json.

This module is private to the vmbackup.libvirt collection; it is not a public API.
"""

from __future__ import annotations

import os
import signal
import typing as t

from ansible_collections.vmbackup.libvirt.plugins.module_utils._deps import ensure_libvirt
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._qemu_img import QemuImg, Runner
from ansible_collections.vmbackup.libvirt.plugins.module_utils._repository import check_required_mount, validate_repository_path


# Files are private from the moment they are created, also those qemu-img creates.
PRIVATE_UMASK = 0o077
CANCEL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Cancelled(BaseException):
    """Raised in the main thread when the run receives SIGINT/SIGTERM/SIGHUP (an AWX cancel).

    A BaseException, so it passes through ``except Exception`` and every rollback written as
    ``except BaseException`` undoes the run as it would for any failure.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def _child_pids() -> list[int]:
    """This process's children (qemu-img and the like), from /proc."""
    pids = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children", encoding="ascii") as fh:
                pids.extend(int(p) for p in fh.read().split())
        except (OSError, ValueError):
            continue
    return pids


def install_cancel_handlers() -> None:
    """Turn the first cancel signal into Cancelled, after stopping our child processes; later
    signals are ignored so that the rollback itself is not interrupted."""
    state = {"cancelled": False}

    def handler(signum, _frame):
        if state["cancelled"]:
            return
        state["cancelled"] = True
        for pid in _child_pids():
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        raise Cancelled(signum)

    for signum in CANCEL_SIGNALS:
        signal.signal(signum, handler)


class Backend:
    """A module's backend: parameters, qemu-img, check mode, and what it has to tell besides its
    result (warnings, and leftovers of interrupted runs it removed)."""

    def __init__(self, params: t.Any, run: Runner, qemu_img_path: str, check_mode: bool,
                 log: t.Callable[[str], None] | None = None) -> None:
        self.p = params
        # The managed host's log (module.log: syslog / the journal): progress of long transfers.
        self.log = log
        self.qemu_img = QemuImg(run, qemu_img_path)
        self.check_mode = check_mode
        self.warnings: list[str] = []
        self.cleaned: list[str] = []

    # What a cancel leaves, in the words of the module (prune cannot put removed sets back).
    cancel_outcome = "the run was rolled back"

    def run(self) -> dict[str, t.Any]:
        raise NotImplementedError


def run_module(module, params_cls: type, backend_cls: type, needs_libvirt: bool = True, needs_qemu_img: bool = True) -> None:
    """Run ``backend_cls`` with the module's parameters and exit the module with its result.

    An expected failure (VmBackupError) and an I/O error (after the backend rolled back) end in
    fail_json with an ``error_code``; warnings are passed on either way.
    """
    if needs_libvirt:
        ensure_libvirt(module)
    os.umask(PRIVATE_UMASK)
    install_cancel_handlers()
    qemu_img = module.get_bin_path("qemu-img")
    if qemu_img is None and not needs_qemu_img:
        qemu_img = "qemu-img"  # never run: the backend reads and renames files only
    elif qemu_img is None:
        module.fail_json(msg="qemu-img is required (package qemu-utils)", error_code="MISSING_DEPENDENCY")
    params = params_cls(**{key: module.params[key] for key in params_cls.__dataclass_fields__})
    backend = backend_cls(params, run=module.run_command, qemu_img_path=qemu_img, check_mode=module.check_mode,
                          log=module.log)
    failure = None
    try:
        if module.params.get("required_mount") is not None:
            # Before the backend does anything: each module refuses a repository whose file system
            # is not mounted where the user expects it (export checks again before it writes).
            check_required_mount(validate_repository_path(module.params["repository"]), module.params["required_mount"])
        result = backend.run()
    except VmBackupError as exc:
        failure = exc.to_result()
    except OSError as exc:
        failure = {"msg": f"I/O error on {exc.filename or 'the repository'}: {exc.strerror or exc}",
                   "error_code": "IO_ERROR", "failed_path": exc.filename}
    except Cancelled as exc:
        failure = {"msg": f"cancelled by {exc.signal_name}; {backend.cancel_outcome}", "error_code": "CANCELLED",
                   "signal": exc.signal_name}
    # The outcome is decided: a signal now must not turn it into a traceback.
    for signum in CANCEL_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    for warning in backend.warnings:
        module.warn(warning)
    if failure is not None:
        module.fail_json(**dict({"cleaned_up": backend.cleaned}, **failure))
    module.exit_json(**result)
