# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""External disk-only snapshots of a VM: list, create, merge back (delete), revert.

This module is private to the vmbackup.libvirt collection; it is not a public API.

What libvirt 9.0 does (measured on the test machine, see docs/snapshots.md):
- creates external disk-only snapshots of running VMs (all disks at once with ATOMIC) and of
  shut-off VMs, but refuses the latter while the VM has a checkpoint ("cannot perform block
  operations while checkpoint exists");
- deletes external snapshots itself (virDomainSnapshotDelete): block commit + pivot on a running
  VM, qemu-img commit on a shut-off one, also an intermediate snapshot; it merges the checkpoint
  bitmaps and removes the merged overlays. A commit that fails (ENOSPC on the base) leaves the
  VM running on the overlay and the snapshot in place;
- cannot revert to an external snapshot ("not supported yet" before 9.7): revert is done here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import struct
import time
import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _libvirt as lv
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _quiesce
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._deps import libvirt
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._lock import VmLock, validate_timeout
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import Backend

PREFIX = "vmbackup-snap-"
# One run at a time changes a VM's snapshots: a per-VM flock in a directory only root can write
# (restore keeps its locks there too).
LOCK_DIR = "/run/vmbackup"
# A bare snapshot name becomes part of file names (the overlays), so it is kept plain.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
OVERLAY_RE = re.compile(r"^(?P<base>.+?)(?:\.vmbackup-snap-[A-Za-z0-9][A-Za-z0-9_.-]*?\.qcow2)+$")
# A merge that failed may have written part of the overlay into its base: the snapshot's point
# is then gone, and a revert to it would return a mix. The snapshot's description says so.
MERGE_FAILED_MARK = "[vmbackup: merge failed; base image partly written; revert refused]"
QCOW2_MAGIC = b"QFI\xfb"
MEMORY_NO_FREEZE = ("a memory snapshot is not frozen: the guest resumes from its memory image with disks of the same "
                    "instant (a freeze would be saved in the image and resumed frozen)")


def full_name(bare: str) -> str:
    return PREFIX + bare


def is_ours(name: str) -> bool:
    return name.startswith(PREFIX)


def validate_name(bare: str) -> None:
    if not isinstance(bare, str) or not NAME_RE.match(bare):
        raise VmBackupError("INVALID_NAME", f"snapshot name {bare!r}: 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")


def libvirt_name(snapshot: str, foreign: bool) -> str:
    """The name in libvirt: ours carry the prefix; a foreign one is named exactly (never prefixed)."""
    if foreign:
        if not snapshot or "\x00" in snapshot or "/" in snapshot:
            raise VmBackupError("INVALID_NAME", f"snapshot name {snapshot!r} is not a libvirt snapshot name")
        return snapshot
    validate_name(snapshot)
    return full_name(snapshot)


def base_image_of(source: str) -> str:
    """The disk's own image under any of our overlays: ``vda.qcow2.vmbackup-snap-a.qcow2`` -> ``vda.qcow2``."""
    match = OVERLAY_RE.match(source)
    return match.group("base") if match else source


def overlay_path(source: str, name: str) -> str:
    """Where snapshot ``name`` (full libvirt name) puts the overlay of a disk whose active image is ``source``."""
    return f"{base_image_of(source)}.{name}.qcow2"


def qcow2_backing_file(path: str) -> str | None:
    """The backing file a qcow2 header names (made absolute against the image's directory), or
    None (no backing file, not qcow2, unreadable). Read from the header: no qemu-img, no lock."""
    try:
        with open(path, "rb") as fh:
            header = fh.read(20)
            if len(header) < 20 or header[:4] != QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not size or size > 4096:
                return None
            fh.seek(offset)
            name = fh.read(size).decode("utf-8", "replace")
    except OSError:
        return None
    if name.startswith("json:") or ":" in name.split("/", 1)[0]:
        return name  # a protocol or json: spec; not a local path
    return name if os.path.isabs(name) else os.path.normpath(os.path.join(os.path.dirname(path), name))


def _utc_iso(epoch: str | None) -> str | None:
    if not epoch:
        return None
    try:
        return dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        return None


def parse_snapshot_xml(xml: str, current: bool = False) -> dict[str, t.Any]:
    """One snapshot as list_snapshots returns it, from its <domainsnapshot> XML (pure)."""
    root = ET.fromstring(xml)
    name = root.findtext("name") or ""
    mem = root.find("memory")
    mem_kind = mem.get("snapshot") if mem is not None else None
    memory = {"external": "external", "internal": "internal"}.get(mem_kind or "", "none")
    disks = []
    for el in root.findall("./disks/disk"):
        kind = el.get("snapshot") or "no"
        source = el.find("source")
        overlay = None
        if kind == "external" and source is not None:
            overlay = source.get("file") or source.get("dev") or source.get("name")
        disks.append({"target": el.get("name"), "kind": kind, "overlay": overlay,
                      "base": qcow2_backing_file(overlay) if overlay else None})
    if memory == "internal" and not any(d["kind"] == "external" for d in disks):
        # A classic internal snapshot (virsh snapshot-create): every disk internal.
        for disk in disks:
            disk["kind"] = disk["kind"] if disk["kind"] != "no" else "internal"
    return {
        "name": name,
        "ours": is_ours(name),
        "current": current,
        "parent": root.findtext("./parent/name"),
        "created": _utc_iso(root.findtext("creationTime")),
        "state": root.findtext("state"),
        "memory": memory,
        "memory_file": mem.get("file") if mem is not None and memory == "external" else None,
        "description": root.findtext("description"),
        "disks": disks,
    }


def _current_name(dom) -> str | None:
    try:
        if not dom.hasCurrentSnapshot(0):
            return None
        return dom.snapshotCurrent(0).getName()
    except libvirt.libvirtError:
        return None


def list_snapshots(dom) -> list[dict[str, t.Any]]:
    """Every snapshot of the domain, ours and foreign, parents before children.

    Each: ``{name, ours, current, parent, created (UTC ISO), state, memory (none|external|internal),
    memory_file, description, disks: [{target, kind (external|internal|no), overlay, base}]}``;
    ``base`` is the backing file the overlay's qcow2 header names (None when unknown).
    """
    current = _current_name(dom)
    out = []
    for attempt in range(10):
        try:
            snaps = dom.listAllSnapshots(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL)
            break
        except libvirt.libvirtError:
            # libvirt 9.0 fails a listing while another client creates a snapshot ("name in
            # virGetDomainSnapshot must not be NULL"): the list is complete a moment later.
            if attempt == 9:
                raise
            time.sleep(0.2)
    for snap in snaps:
        try:
            xml = snap.getXMLDesc(0)
        except libvirt.libvirtError:
            continue  # deleted meanwhile
        entry = parse_snapshot_xml(xml)
        entry["current"] = entry["name"] == current
        out.append(entry)
    return out


# ---------------------------------------------------------------------- the module's backend

STATES = ("present", "absent", "reverted")
RUN_STATES = ("running", "shutoff", "paused", "as_snapshot")


@dataclasses.dataclass
class SnapshotParams:
    snapshot: str
    name: str | None = None
    uuid: str | None = None
    uri: str = "qemu:///system"
    state: str = "present"
    quiesce: str = "auto"
    quiesce_timeout: float = 10.0
    memory: bool = False
    description: str | None = None
    run_state: str = "as_snapshot"
    foreign: bool = False
    lock_timeout: float = 60.0


@dataclasses.dataclass
class Plan:
    """What a run does (or would do): a pure value, decided before any side effect."""

    action: str  # create | delete | revert | none
    reason: str
    snapshot: str  # the libvirt name
    vm_state: str
    disks: list[dict[str, t.Any]]  # per disk: target, overlay, base (create: the overlay to be made)
    memory_file: str | None = None
    drop: list[str] = dataclasses.field(default_factory=list)  # later snapshots a revert drops (children first)
    drop_files: list[str] = dataclasses.field(default_factory=list)  # their overlays and memory files
    run_state: str | None = None  # reverted: the run state afterwards (running | paused | shutoff)
    restore_memory: bool = False

    @property
    def changed(self) -> bool:
        return self.action != "none"


def validate_params(p: SnapshotParams) -> str:
    """Checks that need no I/O; returns the snapshot's libvirt name."""
    if (p.name is None) == (p.uuid is None):
        raise VmBackupError("INVALID_ARGUMENT", "give exactly one of name or uuid (the VM)")
    if p.name is not None and (not p.name or "\x00" in p.name):
        raise VmBackupError("INVALID_NAME", "name must be a non-empty string without NUL characters")
    if p.state not in STATES:
        raise VmBackupError("INVALID_ARGUMENT", f"state {p.state!r} is not one of {', '.join(STATES)}")
    if p.run_state not in RUN_STATES:
        raise VmBackupError("INVALID_ARGUMENT", f"run_state {p.run_state!r} is not one of {', '.join(RUN_STATES)}")
    p.quiesce, p.quiesce_timeout = _quiesce.validate(p.quiesce, p.quiesce_timeout)
    validate_timeout(p.lock_timeout)
    if p.foreign and p.state == "present":
        raise VmBackupError("INVALID_ARGUMENT", "foreign: true names an existing snapshot made by another tool; "
                            "it applies to state absent and reverted only")
    if p.memory and p.quiesce == "required":
        raise VmBackupError("INVALID_ARGUMENT", "memory: true cannot be combined with quiesce: required: " + MEMORY_NO_FREEZE)
    if p.description is not None and "\x00" in p.description:
        raise VmBackupError("INVALID_ARGUMENT", "description must not contain NUL characters")
    return libvirt_name(p.snapshot, p.foreign)


def run_state_after(requested: str, snapshot_state: str | None, memory: str) -> tuple[str, bool]:
    """(running | paused | shutoff, restore from the memory file?) for a revert (pure)."""
    if requested == "as_snapshot":
        requested = {"shutoff": "shutoff", "paused": "paused"}.get(snapshot_state or "", "running")
    return requested, memory == "external" and requested != "shutoff"


def snapshot_xml(name: str, description: str | None, disks: list[dict[str, t.Any]], skip: t.Iterable[str],
                 memory_file: str | None) -> str:
    """An external <domainsnapshot>: each disk of ``disks`` gets its overlay, ``skip`` none."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    if description:
        ET.SubElement(root, "description").text = description
    if memory_file:
        ET.SubElement(root, "memory", snapshot="external", file=memory_file)
    else:
        ET.SubElement(root, "memory", snapshot="no")
    disks_el = ET.SubElement(root, "disks")
    for disk in disks:
        el = ET.SubElement(disks_el, "disk", name=disk["target"], snapshot="external", type="file")
        ET.SubElement(el, "driver", type="qcow2")
        ET.SubElement(el, "source", file=disk["overlay"])
    for target in skip:
        ET.SubElement(disks_el, "disk", name=target, snapshot="no")
    return ET.tostring(root, encoding="unicode")


def repoint_disks(domain_xml: str, sources: dict[str, str]) -> str:
    """The domain XML with each disk of ``sources`` (target -> overlay) on that file, qcow2, and
    without the backing chain libvirt had recorded (it re-reads it from the image)."""
    root = ET.fromstring(domain_xml)
    for el in root.findall("./devices/disk"):
        target = el.find("target")
        if target is None or target.get("dev") not in sources:
            continue
        el.set("type", "file")
        source = el.find("source")
        if source is None:
            source = ET.SubElement(el, "source")
        source.attrib.clear()  # index, dev, pool/volume of the old source mean nothing for the overlay
        source.set("file", sources[target.get("dev")])
        for backing in el.findall("backingStore"):
            el.remove(backing)
        driver = el.find("driver")
        if driver is not None:
            driver.set("type", "qcow2")
    return ET.tostring(root, encoding="unicode")


def descendants(snapshots: list[dict[str, t.Any]], name: str) -> list[dict[str, t.Any]]:
    """Every snapshot below ``name`` in the snapshot tree, parents before children (pure)."""
    children: dict[str | None, list[dict[str, t.Any]]] = {}
    for snap in snapshots:
        children.setdefault(snap["parent"], []).append(snap)
    out, todo = [], list(children.get(name, []))
    while todo:
        snap = todo.pop(0)
        out.append(snap)
        todo.extend(children.get(snap["name"], []))
    return out


def _stat_key(path: str) -> tuple[int, int, int] | None:
    """What changes when an image is written: size, mtime and ctime (None when it is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sources_now(dom) -> dict[str, str | None]:
    """target -> the disk's source in the definition that counts now (live when running)."""
    return {d.target: d.source for d in lv.parse_disks(lv.domain_xml(dom, inactive=not lv.is_active(dom)))}


def mark_merge_failed(description: str | None) -> str:
    text = description or ""
    return text if MERGE_FAILED_MARK in text else (f"{text} {MERGE_FAILED_MARK}".strip())


def with_description(xml: str, description: str) -> str:
    root = ET.fromstring(xml)
    el = root.find("description")
    if el is None:
        el = ET.Element("description")
        root.insert(1, el)
    el.text = description
    return ET.tostring(root, encoding="unicode")


class SnapshotBackend(Backend):
    """Observe the VM and its snapshots, decide (Plan), and act under one check-mode gate."""

    # A create is one libvirt call (done or not, the freeze thawed); a merge is finished or
    # abandoned by libvirt; a revert cancelled part-way leaves the VM shut off. A rerun converges.
    cancel_outcome = "the VM may be part-way through the change (a revert leaves it shut off); run the module again"

    def run(self) -> dict[str, t.Any]:
        self.removed: list[str] = []
        self.carried: list[str] = []
        self.sentinels: list[str] = []
        self._skip: list[str] = []
        name = validate_params(self.p)
        with lv.session(self.p.uri) as conn:
            dom = lv.lookup_domain(conn, name=self.p.name, vm_uuid=self.p.uuid)
            vm = {"name": dom.name(), "uuid": dom.UUIDString()}
            before = list_snapshots(dom)
            plan = self._plan(conn, dom, name, before)
            quiesce = None
            if not self.check_mode and plan.changed:
                # The one gate: everything below changes the VM.
                with self._lock(vm):
                    # Decided again under the lock: another run may have done it meanwhile.
                    before = list_snapshots(dom)
                    plan = self._plan(conn, dom, name, before)
                    if plan.changed:
                        quiesce = getattr(self, f"_do_{plan.action}")(conn, dom, plan)
            after = list_snapshots(dom) if not self.check_mode else self._predict(before, plan)
            vm["state"] = lv.domain_state(dom) if not self.check_mode else (plan.run_state or plan.vm_state)
            return self._result(plan, vm, before, after, quiesce)

    def _lock(self, vm: dict[str, str]) -> VmLock:
        os.close(repo_mod.open_dir(LOCK_DIR, "the snapshot lock directory", create_mode=0o700))
        repo_mod.check_trusted_path(LOCK_DIR, "the snapshot lock directory")
        return VmLock(os.path.join(LOCK_DIR, f"snapshot-{vm['uuid']}.lock"), self.p.lock_timeout,
                      f"snapshot {self.p.state} {self.p.snapshot} of {vm['name']}")

    def _check_no_job(self, dom) -> None:
        if lv.is_active(dom) and lv.active_job(dom) is not None:
            raise VmBackupError("BACKUP_JOB_ACTIVE", "a libvirt job (a backup?) runs on the VM; try again when it has finished")

    # ------------------------------------------------------------------ decide
    def _plan(self, conn, dom, name: str, snapshots: list[dict[str, t.Any]]) -> Plan:
        vm_state = lv.domain_state(dom)
        entry = next((s for s in snapshots if s["name"] == name), None)
        if self.p.state == "present":
            if entry is not None:
                return Plan("none", f"snapshot {name} exists", name, vm_state, entry["disks"], entry["memory_file"])
            return self._plan_create(dom, name, vm_state)
        if self.p.state == "absent":
            if entry is None:
                return Plan("none", self._missing_reason(name, snapshots), name, vm_state, [])
            self._check_external(entry)
            self._check_no_job(dom)
            chains = self._check_in_chain(dom, entry)
            merged = [d for d in entry["disks"] if d["kind"] == "external"]
            if not lv.is_active(dom) and any(chains[d["target"]][0] != d["overlay"] for d in merged):
                # Measured: libvirt 9.0 refuses it ("could not find base disk source in disk source
                # chain": it knows no backing chain of an inactive domain).
                raise VmBackupError("SNAPSHOT_UNSUPPORTED", f"libvirt 9.0 cannot merge {name} while the VM is shut off and a "
                                    "later snapshot is on top of it; start the VM (the merge then runs live), or merge the "
                                    "later snapshots first", snapshot=name)
            # The commit writes into the image below each overlay and then removes the overlay.
            self._check_not_shared(conn, dom, [d["overlay"] for d in merged] + [d["base"] for d in merged if d["base"]],
                                   "merging the snapshot would change or remove it")
            return Plan("delete", f"snapshot {name} is merged back into its base images", name, vm_state, merged,
                        entry["memory_file"])
        if entry is None:
            raise VmBackupError("SNAPSHOT_NOT_FOUND", f"{self._missing_reason(name, snapshots)}; nothing to revert to",
                                snapshot=name, snapshots=[s["name"] for s in snapshots])
        return self._plan_revert(conn, dom, entry, snapshots, vm_state)

    def _missing_reason(self, name: str, snapshots: list[dict[str, t.Any]]) -> str:
        text = f"VM has no snapshot {name}"
        if not self.p.foreign and any(s["name"] == self.p.snapshot and not s["ours"] for s in snapshots):
            text += (f" (a foreign snapshot named {self.p.snapshot!r} exists and is left alone; "
                     "name it with foreign: true to act on it)")
        return text

    def _plan_create(self, dom, name: str, vm_state: str) -> Plan:
        running = lv.is_active(dom)
        disks = lv.parse_disks(lv.domain_xml(dom, inactive=not running))
        chosen, skip = [], []
        for disk in disks:
            if disk.device in ("cdrom", "floppy") or disk.readonly or not disk.source:
                skip.append(disk.target)  # nothing a guest writes: no overlay
                continue
            if disk.source_type != "file":
                raise VmBackupError("SNAPSHOT_UNSUPPORTED", f"disk {disk.target} has a {disk.source_type} source; "
                                    "this module makes overlays of file-backed disks only", disk=disk.target)
            overlay = overlay_path(disk.source, name)
            if os.path.lexists(overlay):
                raise VmBackupError("SNAPSHOT_FAILED", f"the overlay {overlay} of disk {disk.target} exists already "
                                    "(no snapshot of this VM names it); remove or rename it", disk=disk.target, path=overlay)
            chosen.append({"target": disk.target, "kind": "external", "overlay": overlay, "base": disk.source})
        if not chosen:
            raise VmBackupError("NO_DISKS", "the VM has no disk a snapshot could cover")
        if not running and lv.checkpoint_names(dom):
            raise VmBackupError("SNAPSHOT_UNSUPPORTED", "libvirt 9.0 refuses a disk snapshot of a shut-off VM that has "
                                "checkpoints (backup bitmaps); snapshot it while it runs, or after its next shut-off copy",
                                checkpoints=lv.checkpoint_names(dom))
        memory_file = None
        if self.p.memory:
            if vm_state not in ("running", "paused", "blocked"):
                raise VmBackupError("INVALID_ARGUMENT", f"memory: true needs a running VM; it is {vm_state}")
            memory_file = f"{base_image_of(chosen[0]['base'])}.{name}.mem"
            if os.path.lexists(memory_file):
                raise VmBackupError("SNAPSHOT_FAILED", f"the memory file {memory_file} exists already", path=memory_file)
        self._check_no_job(dom)
        self._skip = skip
        return Plan("create", f"snapshot {name} does not exist", name, vm_state, chosen, memory_file)

    @staticmethod
    def _check_external(entry: dict[str, t.Any]) -> None:
        kinds = {d["kind"] for d in entry["disks"]}
        if "internal" in kinds or entry["memory"] == "internal" or "external" not in kinds:
            raise VmBackupError("SNAPSHOT_UNSUPPORTED", f"snapshot {entry['name']} is not an external disk snapshot "
                                "(internal snapshots are not handled by this module)", snapshot=entry["name"])

    def _chain(self, path: str) -> list[str]:
        return [img.get("filename") for img in self.qemu_img.info_chain(path, None, force_share=True)]

    def _check_in_chain(self, dom, entry: dict[str, t.Any]) -> dict[str, list[str]]:
        """Every overlay of the snapshot is in its disk's active chain now; returns target -> chain."""
        sources = {d.target: d.source for d in lv.parse_disks(lv.domain_xml(dom, inactive=not lv.is_active(dom)))}
        chains = {}
        for disk in entry["disks"]:
            if disk["kind"] != "external":
                continue
            source = sources.get(disk["target"])
            if source is None or not disk["overlay"] or not os.path.exists(disk["overlay"]):
                raise VmBackupError("SNAPSHOT_UNSUPPORTED", f"snapshot {entry['name']}: the overlay {disk['overlay']} of disk "
                                    f"{disk['target']} is missing, or the VM no longer has that disk", snapshot=entry["name"])
            try:
                chain = self._chain(source)
            except VmBackupError as exc:
                raise VmBackupError("SNAPSHOT_FAILED", f"cannot read the backing chain of disk {disk['target']}: {exc.msg}") from None
            if disk["overlay"] not in chain:
                raise VmBackupError("SNAPSHOT_UNSUPPORTED", f"snapshot {entry['name']}: its overlay {disk['overlay']} is not in "
                                    f"the active chain of disk {disk['target']} ({' <- '.join(reversed(chain))}); "
                                    "it was merged or replaced outside this module", snapshot=entry["name"], chain=chain)
            chains[disk["target"]] = chain
        return chains

    def _plan_revert(self, conn, dom, entry: dict[str, t.Any], snapshots: list[dict[str, t.Any]], vm_state: str) -> Plan:
        name = entry["name"]
        self._check_external(entry)
        if MERGE_FAILED_MARK in (entry["description"] or ""):
            raise VmBackupError("SNAPSHOT_UNSUPPORTED", f"a merge of snapshot {name} failed after writing part of it into "
                                "its base image: its point in time is gone, so it cannot be reverted to; delete it "
                                "(state: absent) once the cause is fixed", snapshot=name)
        chains = self._check_in_chain(dom, entry)
        later = descendants(snapshots, name)
        foreign = [s["name"] for s in later if not s["ours"]]
        if foreign:
            raise VmBackupError("SNAPSHOT_FOREIGN", f"reverting to {name} would drop the later snapshots {', '.join(foreign)} "
                                "made by another tool; delete them with that tool first", snapshot=name, foreign_snapshots=foreign)
        for s in later:
            self._check_external(s)
        disks = []
        for disk in entry["disks"]:
            if disk["kind"] != "external":
                continue
            base = disk["base"]
            if not base or not os.path.exists(base):
                raise VmBackupError("SNAPSHOT_FAILED", f"the base image {base} of {disk['overlay']} is missing", snapshot=name)
            disks.append(dict(disk, chain=chains[disk["target"]]))
        drop_files = []
        for s in later:
            drop_files += [d["overlay"] for d in s["disks"] if d["kind"] == "external" and d["overlay"]]
            if s["memory_file"]:
                drop_files.append(s["memory_file"])
        for disk in disks:
            # Every layer above the snapshot's overlay is discarded, also one whose snapshot
            # metadata is gone (a revert killed after dropping it, a metadata-only delete).
            drop_files += disk["chain"][:disk["chain"].index(disk["overlay"])]
        drop_files = list(dict.fromkeys(p for p in drop_files if p not in {d["overlay"] for d in disks}))
        self._check_not_shared(conn, dom, [d["overlay"] for d in disks] + drop_files,
                               "the revert would recreate or remove it")
        # Root creates and removes files there: nobody else may be able to swap a name for a link.
        for directory in sorted({os.path.dirname(p) for p in [d["overlay"] for d in disks] + drop_files}):
            repo_mod.check_trusted_path(directory, "a directory the revert writes in")
        self._check_no_job(dom)
        run_state, restore = run_state_after(self.p.run_state, entry["state"], entry["memory"])
        if restore and not (entry["memory_file"] and os.path.exists(entry["memory_file"])):
            raise VmBackupError("SNAPSHOT_FAILED", f"the memory file {entry['memory_file']} of {name} is missing; "
                                "revert with run_state: shutoff (disks only)", snapshot=name)
        plan = Plan("revert", "", name, vm_state, disks, entry["memory_file"], [s["name"] for s in reversed(later)],
                    drop_files, run_state, restore)
        if not later and vm_state == run_state and not restore and all(self._overlay_clean(d) for d in disks):
            plan.action, plan.reason = "none", f"the VM is at snapshot {name} (its overlays hold no write) and {run_state}"
        else:
            plan.reason = (f"the VM is returned to snapshot {name}, discarding what was written since"
                           + (f" and the later snapshots {', '.join(plan.drop)}" if plan.drop else ""))
        return plan

    def _check_not_shared(self, conn, dom, paths: list[str], what: str) -> None:
        """No other domain uses any of ``paths`` as a disk or anywhere in a disk's backing chain."""
        used = lv.paths_in_use(conn, backing_reader=lambda path, fmt: self._chain(path)[1:], exclude_uuids=[dom.UUIDString()])
        for path in paths:
            try:
                st = os.lstat(path)
            except OSError:
                st = None
            reason = used.reason(path, st)
            if reason is not None:
                raise VmBackupError("IMAGE_IN_USE", f"{path}: {what}, but it is {reason}", path=path)

    def _overlay_clean(self, disk: dict[str, t.Any]) -> bool:
        """The disk runs on the snapshot's overlay and nothing was written into it."""
        if disk["chain"][0] != disk["overlay"]:
            return False
        return not any(e.get("depth") == 0 for e in self.qemu_img.map(disk["overlay"], "qcow2", force_share=True))

    # ------------------------------------------------------------------ act
    def _do_create(self, conn, dom, plan: Plan) -> dict[str, t.Any] | None:
        xml = snapshot_xml(plan.snapshot, self.p.description, plan.disks, self._skip, plan.memory_file)
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE if plan.memory_file else libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        running = lv.is_active(dom)
        if running and _quiesce.thaw_leftover(dom, self.p.uri):
            self.cleaned.append("a guest freeze left by a killed run (thawed)")
        sentinels = self._intact_sentinels(dom) if running else {}
        created = False
        try:
            # No libvirt QUIESCE flag: the freeze is ours, so its length is bounded and measured.
            # A memory snapshot is not frozen: its memory image would hold a frozen guest, which a
            # revert resumes frozen; disks and memory of one instant need no freeze.
            policy = "never" if plan.memory_file else self.p.quiesce
            with _quiesce.frozen(dom, policy, self.p.quiesce_timeout, self.p.uri) as q:
                try:
                    dom.snapshotCreateXML(xml, flags)
                except libvirt.libvirtError as exc:
                    raise VmBackupError("SNAPSHOT_FAILED", f"libvirt refused the snapshot {plan.snapshot}: "
                                        f"{exc.get_error_message()}", phase="create") from None
                created = True
            if plan.memory_file:
                q.policy, q.reason = self.p.quiesce, MEMORY_NO_FREEZE
        except BaseException:
            if created:
                # quiesce=required and the point came too late (or a cancel): the snapshot goes again.
                self._undo_create(dom, plan)
            raise
        now = {d.target: d.source for d in lv.parse_disks(lv.domain_xml(dom, inactive=not lv.is_active(dom)))}
        wrong = [d["target"] for d in plan.disks if now.get(d["target"]) != d["overlay"]]
        if wrong:
            self.warnings.append(f"after the snapshot, disks {', '.join(wrong)} do not run on their new overlays")
        if running:
            self._keep_sentinels(dom, sentinels, [d["target"] for d in plan.disks])
        return q.public()

    def _undo_create(self, dom, plan: Plan) -> None:
        try:
            dom.snapshotLookupByName(plan.snapshot, 0).delete(0)
            self.cleaned.append(f"snapshot {plan.snapshot} (merged back)")
        except libvirt.libvirtError as exc:
            self.warnings.append(f"snapshot {plan.snapshot} was created but could not be merged back: {exc.get_error_message()}")

    def _do_delete(self, conn, dom, plan: Plan) -> None:
        snap = dom.snapshotLookupByName(plan.snapshot, 0)
        running = lv.is_active(dom)
        sentinels = self._intact_sentinels(dom) if running else {}
        bases = {d["base"]: _stat_key(d["base"]) for d in plan.disks if d["base"]}
        try:
            # libvirt 9.0 merges an external snapshot itself (commit + pivot, or qemu-img commit when
            # shut off), keeps the checkpoint bitmaps consistent and removes the merged overlays.
            snap.delete(0)
        except libvirt.libvirtError as exc:
            written = sorted(path for path, key in bases.items() if _stat_key(path) != key)
            raise self._commit_failed(dom, plan, exc.get_error_message(), written) from None
        now = lv.parse_disks(lv.domain_xml(dom, inactive=False)) + lv.parse_disks(lv.domain_xml(dom, inactive=True))
        overlays = {d["overlay"] for d in plan.disks}
        still = sorted({d.target for d in now if d.source in overlays})
        if still:
            raise VmBackupError("COMMIT_FAILED", f"libvirt deleted snapshot {plan.snapshot} but disks {', '.join(still)} still "
                                "use its overlays; they were kept", snapshot=plan.snapshot)
        # Disks whose active layer was merged now run on the image below it.
        onto_base = [d for d in plan.disks if sources_now(dom).get(d["target"]) == d["base"]]
        if running:
            self._keep_sentinels(dom, sentinels, [d["target"] for d in onto_base])
        files = sorted(overlays) + ([plan.memory_file] if plan.memory_file else [])
        self.removed += [p for p in files if not os.path.lexists(p)]  # libvirt removed the merged overlays
        self._remove_unused(conn, [p for p in files if os.path.lexists(p)])

    # Size sentinels: export gives each checkpoint a disabled bitmap ``<checkpoint>.size`` on the
    # disk's top image (see _libvirt) and reads it from the top image only. libvirt carries the
    # checkpoint bitmaps into a new overlay and back on a merge, but not the sentinels; without
    # them export's next run would be a full. A snapshot or a merge does not resize a disk, so a
    # sentinel intact right before it is re-armed on the new top image right after it (same size).
    def _intact_sentinels(self, dom) -> dict[str, tuple[int, list[str], list[str]]]:
        """target -> (size, checkpoints with an intact sentinel on the top image, all checkpoints)."""
        try:
            checkpoints = lv.checkpoint_names(dom)
            if not checkpoints:
                return {}
            return {target: (node.size, [cp for cp in checkpoints if lv.sentinel_state(node, cp) is None], checkpoints)
                    for target, node in lv.block_nodes(dom).items()}
        except (VmBackupError, libvirt.libvirtError) as exc:
            self.warnings.append(f"cannot read the size sentinels of the backup checkpoints: {exc}")
            return {}

    def _keep_sentinels(self, dom, before: dict[str, tuple[int, list[str], list[str]]], targets: list[str]) -> None:
        """Re-arm on the new top image of each of ``targets`` the sentinels that were intact before.

        After a merge, a sentinel the image below has kept from before the snapshot is left as it
        is: that image was never resized, its bitmaps saw every write the merge made (measured by
        the info helper, docs/snapshots-and-backups.md: a shrink and re-grow of the overlay
        reaches the base as written zeros)."""
        if not before:
            return
        try:
            nodes = lv.block_nodes(dom)
        except VmBackupError as exc:
            self.warnings.append(f"size sentinels not kept: {exc.msg}")
            return
        for target in targets:
            node = nodes.get(target)
            if node is None or target not in before:
                continue
            size, intact, checkpoints = before[target]
            for cp in checkpoints:
                name = lv.sentinel_name(cp)
                try:
                    if cp in intact and node.size == size and name not in node.bitmaps:
                        lv.arm_sentinel(dom, node, cp)
                        self.sentinels.append(f"{target}:{cp}")
                except VmBackupError as exc:
                    self.warnings.append(f"disk {target}: size sentinel of checkpoint {cp} not kept: {exc.msg}")

    def _commit_failed(self, dom, plan: Plan, why: str, written: list[str]) -> VmBackupError:
        """After a failed merge: the snapshot is marked when an image below it was written (its
        point in time is then gone), and the VM's state is reported as it is now."""
        sources = {d.target: d.source for d in lv.parse_disks(lv.domain_xml(dom, inactive=not lv.is_active(dom)))}
        if not written:
            return VmBackupError("COMMIT_FAILED", f"merging snapshot {plan.snapshot} failed: {why}. Nothing was written; the VM "
                                 f"is {lv.domain_state(dom)} on its overlays and the snapshot is kept as it was",
                                 snapshot=plan.snapshot, vm_state=lv.domain_state(dom), disk_sources=sources, phase="commit",
                                 written=[])
        try:
            snap = dom.snapshotLookupByName(plan.snapshot, 0)
            xml = snap.getXMLDesc(libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE)
            desc = ET.fromstring(xml).findtext("description")
            dom.snapshotCreateXML(with_description(xml, mark_merge_failed(desc)), libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)
        except libvirt.libvirtError as exc:
            self.warnings.append(f"could not mark snapshot {plan.snapshot} as partly merged: {exc.get_error_message()}")
        return VmBackupError("COMMIT_FAILED", f"merging snapshot {plan.snapshot} failed: {why}. The merge was abandoned; the VM "
                             f"is {lv.domain_state(dom)} on its overlays, the snapshot is kept (it can no longer be reverted to) "
                             "and can be deleted again once the cause (such as a full file system under a base image) is fixed",
                             snapshot=plan.snapshot, vm_state=lv.domain_state(dom), disk_sources=sources, phase="commit",
                             written=written)

    def _do_revert(self, conn, dom, plan: Plan) -> None:
        if lv.is_active(dom):
            try:
                dom.destroy()  # what was written since the snapshot is being discarded anyway
            except libvirt.libvirtError as exc:
                raise VmBackupError("SNAPSHOT_FAILED", f"cannot stop the VM to revert it: {exc.get_error_message()}") from None
        for later in plan.drop:
            dom.snapshotLookupByName(later, 0).delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
        for disk in plan.disks:
            base_fmt = self.qemu_img.info_chain(disk["base"], None, force_share=True)[0].get("format") or "qcow2"
            tmp = disk["overlay"] + ".vmbackup-tmp"
            if os.path.lexists(tmp):
                os.unlink(tmp)
            rc, out, err = self.qemu_img.run_raw(["create", "-q", "-f", "qcow2", "-b", disk["base"], "-F", base_fmt, tmp])
            if rc != 0:
                raise VmBackupError("SNAPSHOT_FAILED", f"qemu-img could not create a fresh overlay for disk {disk['target']}: "
                                    f"{(err or out).strip()}", phase="revert")
            self._carry_bitmaps(disk, tmp)
            os.replace(tmp, disk["overlay"])
        xml = repoint_disks(lv.domain_xml(dom, inactive=True), {d["target"]: d["overlay"] for d in plan.disks})
        try:
            conn.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise VmBackupError("SNAPSHOT_FAILED", f"libvirt refused the reverted definition: {exc.get_error_message()}") from None
        self._remove_unused(conn, [p for p in plan.drop_files if os.path.lexists(p)])
        # Made current after the start: libvirt 9.0 refuses a redefinition of a shut-off VM that
        # has checkpoints ("cannot perform block operations while checkpoint exists"), as it
        # refuses snapshots of one; a running VM takes it.
        self._start(conn, dom, plan, xml)
        self._make_current(dom, plan.snapshot)

    def _image_bitmaps(self, path: str) -> dict[str, dict[str, t.Any]]:
        info = self.qemu_img.info_chain(path, None, force_share=True)[0]
        found = ((info.get("format-specific") or {}).get("data") or {}).get("bitmaps") or []
        return {b["name"]: b for b in found if "name" in b}

    def _carry_bitmaps(self, disk: dict[str, t.Any], fresh: str) -> None:
        """Keep the checkpoints older than the snapshot valid across a revert.

        After the revert the disk reads as the base image, so what changed since such a
        checkpoint is exactly the base's bitmap; libvirt reads a checkpoint's bitmap through every
        layer from the top, so the fresh overlay needs an empty bitmap of the same name (as
        libvirt gave the old overlay when the snapshot was made). A checkpoint made after the
        snapshot cannot be kept: its bitmap is not in the base, it stays broken, and the next
        export starts a new chain (and says why)."""
        try:
            old, base = self._image_bitmaps(disk["overlay"]), self._image_bitmaps(disk["base"])
        except VmBackupError as exc:
            self.warnings.append(f"disk {disk['target']}: checkpoint bitmaps not carried over ({exc.msg})")
            return
        kept = set()
        for name in sorted(n for n in set(old) & set(base) if not n.endswith(lv.SENTINEL_SUFFIX)):
            args = ["bitmap", "--add", "-f", "qcow2", "-g", str(old[name].get("granularity", 65536))]
            if "auto" not in (old[name].get("flags") or []):
                args.append("--disable")
            rc, out, err = self.qemu_img.run_raw(args + [fresh, name])
            if rc != 0:
                self.warnings.append(f"disk {disk['target']}: bitmap {name} not carried over: {(err or out).strip()}")
            else:
                kept.add(name)
                self.carried.append(f"{disk['target']}:{name}")
        # The base's size sentinels are as true for the reverted disk (it has the base's size and
        # content) as they were at the snapshot: copied with their bit, still disabled.
        base_fmt = self.qemu_img.info_chain(disk["base"], None, force_share=True)[0].get("format") or "qcow2"
        for name in sorted(n for n in base if n.endswith(lv.SENTINEL_SUFFIX) and n[:-len(lv.SENTINEL_SUFFIX)] in kept):
            rc, out, err = self.qemu_img.run_raw(["bitmap", "--add", "-g", str(base[name].get("granularity", 512)),
                                                  "--merge", name, "-b", disk["base"], "-F", base_fmt, "--disable",
                                                  "-f", "qcow2", fresh, name])
            if rc != 0:
                self.warnings.append(f"disk {disk['target']}: size sentinel {name} not carried over: {(err or out).strip()}")
            else:
                self.sentinels.append(f"{disk['target']}:{name[:-len(lv.SENTINEL_SUFFIX)]}")

    def _make_current(self, dom, name: str) -> None:
        try:
            xml = dom.snapshotLookupByName(name, 0).getXMLDesc(libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE)
            dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT)
        except libvirt.libvirtError as exc:
            self.warnings.append(f"could not make {name} the current snapshot: {exc.get_error_message()}")

    def _start(self, conn, dom, plan: Plan, xml: str) -> None:
        try:
            if plan.restore_memory:
                flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if plan.run_state == "paused" else libvirt.VIR_DOMAIN_SAVE_RUNNING
                conn.restoreFlags(plan.memory_file, xml, flags)
            elif plan.run_state == "running":
                dom.create()
            elif plan.run_state == "paused":
                dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        except libvirt.libvirtError as exc:
            raise VmBackupError("SNAPSHOT_FAILED", f"the disks were reverted to {plan.snapshot}, but the VM did not start "
                                f"({plan.run_state}{', from the memory file' if plan.restore_memory else ''}): "
                                f"{exc.get_error_message()}; it is shut off", phase="start", snapshot=plan.snapshot) from None

    def _remove_unused(self, conn, paths: list[str]) -> None:
        """Remove files no domain uses (as a disk or anywhere in a disk's backing chain)."""
        if not paths:
            return
        used = lv.paths_in_use(conn, backing_reader=lambda path, fmt: self._chain(path)[1:])
        for path in paths:
            try:
                repo_mod.check_trusted_path(os.path.dirname(path), "the directory of a file to remove")
            except VmBackupError as exc:
                self.warnings.append(f"kept {path}: {exc.msg}")
                continue
            reason = used.reason(path, os.lstat(path))
            if reason is not None:
                self.warnings.append(f"kept {path}: it is {reason}")
                continue
            os.unlink(path)
            self.removed.append(path)

    # ------------------------------------------------------------------ report
    def _predict(self, before: list[dict[str, t.Any]], plan: Plan) -> list[dict[str, t.Any]]:
        if plan.action == "create":
            return before + [{"name": plan.snapshot}]
        if plan.action == "delete":
            return [s for s in before if s["name"] != plan.snapshot]
        if plan.action == "revert":
            return [s for s in before if s["name"] not in plan.drop]
        return before

    def _result(self, plan: Plan, vm: dict[str, t.Any], before, after, quiesce) -> dict[str, t.Any]:
        names_before, names_after = [s["name"] for s in before], [s["name"] for s in after]
        entry = next((s for s in after if s["name"] == plan.snapshot), None)
        verb = {"create": "created", "delete": "merged and deleted", "revert": "reverted to", "none": "unchanged:"}[plan.action]
        if self.check_mode and plan.changed:
            verb = "would be " + verb
        disks = entry["disks"] if entry is not None and "disks" in entry else plan.disks
        if not self.check_mode:
            removed = list(self.removed)
        elif plan.action == "delete":
            removed = [d["overlay"] for d in plan.disks] + ([plan.memory_file] if plan.memory_file else [])
        else:
            removed = list(plan.drop_files)
        result = {
            "changed": plan.changed,
            "msg": f"snapshot {plan.snapshot} {verb}" if plan.changed else plan.reason,
            "reason": plan.reason,
            "snapshot": plan.snapshot,
            "state": self.p.state,
            "vm": vm,
            "disks": [{k: d.get(k) for k in ("target", "overlay", "base")} for d in disks],
            "memory_file": plan.memory_file,
            "dropped_snapshots": plan.drop if plan.action == "revert" else [],
            "removed_files": removed,
            "snapshots": names_after,
            "bitmaps_kept": list(self.carried),
            "sentinels_kept": list(self.sentinels),
            "quiesce": quiesce,
            "consistency": quiesce.get("consistency") if quiesce else None,
            "diff": {"before": {"snapshots": names_before}, "after": {"snapshots": names_after}},
        }
        return result
