"""Backups of a VM across external snapshots, against a real libvirtd 9.0 and QEMU 7.2.

What users do: back up nightly, take an external disk-only snapshot before a change, merge it
back afterwards (active block commit + pivot). The series must stay restorable at every point,
and a chain may only continue where the collection can still prove the checkpoint exact.

Findings this test pins down (they are in docs/snapshots-and-backups.md):
- libvirt carries each recording checkpoint bitmap into a new overlay (empty, recording) and
  keeps the old one in the backing image; a backup merges them down the chain. On an active
  commit it merges the overlay's bitmaps into the base. The checkpoint survives both.
- The collection's size sentinel (a disabled bitmap) is carried by neither: a backup on a new
  overlay, or after merging an overlay that a checkpoint was taken on, starts a new chain and
  says why. A checkpoint taken before a snapshot that is merged before the next backup keeps its
  sentinel in the base image: that chain continues.
- vmbackup.libvirt.snapshot keeps the sentinels across its own create and merge (it re-arms
  one that was intact right before on the new top): the chain continues across both, and a
  shrink and grow back of the overlay still clears it (a new chain).

Everything is checked by another path: qemu-img compare of every point (read through its chain)
against a copy of the disk taken right after that export, the bitmaps through QMP, the restored
images with qemu-img.
"""

from __future__ import annotations

import json
import pathlib
import time

import libvirt
import libvirt_qemu
import pytest

from harness import URI, DiskSpec, chain_json, expect_ok, images_equal, make_dir, parse_disk_sources, run, Domains


def qmp(dom, command: str, **arguments) -> object:
    cmd = {"execute": command, "arguments": arguments} if arguments else {"execute": command}
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(cmd), 0))
    assert "error" not in reply, reply
    return reply["return"]


def node_of(dom, path: pathlib.Path | str) -> dict:
    """The qcow2 format node QEMU runs on ``path``, with its bitmaps."""
    found = [n for n in qmp(dom, "query-named-block-nodes", flat=True) if n["drv"] == "qcow2" and n["file"] == str(path)]
    assert len(found) == 1, found
    return found[0]


def bitmaps(dom, path) -> dict[str, dict]:
    return {b["name"]: b for b in node_of(dom, path).get("dirty-bitmaps", []) if b.get("name")}  # a job adds anonymous ones


def virsh(*argv: str) -> str:
    return run(["virsh", "-c", URI, *argv]).stdout


class Series:
    """The exports of one VM, each with a reference copy of its disk right after it."""

    def __init__(self, ansible, vm, repo: pathlib.Path, refs: pathlib.Path) -> None:
        self.ansible, self.vm, self.repo, self.refs_dir = ansible, vm, repo, refs
        self.results: list[dict] = []
        self.refs: list[pathlib.Path] = []

    def source(self) -> str:
        return parse_disk_sources(self.vm.dom.XMLDesc(0))["vda"]

    def export(self, expect_type: str, reason: str | None = None) -> dict:
        args = {"repository": str(self.repo), "name": self.vm.name}
        predicted = self.ansible("export", args, check=True)
        result = expect_ok(self.ansible("export", args))
        assert (predicted["type"], predicted["reason"]) == (result["type"], result["reason"]), (predicted, result)
        assert result["type"] == expect_type, result["reason"]
        if reason is not None:
            assert reason in result["reason"], result["reason"]
        ref = self.refs_dir / f"{len(self.refs)}.qcow2"
        # The live top image read through its backing chain: what the guest sees now.
        run(["qemu-img", "convert", "-U", "-O", "qcow2", self.source(), str(ref)])
        self.results.append(result)
        self.refs.append(ref)
        return result

    def manifest(self, k: int) -> dict:
        return json.loads((pathlib.Path(self.results[k]["repository_path"]) / "manifest.json").read_text())

    def point(self, k: int) -> str:
        start = max(i for i in range(k + 1) if self.results[i]["type"] == "full")
        return chain_json([pathlib.Path(r["repository_path"]) / "disks" / "vda.qcow2" for r in self.results[start:k + 1]])


