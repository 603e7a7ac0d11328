# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Retention: which points (committed sets) of one VM a policy keeps, and why. Pure: no I/O.

This module is private to the vmbackup.libvirt collection; it is not a public API.

The semantics are those of restic ``forget`` and Proxmox Backup Server ``prune`` (see
docs/retention.md for the exact rules and a worked example):

- ``keep_last N``: the N newest eligible points.
- ``keep_hourly/daily/weekly/monthly/yearly N``: walking the eligible points newest first,
  the newest point of each bucket, for the N newest buckets that have a point. Buckets are the
  point's UTC time seen in one IANA zone (``zoneinfo``; default UTC): an hour (with its UTC
  offset, so the repeated hour of a DST fall-back is two buckets), a local day, an ISO week
  (``%G-W%V``), a month, a year. The runner's ``TZ`` plays no part.
- ``keep_within D``: every eligible point at or after ``now - D``.
- Eligible: restorable points only. A point whose restore path has a failed or unreadable
  verdict or a broken link never fills a bucket (the next older restorable point does).
- Always kept, per series: its newest point (``newest``: it holds the series' live checkpoint
  and is the next parent) and its newest restorable point (``newest restorable``).
  Unreadable points (their series is unknown) are never removed.
- Then the closure: a kept point keeps every ancestor (``parent of <id>``), across series.

Selection is per series: each series is an independent schedule with its own buckets.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
import typing as t

try:
    import zoneinfo
except ImportError:  # Python < 3.9 on a managed host: only UTC then
    zoneinfo = None  # type: ignore[assignment]

from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

# Bucket rules, finest first: the order reasons are listed in.
BUCKET_RULES = ("hourly", "daily", "weekly", "monthly", "yearly")
COUNT_RULES = ("last",) + BUCKET_RULES
POLICY_KEYS = tuple(f"keep_{rule}" for rule in COUNT_RULES) + ("keep_within",)

_UTC = dt.timezone.utc
_DURATION_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([wdhms])")
# A hundred years: longer is a typo (or an overflow) rather than a wish.
MAX_DURATION = dt.timedelta(days=36525)


@dataclasses.dataclass(frozen=True)
class Point:
    """One committed set as retention sees it.

    ``time``: the backup's point in time (the manifest's ``started``), timezone-aware.
    ``restorable``: False when the point's restore path has a failed or unreadable verify
    verdict or a broken link. ``readable``: False when its manifest cannot be read (then the
    series, chain and parent are unknown).
    """

    set_id: str
    time: dt.datetime
    series: str | None = "default"
    chain_id: str | None = None
    parent_id: str | None = None
    type: str | None = "full"
    restorable: bool = True
    readable: bool = True


@dataclasses.dataclass(frozen=True)
class Policy:
    """How many buckets of each kind to keep (None or 0: the rule is off), a duration, a zone."""

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: dt.timedelta | None = None
    timezone: str = "UTC"

    def count(self, rule: str) -> int:
        return getattr(self, f"keep_{rule}") or 0

    def is_empty(self) -> bool:
        return not any(self.count(rule) for rule in COUNT_RULES) and not self.keep_within


@dataclasses.dataclass
class Decision:
    set_id: str
    action: str  # keep | remove
    reasons: list[str]
    series: str | None = None

    def as_dict(self) -> dict[str, t.Any]:
        return {"set_id": self.set_id, "action": self.action, "reasons": list(self.reasons), "series": self.series}


# --------------------------------------------------------------------------- inputs


