"""The policy check (module + playbooks/policy_check.yml) on a repository made by real exports,
verifies and drills of disk-only domains on the root libvirtd: one module-scoped scenario.

VMs: healthy (two copies, verified, drilled, tier gold), stale (exported under faketime three
days ago), failed-verify (a flipped byte in its newest copy, then verify), never drilled, one
defined in libvirt but never backed up, one opted out by its metadata, one excluded by the policy.
Asserted through other paths than the module's answer: the JUnit file parsed with xml.etree,
policy.json and policy.md read from disk, the playbook's exit status and set_stats, the
repository tree (contents, modes, inodes, mtimes) hashed before and after every run, --check.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest
import yaml

from harness import IMAGES, PREFIX, DiskSpec, VmFactory, destroy_vm, expect_error, make_dir, parse_result, tree_state
from test_backup_info import stat_state
from test_drill import flip_bit_in_data

METADATA_NS = "https://vmbackup.libvirt/schema/1"
REPO_BASE = pathlib.Path("/var/tmp/vmbackup-tests")
ROOT = pathlib.Path(__file__).resolve().parents[2]
RULES = ["rpo_hours", "verify_days", "chain", "min_points", "consistency", "drill_days", "two_copies"]
SETUP = """
- name: Back up and drill the policy test's VMs
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Export
      vmbackup.libvirt.export:
        name: "{{ item }}"
        repository: "{{ repo }}"
        skip_unchanged: false
      loop: "{{ export_vms }}"
    - name: Drill (offline checks)
      vmbackup.libvirt.drill:
        name: "{{ item }}"
        repository: "{{ repo }}"
        boot: never
        disk_dir: "{{ disk_dir }}"
      loop: "{{ drill_vms }}"
      register: drilled
      # The drill passed and its proof is written; a file it keeps because a foreign domain's disk on this
      # shared libvirtd cannot be read (another test's deliberately broken image) is removed below.
      failed_when: drilled.failed and drilled.error_code | default('') != 'DRILL_LEFTOVER'
