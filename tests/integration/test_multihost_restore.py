"""A VM of one bed host restored on another with the restore role (playbooks/restore.yml over
SSH): a tiny guest on hv1, a file written in it, backed up by export on hv1 into the shared
/srv/vmbackup; then --check on hv2 changes nothing anywhere, and the real run restores it on hv2
under a new name, starts it, and its health check reads the file back through hv2's guest agent.
Checked through each host's own libvirtd and paths: the copy runs on hv2 and its guest (hv2's
agent, the harness's guest-exec) has the file and not a later one; hv1's source VM is untouched
(XML, state, disk checksum); hv1 has no copy; the repository is as the backup left it."""

from __future__ import annotations

import json
import re
import uuid

import libvirt

from harness import PREFIX, destroy_vm, sha256, tree_state

INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE


def _adhoc_result(proc, host: str) -> dict:
    match = re.search(rf"^{re.escape(host)} \| (SUCCESS|CHANGED|FAILED!?) => (\{{.*)", proc.stdout, re.S | re.M)
    assert match, f"{proc.stdout}\n{proc.stderr}"
    result = json.JSONDecoder().raw_decode(match.group(2))[0]
    assert not match.group(1).startswith("FAILED"), result
    return result


def _names(conn) -> set[str]:
    return {d.name() for d in conn.listAllDomains(0)}


def test_restore_on_another_host(testbed):
    bed = testbed
    bed.fresh_repo()
    token = uuid.uuid4().hex[:8]
    target = f"{PREFIX}mh-{token}"
    on_hv1, on_hv2 = bed.guests("hv1"), bed.guests("hv2")
    conn1, conn2, conn3 = bed.connect("hv1"), bed.connect("hv2"), bed.connect("hv3")
    restored_files = []
    try:
        source = on_hv1.create()
        payload = f"written on hv1 before the backup {token}\n".encode()
        source.write_file("/data/before", payload)
        backup = _adhoc_result(bed.ansible("hv1", "vmbackup.libvirt.export", {"repository": bed.repo, "name": source.name}), "hv1")
        manifest = json.loads((bed.repo_local / "vms" / source.uuid / "sets" / backup["set_id"] / "manifest.json").read_text())
        assert manifest["host"] == "hv1"
        source.write_file("/data/after", b"written after the backup\n")
        source.shutdown()  # a still disk, for the checksum
        disk = source.paths["vda"]  # hv1's image, as this process sees it
        hv1_before = (source.dom.XMLDesc(INACTIVE), source.dom.state()[0], sha256(disk), _names(conn1))
        hv2_names, hv3_names = _names(conn2), _names(conn3)
        repo_before = tree_state(bed.repo_local)
        variables = {
            "vmbackup_restore_host": "hv2",
            "vmbackup_restore_repository": bed.repo,
            "vmbackup_restore_name": source.name,
            "vmbackup_restore_as": target,
            "vmbackup_restore_start": "yes",
            "vmbackup_restore_health_agent": "required",
            "vmbackup_restore_health_timeout": "90",
            "vmbackup_restore_health_probe": "cat /data/before",
            "vmbackup_restore_health_probe_expect_stdout": token,
        }

        # --check: the plan on hv2; nothing on any host, the repository unchanged.
        r = bed.playbook("restore", variables, check=True)
        assert r.rc == 0, r.stdout[-6000:]
        s = r.custom_stats["_run"]["vmbackup_restore"]["hv2"]
        assert s["outcome"] == "planned" and s["set_id"] == backup["set_id"] and s["vm"]["name"] == target
        assert _names(conn2) == hv2_names and _names(conn1) == hv1_before[3] and _names(conn3) == hv3_names
        assert tree_state(bed.repo_local) == repo_before
        assert not bed.path("hv2", "/var/lib/libvirt/images").joinpath(f"{target}-vda-{backup['set_id']}.qcow2").exists()

        # The restore on hv2: started, healthy, the file read back through hv2's agent.
        r = bed.playbook("restore", variables)
        assert r.rc == 0, r.stdout[-6000:]
        s = r.custom_stats["_run"]["vmbackup_restore"]["hv2"]
        restored_files = [bed.path("hv2", p) for p in s["disks"]] + [bed.path("hv2", f"/var/log/libvirt/qemu/{target}-serial0.log")]
        assert s["outcome"] == "ok" and s["host"] == "hv2" and s["vm_started"] is True and s["health"]["healthy"] is True
        assert [c["outcome"] for c in s["health"]["checks"]] == ["ok", "ok", "ok"] and s["health"]["probe"]["stdout"] == payload.decode()
        dom = conn2.lookupByName(target)
        assert dom.isActive() and dom.UUIDString() != source.uuid and source.name not in _names(conn2)
        copy = on_hv2.adopt(dom)
        copy.wait_agent(30)
        assert copy.read_file("/data/before") == payload
        assert copy.exec(["test", "-e", "/data/after"])[0] == 1
        assert all(p.exists() for p in restored_files[:-1])

        # hv1: the source as it was, no copy there; the repository as the backup left it.
        assert (source.dom.XMLDesc(INACTIVE), source.dom.state()[0], sha256(disk), _names(conn1)) == hv1_before
        assert tree_state(bed.repo_local) == repo_before and _names(conn3) == hv3_names
    finally:
        try:
            destroy_vm(conn2.lookupByName(target))
        except libvirt.libvirtError:
            pass
        on_hv2.cleanup()
        on_hv1.cleanup()
        for path in restored_files:
            path.unlink(missing_ok=True)
        bed.fresh_repo()
