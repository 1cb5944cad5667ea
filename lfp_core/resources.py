"""What a piece of work cost this process: wall time, CPU time, peak resident memory, and the CPU
time the hypervisor stole from the machine meanwhile (on shared VMs the same work takes several
times longer at high steal, so every timing is reported with it).

Linux-specific readings (/proc) degrade to ``None`` elsewhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


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
    follows; False where the kernel does not allow it (the reading then covers the process's life)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
    """Measure a block: ``with Meter() as m: ...`` then ``m.wall``, ``m.cpu``, ``m.peak_rss``, ``m.steal``."""

    wall: float = 0.0
    cpu: float = 0.0
    peak_rss: int | None = None
    steal: float | None = None
    _start: tuple = field(default=(), repr=False)

    def start(self) -> "Meter":
        reset_peak_rss()
        self._start = (time.perf_counter(), time.process_time(), cpu_ticks())
        return self

    def __enter__(self) -> "Meter":
        return self.start()

    def stop(self) -> "Meter":
        w, c, ticks = self._start
        self.wall, self.cpu = time.perf_counter() - w, time.process_time() - c
        self.peak_rss, self.steal = peak_rss_bytes(), steal_since(ticks)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> str:
        parts = [f"CPU {self.cpu:.1f}s"]
        if self.peak_rss is not None:
            parts.append(f"peak RSS {self.peak_rss / 2**30:.2f} GiB")
        if self.steal is not None:
            parts.append(f"CPU steal {self.steal:.0%}")
        return ", ".join(parts)
