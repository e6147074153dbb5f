"""Ray Tune searches end to end on tiny shards: MLflow parent/child runs, a retried trial, a resumed search."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import ray
import torch
import yaml

from temu_dist import stop
from temu_dist import train as train_cli
from temu_dist import tune as tune_cli
from temu_dist.config import ConfigError
from temu_dist.data.splits import SplitSpec
from temu_dist.pack import PackOptions, pack
from temu_dist.tune import load_search, param_space, run_search, run_trial, trial_label
from tests.conftest import write_kadid

REPO = Path(__file__).resolve().parents[1]
# The tests that start a local Ray: one worker runs them one after another, and first (pytest-xdist sends the groups
# with the most tests out first). Last in the file, they were the suite's end: in one full run the last search ran on
# alone for 72 s after every other test had finished.
RAY = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("kadid")
    write_kadid(root, refs=8, per_ref=2, size=(64, 64))
    out = root / "shards"
    pack(PackOptions("kadid10k", str(root), str(out), split=SplitSpec("ratio", (0.75, 0.0, 0.25), by_reference=True),
                     shard_size=4, workers=1))
    return str(out)


@pytest.fixture
def ray_tmp(monkeypatch):
    # Ray's socket paths must stay short; a pytest folder is too deep for them.
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as tmp:
        monkeypatch.setenv("TEMU_RAY_TMP", tmp)
        yield tmp
        ray.shutdown()


def _search_file(tmp_path: Path, shards: str, name: str, space: dict, **extra) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "model": {"backbone": "TeMu-Tiny-ViT-16", "pretrained": None, "image_size": 64, "n_ctx": 4},
        "data": {"train": shards, "workers": 0}, "device": "cpu",
        "train": {"epochs": 2, "batch_size": 4}, "eval": {"splits": ["test"], "batch_size": 8},
        "ldg": {"region_min": 8, "region_max": 24}}))
    search = {"name": name, "out_dir": str(tmp_path / "runs"), "base": str(base), "space": space,
              "resources": {"cpu": 1}, "max_concurrent": 2, "asha": None, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(search))
    return path


def _runs(search_dir: Path) -> tuple[mlflow.entities.Run, list]:
    # The store is out_dir's, which the search shares with every other run there.
    client = mlflow.MlflowClient(f"sqlite:///{search_dir.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("temu-dist")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("temu.search") == "true")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


@RAY
def test_search_gives_one_parent_run_and_a_child_run_per_trial_a_failed_one_retried(tmp_path, shards, ray_tmp,
                                                                                     monkeypatch, capsys):
    search = load_search(_search_file(tmp_path, shards, "prompts", {"model.prompt": {"grid": ["none", "coop"]}},
                                      max_failures=1))
    summary = run_search(search, trainable=flaky_trial)
    # Tracked in MLflow: no TensorBoard event files, nor Ray's hint to open them; the trials' CSV and JSON logs stay.
    assert "TensorBoard" not in capsys.readouterr().out
    assert not list((tmp_path / "runs" / "prompts").rglob("events.out.tfevents*"))
    assert list((tmp_path / "runs" / "prompts").rglob("progress.csv"))
    assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ
    assert len(list((tmp_path / "runs" / "prompts").glob("attempted-*"))) == 1  # the failed first attempt
    assert sorted(r["model.prompt"] for r in summary["trials"]) == ["coop", "none"]
    assert all(r["best"] is not None and r["error"] is None and r["epochs"] == 2 for r in summary["trials"])
    assert summary["best"]["best"] == max(r["best"] for r in summary["trials"])
    search_dir = tmp_path / "runs" / "prompts"
    parent, children = _runs(search_dir)
    client = mlflow.MlflowClient(f"sqlite:///{search_dir.parent / 'mlflow.db'}")
    assert parent.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["overrides"]) == [] and summary["mlflow"].startswith("sqlite:///")
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"search.json", "prompt_table.png",
                                                                          "best-config.yaml"}
    # The best trial's config trains it again as a run of its own, not into the search as one more trial.
    best = yaml.safe_load((search_dir / "best-config.yaml").read_text())
    assert summary["best_config"] == str(search_dir / "best-config.yaml")
    assert best["model"]["prompt"] == summary["best"]["model.prompt"] and best["name"] == "prompts-best"
    assert best["out_dir"] == "runs" and best["tracking"]["parent_run_id"] is None
    assert best["tracking"]["run_name"] is None and best["data"]["train"] == str(Path(shards).absolute())
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["model.prompt"] for c in children) == ["coop", "none"]
    for child in children:  # the UI's run list reads as the search's table
        assert child.info.run_name == f"{child.data.params['name']} prompt={child.data.params['model.prompt']}"
        history = client.get_metric_history(child.info.run_id, "test/srcc")
        assert [m.step for m in history] == [1, 2]
    assert json.loads((search_dir / "search.json").read_text())["best"]["trial"] == summary["best"]["trial"]
    path = tmp_path / "prompts.yaml"
    # Rerun as it was: the same results, gathered from what Ray saved without starting Ray, into the same parent run.
    with monkeypatch.context() as no_ray:
        _refuse_ray(no_ray)
        again = run_search(load_search(path))
    assert again["trials"] == json.loads(json.dumps(summary["trials"])) and again["best"] == summary["best"]
    rerun_parent, rerun_children = _runs(search_dir)
    assert rerun_parent.info.run_id == parent.info.run_id and len(rerun_children) == 2
    # Rerun with another search, under the same name: refused, not restored with this one's results.
    finished = r"; it has finished, and a finished search is not extended: give the changed one another name= \(each " \
        r"of its trials trains anew\) and report both folders side by side$"
    with pytest.raises(ConfigError, match=r"^train.epochs: the search prompts in .* was started with 2, this run asks "
                                          r"for 1" + finished):
        run_search(load_search(path, ["overrides=[train.epochs=1]"]))
    with pytest.raises(ConfigError, match=r"^space.model.layers.grid: the search prompts .* started without it, this "
                                          r"run asks for \['all', 'upto:3'\]" + finished):
        run_search(load_search(path, ["space.model.layers={grid: [all, 'upto:3']}"]))
    # With a trial that errored, which a rerun tries again, it is resumed as it was started.
    errored = json.loads((search_dir / "search.json").read_text())
    errored["trials"][0]["error"] = "RuntimeError: out of memory"
    (search_dir / "search.json").write_text(json.dumps(errored))
    with pytest.raises(ConfigError, match=r"^train.epochs: .* this run asks for 1; rerun it as it was started to "
                                          r"resume it, or give the changed search another name=$"):
        run_search(load_search(path, ["overrides=[train.epochs=1]"]))


def test_a_trials_run_name_says_the_values_it_tries():
    params = {"model.prompt": "coop", "model.layers": "upto:12", "train.lr": 0.000123456, "ldg.weight": 0.5,
              "data.train": "/data/shards/koniq", "model.weight": 1, "ldg.enabled": True,
              "train.key_metric": "val/srcc", "model.backbone": "hf-hub:org/model"}
    assert trial_label("trial-ab12_00003", params) == (
        "trial-ab12_00003 prompt=coop layers=upto:12 lr=0.0001235 ldg.weight=0.5 train=koniq model.weight=1 "
        "enabled=True key_metric=val/srcc backbone=hf-hub:org/model")  # paths alone by their last part


@RAY
def test_a_trial_can_train_on_several_ray_train_processes(tmp_path, shards, ray_tmp, capfd):
    search = load_search(_search_file(tmp_path, shards, "workers", {"model.prompt": {"grid": ["coop"]}},
                                      resources={"cpu": 0.5, "workers": 2}))
    summary = run_search(search)
    said = capfd.readouterr()
    # As a train process's: Ray Train's print said each line twice, its logging set the root logger to INFO (open_clip
    # said how it built the model), its placement group cleaner warned each second that the State API (the
    # dashboard's, which ray[tune] lacks) was not there, and Ray's core logged an error as its preemption watcher
    # started.
    both = said.out + said.err
    assert both.count("train: 2 process(es) on cpu") == 1, said.out[-3000:] + said.err[-3000:]
    assert "Instantiating model architecture" not in both and "Failed to query Ray Train Controller" not in both
    assert "PreemptionWatcher" not in both, both[-3000:]
    (row,) = summary["trials"]
    assert row["error"] is None and row["epochs"] == 2 and row["best"] is not None
    run = tmp_path / "runs" / "workers" / "trials" / row["trial"]
    results = json.loads((run / "results.json").read_text())
    assert results["processes"] == 2
    assert results["best"]["test"]["count"] == results["best"]["test"]["expected"]


def test_a_trials_warnings_for_the_user_are_one_line_naming_the_trial(tmp_path, shards, monkeypatch, capsys):
    import warnings

    import ray.tune
    import temu_dist.train as train_mod
    from temu_dist.config import Notice
    from temu_dist.tune import base_config

    record = {"epoch": 1, "loss": 0.1, "lr": 0.0, "images_per_s": 1.0, "eval": {"test": {"srcc": 0.5}}}

    def warns(config, on_epoch):
        warnings.warn("MLflow tracking at X is not usable", Notice, stacklevel=2)
        return {"history": [record]}

    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "ab_00001"))
    monkeypatch.setattr(ray.tune, "report", lambda metrics: None)
    monkeypatch.setattr(train_mod, "train", warns)
    search = load_search(_search_file(tmp_path, shards, "notice", {"model.prompt": {"grid": ["none"]}}))
    run_trial({"model.prompt": "none"}, base=base_config(search), trials_dir=str(tmp_path / "trials"),
              tracking_uri="sqlite:///x.db", parent=None)
    assert capsys.readouterr().err == "trial-ab_00001: warning: MLflow tracking at X is not usable\n"


def test_a_trial_whose_loss_went_non_finite_fails_again_at_once_when_retried(tmp_path, shards, monkeypatch):
    # It would replay the same batches to the same loss (max_failures times over, and again on every resume). The
    # mark is what train leaves in the run folder (test_train).
    import ray.tune
    import temu_dist.train as train_mod
    from temu_dist.tune import base_config

    trained = []
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "ab_00001"))
    monkeypatch.setattr(train_mod, "train", lambda config, on_epoch: trained.append(config.name))
    search = load_search(_search_file(tmp_path, shards, "nan", {"model.prompt": {"grid": ["none"]}}))
    trial = {"params": {"model.prompt": "none"}, "base": base_config(search), "trials_dir": str(tmp_path / "trials"),
             "tracking_uri": "sqlite:///x.db", "parent": None}
    marker = tmp_path / "trials" / "trial-ab_00001" / train_mod.NONFINITE
    marker.parent.mkdir(parents=True)
    marker.write_text("epoch 1: the loss became non-finite on 1 of 1 process(es)")
    with pytest.raises(train_mod.NonFiniteLoss, match=rf"^epoch 1: the loss became non-finite on 1 of 1 process\(es\) "
                                                      rf"\[an earlier attempt; delete {re.escape(str(marker))} to "
                                                      rf"train it again\]$"):
        run_trial(**trial)
    assert trained == []


def flaky_trial(params, **kwargs):
    """Fails the first attempt of the trial without prompts, as a lost node or an out-of-memory kill would. One
    trial, not both: each attempt is a Ray worker process of its own, 11-17 CPU-seconds here."""
    from ray import tune

    marker = Path(kwargs["trials_dir"]).parent / f"attempted-{tune.get_context().get_trial_id()}"
    if params["model.prompt"] == "none" and not marker.exists():
        marker.write_text("1")
        raise RuntimeError("first attempt fails")
    run_trial(params, **kwargs)


@RAY
def test_killed_search_resumes_without_redoing_finished_trials(tmp_path, shards, ray_tmp, capsys):
    path = _search_file(tmp_path, shards, "resume", {"model.prompt": {"grid": ["none", "coop"]}}, max_concurrent=1)
    search_dir = tmp_path / "runs" / "resume"
    cmd = [sys.executable, "-m", "temu_dist.tune", "--config", str(path)]
    env = dict(os.environ, PYTHONPATH=str(REPO), TEMU_RAY_TMP=ray_tmp)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (search_dir / "prompt_table.png").exists():  # drawn as the first trial ended, not only at the end
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the search ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # A finished trial's last checkpoint is written by its last epoch; redoing any epoch would rewrite it.
    finished = {p.parent.name: (p.parent / "checkpoints" / "last" / "weights.safetensors").stat().st_mtime_ns
                for p in (search_dir / "trials").glob("*/results.json")}
    assert len(finished) == 1
    assert tune_cli.main(["--config", str(path), "--check"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"tune: search folder: {search_dir}, resumes the search it holds"
    # The same command again, in this process: a driver process of its own would cost 11-12 CPU-seconds of imports.
    assert tune_cli.main(["--config", str(path)]) == 0
    assert {name: (search_dir / "trials" / name / "checkpoints" / "last" / "weights.safetensors").stat().st_mtime_ns
            for name in finished} == finished
    summary = json.loads((search_dir / "search.json").read_text())
    assert sorted(r["model.prompt"] for r in summary["trials"]) == ["coop", "none"]
    assert all(r["best"] is not None for r in summary["trials"])
    _, children = _runs(search_dir)
    assert len(children) == 2
    # Resumed with the callbacks it was saved with, which hold its own loggers: Ray adds no TensorBoard one either.
    assert not list(search_dir.rglob("events.out.tfevents*"))
    capsys.readouterr()
    assert tune_cli.main(["--config", str(path), "--check"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"tune: search folder: {search_dir}, finished: its results are gathered again"


def _trial(tmp_path: Path, trial_id: str, config: dict, reports: list[float] | None, status: str = "RUNNING",
           restored: bool = False):
    """A Ray Tune trial as the driver's callbacks see it, with what Ray's CSV logger wrote of its reports: in this
    session's staging folder, or, for one that ended before a resume, in the search's own folder only."""
    staging, stored = tmp_path / "session" / trial_id, tmp_path / "ray" / trial_id
    for folder in (staging, stored):
        folder.mkdir(parents=True)
    if reports is not None:
        (stored if restored else staging).joinpath("progress.csv").write_text(
            "epoch,test/srcc,trial_id\n" + "".join(f"{epoch},{value},{trial_id}\n"
                                                  for epoch, value in enumerate(reports, 1)))
    return SimpleNamespace(trial_id=trial_id, config=config, status=status, local_path=str(staging),
                           path=str(stored), last_result={"epoch": len(reports)} if reports else {})


def test_the_search_plots_are_redrawn_and_logged_to_its_parent_run_each_time_a_trial_ends(tmp_path, monkeypatch):
    import pickle

    from temu_dist import plots
    from temu_dist.tracking import parent_run

    search = tune_cli.SearchConfig(base="base.yaml", space={"model.prompt": {"grid": ["none", "coop"]},
                                                            "model.layers": {"grid": ["all", "upto:3"]}},
                                   num_samples=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent, _ = parent_run(uri, "temu-dist", "search", tmp_path / "parent_id", {}, {}, "search")
    drawn = []
    real = plots.prompt_table
    monkeypatch.setattr(plots, "prompt_table", lambda rows, *args: drawn.append((rows, args[-1])) or real(rows, *args))
    a = _trial(tmp_path, "a", {"model.prompt": "coop", "model.layers": "all"}, [math.nan, 0.4, 0.3])
    b = _trial(tmp_path, "b", {"model.prompt": "none", "model.layers": "upto:3"}, None)
    c = _trial(tmp_path, "c", {"model.prompt": "none", "model.layers": "all"}, [0.2], "TERMINATED", restored=True)
    d = _trial(tmp_path, "d", {"model.prompt": "coop", "model.layers": "upto:3"}, [0.1])
    callback = tune_cli.SearchProgress(search, tmp_path, "test/srcc", uri, parent)
    callback.on_trial_error(iteration=1, trials=[b], trial=b)  # no result yet: nothing to draw
    assert not (tmp_path / "prompt_table.png").exists() and not drawn
    # As Ray saves it with the search, by reference to the class (plain pickle refuses a class made in a function);
    # c ended before the resume.
    callback = pickle.loads(pickle.dumps(callback))
    callback.on_trial_complete(iteration=2, trials=[a, b, c], trial=a)
    rows, note = drawn[-1]
    assert [(r["trial"], r["model.prompt"], r["best"], r["epochs"]) for r in rows] == [
        ("trial-a", "coop", 0.4, 3), ("trial-b", "none", None, None), ("trial-c", "none", 0.2, 1)]  # NaN left out
    assert note == "3 of 4 trials ended"  # of the 4 planned, though Ray has made 3 so far
    client = mlflow.MlflowClient(uri)
    assert {f.path for f in client.list_artifacts(parent)} == {"prompt_table.png", "layer_study.png"}
    assert client.get_run(parent).info.status == "RUNNING"
    before = (tmp_path / "layer_study.png").read_bytes()
    callback.on_trial_complete(iteration=3, trials=[a, b, c, d], trial=d)
    assert [r["trial"] for r in drawn[-1][0]] == ["trial-a", "trial-b", "trial-c", "trial-d"] and drawn[-1][1] == \
        "4 of 4 trials ended"
    assert (tmp_path / "layer_study.png").read_bytes() != before
    # A plot that fails is a warning: the search goes on.
    monkeypatch.setattr(plots, "prompt_table", lambda *args: 1 / 0)
    with pytest.warns(UserWarning, match=r"could not draw the search's plots so far \(ZeroDivisionError"):
        callback.on_trial_complete(iteration=4, trials=[a, b, c, d], trial=d)


def _refuse_ray(monkeypatch) -> None:
    """ray.init fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture
