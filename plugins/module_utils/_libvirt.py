# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""libvirt access: connection, domain lookup, disk inventory, backup jobs and checkpoints.

This module is private to the vmbackup.libvirt collection; it is not a public API.
Only the libvirt API is used (never virsh), and a VM's name is only ever passed to libvirt.
The QEMU monitor is reached through libvirt (libvirt_qemu) for what libvirt does not offer:
reading a disk's dirty bitmaps and keeping the size sentinels (see below).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils._deps import libvirt
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

try:  # ships with libvirt-python; only the size sentinels (QEMU monitor) need it
    import libvirt_qemu
except ImportError:
    libvirt_qemu = None

# What the binding raises; a stand-in when it is missing, so that except clauses still work.
LibvirtError = libvirt.libvirtError if libvirt is not None else type("LibvirtError", (Exception,), {})

# libvirt constants by value, so this module imports without the binding (unit tests, docs).
DOMAIN_RUNNING_STATES = {1, 2, 3, 7}  # running, blocked, paused, pmsuspended
STATE_NAMES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff", 6: "crashed", 7: "pmsuspended"}
JOB_NONE, JOB_COMPLETED, JOB_FAILED, JOB_CANCELLED = 0, 3, 4, 5
JOB_OPERATION_BACKUP = 9


@dataclasses.dataclass
class Disk:
    """One <disk> of a domain, as this collection sees it."""

    target: str
    device: str  # disk | cdrom | floppy | lun
    source_type: str  # file | block | network | volume | ...
    source: str | None
    driver_type: str | None  # qcow2 | raw | ...
    readonly: bool
    alias: str | None

    @property
    def checkpointable(self) -> bool:
        # Dirty bitmaps live inside qcow2 images; raw disks cannot carry a checkpoint.
        return self.driver_type == "qcow2"

    def skip_reason(self) -> str | None:
        """Why this disk is never backed up, or None when it is a candidate."""
        if self.device in ("cdrom", "floppy"):
            return f"{self.device} device"
        if self.readonly:
            return "read-only disk"
        if self.source is None:
            return "no source (empty drive)"
        if self.source_type not in ("file", "block"):
            return f"source type {self.source_type!r} is not supported yet"
        return None


def connect(uri: str):
    """Open a libvirt connection or raise LIBVIRT_UNAVAILABLE."""
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise VmBackupError("LIBVIRT_UNAVAILABLE", f"cannot connect to libvirt at {uri}: {exc.get_error_message()}", uri=uri) from None
    if conn is None:  # pragma: no cover - old bindings returned None
        raise VmBackupError("LIBVIRT_UNAVAILABLE", f"cannot connect to libvirt at {uri}", uri=uri)
    return conn


@contextlib.contextmanager
def session(uri: str) -> t.Iterator[t.Any]:
    """A connection for one module run; a libvirt error no caller expected becomes LIBVIRT_UNAVAILABLE."""
    conn = connect(uri)
    try:
        yield conn
    except libvirt.libvirtError as exc:
        raise VmBackupError("LIBVIRT_UNAVAILABLE", f"libvirt failed: {exc.get_error_message()}") from None
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass


def lookup_domain(conn, name: str | None = None, vm_uuid: str | None = None):
    """Find a domain by exact name or UUID. The name is passed to libvirt only, never to a path."""
    try:
        if vm_uuid is not None:
            return conn.lookupByUUIDString(_manifest.normalize_uuid(vm_uuid))
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            what = f"UUID {vm_uuid}" if vm_uuid is not None else f"name {name!r}"
            raise VmBackupError("VM_NOT_FOUND", f"no VM with {what} on {conn.getURI()}") from None
        raise VmBackupError("LIBVIRT_UNAVAILABLE", f"libvirt failed to look up the VM: {exc.get_error_message()}") from None


def domain_state(dom) -> str:
    state, _reason = dom.state()
    return STATE_NAMES.get(state, str(state))


def is_active(dom) -> bool:
    return bool(dom.isActive())


def active_or_false(dom) -> bool:
    """is_active, False when libvirt cannot answer (the domain was undefined meanwhile)."""
    return _alive(dom)


def domain_xml(dom, inactive: bool) -> str:
    flags = libvirt.VIR_DOMAIN_XML_SECURE
    if inactive:
        flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
    return dom.XMLDesc(flags)


def parse_disks(xml: str) -> list[Disk]:
    root = ET.fromstring(xml)
    disks = []
    for el in root.findall("./devices/disk"):
        target_el = el.find("target")
        if target_el is None or not target_el.get("dev"):
            continue
        source_el = el.find("source")
        source = None
        if source_el is not None:
            source = source_el.get("file") or source_el.get("dev") or source_el.get("name") or source_el.get("volume")
        driver_el = el.find("driver")
        alias_el = el.find("alias")
        disks.append(
            Disk(
                target=target_el.get("dev"),
                device=el.get("device", "disk"),
                source_type=el.get("type", "file"),
                source=source,
                driver_type=driver_el.get("type") if driver_el is not None else None,
                readonly=el.find("readonly") is not None,
                alias=alias_el.get("name") if alias_el is not None else None,
            )
        )
    return disks


