# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Unit tests for the pure parts of plugins/module_utils/_verify.py: file checks, parameters, durations, and the
selection of the sets a scheduled verify reads."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import threading

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _verify
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._progress import Progress
from ansible_collections.vmbackup.libvirt.plugins.module_utils._verify import (
    CLOCK_TOLERANCE,
    SIDECAR_FORMAT,
    SIDECAR_VERSION,
    Choice,
    FileJob,
    SetView,
    Verifier,
    VerifyParams,
    asked_levels,
    check_file,
    check_files,
    format_duration,
    parse_duration,
    select,
    validate_params,
)

DATA = bytes(range(256)) * 4099  # not a multiple of the read chunk


def _job(path, size=len(DATA), digest=hashlib.sha256(DATA).hexdigest(), target="vda"):
    return FileJob("u", "20261125T000000Z-001", "disks/vda.qcow2", str(path), size, digest, target)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "vda.qcow2"
    path.write_bytes(DATA)
    return path


def test_a_sound_file_passes_and_counts_its_bytes(good):
    out = check_file(_job(good))
    assert (out.code, out.bytes_read) == (None, len(DATA))


@pytest.mark.parametrize(
    "damage, code",
    [
        (lambda p: p.unlink(), "FILE_MISSING"),
        (lambda p: p.write_bytes(DATA[:-1]), "SIZE_MISMATCH"),
        (lambda p: p.write_bytes(DATA + b"x"), "SIZE_MISMATCH"),
        (lambda p: p.write_bytes(b"\x01" + DATA[1:]), "CHECKSUM_MISMATCH"),
        (lambda p: p.write_bytes(DATA[:-1] + b"\x00"), "CHECKSUM_MISMATCH"),
        (lambda p: (p.unlink(), p.mkdir()), "FILE_MISSING"),
    ],
    ids=["deleted", "truncated", "grown", "first-byte", "last-byte", "directory"],
)
def test_each_kind_of_damage_has_its_code(good, damage, code):
    damage(good)
    out = check_file(_job(good))
    assert out.code == code
    assert "disks/vda.qcow2" in out.msg and "20261125T000000Z-001" in out.msg


def test_a_symlink_in_place_of_a_file_is_not_followed(good, tmp_path):
    link = tmp_path / "link.qcow2"
    os.symlink(good, link)
    assert check_file(_job(link)).code == "FILE_MISSING"


