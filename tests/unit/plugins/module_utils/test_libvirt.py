# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for the pure XML helpers of plugins/module_utils/_libvirt.py (no libvirt daemon)."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _libvirt as lv
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

DOMAIN_XML = """\
<domain type='kvm' id='3'>
  <name>web-01</name>
  <uuid>2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f</uuid>
  <metadata>
    <disk><target dev='vdz'/></disk>
  </metadata>
  <os>
    <type arch='x86_64' machine='pc-q35-8.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web-01_VARS.fd</nvram>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web-01.qcow2' index='2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/vg0/web-01-data' index='1'/>
      <target dev='vdb' bus='virtio'/>
      <alias name='virtio-disk1'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
      <alias name='sata0-0-0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/iso/debian.iso'/>
      <target dev='sdb' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/shared/tools.qcow2'/>
      <target dev='vdc' bus='virtio'/>
      <readonly/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/web-01-scratch'>
        <host name='mon1.example.org' port='6789'/>
      </source>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='default' volume='web-01-logs.qcow2'/>
      <target dev='vde' bus='virtio'/>
    </disk>
    <disk type='file' device='floppy'>
      <source file='/srv/floppy.img'/>
      <target dev='fda'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <target dev='vdf' bus='virtio'/>
    </disk>
    <disk>
      <source file='/srv/defaults.img'/>
      <target dev='hdc'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/srv/no-target.qcow2'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/srv/empty-target.qcow2'/>
      <target dev=''/>
    </disk>
    <interface type='network'><source network='default'/></interface>
  </devices>
</domain>
"""

# target: (device, source_type, source, driver_type, readonly, alias, checkpointable, skip_reason)
EXPECTED_DISKS = {
    "vda": ("disk", "file", "/var/lib/libvirt/images/web-01.qcow2", "qcow2", False, "virtio-disk0", True, None),
    "vdb": ("disk", "block", "/dev/vg0/web-01-data", "raw", False, "virtio-disk1", False, None),
    "sda": ("cdrom", "file", None, "raw", True, "sata0-0-0", False, "cdrom device"),
    "sdb": ("cdrom", "file", "/srv/iso/debian.iso", "raw", True, None, False, "cdrom device"),
    "vdc": ("disk", "file", "/srv/shared/tools.qcow2", "qcow2", True, None, True, "read-only disk"),
    "vdd": ("disk", "network", "pool/web-01-scratch", "raw", False, None, False, "source type 'network' is not supported yet"),
    "vde": ("disk", "volume", "web-01-logs.qcow2", "qcow2", False, None, True, "source type 'volume' is not supported yet"),
    "fda": ("floppy", "file", "/srv/floppy.img", None, False, None, False, "floppy device"),
    "vdf": ("disk", "file", None, "qcow2", False, None, True, "no source (empty drive)"),
    "hdc": ("disk", "file", "/srv/defaults.img", None, False, None, False, None),
}


@pytest.fixture(scope="module")
def disks() -> dict[str, lv.Disk]:
    return {d.target: d for d in lv.parse_disks(DOMAIN_XML)}


def test_parse_disks_order_and_selection():
    targets = [d.target for d in lv.parse_disks(DOMAIN_XML)]
    # Document order; disks without a target are left out, <metadata> is not a device list.
    assert targets == ["vda", "vdb", "sda", "sdb", "vdc", "vdd", "vde", "fda", "vdf", "hdc"]


@pytest.mark.parametrize("target", sorted(EXPECTED_DISKS))
def test_parse_disks_fields(disks, target):
    device, source_type, source, driver_type, readonly, alias, checkpointable, skip = EXPECTED_DISKS[target]
    disk = disks[target]
    assert disk == lv.Disk(
        target=target, device=device, source_type=source_type, source=source, driver_type=driver_type, readonly=readonly, alias=alias
    )
    assert disk.checkpointable is checkpointable
    assert disk.skip_reason() == skip


@pytest.mark.parametrize(
    "xml",
    [
        "<domain><name>x</name></domain>",
        "<domain><devices/></domain>",
        "<domain><devices><interface type='network'/></devices></domain>",
    ],
)
def test_parse_disks_none(xml):
    assert lv.parse_disks(xml) == []


def test_parse_disks_rejects_malformed_xml():
    with pytest.raises(ET.ParseError):
        lv.parse_disks("<domain><devices>")