def nvram_path(xml: str) -> str | None:
    el = ET.fromstring(xml).find("./os/nvram")
    if el is not None and el.text and el.text.strip():
        return el.text.strip()
    return None


def has_tpm(xml: str) -> bool:
    return ET.fromstring(xml).find("./devices/tpm") is not None


# -- checkpoints ------------------------------------------------------------------------------


def checkpoint_names(dom) -> list[str]:
    return [cp.getName() for cp in dom.listAllCheckpoints(0)]


def lookup_checkpoint(dom, name: str):
    try:
        return dom.checkpointLookupByName(name, 0)
    except libvirt.libvirtError:
        return None


def checkpoint_dirty_bytes(dom, name: str) -> dict[str, int] | None:
    """Bytes changed per disk since checkpoint ``name`` (libvirt's size report), None if unknown.

    A disk whose bitmap is missing or broken has no entry: libvirt then reports no size.
    """
    report = checkpoint_bitmap_report(dom, name)
    if report is None:
        return None
    return {target: size for target, size in report.items() if size is not None}


def checkpoint_bitmap_report(dom, name: str) -> dict[str, int | None] | None:
    """Per disk the checkpoint has a bitmap for: the bytes dirty since it, or None when the
    bitmap is missing or broken (libvirt computes sizes from QEMU's live bitmaps and leaves the
    attribute out when QEMU has no usable bitmap: QEMU died before storing it, the image was
    replaced, or QEMU loaded it marked in-use, i.e. inconsistent). None when unknown."""
    cp = lookup_checkpoint(dom, name)
    if cp is None:
        return None
    try:
        xml = cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE | libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
    except libvirt.libvirtError:
        return None
    report: dict[str, int | None] = {}
    for el in ET.fromstring(xml).findall("./disks/disk"):
        if el.get("checkpoint") == "bitmap":
            report[el.get("name")] = int(el.get("size")) if el.get("size") is not None else None
    return report


def checkpoint_bitmap_disks(dom, name: str) -> set[str] | None:
    cp = lookup_checkpoint(dom, name)
    if cp is None:
        return None
    xml = cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
    return {el.get("name") for el in ET.fromstring(xml).findall("./disks/disk") if el.get("checkpoint") == "bitmap"}


