# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The restore backend: bring one point of a VM back as new disk images and a domain.

This module is private to the vmbackup.libvirt collection; it is not a public API.

Observe and decide first (point, chain, target name, paths, the domain XML); nothing is written
before every refusal has had its chance. Then, under a shared lock on the source VM: the
checksums of every file the restore reads are verified while qemu-img writes the images (both
read the same files, so the second read comes from the page cache); nothing is renamed into
place, defined or started until every checksum matched. A journal beside the new images lets
the next restore into the same directory remove what a killed run left.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import threading
import time
import typing as t
import uuid as uuid_mod
import xml.etree.ElementTree as ET

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _libvirt as lv
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._catalog import Catalog, parse_as_of, resolve_vms
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._lock import VmLock, validate_timeout
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import Backend
from ansible_collections.vmbackup.libvirt.plugins.module_utils._progress import Phases, Progress, human_bytes
from ansible_collections.vmbackup.libvirt.plugins.module_utils._qemu_img import chain_spec
from ansible_collections.vmbackup.libvirt.plugins.module_utils._verify import FileJob, check_file, open_for_reading

MIB = 1024 * 1024
METADATA_NS = "https://vmbackup.libvirt/xmlns/restore/1"
DEFAULT_DISK_DIR = "/var/lib/libvirt/images"
NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"
SWTPM_DIR = "/var/lib/libvirt/swtpm"
# Where a restored copy's file-backed consoles log (relocate_log_files): libvirt's own log directory.
CHARDEV_LOG_DIR = "/var/log/libvirt/qemu"
LOCK_DIR = "/run/vmbackup"
JOURNAL_PREFIX = ".vmbackup-restore-"
FORMATS = ("qcow2", "raw")
OVERWRITE = ("never", "replace")
IDENTITIES = ("new", "original")
NAME_MAX = 200
SPACE_HEADROOM = 16 * MIB
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# What XML 1.0 cannot carry at all (not even escaped): such a value in the domain XML makes it unparsable.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")

ET.register_namespace("vmbackup", METADATA_NS)


@dataclasses.dataclass
class RestoreParams:
    repository: str
    name: str | None = None
    uuid: str | None = None
    set_id: str | None = None
    as_of: str | None = None
    restore_as: str | None = None
    overwrite: str = "never"
    disk_dir: str | None = None
    storage_pool: str | None = None
    disk_format: str = "qcow2"
    network_map: dict[str, str] | None = None
    start: bool = False
    keep_replaced_disks: bool = False
    workers: int | None = None
    uri: str = "qemu:///system"
    lock_timeout: float = 60.0
    allow_unsafe_permissions: bool = False
    identity: str = "new"
    original_paths: bool = False


@dataclasses.dataclass
class DiskPlan:
    target: str
    chain: list[tuple[str, dict[str, t.Any]]]  # (set id, disk entry), base first
    files: list[str]  # absolute paths, base first
    path: str  # the restored image
    virtual_size: int
    read_bytes: int

    def public(self, fmt: str) -> dict[str, t.Any]:
        return {
            "target": self.target,
            "path": self.path,
            "format": fmt,
            "virtual_size": self.virtual_size,
            "chain": [sid for sid, _d in self.chain],
            "bytes_read": self.read_bytes,
        }


@dataclasses.dataclass
class Plan:
    catalog: Catalog
    point: str
    chain: list[str]
    source: dict[str, str]
    target_name: str
    target_uuid: str
    replacing: t.Any  # the shut-off domain being replaced, or None
    disks: list[DiskPlan]
    side_jobs: list[FileJob]
    nvram: str | None  # restored NVRAM path
    tpm_files: list[str]  # set-relative paths of TPM state
    xml: str
    disk_dir: str
    dropped: list[str]
    replaced_files: list[str]
    identity: Identity | None = None
    before_xml: str | None = None  # the replaced domain's definition, for --diff

    @property
    def read_bytes(self) -> int:
        return sum(d.read_bytes for d in self.disks) + sum(j.size for j in self.side_jobs)


@dataclasses.dataclass(frozen=True)
class Existing:
    """What is defined on this host under the target name, as the identity decision needs it."""

    uuid: str
    active: bool
    marker: dict[str, str] | None  # our restore marker in its definition
    state: str = "running"


@dataclasses.dataclass(frozen=True)
class Identity:
    """Whose identity the restored domain gets: the pure outcome of observing the target host.

    ``kind``:
      - ``new``: a new VM - a new UUID, new MAC addresses, no disk that was not restored.
      - ``source``: the replaced domain IS the backed-up VM (same UUID): it gets its saved
        identity back - UUID, MAC addresses and its own disks that were not backed up.
      - ``target``: the replaced domain is another VM (a copy restored before, say): it keeps
        its own UUID and MAC addresses; no disk of the source that was not restored is attached.
      - ``original``: disaster restore - the backed-up VM's name, UUID and MAC addresses on a host
        where neither its name nor its UUID is defined; no disk that was not restored.
      - ``unchanged``: the domain was restored from this very point before.
    ``macs``: ``saved`` (the saved XML's), ``target`` (the replaced domain's, per interface) or
    ``new`` (libvirt draws them).
    """

    kind: str
    name: str
    uuid: str | None  # None: a new one is drawn
    macs: str
    replacing: bool
    reason: str

    @property
    def new_identity(self) -> bool:
        """Not the domain the XML was saved from: its not-restored disks must not be attached."""
        return self.kind != "source"


def decide_identity(
    *,
    source_uuid: str,
    source_name: str,
    target_name: str,
    requested: str,
    replace: bool,
    point: str,
    existing: Existing | None,
    uuid_holder: str | None,
) -> Identity:
    """The identity decision, from what was observed: the domain defined under ``target_name``
    (``existing``) and the name of the domain that has the source's UUID here (``uuid_holder``).

    Raises TARGET_VM_EXISTS / TARGET_VM_RUNNING. Pure: no libvirt, no files.
    """
    marker = existing.marker if existing is not None else None
    same_point = bool(marker and marker.get("vm_uuid") == source_uuid and marker.get("set_id") == point)
    if requested == "original":
        if existing is not None and same_point and existing.uuid == source_uuid:
            return Identity("unchanged", target_name, existing.uuid, "saved", False,
                            f"{target_name!r} was restored from set {point} with its original identity before")
        # The original identity only where nothing of it is in use: a copy must never share it.
        if existing is not None:
            raise VmBackupError("TARGET_VM_EXISTS", f"identity=original: a domain named {target_name!r} is defined on this "
                                f"host (UUID {existing.uuid}); the original identity is only restored where neither the name "
                                "nor the UUID is in use - restore under a new name (identity=new, restore_as)",
                                target=target_name, existing_uuid=existing.uuid)
        if uuid_holder is not None:
            raise VmBackupError("TARGET_VM_EXISTS", f"identity=original: the backed-up VM's UUID {source_uuid} is in use on "
                                f"this host by domain {uuid_holder!r}; restore under a new name (identity=new, restore_as)",
                                target=target_name, existing_name=uuid_holder, existing_uuid=source_uuid)
        return Identity("original", target_name, source_uuid, "saved", False,
                        "disaster restore: the backed-up VM's name, UUID and MAC addresses (neither is in use here)")
    if existing is None:
        return Identity("new", target_name, None, "new", False, "a new VM: new UUID and MAC addresses")
    if not replace:
        if same_point:
            return Identity("unchanged", target_name, existing.uuid, "saved", False,
                            f"{target_name!r} was restored from set {point} before")
        raise VmBackupError("TARGET_VM_EXISTS", f"a domain named {target_name!r} already exists; choose another "
                            "restore_as, or overwrite=replace to replace it", target=target_name)
    if existing.active:
        raise VmBackupError("TARGET_VM_RUNNING", f"domain {target_name!r} is {existing.state}; only a shut-off VM is replaced "
                            "(shut it down first)", target=target_name)
    if existing.uuid == source_uuid:
        return Identity("source", target_name, existing.uuid, "saved", True,
                        "replacing the backed-up VM itself: its UUID, MAC addresses and disks that were not backed up stay")
    return Identity("target", target_name, existing.uuid, "target", True,
                    f"replacing {target_name!r}, which is not the backed-up VM {source_name!r} ({source_uuid}): it keeps its "
                    "own UUID and MAC addresses, and no disk that was not restored is attached")


def validate_name(value: t.Any, what: str, hint: str = "") -> str:
    """A domain name the restore can define and put into XML and file names: INVALID_NAME otherwise."""
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or len(value) > NAME_MAX \
            or _CONTROL_CHARS.search(value):
        raise VmBackupError("INVALID_NAME", f"{what} {value!r} is not a usable domain name (1-{NAME_MAX} characters, no '/', "
                            f"no control characters, not '.' or '..'){hint}")
    return value


def interface_macs(xml: str) -> list[str | None]:
    """The MAC address of each <interface> of a domain XML, in order (None where it has none)."""
    out: list[str | None] = []
    for iface in ET.fromstring(xml).findall("./devices/interface"):
        mac = iface.find("mac")
        out.append(mac.get("address") if mac is not None else None)
    return out


def safe_file_name(name: str) -> str:
    """A VM name made safe for a file name: anything but letters, digits, '.', '_' and '-' becomes '_'."""
    safe = _SAFE_CHARS.sub("_", name).lstrip(".") or "vm"
    return safe[:80]


