# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""VM discovery: the libvirt domains of a host, their backup metadata, and which of them a
backup run selects.

This module is private to the vmbackup.libvirt collection; it is not a public API.

The selection is a pure function (``select``) over plain values, so that its rules have a table
of unit tests; ``list_domains`` is the only part that talks to libvirt, and it only reads.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import typing as t
import xml.etree.ElementTree as ET

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _libvirt
from ansible_collections.vmbackup.libvirt.plugins.module_utils._deps import libvirt
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

# The namespace of the collection's metadata element, set per VM with
#   virsh metadata DOM https://vmbackup.libvirt/schema/1 --key vmbackup --config --set '<backup enabled="no" tier="gold"/>'
# (attributes: enabled, tier, quiesce; all optional)
METADATA_NAMESPACE = "https://vmbackup.libvirt/schema/1"
DEFAULT_TIER = "default"
_TIER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TRUE = {"yes", "true", "1", "on"}
_FALSE = {"no", "false", "0", "off"}
# The quiesce policies of vmbackup.libvirt.export (_quiesce.QUIESCE_POLICIES), repeated here so
# that discovery does not import the freezing code.
QUIESCE_POLICIES = ("auto", "required", "never")

# libvirt constants by value, so this module imports without the binding (unit tests, docs).
_METADATA_ELEMENT = 2  # VIR_DOMAIN_METADATA_ELEMENT
_AFFECT_LIVE, _AFFECT_CONFIG = 1, 2
_ERR_NO_DOMAIN, _ERR_OPERATION_INVALID, _ERR_NO_DOMAIN_METADATA = 42, 55, 80


@dataclasses.dataclass(frozen=True)
class Metadata:
    """What a domain's metadata element says about its backup."""

    present: bool = False
    enabled: bool | None = None  # None: not stated
    tier: str | None = None
    quiesce: str | None = None  # None: not stated (the role's policy applies)
    error: str | None = None  # the element is there but malformed
    xml: str | None = None


