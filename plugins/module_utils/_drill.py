# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The drill backend: prove a point restorable by restoring it, checking it and throwing it away.

This module is private to the vmbackup.libvirt collection; it is not a public API.

One drill of one point of one VM, on this host:

1. ``image``: ``qemu-img check`` of every image the point's restore reads (the repository's files).
2. ``restore``: the point restored by ``_restore.Restorer`` (every checksum verified while the
   images are written, nothing defined unless all matched) as raw images into a private
   directory ``<disk_dir>/<drill name>/``, under the throwaway name ``vmbackup-drill-<vm>-<token>``
   with a new UUID and MACs, no network (or only the isolated one), consoles into that directory,
   no host devices, and a ``<vmbackup:drill>`` marker in its libvirt metadata.
3. ``fsck``: offline ``e2fsck -fn`` of each ext2/3/4 file system on the restored images (the whole
   disk, or the primary partitions of an MBR or GPT table), before anything boots. A journal that
   needs recovery (a crash-consistent point) is replayed first, on the throwaway copy only.
4. ``boot``, ``agent``, ``fsinfo``, ``probe``: start it, wait for the guest agent, list its file
   systems (``guest-get-fsinfo``), run the probe command through the agent.
5. Cleanup, always (a ``finally``, also on SIGTERM): destroy, undefine (NVRAM, TPM, checkpoint
   and snapshot metadata), the drill directory removed; never a file another domain uses.