def _disk(**over) -> lv.Disk:
    fields = dict(target="vda", device="disk", source_type="file", source="/x.qcow2", driver_type="qcow2", readonly=False, alias=None)
    fields.update(over)
    return lv.Disk(**fields)


@pytest.mark.parametrize(
    "driver_type, expected",
    [("qcow2", True), ("raw", False), (None, False), ("vmdk", False), ("qed", False), ("", False)],
)
def test_checkpointable(driver_type, expected):
    assert _disk(driver_type=driver_type).checkpointable is expected


@pytest.mark.parametrize(
    "over, reason",
    [
        ({}, None),
        ({"source_type": "block", "source": "/dev/sdb"}, None),
        ({"driver_type": "raw"}, None),
        ({"device": "lun"}, None),
        ({"device": "cdrom"}, "cdrom device"),
        ({"device": "cdrom", "readonly": True, "source": None}, "cdrom device"),
        ({"device": "floppy", "source": None}, "floppy device"),
        ({"readonly": True}, "read-only disk"),
        ({"readonly": True, "source": None}, "read-only disk"),
        ({"source": None}, "no source (empty drive)"),
        ({"source": None, "source_type": "network"}, "no source (empty drive)"),
        ({"source_type": "network"}, "source type 'network' is not supported yet"),
        ({"source_type": "nvme"}, "source type 'nvme' is not supported yet"),
        ({"source_type": "dir"}, "source type 'dir' is not supported yet"),
    ],
)
def test_skip_reason_precedence(over, reason):
    assert _disk(**over).skip_reason() == reason


# --------------------------------------------------------------------------- nvram / tpm


@pytest.mark.parametrize(
    "xml, expected",
    [
        (DOMAIN_XML, "/var/lib/libvirt/qemu/nvram/web-01_VARS.fd"),
        ("<domain><os><nvram>\n   /var/nvram/x.fd  \n</nvram></os></domain>", "/var/nvram/x.fd"),
        ("<domain><os><nvram template='/usr/share/OVMF/VARS.fd'/></os></domain>", None),
        ("<domain><os><nvram>   </nvram></os></domain>", None),
        ("<domain><os><type>hvm</type></os></domain>", None),
        ("<domain><nvram>/not/under/os.fd</nvram></domain>", None),
        ("<domain/>", None),
    ],
)
def test_nvram_path(xml, expected):
    assert lv.nvram_path(xml) == expected


@pytest.mark.parametrize(
    "xml, expected",
    [
        ("<domain><devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>", True),
        ("<domain><devices><disk/></devices></domain>", False),
        ("<domain><tpm/></domain>", False),
    ],
)
def test_has_tpm(xml, expected):
    assert lv.has_tpm(xml) is expected


# --------------------------------------------------------------------------- checkpoint XML


@pytest.mark.parametrize(
    "bitmap, all_targets",
    [
        pytest.param(["vda", "vdb"], ["vda", "vdb", "vdc"], id="some-raw"),
        pytest.param([], ["vda"], id="no-bitmap"),
        pytest.param(iter(["vdb"]), ["vdb", "vda"], id="iterables-keep-all-targets-order"),
        pytest.param(["vda", "vdx"], ["vda"], id="bitmap-target-not-in-all-is-ignored"),
    ],
)
def test_checkpoint_xml(bitmap, all_targets):
    bitmap = list(bitmap)
    root = ET.fromstring(lv.checkpoint_xml("vmbackup-0123456789ab-3", iter(bitmap), all_targets))
    assert root.tag == "domaincheckpoint"
    assert root.findtext("name") == "vmbackup-0123456789ab-3"
    assert root.findtext("description")
    disks = root.findall("./disks/disk")
    assert [d.get("name") for d in disks] == list(all_targets)
    for d in disks:
        assert d.get("checkpoint") == ("bitmap" if d.get("name") in bitmap else "no")
        assert set(d.attrib) == {"name", "checkpoint"}


def test_checkpoint_xml_escapes_text():
    root = ET.fromstring(lv.checkpoint_xml("a<b>&'\"c", [], ["vda"]))
    assert root.findtext("name") == "a<b>&'\"c"


# --------------------------------------------------------------------------- backup XML