def parse_duration(value: t.Any) -> dt.timedelta:
    """A duration: ``14d``, ``36h``, ``2w``, ``90m`` (minutes), ``30s``, combined (``1w2d12h``),
    or a plain number of days (``7``, ``1.5``). A ``timedelta`` is taken as it is.

    Months and years are refused (INVALID_ARGUMENT): they have no fixed length, and a keep
    window that silently means 30 or 365 days is a typo waiting to happen; give days (``365d``)
    or use ``keep_monthly``/``keep_yearly``, which count calendar buckets.
    """
    if isinstance(value, dt.timedelta):
        delta = value
    elif isinstance(value, bool) or value is None:
        raise VmBackupError("INVALID_ARGUMENT", f"duration {value!r} is not a duration such as 14d, 36h, 2w or 90m")
    elif isinstance(value, (int, float)):
        delta = _days(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            delta = _days(float(text))
        else:
            compact = re.sub(r"\s+", "", text)
            parts = _DURATION_PART.findall(compact)
            if not compact or "".join(n + u for n, u in parts) != compact:
                hint = " (months and years have no fixed length: give days, e.g. 365d)" if re.search(r"(mo|y)", text) else ""
                raise VmBackupError("INVALID_ARGUMENT",
                                    f"duration {value!r} is not a duration such as 14d, 36h, 2w, 90m or 1w2d{hint}")
            units = [u for _n, u in parts]
            if len(set(units)) != len(units):
                raise VmBackupError("INVALID_ARGUMENT", f"duration {value!r} names a unit twice")
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
            if not seconds <= MAX_DURATION.total_seconds():  # also inf: timedelta() would overflow
                raise VmBackupError("INVALID_ARGUMENT", f"duration {value!r} must be between 0 and {MAX_DURATION.days} days")
            delta = dt.timedelta(seconds=seconds)
    else:
        raise VmBackupError("INVALID_ARGUMENT", f"duration {value!r} is not a duration such as 14d, 36h, 2w or 90m")
    if delta < dt.timedelta(0) or delta > MAX_DURATION:
        raise VmBackupError("INVALID_ARGUMENT", f"duration {value!r} must be between 0 and {MAX_DURATION.days} days")
    return delta


def _days(number: float) -> dt.timedelta:
    if math.isnan(number) or number < 0 or number > MAX_DURATION.days:
        raise VmBackupError("INVALID_ARGUMENT", f"duration {number!r} must be between 0 and {MAX_DURATION.days} days")
    return dt.timedelta(days=number)


def format_duration(delta: dt.timedelta) -> str:
    """The ``14d12h30m`` text of a duration (whole seconds; days, not weeks, as most write it)."""
    seconds = int(delta.total_seconds())
    out = []
    for unit in ("d", "h", "m", "s"):
        size = _DURATION_UNITS[unit]
        if seconds >= size:
            out.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(out) or "0s"


def get_zone(name: t.Any) -> dt.tzinfo:
    """The IANA zone ``name`` (INVALID_ARGUMENT when unknown). UTC needs no zone database."""
    if name in (None, "", "UTC", "Etc/UTC"):
        return _UTC
    if not isinstance(name, str) or zoneinfo is None:
        raise VmBackupError("INVALID_ARGUMENT", f"timezone {name!r} is not an IANA time zone (zoneinfo is unavailable)")
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise VmBackupError("INVALID_ARGUMENT",
                            f"timezone {name!r} is not an IANA time zone such as UTC or Europe/Berlin "
                            "(is the tzdata package installed?)") from None


def make_policy(values: t.Mapping[str, t.Any], timezone: str | None = None) -> Policy:
    """A Policy from module options or filter arguments (unknown keys refused: a typo keeps nothing)."""
    unknown = sorted(set(values) - set(POLICY_KEYS) - {"timezone"})
    if unknown:
        raise VmBackupError("INVALID_ARGUMENT", f"unknown retention option(s) {', '.join(unknown)}; "
                                                f"known: {', '.join(POLICY_KEYS)}, timezone")
    counts: dict[str, int | None] = {}
    for rule in COUNT_RULES:
        key = f"keep_{rule}"
        value = values.get(key)
        if value is None:
            counts[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                if isinstance(value, bool) or float(value) != int(value):
                    raise ValueError
                value = int(value)
            except (TypeError, ValueError, OverflowError):
                raise VmBackupError("INVALID_ARGUMENT", f"{key} must be a whole number, not {value!r}") from None
        if not 0 <= value <= 1_000_000:
            raise VmBackupError("INVALID_ARGUMENT", f"{key} must be between 0 and 1000000, not {value}")
        counts[key] = value
    within = values.get("keep_within")
    if isinstance(within, str) and not within.strip():
        within = None  # a templated "" (an unset variable in a role) means no keep_within, not an error
    zone = timezone if timezone is not None else values.get("timezone") or "UTC"
    get_zone(zone)
    return Policy(keep_within=parse_duration(within) if within is not None else None, timezone=zone, **counts)


# --------------------------------------------------------------------------- buckets


def bucket(rule: str, when: dt.datetime, zone: dt.tzinfo) -> str:
    """The bucket label of ``when`` for a rule, seen in ``zone``.

    Hours carry their UTC offset: in a DST fall-back the wall clock shows 01:xx twice, and
    those are two real hours (two buckets). Days, weeks, months and years are local calendar
    units (a DST day has 23 or 25 hours and is still one day). Weeks are ISO weeks.
    """
    local = when.astimezone(zone)
    if rule == "hourly":
        offset = local.strftime("%z")
        return f"{local:%Y-%m-%dT%H}{offset[:3]}:{offset[3:]}" if offset else f"{local:%Y-%m-%dT%H}"
    if rule == "daily":
        return f"{local:%Y-%m-%d}"
    if rule == "weekly":
        iso = local.isocalendar()
        return f"{iso[0]:04d}-W{iso[1]:02d}"
    if rule == "monthly":
        return f"{local:%Y-%m}"
    if rule == "yearly":
        return f"{local:%Y}"
    raise ValueError(rule)


def _utc(when: dt.datetime) -> dt.datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"naive datetime {when!r}: give UTC-aware times")
    return when.astimezone(_UTC)


def _order(point: Point) -> str:
    """Points are ordered by set id: the UTC start second plus a sequence, so two sets of one
    second are ordered as they were taken, and ids sort in the order sets were taken even if
    the clock went back (export's "newest", the next parent, is the same point)."""
    return point.set_id


# --------------------------------------------------------------------------- the selection


def check_policy(policy: Policy) -> None:
    """RETENTION_POLICY_EMPTY for a policy that keeps nothing by itself."""
    if policy.is_empty():
        raise VmBackupError("RETENTION_POLICY_EMPTY",
                            "the retention policy keeps nothing: set at least one of "
                            + ", ".join(POLICY_KEYS) + " (to keep only the newest set, keep_last: 1)")


def select(points: t.Iterable[Point], policy: Policy, now: dt.datetime, series: str | None = None) -> list[Decision]:
    """Keep or remove each point of ONE VM, with every reason; decisions oldest first.

    RETENTION_POLICY_EMPTY for a policy that keeps nothing by itself; CLOCK_SKEW when a point
    is dated after ``now`` (its age, and so every bucket count, would be wrong: nothing is
    decided). Points of several series are selected per series. With ``series``, only that
    series is selected; the others' points are kept (``series X not selected``) and still
    pin their parents through the closure.
    """
    check_policy(policy)
    zone = get_zone(policy.timezone)
    now = _utc(now)
    ordered = sorted(points, key=_order)
    ids = [p.set_id for p in ordered]
    if len(set(ids)) != len(ids):
        raise VmBackupError("INVALID_ARGUMENT", "the same set id appears twice among the points of one VM")
    future = [p for p in ordered if _utc(p.time) > now]
    if future:
        raise VmBackupError(
            "CLOCK_SKEW",
            f"{len(future)} set(s) are dated after this host's clock ({now:%Y-%m-%dT%H:%M:%SZ}), the first {future[0].set_id} "
            f"at {_utc(future[0].time):%Y-%m-%dT%H:%M:%SZ}; fix the clock (or the set's host clock) first: nothing was removed",
            future_sets=[p.set_id for p in future], now=f"{now:%Y-%m-%dT%H:%M:%SZ}")

    reasons: dict[str, list[str]] = {p.set_id: [] for p in ordered}
    by_series: dict[str | None, list[Point]] = {}
    for point in ordered:
        if not point.readable:
            reasons[point.set_id].append("unreadable (never removed)")
            continue
        if series is not None and point.series != series:
            reasons[point.set_id].append(f"series {point.series} not selected")
            continue
        by_series.setdefault(point.series, []).append(point)

    for series_points in by_series.values():
        _select_series(series_points, policy, zone, now, reasons)

    _closure(ordered, reasons)
    return [Decision(p.set_id, "keep" if reasons[p.set_id] else "remove", reasons[p.set_id], p.series) for p in ordered]


def _select_series(points: list[Point], policy: Policy, zone: dt.tzinfo, now: dt.datetime,
                   reasons: dict[str, list[str]]) -> None:
    """The rules over one series' points (oldest first), appending reasons."""
    newest_first = list(reversed(points))
    eligible = [p for p in newest_first if p.restorable]
    # Every reason a point has, in a fixed order: newest, rules finest first, within.
    reasons[newest_first[0].set_id].append("newest")
    if eligible:
        reasons[eligible[0].set_id].append("newest restorable")
    for index, point in enumerate(eligible[:policy.count("last")]):
        reasons[point.set_id].append(f"last {index + 1}")
    for rule in BUCKET_RULES:
        wanted = policy.count(rule)
        seen: list[str] = []
        for point in eligible:
            if len(seen) >= wanted:
                break
            label = bucket(rule, point.time, zone)
            if label not in seen:  # newest first: the first point met in a bucket is its newest
                seen.append(label)
                reasons[point.set_id].append(f"{rule} {label}")
    if policy.keep_within:
        since = now - policy.keep_within
        text = format_duration(policy.keep_within)
        for point in eligible:
            if _utc(point.time) >= since:
                reasons[point.set_id].append(f"within {text}")


def _closure(points: list[Point], reasons: dict[str, list[str]]) -> None:
    """A kept point keeps its parent (``parent of <child>``), and so on back to the chain's base,
    whatever series the parent is in: removing it would break the kept point's restore."""
    by_id = {p.set_id: p for p in points}
    todo = [p.set_id for p in points if reasons[p.set_id]]
    while todo:
        child = todo.pop()
        parent = by_id[child].parent_id
        if parent is None or parent not in by_id or parent == child:
            continue
        note = f"parent of {child}"
        if note in reasons[parent]:
            continue
        was_kept = bool(reasons[parent])
        reasons[parent].append(note)
        if not was_kept:
            todo.append(parent)


def summary(decisions: list[Decision]) -> dict[str, list[str]]:
    """{"keep": [...], "remove": [...]} set ids, oldest first."""
    return {"keep": [d.set_id for d in decisions if d.action == "keep"],
            "remove": [d.set_id for d in decisions if d.action == "remove"]}
