# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The prune backend: apply a retention policy to the committed sets of VMs in a repository.

This module is private to the vmbackup.libvirt collection; it is not a public API.

``Pruner.run()`` observes (the catalog of each VM, verdicts, the host clock), decides with the
pure ``_retention.select`` (the same code as the ``retention_preview`` filter), and only then
acts, under one check-mode gate and the VMs' exclusive locks. Prune touches no libvirt state.

Removing a set, descendants before ancestors (so every chain left in ``sets/`` is sound at
every moment, whenever the run dies):

1. ``rename(sets/<id>, .removing/<id>)``: one atomic step takes the set out of the catalog;
   fsync both directories.
2. ``rename(sets/<id>.verify.json, .removing/<id>.verify.json)``, and the same for the drill
   proof ``<id>.drill.json``, not synced on their own: the next set's step 1 (or the final sync of
   ``sets/`` and ``.removing/``) makes them durable; a sidecar that outlived its set after a crash
   is a harmless orphan the next prune removes.
3. The tree under ``.removing/`` is removed through descriptors, never following a link (what a
   crash leaves there, the next prune finishes).

``vms/<uuid>/.removing/`` (mode 0700) exists only while a prune runs or after one was killed;
nothing but prune reads it (the catalog, verify, restore and export's leftover cleanup look
only at ``sets/`` and ``.incomplete/``). The next prune, under the exclusive lock, finishes
whatever is in it before it decides anything, and reports it in ``cleaned_up``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import json
import os
import stat
import time
import typing as t

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _retention
from ansible_collections.vmbackup.libvirt.plugins.module_utils._catalog import Catalog, resolve_vm_uuids, set_id_time, validate_selection
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._lock import VmLock, validate_timeout
from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import Backend

REMOVING = ".removing"
SIDECAR_SUFFIX = ".verify.json"
# Every sidecar a set can have beside it: the verify verdict, the drill proof. Each goes with its set.
SIDECAR_SUFFIXES = (SIDECAR_SUFFIX, ".drill.json")
# export's staging record (_export.RUN_FILE; not imported, that module needs libvirt).
RUN_FILE = "run.json"
_FAILED_VERDICTS = ("failed", "unreadable")


@dataclasses.dataclass
class PruneParams:
    repository: str
    name: str | None = None
    uuid: str | None = None
    series: str | None = None
    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: str | None = None
    timezone: str = "UTC"
    lock_timeout: float = 60.0
    allow_unsafe_permissions: bool = False


def validate_params(p: PruneParams) -> tuple[str, _retention.Policy]:
    """Everything about the request that can be refused before the repository is opened."""
    path = repo_mod.validate_repository_path(p.repository)
    p.uuid = validate_selection(p.name, p.uuid, p.series)
    validate_timeout(p.lock_timeout)
    policy = _retention.make_policy({key: getattr(p, key) for key in _retention.POLICY_KEYS}, timezone=p.timezone)
    _retention.check_policy(policy)
    return path, policy


# --------------------------------------------------------------------------- observing a VM


def set_time(entry: t.Any, key: str = "started") -> dt.datetime:
    """A set's ``started`` (or ``completed``) time; an unreadable set is dated by its id."""
    if entry.manifest is not None:
        value = entry.manifest[key]
        # A valid manifest's times are YYYY-MM-DDTHH:MM:SSZ (validate_manifest): fromisoformat reads that form
        # exactly as parse_iso does, ten times faster (three times per set, on thousands of sets).
        if isinstance(value, str) and len(value) == 20 and value[10] == "T" and value[-1] == "Z":
            try:
                return dt.datetime.fromisoformat(value[:-1]).replace(tzinfo=dt.timezone.utc)
            except ValueError:
                pass
        return _manifest.parse_iso(value)
    return set_id_time(entry.set_id)


