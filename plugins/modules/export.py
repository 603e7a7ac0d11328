#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: export
short_description: Back up one libvirt VM into a backup repository
version_added: 0.1.0
author:
  - vmbackup.libvirt contributors (@vmbackup)
description:
  - Takes one backup of one VM and commits it as a backup set in a repository (see the repository format in the collection docs).
  - A running (or paused) VM is backed up with a libvirt backup job that creates a checkpoint at the same
    instant. The first backup of a chain is C(full); later ones are C(incremental) and hold only the clusters
    changed since the parent set's checkpoint.
  - By default (O(transport=auto) with python3-libnbd installed) the job runs in pull mode, where QEMU serves each disk's
    point-in-time view over NBD on a unix socket in a private run directory under O(scratch_dir) and the module, as root,
    reads it into the set - a full with C(qemu-img convert), an incremental only the dirty extents of the parent
    checkpoint's bitmap (libnbd). QEMU then never touches the repository, which may be private (0700 directories).
    O(transport=push) keeps libvirt's push mode, where QEMU writes the backup into the repository itself.
  - A shut-off VM is backed up as a C(copy) with C(qemu-img convert) - full data, sparse, no checkpoint, no chain.
  - All disks of the VM go into one set at one point in time. CD-ROM, floppy, read-only and empty drives are skipped and
    recorded. Raw disks cannot carry a dirty bitmap, so they are copied in full in every set (method C(full)).
  - The domain XML (inactive and live), the checkpoint XML, and NVRAM and TPM state when present are saved in the set.
  - Every file is checksummed (sha256) in the manifest, which is written last; the set becomes visible only when its
    staging directory is renamed into C(sets/). A failed run deletes its checkpoint and staging data and aborts its own
    backup job, never another job (one that writes anywhere but into this run's staging directory); a run that was
    killed leaves them for the next run, which removes them and reports it in RV(cleaned_up).
  - Each checkpoint of the collection gets a size sentinel on every disk it has a bitmap for, so that an incremental is
    never built across a resize; see O(mode) and the notes.
  - Directories are named after the VM's UUID and the set id, never after the VM's name.
  - A running VM's guest is quiesced through the QEMU guest agent (O(quiesce)), frozen only around the start of the backup
    job, which is the backup's point in time; the manifest and RV(consistency) record C(application) or C(crash).
  - A VM can have several independent series of chains in one repository (one per schedule, see O(series)). The parent of
    an incremental, the O(period) check, the economy for shut-off VMs and the checkpoint kept in libvirt are all per series.
  - Each series keeps at most one live checkpoint, the one of its newest set; a run deletes the older checkpoints of its
    repository's chains but never another series' kept one, and every checkpoint's dirty bitmap stays independent, so a run
    of one series never invalidates another series' next incremental.
extends_documentation_fragment:
  - vmbackup.libvirt._connection
  - vmbackup.libvirt._repository
  - vmbackup.libvirt._attributes
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - Reports the backup it would take (type, reason, disks, estimated bytes) and changes nothing
        (no checkpoint, file, directory or lock). A chain id it reports for a new chain is not the one a real run draws.
      - Never freezes a guest. RV(consistency) and RV(quiesce) are a prediction from whether the guest agent answers a
        C(guest-ping) (read-only); a freeze that fails for another reason is not foreseen. With O(quiesce=required) a guest
        agent that does not answer fails in check mode as in a real run.
      - Predicts the periodic fulls (O(full_every_sets), O(full_every_days)) and the economy for an unchanged shut-off VM
        (O(skip_unchanged)) with the same RV(type) and RV(reason) as a real run.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
    support: partial
    details:
      - With O(period), a second run in the same period and O(series) returns the existing set with C(changed=false).
      - A shut-off VM that did not change since its series' newest set returns that set with C(changed=false)
        (O(skip_unchanged)).
      - Without O(period) every run of a running VM takes a new backup, which is the point of a backup run.
options:
  name:
    description:
      - The VM's libvirt name. Exactly one of O(name) and O(uuid) is required.
      - The name is only passed to libvirt, never used in a path or a command line, so any name is safe.
    type: str
  uuid:
    description:
      - The VM's UUID. Exactly one of O(name) and O(uuid) is required.
    type: str
  mode:
    description:
      - C(auto) takes an incremental when the newest readable committed set of the VM's O(series) in this repository is a
        valid parent, and a full otherwise; RV(reason) says why. O(full_every_sets) and O(full_every_days) start a new
        chain on a schedule.
      - C(full) starts a new chain. C(incremental) fails with C(PARENT_CHECKPOINT_INVALID) or C(TOPOLOGY_CHANGED)
        when no valid parent exists.
      - A parent is valid when its checkpoint still exists in libvirt (or could be redefined from the set's saved XML,
        whatever its position in the chain), its dirty bitmaps are usable in QEMU, the VM has the same disks, no disk was
        resized since the checkpoint (also not shrunk and grown back to the same size), its chain back to the full is
        intact, and no set of that chain has a failed verdict from M(vmbackup.libvirt.verify).
      - A checkpoint whose bitmap is missing or broken (QEMU was killed or the host crashed before QEMU stored it, or the
        disk image was replaced by another one at the same target) can never serve again; a real run deletes it (its
        bitmaps too where QEMU still has them), reports it in RV(cleaned_up), and O(mode=auto) takes a full that says why
        in RV(reason) (O(mode=incremental) fails with C(PARENT_CHECKPOINT_INVALID)). Check mode only predicts this.
      - A resize since the parent's checkpoint gives a full in O(mode=auto) and C(TOPOLOGY_CHANGED) with O(mode=incremental).
      - A shut-off VM is always backed up as a C(copy) (or, in O(mode=auto), not at all when it did not change, see
        O(skip_unchanged)); O(mode=incremental) then fails.
    type: str
    choices: [auto, full, incremental]
    default: auto
  disks:
    description:
      - Disk targets (such as C(vda)) to back up. By default all disks that can be backed up.
    type: list
    elements: str
  exclude_disks:
    description:
      - Disk targets not to back up.
    type: list
    elements: str
  period:
    description:
      - A key for the backup period, such as C(2026-W48) or C(2026-11).
      - When a committed set of the VM with this period exists in the repository in the same O(series), the module returns it
        with C(changed=false). A set of that period in another series does not count.
    type: str
  series:
    description:
      - The series the new set belongs to, one per schedule (such as C(weekly) and C(monthly)), recorded in its manifest.
        1-32 lower-case letters, digits, C(_) and C(-), starting with a letter or digit.
      - Series never share a chain. The parent of an incremental is the newest readable set of the same series; each series
        keeps its own checkpoint in libvirt. Sets written before series existed are in series C(default).
    type: str
    default: default
  full_every_sets:
    description:
      - "In O(mode=auto), a chain holds at most this many sets, its full included; the run after that starts a new chain
        with a full. RV(reason) names the rule, for example C(full: the chain of set X has 4 sets (full_every_sets=4))."
      - Periodic fulls let retention remove old chains as a whole. Ignored with O(mode=full) and O(mode=incremental).
      - Unset (the default), a chain grows until something else (a resize, a lost bitmap, O(mode=full)) ends it. V(1) makes
        every run a full.
    type: int
  full_every_days:
    description:
      - In O(mode=auto), a new chain starts when the full of the current chain started more than this many days ago
        (above 0 and up to 36600, fractions allowed, such as C(0.5)); measured from the full's C(started) time to the run's
        clock. A full dated after that clock never triggers it.
      - Ignored with O(mode=full) and O(mode=incremental). Unset (the default), no such rule applies.
    type: float
  skip_unchanged:
    description:
      - In O(mode=auto), a shut-off VM that did not change since the newest set of its O(series) is not copied again; the
        module returns that set with C(changed=false) and RV(reason) says so.
      - Unchanged means that set is a C(copy) that recorded the state of every image of each disk's backing chain (path,
        size, mtime, ctime, inode, device), every one of them is the same now, the same disks are selected, the inactive
        domain XML is byte-identical to the set's C(domain.xml), the NVRAM and TPM files have the sha256 the set recorded,
        and the set has no failed verdict from M(vmbackup.libvirt.verify). Anything else, or any doubt, takes a copy
        whose RV(reason) says what differed.
      - A file's ctime cannot be set back (short of setting the system clock back), so content written and the mtime
        restored (C(touch -d)) is still seen. A VM that was started and stopped is copied again, even when its guest wrote
        nothing, because libvirt hands the images to the QEMU user and back, which changes their ctime.
      - The state is recorded only when it did not change during the copy and is older than a second when recorded (a
        write in the same timestamp tick could not be told apart). Block devices, network disks, and images on anything
        but a local file system (ext2/3/4, xfs, btrfs, tmpfs, zfs, f2fs, bcachefs, jfs, overlay; not NFS, CIFS or FUSE,
        whose attributes may be cached while another host writes) are always copied.
      - An unchanged VM's set is returned however old it is; O(full_every_sets) and O(full_every_days) concern chains
        of the running VM, not copies.
      - V(false) copies every shut-off VM on every run.
    type: bool
    default: true
  workers:
    description:
      - Threads that checksum the set's files, and (pull mode) disks read at the same time and NBD connections of an
        incremental disk's copy (at most 16). Defaults to the number of CPUs of the managed host (4 NBD connections).
    type: int
  transport:
    description:
      - How the data of a running VM is read.
      - C(pull) - libvirt's pull mode. QEMU serves each disk's point-in-time view (new guest writes go on while QEMU keeps
        the old blocks in a scratch file) over NBD on a unix socket; the module reads a full disk with
        C(qemu-img convert) and an incremental disk's dirty extents with libnbd, writing the same qcow2 set files as push
        mode. QEMU never writes into the repository, so the repository and every directory above it may be private
        (new repository directories are created 0700; existing ones keep their mode). Incrementals need the libnbd Python
        binding (Debian python3-libnbd); without it an incremental fails with C(MISSING_DEPENDENCY) before anything is
        written (fulls work).
      - C(push) - libvirt's push mode, where QEMU (as libvirt-qemu) writes the backup into the repository's staging directory
        itself, so every directory above the repository must be C(o+x) (C(TARGET_NOT_ACCESSIBLE) otherwise), and a file
        system mounted after the VM started is not visible to QEMU. The fallback where pull cannot work.
      - C(auto) - C(pull) when python3-libnbd is importable, else C(push) with a warning.
      - A shut-off VM is copied with C(qemu-img convert) whatever the transport (RV(transport) C(offline)).
    type: str
    choices: [auto, pull, push]
    default: auto
    version_added: 0.2.0
  compress:
    description:
      - C(zstd) writes every data cluster of the set's disk images as a standard qcow2 compressed cluster
        (C(compression_type=zstd)), which any qemu-img since 5.1 reads, so verify and restore need nothing new. It costs
        CPU time on the managed host during the backup and saves repository space and bandwidth on compressible data
        (not on encrypted or already compressed data).
      - For a running VM it needs pull mode (O(transport=push) with C(zstd) fails with C(INVALID_ARGUMENT)); a shut-off
        VM's copy is compressed by C(qemu-img convert -c) with either transport.
      - The manifest records each disk's C(compression).
    type: str
    choices: [none, zstd]
    default: none
    version_added: 0.2.0
  scratch_dir:
    description:
      - Pull mode only. The directory holding one private run directory per run,
        C(<scratch_dir>/<vm-uuid>/<set-id>.<pid>), mode 0700 and owned by the user QEMU runs as for the domain (the DAC
        C(<seclabel>) of its live XML, else the owner of C(/var/lib/libvirt/qemu)). It holds the NBD socket QEMU serves
        and one scratch file per disk where QEMU keeps the old data of the blocks the guest overwrites while the backup
        is read (at most as large as what the guest writes meanwhile).
      - The run directory is removed on every exit path; one left by a run that was killed is removed, and its job
        aborted, by the next run of the VM (RV(cleaned_up)); run directories of dead runs that no job uses are swept.
      - QEMU sees only the file systems that were mounted when it started (libvirt runs it in its own mount namespace), so
        this must be on such a file system; the default lies in libvirt's own directory. C(<scratch_dir>) and
        C(<scratch_dir>/<vm-uuid>) are created root-owned, mode 0711.
      - At most about 32 bytes long, because the socket's path must fit a unix socket's 107 bytes (C(INVALID_ARGUMENT) otherwise).
    type: path
    default: /var/lib/libvirt/qemu/vmbackup
    version_added: 0.2.0
  quiesce:
    description:
      - Whether the guest's file systems are frozen through the QEMU guest agent (C(guest-fsfreeze-freeze)) for the backup's
        point in time, which gives an C(application)-consistent backup instead of a C(crash)-consistent one.
      - The guest is frozen only around the start of the backup job (the point in time) and thawed as soon as the
        job has started; the copying happens while the guest runs on.
      - C(auto) freezes when the guest agent can; when it cannot (no agent channel, the agent not answering, nothing
        frozen, not frozen within O(quiesce_timeout)) the backup is crash-consistent, and RV(consistency),
        RV(quiesce.reason) and the manifest say so (a warning too, unless the VM has no agent channel at all).
      - C(required) fails with C(QUIESCE_FAILED) instead and leaves the VM as found (no checkpoint, set or staging data).
        An agent that does not answer C(guest-ping) fails before anything is written.
      - C(never) does not freeze.
      - A shut-off VM is copied without freezing under every policy (there is no guest to quiesce; C(required) does not
        fail); a paused VM cannot be frozen (C(required) fails).
      - The thaw is guaranteed by the module, by a guard process that thaws when the module dies while the guest is frozen,
        and by a marker from which the next run of the collection (export or snapshot) thaws a guest left frozen by a run
        that was killed together with its guard; RV(cleaned_up) then says so. See the collection's consistency document.
    type: str
    choices: [auto, required, never]
    default: auto
  quiesce_timeout:
    description:
      - Seconds the guest may stay frozen, counted from the freeze request (above 0, at most 600). A freeze that does not
        answer in time is given up; the guard process thaws the guest at this moment whatever the module is doing, and a
        backup job that started later is recorded as C(crash) (C(auto)) or fails with C(QUIESCE_FAILED) (C(required)).
      - A freeze given up may still complete in the guest (its freeze hooks run first); the module then thaws as soon as the
        agent answers again, before the backup job starts, so the job may start up to the hooks' duration later.
    type: float
    default: 10
  create_repository:
    description:
      - Create the repository directory O(repository) when it does not exist (mode 0700 in pull mode, 0711 in push mode),
        and initialise it.
      - Without it a missing O(repository) fails with C(REPOSITORY_NOT_FOUND), so that a typo or an unmounted
        share does not silently become a new repository on the root file system. An existing empty directory is
        initialised either way.
      - Only the repository directory itself is created. When its parent directory does not exist the module fails with
        C(REPOSITORY_NOT_FOUND) even with O(create_repository=true).
      - In check mode nothing is created; the result says what a real run would do.
    type: bool
    default: false
