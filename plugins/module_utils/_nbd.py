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
import socket
import subprocess
import tempfile
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
# At most this many lanes (connection pairs, each with a thread): see copy_extents.
MAX_LANES = max(1, (os.cpu_count() or 1) // 2)
# Requests in flight per connection pair (reads waiting for QEMU plus writes waiting for qemu-nbd).
DEPTH = 4
# No reply from either server for this long while requests are in flight: the copy is stuck.
STALL_TIMEOUT = 300.0
# How long qemu-nbd may take to listen on its socket, and to exit after SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

# The send buffer of a writer connection (a chunk or more: see _grow_send_buffer).
SEND_BUFFER = 4 * 1024 * 1024

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


# sun_path holds 108 bytes; a longer socket path is reached through its directory's descriptor.
_SUN_PATH_MAX = 107


def _connect(socket_path: str, export: str, meta_contexts: t.Sequence[str] = ()) -> t.Any:
    handle = nbd.NBD()
    handle.set_export_name(export)
    for name in meta_contexts:
        handle.add_meta_context(name)
    dir_fd = None
    try:
        path = socket_path
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            dir_fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            path = f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}"
        # The handshake waits for the server: asynchronously, so a server that accepts but
        # never answers (stopped, stuck) fails the run after STALL_TIMEOUT instead of hanging it.
        handle.aio_connect_unix(path)
        deadline = time.monotonic() + STALL_TIMEOUT
        while handle.aio_is_connecting():
            if handle.poll(500) == 0 and time.monotonic() > deadline:
                _close(handle)
                raise VmBackupError("BACKUP_FAILED", f"the NBD server at {socket_path} did not answer for {STALL_TIMEOUT:.0f} s: "
                                    "it is stuck", phase="transfer")
        if not handle.aio_is_ready():
            raise nbd.Error("the NBD handshake failed", errno.EPROTO)
    except (nbd.Error, OSError) as exc:
        _close(handle)
        raise _nbd_error(f"cannot connect to the NBD export {export!r} at {socket_path}", exc) from None
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
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
    return _in_thread(lambda: _dirty_extents(socket_path, export, bitmap, size))


def _wait_for(handle: t.Any, cookie: int) -> None:
    """Wait for one command; BACKUP_FAILED if the server does not answer for STALL_TIMEOUT."""
    deadline = time.monotonic() + STALL_TIMEOUT
    while not handle.aio_command_completed(cookie):
        if handle.poll(500) == 0 and time.monotonic() > deadline:
            raise VmBackupError("BACKUP_FAILED", f"no NBD reply for {STALL_TIMEOUT:.0f} s: the block status is stuck",
                                phase="transfer")


def _in_thread(fn: t.Callable[[], t.Any]) -> t.Any:
    """Run ``fn`` in a thread and wait for it (see _Copier.run: no libnbd callback may run in
    the thread that receives Cancelled). A signal during the wait lets ``fn`` finish first."""
    outcome: dict[str, t.Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # pylint: disable=broad-exception-caught
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="nbd-status", daemon=True)
    thread.start()
    try:
        thread.join()
    except BaseException:
        # Block status requests are short: let fn finish and close its handle. A server that
        # does not answer is left to the daemon thread, which ends with the process.
        thread.join(timeout=STOP_TIMEOUT)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _dirty_extents(socket_path: str, export: str, bitmap: str, size: int) -> list[Extent]:
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

            _wait_for(handle, handle.aio_block_status(min(size - offset, BLOCK_STATUS_SPAN), offset, on_extent))
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

