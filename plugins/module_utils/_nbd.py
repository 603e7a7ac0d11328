# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The dirty extents of a pull-mode incremental backup, read over NBD with libnbd and written
into a new qcow2 through a private ``qemu-nbd``.

This module is private to the vmbackup.libvirt collection; it is not a public API.

A full backup reads the whole pull export with ``qemu-img convert`` (faster than any Python
copier); an incremental reads only what the parent checkpoint's bitmap marks dirty:

1. ``dirty_extents`` asks the export's block status for the meta contexts
   ``qemu:dirty-bitmap:<bitmap>`` (flag 1: dirty) and ``base:allocation`` (flag 2: reads as
   zeros) and returns the dirty ranges, split where zero/data changes.
2. ``copy_extents`` creates a new qcow2 (no backing file), serves it with ``qemu-nbd`` on a
   unix socket in the caller's private work directory, and copies with libnbd's asynchronous
   API: several reader connections to QEMU and writer connections to qemu-nbd, each with a
   few requests in flight, driven by one event loop (no thread per request, no copy of the
   data in Python: libnbd reads into and writes from the same ``nbd.Buffer``).

Correctness rule of an incremental: every dirty byte is written. A data range as data, a zero
range as explicit zero clusters (``NBD_CMD_WRITE_ZEROES`` makes qcow2 zero clusters in an image
without backing), never left unallocated: after a rebase onto the parent an unallocated
cluster would read the parent's old data. Every range is widened to whole clusters of the
target (64 KiB) and each cluster is written exactly once: QEMU's compressed writes (the
``compress`` filter) work only on unallocated clusters, and reading a little clean data around
a dirty range is always correct (it is the data at the point in time).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import dataclasses
import errno
import os
import select
import signal
import subprocess
import threading
import time
import traceback
import typing as t

from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

try:
    import nbd
except ImportError:
    nbd = None
    IMPORT_ERROR: str | None = traceback.format_exc()
else:
    IMPORT_ERROR = None

if t.TYPE_CHECKING:  # pragma: no cover
    from ansible_collections.vmbackup.libvirt.plugins.module_utils._progress import Progress

BASE_ALLOCATION = "base:allocation"
# The target's qcow2 cluster size (qemu-img create's default): the grid every write follows.
CLUSTER = 64 * 1024
# QEMU's NBD server refuses reads and writes above 32 MiB.
MAX_CHUNK = 32 * 1024 * 1024
# One block status request covers at most this much (the protocol's count is 32 bits).
BLOCK_STATUS_SPAN = 1 << 31
# One write-zeroes request zeroes at most this much (a multiple of CLUSTER, well below 4 GiB).
ZERO_SPAN = 1 << 30
# Requests in flight per connection pair (reads waiting for QEMU plus writes waiting for qemu-nbd).
DEPTH = 4
# No reply from either server for this long while requests are in flight: the copy is stuck.
STALL_TIMEOUT = 300.0
# How long qemu-nbd may take to listen on its socket, and to exit after SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    zero: bool  # reads as zeros at the source (base:allocation flag ZERO)

    @property
    def end(self) -> int:
        return self.offset + self.length


def require() -> None:
    """Raise MISSING_DEPENDENCY unless the libnbd Python binding imports."""
    if IMPORT_ERROR is not None:
        raise VmBackupError("MISSING_DEPENDENCY",
                            "the libnbd Python binding is missing: install python3-libnbd (Debian/Ubuntu) or "
                            "python3-libnbd / libnbd's Python bindings (Fedora/RHEL), or use transport push",
                            exception=IMPORT_ERROR)


# --- tied children -------------------------------------------------------------------------

def _load_prctl() -> t.Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _load_prctl()


