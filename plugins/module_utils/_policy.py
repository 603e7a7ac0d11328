# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The policy_check backend: a backup policy evaluated against the catalog of one repository.

This module is private to the vmbackup.libvirt collection; it is not a public API.

The repository is read exactly as ``backup_info`` reads it (``_info.read_vms`` + ``_info.describe``:
no lock, nothing written), so every rule judges the same verdicts, restorable points and drill
proofs an operator sees in the catalog. The policy is validated strictly before anything is read
(a misspelt rule is an error, never a rule silently off); ``evaluate`` is pure given the catalog,
the libvirt inventory and the clock, and is unit-tested on synthetic catalogs.

One *case* per VM and rule: ``passed``, ``failed`` or ``skipped``, with a message that says why in
words an operator acts on, the measured ``value`` and the policy's ``limit``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import json
import math
import re
import typing as t

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _info
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._lock import validate_timeout
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import Backend

# The built-in rules in the order their cases are reported; each default applies unless the policy
# (or the VM's class) sets the rule, and a rule set to null is off (no case at all).
DEFAULT_RULES: dict[str, t.Any] = {
    "rpo_hours": 26,
    "verify_days": 8,
    "chain": True,
    "min_points": 1,
    "consistency": "crash",
    "drill_days": 35,
}
RULE_KEYS = tuple(DEFAULT_RULES) + ("expressions",)
POLICY_KEYS = ("rules", "classes", "include", "exclude")
CLASS_KEYS = ("name", "match", "rules")
MATCH_KEYS = ("tier", "names", "groups")
EXPRESSION_KEYS = ("name", "expr", "message")
CONSISTENCIES = ("crash", "application")
# A drill whose newest proof says this blocks the rule even when an older drill passed.
BLOCKING_DRILLS = ("failed", "unreadable")
DEFAULT_CLASS = "default"
DISCOVERY_RULE = "discovery"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Upper bounds that catch a unit mistake (minutes given as hours) without refusing a real policy.
LIMITS = {"rpo_hours": 24 * 3650, "verify_days": 3650, "drill_days": 3650, "min_points": 100000}
MAX_EXPRESSION_VALUE = 200  # characters of an expression's value shown in a case


@dataclasses.dataclass
class PolicyParams:
    repository: str
    policy: dict[str, t.Any] | None = None
    vms: list[dict[str, t.Any]] | None = None
    discovery_failures: list[dict[str, t.Any]] | None = None
    fail_on_violation: bool = True
    lock_timeout: float = 60.0
    allow_unsafe_permissions: bool = False


# --------------------------------------------------------------------------- the policy
@dataclasses.dataclass
class Expression:
    name: str
    expr: str
    message: str | None
    compiled: t.Any = dataclasses.field(repr=False, compare=False, default=None)

    def as_dict(self) -> dict[str, t.Any]:
        return {"name": self.name, "expr": self.expr, "message": self.message}


@dataclasses.dataclass
class RuleSet:
    """The rules one VM is judged by: a value per built-in rule (None: off) and the expressions."""

    values: dict[str, t.Any]
    expressions: list[Expression]

    def as_dict(self) -> dict[str, t.Any]:
        return dict(self.values, expressions=[e.as_dict() for e in self.expressions])

    def names(self) -> list[str]:
        """The rules that are on, in report order."""
        return [k for k in DEFAULT_RULES if self.values[k] is not None] + [e.name for e in self.expressions]


@dataclasses.dataclass
class PolicyClass:
    name: str
    match: dict[str, list[str]]
    rules: RuleSet  # the defaults with the class's rules laid over them

    def matches(self, vm: "Subject") -> bool:
        """Every key of the match must hold (an empty list matches nothing)."""
        if "tier" in self.match and vm.tier not in self.match["tier"]:
            return False
        if "names" in self.match and not any(fnmatch.fnmatchcase(vm.name or "", p) for p in self.match["names"]):
            return False
        if "groups" in self.match and not set(vm.groups) & set(self.match["groups"]):
            return False
        return True


@dataclasses.dataclass
class Policy:
    rules: RuleSet
    classes: list[PolicyClass]
    include: list[str]
    exclude: list[str]

    def as_dict(self) -> dict[str, t.Any]:
        return {
            "rules": self.rules.as_dict(),
            "classes": [{"name": c.name, "match": c.match, "rules": c.rules.as_dict()} for c in self.classes],
            "include": list(self.include),
            "exclude": list(self.exclude),
        }

    def classify(self, vm: "Subject") -> tuple[str, RuleSet]:
        for cls in self.classes:  # first match wins
            if cls.matches(vm):
                return cls.name, cls.rules
        return DEFAULT_CLASS, self.rules


