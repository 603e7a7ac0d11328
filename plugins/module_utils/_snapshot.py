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
import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.vmbackup.libvirt.plugins.module_utils._deps import libvirt
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

PREFIX = "vmbackup-snap-"
# A bare snapshot name becomes part of file names (the overlays), so it is kept plain.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
OVERLAY_RE = re.compile(r"^(?P<base>.+?)(?:\.vmbackup-snap-[A-Za-z0-9][A-Za-z0-9_.-]*?\.qcow2)+$")
# A merge that failed may have written part of the overlay into its base: the snapshot's point
# is then gone, and a revert to it would return a mix. The snapshot's description says so.
MERGE_FAILED_MARK = "[vmbackup: merge failed; base image partly written; revert refused]"
QCOW2_MAGIC = b"QFI\xfb"


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
    for snap in dom.listAllSnapshots(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL):
        try:
            xml = snap.getXMLDesc(0)
        except libvirt.libvirtError:
            continue  # deleted meanwhile
        entry = parse_snapshot_xml(xml)
        entry["current"] = entry["name"] == current
        out.append(entry)
    return out
