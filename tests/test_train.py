"""train(config) in-process on one CPU process: results, checkpoints, MLflow, resume and the bad-input paths."""
import csv
import json
import math
import os
import re
import signal
import socket
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from temu_dist import stop
from temu_dist.config import ConfigError, dump
from temu_dist.data.splits import SplitSpec
from temu_dist.pack import PackOptions, pack
from temu_dist.tracking import Tracker
from temu_dist.train import NonFiniteLoss, check_lines, train
from tests.conftest import TINY_OVERRIDES, tiny_config, write_kadid


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("kadid")
    write_kadid(root, refs=9, per_ref=3, size=(64, 64))
    out = root / "shards"
    pack(PackOptions("kadid10k", str(root), str(out), split=SplitSpec("ratio", (0.6, 0.2, 0.2), seed=0,
                                                                         by_reference=True), shard_size=5, workers=1))
    return str(out)


def run_overrides(tmp_path, shards, *overrides) -> list[str]:
    return [f"data.train={shards}", f"out_dir={tmp_path}", "name=run", "data.workers=0", "train.epochs=2",
            "train.batch_size=4", "eval.batch_size=5", "ldg.region_min=8", "ldg.region_max=24", *overrides]


def run_config(tmp_path, shards, *overrides):
    return tiny_config(*run_overrides(tmp_path, shards, *overrides))


def test_train_writes_results_checkpoints_plots_and_mlflow(tmp_path, shards):
    results = train(run_config(tmp_path, shards, "model.prompt=coop", "train.log_every=1"))
    run = tmp_path / "run"
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert set(results["best"]) == {"val", "test"}
    assert results["best"]["test"]["count"] == results["best"]["test"]["expected"] > 0
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["best_epoch"] == results["best_epoch"]
    best = max(reversed(results["history"]), key=lambda h: h["eval"]["test"]["srcc"])  # a tie: the later epoch
    assert results["best_epoch"] == best["epoch"]
    for ckpt in ("best", "last"):
        assert set(load_file(str(run / "checkpoints" / ckpt / "weights.safetensors"))) == \
            {"layer_logits", "log_tau_w", "prompts.ctx"}
    assert (run / "plots" / "scatter_test.png").exists() and (run / "plots" / "score_vs_time.png").exists()
    # One store for every run under out_dir, so the UI compares them; artifacts beside it, not in the working folder.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlrun = client.get_run(results["mlflow_run_id"])
    assert mlrun.data.params["model.prompt"] == "coop" and mlrun.data.tags["variant"] == "I"
    assert mlrun.data.tags["dataset"] == "kadid10k"  # the pack's dataset, not its path
    assert mlrun.data.tags["processes"] == "1" and mlrun.data.tags["torch"] == torch.__version__
    assert mlrun.data.tags["distributed"] == "NO"  # accelerate's name, not the enum's repr
    # Where its checkpoints are, which the relative out_dir param does not say.
    assert mlrun.data.tags["run_dir"] == str(run.resolve()) and mlrun.data.tags["host"] == socket.gethostname()
    # The code it ran: this checkout's commit, also where MLflow's own lookup finds none (a search's trials).
    repo = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert mlrun.data.tags["mlflow.source.git.commit"] == head
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "test/srcc")] == [1, 2]
    # The best epoch's results as metrics of their own (the curves' latest values are the last epoch's).
    assert [(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "best/test/srcc")] == \
        [(results["best_epoch"], pytest.approx(results["best"]["test"]["srcc"]))]
    assert mlrun.data.tags["best_epoch"] == str(results["best_epoch"])
    # And each set at its own best epoch by SRCC, as IQA-PyTorch reports it: the key metric's set at the best epoch.
    own = on_disk["own_best"]
    assert own["test"] == {**results["best"]["test"], "epoch": results["best_epoch"]}
    val_best = max(reversed(results["history"]), key=lambda h: h["eval"]["val"]["srcc"])
    assert own["val"] == {**val_best["eval"]["val"], "epoch": val_best["epoch"]}
    assert [(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "own_best/val/srcc")] == \
        [(val_best["epoch"], pytest.approx(own["val"]["srcc"]))]
    # Each epoch's learning rate is its last step's: the cosine schedule's last one is not yet 0.
    assert results["history"][0]["lr"] > results["history"][1]["lr"] > 0
    # The loss every train.log_every steps, on the run's step axis: here each step's, whose mean is its epoch's.
    steps = client.get_metric_history(mlrun.info.run_id, "train/step_loss")
    per_epoch = len(steps) // 2
    assert [m.step for m in steps] == list(range(1, 2 * per_epoch + 1)) and per_epoch > 1
    for epoch, h in enumerate(results["history"]):
        mean = sum(m.value for m in steps[epoch * per_epoch:(epoch + 1) * per_epoch]) / per_epoch
        assert mean == pytest.approx(h["loss"], rel=1e-6)
    lrs = client.get_metric_history(mlrun.info.run_id, "train/step_lr")
    assert lrs[per_epoch - 1].value == pytest.approx(results["history"][0]["lr"])
    assert mlrun.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"results.json", "config.yaml", "plots", "best"} <= artifacts
    again = train(run_config(tmp_path, shards, "model.prompt=coop", "name=other", "train.epochs=1"))
    assert {r.info.run_id for r in client.search_runs([mlrun.info.experiment_id])} == \
        {results["mlflow_run_id"], again["mlflow_run_id"]}


def _comparable(history):
    """What a resumed run must reproduce exactly: per-epoch loss, lr and evaluation (not timings)."""
    return [{k: h[k] for k in ("epoch", "loss", "lr", "eval")} for h in history]


class Interrupted(Exception):
    pass


def stops_after(real, n: float, error: type[BaseException] = Interrupted):
    """`real`, raising `error` on its call n + 1 (never for n = inf); `.calls` counts the calls."""
    def hook(*args, **kwargs):
        hook.calls += 1
        if hook.calls > n:
            raise error
        return real(*args, **kwargs)

    hook.calls = 0
    return hook


def sigterm_on_call(real, n: int):
    """`real`, sending this process SIGTERM as its call n begins (and going on); `.calls` counts the calls."""
    def hook(*args, **kwargs):
        hook.calls += 1
        if hook.calls == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    hook.calls = 0
    return hook


@pytest.fixture
def sigterm_caught():
    """A SIGTERM outside the command's own handling must not end pytest."""
    caller = signal.signal(signal.SIGTERM, lambda *_: None)
    yield
    signal.signal(signal.SIGTERM, caller)


def test_training_on_a_pack_in_its_label_files_order_warns_to_pack_it_again(tmp_path, shards, capsys):
    old = tmp_path / "old"
    shutil.copytree(shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["order"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    train(run_config(tmp_path, str(old), "train.epochs=1"))
    assert f"train: warning: {old} was packed by an earlier temu-dist in its label file's order" in \
        capsys.readouterr().out


def test_a_koniq_pack_of_its_1_to_5_mos_is_warned_of_wherever_the_config_names_it(tmp_path, shards):
    old = tmp_path / "koniq10k"
    shutil.copytree(shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "dataset": "koniq10k"}))  # as packed before 2026-11-29
    lines = check_lines(run_config(tmp_path, shards, f"eval.cross=[{{name: koniq, shards: {old}}}]"))
    assert f"warning: {old} (eval.cross.0.shards) holds koniq10k's labels as an earlier temu-dist packed them, not " \
        "its MOS_zscore, which IQA-PyTorch and papers use: pack it again into a new folder" in lines
    (old / "manifest.json").write_text(json.dumps({**manifest, "dataset": "koniq10k", "mos_column": "MOS_zscore"}))
    assert not any("earlier temu-dist" in line for line in check_lines(run_config(tmp_path, str(old))))


def test_a_second_training_into_a_run_folder_being_written_is_refused_naming_the_first(tmp_path, shards):
    # Both would write its checkpoints, results and MLflow epochs, interleaved (and a kill -9 of a launcher can leave
    # its ranks training on). Held by another process here, as the lock is; let go, the run trains.
    import fcntl

    config = run_config(tmp_path, shards, "train.epochs=1")
    (tmp_path / "run").mkdir()
    code = ("import fcntl, sys, time\n"
            "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.write('pid 1 on node7, since 2026-11-27 10:00:00'); f.flush(); print('held', flush=True)\n"
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run" / "train.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'run'))}: another training is writing this "
                                              r"run folder \(pid 1 on node7, since 2026-11-27 10:00:00\): wait for it "
                                              r"to end or stop it, or give this one another name=$"):
            train(config)
        with pytest.raises(ConfigError, match=r"another training is writing this run folder \(pid 1 on node7"):
            check_lines(config)
        assert not (tmp_path / "run" / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train(config)["history"]
    lock = open(tmp_path / "run" / "train.lock")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go once train() returned
    assert f"pid {os.getpid()} on " in lock.read()


def test_a_run_folder_that_cannot_be_made_is_one_line_on_every_process(tmp_path, shards, monkeypatch):
    # A full disk or a mount that refuses it gave a traceback on the main process; the others would wait for it.
    import errno

    real = Path.mkdir

    def full(self, *args, **kwargs):
        if self == tmp_path / "run":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", full)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'run'))}: cannot write the run folder \(No "
                                          r"space left on device\)$"):
        train(run_config(tmp_path, shards, "train.epochs=1"))


def test_the_run_folder_is_let_go_with_data_workers_alive_and_said_unguarded_where_no_lock_can_be_had(
        tmp_path, shards, monkeypatch, capsys):
    import errno
    import fcntl

    def stop(record):
        raise RuntimeError("stopped after an epoch")

    # The traceback kept (pytest's, a notebook's) keeps the loader's persistent workers, forked with the lock's file.
    config = run_config(tmp_path, shards, "data.workers=1")
    with pytest.raises(RuntimeError, match="stopped after an epoch") as kept:
        train(config, on_epoch=stop)
    assert [h["epoch"] for h in train(config)["history"]] == [1, 2] and kept
    real = fcntl.flock

    def no_locks(fd, operation):
        if operation & fcntl.LOCK_EX:
            raise OSError(errno.ENOLCK, "No locks available")  # NFS without lockd
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert train(run_config(tmp_path, shards, "name=unlocked"))["history"]
    assert f"train: warning: {tmp_path / 'unlocked' / 'train.lock'} cannot be locked (No locks available): a second " \
        "training into this run folder will not be refused" in capsys.readouterr().out


def test_interrupted_run_resumes_to_the_same_results(tmp_path, shards, monkeypatch, capsys):
    whole = train(run_config(tmp_path / "a", shards, "train.epochs=3"))
    import temu_dist.train as train_mod

    real = train_mod.loss_fn
    # 3 micro-batches per epoch: dies at the first one of epoch 3.
    monkeypatch.setattr(train_mod, "loss_fn", stops_after(real, 2 * 3))
    with pytest.raises(Interrupted):
        # Tracked elsewhere at first: the resumed run's store does not hold this MLflow run.
        train(run_config(tmp_path / "b", shards, "train.epochs=3", f"tracking.uri=sqlite:///{tmp_path / 'old.db'}"))
    monkeypatch.setattr(train_mod, "loss_fn", real)
    run = tmp_path / "b" / "run"
    assert train_mod.check_lines(run_config(tmp_path / "b", shards, "train.epochs=3"))[-1] == \
        f"run folder: {run}, resumes from {run / 'checkpoints' / 'last'} (after epoch 2)"
    resumed = train(run_config(tmp_path / "b", shards, "train.epochs=3"))
    assert _comparable(resumed["history"]) == _comparable(whole["history"])
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(resumed["mlflow_run_id"], "train/loss")] == [1, 2, 3]
    # Untracked at first: the resumed run's MLflow run still gets every epoch.
    monkeypatch.setattr(train_mod, "loss_fn", stops_after(real, 2 * 3))
    with pytest.raises(Interrupted):
        train(run_config(tmp_path / "c", shards, "train.epochs=3", "tracking.enabled=false"))
    monkeypatch.setattr(train_mod, "loss_fn", real)
    resumed = train(run_config(tmp_path / "c", shards, "train.epochs=3"))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'c' / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(resumed["mlflow_run_id"], "train/loss")] == [1, 2, 3]
    # Killed after epoch 2's checkpoint, before its metrics reached MLflow: the resumed run logs them.
    logs = Tracker.metrics
    monkeypatch.setattr(Tracker, "metrics", stops_after(logs, 1))
    with pytest.raises(Interrupted):
        train(run_config(tmp_path / "d", shards, "train.epochs=3"))
    monkeypatch.setattr(Tracker, "metrics", logs)
    resumed = train(run_config(tmp_path / "d", shards, "train.epochs=3"))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'd' / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(resumed["mlflow_run_id"], "train/loss")] == [1, 2, 3]
    assert resumed["best_epoch"] == whole["best_epoch"]
    a = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "last" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "checkpoints" / "last" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A finished run run again trains nothing and says so (not "resuming at epoch 4").
    capsys.readouterr()
    results = tmp_path / "a" / "run" / "results.json"
    written = results.stat().st_mtime_ns
    again = train(run_config(tmp_path / "a", shards, "train.epochs=3"))
    assert "has finished its 3 epochs" in capsys.readouterr().out
    assert _comparable(again["history"]) == _comparable(whole["history"])
    # Nor writes or logs its results again.
    assert results.stat().st_mtime_ns == written
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    assert len(client.get_metric_history(again["mlflow_run_id"], "best/val/srcc")) == 1
    assert client.get_run(again["mlflow_run_id"]).info.status == "FINISHED"
    # Into a store that lacks its MLflow run, it logs them there.
    other = train(run_config(tmp_path / "a", shards, "train.epochs=3", f"tracking.uri=sqlite:///{tmp_path / 'o.db'}"))
    logged = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'o.db'}").get_run(other["mlflow_run_id"])
    assert logged.data.tags["best_epoch"] == str(whole["best_epoch"]) and "best/val/srcc" in logged.data.metrics