TARGETS = {"vda": "/repo/vms/u/.incomplete/s/disks/vda.qcow2", "vdb": "/repo/vms/u/.incomplete/s/disks/vdb.qcow2"}


@pytest.mark.parametrize(
    "incremental, full_targets, skip, expected_backupmode",
    [
        pytest.param(None, (), ["sda"], {"vda": None, "vdb": None}, id="full-job"),
        pytest.param(None, ["vdb"], ["sda"], {"vda": None, "vdb": None}, id="full-job-ignores-full-targets"),
        pytest.param("vmbackup-0123456789ab-1", (), [], {"vda": None, "vdb": None}, id="incremental-all-bitmaps"),
        pytest.param("vmbackup-0123456789ab-1", ["vdb"], ["sda", "vdc"], {"vda": None, "vdb": "full"}, id="incremental-raw-disk-full"),
        pytest.param("vmbackup-0123456789ab-1", iter(["vda", "vdb"]), [], {"vda": "full", "vdb": "full"}, id="incremental-all-full"),
        pytest.param("", ["vdb"], [], {"vda": None, "vdb": None}, id="empty-incremental-is-full"),
    ],
)
def test_backup_xml(incremental, full_targets, skip, expected_backupmode):
    root = ET.fromstring(lv.backup_xml(TARGETS, iter(skip), incremental, full_targets))
    assert root.tag == "domainbackup"
    assert root.get("mode") == "push"
    inc = root.findall("incremental")
    if incremental:
        assert len(inc) == 1 and inc[0].text == incremental
    else:
        assert inc == []
    disks = root.findall("./disks/disk")
    assert [d.get("name") for d in disks] == list(TARGETS) + list(skip)
    for d in disks[: len(TARGETS)]:
        name = d.get("name")
        assert d.get("backup") == "yes"
        assert d.get("type") == "file"
        assert d.get("backupmode") == expected_backupmode[name]
        assert [t.get("file") for t in d.findall("target")] == [TARGETS[name]]
        assert [t.get("type") for t in d.findall("driver")] == ["qcow2"]
    for d in disks[len(TARGETS):]:
        assert d.attrib == {"name": d.get("name"), "backup": "no"}
        assert list(d) == [], "a skipped disk has no target"


def test_backup_xml_escapes_paths():
    path = "/repo/a b&c<d>'\"/vda.qcow2"
    root = ET.fromstring(lv.backup_xml({"vda": path}, [], None))
    assert root.find("./disks/disk/target").get("file") == path


# --------------------------------------------------------------------------- chains: redefine, sentinels, own jobs
SAVED_CHECKPOINT = """\
<domaincheckpoint>
  <name>vmbackup-abc123def456-2</name>
  <parent><name>vmbackup-abc123def456-1</name></parent>
  <creationTime>1796115921</creationTime>
  <disks><disk name='vda' checkpoint='bitmap' bitmap='vmbackup-abc123def456-2'/></disks>
</domaincheckpoint>"""


@pytest.mark.parametrize(
    "existing, dropped",
    [
        pytest.param([], "vmbackup-abc123def456-1", id="parent-retired"),
        pytest.param(["vmbackup-abc123def456-0"], "vmbackup-abc123def456-1", id="other-checkpoints-only"),
        pytest.param(["vmbackup-abc123def456-1"], None, id="parent-exists"),
    ],
)
def test_strip_missing_parent(existing, dropped):
    xml, name = lv.strip_missing_parent(SAVED_CHECKPOINT, existing)
    assert name == dropped
    root = ET.fromstring(xml)
    assert (root.find("parent") is None) == (dropped is not None)
    # Everything else is kept as saved: name, time, disks and bitmap names.
    assert root.findtext("name") == "vmbackup-abc123def456-2"
    assert root.findtext("creationTime") == "1796115921"
    assert root.find("./disks/disk").get("bitmap") == "vmbackup-abc123def456-2"


def test_strip_missing_parent_of_a_first_set_changes_nothing():
    xml = "<domaincheckpoint><name>vmbackup-abc123def456-0</name></domaincheckpoint>"
    assert lv.strip_missing_parent(xml, []) == (xml, None)