def checkpoint_xml_name(xml: str) -> str | None:
    """The <name> of a saved <domaincheckpoint> XML, or None when it cannot be parsed."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    return root.findtext("name") if root.tag == "domaincheckpoint" else None


def strip_missing_parent(xml: str, existing: t.Iterable[str]) -> tuple[str, str | None]:
    """Checkpoint XML without a <parent> that libvirt no longer knows; returns (xml, dropped name).

    A set's saved XML names the checkpoint of the set before it, which is retired once the
    set is committed; libvirt refuses to redefine a checkpoint whose parent does not exist.
    The parent link is only libvirt's bookkeeping: each bitmap is independent of it.
    """
    root = ET.fromstring(xml)
    parent = root.find("parent")
    if parent is None:
        return xml, None
    name = parent.findtext("name")
    if name and name in set(existing):
        return xml, None
    root.remove(parent)
    return ET.tostring(root, encoding="unicode"), name


def redefine_checkpoint(dom, xml: str) -> str | None:
    """Give libvirt back a checkpoint it lost (its bitmap must still be in the image).

    Returns None on success, else libvirt's reason.
    """
    xml, _dropped = strip_missing_parent(xml, checkpoint_names(dom))
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
    try:
        dom.checkpointCreateXML(xml, flags)
    except libvirt.libvirtError as exc:
        return exc.get_error_message()
    return None


def delete_checkpoint(dom, name: str) -> str | None:
    """Delete one of our checkpoints; return an error text instead of raising.

    On a running VM libvirt deletes the bitmaps with the metadata. When a bitmap is gone
    (QEMU died before storing it, or the disk image was replaced) libvirt refuses that; then the
    checkpoint's bitmaps that do exist are removed through QEMU and the metadata alone is deleted.
    """
    cp = lookup_checkpoint(dom, name)
    if cp is None:
        return None
    active = is_active(dom)
    flags = 0 if active else libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
    try:
        cp.delete(flags)
        return None
    except libvirt.libvirtError as exc:
        if not active:
            return exc.get_error_message()
        first = exc.get_error_message()
    try:
        nodes = block_nodes(dom)
    except VmBackupError as exc:
        return f"{first}; {exc.msg}"
    targets = checkpoint_bitmap_disks(dom, name) or set()
    if not any(name not in nodes.get(tg, BlockNode("", "", 0, {})).bitmaps for tg in targets):
        return first  # every bitmap is there: the failure is not a missing bitmap
    for target in targets:
        node = nodes.get(target)
        if node is not None and name in node.bitmaps:
            error = remove_bitmap_live(dom, node.node, name)
            if error:
                return error
    try:
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    except libvirt.libvirtError as exc:
        return exc.get_error_message()
    return None


# -- QEMU block nodes and size sentinels ------------------------------------------------------
#
# Nothing in libvirt or QEMU records that a disk was resized: libvirt's checkpoint XML has no
# disk size, and QEMU truncates every dirty bitmap to the new size on a resize, leaving a re-grown
# area clean. A disk shrunk and grown back to its old size therefore looks unchanged, while the
# guest reads zeros in the re-grown area and an incremental would not carry them.
# So each checkpoint gets a sentinel: a persistent, *disabled* bitmap (guest writes never touch
# it) with exactly one bit set, the one of the disk's last sector. The only thing that clears a bit
# of a disabled bitmap is a shrink below that sector (QEMU's hbitmap_truncate), and re-growing
# never sets it again; so "sentinel present, consistent and not empty" proves that the disk was
# never smaller than its size at the checkpoint, on every path (live block_resize, or qemu-img
# resize on the shut-off image, which loads and truncates persistent bitmaps the same way).
# QEMU never clears a partial granularity group on shrink, so the sentinel's granularity bounds
# the smallest shrink it sees: see sentinel_granularity().

SENTINEL_SUFFIX = ".size"
SENTINEL_MAX_BITS = 1 << 26  # 8 MiB of bitmap memory in QEMU at most


def sentinel_name(checkpoint: str) -> str:
    return checkpoint + SENTINEL_SUFFIX


def sentinel_granularity(size: int) -> int:
    """The sentinel's granularity for a disk of ``size`` bytes: 512 (any shrink is seen) up to
    32 GiB, then the smallest power of two that keeps the bitmap within SENTINEL_MAX_BITS."""
    granularity = 512
    while size > granularity * SENTINEL_MAX_BITS and granularity < (1 << 31):
        granularity *= 2
    return granularity


@dataclasses.dataclass
class BlockNode:
    """The format node QEMU runs for a disk, with its dirty bitmaps (name -> QMP info)."""

    target: str
    node: str
    size: int
    bitmaps: dict[str, dict[str, t.Any]]


def qmp(dom, command: str, **arguments: t.Any) -> dict[str, t.Any]:
    """One QMP command through libvirt; VmBackupError BACKUP_FAILED when QEMU refuses it."""
    if libvirt_qemu is None:
        raise VmBackupError("MISSING_DEPENDENCY", "the libvirt_qemu binding (part of libvirt-python) is missing")
    cmd = {"execute": command, "arguments": arguments} if arguments else {"execute": command}
    try:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(cmd), 0))
    except libvirt.libvirtError as exc:
        raise VmBackupError("BACKUP_FAILED", f"QEMU monitor command {command} failed: {exc.get_error_message()}") from None
    if "error" in reply:
        raise VmBackupError("BACKUP_FAILED", f"QEMU refused {command}: {reply['error'].get('desc')}")
    return reply.get("return")


def _hmp(dom, command: str) -> str:
    try:
        return libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    except libvirt.libvirtError as exc:
        raise VmBackupError("BACKUP_FAILED", f"QEMU monitor command failed: {exc.get_error_message()}") from None


def block_nodes(dom) -> dict[str, BlockNode]:
    """Disk target -> the top format node QEMU runs for it (running VM only).

    libvirt names node ``libvirt-<index>-format`` after the ``index`` of the disk's live
    <source>; the match is checked against the file QEMU has open.
    """
    by_node, by_file = {}, {}
    for dev in qmp(dom, "query-block") or []:
        inserted = dev.get("inserted") or {}
        if inserted.get("node-name"):
            by_node[inserted["node-name"]] = inserted
        if inserted.get("file"):
            by_file.setdefault(os.path.realpath(inserted["file"]), []).append(inserted)
    nodes = {}
    root = ET.fromstring(domain_xml(dom, inactive=False))
    for el in root.findall("./devices/disk"):
        target_el, source_el = el.find("target"), el.find("source")
        if target_el is None or source_el is None:
            continue
        source = source_el.get("file") or source_el.get("dev")
        inserted = by_node.get(f"libvirt-{source_el.get('index')}-format") if source_el.get("index") is not None else None
        if inserted is None:  # no node index in the XML (or a filter on top): the one device with this file open
            found = by_file.get(os.path.realpath(source), []) if source else []
            inserted = found[0] if len(found) == 1 else None
        if inserted is None or (source and inserted.get("file") and os.path.realpath(inserted["file"]) != os.path.realpath(source)):
            continue
        # A running backup job adds anonymous bitmaps (no name): they are no one's checkpoint.
        bitmaps = {b["name"]: b for b in inserted.get("dirty-bitmaps") or [] if isinstance(b, dict) and b.get("name")}
        nodes[target_el.get("dev")] = BlockNode(target_el.get("dev"), inserted["node-name"],
                                                int((inserted.get("image") or {}).get("virtual-size", 0)), bitmaps)
    return nodes


def sentinel_state(node: BlockNode, checkpoint: str) -> str | None:
    """None when the sentinel of ``checkpoint`` proves the disk was not shrunk since; else why not."""
    info = node.bitmaps.get(sentinel_name(checkpoint))
    if info is None:
        return "has no size sentinel (the image was replaced, or the set was taken by an older version)"
    if info.get("inconsistent"):
        return "has a broken size sentinel (QEMU stopped without storing it)"
    if info.get("recording") or int(info.get("count", 0)) == 0:
        return "was shrunk (and maybe grown back) since its checkpoint: its size sentinel was cleared"
    return None


def arm_sentinel(dom, node: BlockNode, checkpoint: str) -> None:
    """Create ``checkpoint``'s size sentinel on ``node``: a persistent disabled bitmap with
    only the last sector's bit set. QMP cannot set a bit directly, so a scratch null-co node
    of the same size gets a bitmap, a write to its last sector marks it, and the disk's new
    bitmap is merged from it (QEMU merges bitmaps of equal size across nodes)."""
    granularity = sentinel_granularity(node.size)
    name = sentinel_name(checkpoint)
    scratch = "vmbackup-" + os.urandom(6).hex()
    qmp(dom, "blockdev-add", driver="null-co", size=node.size, **{"node-name": scratch})
    try:
        qmp(dom, "block-dirty-bitmap-add", node=scratch, name="mark", granularity=granularity)
        out = _hmp(dom, f'qemu-io {scratch} "write {node.size - 512} 512"')
        if "error" in out.lower() or "fail" in out.lower():
            raise VmBackupError("BACKUP_FAILED", f"cannot mark the size sentinel of {node.target}: {out.strip()}")
        qmp(dom, "block-dirty-bitmap-add", node=node.node, name=name, granularity=granularity, persistent=True, disabled=True)
        try:
            qmp(dom, "block-dirty-bitmap-merge", node=node.node, target=name, bitmaps=[{"node": scratch, "name": "mark"}])
        except VmBackupError:
            remove_bitmap_live(dom, node.node, name)
            raise
    finally:
        try:
            qmp(dom, "blockdev-del", **{"node-name": scratch})
        except VmBackupError:
            pass


def remove_bitmap_live(dom, node: str, name: str) -> str | None:
    try:
        qmp(dom, "block-dirty-bitmap-remove", node=node, name=name)
    except VmBackupError as exc:
        return exc.msg
    return None


# -- backup jobs ------------------------------------------------------------------------------


def checkpoint_xml(name: str, bitmap_targets: t.Iterable[str], all_targets: t.Iterable[str]) -> str:
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = "vmbackup.libvirt backup checkpoint"
    disks = ET.SubElement(root, "disks")
    bitmap = set(bitmap_targets)
    for target in all_targets:
        ET.SubElement(disks, "disk", name=target, checkpoint="bitmap" if target in bitmap else "no")
    return ET.tostring(root, encoding="unicode")


def backup_xml(targets: dict[str, str], skip: t.Iterable[str], incremental: str | None, full_targets: t.Iterable[str] = ()) -> str:
    """A push-mode <domainbackup>: ``targets`` maps disk target -> output file.

    ``full_targets`` are disks copied in full even in an incremental job (raw disks).
    """
    root = ET.Element("domainbackup", mode="push")
    if incremental:
        ET.SubElement(root, "incremental").text = incremental
    disks = ET.SubElement(root, "disks")
    full = set(full_targets)
    for target, path in targets.items():
        attrs = {"name": target, "backup": "yes", "type": "file"}
        if incremental and target in full:
            attrs["backupmode"] = "full"
        el = ET.SubElement(disks, "disk", **attrs)
        ET.SubElement(el, "target", file=path)
        ET.SubElement(el, "driver", type="qcow2")
    for target in skip:
        ET.SubElement(disks, "disk", name=target, backup="no")
    return ET.tostring(root, encoding="unicode")


def active_job(dom) -> dict[str, t.Any] | None:
    """Stats of the domain's running job, or None."""
    try:
        stats = dom.jobStats(0)
    except libvirt.libvirtError:
        return None
    if not stats or stats.get("type", JOB_NONE) == JOB_NONE:
        return None
    return stats


