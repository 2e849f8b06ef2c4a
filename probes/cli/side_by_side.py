"""Run several fits as processes side by side, each after the runs it reads.

Why: a fit is not all torch. Its labels, plots, reports and W&B files run on one core, so one fit
at a time leaves the second core of a 2-core machine idle for a third of the run; two fits side by
side with one torch thread each kept both busy and finished the demo's model and its own-images
control in about the time of the slower one alone (BENCHMARKS.md, "The demo"). A same-image
control replays the model's recorded trajectory, so it starts only when the model's run is done.

Each run writes its console to ``<log_dir>/<name>.log`` (its progress bars included); the console
gets one line when a run starts and one when it ends. If a run fails, the others are stopped and
the error names the run, its exit status, its log and the log's last lines (where the run's own
one-line error is).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from probes.common.files import open_log

#: lines of a failed run's log quoted in the error
TAIL_LINES = 12


class RunFailed(RuntimeError):
    """A run started side by side exited non-zero (the message quotes its log)."""


@dataclass(frozen=True)
class Job:
    """One run: its name (and log file's), the ``diffusion-probes`` arguments, the jobs it reads."""
    name: str
    argv: tuple[str, ...]
    after: tuple[str, ...] = field(default=())


def threads_each(cores: int, concurrent: int) -> int:
    """Torch threads for each of ``concurrent`` runs sharing ``cores``: never more threads than cores."""
    return max(1, cores // max(1, concurrent))


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    # progress bars rewrite their line with carriage returns: keep what each line ended as
    kept = [ln.rsplit("\r", 1)[-1] for ln in text.splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


def run_side_by_side(jobs: Sequence[Job], slots: int, cores: int, log_dir: Path,
                     env: Mapping[str, str] | None = None, poll: float = 0.5) -> dict[str, float]:
    """Run ``jobs`` (``python -m probes.cli.main <argv>``), at most ``slots`` at a time, each after
    its ``after`` jobs; returns each job's wall seconds. The runs started together get
    :func:`threads_each` torch threads (``OMP_NUM_THREADS``) of the cores the ones still running leave.

    :raises RunFailed: a run exited non-zero (the others are stopped).
    :raises ValueError: a job waits for one that is not in ``jobs`` (it would never start).
    """
    names = {j.name for j in jobs}
    unknown = sorted({a for j in jobs for a in j.after} - names)
    if unknown:
        raise ValueError(f"jobs wait for {unknown}, which are not among the jobs {sorted(names)}")
    pending = list(jobs)
    running: dict[str, tuple[subprocess.Popen, float, IO[str]]] = {}
    done: set[str] = set()
    seconds: dict[str, float] = {}
    base_env = dict(os.environ if env is None else env)
    try:
        while pending or running:
            ready = [j for j in pending if set(j.after) <= done]
            if not ready and not running:
                raise ValueError(f"jobs {[j.name for j in pending]} wait for each other: none can start")
            start = ready[:max(0, slots - len(running))]
            threads = threads_each(cores - len(running), len(start)) if start else 0
            for job in start:
                pending.remove(job)
                log = open_log(log_dir / f"{job.name}.log")
                proc = subprocess.Popen([sys.executable, "-m", "probes.cli.main", *job.argv], stdout=log,
                                        stderr=subprocess.STDOUT, env={**base_env, "OMP_NUM_THREADS": str(threads)})
                running[job.name] = (proc, time.perf_counter(), log)
                print(f"[side by side] {job.name}: started ({threads} torch thread{'s' * (threads > 1)}; "
                      f"log {log_dir / (job.name + '.log')})", flush=True)
            for name, (proc, t0, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[name]
                seconds[name] = time.perf_counter() - t0
                if code != 0:
                    path = log_dir / f"{name}.log"
                    raise RunFailed(f"run {name} failed (exit status {code}); its log is {path}, ending:\n"
                                    f"{log_tail(path)}")
                done.add(name)
                print(f"[side by side] {name}: done in {seconds[name]:.0f} s", flush=True)
            if running:
                time.sleep(poll)
    finally:
        for proc, _, log in running.values():       # after a failure or an interrupt: stop the rest
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    return seconds
