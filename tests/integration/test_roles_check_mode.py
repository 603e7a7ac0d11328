"""--check of the collection's playbooks on the 3-host bed changes nothing on any host: the weekly
backup, the restore (a new VM on another host, and replacing the original) and the drill.

After a real weekly backup of a VM on every host (so that there is something to plan with), each
playbook runs in check mode over the bed, and everything it could touch is compared before and
after, read independently of the collection: every domain of every host (live and inactive XML,
run state, checkpoints with their XML, snapshots) through each host's libvirtd, each host's image
directory /var/lib/libvirt/images (with the drill directory in it), report directory, /run
journals and locks (/run/vmbackup*), libvirt networks and storage pools, and the shared
repository's whole tree (modes, sizes, contents)."""

from __future__ import annotations

import contextlib
import pathlib
import re
import shutil
import uuid

import libvirt

from harness import PREFIX, destroy_vm, pick_domain_type, tree_state
from test_multihost_backup import WEEKLY, BedRun, bed_vm, close_ssh_masters, committed

PATHS = ("/var/lib/libvirt/images", "/run/vmbackup", "/run/vmbackup-libvirt")


def host_state(bed, conn, host: str, extra: tuple[str, ...] = ()) -> dict:
    domains = {}
    for dom in conn.listAllDomains(0):
        domains[dom.name()] = (
            dom.XMLDesc(0), dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), dom.state()[0],
            sorted((c.getName(), c.getXMLDesc(0)) for c in dom.listAllCheckpoints(0)),
            sorted(s.getName() for s in dom.listAllSnapshots(0)),
        )
    # Any journal or lock directory of the collection in the host's private /run, whatever its name.
    runs = tuple(f"/run/{p.name}" for p in bed.path(host, "/run").iterdir() if p.name.startswith("vmbackup"))
    return {"domains": domains,
            "networks": sorted((n.name(), n.isActive(), n.XMLDesc(0)) for n in conn.listAllNetworks(0)),
            "pools": sorted((sp.name(), sp.isActive()) for sp in conn.listAllStoragePools(0)),
            **{p: tree_state(bed.path(host, p)) for p in PATHS + runs + extra}}


def bed_state(bed, conns, extra: tuple[str, ...] = ()) -> dict:
    return {"repository": tree_state(bed.repo_local), **{h: host_state(bed, conns[h], h, extra) for h in bed.hosts}}


def diff(before: dict, after: dict) -> list[str]:
    """Where two states differ (for the assertion message)."""
    out = []
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        if isinstance(b, dict) and isinstance(a, dict):
            out += [f"{key}/{d}" for d in diff(b, a)]
        elif b != a:
            out.append(str(key))
    return out


