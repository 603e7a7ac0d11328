"""verify and restore report per-phase timings and log their progress; a set whose images hold
zstd-compressed qcow2 clusters verifies and restores with nothing new.

One repository per module (a VM with two qcow2 disks: a full, then an incremental after writes
through QEMU; the VM is shut off afterwards, so its disks are the point in time of the
incremental). Expectations are computed here from the files on disk and the JSON of the
manifests; restored images are compared with the source disks by ``qemu-img compare``.

Progress lines go to ``module.log`` (syslog / the journal), which this test bed has neither of:
the backends run in process here with a list as their ``log`` (run_module passes module.log),
on the same repository the CLI runs read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import time
import uuid

import libvirt
import pytest

from harness import MIB, DiskSpec, Vm, VmFactory, chain_json, expect_ok, images_equal, run, sha256

REPO_BASE = pathlib.Path("/var/tmp/vmbackup-tests")
VERIFY_PHASES = ["plan_s", "hash_s", "chain_s", "record_s"]
RESTORE_PHASES = ["plan_s", "transfer_s", "sync_s", "define_s"]


@dataclasses.dataclass
class Built:
    root: pathlib.Path
    repo: pathlib.Path
    vm: Vm
    full: str
    inc: str

    def set_dir(self, repo: pathlib.Path, set_id: str) -> pathlib.Path:
        return repo / "vms" / self.vm.uuid / "sets" / set_id

    def manifest(self, repo: pathlib.Path, set_id: str) -> dict:
        return json.loads((self.set_dir(repo, set_id) / "manifest.json").read_text())

    def listed_bytes(self, repo: pathlib.Path) -> int:
        """Bytes of every file the manifests list, from the file system."""
        return sum(os.path.getsize(self.set_dir(repo, sid) / rel)
                   for sid in (self.full, self.inc) for rel in self.manifest(repo, sid)["files"])


@pytest.fixture(scope="module")
def built(ansible, conn, domain_type):
    factory = VmFactory(conn, domain_type)
    vm = None
    REPO_BASE.mkdir(mode=0o711, exist_ok=True)
    root = REPO_BASE / f"timings-{uuid.uuid4().hex[:10]}"
    root.mkdir(mode=0o711)
    os.chmod(root, 0o711)
    try:
        # Pattern fills compress well (the compressed copy below must really hold compressed clusters).
        vm = factory.create([DiskSpec("128M", fill=[(0xA1, "0", "24M"), (0xA2, "100M", "4M")]),
                             DiskSpec("64M", fill=[(0xB1, "1M", "8M")])])
        repo = root / "repo"
        full = expect_ok(ansible("export", {"name": vm.name, "repository": str(repo), "create_repository": True}))
        vm.write("vda", 0x11, "8M", "3M")
        vm.write("vda", 0x00, "101M", "1M")  # zeros over data: the chain must read them as zeros
        vm.write("vdb", 0x12, "20M", "2M")
        inc = expect_ok(ansible("export", {"name": vm.name, "repository": str(repo)}))
        assert (full["type"], inc["type"]) == ("full", "incremental"), (full, inc)
        vm.dom.destroy()  # the source disks stay at the point in time of the incremental
        disk_dir = root / "restored"
        disk_dir.mkdir(mode=0o711)
        yield Built(root, repo, vm, full["set_id"], inc["set_id"])
    finally:
        for dom in conn.listAllDomains(0):
            if vm is not None and dom.name().startswith(f"{vm.name}-"):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        factory.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def _runner(argv: list[str]) -> tuple[int, str, str]:
    """What module.run_command gives a backend: (rc, stdout, stderr)."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def _human(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / MIB:.1f} MiB"


def _plausible(timings: dict, phases: list[str], duration: float, wall: float) -> None:
    assert sorted(timings) == sorted(phases), timings  # the CLI prints keys sorted; the order is checked in process
    assert all(isinstance(v, float) and v >= 0 for v in timings.values()), timings
    total = sum(timings.values())
    # The phases cover the run: together they are its duration, give or take the result's assembly.
    assert 0.8 * duration - 0.02 <= total <= duration + 0.005, (timings, duration)
    assert duration <= wall, (duration, wall)


