"""vmbackup.libvirt.drill on the root libvirtd with the tiny real guest: one scenario, many asserts.

A guest with an agent and a VM without an agent channel are backed up; then: check mode writes
nothing; a drill of each (boot + agent + fsinfo + a probe reading a file written before the backup;
offline qemu-img check + e2fsck for the other); a probe reading a file written after the backup
fails; a drill cancelled with SIGTERM cleans up and records the cancel; a drill killed with SIGKILL
leaves a domain, a journal and a directory that the next drill removes; a flipped bit in the set
makes that drill fail in its restore check without defining anything (a poller watches libvirt),
the set byte-identical; backup_info shows the newest drills and their ages; prune takes a proof
with its set. Everything is checked through libvirt, the files on the host and the proofs read
as files, not through the module's answer alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET

import libvirt

from harness import IMAGES, expect_error, expect_ok, kill_tree, listing, module_pids, result_and_warnings, run, tree_state, wait_for

DRILL_PREFIX = "vmbackup-drill-"
QEMU_LOG_DIR = pathlib.Path("/var/log/libvirt/qemu")


def drill_domains(conn) -> list[str]:
    return sorted(d.name() for d in conn.listAllDomains(0) if d.name().startswith(DRILL_PREFIX))


def proof_of(repo: pathlib.Path, vm_uuid: str, set_id: str) -> dict:
    return json.loads((repo / "vms" / vm_uuid / "sets" / f"{set_id}.drill.json").read_text())


def flip_bit_in_data(image: pathlib.Path) -> int:
    """Flip one bit inside a data cluster of a qcow2 file (not its metadata: qemu-img check still passes)."""
    extents = json.loads(run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)]).stdout)
    offset = next(e["offset"] for e in extents if e.get("data") and "offset" in e and e["length"] >= 8192) + 4096 + 123
    with open(image, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x10]))
    return offset


def restore_lock(name: str) -> pathlib.Path:
    """restore's flock file for a target name (/run/vmbackup/restore-<sha256 of "name\\0<name>">.lock)."""
    return pathlib.Path("/run/vmbackup") / f"restore-{hashlib.sha256(f'name{chr(0)}{name}'.encode()).hexdigest()[:32]}.lock"


