"""vmbackup.libvirt.prune against a real repository written by export from a running VM.

Sets at different dates come from export itself run under ``faketime`` (libfaketime through
LD_PRELOAD on the ansible process tree: the module's clock is shifted, libvirtd and QEMU keep
the real one); the set ids are checked to follow the shifted clock. What prune decided is
checked against the policy worked out in the test from the dates, what it removed against the
directory listing, and every point left is read through its chain by qemu-img and by verify.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import datetime as dt
import os
import pathlib
import select
import signal
import subprocess
import time

import pytest

from harness import (
    AnsibleRunner,
    Domains,
    chain_json,
    expect_error,
    expect_ok,
    images_equal,
    job_running,
    kill_tree,
    listing,
    make_dir,
    module_pids,
    parse_result,
    tree_state,
    wait_for,
)

UTC = dt.timezone.utc


@dataclasses.dataclass
class ShiftedRunner(AnsibleRunner):
    """The `ansible` CLI under faketime: the module process sees ``when`` as its start time."""

    when: str = ""

    def argv(self, module, args, check=False):
        return ["faketime", self.when] + super().argv(module, args, check)


def at(ansible: AnsibleRunner, when: dt.datetime) -> ShiftedRunner:
    # Monotonic time is shifted too: with FAKETIME_DONT_FAKE_MONOTONIC, Python's time.sleep fails (EINVAL).
    env = dict(ansible.env, TZ="UTC")
    return ShiftedRunner(env=env, ansible=ansible.ansible, when=f"{when:%Y-%m-%d %H:%M:%S}")


@dataclasses.dataclass
class Taken:
    set_id: str
    when: dt.datetime
    ref: pathlib.Path  # the disk as it was when the set was taken
    result: dict


def take(ansible, vm, repo, scratch, when: dt.datetime, mode: str, pattern: int, **extra) -> Taken:
    """Dirty 4 MiB of the disk, keep a reference copy, export under the shifted clock."""
    vm.write("vda", pattern, f"{(pattern % 12) * 4}M", "4M")
    ref = vm.snapshot_disk("vda", scratch / f"ref-{pattern:02x}.qcow2")
    args = dict(repository=str(repo), name=vm.name, mode=mode, **extra)
    result = expect_ok(at(ansible, when)(("export"), args))
    # The set id follows the module's (shifted) clock, not libvirtd's.
    assert result["set_id"].startswith(f"{when:%Y%m%dT%H%M}"), result["set_id"]
    return Taken(result["set_id"], when, ref, result)


def sets_on_disk(repo: pathlib.Path, vm) -> list[str]:
    return [n for n in listing(repo / "vms" / vm.uuid / "sets") if not n.endswith(".json")]


def set_file(repo: pathlib.Path, vm, set_id: str) -> pathlib.Path:
    return repo / "vms" / vm.uuid / "sets" / set_id / "disks" / "vda.qcow2"


def assert_point_reads(repo, vm, chain: list[Taken]) -> None:
    """The point (last of ``chain``) read through its files, base first, equals its reference."""
    same, out = images_equal(chain_json([set_file(repo, vm, t.set_id) for t in chain]), str(chain[-1].ref))
    assert same, out


def prune_args(repo, vm, **policy) -> dict:
    return dict(repository=str(repo), name=vm.name, **policy)


def decisions(result: dict) -> dict[str, tuple[str, list[str]]]:
    return {s["set_id"]: (s["action"], s["reasons"]) for s in result["sets"]}


def monday(week: int) -> dt.datetime:
    """02:00 UTC on the Monday of ISO week ``week`` of 2026."""
    return dt.datetime.fromisocalendar(2026, week, 1).replace(hour=2, tzinfo=UTC)


# ----------------------------------------------------------------------------- the policy over real sets
def test_policy_over_real_sets(ansible, vms, repo, scratch, conn, repo_root):
    vm = vms.create()
    taken: list[Taken] = []
    # Three weeks, a chain each: W45 full + 2 incrementals, W46 full + 1, W47 full + 1.
    plan = [(45, 0, "full"), (45, 1, "incremental"), (45, 2, "incremental"),
            (46, 0, "full"), (46, 1, "incremental"), (47, 0, "full"), (47, 1, "incremental")]
    for i, (week, day, mode) in enumerate(plan):
        taken.append(take(ansible, vm, repo, scratch, monday(week) + dt.timedelta(days=day), mode, 0x10 + i))
    ids = [t.set_id for t in taken]
    assert sets_on_disk(repo, vm) == ids

    # keep_weekly 2 (worked out here): W47's newest point (i6) and W46's (i4); the closure adds
    # their fulls (i5, i3); W45's chain goes. i6 is also the newest (and newest restorable).
    expected = {
        ids[0]: ("remove", []), ids[1]: ("remove", []), ids[2]: ("remove", []),
        ids[3]: ("keep", [f"parent of {ids[4]}"]),
        ids[4]: ("keep", ["weekly 2026-W46"]),
        ids[5]: ("keep", [f"parent of {ids[6]}"]),
        ids[6]: ("keep", ["newest", "newest restorable", "weekly 2026-W47"]),
    }
    args = prune_args(repo, vm, keep_weekly=2)
    before = tree_state(repo)
    argv = ansible.argv("prune", args, check=True) + ["--diff"]
    proc = subprocess.run(argv, env=ansible.env, capture_output=True, text=True, timeout=300, check=False)
    checked = parse_result(proc.stdout, proc.stderr)
    assert checked["changed"] is True and not checked["failed"]
    assert tree_state(repo) == before, "check mode changed the repository"
    assert decisions(checked) == expected
    # --diff shows the set list before and after: a "-" line for each set that goes, nothing added.
    minus = [line for line in proc.stdout.splitlines() if line.startswith("-") and not line.startswith("---")]
    plus = [line for line in proc.stdout.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert [next(i for i in ids if i in line) for line in minus] == ids[:3] and plus == [], proc.stdout

    removed_bytes = sum(os.path.getsize(p) for sid in ids[:3] for p in (repo / "vms" / vm.uuid / "sets" / sid).rglob("*")
                        if p.is_file())
    real = expect_ok(ansible("prune", args))
    for key in ("sets", "removed", "kept", "removed_bytes", "cleaned_up"):
        assert real[key] == checked[key], key
    assert real["removed"] == ids[:3] and real["removed_bytes"] == removed_bytes
    assert sets_on_disk(repo, vm) == ids[3:]
    assert not (repo / "vms" / vm.uuid / ".removing").exists()

    again = ansible("prune", args)
    assert again["changed"] is False and again["removed"] == [] and not again["failed"]

    # Every chain left verifies (whole chains read, level restore), and each kept point reads back.
    verified = ansible("verify", dict(repository=str(repo), name=vm.name, level="restore"))
    assert verified["outcome"] == "ok" and verified["sets_checked"] == 4, verified
    assert_point_reads(repo, vm, taken[3:5])
    assert_point_reads(repo, vm, taken[5:7])

    # A restore of the kept W46 point compares equal with the disk as it was then.
    domains = Domains(conn, "pr")
    try:
        disk_dir = make_dir(repo_root / "restored")
        name = domains.new_name()
        restored = expect_ok(ansible("restore", dict(repository=str(repo), uuid=vm.uuid, set_id=ids[4], restore_as=name,
                                                     disk_dir=str(disk_dir))))
        path = next(d["path"] for d in restored["disks"] if d["target"] == "vda")
        same, out = images_equal(path, str(taken[4].ref))
        assert same, out
    finally:
        domains.cleanup()

    # And the next export still has its parent: an incremental on the kept newest set.
    nxt = take(ansible, vm, repo, scratch, monday(47) + dt.timedelta(days=2), "incremental", 0x30)
    assert nxt.result["type"] == "incremental" and nxt.result["parent"] == ids[6]
    assert_point_reads(repo, vm, taken[5:7] + [nxt])


# ----------------------------------------------------------------------------- a running export holds the lock
def test_prune_while_an_export_holds_the_lock(ansible, vms, repo, scratch):
    vm = vms.create()
    first = take(ansible, vm, repo, scratch, monday(45), "full", 0x41)
    second = take(ansible, vm, repo, scratch, monday(46), "full", 0x42)
    lock = repo / "vms" / vm.uuid / "lock"
    vm.write("vda", 0x43, "8M", "4M")
    export = ansible.popen_result("export", dict(repository=str(repo), name=vm.name, mode="full"))
    try:
        # The export holds the lock once its holder record is in the lock file; stop it there.
        wait_for(lambda: b"export" in lock.read_bytes(), 120, what="export to take the lock")
        pids = wait_for(lambda: module_pids(export.proc, "export"), 30, what="the export module process")
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        # QEMU may still write the backup job's file; the tree is compared once it is done.
        wait_for(lambda: not job_running(vm.dom), 120, what="the backup job to end")
        before = tree_state(repo)
        for check in (True, False):
            result = ansible("prune", prune_args(repo, vm, keep_last=1, lock_timeout=0), check=check)
            expect_error(result, "VM_LOCKED")
            assert result["lock_holder"]["purpose"].startswith("export")
            assert tree_state(repo) == before, f"prune (check={check}) changed the repository while locked"
        assert first.set_id in sets_on_disk(repo, vm)
    finally:
        for pid in module_pids(export.proc, "export"):
            os.kill(pid, signal.SIGCONT)
    done = export.result(timeout=300)
    assert not done["failed"], done
    # Once the export is done, the same prune runs.
    result = expect_ok(ansible("prune", prune_args(repo, vm, keep_last=1)))
    assert result["removed"] == [first.set_id, second.set_id]
    assert sets_on_disk(repo, vm) == [done["set_id"]]


# ----------------------------------------------------------------------------- killed mid-removal
_IN_MOVED_FROM = 0x40


class Inotify:
    """A minimal inotify watch (ctypes): tells when a name is renamed out of a directory."""

    def __init__(self, path: pathlib.Path) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        wd = self.libc.inotify_add_watch(self.fd, str(path).encode(), _IN_MOVED_FROM)
        assert wd >= 0, os.strerror(ctypes.get_errno())

    def wait(self, timeout: float) -> bool:
        ready, _w, _x = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            os.read(self.fd, 65536)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_prune_stopped_mid_removal_leaves_sound_chains(ansible, vms, repo, scratch, how):
    """Killed (SIGKILL) or cancelled (SIGTERM, an AWX cancel) right after a set was renamed out of sets/."""
    vm = vms.create()
    taken = []
    # Four chains of two sets; keep_last 1 removes the first three chains (six sets).
    for i, week in enumerate((44, 45, 46, 47)):
        taken.append(take(ansible, vm, repo, scratch, monday(week), "full", 0x50 + 2 * i))
        taken.append(take(ansible, vm, repo, scratch, monday(week) + dt.timedelta(days=1), "incremental", 0x51 + 2 * i))
    ids = [t.set_id for t in taken]
    vm_dir = repo / "vms" / vm.uuid
    ansible("verify", dict(repository=str(repo), name=vm.name))  # verdicts, which go with their sets
    args = prune_args(repo, vm, keep_last=1)

    caught = None
    cancelled = None
    watch = Inotify(vm_dir / "sets")
    pending = ansible.popen_result("prune", args)
    proc = pending.proc
    try:
        pid = wait_for(lambda: module_pids(proc, "prune"), 60, interval=0.005, what="the prune module process")[0]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if not watch.wait(0.5):
                continue
            os.kill(pid, signal.SIGSTOP)  # right after a rename out of sets/
            inside = [n for n in listing(vm_dir / ".removing") if not n.endswith(".json")]
            if inside:
                caught = (inside, sets_on_disk(repo, vm))
                break
            os.kill(pid, signal.SIGCONT)  # that set was gone already: wait for the next one
        if caught is not None and how == "SIGTERM":
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)
            cancelled = pending.result(timeout=120)
        else:
            kill_tree(proc)
    finally:
        watch.close()
        if proc.poll() is None:
            kill_tree(proc)
    assert caught is not None, "the prune was never caught between renaming a set out and removing it"
    inside, left = caught
    assert len(inside) == 1 and inside[0] in ids and inside[0] not in left
    if how == "SIGTERM":
        expect_error(cancelled, "CANCELLED")
        # The cancel lands after the rename: that set may be gone by then, the rest of the run is not done.
        assert sets_on_disk(repo, vm) == left
    # Descendants went first (newest first): what is left in sets/ is a run of the oldest sets
    # plus the kept chain, never a child without its parent.
    assert left == ids[:len(left) - 2] + ids[-2:], left
    for child, parent in zip(ids[1:], ids[:-1]):
        if child in left and taken[ids.index(child)].result["type"] == "incremental":
            assert parent in left, f"{child} was left without its parent {parent}"

    # Every chain left in sets/ verifies, and the kept point reads back.
    verified = ansible("verify", dict(repository=str(repo), name=vm.name))
    assert verified["outcome"] == "ok" and not verified["failed"], verified
    assert verified["sets_checked"] == len(left)
    assert_point_reads(repo, vm, taken[-2:])

    # The next prune finishes the removal and removes the rest.
    unfinished = (vm_dir / ".removing" / inside[0]).exists()
    assert unfinished or how == "SIGTERM", "a killed prune leaves the set it was removing in .removing/"
    result = expect_ok(ansible("prune", args))
    if unfinished:
        assert any(f".removing/{inside[0]}" in c for c in result["cleaned_up"]), result["cleaned_up"]
    assert sorted(result["removed"]) == sorted(set(left) - set(ids[-2:]))
    assert sets_on_disk(repo, vm) == ids[-2:]
    assert not (vm_dir / ".removing").exists()
    assert [n for n in listing(vm_dir / "sets") if n.endswith(".verify.json")] == [f"{i}.verify.json" for i in ids[-2:]]
    assert ansible("prune", args)["changed"] is False


# ----------------------------------------------------------------------------- staging of dead runs
def test_staging_of_a_killed_live_export_is_left_for_export(ansible, vms, repo, scratch):
    """A live backup killed mid-run leaves staging that names its checkpoint: prune leaves it (only
    export can delete that checkpoint and abort the job), and the next export cleans it up."""
    vm = vms.create()
    first = take(ansible, vm, repo, scratch, monday(46), "full", 0x81)
    vm.write("vda", 0x82, "16M", "8M")
    staging = repo / "vms" / vm.uuid / ".incomplete"
    export = ansible.popen_result("export", dict(repository=str(repo), name=vm.name, mode="incremental"))
    try:
        wait_for(lambda: any((staging / n / "run.json").exists() for n in listing(staging)), 120, interval=0.005,
                 what="the export's run.json")
    finally:
        kill_tree(export.proc)
    wait_for(lambda: not job_running(vm.dom), 120, what="the orphaned backup job to end")
    dead = listing(staging)
    assert len(dead) == 1
    before = tree_state(staging)
    result = ansible("prune", prune_args(repo, vm, keep_last=1))
    assert not result["failed"] and result["changed"] is False, result
    assert [s["path"] for s in result["staging_left"]] == [str(staging / dead[0])]
    assert "checkpoint" in result["staging_left"][0]["reason"]
    assert tree_state(staging) == before
    nxt = expect_ok(ansible("export", dict(repository=str(repo), name=vm.name, mode="auto")))
    assert any(dead[0] in c for c in nxt["cleaned_up"]), nxt["cleaned_up"]
    assert listing(staging) == []
    assert sets_on_disk(repo, vm) == sorted([first.set_id, nxt["set_id"]])


# ----------------------------------------------------------------------------- series
def test_weekly_and_monthly_series_never_touch_each_other(ansible, vms, repo, scratch):
    vm = vms.create()
    weekly, monthly = [], []
    monthly.append(take(ansible, vm, repo, scratch, monday(44) + dt.timedelta(hours=1), "full", 0x61, series="monthly"))
    for i, week in enumerate((45, 46, 47)):
        weekly.append(take(ansible, vm, repo, scratch, monday(week), "full", 0x62 + 2 * i, series="weekly"))
        weekly.append(take(ansible, vm, repo, scratch, monday(week) + dt.timedelta(days=1), "incremental", 0x63 + 2 * i,
                           series="weekly"))
    monthly.append(take(ansible, vm, repo, scratch, monday(47) + dt.timedelta(days=2), "incremental", 0x70, series="monthly"))
    sets_dir = repo / "vms" / vm.uuid / "sets"
    monthly_state = {t.set_id: tree_state(sets_dir / t.set_id) for t in monthly}
    checkpoints = vm.checkpoints()

    # The weekly prune keeps one week; the monthly chain (whose incremental is newer than most
    # weekly sets, and whose full is older than all) is not touched.
    result = expect_ok(ansible("prune", prune_args(repo, vm, series="weekly", keep_weekly=1)))
    assert result["removed"] == [t.set_id for t in weekly[:4]]
    got = decisions(result)
    assert got[monthly[0].set_id] == ("keep", ["series monthly not selected", f"parent of {monthly[1].set_id}"])
    assert {t.set_id: tree_state(sets_dir / t.set_id) for t in monthly} == monthly_state
    assert vm.checkpoints() == checkpoints, "prune touched libvirt checkpoints"

    # The monthly prune with a weekly-sized policy keeps its own newest chain and no weekly set goes.
    result = ansible("prune", prune_args(repo, vm, series="monthly", keep_last=1))
    assert result["removed"] == [] and result["changed"] is False
    assert sets_on_disk(repo, vm) == sorted([t.set_id for t in monthly + weekly[4:]])

    # Both series go on with incrementals on their own parents.
    for series, parent in (("weekly", weekly[-1]), ("monthly", monthly[-1])):
        nxt = take(ansible, vm, repo, scratch, monday(48), "incremental", 0x71 if series == "weekly" else 0x72, series=series)
        assert nxt.result["type"] == "incremental" and nxt.result["parent"] == parent.set_id, nxt.result
    verified = ansible("verify", dict(repository=str(repo), name=vm.name, level="restore"))
    assert verified["outcome"] == "ok", verified
