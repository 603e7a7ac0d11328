"""The weekly playbook across several hypervisor hosts writing into one repository: the hosts back
up in parallel, never more of them at once than the cap (vmbackup_backup_throttle; the weekly
playbook's default is 2), and a host whose libvirtd is down or that cannot be reached over SSH
fails alone: the others finish, the run's rc is not 0, and the summary of every host names the
host and why.

What was written, and when, is read from the repository itself, independently of the role: a
sampler lists the staging directories (vms/<uuid>/.incomplete/<set-id>, there only while an
export writes) every few milliseconds, and the committed manifests give each set's host and its
started/completed interval. Each host's libvirtd is asked directly about its VMs.

The first test needs no bed (hosts with a local connection on this machine's libvirtd, one with
a libvirt socket that does not exist, one whose SSH port refuses); the second runs on the
3-host bed (tests/integration/testbed.py)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
import uuid

import libvirt
import pytest

from harness import PREFIX, DiskSpec, VmFactory, destroy_vm, pick_domain_type, run

ROOT = pathlib.Path(__file__).resolve().parents[2]
WEEKLY = str(ROOT / "playbooks" / "backup_weekly.yml")


# ----------------------------------------------------------------------------- observations
class StagingSampler:
    """Lists <repo>/vms/*/.incomplete/ every 5 ms from a thread: the VMs with a staging directory
    are the exports writing into the repository at that moment. ``owner`` maps a VM's UUID to
    its host."""

    def __init__(self, repo: pathlib.Path, owner: dict[str, str]) -> None:
        self.repo, self.owner = repo, owner
        self.samples: list[frozenset[str]] = []  # UUIDs staged at once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            staged = set()
            for vm_uuid in self.owner:
                with contextlib.suppress(OSError):
                    if os.listdir(self.repo / "vms" / vm_uuid / ".incomplete"):
                        staged.add(vm_uuid)
            if staged:
                self.samples.append(frozenset(staged))
            time.sleep(0.005)

    def __enter__(self) -> "StagingSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def hosts_at_once(self) -> int:
        return max((len({self.owner[u] for u in s}) for s in self.samples), default=0)

    def vms_of_one_host_at_once(self) -> int:
        best = 0
        for staged in self.samples:
            hosts = [self.owner[u] for u in staged]
            best = max(best, max(hosts.count(h) for h in hosts))
        return best

    def hosts_seen(self) -> set[str]:
        return {self.owner[u] for s in self.samples for u in s}


def committed(repo: pathlib.Path, vm_uuid: str) -> list[dict]:
    """The committed manifests of a VM, oldest first."""
    sets = repo / "vms" / vm_uuid / "sets"
    if not sets.is_dir():
        return []
    return [json.loads((p / "manifest.json").read_text()) for p in sorted(sets.iterdir())
            if p.is_dir() and (p / "manifest.json").exists()]


def most_at_once(intervals: list[tuple[str, dt.datetime, dt.datetime]]) -> int:
    """The most distinct keys (hosts) whose [started, completed) intervals hold one instant. The
    manifests' times have second precision (truncated): two intervals that did not overlap never
    appear to, so this never exceeds the true figure (it may miss a short overlap)."""
    best = 0
    for _key, start, _end in intervals:
        at = {k for k, s, e in intervals if s <= start < e}
        best = max(best, len(at))
    return best


def intervals_of(manifests: list[dict], period: str) -> list[tuple[str, dt.datetime, dt.datetime]]:
    def parse(text: str) -> dt.datetime:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    return [(m["host"], parse(m["started"]), parse(m["completed"])) for m in manifests if m.get("period") == period]


# ----------------------------------------------------------------------------- playbook runs
class Run:
    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.rc, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr

    @property
    def text(self) -> str:
        return f"rc={self.rc}\n{self.stdout[-15000:]}\n{self.stderr[-3000:]}"

    def recap(self, host: str) -> dict[str, int]:
        match = re.search(rf"^{re.escape(host)}\s+:\s+(.*)$", self.stdout, re.M)
        assert match, self.text
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}

    def stats(self) -> dict:
        match = re.search(r"^\s*RUN: (\{.*\})\s*$", self.stdout, re.M)
        assert match, self.text
        return json.loads(match.group(1))

    def summary_lines(self) -> list[str]:
        """The lines of the summary of every host (the debug task of the summary play)."""
        match = re.search(r"TASK \[vmbackup\.libvirt\.backup : Show the outcome of every host\].*?\"msg\": (\[.*?\n    \])",
                          self.stdout, re.S)
        assert match, self.text
        return json.loads(match.group(1))


def playbook(ansible, inventory: pathlib.Path, extra_vars: dict, workdir: pathlib.Path, timeout: float = 900) -> Run:
    vars_file = workdir / f"vars-{uuid.uuid4().hex[:6]}.json"
    vars_file.write_text(json.dumps(extra_vars))
    env = dict(ansible.env, ANSIBLE_STDOUT_CALLBACK="default", ANSIBLE_SHOW_CUSTOM_STATS="1")
    argv = [str(pathlib.Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), WEEKLY, "-e", f"@{vars_file}"]
    return Run(subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False))


def line_of(lines: list[str], host: str) -> str:
    found = [ln for ln in lines if ln.startswith(f"{host}: ")]
    assert len(found) == 1, lines
    return found[0]


# ----------------------------------------------------------------------------- without the bed
def test_waves_cap_async_exports_and_host_failures(ansible, conn, domain_type, repo, tmp_path):
    """Two hosts (local connection) with two VMs each, backed up two VMs at a time (async) under a
    cap of one host: the hosts take turns, each writing both of its VMs at once. A third host's
    libvirt socket does not exist and a fourth refuses SSH: both are failed and named, the first
    two finish, rc != 0. A fifth fails outside the role's error handling (its report directory
    cannot be made): the summary still lists it, at the step where it stopped."""
    token = uuid.uuid4().hex[:6]
    factory = VmFactory(conn, domain_type)
    try:
        owner = {}
        for host in ("hvA", "hvB"):
            for n in (1, 2):
                # Shut off: a copy, about half a second of writing for 384 MiB.
                vm = factory.create([DiskSpec(size="512M", fill=[(0x5A, "0", "384M")])], running=False,
                                    name=f"{PREFIX}fleet-{token}-{host}-{n}")
                owner[vm.uuid] = host
        common = {"ansible_python_interpreter": sys.executable}
        hosts = {
            "hvA": {"ansible_connection": "local", "vmbackup_backup_include": [f"{PREFIX}fleet-{token}-hvA-*"]},
            "hvB": {"ansible_connection": "local", "vmbackup_backup_include": [f"{PREFIX}fleet-{token}-hvB-*"]},
            "hvC": {"ansible_connection": "local", "vmbackup_backup_uri": "qemu+unix:///system?socket=/nonexistent/libvirt-sock"},
            "hvD": {"ansible_host": "127.0.0.2", "ansible_port": 9, "ansible_user": "root",
                    "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"},
            # Nothing selected (allowed), and a report directory that cannot be made (under a file):
            # the host fails in a task outside the role's error handling, after its backups.
            "hvE": {"ansible_connection": "local", "vmbackup_backup_include": [f"nothing-{token}"], "vmbackup_backup_allow_empty": True,
                    "vmbackup_backup_report_dir": str(tmp_path / "a-file" / "reports")},
        }
        (tmp_path / "a-file").write_text("")
        common["vmbackup_backup_report_dir"] = None
        inventory = tmp_path / "inventory.yml"
        inventory.write_text(json.dumps({"hypervisors": {"hosts": {h: dict(common, **v) for h, v in hosts.items()}}}))
        variables = {"vmbackup_hosts": "hypervisors", "vmbackup_backup_repository": str(repo), "vmbackup_backup_period": "2026-W49",
                     "vmbackup_backup_concurrency": 2, "vmbackup_weekly_throttle": 1}

        with StagingSampler(repo, owner) as sampler:
            out = playbook(ansible, inventory, variables, tmp_path)
        assert out.rc != 0, out.text
        # Every VM of the two good hosts has its set of the week.
        for vm_uuid in owner:
            assert [m["period"] for m in committed(repo, vm_uuid)] == ["2026-W49"], out.text
        # The cap: one host writing at a time, seen from the repository; each host wrote its two
        # VMs at once (the async batch); both hosts wrote.
        assert sampler.hosts_seen() == {"hvA", "hvB"}, sampler.samples[:20]
        assert sampler.hosts_at_once() == 1, [s for s in sampler.samples if len({owner[u] for u in s}) > 1][:5]
        assert sampler.vms_of_one_host_at_once() == 2, sampler.samples[:50]

        # The failed hosts are failed (the unreachable one is recorded, not dropped); the good ones ok.
        assert out.recap("hvA")["failed"] == 0 and out.recap("hvB")["failed"] == 0, out.text
        assert out.recap("hvC")["failed"] == 1 and out.recap("hvD")["failed"] == 1, out.text
        assert out.recap("hvD")["unreachable"] == 0, out.text
        lines = out.summary_lines()
        assert line_of(lines, "hvA").startswith("hvA: ok, 2 VM(s) backed up, 2 changed"), lines
        assert re.match(r"hvC: FAILED at discovery: LIBVIRT_UNAVAILABLE .*/nonexistent/libvirt-sock", line_of(lines, "hvC")), lines
        assert re.match(r"hvD: UNREACHABLE: cannot be reached: .*127\.0\.0\.2 port 9: Connection refused", line_of(lines, "hvD")), lines
        assert out.recap("hvE")["failed"] == 1, out.text
        assert line_of(lines, "hvE").startswith("hvE: FAILED or UNREACHABLE at step report: the run stopped there"), lines
        summary = out.stats()["vmbackup_backup_run"]
        assert summary["outcome"] == "failed" and summary["ok_hosts"] == ["hvA", "hvB"], summary
        assert sorted(summary["failed_hosts"]) == ["hvC", "hvD", "hvE"], summary
        assert (summary["hosts"]["hvE"]["outcome"], summary["hosts"]["hvE"]["step"]) == ("lost", "report")
        assert (summary["hosts"]["hvC"]["outcome"], summary["hosts"]["hvC"]["error_code"]) == ("failed", "LIBVIRT_UNAVAILABLE")
        assert (summary["hosts"]["hvD"]["outcome"], summary["hosts"]["hvD"]["error_code"]) == ("unreachable", "HOST_UNREACHABLE")
    finally:
        factory.cleanup()