notes:
  - In push mode (O(transport=push)) QEMU runs as an unprivileged user and writes a live backup into the repository itself,
    so every directory above the repository must be traversable by others (C(o+x)); the module checks this first
    (C(TARGET_NOT_ACCESSIBLE)). Pull mode has no such requirement.
  - Progress of a long backup goes to the managed host's log (syslog or the journal, identifier C(ansible-export)) at
    most every 5 seconds while the data is read; RV(timings) gives the seconds of each phase.
  - Free space is checked before anything is written, from the data the disks hold (for a full, the data extents of the whole
    backing chain that C(qemu-img map) reports, so a compressed or otherwise dense image is counted at the size the backup
    writes, not at its file size) or from the size libvirt reports for the changed blocks (incremental).
  - "Size sentinels: QEMU truncates every dirty bitmap on a resize and leaves a re-grown area clean, and neither libvirt nor
    QEMU records that a resize happened. So before each backup job the module adds to every qcow2 disk a persistent,
    disabled dirty bitmap named C(<checkpoint>.size) with only the bit of the disk's last sector set; guest writes never
    change it, only a shrink clears it (live C(virsh blockresize) as well as C(qemu-img resize --shrink) of the shut-off
    image). It is deleted with its checkpoint. The bitmap is created through the QEMU monitor (libvirt-python's
    C(libvirt_qemu)), which makes libvirt mark the domain as tainted (C(custom-monitor)) in its log. Its granularity is
    512 bytes up to 32 GiB disks and grows beyond (16 KiB at 1 TiB, keeping it at 8 MiB of memory); a shrink by less than
    the granularity is not seen."
  - A set taken by an earlier version has no size sentinel, so the first run after an upgrade takes a full.
  - A series' first C(copy) after the VM stopped retires the checkpoint of the running VM's last set; libvirt cannot delete
    the bitmaps of a shut-off VM, so qemu-img removes them from the images, which changes them after the copy recorded
    their state. The second run of the shut-off VM therefore copies once more; from the third on, an unchanged VM is not
    copied (O(skip_unchanged)).