def test_check_mode_changes_nothing_on_any_host(testbed):
    bed = testbed
    repo = bed.fresh_repo()
    close_ssh_masters(bed)
    token = uuid.uuid4().hex[:6]
    conns = {h: bed.connect(h) for h in bed.hosts}
    made: list[tuple[str, str, pathlib.Path]] = []  # (host, uuid, image)
    reports = f"/var/lib/libvirt/vmbackup-reports-{token}"
    try:
        domain_type = pick_domain_type(conns[bed.hosts[0]])
        for h in bed.hosts:
            dom, image = bed_vm(bed, h, conns[h], domain_type, f"{PREFIX}ckm-{token}-{h}", True, "8M")
            made.append((h, dom.UUIDString(), image))
        # Reports and metrics in a directory private to each bed host (/var/lib/libvirt is the host's own).
        for h in bed.hosts:
            bed.path(h, reports).mkdir(mode=0o755)
        variables = {"vmbackup_hosts": "hypervisors", "vmbackup_backup_repository": bed.repo,
                     "vmbackup_backup_include": [f"{PREFIX}ckm-{token}-*"], "vmbackup_backup_period": "2026-W49",
                     "vmbackup_backup_report_dir": reports, "vmbackup_backup_prometheus_dir": reports}
        out = BedRun(bed.playbook(WEEKLY, variables))
        assert out.rc == 0, out.text
        assert all(len(committed(repo, u)) == 1 for _h, u, _i in made)

        # The backup of the next week (an incremental of every VM would be taken), in check mode.
        assert all(sorted(p.name for p in bed.path(h, reports).iterdir()) == ["vmbackup-weekly.json", "vmbackup_weekly.prom"]
                   for h in bed.hosts)
        before = bed_state(bed, conns, (reports,))
        out = BedRun(bed.playbook(WEEKLY, dict(variables, vmbackup_backup_period="2026-W50"), check=True))
        assert out.rc == 0, out.text
        assert out.run_summary()["ok_hosts"] == bed.hosts, out.run_summary()
        plans = {h: r["msg"] for _t, h, r in out.results("Show the outcome of each VM")}
        assert sorted(plans) == bed.hosts and all(re.match(r".*: planned, incremental ", m[0]) for m in plans.values()), plans
        after = bed_state(bed, conns, (reports,))
        assert after == before, diff(before, after)

        # The restore of hv1's VM onto hv2 under a new name, started and health-checked, in check mode.
        name_hv1 = conns["hv1"].lookupByUUIDString(made[0][1]).name()
        out = BedRun(bed.playbook("restore", {"vmbackup_restore_host": "hv2", "vmbackup_restore_repository": bed.repo,
                                              "vmbackup_restore_name": name_hv1, "vmbackup_restore_start": True}, check=True))
        assert out.rc == 0, out.text
        planned = out.result.json["global_custom_stats"]["vmbackup_restore"]["hv2"]
        assert (planned["outcome"], planned["set_id"]) == ("planned", committed(repo, made[0][1])[0]["set_id"]), planned
        after = bed_state(bed, conns, (reports,))
        assert after == before, diff(before, after)
        # ... and replacing the original on hv1 (explicit), in check mode: refused while it runs,
        # as the real run would be; planned once it is shut off. Nothing changes either way.
        replace = {"vmbackup_restore_host": "hv1", "vmbackup_restore_repository": bed.repo, "vmbackup_restore_name": name_hv1,
                   "vmbackup_restore_replace": True, "vmbackup_restore_as": name_hv1}
        out = BedRun(bed.playbook("restore", replace, check=True))
        assert out.rc != 0 and "TARGET_VM_RUNNING" in out.result.stdout, out.text
        after = bed_state(bed, conns, (reports,))
        assert after == before, diff(before, after)
        conns["hv1"].lookupByUUIDString(made[0][1]).destroy()
        before = bed_state(bed, conns, (reports,))
        out = BedRun(bed.playbook("restore", replace, check=True))
        assert out.rc == 0, out.text
        assert out.result.json["global_custom_stats"]["vmbackup_restore"]["hv1"]["outcome"] == "planned", out.text
        after = bed_state(bed, conns, (reports,))
        assert after == before, diff(before, after)

        # The drill of every VM of the repository on hv3, in check mode: no drill domain, image,
        # directory or proof.
        out = BedRun(bed.playbook("drill", {"vmbackup_drill_host": "hv3", "vmbackup_drill_repository": bed.repo,
                                            "vmbackup_drill_include": [f"{PREFIX}ckm-{token}-*"]}, check=True))
        assert out.rc == 0, out.text
        drills = out.result.json["global_custom_stats"]["vmbackup_drill"]["hv3"]["vms"]
        assert sorted(d["name"] for d in drills) == sorted(f"{PREFIX}ckm-{token}-{h}" for h in bed.hosts), drills
        assert {d["status"] for d in drills} == {"planned"}, drills
        after = bed_state(bed, conns, (reports,))
        assert after == before, diff(before, after)
    finally:
        for h, vm_uuid, image in made:
            with contextlib.suppress(libvirt.libvirtError):
                destroy_vm(conns[h].lookupByUUIDString(vm_uuid))
            image.unlink(missing_ok=True)
        for h in bed.hosts:
            shutil.rmtree(bed.path(h, reports), ignore_errors=True)
        bed.fresh_repo()