def no_ray(monkeypatch):
    """A test that fails if Ray is started: what it checks must be refused before."""
    _refuse_ray(monkeypatch)


@pytest.mark.parametrize(("gpus", "cpus", "resources", "says"), [
    (0, 2, {"cpu": 1, "gpu": 1}, "resources.gpu: one trial needs 1 GPU, this machine has 0: lower it (e.g. --config "
                                 "FILE resources.gpu=0)"),
    (1, 2, {"cpu": 0.5, "gpu": 1, "workers": 2}, "resources.gpu: one trial needs 2 GPUs (2 workers x 1), this machine "
                                                 "has 1: lower it (e.g. --config FILE resources.gpu=0.5)"),
    (0, 2, {"cpu": 8}, "resources.cpu: one trial needs 8 CPUs, this machine has 2: lower it (e.g. --config FILE "
                       "resources.cpu=2)"),
])
def test_a_trial_this_machine_cannot_hold_is_refused_before_ray_starts(tmp_path, shards, no_ray, monkeypatch, gpus,
                                                                        cpus, resources, says):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(tune_cli, "_local_cpus", lambda: cpus)
    search = load_search(_search_file(tmp_path, shards, "big", {"model.prompt": {"grid": ["coop"]}},
                                      resources=resources))
    with pytest.raises(ConfigError) as refused:
        run_search(search)
    assert str(refused.value).startswith(says) and "RAY_ADDRESS" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "runs").exists()  # no search folder, no MLflow parent run