def test_resume_extend_trains_a_finished_run_further_on_a_cosine_of_the_new_length(tmp_path, shards, capsys):
    first = train(run_config(tmp_path, shards))  # 2 epochs of 3 steps: the cosine ends at 0 after step 6
    before = _files(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^train.epochs: .*last was trained with 2, this run asks for 3; train it "
                                          r"for another number of epochs with train.resume=extend"):
        train(run_config(tmp_path, shards, "train.epochs=3"))
    with pytest.raises(ConfigError, match=r"^train.resume: extend, but .*other holds no run to extend"):
        train(run_config(tmp_path, shards, "train.epochs=3", "train.resume=extend", "name=other"))
    assert _files(tmp_path / "run") == before and not (tmp_path / "other").exists()
    capsys.readouterr()

    def killed_at_epoch_3(record):
        if record["epoch"] == 3:  # its checkpoint written, its results not yet
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(run_config(tmp_path, shards, "train.epochs=3", "train.resume=extend"), on_epoch=killed_at_epoch_3)
    assert "goes from 2 to 3 epochs: from its step 6 on" in capsys.readouterr().out
    # The 2-epoch results went when the extension began: a killed one must not look finished.
    assert not (tmp_path / "run" / "results.json").exists()
    longer = train(run_config(tmp_path, shards, "train.epochs=3"))  # the checkpoint says 3 now: it writes its results
    lr = run_config(tmp_path, shards).train.lr
    assert _comparable(longer["history"][:2]) == _comparable(first["history"])
    # Step 9, the third epoch's last, at a 9-step cosine's rate (the 6-step one had ended at 0), on from its step 6.
    assert longer["history"][2]["lr"] == pytest.approx(lr * (1 + math.cos(math.pi * 8 / 9)) / 2)
    assert longer["extended"] == [{"epochs_from": 2, "epochs_to": 3, "after_step": 6,
                                   "lr_from": pytest.approx(0, abs=1e-12),
                                   "lr_to": pytest.approx(lr * (1 + math.cos(math.pi * 6 / 9)) / 2)}]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["extended"] == longer["extended"]
    assert longer["mlflow_run_id"] == first["mlflow_run_id"]  # the same MLflow run goes on, and says why
    logged = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(longer["mlflow_run_id"])
    assert logged.data.tags["extended"] == "2 -> 3 epochs after step 6" and logged.info.status == "FINISHED"
    assert logged.data.tags["best_epoch"] == str(longer["best_epoch"])
    capsys.readouterr()
    again = train(run_config(tmp_path, shards, "train.epochs=3"))  # what it was extended to is now its own
    assert "has finished its 3 epochs" in capsys.readouterr().out and again["extended"] == longer["extended"]
    with pytest.raises(ConfigError, match=r"^train.epochs: .*last has trained 3 epochs; extend it to more than 3, or "
                                          r"leave it at 3$"):
        train(run_config(tmp_path, shards, "train.epochs=2", "train.resume=extend"))
    # Scored otherwise, its new epochs would not compare with the old.
    with pytest.raises(ConfigError, match=r"^eval.ldg: .*last was scored with False, this run asks for True; an "
                                          r"extended run is scored as its epochs so far were"):
        train(run_config(tmp_path, shards, "train.epochs=4", "train.resume=extend", "eval.ldg=true"))


def test_a_run_warmed_up_with_adamw_resumes_and_extends_on_its_schedule(tmp_path, shards):
    opts = ("train.warmup_steps=2", "train.optimizer=adamw", "train.weight_decay=0.01")
    lr = run_config(tmp_path, shards).train.lr
    first = train(run_config(tmp_path, shards, *opts))  # 2 epochs of 3 steps
    # Each epoch's rate is its last step's: step 2 the cosine's first (lr), step 5 its fourth of 4.
    assert [h["lr"] for h in first["history"]] == pytest.approx([lr, lr * (1 + math.cos(math.pi * 3 / 4)) / 2])
    # Checked with the data (as a search checks its trials before Ray starts), before anything is written: 2 epochs
    # of 3 steps leave no step for the cosine.
    with pytest.raises(ConfigError, match=r"^train.warmup_steps: 6 is not fewer than the run's 6 optimizer steps "
                                          r"\(2 epochs of 3\); lower it$"):
        train(run_config(tmp_path, shards, "train.warmup_steps=6", "name=short"))
    assert not (tmp_path / "short").exists()
    with pytest.raises(ConfigError, match=r"^train.warmup_steps: .*last was trained with 2, this run asks for 3"):
        train(run_config(tmp_path, shards, "train.warmup_steps=3", "train.optimizer=adamw",
                         "train.weight_decay=0.01"))
    # From the checkpoint's scheduler and AdamW state: the cosine after the warmup made 7 steps long at step 6.
    longer = train(run_config(tmp_path, shards, *opts, "train.epochs=3", "train.resume=extend"))
    assert longer["extended"][0]["lr_to"] == pytest.approx(lr * (1 + math.cos(math.pi * 4 / 7)) / 2)
    assert longer["history"][2]["lr"] == pytest.approx(lr * (1 + math.cos(math.pi * 6 / 7)) / 2)


def test_grad_clip_norm_clips_every_step_and_logs_the_norm_found(tmp_path, shards, monkeypatch):
    import temu_dist.train as train_mod

    real, stepped = train_mod.make_optimizer, []

    def recording(model, config):
        optimizer = real(model, config)

        def before_step(optimizer, args, kwargs):  # the gradients the optimizer steps on
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            stepped.append(torch.nn.utils.get_total_norm(grads).item())

        optimizer.register_step_pre_hook(before_step)
        return optimizer

    monkeypatch.setattr(train_mod, "make_optimizer", recording)
    clip = 1e-4  # far below the tiny model's gradients
    results = train(run_config(tmp_path, shards, f"train.grad_clip_norm={clip}", "train.log_every=1"))
    assert len(stepped) == 6 and max(stepped) == pytest.approx(clip, rel=1e-4)
    found = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(results["mlflow_run_id"],
                                                                                        "train/grad_norm")
    assert [m.step for m in found] == list(range(1, 7)) and min(m.value for m in found) > 10 * clip


def test_an_extension_given_up_before_its_first_checkpoint_leaves_no_mark(tmp_path, shards, monkeypatch):
    import temu_dist.train as train_mod

    first = train(run_config(tmp_path, shards))
    real = train_mod.loss_fn
    monkeypatch.setattr(train_mod, "loss_fn", stops_after(real, 0))
    with pytest.raises(Interrupted):
        train(run_config(tmp_path, shards, "train.epochs=3", "train.resume=extend"))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(first["mlflow_run_id"]).data.tags["extended"] == "2 -> 3 epochs after step 6"
    monkeypatch.setattr(train_mod, "loss_fn", real)
    again = train(run_config(tmp_path, shards))  # back to the 2 epochs its checkpoint holds
    assert "extended" not in again and "extended" not in client.get_run(first["mlflow_run_id"]).data.tags
    # The results the extension had removed are back, those of its 2 epochs.
    assert _comparable(json.loads((tmp_path / "run" / "results.json").read_text())["history"]) == \
        _comparable(first["history"])


@pytest.mark.parametrize("plcc_over", ["step", "micro_batch"])
def test_run_killed_mid_epoch_resumes_from_its_last_step_checkpoint_to_the_same_results(tmp_path, shards,
                                                                                        monkeypatch, plcc_over):
    # Global batch 4 in micro-batches of 2: 3 optimizer steps, 6 micro-batches an epoch; a checkpoint every step.
    # Over the step, each step reads both its micro-batches before it trains on either.
    settings = ("train.epochs=2", "train.per_device_batch=2", "train.checkpoint_every=1",
                f"train.plcc_over={plcc_over}")
    whole = train(run_config(tmp_path / "a", shards, *settings))
    import temu_dist.train as train_mod

    real = train_mod.training_inputs
    # Dies at the 5th micro-batch of epoch 2: the checkpoint of step 2 (4 micro-batches) is there.
    monkeypatch.setattr(train_mod, "training_inputs", stops_after(real, 6 + 4))
    with pytest.raises(Interrupted):
        train(run_config(tmp_path / "b", shards, *settings))
    last = json.loads((tmp_path / "b" / "run" / "checkpoints" / "last" / "trainer.json").read_text())
    assert last["next_epoch"] == 1 and last["in_epoch"]["micro_batches"] == 4 and len(last["history"]) == 1
    counted = stops_after(real, math.inf)
    monkeypatch.setattr(train_mod, "training_inputs", counted)
    resumed = train(run_config(tmp_path / "b", shards, *settings))
    assert counted.calls == 2, "the resumed run trains the epoch's last 2 micro-batches only"
    assert _comparable(resumed["history"]) == _comparable(whole["history"])
    a = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "last" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "checkpoints" / "last" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "in_epoch" not in json.loads((tmp_path / "b" / "run" / "checkpoints" / "last" / "trainer.json").read_text())


def test_a_per_epoch_cosine_holds_each_epochs_rate_through_a_mid_epoch_resume_and_an_extension(tmp_path, shards,
                                                                                                  monkeypatch,
                                                                                                  sigterm_caught):
    # IQA-PyTorch's schedule: the rate of epoch e (from 0) is lr (1 + cos(pi e / epochs)) / 2 for all its steps.
    settings = ("train.epochs=2", "train.checkpoint_every=1", "train.lr_schedule=epoch")
    whole = train(run_config(tmp_path / "a", shards, *settings))
    lr = run_config(tmp_path, shards).train.lr
    assert [h["lr"] for h in whole["history"]] == [pytest.approx(lr), pytest.approx(lr / 2)]
    import temu_dist.train as train_mod

    real = train_mod.training_inputs
    monkeypatch.setattr(train_mod, "training_inputs", stops_after(real, 3 + 2))  # dies in epoch 2's last step
    with pytest.raises(Interrupted):
        train(run_config(tmp_path / "b", shards, *settings))
    last = json.loads((tmp_path / "b" / "run" / "checkpoints" / "last" / "trainer.json").read_text())
    assert last["next_epoch"] == 1 and last["in_epoch"]["steps"] == 2
    monkeypatch.setattr(train_mod, "training_inputs", real)
    resumed = train(run_config(tmp_path / "b", shards, *settings))
    assert _comparable(resumed["history"]) == _comparable(whole["history"])
    a = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "last" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "checkpoints" / "last" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Extended to 3 epochs: its third trains at a 3-epoch cosine's rate for epoch 2, after its 6 steps.
    longer = train(run_config(tmp_path / "a", shards, *settings[1:], "train.epochs=3", "train.resume=extend"))
    assert longer["history"][2]["lr"] == pytest.approx(lr * (1 + math.cos(math.pi * 2 / 3)) / 2)
    assert longer["extended"] == [{"epochs_from": 2, "epochs_to": 3, "after_step": 6,
                                   "lr_from": pytest.approx(0, abs=1e-12),
                                   "lr_to": pytest.approx(lr * (1 + math.cos(math.pi * 2 / 3)) / 2)}]
    # Stopped after epoch 2's training, before its evaluation, then extended: the next epoch is 3, at the same rate.
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(dump(run_config(tmp_path / "c", shards, *settings))))
    monkeypatch.setattr(train_mod, "evaluate_sets", sigterm_on_call(train_mod.evaluate_sets, 2))
    assert train_mod.main(["--config", str(config)]) == 143
    monkeypatch.undo()
    stopped = train(run_config(tmp_path / "c", shards, *settings[1:], "train.epochs=3", "train.resume=extend"))
    assert stopped["extended"] == longer["extended"]
    assert _comparable(stopped["history"]) == _comparable(longer["history"])


def test_a_mid_epoch_resume_in_other_micro_batches_goes_on_after_the_same_step(tmp_path, shards, monkeypatch, capsys):
    # Killed after step 2 of epoch 2 in micro-batches of 2; resumed in micro-batches of 4 (another micro-batch, or
    # as many per process on fewer processes): step 3 is what is left, and with PLCC over the step the run ends where
    # one trained in micro-batches of 4 throughout does.
    settings = ("train.epochs=2", "train.checkpoint_every=1")
    whole = train(run_config(tmp_path / "a", shards, *settings))
    import temu_dist.train as train_mod

    real = train_mod.training_inputs
    monkeypatch.setattr(train_mod, "training_inputs", stops_after(real, 6 + 4))
    with pytest.raises(Interrupted):
        train(run_config(tmp_path / "b", shards, *settings, "train.per_device_batch=2"))
    counted = stops_after(real, math.inf)
    monkeypatch.setattr(train_mod, "training_inputs", counted)
    capsys.readouterr()
    resumed = train(run_config(tmp_path / "b", shards, *settings, "train.per_device_batch=4"))
    assert "at epoch 2, after its step 2 of 3," in capsys.readouterr().out
    assert counted.calls == 1, "the resumed run trains the epoch's last step only"
    a = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "last" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "checkpoints" / "last" / "weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert resumed["history"][1]["loss"] == pytest.approx(whole["history"][1]["loss"], rel=1e-5)
    assert resumed["history"][1]["images_per_s"] > 0
    # The MLflow run keeps the batch split epoch 1's timings were taken in; rerun finished, it keeps all of it.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    expected = {"per_device_batch": "2 -> 4 from epoch 2", "accumulation": "2 -> 1 from epoch 2", "processes": "1"}
    tags = client.get_run(resumed["mlflow_run_id"]).data.tags
    assert {k: tags[k] for k in expected} == expected
    train(run_config(tmp_path / "b", shards, *settings, "train.per_device_batch=2"))
    tags = client.get_run(resumed["mlflow_run_id"]).data.tags
    assert {k: tags[k] for k in expected} == expected


