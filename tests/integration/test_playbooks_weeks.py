"""Weeks and months of the weekly and monthly playbooks on real VMs, under a shifted clock.

`faketime` shifts the clock of ansible-playbook and of everything it starts (the modules,
qemu-img); libvirtd and QEMU keep the real one. After each run the repository is read from disk
(manifests, set directories) and compared with the retention computed here, independently of the
collection: one set per period, a full every N sets, GFS buckets plus the chain closure, one live
checkpoint per series per VM, and the weekly and monthly series never touching each other."""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import uuid

from harness import PREFIX, DiskSpec, chain_json, images_equal, tree_state
from test_backup_role import Play

# faketime comes with scripts/setup.sh: without it these tests fail rather than pass unseen.

# Policies of this test (the playbooks' defaults are 4/5 and 3/12/3; smaller values show a whole
# cycle of fulls and prunes in six weeks and four months, and exercise the override variables).
WEEKLY = {"vmbackup_weekly_full_every_sets": 2, "vmbackup_weekly_keep_weekly": 3}
MONTHLY = {"vmbackup_monthly_full_every_sets": 2, "vmbackup_monthly_keep_monthly": 2, "vmbackup_monthly_keep_yearly": 1}

UTC = dt.timezone.utc
# Sundays 23:00 UTC from the ISO week 2026-W53 (2027-01-03), and the 1st of each month at 02:00.
# A retry in the same period (an AWX relaunch) follows the last weekly and the last monthly run.
SCHEDULE = sorted(
    [(dt.datetime(2027, 1, 3, 23, 0, tzinfo=UTC) + dt.timedelta(weeks=i), "weekly", False) for i in range(6)]
    + [(dt.datetime(2027, 2, 7, 23, 40, tzinfo=UTC), "weekly", True)]
    + [(dt.datetime(2027, m, 1, 2, 0, tzinfo=UTC), "monthly", False) for m in (1, 2, 3, 4)]
    + [(dt.datetime(2027, 4, 20, 12, 0, tzinfo=UTC), "monthly", True)]
)


def period_of(series: str, when: dt.datetime) -> str:
    if series == "weekly":
        year, week, _day = when.isocalendar()
        return f"{year}-W{week:02d}"
    return f"{when.year}-{when.month:02d}"


def expected_kept(points: list[dict], series: str) -> set[str]:
    """GFS over the points of one VM and series (at most one point per period here), then the closure."""
    newest_first = sorted(points, key=lambda p: p["set_id"], reverse=True)
    keep: set[str] = {newest_first[0]["set_id"]} if newest_first else set()  # the newest always stays
    rules = ([("week", 3)] if series == "weekly" else [("month", 2), ("year", 1)])
    for unit, count in rules:
        seen: list[str] = []
        for p in newest_first:
            when = p["when"]
            bucket = period_of("weekly", when) if unit == "week" else (f"{when.year}-{when.month:02d}" if unit == "month" else str(when.year))
            if bucket not in seen:
                seen.append(bucket)
                if len(seen) <= count:
                    keep.add(p["set_id"])
    by_id = {p["set_id"]: p for p in points}
    for set_id in list(keep):
        parent = by_id[set_id]["parent"]
        while parent is not None:
            keep.add(parent)
            parent = by_id[parent]["parent"]
    return keep


def read_sets(repo: pathlib.Path, vm_uuid: str) -> dict[str, dict]:
    root = repo / "vms" / vm_uuid / "sets"
    out = {}
    for d in sorted(root.iterdir()) if root.exists() else []:
        if d.is_dir() and (d / "manifest.json").exists():
            out[d.name] = json.loads((d / "manifest.json").read_text())
    return out


def series_state(repo: pathlib.Path, vm_uuid: str, series: str) -> dict:
    """The files of every set of one series (and their sidecars), byte for byte."""
    root = repo / "vms" / vm_uuid / "sets"
    ids = [i for i, m in read_sets(repo, vm_uuid).items() if m["series"] == series]
    return {k: v for k, v in tree_state(root).items() if any(k == i or k.startswith(i + "/") or k.startswith(i + ".") for i in ids)}


def checkpoint_name(m: dict) -> str | None:
    cp = m.get("checkpoint")
    return cp.get("name") if isinstance(cp, dict) else cp


