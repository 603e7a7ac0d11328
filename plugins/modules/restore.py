#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: restore
short_description: Restore one point of a VM from a backup repository
version_added: 0.1.0
author:
  - vmbackup.libvirt contributors (@vmbackup)
description:
  - Restores one point (a committed set) of a VM - the newest, a given O(set_id), or the newest completed at or before
    O(as_of). The point's disks are read as their chains, from the full up to exactly that set, never a later one.
  - Writes new, sparse disk images (qcow2 by default, or raw) with C(qemu-img convert), then defines the domain from the
    XML saved in the set.
  - The sha256 of every file the restore reads (every image of every chain, the domain XML, NVRAM and TPM state) is
    checked against its manifest while the images are written; on any mismatch nothing is defined or started, the new
    images are removed and the module fails (C(CHECKSUM_MISMATCH), C(SIZE_MISMATCH), C(FILE_MISSING)). A broken chain
    fails with C(CHAIN_BROKEN) before anything is written.
  - By default the VM is defined under a new name (O(restore_as)) with a new UUID and new MAC addresses, its disks
    pointing to the restored images, and no checkpoints. A writable disk that was not in the backup is left out (and so is
    a host directory shared read-write, C(<filesystem>)), so the copy never shares a disk with the original VM, which may
    keep running.
  - A copy (a new identity, or a replaced VM that is not the backed-up one) does not write the original VM's console
    files either - a file-backed C(<serial>), C(<console>), C(<channel>) or C(<parallel>), and any C(<log file=...>), is
    moved to C(/var/log/libvirt/qemu/<restore_as>-<device><n>.log) (virtlogd refuses a second domain on a file in use,
    and on another host the original's directory may not exist).
  - O(overwrite=replace) replaces an existing shut-off VM of that name - the images are restored into new files, the
    domain is redefined to them, its checkpoints are forgotten, and only then are the old disk files deleted (or kept,
    see O(keep_replaced_disks)). A running VM is never replaced (C(TARGET_VM_RUNNING)).
  - "Which identity a replaced VM gets: when the replaced domain IS the backed-up VM (the same UUID), its saved identity
    - UUID, MAC addresses, and its own disks that were not backed up. Any other domain (a copy restored before, say)
    keeps its own UUID and MAC addresses (taken from its current definition, interface by interface in order; an
    interface it did not have gets a new MAC), and a disk that was not restored is never attached. RV(identity) says which."
  - "Disaster restore: O(identity=original) restores the VM under its own name with its own UUID and MAC addresses, on a
    host where neither that name nor that UUID is defined (after its host was lost). When either is in use there the run
    fails with C(TARGET_VM_EXISTS) naming the domain, before anything is written; the default stays a new identity.
    With O(original_paths=true) the disks are written to the paths the backup recorded."
  - A disk that was attached to the running VM only (C(virsh attach-device --live)) is backed up from the running VM;
    restore defines it too (from the running VM's XML saved in the set) and warns that it is now persistent. A backed-up
    disk found in neither XML is not written, and is listed in RV(dropped_disks) with a warning.
  - Restored images are named C(<restore_as>-<target>-<set-id>.qcow2) (C(.img) for raw) in O(disk_dir) or the directory
    of O(storage_pool), with characters other than letters, digits, C(.), C(_) and C(-) in the name replaced by C(_).
  - A failed restore undoes itself - no half-defined domain, no partial image. A restore that is killed leaves hidden
    C(.partial) files and a journal in the disk directory that the next restore into that directory (on the same host)
    removes; files a defined domain uses are never removed.
  - The images' directory (O(disk_dir), or the directory of O(storage_pool)) and every directory above it must be real
    directories (no symbolic link) owned by root that nobody else can write (C(UNSAFE_TARGET) otherwise, before anything
    is written, also in check mode). Images and NVRAM/TPM files are created private (0600) and exclusively, renamed
    into place without replacing anything (C(TARGET_PATH_EXISTS)), and nothing is deleted through a symbolic link.
    Only journals written by this user in such a directory are trusted, and of them only files that journal's run
    created are removed.
  - Before any file is deleted (an old image after O(overwrite=replace), leftovers of a killed restore, the undo of a
    failed one), every defined domain's disks and their whole backing chains (C(qemu-img info --backing-chain -U))
    are checked; a file still in use is kept, with a warning, and listed in RV(kept_disks).
  - Restores to the same target name (or the same image names in one directory) run one at a time on a host
    (an flock under C(/run/vmbackup), waiting up to O(lock_timeout)); the second then finds the VM already restored.
    A domain that carries this point's restore marker counts as restored only while its disk images exist
    (C(TARGET_VM_EXISTS) otherwise).
  - The repository is all it needs - on another host, point O(repository) at the same (shared) directory.
extends_documentation_fragment:
  - vmbackup.libvirt._connection
  - vmbackup.libvirt._repository
  - vmbackup.libvirt._attributes
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - Reports the point, its chain, the files and sizes it would read, the image paths and the domain XML it would
        define, after every refusal it would make; it writes, defines and locks nothing. Checksums are not read in
        check mode (except the small domain XML, and the running VM's XML when a disk was attached live only); the UUID
        it reports for a new VM is not the one a real run draws.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: full
    details:
      - The diff is the domain definition - before, the replaced domain's XML (empty for a new VM); after, the XML that
        is (or would be) defined, before libvirt adds its defaults (MAC addresses of a new VM, device addresses).
        Graphics passwords are masked in both. The disk images themselves are not diffed.
      - A rerun that finds the domain already restored shows the same XML before and after.
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
    support: partial
    details:
      - A restore under a new name is idempotent - when a domain of that name was restored from the same set, the module
        returns C(changed=false) (or starts it, with O(start=true), if it is not running), with the same fields as the run
        that did the work. So is O(identity=original), when the domain of that name also has the backed-up VM's UUID.
      - O(overwrite=replace) replaces the VM on every run (it is how a VM is reset to a point).
options:
  name:
    description:
      - The name of the backed-up VM, as its newest set in the repository records it. Exactly one of O(name) and O(uuid).
      - The VM does not need to exist in libvirt.
    type: str
  uuid:
    description:
      - The UUID of the backed-up VM.
    type: str
  set_id:
    description:
      - The point to restore. At most one of O(set_id) and O(as_of); without both, the newest set.
    type: str
  as_of:
    description:
      - Restore the newest set completed at or before this time - ISO 8601, such as C(2026-11-25T07:00:00Z) or
        C(2026-11-25T08:00:00+01:00); a time without a zone is UTC, a date alone means the end of that day (UTC).
    type: str
  restore_as:
    description:
      - The name of the restored domain. Defaults to C(<name>-restored), or with O(overwrite=replace) to the backed-up VM's name.
      - 1 to 200 characters, no C(/), no control characters, not C(.) or C(..) (C(INVALID_NAME), before anything is
        written; the same holds for the name derived from the backed-up VM's name).
      - With O(identity=original) it must be left out (or be the backed-up VM's name).
    type: str
  identity:
    description:
      - C(new) gives the restored VM a new UUID and new MAC addresses (or, with O(overwrite=replace), the identity of the
        VM it replaces, see the description).
      - C(original) is the disaster restore - the backed-up VM's name, UUID and MAC addresses, only when neither its name
        nor its UUID is defined on this host (C(TARGET_VM_EXISTS) otherwise, naming the domain that has it). Disks that
        were not backed up are not attached. Cannot be combined with O(overwrite=replace).
    type: str
    choices: [new, original]
    default: new
  original_paths:
    description:
      - With O(identity=original), write the disks to the paths the backup recorded on the source host instead of
        O(disk_dir). They must all be in one existing directory that only root can write (C(UNSAFE_TARGET) otherwise),
        and no file may exist at any of them (C(TARGET_PATH_EXISTS)). Not with O(disk_dir) or O(storage_pool).
    type: bool
    default: false
  overwrite:
    description:
      - C(never) fails with C(TARGET_VM_EXISTS) when a domain of that name exists (unless it was restored from the same
        set), and with C(TARGET_PATH_EXISTS) when an image path exists, before anything is written.
      - C(replace) replaces an existing shut-off domain of that name.
    type: str
    choices: [never, replace]
    default: never
  disk_dir:
    description:
      - Directory for the restored images. Defaults to C(/var/lib/libvirt/images). At most one of O(disk_dir) and O(storage_pool).
    type: path
  storage_pool:
    description:
      - A libvirt storage pool of type dir, fs or netfs; the images go into its directory and the pool is refreshed.
    type: str
  disk_format:
    description:
      - Format of the restored images.
    type: str
    choices: [qcow2, raw]
    default: qcow2
  network_map:
    description:
      - Network and bridge names to change in the restored domain's interfaces - each key is an old name, its value the new name.
      - A key that matches no network or bridge of the backed-up VM fails the run with C(INVALID_ARGUMENT) before anything
        is written, naming the key and the networks and bridges the VM has - a typo would otherwise leave the restored VM
        on the network it was meant to leave. A value that is neither a libvirt network nor a bridge on this host is a
        warning (the VM is defined but cannot start until it exists).
    type: dict
  start:
    description:
      - Start the restored VM. If it does not start, the restore is undone and the module fails (C(RESTORE_FAILED)).
    type: bool
    default: false
  keep_replaced_disks:
    description:
      - With O(overwrite=replace), keep the replaced VM's old disk files instead of deleting them after success.
    type: bool
    default: false
  workers:
    description:
      - Threads that check the sha256 of the files while they are restored. Defaults to the number of CPUs.
    type: int
notes:
  - The restore takes a shared lock on the backed-up VM in the repository, so a prune cannot remove the chain while it
    is read; an export of that VM waits for it.
  - NVRAM is restored with mode 0600 to C(/var/lib/libvirt/qemu/nvram/<restore_as>-<set-id>_VARS.fd); TPM state to
    C(/var/lib/libvirt/swtpm/<uuid>/) unless state for that UUID exists.
seealso:
  - module: vmbackup.libvirt.export
  - module: vmbackup.libvirt.verify
"""

EXAMPLES = r"""
- name: Restore the newest backup of web01 as a new VM, next to the original
  vmbackup.libvirt.restore:
    repository: /srv/vmbackup
    name: web01
    restore_as: web01-test

- name: Restore db01 as it was last night, on another host with the repository mounted, and start it
  vmbackup.libvirt.restore:
    repository: /mnt/backups/vmbackup
    name: db01
    as_of: "2026-11-25T00:00:00Z"
    restore_as: db01-drill
    storage_pool: default
    network_map:
      prod-net: isolated
    start: true

- name: Disaster restore - web01's host is lost; bring it back here with its own name, UUID, MACs and disk paths
  vmbackup.libvirt.restore:
    repository: /mnt/backups/vmbackup
    name: web01
    identity: original
    original_paths: true
    start: true

- name: Reset a shut-off VM to a given point
  vmbackup.libvirt.restore:
    repository: /srv/vmbackup
    name: build01
    set_id: 20261125T073512Z-001
    overwrite: replace
"""

RETURN = r"""
set_id:
  description: The restored point.
  returned: success
  type: str
  sample: 20261125T073512Z-001
point:
  description: The point's set id, type, start and completion times, chain id, consistency and period.
  returned: success
  type: dict
chain:
  description: Set ids read for the point, from the chain's full to the point.
  returned: success
  type: list
  elements: str
source_vm:
  description: Name and UUID of the backed-up VM.
  returned: success
  type: dict
vm:
  description: The restored domain - name, uuid, state, and whether it replaced an existing VM.
  returned: success
  type: dict
identity:
  description:
    - Whose identity the restored domain has - C(new) (new UUID and MACs), C(source) (it replaced the backed-up VM itself
      and got its saved identity back), C(target) (it replaced another VM, which kept its own UUID and MACs) or
      C(original) (disaster restore with the backed-up VM's identity).
    - On a rerun that finds the domain already restored, C(original) when it has the backed-up VM's UUID, else C(new).
  returned: success
  type: str
  sample: new
disks:
  description: Per restored disk.
  returned: success
  type: list
  elements: dict
  contains:
    target:
      description: Disk target.
      type: str
    path:
      description: The restored image.
      type: str
    format:
      description: C(qcow2) or C(raw).
      type: str
    virtual_size:
      description: Virtual size in bytes.
      type: int
    chain:
      description: Sets whose files compose this disk, base first.
      type: list
      elements: str
    bytes_read:
      description: Bytes of backup files read for this disk.
      type: int
dropped_disks:
  description:
    - Targets of writable disks of the saved XML that were not in the backup and were left out, and of backed-up disks
      that neither the saved XML nor the running VM's XML of the point defines (not written).
    - Empty on a rerun that finds the domain already restored.
  returned: success
  type: list
  elements: str
nvram:
  description: Path of the restored NVRAM file, if the VM had one.
  returned: success
  type: str
tpm_dir:
  description: Directory of the restored TPM state, if any.
  returned: success
  type: str
domain_xml:
  description: The domain XML that was (or, in check mode, would be) defined, with graphics passwords masked.
  returned: success
  type: str
replaced_disks:
  description: With O(overwrite=replace), the old disk files of the replaced VM (and its old NVRAM file).
  returned: success
  type: list
  elements: str
removed_disks:
  description: Old disk (and NVRAM) files deleted after a successful replace.
  returned: success
  type: list
  elements: str
kept_disks:
  description:
    - Old files of the replaced VM that were not deleted although O(keep_replaced_disks) is false - because another
      domain uses them (as a disk or a backing file), or the path passes through a symbolic link - each with the reason.
      In check mode, the files the replace would keep.
  returned: success
  type: list
  elements: dict
  contains:
    path:
      description: The kept file.
      type: str
    reason:
      description: Why it was kept (names the domain and disk that use it).
      type: str
bytes_read:
  description: Bytes of backup files read and checksummed.
  returned: success
  type: int
estimated_bytes:
  description: Bytes of disk data in the chains (the upper bound of what the images take).
  returned: success
  type: int
bytes_written:
  description: Bytes the restored images take on disk (allocated; they are sparse).
  returned: success
  type: int
duration_s:
  description: Seconds the whole run took.
  returned: success
  type: float
verify_s:
  description: Seconds until every checksum was checked (overlaps with RV(convert_s)).
  returned: success
  type: float
convert_s:
  description: Seconds qemu-img took to write the images.
  returned: success
  type: float
throughput_mib_s:
  description: MiB of backup disk data restored per second of the whole run.
  returned: success
  type: float
timings:
  description:
    - Wall-clock seconds per phase of the run, in the order they ran; together they make up about RV(duration_s).
    - While the run goes on, its progress (bytes read and verified of the total, MiB/s, time left; at most every 5 seconds,
      and when each disk is written) goes to the managed host's log (syslog or the journal, identifier
      C(ansible-restore)), since Ansible shows a module's result only when it ends.
  returned: success
  type: dict
  version_added: 0.2.0
  contains:
    plan_s:
      description:
        - Everything before the first write - trust checks, the catalog, the plan (the domain XML, the identity, free
          space), the locks, waiting for them included. In check mode and when nothing is to do, the only phase.
      type: float
    transfer_s:
      description:
        - qemu-img writing every image (with O_DIRECT where the file system takes it), while the sha256 of every file
          read is checked beside it; until both are done.
      type: float
    sync_s:
      description: Waiting, after the transfer, for the images to be on disk (fsync; each starts as soon as its image is written).
      type: float
    define_s:
      description: NVRAM and TPM state, the renames into place, defining (and starting) the domain, removing replaced files.
      type: float
  sample: {"plan_s": 0.041, "transfer_s": 2.113, "sync_s": 0.012, "define_s": 0.087}
started:
  description: Whether the restored VM was started.
  returned: success
  type: bool
cleaned_up:
  description: Leftovers of interrupted restores into the same directory that this run removed.
  returned: success
  type: list
  elements: str
diff:
  description:
    - The domain definition before and after (graphics passwords masked); shown with C(--diff).
    - A rerun that finds the domain already restored returns the same keys as a run that did the work, describing the
      domain as defined (nothing read or written - RV(bytes_read), RV(verify_s) and RV(convert_s) are 0).
  returned: success
  type: dict
  contains:
    before:
      description: The replaced domain's XML, or an empty string for a new VM.
      type: str
    after:
      description: The XML defined (or, in check mode, that would be).
      type: str
    before_header:
      description: What RV(diff.before) shows.
      type: str
    after_header:
      description: What RV(diff.after) shows.
      type: str
error_code:
  description: A stable code for the failure; see the collection's error code table.
  returned: failure
  type: str
  sample: TARGET_VM_EXISTS
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmbackup.libvirt.plugins.module_utils._args import CONNECTION_ARGSPEC, REPOSITORY_ARGSPEC
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import run_module
from ansible_collections.vmbackup.libvirt.plugins.module_utils._restore import FORMATS, IDENTITIES, OVERWRITE, Restorer, RestoreParams


def main() -> None:
    argument_spec = dict(
        name=dict(type="str"),
        uuid=dict(type="str"),
        set_id=dict(type="str"),
        as_of=dict(type="str"),
        restore_as=dict(type="str"),
        overwrite=dict(type="str", choices=list(OVERWRITE), default="never"),
        disk_dir=dict(type="path"),
        storage_pool=dict(type="str"),
        disk_format=dict(type="str", choices=list(FORMATS), default="qcow2"),
        network_map=dict(type="dict"),
        start=dict(type="bool", default=False),
        keep_replaced_disks=dict(type="bool", default=False),
        workers=dict(type="int"),
        identity=dict(type="str", choices=list(IDENTITIES), default="new"),
        original_paths=dict(type="bool", default=False),
    )
    argument_spec.update(CONNECTION_ARGSPEC)
    argument_spec.update(REPOSITORY_ARGSPEC)
    module = AnsibleModule(
        argument_spec=argument_spec,
        mutually_exclusive=[("name", "uuid"), ("set_id", "as_of"), ("disk_dir", "storage_pool")],
        required_one_of=[("name", "uuid")],
        supports_check_mode=True,
    )
    run_module(module, RestoreParams, Restorer)


if __name__ == "__main__":
    main()
