#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: drill
short_description: Prove a backup restorable - restore it under a throwaway name, check and boot it, remove it, record the proof
version_added: 0.1.0
author:
  - vmbackup.libvirt contributors (@vmbackup)
description:
  - A restore drill of one point of one VM on this host. The checks, in this order (the first that fails ends the drill).
  - C(image) - C(qemu-img check) of every image of the repository the point's restore reads (its disks' chains).
  - C(restore) - the point restored the way M(vmbackup.libvirt.restore) restores it (the same code - every file's sha256
    is verified while the images are written, nothing is defined unless all matched), as raw images in a private
    directory C(<disk_dir>/<drill name>/), under the throwaway name C(vmbackup-drill-<vm name>-<token>) with a new UUID
    and new MAC addresses. The definition carries a C(<vmbackupdrill:drill>) marker in its libvirt metadata (host,
    process, token). It has no network interface (O(network=none)) or every interface on the isolated network
    (O(network=isolated)); no host device (C(hostdev), C(redirdev), C(smartcard)); serial consoles and log files go to
    the drill directory, other character devices become ptys, graphics ports are automatic - nothing is shared with the
    original VM, which may run on the same host.
  - C(fsck) - C(e2fsck -fn) of every ext2/3/4 file system on the restored images (the whole disk, or each primary
    partition of an MBR or GPT partition table; logical partitions, LVM and other file systems are not looked into),
    before anything boots. A file system whose journal needs recovery (a crash-consistent backup) has its journal
    replayed first, on the throwaway copy, as the kernel would at mount.
  - C(boot) - the restored VM is started (see O(boot)). C(agent) - the guest agent answers within O(boot_timeout).
    C(fsinfo) - C(guest-get-fsinfo) lists at least one mounted file system. C(probe) - O(probe) runs in the guest
    through the agent and exits with O(probe_expect_rc).
  - Then, always - also when a check failed, and when the run is cancelled (SIGTERM, an AWX cancel) - the drill's
    domain is destroyed and undefined (with its NVRAM, TPM state, checkpoint and snapshot metadata) and its directory
    removed. A file that another domain uses is never removed (the directory is then kept, and the run fails with
    C(DRILL_LEFTOVER)).
  - The proof C(<repository>/vms/<uuid>/sets/<set-id>.drill.json) is written beside the set, on success and on
    failure - when, where, which point, each check with its outcome, seconds and detail, the outcome, the failed check,
    the cleanup. The set itself is only read, never changed. M(vmbackup.libvirt.backup_info) shows each VM's newest
    drill and its age; M(vmbackup.libvirt.prune) removes a proof with its set.
  - A drill that was killed (SIGKILL, a crash of the host) leaves a journal C(<disk_dir>/.vmbackup-drill-<token>.json)
    and possibly its domain; the next drill on this host removes both once the process that made them is gone (the
    marker and the journal name the host, the pid and the process start time), and lists them in RV(cleaned_up).
  - "Failure: a check that fails ends the drill with C(DRILL_FAILED), RV(failed_check) naming it and C(cause_code) the
    underlying code (such as C(CHECKSUM_MISMATCH) for a damaged file; nothing was defined then). A drill that cannot
    run for a reason that says nothing about the set (C(LIBVIRT_UNAVAILABLE), C(TARGET_NO_SPACE), C(VM_LOCKED),
    C(CANCELLED)...) fails with that code, and its proof has the outcome C(error)."
extends_documentation_fragment:
  - vmbackup.libvirt._connection
  - vmbackup.libvirt._repository
  - vmbackup.libvirt._attributes
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - Reports the point (for O(point=random), one drawn for the prediction - the real run draws again), the checks it
        would run and the leftovers of killed drills it would remove, after the refusals it would make (repository, VM,
        point, disk directory, isolated network). It writes, defines and removes nothing, and does not create O(disk_dir).
      - The drill name it reports has another token than a real run's.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
    support: none
    details:
      - Every run drills again and writes a new proof (C(changed=true)); that is its purpose.