# ----------------------------------------------------------------------------- on the bed
def bed_vm(bed, host: str, conn, domain_type: str, name: str, running: bool, data: str):
    """A disk-only domain on a bed host: its image in the host's /var/lib/libvirt/images."""
    image = f"/var/lib/libvirt/images/{name}.qcow2"
    local = bed.path(host, image)
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(local), "1G"])
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {data}", str(local)])
    dom = conn.defineXML(
        f"<domain type='{domain_type}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{image}'/><target dev='vda' bus='virtio'/></disk></devices></domain>")
    if running:
        dom.create()
    return dom, local


def close_ssh_masters(bed) -> None:
    """Ansible's SSH control masters to the bed hosts (ControlPersist): a session multiplexed over
    the master of an earlier run would hang on a link that is down instead of failing to connect."""
    for sock in (bed.state / "cp").glob("*"):
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "dummy"], capture_output=True, check=False)


class BedRun:
    """A bed playbook result (testbed.PlaybookResult) read the way the tests above read theirs."""

    def __init__(self, result) -> None:
        self.result = result
        self.rc = result.rc

    @property
    def text(self) -> str:
        return f"rc={self.rc}\n{self.result.stdout[-15000:]}\n{self.result.stderr[-3000:]}"

    def failed(self, host: str) -> int:
        return self.result.stats[host]["failures"]

    def run_summary(self) -> dict:
        return self.result.json["global_custom_stats"]["vmbackup_backup_run"]

    def summary_lines(self) -> list[str]:
        (found,) = [res["msg"] for _task, _host, res in self.results("Show the outcome of every host")]
        return found

    def results(self, task: str) -> list[tuple[str, str, dict]]:
        """(task, host, result) of the role's task named ``task``."""
        return [r for r in self.result.results() if r[0] in (task, f"vmbackup.libvirt.backup : {task}")]


