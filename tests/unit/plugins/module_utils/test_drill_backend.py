# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for plugins/module_utils/_drill.py: the pure decisions (parameters, point, checks,
the drill definition, partition tables and ext superblocks, markers) and the trust rules for the
journals a killed drill leaves. The drill itself runs in tests/integration/test_drill.py."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import struct
import xml.etree.ElementTree as ET

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _drill
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._catalog import Catalog
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

VM = "2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
T0 = dt.datetime(2026, 11, 25, tzinfo=dt.timezone.utc)
SHA = "a" * 64


def _raises(code: str, func, *args, **kwargs) -> VmBackupError:
    with pytest.raises(VmBackupError) as info:
        func(*args, **kwargs)
    assert info.value.error_code == code, info.value.msg
    return info.value


# ---------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("params, code", [
    ({}, "INVALID_ARGUMENT"),  # neither name nor uuid
    ({"name": "a", "uuid": VM}, "INVALID_ARGUMENT"),
    ({"name": ""}, "INVALID_NAME"),
    ({"uuid": "not-a-uuid"}, "INVALID_NAME"),
    ({"name": "a", "point": "latest"}, "INVALID_ARGUMENT"),
    ({"name": "a", "point": "random", "as_of": "2026-11-25"}, "INVALID_ARGUMENT"),
    ({"name": "a", "as_of": "yesterday"}, "INVALID_ARGUMENT"),
    ({"name": "a", "network": "bridge"}, "INVALID_ARGUMENT"),
    ({"name": "a", "isolated_network": "a/b"}, "INVALID_ARGUMENT"),
    ({"name": "a", "boot": "maybe"}, "INVALID_ARGUMENT"),
    ({"name": "a", "boot_timeout": 0}, "INVALID_ARGUMENT"),
    ({"name": "a", "boot_timeout": float("nan")}, "INVALID_ARGUMENT"),
    ({"name": "a", "probe_timeout": 1e9}, "INVALID_ARGUMENT"),
    ({"name": "a", "probe": []}, "INVALID_ARGUMENT"),
    ({"name": "a", "probe": ["true"], "boot": "never"}, "INVALID_ARGUMENT"),
    ({"name": "a", "probe": ["a\x00b"]}, "INVALID_ARGUMENT"),
    ({"name": "a", "probe_expect_rc": 256}, "INVALID_ARGUMENT"),
    ({"name": "a", "checks": ["fsck", "smart"]}, "INVALID_ARGUMENT"),
    ({"name": "a", "workers": 0}, "INVALID_ARGUMENT"),
    ({"name": "a", "lock_timeout": -1}, "INVALID_ARGUMENT"),
    ({"name": "a", "disk_dir": "relative/dir"}, "PATH_ESCAPE"),
    ({"name": "a", "disk_dir": "/var/lib/../tmp"}, "PATH_ESCAPE"),
    ({"name": "a", "disk_dir": "/var/lib/drill\n"}, "PATH_ESCAPE"),
])
def test_bad_parameters_fail_before_anything(params, code):
    _raises(code, _drill.validate_params, _drill.DrillParams(repository="/srv/vmbackup", **params))


def test_good_parameters_are_normalised():
    p = _drill.DrillParams(repository="/srv/vmbackup", uuid=VM.upper(), point="20261125T073512Z-001")
    assert _drill.validate_params(p) == "/srv/vmbackup"
    assert p.uuid == VM and p.disk_dir == _drill.DEFAULT_DISK_DIR


