"""Writing files so that a crash at any instant leaves the old content or the new, never a mix;
and one writer per folder (`FolderLock`)."""

from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path

LOCK_FILE = ".lock"


def _default_mode() -> int:
    """The mode open() gives a new file now (0o666 less the umask)."""
    try:  # Linux names the umask without changing it; os.umask must set it to read it
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def temporary_file_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file in ``path``'s folder, with the permissions a plain
    ``open(path, "w")`` would have given (the umask's, not mkstemp's owner-only 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, _default_mode())
    except OSError:  # a file system without permissions: keep what it gave
        pass
    return fd, tmp


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data``: written to a temporary file beside it, fsynced, renamed."""
    path = Path(path)
    fd, tmp = temporary_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class FolderInUseError(OSError):
    """Another process holds the folder's lock; ``holder`` is its pid when it wrote one."""

    def __init__(self, folder: Path, holder: int | None):
        super().__init__(errno.EAGAIN, f"{folder} is locked by {f'pid {holder}' if holder else 'another process'}")
        self.folder, self.holder = folder, holder


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, held until `release` (or the process ends).

        with FolderLock(folder):
            ...  # write there

    The kernel drops the lock when its process dies, however it dies, so a lock left by a killed
    process is simply taken over (the file's stale pid is overwritten). A held lock is a
    FolderInUseError naming the holder's pid; a folder that cannot be made or locked, an OSError.
    On a file system without working ``flock`` (some network mounts) the lock may not exclude
    other machines.
    """

    def __init__(self, folder: str | Path):
        import fcntl

        self._fd: int | None = None  # set first: __del__ runs even when __init__ raises
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            contended = e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
            holder = _read_pid(fd)
            # the holder writes its pid just after taking the lock: give it a moment to be named
            for _ in range(20 if contended else 0):
                if holder:
                    break
                time.sleep(0.05)
                holder = _read_pid(fd)
            os.close(fd)
            if contended:
                raise FolderInUseError(self.folder, holder) from None
            raise
        # the pid is for the message of a second process only; the flock is the lock.
        # The file is never deleted: a deleted lock file lets two processes hold two different locks
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # a full disk: the lock holds without the pid
            pass
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()  # an abandoned lock is released, not leaked until the process ends


def lock_holder(folder: str | Path) -> int | None:
    """The pid written in a folder's lock file (for messages; the lock may be stale)."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_pid(fd)
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
