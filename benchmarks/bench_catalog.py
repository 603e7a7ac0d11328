#!/usr/bin/env python
"""backup_info on a repository of thousands of sets, against a plain json.load of the same manifests.

    sudo .venv/bin/python benchmarks/bench_catalog.py [--sets 5000] [--vms 10] [--verified 0.5] [--repeat 5]
        [--no-cli] [--profile] [--json FILE]

Builds a synthetic repository (manifests and verify sidecars only: the catalog never reads the
data files, so none are written) of --sets sets spread over --vms VMs. Each VM has two series,
weekly and monthly, interleaved in time; each series is a run of chains of 5 to 10 sets (a full
and its incrementals, seeded random lengths). A manifest has two disks, domain.xml and nvram,
like an export of a UEFI VM. A --verified fraction of the sets has a verify sidecar (one in ten of
those stale, one in fifty failed).

Then, with a warm page cache, interleaved repeats, median of --repeat:
  * baseline: a plain Python loop of ``json.load`` over exactly the same manifest files (the path
    list is built before the clock starts), and for information the same loop over the manifests
    plus the sidecars (every file the catalog reads);
  * backup_info's backend in this process (``InfoBackend.run()``: repository checks, the catalog of
    every VM read through ``_catalog.Catalog``, the result built), split into reading and building,
    plus ``json.dumps`` of the result (what the module then prints);
  * once, unless --no-cli: ``ansible localhost -m vmbackup.libvirt.backup_info`` end to end
    (the collection built and installed as the integration tests do; ansible's own start-up and
    the transfer of the result are in this figure), the same with a query that returns only the
    newest restorable point per VM, and ``ansible localhost -m ansible.builtin.ping`` (ansible's
    own cost for one module call).

The ratio is backend seconds over baseline seconds. --profile prints the top of a cProfile of one
backend run. The repository is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import hashlib
import io
import json
import os
import pathlib
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The collection importable as ansible_collections.vmbackup.libvirt, as tests/conftest.py arranges it.
_TREE = pathlib.Path(tempfile.gettempdir()) / f"vmbackup-collections-{hashlib.sha256(bytes(ROOT)).hexdigest()[:8]}"
_LINK = _TREE / "ansible_collections" / "vmbackup" / "libvirt"
if not _LINK.is_symlink():
    _LINK.parent.mkdir(parents=True, exist_ok=True)
    _LINK.symlink_to(ROOT, target_is_directory=True)
sys.path.insert(0, str(_TREE))

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _info  # noqa: E402
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _manifest  # noqa: E402
from ansible_collections.vmbackup.libvirt.plugins.module_utils import _repository as repo_mod  # noqa: E402

T0 = dt.datetime(2024, 1, 1, 2, 0, 0, tzinfo=dt.timezone.utc)
SHA = "c" * 64
QUERY = "vms[].{name: name, newest: newest_restorable.set_id}"


def build(path: str, n_sets: int, n_vms: int, verified: float, seed: int = 9) -> tuple[list[str], list[str]]:
    """The synthetic repository; returns (manifest paths, sidecar paths)."""
    rng = random.Random(seed)
    repo = repo_mod.Repository(path)
    repo.initialise()
    manifests, sidecars = [], []
    per_vm = [n_sets // n_vms + (1 if i < n_sets % n_vms else 0) for i in range(n_vms)]
    for v, count in enumerate(per_vm):
        vm_uuid = str(__import__("uuid").UUID(int=rng.getrandbits(128), version=4))
        repo.prepare_vm(vm_uuid)
        sets_dir = repo.sets_dir(vm_uuid)
        state = {s: {"left": 0, "chain": None, "parent": None, "sha": None} for s in ("weekly", "monthly")}
        for i in range(count):
            series = "monthly" if i % 4 == 3 else "weekly"
            st = state[series]
            started = T0 + dt.timedelta(hours=6 * i, seconds=v)
            set_id = f"{started:%Y%m%dT%H%M%SZ}-001"
            if st["left"] == 0:
                st.update(left=rng.randint(5, 10), chain=_manifest.new_chain_id(), parent=None, sha=None)
            set_type = "full" if st["parent"] is None else "incremental"
            disks, files = [], {"domain.xml": {"size": 4000, "sha256": SHA, "role": "domain"},
                                "nvram.fd": {"size": 540672, "sha256": SHA, "role": "nvram"}}
            for target, vsize in (("vda", 40 << 30), ("vdb", 200 << 30)):
                size = rng.randint(1 << 20, 8 << 30) if set_type == "full" else rng.randint(1 << 16, 1 << 28)
                rel = f"disks/{target}.qcow2"
                disks.append({"target": target, "method": set_type, "format": "qcow2", "virtual_size": vsize,
                              "allocated_bytes": size, "source": f"/var/lib/libvirt/images/vm{v}-{target}.qcow2",
                              "file": rel, "size": size, "sha256": SHA})
                files[rel] = {"size": size, "sha256": SHA, "role": "disk"}
            manifest = _manifest.build_manifest(
                set_id=set_id, vm_uuid=vm_uuid, vm_name=f"vm-{v:02d}", host="hv1", started=started,
                completed=started + dt.timedelta(minutes=7), set_type=set_type, chain_id=st["chain"],
                parent={"set_id": st["parent"], "manifest_sha256": st["sha"]} if st["parent"] else None,
                checkpoint=_manifest.checkpoint_name(st["chain"], i), consistency="application",
                period=f"{started:%G-W%V}" if series == "weekly" else f"{started:%Y-%m}", series=series,
                disks=disks, skipped_disks=[], files=files, tool={"name": "vmbackup.libvirt", "version": "0.1.0"},
                stats={"duration_s": 12.5, "bytes": sum(f["size"] for f in files.values())},
            )
            data = _manifest.dumps(manifest)
            set_dir = os.path.join(sets_dir, set_id)
            os.mkdir(set_dir, 0o700)
            mpath = os.path.join(set_dir, _manifest.MANIFEST_NAME)
            with open(mpath, "wb") as fh:
                fh.write(data)
            manifests.append(mpath)
            sha = _manifest.sha256_bytes(data)
            st.update(left=st["left"] - 1, parent=set_id, sha=sha)
            if rng.random() < verified:
                roll = rng.random()
                sidecar = {"format": "vmbackup.libvirt/verify", "format_version": 1, "set_id": set_id,
                           "verified": _manifest.iso(started + dt.timedelta(hours=1)), "host": "hv1", "level": "data",
                           "outcome": "failed" if roll < 0.02 else "ok", "codes": ["CHECKSUM_MISMATCH"] if roll < 0.02 else [],
                           "findings": [], "manifest_sha256": "d" * 64 if roll > 0.9 else sha, "bytes_read": 1}
                spath = os.path.join(sets_dir, f"{set_id}.verify.json")
                with open(spath, "wb") as fh:
                    fh.write(_manifest.dumps(sidecar))
                sidecars.append(spath)
    return manifests, sidecars


def baseline(paths: list[str]) -> float:
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb") as fh:
            json.load(fh)
    return time.perf_counter() - start


def backend_run(path: str, query: str | None = None) -> tuple[dict, float, float, float, float]:
    """(result, total seconds, read seconds, build seconds, json.dumps seconds): one in-process backend run,
    then its two phases timed on their own (reading the catalogs and verdicts; building the result)."""
    params = _info.InfoParams(repository=path, query=query)
    backend = _info.InfoBackend(params, run=None, qemu_img_path="qemu-img", check_mode=False)
    start = time.perf_counter()
    result = backend.run()
    total = time.perf_counter() - start
    start = time.perf_counter()
    repo = repo_mod.open_repository(path)
    catalogs, verdicts, dummy = _info.read_vms(repo, None, None)
    read = time.perf_counter() - start
    start = time.perf_counter()
    _info.describe(path, catalogs, verdicts, _manifest.utcnow())
    build = time.perf_counter() - start
    start = time.perf_counter()
    json.dumps(result)
    dumps = time.perf_counter() - start
    return result, total, read, build, dumps


def cli_env(workdir: pathlib.Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from harness import build_and_install  # pylint: disable=import-outside-toplevel
    env_file = workdir / "env.json"
    if not env_file.exists():
        env_file.write_text(json.dumps(build_and_install(ROOT, workdir)))
    return json.loads(env_file.read_text())


def cli_ping(workdir: pathlib.Path) -> float:
    """ansible's own cost for one module on localhost (start-up, AnsiballZ, a tiny result)."""
    ansible = str(pathlib.Path(sys.executable).parent / "ansible")
    start = time.perf_counter()
    subprocess.run([ansible, "localhost", "-m", "ansible.builtin.ping"], env=cli_env(workdir), capture_output=True, check=True)
    return time.perf_counter() - start


