"""Scores -> metrics: SRCC, PLCC (seed Eqs. 13, 12) and KRCC from scipy, and the PLCC loss."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy import stats


def correlations(pred: Sequence[float] | np.ndarray, mos: Sequence[float] | np.ndarray) -> dict[str, float]:
    """{'srcc', 'plcc', 'krcc', 'count'}; a correlation that is undefined (constant input, < 2 samples) is NaN."""
    pred, mos = np.asarray(pred, dtype=np.float64), np.asarray(mos, dtype=np.float64)
    out = {"count": int(len(pred))}
    if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(mos) == 0:
        return {"srcc": math.nan, "plcc": math.nan, "krcc": math.nan, **out}
    return {"srcc": float(stats.spearmanr(pred, mos).statistic), "plcc": float(stats.pearsonr(pred, mos).statistic),
            "krcc": float(stats.kendalltau(pred, mos).statistic), **out}


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