def test_parallel_checks_give_the_same_verdicts_as_serial(good, tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(DATA[:-1] + b"\x00")
    jobs = [_job(good), _job(bad), _job(tmp_path / "missing")]
    serial = sorted((o.job.path, o.code) for o in check_files(jobs, 1))
    parallel = sorted((o.job.path, o.code) for o in check_files(jobs, 3))
    assert serial == parallel
    assert [code for _p, code in serial].count(None) == 1


def _big(path, mib: int, seed: int = 0):
    """A file of ``mib`` MiB plus an odd tail (more than one progress batch), and its job."""
    data = hashlib.sha256(str(seed).encode()).digest() * (mib * 32768) + b"tail" * 777
    path.write_bytes(data)
    return _job(path, size=len(data), digest=hashlib.sha256(data).hexdigest())


def test_progress_gets_every_byte_read_exactly_once(tmp_path, good):
    progress = Progress(None, "verify", 0, interval=1e9)
    jobs = [_big(tmp_path / "a", 9), _big(tmp_path / "b", 17, 1), _job(good)]
    outcomes = check_files(jobs, 2, progress)
    assert [o.code for o in outcomes] == [None, None, None]
    assert progress.done_bytes == sum(j.size for j in jobs) == sum(o.bytes_read for o in outcomes)


def test_then_runs_in_the_calling_thread_on_each_outcome_and_results_keep_the_job_order(tmp_path, good):
    jobs = [_job(good), _big(tmp_path / "a", 1), _big(tmp_path / "b", 3, 1), _job(tmp_path / "missing")]
    seen = []

    def then(out):
        seen.append((out.job.path, threading.get_ident()))
        if out.job.path.endswith("/b"):
            out.code = "IMAGE_INVALID"  # what verify's qemu-img check does to an outcome

    outcomes = check_files(jobs, 2, then=then)
    assert [o.job.size for o in outcomes] == sorted((j.size for j in jobs), reverse=True)  # largest first
    assert sorted(p for p, _t in seen) == sorted(j.path for j in jobs)
    assert {t for _p, t in seen} == {threading.get_ident()}
    assert {o.job.path.rsplit("/", 1)[-1]: o.code for o in outcomes} == {
        "b": "IMAGE_INVALID", "a": None, "vda.qcow2": None, "missing": "FILE_MISSING"}


def test_a_failure_in_then_does_not_wait_for_the_queued_files(tmp_path, monkeypatch):
    jobs = [_big(tmp_path / f"f{i}", 1, i) for i in range(20)]
    started = []
    real = _verify.check_file

    def counting(job, progress=None, stop=None):
        started.append(job.path)
        return real(job, progress, stop)

    monkeypatch.setattr(_verify, "check_file", counting)

    def then(out):
        raise KeyboardInterrupt  # a cancel arrives in the main thread

    with pytest.raises(KeyboardInterrupt):
        check_files(jobs, 1, then=then)
    assert len(started) <= 3, started  # the one done, at most the one running and one about to


def test_a_set_stop_ends_a_read_between_batches(tmp_path):
    job = _big(tmp_path / "a", 20)
    stop = threading.Event()
    stop.set()
    progress = Progress(None, "verify", 0, interval=1e9)
    with pytest.raises(InterruptedError) as info:
        _verify.sha256_stream(job.path, progress, stop)
    assert info.value.errno == errno.EINTR
    assert progress.done_bytes == _verify._PROGRESS_BATCH  # one batch read, then it stopped
    out = check_file(job, None, stop)
    assert out.code == "IO_ERROR"  # never "ok": a stopped read proves nothing


def test_sha256_stream_is_the_sha256_and_size_of_the_file(tmp_path):
    job = _big(tmp_path / "a", 9)
    assert _verify.sha256_stream(job.path) == (job.sha256, job.size)
    os.symlink(job.path, tmp_path / "link")
    with pytest.raises(OSError) as info:
        _verify.sha256_stream(str(tmp_path / "link"))
    assert info.value.errno == errno.ELOOP


@pytest.mark.parametrize(
    "changes, code",
    [
        ({"repository": "relative/path"}, "PATH_ESCAPE"),
        ({"repository": "/srv/../etc"}, "PATH_ESCAPE"),
        ({"name": "a", "uuid": "2b9e5512-bd7e-46a8-afbf-89c9c8e8cdbc"}, "INVALID_ARGUMENT"),
        ({"name": ""}, "INVALID_NAME"),
        ({"uuid": "not-a-uuid"}, "INVALID_NAME"),
        ({"set_id": "20261125-001"}, "INVALID_NAME"),
        ({"set_id": "../20261125T000000Z-001"}, "INVALID_NAME"),
        ({"level": "deep"}, "INVALID_ARGUMENT"),
        ({"workers": 0}, "INVALID_ARGUMENT"),
        ({"lock_timeout": -1}, "INVALID_ARGUMENT"),
    ],
)
def test_bad_parameters_are_refused_with_a_code(changes, code):
    params = VerifyParams(**dict({"repository": "/srv/vmbackup"}, **changes))
    with pytest.raises(VmBackupError) as err:
        validate_params(params)
    assert err.value.error_code == code


def test_good_parameters_are_normalised():
    params = VerifyParams(repository="/srv//vmbackup/", uuid="2B9E5512BD7E46A8AFBF89C9C8E8CDBC", set_id="20261125T073512Z-001")
    assert validate_params(params) == "/srv/vmbackup"
    assert params.uuid == "2b9e5512-bd7e-46a8-afbf-89c9c8e8cdbc"


# ----------------------------------------------------------------------------- schedules: durations
DAY = dt.timedelta(days=1)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("14d", 14 * DAY),
        ("36h", dt.timedelta(hours=36)),
        ("2w", 14 * DAY),
        ("90m", dt.timedelta(minutes=90)),
        ("7", 7 * DAY),
        (7, 7 * DAY),
        (1.5, dt.timedelta(hours=36)),
        ("1.5d", dt.timedelta(hours=36)),
        (" 156h ", dt.timedelta(hours=156)),
        ("1 d", DAY),
    ],
)
def test_durations_in_the_retention_syntax(value, expected):
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "0", 0, 0.0, "0d", "-1d", -3, "1y", "7 days", "d", "1e3d", "1.d", True, False, None, [7], float("nan"),
     float("inf"), "99999999999999w"],
)
def test_bad_durations_are_refused_with_a_code(value):
    with pytest.raises(VmBackupError) as err:
        parse_duration(value, "skip_verified_within")
    assert err.value.error_code == "INVALID_ARGUMENT"
    assert "skip_verified_within" in err.value.msg