def validate_params(p: RestoreParams) -> str:
    path = repo_mod.validate_repository_path(p.repository)
    if (p.name is None) == (p.uuid is None):
        raise VmBackupError("INVALID_ARGUMENT", "give exactly one of name and uuid (of the VM in the repository)")
    if p.name is not None and (not p.name or "\x00" in p.name):
        raise VmBackupError("INVALID_NAME", "name must be a non-empty string without NUL characters")
    if p.uuid is not None:
        p.uuid = _manifest.normalize_uuid(p.uuid)
    if p.set_id is not None and p.as_of is not None:
        raise VmBackupError("INVALID_ARGUMENT", "give at most one of set_id and as_of")
    if p.set_id is not None and not _manifest.is_set_id(p.set_id):
        raise VmBackupError("INVALID_NAME", f"set_id {p.set_id!r} is not a set id (like 20261125T073512Z-001)")
    if p.as_of is not None:
        parse_as_of(p.as_of)
    if p.restore_as is not None:
        validate_name(p.restore_as, "restore_as")
    if p.overwrite not in OVERWRITE:
        raise VmBackupError("INVALID_ARGUMENT", f"overwrite {p.overwrite!r} is not one of {', '.join(OVERWRITE)}")
    if p.identity not in IDENTITIES:
        raise VmBackupError("INVALID_ARGUMENT", f"identity {p.identity!r} is not one of {', '.join(IDENTITIES)}")
    if p.identity == "original" and p.overwrite == "replace":
        # Replacing the backed-up VM itself already keeps its identity; replacing another VM keeps that VM's.
        raise VmBackupError("INVALID_ARGUMENT", "identity=original restores a VM whose name and UUID are not defined on "
                            "this host; it cannot be combined with overwrite=replace (which keeps the replaced VM's identity)")
    if p.original_paths and p.identity != "original":
        raise VmBackupError("INVALID_ARGUMENT", "original_paths needs identity=original (a copy never takes the original "
                            "VM's disk paths)")
    if p.original_paths and (p.disk_dir is not None or p.storage_pool is not None):
        raise VmBackupError("INVALID_ARGUMENT", "give at most one of original_paths, disk_dir and storage_pool")
    if p.disk_format not in FORMATS:
        raise VmBackupError("INVALID_ARGUMENT", f"disk_format {p.disk_format!r} is not one of {', '.join(FORMATS)}")
    if p.disk_dir is not None and p.storage_pool is not None:
        raise VmBackupError("INVALID_ARGUMENT", "give at most one of disk_dir and storage_pool")
    if p.disk_dir is not None:
        try:
            p.disk_dir = repo_mod.validate_repository_path(p.disk_dir)
        except VmBackupError as exc:
            raise VmBackupError("PATH_ESCAPE", exc.msg.replace("repository", "disk_dir")) from None
        if _CONTROL_CHARS.search(p.disk_dir):  # it goes into the domain XML, which cannot carry them
            raise VmBackupError("PATH_ESCAPE", f"disk_dir {p.disk_dir!r} contains control characters")
    for old, new in (p.network_map or {}).items():
        if not isinstance(old, str) or not isinstance(new, str) or not old or not new:
            raise VmBackupError("INVALID_ARGUMENT", "network_map maps network or bridge names to names (strings)")
        if _CONTROL_CHARS.search(old) or _CONTROL_CHARS.search(new) or "/" in new:
            raise VmBackupError("INVALID_ARGUMENT", f"network_map entry {old!r}: {new!r} contains a control character or '/'")
    if p.workers is not None and p.workers < 1:
        raise VmBackupError("INVALID_ARGUMENT", "workers must be 1 or more")
    validate_timeout(p.lock_timeout)
    return path


# ---------------------------------------------------------------------------------- the domain XML
def restored_xml(
    saved_xml: str,
    *,
    name: str,
    vm_uuid: str,
    disks: dict[str, tuple[str, str]],
    new_identity: bool,
    network_map: dict[str, str] | None,
    nvram: str | None,
    metadata: dict[str, str],
    existing_file: t.Callable[[str], bool] = os.path.exists,
    macs: t.Sequence[str | None] | None = None,
    live_xml: str | None = None,
) -> tuple[str, list[str], list[str]]:
    """The domain XML to define: the saved XML with a new name/UUID, disks pointing to the
    restored images, mapped networks, and, for a new identity, the MAC addresses in ``macs``
    (per interface, in order; an interface without one gets a new one from libvirt). Pure apart
    from ``existing_file``. Returns (xml, dropped disk targets, warnings).

    ``new_identity`` means the domain is not the one the XML was saved from: a writable disk
    that was not backed up is dropped, so the copy never shares a disk with the original VM.

    A backed-up disk that is not in the saved (persistent) XML was attached to the running VM
    only: its element is taken from ``live_xml`` (the running VM's XML of the same point), so
    the data that was backed up is defined too. One found in neither is reported as dropped.

    A ``network_map`` key that matches no network or bridge of the VM fails (INVALID_ARGUMENT):
    a typo must not leave the restored VM on the network it was meant to leave.
    """
    root = ET.fromstring(saved_xml)
    warnings: list[str] = []
    dropped: list[str] = []
    _set_text(root, "name", name)
    _set_text(root, "uuid", vm_uuid)
    for entry in root.findall("./sysinfo/system/entry[@name='uuid']"):
        entry.text = vm_uuid  # libvirt refuses an SMBIOS UUID that differs from <uuid>
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    placed = set()
    for disk in list(devices.findall("disk")):
        target_el = disk.find("target")
        target = target_el.get("dev") if target_el is not None else None
        if target in disks:
            _point_disk(disk, *disks[target])
            placed.add(target)
            continue
        device = disk.get("device", "disk")
        source = disk.find("source")
        source_file = source.get("file") if source is not None else None
        if device in ("cdrom", "floppy"):
            if source_file and not existing_file(source_file):
                disk.remove(source)
                warnings.append(f"{device} {target}: {source_file} does not exist here; the drive is left empty")
            continue
        if disk.find("readonly") is not None or not new_identity:
            continue
        devices.remove(disk)
        dropped.append(target or "?")
        warnings.append(f"disk {target} was not in the backup; it is left out of the restored VM "
                        "(it would have shared the original VM's disk)")
    if new_identity:
        # The same for a host directory shared read-write (virtiofs, 9p): a copy would write the original's files.
        for fs in list(devices.findall("filesystem")):
            if fs.find("readonly") is None:
                devices.remove(fs)
                source = fs.find("source")
                where = (source.get("dir") or source.get("file") or source.get("name")) if source is not None else None
                tag = fs.find("target").get("dir") if fs.find("target") is not None else "?"
                warnings.append(f"shared filesystem {tag} ({where}) is left out of the restored VM (it would have shared "
                                "the original VM's files read-write)")
    live_disks = _live_disks(live_xml) if live_xml else {}
    for target in [tg for tg in disks if tg not in placed]:
        disk = live_disks.get(target)
        if disk is None:
            dropped.append(target)
            warnings.append(f"disk {target} was backed up but is in neither the saved definition nor the running VM's "
                            "XML of that point; it is not restored")
            continue
        _point_disk(disk, *disks[target])
        devices.append(disk)
        placed.add(target)
        warnings.append(f"disk {target} was attached to the running VM only (not in its persistent definition); it is "
                        "restored as a persistent disk")
    interfaces = devices.findall("interface")
    _check_network_map(interfaces, network_map)
    for index, iface in enumerate(interfaces):
        if new_identity:
            for mac in iface.findall("mac"):
                iface.remove(mac)
            own = macs[index] if macs is not None and index < len(macs) else None
            if own:
                iface.insert(0, ET.Element("mac", address=own))
        source = iface.find("source")
        if source is not None and network_map:
            for attr in ("network", "bridge"):
                if source.get(attr) in network_map:
                    source.set(attr, network_map[source.get(attr)])
    os_el = root.find("os")
    nvram_el = os_el.find("nvram") if os_el is not None else None
    if nvram_el is not None:
        if nvram:
            nvram_el.text = nvram
        else:
            nvram_el.text = None  # libvirt makes a fresh one from the template
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    for old in meta.findall(f"{{{METADATA_NS}}}restore"):
        meta.remove(old)
    # A value XML cannot carry (a control character in a manifest's VM name) must not make the
    # whole definition unparsable: it is replaced, the marker is informative.
    ET.SubElement(meta, f"{{{METADATA_NS}}}restore", {k: _XML_INVALID.sub("\ufffd", str(v)) for k, v in sorted(metadata.items())})
    return ET.tostring(root, encoding="unicode"), dropped, warnings