def test_weekly_across_the_bed(testbed):
    """Two running disk-only VMs on every bed host, the weekly playbook over the three hosts into
    the shared /srv/vmbackup: (1) all backed up, two hosts writing at once and never three (the
    playbook's cap); (2) hv2's libvirtd stopped; (3) hv3 unreachable over SSH; (4) hv3 lost in the
    middle of an export. In (2)-(4) the other two hosts are backed up, the run fails, and the
    summary names the host and why."""
    bed = testbed
    repo = bed.fresh_repo()
    close_ssh_masters(bed)  # none left by an earlier session on this bed
    token = uuid.uuid4().hex[:6]
    conns = {h: bed.connect(h) for h in bed.hosts}
    made: dict[str, list[tuple[str, pathlib.Path]]] = {h: [] for h in bed.hosts}  # host -> [(uuid, image)]
    owner: dict[str, str] = {}

    def doms(host: str) -> list:
        return [conns[host].lookupByUUIDString(u) for u, _image in made[host]]

    def periods(host: str) -> list[list[str]]:
        return [[m["period"] for m in committed(repo, u)] for u, _image in made[host]]

    try:
        domain_type = pick_domain_type(conns[bed.hosts[0]])
        for h in bed.hosts:
            for n, data in ((1, "512M"), (2, "384M")):
                dom, image = bed_vm(bed, h, conns[h], domain_type, f"{PREFIX}fleet-{token}-{h}-{n}", True, data)
                made[h].append((dom.UUIDString(), image))
                owner[dom.UUIDString()] = h
        variables = {"vmbackup_hosts": "hypervisors", "vmbackup_backup_repository": bed.repo,
                     "vmbackup_backup_include": [f"{PREFIX}fleet-{token}-*"], "vmbackup_backup_report_dir": None}

        def weekly(period: str) -> tuple[BedRun, StagingSampler]:
            with StagingSampler(repo, owner) as sampler:
                out = BedRun(bed.playbook(WEEKLY, dict(variables, vmbackup_backup_period=period)))
            # The cap (the weekly playbook's default, 2), seen from the repository in every run.
            assert sampler.hosts_at_once() <= 2, [s for s in sampler.samples if len({owner[u] for u in s}) > 2][:5]
            assert most_at_once(intervals_of([m for u in owner for m in committed(repo, u)], period)) <= 2
            return out, sampler

        # 1. Every host, in parallel, at most two at once.
        out, sampler = weekly("2026-W49")
        assert out.rc == 0, out.text
        assert sampler.hosts_seen() == set(bed.hosts) and sampler.hosts_at_once() == 2, sampler.samples[:40]
        manifests = {u: committed(repo, u) for u in owner}
        for vm_uuid, ms in manifests.items():
            assert [(m["host"], m["period"], m["type"]) for m in ms] == [(owner[vm_uuid], "2026-W49", "full")], ms
        # Overlapping [started, completed) of sets written by different hosts: the hosts ran at once.
        assert most_at_once(intervals_of([m for ms in manifests.values() for m in ms], "2026-W49")) == 2
        # Each host's libvirtd: its VMs still running, each with one checkpoint of ours; no other
        # host knows them.
        for h in bed.hosts:
            for dom in doms(h):
                assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
                assert [c.getName().startswith("vmbackup-") for c in dom.listAllCheckpoints(0)] == [True]
                for other in set(bed.hosts) - {h}:
                    with pytest.raises(libvirt.libvirtError):
                        conns[other].lookupByUUIDString(dom.UUIDString())
        assert out.run_summary()["ok_hosts"] == bed.hosts and out.run_summary()["outcome"] == "ok"

        # 2. hv2's libvirtd down: hv1 and hv3 are backed up, hv2 fails, named with libvirt's reason.
        with bed.libvirtd_stopped("hv2"):
            out, sampler = weekly("2026-W50")
        conns["hv2"] = bed.connect("hv2")
        assert out.rc != 0, out.text
        assert periods("hv1") == periods("hv3") == [["2026-W49", "2026-W50"]] * 2
        assert periods("hv2") == [["2026-W49"]] * 2
        assert out.failed("hv2") == 1 and out.failed("hv1") == out.failed("hv3") == 0, out.text
        line = line_of(out.summary_lines(), "hv2")
        assert re.match(r"hv2: FAILED at discovery: LIBVIRT_UNAVAILABLE .*libvirt-sock", line), out.summary_lines()
        summary = out.run_summary()
        assert summary["failed_hosts"] == ["hv2"] and summary["ok_hosts"] == ["hv1", "hv3"], summary
        assert [d.state()[0] for d in doms("hv2")] == [libvirt.VIR_DOMAIN_RUNNING] * 2  # as they were

        # 3. hv3 unreachable over SSH: hv1 and hv2 are backed up, hv3 is failed, named with the reason.
        close_ssh_masters(bed)
        with bed.ssh_blocked("hv3"):
            out, sampler = weekly("2026-W51")
        assert out.rc != 0, out.text
        assert periods("hv1") == [["2026-W49", "2026-W50", "2026-W51"]] * 2
        assert periods("hv2") == [["2026-W49", "2026-W51"]] * 2
        assert periods("hv3") == [["2026-W49", "2026-W50"]] * 2
        line = line_of(out.summary_lines(), "hv3")
        # ssh's own reason, as Ansible words it (it differs with pipelining, and with how the link went)
        assert re.match(r"hv3: UNREACHABLE: cannot be reached: .*\bssh\b.*: \S", line), line
        summary = out.run_summary()
        assert summary["failed_hosts"] == ["hv3"] and summary["hosts"]["hv3"]["outcome"] == "unreachable", summary
        assert out.failed("hv3") == 1 and out.failed("hv1") == out.failed("hv2") == 0, out.text
        for h in bed.hosts:  # the newest checkpoint of each VM only; hv3's untouched
            assert [len(d.listAllCheckpoints(0)) for d in doms(h)] == [1, 1]

        # 4. hv3 lost in the middle of its export (its link goes down once its staging directory
        #    appears): with an SSH keepalive (README, "Hosts that fail") the run does not hang; hv1
        #    and hv2 finish, the summary lists hv3 as lost at the export of that VM. hv3 takes a
        #    full (a long enough write to be caught), the others an incremental.
        overlay = bed.state / "runs" / f"overlay-{token}.yml"
        overlay.write_text(json.dumps({"all": {"hosts": {"hv3": {
            "vmbackup_weekly_full_every_sets": 1,
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR "
                                       "-o ConnectTimeout=5 -o ServerAliveInterval=1 -o ServerAliveCountMax=2"}}}}))
        first_of_hv3 = made["hv3"][0][0]
        cut = threading.Event()

        def cut_when_hv3_writes() -> None:
            while not cut.is_set():
                with contextlib.suppress(OSError):
                    if os.listdir(repo / "vms" / first_of_hv3 / ".incomplete"):
                        bed.block_ssh("hv3")
                        cut.set()
                time.sleep(0.005)

        close_ssh_masters(bed)
        watcher = threading.Thread(target=cut_when_hv3_writes, daemon=True)
        watcher.start()
        started = time.monotonic()
        try:
            out = BedRun(bed.playbook(WEEKLY, dict(variables, vmbackup_backup_period="2026-W52"),
                                      args=["-i", str(overlay)], timeout=300))
        finally:
            took = time.monotonic() - started
            was_cut = cut.is_set()
            cut.set()
            watcher.join()
            if was_cut:
                bed.unblock_ssh("hv3")
            overlay.unlink()
        assert was_cut and out.rc != 0 and took < 150, (was_cut, took, out.text)
        assert out.result.stats["hv3"]["unreachable"] == 1, out.text
        assert periods("hv1")[0][-1] == periods("hv1")[1][-1] == "2026-W52"
        assert periods("hv2")[0][-1] == periods("hv2")[1][-1] == "2026-W52"
        entry = out.run_summary()["hosts"]["hv3"]
        name = conns["hv3"].lookupByUUIDString(first_of_hv3).name()
        assert (entry["outcome"], entry["step"]) == ("lost", "export"), entry
        assert entry["line"].startswith(f"hv3: FAILED or UNREACHABLE at step export of {name}: the run stopped there"), entry
        assert out.run_summary()["failed_hosts"] == ["hv3"]
    finally:
        for h in bed.hosts:
            for vm_uuid, image in made[h]:
                with contextlib.suppress(libvirt.libvirtError):
                    destroy_vm(conns[h].lookupByUUIDString(vm_uuid))
                image.unlink(missing_ok=True)
        bed.fresh_repo()