def backup_targets(dom) -> list[str] | None:
    """Every file the running backup job uses, or None when none runs: the target files of a
    push-mode job; the NBD socket and the scratch files of a pull-mode job."""
    try:
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        return None
    return job_paths(xml)


def job_paths(xml: str) -> list[str]:
    """The files a <domainbackup> (as backupGetXMLDesc describes it) writes or serves."""
    root = ET.fromstring(xml)
    paths = [el.get("file") for el in root.findall("./disks/disk/target") + root.findall("./disks/disk/scratch")]
    server = root.find("./server")
    if server is not None and server.get("transport") == "unix":
        paths.append(server.get("socket"))
    return [p for p in paths if p]


def pull_backup_xml(socket_path: str, scratch: dict[str, str], skip: t.Iterable[str], incremental: str | None,
                    full_targets: t.Iterable[str] = ()) -> str:
    """A pull-mode <domainbackup>: QEMU serves each disk's point-in-time view over NBD on the unix
    socket ``socket_path``; ``scratch`` maps disk target -> its scratch file (where QEMU keeps the
    old data of the blocks the guest overwrites while the job runs).

    ``full_targets`` are disks exported in full even in an incremental job (raw disks).
    """
    root = ET.Element("domainbackup", mode="pull")
    if incremental:
        ET.SubElement(root, "incremental").text = incremental
    ET.SubElement(root, "server", transport="unix", socket=socket_path)
    disks = ET.SubElement(root, "disks")
    full = set(full_targets)
    for target, path in scratch.items():
        attrs = {"name": target, "backup": "yes", "type": "file"}
        if incremental and target in full:
            attrs["backupmode"] = "full"
        el = ET.SubElement(disks, "disk", **attrs)
        ET.SubElement(el, "scratch", file=path)
    for target in skip:
        ET.SubElement(disks, "disk", name=target, backup="no")
    return ET.tostring(root, encoding="unicode")


@dataclasses.dataclass(frozen=True)
class PullExport:
    target: str
    socket: str
    export: str
    bitmap: str | None  # the dirty bitmap of an incremental disk (meta context qemu:dirty-bitmap:<bitmap>)


def parse_pull_exports(xml: str) -> dict[str, PullExport]:
    """The NBD export of each disk of a running pull-mode job, from its backupGetXMLDesc."""
    root = ET.fromstring(xml)
    server = root.find("./server")
    if root.get("mode") != "pull" or server is None or server.get("transport") != "unix" or not server.get("socket"):
        raise VmBackupError("BACKUP_FAILED", "the backup job is not a pull-mode job serving a unix socket", phase="backup-begin")
    out = {}
    for el in root.findall("./disks/disk"):
        if el.get("backup", "yes") != "yes" or not el.get("name"):
            continue
        out[el.get("name")] = PullExport(el.get("name"), server.get("socket"), el.get("exportname") or el.get("name"),
                                         el.get("exportbitmap") or None)
    return out


def pull_exports(dom) -> dict[str, PullExport]:
    try:
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError as exc:
        raise VmBackupError("BACKUP_FAILED", f"cannot read the pull-mode job: {exc.get_error_message()}", phase="backup-begin") from None
    return parse_pull_exports(xml)


def end_pull_job(dom, timeout: float = 30.0) -> None:
    """End a pull-mode job that served its data (abortJob is how a pull job ends)."""
    try:
        dom.abortJob()
    except libvirt.libvirtError as exc:
        if not _alive(dom):
            raise VmBackupError("VM_STOPPED_DURING_BACKUP", "the VM stopped while its backup job ran", phase="backup") from None
        if active_job(dom) is not None:
            raise VmBackupError("BACKUP_FAILED", f"cannot end the pull-mode job: {exc.get_error_message()}", phase="backup") from None
    deadline = time.monotonic() + timeout
    while active_job(dom) is not None:
        if time.monotonic() > deadline:
            raise VmBackupError("BACKUP_FAILED", "the pull-mode job did not end after abortJob", phase="backup")
        time.sleep(0.05)
    if not _alive(dom):
        raise VmBackupError("VM_STOPPED_DURING_BACKUP", "the VM stopped while its backup job ran", phase="backup")


def qemu_owner(xml: str, fallback: str = "/var/lib/libvirt/qemu") -> tuple[int, int]:
    """The uid and gid QEMU runs as for a domain: its live XML's DAC <seclabel> label (such as
    ``+64055:+64055``, or user:group names); else the owner of ``fallback`` (libvirt's own
    directory, owned by the user it runs QEMU as by default)."""
    root = ET.fromstring(xml)
    for sec in root.findall("./seclabel"):
        if sec.get("model") != "dac":
            continue
        label = (sec.findtext("label") or "").strip()
        if ":" in label:
            user, group = label.split(":", 1)
            try:
                return _id_of(user, pwd_lookup=True), _id_of(group, pwd_lookup=False)
            except (KeyError, ValueError):
                break
    st = os.stat(fallback)
    return st.st_uid, st.st_gid


def _id_of(name: str, pwd_lookup: bool) -> int:
    if name.startswith("+"):
        return int(name[1:])
    if name.isdigit():
        return int(name)
    import grp  # pylint: disable=import-outside-toplevel
    import pwd  # pylint: disable=import-outside-toplevel
    return pwd.getpwnam(name).pw_uid if pwd_lookup else grp.getgrnam(name).gr_gid


