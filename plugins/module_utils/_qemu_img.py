# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""qemu-img, run through the module's ``run_command`` with an argv list (never a shell).

This module is private to the vmbackup.libvirt collection; it is not a public API.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import threading
import typing as t

from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError

# run(argv) -> (rc, stdout, stderr); the module passes AnsibleModule.run_command.
Runner = t.Callable[[list[str]], t.Tuple[int, str, str]]


class QemuImg:
    def __init__(self, run: Runner, binary: str) -> None:
        self._run = run
        self.binary = binary

    def _call(self, args: list[str], what: str, code: str = "BACKUP_FAILED") -> str:
        rc, out, err = self._run([self.binary] + args)
        if rc != 0:
            raise VmBackupError(code, f"qemu-img {what} failed (rc={rc}): {err.strip() or out.strip()}")
        return out

    def run_raw(self, args: list[str]) -> tuple[int, str, str]:
        """Run qemu-img and return (rc, stdout, stderr) for callers that read the rc themselves."""
        return self._run([self.binary] + args)

    def version(self) -> str:
        out = self._call(["--version"], "--version")
        first = out.splitlines()[0] if out else ""
        return first.replace("qemu-img version ", "").strip()

    def info_chain(self, path: str, fmt: str | None, force_share: bool) -> list[dict[str, t.Any]]:
        """``qemu-img info --backing-chain`` as a list of dicts, top image first."""
        args = ["info", "--output=json", "--backing-chain"]
        if force_share:
            args.append("-U")
        if fmt:
            args += ["-f", fmt]
        out = self._call(args + [path], f"info of {path}", code="BACKUP_FAILED")
        try:
            data = json.loads(out)
        except ValueError:
            raise VmBackupError("BACKUP_FAILED", f"qemu-img info of {path} printed no JSON: {out[:200]!r}") from None
        return data if isinstance(data, list) else [data]

    def allocated_bytes(self, path: str, fmt: str | None, force_share: bool) -> int:
        """Guest bytes that hold data anywhere in the backing chain: what a copy writes at most.

        Not the files' ``actual-size``: a compressed (or otherwise dense) image occupies far
        less on the host than the uncompressed data a backup writes.
        """
        return data_bytes(self.map(path, fmt, force_share))

    def map(self, path: str, fmt: str | None, force_share: bool) -> list[dict[str, t.Any]]:
        """``qemu-img map --output=json`` of the image as the guest sees it (the whole chain)."""
        args = ["map", "--output=json"]
        if force_share:
            args.append("-U")
        if fmt:
            args += ["-f", fmt]
        out = self._call(args + [path], f"map of {path}")
        try:
            data = json.loads(out)
        except ValueError:
            raise VmBackupError("BACKUP_FAILED", f"qemu-img map of {path} printed no JSON: {out[:200]!r}") from None
        if not isinstance(data, list):
            raise VmBackupError("BACKUP_FAILED", f"qemu-img map of {path} printed no extent list")
        return data

    def convert(self, src: str, src_fmt: str | None, dst: str, dst_fmt: str = "qcow2", compress: bool = False) -> None:
        """A sparse copy (zero clusters are not written) with out-of-order parallel writes;
        ``compress``: every data cluster zstd-compressed (qcow2 compression_type=zstd)."""
        args = ["convert", "-q", "-W", "-m", "8", "-O", dst_fmt] + (COMPRESS_ARGS if compress else [])
        if src_fmt:
            args += ["-f", src_fmt]
        self._call(args + [src, dst], f"convert of {src}")

    def convert_nbd(self, socket_path: str, export: str, dst: str, *, compress: bool = False,
                    on_progress: t.Callable[[float], None] | None = None,
                    cancel: threading.Event | None = None) -> None:
        """Read the NBD export ``export`` on the unix socket ``socket_path`` (a pull-mode job's
        point-in-time view of a disk) into a new sparse qcow2 ``dst``.

        The child dies with the calling thread (tied_popen), so a killed module leaves no reader.
        ``on_progress`` gets the fraction done (0..1) from ``qemu-img -p``. Raises BACKUP_FAILED
        (phase transfer) when qemu-img fails or ``cancel`` is set.
        """
        argv = [self.binary, "convert", "-p", "-W", "-m", "8", "-O", "qcow2"] + (COMPRESS_ARGS if compress else [])
        argv += ["--image-opts", nbd_image_opts(socket_path, export), dst]
        proc = tied_popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err: list[bytes] = []
        reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
        reader.start()
        try:
            buf = b""
            while True:
                chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(64)
                if not chunk:
                    break
                buf = (buf + chunk)[-256:]
                found = _PROGRESS_RE.findall(buf)
                if found and on_progress is not None:
                    on_progress(min(1.0, float(found[-1]) / 100.0))
                if cancel is not None and cancel.is_set():
                    proc.kill()
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            reader.join(5)
            proc.stdout.close()
            proc.stderr.close()
        if cancel is not None and cancel.is_set():
            raise VmBackupError("BACKUP_FAILED", f"the copy of NBD export {export} was stopped (another disk failed)", phase="transfer")
        if rc != 0:
            text = b"".join(err).decode("utf-8", "replace").strip()
            raise VmBackupError("BACKUP_FAILED", f"qemu-img convert of NBD export {export} failed (rc={rc}): {text}", phase="transfer")

    def convert_chain(self, spec: str, dst: str, dst_fmt: str) -> None:
        """Write the image that ``spec`` (a json: chain) reads as a new sparse ``dst``."""
        self._call(["convert", "-q", "-W", "-m", "8", "-O", dst_fmt, spec, dst], f"convert to {dst}", code="RESTORE_FAILED")

    def read_all(self, spec: str, virtual_size: int) -> None:
        """Read every cluster of ``spec`` (a json: chain) into a null device: proves it composes."""
        self._call(["convert", "-n", "-m", "8", "--target-image-opts", spec, f"driver=null-co,size={virtual_size}"],
                   "read through the chain", code="IMAGE_INVALID")

    def bitmaps(self, path: str) -> list[str]:
        """Names of the persistent dirty bitmaps in a qcow2 image (image not in use)."""
        info = self.info_chain(path, "qcow2", force_share=False)[0]
        data = (info.get("format-specific") or {}).get("data") or {}
        return [b["name"] for b in data.get("bitmaps", [])]

    def remove_bitmap(self, path: str, name: str) -> None:
        self._call(["bitmap", "--remove", "-f", "qcow2", path, name], f"bitmap --remove {name} of {path}")

    def drop_backing_reference(self, path: str) -> None:
        """Remove the backing-file name from an image header without touching its data.

        libvirt writes incremental push-mode targets with the live disk as their backing file;
        a backup must never read through to the live disk, so the chain is always given
        explicitly (see chain_spec) and the header keeps no reference.
        """
        self._call(["rebase", "-u", "-f", "qcow2", "-b", "", path], f"rebase -u of {path}")