seealso:
  - name: libvirt backup API
    description: Push- and pull-mode backups and checkpoints.
    link: https://libvirt.org/kbase/incremental-backup.html
"""

EXAMPLES = r"""
- name: Weekly series of a VM, a new chain every 4 sets, at most one set per ISO week
  vmbackup.libvirt.export:
    name: web01
    repository: /srv/vmbackup
    series: weekly
    period: "{{ '%G-W%V' | strftime }}"
    full_every_sets: 4

- name: Monthly series of the same VM, beside the weekly one, a new chain each quarter
  vmbackup.libvirt.export:
    name: web01
    repository: /srv/vmbackup
    series: monthly
    period: "{{ '%Y-%m' | strftime }}"
    full_every_days: 85

- name: Copy a shut-off VM even when it did not change
  vmbackup.libvirt.export:
    name: archive01
    repository: /srv/vmbackup
    skip_unchanged: false

- name: An application-consistent backup, or none (fails with QUIESCE_FAILED when the guest agent cannot freeze)
  vmbackup.libvirt.export:
    name: db01
    repository: /srv/vmbackup
    quiesce: required
    quiesce_timeout: 20

- name: Back up a VM (full the first time, incremental afterwards)
  vmbackup.libvirt.export:
    name: web01
    repository: /srv/vmbackup

