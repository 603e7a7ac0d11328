"""vmbackup.libvirt.backup_info against a repository made by real exports of a real running VM.

Every figure the catalog gives is checked by another path: the set directories and file sizes
on disk, `qemu-img info` of the set's images, the checkpoints libvirt holds, the VM's UUID and
name in libvirt, and the newest restorable point read through its backing chain and compared
with a reference copy of the disk. The module must write nothing: the repository tree (modes,
sizes, contents, and the mtime/ctime/inode of every entry) is compared before and after.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
import socket
import subprocess
import time

import pytest

from harness import DiskSpec, MIB, chain_json, expect_error, images_equal, parse_result, run, tree_state

UNTIMED = {"generated", "invocation", "warnings", "deprecations", "_ansible_no_log"}


def stat_state(root: pathlib.Path) -> dict[str, tuple]:
    """tree_state plus what a write leaves even when the bytes are the same (atime left out: reads change it)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["."] + dirnames + filenames:
            p = pathlib.Path(dirpath) / name
            st = p.lstat()
            state[str(p.relative_to(root))] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)
    return state


def without_ages(value):
    if isinstance(value, dict):
        return {k: without_ages(v) for k, v in value.items() if k != "age_seconds" and k not in UNTIMED}
    if isinstance(value, list):
        return [without_ages(v) for v in value]
    return value


def info_ok(ansible, args: dict, check: bool = False) -> dict:
    result = ansible("backup_info", args, check=check)
    assert not result["failed"] and result["changed"] is False, json.dumps(result, indent=1)[:4000]
    return result


def set_files(set_dir: pathlib.Path) -> dict[str, int]:
    """Every regular file of a set directory but its manifest, with its size on disk."""
    out = {}
    for dirpath, dummy, filenames in os.walk(set_dir):
        for name in filenames:
            p = pathlib.Path(dirpath) / name
            if p.is_file() and not p.is_symlink() and p.relative_to(set_dir) != pathlib.Path("manifest.json"):
                out[str(p.relative_to(set_dir))] = p.stat().st_size
    return out


def qemu_img_info(path: pathlib.Path) -> dict:
    return json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)


def write_marker(path: pathlib.Path) -> None:
    """An empty repository, laid out as docs/repository-format.md says (not through the collection)."""
    path.mkdir(mode=0o711, exist_ok=True)
    (path / "vmbackup-repo.json").write_text(json.dumps({
        "format": "vmbackup.libvirt/repository", "format_version": 1, "repo_id": "0f0e0d0c-0b0a-4908-8706-050403020100",
        "created": "2026-11-25T00:00:00Z"}))
    (path / "vms").mkdir(mode=0o711)


def export_supports_series() -> bool:
    doc = (pathlib.Path(__file__).resolve().parents[2] / "plugins" / "modules" / "export.py").read_text()
    return "\n  series:\n" in doc


@pytest.fixture
def chain(ansible, vms, repo, scratch):
    """A running VM (a qcow2 disk and a raw disk) with a full and two incrementals, each after guest writes."""
    vm = vms.create([DiskSpec("64M", fill=[(0x11, "0", "8M")]), DiskSpec("16M", fmt="raw")])
    args = {"name": vm.name, "repository": str(repo)}
    done = []
    full = ansible("export", args)
    done.append(time.time())
    vm.write("vda", 0x22, "16M", "2M")
    i1 = ansible("export", args)
    done.append(time.time())
    vm.write("vda", 0x33, "40M", "1M")
    vm.write("vdb", 0x44, "1M", "1M")
    ref = vm.snapshot_disk("vda", scratch / "ref.qcow2")
    i2 = ansible("export", dict(args, period="2026-W48"))
    done.append(time.time())
    for r, kind in ((full, "full"), (i1, "incremental"), (i2, "incremental")):
        assert not r["failed"] and r["type"] == kind, r
    return {"vm": vm, "sets": [full, i1, i2], "done": done, "ref": ref}


