# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The collection's one exception type and its stable error codes.

This module is private to the vmbackup.libvirt collection; it is not a public API.
"""

from __future__ import annotations

import typing as t

# Every code a module can return in ``error_code``. docs/error-codes.md documents each one;
# tests/unit checks that the two lists agree. A code joins the list with the module that can
# return it (QUIESCE_FAILED comes with snapshot, RETENTION_POLICY_EMPTY with prune).
ERROR_CODES: dict[str, str] = {
    "MISSING_DEPENDENCY": "a Python library or a command the module needs is not installed",
    "LIBVIRT_UNAVAILABLE": "the libvirt daemon at `uri` cannot be reached or refused the call",
    "VM_NOT_FOUND": "no domain has the given name or UUID",
    "VM_LOCKED": "another run holds the VM's lock in this repository past `lock_timeout`",
    "INVALID_NAME": "a name, UUID, disk target, period or set id is malformed",
    "INVALID_ARGUMENT": "an option value is out of range or options contradict each other",
    "PATH_ESCAPE": "a path is relative or contains `..`",
    "UNSAFE_TARGET": ("a directory root would write in (repository, disk directory) or one above it is a symlink, "
                      "is owned by another user, or is writable by others"),
    "REPOSITORY_NOT_FOUND": "the repository path does not exist (or holds no repository) and creating one was not asked for",
    "REPOSITORY_NOT_MOUNTED": "`required_mount` is not a mount point, or the repository is not on the file system mounted there",
    "TARGET_NOT_ACCESSIBLE": "QEMU (user libvirt-qemu) cannot reach the repository to write a live backup",
    "TARGET_NO_SPACE": "the repository's file system has less free space than the backup needs",
    "DISK_NOT_FOUND": "a disk named in `disks`/`exclude_disks` is not a disk of the VM",
    "NO_DISKS": "after selection, the VM has no disk that can be backed up",
    "BACKUP_JOB_ACTIVE": "a block job that is not ours runs on the VM",
    "BACKUP_FAILED": "the hypervisor or qemu-img reported a failure while copying data",
    "PARENT_CHECKPOINT_INVALID": "`mode: incremental` was asked for but no valid parent exists",
    "TOPOLOGY_CHANGED": "`mode: incremental` was asked for but the VM's disks changed since the parent",
    "VM_STOPPED_DURING_BACKUP": "the VM stopped while its backup job ran",
    "CHECKSUM_MISMATCH": "a file's sha256 differs from its manifest",
    "SIZE_MISMATCH": "a file's size differs from its manifest",
    "FILE_MISSING": "a file the manifest lists is missing (or is not a regular file)",
    "IMAGE_INVALID": "qemu-img check fails on an image whose checksum matches, or a point does not read through its chain",
    "CHAIN_BROKEN": "a set's parent is missing or its manifest hash differs from what the child recorded",
    "SET_NOT_FOUND": "no committed set matches",
    "TARGET_VM_EXISTS": "a restore target domain already exists",
    "TARGET_PATH_EXISTS": "a restore target file already exists",
    "TARGET_VM_RUNNING": "`overwrite: replace` was asked for but the VM to replace is not shut off",
    "RESTORE_FAILED": "qemu-img or libvirt failed while restoring; everything the run wrote was removed",
    "REPOSITORY_FORMAT": "the repository or a manifest has an unknown or unreadable format",
    "IO_ERROR": "reading or writing the repository failed (disk full, permissions, I/O error)",
    "CANCELLED": "the run received SIGINT or SIGTERM (an AWX job cancel) and rolled back",
    "RETENTION_POLICY_EMPTY": "prune was given no retention rule (every keep_* option unset or 0): it would keep nothing by policy",
    "CLOCK_SKEW": "a set is dated after this host's clock; prune removes nothing until the clock (or the set's host's) is right",
    "QUIESCE_FAILED": ("`quiesce: required` but the guest agent could not freeze the guest's file systems (or not within "
                       "`quiesce_timeout`), or a thaw failed"),
    "SNAPSHOT_NOT_FOUND": "`state: reverted` names a snapshot the VM does not have",
    "SNAPSHOT_FOREIGN": "the run would change a snapshot made by another tool (a later snapshot a revert would drop)",
    "SNAPSHOT_UNSUPPORTED": ("the VM or the snapshot is of a kind the snapshot module does not handle (internal snapshot, "
                             "non-file disk, shut-off VM with checkpoints, overlay no longer in the disk's chain, partly merged)"),
    "SNAPSHOT_FAILED": "libvirt or qemu-img failed while creating or reverting a snapshot",
    "COMMIT_FAILED": "merging a snapshot back into its base images failed; the VM runs on its overlays and the snapshot is kept",
    "IMAGE_IN_USE": "a file the snapshot module would change or remove is used by another domain (as a disk or a backing file)",
    "AGENT_UNAVAILABLE": ("the guest agent did not answer (within the timeout), or the VM has no agent channel where one is "
                          "required (health_check, drill)"),
    "HEALTH_CHECK_FAILED": "a health check of a VM failed: it did not run, or a probe command's exit code or output was not the expected one",
    "DRILL_FAILED": "a restore drill found the point wanting: one of its checks failed (`failed_check`); the proof records why",
    "DRILL_LEFTOVER": "a restore drill passed but could not remove its throwaway domain or files; the next drill on the host does",
    "POLICY_VIOLATED": "policy_check found a VM (or a hypervisor) that breaks a rule of the backup policy; `cases` says which and why",
}


class VmBackupError(Exception):
    """An expected failure: carries a stable ``error_code`` and a message for the operator.

    ``details`` is merged into the module result, so a failure can still say what it found
    (the set, the disk, the phase) in machine-readable form.
    """

    def __init__(self, error_code: str, msg: str, **details: t.Any) -> None:
        if error_code not in ERROR_CODES:
            raise ValueError(f"unknown error code {error_code!r}")
        super().__init__(msg)
        self.error_code = error_code
        self.msg = msg
        self.details = details

    def to_result(self) -> dict[str, t.Any]:
        result = dict(self.details)
        result.update(msg=self.msg, error_code=self.error_code)
        return result