- name: At most one backup per ISO week, only the system disk
  vmbackup.libvirt.export:
    name: db01
    repository: /srv/vmbackup
    period: "{{ '%G-W%V' | strftime }}"
    disks: [vda]

- name: First backup into a new repository (created, its parent /srv must exist)
  vmbackup.libvirt.export:
    name: web01
    repository: /srv/vmbackup
    create_repository: true

- name: Back up to an NFS share only when it is mounted (fails with REPOSITORY_NOT_MOUNTED otherwise)
  vmbackup.libvirt.export:
    name: web01
    repository: /mnt/backup/vmbackup
    required_mount: /mnt/backup

- name: Start a new chain
  vmbackup.libvirt.export:
    uuid: 2b9e5512-bd7e-46a8-afbf-89c9c8e8cdbc
    repository: /srv/vmbackup
    mode: full
  register: backup

- name: A compressed backup into a private repository (pull mode, the default with python3-libnbd)
  vmbackup.libvirt.export:
    name: web01
    repository: /root/vmbackup
    compress: zstd

- name: Show what was written
  ansible.builtin.debug:
    msg: "{{ backup.set_id }}: {{ backup.type }}, {{ backup.bytes_written }} bytes at {{ backup.throughput_mib_s }} MiB/s"
"""

RETURN = r"""
set_id:
  description:
    - The committed set, or, with C(changed=false), the existing set of the period or the set an unchanged shut-off VM is
      still equal to. None in check mode when a set would be taken.
  returned: success
  type: str
  sample: 20261125T073512Z-001