@pytest.mark.parametrize("cgroup", [{"cpu.max": "400000 100000\n"},  # v2
                                    {"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}],  # v1
                         ids=["v2", "v1"])
def test_a_trial_over_the_containers_cpu_quota_is_refused_before_ray_starts(tmp_path, shards, no_ray, monkeypatch,
                                                                             cgroup):
    # docker --cpus=4 on a 64-core host: a local Ray has 4 CPUs, and a trial that asks for 8 would wait for ever.
    import multiprocessing

    from ray._private import utils as ray_utils

    root = tmp_path / "cgroup"
    for name, text in cgroup.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    read_quota = ray_utils._get_docker_cpus
    # Ray's own reader of the quota, on this fake cgroup tree.
    monkeypatch.setattr(ray_utils, "_get_docker_cpus", lambda: read_quota(
        cpu_quota_file_name=str(root / "cpu/cpu.cfs_quota_us"),
        cpu_period_file_name=str(root / "cpu/cpu.cfs_period_us"),
        cpuset_file_name=str(root / "cpuset/cpuset.cpus"), cpu_max_file_name=str(root / "cpu.max")))
    monkeypatch.setattr(multiprocessing, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.delenv("RAY_USE_MULTIPROCESSING_CPU_COUNT", raising=False)
    search = load_search(_search_file(tmp_path, shards, "quota", {"model.prompt": {"grid": ["coop"]}},
                                      resources={"cpu": 8}))
    with pytest.raises(ConfigError, match=r"^resources\.cpu: one trial needs 8 CPUs, this machine has 4: lower it "
                                          r"\(e\.g\. --config FILE resources\.cpu=4\)"):
        run_search(search)


class Joined(Exception):
    """ray.init reached, with these arguments."""


@pytest.fixture
def ray_joins(monkeypatch):
    """ray.init raises Joined: the search got past its checks, and Ray is not started."""
    def join(**kwargs):
        raise Joined(kwargs)

    monkeypatch.setattr(ray, "init", join)


@pytest.mark.filterwarnings("ignore:a search on the Ray cluster")
def test_a_search_on_a_ray_cluster_is_not_checked_against_this_machine(tmp_path, shards, monkeypatch, ray_joins):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    search = load_search(_search_file(tmp_path, shards, "cluster", {"model.prompt": {"grid": ["coop"]}},
                                      resources={"cpu": 64, "gpu": 8}, overrides=["tracking.enabled=false"]))
    # Trials on other nodes get what the driver's environment says of the MLflow server, Hugging Face and proxies.
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "secret")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("https_proxy", "http://proxy:3128")
    monkeypatch.setenv("UNRELATED", "x")
    with pytest.raises(Joined) as joined:
        run_search(search)
    assert joined.value.args[0]["address"] == "ray://head:10001"
    env = joined.value.args[0]["runtime_env"]["env_vars"]
    assert (env["MLFLOW_TRACKING_TOKEN"], env["HF_HUB_OFFLINE"], env["https_proxy"]) == ("secret", "1",
                                                                                         "http://proxy:3128")
    assert "UNRELATED" not in env and "PATH" not in env
    assert not (tmp_path / "runs").exists()  # joined before anything is written


def _node(cpus, gpus=0, alive=True):
    return {"Alive": alive, "Resources": {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {}), "memory": 1e9}}


def test_a_trial_no_node_of_the_cluster_can_hold_is_said_and_one_that_fits_is_not():
    gpu_trial = tune_cli.Resources(cpu=2, gpu=1)
    assert tune_cli._no_node_fits(gpu_trial, [_node(4), _node(8, 1, alive=False)]) == (
        "resources: one trial asks for 2 CPUs, 1 GPU, which no node of the cluster has (1 alive: 4 CPUs, 0 GPUs); its "
        "trials stay PENDING until an autoscaler adds such nodes (Ctrl-C stops the search), or lower resources.cpu / "
        "resources.gpu")
    assert tune_cli._no_node_fits(gpu_trial, [_node(4), _node(2, 1)]) is None
    assert tune_cli._no_node_fits(gpu_trial, [_node(1, 1)]) is not None  # the GPU, but not the CPUs, on one node
    # A Ray Train trial's workers may spread over the nodes.
    train_trial = tune_cli.Resources(cpu=1, gpu=1, workers=2)
    assert tune_cli._no_node_fits(train_trial, [_node(4, 1), _node(4, 1)]) is None
    assert tune_cli._no_node_fits(train_trial, [_node(4, 1)]).startswith(
        "resources: one trial asks for 2 processes of 1 CPU, 1 GPU and 0.01 CPU for the trial itself, which the "
        "cluster's nodes have no room for (1 alive: 4 CPUs, 1 GPUs)")
    # Workers that take every CPU leave none for the trial's own 0.01: it would wait for ever.
    assert tune_cli._no_node_fits(train_trial, [_node(1, 1), _node(1, 1)]) is not None
    assert tune_cli._no_node_fits(train_trial, [_node(1, 1), _node(1.01, 1)]) is None
    assert tune_cli._no_node_fits(train_trial, [_node(1, 1), _node(1, 1), _node(0.5)]) is None
    assert tune_cli._no_node_fits(tune_cli.Resources(cpu=0.5), [_node(1)]) is None


def test_nodes_whose_cpus_hold_fewer_trials_than_their_gpus_are_said(tmp_path, shards):
    """SLURM's --cpus-per-task 32 on an 8-GPU node, trials of 8 CPUs and 1 GPU: 4 GPUs idle while trials wait."""
    search = load_search(_search_file(tmp_path, shards, "s", {"seed": {"grid": list(range(16))}},
                                      resources={"cpu": 8, "gpu": 1}, max_concurrent=0))
    assert tune_cli._idle_gpus(search, lambda: [_node(32, 8), _node(32, 8)]) == (
        "resources: 8 trial(s) run at once where the GPUs hold 16, as each asks for 8 CPUs (2 alive: 32 CPUs, 8 "
        "GPUs; 32 CPUs, 8 GPUs): give each node resources.cpu / resources.gpu CPUs per GPU (under SLURM, sbatch "
        "--cpus-per-task), or lower resources.cpu")
    assert tune_cli._idle_gpus(search, lambda: [_node(64, 8), _node(64, 8)]) is None
    # Not where fewer trials are planned, or let run at once, than the CPUs hold.
    nodes = [_node(32, 8), _node(32, 8)]
    assert tune_cli._idle_gpus(search.model_copy(update={"max_concurrent": 8}), lambda: nodes) is None
    assert tune_cli._idle_gpus(search.model_copy(update={"space": {"seed": {"grid": [0, 1, 2, 3]}}}),
                               lambda: nodes[:1]) is None
    # A search of CPU trials does not ask Ray for its nodes (a search run with Ray's stand-ins, too).
    cpu_only = search.model_copy(update={"resources": tune_cli.Resources(cpu=1)})
    assert tune_cli._idle_gpus(cpu_only, lambda: pytest.fail("ray.nodes() asked")) is None


def test_joining_a_cluster_without_room_for_a_trial_warns_at_once(tmp_path, shards, monkeypatch):
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "nodes", lambda: [_node(4)])

    def stop(*args):
        raise Joined(args)

    monkeypatch.setattr(tune_cli, "_tracking_uri", stop)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    search = load_search(_search_file(tmp_path, shards, "nogpu", {"model.prompt": {"grid": ["coop"]}},
                                      resources={"cpu": 1, "gpu": 1}, overrides=["tracking.enabled=false"]))
    with pytest.warns(UserWarning, match=r"^the Ray cluster at ray://head:10001: resources: one trial asks for 1 CPU, "
                                         r"1 GPU, which no node of the cluster has \(1 alive: 4 CPUs, 0 GPUs\)"), \
            pytest.raises(Joined):
        run_search(search)