@dataclasses.dataclass(frozen=True)
class Domain:
    """One libvirt domain as the selection sees it."""

    name: str
    uuid: str
    state: str
    active: bool
    persistent: bool
    autostart: bool = False
    metadata: Metadata = Metadata()
    disks: tuple[dict[str, t.Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Rules:
    """The selection rules of one run (the module's options)."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    tiers: tuple[str, ...] = ()  # empty: every tier
    require_opt_in: bool = False
    include_transient: bool = False
    include_shutoff: bool = True


@dataclasses.dataclass(frozen=True)
class Choice:
    selected: bool
    reason: str


def parse_metadata(xml: str | None) -> Metadata:
    """Read ``<backup enabled="yes|no" tier="NAME" quiesce="auto|required|never"/>`` (the root
    element libvirt returns for our namespace). A malformed element is reported in ``error``,
    never raised: one VM's typo must not stop the discovery of the others. A malformed quiesce
    value is ignored (the role's policy applies), as a malformed tier is."""
    if xml is None:
        return Metadata()
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        return Metadata(present=True, error=f"metadata is not XML: {exc}", xml=xml)
    tag = root.tag.rsplit("}", 1)[-1]
    if tag != "backup":
        return Metadata(present=True, error=f"metadata element is <{tag}>, expected <backup>", xml=xml)
    errors = []
    enabled = None
    raw = root.get("enabled")
    if raw is not None:
        if raw.strip().lower() in _TRUE:
            enabled = True
        elif raw.strip().lower() in _FALSE:
            enabled = False
        else:
            errors.append(f"enabled={raw!r} is neither yes nor no")
    tier = root.get("tier")
    if tier is not None and not _TIER_RE.match(tier):
        errors.append(f"tier={tier!r} is not a name (letters, digits, '_', '.', '-', at most 64)")
        tier = None
    quiesce = root.get("quiesce")
    if quiesce is not None:
        if quiesce.strip().lower() in QUIESCE_POLICIES:
            quiesce = quiesce.strip().lower()
        else:
            errors.append(f"quiesce={quiesce!r} is not one of {', '.join(QUIESCE_POLICIES)}")
            quiesce = None
    unknown = sorted(set(root.attrib) - {"enabled", "tier", "quiesce"})
    if unknown:
        errors.append(f"unknown attribute(s) {', '.join(unknown)}")
    return Metadata(present=True, enabled=enabled, tier=tier, quiesce=quiesce, error="; ".join(errors) or None, xml=xml)


def _matches(name: str, patterns: t.Iterable[str]) -> str | None:
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


def select(domain: Domain, rules: Rules) -> Choice:
    """Whether a run backs this domain up, and why. The rules, in order:

    1. the name matches no ``include`` pattern, or matches an ``exclude`` pattern: skipped;
    2. the metadata says ``enabled="no"``: skipped (the VM opted out; patterns cannot override it);
    3. ``require_opt_in`` and the metadata does not say ``enabled="yes"``: skipped;
    4. ``tiers`` is given and the VM's tier (``default`` without one) is not in it: skipped;
    5. a transient domain: skipped unless ``include_transient`` (its definition vanishes when it
       stops, and whatever created it is expected to recreate it);
    6. a shut-off domain: skipped when ``include_shutoff`` is false (otherwise it is copied);
    7. otherwise selected. Malformed metadata does not skip a VM (when in doubt, back it up); the
       reason says what is wrong.
    """
    md = domain.metadata
    if _matches(domain.name, rules.include) is None:
        return Choice(False, f"name matches no include pattern ({', '.join(rules.include) or 'none given'})")
    pattern = _matches(domain.name, rules.exclude)
    if pattern is not None:
        return Choice(False, f"name matches exclude pattern {pattern!r}")
    if md.enabled is False:
        return Choice(False, "opted out by its metadata (enabled=no)")
    if rules.require_opt_in and md.enabled is not True:
        return Choice(False, "no opt-in in its metadata (enabled=yes) and require_opt_in is set")
    tier = md.tier or DEFAULT_TIER
    if rules.tiers and tier not in rules.tiers:
        return Choice(False, f"tier {tier!r} is not one of {', '.join(rules.tiers)}")
    if not domain.persistent and not rules.include_transient:
        return Choice(False, "transient domain (include_transient is not set)")
    if not domain.active and not rules.include_shutoff:
        return Choice(False, f"{domain.state} (include_shutoff is not set)")
    how = "live backup" if domain.active else "copy of the shut-off VM"
    reason = f"selected (tier {tier!r}, {how})"
    if md.error:
        reason += f"; its metadata is malformed and was ignored where unclear: {md.error}"
    return Choice(True, reason)


def unmatched_patterns(names: t.Iterable[str], patterns: t.Iterable[str]) -> list[str]:
    """Patterns that match none of the names (a typo, or a VM that is gone)."""
    names = list(names)
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]


# -- libvirt (read only) -------------------------------------------------------------------------


def _metadata_xml(dom, namespace: str, persistent: bool) -> str | None:
    """The element under ``namespace``: from the persistent definition first (what ``virsh metadata
    --config`` sets, also for a running VM), else from the live definition."""
    for flags in ((_AFFECT_CONFIG, _AFFECT_LIVE) if persistent else (_AFFECT_LIVE,)):
        try:
            return dom.metadata(_METADATA_ELEMENT, namespace, flags)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == _ERR_NO_DOMAIN_METADATA:
                continue
            if flags == _AFFECT_LIVE and exc.get_error_code() == _ERR_OPERATION_INVALID:  # not running
                continue
            raise
    return None


def _disks(xml: str) -> tuple[dict[str, t.Any], ...]:
    return tuple(
        {"target": d.target, "device": d.device, "source": d.source, "source_type": d.source_type,
         "format": d.driver_type, "readonly": d.readonly, "backup": d.skip_reason() is None, "skip_reason": d.skip_reason()}
        for d in _libvirt.parse_disks(xml)
    )


def read_domain(dom, namespace: str) -> Domain:
    persistent = bool(dom.isPersistent())
    active = bool(dom.isActive())
    autostart = bool(dom.autostart()) if persistent else False
    return Domain(
        name=dom.name(),
        uuid=dom.UUIDString(),
        state=_libvirt.domain_state(dom),
        active=active,
        persistent=persistent,
        autostart=autostart,
        metadata=parse_metadata(_metadata_xml(dom, namespace, persistent)),
        disks=_disks(dom.XMLDesc(0)),
    )


def list_domains(conn, namespace: str = METADATA_NAMESPACE) -> list[Domain]:
    """Every domain of the connection, sorted by name. A domain that disappears while it is read
    (undefined, or a transient one that stopped) is left out."""
    found = []
    for dom in conn.listAllDomains(0):
        try:
            found.append(read_domain(dom, namespace))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == _ERR_NO_DOMAIN:
                continue
            raise VmBackupError("LIBVIRT_UNAVAILABLE", f"libvirt failed to describe a domain: {exc.get_error_message()}") from None
    return sorted(found, key=lambda d: (d.name, d.uuid))


def as_result(domain: Domain, choice: Choice) -> dict[str, t.Any]:
    md = domain.metadata
    return {
        "name": domain.name,
        "uuid": domain.uuid,
        "state": domain.state,
        "active": domain.active,
        "persistent": domain.persistent,
        "autostart": domain.autostart,
        "metadata": {"present": md.present, "enabled": md.enabled, "tier": md.tier, "quiesce": md.quiesce, "error": md.error,
                     "xml": md.xml},
        "tier": md.tier or DEFAULT_TIER,
        "disks": [dict(d) for d in domain.disks],
        "selected": choice.selected,
        "reason": choice.reason,
    }


def validate_rules(include: list[str] | None, exclude: list[str] | None, tiers: list[str] | None) -> None:
    for pattern in list(include or []) + list(exclude or []):
        if not pattern or any(ord(c) < 32 for c in pattern):
            raise VmBackupError("INVALID_ARGUMENT", f"name pattern {pattern!r} is empty or holds control characters")
    for tier in tiers or []:
        if not _TIER_RE.match(tier):
            raise VmBackupError("INVALID_NAME", f"tier {tier!r} is not a name (letters, digits, '_', '.', '-', at most 64)")


@dataclasses.dataclass
class InventoryParams:
    uri: str
    include: list[str] | None
    exclude: list[str] | None
    tiers: list[str] | None
    require_opt_in: bool
    include_transient: bool
    include_shutoff: bool
    metadata_namespace: str


def discover(p: InventoryParams) -> tuple[dict[str, t.Any], list[str]]:
    """The module's whole result, and its warnings."""
    include = list(p.include) if p.include else ["*"]
    exclude = list(p.exclude or [])
    validate_rules(include, exclude, p.tiers)
    rules = Rules(include=tuple(include), exclude=tuple(exclude), tiers=tuple(p.tiers or ()),
                  require_opt_in=p.require_opt_in, include_transient=p.include_transient, include_shutoff=p.include_shutoff)
    with _libvirt.session(p.uri) as conn:
        domains = list_domains(conn, p.metadata_namespace)
    entries = [as_result(d, select(d, rules)) for d in domains]
    names = [d.name for d in domains]
    unmatched = unmatched_patterns(names, [x for x in include if x != "*"]) + unmatched_patterns(names, exclude)
    warnings = [f"name pattern {x!r} matches no domain on {p.uri}" for x in unmatched]
    warnings += [f"domain {e['name']}: {e['metadata']['error']}" for e in entries if e["metadata"]["error"]]
    selected = [e["name"] for e in entries if e["selected"]]
    result = {
        "changed": False,
        "uri": p.uri,
        "domains": entries,
        "selected": selected,
        "not_selected": [{"name": e["name"], "reason": e["reason"]} for e in entries if not e["selected"]],
        "unmatched_patterns": unmatched,
        "msg": f"{len(selected)} of {len(entries)} domains selected",
    }
    return result, warnings
