# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from ansible_collections.vmbackup.libvirt.plugins.module_utils import _nbd
from ansible_collections.vmbackup.libvirt.plugins.module_utils._errors import VmBackupError
from ansible_collections.vmbackup.libvirt.plugins.module_utils._nbd import CLUSTER, Extent, combine_status, merge_extents, plan_writes

K = 1024
M = 1024 * K
C = CLUSTER


def D(offset, length):
    return Extent(offset, length, False)


def Z(offset, length):
    return Extent(offset, length, True)


@pytest.mark.parametrize("extents, size, chunk, expected", [
    ([], 8 * M, M, []),
    # an unaligned data write is widened to its cluster
    ([D(5000, 3000)], 8 * M, M, [D(0, C)]),
    # a data range crossing a chunk boundary becomes two requests, split at the boundary
    ([D(M - C, 2 * C)], 8 * M, M, [D(M - C, C), D(M, C)]),
    ([D(0, 3 * M)], 8 * M, M, [D(0, M), D(M, M), D(2 * M, M)]),
    ([D(100, 3 * M)], 8 * M, M, [D(0, M), D(M, M), D(2 * M, M), D(3 * M, C)]),
    # an aligned zero range stays zero; one too long for a request is split
    ([Z(M, 2 * M)], 8 * M, M, [Z(M, 2 * M)]),
    # a zero range that covers a cluster only partly: that cluster is data
    ([Z(M + 4 * K, M - 4 * K)], 8 * M, M, [D(M, C), Z(M + C, M - C)]),
    ([Z(M, 4 * K)], 8 * M, M, [D(M, C)]),
    # two zero ranges that together cover a cluster make it zero
    ([Z(0, C // 2), Z(C // 2, C // 2 + C)], 8 * M, M, [Z(0, 2 * C)]),
    # data and zero sharing a cluster: the cluster is data, the rest zero
    ([D(0, C // 2), Z(C // 2, 2 * C)], 8 * M, M, [D(0, C), Z(C, C), D(2 * C, C)]),
    # separate ranges in one cluster are written once
    ([D(100, 100), D(1000, 100), D(C + 1, 1)], 8 * M, M, [D(0, 2 * C)]),
    # the end of a disk that is not a multiple of the cluster: a boundary like any other
    ([D(M, 512)], M + 512, M, [D(M, 512)]),
    ([Z(M, 512)], M + 512, M, [Z(M, 512)]),
    ([Z(M - C, C + 512)], M + 512, M, [Z(M - C, C + 512)]),
    # ranges outside the disk are clipped away
    ([D(8 * M - C, 2 * C), D(9 * M, C)], 8 * M, M, [D(8 * M - C, C)]),
])
def test_plan_writes(extents, size, chunk, expected):
    assert plan_writes(extents, size, chunk) == expected


def test_plan_writes_splits_zero_ranges():
    assert plan_writes([Z(0, 5 * C)], 8 * M, M, zero_span=2 * C) == [Z(0, 2 * C), Z(2 * C, 2 * C), Z(4 * C, C)]


@pytest.mark.parametrize("chunk", [0, C + 1, C // 2])
def test_plan_writes_refuses_off_grid_chunks(chunk):
    with pytest.raises(ValueError):
        plan_writes([D(0, C)], M, chunk)


def test_merge_extents_refuses_overlaps_and_joins_neighbours():
    assert merge_extents([D(C, C), D(0, C), Z(2 * C, C), Z(3 * C, C), D(0 + 5 * C, 0)]) == [D(0, 2 * C), Z(2 * C, 2 * C)]
    with pytest.raises(ValueError):
        merge_extents([D(0, 2 * C), Z(C, C)])


@pytest.mark.parametrize("seed", range(40))
def test_plan_writes_covers_every_byte_once_on_the_grid(seed):
    """Random extent lists: each input byte is written exactly once, by whole-cluster requests
    within one chunk, and only bytes that read as zero everywhere in their cluster are zeroed."""
    rnd = random.Random(seed)
    size = rnd.choice([4 * M, 4 * M + 512, 3 * M + 7 * 512])
    chunk = rnd.choice([C, 2 * C, M])
    extents, pos = [], 0
    while True:
        pos += rnd.choice([0, 0, 1, 512, 4 * K, C, 3 * C + 17])
        length = rnd.choice([1, 511, 4 * K, C, C + 1, 2 * M])
        if pos + length > size:
            break
        extents.append(Extent(pos, length, rnd.random() < 0.4))
        pos += length
    plan = plan_writes(extents, size, chunk)
    zero_bytes = bytearray(size)
    for ext in extents:
        if ext.zero:
            zero_bytes[ext.offset:ext.end] = b"\1" * ext.length
    written = bytearray(size)
    for req in plan:
        assert req.offset % C == 0
        assert req.end % C == 0 or req.end == size
        if not req.zero:
            assert req.offset // chunk == (req.end - 1) // chunk, f"{req} crosses a chunk boundary"
        else:
            assert zero_bytes.find(0, req.offset, req.end) == -1, f"{req} zeroes bytes that are not zero"
        assert written.find(1, req.offset, req.end) == -1, f"{req} writes a byte twice"
        written[req.offset:req.end] = b"\1" * req.length
    for ext in extents:
        assert written.find(0, ext.offset, ext.end) == -1, f"{ext} is not written whole"
    assert plan == sorted(plan, key=lambda e: e.offset)


@pytest.mark.parametrize("start, size, dirty, alloc, expected, end", [
    # the contexts agree on the length
    (0, 8 * M, [C, 1, C, 0], [2 * C, 0], [D(0, C)], 2 * C),
    # the shorter context decides where the reply ends
    (0, 8 * M, [M, 1], [256 * K, 3, 512 * K, 0], [Z(0, 256 * K), D(256 * K, 512 * K)], 768 * K),
    (M, 8 * M, [256 * K, 1, 256 * K, 0], [M, 0], [D(M, 256 * K)], M + 512 * K),
    # only bit 0 of the bitmap context means dirty; only bit 1 of base:allocation means zero
    (0, 8 * M, [C, 2, C, 3], [C, 1, C, 1], [D(C, C)], 2 * C),
    # no base:allocation: all dirty data
    (0, 4 * M, [M, 1, 3 * M, 0], None, [D(0, M)], 4 * M),
    # a final extent that runs past the export is clipped
    (3 * M, 4 * M, [2 * M, 1], [2 * M, 0], [D(3 * M, M)], 4 * M),
    # zero/data changes inside one dirty extent split it; equal neighbours join
    (0, 8 * M, [3 * C, 1], [C, 0, C, 0, C, 2], [D(0, 2 * C), Z(2 * C, C)], 3 * C),
    # an empty reply makes no progress (the caller refuses it)
    (0, 8 * M, [], [C, 0], [], 0),
])
def test_combine_status(start, size, dirty, alloc, expected, end):
    assert combine_status(start, size, dirty, alloc) == (expected, end)


def test_require_names_the_package(monkeypatch):
    monkeypatch.setattr(_nbd, "IMPORT_ERROR", "Traceback ...\nModuleNotFoundError: No module named 'nbd'")
    with pytest.raises(VmBackupError) as info:
        _nbd.require()
    assert info.value.error_code == "MISSING_DEPENDENCY"
    assert "python3-libnbd" in info.value.msg
    with pytest.raises(VmBackupError) as info:
        _nbd.dirty_extents("/nonexistent.sock", "vda", "b", M)
    assert info.value.error_code == "MISSING_DEPENDENCY"


def test_import_error_is_recorded_when_the_binding_is_missing():
    """A Python without the binding (the import really fails) imports _nbd and says why."""
    code = ("import sys; sys.modules['nbd'] = None\n"
            "from ansible_collections.vmbackup.libvirt.plugins.module_utils import _nbd\n"
            "print(_nbd.IMPORT_ERROR is not None and 'nbd' in _nbd.IMPORT_ERROR)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "True"


def _wait_dead(proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc.returncode


@pytest.mark.parametrize("tied, expected", [(True, -signal.SIGKILL), (False, None)])
def test_popen_tied_child_dies_with_its_thread(tied, expected):
    """A tied child gets SIGKILL when the thread that started it ends; an untied one lives on
    (the control case, so the first assertion means something)."""
    procs = []

    def start():
        starter = _nbd.popen_tied if tied else subprocess.Popen
        procs.append(starter(["sleep", "30"]))
        time.sleep(0.2)  # let the child run its preexec and exec

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    proc = procs[0]
    try:
        assert _wait_dead(proc, timeout=5.0 if tied else 1.0) == expected
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_popen_tied_child_runs_normally_while_the_thread_lives():
    proc = _nbd.popen_tied(["sh", "-c", "exit 3"], stdout=subprocess.PIPE)
    assert proc.wait(timeout=10) == 3
