"""Peak resident memory of a block of code, for the benchmarks' fresh child processes: VmRSS sampled every 5 ms (the
process high-water mark is set by imports, not by the work measured)."""
from __future__ import annotations

import threading
import time


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


class PeakRSS:
    """`with PeakRSS() as m: work()`, then m.before_kb and m.peak_kb."""

    def __enter__(self) -> "PeakRSS":
        self.before_kb, self.peak_kb, self._done = rss_kb(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak_kb = max(self.peak_kb, rss_kb())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