# ---------------------------------------------------------------------------------- point and checks
@pytest.fixture
def catalog(tmp_path):
    repo = repo_mod.Repository(str(tmp_path / "repo"))
    repo.initialise()
    repo.prepare_vm(VM)
    ids = []
    for hour in range(3):
        started = T0 + dt.timedelta(hours=hour)
        set_id = f"{started:%Y%m%dT%H%M%SZ}-001"
        manifest = _manifest.build_manifest(
            set_id=set_id, vm_uuid=VM, vm_name="web-01", host="hv1", started=started, completed=started + dt.timedelta(minutes=5),
            set_type="copy", chain_id=None, parent=None, checkpoint=None, consistency="crash", period=None,
            disks=[{"target": "vda", "method": "copy", "format": "qcow2", "virtual_size": 1 << 30, "file": "disks/vda.qcow2",
                    "size": 1, "sha256": SHA}],
            skipped_disks=[], files={"disks/vda.qcow2": {"size": 1, "sha256": SHA, "role": "disk"}}, tool={}, stats={})
        os.makedirs(repo.set_dir(VM, set_id))
        with open(os.path.join(repo.set_dir(VM, set_id), "manifest.json"), "wb") as fh:
            fh.write(_manifest.dumps(manifest))
        ids.append(set_id)
    return Catalog(repo, VM), ids


def test_choose_point(catalog):
    cat, ids = catalog
    assert _drill.choose_point(cat, "newest", None) == (ids[-1], "newest")
    assert _drill.choose_point(cat, ids[0], None) == (ids[0], "set id")
    assert _drill.choose_point(cat, "newest", "2026-11-25T01:07:00Z")[0] == ids[1]
    drawn = {_drill.choose_point(cat, "random", None, random.Random(seed))[0] for seed in range(40)}
    assert drawn == set(ids)
    assert _drill.choose_point(cat, "random", None, random.Random(1))[1] == "random (one of 3)"
    _raises("SET_NOT_FOUND", _drill.choose_point, cat, "20261125T090000Z-001", None)
    _raises("SET_NOT_FOUND", _drill.choose_point, cat, "newest", "2026-11-24")


@pytest.mark.parametrize("boot, agent, checks, probe, expected", [
    ("auto", True, None, None, ["image", "restore", "fsck", "boot", "agent", "fsinfo"]),
    ("auto", True, None, ["true"], ["image", "restore", "fsck", "boot", "agent", "fsinfo", "probe"]),
    ("auto", False, None, None, ["image", "restore", "fsck"]),
    ("always", False, None, None, ["image", "restore", "fsck", "boot"]),
    ("always", False, None, ["true"], ["image", "restore", "fsck", "boot", "probe"]),  # listed: skipped, with why
    ("auto", False, None, ["true"], ["image", "restore", "fsck", "probe"]),
    ("never", True, None, None, ["image", "restore", "fsck"]),
    ("auto", True, [], None, ["restore", "boot", "agent"]),
    ("auto", True, ["fsck"], None, ["restore", "fsck", "boot", "agent"]),
])
def test_planned_checks(boot, agent, checks, probe, expected):
    p = _drill.DrillParams(repository="/r", name="a", boot=boot, checks=checks, probe=probe)
    assert _drill.planned_checks(p, agent) == expected


def test_drill_name_is_safe_and_recognisable():
    name = _drill.drill_name("web 01/../x" + "y" * 100, "0123456789")
    assert name.startswith("vmbackup-drill-web_01_.._x") and name.endswith("-0123456789") and "/" not in name
    assert _drill._DRILL_NAME.match(name)  # pylint: disable=protected-access
    assert len(name) <= len("vmbackup-drill-") + 60 + 11


# ---------------------------------------------------------------------------------- the drill definition
SAVED = """<domain type='kvm'><name>web01</name><uuid>x</uuid><devices>
<interface type='bridge'><mac address='52:54:00:aa:bb:cc'/><source bridge='br-prod'/><model type='virtio'/>
  <target dev='vnet3'/><virtualport type='openvswitch'/></interface>
<interface type='network'><source network='default'/></interface>
<interface type='direct'><source dev='eth0' mode='bridge'/></interface>
<hostdev mode='subsystem' type='pci'><source><address bus='0x03' slot='0x00'/></source></hostdev>
<redirdev bus='usb' type='spicevmc'/>
<serial type='file'><source path='/var/lib/libvirt/images/web01/console.log' append='on'/><target port='0'/></serial>
<console type='file'><source path='/var/lib/libvirt/images/web01/console.log'/><target type='serial' port='0'/></console>
<serial type='tcp'><source mode='bind' host='0.0.0.0' service='4555'/><protocol type='telnet'/><target port='1'/></serial>
<channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/web01.agent'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
<graphics type='vnc' port='5901' autoport='no' listen='0.0.0.0'/>
</devices><metadata><other xmlns='urn:x'/></metadata></domain>"""


