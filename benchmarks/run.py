#!/usr/bin/env python
"""The benchmark suite: the collection against its baselines and the peer, in one run, on the same data.

    sudo .venv/bin/python benchmarks/run.py [--size 8G] [--data 2G] [--repeat 3] [--only export,verify,...]
        [--transport push,pull] [--json FILE] [--results-dir benchmarks/results | --no-results]

Steps (``--only`` takes their names; default: all of them), each measured against its baseline in
the same run, interleaved repeat by repeat, with the page cache dropped (``sync; echo 3 >
/proc/sys/vm/drop_caches``) before every timed step of the data steps (1-6, 8), ours and the
baselines' alike; the metadata steps (7) are synced before each timed run and warmed once, so that
they measure CPU (ansible, the catalog) rather than reading ansible's own Python from disk:

  export   1. offline baselines of the same image with the VM shut off: ``qemu-img convert -W -m 8``,
              the same + fsync + a streaming sha256 of the output (what export guarantees),
              ``cp --sparse=always``;
           2. our full export of the running VM per transport: wall time, duration_s, throughput on
              the allocated bytes, bytes written, peak RSS of the module process (VmHWM of the
              AnsiballZ python), the module's ``timings``;
           3. incrementals after 1 % and after 10 % of the data blocks were rewritten (through
              QEMU, as a guest writes): time and bytes against the bytes changed;
           and a 2-disk VM: full export against the offline copy of both disks.
  verify   4. verify (level data, every set of the VM) with workers 1 and 2 against a streaming
              hashlib sha256 of exactly the files the manifests list, with 1 and 2 threads;
  restore  5. restore of the newest point (full + 2 incrementals) against ``qemu-img convert -W -m 8``
              of the same chains + fsync (and plain convert, for information);
  peer     6. ``virtnbdbackup -l full`` and then ``-l inc`` after the same 1 % rewrite, same VM,
              interleaved with our full and incremental;
  orchestration
           7. the weekly playbook (vmbackup.libvirt.backup_weekly) over --orch-vms small VMs on this
              host: per-VM overhead = (wall - the export modules' own duration_s) / VMs, and the
              marginal cost per VM against a run over one VM;
  catalog  7. ``backup_info`` (and ``prune`` in check mode) on a synthetic repository of --sets sets
              (bench_catalog.py's generator), through ``ansible localhost -m`` and in process, against
              a plain ``json.load`` of the same manifests;
  compress 8. full export with compress none and zstd of a VM holding realistic compressible data (a
              tar of /usr/share and /usr/lib), time and size; skipped when the export module has no
              ``compress`` option.

Data: incompressible random bytes in --extents scattered extents (default 8 GiB virtual, 2 GiB of
data). Modules run the way users run them: ``ansible localhost -m vmbackup.libvirt.<module>`` with
the collection built and installed from this checkout. Prints a table, writes JSON with every
figure, every ratio and every target (met or missed), and keeps
``<results-dir>/<date>-<host>.json`` + ``.md`` with the machine described. Everything it made
(VMs, images, repositories, restored domains) is removed at the end, also on failure. The exit
status is non-zero only on errors; targets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import hashlib
import json
import os
import pathlib
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import libvirt  # noqa: E402

from harness import PREFIX, AnsibleRunner, DiskSpec, VmFactory, build_and_install, descendants, parse_result  # noqa: E402
from harness import pick_domain_type, destroy_vm  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB
STEPS = ("export", "verify", "restore", "peer", "orchestration", "catalog", "compress")
HASH_CHUNK = 4 * MIB

# The issue's targets: (key of the figure, comparison, bound, what it means).
TARGETS = [
    ("export_full_vs_offline_guarantees", ">=", 0.8, "full export >= 0.8x offline convert -W -m 8 + fsync + sha256"),
    ("export_full_vs_offline_convert", ">=", 0.5, "full export >= 0.5x plain offline qemu-img convert -W -m 8"),
    ("export_full_vs_virtnbdbackup", ">=", 3.0, "full export >= 3x virtnbdbackup -l full"),
    ("backup_size_vs_allocated", "<=", 1.05, "full backup size <= 1.05x allocated data"),
    ("incremental_1pct_s_vs_bound", "<=", 1.0, "incremental after 1 % <= 5 % of the full's time + 2 s (figure: time / bound)"),
    ("incremental_1pct_bytes_vs_changed", "<=", 1.1, "incremental after 1 %: bytes <= 1.1x changed"),
    ("verify_w1_vs_hashlib_1", ">=", 0.9, "verify workers=1 >= 0.9x hashlib sha256, 1 thread"),
    ("verify_w2_vs_hashlib_2", ">=", 0.9, "verify workers=2 >= 0.9x hashlib sha256, 2 threads (scaling)"),
    ("restore_vs_convert_fsync", ">=", 0.9, "restore >= 0.9x qemu-img convert -W -m 8 + fsync of the same chain"),
    ("module_peak_rss_mib", "<", 200.0, "module peak RSS < 200 MiB"),
    ("orchestration_per_vm_overhead_s", "<", 3.0, "per-VM overhead of the weekly playbook < 3 s"),
    ("backup_info_5000_cli_s", "<", 2.0, "backup_info over the synthetic repository < 2 s (ansible localhost -m)"),
]


# ----------------------------------------------------------------------------- small helpers
def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.I)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8G, 512M)")
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}[match.group(2).upper()]


def drop_caches() -> None:
    """The same for every timed step: nobody pays for another's dirty pages or profits from its cache."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as fh:
        fh.write("3\n")


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def timed(argv: list[str]) -> float:
    drop_caches()
    start = time.monotonic()
    run(argv)
    return time.monotonic() - start


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_file(path: str) -> int:
    h = hashlib.sha256()
    n = 0
    buf = bytearray(64 * 1024)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            got = fh.readinto(buf)
            if not got:
                break
            h.update(view[:got])
            n += got
    h.hexdigest()
    return n


def hash_all(files: list[str], threads: int) -> tuple[float, int]:
    drop_caches()
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        total = sum(pool.map(hash_file, sorted(files, key=os.path.getsize, reverse=True)))
    return time.monotonic() - start, total


def allocated_bytes(image: str) -> int:
    data = json.loads(run(["qemu-img", "map", "-U", "--output=json", image]).stdout)
    return sum(e["length"] for e in data if e.get("data"))


def chain_spec(files: list[str]) -> str:
    node = None
    for path in files:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": path}, "backing": node}
    return "json:" + json.dumps(node, separators=(",", ":"))


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(num, den):
    return None if num is None or not den else num / den


def delete_checkpoints(dom) -> None:
    """Checkpoints and their bitmaps: virtnbdbackup refuses a full while others exist, and a fresh full starts clean."""
    for cp in sorted(dom.listAllCheckpoints(0), key=lambda c: c.getName(), reverse=True):
        try:
            cp.delete(0)
        except libvirt.libvirtError:
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)


def start(dom) -> None:
    if not dom.isActive():
        dom.create()


def stop(dom) -> None:
    if dom.isActive():
        dom.destroy()