@pytest.mark.parametrize(
    "delta, text",
    [
        (dt.timedelta(0), "0s"),
        (dt.timedelta(seconds=12), "12s"),
        (dt.timedelta(minutes=4, seconds=10), "4m 10s"),
        (dt.timedelta(hours=3, minutes=5, seconds=59), "3h 5m"),
        (dt.timedelta(days=8, hours=2, minutes=7), "8d 2h"),
        (dt.timedelta(days=7), "7d"),
        (dt.timedelta(days=6, minutes=1), "6d"),
        (-dt.timedelta(seconds=30), "0s"),
    ],
)
def test_durations_read_as_two_units_at_most(delta, text):
    assert format_duration(delta) == text


def test_the_duration_is_parsed_with_the_parameters():
    params = VerifyParams(repository="/srv/vmbackup", skip_verified_within="36h", series="weekly", restore_points="newest")
    validate_params(params)
    assert params.skip_verified_within == dt.timedelta(hours=36)


@pytest.mark.parametrize(
    "changes, code",
    [
        ({"skip_verified_within": "soon"}, "INVALID_ARGUMENT"),
        ({"skip_verified_within": 0}, "INVALID_ARGUMENT"),
        ({"restore_points": "oldest"}, "INVALID_ARGUMENT"),
        ({"series": "Weekly"}, "INVALID_NAME"),
        ({"series": ""}, "INVALID_NAME"),
    ],
)
def test_bad_schedule_parameters_are_refused(changes, code):
    with pytest.raises(VmBackupError) as err:
        validate_params(VerifyParams(**dict({"repository": "/srv/vmbackup"}, **changes)))
    assert err.value.error_code == code


# ----------------------------------------------------------------------------- schedules: which sets to read
NOW = dt.datetime(2026, 12, 1, 2, 0, 0, tzinfo=dt.timezone.utc)
SHA = "a" * 64
WEEK = 7 * DAY