@pytest.mark.parametrize(
    "size, granularity",
    [
        (512, 512),
        (64 * 1024 * 1024, 512),
        (32 * 1024 ** 3, 512),  # 2**26 bits exactly
        (32 * 1024 ** 3 + 512, 1024),
        (1024 ** 4, 16384),
        (1 << 60, 1 << 31),  # capped at QEMU's maximum granularity
    ],
)
def test_sentinel_granularity(size, granularity):
    got = lv.sentinel_granularity(size)
    assert got == granularity
    assert got & (got - 1) == 0 and 512 <= got <= 1 << 31
    assert size <= got * lv.SENTINEL_MAX_BITS or got == 1 << 31


CP = "vmbackup-abc123def456-2"
OK_SENTINEL = {"name": CP + ".size", "recording": False, "persistent": True, "granularity": 512, "count": 512}


@pytest.mark.parametrize(
    "info, expected",
    [
        pytest.param(OK_SENTINEL, None, id="intact"),
        pytest.param(None, "has no size sentinel", id="missing"),
        pytest.param(dict(OK_SENTINEL, count=0), "was shrunk", id="cleared-by-shrink"),
        pytest.param(dict(OK_SENTINEL, inconsistent=True), "broken size sentinel", id="inconsistent"),
        pytest.param(dict(OK_SENTINEL, recording=True), "was shrunk", id="recording-is-not-ours"),
    ],
)
def test_sentinel_state(info, expected):
    node = lv.BlockNode("vda", "libvirt-1-format", 1 << 26, {} if info is None else {CP + ".size": info})
    state = lv.sentinel_state(node, CP)
    assert (state is None) if expected is None else (expected in state)


def test_sentinel_of_another_checkpoint_does_not_count():
    node = lv.BlockNode("vda", "n", 1 << 26, {"vmbackup-abc123def456-1.size": dict(OK_SENTINEL, name="vmbackup-abc123def456-1.size")})
    assert "no size sentinel" in lv.sentinel_state(node, CP)


class FakeJobDom:
    """A domain whose running backup job writes ``targets``; records abortJob calls."""

    def __init__(self, targets):
        self.targets = targets
        self.aborted = 0

    def backupGetXMLDesc(self, _flags):
        if self.targets is None:
            raise lv.LibvirtError("no job")
        disks = "".join(f"<disk name='vd{i}'><target file='{p}'/></disk>" for i, p in enumerate(self.targets))
        return f"<domainbackup mode='push'><disks>{disks}</disks></domainbackup>"

    def abortJob(self):
        self.aborted += 1
        self.targets = None

    def jobStats(self, _flags):
        return {"type": 0}


STAGING = "/srv/repo/vms/u/.incomplete/20261201T090000Z-001"


@pytest.mark.parametrize(
    "targets, aborted",
    [
        pytest.param([STAGING + "/disks/vda.qcow2", STAGING + "/disks/vdb.qcow2"], True, id="ours"),
        pytest.param(["/var/tmp/other-tool/vda.qcow2"], False, id="foreign"),
        pytest.param([STAGING + "/disks/vda.qcow2", "/var/tmp/other/vdb.qcow2"], False, id="mixed"),
        pytest.param([STAGING + "-002/disks/vda.qcow2"], False, id="sibling-name-prefix"),
        pytest.param([STAGING + "/../20261201T090000Z-002/disks/vda.qcow2"], False, id="dot-dot"),
        pytest.param([], False, id="pull-mode-no-targets"),
        pytest.param(None, False, id="no-job"),
    ],
)
def test_abort_backup_into_only_aborts_a_job_writing_into_the_directory(targets, aborted):
    dom = FakeJobDom(targets)
    assert lv.abort_backup_into(dom, STAGING) is aborted
    assert dom.aborted == (1 if aborted else 0)


LIVE_XML = """<domain><devices>
  <disk type='file' device='disk'><driver type='qcow2'/><source file='/img/a.qcow2' index='2'/><target dev='vda'/></disk>
  <disk type='file' device='disk'><driver type='qcow2'/><source file='/img/b.qcow2'/><target dev='vdb'/></disk>
  <disk type='file' device='disk'><driver type='qcow2'/><source file='/img/c.qcow2' index='3'/><target dev='vdc'/></disk>
  <disk type='file' device='cdrom'><target dev='hdc'/></disk>
</devices></domain>"""

