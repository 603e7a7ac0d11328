"""The README's main job: the demo playbook, run with ansible-playbook from the installed collection."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import uuid

import libvirt

from harness import destroy_vm, images_equal, parse_disk_sources


def test_demo_playbook_backs_up_verifies_and_restores(ansible, conn, repo_root, guests):
    name = f"vmbt-demo-{uuid.uuid4().hex[:8]}"
    app = guests.create()  # the demo's fourth VM: a tiny real guest with the agent
    images = pathlib.Path("/var/lib/libvirt/images") / name
    repo = repo_root / "demo-repo"
    playbook = str(pathlib.Path(sys.executable).parent / "ansible-playbook")
    argv = [playbook, "-i", "localhost,", "-c", "local", "vmbackup.libvirt.demo",
            "-e", json.dumps({"vmbackup_demo_vm": name, "vmbackup_demo_images": str(images),
                              "vmbackup_demo_repository": str(repo), "vmbackup_demo_app": app.name})]
    try:
        proc = subprocess.run(argv, env=dict(ansible.env, ANSIBLE_STDOUT_CALLBACK="default"),
                              capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
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