def cli_run(path: str, workdir: pathlib.Path, query: str | None) -> tuple[float, int, dict]:
    env = cli_env(workdir)
    from harness import parse_result  # pylint: disable=import-outside-toplevel
    ansible = str(pathlib.Path(sys.executable).parent / "ansible")
    args = {"repository": path} if query is None else {"repository": path, "query": query}
    start = time.perf_counter()
    proc = subprocess.run([ansible, "localhost", "-m", "vmbackup.libvirt.backup_info", "-a", json.dumps(args)],
                          env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    result = parse_result(proc.stdout, proc.stderr)
    if result.get("failed"):
        raise RuntimeError(f"backup_info failed: {result.get('error_code')} {result.get('msg')}")
    return wall, len(proc.stdout), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", type=int, default=5000)
    ap.add_argument("--vms", type=int, default=10)
    ap.add_argument("--verified", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-cli", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    base = pathlib.Path("/var/tmp")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="vmbackup-bench-catalog-", dir=base))
    os.chmod(workdir, 0o700)
    path = str(workdir / "repo")
    try:
        start = time.perf_counter()
        manifests, sidecars = build(path, args.sets, args.vms, args.verified)
        built = time.perf_counter() - start
        print(f"built {len(manifests)} sets ({len(sidecars)} verdicts) over {args.vms} VMs in {built:.1f}s at {path}")
        # Warm the page cache and the imports once.
        baseline(manifests + sidecars)
        result, *dummy = backend_run(path)
        assert result["totals"]["sets"] == len(manifests), result["totals"]
        restorable = sum(s["restorable"] for vm in result["vms"] for s in vm["sets"])
        base_m, base_ms, total, read, builds, dumps, ratios = [], [], [], [], [], [], []
        for dummy_i in range(args.repeat):
            b = baseline(manifests)
            base_m.append(b)
            base_ms.append(baseline(manifests + sidecars))
            dummy_r, tot, rd, bu, du = backend_run(path)
            total.append(tot)
            read.append(rd)
            builds.append(bu)
            dumps.append(du)
            ratios.append(tot / b)
        med = statistics.median
        fig = {
            "sets": len(manifests), "verdicts": len(sidecars), "vms": args.vms, "restorable": restorable,
            "result_json_bytes": len(json.dumps(result)),
            "baseline_json_load_manifests_s": round(med(base_m), 4),
            "baseline_json_load_manifests_and_sidecars_s": round(med(base_ms), 4),
            "backend_s": round(med(total), 4),
            "backend_read_s": round(med(read), 4),
            "backend_build_s": round(med(builds), 4),
            "json_dumps_s": round(med(dumps), 4),
            "ratio_backend_over_baseline": round(med(total) / med(base_m), 2),
            "ratio_paired_median": round(med(ratios), 2),
        }
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            backend_run(path)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
            print(out.getvalue())
        if not args.no_cli:
            wall, out_bytes, cli = cli_run(path, workdir, None)
            assert cli["totals"]["sets"] == len(manifests)
            fig["cli_s"] = round(wall, 2)
            fig["cli_stdout_bytes"] = out_bytes
            wall, out_bytes, cli = cli_run(path, workdir, QUERY)
            assert len(cli["query_result"]) == args.vms
            fig["cli_query_s"] = round(wall, 2)
            fig["cli_ping_s"] = round(cli_ping(workdir), 2)
        print(json.dumps(fig, indent=2))
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(fig, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
