"""Restore drills on the multi-host test bed (docs/testing.md, "The multi-host test bed"): VMs of
hv1 and hv2 backed up into the shared /srv/vmbackup, drilled on hv3 with playbooks/drill.yml over
SSH. One scenario: --check changes nothing on hv3; every VM drilled (proofs beside the sets, naming
hv3; the guest of hv1 booted on hv3 on the isolated network although its own network does not exist
there, its probe reading a file written before the backup); nothing left on hv3 (domains, images,
journals); one flipped bit in hv1's set makes its drill fail in the restore check without defining
anything on hv3 (a poller watches hv3's libvirtd), the play fails naming it, the set is
byte-identical, the proof says why, hv2's VM is still drilled. Checked through each host's own
libvirtd and files, not the module's answer alone.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import threading
import time
import xml.etree.ElementTree as ET

import libvirt

from harness import destroy_vm, listing, run, tree_state, wait_for

DRILL_PREFIX = "vmbackup-drill-"
DRILL_HOST = "hv3"
DISK_DIR = "/var/lib/libvirt/images/vmbackup-drill"


def adhoc(bed, host: str, module: str, args: dict) -> dict:
    proc = bed.ansible(host, f"vmbackup.libvirt.{module}", args)
    match = re.search(rf"^{host} \| (SUCCESS|CHANGED|FAILED!?) => (\{{.*)", proc.stdout, re.S | re.M)
    assert match, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.JSONDecoder().raw_decode(match.group(2))[0]
    result.setdefault("failed", match.group(1).startswith("FAILED"))
    return result


def drill_domains(conn) -> list[str]:
    return sorted(d.name() for d in conn.listAllDomains(0) if d.name().startswith(DRILL_PREFIX))


def flip_bit_in_data(image) -> None:
    extents = json.loads(run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)]).stdout)
    offset = next(e["offset"] for e in extents if e.get("data") and "offset" in e and e["length"] >= 8192) + 4096 + 77
    with open(image, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x01]))


class Poller(threading.Thread):
    """Every drill domain name hv3's libvirtd lists while it runs."""

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.uri, self.seen, self.stop = uri, set(), threading.Event()

    def run(self) -> None:
        conn = libvirt.open(self.uri)
        try:
            while not self.stop.is_set():
                self.seen.update(drill_domains(conn))
                time.sleep(0.01)
        finally:
            conn.close()


def nothing_left(bed, conn3) -> None:
    assert drill_domains(conn3) == []
    assert listing(bed.path(DRILL_HOST, DISK_DIR)) == []  # images, consoles, drill and restore journals


