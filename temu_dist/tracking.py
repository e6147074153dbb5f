"""MLflow: one run per training run, with its resolved config as params, per-epoch metrics, tags and artifacts.

The default store is a sqlite file inside the run folder. A tracking server that cannot be reached is a warning, not
a failure: training goes on and everything stays in the run folder. Only the main process tracks.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from temu_dist.config import Config, dump

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def tracking_uri(config: Config, run_dir: Path) -> str:
    return config.tracking.uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


class Tracker:
    """Logs to MLflow when `active`; every method is a no-op otherwise (other ranks, tracking off or unreachable)."""

    def __init__(self, config: Config, run_dir: Path, active: bool, resuming: bool = False):
        self.active = active and config.tracking.enabled
        self.run_id: str | None = None
        if not self.active:
            return
        uri = tracking_uri(config, run_dir)
        id_file = run_dir / "mlflow_run_id"
        try:
            import mlflow

            self.mlflow = mlflow
            mlflow.set_tracking_uri(uri)
            _check_reachable(uri)
            mlflow.set_experiment(config.tracking.experiment)
            # A resumed run continues the same MLflow run; a fresh one (train.resume=never) starts its own.
            resume_id = id_file.read_text().strip() if resuming and id_file.exists() else None
            parent = {"mlflow.parentRunId": config.tracking.parent_run_id} if config.tracking.parent_run_id else None
            run = mlflow.start_run(run_id=resume_id, run_name=None if resume_id else config.name, tags=parent)
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id)
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
            warnings.warn(f"MLflow tracking at {uri} is not usable ({type(e).__name__}: {str(e).splitlines()[0]}); "
                          f"training goes on and results stay in {run_dir}", stacklevel=2)
            self.active = False
            return
        params = {k: str(v) for k, v in flatten(dump(config)).items()}
        existing = mlflow.get_run(self.run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}
        items = list(new.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self._guard(mlflow.log_params, dict(items[i:i + 100]))
        m = config.model
        self._guard(mlflow.set_tags, {"dataset": config.data.train or "", "variant": m.variant, "prompt": m.prompt,
                                      "layers": m.layers, "backbone": m.backbone})

    def _guard(self, fn, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a server that goes away mid-run is a warning
            warnings.warn(f"MLflow call {fn.__name__} failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                          "tracking stops, training goes on", stacklevel=2)
            self.active = False

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.active:
            clean = {k.replace("/", "."): float(v) for k, v in values.items() if v == v}  # NaN is not loggable
            self._guard(self.mlflow.log_metrics, clean, step=step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.active and Path(path).exists():
            self._guard(self.mlflow.log_artifact, str(path), folder)

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self._guard(self.mlflow.end_run, status)


def _check_reachable(uri: str) -> None:
    """Fail fast on an http(s) server that does not answer, instead of MLflow's long retries."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
        if response.status != 200:
            raise ConnectionError(f"/health answered {response.status}")