def _bad(where: str, what: str) -> VmBackupError:
    return VmBackupError("INVALID_ARGUMENT", f"policy: {where} {what}", policy_key=where)


def _check_keys(where: str, value: t.Any, allowed: tuple[str, ...]) -> dict[str, t.Any]:
    if not isinstance(value, dict):
        raise _bad(where, f"must be a dict with the keys {', '.join(allowed)}, not {type(value).__name__}")
    for key in value:
        if key not in allowed:
            # The typo class: a misspelt rule must never leave the rule silently at its default.
            raise _bad(f"{where}.{key}", f"is not a known key; the known keys of {where} are {', '.join(allowed)}")
    return value


def _number(where: str, value: t.Any, integer: bool = False) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip():  # a survey answer arrives as text
        try:
            value = float(value) if not integer else int(value)
        except ValueError:
            raise _bad(where, f"must be a number, not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise _bad(where, f"must be a {'whole ' if integer else ''}number or null, not {value!r}")
    if integer and value != int(value):
        raise _bad(where, f"must be a whole number, not {value!r}")
    key = where.rsplit(".", 1)[-1]
    low = 1 if integer else 0
    if not (value >= low if integer else value > low) or value > LIMITS[key]:
        raise _bad(where, f"must be {'at least 1' if integer else 'above 0'} and at most {LIMITS[key]}, not {value!r}")
    return int(value) if integer or value == int(value) else value


def _bool(where: str, value: t.Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "false", "no"):
        return value.lower() in ("true", "yes")
    raise _bad(where, f"must be true, false or null, not {value!r}")


def _patterns(where: str, value: t.Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p and not CONTROL_RE.search(p) for p in value):
        raise _bad(where, f"must be a list of non-empty strings (name patterns), not {value!r}")
    return list(value)


def _expressions(where: str, value: t.Any) -> list[Expression]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(where, f"must be a list of {{name, expr, message}} dicts, not {value!r}")
    out: list[Expression] = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        _check_keys(at, item, EXPRESSION_KEYS)
        name, expr, message = item.get("name"), item.get("expr"), item.get("message")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise _bad(f"{at}.name", f"must be a name of letters, digits, '_', '.' and '-', not {name!r}")
        if name in RULE_KEYS or name == DISCOVERY_RULE or any(e.name == name for e in out):
            raise _bad(f"{at}.name", f"{name!r} is already the name of a rule")
        if message is not None and not isinstance(message, str):
            raise _bad(f"{at}.message", f"must be a string, not {message!r}")
        try:
            compiled = _info.compile_query(expr)
        except VmBackupError as exc:
            if exc.error_code != "INVALID_ARGUMENT":
                raise
            raise _bad(f"{at}.expr", exc.msg.replace("query ", "", 1)) from None
        out.append(Expression(name, expr, message, compiled))
    return out


def _rule_values(where: str, rules: dict[str, t.Any], base: dict[str, t.Any]) -> dict[str, t.Any]:
    """``base`` with the rules given in ``rules`` laid over it, each validated."""
    out = dict(base)
    for key, value in rules.items():
        at = f"{where}.{key}"
        if key in ("rpo_hours", "verify_days", "drill_days"):
            out[key] = _number(at, value)
        elif key == "min_points":
            out[key] = _number(at, value, integer=True)
        elif key == "chain":
            chain = _bool(at, value)
            out[key] = True if chain else None  # chain: false is the rule off, like null
        elif key == "consistency":
            if value is not None and value not in CONSISTENCIES:
                raise _bad(at, f"must be one of {', '.join(CONSISTENCIES)} or null, not {value!r}")
            out[key] = value
    return out


def parse_policy(raw: t.Any) -> Policy:
    """The policy, validated and normalised: INVALID_ARGUMENT naming the key at the first fault."""
    raw = {} if raw is None else raw
    _check_keys("policy", raw, POLICY_KEYS)
    rules_raw = _check_keys("rules", raw.get("rules") or {}, RULE_KEYS)
    defaults = RuleSet(_rule_values("rules", rules_raw, DEFAULT_RULES), _expressions("rules.expressions", rules_raw.get("expressions")))
    classes: list[PolicyClass] = []
    classes_raw = raw.get("classes") or []
    if not isinstance(classes_raw, list):
        raise _bad("classes", f"must be a list of {{name, match, rules}} dicts, not {classes_raw!r}")
    for i, item in enumerate(classes_raw):
        at = f"classes[{i}]"
        _check_keys(at, item, CLASS_KEYS)
        name = item.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name) or name == DEFAULT_CLASS:
            raise _bad(f"{at}.name", f"must be a name of letters, digits, '_', '.' and '-' other than {DEFAULT_CLASS!r}, not {name!r}")
        if any(c.name == name for c in classes):
            raise _bad(f"{at}.name", f"{name!r} names two classes")
        match_raw = _check_keys(f"{at}.match", item.get("match"), MATCH_KEYS)
        if not match_raw:
            raise _bad(f"{at}.match", "is empty; give tier, names or groups (a class for every VM is what rules are for)")
        match = {key: _patterns(f"{at}.match.{key}", value) for key, value in match_raw.items()}
        rules = _check_keys(f"{at}.rules", item.get("rules") or {}, RULE_KEYS)
        # A class's expressions replace the default ones (listing them again keeps them).
        expressions = _expressions(f"{at}.rules.expressions", rules["expressions"]) if "expressions" in rules else list(defaults.expressions)
        classes.append(PolicyClass(name, match, RuleSet(_rule_values(f"{at}.rules", rules, defaults.values), expressions)))
    include = _patterns("include", raw["include"]) if raw.get("include") is not None else ["*"]
    exclude = _patterns("exclude", raw["exclude"]) if raw.get("exclude") is not None else []
    return Policy(defaults, classes, include, exclude)


