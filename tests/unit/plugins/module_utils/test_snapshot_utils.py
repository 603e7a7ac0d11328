# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for the pure parts of plugins/module_utils/_snapshot.py (no libvirt daemon)."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _snapshot as snap
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

SNAP_XML = """\
<domainsnapshot>
  <name>vmbackup-snap-before-patch</name>
  <description>d</description>
  <state>disk-snapshot</state>
  <parent><name>vmbackup-snap-older</name></parent>
  <creationTime>1796135297</creationTime>
  <memory snapshot='no'/>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='{overlay}'/>
    </disk>
    <disk name='hdc' snapshot='no'/>
  </disks>
  <domain type='qemu'><name>x</name></domain>
</domainsnapshot>
"""


def _qcow2_with_backing(path, backing: bytes) -> None:
    header = b"QFI\xfb" + struct.pack(">I", 3) + struct.pack(">QI", 512, len(backing))
    path.write_bytes(header + b"\0" * (512 - len(header)) + backing)


def test_parse_external_disk_only(tmp_path):
    overlay = tmp_path / "vda.qcow2.vmbackup-snap-before-patch.qcow2"
    _qcow2_with_backing(overlay, b"vda.qcow2")
    entry = snap.parse_snapshot_xml(SNAP_XML.format(overlay=overlay))
    assert entry == {
        "name": "vmbackup-snap-before-patch", "ours": True, "current": False, "parent": "vmbackup-snap-older",
        "created": "2026-12-01T14:28:17Z", "state": "disk-snapshot", "memory": "none", "memory_file": None,
        "description": "d",
        "disks": [{"target": "vda", "kind": "external", "overlay": str(overlay), "base": str(tmp_path / "vda.qcow2")},
                  {"target": "hdc", "kind": "no", "overlay": None, "base": None}],
    }


def test_parse_internal_and_memory():
    xml = ("<domainsnapshot><name>manual</name><state>running</state>"
           "<memory snapshot='internal'/><disks><disk name='vda' snapshot='internal'/></disks></domainsnapshot>")
    entry = snap.parse_snapshot_xml(xml)
    assert (entry["ours"], entry["memory"], entry["disks"][0]["kind"], entry["created"]) == (False, "internal", "internal", None)
    xml = ("<domainsnapshot><name>vmbackup-snap-m</name><memory snapshot='external' file='/i/m.mem'/>"
           "<disks><disk name='vda' snapshot='external'><source file='/nonexistent/o.qcow2'/></disk></disks></domainsnapshot>")
    entry = snap.parse_snapshot_xml(xml)
    assert (entry["memory"], entry["memory_file"], entry["disks"][0]["base"]) == ("external", "/i/m.mem", None)


@pytest.mark.parametrize("source, base", [
    ("/i/vda.qcow2", "/i/vda.qcow2"),
    ("/i/vda.qcow2.vmbackup-snap-a.qcow2", "/i/vda.qcow2"),
    ("/i/vda.qcow2.vmbackup-snap-a.qcow2.vmbackup-snap-b-1.qcow2", "/i/vda.qcow2"),
    ("/i/vda.img.snap1", "/i/vda.img.snap1"),
])
def test_base_image_and_overlay(source, base):
    assert snap.base_image_of(source) == base
    assert snap.overlay_path(source, "vmbackup-snap-x") == base + ".vmbackup-snap-x.qcow2"


@pytest.mark.parametrize("bare", ["", "-a", "a/b", "a b", "x" * 65, "..", "é"])
def test_bad_names(bare):
    with pytest.raises(VmBackupError) as exc:
        snap.libvirt_name(bare, foreign=False)
    assert exc.value.error_code == "INVALID_NAME"


def test_names():
    assert snap.libvirt_name("before-patch", foreign=False) == "vmbackup-snap-before-patch"
    # a foreign snapshot is named exactly, never prefixed
    assert snap.libvirt_name("before-patch", foreign=True) == "before-patch"
    assert snap.is_ours("vmbackup-snap-x") and not snap.is_ours("x")


def test_backing_relative_and_none(tmp_path):
    img = tmp_path / "a.qcow2"
    _qcow2_with_backing(img, b"../b.qcow2")
    assert snap.qcow2_backing_file(str(img)) == str(tmp_path.parent / "b.qcow2")
    raw = tmp_path / "raw"
    raw.write_bytes(b"\0" * 100)
    assert snap.qcow2_backing_file(str(raw)) is None
    assert snap.qcow2_backing_file(str(tmp_path / "missing")) is None


def _params(**kw):
    return snap.SnapshotParams(**dict({"snapshot": "s1", "name": "vm1"}, **kw))


