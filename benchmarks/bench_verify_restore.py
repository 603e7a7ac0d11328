#!/usr/bin/env python
"""Verify and restore throughput against baselines measured in the same run, on the same files.

    sudo .venv/bin/python benchmarks/bench_verify_restore.py [--data-mib 1024] [--disks 2] [--size 4G] [--repeat 3]
        [--inc-mib 64] [--json FILE]

Builds a throwaway VM with --disks qcow2 disks of --size each holding --data-mib of data in all
(split evenly; written with qemu-io before the VM starts), exports a full, writes --inc-mib per
disk through the QEMU monitor, exports an incremental, shuts the VM off, and then measures, with a
warm page cache and interleaved repeats (median of --repeat; `paired` columns are the median of
the per-repeat ratios, which resists load that drifts between repeats on a shared machine):

  verify (level data, every set of the VM), run through the `ansible` CLI
    * baseline: a plain streaming hashlib sha256 (4 MiB reads, one thread, in Python) of exactly
      the files the manifests list (what verify reads); for information also the same hashing
      with one thread per CPU (the machine's parallel read+sha256 limit);
    * verify with workers 1, 2 and the number of CPUs. The ratio uses the module's in-module
      figures: bytes_read / duration_s over the baseline's bytes / seconds. The throughput the
      module reports (bytes over its read phase) and the wall time of the CLI call are printed
      too, and the fixed costs inside duration_s (qemu-img check per image, measured on its own;
      the rest of the non-read time) are shown.

  restore of the newest point (the incremental: each disk's chain is full + incremental)
    * baselines: `qemu-img convert -O qcow2 'json:{chain}' out` as an admin would type it, and
      `qemu-img convert -W -m 8 -O qcow2 ...` (what restore itself runs), one disk after another
      as restore does; for information also the latter followed by an fsync of the output (restore
      fsyncs its images before it renames them into place);
    * restore (its duration_s; it checks the sha256 of every file it reads in parallel with
      qemu-img) into a scratch disk_dir under a new name; the domain is undefined and the images
      deleted after each repeat. Ratios are throughputs: baseline seconds / restore seconds.
      Restore's own split is printed: qemu-img time (convert_s, while the checksums run), the time
      until every checksum was done (verify_s), and the rest (mostly the fsync of the new images).

Everything (VM, images, repository, restored domains) is removed at the end, also on failure.

Targets (reported, not enforced: the exit status is non-zero only on errors):
verify workers=1 >= 0.9x hashlib; restore >= 0.8x plain qemu-img convert.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import libvirt  # noqa: E402

from harness import AnsibleRunner, DiskSpec, VmFactory, build_and_install, pick_domain_type  # noqa: E402

MIB = 1024 * 1024
CHUNK = 4 * MIB
TARGET_VERIFY = 0.9
TARGET_RESTORE = 0.8


def hash_file(path: str) -> int:
    """The baseline: plain streaming sha256 of one file in 4 MiB reads."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb", buffering=0) as fh:
        while True:
            chunk = fh.read(CHUNK)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
    h.hexdigest()
    return n


def hash_all(files: list[str], threads: int) -> tuple[float, int]:
    start = time.monotonic()
    if threads <= 1:
        total = sum(hash_file(f) for f in files)
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            total = sum(pool.map(hash_file, sorted(files, key=os.path.getsize, reverse=True)))
    return time.monotonic() - start, total


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    return time.monotonic() - start


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def chain_spec(files: list[str]) -> str:
    """json: spec reading files (base first) as one backing chain (as _qemu_img.chain_spec builds it)."""
    node = None
    for path in files:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": path}, "backing": node}
    return "json:" + json.dumps(node, separators=(",", ":"))


def settle() -> None:
    """Flush dirty pages of earlier steps so that their writeback does not land in the next measurement."""
    os.sync()


def med(values: list[float]) -> float:
    return statistics.median(values)


