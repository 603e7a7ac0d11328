"""vmbackup.libvirt.verify for schedules: skip_verified_within, restore_points and series, on a
real repository written by real exports of real VMs.

One repository is built per module (a running VM with two qcow2 disks: full, i1, i2; a shut-off
VM with two copy sets, the second taken in series `monthly`) and never touched; each test works on its own `cp -a` copy. What a run
must read is computed here from the files on disk and the manifests' JSON; that nothing was
rewritten is checked on the sidecar files themselves (bytes, inode, mtime).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import time
import typing as t
import uuid

import pytest

from harness import MIB, DiskSpec, Vm, VmFactory, parse_result, run, tree_state

REPO_BASE = pathlib.Path("/var/tmp/vmbackup-tests")
SIDECAR_SUFFIX = ".verify.json"
MAIN = ("full", "i1", "i2")
OTHER = ("c1", "c2")
WEEK_ARGS = {"skip_verified_within": "7d"}
NIGHTLY = {"level": "restore", "restore_points": "newest", **WEEK_ARGS}


# ----------------------------------------------------------------------------- the repository
@dataclasses.dataclass
class Built:
    repo: pathlib.Path
    vm: Vm
    other: Vm
    ids: dict[str, str]  # label -> set id


def _next_second(set_id: str) -> None:
    """Set ids are unique per VM only; the tests name sets by id, so no two VMs share a second."""
    while time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) <= set_id[:16]:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def built(ansible, conn, domain_type):
    factory = VmFactory(conn, domain_type)
    REPO_BASE.mkdir(mode=0o711, exist_ok=True)
    root = REPO_BASE / f"verifysched-{uuid.uuid4().hex[:10]}"
    root.mkdir(mode=0o711)
    os.chmod(root, 0o711)
    try:
        vm = factory.create([DiskSpec("64M", fill=[(0xA1, "0", "6M")]), DiskSpec("32M", fill=[(0xB1, "1M", "2M")])])
        other = factory.create([DiskSpec("16M", fill=[(0xC1, "0", "1M")])], running=False)
        repo = root / "repo"
        args = {"name": vm.name, "repository": str(repo), "create_repository": True}
        results = [ansible("export", args)]
        for i, pattern in enumerate((0x11, 0x22)):
            vm.write("vda", pattern, f"{8 + 4 * i}M", "1M")
            vm.write("vdb", pattern + 1, f"{4 + 4 * i}M", "512K")
            results.append(ansible("export", args))
        assert [r.get("type") for r in results] == ["full", "incremental", "incremental"], results
        ids = dict(zip(MAIN, (r["set_id"] for r in results)))
        for label, series in zip(OTHER, ("default", "monthly")):
            _next_second(max(ids.values()))
            copy = ansible("export", {"name": other.name, "repository": str(repo), "series": series})
            assert copy.get("type") == "copy" and copy.get("changed"), copy
            ids[label] = copy["set_id"]
        yield Built(repo, vm, other, ids)
    finally:
        factory.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@dataclasses.dataclass
class Copy:
    path: pathlib.Path
    built: Built

    @property
    def labels(self) -> dict[str, str]:
        return {sid: label for label, sid in self.built.ids.items()}

    def uuid_of(self, label: str) -> str:
        return self.built.other.uuid if label in OTHER else self.built.vm.uuid

    def sets_dir(self, label: str) -> pathlib.Path:
        return self.path / "vms" / self.uuid_of(label) / "sets"

    def set_dir(self, label: str) -> pathlib.Path:
        return self.sets_dir(label) / self.built.ids[label]

    def file(self, label: str, rel: str) -> pathlib.Path:
        return self.set_dir(label) / rel

    def sidecar(self, label: str) -> pathlib.Path:
        return self.sets_dir(label) / f"{self.built.ids[label]}{SIDECAR_SUFFIX}"

    def manifest(self, label: str) -> dict[str, t.Any]:
        return json.loads(self.file(label, "manifest.json").read_text())

    def verdict(self, label: str) -> dict[str, t.Any]:
        return json.loads(self.sidecar(label).read_text())

    def sidecar_files(self) -> dict[str, tuple]:
        """Each sidecar's bytes, inode and mtime: a rewrite, even with the same content, changes them."""
        out = {}
        for path in sorted(self.path.rglob(f"*{SIDECAR_SUFFIX}")):
            st = path.stat()
            out[self.labels[path.name[:-len(SIDECAR_SUFFIX)]]] = (path.read_bytes(), st.st_ino, st.st_mtime_ns)
        return out

    def sets_state(self) -> dict[str, tuple]:
        return {k: v for k, v in tree_state(self.path).items() if not k.endswith(SIDECAR_SUFFIX)}


