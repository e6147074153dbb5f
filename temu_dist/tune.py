"""Ray Tune searches over the training config: prompt tuning, layer cutoffs, variant, lr, LDG weight, ... .

    python -m temu_dist.tune --config configs/tune/demo.yaml [key=value ...]
    RAY_ADDRESS=auto python -m temu_dist.tune --config configs/tune/X.yaml        # an existing Ray cluster

key=value overrides set keys of the search config, not of the training config: resources.gpu=0, num_samples=4,
"space={model.prompt: {grid: [none, coop]}}" (the whole space), "space.model.prompt={grid: [none, coop]}" (one key).
Training keys go in the search config's own overrides list, which such an override replaces:
"overrides=[train.epochs=2, data.workers=0]".

Every trial calls the same `train(config)` as `accelerate launch`, with the trial's values as overrides of the base
config, in its own run folder under out_dir/name/trials/. Each epoch's evaluation is reported to Ray, so ASHA can stop
weak trials early. MLflow: one parent run for the search (in out_dir/mlflow.db with the other runs there, unless
tracking_uri, the base config's tracking.uri or MLFLOW_TRACKING_URI names another store), one child run per trial;
the parent gets the results table, the prompt-tuning table (seed Table 5), the layer study (Fig. 8) and the best
trial's config; the plots are redrawn there as each trial ends. A failing trial is retried (max_failures) and
continues from its own last checkpoint; rerunning the same command after the driver was killed resumes the search
without redoing finished trials. Before a local Ray or MLflow start, the shards are checked as train checks them,
and one trial's resources against this machine's CPUs and GPUs. Ctrl-C stops the search (exit code 130, parent run
KILLED).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from ray.tune import Callback

from temu_dist import lock, ray_worker
from temu_dist.atomic import write_json_atomic, write_text_atomic
from temu_dist.config import (Config, ConfigError, Notice, Section, apply_overrides, differ, dump, error_line,
                              flatten, folder_name, load_config, metric_key, notices_as_lines, one_line_error,
                              parse_override, read_yaml, settings_label)
from temu_dist.data.manifest import naming_later_packs
from temu_dist.stop import Terminated, sigterm_as_ctrl_c, stop_code
from temu_dist.tracking import finish_run, log_artifacts, parent_run, tracking_uri

SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")
# A Ray Train trial asks for its workers itself; the trial's own process only waits for them (Ray refuses an empty
# request, hence a sliver of a CPU).
TRIAL_CPU = 0.01
# What a search was started with (_identity), beside its Ray experiment.
STARTED = "search-started.json"
SEARCH_LOCK = "tune.lock"
# What a search's identity holds since a version after its first: a search started before is not held to it.
SEARCH_ADDED = ("sample_seed",)
# The best trial's config as a run of its own, beside search.json.
BEST_CONFIG = "best-config.yaml"
# What trials on a cluster's other nodes need of the driver's environment, which Ray passes on only to a local Ray's
# workers: the MLflow server's login, artifact stores' credentials, Hugging Face's and the proxies' settings.
FORWARDED_ENV = ("MLFLOW_", "HF_", "HUGGING_FACE_", "AWS_", "AZURE_STORAGE_", "GOOGLE_APPLICATION_CREDENTIALS",
                 "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
# A Ray Train worker's output as a train process's: Ray Train's print (on by default in Ray 2.60) printed each line
# twice, and its logging configuration set the root logger to INFO (open_clip's model-building lines, 9 a process).
RAY_TRAIN_WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0"}
# Off in a search's Ray processes unless this process's environment sets it: Ray Train's preemption watcher, an actor
# of its own for each trial on several workers, logs node drains and keeps them for ray.train.get_preemption_info,
# which the trials never ask; Ray's core logged an error line as each started ("constructor arguments in the object
# store").
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
AUTO_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # "1": Ray Tune adds none of its CSV, JSON, TensorBoard loggers
# The training keys train.check_data reads, which the search checks before Ray starts.
CHECKED_DATA_KEYS = ("data", "eval", "train.key_metric", "model.image_size", "model.backbone", "model.layers",
                     "model.pretrained", "model.quick_gelu", "ldg")


class Resources(Section):
    cpu: float = Field(1.0, ge=0)
    gpu: float = Field(0.0, ge=0)  # fractions share a GPU between trials
    # > 1: each trial is a Ray Train job of this many processes (cpu and gpu are then per process), for several
    # GPUs per trial.
    workers: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _asks(self) -> "Resources":
        if self.cpu == 0 and self.gpu == 0:  # Ray refuses an empty request, once started
            raise ValueError("a trial must ask for some cpu or gpu")
        return self


class AshaConfig(Section):
    grace_period: int = Field(1, ge=1)  # epochs before a trial may be stopped
    reduction_factor: float = Field(2.0, gt=1)


class SearchConfig(Section):
    name: str = "tune"
    _name = field_validator("name")(folder_name)
    out_dir: str = "runs"
    base: str  # the training config every trial starts from
    overrides: list[str] = []  # key=value applied to the base before the trial's own values
    # Dotted training key -> {grid: [...]} | {choice: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} |
    # {randint: [lo, hi]}.
    space: dict[str, dict[str, list[Any]]]
    num_samples: int = Field(1, ge=1)  # samples of the non-grid dimensions (per grid point)
    # Seeds the draws of the non-grid dimensions: a search run again, elsewhere, tries the same values. null: Ray's own
    # unseeded draws. (A space's `seed` is the trials' training seed.)
    sample_seed: int | None = Field(0, ge=0)
    metric: str | None = None  # SET/METRIC; default: the base config's train.key_metric
    mode: Literal["max", "min"] = "max"
    asha: AshaConfig | None = AshaConfig()
    resources: Resources = Resources()
    max_concurrent: int = Field(0, ge=0)  # 0: as many as the resources allow
    max_failures: int = Field(2, ge=0)  # retries of a failing trial
    address: str | None = None  # null: RAY_ADDRESS if set, else a local Ray with this machine's CPUs and GPUs
    tracking_uri: str | None = None  # null: as a training run's tracking.uri (MLFLOW_TRACKING_URI, out_dir/mlflow.db)

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str | None) -> str | None:
        return v if v is None else metric_key(v)


def load_search(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SearchConfig:
    path = Path(path)
    tree = read_yaml(path, "search config")
    for item in overrides:
        if item.startswith("space."):  # the space's keys are dotted training keys: space.model.prompt=... sets one
            key, value = parse_override(item)
            space = tree.setdefault("space", {})
            if isinstance(space, dict):
                space[key.removeprefix("space.")] = value
                continue
        apply_overrides(tree, [item])
    try:
        search = SearchConfig.model_validate(tree)
    except ValidationError as e:
        message = one_line_error(e, str(path), SearchConfig)
        if any(err["type"] == "extra_forbidden" and err["loc"][0] in Config.model_fields for err in e.errors()):
            # Most likely a training key given as a key=value override of the search.
            message += "; training keys go in the search config's overrides list, e.g. 'overrides=[train.epochs=2]'"
        raise ConfigError(message) from None
    base = Path(search.base)
    if not base.is_absolute():
        # A base given relative to the search file or to the working directory, whichever exists.
        base = next((p for p in (path.parent / base, Path.cwd() / base) if p.is_file()), base)
    if not base.is_file():
        where = " (beside the search config or in the working directory)" if not Path(search.base).is_absolute() else ""
        raise ConfigError(f"{path}: base: {search.base}: no such config file{where}")
    search = search.model_copy(update={"base": str(base.resolve())})
    _check_space(search, path)
    return search


def _check_space(search: SearchConfig, path: Path) -> None:
    """Every searched key must be a valid training key with valid values (layers within the backbone's depth): fail
    before Ray starts."""
    from temu_dist.model.backbone import check_backbone

    base = base_config(search)
    if not search.space:  # its one trial would be the base config's run, under a search's name
        raise ConfigError(f"{path}: space: empty; give it a key to search, or train the base config with "
                          "python -m temu_dist.train")
    for key, spec in search.space.items():
        if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"{path}: space.{key}: expected one of {', '.join(SAMPLERS)} with a list, got {spec}")
        kind, values = next(iter(spec.items()))
        ranged = kind not in ("grid", "choice")
        number = int if kind == "randint" else (int, float)
        if not values or ranged and (len(values) != 2 or not all(isinstance(v, number) for v in values)
                                     or values[0] >= values[1] or kind == "loguniform" and values[0] <= 0):
            want = "[low, high] with low < high" if ranged else "a non-empty list"
            want += {"loguniform": " and low > 0 (a logarithm's)", "randint": ", whole numbers"}.get(kind, "")
            raise ConfigError(f"{path}: space.{key}: {kind} takes {want}, got {values}")
        if kind in ("uniform", "loguniform"):
            _check_fractions(base, key, kind, values, path)
        for value in [values[0], values[1] - 1] if kind == "randint" else values:  # Ray's randint draws below high
            config = load_config(None, [f"{key}={json.dumps(value)}"], base=base, base_source=f"{path} space")
            if key in ("model.backbone", "model.layers"):
                try:  # on a cluster too, where the shards are not checked here
                    check_backbone(config.model)
                except ConfigError as e:
                    raise ConfigError(f"{path} space: {e}") from None
    if base["device"] == "cuda" and search.resources.gpu == 0:
        raise ConfigError(f"{path}: resources.gpu: 0, but the trials' config asks for device: cuda, and Ray hides the "
                          "GPUs from a trial that asks for none: ask for resources.gpu, or use device: auto")
    epochs = base["train"]["epochs"]
    if search.asha and search.asha.grace_period > epochs:  # ASHA's max_t, which Ray asserts it is within
        raise ConfigError(f"{path}: asha.grace_period: {search.asha.grace_period} epochs before a trial may be "
                          f"stopped, but the trials train {epochs} (train.epochs): lower it "
                          f"(asha.grace_period={epochs}), or asha=null to let every trial finish")
    if search.num_samples > 1 and all(next(iter(spec)) == "grid" for spec in search.space.values()):
        # Every sample of a grid point would be the same trial: same values, same seed, same result.
        raise ConfigError(f"{path}: num_samples: {search.num_samples} samples of an all-grid space train each grid "
                          "point that many times over, alike; for repeats, search the seed: "
                          "'space.seed={grid: [0, 1, 2]}'")


def _check_fractions(base: dict, key: str, kind: str, values: list[float], path: Path) -> None:
    """uniform and loguniform draw fractions: a key of whole numbers took its bounds, then failed every trial."""
    try:
        load_config(None, [f"{key}={json.dumps(math.nextafter(values[0], values[1]))}"], base=base)
    except ConfigError:
        load_config(None, [f"{key}={json.dumps(values[0])}"], base=base, base_source=f"{path} space")
        raise ConfigError(f"{path}: space.{key}: {kind} draws fractions, which {key} does not take: use randint "
                          f"[{math.ceil(values[0])}, {math.floor(values[1]) + 1}] (Ray's randint leaves its high out) "
                          "or a grid") from None


def _check_fits_here(res: Resources) -> None:
    """A local Ray has this machine's CPUs and GPUs, no more: a trial that asks for more stays PENDING for ever."""
    import torch

    workers = max(res.workers, 1)
    problems, fits = [], []
    for key, unit, per_process, have, own in (
            ("gpu", "GPU", res.gpu, torch.cuda.device_count(), 0.0),
            ("cpu", "CPU", res.cpu, _local_cpus(), TRIAL_CPU if workers > 1 else 0.0)):
        need = per_process * workers + own
        if need > have:
            how = (f" ({workers} workers x {per_process:g}{f', and {own:g} for the trial itself' if own else ''})"
                   if workers > 1 else "")
            problems.append(f"resources.{key}: one trial needs {need:g} {unit}{'s' * (need != 1)}{how}, this "
                            f"machine has {have}")
            fits.append(f"resources.{key}={math.floor((have - own) / workers * 100) / 100:g}")
    if problems:
        raise ConfigError("; ".join(problems) + f": lower {'them' if len(fits) > 1 else 'it'} (e.g. --config FILE "
                          f"{' '.join(fits)}) or run the search on a Ray cluster (RAY_ADDRESS=auto, or address: in "
                          "the search config)")


def _room(have: dict, asks: dict) -> int:
    """How many processes asking for `asks` ({"CPU": 2, "GPU": 1}) fit in a node's resources `have`."""
    return min(math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in asks.items())


def _no_node_fits(res: Resources, nodes: list[dict]) -> str | None:
    """Why no trial can start on a cluster of these nodes (ray.nodes()), or None where one can. A trial of one process
    needs its CPUs and GPUs on one node; a Ray Train trial needs room for its workers over all nodes."""
    asks = {k: v for k, v in (("CPU", res.cpu), ("GPU", res.gpu)) if v > 0}  # not empty: Resources checks that
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    workers = max(res.workers, 1)
    rooms = [_room(have, asks) for have in alive]
    if workers == 1 and sum(rooms) >= 1:
        return None
    # A Ray Train trial's own TRIAL_CPU sits on one node beside whichever workers that node still has room for.
    if workers > 1 and any(sum(rooms) - r + _room({**have, "CPU": have.get("CPU", 0.0) - TRIAL_CPU}, asks) >= workers
                           for have, r in zip(alive, rooms) if have.get("CPU", 0.0) >= TRIAL_CPU - 1e-9):
        return None
    each = ", ".join(f"{v:g} {k}{'s' * (v != 1)}" for k, v in asks.items())
    wants = f"{workers} processes of {each} and {TRIAL_CPU:g} CPU for the trial itself, which the cluster's nodes " \
        "have no room for" if workers > 1 else f"{each}, which no node of the cluster has"
    return (f"resources: one trial asks for {wants} ({_nodes_said(alive)}); its trials "
            "stay PENDING until an autoscaler adds such nodes (Ctrl-C stops the search), or lower resources.cpu / "
            "resources.gpu")


def _idle_gpus(search: SearchConfig, nodes: Callable[[], list[dict]]) -> str | None:
    """Why some of the cluster's GPUs (nodes: ray.nodes) would sit idle while trials wait, or None: a node whose CPUs
    hold fewer one-process trials than its GPUs do (Ray starts a trial where both fit)."""
    res = search.resources
    if res.workers > 1 or not res.gpu or not res.cpu:
        return None
    alive = [n.get("Resources", {}) for n in nodes() if n.get("Alive")]
    by_gpu = sum(_room(have, {"GPU": res.gpu}) for have in alive)
    both = sum(_room(have, {"GPU": res.gpu, "CPU": res.cpu}) for have in alive)
    wanted = min(by_gpu, _planned(search), search.max_concurrent or by_gpu)
    if both >= wanted:
        return None
    return (f"resources: {both} trial(s) run at once where the GPUs hold {wanted}, as each asks for {res.cpu:g} CPUs "
            f"({_nodes_said(alive)}): give each node resources.cpu / resources.gpu CPUs per GPU (under SLURM, sbatch "
            "--cpus-per-task), or lower resources.cpu")


def _nodes_said(alive: list[dict]) -> str:
    """The live nodes' resources, the first 4 of them."""
    said = "; ".join(f"{have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs" for have in alive[:4])
    return f"{len(alive)} alive: {said or 'none'}" + (f" and {len(alive) - 4} more" if len(alive) > 4 else "")


def _local_cpus() -> int:
    """The CPUs a local Ray starts with: Ray's own count, which takes a container's cgroup CPU quota or cpuset (docker
    --cpus=4 on a 64-core host: 4), not os.cpu_count(). A Ray without that function: the CPUs this process may use."""
    try:
        # Private, but what ray.init itself calls.
        from ray._private.utils import get_num_cpus

        return get_num_cpus(override_docker_cpu_warning=True)  # Ray warns once more when it starts
    except (ImportError, TypeError):  # TypeError: a Ray whose get_num_cpus takes no such argument
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_data(search: SearchConfig) -> None:
    """What the trials read, checked as train() checks it and with its messages, so that a missing pack fails the
    search now, not every trial once Ray has started: the base config with each combination of the grid and choice
    values of the keys check_data reads (CHECKED_DATA_KEYS: the packs, splits, evaluation sets, the key metric's set,
    the input size CW-SSIM needs, the backbone, its layers and weights), in the search's out_dir, where
    the trials write. Sampled keys (uniform, loguniform, randint) are left out: they draw numbers, which the config's
    own bounds check. Paths as in the search config, relative to the working directory, as for train."""
    from temu_dist.evaluate import check_metric
    from temu_dist.train import check_data

    keys = [k for k, spec in search.space.items() if next(iter(spec)) in ("grid", "choice") and any(
        k == read or k.startswith(f"{read}.") for read in CHECKED_DATA_KEYS)]
    configs = [load_config(search.base, [*search.overrides, *(f"{k}={json.dumps(v)}" for k, v in zip(keys, values)),
                                         f"out_dir={json.dumps(search.out_dir)}"])
               for values in itertools.product(*(next(iter(search.space[k].values())) for k in keys))]
    for i, config in enumerate(configs):
        with naming_later_packs(configs, i):
            sets = check_data(config)
        # The search's own metric, as the key metric is: one the trials' evaluation reports.
        if search.metric:
            check_metric("metric", search.metric, sets, config)


def base_config(search: SearchConfig) -> dict:
    """The resolved base training config with every path made absolute: Ray runs trials in other directories."""
    tree = dump(load_config(search.base, search.overrides))
    tree["data"]["train"] = _absolute_path("data.train", tree["data"]["train"])
    tree["model"]["pretrained"] = _absolute_path("model.pretrained", tree["model"]["pretrained"])
    for cross in tree["eval"]["cross"]:
        cross["shards"] = _absolute(cross["shards"])
    return tree


def _absolute_path(key: str, value: Any) -> Any:
    """A base or searched value made absolute where it is a path (a pretrained tag stays a tag)."""
    if key == "data.train" and value:
        return _absolute(value)
    if key == "model.pretrained" and value and Path(value).expanduser().is_file():
        return _absolute(value)
    return value


def _absolute(path: str) -> str:
    # Keeps "{split}"-style placeholders and anything already absolute as it is.
    return str(Path(path).expanduser().absolute())


def param_space(search: SearchConfig) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    # Paths among the grid and choice values are made absolute, as the base config's are: Ray runs trials elsewhere.
    return {key: make[kind]([_absolute_path(key, v) for v in values] if kind in ("grid", "choice") else values)
            for key, spec in search.space.items() for kind, values in spec.items()}


def trial_config(base: dict, params: dict, trials_dir: str, trial: str, tracking_uri: str, parent: str | None):
    """The training config of one trial: the base, the trial's values, its own run folder and MLflow parent."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    overrides += [f"out_dir={trials_dir}", f"name={trial}", f"tracking.uri={tracking_uri}",
                  f"tracking.run_name={json.dumps(trial_label(trial, params))}",
                  f"tracking.parent_run_id={json.dumps(parent)}", "train.resume=auto"]
    return load_config(None, overrides, base=base)


def trial_label(trial: str, params: dict) -> str:
    """The trial's MLflow run name, its id and the values it tries (trial-ab12_00003 prompt=coop layers=upto:12): the
    UI's run list reads as the search's table."""
    return f"{trial} {settings_label(params)}".strip()


def _metrics(record: dict) -> dict:
    from temu_dist.train import epoch_metrics

    # None: a NaN as results.json writes it (strict JSON); Ray compares metrics as numbers.
    return {**{k: math.nan if v is None else v for k, v in epoch_metrics(record).items()},
            "epoch": record["epoch"]}  # epoch: ASHA's time axis


def run_trial(params: dict, base: dict, trials_dir: str, tracking_uri: str, parent: str | None,
              resources: dict | None = None) -> None:
    """One trial: train(config) with the trial's values, each epoch reported to Ray; with resources.workers > 1,
    train(config) on that many Ray Train processes.

    The last epoch is reported only once train() has returned: Ray ends a trial on its final report, and the run
    must first write its results and MLflow artifacts. A trial restored after a killed search resumes from its own
    last checkpoint (train.resume=auto in its own run folder)."""
    from ray import tune

    from temu_dist.train import train

    res = Resources.model_validate(resources or {})
    trial = f"trial-{tune.get_context().get_trial_id()}"
    config = trial_config(base, params, trials_dir, trial, tracking_uri, parent)
    _fails_again_if_it_went_nonfinite(config)
    if res.workers <= 1:
        def report(record: dict) -> None:
            if record["epoch"] < config.train.epochs:
                tune.report(_metrics(record))

        with notices_as_lines(trial):  # in the trial's log, beside Ray's own prefix
            results = train(config, on_epoch=report)
    else:
        results = _train_on_workers(config, res, trial)
    tune.report(_metrics(results["history"][-1]))


def _fails_again_if_it_went_nonfinite(config: Config) -> None:
    """A trial whose loss went non-finite fails again at once: retried (max_failures) or resumed, it would replay
    the same batches to the same loss, for as long as it took to get there."""
    from temu_dist.train import NONFINITE, NonFiniteLoss

    marker = config.run_dir() / NONFINITE
    if marker.is_file():
        raise NonFiniteLoss(f"{marker.read_text().strip()} [an earlier attempt; delete {marker} to train it again]")


def _train_on_workers(config, res: Resources, trial: str) -> dict:
    """Ray Train runs train(config) on res.workers processes, which Ray has joined in one process group (gloo on
    CPU, NCCL on GPU); accelerate finds it there. Epoch metrics reach Tune through Ray Train's report."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    def loop() -> None:
        from ray import train as ray_train

        from temu_dist.train import train

        def report(record: dict) -> None:
            if record["epoch"] < config.train.epochs:
                ray_train.report(_metrics(record))

        with notices_as_lines(trial):
            train(config, on_epoch=report)

    # Ray makes the process group, so its timeout is said here; accelerate keeps the group it finds.
    TorchTrainer(loop, torch_config=TorchConfig(timeout_s=round(config.train.timeout_min * 60)),
                 scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.gpu > 0,
                                              resources_per_worker={"CPU": res.cpu, "GPU": res.gpu}),
                 run_config=RunConfig(name=trial, storage_path=str(config.run_dir().parent.parent / "ray-train"),
                                      callbacks=[TuneReportCallback()],
                                      worker_runtime_env={"env_vars": RAY_TRAIN_WORKER_ENV})).fit()
    return json.loads((config.run_dir() / "results.json").read_text())