@pytest.mark.parametrize("kw, code", [
    ({"name": None}, "INVALID_ARGUMENT"),
    ({"uuid": "2f1c7d6e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"}, "INVALID_ARGUMENT"),
    ({"state": "gone"}, "INVALID_ARGUMENT"),
    ({"run_state": "asleep"}, "INVALID_ARGUMENT"),
    ({"quiesce": "maybe"}, "INVALID_ARGUMENT"),
    ({"quiesce_timeout": 0}, "INVALID_ARGUMENT"),
    ({"quiesce_timeout": float("nan")}, "INVALID_ARGUMENT"),
    ({"foreign": True}, "INVALID_ARGUMENT"),  # present + foreign
    ({"memory": True, "quiesce": "required"}, "INVALID_ARGUMENT"),
    ({"snapshot": "../x"}, "INVALID_NAME"),
    ({"name": ""}, "INVALID_NAME"),
])
def test_validate_refuses(kw, code):
    with pytest.raises(VmBackupError) as exc:
        snap.validate_params(_params(**kw))
    assert exc.value.error_code == code


def test_validate_names():
    assert snap.validate_params(_params()) == "vmbackup-snap-s1"
    assert snap.validate_params(_params(snapshot="manual 1", foreign=True, state="absent")) == "manual 1"


@pytest.mark.parametrize("requested, state, memory, expected", [
    ("as_snapshot", "disk-snapshot", "none", ("running", False)),
    ("as_snapshot", "shutoff", "none", ("shutoff", False)),
    ("as_snapshot", "paused", "external", ("paused", True)),
    ("as_snapshot", "running", "external", ("running", True)),
    ("shutoff", "running", "external", ("shutoff", False)),
    ("paused", "disk-snapshot", "none", ("paused", False)),
])
def test_run_state_after(requested, state, memory, expected):
    assert snap.run_state_after(requested, state, memory) == expected


def test_snapshot_xml():
    xml = snap.snapshot_xml("vmbackup-snap-a", "why", [{"target": "vda", "overlay": "/i/vda.qcow2.vmbackup-snap-a.qcow2"}],
                            ["hdc"], None)
    root = ET.fromstring(xml)
    assert root.findtext("name") == "vmbackup-snap-a" and root.findtext("description") == "why"
    assert root.find("memory").get("snapshot") == "no"
    disks = {d.get("name"): d for d in root.findall("./disks/disk")}
    assert disks["vda"].get("snapshot") == "external" and disks["vda"].find("source").get("file").endswith("-a.qcow2")
    assert disks["hdc"].get("snapshot") == "no"
    mem = ET.fromstring(snap.snapshot_xml("n", None, [], [], "/i/m.mem")).find("memory")
    assert (mem.get("snapshot"), mem.get("file")) == ("external", "/i/m.mem")


def test_repoint_disks():
    xml = ("<domain><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
           "<source file='/i/vda.qcow2.vmbackup-snap-b.qcow2' index='3'/><backingStore type='file'><source file='/i/x'/>"
           "</backingStore><target dev='vda'/></disk><disk type='file' device='disk'><driver name='qemu' type='raw'/>"
           "<source file='/i/vdb.raw'/><target dev='vdb'/></disk></devices></domain>")
    root = ET.fromstring(snap.repoint_disks(xml, {"vda": "/i/vda.qcow2.vmbackup-snap-a.qcow2"}))
    vda, vdb = root.findall("./devices/disk")
    assert vda.find("source").attrib == {"file": "/i/vda.qcow2.vmbackup-snap-a.qcow2"}
    assert vda.find("backingStore") is None and vda.find("driver").get("type") == "qcow2"
    assert vdb.find("source").get("file") == "/i/vdb.raw" and vdb.find("driver").get("type") == "raw"


def test_merge_failed_mark_is_added_once():
    once = snap.mark_merge_failed("before the patch")
    assert once.startswith("before the patch ") and snap.MERGE_FAILED_MARK in once
    assert snap.mark_merge_failed(once) == once
    xml = snap.with_description("<domainsnapshot><name>n</name></domainsnapshot>", once)
    assert ET.fromstring(xml).findtext("description") == once


def test_descendants_parents_first():
    tree = [{"name": "a", "parent": None}, {"name": "b", "parent": "a"}, {"name": "c", "parent": "b"},
            {"name": "d", "parent": "a"}, {"name": "x", "parent": None}]
    assert [s["name"] for s in snap.descendants(tree, "a")] == ["b", "d", "c"]
    assert [s["name"] for s in snap.descendants(tree, "c")] == []
    assert [s["name"] for s in snap.descendants(tree, "x")] == []
