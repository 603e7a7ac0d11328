# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The policy check filters: ``policy_junit``, ``policy_markdown``, ``policy_summary`` and ``policy_vms``.

Pure functions on the controller over the results of ``vmbackup.libvirt.policy_check``: one
result, a list of them, or a registered loop (``{"results": [...]}``), in which an item that
failed before it judged anything (a repository that cannot be read) has no cases and is
reported as an error. ``policy_vms`` turns a ``domain_info`` result into policy_check's ``vms``.
Docs in policy_junit.yml, policy_markdown.yml, policy_summary.yml and policy_vms.yml.
"""

from __future__ import annotations

import json
import re
import typing as t
import xml.etree.ElementTree as ET

from ansible.errors import AnsibleFilterError

OUTCOMES = ("passed", "failed", "skipped")
# XML 1.0 cannot carry these at all (not even as character references); a message quoting a
# damaged manifest must not make the whole report unparsable.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
SUITES_NAME = "vmbackup.libvirt policy check"


def _results(data: t.Any, what: str) -> list[dict[str, t.Any]]:
    """The policy_check results in ``data``, each with ``repository``, ``cases`` (None for an error) and ``error``."""
    if isinstance(data, t.Mapping) and "cases" not in data and isinstance(data.get("results"), list):
        data = data["results"]  # a registered loop
    if isinstance(data, t.Mapping):
        data = [data]
    if not isinstance(data, (list, tuple)):
        raise AnsibleFilterError(f"{what}: give a policy_check result, a list of them or a registered loop of them, "
                                 f"not {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, t.Mapping):
            raise AnsibleFilterError(f"{what}: item {i} is not a policy_check result")
        if item.get("skipped") is True and "cases" not in item:
            continue  # a loop item skipped by a condition judged nothing
        repository = item.get("repository") or (item.get("item") if isinstance(item.get("item"), str) else None) or f"result {i}"
        cases = item.get("cases")
        if not isinstance(cases, list):
            msg = item.get("msg") or "policy_check returned no cases"
            code = item.get("error_code")
            out.append({"repository": repository, "generated": item.get("generated"), "cases": None,
                        "error": f"{code}: {msg}" if code else str(msg)})
            continue
        for case in cases:
            if not isinstance(case, t.Mapping) or case.get("outcome") not in OUTCOMES or not case.get("rule"):
                raise AnsibleFilterError(f"{what}: a case of {repository} is not a policy_check case: {case!r}")
        out.append({"repository": repository, "generated": item.get("generated"), "cases": list(cases), "error": None})
    return out


def _text(value: t.Any) -> str:
    return _XML_INVALID.sub("\ufffd", "" if value is None else str(value))


def _shown(value: t.Any) -> str:
    """A value as JSON shows it (true, 26, 0.5), text as it is."""
    return _text(value) if isinstance(value, str) else _text(json.dumps(value, sort_keys=True, default=str))


def _classname(case: t.Mapping[str, t.Any]) -> str:
    return str(case.get("vm") or case.get("uuid") or (f"host {case['host']}" if case.get("host") else "?"))


def _counts(results: list[dict[str, t.Any]]) -> dict[str, int]:
    cases = [c for r in results for c in r["cases"] or []]
    return {
        "repositories": len(results),
        "cases": len(cases),
        **{o: sum(1 for c in cases if c["outcome"] == o) for o in OUTCOMES},
        "errors": sum(1 for r in results if r["error"] is not None),
        "vms": len({(r["repository"], c.get("uuid") or c.get("vm")) for r in results for c in r["cases"] or [] if c.get("vm")}),
        "failed_vms": len({(r["repository"], c.get("uuid") or c.get("vm")) for r in results for c in r["cases"] or []
                           if c.get("vm") and c["outcome"] == "failed"}),
    }


def policy_junit(data: t.Any) -> str:
    """JUnit XML: one testsuite per repository, one testcase (classname = VM, name = rule) per case."""
    results = _results(data, "policy_junit")
    totals = _counts(results)
    root = ET.Element("testsuites", {
        "name": SUITES_NAME, "tests": str(totals["cases"] + totals["errors"]), "failures": str(totals["failed"]),
        "errors": str(totals["errors"]), "skipped": str(totals["skipped"]), "time": "0"})
    for result in results:
        cases = result["cases"] or []
        suite = ET.SubElement(root, "testsuite", {
            "name": _text(result["repository"]),
            "tests": str(len(cases) if result["error"] is None else 1),
            "failures": str(sum(1 for c in cases if c["outcome"] == "failed")),
            "errors": "0" if result["error"] is None else "1",
            "skipped": str(sum(1 for c in cases if c["outcome"] == "skipped")),
            "time": "0",
        })
        if isinstance(result["generated"], str) and result["generated"].endswith("Z"):
            suite.set("timestamp", result["generated"][:-1])  # the JUnit schema's timestamp has no zone (it is UTC)
        if result["error"] is not None:
            case_el = ET.SubElement(suite, "testcase", {"classname": _text(result["repository"]), "name": "read repository",
                                                        "time": "0"})
            ET.SubElement(case_el, "error", {"message": _text(result["error"]), "type": "error"}).text = _text(result["error"])
            continue
        for case in cases:
            case_el = ET.SubElement(suite, "testcase", {"classname": _text(_classname(case)), "name": _text(case["rule"]),
                                                        "time": "0"})
            message = _text(case.get("message"))
            if case["outcome"] == "failed":
                detail = [message] + [f"{k}: {_shown(case.get(k))}" for k in ("value", "limit", "class", "uuid", "host")
                                      if case.get(k) is not None]
                ET.SubElement(case_el, "failure", {"message": message, "type": _text(case["rule"])}).text = "\n".join(detail)
            elif case["outcome"] == "skipped":
                ET.SubElement(case_el, "skipped", {"message": message})
            else:
                ET.SubElement(case_el, "system-out").text = message
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _cell(value: t.Any) -> str:
    """A Markdown table cell: one line, pipes escaped."""
    text = " ".join(_text(value).split())
    return text.replace("\\", "\\\\").replace("|", "\\|") or "-"


def policy_markdown(data: t.Any, max_rows: int = 50) -> str:
    """A short summary for humans: the failures first (a table), then the counts."""
    results = _results(data, "policy_markdown")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
        raise AnsibleFilterError(f"policy_markdown: max_rows must be a whole number of 0 or more, not {max_rows!r}")
    totals = _counts(results)
    ok = totals["failed"] == 0 and totals["errors"] == 0
    lines = [f"## Backup policy check: {'PASSED' if ok else 'FAILED'}", ""]
    rows = [(r["repository"], "-", "-", "read repository", r["error"]) for r in results if r["error"] is not None]
    rows += [(r["repository"], _classname(c), c.get("host"), c["rule"], c.get("message"))
             for r in results for c in r["cases"] or [] if c["outcome"] == "failed"]
    if rows:
        lines += ["| Repository | VM | Host | Rule | Why |", "|---|---|---|---|---|"]
        lines += [f"| {' | '.join(_cell(v) for v in row)} |" for row in rows[:max_rows]]
        if len(rows) > max_rows:
            lines.append(f"| ... | | | | {len(rows) - max_rows} more failures: see the JUnit or JSON report |")
        lines.append("")
    lines.append(f"{totals['failed']} failed, {totals['passed']} passed, {totals['skipped']} skipped of {totals['cases']} cases; "
                 f"{totals['failed_vms']} of {totals['vms']} VMs fail; {totals['repositories']} "
                 f"repositor{'y' if totals['repositories'] == 1 else 'ies'}"
                 + (f", {totals['errors']} could not be read" if totals["errors"] else "") + ".")
    generated = sorted({r["generated"] for r in results if isinstance(r["generated"], str)})
    if generated:
        lines.append(f"Judged at {', '.join(generated)} (the repository host's clock).")
    return "\n".join(lines) + "\n"


def policy_summary(data: t.Any, details: bool = False) -> dict[str, t.Any]:
    """Machine-readable totals (for set_stats and the JSON report): passed, summary, the failed cases, per repository."""
    results = _results(data, "policy_summary")
    totals = _counts(results)
    repositories = []
    for r in results:
        cases = r["cases"] or []
        entry = {"repository": r["repository"], "generated": r["generated"], "error": r["error"],
                 "passed": r["error"] is None and not any(c["outcome"] == "failed" for c in cases),
                 "summary": {o: sum(1 for c in cases if c["outcome"] == o) for o in OUTCOMES}}
        if details:
            entry["cases"] = cases
        repositories.append(entry)
    return {
        "passed": totals["failed"] == 0 and totals["errors"] == 0,
        "summary": totals,
        "failed": [dict(c, repository=r["repository"]) for r in results for c in r["cases"] or [] if c["outcome"] == "failed"],
        "errors": [{"repository": r["repository"], "error": r["error"]} for r in results if r["error"] is not None],
        "repositories": repositories,
    }


def policy_vms(data: t.Any, host: str | None = None, groups: t.Any = None) -> list[dict[str, t.Any]]:
    """The ``vms`` option of policy_check from a domain_info result of one hypervisor.

    Every domain domain_info selects with its defaults (persistent ones, running or shut off), and
    the ones opted out by their metadata (enabled=no, reported as skipped): every VM a backup
    should exist for, whatever a backup run's own patterns select.
    """
    if isinstance(data, t.Mapping):
        data = data.get("domains")
    if not isinstance(data, (list, tuple)):
        raise AnsibleFilterError("policy_vms: give the result of vmbackup.libvirt.domain_info (or its domains)")
    if groups is None:
        groups = []
    if isinstance(groups, str) or not all(isinstance(g, str) for g in groups):
        raise AnsibleFilterError(f"policy_vms: groups must be a list of group names, not {groups!r}")
    out = []
    for domain in data:
        if not isinstance(domain, t.Mapping) or not isinstance(domain.get("name"), str):
            raise AnsibleFilterError(f"policy_vms: {domain!r} is not a domain of domain_info")
        metadata = domain.get("metadata") if isinstance(domain.get("metadata"), t.Mapping) else {}
        enabled = metadata.get("enabled")
        if not domain.get("selected") and enabled is not False:
            continue  # a transient domain, or one domain_info was told to leave out
        out.append({"name": domain["name"], "uuid": domain.get("uuid"), "host": host, "tier": domain.get("tier") or "default",
                    "enabled": enabled if isinstance(enabled, bool) else None, "groups": sorted(groups)})
    return out


class FilterModule:
    """vmbackup.libvirt policy report filters."""

    def filters(self) -> dict[str, t.Callable[..., t.Any]]:
        return {"policy_junit": policy_junit, "policy_markdown": policy_markdown, "policy_summary": policy_summary,
                "policy_vms": policy_vms}
