"""One writer per folder: an advisory lock on a file inside it, held for as long as the writing process lives.

The lock is a POSIX record lock (``fcntl.lockf``): the kernel releases it when the process ends, however it ends
(``kill -9`` included), so a lock file left behind by a dead process never blocks the next writer; and, unlike
``flock``, it is not inherited by forked children (DataLoader workers, packing processes), which could outlive a
killed parent for a moment and hold the folder meanwhile. It also works on NFS. The lock file holds the holder's
process id, for the message a second writer gets. Where ``fcntl`` is missing (Windows) no lock is taken.

Example::

    with folder_lock(run_dir / ".fastface_run.lock", run_dir, "run folder", "give another hydra.run.dir"):
        ...  # this process is the folder's only writer
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from fastface_pl.errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["FolderInUseError", "FolderLock", "folder_lock", "remove_stale_temporaries"]


class FolderInUseError(UsageError, ValueError):
    """Another live process holds the folder's lock; the message names the folder, the process and the fix."""


class FolderLock:
    """An exclusive lock on ``lock_path`` (created), taken at once or refused with :class:`FolderInUseError`.

    Args:
        lock_path: The lock file, inside the folder it guards.
        folder: The folder, for the message.
        what: What the folder is ("run folder", "pack folder").
        fix: What the user can do instead, for the message.
    """

    def __init__(self, lock_path: Path, folder: Path, what: str, fix: str) -> None:
        self.lock_path, self.folder, self.what, self.fix = Path(lock_path), Path(folder), what, fix
        self._fd: Optional[int] = None

    def acquire(self) -> "FolderLock":
        if fcntl is None or self._fd is not None:
            return self
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUseError(
                f"the {self.what} {self.folder} is in use by process {holder} (lock {self.lock_path}): wait for that "
                f"process to end or stop it, or {self.fix}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the file stays: removing it would race with a process waiting to lock it)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases this process's lock on it
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


@contextmanager
def folder_lock(lock_path: Path, folder: Path, what: str, fix: str) -> Iterator[FolderLock]:
    """:class:`FolderLock` held for the ``with`` block."""
    lock = FolderLock(lock_path, folder, what, fix).acquire()
    try:
        yield lock
    finally:
        lock.release()


_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def remove_stale_temporaries(folder: Path, names: tuple[str, ...] = (), unlocked: bool = False,
                             of: Optional[tuple[str, ...]] = None) -> list[Path]:
    """Remove the temporary files another process left in ``folder`` (``.<name>.tmp-<pid>`` of
    :mod:`fastface_pl.atomic`, and the files named in ``names``). Holding the folder's lock, no other writer is at
    work there, so every such file of another process id is a leftover of a kill; ``unlocked``: only those of
    process ids no longer running on this machine. ``of``: only the temporaries of these file names."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        pid = int(match.group(1)) if match is not None else None
        if pid is not None and of is not None and entry.name.rpartition(".tmp-")[0][1:] not in of:
            pid = None
        stale = (pid is not None and pid != os.getpid() and not (unlocked and _alive(pid))) or entry.name in names
        if stale and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed
