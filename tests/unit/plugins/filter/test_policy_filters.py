# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""plugins/filter/policy.py: JUnit XML (parsed back with xml.etree), Markdown, the summary and
domain_info's VMs as policy_check's vms, over results shaped as policy_check returns them."""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.vmbackup.libvirt.plugins.filter.policy import (FilterModule, policy_junit, policy_markdown, policy_summary,
                                                                        policy_vms)


UUIDS = {"web01": "11111111-2222-4333-8444-555555555555", "db|01": "21111111-2222-4333-8444-555555555555",
         "scratch": "31111111-2222-4333-8444-555555555555"}


def case(vm, rule, outcome, message, value=None, limit=None, host="hv1"):
    return {"vm": vm, "uuid": UUIDS.get(vm), "host": host, "class": "default",
            "rule": rule, "outcome": outcome, "message": message, "value": value, "limit": limit}


RESULT = {
    "repository": "/srv/vmbackup", "generated": "2026-11-27T08:00:00Z", "passed": False, "changed": False,
    "cases": [
        case(None, "discovery", "failed", "the VMs of hypervisor hv3 could not be listed (unreachable)", host="hv3"),
        case("web01", "rpo_hours", "failed", "newest point 2026-11-20T02:00:07Z is 171 h old, the policy allows 26 h", 171.0, 26),
        case("web01", "chain", "passed", "newest point X is restorable", True, True),
        case("db|01", "drill_days", "failed", "never drilled\nrun the drill", None, 35),
        case("scratch", "chain", "skipped", "VM scratch is excluded by the policy's pattern 'scratch*'"),
    ],
}
OTHER = {"repository": "/mnt/offsite", "generated": "2026-11-27T08:00:01Z", "passed": True,
         "cases": [case("web01", "rpo_hours", "passed", "fine", 2.0, 26)]}
BROKEN_ITEM = {"failed": True, "msg": "repository /mnt/gone does not exist", "error_code": "REPOSITORY_NOT_FOUND", "item": "/mnt/gone"}


def parse(xml: str):
    assert xml.startswith('<?xml version="1.0" encoding="UTF-8"?>\n')
    return ET.fromstring(xml.encode("utf-8"))


def test_junit_one_suite_per_repository_one_case_per_vm_and_rule():
    root = parse(policy_junit({"results": [RESULT, OTHER, BROKEN_ITEM, {"skipped": True, "item": "/x"}]}))
    assert root.tag == "testsuites"
    totals = {k: root.get(k) for k in ("tests", "failures", "errors", "skipped")}
    assert totals == {"tests": "7", "failures": "3", "errors": "1", "skipped": "1"}
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["/srv/vmbackup", "/mnt/offsite", "/mnt/gone"]
    assert suites[0].get("timestamp") == "2026-11-27T08:00:00"
    assert (suites[0].get("tests"), suites[0].get("failures"), suites[0].get("skipped")) == ("5", "3", "1")
    cases = [(c.get("classname"), c.get("name")) for c in suites[0].findall("testcase")]
    assert cases == [("host hv3", "discovery"), ("web01", "rpo_hours"), ("web01", "chain"), ("db|01", "drill_days"),
                     ("scratch", "chain")]
    rpo = suites[0].findall("testcase")[1].find("failure")
    assert rpo.get("message") == "newest point 2026-11-20T02:00:07Z is 171 h old, the policy allows 26 h"
    assert rpo.get("type") == "rpo_hours"
    assert rpo.text.splitlines()[1:] == ["value: 171.0", "limit: 26", "class: default", "uuid: 11111111-2222-4333-8444-555555555555",
                                         "host: hv1"]
    chain = suites[0].findall("testcase")[2]
    assert chain.find("failure") is None and chain.find("skipped") is None and chain.findtext("system-out").endswith("restorable")
    assert suites[0].findall("testcase")[4].find("skipped").get("message").startswith("VM scratch is excluded")
    error = suites[2].find("testcase").find("error")
    assert suites[2].find("testcase").get("name") == "read repository"
    assert error.get("message") == "REPOSITORY_NOT_FOUND: repository /mnt/gone does not exist"


def test_junit_survives_characters_xml_cannot_carry():
    result = copy.deepcopy(RESULT)
    result["cases"][1]["message"] = "manifest says \x00\x07 <&> \"quoted\" é"
    root = parse(policy_junit(result))
    failure = root.find("testsuite").findall("testcase")[1].find("failure")
    assert failure.get("message") == "manifest says \ufffd\ufffd <&> \"quoted\" é"


def test_junit_single_result_and_list_are_the_same_report():
    assert policy_junit(RESULT) == policy_junit([RESULT])


@pytest.mark.parametrize("bad", ["text", 3, [3], [{"repository": "/r", "cases": [{"rule": "x", "outcome": "maybe"}]}]])
def test_bad_input(bad):
    for fn in (policy_junit, policy_markdown, policy_summary):
        with pytest.raises(AnsibleFilterError):
            fn(bad)


def test_markdown_failures_first_then_counts():
    md = policy_markdown([RESULT, OTHER, BROKEN_ITEM])
    lines = md.splitlines()
    assert lines[0] == "## Backup policy check: FAILED"
    assert lines[2:4] == ["| Repository | VM | Host | Rule | Why |", "|---|---|---|---|---|"]
    assert lines[4] == "| /mnt/gone | - | - | read repository | REPOSITORY_NOT_FOUND: repository /mnt/gone does not exist |"
    assert lines[5].startswith("| /srv/vmbackup | host hv3 | hv3 | discovery | ")
    assert lines[7] == "| /srv/vmbackup | db\\|01 | hv1 | drill_days | never drilled run the drill |"  # one line, pipe escaped
    assert "3 failed, 2 passed, 1 skipped of 6 cases; 2 of 3 VMs fail; 3 repositories, 1 could not be read." in md
    assert md.endswith("Judged at 2026-11-27T08:00:00Z, 2026-11-27T08:00:01Z (the repository host's clock).\n")
    short = policy_markdown(RESULT, max_rows=1).splitlines()
    assert short[5] == "| ... | | | | 2 more failures: see the JUnit or JSON report |"
    assert policy_markdown(OTHER).startswith("## Backup policy check: PASSED\n\n0 failed, 1 passed")
    with pytest.raises(AnsibleFilterError):
        policy_markdown(RESULT, max_rows=-1)
    empty = policy_markdown(dict(OTHER, cases=[]))
    assert empty.startswith("## Backup policy check: PASSED\n") and "**No VM was judged**" in empty


def test_summary_for_set_stats():
    s = policy_summary({"results": [RESULT, OTHER, BROKEN_ITEM]})
    assert s["passed"] is False
    assert s["summary"] == {"repositories": 3, "cases": 6, "passed": 2, "failed": 3, "skipped": 1, "errors": 1, "vms": 3,
                            "failed_vms": 2}
    assert [(c["repository"], c["vm"], c["rule"]) for c in s["failed"]] == [
        ("/srv/vmbackup", None, "discovery"), ("/srv/vmbackup", "web01", "rpo_hours"), ("/srv/vmbackup", "db|01", "drill_days")]
    assert s["errors"] == [{"repository": "/mnt/gone", "repository_host": None,
                            "error": "REPOSITORY_NOT_FOUND: repository /mnt/gone does not exist"}]
    assert [r["passed"] for r in s["repositories"]] == [False, True, False] and "cases" not in s["repositories"][0]
    assert policy_summary(OTHER, details=True)["repositories"][0]["cases"] == OTHER["cases"]
    assert policy_summary(OTHER)["passed"] is True


def test_results_of_several_repository_hosts_are_labelled():
    """The playbook's per-host loops, each item labelled with its host: one path on two hosts is two suites."""
    loops = [{"results": [dict(OTHER, repository_host=host, item=OTHER["repository"])]} for host in ("hv1", "hv2")]
    root = parse(policy_junit(loops))
    assert [s.get("name") for s in root.findall("testsuite")] == ["hv1:/mnt/offsite", "hv2:/mnt/offsite"]
    assert "| hv2:/mnt/gone | - | - | read repository |" in policy_markdown(loops + [dict(BROKEN_ITEM, repository_host="hv2")])
    s = policy_summary(loops)
    assert [(r["repository_host"], r["repository"]) for r in s["repositories"]] == [("hv1", "/mnt/offsite"), ("hv2", "/mnt/offsite")]
    assert s["summary"]["repositories"] == 2 and s["summary"]["vms"] == 1  # the same VM (UUID) in both


