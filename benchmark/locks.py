"""Inter-process locks: a file lock for one machine, a database's advisory lock for several."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from benchmark.errors import UserError


class FileLock:
    """An exclusive inter-process lock on a file (``flock``), held while its descriptor is
    open: others wait for it, and the system lets it go when its holder dies, so a killed
    process leaves no stale lock behind.  Not re-entrant; POSIX only."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, wait: bool = True) -> bool:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:  # an interrupt while waiting
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Let the lock go; nothing when it is not held."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class DatabaseLock:
    """A server's advisory lock (PostgreSQL ``pg_advisory_lock``, MySQL ``GET_LOCK``) held on a
    connection of its own: others wait for it, and the server lets it go when the connection
    drops, so a killed process leaves no stale lock behind."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name
        self._connection = None

    def _execute(self, connection, action: str) -> None:
        from sqlalchemy import text

        digest = hashlib.sha256(self.name.encode()).digest()
        if self.engine.dialect.name == "postgresql":
            key = int.from_bytes(digest[:8], "big", signed=True)  # a bigint names the lock
            connection.execute(text(f"SELECT pg_advisory_{action}(:key)"), {"key": key})
        else:  # MySQL and MariaDB: a name of at most 64 characters; -1 waits for ever
            sql = "SELECT GET_LOCK(:name, -1)" if action == "lock" else "SELECT RELEASE_LOCK(:name)"
            connection.execute(text(sql), {"name": digest.hex()[:60]})

    def acquire(self) -> None:
        # Autocommit: the lock belongs to the session, and no transaction stays open for hours.
        connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            self._execute(connection, "lock")
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    def release(self) -> None:
        """Let the lock go; nothing when it is not held."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                self._execute(connection, "unlock")
            finally:
                connection.close()

    def __enter__(self) -> "DatabaseLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_file_lock(path: Path, seconds: float, what: str) -> FileLock:
    """``FileLock(path)`` acquired within ``seconds``, else a one-line ``UserError`` naming
    ``what`` was being done (a lock file whose holder died is never stale: flock goes with
    the process)."""
    lock, deadline = FileLock(path), time.monotonic() + seconds
    while not lock.acquire(wait=False):
        if time.monotonic() > deadline:
            raise UserError(f"another process has held {path} for over {seconds:.0f} s while "
                            f"{what}")
        time.sleep(0.05)
    return lock
