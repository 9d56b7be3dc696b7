"""Exclusive, non-blocking locks on files, so that two processes never write one trajectory at once.

A lock belongs to the file itself (its inode), not to its name: it travels with the file through the
rename that publishes it, and a file that replaces another under the same name starts unlocked.
`FileLock.acquire` therefore checks, once it holds the lock, that the name still leads to the file it
locked, and starts again if not. The locks are advisory: they stop other mezo-replay writers, not
`cp` or an editor.

POSIX systems use flock(2), which the kernel drops when the holder exits however it exits (a SIGKILL
leaves no stale lock), and which Linux lists in /proc/locks with the holder's pid. Windows uses
msvcrt.locking on one byte far past any data the file will hold (a locked region cannot be read by
others there). Elsewhere, or on a filesystem that refuses locks, `acquire` warns once and returns a
lock that holds nothing: creation stays atomic, but nothing stops a second writer.
"""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path
from typing import Union

from ..errors import MezoReplayError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]

PathLike = Union[str, "os.PathLike[str]"]

_WINDOWS_LOCK_OFFSET = 1 << 62  # beyond any byte a trajectory holds, so the lock never blocks a read
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_RETRIES = 16


class FileBusyError(MezoReplayError):
    """Another process holds the file's lock: it is writing (training into, or appending to) the file."""

    def __init__(self, path: PathLike, pid: int | None) -> None:
        self.path, self.pid = Path(path), pid
        who = f"another process (pid {pid})" if pid else "another process"
        super().__init__(f"{path} is being written by {who}: wait for it to finish or stop it")


def _try_lock(fd: int, shared: bool = False) -> bool:
    """True if this call took the lock, False if another open file holds it (or, shared, holds it
    exclusively). Windows has no shared locks here: there `shared` takes an exclusive one."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    if msvcrt is not None:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EDEADLK):
                return False
            raise
        return True
    raise OSError(errno.ENOSYS, "no file locking on this platform")


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    elif msvcrt is not None:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def holder_pid(fd: int) -> int | None:
    """The pid of the process holding a flock on fd's file, where the system says (Linux /proc/locks)."""
    try:
        st = os.fstat(fd)
        with open("/proc/locks", "rb") as f:
            table = f.read(1 << 20).decode("ascii", "replace")
    except OSError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 4795 fe:00:2146357 0 EOF"; waiters read "1: -> FLOCK ..."
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == where:
            pid = int(parts[4]) if parts[4].isdigit() else 0
            return pid if pid > 0 else None  # 0 or -1: a holder outside this pid namespace
    return None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


_warned: set[str] = set()


class FileLock:
    """An exclusive lock on one existing file, held until `release` (or until the process ends)."""

    def __init__(self, path: Path, handle: object | None) -> None:
        self.path, self._handle = path, handle  # handle: an open file, or None where nothing is locked

    @classmethod
    def acquire(cls, path: PathLike, *, shared: bool = False) -> FileLock:
        """Lock the file `path` names now. Raises FileBusyError naming the holder if another process has
        it, FileNotFoundError if there is no such file."""
        path = Path(path)
        for _ in range(_RETRIES):
            handle = open(path, "rb", buffering=0)
            try:
                fd = handle.fileno()
                try:
                    took = _try_lock(fd, shared)
                except OSError as e:
                    if e.errno not in _UNSUPPORTED:
                        raise
                    _warn_unsupported(path, e)
                    handle.close()
                    return cls(path, None)
                if not took:
                    raise FileBusyError(path, holder_pid(fd))
                try:
                    now = os.stat(path)
                except FileNotFoundError:
                    now = None
                if now is not None and _same_file(now, os.fstat(fd)):
                    return cls(path, handle)
            except BaseException:
                handle.close()
                raise
            handle.close()  # the name was given to another file while we locked this one: again
        raise FileBusyError(path, None)  # replaced again and again: someone is busy with it

    @classmethod
    def probe(cls, path: PathLike) -> FileBusyError | None:
        """The error a writer of `path` would get now, or None if the file is free (or gone). Takes a shared
        lock for an instant, so that two probes at once do not both see the file busy."""
        try:
            cls.acquire(path, shared=True).release()
        except FileBusyError as e:
            return e
        except OSError:
            return None
        return None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        """Drop the lock; releasing twice is harmless."""
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                _unlock(handle.fileno())  # type: ignore[attr-defined]
            except OSError:
                pass  # closing drops it anyway
            handle.close()  # type: ignore[attr-defined]

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _warn_unsupported(path: Path, e: OSError) -> None:
    where = str(path.absolute().parent)
    if where not in _warned:
        _warned.add(where)
        warnings.warn(f"{where}: this filesystem does not support file locks ({e.strerror}); nothing stops "
                      f"a second process from writing {path.name} at the same time", stacklevel=3)
