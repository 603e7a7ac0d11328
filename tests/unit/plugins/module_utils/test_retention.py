# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""plugins/module_utils/_retention.py: the selection table, buckets, durations, and proof that
the outcome does not depend on the runner's TZ (the table re-run in subprocesses under each TZ).

Each case lists every point and the exact reasons expected for it (``[]``: removed). The
expected values were worked out by hand from the documented rules (docs/retention.md), not
from the code's output.
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import subprocess
import sys
import time

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _retention as r
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

UTC = dt.timezone.utc
# Set in the subprocesses of test_table_is_independent_of_runner_tz (no recursion there).
_RERUN = "VMBACKUP_RETENTION_RERUN"


def ts(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def sid(text: str, seq: int = 1) -> str:
    return f"{ts(text):%Y%m%dT%H%M%SZ}-{seq:03d}"


def pt(text: str, seq: int = 1, **kw) -> r.Point:
    return r.Point(set_id=sid(text, seq), time=ts(text), **kw)


def chain(*specs: tuple, series: str = "default", chain_id: str = "c1") -> list[r.Point]:
    """(time, restorable) per point: the first is a full, each next an incremental of the previous."""
    out, parent = [], None
    for text, restorable in specs:
        p = r.Point(sid(text), ts(text), series=series, chain_id=chain_id, parent_id=parent,
                    type="incremental" if parent else "full", restorable=restorable)
        out.append(p)
        parent = p.set_id
    return out


def days(start: str, count: int, hour: str = "23:30:00", **kw) -> list[r.Point]:
    first = ts(f"{start}T{hour}Z")
    return [r.Point(f"{first + dt.timedelta(days=i):%Y%m%dT%H%M%SZ}-001", first + dt.timedelta(days=i), **kw)
            for i in range(count)]


N = ["newest", "newest restorable"]

# (id, points, policy, now, {set_id: reasons}) -- every point listed, [] means removed.
CASES = [
    pytest.param(
        days("2026-11-10", 5), r.Policy(keep_daily=3), ts("2026-11-15T00:00:00Z"),
        {sid("2026-11-10T23:30:00Z"): [], sid("2026-11-11T23:30:00Z"): [],
         sid("2026-11-12T23:30:00Z"): ["daily 2026-11-12"], sid("2026-11-13T23:30:00Z"): ["daily 2026-11-13"],
         sid("2026-11-14T23:30:00Z"): N + ["daily 2026-11-14"]},
        id="daily-utc"),
    # The same instants in Berlin: 23:30Z is 00:30 the next local day (CET, UTC+1).
    pytest.param(
        days("2026-11-10", 5), r.Policy(keep_daily=3, timezone="Europe/Berlin"), ts("2026-11-15T00:00:00Z"),
        {sid("2026-11-10T23:30:00Z"): [], sid("2026-11-11T23:30:00Z"): [],
         sid("2026-11-12T23:30:00Z"): ["daily 2026-11-13"], sid("2026-11-13T23:30:00Z"): ["daily 2026-11-14"],
         sid("2026-11-14T23:30:00Z"): N + ["daily 2026-11-15"]},
        id="daily-berlin-shifts-day"),
    # Berlin DST end 2026-10-25 03:00 CEST -> 02:00 CET. 22:30Z on the 24th is 00:30 CEST on the
    # 25th, 22:30Z on the 25th is 23:30 CET on the 25th: one local day (of 25 hours), one bucket.
    pytest.param(
        [pt("2026-10-24T21:30:00Z"), pt("2026-10-24T22:30:00Z"), pt("2026-10-25T22:30:00Z")],
        r.Policy(keep_daily=2, timezone="Europe/Berlin"), ts("2026-10-26T00:00:00Z"),
        {sid("2026-10-24T21:30:00Z"): ["daily 2026-10-24"], sid("2026-10-24T22:30:00Z"): [],
         sid("2026-10-25T22:30:00Z"): N + ["daily 2026-10-25"]},
        id="daily-berlin-dst-end"),
    pytest.param(
        [pt("2026-10-24T21:30:00Z"), pt("2026-10-24T22:30:00Z"), pt("2026-10-25T22:30:00Z")],
        r.Policy(keep_daily=2), ts("2026-10-26T00:00:00Z"),
        {sid("2026-10-24T21:30:00Z"): [], sid("2026-10-24T22:30:00Z"): ["daily 2026-10-24"],
         sid("2026-10-25T22:30:00Z"): N + ["daily 2026-10-25"]},
        id="daily-utc-same-points-as-berlin-dst-end"),
    # The repeated hour 02:00-03:00 of the Berlin fall-back is two real hours: two buckets.
    pytest.param(
        [pt("2026-10-25T00:10:00Z"), pt("2026-10-25T00:50:00Z"), pt("2026-10-25T01:10:00Z"), pt("2026-10-25T01:50:00Z")],
        r.Policy(keep_hourly=2, timezone="Europe/Berlin"), ts("2026-10-25T02:00:00Z"),
        {sid("2026-10-25T00:10:00Z"): [], sid("2026-10-25T00:50:00Z"): ["hourly 2026-10-25T02+02:00"],
         sid("2026-10-25T01:10:00Z"): [], sid("2026-10-25T01:50:00Z"): N + ["hourly 2026-10-25T02+01:00"]},
        id="hourly-berlin-repeated-hour"),
    # Berlin DST start 2026-03-29 02:00 CET -> 03:00 CEST: 00:59Z is 01:59 CET, 01:00Z is 03:00 CEST.
    pytest.param(
        [pt("2026-03-29T00:30:00Z"), pt("2026-03-29T00:59:00Z"), pt("2026-03-29T01:00:00Z")],
        r.Policy(keep_hourly=5, timezone="Europe/Berlin"), ts("2026-03-29T02:00:00Z"),
        {sid("2026-03-29T00:30:00Z"): [], sid("2026-03-29T00:59:00Z"): ["hourly 2026-03-29T01+01:00"],
         sid("2026-03-29T01:00:00Z"): N + ["hourly 2026-03-29T03+02:00"]},
        id="hourly-berlin-skipped-hour"),
    # Los Angeles DST start 2026-03-08 02:00 PST -> 03:00 PDT (10:00Z).
    pytest.param(
        [pt("2026-03-08T07:30:00Z"), pt("2026-03-08T08:30:00Z"), pt("2026-03-09T06:30:00Z"), pt("2026-03-09T07:30:00Z")],
        r.Policy(keep_daily=3, timezone="America/Los_Angeles"), ts("2026-03-10T00:00:00Z"),
        {sid("2026-03-08T07:30:00Z"): ["daily 2026-03-07"], sid("2026-03-08T08:30:00Z"): [],
         sid("2026-03-09T06:30:00Z"): ["daily 2026-03-08"], sid("2026-03-09T07:30:00Z"): N + ["daily 2026-03-09"]},
        id="daily-la-dst-start"),
    pytest.param(
        [pt("2026-03-08T07:30:00Z"), pt("2026-03-08T08:30:00Z"), pt("2026-03-09T06:30:00Z"), pt("2026-03-09T07:30:00Z")],
        r.Policy(keep_daily=3), ts("2026-03-10T00:00:00Z"),
        {sid("2026-03-08T07:30:00Z"): [], sid("2026-03-08T08:30:00Z"): ["daily 2026-03-08"],
         sid("2026-03-09T06:30:00Z"): [], sid("2026-03-09T07:30:00Z"): N + ["daily 2026-03-09"]},
        id="daily-utc-same-points-as-la"),
    # Los Angeles DST end 2026-11-01: 01:00-02:00 twice (PDT = 08:xxZ, PST = 09:xxZ).
    pytest.param(
        [pt("2026-11-01T08:30:00Z"), pt("2026-11-01T09:30:00Z")],
        r.Policy(keep_hourly=2, timezone="America/Los_Angeles"), ts("2026-11-01T10:00:00Z"),
        {sid("2026-11-01T08:30:00Z"): ["hourly 2026-11-01T01-07:00"],
         sid("2026-11-01T09:30:00Z"): N + ["hourly 2026-11-01T01-08:00"]},
        id="hourly-la-repeated-hour"),
    # ISO week 53 of 2026: Mon 2026-12-28 .. Sun 2027-01-03.
    pytest.param(
        [pt("2026-12-27T12:00:00Z"), pt("2026-12-28T12:00:00Z"), pt("2027-01-03T12:00:00Z"), pt("2027-01-04T12:00:00Z")],
        r.Policy(keep_weekly=3), ts("2027-01-05T00:00:00Z"),
        {sid("2026-12-27T12:00:00Z"): ["weekly 2026-W52"], sid("2026-12-28T12:00:00Z"): [],
         sid("2027-01-03T12:00:00Z"): ["weekly 2026-W53"], sid("2027-01-04T12:00:00Z"): N + ["weekly 2027-W01"]},
        id="weekly-iso-week-53"),
    pytest.param(
        [pt("2026-12-27T12:00:00Z"), pt("2026-12-28T12:00:00Z"), pt("2027-01-03T12:00:00Z"), pt("2027-01-04T12:00:00Z")],
        r.Policy(keep_monthly=2, keep_yearly=2), ts("2027-01-05T00:00:00Z"),
        {sid("2026-12-27T12:00:00Z"): [], sid("2026-12-28T12:00:00Z"): ["monthly 2026-12", "yearly 2026"],
         sid("2027-01-03T12:00:00Z"): [], sid("2027-01-04T12:00:00Z"): N + ["monthly 2027-01", "yearly 2027"]},
        id="monthly-yearly-year-boundary"),
    # New Year in Berlin comes an hour before UTC's: 23:30Z on Dec 31 is 2027 there, 2026 in UTC and LA.
    pytest.param(
        [pt("2026-12-31T20:00:00Z"), pt("2026-12-31T23:30:00Z")],
        r.Policy(keep_yearly=2, timezone="Europe/Berlin"), ts("2027-01-01T00:00:00Z"),
        {sid("2026-12-31T20:00:00Z"): ["yearly 2026"], sid("2026-12-31T23:30:00Z"): N + ["yearly 2027"]},
        id="yearly-berlin-new-year"),
    pytest.param(
        [pt("2026-12-31T20:00:00Z"), pt("2026-12-31T23:30:00Z")],
        r.Policy(keep_yearly=2, timezone="America/Los_Angeles"), ts("2027-01-01T00:00:00Z"),
        {sid("2026-12-31T20:00:00Z"): [], sid("2026-12-31T23:30:00Z"): N + ["yearly 2026"]},
        id="yearly-la-new-year"),
    # A week in LA that is the next ISO week in UTC: Sunday 2026-11-22 20:00 PST is Monday 04:00Z.
    pytest.param(
        [pt("2026-11-20T12:00:00Z"), pt("2026-11-23T04:00:00Z")],
        r.Policy(keep_weekly=1, timezone="America/Los_Angeles"), ts("2026-11-24T00:00:00Z"),
        {sid("2026-11-20T12:00:00Z"): [], sid("2026-11-23T04:00:00Z"): N + ["weekly 2026-W47"]},
        id="weekly-la-sunday-evening"),
    # A month with no sets does not count: the last 3 months that HAVE sets are kept.
    pytest.param(
        [pt("2026-01-15T03:00:00Z"), pt("2026-01-20T03:00:00Z"), pt("2026-03-10T03:00:00Z"), pt("2026-04-05T03:00:00Z")],
        r.Policy(keep_monthly=3), ts("2026-04-06T00:00:00Z"),
        {sid("2026-01-15T03:00:00Z"): [], sid("2026-01-20T03:00:00Z"): ["monthly 2026-01"],
         sid("2026-03-10T03:00:00Z"): ["monthly 2026-03"], sid("2026-04-05T03:00:00Z"): N + ["monthly 2026-04"]},
        id="monthly-gap"),
    # A failed full: its chain is not restorable and fills no bucket, so the daily rule keeps
    # only the two days of the good chain (restic would keep the failed chain's newest point).
    pytest.param(
        chain(("2026-11-01T02:00:00Z", False), ("2026-11-02T02:00:00Z", False), ("2026-11-03T02:00:00Z", False))
        + chain(("2026-11-04T02:00:00Z", True), ("2026-11-05T02:00:00Z", True), chain_id="c2"),
        r.Policy(keep_daily=3), ts("2026-11-06T00:00:00Z"),
        {sid("2026-11-01T02:00:00Z"): [], sid("2026-11-02T02:00:00Z"): [], sid("2026-11-03T02:00:00Z"): [],
         sid("2026-11-04T02:00:00Z"): ["daily 2026-11-04", f"parent of {sid('2026-11-05T02:00:00Z')}"],
         sid("2026-11-05T02:00:00Z"): N + ["daily 2026-11-05"]},
        id="failed-full-fills-no-bucket"),
    # The newest set failed: it stays (newest), the newest restorable stays, the closure keeps both chains' bases.
    pytest.param(
        chain(("2026-11-01T02:00:00Z", True), ("2026-11-02T02:00:00Z", True), ("2026-11-03T02:00:00Z", False)),
        r.Policy(keep_last=1), ts("2026-11-06T00:00:00Z"),
        {sid("2026-11-01T02:00:00Z"): [f"parent of {sid('2026-11-02T02:00:00Z')}"],
         sid("2026-11-02T02:00:00Z"): ["newest restorable", "last 1", f"parent of {sid('2026-11-03T02:00:00Z')}"],
         sid("2026-11-03T02:00:00Z"): ["newest"]},
        id="newest-failed"),
    # Closure: a kept incremental keeps its whole chain back to the full.
    pytest.param(
        chain(("2026-11-01T02:00:00Z", True), ("2026-11-02T02:00:00Z", True), ("2026-11-03T02:00:00Z", True))
        + chain(("2026-11-04T02:00:00Z", True), ("2026-11-05T02:00:00Z", True), chain_id="c2"),
        r.Policy(keep_weekly=2), ts("2026-11-06T00:00:00Z"),
        # 2026-11-01 is a Sunday (W44); the 2nd..5th are W45.
        {sid("2026-11-01T02:00:00Z"): ["weekly 2026-W44"], sid("2026-11-02T02:00:00Z"): [],
         sid("2026-11-03T02:00:00Z"): [],
         sid("2026-11-04T02:00:00Z"): [f"parent of {sid('2026-11-05T02:00:00Z')}"],
         sid("2026-11-05T02:00:00Z"): N + ["weekly 2026-W45"]},
        id="closure-new-chain"),
    pytest.param(
        chain(("2026-11-02T02:00:00Z", True), ("2026-11-03T02:00:00Z", True), ("2026-11-04T02:00:00Z", True),
              ("2026-11-05T02:00:00Z", True)),
        r.Policy(keep_daily=1), ts("2026-11-06T00:00:00Z"),
        {sid("2026-11-02T02:00:00Z"): [f"parent of {sid('2026-11-03T02:00:00Z')}"],
         sid("2026-11-03T02:00:00Z"): [f"parent of {sid('2026-11-04T02:00:00Z')}"],
         sid("2026-11-04T02:00:00Z"): [f"parent of {sid('2026-11-05T02:00:00Z')}"],
         sid("2026-11-05T02:00:00Z"): N + ["daily 2026-11-05"]},
        id="closure-whole-chain"),
    # Ties within one second: the sequence orders them; the later one is the newest.
    pytest.param(
        [pt("2026-11-05T02:00:00Z", 1), pt("2026-11-05T02:00:00Z", 2), pt("2026-11-05T02:00:00Z", 3)],
        r.Policy(keep_last=2, keep_daily=1), ts("2026-11-05T02:00:00Z"),
        {sid("2026-11-05T02:00:00Z", 1): [], sid("2026-11-05T02:00:00Z", 2): ["last 2"],
         sid("2026-11-05T02:00:00Z", 3): N + ["last 1", "daily 2026-11-05"]},
        id="tie-within-one-second"),
    # keep_within: now - 14d exactly is inside (>=); one second earlier is outside.
    pytest.param(
        [pt("2026-11-06T11:59:59Z"), pt("2026-11-06T12:00:00Z"), pt("2026-11-20T12:00:00Z")],
        r.Policy(keep_within=dt.timedelta(days=14)), ts("2026-11-20T12:00:00Z"),
        {sid("2026-11-06T11:59:59Z"): [], sid("2026-11-06T12:00:00Z"): ["within 14d"],
         sid("2026-11-20T12:00:00Z"): N + ["within 14d"]},
        id="within-edges"),
    # keep_within counts only restorable points too.
    pytest.param(
        [pt("2026-11-10T00:00:00Z"), pt("2026-11-15T00:00:00Z", restorable=False), pt("2026-11-19T00:00:00Z")],
        r.Policy(keep_within=dt.timedelta(hours=36 + 24 * 5)), ts("2026-11-20T12:00:00Z"),
        {sid("2026-11-10T00:00:00Z"): [], sid("2026-11-15T00:00:00Z"): [],
         sid("2026-11-19T00:00:00Z"): N + ["within 6d12h"]},
        id="within-skips-failed"),
    # A point dated exactly now is fine (the future starts one second later: see the skew tests).
    pytest.param(
        [pt("2026-11-20T12:00:00Z")], r.Policy(keep_last=3), ts("2026-11-20T12:00:00Z"),
        {sid("2026-11-20T12:00:00Z"): N + ["last 1"]},
        id="point-at-now"),
    # Every rule that keeps a point is listed.
    pytest.param(
        days("2026-11-01", 3, hour="10:00:00"),
        r.Policy(keep_last=1, keep_hourly=1, keep_daily=2, keep_weekly=1, keep_monthly=1, keep_yearly=1,
                 keep_within=dt.timedelta(days=1)),
        ts("2026-11-03T12:00:00Z"),
        {sid("2026-11-01T10:00:00Z"): [],
         sid("2026-11-02T10:00:00Z"): ["daily 2026-11-02"],
         sid("2026-11-03T10:00:00Z"): N + ["last 1", "hourly 2026-11-03T10+00:00", "daily 2026-11-03",
                                           "weekly 2026-W45", "monthly 2026-11", "yearly 2026", "within 1d"]},
        id="every-reason"),
    # Series are selected on their own: keep_last 1 keeps the newest of each.
    pytest.param(
        chain(("2026-11-01T01:00:00Z", True), ("2026-11-08T01:00:00Z", True), series="weekly", chain_id="w1")
        + chain(("2026-11-01T02:00:00Z", True), series="monthly", chain_id="m1")
        + chain(("2026-11-09T01:00:00Z", True), series="weekly", chain_id="w2"),
        r.Policy(keep_last=1), ts("2026-11-10T00:00:00Z"),
        {sid("2026-11-01T01:00:00Z"): [], sid("2026-11-08T01:00:00Z"): [],
         sid("2026-11-01T02:00:00Z"): N + ["last 1"],
         sid("2026-11-09T01:00:00Z"): N + ["last 1"]},
        id="series-independent"),
    # An unreadable set is never removed (its series and parent are unknown).
    pytest.param(
        [pt("2026-11-01T01:00:00Z"), pt("2026-11-02T01:00:00Z", series=None, readable=False, restorable=False),
         pt("2026-11-03T01:00:00Z")],
        r.Policy(keep_last=1), ts("2026-11-10T00:00:00Z"),
        {sid("2026-11-01T01:00:00Z"): [], sid("2026-11-02T01:00:00Z"): ["unreadable (never removed)"],
         sid("2026-11-03T01:00:00Z"): N + ["last 1"]},
        id="unreadable-kept"),
    # A parent in another series (mislabelled data) is still kept: series never break each other.
    pytest.param(
        [r.Point(sid("2026-11-01T01:00:00Z"), ts("2026-11-01T01:00:00Z"), series="monthly", chain_id="x"),
         r.Point(sid("2026-11-02T01:00:00Z"), ts("2026-11-02T01:00:00Z"), series="monthly", chain_id="y"),
         r.Point(sid("2026-11-03T01:00:00Z"), ts("2026-11-03T01:00:00Z"), series="weekly", chain_id="x",
                 parent_id=sid("2026-11-01T01:00:00Z"), type="incremental")],
        r.Policy(keep_last=1), ts("2026-11-10T00:00:00Z"),
        {sid("2026-11-01T01:00:00Z"): [f"parent of {sid('2026-11-03T01:00:00Z')}"],
         sid("2026-11-02T01:00:00Z"): N + ["last 1"],
         sid("2026-11-03T01:00:00Z"): N + ["last 1"]},
        id="closure-across-series"),
    # A policy of zeros plus within keeps by within only.
    pytest.param(
        days("2026-11-01", 4), r.Policy(keep_last=0, keep_daily=0, keep_within=dt.timedelta(days=2)),
        ts("2026-11-05T00:00:00Z"),
        {sid("2026-11-01T23:30:00Z"): [], sid("2026-11-02T23:30:00Z"): [],
         sid("2026-11-03T23:30:00Z"): ["within 2d"], sid("2026-11-04T23:30:00Z"): N + ["within 2d"]},
        id="zeros-and-within"),
]


@pytest.mark.parametrize("points, policy, now, expected", CASES)
def test_select(points, policy, now, expected):
    decisions = r.select(points, policy, now)
    assert [d.set_id for d in decisions] == sorted(expected), "one decision per point, oldest first"
    got = {d.set_id: d.reasons for d in decisions}
    assert got == expected
    for d in decisions:
        assert d.action == ("keep" if expected[d.set_id] else "remove")


@pytest.mark.parametrize("points, policy, now, expected", CASES)
def test_select_ignores_input_order(points, policy, now, expected):
    assert {d.set_id: d.reasons for d in r.select(list(reversed(points)), policy, now)} == expected


def test_kept_set_never_lacks_its_parent():
    """Whatever the policy, no kept point names a removed parent (the closure holds)."""
    points = (chain(*[(f"2026-11-{d:02d}T02:00:00Z", d % 5 != 3) for d in range(1, 29)]))
    for policy in (r.Policy(keep_last=2), r.Policy(keep_daily=3), r.Policy(keep_weekly=2), r.Policy(keep_monthly=1)):
        decisions = {d.set_id: d for d in r.select(points, policy, ts("2026-12-01T00:00:00Z"))}
        for p in points:
            if decisions[p.set_id].action == "keep" and p.parent_id:
                assert decisions[p.parent_id].action == "keep", (policy, p.set_id)


@pytest.mark.parametrize("policy", [
    r.Policy(), r.Policy(keep_last=0), r.Policy(keep_daily=0, keep_weekly=0, keep_monthly=0, keep_yearly=0, keep_hourly=0),
    r.Policy(keep_within=dt.timedelta(0)),
])
def test_empty_policy(policy):
    with pytest.raises(VmBackupError) as info:
        r.select([pt("2026-11-01T00:00:00Z")], policy, ts("2026-11-02T00:00:00Z"))
    assert info.value.error_code == "RETENTION_POLICY_EMPTY"


def test_empty_policy_even_without_points():
    with pytest.raises(VmBackupError) as info:
        r.select([], r.Policy(), ts("2026-11-02T00:00:00Z"))
    assert info.value.error_code == "RETENTION_POLICY_EMPTY"


@pytest.mark.parametrize("future", ["2026-11-20T12:00:01Z", "2027-01-01T00:00:00Z"])
def test_future_dated_set_is_clock_skew(future):
    points = [pt("2026-11-01T00:00:00Z"), pt(future)]
    with pytest.raises(VmBackupError) as info:
        r.select(points, r.Policy(keep_last=1), ts("2026-11-20T12:00:00Z"))
    assert info.value.error_code == "CLOCK_SKEW"
    assert info.value.details["future_sets"] == [sid(future)]


def test_future_unreadable_set_is_clock_skew_too():
    points = [pt("2026-11-01T00:00:00Z"), pt("2026-12-01T00:00:00Z", readable=False, series=None)]
    with pytest.raises(VmBackupError) as info:
        r.select(points, r.Policy(keep_last=1), ts("2026-11-20T12:00:00Z"))
    assert info.value.error_code == "CLOCK_SKEW"


def test_no_points():
    assert r.select([], r.Policy(keep_last=1), ts("2026-11-20T12:00:00Z")) == []


def test_naive_now_refused():
    with pytest.raises(ValueError):
        r.select([pt("2026-11-01T00:00:00Z")], r.Policy(keep_last=1), dt.datetime(2026, 11, 2))


@pytest.mark.parametrize("rule, when, zone, label", [
    ("hourly", "2026-10-25T00:30:00Z", "Europe/Berlin", "2026-10-25T02+02:00"),
    ("hourly", "2026-10-25T01:30:00Z", "Europe/Berlin", "2026-10-25T02+01:00"),
    ("hourly", "2026-11-01T08:30:00Z", "America/Los_Angeles", "2026-11-01T01-07:00"),
    ("hourly", "2026-11-01T09:30:00Z", "America/Los_Angeles", "2026-11-01T01-08:00"),
    ("hourly", "2026-11-01T09:30:00Z", "UTC", "2026-11-01T09+00:00"),
    ("daily", "2026-03-29T22:30:00Z", "Europe/Berlin", "2026-03-30"),
    ("daily", "2026-03-29T21:30:00Z", "Europe/Berlin", "2026-03-29"),
    ("weekly", "2026-12-28T00:00:00Z", "UTC", "2026-W53"),
    ("weekly", "2027-01-03T23:59:59Z", "UTC", "2026-W53"),
    ("weekly", "2027-01-03T23:30:00Z", "Europe/Berlin", "2027-W01"),
    ("weekly", "2026-12-28T05:00:00Z", "America/Los_Angeles", "2026-W52"),
    ("weekly", "2025-12-29T00:00:00Z", "UTC", "2026-W01"),
    ("monthly", "2026-02-28T23:30:00Z", "Europe/Berlin", "2026-03"),
    ("monthly", "2026-03-01T07:00:00Z", "America/Los_Angeles", "2026-02"),
    ("yearly", "2026-12-31T23:00:00Z", "Europe/Berlin", "2027"),
    ("yearly", "2027-01-01T07:59:59Z", "America/Los_Angeles", "2026"),
])
def test_bucket(rule, when, zone, label):
    assert r.bucket(rule, ts(when), r.get_zone(zone)) == label


@pytest.mark.parametrize("text, expected", [
    ("14d", dt.timedelta(days=14)),
    ("36h", dt.timedelta(hours=36)),
    ("2w", dt.timedelta(weeks=2)),
    ("90m", dt.timedelta(minutes=90)),
    ("45s", dt.timedelta(seconds=45)),
    ("1w2d12h", dt.timedelta(days=9, hours=12)),
    (" 1d 6h ", dt.timedelta(days=1, hours=6)),
    ("1.5d", dt.timedelta(hours=36)),
    ("7", dt.timedelta(days=7)),
    (7, dt.timedelta(days=7)),
    (0.5, dt.timedelta(hours=12)),
    ("0d", dt.timedelta(0)),
    ("14D", dt.timedelta(days=14)),
    (dt.timedelta(hours=3), dt.timedelta(hours=3)),
])
def test_parse_duration(text, expected):
    assert r.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "d", "-1d", "1y", "6mo", "3 months", "1d1d", "14x", "1d-2h", True, None, [],
                                  float("nan"), "999999d", -3, "1e5d", "99999999999999w", "9" * 400 + "s"])
