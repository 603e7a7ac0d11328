"""vmbackup.libvirt.export chains against a real libvirtd and QEMU: never a wrong point, never stuck.

Each test provokes the accident for real (a disk shrunk and grown back, QEMU killed, a disk image
replaced, a checkpoint lost, a foreign job, a compressed source) and checks the outcome with
qemu-img and libvirt, never only with the module: every restored point is read through its chain
and compared with a reference copy of the disk taken at backup time.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess

import libvirt
import libvirt_qemu
import pytest

from harness import (
    DiskSpec,
    MIB,
    chain_json,
    descendants,
    images_equal,
    job_running,
    module_pids,
    result_and_warnings,
    run,
    tree_state,
    wait_for,
)

IGNORED_KEYS = {"failed", "warnings", "deprecations", "invocation", "_ansible_no_log"}


# ----------------------------------------------------------------------------- helpers
def existing_repo(repo: pathlib.Path) -> pathlib.Path:
    """The repository as an existing empty directory QEMU can traverse (works with and
    without the explicit-creation rule of the trust work)."""
    repo.mkdir(mode=0o711, exist_ok=True)
    os.chmod(repo, 0o711)
    return repo


def set_disk(result: dict, target: str = "vda") -> pathlib.Path:
    return pathlib.Path(result["repository_path"]) / "disks" / f"{target}.qcow2"


def point(results: list[dict], target: str = "vda") -> str:
    """The json: chain of a point: the sets from the full up to the last of ``results``."""
    return chain_json([set_disk(r, target) for r in results])


def assert_point(results: list[dict], ref: pathlib.Path, target: str = "vda") -> None:
    same, out = images_equal(point(results, target), str(ref))
    assert same, out


def image_bitmaps(path: pathlib.Path) -> list[dict]:
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)
    return info["format-specific"]["data"].get("bitmaps") or []


def kill_qemu(vm) -> None:
    """SIGKILL the VM's QEMU process, as a host crash or the OOM killer would."""
    pid = int(pathlib.Path(f"/run/libvirt/qemu/{vm.dom.name()}.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not vm.dom.isActive(), 30, what="libvirt to see QEMU gone")


def export_without_warnings(ansible, args: dict) -> dict:
    """An export run that printed no warning (through the CLI the warnings are not in the result:
    the minimal callback prints them, so result.get("warnings") could never fail)."""
    result, warnings = result_and_warnings(ansible, "export", args)
    assert not warnings, warnings
    return result


# ----------------------------------------------------------------------------- item 4: resize
@pytest.mark.parametrize("how", ["live-blockresize", "shut-off-qemu-img"])
def test_disk_shrunk_and_grown_back_gives_a_full(ansible, vms, repo, scratch, how):
    """A disk shrunk and grown back to the same size: QEMU truncates the bitmaps and leaves the
    re-grown area clean, so an incremental would restore the old data there. The export must
    notice (size sentinel) and take a full."""
    vm = vms.create([DiskSpec("64M", fill=[(0xAB, "0", "64M")])])
    args = {"name": vm.name, "repository": str(existing_repo(repo))}
    full = ansible("export", args)
    assert full["type"] == "full", full

    if how == "live-blockresize":
        vm.dom.blockResize("vda", 32 * MIB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        vm.dom.blockResize("vda", 64 * MIB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    else:
        vm.dom.shutdown()  # QEMU stores its persistent bitmaps on a clean stop
        try:
            wait_for(lambda: not vm.dom.isActive(), 10, what="the VM to shut down")
        except AssertionError:
            vm.dom.destroy()  # no guest OS to honour ACPI: SIGTERM, QEMU still stores the bitmaps
        run(["qemu-img", "resize", "-f", "qcow2", "--shrink", str(vm.disks["vda"]), "32M"])
        run(["qemu-img", "resize", "-f", "qcow2", str(vm.disks["vda"]), "64M"])
        vm.dom.create()
    vm.write("vda", 0xCD, "1M", "1M")
    ref = vm.snapshot_disk("vda", scratch / "ref.qcow2")
    # The bitmap QEMU keeps really does not show the re-grown area (what made the old code wrong).
    dirty = vm.dom.checkpointLookupByName(full["checkpoint"]).getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE)
    assert "size='1048576'" in dirty, dirty

    state, checkpoints = tree_state(repo), vm.checkpoints()
    refused = ansible("export", dict(args, mode="incremental"))
    assert refused["failed"] and refused["error_code"] == "TOPOLOGY_CHANGED", refused
    assert "vda was shrunk" in refused["msg"], refused
    assert tree_state(repo) == state and vm.checkpoints() == checkpoints

    predicted = ansible("export", args, check=True)
    assert predicted["type"] == "full" and "vda was shrunk" in predicted["reason"], predicted
    again = ansible("export", args)
    assert again["type"] == "full" and again["reason"] == predicted["reason"], again
    assert again["chain_id"] != full["chain_id"]
    assert_point([again], ref)
    assert vm.checkpoints() == [again["checkpoint"]]

    # The new chain is armed again: the next run is a normal incremental, and correct.
    vm.write("vda", 0xEF, "40M", "2M")
    ref2 = vm.snapshot_disk("vda", scratch / "ref2.qcow2")
    inc = export_without_warnings(ansible, args)
    assert inc["type"] == "incremental" and inc["parent"] == again["set_id"], inc
    assert_point([again, inc], ref2)
    # Only the newest checkpoint's bitmap and its sentinel stay in the image (QEMU stores them on stop).
    vm.dom.destroy()
    assert sorted(b["name"] for b in image_bitmaps(vm.disks["vda"])) == [inc["checkpoint"], inc["checkpoint"] + ".size"]


def test_disk_grown_only_gives_a_full(ansible, vms, repo, scratch):
    vm = vms.create([DiskSpec("32M", fill=[(0x31, "0", "8M")])])
    args = {"name": vm.name, "repository": str(existing_repo(repo))}
    ansible("export", args)
    vm.dom.blockResize("vda", 48 * MIB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    ref = vm.snapshot_disk("vda", scratch / "ref.qcow2")
    again = ansible("export", args)
    assert again["type"] == "full" and "vda was resized" in again["reason"], again
    assert_point([again], ref)


# ----------------------------------------------------------------------------- item 5: broken bitmaps
@pytest.mark.parametrize("stored", [False, True], ids=["bitmap-never-stored", "bitmap-stored-in-use"])
def test_qemu_killed_gives_a_full_and_removes_the_broken_checkpoint(ansible, vms, repo, scratch, stored):
    """kill -9 of QEMU: a bitmap created in this QEMU run was never stored (missing), one stored
    by an earlier clean stop is loaded as in-use (inconsistent). libvirt then refuses every
    incremental from that checkpoint with "missing or broken bitmap"."""
    vm = vms.create([DiskSpec("64M", fill=[(0x51, "0", "8M")])])
    args = {"name": vm.name, "repository": str(existing_repo(repo))}
    full = ansible("export", args)
    broken = full["checkpoint"]
    if stored:
        vm.dom.destroy()
        assert broken in [b["name"] for b in image_bitmaps(vm.disks["vda"])]
        vm.dom.create()
    vm.write("vda", 0x52, "16M", "1M")
    kill_qemu(vm)
    vm.dom.create()
    vm.write("vda", 0x53, "20M", "1M")
    ref = vm.snapshot_disk("vda", scratch / "ref.qcow2")

    state = tree_state(repo)
    refused = ansible("export", dict(args, mode="incremental"))
    assert refused["failed"] and refused["error_code"] == "PARENT_CHECKPOINT_INVALID", refused
    assert broken in refused["msg"] and "missing or broken bitmap" in refused["msg"], refused
    assert tree_state(repo) == state

    predicted = ansible("export", args, check=True)
    assert predicted["type"] == "full" and broken in predicted["reason"], predicted
    again = ansible("export", args)
    assert again["changed"] and again["type"] == "full", again
    assert broken in again["reason"] and "missing or broken bitmap" in again["reason"], again
    assert again["reason"] == predicted["reason"]
    assert f"deleted the broken checkpoint {broken}" in again["cleaned_up"], again
    assert vm.checkpoints() == [again["checkpoint"]]
    assert_point([again], ref)

    # Converged: the next run is a plain incremental, without a warning, and correct.
    vm.write("vda", 0x54, "30M", "2M")
    ref2 = vm.snapshot_disk("vda", scratch / "ref2.qcow2")
    inc = export_without_warnings(ansible, args)
    assert inc["type"] == "incremental" and inc["parent"] == again["set_id"], inc
    assert_point([again, inc], ref2)
    # No bitmap of the broken checkpoint is left in the image either.
    vm.dom.destroy()
    names = [b["name"] for b in image_bitmaps(vm.disks["vda"])]
    assert not [n for n in names if n.startswith(broken)], names


def test_disk_image_replaced_at_the_same_target_gives_a_full(ansible, vms, repo, scratch):
    vm = vms.create([DiskSpec("64M", fill=[(0x61, "0", "8M")])])
    args = {"name": vm.name, "repository": str(existing_repo(repo))}
    full = ansible("export", args)
    vm.dom.destroy()
    other = vm.workdir / "other.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x62 4M 4M", str(other)])
    os.replace(other, vm.disks["vda"])
    vm.dom.create()
    ref = vm.snapshot_disk("vda", scratch / "ref.qcow2")

    again = ansible("export", args)
    assert again["type"] == "full", again
    assert full["checkpoint"] in again["reason"] and "missing or broken bitmap" in again["reason"], again
    assert vm.checkpoints() == [again["checkpoint"]]
    assert_point([again], ref)
    vm.write("vda", 0x63, "30M", "1M")
    ref2 = vm.snapshot_disk("vda", scratch / "ref2.qcow2")
    inc = export_without_warnings(ansible, args)
    assert inc["type"] == "incremental", inc
    assert_point([again, inc], ref2)


# ----------------------------------------------------------------------------- item 6: lost checkpoints
def test_lost_checkpoint_is_redefined_at_every_position_of_a_chain(ansible, vms, repo, scratch):
    """libvirt forgets the newest checkpoint (metadata only: the bitmap stays in QEMU) after the
    full, the 1st and the 2nd incremental. Past the first set the saved XML names a parent
    that was retired, which libvirt refuses unless the parent is stripped."""
    vm = vms.create([DiskSpec("64M", fill=[(0x71, "0", "4M")])])
    args = {"name": vm.name, "repository": str(existing_repo(repo))}
    results = [ansible("export", args)]
    assert results[0]["type"] == "full"
    for position in range(3):
        newest = results[-1]["checkpoint"]
        vm.dom.checkpointLookupByName(newest).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        assert vm.checkpoints() == []
        vm.write("vda", 0x72 + position, f"{8 + 4 * position}M", "1M")
        ref = vm.snapshot_disk("vda", scratch / f"ref{position}.qcow2")
        inc = ansible("export", args)
        assert inc["type"] == "incremental" and inc["parent"] == results[-1]["set_id"], (position, inc)
        assert f"checkpoint {newest}, redefined in libvirt from the set" in inc["reason"], inc
        results.append(inc)
        assert_point(results, ref)
        assert vm.checkpoints() == [inc["checkpoint"]]


def qemu_bitmaps(vm, target: str = "vda") -> list[str]:
    """Names of the dirty bitmaps QEMU holds for the disk now (QMP query-block)."""
    out = json.loads(libvirt_qemu.qemuMonitorCommand(vm.dom, json.dumps({"execute": "query-block"}), 0))
    for dev in out["return"]:
        inserted = dev.get("inserted") or {}
        if inserted.get("file") == str(vm.disks[target]):
            return sorted(b["name"] for b in inserted.get("dirty-bitmaps", []) if b.get("name"))
    raise AssertionError(f"{target} not in query-block")


def test_checkpoint_lost_for_good_leaves_no_bitmap_behind(ansible, vms, repo, scratch):
    """libvirt lost the checkpoint and the set cannot give it back (its checkpoint.xml is gone):
    the run takes a full, and the orphaned bitmap (QEMU would update it on every guest write,
    forever) and its sentinel are removed; a foreign bitmap is left alone."""
    vm = vms.create([DiskSpec("64M", fill=[(0x91, "0", "4M")])])
    args = {"name": vm.name, "repository": str(existing_repo(repo))}
    full = ansible("export", args)
    cp = full["checkpoint"]
    vm.dom.checkpointLookupByName(cp).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    libvirt_qemu.qemuMonitorCommand(vm.dom, json.dumps({"execute": "block-dirty-bitmap-add", "arguments": {
        "node": "libvirt-1-format", "name": "other-tool", "persistent": True}}), 0)
    xml = pathlib.Path(full["repository_path"]) / "checkpoint.xml"
    os.chmod(xml.parent, 0o700)
    xml.unlink()
    assert qemu_bitmaps(vm) == sorted([cp, cp + ".size", "other-tool"])
    again = ansible("export", args)
    assert again["type"] == "full" and "no longer exists in libvirt" in again["reason"], again
    assert qemu_bitmaps(vm) == sorted([again["checkpoint"], again["checkpoint"] + ".size", "other-tool"])
    assert f"removed the orphaned bitmap {cp} of vda" in again["cleaned_up"], again


# ----------------------------------------------------------------------------- item 7: foreign jobs
def test_failed_run_does_not_abort_a_job_started_after_its_own(ansible, vms, repo, scratch):
    """Our job ends; another tool starts a backup job on the VM; then our run fails (cancelled
    by SIGTERM, as an AWX cancel) and rolls back: the other job must run on to completion."""
    vm = vms.create([DiskSpec("1G", fill=[(0x81, "0", "900M")]), DiskSpec("512M", fill=[(0x82, "0", "480M")])])
    args = {"name": vm.name, "repository": str(existing_repo(repo)), "disks": ["vdb"]}
    proc = ansible.popen_result("export", args)
    wait_for(lambda: job_running(vm.dom), 120, interval=0.005, what="our backup job to start")
    wait_for(lambda: not job_running(vm.dom), 120, interval=0.005, what="our backup job to end")
    pids = [proc.proc.pid] + descendants(proc.proc.pid)
    for pid in pids:  # freeze our run between its job and its commit
        os.kill(pid, signal.SIGSTOP)
    sets = repo / "vms" / vm.uuid / "sets"
    assert not sets.is_dir() or not any(p.is_dir() for p in sets.iterdir()), "the run committed before it could be frozen"
    target = scratch / "foreign.qcow2"
    vm.dom.backupBegin(
        f"<domainbackup mode='push'><disks><disk name='vda' type='file'><target file='{target}'/>"
        "<driver type='qcow2'/></disk><disk name='vdb' backup='no'/></disks></domainbackup>", None, 0)
    try:
        module = module_pids(proc.proc, "export")
        assert module, "no module process found"
        for pid in module:
            os.kill(pid, signal.SIGTERM)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        result = proc.result(timeout=300)
        assert result["failed"] and result.get("error_code") == "CANCELLED", result
        wait_for(lambda: not job_running(vm.dom), 300, interval=0.1, what="the foreign job to end")
        done = vm.dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    finally:
        if job_running(vm.dom):
            vm.dom.abortJob()
    assert done.get("type") == 3, f"the foreign job did not complete: {done}"
    assert images_equal(str(vm.disks["vda"]), str(target))[0]
    # Our run is rolled back: no set, no staging, no checkpoint.
    assert not sets.is_dir() or not [p for p in sets.iterdir() if p.is_dir()]
    assert vm.checkpoints() == []


# ----------------------------------------------------------------------------- item 13: space
def test_compressed_source_whose_data_exceeds_free_space_is_refused(ansible, vms, repo_root):
    """A compressed qcow2 occupies a few hundred KiB on the host but holds 100 MiB of data:
    the pre-check must count the data (qemu-img map), not the file size."""
    vm = vms.create([DiskSpec("128M", fill=[(0xC1, "0", "100M")])], running=False)
    compressed = vm.workdir / "compressed.qcow2"
    run(["qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", str(vm.disks["vda"]), str(compressed)])
    os.replace(compressed, vm.disks["vda"])
    assert os.stat(vm.disks["vda"]).st_blocks * 512 < 8 * MIB  # what actual-size reports
    vm.dom.create()
    mnt = repo_root / "small"
    mnt.mkdir(mode=0o711)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40M,mode=0711", "tmpfs", str(mnt)], check=True)
    try:
        repo = existing_repo(mnt / "repo")
        before = tree_state(mnt)
        result = ansible("export", {"name": vm.name, "repository": str(repo)})
        assert result["failed"] and result["error_code"] == "TARGET_NO_SPACE", result
        assert result["needed_bytes"] > 100 * MIB, result
        assert tree_state(mnt) == before
        assert vm.checkpoints() == []
        assert not [b for b in image_bitmaps(vm.disks["vda"]) if b["name"].startswith("vmbackup-")]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ----------------------------------------------------------------------------- item 16: result fields
def test_rerun_and_check_mode_return_the_same_fields_as_the_run_that_worked(ansible, vms, repo):
    vm = vms.create([DiskSpec("32M", fill=[(0xD1, "0", "2M")])])
    args = {"name": vm.name, "repository": str(existing_repo(repo)), "period": "2026-W49"}
    predicted = ansible("export", args, check=True)
    worked = ansible("export", args)
    rerun = ansible("export", args)
    rerun_check = ansible("export", args, check=True)
    assert worked["changed"] and not rerun["changed"] and not rerun_check["changed"], (worked, rerun)
    keys = set(worked) - IGNORED_KEYS
    for other in (predicted, rerun, rerun_check):
        assert set(other) - IGNORED_KEYS == keys, sorted(keys ^ (set(other) - IGNORED_KEYS))
    for other in (predicted, rerun, rerun_check):
        assert set(other["vm"]) == set(worked["vm"]) == {"name", "uuid", "state"}
        assert other["vm"]["state"] == "running"
        assert [set(d) for d in other["disks"]] == [set(d) for d in worked["disks"]]
    assert rerun["set_id"] == worked["set_id"]