def test_a_resume_in_other_micro_batches_warns_where_workers_read_elsewhere_and_old_positions_keep_their_own(
        tmp_path, shards, monkeypatch, capsys):
    import temu_dist.train as train_mod

    real = train_mod.training_inputs
    # Step 1 in micro-batches of 2 over 2 workers: one each. In micro-batches of 4 the first worker would have read 4.
    settings = ("train.epochs=1", "train.checkpoint_every=1", "data.workers=2")
    monkeypatch.setattr(train_mod, "training_inputs", stops_after(real, 2))
    with pytest.raises(Interrupted):
        train(run_config(tmp_path, shards, *settings, "train.per_device_batch=2"))
    monkeypatch.setattr(train_mod, "training_inputs", real)
    info_path = tmp_path / "run" / "checkpoints" / "last" / "trainer.json"
    saved = info_path.read_text()
    capsys.readouterr()
    train(run_config(tmp_path, shards, *settings, "train.per_device_batch=4"))
    assert f"train: warning: the data readers stand elsewhere than where {tmp_path / 'run' / 'checkpoints' / 'last'} " \
           "left off (1 process x 2 readers in micro-batches of 4 now, 1 process x 2 readers in micro-batches " \
           "of 2 at the checkpoint): the rest of epoch 1 reads the samples in another order" in capsys.readouterr().out
    # A position saved before each reader took a contiguous run of the samples: its readers stood elsewhere.
    info = json.loads(saved)
    del info["in_epoch"]["reader_runs"]
    info_path.write_text(json.dumps(info))
    train(run_config(tmp_path, shards, *settings, "train.per_device_batch=2"))
    assert "last was saved by a version that split the samples over its 2 data readers otherwise: the rest of " \
           "epoch 1 reads the samples in another order" in capsys.readouterr().out
    # A position saved before checkpoints said their plan: only the same micro-batch can tell where it is.
    info = json.loads(saved)
    del info["in_epoch"]["steps"], info["in_epoch"]["processes"]
    info_path.write_text(json.dumps(info))
    (tmp_path / "run" / "checkpoints" / "last" / "config.json").write_text(
        (tmp_path / "run" / "checkpoints" / "last" / "config.json").read_text().replace(
            '"per_device_batch": 4', '"per_device_batch": 2'))
    with pytest.raises(ConfigError, match=r"train.per_device_batch: .*last holds a mid-epoch position saved before a "
                                          r"resume could change it; resume with 2$"):
        train(run_config(tmp_path, shards, *settings, "train.per_device_batch=4"))


def test_mid_epoch_resume_over_other_data_readers_warns_that_the_order_changes(tmp_path, shards, monkeypatch,
                                                                             capsys):
    import temu_dist.train as train_mod

    real = train_mod.loss_fn
    monkeypatch.setattr(train_mod, "loss_fn", stops_after(real, 2))
    with pytest.raises(Interrupted):
        train(run_config(tmp_path, shards, "train.epochs=1", "train.checkpoint_every=1"))
    monkeypatch.setattr(train_mod, "loss_fn", real)
    capsys.readouterr()
    train(run_config(tmp_path, shards, "train.epochs=1", "train.checkpoint_every=1", "data.workers=2"))
    assert "left off (1 process x 2 readers in micro-batches of 4 now, 1 process x 1 reader in micro-batches " \
           "of 4 at the checkpoint): the rest of epoch 1" in capsys.readouterr().out


def test_ctrl_c_says_how_to_go_on_and_marks_the_mlflow_run_killed(tmp_path, shards, monkeypatch, capsys):
    import temu_dist.train as train_mod

    args = [*TINY_OVERRIDES, f"data.train={shards}", f"out_dir={tmp_path}", "name=run", "data.workers=0",
            "train.batch_size=4", "train.checkpoint_every=1"]
    real = train_mod.training_inputs
    monkeypatch.setattr(train_mod, "training_inputs", stops_after(real, 0, KeyboardInterrupt))
    assert train_mod.main(args) == 130
    assert capsys.readouterr().err.endswith("\ntrain: stopped before its first checkpoint; the same command starts it "
                                            "anew\n")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("temu-dist").experiment_id])
    assert run.info.status == "KILLED"
    monkeypatch.setattr(train_mod, "training_inputs", stops_after(real, 2, KeyboardInterrupt))  # 2 steps, checkpointed
    assert train_mod.main(args) == 130
    last = tmp_path / "run" / "checkpoints" / "last"
    assert capsys.readouterr().err.endswith(f"\ntrain: stopped; run the same command again to go on from {last} "
                                            "(epoch 1, after its step 2)\n")
    monkeypatch.setattr(train_mod, "training_inputs", stops_after(real, 2, KeyboardInterrupt))
    assert train_mod.main([*args, "train.resume=never"]) == 130
    assert capsys.readouterr().err.endswith(f"\ntrain: stopped; run it with train.resume=auto to go on from {last} "
                                            "(epoch 1, after its step 2)\n")


def test_sigterm_stops_as_ctrl_c_does_and_says_so(tmp_path, shards, monkeypatch, capsys):
    """SLURM's scancel and time limit send SIGTERM: the run ends KILLED in MLflow with the way to go on, not at once."""
    import temu_dist.train as train_mod

    monkeypatch.setattr(train_mod, "training_inputs", sigterm_on_call(train_mod.training_inputs, 3))
    args = [*TINY_OVERRIDES, f"data.train={shards}", f"out_dir={tmp_path}", "name=run", "data.workers=0",
            "train.batch_size=4", "train.checkpoint_every=1"]
    # The caller's own handler (here the test's, which lets the run go on), in place again after the command.
    caller = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        assert train_mod.main(args) == 143
        assert signal.getsignal(signal.SIGTERM) is not stop._terminate
    finally:
        signal.signal(signal.SIGTERM, caller)
    last = tmp_path / "run" / "checkpoints" / "last"
    assert capsys.readouterr().err.endswith(f"\ntrain: stopped by SIGTERM; run the same command again to go on from "
                                            f"{last} (epoch 1 trained, its evaluation to come)\n")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("temu-dist").experiment_id])
    assert run.info.status == "KILLED"


def test_one_process_signalled_in_its_checks_stops_at_once(tmp_path, shards, monkeypatch, capsys, sigterm_caught):
    """With no other process to agree with, it need not load its model (a download of pretrained weights may take
    minutes, past SLURM's 30 s to SIGKILL) before it stops."""
    import temu_dist.train as train_mod

    monkeypatch.setattr(train_mod, "check_data", sigterm_on_call(train_mod.check_data, 1))
    built = stops_after(train_mod.build_model, math.inf)
    monkeypatch.setattr(train_mod, "build_model", built)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(dump(run_config(tmp_path, shards))))
    assert train_mod.main(["--config", str(config)]) == 143
    assert built.calls == 0 and not (tmp_path / "run").exists()
    assert capsys.readouterr().err.endswith("stopped by SIGTERM before its first checkpoint; the same command starts "
                                            "it anew\n")


@pytest.mark.parametrize("per_device, plcc_over, at, saved_steps", [
    (4, "step", 5, 2),  # one micro-batch a step: the step it came in is trained and saved
    (2, "micro_batch", 9, 1),  # the first micro-batch of epoch 2's step 2: that step is let go
    (2, "micro_batch", 10, 2),  # its last: that step is trained, then saved
    (2, "step", 9, 2),  # over the step, both its micro-batches are read before it trains: it is trained
])
def test_sigterm_saves_a_checkpoint_after_the_step_it_came_in_and_the_resumed_run_ends_as_one_never_stopped(
        tmp_path, shards, monkeypatch, capsys, sigterm_caught, per_device, plcc_over, at, saved_steps):
    """SLURM's time limit sends SIGTERM 30 s before SIGKILL: without checkpoint_every, a run lost its whole epoch."""
    import temu_dist.train as train_mod

    # 3 optimizer steps of 4 images an epoch, in micro-batches of per_device.
    settings = (f"train.per_device_batch={per_device}", f"train.plcc_over={plcc_over}")
    whole = train(run_config(tmp_path / "a", shards, *settings))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(dump(run_config(tmp_path / "b", shards, *settings))))
    monkeypatch.setattr(train_mod, "training_inputs", sigterm_on_call(train_mod.training_inputs, at))
    assert train_mod.main(["--config", str(config)]) == 143
    last = tmp_path / "b" / "run" / "checkpoints" / "last"
    assert capsys.readouterr().err.endswith(f"\ntrain: stopped by SIGTERM; run the same command again to go on from "
                                            f"{last} (epoch 2, after its step {saved_steps})\n")
    info = json.loads((last / "trainer.json").read_text())
    assert (info["next_epoch"], info["in_epoch"]["steps"]) == (1, saved_steps)
    run_id = (tmp_path / "b" / "run" / "mlflow_run_id").read_text()
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}").get_run(run_id).info.status == "KILLED"
    monkeypatch.undo()
    resumed = train(run_config(tmp_path / "b", shards, *settings))
    assert _comparable(resumed["history"]) == _comparable(whole["history"])
    a = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "last" / "weights.safetensors"))
    b = load_file(str(last / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_in_an_evaluation_saves_the_trained_epoch_which_a_resume_evaluates_without_training_it_again(
        tmp_path, shards, monkeypatch, capsys, sigterm_caught):
    import temu_dist.train as train_mod
    from temu_dist.checkpoint import epoch_of

    whole = train(run_config(tmp_path / "a", shards))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(dump(run_config(tmp_path / "b", shards))))
    monkeypatch.setattr(train_mod, "evaluate_sets", sigterm_on_call(train_mod.evaluate_sets, 2))
    # A second SIGTERM (the launcher's forwarded copy) as the stop's save begins, after epoch 1's best and last: the
    # save is not cut short.
    monkeypatch.setattr(train_mod, "save_checkpoint", sigterm_on_call(train_mod.save_checkpoint, 3))
    assert train_mod.main(["--config", str(config)]) == 143
    last = tmp_path / "b" / "run" / "checkpoints" / "last"
    assert capsys.readouterr().err.endswith(f"to go on from {last} (epoch 2 trained, its evaluation to come)\n")
    assert epoch_of(last) == 2  # its weights are epoch 2's, as predict and evaluate say
    monkeypatch.undo()
    counted = stops_after(train_mod.training_inputs, math.inf)
    monkeypatch.setattr(train_mod, "training_inputs", counted)
    resumed = train(run_config(tmp_path / "b", shards))
    assert counted.calls == 0
    assert _comparable(resumed["history"]) == _comparable(whole["history"])
    # Stopped in its first step, of 2 micro-batches trained one by one, before the second: nothing of the run is
    # saved, and the hint says so.
    config.write_text(json.dumps(dump(run_config(tmp_path / "c", shards, "train.per_device_batch=2",
                                                 "train.plcc_over=micro_batch"))))
    monkeypatch.setattr(train_mod, "training_inputs", sigterm_on_call(counted, 1))
    assert train_mod.main(["--config", str(config)]) == 143
    assert capsys.readouterr().err.endswith("stopped by SIGTERM before its first checkpoint; the same command starts "
                                            "it anew\n")


def test_a_sigterm_as_the_results_are_written_stops_after_them(tmp_path, shards, monkeypatch, capsys, sigterm_caught):
    """Noted while results.json and the MLflow run were written: the run is whole, and the command still stops (a
    repeat series does not begin its next split)."""
    import temu_dist.train as train_mod

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(dump(run_config(tmp_path, shards, "train.epochs=1"))))
    monkeypatch.setattr(train_mod, "score_vs_time", sigterm_on_call(train_mod.score_vs_time, 1))
    assert train_mod.main(["--config", str(config)]) == 143
    assert capsys.readouterr().err.endswith("(after epoch 1)\n")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["history"][0]["epoch"] == 1


def test_resume_with_other_training_settings_is_refused(tmp_path, shards, monkeypatch, capsys):
    import temu_dist.train as train_mod

    train(run_config(tmp_path, shards, "train.epochs=1"))
    with pytest.raises(ConfigError, match=r"train.lr: .*last was trained with 0.002, this run asks for 0.01"):
        train(run_config(tmp_path, shards, "train.epochs=1", "train.lr=0.01"))
    # Nor on another input size or dtype, which evaluate and predict may load a checkpoint with.
    with pytest.raises(ConfigError, match=r"^model.image_size: .*last was trained with 64, this run asks for 96;"):
        train(run_config(tmp_path, shards, "train.epochs=1", "model.image_size=96"))
    # The same size given as a pair is the same setting: the finished run is found, not refused.
    assert train(run_config(tmp_path, shards, "train.epochs=1", "model.image_size=[64, 64]"))["best_epoch"] == 1
    with pytest.raises(ConfigError, match=r"^model.precision: .*last was trained with 'auto', this run asks for "):
        train(run_config(tmp_path, shards, "train.epochs=1", "model.precision=bf16"))
    with pytest.raises(ConfigError, match=r"^model.resize: .*last was trained with 'bicubic', this run asks for "
                                          r"'bilinear'"):
        train(run_config(tmp_path, shards, "train.epochs=1", "model.resize=bilinear"))
    # Started anew, the run is not finished until it writes results of its own.
    monkeypatch.setattr(train_mod, "loss_fn", stops_after(train_mod.loss_fn, 0))
    capsys.readouterr()
    # last.old: what a kill between a checkpoint's two renames leaves, which a resume would take for the run's.
    shutil.copytree(tmp_path / "run" / "checkpoints" / "last", tmp_path / "run" / "checkpoints" / "last.old")
    with pytest.raises(Interrupted):
        train(run_config(tmp_path, shards, "train.epochs=1", "train.lr=0.01", "train.resume=never"))
    assert f"train: warning: starting anew in {tmp_path / 'run'}, which held a finished run: its checkpoints/last, " \
        "checkpoints/last.old, checkpoints/best, results.json, plots are removed" in capsys.readouterr().out
    assert not (tmp_path / "run" / "results.json").exists()
    # Its checkpoints too, which the stop's hint, predict and evaluate would have taken for this run's.
    assert not list((tmp_path / "run" / "checkpoints").iterdir())
    monkeypatch.undo()
    fresh = train(run_config(tmp_path, shards, "train.epochs=1", "train.lr=0.01", "train.resume=never"))
    assert fresh["history"][0]["lr"] < 0.01


