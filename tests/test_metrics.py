import math

import numpy as np
import pytest
import torch
from scipy import stats

from temu_dist.metrics import correlations, fitted_plcc, plcc_loss


def test_correlations_follow_the_seed_equations():
    rng = np.random.default_rng(0)
    mos = rng.uniform(0, 1, 50)
    pred = mos + rng.normal(0, 0.2, 50)
    out = correlations(pred, mos)
    # Eq. 12 and Eq. 13 (no ties) by hand.
    plcc = ((pred - pred.mean()) * (mos - mos.mean())).sum() / np.sqrt(
        ((pred - pred.mean()) ** 2).sum() * ((mos - mos.mean()) ** 2).sum())
    d = np.argsort(np.argsort(pred)) - np.argsort(np.argsort(mos))
    srcc = 1 - 6 * (d ** 2).sum() / (50 * (50 ** 2 - 1))
    assert out["plcc"] == pytest.approx(plcc) and out["srcc"] == pytest.approx(srcc)
    assert 0 < out["krcc"] < out["srcc"] and out["count"] == 50


@pytest.mark.parametrize("curve", ["logistic_4params", "logistic_5params"])
def test_plcc_after_a_fitted_logistic_is_iqa_pytorchs(curve):
    """Scores that track the MOS through a sigmoid, as an IQA model's often do on a synthetic set."""
    from pyiqa.metrics.correlation_coefficient import calculate_plcc

    rng = np.random.default_rng(1)
    pred = rng.uniform(-3, 3, 200)
    mos = 1 / (1 + np.exp(-2 * pred)) + rng.normal(0, 0.05, 200)
    fitted = fitted_plcc(pred, mos, curve)
    assert fitted == pytest.approx(calculate_plcc(pred, mos, fit_scale=curve), abs=1e-6)
    assert fitted > correlations(pred, mos)["plcc"] + 0.02  # the sigmoid's bend, straightened
    assert math.isnan(fitted_plcc([0.5, 0.5, 0.5], [0.1, 0.2, 0.3], curve))


def test_undefined_correlations_are_nan_not_errors():
    assert math.isnan(correlations([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])["srcc"])
    assert correlations([0.5], [0.1])["count"] == 1


def test_plcc_loss_is_zero_for_perfect_and_one_for_reversed_order():
    y = torch.tensor([0.1, 0.4, 0.5, 0.9])
    assert plcc_loss(2 * y + 1, y).item() == pytest.approx(0.0, abs=1e-6)
    assert plcc_loss(-y, y).item() == pytest.approx(1.0, abs=1e-6)
    pred = torch.tensor([0.3, 0.2, 0.8, 0.7], requires_grad=True)
    plcc_loss(pred, y).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert plcc_loss(torch.tensor([0.3]), torch.tensor([0.1])).item() == 0.0


def test_weighted_plcc_loss_is_scipys_pearson_with_samples_repeated_by_their_weight():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(7, generator=g, dtype=torch.float64), torch.rand(7, generator=g, dtype=torch.float64)
    weight = torch.tensor([1, 2, 0, 3, 1, 0, 2], dtype=torch.float64)
    repeated = torch.repeat_interleave(torch.arange(7), weight.long())
    want = (1 - stats.pearsonr(pred[repeated].numpy(), target[repeated].numpy()).statistic) / 2
    assert plcc_loss(pred, target, weight).item() == pytest.approx(want, abs=1e-12)
    assert plcc_loss(pred, target, torch.ones_like(pred)).item() == pytest.approx(plcc_loss(pred, target).item(),
                                                                                   abs=1e-12)
