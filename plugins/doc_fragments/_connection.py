# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private doc fragment; matches CONNECTION_ARGSPEC in plugins/module_utils/_args.py.

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  uri:
    description:
      - The libvirt connection URI of the hypervisor, as seen from the managed host.
      - Set it once for all modules of this collection with C(module_defaults) and the
        C(group/vmbackup.libvirt.libvirt) action group.
    type: str
    default: qemu:///system
requirements:
  - libvirt-python (on the managed host; the module re-runs itself under a system Python that has it)
  - qemu-img (package qemu-utils)
"""
