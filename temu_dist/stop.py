"""How the long-running commands (pack, train, repeat, tune, evaluate, predict) stop: SIGTERM (SLURM's scancel and time
limit, docker stop, kill) met as Ctrl-C is, and the exit status a shell gives either. Without torch, so that pack stays
light."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, met as Ctrl-C is: the MLflow run ends KILLED and the command says how to go on, where the signal's
    default would end the process on the spot."""


_came = False  # whether SIGTERM came within the current sigterm_as_ctrl_c
_deferred = False  # within sigterm_at_step_ends: SIGTERM is noted in _asked, not raised
_asked = False


def _no_news(signum, frame) -> None:
    """SIGCHLD while stopping. A Python handler, not SIG_DFL: a SIGCHLD already pending for torch's handler would
    raise "Signal 17 ignored due to race condition" where Python meets it."""


def _terminate(signum, frame) -> None:
    global _came, _asked
    _came = True
    # The same SIGTERM may end the DataLoader workers (scancel and the launcher signal the whole group), and torch's
    # SIGCHLD handler would raise "worker killed" inside the cleanup that follows (an MLflow run was left RUNNING),
    # or in a __del__ as the process ends: the process is stopping, a worker's death is no news. Not put back.
    signal.signal(signal.SIGCHLD, _no_news)
    if _deferred:
        _asked = True
        return
    raise Terminated


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within (an entry point's work), SIGTERM raises Terminated, and comes out as Terminated where C code (Ray's
    waits) made a plain KeyboardInterrupt of it; the caller's own SIGTERM handler is back after."""
    global _came
    _came = False
    before = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except KeyboardInterrupt as e:
        if _came and not isinstance(e, Terminated):
            raise Terminated from e
        raise
    finally:
        signal.signal(signal.SIGTERM, before)
        _came = False


@contextmanager
def sigterm_at_step_ends() -> Iterator[Callable[[], bool]]:
    """Within (train(), under sigterm_as_ctrl_c), SIGTERM is noted, not raised: the processes ask the function this
    yields where they agree (after their checks, at each step) and stop there, with a checkpoint saved once training
    has begun; SLURM's time limit gives 30 s (KillWait) before SIGKILL. A second SIGTERM does not hurry it: torchrun's
    agent forwards the one each worker has already had. A SIGTERM noted and not acted on is raised on leaving. Ctrl-C
    still stops at once. Within another (repeat's series, whose splits' trainings it spans), one noted between two
    trainings, or in one after its last agreement, is kept for the next training's first agreement (or the series'
    end): a process that left alone left the others to fail in that training's first collective."""
    global _deferred, _asked
    outer = _deferred
    _deferred, _asked = True, _asked and outer  # the series' noted SIGTERM carries in
    try:
        yield lambda: _asked
    finally:
        asked, _deferred, _asked = _asked, outer, _asked and outer  # and out, to the series
    if asked and not outer:
        raise Terminated


@contextmanager
def sigterm_at_once() -> Iterator[None]:
    """Within sigterm_at_step_ends, a stretch with no step to end at (an evaluation): SIGTERM raises at once, as does
    one noted before it; after it, SIGTERM is noted again (a save on the way out is not cut short by a second one)."""
    global _deferred
    if not _deferred:
        yield
        return
    if _asked:
        raise Terminated
    _deferred = False
    try:
        yield
    finally:
        _deferred = True


def sigterm_from_the_trainer_only(worker_id: int) -> None:
    """A DataLoader's worker_init_fn: the worker ends on its trainer's SIGTERM (the loader's shutdown, Python's exit
    handler) and lets any other pass. scancel signals the whole group, and torch's handler let a worker die of it
    while its trainer, deferring the same signal to the step's end, waited on it for the batch ("exited
    unexpectedly", nothing saved). Ignoring SIGTERM outright hung the trainer's exit, which ends its workers with it.
    Processes the worker starts inherit the block: the data code starts none (no webdataset pipe: URLs).
    This holds for workers started by fork (Linux's default before Python 3.14). Under spawn and forkserver (macOS;
    3.14 on Linux) a thread the worker started before its init may take the signal with torch's handler, and a group
    SIGTERM ends the fork server, whose workers torch's watchdog then ends: as before, a stop may fail there."""
    if not hasattr(signal, "sigwaitinfo"):  # macOS: torch's handler stays
        return
    # Not getppid(): under forkserver (Python 3.14's default on Linux) the worker's parent is the fork server.
    trainer = mp.parent_process().pid
    # A Python handler cannot see who sent a signal: the worker blocks SIGTERM, and a thread takes each with its sender.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_sigterm_from, args=(trainer,), name="sigterm", daemon=True).start()


def _end_on_sigterm_from(trainer: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != trainer:
        pass
    os._exit(0)  # as torch's handler does for its parent's SIGTERM: the worker has nothing of its own to save


def stop_code(e: KeyboardInterrupt) -> int:
    """An entry point's exit status when stopped: a shell's, 128 + SIGTERM or 130 (SIGINT)."""
    return 128 + signal.SIGTERM if isinstance(e, Terminated) else 130