@pytest.fixture
def copy(built, repo) -> Copy:
    subprocess.run(["cp", "-a", f"{built.repo}/.", str(repo)], check=True)
    return Copy(repo, built)


# ----------------------------------------------------------------------------- independent expectations
def file_sizes(cp: Copy, label: str) -> int:
    """Bytes of every file of a set but its manifest, from the file system."""
    return sum(p.stat().st_size for p in cp.set_dir(label).rglob("*") if p.is_file() and p.name != "manifest.json")


def chain_read_bytes(cp: Copy, label: str) -> int:
    """Bytes a restore of point ``label`` reads: each disk's file in every set back to where that
    disk is stored whole (parent links followed in the manifests' JSON)."""
    total = 0
    for disk in cp.manifest(label)["disks"]:
        current = label
        while True:
            manifest = cp.manifest(current)
            entry = next(d for d in manifest["disks"] if d["target"] == disk["target"])
            total += cp.file(current, entry["file"]).stat().st_size
            if entry["method"] != "incremental":
                break
            current = cp.labels[manifest["parent"]["set_id"]]
    return total


def expected_bytes(cp: Copy, data: t.Iterable[str] = (), restore: t.Iterable[str] = ()) -> int:
    """What a run reads that checks ``data`` sets at level data and ``restore`` points at level restore."""
    return sum(file_sizes(cp, label) for label in (*data, *restore)) + sum(chain_read_bytes(cp, label) for label in restore)


def actions(cp: Copy, result: dict[str, t.Any]) -> dict[str, tuple[str, str]]:
    """label -> (action, level) of every set in the result."""
    return {cp.labels[s["set_id"]]: (s["action"], s["level"]) for s in result["sets"]}


def reasons(cp: Copy, result: dict[str, t.Any]) -> dict[str, str]:
    return {cp.labels[s["set_id"]]: s["reason"] for s in result["sets"]}


def verify(ansible, cp: Copy, check: bool = False, faketime: str | None = None, **args: t.Any) -> dict[str, t.Any]:
    """Run verify on the copy (under a shifted clock with ``faketime``); committed sets stay byte-identical."""
    before = cp.sets_state()
    argv = ansible.argv("verify", {"repository": str(cp.path), **args}, check)
    if faketime is not None:
        argv = ["faketime", "-f", faketime, *argv]
    proc = subprocess.run(argv, env=ansible.env, capture_output=True, text=True, timeout=300, check=False)
    result = parse_result(proc.stdout, proc.stderr)
    assert cp.sets_state() == before, "verify changed a committed set"
    return result


def assert_counts(cp: Copy, result: dict[str, t.Any]) -> None:
    """The counts and id lists agree with the per-set entries, and the total with the per-set bytes."""
    checked = [s["set_id"] for s in result["sets"] if s["action"] == "checked"]
    skipped = [s["set_id"] for s in result["sets"] if s["action"] == "skipped"]
    assert (result["checked_sets"], result["skipped_sets"]) == (checked, skipped)
    assert (result["sets_checked"], result["sets_skipped"]) == (len(checked), len(skipped))
    assert result["sets_ok"] + result["sets_failed"] == result["sets_checked"]
    assert result["bytes_read"] == sum(s["bytes_read"] + s["chain_bytes_read"] for s in result["sets"])
    for res in result["sets"]:
        if res["action"] == "skipped":
            assert (res["bytes_read"], res["chain_bytes_read"], res["files_checked"]) == (0, 0, 0), res
            assert res["outcome"] == "ok" and res["verified"] == cp.verdict(cp.labels[res["set_id"]])["verified"], res
        elif res["level"] == "data":
            assert res["chain_bytes_read"] == 0, res


