"""One job at a time in a folder (a run's, a pack's): an flock on a file in it, which the OS lets go however the job
ends (kill -9 too), naming the process that holds it."""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO


class Busy(Exception):
    """Another process holds the lock; the message names it."""


class NoLocks(Exception):
    """The filesystem has no locks to give (NFS without lockd, Lustre mounted -o noflock); the message says why."""


def take(path: Path) -> IO[str]:
    """The file at `path`, locked, naming this process in it; let_go() gives it back. Busy where another process
    still holds it after a quarter of a second."""
    handle = open(path, "a+", encoding="utf-8")
    # Tried again for a moment: holder()'s look (report's) holds the lock shared for an instant, and the file then
    # names the job before, which is not there.
    for wait in (0.01, 0.05, 0.2, None):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if wait is None:
                handle.seek(0)
                holder = handle.read().strip() or "a process that did not say which"
                handle.close()
                raise Busy(holder) from None
            time.sleep(wait)
        except OSError as e:  # ENOLCK, ENOSYS
            handle.close()
            raise NoLocks(e.strerror) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def let_go(handle: IO[str]) -> None:
    # Unlocked, not only closed: processes forked meanwhile (data workers) hold a copy of the descriptor, and the lock.
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def holder(path: Path) -> str | None:
    """Who holds the lock at `path` now, if anyone: a look that leaves it as it was."""
    try:
        handle = open(path, encoding="utf-8")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "a process that did not say which"
        except OSError:
            return None
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None