def test_verify_reports_its_phases_and_logs_its_progress(built, ansible):
    from ansible_collections.vmbackup.libvirt.plugins.module_utils._verify import Verifier, VerifyParams

    expected = built.listed_bytes(built.repo)
    # Level restore reads each point through its chains: the full alone, then full + incremental.
    chain = 2 * sum(d["size"] for d in built.manifest(built.repo, built.full)["disks"]) \
        + sum(d["size"] for d in built.manifest(built.repo, built.inc)["disks"])
    start = time.monotonic()
    r = expect_ok(ansible("verify", {"repository": str(built.repo), "name": built.vm.name, "workers": 2, "level": "restore"}))
    wall = time.monotonic() - start
    assert r["outcome"] == "ok" and r["sets_checked"] == 2
    assert r["bytes_read"] == expected + chain
    _plausible(r["timings"], VERIFY_PHASES, r["duration_s"], wall)
    assert r["timings"]["hash_s"] > 0 and r["timings"]["chain_s"] > 0  # level restore read the chains

    # The same run in process, its log a list: a line before, the final line at 100 % of what it read.
    lines: list[str] = []
    params = VerifyParams(repository=str(built.repo), name=built.vm.name, workers=2, record=False)
    result = Verifier(params, run=_runner, qemu_img_path="qemu-img", check_mode=False, log=lines.append).run()
    assert result["outcome"] == "ok" and result["bytes_read"] == expected
    assert lines[0] == (f"verify {built.vm.name} (data): 2 sets to check ({_human(expected)} of files), 0 skipped, "
                        "workers 2"), lines
    assert lines[-1].startswith(f"verify {built.vm.name} (data): {_human(expected)} of {_human(expected)} (100%), "), lines
    assert list(result["timings"]) == VERIFY_PHASES and result["timings"]["chain_s"] == 0.0

    # A second run that skips everything reads nothing: no hash phase, and the log says so.
    lines.clear()
    params = VerifyParams(repository=str(built.repo), name=built.vm.name, skip_verified_within="1d", level="restore")
    result = Verifier(params, run=_runner, qemu_img_path="qemu-img", check_mode=False, log=lines.append).run()
    assert result["sets_skipped"] == 2 and result["bytes_read"] == 0
    assert list(result["timings"]) == ["plan_s", "record_s"], result["timings"]
    assert lines[0].endswith(": 0 sets to check (0.0 MiB of files), 2 skipped, workers " + str(os.cpu_count() or 1)), lines


def _restore_and_compare(built: Built, repo: pathlib.Path, result: dict) -> None:
    """Every restored disk equals the source disk at the incremental's point in time, by qemu-img compare."""
    assert result["set_id"] == built.inc and sorted(d["target"] for d in result["disks"]) == ["vda", "vdb"]
    for disk in result["disks"]:
        assert disk["chain"] == [built.full, built.inc]
        same, why = images_equal(str(built.vm.disks[disk["target"]]), disk["path"])
        assert same, why
        assert os.stat(disk["path"]).st_mode & 0o077 == 0, oct(os.stat(disk["path"]).st_mode)


def _remove_restored(conn, result: dict) -> None:
    conn.lookupByName(result["vm"]["name"]).undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    for disk in result["disks"]:
        os.unlink(disk["path"])


def test_restore_reports_its_phases_and_logs_its_progress(built, ansible, conn):
    from ansible_collections.vmbackup.libvirt.plugins.module_utils._restore import Restorer, RestoreParams

    disk_dir = built.root / "restored"
    chain_bytes = sum(built.manifest(built.repo, sid)["files"][d["file"]]["size"]
                      for sid in (built.full, built.inc) for d in built.manifest(built.repo, sid)["disks"])
    name = f"{built.vm.name}-cli"
    start = time.monotonic()
    r = expect_ok(ansible("restore", {"repository": str(built.repo), "name": built.vm.name, "restore_as": name,
                                      "disk_dir": str(disk_dir)}))
    wall = time.monotonic() - start
    _restore_and_compare(built, built.repo, r)
    _plausible(r["timings"], RESTORE_PHASES, r["duration_s"], wall)
    assert r["timings"]["transfer_s"] >= r["convert_s"] > 0, r
    _remove_restored(conn, r)

    # In process, its log a list: what it will do, each disk as it is written, the final line at 100 %.
    lines: list[str] = []
    name = f"{built.vm.name}-log"
    params = RestoreParams(repository=str(built.repo), name=built.vm.name, restore_as=name, disk_dir=str(disk_dir))
    result = Restorer(params, run=_runner, qemu_img_path="qemu-img", check_mode=False, log=lines.append).run()
    try:
        _restore_and_compare(built, built.repo, result)
        what = f"restore {built.inc} of {built.vm.name} as {name}"
        # What the lines count: the images of both chains (no NVRAM or TPM here; domain.xml is read at planning).
        xml_size = built.manifest(built.repo, built.inc)["files"]["domain.xml"]["size"]
        assert result["bytes_read"] == chain_bytes + xml_size
        assert lines[0] == f"{what}: 2 disks, {_human(chain_bytes)} to read and verify, into {disk_dir}", lines
        written = [re.sub(r" in [0-9.]+ s$", "", x) for x in lines if " written (" in x]
        assert written == [f"{what}: disk {d['target']} written ({_human(d['bytes_read'])} read)" for d in result["disks"]], lines
        assert lines[-1].startswith(f"{what}: {_human(chain_bytes)} of {_human(chain_bytes)} (100%), "), lines
        assert list(result["timings"]) == RESTORE_PHASES
    finally:
        _remove_restored(conn, result)

    # Check mode plans only.
    r = expect_ok(ansible("restore", {"repository": str(built.repo), "name": built.vm.name, "restore_as": f"{built.vm.name}-x",
                                      "disk_dir": str(disk_dir)}, check=True))
    assert list(r["timings"]) == ["plan_s"] and r["timings"]["plan_s"] <= r["duration_s"]


