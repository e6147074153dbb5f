import fcntl
import os
import threading

import pytest

from temu_dist import lock


def test_a_job_starting_as_another_command_looks_at_the_lock_takes_it_and_a_held_lock_is_refused_naming_its_holder(
        tmp_path):
    """holder() (report's "still training" look) holds the lock shared for an instant: a training starting then was
    refused, named by the file as the job before it."""
    path = tmp_path / "train.lock"
    lock.let_go(lock.take(path))  # the job before, which the file still names
    looking = open(path, encoding="utf-8")
    fcntl.flock(looking, fcntl.LOCK_SH | fcntl.LOCK_NB)
    threading.Timer(0.05, lambda: (fcntl.flock(looking, fcntl.LOCK_UN), looking.close())).start()
    held = lock.take(path)
    assert lock.holder(path) == path.read_text().strip()
    assert path.read_text().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(lock.Busy, match=f"^pid {os.getpid()} on "):
        lock.take(path)
    lock.let_go(held)
    assert lock.holder(path) is None