def relocate_log_files(xml: str, stem: str, directory: str = CHARDEV_LOG_DIR) -> tuple[str, dict[str, str]]:
    """A copy's file-backed character devices (``<serial>``, ``<console>``, ``<channel>``,
    ``<parallel>`` of type file, and any ``<log file=...>``) moved off the original VM's files, to
    ``<directory>/<stem>-<device><n>.log``: virtlogd refuses a second domain on a file in use
    (the copy would not start beside the original), a stopped original's log would be written by
    the copy, and on another host the original's directory may not exist. One old path gets one
    new path (a console mirrors its serial port). Pure; returns (xml, {old path: new path})."""
    root = ET.fromstring(xml)
    devices = root.find("devices")
    moved: dict[str, str] = {}
    if devices is None:
        return xml, moved
    for kind in ("serial", "console", "channel", "parallel"):
        for index, dev in enumerate(devices.findall(kind)):
            places = [(el, "file") for el in dev.findall("log") if el.get("file")]
            source = dev.find("source")
            if dev.get("type") == "file" and source is not None and source.get("path"):
                places.append((source, "path"))
            for el, attr in places:
                old = el.get(attr)
                if old not in moved:
                    moved[old] = os.path.join(directory, f"{stem}-{kind}{index}{'-log' if attr == 'file' else ''}.log")
                el.set(attr, moved[old])
    return (ET.tostring(root, encoding="unicode") if moved else xml), moved


def _point_disk(disk: ET.Element, path: str, fmt: str) -> None:
    """Make a <disk> element use the restored image ``path`` of format ``fmt``."""
    disk.set("type", "file")
    for child in list(disk):
        if child.tag in ("source", "backingStore"):
            disk.remove(child)
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", name="qemu")
        disk.insert(0, driver)
    driver.set("type", fmt)
    index = list(disk).index(driver) + 1
    disk.insert(index, ET.Element("source", file=path))


def _live_disks(live_xml: str) -> dict[str, ET.Element]:
    """target -> <disk> of a running VM's XML, without what only a running VM has: libvirt's own
    aliases (a user alias, ua-*, stays), the guest address (libvirt assigns a free one) and the
    runtime backing chain."""
    out = {}
    for disk in ET.fromstring(live_xml).findall("./devices/disk"):
        target_el = disk.find("target")
        if target_el is None or not target_el.get("dev"):
            continue
        for child in list(disk):
            if child.tag == "address" or (child.tag == "alias" and not (child.get("name") or "").startswith("ua-")):
                disk.remove(child)
        out[target_el.get("dev")] = disk
    return out


def network_names(interfaces: t.Iterable[ET.Element]) -> list[str]:
    """'network NAME' / 'bridge NAME' for each interface source, in order, once each."""
    names: list[str] = []
    for iface in interfaces:
        source = iface.find("source")
        for attr in ("network", "bridge"):
            value = source.get(attr) if source is not None else None
            if value and f"{attr} {value}" not in names:
                names.append(f"{attr} {value}")
    return names


def _check_network_map(interfaces: list[ET.Element], network_map: dict[str, str] | None) -> None:
    if not network_map:
        return
    known = network_names(interfaces)
    values = {n.split(" ", 1)[1] for n in known}
    unknown = sorted(k for k in network_map if k not in values)
    if unknown:
        has = ", ".join(known) if known else "no network or bridge interface"
        raise VmBackupError("INVALID_ARGUMENT", f"network_map key{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(repr(k) for k in unknown)} match{'' if len(unknown) > 1 else 'es'} no network or "
                            f"bridge of the backed-up VM (it has: {has}); nothing was written",
                            unknown_keys=unknown, networks=known)


def redact_xml(xml: str) -> str:
    """The XML for the module result: graphics passwords masked (the defined domain keeps them)."""
    root = ET.fromstring(xml)
    for graphics in root.findall("./devices/graphics"):
        if graphics.get("passwd") is not None:
            graphics.set("passwd", "********")
    return ET.tostring(root, encoding="unicode")


def restore_marker(xml: str) -> dict[str, str] | None:
    """Our restore metadata in a domain's XML (which set it was restored from), or None."""
    el = ET.fromstring(xml).find(f"./metadata/{{{METADATA_NS}}}restore")
    return dict(el.attrib) if el is not None else None


def _set_text(root: ET.Element, tag: str, text: str) -> None:
    el = root.find(tag)
    if el is None:
        el = ET.Element(tag)
        root.insert(0, el)
    el.text = text


def _file_sources(xml: str) -> dict[str, str]:
    """target -> source file of a domain's file-backed writable disks."""
    return {d.target: d.source for d in lv.parse_disks(xml)
            if d.source and d.source_type == "file" and d.device == "disk" and not d.readonly}


# ---------------------------------------------------------------------------------- files, never through a link
# Root writes restored images only into a directory that nobody else can write (check_trusted_path),
# and inside it, and in the NVRAM and TPM directories (owned by libvirt-qemu or swtpm), it creates,
# renames and deletes through directory file descriptors reached without following a link: a name
# is created with O_EXCL|O_NOFOLLOW, renamed without replacing, unlinked relative to its directory.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_RENAME_NOREPLACE = 1
_libc: t.Any = None


def open_dir(path: str, create_mode: int | None = None, follow_root_links: bool = False) -> int:
    """A directory fd of ``path``, reached one component at a time from ``/`` without following a
    symbolic link (UNSAFE_TARGET when a link or a non-directory is in the way), whoever owns the
    directories (the NVRAM and TPM directories are libvirt's users'; names in them are created
    exclusively). With ``create_mode``, a missing last component is created with exactly that mode.
    ``follow_root_links`` follows a link only root controls (an administrator's
    ``/var/lib/libvirt -> /srv/libvirt``), for libvirt's own directories."""
    return repo_mod.open_dir(path, "directory", owners=False, create_mode=create_mode, follow_root_links=follow_root_links)


