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
import dataclasses
import json
import os
import re
import shutil
import socket
import time
import typing as t
import uuid as uuid_mod
import xml.etree.ElementTree as ET

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _libvirt as lv
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._catalog import Catalog, parse_as_of, resolve_vms
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._lock import VmLock
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import Backend
from ansible_collections.vmbackup.libvirt.plugins.module_utils._qemu_img import chain_spec
from ansible_collections.vmbackup.libvirt.plugins.module_utils._verify import FileJob, check_file, open_for_reading

MIB = 1024 * 1024
METADATA_NS = "https://vmbackup.libvirt/xmlns/restore/1"
DEFAULT_DISK_DIR = "/var/lib/libvirt/images"
NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"
SWTPM_DIR = "/var/lib/libvirt/swtpm"
JOURNAL_PREFIX = ".vmbackup-restore-"
FORMATS = ("qcow2", "raw")
OVERWRITE = ("never", "replace")
SPACE_HEADROOM = 16 * MIB
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")

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

    @property
    def read_bytes(self) -> int:
        return sum(d.read_bytes for d in self.disks) + sum(j.size for j in self.side_jobs)


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
    if p.restore_as is not None and (not p.restore_as or "\x00" in p.restore_as or "/" in p.restore_as
                                     or p.restore_as in (".", "..") or len(p.restore_as) > 200):
        raise VmBackupError("INVALID_NAME", f"restore_as {p.restore_as!r} is not a usable domain name "
                            "(1-200 characters, no '/', not '.' or '..')")
    if p.overwrite not in OVERWRITE:
        raise VmBackupError("INVALID_ARGUMENT", f"overwrite {p.overwrite!r} is not one of {', '.join(OVERWRITE)}")
    if p.disk_format not in FORMATS:
        raise VmBackupError("INVALID_ARGUMENT", f"disk_format {p.disk_format!r} is not one of {', '.join(FORMATS)}")
    if p.disk_dir is not None and p.storage_pool is not None:
        raise VmBackupError("INVALID_ARGUMENT", "give at most one of disk_dir and storage_pool")
    if p.disk_dir is not None:
        try:
            p.disk_dir = repo_mod.validate_repository_path(p.disk_dir)
        except VmBackupError as exc:
            raise VmBackupError("PATH_ESCAPE", exc.msg.replace("repository", "disk_dir")) from None
    for old, new in (p.network_map or {}).items():
        if not isinstance(old, str) or not isinstance(new, str) or not old or not new:
            raise VmBackupError("INVALID_ARGUMENT", "network_map maps network or bridge names to names (strings)")
    if p.workers is not None and p.workers < 1:
        raise VmBackupError("INVALID_ARGUMENT", "workers must be 1 or more")
    if p.lock_timeout < 0:
        raise VmBackupError("INVALID_ARGUMENT", "lock_timeout must be 0 or more seconds")
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
) -> tuple[str, list[str], list[str]]:
    """The domain XML to define: the saved XML with a new name/UUID, disks pointing to the
    restored images, mapped networks, and, for a new identity, no MAC addresses (libvirt makes
    new ones). Pure apart from ``existing_file``. Returns (xml, dropped disk targets, warnings).

    A writable disk that was not backed up is dropped from a new identity: the copy must never
    share a disk with the original VM.
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
    for disk in list(devices.findall("disk")):
        target_el = disk.find("target")
        target = target_el.get("dev") if target_el is not None else None
        if target in disks:
            path, fmt = disks[target]
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
    for iface in devices.findall("interface"):
        if new_identity:
            for mac in iface.findall("mac"):
                iface.remove(mac)
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
    ET.SubElement(meta, f"{{{METADATA_NS}}}restore", {k: str(v) for k, v in sorted(metadata.items())})
    return ET.tostring(root, encoding="unicode"), dropped, warnings


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


# ---------------------------------------------------------------------------------- journal
def _pid_alive(pid: t.Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_journals(disk_dir: str, host: str | None = None) -> list[tuple[str, dict[str, t.Any]]]:
    """Journals of restores into ``disk_dir`` whose process is gone.

    With ``host``, only journals written on that host count: on a directory shared by several
    hosts (a netfs pool), another host's pid says nothing about its restore here.
    """
    found = []
    if not os.path.isdir(disk_dir):
        return found
    for entry in os.scandir(disk_dir):
        if entry.name.startswith(JOURNAL_PREFIX) and entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
            try:
                with open(entry.path, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (OSError, ValueError):
                continue
            if not isinstance(data, dict) or (host is not None and data.get("host", host) != host):
                continue
            if not _pid_alive(data.get("pid")):
                found.append((entry.path, data))
    return sorted(found)


class Restorer(Backend):
    """Restores one point of one VM."""

    # ------------------------------------------------------------------ entry point
    def run(self) -> dict[str, t.Any]:
        started = time.monotonic()
        repo = open_for_reading(validate_params(self.p), self.p.allow_unsafe_permissions)
        catalog = self._catalog(repo)
        point = self._point(catalog)
        with lv.session(self.p.uri) as conn:
            if not self.check_mode:
                # What a killed restore into this directory left must not block this one.
                self._clean_stale(conn, self._disk_dir(conn))
            plan = self._plan(conn, catalog, point)
            if plan is None:
                return self._unchanged(conn, catalog, point, started)
            self._check_space(plan)
            if self.check_mode:
                return self._result(plan, started, changed=True, check=True)
            lock = VmLock(repo.lock_path(catalog.vm_uuid), self.p.lock_timeout, "restore", shared=True)
            try:
                lock.acquire()
            except OSError as exc:  # a read-only repository without a lock file: nothing can prune it either
                lock = None
                self.warnings.append(f"restoring without the repository lock ({exc.strerror})")
            try:
                # Re-check the chain under the lock: a prune may have run while we planned.
                Catalog(repo, catalog.vm_uuid).sets_of_chain(point)
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
        return self.p.restore_as or (source_name if self.p.overwrite == "replace" else f"{source_name}-restored")

    def _disk_dir(self, conn) -> str:
        disk_dir = lv.pool_directory(conn, self.p.storage_pool) if self.p.storage_pool else (self.p.disk_dir or DEFAULT_DISK_DIR)
        if not os.path.isdir(disk_dir):
            raise VmBackupError("PATH_ESCAPE", f"disk_dir {disk_dir} is not an existing directory")
        return disk_dir

    def _plan(self, conn, catalog: Catalog, point: str) -> Plan | None:
        chain = catalog.sets_of_chain(point)  # CHAIN_BROKEN / REPOSITORY_FORMAT before anything else
        manifest = catalog.sets[point].manifest
        source = {"name": manifest["vm"].get("name") or catalog.vm_uuid, "uuid": catalog.vm_uuid}
        replace = self.p.overwrite == "replace"
        target_name = self._target_name(source["name"])
        existing = lv.find_domain(conn, target_name)
        replacing = None
        if existing is not None:
            marker = restore_marker(lv.domain_xml(existing, inactive=True))
            if not replace and marker and marker.get("vm_uuid") == catalog.vm_uuid and marker.get("set_id") == point:
                return None  # already restored from this very point under this name
            if not replace:
                raise VmBackupError("TARGET_VM_EXISTS", f"a domain named {target_name!r} already exists; choose another "
                                    "restore_as, or overwrite=replace to replace it", target=target_name)
            if lv.is_active(existing):
                raise VmBackupError("TARGET_VM_RUNNING", f"domain {target_name!r} is {lv.domain_state(existing)}; only a "
                                    "shut-off VM is replaced (shut it down first)", target=target_name)
            replacing = existing
        target_uuid = replacing.UUIDString() if replacing is not None else str(uuid_mod.uuid4())
        disk_dir = self._disk_dir(conn)
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
        files_meta = manifest["files"]
        side = ["domain.xml"] + [rel for rel, e in sorted(files_meta.items()) if e.get("role") in ("nvram", "tpm")]
        side_jobs = []
        for rel in side:
            if rel not in files_meta:
                raise VmBackupError("REPOSITORY_FORMAT", f"set {point} has no {rel}", set_id=point)
            side_jobs.append(FileJob(catalog.vm_uuid, point, rel, os.path.join(set_dir, rel), files_meta[rel]["size"],
                                     files_meta[rel]["sha256"], None))
        saved_xml = self._read_verified(side_jobs[0])
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
        xml, dropped, warnings = restored_xml(
            saved_xml, name=target_name, vm_uuid=target_uuid,
            disks={d.target: (d.path, self.p.disk_format) for d in disks},
            new_identity=replacing is None, network_map=self.p.network_map, nvram=nvram, metadata=metadata,
        )
        self.warnings.extend(warnings)
        replaced_files = []
        if replacing is not None:
            kept = {d.target for d in disks}
            replaced_files = sorted(p for tg, p in current.items() if tg in kept)
            if nvram and old_nvram:  # the old firmware state goes (or stays) with the old disks
                replaced_files.append(old_nvram)
        return Plan(catalog, point, chain, source, target_name, target_uuid, replacing, disks, side_jobs, nvram,
                    tpm_files, xml, disk_dir, dropped, replaced_files)

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
        token = uuid_mod.uuid4().hex[:10]
        journal = os.path.join(plan.disk_dir, f"{JOURNAL_PREFIX}{token}.json")
        temps = {d.target: os.path.join(plan.disk_dir, f".{os.path.basename(d.path)}.partial-{token}") for d in plan.disks}
        nvram_tmp = os.path.join(NVRAM_DIR, f".{os.path.basename(plan.nvram)}.partial-{token}") if plan.nvram else None
        created: list[str] = []  # files this run made under their final names
        state = {"pid": os.getpid(), "host": socket.gethostname(), "phase": "writing", "temps": sorted(temps.values()) + ([nvram_tmp] if nvram_tmp else []),
                 "finals": [d.path for d in plan.disks] + ([plan.nvram] if plan.nvram else []), "target": plan.target_name}
        repo_mod.write_file_atomic(journal, _manifest.dumps(state))
        defined = None
        old_xml = old_checkpoints = None
        try:
            verify_started = time.monotonic()
            jobs = [FileJob(plan.catalog.vm_uuid, sid, d["file"], path, d["size"], d["sha256"], disk.target)
                    for disk in plan.disks for (sid, d), path in zip(disk.chain, disk.files)]
            jobs += plan.side_jobs[1:]  # domain.xml was verified when it was read
            workers = self.p.workers or os.cpu_count() or 1
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool, \
                    concurrent.futures.ThreadPoolExecutor(max_workers=1) as syncer:
                # Checksums run beside qemu-img (both read the same files), and each image is
                # flushed to disk while the next one is written: the CPU and the disk overlap.
                pending = pool.map(check_file, sorted(jobs, key=lambda j: j.size, reverse=True))
                convert_started = time.monotonic()
                convert_error = None
                synced = []
                for disk in plan.disks:
                    try:
                        self.qemu_img.convert_chain(chain_spec(disk.files), temps[disk.target], self.p.disk_format)
                    except VmBackupError as exc:
                        # A damaged file is the likelier cause: the checksums have the first word.
                        convert_error = exc
                        break
                    synced.append(syncer.submit(_make_durable, temps[disk.target]))
                convert_s = time.monotonic() - convert_started
                outcomes = list(pending)
                verify_s = time.monotonic() - verify_started
                for future in synced:
                    future.result()
            bad = [o for o in outcomes if o.code is not None]
            if convert_error is not None and not bad:
                raise convert_error
            if bad:
                first = bad[0]
                affected = plan.catalog.points_using(first.job.set_id, first.job.target)
                raise VmBackupError(first.code, f"cannot restore point {plan.point}: {first.msg}; nothing was defined",
                                    set_id=first.job.set_id, file=first.job.rel, affected=affected,
                                    findings=[{"code": o.code, "set_id": o.job.set_id, "file": o.job.rel, "msg": o.msg} for o in bad])
            if plan.nvram:
                os.makedirs(NVRAM_DIR, mode=0o711, exist_ok=True)
                shutil.copyfile(os.path.join(plan.catalog.repo.set_dir(plan.catalog.vm_uuid, plan.point), "nvram.fd"), nvram_tmp)
                os.chmod(nvram_tmp, 0o600)
                repo_mod.fsync_file(nvram_tmp)
                os.rename(nvram_tmp, plan.nvram)
                created.append(plan.nvram)
            for disk in plan.disks:
                os.rename(temps[disk.target], disk.path)
                created.append(disk.path)
            repo_mod.fsync_dir(plan.disk_dir)
            tpm_dir = self._restore_tpm(plan, created)

            if plan.replacing is not None:
                old_xml = lv.domain_xml(plan.replacing, inactive=True)
                old_checkpoints = lv.checkpoint_xmls(plan.replacing)
            defined = lv.define(conn, plan.xml)
            if plan.replacing is not None:
                # The old checkpoints' bitmaps live in the old disks; the next export starts a new chain.
                lv.drop_checkpoint_metadata(defined)
            if self.p.start:
                lv.start(defined)
            state["phase"] = "defined"
            repo_mod.write_file_atomic(journal, _manifest.dumps(state))
        except BaseException:
            # Undo (failure contract): the old definition back, nothing we wrote left behind.
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
            for path in list(temps.values()) + ([nvram_tmp] if nvram_tmp else []) + created:
                if os.path.lexists(path):
                    repo_mod.remove_tree(path)
            if os.path.exists(journal):
                os.unlink(journal)
            raise
        removed = []
        if plan.replacing is not None and not self.p.keep_replaced_disks:
            for path in plan.replaced_files:
                if os.path.isfile(path) and path not in created:
                    os.unlink(path)
                    removed.append(path)
        os.unlink(journal)
        if self.p.storage_pool:
            error = lv.refresh_pool(conn, self.p.storage_pool)
            if error:
                self.warnings.append(f"could not refresh storage pool {self.p.storage_pool}: {error}")
        return {
            "verify_s": round(verify_s, 3),
            "convert_s": round(convert_s, 3),
            "bytes_written": sum(_allocated(d.path) for d in plan.disks),
            "removed_disks": removed,
            "state": lv.domain_state(defined),
            "tpm_dir": tpm_dir,
        }

    def _restore_tpm(self, plan: Plan, created: list[str]) -> str | None:
        if not plan.tpm_files:
            return None
        set_dir = plan.catalog.repo.set_dir(plan.catalog.vm_uuid, plan.point)
        tpm_dir = os.path.join(SWTPM_DIR, plan.target_uuid)
        os.makedirs(tpm_dir, mode=0o711)
        created.append(tpm_dir)
        for rel in plan.tpm_files:
            dst = os.path.join(tpm_dir, os.path.relpath(rel, "tpm"))
            os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
            shutil.copyfile(os.path.join(set_dir, rel), dst)
            os.chmod(dst, 0o600)
        return tpm_dir

    def _clean_stale(self, conn, disk_dir: str) -> None:
        """Remove what a killed restore into this directory left, as its journal lists it.

        A file that a defined domain uses is never removed, whatever the journal says: a run
        killed between defining the domain and closing its journal has finished its work.
        """
        journals = stale_journals(disk_dir, socket.gethostname())
        in_use = lv.paths_in_use(conn) if journals else set()
        for path, data in journals:
            victims = list(data.get("temps") or []) + list(data.get("finals") or [])
            for victim in victims:
                if not isinstance(victim, str) or victim in in_use:
                    continue
                if os.path.dirname(victim) in (disk_dir, NVRAM_DIR) and os.path.isfile(victim):
                    os.unlink(victim)
                    self.cleaned.append(f"removed {victim} of an interrupted restore")
            os.unlink(path)

    # ------------------------------------------------------------------ results
    def _unchanged(self, conn, catalog: Catalog, point: str, started: float) -> dict[str, t.Any]:
        """The domain was restored from this point before; at most it still has to be started."""
        manifest = catalog.sets[point].manifest
        name = self._target_name(manifest["vm"].get("name") or catalog.vm_uuid)
        dom = lv.find_domain(conn, name)
        start = bool(self.p.start and dom is not None and not lv.is_active(dom))
        if start and not self.check_mode:
            lv.start(dom)
        msg = f"domain {name!r} was already restored from set {point}; " + ("started it" if start else "nothing to do")
        return {
            "changed": start,
            "msg": msg,
            "set_id": point,
            "point": _point_info(manifest),
            "chain": catalog.sets_of_chain(point),
            "source_vm": {"name": manifest["vm"].get("name"), "uuid": catalog.vm_uuid},
            "vm": {"name": name, "uuid": dom.UUIDString() if dom is not None else None,
                   "state": lv.domain_state(dom) if dom is not None else None, "replaced": False},
            "disks": [],
            "bytes_read": 0,
            "bytes_written": 0,
            "duration_s": round(time.monotonic() - started, 3),
            "throughput_mib_s": None,
            "started": start and not self.check_mode,
            "cleaned_up": self.cleaned,
        }

    def _result(self, plan: Plan, started: float, changed: bool, check: bool = False,
                stats: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
        stats = stats or {}
        seconds = time.monotonic() - started
        manifest = plan.catalog.sets[plan.point].manifest
        verb = "would restore" if check else "restored"
        data = sum(d.read_bytes for d in plan.disks)
        result = {
            "changed": changed,
            "msg": (f"{verb} point {plan.point} of {plan.source['name']} as {plan.target_name!r} "
                    f"({'replacing the shut-off VM' if plan.replacing is not None else 'a new VM'}; "
                    f"{len(plan.disks)} disks, {plan.read_bytes} bytes " + ("to read" if check else "read") + ("" if check else f", {seconds:.1f}s") + ")"),
            "set_id": plan.point,
            "point": _point_info(manifest),
            "chain": plan.chain,
            "source_vm": plan.source,
            "vm": {"name": plan.target_name, "uuid": plan.target_uuid, "state": stats.get("state"),
                   "replaced": plan.replacing is not None},
            "disks": [d.public(self.p.disk_format) for d in plan.disks],
            "dropped_disks": plan.dropped,
            "nvram": plan.nvram,
            "tpm_dir": stats.get("tpm_dir"),
            "domain_xml": redact_xml(plan.xml),
            "replaced_disks": plan.replaced_files,
            "removed_disks": stats.get("removed_disks", []),
            "bytes_read": 0 if check else plan.read_bytes,
            "estimated_bytes": data,
            "bytes_written": stats.get("bytes_written", 0),
            "duration_s": round(seconds, 3),
            "verify_s": stats.get("verify_s"),
            "convert_s": stats.get("convert_s"),
            "throughput_mib_s": round(data / MIB / seconds, 1) if stats and seconds > 0 else None,
            "started": bool(self.p.start and not check),
            "cleaned_up": self.cleaned,
        }
        return result


def _point_info(manifest: dict[str, t.Any]) -> dict[str, t.Any]:
    return {k: manifest.get(k) for k in ("set_id", "type", "started", "completed", "chain_id", "consistency", "period")}


def _make_durable(path: str) -> None:
    os.chmod(path, repo_mod.FILE_MODE)
    repo_mod.fsync_file(path)


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512