# ----------------------------------------------------------------------------- data
def scattered_extents(virtual: int, data: int, count: int, seed: int) -> list[tuple[int, int]]:
    """count extents (1 MiB aligned) of data bytes in all, spread over the disk, none overlapping."""
    count = max(1, min(count, data // MIB))
    length = (data // count) // MIB * MIB
    slot = virtual // count // MIB * MIB
    if length > slot:
        raise SystemExit(f"--data {data} does not fit in --size {virtual} as {count} extents")
    rng = random.Random(seed)
    return [(i * slot + rng.randrange(0, (slot - length) // MIB + 1) * MIB, length) for i in range(count)]


def write_qcow2(path: pathlib.Path, virtual: int, extents: list[tuple[int, int]], source) -> None:
    """A qcow2 whose extents hold the bytes source(n) gives; holes elsewhere (raw, then converted)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as fh:
        fh.truncate(virtual)
        for offset, length in extents:
            fh.seek(offset)
            left = length
            while left:
                chunk = source(min(left, 4 * MIB))
                fh.write(chunk)
                left -= len(chunk)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    raw.unlink()


def random_source(n: int) -> bytes:
    return os.urandom(n)


class TarSource:
    """Realistic compressible bytes: a tar stream of /usr/share and /usr/lib (text and binaries)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["tar", "cf", "-", "--ignore-failed-read", "/usr/share", "/usr/lib"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def __call__(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)
        if len(data) < n:  # the tree is smaller than asked for: start it again
            self.close()
            self.__init__()
            data += self.proc.stdout.read(n - len(data))
        return data

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def make_vm(factory: VmFactory, disks: list[tuple[int, list[tuple[int, int]]]], source, running: bool = True):
    """A VM through the test harness (empty qcow2 disks), then its images replaced by ours before it starts."""
    vm = factory.create([DiskSpec(str(size)) for size, dummy in disks], running=False)
    for (size, extents), target in zip(disks, sorted(vm.disks)):
        image = vm.disks[target]
        image.unlink()
        write_qcow2(image, size, extents, source)
    if running:
        vm.dom.create()
    return vm


def rewrite(vm, target: str, extents: list[tuple[int, int]], fraction: float, seed: int, pattern: int) -> int:
    """Rewrite fraction of the data extents' bytes through QEMU (dirties the bitmap): 1 MiB writes at
    distinct seeded offsets inside the data. Returns the bytes changed."""
    blocks = [off + i * MIB for off, length in extents for i in range(length // MIB)]
    count = max(1, round(len(blocks) * fraction))
    picked = sorted(random.Random(seed).sample(blocks, count))
    # Coalesce neighbours into one write each (fewer monitor round trips, same bytes).
    runs: list[list[int]] = []
    for off in picked:
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1][1] += MIB
        else:
            runs.append([off, MIB])
    for off, length in runs:
        vm.write(target, pattern, str(off), str(length))
    return count * MIB


# ----------------------------------------------------------------------------- modules through the CLI
class Cli:
    """`ansible localhost -m vmbackup.libvirt.<module>`: the result, the wall time and the module's peak RSS."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.runner = AnsibleRunner(env=env, ansible=str(pathlib.Path(sys.executable).parent / "ansible"))
        self.peak_rss: dict[str, float] = {}

    def __call__(self, module: str, args: dict, check: bool = False, drop: bool = True) -> tuple[dict, float, float | None]:
        if drop:
            drop_caches()
        else:
            os.sync()
        start_t = time.monotonic()
        proc = subprocess.Popen(self.runner.argv(module, args, check), env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        hwm: dict[int, int] = {}
        done = threading.Event()
        sampler = threading.Thread(target=sample_hwm, args=(proc.pid, module, hwm, done), daemon=True)
        sampler.start()
        out, err = proc.communicate(timeout=3600)
        wall = time.monotonic() - start_t
        done.set()
        sampler.join()
        result = parse_result(out, err)
        if result.get("failed"):
            raise RuntimeError(f"{module} failed: {result.get('error_code')} {result.get('msg')}")
        rss = max(hwm.values()) / 1024 if hwm else None  # kB -> MiB
        if rss is not None:
            self.peak_rss[module] = max(self.peak_rss.get(module, 0.0), rss)
        return result, wall, rss


def sample_hwm(root: int, module: str, hwm: dict[int, int], done: threading.Event) -> None:
    """VmHWM (peak resident set) of the module's own python (AnsiballZ_<module>.py), not ansible's
    nor qemu-img's: sampled every 20 ms while it runs; the last sample before it exits is its peak
    up to then (the high-water mark only grows)."""
    name = f"AnsiballZ_{module}.py".encode()
    while not done.is_set():
        for pid in descendants(root):
            try:
                argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if len(argv) > 1 and b"python" in os.path.basename(argv[0]) and argv[1].endswith(name):
                    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            hwm[pid] = max(hwm.get(pid, 0), int(line.split()[1]))
            except (OSError, ValueError):
                continue
        time.sleep(0.02)


def module_options(collection_path: str, module: str) -> str:
    path = pathlib.Path(collection_path) / "ansible_collections" / "vmbackup" / "libvirt" / "plugins" / "modules" / f"{module}.py"
    return path.read_text()


def has_option(source: str, option: str) -> bool:
    """Whether the installed module takes the option: its argument spec (``option=dict(``) or its DOCUMENTATION."""
    return (re.search(rf"\b{option}=dict\(", source) is not None
            or re.search(rf"^  {option}:\s*$", source.split('"""', 2)[1] if '"""' in source else source, re.M) is not None)


# ----------------------------------------------------------------------------- the machine
def machine() -> dict:
    def cmd(argv):
        try:
            return run(argv).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = None
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = next(int(line.split()[1]) for line in pathlib.Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    dev = cmd(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", "/var/lib/libvirt/images"])
    disk = None
    if dev:
        name = dev.split()[0]
        disk = {"mount_source_fstype": dev,
                "lsblk": cmd(["lsblk", "-d", "-n", "-o", "NAME,SIZE,ROTA,MODEL,TRAN", name]) if name.startswith("/dev/") else None}
    lib = libvirt.getVersion()
    return {
        "host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 1024 / 1024, 1),
        "disk": disk, "kernel": platform.release(), "os": cmd(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "libvirt": f"{lib // 1000000}.{lib // 1000 % 1000}.{lib % 1000}",
        "qemu": (cmd(["qemu-system-x86_64", "--version"]) or "").splitlines()[0] if cmd(["qemu-system-x86_64", "--version"]) else None,
        "qemu_img": (cmd(["qemu-img", "--version"]) or "").splitlines()[0] or None,
        "virtnbdbackup": cmd(["virtnbdbackup", "--version"]),
        "python": platform.python_version(),
        "ansible_core": (cmd([str(pathlib.Path(sys.executable).parent / "ansible"), "--version"]) or "").splitlines()[0] or None,
        "loadavg_before": list(os.getloadavg()),
    }


# ----------------------------------------------------------------------------- the suite
class Suite:
    def __init__(self, args, work: pathlib.Path, conn, factory: VmFactory, cli: Cli, collection: str) -> None:
        self.args, self.work, self.conn, self.factory, self.cli = args, work, conn, factory, cli
        self.fig: dict = {}
        self.runs: dict = {}
        self.restored: list[str] = []
        self.made_domains: list[str] = []  # restored domains; the factory's VMs are added at the end
        doc = module_options(collection, "export")
        self.has_transport = has_option(doc, "transport")
        self.has_compress = has_option(doc, "compress")
        wanted = args.transport or (["push", "pull"] if self.has_transport else ["default"])
        self.transports = [t for t in wanted if t == "default" or self.has_transport]
        if not self.transports:
            self.transports = ["default"]
        self.fig["transports"] = self.transports
        self.fig["export_options"] = {"transport": self.has_transport, "compress": self.has_compress}
        self.main_vm = None
        self.main_extents = None
        self.repo_for_vr = None  # (repository, vm, [set ids]) for verify/restore

    def log(self, text: str) -> None:
        print(text, flush=True)

    def new_dir(self, name: str) -> pathlib.Path:
        path = self.work / name
        path.mkdir(mode=0o711)
        return path

    def export_args(self, vm, repo: pathlib.Path, transport: str, **extra) -> dict:
        args = {"name": vm.name, "repository": str(repo), "create_repository": True, **extra}
        if transport != "default":
            args["transport"] = transport
        return args

    def vm_main(self):
        if self.main_vm is None:
            a = self.args
            self.main_extents = scattered_extents(a.size, a.data, a.extents, seed=1)
            self.log(f"building the VM: {a.size / GIB:g} GiB qcow2, {a.data / MIB:.0f} MiB of random data in "
                     f"{len(self.main_extents)} extents")
            self.main_vm = make_vm(self.factory, [(a.size, self.main_extents)], random_source)
            self.fig["data"] = {"virtual_bytes": a.size, "data_bytes": sum(n for dummy, n in self.main_extents),
                                "extents": len(self.main_extents),
                                "allocated_bytes": allocated_bytes(str(self.main_vm.disks["vda"]))}
        return self.main_vm

    # ------------------------------------------------------------------ 1-3 (+ 2-disk)
    def offline(self, images: list[str], tag: str) -> dict:
        """The offline baselines of these images, VM off, each after a cache drop."""
        outs = [str(self.work / f"offline-{tag}-{n}.qcow2") for n in range(len(images))]
        res = {}
        drop_caches()
        t0 = time.monotonic()
        for img, out in zip(images, outs):
            run(["qemu-img", "convert", "-W", "-m", "8", "-O", "qcow2", img, out])
        res["convert_s"] = time.monotonic() - t0
        for out in outs:
            os.unlink(out)
        drop_caches()
        t0 = time.monotonic()
        for img, out in zip(images, outs):
            run(["qemu-img", "convert", "-W", "-m", "8", "-O", "qcow2", img, out])
            fsync_path(out)
            hash_file(out)
        res["guarantees_s"] = time.monotonic() - t0
        for out in outs:
            os.unlink(out)
        drop_caches()
        t0 = time.monotonic()
        for img, out in zip(images, outs):
            run(["cp", "--sparse=always", img, out])
        res["cp_sparse_s"] = time.monotonic() - t0
        for out in outs:
            os.unlink(out)
        return res

    def step_export(self) -> None:
        a = self.args
        vm = self.vm_main()
        image = str(vm.disks["vda"])
        data = self.fig["data"]["data_bytes"]
        runs = {"offline": [], **{t: [] for t in self.transports}}
        for i in range(a.repeat):
            stop(vm.dom)
            runs["offline"].append(self.offline([image], "main"))
            alloc = allocated_bytes(image)
            start(vm.dom)
            # Alternate which transport goes first, repeat by repeat: neither always pays for being first.
            for transport in (self.transports if i % 2 == 0 else self.transports[::-1]):
                delete_checkpoints(vm.dom)
                repo = self.work / f"repo-{transport}-{i}"
                full, wall, rss = self.cli("export", self.export_args(vm, repo, transport, mode="full"))
                changed1 = rewrite(vm, "vda", self.main_extents, 0.01, seed=100 + i, pattern=0xC0 + i)
                inc1, wall1, rss1 = self.cli("export", self.export_args(vm, repo, transport))
                changed10 = rewrite(vm, "vda", self.main_extents, 0.10, seed=200 + i, pattern=0xD0 + i)
                inc10, wall10, rss10 = self.cli("export", self.export_args(vm, repo, transport))
                for r in (inc1, inc10):
                    if r["type"] != "incremental":
                        raise RuntimeError(f"expected an incremental, got {r['type']}: {r.get('reason')}")
                runs[transport].append({
                    "full": summary(full, wall, rss), "inc1": summary(inc1, wall1, rss1), "inc10": summary(inc10, wall10, rss10),
                    "changed1_bytes": changed1, "changed10_bytes": changed10, "allocated_bytes": alloc,
                })
                self.log(f"  export [{transport}] {i + 1}/{a.repeat}: full {full['duration_s']:.2f}s, inc 1% "
                         f"{inc1['duration_s']:.2f}s, inc 10% {inc10['duration_s']:.2f}s; offline convert "
                         f"{runs['offline'][-1]['convert_s']:.2f}s, +fsync+sha256 {runs['offline'][-1]['guarantees_s']:.2f}s")
                if transport == self.transports[-1] and i + 1 == a.repeat and self.repo_for_vr is None:
                    self.repo_for_vr = (repo, vm, [full["set_id"], inc1["set_id"], inc10["set_id"]])
                else:
                    shutil.rmtree(repo, ignore_errors=True)
        self.runs["export"] = runs
        off = {k: med([r[k] for r in runs["offline"]]) for k in ("convert_s", "guarantees_s", "cp_sparse_s")}
        fig = {"data_mib": data / MIB, "offline": off, "transports": {}}
        for transport in self.transports:
            rr = runs[transport]
            f = {k: med([r[k]["duration_s"] for r in rr]) for k in ("full", "inc1", "inc10")}
            t = {
                "full_s": f["full"], "full_wall_s": med([r["full"]["wall_s"] for r in rr]),
                "full_mib_s_on_allocated": data / MIB / f["full"],
                "full_bytes_written": med([r["full"]["bytes_written"] for r in rr]),
                "full_data_bytes": med([r["full"]["data_bytes"] for r in rr]),
                "full_timings": rr[-1]["full"].get("timings"), "transport_used": rr[-1]["full"].get("transport"),
                "inc1_s": f["inc1"], "inc1_data_bytes": med([r["inc1"]["data_bytes"] for r in rr]),
                "inc1_changed_bytes": rr[-1]["changed1_bytes"],
                "inc10_s": f["inc10"], "inc10_data_bytes": med([r["inc10"]["data_bytes"] for r in rr]),
                "inc10_changed_bytes": rr[-1]["changed10_bytes"],
                "peak_rss_mib": max((r[k]["rss_mib"] or 0) for r in rr for k in ("full", "inc1", "inc10")) or None,
                "allocated_bytes": med([r["allocated_bytes"] for r in rr]),
            }
            t["full_transfer_s"] = med([(r["full"].get("timings") or {}).get("transfer_s") for r in rr])
            t["full_read_mib_s_reported"] = med([r["full"].get("read_mib_s") for r in rr])
            t["ratio_transfer_vs_offline_convert"] = ratio(off["convert_s"], t["full_transfer_s"])
            t["ratio_vs_offline_convert"] = ratio(off["convert_s"], f["full"])
            t["ratio_vs_offline_guarantees"] = ratio(off["guarantees_s"], f["full"])
            t["ratio_vs_cp_sparse"] = ratio(off["cp_sparse_s"], f["full"])
            t["ratio_size_vs_allocated"] = ratio(t["full_data_bytes"], t["allocated_bytes"])
            t["inc1_bound_s"] = 0.05 * f["full"] + 2
            t["ratio_inc1_vs_bound"] = f["inc1"] / t["inc1_bound_s"]
            t["ratio_inc1_bytes_vs_changed"] = ratio(t["inc1_data_bytes"], t["inc1_changed_bytes"])
            t["ratio_inc10_bytes_vs_changed"] = ratio(t["inc10_data_bytes"], t["inc10_changed_bytes"])
            t["ratio_inc1_vs_full"] = ratio(f["inc1"], f["full"])
            t["ratio_inc10_vs_full"] = ratio(f["inc10"], f["full"])
            fig["transports"][transport] = t
        self.fig["export"] = fig
        self.step_two_disks()

    def step_two_disks(self) -> None:
        a = self.args
        half = a.data // 2
        disks = [(a.size, scattered_extents(a.size, half, max(1, a.extents // 2), seed=10 + n)) for n in range(2)]
        self.log(f"building the 2-disk VM: 2 x {a.size / GIB:g} GiB, {half / MIB:.0f} MiB of random data each")
        vm = make_vm(self.factory, disks, random_source)
        images = [str(vm.disks[t]) for t in sorted(vm.disks)]
        runs = {"offline": [], **{t: [] for t in self.transports}}
        for i in range(a.repeat):
            stop(vm.dom)
            runs["offline"].append(self.offline(images, "two"))
            start(vm.dom)
            for transport in (self.transports if i % 2 == 0 else self.transports[::-1]):
                delete_checkpoints(vm.dom)
                repo = self.work / f"repo2-{transport}-{i}"
                full, wall, rss = self.cli("export", self.export_args(vm, repo, transport, mode="full"))
                runs[transport].append(summary(full, wall, rss))
                shutil.rmtree(repo, ignore_errors=True)
                self.log(f"  2-disk export [{transport}] {i + 1}/{a.repeat}: full {full['duration_s']:.2f}s; offline convert "
                         f"{runs['offline'][-1]['convert_s']:.2f}s")
        stop(vm.dom)
        self.runs["two_disks"] = runs
        off = {k: med([r[k] for r in runs["offline"]]) for k in ("convert_s", "guarantees_s", "cp_sparse_s")}
        fig = {"data_mib": 2 * half / MIB, "offline": off, "transports": {}}
        for transport in self.transports:
            d = med([r["duration_s"] for r in runs[transport]])
            fig["transports"][transport] = {
                "full_s": d, "full_mib_s_on_allocated": 2 * half / MIB / d,
                "peak_rss_mib": max((r["rss_mib"] or 0) for r in runs[transport]) or None,
                "ratio_vs_offline_convert": ratio(off["convert_s"], d), "ratio_vs_offline_guarantees": ratio(off["guarantees_s"], d),
            }
        self.fig["two_disks"] = fig

    # ------------------------------------------------------------------ 4, 5
    def vr_repository(self):
        if self.repo_for_vr is None:
            vm = self.vm_main()
            start(vm.dom)
            delete_checkpoints(vm.dom)
            repo = self.work / "repo-vr"
            transport = self.transports[-1]
            full, *dummy = self.cli("export", self.export_args(vm, repo, transport, mode="full"))
            rewrite(vm, "vda", self.main_extents, 0.01, seed=300, pattern=0xE0)
            inc1, *dummy = self.cli("export", self.export_args(vm, repo, transport))
            rewrite(vm, "vda", self.main_extents, 0.10, seed=301, pattern=0xE1)
            inc10, *dummy = self.cli("export", self.export_args(vm, repo, transport))
            self.repo_for_vr = (repo, vm, [full["set_id"], inc1["set_id"], inc10["set_id"]])
        repo, vm, set_ids = self.repo_for_vr
        stop(vm.dom)  # verify and restore need only the repository; a running guest is noise
        sets_dir = repo / "vms" / vm.uuid / "sets"
        manifests = {sid: json.loads((sets_dir / sid / "manifest.json").read_text()) for sid in set_ids}
        return repo, vm, set_ids, sets_dir, manifests

    def step_verify(self) -> None:
        repo, vm, set_ids, sets_dir, manifests = self.vr_repository()
        files = [str(sets_dir / sid / rel) for sid, m in manifests.items() for rel in sorted(m["files"])]
        total = sum(os.path.getsize(f) for f in files)
        runs = []
        for i in range(self.args.repeat):
            row = {}
            for w in (1, 2):
                row[f"hashlib_{w}_s"], read = hash_all(files, w)
                if read != total:
                    raise RuntimeError(f"hashlib read {read} bytes of {total}")
                r, wall, rss = self.cli("verify", {"repository": str(repo), "name": vm.name, "workers": w})
                if r["outcome"] != "ok" or r["bytes_read"] != total:
                    raise RuntimeError(f"verify: outcome {r['outcome']}, {r['bytes_read']} bytes read of {total}")
                row[f"verify_{w}"] = summary(r, wall, rss)
            runs.append(row)
            self.log(f"  verify {i + 1}/{self.args.repeat}: hashlib 1 thread {row['hashlib_1_s']:.2f}s / workers=1 "
                     f"{row['verify_1']['duration_s']:.2f}s; hashlib 2 threads {row['hashlib_2_s']:.2f}s / workers=2 "
                     f"{row['verify_2']['duration_s']:.2f}s")
        self.runs["verify"] = runs
        fig = {"files": len(files), "mib": total / MIB}
        for w in (1, 2):
            h = med([r[f"hashlib_{w}_s"] for r in runs])
            v = med([r[f"verify_{w}"]["duration_s"] for r in runs])
            fig[f"hashlib_{w}_threads_s"] = h
            fig[f"verify_workers_{w}_s"] = v
            fig[f"verify_workers_{w}_wall_s"] = med([r[f"verify_{w}"]["wall_s"] for r in runs])
            fig[f"verify_workers_{w}_timings"] = runs[-1][f"verify_{w}"].get("timings")
            fig[f"ratio_verify_{w}_vs_hashlib_{w}"] = ratio(h, v)
            fig[f"ratio_verify_{w}_vs_hashlib_1"] = ratio(med([r["hashlib_1_s"] for r in runs]), v)
        fig["verify_scaling_2_over_1"] = ratio(fig["verify_workers_1_s"], fig["verify_workers_2_s"])
        fig["peak_rss_mib"] = max((r[f"verify_{w}"]["rss_mib"] or 0) for r in runs for w in (1, 2)) or None
        self.fig["verify"] = fig

    def step_restore(self) -> None:
        repo, vm, set_ids, sets_dir, manifests = self.vr_repository()
        newest = manifests[set_ids[-1]]
        chains = {}
        for disk in newest["disks"]:
            chain = []
            for sid in set_ids:
                d = next(x for x in manifests[sid]["disks"] if x["target"] == disk["target"])
                chain.append(str(sets_dir / sid / d["file"]))
            chains[disk["target"]] = chain
        chain_bytes = sum(os.path.getsize(f) for c in chains.values() for f in c)
        scratch = self.new_dir("restore")

        def convert(head: list[str], sync: bool) -> float:
            outs = []
            drop_caches()
            t0 = time.monotonic()
            for target, chain in chains.items():
                out = str(scratch / f"baseline-{target}.qcow2")
                run(head + [chain_spec(chain), out])
                if sync:
                    fsync_path(out)
                outs.append(out)
            seconds = time.monotonic() - t0
            for out in outs:
                os.unlink(out)
            return seconds

        runs = []
        for i in range(self.args.repeat):
            row = {"convert_W_m8_fsync_s": convert(["qemu-img", "convert", "-W", "-m", "8", "-O", "qcow2"], True),
                   "convert_plain_s": convert(["qemu-img", "convert", "-O", "qcow2"], False)}
            name = f"{PREFIX}bench-restore-{i}-{os.getpid()}"
            self.restored.append(name)
            self.made_domains.append(name)
            r, wall, rss = self.cli("restore", {"repository": str(repo), "name": vm.name, "restore_as": name,
                                                "disk_dir": str(scratch)})
            if r["set_id"] != set_ids[-1]:
                raise RuntimeError(f"restore read {r['set_id']}, expected {set_ids[-1]}")
            row["restore"] = summary(r, wall, rss)
            for d in r["disks"]:
                os.unlink(d["path"])
            self.conn.lookupByName(name).undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            self.restored.remove(name)
            runs.append(row)
            self.log(f"  restore {i + 1}/{self.args.repeat}: convert -W -m 8 + fsync {row['convert_W_m8_fsync_s']:.2f}s, "
                     f"restore {r['duration_s']:.2f}s")
        self.runs["restore"] = runs
        c = med([r["convert_W_m8_fsync_s"] for r in runs])
        p = med([r["convert_plain_s"] for r in runs])
        d = med([r["restore"]["duration_s"] for r in runs])
        self.fig["restore"] = {
            "chain_mib": chain_bytes / MIB, "chain_sets": len(set_ids), "convert_W_m8_fsync_s": c, "convert_plain_s": p,
            "restore_s": d, "restore_wall_s": med([r["restore"]["wall_s"] for r in runs]),
            "restore_timings": runs[-1]["restore"].get("timings"),
            "ratio_vs_convert_fsync": ratio(c, d), "ratio_vs_convert_plain": ratio(p, d),
            "peak_rss_mib": max((r["restore"]["rss_mib"] or 0) for r in runs) or None,
        }

    # ------------------------------------------------------------------ 6
    def step_peer(self) -> None:
        if not shutil.which("virtnbdbackup"):
            self.fig["peer"] = {"skipped": "virtnbdbackup is not installed"}
            return
        vm = self.vm_main()
        start(vm.dom)
        transport = self.transports[-1]
        runs = []
        for i in range(self.args.repeat):
            delete_checkpoints(vm.dom)
            out = self.work / f"peer-{i}"
            row = {"full_s": timed(["virtnbdbackup", "-d", vm.name, "-l", "full", "-o", str(out)])}
            row["full_bytes"] = dir_bytes(out)
            changed = rewrite(vm, "vda", self.main_extents, 0.01, seed=400 + i, pattern=0xA0 + i)
            row["inc_s"] = timed(["virtnbdbackup", "-d", vm.name, "-l", "inc", "-o", str(out)])
            row["inc_bytes"] = dir_bytes(out) - row["full_bytes"]
            row["changed_bytes"] = changed
            shutil.rmtree(out, ignore_errors=True)
            delete_checkpoints(vm.dom)
            repo = self.work / f"repo-peer-{i}"
            full, wall, rss = self.cli("export", self.export_args(vm, repo, transport, mode="full"))
            rewrite(vm, "vda", self.main_extents, 0.01, seed=400 + i, pattern=0xB0 + i)
            inc, wall_i, rss_i = self.cli("export", self.export_args(vm, repo, transport))
            row["ours"] = {"full": summary(full, wall, rss), "inc": summary(inc, wall_i, rss_i)}
            shutil.rmtree(repo, ignore_errors=True)
            runs.append(row)
            self.log(f"  peer {i + 1}/{self.args.repeat}: virtnbdbackup full {row['full_s']:.2f}s inc {row['inc_s']:.2f}s; "
                     f"export [{transport}] full {full['duration_s']:.2f}s (wall {wall:.2f}s) inc {inc['duration_s']:.2f}s")
        delete_checkpoints(vm.dom)
        self.runs["peer"] = runs
        pf, pi = med([r["full_s"] for r in runs]), med([r["inc_s"] for r in runs])
        of, oi = med([r["ours"]["full"]["duration_s"] for r in runs]), med([r["ours"]["inc"]["duration_s"] for r in runs])
        ofw, oiw = med([r["ours"]["full"]["wall_s"] for r in runs]), med([r["ours"]["inc"]["wall_s"] for r in runs])
        self.fig["peer"] = {
            "transport": transport, "virtnbdbackup_full_s": pf, "virtnbdbackup_inc_s": pi,
            "virtnbdbackup_full_bytes": med([r["full_bytes"] for r in runs]), "virtnbdbackup_inc_bytes": med([r["inc_bytes"] for r in runs]),
            "export_full_s": of, "export_inc_s": oi, "export_full_wall_s": ofw, "export_inc_wall_s": oiw,
            "ratio_full_vs_virtnbdbackup": ratio(pf, of), "ratio_inc_vs_virtnbdbackup": ratio(pi, oi),
            "ratio_full_wall_vs_virtnbdbackup": ratio(pf, ofw), "ratio_inc_wall_vs_virtnbdbackup": ratio(pi, oiw),
        }

    # ------------------------------------------------------------------ 7
    def step_orchestration(self) -> None:
        a = self.args
        token = os.urandom(3).hex()
        fill = [(0x5A, "0", "2M")]
        vms = [self.factory.create([DiskSpec("16M", fill=fill)], name=f"{PREFIX}orch-{token}-{n:02d}") for n in range(a.orch_vms)]
        single = self.factory.create([DiskSpec("16M", fill=fill)], name=f"{PREFIX}orch1-{token}") if a.orch_single else None

        def play(pattern: str, tag: str) -> dict:
            repo, reports = self.work / f"orch-repo-{tag}", self.new_dir(f"orch-reports-{tag}")
            variables = {"vmbackup_hosts": "localhost", "vmbackup_backup_repository": str(repo),
                         "vmbackup_backup_create_repository": True, "vmbackup_backup_include": [pattern],
                         "vmbackup_backup_report_dir": str(reports), "vmbackup_backup_period": "2026-W49"}
            vars_file = self.work / f"orch-vars-{tag}.json"
            vars_file.write_text(json.dumps(variables))
            env = dict(self.cli.env, ANSIBLE_STDOUT_CALLBACK="default")
            argv = [str(pathlib.Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                    "vmbackup.libvirt.backup_weekly", "-e", f"@{vars_file}"]
            os.sync()  # metadata step: synced, not dropped (see settle_metadata)
            t0 = time.monotonic()
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=3600)
            wall = time.monotonic() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"the weekly playbook failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
            report = json.loads(next(reports.glob("*.json")).read_text())
            durations = [float(v.get("duration_s") or 0) for v in report["vms"]]
            tasks = len(re.findall(r"^TASK \[", proc.stdout, re.M))
            return {"wall_s": wall, "vms": len(report["vms"]), "export_duration_sum_s": sum(durations), "tasks_shown": tasks,
                    "outcome": report.get("outcome")}

        # Warm ansible's own files once (untimed): the playbook runs are synced, not dropped (as the catalog).
        self.cli("domain_info", {"include": [f"{PREFIX}orch-{token}-*"]}, drop=False)
        fig = {}
        if single is not None:
            fig["one_vm"] = play(single.name, "one")
            self.log(f"  weekly playbook over 1 VM: {fig['one_vm']['wall_s']:.1f}s")
        fig["n_vms"] = play(f"{PREFIX}orch-{token}-*", "n")
        n = fig["n_vms"]
        self.log(f"  weekly playbook over {n['vms']} VMs: {n['wall_s']:.1f}s (exports {n['export_duration_sum_s']:.1f}s in all)")
        if n["vms"] != a.orch_vms:
            raise RuntimeError(f"the weekly playbook backed up {n['vms']} VMs, not {a.orch_vms}")
        fig["per_vm_overhead_s"] = (n["wall_s"] - n["export_duration_sum_s"]) / n["vms"]
        fig["per_vm_wall_s"] = n["wall_s"] / n["vms"]
        if single is not None and n["vms"] > 1:
            fig["marginal_per_vm_s"] = (n["wall_s"] - fig["one_vm"]["wall_s"]) / (n["vms"] - 1)
            fig["fixed_s"] = fig["one_vm"]["wall_s"] - fig["marginal_per_vm_s"]
        for vm in vms + ([single] if single else []):
            destroy_vm(vm.dom)
        self.fig["orchestration"] = fig

    def step_catalog(self) -> None:
        import bench_catalog  # pylint: disable=import-outside-toplevel
        a = self.args
        path = str(self.work / "catalog-repo")
        t0 = time.monotonic()
        manifests, sidecars = bench_catalog.build(path, a.sets, a.catalog_vms, 0.5)
        self.log(f"  synthetic repository: {len(manifests)} sets, {len(sidecars)} verdicts in {time.monotonic() - t0:.1f}s")
        # Metadata steps are synced before each timed run, not dropped: what they measure is CPU (ansible,
        # the catalog), and a dropped cache would measure reading ansible's own Python from disk. One
        # untimed pass warms them, the baseline and ours alike.
        bench_catalog.baseline(manifests)
        self.cli("backup_info", {"repository": path}, drop=False)
        runs = []
        for dummy in range(self.args.repeat):
            row = {}
            os.sync()
            row["json_load_s"] = bench_catalog.baseline(manifests)
            os.sync()
            dummy_r, row["backend_s"], *dummy_rest = bench_catalog.backend_run(path)
            r, row["cli_s"], row["cli_rss_mib"] = self.cli("backup_info", {"repository": path}, drop=False)
            if r["totals"]["sets"] != len(manifests):
                raise RuntimeError(f"backup_info counted {r['totals']['sets']} sets, not {len(manifests)}")
            r, row["prune_check_s"], row["prune_rss_mib"] = self.cli(
                "prune", {"repository": path, "series": "weekly", "keep_weekly": 5}, check=True, drop=False)
            row["prune_would_remove"] = len(r.get("removed") or r.get("would_remove") or [])
            runs.append(row)
            self.log(f"  catalog: json.load {row['json_load_s']:.2f}s, backend {row['backend_s']:.2f}s, "
                     f"backup_info CLI {row['cli_s']:.2f}s, prune --check CLI {row['prune_check_s']:.2f}s")
        self.runs["catalog"] = runs
        fig = {k: med([r[k] for r in runs]) for k in ("json_load_s", "backend_s", "cli_s", "prune_check_s")}
        fig.update(sets=len(manifests), verdicts=len(sidecars), vms=a.catalog_vms,
                   peak_rss_mib=max(max(r["cli_rss_mib"] or 0, r["prune_rss_mib"] or 0) for r in runs) or None,
                   ratio_backend_vs_json_load=ratio(fig["backend_s"], fig["json_load_s"]),
                   prune_would_remove=runs[-1]["prune_would_remove"])
        self.fig["catalog"] = fig

    # ------------------------------------------------------------------ 8
    def step_compress(self) -> None:
        if not self.has_compress:
            self.fig["compress"] = {"skipped": "the export module of this checkout has no compress option"}
            return
        a = self.args
        extents = scattered_extents(a.size, a.compress_data, max(1, a.extents // 4), seed=7)
        self.log(f"building the compressible VM: {a.compress_data / MIB:.0f} MiB of a tar of /usr/share + /usr/lib")
        source = TarSource()
        try:
            vm = make_vm(self.factory, [(a.size, extents)], source)
        finally:
            source.close()
        image = str(vm.disks["vda"])
        alloc = allocated_bytes(image)
        # compress of a running VM needs the pull transport (push + zstd is INVALID_ARGUMENT), whatever --transport says
        transport = "pull" if self.has_transport else "default"
        runs = []
        for i in range(a.repeat):
            row = {}
            for comp in (("none", "zstd") if i % 2 == 0 else ("zstd", "none")):
                delete_checkpoints(vm.dom)
                repo = self.work / f"repo-compress-{comp}-{i}"
                r, wall, rss = self.cli("export", self.export_args(vm, repo, transport, mode="full", compress=comp))
                row[comp] = summary(r, wall, rss)
                changed = rewrite(vm, "vda", extents, 0.01, seed=500 + i, pattern=0x11)
                inc, wall_i, rss_i = self.cli("export", self.export_args(vm, repo, transport, compress=comp))
                row[f"{comp}_inc"] = summary(inc, wall_i, rss_i)
                row["changed_bytes"] = changed
                shutil.rmtree(repo, ignore_errors=True)
            runs.append(row)
            self.log(f"  compress {i + 1}/{a.repeat}: none {row['none']['duration_s']:.2f}s {row['none']['data_bytes'] / MIB:.0f} MiB; "
                     f"zstd {row['zstd']['duration_s']:.2f}s {row['zstd']['data_bytes'] / MIB:.0f} MiB")
        stop(vm.dom)
        self.runs["compress"] = runs
        fig = {"data_mib": a.compress_data / MIB, "allocated_bytes": alloc, "transport": transport}
        for comp in ("none", "zstd"):
            fig[f"{comp}_full_s"] = med([r[comp]["duration_s"] for r in runs])
            fig[f"{comp}_full_data_bytes"] = med([r[comp]["data_bytes"] for r in runs])
            fig[f"{comp}_inc_s"] = med([r[f"{comp}_inc"]["duration_s"] for r in runs])
            fig[f"{comp}_inc_data_bytes"] = med([r[f"{comp}_inc"]["data_bytes"] for r in runs])
        fig["ratio_size_zstd_vs_none"] = ratio(fig["zstd_full_data_bytes"], fig["none_full_data_bytes"])
        fig["ratio_time_zstd_vs_none"] = ratio(fig["zstd_full_s"], fig["none_full_s"])
        fig["zstd_full_mib_s_on_allocated"] = alloc / MIB / fig["zstd_full_s"]
        fig["none_full_mib_s_on_allocated"] = alloc / MIB / fig["none_full_s"]
        fig["peak_rss_mib"] = max((r[k]["rss_mib"] or 0) for r in runs for k in ("none", "zstd", "none_inc", "zstd_inc")) or None
        self.fig["compress"] = fig

    # ------------------------------------------------------------------ targets
    def targets(self) -> list[dict]:
        f = self.fig
        tr = (f.get("export") or {}).get("transports", {})
        best = tr.get(self.transports[-1]) if tr else None
        values = {}
        if best:
            values["export_full_vs_offline_guarantees"] = best["ratio_vs_offline_guarantees"]
            values["export_full_vs_offline_convert"] = best["ratio_vs_offline_convert"]
            values["backup_size_vs_allocated"] = best["ratio_size_vs_allocated"]
            values["incremental_1pct_s_vs_bound"] = best["ratio_inc1_vs_bound"]
            values["incremental_1pct_bytes_vs_changed"] = best["ratio_inc1_bytes_vs_changed"]
        if "virtnbdbackup_full_s" in f.get("peer", {}):
            values["export_full_vs_virtnbdbackup"] = f["peer"]["ratio_full_vs_virtnbdbackup"]
        if "verify" in f:
            values["verify_w1_vs_hashlib_1"] = f["verify"]["ratio_verify_1_vs_hashlib_1"]
            values["verify_w2_vs_hashlib_2"] = f["verify"]["ratio_verify_2_vs_hashlib_2"]
        if "restore" in f:
            values["restore_vs_convert_fsync"] = f["restore"]["ratio_vs_convert_fsync"]
        rss = [v for v in self.cli.peak_rss.values() if v]
        if rss:
            values["module_peak_rss_mib"] = max(rss)
        if "orchestration" in f:
            values["orchestration_per_vm_overhead_s"] = f["orchestration"]["per_vm_overhead_s"]
        if "catalog" in f:
            values["backup_info_5000_cli_s"] = f["catalog"]["cli_s"]
        out = []
        for key, op, bound, text in TARGETS:
            value = values.get(key)
            met = None if value is None else {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
            out.append({"key": key, "value": value, "op": op, "bound": bound, "met": met, "target": text,
                        "transport": self.transports[-1] if key.startswith(("export", "backup_size", "incremental")) else None})
        return out


def fleet_estimate(fig: dict, args) -> dict | None:
    """The one-night estimate for a fleet through AWX (docs/performance.md explains the model), from
    this run's per-VM overhead and throughputs and the --fleet-* assumptions.

    Per host the VMs are backed up one after the other (vmbackup_backup_concurrency 1); a VM costs
    the per-VM overhead + its data / export throughput + the same data / verify throughput (the
    role verifies every new set at level data). AWX runs min(forks, throttle) hosts at once; the
    repositories take at most repo_servers x repo_gib_s; the AWX execution nodes have controller_cores
    in all, and the per-VM overhead is counted as their CPU time (pessimistic: part of it is the
    module starting on the host). The night is the largest of the three limits."""
    export = (fig.get("export") or {}).get("transports") or {}
    best = export.get(fig["transports"][-1]) if export else None
    orch, ver = fig.get("orchestration"), fig.get("verify")
    if not best or not orch or not ver:
        return None
    exp_mib_s = best["full_mib_s_on_allocated"]
    ver_mib_s = ver["mib"] / ver["verify_workers_1_s"]
    overhead = orch["per_vm_overhead_s"]
    out = {"assumptions": {"hosts": args.fleet_hosts, "vms_per_host": args.fleet_vms, "vm_allocated_gib": args.fleet_vm_gib,
                           "nightly_change": args.fleet_change, "forks": args.fleet_forks, "throttle": args.fleet_throttle,
                           "repo_servers": args.fleet_repo_servers, "repo_gib_s_each": args.fleet_repo_gib_s,
                           "controller_cores": args.fleet_controller_cores},
           "measured": {"per_vm_overhead_s": overhead, "export_mib_s": exp_mib_s, "verify_mib_s": ver_mib_s}}
    parallel = min(args.fleet_forks, args.fleet_throttle or args.fleet_hosts, args.fleet_hosts)
    waves = -(-args.fleet_hosts // parallel)
    for kind, gib in (("incremental_night", args.fleet_vm_gib * args.fleet_change), ("full_night", args.fleet_vm_gib)):
        vm_s = overhead + gib * 1024 / exp_mib_s + gib * 1024 / ver_mib_s
        host_s = args.fleet_vms * vm_s
        hosts_limit_s = waves * host_s
        total_gib = args.fleet_hosts * args.fleet_vms * gib
        # written once, read once by verify: the repository moves twice the data
        repo_limit_s = 2 * total_gib / (args.fleet_repo_servers * args.fleet_repo_gib_s)
        controller_s = args.fleet_hosts * args.fleet_vms * overhead / args.fleet_controller_cores
        limits = {"hosts at once x per-host time": hosts_limit_s, "repository bandwidth": repo_limit_s,
                  "AWX controller CPU": controller_s}
        out[kind] = {"per_vm_s": vm_s, "per_host_s": host_s, "hosts_at_once": parallel, "waves": waves,
                     "hosts_limit_h": hosts_limit_s / 3600, "repository_limit_h": repo_limit_s / 3600,
                     "controller_limit_h": controller_s / 3600, "night_h": max(limits.values()) / 3600,
                     "limited_by": max(limits, key=limits.get),
                     "repository_tib": total_gib / 1024, "overhead_share": args.fleet_vms * overhead / host_s}
    return out


def summary(r: dict, wall: float, rss: float | None) -> dict:
    keys = ("duration_s", "throughput_mib_s", "read_mib_s", "bytes_written", "data_bytes", "timings", "transport", "compress", "type",
            "bytes_read", "set_id")
    return {**{k: r[k] for k in keys if k in r}, "wall_s": wall, "rss_mib": rss}


def dir_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- output
def rows_of(fig: dict) -> list[tuple[str, str, object, object, str]]:
    """(step, what, seconds, MiB/s, ratio text) rows of the table."""
    rows = []

    def add(step, what, secs=None, mibs=None, note=""):
        rows.append((step, what, secs, mibs, note))

    e = fig.get("export")
    if e:
        mib = e["data_mib"]
        off = e["offline"]
        add("1", "qemu-img convert -W -m 8, VM off", off["convert_s"], mib / off["convert_s"])
        add("1", "  + fsync + sha256 of the output", off["guarantees_s"], mib / off["guarantees_s"])
        add("1", "cp --sparse=always, VM off", off["cp_sparse_s"], mib / off["cp_sparse_s"])
        for t, v in e["transports"].items():
            add("2", f"export full [{t}] (duration_s)", v["full_s"], v["full_mib_s_on_allocated"],
                f"{v['ratio_vs_offline_guarantees']:.2f}x guarantees, {v['ratio_vs_offline_convert']:.2f}x convert, "
                f"size {v['ratio_size_vs_allocated']:.3f}x alloc, RSS {fmt(v['peak_rss_mib'], '.0f')} MiB")
            if v.get("full_transfer_s"):
                add("2", "  its transfer phase (timings.transfer_s)", v["full_transfer_s"], mib / v["full_transfer_s"],
                    f"{v['ratio_transfer_vs_offline_convert']:.2f}x convert")
            add("3", f"export inc 1 % [{t}]", v["inc1_s"], None,
                f"{v['ratio_inc1_vs_bound']:.2f}x of (5 % full + 2 s); bytes {fmt(v['ratio_inc1_bytes_vs_changed'], '.2f')}x changed")
            add("3", f"export inc 10 % [{t}]", v["inc10_s"], None,
                f"{v['ratio_inc10_vs_full']:.2f}x full; bytes {fmt(v['ratio_inc10_bytes_vs_changed'], '.2f')}x changed")
    t2 = fig.get("two_disks")
    if t2:
        add("2", "2 disks: qemu-img convert -W -m 8, VM off", t2["offline"]["convert_s"], t2["data_mib"] / t2["offline"]["convert_s"])
        add("2", "2 disks:   + fsync + sha256", t2["offline"]["guarantees_s"], t2["data_mib"] / t2["offline"]["guarantees_s"])
        for t, v in t2["transports"].items():
            add("2", f"2 disks: export full [{t}]", v["full_s"], v["full_mib_s_on_allocated"],
                f"{v['ratio_vs_offline_guarantees']:.2f}x guarantees, {v['ratio_vs_offline_convert']:.2f}x convert")
    v = fig.get("verify")
    if v:
        for w in (1, 2):
            add("4", f"hashlib sha256, {w} thread(s)", v[f"hashlib_{w}_threads_s"], v["mib"] / v[f"hashlib_{w}_threads_s"])
            add("4", f"verify workers={w}", v[f"verify_workers_{w}_s"], v["mib"] / v[f"verify_workers_{w}_s"],
                f"{v[f'ratio_verify_{w}_vs_hashlib_{w}']:.2f}x hashlib {w} thread(s)")
    r = fig.get("restore")
    if r:
        add("5", "qemu-img convert -W -m 8 of the chains + fsync", r["convert_W_m8_fsync_s"], r["chain_mib"] / r["convert_W_m8_fsync_s"])
        add("5", "qemu-img convert (plain, no fsync; info)", r["convert_plain_s"], r["chain_mib"] / r["convert_plain_s"])
        add("5", "restore of the newest point", r["restore_s"], r["chain_mib"] / r["restore_s"],
            f"{r['ratio_vs_convert_fsync']:.2f}x convert + fsync")
    p = fig.get("peer")
    if p and "virtnbdbackup_full_s" in p:
        add("6", "virtnbdbackup -l full", p["virtnbdbackup_full_s"])
        add("6", f"export full [{p['transport']}], same VM", p["export_full_s"], None,
            f"{p['ratio_full_vs_virtnbdbackup']:.2f}x virtnbdbackup (CLI wall: {p['ratio_full_wall_vs_virtnbdbackup']:.2f}x)")
        add("6", "virtnbdbackup -l inc after 1 %", p["virtnbdbackup_inc_s"])
        add("6", f"export inc [{p['transport']}] after 1 %", p["export_inc_s"], None,
            f"{p['ratio_inc_vs_virtnbdbackup']:.2f}x virtnbdbackup (CLI wall: {p['ratio_inc_wall_vs_virtnbdbackup']:.2f}x)")
    elif p:
        add("6", f"virtnbdbackup: {p['skipped']}")
    o = fig.get("orchestration")
    if o:
        n = o["n_vms"]
        if "one_vm" in o:
            add("7", "weekly playbook, 1 VM (wall)", o["one_vm"]["wall_s"])
        marginal = f", marginal {o['marginal_per_vm_s']:.2f}s/VM" if "marginal_per_vm_s" in o else ""
        add("7", f"weekly playbook, {n['vms']} VMs (wall)", n["wall_s"], None, f"per-VM overhead {o['per_vm_overhead_s']:.2f}s{marginal}")
    c = fig.get("catalog")
    if c:
        add("7", f"json.load of {c['sets']} manifests (baseline)", c["json_load_s"])
        add("7", "backup_info backend, in process", c["backend_s"], None, f"{c['ratio_backend_vs_json_load']:.1f}x json.load")
        add("7", "backup_info (ansible localhost -m)", c["cli_s"])
        add("7", "prune --check keep_weekly=5 (ansible -m)", c["prune_check_s"])
    z = fig.get("compress")
    if z and "none_full_s" in z:
        add("8", "export full, compress none", z["none_full_s"], z["none_full_mib_s_on_allocated"],
            f"{z['none_full_data_bytes'] / MIB:.0f} MiB")
        add("8", "export full, compress zstd", z["zstd_full_s"], z["zstd_full_mib_s_on_allocated"],
            f"{z['zstd_full_data_bytes'] / MIB:.0f} MiB = {z['ratio_size_zstd_vs_none']:.2f}x size, {z['ratio_time_zstd_vs_none']:.2f}x time")
        add("8", "export inc 1 %, compress none / zstd", z["none_inc_s"], None, f"zstd {z['zstd_inc_s']:.2f}s")
    elif z:
        add("8", f"compress: {z['skipped']}")
    return rows


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(fig: dict, targets: list[dict]) -> str:
    lines = [f"{'#':2} {'what':48} {'s':>8} {'MiB/s':>7}  ratios", "-" * 110]
    for step, what, secs, mibs, note in rows_of(fig):
        lines.append(f"{step:2} {what:48} {fmt(secs, '8.2f'):>8} {fmt(mibs, '7.0f'):>7}  {note}")
    lines += ["", "targets:"]
    for t in targets:
        verdict = "n/a" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        lines.append(f"  {verdict:6} {fmt(t['value'], '.3f'):>8} {t['op']} {t['bound']:<5} {t['target']}")
    return "\n".join(lines)


def markdown(doc: dict, text: str) -> str:
    m = doc["machine"]
    out = [f"# Benchmark results {doc['date']} on {m['host']}", "",
           f"Command: `{doc['command']}` ({doc['elapsed_s']:.0f} s)", "",
           "| machine | |", "|---|---|"]
    for key in ("cpu", "cores", "ram_gib", "disk", "kernel", "os", "libvirt", "qemu", "qemu_img", "virtnbdbackup",
                "python", "ansible_core", "loadavg_before", "loadavg_after"):
        out.append(f"| {key} | {m.get(key)} |")
    out += ["", "```", text, "```", "", "Every figure, ratio and run: the `.json` file beside this one.", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("8G"), help="virtual size of each disk (default 8G)")
    ap.add_argument("--data", type=parse_size, default=parse_size("2G"), help="random data in the main VM's disk (default 2G)")
    ap.add_argument("--extents", type=int, default=16, help="scattered extents the data is written in (default 16)")
    ap.add_argument("--compress-data", type=parse_size, default=parse_size("1G"),
                    help="compressible data (tar of /usr/share + /usr/lib) of the compression VM (default 1G)")
    ap.add_argument("--repeat", type=int, default=3, help="repeats of every data step; medians are shown (default 3)")
    ap.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=list(STEPS),
                    help=f"comma-separated steps of {','.join(STEPS)} (default all)")
    ap.add_argument("--transport", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                    help="export transports to measure, e.g. push,pull (default: both when the module has the option)")
    ap.add_argument("--orch-vms", type=int, default=10, help="VMs of the weekly playbook run (default 10)")
    ap.add_argument("--no-orch-single", dest="orch_single", action="store_false",
                    help="skip the 1-VM playbook run (the fixed cost and the marginal per-VM figure)")
    ap.add_argument("--sets", type=int, default=5000, help="sets of the synthetic catalog repository (default 5000)")
    ap.add_argument("--catalog-vms", type=int, default=10)
    ap.add_argument("--fleet-hosts", type=int, default=1000, help="fleet estimate: hypervisors (default 1000)")
    ap.add_argument("--fleet-vms", type=int, default=20, help="fleet estimate: VMs per hypervisor (default 20)")
    ap.add_argument("--fleet-vm-gib", type=float, default=50.0, help="fleet estimate: allocated GiB per VM (default 50)")
    ap.add_argument("--fleet-change", type=float, default=0.03, help="fleet estimate: fraction changed per night (default 0.03)")
    ap.add_argument("--fleet-forks", type=int, default=100, help="fleet estimate: AWX forks (default 100)")
    ap.add_argument("--fleet-throttle", type=int, default=0,
                    help="fleet estimate: vmbackup_weekly_throttle, hosts writing at once (default 0: no cap, per-host repositories)")
    ap.add_argument("--fleet-repo-servers", type=int, default=20, help="fleet estimate: repository servers (default 20)")
    ap.add_argument("--fleet-repo-gib-s", type=float, default=1.1,
                    help="fleet estimate: GiB/s each repository server takes (default 1.1: one 10 GbE link)")
    ap.add_argument("--fleet-controller-cores", type=int, default=16,
                    help="fleet estimate: CPU cores of the AWX execution nodes in all (default 16)")
    ap.add_argument("--json", help="also write the JSON here")
    ap.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"),
                    help="where <date>-<host>.json and .md are kept (default benchmarks/results)")
    ap.add_argument("--no-results", action="store_true", help="do not keep a results file")
    ap.add_argument("--work-dir", default="/var/tmp", help="parent of the scratch directory (default /var/tmp)")
    args = ap.parse_args(argv)
    bad = [s for s in args.only if s not in STEPS]
    if bad:
        ap.error(f"unknown step(s) {bad}; choose from {','.join(STEPS)}")
    if args.transport and any(t not in ("push", "pull", "auto") for t in args.transport):
        ap.error("--transport takes push, pull and auto")
    if args.repeat < 1 or args.data < MIB or args.data > args.size:
        ap.error("--repeat must be >= 1 and --data between 1M and --size")
    if os.geteuid() != 0:
        ap.error("run as root (libvirt's system instance, drop_caches)")
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        ap.error("/proc/sys/vm/drop_caches is not writable here (a container without it?): the suite drops the page "
                 "cache before every timed step and does not measure without")
    for tool in ("qemu-img", "qemu-io", "cp", "tar"):
        if not shutil.which(tool):
            ap.error(f"{tool} is not installed (bash scripts/setup.sh)")

    # SIGTERM (a CI timeout, kill) ends the run through the finally below, like Ctrl-C: nothing left behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    began = time.monotonic()
    info = machine()
    work = pathlib.Path(tempfile.mkdtemp(prefix="vmbackup-bench-", dir=args.work_dir))
    work.chmod(0o711)
    conn = libvirt.open("qemu:///system")
    factory = VmFactory(conn, pick_domain_type(conn))
    suite = None
    try:
        env = build_and_install(ROOT, work)
        cli = Cli(env)
        suite = Suite(args, work, conn, factory, cli, env["ANSIBLE_COLLECTIONS_PATH"])
        print(f"transports: {', '.join(suite.transports)}; compress option: {suite.has_compress}; "
              f"domain type {factory.domain_type}; load average {info['loadavg_before'][0]:.2f}", flush=True)
        order = [s for s in STEPS if s in args.only]
        step_seconds = {}
        for step in order:
            print(f"== {step}", flush=True)
            t0 = time.monotonic()
            getattr(suite, f"step_{step}")()
            step_seconds[step] = round(time.monotonic() - t0, 1)
        suite.fig["step_seconds"] = step_seconds
        info["loadavg_after"] = list(os.getloadavg())
        targets = suite.targets()
        suite.fig["peak_rss_mib_by_module"] = cli.peak_rss
        suite.fig["fleet_estimate"] = fleet_estimate(suite.fig, args)
        now = dt.datetime.now(dt.timezone.utc)
        doc = {
            "format": "vmbackup.libvirt/benchmark", "format_version": 1, "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable,
                                 "benchmarks/run.py"] + (argv if argv is not None else sys.argv[1:])),
            "args": {k: v for k, v in vars(args).items() if k not in ("json", "results_dir", "no_results", "work_dir")},
            "machine": info, "elapsed_s": time.monotonic() - began, "domain_type": factory.domain_type,
            "figures": suite.fig, "targets": targets, "runs": suite.runs,
            # What the run made (all of it removed when it ends): for checking that nothing is left.
            "made": {"domains": sorted(suite.made_domains + [vm.name for vm in factory.vms]),
                     "directories": sorted([str(work)] + [str(vm.workdir) for vm in factory.vms])},
        }
        text = table(suite.fig, targets)
        print()
        fleet = suite.fig["fleet_estimate"]
        if fleet:
            a = fleet["assumptions"]
            text += (f"\n\nfleet estimate ({a['hosts']} hosts x {a['vms_per_host']} VMs of {a['vm_allocated_gib']:g} GiB, "
                     f"{a['nightly_change']:.0%} changed, {a['forks']} forks, {a['repo_servers']} repository servers x "
                     f"{a['repo_gib_s_each']:g} GiB/s, {a['controller_cores']} controller cores): " + "; ".join(
                         f"{k.replace('_', ' ')} {fleet[k]['night_h']:.1f} h ({fleet[k]['limited_by']})"
                         for k in ("incremental_night", "full_night")))
        print(text)
        print(f"\n{doc['elapsed_s']:.0f} s in all; load average {info['loadavg_before'][0]:.2f} before, "
              f"{info['loadavg_after'][0]:.2f} after")
        payload = json.dumps(doc, indent=2, default=str)
        if args.json:
            pathlib.Path(args.json).write_text(payload)
        if not args.no_results:
            results = pathlib.Path(args.results_dir)
            results.mkdir(parents=True, exist_ok=True)
            stem = results / f"{now:%Y-%m-%d}-{info['host']}"
            stem.with_suffix(".json").write_text(payload)
            stem.with_suffix(".md").write_text(markdown(doc, text))
            print(f"kept {stem}.json and .md")
        return 0
    finally:
        for name in suite.restored if suite else []:
            try:
                destroy_vm(conn.lookupByName(name))
            except libvirt.libvirtError:
                pass
        factory.cleanup()
        conn.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
