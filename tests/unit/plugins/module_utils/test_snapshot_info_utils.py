# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for the pure parts of plugins/module_utils/_snapshot_info.py (no libvirt daemon)."""

from __future__ import annotations

import os

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _snapshot_info as si


def test_checkpoint_xml_with_sizes_and_a_disk_without_bitmap():
    xml = """<domaincheckpoint><name>vmbackup-0123456789ab-3</name><description>d</description>
      <parent><name>vmbackup-0123456789ab-2</name></parent><creationTime>1796135311</creationTime>
      <disks><disk name='vda' checkpoint='bitmap' bitmap='vmbackup-0123456789ab-3' size='1048576'/>
             <disk name='vdb' checkpoint='bitmap' bitmap='vmbackup-0123456789ab-3'/>
             <disk name='vdc' checkpoint='no'/></disks></domaincheckpoint>"""
    cp = si.parse_checkpoint(xml)
    assert cp == {
        "name": "vmbackup-0123456789ab-3", "ours": True, "created": "2026-12-01T14:28:31Z",
        "parent": "vmbackup-0123456789ab-2", "description": "d",
        "disks": [{"target": "vda", "bitmap": "vmbackup-0123456789ab-3", "dirty_bytes": 1048576},
                  {"target": "vdb", "bitmap": "vmbackup-0123456789ab-3", "dirty_bytes": None},
                  {"target": "vdc", "bitmap": None, "dirty_bytes": None}],
    }


@pytest.mark.parametrize("name, ours", [
    ("vmbackup-0123456789ab-0", True),
    ("vmbackup-snap-x", False),      # a snapshot's prefix is not a checkpoint of ours
    ("foreign", False),
    ("vmbackup-0123456789ab", False),
])
def test_checkpoint_ownership_follows_the_name_rule(name, ours):
    assert si.parse_checkpoint(f"<domaincheckpoint><name>{name}</name></domaincheckpoint>")["ours"] is ours


@pytest.mark.parametrize("value, expected", [("0", "1970-01-01T00:00:00Z"), (None, None), ("x", None), ("99999999999999999", None)])
def test_epoch_to_iso(value, expected):
    assert si.iso_from_epoch(value) == expected


def test_chain_entry_reads_bitmaps_and_backing(tmp_path):
    img = tmp_path / "a.qcow2"
    img.write_bytes(b"x" * 10)
    info = {"filename": str(img), "format": "qcow2", "virtual-size": 64, "actual-size": 4096,
            "full-backing-filename": "/b.qcow2", "backing-filename": "b.qcow2",
            "format-specific": {"type": "qcow2", "data": {"bitmaps": [{"name": "m", "flags": ["auto"]}]}}}
    assert si.chain_entry(info) == {"filename": str(img), "format": "qcow2", "virtual_size": 64, "allocated_bytes": 4096,
                                    "file_bytes": 10, "backing_filename": "/b.qcow2", "bitmaps": ["m"]}


def test_file_bytes_is_none_for_links_relative_paths_and_missing_files(tmp_path):
    real = tmp_path / "r"
    real.write_bytes(b"abc")
    link = tmp_path / "l"
    os.symlink(real, link)
    assert si.file_bytes(str(real)) == 3
    assert si.file_bytes(str(link)) is None
    assert si.file_bytes("r") is None
    assert si.file_bytes(str(tmp_path / "missing")) is None
    assert si.file_bytes(None) is None
