"""What AWX / Automation Controller receives from the collection's playbooks, produced the way AWX
produces it: ansible-runner with a private data dir (project/, inventory/, env/), the awx_display
callback writing job events, and the artifacts directory AWX reads (rc, status, stdout,
job_events/). The project is docs/examples/awx/project (the thin wrappers a job template
points at), the collection the installed tarball (ANSIBLE_COLLECTIONS_PATH, as an execution
environment or a project's collections/requirements.yml provides it).

Scenario: the weekly playbook over 10 disk-only VMs of one hypervisor host (an inventory host
with a local connection, in group `hypervisors`), where one VM's disk is not a qcow2 image any
more (its header overwritten): the job fails (rc != 0, status failed), the playbook_on_stats
event's artifact_data (set_stats) names the failed VM, its step and its error code, the job
events carry the failed task and the nine exports, and the nine other VMs are backed up (read
from the repository on disk and compared with qemu-img, not taken from the job's word). Then
the disk is repaired and the job relaunched in the same week, as an operator does from AWX:
the nine are not backed up again, the tenth is, the job is successful. The workflow's other
nodes run the same way with the artifacts AWX passes them: the notify playbook (failure branch)
and the policy check (fails while a VM libvirt has lacks a backup, passes after the relaunch;
the repository byte-identical), and the restore job template from its survey.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import pathlib
import shutil
import sys
import signal
import threading
import typing as t
import uuid
import xml.etree.ElementTree as ET

import ansible_runner
import pytest

from harness import (PREFIX, DiskSpec, Domains, VmFactory, images_equal, job_running, listing, make_dir, parse_disk_sources,
                     tree_state, wait_for)

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROJECT = ROOT / "docs" / "examples" / "awx" / "project"
VENV_BIN = pathlib.Path(sys.executable).parent
HOST = "hv-local"  # an inventory name that is not "localhost": the summary must use it
QCOW2_MAGIC = b"QFI\xfb"


def scratch_root(name: str) -> pathlib.Path:
    """A fresh directory for repositories and disks where QEMU (libvirt-qemu) can traverse."""
    base = pathlib.Path("/var/tmp/vmbackup-tests")
    base.mkdir(mode=0o711, exist_ok=True)
    os.chmod(base, 0o711)
    return make_dir(base / name)


def survey_defaults(name: str) -> dict:
    """The answers of a survey of docs/examples/awx/surveys left at their defaults."""
    spec = json.loads((ROOT / "docs" / "examples" / "awx" / "surveys" / name).read_text())["spec"]
    return {q["variable"]: q["default"] for q in spec}


def private_data_dir(root: pathlib.Path, group_vars: dict) -> pathlib.Path:
    """The layout AWX writes for a job: the project checkout and the inventory (a host of group
    hypervisors with its group variables, as an AWX inventory source or a constructed inventory
    gives them)."""
    pdd = root / "pdd"
    shutil.copytree(PROJECT, pdd / "project")
    (pdd / "inventory").mkdir(parents=True)
    inventory = {"all": {"children": {"hypervisors": {
        "hosts": {HOST: {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}},
        "vars": group_vars}}}}
    (pdd / "inventory" / "hosts.json").write_text(json.dumps(inventory))
    return pdd


class Job:
    """One ansible-runner run, and what AWX keeps of it, read back from the artifacts directory
    (never from the Runner object alone)."""

    def __init__(self, pdd: pathlib.Path, ident: str, playbook: str, extravars: dict, env: dict,
                 cancel: t.Callable[[], bool] | None = None, limit: str | None = None, **envvars: str) -> None:
        self.runner = ansible_runner.run(
            private_data_dir=str(pdd), ident=ident, playbook=playbook, extravars=extravars, quiet=True, limit=limit,
            timeout=600, cancel_callback=cancel, settings={"pexpect_timeout": 0.5},
            # The venv's ansible-playbook first on PATH (runner starts "ansible-playbook" by name).
            envvars=dict({k: env[k] for k in ("ANSIBLE_COLLECTIONS_PATH", "ANSIBLE_LOCAL_TEMP", "ANSIBLE_HOST_KEY_CHECKING")},
                         PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **envvars),
        )
        self.dir = pdd / "artifacts" / ident
        # job_events/<counter>-<uuid>.json, one event per file: parsed here independently.
        self.events = sorted((json.loads(p.read_text()) for p in (self.dir / "job_events").glob("*.json")),
                             key=lambda e: e["counter"])
        self.stdout = (self.dir / "stdout").read_text()

    def of(self, event: str) -> list[dict]:
        return [e for e in self.events if e["event"] == event]

    @property
    def stats(self) -> dict:
        found = self.of("playbook_on_stats")
        assert len(found) == 1, [e["event"] for e in self.events]
        return found[0]["event_data"]

    @property
    def text(self) -> str:
        return f"rc={self.runner.rc} status={self.runner.status}\n{self.stdout[-15000:]}"


def sets_of(repo: pathlib.Path, vm_uuid: str) -> dict[str, dict]:
    root = repo / "vms" / vm_uuid / "sets"
    return {d.name: json.loads((d / "manifest.json").read_text())
            for d in sorted(root.iterdir()) if d.is_dir() and (d / "manifest.json").exists()} if root.exists() else {}


@pytest.fixture(scope="module")
def weekly(ansible, conn, domain_type, tmp_path_factory):
    """10 disk-only VMs (2 running, 8 shut off), one with a corrupted disk; the weekly job run once."""
    token = uuid.uuid4().hex[:6]
    root = scratch_root(f"awx-{token}")
    repo = make_dir(root / "repo")
    factory = VmFactory(conn, domain_type)
    try:
        vms = [factory.create([DiskSpec(size="16M", fill=[(0x40 + i, f"{i}M", "1M")])], running=i < 2,
                              name=f"{PREFIX}awx-{token}-{i:02d}") for i in range(10)]
        bad = vms[7]
        with open(bad.disks["vda"], "r+b") as fh:
            assert fh.read(4) == QCOW2_MAGIC
            fh.seek(0)
            fh.write(b"\0\0\0\0")
        pdd = private_data_dir(tmp_path_factory.mktemp("awx"), {
            "vmbackup_backup_repository": str(repo),
            "vmbackup_backup_include": [f"{PREFIX}awx-{token}-*"],
            "vmbackup_backup_report_dir": str(root / "reports"),
            # Where a restore puts its disks on this host (inventory, not a survey question).
            "vmbackup_restore_disk_dir": str(make_dir(root / "disks")),
        })
        # The survey's answers as AWX sends them: its defaults (an empty "Pin the period" included).
        survey = survey_defaults("backup_weekly.json")
        assert survey["vmbackup_hosts"] == "hypervisors" and survey["vmbackup_backup_period"] == ""
        job = Job(pdd, "weekly-1", "backup_weekly.yml", survey, ansible.env)
        yield {"token": token, "job": job, "vms": vms, "conn": conn, "bad": bad, "repo": repo, "root": root, "pdd": pdd, "survey": survey,
               "env": ansible.env, "period": "%d-W%02d" % dt.datetime.now(dt.timezone.utc).isocalendar()[:2]}
    finally:
        factory.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def test_failed_vm_fails_the_job_visibly(weekly):
    job, bad = weekly["job"], weekly["bad"]
    # Exit status and status as AWX stores them (the artifacts' rc and status files too).
    assert job.runner.rc == 2 and job.runner.status == "failed", job.text  # ansible-playbook's "a host failed"
    assert (job.dir / "rc").read_text() == str(job.runner.rc)
    assert (job.dir / "status").read_text() == "failed"
    assert (job.dir / "command").exists() and json.loads((job.dir / "command").read_text())["command"][0] == "ansible-playbook"
    # Host recap: the hypervisor failed once (the last play), localhost (the summary) did not.
    stats = job.stats
    assert stats["failures"] == {HOST: 1} and stats["dark"] == {}, stats
    assert stats["ok"].get("localhost", 0) > 0 and "localhost" not in stats["failures"]

    # set_stats as the artifacts AWX keeps and passes to the next workflow node.
    artifacts = stats["artifact_data"]
    assert sorted(artifacts) == ["vmbackup_backup", "vmbackup_backup_run"], sorted(artifacts)
    run = artifacts["vmbackup_backup_run"]
    assert run["outcome"] == "failed" and run["failed_hosts"] == [HOST] and run["ok_hosts"] == [], run
    entry = run["hosts"][HOST]
    assert entry["outcome"] == "failed" and entry["failed_vms"] == [bad.name] and entry["error_code"] == "BACKUP_FAILED", entry
    assert entry["line"].startswith(f"{HOST}: FAILED: 1 of 10 VM(s): {bad.name} at preflight: BACKUP_FAILED"), entry
    summary = artifacts["vmbackup_backup"][HOST]
    assert summary["series"] == "weekly" and summary["period"] == weekly["period"] and summary["outcome"] == "failed"
    assert summary["totals"]["vms"] == 10 and summary["totals"]["ok"] == 9 and summary["totals"]["failed"] == 1, summary["totals"]
    assert [(f["name"], f["step"], f["error_code"]) for f in summary["failures"]] == [(bad.name, "preflight", "BACKUP_FAILED")]
    assert "not in qcow2 format" in summary["failures"][0]["msg"]
    # The same summary is the report file the role wrote on the host.
    report = json.loads((weekly["root"] / "reports" / "vmbackup-weekly.json").read_text())
    assert report["failures"] == summary["failures"] and report["totals"] == summary["totals"]


def test_job_events(weekly):
    job, bad, vms = weekly["job"], weekly["bad"], weekly["vms"]
    counters = [e["counter"] for e in job.events]
    assert counters == list(range(1, len(counters) + 1)), counters  # nothing lost, nothing twice
    assert job.events[0]["event"] == "playbook_on_start" and job.events[-1]["event"] == "playbook_on_stats"
    assert len(list(job.runner.events)) == len(job.events)
    # The plays AWX shows, in order.
    assert [e["event_data"]["play"] for e in job.of("playbook_on_play_start")] == [
        "Weekly backup of the libvirt VMs", "Sum up the weekly backup of every host", "Fail the hosts whose weekly backup failed"]

    # The VM that cannot be backed up: its plan fails (ignored: the others go on), with the code.
    planned = [e for e in job.of("runner_item_on_failed") if e["event_data"]["task"] == "Plan each VM's backup (export in check mode)"]
    assert [(e["event_data"]["res"]["item"]["name"], e["event_data"]["res"]["error_code"]) for e in planned] == [(bad.name, "BACKUP_FAILED")]
    # The one failure that is not ignored: the last play fails the host, naming the VM and the code.
    final = [e for e in job.of("runner_on_failed") if not e["event_data"].get("ignore_errors")]
    assert len(final) == 1, [(e["event_data"]["task"], e["event_data"]["host"]) for e in final]
    data = final[0]["event_data"]
    assert data["host"] == HOST and data["play"] == "Fail the hosts whose weekly backup failed"
    assert data["task"] == "Fail the host when a VM or the preflight failed" and data["task_action"] == "ansible.builtin.fail"
    assert f"{bad.name} at preflight: BACKUP_FAILED" in data["res"]["msg"], data["res"]["msg"]
    # The nine exports: one runner_on_ok each, changed, with the set id the repository holds.
    exports = {e["event_data"]["task"][len("Export "):]: e["event_data"]["res"] for e in job.of("runner_on_ok")
               if e["event_data"]["task"].startswith("Export ") and e["event_data"]["task_action"] == "vmbackup.libvirt.export"}
    assert sorted(exports) == sorted(vm.name for vm in vms if vm is not bad), sorted(exports)
    for vm in vms:
        if vm is bad:
            continue
        res = exports[vm.name]
        assert res["changed"] and list(sets_of(weekly["repo"], vm.uuid)) == [res["set_id"]], (vm.name, res)
    # stdout (what AWX shows as the job output) carries the summary line too.
    assert f"{HOST}: FAILED: 1 of 10 VM(s): {bad.name} at preflight: BACKUP_FAILED" in job.stdout


def test_the_other_nine_are_in_the_repository(weekly):
    repo, bad = weekly["repo"], weekly["bad"]
    for vm in weekly["vms"]:
        found = sets_of(repo, vm.uuid)
        if vm is bad:
            assert found == {} and listing(repo / "vms" / vm.uuid / ".incomplete") == [], found
            continue
        assert len(found) == 1, (vm.name, found)
        (set_id, m), = found.items()
        assert m["vm"] == {"uuid": vm.uuid, "name": vm.name}, m["vm"]
        assert m["series"] == "weekly" and m["period"] == weekly["period"], m
        assert m["type"] == ("full" if vm.dom.isActive() else "copy"), (vm.name, m["type"])
        ok, out = images_equal(str(repo / "vms" / vm.uuid / "sets" / set_id / "disks" / "vda.qcow2"), str(vm.disks["vda"]))
        assert ok, (vm.name, out)
        assert (repo / "vms" / vm.uuid / "sets" / f"{set_id}.verify.json").exists()  # verified by the job


class Webhook(http.server.BaseHTTPRequestHandler):
    """A chat webhook: records what is posted to it."""
    received: list[tuple[str, dict]] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Webhook.received.append((self.path, json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


def test_workflow_failure_branch_notifies(weekly):
    """The workflow's failure node (docs/examples/awx/project/notify.yml) gets the failed job's
    artifacts as extra vars, as AWX passes them, plus the webhook credential's secret URL: it
    posts the summary, hides the secret from every event and from stdout, and fails (the
    workflow stays red)."""
    secret = uuid.uuid4().hex
    server = http.server.HTTPServer(("127.0.0.1", 0), Webhook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        extravars = dict(weekly["job"].stats["artifact_data"],
                         vmbackup_notify_webhook_url=f"http://127.0.0.1:{server.server_port}/hooks/{secret}")
        # Even with task arguments shown in the output (an AWX setting some admins turn on).
        job = Job(weekly["pdd"], "notify-1", "notify.yml", extravars, weekly["env"], ANSIBLE_DISPLAY_ARGS_TO_STDOUT="True")
    finally:
        server.shutdown()
        thread.join()
    bad = weekly["bad"]
    assert job.runner.rc == 2 and job.runner.status == "failed", job.text
    (path, body), = Webhook.received
    assert path == f"/hooks/{secret}"
    lines = body["text"].splitlines()
    assert lines[0] == f"vmbackup: the backup FAILED on {HOST}", lines
    assert lines[1].startswith(f"{HOST}: FAILED: 1 of 10 VM(s): {bad.name} at preflight: BACKUP_FAILED"), lines
    # The last task fails with the message's first line; nothing else failed.
    failed = job.of("runner_on_failed")
    assert [(e["event_data"]["task"], e["event_data"]["res"]["msg"]) for e in failed] == [
        ("Fail when what was reported failed (keeps the workflow red)", lines[0])]
    # The secret is in no event and not in the job output AWX stores and shows.
    for event in job.events:
        assert secret not in json.dumps(event), event["event"]
    assert secret not in job.stdout and "the webhook took the message (HTTP 204)" in job.stdout


def policy_survey(weekly) -> dict:
    """The policy check's survey answers (docs/examples/awx/surveys/policy_check.json): the policy
    as YAML text from the textarea; only this test's VMs (include), one point is enough, no drill yet."""
    return dict(survey_defaults("policy_check.json"),
                vmbackup_policy=f"include: ['{PREFIX}awx-{weekly['token']}-*']\nrules: {{min_points: 1, drill_days: null}}\n",
                vmbackup_policy_repository_host=HOST, vmbackup_policy_repositories=str(weekly["repo"]))