@pytest.mark.parametrize("error", [ConnectionError("Could not find any running Ray instance."),
                                   ray.exceptions.AuthenticationError("Authentication failed: InvalidAuthToken")])
def test_a_cluster_that_cannot_be_joined_is_one_line_and_leaves_nothing_written(tmp_path, shards, monkeypatch,
                                                                                capsys, error):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    def refuse(**kwargs):
        raise error

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    path = _search_file(tmp_path, shards, "away", {"model.prompt": {"grid": ["coop"]}})
    assert tune_cli.main(["--config", str(path)]) == 1
    message = capsys.readouterr().err
    assert message.startswith("tune: address: could not join the Ray cluster at auto (") and message.count("\n") == 1
    assert message.endswith("start it with bash launch/ray-cluster.sh head; one with token authentication (as "
                            "launch/ray-cluster.sh starts it) also needs RAY_AUTH_MODE=token here and its token "
                            "(RAY_AUTH_TOKEN, or ~/.ray/auth_token); or search on a local Ray, with RAY_ADDRESS "
                            "unset\n")
    assert not (tmp_path / "runs").exists()  # no search folder, no MLflow store nor parent run
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert tune_cli.main(["--config", str(path)]) == 1
    assert "also needs RAY_AUTH_MODE" not in capsys.readouterr().err  # set already: not the cause