def create_private(dir_fd: int, name: str) -> os.stat_result:
    """A new empty file, 0600 from its first moment; fails if anything (a link too) has the name."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, repo_mod.FILE_MODE, dir_fd=dir_fd)
    try:
        os.fchmod(fd, repo_mod.FILE_MODE)
        return os.fstat(fd)
    finally:
        os.close(fd)


def copy_private(src: str, dir_fd: int, name: str) -> os.stat_result:
    """Copy ``src`` (not through a link) into a new private file ``name``; fsynced."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, repo_mod.FILE_MODE, dir_fd=dir_fd)
    try:
        os.fchmod(fd, repo_mod.FILE_MODE)
        with open(os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as fh:
            while True:
                chunk = fh.read(MIB)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        os.fsync(fd)
        return os.fstat(fd)
    finally:
        os.close(fd)


def _renameat2(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    global _libc  # pylint: disable=global-statement
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    func = getattr(_libc, "renameat2", None)
    if func is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if func(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), _RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def rename_noreplace(dir_fd: int, src: str, dst: str, shown: str) -> None:
    """Rename ``src`` to ``dst`` in one directory, never over an existing name (TARGET_PATH_EXISTS):
    renameat2(RENAME_NOREPLACE), or link + unlink where the file system lacks it."""
    try:
        _renameat2(dir_fd, src, dir_fd, dst)
        return
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise VmBackupError("TARGET_PATH_EXISTS", f"{shown} appeared while this restore ran (another restore or a "
                                "user made it); it is kept, and this restore is undone", existing_path=shown) from None
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    if stat.S_ISDIR(os.stat(src, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        raise VmBackupError("RESTORE_FAILED", f"cannot rename a directory into {shown} without replacing (no renameat2)")
    try:
        os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        raise VmBackupError("TARGET_PATH_EXISTS", f"{shown} appeared while this restore ran; it is kept, and this "
                            "restore is undone", existing_path=shown) from None
    os.unlink(src, dir_fd=dir_fd)


def remove_path(path: str, kind: str = "file", inode: t.Sequence[int] | None = None,
                in_use: lv.InUse | None = None, dry_run: bool = False) -> tuple[bool, str | None]:
    """Delete ``path`` through its directory's fd, never through a link: (removed, why it was kept).

    Kept: a path that passes through a link, a name that is not a ``kind`` (a link planted in its
    place), another inode than ``inode`` (not the file this restore created), a file a domain uses.
    A path that does not exist is (False, None). ``dry_run`` decides without deleting (check mode).
    """
    directory, name = os.path.split(path)
    try:
        dir_fd = open_dir(directory)
    except VmBackupError as exc:
        return False, exc.msg
    except FileNotFoundError:
        return False, None
    try:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False, None
        if not (stat.S_ISDIR if kind == "dir" else stat.S_ISREG)(st.st_mode):
            return False, f"it is not a {'directory' if kind == 'dir' else 'regular file'} (something else took its name)"
        if inode is not None and (st.st_dev, st.st_ino) != tuple(inode):
            return False, "it is not the file this restore created (another inode)"
        reason = in_use.reason(path, st) if in_use is not None else None
        if reason is not None:
            return False, f"it is in use: {reason}"
        if dry_run:
            return True, None
        if kind == "dir":
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
        os.fsync(dir_fd)
        return True, None
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------------- journal
JOURNAL_FORMAT = "vmbackup.libvirt/restore-journal"
JOURNAL_VERSION = 2
_TOKEN = re.compile(r"^[0-9a-f]{8,64}$")


def partial_name(final: str, token: str) -> str:
    return f".{final}.partial-{token}"


# A journal, or the temporary name it is written under (left when a run dies while writing it).
_JOURNAL_NAME = re.compile(r"^" + re.escape(JOURNAL_PREFIX) + r"(?P<token>[^/]+?)\.json(?P<tmp>\.tmp-(?P=token))?$")


def journal_token(path: str) -> str | None:
    """The token in a journal's file name (``.vmbackup-restore-<token>.json``), or None."""
    match = _JOURNAL_NAME.match(os.path.basename(path))
    return match.group("token") if match and _TOKEN.match(match.group("token")) else None


@dataclasses.dataclass(frozen=True)
class Victim:
    """A file a stale journal's restore created, and how to prove it is still that file."""

    path: str
    kind: str  # file | dir
    inode: tuple[int, int] | None  # (st_dev, st_ino) recorded at creation; None for a partial name


def journal_victims(data: t.Any, token: str, journal_dir: str, allowed_dirs: t.Iterable[str] = ()) -> list[Victim]:
    """What the next restore may remove for a stale journal (pure).

    Only names this journal's own run made: its hidden partial names (``.<final>.partial-<token>``
    with the journal's own token, in the journal's directory or an ``allowed_dirs`` one), and a
    final name only while the phase is ``writing`` and only as the inode recorded when the
    partial was created (the caller compares it). A journal in phase ``defined`` finished its
    work: only leftover partials go. A journal of format version 1 names no inodes: only its
    partial names go.
    """
    victims: list[Victim] = []
    if not isinstance(data, dict) or not _TOKEN.match(token or ""):
        return victims
    dirs = {journal_dir, *allowed_dirs}
    suffix = f".partial-{token}"
    if data.get("format") != JOURNAL_FORMAT:  # format 1: {"temps": [paths], "finals": [paths], ...}
        for temp in data.get("temps") or []:
            if isinstance(temp, str) and os.path.dirname(temp) in dirs:
                base = os.path.basename(temp)
                if base.startswith(".") and base.endswith(suffix) and len(base) > len(suffix) + 1:
                    victims.append(Victim(temp, "file", None))
        return victims
    if data.get("version") != JOURNAL_VERSION or data.get("token") != token:
        return victims
    phase = data.get("phase")
    for entry in data.get("files") or []:
        if not isinstance(entry, dict):
            continue
        directory, final, kind = entry.get("dir"), entry.get("final"), entry.get("kind", "file")
        if directory not in dirs or kind not in ("file", "dir") or not isinstance(final, str) or not final \
                or "/" in final or final in (".", ".."):
            continue
        victims.append(Victim(os.path.join(directory, partial_name(final, token)), kind, None))
        dev, ino = entry.get("dev"), entry.get("ino")
        if phase == "writing" and all(isinstance(v, int) and not isinstance(v, bool) for v in (dev, ino)):
            victims.append(Victim(os.path.join(directory, final), kind, (dev, ino)))
    return victims


class Journal:
    """This run's restore journal, written (atomically, through the directory's fd) before each
    step that leaves something behind if the run dies. Format: docs/repository-format.md."""

    def __init__(self, dir_fd: int, directory: str, token: str, target: str) -> None:
        self.dir_fd = dir_fd
        self.directory = directory
        self.token = token
        self.name = f"{JOURNAL_PREFIX}{token}.json"
        self.data: dict[str, t.Any] = {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "token": token,
                                       "pid": os.getpid(), "started": (_proc_stat(os.getpid()) or ("", None))[1],
                                       "host": socket.gethostname(), "target": target,
                                       "phase": "writing", "files": []}

    def add(self, directory: str, final: str, kind: str = "file") -> dict[str, t.Any]:
        entry = {"dir": directory, "final": final, "partial": partial_name(final, self.token), "kind": kind,
                 "dev": None, "ino": None}
        self.data["files"].append(entry)
        return entry

    def write(self) -> None:
        tmp = f"{self.name}.tmp-{self.token}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, repo_mod.FILE_MODE, dir_fd=self.dir_fd)
        try:
            data = _manifest.dumps(self.data)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)  # replacing our own journal only
        os.fsync(self.dir_fd)

    def remove(self) -> None:
        for name in (self.name, f"{self.name}.tmp-{self.token}"):
            try:
                os.unlink(name, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: t.Any, started: t.Any = None) -> bool:
    """Whether the process that wrote a journal still runs: a zombie (killed, not yet reaped) is
    dead, and so is a process under a reused pid (another start time than the journal's)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    info = _proc_stat(pid)
    if info is None:
        return True
    state, start = info
    if state in ("Z", "X"):
        return False
    return not (isinstance(started, int) and not isinstance(started, bool) and started != start)


def stale_journals(disk_dir: str, host: str | None = None,
                   ignored: list[str] | None = None) -> list[tuple[str, dict[str, t.Any]]]:
    """Journals of restores into ``disk_dir`` whose process is gone, and that this user wrote.

    Trusted only: a regular file (opened without following a link) owned by the module's user and
    writable by nobody else, in a directory reached without a link that is owned by root or the
    module's user and writable by nobody else. Why any other journal was ignored goes to ``ignored``.
    With ``host``, only journals written on that host count: on a directory shared by several
    hosts (a netfs pool), another host's pid says nothing about its restore here.
    """
    found: list[tuple[str, dict[str, t.Any]]] = []
    notes = ignored if ignored is not None else []
    try:
        dir_fd = open_dir(disk_dir)
    except (OSError, VmBackupError):
        return found
    try:
        dst = os.fstat(dir_fd)
        listed = set(os.listdir(dir_fd))
        names = []
        for name in sorted(listed):
            match = _JOURNAL_NAME.match(name)
            # A temporary journal counts only when its run died before it became the journal.
            if match and (not match.group("tmp") or (_TOKEN.match(match.group("token"))
                                                     and name[:-len(match.group("tmp"))] not in listed)):
                names.append(name)
        if names and (dst.st_uid not in repo_mod.trusted_owners() or dst.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            notes.append(f"restore journals in {disk_dir} are ignored: the directory is owned by uid {dst.st_uid} "
                         f"with mode {stat.S_IMODE(dst.st_mode):04o}, so anyone could have written them")
            return found
        for name in names:
            path = os.path.join(disk_dir, name)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError:
                continue  # a symbolic link (ELOOP), or gone
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    continue
                if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                    notes.append(f"restore journal {path} is ignored: it is owned by uid {st.st_uid} with mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}, not written by this user's restore")
                    continue
                raw = os.read(fd, MIB)
            except OSError:
                continue
            finally:
                os.close(fd)
            try:
                data = json.loads(raw.decode("utf-8"))
            except ValueError:
                continue
            if not isinstance(data, dict) or (host is not None and data.get("host", host) != host):
                continue
            if not _pid_alive(data.get("pid"), data.get("started")):
                found.append((path, data))
    finally:
        os.close(dir_fd)
    return sorted(found)


def target_lock_paths(name: str, disk_dir: str) -> list[str]:
    """The flock files of a restore to domain ``name`` with images in ``disk_dir``, in the order they are taken."""
    keys = sorted({f"name\0{name}", f"files\0{disk_dir}\0{safe_file_name(name)}"})
    return [os.path.join(LOCK_DIR, f"restore-{hashlib.sha256(k.encode('utf-8', 'surrogateescape')).hexdigest()[:32]}.lock")
            for k in keys]


class Restorer(Backend):
    """Restores one point of one VM."""

    # A caller's last word on the definition (the drill: no network, its own consoles, its marker):
    # applied to the XML after restored_xml, before anything is written.
    xml_hook: t.Callable[[str], str] | None = None
    # A caller whose target names are used once (the drill's carry a random token) removes the
    # lock files after the release: nobody else can ever wait on them. Never for reusable names.
    drop_target_locks: bool = False

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.phases = Phases()

    # ------------------------------------------------------------------ entry point
    def run(self) -> dict[str, t.Any]:
        started = time.monotonic()
        self.phases = Phases()
        repo = open_for_reading(validate_params(self.p), self.p.allow_unsafe_permissions)
        catalog = self._catalog(repo)
        point = self._point(catalog)
        catalog.sets_of_chain(point)  # CHAIN_BROKEN / REPOSITORY_FORMAT before any manifest field is read
        with lv.session(self.p.uri) as conn, contextlib.ExitStack() as held:
            # UNSAFE_TARGET before anything is written, check mode too.
            disk_dir = self._disk_dir(conn, catalog.sets[point].manifest)
            if not self.check_mode:
                # One restore at a time to a target name and its image names, from planning to the end.
                held.enter_context(self._target_lock(catalog, point, disk_dir))
                # What a killed restore into this directory left must not block this one.
                self._clean_stale(conn, disk_dir)
            plan = self._plan(conn, catalog, point)
            if plan is None:
                self.phases.add("plan", time.monotonic() - started)
                return self._unchanged(conn, catalog, point, started)
            self._check_space(plan)
            if self.check_mode:
                kept = self._predict_kept(conn, plan)
                self.phases.add("plan", time.monotonic() - started)
                return dict(self._result(plan, started, changed=True, check=True), kept_disks=kept)
            lock = VmLock(repo.lock_path(catalog.vm_uuid), self.p.lock_timeout, "restore", shared=True)
            try:
                lock.acquire()
            except OSError as exc:  # a read-only repository without a lock file: nothing can prune it either
                lock = None
                self.warnings.append(f"restoring without the repository lock ({exc.strerror})")
            try:
                # Re-check the chain under the lock: a prune may have run while we planned.
                Catalog(repo, catalog.vm_uuid).sets_of_chain(point)
                # Everything before the first write: trust checks, catalog, plan, the locks (waiting included).
                self.phases.add("plan", time.monotonic() - started)
                stats = self._execute(conn, plan)
            finally:
                if lock is not None:
                    lock.release()
            return self._result(plan, started, changed=True, stats=stats)

    # ------------------------------------------------------------------ decide
    def _catalog(self, repo: repo_mod.Repository) -> Catalog:
        catalogs = resolve_vms(repo, self.p.name, self.p.uuid)
        if len(catalogs) > 1:
            raise VmBackupError("INVALID_ARGUMENT", f"several VMs named {self.p.name!r} have sets in the repository "
                                f"({', '.join(c.vm_uuid for c in catalogs)}); give uuid")
        return catalogs[0]

    def _point(self, catalog: Catalog) -> str:
        if self.p.set_id is not None:
            if self.p.set_id not in catalog.sets:
                raise VmBackupError("SET_NOT_FOUND", f"set {self.p.set_id} is not a committed set of VM {catalog.vm_uuid}",
                                    set_id=self.p.set_id)
            return self.p.set_id
        if self.p.as_of is not None:
            when = parse_as_of(self.p.as_of)
            point = catalog.as_of(when)
            if point is None:
                raise VmBackupError("SET_NOT_FOUND", f"VM {catalog.vm_uuid} has no committed set completed at or before "
                                    f"{_manifest.iso(when)}")
            return point
        return catalog.latest()

    def _target_name(self, source_name: str) -> str:
        """The restored domain's name, validated before anything is written (INVALID_NAME)."""
        if self.p.identity == "original":
            if self.p.restore_as is not None and self.p.restore_as != source_name:
                raise VmBackupError("INVALID_ARGUMENT", f"identity=original restores the VM under its own name "
                                    f"{source_name!r}; restore_as {self.p.restore_as!r} differs (leave it out)")
            return validate_name(source_name, "the backed-up VM's name")
        if self.p.restore_as:
            return validate_name(self.p.restore_as, "restore_as")
        name = source_name if self.p.overwrite == "replace" else f"{source_name}-restored"
        return validate_name(name, "the name derived from the backed-up VM's name", "; give restore_as")

    def _identity(self, conn, catalog: Catalog, point: str, source: dict[str, str], target_name: str):
        """Observe the target host (the domain of that name, the holder of the source's UUID) and
        decide the identity: (the domain of that name or None, Identity)."""
        dom = lv.find_domain(conn, target_name)
        existing = None
        if dom is not None:
            existing = Existing(dom.UUIDString(), lv.is_active(dom), restore_marker(lv.domain_xml(dom, inactive=True)),
                                lv.domain_state(dom))
        uuid_holder = None
        if self.p.identity == "original":
            try:
                uuid_holder = lv.lookup_domain(conn, vm_uuid=catalog.vm_uuid).name()
            except VmBackupError as exc:
                if exc.error_code != "VM_NOT_FOUND":
                    raise
        identity = decide_identity(source_uuid=catalog.vm_uuid, source_name=source["name"], target_name=target_name,
                                   requested=self.p.identity, replace=self.p.overwrite == "replace", point=point,
                                   existing=existing, uuid_holder=uuid_holder)
        return dom, identity

    def _original_paths(self, manifest: dict[str, t.Any]) -> dict[str, str]:
        """target -> the disk path the manifest recorded on the source host (original_paths).

        Each must be an absolute, normalised file path in one existing directory that root alone
        controls (check_trusted_path); a file there already is refused later (TARGET_PATH_EXISTS).
        """
        paths: dict[str, str] = {}
        for entry in manifest["disks"]:
            target, path = entry.get("target"), entry.get("source")
            try:
                normal = repo_mod.validate_repository_path(path)
            except VmBackupError:
                normal = None
            if not isinstance(path, str) or normal != path or _CONTROL_CHARS.search(path) or path.startswith("/dev/"):
                raise VmBackupError("INVALID_ARGUMENT", f"original_paths: disk {target} was backed up from {path!r}, which is "
                                    "not a file path this restore can write; restore without original_paths")
            paths[target] = path
        dirs = sorted({os.path.dirname(p) for p in paths.values()})
        if len(dirs) != 1:
            # The images are written beside their final names and renamed into place, in one directory.
            raise VmBackupError("INVALID_ARGUMENT", f"original_paths: the disks were in several directories "
                                f"({', '.join(dirs)}); restore them with disk_dir instead")
        if not os.path.isdir(dirs[0]):
            raise VmBackupError("PATH_ESCAPE", f"original_paths: {dirs[0]} is not an existing directory on this host")
        repo_mod.check_trusted_path(dirs[0], "original_paths directory", self.p.allow_unsafe_permissions)
        return paths

    def _disk_dir(self, conn, manifest: dict[str, t.Any] | None = None) -> str:
        """The directory of the restored images: it must exist, and nobody but root may write in it
        or any directory above it (a planted link there could redirect what root writes or deletes).
        With original_paths it is the one directory the manifest's disk paths share."""
        if self.p.original_paths and manifest is not None:
            return os.path.dirname(next(iter(self._original_paths(manifest).values())))
        if self.p.storage_pool:
            disk_dir, what = lv.pool_directory(conn, self.p.storage_pool), f"the directory of storage pool {self.p.storage_pool!r}"
        else:
            disk_dir, what = self.p.disk_dir or DEFAULT_DISK_DIR, "disk_dir"
        repo_mod.check_trusted_path(disk_dir, what)
        if not os.path.isdir(disk_dir):
            raise VmBackupError("PATH_ESCAPE", f"{what} {disk_dir} is not an existing directory")
        return disk_dir

    @contextlib.contextmanager
    def _target_lock(self, catalog: Catalog, point: str, disk_dir: str) -> t.Iterator[None]:
        """Exclusive flocks on the target domain name and on the image names in ``disk_dir`` (two
        names can map to one file name), in a directory only root can write; always taken in the
        same order, so two restores never wait for each other crosswise."""
        name = self._target_name(catalog.sets[point].manifest["vm"].get("name") or catalog.vm_uuid)
        os.close(open_dir(LOCK_DIR, create_mode=0o700))
        repo_mod.check_trusted_path(LOCK_DIR, "the restore lock directory")
        locks: list[VmLock] = []
        try:
            for path in target_lock_paths(name, disk_dir):
                lock = VmLock(path, self.p.lock_timeout, f"restore to {name}")
                try:
                    lock.acquire()
                except VmBackupError as exc:
                    raise VmBackupError("VM_LOCKED", f"another restore to {name!r} (or to the same image names in {disk_dir}) "
                                        f"is running; waited {self.p.lock_timeout:g}s (lock_timeout)", target=name,
                                        lock_path=lock.path, lock_holder=exc.details.get("lock_holder")) from None
                locks.append(lock)
            yield
        finally:
            for lock in reversed(locks):
                lock.release()
                if self.drop_target_locks:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(lock.path)

    def _plan(self, conn, catalog: Catalog, point: str) -> Plan | None:
        chain = catalog.sets_of_chain(point)  # CHAIN_BROKEN / REPOSITORY_FORMAT before anything else
        manifest = catalog.sets[point].manifest
        source = {"name": manifest["vm"].get("name") or catalog.vm_uuid, "uuid": catalog.vm_uuid}
        target_name = self._target_name(source["name"])
        existing, identity = self._identity(conn, catalog, point, source, target_name)
        if identity.kind == "unchanged":
            self._check_restored_files(target_name, existing)
            return None  # already restored from this very point under this name
        replacing = existing if identity.replacing else None
        target_uuid = identity.uuid or str(uuid_mod.uuid4())
        original = self._original_paths(manifest) if self.p.original_paths else None
        disk_dir = self._disk_dir(conn, manifest)
        set_dir = catalog.repo.set_dir(catalog.vm_uuid, point)

        # Files this restore reads: every disk chain, and the point's side files it uses.
        replaced_xml = lv.domain_xml(replacing, inactive=True) if replacing is not None else None
        current = _file_sources(replaced_xml) if replaced_xml is not None else {}
        old_nvram = lv.nvram_path(replaced_xml) if replaced_xml is not None else None
        disks, taken = [], set(current.values())
        stem = safe_file_name(target_name)
        ext = "qcow2" if self.p.disk_format == "qcow2" else "img"
        for entry in manifest["disks"]:
            target = entry["target"]
            dchain = catalog.disk_chain(point, target)
            files = [os.path.join(catalog.repo.set_dir(catalog.vm_uuid, sid), d["file"]) for sid, d in dchain]
            path = os.path.join(disk_dir, f"{stem}-{target}-{point}.{ext}")
            n = 2
            # A replaced VM may still use that name (restored from this point before), or kept it.
            while path in taken or (replacing is not None and os.path.lexists(path)):
                path = os.path.join(disk_dir, f"{stem}-{target}-{point}-{n}.{ext}")
                n += 1
            taken.add(path)
            disks.append(DiskPlan(target, dchain, files, path, int(entry["virtual_size"]), sum(d["size"] for _s, d in dchain)))
        if original:  # disaster restore to the recorded paths (identity=original, original_paths)
            for disk in disks:
                disk.path = original[disk.target]
        files_meta = manifest["files"]
        side = ["domain.xml"] + [rel for rel, e in sorted(files_meta.items()) if e.get("role") in ("nvram", "tpm")]
        side_jobs = []
        for rel in side:
            if rel not in files_meta:
                raise VmBackupError("REPOSITORY_FORMAT", f"set {point} has no {rel}", set_id=point)
            side_jobs.append(FileJob(catalog.vm_uuid, point, rel, os.path.join(set_dir, rel), files_meta[rel]["size"],
                                     files_meta[rel]["sha256"], None))
        saved_xml = self._read_verified(side_jobs[0])
        if identity.kind in ("new", "target"):
            # Not the backed-up VM itself: its console logs must not be the original's files.
            saved_xml, dummy = relocate_log_files(saved_xml, stem)
        nvram = None
        if "nvram.fd" in files_meta:
            nvram = os.path.join(NVRAM_DIR, f"{stem}-{point}_VARS.fd")
            n = 2
            while nvram == old_nvram or (replacing is not None and os.path.lexists(nvram)):  # as for the disks
                nvram = os.path.join(NVRAM_DIR, f"{stem}-{point}-{n}_VARS.fd")
                n += 1
        tpm_files = [rel for rel, e in sorted(files_meta.items()) if e.get("role") == "tpm"]
        if tpm_files and os.path.exists(os.path.join(SWTPM_DIR, target_uuid)):
            self.warnings.append(f"TPM state of {target_name} exists in {SWTPM_DIR}/{target_uuid}; it is kept, not restored")
            tpm_files = []
        for path in [d.path for d in disks] + ([nvram] if nvram else []):
            if os.path.lexists(path):
                where = "restore_as" if path == nvram else "restore_as or disk_dir"
                raise VmBackupError("TARGET_PATH_EXISTS", f"{path} already exists; remove it or choose another {where}",
                                    existing_path=path)
        metadata = {"vm_uuid": catalog.vm_uuid, "vm_name": source["name"], "set_id": point,
                    "restored": _manifest.iso(_manifest.utcnow())}
        live_xml = self._live_xml(catalog, point, saved_xml, disks, side_jobs)
        macs = {"saved": interface_macs(saved_xml), "target": interface_macs(replaced_xml) if replaced_xml else [],
                "new": []}[identity.macs]
        xml, dropped, warnings = restored_xml(
            saved_xml, name=target_name, vm_uuid=target_uuid,
            disks={d.target: (d.path, self.p.disk_format) for d in disks},
            new_identity=identity.new_identity, network_map=self.p.network_map, nvram=nvram, metadata=metadata,
            macs=macs, live_xml=live_xml,
        )
        if self.xml_hook is not None:
            xml = self.xml_hook(xml)
        self.warnings.extend(warnings)
        self.warnings.extend(self._missing_networks(conn))
        # A backed-up disk the definition cannot carry is not written either (no orphan image).
        disks = [d for d in disks if d.target not in dropped]
        replaced_files = []
        if replacing is not None:
            kept = {d.target for d in disks}
            replaced_files = sorted(p for tg, p in current.items() if tg in kept)
            if nvram and old_nvram:  # the old firmware state goes (or stays) with the old disks
                replaced_files.append(old_nvram)
        plan = Plan(catalog, point, chain, source, target_name, target_uuid, replacing, disks, side_jobs, nvram,
                    tpm_files, xml, disk_dir, dropped, replaced_files)
        plan.identity, plan.before_xml = identity, replaced_xml
        return plan

    def _live_xml(self, catalog: Catalog, point: str, saved_xml: str, disks: list[DiskPlan],
                  side_jobs: list[FileJob]) -> str | None:
        """The running VM's XML of the point (domain-live.xml), read (verified) only when a
        backed-up disk is missing from the persistent XML: it was attached live only."""
        persistent = {d.target for d in lv.parse_disks(saved_xml)}
        if all(d.target in persistent for d in disks):
            return None
        files_meta = catalog.sets[point].manifest["files"]
        entry = files_meta.get("domain-live.xml")
        if entry is None:
            return None  # restored_xml reports those disks as dropped
        job = FileJob(catalog.vm_uuid, point, "domain-live.xml", os.path.join(catalog.repo.set_dir(catalog.vm_uuid, point),
                      "domain-live.xml"), entry["size"], entry["sha256"], None)
        side_jobs.append(job)  # counted in bytes_read
        return self._read_verified(job)

    def _missing_networks(self, conn) -> list[str]:
        """Warnings for network_map values that name no network or bridge on this host: the VM is
        defined, but will not start until they exist."""
        out = []
        for old, new in sorted((self.p.network_map or {}).items()):
            try:
                conn.networkLookupByName(new)
                continue
            except lv.LibvirtError:
                pass
            if os.path.isdir(os.path.join("/sys/class/net", new, "bridge")):
                continue
            out.append(f"network_map maps {old!r} to {new!r}, which is neither a libvirt network nor a bridge on this host; "
                       "the VM will not start until it exists")
        return out

    def _read_verified(self, job: FileJob) -> str:
        """A small side file, read only after its checksum matched."""
        out = check_file(job)
        if out.code is not None:
            raise VmBackupError(out.code, f"cannot restore: {out.msg}", set_id=job.set_id, file=job.rel)
        with open(job.path, encoding="utf-8") as fh:
            return fh.read()

    def _check_space(self, plan: Plan) -> None:
        need = sum(d.read_bytes for d in plan.disks) + SPACE_HEADROOM
        vfs = os.statvfs(plan.disk_dir)
        free = vfs.f_bavail * vfs.f_frsize
        if free < need:
            raise VmBackupError("TARGET_NO_SPACE", f"{plan.disk_dir} has {free // MIB} MiB free, the restore needs about "
                                f"{need // MIB} MiB", free_bytes=free, needed_bytes=need)

    # ------------------------------------------------------------------ act
    def _execute(self, conn, plan: Plan) -> dict[str, t.Any]:
        token = uuid_mod.uuid4().hex[:16]
        fds: dict[str, int] = {plan.disk_dir: open_dir(plan.disk_dir)}
        journal = Journal(fds[plan.disk_dir], plan.disk_dir, token, plan.target_name)
        # Every name this run will make is in the journal before the first exists.
        entries = {d.target: journal.add(plan.disk_dir, os.path.basename(d.path)) for d in plan.disks}
        nvram_entry = journal.add(NVRAM_DIR, os.path.basename(plan.nvram)) if plan.nvram else None
        tpm_entry = journal.add(SWTPM_DIR, plan.target_uuid, "dir") if plan.tpm_files else None
        renamed: list[dict[str, t.Any]] = []  # entries this run moved to their final names
        defined = None
        old_xml = old_checkpoints = None
        transfer_started = time.monotonic()
        try:
            journal.write()
            for disk in plan.disks:
                self._reserve(fds[plan.disk_dir], entries[disk.target])
            journal.write()
            verify_started = time.monotonic()
            jobs = [FileJob(plan.catalog.vm_uuid, sid, d["file"], path, d["size"], d["sha256"], disk.target)
                    for disk in plan.disks for (sid, d), path in zip(disk.chain, disk.files)]
            jobs += plan.side_jobs[1:]  # domain.xml was verified when it was read
            workers = self.p.workers or os.cpu_count() or 1
            progress = Progress(self.log, f"restore {plan.point} of {plan.source['name']} as {plan.target_name}",
                                sum(j.size for j in jobs))
            self._log(f"{progress.what}: {len(plan.disks)} disks, {human_bytes(progress.total)} to read and verify, "
                      f"into {plan.disk_dir}")
            stop = threading.Event()
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
            syncer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            try:
                # Checksums run beside qemu-img (both read the same files), and each image is
                # flushed to disk while the next one is written: the CPU and the disk overlap.
                pending = [pool.submit(check_file, job, progress, stop)
                           for job in sorted(jobs, key=lambda j: j.size, reverse=True)]
                convert_started = time.monotonic()
                convert_error = None
                synced = []
                for disk in plan.disks:
                    entry = entries[disk.target]
                    disk_started = time.monotonic()
                    try:
                        self._write_image(disk, os.path.join(plan.disk_dir, entry["partial"]))
                    except VmBackupError as exc:
                        # A damaged file is the likelier cause: the checksums have the first word.
                        convert_error = exc
                        break
                    synced.append(syncer.submit(_make_durable, fds[plan.disk_dir], entry))
                    self._log(f"{progress.what}: disk {disk.target} written ({human_bytes(disk.read_bytes)} read) in "
                              f"{time.monotonic() - disk_started:.1f} s")
                convert_s = time.monotonic() - convert_started
                outcomes = [f.result() for f in pending]
                verify_s = time.monotonic() - verify_started
                progress.finish()
                self.phases.add("transfer", time.monotonic() - transfer_started)
                with self.phases.phase("sync"):
                    for future in synced:
                        future.result()
            finally:
                # A cancel (or a failure) does not wait for every queued checksum: the queued ones are
                # dropped and the running ones stop at their next batch; an fsync under way ends.
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                syncer.shutdown(wait=True)
            define_started = time.monotonic()
            bad = [o for o in outcomes if o.code is not None]
            if convert_error is not None and not bad:
                raise convert_error
            if bad:
                first = bad[0]
                affected = plan.catalog.points_using(first.job.set_id, first.job.target)
                raise VmBackupError(first.code, f"cannot restore point {plan.point}: {first.msg}; nothing was defined",
                                    set_id=first.job.set_id, file=first.job.rel, affected=affected,
                                    findings=[{"code": o.code, "set_id": o.job.set_id, "file": o.job.rel, "msg": o.msg} for o in bad])
            set_dir = plan.catalog.repo.set_dir(plan.catalog.vm_uuid, plan.point)
            if nvram_entry is not None:
                # libvirt-qemu owns the NVRAM directory: a QEMU process could plant links there.
                fds[NVRAM_DIR] = open_dir(NVRAM_DIR, create_mode=0o711, follow_root_links=True)
                st = copy_private(os.path.join(set_dir, "nvram.fd"), fds[NVRAM_DIR], nvram_entry["partial"])
                nvram_entry["dev"], nvram_entry["ino"] = st.st_dev, st.st_ino
                journal.write()
            if tpm_entry is not None:
                fds[SWTPM_DIR] = open_dir(SWTPM_DIR, create_mode=0o711, follow_root_links=True)
                self._restore_tpm(plan, fds[SWTPM_DIR], tpm_entry)
                journal.write()
            # Into place, never over a name that appeared meanwhile (another restore's image).
            for entry in [nvram_entry] + [entries[d.target] for d in plan.disks] + [tpm_entry]:
                if entry is not None:
                    rename_noreplace(fds[entry["dir"]], entry["partial"], entry["final"], os.path.join(entry["dir"], entry["final"]))
                    renamed.append(entry)
            for fd in fds.values():
                os.fsync(fd)
            tpm_dir = os.path.join(SWTPM_DIR, plan.target_uuid) if tpm_entry is not None else None

            if plan.replacing is not None:
                old_xml = lv.domain_xml(plan.replacing, inactive=True)
                old_checkpoints = lv.checkpoint_xmls(plan.replacing)
            defined = lv.define(conn, plan.xml)
            if plan.replacing is not None:
                # The old checkpoints' bitmaps live in the old disks; the next export starts a new chain.
                lv.drop_checkpoint_metadata(defined)
            if self.p.start:
                lv.start(defined)
            journal.data["phase"] = "defined"
            journal.write()
        except BaseException:
            # Undo (failure contract): the old definition back, nothing we wrote left behind.
            try:
                self._undo(conn, plan, journal, renamed, defined, old_xml, old_checkpoints)
            finally:
                for fd in fds.values():
                    os.close(fd)
            raise
        try:
            removed, kept = self._remove_replaced(conn, plan, {os.path.join(e["dir"], e["final"]) for e in renamed})
            journal.remove()
        finally:
            for fd in fds.values():
                os.close(fd)
        if self.p.storage_pool:
            error = lv.refresh_pool(conn, self.p.storage_pool)
            if error:
                self.warnings.append(f"could not refresh storage pool {self.p.storage_pool}: {error}")
        self.phases.add("define", time.monotonic() - define_started)
        return {
            "verify_s": round(verify_s, 3),
            "convert_s": round(convert_s, 3),
            "bytes_written": sum(_allocated(d.path) for d in plan.disks),
            "removed_disks": removed,
            "kept_disks": kept,
            "state": lv.domain_state(defined),
            "tpm_dir": tpm_dir,
        }

    def _log(self, text: str) -> None:
        """A line to the module's log (syslog / the journal), as the progress lines go."""
        if self.log is not None:
            try:
                self.log(text)
            except Exception:  # pylint: disable=broad-exception-caught
                pass  # the log is a courtesy: a broken syslog must not fail a restore

    @staticmethod
    def _reserve(dir_fd: int, entry: dict[str, t.Any]) -> None:
        """Create the partial image's name ourselves, private and exclusive, before qemu-img writes it."""
        st = create_private(dir_fd, entry["partial"])
        entry["dev"], entry["ino"] = st.st_dev, st.st_ino

    def _write_image(self, disk: DiskPlan, path: str) -> None:
        """Write the point's image into the file _reserve made.

        qemu-img opens its target by path; the path is safe because the directory passed
        check_trusted_path (only root can create, rename or remove names in it) and the partial
        name carries a token only this run knows. ``qemu-img create`` formats the reserved file in
        place (same inode, mode 0600 kept), and ``convert -n --target-is-zero`` writes into it
        sparsely, so the image is private from its first byte whatever the umask.

        Where the file system takes O_DIRECT, the image is written with ``-t none``: the data goes
        to the disk while qemu-img copies (and qemu-img flushes at the end), instead of filling the
        page cache for a long fsync afterwards - measured about 2.5x faster here than the same
        convert followed by an fsync. Elsewhere (tmpfs, some FUSE or network file systems) the
        page cache is used and the fsync after it does the work.
        """
        fmt = self.p.disk_format
        cache = ["-t", "none"] if direct_io_works(path) else []
        for args, what in (
            (["create", "-q", "-f", fmt, path, str(disk.virtual_size)], f"create of {path}"),
            (["convert", "-q", "-n", "--target-is-zero", "-W", "-m", "8"] + cache + ["-O", fmt, chain_spec(disk.files), path],
             f"convert to {path}"),
        ):
            rc, out, err = self.qemu_img.run_raw(args)
            if rc != 0:
                raise VmBackupError("RESTORE_FAILED", f"qemu-img {what} failed (rc={rc}): {err.strip() or out.strip()}",
                                    target=disk.target)

    def _restore_tpm(self, plan: Plan, parent_fd: int, entry: dict[str, t.Any]) -> None:
        """The TPM state into a new private directory (its partial name), every file created exclusively."""
        set_dir = plan.catalog.repo.set_dir(plan.catalog.vm_uuid, plan.point)
        os.mkdir(entry["partial"], 0o700, dir_fd=parent_fd)
        top = os.open(entry["partial"], _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
        try:
            st = os.fstat(top)
            entry["dev"], entry["ino"] = st.st_dev, st.st_ino
            os.fchmod(top, 0o700)
            for rel in plan.tpm_files:
                parts = os.path.relpath(rel, "tpm").split("/")
                if any(part in ("", ".", "..") for part in parts):
                    raise VmBackupError("REPOSITORY_FORMAT", f"set {plan.point} names a TPM file outside tpm/: {rel!r}",
                                        set_id=plan.point)
                fd = os.dup(top)
                try:
                    for part in parts[:-1]:
                        try:
                            os.mkdir(part, 0o700, dir_fd=fd)
                        except FileExistsError:
                            pass
                        nfd = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                        os.close(fd)
                        fd = nfd
                    copy_private(os.path.join(set_dir, rel), fd, parts[-1])
                finally:
                    os.close(fd)
        finally:
            os.close(top)

    def _backing_files(self, path: str, fmt: str | None) -> list[str]:
        """The backing files below ``path`` (qemu-img info --backing-chain -U; the format is never probed when known)."""
        chain = self.qemu_img.info_chain(path, fmt if fmt in ("qcow2", "raw", "qed", "vmdk", "vdi", "vpc", "vhdx") else None,
                                         force_share=True)
        files, above = [], path
        for image in chain[1:]:
            name = image.get("filename")
            if not isinstance(name, str) or name.startswith("json:"):
                continue
            if not os.path.isabs(name):
                name = os.path.join(os.path.dirname(above), name)
            files.append(os.path.normpath(name))
            above = name
        return files

    def _in_use(self, conn, exclude_uuids: t.Iterable[str] = ()) -> lv.InUse:
        return lv.paths_in_use(conn, self._backing_files, exclude_uuids)

    def _remove_replaced(self, conn, plan: Plan, mine: set[str]) -> tuple[list[str], list[dict[str, str]]]:
        """Delete the replaced VM's old files that no defined domain uses (also as a backing file)."""
        removed: list[str] = []
        kept: list[dict[str, str]] = []
        if plan.replacing is None or self.p.keep_replaced_disks or not plan.replaced_files:
            return removed, kept
        try:
            in_use = self._in_use(conn)
        except (lv.LibvirtError, VmBackupError) as exc:
            for path in plan.replaced_files:
                kept.append({"path": path, "reason": f"cannot tell which files domains use: {exc}"})
            self.warnings.append(f"kept the replaced VM's files ({', '.join(plan.replaced_files)}): cannot tell which files domains use")
            return removed, kept
        for path in plan.replaced_files:
            if path in mine:
                continue
            done, reason = remove_path(path, in_use=in_use)
            if done:
                removed.append(path)
            elif reason is not None:
                kept.append({"path": path, "reason": reason})
                self.warnings.append(f"kept {path} of the replaced VM: {reason}")
        return removed, kept

    def _predict_kept(self, conn, plan: Plan) -> list[dict[str, str]]:
        """Check mode: which old files the replace would keep (the replaced domain itself will not use them)."""
        if plan.replacing is None or self.p.keep_replaced_disks or not plan.replaced_files:
            return []
        in_use = self._in_use(conn, exclude_uuids=[plan.target_uuid])
        kept = []
        for path in plan.replaced_files:
            _done, reason = remove_path(path, in_use=in_use, dry_run=True)
            if reason is not None:
                kept.append({"path": path, "reason": reason})
        return kept

    def _undo(self, conn, plan: Plan, journal: Journal, renamed: list[dict[str, t.Any]], defined, old_xml, old_checkpoints) -> None:
        """Back to before the run: the old definition, and only the files this run created removed."""
        if defined is not None:
            try:
                if plan.replacing is not None and old_xml is not None:
                    if defined.isActive():
                        defined.destroy()
                    restored = lv.define(conn, old_xml)
                    lv.redefine_checkpoints(restored, old_checkpoints or [])
                else:
                    lv.undefine(defined)
            except (lv.LibvirtError, VmBackupError) as exc:
                self.warnings.append(f"could not undo the domain definition: {exc}")
        try:
            in_use: lv.InUse | None = self._in_use(conn)
        except (lv.LibvirtError, VmBackupError) as exc:
            in_use = None
            self.warnings.append(f"cannot tell which files domains use ({exc}); the restored images are kept")
        for entry in journal.data["files"]:
            inode = (entry["dev"], entry["ino"]) if entry["dev"] is not None else None
            # The partial name carries this run's token: nobody else made or uses it.
            remove_path(os.path.join(entry["dir"], entry["partial"]), entry["kind"], inode)
            if entry in renamed:
                final = os.path.join(entry["dir"], entry["final"])
                if in_use is None:
                    self.warnings.append(f"kept {final} of the failed restore")
                    continue
                done, reason = remove_path(final, entry["kind"], inode, in_use)
                if not done and reason is not None:
                    self.warnings.append(f"kept {final} of the failed restore: {reason}")
        journal.remove()

    def _clean_stale(self, conn, disk_dir: str) -> None:
        """Remove what a killed restore into this directory left, as far as its journal proves it made it.

        Only trusted journals count (stale_journals), only their own names (journal_victims), and
        a file a defined domain uses (also as a backing file) is never removed, whatever the journal says.
        """
        ignored: list[str] = []
        journals = stale_journals(disk_dir, socket.gethostname(), ignored)
        self.warnings.extend(ignored)
        if not journals:
            return
        in_use = self._in_use(conn)
        for path, data in journals:
            for victim in journal_victims(data, journal_token(path) or "", disk_dir, (NVRAM_DIR, SWTPM_DIR)):
                done, reason = remove_path(victim.path, victim.kind, victim.inode, in_use)
                if done:
                    self.cleaned.append(f"removed {victim.path} of an interrupted restore")
                elif reason is not None and victim.inode is None:
                    self.warnings.append(f"kept {victim.path} of an interrupted restore: {reason}")
            for leftover in (path, f"{path}.tmp-{journal_token(path)}"):
                if remove_path(leftover)[0]:
                    self.cleaned.append(f"removed the journal {leftover} of an interrupted restore")

    def _check_restored_files(self, name: str, dom) -> None:
        """An "already restored" domain must still have its disks: a run that lost them must not pass as done."""
        xml = lv.domain_xml(dom, inactive=True)
        missing = [p for p in _file_sources(xml).values() if not os.path.isfile(p)]
        if missing:
            raise VmBackupError("TARGET_VM_EXISTS", f"domain {name!r} was restored from this point, but its files are "
                                f"missing: {', '.join(missing)}; undefine it (or choose another restore_as) and restore again",
                                target=name, missing_paths=missing)

    # ------------------------------------------------------------------ results
    def _unchanged(self, conn, catalog: Catalog, point: str, started: float) -> dict[str, t.Any]:
        """The domain was restored from this point before; at most it still has to be started.

        The result has every field a run that did the work returns, describing the domain as it
        is defined: its disks, NVRAM, XML; nothing was read, written or replaced.
        """
        manifest = catalog.sets[point].manifest
        source = {"name": manifest["vm"].get("name") or catalog.vm_uuid, "uuid": catalog.vm_uuid}
        name = self._target_name(source["name"])
        dom = lv.find_domain(conn, name)
        start = bool(self.p.start and dom is not None and not lv.is_active(dom))
        if start and not self.check_mode:
            lv.start(dom)
        xml = lv.domain_xml(dom, inactive=True) if dom is not None else None
        defined = {d.target: d for d in lv.parse_disks(xml)} if xml else {}
        disks, data = [], 0
        for entry in manifest["disks"]:
            dchain = catalog.disk_chain(point, entry["target"])
            data += sum(d["size"] for _s, d in dchain)
            disk = defined.get(entry["target"])
            if disk is not None:
                disks.append({"target": disk.target, "path": disk.source, "format": disk.driver_type,
                              "virtual_size": int(entry["virtual_size"]), "chain": [sid for sid, _d in dchain], "bytes_read": 0})
        vm_uuid = dom.UUIDString() if dom is not None else None
        tpm_dir = os.path.join(SWTPM_DIR, vm_uuid) if vm_uuid else None
        has_tpm = any(e.get("role") == "tpm" for e in manifest["files"].values())
        msg = f"domain {name!r} was already restored from set {point}; " + ("started it" if start else "nothing to do")
        shown = redact_xml(xml) if xml else ""
        return {
            "changed": start,
            "msg": msg,
            "set_id": point,
            "point": _point_info(manifest),
            "chain": catalog.sets_of_chain(point),
            "source_vm": source,
            "vm": {"name": name, "uuid": vm_uuid,
                   "state": ("running" if start and not self.check_mode else lv.domain_state(dom)) if dom is not None else None,
                   "replaced": False},
            "identity": "original" if vm_uuid == catalog.vm_uuid else "new",
            "disks": disks,
            "dropped_disks": [],
            "nvram": lv.nvram_path(xml) if xml else None,
            "tpm_dir": tpm_dir if has_tpm and tpm_dir and os.path.isdir(tpm_dir) else None,
            "domain_xml": shown,
            "replaced_disks": [],
            "removed_disks": [],
            "kept_disks": [],
            "bytes_read": 0,
            "estimated_bytes": data,
            "bytes_written": 0,
            "duration_s": round(time.monotonic() - started, 3),
            "verify_s": 0.0,
            "convert_s": 0.0,
            "throughput_mib_s": None,
            "timings": self.phases.public(),
            "started": start and not self.check_mode,
            "cleaned_up": self.cleaned,
            "diff": {"before": shown, "after": shown, "before_header": f"domain {name}", "after_header": f"domain {name}"},
        }

    def _result(self, plan: Plan, started: float, changed: bool, check: bool = False,
                stats: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
        stats = stats or {}
        seconds = time.monotonic() - started
        manifest = plan.catalog.sets[plan.point].manifest
        verb = "would restore" if check else "restored"
        data = sum(d.read_bytes for d in plan.disks)
        identity = plan.identity.kind if plan.identity is not None else ("source" if plan.replacing is not None else "new")
        how = {"new": "a new VM", "source": "replacing the shut-off VM itself, keeping its identity",
               "target": "replacing the shut-off VM, keeping its own identity",
               "original": "with its original identity"}.get(identity, identity)
        shown = redact_xml(plan.xml)
        result = {
            "changed": changed,
            "msg": (f"{verb} point {plan.point} of {plan.source['name']} as {plan.target_name!r} "
                    f"({how}; "
                    f"{len(plan.disks)} disks, {plan.read_bytes} bytes " + ("to read" if check else "read") + ("" if check else f", {seconds:.1f}s") + ")"),
            "set_id": plan.point,
            "point": _point_info(manifest),
            "chain": plan.chain,
            "source_vm": plan.source,
            "vm": {"name": plan.target_name, "uuid": plan.target_uuid, "state": stats.get("state"),
                   "replaced": plan.replacing is not None},
            "identity": identity,
            "disks": [d.public(self.p.disk_format) for d in plan.disks],
            "dropped_disks": plan.dropped,
            "nvram": plan.nvram,
            "tpm_dir": stats.get("tpm_dir"),
            "domain_xml": shown,
            "replaced_disks": plan.replaced_files,
            "removed_disks": stats.get("removed_disks", []),
            "kept_disks": stats.get("kept_disks", []),
            "bytes_read": 0 if check else plan.read_bytes,
            "estimated_bytes": data,
            "bytes_written": stats.get("bytes_written", 0),
            "duration_s": round(seconds, 3),
            "verify_s": stats.get("verify_s"),
            "convert_s": stats.get("convert_s"),
            "throughput_mib_s": round(data / MIB / seconds, 1) if stats and seconds > 0 else None,
            "timings": self.phases.public(),
            "started": bool(self.p.start and not check),
            "cleaned_up": self.cleaned,
            # --diff: the definition before (the replaced domain's, or nothing) and after.
            "diff": {
                "before": redact_xml(plan.before_xml) if plan.before_xml else "",
                "after": shown,
                "before_header": f"domain {plan.target_name}" if plan.before_xml else "(no domain)",
                "after_header": f"domain {plan.target_name} (restored from set {plan.point})",
            },
        }
        return result


def _point_info(manifest: dict[str, t.Any]) -> dict[str, t.Any]:
    return {k: manifest.get(k) for k in ("set_id", "type", "started", "completed", "chain_id", "consistency", "period")}


def _make_durable(dir_fd: int, entry: dict[str, t.Any]) -> None:
    """fsync the written image, proving it is still the file this run reserved."""
    fd = os.open(entry["partial"], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (entry["dev"], entry["ino"]):
            raise VmBackupError("RESTORE_FAILED", f"{entry['partial']} is not the file this restore created; nothing is defined")
        os.fchmod(fd, repo_mod.FILE_MODE)
        os.fsync(fd)
    finally:
        os.close(fd)


def direct_io_works(path: str) -> bool:
    """Whether ``path`` (an existing file) opens with O_DIRECT (qemu-img ``-t none`` needs it)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flag)
    except OSError:
        return False
    os.close(fd)
    return True


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512
