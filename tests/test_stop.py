import os
import signal
import subprocess
import sys
import threading
import time

import pytest

# A dataset whose samples each take 50 ms, for the scripts below.
SLOW = """
import time
import torch

class Slow(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(0.05)
        return i
"""

SCRIPT = SLOW + """
from temu_dist.stop import Terminated, sigterm_as_ctrl_c

with sigterm_as_ctrl_c():
    try:
        for i, _ in enumerate(torch.utils.data.DataLoader(Slow(1000), num_workers=2)):
            if i == 2:
                print("reading", flush=True)
    except Terminated:
        time.sleep(1)  # the cleanup (a checkpoint, MLflow's run), while the workers die of the same signal
        print("cleaned up", flush=True)
"""


def _group_signalled_as_it_reads(proc: subprocess.Popen) -> tuple[str, str]:
    """A script's (stdout, stderr) after SIGTERM to its whole group once it prints "reading", as scancel sends it."""
    try:
        assert proc.stdout.readline() == "reading\n"
        os.killpg(proc.pid, signal.SIGTERM)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_sigterm_to_the_group_lets_the_cleanup_finish_while_the_dataloader_workers_die_of_it():
    """scancel signals the whole group, DataLoader workers too: torch raised "worker killed" inside repeat's cleanup,
    which left its MLflow parent run RUNNING."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out, err = _group_signalled_as_it_reads(proc)
    assert out == "cleaned up\n", err
    assert proc.returncode == 0


def test_the_callers_sigterm_handler_is_back_after_and_sigchlds_stays_as_the_stop_left_it():
    from temu_dist import stop
    from temu_dist.stop import Terminated, sigterm_as_ctrl_c

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        # Without a SIGTERM, SIGCHLD's (torch's, set by the first DataLoader with workers, once a process) is left be.
        with sigterm_as_ctrl_c():
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGCHLD) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is mine
        # After one, torch's would raise "worker killed" in whatever runs next, a __del__ as the process ends too.
        with pytest.raises(Terminated):
            with sigterm_as_ctrl_c():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        assert signal.getsignal(signal.SIGCHLD) is stop._no_news and signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_is_said_as_such_where_c_code_turned_its_exception_into_a_plain_ctrl_c():
    """Ray's waits re-raise what a signal handler raised in them as KeyboardInterrupt: tune said "interrupted" and
    exited 130 where SIGTERM (scancel) stopped it, which a job script reads as a Ctrl-C."""
    from temu_dist.stop import Terminated, sigterm_as_ctrl_c, stop_code

    def stopped(by_signal: bool) -> KeyboardInterrupt:
        try:
            with sigterm_as_ctrl_c():
                try:
                    if not by_signal:
                        raise KeyboardInterrupt  # Ctrl-C (SIGINT may be ignored in a test run in the background)
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)
                except Terminated:
                    raise KeyboardInterrupt  # as Ray's check_status re-raises it
        except KeyboardInterrupt as e:
            return e
        raise AssertionError("not stopped")

    e = stopped(True)
    assert type(e) is Terminated and stop_code(e) == 143
    e = stopped(False)  # a later Ctrl-C is one
    assert type(e) is KeyboardInterrupt and stop_code(e) == 130


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # how Python reports it there
def test_a_sigchld_pending_beside_the_sigterm_raises_nothing_in_the_cleanup():
    """A DataLoader worker's death already pending for torch's handler as SIGTERM came: with SIGCHLD set to SIG_DFL,
    Python raised "Signal 17 ignored due to race condition" where it met it (a DeepSpeed run, once per rank)."""
    from temu_dist.stop import Terminated, sigterm_as_ctrl_c

    # To this thread alone: sent to the process, another thread (torch's, tqdm's) could take them unblocked, at once.
    main = threading.get_ident()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
    try:
        with pytest.raises(Terminated):
            with sigterm_as_ctrl_c():
                signal.pthread_kill(main, signal.SIGCHLD)
                signal.pthread_kill(main, signal.SIGTERM)
                signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # torch's, as it stands
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # both at once: SIGTERM's handler runs first
                time.sleep(5)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def test_within_a_training_loop_sigterm_waits_for_the_step_to_end_and_one_not_acted_on_is_raised_on_leaving():
    """A SIGTERM raised mid-step left the step half-done (some weights updated, some not): nothing to checkpoint."""
    from temu_dist.stop import Terminated, sigterm_as_ctrl_c, sigterm_at_step_ends

    def sigterm() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # time for a handler to run, as it would in the middle of a step's work

    with pytest.raises(Terminated):
        with sigterm_as_ctrl_c(), sigterm_at_step_ends() as asked:
            assert not asked()
            sigterm()
            sigterm()  # the launcher's forwarded copy of it does not hurry the stop
            assert asked()
            steps_done = True
    assert steps_done
    with pytest.raises(Terminated):  # outside it, at once again
        with sigterm_as_ctrl_c():
            with sigterm_at_step_ends() as asked:
                pass
            assert not asked()
            sigterm()
            raise AssertionError("not stopped")


def test_an_evaluation_within_training_stops_at_once_and_a_save_after_it_is_not_cut_short():
    from temu_dist.stop import Terminated, sigterm_as_ctrl_c, sigterm_at_once, sigterm_at_step_ends

    def sigterm() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)

    with pytest.raises(Terminated):  # the one noted, on leaving
        with sigterm_as_ctrl_c(), sigterm_at_step_ends() as asked:
            with pytest.raises(Terminated):
                with sigterm_at_once():
                    sigterm()
                    raise AssertionError("not stopped")
            sigterm()  # the launcher's copy, during the save that follows: noted
            assert asked()
            with pytest.raises(Terminated):  # one noted before an evaluation stops it as it begins
                with sigterm_at_once():
                    raise AssertionError("not stopped")


def test_a_sigterm_between_two_trainings_of_a_series_is_kept_for_the_next_and_none_is_lost_after_them():
    from temu_dist.stop import Terminated, sigterm_as_ctrl_c, sigterm_at_step_ends

    def sigterm() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)

    with pytest.raises(Terminated):
        with sigterm_as_ctrl_c(), sigterm_at_step_ends():  # repeat's series
            with sigterm_at_step_ends() as asked:  # split 1's training, not signalled
                assert not asked()
            sigterm()  # between the two: noted, not raised
            with sigterm_at_step_ends() as asked:  # split 2's training, whose first agreement stops it
                kept = asked()
    assert kept
    with pytest.raises(Terminated):  # after a training within the series, the series still defers
        with sigterm_as_ctrl_c(), sigterm_at_step_ends():
            with sigterm_at_step_ends():
                pass
            sigterm()
            series_went_on = True
    assert series_went_on
    with pytest.raises(Terminated):  # one noted in a training after its last agreement: to the next training's first
        with sigterm_as_ctrl_c(), sigterm_at_step_ends():
            with sigterm_at_step_ends():
                sigterm()
            training_returned = True
            with sigterm_at_step_ends() as asked:
                carried = asked()
    assert training_returned and carried


LOADER = SLOW + """
import sys
from temu_dist.stop import Terminated, sigterm_as_ctrl_c, sigterm_at_step_ends, sigterm_from_the_trainer_only

