"""How much CPU other processes used around a benchmark run (Linux ``/proc/stat``).

On a 2-core machine a single busy neighbour slows torch's multi-threaded matmuls by up to ~30×,
so a benchmark must say whether it ran alone. The 1-minute load average cannot: it still averages
the minute before the run, and it counts the benchmark's own threads. This module measures the
CPU time the whole machine spent busy, minus this process's own CPU time, over a wall-clock
interval, as a fraction of all CPUs: 0.0 = the run had the machine to itself, 0.5 = one of two
cores was busy with something else.
"""

from __future__ import annotations

import os
import resource
import time

BUSY_SHARE = 0.10  # other processes using more than this share of all CPUs make timings suspect


def busy(share: float | None) -> bool:
    """Whether a measured share of the CPUs used by other processes makes timings suspect (None:
    not measurable here, taken as quiet)."""
    return share is not None and share > BUSY_SHARE


def _machine_busy_s() -> float | None:
    """CPU-seconds all CPUs have spent busy since boot (None where ``/proc/stat`` is missing)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal; guest is inside user
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class ContentionMeter:
    """``start()``, run the work, ``stop()`` -> share of all CPUs used by other processes meanwhile."""

    def start(self) -> "ContentionMeter":
        self._t, self._busy, self._own = time.perf_counter(), _machine_busy_s(), _own_cpu_s()
        return self

    def stop(self) -> float | None:
        busy = _machine_busy_s()
        if busy is None or self._busy is None:
            return None
        wall = time.perf_counter() - self._t
        others = (busy - self._busy) - (_own_cpu_s() - self._own)
        return max(0.0, others / (wall * (os.cpu_count() or 1))) if wall > 0 else None


def others_share(seconds: float = 2.0) -> float | None:
    """Share of all CPUs used by other processes over the next ``seconds`` (this one sleeps)."""
    meter = ContentionMeter().start()
    time.sleep(seconds)
    return meter.stop()
