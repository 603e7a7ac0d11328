# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Argument specs shared by several modules.

This module is private to the vmbackup.libvirt collection; it is not a public API.
Each constant matches a doc fragment in plugins/doc_fragments/ (kept in sync by
tests/unit/plugins/module_utils/test_args.py).
"""

from __future__ import annotations

CONNECTION_ARGSPEC = {
    "uri": {"type": "str", "default": "qemu:///system"},
}

REPOSITORY_ARGSPEC = {
    "repository": {"type": "path", "required": True},
    "lock_timeout": {"type": "float", "default": 60.0},
    "allow_unsafe_permissions": {"type": "bool", "default": False},
    "required_mount": {"type": "path"},
}
