"""The benchmark suite (benchmarks/run.py) at tiny sizes: it runs every step end to end against the
real libvirtd, its JSON holds every figure, ratio and target of the issue (each a number, or a
stated reason when a step cannot run here), the results files describe the machine, and it leaves
no domain, image or scratch directory behind."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from harness import PREFIX

ROOT = pathlib.Path(__file__).resolve().parents[2]

EXPORT_KEYS = ("full_s", "full_mib_s_on_allocated", "full_bytes_written", "full_data_bytes", "peak_rss_mib", "inc1_s",
               "inc1_data_bytes", "inc1_changed_bytes", "inc10_s", "inc10_data_bytes", "ratio_vs_offline_convert",
               "ratio_vs_offline_guarantees", "ratio_vs_cp_sparse", "ratio_size_vs_allocated", "ratio_inc1_vs_bound",
               "ratio_inc1_bytes_vs_changed", "ratio_inc10_bytes_vs_changed")
TARGET_KEYS = {"export_full_vs_offline_guarantees", "export_full_vs_offline_convert", "export_full_vs_virtnbdbackup",
               "backup_size_vs_allocated", "incremental_1pct_s_vs_bound", "incremental_1pct_bytes_vs_changed",
               "verify_w1_vs_hashlib_1", "verify_w2_vs_hashlib_2", "restore_vs_convert_fsync", "module_peak_rss_mib",
               "orchestration_per_vm_overhead_s", "backup_info_5000_cli_s"}


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_suite_at_tiny_sizes(conn, tmp_path):
    out_json = tmp_path / "bench.json"
    results = tmp_path / "results"
    argv = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--size", "128M", "--data", "16M", "--extents", "4",
            "--compress-data", "16M", "--repeat", "1", "--transport", "pull", "--orch-vms", "1", "--no-orch-single", "--sets", "100",
            "--catalog-vms", "2", "--json", str(out_json), "--results-dir", str(results)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    doc = json.loads(out_json.read_text())
    fig = doc["figures"]

    # The machine is described, before and after.
    m = doc["machine"]
    for key in ("cpu", "cores", "ram_gib", "disk", "kernel", "libvirt", "qemu_img", "loadavg_before", "loadavg_after"):
        assert m.get(key), (key, m)
    assert m["cores"] == os.cpu_count()

    # 1-3: offline baselines and every transport's full and incrementals, with every ratio a number.
    e = fig["export"]
    assert all(number(e["offline"][k]) for k in ("convert_s", "guarantees_s", "cp_sparse_s")), e["offline"]
    # One transport keeps the smoke run short; the default run measures push and pull.
    assert set(e["transports"]) == set(fig["transports"]) == {"pull"}
    for transport, t in e["transports"].items():
        assert t["transport_used"] == transport and number(t["full_transfer_s"]) and t["full_transfer_s"] < t["full_s"], t
        for key in EXPORT_KEYS:
            assert number(t[key]), (transport, key, t.get(key))
        # The guarantees baseline does strictly more than the plain convert: its ratio is the larger.
        assert t["ratio_vs_offline_guarantees"] > t["ratio_vs_offline_convert"] * 0.5
        # Checked against the disk as qemu-img sees it, not the module's figure: 16 MiB of data allocated,
        # and the full holds about that (metadata only on top); the incrementals hold about what changed.
        assert 16 << 20 <= t["allocated_bytes"] <= 17 << 20, t["allocated_bytes"]
        assert 1.0 <= t["ratio_size_vs_allocated"] < 1.2, t["ratio_size_vs_allocated"]
        assert t["inc1_changed_bytes"] == 1 << 20 and t["inc10_changed_bytes"] == 2 << 20, t
        assert 1.0 <= t["ratio_inc1_bytes_vs_changed"] < 2.0 and 1.0 <= t["ratio_inc10_bytes_vs_changed"] < 1.6, t
        assert t["peak_rss_mib"] < 500
    for transport, t in fig["two_disks"]["transports"].items():
        assert number(t["full_s"]) and number(t["ratio_vs_offline_convert"]) and number(t["ratio_vs_offline_guarantees"])

    # 4, 5: verify with 1 and 2 workers against hashlib, restore against convert + fsync.
    v = fig["verify"]
    for key in ("hashlib_1_threads_s", "hashlib_2_threads_s", "verify_workers_1_s", "verify_workers_2_s",
                "ratio_verify_1_vs_hashlib_1", "ratio_verify_2_vs_hashlib_2", "verify_scaling_2_over_1"):
        assert number(v[key]), (key, v)
    assert v["files"] >= 3 * 2  # three sets (full + 2 incrementals), each a disk image and the domain XML at least
    r = fig["restore"]
    assert r["chain_sets"] == 3 and all(number(r[k]) for k in ("convert_W_m8_fsync_s", "restore_s", "ratio_vs_convert_fsync"))

    # 6: the peer, full and incremental, interleaved with ours.
    p = fig["peer"]
    for key in ("virtnbdbackup_full_s", "virtnbdbackup_inc_s", "export_full_s", "export_inc_s", "ratio_full_vs_virtnbdbackup",
                "ratio_inc_vs_virtnbdbackup"):
        assert number(p[key]), (key, p)
    assert p["virtnbdbackup_inc_bytes"] < p["virtnbdbackup_full_bytes"]

    # 7: orchestration and the catalog.
    o = fig["orchestration"]
    assert o["n_vms"]["vms"] == 1 and o["n_vms"]["outcome"] == "ok" and number(o["per_vm_overhead_s"])
    c = fig["catalog"]
    assert c["sets"] == 100 and all(number(c[k]) for k in ("json_load_s", "backend_s", "cli_s", "prune_check_s"))

    # 8: compression, where the module has the option; otherwise the reason is stated.
    z = fig["compress"]
    if fig["export_options"]["compress"]:
        assert number(z["zstd_full_s"]) and number(z["none_full_s"]) and 0 < z["ratio_size_zstd_vs_none"] < 0.9, z
    else:
        assert "compress" in z["skipped"]

    # The fleet estimate, from this run's figures: the night is the largest of its three limits.
    fe = fig["fleet_estimate"]
    assert fe["measured"]["per_vm_overhead_s"] == o["per_vm_overhead_s"]
    for night in (fe["incremental_night"], fe["full_night"]):
        limits = (night["hosts_limit_h"], night["repository_limit_h"], night["controller_limit_h"])
        assert number(night["night_h"]) and night["night_h"] == max(limits), night
    assert fe["full_night"]["night_h"] > fe["incremental_night"]["night_h"]

    # Every target of the issue is there with its figure and verdict.
    targets = {t["key"]: t for t in doc["targets"]}
    assert set(targets) == TARGET_KEYS
    for key, t in targets.items():
        assert number(t["value"]) and isinstance(t["met"], bool), t
    assert "MET" in proc.stdout or "MISSED" in proc.stdout

    # The results files: JSON equal to --json's, and the Markdown with the machine and the table.
    kept = sorted(p.name for p in results.iterdir())
    assert len(kept) == 2 and kept[0].endswith(".json") and kept[1].endswith(".md"), kept
    assert json.loads((results / kept[0]).read_text())["figures"] == fig
    md = (results / kept[1]).read_text()
    assert m["cpu"] in md and "export full" in md

    # Nothing left behind: none of the domains it made (VMs, restored ones) is defined, none of its
    # directories (scratch, images) exists. Asked of libvirt and the file system, by name.
    made = doc["made"]
    assert len(made["domains"]) >= 2 + 2 + 1 and made["directories"], made  # main, 2-disk, compress, playbook VMs, a restore
    assert any(n.startswith(f"{PREFIX}bench-restore-") for n in made["domains"])
    defined = {d.name() for d in conn.listAllDomains(0)}
    assert not set(made["domains"]) & defined, set(made["domains"]) & defined
    assert not [d for d in made["directories"] if os.path.lexists(d)]