QUERY_BLOCK = [
    {"qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
     "inserted": {"node-name": "libvirt-2-format", "file": "/img/a.qcow2", "image": {"virtual-size": 1 << 26},
                  "dirty-bitmaps": [{"name": "cp", "count": 0}, {"name": "cp.size", "count": 512},
                                    {"granularity": 65536, "count": 0, "busy": True}]}},  # a running job's anonymous bitmap
    {"qdev": "vdb", "inserted": {"node-name": "#block123", "file": "/img/b.qcow2", "image": {"virtual-size": 1 << 20}}},
    # libvirt's node 3 runs another file than the XML says: never trusted as vdc's node
    {"qdev": "vdc", "inserted": {"node-name": "libvirt-3-format", "file": "/img/other.qcow2", "image": {"virtual-size": 1}}},
    {"qdev": "hdc"},
]


class FakeMonitorDom:
    def XMLDesc(self, _flags):
        return LIVE_XML


def test_block_nodes_maps_targets_to_the_nodes_qemu_runs(monkeypatch):
    calls = []

    class FakeQemu:
        VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP = 1

        @staticmethod
        def qemuMonitorCommand(_dom, cmd, _flags):
            calls.append(json.loads(cmd))
            return json.dumps({"return": QUERY_BLOCK})

    monkeypatch.setattr(lv, "libvirt_qemu", FakeQemu)
    nodes = lv.block_nodes(FakeMonitorDom())
    assert calls == [{"execute": "query-block"}]
    assert sorted(nodes) == ["vda", "vdb"]
    assert nodes["vda"].node == "libvirt-2-format" and nodes["vda"].size == 1 << 26
    assert set(nodes["vda"].bitmaps) == {"cp", "cp.size"}
    assert nodes["vdb"].node == "#block123" and nodes["vdb"].bitmaps == {}


def test_qmp_error_is_a_backup_failure(monkeypatch):
    class FakeQemu:
        @staticmethod
        def qemuMonitorCommand(_dom, _cmd, _flags):
            return json.dumps({"error": {"class": "GenericError", "desc": "Bitmap 'x' not found"}})

    monkeypatch.setattr(lv, "libvirt_qemu", FakeQemu)
    with pytest.raises(lv.VmBackupError) as exc:
        lv.qmp(FakeMonitorDom(), "block-dirty-bitmap-remove", node="n", name="x")
    assert exc.value.error_code == "BACKUP_FAILED" and "Bitmap 'x' not found" in exc.value.msg
    assert lv.remove_bitmap_live(FakeMonitorDom(), "n", "x") == "QEMU refused block-dirty-bitmap-remove: Bitmap 'x' not found"


@pytest.mark.parametrize("xml, expected", [
    ("<domaincheckpoint><name>vmbackup-0123456789ab-2</name><parent><name>x</name></parent></domaincheckpoint>",
     "vmbackup-0123456789ab-2"),
    ("<domaincheckpoint><description>no name</description></domaincheckpoint>", None),
    ("<domain><name>web01</name></domain>", None),
    ("<domaincheckpoint><name>cut", None),
    ("", None),
])
def test_checkpoint_xml_name(xml, expected):
    assert lv.checkpoint_xml_name(xml) == expected


# --------------------------------------------------------------------------- pull mode (issue 13)
RUN = "/var/lib/libvirt/qemu/vmbackup/2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f/20261201T090000Z-001.4242"
# What libvirt 9.0 answers for a running incremental pull job (backupGetXMLDesc).
PULL_DESC = f"""<domainbackup mode='pull'>
  <incremental>cp1</incremental>
  <server transport='unix' socket='{RUN}/nbd.sock'/>
  <disks>
    <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='cp1' exportname='vda'
          exportbitmap='backup-vda' index='3'>
      <driver type='qcow2'/>
      <scratch file='{RUN}/vda.scratch'/>
    </disk>
    <disk name='vdb' backup='yes' type='file' backupmode='full' exportname='vdb' index='4'>
      <driver type='qcow2'/>
      <scratch file='{RUN}/vdb.scratch'/>
    </disk>
    <disk name='hdc' backup='no'/>
  </disks>
</domainbackup>"""


