"""Which epoch is best: the run's, by its key metric, and each evaluation set's own. Plain Python, so that reading
results (report) needs neither torch nor the trainer."""
from __future__ import annotations

import math


def better(value: float, than: float | None) -> bool:
    """A tie goes to the later epoch, as in IQA-PyTorch (>=), whose best epochs the paper's tables report. A NaN
    metric (too few samples, constant scores) never wins over a real one, nor blocks a later one."""
    return than is None or (not math.isnan(value) and (math.isnan(than) or value >= than))


def own_best(history: list[dict], key_metric: str, run_best: dict | None = None) -> dict[str, dict]:
    """Every set at its own best epoch by the key metric's measure (srcc of test/srcc), its other metrics at that
    epoch, as IQA-PyTorch reports each validation set: {set: {srcc, plcc, ..., epoch}}. The key metric's own set is
    at the run's best epoch (`run_best`, the one the run chose, which a run made before ties went to the later epoch
    chose otherwise); a cross-dataset set may peak at another."""
    measure = key_metric.split("/")[1]
    best: dict[str, dict] = {}
    for record in history:
        for name, metrics in record["eval"].items():
            if better(metrics[measure], best[name][measure] if name in best else None):
                best[name] = {**metrics, "epoch": record["epoch"]}
    key_set = key_metric.split("/")[0]
    if run_best is not None and key_set in run_best["eval"]:
        best[key_set] = {**run_best["eval"][key_set], "epoch": run_best["epoch"]}
    return best
