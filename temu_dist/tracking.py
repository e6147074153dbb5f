"""MLflow: one run per training run, with its resolved config as params, per-epoch metrics, tags and artifacts.

The default store is one sqlite file for every run under out_dir (out_dir/mlflow.db, artifacts beside it in
out_dir/mlartifacts), so the UI compares them; MLFLOW_TRACKING_URI or tracking.uri name another. A tracking server that
cannot be reached is a warning, not a failure: training goes on and everything stays in the run folder. Only the main
process tracks.
"""
from __future__ import annotations

import math
import os
import subprocess
import warnings
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from temu_dist.atomic import write_text_atomic
from temu_dist.config import Config, Notice, dump, error_line, flatten
from temu_dist.data.manifest import dataset_name

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# The user's store, read before anything runs: mlflow.set_tracking_uri writes this variable, and a later run in the
# same process (repeat, tests) would otherwise take the last run's store for the user's.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(uri: str | None, out_dir: str | Path) -> str:
    """The store a run or search under out_dir tracks into: the one its config names, else the user's
    MLFLOW_TRACKING_URI, else out_dir's own."""
    return uri or USER_TRACKING_URI or default_store(out_dir)


def default_store(out_dir: str | Path) -> str:
    return f"sqlite:///{(Path(out_dir) / 'mlflow.db').resolve()}"


def use_experiment(mlflow: Any, name: str, uri: str) -> Any:
    """Sets (making it if new) the experiment. MLflow would put a sqlite store's artifacts in ./mlruns of whatever
    folder the command ran in; they go beside the store instead, so a run's files stay with the runs."""
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        artifacts = Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"
        try:
            mlflow.create_experiment(name, artifact_location=artifacts.as_uri())
        except mlflow.exceptions.MlflowException:
            pass  # made meanwhile by another process of the same search
    return mlflow.set_experiment(name)


