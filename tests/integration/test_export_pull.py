"""vmbackup.libvirt.export in pull mode (issue 13): the NBD data path, a private repository,
compression, and the run directory's lifecycle (a killed run included), checked through
qemu-img, libvirt and the files on disk - never the module's own answer alone."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import stat
import subprocess

import libvirt
import libvirt_qemu
import pytest

from harness import (
    DiskSpec,
    MIB,
    allocated_data_bytes,
    chain_json,
    destroy_vm,
    expect_ok,
    images_equal,
    job_running,
    kill_tree,
    wait_for,
)

SCRATCH_DEFAULT = pathlib.Path("/var/lib/libvirt/qemu/vmbackup")


def sets_of(repo: pathlib.Path, vm) -> list[pathlib.Path]:
    sets = repo / "vms" / vm.uuid / "sets"
    return sorted(p for p in sets.iterdir() if p.is_dir()) if sets.is_dir() else []


def qemu_img_info(path: pathlib.Path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True,
                                     check=True).stdout)


def monitor_io(vm, target: str, cmd: str) -> None:
    """A qemu-io command through the running QEMU (as the guest would write: dirties the bitmaps)."""
    device = f"/machine/peripheral/ua-{target}/virtio-backend"
    for one in (cmd, "flush"):
        out = libvirt_qemu.qemuMonitorCommand(vm.dom, f'qemu-io -d {device} "{one}"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        assert "error" not in out.lower() and "failed" not in out.lower(), out


def run_dirs(scratch_dir: pathlib.Path, vm) -> list[str]:
    where = scratch_dir / vm.uuid
    return sorted(os.listdir(where)) if where.is_dir() else []


def no_access_for_others(root: pathlib.Path) -> list[str]:
    """Every directory and file under ``root`` (itself included) that group or others can reach."""
    bad = []
    for path in [root] + sorted(root.rglob("*")):
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            bad.append(f"{path} {mode:04o}")
    return bad


@pytest.fixture
def private_root(repo_root):
    """A /root-like tree: 0700 parents nobody but root can traverse (QEMU, libvirt-qemu, cannot)."""
    top = repo_root / "root-like"
    top.mkdir(mode=0o700)
    (top / "backups").mkdir(mode=0o700)
    os.chmod(top, 0o700)
    os.chmod(top / "backups", 0o700)
    return top / "backups"


@pytest.fixture
def restored(ansible, repo_root):
    made: list[str] = []

    def restore(repo: pathlib.Path, vm_uuid: str, set_id: str) -> tuple[dict, pathlib.Path]:
        name = f"vmbt-pr-{os.urandom(4).hex()}"
        disk_dir = repo_root / name
        disk_dir.mkdir(mode=0o711)
        os.chmod(disk_dir, 0o711)
        made.append(name)
        result = expect_ok(ansible("restore", {"repository": str(repo), "uuid": vm_uuid, "set_id": set_id, "restore_as": name,
                                               "disk_dir": str(disk_dir)}))
        return result, disk_dir

    yield restore
    conn = libvirt.open("qemu:///system")
    try:
        for name in made:
            try:
                destroy_vm(conn.lookupByName(name))
            except libvirt.libvirtError:
                pass
    finally:
        conn.close()


def test_pull_full_incremental_compress_into_a_private_repository(ansible, vms, private_root, scratch, restored):
    """One VM through a chain in a private repository: a full and incrementals (1 % of the blocks, a
    zero write over data, an unaligned write) read over NBD, each compare-equal at its point in time;
    a compressed full and incremental; a restore; nothing of the repository reachable by others;
    no run directory, socket or scratch file left."""
    vm = vms.create([DiskSpec("128M", fill=[(0xAB, "0", "24M"), (0x11, "100M", "2M")]),
                     DiskSpec("64M", fmt="raw", fill=[(0x22, "1M", "3M")])])
    repo = private_root / "repo"
    args = {"name": vm.name, "repository": str(repo), "create_repository": True}

    # A push-mode run cannot reach a private repository (QEMU writes there itself) and says what to use.
    push = ansible("export", dict(args, transport="push"))
    assert push["failed"] and push["error_code"] == "TARGET_NOT_ACCESSIBLE", push
    assert "transport pull" in push["msg"] and not repo.exists()

    full = expect_ok(ansible("export", args))
    assert full["transport"] == "pull" and full["type"] == "full" and full["compress"] == "none", full
    assert {"plan_s", "freeze_s", "transfer_s", "hash_s", "commit_s"} <= set(full["timings"]), full["timings"]
    full_dir = pathlib.Path(full["repository_path"])
    for target in ("vda", "vdb"):
        same, out = images_equal(str(vm.disks[target]), str(full_dir / "disks" / f"{target}.qcow2"))
        assert same, out
    manifest = json.loads((full_dir / "manifest.json").read_text())
    assert manifest["stats"]["transport"] == "pull" and {d["compression"] for d in manifest["disks"]} == {"none"}
    assert run_dirs(SCRATCH_DEFAULT, vm) == [] and not job_running(vm.dom)

    # 1 % of the blocks (1.28 MiB of 128 MiB), zeroes over data the full holds, a write that is not
    # cluster-aligned; the raw disk is read in full again.
    vm.write("vda", 0xCD, "8M", "1280K")
    monitor_io(vm, "vda", "write -z 16M 2M")
    monitor_io(vm, "vda", "write -P 0x3c 33558021 70001")
    vm.write("vdb", 0xEE, "60M", "1M")
    refs = {t: vm.snapshot_disk(t, scratch / f"{t}-inc1.qcow2") for t in ("vda", "vdb")}
    inc = expect_ok(ansible("export", args))
    assert inc["type"] == "incremental" and inc["transport"] == "pull" and inc["parent"] == full["set_id"], inc
    inc_dir = pathlib.Path(inc["repository_path"])
    chain = chain_json([full_dir / "disks/vda.qcow2", inc_dir / "disks/vda.qcow2"])
    same, out = images_equal(chain, str(refs["vda"]))
    assert same, out
    same, out = images_equal(str(inc_dir / "disks/vdb.qcow2"), str(refs["vdb"]))
    assert same, out
    # Only what changed (1.28 MiB + the unaligned write's clusters) is data; the zeroes are zero clusters.
    data = allocated_data_bytes(str(inc_dir / "disks/vda.qcow2"))
    assert 1280 * 1024 <= data <= int(1.1 * (1280 * 1024 + 3 * 64 * 1024)), data
    assert "backing-filename" not in qemu_img_info(inc_dir / "disks/vda.qcow2")

    # Compressed: a full and an incremental of compressible data, smaller files, still equal.
    vm.write("vda", 0x00, "40M", "8M")
    monitor_io(vm, "vda", "write -P 0x61 40M 8M")
    refs = {t: vm.snapshot_disk(t, scratch / f"{t}-z.qcow2") for t in ("vda", "vdb")}
    zfull = expect_ok(ansible("export", dict(args, mode="full", compress="zstd")))
    zfull_dir = pathlib.Path(zfull["repository_path"])
    assert zfull["compress"] == "zstd" and zfull["type"] == "full", zfull
    for target in ("vda", "vdb"):
        image = zfull_dir / "disks" / f"{target}.qcow2"
        assert qemu_img_info(image)["format-specific"]["data"]["compression-type"] == "zstd"
        same, out = images_equal(str(image), str(refs[target]))
        assert same, out
    assert (zfull_dir / "disks/vda.qcow2").stat().st_size < 0.5 * (full_dir / "disks/vda.qcow2").stat().st_size
    subprocess.run(["qemu-img", "check", str(zfull_dir / "disks/vda.qcow2")], check=True, capture_output=True)
    monitor_io(vm, "vda", "write -P 0x62 50M 4M")
    ref = vm.snapshot_disk("vda", scratch / "vda-zinc.qcow2")
    zinc = expect_ok(ansible("export", dict(args, compress="zstd")))
    assert zinc["type"] == "incremental" and zinc["parent"] == zfull["set_id"], zinc
    zinc_dir = pathlib.Path(zinc["repository_path"])
    assert qemu_img_info(zinc_dir / "disks/vda.qcow2")["format-specific"]["data"]["compression-type"] == "zstd"
    assert (zinc_dir / "disks/vda.qcow2").stat().st_size < 2 * MIB
    same, out = images_equal(chain_json([zfull_dir / "disks/vda.qcow2", zinc_dir / "disks/vda.qcow2"]), str(ref))
    assert same, out

    # The newest point restored by the restore module (it reads the compressed chain with nothing new).
    result, disk_dir = restored(repo, vm.uuid, zinc["set_id"])
    images = sorted(disk_dir.iterdir())
    vda = [p for p in images if "-vda-" in p.name]
    assert len(vda) == 1, images
    same, out = images_equal(str(vda[0]), str(ref))
    assert same, out

    # Private from top to bottom: the repository and everything in it (0700/0600/0400).
    assert no_access_for_others(repo) == []
    assert run_dirs(SCRATCH_DEFAULT, vm) == [] and not job_running(vm.dom)


@pytest.fixture
def short_scratch():
    """A scratch_dir of its own (short: the NBD socket's path has at most 107 bytes)."""
    path = pathlib.Path(f"/var/tmp/vmbt-s{os.urandom(3).hex()}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_killed_pull_run_is_cleaned_by_the_next_and_guest_writes_during_the_transfer(ansible, vms, repo, scratch, short_scratch):
    """SIGKILL of the module mid-transfer: its qemu-img dies with it; the next run aborts the job
    that serves from the killed run's directory and removes that directory (socket, scratch files)
    and the staging data. Then a backup while the guest writes: the backup is the point in time."""
    vm = vms.create([DiskSpec("1G", fill=[(0xD1, "0", "768M")])])
    scratch_dir = short_scratch
    args = {"name": vm.name, "repository": str(repo), "scratch_dir": str(scratch_dir)}
    staging = repo / "vms" / vm.uuid / ".incomplete"

    def sockets() -> list[str]:
        return [d for d in run_dirs(scratch_dir, vm) if (scratch_dir / vm.uuid / d / "nbd.sock").exists()]

    proc = ansible.popen("export", args)
    wait_for(lambda: sockets() and job_running(vm.dom), timeout=120, interval=0.005, what="the pull job to serve")
    (name,) = run_dirs(scratch_dir, vm)
    run_dir = scratch_dir / vm.uuid / name
    st = run_dir.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid != 0, "the run directory belongs to QEMU's user, 0700"
    assert sorted(os.listdir(run_dir)) == ["nbd.sock", "vda.scratch"]
    record = json.loads(next(staging.iterdir()).joinpath("run.json").read_text())
    assert record["run_dir"] == str(run_dir) and record["transport"] == "pull"
    kill_tree(proc)
    assert sets_of(repo, vm) == []
    wait_for(lambda: not [p for p in _qemu_img_pids() if str(run_dir) in _cmdline(p)], timeout=10,
             what="the killed run's qemu-img to die with it")

    result = expect_ok(ansible("export", args))
    assert result["type"] == "full", result
    assert "aborted the backup job of an interrupted run" in result["cleaned_up"], result["cleaned_up"]
    assert any(str(run_dir) in c for c in result["cleaned_up"]), result["cleaned_up"]
    assert not run_dir.exists() and run_dirs(scratch_dir, vm) == []
    assert list(staging.iterdir()) == [] and len(sets_of(repo, vm)) == 1
    assert not job_running(vm.dom)
    assert subprocess.run(["virsh", "-c", "qemu:///system", "domjobinfo", vm.uuid], capture_output=True, text=True,
                          check=True).stdout.split()[:3] == ["Job", "type:", "None"]
    same, out = images_equal(str(vm.disks["vda"]), str(pathlib.Path(result["repository_path"]) / "disks/vda.qcow2"))
    assert same, out

    # A run directory of a dead run that no job uses (its staging directory is gone too) is swept;
    # one of a live process (another repository's run) is left alone.
    dead = scratch_dir / vm.uuid / f"20200101T000000Z-001.{_dead_pid()}"
    live = scratch_dir / vm.uuid / f"20200101T000000Z-002.{os.getpid()}"
    for path in (dead, live):
        path.mkdir(mode=0o700)
        (path / "vda.scratch").write_bytes(b"x")

    # The guest writes while the transfer runs: QEMU keeps the old blocks in the scratch file, so
    # the backup is the disk as it was when the job started.
    vm.write("vda", 0x5E, "0", "4M")
    ref = vm.snapshot_disk("vda", scratch / "vda-pit.qcow2")
    pending = ansible.popen_result("export", dict(args, mode="full"))
    wait_for(lambda: sockets() and job_running(vm.dom), timeout=120, interval=0.005, what="the second pull job")
    for offset in ("0", "256M", "700M"):
        vm.write("vda", 0x77, offset, "4M")
    during = expect_ok(pending.result(timeout=300))
    assert any(str(dead) in c for c in during["cleaned_up"]), during["cleaned_up"]
    assert not dead.exists() and live.exists()
    shutil.rmtree(live)
    same, out = images_equal(str(pathlib.Path(during["repository_path"]) / "disks/vda.qcow2"), str(ref))
    assert same, out
    assert run_dirs(scratch_dir, vm) == [] and not job_running(vm.dom)


def _qemu_img_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _comm(int(p)) == "qemu-img"]


def _comm(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_bad_transport_options_fail_before_anything(ansible, vms, repo):
    vm = vms.create([DiskSpec("16M")])
    for bad in ({"scratch_dir": "relative/dir"}, {"scratch_dir": "/var/tmp/" + "x" * 40}, {"transport": "push", "compress": "zstd"}):
        result = ansible("export", dict({"name": vm.name, "repository": str(repo)}, **bad))
        assert result["failed"] and result["error_code"] == "INVALID_ARGUMENT", result
    assert os.listdir(repo) == [] and vm.checkpoints() == []