class _Lane:
    """One reader connection (QEMU's export), one writer connection (our qemu-nbd) and the
    event loop between them: a read completes into its buffer, the buffer is written (or, if it
    reads as zeros, the range is zeroed), a finished write frees the slot for the next read.
    Every lane takes its requests from the shared queue and runs in a thread of its own (libnbd
    releases the GIL while it waits and while it moves data)."""

    def __init__(self, copier: _Copier, reader: t.Any, writer: t.Any) -> None:
        self.copier = copier
        self.reader = reader
        self.writer = writer
        self.in_flight = 0
        self.events: collections.deque = collections.deque()
        self.side = "the NBD copy"  # what a libnbd exception is about
        self.bytes_read = self.data_bytes = self.zero_bytes = 0
        # Buffers are reused: a fresh one per request costs page faults on every byte.
        self.free: list[bytearray] = []

    def _on(self, kind: str, req: Extent, buf: t.Any) -> t.Callable[[t.Any], int]:
        def completion(err) -> int:
            # Only record: libnbd calls this from inside aio_notify_*; the loop acts on it.
            self.events.append((kind, req, buf, int(getattr(err, "value", err) or 0)))
            return 1  # retire the command
        return completion

    def _pad(self, req: Extent) -> int:
        """Bytes to add to a write that ends where the disk ends inside a cluster (compress)."""
        return self.copier.padded - req.end if req.end == self.copier.size else 0

    def _issue(self, req: Extent) -> None:
        self.in_flight += 1
        if req.zero:
            self.side = "writing the target through qemu-nbd"
            self.writer.aio_zero(req.length + self._pad(req), req.offset, completion=self._on("zero", req, None))
        else:
            self.side = "reading from QEMU's export"
            store = self.free.pop() if self.free else bytearray(self.copier.chunk + CLUSTER)
            buf = nbd.Buffer.from_buffer(memoryview(store)[:req.length])
            self.reader.aio_pread(buf, req.offset, completion=self._on("read", req, (buf, store)))

    def _handle(self, kind: str, req: Extent, buf: t.Any, err: int) -> None:
        if err:
            side = "reading from QEMU's export" if kind == "read" else "writing the target through qemu-nbd"
            raise VmBackupError("BACKUP_FAILED", f"{side} at offset {req.offset} ({req.length} bytes) failed: {os.strerror(err)}",
                                phase="transfer")
        if kind == "read":
            self.bytes_read += req.length
            self.side = "writing the target through qemu-nbd"
            pad = self._pad(req)
            if buf[0].is_zero():
                # Data that reads as zeros: a zero cluster costs no space (and no compression).
                self.free.append(buf[1])
                self.writer.aio_zero(req.length + pad, req.offset, completion=self._on("zero", req, None))
                return
            if pad:
                buf[1][req.length:req.length + pad] = bytes(pad)
                buf = (nbd.Buffer.from_buffer(memoryview(buf[1])[:req.length + pad]), buf[1])
            self.writer.aio_pwrite(buf[0], req.offset, completion=self._on("write", req, buf))
            return
        if kind == "write":
            self.free.append(buf[1])
        self.in_flight -= 1
        if kind == "zero":
            self.zero_bytes += req.length
        else:
            self.data_bytes += req.length
        if self.copier.progress is not None:
            self.copier.progress.add(req.length)

    def run(self) -> None:
        try:
            self._loop()
        except nbd.Error as exc:
            self.copier.fail(VmBackupError("BACKUP_FAILED", f"{self.side} failed: {exc}", phase="transfer"))
        except BaseException as exc:  # pylint: disable=broad-exception-caught
            self.copier.fail(exc)

    def _loop(self) -> None:
        copier = self.copier
        roles = [(self.reader, "reading from QEMU's export")] if self.reader is not self.writer else []
        roles.append((self.writer, "writing the target through qemu-nbd"))
        last_event = time.monotonic()
        while True:
            while self.in_flight < copier.depth and not copier.stopped():
                try:
                    req = copier.pending.popleft()
                except IndexError:
                    break
                self._issue(req)
            while self.events:
                self._handle(*self.events.popleft())
                last_event = time.monotonic()
            if copier.stopped():
                return
            if copier.cancel is not None and copier.cancel.is_set():
                raise VmBackupError("BACKUP_FAILED", "the copy was stopped (another disk's copy failed, or the run is cancelled)",
                                    phase="transfer", stopped=True)
            if self.in_flight == 0 and not copier.pending:
                return
            readable, writable = [], []
            for handle, role in roles:
                self.side = role
                direction = handle.aio_get_direction()
                if direction & nbd.AIO_DIRECTION_READ:
                    readable.append(handle.aio_get_fd())
                if direction & nbd.AIO_DIRECTION_WRITE:
                    writable.append(handle.aio_get_fd())
            r_ready, w_ready, dummy = select.select(readable, writable, [], 0.5)
            if not r_ready and not w_ready:
                if time.monotonic() - last_event > STALL_TIMEOUT:
                    raise VmBackupError("BACKUP_FAILED", f"no NBD reply for {STALL_TIMEOUT:.0f} s: the copy is stuck",
                                        phase="transfer")
                continue
            for handle, role in roles:
                self.side = role
                fd = handle.aio_get_fd()
                if fd in r_ready:
                    handle.aio_notify_read()
                if fd in w_ready:
                    handle.aio_notify_write()


class _Copier:
    """The lanes of one copy, the queue of requests they share, and the first failure."""

    def __init__(self, pairs: list[tuple[t.Any, t.Any]], requests: list[Extent], depth: int, progress: Progress | None,
                 cancel: threading.Event | None = None, size: int = 0, padded: int = 0) -> None:
        self.size = size
        self.padded = padded  # the target's size, when it is longer than the disk (see copy_extents)
        self.pending = collections.deque(requests)
        self.chunk = max((r.length for r in requests if not r.zero), default=0)
        self.depth = depth
        self.progress = progress
        self.cancel = cancel
        self.lanes = [_Lane(self, reader, writer) for reader, writer in pairs]
        self._failure: BaseException | None = None
        self._stop = threading.Event()

    def fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._stop.set()

    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        # Every lane in a thread of its own, never in the calling thread: libnbd runs our
        # completion callbacks inside its calls and swallows what they raise, so a signal
        # handler's Cancelled raised there (Python runs handlers in the main thread) would be
        # lost. The calling thread only waits, and a signal interrupts that wait.
        threads = [threading.Thread(target=lane.run, name=f"nbd-copy-{i}", daemon=True) for i, lane in enumerate(self.lanes)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        except BaseException:
            self._stop.set()  # a signal (Cancelled) in the calling thread stops every lane
            raise
        finally:
            # No lane may outlive the copy: its handles are closed next.
            if any(thread.is_alive() for thread in threads):
                self._stop.set()
            for thread in threads:
                if thread.ident is not None:
                    thread.join()
        if self._failure is not None:
            raise self._failure

    @property
    def bytes_read(self) -> int:
        return sum(lane.bytes_read for lane in self.lanes)

    @property
    def data_bytes(self) -> int:
        return sum(lane.data_bytes for lane in self.lanes)

    @property
    def zero_bytes(self) -> int:
        return sum(lane.zero_bytes for lane in self.lanes)


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


def _start_writer(argv: list[str], dir_fd: int, sock: str, connections: int) -> tuple[subprocess.Popen, list[t.Any]]:
    """Start qemu-nbd in the private directory ``dir_fd`` (its socket ``sock`` is relative to it)
    and connect ``connections`` clients. Both sides reach the socket through the descriptor,
    never through a path someone could rename: the socket is ours, and no path is too long."""
    proc = popen_tied(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(dir_fd,))
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


def _grow_send_buffer(handle: t.Any, size: int = SEND_BUFFER) -> None:
    """A larger socket send buffer for a writer connection: a whole chunk goes out in one call
    instead of one event-loop round per 200 KiB (the kernel's default)."""
    try:
        sock = socket.socket(fileno=os.dup(handle.aio_get_fd()))
    except (OSError, nbd.Error):
        return
    try:
        for option in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
            if option is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, size)
                break
            except OSError:
                continue
    finally:
        sock.close()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_extents(socket_path: str, export: str, extents: list[Extent], dst: str, virtual_size: int, *,
                 work_dir: str, compress: bool = False, workers: int = 4, chunk: int = 1 << 20,
                 progress: Progress | None = None, qemu_img: str = "qemu-img", qemu_nbd: str = "qemu-nbd",
                 cancel: threading.Event | None = None) -> dict[str, t.Any]:
    """Create ``dst``, a new qcow2 of ``virtual_size`` without backing, holding ``extents``.

    Data extents are read from the NBD export ``export`` at ``socket_path`` and written as data
    (compressed clusters, zstd, when ``compress``); zero extents (and data that reads as zeros)
    are written as zero clusters. ``dst`` is fsynced. The writer (qemu-nbd) and its socket
    live in ``work_dir`` and are gone on every way out; qemu-nbd dies with the calling thread.
    On failure ``dst`` is removed and BACKUP_FAILED (``phase: transfer``) raised; a cancel
    (any BaseException) passes through after the same cleanup. ``cancel`` set (from another
    thread) stops the copy within half a second the same way (BACKUP_FAILED, ``stopped: true``).

    Returns ``{bytes_read, data_bytes, zero_bytes, extents, seconds, connections}`` (``connections``:
    the lanes used, at most ``workers`` and half the cores).
    """
    require()
    if not os.path.isabs(dst) or not os.path.isabs(work_dir):
        raise ValueError(f"dst {dst!r} and work_dir {work_dir!r} must be absolute paths")
    if not 1 <= workers <= 16:
        raise VmBackupError("INVALID_ARGUMENT", f"workers must be 1..16, not {workers}")
    if chunk % CLUSTER or not CLUSTER <= chunk <= MAX_CHUNK:
        raise VmBackupError("INVALID_ARGUMENT", f"chunk must be a multiple of {CLUSTER} up to {MAX_CHUNK}, not {chunk}")
    started = time.monotonic()
    requests = plan_writes(extents, virtual_size, chunk)
    data_requests = sum(1 for r in requests if not r.zero)
    # One lane keeps a local NBD server busy (DEPTH requests in flight) and moves about 1 GB/s;
    # each lane also keeps the source server and the writer busy, so more lanes than half the
    # cores only add contention (measured: 2 lanes on 2 cores were 15-35 % slower than one).
    # No more lanes than requests to keep busy (an empty bitmap needs one writer connection).
    connections = max(1, min(workers, MAX_LANES, (data_requests + DEPTH - 1) // DEPTH))
    if os.path.lexists(dst):
        raise VmBackupError("BACKUP_FAILED", f"{dst} exists already: not overwriting it", phase="transfer", path=dst)
    sock_dir: str | None = None
    dir_fd: int | None = None
    created = False
    proc: subprocess.Popen | None = None
    handles: list[t.Any] = []
    ok = False
    try:
        # The writer's socket lives in a directory of its own that only we can enter (work_dir
        # may be shared with QEMU's user): nobody else can connect to it or put a socket there.
        sock_dir = tempfile.mkdtemp(prefix=".nbd-writer-", dir=work_dir)
        dir_fd = os.open(sock_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        options = "compression_type=zstd" if compress else None
        # QEMU's compress filter opens only an image whose size is a multiple of the cluster:
        # a disk that ends inside a cluster is written one cluster longer, then shrunk back.
        padded = _ceil(virtual_size, CLUSTER) if compress else virtual_size
        created = True  # from here on dst may exist: the cleanup removes it
        _run_tied([qemu_img, "create", "-q", "-f", "qcow2"] + (["-o", options] if options else []) + [dst, str(padded)],
                  f"qemu-img create of {dst}", dst)
        # The same descriptor number in qemu-nbd (pass_fds) and here: one short path for both.
        sock = f"/proc/self/fd/{dir_fd}/writer.sock"
        proc, writers = _start_writer(_qemu_nbd_argv(qemu_nbd, sock, dst, compress, connections), dir_fd, sock, connections)
        handles.extend(writers)
        readers = []
        if data_requests:
            for dummy in range(connections):
                readers.append(_connect(socket_path, export))
                handles.append(readers[-1])
            source_size = readers[0].get_size()
            if source_size != virtual_size:
                raise VmBackupError("BACKUP_FAILED", f"the NBD export {export!r} is {source_size} bytes, the disk {virtual_size}",
                                    phase="transfer", export_size=source_size, size=virtual_size)
        else:
            readers = writers  # never read from: nothing is data
        for handle in writers:
            _grow_send_buffer(handle)
        pairs = list(zip(readers, writers))
        copier = _Copier(pairs, requests, DEPTH, progress, cancel, size=virtual_size, padded=padded)
        try:
            copier.run()
            done = copier.data_bytes + copier.zero_bytes
            planned = sum(r.length for r in requests)
            if done != planned:  # never seen; a copy that lost a request must not pass for a backup
                raise VmBackupError("BACKUP_FAILED", f"the NBD copy wrote {done} of {planned} bytes", phase="transfer")
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
        if padded != virtual_size:
            _run_tied([qemu_img, "resize", "-q", "-f", "qcow2", "--shrink", dst, str(virtual_size)], f"qemu-img resize of {dst}", dst)
        try:
            _fsync(dst)
        except OSError as exc:
            raise VmBackupError("BACKUP_FAILED", f"fsync of {dst} failed: {exc.strerror}", phase="transfer", path=dst) from None
        ok = True
        return {"bytes_read": copier.bytes_read, "data_bytes": copier.data_bytes, "zero_bytes": copier.zero_bytes,
                "extents": len(merge_extents(extents)), "seconds": round(time.monotonic() - started, 3),
                "connections": connections}
    finally:
        for handle in handles:
            _close(handle)
        if proc is not None:
            _stop(proc)
        if dir_fd is not None:
            _unlink("writer.sock", dir_fd=dir_fd)
            os.close(dir_fd)
        if sock_dir is not None:
            try:
                os.rmdir(sock_dir)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        if created and not ok:
            _unlink(dst)


def _run_tied(argv: list[str], what: str, path: str) -> None:
    proc = popen_tied(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dummy, err = proc.communicate()
    if proc.returncode != 0:
        raise VmBackupError("BACKUP_FAILED", f"{what} failed (rc={proc.returncode}): {err.decode(errors='replace').strip()}",
                            phase="transfer", path=path)


def _unlink(path: str, dir_fd: int | None = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
