"""Writing files so that nothing is lost: atomic file and directory replacement, and the workdir lock.

A file is written to a temporary name in its directory, flushed to disk and renamed over the target,
so a reader (or a crash at any moment) sees the old file or the new one, never a torn one. A directory
is built beside its target and swapped in; the old copy is removed only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path`` to write; on success it is flushed and renamed to ``path``."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what open() would have given, not mkstemp's 0600
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> str:
    """Calls ``write(f)`` on a temporary file beside ``path``, then renames it to ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            write(f)
    return os.path.abspath(path)


def write_json(path: str, obj: Any) -> str:
    """``obj`` as indented JSON, atomically."""
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), "w")


def write_text(path: str, text: str) -> str:
    return atomic_write(path, lambda f: f.write(text), "w")


@contextlib.contextmanager
def replace_dir(dst: str, *, overwrite: bool, may_replace: Callable[[str], bool] = lambda p: True) -> Iterator[str]:
    """Yields a fresh temporary directory beside ``dst``; on success it becomes ``dst``.

    An existing ``dst`` is refused unless ``overwrite``, and even then only if ``may_replace(dst)``
    (or it is an empty directory). The old ``dst`` is renamed aside, the new one renamed in, and only
    then is the old one deleted; on any error the temporary directory is removed and ``dst`` is untouched.
    A symlink ``dst`` stays a link: the directory it points to is the one replaced. Files written into the
    new directory get the mode ``open()`` gives (whatever mode their writer created them with).
    """
    dst = os.path.realpath(dst) if os.path.islink(dst) and os.path.isdir(dst) else os.path.abspath(dst)
    if os.path.lexists(dst):
        if not overwrite:
            raise FileExistsError(f"{dst} exists; pass overwrite (--overwrite) to replace it")
        if not (os.path.isdir(dst) and (not os.listdir(dst) or may_replace(dst))):
            raise FileExistsError(f"{dst} exists and is not what this would replace; refusing to overwrite it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        for d, _, names in os.walk(tmp):
            for name in names:
                if not os.path.islink(os.path.join(d, name)):
                    os.chmod(os.path.join(d, name), 0o666 & ~_umask())
        _fsync_dir(tmp)
        old = None
        if os.path.lexists(dst):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", suffix=".old", dir=parent)
            os.rmdir(old)
            os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            if old is not None:
                os.rename(old, dst)  # put the old one back
            raise
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once, at import: setting the umask to read it would race with threads creating files.
_UMASK = _read_umask()


def _umask() -> int:
    return _UMASK


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or a very large number if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def free_disk(path: str) -> int:
    """Bytes free for writing in the file system holding ``path`` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class WorkdirInUse(RuntimeError):
    """Another live process holds the workdir's lock."""


class WorkdirLock:
    """An exclusive lock on a workdir: ``workdir/.lock`` (or ``name``) held with ``flock`` and naming its holder.

    The kernel drops an ``flock`` when its process dies (kill -9 included), so a lock file left by a
    dead process is stale by construction and is simply taken over. A live holder makes
    :meth:`acquire` raise :class:`WorkdirInUse` naming its pid, host and start time.
    """

    def __init__(self, workdir: str, name: str = ".lock"):
        self.path = os.path.join(os.path.abspath(workdir), name)
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            raise WorkdirInUse(f"workdir {os.path.dirname(self.path)!r} is in use by {self.holder()}; "
                               "wait for it to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def holder(self) -> str:
        try:
            with open(self.path) as f:
                h = json.load(f)
            return f"pid {h['pid']} on host {h['host']} (since {h['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return f"another process (lock file {self.path})"

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