def test_policy_check_fails_on_the_vm_without_a_backup(weekly):
    """The workflow's success node, run on the failed week: the VM libvirt has and the repository
    lacks fails its rules; the job fails with the artifact vmbackup_policy; the repository is
    byte-identical afterwards. Then its failure branch: notify gets the policy's artifacts."""
    bad, repo = weekly["bad"], weekly["repo"]
    before = tree_state(repo)
    job = Job(weekly["pdd"], "policy-1", "policy_check.yml", policy_survey(weekly), weekly["env"])
    assert job.runner.rc == 2 and job.runner.status == "failed", job.text
    assert (job.dir / "status").read_text() == "failed"
    assert tree_state(repo) == before
    policy = job.stats["artifact_data"]["vmbackup_policy"]
    assert policy["passed"] is False and policy["errors"] in ([], 0, None), policy
    assert {c["vm"] for c in policy["failed"]} == {bad.name}, policy["failed"]
    assert all(c["outcome"] == "failed" and c["message"] for c in policy["failed"])
    assert policy["summary"]["vms"] == 10 and policy["summary"]["failed_vms"] == 1, policy["summary"]
    final = [e for e in job.of("runner_on_failed") if not e["event_data"].get("ignore_errors")]
    assert [e["event_data"]["task"] for e in final] == ["Fail when the policy is not met"], final
    weekly["policy_failed"] = job.stats["artifact_data"]
    # The reports land in the job's working directory, the project checkout (in AWX: inside the
    # job's container, gone with it; what stays is the artifacts and the output).
    junit = ET.parse(weekly["pdd"] / "project" / "policy-report" / "policy.junit.xml")
    failing = {c.get("classname") for c in junit.iter("testcase") if c.find("failure") is not None}
    assert failing == {bad.name}, failing

    notify = Job(weekly["pdd"], "notify-2", "notify.yml", dict(weekly["job"].stats["artifact_data"], **weekly["policy_failed"]),
                 weekly["env"])
    assert notify.runner.rc == 2, notify.text
    shown = [e["event_data"]["res"]["msg"] for e in notify.of("runner_on_ok") if e["event_data"]["task"] == "Show the message"]
    assert len(shown) == 1 and any(line.startswith("vmbackup: the policy check FAILED: ") for line in shown[0]), shown
    assert [c["message"] for c in policy["failed"]] == shown[0][-len(policy["failed"]):], shown