def http_limits(uri: str) -> None:
    """MLflow retries a failing server 7 times, up to 120 s each: minutes in which the other ranks wait on this one
    past their collective timeout. A few short tries instead; the environment may still say otherwise."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


class Tracker:
    """Logs to MLflow when `active`; every method is a no-op otherwise (other ranks, tracking off or unreachable)."""

    def __init__(self, config: Config, run_dir: Path, active: bool, resuming: bool = False,
                 tags: dict[str, str] | None = None, past: list[tuple[int, dict[str, float]]] | None = None):
        """`tags`: what the config does not say about the run (launch_tags: how it was launched); `past`: a resumed
        run's epochs (step, metrics), logged where its MLflow run lacks them."""
        self.active = active and config.tracking.enabled
        self.resuming = resuming
        self.run_id: str | None = None
        self.tags_before: dict[str, str] = {}  # the MLflow run's tags when this run went on with it
        if not self.active:
            return
        uri = tracking_uri(config.tracking.uri, config.out_dir)
        id_file = run_dir / "mlflow_run_id"
        try:
            import mlflow

            self.mlflow = mlflow
            http_limits(uri)
            mlflow.set_tracking_uri(uri)
            _check_reachable(uri)
            use_experiment(mlflow, config.tracking.experiment, uri)
            # A resumed run continues the same MLflow run; a fresh one (train.resume=never) starts its own.
            resume_id = id_file.read_text().strip() if resuming and id_file.exists() else None
            # Untracked before, or tracked into another store (tracking.uri changed): a new run, given the past epochs.
            fresh_history = resuming and (resume_id is None or not _in_store(mlflow, resume_id))
            if fresh_history:
                resume_id = None
            elif not resuming and config.train.resume != "never" and id_file.exists():
                resume_id = _retried(mlflow, id_file.read_text().strip(), config)
            parent = {"mlflow.parentRunId": config.tracking.parent_run_id} if config.tracking.parent_run_id else None
            name = None if resume_id else config.tracking.run_name or config.name
            replaced = id_file.read_text().strip() if config.train.resume == "never" and id_file.exists() else None
            run = mlflow.start_run(run_id=resume_id, run_name=name, tags=parent)
            self.run_id = run.info.run_id
            write_text_atomic(id_file, self.run_id)
            before = mlflow.get_run(self.run_id).data
            existing, self.tags_before = before.params, dict(before.tags)
            # A resumed run's epochs the store lacks: all of them for a new MLflow run; else those a kill between
            # checkpoint and logging, or a server that was away, kept out.
            logged = set() if fresh_history or not resuming else \
                {m.step for m in mlflow.MlflowClient().get_metric_history(self.run_id, "train/loss")}
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
            warnings.warn(f"MLflow tracking at {uri} is not usable ({error_line(e)}); "
                          f"training goes on and results stay in {run_dir}", Notice, stacklevel=2)
            self.active = False
            return
        self._guard(log_params, mlflow.MlflowClient(), self.run_id,
                    {k: v for k, v in config_params(config).items() if k not in existing})
        self._guard(mlflow.set_tags, {**config_tags(config), **code_tags(), **(tags or {})})
        if replaced and replaced != self.run_id:  # two runs of one name in the UI: which one the folder holds
            try:
                if _in_store(mlflow, replaced):  # not one deleted in the UI
                    mlflow.MlflowClient().set_tag(replaced, "temu.replaced_by", self.run_id)
            except Exception as e:  # noqa: BLE001 - a server gone, or one that does not let us tag it
                warnings.warn(f"MLflow at {uri}: could not mark run {replaced} as replaced by {self.run_id} "
                              f"({error_line(e)})", Notice, stacklevel=2)
        self.artifact(run_dir / "config.yaml")
        for step, values in past or []:
            if step not in logged:
                self.metrics(values, step)

    def _guard(self, fn, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a server that goes away mid-run is a warning
            warnings.warn(f"MLflow call {fn.__name__} failed ({error_line(e)}); "
                          "tracking stops, training goes on", Notice, stacklevel=2)
            self.active = False

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.active:
            # SET/METRIC as the config names them: the UI groups a set's charts by the part before the slash.
            clean = {k: float(v) for k, v in values.items() if not math.isnan(v)}  # NaN is not loggable
            self._guard(self.mlflow.log_metrics, clean, step=step)

    def tags(self, values: dict[str, str]) -> None:
        if self.active:
            self._guard(self.mlflow.set_tags, values)

    def launch_tags(self, values: dict[str, str], epoch: int) -> None:
        """How the run trains from `epoch` on (processes, device, versions). A run resumed otherwise keeps what its
        earlier epochs ran on, "2 -> 4 from epoch 3", as their timings were taken there."""
        merged = {}
        for key, value in values.items():
            # Not those of an attempt that trained no epoch, whose MLflow run this one goes on with (_retried).
            before = self.tags_before.get(key) if self.resuming else None
            if before is None:
                merged[key] = value if epoch == 1 else f"{value} from epoch {epoch}"
            elif before.rsplit(" -> ", 1)[-1].split(" from epoch ")[0] != value:
                merged[key] = f"{before} -> {value} from epoch {epoch}"
        self.tags(merged)

    def drop_tag(self, key: str) -> None:
        """Removes a tag the run had when this one went on with it."""
        if self.active and key in self.tags_before:
            self._guard(self.mlflow.delete_tag, key)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.active and Path(path).exists():
            self._guard(self.mlflow.log_artifact, str(path), folder)

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self._guard(self.mlflow.end_run, status)


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    """params as text, in batches of 100, the most one call takes; a value past MLflow's limit is cut to it (the
    resolved config, config.yaml, is an artifact beside them)."""
    from mlflow.entities import Param

    items = [Param(key, value) for key, value in _as_logged(params).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def _as_logged(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow keeps them: text, each cut to its limit."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    return {key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in params.items()}


def config_params(config: Config) -> dict[str, str]:
    """The resolved config as MLflow params: one per dotted key, so the UI's columns compare runs key by key."""
    return {k: str(v) for k, v in flatten(dump(config)).items()}


def config_tags(config: Config) -> dict[str, str]:
    """What the UI's run list tells runs apart by: the training pack's dataset (its manifest's name, else what its
    folder's name suggests), variant, prompt, layers, backbone."""
    m = config.model
    return {"dataset": dataset_name(config.data.train), "variant": m.variant, "prompt": m.prompt, "layers": m.layers,
            "backbone": m.backbone}


@cache
def code_tags() -> dict[str, str]:
    """The code a run ran, as tags: see _code_tags. MLflow finds a commit only above the entry script, which a
    search's trials, started by Ray's workers, do not have."""
    return _code_tags(Path(__file__).resolve().parent.parent)


def _code_tags(here: Path) -> dict[str, str]:
    """The git commit of the checkout `here` is the top of (temu.git_dirty where its tracked files have changes), or
    the installed version: an install's site-packages may lie in a user's own repository, whose commit is not ours."""
    def git(*args: str) -> str:
        # No optional locks: a status in every trial at once must not write the index under the others.
        return subprocess.run(["git", "--no-optional-locks", "-C", str(here), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() == here.resolve():
            changes = git("status", "--porcelain", "--untracked-files=no")
            return {"mlflow.source.git.commit": git("rev-parse", "HEAD"), **({"temu.git_dirty": "true"} if changes
                                                                              else {})}
    except (OSError, subprocess.SubprocessError):  # no git, no checkout, a hung one
        pass
    try:
        return {"temu.version": metadata.version("temu-dist")}
    except metadata.PackageNotFoundError:  # a copy on PYTHONPATH, neither checkout nor install
        return {}


def parent_run(uri: str, experiment: str, name: str, id_file: Path, params: dict[str, Any], tags: dict[str, str],
               what: str, same_params: bool = False) -> tuple[str | None, str | None]:
    """An MLflow run that groups others as its children (a search's trials, a repeat's splits), and the status it had:
    made once, found again from `id_file` when the interrupted command is rerun (with `same_params`, only if its
    params are these: MLflow cannot change a param, and a new start of a failed command may have new ones). None,
    with a warning, where MLflow is not usable."""
    try:
        import mlflow

        http_limits(uri)
        mlflow.set_tracking_uri(uri)
        _check_reachable(uri)
        experiment_id = use_experiment(mlflow, experiment, uri).experiment_id
        known = id_file.read_text().strip() if id_file.exists() else None
        if known and _in_store(mlflow, known):
            run = mlflow.get_run(known)
            if not same_params or run.data.params == _as_logged(params):
                return known, run.info.status
        client = mlflow.MlflowClient(uri)
        run = client.create_run(experiment_id, run_name=name, tags={**code_tags(), **tags})
        log_params(client, run.info.run_id, params)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(id_file, run.info.run_id)
        return run.info.run_id, None
    except Exception as e:  # noqa: BLE001 - tracking trouble must not stop the work it tracks
        warnings.warn(f"MLflow at {uri} is not usable ({error_line(e)}); the {what} goes on untracked", Notice,
                      stacklevel=2)
        return None, None


def log_artifacts(uri: str, run_id: str, artifacts: list[Path]) -> None:
    """Logs files to a run that goes on (a search's parent, as its trials end), replacing those of the same name;
    trouble with MLflow is a warning, the files are on disk."""
    try:
        import mlflow

        client = mlflow.MlflowClient(uri)
        for path in artifacts:
            client.log_artifact(run_id, str(path))
    except Exception as e:  # noqa: BLE001 - the work goes on; only its record in MLflow lags
        warnings.warn(f"MLflow at {uri}: could not log {', '.join(p.name for p in artifacts)} to run {run_id} "
                      f"({error_line(e)})", Notice, stacklevel=2)


def finish_run(uri: str, run_id: str, artifacts: list[Path], metrics: dict[str, float], tags: dict[str, str],
                  status: Literal["FINISHED", "FAILED", "KILLED"]) -> None:
    """Logs a run's results (a parent's, a trial stopped early) and ends it with `status`; trouble with MLflow is a
    warning, the results are on disk."""
    try:
        import mlflow

        client = mlflow.MlflowClient(uri)
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        for key, value in metrics.items():
            if not math.isnan(value):
                client.log_metric(run_id, key, value)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, status)
    except Exception as e:  # noqa: BLE001 - the work is done and written; only its record in MLflow is missing
        warnings.warn(f"MLflow at {uri}: could not finish run {run_id} ({error_line(e)})", Notice, stacklevel=2)


def _retried(mlflow: Any, run_id: str, config: Config) -> str | None:
    """The run of an attempt that stopped before its first checkpoint (a crash, a Ray Tune retry), where this one is
    the same config: it goes on with it rather than leave a failed twin beside it. None: a new run."""
    if not _in_store(mlflow, run_id):
        return None
    run = mlflow.get_run(run_id)
    if "train/loss" in run.data.metrics or run.data.params != _as_logged(config_params(config)):
        return None
    return run_id


def _in_store(mlflow: Any, run_id: str) -> bool:
    """The store holds the run, and not in its bin: MLflow refuses to continue a run deleted in the UI, which would
    switch tracking off; a new run takes its place."""
    try:
        return mlflow.get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def _check_reachable(uri: str) -> None:
    """Fail fast on an http(s) server that does not answer, instead of MLflow's long retries."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
        if response.status != 200:
            raise ConnectionError(f"/health answered {response.status}")
