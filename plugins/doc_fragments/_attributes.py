# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private doc fragment: the attributes every module of the collection shares.

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options: {}
attributes:
  action_group:
    description: Use C(group/vmbackup.libvirt.libvirt) in C(module_defaults) to set defaults for this module.
    support: full
    membership:
      - vmbackup.libvirt.libvirt
"""
