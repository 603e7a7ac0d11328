# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The snapshot_info backend: per VM its snapshots (with overlay sizes), its checkpoints and each
disk's active backing chain. It only reads.

This module is private to the vmbackup.libvirt collection; it is not a public API.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import stat
import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _libvirt as lv
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils._deps import libvirt
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import Backend
from ansible_collections.vmbackup.libvirt.plugins.module_utils._snapshot import list_snapshots

_ERR_NO_DOMAIN = 42


@dataclasses.dataclass
class SnapshotInfoParams:
    uri: str = "qemu:///system"
    name: str | None = None
    uuid: str | None = None


def iso_from_epoch(seconds: int | str | None) -> str | None:
    try:
        return _manifest.iso(dt.datetime.fromtimestamp(int(seconds), dt.timezone.utc))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def parse_checkpoint(xml: str) -> dict[str, t.Any]:
    """A <domaincheckpoint> (NO_DOMAIN, with sizes when the VM runs) as the module returns it."""
    root = ET.fromstring(xml)
    name = root.findtext("name") or ""
    disks = []
    for el in root.findall("./disks/disk"):
        size = el.get("size")
        disks.append({"target": el.get("name"), "bitmap": el.get("bitmap") if el.get("checkpoint") == "bitmap" else None,
                      "dirty_bytes": int(size) if size is not None else None})
    return {
        "name": name,
        "ours": _manifest.parse_checkpoint_name(name) is not None,
        "created": iso_from_epoch(root.findtext("creationTime")),
        "parent": root.findtext("./parent/name"),
        "description": root.findtext("description"),
        "disks": disks,
    }


def chain_entry(info: dict[str, t.Any]) -> dict[str, t.Any]:
    """One image of ``qemu-img info --backing-chain`` as the module returns it."""
    name = info.get("filename")
    data = (info.get("format-specific") or {}).get("data") or {}
    return {
        "filename": name,
        "format": info.get("format"),
        "virtual_size": info.get("virtual-size"),
        "allocated_bytes": info.get("actual-size"),
        "file_bytes": file_bytes(name),
        "backing_filename": info.get("full-backing-filename") or info.get("backing-filename"),
        "bitmaps": [b.get("name") for b in data.get("bitmaps") or [] if isinstance(b, dict)],
    }


def file_bytes(path: t.Any) -> int | None:
    """The size of a regular file (not followed through a link), else None."""
    if not isinstance(path, str) or not path.startswith("/"):
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


class SnapshotInfo(Backend):
    """Reads every VM of ``uri`` (or the one named) and returns ``vms``."""

    def run(self) -> dict[str, t.Any]:
        if self.p.name is not None and (not self.p.name or "\x00" in self.p.name):
            raise VmBackupError("INVALID_NAME", "name must be a non-empty string without NUL characters")
        with lv.session(self.p.uri) as conn:
            if self.p.name is not None or self.p.uuid is not None:
                doms = [lv.lookup_domain(conn, name=self.p.name, vm_uuid=self.p.uuid)]
            else:
                doms = conn.listAllDomains(0)
            vms = []
            for dom in doms:
                try:
                    vms.append(self._vm(dom))
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == _ERR_NO_DOMAIN and len(doms) > 1:
                        continue  # undefined while it was read
                    raise
        vms.sort(key=lambda v: (v["name"], v["uuid"]))
        snaps = sum(len(v["snapshots"]) for v in vms)
        cps = sum(len(v["checkpoints"]) for v in vms)
        return {"changed": False, "uri": self.p.uri, "vms": vms,
                "msg": f"{len(vms)} VM(s): {snaps} snapshot(s), {cps} checkpoint(s)"}

    def _vm(self, dom) -> dict[str, t.Any]:
        active = lv.is_active(dom)
        disks = [d for d in lv.parse_disks(lv.domain_xml(dom, inactive=not active))
                 if d.source and d.source_type in ("file", "block")]
        chains = {d.target: self._chain(d) for d in disks}
        known = {img["filename"]: img for chain in chains.values() for img in chain["chain"]}
        snapshots = []
        for snap in list_snapshots(dom):
            for disk in snap.get("disks") or []:
                disk.update(self._overlay_sizes(disk.get("overlay"), known))
            snapshots.append(snap)
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN | (libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE if active else 0)
        checkpoints = []
        for cp in dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL):
            try:
                checkpoints.append(parse_checkpoint(cp.getXMLDesc(flags)))
            except libvirt.libvirtError:
                try:  # sizes are unknown when a bitmap is missing or broken: the rest still tells
                    checkpoints.append(parse_checkpoint(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)))
                except libvirt.libvirtError:
                    continue  # deleted meanwhile
        return {
            "name": dom.name(),
            "uuid": dom.UUIDString(),
            "state": lv.domain_state(dom),
            "snapshots": snapshots,
            "checkpoints": checkpoints,
            "disks": [dict({"target": d.target, "source": d.source, "format": d.driver_type}, **chains[d.target]) for d in disks],
        }

    def _chain(self, disk: lv.Disk) -> dict[str, t.Any]:
        """The disk's active backing chain, top first; an error text instead when qemu-img fails
        (a missing image must not hide the other disks and VMs). Read with -U: QEMU holds the
        images of a running VM, and a read never disturbs it."""
        try:
            infos = self.qemu_img.info_chain(disk.source, disk.driver_type, force_share=True)
        except VmBackupError as exc:
            return {"chain": [], "chain_error": exc.msg}
        return {"chain": [chain_entry(info) for info in infos], "chain_error": None}

    def _overlay_sizes(self, overlay: str | None, known: dict[str, dict[str, t.Any]]) -> dict[str, t.Any]:
        """Sizes of a snapshot's overlay image: from the chains when it is in one, else read."""
        empty = {"virtual_size": None, "allocated_bytes": None, "file_bytes": None, "in_active_chain": False}
        if not overlay:
            return empty
        if overlay in known:
            img = known[overlay]
            return {"virtual_size": img["virtual_size"], "allocated_bytes": img["allocated_bytes"],
                    "file_bytes": img["file_bytes"], "in_active_chain": True}
        if file_bytes(overlay) is None:
            return empty
        try:
            info = self.qemu_img.info_chain(overlay, "qcow2", force_share=True)[0]  # overlays are qcow2: never probed
        except VmBackupError:
            return dict(empty, file_bytes=file_bytes(overlay))
        entry = chain_entry(info)
        return {"virtual_size": entry["virtual_size"], "allocated_bytes": entry["allocated_bytes"],
                "file_bytes": entry["file_bytes"], "in_active_chain": False}
