"""Real processes: 1 versus 2 gloo processes (training and evaluation), a SIGKILLed run resumed, DeepSpeed on CPU.

On the package's tiny backbone. The runs a user launches are launched as a user would (`accelerate launch`, `python -m
temu_dist.train`): 2 processes as 2 machines (launch/multinode.yaml), DeepSpeed, 2-process evaluation, a killed run's
resume. The nodes stopped or refused, and the accumulated pair, are processes forked from a server that imported the
trainer once (tests/nodes.py).
"""
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr
from safetensors.torch import load_file

from temu_dist.config import ConfigError, load_config
from temu_dist.data.splits import SplitSpec
from temu_dist.distributed import (deepspeed_clipping, keep_buffers_in_place, make_accelerator,
                                   process_group_kwargs)
from temu_dist.model.temu import build_model
from temu_dist.pack import PackOptions, pack
from temu_dist.train import train
from tests import nodes
from tests.conftest import tiny_config, write_kadid
from tests.ranks import gather_uneven

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 training images and an odd 7 test images, split by a file so both counts are exact."""
    root = tmp_path_factory.mktemp("kadid")
    labels = write_kadid(root, refs=15, per_ref=1, size=(64, 64))
    names = sorted(labels)
    split_file = root / "split.csv"
    split_file.write_text("name,split\n" + "".join(f"{n},{'train' if i < 8 else 'test'}\n"
                                                   for i, n in enumerate(names)))
    out = root / "shards"
    pack(PackOptions("kadid10k", str(root), str(out), split=SplitSpec("file", file=str(split_file)),
                     shard_size=2, workers=1))
    return str(out)


def _overrides(shards: str, out: Path, *extra: str) -> list[str]:
    return ["model.backbone=TeMu-Tiny-ViT-16", "model.pretrained=null", "model.image_size=64", "model.n_ctx=4",
            "model.prompt=coop", f"data.train={shards}", "data.workers=0", f"out_dir={out}", "name=run",
            "eval.splits=[test]", "eval.batch_size=3", "device=cpu", *extra]


def _run(cmd: list[str], tmp_path: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=env or _env(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _free_port() -> str:
    """A port no other test or program holds: tests run side by side (pytest-xdist)."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return str(free.getsockname()[1])


def _launch(n: int, module: str, args: list[str], tmp_path: Path, config_file: str | None = None,
            env: dict | None = None):
    if n == 1 and config_file is None:
        return _run([sys.executable, "-m", module, *args], tmp_path, env=env)
    launch = ["--config_file", config_file] if config_file else \
        ["--multi_gpu", "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no"]
    return _run([ACCELERATE, "launch", *launch, "--main_process_port", _free_port(), "-m", module, *args], tmp_path,
                env=env)


def _two_machines(tmp_path: Path, args: list[str]) -> list[tuple[str, str]]:
    """`launch/multinode.yaml` for 2 machines of 1 process, both on this host, each machine's command as its node
    runs it: their stdout and stderr (to files: a full pipe would stall one node and with it the other)."""
    port, started = _free_port(), []
    for rank in (0, 1):
        with open(tmp_path / f"machine{rank}.out", "w") as out, open(tmp_path / f"machine{rank}.err", "w") as err:
            started.append(subprocess.Popen(
                [ACCELERATE, "launch", "--config_file", str(REPO / "launch" / "multinode.yaml"), "--num_machines",
                 "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                 "--main_process_port", port, "--mixed_precision", "no", "-m", "temu_dist.train", *args],
                cwd=REPO, env=_env(tmp_path), stdout=out, stderr=err))
    try:
        codes = [p.wait(300) for p in started]
    finally:
        for p in started:
            p.kill()
    outputs = [tuple((tmp_path / f"machine{rank}.{kind}").read_text() for kind in ("out", "err")) for rank in (0, 1)]
    assert codes == [0, 0], [out[-3000:] + err[-3000:] for out, err in outputs]
    return outputs


def _initial(shards: str, out: Path) -> dict:
    """The trainable weights every run starts from (seeded by config.seed)."""
    return build_model(load_config(None, _overrides(shards, out))).trainable_state()


def _weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / "last" / "weights.safetensors"))


