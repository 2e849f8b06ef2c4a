"""Cooperation between runs that share a store folder: an exclusive lock, and sweeping orphaned temporaries.

Two runs started at the same moment on one store root both see "no manifest yet"; without a lock
both load the model and create the store, and one dies (or, worse, truncates the other's arrays).
``store_lock`` serialises creation (and, for single-process runs, generation): the second run
waits, then finds the store made and reuses it. The lock is advisory (``fcntl.flock`` on
``<store>/.lock``), so it is released by the kernel when its holder dies, even by ``kill -9``:
a crashed run never leaves a stale lock behind.
"""
from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"
#: a temporary file older than this is an orphan of a killed writer; younger ones may be another
#: run's write in progress (markers and manifests are written and renamed within milliseconds)
TMP_GRACE_SECONDS = 600.0

_held = threading.local()  # re-entrancy per thread: open_store inside ensure_store takes it again


def _held_counts() -> dict[str, int]:
    if not hasattr(_held, "counts"):
        _held.counts = {}
    return _held.counts


@contextmanager
def store_lock(folder: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` (created if needed); wait, saying so, while another run holds it.

    Re-entrant within a thread. On a file system without ``flock`` support the run goes on
    unlocked with a warning rather than refusing to work.
    """
    folder = Path(folder)
    key = str(folder.resolve())
    counts = _held_counts()
    if counts.get(key):
        counts[key] += 1
        try:
            yield
        finally:
            counts[key] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:
        f = open(path, "a+")  # noqa: SIM115 - closed below, after the body ran
    except OSError as err:  # a read-only store (e.g. shared for evaluation) is only read: no lock needed
        print(f"[store] warning: cannot open {path} ({err}); going on without the lock", flush=True)
        f = None
    locked = False
    try:
        locked = f is not None and _acquire(f, path)
        counts[key] = 1
        yield
    finally:
        counts.pop(key, None)
        if f is not None:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


def _acquire(f, path: Path) -> bool:
    """Take the lock, waiting if needed; False when the file system cannot lock."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another run"
        print(f"[store] waiting for {holder}, which holds {path} (it is creating or filling this store)", flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as err:
        print(f"[store] warning: cannot lock {path} ({err}); do not start two runs on this store at once",
              flush=True)
        return False
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return True


def sweep_temporaries(folder: Path, grace: float = TMP_GRACE_SECONDS) -> list[Path]:
    """Delete the ``*.tmp*`` files a killed writer left in ``folder`` (recursively); returns them.

    Only files older than ``grace`` seconds go: a younger one may belong to a run writing right
    now (another rank, a streaming run, a label cache), whose rename would then fail.
    """
    now, swept = time.time(), []
    for path in Path(folder).rglob("*.tmp*"):
        try:
            if path.is_file() and now - path.stat().st_mtime > grace:
                path.unlink()
                swept.append(path)
        except OSError:  # renamed or swept by its writer meanwhile, or a read-only store
            continue
    return swept