def _tracking_uri(search: SearchConfig, base: dict, address: str | None) -> str:
    uri = tracking_uri(search.tracking_uri or base["tracking"]["uri"], search.out_dir)
    if address and uri.startswith("sqlite:"):
        warnings.warn(f"a search on the Ray cluster at {address} tracks into {uri}: trials on several nodes writing "
                      "one sqlite file over a shared disk can fail to lock it; run an MLflow server and set "
                      "tracking_uri", Notice, stacklevel=2)
    return uri


def run_search(search: SearchConfig, trainable: Callable | None = None) -> dict:
    """Runs (or resumes) the search; returns the summary also written to out_dir/name/search.json. A search stopped
    early (Ctrl-C) or failing leaves its MLflow parent run KILLED or FAILED."""
    import ray

    address, search_dir, base, metric, restored = _before_ray(search)
    if not address:
        _check_fits_here(search.resources)
    if address and not ray.is_initialized():  # before the lock: a search that cannot start writes nothing
        _join(search, address)
    held = _hold_search_folder(search_dir)
    try:
        return _search(search, search_dir, base, metric, restored, address, trainable)
    finally:
        if held is not None:
            lock.let_go(held)


def _before_ray(search: SearchConfig) -> tuple[str | None, Path, dict, str, bool]:
    """The checks a search and its --check make before anything is made or started, but whether a trial fits this
    machine: (the Ray cluster's address or None, the search folder, the base config, the metric, whether the folder
    holds a search to resume). A cluster is not held to this machine's CPUs and GPUs; once joined, a trial no node can
    hold is only warned about, since an autoscaler may add nodes for it."""
    from ray import tune

    address = search.address or os.environ.get("RAY_ADDRESS")
    if not address:
        _check_data(search)  # on a cluster the driver need not see the shards the workers read
    search_dir = (Path(search.out_dir) / search.name).resolve()
    base = base_config(search)
    metric = search.metric or base["train"]["key_metric"]
    restored = tune.Tuner.can_restore(str(search_dir / "ray" / search.name))
    if restored:
        _check_same_search(search, base, metric, search_dir / STARTED)
    return address, search_dir, base, metric, restored