def restore_fault(catalog: Catalog, set_id: str, verdicts: dict[str, dict[str, t.Any] | None]) -> str | None:
    """Why the point cannot be restored, or None: a broken or unreadable link on its chain, or
    a verify verdict other than ``ok`` (failed, unreadable) of any set its restore reads (stale
    or not: a failure is believed until a new verify says otherwise). Never verified: restorable."""
    try:
        path = catalog.sets_of_chain(set_id)
    except VmBackupError as exc:
        return f"{exc.error_code}: {exc.msg}"
    for member in path:
        verdict = verdicts.get(member)
        if verdict is None and member not in verdicts:
            verdict = verdicts[member] = catalog.verdict(member)
        # Anything but "ok" blocks (an outcome verify never writes reads as unreadable), as in backup_info.
        if verdict is not None and verdict.get("outcome") != "ok":
            what = "its" if member == set_id else f"set {member}'s"
            outcome = verdict.get("outcome") if verdict.get("outcome") in _FAILED_VERDICTS else "unreadable"
            return f"{what} last verify verdict is {outcome}"
    return None


def points_of(catalog: Catalog) -> tuple[list[_retention.Point], dict[str, str | None]]:
    """The retention points of a VM and, per set, why it is not restorable (None when it is)."""
    verdicts: dict[str, dict[str, t.Any] | None] = {}
    points, faults = [], {}
    for set_id, entry in catalog.sets.items():
        m = entry.manifest
        fault = restore_fault(catalog, set_id, verdicts) if m is not None else "the manifest is unreadable"
        faults[set_id] = fault
        points.append(_retention.Point(
            set_id=set_id, time=set_time(entry), series=entry.series, chain_id=(m or {}).get("chain_id"),
            parent_id=entry.parent_id, type=(m or {}).get("type"), restorable=fault is None, readable=m is not None))
    return points, faults


def check_clock(catalog: Catalog, now: dt.datetime) -> None:
    """CLOCK_SKEW when a set started or completed after ``now`` (select checks ``started``)."""
    future = sorted(sid for sid, entry in catalog.sets.items()
                    if set_time(entry) > now or (entry.manifest is not None and set_time(entry, "completed") > now))
    if future:
        raise VmBackupError(
            "CLOCK_SKEW",
            f"{len(future)} set(s) of VM {catalog.vm_uuid} are dated after this host's clock ({_manifest.iso(now)}), the first "
            f"{future[0]}; fix the clock (or that of the host that wrote them) first: nothing was removed",
            future_sets=future, now=_manifest.iso(now), vm_uuid=catalog.vm_uuid)


def _tree_bytes(parent_fd: int, name: str) -> int:
    """Sum of the sizes of the regular files under ``name`` (a file or a directory), never following a link."""
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISDIR(st.st_mode):
        return 0
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    try:
        return sum(_tree_bytes(fd, child) for child in os.listdir(fd))
    finally:
        os.close(fd)


def _vm_fd(repo: repo_mod.Repository, vm_uuid: str, *parts: str) -> t.ContextManager[int]:
    # Repository._open: the repository checked from / like a target, each part opened without
    # following a link and checked (owner, not writable by others).
    return repo._open("vms", vm_uuid, *parts)  # pylint: disable=protected-access


def _names(repo: repo_mod.Repository, vm_uuid: str, *parts: str) -> list[str]:
    try:
        with _vm_fd(repo, vm_uuid, *parts) as fd:
            return sorted(os.listdir(fd))
    except FileNotFoundError:
        return []


def _exists(fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


@dataclasses.dataclass
class VmPlan:
    """What prune decided for one VM (a pure value once built)."""

    catalog: Catalog
    decisions: list[_retention.Decision]
    faults: dict[str, str | None]
    bytes: dict[str, int]
    unfinished: list[str]  # names in .removing/ (an interrupted prune's)
    orphan_sidecars: list[str]  # sets/<id>.verify.json (or .drill.json) without a set <id>
    staging: list[str]  # .incomplete/<name> of dead runs that prune removes
    staging_left: list[tuple[str, str]]  # (.incomplete/<name>, why it is left to export)

    @property
    def removed(self) -> list[str]:
        return [d.set_id for d in self.decisions if d.action == "remove"]

    def removal_order(self) -> list[str]:
        """Descendants before ancestors: newest id first (a child's id always sorts after its
        parent's). The closure guarantees that no kept set descends from a removed one."""
        gone = set(self.removed)
        for set_id in gone:
            kept_below = [d for d in self.catalog.descendants(set_id) if d not in gone]
            if kept_below:  # select's closure makes this impossible; refuse rather than break a chain
                raise VmBackupError("CHAIN_BROKEN", f"set {set_id} would be removed under kept sets {', '.join(kept_below)}",
                                    set_id=set_id)
        return sorted(gone, reverse=True)


def plan_vm(catalog: Catalog, policy: _retention.Policy, now: dt.datetime, series: str | None) -> VmPlan:
    repo, vm_uuid = catalog.repo, catalog.vm_uuid
    check_clock(catalog, now)
    points, faults = points_of(catalog)
    decisions = _retention.select(points, policy, now, series=series)
    sizes: dict[str, int] = {}
    set_names = _names(repo, vm_uuid, "sets")
    if catalog.sets:
        with _vm_fd(repo, vm_uuid, "sets") as sets_fd:
            for set_id in catalog.sets:
                sizes[set_id] = _tree_bytes(sets_fd, set_id)
                for suffix in SIDECAR_SUFFIXES:
                    if set_id + suffix in set_names:
                        sizes[set_id] += _tree_bytes(sets_fd, set_id + suffix)
    orphans = [n for n in set_names for suffix in SIDECAR_SUFFIXES
               if n.endswith(suffix) and _manifest.is_set_id(n[:-len(suffix)]) and n[:-len(suffix)] not in set_names]
    staging, left = [], []
    for name in _names(repo, vm_uuid, ".incomplete"):
        why = _staging_owned_by_export(repo, vm_uuid, name)
        if why is None:
            staging.append(name)
        else:
            left.append((name, why))
    return VmPlan(catalog, decisions, faults, sizes, _names(repo, vm_uuid, REMOVING), orphans, staging, left)


def _staging_owned_by_export(repo: repo_mod.Repository, vm_uuid: str, name: str) -> str | None:
    """Why a dead run's staging directory is left to export, or None when prune may remove it.

    A live backup's staging records the checkpoint the run created (run.json). Only export can
    delete that checkpoint (a dirty bitmap QEMU updates on every guest write) and abort a backup
    job QEMU may still be writing into the directory; the name in run.json is the only record
    of it, so removing the directory would leak the bitmap. Copies of shut-off VMs, and runs
    that died before they wrote run.json, hold no libvirt state: prune removes those.
    """
    try:
        record = json.loads(repo.read_staging_file(vm_uuid, name, RUN_FILE).decode("utf-8"))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ENOENT):
            return None  # a stray file, or a directory without run.json
        return f"its {RUN_FILE} cannot be read ({exc.strerror}); left for export's cleanup"
    except (ValueError, UnicodeDecodeError, VmBackupError):
        return f"its {RUN_FILE} is not valid; left for export's cleanup"
    checkpoint = record.get("checkpoint") if isinstance(record, dict) else None
    if checkpoint:
        return (f"an interrupted live backup that created checkpoint {checkpoint}; the next export of the VM deletes "
                "that checkpoint and aborts its job, then removes the directory")
    return None


# --------------------------------------------------------------------------- acting


def _ensure_removing(repo: repo_mod.Repository, vm_fd: int, vm_uuid: str) -> int:
    fd, _created = repo_mod._ensure_dir_at(  # pylint: disable=protected-access
        vm_fd, REMOVING, repo_mod.DIR_MODE_PRIVATE, "repository", repo.path, os.path.join(repo.vm_dir(vm_uuid), REMOVING),
        repo.allow_unsafe_permissions)
    return fd


def _rename_out(sets_fd: int, removing_fd: int, name: str) -> bool:
    """Move ``name`` from sets/ into .removing/ (False when it is not there). Never replaces:
    .removing/ was emptied under the lock, and a name found there is refused."""
    if not _exists(sets_fd, name):
        return False
    if _exists(removing_fd, name):
        raise VmBackupError("REPOSITORY_FORMAT", f"{REMOVING}/{name} exists already; refusing to replace it")
    os.rename(name, name, src_dir_fd=sets_fd, dst_dir_fd=removing_fd)
    return True


def remove_set(repo: repo_mod.Repository, vm_uuid: str, set_id: str) -> None:
    """Take a set out of sets/ by renaming it, with its sidecar, then remove the tree (see module doc)."""
    with _vm_fd(repo, vm_uuid) as vm_fd:
        removing = _ensure_removing(repo, vm_fd, vm_uuid)
        try:
            sets_fd = repo_mod._open_child(vm_fd, "sets", "repository", repo.path, repo.sets_dir(vm_uuid))  # pylint: disable=protected-access
            try:
                if not _rename_out(sets_fd, removing, set_id):
                    raise VmBackupError("SET_NOT_FOUND", f"set {set_id} vanished from {repo.sets_dir(vm_uuid)} during the prune",
                                        set_id=set_id)
                os.fsync(sets_fd)
                os.fsync(removing)
                # The set is out of the catalog now, durably; its verdict and drill proof follow it. Their
                # renames and the removal of the trees are not synced one by one (the next set's sync, or the
                # final one of .removing/, carries them): a crash before that leaves a sidecar whose set is
                # gone (an orphan the next prune removes) or names in .removing/ (which it finishes), never a
                # set without its verdict. Two directory syncs per set instead of four or five.
                for suffix in SIDECAR_SUFFIXES:
                    _rename_out(sets_fd, removing, set_id + suffix)
            finally:
                os.close(sets_fd)
            for name in (set_id,) + tuple(set_id + suffix for suffix in SIDECAR_SUFFIXES):
                if _exists(removing, name):
                    repo_mod._remove_at(removing, name)  # pylint: disable=protected-access
        finally:
            os.close(removing)


def finish_removing(repo: repo_mod.Repository, vm_uuid: str, names: list[str]) -> list[str]:
    """Remove what an interrupted prune left in .removing/ (and the directory once empty)."""
    done = []
    with _vm_fd(repo, vm_uuid) as vm_fd:
        try:
            fd = repo_mod._open_child(vm_fd, REMOVING, "repository", repo.path,  # pylint: disable=protected-access
                                      os.path.join(repo.vm_dir(vm_uuid), REMOVING))
        except FileNotFoundError:
            return done
        try:
            repo_mod._check_dir(os.fstat(fd), "repository", repo.path, os.path.join(repo.vm_dir(vm_uuid), REMOVING),  # pylint: disable=protected-access
                                target=True, modes=True, allow_unsafe_permissions=repo.allow_unsafe_permissions)
            for name in names:
                if _exists(fd, name):
                    repo_mod._remove_at(fd, name)  # pylint: disable=protected-access
                    done.append(os.path.join(repo.vm_dir(vm_uuid), REMOVING, name))
            os.fsync(fd)
            empty = not os.listdir(fd)
        finally:
            os.close(fd)
        if empty:
            os.rmdir(REMOVING, dir_fd=vm_fd)
            os.fsync(vm_fd)
    return done


def remove_orphan_sidecars(repo: repo_mod.Repository, vm_uuid: str, names: list[str]) -> list[str]:
    done: list[str] = []
    if not names:
        return done
    with _vm_fd(repo, vm_uuid, "sets") as fd:
        for name in names:
            set_id = next(name[:-len(sfx)] for sfx in SIDECAR_SUFFIXES if name.endswith(sfx))
            if _exists(fd, name) and not _exists(fd, set_id):
                repo_mod._remove_at(fd, name)  # pylint: disable=protected-access
                done.append(os.path.join(repo.sets_dir(vm_uuid), name))
        if done:
            os.fsync(fd)
    return done


def remove_staging(repo: repo_mod.Repository, vm_uuid: str, names: list[str]) -> list[str]:
    done = []
    try:
        with _vm_fd(repo, vm_uuid, ".incomplete") as fd:
            for name in names:
                # Decided again here, under the lock, just before removing.
                if _exists(fd, name) and _staging_owned_by_export(repo, vm_uuid, name) is None:
                    repo_mod._remove_at(fd, name)  # pylint: disable=protected-access
                    done.append(os.path.join(repo.staging_root(vm_uuid), name))
            if done:
                os.fsync(fd)
    except FileNotFoundError:
        pass
    return done


# --------------------------------------------------------------------------- the backend


