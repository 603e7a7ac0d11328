# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private doc fragment; matches REPOSITORY_ARGSPEC in plugins/module_utils/_args.py.

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  repository:
    description:
      - Absolute path of the backup repository on the managed host (local disk or a mounted share).
      - It must not be or pass through a symbolic link, contain C(..), or be group- or world-writable.
      - A missing directory is created (mode 0711, so that QEMU can reach staging directories);
        an existing non-empty directory must already be a repository (contain C(vmbackup-repo.json)).
    type: path
    required: true
  lock_timeout:
    description:
      - Seconds to wait for another run's lock on the same VM in the same repository.
      - When it is still held after that, the module fails with C(VM_LOCKED).
    type: float
    default: 60
  allow_unsafe_permissions:
    description:
      - Accept a group- or world-writable repository directory. Other users could then replace backup data.
    type: bool
    default: false
"""