def popen_tied(argv: list[str], **kwargs: t.Any) -> subprocess.Popen:
    """Start ``argv`` as a child that gets SIGKILL when the calling thread dies.

    ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in the child before exec: a SIGKILLed module leaves no
    qemu-img or qemu-nbd behind. The signal follows the *thread* that forked the child, so call
    this from a thread that lives until the child is reaped (the main thread, or the worker
    that waits for it).
    """
    if _PRCTL is None:
        raise VmBackupError("MISSING_DEPENDENCY", "prctl() is not available (Linux libc required) to tie child processes")
    prctl = _PRCTL
    parent = os.getpid()
    user_preexec = kwargs.pop("preexec_fn", None)

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:
            os._exit(126)  # the parent died before the prctl: nobody would reap us
        if user_preexec is not None:
            user_preexec()

    return subprocess.Popen(argv, preexec_fn=preexec, **kwargs)  # pylint: disable=subprocess-popen-preexec-fn


# --- dirty extents -------------------------------------------------------------------------

def _nbd_error(what: str, exc: BaseException, **details: t.Any) -> VmBackupError:
    return VmBackupError("BACKUP_FAILED", f"{what}: {exc}", phase="transfer", **details)


def _connect(socket_path: str, export: str, meta_contexts: t.Sequence[str] = ()) -> t.Any:
    handle = nbd.NBD()
    handle.set_export_name(export)
    for name in meta_contexts:
        handle.add_meta_context(name)
    try:
        handle.connect_unix(socket_path)
    except nbd.Error as exc:
        _close(handle)
        raise _nbd_error(f"cannot connect to the NBD export {export!r} at {socket_path}", exc) from None
    return handle


def _runs(entries: t.Sequence[int], start: int, limit: int) -> list[tuple[int, int, int]]:
    """``[len, flags, len, flags, ...]`` from ``start`` as ``(begin, end, flags)``, clipped to ``limit``."""
    runs = []
    pos = start
    for i in range(0, len(entries) - 1, 2):
        length, flags = int(entries[i]), int(entries[i + 1])
        if length <= 0 or pos >= limit:
            break
        end = min(pos + length, limit)
        runs.append((pos, end, flags))
        pos = end
    return runs


def merge_extents(extents: t.Iterable[Extent]) -> list[Extent]:
    """Sorted, adjacent extents of the same kind joined; overlapping ones are a bug (ValueError)."""
    out: list[Extent] = []
    for ext in sorted((e for e in extents if e.length > 0), key=lambda e: e.offset):
        if out and ext.offset < out[-1].end:
            raise ValueError(f"overlapping extents {out[-1]} and {ext}")
        if out and ext.offset == out[-1].end and ext.zero == out[-1].zero:
            out[-1] = Extent(out[-1].offset, out[-1].length + ext.length, ext.zero)
        else:
            out.append(ext)
    return out


def combine_status(start: int, size: int, dirty: t.Sequence[int], alloc: t.Sequence[int] | None) -> tuple[list[Extent], int]:
    """One block status reply of both contexts from ``start``: the dirty extents, and where it ends.

    ``dirty`` and ``alloc`` are the flat ``[length, flags, ...]`` lists libnbd hands the extent
    callback; the two contexts may cover different lengths: the result ends where the shorter
    one does (and never beyond ``size``). ``alloc`` None: the export has no base:allocation,
    everything dirty is data.
    """
    dirty_runs = _runs(dirty, start, size)
    alloc_runs = _runs(alloc, start, size) if alloc is not None else [(start, size, 0)]
    if not dirty_runs or not alloc_runs:
        return [], start
    end = min(dirty_runs[-1][1], alloc_runs[-1][1])
    out: list[Extent] = []
    i = j = 0
    pos = start
    while pos < end:
        d_begin, d_end, d_flags = dirty_runs[i]
        a_begin, a_end, a_flags = alloc_runs[j]
        seg_end = min(d_end, a_end, end)
        if d_flags & 1:
            out.append(Extent(pos, seg_end - pos, bool(a_flags & 2)))
        pos = seg_end
        if pos >= d_end:
            i += 1
        if pos >= a_end:
            j += 1
        del d_begin, a_begin
    return merge_extents(out), end


