"""The README's main job: the demo playbook, run with ansible-playbook from the installed collection."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import uuid

import libvirt

from harness import destroy_vm


def test_demo_playbook_backs_up_full_then_incremental(ansible, conn, repo_root):
    name = f"vmbt-demo-{uuid.uuid4().hex[:8]}"
    images = pathlib.Path("/var/lib/libvirt/images") / name
    repo = repo_root / "demo-repo"
    playbook = str(pathlib.Path(sys.executable).parent / "ansible-playbook")
    argv = [playbook, "-i", "localhost,", "-c", "local", "vmbackup.libvirt.demo",
            "-e", json.dumps({"vmbackup_demo_vm": name, "vmbackup_demo_images": str(images),
                              "vmbackup_demo_repository": str(repo)})]
    try:
        proc = subprocess.run(argv, env=dict(ansible.env, ANSIBLE_STDOUT_CALLBACK="default"),
                              capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "full" in proc.stdout and "incremental" in proc.stdout
        dom = conn.lookupByName(name)
        sets_dir = repo / "vms" / dom.UUIDString() / "sets"
        manifests = [json.loads((d / "manifest.json").read_text()) for d in sorted(sets_dir.iterdir()) if d.is_dir()]
        assert [m["type"] for m in manifests] == ["full", "incremental"]
        assert manifests[1]["parent"]["set_id"] == manifests[0]["set_id"]
        # 8 MiB written between the two backups, on the system disk only.
        vda = next(d for d in manifests[1]["disks"] if d["target"] == "vda")
        assert 8 * 2**20 <= vda["size"] < 10 * 2**20
    finally:
        try:
            destroy_vm(conn.lookupByName(name))
        except libvirt.libvirtError:
            pass
        shutil.rmtree(images, ignore_errors=True)
