#!/usr/bin/env python
"""Export throughput against baselines measured in the same run, on the same data.

    sudo .venv/bin/python benchmarks/bench_export.py [--data-mib 1024] [--size 4G] [--repeat 3]

Creates a throwaway running VM whose qcow2 disk holds --data-mib of data, then measures
  * export full (the module's own duration_s and copy time, run through the `ansible` CLI),
  * export incremental after 64 MiB were written,
  * baseline: `qemu-img convert -W -m 8` of the same image with the VM shut off
    (the offline-copy limit), and
  * peer: `virtnbdbackup -l full` when it is installed,
and prints the figures and the ratios (baseline time / export time: 1.0 = as fast as the
baseline). The page cache is warm for every measurement (the data was just written).
"""

from __future__ import annotations

import argparse
import json
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


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-mib", type=int, default=1024)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="vmbackup-bench-", dir="/var/tmp"))
    work.chmod(0o711)
    conn = libvirt.open("qemu:///system")
    factory = VmFactory(conn, pick_domain_type(conn))
    try:
        env = build_and_install(ROOT, work)
        ansible = AnsibleRunner(env=env, ansible=str(pathlib.Path(sys.executable).parent / "ansible"))
        vm = factory.create([DiskSpec(args.size, fill=[(0x5A, "0", f"{args.data_mib}M")])])
        image = str(vm.disks["vda"])
        fulls, copies, incs = [], [], []
        for i in range(args.repeat):
            repo = work / f"repo{i}"
            r = ansible("export", {"name": vm.name, "repository": str(repo), "mode": "full", "create_repository": True})
            assert r["changed"] and not r["failed"], r
            fulls.append((r["duration_s"], r["data_bytes"] / MIB / r["throughput_mib_s"]))
            vm.write("vda", 0xC0 + i, f"{256 + 64 * i}M", "64M")
            r = ansible("export", {"name": vm.name, "repository": str(repo)})
            assert r["type"] == "incremental", r
            incs.append(r["duration_s"])
            shutil.rmtree(repo)
        vm.dom.destroy()
        for i in range(args.repeat):
            out = work / f"copy{i}.qcow2"
            copies.append(timed(["qemu-img", "convert", "-W", "-m", "8", "-O", "qcow2", image, str(out)]))
            out.unlink()
        peer = []
        if shutil.which("virtnbdbackup"):
            # virtnbdbackup refuses a full while other checkpoints exist: remove export's.
            for cp in vm.dom.listAllCheckpoints(0):
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            vm.dom.create()
            for i in range(args.repeat):
                out = work / f"peer{i}"
                peer.append(timed(["virtnbdbackup", "-d", vm.name, "-l", "full", "-o", str(out)]))
                shutil.rmtree(out, ignore_errors=True)
                for cp in vm.dom.listAllCheckpoints(0):
                    cp.delete(0)
        fig = {
            "data_mib": args.data_mib,
            "export_full_s": statistics.median(f[0] for f in fulls),
            "export_full_copy_s": statistics.median(f[1] for f in fulls),
            "export_incremental_64mib_s": statistics.median(incs),
            "qemu_img_convert_offline_s": statistics.median(copies),
            "virtnbdbackup_full_s": statistics.median(peer) if peer else None,
        }
        fig["ratio_offline_over_export_full"] = fig["qemu_img_convert_offline_s"] / fig["export_full_s"]
        fig["ratio_offline_over_export_copy_phase"] = fig["qemu_img_convert_offline_s"] / fig["export_full_copy_s"]
        if peer:
            fig["ratio_peer_over_export_full"] = fig["virtnbdbackup_full_s"] / fig["export_full_s"]
        print(json.dumps(fig, indent=2))
        print(f"export full: {fig['export_full_s']:.2f}s for {args.data_mib} MiB "
              f"({args.data_mib / fig['export_full_s']:.0f} MiB/s end to end); "
              f"qemu-img convert offline: {fig['qemu_img_convert_offline_s']:.2f}s; "
              f"ratio {fig['ratio_offline_over_export_full']:.2f}x of the offline-copy limit")
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(fig, indent=2))
        return 0
    finally:
        factory.cleanup()
        conn.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
