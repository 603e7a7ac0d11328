# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import threading

from ansible_collections.vmbackup.libvirt.plugins.module_utils._progress import MIB, Phases, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_phases_add_up_in_first_run_order():
    clock = Clock()
    phases = Phases(clock)
    with phases.phase("plan"):
        clock.now += 0.5
    with phases.phase("transfer"):
        clock.now += 2.25
    with phases.phase("plan"):
        clock.now += 0.25
    assert phases.public() == {"plan_s": 0.75, "transfer_s": 2.25}
    assert list(phases.public()) == ["plan_s", "transfer_s"]


def test_phase_is_timed_when_it_raises():
    clock = Clock()
    phases = Phases(clock)
    try:
        with phases.phase("transfer"):
            clock.now += 1
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert phases.public() == {"transfer_s": 1.0}


def test_progress_logs_at_most_every_interval_and_at_the_end():
    clock, logged = Clock(), []
    progress = Progress(logged.append, "export vm1", 100 * MIB, interval=5, clock=clock)
    for dummy in range(10):
        clock.now += 1
        progress.add(5 * MIB)
    assert len(logged) == 2  # at 5 s and 10 s
    assert logged[0] == "export vm1: 25.0 MiB of 100.0 MiB (25%), 5.0 MiB/s, about 15 s left"
    final = progress.finish()
    assert final == {"bytes": 50 * MIB, "seconds": 10.0, "mib_s": 5.0}
    assert len(logged) == 3 and "(50%)" in logged[-1]


def test_progress_survives_a_broken_log():
    def broken(_text):
        raise OSError("no syslog")

    progress = Progress(broken, "verify", 0, interval=0)
    progress.add(1)
    assert progress.finish()["bytes"] == 1
    assert progress.lines and "of" not in progress.lines[0]  # no total: no percentage


def test_progress_counts_every_byte_from_threads():
    progress = Progress(None, "x", 0, interval=1e9)

    def work():
        for dummy in range(1000):
            progress.add(3)

    threads = [threading.Thread(target=work) for dummy in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert progress.done_bytes == 24000


def test_set_never_goes_backwards():
    progress = Progress(None, "x", 10, interval=1e9)
    progress.set(7)
    progress.set(3)
    assert progress.done_bytes == 7


def test_a_total_that_grows_is_reported_as_it_is_then():
    # verify learns more to read as it goes (a withdrawn skip, the chains of level restore)
    clock, logged = Clock(), []
    progress = Progress(logged.append, "verify vm1 (restore)", 10 * MIB, interval=1, clock=clock)
    clock.now += 1
    progress.add(10 * MIB)
    progress.total += 30 * MIB
    clock.now += 1
    progress.add(10 * MIB)
    assert logged == ["verify vm1 (restore): 10.0 MiB of 10.0 MiB (100%), 10.0 MiB/s",
                      "verify vm1 (restore): 20.0 MiB of 40.0 MiB (50%), 10.0 MiB/s, about 2 s left"]