def test_relaunch_after_the_repair(weekly):
    """The operator repairs the disk and relaunches the job (same survey answers, same week)."""
    repo, bad = weekly["repo"], weekly["bad"]
    with open(bad.disks["vda"], "r+b") as fh:
        fh.write(QCOW2_MAGIC)
    before = {vm.name: sets_of(repo, vm.uuid) for vm in weekly["vms"]}
    # Relaunched with the job's Limit set to the host: the limit leaves out localhost, so the
    # summary play is skipped and the last play's first host publishes the summary instead.
    job = Job(weekly["pdd"], "weekly-2", "backup_weekly.yml", weekly["survey"], weekly["env"], limit=HOST)
    assert job.runner.rc == 0 and job.runner.status == "successful", job.text
    assert "localhost" not in job.stats["ok"], job.stats["ok"]
    assert (job.dir / "rc").read_text() == "0" and (job.dir / "status").read_text() == "successful"
    assert job.stats["failures"] == {} and job.stats["dark"] == {}
    run = job.stats["artifact_data"]["vmbackup_backup_run"]
    assert run["outcome"] == "ok" and run["ok_hosts"] == [HOST] and run["failed_hosts"] == [], run
    totals = job.stats["artifact_data"]["vmbackup_backup"][HOST]["totals"]
    assert totals["ok"] == 10 and totals["failed"] == 0 and totals["changed"] == 1, totals
    for vm in weekly["vms"]:
        after = sets_of(repo, vm.uuid)
        if vm is bad:
            assert len(after) == 1 and next(iter(after.values()))["period"] == weekly["period"], after
        else:
            assert after == before[vm.name], vm.name  # same period: not backed up again
    # The first run's artifacts are still there, beside the second's (AWX keeps every job).
    assert (weekly["pdd"] / "artifacts" / "weekly-1" / "status").read_text() == "failed"

    # The workflow's success edge: the policy check passes now, and says so in its artifacts.
    before = tree_state(repo)
    # A Limit that leaves out the host reading the repository would skip the judging play: refused.
    job = Job(weekly["pdd"], "policy-limited", "policy_check.yml", dict(policy_survey(weekly), vmbackup_policy_repository_host="localhost"),
              weekly["env"], limit=HOST)
    assert job.runner.rc != 0 and job.runner.status == "failed", job.text
    assert "leaves out localhost, the host that reads the repositories" in job.stdout, job.text
    assert "vmbackup_policy" not in job.stats.get("artifact_data", {}), job.stats
    job = Job(weekly["pdd"], "policy-2", "policy_check.yml", policy_survey(weekly), weekly["env"])
    assert job.runner.rc == 0 and job.runner.status == "successful", job.text
    policy = job.stats["artifact_data"]["vmbackup_policy"]
    assert policy["passed"] is True and policy["failed"] == [] and policy["summary"]["vms"] == 10, policy
    assert tree_state(repo) == before