# The global batch is the whole training set, so every run sees the same samples per step; MSE + PLCC (taken over all
# processes' samples), no random augmentation, so runs on any number of processes must agree to float precision.
SAME = ["train.epochs=3", "train.batch_size=8", "ldg.enabled=false", "data.flip=false"]


@pytest.fixture(scope="module")
def one_process(shards, tmp_path_factory) -> Path:
    """The run the multi-process runs are held to: one process, SAME."""
    out = tmp_path_factory.mktemp("one")
    # In this process and untracked, as the accumulated and SIGKILLed runs are untracked: a tiny run in a process of its
    # own cost 11.8 CPU-seconds here, nearly all of it imports. The runs held to it launch as users launch them; the
    # two-process, DeepSpeed and repeat runs are tracked, and test_train tracks resumes and stops in every way.
    train(load_config(None, _overrides(shards, out, *SAME, "tracking.enabled=false")))
    return out / "run"


@pytest.mark.xdist_group("one_process")  # on one worker, which trains the fixture once
def test_one_and_two_processes_reach_the_same_weights_and_metrics(shards, one_process, tmp_path):
    # As two nodes of one process each, by the multi-node launch file (slurm.sbatch's), on this host.
    machines = _two_machines(tmp_path, _overrides(shards, tmp_path / "two", *SAME))
    assert "2 process(es)" in machines[0][0]
    for _, err in machines:  # e.g. torch's on the PLCC all_gather
        assert "Warning" not in err, err[-2000:]
    # And in micro-batches of 2 on each, accumulated: PLCC still over the step's 8 samples. Started as two nodes are,
    # without accelerate's launcher: the run above is its test.
    accumulated = _overrides(shards, tmp_path / "accumulated", *SAME, "train.per_device_batch=2",
                             "tracking.enabled=false")
    done = _two_nodes(tmp_path, [accumulated, accumulated])
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-2000:] + done[1].stderr[-2000:]
    assert "x 2 accumulated x 2 process(es)" in done[0].stdout  # one group of two, not two runs of one
    one, two = _weights(one_process), _weights(tmp_path / "two" / "run")
    accumulated = _weights(tmp_path / "accumulated" / "run")
    assert set(one) == set(two) == set(accumulated) == {"layer_logits", "log_tau_w", "prompts.ctx"}
    initial = _initial(shards, tmp_path)
    for name in one:
        assert not torch.equal(one[name], initial[name]), f"{name} never moved"
        torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one[name], accumulated[name], rtol=1e-5, atol=1e-6)

    # Evaluating its best checkpoint with 2 processes: the same 7 samples and metrics as the one process's own
    # evaluation of those weights in training.
    single = json.loads((one_process / "results.json").read_text())["best"]
    # Without ACCELERATE_USE_CPU, as evaluate's docstring launches it: still one group of two, not two runs.
    bare = {k: v for k, v in _env(tmp_path).items() if k != "ACCELERATE_USE_CPU"}
    scores = tmp_path / "scores.csv"
    double = json.loads(_launch(2, "temu_dist.evaluate", ["--checkpoint", str(one_process), "--scores", str(scores)],
                                tmp_path, env=bare).stdout)
    assert single["test"]["count"] == double["test"]["count"] == single["test"]["expected"] == 7
    for key in ("srcc", "plcc", "krcc"):
        assert single["test"][key] == pytest.approx(double["test"][key], abs=1e-6)
    # Each image's score, gathered from both processes: every sample once, in name order, its metrics as reported.
    rows = [line.split(",") for line in scores.read_text().splitlines()[1:]]
    assert [row[1] for row in rows] == sorted({row[1] for row in rows}) and len(rows) == 7
    got = spearmanr([float(row[3]) for row in rows], [float(row[2]) for row in rows]).statistic
    assert got == pytest.approx(double["test"]["srcc"], abs=1e-6)