# --------------------------------------------------------------------------- the VMs judged
@dataclasses.dataclass
class Subject:
    """One VM to judge: from libvirt (the ``vms`` option), from the repository, or from both."""

    name: str | None
    uuid: str | None
    host: str | None = None
    tier: str | None = None
    enabled: bool | None = None
    groups: list[str] = dataclasses.field(default_factory=list)
    in_libvirt: bool = False
    entry: dict[str, t.Any] | None = None  # the VM's backup_info entry

    @property
    def label(self) -> str:
        return self.name or self.uuid or "?"


def parse_vms(raw: t.Any) -> list[Subject]:
    """The libvirt inventory given to the module, checked (INVALID_ARGUMENT / INVALID_NAME)."""
    out: list[Subject] = []
    for i, item in enumerate(raw or []):
        if not isinstance(item, dict):
            raise VmBackupError("INVALID_ARGUMENT", f"vms[{i}] must be a dict with name, uuid, host, tier, enabled, groups")
        name, vm_uuid = item.get("name"), item.get("uuid")
        if not isinstance(name, str) or not name or CONTROL_RE.search(name):
            raise VmBackupError("INVALID_NAME", f"vms[{i}].name must be a VM name without control characters, not {name!r}")
        if vm_uuid is not None and (not isinstance(vm_uuid, str) or not UUID_RE.match(vm_uuid)):
            raise VmBackupError("INVALID_NAME", f"vms[{i}].uuid {vm_uuid!r} (VM {name}) is not a UUID")
        groups = item.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise VmBackupError("INVALID_ARGUMENT", f"vms[{i}].groups (VM {name}) must be a list of group names")
        tier = item.get("tier")
        out.append(Subject(name=name, uuid=vm_uuid.lower() if vm_uuid else None, host=item.get("host"),
                           tier=tier if isinstance(tier, str) and tier else "default", enabled=item.get("enabled"),
                           groups=list(groups), in_libvirt=True))
    return out


