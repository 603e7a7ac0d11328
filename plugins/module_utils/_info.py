# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The backup_info backend: a read-only catalog of a repository, of one VM or of one series.

This module is private to the vmbackup.libvirt collection; it is not a public API.

Everything is read through ``_catalog.Catalog`` (manifests, parent links, verify verdicts, and
the drill proofs of ``_catalog.drill_proofs``: each VM's newest drill and newest passed drill);
nothing is written, not even a lock file. ``describe`` is pure given the catalogs and the
clock, so the whole result format is tested on synthetic repositories.

A point is *restorable* when ``Catalog.sets_of_chain`` passes (every manifest of its restore
path readable, every link sound) and no set on that path has a verdict other than ``ok``: a
``failed`` or ``unreadable`` verdict blocks, also a stale one (recorded for an older manifest),
the same rule export applies before it builds on a chain. A changed manifest repairs no file;
only a new verify can clear a failed verdict.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import traceback
import typing as t

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils._catalog import Catalog, drill_proofs, newest_drill, resolve_vms, validate_selection
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._lock import validate_timeout
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import Backend

try:
    import jmespath
except ImportError:
    jmespath = None
    JMESPATH_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    JMESPATH_IMPORT_ERROR = None

# A VM whose sets changed while it was read (a prune renamed sets away, an export committed one)
# is read again, at most this many times in all.
READ_ATTEMPTS = 3
VERDICT_OUTCOMES = ("ok", "failed")


@dataclasses.dataclass
class InfoParams:
    repository: str
    name: str | None = None
    uuid: str | None = None
    series: str | None = None
    query: str | None = None
    list_sets: bool = True
    lock_timeout: float = 60.0
    allow_unsafe_permissions: bool = False


def validate_params(p: InfoParams) -> str:
    """The repository path; every other option checked before anything is read."""
    path = repo_mod.validate_repository_path(p.repository)
    p.uuid = validate_selection(p.name, p.uuid, p.series)
    validate_timeout(p.lock_timeout)
    return path


def compile_query(text: str) -> t.Any:
    """A compiled jmespath expression: MISSING_DEPENDENCY without the library, INVALID_ARGUMENT
    (with jmespath's own message) for an expression it cannot parse."""
    if jmespath is None:
        raise VmBackupError("MISSING_DEPENDENCY", missing_required_lib("jmespath"), exception=JMESPATH_IMPORT_ERROR)
    if not isinstance(text, str) or not text.strip():
        raise VmBackupError("INVALID_ARGUMENT", "query must be a non-empty jmespath expression")
    try:
        return jmespath.compile(text)
    except jmespath.exceptions.JMESPathError as exc:
        raise VmBackupError("INVALID_ARGUMENT", f"query {text!r} is not a valid jmespath expression: {exc}") from None


def run_query(expression: t.Any, data: dict[str, t.Any]) -> t.Any:
    try:
        return expression.search(data)
    except jmespath.exceptions.JMESPathError as exc:  # e.g. sum() over strings: a type error at evaluation
        raise VmBackupError("INVALID_ARGUMENT", f"query {expression.expression!r} failed on the catalog: {exc}") from None


# --------------------------------------------------------------------------- reading
def read_vms(repo: repo_mod.Repository, name: str | None, vm_uuid: str | None,
             drills: dict[str, dict[str, dict[str, t.Any]]] | None = None,
             ) -> tuple[list[Catalog], dict[str, dict[str, dict[str, t.Any] | None]], list[str]]:
    """Catalogs and raw verdicts of the VMs asked for, each read without a lock but consistently.

    Commits and prunes are renames, so each set is seen whole or not at all; what can happen is
    that a set is listed and gone when its manifest is read (a prune), or that a set appears. A
    VM whose committed set ids differ after its verdicts were read is therefore read again.
    """
    catalogs = resolve_vms(repo, name, vm_uuid)
    out, verdicts, warnings = [], {}, []
    for catalog in catalogs:
        for attempt in range(READ_ATTEMPTS):
            if attempt:
                catalog = Catalog(repo, catalog.vm_uuid)
            raw = {set_id: catalog.verdict(set_id) for set_id in catalog.ids()}
            if drills is not None:  # the drill proofs, read in the same consistent pass
                drills[catalog.vm_uuid] = drill_proofs(catalog)
            if repo.set_ids(catalog.vm_uuid) == catalog.ids():
                break
        else:
            warnings.append(f"the sets of VM {catalog.vm_uuid} kept changing while they were read ({READ_ATTEMPTS} times); "
                            "the catalog shows the last read, which may mix two states")
        out.append(catalog)
        verdicts[catalog.vm_uuid] = raw
    return out, verdicts, warnings


# --------------------------------------------------------------------------- the catalog
def _age(now: dt.datetime, when: t.Any) -> int | None:
    """Whole seconds from ``when`` (a UTC timestamp like 2026-11-25T07:35:12Z) to ``now``; None if it is not one."""
    if not isinstance(when, str) or len(when) != 20 or when[10] != "T" or when[-1] != "Z":
        return None
    try:
        # fromisoformat is ten times faster than strptime (thousands of sets); the length and the
        # final Z keep it to the one form manifests and verdicts use.
        parsed = dt.datetime.fromisoformat(when[:-1]).replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None
    return int((now - parsed).total_seconds())


def verdict_view(raw: dict[str, t.Any] | None, manifest_sha256: str | None, now: dt.datetime) -> dict[str, t.Any] | None:
    """The verdict as the catalog shows it; a sidecar with an outcome verify does not write reads as unreadable.

    ``current`` is true only when the verdict names the sha256 of the manifest as it is now.
    """
    if raw is None:
        return None
    outcome = raw.get("outcome")
    if outcome not in VERDICT_OUTCOMES:
        return {"outcome": "unreadable", "level": None, "verified": None, "age_seconds": None, "current": False, "codes": [],
                "first_finding": None}
    verified = raw.get("verified") if isinstance(raw.get("verified"), str) else None
    codes = raw.get("codes")
    findings = raw.get("findings")
    first = findings[0] if isinstance(findings, list) and findings and isinstance(findings[0], dict) else {}
    return {
        "outcome": outcome,
        "level": raw.get("level") if isinstance(raw.get("level"), str) else None,
        "verified": verified,
        "age_seconds": _age(now, verified),
        "current": manifest_sha256 is not None and raw.get("manifest_sha256") == manifest_sha256,
        "codes": [c for c in codes if isinstance(c, str)] if isinstance(codes, list) else [],
        # Where the damage is: a point's verdict also fails for a finding in a set it builds on.
        "first_finding": first.get("msg") if isinstance(first.get("msg"), str) else None,
    }


class RestorePaths:
    """Why each point of one catalog is not restorable, computed once per set (O(sets), not O(sets x chain)).

    The chain rule is ``Catalog.sets_of_chain``'s, walked from the point towards the base: the
    first fault met (an unreadable manifest, then a bad link to the parent) is the one reported,
    so every set's answer is its own fault or its parent's answer. A point whose chain is sound
    is then blocked by the verdict nearest to it on its path that is not ``ok``.
    """

    def __init__(self, catalog: Catalog, verdicts: dict[str, dict[str, t.Any] | None]) -> None:
        self.catalog = catalog
        self.verdicts = verdicts
        self._chain: dict[str, str | None] = {}  # set id -> chain fault, None when sound
        self._blocker: dict[str, str | None] = {}  # set id -> nearest set with a verdict other than ok

    def chain_fault(self, set_id: str) -> str | None:
        pending: list[str] = []
        current = set_id
        while current not in self._chain:
            entry = self.catalog.sets[current]
            if entry.manifest is None:
                self._chain[current] = entry.error.msg if entry.error else f"set {current} is unreadable"
                break
            link = self.catalog.link_fault(current)
            if link is not None:
                self._chain[current] = link.msg
                break
            if entry.manifest["type"] != "incremental":
                self._chain[current] = None
                break
            pending.append(current)
            current = entry.parent_id  # a committed set: link_fault checked it
            if current in pending:  # cannot come from export (a hash chain); sets_of_chain words it
                try:
                    self.catalog.sets_of_chain(set_id)
                except VmBackupError as exc:
                    self._chain[current] = exc.msg
                break
        for member in pending:
            self._chain[member] = self._chain[current]
        return self._chain[set_id]

    def _blocking(self, set_id: str) -> str | None:
        pending: list[str] = []
        current: str | None = set_id
        found = None
        while current is not None and current not in self._blocker:
            verdict = self.verdicts.get(current)
            if verdict is not None and verdict["outcome"] != "ok":
                self._blocker[current] = found = current
                break
            pending.append(current)
            manifest = self.catalog.sets[current].manifest
            current = self.catalog.sets[current].parent_id if manifest["type"] == "incremental" else None
        else:
            found = self._blocker[current] if current is not None else None
        for member in pending:
            self._blocker[member] = found
        return self._blocker[set_id]

    def fault(self, set_id: str) -> str | None:
        """None when ``set_id`` is restorable, else why not."""
        chain = self.chain_fault(set_id)
        if chain is not None:
            return chain
        member = self._blocking(set_id)  # the chain is sound: every set on the path is readable
        if member is None:
            return None
        verdict = self.verdicts[member]
        where = "" if member == set_id else f", which set {set_id} builds on,"
        if verdict["outcome"] == "unreadable":
            return f"the verify verdict of set {member}{where} is unreadable"
        codes = f" ({', '.join(verdict['codes'])})" if verdict["codes"] else ""
        finding = f": {verdict['first_finding']}" if verdict["first_finding"] else ""
        stale = "; the manifest changed since, verify again to clear it" if not verdict["current"] else ""
        return f"set {member}{where} failed verification on {verdict['verified']}{codes}{finding}{stale}"


def set_view(catalog: Catalog, set_id: str, paths: RestorePaths, now: dt.datetime) -> dict[str, t.Any]:
    entry = catalog.sets[set_id]
    m = entry.manifest
    fault = paths.fault(set_id)
    view: dict[str, t.Any] = {
        "set_id": set_id,
        "type": None, "series": None, "period": None, "chain_id": None, "parent": None,
        "started": None, "completed": None, "age_seconds": None, "bytes": None, "consistency": None,
        "readable": m is not None,
        "error": None if m is not None else (entry.error.msg if entry.error else f"set {set_id} is unreadable"),
        "verdict": paths.verdicts.get(set_id),
        "restorable": fault is None,
        "restore_fault": fault,
    }
    if m is not None:
        view.update(
            type=m["type"], series=entry.series, period=m.get("period"), chain_id=m.get("chain_id"), parent=entry.parent_id,
            started=m["started"], completed=m["completed"], age_seconds=_age(now, m["completed"]),
            bytes=sum(f["size"] for f in m["files"].values()), consistency=m["consistency"],
        )
    return view


def _chains(sets: list[dict[str, t.Any]]) -> list[dict[str, t.Any]]:
    """Sets grouped by chain, oldest chain first; each copy is a chain of its own (chain_id null)."""
    chains: dict[t.Any, dict[str, t.Any]] = {}
    for s in sets:
        key = s["chain_id"] if s["chain_id"] is not None else ("copy", s["set_id"])
        chain = chains.setdefault(key, {"chain_id": s["chain_id"], "base": None, "newest": None, "sets": [], "bytes": 0})
        chain["sets"].append(s["set_id"])
        chain["newest"] = s["set_id"]
        chain["bytes"] += s["bytes"]
        if chain["base"] is None and s["type"] in ("full", "copy"):
            chain["base"] = s["set_id"]  # null when the chain's full is gone
    return list(chains.values())


def _series_view(name: str, sets: list[dict[str, t.Any]]) -> dict[str, t.Any]:
    restorable = [s["set_id"] for s in sets if s["restorable"]]
    return {
        "name": name,
        "sets": len(sets),
        "bytes": sum(s["bytes"] for s in sets),
        "newest": sets[-1]["set_id"] if sets else None,
        "newest_restorable": restorable[-1] if restorable else None,
        "chains": _chains(sets),
    }


def drill_view(catalog: Catalog, proofs: dict[str, dict[str, t.Any]], now: dt.datetime) -> dict[str, t.Any]:
    """The VM's newest drill (any outcome) and its newest passed drill, from the proofs beside its sets.

    ``current`` is true when the proof names the sha256 of the set's manifest as it is now.
    """
    def view(found: tuple[str, dict[str, t.Any]] | None) -> dict[str, t.Any] | None:
        if found is None:
            return None
        set_id, proof = found
        manifest_sha = catalog.sets[set_id].manifest_sha256
        completed = proof.get("completed") if isinstance(proof.get("completed"), str) else None
        return {
            "set_id": set_id,
            "completed": completed,
            "age_seconds": _age(now, completed),
            "outcome": proof.get("outcome"),
            "host": proof.get("host") if isinstance(proof.get("host"), str) else None,
            "failed_check": proof.get("failed_check") if isinstance(proof.get("failed_check"), str) else None,
            "error_code": proof.get("error_code") if isinstance(proof.get("error_code"), str) else None,
            "current": manifest_sha is not None and proof.get("manifest_sha256") == manifest_sha,
        }

    return {
        "drill": view(newest_drill(proofs)),
        "drill_ok": view(newest_drill(proofs, "ok")),
        "drills": len(proofs),
    }


def vm_view(catalog: Catalog, raw_verdicts: dict[str, dict[str, t.Any] | None], now: dt.datetime,
            series: str | None = None, proofs: dict[str, dict[str, t.Any]] | None = None) -> dict[str, t.Any]:
    """One VM: its sets oldest first (of one series, or all, unreadable ones included), series, totals."""
    verdicts = {sid: verdict_view(raw_verdicts.get(sid), catalog.sets[sid].manifest_sha256, now) for sid in catalog.ids()}
    # A set whose manifest is unreadable has no known series: it shows only when no series is asked for.
    ids = [sid for sid in catalog.ids() if series is None or catalog.sets[sid].series == series]
    paths = RestorePaths(catalog, verdicts)
    sets = [set_view(catalog, sid, paths, now) for sid in ids]
    by_series: dict[str, list[dict[str, t.Any]]] = {}
    for s in sets:
        if s["series"] is not None:
            by_series.setdefault(s["series"], []).append(s)
    newest = next((s for s in reversed(sets) if s["restorable"]), None)
    host = next((e.manifest.get("host") for e in reversed(list(catalog.sets.values())) if e.manifest is not None), None)
    return {
        "uuid": catalog.vm_uuid,
        "name": catalog.vm_name(),
        "host": host,
        "sets": sets,
        "series": [_series_view(name, by_series[name]) for name in sorted(by_series)],
        "newest_restorable": None if newest is None else {
            "set_id": newest["set_id"], "series": newest["series"], "started": newest["started"],
            "completed": newest["completed"], "age_seconds": newest["age_seconds"],
        },
        "totals": {"sets": len(sets), "bytes": sum(s["bytes"] or 0 for s in sets)},
        **drill_view(catalog, proofs or {}, now),
    }


def without_set_lists(vm: dict[str, t.Any]) -> dict[str, t.Any]:
    """The VM's view without its per-set lists (``sets``, and each chain's ``sets``): what stays is
    O(VMs x chains), not O(sets), for a fleet's dashboards on repositories of thousands of sets."""
    del vm["sets"]
    for series in vm["series"]:
        for chain in series["chains"]:
            del chain["sets"]
    return vm


def describe(repo_path: str, catalogs: list[Catalog], raw_verdicts: dict[str, dict[str, dict[str, t.Any] | None]],
             now: dt.datetime, series: str | None = None, asked_for_vm: bool = False,
             drills: dict[str, dict[str, dict[str, t.Any]]] | None = None, list_sets: bool = True) -> dict[str, t.Any]:
    """The catalog result (without ``changed``/``msg``). SET_NOT_FOUND when a series is asked for and
    none of the VMs asked for has a readable set of it. ``list_sets`` false leaves out the per-set
    lists (``without_set_lists``); every count, total and newest point is computed the same way."""
    vms = [vm_view(c, raw_verdicts.get(c.vm_uuid, {}), now, series, (drills or {}).get(c.vm_uuid)) for c in catalogs]
    if series is not None:
        vms = [vm for vm in vms if vm["sets"]]
        if not vms:
            whom = "the VM asked for" if asked_for_vm else "any VM"
            raise VmBackupError("SET_NOT_FOUND", f"series {series!r} has no readable set of {whom} in repository {repo_path}",
                                series=series)
    vms.sort(key=lambda vm: (vm["name"] is None, vm["name"] or "", vm["uuid"]))
    if not list_sets:
        vms = [without_set_lists(vm) for vm in vms]
    return {
        "repository": repo_path,
        "generated": _manifest.iso(now),
        "vms": vms,
        "totals": {
            "vms": len(vms),
            "sets": sum(vm["totals"]["sets"] for vm in vms),
            "bytes": sum(vm["totals"]["bytes"] for vm in vms),
        },
    }


class InfoBackend(Backend):
    """Reads the catalog; writes nothing, takes no lock, so check mode is the same run."""

    def run(self) -> dict[str, t.Any]:
        path = validate_params(self.p)
        expression = compile_query(self.p.query) if self.p.query is not None else None
        now = _manifest.utcnow()
        repo = repo_mod.open_repository(path, self.p.allow_unsafe_permissions)
        drills: dict[str, dict[str, dict[str, t.Any]]] = {}
        catalogs, verdicts, warnings = read_vms(repo, self.p.name, self.p.uuid, drills)
        self.warnings.extend(warnings)
        result = describe(path, catalogs, verdicts, now, self.p.series, asked_for_vm=self.p.name is not None or self.p.uuid is not None,
                          drills=drills, list_sets=self.p.list_sets)
        if expression is not None:
            result["query_result"] = run_query(expression, result)
        totals = result["totals"]
        scope = f" of series {self.p.series}" if self.p.series else ""
        result.update(changed=False, msg=f"{totals['sets']} sets{scope} of {totals['vms']} VMs, {totals['bytes']} bytes")
        return result