def dirty_extents(socket_path: str, export: str, bitmap: str, size: int) -> list[Extent]:
    """The ranges the meta context ``qemu:dirty-bitmap:<bitmap>`` marks dirty, split where
    ``base:allocation`` changes between zero and data; sorted, merged, never overlapping,
    covering only ``[0, size)``.

    BACKUP_FAILED when the export cannot be reached, does not expose the bitmap, or is not
    ``size`` bytes long (the disk the plan saw is not the disk being exported).
    """
    require()
    context = f"qemu:dirty-bitmap:{bitmap}"
    handle = _connect(socket_path, export, [BASE_ALLOCATION, context])
    try:
        if not handle.can_meta_context(context):
            raise VmBackupError("BACKUP_FAILED", f"the NBD export {export!r} does not expose the dirty bitmap {bitmap!r}",
                                phase="transfer", bitmap=bitmap)
        has_alloc = handle.can_meta_context(BASE_ALLOCATION)
        export_size = handle.get_size()
        if export_size != size:
            raise VmBackupError("BACKUP_FAILED", f"the NBD export {export!r} is {export_size} bytes, the disk {size}",
                                phase="transfer", export_size=export_size, size=size)
        found: list[Extent] = []
        offset = 0
        while offset < size:
            replies: dict[str, list[int]] = {}

            def on_extent(metacontext, dummy_offset, entries, dummy_err):
                replies[metacontext] = list(entries)
                return 0

            handle.block_status(min(size - offset, BLOCK_STATUS_SPAN), offset, on_extent)
            if context not in replies:
                raise VmBackupError("BACKUP_FAILED", f"the NBD export {export!r} sent no status of the dirty bitmap {bitmap!r}",
                                    phase="transfer", bitmap=bitmap)
            extents, end = combine_status(offset, size, replies[context], replies.get(BASE_ALLOCATION) if has_alloc else None)
            if end <= offset:
                raise VmBackupError("BACKUP_FAILED", f"the NBD export {export!r} sent an empty block status at {offset}",
                                    phase="transfer")
            found.extend(extents)
            offset = end
        return merge_extents(found)
    except nbd.Error as exc:
        raise _nbd_error(f"block status of the NBD export {export!r} failed", exc) from None
    finally:
        _close(handle)


def _close(handle: t.Any) -> None:
    """Close a libnbd handle now (the binding closes it only when the object is collected)."""
    if getattr(handle, "_o", None) is None:
        return
    try:
        handle.__del__()  # libnbd's nbd_close: the connection ends, in-flight commands are dropped
    except Exception:  # pylint: disable=broad-exception-caught
        pass
    try:
        del handle._o  # pylint: disable=protected-access
    except AttributeError:
        pass


# --- the plan of writes --------------------------------------------------------------------

def _floor(value: int, unit: int) -> int:
    return value // unit * unit