class Cli:
    """The ansible CLI runner, with the wall time of each call."""

    def __init__(self, runner: AnsibleRunner) -> None:
        self.runner = runner

    def __call__(self, module: str, args: dict) -> tuple[dict, float]:
        start = time.monotonic()
        r = self.runner(module, args)
        wall = time.monotonic() - start
        if r.get("failed"):
            raise RuntimeError(f"{module} failed: {r.get('error_code')} {r.get('msg')}")
        return r, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-mib", type=int, default=1024, help="data in all disks together (default 1024)")
    ap.add_argument("--disks", type=int, default=2, choices=range(1, 5), help="disks of the VM (1-4, default 2)")
    ap.add_argument("--size", default="4G", help="virtual size of each disk (default 4G)")
    ap.add_argument("--inc-mib", type=int, default=64, help="MiB written per disk before the incremental (default 64)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be 1 or more")
    per_disk = args.data_mib // args.disks
    ncpu = os.cpu_count() or 1
    worker_counts = sorted({1, 2, ncpu})

    work = pathlib.Path(tempfile.mkdtemp(prefix="vmbackup-bench-", dir="/var/tmp"))
    work.chmod(0o711)
    repo = work / "repo"
    scratch = work / "restore"
    scratch.mkdir(mode=0o711)
    conn = libvirt.open("qemu:///system")
    factory = VmFactory(conn, pick_domain_type(conn))
    restored: list[str] = []  # domain names restore defined (undefined in finally)
    load_start = os.getloadavg()[0]
    try:
        env = build_and_install(ROOT, work)
        cli = Cli(AnsibleRunner(env=env, ansible=str(pathlib.Path(sys.executable).parent / "ansible")))

        # ------------------------------------------------------------------ the repository
        print(f"building: {args.disks} disks x {args.size}, {per_disk} MiB of data each; "
              f"{args.inc_mib} MiB per disk before the incremental", flush=True)
        vm = factory.create([DiskSpec(args.size, fill=[(0x5A, "0", f"{per_disk}M")]) for _disk in range(args.disks)])
        full, _wall = cli("export", {"name": vm.name, "repository": str(repo), "mode": "full", "create_repository": True})
        for n, target in enumerate(sorted(vm.disks)):
            vm.write(target, 0xC0 + n, "256M" if per_disk > 320 else "0", f"{args.inc_mib}M")
        inc, _wall = cli("export", {"name": vm.name, "repository": str(repo)})
        if inc["type"] != "incremental":
            raise RuntimeError(f"second export is {inc['type']}, not incremental: {inc.get('reason')}")
        vm.dom.destroy()  # verify and restore need only the repository; an idle guest is noise

        sets_dir = repo / "vms" / vm.uuid / "sets"
        manifests = {sid: json.loads((sets_dir / sid / "manifest.json").read_text()) for sid in (full["set_id"], inc["set_id"])}
        files = [str(sets_dir / sid / rel) for sid, m in manifests.items() for rel in sorted(m["files"])]
        file_bytes = sum(os.path.getsize(f) for f in files)
        images = [str(sets_dir / sid / d["file"]) for sid, m in manifests.items() for d in m["disks"]]
        chains = {}
        for disk in manifests[inc["set_id"]]["disks"]:
            target = disk["target"]
            base = next(d for d in manifests[full["set_id"]]["disks"] if d["target"] == target)
            chains[target] = [str(sets_dir / full["set_id"] / base["file"]), str(sets_dir / inc["set_id"] / disk["file"])]
        chain_bytes = sum(os.path.getsize(f) for c in chains.values() for f in c)
        print(f"repository: 2 sets, {len(files)} files, {file_bytes / MIB:.1f} MiB "
              f"({len(images)} images: " + ", ".join(f"{os.path.getsize(i) / MIB:.0f}" for i in images) + " MiB)", flush=True)

        # Warm the page cache (and Ansible's own files) before anything is measured.
        hash_all(files, 1)
        cli("verify", {"repository": str(repo), "name": vm.name, "workers": 1})
        settle()

        # ------------------------------------------------------------------ verify
        # Each verify run follows its own hashlib run, so that a ratio can also be taken per pair
        # (robust against the load of a shared machine drifting between repeats).
        base1, baseN, checks = [], [], []
        ver: dict[int, list[dict]] = {w: [] for w in worker_counts}
        for i in range(args.repeat):
            baseN.append(hash_all(files, ncpu)[0])
            checks.append(sum(timed(["qemu-img", "check", "-f", "qcow2", "--output=json", img]) for img in images))
            for w in worker_counts:
                seconds, read = hash_all(files, 1)
                assert read == file_bytes, (read, file_bytes)
                base1.append(seconds)
                r, wall = cli("verify", {"repository": str(repo), "name": vm.name, "workers": w})
                if r["outcome"] != "ok" or r["bytes_read"] != file_bytes or r["workers"] != w:
                    raise RuntimeError(f"unexpected verify result: {r['outcome']} {r['bytes_read']} {r['workers']}")
                read_s = r["bytes_read"] / MIB / r["throughput_mib_s"]
                ver[w].append({"duration_s": r["duration_s"], "read_s": read_s, "wall_s": wall, "paired_hashlib_s": seconds,
                               "hash_sum_s": sum(s["duration_s"] for s in r["sets"])})
            print(f"  verify repeat {i + 1}/{args.repeat}: "
                  + ", ".join(f"hashlib {ver[w][-1]['paired_hashlib_s']:.3f}s / workers={w} {ver[w][-1]['duration_s']:.3f}s"
                              for w in worker_counts), flush=True)

        # ------------------------------------------------------------------ restore
        def convert(argv_head: list[str], sync: bool = False) -> float:
            total = 0.0
            for target, chain in chains.items():
                out = str(scratch / f"baseline-{target}.qcow2")
                start = time.monotonic()
                subprocess.run(argv_head + [chain_spec(chain), out], check=True, capture_output=True)
                if sync:
                    fsync_path(out)
                total += time.monotonic() - start
                os.unlink(out)
            settle()
            return total

        plain, tuned, tuned_sync, rest = [], [], [], []
        for i in range(args.repeat):
            plain.append(convert(["qemu-img", "convert", "-O", "qcow2"]))
            tuned.append(convert(["qemu-img", "convert", "-W", "-m", "8", "-O", "qcow2"]))
            tuned_sync.append(convert(["qemu-img", "convert", "-W", "-m", "8", "-O", "qcow2"], sync=True))
            name = f"{vm.name}-bench-r{i}"
            restored.append(name)
            r, wall = cli("restore", {"repository": str(repo), "name": vm.name, "restore_as": name, "disk_dir": str(scratch)})
            got = {d["target"]: d["chain"] for d in r["disks"]}
            want = {t: [full["set_id"], inc["set_id"]] for t in chains}
            if r["set_id"] != inc["set_id"] or got != want:
                raise RuntimeError(f"restore read {r['set_id']} {got}, expected {want}")
            rest.append({"duration_s": r["duration_s"], "verify_s": r["verify_s"], "convert_s": r["convert_s"],
                         "wall_s": wall, "bytes_read": r["bytes_read"]})
            for d in r["disks"]:
                os.unlink(d["path"])
            dom = conn.lookupByName(name)
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            restored.remove(name)
            settle()
            print(f"  restore repeat {i + 1}/{args.repeat}: convert {plain[-1]:.3f}s, -W -m 8 {tuned[-1]:.3f}s, "
                  f"+fsync {tuned_sync[-1]:.3f}s, restore {r['duration_s']:.3f}s", flush=True)

        # ------------------------------------------------------------------ figures
        mib = file_bytes / MIB
        rb = chain_bytes / MIB
        b1 = med(base1)
        base_tput = mib / b1
        fig: dict = {
            "date": time.strftime("%Y-%m-%d"), "cpus": ncpu, "repeat": args.repeat, "disks": args.disks,
            "data_mib": args.data_mib, "files": len(files), "file_mib": round(mib, 1), "chain_mib": round(rb, 1),
            "loadavg_start_end": [load_start, os.getloadavg()[0]],
            "hashlib_1_thread_s": round(b1, 3), f"hashlib_{ncpu}_threads_s": round(med(baseN), 3),
            "qemu_img_check_all_images_s": round(med(checks), 3), "verify": {}, "restore": {},
        }
        rows = [("hashlib sha256, 1 thread (baseline)", b1, mib / b1, None, None, None, 1.0, None),
                (f"hashlib sha256, {ncpu} threads (info)", med(baseN), mib / med(baseN), None, None, None, b1 / med(baseN), None)]
        for w in worker_counts:
            runs = ver[w]
            d = med([x["duration_s"] for x in runs])
            rd = med([x["read_s"] for x in runs])
            wall = med([x["wall_s"] for x in runs])
            paired = med([x["paired_hashlib_s"] / x["duration_s"] for x in runs])
            tput = mib / d
            fig["verify"][f"workers_{w}"] = {
                "duration_s": d, "read_phase_s": round(rd, 3), "cli_wall_s": round(wall, 3),
                "in_module_mib_s": round(tput, 1), "reported_mib_s": round(mib / rd, 1),
                "ratio_vs_hashlib": tput / base_tput, "paired_ratio_vs_hashlib": paired,
                "non_read_s": round(d - rd, 3), "sum_of_file_hash_s": round(med([x["hash_sum_s"] for x in runs]), 3),
                "runs": runs,
            }
            rows.append((f"verify workers={w}" + (" (= CPUs)" if w == ncpu else ""), d, tput, mib / rd, wall, d - rd,
                         tput / base_tput, paired))
        rm = {k: med([x[k] for x in rest]) for k in ("duration_s", "verify_s", "convert_s", "wall_s")}
        fig["restore"] = {
            "qemu_img_convert_plain_s": round(med(plain), 3), "qemu_img_convert_W_m8_s": round(med(tuned), 3),
            "qemu_img_convert_W_m8_fsync_s": round(med(tuned_sync), 3), **{f"restore_{k}": v for k, v in rm.items()},
            "ratio_vs_plain_convert": med(plain) / rm["duration_s"],
            "paired_ratio_vs_plain_convert": med([p / r["duration_s"] for p, r in zip(plain, rest)]),
            "ratio_vs_convert_W_m8": med(tuned) / rm["duration_s"],
            "ratio_vs_convert_W_m8_fsync": med(tuned_sync) / rm["duration_s"],
            "runs": rest, "plain_runs": plain, "W_m8_runs": tuned, "W_m8_fsync_runs": tuned_sync,
        }

        def fmt(value, spec: str) -> str:
            return format(value, spec) if value is not None else "-"

        print()
        print(f"verify: {len(files)} files, {mib:.1f} MiB, {len(images)} images; median of {args.repeat}; "
              f"{ncpu} CPUs; warm page cache; load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
        print(f"{'':40} {'in-module s':>11} {'MiB/s':>7} {'reported':>9} {'CLI wall s':>10} {'non-read s':>10} "
              f"{'x hashlib':>9} {'paired':>7}")
        for label, secs, tput, reported, wall, nonread, ratio, paired in rows:
            print(f"{label:40} {secs:11.3f} {tput:7.0f} {fmt(reported, '.0f'):>9} {fmt(wall, '.2f'):>10} "
                  f"{fmt(nonread, '.3f'):>10} {ratio:9.2f} {fmt(paired, '.2f'):>7}")
        print("  in-module s = the module's duration_s; MiB/s = bytes_read / duration_s (what the ratio uses); reported = the")
        print("  module's throughput_mib_s (bytes over its read phase, which includes qemu-img check); non-read = duration_s")
        print("  minus that phase (repository, manifests, locks, verdict files); paired = median of hashlib/verify per repeat")
        print(f"  fixed cost inside the read phase: qemu-img check of {len(images)} images, {med(checks):.3f}s when run on its own "
              f"({med(checks) / b1 * 100:.0f}% of the baseline's time)")
        print()
        print(f"restore of the incremental point: {len(chains)} disk chains (full + incremental), {rb:.1f} MiB read; "
              f"median of {args.repeat}")
        print(f"{'':40} {'s':>11} {'MiB/s':>7} {'restore x':>9}")
        for label, secs in (("qemu-img convert -O qcow2 (plain)", med(plain)),
                            ("qemu-img convert -W -m 8 -O qcow2", med(tuned)),
                            ("  ... + fsync of the output (info)", med(tuned_sync))):
            print(f"{label:40} {secs:11.3f} {rb / secs:7.0f} {secs / rm['duration_s']:9.2f}")
        print(f"{'restore (duration_s)':40} {rm['duration_s']:11.3f} {rb / rm['duration_s']:7.0f}")
        print(f"  restore: qemu-img {rm['convert_s']:.3f}s while the checksums ran; checksums done after {rm['verify_s']:.3f}s; "
              f"{rm['duration_s'] - rm['verify_s']:.3f}s outside that (planning, fsync of the images, define); "
              f"CLI wall {rm['wall_s']:.2f}s")
        print()
        v1 = fig["verify"]["workers_1"]["ratio_vs_hashlib"]
        parts = [f"verify workers=1: {v1:.2f}x hashlib (target >= {TARGET_VERIFY}x) {'MET' if v1 >= TARGET_VERIFY else 'MISSED'}"
                 f" [paired {fig['verify']['workers_1']['paired_ratio_vs_hashlib']:.2f}x]"]
        parts += [f"workers={w}: {fig['verify'][f'workers_{w}']['ratio_vs_hashlib']:.2f}x" for w in worker_counts if w != 1]
        rp = fig["restore"]["ratio_vs_plain_convert"]
        parts.append(f"restore: {rp:.2f}x plain convert (target >= {TARGET_RESTORE}x) {'MET' if rp >= TARGET_RESTORE else 'MISSED'}"
                     f" [paired {fig['restore']['paired_ratio_vs_plain_convert']:.2f}x]")
        parts.append(f"{fig['restore']['ratio_vs_convert_W_m8']:.2f}x convert -W -m 8")
        parts.append(f"{fig['restore']['ratio_vs_convert_W_m8_fsync']:.2f}x convert -W -m 8 + fsync")
        print("RATIOS: " + "; ".join(parts))
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(fig, indent=2))
        return 0
    finally:
        for name in restored:
            try:
                conn.lookupByName(name).undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError:
                pass
        factory.cleanup()
        conn.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