# ----------------------------------------------------------------------------- the nightly story
def test_a_nightly_verify_reads_what_changed_and_nothing_else(ansible, copy):
    cp = copy
    vm = cp.built.vm
    everything = ("full", "i1", "i2", "c1", "c2")

    # Night 1: nothing was ever verified; the newest point of each VM and series (i2; c1 of
    # default, c2 of monthly) is read through its chain, every other set at level data.
    first = verify(ansible, cp, **NIGHTLY)
    assert not first["failed"] and first["changed"] and first["outcome"] == "ok", first
    assert actions(cp, first) == {"full": ("checked", "data"), "i1": ("checked", "data"), "i2": ("checked", "restore"),
                                  "c1": ("checked", "restore"), "c2": ("checked", "restore")}
    assert set(reasons(cp, first).values()) == {"never verified"}
    assert first["bytes_read"] == expected_bytes(cp, data=("full", "i1"), restore=("i2", "c1", "c2"))
    assert_counts(cp, first)
    assert {label: cp.verdict(label)["level"] for label in everything} == \
        {"full": "data", "i1": "data", "i2": "restore", "c1": "restore", "c2": "restore"}
    sidecars = cp.sidecar_files()
    assert sorted(sidecars) == sorted(everything)

    # Night 2, predicted then real: every verdict is current, so nothing is read or written.
    predicted = verify(ansible, cp, check=True, **NIGHTLY)
    second = verify(ansible, cp, **NIGHTLY)
    for run_ in (predicted, second):
        assert not run_["failed"] and not run_["changed"] and run_["outcome"] == "ok", run_
        assert run_["bytes_read"] == 0 and run_["sets_checked"] == 0 and run_["sidecars"] == [], run_
        assert {label: a for label, (a, _level) in actions(cp, run_).items()} == dict.fromkeys(everything, "skipped")
        assert all(r.startswith("verified ok at level") and "within 7d; manifest unchanged" in r
                   for r in reasons(cp, run_).values()), run_
        assert_counts(cp, run_)
    assert "restore" in reasons(cp, second)["i2"] and "data" in reasons(cp, second)["i1"]
    assert cp.sidecar_files() == sidecars, "a skipped set's sidecar was rewritten"

    # A new export: the next night reads the new point and, as the newest, its whole chain. The
    # previous newest point is asked data only now; its restore verdict covers that.
    vm.write("vda", 0x33, "16M", "1M")
    export = ansible("export", {"name": vm.name, "repository": str(cp.path)})
    assert export["changed"] and export["type"] == "incremental", export
    cp.built.ids["i3"] = export["set_id"]
    predicted = verify(ansible, cp, check=True, **NIGHTLY)
    third = verify(ansible, cp, **NIGHTLY)
    for run_ in (predicted, third):
        assert not run_["failed"] and run_["changed"], run_
        assert actions(cp, run_) == {"full": ("skipped", "data"), "i1": ("skipped", "data"), "i2": ("skipped", "data"),
                                     "i3": ("checked", "restore"), "c1": ("skipped", "restore"), "c2": ("skipped", "restore")}
        assert reasons(cp, run_)["i3"] == "never verified"
        assert run_["bytes_read"] == expected_bytes(cp, restore=("i3",)) < expected_bytes(cp, data=(*MAIN, "i3", *OTHER))
        i3_entry = next(e for e in run_["sets"] if e["set_id"] == export["set_id"])
        assert (i3_entry["bytes_read"], i3_entry["chain_bytes_read"]) == (file_sizes(cp, "i3"), chain_read_bytes(cp, "i3"))
        assert_counts(cp, run_)
    assert predicted["sidecars"] == [] and third["sidecars"] == [str(cp.sidecar("i3"))]
    after = cp.sidecar_files()
    assert {k: v for k, v in after.items() if k != "i3"} == sidecars
    assert cp.verdict("i3")["level"] == "restore" and cp.verdict("i3")["outcome"] == "ok"
    assert cp.verdict("i3")["bytes_read"] == file_sizes(cp, "i3")

    # A week later (a shifted clock for Ansible and the module; QEMU keeps the real one), every
    # verdict is due: the whole repository is read again, the newest points through their chains.
    late = verify(ansible, cp, faketime="+8d", **NIGHTLY)
    assert not late["failed"] and late["changed"], late
    assert actions(cp, late) == {"full": ("checked", "data"), "i1": ("checked", "data"), "i2": ("checked", "data"),
                                 "i3": ("checked", "restore"), "c1": ("checked", "restore"), "c2": ("checked", "restore")}
    assert all("old, not within 7d" in r for r in reasons(cp, late).values()), late
    assert late["bytes_read"] == expected_bytes(cp, data=MAIN, restore=("i3", "c1", "c2"))
    assert_counts(cp, late)


