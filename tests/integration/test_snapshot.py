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

from harness import DiskSpec, expect_error, expect_ok, images_equal, parse_disk_sources, run, sha256, tree_state

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

    created = expect_ok(snap(ansible, vm, snapshot="s1", quiesce="never"))
    assert created["snapshot"] == PREFIX + "s1" and created["consistency"] == "crash"
    assert [d["overlay"] for d in created["disks"]] == [d["overlay"] for d in predicted["disks"]]
    now = sources(vm.dom)
    for target, image in vm.disks.items():
        overlay = f"{image}.{PREFIX}s1.qcow2"
        assert now[target] == overlay and sources(vm.dom, inactive=True)[target] == overlay
        assert backing_chain(overlay) == [overlay, str(image)]
    assert snapshot_names(vm.dom) == [PREFIX + "s1"]

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

    gone = snap(ansible, vm, snapshot="s1", state="absent")
    assert not gone["changed"] and not gone["failed"], gone