type:
  description: C(full), C(incremental) or C(copy).
  returned: success
  type: str
reason:
  description:
    - Why this type was chosen (for example why no incremental was possible, or which periodic rule started a new chain),
      or, with C(changed=false), why no set was taken.
  returned: success
  type: str
  sample: "full: the chain of set 20261125T073512Z-001 has 4 sets (full_every_sets=4)"
series:
  description: The series of the run (O(series)).
  returned: success
  type: str
  sample: weekly
period:
  description: The O(period) of the run; None without one.
  returned: success
  type: str
  sample: 2026-W48
repository_free_bytes:
  description:
    - Free bytes of the repository's file system for this user (after the run; in check mode and for a repository that
      does not exist yet, of the nearest existing directory). A preflight sums RV(estimated_bytes) against it.
  returned: success
  type: int
chain_id:
  description: The chain the set belongs to; None for a copy.
  returned: success
  type: str
parent:
  description: The parent set id of an incremental; None otherwise.
  returned: success
  type: str
checkpoint:
  description: The libvirt checkpoint created with the set; the next incremental starts from it.
  returned: success
  type: str
disks:
  description: Per backed-up disk.
  returned: success
  type: list
  elements: dict
  contains:
    target:
      description: Disk target.
      type: str
    method:
      description: C(full), C(incremental) or C(copy).
      type: str
    format:
      description: Source format.
      type: str
    virtual_size:
      description: Virtual size of the disk in bytes.
      type: int
    allocated_bytes:
      description:
        - Bytes of data in the disk's whole image chain when the backup started (the data extents C(qemu-img map) reports;
          for a compressed image its uncompressed data, not its file size).
      type: int
    bytes:
      description: Bytes of the backup file (in check mode the estimate).
      type: int
    file:
      description: The disk's file in the set, relative to the set directory; None in check mode.
      type: str
    size:
      description: Size of that file in bytes (in check mode the estimate).
      type: int