def test_the_catalog_of_real_exports_matches_the_disk_libvirt_and_qemu_img(ansible, repo, chain):
    vm, (full, i1, i2) = chain["vm"], chain["sets"]
    called = time.time()
    info = info_ok(ansible, {"repository": str(repo)})
    assert info["repository"] == str(repo)
    assert [v["uuid"] for v in info["vms"]] == [vm.dom.UUIDString()]
    entry = info["vms"][0]
    assert (entry["name"], entry["host"]) == (vm.dom.name(), socket.gethostname())

    # The sets are the committed set directories on disk, oldest first.
    sets_dir = repo / "vms" / vm.dom.UUIDString() / "sets"
    on_disk = sorted(p.name for p in sets_dir.iterdir() if p.is_dir())
    assert [s["set_id"] for s in entry["sets"]] == on_disk == [full["set_id"], i1["set_id"], i2["set_id"]]
    sets = {s["set_id"]: s for s in entry["sets"]}
    for r, s in zip((full, i1, i2), entry["sets"]):
        files = set_files(sets_dir / s["set_id"])
        assert s["bytes"] == sum(files.values()), (files, s)
        assert (s["type"], s["chain_id"], s["series"], s["readable"], s["error"]) == (r["type"], r["chain_id"], "default", True, None)
        assert s["verdict"] is None and s["restorable"] is True and s["restore_fault"] is None
        # Each disk image of the set is what qemu-img says: a qcow2 of the VM disk's size.
        for target, size in (("vda", 64 * MIB), ("vdb", 16 * MIB)):
            image = qemu_img_info(sets_dir / s["set_id"] / "disks" / f"{target}.qcow2")
            assert (image["format"], image["virtual-size"]) == ("qcow2", size), image
    assert [s["parent"] for s in entry["sets"]] == [None, full["set_id"], i1["set_id"]]
    assert sets[i2["set_id"]]["period"] == "2026-W48" and sets[full["set_id"]]["period"] is None
    assert {s["consistency"] for s in entry["sets"]} == {"crash"}  # no guest agent in this VM
    # Ages: from each set's completion to the host clock at the call.
    for s, done in zip(entry["sets"], chain["done"]):
        assert 0 <= s["age_seconds"] <= called - done + 5 + (time.time() - called), (s, done)

    # One chain, whose live checkpoint in libvirt is the newest set's.
    chain_id = full["chain_id"]
    assert vm.checkpoints() == [i2["checkpoint"]] and i2["checkpoint"].startswith(f"vmbackup-{chain_id}-")
    total = sum(s["bytes"] for s in entry["sets"])
    assert entry["series"] == [{
        "name": "default", "sets": 3, "bytes": total, "newest": i2["set_id"], "newest_restorable": i2["set_id"],
        "chains": [{"chain_id": chain_id, "base": full["set_id"], "newest": i2["set_id"],
                    "sets": [full["set_id"], i1["set_id"], i2["set_id"]], "bytes": total}],
    }]
    assert entry["totals"] == {"sets": 3, "bytes": total}
    assert info["totals"] == {"vms": 1, "sets": 3, "bytes": total}

    # The newest restorable point really restores: its chain read by qemu-img is the disk at backup time.
    newest = entry["newest_restorable"]
    assert (newest["set_id"], newest["series"]) == (i2["set_id"], "default")
    images = [sets_dir / sid / "disks" / "vda.qcow2" for sid in (full["set_id"], i1["set_id"], i2["set_id"])]
    same, out = images_equal(chain_json(images), str(chain["ref"]))
    assert same, out

    # By name and by uuid: the same VM entry.
    for args in ({"name": vm.name}, {"uuid": vm.dom.UUIDString().upper()}):
        one = info_ok(ansible, dict(args, repository=str(repo)))
        assert without_ages(one["vms"]) == without_ages(info["vms"])
    expect_error(ansible("backup_info", {"repository": str(repo), "name": "no-such-vm"}), "SET_NOT_FOUND")
    expect_error(ansible("backup_info", {"repository": str(repo), "series": "weekly"}), "SET_NOT_FOUND")

    # The same repository (one VM's chain costs more than these calls): the query through
    # ansible, a lock held as by a running export, and then writing nothing (verify records verdicts first).
    _query_runs_on_the_host_through_ansible(ansible, repo, chain)
    _a_running_export_does_not_make_the_catalog_wait(ansible, repo, chain)
    _writes_nothing_and_check_mode_gives_the_same_answer(ansible, repo, chain)