class Pruner(Backend):
    """Applies a retention policy; see the module docstring for the removal protocol."""

    cancel_outcome = ("stopped; sets already renamed into .removing/ are gone from the catalog and the next prune "
                      "finishes removing them, every other set is untouched")

    def run(self) -> dict[str, t.Any]:
        started = time.monotonic()
        path, policy = validate_params(self.p)
        repo = repo_mod.open_repository(path, self.p.allow_unsafe_permissions)
        # Which VMs (listings only, unless a name must be matched): the catalogs are read under the locks.
        uuids = resolve_vm_uuids(repo, self.p.name, self.p.uuid)
        locks: list[VmLock] = []
        timings: dict[str, float] = {}
        try:
            lock_started = time.monotonic()
            for vm_uuid in sorted(uuids):  # one order: two prunes cannot deadlock
                lock = self._lock(repo, vm_uuid)
                if lock is not None:
                    lock.acquire()
                    locks.append(lock)
            timings["lock_s"] = time.monotonic() - lock_started
            read_started = time.monotonic()
            # Under the locks: what an export committed while we waited is seen.
            catalogs = [Catalog(repo, vm_uuid) for vm_uuid in uuids]
            now = _manifest.utcnow()
            # Every VM is decided before anything is removed: a refusal (CLOCK_SKEW) removes nothing anywhere.
            plans = [plan_vm(c, policy, now, self.p.series) for c in catalogs]
            timings["decide_s"] = time.monotonic() - read_started
            remove_started = time.monotonic()
            if not self.check_mode:
                for plan in plans:
                    self._execute(plan)
            timings["remove_s"] = time.monotonic() - remove_started
        finally:
            for lock in locks:
                lock.release()
        timings["total_s"] = time.monotonic() - started
        if self.p.series is not None and not any(self.p.series in c.series_names() for c in catalogs):
            # Not an error (a new schedule has no set yet), but a typo would otherwise prune nothing, silently.
            known = sorted({s for c in catalogs for s in c.series_names()})
            self.warnings.append(f"no selected VM has a set of series {self.p.series!r} (series found: "
                                 f"{', '.join(known) or 'none'}); nothing of it was pruned")
        return self._result(plans, policy, now, timings)

    def _lock(self, repo: repo_mod.Repository, vm_uuid: str) -> VmLock | None:
        """The exclusive lock for a real run. Check mode creates nothing: a shared lock on an
        existing lock file (so a running export is VM_LOCKED in check mode as in the real run),
        none when there is no lock file (then no run has ever held it)."""
        lock_path = repo.lock_path(vm_uuid)
        if not self.check_mode:
            return VmLock(lock_path, self.p.lock_timeout, f"prune {vm_uuid}")
        with _vm_fd(repo, vm_uuid) as vm_fd:
            if not _exists(vm_fd, "lock"):
                return None
        return VmLock(lock_path, self.p.lock_timeout, f"prune {vm_uuid} (check mode)", shared=True)

    def _execute(self, plan: VmPlan) -> None:
        repo, vm_uuid = plan.catalog.repo, plan.catalog.vm_uuid
        # An interrupted prune's leftovers first: .removing/ must be empty before sets go there.
        for gone in finish_removing(repo, vm_uuid, plan.unfinished):
            self.cleaned.append(f"finished removing {gone} (left by an interrupted prune)")
        for gone in remove_orphan_sidecars(repo, vm_uuid, plan.orphan_sidecars):
            self.cleaned.append(f"removed {gone} (a verdict whose set is gone)")
        for gone in remove_staging(repo, vm_uuid, plan.staging):
            self.cleaned.append(f"removed incomplete set {gone} (staging of a dead run)")
        order = plan.removal_order()
        for set_id in order:
            remove_set(repo, vm_uuid, set_id)
        if order:
            self._sync_sets(repo, vm_uuid)  # the last sidecar renames
            finish_removing(repo, vm_uuid, [])  # the now empty .removing/ itself (synced there)

    @staticmethod
    def _sync_sets(repo: repo_mod.Repository, vm_uuid: str) -> None:
        with _vm_fd(repo, vm_uuid, "sets") as fd:
            os.fsync(fd)

    # ------------------------------------------------------------------ the result
    def _predicted_cleanup(self, plan: VmPlan) -> list[str]:
        repo, vm_uuid = plan.catalog.repo, plan.catalog.vm_uuid
        out = [f"finished removing {os.path.join(repo.vm_dir(vm_uuid), REMOVING, n)} (left by an interrupted prune)"
               for n in plan.unfinished]
        out += [f"removed {os.path.join(repo.sets_dir(vm_uuid), n)} (a verdict whose set is gone)" for n in plan.orphan_sidecars]
        out += [f"removed incomplete set {os.path.join(repo.staging_root(vm_uuid), n)} (staging of a dead run)"
                for n in plan.staging]
        return out

    def _result(self, plans: list[VmPlan], policy: _retention.Policy, now: dt.datetime,
                timings: dict[str, float]) -> dict[str, t.Any]:
        sets, vms, before, after = [], [], [], []
        cleaned = list(self.cleaned) if not self.check_mode else [c for p in plans for c in self._predicted_cleanup(p)]
        left = []
        for plan in sorted(plans, key=lambda p: ((p.catalog.vm_name() or ""), p.catalog.vm_uuid)):
            catalog = plan.catalog
            name = catalog.vm_name()
            per_series: dict[str, dict[str, t.Any]] = {}
            for d in plan.decisions:
                entry = catalog.sets[d.set_id]
                m = entry.manifest or {}
                series = entry.series
                row = {
                    "vm_uuid": catalog.vm_uuid, "vm_name": name, "set_id": d.set_id, "series": series,
                    "type": m.get("type"), "chain_id": m.get("chain_id"), "parent": entry.parent_id,
                    "started": m.get("started"), "bytes": plan.bytes.get(d.set_id, 0),
                    "readable": entry.manifest is not None, "restorable": plan.faults[d.set_id] is None, "restore_fault": plan.faults[d.set_id],
                    "action": d.action, "reasons": d.reasons,
                }
                sets.append(row)
                label = f"{name or catalog.vm_uuid} {series or '?'} {d.set_id} ({m.get('type') or 'unreadable'})"
                before.append(label)
                if d.action == "keep":
                    after.append(label)
                s = per_series.setdefault(series or "(unreadable)", {"name": series, "kept": 0, "removed": 0, "removed_bytes": 0})
                s["kept" if d.action == "keep" else "removed"] += 1
                if d.action == "remove":
                    s["removed_bytes"] += row["bytes"]
            removed = plan.removed
            vms.append({
                "uuid": catalog.vm_uuid, "name": name,
                "sets": len(plan.decisions),
                "kept": [d.set_id for d in plan.decisions if d.action == "keep"],
                "removed": removed,
                "removed_bytes": sum(plan.bytes.get(s, 0) for s in removed),
                "series": [per_series[k] for k in sorted(per_series)],
            })
            left += [{"vm_uuid": catalog.vm_uuid, "path": os.path.join(catalog.repo.staging_root(catalog.vm_uuid), n), "reason": why}
                     for n, why in plan.staging_left]
        removed_all = [s["set_id"] for s in sets if s["action"] == "remove"]
        removed_bytes = sum(s["bytes"] for s in sets if s["action"] == "remove")
        changed = bool(removed_all or cleaned)
        verb = "would remove" if self.check_mode else "removed"
        msg = (f"{verb} {len(removed_all)} of {len(sets)} sets ({removed_bytes} bytes) of {len(vms)} VM(s)"
               + (f"; {verb.replace('remove', 'clean')} up {len(cleaned)} leftover(s)" if cleaned else ""))
        for item in left:
            self.warnings.append(f"{item['path']} was left in place: {item['reason']}")
        return {
            "changed": changed,
            "msg": msg,
            "now": _manifest.iso(now),
            "policy": {**{k: getattr(policy, k) for k in _retention.POLICY_KEYS if k != "keep_within"},
                       "keep_within": _retention.format_duration(policy.keep_within) if policy.keep_within else None,
                       "timezone": policy.timezone},
            "series": self.p.series,
            "sets": sets,
            "removed": removed_all,
            "kept": [s["set_id"] for s in sets if s["action"] == "keep"],
            "removed_bytes": removed_bytes,
            "cleaned_up": cleaned,
            "staging_left": left,
            "vms": vms,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "duration_s": round(timings["total_s"], 3),
            "diff": {"before": "\n".join(before) + ("\n" if before else ""),
                     "after": "\n".join(after) + ("\n" if after else ""),
                     "before_header": f"{self.p.repository} (sets)", "after_header": f"{self.p.repository} (sets after prune)"},
        }
