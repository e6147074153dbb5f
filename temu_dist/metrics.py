"""Scores -> metrics: SRCC, PLCC (seed Eqs. 13, 12) and KRCC from scipy, PLCC after a fitted logistic, and the PLCC
loss."""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
from scipy import stats
from scipy.optimize import OptimizeWarning, curve_fit

from temu_dist.config import Curve


def correlations(pred: Sequence[float] | np.ndarray, mos: Sequence[float] | np.ndarray) -> dict[str, float]:
    """{'srcc', 'plcc', 'krcc', 'count'}; a correlation that is undefined (constant input, < 2 samples) is NaN."""
    pred, mos = np.asarray(pred, dtype=np.float64), np.asarray(mos, dtype=np.float64)
    out = {"count": int(len(pred))}
    if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(mos) == 0:
        return {"srcc": math.nan, "plcc": math.nan, "krcc": math.nan, **out}
    return {"srcc": float(stats.spearmanr(pred, mos).statistic), "plcc": float(stats.pearsonr(pred, mos).statistic),
            "krcc": float(stats.kendalltau(pred, mos).statistic), **out}


def _logistic_4params(x, b1, b2, b3, b4):
    return (b1 - b2) / (1 + np.exp(-(x - b3) / b4)) + b2


def _logistic_5params(x, b1, b2, b3, b4, b5):
    return b1 * (0.5 - 1.0 / (1 + np.exp(b2 * (x - b3)))) + b4 * x + b5


def fitted_plcc(pred: Sequence[float] | np.ndarray, mos: Sequence[float] | np.ndarray,
                curve: Curve = "logistic_4params") -> float:
    """PLCC after mapping the scores onto the MOS by a logistic fitted by least squares, as many papers report it on
    synthetic sets: VQEG's 4-parameter one, or the 5-parameter one of DBCNN's code. Its starting parameters are
    IQA-PyTorch's (calculate_plcc with fit_scale), so the two fit alike. NaN where it is undefined or does not fit."""
    pred, mos = np.asarray(pred, dtype=np.float64), np.asarray(mos, dtype=np.float64)
    if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(mos) == 0:
        return math.nan
    f, p0 = (_logistic_4params, [mos.max(), mos.min(), pred.mean(), pred.std() / 4.0]) \
        if curve == "logistic_4params" else (_logistic_5params, [10, 0, mos.mean(), 0.1, 0.1])
    with warnings.catch_warnings(), np.errstate(over="ignore"):  # exp's overflow far from the midpoint is 0 or 1
        warnings.simplefilter("ignore", OptimizeWarning)  # no covariance: the fit itself is what is used
        try:
            params, _ = curve_fit(f, pred, mos, p0=p0, maxfev=10000)
        except RuntimeError:  # no convergence
            return math.nan
        fitted = f(pred, *params)
    return math.nan if np.ptp(fitted) == 0 else float(stats.pearsonr(fitted, mos).statistic)


def plcc_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - PLCC) / 2 over the batch, in [0, 1], as IQA-PyTorch trains CLIP-IQA; 0 for a batch of one.

    With `weight`, the weighted Pearson correlation (weighted means and moments): a sample of weight 0 drops out and
    weights all 1 give the plain one. Written here because torch and scipy have no differentiable weighted one."""
    if pred.numel() < 2:
        return pred.sum() * 0.0
    w = torch.ones_like(pred) if weight is None else weight
    root = w.sqrt()
    vx = root * (pred - (w * pred).sum() / w.sum())
    vy = root * (target - (w * target).sum() / w.sum())
    r = (torch.nn.functional.normalize(vx, dim=0) * torch.nn.functional.normalize(vy, dim=0)).sum()
    return (1.0 - r) / 2.0
