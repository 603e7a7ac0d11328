"""The README's quick start, as written: build the tarball, install it into a clean collections path,
run the main job (the demo playbook) from the installed copy - in a copy of the checkout whose
plugins, roles and playbooks are removed before the playbook runs, so that only the installed
collection can serve it."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import uuid

import libvirt

from harness import destroy_vm, images_equal, parse_disk_sources

ROOT = pathlib.Path(__file__).resolve().parents[2]
START, END = "<!-- quickstart -->", "<!-- /quickstart -->"


def quickstart_block(readme: str) -> list[str]:
    """The command lines of the README's quick start: the fenced bash block between the markers."""
    assert readme.count(START) == 1 and readme.count(END) == 1, f"README.md: one {START} ... {END} block"
    marked = readme[readme.index(START) + len(START):readme.index(END)]
    fence = re.fullmatch(r"\s*```(?:bash|sh|shell)\n(.*?)```\s*", marked, re.S)
    assert fence, "the quick start markers enclose exactly one ```bash block"
    return [line for line in fence.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def copy_checkout(dest: pathlib.Path) -> None:
    """The checkout's files as git lists them (tracked + untracked not ignored), without .venv/build."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for rel in listed:
        src = ROOT / rel
        if rel and src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def test_readme_quick_start_runs_the_main_job_from_the_installed_tarball(conn, repo_root, guests, tmp_path):
    name = f"vmbt-demo-{uuid.uuid4().hex[:8]}"
    app = guests.create()  # the demo's fourth VM: a tiny real guest with the agent
    images = pathlib.Path("/var/lib/libvirt/images") / name
    repo = repo_root / "demo-repo"
    lines = quickstart_block((ROOT / "README.md").read_text(encoding="utf-8"))
    # The first line is scripts/setup.sh: scripts/test.sh ran it before pytest (packages, libvirtd,
    # .venv); run here it could reinstall the shared virtualenv, so it is the one line not run.
    assert lines[0].split("#")[0].split() == ["bash", "scripts/setup.sh"], lines[0]
    assert lines[-1].startswith("ansible-playbook ") and lines[-1].split()[-1] == "vmbackup.libvirt.demo", lines[-1]
    checkout = tmp_path / "checkout"
    copy_checkout(checkout)
    (checkout / ".venv").symlink_to(pathlib.Path(sys.prefix), target_is_directory=True)
    # The one addition to the block's last line: names and paths of this run (so that it cannot meet
    # a demo of the machine's own), and the real guest.
    extra = json.dumps({"vmbackup_demo_vm": name, "vmbackup_demo_images": str(images),
                        "vmbackup_demo_repository": str(repo), "vmbackup_demo_app": app.name})
    script = "\n".join(["set -euo pipefail", *lines[1:-1],
                        "echo '== quickstart: the checkout copy loses its plugins, roles and playbooks'",
                        "rm -rf plugins roles playbooks",
                        f"{lines[-1]} -e {shlex.quote(extra)}"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_") and k != "VIRTUAL_ENV"}
    env.update(PATH="/usr/sbin:/usr/bin:/sbin:/bin", ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0")
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True, timeout=900, check=False)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
        # The tarball, installed where the block says, is the only vmbackup.libvirt ansible sees.
        installed = checkout / "build" / "quickstart" / "collections" / "ansible_collections"
        assert (installed / "vmbackup" / "libvirt" / "MANIFEST.json").is_file()
        listing = proc.stdout[:proc.stdout.index("== quickstart:")]
        assert re.findall(r"^# (/\S+)$", listing, re.M) == [str(installed)], listing
        assert not (checkout / "plugins").exists() and str(ROOT) not in listing
        assert "full" in proc.stdout and "incremental" in proc.stdout
        dom = conn.lookupByName(name)
        sets_dir = repo / "vms" / dom.UUIDString() / "sets"
        manifests = [json.loads((d / "manifest.json").read_text()) for d in sorted(sets_dir.iterdir()) if d.is_dir()]
        # The weekly playbook's full (period: this ISO week), then the ad-hoc incremental on it.
        assert [(m["type"], m["series"]) for m in manifests] == [("full", "weekly"), ("incremental", "weekly")]
        assert manifests[0]["period"] is not None and "-W" in manifests[0]["period"]
        assert manifests[1]["parent"]["set_id"] == manifests[0]["set_id"]
        # 8 MiB written between the two backups, on the system disk only.
        vda = next(d for d in manifests[1]["disks"] if d["target"] == "vda")
        assert 8 * 2**20 <= vda["size"] < 10 * 2**20
        # Verified: the role checked the full (data), the play read the newest point through its chain.
        levels = [json.loads((sets_dir / f"{m['set_id']}.verify.json").read_text()) for m in manifests]
        assert all(v["outcome"] == "ok" for v in levels)
        assert levels[-1]["level"] == "restore"
        # The fleet: the other two demo VMs were backed up by the same weekly run (a full, a copy).
        for other, kind in ((f"{name}-web", "full"), (f"{name}-off", "copy")):
            odir = repo / "vms" / conn.lookupByName(other).UUIDString() / "sets"
            types = [json.loads((d / "manifest.json").read_text())["type"] for d in sorted(odir.iterdir()) if d.is_dir()]
            assert types == [kind], (other, types)
        report = json.loads((repo.parent / "demo-reports" / "vmbackup-weekly.json").read_text())
        assert report["outcome"] == "ok" and sorted(v["name"] for v in report["vms"]) == sorted([name, f"{name}-web", f"{name}-off", app.name])
        # The real guest: its weekly full and the play's export were frozen through the agent; the
        # snapshot's rollback brought back the file as it was before the "patch", and the merge
        # left the guest running on its original image with no snapshot and no overlay.
        adir = repo / "vms" / app.uuid / "sets"
        app_sets = [json.loads((d / "manifest.json").read_text()) for d in sorted(adir.iterdir()) if d.is_dir()]
        assert [(m["type"], m["consistency"]) for m in app_sets] == [("full", "application"), ("incremental", "application")]
        assert app.read_file("/data/app.conf") == b"version-1\n"
        assert app.fsfreeze_status() == "thawed"
        assert app.dom.snapshotListNames() == []
        assert parse_disk_sources(app.dom.XMLDesc(0)) == {"vda": str(app.paths["vda"])}
        assert sorted(p.name for p in app.workdir.iterdir() if "vmbackup-snap" in p.name) == []
        assert "the guest reads version-1 again" in proc.stdout
        # the role's line for the guest says how consistent its set is
        assert [ln for ln in proc.stdout.splitlines() if f'"{app.name}: ok, full' in ln and "application-consistent" in ln], proc.stdout
        # Restored under a new name, running, each disk equal to the reference copy the play
        # took at backup time (checked here again, independently of the play's own compare).
        restored = conn.lookupByName(f"{name}-restored")
        assert restored.isActive() and restored.UUIDString() != dom.UUIDString()
        sources = parse_disk_sources(restored.XMLDesc(0))
        assert sorted(sources) == ["vda", "vdb"]
        for target, path in sources.items():
            assert path.startswith(str(images) + "/") and manifests[1]["set_id"] in path
            same, out = images_equal(str(images / f"reference-{target}.qcow2"), path)
            assert same, out
        assert not images_equal(str(images / f"{name}-vda.qcow2"), sources["vda"])[0], "the source changed after the backup"
        assert proc.stdout.count("EQUALS its state at backup time") == 2
    finally:
        for vm in (f"{name}-restored", name, f"{name}-web", f"{name}-off"):
            try:
                destroy_vm(conn.lookupByName(vm))
            except libvirt.libvirtError:
                pass
        shutil.rmtree(images, ignore_errors=True)
