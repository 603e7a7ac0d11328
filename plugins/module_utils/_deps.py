# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Guarded imports of optional libraries.

This module is private to the vmbackup.libvirt collection; it is not a public API.
"""

from __future__ import annotations

import traceback

from ansible.module_utils.basic import missing_required_lib
from ansible.module_utils.common.respawn import has_respawned, probe_interpreters_for_module, respawn_module

try:
    import libvirt  # noqa: F401, pylint: disable=unused-import
except ImportError:
    libvirt = None
    LIBVIRT_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    LIBVIRT_IMPORT_ERROR = None

# System interpreters that may carry the distribution's binding (python3-libvirt, python3-libvirt).
_SYSTEM_PYTHONS = ["/usr/bin/python3", "/usr/libexec/platform-python", "/usr/bin/python"]


def ensure_libvirt(module) -> None:
    """Fail the module with MISSING_DEPENDENCY unless libvirt-python is importable.

    When the interpreter Ansible chose lacks the binding, re-run the module under a system
    Python that has it (the way ansible.posix handles selinux), before giving up.
    """
    if LIBVIRT_IMPORT_ERROR is None:
        return
    if not has_respawned():
        interpreter = probe_interpreters_for_module(_SYSTEM_PYTHONS, "libvirt")
        if interpreter:
            respawn_module(interpreter)  # does not return
    module.fail_json(
        msg=missing_required_lib("libvirt-python"),
        exception=LIBVIRT_IMPORT_ERROR,
        error_code="MISSING_DEPENDENCY",
    )