@pytest.fixture
def domains(conn):
    registry = Domains(conn, hint="snaprest")
    yield registry
    registry.cleanup()


def test_series_across_snapshot_create_and_merge_is_restorable_at_every_point(ansible, vms, repo_root, domains):
    vm = vms.create([DiskSpec("64M", fill=[(0x11, "0", "4M")])])
    base = vm.disks["vda"]
    series = Series(ansible, vm, make_dir(repo_root / "repo"), make_dir(repo_root / "refs"))
    overlays = [vm.workdir / f"vda.snap{i}.qcow2" for i in range(5)]
    try:
        series.export("full")                                        # 0
        vm.write("vda", 0x21, "8M", "1M")
        p1 = series.export("incremental")                            # 1
        cp1 = p1["checkpoint"]

        # --- a snapshot made outside the collection (virsh), a backup on the overlay
        vm.write("vda", 0x22, "10M", "1M")
        virsh("snapshot-create-as", vm.name, "s0", "--disk-only", "--atomic", "--diskspec", f"vda,file={overlays[0]}")
        assert series.source() == str(overlays[0])
        on_overlay, in_base = bitmaps(vm.dom, overlays[0]), bitmaps(vm.dom, base)
        # libvirt carried the checkpoint's bitmap into the overlay (empty, recording), kept the old
        # one in the base with the write before the snapshot, and did not carry the sentinel.
        assert on_overlay[cp1]["recording"] and on_overlay[cp1]["count"] == 0 and on_overlay[cp1]["persistent"]
        assert in_base[cp1]["count"] == 1024 * 1024 and f"{cp1}.size" in in_base
        assert f"{cp1}.size" not in on_overlay
        vm.write("vda", 0x23, "12M", "1M")
        p2 = series.export("full", reason=f"runs on an overlay ({overlays[0]}) created after checkpoint {cp1}")  # 2
        assert series.manifest(2)["disks"][0]["source"] == str(overlays[0])
        vm.write("vda", 0x24, "14M", "1M")
        p3 = series.export("incremental")                            # 3: the new chain continues on the overlay
        assert p3["parent"] == p2["set_id"]
        cp3 = p3["checkpoint"]

        # --- merge (active commit + pivot): the bitmap survives, the sentinel made on the overlay does not
        vm.write("vda", 0x25, "16M", "1M")
        virsh("blockcommit", vm.name, "vda", "--active", "--pivot", "--wait")
        virsh("snapshot-delete", vm.name, "s0", "--metadata")
        assert series.source() == str(base)
        in_base = bitmaps(vm.dom, base)
        assert in_base[cp3]["recording"] and in_base[cp3]["count"] >= 1024 * 1024 and f"{cp3}.size" not in in_base
        vm.write("vda", 0x26, "18M", "1M")
        series.export("full", reason=f"(it was {overlays[0]} at the set")  # 4
        vm.write("vda", 0x27, "40M", "4M")  # data beyond 32M, for the shrink below
        p5 = series.export("incremental")                            # 5
        cp5 = p5["checkpoint"]

        # --- snapshot and merge between two backups: the checkpoint predates the overlay, its
        # sentinel stayed in the base, libvirt merged the bitmap back: the chain continues.
        virsh("snapshot-create-as", vm.name, "s1", "--disk-only", "--atomic", "--diskspec", f"vda,file={overlays[1]}")
        vm.write("vda", 0x28, "22M", "1M")
        # Even a shrink and grow back of the overlay is seen: the base's bitmap is not truncated
        # (the base is not resized), and the commit writes the overlay's zeros into the base.
        virsh("blockresize", vm.name, "vda", "32M")
        virsh("blockresize", vm.name, "vda", "64M")
        virsh("blockcommit", vm.name, "vda", "--active", "--pivot", "--wait")
        virsh("snapshot-delete", vm.name, "s1", "--metadata")
        assert bitmaps(vm.dom, base)[cp5]["count"] >= 32 * 1024 * 1024  # the zeroed area is dirty
        vm.write("vda", 0x29, "24M", "1M")
        p6 = series.export("incremental")                            # 6
        assert p6["parent"] == p5["set_id"]

        # --- the collection's own snapshots: vmbackup.libvirt.snapshot keeps the size sentinels
        # (re-arms on the new top one that was intact right before), so the chain continues
        # across its create and its merge.
        snap_args = {"name": vm.name, "snapshot": "s2", "quiesce": "never"}
        made = expect_ok(ansible("snapshot", dict(snap_args, state="present")))
        overlays[2] = pathlib.Path(series.source())
        assert overlays[2] != base and made["snapshot"].startswith("vmbackup-snap-")
        vm.write("vda", 0x2a, "26M", "1M")
        p7 = series.export("incremental")                            # 7
        assert p7["parent"] == p6["set_id"]
        vm.write("vda", 0x2b, "28M", "1M")
        expect_ok(ansible("snapshot", dict(snap_args, state="absent")))
        assert series.source() == str(base)
        vm.write("vda", 0x2c, "40M", "8M")  # data beyond 32M: a shrink to 32M and back erases it
        p8 = series.export("incremental")                            # 8
        assert p8["parent"] == p7["set_id"]

        # --- a kept sentinel still sees a shrink and grow back of the overlay (wrong point)
        snap_args["snapshot"] = "s3"
        expect_ok(ansible("snapshot", dict(snap_args, state="present")))
        overlays[3] = pathlib.Path(series.source())
        virsh("blockresize", vm.name, "vda", "32M")
        virsh("blockresize", vm.name, "vda", "64M")
        # No bitmap saw that the guest now reads zeros at 40M: only the sentinel tells.
        assert bitmaps(vm.dom, overlays[3])[p8["checkpoint"]]["count"] == 0
        vm.write("vda", 0x2d, "2M", "1M")
        p9 = series.export("full", reason="was shrunk")              # 9
        # --- the merge (libvirt's snapshot-delete: active commit + pivot) keeps the new chain
        vm.write("vda", 0x2e, "44M", "1M")
        expect_ok(ansible("snapshot", dict(snap_args, state="absent")))
        assert series.source() == str(base) and not overlays[3].exists()
        vm.write("vda", 0x2f, "46M", "1M")
        p10 = series.export("incremental")                           # 10
        assert p10["parent"] == p9["set_id"]

        # --- a backup while a merge runs (commit job ready, not pivoted): refused, nothing changed
        virsh("snapshot-create-as", vm.name, "s4", "--disk-only", "--atomic", "--diskspec", f"vda,file={overlays[4]}")
        vm.write("vda", 0x30, "48M", "1M")
        virsh("blockcommit", vm.name, "vda", "--active", "--wait")
        before = (vm.checkpoints(), sorted(p.name for p in (series.repo / "vms" / vm.uuid / "sets").iterdir()))
        foreseen = ansible("export", {"repository": str(series.repo), "name": vm.name}, check=True)
        assert foreseen["failed"] and foreseen["error_code"] == "BACKUP_JOB_ACTIVE" and foreseen["block_jobs"] == {"vda": "active-commit"}, foreseen
        refused = ansible("export", {"repository": str(series.repo), "name": vm.name})
        assert refused["failed"] and refused["error_code"] == "BACKUP_JOB_ACTIVE" and "disk vda" in refused["msg"], refused
        assert vm.dom.blockJobInfo("vda", 0).get("type") == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT  # not aborted
        assert before == (vm.checkpoints(), sorted(p.name for p in (series.repo / "vms" / vm.uuid / "sets").iterdir()))
        assert list((series.repo / "vms" / vm.uuid / ".incomplete").iterdir()) == []
        virsh("blockjob", vm.name, "vda", "--pivot")
        virsh("snapshot-delete", vm.name, "s4", "--metadata")
        p11 = series.export("incremental")                           # 11: the checkpoint predates s4
        assert p11["parent"] == p10["set_id"]

        # --- every point, read through its chain, is the disk as it was right after its export
        for k in range(len(series.results)):
            same, out = images_equal(series.point(k), str(series.refs[k]))
            assert same, f"point {k} ({series.results[k]['type']}): {out}"
        for k in range(len(series.refs) - 1):
            assert not images_equal(str(series.refs[k]), str(series.refs[k + 1]))[0], "the writes made the points differ"
        assert [series.manifest(k)["disks"][0]["source"] for k in (1, 2, 3, 4, 7, 8, 9, 10)] == [
            str(base), str(overlays[0]), str(overlays[0]), str(base), str(overlays[2]), str(base), str(overlays[3]), str(base)]

        # --- restore of a point taken on an overlay: one flat image, the domain on it, no backing file
        for k in (3, 10):
            name = domains.new_name()
            restored = expect_ok(ansible("restore", {"repository": str(series.repo), "name": vm.name,
                                                     "set_id": series.results[k]["set_id"], "restore_as": name,
                                                     "disk_dir": str(make_dir(repo_root / f"restored{k}"))}))
            path = restored["disks"][0]["path"]
            same, out = images_equal(path, str(series.refs[k]), force_share=False)
            assert same, f"restored point {k}: {out}"
            info = json.loads(run(["qemu-img", "info", "--output=json", path]).stdout)
            assert "backing-filename" not in info
            xml = conn_xml(domains, name)
            assert parse_disk_sources(xml) == {"vda": path} and "<backingStore" not in xml.split("<disk", 1)[1].split("</disk>")[0]
    finally:
        for snap in vm.dom.listAllSnapshots(0):
            snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)