options:
  name:
    description:
      - The name of the backed-up VM, as its newest set in the repository records it. Exactly one of O(name) and O(uuid).
      - The VM does not need to exist on this host.
    type: str
  uuid:
    description:
      - The UUID of the backed-up VM.
    type: str
  point:
    description:
      - Which point to drill - C(newest), C(random) (any readable committed set of the VM), or a set id.
    type: str
    default: newest
  as_of:
    description:
      - Drill the newest set completed at or before this time (ISO 8601, as M(vmbackup.libvirt.restore)'s O(as_of)).
        Not with a O(point) other than C(newest).
    type: str
  network:
    description:
      - C(none) removes every network interface of the drilled VM.
      - C(isolated) puts every interface on the libvirt network O(isolated_network), which must be defined, active and
        without C(<forward>) (C(INVALID_ARGUMENT) otherwise, before anything is written) - a copy of a VM has the
        addresses of the original and must not reach its network.
    type: str
    choices: [none, isolated]
    default: none
  isolated_network:
    description:
      - The libvirt network for O(network=isolated).
    type: str
    default: vmbackup-isolated
  disk_dir:
    description:
      - The directory under which each drill makes its private directory for the restored images and consoles.
        It is created (mode 0711) when missing. It and every directory above it must be owned by root and writable by
        nobody else (C(UNSAFE_TARGET)). The drill directory is removed after each drill; O(disk_dir) stays.
      - The file system must have room for the point's data (the restored images are sparse raw files).
    type: path
    default: /var/lib/libvirt/images/vmbackup-drill
  boot:
    description:
      - C(auto) boots the restored VM when its definition has a guest agent channel (then the C(agent), C(fsinfo) and
        C(probe) checks run); a VM without one gets the offline checks only.
      - C(always) boots it in any case; without an agent channel the C(boot) check passes when the VM is still running
        10 seconds after it started.
      - C(never) - the offline checks only.
    type: str
    choices: [auto, always, never]
    default: auto
  boot_timeout:
    description:
      - Seconds to wait for the guest agent to answer after the start (1 to 86400).
    type: float
    default: 300
  probe:
    description:
      - A command (argv list, no shell) run in the booted guest through the agent (C(guest-exec)); its exit code must be
        O(probe_expect_rc). For example a read check of a file the application needs, or of every file
        (C([sh, -c, "find / -xdev -type f -exec cat {} + >/dev/null"])). Needs a VM with an agent.
    type: list
    elements: str
  probe_expect_rc:
    description:
      - The exit code the probe must return.
    type: int
    default: 0
  probe_timeout:
    description:
      - Seconds the probe may run (1 to 86400).
    type: float
    default: 300
  checks:
    description:
      - The optional checks to run - C(image), C(fsck), C(fsinfo). Default - all of them. C(restore) always runs; C(boot),
        C(agent) and C(probe) follow O(boot) and O(probe).
    type: list
    elements: str
    choices: [image, fsck, fsinfo]
  workers:
    description:
      - Threads that check the sha256 of the files while they are restored. Defaults to the number of CPUs.
    type: int
notes:
  - The restore takes the repository's shared lock on the VM (as M(vmbackup.libvirt.restore) does), and so does the
    write of the proof; a prune or export of the VM waits for them.
  - Drills of different VMs (or of one VM) can run at once on one host; each has its own name and directory.
  - libvirt keeps the drilled domain's QEMU log (C(/var/log/libvirt/qemu/<drill name>.log)), as for any domain it ran.
seealso:
  - module: vmbackup.libvirt.restore
  - module: vmbackup.libvirt.verify
  - module: vmbackup.libvirt.backup_info
"""

EXAMPLES = r"""
- name: Drill the newest backup of web01 on this host, no network
  vmbackup.libvirt.drill:
    repository: /srv/vmbackup
    name: web01

- name: Drill a random point of db01 on the isolated network, and check that the database files read
  vmbackup.libvirt.drill:
    repository: /mnt/backups/vmbackup
    name: db01
    point: random
    network: isolated
    probe: [sh, -c, "find /var/lib/postgresql -type f -exec cat {} + > /dev/null"]

- name: Offline checks only (qemu-img check, checksummed restore, e2fsck)
  vmbackup.libvirt.drill:
    repository: /srv/vmbackup
    uuid: 7d5c3f3e-8d1c-4c55-9a4e-2f0c7c1e9b10
    boot: never
"""

RETURN = r"""
outcome:
  description: C(ok), C(failed) (a check found the point wanting) or C(error) (the drill could not run); null in check mode.
  returned: always
  type: str
  sample: ok
set_id:
  description: The drilled point.
  returned: success
  type: str
  sample: 20261125T073512Z-001
point:
  description: How the point was chosen (C(newest), C(random (one of N)), C(set id), C(as_of ...)).
  returned: success
  type: str
vm:
  description: Name and UUID of the backed-up VM.
  returned: success
  type: dict
host:
  description: The host the drill ran on (its host name).
  returned: success
  type: str
drill_name:
  description: The throwaway domain name (in check mode, with another token than a real run would use).
  returned: success
  type: str
  sample: vmbackup-drill-web01-3f9a0c1d2e
network:
  description: C(none), or C(isolated (<network>)).
  returned: success
  type: str
has_agent_channel:
  description: Whether the saved definition has a guest agent channel.
  returned: success
  type: bool
planned_checks:
  description: The checks the drill runs, in order.
  returned: success
  type: list
  elements: str
checks:
  description:
    - Each check that ran (or, in check mode, would run, with outcome C(planned)); a check after the failed one is
      listed with outcome C(skipped).
  returned: success
  type: list
  elements: dict
  contains:
    name:
      description: C(image), C(restore), C(fsck), C(boot), C(agent), C(fsinfo) or C(probe).
      type: str
    outcome:
      description: C(ok), C(failed), C(error), C(skipped) (did not apply, such as C(fsck) without an ext file system, or not reached).
      type: str
    seconds:
      description: How long it took.
      type: float
    detail:
      description: What it found, in words.
      type: str
    error_code:
      description: The code of a failure (such as C(CHECKSUM_MISMATCH)), else null.
      type: str
failed_check:
  description: The check that failed, or null.
  returned: always
  type: str
proof:
  description: The path of the proof written beside the set (null in check mode, or when the set was pruned meanwhile).
  returned: success
  type: str
  sample: /srv/vmbackup/vms/7d5c3f3e-8d1c-4c55-9a4e-2f0c7c1e9b10/sets/20261125T073512Z-001.drill.json
proof_content:
  description: The proof as written (see docs/drills.md for its format).
  returned: when a drill ran
  type: dict
cleanup:
  description: C(complete) (bool), C(removed) (what was removed), C(problems) and C(seconds) of the drill's own cleanup.
  returned: when a drill ran
  type: dict
restore:
  description:
    - The restore's figures - vm, chain, disks, bytes_read, bytes_written, verify_s, convert_s, dropped_disks, and
      timings (its per-phase seconds, with the keys of the C(timings) of M(vmbackup.libvirt.restore)).
    - The restore's progress lines go to the managed host's log (syslog or the journal, identifier C(ansible-drill)).
  returned: when the restore check passed
  type: dict
timings:
  description:
    - Wall-clock seconds per phase of the drill, in the order they ran - C(plan_s) (trust checks, point, network,
      leftovers of earlier drills), then one C(<check>_s) per check that ran (C(image_s), C(restore_s), C(fsck_s),
      C(boot_s), ...), then C(cleanup_s). In check mode only C(plan_s).
  returned: success
  type: dict
  version_added: 0.2.0
  sample: {"plan_s": 0.05, "image_s": 0.02, "restore_s": 1.9, "fsck_s": 0.3, "boot_s": 12.4, "cleanup_s": 0.4}
cleaned_up:
  description: Leftovers of killed drills (and of interrupted restores into the drill directory) this run removed; in check mode, what it would remove.
  returned: always
  type: list
  elements: str
duration_s:
  description: Seconds the drill took.
  returned: success
  type: float
error_code:
  description: C(DRILL_FAILED), C(DRILL_LEFTOVER), or why the drill could not run (see the collection's error code table).
  returned: failure
  type: str
  sample: DRILL_FAILED
cause_code:
  description: With C(DRILL_FAILED), the code of the failed check (such as C(CHECKSUM_MISMATCH), C(IMAGE_INVALID), C(AGENT_UNAVAILABLE)).
  returned: failure
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vmbackup.libvirt.plugins.module_utils._args import CONNECTION_ARGSPEC, REPOSITORY_ARGSPEC
from ansible_collections.vmbackup.libvirt.plugins.module_utils._drill import BOOTS, CHECKS, DEFAULT_DISK_DIR, DEFAULT_ISOLATED_NETWORK, NETWORKS, \
    DrillParams, Driller
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import run_module


def main() -> None:
    argument_spec = dict(
        name=dict(type="str"),
        uuid=dict(type="str"),
        point=dict(type="str", default="newest"),
        as_of=dict(type="str"),
        network=dict(type="str", choices=list(NETWORKS), default="none"),
        isolated_network=dict(type="str", default=DEFAULT_ISOLATED_NETWORK),
        disk_dir=dict(type="path", default=DEFAULT_DISK_DIR),
        boot=dict(type="str", choices=list(BOOTS), default="auto"),
        boot_timeout=dict(type="float", default=300.0),
        probe=dict(type="list", elements="str"),
        probe_expect_rc=dict(type="int", default=0),
        probe_timeout=dict(type="float", default=300.0),
        checks=dict(type="list", elements="str", choices=list(CHECKS)),
        workers=dict(type="int"),
    )
    argument_spec.update(CONNECTION_ARGSPEC)
    argument_spec.update(REPOSITORY_ARGSPEC)
    module = AnsibleModule(
        argument_spec=argument_spec,
        mutually_exclusive=[("name", "uuid")],
        required_one_of=[("name", "uuid")],
        supports_check_mode=True,
    )
    run_module(module, DrillParams, Driller)


if __name__ == "__main__":
    main()
