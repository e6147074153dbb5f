"""Processes started apart, as the nodes of a job start theirs, forked from a server that imported the trainer once.

A process of its own spends about 11.8 CPU-seconds here on imports before its first line (what a tiny untracked run
costs in all), and test_distributed starts 19 such nodes. Each is still a process of its own: its own environment,
gloo connection, signals, stdout and stderr, and exit status. What it skips besides the imports: the interpreter's
start-up, and the atexit handlers a run registers (multiprocessing ends a child with os._exit; temu_dist registers
none).
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from pathlib import Path

_SERVER = mp.get_context("forkserver")
# Imported by the server before it forks; a module it lacks is imported by the node as `python` would.
_SERVER.set_forkserver_preload(["temu_dist.train", "temu_dist.repeat", "tests.nodes"])


def _node(argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """As `python -c CODE ARGS...` or `python -m MODULE ARGS...` would run in cwd, with env and stdout/stderr to
    files."""
    os.chdir(cwd)  # not the server's, which is wherever the first node's test was
    os.environ.clear()
    os.environ.update(env)
    import torch

    if "OMP_NUM_THREADS" in env:  # torch read it as the server imported torch
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    flag, what, *args = argv
    if flag == "-c":
        sys.argv = ["-c", *args]
        exec(compile(what, "<string>", "exec"), {"__name__": "__main__"})
    else:  # -m: the module's `if __name__ == "__main__": sys.exit(main())`
        module = importlib.import_module(what)
        sys.argv = [module.__file__, *args]
        sys.exit(module.main())


@dataclass
class Node:
    argv: list[str]
    process: mp.Process
    out: Path
    err: Path

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def communicate(self, timeout: float) -> tuple[str, str]:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise TimeoutError(f"a node ran over {timeout} s: {self.err.read_text()[-2000:]}")
        return self.out.read_text(), self.err.read_text()

    def kill(self) -> None:
        """SIGKILL, and waits for it to end; nothing, if it has ended."""
        self.process.kill()
        self.process.join()


def start(argv: list[str], env: dict, cwd: Path, folder: Path, name: str) -> Node:
    """A node running argv (["-c", code, ...] or ["-m", module, ...]) in cwd, its output in folder/name.out and
    .err."""
    out, err = folder / f"{name}.out", folder / f"{name}.err"
    process = _SERVER.Process(target=_node, args=(argv, env, str(cwd), str(out), str(err)))
    process.start()
    return Node(argv, process, out, err)