# ----------------------------------------------------------------------------- levels and series
def test_a_data_verdict_does_not_spare_a_point_asked_restore(ansible, copy):
    cp = copy
    data = verify(ansible, cp, **WEEK_ARGS)
    assert not data["failed"] and data["sets_checked"] == 5 and data["level"] == "data", data
    assert {cp.verdict(label)["level"] for label in (*MAIN, *OTHER)} == {"data"}
    sidecars = cp.sidecar_files()

    # Only the newest points are asked restore: they are read again (with their chains), the rest skipped.
    nightly = verify(ansible, cp, **NIGHTLY)
    assert not nightly["failed"], nightly
    assert actions(cp, nightly) == {"full": ("skipped", "data"), "i1": ("skipped", "data"), "i2": ("checked", "restore"),
                                    "c1": ("checked", "restore"), "c2": ("checked", "restore")}
    assert reasons(cp, nightly)["i2"] == "its last verdict is at level data, level restore is asked of it"
    assert nightly["bytes_read"] == expected_bytes(cp, restore=("i2", "c1", "c2"))
    assert_counts(cp, nightly)
    after = cp.sidecar_files()
    assert {k: after[k] for k in ("full", "i1")} == {k: sidecars[k] for k in ("full", "i1")}
    assert {cp.verdict(label)["level"] for label in ("i2", "c1", "c2")} == {"restore"}

    # restore_points: all asks restore of every point: full and i1 (data verdicts) are read again.
    every = verify(ansible, cp, level="restore", **WEEK_ARGS)
    assert actions(cp, every) == {"full": ("checked", "restore"), "i1": ("checked", "restore"), "i2": ("skipped", "restore"),
                                  "c1": ("skipped", "restore"), "c2": ("skipped", "restore")}
    assert every["bytes_read"] == expected_bytes(cp, restore=("full", "i1"))
    assert_counts(cp, every)


def test_series_scope(ansible, copy):
    cp = copy
    monthly = verify(ansible, cp, series="monthly", **NIGHTLY)
    assert not monthly["failed"] and monthly["series"] == "monthly", monthly
    assert actions(cp, monthly) == {"c2": ("checked", "restore")}
    assert [s["series"] for s in monthly["sets"]] == ["monthly"]
    assert sorted(cp.sidecar_files()) == ["c2"]

    default = verify(ansible, cp, series="default", **NIGHTLY)
    assert actions(cp, default) == {"full": ("checked", "data"), "i1": ("checked", "data"), "i2": ("checked", "restore"),
                                    "c1": ("checked", "restore")}
    assert default["bytes_read"] == expected_bytes(cp, data=("full", "i1"), restore=("i2", "c1"))
    assert sorted(cp.sidecar_files()) == sorted((*MAIN, *OTHER))

    # A point of one series with another series named, a series nobody has, bad values: refused before any work.
    refused = [
        ({"series": "weekyl"}, "SET_NOT_FOUND"),
        ({"series": "monthly", "name": cp.built.vm.name}, "SET_NOT_FOUND"),
        ({"series": "default", "set_id": cp.built.ids["c2"]}, "SET_NOT_FOUND"),
        ({"series": "Monthly"}, "INVALID_NAME"),
        ({"skip_verified_within": "soon"}, "INVALID_ARGUMENT"),
        ({"skip_verified_within": 0}, "INVALID_ARGUMENT"),
        ({"skip_verified_within": "-2d"}, "INVALID_ARGUMENT"),
    ]
    before = cp.sidecar_files()
    for args, code in refused:
        result = verify(ansible, cp, **args)
        assert result["failed"] and result.get("error_code") == code, (args, result)
    bad_choice = verify(ansible, cp, restore_points="oldest")
    assert bad_choice["failed"] and "restore_points" in bad_choice["msg"], bad_choice
    assert cp.sidecar_files() == before

    # With set_id, the newest point of its scope is that set: it alone is read through its chain.
    point = verify(ansible, cp, set_id=cp.built.ids["i1"], series="default", level="restore", restore_points="newest")
    assert actions(cp, point) == {"full": ("checked", "data"), "i1": ("checked", "restore")}, point