def test_missing_shards_are_refused_before_ray_starts_with_trains_message(tmp_path, no_ray, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _search_file(tmp_path, "shards/koniq10k", "nodata", {"model.prompt": {"grid": ["coop"]}})
    assert train_cli.main(["--config", str(tmp_path / "base.yaml")]) == 1
    trained = capsys.readouterr().err.strip().splitlines()[-1]
    assert trained.startswith("train: data.train: shards/koniq10k/manifest.json not found")
    assert tune_cli.main(["--config", str(path)]) == 1
    assert capsys.readouterr().err.strip() == trained.replace("train: ", "tune: ", 1)
    assert not (tmp_path / "runs").exists()



def test_a_global_batch_larger_than_the_training_split_is_refused_before_ray_starts(tmp_path, shards, no_ray,
                                                                                     capsys):
    """Refused in each trial before: each tried max_failures + 1 times, minutes of a large grid before the search
    failed."""
    path = _search_file(tmp_path, shards, "big", {"model.prompt": {"grid": ["coop"]}},
                        overrides=["train.batch_size=64"])
    assert tune_cli.main(["--config", str(path)]) == 1
    assert re.fullmatch(r"tune: train.batch_size: a global batch of 64 is larger than the 12 images of .*shards "
                        r"'train'", capsys.readouterr().err.strip())


def test_a_search_started_before_a_key_existed_resumes_where_its_trials_had_that_keys_value(tmp_path, shards):
    search = load_search(_search_file(tmp_path, shards, "old", {"model.prompt": {"grid": ["none", "coop"]}}))
    base = tune_cli.base_config(search)
    identity = tune_cli._identity(search, base, "test/srcc")
    del identity["base"]["model.tower_fp8"], identity["base"]["train.plcc_over"], identity["sample_seed"]
    started = tmp_path / "started.json"
    started.write_text(json.dumps(identity))
    tune_cli._check_same_search(search, base, "test/srcc", started)  # as its trials trained: no error
    fp8 = tune_cli.base_config(load_search(_search_file(tmp_path, shards, "old", {"model.prompt": {"grid": ["coop"]}},
                                                        overrides=["model.tower_fp8=true"])))
    with pytest.raises(ConfigError, match=r"^model.tower_fp8: the search old in .* was started with False, this run "
                                          r"asks for True"):
        tune_cli._check_same_search(search, fp8, "test/srcc", started)
    # The image size given as a pair is the size it was started with.
    pair = tune_cli.base_config(load_search(_search_file(tmp_path, shards, "old", {"model.prompt": {"grid": ["coop"]}},
                                                         overrides=["model.image_size=[64, 64]"])))
    tune_cli._check_same_search(search, pair, "test/srcc", started)


def test_a_searchs_sampled_values_are_drawn_from_its_seed(tmp_path, shards, tuner_stopping):
    """Unseeded, the same search run again (or on another cluster) tried other learning rates, other results."""
    from ray.tune.search.variant_generator import generate_variants

    algs = []
    tuner_stopping.__init__ = lambda self, *args, tune_config, **kwargs: algs.append(tune_config.search_alg)
    tuner_stopping.fit_does = lambda: _raise(KeyboardInterrupt())
    space = {"train.lr": {"loguniform": [0.0001, 0.01]}}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        with pytest.raises(KeyboardInterrupt):
            run_search(load_search(_search_file(tmp_path, shards, name, space, sample_seed=seed, num_samples=3)))

    def drawn(alg) -> list[float]:  # as the search algorithm draws its trials' values
        space = tune_cli.param_space(load_search(tmp_path / "a.yaml"))
        return [config["train.lr"] for _ in range(3)
                for _, config in generate_variants(space, random_state=alg._random_state)]

    a, b, c = map(drawn, algs)
    assert a == b != c
    # A rerun with another seed is another search.
    with pytest.raises(ConfigError, match=r"^sample_seed: the search a in .* was started with 0, this run asks for "
                                          r"1; "):
        tune_cli._check_same_search(load_search(tmp_path / "a.yaml", ["sample_seed=1"]), tune_cli.base_config(
            load_search(tmp_path / "a.yaml")), "test/srcc", tmp_path / "runs" / "a" / tune_cli.STARTED)


def test_a_rerun_is_held_to_what_its_results_depend_on(tmp_path, shards):
    path = _search_file(tmp_path, shards, "same", {"model.prompt": {"grid": ["none", "coop"]}})

    def identity(*overrides):
        search = load_search(path, [f"overrides={json.dumps(list(overrides))}"])
        base = tune_cli.base_config(search)
        return tune_cli._identity(search, base, search.metric or base["train"]["key_metric"])

    # What every trial sets from the space, and what a resumed run may change, do not change the results.
    assert identity() == identity("model.prompt=cocoop", "eval.batch_size=2", "data.workers=1")
    # What the trials are scored on does.
    assert identity() != identity("eval.splits=[train]")


def test_one_key_of_the_space_is_set_from_the_command_line(tmp_path, shards):
    path = _search_file(tmp_path, shards, "cli", {"model.prompt": {"grid": ["none", "coop"]}})
    search = load_search(path, ["space.model.layers={grid: [all, 'upto:3']}", "space.model.prompt={grid: [coop]}"])
    assert search.space == {"model.prompt": {"grid": ["coop"]}, "model.layers": {"grid": ["all", "upto:3"]}}
    with pytest.raises(ConfigError, match=r"space \+ overrides: invalid config: model.promt: unknown key "
                                          r"\(did you mean model.prompt\?\)$"):
        load_search(path, ["space.model.promt={grid: [none]}"])


def test_a_second_search_into_a_running_ones_folder_is_refused_before_ray_starts_naming_it(tmp_path, shards, no_ray):
    from temu_dist import lock

    search = load_search(_search_file(tmp_path, shards, "busy", {"model.prompt": {"grid": ["none", "coop"]}}))
    search_dir = tmp_path / "runs" / "busy"
    search_dir.mkdir(parents=True)
    running = lock.take(search_dir / "tune.lock")  # as the first driver holds it
    try:
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(search_dir.resolve()))}: another search is running in "
                                              rf"this folder \(pid {os.getpid()} on .*\): wait for it to end or stop "
                                              r"it, or give this one another name=$"):
            run_search(search)
    finally:
        lock.let_go(running)
    assert [p.name for p in search_dir.iterdir()] == ["tune.lock"]  # nothing of the first's written over


def test_a_searched_layer_the_backbone_lacks_is_refused_before_ray_starts(tmp_path, shards, no_ray):
    path = _search_file(tmp_path, shards, "layers", {"model.layers": {"grid": ["all", "upto:99"]}})
    with pytest.raises(ConfigError, match=r"space: model.layers: upto:99 asks for layer 99 but the backbone has 6 "
                                          r"layers$"):
        load_search(path)


def test_a_missing_pack_among_the_searched_data_train_values_is_refused_before_ray_starts(tmp_path, shards, no_ray):
    missing, other = tmp_path / "shards" / "other", tmp_path / "shards" / "more"
    search = load_search(_search_file(tmp_path, shards, "datasets", {"data.train": {"grid": [shards, str(missing)]}}))
    where = re.escape(str(missing / "manifest.json"))
    with pytest.raises(ConfigError, match=f"^data.train: {where} not found: make the shards"):
        run_search(search)
    # Every one of them in that line: a pack missing from several trials once.
    search = load_search(_search_file(tmp_path, shards, "datasets", {
        "data.train": {"grid": [shards, str(missing), str(other)]}, "model.layers": {"grid": ["all", "upto:3"]}}))
    with pytest.raises(ConfigError, match=f"^data.train: {where} not found: make the shards.*; not packed either: "
                                          f"{re.escape(f'data.train ({other})')}$"):
        run_search(search)


def test_searched_weights_that_cannot_load_are_refused_before_ray_starts(tmp_path, shards, no_ray):
    # A misspelt tag, a file not there, a state dict whose activation is not said: each would fail every trial.
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"a state dict")
    for value, why in [("openia", "unknown pretrained tag 'openia' for TeMu-Tiny-ViT-16"),
                       (str(tmp_path / "nowhere.pt"), "checkpoint file not found"),
                       (str(weights), f"model.quick_gelu: say true or false for {weights}")]:
        search = load_search(_search_file(tmp_path, shards, "weights", {"model.pretrained": {"grid": [None, value]}}))
        with pytest.raises(ConfigError, match=f"^{re.escape(why)}" if why.startswith("model.") else
                           f"^model.pretrained: {re.escape(why)}"):
            run_search(search)


