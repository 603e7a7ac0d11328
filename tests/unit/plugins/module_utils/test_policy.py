# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""plugins/module_utils/_policy.py: the policy's validation, each rule's verdict and message on
synthetic backup_info entries, the join with libvirt's VMs, and the backend over a repository
built on disk (read as backup_info reads it, nothing written)."""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import sys

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _policy
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_prune_backend import RepoBuilder, VM  # noqa: E402  pylint: disable=wrong-import-position

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 27, 8, 0, 0, tzinfo=UTC)
U1 = "11111111-2222-4333-8444-555555555555"
U2 = "66666666-7777-4888-8999-aaaaaaaaaaaa"


def iso(hours_ago: float) -> str:
    return (NOW - dt.timedelta(hours=hours_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def verdict(outcome="ok", hours_ago=1.0, current=True, codes=(), finding=None):
    return {"outcome": outcome, "level": "data", "verified": iso(hours_ago), "age_seconds": int(hours_ago * 3600),
            "current": current, "codes": list(codes), "first_finding": finding}


def a_set(n: int, hours_ago: float, type_="full", parent=None, restorable=True, readable=True, consistency="crash",
          verdict_=None, fault=None, series="default"):
    set_id = (NOW - dt.timedelta(hours=hours_ago)).strftime("%Y%m%dT%H%M%SZ") + f"-{n:03d}"
    return {"set_id": set_id, "type": type_ if readable else None, "series": series if readable else None,
            "parent": parent, "started": iso(hours_ago) if readable else None, "completed": iso(hours_ago - 0.1) if readable else None,
            "age_seconds": int((hours_ago - 0.1) * 3600) if readable else None, "consistency": consistency if readable else None,
            "readable": readable, "error": None if readable else "manifest.json is not valid JSON", "verdict": verdict_,
            "restorable": restorable, "restore_fault": fault, "bytes": 10}


def drill(outcome="ok", hours_ago=24.0, set_id="20261126T020000Z-001", failed_check=None, code=None):
    return {"set_id": set_id, "completed": iso(hours_ago), "age_seconds": int(hours_ago * 3600), "outcome": outcome,
            "host": "hv2", "failed_check": failed_check, "error_code": code, "current": True}


def entry(sets, name="web01", vm_uuid=U1, drill_=None, drill_ok=None):
    restorable = [s for s in sets if s["restorable"]]
    return {"uuid": vm_uuid, "name": name, "host": "hv1", "sets": sets, "series": [],
            "newest_restorable": {"set_id": restorable[-1]["set_id"], "started": restorable[-1]["started"]} if restorable else None,
            "totals": {"sets": len(sets), "bytes": 10 * len(sets)}, "drill": drill_, "drill_ok": drill_ok, "drills": 0}


def healthy(name="web01", vm_uuid=U1):
    full = a_set(1, 30, verdict_=verdict(hours_ago=20))
    inc = a_set(2, 6, "incremental", parent=full["set_id"], verdict_=verdict(hours_ago=5))
    return entry([full, inc], name, vm_uuid, drill(), drill())


def catalog(*entries):
    return {"repository": "/srv/vmbackup", "generated": "2026-11-27T08:00:00Z", "vms": list(entries)}


def run(policy=None, entries=(), vms=(), failures=None):
    result, warnings = _policy.evaluate(_policy.parse_policy(policy), catalog(*entries), _policy.parse_vms(list(vms)), NOW, failures)
    return result, warnings


def by_rule(result, vm="web01"):
    return {c["rule"]: c for c in result["cases"] if c["vm"] == vm}


# --------------------------------------------------------------------------- the policy
def test_defaults_and_normalised_policy():
    p = _policy.parse_policy(None)
    assert p.rules.values == _policy.DEFAULT_RULES and p.rules.expressions == []
    assert p.include == ["*"] and p.exclude == [] and p.classes == []
    d = _policy.parse_policy({"rules": {"rpo_hours": "25", "drill_days": None, "chain": False},
                              "classes": [{"name": "gold", "match": {"tier": "gold"}, "rules": {"rpo_hours": 12.5}}]}).as_dict()
    assert d["rules"]["rpo_hours"] == 25 and d["rules"]["drill_days"] is None and d["rules"]["chain"] is None
    # A class's rules lie over the defaults as given (drill off stays off, rpo from the class).
    assert d["classes"][0]["rules"]["rpo_hours"] == 12.5 and d["classes"][0]["rules"]["drill_days"] is None
    assert d["classes"][0]["match"] == {"tier": ["gold"]}
    json.dumps(d)  # the normalised policy is returned as is


@pytest.mark.parametrize("policy, key", [
    ({"rulez": {}}, "policy.rulez"),
    ({"rules": {"rpo_hour": 26}}, "rules.rpo_hour"),
    ({"rules": {"rpo_hours": -1}}, "rules.rpo_hours"),
    ({"rules": {"rpo_hours": 0}}, "rules.rpo_hours"),
    ({"rules": {"rpo_hours": True}}, "rules.rpo_hours"),
    ({"rules": {"rpo_hours": "26h"}}, "rules.rpo_hours"),
    ({"rules": {"rpo_hours": float("nan")}}, "rules.rpo_hours"),
    ({"rules": {"rpo_hours": float("inf")}}, "rules.rpo_hours"),
    ({"rules": {"verify_days": 10 ** 9}}, "rules.verify_days"),
    ({"rules": {"min_points": 1.5}}, "rules.min_points"),
    ({"rules": {"min_points": 0}}, "rules.min_points"),
    ({"rules": {"consistency": "app"}}, "rules.consistency"),
    ({"rules": {"chain": "maybe"}}, "rules.chain"),
    ({"rules": []}, "rules"),
    ({"rules": {"expressions": [{"name": "x", "expr": "length("}]}}, "rules.expressions[0].expr"),
    ({"rules": {"expressions": [{"name": "x", "exp": "a"}]}}, "rules.expressions[0].exp"),
    ({"rules": {"expressions": [{"name": "chain", "expr": "a"}]}}, "rules.expressions[0].name"),
    ({"rules": {"expressions": [{"name": "a b", "expr": "a"}]}}, "rules.expressions[0].name"),
    ({"rules": {"expressions": [{"name": "x", "expr": "a"}, {"name": "x", "expr": "b"}]}}, "rules.expressions[1].name"),
    ({"rules": {"expressions": [{"name": "x", "expr": ""}]}}, "rules.expressions[0].expr"),
    ({"classes": {"name": "gold"}}, "classes"),
    ({"classes": [{"name": "gold", "match": {"teir": "gold"}}]}, "classes[0].match.teir"),
    ({"classes": [{"name": "gold", "match": {}}]}, "classes[0].match"),
    ({"classes": [{"name": "gold"}]}, "classes[0].match"),
    ({"classes": [{"name": "default", "match": {"tier": "x"}}]}, "classes[0].name"),
    ({"classes": [{"name": "g", "match": {"tier": "x"}}, {"name": "g", "match": {"tier": "y"}}]}, "classes[1].name"),
    ({"classes": [{"name": "g", "match": {"tier": "x"}, "rules": {"rpo": 1}}]}, "classes[0].rules.rpo"),
    ({"classes": [{"name": "g", "match": {"names": [""]}}]}, "classes[0].match.names"),
    ({"exclude": "scratch-\n*"}, "exclude"),
    ({"include": [1]}, "include"),
])
def test_bad_policy_names_the_key(policy, key):
    with pytest.raises(VmBackupError) as err:
        _policy.parse_policy(policy)
    assert err.value.error_code == "INVALID_ARGUMENT"
    assert err.value.msg.startswith(f"policy: {key} ") and err.value.details["policy_key"] == key, err.value.msg


@pytest.mark.parametrize("vms, code", [
    ([{"name": ""}], "INVALID_NAME"),
    ([{"name": "a\nb"}], "INVALID_NAME"),
    ([{"name": "a", "uuid": "not-a-uuid"}], "INVALID_NAME"),
    ([{"name": "a", "groups": "hypervisors"}], "INVALID_ARGUMENT"),
    (["web01"], "INVALID_ARGUMENT"),
])
def test_bad_vms(vms, code):
    with pytest.raises(VmBackupError) as err:
        _policy.parse_vms(vms)
    assert err.value.error_code == code


# --------------------------------------------------------------------------- the rules
def test_healthy_vm_passes_every_rule_with_its_reason():
    result, warnings = run(entries=[healthy()])
    cases = by_rule(result)
    assert list(cases) == ["rpo_hours", "verify_days", "chain", "min_points", "consistency", "drill_days"]
    assert all(c["outcome"] == "passed" for c in cases.values()), cases
    assert cases["rpo_hours"]["message"] == (f"newest point {iso(6)} (set {result['cases'][0]['message'].split('(set ')[1].split(')')[0]}) "
                                             "is 6.0 h old, the policy allows 26 h")
    assert (cases["rpo_hours"]["value"], cases["rpo_hours"]["limit"]) == (6.0, 26)
    assert cases["chain"]["message"].endswith("is restorable (restore path of 2 sets, complete, no verdict blocks it)")
    assert cases["min_points"]["value"] == 2 and cases["drill_days"]["value"] == 1.0
    assert result["passed"] is True and result["summary"] == {"vms": 1, "cases": 6, "passed": 6, "failed": 0, "skipped": 0,
                                                              "failed_vms": 0}
    assert warnings == []


def test_stale_point_says_how_old_and_what_is_allowed():
    full = a_set(1, 171, verdict_=verdict(hours_ago=2))
    cases = by_rule(run(entries=[entry([full], drill_=drill(), drill_ok=drill())])[0])
    rpo = cases["rpo_hours"]
    assert rpo["outcome"] == "failed" and rpo["value"] == 171.0
    assert rpo["message"] == f"newest point {iso(171)} (set {full['set_id']}) is 171 h old, the policy allows 26 h"


def test_point_dated_in_the_future_fails_as_a_clock_fault():
    full = a_set(1, -5, verdict_=verdict(hours_ago=0))
    rpo = by_rule(run(entries=[entry([full])])[0])["rpo_hours"]
    assert rpo["outcome"] == "failed" and "in the future" in rpo["message"] and "clock" in rpo["message"]


@pytest.mark.parametrize("sets, outcome, words", [
    # a failed verdict on the parent blocks the newest point's verify rule, even when the newest verdict is ok
    (lambda: [a_set(1, 30, verdict_=verdict("failed", 3, codes=["CHECKSUM_MISMATCH"], finding="disks/vda.qcow2: sha256 differs")),
              a_set(2, 6, "incremental", parent="P", verdict_=verdict(hours_ago=1))],
     "failed", "which the newest point {1} builds on, failed verification on {v0} (CHECKSUM_MISMATCH): disks/vda.qcow2: sha256 differs"),
    (lambda: [a_set(1, 30, verdict_=verdict("unreadable"))], "failed", "the newest point (set {0}) has an unreadable verify verdict"),
    (lambda: [a_set(1, 30)], "failed", "no set of the VM was ever verified ok (1 sets)"),
    (lambda: [a_set(1, 300, verdict_=verdict(hours_ago=9 * 24))], "failed", "is 9.0 days old, the policy allows 8 days"),
    (lambda: [a_set(1, 30, verdict_=verdict(current=False))], "failed", "is stale: the set's manifest changed after it was verified"),
    (lambda: [a_set(1, 30, verdict_=verdict(hours_ago=-36))], "failed", "is dated 1.5 days in the future: a clock is wrong"),
    # the newest ok verdict of any set counts for freshness (a new chain not verified yet)
    (lambda: [a_set(1, 60, verdict_=verdict(hours_ago=50)), a_set(2, 3)], "passed", "newest ok verdict (set {0}, verified"),
    # a failed verdict on another chain does not block the newest point's path
    (lambda: [a_set(1, 60, verdict_=verdict("failed")), a_set(2, 3, verdict_=verdict(hours_ago=1))], "passed", "0.0 days old"),
])
def test_verify_rule(sets, outcome, words):
    made = sets()
    if len(made) == 2 and made[1]["type"] == "incremental":
        made[1]["parent"] = made[0]["set_id"]
    case = by_rule(run(entries=[entry(made)])[0])["verify_days"]
    expected = words.format(*[s["set_id"] for s in made], v0=made[0]["verdict"]["verified"] if made[0]["verdict"] else None)
    assert case["outcome"] == outcome and expected in case["message"], case["message"]


def test_chain_and_min_points():
    good = a_set(1, 50)
    bad = a_set(2, 5, "incremental", parent=good["set_id"], restorable=False,
                fault="set 20261126T020000Z-001 failed verification on 2026-11-26T03:00:00Z (CHECKSUM_MISMATCH)")
    cases = by_rule(run({"rules": {"min_points": 2}}, entries=[entry([good, bad])])[0])
    assert cases["chain"]["outcome"] == "failed" and cases["chain"]["value"] is False
    assert cases["chain"]["message"] == (f"newest point {bad['set_id']} is not restorable: {bad['restore_fault']}; "
                                         f"the newest restorable point is {good['set_id']} ({good['started']})")
    assert cases["min_points"]["outcome"] == "failed"
    assert cases["min_points"]["message"] == "1 restorable point (of 2 sets), the policy requires at least 2"


def test_unreadable_newest_set():
    ok = a_set(1, 50, verdict_=verdict())
    broken = a_set(2, 5, readable=False, restorable=False, fault="manifest.json is not valid JSON")
    cases = by_rule(run(entries=[entry([ok, broken])])[0])
    assert cases["chain"]["outcome"] == "failed" and "not valid JSON" in cases["chain"]["message"]
    assert cases["rpo_hours"]["outcome"] == "failed" and "50 h old" in cases["rpo_hours"]["message"]  # the newest readable point
    only_broken = by_rule(run(entries=[entry([a_set(1, 5, readable=False, restorable=False, fault="x")])])[0])
    assert all(c["outcome"] == "failed" for c in only_broken.values()), only_broken
    assert "unreadable" in only_broken["rpo_hours"]["message"]


@pytest.mark.parametrize("have, required, outcome", [
    ("crash", "crash", "passed"), ("application", "crash", "passed"), ("application", "application", "passed"),
    ("crash", "application", "failed"),
])
def test_consistency(have, required, outcome):
    case = by_rule(run({"rules": {"consistency": required}}, entries=[entry([a_set(1, 3, consistency=have)])])[0])["consistency"]
    assert case["outcome"] == outcome and case["value"] == have and case["limit"] == required
    if outcome == "failed":
        assert "the policy requires application-consistent" in case["message"] and "guest agent" in case["message"]


@pytest.mark.parametrize("newest, passed, outcome, words", [
    (None, None, "failed", "never drilled"),
    (drill("failed", 2, failed_check="fsck", code="DRILL_FAILED"), drill("ok", 100), "failed",
     "the newest drill (set 20261126T020000Z-001, {t} on hv2) failed its fsck check (DRILL_FAILED)"),
    (drill("unreadable"), drill("ok", 5), "failed", "is unreadable"),
    # a drill that could not run (error) does not hide an older passed one
    (drill("error", 1), drill("ok", 24 * 3), "passed", "is 3.0 days old, the policy allows 35 days"),
    (drill("error", 1), None, "failed", "no drill passed: the newest drill"),
    (drill("ok", 24 * 40), drill("ok", 24 * 40), "failed", "is 40 days old, the policy allows 35 days"),
    (drill("ok", -48), drill("ok", -48), "failed", "is dated 2.0 days in the future: a clock is wrong"),
])
def test_drill_rule(newest, passed, outcome, words):
    case = by_rule(run(entries=[entry([a_set(1, 3)], drill_=newest, drill_ok=passed)])[0])["drill_days"]
    assert case["outcome"] == outcome and words.format(t=(newest or {}).get("completed")) in case["message"], case["message"]


@pytest.mark.parametrize("expr, outcome, value", [
    ("length(sets) >= `2`", "passed", True),
    ("length(sets) >= `3`", "failed", False),
    ("sets[?series=='weekly']", "failed", "[]"),  # JMESPath truth: an empty list is false
    ("totals.sets", "passed", 2),
    ("`0`", "passed", 0),  # ... and 0 is true
    ("drill.outcome", "passed", "ok"),
    ("nothing.here", "failed", None),
])
def test_expressions_use_jmespath_truth(expr, outcome, value):
    policy = {"rules": {"expressions": [{"name": "custom", "expr": expr, "message": "the custom rule"}]}}
    case = by_rule(run(policy, entries=[healthy()])[0])["custom"]
    assert (case["outcome"], case["value"], case["limit"]) == (outcome, value, expr), case
    if outcome == "failed":
        assert case["message"].startswith("the custom rule (value ")


def test_expression_type_error_fails_that_vm_only():
    policy = {"rules": {"expressions": [{"name": "sum", "expr": "sum(sets[].set_id) > `0`"}]}}
    case = by_rule(run(policy, entries=[healthy()])[0])["sum"]
    assert case["outcome"] == "failed" and "could not be evaluated" in case["message"]


def test_long_expression_value_is_cut():
    policy = {"rules": {"expressions": [{"name": "all", "expr": "sets"}]}}
    case = by_rule(run(policy, entries=[healthy()])[0])["all"]
    assert case["outcome"] == "passed" and len(case["value"]) == _policy.MAX_EXPRESSION_VALUE + 3


# --------------------------------------------------------------------------- VMs, classes, skips
def test_libvirt_vm_without_backup_fails_every_rule():
    result, dummy = run({"rules": {"expressions": [{"name": "x", "expr": "sets"}]}}, entries=[healthy()],
                        vms=[{"name": "web01", "uuid": U1, "host": "hv1"}, {"name": "db01", "uuid": U2, "host": "hv2"}])
    db = by_rule(result, "db01")
    assert list(db) == ["rpo_hours", "verify_days", "chain", "min_points", "consistency", "drill_days", "x"]
    assert all(c["outcome"] == "failed" and c["message"] == "VM db01 has no backup in repository /srv/vmbackup "
               "(it is defined in libvirt on hv2)" for c in db.values())
    assert db["x"]["limit"] == "sets"
    vms = {v["name"]: v for v in result["vms"]}
    assert vms["db01"] == {"name": "db01", "uuid": U2, "host": "hv2", "class": "default", "in_libvirt": True,
                           "in_repository": False, "skipped": None, "passed": False, "failed_rules": list(db)}
    assert vms["web01"]["in_libvirt"] and vms["web01"]["in_repository"] and vms["web01"]["passed"]
    assert result["summary"]["failed_vms"] == 1 and result["passed"] is False


def test_join_by_uuid_then_by_name():
    # A libvirt VM with another UUID than the backed-up one of the same name is another VM (redefined):
    # it has no backup, and the old one is judged from the repository.
    result, dummy = run(entries=[healthy()], vms=[{"name": "web01", "uuid": U2, "host": "hv1"}])
    assert sorted((v["uuid"], v["in_libvirt"], v["in_repository"]) for v in result["vms"]) == [(U1, False, True), (U2, True, False)]
    # Without a UUID the name joins them.
    result, dummy = run(entries=[healthy()], vms=[{"name": "web01", "host": "hv1", "tier": "gold"}])
    assert [(v["uuid"], v["in_libvirt"], v["in_repository"]) for v in result["vms"]] == [(None, True, True)]


def test_classes_first_match_wins_and_match_keys():
    policy = {"rules": {"rpo_hours": 26},
              "classes": [{"name": "gold-db", "match": {"tier": ["gold"], "groups": ["databases"]}, "rules": {"rpo_hours": 1}},
                          {"name": "gold", "match": {"tier": "gold"}, "rules": {"rpo_hours": 2}},
                          {"name": "web", "match": {"names": ["web*"]}, "rules": {"rpo_hours": 3, "drill_days": None}},
                          {"name": "unused", "match": {"names": ["nothing-*"]}}]}
    entries = [healthy("db01", U1), healthy("db02", U2), healthy("web01", "aaaaaaaa-7777-4888-8999-aaaaaaaaaaaa"),
               healthy("mail", "bbbbbbbb-7777-4888-8999-aaaaaaaaaaaa")]
    vms = [{"name": "db01", "uuid": U1, "tier": "gold", "groups": ["databases", "hypervisors"]},
           {"name": "db02", "uuid": U2, "tier": "gold", "groups": ["hypervisors"]}]
    result, warnings = run(policy, entries=entries, vms=vms)
    classes = {v["name"]: v["class"] for v in result["vms"]}
    assert classes == {"db01": "gold-db", "db02": "gold", "web01": "web", "mail": "default"}
    limits = {c["vm"]: c["limit"] for c in result["cases"] if c["rule"] == "rpo_hours"}
    assert limits == {"db01": 1, "db02": 2, "web01": 3, "mail": 26}
    assert "drill_days" not in by_rule(result, "web01") and "drill_days" in by_rule(result, "mail")
    assert warnings == ["policy class 'unused' matches no VM"]


def test_skips_and_include():
    entries = [healthy("web01", U1), healthy("scratch-1", U2)]
    vms = [{"name": "web01", "uuid": U1, "host": "hv1", "enabled": False}, {"name": "scratch-1", "uuid": U2, "host": "hv1"},
           {"name": "other", "host": "hv1"}]
    result, warnings = run({"exclude": ["scratch-*", "typo-*"], "include": ["web*", "scratch*"]}, entries=entries, vms=vms)
    assert {c["vm"] for c in result["cases"]} == {"web01", "scratch-1"}  # 'other' is not included at all
    assert {c["outcome"] for c in result["cases"]} == {"skipped"} and result["passed"] is True
    assert by_rule(result, "web01")["chain"]["message"] == "VM web01 is opted out of backups by its libvirt metadata (enabled=no) on hv1"
    assert by_rule(result, "scratch-1")["chain"]["message"] == "VM scratch-1 is excluded by the policy's pattern 'scratch-*'"
    assert result["summary"]["skipped"] == 12 and {v["skipped"] is not None for v in result["vms"]} == {True}
    assert warnings == ["policy exclude pattern 'typo-*' matches no VM"]


def test_discovery_failure_is_a_failed_case_and_duplicates_are_judged_once():
    result, warnings = run(entries=[healthy()], vms=[{"name": "web01", "uuid": U1, "host": "hv1"},
                                                     {"name": "web01", "uuid": U1, "host": "hv2"}],
                           failures=[{"host": "hv3", "msg": "unreachable: ssh timed out"}])
    assert result["cases"][0] == {"vm": None, "uuid": None, "host": "hv3", "class": None, "rule": "discovery", "outcome": "failed",
                                  "message": "the VMs of hypervisor hv3 could not be listed (unreachable: ssh timed out); its VMs "
                                             "without a backup cannot be found, so the check cannot pass", "value": None, "limit": None}
    assert result["passed"] is False and len(result["vms"]) == 1
    assert warnings and "listed twice" in warnings[0]
    assert _policy.summary_message(result).startswith("policy violated in /srv/vmbackup: 1 of 7 cases failed, 0 of 1 VMs (host hv3: discovery)")


def test_nothing_judged_is_a_warning():
    result, warnings = run({"include": ["nothing-*"]}, entries=[healthy()])
    assert result["passed"] is True and result["cases"] == []
    assert any(w.startswith("no VM was judged") for w in warnings), warnings


def test_summary_message_when_met():
    result, dummy = run(entries=[healthy()])
    assert _policy.summary_message(result) == "policy met in /srv/vmbackup: 1 VMs, 6 cases passed, 0 skipped"


# --------------------------------------------------------------------------- the backend on a repository
def tree(root: str) -> dict[str, tuple]:
    out = {}
    for base, dirs, files in os.walk(root):
        for name in ["."] + dirs + files:
            st = os.lstat(os.path.join(base, name))
            out[os.path.relpath(os.path.join(base, name), root)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def backend(builder: RepoBuilder, check: bool = False, **params):
    return _policy.PolicyBackend(_policy.PolicyParams(repository=builder.repo.path, **params), run=None,
                                 qemu_img_path="/usr/bin/qemu-img", check_mode=check)


@pytest.fixture
def builder(tmp_path) -> RepoBuilder:
    return RepoBuilder(str(tmp_path / "base" / "repo"))


def test_backend_reads_the_catalog_and_writes_nothing(builder):
    ids = builder.chain([0, 1, 2])
    builder.verdict(ids[1], "failed")
    before = tree(builder.repo.path)
    with pytest.raises(VmBackupError) as err:
        backend(builder, policy={"rules": {"min_points": 2}}, vms=[{"name": "nobk", "host": "hv1"}]).run()
    assert err.value.error_code == "POLICY_VIOLATED"
    details = err.value.details
    assert details["changed"] is False and details["passed"] is False
    web = {c["rule"]: c for c in details["cases"] if c["vm"] == "web-01"}
    assert web["chain"]["outcome"] == "failed" and f"set {ids[1]}" in web["chain"]["message"]
    assert web["verify_days"]["message"].startswith(f"set {ids[1]}, which the newest point {ids[2]} builds on, failed verification")
    assert web["min_points"]["value"] == 1 and web["drill_days"]["message"].startswith("never drilled")
    assert {c["outcome"] for c in details["cases"] if c["vm"] == "nobk"} == {"failed"}
    assert tree(builder.repo.path) == before  # no lock file, no sidecar, nothing touched
    # Reported rather than failed, and check mode is the same evaluation.
    real = backend(builder, policy={"rules": {"min_points": 2}}, fail_on_violation=False).run()
    checked = backend(builder, check=True, policy={"rules": {"min_points": 2}}, fail_on_violation=False).run()
    assert real["changed"] is False and real["passed"] is False and real["msg"].startswith("policy violated in ")
    seen = [(c["rule"], c["outcome"], c["message"]) for c in checked["cases"]]
    assert seen == [(c["rule"], c["outcome"], c["message"]) for c in real["cases"]]
    assert {c["uuid"] for c in real["cases"]} == {VM}
    assert tree(builder.repo.path) == before


def test_backend_checks_the_policy_before_reading(tmp_path):
    with pytest.raises(VmBackupError) as err:
        _policy.PolicyBackend(_policy.PolicyParams(repository=str(tmp_path / "missing"), policy={"rule": {}}), run=None,
                              qemu_img_path="x", check_mode=False).run()
    assert err.value.error_code == "INVALID_ARGUMENT" and "policy.rule" in err.value.msg
    with pytest.raises(VmBackupError) as err:
        _policy.PolicyBackend(_policy.PolicyParams(repository=str(tmp_path / "missing")), run=None, qemu_img_path="x",
                              check_mode=False).run()
    assert err.value.error_code == "REPOSITORY_NOT_FOUND"
    with pytest.raises(VmBackupError) as err:
        _policy.PolicyBackend(_policy.PolicyParams(repository="relative/repo"), run=None, qemu_img_path="x", check_mode=False).run()
    assert err.value.error_code == "PATH_ESCAPE"


# --------------------------------------------------------------------------- the documented policies
DOCS = pathlib.Path(__file__).resolve().parents[4] / "docs"


def test_documented_policies_are_valid():
    """The policies users copy (the CI example's policy file, the YAML blocks of docs/policy-check.md) parse."""
    import re  # pylint: disable=import-outside-toplevel

    import yaml  # pylint: disable=import-outside-toplevel

    example = yaml.safe_load((DOCS / "examples" / "ci" / "policy.yml").read_text())
    assert _policy.parse_policy(example["vmbackup_policy"]).classes[0].name == "gold"
    blocks = re.findall(r"^```yaml\n(.*?)^```", (DOCS / "policy-check.md").read_text(), re.S | re.M)
    policies = [yaml.safe_load(b) for b in blocks]
    assert _policy.parse_policy(policies[0]["vmbackup_policy"]).as_dict()["rules"]["min_points"] == 2
    parsed = _policy.parse_policy({"rules": policies[1]})
    assert [e.name for e in parsed.rules.expressions] == ["monthly_series", "weekly_recent", "all_verified"]
    assert by_rule(run({"rules": policies[1]}, entries=[healthy()])[0])["all_verified"]["outcome"] == "passed"


def test_scale_thousands_of_vms_in_linear_time():
    """2 000 VMs of 12 sets each, 2 000 more in libvirt without a backup: well under a second's work per thousand."""
    import time  # pylint: disable=import-outside-toplevel

    entries = []
    for i in range(2000):
        sets = [a_set(1, 300, verdict_=verdict(hours_ago=200))]
        for n in range(2, 13):
            sets.append(a_set(n, 300 - n * 20, "incremental", parent=sets[-1]["set_id"]))
        entries.append(entry(sets, f"vm{i:05d}", f"{i:08x}-2222-4333-8444-555555555555", drill(), drill()))
    vms = [{"name": f"new{i:05d}", "uuid": f"{i:08x}-9999-4333-8444-555555555555", "host": "hv1"} for i in range(2000)]
    started = time.monotonic()
    result, dummy = run({"rules": {"expressions": [{"name": "n", "expr": "length(sets) > `1`"}]}}, entries=entries, vms=vms)
    elapsed = time.monotonic() - started
    assert result["summary"]["vms"] == 4000 and result["summary"]["cases"] == 4000 * 7
    assert elapsed < 20, elapsed  # about 1 s here; a quadratic join or path walk would take minutes