def test_pull_backup_xml():
    xml = lv.pull_backup_xml(f"{RUN}/nbd.sock", {"vda": f"{RUN}/vda.scratch", "vdb": f"{RUN}/vdb.scratch"}, ["hdc"], "cp1", ["vdb"])
    root = ET.fromstring(xml)
    assert root.get("mode") == "pull" and root.findtext("incremental") == "cp1"
    assert root.find("server").attrib == {"transport": "unix", "socket": f"{RUN}/nbd.sock"}
    disks = {d.get("name"): d for d in root.findall("./disks/disk")}
    assert disks["vda"].find("scratch").get("file") == f"{RUN}/vda.scratch" and disks["vda"].get("backupmode") is None
    assert disks["vdb"].get("backupmode") == "full"
    assert disks["hdc"].attrib == {"name": "hdc", "backup": "no"}
    assert lv.job_paths(xml) == [f"{RUN}/vda.scratch", f"{RUN}/vdb.scratch", f"{RUN}/nbd.sock"]
    # A full job names no incremental and no per-disk backupmode.
    full = ET.fromstring(lv.pull_backup_xml("/s", {"vda": "/x'\"<&"}, [], None, ["vda"]))
    assert full.find("incremental") is None and full.find("./disks/disk").get("backupmode") is None
    assert full.find("./disks/disk/scratch").get("file") == "/x'\"<&"


def test_parse_pull_exports_names_exports_and_bitmaps():
    exports = lv.parse_pull_exports(PULL_DESC)
    assert exports == {
        "vda": lv.PullExport("vda", f"{RUN}/nbd.sock", "vda", "backup-vda"),
        "vdb": lv.PullExport("vdb", f"{RUN}/nbd.sock", "vdb", None),
    }
    assert sorted(lv.job_paths(PULL_DESC)) == sorted([f"{RUN}/nbd.sock", f"{RUN}/vda.scratch", f"{RUN}/vdb.scratch"])


@pytest.mark.parametrize("xml", [
    "<domainbackup mode='push'><disks/></domainbackup>",
    "<domainbackup mode='pull'><server transport='tcp' name='localhost' port='10809'/><disks/></domainbackup>",
    "<domainbackup mode='pull'><disks/></domainbackup>",
])
def test_parse_pull_exports_refuses_what_is_not_our_kind_of_job(xml):
    with pytest.raises(VmBackupError) as info:
        lv.parse_pull_exports(xml)
    assert info.value.error_code == "BACKUP_FAILED"


class FakePullDom(FakeJobDom):
    def __init__(self, xml):
        super().__init__([])
        self.xml = xml

    def backupGetXMLDesc(self, _flags):
        if self.xml is None:
            raise lv.LibvirtError("no job")
        return self.xml

    def abortJob(self):
        self.aborted += 1
        self.xml = None


@pytest.mark.parametrize("directory, aborted", [
    pytest.param(RUN, True, id="its-run-directory"),
    pytest.param(RUN[:-1], False, id="a-run-directory-whose-name-is-a-prefix"),
    pytest.param(os.path.dirname(RUN), True, id="the-vm-directory-holds-it"),
    pytest.param("/srv/repo/vms/u/.incomplete/20261201T090000Z-001", False, id="a-staging-directory"),
])
def test_abort_backup_into_a_run_directory_aborts_only_its_pull_job(directory, aborted):
    dom = FakePullDom(PULL_DESC)
    assert lv.abort_backup_into(dom, directory) is aborted
    assert dom.aborted == (1 if aborted else 0)


@pytest.mark.parametrize("label, expected", [
    ("+64055:+64055", (64055, 64055)),
    ("0:0", (0, 0)),
    ("root:root", (0, 0)),
])
def test_qemu_owner_from_the_dac_label(label, expected):
    xml = (f"<domain><seclabel type='dynamic' model='selinux'><label>system_u:x:y</label></seclabel>"
           f"<seclabel type='dynamic' model='dac' relabel='yes'><label>{label}</label></seclabel></domain>")
    assert lv.qemu_owner(xml) == expected


def test_qemu_owner_falls_back_to_the_owner_of_libvirts_directory(tmp_path):
    st = os.stat(tmp_path)
    for xml in ("<domain/>", "<domain><seclabel model='dac'><label>nosuchuser-xyz:nosuchgroup-xyz</label></seclabel></domain>"):
        assert lv.qemu_owner(xml, fallback=str(tmp_path)) == (st.st_uid, st.st_gid)
