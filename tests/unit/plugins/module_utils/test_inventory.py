# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for the VM selection rules of plugins/module_utils/_inventory.py (no libvirt daemon)."""

from __future__ import annotations

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _inventory as inv
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError


@pytest.mark.parametrize("xml, enabled, tier, error", [
    (None, None, None, None),
    ('<backup enabled="no" tier="gold"/>', False, "gold", None),
    ('<backup enabled="yes"/>', True, None, None),
    ('<backup enabled="TRUE"/>', True, None, None),
    ('<backup enabled="off"/>', False, None, None),
    ('<backup tier="silver.2"/>', None, "silver.2", None),
    ('<backup/>', None, None, None),
    ('<backup enabled="maybe"/>', None, None, "neither yes nor no"),
    ('<backup tier="gold tier"/>', None, None, "is not a name"),
    ('<backup tier=""/>', None, None, "is not a name"),
    ('<backup enable="no"/>', None, None, "unknown attribute(s) enable"),
    ('<policy enabled="no"/>', None, None, "expected <backup>"),
    ('<vb:backup xmlns:vb="https://vmbackup.libvirt/schema/1" enabled="no"/>', False, None, None),
    ('<backup', None, None, "not XML"),
])
def test_parse_metadata(xml, enabled, tier, error):
    md = inv.parse_metadata(xml)
    assert md.present is (xml is not None)
    assert md.enabled is enabled
    assert md.tier == tier
    if error is None:
        assert md.error is None
    else:
        assert error in md.error


def dom(name="web01", state="running", persistent=True, md=None):
    return inv.Domain(name=name, uuid="00000000-0000-4000-8000-000000000001", state=state, active=state in ("running", "paused"),
                      persistent=persistent, metadata=inv.parse_metadata(md))


R = inv.Rules


@pytest.mark.parametrize("domain, rules, selected, reason", [
    (dom(), R(), True, "selected (tier 'default', live backup)"),
    (dom(state="shutoff"), R(), True, "copy of the shut-off VM"),
    (dom(state="paused"), R(), True, "live backup"),
    (dom(state="shutoff"), R(include_shutoff=False), False, "shutoff (include_shutoff is not set)"),
    (dom(persistent=False), R(), False, "transient domain"),
    (dom(persistent=False), R(include_transient=True), True, "selected"),
    # patterns: fnmatch, case-sensitive, exclude wins
    (dom(), R(include=("web*",)), True, "selected"),
    (dom(), R(include=("WEB*",)), False, "matches no include pattern (WEB*)"),
    (dom(), R(include=("db*", "web0?")), True, "selected"),
    (dom(), R(include=("*",), exclude=("*01",)), False, "exclude pattern '*01'"),
    (dom(), R(include=(), exclude=()), False, "none given"),
    (dom(name="web[1]"), R(include=("web[[]1]",)), True, "selected"),
    # metadata opt-out wins over every pattern; opt-in when required
    (dom(md='<backup enabled="no"/>'), R(include=("web01",)), False, "opted out"),
    (dom(md='<backup enabled="yes"/>'), R(require_opt_in=True), True, "selected"),
    (dom(), R(require_opt_in=True), False, "no opt-in"),
    (dom(md='<backup enabled="maybe"/>'), R(require_opt_in=True), False, "no opt-in"),
    (dom(md='<backup enabled="no"/>'), R(include_transient=True, require_opt_in=False), False, "opted out"),
    # tiers
    (dom(md='<backup tier="gold"/>'), R(tiers=("gold",)), True, "tier 'gold'"),
    (dom(md='<backup tier="bronze"/>'), R(tiers=("gold", "silver")), False, "tier 'bronze' is not one of gold, silver"),
    (dom(), R(tiers=("gold",)), False, "tier 'default' is not one of gold"),
    (dom(), R(tiers=("default",)), True, "selected"),
    # malformed metadata: in doubt, back it up, and say so
    (dom(md='<backup enabled="maybe"/>'), R(), True, "metadata is malformed"),
    (dom(md='<backup tier="a b"/>'), R(tiers=("default",)), True, "metadata is malformed"),
    (dom(md='<backup tier="a b"/>'), R(tiers=("gold",)), False, "tier 'default'"),
])
def test_select(domain, rules, selected, reason):
    choice = inv.select(domain, rules)
    assert choice.selected is selected
    assert reason in choice.reason


@pytest.mark.parametrize("names, patterns, unmatched", [
    ([], ["web*"], ["web*"]),
    (["web01", "db01"], ["web*", "mail*", "db01"], ["mail*"]),
    (["web01"], [], []),
])
def test_unmatched_patterns(names, patterns, unmatched):
    assert inv.unmatched_patterns(names, patterns) == unmatched


@pytest.mark.parametrize("include, exclude, tiers, code", [
    (["ok*"], [], ["gold"], None),
    ([""], [], [], "INVALID_ARGUMENT"),
    (["a\nb"], [], [], "INVALID_ARGUMENT"),
    ([], ["x\x00"], [], "INVALID_ARGUMENT"),
    ([], [], ["go ld"], "INVALID_NAME"),
    ([], [], ["-gold"], "INVALID_NAME"),
])
def test_validate_rules(include, exclude, tiers, code):
    if code is None:
        inv.validate_rules(include, exclude, tiers)
        return
    with pytest.raises(VmBackupError) as err:
        inv.validate_rules(include, exclude, tiers)
    assert err.value.error_code == code


@pytest.mark.parametrize("xml, quiesce, error", [
    ('<backup quiesce="required"/>', "required", None),
    ('<backup quiesce="never" tier="gold"/>', "never", None),
    ('<backup quiesce=" Auto "/>', "auto", None),
    ('<backup/>', None, None),
    ('<backup quiesce="sometimes"/>', None, "quiesce='sometimes' is not one of auto, required, never"),
    ('<backup quiesce=""/>', None, "is not one of"),
    ('<backup quiesce="required" freeze="yes"/>', "required", "unknown attribute(s) freeze"),
])
def test_metadata_quiesce_policy(xml, quiesce, error):
    md = inv.parse_metadata(xml)
    assert md.quiesce == quiesce
    if error is None:
        assert md.error is None
    else:
        assert error in md.error


def test_quiesce_policies_match_the_export_option():
    from ansible_collections.vmbackup.libvirt.plugins.module_utils import _quiesce
    assert inv.QUIESCE_POLICIES == tuple(_quiesce.QUIESCE_POLICIES)


def test_result_shows_the_metadata_quiesce_policy():
    domain = inv.Domain("a", "u", "running", True, True, metadata=inv.parse_metadata('<backup quiesce="never"/>'))
    out = inv.as_result(domain, inv.select(domain, inv.Rules()))
    assert out["metadata"]["quiesce"] == "never" and out["selected"]