def check_lines(search: SearchConfig) -> list[str]:
    """`--check`: the search's checks before Ray starts, and what it would run, with nothing started or written. A
    trial too large for this machine is a warning, not a refusal: checked on a login node, the search may be meant
    for a job's nodes (launch/ray-slurm.sbatch)."""
    address, search_dir, base, metric, restored = _before_ray(search)
    too_large = []
    if not address:
        try:
            _check_fits_here(search.resources)
        except ConfigError as e:
            too_large = [f"warning: started on this machine, the search would be refused: {e}"]
    res = search.resources
    asks = ", ".join(f"{n:g} {what}" for n, what in ((res.cpu, "CPU"), (res.gpu, "GPU")) if n)
    trials = _planned(search)
    space = "; ".join(f"{key} {kind} {', '.join(map(str, values))}" for key, spec in search.space.items()
                      for kind, values in spec.items())
    epochs = base["train"]["epochs"]
    stops = f"ASHA may stop a trial after {search.asha.grace_period} of its {epochs} epochs" if search.asha else \
        f"every trial trains its {epochs} epochs"
    where = f"the Ray cluster at {address} (the trials check the packs and weights they read)" if address else \
        "a local Ray (the packs, evaluation sets and weights of every grid and choice value checked)"
    folder = "finished: its results are gathered again" if restored and _finished(search_dir) else \
        "resumes the search it holds" if restored else "a new search"
    return [f"{trials} trial(s): {search.num_samples} sample(s) of each of {trials // search.num_samples} grid "
            f"point(s) of {space}",
            f"each trial: {asks}" + (f" per process, {res.workers} processes" if res.workers > 1 else "") +
            (f"; {search.max_concurrent} at a time" if search.max_concurrent else "") +
            f"; ranked by {metric} ({search.mode}); {stops}",
            f"on {where}", *too_large, f"search folder: {search_dir}, {folder}"]