def begin_backup(dom, bxml: str, cxml: str | None) -> None:
    try:
        dom.backupBegin(bxml, cxml, 0)
    except libvirt.libvirtError as exc:
        code = "VM_STOPPED_DURING_BACKUP" if not is_active(dom) else "BACKUP_FAILED"
        raise VmBackupError(code, f"libvirt refused to start the backup job: {exc.get_error_message()}", phase="backup-begin") from None


def wait_backup(dom, poll: float = 0.2) -> dict[str, t.Any]:
    """Wait for the domain's backup job to end; return libvirt's completed-job statistics."""
    errors = 0
    while True:
        try:
            stats = dom.jobStats(0)
        except libvirt.libvirtError as exc:
            if not _alive(dom):
                raise VmBackupError("VM_STOPPED_DURING_BACKUP", "the VM stopped while its backup job ran", phase="backup") from None
            # libvirt answers "backup job data missing" for a moment while a job starts or ends.
            errors += 1
            if errors > 50:
                raise VmBackupError("BACKUP_FAILED", f"cannot read the backup job's state: {exc.get_error_message()}", phase="backup") from None
            time.sleep(poll)
            continue
        if not stats or stats.get("type", JOB_NONE) == JOB_NONE:
            break
        time.sleep(poll)
    try:
        done = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        done = {}
    if not _alive(dom):
        raise VmBackupError("VM_STOPPED_DURING_BACKUP", "the VM stopped while its backup job ran", phase="backup")
    if done.get("type") != JOB_COMPLETED:
        detail = done.get("errmsg") or "no completed-job statistics"
        raise VmBackupError("BACKUP_FAILED", f"the backup job did not complete: {detail}", phase="backup", job=_plain(done))
    return done


def abort_backup_into(dom, directory: str, timeout: float = 30.0) -> bool:
    """Abort the running backup job only if every file it writes is inside ``directory``
    (a run's own staging directory): another tool's job, or a job started after ours ended,
    is never touched. Returns whether a job was aborted."""
    targets = backup_targets(dom)
    for _attempt in range(20):
        # libvirt answers "backup job data missing" for a moment while a job starts or ends.
        if targets is not None or active_job(dom) is None:
            break
        time.sleep(0.1)
        targets = backup_targets(dom)
    prefix = directory.rstrip("/") + "/"
    if not targets or not all(os.path.normpath(path).startswith(prefix) for path in targets):
        return False
    abort_job(dom, timeout)
    return True


def abort_job(dom, timeout: float = 30.0) -> None:
    """Abort whatever job runs: only for callers that checked the job is theirs (abort_backup_into)."""
    try:
        dom.abortJob()
    except libvirt.libvirtError:
        pass
    deadline = time.monotonic() + timeout
    while active_job(dom) is not None and time.monotonic() < deadline:
        time.sleep(0.1)


def _alive(dom) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def _plain(stats: dict[str, t.Any]) -> dict[str, t.Any]:
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}


# -- restore ----------------------------------------------------------------------------------


def find_domain(conn, name: str):
    """The domain with exactly this name, or None."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise VmBackupError("LIBVIRT_UNAVAILABLE", f"libvirt failed to look up domain {name!r}: {exc.get_error_message()}") from None


def domain_exists_uuid(conn, vm_uuid: str) -> bool:
    try:
        conn.lookupByUUIDString(vm_uuid)
    except libvirt.libvirtError:
        return False
    return True


# (path, driver type) -> backing files below it, top first excluded; raises VmBackupError when unreadable.
BackingReader = t.Callable[[str, t.Optional[str]], t.List[str]]


@dataclasses.dataclass
class InUse:
    """Every file a defined domain uses, and why: what restore must never delete.

    A file counts by its path, by the path a symbolic link leads to, and by its inode (a hard
    link, or the same file under another name). ``unknown`` lists disks whose backing chain
    could not be read: any file might be one of their backing files.
    """

    reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    inodes: dict[tuple[int, int], str] = dataclasses.field(default_factory=dict)
    unknown: list[str] = dataclasses.field(default_factory=list)

    def add(self, path: str, reason: str) -> None:
        self.reasons.setdefault(path, reason)
        try:
            st = os.stat(path)  # the file the domain opens (through any link)
        except OSError:
            return
        self.inodes.setdefault((st.st_dev, st.st_ino), reason)
        real = os.path.realpath(path)
        if real != path:
            self.reasons.setdefault(real, reason)

    def reason(self, path: str, st: os.stat_result | None = None, ignore_unknown: bool = False) -> str | None:
        """Why ``path`` (whose lstat is ``st``, when known) must be kept, or None when no domain uses it.
        ``ignore_unknown``: only a domain that names the file (or its inode) keeps it, not an
        unreadable backing chain - for files a caller created itself in a private directory moments
        ago, which no other domain's image can have been made to back."""
        if path in self.reasons:
            return self.reasons[path]
        if st is not None and (st.st_dev, st.st_ino) in self.inodes:
            return self.inodes[(st.st_dev, st.st_ino)]
        if self.unknown and not ignore_unknown:
            return f"the backing chain of {self.unknown[0]} could not be read, so it may use this file"
        return None

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.reason(path) is not None