def test_a_data_worker_ended_by_sigterm_stops_the_run_as_sigterm_does(tmp_path, shards, monkeypatch, capsys):
    import temu_dist.train as train_mod
    from temu_dist.train import main

    # scancel and docker stop signal the whole process group: a worker may die of it before the main process meets
    # its own SIGTERM, and torch's report of that stood in for the stop (exit 1, MLflow run FAILED).
    def worker_killed(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")

    monkeypatch.setattr(train_mod, "loss_fn", worker_killed)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(dump(run_config(tmp_path, shards))))
    assert main(["--config", str(config)]) == 143
    assert "train: stopped by SIGTERM before its first checkpoint" in capsys.readouterr().err
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text()
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).info.status == "KILLED"
    # A worker killed otherwise (SIGKILL: out of memory) is no stop asked for.
    def worker_lost(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    monkeypatch.setattr(train_mod, "loss_fn", worker_lost)
    with pytest.raises(RuntimeError, match="Killed"):
        train(run_config(tmp_path, shards, "name=other"))


def test_a_stopped_runs_progress_bar_counts_the_micro_batches_it_trained(tmp_path, shards, monkeypatch, capsys):
    import temu_dist.train as train_mod

    # 3 micro-batches an epoch: the 5th call fails, in epoch 2 after 1 trained (the 2nd was read).
    monkeypatch.setattr(train_mod, "loss_fn", stops_after(train_mod.loss_fn, 4))
    with pytest.raises(Interrupted):
        train(run_config(tmp_path, shards, "train.checkpoint_every=1"))
    bars = re.findall(r"epoch 2: .*?(\d)/3", capsys.readouterr().err)
    assert bars and bars[-1] == "1"


def test_a_run_goes_on_scored_as_its_epochs_so_far_were(tmp_path, shards, monkeypatch, capsys):
    import temu_dist.train as train_mod

    real = train_mod.loss_fn
    monkeypatch.setattr(train_mod, "loss_fn", stops_after(real, 3))  # 3 micro-batches per epoch: dies in epoch 2
    with pytest.raises(Interrupted):
        train(run_config(tmp_path, shards))
    monkeypatch.setattr(train_mod, "loss_fn", real)
    written = (tmp_path / "run" / "config.yaml").read_text()
    # Epoch 1 was scored without LDG copies; its best would be picked among epochs scored otherwise.
    with pytest.raises(ConfigError, match=r"^eval.ldg: .*last was scored with False, this run asks for True; a resumed "
                                          r"run is scored as its epochs so far were, so that they compare: resume it "
                                          r"with the same value and score its weights otherwise with python -m "
                                          r"temu_dist.evaluate, or train under another name="):
        train(run_config(tmp_path, shards, "eval.ldg=true"))
    with pytest.raises(ConfigError, match=r"True; a resumed run is scored"):  # extend to the epochs it has: a resume
        train(run_config(tmp_path, shards, "eval.ldg=true", "train.resume=extend"))
    assert (tmp_path / "run" / "config.yaml").read_text() == written
    assert [h["epoch"] for h in train(run_config(tmp_path, shards))["history"]] == [1, 2]
    # Killed before its first epoch was scored, it has nothing to compare with.
    monkeypatch.setattr(train_mod, "loss_fn", stops_after(real, 1))
    with pytest.raises(Interrupted):
        train(run_config(tmp_path / "early", shards, "train.checkpoint_every=1"))
    monkeypatch.setattr(train_mod, "loss_fn", real)
    capsys.readouterr()
    later = train(run_config(tmp_path / "early", shards, "train.checkpoint_every=1", "eval.ldg=true"))
    assert "resuming" in capsys.readouterr().out and "test-ldg" in later["best"]


def test_a_run_saved_before_plcc_over_existed_resumes_with_a_warning_and_a_saved_one_only_with_its_value(
        tmp_path, shards, capsys):
    accumulating = ("train.per_device_batch=2",)
    # Reruns of a finished run: they resume (nothing left to train) only where the settings match.
    train(run_config(tmp_path, shards, *accumulating, "train.plcc_over=micro_batch"))
    with pytest.raises(ConfigError, match=r"train.plcc_over: .*last was trained with 'micro_batch', this run asks for "
                                          r"'step'"):
        train(run_config(tmp_path, shards, *accumulating))
    path = tmp_path / "run" / "checkpoints" / "last" / "config.json"
    saved = json.loads(path.read_text())
    del saved["train"]["plcc_over"]
    path.write_text(json.dumps(saved))
    capsys.readouterr()
    assert len(train(run_config(tmp_path, shards, *accumulating))["history"]) == 2
    assert "predates train.plcc_over, when PLCC under gradient accumulation was taken over each micro-batch; the " \
           "rest of this run takes it over the whole step" in capsys.readouterr().out
    train(run_config(tmp_path, shards, *accumulating, "train.plcc_over=micro_batch"))
    assert "predates" not in capsys.readouterr().out


def test_a_run_saved_before_a_key_existed_is_held_to_the_value_it_had():
    from temu_dist.resume import first_change

    saved = dump(tiny_config())
    del saved["model"]["tower_fp8"], saved["eval"]["ldg"]
    assert first_change(saved, tiny_config(), ("model", "eval"), set()) is None
    assert first_change(saved, tiny_config("model.tower_fp8=true"), ("model",), set()) == \
        ("model.tower_fp8", False, True)
    # A run finished before eval.ldg was scored without LDG copies: rerun as it was, it hands back its results.
    assert first_change(saved, tiny_config("eval.ldg=true"), ("eval",), set()) == ("eval.ldg", False, True)


def test_a_relative_sqlite_store_keeps_its_artifacts_beside_it(tmp_path, shards, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = train(run_config(tmp_path, shards, "train.epochs=1", "tracking.uri=sqlite:///rel.db"))
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'rel.db'}").get_run(results["mlflow_run_id"])
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def test_unreachable_tracking_server_warns_and_training_goes_on(tmp_path, shards, capsys):
    from temu_dist.train import main

    with pytest.warns(UserWarning, match="MLflow tracking at http://127.0.0.1:9 is not usable"):
        results = train(run_config(tmp_path, shards, "train.epochs=1", "tracking.uri=http://127.0.0.1:9"))
    assert results["mlflow_run_id"] is None
    assert (tmp_path / "run" / "results.json").exists()
    # On the command line, one line as the command's errors are, not Python's file and source line.
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(dump(run_config(tmp_path, shards, "train.epochs=1", "name=cli",
                                                 "tracking.uri=http://127.0.0.1:9"))))
    assert main(["--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "train: warning: MLflow tracking at http://127.0.0.1:9 is not usable (" in err and "Warning" not in err


def test_nan_loss_stops_with_a_clear_message_keeping_the_last_good_checkpoint(tmp_path, shards, monkeypatch):
    import temu_dist.train as train_mod

    real, calls = train_mod.loss_fn, []

    def poisoned_in_epoch_2(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * math.nan if len(calls) > 3 else loss  # 3 micro-batches per epoch

    monkeypatch.setattr(train_mod, "loss_fn", poisoned_in_epoch_2)
    with pytest.raises(NonFiniteLoss, match=r"epoch 2: the loss became non-finite on 1 of 1 process\(es\) "
                                             r"\(this one.s: nan\); stopped. The last good checkpoint is .*last; "
                                             r"resuming replays the same batches to the same loss: start anew "
                                             r"\(train.resume=never\) with a lower train.lr or another seed$"):
        train(run_config(tmp_path, shards, "train.epochs=2"))
    last = tmp_path / "run" / "checkpoints" / "last"
    assert json.loads((last / "trainer.json").read_text())["next_epoch"] == 1
    assert all(torch.isfinite(v).all() for v in load_file(str(last / "weights.safetensors")).values())
    # Its mark tells report and a search's retry why the run stopped; an attempt that trains removes it.
    marker = tmp_path / "run" / train_mod.NONFINITE
    assert marker.read_text().startswith("epoch 2: the loss became non-finite on 1 of 1 process(es) (this one")
    monkeypatch.setattr(train_mod, "loss_fn", real)
    train(run_config(tmp_path, shards, "train.epochs=2"))
    assert not marker.exists()


def test_missing_shards_and_bad_key_metric_fail_before_any_work(tmp_path, shards):
    with pytest.raises(ConfigError, match="python -m temu_dist.pack"):
        train(run_config(tmp_path, str(tmp_path / "nowhere")))
    # A series' config (Table 6's), or a zero-shot one (Tables 11-13's): which command takes it.
    series = str(tmp_path / "agiqa3k" / "split{split}")
    one = re.escape(series.replace("{split}", "0"))
    with pytest.raises(ConfigError, match=rf"^data.train: {re.escape(series)} names a series of packs, one per split: "
                                          r"train the series with python -m temu_dist.repeat --config FILE --splits N, "
                                          rf"or one split with data.train={one}$"):
        train(run_config(tmp_path, series))
    cross = f"eval.cross=[{{name: koniq10k, shards: {shards}}}]"
    with pytest.raises(ConfigError, match=r"^data.train: no training shards named \(a pack folder, e.g. "
                                          r"shards/kadid10k\); a config of evaluation sets alone \(eval.cross\) is "
                                          r"scored zero-shot with python -m temu_dist.evaluate --clipiqa table "
                                          r"--config FILE$"):
        train(run_config(tmp_path, shards, "data.train=null", cross))
    with pytest.raises(ConfigError, match=r"^train.key_metric: no evaluation set 'koniq' \(sets: val, test\)$"):
        train(run_config(tmp_path, shards, "train.key_metric=koniq/srcc"))
    # A split of the pack: why it is no set.
    with pytest.raises(ConfigError, match=r"^train.key_metric: no evaluation set 'val' \(sets: test\); add it to "
                                          r"eval.splits \(\['test'\] now\)$"):
        train(run_config(tmp_path, shards, "train.key_metric=val/srcc", "eval.splits=[test]"))
    only_train = tmp_path / "only-train"
    write_kadid(tmp_path / "two", refs=2, per_ref=2, size=(64, 64))
    pack(PackOptions("kadid10k", str(tmp_path / "two"), str(only_train), split=SplitSpec("ratio", (0.8, 0.0, 0.2)),
                     workers=1))
    with pytest.raises(ConfigError, match=rf"^train.key_metric: no evaluation set 'test' \(sets: none\); data.train's "
                                          rf"pack {only_train} has no 'test' split \(it has train\): pack one into "
                                          r"another folder"):
        train(run_config(tmp_path, str(only_train)))
    # The default splits skip those a pack lacks; splits asked for by name must all be there.
    with pytest.raises(ConfigError, match=rf"^eval.splits: data.train's pack {only_train} has no 'test' split \(it has "
                                          r"train\): leave it out of eval.splits \(\['train', 'test'\] now\)"):
        train(run_config(tmp_path, str(only_train), "eval.splits=[train, test]", "train.key_metric=train/srcc"))
    with pytest.raises(ConfigError, match=r"^train.key_metric: no evaluation set 'test-ldg' \(sets: val, test\); "
                                          r"test-ldg is scored with eval.ldg=true$"):
        train(run_config(tmp_path, shards, "train.key_metric=test-ldg/srcc"))
    with pytest.raises(ConfigError, match=r"^train.key_metric: no evaluation set 'koniq-ldg' \(sets: val, test\)$"):
        train(run_config(tmp_path, shards, "train.key_metric=koniq-ldg/srcc"))  # no koniq set to copy either
    assert not (tmp_path / "run" / "checkpoints" / "last").exists()


def test_repeat_reports_mean_and_std_over_seeded_splits_and_skips_finished_ones(tmp_path, monkeypatch, capsys):
    import temu_dist.repeat as repeat_mod
    from temu_dist.repeat import repeat

    root = tmp_path / "kadid"
    write_kadid(root, refs=10, per_ref=2, size=(64, 64))
    for i in range(2):
        pack(PackOptions("kadid10k", str(root), str(tmp_path / f"split{i}"),
                         split=SplitSpec("ratio", (0.6, 0.2, 0.2), index=i, by_reference=True), workers=1))
    config = run_config(tmp_path, str(tmp_path / "split{split}"), "train.epochs=1", "name=rep")
    # Every split's pack is checked before the first trains: a missing one does not cost the others' hours.
    with pytest.raises(ConfigError, match=f"^data.train: {tmp_path / 'split2' / 'manifest.json'} not found"):
        repeat(config, 3)
    # All of them at once.
    later = re.escape(f"; not packed either: data.train ({tmp_path / 'split3'}), data.train ({tmp_path / 'split4'})")
    with pytest.raises(ConfigError, match=f"^data.train: {tmp_path / 'split2' / 'manifest.json'} not found.*{later}$"):
        repeat(config, 5)
    with pytest.raises(ConfigError, match=f"^data.train: {tmp_path / 'split2' / 'manifest.json'} not found.*{later}$"):
        repeat_mod.check_lines(config, 5)
    said = repeat_mod.check_lines(config, 2)
    assert said[0].startswith("model: Test-Tiny-ViT-16") and said[-1] == f"series folder: {tmp_path / 'rep'}, the " \
        "mean and sd over its 2 splits in repeat.json"
    assert [line for line in said if "run folder" in line] == [
        f"split {i}: run folder: {tmp_path / f'rep-split{i}'}, a new run" for i in range(2)]
    assert [line.split(",")[0] for line in said if ": training:" in line] == [
        f"split {i}: training: {tmp_path / f'split{i}'} 'train'" for i in range(2)]
    assert not (tmp_path / "rep-split0").exists() and not (tmp_path / "rep").exists()
    # Under a training run's name, its repeat.json would hide the run from report.
    (tmp_path / "single" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=rf"^name: {tmp_path / 'single'} is a training run's folder; give the series "
                                          r"a name of its own \(name=...\)$"):
        repeat(run_config(tmp_path, str(tmp_path / "split{split}"), "train.epochs=1", "name=single"), 2)
    # Both in one folder, as an earlier version's headers made them: how to part them, for either command.
    (tmp_path / "single" / "repeat.json").write_text("{}")
    both = rf"^name: {tmp_path / 'single'} holds both a training run and a repeat series .*: move the run to a " \
           rf"folder of its own \(mkdir {tmp_path / 'single'}-single && mv .*\), then run this again$"
    with pytest.raises(ConfigError, match=both):
        repeat(run_config(tmp_path, str(tmp_path / "split{split}"), "train.epochs=1", "name=single"), 2)
    with pytest.raises(ConfigError, match=both):
        train(run_config(tmp_path, str(tmp_path / "split0"), "train.epochs=1", "name=single"))
    capsys.readouterr()
    summary = repeat(config, 2)
    # Each split's train says the same lines: which split trains is said before them.
    assert f"repeat: split 2/2: {tmp_path / 'split1'} -> {tmp_path / 'rep-split1'}\n" in capsys.readouterr().out
    runs = [json.loads((tmp_path / f"rep-split{i}" / "results.json").read_text()) for i in range(2)]
    values = [r["best"]["test"]["srcc"] for r in runs]
    assert summary["sets"]["test"]["srcc"]["values"] == values
    assert summary["sets"]["test"]["srcc"]["mean"] == pytest.approx(sum(values) / 2)
    assert json.loads((tmp_path / "rep" / "repeat.json").read_text())["splits"] == 2
    assert [line for line in repeat_mod.check_lines(config, 2) if "run folder" in line] == [
        f"split {i}: run folder: {tmp_path / f'rep-split{i}'}, finished: the same command reports its results"
        for i in range(2)]
    # A run under the series' name: its folder would be read as the series'.
    with pytest.raises(ConfigError, match=rf"^name: {tmp_path / 'rep'} holds a repeat series \(repeat.json\): give "
                                          r"the run another name=$"):
        train(run_config(tmp_path, str(tmp_path / "split0"), "train.epochs=1", "name=rep"))
    # In MLflow, a parent run for the series holds the splits' runs and the mean and spread of their metrics.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("temu-dist").experiment_id])
    parent = next(r for r in found if r.data.tags.get("temu.repeat") == "true")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "rep"
    assert parent.data.metrics["test/srcc_mean"] == pytest.approx(summary["sets"]["test"]["srcc"]["mean"])
    own = [r["own_best"]["val"]["srcc"] for r in runs]
    assert summary["sets_own_best"]["val"]["srcc"]["values"] == own
    assert parent.data.metrics["own_best/val/srcc_mean"] == pytest.approx(sum(own) / 2)
    # The series' config and tags, as its runs have them: series of other variants are told apart in the UI.
    assert parent.data.params["model.variant"] == "I" and parent.data.params["train.epochs"] == "1"
    assert (parent.data.tags["variant"], parent.data.tags["dataset"]) == ("I", "kadid10k")
    assert "mlflow.source.git.commit" in parent.data.tags  # the code, as its runs have it
    assert sorted(r.info.run_name for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id) == \
        ["rep-split0", "rep-split1"]
    trained = tmp_path / "rep-split0" / "checkpoints" / "last" / "weights.safetensors"
    mtime = trained.stat().st_mtime_ns
    # A parent run the store does not hold (another store then, or deleted) is made anew, not trusted.
    (tmp_path / "rep" / "mlflow_parent_run_id").write_text("0" * 32)
    assert repeat(config, 2)["sets"] == summary["sets"]
    assert (tmp_path / "rep" / "mlflow_parent_run_id").read_text() != "0" * 32
    assert trained.stat().st_mtime_ns == mtime  # finished splits are not trained again
    # Fewer splits (a slip for 2) would rewrite the finished series as the mean of the first alone.
    with pytest.raises(ConfigError, match=rf"^--splits 1: {tmp_path / 'rep'} holds a finished series of 2 splits, "
                                          r"which this would write as the mean of the first 1: give --splits 2 "):
        repeat(config, 1)
    (tmp_path / "cut").mkdir()  # so too for one stopped before its end
    (tmp_path / "cut" / "repeat-started.json").write_text(json.dumps({"splits": 3, "runs": []}))
    with pytest.raises(ConfigError, match=r"^--splits 2: .*cut holds a series started with 3 splits, which this "):
        repeat(run_config(tmp_path, str(tmp_path / "split{split}"), "train.epochs=1", "name=cut"), 2)
    # A split packed under another's --split-index would be counted twice.
    pack(PackOptions("kadid10k", str(root), str(tmp_path / "split2"),
                     split=SplitSpec("ratio", (0.6, 0.2, 0.2), index=1, by_reference=True), workers=1))
    with pytest.raises(ConfigError, match=rf"^data.train: {tmp_path / 'split1'} and {tmp_path / 'split2'} hold the "
                                          r"same training images: the series would count that split twice; pack "
                                          rf"{tmp_path / 'split2'} again with --split-index 2$"):
        repeat(config, 3)
    assert not (tmp_path / "rep-split2").exists()
    # Nor are their results taken for a series with other settings.
    with pytest.raises(ConfigError, match=r"^train.epochs: .*rep-split0.* was trained with 1, this run asks for 2"):
        repeat(run_config(tmp_path, str(tmp_path / "split{split}"), "train.epochs=2", "name=rep"), 2)
    # Extended, a series with a split never trained stops before the others train on.
    (tmp_path / "rep-split1").rename(tmp_path / "away")
    with pytest.raises(ConfigError, match=r"^train.resume: extend, but .*rep-split1 holds no run to extend"):
        repeat(run_config(tmp_path, str(tmp_path / "split{split}"), "train.epochs=2", "name=rep",
                          "train.resume=extend"), 2)
    assert trained.stat().st_mtime_ns == mtime
    (tmp_path / "away").rename(tmp_path / "rep-split1")
    # Refused for another setting, before its repeat.json goes.
    with pytest.raises(ConfigError, match=r"^train.lr: .*rep-split0.* was trained with"):
        repeat(run_config(tmp_path, str(tmp_path / "split{split}"), "train.epochs=2", "name=rep", "train.lr=0.5",
                          "train.resume=extend"), 2)
    assert (tmp_path / "rep" / "repeat.json").is_file()
    # Its repeat.json goes as the extension starts: a series stopped midway must not show the old means.
    longer = run_config(tmp_path, str(tmp_path / "split{split}"), "train.epochs=2", "name=rep", "train.resume=extend")
    real_train = repeat_mod.train

    def stopped_at_split1(config):
        if config.name == "rep-split1":
            raise KeyboardInterrupt
        return real_train(config)

    monkeypatch.setattr(repeat_mod, "train", stopped_at_split1)
    with pytest.raises(KeyboardInterrupt):
        repeat(longer, 2)
    assert not (tmp_path / "rep" / "repeat.json").exists()
    monkeypatch.setattr(repeat_mod, "train", real_train)
    assert repeat(longer, 2)["started_for"] == [1]
    assert json.loads((tmp_path / "rep" / "repeat.json").read_text())["started_for"] == [1]
    parent = client.get_run((tmp_path / "rep" / "mlflow_parent_run_id").read_text())
    assert parent.data.params["train.epochs"] == "1" and parent.data.tags["extended"] == "1 -> 2 epochs"
    with pytest.raises(ConfigError, match=r"data.train: must contain \{split\}"):
        repeat(run_config(tmp_path, str(tmp_path / "split0")), 2)
    with pytest.raises(ConfigError, match=r"^--splits: at least 1, not 0$"):
        repeat(config, 0)

    def diverges(config):
        raise NonFiniteLoss(f"{config.name}: loss is nan")

    monkeypatch.setattr(repeat_mod, "train", diverges)
    with pytest.raises(NonFiniteLoss):
        repeat(run_config(tmp_path, str(tmp_path / "split{split}"), "train.epochs=1", "name=broken"), 2)
    broken = client.search_runs([client.get_experiment_by_name("temu-dist").experiment_id],
                                "attributes.run_name = 'broken'")
    assert [r.info.status for r in broken] == ["FAILED"]
    # A finished series rerun keeps its results and FINISHED parent, whatever stops the rerun. Started anew
    # (train.resume=never), it is no longer finished, and its other settings get a parent run of their own.
    finished = (tmp_path / "rep" / "mlflow_parent_run_id").read_text()
    with pytest.raises(NonFiniteLoss):
        repeat(longer, 2)
    assert client.get_run(finished).info.status == "FINISHED" and (tmp_path / "rep" / "repeat.json").is_file()
    with pytest.raises(NonFiniteLoss):
        repeat(run_config(tmp_path, str(tmp_path / "split{split}"), "train.epochs=2", "name=rep", "train.lr=0.01",
                          "train.resume=never"), 2)
    assert not (tmp_path / "rep" / "repeat.json").exists()
    anew = client.get_run((tmp_path / "rep" / "mlflow_parent_run_id").read_text())
    assert anew.info.run_id != finished and anew.info.status == "FAILED" and anew.data.params["train.lr"] == "0.01"
    assert client.get_run(finished).info.status == "FINISHED"


def test_a_repeat_stopped_by_sigterm_names_the_split_and_where_it_goes_on(tmp_path, monkeypatch, capsys,
                                                                           sigterm_caught):
    """The stop line said only "the stopped one goes on from its last checkpoint", not which, nor where."""
    import temu_dist.repeat as repeat_mod
    import temu_dist.train as train_mod

    root = tmp_path / "kadid"
    write_kadid(root, refs=10, per_ref=2, size=(64, 64))
    for i in range(3):
        pack(PackOptions("kadid10k", str(root), str(tmp_path / f"split{i}"),
                         split=SplitSpec("ratio", (0.6, 0.2, 0.2), index=i, by_reference=True), workers=1))
    real = repeat_mod.train

    def second_split_signalled(config):
        if config.name == "rep-split1":  # SIGTERM as its epoch 1 reads step 2 (3 steps an epoch)
            monkeypatch.setattr(train_mod, "training_inputs", sigterm_on_call(train_mod.training_inputs, 2))
        return real(config)

    monkeypatch.setattr(repeat_mod, "train", second_split_signalled)
    config = tmp_path / "rep.json"
    config.write_text(json.dumps(dump(run_config(tmp_path, str(tmp_path / "split{split}"), "name=rep",
                                                 "tracking.enabled=false"))))
    assert repeat_mod.main(["--config", str(config), "--splits", "3"]) == 143
    last = tmp_path / "rep-split1" / "checkpoints" / "last"
    assert capsys.readouterr().err.endswith(
        "\nrepeat: stopped by SIGTERM in split 2/3; run the same command again: finished splits are kept, split 2 "
        f"goes on from {last} (epoch 1, after its step 2)\n")
    # Under train.resume=never the same command would train every split anew.
    assert repeat_mod.main(["--config", str(config), "--splits", "3", "train.resume=never"]) == 143
    assert capsys.readouterr().err.endswith(
        "\nrepeat: stopped by SIGTERM in split 2/3; the same command starts the series anew; run it with "
        f"train.resume=auto: finished splits are kept, split 2 goes on from {last} (epoch 1, after its step 2)\n")


def test_each_set_is_reported_at_its_own_best_epoch_where_a_nan_never_wins():
    from temu_dist.best import own_best

    def epoch(n, **srcc):
        return {"epoch": n, "eval": {name: {"srcc": v, "plcc": v / 2, "count": 4} for name, v in srcc.items()}}

    history = [epoch(1, test=0.5, livec=math.nan), epoch(2, test=0.7, livec=0.2), epoch(3, test=0.6, livec=0.4),
               epoch(4, test=0.7, livec=0.1, late=math.nan), epoch(5, test=0.6, livec=math.nan)]
    got = own_best(history, "test/srcc")
    assert got["test"] == {"srcc": 0.7, "plcc": 0.35, "count": 4, "epoch": 4}  # a tie: the later, as pyiqa's >=
    assert got["livec"] == {"srcc": 0.4, "plcc": 0.2, "count": 4, "epoch": 3}
    assert got["late"]["epoch"] == 4 and math.isnan(got["late"]["srcc"])  # only NaN: its one epoch
    # By PLCC when that is the key metric's measure.
    assert own_best(history, "test/plcc")["livec"]["epoch"] == 3
    # The key metric's set at the epoch the run chose: a run made when ties went to the earlier epoch chose 2.
    chose = {"epoch": 2, "eval": history[1]["eval"]}
    assert own_best(history, "test/srcc", chose)["test"]["epoch"] == 2


def test_repeat_prints_a_set_at_its_own_best_epochs_only_where_that_differs(monkeypatch, capsys):
    import temu_dist.repeat as repeat_mod

    def summary(*srcc):
        return {m: {"mean": 0.5, "std": 0.1, "n": 2, "values": list(srcc)} for m in ("srcc", "plcc", "krcc")}

    # NaN in both is the same (two NaNs, as two JSON reads give, are not equal to each other).
    sets = {"test": summary(0.4, float("nan")), "livec": summary(0.3, 0.2)}
    own = {"test": summary(0.4, float("nan")), "livec": summary(0.3, 0.25)}
    monkeypatch.setattr(repeat_mod, "repeat", lambda config, splits: {"sets": sets, "sets_own_best": own})
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert repeat_mod.main(["--config", str(demo), "--splits", "2"]) == 0
    assert [line.split(" over ")[0] for line in capsys.readouterr().out.splitlines()] == [
        "repeat: test", "repeat: livec", "repeat: livec at its own best epochs",
        "repeat: results in runs/demo/repeat.json"]


def test_repeat_replaces_split_alone_in_a_path_that_holds_other_braces(tmp_path):
    from temu_dist.repeat import split_config

    config = split_config(run_config(tmp_path, str(tmp_path / "{lab}" / "split{split}")), 3)
    assert config.data.train == str(tmp_path / "{lab}" / "split3")


def test_repeat_averages_a_metric_over_the_splits_where_it_is_finite():
    from temu_dist.repeat import summarize

    runs = [{"best": {"test": {"srcc": srcc, "plcc": 0.5, "krcc": 0.4}}} for srcc in (0.9, math.nan, 0.7)]
    test = summarize(runs)["test"]
    assert (test["srcc"]["n"], test["plcc"]["n"]) == (2, 3)
    assert test["srcc"]["mean"] == pytest.approx(0.8) and math.isnan(test["srcc"]["values"][1])
    assert "plcc_fit" not in test  # the runs scored none
    fitted = [{"best": {"test": {**r["best"]["test"], "plcc_fit": v}}} for r, v in zip(runs, (0.6, 0.8, 0.7))]
    assert summarize(fitted)["test"]["plcc_fit"]["mean"] == pytest.approx(0.7)


def test_a_run_scored_with_a_fitted_plcc_picks_its_best_epoch_by_it(tmp_path, shards, capsys, monkeypatch):
    import numpy as np

    import temu_dist.evaluate as evaluate_mod
    from temu_dist.evaluate import main as evaluate

    with pytest.raises(ConfigError, match=r"^train.key_metric: test/plcc_fit is scored with "
                                          r"eval.plcc_fit=logistic_4params \(or logistic_5params\), which is none$"):
        train(run_config(tmp_path, shards, "train.key_metric=test/plcc_fit"))
    results = train(run_config(tmp_path, shards, "train.epochs=3", "eval.plcc_fit=logistic_4params",
                               "train.key_metric=test/plcc_fit"))
    fitted = [h["eval"]["test"]["plcc_fit"] for h in results["history"]]
    assert all(-1 <= v <= 1 for v in fitted) and set(results["history"][0]["eval"]) == {"val", "test"}
    assert "val" in results["own_best"] and "plcc_fit" in results["own_best"]["val"]
    assert results["best_epoch"] == 3 - fitted[::-1].index(max(fitted))  # a tie: the later epoch
    assert re.search(r"test srcc \S+ plcc \S+ plcc_fit \S+ \(n=\d+\)", capsys.readouterr().out)
    logged = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(results["mlflow_run_id"],
                                                                                        "test/plcc_fit")
    assert [m.value for m in logged] == pytest.approx(fitted)
    # The best weights, scored again as the run's config says: the same fitted PLCC.
    assert evaluate(["--checkpoint", str(tmp_path / "run")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["test"]["plcc_fit"] == pytest.approx(results["best"]["test"]["plcc_fit"], abs=1e-6)
    # Picked by plcc_fit, not SRCC: with a stand-in fit that peaks where PLCC is lowest, the two pick other epochs.
    monkeypatch.setattr(evaluate_mod, "fitted_plcc", lambda pred, mos, curve: -float(np.corrcoef(pred, mos)[0, 1]))
    other = train(run_config(tmp_path, shards, "train.epochs=3", "eval.plcc_fit=logistic_4params",
                             "train.key_metric=test/plcc_fit", "name=other"))
    by = {m: [h["eval"]["test"][m] for h in other["history"]] for m in ("srcc", "plcc_fit")}
    assert other["best_epoch"] == 1 + by["plcc_fit"].index(max(by["plcc_fit"])) != 1 + by["srcc"].index(max(by["srcc"]))


def test_evaluate_scores_every_row_of_a_clipiqa_table_in_one_pass_and_report_lays_it_out(tmp_path, shards, capsys):
    from temu_dist import report
    from temu_dist.evaluate import main

    cfg = tmp_path / "zs.yaml"
    cfg.write_text("model: {backbone: Test-Tiny-ViT-16, pretrained: null, image_size: 64}\n")
    out = tmp_path / "table.json"
    assert main(["--clipiqa", "table", "--config", str(cfg), "--shards", str(shards), "--out", str(out)]) == 0
    table = json.loads(capsys.readouterr().out)
    assert list(table) == ["layer 1 (b)", "layer 2 (b)", "layer 3 (b)", "layer 4 (a: CLIP-IQA)", "all layers (c)"]
    for option in (["b", "--layer", "2"], ["c"]):
        assert main(["--clipiqa", *option, "--config", str(cfg), "--shards", str(shards)]) == 0
        alone = json.loads(capsys.readouterr().out)["shards:test"]
        row = table["layer 2 (b)" if option[0] == "b" else "all layers (c)"]["shards:test"]
        assert alone["count"] == row["count"] > 0
        assert alone["plcc"] == pytest.approx(row["plcc"], abs=1e-5)
    saved = json.loads(out.read_text())
    assert saved["scored"] == {"clipiqa": "table", "config": str(cfg)}
    assert saved["sets"] == {"shards:test": {"shards": str(shards), "split": "test"}}
    assert report.main([str(out), str(out)]) == 0  # named twice: its rows once
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.startswith("| layer") or line.startswith("| all")]) == 5
    assert lines[0] == "| run | shards:test |"
    assert [line.split(" | ")[0] for line in lines[2:7]] == [f"| {name}" for name in table]
    with pytest.raises(SystemExit):
        main(["--clipiqa", "table", "--config", str(cfg), "--plots", str(tmp_path / "p")])
    assert "--plots draws one option's scatters" in capsys.readouterr().err
    # Into a folder not made yet (runs/ before any run): made.
    assert main(["--clipiqa", "a", "--config", str(cfg), "--shards", str(shards), "--out",
                 str(tmp_path / "new" / "a.json")]) == 0
    assert json.loads((tmp_path / "new" / "a.json").read_text())["scored"] == {"clipiqa": "a", "config": str(cfg)}
    capsys.readouterr()
    assert main(["--clipiqa", "c", "--config", str(cfg), "--shards", str(shards), "--out", str(tmp_path / "t.md")]) == 1
    assert capsys.readouterr().err == f"evaluate: --out {tmp_path / 't.md'}: a .json file (python -m " \
                                      "temu_dist.report reads it)\n"
    # A file evaluate wrote is replaced (the same table again); any other is not: a run's results.json was lost.
    assert main(["--clipiqa", "a", "--config", str(cfg), "--shards", str(shards), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["scored"]["clipiqa"] == "a"
    mine = tmp_path / "mine.json"
    mine.write_text('{"notes": "mine"}')
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: run\n")
    capsys.readouterr()
    for path, why in ((mine, "it holds what evaluate did not write (a run's results?)"),
                      (run / "results.json", f"train or repeat writes that file in {run} (a run folder) when it "
                                             "finishes")):
        assert main(["--clipiqa", "a", "--config", str(cfg), "--shards", str(shards), "--out", str(path)]) == 1
        assert capsys.readouterr().err == f"evaluate: --out {path}: {why}; give another path\n"
    assert mine.read_text() == '{"notes": "mine"}' and not (run / "results.json").exists()
    series = tmp_path / "series"  # a repeat series not finished: its repeat.json is repeat's to write
    series.mkdir()
    (series / "repeat-started.json").write_text('{"splits": 2}')
    assert main(["--clipiqa", "a", "--config", str(cfg), "--shards", str(shards), "--out",
                 str(series / "repeat.json")]) == 1
    assert "train or repeat writes that file" in capsys.readouterr().err


def test_evaluate_stops_on_sigterm_as_on_ctrl_c_with_one_line_and_names_no_epoch_for_mid_epoch_weights(
        tmp_path, shards, capsys, monkeypatch):

    import temu_dist.evaluate as evaluate

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return {}

    monkeypatch.setattr(evaluate, "evaluate_sets", terminated)
    cfg = tmp_path / "zs.yaml"
    cfg.write_text("model: {backbone: Test-Tiny-ViT-16, pretrained: null, image_size: 64}\n")
    assert evaluate.main(["--clipiqa", "a", "--config", str(cfg), "--shards", str(shards), "--out",
                          str(tmp_path / "a.json")]) == 143
    assert capsys.readouterr().err.endswith("\nevaluate: stopped by SIGTERM; nothing written\n")
    assert not (tmp_path / "a.json").exists()
    # A last checkpoint saved within an epoch holds weights of no whole epoch.
    from temu_dist.checkpoint import epoch_of

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "trainer.json").write_text(json.dumps({"next_epoch": 2, "in_epoch": {"micro_batches": 3}}))
    assert epoch_of(tmp_path / "ckpt") is None
    (tmp_path / "ckpt" / "trainer.json").write_text(json.dumps({"next_epoch": 2, "in_epoch": {}}))
    assert epoch_of(tmp_path / "ckpt") == 2


def test_evaluate_names_shards_sets_by_their_folder_or_by_their_path_where_two_folders_share_a_name():
    from temu_dist.evaluate import _shard_sets

    sets = _shard_sets(["shards/agiqa3k/split0", "shards/livec/split0:val", "shards/csiq-all"])
    assert [s.name for s in sets] == ["shards/agiqa3k/split0:test", "shards/livec/split0:val", "csiq-all:test"]
    assert [(s.shards, s.split) for s in sets][1] == ("shards/livec/split0", "val")
    # Named, as a training run's eval.cross set is, so that report lines them up in one column.
    sets = _shard_sets(["csiq=shards/csiq-all", "live=shards/live:val", "shards/a=b/kadid:val"])
    assert [(s.name, s.shards, s.split) for s in sets] == [("csiq", "shards/csiq-all", "test"),
                                                           ("live", "shards/live", "val"),
                                                           ("kadid:val", "shards/a=b/kadid", "val")]
    with pytest.raises(ConfigError, match=r"^--shards =shards/x: an empty NAME before '='$"):
        _shard_sets(["=shards/x"])
    with pytest.raises(ConfigError, match=r"^--shards: two sets named csiq; name each with NAME=DIR\[:SPLIT\]$"):
        _shard_sets(["csiq=shards/csiq-all", "csiq=shards/csiq"])


def test_evaluate_verb_prints_strict_json_with_an_undefined_metric_as_null(tmp_path, shards, capsys, monkeypatch):
    import temu_dist.evaluate as evaluate

    real = evaluate.correlations
    monkeypatch.setattr(evaluate, "correlations", lambda pred, mos: {**real(pred, mos), "srcc": math.nan})
    cfg = tmp_path / "zs.yaml"
    cfg.write_text("model: {backbone: Test-Tiny-ViT-16, pretrained: null, image_size: 64}\n")
    assert evaluate.main(["--clipiqa", "a", "--config", str(cfg), "--shards", str(shards)]) == 0
    scored = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"bare {c} in the output"))
    assert scored["shards:test"]["srcc"] is None and scored["shards:test"]["plcc"] is not None
    # Long evaluations show their progress (FLIVE's and AVA's test sets take minutes); here shown at once.
    class Shown(evaluate.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "delay": 0, "mininterval": 0})

    monkeypatch.setattr(evaluate, "tqdm", Shown)
    assert evaluate.main(["--clipiqa", "a", "--config", str(cfg), "--shards", str(shards)]) == 0
    assert re.search(r"evaluate shards:test: 100%\|.*\| (\d+)/\1 ", capsys.readouterr().err)


def test_evaluate_writes_every_images_score_from_which_its_metrics_come_again(tmp_path, shards, capsys):
    """IQA work goes on from per-image scores (significance tests, failure cases, plots of one's own): evaluate gave
    only each set's metrics."""
    from scipy.stats import spearmanr

    from temu_dist.evaluate import main
    from temu_dist.metrics import fitted_plcc

    cfg = tmp_path / "zs.yaml"
    cfg.write_text("model: {backbone: Test-Tiny-ViT-16, pretrained: null, image_size: 64}\n")
    scores, out = tmp_path / "new" / "scores.csv", tmp_path / "table.json"
    assert main(["--clipiqa", "table", "--config", str(cfg), "--shards", str(shards), "--shards", f"v={shards}:val",
                 "--out", str(out), "--scores", str(scores), "--plcc-fit", "logistic_4params"]) == 0
    table = json.loads(out.read_text())["rows"]
    with open(scores, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["set", "name", "target", *table]
    for name in ("shards:test", "v"):
        mine = [r for r in rows if r["set"] == name]
        assert len({r["name"] for r in mine}) == len(mine) == table["all layers (c)"][name]["count"] > 0
        for option, metrics in table.items():
            pred, target = [float(r[option]) for r in mine], [float(r["target"]) for r in mine]
            assert spearmanr(pred, target).statistic == pytest.approx(metrics[name]["srcc"], abs=1e-6)
            # And the PLCC after a fitted logistic, asked for (null where it did not fit).
            fitted = fitted_plcc(pred, target)
            assert metrics[name]["plcc_fit"] == (None if math.isnan(fitted) else pytest.approx(fitted, abs=1e-6))
    assert capsys.readouterr().err.endswith(f"evaluate: {len(rows)} images' scores written to {scores}\n")
    # One option: its column is the score; into an empty file (mktemp's), named .CSV.
    scores = tmp_path / "made.CSV"
    scores.touch()
    assert main(["--clipiqa", "a", "--config", str(cfg), "--shards", str(shards), "--scores", str(scores)]) == 0
    with open(scores, newline="") as f:
        assert next(csv.reader(f)) == ["set", "name", "target", "score"]
    # A file evaluate did not write (a slip for a dataset's labels) is left as it is, and so is a name not .csv.
    labels = tmp_path / "mos.csv"
    labels.write_text("image_name,MOS\nI01.png,4.5\n")
    capsys.readouterr()
    for path, why in ((labels, "it holds what evaluate did not write (a label file?); give another path"),
                      (tmp_path / "s.json", "a .csv file")):
        assert main(["--clipiqa", "a", "--config", str(cfg), "--shards", str(shards), "--scores", str(path)]) == 1
        assert capsys.readouterr().err == f"evaluate: --scores {path}: {why}\n"
    assert labels.read_text() == "image_name,MOS\nI01.png,4.5\n"


def test_evaluate_verb_scores_a_run_and_zero_shot_clipiqa(tmp_path, shards, capsys):
    from temu_dist import report
    from temu_dist.evaluate import main

    train(run_config(tmp_path, shards, "train.epochs=1"))
    assert "trains on" not in capsys.readouterr().out  # its own pack's val and test splits
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "run.json")]) == 0
    scored, err = capsys.readouterr()
    scored = json.loads(scored)
    best_dir = tmp_path / "run" / "checkpoints" / "best"
    assert err.startswith(f"evaluate: scoring {best_dir} (epoch 1) on val ({shards} val), test ({shards} test)\n")
    assert "trained on" not in err  # its own pack's test split: no image it trained on
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["scored"] == {"checkpoint": str(best_dir), "epoch": 1} and saved["rows"] == {"run (epoch 1)": scored}
    # A row of report's tables, its own split named after its dataset as a run's is.
    assert report.main([str(tmp_path / "run.json")]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("| run (epoch 1) | ")
    assert set(scored) == {"val", "test"} and scored["test"]["count"] == scored["test"]["expected"]
    # Another split of its labels: its test images may have been in the run's training split.
    other = tmp_path / "split1"
    pack(PackOptions("kadid10k", str(Path(shards).parent), str(other),
                     split=SplitSpec("ratio", (0.6, 0.2, 0.2), seed=0, index=1, by_reference=True), workers=1))
    assert main(["--checkpoint", str(tmp_path / "run"), "--shards", str(other)]) == 0
    assert f"evaluate: warning: split1:test: packed from the labels the checkpoint trained on ({shards}) but split " \
        "otherwise, so some of the images may be ones it trained on\n" in capsys.readouterr().err
    # And in training, a cross-dataset set that is another split of its own labels (report would print it as one).
    train(run_config(tmp_path, shards, "train.epochs=1", "name=crossed", f"eval.cross=[{{name: s1, shards: {other}}}]"))
    assert f"train: warning: s1: packed from the labels data.train was ({shards}) but split otherwise, so some of " \
        "the images may be ones this run trains on\n" in capsys.readouterr().out
    best = json.loads((tmp_path / "run" / "results.json").read_text())["best"]
    assert scored["test"]["srcc"] == pytest.approx(best["test"]["srcc"], abs=1e-6)
    cfg = tmp_path / "zs.yaml"
    cfg.write_text("model: {backbone: Test-Tiny-ViT-16, pretrained: null, image_size: 64}\n")
    # --check: what would be scored, with no model built; a missing pack is found before any weights are loaded.
    counts = {split: sum(s["count"] for s in info["shards"])
              for split, info in json.loads((Path(shards) / "manifest.json").read_text())["splits"].items()}
    import temu_dist.evaluate as evaluate_mod

    def unbuilt(*args, **kwargs):
        raise AssertionError("a model was built")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate_mod, "build_clipiqa", unbuilt)
        patch.setattr(evaluate_mod, "load_model", unbuilt)
        assert main(["--checkpoint", str(tmp_path / "run"), "--check"]) == 0
        assert capsys.readouterr().out.splitlines() == [
            f"evaluate: model: {best_dir} (epoch 1): Test-Tiny-ViT-16, random weights, input 64x64 (bicubic)",
            f"evaluate: sets: val ({shards} val, {counts['val']} images), test ({shards} test, {counts['test']} "
            "images)"]
        # A zero-shot config's own set (Tables 11-13's), and what CLIP-IQA itself refuses, before any weights.
        missing = tmp_path / "koniq10k-all"
        crossed = tmp_path / "zs-cross.yaml"
        crossed.write_text(cfg.read_text() + f"eval: {{cross: [{{name: koniq10k, shards: {missing}}}]}}\n")
        assert main(["--clipiqa", "table", "--config", str(crossed)]) == 1
        assert capsys.readouterr().err.startswith(f"evaluate: eval.cross.0.shards: {missing / 'manifest.json'} not "
                                                  "found")
        assert main(["--clipiqa", "b", "--config", str(cfg), "--shards", str(shards), "--check"]) == 1
        assert capsys.readouterr().err == "evaluate: --clipiqa b scores one layer: name it with --layer N (1-4)\n"
        assert main(["--clipiqa", "c", "--config", str(cfg), "--shards", f"{shards}:test", "--check"]) == 0
        assert capsys.readouterr().out.splitlines()[0] == "evaluate: model: CLIP-IQA c: Test-Tiny-ViT-16, random " \
                                                          "weights, input 64x64 (bicubic)"
        assert main(["--clipiqa", "c", "--config", str(cfg), "--shards", str(tmp_path / "nowhere")]) == 1
        assert capsys.readouterr().err.startswith(f"evaluate: --shards: {tmp_path / 'nowhere' / 'manifest.json'} "
                                                  "not found")
        assert main(["--checkpoint", str(tmp_path / "run"), "--shards", str(tmp_path / "nowhere")]) == 1
        assert "manifest.json not found" in capsys.readouterr().err
    plots = tmp_path / "plots"
    assert main(["--clipiqa", "c", "--config", str(cfg), "--shards", f"{shards}:test", "--plots", str(plots),
                 "device=cpu"]) == 0
    zero_shot = json.loads(capsys.readouterr().out)
    assert zero_shot["shards:test"]["count"] == best["test"]["count"]
    assert sorted(p.name for p in plots.iterdir()) == ["scatter_shards_test.png"]
    assert main(["--clipiqa", "c", "--config", str(cfg), "--shards", str(shards), "eval.ldg=true",
                 "model.image_size=48"]) == 1
    assert capsys.readouterr().err.startswith("evaluate: model.image_size: CW-SSIM (ldg.fidelity) compares images of "
                                              "at least 64 px a side, this one has 48;")
    with pytest.raises(SystemExit):
        main(["--clipiqa", "a", "--layer", "3", "--config", str(cfg), "--shards", str(shards)])
    assert "--layer is for --clipiqa b" in capsys.readouterr().err
    # Layer 0 or -1 would be taken as Python indices: another layer, scored without a word.
    for layer in ("0", "-1", "5"):
        assert main(["--clipiqa", "b", "--layer", layer, "--config", str(cfg), "--shards", str(shards)]) == 1
        assert capsys.readouterr().err == f"evaluate: --layer {layer}: this backbone's layers are 1-4\n"
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "run"), "--config", str(cfg)])
    assert "--config is for --clipiqa: a checkpoint brings its own config" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "run"), "--shards", f"{shards}:val2"]) == 1
    assert capsys.readouterr().err.startswith(f"evaluate: --shards: {shards}: no 'val2' split")
    with pytest.raises(SystemExit):
        main(["--clipiqa", "c", "--config", str(cfg), "--shards", str(shards), f"{shards}:val"])
    assert f"not key=value: {shards}:val (a pack? give each its own --shards)" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "nothing")]) == 1
    assert "neither a checkpoint folder" in capsys.readouterr().err
    # A run stopped before its first epoch was scored: its last checkpoint is named.
    stopped = tmp_path / "stopped" / "checkpoints" / "last"
    stopped.mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "checkpoints" / "last" / "weights.safetensors", stopped)
    assert main(["--checkpoint", str(tmp_path / "stopped")]) == 1
    assert capsys.readouterr().err == f"evaluate: {tmp_path / 'stopped'}: a run with no checkpoints/best yet (none " \
        f"of its epochs has been scored); its latest weights are {stopped}: name that\n"
    assert main(["--checkpoint", str(tmp_path / "run"), "--plots", str(cfg)]) == 1
    assert capsys.readouterr().err == f"evaluate: --plots {cfg}: it is a file, not a folder\n"