6. The proof ``sets/<set-id>.drill.json`` beside the set (written like verify's sidecar), on
   success and on failure. The set itself is only read.

A drill killed hard (SIGKILL, a host crash) leaves a journal ``<disk_dir>/.vmbackup-drill-<token>.json``
and possibly its domain (recognisable by the marker: host, pid, process start time). The next
drill on the host removes both once that process is gone, and says so in ``cleaned_up``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import socket
import stat
import struct
import time
import typing as t
import uuid as uuid_mod
import xml.etree.ElementTree as ET

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _guest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _libvirt as lv
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._catalog import DRILL_PROOF_FORMAT, DRILL_PROOF_SUFFIX, Catalog, parse_as_of, resolve_vms
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._lock import VmLock, validate_timeout
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import CANCEL_SIGNALS, Backend, Cancelled
from ansible_collections.vmbackup.libvirt.plugins.module_utils._progress import Phases
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _restore
from ansible_collections.vmbackup.libvirt.plugins.module_utils._verify import open_for_reading

PROOF_FORMAT = DRILL_PROOF_FORMAT
PROOF_VERSION = 1
PROOF_SUFFIX = DRILL_PROOF_SUFFIX
JOURNAL_FORMAT = "vmbackup.libvirt/drill-journal"
JOURNAL_VERSION = 1
JOURNAL_PREFIX = ".vmbackup-drill-"
DRILL_NS = "https://vmbackup.libvirt/xmlns/drill/1"
NAME_PREFIX = "vmbackup-drill-"
DEFAULT_DISK_DIR = "/var/lib/libvirt/images/vmbackup-drill"
DEFAULT_ISOLATED_NETWORK = "vmbackup-isolated"
NETWORKS = ("none", "isolated")
BOOTS = ("auto", "always", "never")
CHECKS = ("image", "fsck", "fsinfo")
POINTS = ("newest", "random")
# A VM without an agent channel that is booted anyway (boot: always) must stay up this long.
SETTLE_SECONDS = 10.0
DETAIL_MAX = 2000
_TOKEN = re.compile(r"^[0-9a-f]{10}$")
_DRILL_NAME = re.compile(r"^" + re.escape(NAME_PREFIX) + r"[A-Za-z0-9._-]{1,60}-(?P<token>[0-9a-f]{10})$")
_JOURNAL_NAME = re.compile(r"^" + re.escape(JOURNAL_PREFIX) + r"(?P<token>[0-9a-f]{10})\.json$")
# Errors that say nothing about the set: the drill could not run (outcome "error", not "failed").
INFRA_CODES = frozenset({
    "LIBVIRT_UNAVAILABLE", "VM_LOCKED", "TARGET_NO_SPACE", "UNSAFE_TARGET", "PATH_ESCAPE", "IO_ERROR", "TARGET_PATH_EXISTS",
    "TARGET_VM_EXISTS", "INVALID_ARGUMENT", "INVALID_NAME", "MISSING_DEPENDENCY", "CANCELLED",
    "SET_NOT_FOUND",  # the point was chosen, then pruned while the drill waited for the lock: gone, not damaged
})
# Partition types that hold no file system of their own (MBR): empty, extended (logical partitions are not read).
_MBR_SKIP = {0x00, 0x05, 0x0F, 0x85, 0xEE}
_EXT_MAGIC = b"\x53\xef"
_EXT_INCOMPAT_RECOVER = 0x4

ET.register_namespace("vmbackupdrill", DRILL_NS)


@dataclasses.dataclass
class DrillParams:
    repository: str
    name: str | None = None
    uuid: str | None = None
    point: str = "newest"
    as_of: str | None = None
    uri: str = "qemu:///system"
    network: str = "none"
    isolated_network: str = DEFAULT_ISOLATED_NETWORK
    disk_dir: str | None = None
    boot: str = "auto"
    boot_timeout: float = 300.0
    probe: list[str] | None = None
    probe_expect_rc: int = 0
    probe_timeout: float = 300.0
    checks: list[str] | None = None
    workers: int | None = None
    lock_timeout: float = 60.0
    allow_unsafe_permissions: bool = False


def validate_params(p: DrillParams) -> str:
    """The repository path; every other option refused before anything is read (INVALID_ARGUMENT / INVALID_NAME)."""
    path = repo_mod.validate_repository_path(p.repository)
    if (p.name is None) == (p.uuid is None):
        raise VmBackupError("INVALID_ARGUMENT", "give exactly one of name and uuid (of the VM in the repository)")
    if p.name is not None and (not p.name or "\x00" in p.name):
        raise VmBackupError("INVALID_NAME", "name must be a non-empty string without NUL characters")
    if p.uuid is not None:
        p.uuid = _manifest.normalize_uuid(p.uuid)
    if p.as_of is not None:
        if p.point != "newest":
            raise VmBackupError("INVALID_ARGUMENT", "give at most one of point (other than newest) and as_of")
        parse_as_of(p.as_of)
    if p.point not in POINTS and not _manifest.is_set_id(p.point):
        raise VmBackupError("INVALID_ARGUMENT", f"point {p.point!r} is not newest, random or a set id (like 20261125T073512Z-001)")
    if p.network not in NETWORKS:
        raise VmBackupError("INVALID_ARGUMENT", f"network {p.network!r} is not one of {', '.join(NETWORKS)}")
    if not isinstance(p.isolated_network, str) or not p.isolated_network or re.search(r"[\x00-\x1f\x7f/]", p.isolated_network):
        raise VmBackupError("INVALID_ARGUMENT", f"isolated_network {p.isolated_network!r} is not a network name")
    if p.boot not in BOOTS:
        raise VmBackupError("INVALID_ARGUMENT", f"boot {p.boot!r} is not one of {', '.join(BOOTS)}")
    for what, value in (("boot_timeout", p.boot_timeout), ("probe_timeout", p.probe_timeout)):
        if not 1 <= value <= 86400:  # also False for NaN
            raise VmBackupError("INVALID_ARGUMENT", f"{what} must be between 1 and 86400 seconds, not {value!r}")
    if p.probe is not None:
        if not p.probe or not all(isinstance(a, str) for a in p.probe) or any("\x00" in a for a in p.probe):
            raise VmBackupError("INVALID_ARGUMENT", "probe must be a non-empty list of strings (argv, no shell), without NUL")
        if p.boot == "never":
            raise VmBackupError("INVALID_ARGUMENT", "probe runs in the booted guest; it cannot be combined with boot=never")
    if not 0 <= p.probe_expect_rc <= 255:
        raise VmBackupError("INVALID_ARGUMENT", f"probe_expect_rc must be between 0 and 255, not {p.probe_expect_rc}")
    if p.checks is not None:
        unknown = sorted(set(p.checks) - set(CHECKS))
        if unknown:
            raise VmBackupError("INVALID_ARGUMENT", f"checks {', '.join(unknown)} unknown; choose from {', '.join(CHECKS)}")
    if p.workers is not None and p.workers < 1:
        raise VmBackupError("INVALID_ARGUMENT", "workers must be 1 or more")
    validate_timeout(p.lock_timeout)
    disk_dir = p.disk_dir or DEFAULT_DISK_DIR
    try:
        p.disk_dir = repo_mod.validate_repository_path(disk_dir)
    except VmBackupError as exc:
        raise VmBackupError("PATH_ESCAPE", exc.msg.replace("repository", "disk_dir")) from None
    if re.search(r"[\x00-\x1f\x7f]", p.disk_dir) or p.disk_dir == "/":
        raise VmBackupError("PATH_ESCAPE", f"disk_dir {p.disk_dir!r} is not a usable directory")
    return path


# ---------------------------------------------------------------------------------- pure decisions
def choose_point(catalog: Catalog, point: str, as_of: str | None, rng: random.Random | None = None) -> tuple[str, str]:
    """(set id, how it was chosen) for ``point``: newest, random (among the readable sets), a set id, or as_of."""
    if not catalog.sets:
        raise VmBackupError("SET_NOT_FOUND", f"VM {catalog.vm_uuid} has no committed set")
    if as_of is not None:
        when = parse_as_of(as_of)
        found = catalog.as_of(when)
        if found is None:
            raise VmBackupError("SET_NOT_FOUND", f"VM {catalog.vm_uuid} has no committed set completed at or before "
                                f"{_manifest.iso(when)}")
        return found, f"as_of {_manifest.iso(when)}"
    if point == "newest":
        return catalog.latest(), "newest"
    if point == "random":
        readable = [sid for sid, e in catalog.sets.items() if e.manifest is not None] or list(catalog.sets)
        return (rng or random.SystemRandom()).choice(readable), f"random (one of {len(readable)})"
    if point not in catalog.sets:
        raise VmBackupError("SET_NOT_FOUND", f"set {point} is not a committed set of VM {catalog.vm_uuid}", set_id=point)
    return point, "set id"


def drill_name(vm_name: str, token: str) -> str:
    """``vmbackup-drill-<vm name made safe, at most 60 characters>-<token>``."""
    return f"{NAME_PREFIX}{_restore.safe_file_name(vm_name)[:60]}-{token}"


def planned_checks(p: DrillParams, has_agent: bool) -> list[str]:
    """The checks a drill runs, in order (``restore`` always; boot and its checks per ``boot``)."""
    chosen = set(p.checks if p.checks is not None else CHECKS)
    out = (["image"] if "image" in chosen else []) + ["restore"] + (["fsck"] if "fsck" in chosen else [])
    booting = p.boot == "always" or (p.boot == "auto" and has_agent)
    if booting:
        out.append("boot")
        if has_agent:
            out.append("agent")
            if "fsinfo" in chosen:
                out.append("fsinfo")
    if p.probe:
        out.append("probe")  # without a booted agent it is listed as skipped, with why: a probe never vanishes silently
    return out


def drill_xml(xml: str, *, network: str, isolated_network: str, workdir: str, marker: dict[str, str]) -> tuple[str, list[str]]:
    """The restored definition made safe to boot beside the original (pure): returns (xml, what was changed).

    - interfaces: removed (``none``) or each one on the libvirt network ``isolated_network`` (``isolated``);
    - host devices (``hostdev``, ``redirdev``, ``smartcard``) removed: the drill must not take a device from the original;
    - serial/console/channel/log outputs: a file goes into ``workdir``; a socket, tcp or udp backend becomes a pty;
      a unix channel loses an explicit path (libvirt makes its own), so nothing is shared with the original;
    - graphics: fixed ports become automatic;
    - autostart cannot be in the XML; the marker ``<vmbackupdrill:drill .../>`` is added to the metadata.
    """
    root = ET.fromstring(xml)
    changes: list[str] = []
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    for iface in list(devices.findall("interface")):
        mac = iface.find("mac")
        if network == "none":
            devices.remove(iface)
            changes.append(f"interface {iface.get('type')} removed")
            continue
        model = iface.find("model")
        for child in list(iface):
            devices_keep = child is mac or child is model
            if not devices_keep:
                iface.remove(child)
        iface.attrib.clear()
        iface.set("type", "network")
        iface.insert(0, ET.Element("source", network=isolated_network))
        changes.append(f"interface on network {isolated_network}")
    for tag in ("hostdev", "redirdev", "smartcard"):
        for dev in list(devices.findall(tag)):
            devices.remove(dev)
            changes.append(f"{tag} removed")
    n = 0
    for tag in ("serial", "console", "parallel", "channel"):
        for dev in devices.findall(tag):
            kind = dev.get("type")
            source = dev.find("source")
            target = dev.find("target")
            if kind == "file":
                # A console on the first serial port is that port (libvirt wants the same file for both).
                if tag == "console" and (target is None or target.get("type") in (None, "serial")):
                    path = os.path.join(workdir, "serial0.log")
                elif tag == "serial" and (target is None or target.get("port") in (None, "0")):
                    path = os.path.join(workdir, "serial0.log")
                else:
                    n += 1
                    path = os.path.join(workdir, f"{tag}{n}.log")
                if source is None:
                    source = ET.SubElement(dev, "source")
                source.attrib.clear()
                source.set("path", path)
                changes.append(f"{tag} into {path}")
            elif kind == "unix" and tag == "channel":
                if source is not None and source.get("path"):
                    del source.attrib["path"]
                    what = target.get("name") if target is not None else "?"
                    changes.append(f"channel {what}: a socket of its own")
            elif kind in ("unix", "tcp", "udp", "dev", "pipe", "nmdm", "spiceport"):
                dev.set("type", "pty")
                for child in list(dev):
                    if child.tag in ("source", "protocol"):
                        dev.remove(child)
                changes.append(f"{tag} {kind} became a pty")
            log = dev.find("log")
            if log is not None:
                n += 1
                log.set("file", os.path.join(workdir, f"{tag}{n}-log.log"))
                log.attrib.pop("append", None)
    for graphics in devices.findall("graphics"):
        if graphics.get("port") not in (None, "-1") or graphics.get("autoport") == "no":
            for attr in ("port", "tlsPort", "websocket"):
                graphics.attrib.pop(attr, None)
            graphics.set("autoport", "yes")
            changes.append(f"graphics {graphics.get('type')}: automatic port")
        if graphics.get("socket"):
            del graphics.attrib["socket"]
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    for old in meta.findall(f"{{{DRILL_NS}}}drill"):
        meta.remove(old)
    ET.SubElement(meta, f"{{{DRILL_NS}}}drill", {k: str(v) for k, v in sorted(marker.items())})
    return ET.tostring(root, encoding="unicode"), changes


def drill_marker(xml: str) -> dict[str, str] | None:
    """The drill marker in a domain's XML, or None."""
    try:
        el = ET.fromstring(xml).find(f"./metadata/{{{DRILL_NS}}}drill")
    except ET.ParseError:
        return None
    return dict(el.attrib) if el is not None else None


def marker_alive(marker: dict[str, t.Any]) -> bool:
    """Whether the drill that made a marker (or journal) may still run on this host."""
    try:
        pid = int(marker.get("pid"))
        started = int(marker.get("started")) if marker.get("started") not in (None, "") else None
    except (TypeError, ValueError):
        return False
    return _restore._pid_alive(pid, started)  # pylint: disable=protected-access


def ext_filesystems(path: str) -> list[dict[str, t.Any]]:
    """ext2/3/4 file systems on a raw image: the whole disk, or each primary partition of an MBR or
    GPT table (logical partitions and LVM are not looked into). Each: offset, where, needs_recovery."""
    found = []
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as fh:
        def read(offset: int, length: int) -> bytes:
            fh.seek(offset)
            return fh.read(length)

        candidates = [(0, "whole disk")] + [(off, f"partition {i}") for i, off in partition_offsets(read)]
        for offset, where in candidates:
            sb = read(offset + 1024, 1024)
            if len(sb) == 1024 and sb[56:58] == _EXT_MAGIC:
                incompat = struct.unpack_from("<I", sb, 0x60)[0]
                label = sb[0x78:0x88].split(b"\0", 1)[0].decode("utf-8", "replace")
                found.append({"offset": offset, "where": where, "label": label,
                              "needs_recovery": bool(incompat & _EXT_INCOMPAT_RECOVER)})
    return found


def partition_offsets(read: t.Callable[[int, int], bytes], sector: int = 512) -> list[tuple[int, int]]:
    """(number, byte offset) of the primary partitions of an MBR, or of a GPT behind a protective MBR (pure over ``read``)."""
    mbr = read(0, 512)
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        return []
    entries = [struct.unpack_from("<BBBBBBBBII", mbr, 446 + 16 * i) for i in range(4)]
    if any(e[4] == 0xEE for e in entries):
        header = read(sector, 92)
        if header[:8] != b"EFI PART":
            return []
        first_lba, count, size = struct.unpack_from("<QII", header, 72)
        if not 128 <= size <= 4096 or count > 1024:
            return []
        table = read(first_lba * sector, count * size)
        out = []
        for i in range(count):
            entry = table[i * size:(i + 1) * size]
            if len(entry) < 48 or entry[:16] == b"\0" * 16:
                continue
            start = struct.unpack_from("<Q", entry, 32)[0]
            out.append((i + 1, start * sector))
        return out
    return [(i + 1, e[8] * sector) for i, e in enumerate(entries) if e[4] not in _MBR_SKIP and e[8] > 0]


def _tail(text: str, limit: int = DETAIL_MAX) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else "..." + text[-limit:]


@dataclasses.dataclass
class Check:
    name: str
    outcome: str = "skipped"  # ok | failed | error | skipped
    seconds: float = 0.0
    detail: str = ""
    error_code: str | None = None
    data: dict[str, t.Any] = dataclasses.field(default_factory=dict)

    def public(self) -> dict[str, t.Any]:
        out = {"name": self.name, "outcome": self.outcome, "seconds": round(self.seconds, 3), "detail": self.detail,
               "error_code": self.error_code}
        out.update(self.data)
        return out


class CheckFailed(Exception):
    """A check found the point wanting (outcome failed); ``code`` is the underlying error code."""

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code


@dataclasses.dataclass
class DrillContext:
    """What the checks of one drill share."""

    catalog: Catalog
    point: str
    name: str
    workdir: str
    marker: dict[str, str]
    checks: list[str]
    disks: list[dict[str, t.Any]] = dataclasses.field(default_factory=list)
    restore: dict[str, t.Any] | None = None


# ---------------------------------------------------------------------------------- the backend
class Driller(Backend):
    """One drill of one point of one VM on this host."""

    cancel_outcome = "the drill's domain and files were removed, and the proof records the cancel"

    def __init__(self, params: t.Any, run: t.Any, qemu_img_path: str, check_mode: bool,
                 log: t.Callable[[str], None] | None = None) -> None:
        super().__init__(params, run, qemu_img_path, check_mode, log)
        self._run = run
        self._qemu_img_path = qemu_img_path
        self.host = socket.gethostname()
        self.phases = Phases()

    # ------------------------------------------------------------------ entry point
    def run(self) -> dict[str, t.Any]:
        started = time.monotonic()
        path = validate_params(self.p)
        repo = open_for_reading(path, self.p.allow_unsafe_permissions)
        catalogs = resolve_vms(repo, self.p.name, self.p.uuid)
        if len(catalogs) > 1:
            raise VmBackupError("INVALID_ARGUMENT", f"several VMs named {self.p.name!r} have sets in the repository "
                                f"({', '.join(c.vm_uuid for c in catalogs)}); give uuid")
        catalog = catalogs[0]
        point, how = choose_point(catalog, self.p.point, self.p.as_of)
        manifest = catalog.sets[point].manifest or {}
        vm_name = (manifest.get("vm") or {}).get("name") or catalog.vm_name() or catalog.vm_uuid
        token = uuid_mod.uuid4().hex[:10]
        name = drill_name(vm_name, token)
        disk_dir = self.p.disk_dir
        workdir = os.path.join(disk_dir, name)
        with lv.session(self.p.uri) as conn:
            self._check_disk_dir(disk_dir)
            self._check_network(conn)
            saved = self._saved_xml(catalog, point)
            has_agent = saved is not None and _has_agent_channel(saved)
            checks = planned_checks(self.p, has_agent)
            base = {
                "set_id": point, "point": how, "vm": {"name": vm_name, "uuid": catalog.vm_uuid}, "host": self.host,
                "drill_name": name, "network": self.p.network if self.p.network == "none" else f"isolated ({self.p.isolated_network})",
                "has_agent_channel": has_agent, "planned_checks": checks,
            }
            if self.check_mode:
                leftovers = self._leftovers(conn, disk_dir)
                self.phases.add("plan", time.monotonic() - started)
                return dict(base, changed=True, outcome=None, timings=self.phases.public(), checks=[{"name": c, "outcome": "planned"} for c in checks],
                            failed_check=None, proof=None, cleanup=None, cleaned_up=[f"would remove {x['what']}" for x in leftovers],
                            duration_s=round(time.monotonic() - started, 3),
                            msg=f"would drill point {point} ({how}) of {vm_name} as {NAME_PREFIX}...: {', '.join(checks)}")
            self._clean_leftovers(conn, disk_dir)
            return self._drill(repo, catalog, point, base, checks, token, name, disk_dir, workdir, started)

    # ------------------------------------------------------------------ preflight
    def _check_disk_dir(self, disk_dir: str) -> None:
        """disk_dir must be a directory only root controls (it is created, 0711, when missing and its parent is such)."""
        parent = os.path.dirname(disk_dir)
        repo_mod.check_trusted_path(parent, "the parent of disk_dir")
        if not os.path.lexists(disk_dir):
            if self.check_mode:
                return
            repo_mod.makedir(disk_dir, 0o711)
        repo_mod.check_trusted_path(disk_dir, "disk_dir")
        if not os.path.isdir(disk_dir):
            raise VmBackupError("PATH_ESCAPE", f"disk_dir {disk_dir} is not a directory")

    def _check_network(self, conn) -> None:
        """``isolated``: the network exists, is active and forwards nowhere (else INVALID_ARGUMENT: a drill
        of a copy of a production VM, same addresses, must not reach the production network)."""
        if self.p.network != "isolated":
            return
        try:
            net = conn.networkLookupByName(self.p.isolated_network)
        except lv.LibvirtError:
            raise VmBackupError("INVALID_ARGUMENT", f"network=isolated: libvirt network {self.p.isolated_network!r} is not "
                                "defined on this host") from None
        if not net.isActive():
            raise VmBackupError("INVALID_ARGUMENT", f"network=isolated: libvirt network {self.p.isolated_network!r} is not active")
        forward = ET.fromstring(net.XMLDesc(0)).find("forward")
        if forward is not None:
            raise VmBackupError("INVALID_ARGUMENT", f"network=isolated: libvirt network {self.p.isolated_network!r} forwards "
                                f"(<forward mode='{forward.get('mode') or 'nat'}'>); a drill needs a network without <forward>, "
                                "so that a copy of a VM (same addresses) cannot reach the network the VM is on")

    def _saved_xml(self, catalog: Catalog, point: str) -> str | None:
        try:
            return catalog.repo.read_set_file(catalog.vm_uuid, point, "domain.xml").decode("utf-8", "replace")
        except (OSError, VmBackupError):
            return None  # the restore check reports it

    # ------------------------------------------------------------------ the drill
    def _drill(self, repo, catalog: Catalog, point: str, base: dict[str, t.Any], checks: list[str], token: str, name: str,
               disk_dir: str, workdir: str, started: float) -> dict[str, t.Any]:
        when = _manifest.iso(_manifest.utcnow())
        results = [Check(c) for c in checks]
        journal = os.path.join(disk_dir, f"{JOURNAL_PREFIX}{token}.json")
        proc = _restore._proc_stat(os.getpid())  # pylint: disable=protected-access
        marker = {"token": token, "host": self.host, "pid": str(os.getpid()), "started": str(proc[1]) if proc else "",
                  "vm_uuid": catalog.vm_uuid, "set_id": point, "dir": workdir, "journal": journal, "created": when}
        ctx = DrillContext(catalog, point, name, workdir, marker, checks)
        cancelled: Cancelled | None = None
        error: VmBackupError | None = None
        current: Check | None = None
        # Before the drill proper: trust checks, catalog, point, network, leftovers of earlier drills.
        self.phases.add("plan", time.monotonic() - started)
        try:
            # The journal first: whatever follows, a killed run leaves something the next drill recognises.
            repo_mod.write_file_atomic(journal, _manifest.dumps(dict(marker, format=JOURNAL_FORMAT, version=JOURNAL_VERSION,
                                                                     name=name)), repo_mod.FILE_MODE)
            os.close(_restore.open_dir(workdir, create_mode=0o711))  # QEMU must traverse it to the images
            for check in results:
                current = check
                t0 = time.monotonic()
                try:
                    getattr(self, f"_check_{check.name}")(check, ctx)
                except CheckFailed as exc:
                    check.outcome, check.detail, check.error_code = "failed", exc.detail, exc.code
                except VmBackupError as exc:
                    check.outcome = "error" if exc.error_code in INFRA_CODES else "failed"
                    check.detail, check.error_code = _tail(exc.msg), exc.error_code
                finally:
                    check.seconds = time.monotonic() - t0
                    self.phases.add(check.name, check.seconds)
                if check.outcome in ("failed", "error"):
                    break
            current = None
        except Cancelled as exc:
            cancelled = exc
            if current is not None:
                current.outcome, current.detail, current.error_code = "error", f"cancelled by {exc.signal_name}", "CANCELLED"
        except VmBackupError as exc:
            error = exc
        except OSError as exc:
            error = VmBackupError("IO_ERROR", f"I/O error on {exc.filename or disk_dir}: {exc.strerror or exc}")
        finally:
            # Cleanup and proof are not interrupted by a (further) cancel: it is delivered once they are done.
            blocked = _block_signals()
            try:
                with self.phases.phase("cleanup"):
                    cleanup = self._cleanup(name, token, workdir, journal)
                failed = next((c for c in results if c.outcome in ("failed", "error")), None)
                for check in results:
                    if check.outcome == "skipped" and not check.detail:
                        check.detail = "not reached"
                if failed is not None:
                    outcome = failed.outcome
                elif error is not None or cancelled is not None:
                    outcome = "error"
                else:
                    outcome = "ok"
                if failed is not None:
                    why = (failed.error_code, failed.detail)
                elif error is not None:
                    why = (error.error_code, error.msg)
                elif cancelled is not None:
                    why = ("CANCELLED", f"cancelled by {cancelled.signal_name}")
                else:
                    why = (None, None)
                proof = {
                    "format": PROOF_FORMAT,
                    "format_version": PROOF_VERSION,
                    "set_id": point,
                    "vm": base["vm"],
                    "manifest_sha256": catalog.sets[point].manifest_sha256,
                    "host": self.host,
                    "point": base["point"],
                    "drill_name": name,
                    "network": base["network"],
                    "started": when,
                    "completed": _manifest.iso(_manifest.utcnow()),
                    "duration_s": round(time.monotonic() - started, 3),
                    "outcome": outcome,
                    "failed_check": failed.name if failed is not None else None,
                    "error_code": why[0],
                    "msg": why[1],
                    "checks": [c.public() for c in results],
                    "cleanup": cleanup,
                }
                proof_path = self._write_proof(repo, catalog, point, proof)
            finally:
                _unblock_signals(blocked)
        result = dict(base, changed=True, outcome=outcome, checks=proof["checks"], failed_check=proof["failed_check"],
                      proof=proof_path, proof_content=proof, cleanup=cleanup, cleaned_up=self.cleaned,
                      duration_s=proof["duration_s"], restore=ctx.restore, timings=self.phases.public())
        if cancelled is not None:
            raise cancelled
        details = {k: v for k, v in result.items() if k != "msg"}  # changed: the proof was written
        who = f"point {point} of {base['vm']['name']}"
        if outcome == "failed":
            raise VmBackupError("DRILL_FAILED", f"drill of {who} failed at check {failed.name}: {failed.detail} (proof "
                                f"{proof_path}; the set is untouched)", cause_code=failed.error_code, **details)
        if outcome == "error":
            code = (failed.error_code if failed is not None else None) or (error.error_code if error else "IO_ERROR")
            raise VmBackupError(code, f"drill of {who} could not run (at {failed.name if failed else 'setup'}): {proof['msg']}",
                                cause_code=code, **details)
        if not cleanup["complete"]:
            raise VmBackupError("DRILL_LEFTOVER", f"drill of {who} passed, but its cleanup is incomplete "
                                f"({'; '.join(cleanup['problems'])}); the next drill on this host removes what is left",
                                cause_code=None, **details)
        result["msg"] = (f"drilled {who} ({base['point']}) on {self.host}: "
                         + ", ".join(f"{c['name']} {c['outcome']}" for c in proof["checks"]) + f"; proof {proof_path}")
        return result

    # ------------------------------------------------------------------ checks
    def _check_image(self, check: Check, ctx: DrillContext) -> None:
        """qemu-img check of every qcow2 image the point's restore reads (the repository's files, read only)."""
        catalog, point = ctx.catalog, ctx.point
        catalog.sets_of_chain(point)  # CHAIN_BROKEN / REPOSITORY_FORMAT: the point cannot be restored
        checked = 0
        for disk in catalog.sets[point].manifest["disks"]:
            for sid, entry in catalog.disk_chain(point, disk["target"]):
                path = os.path.join(catalog.repo.set_dir(catalog.vm_uuid, sid), entry["file"])
                rc, out, err = self.qemu_img.run_raw(["check", "-f", "qcow2", "--output=json", path])
                if rc not in (0, 3):  # 3: leaked clusters only, every cluster still reads
                    try:
                        data = json.loads(out)
                        why = f"{data.get('corruptions', '?')} corruptions, {data.get('check-errors', '?')} check errors"
                    except ValueError:
                        why = _tail(err or out, 300) or f"rc={rc}"
                    raise CheckFailed(f"qemu-img check of {entry['file']} of set {sid} (disk {disk['target']}) failed: {why}",
                                      "IMAGE_INVALID")
                checked += 1
        check.outcome = "ok"
        check.detail = f"{checked} image(s) of the point's chains pass qemu-img check"

    def _check_restore(self, check: Check, ctx: DrillContext) -> None:
        """The point restored by restore's own backend: checksums verified, nothing defined unless all matched."""
        params = _restore.RestoreParams(
            repository=ctx.catalog.repo.path, uuid=ctx.catalog.vm_uuid, set_id=ctx.point, restore_as=ctx.name,
            disk_dir=ctx.workdir, disk_format="raw", start=False, workers=self.p.workers, uri=self.p.uri,
            lock_timeout=self.p.lock_timeout, allow_unsafe_permissions=self.p.allow_unsafe_permissions)
        # Its progress lines go to this module's log (a drill's restore is its long part).
        restorer = _restore.Restorer(params, run=self._run, qemu_img_path=self._qemu_img_path, check_mode=False, log=self.log)
        changes: list[str] = []

        def hook(xml: str) -> str:
            out, done = drill_xml(xml, network=self.p.network, isolated_network=self.p.isolated_network, workdir=ctx.workdir,
                                  marker=ctx.marker)
            changes.extend(done)
            return out

        restorer.xml_hook = hook
        restorer.drop_target_locks = True  # the throwaway name is never used again: no lock file left in /run/vmbackup
        try:
            res = restorer.run()
        finally:
            self.warnings.extend(restorer.warnings)
            self.cleaned.extend(restorer.cleaned)
        ctx.restore = {k: res.get(k) for k in ("vm", "chain", "disks", "bytes_read", "bytes_written", "verify_s", "convert_s",
                                               "dropped_disks", "timings")}
        ctx.disks = res["disks"]
        check.outcome = "ok"
        check.detail = (f"{len(res['disks'])} disk(s) restored, {res['bytes_read']} bytes read, every checksum matched"
                        + (f"; {', '.join(changes)}" if changes else ""))
        check.data = {"bytes_read": res["bytes_read"], "chain": res["chain"]}

    def _check_fsck(self, check: Check, ctx: DrillContext) -> None:
        """e2fsck -fn of every ext2/3/4 file system on the restored (raw) images, before anything boots."""
        e2fsck = _which("e2fsck")
        if e2fsck is None:
            check.outcome, check.detail = "skipped", "e2fsck is not installed (package e2fsprogs)"
            self.warnings.append("the fsck check was skipped: e2fsck is not installed (package e2fsprogs)")
            return
        done, notes = [], []
        for disk in ctx.disks:
            for fs in ext_filesystems(disk["path"]):
                spec = f"{disk['path']}?offset={fs['offset']}" if fs["offset"] else disk["path"]
                where = f"{disk['target']} {fs['where']}" + (f" ({fs['label']})" if fs["label"] else "")
                if fs["needs_recovery"]:
                    # A crash-consistent point: the kernel would replay the journal at mount; so do we, on the copy.
                    rc, out, err = self._run([e2fsck, "-y", "-E", "journal_only", spec])
                    if rc not in (0, 1):
                        raise CheckFailed(f"the journal of {where} cannot be replayed (e2fsck rc={rc}): {_tail(out + err, 800)}",
                                          "IMAGE_INVALID")
                    notes.append(f"{where}: journal replayed first")
                rc, out, err = self._run([e2fsck, "-fn", spec])
                if rc != 0:
                    raise CheckFailed(f"e2fsck -fn of {where} found errors (rc={rc}): {_tail(out + err, 1500)}", "IMAGE_INVALID")
                done.append(where)
        if not done:
            check.outcome = "skipped"
            check.detail = "no ext2/3/4 file system on the restored disks (whole disk or primary partitions)"
            return
        check.outcome = "ok"
        check.detail = f"e2fsck -fn clean: {', '.join(done)}" + (f" ({'; '.join(notes)})" if notes else "")
        check.data = {"filesystems": done}

    def _domain(self, conn, ctx: DrillContext):
        """The drill's own domain (by name, proven by its marker's token)."""
        dom = lv.find_domain(conn, ctx.name)
        if dom is None:
            raise VmBackupError("RESTORE_FAILED", f"the drill's domain {ctx.name} is not defined")
        marker = drill_marker(lv.domain_xml(dom, inactive=True))
        if not marker or marker.get("token") != ctx.marker["token"]:
            raise VmBackupError("RESTORE_FAILED", f"domain {ctx.name} does not carry this drill's marker")
        return dom

    def _check_boot(self, check: Check, ctx: DrillContext) -> None:
        with lv.session(self.p.uri) as conn:
            dom = self._domain(conn, ctx)
            try:
                dom.create()
            except lv.LibvirtError as exc:
                _unless_libvirt_gone(conn, exc.get_error_message())
                raise CheckFailed(f"the restored VM did not start: {exc.get_error_message()}", "RESTORE_FAILED") from None
            if "agent" in ctx.checks:
                check.outcome, check.detail = "ok", "started"
                return
            # No agent to ask: the VM must at least stay up for a while.
            settle = min(SETTLE_SECONDS, self.p.boot_timeout)
            t0 = time.monotonic()
            while time.monotonic() - t0 < settle:
                if not dom.isActive():
                    raise CheckFailed(f"the restored VM stopped {time.monotonic() - t0:.1f}s after it started"
                                      + _console(ctx.workdir), "RESTORE_FAILED")
                time.sleep(0.5)
            check.outcome, check.detail = "ok", f"running {settle:g}s after start (no agent channel: nothing more to ask)"

    def _check_agent(self, check: Check, ctx: DrillContext) -> None:
        with lv.session(self.p.uri) as conn:
            dom = self._domain(conn, ctx)
            try:
                seconds = _guest.wait_agent(dom, self.p.boot_timeout)
            except (VmBackupError, lv.LibvirtError) as exc:
                _unless_libvirt_gone(conn, str(getattr(exc, "msg", exc)))
                now = lv.domain_state(dom) if _exists(dom) else "gone"
                raise CheckFailed(f"{getattr(exc, 'msg', exc)} (domain {now})" + _console(ctx.workdir),
                                  getattr(exc, "error_code", "AGENT_UNAVAILABLE")) from None
            check.outcome = "ok"
            check.detail = f"the guest agent answered {seconds:.1f}s after it was first asked"
            check.data = {"agent_s": round(seconds, 3)}

    def _check_fsinfo(self, check: Check, ctx: DrillContext) -> None:
        with lv.session(self.p.uri) as conn:
            dom = self._domain(conn, ctx)
            try:
                info = _guest.fsinfo(dom)
            except VmBackupError as exc:
                _unless_libvirt_gone(conn, exc.msg)
                raise CheckFailed(f"guest-get-fsinfo failed: {exc.msg}", exc.error_code) from None
            if not info:
                raise CheckFailed("the guest reports no mounted file system (guest-get-fsinfo is empty)", None)
            shown = [f"{f.get('mountpoint')} ({f.get('type')})" for f in info]
            check.outcome = "ok"
            check.detail = f"{len(info)} file system(s) mounted in the guest: {', '.join(shown)}"
            check.data = {"filesystems": info}

    def _check_probe(self, check: Check, ctx: DrillContext) -> None:
        if "agent" not in ctx.checks:
            check.outcome, check.detail = "skipped", "not run: the VM's definition has no guest agent channel"
            self.warnings.append(f"the probe was not run: {ctx.catalog.vm_name()} has no guest agent channel")
            return
        with lv.session(self.p.uri) as conn:
            dom = self._domain(conn, ctx)
            try:
                out = _guest.exec_command(dom, list(self.p.probe), self.p.probe_timeout)
            except VmBackupError as exc:
                _unless_libvirt_gone(conn, exc.msg)
                raise CheckFailed(f"the probe {self.p.probe!r} could not run: {exc.msg}", exc.error_code) from None
            rc = out.get("rc")
            text = {k: _tail(_text(out.get(k)), 500) for k in ("stdout", "stderr")}
            check.data = {"rc": rc, **text}
            if rc is None:
                raise CheckFailed(f"the probe {self.p.probe!r} did not run to its end: {out.get('error')}", None)
            if rc != self.p.probe_expect_rc:
                raise CheckFailed(f"the probe {self.p.probe!r} exited {rc}, expected {self.p.probe_expect_rc}: "
                                  f"{text['stderr'] or text['stdout']}", None)
            check.outcome = "ok"
            check.detail = f"the probe {self.p.probe!r} exited {rc} in {float(out.get('seconds') or 0):.1f}s"

    # ------------------------------------------------------------------ cleanup
    def _cleanup(self, name: str, token: str, workdir: str, journal: str) -> dict[str, t.Any]:
        """Destroy and undefine the drill's domain, remove its directory and journal. Never raises."""
        t0 = time.monotonic()
        removed: list[str] = []
        problems: list[str] = []
        try:
            with lv.session(self.p.uri) as conn:
                dom = lv.find_domain(conn, name)
                if dom is not None:
                    marker = drill_marker(lv.domain_xml(dom, inactive=True))
                    if marker and marker.get("token") == token:
                        _remove_domain(dom)
                        removed.append(f"domain {name}")
                    else:
                        problems.append(f"domain {name} does not carry this drill's marker; it is kept")
                problems.extend(self._remove_workdir(conn, workdir, removed))
        except (VmBackupError, lv.LibvirtError, OSError) as exc:
            problems.append(f"cleanup failed: {getattr(exc, 'msg', None) or exc}")
        if not problems:
            if _restore.remove_path(journal)[0]:
                removed.append(f"journal {journal}")
        return {"complete": not problems, "removed": removed, "problems": problems, "seconds": round(time.monotonic() - t0, 3)}

    def _remove_workdir(self, conn, workdir: str, removed: list[str]) -> list[str]:
        """Remove the drill directory, unless a domain uses a file in it (then it is kept: a problem)."""
        if not os.path.lexists(workdir):
            return []
        restorer = _restore.Restorer(_restore.RestoreParams(repository="/", uri=self.p.uri), run=self._run,
                                     qemu_img_path=self._qemu_img_path, check_mode=False)
        # A restore killed in the directory left hidden partial files and its journal; NVRAM/TPM partials outside it too.
        restorer._clean_stale(conn, workdir)  # pylint: disable=protected-access
        self.warnings.extend(restorer.warnings)
        self.cleaned.extend(restorer.cleaned)
        in_use = restorer._in_use(conn)  # pylint: disable=protected-access
        try:
            names = os.listdir(workdir)
        except OSError as exc:
            return [f"cannot list {workdir}: {exc.strerror}"]
        # The drill directory is the drill's own (root-only, named by its token, its files written by
        # the drill): a domain keeps a file in it by naming it, not by an unreadable backing chain of
        # some other VM of the host - that would make one broken image elsewhere leave every drill's
        # restored copy behind.
        for entry in names:
            path = os.path.join(workdir, entry)
            reason = in_use.reason(path, os.lstat(path), ignore_unknown=True)
            if reason is not None:
                return [f"{path} is in use ({reason}); {workdir} is kept"]
        if in_use.unknown:
            self.warnings.append(f"removed {workdir} although the backing chain of {in_use.unknown[0]} could not be read "
                                 "(no domain names a file of the drill directory)")
        repo_mod.remove_tree(workdir)
        removed.append(f"directory {workdir}" + (f" ({len(names)} files)" if names else ""))
        return []

    # ------------------------------------------------------------------ leftovers of killed drills
    def _leftovers(self, conn, disk_dir: str) -> list[dict[str, t.Any]]:
        """Drill domains of this host whose process is gone, and stale drill journals in ``disk_dir``."""
        found: list[dict[str, t.Any]] = []
        seen_tokens = set()
        for dom in conn.listAllDomains(0):
            try:
                marker = drill_marker(lv.domain_xml(dom, inactive=True))
                name = dom.name()
            except lv.LibvirtError:
                continue
            if not marker or marker.get("host") != self.host or not _DRILL_NAME.match(name) or marker_alive(marker):
                continue
            seen_tokens.add(marker.get("token"))
            found.append({"kind": "domain", "dom": dom, "name": name, "marker": marker,
                          "what": f"domain {name} of a drill that is gone (pid {marker.get('pid')})"})
        for path, data in self._stale_journals(disk_dir):
            found.append({"kind": "journal", "path": path, "data": data,
                          "what": f"drill directory {data['dir']} and journal {path} of a drill that is gone (pid {data.get('pid')})"})
        return found

    def _stale_journals(self, disk_dir: str) -> list[tuple[str, dict[str, t.Any]]]:
        """Trusted drill journals (this user's, regular, private) of dead drills of this host, consistent with their names."""
        out: list[tuple[str, dict[str, t.Any]]] = []
        try:
            fd = _restore.open_dir(disk_dir)
        except (OSError, VmBackupError):
            return out
        try:
            for entry in sorted(os.listdir(fd)):
                match = _JOURNAL_NAME.match(entry)
                if not match:
                    continue
                try:
                    jfd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
                except OSError:
                    continue
                try:
                    st = os.fstat(jfd)
                    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                        self.warnings.append(f"drill journal {os.path.join(disk_dir, entry)} is ignored: not a private file of this user")
                        continue
                    raw = os.read(jfd, 1 << 20)
                finally:
                    os.close(jfd)
                try:
                    data = json.loads(raw.decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    continue
                token = match.group("token")
                if not isinstance(data, dict) or data.get("format") != JOURNAL_FORMAT or data.get("token") != token:
                    continue
                name = data.get("name")
                if not isinstance(name, str) or not _DRILL_NAME.match(name) or _DRILL_NAME.match(name).group("token") != token \
                        or data.get("dir") != os.path.join(disk_dir, name) or data.get("host") != self.host:
                    continue
                if not marker_alive(data):
                    out.append((os.path.join(disk_dir, entry), data))
        finally:
            os.close(fd)
        return out

    def _clean_leftovers(self, conn, disk_dir: str) -> None:
        for item in self._leftovers(conn, disk_dir):
            try:
                if item["kind"] == "domain":
                    _remove_domain(item["dom"])
                    self.cleaned.append(f"removed {item['what']}")
                    marker = item["marker"]
                    workdir, journal = marker.get("dir", ""), marker.get("journal", "")
                    # The marker's directory only when it is the drill's own (its name) beside its journal.
                    if os.path.basename(workdir) == item["name"] and journal == os.path.join(
                            os.path.dirname(workdir), f"{JOURNAL_PREFIX}{marker.get('token')}.json") \
                            and os.path.dirname(workdir) != disk_dir:
                        repo_mod.check_trusted_path(os.path.dirname(workdir), "a killed drill's disk_dir")
                        self._clean_dir(conn, workdir, journal)
                else:
                    self._clean_dir(conn, item["data"]["dir"], item["path"])
            except (VmBackupError, lv.LibvirtError, OSError) as exc:
                self.warnings.append(f"could not remove {item['what']}: {getattr(exc, 'msg', None) or exc}")

    def _clean_dir(self, conn, workdir: str, journal: str) -> None:
        removed: list[str] = []
        problems = self._remove_workdir(conn, workdir, removed)
        for gone in removed:
            self.cleaned.append(f"removed {gone} of a drill that is gone")
        if problems:
            self.warnings.extend(problems)
            return
        # The killed drill's restore locks: its name had a token of its own, nobody else can wait on them.
        for lock in _restore.target_lock_paths(os.path.basename(workdir), workdir):
            if _restore.remove_path(lock)[0]:
                self.cleaned.append(f"removed the restore lock file {lock} of a drill that is gone")
        if _restore.remove_path(journal)[0]:
            self.cleaned.append(f"removed the drill journal {journal} of a drill that is gone")

    # ------------------------------------------------------------------ the proof
    def _write_proof(self, repo, catalog: Catalog, point: str, proof: dict[str, t.Any]) -> str:
        """``sets/<set-id>.drill.json``, as verify writes its verdict: under the VM's shared lock, only while
        the set is still committed, through descriptors (no link followed), atomically, mode 0600."""
        path = os.path.join(repo.sets_dir(catalog.vm_uuid), f"{point}{PROOF_SUFFIX}")
        lock = VmLock(repo.lock_path(catalog.vm_uuid), self.p.lock_timeout, "drill", shared=True)
        lock.acquire()
        try:
            if point not in repo.set_ids(catalog.vm_uuid):
                self.warnings.append(f"set {point} was removed while it was drilled (a prune); no proof is written")
                return None
            repo_mod.write_file_atomic(path, _manifest.dumps(proof), repo_mod.FILE_MODE)
        finally:
            lock.release()
        return path


def _remove_domain(dom) -> None:
    """Destroy and undefine a drill domain with its NVRAM, TPM state and any checkpoint/snapshot metadata."""
    if dom.isActive():
        try:
            dom.destroy()
        except lv.LibvirtError:
            if dom.isActive():
                raise
    flags = 0
    for flag in ("VIR_DOMAIN_UNDEFINE_NVRAM", "VIR_DOMAIN_UNDEFINE_TPM", "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA",
                 "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA", "VIR_DOMAIN_UNDEFINE_MANAGED_SAVE"):
        flags |= getattr(lv.libvirt, flag, 0)
    dom.undefineFlags(flags)


def _unless_libvirt_gone(conn, what: str) -> None:
    """A failed call is the restored VM's fault only while libvirt itself still answers; else the
    drill could not run (LIBVIRT_UNAVAILABLE, outcome error), which says nothing about the set."""
    try:
        conn.getLibVersion()
    except lv.LibvirtError:
        raise VmBackupError("LIBVIRT_UNAVAILABLE", f"libvirt stopped answering during the drill ({what})") from None


def _exists(dom) -> bool:
    try:
        dom.info()
        return True
    except lv.LibvirtError:
        return False


def _has_agent_channel(xml: str) -> bool:
    return _guest.has_agent_channel(xml)


def _block_signals() -> set[int]:
    """Hold back the cancel signals (delivered when unblocked): cleanup and proof are not cut short."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, CANCEL_SIGNALS)


def _unblock_signals(previous: set[int]) -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _which(program: str) -> str | None:
    for directory in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        path = os.path.join(directory, program)
        if os.access(path, os.X_OK):
            return path
    return None


def _text(value: t.Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


def _console(workdir: str) -> str:
    """The tail of the drill's serial console, for a failed boot or agent check."""
    try:
        names = sorted(n for n in os.listdir(workdir) if n.startswith("serial") and n.endswith(".log"))
        if not names:
            return ""
        with open(os.open(os.path.join(workdir, names[0]), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 600))
            return "; console: " + _tail(fh.read().decode("utf-8", "replace"), 600)
    except OSError:
        return ""