def _writes_nothing_and_check_mode_gives_the_same_answer(ansible, repo, chain):
    vm = chain["vm"]
    ansible("verify", {"repository": str(repo), "name": vm.name})  # a verdict beside each set too
    before, stats = tree_state(repo), stat_state(repo)
    real = info_ok(ansible, {"repository": str(repo)})
    check = info_ok(ansible, {"repository": str(repo)}, check=True)
    assert tree_state(repo) == before and stat_state(repo) == stats
    assert without_ages(real) == without_ages(check)
    assert all(s["verdict"]["outcome"] == "ok" and s["verdict"]["current"] for s in real["vms"][0]["sets"])


def _a_running_export_does_not_make_the_catalog_wait(ansible, repo, chain):
    """The VM's lock held exclusively, as a running export or prune holds it: the catalog answers at once."""
    vm = chain["vm"]
    lock = repo / "vms" / vm.dom.UUIDString() / "lock"
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        started = time.monotonic()
        info = info_ok(ansible, {"repository": str(repo), "lock_timeout": 0})
        assert info["totals"]["sets"] == 3
        assert time.monotonic() - started < 30
        # The lock really was held: an export gives up on it.
        expect_error(ansible("export", {"repository": str(repo), "name": vm.name, "lock_timeout": 0}), "VM_LOCKED")
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def test_failed_and_stale_verdicts_and_broken_links_make_points_unrestorable(ansible, repo, chain):
    vm, (full, i1, i2) = chain["vm"], chain["sets"]
    sets_dir = repo / "vms" / vm.dom.UUIDString() / "sets"
    # A byte of i1's incremental image flipped: verify finds it, and its verdict fails i1 and i2.
    image = sets_dir / i1["set_id"] / "disks" / "vda.qcow2"
    with open(image, "r+b") as fh:
        fh.seek(image.stat().st_size - 1)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0x10]))
    verified = ansible("verify", {"repository": str(repo), "name": vm.name, "fail_on_error": False})
    assert verified["failed_sets"] == [i1["set_id"], i2["set_id"]], verified
    info = info_ok(ansible, {"repository": str(repo)})
    sets = {s["set_id"]: s for s in info["vms"][0]["sets"]}
    assert [sets[r["set_id"]]["restorable"] for r in (full, i1, i2)] == [True, False, False]
    v = sets[i1["set_id"]]["verdict"]
    assert (v["outcome"], v["level"], v["current"], v["codes"]) == ("failed", "data", True, ["CHECKSUM_MISMATCH"])
    assert 0 <= v["age_seconds"] < 120
    # i2's own verdict failed for the damage in i1, and its fault says where the damage is.
    assert sets[i2["set_id"]]["restore_fault"].startswith(f"set {i2['set_id']} failed verification on ")
    assert f"disks/vda.qcow2 of set {i1['set_id']} has sha256" in sets[i2["set_id"]]["restore_fault"]
    assert info["vms"][0]["newest_restorable"]["set_id"] == full["set_id"]

    # i2's manifest rewritten (same content, other bytes): its verdict is stale, and still blocks.
    manifest = sets_dir / i2["set_id"] / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()), indent=1))
    info = info_ok(ansible, {"repository": str(repo)})
    sets = {s["set_id"]: s for s in info["vms"][0]["sets"]}
    assert sets[i2["set_id"]]["verdict"]["current"] is False and sets[i1["set_id"]]["verdict"]["current"] is True
    assert sets[i2["set_id"]]["restorable"] is False

    # i1's manifest rewritten the same way: i2's link to it breaks (the hash chain).
    manifest = sets_dir / i1["set_id"] / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()), indent=3))
    info = info_ok(ansible, {"repository": str(repo)})
    sets = {s["set_id"]: s for s in info["vms"][0]["sets"]}
    assert f"the manifest of set {i1['set_id']} differs from what its child {i2['set_id']} recorded" in \
        sets[i2["set_id"]]["restore_fault"]

    # The full's manifest unreadable: every point is, and the set is listed with its error.
    (sets_dir / full["set_id"] / "manifest.json").write_text("{not json")
    info = info_ok(ansible, {"repository": str(repo)})
    entry = info["vms"][0]
    s = entry["sets"][0]
    assert (s["readable"], s["type"], s["bytes"]) == (False, None, None) and "not valid JSON" in s["error"]
    assert not any(x["restorable"] for x in entry["sets"]) and entry["newest_restorable"] is None
    assert entry["totals"]["sets"] == 3


