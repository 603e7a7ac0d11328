"""Restore when the repository is all that is left: the VM and its disks are gone, as on
another host that mounts the repository. Nothing about the source host is needed."""

from __future__ import annotations

import pathlib
import shutil

import libvirt

from harness import MIB, DiskSpec, destroy_vm, images_equal, parse_disk_sources


def test_a_lost_vm_is_restored_from_the_repository_alone(ansible, conn, vms, repo, scratch):
    vm = vms.create([DiskSpec("96M", fill=[(0x3C, "0", "6M")]), DiskSpec("64M", fmt="raw", fill=[(0x4D, "2M", "2M")])])
    export = ansible("export", {"name": vm.name, "repository": str(repo)})
    assert export["type"] == "full", export
    vm.write("vda", 0x5E, "10M", "3M")
    inc = ansible("export", {"name": vm.name, "repository": str(repo)})
    assert inc["type"] == "incremental", inc
    refs = {t: vm.snapshot_disk(t, scratch / f"ref-{t}.qcow2") for t in vm.disks}
    name, vm_uuid = vm.name, vm.uuid

    # The disaster: the domain and its disk files are gone.
    destroy_vm(vm.dom)
    shutil.rmtree(vm.workdir)
    disk_dir = scratch / "restored"
    disk_dir.mkdir(mode=0o711)
    restore_as = f"{name}-back"
    try:
        verified = ansible("verify", {"repository": str(repo), "name": name})
        assert verified["outcome"] == "ok" and verified["sets_checked"] == 2, verified

        # By name: the name lives in the manifests, not in libvirt.
        result = ansible("restore", {"repository": str(repo), "name": name, "restore_as": restore_as,
                                     "disk_dir": str(disk_dir)})
        assert result["changed"] and not result["failed"], result
        assert result["set_id"] == inc["set_id"] and result["source_vm"] == {"name": name, "uuid": vm_uuid}
        dom = conn.lookupByName(restore_as)
        sources = parse_disk_sources(dom.XMLDesc(0))
        assert sorted(sources) == ["vda", "vdb"]
        for target, path in sources.items():
            assert pathlib.Path(path).parent == disk_dir
            same, out = images_equal(str(refs[target]), path)
            assert same, (target, out)
        # vdb was raw: restored as qcow2 (the default) with its data, sparse.
        assert pathlib.Path(sources["vdb"]).stat().st_blocks * 512 < 8 * MIB
    finally:
        try:
            destroy_vm(conn.lookupByName(restore_as))
        except libvirt.libvirtError:
            pass