class DefinePoller(threading.Thread):
    """Records every drill domain name libvirt lists while it runs (an independent view of "defined")."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        conn = libvirt.open("qemu:///system")
        try:
            while not self.stop.is_set():
                self.seen.update(drill_domains(conn))
                time.sleep(0.01)
        finally:
            conn.close()


def playbook(ansible, workdir: pathlib.Path, variables: dict, check: bool = False) -> tuple[int, dict, str]:
    """playbooks/drill.yml of the installed collection on localhost; (rc, its set_stats data, output)."""
    vars_file = workdir / f"vars-{uuid.uuid4().hex[:6]}.json"
    vars_file.write_text(json.dumps(variables))
    argv = [str(pathlib.Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
            "vmbackup.libvirt.drill", "-e", f"@{vars_file}"] + (["--check"] if check else [])
    env = dict(ansible.env, ANSIBLE_STDOUT_CALLBACK="default", ANSIBLE_SHOW_CUSTOM_STATS="1")
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    match = re.search(r"^\s*RUN: (\{.*\})\s*$", proc.stdout, re.M)
    assert match, proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc.returncode, json.loads(match.group(1)), proc.stdout + proc.stderr


def test_drill_scenario(ansible, conn, guests, repo):
    disk_dir = IMAGES / f"vmbt-drill-{uuid.uuid4().hex[:8]}"  # the drill creates it
    started = time.time()
    try:
        _scenario(ansible, conn, guests, repo, disk_dir)
    finally:
        for log in QEMU_LOG_DIR.glob(f"{DRILL_PREFIX}vmbt-g-*.log"):  # libvirt's logs of the drills that ran
            if log.stat().st_mtime >= started:
                log.unlink(missing_ok=True)
        for name in drill_domains(conn):
            dom = conn.lookupByName(name)
            if disk_dir.name in dom.XMLDesc(0):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        shutil.rmtree(disk_dir, ignore_errors=True)


def _scenario(ansible, conn, guests, repo, disk_dir):
    # --- a guest with its agent, a file written before the backup (and one after it)
    g = guests.create()
    g.write_file("/data/before", b"drill-me\n")
    # Crash-consistent (no freeze): the ext4 journal needs recovery in the set, the drill replays it on its copy.
    exp = expect_ok(ansible("export", {"name": g.name, "repository": str(repo), "quiesce": "never"}))
    g.write_file("/data/after", b"not in the backup\n")
    set_g = exp["set_id"]
    # --- a VM whose definition has no agent channel (shut off: a copy)
    n = guests.create(running=False)
    root = ET.fromstring(n.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    devices = root.find("devices")
    for channel in devices.findall("channel"):
        if channel.find("target").get("name") == "org.qemu.guest_agent.0":
            devices.remove(channel)
    n.dom = conn.defineXML(ET.tostring(root, encoding="unicode"))
    exp_n = expect_ok(ansible("export", {"name": n.name, "repository": str(repo)}))
    set_n = exp_n["set_id"]
    base = {"repository": str(repo), "disk_dir": str(disk_dir), "boot_timeout": 120}
    probe_before = ["sh", "-c", 'test "$(cat /data/before)" = drill-me']
    sets_dir_g = repo / "vms" / g.uuid / "sets"

    # --- check mode: a prediction, nothing written, nothing defined, disk_dir not even created
    r = ansible("drill", dict(base, name=g.name, probe=probe_before), check=True)
    assert r["changed"] and not r["failed"], r
    assert r["planned_checks"] == ["image", "restore", "fsck", "boot", "agent", "fsinfo", "probe"], r
    assert r["set_id"] == set_g and r["drill_name"].startswith(DRILL_PREFIX) and r["proof"] is None
    assert not disk_dir.exists() and not list(sets_dir_g.glob("*.drill.json")) and drill_domains(conn) == []

    # --- the drill of the guest: everything passes; the probe read the file through the restored guest
    r = ansible("drill", dict(base, name=g.name, probe=probe_before))
    assert r["changed"] and not r["failed"] and r["outcome"] == "ok", json.dumps(r, indent=1)[:6000]
    proof = proof_of(repo, g.uuid, set_g)
    assert proof["outcome"] == "ok" and proof["failed_check"] is None and proof["set_id"] == set_g
    assert [(c["name"], c["outcome"]) for c in proof["checks"]] == [
        ("image", "ok"), ("restore", "ok"), ("fsck", "ok"), ("boot", "ok"), ("agent", "ok"), ("fsinfo", "ok"), ("probe", "ok")]
    assert proof["host"] == os.uname().nodename and proof["vm"] == {"name": g.name, "uuid": g.uuid}
    assert all(c["seconds"] >= 0 for c in proof["checks"]) and proof["cleanup"]["complete"]
    fsinfo = next(c for c in proof["checks"] if c["name"] == "fsinfo")
    assert any(f.get("mountpoint") == "/data" for f in fsinfo["filesystems"]), fsinfo
    assert next(c for c in proof["checks"] if c["name"] == "probe")["rc"] == 0
    assert "vda whole disk (data): journal replayed first" in next(c for c in proof["checks"] if c["name"] == "fsck")["detail"]
    assert oct(os.stat(sets_dir_g / f"{set_g}.drill.json").st_mode & 0o777) == "0o600"
    # It really ran under its throwaway name (libvirt's QEMU log of it), and it is gone now.
    qemu_log = QEMU_LOG_DIR / f"{r['drill_name']}.log"
    assert qemu_log.exists() and f"guest={r['drill_name']}" in qemu_log.read_text(errors="replace")
    assert "-netdev" not in qemu_log.read_text(errors="replace")  # network: none
    assert drill_domains(conn) == [] and listing(disk_dir) == [], listing(disk_dir)
    assert oct(disk_dir.stat().st_mode & 0o777) == "0o711"
    assert not restore_lock(r["drill_name"]).exists()  # restore's per-name lock file under /run/vmbackup is not left either
    assert g.dom.isActive() and g.read_file("/data/after") == b"not in the backup\n"  # the original untouched
    qemu_log.unlink()

    # --- a probe that reads a file written after the backup: it is not there; DRILL_FAILED names the probe
    r = ansible("drill", dict(base, name=g.name, probe=["cat", "/data/after"], checks=["fsinfo"]))
    expect_error(r, "DRILL_FAILED")
    assert r["failed_check"] == "probe" and r["outcome"] == "failed"
    proof = proof_of(repo, g.uuid, set_g)
    assert proof["outcome"] == "failed" and proof["failed_check"] == "probe"
    assert [c["name"] for c in proof["checks"]] == ["restore", "boot", "agent", "fsinfo", "probe"]
    assert drill_domains(conn) == [] and listing(disk_dir) == []

    # --- the VM without an agent: offline checks only; e2fsck saw its ext4
    r = ansible("drill", dict(base, name=n.name))
    assert not r["failed"] and r["outcome"] == "ok", json.dumps(r, indent=1)[:6000]
    assert r["planned_checks"] == ["image", "restore", "fsck"] and r["has_agent_channel"] is False
    proof_n = proof_of(repo, n.uuid, set_n)
    fsck = next(c for c in proof_n["checks"] if c["name"] == "fsck")
    assert fsck["outcome"] == "ok" and fsck["filesystems"] == ["vda whole disk (data)"], fsck
    assert not (QEMU_LOG_DIR / f"{r['drill_name']}.log").exists()  # never started
    assert drill_domains(conn) == [] and listing(disk_dir) == []

    # --- harm to what exists: a domain that starts using an image in the drill directory keeps it (and the
    # directory); the drill passes but fails with DRILL_LEFTOVER; once that domain is gone the next drill removes it
    pending = ansible.popen_result("drill", dict(base, name=g.name, probe=["sleep", "12"], checks=[]))
    running = wait_for(lambda: [d for d in drill_domains(conn) if conn.lookupByName(d).isActive()], 120, 0.2, "the drill domain")
    image = next((disk_dir / running[0]).glob("*.img"))
    user_name = f"vmbt-drill-user-{uuid.uuid4().hex[:6]}"
    user = conn.defineXML(f"<domain type='qemu'><name>{user_name}</name><memory unit='MiB'>32</memory><os><type arch='x86_64' "
                          f"machine='pc'>hvm</type></os><devices><disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                          f"<source file='{image}'/><target dev='vda' bus='virtio'/><readonly/></disk></devices></domain>")
    try:
        r = pending.result(timeout=300)
        expect_error(r, "DRILL_LEFTOVER")
        assert r["outcome"] == "ok" and r["cleanup"]["complete"] is False and image.exists(), r["cleanup"]
        assert any(str(image) in problem and user_name in problem for problem in r["cleanup"]["problems"]), r["cleanup"]
        assert drill_domains(conn) == []  # its own domain is gone all the same
    finally:
        user.undefine()
    r = ansible("drill", dict(base, name=n.name))
    assert not r["failed"] and any(f"directory {image.parent}" in c for c in r["cleaned_up"]), r["cleaned_up"]
    assert drill_domains(conn) == [] and listing(disk_dir) == [], listing(disk_dir)

    # --- a broken VM elsewhere on the host (its qcow2 header unreadable, so its backing chain is unknown)
    # does not make the drill keep its own directory: cleanup complete, a warning names the broken VM
    broken_dir = pathlib.Path(IMAGES) / f"vmbt-drill-broken-{uuid.uuid4().hex[:6]}"
    broken_dir.mkdir()
    broken_img = broken_dir / "vda.qcow2"
    broken_img.write_bytes(b"\0" * 65536)
    broken_name = broken_dir.name
    broken = conn.defineXML(f"<domain type='qemu'><name>{broken_name}</name><memory unit='MiB'>32</memory><os><type arch='x86_64' "
                            f"machine='pc'>hvm</type></os><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                            f"<source file='{broken_img}'/><target dev='vda' bus='virtio'/></disk></devices></domain>")
    try:
        r, warnings = result_and_warnings(ansible, "drill", dict(base, name=n.name))
        assert not r["failed"] and r["outcome"] == "ok" and r["cleanup"]["complete"], json.dumps(r, indent=1)[:4000]
        assert broken_name in warnings and "could not be read" in warnings, warnings
        assert drill_domains(conn) == [] and listing(disk_dir) == [], listing(disk_dir)
    finally:
        broken.undefine()
        shutil.rmtree(broken_dir)

    # --- two drills of one VM at once on one host: each its own name and directory, both pass, nothing left
    runs = [ansible.popen_result("drill", dict(base, name=n.name)) for dummy in range(2)]
    both = [run_.result(timeout=300) for run_ in runs]
    assert all(not x["failed"] and x["outcome"] == "ok" for x in both), [x.get("msg") for x in both]
    assert len({x["drill_name"] for x in both}) == 2
    assert proof_of(repo, n.uuid, set_n)["drill_name"] in {x["drill_name"] for x in both}  # one proof per set: the last
    assert drill_domains(conn) == [] and listing(disk_dir) == []

    # --- boot: always for the VM without an agent: it must still run 10 s after its start
    r = ansible("drill", dict(base, name=n.name, boot="always", checks=[]))
    assert not r["failed"] and r["planned_checks"] == ["restore", "boot"], json.dumps(r, indent=1)[:4000]
    boot = next(c for c in r["checks"] if c["name"] == "boot")
    assert boot["outcome"] == "ok" and boot["seconds"] >= 10 and "no agent channel" in boot["detail"], boot
    assert (QEMU_LOG_DIR / f"{r['drill_name']}.log").exists()  # it did start
    assert drill_domains(conn) == [] and listing(disk_dir) == []

    # --- the role through playbooks/drill.yml on localhost: --check changes nothing, then the real run
    role_vars = {"vmbackup_drill_repository": str(repo), "vmbackup_drill_disk_dir": str(disk_dir),
                 "vmbackup_drill_include": n.name[:-3] + "*", "vmbackup_drill_exclude": [g.name]}
    proof_file = repo / "vms" / n.uuid / "sets" / f"{set_n}.drill.json"
    before = (proof_file.stat().st_mtime_ns, proof_file.read_bytes())
    rc, stats, out = playbook(ansible, repo.parent, role_vars, check=True)
    summary = stats["vmbackup_drill"]["localhost"]
    assert rc == 0 and summary["outcome"] == "ok" and summary["check_mode"] is True, out[-4000:]
    assert [(v["name"], v["status"], v["set_id"]) for v in summary["vms"]] == [(n.name, "planned", set_n)]
    assert (proof_file.stat().st_mtime_ns, proof_file.read_bytes()) == before and listing(disk_dir) == []
    rc, stats, out = playbook(ansible, repo.parent, role_vars)
    summary = stats["vmbackup_drill"]["localhost"]
    assert rc == 0 and [(v["name"], v["status"], v["outcome"]) for v in summary["vms"]] == [(n.name, "ok", "ok")], out[-4000:]
    assert summary["vms"][0]["checks"] == ["image ok", "restore ok", "fsck ok"]
    assert json.loads(proof_file.read_bytes())["completed"] >= json.loads(before[1])["completed"] and proof_file.read_bytes() != before[1]
    assert drill_domains(conn) == [] and listing(disk_dir) == []
    # a pattern that selects nothing is a typo, not a quiet success
    rc, stats, out = playbook(ansible, repo.parent, dict(role_vars, vmbackup_drill_include=["no-such-vm*"]))
    summary = stats["vmbackup_drill"]["localhost"]
    assert rc != 0 and summary["failures"][0]["error_code"] == "NO_VM_SELECTED" and summary["vms"] == [], out[-3000:]

    # --- SIGTERM (an AWX cancel) while the probe runs: cleaned up, the proof records the cancel
    pending = ansible.popen_result("drill", dict(base, name=g.name, probe=["sleep", "300"]))
    wait_for(lambda: any(conn.lookupByName(d).isActive() for d in drill_domains(conn)), 120, 0.2, "the drill domain to run")
    time.sleep(4)
    for pid in module_pids(pending.proc, "drill"):
        os.kill(pid, signal.SIGTERM)
    r = pending.result(timeout=120)
    expect_error(r, "CANCELLED")
    assert drill_domains(conn) == [] and listing(disk_dir) == [], listing(disk_dir)
    proof = proof_of(repo, g.uuid, set_g)
    assert proof["outcome"] == "error" and proof["error_code"] == "CANCELLED" and proof["cleanup"]["complete"], proof

    # --- SIGKILL: a leftover (domain with its marker, journal, directory) that the next drill removes
    proc = ansible.popen("drill", dict(base, name=g.name, probe=["sleep", "300"]))
    killed = wait_for(lambda: [d for d in drill_domains(conn) if conn.lookupByName(d).isActive()], 120, 0.2, "the drill domain")
    time.sleep(1)
    kill_tree(proc)
    assert drill_domains(conn) == killed and conn.lookupByName(killed[0]).isActive()
    assert any(n.startswith(".vmbackup-drill-") and n.endswith(".json") for n in listing(disk_dir)) and killed[0] in listing(disk_dir)
    # (its restore had ended and dropped its lock files: they remain only when a drill dies inside its restore)
    assert not restore_lock(killed[0]).exists()

    # --- one flipped bit in the set: the restore check fails, nothing is defined, the set stays as it is
    image = sets_dir_g / set_g / "disks" / "vda.qcow2"
    flip_bit_in_data(image)
    before = tree_state(sets_dir_g / set_g)
    poller = DefinePoller()
    poller.start()
    try:
        r = ansible("drill", dict(base, name=g.name))
    finally:
        poller.stop.set()
        poller.join()
    expect_error(r, "DRILL_FAILED")
    assert r["failed_check"] == "restore" and r["cause_code"] == "CHECKSUM_MISMATCH", r
    assert any(killed[0] in c and "domain" in c for c in r["cleaned_up"]), r["cleaned_up"]
    assert any("journal" in c for c in r["cleaned_up"]), r["cleaned_up"]
    assert not restore_lock(r["drill_name"]).exists()
    assert poller.seen == set(killed), poller.seen  # the killed drill's domain only; this drill defined nothing
    assert tree_state(sets_dir_g / set_g) == before
    proof = proof_of(repo, g.uuid, set_g)
    assert proof["outcome"] == "failed" and proof["failed_check"] == "restore" and proof["error_code"] == "CHECKSUM_MISMATCH"
    assert "vda.qcow2" in proof["msg"], proof["msg"]
    assert [(c["outcome"], c["detail"] if c["outcome"] == "skipped" else "") for c in proof["checks"]] == \
        [("ok", ""), ("failed", "")] + [("skipped", "not reached")] * 4, proof["checks"]
    assert drill_domains(conn) == [] and listing(disk_dir) == [], listing(disk_dir)
    assert not (QEMU_LOG_DIR / f"{r['drill_name']}.log").exists()

    # --- backup_info: each VM's newest drill and its age
    info = expect_info(ansible("backup_info", {"repository": str(repo)}))
    vms = {vm["uuid"]: vm for vm in info["vms"]}
    d = vms[g.uuid]["drill"]
    assert (d["set_id"], d["outcome"], d["failed_check"], d["error_code"], d["host"], d["current"]) == \
        (set_g, "failed", "restore", "CHECKSUM_MISMATCH", os.uname().nodename, True)
    assert 0 <= d["age_seconds"] < 300 and vms[g.uuid]["drill_ok"] is None  # the set's only proof is the failed one
    d = vms[n.uuid]["drill"]
    assert d["outcome"] == "ok" and d["set_id"] == set_n and 0 <= d["age_seconds"] < 600 and vms[n.uuid]["drill_ok"] == d

    # --- prune takes a proof with its set
    os.utime(n.paths["vda"])  # an unchanged shut-off VM is not copied again
    second = expect_ok(ansible("export", {"name": n.name, "repository": str(repo)}))["set_id"]
    pr = expect_ok(ansible("prune", {"repository": str(repo), "name": n.name, "keep_last": 1}))
    assert pr["removed"] == [set_n]
    assert listing(repo / "vms" / n.uuid / "sets") == [second]


def expect_info(result: dict) -> dict:
    assert not result["failed"], result
    return result
