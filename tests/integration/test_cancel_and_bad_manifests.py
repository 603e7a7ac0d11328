"""A cancelled run (SIGTERM/SIGINT, what an AWX job cancel sends) rolls back like any failure;
manifests missing fields and out-of-range times fail with an error code, never a traceback.
Checked with libvirt (jobs, checkpoints, domains) and the file system, not with the module."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import stat
import uuid

import libvirt
import pytest

from harness import (
    DiskSpec,
    images_equal,
    job_running,
    module_pids,
    tree_state,
    wait_for,
)


def files_under(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_sigterm_during_a_live_backup_rolls_back_and_says_cancelled(ansible, vms, repo):
    vm = vms.create([DiskSpec("2G", fill=[(0xC1, "0", "1536M")])])
    args = {"name": vm.name, "repository": str(repo)}
    staging = repo / "vms" / vm.uuid / ".incomplete"
    pending = ansible.popen_result("export", args)
    wait_for(lambda: job_running(vm.dom) and files_under(staging), timeout=120, what="the backup job to copy data")
    (pid,) = wait_for(lambda: module_pids(pending.proc, "export"), timeout=30, what="the module process")
    os.kill(pid, signal.SIGTERM)
    result = pending.result(timeout=300)

    assert result["failed"] and result["error_code"] == "CANCELLED", result
    assert "SIGTERM" in result["msg"] and "Traceback" not in json.dumps(result), result
    # Rolled back: no job, no checkpoint, no staging data, no set; the VM still runs.
    assert not job_running(vm.dom) and vm.checkpoints() == []
    assert list(staging.iterdir()) == [] and list((repo / "vms" / vm.uuid / "sets").iterdir()) == []
    assert vm.dom.isActive()
    # The next run starts clean and takes a full that equals the disk.
    again = ansible("export", args)
    assert again["changed"] and again["type"] == "full" and again["cleaned_up"] == [], again
    assert images_equal(str(vm.disks["vda"]), str(pathlib.Path(again["repository_path"]) / "disks/vda.qcow2"))[0]


def test_sigint_during_a_restore_removes_every_partial_image_and_defines_nothing(ansible, conn, vms, repo, repo_root):
    vm = vms.create([DiskSpec("2G", fill=[(0xC2, "0", "1536M")])], running=False)
    backup = ansible("export", {"name": vm.name, "repository": str(repo)})
    assert backup["changed"] and backup["type"] == "copy", backup
    disk_dir = repo_root / "restore-target"
    disk_dir.mkdir(mode=0o711)
    before = tree_state(repo)
    name = f"vmbt-cancel-{uuid.uuid4().hex[:6]}"
    pending = ansible.popen_result("restore", {"name": vm.name, "repository": str(repo), "restore_as": name,
                                               "disk_dir": str(disk_dir)})
    # Cancel while qemu-img writes the image.
    wait_for(lambda: any(".partial" in p.name and p.stat().st_size > 0 for p in disk_dir.iterdir()), timeout=120,
             what="the restore to write its image")
    (pid,) = wait_for(lambda: module_pids(pending.proc, "restore"), timeout=30, what="the module process")
    os.kill(pid, signal.SIGINT)
    result = pending.result(timeout=300)

    assert result["failed"] and result["error_code"] == "CANCELLED" and "SIGINT" in result["msg"], result
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(name)
    assert list(disk_dir.iterdir()) == [], "partial images and the journal must go"
    assert tree_state(repo) == before, "a cancelled restore must not touch the repository"


# ----------------------------------------------------------------------------- bad manifests, bad times
@pytest.fixture
def copy_set(ansible, vms, repo):
    vm = vms.create([DiskSpec("16M", fill=[(0xC3, "0", "1M")])], running=False)
    result = ansible("export", {"name": vm.name, "repository": str(repo)})
    assert result["changed"], result
    return vm, pathlib.Path(result["repository_path"])


def _rewrite_manifest(set_dir: pathlib.Path, change) -> None:
    path = set_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    os.chmod(set_dir, 0o700)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.chmod(path, stat.S_IRUSR)


@pytest.mark.parametrize("field", ["virtual_size", "target", "size"])
def test_manifest_disk_entry_missing_a_field_is_repository_format_in_verify_and_restore(ansible, repo, repo_root, copy_set,
                                                                                        field):
    vm, set_dir = copy_set
    _rewrite_manifest(set_dir, lambda m: m["disks"][0].pop(field))
    disk_dir = repo_root / "restored"
    disk_dir.mkdir(mode=0o711)

    # The VM's name is read from a readable manifest only: the uuid finds a VM whose only set is not.
    verified = ansible("verify", {"uuid": vm.uuid, "repository": str(repo)})
    assert verified["failed"] and verified["error_code"] == "REPOSITORY_FORMAT", verified
    assert "Traceback" not in json.dumps(verified) and field in verified["findings"][0]["msg"], verified
    restored = ansible("restore", {"uuid": vm.uuid, "repository": str(repo), "restore_as": "vmbt-never",
                                   "disk_dir": str(disk_dir)})
    assert restored["failed"] and restored.get("error_code") == "REPOSITORY_FORMAT", restored
    assert field in restored["msg"] and list(disk_dir.iterdir()) == []


@pytest.mark.parametrize("as_of", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"])
def test_as_of_out_of_range_is_invalid_argument(ansible, repo, copy_set, as_of):
    vm, _set_dir = copy_set
    for check in (True, False):
        result = ansible("restore", {"name": vm.name, "repository": str(repo), "as_of": as_of}, check=check)
        assert result["failed"] and result["error_code"] == "INVALID_ARGUMENT", result
        assert "out of range" in result["msg"], result


def test_a_damaged_newest_manifest_makes_the_next_export_a_full_not_a_failure(ansible, vms, repo):
    """One damaged set must not stop every later backup of the VM (the class "stuck"): it is
    never a parent, a period check skips it, and verify still reports it."""
    vm = vms.create([DiskSpec("32M", fill=[(0xC4, "0", "2M")])])
    args = {"name": vm.name, "repository": str(repo), "period": "day-1"}
    first = ansible("export", args)
    assert first["changed"] and first["type"] == "full", first
    manifest = pathlib.Path(first["repository_path"]) / "manifest.json"
    os.chmod(manifest.parent, 0o700)
    os.chmod(manifest, 0o600)
    manifest.write_bytes(manifest.read_bytes()[:-30])  # cut: no longer JSON
    os.chmod(manifest, 0o400)

    again = ansible("export", dict(args, period="day-2"))
    assert again["changed"] and again["type"] == "full", again
    assert f"the last set {first['set_id']} is unreadable" in again["reason"], again
    assert images_equal(str(vm.disks["vda"]), str(pathlib.Path(again["repository_path"]) / "disks/vda.qcow2"))[0]
    assert vm.checkpoints() == [again["checkpoint"]], "the damaged set's checkpoint is retired like any other"
    verified = ansible("verify", {"uuid": vm.uuid, "repository": str(repo), "fail_on_error": False})
    assert verified["outcome"] == "failed" and verified["failed_sets"] == [first["set_id"]], verified
    assert {f["code"] for f in verified["findings"]} == {"REPOSITORY_FORMAT"}, verified