def test_parse_duration_refuses(text):
    with pytest.raises(VmBackupError) as info:
        r.parse_duration(text)
    assert info.value.error_code == "INVALID_ARGUMENT"


def test_years_hint():
    with pytest.raises(VmBackupError) as info:
        r.parse_duration("1y")
    assert "365d" in info.value.msg


@pytest.mark.parametrize("delta, text", [
    (dt.timedelta(days=14), "14d"), (dt.timedelta(hours=36), "1d12h"), (dt.timedelta(minutes=90), "1h30m"),
    (dt.timedelta(0), "0s"),
])
def test_format_duration(delta, text):
    assert r.format_duration(delta) == text


@pytest.mark.parametrize("values, expected", [
    ({"keep_daily": 7, "keep_within": "14d"}, r.Policy(keep_daily=7, keep_within=dt.timedelta(days=14))),
    ({"keep_last": "3"}, r.Policy(keep_last=3)),
    ({"keep_weekly": 5.0, "timezone": "Europe/Berlin"}, r.Policy(keep_weekly=5, timezone="Europe/Berlin")),
    ({"keep_monthly": None, "keep_yearly": 3}, r.Policy(keep_yearly=3)),
    ({"keep_last": 2, "keep_within": " "}, r.Policy(keep_last=2)),
])
def test_make_policy(values, expected):
    assert r.make_policy(values) == expected


