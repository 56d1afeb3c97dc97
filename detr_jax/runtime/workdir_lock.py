"""One owner per training workdir: an OS lock on `WORKDIR/train.lock`, held for a run's lifetime.

`train` holds it (`held_by_run`), so a second run on the same workdir is refused at once
with `WorkdirInUse` naming the holder (host, pid, start time), before it writes anything.

The lock is a POSIX record lock (`fcntl.lockf`), not `flock`:
- the kernel drops it when its process ends, however it ends (kill -9 included), so the
  file left behind is no stale lock; its content (the last holder) only serves messages;
- it works across the hosts of a shared file system with POSIX locks: NFS (v3 through the
  lock manager, v4 natively; its protocol carries POSIX locks, while `flock` is local to
  one client on some NFS clients and FUSE file systems), Lustre mounted with `-o flock`, GPFS;
- a forked child does not inherit it, so a worker process that outlives a killed run
  holds nothing (and grain's workers are spawned: they do not even share the descriptor).
A POSIX lock belongs to the process, and closing any descriptor of its file drops it: the
file is opened once per holding process, and a second hold of one workdir in the same
process is refused (`_HELD`) rather than silently granted.

A file system without locks (ENOLCK, EOPNOTSUPP: some FUSE mounts such as gcsfuse) gives
a warning and an unlocked run.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
# What lockf raises for a lock held elsewhere, and for a file system without locks.
_HELD_ELSEWHERE = (errno.EACCES, errno.EAGAIN)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)

_HELD: dict[str, str] = {}  # lock file (real path) -> holder, of the locks this process holds


class WorkdirInUse(RuntimeError):
    """Another run holds the workdir."""


def _holder_text(raw: str) -> str:
    """'host H, pid P, since T' of a lock file's content (or why it is unknown)."""
    try:
        holder = json.loads(raw)
        return f"host {holder['host']}, pid {holder['pid']}, since {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown: it is starting or wrote no record"


def _refusal(workdir: pathlib.Path, raw_holder: str) -> WorkdirInUse:
    return WorkdirInUse(f"{workdir} is in use by another training run ({_holder_text(raw_holder)}); wait for it "
                        "to end or stop it, or train into another --workdir")


class WorkdirLock:
    """The lock of one workdir: `acquire()` (WorkdirInUse if held) and `release()`.

    The workdir must exist. The holder's record ({"host", "pid", "started"}) is written into
    the lock file once the lock is taken.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        key = os.path.realpath(self.path)
        if key in _HELD:  # opening the file again here would drop the lock on close
            raise _refusal(self.workdir, _HELD[key])
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raw = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            if e.errno in _HELD_ELSEWHERE:
                raise _refusal(self.workdir, raw) from None
            if e.errno in _NO_LOCKS:
                log.warning("%s: the file system takes no locks (%s): nothing stops a second run on this workdir",
                            self.path, os.strerror(e.errno))
                return
            raise
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (record + "\n").encode(), 0)
        os.fsync(fd)  # other hosts read the record
        self._fd = fd
        _HELD[key] = record

    def release(self) -> None:
        """Drops the lock (the file and its record stay: they lock nothing)."""
        if self._fd is None:
            return
        _HELD.pop(os.path.realpath(self.path), None)
        os.close(self._fd)
        self._fd = None


@contextlib.contextmanager
def held_by_run(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds `workdir` (which process 0 has created) for one run, or raises WorkdirInUse.

    Process 0 takes the lock; with several processes the others take none, and learn from
    process 0 whether it got it, so that all of them refuse together.
    """
    lock = WorkdirLock(workdir)
    refusal = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirInUse as e:
            refusal = e
    if jax.process_count() > 1:
        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
        if refused and refusal is None:
            # This process holds no lock on the file, so reading it drops none.
            refusal = _refusal(lock.workdir, lock.path.read_text(errors="replace"))
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        lock.release()
