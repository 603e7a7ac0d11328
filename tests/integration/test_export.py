"""vmbackup.libvirt.export against a real libvirtd and QEMU, checked with qemu-img and libvirt."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
import subprocess

import libvirt
import libvirt_qemu
import pytest

from harness import (
    DiskSpec,
    MIB,
    allocated_data_bytes,
    chain_json,
    images_equal,
    job_running,
    kill_tree,
    sha256,
    tree_state,
    wait_for,
)


def wait_for_backup_job(vm, staging: pathlib.Path) -> None:
    """Until a run is mid-copy: its staging set exists and libvirt runs its backup job."""
    wait_for(lambda: staging.is_dir() and any(staging.iterdir()) and job_running(vm.dom), timeout=120,
             what="the backup job to start")


def sets_of(repo: pathlib.Path, vm) -> list[pathlib.Path]:
    sets = repo / "vms" / vm.uuid / "sets"
    return sorted(p for p in sets.iterdir() if p.is_dir()) if sets.is_dir() else []


def manifest_of(set_dir: pathlib.Path) -> dict:
    return json.loads((set_dir / "manifest.json").read_text())


def assert_manifest_hashes(set_dir: pathlib.Path) -> None:
    """Every file of the set is in the manifest with its true size and sha256, and nothing else is there."""
    manifest = manifest_of(set_dir)
    on_disk = {str(p.relative_to(set_dir)) for p in set_dir.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(manifest["files"])
    for rel, entry in manifest["files"].items():
        assert (set_dir / rel).stat().st_size == entry["size"], rel
        assert sha256(set_dir / rel) == entry["sha256"], rel


@pytest.mark.parametrize("transport", ["auto", "push"])
def test_full_then_incremental_of_running_vm_with_two_disks(ansible, vms, repo, scratch, transport):
    """The default (auto: pull with python3-libnbd) and the push-mode fallback give the same sets."""
    vm = vms.create(
        [DiskSpec("128M", fill=[(0xAB, "0", "16M"), (0x11, "100M", "2M")]), DiskSpec("64M", fill=[(0x22, "1M", "3M")])],
        cdrom=True,
    )
    args = {"name": vm.name, "repository": str(repo), "transport": transport}

    predicted = ansible("export", args, check=True)
    assert predicted["changed"] and not predicted["failed"], predicted
    assert predicted["type"] == "full" and predicted["set_id"] is None
    assert os.listdir(repo) == [], "check mode must not initialise the repository"
    assert vm.checkpoints() == []

    full = ansible("export", args)
    assert full["changed"] and full["type"] == "full", full
    assert full["transport"] == predicted["transport"] == ("pull" if transport == "auto" else "push"), full
    assert full["reason"] == predicted["reason"]
    assert [d["target"] for d in full["disks"]] == ["vda", "vdb"]
    assert full["skipped_disks"] == [{"target": "hdc", "device": "cdrom", "source": None, "reason": "cdrom device"}]
    assert full["bytes_written"] > 18 * MIB and full["duration_s"] > 0 and full["throughput_mib_s"] > 0
    full_dir = pathlib.Path(full["repository_path"])
    assert full_dir == sets_of(repo, vm)[0]
    for target in ("vda", "vdb"):
        same, out = images_equal(str(vm.disks[target]), str(full_dir / "disks" / f"{target}.qcow2"))
        assert same, out
    assert_manifest_hashes(full_dir)
    assert vm.checkpoints() == [full["checkpoint"]]

    # Writes after the full: the incremental must hold about these bytes only.
    vm.write("vda", 0xCD, "8M", "4M")
    vm.write("vdb", 0xEE, "60M", "1M")
    refs = {t: vm.snapshot_disk(t, scratch / f"{t}-after-inc.qcow2") for t in ("vda", "vdb")}

    predicted = ansible("export", args, check=True)
    assert predicted["type"] == "incremental" and predicted["parent"] == full["set_id"]
    assert predicted["estimated_bytes"] == 5 * MIB

    inc = ansible("export", args)
    assert inc["changed"] and inc["type"] == "incremental", inc
    assert inc["parent"] == full["set_id"] and inc["chain_id"] == full["chain_id"]
    inc_dir = pathlib.Path(inc["repository_path"])
    assert_manifest_hashes(inc_dir)
    manifest = manifest_of(inc_dir)
    parent_bytes = (full_dir / "manifest.json").read_bytes()
    assert manifest["parent"] == {"set_id": full["set_id"], "manifest_sha256": hashlib.sha256(parent_bytes).hexdigest()}
    # Only the written clusters are in the incremental (qemu-img map, not the module, says so).
    assert allocated_data_bytes(str(inc_dir / "disks" / "vda.qcow2")) == 4 * MIB
    assert allocated_data_bytes(str(inc_dir / "disks" / "vdb.qcow2")) == 1 * MIB
    assert inc["data_bytes"] < 6 * MIB
    for target in ("vda", "vdb"):
        chain = chain_json([full_dir / "disks" / f"{target}.qcow2", inc_dir / "disks" / f"{target}.qcow2"])
        same, out = images_equal(chain, str(refs[target]))
        assert same, out
        # The committed image names no backing file: nothing can read through to the live disk.
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(inc_dir / "disks" / f"{target}.qcow2")],
                                         capture_output=True, text=True, check=True).stdout)
        assert "backing-filename" not in info
    # Only the newest checkpoint stays: older bitmaps would slow every guest write.
    assert vm.checkpoints() == [inc["checkpoint"]]
    # Committed data is read-only, private.
    assert (inc_dir / "disks" / "vda.qcow2").stat().st_mode & 0o777 == 0o400
    assert inc_dir.stat().st_mode & 0o777 == 0o700


def test_zeroed_blocks_are_carried_by_the_incremental(ansible, vms, repo, scratch):
    vm = vms.create([DiskSpec("64M", fill=[(0x5A, "0", "32M")])])
    args = {"name": vm.name, "repository": str(repo)}
    full = ansible("export", args)

    # Write zeroes over data the full holds: the chain must read zeroes there, not the full's data.
    device = "/machine/peripheral/ua-vda/virtio-backend"
    for cmd in ("write -z 4M 4M", "flush"):
        libvirt_qemu.qemuMonitorCommand(vm.dom, f'qemu-io -d {device} "{cmd}"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    ref = vm.snapshot_disk("vda", scratch / "ref.qcow2")
    inc = ansible("export", args)
    assert inc["type"] == "incremental", inc
    chain = chain_json([pathlib.Path(full["repository_path"]) / "disks/vda.qcow2", pathlib.Path(inc["repository_path"]) / "disks/vda.qcow2"])
    same, out = images_equal(chain, str(ref))
    assert same, out


def test_shut_off_vm_gives_a_copy_without_checkpoint(ansible, vms, repo):
    vm = vms.create([DiskSpec("64M", fill=[(0x31, "0", "8M")]), DiskSpec("32M", fmt="raw", fill=[(0x32, "4M", "4M")])], running=False)
    result = ansible("export", {"name": vm.name, "repository": str(repo), "mode": "auto"})
    assert result["changed"] and result["type"] == "copy", result
    assert result["checkpoint"] is None and result["chain_id"] is None
    assert "shut off" in result["reason"]
    set_dir = pathlib.Path(result["repository_path"])
    for target in ("vda", "vdb"):
        same, out = images_equal(str(vm.disks[target]), str(set_dir / "disks" / f"{target}.qcow2"), force_share=False)
        assert same, out
    assert {d["method"] for d in result["disks"]} == {"copy"}
    assert vm.checkpoints() == []
    assert not vm.dom.isActive()
    assert_manifest_hashes(set_dir)
    assert "domain-live.xml" not in manifest_of(set_dir)["files"]

    failed = ansible("export", {"name": vm.name, "repository": str(repo), "mode": "incremental"})
    assert failed["failed"] and failed["error_code"] == "PARENT_CHECKPOINT_INVALID"


def test_check_mode_changes_nothing_on_an_existing_repository(ansible, vms, repo):
    vm = vms.create([DiskSpec("64M", fill=[(0x41, "0", "4M")])])
    args = {"name": vm.name, "repository": str(repo)}
    first = ansible("export", args)
    vm.write("vda", 0x42, "16M", "2M")
    before, checkpoints = tree_state(repo), vm.checkpoints()
    xml_before = vm.dom.XMLDesc(0)

    predicted = ansible("export", args, check=True)
    assert predicted["changed"] and predicted["type"] == "incremental" and predicted["parent"] == first["set_id"]
    assert tree_state(repo) == before
    assert vm.checkpoints() == checkpoints
    assert vm.dom.XMLDesc(0) == xml_before and vm.dom.isActive()

    # The prediction and the real run agree; the real run's estimate was honest.
    real = ansible("export", args)
    assert (real["type"], real["reason"], real["parent"]) == (predicted["type"], predicted["reason"], predicted["parent"])
    assert real["data_bytes"] <= predicted["estimated_bytes"] + MIB


def test_period_makes_reruns_idempotent(ansible, vms, repo):
    vm = vms.create([DiskSpec("64M", fill=[(0x51, "0", "2M")])])
    args = {"name": vm.name, "repository": str(repo), "period": "2026-W48"}
    # The canonical sequence: check, real, check, real.
    predicted = ansible("export", args, check=True)
    assert predicted["changed"] and predicted["type"] == "full" and os.listdir(repo) == []
    first = ansible("export", args)
    assert first["changed"] and (first["type"], first["reason"]) == (predicted["type"], predicted["reason"])
    state = tree_state(repo)
    again = ansible("export", args)
    assert not again["changed"] and again["set_id"] == first["set_id"] and again["bytes_written"] == 0
    assert ansible("export", args, check=True)["changed"] is False
    assert tree_state(repo) == state
    other = ansible("export", dict(args, period="2026-W49"))
    assert other["changed"] and other["set_id"] != first["set_id"] and other["type"] == "incremental"
    assert manifest_of(pathlib.Path(other["repository_path"]))["period"] == "2026-W49"


def test_mode_full_starts_a_new_chain_and_retires_the_old_checkpoint(ansible, vms, repo):
    vm = vms.create([DiskSpec("64M", fill=[(0x61, "0", "2M")])])
    args = {"name": vm.name, "repository": str(repo)}
    first = ansible("export", args)
    second = ansible("export", dict(args, mode="full"))
    assert second["type"] == "full" and second["chain_id"] != first["chain_id"] and second["parent"] is None
    assert second["reason"] == "full: mode=full was requested"
    assert vm.checkpoints() == [second["checkpoint"]]


def test_lost_checkpoint_is_redefined_from_the_set(ansible, vms, repo, scratch):
    import libvirt
    vm = vms.create([DiskSpec("64M", fill=[(0x71, "0", "2M")])])
    args = {"name": vm.name, "repository": str(repo)}
    full = ansible("export", args)
    # libvirt forgets the checkpoint but the bitmap stays in the qcow2 image.
    vm.dom.checkpointLookupByName(full["checkpoint"]).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    vm.write("vda", 0x72, "20M", "1M")
    ref = vm.snapshot_disk("vda", scratch / "ref.qcow2")
    inc = ansible("export", args)
    assert inc["type"] == "incremental", inc
    assert "redefined in libvirt from the set" in inc["reason"], inc
    chain = chain_json([pathlib.Path(full["repository_path"]) / "disks/vda.qcow2", pathlib.Path(inc["repository_path"]) / "disks/vda.qcow2"])
    assert images_equal(chain, str(ref))[0]


def test_raw_disk_is_copied_in_full_every_time(ansible, vms, repo, scratch):
    vm = vms.create([DiskSpec("64M", fill=[(0x81, "0", "4M")]), DiskSpec("32M", fmt="raw", fill=[(0x82, "0", "6M")])])
    args = {"name": vm.name, "repository": str(repo)}
    full = ansible("export", args)
    assert {d["target"]: d["method"] for d in full["disks"]} == {"vda": "full", "vdb": "full"}
    vm.write("vda", 0x83, "10M", "1M")
    vm.write("vdb", 0x84, "10M", "1M")
    refs = {t: vm.snapshot_disk(t, scratch / f"{t}.qcow2") for t in ("vda", "vdb")}
    inc = ansible("export", args)
    assert inc["type"] == "incremental"
    assert {d["target"]: d["method"] for d in inc["disks"]} == {"vda": "incremental", "vdb": "full"}
    inc_dir, full_dir = pathlib.Path(inc["repository_path"]), pathlib.Path(full["repository_path"])
    # The raw disk's file holds all its data on its own; no pretend incremental.
    assert allocated_data_bytes(str(inc_dir / "disks/vdb.qcow2")) >= 7 * MIB
    assert images_equal(str(inc_dir / "disks/vdb.qcow2"), str(refs["vdb"]))[0]
    chain = chain_json([full_dir / "disks/vda.qcow2", inc_dir / "disks/vda.qcow2"])
    assert images_equal(chain, str(refs["vda"]))[0]
    cp_xml = vm.dom.checkpointLookupByName(inc["checkpoint"]).getXMLDesc(0)
    assert "name='vdb' checkpoint='no'" in cp_xml


def test_sparse_disk_gives_a_set_of_its_allocated_size(ansible, vms, repo):
    vm = vms.create([DiskSpec("10G", fill=[(0x91, "0", "60M"), (0x92, "5G", "40M")])])
    result = ansible("export", {"name": vm.name, "repository": str(repo)})
    assert result["type"] == "full"
    disk = result["disks"][0]
    assert disk["virtual_size"] == 10 * 1024 * MIB
    set_dir = pathlib.Path(result["repository_path"])
    on_disk = sum(p.stat().st_blocks * 512 for p in set_dir.rglob("*") if p.is_file())
    assert 100 * MIB <= on_disk <= 104 * MIB, on_disk
    assert images_equal(str(vm.disks["vda"]), str(set_dir / "disks/vda.qcow2"))[0]


def test_names_that_are_not_path_or_shell_safe(ansible, vms, repo):
    canary = "vmbackup-canary-" + os.urandom(4).hex()
    # Names libvirt accepts; '/' is refused by libvirt itself and covered below as a non-match.
    for name in [f"a b 'c' \"d\" $(touch {canary}) `touch {canary}`; touch {canary} & | > <", f".. {os.urandom(2).hex()}", "-rf"]:
        vm = vms.create([DiskSpec("16M", fill=[(0xA1, "0", "1M")])], name=name)
        result = ansible("export", {"name": name, "repository": str(repo)})
        assert result["changed"] and not result["failed"], result
        assert result["vm"]["name"] == name
        assert pathlib.Path(result["repository_path"]).parent.parent.name == vm.uuid
        assert manifest_of(pathlib.Path(result["repository_path"]))["vm"]["name"] == name
    for where in (os.getcwd(), "/", "/root", "/tmp", str(repo)):
        assert not os.path.exists(os.path.join(where, canary))
    assert sorted(os.listdir(repo / "vms")) == sorted(v.uuid for v in vms.vms)


@pytest.mark.parametrize("name", ["../../etc", "vm/../../x", "a\nb", "$(reboot)", "no such vm \"'"])
def test_name_that_matches_no_vm_writes_nothing(ansible, repo, name):
    result = ansible("export", {"name": name, "repository": str(repo)})
    assert result["failed"] and result["error_code"] == "VM_NOT_FOUND", result
    assert os.listdir(repo) == []


def _bad_input_cases():
    return [
        ("relative", lambda r: {"repository": "relative/repo"}, "PATH_ESCAPE"),
        ("dotdot", lambda r: {"repository": f"{r}/../escape"}, "PATH_ESCAPE"),
        ("world-writable", lambda r: {"repository": str(_mkdir(r / "ww", 0o777))}, "UNSAFE_TARGET"),
        ("symlink", lambda r: {"repository": str(_symlink(r / "link", r / "real"))}, "UNSAFE_TARGET"),
        ("not-a-repo", lambda r: {"repository": str(_nonempty(r / "other"))}, "UNSAFE_TARGET"),
        ("libvirt-down", lambda r: {"uri": "qemu+unix:///system?socket=/nonexistent/sock"}, "LIBVIRT_UNAVAILABLE"),
        ("incremental-no-parent", lambda r: {"mode": "incremental"}, "PARENT_CHECKPOINT_INVALID"),
        ("unknown-disk", lambda r: {"disks": ["vdz"]}, "DISK_NOT_FOUND"),
        ("bad-period", lambda r: {"period": "../x"}, "INVALID_NAME"),
        ("bad-uuid", lambda r: {"uuid": "not-a-uuid", "name": None}, "INVALID_NAME"),
        ("unknown-uuid", lambda r: {"uuid": "00000000-0000-0000-0000-000000000001", "name": None}, "VM_NOT_FOUND"),
    ]


def _mkdir(path: pathlib.Path, mode: int) -> pathlib.Path:
    path.mkdir()
    os.chmod(path, mode)
    return path


def _symlink(link: pathlib.Path, real: pathlib.Path) -> pathlib.Path:
    real.mkdir(mode=0o711)
    link.symlink_to(real)
    return link


def _nonempty(path: pathlib.Path) -> pathlib.Path:
    path.mkdir(mode=0o700)
    (path / "precious.txt").write_text("not a backup")
    return path


@pytest.mark.parametrize("case,override,code", _bad_input_cases(), ids=[c[0] for c in _bad_input_cases()])
def test_bad_input_fails_with_its_code_and_touches_nothing(ansible, vms, repo_root, case, override, code):
    vm = vms.create([DiskSpec("16M", fill=[(0xB1, "0", "1M")])])
    _mkdir(repo_root / "repo", 0o711)  # an empty directory: export would initialise it
    args = {"name": vm.name, "repository": str(repo_root / "repo")}
    args.update(override(repo_root))
    args = {k: v for k, v in args.items() if v is not None}
    before = tree_state(repo_root)
    result = ansible("export", args)
    assert result["failed"] and result["error_code"] == code, result
    assert result["msg"]
    assert tree_state(repo_root) == before
    assert vm.checkpoints() == []


def test_not_enough_space_is_refused_before_anything_is_written(ansible, vms, repo_root):
    vm = vms.create([DiskSpec("256M", fill=[(0xC1, "0", "100M")])])
    mnt = repo_root / "small"
    mnt.mkdir(mode=0o711)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48M,mode=0711", "tmpfs", str(mnt)], check=True)
    try:
        before = tree_state(mnt)
        result = ansible("export", {"name": vm.name, "repository": str(mnt / "repo"), "create_repository": True})
        assert result["failed"] and result["error_code"] == "TARGET_NO_SPACE", result
        assert result["needed_bytes"] > 100 * MIB
        assert tree_state(mnt) == before
        assert vm.checkpoints() == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_repository_unreachable_for_qemu_is_refused(ansible, vms, repo_root):
    """Push mode only: QEMU writes into the repository itself (pull mode has no such need)."""
    vm = vms.create([DiskSpec("16M")])
    private = _mkdir(repo_root / "private", 0o700)
    result = ansible("export", {"name": vm.name, "repository": str(private / "repo"), "create_repository": True, "transport": "push"})
    assert result["failed"] and result["error_code"] == "TARGET_NOT_ACCESSIBLE", result
    assert os.listdir(private) == []


def test_held_lock_gives_vm_locked(ansible, vms, repo):
    vm = vms.create([DiskSpec("16M")])
    args = {"name": vm.name, "repository": str(repo)}
    ansible("export", args)
    state, checkpoints = tree_state(repo), vm.checkpoints()
    lock = repo / "vms" / vm.uuid / "lock"
    with open(lock, "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        result = ansible("export", dict(args, lock_timeout=1))
    assert result["failed"] and result["error_code"] == "VM_LOCKED", result
    assert tree_state(repo) == state and vm.checkpoints() == checkpoints


def test_killed_run_leaves_no_set_and_the_next_run_cleans_up(ansible, vms, repo, scratch):
    vm = vms.create([DiskSpec("2G", fill=[(0xD1, "0", "1536M")])])
    args = {"name": vm.name, "repository": str(repo)}
    staging = repo / "vms" / vm.uuid / ".incomplete"

    proc = ansible.popen("export", args)
    # Kill while the backup job copies data.
    wait_for_backup_job(vm, staging)
    kill_tree(proc)
    assert sets_of(repo, vm) == []

    result = ansible("export", args)
    assert result["changed"] and result["type"] == "full", result
    assert any("incomplete" in c for c in result["cleaned_up"]), result["cleaned_up"]
    assert list(staging.iterdir()) == []
    assert len(sets_of(repo, vm)) == 1
    assert vm.checkpoints() == [result["checkpoint"]]
    assert images_equal(str(vm.disks["vda"]), str(pathlib.Path(result["repository_path"]) / "disks/vda.qcow2"))[0]


def test_foreign_backup_job_is_refused_and_left_alone(ansible, vms, repo, scratch):
    vm = vms.create([DiskSpec("2G", fill=[(0xE1, "0", "1536M")])])
    target = scratch / "foreign.qcow2"
    vm.dom.backupBegin(
        f"<domainbackup mode='push'><disks><disk name='vda' type='file'><target file='{target}'/>"
        "<driver type='qcow2'/></disk></disks></domainbackup>", None, 0)
    try:
        result = ansible("export", {"name": vm.name, "repository": str(repo)})
        # Left alone: still copying, or (a fast disk, the page cache) already done with a complete
        # copy - an aborted job leaves no complete target.
        foreign_still_running = job_running(vm.dom)
        if not foreign_still_running:
            wait_for(lambda: not job_running(vm.dom), 30, what="the foreign job to end")
            foreign_still_running = images_equal(str(vm.disks["vda"]), str(target))[0]
    finally:
        try:
            vm.dom.abortJob()
        except libvirt.libvirtError:
            pass
    assert result["failed"] and result["error_code"] == "BACKUP_JOB_ACTIVE", result
    assert foreign_still_running, "the module must not abort another tool's job"
    assert os.listdir(repo) == [] and vm.checkpoints() == []


def test_vm_stopping_during_backup_rolls_the_run_back(ansible, vms, repo):
    vm = vms.create([DiskSpec("2G", fill=[(0xF1, "0", "1536M")])])
    args = {"name": vm.name, "repository": str(repo)}
    staging = repo / "vms" / vm.uuid / ".incomplete"
    proc = ansible.popen_result("export", args)
    wait_for_backup_job(vm, staging)
    vm.dom.destroy()
    result = proc.result(timeout=300)
    assert result["failed"] and result["error_code"] in ("VM_STOPPED_DURING_BACKUP", "BACKUP_FAILED"), result
    assert sets_of(repo, vm) == []
    assert list(staging.iterdir()) == []
    assert vm.checkpoints() == []
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(vm.disks["vda"])],
                                     capture_output=True, text=True, check=True).stdout)
    assert not info["format-specific"]["data"].get("bitmaps"), "the failed run's bitmap must not stay in the image"
    # The VM is as the test left it (shut off); the next run takes a copy.
    again = ansible("export", args)
    assert again["changed"] and again["type"] == "copy", again