def _ceil(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def plan_writes(extents: t.Iterable[Extent], virtual_size: int, chunk: int,
                cluster: int = CLUSTER, zero_span: int = ZERO_SPAN) -> list[Extent]:
    """The requests that write ``extents`` into a fresh image: whole clusters, each once.

    A cluster is written as zeros only when zero extents cover all of it; a cluster touched by
    any data is read and written as data (the zeros in it are data too). Data requests split
    at multiples of ``chunk`` (a range that crosses a chunk boundary becomes two requests);
    zero requests at most ``zero_span`` long.
    """
    if chunk <= 0 or chunk % cluster or zero_span % cluster:
        raise ValueError(f"chunk {chunk} and zero span {zero_span} must be positive multiples of {cluster}")
    clipped = []
    for ext in extents:
        begin, end = max(0, ext.offset), min(virtual_size, ext.end)
        if end > begin:
            clipped.append(Extent(begin, end - begin, ext.zero))
    merged = merge_extents(clipped)

    def grid_end(pos: int) -> int:
        return min(_ceil(pos, cluster), virtual_size)

    # Zero runs shrunk to the clusters they cover whole (the end of the disk counts as a boundary).
    zeros = []
    for ext in merged:
        if ext.zero:
            begin = _ceil(ext.offset, cluster)
            end = ext.end if ext.end == virtual_size else _floor(ext.end, cluster)
            if end > begin:
                zeros.append((begin, end))
    # Everything to write, widened to the grid and joined where it touches.
    covered: list[list[int]] = []
    for ext in merged:
        begin, end = _floor(ext.offset, cluster), grid_end(ext.end)
        if covered and begin <= covered[-1][1]:
            covered[-1][1] = max(covered[-1][1], end)
        else:
            covered.append([begin, end])

    out: list[Extent] = []

    def add_data(begin: int, end: int) -> None:
        while begin < end:
            stop = min(end, _floor(begin, chunk) + chunk)
            out.append(Extent(begin, stop - begin, False))
            begin = stop

    zi = 0
    for begin, end in covered:
        pos = begin
        while zi < len(zeros) and zeros[zi][0] < end:
            z_begin, z_end = zeros[zi]
            add_data(pos, z_begin)
            while z_begin < z_end:
                stop = min(z_end, z_begin + zero_span)
                out.append(Extent(z_begin, stop - z_begin, True))
                z_begin = stop
            pos = z_end
            zi += 1
        add_data(pos, end)
    return out


# --- the copier ----------------------------------------------------------------------------

class _Pair:
    """One reader connection (QEMU's export) and one writer connection (our qemu-nbd)."""

    def __init__(self, reader: t.Any, writer: t.Any) -> None:
        self.reader = reader
        self.writer = writer
        self.in_flight = 0


class _Copier:
    """One event loop over every connection: reads complete into buffers, the buffers are
    written, a finished write frees its slot for the next read."""

    def __init__(self, pairs: list[_Pair], requests: list[Extent], depth: int, progress: Progress | None) -> None:
        self.pairs = pairs
        self.pending = collections.deque(requests)
        self.depth = depth
        self.progress = progress
        self.events: list[tuple[str, _Pair, Extent, t.Any, int]] = []
        self.error: str | None = None
        self.bytes_read = 0
        self.data_bytes = 0
        self.zero_bytes = 0

    def _on(self, kind: str, pair: _Pair, req: Extent, buf: t.Any) -> t.Callable[[t.Any], int]:
        def completion(err) -> int:
            # Only record: libnbd calls this from inside aio_notify_*; the loop acts on it.
            self.events.append((kind, pair, req, buf, int(getattr(err, "value", err) or 0)))
            return 1  # retire the command
        return completion

    def _issue(self, pair: _Pair, req: Extent) -> None:
        pair.in_flight += 1
        if req.zero:
            pair.writer.aio_zero(req.length, req.offset, completion=self._on("zero", pair, req, None))
        else:
            buf = nbd.Buffer(req.length)
            pair.reader.aio_pread(buf, req.offset, completion=self._on("read", pair, req, buf))

    def _handle(self, kind: str, pair: _Pair, req: Extent, buf: t.Any, err: int) -> None:
        if err:
            side = "reading from QEMU's export" if kind == "read" else "writing the target through qemu-nbd"
            self.error = f"{side} at offset {req.offset} ({req.length} bytes) failed: {os.strerror(err)}"
            return
        if kind == "read":
            self.bytes_read += req.length
            if buf.is_zero():
                # Data that reads as zeros: a zero cluster costs no space (and no compression).
                pair.writer.aio_zero(req.length, req.offset, completion=self._on("zero", pair, req, None))
            else:
                pair.writer.aio_pwrite(buf, req.offset, completion=self._on("write", pair, req, buf))
            return
        pair.in_flight -= 1
        if kind == "zero":
            self.zero_bytes += req.length
        else:
            self.data_bytes += req.length
        if self.progress is not None:
            self.progress.add(req.length)

    def run(self) -> None:
        handles = [h for pair in self.pairs for h in (pair.reader, pair.writer)]
        last_event = time.monotonic()
        while True:
            for pair in self.pairs:
                while self.pending and pair.in_flight < self.depth and self.error is None:
                    self._issue(pair, self.pending.popleft())
            while self.events:
                self._handle(*self.events.pop(0))
                last_event = time.monotonic()
            if self.error is not None:
                raise VmBackupError("BACKUP_FAILED", self.error, phase="transfer")
            if not self.pending and all(pair.in_flight == 0 for pair in self.pairs):
                return
            if any(pair.in_flight < self.depth for pair in self.pairs) and self.pending:
                continue
            readable, writable = [], []
            for handle in handles:
                direction = handle.aio_get_direction()
                if direction & nbd.AIO_DIRECTION_READ:
                    readable.append(handle.aio_get_fd())
                if direction & nbd.AIO_DIRECTION_WRITE:
                    writable.append(handle.aio_get_fd())
            r_ready, w_ready, dummy = select.select(readable, writable, [], 1.0)
            if not r_ready and not w_ready:
                if time.monotonic() - last_event > STALL_TIMEOUT:
                    raise VmBackupError("BACKUP_FAILED", f"no NBD reply for {STALL_TIMEOUT:.0f} s: the copy is stuck",
                                        phase="transfer")
                continue
            for handle in handles:
                fd = handle.aio_get_fd()
                if fd in r_ready:
                    handle.aio_notify_read()
                if fd in w_ready:
                    handle.aio_notify_write()


def _qemu_nbd_argv(qemu_nbd: str, sock: str, dst: str, compress: bool, connections: int) -> list[str]:
    argv = [qemu_nbd, "--socket", sock, "--persistent", "--shared", str(connections),
            # No flush per request (as qemu-img convert): the image is fsynced once at the end.
            "--cache", "unsafe"]
    if compress:
        # The compress filter turns every data write into a compressed cluster (zstd: the image's type).
        filename = dst.replace(",", ",,")
        argv += ["--image-opts", f"driver=compress,file.driver=qcow2,file.file.driver=file,file.file.filename={filename}"]
    else:
        argv += ["--format", "qcow2", dst]
    return argv


def _start_writer(argv: list[str], sock: str, connections: int) -> tuple[subprocess.Popen, list[t.Any]]:
    proc = popen_tied(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    writers: list[t.Any] = []
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while len(writers) < connections:
            handle = nbd.NBD()
            try:
                handle.connect_unix(sock)
            except nbd.Error as exc:
                _close(handle)
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                    raise VmBackupError("BACKUP_FAILED", f"qemu-nbd exited (rc={proc.returncode}) before serving the target: {err}",
                                        phase="transfer") from None
                if time.monotonic() > deadline:
                    raise _nbd_error(f"qemu-nbd did not serve the target within {START_TIMEOUT:.0f} s", exc) from None
                time.sleep(0.01)
                continue
            writers.append(handle)
    except BaseException:
        for handle in writers:
            _close(handle)
        _stop(proc)
        raise
    return proc, writers


def _stop(proc: subprocess.Popen, graceful: bool = False) -> tuple[int | None, str]:
    """End qemu-nbd: SIGTERM (it closes the image cleanly), SIGKILL if it does not go."""
    if proc.poll() is None:
        proc.terminate()
    try:
        dummy, err = proc.communicate(timeout=STOP_TIMEOUT if graceful else 5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        dummy, err = proc.communicate()
    return proc.returncode, (err or b"").decode(errors="replace").strip()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_extents(socket_path: str, export: str, extents: list[Extent], dst: str, virtual_size: int, *,
                 work_dir: str, compress: bool = False, workers: int = 4, chunk: int = 1 << 20,
                 progress: Progress | None = None, qemu_img: str = "qemu-img", qemu_nbd: str = "qemu-nbd") -> dict[str, t.Any]:
    """Create ``dst``, a new qcow2 of ``virtual_size`` without backing, holding ``extents``.

    Data extents are read from the NBD export ``export`` at ``socket_path`` and written as data
    (compressed clusters, zstd, when ``compress``); zero extents (and data that reads as zeros)
    are written as zero clusters. ``dst`` is fsynced. The writer (qemu-nbd) and its socket
    live in ``work_dir`` and are gone on every way out; qemu-nbd dies with the calling thread.
    On failure ``dst`` is removed and BACKUP_FAILED (``phase: transfer``) raised; a cancel
    (any BaseException) passes through after the same cleanup.

    Returns ``{bytes_read, data_bytes, zero_bytes, extents, seconds}``.
    """
    require()
    if not 1 <= workers <= 16:
        raise VmBackupError("INVALID_ARGUMENT", f"workers must be 1..16, not {workers}")
    if chunk % CLUSTER or not CLUSTER <= chunk <= MAX_CHUNK:
        raise VmBackupError("INVALID_ARGUMENT", f"chunk must be a multiple of {CLUSTER} up to {MAX_CHUNK}, not {chunk}")
    started = time.monotonic()
    requests = plan_writes(extents, virtual_size, chunk)
    data_requests = sum(1 for r in requests if not r.zero)
    # No more connections than there are requests to keep busy (an empty bitmap needs one writer).
    connections = max(1, min(workers, (data_requests + DEPTH - 1) // DEPTH))
    if os.path.lexists(dst):
        raise VmBackupError("BACKUP_FAILED", f"{dst} exists already: not overwriting it", phase="transfer", path=dst)
    sock = os.path.join(work_dir, f"nbd-writer.{os.getpid()}.{threading.get_ident()}.sock")
    created = False
    proc: subprocess.Popen | None = None
    handles: list[t.Any] = []
    ok = False
    try:
        options = "compression_type=zstd" if compress else None
        argv = [qemu_img, "create", "-q", "-f", "qcow2"] + (["-o", options] if options else []) + [dst, str(virtual_size)]
        created = True  # from here on dst may exist: the cleanup removes it
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
        if done.returncode != 0:
            raise VmBackupError("BACKUP_FAILED", f"qemu-img create of {dst} failed (rc={done.returncode}): "
                                f"{done.stderr.decode(errors='replace').strip()}", phase="transfer", path=dst)
        proc, writers = _start_writer(_qemu_nbd_argv(qemu_nbd, sock, dst, compress, connections), sock, connections)
        handles.extend(writers)
        readers = []
        if data_requests:
            for dummy in range(connections):
                readers.append(_connect(socket_path, export))
                handles.append(readers[-1])
        else:
            readers = writers  # never read from: nothing is data
        pairs = [_Pair(r, w) for r, w in zip(readers, writers)]
        copier = _Copier(pairs, requests, DEPTH, progress)
        try:
            copier.run()
            writers[0].flush()  # qcow2 metadata out of qemu-nbd's caches
        except nbd.Error as exc:
            raise _nbd_error("the NBD copy failed", exc) from None
        for handle in handles:
            try:
                handle.shutdown()
            except nbd.Error:
                pass
            _close(handle)
        handles.clear()
        rc, err = _stop(proc, graceful=True)
        proc = None
        if rc != 0:
            raise VmBackupError("BACKUP_FAILED", f"qemu-nbd serving {dst} failed (rc={rc}): {err}", phase="transfer", path=dst)
        try:
            _fsync(dst)
        except OSError as exc:
            raise VmBackupError("BACKUP_FAILED", f"fsync of {dst} failed: {exc.strerror}", phase="transfer", path=dst) from None
        ok = True
        return {"bytes_read": copier.bytes_read, "data_bytes": copier.data_bytes, "zero_bytes": copier.zero_bytes,
                "extents": len(merge_extents(extents)), "seconds": round(time.monotonic() - started, 3)}
    finally:
        for handle in handles:
            _close(handle)
        if proc is not None:
            _stop(proc)
        for path in [sock] + ([dst] if created and not ok else []):
            try:
                os.unlink(path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