def test_drill_xml_without_network():
    marker = {"token": "0123456789", "host": "hv1", "pid": "42", "started": "7"}
    xml, changes = _drill.drill_xml(SAVED, network="none", isolated_network="iso", workdir="/d/w", marker=marker)
    root = ET.fromstring(xml)
    dev = root.find("devices")
    assert dev.findall("interface") == [] and dev.findall("hostdev") == [] and dev.findall("redirdev") == []
    serials = dev.findall("serial")
    assert serials[0].find("source").attrib == {"path": "/d/w/serial0.log"}
    assert dev.find("console").find("source").get("path") == "/d/w/serial0.log"  # the same port, the same file
    assert serials[1].get("type") == "pty" and serials[1].find("source") is None and serials[1].find("protocol") is None
    assert dev.find("channel").find("source").get("path") is None  # libvirt makes its own socket
    graphics = dev.find("graphics")
    assert graphics.get("autoport") == "yes" and graphics.get("port") is None
    assert _drill.drill_marker(xml) == marker
    assert root.find("metadata").find("{urn:x}other") is not None  # foreign metadata kept
    assert "interface bridge removed" in changes and "hostdev removed" in changes
    assert not any("/var/lib/libvirt/images/web01" in v for el in root.iter() for v in el.attrib.values())


def test_drill_xml_isolated_network_keeps_model_and_drops_the_rest():
    xml, dummy = _drill.drill_xml(SAVED, network="isolated", isolated_network="vmbackup-isolated", workdir="/d/w",
                                  marker={"token": "0123456789"})
    ifaces = ET.fromstring(xml).find("devices").findall("interface")
    assert len(ifaces) == 3
    for iface in ifaces:
        assert iface.attrib == {"type": "network"}
        assert iface.find("source").attrib == {"network": "vmbackup-isolated"}
        assert iface.find("target") is None and iface.find("virtualport") is None
    assert ifaces[0].find("model").get("type") == "virtio"


def test_drill_marker_is_replaced_not_duplicated():
    xml, dummy = _drill.drill_xml(SAVED, network="none", isolated_network="i", workdir="/w", marker={"token": "a"})
    xml, dummy = _drill.drill_xml(xml, network="none", isolated_network="i", workdir="/w", marker={"token": "b"})
    assert len(ET.fromstring(xml).find("metadata").findall(f"{{{_drill.DRILL_NS}}}drill")) == 1
    assert _drill.drill_marker(xml) == {"token": "b"}
    assert _drill.drill_marker("<domain/>") is None and _drill.drill_marker("not xml") is None


# ---------------------------------------------------------------------------------- images
def _ext_superblock(recover: bool = False, label: bytes = b"data") -> bytes:
    sb = bytearray(1024)
    sb[56:58] = b"\x53\xef"
    struct.pack_into("<I", sb, 0x60, 0x4 if recover else 0x0)
    sb[0x78:0x78 + len(label)] = label
    return bytes(sb)


def _image(path, size: int, parts: dict[int, bytes]) -> str:
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset, data in parts.items():
            fh.seek(offset)
            fh.write(data)
    return str(path)


def _mbr(entries: list[tuple[int, int]]) -> bytes:
    mbr = bytearray(512)
    for i, (ptype, lba) in enumerate(entries):
        struct.pack_into("<BBBBBBBBII", mbr, 446 + 16 * i, 0, 0, 0, 0, ptype, 0, 0, 0, lba, 1000)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def test_ext_on_the_whole_disk(tmp_path):
    path = _image(tmp_path / "d.raw", 1 << 20, {1024: _ext_superblock(recover=True)})
    assert _drill.ext_filesystems(path) == [{"offset": 0, "where": "whole disk", "label": "data", "needs_recovery": True}]