def test_sigkilled_run_resumes_to_the_results_of_an_unbroken_one(shards, tmp_path):
    args = ["train.epochs=4", "train.batch_size=2", "tracking.enabled=false"]
    # The unbroken run in this process, on one thread as the processes below (OMP_NUM_THREADS=1), so the weights can
    # match to the bit; a process of its own costs 11-12 CPU-seconds here, nearly all of it imports.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(None, _overrides(shards, tmp_path / "whole", *args)))
    finally:
        torch.set_num_threads(threads)
    killed = _overrides(shards, tmp_path / "killed", *args)
    info = tmp_path / "killed" / "run" / "checkpoints" / "last" / "trainer.json"
    proc = nodes.start(["-m", "temu_dist.train", *killed], _env(tmp_path), REPO, tmp_path, "killed")
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.returncode is None:
            if info.exists() and json.loads(info.read_text())["next_epoch"] >= 2:
                break
            time.sleep(0.05)
        assert proc.returncode is None, "the run ended before it could be killed"
    finally:
        proc.kill()  # during epoch 3
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "run" / "results.json").exists()
    # The same command again, as a user types it: resume=auto continues from checkpoints/last.
    _run([sys.executable, "-m", "temu_dist.train", *killed], tmp_path)
    whole = json.loads((tmp_path / "whole" / "run" / "results.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "run" / "results.json").read_text())

    def comparable(history):
        return [{k: h[k] for k in ("epoch", "loss", "lr", "eval")} for h in history]

    assert comparable(resumed["history"]) == comparable(whole["history"])
    assert resumed["best_epoch"] == whole["best_epoch"]
    a, b = _weights(tmp_path / "whole" / "run"), _weights(tmp_path / "killed" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.xdist_group("one_process")  # on one worker, which trains the fixture once
def test_deepspeed_trains_as_one_process_does_on_cpu(shards, one_process, tmp_path):
    env = _env(tmp_path)
    del env["ACCELERATE_USE_CPU"]  # it would turn DeepSpeed off (the trainer refuses it; next test)
    # As the 2-process run, plus accumulation (micro-batches of 2): DeepSpeed scales its loss itself.
    # And clipping at the config's norm, one far above any gradient here, so that the weights are as unclipped.
    done = _launch(2, "temu_dist.train", _overrides(shards, tmp_path / "ds", *SAME, "train.per_device_batch=2",
                                                    "train.grad_clip_norm=1e9"),
                   tmp_path, config_file=str(REPO / "launch" / "deepspeed.yaml"), env=env)
    results = json.loads((tmp_path / "ds" / "run" / "results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]
    assert results["best"]["test"]["count"] == 7
    assert "2 process(es)" in done.stdout and "x 2 accumulated x 2 process(es)" in done.stdout
    # DeepSpeed's engine itself clips at train.grad_clip_norm, not at the launch file's 0.0 (which accelerate drops,
    # leaving DeepSpeed's default of 1.0).
    assert "DeepSpeed ZeRO stage 0, gradient clipping 1000000000.0" in done.stdout
    trained, initial = _weights(tmp_path / "ds" / "run"), _initial(shards, tmp_path)
    one = _weights(one_process)
    for name in initial:
        assert not torch.equal(trained[name], initial[name]), f"{name} never moved"
        torch.testing.assert_close(trained[name], one[name], rtol=1e-5, atol=1e-6)


def _start_nodes(tmp_path: Path, args: list[list[str]], code: str | None = None) -> list[nodes.Node]:
    """Two processes started apart, as two nodes each start their own (RANK 0 and 1, each LOCAL_RANK 0), with args
    of their own: what a job whose nodes were given different commands runs. `code`: Python run in place of
    `python -m temu_dist.train`, with the args in sys.argv."""
    port = _free_port()
    started = []
    for rank, extra in enumerate(args):
        env = dict(_env(tmp_path), RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        command = ["-c", code] if code else ["-m", "temu_dist.train"]
        started.append(nodes.start([*command, *extra], env, REPO, tmp_path, f"node{rank}"))
    return started


def _two_nodes(tmp_path: Path, args: list[list[str]]) -> list[subprocess.CompletedProcess]:
    started = _start_nodes(tmp_path, args)
    outputs = [p.communicate(timeout=300) for p in started]
    return [subprocess.CompletedProcess(p.argv, p.returncode, *out) for p, out in zip(started, outputs)]


def _stopped_nodes(tmp_path: Path, args: list[list[str]], code: str) -> list[tuple[str, str]]:
    """Two nodes running `code`, each of which must stop by SIGTERM (exit 143): their stdout and stderr."""
    procs = _start_nodes(tmp_path, args, code)
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [143, 143], [err[-2000:] for _, err in outputs]
    return outputs


# Each rank trains as `python -m temu_dist.train` would, with the SIGTERM sent where the test says.
SIGNALLED = """
import os, signal, sys, time
import temu_dist.train as train

def calls(real, n, then):
    def hook(*args, **kwargs):
        hook.calls += 1
        if hook.calls == n:
            then()
        return real(*args, **kwargs)
    hook.calls = 0
    return hook

def sigterm():
    os.kill(os.getpid(), signal.SIGTERM)

rank = os.environ["RANK"]
{patch}
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("patch, position", [
    # Rank 1 signalled as it reads epoch 2's step 2 (4 steps an epoch).
    ("if rank == '1': train.training_inputs = calls(train.training_inputs, 6, sigterm)", "epoch 2, after its step 2"),
    # Rank 1 signalled once epoch 2 is evaluated (as it weighs the epoch's score), while rank 0 takes 2 s over the
    # epoch's checkpoint and log line.
    ("if rank == '1': train.better = calls(train.better, 2, sigterm)\n"
     "else: train._log_line = calls(train._log_line, 2, lambda: time.sleep(2))", "after epoch 2"),
    # Rank 0 signalled as it starts its MLflow run, while rank 1 waits in the first step: at the first step's end.
    ("if rank == '0': train.Tracker = calls(train.Tracker, 1, sigterm)", "epoch 1, after its step 1"),
    # Rank 1 signalled in the checks before training, while rank 0 goes on to the next collective: before the run.
    ("if rank == '1': train.check_data = calls(train.check_data, 1, sigterm)", None),
])
def test_a_sigterm_to_one_process_stops_both_at_the_same_place_with_its_checkpoint_saved(shards, tmp_path, patch,
                                                                                         position):
    """Before, the process signalled left alone, and the other waited at its next collective until the timeout (30
    minutes) or SIGKILL; or, signalled after its last step, its epoch's checkpoint, or before training (in its checks,
    as it started its MLflow run), it left the others to fail."""
    base = _overrides(shards, tmp_path / "runs", "tracking.enabled=false", "train.epochs=3", "train.batch_size=2")
    outputs = _stopped_nodes(tmp_path, [base, base], SIGNALLED.format(patch=patch))
    last = tmp_path / "runs" / "run" / "checkpoints" / "last"
    said = "stopped by SIGTERM before its first checkpoint; the same command starts it anew" if position is None \
        else f"stopped by SIGTERM; run the same command again to go on from {last} ({position})"
    for _, err in outputs:  # both nodes say where they stopped
        assert err.endswith(f"\ntrain: {said}\n"), err[-2000:]
    if position is None:  # stopped before the run folder was touched
        assert not (tmp_path / "runs" / "run").exists()
    if position != "epoch 2, after its step 2":
        return  # the other stops' resumes are in-process tests' (test_train); the suite's time is short
    resumed = _two_nodes(tmp_path, [base, base])
    assert [d.returncode for d in resumed] == [0, 0], resumed[0].stderr[-2000:]
    results = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]


def test_nodes_given_other_settings_or_a_run_folder_not_shared_stop_alike_with_one_line(shards, tmp_path):
    """Before, both trained and exited 0: apart under one run's name, or checkpointing on node 0 alone."""
    run = tmp_path / "runs"
    base = _overrides(shards, run, "tracking.enabled=false")
    # 64 and [64, 64] are one image size: the first setting that differs is train.lr.
    done = _two_nodes(tmp_path, [base, [*base, "model.image_size=[64, 64]", "train.lr=0.5"]])
    assert [d.returncode for d in done] == [1, 1]
    assert all(d.stderr.endswith("train: train.lr: process 1 (on {}) was given 0.5, process 0 0.002: start every node "
                                 "with the same config and overrides\n".format(os.uname().nodename)) for d in done)
    # A folder node 1 does not see, as one private to node 0 would be: here another path.
    done = _two_nodes(tmp_path, [base, _overrides(shards, tmp_path / "elsewhere", "tracking.enabled=false")])
    assert [d.returncode for d in done] == [1, 1]
    assert all(f"out_dir: 1 process(es) on {os.uname().nodename} (rank 1) do not see the file process 0 wrote in "
               f"{run} " in d.stderr for d in done)
    assert not any(run.iterdir())  # the probe gone, no run folder made


# Rank 1 signalled as its first split's training returns: before the next one's starts.
SIGNALLED_BETWEEN_SPLITS = """
import os, signal, sys
import temu_dist.repeat as repeat

def first_then_sigterm(real):
    def hook(*args, **kwargs):
        out = real(*args, **kwargs)
        if not hook.done and os.environ["RANK"] == "1":
            hook.done = True
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    hook.done = False
    return hook

repeat.train = first_then_sigterm(repeat.train)
sys.exit(repeat.main(sys.argv[1:]))
"""


def test_repeat_on_two_processes_stops_together_between_splits_and_goes_on_to_one_parent_run(shards, tmp_path):
    """Before, the process signalled between splits stopped alone, and the other failed in the next split's first
    collective."""
    import mlflow

    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "split0").symlink_to(shards)
    root = Path(shards).parent  # the KADID-like images the shards fixture packed: split 1 trains on others
    names = sorted(line.split(",")[0] for line in (root / "split.csv").read_text().splitlines()[1:])
    (tmp_path / "split1.csv").write_text("name,split\n" + "".join(f"{n},{'train' if i >= 7 else 'test'}\n"
                                                                   for i, n in enumerate(names)))
    pack(PackOptions("kadid10k", str(root), str(packs / "split1"),
                     split=SplitSpec("file", file=str(tmp_path / "split1.csv")), shard_size=2, workers=1))
    config = tmp_path / "series.yaml"
    config.write_text("name: rep\n")
    args = ["--config", str(config), "--splits", "2",
            *_overrides(str(packs / "split{split}"), tmp_path / "runs", "train.epochs=1", "train.batch_size=4",
                        "name=rep")]
    outputs = _stopped_nodes(tmp_path, [args, args], SIGNALLED_BETWEEN_SPLITS)
    for _, err in outputs:
        assert err.endswith("\nrepeat: stopped by SIGTERM in split 2/2; run the same command again: finished splits "
                            "are kept, split 2 starts anew\n"), err[-2000:]
    runs = tmp_path / "runs"
    assert (runs / "rep-split0" / "results.json").is_file() and not (runs / "rep-split1").exists()

    done = _launch(2, "temu_dist.repeat", args, tmp_path)
    assert done.stdout.count("repeat: results in") == 1
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("temu-dist").experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("temu.repeat") == "true"]
    assert sorted((r.info.run_name, r.info.status) for r in found if r.data.tags.get("mlflow.parentRunId") ==
                  parent.info.run_id) == [("rep-split0", "FINISHED"), ("rep-split1", "FINISHED")]
    assert parent.info.status == "FINISHED" and len(found) == 3


def test_deepspeed_with_accelerate_told_cpu_is_refused(monkeypatch):
    # accelerate would run plain data parallel instead, quietly, with none of the DeepSpeed checks.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(ConfigError, match="ACCELERATE_USE_CPU=true turns DeepSpeed off"):
        make_accelerator(load_config(None, ["device=cpu"]))


def test_deepspeed_clips_at_the_configs_norm_and_a_launch_file_asking_another_is_refused():
    clipping = {}
    deepspeed_clipping(clipping, load_config(None, ["train.grad_clip_norm=0.5"]))
    # accelerate leaves out a launch file's 0.0, where DeepSpeed would clip at its default of 1.0.
    assert clipping == {"gradient_clipping": 0.5}
    unset = {"gradient_clipping": "auto"}
    deepspeed_clipping(unset, load_config(None, []))
    assert unset == {"gradient_clipping": 0.0}
    with pytest.raises(ConfigError, match=r"^train.grad_clip_norm: 0.0, where the launch file's deepspeed_config asks "
                                          r"for gradient_clipping 1.0: set train.grad_clip_norm=1.0"):
        deepspeed_clipping({"gradient_clipping": 1.0}, load_config(None, []))
    agreed = {"gradient_clipping": 1.0}
    deepspeed_clipping(agreed, load_config(None, ["train.grad_clip_norm=1"]))
    assert agreed == {"gradient_clipping": 1.0}


def test_the_launchers_gradient_accumulation_steps_is_refused_where_the_config_plans_other(monkeypatch):
    # It went without a word: the run accumulated as its config planned, not as the flag said.
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(ConfigError, match=r"^--gradient_accumulation_steps 4 \(the launcher's\): train.batch_size 32 "
                                          r"is 32 per process x 1 accumulated x 1 process\(es\); leave the flag out "
                                          r"and give train.per_device_batch=8 for 4 steps$"):
        make_accelerator(load_config(None, ["device=cpu"]))
    # A launch file's 1, or the plan's own: dropped, so the plan's accumulation is the one used.
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    accelerator, plan = make_accelerator(load_config(None, ["device=cpu", "train.per_device_batch=16"]))
    assert accelerator.gradient_accumulation_steps == plan.accumulation == 2
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in os.environ


@pytest.mark.parametrize("cuda, backend", [(True, "nccl"), (False, "gloo")])
def test_the_process_group_settings_carry_the_configured_timeout_for_either_backend(cuda, backend):
    (kwargs,) = process_group_kwargs(load_config(None, ["train.timeout_min=45"]), 2, cuda)
    assert (kwargs.backend, kwargs.timeout) == (backend, timedelta(minutes=45))
    assert process_group_kwargs(load_config(None, []), 1, cuda) == []
    # What accelerate hands torch: it leaves out a value equal to its own default (10 minutes).
    (kwargs,) = process_group_kwargs(load_config(None, ["train.timeout_min=10"]), 2, cuda)
    assert kwargs.to_kwargs()["timeout"].total_seconds() == pytest.approx(600, abs=0.01)


def test_processes_with_different_numbers_of_distorted_images_gather_them_all_with_gradients(tmp_path):
    # LDG at p < 1 leaves each process its own number of scores for the PLCC over all of them.
    torch.multiprocessing.spawn(gather_uneven, args=(int(_free_port()), str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for g in got:
        assert g["both"].tolist() == [[v, -v] for v in (1.0, 1.0, 2.0, 3.0, 4.0)]
    # Both processes' losses reach each value: twice its place.
    assert got[0]["grad"].tolist() == [2.0]
    assert got[1]["grad"].tolist() == [4.0, 6.0, 8.0, 10.0]


def test_ddp_leaves_the_models_constant_buffers_where_they_are(monkeypatch, tmp_path):
    # DDP's default sent every buffer from process 0 before each forward: with the fp8 tower, its weights (737,702
    # bytes a forward for the tiny tower, about 300 MB for ViT-L-14; measured on 2 CPU processes).
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'group'}")
    try:
        model = build_model(tiny_config("model.precision=bf16", "model.tower_fp8=true", "model.prompt=coop"))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        sent = []
        monkeypatch.setattr(ddp, "_distributed_broadcast_coalesced", lambda tensors, *a, **k: sent.append(tensors))
        ddp(torch.randn(2, 3, 64, 64)).score.sum().backward()
        assert sent  # DDP's own default
        sent.clear()
        keep_buffers_in_place(torch.compile(ddp))  # as accelerate's dynamo backend would hand it back: DDP inside
        ddp(torch.randn(2, 3, 64, 64)).score.sum().backward()
        assert sent == []
    finally:
        torch.distributed.destroy_process_group()


def test_cuda_asked_for_where_torch_finds_none_is_one_line_not_a_run_on_the_cpu(monkeypatch):
    from temu_dist.config import ConfigError
    from temu_dist.distributed import make_accelerator
    from tests.conftest import tiny_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device: cuda, but torch finds no GPU \(torch.cuda.is_available\(\) is "
                                          r"False\): check the driver"):
        make_accelerator(tiny_config("device=cuda"))


def test_an_fp16_tower_under_a_bf16_launch_is_refused_before_training(monkeypatch):
    # Autocast would run each of its matmuls in bf16 after all, casting the weights anew every step.
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(True)  # an earlier test's Accelerator set this process's mixed precision
    try:
        with pytest.raises(ConfigError, match=r"^model.precision=fp16 under the launch file's mixed_precision bf16 "
                                              r"runs the tower in bf16: launch with --mixed_precision fp16 \(or no\)$"):
            make_accelerator(load_config(None, ["device=cpu", "model.precision=fp16"]))
        make_accelerator(load_config(None, ["device=cpu", "model.precision=bf16"]))
    finally:
        AcceleratorState._reset_state(True)  # and this one's, for the next test