def merge_subjects(libvirt_vms: list[Subject], catalog: dict[str, t.Any], warnings: list[str]) -> list[Subject]:
    """The libvirt VMs joined with the repository's VMs: by UUID, else by the name the newest set records."""
    entries = list(catalog["vms"])
    by_uuid = {e["uuid"]: e for e in entries}
    by_name: dict[str, list[dict[str, t.Any]]] = {}
    for e in entries:
        if e["name"]:
            by_name.setdefault(e["name"], []).append(e)
    used: set[str] = set()
    out: list[Subject] = []
    seen: dict[str, Subject] = {}
    for vm in libvirt_vms:
        key = vm.uuid or f"name:{vm.name}@{vm.host}"
        if key in seen:
            warnings.append(f"VM {vm.name} ({vm.uuid}) is listed twice (hosts {seen[key].host} and {vm.host}); judged once")
            continue
        seen[key] = vm
        entry = by_uuid.get(vm.uuid) if vm.uuid else None
        if entry is None and vm.uuid is None and len(by_name.get(vm.name, [])) == 1:
            entry = by_name[vm.name][0]  # no UUID given: the name is all there is
        if entry is not None and entry["uuid"] not in used:
            used.add(entry["uuid"])
            vm.entry = entry
        out.append(vm)
    for e in entries:
        if e["uuid"] not in used:
            out.append(Subject(name=e["name"], uuid=e["uuid"], host=e["host"], entry=e))
    out.sort(key=lambda s: (s.name is None, s.name or "", s.uuid or "", s.host or ""))
    return out


# --------------------------------------------------------------------------- the rules
def _hours(seconds: int) -> str:
    hours = seconds / 3600
    return f"{hours:.0f} h" if abs(hours) >= 10 else f"{hours:.1f} h"


def _days(seconds: int) -> str:
    days = seconds / 86400
    return f"{days:.0f} days" if abs(days) >= 10 else f"{days:.1f} days"


def _limit_text(value: t.Any, unit: str) -> str:
    return f"{value:g} {unit}"


class Case(t.NamedTuple):
    outcome: str
    message: str
    value: t.Any = None


def _newest_readable(entry: dict[str, t.Any]) -> dict[str, t.Any] | None:
    return next((s for s in reversed(entry["sets"]) if s["readable"]), None)


def _restore_path(entry: dict[str, t.Any], point: dict[str, t.Any]) -> list[dict[str, t.Any]]:
    """The point and the sets it builds on, back to its full (as far as they are committed)."""
    by_id = {s["set_id"]: s for s in entry["sets"]}
    path, current = [], point
    while current is not None and current not in path:
        path.append(current)
        current = by_id.get(current["parent"]) if current.get("type") == "incremental" and current.get("parent") else None
    return path


def rule_rpo(entry: dict[str, t.Any], limit: float, now: dt.datetime) -> Case:
    newest = _newest_readable(entry)
    if newest is None:
        return Case("failed", f"no readable backup set: the newest set {entry['sets'][-1]['set_id']} is unreadable "
                              f"({entry['sets'][-1]['error']})")
    # RPO is the data a loss would cost: measured from the point in time (start), not the commit.
    age = _info._age(now, newest["started"])  # pylint: disable=protected-access
    if age is None:
        return Case("failed", f"the newest set {newest['set_id']} has no valid start time ({newest['started']!r})")
    hours = round(age / 3600, 2)
    text = f"newest point {newest['started']} (set {newest['set_id']}) is {_hours(age)} old, the policy allows {_limit_text(limit, 'h')}"
    if age < 0:
        return Case("failed", f"newest point {newest['started']} (set {newest['set_id']}) is dated {_hours(-age)} in the future: "
                              "a clock is wrong (this host's or the backup host's)", hours)
    return Case("passed" if age < limit * 3600 else "failed", text, hours)


def rule_verify(entry: dict[str, t.Any], limit: float) -> Case:
    newest = _newest_readable(entry)
    if newest is None:
        return Case("failed", "no readable backup set to verify")
    for s in _restore_path(entry, newest):
        verdict = s["verdict"]
        if verdict is not None and verdict["outcome"] != "ok":
            where = (f"the newest point (set {s['set_id']})" if s is newest
                     else f"set {s['set_id']}, which the newest point {newest['set_id']} builds on,")
            if verdict["outcome"] == "unreadable":
                return Case("failed", f"{where} has an unreadable verify verdict; run vmbackup.libvirt.verify on it", "unreadable")
            codes = f" ({', '.join(verdict['codes'])})" if verdict["codes"] else ""
            finding = f": {verdict['first_finding']}" if verdict["first_finding"] else ""
            return Case("failed", f"{where} failed verification on {verdict['verified']}{codes}{finding}", "failed")
    verdicts = [(s["verdict"]["verified"] or "", s) for s in entry["sets"] if s["verdict"] is not None and s["verdict"]["outcome"] == "ok"]
    if not verdicts:
        return Case("failed", f"no set of the VM was ever verified ok ({len(entry['sets'])} sets); "
                              "run vmbackup.libvirt.verify (the verify playbook)", None)
    dummy, best = max(verdicts, key=lambda x: (x[0], x[1]["set_id"]))
    verdict = best["verdict"]
    if not verdict["current"]:
        return Case("failed", f"the newest ok verdict (set {best['set_id']}, verified {verdict['verified']}) is stale: "
                              "the set's manifest changed after it was verified; verify it again", None)
    age = verdict["age_seconds"]
    if age is None:
        return Case("failed", f"the newest ok verdict (set {best['set_id']}) has no valid time ({verdict['verified']!r})")
    days = round(age / 86400, 3)
    text = (f"newest ok verdict (set {best['set_id']}, verified {verdict['verified']}) is {_days(age)} old, "
            f"the policy allows {_limit_text(limit, 'days')}")
    return Case("passed" if 0 <= age < limit * 86400 else "failed", text, days)


