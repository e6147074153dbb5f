import pytest

from temu_dist.config import dump
from temu_dist.config import flatten
from tests.conftest import tiny_config


def test_params_are_flat_with_each_cross_set_field_a_key_of_its_own():
    config = tiny_config("eval.cross=[{name: csiq, shards: s/csiq}, {name: live, shards: s/live, split: train}]")
    params = flatten(dump(config))
    assert params["model.backbone"] == "Test-Tiny-ViT-16" and params["train.lr"] == config.train.lr
    assert params["eval.cross.0.name"] == "csiq" and params["eval.cross.1.split"] == "train"
    assert params["eval.splits"] == ["val", "test"] and "eval.cross" not in params


def test_runs_deleted_in_the_ui_are_replaced_not_continued(tmp_path):
    import mlflow

    from temu_dist.tracking import Tracker, parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    config = tiny_config(f"out_dir={tmp_path}", f"tracking.uri={uri}")
    first = Tracker(config, tmp_path, True)
    first.metrics({"train/loss": 0.5}, step=1)
    first.end()
    client.delete_run(first.run_id)
    again = Tracker(config, tmp_path, True, resuming=True, past=[(1, {"train/loss": 0.5})])
    assert again.active and again.run_id != first.run_id
    assert [m.step for m in client.get_metric_history(again.run_id, "train/loss")] == [1]
    again.end()
    parent, _ = parent_run(uri, "temu-dist", "search", tmp_path / "parent_id", {}, {}, "search")
    client.delete_run(parent)
    assert parent_run(uri, "temu-dist", "search", tmp_path / "parent_id", {}, {}, "search")[0] not in (None, parent)


def test_a_run_records_the_commit_of_the_checkout_it_ran_from_and_no_other(tmp_path, monkeypatch):
    import subprocess
    from importlib import metadata

    from temu_dist.tracking import _code_tags

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "first")
    head = git("rev-parse", "HEAD")
    (tmp_path / "output.log").write_text("")  # untracked: no change to the code
    assert _code_tags(tmp_path) == {"mlflow.source.git.commit": head}
    (tmp_path / "code.py").write_text("x = 2\n")
    assert _code_tags(tmp_path) == {"mlflow.source.git.commit": head, "temu.git_dirty": "true"}
    # An install whose site-packages lies in the user's own repository: not that repository's commit.
    (tmp_path / "site-packages").mkdir()
    assert _code_tags(tmp_path / "site-packages") == {"temu.version": metadata.version("temu-dist")}

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)  # a copy on PYTHONPATH: nothing to say, no failure
    assert _code_tags(tmp_path / "site-packages") == {}


@pytest.mark.parametrize(("logged_an_epoch", "overrides", "same_run"), [
    (False, [], True),  # a crash before the first checkpoint, or a Ray Tune retry: not a failed twin beside each try
    (True, [], False),  # its epoch is in the MLflow run, not in a checkpoint: a new history
    (False, ["train.lr=0.1"], False),  # another config, whose params MLflow cannot change
    (False, ["train.resume=never"], False),  # asked to start anew
])
def test_a_run_restarted_before_its_first_checkpoint_goes_on_with_the_failed_run_of_the_same_config(
        tmp_path, logged_an_epoch, overrides, same_run):
    import mlflow

    from temu_dist.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(tiny_config(f"out_dir={tmp_path}", f"tracking.uri={uri}"), tmp_path, True)
    if logged_an_epoch:
        first.metrics({"train/loss": 0.5}, step=1)
    first.end("FAILED")
    again = Tracker(tiny_config(f"out_dir={tmp_path}", f"tracking.uri={uri}", *overrides), tmp_path, True)
    assert (again.run_id == first.run_id) == same_run
    assert mlflow.MlflowClient(uri).get_run(again.run_id).info.status == "RUNNING"
    again.end()
    # Started anew in its folder, the old run says by which run, as the UI lists both under one name.
    replaced = mlflow.MlflowClient(uri).get_run(first.run_id).data.tags.get("temu.replaced_by")
    assert replaced == (again.run_id if "train.resume=never" in overrides else None)


def test_a_run_going_on_with_an_attempt_that_trained_no_epoch_takes_its_own_launch_tags_plain(tmp_path):
    import mlflow

    from temu_dist.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_config(f"out_dir={tmp_path}", f"tracking.uri={uri}")
    first = Tracker(config, tmp_path, True)
    first.launch_tags({"processes": "2"}, 1)
    first.end("FAILED")
    again = Tracker(config, tmp_path, True)
    again.launch_tags({"processes": "4"}, 1)
    again.end()
    assert again.run_id == first.run_id
    assert mlflow.MlflowClient(uri).get_run(again.run_id).data.tags["processes"] == "4"
