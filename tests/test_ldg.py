import numpy as np
import pytest
import torch

from temu_dist.config import load_config
from temu_dist.data.augment import to_input
from temu_dist.data.ldg import LocalDistortion, fidelity, ldg_targets, sample_region
from temu_dist.demo_data import photo


def _photo(hw=(448, 448)) -> torch.Tensor:
    return to_input(photo("astronaut"), hw)


def test_region_sizes_and_positions_follow_eq_8():
    torch.manual_seed(0)
    draws = [sample_region(448, 448, 40, 150) for _ in range(2000)]
    hs = np.array([d[2] for d in draws])
    ws = np.array([d[3] for d in draws])
    assert hs.min() == 40 and hs.max() == 150 and ws.min() == 40 and ws.max() == 150
    assert all(0 <= t and t + h <= 448 and 0 <= l and l + w <= 448 for t, l, h, w in draws)
    # Uniform: every size in [40, 150] turns up, roughly equally often.
    counts = np.bincount(hs, minlength=151)[40:151]
    assert counts.min() > 0 and counts.max() < 4 * counts.mean()
    # Positions cover the whole image, corners included.
    assert min(d[0] for d in draws) == 0 and max(d[0] + d[2] for d in draws) == 448


def test_region_is_capped_by_a_small_image():
    torch.manual_seed(0)
    for _ in range(200):
        t, l, h, w = sample_region(30, 100, 40, 150)
        assert h == 30 and t == 0 and 40 <= w <= 100 and l + w <= 100


def test_local_distortion_changes_only_its_region():
    cfg = load_config().ldg
    x = _photo()
    torch.manual_seed(3)
    changed_any = False
    for _ in range(10):
        out, (t, l, h, w) = LocalDistortion(cfg)(x)
        outside = torch.ones(448, 448, dtype=torch.bool)
        outside[t:t + h, l:l + w] = False
        assert torch.equal(out[:, outside], x[:, outside])
        changed_any |= not torch.equal(out[:, t:t + h, l:l + w], x[:, t:t + h, l:l + w])
        assert out.dtype == torch.uint8 and out.shape == x.shape
    assert changed_any


@pytest.mark.parametrize("c", [0.0, 0.3, 0.5, 0.7])
def test_constant_fidelity_scales_the_target(c):
    cfg = load_config(None, ["ldg.fidelity=constant", f"ldg.constant={c}"]).ldg
    x = torch.stack([_photo((64, 64))] * 3)
    mos = torch.tensor([0.2, 0.5, 1.0])
    torch.testing.assert_close(ldg_targets(x, x, mos, cfg), mos * c)


@pytest.mark.parametrize("metric", ["cw_ssim", "ssim"])
def test_measured_fidelity_is_one_for_no_change_and_lower_for_harsher_change(metric):
    cfg = load_config(None, [f"ldg.fidelity={metric}"]).ldg
    x = _photo((224, 224))
    mild, harsh = x.clone(), x.clone()
    mild[:, 50:100, 50:100] = (mild[:, 50:100, 50:100].float() * 0.9).to(torch.uint8)
    harsh[:, 20:180, 20:180] = 255 - harsh[:, 20:180, 20:180]
    f = fidelity(torch.stack([x, x, x]), torch.stack([x, mild, harsh]), cfg)
    assert f[0] == pytest.approx(1.0, abs=1e-4)
    assert 1.0 > f[1] > f[2] >= 0.0
    y = torch.tensor([0.8, 0.8, 0.8])
    torch.testing.assert_close(ldg_targets(torch.stack([x, x, x]), torch.stack([x, mild, harsh]), y, cfg), f * y)