skipped_disks:
  description: Disks not backed up, with the reason.
  returned: success
  type: list
  elements: dict
estimated_bytes:
  description: Bytes the backup was expected to write (what the free-space check used); 0 when no backup was taken.
  returned: success
  type: int
bytes_written:
  description: Bytes of all files of the new set (0 when nothing was written).
  returned: success
  type: int
data_bytes:
  description: Bytes of the disk images of the new set.
  returned: success
  type: int
duration_s:
  description: Seconds the whole run took.
  returned: success
  type: float
throughput_mib_s:
  description: Disk data written per second of copying (the transfer), in MiB/s.
  returned: success
  type: float
read_mib_s:
  description:
    - Guest data read per second of copying, in MiB/s (the allocated bytes of full disks and the dirty bytes of
      incremental ones). None when no set was taken (check mode, C(changed=false)).
  returned: success
  type: float
  version_added: 0.2.0
transport:
  description:
    - How the data was read - C(pull) or C(push) (a running VM, see O(transport)), C(offline) (a copy of a shut-off VM with
      qemu-img); None with C(changed=false) (nothing was read). In check mode what a real run would use.
  returned: success
  type: str
  sample: pull
  version_added: 0.2.0
compress:
  description: O(compress) of the run.
  returned: success
  type: str
  sample: none
  version_added: 0.2.0
timings:
  description:
    - Seconds per phase of the run, in the order the phases first ran. C(plan_s) observing and deciding (before the lock
      and again under it), C(lock_s) waiting for the VM's lock, C(cleanup_s) removing what interrupted runs left,
      C(freeze_s) quiescing and starting the backup job, C(transfer_s) reading the data into the set, C(finish_s) ending
      the job and saving the XML and firmware files, C(hash_s) the fsync and sha256 of every file, C(commit_s) the
      manifest, the rename into C(sets/) and retiring old checkpoints. Phases that did not run are absent.
  returned: success
  type: dict
  sample: {"plan_s": 0.21, "lock_s": 0.0, "cleanup_s": 0.01, "freeze_s": 0.3, "transfer_s": 1.8, "finish_s": 0.1,
           "hash_s": 0.9, "commit_s": 0.1}
  version_added: 0.2.0