def _query_runs_on_the_host_through_ansible(ansible, repo, chain):
    full, i1, i2 = chain["sets"]
    args = {"repository": str(repo)}
    r = info_ok(ansible, dict(args, query="vms[].sets[?type == 'incremental'].set_id[]"))
    assert r["query_result"] == [i1["set_id"], i2["set_id"]] and r["totals"]["sets"] == 3
    r = info_ok(ansible, dict(args, query="vms[0].series[0].chains[0].{base: base, n: length(sets)}"))
    assert r["query_result"] == {"base": full["set_id"], "n": 3}
    bad = expect_error(ansible("backup_info", dict(args, query="vms[?")), "INVALID_ARGUMENT")
    assert "Incomplete expression" in bad["msg"], bad
    bad = expect_error(ansible("backup_info", dict(args, query="sum(vms[].name)")), "INVALID_ARGUMENT")
    assert "invalid type" in bad["msg"], bad
    # Without the per-set lists (through the module's argument spec): the series and chain summary stays.
    short = info_ok(ansible, dict(args, list_sets=False))
    vm = short["vms"][0]
    assert "sets" not in vm and "sets" not in vm["series"][0]["chains"][0], vm
    assert (vm["series"][0]["sets"], vm["series"][0]["newest"], vm["series"][0]["chains"][0]["base"]) == (3, i2["set_id"], full["set_id"])
    assert vm["newest_restorable"]["set_id"] == i2["set_id"] and short["totals"] == r["totals"]


SYSTEM_PYTHON = "/usr/bin/python3"


def _has_jmespath(python: str) -> bool:
    return subprocess.run([python, "-c", "import jmespath"], capture_output=True, check=False).returncode == 0


def _python_without_jmespath(where) -> str | None:
    """The system Python when it lacks jmespath, else a bare virtualenv of it (no site packages:
    setup.sh's packages pull python3-jmespath into the system Python); None when neither works."""
    if not os.path.exists(SYSTEM_PYTHON):
        return None
    if not _has_jmespath(SYSTEM_PYTHON):
        return SYSTEM_PYTHON
    venv = where / "bare-venv"
    made = subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], capture_output=True, check=False)
    python = str(venv / "bin" / "python3")
    if made.returncode != 0 or _has_jmespath(python):
        return None
    return python


def test_without_jmespath_on_the_host_a_query_is_missing_dependency(ansible, repo_root, tmp_path):
    python = _python_without_jmespath(tmp_path)
    if python is None:
        pytest.skip(f"needs a Python without jmespath ({SYSTEM_PYTHON} has it and no bare virtualenv of it could be made)")
    repo = repo_root / "empty"
    write_marker(repo)

    def call(args: dict) -> dict:
        # The implicit localhost runs modules with the controller's Python: a host variable beats it.
        argv = ansible.argv("backup_info", args) + ["-e", f"ansible_python_interpreter={python}"]
        proc = subprocess.run(argv, env=ansible.env, capture_output=True, text=True, check=False)
        return parse_result(proc.stdout, proc.stderr)

    missing = expect_error(call({"repository": str(repo), "query": "totals"}), "MISSING_DEPENDENCY")
    assert "jmespath" in missing["msg"] and "Failed to import the required Python library" in missing["msg"], missing
    # Without a query the catalog needs no jmespath.
    r = call({"repository": str(repo)})
    assert not r["failed"] and r["vms"] == [], r