def test_ldg_below_p_1_scores_the_distorted_copies_drawn_and_none_when_none_was():
    from temu_dist.data.augment import normalize
    from temu_dist.model.temu import build_model
    from temu_dist.train import loss_fn

    config = tiny_config("ldg.p=0.5")
    model, seen = build_model(config), []

    class Recording(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return model(x)

    stats = (model.backbone.mean, model.backbone.std)
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g)
    ldg_image = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g)
    plain = {"image": image, "mos": torch.tensor([0.2, 0.4, 0.6, 0.8]), "name": list("abcd")}
    cpu = torch.device("cpu")
    with torch.no_grad():
        none_drawn = {**plain, "ldg_image": ldg_image, "ldg": torch.zeros(4, dtype=torch.bool)}
        assert loss_fn(Recording(), none_drawn, config, cpu, stats) == loss_fn(Recording(), plain, config, cpu, stats)
        assert len(seen[0]) == 4
        some = {**none_drawn, "ldg": torch.tensor([True, False, True, False])}
        assert torch.isfinite(loss_fn(Recording(), some, config, cpu, stats))
    assert len(seen[-1]) == 6 and torch.equal(seen[-1][4:], normalize(ldg_image[[0, 2]], *stats))


def test_ldg_weight_0_drops_the_distorted_copies_from_the_whole_loss():
    from temu_dist.model.temu import build_model
    from temu_dist.train import loss_fn

    model = build_model(tiny_config())
    stats = (model.backbone.mean, model.backbone.std)
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g)
    batch = {"image": image, "mos": torch.tensor([0.2, 0.4, 0.6, 0.8]), "name": list("abcd"),
             "ldg": torch.ones(4, dtype=torch.bool)}
    cpu = torch.device("cpu")
    with torch.no_grad():
        losses = [loss_fn(model, {**batch, "ldg_image": torch.randint(0, 256, image.shape, dtype=torch.uint8,
                                                                      generator=g)}, config, cpu, stats)
                  for config in (tiny_config("ldg.weight=0"), tiny_config("ldg.weight=0"), tiny_config())]
        plain = loss_fn(model, {k: v for k, v in batch.items() if k != "ldg"}, tiny_config(), cpu, stats)
    torch.testing.assert_close(losses[0], plain)
    torch.testing.assert_close(losses[1], plain)
    assert not torch.allclose(losses[2], plain)


