# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for the pure parts of plugins/module_utils/_snapshot.py (no libvirt daemon)."""

from __future__ import annotations

import struct

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