def _join(search: SearchConfig, address: str) -> None:
    """Joins the Ray cluster at `address`, or says in one line why it could not."""
    import ray

    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    try:
        _ray_init({"env_vars": env} if env else None, address=address)
    except (ConnectionError, ray.exceptions.RayError) as e:
        # A refused token comes back as a connection that failed, after Ray's own retries.
        auth = "; one with token authentication (as launch/ray-cluster.sh starts it) also needs " \
            "RAY_AUTH_MODE=token here and its token (RAY_AUTH_TOKEN, or ~/.ray/auth_token)" \
            if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" else ""
        local = "address: null in the search config" if search.address else "RAY_ADDRESS unset"
        raise ConfigError(f"address: could not join the Ray cluster at {address} ({error_line(e)}): start it "
                          f"with bash launch/ray-cluster.sh head{auth}; or search on a local Ray, with {local}") \
            from None
    # Ray itself only logs the autoscaler's view every half a minute, with the trials already PENDING.
    if (why := _no_node_fits(search.resources, ray.nodes())) is not None:
        warnings.warn(f"the Ray cluster at {address}: {why}", Notice, stacklevel=3)


def _hold_search_folder(search_dir: Path) -> IO[str] | None:
    """The search folder for this driver alone: a second one started into it resumed the same trials beside the
    first's, failed them on their run folders' locks, and wrote search.json and the parent run over the first's. An
    flock on search_dir/tune.lock, let go however the driver ends."""
    try:
        search_dir.mkdir(parents=True, exist_ok=True)
        return lock.take(search_dir / SEARCH_LOCK)
    except lock.Busy as e:
        raise ConfigError(f"{search_dir}: another search is running in this folder ({e}): wait for it to end or stop "
                          "it, or give this one another name=") from None
    except lock.NoLocks as e:
        warnings.warn(f"{search_dir / SEARCH_LOCK} cannot be locked ({e}): a second search started into this "
                      "folder will not be refused", Notice, stacklevel=3)
        return None
    except OSError as e:  # a read-only mount, a file in the folder's place
        raise ConfigError(f"out_dir: cannot write the search folder {search_dir} ({e.strerror})") from None


