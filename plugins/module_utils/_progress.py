# -*- coding: utf-8 -*-
# Copyright (c) 2026, vmbackup.libvirt contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Per-phase timings and the progress of long transfers.

This module is private to the vmbackup.libvirt collection; it is not a public API.

Ansible shows a module's result only when the module ends, so a long export, verify or restore
reports its progress to the managed host's log while it runs (``module.log``: syslog, the
journal, identifier ``ansible-<module>``), at most every ``interval`` seconds, and returns its
per-phase timings and the final figures in its result.
"""

from __future__ import annotations

import contextlib
import threading
import time
import typing as t

MIB = 1024 * 1024
GIB = 1024 * MIB


def human_bytes(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB"


class Phases:
    """Wall-clock time per named phase, in the order the phases first ran.

    ``with phases.phase("transfer"): ...``; a phase entered twice adds up. ``public()`` gives
    ``{"<name>_s": seconds}`` rounded to milliseconds, for a module result.
    """

    def __init__(self, clock: t.Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> t.Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            self.add(name, self._clock() - start)

    def add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + max(0.0, seconds)

    def public(self) -> dict[str, float]:
        return {f"{name}_s": round(seconds, 3) for name, seconds in self._seconds.items()}


class Progress:
    """The progress of one transfer of ``total`` bytes (thread-safe: workers call ``add``).

    Every ``interval`` seconds at most, and once at the end, a line goes to ``log`` (the
    module's log function; None: nothing is logged), e.g.
    ``export vm1: 1.20 GiB of 2.00 GiB (60%), 350.2 MiB/s, about 2 s left``.
    """

    def __init__(self, log: t.Callable[[str], None] | None, what: str, total: int, interval: float = 5.0,
                 clock: t.Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.what = what
        self.total = max(0, int(total))
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self.started = clock()
        self.done_bytes = 0
        self._last_report = self.started
        self.lines: list[str] = []  # every line reported (tests read them; the result does not carry them)

    def add(self, n: int) -> None:
        with self._lock:
            self.done_bytes += n
            now = self._clock()
            due = now - self._last_report >= self.interval
            if due:
                self._last_report = now
        if due:
            self._report(now)

    def set(self, done: int) -> None:
        """Absolute progress (a tool that reports a position, e.g. qemu-img -p)."""
        with self._lock:
            self.done_bytes = max(self.done_bytes, int(done))
            now = self._clock()
            due = now - self._last_report >= self.interval
            if due:
                self._last_report = now
        if due:
            self._report(now)

    def line(self, now: float | None = None) -> str:
        now = self._clock() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done_bytes / elapsed
        text = f"{self.what}: {human_bytes(self.done_bytes)}"
        if self.total:
            text += f" of {human_bytes(self.total)} ({min(100.0, 100.0 * self.done_bytes / self.total):.0f}%)"
        text += f", {rate / MIB:.1f} MiB/s"
        if self.total and rate > 0 and self.done_bytes < self.total:
            text += f", about {(self.total - self.done_bytes) / rate:.0f} s left"
        return text

    def _report(self, now: float) -> None:
        text = self.line(now)
        self.lines.append(text)
        if self.log is not None:
            try:
                self.log(text)
            except Exception:  # pylint: disable=broad-exception-caught
                pass  # the log is a courtesy: a broken syslog must not fail a backup

    def finish(self) -> dict[str, t.Any]:
        """Report the final line; return ``{bytes, seconds, mib_s}``."""
        now = self._clock()
        self._report(now)
        seconds = now - self.started
        return {"bytes": self.done_bytes, "seconds": round(seconds, 3),
                "mib_s": round(self.done_bytes / MIB / seconds, 1) if seconds > 0 else None}