def test_eval_ldg_scores_every_set_again_on_seeded_local_distortions_against_f_times_mos(tmp_path, shards):
    # Seed Figs. 10 and 11 plot predictions on locally distorted images against their targets f(x, x') * y.
    from accelerate import Accelerator

    from temu_dist.evaluate import EvalSet, evaluate_sets
    from temu_dist.model.temu import build_model

    model, sets, accelerator = build_model(tiny_config()), [EvalSet("test", shards, "test")], Accelerator(cpu=True)

    def scored(*overrides):
        return evaluate_sets(model, sets, accelerator, run_config(tmp_path, shards, *overrides))

    plain = scored()["test"]
    half = scored("eval.ldg=true", "ldg.fidelity=constant", "ldg.constant=0.5")
    assert set(half) == {"test", "test-ldg"}
    clean, distorted = half["test"], half["test-ldg"]
    np.testing.assert_array_equal(clean.pred, plain.pred)
    np.testing.assert_array_equal(distorted.mos, 0.5 * clean.mos)
    assert distorted.metrics["count"] == clean.metrics["expected"] == len(clean.pred)
    assert np.abs(distorted.pred - clean.pred).max() > 1e-4
    assert distorted.metrics["pred_mean"] == pytest.approx(distorted.pred.mean())
    assert distorted.metrics["target_mean"] == pytest.approx(0.5 * clean.mos.mean())
    # Each image's distortion comes from the seed and its name, not from which reader scored it.
    again = scored("eval.ldg=true", "ldg.fidelity=constant", "ldg.constant=0.5", "data.workers=2")["test-ldg"]
    np.testing.assert_array_equal(again.pred, distorted.pred)
    other_seed = scored("eval.ldg=true", "ldg.fidelity=constant", "ldg.constant=0.5", "seed=1")["test-ldg"]
    assert not np.array_equal(other_seed.pred, distorted.pred)
    fidelity = scored("eval.ldg=true")["test-ldg"].mos / clean.mos
    assert (fidelity <= 1).all() and (fidelity < 1).any()


