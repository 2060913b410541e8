"""One run of a job at a time: an exclusive ``flock`` on a file beside the ledger."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from pipeline.errors import LockedError, SpecError


class JobLock:
    """An exclusive ``flock`` on a file beside the ledger.

    The kernel drops the lock when its process dies, however it dies, so a stale lock from a killed
    run is simply taken over by the next one: no PID guessing, no cleanup step in cron.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SpecError(
                f"{self.path}: cannot create the job's lock file ({exc.strerror}); make its folder writable "
                "or set job.ledger to a writable place"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockedError(
                f"{self.path}: job is already running (pid {holder}); this run exits without sending"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