def test_restore_job_from_its_survey(weekly):
    """The restore job template: its survey's defaults plus the required answers, text as AWX
    sends it ("false"); the VM defined under the new name from the newest set, shut off, its disk
    equal to the source's (qemu-img compare), the source untouched."""
    vm, repo, conn = weekly["vms"][3], weekly["repo"], weekly["conn"]
    domains = Domains(conn)
    target = domains.new_name(f"awx-{weekly['token']}-restored")
    answers = dict(survey_defaults("restore.json"), vmbackup_restore_host=HOST, vmbackup_restore_repository=str(repo),
                   vmbackup_restore_name=vm.name, vmbackup_restore_as=target)
    assert answers["vmbackup_restore_start"] == "false" and answers["vmbackup_restore_point"] == "latest"
    source_xml = vm.dom.XMLDesc(0)
    try:
        job = Job(weekly["pdd"], "restore-1", "restore.yml", answers, weekly["env"])
        assert job.runner.rc == 0 and job.runner.status == "successful", job.text
        summary = job.stats["artifact_data"]["vmbackup_restore"][HOST]
        (newest,) = sets_of(repo, vm.uuid)
        assert summary["outcome"] == "ok" and summary["set_id"] == newest and summary["vm"]["name"] == target, summary
        dom = domains.lookup(target)
        assert dom is not None and not dom.isActive() and dom.UUIDString() != vm.uuid
        disks = list(parse_disk_sources(dom.XMLDesc(0)).values())
        assert len(disks) == 1, disks
        disk = disks[0]
        assert disk.startswith(str(weekly["root"] / "disks") + "/"), disk
        ok, out = images_equal(disk, str(vm.disks["vda"]))
        assert ok, out
        assert vm.dom.XMLDesc(0) == source_xml
    finally:
        domains.cleanup()


