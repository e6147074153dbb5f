"""How the long-running commands (pack, train, repeat, tune, evaluate, predict) stop: SIGTERM (SLURM's scancel and time
limit, docker stop, kill) met as Ctrl-C is, and the exit status a shell gives either. Without torch, so that pack stays
light."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, met as Ctrl-C is: the MLflow run ends KILLED and the command says how to go on, where the signal's
    default would end the process on the spot."""


# Whether SIGTERM came within the current sigterm_as_ctrl_c: a Terminated raised inside Ray's waits (C code) comes
# out of them as a plain KeyboardInterrupt.
_sigterm = False


def _terminate(signum, frame) -> None:
    global _sigterm
    _sigterm = True
    # The same SIGTERM ends the DataLoader workers (scancel and the launcher signal the whole group), and torch's
    # SIGCHLD handler would raise "worker killed" inside the cleanup that follows: an MLflow run was left RUNNING.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    raise Terminated


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within (an entry point's work), SIGTERM raises Terminated; the caller's own handlers are back after."""
    global _sigterm
    _sigterm = False
    child = signal.getsignal(signal.SIGCHLD)
    before = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
        if child is not None:  # None: one set outside Python, which cannot be put back
            signal.signal(signal.SIGCHLD, child)


def by_sigterm(e: KeyboardInterrupt) -> bool:
    """Whether SIGTERM, rather than Ctrl-C, stopped the work."""
    return isinstance(e, Terminated) or _sigterm


def stop_code(e: KeyboardInterrupt) -> int:
    """An entry point's exit status when stopped: a shell's, 128 + SIGTERM or 130 (SIGINT)."""
    return 128 + signal.SIGTERM if by_sigterm(e) else 130