@pytest.mark.parametrize("values", [
    {"keep_daily": -1}, {"keep_daily": 1.5}, {"keep_daily": True}, {"keep_daily": "x"}, {"keep_dialy": 3},
    {"keep_last": 1, "timezone": "Mars/Olympus"}, {"keep_last": 1, "timezone": "../../etc/passwd"},
    {"keep_within": "1y"}, {"keep_last": 10 ** 7},
])
def test_make_policy_refuses(values):
    with pytest.raises(VmBackupError) as info:
        r.make_policy(values)
    assert info.value.error_code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/Los_Angeles"])
def test_table_under_process_tz(zone, monkeypatch):
    """The table in this process with TZ changed through time.tzset()."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        for case in CASES:
            points, policy, now, expected = case.values
            assert {d.set_id: d.reasons for d in r.select(points, policy, now)} == expected, case.id
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.skipif(os.environ.get(_RERUN) == "1", reason="already a re-run under one TZ")
@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/Los_Angeles"])
def test_table_is_independent_of_runner_tz(zone):
    """The whole table passes unchanged in a fresh interpreter whose TZ is ``zone``."""
    here = pathlib.Path(__file__)
    root = here.parents[4]
    env = dict(os.environ, TZ=zone, **{_RERUN: "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here), "-k", "test_select or test_bucket"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
    # The subprocess did see the zone (a TZ the interpreter ignored would prove nothing).
    probe = subprocess.run([sys.executable, "-c", "import time; print(time.strftime('%Z', time.localtime(1790000000)))"],
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == {"UTC": "UTC", "Europe/Berlin": "CEST", "America/Los_Angeles": "PDT"}[zone]


def test_select_one_series_keeps_the_others_and_their_parents():
    weekly = chain(("2026-11-01T01:00:00Z", True), ("2026-11-08T01:00:00Z", True), series="weekly", chain_id="w1")
    # A monthly set that (mislabelled) builds on the weekly full: selecting weekly must keep that full.
    monthly = [r.Point(sid("2026-11-09T01:00:00Z"), ts("2026-11-09T01:00:00Z"), series="monthly", chain_id="w1",
                       parent_id=weekly[0].set_id, type="incremental")]
    extra = chain(("2026-11-10T01:00:00Z", True), series="weekly", chain_id="w2")
    got = {d.set_id: d.reasons for d in r.select(weekly + monthly + extra, r.Policy(keep_last=1), ts("2026-11-11T00:00:00Z"),
                                                 series="weekly")}
    assert got == {
        weekly[0].set_id: [f"parent of {monthly[0].set_id}"],
        weekly[1].set_id: [],
        monthly[0].set_id: ["series monthly not selected"],
        extra[0].set_id: N + ["last 1"],
    }


def test_worked_example_in_the_docs():
    """docs/retention.md's worked example is what select decides (the table is parsed from the page)."""
    doc = (pathlib.Path(__file__).resolve().parents[4] / "docs" / "retention.md").read_text(encoding="utf-8")
    section = doc.split("## Worked example", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| `")]
    assert len(rows) == 9
    points, expected = [], {}
    parent = None
    for set_id, kind, _local, _week, restorable, decision, reasons in rows:
        set_id = set_id.strip("`")
        parent = None if kind == "full" else parent
        points.append(r.Point(set_id, dt.datetime.strptime(set_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC), "weekly",
                              None, parent, kind, restorable.startswith("yes")))
        parent = set_id
        expected[set_id] = (decision.strip("*"), [] if reasons == "-" else reasons.split(", "))
    policy = r.Policy(keep_last=2, keep_weekly=3, keep_monthly=2, timezone="Europe/Berlin")
    got = {d.set_id: (d.action, d.reasons) for d in r.select(points, policy, ts("2026-12-01T06:00:00Z"))}
    assert got == expected
