"""The vmbackup.libvirt.restore role through playbooks/restore.yml on the root libvirtd, with the
tiny real guest: a guest backed up with export, then restored by the role under a new name,
started, its health checked with a probe that reads back a file written before the backup. Check
mode changes nothing; a rerun changes nothing; replacing needs the explicit variable and keeps
restore's contract; bad input fails before any work with an error_code. What happened is checked
through libvirt and the restored guest's own agent (harness guest-exec), not the role's report."""

from __future__ import annotations

import os
import time
import uuid

import libvirt

from harness import Domains, expect_ok, listing, make_dir, run_playbook

PLAYBOOK = "vmbackup.libvirt.restore"
INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE


def _summary(result, host: str = "localhost") -> dict:
    stats = result.stats()
    assert host in stats.get("vmbackup_restore", {}), result.text
    return stats["vmbackup_restore"][host]


def _as_found(dom) -> tuple:
    return dom.XMLDesc(INACTIVE), dom.state()[0], dom.ID()


def _domain_names(conn, prefix: str) -> set[str]:
    """Domains this test may have made (other tests share the libvirtd)."""
    return {d.name() for d in conn.listAllDomains(0) if d.name().startswith(prefix)}


def test_restore_role(ansible, conn, guests, repo, repo_root):
    token = uuid.uuid4().hex[:8]
    source = guests.create()
    payload = f"written before the backup {token}\n".encode()
    source.write_file("/data/before", payload)
    backup = expect_ok(ansible("export", {"repository": str(repo), "name": source.name}))
    source.write_file("/data/after", b"written after the backup\n")
    disk_dir = make_dir(repo_root / "disks")
    domains = Domains(conn)
    target = domains.new_name("rrole")
    source_before = _as_found(source.dom)
    source_disk = str(source.paths["vda"])
    base = {
        "vmbackup_restore_host": "localhost",
        "vmbackup_restore_repository": str(repo),
        "vmbackup_restore_name": source.name,
        "vmbackup_restore_as": target,
        "vmbackup_restore_disk_dir": str(disk_dir),
        # As an AWX survey gives them: text.
        "vmbackup_restore_start": "true",
        "vmbackup_restore_health_timeout": "60",
        "vmbackup_restore_health_probe": '["cat", "/data/before"]',
        "vmbackup_restore_health_probe_expect_stdout": token,
        "vmbackup_restore_point": "",
        "vmbackup_restore_storage_pool": "",
    }
    try:
        # --check: the plan, nothing defined or written.
        names = _domain_names(conn, target)
        r = run_playbook(ansible.env, PLAYBOOK, base, check=True)
        assert r.rc == 0, r.text
        s = _summary(r)
        assert s["outcome"] == "planned" and s["set_id"] == backup["set_id"] and s["vm"]["name"] == target and s["health"] is None
        planned_disks = s["disks"]
        assert _domain_names(conn, target) == names and listing(disk_dir) == [] and _as_found(source.dom) == source_before

        # The restore: a new VM, started, healthy; the file written before the backup read back in it.
        r = run_playbook(ansible.env, PLAYBOOK, base)
        assert r.rc == 0, r.text
        s = _summary(r)
        assert s["outcome"] == "ok" and s["changed"] is True and s["vm_started"] is True and s["error_code"] is None
        assert s["health"]["healthy"] is True and [(c["name"], c["outcome"]) for c in s["health"]["checks"]] == \
            [("running", "ok"), ("agent", "ok"), ("probe", "ok")]
        assert s["health"]["probe"]["stdout"] == payload.decode()
        assert s["disks"] == planned_disks  # check mode predicted the same images
        dom = conn.lookupByName(target)
        assert dom.isActive() and dom.UUIDString() != source.uuid
        restored = guests.adopt(dom)
        console = restored.console_log
        domains.files.append(console)
        assert console != source.console_log and console.exists()  # its own console, not the source's file
        if os.environ.get("VMBT_SHOW"):
            print(r.stdout)
        assert all(str(p).startswith(str(disk_dir) + "/") for p in restored.paths.values()) and source_disk not in dom.XMLDesc(0)
        restored.wait_agent(30)
        assert restored.read_file("/data/before") == payload
        assert restored.exec(["test", "-e", "/data/after"])[0] == 1  # the point, not the source as it is now
        assert _as_found(source.dom) == source_before
        restored_before = _as_found(dom)
        files = listing(disk_dir)

        # A rerun: nothing changes.
        r = run_playbook(ansible.env, PLAYBOOK, base)
        assert r.rc == 0 and r.recap("localhost")["changed"] == 0, r.text
        s = _summary(r)
        assert s["outcome"] == "ok" and s["changed"] is False and s["health"]["healthy"] is True
        assert _as_found(dom) == restored_before and listing(disk_dir) == files

        # The same point chosen by set id and by time: the same VM, nothing changes.
        for point in ({"vmbackup_restore_point": backup["set_id"]},
                      {"vmbackup_restore_as_of": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))}):
            r = run_playbook(ansible.env, PLAYBOOK, dict(base, **point))
            assert r.rc == 0 and r.recap("localhost")["changed"] == 0, r.text
            assert _summary(r)["set_id"] == backup["set_id"] and _as_found(dom) == restored_before

        # A health check that fails: the host fails at step health, naming the check; the VM is left running as it is.
        r = run_playbook(ansible.env, PLAYBOOK, dict(base, vmbackup_restore_health_probe_expect_stdout="not in the file"))
        s = _summary(r)
        assert r.rc != 0 and (s["error_code"], s["step"], s["failed_check"]) == ("HEALTH_CHECK_FAILED", "health", "probe"), r.text
        assert s["health"]["healthy"] is False and s["health"]["probe"]["stdout"] == payload.decode()
        assert _as_found(dom) == restored_before

        # Replacing is explicit: the source's name without it is TARGET_VM_EXISTS; a running target is never replaced.
        for extra, code, step in (({"vmbackup_restore_as": source.name}, "TARGET_VM_EXISTS", "plan"),
                                  ({"vmbackup_restore_replace": "yes"}, "TARGET_VM_RUNNING", "plan")):
            r = run_playbook(ansible.env, PLAYBOOK, dict(base, **extra))
            s = _summary(r)
            assert r.rc != 0 and s["outcome"] == "failed" and (s["error_code"], s["step"]) == (code, step), r.text
            assert _as_found(dom) == restored_before and _as_found(source.dom) == source_before and listing(disk_dir) == files

        # Replace of the shut-off copy: the copy keeps its UUID; its disks are new files of the point.
        dom.destroy()
        copy_uuid = dom.UUIDString()
        r = run_playbook(ansible.env, PLAYBOOK, dict(base, vmbackup_restore_replace="yes", vmbackup_restore_start="no"))
        assert r.rc == 0, r.text
        s = _summary(r)
        assert s["changed"] is True and s["vm"]["replaced"] is True and s["vm_started"] is False and s["health"] is None
        dom = conn.lookupByName(target)
        assert dom.UUIDString() == copy_uuid and not dom.isActive() and _as_found(source.dom) == source_before

        # Bad input fails before any work, with an error_code and the step.
        names, files = _domain_names(conn, target), listing(disk_dir)
        inactive = dom.XMLDesc(INACTIVE)
        for extra, code, step, words in (
                ({"vmbackup_restore_start": "maybe"}, "INVALID_ARGUMENT", "inputs", ["vmbackup_restore_start", "maybe"]),
                ({"vmbackup_restore_uuid": source.uuid}, "INVALID_ARGUMENT", "inputs", ["exactly one of vmbackup_restore_name"]),
                ({"vmbackup_restore_strat": "true"}, "INVALID_ARGUMENT", "inputs", ["vmbackup_restore_strat"]),
                ({"vmbackup_restore_health_timeout": "soon", "vmbackup_restore_health_agent": "always"}, "INVALID_ARGUMENT", "inputs",
                 ["vmbackup_restore_health_timeout", "vmbackup_restore_health_agent"]),
                ({"vmbackup_restore_as": f"{target}-2", "vmbackup_restore_network_map": "nosuchnet=isolated"}, "INVALID_ARGUMENT", "plan",
                 ["nosuchnet"]),
                ({"vmbackup_restore_as": f"{target}-2", "vmbackup_restore_as_of": "2026-13-45"}, "INVALID_ARGUMENT", "plan", ["2026-13-45"]),
                ({"vmbackup_restore_as": f"{target}-2", "vmbackup_restore_point": "20990101T000000Z-001"}, "SET_NOT_FOUND", "plan", [])):
            r = run_playbook(ansible.env, PLAYBOOK, dict(base, **extra))
            s = _summary(r)
            assert r.rc != 0 and (s["error_code"], s["step"]) == (code, step), r.text
            assert all(w in s["msg"] for w in words) and "Traceback" not in r.stdout, s["msg"]
        assert _domain_names(conn, target) == names and listing(disk_dir) == files and dom.XMLDesc(INACTIVE) == inactive
        # A host that is not in the inventory: the playbook fails instead of matching no host.
        r = run_playbook(ansible.env, PLAYBOOK, dict(base, vmbackup_restore_host="nosuchhost"))
        assert r.rc != 0 and "INVALID_ARGUMENT" in r.stdout and "vmbackup_restore" not in r.stats(), r.text
    finally:
        domains.cleanup()