def test_ext_on_mbr_partitions(tmp_path):
    # partition 1 ext4, partition 2 something else, an extended partition (not read), an empty slot
    mbr = _mbr([(0x83, 2048), (0x82, 4096), (0x05, 8192), (0x00, 0)])
    path = _image(tmp_path / "d.raw", 8 << 20, {0: mbr, 2048 * 512 + 1024: _ext_superblock(label=b"root")})
    assert _drill.ext_filesystems(path) == [{"offset": 2048 * 512, "where": "partition 1", "label": "root", "needs_recovery": False}]
    with open(path, "rb") as fh:
        def read(offset, length):
            fh.seek(offset)
            return fh.read(length)
        assert _drill.partition_offsets(read) == [(1, 2048 * 512), (2, 4096 * 512)]


def test_ext_on_gpt_partitions(tmp_path):
    header = bytearray(92)
    header[:8] = b"EFI PART"
    struct.pack_into("<QII", header, 72, 2, 4, 128)  # entries at LBA 2, 4 entries of 128 bytes
    table = bytearray(4 * 128)
    table[0:16] = b"\x01" * 16
    struct.pack_into("<QQ", table, 32, 34, 2000)
    table[256:272] = b"\x02" * 16  # the third entry
    struct.pack_into("<QQ", table, 256 + 32, 4096, 8000)
    path = _image(tmp_path / "d.raw", 8 << 20, {0: _mbr([(0xEE, 1)]), 512: bytes(header), 1024: bytes(table),
                                                4096 * 512 + 1024: _ext_superblock()})
    found = _drill.ext_filesystems(path)
    assert [(f["where"], f["offset"]) for f in found] == [("partition 3", 4096 * 512)]


def test_no_ext_anywhere(tmp_path):
    assert _drill.ext_filesystems(_image(tmp_path / "d.raw", 1 << 20, {})) == []
    assert _drill.ext_filesystems(_image(tmp_path / "e.raw", 100, {})) == []  # shorter than a superblock


def test_ext_check_does_not_follow_a_link(tmp_path):
    target = _image(tmp_path / "d.raw", 1 << 20, {1024: _ext_superblock()})
    os.symlink(target, tmp_path / "link.raw")
    with pytest.raises(OSError):
        _drill.ext_filesystems(str(tmp_path / "link.raw"))


# ---------------------------------------------------------------------------------- markers and journals
def test_marker_alive():
    me = _drill._restore._proc_stat(os.getpid())  # pylint: disable=protected-access
    assert _drill.marker_alive({"pid": str(os.getpid()), "started": str(me[1])})
    assert not _drill.marker_alive({"pid": str(os.getpid()), "started": str(me[1] + 1)})  # pid reused by another process
    assert not _drill.marker_alive({"pid": "nope"}) and not _drill.marker_alive({})


def _backend(tmp_path) -> _drill.Driller:
    p = _drill.DrillParams(repository=str(tmp_path), name="a", disk_dir=str(tmp_path / "drills"))
    return _drill.Driller(p, run=None, qemu_img_path="/usr/bin/qemu-img", check_mode=True)