def job_processes(artifact_dir: pathlib.Path) -> list[int]:
    """The processes a job started (ansible-runner exports AWX_ISOLATED_DATA_DIR to all of them)."""
    marker = f"AWX_ISOLATED_DATA_DIR={artifact_dir}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if marker in pathlib.Path(f"/proc/{entry}/environ").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def test_cancel_during_an_export_and_relaunch(ansible, conn, domain_type, tmp_path):
    """AWX's Cancel button during the weekly job, while the running VM's export module is at work:
    ansible-runner kills ansible-playbook (status canceled, rc 254, no stats event, so no
    artifacts), and, as AWX kills the job's container, every process the job started dies with it.
    The relaunch cleans up what the killed export left and backs up both VMs: one set each, no
    staging leftovers, no libvirt job, the running VM still running."""
    token = uuid.uuid4().hex[:6]
    root = scratch_root(f"awx-cancel-{token}")
    repo = make_dir(root / "repo")
    factory = VmFactory(conn, domain_type)
    try:
        live = factory.create([DiskSpec(size="64M", fill=[(0x5C, "0", "48M")])], name=f"{PREFIX}awxc-{token}-live")
        off = factory.create([DiskSpec(size="16M", fill=[(0x5D, "0", "1M")])], running=False, name=f"{PREFIX}awxc-{token}-off")
        pdd = private_data_dir(tmp_path, {"vmbackup_backup_repository": str(repo), "vmbackup_backup_include": [f"{PREFIX}awxc-{token}-*"],
                                          "vmbackup_backup_report_dir": str(root / "reports")})
        artifacts = pdd / "artifacts" / "cancel-1"

        def exporting() -> bool:
            """The task "Export <live>" has started (its job event is written) and its module is at work
            (a process of the job running AnsiballZ_export)."""
            started = False
            for path in (artifacts / "job_events").glob("*-*.json"):
                try:
                    event = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue  # being written
                started = started or (event["event"] == "runner_on_start" and event["event_data"].get("task") == f"Export {live.name}")
            if not started:
                return False
            for pid in job_processes(artifacts):
                try:
                    if b"AnsiballZ_export" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
                        return True
                except OSError:
                    pass
            return False

        job = Job(pdd, "cancel-1", "backup_weekly.yml", survey_defaults("backup_weekly.json"), ansible.env, cancel=exporting)
        assert job.runner.status == "canceled" and job.runner.rc == 254, job.text
        assert (job.dir / "status").read_text() == "canceled" and (job.dir / "rc").read_text() == "254"
        assert job.of("playbook_on_stats") == []  # a canceled job has no artifacts: the workflow gets no summary
        started = [e["event_data"]["task"] for e in job.of("runner_on_start")]
        assert started[-1] == f"Export {live.name}", started[-3:]
        # ansible-runner kills ansible-playbook's process group; the worker of the running task is in a
        # session of its own (setsid) and would run its module to the end. In AWX the job's container
        # goes with the cancel, and everything the job started with it: so here too.
        for pid in job_processes(job.dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not job_processes(job.dir), timeout=30, what="the job's processes to exit")
        assert live.dom.isActive()

        again = Job(pdd, "cancel-2", "backup_weekly.yml", survey_defaults("backup_weekly.json"), ansible.env)
        assert again.runner.rc == 0 and again.runner.status == "successful", again.text
        assert again.stats["artifact_data"]["vmbackup_backup_run"]["outcome"] == "ok"
        for vm in (live, off):
            found = sets_of(repo, vm.uuid)
            assert len(found) == 1, (vm.name, found)
            ok, out = images_equal(str(repo / "vms" / vm.uuid / "sets" / next(iter(found)) / "disks" / "vda.qcow2"), str(vm.disks["vda"]))
            assert ok, (vm.name, out)
            assert listing(repo / "vms" / vm.uuid / ".incomplete") == []
        assert live.dom.isActive() and not job_running(live.dom)
        assert len(live.checkpoints()) == 1  # the committed set's, the next incremental's parent
    finally:
        factory.cleanup()
        shutil.rmtree(root, ignore_errors=True)
