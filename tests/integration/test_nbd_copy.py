"""The libnbd dirty-extent copier (module_utils/_nbd.py) against real QEMU NBD servers.

No libvirt: a qcow2 gets a persistent dirty bitmap (`qemu-img bitmap --add`), then writes of
every kind through `qemu-io` (aligned data, unaligned data, zeros over old data, a partial
zero cluster, writes across chunk boundaries, the last sector); `qemu-nbd -r -B` exports it
with `qemu:dirty-bitmap:<name>`, as libvirt's pull mode does. What the copier wrote is checked
by another path: `qemu-img rebase -u` onto a copy of the image before the writes, then
`qemu-img compare` with the written image, `qemu-img check`, `qemu-img map` and `info`.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from harness import MIB, run, wait_for

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _nbd
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._nbd import Extent

pytestmark = pytest.mark.skipif(_nbd.IMPORT_ERROR is not None, reason="python3-libnbd is not installed")

KIB = 1024
SIZE = 128 * MIB
CL = 64 * KIB
LAST = SIZE - 512
# (qemu-io command, the byte range it dirties): every case the copier must get right.
WRITES = [
    ("write -P 0x22 1M 3M", 1 * MIB, 3 * MIB),            # aligned data over old data
    ("write -z 10M 2M", 10 * MIB, 2 * MIB),               # zeros over old data: must not read the parent's
    ("write -P 0x33 5000 3000", 5000, 3000),              # unaligned, inside one cluster
    ("write -z 20484K 60K", 20 * MIB + 4 * KIB, 60 * KIB),  # zeros over part of a cluster of old data
    ("write -P 0x44 47M 2M", 47 * MIB, 2 * MIB),          # old data into unallocated space, across chunks
    ("write -P 0x66 30712K 16K", 30 * MIB - 8 * KIB, 16 * KIB),  # across a 1 MiB chunk boundary
    ("write -z 100M 1M", 100 * MIB, 1 * MIB),             # zeros over unallocated space
    (f"write -P 0x55 {LAST} 512", LAST, 512),             # the last sector of the disk
]


def qemu_io(image: pathlib.Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    run(argv + [str(image)])


def serve(image: pathlib.Path, sock: pathlib.Path, bitmap: str | None = None) -> subprocess.Popen:
    """A read-only NBD export of ``image`` like libvirt's pull mode (several clients at once)."""
    argv = ["qemu-nbd", "-r", "-f", "qcow2", "-t", "-e", "16", "--socket", str(sock)] + (["-B", bitmap] if bitmap else [])
    proc = subprocess.Popen(argv + [str(image)], stderr=subprocess.PIPE)
    wait_for(sock.exists, 10, what=f"qemu-nbd on {sock}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
    proc.wait(timeout=10)


def qemu_nbd_pids_under(directory: pathlib.Path) -> list[int]:
    """Every qemu-nbd process whose command line names a path in ``directory`` (the target image)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = pathlib.Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-nbd") and any(str(directory).encode() in a for a in argv):
            pids.append(int(entry))
    return pids


def rebased_equal(inc: pathlib.Path, base: pathlib.Path, expected: pathlib.Path) -> tuple[bool, str]:
    run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(inc)])
    proc = run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(inc), str(expected)], check=False)
    return proc.returncode == 0, proc.stdout + proc.stderr


def own_map(image: pathlib.Path) -> list[dict]:
    """qemu-img map of the image alone (its backing file, if any, not opened)."""
    spec = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(image)}, "backing": None})
    return json.loads(run(["qemu-img", "map", "--output=json", f"json:{spec}"]).stdout)


class Slow:
    """A Progress stand-in that runs a hook at the first progress report (to act mid-copy)."""

    def __init__(self, hook) -> None:
        self.hook = hook
        self.calls = 0

    def add(self, n: int) -> None:
        self.calls += 1
        if self.calls == 1:
            self.hook()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """src.qcow2 after the writes, base.qcow2 = src before them, served with bitmaps b0 (all the
    writes) and b1 (added after them: nothing dirty)."""
    d = tmp_path_factory.mktemp("nbdcopy")
    os.chmod(d, 0o700)
    src, base = d / "src.qcow2", d / "base.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), str(SIZE)])
    qemu_io(src, "write -P 0x11 0 40M", "write -P 0x77 60M 8M")
    run(["cp", "--sparse=always", str(src), str(base)])
    run(["qemu-img", "bitmap", "--add", str(src), "b0"])
    qemu_io(src, *[w[0] for w in WRITES])
    run(["qemu-img", "bitmap", "--add", str(src), "b1"])
    servers = {name: serve(src, d / f"{name}.sock", name) for name in ("b0", "b1")}
    yield d, src, base
    for proc in servers.values():
        stop(proc)


def expected_dirty() -> list[tuple[int, int]]:
    """The clusters the writes touched (the bitmap's granularity is 64 KiB), joined."""
    clusters = sorted({c for dummy, off, length in WRITES for c in range(off // CL, (off + length - 1) // CL + 1)})
    runs: list[list[int]] = []
    for c in clusters:
        if runs and runs[-1][1] == c * CL:
            runs[-1][1] += CL
        else:
            runs.append([c * CL, (c + 1) * CL])
    return [(a, min(b, SIZE)) for a, b in runs]


def union(extents: list[Extent]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for e in extents:
        if out and out[-1][1] == e.offset:
            out[-1][1] = e.end
        else:
            out.append([e.offset, e.end])
    return [tuple(r) for r in out]


def test_dirty_extents_copy_round_trips(images, tmp_path, monkeypatch):
    """The scenario: the dirty extents are exactly the written clusters, zero writes are zero
    extents; the copy (plain and compressed) rebased onto the old image reads as the new one;
    a bitmap with nothing dirty gives an empty, still correct incremental; nothing is left."""
    d, src, base = images
    sock = str(d / "b0.sock")
    extents = _nbd.dirty_extents(sock, "", "b0", SIZE)
    assert union(extents) == expected_dirty()
    assert Extent(10 * MIB, 2 * MIB, True) in extents and Extent(100 * MIB, 1 * MIB, True) in extents
    assert all(not e.zero for e in extents if not (10 * MIB <= e.offset < 12 * MIB or 100 * MIB <= e.offset < 101 * MIB))

    # Plain, two connections, 1 MiB chunks (the 30 MiB and 48 MiB boundaries are crossed); a work
    # directory and a source socket whose paths are too long for a unix socket address.
    work = tmp_path / ("w" * 60) / ("v" * 60)
    work.mkdir(mode=0o700, parents=True)
    long_sock = work.parent / "source-socket-with-a-long-name.sock"
    os.link(sock, long_sock)
    assert len(str(long_sock)) > 108
    inc = tmp_path / "inc.qcow2"
    stats = _nbd.copy_extents(str(long_sock), "", extents, str(inc), SIZE, work_dir=str(work), workers=2, chunk=1 * MIB)
    assert sorted(os.listdir(work)) == [], "the writer's socket is left"
    assert qemu_nbd_pids_under(tmp_path) == []
    assert json.loads(run(["qemu-img", "info", "--output=json", str(inc)]).stdout).get("backing-filename") is None
    written = own_map(inc)
    zero_written = [(e["start"], e["length"]) for e in written if e.get("present") and e.get("zero")]
    assert (10 * MIB, 2 * MIB) in zero_written and (100 * MIB, 1 * MIB) in zero_written, written
    data = sum(e["length"] for e in written if e.get("data"))
    changed = sum(b - a for a, b in expected_dirty()) - 3 * MIB  # minus the zero writes
    assert data == stats["data_bytes"] == changed, (data, stats, changed)
    assert stats["zero_bytes"] == 3 * MIB and stats["bytes_read"] == changed
    run(["qemu-img", "check", str(inc)])
    ok, out = rebased_equal(inc, base, src)
    assert ok, out
    plain_size = inc.stat().st_size

    # Compressed, four lanes (whatever the cores), one request per cluster.
    monkeypatch.setattr(_nbd, "MAX_LANES", 4)
    cinc = tmp_path / "cinc.qcow2"
    cstats = _nbd.copy_extents(sock, "", extents, str(cinc), SIZE, work_dir=str(work), workers=4, chunk=CL,
                               compress=True)
    info = json.loads(run(["qemu-img", "info", "--output=json", str(cinc)]).stdout)
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    check = json.loads(run(["qemu-img", "check", "--output=json", str(cinc)]).stdout)
    assert check["compressed-clusters"] == check["allocated-clusters"] > 0, check
    assert cstats["data_bytes"] == changed and cstats["connections"] == 4
    assert cinc.stat().st_size < plain_size / 4, (cinc.stat().st_size, plain_size)
    ok, out = rebased_equal(cinc, base, src)
    assert ok, out

    # Nothing dirty since b1: no extents, an image with nothing allocated that reads as src.
    assert _nbd.dirty_extents(str(d / "b1.sock"), "", "b1", SIZE) == []
    empty = tmp_path / "empty.qcow2"
    estats = _nbd.copy_extents(str(d / "b1.sock"), "", [], str(empty), SIZE, work_dir=str(work))
    assert estats["bytes_read"] == estats["data_bytes"] == estats["zero_bytes"] == 0
    assert not any(e.get("present") for e in own_map(empty))
    ok, out = rebased_equal(empty, src, src)
    assert ok, out
    assert os.listdir(work) == [] and qemu_nbd_pids_under(tmp_path) == []


def test_refusals_and_failures_leave_nothing(images, tmp_path):
    """Bad socket, missing bitmap, wrong size, an existing target, the source server gone or
    stuck mid-copy, a full disk: BACKUP_FAILED (phase transfer), no target, no socket, no
    qemu-nbd left."""
    d, src, dummy = images
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    dst = tmp_path / "out.qcow2"
    sock = str(d / "b0.sock")
    extents = _nbd.dirty_extents(sock, "", "b0", SIZE)

    def fails(call, *words):
        with pytest.raises(VmBackupError) as info:
            call()
        assert info.value.error_code == "BACKUP_FAILED", info.value.msg
        assert info.value.details.get("phase") == "transfer"
        for word in words:
            assert word in info.value.msg
        assert not dst.exists()
        assert os.listdir(work) == []
        assert qemu_nbd_pids_under(tmp_path) == []
        return info.value

    fails(lambda: _nbd.dirty_extents(str(tmp_path / "none.sock"), "", "b0", SIZE), "cannot connect")
    fails(lambda: _nbd.dirty_extents(sock, "", "nope", SIZE), "does not expose the dirty bitmap")
    fails(lambda: _nbd.dirty_extents(sock, "", "b0", SIZE + CL), "bytes")
    fails(lambda: _nbd.copy_extents(str(tmp_path / "none.sock"), "", extents, str(dst), SIZE, work_dir=str(work)),
          "cannot connect")
    dst.write_bytes(b"someone else's")
    with pytest.raises(VmBackupError):
        _nbd.copy_extents(sock, "", extents, str(dst), SIZE, work_dir=str(work))
    assert dst.read_bytes() == b"someone else's"
    dst.unlink()

    # Another thread asks the copy to stop (another disk's copy failed).
    stop_event = threading.Event()
    stopped = fails(lambda: _nbd.copy_extents(sock, "", extents, str(dst), SIZE, work_dir=str(work), chunk=CL, workers=1,
                                              progress=Slow(stop_event.set), cancel=stop_event), "stopped")
    assert stopped.details.get("stopped") is True

    # The source server disappears (QEMU died, the job was aborted) mid-copy.
    lost = serve(src, d / "lost.sock", "b0")
    try:
        fails(lambda: _nbd.copy_extents(str(d / "lost.sock"), "", extents, str(dst), SIZE, work_dir=str(work),
                                        chunk=CL, workers=1, progress=Slow(lambda: os.kill(lost.pid, signal.SIGKILL))),
              "reading from QEMU")
    finally:
        stop(lost)

    # The source server stops answering: the stall timeout ends the copy.
    stuck = serve(src, d / "stuck.sock", "b0")
    saved = _nbd.STALL_TIMEOUT
    _nbd.STALL_TIMEOUT = 1.5
    try:
        started = time.monotonic()
        fails(lambda: _nbd.copy_extents(str(d / "stuck.sock"), "", extents, str(dst), SIZE, work_dir=str(work),
                                        chunk=CL, workers=1, progress=Slow(lambda: os.kill(stuck.pid, signal.SIGSTOP))),
              "stuck")
        assert time.monotonic() - started < 30
        # the server is still stopped: the block status does not hang either
        fails(lambda: _nbd.dirty_extents(str(d / "stuck.sock"), "", "b0", SIZE), "stuck")
    finally:
        _nbd.STALL_TIMEOUT = saved
        stop(stuck)

    # The target's file system fills up.
    small = tmp_path / "small"
    small.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(small)])
    try:
        full = small / "out.qcow2"
        with pytest.raises(VmBackupError) as info:
            _nbd.copy_extents(sock, "", extents, str(full), SIZE, work_dir=str(small))
        assert info.value.error_code == "BACKUP_FAILED"
        assert "No space left on device" in info.value.msg, info.value.msg
        assert os.listdir(small) == [] and qemu_nbd_pids_under(tmp_path) == []
    finally:
        run(["umount", str(small)])


CHILD = textwrap.dedent("""
    import os, sys, time
    from ansible_collections.vmbackup.libvirt.plugins.module_utils import _nbd
    from ansible_collections.vmbackup.libvirt.plugins.module_utils._module import install_cancel_handlers, Cancelled
    sock, dst, work = sys.argv[1:4]
    install_cancel_handlers()
    class Slow:
        def add(self, n):
            print("copying", flush=True)
            time.sleep(0.05)
    extents = _nbd.dirty_extents(sock, "", "b0", int(sys.argv[4]))
    try:
        _nbd.copy_extents(sock, "", extents, dst, int(sys.argv[4]), work_dir=work, chunk=65536, workers=1, progress=Slow())
    except Cancelled:
        print("cancelled", flush=True)
        sys.exit(3)
""")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_killed_or_cancelled_copier_leaves_no_writer(images, tmp_path, how):
    """A module process killed mid-copy takes its qemu-nbd along (PR_SET_PDEATHSIG); one that is
    cancelled (SIGTERM, as AWX does) rolls back: no target, no socket, no qemu-nbd."""
    d, dummy, dummy2 = images
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    dst = tmp_path / "out.qcow2"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(d / "b0.sock"), str(dst), str(work), str(SIZE)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "copying", child.stderr.read()
        assert len(qemu_nbd_pids_under(tmp_path)) == 1 and os.listdir(work), "no writer running mid-copy"
        child.send_signal(getattr(signal, how))
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    wait_for(lambda: qemu_nbd_pids_under(tmp_path) == [], 10, what="the writer qemu-nbd to die")
    if how == "SIGTERM":
        assert child.returncode == 3 and "cancelled" in out, (child.returncode, out, err)
        assert not dst.exists() and os.listdir(work) == []
    else:
        assert child.returncode == -signal.SIGKILL
        # A SIGKILLed run leaves its socket and target file; the caller's next run removes its run
        # directory (work_dir) and staging: nothing in them is in use any more.
        left = [p for p in os.listdir(work) if p.startswith(".nbd-writer-")]
        assert left and os.stat(work / left[0]).st_mode & 0o777 == 0o700, left


def test_disk_ending_inside_a_cluster(tmp_path):
    """A disk whose size is not a multiple of 64 KiB (1536 bytes into its last cluster): the
    last cluster is copied, plain and compressed (the compress filter needs a whole cluster:
    the target is written one cluster longer and shrunk back), and reads as the source."""
    size = 8 * MIB + 1536
    src, base = tmp_path / "src.qcow2", tmp_path / "base.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), str(size)])
    qemu_io(src, "write -P 0x11 7M 1M", f"write -P 0x12 {8 * MIB} 1536")
    run(["cp", "--sparse=always", str(src), str(base)])
    run(["qemu-img", "bitmap", "--add", str(src), "b0"])
    qemu_io(src, f"write -P 0x13 {size - 1024} 512", "write -z 7M 64K")
    server = serve(src, tmp_path / "src.sock", "b0")
    try:
        extents = _nbd.dirty_extents(str(tmp_path / "src.sock"), "", "b0", size)
        assert extents == [Extent(7 * MIB, CL, True), Extent(8 * MIB, 1536, False)]
        for compress in (False, True):
            out = tmp_path / f"inc-{compress}.qcow2"
            _nbd.copy_extents(str(tmp_path / "src.sock"), "", extents, str(out), size, work_dir=str(tmp_path), compress=compress)
            info = json.loads(run(["qemu-img", "info", "--output=json", str(out)]).stdout)
            assert info["virtual-size"] == size
            check = json.loads(run(["qemu-img", "check", "--output=json", str(out)]).stdout)
            assert check.get("compressed-clusters", 0) == (1 if compress else 0), check
            ok, text = rebased_equal(out, base, src)
            assert ok, text
    finally:
        stop(server)