def test_a_cross_set_is_scored_at_its_own_input_size(tmp_path, shards):
    from accelerate import Accelerator

    from temu_dist.evaluate import eval_sets, evaluate_sets
    from temu_dist.model.temu import build_model

    config = run_config(tmp_path, shards, "eval.splits=[test]",
                        f"eval.cross=[{{name: native, shards: {shards}, split: test, image_size: [48, 80]}}]")
    model, sizes = build_model(config), []

    class Recording(torch.nn.Module):
        backbone = model.backbone

        def forward(self, x):
            sizes.append(tuple(x.shape[-2:]))
            return model(x)

    results = evaluate_sets(Recording(), eval_sets(config), Accelerator(cpu=True), config)
    assert set(results) == {"test", "native"} and sizes[0] == (64, 64) and sizes[-1] == (48, 80)
    assert results["native"].metrics["count"] == results["test"].metrics["count"]


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failing_command_makes_no_run_folder_nor_changes_an_existing_one(tmp_path, shards):
    with pytest.raises(ConfigError, match="python -m temu_dist.pack"):
        train(run_config(tmp_path, str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="train.key_metric: no evaluation set 'koniq'"):
        train(run_config(tmp_path, shards, "train.key_metric=koniq/srcc"))
    assert not (tmp_path / "run").exists()
    train(run_config(tmp_path, shards, "train.epochs=1"))
    before = _files(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"seed: .*last was trained with 0, this run asks for 5"):
        train(run_config(tmp_path, shards, "seed=5", "train.epochs=2"))
    with pytest.raises(ConfigError, match="train.key_metric: no evaluation set 'koniq'"):
        train(run_config(tmp_path, shards, "train.epochs=1", "train.key_metric=koniq/srcc"))
    assert _files(tmp_path / "run") == before


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shards):
    out = tmp_path_factory.mktemp("finished")
    train(run_config(out, shards, "train.epochs=1"))
    return out / "run"


def test_a_run_finished_before_own_best_gets_it_when_run_again(tmp_path, shards, monkeypatch):
    import temu_dist.train as train_mod

    monkeypatch.setattr(train_mod, "_log_own_best", lambda *a: None)  # as before own_best was reported
    train(run_config(tmp_path, shards, "train.epochs=1"))
    monkeypatch.undo()
    run = tmp_path / "run"
    old = {k: v for k, v in json.loads((run / "results.json").read_text()).items() if k != "own_best"}
    (run / "results.json").write_text(json.dumps(old))
    again = train(run_config(tmp_path, shards, "train.epochs=1"))
    assert json.loads((run / "results.json").read_text()) == {**old, "own_best": again["own_best"]}
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(again["mlflow_run_id"], "own_best/test/srcc")] == [1]


def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _edit_json(path, **fields):
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize(("name", "damage", "problem"), [
    ("trainer.pt", _truncate, r"not a readable torch file \("),
    ("trainer.pt", Path.unlink, "not found"),
    ("trainer.json", lambda p: p.write_text("{garbage"), r"not valid JSON \(.*line 1\)"),
    ("trainer.json", lambda p: p.write_text("{}"), "'next_epoch' is missing or malformed"),
    ("trainer.json", lambda p: _edit_json(p, in_epoch={"micro_batches": 2}), "'in_epoch.loss_sum' is missing"),
    ("trainer.json", Path.unlink, "not found"),
    ("config.json", lambda p: p.write_text("garbage"), "not valid JSON"),
    ("config.json", Path.unlink, "not found"),
])
def test_resume_from_a_damaged_last_checkpoint_is_a_one_line_error_naming_the_file_and_changes_nothing(
        tmp_path, shards, finished_run, name, damage, problem):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run / "checkpoints" / "last" / name)
    before = _files(run)
    with pytest.raises(ConfigError) as error:
        train(run_config(tmp_path, shards, "train.epochs=1"))
    message = str(error.value)
    assert re.match(rf"{re.escape(str(run / 'checkpoints' / 'last' / name))}: {problem}.*; restore it, or start anew "
                    "with train.resume=never or another name$", message), message
    assert "\n" not in message
    assert _files(run) == before