def _volume_path(conn, pool: str | None, volume: str | None) -> str | None:
    if conn is None or not pool or not volume:
        return None
    try:
        return conn.storagePoolLookupByName(pool).storageVolLookupByName(volume).path()
    except libvirt.libvirtError:
        return None


def _domain_files(xml: str, conn=None) -> t.Iterator[tuple[str, str, str | None, str]]:
    """(path, what, driver type, source type) of every local file or device a domain XML names
    (a storage pool volume by its path, when ``conn`` can look it up)."""
    root = ET.fromstring(xml)
    for el in root.findall("./devices/disk"):
        target_el = el.find("target")
        target = target_el.get("dev") if target_el is not None else "?"
        driver_el = el.find("driver")
        fmt = driver_el.get("type") if driver_el is not None else None
        source_el = el.find("source")
        source = None
        kind = el.get("type", "file")
        if source_el is not None:
            source = source_el.get("file") or source_el.get("dev")
            if kind == "volume":
                source, kind = _volume_path(conn, source_el.get("pool"), source_el.get("volume")), "file"
        if source:
            yield source, f"disk {target}", fmt, kind
        # libvirt puts the backing chain it knows into the live XML
        for backing in el.iter("backingStore"):
            bsource = backing.find("source")
            path = (bsource.get("file") or bsource.get("dev")) if bsource is not None else None
            if path:
                yield path, f"a backing file of disk {target}", None, "backing"
    for tag in ("loader", "nvram", "kernel", "initrd", "dtb"):
        text = root.findtext(f"./os/{tag}")
        if text and text.strip().startswith("/"):
            yield text.strip(), tag, None, "os"


def paths_in_use(conn, backing_reader: BackingReader | None = None, exclude_uuids: t.Iterable[str] = ()) -> InUse:
    """Every file a defined domain (running or not, other than ``exclude_uuids``) uses: its disks,
    their whole backing chains (read with ``backing_reader``, as ``qemu-img info --backing-chain
    -U`` does), NVRAM, loader and kernel. A running domain counts with its live and its
    persistent definition (a disk attached live only is in use too)."""
    used = InUse()
    skip = {str(u).lower() for u in exclude_uuids}
    for dom in conn.listAllDomains(0):
        try:
            if dom.UUIDString().lower() in skip:
                continue
            name = dom.name()
            active = dom.isActive()
        except libvirt.libvirtError:
            continue  # undefined meanwhile
        xmls = []
        for flags in (libvirt.VIR_DOMAIN_XML_INACTIVE, 0) if active else (libvirt.VIR_DOMAIN_XML_INACTIVE,):
            try:
                xmls.append(dom.XMLDesc(flags))
            except libvirt.libvirtError:
                continue  # a transient domain has no persistent definition; gone meanwhile
        seen = set()
        for xml in xmls:
            for path, what, fmt, kind in _domain_files(xml, conn):
                if (path, what) in seen:
                    continue
                seen.add((path, what))
                used.add(path, f"{what} of domain {name!r}")
                # A raw image has no backing file; a qcow2 chain is read from the image headers.
                if kind not in ("file", "block") or backing_reader is None or fmt == "raw" or not os.path.exists(path):
                    continue
                try:
                    chain = backing_reader(path, fmt)
                except VmBackupError as exc:
                    if os.path.exists(path):  # not just removed meanwhile
                        used.unknown.append(f"{what} of domain {name!r} ({path}: {exc.msg[:200]})")
                    continue
                for backing in chain:
                    used.add(backing, f"a backing file of {what} of domain {name!r}")
    return used


def define(conn, xml: str):
    try:
        return conn.defineXML(xml)
    except libvirt.libvirtError as exc:
        raise VmBackupError("RESTORE_FAILED", f"libvirt refused the restored domain definition: {exc.get_error_message()}",
                            phase="define") from None


def undefine(dom) -> None:
    """Undefine a domain this run defined; its files are removed by the caller (NVRAM included)."""
    flags = libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    if dom.isActive():
        dom.destroy()
    dom.undefineFlags(flags)


def checkpoint_xmls(dom) -> list[str]:
    """Every checkpoint's full XML, parents first, so they can be redefined in that order."""
    cps = dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
    return [cp.getXMLDesc(0) for cp in cps]


def drop_checkpoint_metadata(dom) -> None:
    """Forget every checkpoint of a shut-off domain (their bitmaps were in the disks it no longer uses)."""
    for cp in reversed(dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)):
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)


def redefine_checkpoints(dom, xmls: t.Iterable[str]) -> None:
    for xml in xmls:
        dom.checkpointCreateXML(xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)


def start(dom) -> None:
    try:
        dom.create()
    except libvirt.libvirtError as exc:
        raise VmBackupError("RESTORE_FAILED", f"the restored VM did not start: {exc.get_error_message()}", phase="start") from None