def test_weeks_and_months_of_playbooks(ansible, vms, repo, scratch, tmp_path):
    token = uuid.uuid4().hex[:6]
    v1 = vms.create([DiskSpec(size="16M", fill=[(0x11, "0", "1M")])], name=f"{PREFIX}wk-{token}-a")
    v2 = vms.create([DiskSpec(size="16M", fill=[(0x22, "0", "1M")])], name=f"{PREFIX}wk-{token}-b")
    base = {"vmbackup_backup_repository": str(repo), "vmbackup_backup_include": [f"{PREFIX}wk-{token}-*"],
            "vmbackup_backup_report_dir": None, "vmbackup_backup_prometheus_dir": None}
    plays = {"weekly": Play(ansible, tmp_path, "vmbackup.libvirt.backup_weekly"),
             "monthly": Play(ansible, tmp_path, "vmbackup.libvirt.backup_monthly")}
    extra = {"weekly": WEEKLY, "monthly": MONTHLY}
    created: dict[str, dict[str, list[dict]]] = {vm.uuid: {"weekly": [], "monthly": []} for vm in (v1, v2)}
    references: dict[str, pathlib.Path] = {}

    for n, (when, series, rerun) in enumerate(SCHEDULE):
        other = "monthly" if series == "weekly" else "weekly"
        # The guest writes between runs, so every incremental holds data (and a retry must not
        # take a set because the disk changed: the period decides).
        v1.write("vda", 0x30 + n, f"{1 + n}M", "512K")
        ref = v1.snapshot_disk("vda", scratch / f"ref-{n}.qcow2")
        untouched = {vm.uuid: series_state(repo, vm.uuid, other) for vm in (v1, v2)}
        before, cps = tree_state(repo), (v1.checkpoints(), v2.checkpoints())
        out = plays[series](dict(base, **extra[series]), faketime=when.strftime("%Y-%m-%d %H:%M:%S"))
        assert out.rc == 0, out.text
        if rerun:
            assert out.recap["changed"] == 0, (out.changed_tasks(), out.text)
            assert tree_state(repo) == before and (v1.checkpoints(), v2.checkpoints()) == cps
            continue

        for vm in (v1, v2):
            found = read_sets(repo, vm.uuid)
            new = [m for i, m in found.items() if m["series"] == series and i not in {p["set_id"] for p in created[vm.uuid][series]}]
            assert len(new) == 1, (when, series, sorted(found))
            m = new[0]
            # The set id and the period follow the shifted clock.
            assert m["set_id"].startswith(when.strftime("%Y%m%dT%H%M")), (m["set_id"], when)
            assert m["period"] == period_of(series, when)
            history = created[vm.uuid][series]
            # A full every 2 sets of the series; an incremental's parent is the series' previous set.
            if len(history) % 2 == 0:
                assert m["type"] == "full" and m["parent"] is None, m
            else:
                assert m["type"] == "incremental" and m["parent"]["set_id"] == history[-1]["set_id"], m
                assert m["chain_id"] == history[-1]["chain_id"]
            history.append({"set_id": m["set_id"], "when": when, "chain_id": m["chain_id"],
                            "parent": m["parent"]["set_id"] if m["parent"] else None})
            if vm is v1:
                references[m["set_id"]] = ref

            # Retention, computed here: what is left of each series is exactly the policy's closure.
            for s in ("weekly", "monthly"):
                left = {i for i, mm in found.items() if mm["series"] == s}
                assert left == expected_kept(created[vm.uuid][s], s), (when, s, sorted(left))
            # The other series was not touched, byte for byte.
            assert series_state(repo, vm.uuid, other) == untouched[vm.uuid], (when, series)
            # One live checkpoint per series: the newest set's of each.
            newest = {s: max((i for i, mm in found.items() if mm["series"] == s), default=None) for s in ("weekly", "monthly")}
            expected_cps = sorted(checkpoint_name(found[i]) for i in newest.values() if i is not None)
            assert vm.checkpoints() == expected_cps, (when, vm.checkpoints(), expected_cps)

    # The newest point of each series of v1 reads back, through its chain, as the disk was then.
    found = read_sets(repo, v1.uuid)
    sets_dir = repo / "vms" / v1.uuid / "sets"
    for s in ("weekly", "monthly"):
        newest = max(i for i, m in found.items() if m["series"] == s)
        chain, cursor = [], newest
        while cursor is not None:
            chain.insert(0, sets_dir / cursor / "disks" / "vda.qcow2")
            parent = found[cursor]["parent"]
            cursor = parent["set_id"] if parent else None
        same, detail = images_equal(str(references[newest]), chain_json(chain))
        assert same, (s, newest, detail)

    # --check in a later week plans a set and changes nothing.
    before, cps = tree_state(repo), (v1.checkpoints(), v2.checkpoints())
    out = plays["weekly"](dict(base, **WEEKLY), check=True, faketime="2027-04-25 23:00:00")
    assert out.rc == 0, out.text
    assert f"{v1.name}: planned, full" in out.stdout, out.text  # the weekly chain holds 2 sets already
    assert tree_state(repo) == before and (v1.checkpoints(), v2.checkpoints()) == cps

    # The verify playbook: the newest point of each series read through its chain (level restore),
    # the other sets at level data; a second run the same day reads nothing again.
    verify = Play(ansible, tmp_path, "vmbackup.libvirt.verify")
    out = verify({"vmbackup_backup_repository": str(repo), "vmbackup_verify_vms": [v1.name]}, faketime="2027-04-26 06:00:00")
    assert out.rc == 0, out.text
    found = read_sets(repo, v1.uuid)
    verdicts = {i: json.loads((sets_dir / f"{i}.verify.json").read_text()) for i in found}
    assert all(v["outcome"] == "ok" for v in verdicts.values()), verdicts
    for s in ("weekly", "monthly"):
        newest = max(i for i, m in found.items() if m["series"] == s)
        assert verdicts[newest]["level"] == "restore" and verdicts[newest]["verified"].startswith("2027-04-26"), verdicts[newest]
    before = tree_state(repo)
    out = verify({"vmbackup_backup_repository": str(repo), "vmbackup_verify_vms": [v1.name]}, faketime="2027-04-26 07:00:00")
    assert out.rc == 0, out.text
    assert tree_state(repo) == before