# ----------------------------------------------------------------------------- damage under a schedule
def flip(path: pathlib.Path, offset: int) -> None:
    """Flip one bit of guest data in place (size and mode stay)."""
    mode = path.stat().st_mode
    os.chmod(path, 0o600)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x10]))
    os.chmod(path, mode & 0o7777)


def host_offset(image: pathlib.Path, guest_offset: int) -> int:
    for extent in json.loads(run(["qemu-img", "map", "--output=json", str(image)]).stdout):
        if extent.get("data") and extent["start"] <= guest_offset < extent["start"] + extent["length"]:
            return extent["offset"] + guest_offset - extent["start"]
    raise AssertionError(f"guest offset {guest_offset} holds no data in {image}")


def test_a_failed_set_is_always_checked_and_a_finding_below_withdraws_skips(ansible, copy):
    cp = copy
    first = verify(ansible, cp, **WEEK_ARGS)
    assert not first["failed"] and first["sets_checked"] == 5, first

    # Bit rot in the newest point stays unseen while its verdict is current: that is what skipping trusts.
    image = cp.file("i2", "disks/vdb.qcow2")
    flip(image, host_offset(image, 8 * MIB))
    trusting = verify(ansible, cp, **WEEK_ARGS)
    assert not trusting["failed"] and trusting["sets_checked"] == 0 and trusting["bytes_read"] == 0, trusting

    # The full loses its verdict (never verified now) and is damaged too: it is read, its finding
    # affects every point built on it, so i1 and i2 lose their skip and are read as well.
    sidecars = cp.sidecar_files()
    cp.sidecar("full").unlink()
    image = cp.file("full", "disks/vda.qcow2")
    flip(image, host_offset(image, 2 * MIB))
    found = verify(ansible, cp, fail_on_error=False, **WEEK_ARGS)
    assert not found["failed"] and found["outcome"] == "failed" and found["changed"], found
    assert actions(cp, found) == {"full": ("checked", "data"), "i1": ("checked", "data"), "i2": ("checked", "data"),
                                  "c1": ("skipped", "data"), "c2": ("skipped", "data")}
    why = reasons(cp, found)
    assert why["full"] == "never verified"
    assert why["i1"] == why["i2"] == f"skip withdrawn: a CHECKSUM_MISMATCH finding in set {cp.built.ids['full']} affects it"
    assert [(f["code"], cp.labels[f["set_id"]], f["file"]) for f in found["findings"]] == [
        ("CHECKSUM_MISMATCH", "full", "disks/vda.qcow2"), ("CHECKSUM_MISMATCH", "i2", "disks/vdb.qcow2")]
    assert found["failed_sets"] == [cp.built.ids[label] for label in MAIN]
    assert found["bytes_read"] == expected_bytes(cp, data=MAIN)
    assert_counts(cp, found)
    assert {label: cp.verdict(label)["outcome"] for label in MAIN} == dict.fromkeys(MAIN, "failed")
    assert {k: v for k, v in cp.sidecar_files().items() if k in OTHER} == {k: sidecars[k] for k in OTHER}

    # A failed verdict is never current: the next run reads those sets again (and fails the task).
    again = verify(ansible, cp, **WEEK_ARGS)
    assert again["failed"] and again["error_code"] == "CHECKSUM_MISMATCH", again
    assert actions(cp, again) == actions(cp, found)
    assert all("failed (CHECKSUM_MISMATCH); a failed set is checked again" in reasons(cp, again)[label] for label in MAIN)