def pool_directory(conn, name: str) -> str:
    """The target directory of a directory-backed storage pool (dir, fs, netfs)."""
    try:
        pool = conn.storagePoolLookupByName(name)
        xml = pool.XMLDesc(0)
    except libvirt.libvirtError as exc:
        raise VmBackupError("INVALID_ARGUMENT", f"storage pool {name!r}: {exc.get_error_message()}") from None
    root = ET.fromstring(xml)
    if root.get("type") not in ("dir", "fs", "netfs"):
        raise VmBackupError("INVALID_ARGUMENT", f"storage pool {name!r} has type {root.get('type')!r}; "
                            "restore writes image files, so it needs a dir, fs or netfs pool")
    if not pool.isActive():
        raise VmBackupError("INVALID_ARGUMENT", f"storage pool {name!r} is not active")
    path = root.findtext("./target/path")
    if not path:
        raise VmBackupError("INVALID_ARGUMENT", f"storage pool {name!r} has no target path")
    return path


def refresh_pool(conn, name: str) -> str | None:
    try:
        conn.storagePoolLookupByName(name).refresh(0)
    except libvirt.libvirtError as exc:
        return exc.get_error_message()
    return None


# -- external snapshots: a disk's whole live chain ------------------------------------------------
#
# Findings on libvirt 9.0 / QEMU 7.2 (tests/integration/test_snapshot_backups.py):
# - an external disk-only snapshot gives the new overlay an empty, recording, persistent bitmap
#   for each checkpoint bitmap that records in the old top; the old top keeps its own (frozen:
#   nothing writes there any more), and a backup merges a checkpoint's bitmaps down the chain, so
#   the checkpoint stays exact. Disabled bitmaps (the size sentinels) are NOT carried.
# - an active block commit with pivot merges each recording bitmap of the overlay into the base's
#   bitmap of the same name (created when missing); the commit's own writes also mark the base's
#   recording bitmaps. The overlay's disabled bitmaps (sentinels) go with the overlay.
# - libvirt 9.0's own deletion of an external snapshot of a running VM (virDomainSnapshotDelete)
#   is the same active commit + pivot, with the same bitmap handling.
# - QEMU refuses block_resize while a commit job runs ("Device is in use").
# So the checkpoint survives both; only the collection's size sentinel does not. The snapshot
# module keeps the sentinels across its own create, merge and revert (it re-arms on the new top a
# sentinel that was intact right before). Export never restores one itself (it cannot know what
# happened since the snapshot), so a backup after a foreign snapshot or merge starts a new chain;
# disk_chains and sentinel_below let its reason say so.


def disk_chains(dom) -> dict[str, list[BlockNode]]:
    """Disk target -> every format node of its live backing chain, top first, each with its own
    dirty bitmaps (running VM only; a disk whose nodes libvirt does not name is left out)."""
    named = {n.get("node-name"): n for n in qmp(dom, "query-named-block-nodes", flat=True) or []}
    chains: dict[str, list[BlockNode]] = {}
    for el in ET.fromstring(domain_xml(dom, inactive=False)).findall("./devices/disk"):
        target_el = el.find("target")
        if target_el is None:
            continue
        chain, layer = [], el
        while layer is not None:
            source_el = layer.find("source")
            index = (source_el.get("index") if source_el is not None else None) or layer.get("index")
            node = named.get(f"libvirt-{index}-format") if index is not None else None
            if node is None:
                break
            bitmaps = {b["name"]: b for b in node.get("dirty-bitmaps") or [] if isinstance(b, dict) and b.get("name")}
            chain.append(BlockNode(target_el.get("dev"), node["node-name"], int((node.get("image") or {}).get("virtual-size", 0)),
                                   bitmaps))
            layer = layer.find("backingStore")
        if chain:
            chains[target_el.get("dev")] = chain
    return chains


def sentinel_below(chain: list[BlockNode], checkpoint: str) -> BlockNode | None:
    """The first image below the top of ``chain`` that holds ``checkpoint``'s size sentinel."""
    for node in chain[1:]:
        if sentinel_name(checkpoint) in node.bitmaps:
            return node
    return None


BLOCK_JOB_TYPES = {1: "pull", 2: "copy", 3: "commit", 4: "active-commit", 5: "backup"}


def block_jobs(dom, targets: t.Iterable[str]) -> dict[str, str]:
    """target -> the kind of block job running on that disk (a snapshot merge in progress, a copy),
    for the disks of ``targets`` that have one. libvirt refuses a backup job on such a disk
    ("disk 'vda' has a blockjob assigned"); a domain job query does not show block jobs."""
    found = {}
    for target in targets:
        try:
            info = dom.blockJobInfo(target, 0)
        except LibvirtError:
            continue
        if info and info.get("type"):
            found[target] = BLOCK_JOB_TYPES.get(int(info["type"]), str(info["type"]))
    return found
