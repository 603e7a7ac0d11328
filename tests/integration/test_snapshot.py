"""vmbackup.libvirt.snapshot against real libvirt/QEMU: create, merge back, revert, check mode,
idempotence, foreign snapshots and a merge that cannot finish.

Data is checked through other paths than the module: the guest's own files (guest-exec), or for
disk-only VMs qemu-img compare against reference copies; disk sources with the domain XML;
overlays with qemu-img info and the file system.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import uuid

import libvirt
import libvirt_qemu
import pytest

from harness import DiskSpec, expect_error, expect_ok, images_equal, parse_disk_sources, run, tree_state

PREFIX = "vmbackup-snap-"


def sources(dom, inactive: bool = False) -> dict[str, str]:
    return parse_disk_sources(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0))


def snapshot_names(dom) -> list[str]:
    return sorted(s.getName() for s in dom.listAllSnapshots(0))


def backing_chain(path) -> list[str]:
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", "--backing-chain", str(path)]).stdout)
    return [i["filename"] for i in info]


def flush(vm, target: str) -> None:
    """Make QEMU write its cached qcow2 metadata, so that the live image reads right from outside."""
    libvirt_qemu.qemuMonitorCommand(vm.dom, f'qemu-io -d /machine/peripheral/ua-{target}/virtio-backend "flush"',
                                    libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def copy_active(vm, target: str, dest: pathlib.Path) -> pathlib.Path:
    """A reference copy of what the disk reads now, through its whole active chain."""
    run(["qemu-img", "convert", "-U", "-O", "qcow2", sources(vm.dom)[target], str(dest)])
    return dest


def vm_state(vm) -> dict:
    """VM XML (live and persistent), snapshots (XML), checkpoints and every file of its directory."""
    dom = vm.dom
    return {
        "xml": dom.XMLDesc(0), "inactive": dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
        "snapshots": {s.getName(): s.getXMLDesc(0) for s in dom.listAllSnapshots(0)},
        "checkpoints": {c.getName(): c.getXMLDesc(0) for c in dom.listAllCheckpoints(0)},
        "files": tree_state(vm.workdir),
        "active": dom.isActive(),
    }


def drop_snapshot_metadata(dom) -> None:
    """libvirt refuses to undefine a domain with snapshots: forget them (children first)."""
    try:
        for s in reversed(dom.listAllSnapshots(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL)):
            s.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    except libvirt.libvirtError:
        pass


@pytest.fixture(autouse=True)
def _snapshots_dropped(request):
    """Before the VM factories clean up, the test's VMs lose their snapshot metadata (the
    factories are set up first, so they are torn down after this)."""
    factories = [request.getfixturevalue(f) for f in ("vms", "guests") if f in request.fixturenames]
    yield
    for factory in factories:
        for vm in list(getattr(factory, "vms", [])) + list(getattr(factory, "guests", [])):
            drop_snapshot_metadata(vm.dom)


def snap(ansible, vm, check=False, **args):
    return ansible("snapshot", dict({"name": vm.name}, **args), check=check)


def test_disk_vm_create_merge_check_mode_and_idempotence(ansible, vms, tmp_path):
    """Two disks of a running disk-only VM with a backup checkpoint: check mode, create, present
    again, merge back; every point compared with reference copies."""
    vm = vms.create(disks=[DiskSpec(fill=[(0x11, "0", "4M")]), DiskSpec(size="32M")])
    vm.dom.checkpointCreateXML("<domaincheckpoint><name>vmbackup-t0000001-1</name><disks><disk name='vda' checkpoint='bitmap'/>"
                               "<disk name='vdb' checkpoint='bitmap'/></disks></domaincheckpoint>", 0)
    vm.write("vda", 0x22, "4M", "2M")
    ref_a = vm.snapshot_disk("vda", tmp_path / "a.qcow2")

    before = vm_state(vm)
    predicted = snap(ansible, vm, check=True, snapshot="s1")
    assert predicted["changed"] and not predicted["failed"], predicted
    assert vm_state(vm) == before, "check mode changed the VM, its snapshots, checkpoints or files"
    assert predicted["snapshots"] == [PREFIX + "s1"]
    # --diff: the snapshot list before and after, as the callback prints it
    shown = subprocess.run(ansible.argv("snapshot", {"name": vm.name, "snapshot": "s1"}, check=True) + ["--diff"],
                           env=ansible.env, capture_output=True, text=True, check=False).stdout
    print(shown)
    assert f'+        "{PREFIX}s1"' in shown, shown
    assert vm_state(vm) == before

    created = expect_ok(snap(ansible, vm, snapshot="s1", quiesce="never"))
    assert created["snapshot"] == PREFIX + "s1" and created["consistency"] == "crash"
    assert [d["overlay"] for d in created["disks"]] == [d["overlay"] for d in predicted["disks"]]
    now = sources(vm.dom)
    for target, image in vm.disks.items():
        overlay = f"{image}.{PREFIX}s1.qcow2"
        assert now[target] == overlay and sources(vm.dom, inactive=True)[target] == overlay
        assert backing_chain(overlay) == [overlay, str(image)]
    assert snapshot_names(vm.dom) == [PREFIX + "s1"]

    assert not snap(ansible, vm, check=True, snapshot="s1")["changed"]
    again = snap(ansible, vm, snapshot="s1")
    assert not again["changed"] and not again["failed"], again
    assert snapshot_names(vm.dom) == [PREFIX + "s1"]

    vm.write("vda", 0x33, "8M", "1M")
    ref_b = copy_active(vm, "vda", tmp_path / "b.qcow2")
    # the base image still holds the snapshot's point
    assert images_equal(str(vm.disks["vda"]), str(ref_a))[0]

    before = vm_state(vm)
    predicted = snap(ansible, vm, check=True, snapshot="s1", state="absent")
    assert predicted["changed"] and vm_state(vm) == before
    merged = expect_ok(snap(ansible, vm, snapshot="s1", state="absent"))
    assert sorted(merged["removed_files"]) == sorted(predicted["removed_files"])
    assert sources(vm.dom) == {t: str(p) for t, p in vm.disks.items()} == sources(vm.dom, inactive=True)
    for image in vm.disks.values():
        assert not os.path.exists(f"{image}.{PREFIX}s1.qcow2")
        assert backing_chain(image) == [str(image)]
    flush(vm, "vda")
    assert images_equal(str(vm.disks["vda"]), str(ref_b))[0], "merged disk lost data"
    assert snapshot_names(vm.dom) == []
    # the backup checkpoint survived the create and the merge, with its bitmap (3 MiB dirty on vda)
    cp = vm.dom.checkpointLookupByName("vmbackup-t0000001-1").getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE)
    assert "size='3145728'" in cp, cp

    assert not snap(ansible, vm, check=True, snapshot="s1", state="absent")["changed"]
    gone = snap(ansible, vm, snapshot="s1", state="absent")
    assert not gone["changed"] and not gone["failed"], gone


def test_disk_vm_revert_drops_later_snapshots(ansible, vms, tmp_path):
    """s1, write, s2, write; revert to s1: the disk reads as at s1, s2 and its overlay are gone;
    a second revert changes nothing; a revert to shutoff, then a shut-off merge."""
    vm = vms.create(disks=[DiskSpec(fill=[(0x11, "0", "2M")])])
    image = vm.disks["vda"]
    vm.dom.checkpointCreateXML("<domaincheckpoint><name>vmbackup-t0000003-1</name></domaincheckpoint>", 0)
    vm.write("vda", 0x44, "10M", "1M")  # 1 MiB changed since the checkpoint at s1
    expect_ok(snap(ansible, vm, snapshot="s1", quiesce="never"))
    vm.write("vda", 0x22, "2M", "2M")
    ref_s2 = copy_active(vm, "vda", tmp_path / "s2.qcow2")
    expect_ok(snap(ansible, vm, snapshot="s2", quiesce="never"))
    vm.write("vda", 0x33, "4M", "2M")
    o1, o2 = f"{image}.{PREFIX}s1.qcow2", f"{image}.{PREFIX}s2.qcow2"
    assert sources(vm.dom)["vda"] == o2

    before = vm_state(vm)
    predicted = snap(ansible, vm, check=True, snapshot="s1", state="reverted")
    assert predicted["changed"] and predicted["dropped_snapshots"] == [PREFIX + "s2"], predicted
    assert vm_state(vm) == before
    reverted = expect_ok(snap(ansible, vm, snapshot="s1", state="reverted"))
    assert reverted["dropped_snapshots"] == [PREFIX + "s2"] and reverted["vm"]["state"] == "running"
    assert o2 in reverted["removed_files"] and not os.path.exists(o2), json.dumps(reverted)
    assert vm.dom.isActive() and sources(vm.dom)["vda"] == o1 == sources(vm.dom, inactive=True)["vda"]
    assert backing_chain(o1) == [o1, str(image)]
    assert snapshot_names(vm.dom) == [PREFIX + "s1"]
    # the disk reads exactly the s1 point: the base image, nothing on top
    assert images_equal(o1, str(image))[0]
    assert not images_equal(o1, str(ref_s2))[0]
    assert vm.dom.snapshotCurrent(0).getName() == PREFIX + "s1"
    # the checkpoint from before s1 is still valid: libvirt reads its bitmap through the chain,
    # and what changed since it is what changed up to s1 (1 MiB), not the discarded writes
    assert reverted["bitmaps_kept"] == ["vda:vmbackup-t0000003-1"]
    cp = vm.dom.checkpointLookupByName("vmbackup-t0000003-1").getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE)
    assert "size='1048576'" in cp, cp

    again = snap(ansible, vm, snapshot="s1", state="reverted", run_state="running")
    assert not again["changed"] and not again["failed"], again

    off = expect_ok(snap(ansible, vm, snapshot="s1", state="reverted", run_state="shutoff"))
    assert off["vm"]["state"] == "shutoff" and not vm.dom.isActive()

    # shut off: the merge is libvirt's qemu-img commit
    merged = expect_ok(snap(ansible, vm, snapshot="s1", state="absent"))
    assert merged["removed_files"] == [o1] and not os.path.exists(o1)
    assert sources(vm.dom, inactive=True)["vda"] == str(image) and backing_chain(image) == [str(image)]
    assert snapshot_names(vm.dom) == []


def test_foreign_snapshots_are_listed_and_left_alone(ansible, vms):
    vm = vms.create()
    image = vm.disks["vda"]
    foreign_overlay = f"{image}.f1"
    run(["virsh", "-c", "qemu:///system", "snapshot-create-as", vm.name, "s9", "--disk-only", "--atomic",
         "--diskspec", f"vda,snapshot=external,file={foreign_overlay}"])
    # a bare name that equals the foreign snapshot's: absent never deletes it
    gone = snap(ansible, vm, snapshot="s9", state="absent")
    assert not gone["changed"] and not gone["failed"] and "foreign" in gone["msg"], gone
    assert snapshot_names(vm.dom) == ["s9"] and os.path.exists(foreign_overlay)
    missing = expect_error(snap(ansible, vm, snapshot="s9", state="reverted"), "SNAPSHOT_NOT_FOUND")
    assert "s9" in missing["snapshots"]

    ours = expect_ok(snap(ansible, vm, snapshot="s9", quiesce="never"))
    assert ours["snapshots"] == ["s9", PREFIX + "s9"]
    # a foreign snapshot after ours: a revert to ours would drop it, so it is refused, untouched
    foreign_later = f"{image}.f2"
    run(["virsh", "-c", "qemu:///system", "snapshot-create-as", vm.name, "manual-2", "--disk-only", "--atomic",
         "--diskspec", f"vda,snapshot=external,file={foreign_later}"])
    before = vm_state(vm)
    expect_error(snap(ansible, vm, snapshot="s9", state="reverted"), "SNAPSHOT_FOREIGN")
    assert vm_state(vm) == before

    # named explicitly, a foreign snapshot is merged like ours
    expect_ok(snap(ansible, vm, snapshot="manual-2", foreign=True, state="absent"))
    assert not os.path.exists(foreign_later) and snapshot_names(vm.dom) == sorted(["s9", PREFIX + "s9"])
    expect_ok(snap(ansible, vm, snapshot="s9", state="absent"))
    assert snapshot_names(vm.dom) == ["s9"] and sources(vm.dom)["vda"] == foreign_overlay

    # two runs at once: one creates, the other (decided again under the per-VM lock) finds it
    runs = [ansible.popen_result("snapshot", {"name": vm.name, "snapshot": "both", "quiesce": "never"}) for dummy in range(2)]
    results = [r.result(timeout=120) for r in runs]
    assert sorted(r["changed"] for r in results) == [False, True] and not any(r["failed"] for r in results), [r["msg"] for r in results]
    assert snapshot_names(vm.dom) == sorted(["s9", PREFIX + "both"])


def test_shut_off_vm_with_checkpoint_is_refused_untouched(ansible, vms):
    vm = vms.create(running=False)
    vm.dom.create()
    vm.dom.checkpointCreateXML("<domaincheckpoint><name>vmbackup-t0000002-1</name></domaincheckpoint>", 0)
    vm.dom.destroy()
    before = vm_state(vm)
    for check in (True, False):
        expect_error(snap(ansible, vm, check=check, snapshot="s1"), "SNAPSHOT_UNSUPPORTED")
    assert vm_state(vm) == before


@pytest.fixture
def small_fs():
    """A 40 MiB tmpfs under the libvirt images directory: a base image there can fill it."""
    path = pathlib.Path("/var/lib/libvirt/images") / f"vmbt-small-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o755)
    run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0755", "tmpfs", str(path)])
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)
    path.rmdir()


def test_merge_that_cannot_finish_leaves_vm_on_its_overlay(ansible, conn, domain_type, small_fs, tmp_path):
    """A real ENOSPC: the snapshot's overlay holds 16 MiB that the base image's full file system
    cannot take. The merge fails with COMMIT_FAILED, the VM keeps running on its overlay with all
    its data, the snapshot is kept and marked; once there is space, absent merges it."""
    from harness import Vm, destroy_vm
    image = small_fs / "vda.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"])
    name = f"vmbt-enospc-{uuid.uuid4().hex[:8]}"
    xml = (f"<domain type='{domain_type}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
           "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices><disk type='file' device='disk'>"
           f"<driver name='qemu' type='qcow2'/><source file='{image}'/><target dev='vda' bus='virtio'/>"
           "<alias name='ua-vda'/></disk></devices></domain>")
    dom = conn.defineXML(xml)
    try:
        dom.create()
        vm = Vm(conn, dom, name, small_fs, {"vda": image}, {"vda": "qcow2"})
        expect_ok(snap(ansible, vm, snapshot="s1", quiesce="never"))
        overlay = f"{image}.{PREFIX}s1.qcow2"
        vm.write("vda", 0x5a, "0", "16M")
        ref = copy_active(vm, "vda", tmp_path / "ref.qcow2")
        filler = small_fs / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True, check=False)  # until ENOSPC

        failed = expect_error(snap(ansible, vm, snapshot="s1", state="absent"), "COMMIT_FAILED")
        assert "No space left" in failed["msg"] and failed["written"] == [str(image)], failed
        assert dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert sources(dom)["vda"] == overlay == sources(dom, inactive=True)["vda"]
        assert backing_chain(overlay) == [overlay, str(image)]
        flush(vm, "vda")
        assert images_equal(overlay, str(ref))[0], "the VM's data changed"
        assert snapshot_names(dom) == [PREFIX + "s1"] and os.path.exists(overlay)
        assert "merge failed" in dom.snapshotLookupByName(PREFIX + "s1").getXMLDesc(0)
        # part of the overlay may be in the base now: a revert to s1 would return a mix
        expect_error(snap(ansible, vm, snapshot="s1", state="reverted"), "SNAPSHOT_UNSUPPORTED")

        filler.unlink()
        expect_ok(snap(ansible, vm, snapshot="s1", state="absent"))
        assert sources(dom)["vda"] == str(image) and not os.path.exists(overlay)
        flush(vm, "vda")
        assert images_equal(str(image), str(ref))[0]
    finally:
        drop_snapshot_metadata(dom)
        destroy_vm(dom)


def test_guest_snapshot_revert_merge(ansible, guests, tmp_path):
    """The tiny guest: write, snapshot (frozen through the agent), write more, revert: the guest
    sees the first state; write again, merge: the VM runs on its original disk with all data.
    Then a memory snapshot: the revert restores the running guest from the memory file."""
    g = guests.create()
    image = str(g.paths["vda"])
    g.write_file("/data/a", b"first")
    created = expect_ok(snap(ansible, g, snapshot="s1", quiesce="required", description="before the change"))
    assert created["consistency"] == "application" and created["quiesce"]["frozen"], created
    assert g.fsfreeze_status() == "thawed"
    overlay = f"{image}.{PREFIX}s1.qcow2"
    assert sources(g.dom)["vda"] == overlay
    g.write_file("/data/a", b"second")
    g.write_file("/data/b", b"later")

    reverted = expect_ok(snap(ansible, g, snapshot="s1", state="reverted"))  # as_snapshot: running
    assert reverted["vm"]["state"] == "running"
    g.wait_agent(90)
    assert g.read_file("/data/a") == b"first"
    with pytest.raises(FileNotFoundError):
        g.read_file("/data/b")

    g.write_file("/data/c", b"after the revert")
    merged = expect_ok(snap(ansible, g, snapshot="s1", state="absent"))
    assert merged["removed_files"] == [overlay] and not os.path.exists(overlay)
    assert sources(g.dom) == {"vda": image} == sources(g.dom, inactive=True)
    assert backing_chain(image) == [image] and snapshot_names(g.dom) == []
    assert g.read_file("/data/a") == b"first" and g.read_file("/data/c") == b"after the revert"

    # memory: the revert resumes the guest where it was (no boot), without what came later
    g.write_file("/data/m", b"in memory snapshot")
    mem = expect_ok(snap(ansible, g, snapshot="m1", memory=True))
    assert mem["memory_file"] and os.path.exists(mem["memory_file"])
    g.write_file("/data/later", b"discarded")
    g.console_log.write_text("")
    expect_ok(snap(ansible, g, snapshot="m1", state="reverted"))
    g.wait_agent(30)
    # /init prints this on every boot (the kernel's own banner is silenced by `quiet`)
    assert "vmbackup-guest: init" not in g.console(), "the guest booted instead of resuming"
    assert g.read_file("/data/m") == b"in memory snapshot"
    with pytest.raises(FileNotFoundError):
        g.read_file("/data/later")
    gone = expect_ok(snap(ansible, g, snapshot="m1", state="absent"))
    assert mem["memory_file"] in gone["removed_files"] and not os.path.exists(mem["memory_file"])
    assert sources(g.dom) == {"vda": image}

    # no agent: required fails before any snapshot, auto falls back to crash and says why
    g.stop_agent()
    files = sorted(os.listdir(g.workdir))
    failed = expect_error(snap(ansible, g, snapshot="q1", quiesce="required", quiesce_timeout=3), "QUIESCE_FAILED")
    assert snapshot_names(g.dom) == [] and sources(g.dom) == {"vda": image} and sorted(os.listdir(g.workdir)) == files, failed
    crash = expect_ok(snap(ansible, g, snapshot="q1", quiesce_timeout=3))
    assert crash["consistency"] == "crash" and crash["quiesce"]["reason"], crash


def test_intermediate_merge_orphan_layers_and_shared_images(ansible, vms, conn, domain_type, tmp_path):
    """An older snapshot merged while a later one is active (intermediate commit); a layer whose
    snapshot metadata is gone is discarded by a revert; an image another domain uses is never
    merged into or removed (IMAGE_IN_USE, nothing changed)."""
    from harness import destroy_vm
    vm = vms.create(disks=[DiskSpec(fill=[(0x11, "0", "1M")])])
    image = str(vm.disks["vda"])
    o1, o2, o3 = (f"{image}.{PREFIX}{n}.qcow2" for n in ("s1", "s2", "s3"))
    expect_ok(snap(ansible, vm, snapshot="s1", quiesce="never"))
    vm.write("vda", 0x22, "1M", "1M")
    expect_ok(snap(ansible, vm, snapshot="s2", quiesce="never"))
    vm.write("vda", 0x33, "2M", "1M")
    ref = copy_active(vm, "vda", tmp_path / "ref.qcow2")

    merged = expect_ok(snap(ansible, vm, snapshot="s1", state="absent"))
    assert merged["removed_files"] == [o1] and not os.path.exists(o1)
    assert sources(vm.dom)["vda"] == o2 and backing_chain(o2) == [o2, image]
    assert snapshot_names(vm.dom) == [PREFIX + "s2"]
    flush(vm, "vda")
    assert images_equal(o2, str(ref))[0]

    # s3's metadata dropped by hand (or by a revert killed after that step): its overlay is
    # still the active layer; a revert to s2 discards and removes it all the same
    expect_ok(snap(ansible, vm, snapshot="s3", quiesce="never"))
    run(["virsh", "-c", "qemu:///system", "snapshot-delete", vm.name, PREFIX + "s3", "--metadata"])
    assert sources(vm.dom)["vda"] == o3
    reverted = expect_ok(snap(ansible, vm, snapshot="s2", state="reverted", run_state="running"))
    assert o3 in reverted["removed_files"] and not os.path.exists(o3) and sources(vm.dom)["vda"] == o2

    # another domain (defined, not running) whose disk is this VM's base image
    other = conn.defineXML(
        f"<domain type='{domain_type}'><name>vmbt-other-{uuid.uuid4().hex[:8]}</name><memory unit='MiB'>32</memory>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{image}'/><target dev='vda' bus='virtio'/></disk></devices></domain>")
    try:
        before = vm_state(vm)
        for check in (True, False):
            refused = expect_error(snap(ansible, vm, check=check, snapshot="s2", state="absent"), "IMAGE_IN_USE")
            assert other.name() in refused["msg"]
        assert vm_state(vm) == before
    finally:
        destroy_vm(other)
    expect_ok(snap(ansible, vm, snapshot="s2", state="absent"))
    assert sources(vm.dom)["vda"] == image and not os.path.exists(o2)


def _backup(ansible, vm, repo, expected_type: str) -> str:
    """One export; returns the set's vda file. Fails with the export's reason when the type differs."""
    result = ansible("export", {"name": vm.name, "repository": str(repo), "quiesce": "never"})
    assert not result["failed"] and result["type"] == expected_type, json.dumps(result)[:3000]
    return str(pathlib.Path(result["repository_path"]) / result["disks"][0]["file"])


def _assert_point_is_disk(vm, files: list[str]) -> None:
    """The backup point read as one chain (full first) equals what the disk reads now."""
    from harness import chain_json
    flush(vm, "vda")
    equal, out = images_equal(chain_json(files), sources(vm.dom)["vda"])
    assert equal, out


def test_backups_stay_incremental_across_create_merge_and_revert(ansible, vms, repo):
    """export's size sentinels are carried by the snapshot module (libvirt carries only the
    checkpoint bitmaps): incrementals across a create, a merge and a revert, each point read
    back through its chain equal to the disk."""
    vm = vms.create(disks=[DiskSpec(fill=[(0x11, "0", "1M")])])
    full = _backup(ansible, vm, repo, "full")
    vm.write("vda", 0x22, "1M", "1M")
    created = expect_ok(snap(ansible, vm, snapshot="s1", quiesce="never"))
    assert created["sentinels_kept"], created
    vm.write("vda", 0x33, "2M", "1M")
    inc1 = _backup(ansible, vm, repo, "incremental")  # a disk on an overlay: libvirt reads the whole chain
    _assert_point_is_disk(vm, [full, inc1])
    vm.write("vda", 0x44, "3M", "1M")
    expect_ok(snap(ansible, vm, snapshot="s1", state="absent"))
    vm.write("vda", 0x55, "4M", "1M")
    inc2 = _backup(ansible, vm, repo, "incremental")
    _assert_point_is_disk(vm, [full, inc1, inc2])

    # the newest checkpoint (of inc2) predates s2: it survives the revert, with what changed
    # between it and s2 (0x66) and without what the revert discarded (0x77)
    vm.write("vda", 0x66, "5M", "1M")
    expect_ok(snap(ansible, vm, snapshot="s2", quiesce="never"))
    vm.write("vda", 0x77, "6M", "1M")
    reverted = expect_ok(snap(ansible, vm, snapshot="s2", state="reverted"))
    assert len(reverted["bitmaps_kept"]) == 1 and len(reverted["sentinels_kept"]) == 1, reverted
    inc3 = _backup(ansible, vm, repo, "incremental")
    _assert_point_is_disk(vm, [full, inc1, inc2, inc3])
    expect_ok(snap(ansible, vm, snapshot="s2", state="absent"))
    inc4 = _backup(ansible, vm, repo, "incremental")
    _assert_point_is_disk(vm, [full, inc1, inc2, inc3, inc4])

    # a snapshot made with virsh gets no sentinel; merged by the module, the base's sentinel
    # from before it is back on top and the next backup is still an exact incremental
    image = str(vm.disks["vda"])
    run(["virsh", "-c", "qemu:///system", "snapshot-create-as", vm.name, "f1", "--disk-only", "--atomic",
         "--diskspec", f"vda,snapshot=external,file={image}.f1"])
    vm.write("vda", 0x88, "7M", "1M")
    merged = expect_ok(snap(ansible, vm, snapshot="f1", foreign=True, state="absent"))
    assert merged["sentinels_kept"] == [], merged
    inc5 = _backup(ansible, vm, repo, "incremental")
    _assert_point_is_disk(vm, [full, inc1, inc2, inc3, inc4, inc5])


def test_shut_off_vm_snapshots_intermediate_merge_and_revert(ansible, vms, tmp_path):
    """A shut-off VM (no checkpoint, a qcow2 and a raw disk): two snapshots; the older one cannot
    be merged under the newer one offline (refused, untouched); a revert keeps the VM shut off
    (as it was snapshotted); newest first, both merge offline with all data."""
    vm = vms.create(disks=[DiskSpec(fill=[(0x11, "0", "1M")]), DiskSpec(size="16M", fmt="raw")], running=False)
    base = str(vm.disks["vda"])
    o1, o2 = (f"{base}.{PREFIX}{n}.qcow2" for n in ("s1", "s2"))
    expect_ok(snap(ansible, vm, snapshot="s1"))
    assert sources(vm.dom, inactive=True) == {"vda": o1, "vdb": f"{vm.disks['vdb']}.{PREFIX}s1.qcow2"}
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 1M", o1])
    ref_s2 = tmp_path / "s2.qcow2"
    run(["qemu-img", "convert", "-O", "qcow2", o1, str(ref_s2)])
    expect_ok(snap(ansible, vm, snapshot="s2"))
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 2M 1M", o2])
    ref = tmp_path / "ref.qcow2"
    run(["qemu-img", "convert", "-O", "qcow2", o2, str(ref)])

    # libvirt 9.0 cannot merge an older snapshot of a shut-off VM under a later one: refused first
    before = vm_state(vm)
    for check in (True, False):
        expect_error(snap(ansible, vm, check=check, snapshot="s1", state="absent"), "SNAPSHOT_UNSUPPORTED")
    assert vm_state(vm) == before

    reverted = expect_ok(snap(ansible, vm, snapshot="s2", state="reverted"))
    assert reverted["vm"]["state"] == "shutoff" and not vm.dom.isActive()
    assert backing_chain(o2) == [o2, o1, base] and images_equal(o2, o1)[0]
    assert not images_equal(o2, str(ref))[0], "the write after s2 is still there"
    assert not snap(ansible, vm, snapshot="s2", state="reverted")["changed"]
    # the newest one merges offline (libvirt's qemu-img commit), then the older one
    expect_ok(snap(ansible, vm, snapshot="s2", state="absent"))
    assert sources(vm.dom, inactive=True)["vda"] == o1 and backing_chain(o1) == [o1, base]
    merged = expect_ok(snap(ansible, vm, snapshot="s1", state="absent"))
    assert sorted(merged["removed_files"]) == sorted([o1, f"{vm.disks['vdb']}.{PREFIX}s1.qcow2"]), merged
    assert sources(vm.dom, inactive=True) == {t: str(p) for t, p in vm.disks.items()} and snapshot_names(vm.dom) == []
    # what the VM had at s2 (0x22 written into s1's overlay) is in the base image now
    assert images_equal(base, str(ref_s2))[0]