loader = torch.utils.data.DataLoader(Slow(40), num_workers=2, prefetch_factor=1, worker_init_fn=INIT)
if sys.argv[1] == "exit":
    kept = iter(loader)
    next(kept)
    first = kept._workers[0]
    first.terminate()  # the trainer's own SIGTERM, as its loader's shutdown sends a worker that does not end
    first.join(30)
    print([first.exitcode, [w.pid for w in kept._workers]], flush=True)
    sys.exit(0)  # a live iterator left to Python's exit handler, as a test's kept traceback leaves one
try:
    with sigterm_as_ctrl_c(), sigterm_at_step_ends() as asked:
        for i, _ in enumerate(loader):
            if i == 2:
                print("reading", flush=True)
            if asked() and i >= 12:  # a step's end, batches after the signal
                print("stopped at a step's end", flush=True)
                break
except Terminated:
    pass
"""


def _loader_script(init: str, how: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOADER.replace("INIT", init), how], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("init", ["sigterm_from_the_trainer_only", "None"])
def test_a_loaders_workers_leave_a_sigterm_to_the_group_for_the_trainer_to_act_on(init):
    """scancel signals the loader's workers too: torch's handler let them die, and the trainer, waiting for the step's
    batch, failed with "exited unexpectedly" (2 of 5 process-group SIGTERMs to a 2-process demo run)."""
    proc = _loader_script(init, "group")
    out, err = _group_signalled_as_it_reads(proc)
    if init == "None":  # torch's own handler: the worker died of it, and the trainer's next read failed
        # As the signals fall: "exited unexpectedly", "killed by signal: Terminated", or the connection a dying worker
        # was handing a batch over reset (seen once here, with 2 test workers side by side).
        assert proc.returncode == 1 and "torch/utils/data/" in err and out == "", err
    else:
        assert out == "stopped at a step's end\n", err


def test_a_loaders_workers_end_on_their_trainers_sigterm_so_its_exit_does_not_wait_on_them():
    """Python's exit handler ends a process's workers with SIGTERM and joins them: workers that ignored SIGTERM hung
    pytest's exit after "549 passed", on a loader a kept traceback held."""
    proc = _loader_script("sigterm_from_the_trainer_only", "exit")
    try:
        code, workers = eval(proc.stdout.readline())
        assert code == 0  # ended by its own thread, on the trainer's SIGTERM
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:  # gone, or a zombie where the machine's init does not reap orphans
        try:
            with open(f"/proc/{pid}/stat") as f:
                assert f.read().rsplit(")", 1)[1].split()[0] == "Z", f"worker {pid} outlived its trainer"
        except FileNotFoundError:
            pass