# Standard qcow2 compressed clusters with zstd: any qemu-img (5.1 or later) reads them.
COMPRESS_ARGS = ["-c", "-o", "compression_type=zstd"]
_PROGRESS_RE = re.compile(rb"\(([0-9]+(?:\.[0-9]+)?)/100%\)")
_PR_SET_PDEATHSIG = 1


def nbd_image_opts(socket_path: str, export: str) -> str:
    """``--image-opts`` of an NBD export on a unix socket (commas doubled: no URI escaping)."""
    def esc(value: str) -> str:
        return value.replace(",", ",,")
    return f"driver=nbd,server.type=unix,server.path={esc(socket_path)},export={esc(export)}"


def _die_with(parent: int) -> t.Callable[[], None]:
    def preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)  # pylint: disable=protected-access
    return preexec


def tied_popen(argv: list[str], **kwargs: t.Any) -> subprocess.Popen:
    """A child that gets SIGKILL when the thread that started it dies (PR_SET_PDEATHSIG): a
    SIGKILLed module leaves no qemu-img behind. Start it from a thread that lives until it is reaped."""
    return subprocess.Popen(argv, preexec_fn=_die_with(os.getpid()), close_fds=True, **kwargs)  # pylint: disable=subprocess-popen-preexec-fn


def data_bytes(extents: list[dict[str, t.Any]]) -> int:
    """Bytes of the extents that hold data (zero and unallocated extents are not copied)."""
    return sum(int(e.get("length", 0)) for e in extents if isinstance(e, dict) and e.get("data"))


def chain_spec(files: list[str]) -> str:
    """A ``json:`` image spec that reads ``files`` (base first) as one backing chain.

    Committed files are never rewritten: the chain exists only in this spec.
    """
    node: dict[str, t.Any] | None = None
    for path in files:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": path}, "backing": node}
    if node is None:
        raise ValueError("empty chain")
    return "json:" + json.dumps(node, separators=(",", ":"))