def _search(search: SearchConfig, search_dir: Path, base: dict, metric: str, restored: bool, address: str | None,
            trainable: Callable | None) -> dict:
    """run_search's work, with the search folder held."""
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    experiment = search_dir / "ray"
    started = search_dir / STARTED
    finished = restored and _finished(search_dir)
    if finished:
        print(f"tune: the search {search.name} in {search_dir} has finished: its results are gathered again, no trial "
              "trains")
    elif restored:
        print(f"tune: resuming the search {search.name} in {search_dir}: finished trials are kept, stopped ones go on")
    else:
        write_json_atomic(started, _identity(search, base, metric))
    uri = _tracking_uri(search, base, address)
    params = {f"space.{k}": json.dumps(v) for k, v in search.space.items()}
    params.update({"base": search.base, "overrides": json.dumps(search.overrides), "num_samples": search.num_samples,
                   "metric": metric})
    parent = was = None
    if base["tracking"]["enabled"]:
        # A new start takes the parent of an earlier one that failed before Ray saved the search only with its params.
        parent, was = parent_run(uri, base["tracking"]["experiment"], search.name, search_dir / "mlflow_parent_run_id",
                                 params, {"temu.search": "true"}, "search", same_params=not restored)
    if finished:
        # From what Ray saved of each trial, without starting Ray: the rerun took 43 s here, now 17 s.
        from ray.tune import ExperimentAnalysis, ResultGrid

        grid = ResultGrid(ExperimentAnalysis(str(experiment / search.name)))
        return summarize(search, search_dir, grid, metric, uri, parent, base)
    ours = not ray.is_initialized()  # a Ray this search starts, and ends
    try:
        if ours:
            # Ray's temp files (sockets, logs) go inside the search folder, not /tmp/ray or ~/.ray.
            temp = Path(os.environ.get("TEMU_RAY_TMP", search_dir / "ray"))
            temp.mkdir(parents=True, exist_ok=True)
            _ray_init(include_dashboard=False, _temp_dir=str(temp), log_to_driver=True)
        if (why := _idle_gpus(search, ray.nodes)) is not None:
            warnings.warn(why, Notice, stacklevel=3)
        res = search.resources
        target = tune.with_parameters(trainable or run_trial, base=base, trials_dir=str(search_dir / "trials"),
                                      tracking_uri=uri, parent=parent, resources=res.model_dump())
        target = tune.with_resources(target, {"cpu": res.cpu, "gpu": res.gpu} if res.workers <= 1
                                     else {"cpu": TRIAL_CPU})
        if restored:  # with the callbacks Ray saved with the search
            tuner = tune.Tuner.restore(str(experiment / search.name), target, resume_errored=True)
        else:
            scheduler = ASHAScheduler(time_attr="epoch", max_t=base["train"]["epochs"],
                                      grace_period=search.asha.grace_period,
                                      reduction_factor=search.asha.reduction_factor) if search.asha else None
            tuner = tune.Tuner(
                target, param_space=param_space(search),
                # Ray's max_concurrent_trials is lost on a search algorithm given: the generator takes it.
                tune_config=tune.TuneConfig(metric=metric, mode=search.mode, scheduler=scheduler,
                                            search_alg=BasicVariantGenerator(max_concurrent=search.max_concurrent,
                                                                             random_state=search.sample_seed),
                                            num_samples=search.num_samples),
                run_config=tune.RunConfig(name=search.name, storage_path=str(experiment),
                                          failure_config=tune.FailureConfig(max_failures=search.max_failures),
                                          callbacks=[SearchProgress(search, search_dir, metric, uri, parent),
                                                     CSVLoggerCallback(), JsonLoggerCallback()],
                                          verbose=1))
        # The trials are tracked in MLflow: Ray's TensorBoard logger, which Ray adds with its CSV and JSON ones (the
        # results are read from those) unless told to add none, wrote event files no one reads and pointed at them.
        quiet = _passes_its_loggers(tuner) and AUTO_LOGGERS not in os.environ
        if quiet:
            os.environ[AUTO_LOGGERS] = "1"
        try:
            grid = tuner.fit()
        finally:
            if quiet:
                del os.environ[AUTO_LOGGERS]
            if ours:
                # Now, not at exit: the last trial's teardown SIGTERM can print a traceback of Ray's own ("Exception
                # ignored ... SystemExit"), which Ray's exit let through after the summary.
                ray.shutdown()
        if _stopped(search, grid, restored):
            raise KeyboardInterrupt
    except BaseException as e:
        if parent is not None and was != "FINISHED":  # a finished search's results stand, whatever stops a rerun
            finish_run(uri, parent, [], {}, {}, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    return summarize(search, search_dir, grid, metric, uri, parent, base)


def _passes_its_loggers(tuner) -> bool:
    """Whether the search's callbacks hold Ray's CSV and JSON loggers, as a search started since it passes them does
    (a restored one goes on with the callbacks it was saved with); read from Ray's own tuner, False where it has none
    (a Ray client)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    internal = getattr(tuner, "_local_tuner", None)
    callbacks = (internal.get_run_config().callbacks or []) if internal is not None else []
    return all(any(isinstance(c, kind) for c in callbacks) for kind in (CSVLoggerCallback, JsonLoggerCallback))


def _no_ray_resume_hint(record: logging.LogRecord) -> bool:
    """Ray's hint after Ctrl-C, to resume with Tuner.restore(...): rerunning this command does that, as ours says."""
    return not record.getMessage().startswith("Experiment has been interrupted")


logging.getLogger("ray.tune.tune").addFilter(_no_ray_resume_hint)


def _ray_init(runtime_env: dict | None = None, **kwargs) -> None:
    """ray.init, keeping this process's SIGTERM handler: Ray's core worker puts in its own, which aborts the driver
    (exit 134, the parent run left RUNNING), where SIGTERM must stop the search as Ctrl-C does."""
    import ray

    handler = signal.getsignal(signal.SIGTERM)
    runtime_env = runtime_env or {}
    env_vars = {PREEMPTION_WATCHER: os.environ.get(PREEMPTION_WATCHER, "0"), **runtime_env.get("env_vars", {})}
    ray.init(runtime_env={**runtime_env, "env_vars": env_vars, "worker_process_setup_hook": ray_worker.setup},
             **kwargs)
    if handler is not None and threading.current_thread() is threading.main_thread():  # signal's own rule
        signal.signal(signal.SIGTERM, handler)


def _identity(search: SearchConfig, base: dict, metric: str) -> dict:
    """What a search's results depend on: its space, samples, metric and scheduler, and the base training config's
    keys that the trials train or are scored with, but for those a resumed training run may change
    (resume.RESUME_MAY_CHANGE) and those every trial sets from the space."""
    from temu_dist.resume import RESUME_MAY_CHANGE, TRAINED_SECTIONS

    def searched(key: str) -> bool:
        return any(key == k or key.startswith(f"{k}.") for k in search.space)

    trained = {k: v for k, v in flatten(base).items()
               if k.split(".")[0] in (*TRAINED_SECTIONS, "eval") and k not in RESUME_MAY_CHANGE
               and not searched(k)}
    tree = {"space": search.space, "num_samples": search.num_samples, "sample_seed": search.sample_seed,
            "metric": metric, "mode": search.mode, "asha": search.asha.model_dump() if search.asha else None,
            "base": trained}
    return json.loads(json.dumps(tree))  # as read back from the file


def _check_same_search(search: SearchConfig, base: dict, metric: str, started: Path) -> None:
    """A search rerun to resume it must be the one started: Ray restores the trials it began with and keeps their
    results, so a changed space, base or sample count would come back with the old search's results under the new
    config. A search started before this file was written is not checked."""
    from temu_dist.resume import ADDED_SINCE

    if not started.is_file():
        return
    before, now = flatten(json.loads(started.read_text())), flatten(_identity(search, base, metric))
    for key in sorted(set(before) | set(now), key=lambda k: (k.split(".")[0] != "space", k)):
        shown = key.removeprefix("base.")
        if key in SEARCH_ADDED and key not in before:  # its draws were made, and Ray restores them
            continue
        # A key added since the search started: its trials trained with the value ADDED_SINCE gives, if any.
        added = key not in before and key != shown and shown in ADDED_SINCE
        was = ADDED_SINCE[shown] if added else before.get(key)
        if (was is not None or not added) and differ(shown, was, now.get(key)):
            asks = "leaves it out" if key not in now else f"asks for {now[key]!r}"
            differs = f"{shown}: the search {search.name} in {started.parent} was started " \
                f"{'without it' if was is None else f'with {was!r}'}, this run {asks}"
            if _finished(started.parent):
                raise ConfigError(f"{differs}; it has finished, and a finished search is not extended: give the "
                                  "changed one another name= (each of its trials trains anew) and report both "
                                  "folders side by side")
            raise ConfigError(f"{differs}; rerun it as it was started to resume it, or give the changed search "
                              "another name=")


def _finished(search_dir: Path) -> bool:
    """Whether the search has finished every trial: a rerun trains nothing (errored trials are tried again)."""
    try:
        trials = json.loads((search_dir / "search.json").read_text())["trials"]
        return all(row["error"] is None for row in trials)
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or one a power cut left unreadable
        return False


def _stopped(search: SearchConfig, grid, restored: bool) -> bool:
    """Whether Ray Tune's own Ctrl-C handler stopped the search: it ends the trials and returns as if all were done.
    Some were then never started, or neither finished ("done": returned, or stopped by ASHA) nor failed. A restored
    search started before STARTED was written may have had its space changed since: only the second test holds
    there."""
    planned = _planned(search)
    cut = any(r.error is None and not (r.metrics or {}).get("done") for r in grid)
    return cut or (not restored and len(grid) < planned)


def summarize(search: SearchConfig, search_dir: Path, grid, metric: str, uri: str, parent: str | None,
              base: dict) -> dict:
    """Results table, plots and the best trial's config, to search.json and the parent MLflow run. Trials ASHA
    stopped early get their best value and a tag saying so: Ray ends them as Ctrl-C would, without results."""
    epochs = base["train"]["epochs"]
    rows = [_row(search, metric, (result.metrics or {}).get("trial_id", "?"), result.config,
                 _scores(result.metrics_dataframe, search_dir, (result.metrics or {}).get("trial_id"), metric),
                 (result.metrics or {}).get("epoch"),
                 # Ray wraps a trial's exception (as .cause) in a traceback of its actor.
                 error_line(getattr(result.error, "cause", None) or result.error) if result.error else None)
            for result in grid]
    rows.sort(key=lambda r: r["trial"])  # in the order they were made (Ray's ids count up): a restored grid has its own
    ok = [r for r in rows if r["best"] is not None]
    best = max(ok, key=lambda r: r["best"] if search.mode == "max" else -r["best"]) if ok else None
    best_config = search_dir / BEST_CONFIG
    summary = {"search": search.name, "metric": metric, "trials": rows, "best": best,
               "best_config": str(best_config) if best else None,
               "mlflow": uri if parent is not None else None, "plots": [path.name for path in _plots(search)]}
    write_json_atomic(search_dir / "search.json", summary, default=str)  # first: the results, whatever the plots do
    if best is not None:
        write_text_atomic(best_config, yaml.safe_dump(_best_config(search, base, best), sort_keys=False))
    plots = _draw(search, search_dir, rows, metric)
    if parent is not None:
        for row in rows if search.asha else []:
            planned = row.get("train.epochs", epochs)  # a search over train.epochs plans each trial's own
            id_file = search_dir / "trials" / row["trial"] / "mlflow_run_id"
            stopped = row["error"] is None and row["best"] is not None and (row["epochs"] or 0) < planned
            if stopped and id_file.is_file():
                finish_run(uri, id_file.read_text().strip(), [], {f"best/{metric}": row["best"]},
                           {"temu.stopped": f"early, by ASHA after epoch {row['epochs']} of {planned}"}, "KILLED")
        artifacts = [search_dir / "search.json", *plots, *([best_config] if best else [])]
        finish_run(uri, parent, artifacts, {f"best/{metric}": float(best["best"])} if best else {},
                      {"best_trial": best["trial"]} if best else {}, "FINISHED" if ok else "FAILED")
    return summary


def _best_config(search: SearchConfig, base: dict, best: dict) -> dict:
    """The best trial's training config, to train it again on its own: the base with the trial's values, a run of
    its own in the base's out_dir and MLflow store (the trial's config.yaml would train into the search, as one more
    of its trials)."""
    values = [f"{k}={json.dumps(best[k])}" for k in search.space]
    return dump(load_config(None, [*values, f"name={json.dumps(f'{search.name}-best')}"], base=base))


def _scores(history, search_dir: Path, trial_id: str | None, metric: str) -> list[float]:
    """A trial's `metric` in each epoch it trained: as Ray's CSV logger wrote its reports (`history`), and as its own
    run recorded them. For a trial resumed from its checkpoint, Ray's holds only the epochs since the resume; the run's
    last checkpoint can lack the epoch ASHA stopped it after."""
    from temu_dist.checkpoint import TRAINER_INFO
    from temu_dist.train import eval_metrics

    by_epoch = {}
    if history is not None and metric in history:
        by_epoch = dict(zip(history["epoch"], history[metric]))
    run = search_dir / "trials" / f"trial-{trial_id}"
    for path in (run / "results.json", run / "checkpoints" / "last" / TRAINER_INFO):
        try:
            records = json.loads(path.read_text())["history"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        by_epoch.update((r["epoch"], eval_metrics(r["eval"]).get(metric)) for r in records)
        break
    return [float(v) for v in by_epoch.values() if v is not None and not math.isnan(v)]


def _row(search: SearchConfig, metric: str, trial_id: str, config: dict, scores: list[float], epoch: int | None,
         error: str | None) -> dict:
    """A trial's line of the results table: its values, epochs trained and best `metric` (NaN epochs left out)."""
    best = (max(scores) if search.mode == "max" else min(scores)) if scores else None
    return {"trial": f"trial-{trial_id}", **{k: config.get(k) for k in search.space}, "epochs": epoch, "best": best,
            "error": error}


def _plots(search: SearchConfig) -> dict[Path, Callable]:
    """The search's plots, by file name: those its space calls for."""
    from temu_dist.plots import layer_study, prompt_table

    return {Path(name): plot for key, name, plot in (("model.prompt", "prompt_table.png", prompt_table),
                                                     ("model.layers", "layer_study.png", layer_study))
            if key in search.space}


def _draw(search: SearchConfig, search_dir: Path, rows: list[dict], metric: str, note: str = "") -> list[Path]:
    return [plot(rows, metric, search_dir / name, search.mode, note) for name, plot in _plots(search).items()]


class SearchProgress(Callback):
    """Redraws the search's plots, beside search.json and on the parent MLflow run, each time a trial ends: a search
    of hours is followed as it goes, not only once it is over. Ray saves it with the search, by reference to this
    class: a resumed search runs this code, not that of the version that started it (but for searches started before
    it was here, whose saved callback is the older one, kept whole)."""

    def __init__(self, search: SearchConfig, search_dir: Path, metric: str, uri: str, parent: str | None) -> None:
        self.search, self.search_dir, self.metric, self.uri, self.parent = search, search_dir, metric, uri, parent
        self.ended: set[str] = set()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._redraw(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._redraw(trials, trial)

    def _redraw(self, trials, trial) -> None:
        try:
            self.ended.add(trial.trial_id)
            # Trials that ended before a resume are restored as such.
            ended = [t for t in trials if t.trial_id in self.ended or t.status in ("TERMINATED", "ERROR")]
            rows = [_row(self.search, self.metric, t.trial_id, t.config,
                         _scores(_history(t), self.search_dir, t.trial_id, self.metric), t.last_result.get("epoch"),
                         None) for t in ended]
            if not any(r["best"] is not None for r in rows):
                return
            # Ray makes a grid's trials as it goes: the planned number, not those made so far.
            note = f"{len(ended)} of {max(_planned(self.search), len(trials))} trials ended"
            plots = _draw(self.search, self.search_dir, rows, self.metric, note)
            if self.parent is not None:
                log_artifacts(self.uri, self.parent, plots)
        except Exception as e:  # noqa: BLE001 - a plot must not stop the search; the final ones are drawn anyway
            warnings.warn(f"could not draw the search's plots so far ({error_line(e)})", Notice, stacklevel=2)


def _history(trial) -> Any:
    """What Ray's CSV logger wrote of a trial's reports (the ResultGrid's source too): in this session's staging
    folder, or, for a trial that ended before a resume, in the search's own."""
    import pandas as pd

    for folder in (trial.local_path, trial.path):
        path = Path(folder or "", "progress.csv")
        if folder and path.is_file():
            try:
                return pd.read_csv(path)
            except (OSError, ValueError):
                return None
    return None


def _planned(search: SearchConfig) -> int:
    """The trials a search makes: its samples times the grid's points."""
    return search.num_samples * math.prod(len(values) for spec in search.space.values()
                                          for kind, values in spec.items() if kind == "grid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m temu_dist.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a search config (configs/tune/*.yaml)")
    parser.add_argument("--check", action="store_true",
                        help="make the search's checks, say what it would run, and stop (Ray not started, nothing "
                             "written)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="keys of the search config, not of the training config (examples above)")
    args = parser.parse_intermixed_args(argv)
    started = time.perf_counter()

    try:
        search = load_search(args.config, args.overrides)
        if args.check:
            print("\n".join(f"tune: {line}" for line in check_lines(search)))
            return 0
        with sigterm_as_ctrl_c(), notices_as_lines("tune"):  # SIGTERM: scancel, a job's time limit
            summary = run_search(search)
    except ConfigError as e:
        print(f"tune: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"tune: {'stopped by SIGTERM' if isinstance(e, Terminated) else 'interrupted'}; finished trials are "
              "kept, rerun the same command to resume the search", file=sys.stderr)
        return stop_code(e)
    keys = [k for k in summary["trials"][0] if k not in ("error",)] if summary["trials"] else []
    print("tune: " + " | ".join(keys))
    for row in summary["trials"]:
        print("tune: " + " | ".join(_fmt(row[k]) for k in keys) + (f" | error: {row['error']}" if row["error"] else ""))
    if not summary["best"]:
        print("tune: no trial reported a result (errors above)", file=sys.stderr)
        return 1
    print(f"tune: best {summary['best']['trial']} with {summary['metric']} {summary['best']['best']:.4f}; train it "
          f"again on its own: python -m temu_dist.train --config {summary['best_config']}")
    where = Path(search.out_dir).resolve() / search.name
    print(f"tune: {len(summary['trials'])} trial(s) in {(time.perf_counter() - started) / 60:.1f} min; results in "
          f"{where / 'search.json'}" + (f", plots {', '.join(summary['plots'])} beside it" if summary["plots"] else ""))
    uri = summary["mlflow"]
    if uri:
        print(f"tune: compare the trials with: mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:///")
              else f"tune: compare the trials in MLflow at {uri}")
    return 0


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)  # a learning rate of 1e-05 is not 0.0000


if __name__ == "__main__":
    # As the imported module, not as __main__: Ray pickles the search's callback and config with the search, and a
    # class of __main__ goes by value, which a resume had to rebuild (pydantic cannot, for a class with a validator).
    from temu_dist.tune import main as imported_main

    sys.exit(imported_main())
