"""What a piece of work cost this process: wall time, CPU time, peak resident memory, and the CPU
time the hypervisor stole from the machine meanwhile (on shared VMs the same work takes several
times longer at high steal, so every timing is reported with it).

Linux-specific readings (/proc) degrade to ``None`` elsewhere.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

_CLEAR_REFS = "/proc/self/clear_refs"
_SAMPLE_EVERY_S = 0.02


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of the whole machine from /proc/stat; (0, 0) where unavailable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[7], sum(v)
    except (OSError, IndexError, ValueError):
        return 0, 0


def steal_since(start: tuple[int, int]) -> float | None:
    """Fraction of the machine's CPU time stolen by the hypervisor since ``start`` (a :func:`cpu_ticks`)."""
    s, t = cpu_ticks()
    return (s - start[0]) / (t - start[1]) if t > start[1] else None


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (VmHWM) so the next reading covers only what
    follows. True only where the kernel honoured it: some sandboxes (gVisor-style kernels) accept
    the write and change nothing, so the high-water mark is read back and compared with the current
    RSS. False means :func:`peak_rss_bytes` still covers the process's whole life."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = peak_rss_bytes(), current_rss_bytes()
    return hwm is not None and rss is not None and hwm <= rss + 16 * 2**20


def current_rss_bytes() -> int | None:
    """This process's resident set size now (/proc/self/statm); None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _PeakSampler:
    """The largest RSS seen by a background thread reading /proc every 20 ms: the peak of a block
    where the kernel's high-water mark cannot be reset (it can miss a spike shorter than that)."""

    def __init__(self) -> None:
        self.peak = current_rss_bytes() or 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(_SAMPLE_EVERY_S):
            self.peak = max(self.peak, current_rss_bytes() or 0)

    def stop(self) -> int | None:
        self._done.set()
        self._thread.join()
        return max(self.peak, current_rss_bytes() or 0) or None


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process (since the last :func:`reset_peak_rss`)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return None


@dataclass
class Meter:
    """Measure a block: ``with Meter() as m: ...`` then ``m.wall``, ``m.cpu``, ``m.peak_rss``, ``m.steal``.

    The peak is the kernel's high-water mark reset at the start of the block; where the kernel does
    not honour the reset it is sampled instead (``m.peak_sampled``), never the process's lifetime
    peak."""

    wall: float = 0.0
    cpu: float = 0.0
    peak_rss: int | None = None
    steal: float | None = None
    peak_sampled: bool = False
    _start: tuple = field(default=(), repr=False)
    _sampler: _PeakSampler | None = field(default=None, repr=False)

    def start(self) -> Meter:
        self._sampler = None if reset_peak_rss() or current_rss_bytes() is None else _PeakSampler()
        self.peak_sampled = self._sampler is not None
        self._start = (time.perf_counter(), time.process_time(), cpu_ticks())
        return self

    def __enter__(self) -> Meter:
        return self.start()

    def stop(self) -> Meter:
        w, c, ticks = self._start
        self.wall, self.cpu = time.perf_counter() - w, time.process_time() - c
        self.steal = steal_since(ticks)
        if self._sampler is not None:
            self.peak_rss, self._sampler = self._sampler.stop(), None
        else:
            self.peak_rss = peak_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> str:
        parts = [f"CPU {self.cpu:.1f}s"]
        if self.peak_rss is not None:
            parts.append(f"peak RSS {self.peak_rss / 2**30:.2f} GiB" + (" (sampled)" if self.peak_sampled else ""))
        if self.steal is not None:
            parts.append(f"CPU steal {self.steal:.0%}")
        return ", ".join(parts)
