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


def test_carry_copies_only_missing_sentinels(monkeypatch):
    calls = []
    monkeypatch.setattr(lv, "qmp", lambda dom, command, **args: calls.append((command, args)))
    a, b = "vmbackup-0123456789ab-1", "vmbackup-0123456789ab-2"
    src = node("src", lv.sentinel_name(a), lv.sentinel_name(b))
    dst = node("dst", lv.sentinel_name(b))
    assert lv.carry_sentinels(object(), src, dst, [a, b, "vmbackup-0123456789ab-9"]) == [lv.sentinel_name(a)]
    assert calls == [
        ("block-dirty-bitmap-add", {"node": "dst", "name": lv.sentinel_name(a), "granularity": 512, "persistent": True,
                                    "disabled": True}),
        ("block-dirty-bitmap-merge", {"node": "dst", "target": lv.sentinel_name(a), "bitmaps": [{"node": "src", "name": lv.sentinel_name(a)}]}),
    ]
