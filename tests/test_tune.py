"""Ray Tune searches end to end on tiny shards: MLflow parent/child runs, a retried trial, a resumed search."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import ray
import yaml

from temu_dist.data.splits import SplitSpec
from temu_dist.pack import PackOptions, pack
from temu_dist.tune import load_search, run_search, run_trial
from tests.conftest import write_kadid

REPO = Path(__file__).resolve().parents[1]


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


def test_search_gives_one_parent_run_and_a_child_run_per_trial(tmp_path, shards, ray_tmp):
    search = load_search(_search_file(tmp_path, shards, "prompts", {"model.prompt": {"grid": ["none", "coop"]}}))
    summary = run_search(search)
    assert sorted(r["model.prompt"] for r in summary["trials"]) == ["coop", "none"]
    assert all(r["best"] is not None and r["error"] is None and r["epochs"] == 2 for r in summary["trials"])
    assert summary["best"]["best"] == max(r["best"] for r in summary["trials"])
    search_dir = tmp_path / "runs" / "prompts"
    parent, children = _runs(search_dir)
    client = mlflow.MlflowClient(f"sqlite:///{search_dir.parent / 'mlflow.db'}")
    assert parent.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"search.json", "prompt_table.png",
                                                                          "config.yaml"}
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["model.prompt"] for c in children) == ["coop", "none"]
    for child in children:
        history = client.get_metric_history(child.info.run_id, "test/srcc")
        assert [m.step for m in history] == [1, 2]
    assert json.loads((search_dir / "search.json").read_text())["best"]["trial"] == summary["best"]["trial"]


def test_a_trial_can_train_on_several_ray_train_processes(tmp_path, shards, ray_tmp):
    search = load_search(_search_file(tmp_path, shards, "workers", {"model.prompt": {"grid": ["coop"]}},
                                      resources={"cpu": 0.5, "workers": 2}))
    summary = run_search(search)
    (row,) = summary["trials"]
    assert row["error"] is None and row["epochs"] == 2 and row["best"] is not None
    run = tmp_path / "runs" / "workers" / "trials" / row["trial"]
    results = json.loads((run / "results.json").read_text())
    assert results["processes"] == 2
    assert results["best"]["test"]["count"] == results["best"]["test"]["expected"]


def flaky_trial(params, **kwargs):
    """Fails the first attempt of every trial, as a lost node or an out-of-memory kill would."""
    from ray import tune

    marker = Path(kwargs["trials_dir"]).parent / f"attempted-{tune.get_context().get_trial_id()}"
    if not marker.exists():
        marker.write_text("1")
        raise RuntimeError("first attempt fails")
    run_trial(params, **kwargs)


def test_a_trial_that_raises_is_retried_and_the_search_completes(tmp_path, shards, ray_tmp):
    search = load_search(_search_file(tmp_path, shards, "flaky", {"model.variant": {"grid": ["S", "I"]}},
                                      max_failures=1))
    summary = run_search(search, trainable=flaky_trial)
    assert len(summary["trials"]) == 2
    assert all(r["error"] is None and r["epochs"] == 2 for r in summary["trials"])
    assert len(list((tmp_path / "runs" / "flaky").glob("attempted-*"))) == 2


def test_killed_search_resumes_without_redoing_finished_trials(tmp_path, shards, ray_tmp):
    path = _search_file(tmp_path, shards, "resume", {"model.prompt": {"grid": ["none", "coop", "cocoop"]}},
                        max_concurrent=1)
    search_dir = tmp_path / "runs" / "resume"
    cmd = [sys.executable, "-m", "temu_dist.tune", "--config", str(path)]
    env = dict(os.environ, PYTHONPATH=str(REPO), TEMU_RAY_TMP=ray_tmp)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if list((search_dir / "trials").glob("*/results.json")):
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
    assert 1 <= len(finished) < 3
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {name: (search_dir / "trials" / name / "checkpoints" / "last" / "weights.safetensors").stat().st_mtime_ns
            for name in finished} == finished
    summary = json.loads((search_dir / "search.json").read_text())
    assert sorted(r["model.prompt"] for r in summary["trials"]) == ["cocoop", "coop", "none"]
    assert all(r["best"] is not None for r in summary["trials"])
    _, children = _runs(search_dir)
    assert len(children) == 3