def conn_xml(domains: Domains, name: str) -> str:
    dom = domains.lookup(name)
    assert dom is not None, name
    return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


def test_shut_off_vm_on_an_overlay_is_copied_through_its_chain(ansible, vms, repo_root):
    """A shut-off VM with an external snapshot: the copy reads the whole chain, records every
    image of it for the unchanged-VM economy, and an offline merge (libvirt 9.0's snapshot-delete
    runs qemu-img commit) changes the chain, so the next run copies again."""
    vm = vms.create([DiskSpec("32M", fill=[(0x11, "0", "2M")])], running=False)
    base, overlay = vm.disks["vda"], vm.workdir / "vda.off.qcow2"
    repo, refs = make_dir(repo_root / "repo"), make_dir(repo_root / "refs")
    args = {"repository": str(repo), "name": vm.name}
    try:
        virsh("snapshot-create-as", vm.name, "off", "--disk-only", "--atomic", "--diskspec", f"vda,file={overlay}")
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 4M 1M", str(overlay)])
        time.sleep(1.1)  # past the racy window: an image changed within 1 s of the copy is not recorded
        first = expect_ok(ansible("export", args))
        assert first["type"] == "copy"
        man = json.loads((pathlib.Path(first["repository_path"]) / "manifest.json").read_text())
        assert man["disks"][0]["source"] == str(overlay)
        assert [i["path"] for i in man["disks"][0]["images"]] == [str(overlay), str(base)]
        ref = refs / "0.qcow2"
        run(["qemu-img", "convert", "-O", "qcow2", str(overlay), str(ref)])
        same, out = images_equal(str(pathlib.Path(first["repository_path"]) / "disks" / "vda.qcow2"), str(ref))
        assert same, out
        # Unchanged: not copied again.
        again = ansible("export", args)
        assert again["changed"] is False and again["set_id"] == first["set_id"], again
        # The offline merge writes the overlay into the base: the chain is another one now.
        virsh("snapshot-delete", vm.name, "off")
        assert parse_disk_sources(vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))["vda"] == str(base)
        merged = expect_ok(ansible("export", args))
        assert merged["type"] == "copy" and "changed since set" in merged["reason"], merged["reason"]
        same, out = images_equal(str(pathlib.Path(merged["repository_path"]) / "disks" / "vda.qcow2"), str(ref))
        assert same, out  # the same data, now read from the base alone
    finally:
        for snap in vm.dom.listAllSnapshots(0):
            snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
