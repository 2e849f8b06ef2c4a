"""How many CPU threads torch should use: one per core that is actually free.

torch starts one intra-op thread per core the machine *has*, ignoring what else runs on it. On a
shared machine that is the worst choice: two torch threads on two cores already busy with other
processes spend their time waiting on each other at every parallel region (measured on 2 shared
cores: plain generation of the demo's images went from 20 s to 253 s beside one other torch
process, and one thread ran 3-4x faster than two). So the policy is:

1. ``OMP_NUM_THREADS`` set by the user: use exactly that.
2. Otherwise count the CPUs this process may run on (``os.sched_getaffinity``, which honours
   ``taskset``, SLURM's ``--cpus-per-task`` and container cpusets; a cgroup CPU quota caps it too),
   subtract the load other processes put on them (the 1-minute load average, scaled to our share
   of the machine), and use one thread per core left, at least one.
3. The load average lags by a minute: right after a job ends (``make install``'s pip, the previous
   run of a chain) it still counts that job, and a quiet machine would get one thread. So when it
   says a core is taken, the CPUs' busy time is also sampled for a quarter of a second
   (``/proc/stat``, while this process sleeps) and the smaller of the two is believed: a process
   that is really running shows in both.

On a CUDA machine the heavy work is on the GPU and the CPU threads only feed it, so the free-core
count is used there too (it never hurts to leave busy cores alone).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_VARS = ("OMP_NUM_THREADS",)


@dataclass(frozen=True)
class ThreadChoice:
    """The chosen thread count and why (printed once, so a slow run on a busy machine is explained)."""

    threads: int
    available: int           # CPUs this process may use (affinity, capped by a cgroup quota)
    load: float | None       # other processes' load on those CPUs (None when an env var decided)
    source: str              # "OMP_NUM_THREADS" or "free cores"

    def describe(self) -> str:
        if self.load is None:
            return f"[threads] torch uses {self.threads} CPU thread(s) ({self.source}={self.threads})"
        return (f"[threads] torch uses {self.threads} CPU thread(s): {self.available} CPU(s) available, "
                f"load from other processes ~{self.load:.1f} (set OMP_NUM_THREADS to override)")


def available_cpus(affinity: Callable[[int], set[int]] | None = None, cpu_max: Path | None = None) -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota if any."""
    get = affinity if affinity is not None else getattr(os, "sched_getaffinity", None)
    try:
        n = len(get(0)) if get is not None else (os.cpu_count() or 1)
    except OSError:
        n = os.cpu_count() or 1
    quota = _cgroup_quota(cpu_max if cpu_max is not None else Path("/sys/fs/cgroup/cpu.max"))
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def _cgroup_quota(path: Path) -> float | None:
    """``quota/period`` from a cgroup v2 ``cpu.max`` file (``max 100000`` means no quota)."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def busy_cpus_now(interval: float = 0.25, stat: Path = Path("/proc/stat"),
                  sleep: Callable[[float], None] | None = None) -> float | None:
    """How many of the machine's CPUs are busy right now, on average over ``interval`` seconds of
    ``/proc/stat`` (None where there is no such file, e.g. macOS). The caller sleeps meanwhile, so
    the figure is the other processes' use."""
    import time

    def sample() -> tuple[int, int, int] | None:
        try:
            lines = stat.read_text().splitlines()
        except OSError:
            return None
        fields = [int(v) for v in lines[0].split()[1:9]] if lines and lines[0].startswith("cpu ") else []
        if len(fields) < 5:
            return None
        cpus = sum(1 for line in lines[1:] if line.startswith("cpu"))
        return sum(fields), fields[3] + fields[4], cpus    # total, idle + iowait, CPU count

    first = sample()
    if first is None:
        return None
    (sleep or time.sleep)(interval)
    second = sample()
    if second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return max(0.0, (total - idle) / total) * max(1, second[2])


def choose_threads(env: Mapping[str, str] | None = None, available: int | None = None,
                   loadavg: float | None = None, total_cpus: int | None = None,
                   busy_now: float | Callable[[], float | None] | None = None) -> ThreadChoice:
    """The thread policy of the module docstring, as a pure function of its inputs (testable).

    :param env: environment (default ``os.environ``).
    :param available: CPUs this process may use (default :func:`available_cpus`).
    :param loadavg: the machine's 1-minute load average (default ``os.getloadavg()[0]``).
    :param total_cpus: CPUs of the whole machine, over which ``loadavg`` is spread (default
        ``os.cpu_count()``).
    :param busy_now: the machine's busy CPUs now (:func:`busy_cpus_now`), or a function that
        measures them, called only when the load average says a core is taken (point 3 of the
        module docstring); None: the load average alone.
    """
    env = os.environ if env is None else env
    for name in ENV_VARS:
        value = (env.get(name) or "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a whole number of threads") from None
            if n < 1:
                raise ValueError(f"{name}={value!r}: the thread count must be >= 1")
            return ThreadChoice(n, available or n, None, name)
    available = available_cpus() if available is None else max(1, int(available))
    if loadavg is None:
        try:
            loadavg = os.getloadavg()[0]
        except (OSError, AttributeError):
            loadavg = 0.0
    total = max(total_cpus or os.cpu_count() or available, available)
    others = max(0.0, loadavg) * available / total   # our share of the machine's load
    if int(round(others)) >= 1 and busy_now is not None:
        now = busy_now() if callable(busy_now) else busy_now
        if now is not None:
            others = min(others, max(0.0, now) * available / total)
    free = available - int(round(others))
    return ThreadChoice(max(1, min(available, free)), available, others, "free cores")


_applied: ThreadChoice | None = None


def apply_thread_policy(verbose: bool = True) -> ThreadChoice:
    """Set torch's intra-op thread count once per process (later calls return the first choice)."""
    global _applied
    if _applied is not None:
        return _applied
    import torch

    choice = choose_threads(busy_now=busy_cpus_now)
    torch.set_num_threads(choice.threads)
    _applied = choice
    if verbose and choice.load is not None and choice.threads < choice.available:
        print(choice.describe(), flush=True)   # said only when it differs from torch's own choice
    return choice