def test_empty_and_missing_repositories(ansible, repo_root):
    empty = repo_root / "empty"
    write_marker(empty)
    r = info_ok(ansible, {"repository": str(empty), "query": "totals"})
    assert (r["vms"], r["totals"], r["query_result"]) == ([], {"vms": 0, "sets": 0, "bytes": 0}, {"vms": 0, "sets": 0, "bytes": 0})
    expect_error(ansible("backup_info", {"repository": str(repo_root / "missing")}), "REPOSITORY_NOT_FOUND")
    plain = repo_root / "plain"
    plain.mkdir(mode=0o711)
    expect_error(ansible("backup_info", {"repository": str(plain)}), "REPOSITORY_NOT_FOUND")
    expect_error(ansible("backup_info", {"repository": str(empty), "series": "weekly"}), "SET_NOT_FOUND")
    expect_error(ansible("backup_info", {"repository": str(empty), "series": "Weekly!"}), "INVALID_NAME")
    shutil.rmtree(empty / "vms")
    assert info_ok(ansible, {"repository": str(empty)})["vms"] == []


@pytest.mark.skipif(not export_supports_series(), reason="export has no series option yet")
def test_two_series_of_real_exports(ansible, vms, repo):
    vm = vms.create([DiskSpec("32M", fill=[(0x55, "0", "4M")])])
    args = {"name": vm.name, "repository": str(repo)}
    made = {}
    for series in ("weekly", "monthly", "weekly", "monthly", "weekly"):
        vm.write("vda", 0x60 + len(made), f"{len(made)}M", "1M")
        r = ansible("export", dict(args, series=series))
        assert not r["failed"], r
        made.setdefault(series, []).append(r)
    info = info_ok(ansible, {"repository": str(repo)})
    entry = info["vms"][0]
    by_name = {s["name"]: s for s in entry["series"]}
    assert sorted(by_name) == ["monthly", "weekly"]
    for series, results in made.items():
        ids = [r["set_id"] for r in results]
        assert by_name[series]["sets"] == len(ids) and by_name[series]["newest"] == ids[-1]
        assert [c["sets"] for c in by_name[series]["chains"]] == [ids]  # one chain per series, never mixed
        assert by_name[series]["chains"][0]["base"] == ids[0]
        one = info_ok(ansible, {"repository": str(repo), "series": series})
        assert [s["set_id"] for s in one["vms"][0]["sets"]] == ids
        assert {s["series"] for s in one["vms"][0]["sets"]} == {series}
    # Each series keeps its own live checkpoint in libvirt: the newest set's of each.
    assert vm.checkpoints() == sorted(results[-1]["checkpoint"] for results in made.values())


def test_copies_of_a_shut_off_vm_are_chains_of_their_own(ansible, vms, repo):
    vm = vms.create([DiskSpec("16M", fill=[(0x77, "0", "1M")])], running=False)
    args = {"name": vm.name, "repository": str(repo)}
    made = []
    for dummy in range(3):
        r = ansible("export", args)
        assert not r["failed"] and r["type"] == "copy", r
        if r["changed"]:
            made.append(r["set_id"])
    entry = info_ok(ansible, {"repository": str(repo)})["vms"][0]
    sets_dir = repo / "vms" / vm.dom.UUIDString() / "sets"
    assert [s["set_id"] for s in entry["sets"]] == made == sorted(p.name for p in sets_dir.iterdir() if p.is_dir())
    assert all(s["type"] == "copy" and s["chain_id"] is None and s["parent"] is None and s["restorable"] for s in entry["sets"])
    assert [(c["chain_id"], c["base"], c["sets"]) for c in entry["series"][0]["chains"]] == [(None, sid, [sid]) for sid in made]
    for s in entry["sets"]:
        assert s["bytes"] == sum(set_files(sets_dir / s["set_id"]).values())
        same, out = images_equal(str(sets_dir / s["set_id"] / "disks" / "vda.qcow2"), str(vm.disks["vda"]))
        assert same, out
    assert entry["newest_restorable"]["set_id"] == made[-1] and vm.checkpoints() == []