DOMAINS = {"domains": [
    {"name": "web01", "uuid": "u1", "tier": "gold", "selected": True, "metadata": {"enabled": None}},
    {"name": "optout", "uuid": "u2", "tier": "default", "selected": False, "metadata": {"enabled": False}},
    {"name": "transient", "uuid": "u3", "tier": "default", "selected": False, "metadata": {"enabled": None}},
    {"name": "optin", "uuid": "u4", "tier": "default", "selected": True, "metadata": {"enabled": True}},
]}


def test_policy_vms_from_domain_info():
    assert policy_vms(DOMAINS, "hv1", ["hypervisors", "databases"]) == [
        {"name": "web01", "uuid": "u1", "host": "hv1", "tier": "gold", "enabled": None, "groups": ["databases", "hypervisors"]},
        {"name": "optout", "uuid": "u2", "host": "hv1", "tier": "default", "enabled": False, "groups": ["databases", "hypervisors"]},
        {"name": "optin", "uuid": "u4", "host": "hv1", "tier": "default", "enabled": True, "groups": ["databases", "hypervisors"]},
    ]
    assert policy_vms(DOMAINS["domains"][:1]) == [{"name": "web01", "uuid": "u1", "host": None, "tier": "gold", "enabled": None,
                                                   "groups": []}]
    for bad in ({"x": 1}, [{"uuid": "u"}]):
        with pytest.raises(AnsibleFilterError):
            policy_vms(bad)
    with pytest.raises(AnsibleFilterError):
        policy_vms(DOMAINS, "hv1", "hypervisors")


def test_filter_module_names():
    assert sorted(FilterModule().filters()) == ["policy_junit", "policy_markdown", "policy_summary", "policy_vms"]
