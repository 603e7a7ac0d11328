# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for the chain helpers of plugins/module_utils/_libvirt.py (external snapshots)."""

from __future__ import annotations

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _libvirt as lv


def node(name: str, *bitmaps: str) -> lv.BlockNode:
    return lv.BlockNode("vda", name, 64, {b: {"name": b, "granularity": 512} for b in bitmaps})


def test_sentinel_below_the_top_only():
    cp = "vmbackup-0123456789ab-1"
    top, mid, base = node("t", cp), node("m"), node("b", cp, lv.sentinel_name(cp))
    assert lv.sentinel_below([top, mid, base], cp) is base
    # The top's own sentinel is not "below": export reads the top with sentinel_state.
    assert lv.sentinel_below([base], cp) is None
    assert lv.sentinel_below([top, mid], cp) is None
    assert lv.sentinel_below([], cp) is None


LIVE_XML = """<domain><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/i/vda.snap.qcow2' index='3'/>
    <backingStore type='file' index='1'><format type='qcow2'/><source file='/i/vda.qcow2'/><backingStore/></backingStore>
    <target dev='vda' bus='virtio'/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/i/vdb.qcow2' index='2'/><backingStore/><target dev='vdb' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>
</devices></domain>"""


def test_disk_chains_walks_the_live_backing_chain_by_node_index(monkeypatch):
    nodes = [
        {"node-name": "libvirt-3-format", "image": {"virtual-size": 64}, "dirty-bitmaps": [{"name": "cp"}, {"granularity": 512}]},
        {"node-name": "libvirt-1-format", "image": {"virtual-size": 64}, "dirty-bitmaps": [{"name": "cp"}, {"name": "cp.size"}]},
        {"node-name": "libvirt-2-format", "image": {"virtual-size": 32}},
        {"node-name": "libvirt-1-storage"},
    ]
    monkeypatch.setattr(lv, "qmp", lambda dom, command, **args: nodes)
    monkeypatch.setattr(lv, "domain_xml", lambda dom, inactive: LIVE_XML)
    chains = lv.disk_chains(object())
    assert {tg: [(n.node, n.size, sorted(n.bitmaps)) for n in chain] for tg, chain in chains.items()} == {
        "vda": [("libvirt-3-format", 64, ["cp"]), ("libvirt-1-format", 64, ["cp", "cp.size"])],  # anonymous bitmaps left out
        "vdb": [("libvirt-2-format", 32, [])],
    }
    assert lv.sentinel_below(chains["vda"], "cp").node == "libvirt-1-format"


class JobDom:
    def __init__(self, jobs):
        self.jobs = jobs

    def blockJobInfo(self, target, flags):  # libvirt's name
        return self.jobs.get(target, {})


def test_block_jobs_names_the_kind_per_disk():
    dom = JobDom({"vda": {"type": 4, "cur": 1, "end": 1}, "vdb": {}, "vdc": {"type": 9}})
    assert lv.block_jobs(dom, ["vda", "vdb", "vdc", "vdd"]) == {"vda": "active-commit", "vdc": "9"}
