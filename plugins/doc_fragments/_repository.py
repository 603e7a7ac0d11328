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
      - The module runs as root, so the repository must be trusted. It and every directory above it must be a real
        directory (not a symbolic link), owned by root (or the user the module runs as), and not writable by group
        or others; a directory above it may be world-writable only when it is root-owned and sticky (C(/tmp),
        C(/var/tmp)). Otherwise the module fails with C(UNSAFE_TARGET) before it writes or reads anything, also
        M(vmbackup.libvirt.verify) and M(vmbackup.libvirt.restore) (restore defines a VM from what the repository holds).
      - Inside the repository nothing is followed through a symbolic link.
      - It must not contain C(..).
      - A path that holds no repository fails with C(REPOSITORY_NOT_FOUND) (M(vmbackup.libvirt.export) initialises an
        existing empty directory, and creates a missing one only with its option C(create_repository)).
    type: path
    required: true
  required_mount:
    description:
      - A mount point the repository must be on, such as the NFS share C(/mnt/backup) for the repository
        C(/mnt/backup/vmbackup).
      - Before anything is written or read, the module checks that this path is a mount point now and that
        O(repository) is below it, on the file system mounted there; otherwise it fails with C(REPOSITORY_NOT_MOUNTED).
      - This is how to detect an unmounted share. Without it, only a mount point listed in C(/etc/fstab) that is not
        mounted is detected (also C(REPOSITORY_NOT_MOUNTED)); any other unmounted mount point is an ordinary empty
        directory of the root file system, which M(vmbackup.libvirt.export) would initialise as a repository.
    type: path
  lock_timeout:
    description:
      - Seconds to wait for another run's lock on the same VM in the same repository.
      - When it is still held after that, the module fails with C(VM_LOCKED). Between 0 and 604800 (a week); other
        values (negative, NaN, infinity) fail with C(INVALID_ARGUMENT).
    type: float
    default: 60
  allow_unsafe_permissions:
    description:
      - Accept a group- or world-writable repository directory (or one above it). Other users could then replace
        backup data, and, since qemu-img and QEMU open files by name, redirect what they write.
      - It relaxes only the permission rule; a repository owned by another user, or reached through a symbolic link, is
        always refused.
    type: bool
    default: false
"""
