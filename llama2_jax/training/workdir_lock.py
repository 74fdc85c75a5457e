"""One run per workdir: WORKDIR/.lock holds {"host", "pid"} of the run that writes the workdir.

`acquire(workdir)` (process 0 only; `training.setup` calls it for every trainer once its checks pass) creates the file
atomically. A second run on the same workdir gets a one-line `WorkdirLocked` naming the holder. A lock left by a dead
process on this host (kill -9, OOM) is taken over with a warning; a lock from another host cannot be checked and is
refused (delete the file once that run is gone). The lock is released by `release_all` (called by
`llama2_jax.cli.trainer.run_main` at exit, also on exceptions) and at interpreter exit; taking a lock this process
already holds is a no-op, so in-process runs on one workdir one after another (tests, notebooks) work. `check_free`
asks without taking it, so a run learns of a live holder before reading its data.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
from typing import Optional

import jax

from llama2_jax.checkpoints.layout import LOCK_FILE

_held: set[str] = set()  # lock files this process holds


class WorkdirLocked(ValueError):
    """Another live run holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):  # removed meanwhile, or cut short by a kill while being written
        return {}


def _create(path: str) -> bool:
    """Write the lock file if it does not exist (atomic: O_EXCL). Returns whether this process now holds it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
    return True


def _refusal(workdir: str, path: str) -> Optional[str]:
    """Why this process may not take the lock at `path` (a live run of another process holds it), or None."""
    holder = _read(path)
    pid, holder_host, host = holder.get("pid"), holder.get("host"), socket.gethostname()
    mine_or_dead = pid == os.getpid() or (isinstance(pid, int) and not _alive(pid))
    if not holder or holder_host is None or (holder_host == host and mine_or_dead):  # free, broken, or stale
        return None
    return (f"{workdir} is in use by process {pid} on host {holder_host} (lock file {path}); wait for that run to "
            "end, use another --workdir, or delete the lock file if that run is gone")


def check_free(workdir: str) -> None:
    """Raise `WorkdirLocked` when another live run holds the workdir; takes nothing (process 0 only)."""
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    if jax.process_index() == 0 and path not in _held and os.path.exists(path):
        problem = _refusal(workdir, path)
        if problem:
            raise WorkdirLocked(problem)


def acquire(workdir: str) -> None:
    """Take WORKDIR/.lock for this process (process 0 only), or raise `WorkdirLocked` naming the holder."""
    if jax.process_index() != 0:
        return
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    if path in _held:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for _ in range(3):  # a stale lock is removed and the create retried (another process may win the race)
        if _create(path):
            _held.add(path)
            return
        holder = _read(path)
        if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
            _held.add(path)
            return
        problem = _refusal(workdir, path)
        if problem:
            raise WorkdirLocked(problem)
        if holder.get("host"):
            logging.warning("%s: taking over the lock of process %d on %s, which is no longer running", workdir,
                            holder["pid"], holder["host"])
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    raise WorkdirLocked(f"{workdir}: could not take the lock file {path} (other runs keep taking it)")


def release(workdir: str) -> None:
    """Remove WORKDIR/.lock if this process holds it."""
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    if path not in _held:
        return
    _held.discard(path)
    if _read(path).get("pid") == os.getpid():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def release_all() -> None:
    for path in list(_held):
        release(os.path.dirname(path))


atexit.register(release_all)