def _recompress(built: Built, repo: pathlib.Path) -> None:
    """Rewrite both sets' images as zstd-compressed qcow2 (as any qemu-img writes them), and their
    manifests to match (sizes, sha256, the incremental's link to the rewritten full)."""
    new_full: dict[str, str] = {}
    for sid in (built.full, built.inc):
        set_dir = built.set_dir(repo, sid)
        os.chmod(set_dir, 0o700)
        (set_dir / "disks").chmod(0o700)
        m = built.manifest(repo, sid)
        for disk in m["disks"]:
            image = set_dir / disk["file"]
            out = image.with_suffix(".zstd")
            if sid == built.full:
                run(["qemu-img", "convert", "-c", "-o", "compression_type=zstd", "-f", "qcow2", "-O", "qcow2", str(image), str(out)])
                new_full[disk["target"]] = str(image)
            else:
                # Only what the incremental holds, over the (already rewritten) full; then no backing reference,
                # as the repository keeps it.
                base_files = {d["target"]: d["file"] for d in built.manifest(built.repo, built.full)["disks"]}
                base = built.set_dir(built.repo, built.full) / base_files[disk["target"]]
                src = chain_json([base, built.set_dir(built.repo, sid) / disk["file"]])
                run(["qemu-img", "convert", "-c", "-o", "compression_type=zstd", "-O", "qcow2", "-B", new_full[disk["target"]],
                     "-F", "qcow2", src, str(out)])
                run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "", str(out)])
            os.replace(out, image)
            os.chmod(image, 0o400)
            info = json.loads(run(["qemu-img", "info", "--output=json", str(image)]).stdout)
            assert info["format-specific"]["data"]["compression-type"] == "zstd", info
            check = run(["qemu-img", "check", "-f", "qcow2", str(image)], check=False).stdout
            share = float(re.search(r"([0-9.]+)% compressed clusters", check).group(1))
            assert share > 50, check  # most data clusters really are compressed
            # The disk entry carries the image's size and sha256 as well as the files entry (restore checks the former).
            disk.update(size=os.path.getsize(image), sha256=sha256(image))
            m["files"][disk["file"]].update(size=disk["size"], sha256=disk["sha256"])
        if sid == built.inc:
            m["parent"]["manifest_sha256"] = sha256(built.set_dir(repo, built.full) / "manifest.json")
        path = set_dir / "manifest.json"
        path.chmod(0o600)
        path.write_text(json.dumps(m, indent=1, sort_keys=True))
        path.chmod(0o400)
        (set_dir / "disks").chmod(0o500)
        os.chmod(set_dir, 0o500)


def test_a_set_of_zstd_compressed_clusters_verifies_and_restores(built, ansible, conn):
    repo = built.root / "compressed"
    run(["cp", "-a", str(built.repo), str(repo)])
    for sid in (built.full, built.inc):  # the verdicts of the CLI verify above (another manifest now)
        (built.set_dir(repo, sid).parent / f"{sid}.verify.json").unlink(missing_ok=True)
    _recompress(built, repo)
    before = {sid: {d["target"]: d["size"] for d in built.manifest(built.repo, sid)["disks"]} for sid in (built.full, built.inc)}
    after = {sid: {d["target"]: d["size"] for d in built.manifest(repo, sid)["disks"]} for sid in (built.full, built.inc)}
    assert all(after[s][t] < before[s][t] for s in after for t in after[s]), (before, after)

    r = expect_ok(ansible("verify", {"repository": str(repo), "name": built.vm.name, "level": "restore"}))
    assert r["outcome"] == "ok" and r["sets_ok"] == 2, r
    r = expect_ok(ansible("restore", {"repository": str(repo), "name": built.vm.name, "restore_as": f"{built.vm.name}-zstd",
                                      "disk_dir": str(built.root / "restored")}))
    try:
        _restore_and_compare(built, repo, r)
    finally:
        _remove_restored(conn, r)

    # A drill of the compressed point: its phases, and the restore's passed through.
    start = time.monotonic()
    r = expect_ok(ansible("drill", {"repository": str(repo), "name": built.vm.name, "checks": ["image", "fsck"], "boot": "never",
                                    "disk_dir": str(built.root / "drill")}))
    wall = time.monotonic() - start
    assert r["outcome"] == "ok" and [c["name"] for c in r["checks"]] == ["image", "restore", "fsck"], r["checks"]
    _plausible(r["timings"], ["plan_s", "image_s", "restore_s", "fsck_s", "cleanup_s"], r["duration_s"], wall)
    per_check = {k[:-2]: v for k, v in r["timings"].items() if k not in ("plan_s", "cleanup_s")}
    assert {c["name"]: c["seconds"] for c in r["checks"]} == per_check
    assert sorted(r["restore"]["timings"]) == sorted(RESTORE_PHASES)
    assert sum(r["restore"]["timings"].values()) <= r["timings"]["restore_s"] + 0.005