def rule_chain(entry: dict[str, t.Any]) -> Case:
    newest = entry["sets"][-1]
    if newest["restorable"]:
        depth = len(_restore_path(entry, newest))
        return Case("passed", f"newest point {newest['set_id']} is restorable (restore path of {depth} "
                              f"set{'s' if depth != 1 else ''}, complete, no verdict blocks it)", True)
    fallback = entry.get("newest_restorable")
    also = (f"; the newest restorable point is {fallback['set_id']} ({fallback['started']})" if fallback
            else "; no point of the VM is restorable")
    return Case("failed", f"newest point {newest['set_id']} is not restorable: {newest['restore_fault']}{also}", False)


def rule_min_points(entry: dict[str, t.Any], limit: int) -> Case:
    count = sum(1 for s in entry["sets"] if s["restorable"])
    text = (f"{count} restorable point{'s' if count != 1 else ''} (of {len(entry['sets'])} sets), "
            f"the policy requires at least {limit}")
    return Case("passed" if count >= limit else "failed", text, count)


def rule_consistency(entry: dict[str, t.Any], required: str) -> Case:
    newest = _newest_readable(entry)
    if newest is None:
        return Case("failed", "no readable backup set")
    have = newest["consistency"]
    if required == "crash" or have == "application":
        accepts = "accepts crash-consistent points" if required == "crash" else "requires application-consistent points"
        return Case("passed", f"newest point {newest['set_id']} is {have}-consistent, the policy {accepts}", have)
    return Case("failed", f"newest point {newest['set_id']} is {have}-consistent, the policy requires application-consistent "
                          "(file systems frozen by the guest agent: check the VM's qemu-guest-agent and quiesce setting)", have)


def rule_drill(entry: dict[str, t.Any], limit: float) -> Case:
    newest, passed = entry.get("drill"), entry.get("drill_ok")
    if newest is None:
        return Case("failed", "never drilled: no restore drill proof beside any set; run vmbackup.libvirt.drill (the drill playbook)")
    if newest["outcome"] in BLOCKING_DRILLS:
        if newest["outcome"] == "unreadable":
            return Case("failed", f"the newest drill proof (set {newest['set_id']}) is unreadable", "unreadable")
        check = f" its {newest['failed_check']} check" if newest["failed_check"] else ""
        code = f" ({newest['error_code']})" if newest["error_code"] else ""
        return Case("failed", f"the newest drill (set {newest['set_id']}, {newest['completed']} on {newest['host']}) failed"
                              f"{check}{code}", "failed")
    if passed is None:
        return Case("failed", f"no drill passed: the newest drill (set {newest['set_id']}, {newest['completed']}) "
                              f"ended {newest['outcome']!r}", None)
    age = passed["age_seconds"]
    if age is None:
        return Case("failed", f"the newest passed drill (set {passed['set_id']}) has no valid time ({passed['completed']!r})")
    days = round(age / 86400, 3)
    text = (f"newest passed drill (set {passed['set_id']}, {passed['completed']} on {passed['host']}) is {_days(age)} old, "
            f"the policy allows {_limit_text(limit, 'days')}")
    return Case("passed" if 0 <= age < limit * 86400 else "failed", text, days)


def _truthy(value: t.Any) -> bool:
    """JMESPath's truth: false, null and empty strings, lists and objects are false; 0 is true."""
    return not (value is None or value is False or (isinstance(value, (str, list, dict)) and not value))