def test_an_edited_manifest_makes_its_verdict_stale_and_breaks_the_skipped_child(ansible, copy):
    cp = copy
    first = verify(ansible, cp, **WEEK_ARGS)
    assert not first["failed"], first
    sidecars = cp.sidecar_files()

    manifest = cp.file("full", "manifest.json")
    data = json.loads(manifest.read_text())
    data["vm"]["name"] = "renamed-by-hand"
    os.chmod(manifest, 0o600)
    manifest.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.chmod(manifest, 0o400)

    # The full is read again (its verdict was for another manifest) and passes: its files match
    # what it says now. Its child's link, checked even for a current verdict, is broken; the
    # finding reaches i2, which loses its skip.
    result = verify(ansible, cp, fail_on_error=False, **WEEK_ARGS)
    assert result["outcome"] == "failed", result
    assert actions(cp, result) == {"full": ("checked", "data"), "i1": ("checked", "data"), "i2": ("checked", "data"),
                                   "c1": ("skipped", "data"), "c2": ("skipped", "data")}
    why = reasons(cp, result)
    assert why["full"] == "its manifest changed since its last verdict"
    assert why["i1"].startswith("its link to its parent is broken (the manifest of set ") and "renamed" not in why["i1"]
    assert why["i2"] == f"skip withdrawn: a CHAIN_BROKEN finding in set {cp.built.ids['i1']} affects it"
    assert [(f["code"], cp.labels[f["set_id"]]) for f in result["findings"]] == [("CHAIN_BROKEN", "i1")]
    assert {label: cp.verdict(label)["outcome"] for label in MAIN} == {"full": "ok", "i1": "failed", "i2": "failed"}
    assert {k: v for k, v in cp.sidecar_files().items() if k in OTHER} == {k: sidecars[k] for k in OTHER}
    assert_counts(cp, result)


def test_a_point_that_does_not_read_through_its_chain_withdraws_the_skips_below_it(ansible, copy):
    cp = copy
    first = verify(ansible, cp, **NIGHTLY)
    assert not first["failed"] and first["sets_checked"] == 5, first
    sidecars = cp.sidecar_files()

    # The full's second disk disappears while its verdict is current; the newest point is due
    # (it lost its verdict). Its restore read fails on that disk, so the sets of that chain are
    # read too, and the missing file itself is found.
    cp.sidecar("i2").unlink()
    cp.file("full", "disks/vdb.qcow2").unlink()
    result = verify(ansible, cp, fail_on_error=False, **NIGHTLY)
    assert result["outcome"] == "failed", result
    assert actions(cp, result) == {"full": ("checked", "data"), "i1": ("checked", "data"), "i2": ("checked", "restore"),
                                   "c1": ("skipped", "restore"), "c2": ("skipped", "restore")}
    why = reasons(cp, result)
    assert why["i2"] == "never verified"
    assert why["full"] == why["i1"] == \
        f"skip withdrawn: point {cp.built.ids['i2']} does not read through its chain, which holds this set"
    assert [(f["code"], cp.labels[f["set_id"]], f["file"], [cp.labels[a] for a in f["affected"]]) for f in result["findings"]] == [
        ("FILE_MISSING", "full", "disks/vdb.qcow2", list(MAIN)), ("IMAGE_INVALID", "i2", "disks/vdb.qcow2", ["i2"])]
    assert {label: cp.verdict(label)["outcome"] for label in MAIN} == dict.fromkeys(MAIN, "failed")
    assert {k: v for k, v in cp.sidecar_files().items() if k in OTHER} == {k: sidecars[k] for k in OTHER}
    assert_counts(cp, result)
