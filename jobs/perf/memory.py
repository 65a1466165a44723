"""Peak resident memory while a block runs, sampled on a thread (for the performance scripts).

    with PeakMemory() as memory:                    # this process
        ...
    with PeakMemory(ray_workers=True) as memory:    # this process and every Ray worker process on the machine
        ...
    print(memory.peak - memory.start)               # bytes above the start
"""

from __future__ import annotations

import os
import threading

import psutil


class PeakMemory:
    """The summed RSS of this process (and, with ``ray_workers``, of every ``ray::`` process): ``start`` when the
    block begins, ``peak`` the largest sample."""

    def __init__(self, *, ray_workers: bool = False, interval: float = 0.01):
        self.ray_workers, self.interval = ray_workers, interval
        self.start = self.peak = self.resident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def resident(self) -> int:
        if not self.ray_workers:
            return psutil.Process().memory_info().rss
        total = 0
        for proc in psutil.process_iter(["name", "cmdline", "memory_info"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.pid == os.getpid() or "ray::" in (proc.info["name"] or "") or "ray::" in cmdline:
                total += proc.info["memory_info"].rss if proc.info["memory_info"] else 0
        return total

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.resident())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