def _shown(value: t.Any) -> t.Any:
    """An expression's value as a case shows it: scalars as they are, anything else as short JSON."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= MAX_EXPRESSION_VALUE else text[:MAX_EXPRESSION_VALUE] + "..."


def rule_expression(entry: dict[str, t.Any], expression: Expression) -> Case:
    try:
        value = _info.run_query(expression.compiled, entry)
    except VmBackupError as exc:  # a type error on this VM's data: the rule cannot hold
        return Case("failed", f"expression {expression.expr!r} could not be evaluated on this VM's catalog: {exc.msg}")
    shown = _shown(value)
    if _truthy(value):
        return Case("passed", f"expression {expression.expr!r} holds (value {json.dumps(shown)})", shown)
    why = expression.message or f"expression {expression.expr!r} does not hold"
    return Case("failed", f"{why} (value {json.dumps(shown)})", shown)


# --------------------------------------------------------------------------- the evaluation
def _case(vm: Subject, cls: str, rule: str, outcome: str, message: str, value: t.Any, limit: t.Any) -> dict[str, t.Any]:
    return {"vm": vm.label, "uuid": vm.uuid, "host": vm.host, "class": cls, "rule": rule, "outcome": outcome,
            "message": message, "value": value, "limit": limit}


def _judge(vm: Subject, rules: RuleSet, now: dt.datetime, repo_path: str) -> list[tuple[str, Case, t.Any]]:
    """(rule, case, limit) for every rule that is on."""
    out: list[tuple[str, Case, t.Any]] = []
    entry = vm.entry
    if entry is None or not entry["sets"]:
        where = "has no backup set" if entry is not None else "has no backup"
        origin = f" (it is defined in libvirt on {vm.host})" if vm.in_libvirt else ""
        for rule in rules.names():
            limit = rules.values.get(rule) if rule in DEFAULT_RULES else next(e.expr for e in rules.expressions if e.name == rule)
            out.append((rule, Case("failed", f"VM {vm.label} {where} in repository {repo_path}{origin}"), limit))
        return out
    v = rules.values
    if v["rpo_hours"] is not None:
        out.append(("rpo_hours", rule_rpo(entry, v["rpo_hours"], now), v["rpo_hours"]))
    if v["verify_days"] is not None:
        out.append(("verify_days", rule_verify(entry, v["verify_days"]), v["verify_days"]))
    if v["chain"] is not None:
        out.append(("chain", rule_chain(entry), True))
    if v["min_points"] is not None:
        out.append(("min_points", rule_min_points(entry, v["min_points"]), v["min_points"]))
    if v["consistency"] is not None:
        out.append(("consistency", rule_consistency(entry, v["consistency"]), v["consistency"]))
    if v["drill_days"] is not None:
        out.append(("drill_days", rule_drill(entry, v["drill_days"]), v["drill_days"]))
    for expression in rules.expressions:
        out.append((expression.name, rule_expression(entry, expression), expression.expr))
    return out


def _skip_reason(vm: Subject, policy: Policy) -> str | None:
    pattern = next((p for p in policy.exclude if fnmatch.fnmatchcase(vm.name or "", p)), None)
    if pattern is not None:
        return f"excluded by the policy's pattern {pattern!r}"
    if vm.enabled is False:
        return f"opted out of backups by its libvirt metadata (enabled=no) on {vm.host}"
    return None


def evaluate(policy: Policy, catalog: dict[str, t.Any], libvirt_vms: list[Subject], now: dt.datetime,
             discovery_failures: list[dict[str, t.Any]] | None = None) -> tuple[dict[str, t.Any], list[str]]:
    """The policy_check result (without changed/msg) and its warnings; pure given its inputs."""
    warnings: list[str] = []
    repo_path = catalog["repository"]
    subjects = [s for s in merge_subjects(libvirt_vms, catalog, warnings)
                if any(fnmatch.fnmatchcase(s.name or "", p) for p in policy.include)]
    for what, patterns in (("include", [p for p in policy.include if p != "*"]), ("exclude", policy.exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(s.name or "", pattern) for s in merge_subjects(libvirt_vms, catalog, [])):
                warnings.append(f"policy {what} pattern {pattern!r} matches no VM")
    cases: list[dict[str, t.Any]] = []
    for failure in discovery_failures or []:
        host = str(failure.get("host") or "?")
        why = failure.get("msg") or "no answer"
        cases.append({"vm": None, "uuid": None, "host": host, "class": None, "rule": DISCOVERY_RULE, "outcome": "failed",
                      "message": f"the VMs of hypervisor {host} could not be listed ({why}); its VMs without a backup "
                                 "cannot be found, so the check cannot pass", "value": None, "limit": None})
    vms_out: list[dict[str, t.Any]] = []
    used_classes: set[str] = set()
    for vm in subjects:
        cls, rules = policy.classify(vm)
        used_classes.add(cls)
        skip = _skip_reason(vm, policy)
        vm_cases = []
        if skip is not None:
            for rule in rules.names():
                vm_cases.append(_case(vm, cls, rule, "skipped", f"VM {vm.label} is {skip}", None, None))
        else:
            for rule, case, limit in _judge(vm, rules, now, repo_path):
                vm_cases.append(_case(vm, cls, rule, case.outcome, case.message, case.value, limit))
        failed = [c["rule"] for c in vm_cases if c["outcome"] == "failed"]
        cases.extend(vm_cases)
        vms_out.append({"name": vm.name, "uuid": vm.uuid, "host": vm.host, "class": cls, "in_libvirt": vm.in_libvirt,
                        "in_repository": vm.entry is not None, "skipped": skip, "passed": not failed, "failed_rules": failed})
    for cls in policy.classes:
        if cls.name not in used_classes:
            warnings.append(f"policy class {cls.name!r} matches no VM")
    counts = {o: sum(1 for c in cases if c["outcome"] == o) for o in ("passed", "failed", "skipped")}
    result = {
        "repository": repo_path,
        "generated": catalog["generated"],
        "passed": counts["failed"] == 0,
        "cases": cases,
        "vms": vms_out,
        "summary": {"vms": len(vms_out), "cases": len(cases), **counts,
                    "failed_vms": sum(1 for v in vms_out if not v["passed"])},
        "policy": policy.as_dict(),
    }
    return result, warnings


def summary_message(result: dict[str, t.Any]) -> str:
    s = result["summary"]
    if result["passed"]:
        return (f"policy met in {result['repository']}: {s['vms']} VMs, {s['passed']} cases passed, {s['skipped']} skipped")
    failed: dict[str, list[str]] = {}
    for c in result["cases"]:
        if c["outcome"] == "failed":
            failed.setdefault(c["vm"] or f"host {c['host']}", []).append(c["rule"])
    shown = "; ".join(f"{vm}: {', '.join(rules)}" for vm, rules in list(failed.items())[:10])
    more = f"; and {len(failed) - 10} more" if len(failed) > 10 else ""
    return (f"policy violated in {result['repository']}: {s['failed']} of {s['cases']} cases failed, "
            f"{s['failed_vms']} of {s['vms']} VMs ({shown}{more})")


class PolicyBackend(Backend):
    """Reads the catalog as backup_info does and judges it; writes nothing, so check mode is the same run."""

    def run(self) -> dict[str, t.Any]:
        # Everything the user gave is checked before the repository is opened.
        path = repo_mod.validate_repository_path(self.p.repository)
        validate_timeout(self.p.lock_timeout)
        policy = parse_policy(self.p.policy)
        libvirt_vms = parse_vms(self.p.vms)
        failures = self.p.discovery_failures or []
        if not isinstance(failures, list) or not all(isinstance(f, dict) for f in failures):
            raise VmBackupError("INVALID_ARGUMENT", "discovery_failures must be a list of {host, msg} dicts")
        now = _manifest.utcnow()
        repo = repo_mod.open_repository(path, self.p.allow_unsafe_permissions)
        drills: dict[str, dict[str, dict[str, t.Any]]] = {}
        catalogs, verdicts, warnings = _info.read_vms(repo, None, None, drills)
        self.warnings.extend(warnings)
        catalog = _info.describe(path, catalogs, verdicts, now, drills=drills)
        result, warnings = evaluate(policy, catalog, libvirt_vms, now, failures)
        self.warnings.extend(warnings)
        msg = summary_message(result)
        if not result["passed"] and self.p.fail_on_violation:
            raise VmBackupError("POLICY_VIOLATED", msg, **dict(result, changed=False))
        result.update(changed=False, msg=msg)
        return result