def test_drill_every_vm_of_the_shared_repository_on_another_host(testbed):
    bed = testbed
    repo_local = bed.fresh_repo()
    shutil.rmtree(bed.path(DRILL_HOST, DISK_DIR), ignore_errors=True)  # the drill makes it (check mode must not)
    conn1, conn3 = bed.connect("hv1"), bed.connect(DRILL_HOST)
    f1, f2 = bed.guests("hv1"), bed.guests("hv2")
    prodnet = None
    try:
        # hv1: a guest with an interface on a network only hv1 has, and a file written before the backup
        prodnet = conn1.networkCreateXML("<network><name>vmbt-prodnet</name><bridge name='vmbtprod0'/></network>")
        g1 = f1.create(running=False)
        root = ET.fromstring(g1.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        root.find("devices").append(ET.fromstring("<interface type='network'><source network='vmbt-prodnet'/>"
                                                  "<model type='virtio'/></interface>"))
        g1.dom = conn1.defineXML(ET.tostring(root, encoding="unicode"))
        g1.start()
        g1.write_file("/data/before", b"drill-me\n")
        e1 = adhoc(bed, "hv1", "export", {"name": g1.name, "repository": bed.repo})
        assert e1["changed"] and not e1["failed"], e1
        # hv2: a VM without an agent channel, shut off (a copy)
        g2 = f2.create(running=False)
        root = ET.fromstring(g2.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        devices = root.find("devices")
        for channel in devices.findall("channel"):
            if channel.find("target").get("name") == "org.qemu.guest_agent.0":
                devices.remove(channel)
        g2.dom = f2.conn.defineXML(ET.tostring(root, encoding="unicode"))
        e2 = adhoc(bed, "hv2", "export", {"name": g2.name, "repository": bed.repo})
        assert e2["changed"] and not e2["failed"], e2
        sets = {g1.uuid: e1["set_id"], g2.uuid: e2["set_id"]}
        for uuid, host in ((g1.uuid, "hv1"), (g2.uuid, "hv2")):
            manifest = json.loads((repo_local / "vms" / uuid / "sets" / sets[uuid] / "manifest.json").read_text())
            assert manifest["host"] == host
        variables = {"vmbackup_drill_host": DRILL_HOST, "vmbackup_drill_repository": bed.repo, "vmbackup_drill_network": "isolated",
                     "vmbackup_drill_probe": ["sh", "-c", 'test "$(cat /data/before)" = drill-me'], "vmbackup_drill_boot_timeout": 180,
                     "vmbackup_drill_include": [g1.name, g2.name]}

        def proof(uuid: str) -> dict:
            return json.loads((repo_local / "vms" / uuid / "sets" / f"{sets[uuid]}.drill.json").read_text())

        # --- --check: the plan, and nothing on hv3 (not even the drill directory) or in the repository
        repo_before = tree_state(repo_local)
        res = bed.playbook("drill", variables, check=True)
        summary = res.json["global_custom_stats"]["vmbackup_drill"][DRILL_HOST]
        assert res.rc == 0 and summary["check_mode"] is True, res.stdout[-5000:]
        assert sorted((v["name"], v["status"]) for v in summary["vms"]) == sorted([(g1.name, "planned"), (g2.name, "planned")])
        assert not bed.path(DRILL_HOST, DISK_DIR).exists() and drill_domains(conn3) == []
        assert tree_state(repo_local) == repo_before

        # --- every VM drilled on hv3
        res = bed.playbook("drill", variables)
        summary = res.json["global_custom_stats"]["vmbackup_drill"][DRILL_HOST]
        assert res.rc == 0, res.stdout[-6000:] + res.stderr[-2000:]
        by_name = {v["name"]: v for v in summary["vms"]}
        assert by_name[g1.name]["checks"] == ["image ok", "restore ok", "fsck ok", "boot ok", "agent ok", "fsinfo ok", "probe ok"]
        assert by_name[g2.name]["checks"] == ["image ok", "restore ok", "fsck ok", "probe skipped"]
        for uuid, origin in ((g1.uuid, "hv1"), (g2.uuid, "hv2")):
            p = proof(uuid)
            assert (p["outcome"], p["host"], p["set_id"], p["network"]) == ("ok", DRILL_HOST, sets[uuid], "isolated (vmbackup-isolated)")
            assert by_name[p["vm"]["name"]]["backed_up_on"] == origin
        restore = next(c for c in proof(g1.uuid)["checks"] if c["name"] == "restore")
        assert "interface on network vmbackup-isolated" in restore["detail"]
        # It booted on hv3 (hv3's libvirt log of it; vmbt-prodnet does not exist there), never on hv1.
        drill_name = proof(g1.uuid)["drill_name"]
        log3 = bed.path(DRILL_HOST, f"/var/log/libvirt/qemu/{drill_name}.log")
        assert log3.exists() and "-netdev" in log3.read_text(errors="replace")
        assert not bed.path("hv1", f"/var/log/libvirt/qemu/{drill_name}.log").exists()
        assert conn3.listAllNetworks() and "vmbt-prodnet" not in [n.name() for n in conn3.listAllNetworks()]
        nothing_left(bed, conn3)
        assert g1.dom.isActive() and g1.read_file("/data/before") == b"drill-me\n"  # the source VM runs on, untouched

        # --- one flipped bit in hv1's set: its drill fails at restore, nothing defined on hv3, the set as it was
        set_dir = repo_local / "vms" / g1.uuid / "sets" / sets[g1.uuid]
        flip_bit_in_data(set_dir / "disks" / "vda.qcow2")
        before = tree_state(set_dir)
        poller = Poller(bed.uri(DRILL_HOST))
        poller.start()
        try:
            res = bed.playbook("drill", variables)
        finally:
            poller.stop.set()
            poller.join()
        summary = res.json["global_custom_stats"]["vmbackup_drill"][DRILL_HOST]
        assert res.rc != 0 and summary["outcome"] == "failed", res.stdout[-5000:]
        assert [(f["name"], f["failed_check"], f["error_code"]) for f in summary["failures"]] == [(g1.name, "restore", "DRILL_FAILED")]
        by_name = {v["name"]: v for v in summary["vms"]}
        assert by_name[g1.name]["cause_code"] == "CHECKSUM_MISMATCH" and by_name[g2.name]["status"] == "ok"
        assert f"{g1.name}: FAILED" in res.stdout and "at restore: DRILL_FAILED (CHECKSUM_MISMATCH)" in res.stdout
        assert not any(g1.name in name for name in poller.seen), poller.seen  # hv1's VM: nothing defined
        assert any(g2.name in name for name in poller.seen), poller.seen  # the poller did see hv2's VM drilled
        assert tree_state(set_dir) == before
        p = proof(g1.uuid)
        assert (p["outcome"], p["failed_check"], p["error_code"], p["host"]) == ("failed", "restore", "CHECKSUM_MISMATCH", DRILL_HOST)
        assert "vda.qcow2" in p["msg"] and "sha256" in p["msg"]
        assert proof(g2.uuid)["outcome"] == "ok"
        nothing_left(bed, conn3)

        # --- hv3's libvirtd stops in the middle of a drill: the drill fails (its cleanup cannot reach libvirt, the
        # proof says so), the domain is left running; once libvirtd is back, the next drill on hv3 removes it all
        args = {"name": g2.name, "repository": bed.repo, "boot": "always", "checks": []}
        outcome: dict = {}
        worker = threading.Thread(target=lambda: outcome.update(adhoc(bed, DRILL_HOST, "drill", args)), daemon=True)
        worker.start()
        running = wait_for(lambda: [d for d in drill_domains(conn3) if conn3.lookupByName(d).isActive()], 120, 0.2, "the drill domain")
        with bed.libvirtd_stopped(DRILL_HOST):
            worker.join(timeout=180)
        assert outcome.get("failed") and outcome.get("error_code") == "LIBVIRT_UNAVAILABLE", outcome
        conn3 = bed.connect(DRILL_HOST)  # the old connection died with libvirtd
        assert drill_domains(conn3) == running and conn3.lookupByName(running[0]).isActive()
        p = proof(g2.uuid)
        assert p["outcome"] == "error" and p["failed_check"] == "boot" and p["cleanup"]["complete"] is False, p
        res = bed.playbook("drill", dict(variables, vmbackup_drill_include=[g2.name]))
        summary = res.json["global_custom_stats"]["vmbackup_drill"][DRILL_HOST]
        assert res.rc == 0 and summary["vms"][0]["outcome"] == "ok", res.stdout[-4000:]
        assert any(running[0] in c for c in summary["vms"][0]["cleaned_up"]), summary["vms"][0]["cleaned_up"]
        nothing_left(bed, conn3)

        # --- backup_info on any host: each VM's newest drill
        info = adhoc(bed, "hv1", "backup_info", {"repository": bed.repo})
        drills = {vm["uuid"]: vm["drill"] for vm in info["vms"]}
        assert (drills[g1.uuid]["outcome"], drills[g1.uuid]["host"], drills[g1.uuid]["failed_check"]) == ("failed", DRILL_HOST, "restore")
        assert drills[g2.uuid]["outcome"] == "ok" and 0 <= drills[g2.uuid]["age_seconds"] < 600
    finally:
        # Each step on its own: one that fails (a connection that died with a stopped libvirtd) must not
        # keep the others from leaving the bed as it was.
        with contextlib.suppress(Exception):
            bed.start_libvirtd(DRILL_HOST)
        with contextlib.suppress(Exception):
            fresh = libvirt.open(bed.uri(DRILL_HOST))
            for name in drill_domains(fresh):
                destroy_vm(fresh.lookupByName(name))
            fresh.close()
        for step in (f1.cleanup, f2.cleanup, (prodnet.destroy if prodnet is not None else None), bed.fresh_repo):
            if step is not None:
                with contextlib.suppress(Exception):
                    step()
        shutil.rmtree(bed.path(DRILL_HOST, DISK_DIR), ignore_errors=True)
        for log in bed.path(DRILL_HOST, "/var/log/libvirt/qemu").glob(f"{DRILL_PREFIX}*.log"):
            log.unlink(missing_ok=True)