def _iso(ts: dt.datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def verdict(age=dt.timedelta(hours=1), outcome="ok", level="data", sha=SHA, **changes):
    data = {"format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION, "verified": _iso(NOW - age), "level": level,
            "outcome": outcome, "codes": [] if outcome == "ok" else ["CHECKSUM_MISMATCH"], "manifest_sha256": sha}
    data.update(changes)
    return data


def view(set_id="20261130T020000Z-001", verdict=None, series="default", sha=SHA, link_fault=None):
    return SetView(set_id, series, sha, link_fault, verdict)


# (view, level asked, expected action, words the reason must hold)
STANDING = [
    (view(), "data", "check", "never verified"),
    (view(verdict=verdict()), "data", "skip", "verified ok at level data 1h ago"),
    (view(verdict=verdict(level="restore")), "data", "skip", "at level restore"),
    (view(verdict=verdict(level="restore")), "restore", "skip", "within 7d"),
    (view(verdict=verdict(level="data")), "restore", "check", "at level data, level restore is asked"),
    (view(verdict=verdict(level="deep")), "data", "check", "at level deep"),
    (view(verdict=verdict(outcome="failed")), "data", "check", "failed (CHECKSUM_MISMATCH); a failed set is checked again"),
    (view(verdict=verdict(outcome="failed", age=dt.timedelta(seconds=5))), "data", "check", "failed"),
    (view(verdict={"outcome": "unreadable"}), "data", "check", "verdict file is unreadable"),
    (view(verdict=verdict(format="someone-else")), "data", "check", "not in this collection's format"),
    (view(verdict=verdict(format_version=2)), "data", "check", "not in this collection's format"),
    (view(verdict=verdict(sha="b" * 64)), "data", "check", "manifest changed since its last verdict"),
    (view(verdict=verdict(sha=None)), "data", "check", "manifest changed"),
    (view(verdict=verdict(), sha=None), "data", "check", "manifest changed"),
    (view(verdict=verdict(age=WEEK - dt.timedelta(seconds=1))), "data", "skip", "6d 23h ago"),
    (view(verdict=verdict(age=WEEK)), "data", "check", "is 7d old, not within 7d"),
    (view(verdict=verdict(age=30 * DAY, level="restore")), "restore", "check", "is 30d old"),
    (view(verdict=verdict(age=-CLOCK_TOLERANCE)), "data", "skip", "0s ago"),
    (view(verdict=verdict(age=-CLOCK_TOLERANCE - dt.timedelta(seconds=1))), "data", "check", "dated in the future"),
    (view(verdict=verdict(verified="yesterday")), "data", "check", "no valid time"),
    (view(verdict=verdict(verified=None)), "data", "check", "no valid time"),
    (view(verdict=verdict(), link_fault="parent set X is missing"), "data", "check", "link to its parent is broken"),
    (view(verdict=verdict(), series=None), "data", "check", "manifest is unreadable"),
]


@pytest.mark.parametrize("set_view, level, action, words", STANDING)
def test_a_set_is_skipped_only_while_its_verdict_is_current(set_view, level, action, words):
    [choice] = select([set_view], level, "all", WEEK, NOW)
    assert (choice.action, choice.level) == (action, level)
    assert words in choice.reason, choice.reason
    assert choice.verified == (set_view.verdict["verified"] if action == "skip" else None)


def test_without_skip_verified_within_every_set_is_checked():
    views = [view("20261130T020000Z-001", verdict()), view("20261130T020000Z-002", verdict(level="restore"))]
    choices = select(views, "restore", "all", None, NOW)
    assert [(c.action, c.level) for c in choices] == [("check", "restore"), ("check", "restore")]
    assert all("skip_verified_within is not set" in c.reason for c in choices)


A, B, C = "20261124T020000Z-001", "20261125T020000Z-001", "20261126T020000Z-001"
M1, M2 = "20261101T030000Z-001", "20261201T030000Z-001"
BROKEN = "20261127T020000Z-001"


@pytest.mark.parametrize(
    "views, level, points, expected",
    [
        # level data asks data of every set, whatever restore_points says
        ([view(A), view(B)], "data", "newest", {A: "data", B: "data"}),
        ([view(A), view(B)], "restore", "all", {A: "restore", B: "restore"}),
        # newest: the newest readable point of each series
        ([view(A), view(B), view(C)], "restore", "newest", {A: "data", B: "data", C: "restore"}),
        ([view(A, series="weekly"), view(M1, series="monthly"), view(B, series="weekly"), view(M2, series="monthly")],
         "restore", "newest", {M1: "data", A: "data", B: "restore", M2: "restore"}),
        # an unreadable newest set cannot be read through a chain; the newest readable one is
        ([view(A), view(B), view(BROKEN, series=None)], "restore", "newest", {A: "data", B: "restore", BROKEN: "data"}),
        ([view(A)], "restore", "newest", {A: "restore"}),
        ([], "restore", "newest", {}),
    ],
    ids=["data", "all", "newest", "newest-per-series", "unreadable-newest", "one", "none"],
)
def test_restore_points_newest_asks_restore_of_the_newest_point_of_each_series(views, level, points, expected):
    assert asked_levels(views, level, points) == expected


def test_a_nightly_run_after_one_new_export_checks_only_the_new_point():
    """The previous newest point had a restore verdict and is now asked data only: it stays skipped."""
    views = [view(A, verdict(age=2 * DAY)), view(B, verdict(age=DAY, level="restore")), view(C)]
    choices = select(views, "restore", "newest", WEEK, NOW)
    assert [(c.set_id, c.action, c.level) for c in choices] == [(A, "skip", "data"), (B, "skip", "data"), (C, "check", "restore")]


def test_the_newest_point_with_a_data_verdict_is_read_again_at_restore():
    views = [view(A, verdict()), view(B, verdict())]
    choices = select(views, "restore", "newest", WEEK, NOW)
    assert [(c.action, c.level) for c in choices] == [("skip", "data"), ("check", "restore")]


def test_old_verdicts_fall_due_one_by_one():
    views = [view(A, verdict(age=8 * DAY)), view(B, verdict(age=6 * DAY)), view(C, verdict(outcome="failed"))]
    choices = select(views, "data", "all", WEEK, NOW)
    assert [c.action for c in choices] == ["check", "skip", "check"]


def test_withdrawing_turns_only_skipped_sets_into_checks():
    choices = {"u": {A: Choice(A, "data", "skip", "verified ok", verified="t"), B: Choice(B, "data", "check", "never verified"),
                     C: Choice(C, "restore", "skip", "verified ok", verified="t")}}
    withdrawn = Verifier._withdraw(choices, [("u", [A, B, "20000101T000000Z-001"], "why"), ("other-vm", [A], "why")])
    assert withdrawn == {"u": [A]}
    assert [(c.action, c.reason, c.verified) for c in choices["u"].values()] == [
        ("check", "why", None), ("check", "never verified", None), ("skip", "verified ok", "t")]
    assert Verifier._withdraw(choices, [("u", [A], "again")]) == {}  # already checked: nothing new, reason kept
    assert choices["u"][A].reason == "why"
