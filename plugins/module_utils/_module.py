# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What every module of the collection does around its backend: find qemu-img, build the
parameters, run the backend, and turn its outcome into exit_json or fail_json.

This module is private to the vmbackup.libvirt collection; it is not a public API.
"""

from __future__ import annotations

import typing as t

from ansible_collections.vmbackup.libvirt.plugins.module_utils._deps import ensure_libvirt
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._qemu_img import QemuImg, Runner


class Backend:
    """A module's backend: parameters, qemu-img, check mode, and what it has to tell besides its
    result (warnings, and leftovers of interrupted runs it removed)."""

    def __init__(self, params: t.Any, run: Runner, qemu_img_path: str, check_mode: bool) -> None:
        self.p = params
        self.qemu_img = QemuImg(run, qemu_img_path)
        self.check_mode = check_mode
        self.warnings: list[str] = []
        self.cleaned: list[str] = []

    def run(self) -> dict[str, t.Any]:
        raise NotImplementedError


def run_module(module, params_cls: type, backend_cls: type, needs_libvirt: bool = True) -> None:
    """Run ``backend_cls`` with the module's parameters and exit the module with its result.

    An expected failure (VmBackupError) and an I/O error (after the backend rolled back) end in
    fail_json with an ``error_code``; warnings are passed on either way.
    """
    if needs_libvirt:
        ensure_libvirt(module)
    qemu_img = module.get_bin_path("qemu-img")
    if qemu_img is None:
        module.fail_json(msg="qemu-img is required (package qemu-utils)", error_code="MISSING_DEPENDENCY")
    params = params_cls(**{key: module.params[key] for key in params_cls.__dataclass_fields__})
    backend = backend_cls(params, run=module.run_command, qemu_img_path=qemu_img, check_mode=module.check_mode)
    failure = None
    try:
        result = backend.run()
    except VmBackupError as exc:
        failure = exc.to_result()
    except OSError as exc:
        failure = {"msg": f"I/O error on {exc.filename or 'the repository'}: {exc.strerror or exc}",
                   "error_code": "IO_ERROR", "failed_path": exc.filename}
    for warning in backend.warnings:
        module.warn(warning)
    if failure is not None:
        module.fail_json(**dict({"cleaned_up": backend.cleaned}, **failure))
    module.exit_json(**result)