"""


def ansible_bin(name: str) -> str:
    return str(pathlib.Path(sys.executable).parent / name)


class Run:
    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.rc, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr

    @property
    def text(self) -> str:
        return f"rc={self.rc}\n{self.stdout[-12000:]}\n{self.stderr[-4000:]}"

    def stats(self) -> dict:
        match = re.search(r"^\s*RUN: (\{.*\})\s*$", self.stdout, re.M)
        assert match, self.text
        return json.loads(match.group(1))


def playbook(env: dict, workdir: pathlib.Path, book: str, variables: dict, check: bool = False,
             faketime: str | None = None, cwd: pathlib.Path | None = None, inventory: str = "localhost,") -> Run:
    vars_file = workdir / f"vars-{uuid.uuid4().hex[:6]}.json"
    vars_file.write_text(json.dumps(variables))
    argv = [ansible_bin("ansible-playbook"), "-i", inventory, "-c", "local", book, "-e", f"@{vars_file}"]
    argv += ["--check"] if check else []
    argv = (["faketime", faketime] if faketime else []) + argv
    env = dict(env, ANSIBLE_STDOUT_CALLBACK="default", ANSIBLE_SHOW_CUSTOM_STATS="1")
    return Run(subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False, cwd=cwd))


def module(env: dict, args: dict, check: bool = False, faketime: str | None = None) -> dict:
    argv = [ansible_bin("ansible"), "localhost", "-m", "vmbackup.libvirt.policy_check", "-a", json.dumps(args)]
    argv += ["--check"] if check else []
    argv = (["faketime", faketime] if faketime else []) + argv
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    return parse_result(proc.stdout, proc.stderr)


def junit_suites(path: pathlib.Path) -> dict[str, dict[tuple[str, str], tuple[str, str]]]:
    """suite name -> {(classname, name) -> (outcome, message)}, read from the JUnit file with xml.etree."""
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = {}
    for suite in root.findall("testsuite"):
        out = suites.setdefault(suite.get("name"), {})
        for case in suite.findall("testcase"):
            failure, skipped, error = case.find("failure"), case.find("skipped"), case.find("error")
            if error is not None:
                outcome, message = "error", error.get("message")
            elif failure is not None:
                outcome, message = "failed", failure.get("message")
            elif skipped is not None:
                outcome, message = "skipped", skipped.get("message")
            else:
                outcome, message = "passed", (case.findtext("system-out") or "")
            key = (case.get("classname"), case.get("name"))
            assert key not in out, key
            out[key] = (outcome, message)
    return suites


def junit_cases(path: pathlib.Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(classname, name) -> (outcome, message) over every suite (each case once)."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for cases in junit_suites(path).values():
        assert not set(cases) & set(out), set(cases) & set(out)
        out.update(cases)
    return out


def repo_state(repo: pathlib.Path) -> tuple[dict, dict]:
    return tree_state(repo), stat_state(repo)


@pytest.fixture(scope="module")
def world(ansible, conn, domain_type, tmp_path_factory):
    token = uuid.uuid4().hex[:6]
    prefix = f"{PREFIX}pol-{token}-"
    workdir = tmp_path_factory.mktemp("policy")
    REPO_BASE.mkdir(mode=0o711, exist_ok=True)
    base = make_dir(REPO_BASE / f"pol-{token}")
    repo = make_dir(base / "repo")
    disk_dir = IMAGES / f"{prefix}drill"
    factory = VmFactory(conn, domain_type)
    try:
        vm = {role: factory.create([DiskSpec("16M", fill=[(0x41 + i, "0", "1M")])], running=False, name=f"{prefix}{role}")
              for i, role in enumerate(["healthy", "stale", "failedverify", "nodrill", "nobackup", "optout", "scratch"])}
        vm["healthy"].dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, '<backup tier="gold"/>', "vmbackup", METADATA_NS,
                                      libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        vm["optout"].dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, '<backup enabled="no"/>', "vmbackup", METADATA_NS,
                                     libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        setup = workdir / "setup.yml"
        setup.write_text(SETUP)
        common = {"repo": str(repo), "disk_dir": str(disk_dir)}
        # The stale VM's two copies three days ago (faketime shifts ansible and the modules, not QEMU).
        past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)).strftime("%Y-%m-%d %H:%M:%S")
        out = playbook(ansible.env, workdir, str(setup), dict(common, export_vms=[vm["stale"].name] * 2, drill_vms=[]),
                       faketime=past)
        assert out.rc == 0, out.text
        names = [vm[r].name for r in ("healthy", "failedverify", "nodrill")]
        out = playbook(ansible.env, workdir, str(setup), dict(
            common, export_vms=[n for n in names for dummy in (1, 2)],
            drill_vms=[vm[r].name for r in ("healthy", "stale", "failedverify")]))
        assert out.rc == 0, out.text
        # A flipped byte in the newest copy of failedverify (after its drill), then verify everything.
        sets_dir = repo / "vms" / vm["failedverify"].uuid / "sets"
        newest = sorted(p.name for p in sets_dir.iterdir() if p.is_dir())[-1]
        flip_bit_in_data(sets_dir / newest / "disks" / "vda.qcow2")
        verify = subprocess.run([ansible_bin("ansible"), "localhost", "-m", "vmbackup.libvirt.verify", "-a",
                                 json.dumps({"repository": str(repo), "fail_on_error": False})],
                                env=ansible.env, capture_output=True, text=True, timeout=300, check=False)
        assert not parse_result(verify.stdout, verify.stderr)["failed"], verify.stdout[-4000:]
        verdict = json.loads((sets_dir / f"{newest}.verify.json").read_text())
        assert verdict["outcome"] == "failed" and "CHECKSUM_MISMATCH" in verdict["codes"], verdict
        yield {"repo": repo, "base": base, "vm": vm, "prefix": prefix, "workdir": workdir, "failed_set": newest, "token": token}
    finally:
        factory.cleanup()
        for dom in conn.listAllDomains(0):
            if dom.name().startswith(f"vmbackup-drill-{prefix}"):
                destroy_vm(dom)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(disk_dir, ignore_errors=True)


def policy_for(prefix: str) -> dict:
    return {
        "rules": {"rpo_hours": 26, "verify_days": 8, "min_points": 2, "drill_days": 35,
                  "expressions": [{"name": "two_copies", "expr": "length(sets[?type=='copy']) >= `2`",
                                   "message": "fewer than two copies"}]},
        "classes": [{"name": "gold", "match": {"tier": "gold"}, "rules": {"drill_days": 7}}],
        "include": [f"{prefix}*"],
        "exclude": [f"{prefix}scratch"],
    }


def expected_outcomes(vm: dict) -> dict[tuple[str, str], str]:
    failing = {"healthy": set(), "stale": {"rpo_hours"}, "failedverify": {"verify_days", "chain", "min_points"},
               "nodrill": {"drill_days"}, "nobackup": set(RULES)}
    out = {}
    for role, v in vm.items():
        for rule in RULES:
            if role in ("optout", "scratch"):
                out[(v.name, rule)] = "skipped"
            else:
                out[(v.name, rule)] = "failed" if rule in failing[role] else "passed"
    return out


def test_policy_check_scenario(ansible, world):
    repo, vm, prefix, workdir = world["repo"], world["vm"], world["prefix"], world["workdir"]
    policy = policy_for(prefix)
    before = repo_state(repo)
    # A second "repository" that root must not trust (world-writable): reported as an error, never read.
    unsafe = make_dir(world["base"] / "unsafe", 0o777)
    variables = {"vmbackup_policy_hosts": "localhost", "vmbackup_policy_repositories": [str(repo), str(unsafe)],
                 "vmbackup_policy": policy}

    # --- the playbook, reports in the default directory (policy-report under the current directory)
    cwd = make_dir(workdir / "ci", 0o755)
    out = playbook(ansible.env, workdir, "vmbackup.libvirt.policy_check", variables, cwd=cwd)
    assert out.rc == 2, out.text
    assert "backup policy violated" in out.stdout, out.text
    report = cwd / "policy-report"
    cases = junit_cases(report / "policy.junit.xml")
    expected = {**expected_outcomes(vm), (f"localhost:{unsafe}", "read repository"): "error"}
    assert {k: v[0] for k, v in cases.items()} == expected, json.dumps({f"{k[0]}/{k[1]}": v for k, v in cases.items()}, indent=1)
    assert cases[(f"localhost:{unsafe}", "read repository")][1].startswith("UNSAFE_TARGET: ")
    # Why, in words an operator acts on.
    stale = cases[(vm["stale"].name, "rpo_hours")][1]
    match = re.fullmatch(r"newest point (\S+) \(set \S+\) is (\d+) h old, the policy allows 26 h", stale)
    assert match and 71 <= int(match.group(2)) <= 73, stale
    failed_set = world["failed_set"]
    assert re.search(rf"newest point \(set {failed_set}\) failed verification on \S+ \(CHECKSUM_MISMATCH\)",
                     cases[(vm["failedverify"].name, "verify_days")][1]), cases[(vm["failedverify"].name, "verify_days")]
    assert cases[(vm["failedverify"].name, "chain")][1].startswith(f"newest point {failed_set} is not restorable: ")
    assert "the newest restorable point is" in cases[(vm["failedverify"].name, "chain")][1]
    assert cases[(vm["failedverify"].name, "min_points")][1].startswith("1 restorable point (of 2 sets), the policy requires at least 2")
    assert cases[(vm["nodrill"].name, "drill_days")][1].startswith("never drilled")
    assert cases[(vm["healthy"].name, "drill_days")][1].endswith("the policy allows 7 days")  # the gold class
    assert all(f"has no backup in repository {repo}" in cases[(vm["nobackup"].name, r)][1] for r in RULES)
    assert cases[(vm["nobackup"].name, "two_copies")][0] == "failed"
    assert "opted out" in cases[(vm["optout"].name, "chain")][1] and "excluded" in cases[(vm["scratch"].name, "chain")][1]
    # The suite's counts agree with its cases (what CI systems show in their headers).
    suites = ET.parse(report / "policy.junit.xml").getroot().findall("testsuite")
    assert [s.get("name") for s in suites] == [f"localhost:{repo}", f"localhost:{unsafe}"] and suites[1].get("errors") == "1"
    assert (int(suites[0].get("tests")), int(suites[0].get("failures")), int(suites[0].get("skipped"))) == (
        len(cases) - 1, sum(v[0] == "failed" for v in cases.values()), sum(v[0] == "skipped" for v in cases.values()))

    # policy.json: the same cases; policy.md: a failure table first, then the counts.
    data = json.loads((report / "policy.json").read_text())
    assert data["passed"] is False and data["summary"]["failed"] == sum(v[0] == "failed" for v in cases.values())
    assert {(c["vm"], c["rule"]): c["outcome"] for c in data["repositories"][0]["cases"]} == expected_outcomes(vm)
    assert data["repositories"][1]["error"] == cases[(f"localhost:{unsafe}", "read repository")][1]
    md = (report / "policy.md").read_text()
    assert md.startswith("## Backup policy check: FAILED\n")
    rows = [line for line in md.splitlines() if line.startswith(f"| localhost:{repo} | ")]
    assert len(rows) == data["summary"]["failed"], md
    assert f"| localhost:{unsafe} | - | - | read repository | UNSAFE_TARGET: " in md and "2 repositories, 1 could not be read." in md
    assert any(f"| {vm['failedverify'].name} | localhost | chain | newest point {failed_set} is not restorable" in row for row in rows), md
    assert f"{data['summary']['failed']} failed, {data['summary']['passed']} passed, 14 skipped" in md
    # set_stats: what AWX keeps.
    stats = out.stats()["vmbackup_policy"]
    assert stats["passed"] is False and stats["summary"] == data["summary"]
    assert [e["repository"] for e in stats["errors"]] == [str(unsafe)] and data["errors"] == stats["errors"]
    assert {(c["vm"], c["rule"]) for c in stats["failed"]} == {k for k, v in cases.items() if v[0] == "failed"}
    assert repo_state(repo) == before
    assert not (repo / "vms" / vm["nobackup"].uuid).exists()

    # --- the generic CI step of docs/examples/ci: installs the tarball, runs the check, keeps the status
    ci = make_dir(workdir / "ci-step", 0o755)
    (ci / "policy.json").write_text(json.dumps(variables))
    (ci / "summary.md").write_text("")
    dist = pathlib.Path(ansible.env["ANSIBLE_COLLECTIONS_PATH"]).parent / "dist"
    env = dict(ansible.env, PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}", INVENTORY="localhost,",
               POLICY_FILE="policy.json", BECOME="", COLLECTION_SOURCE=str(next(dist.glob("vmbackup-libvirt-*.tar.gz"))),
               GITHUB_STEP_SUMMARY=str(ci / "summary.md"), ANSIBLE_COLLECTIONS_PATH="")
    step = subprocess.run(["sh", str(ROOT / "docs" / "examples" / "ci" / "policy-check.sh"), "-c", "local"], cwd=ci, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert step.returncode == 2, step.stdout[-6000:] + step.stderr[-3000:]
    assert "backup policy: VIOLATED (see policy-report/policy.junit.xml)" in step.stderr
    assert (ci / ".ci-collections" / "ansible_collections" / "vmbackup" / "libvirt" / "MANIFEST.json").is_file()
    assert junit_cases(ci / "policy-report" / "policy.junit.xml") == cases
    assert (ci / "summary.md").read_text() == (ci / "policy-report" / "policy.md").read_text() and md.splitlines()[0] in step.stdout
    assert repo_state(repo) == before

    # --- --check: the same verdict and exit status, no report written, nothing changed
    check_dir = workdir / "check-report"
    out = playbook(ansible.env, workdir, "vmbackup.libvirt.policy_check", dict(
        variables, vmbackup_policy_report_dir=str(check_dir), vmbackup_policy_per_host=True), check=True)
    assert out.rc == 2 and "backup policy violated" in out.stdout, out.text
    assert out.stats()["vmbackup_policy"]["summary"] == data["summary"]
    assert not check_dir.exists() and repo_state(repo) == before

    # --- without hypervisors only the repository's VMs are judged: the healthy one alone passes (rc 0);
    # two repository hosts read it, each a suite of the one report
    ok_dir = workdir / "ok-report"
    inventory = workdir / "two-hosts.ini"
    inventory.write_text("repo-a ansible_connection=local\nrepo-b ansible_connection=local\n")
    out = playbook(ansible.env, workdir, "vmbackup.libvirt.policy_check", {
        "vmbackup_policy_hosts": [], "vmbackup_policy_repository_host": "repo-a,repo-b", "vmbackup_policy_repositories": str(repo),
        "vmbackup_policy_report_dir": str(ok_dir),
        "vmbackup_policy": json.dumps(dict(policy, include=[vm["healthy"].name, vm["nobackup"].name]))},  # as a survey's text
        inventory=str(inventory))
    assert out.rc == 0, out.text
    suites = junit_suites(ok_dir / "policy.junit.xml")
    assert sorted(suites) == [f"repo-a:{repo}", f"repo-b:{repo}"], suites
    ok_cases = suites[f"repo-a:{repo}"]
    # The healthy VM has no tier without libvirt: the default class (drill_days 35) judges it.
    assert {k: v[0] for k, v in ok_cases.items()} == {(vm["healthy"].name, r): "passed" for r in RULES}, ok_cases
    assert ok_cases[(vm["healthy"].name, "drill_days")][1].endswith("the policy allows 35 days")
    assert suites[f"repo-b:{repo}"] == ok_cases
    assert out.stats()["vmbackup_policy"]["passed"] is True
    assert repo_state(repo) == before

    # --- a hypervisor that cannot be reached, one whose libvirt does not answer: the check fails, saying which
    bad_dir = workdir / "bad-hosts-report"
    inventory = workdir / "hypervisors.ini"
    inventory.write_text("[hypervisors]\nlocalhost ansible_connection=local\n"
                         "hv-gone ansible_host=127.0.0.1 ansible_port=1 ansible_connection=ssh\n"
                         "hv-nolibvirt ansible_connection=local vmbackup_policy_uri=qemu+unix:///system?socket=/nonexistent/sock\n")
    out = playbook(ansible.env, workdir, "vmbackup.libvirt.policy_check", {
        "vmbackup_policy_repository": str(repo), "vmbackup_policy_report_dir": str(bad_dir),
        "vmbackup_policy": dict(policy, include=[vm["healthy"].name])}, inventory=str(inventory))
    assert out.rc == 2, out.text
    bad = junit_cases(bad_dir / "policy.junit.xml")
    assert {k: v[0] for k, v in bad.items()} == {("host hv-gone", "discovery"): "failed", ("host hv-nolibvirt", "discovery"): "failed",
                                                 **{(vm["healthy"].name, r): "passed" for r in RULES}}, bad
    assert "could not be listed (unreachable: " in bad[("host hv-gone", "discovery")][1]
    assert "could not be listed (LIBVIRT_UNAVAILABLE " in bad[("host hv-nolibvirt", "discovery")][1]
    # A misspelt hypervisor pattern does not pass on the repository alone.
    out = playbook(ansible.env, workdir, "vmbackup.libvirt.policy_check", {
        "vmbackup_policy_hosts": "hypervisor", "vmbackup_policy_repository": str(repo), "vmbackup_policy_report_dir": str(bad_dir),
        "vmbackup_policy": dict(policy, include=[vm["healthy"].name])}, inventory=str(inventory))
    assert out.rc == 2, out.text
    typo = junit_cases(bad_dir / "policy.junit.xml")
    assert typo[("host hypervisor", "discovery")][0] == "failed" and "matched no host" in typo[("host hypervisor", "discovery")][1]
    assert sorted(k for k, v in typo.items() if v[0] == "failed") == [("host hypervisor", "discovery")]
    assert repo_state(repo) == before

    # --- the module: the managed host's clock (two days on, the healthy VM is stale too), POLICY_VIOLATED, check mode
    args = {"repository": str(repo), "policy": dict(policy, include=[vm["healthy"].name])}
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)).strftime("%Y-%m-%d %H:%M:%S")
    r = expect_error(module(ansible.env, args, faketime=later), "POLICY_VIOLATED")
    assert r["changed"] is False and r["passed"] is False and r["summary"]["failed"] >= 1
    assert [(c["rule"], c["outcome"]) for c in r["cases"] if c["outcome"] == "failed"] == [("rpo_hours", "failed")], r["cases"]
    assert 47 <= r["cases"][0]["value"] <= 50 and r["cases"][0]["limit"] == 26
    real = module(ansible.env, args)
    checked = module(ansible.env, args, check=True)
    assert real["passed"] is True and not real["failed"] and real["changed"] is False
    assert [c["outcome"] for c in checked["cases"]] == [c["outcome"] for c in real["cases"]]
    # A misspelt rule is an error naming the key, before the repository is read.
    r = expect_error(module(ansible.env, {"repository": str(repo), "policy": {"rules": {"rpo_hour": 26}}}), "INVALID_ARGUMENT")
    assert "rules.rpo_hour" in r["msg"], r["msg"]
    assert repo_state(repo) == before


def test_ci_examples_publish_what_the_step_writes():
    """The pipeline files run the generic step and publish the JUnit file where it writes it."""
    examples = ROOT / "docs" / "examples" / "ci"
    step = (examples / "policy-check.sh").read_text()
    assert 'REPORT_DIR="${REPORT_DIR:-policy-report}"' in step
    gitlab = yaml.safe_load((examples / "gitlab-ci.yml").read_text())["backup-policy"]
    assert gitlab["script"] == ["sh ci/policy-check.sh"]
    assert gitlab["artifacts"]["reports"]["junit"] == "policy-report/policy.junit.xml" and gitlab["artifacts"]["when"] == "always"
    github = yaml.safe_load((examples / "github-actions.yml").read_text())
    steps = github["jobs"]["policy-check"]["steps"]
    assert any(s.get("run") == "sh ci/policy-check.sh" for s in steps)
    junit = next(s for s in steps if "action-junit-report" in s.get("uses", ""))
    assert junit["with"]["report_paths"] == "policy-report/policy.junit.xml" and junit["if"] == "always()"
    policy = yaml.safe_load((examples / "policy.yml").read_text())
    assert set(policy) == {"vmbackup_policy", "vmbackup_policy_repository_host", "vmbackup_policy_repositories"}