def _ldg_batch(g: torch.Generator, n: int, p_mask: torch.Tensor | None = None) -> dict:
    image = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g)
    return {"image": image, "mos": torch.rand(n, generator=g), "name": [str(i) for i in range(n)],
            "ldg_image": torch.randint(0, 256, image.shape, dtype=torch.uint8, generator=g),
            "ldg": torch.ones(n, dtype=torch.bool) if p_mask is None else p_mask}


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_plcc_over_the_step_gives_the_gradient_of_the_whole_batch_from_its_micro_batches(p):
    from temu_dist.data.augment import normalize
    from temu_dist.model.temu import build_model
    from temu_dist.train import loss_fn, step_scores, training_inputs

    config, cpu = tiny_config(f"ldg.p={p}", "ldg.weight=0.5"), torch.device("cpu")
    model = build_model(config)
    params = [q for q in model.parameters() if q.requires_grad]
    stats = (model.backbone.mean, model.backbone.std)
    g = torch.Generator().manual_seed(0)
    masks = [None, None] if p == 1 else [torch.tensor([True, False, True]), torch.tensor([False, False, True])]
    micro = [_ldg_batch(g, 3, masks[0]), _ldg_batch(g, 3, masks[1])]
    whole = {k: (micro[0][k] + micro[1][k] if k == "name" else torch.cat([b[k] for b in micro])) for k in micro[0]}

    def grads(loss):
        return torch.autograd.grad(loss, params)

    expected = grads(loss_fn(model, whole, config, cpu, stats))
    inputs = [training_inputs(b, config, cpu) for b in micro]
    loss, score_grads, tokens = step_scores(model, inputs, config, stats)
    torch.testing.assert_close(loss, loss_fn(model, whole, config, cpu, stats).detach())
    # The second pass starts from the first's tower tokens: the head alone, with autograd.
    torch.testing.assert_close(tokens, [model.backbone(normalize(x.images, *stats)) for x in inputs])
    parts = [grads((model(normalize(x.images, *stats), tokens=t).score.float() * d).sum())
             for x, d, t in zip(inputs, score_grads, tokens)]
    torch.testing.assert_close([a + b for a, b in zip(*parts)], list(expected))
    # What accumulating per micro-batch losses gives instead: PLCC over 3 samples (and their copies) at a time.
    per_micro = [grads(loss_fn(model, b, config, cpu, stats)) for b in micro]
    assert not all(torch.allclose((a + b) / 2, e) for a, b, e in zip(*per_micro, expected))


def test_accumulated_steps_train_as_whole_batches_with_plcc_over_the_step(tmp_path, shards, capsys, monkeypatch):
    from temu_dist.model.backbone import Backbone

    tower_images, forward = [], Backbone.forward
    monkeypatch.setattr(Backbone, "forward", lambda self, x: tower_images.append(len(x)) or forward(self, x))

    def tower_images_of(name: str, *overrides: str) -> tuple[dict, int]:
        tower_images.clear()
        return train(run_config(tmp_path / name, shards, "train.epochs=1", *overrides)), sum(tower_images)

    (whole, whole_tower), (split, split_tower) = tower_images_of("a"), tower_images_of("b", "train.per_device_batch=2")
    # The second pass over each micro-batch runs the head alone, on the first pass's tower tokens.
    assert split_tower == whole_tower
    assert re.search(r"train: PLCC over each step's 4 samples, not each micro-batch's 2 "
                     r"\(train.plcc_over=micro_batch\): each micro-batch's tower tokens are kept for the step \(8 "
                     r"tower images, the samples and their LDG copies: up to \d+\.\d MiB per process\)",
                     capsys.readouterr().out)
    # Without them it runs the tower again: the same step at one micro-batch's memory.
    _, again_tower = tower_images_of("d", "train.per_device_batch=2", "train.keep_tokens=false")
    assert again_tower > whole_tower
    assert "each micro-batch runs through the tower twice (train.keep_tokens=true: once" in capsys.readouterr().out
    per_micro = train(run_config(tmp_path / "c", shards, "train.epochs=1", "train.per_device_batch=2",
                                 "train.plcc_over=micro_batch"))
    assert "train: PLCC over each micro-batch's 2 sample(s), not the step's 4" in capsys.readouterr().out
    weights = {name: load_file(str(tmp_path / name / "run" / "checkpoints" / "last" / "weights.safetensors"))
               for name in "abcd"}
    assert all(torch.allclose(weights["a"][k], weights[other][k], atol=1e-6) for k in weights["a"] for other in "bd")
    assert not all(torch.allclose(weights["a"][k], weights["c"][k], atol=1e-6) for k in weights["a"])
    assert whole["history"][0]["loss"] == pytest.approx(split["history"][0]["loss"], rel=1e-5)
    assert per_micro["history"][0]["loss"] != pytest.approx(whole["history"][0]["loss"], rel=1e-5)


def test_plcc_over_one_sample_at_a_time_is_said_to_be_no_correlation(tmp_path, shards, capsys):
    train(run_config(tmp_path, shards, "train.epochs=1", "train.batch_size=2", "train.per_device_batch=1",
                     "train.plcc_over=micro_batch", "train.max_steps_per_epoch=1"))
    assert "train: warning: PLCC over 1 sample at a time is no correlation (0 alone, +-1 with its LDG copy): raise " \
           "train.per_device_batch, or use train.plcc_over=step\n" in capsys.readouterr().out
    train(run_config(tmp_path / "one", shards, "train.epochs=1", "train.batch_size=1", "train.max_steps_per_epoch=1"))
    assert "copy): raise train.batch_size\n" in capsys.readouterr().out


def test_what_training_cannot_use_is_refused_before_any_work(tmp_path, shards):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"^out_dir {tmp_path / 'file'}: it is a file, not a folder$"):
        train(run_config(tmp_path / "file", shards))
    with pytest.raises(ConfigError, match=f"^name: {tmp_path / 'file'} is a file, not a run folder: give the run "
                                          "another name=$"):
        train(run_config(tmp_path, shards, "name=file"))
    with pytest.raises(ConfigError, match=r"^name: 'mlartifacts/x': out_dir/mlartifacts is MLflow's own store of the "
                                          r"runs' files; take another name$"):
        train(run_config(tmp_path, shards, "name=mlartifacts/x"))
    with pytest.raises(ConfigError, match=r"^model.image_size: CW-SSIM \(ldg.fidelity\) compares images of at least 64 "
                                          r"px a side, this one has 48"):
        train(run_config(tmp_path, shards, "model.image_size=48"))
    with pytest.raises(ConfigError, match=r"^eval.cross.0.image_size: CW-SSIM .* this one has 32"):
        train(run_config(tmp_path, shards, "eval.ldg=true", "ldg.enabled=false",
                         f"eval.cross=[{{name: x, shards: {shards}, image_size: 32}}]"))
    with pytest.raises(ConfigError, match=f"^eval.cross.0.shards: {tmp_path / 'none' / 'manifest.json'} not found"):
        train(run_config(tmp_path, shards, f"eval.cross=[{{name: x, shards: {tmp_path / 'none'}}}]"))
    # One check names every pack still to make (each once), not one a run: Table 3's config names five.
    cross = f"eval.cross=[{{name: a, shards: {tmp_path / 'a'}}}, {{name: b, shards: {shards}}}, " \
        f"{{name: c, shards: {tmp_path / 'c'}}}, {{name: d, shards: {tmp_path / 'none'}}}, " \
        f"{{name: e, shards: {tmp_path / 'c'}}}]"
    with pytest.raises(ConfigError, match=rf"^data.train: {tmp_path / 'none' / 'manifest.json'} not found: make the "
                                          rf"shards first, .*; not packed either: eval.cross.0.shards "
                                          rf"\({tmp_path / 'a'}\), eval.cross.2.shards \({tmp_path / 'c'}\)$"):
        train(run_config(tmp_path, str(tmp_path / "none"), cross))
    from temu_dist.evaluate import eval_sets  # evaluate's own reading of the sets, without train's checks first

    with pytest.raises(ConfigError, match=rf"^data.train: .*; not packed either: eval.cross.0.shards "
                                          rf"\({tmp_path / 'a'}\), eval.cross.2.shards \({tmp_path / 'c'}\)$"):
        eval_sets(run_config(tmp_path, str(tmp_path / "none"), cross))
    with pytest.raises(ConfigError, match=rf"^eval.cross.0.shards: {tmp_path / 'a' / 'manifest.json'} not found: make "
                                          rf"the shards first, .*; not packed either: eval.cross.2.shards "
                                          rf"\({tmp_path / 'c'}\), eval.cross.3.shards \({tmp_path / 'none'}\)$"):
        train(run_config(tmp_path, shards, cross))
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]


def test_a_save_killed_after_an_earlier_kill_between_its_renames_keeps_the_checkpoint(tmp_path, monkeypatch):
    from temu_dist.checkpoint import find_checkpoint, save_checkpoint
    from temu_dist.model.temu import build_model

    config = tiny_config()
    model = build_model(config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    last = tmp_path / "last"
    save_checkpoint(last, model, config, optimizer, scheduler, {"next_epoch": 1})
    last.rename(tmp_path / "last.old")  # what a kill between the two renames leaves
    assert find_checkpoint(last) == tmp_path / "last.old"

    def killed(self, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "rename", killed)  # the next save dies before its new checkpoint is in place
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(last, model, config, optimizer, scheduler, {"next_epoch": 2})
    assert find_checkpoint(last) == tmp_path / "last.old"


def test_a_resume_on_fewer_gpus_than_saved_sets_the_rng_of_those_it_has(monkeypatch):
    from temu_dist.checkpoint import rng_state, set_rng_state

    state = {**rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]}
    set_on = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new_state, device="cuda": set_on.append(device))
    set_rng_state(state)
    assert set_on == [0]


def test_a_finished_run_asked_for_other_evaluation_says_how_to_score_it(tmp_path, shards):
    train(run_config(tmp_path, shards, "train.epochs=1"))
    with pytest.raises(ConfigError, match=r"^eval.ldg: .*run finished with False, this run asks for True; a finished "
                                          r"run is not evaluated again: score its best weights with python -m "
                                          r"temu_dist.evaluate --checkpoint .*run eval.ldg=\.\.\., or train under "
                                          r"another name=, or start anew in its place with train.resume=never, which "
                                          r"replaces its checkpoints and results$"):
        train(run_config(tmp_path, shards, "train.epochs=1", "eval.ldg=true"))
    # A list of sets is named and shown whole, and given whole in the hint: its items are not overrides of their own.
    with pytest.raises(ConfigError, match=r"^eval.cross: .*run finished with \[\], this run asks for \[\{'name': 'x', "
                                          r".*; a finished run is not evaluated again: score its best weights with "
                                          r"python -m temu_dist.evaluate --checkpoint .*run 'eval.cross=\[\.\.\.\]', "
                                          r"or"):
        train(run_config(tmp_path, shards, "train.epochs=1", f"eval.cross=[{{name: x, shards: {shards}}}]"))
    train(run_config(tmp_path, shards, "train.epochs=1", "eval.batch_size=3"))  # how it is scored, not what


def test_a_resume_knows_its_packs_by_what_they_hold_not_by_how_their_path_is_spelt(tmp_path, shards, monkeypatch):
    # The same pack copied to a node's own disk, or named from another folder, resumes; one packed again in place
    # (another split) is refused, where its test set would have changed under the epochs the best is picked among.
    settings = ("train.epochs=2", f"eval.cross=[{{name: again, shards: {shards}}}]")
    train(run_config(tmp_path, shards, *settings, "train.epochs=1"))
    copy = tmp_path / "copied"
    shutil.copytree(shards, copy)
    monkeypatch.chdir(tmp_path)
    resumed = train(run_config(tmp_path, "copied", *settings, "eval.cross=[{name: again, shards: copied}]",
                               "train.resume=extend"))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["split"]["seed"] = 5
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"^data.train: copied holds another pack than .*last was trained on \(its "
                                          r"manifest differs: packed again\?\); resume with that pack"):
        train(run_config(tmp_path, "copied", "train.epochs=3", "train.resume=extend",
                         f"eval.cross=[{{name: again, shards: {shards}}}]"))
    with pytest.raises(ConfigError, match=r"^eval.cross: copied holds another pack than .*last was scored on"):
        train(run_config(tmp_path, shards, "train.epochs=3", "train.resume=extend",
                         "eval.cross=[{name: again, shards: copied}]"))
    # A checkpoint saved before it kept its packs' hashes: known by their paths, as then.
    info_file = tmp_path / "run" / "checkpoints" / "last" / "trainer.json"
    info = json.loads(info_file.read_text())
    del info["packs"]
    info_file.write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=r"^data.train: .*last was trained with 'copied', this run asks for "):
        train(run_config(tmp_path, shards, "train.epochs=3", "train.resume=extend", *settings[1:]))


def test_check_says_what_a_run_would_train_and_where_it_goes_on_and_writes_nothing(tmp_path, shards, finished_run,
                                                                                   capsys):
    from temu_dist.train import main

    counts = {split: sum(s["count"] for s in info["shards"])
              for split, info in json.loads((Path(shards) / "manifest.json").read_text())["splits"].items()}
    first = ["train: model: Test-Tiny-ViT-16, random weights, layers all of 4, TeMu-IQA-I, prompts cocoop, input 64x64 "
             "(bicubic)",
             f"train: training: {shards} 'train', {counts['train']} images: {counts['train'] // 4} optimizer steps an "
             f"epoch at a global batch of 4, {counts['train'] // 4 * 2} in 2 epochs, cosine per step, LDG on",
             f"train: scored after each epoch: val ({counts['val']} images), test ({counts['test']} images); the best "
             "epoch by test/srcc"]
    assert main(["--check", *TINY_OVERRIDES, *run_overrides(tmp_path, shards)]) == 0
    assert capsys.readouterr().out.splitlines() == [*first, f"train: run folder: {tmp_path / 'run'}, a new run"]
    assert list(tmp_path.iterdir()) == []  # no run folder, no MLflow store
    before = _files(finished_run)
    done = run_overrides(finished_run.parent, shards, "train.epochs=1")
    assert main(["--check", *TINY_OVERRIDES, *done]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"train: run folder: {finished_run}, finished: the same " \
                                                       "command reports its results"
    assert main([*TINY_OVERRIDES, *done, "--check", "train.resume=never"]) == 0  # flags among the overrides too
    assert capsys.readouterr().out.splitlines()[-1] == f"train: run folder: {finished_run}, a new run (it held a " \
        "finished run: its checkpoints/last, checkpoints/best, results.json, plots are removed)"
    assert main(["--check", *TINY_OVERRIDES, *done, "train.resume=extend", "train.epochs=3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"train: run folder: {finished_run}, extends to 3 epochs from " \
                                                       f"{finished_run / 'checkpoints' / 'last'} (after epoch 1)"
    # What train() itself would refuse, in its words.
    assert main(["--check", *TINY_OVERRIDES, *done, "seed=5"]) == 1
    assert capsys.readouterr().err.startswith(f"train: seed: {finished_run / 'checkpoints' / 'last'} was trained "
                                              "with 0, this run asks for 5")
    assert main(["--check", *TINY_OVERRIDES, *done, "model.pretrained=openia"]) == 1
    assert capsys.readouterr().err.startswith("train: model.pretrained: unknown pretrained tag 'openia'")
    assert _files(finished_run) == before