def test_check_says_what_a_search_would_run_with_ray_not_started_and_nothing_written(tmp_path, shards, no_ray,
                                                                                       capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = _search_file(tmp_path, shards, "check", {"model.prompt": {"grid": ["none", "coop"]},
                                                    "train.lr": {"loguniform": [1e-4, 1e-2]}}, num_samples=3)
    assert tune_cli.main(["--config", str(path), "--check"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "tune: 6 trial(s): 3 sample(s) of each of 2 grid point(s) of model.prompt grid none, coop; train.lr loguniform "
        "0.0001, 0.01",
        "tune: each trial: 1 CPU; 2 at a time; ranked by test/srcc (max); every trial trains its 2 epochs",
        "tune: on a local Ray (the packs, evaluation sets and weights of every grid and choice value checked)",
        f"tune: search folder: {tmp_path / 'runs' / 'check'}, a new search"]
    # A trial too large for this machine (a login node's): said, not refused, since a job's nodes may hold it.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert tune_cli.main(["--config", str(path), "--check", "resources.gpu=1"]) == 0
    assert capsys.readouterr().out.splitlines()[3] == "tune: warning: started on this machine, the search would be " \
        "refused: resources.gpu: one trial needs 1 GPU, this machine has 0: lower it (e.g. --config FILE " \
        "resources.gpu=0) or run the search on a Ray cluster (RAY_ADDRESS=auto, or address: in the search config)"
    assert not (tmp_path / "runs").exists()
    # What the search would refuse, in its words; on a cluster the trials check what they read.
    missing = tmp_path / "nowhere"
    path = _search_file(tmp_path, str(missing), "check", {"model.prompt": {"grid": ["none"]}})
    assert tune_cli.main(["--config", str(path), "--check"]) == 1
    assert capsys.readouterr().err.startswith(f"tune: data.train: {missing / 'manifest.json'} not found")
    assert tune_cli.main(["--config", str(path), "--check", "address=10.0.0.1:6379"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "tune: on the Ray cluster at 10.0.0.1:6379 (the trials check " \
                                                      "the packs and weights they read)"
    assert not (tmp_path / "runs").exists()


def test_a_searched_key_metric_without_its_evaluation_set_is_refused_before_ray_starts(tmp_path, shards, no_ray):
    search = load_search(_search_file(tmp_path, shards, "metrics",
                                      {"train.key_metric": {"choice": ["test/srcc", "koniq/srcc"]}}))
    with pytest.raises(ConfigError, match=r"^train\.key_metric: no evaluation set 'koniq' \(sets: test\)$"):
        run_search(search)


def test_a_searchs_metric_and_samples_are_checked_before_ray_starts(tmp_path, shards, no_ray):
    path = _search_file(tmp_path, shards, "metric", {"model.prompt": {"grid": ["none"]}})
    with pytest.raises(ConfigError, match=r"metric: 'test/srocc' is not SET/METRIC with METRIC one of "
                                          r"srcc, plcc, krcc"):
        load_search(path, ["metric=test/srocc"])
    # The pack has no val split: it says so.
    lacks = rf"; data.train's pack {re.escape(str(shards))} has no 'val' split \(it has train, test\): pack one into "
    with pytest.raises(ConfigError, match=r"^metric: no evaluation set 'val' \(sets: test\)" + lacks):
        run_search(load_search(path, ["metric=val/srcc"]))
    # The trials' own key metric is checked too, whatever metric the search ranks them by.
    with pytest.raises(ConfigError, match=r"^train.key_metric: no evaluation set 'val' \(sets: test\)" + lacks):
        run_search(load_search(path, ["metric=test/srcc", "overrides=[train.key_metric=val/srcc]"]))
    assert not (tmp_path / "runs").exists()  # nothing started, so the corrected search may take the name
    with pytest.raises(ConfigError, match=r"train: unknown key; training keys go in the search config's overrides "):
        load_search(path, ["train.epochs=1"])
    with pytest.raises(ConfigError, match=r"num_samples: 2 samples of an all-grid space train each grid point that "
                                          r"many times over, alike; for repeats, search the seed"):
        load_search(path, ["num_samples=2"])
    assert load_search(path, ["num_samples=2", "space.train.lr={loguniform: [0.0001, 0.01]}"]).num_samples == 2


@pytest.mark.parametrize(("space", "says"), [
    ("{loguniform: [0, 0.01]}", r"space.train.lr: loguniform takes \[low, high\] with low < high and low > 0 \(a "
                                r"logarithm's\), got \[0, 0.01\]$"),  # Ray's own ValueError, once it had started
    ("{uniform: [0.01, 0.001]}", r"space.train.lr: uniform takes \[low, high\] with low < high, got \[0.01, 0.001\]$"),
    ("{randint: [1, 2.5]}", r"space.train.lr: randint takes \[low, high\] with low < high, whole numbers, got \[1, "
                            r"2.5\]$"),
])
def test_a_sampled_keys_bounds_are_refused_before_ray_starts(tmp_path, shards, no_ray, space, says):
    path = _search_file(tmp_path, shards, "bounds", {"model.prompt": {"grid": ["none"]}})
    with pytest.raises(ConfigError, match=says):
        load_search(path, [f"space.train.lr={space}"])


def test_an_empty_space_is_refused(tmp_path, shards, no_ray):
    path = _search_file(tmp_path, shards, "empty", {})
    with pytest.raises(ConfigError, match=r"empty.yaml: space: empty; give it a key to search, or train the base "
                                          r"config with python -m temu_dist.train$"):
        load_search(path)


def test_fractions_drawn_for_a_key_of_whole_numbers_are_refused_before_ray_starts(tmp_path, shards, no_ray):
    # Its bounds passed, and every trial failed on the fraction drawn, tried max_failures + 1 times.
    path = _search_file(tmp_path, shards, "whole", {"model.prompt": {"grid": ["none"]}})
    with pytest.raises(ConfigError, match=r"space.train.epochs: uniform draws fractions, which train.epochs does not "
                                          r"take: use randint \[1, 3\] \(Ray's randint leaves its high out\) or a "
                                          r"grid$"):
        load_search(path, ["space.train.epochs={uniform: [1, 2]}"])
    with pytest.raises(ConfigError, match=r"use randint \[1, 4\] "):
        load_search(path, ["space.train.epochs={uniform: [1.0, 3.0]}"])  # advice randint itself takes
    with pytest.raises(ConfigError, match=r"space \+ overrides: invalid config: train.epochs: Input should be "
                                          r"greater than or equal to 1 \(got 0\)$"):
        load_search(path, ["space.train.epochs={uniform: [0, 2]}"])  # a bound the key refuses is said as such
    assert load_search(path, ["space.ldg.weight={uniform: [0.5, 1]}"]).space["ldg.weight"] == {"uniform": [0.5, 1]}
    # randint's high is never drawn: only the values below it are checked.
    assert load_search(path, ["space.model.layers={grid: [all]}", "space.seed={randint: [0, 4294967296]}"])


@pytest.mark.parametrize(("overrides", "says"), [
    (["asha={grace_period: 5}"], r"asha.grace_period: 5 epochs before a trial may be stopped, but the trials train 2 "
                                 r"\(train.epochs\): lower it \(asha.grace_period=2\), or asha=null to let every trial "
                                 r"finish"),
    (["asha={grace_period: 0}"], r"asha.grace_period: Input should be greater than or equal to 1"),
    (["asha={reduction_factor: 1}"], r"asha.reduction_factor: Input should be greater than 1"),
    (["asha={grace: 1}"], r"asha.grace: unknown key \(did you mean asha.grace_period\?\)"),
    (["resources.cpu=0"], r"resources: a trial must ask for some cpu or gpu"),
    (["num_samples=0"], r"num_samples: Input should be greater than or equal to 1"),
    (["max_failures=-1"], r"max_failures: Input should be greater than or equal to 0"),
    (["base=nope.yml"], r"base: nope.yml: no such config file \(beside the search config or in the working "
                        r"directory\)"),
    (["overrides=[device=cuda]"], r"resources.gpu: 0, but the trials' config asks for device: cuda, and Ray hides the "
                                  r"GPUs from a trial that asks for none"),
])
def test_search_settings_ray_would_refuse_once_started_are_one_line_naming_the_key(tmp_path, shards, no_ray,
                                                                                    overrides, says):
    path = _search_file(tmp_path, shards, "bad", {"model.prompt": {"grid": ["none"]}})
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: (invalid config: )?{says}"):
        load_search(path, overrides)


def test_a_searched_evaluation_set_that_the_key_metric_names_is_checked_with_it(tmp_path, shards, monkeypatch,
                                                                                ray_joins):
    # Each eval.cross value adds the set train.key_metric names: every trial has it, so the search starts.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cross = [[{"name": "koniq", "shards": shards}], [{"name": "koniq", "shards": shards, "split": "train"}]]
    search = load_search(_search_file(tmp_path, shards, "cross", {"eval.cross": {"grid": cross}},
                                      overrides=["train.key_metric=koniq/srcc", "tracking.enabled=false"]))
    with pytest.raises(Joined):
        run_search(search)


# Results of Tuner.fit: Ray Tune's own Ctrl-C handler stops the trials and returns them, as if the search were done.
DONE = SimpleNamespace(error=None, metrics={"epoch": 2, "done": True})
CUT = SimpleNamespace(error=None, metrics={"epoch": 1})


class RayTaskError(Exception):
    """As Ray wraps a trial's exception: its message a traceback of the actor, the trial's own as `cause`."""
    cause = ConfigError("model.layers: upto:9 asks for layer 9 but the backbone has 6 layers")


FAILED = SimpleNamespace(error=RayTaskError("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1)\n  File ..."),
                         metrics={}, config={"model.prompt": "none"}, metrics_dataframe=None)


def _raise(error: BaseException):
    raise error


@pytest.fixture
def tuner_stopping(monkeypatch):
    """Ray Tune's Tuner, whose fit does what the test sets: Ray is not started."""
    from ray import tune

    class Tuner:
        fit_does = None

        def __init__(self, *args, **kwargs):
            pass

        @staticmethod
        def can_restore(path):
            return False

        def fit(self):
            return Tuner.fit_does()

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(tune, "with_parameters", lambda target, **kwargs: target)
    monkeypatch.setattr(tune, "Tuner", Tuner)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return Tuner


def test_a_search_stopped_by_ctrl_c_ends_its_parent_run_killed_and_exits_130(tmp_path, shards, tuner_stopping,
                                                                               capsys):
    tuner_stopping.fit_does = lambda: _raise(KeyboardInterrupt())
    path = _search_file(tmp_path, shards, "stopped", {"model.prompt": {"grid": ["none", "coop"]}})
    try:
        code = tune_cli.main(["--config", str(path)])
    except KeyboardInterrupt:
        pytest.fail("main let the KeyboardInterrupt through")  # rather than stop the whole test session
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # after MLflow's own log lines
        "tune: interrupted; finished trials are kept, rerun the same command to resume the search")
    parent, _ = _runs(tmp_path / "runs" / "stopped")
    assert parent.info.status == "KILLED"


def test_a_search_sent_sigterm_stops_as_ctrl_c_does(tmp_path, shards, tuner_stopping, capsys):
    """scancel and a job's time limit send SIGTERM: the parent run ends KILLED with the way to resume said."""
    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises first
        return []

    tuner_stopping.fit_does = terminated
    path = _search_file(tmp_path, shards, "termed", {"model.prompt": {"grid": ["none", "coop"]}})
    caller = signal.signal(signal.SIGTERM, lambda *_: None)  # the test's own, which lets the search go on
    try:
        assert tune_cli.main(["--config", str(path)]) == 143
        assert signal.getsignal(signal.SIGTERM) is not stop._terminate
    finally:
        signal.signal(signal.SIGTERM, caller)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tune: stopped by SIGTERM; finished trials are kept, rerun the same command to resume the search")
    parent, _ = _runs(tmp_path / "runs" / "termed")
    assert parent.info.status == "KILLED"


@RAY
def test_sigterm_after_ray_has_started_still_stops_the_search_as_ctrl_c_does(ray_tmp):
    # Ray's core worker puts in a SIGTERM handler of its own, which aborted the driver (exit 134) with the parent run
    # left RUNNING. A real local Ray, in a process of its own, as that handler would end this one.
    code = ("import os, signal, sys, time\n"
            "from temu_dist.stop import Terminated, sigterm_as_ctrl_c, stop_code\n"
            "from temu_dist.tune import _ray_init\n"
            "with sigterm_as_ctrl_c():\n"
            "    try:\n"
            "        _ray_init(include_dashboard=False, num_cpus=1, _temp_dir=sys.argv[1])\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(30)\n"
            "    except Terminated as e:\n"
            "        sys.exit(stop_code(e))\n")
    done = subprocess.run([sys.executable, "-c", code, ray_tmp], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 143, done.stderr[-2000:]


@pytest.mark.parametrize(("fit", "raised", "status"), [
    (lambda: [DONE, DONE], KeyboardInterrupt, "KILLED"),  # stopped by Ray Tune's Ctrl-C: a trial never started
    (lambda: [DONE, CUT, DONE], KeyboardInterrupt, "KILLED"),  # ... or one stopped mid-way
    (lambda: _raise(RuntimeError("the Ray cluster went away")), RuntimeError, "FAILED"),
], ids=["not-started", "cut", "error"])
def test_a_search_that_does_not_finish_ends_its_parent_run(tmp_path, shards, tuner_stopping, fit, raised, status):
    tuner_stopping.fit_does = fit
    search = load_search(_search_file(tmp_path, shards, "unfinished",
                                      {"model.prompt": {"grid": ["none", "coop", "cocoop"]}}))
    with pytest.raises(raised):
        run_search(search)
    parent, _ = _runs(tmp_path / "runs" / "unfinished")
    assert parent.info.status == status


def test_a_failed_rerun_leaves_a_finished_search_finished_and_a_new_start_its_own_params(tmp_path, shards,
                                                                                        tuner_stopping, monkeypatch,
                                                                                        capsys):
    import pandas as pd
    from ray import tune

    ok = SimpleNamespace(error=None, metrics={"epoch": 2, "done": True, "trial_id": "1"},
                         config={"model.prompt": "none"},
                         metrics_dataframe=pd.DataFrame({"epoch": [2], "test/srcc": [0.5]}))
    tuner_stopping.fit_does = lambda: [ok]
    path = _search_file(tmp_path, shards, "rerun", {"model.prompt": {"grid": ["none"]}})
    search_dir = tmp_path / "runs" / "rerun"
    run_search(load_search(path))
    # Rerun as it was: its results are read from what Ray saved (here, the stand-in's), and it says no trial trains.
    monkeypatch.setattr(tuner_stopping, "can_restore", staticmethod(lambda path: True))
    monkeypatch.setattr(tune, "ExperimentAnalysis", lambda path: path)
    monkeypatch.setattr(tune, "ResultGrid", lambda analysis: [ok])
    tuner_stopping.fit_does = lambda: pytest.fail("a finished search was fitted again")
    capsys.readouterr()
    run_search(load_search(path))
    assert f"tune: the search rerun in {search_dir} has finished: its results are gathered again, no trial trains\n" \
        in capsys.readouterr().out
    # With a trial that errored, which a rerun tries again in Ray: the rerun fails, and the parent stays FINISHED.
    errored = json.loads((search_dir / "search.json").read_text())
    errored["trials"][0]["error"] = "RuntimeError: out of memory"
    (search_dir / "search.json").write_text(json.dumps(errored))
    monkeypatch.setattr(tuner_stopping, "restore", classmethod(lambda cls, *args, **kwargs: cls()), raising=False)
    tuner_stopping.fit_does = lambda: _raise(RuntimeError("the Ray cluster went away"))
    with pytest.raises(RuntimeError, match="the Ray cluster went away"):
        run_search(load_search(path))
    parent, _ = _runs(search_dir)
    assert parent.info.status == "FINISHED" and parent.data.metrics["best/test/srcc"] == 0.5
    monkeypatch.setattr(tuner_stopping, "can_restore", staticmethod(lambda path: False))
    # A start that failed before Ray saved the search, started anew with another space: a parent with its params.
    path = _search_file(tmp_path, shards, "restart", {"model.prompt": {"grid": ["none", "coop"]}})
    with pytest.raises(RuntimeError):
        run_search(load_search(path))
    tuner_stopping.fit_does = lambda: [ok]
    run_search(load_search(path, ["space.model.prompt={grid: [none]}"]))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    parent = client.get_run((tmp_path / "runs" / "restart" / "mlflow_parent_run_id").read_text().strip())
    assert parent.data.params["space.model.prompt"] == '{"grid": ["none"]}' and parent.info.status == "FINISHED"


def test_a_finished_search_says_where_its_results_are_and_how_to_compare_them(tmp_path, shards, monkeypatch,
                                                                             capsys):
    path = _search_file(tmp_path, shards, "said", {"model.prompt": {"grid": ["none"]}})
    row = {"trial": "trial-1", "model.prompt": "none", "train.lr": 2.1e-5, "epochs": 2, "best": 0.5, "error": None}

    def said(uri: str, plots: list[str]) -> str:
        monkeypatch.setattr(tune_cli, "run_search", lambda search: {
            "search": "said", "metric": "test/srcc", "trials": [row], "best": row, "best_config": "said/best.yaml",
            "mlflow": uri, "plots": plots})
        assert tune_cli.main(["--config", str(path)]) == 0
        return capsys.readouterr().out

    out = said("sqlite:///x", ["prompt_table.png"])
    assert "tune: trial-1 | none | 2.1e-05 | 2 | 0.5\n" in out  # a small learning rate is not 0.0000
    assert "tune: best trial-1 with test/srcc 0.5000; train it again on its own: python -m temu_dist.train --config " \
        "said/best.yaml\n" in out
    where = re.escape(str(tmp_path / "runs" / "said" / "search.json"))
    assert re.search(rf"tune: 1 trial\(s\) in \d+\.\d min; results in {where}, plots prompt_table.png beside it\n",
                     out)
    assert out.endswith("tune: compare the trials with: mlflow ui --backend-store-uri sqlite:///x\n")
    out = said("http://mlflow:5000", [])
    assert re.search(rf"results in {where}\n", out) and out.endswith("compare the trials in MLflow at http://mlflow:5000\n")


def test_a_search_in_which_every_trial_failed_exits_1_naming_their_errors(tmp_path, shards, tuner_stopping, capsys):
    tuner_stopping.fit_does = lambda: [FAILED, FAILED]
    path = _search_file(tmp_path, shards, "failing", {"model.prompt": {"grid": ["none", "coop"]}})
    assert tune_cli.main(["--config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "error: ConfigError: model.layers: upto:9 asks for layer 9 but the backbone has 6 layers\n" in out
    assert err.strip().splitlines()[-1] == "tune: no trial reported a result (errors above)"
    parent, _ = _runs(tmp_path / "runs" / "failing")
    assert parent.info.status == "FAILED"


def test_searched_paths_are_made_absolute_as_the_base_configs_are(tmp_path, shards, monkeypatch):
    # Ray runs each trial in its own folder, where a relative path names nothing.
    monkeypatch.chdir(Path(shards).parent)
    search = load_search(_search_file(tmp_path, shards, "paths", {"data.train": {"grid": [Path(shards).name]},
                                                                  "model.pretrained": {"choice": [None, "openai"]}}))
    space = param_space(search)
    assert space["data.train"] == {"grid_search": [str(Path(shards).absolute())]}
    assert space["model.pretrained"].categories == [None, "openai"]  # tags stay tags


def test_a_restored_search_is_not_read_as_stopped_for_a_space_changed_since(tmp_path, shards):
    # A finished 3-trial search rerun with num_samples=4: Ray restores its 3 trials, which are all there is.
    search = load_search(_search_file(tmp_path, shards, "grown", {"model.prompt": {"grid": ["none", "coop", "cocoop"]},
                                                                  "train.lr": {"loguniform": [0.0001, 0.01]}},
                                      num_samples=4))
    assert not tune_cli._stopped(search, [DONE] * 3, restored=True)
    assert tune_cli._stopped(search, [DONE] * 3, restored=False)  # started afresh, 9 trials never ran
    assert tune_cli._stopped(search, [DONE, CUT, DONE], restored=True)


def test_a_trial_asha_stopped_early_is_marked_so_in_mlflow_with_its_best(tmp_path, shards):
    import pandas as pd

    from temu_dist.tune import base_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    # Its artifacts in the test's folder, as tracking.use_experiment puts them beside the store, not in ./mlruns.
    experiment = client.create_experiment("temu-dist", artifact_location=(tmp_path / "mlartifacts").as_uri())

    def summarized(name: str, asha: dict | None) -> list[mlflow.entities.Run]:
        space = {"model.prompt": {"grid": ["none", "coop"]}, "train.epochs": {"grid": [1, 2]}}
        search = load_search(_search_file(tmp_path, shards, name, space, asha=asha))
        search_dir, grid, run_ids = tmp_path / "runs" / name, [], []
        # Trials of 2 planned epochs that ran 2 and 1 (stopped), and one of 1 planned epoch that ran it.
        for i, (prompt, epochs, scores) in enumerate([("none", 2, [0.1, 0.3]), ("coop", 2, [0.2]), ("none", 1, [0.4])]):
            run_ids.append(client.create_run(experiment).info.run_id)
            client.set_terminated(run_ids[-1], "FINISHED" if len(scores) == epochs else "KILLED")  # as train ends them
            (search_dir / "trials" / f"trial-{i}").mkdir(parents=True)
            (search_dir / "trials" / f"trial-{i}" / "mlflow_run_id").write_text(run_ids[-1])
            grid.append(SimpleNamespace(metrics_dataframe=pd.DataFrame({"epoch": range(1, len(scores) + 1),
                                                                      "test/srcc": scores}), error=None,
                                        config={"model.prompt": prompt, "train.epochs": epochs},
                                        metrics={"trial_id": str(i), "epoch": len(scores), "done": True}))
        parent = client.create_run(experiment).info.run_id
        # A restored search's grid comes in an order of its own: the table keeps the trials' own.
        summary = tune_cli.summarize(search, search_dir, grid[::-1], "test/srcc", uri, parent, base_config(search))
        assert [r["best"] for r in summary["trials"]] == [0.3, 0.2, 0.4]
        return [client.get_run(r) for r in run_ids]

    finished, stopped, short = summarized("asha", {"grace_period": 1})
    assert stopped.data.tags["temu.stopped"] == "early, by ASHA after epoch 1 of 2"
    assert stopped.data.metrics["best/test/srcc"] == 0.2 and stopped.info.status == "KILLED"
    assert not {"temu.stopped", "best/test/srcc"} & {*finished.data.tags, *short.data.tags, *short.data.metrics}
    # Without ASHA nothing stops a trial early: a KILLED one was stopped by hand, and is left as it is.
    assert all("temu.stopped" not in run.data.tags for run in summarized("plain", None))


def test_a_resumed_trials_best_counts_the_epochs_before_the_resume(tmp_path, shards):
    """Ray's CSV of a trial resumed from its checkpoint holds only the epochs since: the search named a best that was
    not the trial's (0.14 for a trial whose results.json says 0.16, at epoch 1). And the checkpoint of a trial ASHA
    stopped can lack the epoch Ray had its report of."""
    import pandas as pd

    from temu_dist.checkpoint import TRAINER_INFO
    from temu_dist.tune import base_config

    search = load_search(_search_file(tmp_path, shards, "resumed", {"model.prompt": {"grid": ["none", "coop"]}}))
    search_dir = tmp_path / "runs" / "resumed"
    run = search_dir / "trials" / "trial-0"
    (run / "checkpoints" / "last").mkdir(parents=True)
    history = [{"epoch": e, "eval": {"test": {"srcc": v, "plcc": 0.0}}} for e, v in ((1, 0.16), (2, 0.12), (3, 0.14))]
    (run / "results.json").write_text(json.dumps({"history": history}))
    stopped = search_dir / "trials" / "trial-1" / "checkpoints" / "last"
    stopped.mkdir(parents=True)
    (stopped / TRAINER_INFO).write_text(json.dumps({"history": [{"epoch": 1, "eval": {"test": {"srcc": None}}}]}))
    grid = [SimpleNamespace(metrics_dataframe=pd.DataFrame({"epoch": [2, 3], "test/srcc": [0.12, 0.14]}), error=None,
                            config={"model.prompt": "none"}, metrics={"trial_id": "0", "epoch": 3, "done": True}),
            SimpleNamespace(metrics_dataframe=pd.DataFrame({"epoch": [1, 2], "test/srcc": [math.nan, 0.2]}),
                            error=None, config={"model.prompt": "coop"},
                            metrics={"trial_id": "1", "epoch": 2, "done": True})]
    summary = tune_cli.summarize(search, search_dir, grid, "test/srcc", "", None, base_config(search))
    assert [r["best"] for r in summary["trials"]] == [0.16, 0.2]
    assert json.loads((search_dir / "search.json").read_text())["best"]["trial"] == "trial-1"


def test_rays_own_resume_hint_is_left_out_for_ours(caplog):
    # Ray's says to call Tuner.restore(path, trainable=...); rerunning the command does that, as ours says.
    import logging

    ray_log = logging.getLogger("ray.tune.tune")
    with caplog.at_level(logging.WARNING, logger="ray.tune.tune"):
        ray_log.warning("Experiment has been interrupted, but the most recent state was saved.\nResume experiment "
                        "with: Tuner.restore(path=\"/x\", trainable=...)")
        ray_log.warning("Something else Ray says")
    assert [r.getMessage() for r in caplog.records] == ["Something else Ray says"]
