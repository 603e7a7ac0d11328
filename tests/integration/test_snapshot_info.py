"""vmbackup.libvirt.snapshot_info against a real libvirtd and QEMU: snapshots (ours and foreign) with
their overlays' sizes, checkpoints (ours and foreign) with their bitmaps, and each disk's active
chain, every figure checked by another path (libvirt XML, qemu-img info, stat, the bytes written).
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import libvirt

from harness import URI, DiskSpec, expect_error, make_dir, run, sha256

MIB = 1024 * 1024


def virsh(*argv: str) -> str:
    return run(["virsh", "-c", URI, *argv]).stdout


def live_chain(dom, target: str, flags: int = 0) -> list[str]:
    """The disk's image chain as libvirt's XML states it, top first."""
    for disk in ET.fromstring(dom.XMLDesc(flags)).findall("./devices/disk"):
        if disk.find("target").get("dev") != target:
            continue
        files, layer = [], disk
        while layer is not None and layer.find("source") is not None:
            files.append(layer.find("source").get("file"))
            layer = layer.find("backingStore")
        return files
    raise AssertionError(target)


def qemu_info(path) -> dict:
    return json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)


def test_snapshots_checkpoints_and_chains_of_a_vm(ansible, vms, repo_root):
    vm = vms.create([DiskSpec("64M", fill=[(0x11, "0", "4M")]), DiskSpec("32M")])
    other = vms.create([DiskSpec("16M")], running=False)
    ov1, ov2 = vm.workdir / "vda.foreign.qcow2", vm.workdir / "vda.vmbackup-snap-pre.qcow2"
    try:
        exported = ansible("export", {"repository": str(make_dir(repo_root / "repo")), "name": vm.name})
        assert exported["changed"], exported
        ours_cp = exported["checkpoint"]
        virsh("checkpoint-create-as", vm.name, "foreign-cp", "--diskspec", "vda,checkpoint=bitmap",
              "--diskspec", "vdb,checkpoint=no")
        virsh("snapshot-create-as", vm.name, "foreign-snap", "--disk-only", "--atomic",
              "--diskspec", f"vda,file={ov1}", "--diskspec", "vdb,snapshot=no")
        vm.write("vda", 0x22, "8M", "1M")
        virsh("snapshot-create-as", vm.name, "vmbackup-snap-pre", "--disk-only", "--atomic",
              "--diskspec", f"vda,file={ov2}", "--diskspec", "vdb,snapshot=no")
        vm.write("vda", 0x33, "16M", "2M")

        args = {"name": vm.name}
        result = ansible("snapshot_info", args)
        assert result["changed"] is False and not result["failed"], result
        assert ansible("snapshot_info", args, check=True)["vms"][0]["snapshots"] == result["vms"][0]["snapshots"]
        (info,) = result["vms"]
        assert (info["name"], info["uuid"], info["state"]) == (vm.name, vm.uuid, "running")

        # --- snapshots: names, ownership, parent, overlays and their sizes (qemu-img, stat)
        snaps = {s["name"]: s for s in info["snapshots"]}
        assert [s["name"] for s in info["snapshots"]] == ["foreign-snap", "vmbackup-snap-pre"]
        assert (snaps["foreign-snap"]["ours"], snaps["vmbackup-snap-pre"]["ours"]) == (False, True)
        assert snaps["vmbackup-snap-pre"]["parent"] == "foreign-snap" and snaps["vmbackup-snap-pre"]["current"]
        assert snaps["foreign-snap"]["memory"] == "none" and snaps["foreign-snap"]["state"] == "disk-snapshot"
        for name, overlay, base in (("foreign-snap", ov1, vm.disks["vda"]), ("vmbackup-snap-pre", ov2, ov1)):
            disks = {d["target"]: d for d in snaps[name]["disks"]}
            assert disks["vdb"]["kind"] == "no" and disks["vdb"]["overlay"] is None
            vda = disks["vda"]
            assert (vda["kind"], vda["overlay"], vda["base"], vda["in_active_chain"]) == ("external", str(overlay), str(base), True)
            q = qemu_info(overlay)
            assert (vda["virtual_size"], vda["allocated_bytes"], vda["file_bytes"]) == (
                q["virtual-size"], q["actual-size"], os.stat(overlay).st_size)
        # The top overlay holds the 2 MiB written after it: its data is at least that.
        assert snaps["vmbackup-snap-pre"]["disks"][0]["allocated_bytes"] >= 2 * MIB

        # --- checkpoints: ours and the foreign one, their bitmaps, the bytes written since
        cps = {c["name"]: c for c in info["checkpoints"]}
        assert set(cps) == {ours_cp, "foreign-cp"} and cps[ours_cp]["ours"] and not cps["foreign-cp"]["ours"]
        assert [c["name"] for c in info["checkpoints"]][0] == ours_cp
        assert cps["foreign-cp"]["parent"] == ours_cp
        foreign = {d["target"]: d for d in cps["foreign-cp"]["disks"]}
        assert foreign["vda"]["bitmap"] == "foreign-cp" and foreign["vdb"]["bitmap"] is None
        assert foreign["vda"]["dirty_bytes"] == 3 * MIB  # the two writes since, read down the chain
        assert {d["target"]: d["dirty_bytes"] for d in cps[ours_cp]["disks"]} == {"vda": 3 * MIB, "vdb": 0}

        # --- the active chains, as libvirt's live XML states them
        disks = {d["target"]: d for d in info["disks"]}
        assert [img["filename"] for img in disks["vda"]["chain"]] == live_chain(vm.dom, "vda") == [
            str(ov2), str(ov1), str(vm.disks["vda"])]
        assert disks["vda"]["source"] == str(ov2) and disks["vda"]["chain_error"] is None
        assert [img["backing_filename"] for img in disks["vda"]["chain"]] == [str(ov1), str(vm.disks["vda"]), None]
        assert [img["filename"] for img in disks["vdb"]["chain"]] == [str(vm.disks["vdb"])]
        # The backup checkpoint's persistent bitmap is in the base image since the export (stored at the snapshot).
        assert ours_cp in disks["vda"]["chain"][2]["bitmaps"]

        # --- every VM of the host, the shut-off one included; a missing VM is an error
        everything = ansible("snapshot_info", {"uri": URI})
        names = [v["name"] for v in everything["vms"]]
        assert vm.name in names and other.name in names and names == sorted(names)
        off = next(v for v in everything["vms"] if v["name"] == other.name)
        assert (off["state"], off["snapshots"], off["checkpoints"]) == ("shutoff", [], [])
        assert [img["filename"] for img in off["disks"][0]["chain"]] == [str(other.disks["vda"])]
        expect_error(ansible("snapshot_info", {"name": vm.name + "-missing"}), "VM_NOT_FOUND")

        # --- the VM shut off on its overlays: no dirty sizes, the chain from the persistent definition
        vm.dom.destroy()
        images = [ov2, ov1, vm.disks["vda"], vm.disks["vdb"]]
        before = ([sha256(p) for p in images], vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
                  [s.getXMLDesc(0) for s in vm.dom.listAllSnapshots(0)], [c.getXMLDesc(0) for c in vm.dom.listAllCheckpoints(0)])
        after = ansible("snapshot_info", {"uuid": vm.uuid})["vms"][0]
        assert ansible("snapshot_info", {"uuid": vm.uuid}, check=True)["vms"][0] == after
        # Read-only: images, definition, snapshots and checkpoints byte-identical.
        assert before == ([sha256(p) for p in images], vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
                          [s.getXMLDesc(0) for s in vm.dom.listAllSnapshots(0)], [c.getXMLDesc(0) for c in vm.dom.listAllCheckpoints(0)])
        assert after["state"] == "shutoff"
        assert all(d["dirty_bytes"] is None for c in after["checkpoints"] for d in c["disks"])
        assert [img["filename"] for img in {d["target"]: d for d in after["disks"]}["vda"]["chain"]] == [
            str(ov2), str(ov1), str(vm.disks["vda"])]
        # Missing overlay of a snapshot: sizes unknown, not an error.
        os.rename(ov2, ov2.with_suffix(".moved"))
        gone = ansible("snapshot_info", {"name": vm.name})["vms"][0]
        top = {s["name"]: s for s in gone["snapshots"]}["vmbackup-snap-pre"]["disks"][0]
        assert (top["file_bytes"], top["virtual_size"], top["in_active_chain"]) == (None, None, False)
        vda = {d["target"]: d for d in gone["disks"]}["vda"]
        assert vda["chain"] == [] and vda["chain_error"]
    finally:
        for snap in vm.dom.listAllSnapshots(0):
            snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