repository_path:
  description: Directory of the committed set.
  returned: success
  type: str
vm:
  description: The VM's name, UUID and run state (C(state), also when an existing set of the period is returned).
  returned: success
  type: dict
consistency:
  description:
    - C(application) when the guest's file systems were frozen at the backup's point in time, C(crash) otherwise (as the
      manifest records it). In check mode the prediction; with C(changed=false) the kept set's.
  returned: success
  type: str
  sample: application
quiesce:
  description:
    - What quiescing did for the new set. None with C(changed=false) (no new point in time was taken).
  returned: success
  type: dict
  contains:
    policy:
      description: O(quiesce).
      type: str
    consistency:
      description: C(application) or C(crash).
      type: str
    frozen:
      description: Whether the guest was frozen at the point in time.
      type: bool
    frozen_seconds:
      description: Seconds from the freeze's answer to the thaw's answer (how long the guest stayed frozen); None when not frozen.
      type: float
    freeze_seconds:
      description: Seconds the freeze request took (the guest's freeze hooks run in it); None when no freeze was tried.
      type: float
    filesystems:
      description: File systems the guest agent froze; None when not frozen.
      type: int
    reason:
      description: Why the set is only crash-consistent (C(auto)'s fallback, O(quiesce=never), a shut-off VM); None otherwise.
      type: str
    thawed_leftover:
      description: Whether a freeze left by a killed run was thawed first (check mode - whether a real run would).
      type: bool
  sample:
    policy: auto
    consistency: application
    frozen: true
    frozen_seconds: 0.41
    freeze_seconds: 0.05
    filesystems: 1
    reason: null
    thawed_leftover: false
cleaned_up:
  description:
    - What an interrupted earlier run had left and this run removed (job, checkpoint, staging directories, run directories
      with their NBD socket and scratch files, a frozen guest).
  returned: success
  type: list
  elements: str
would_clean_up:
  description: Staging directories of interrupted runs (and a guest left frozen) that a real run would clean up (check mode); empty otherwise.
  returned: success
  type: list
  elements: str
error_code:
  description: A stable code for the failure; see the collection's error code table.
  returned: failure
  type: str
  sample: VM_NOT_FOUND
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmbackup.libvirt.plugins.module_utils._args import CONNECTION_ARGSPEC, REPOSITORY_ARGSPEC
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import run_module
from ansible_collections.vmbackup.libvirt.plugins.module_utils._export import Exporter, ExportParams


def main() -> None:
    argument_spec = dict(
        name=dict(type="str"),
        uuid=dict(type="str"),
        mode=dict(type="str", choices=["auto", "full", "incremental"], default="auto"),
        disks=dict(type="list", elements="str"),
        exclude_disks=dict(type="list", elements="str"),
        period=dict(type="str"),
        workers=dict(type="int"),
        create_repository=dict(type="bool", default=False),
        series=dict(type="str", default="default"),
        full_every_sets=dict(type="int"),
        full_every_days=dict(type="float"),
        skip_unchanged=dict(type="bool", default=True),
        quiesce=dict(type="str", choices=["auto", "required", "never"], default="auto"),
        quiesce_timeout=dict(type="float", default=10.0),
        transport=dict(type="str", choices=["auto", "pull", "push"], default="auto"),
        compress=dict(type="str", choices=["none", "zstd"], default="none"),
        scratch_dir=dict(type="path", default="/var/lib/libvirt/qemu/vmbackup"),
    )
    argument_spec.update(CONNECTION_ARGSPEC)
    argument_spec.update(REPOSITORY_ARGSPEC)
    module = AnsibleModule(
        argument_spec=argument_spec,
        mutually_exclusive=[("name", "uuid")],
        required_one_of=[("name", "uuid")],
        supports_check_mode=True,
    )
    run_module(module, ExportParams, Exporter)


if __name__ == "__main__":
    main()