def _journal(disk_dir, token: str, **overrides) -> str:
    name = f"vmbackup-drill-web-{token}"
    data = {"format": _drill.JOURNAL_FORMAT, "version": 1, "token": token, "name": name, "dir": os.path.join(disk_dir, name),
            "host": os.uname().nodename, "pid": "999999999", "started": "1"}
    data.update(overrides)
    path = os.path.join(disk_dir, f".vmbackup-drill-{token}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.chmod(path, 0o600)
    return path


def test_only_trusted_consistent_journals_of_dead_drills_count(tmp_path):
    disk_dir = tmp_path / "drills"
    disk_dir.mkdir(mode=0o711)
    os.chmod(tmp_path, 0o755)
    backend = _backend(tmp_path)
    dead = _journal(str(disk_dir), "0000000001")
    me = _drill._restore._proc_stat(os.getpid())  # pylint: disable=protected-access
    _journal(str(disk_dir), "0000000002", pid=str(os.getpid()), started=str(me[1]))  # alive: a drill running now
    _journal(str(disk_dir), "0000000003", host="another-host")  # another host's drill on a shared directory
    _journal(str(disk_dir), "0000000004", dir="/etc")  # a journal pointing outside its own directory
    _journal(str(disk_dir), "0000000005", name="vmbackup-drill-web-0000000009")  # name and token disagree
    other = _journal(str(disk_dir), "0000000006")
    os.chmod(other, 0o666)  # anyone could have written it
    os.symlink(dead, disk_dir / ".vmbackup-drill-0000000007.json")  # a link is never read
    found = backend._stale_journals(str(disk_dir))  # pylint: disable=protected-access
    assert [path for path, dummy in found] == [dead]
    assert any("0000000006" in w for w in backend.warnings)


# ---------------------------------------------------------------------------------- preflight refusals
def test_disk_dir_must_be_roots_alone(tmp_path):
    os.chmod(tmp_path, 0o755)
    backend = _backend(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o711)
    os.chown(foreign, 65534, 65534)
    _raises("UNSAFE_TARGET", backend._check_disk_dir, str(foreign))  # pylint: disable=protected-access
    writable = tmp_path / "writable"
    writable.mkdir()
    os.chmod(writable, 0o777)
    _raises("UNSAFE_TARGET", backend._check_disk_dir, str(writable / "drills"))  # pylint: disable=protected-access
    real = tmp_path / "real"
    real.mkdir(mode=0o711)
    os.symlink(real, tmp_path / "link")
    _raises("UNSAFE_TARGET", backend._check_disk_dir, str(tmp_path / "link"))  # pylint: disable=protected-access
    # check mode does not create a missing one; a real run creates it 0711
    backend._check_disk_dir(str(tmp_path / "new"))  # pylint: disable=protected-access
    assert not (tmp_path / "new").exists()
    backend.check_mode = False
    backend._check_disk_dir(str(tmp_path / "new"))  # pylint: disable=protected-access
    assert oct((tmp_path / "new").stat().st_mode & 0o777) == "0o711"


class _Net:
    def __init__(self, xml: str, active: bool = True) -> None:
        self.xml, self.active = xml, active

    def isActive(self) -> bool:  # noqa: N802 (libvirt's name)
        return self.active

    def XMLDesc(self, flags: int) -> str:  # noqa: N802
        return self.xml


class _Conn:
    """Only networkLookupByName, as libvirt answers it (a libvirtError for an unknown name)."""

    def __init__(self, nets: dict[str, _Net]) -> None:
        self.nets = nets

    def networkLookupByName(self, name: str) -> _Net:  # noqa: N802
        if name not in self.nets:
            raise _drill.lv.LibvirtError("Network not found")
        return self.nets[name]


@pytest.mark.parametrize("nets, ok", [
    ({"vmbackup-isolated": _Net("<network><name>vmbackup-isolated</name><bridge name='virbr9'/></network>")}, True),
    ({"vmbackup-isolated": _Net("<network><name>x</name><forward mode='nat'/><bridge name='virbr9'/></network>")}, False),
    ({"vmbackup-isolated": _Net("<network><name>x</name><forward/></network>")}, False),  # no mode: nat
    ({"vmbackup-isolated": _Net("<network><name>x</name><forward mode='bridge'/><bridge name='br0'/></network>")}, False),
    ({"vmbackup-isolated": _Net("<network><name>x</name></network>", active=False)}, False),
    ({}, False),
])
def test_isolated_network_must_exist_be_active_and_forward_nowhere(tmp_path, nets, ok):
    backend = _backend(tmp_path)
    backend.p.network = "isolated"
    if ok:
        backend._check_network(_Conn(nets))  # pylint: disable=protected-access
    else:
        _raises("INVALID_ARGUMENT", backend._check_network, _Conn(nets))  # pylint: disable=protected-access
