"""Local distortion guidance (seed Eq. 8, Eq. 10, Sec. 11): distort one random region of a training image and train
on it with target y' = f(x, x') * y, so the model cannot ignore the overall structure of the image.

The region and its distortion are made in the loader workers on uint8 tensors (`LocalDistortion`); the fidelity f
runs batched on the device in the training step (`ldg_targets`).
"""
from __future__ import annotations

import torch
from torchvision.transforms import RandAugment

from temu_dist.config import ConfigError, LDGConfig
from temu_dist.fidelity import cw_ssim, cw_ssim_min_side, ssim


def sample_region(height: int, width: int, lo: int, hi: int) -> tuple[int, int, int, int]:
    """(top, left, h, w): h and w uniform integers in [lo, hi] (capped by the image), position uniform inside.

    Drawn from torch's global generator, which the training stream seeds for each sample.
    """
    h = int(torch.randint(min(lo, height), min(hi, height) + 1, ()))
    w = int(torch.randint(min(lo, width), min(hi, width) + 1, ()))
    top = int(torch.randint(0, height - h + 1, ()))
    left = int(torch.randint(0, width - w + 1, ()))
    return top, left, h, w


class LocalDistortion:
    """x uint8 [3, H, W] -> (x', region): RandAugment(N, M) applied to a random crop, pasted back."""

    def __init__(self, cfg: LDGConfig):
        self.cfg = cfg
        self.augment = RandAugment(num_ops=cfg.ops, magnitude=cfg.magnitude, num_magnitude_bins=31)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        top, left, h, w = sample_region(x.shape[1], x.shape[2], self.cfg.region_min, self.cfg.region_max)
        out = x.clone()
        out[:, top:top + h, left:left + w] = self.augment(x[:, top:top + h, left:left + w].contiguous())
        return out, (top, left, h, w)


def fidelity(x: torch.Tensor, x_ldg: torch.Tensor, cfg: LDGConfig) -> torch.Tensor:
    """f(x, x') for uint8 or [0, 1] batches [B, 3, H, W] -> [B], on their device."""
    if cfg.fidelity == "constant":
        return torch.full((x.shape[0],), cfg.constant, device=x.device)
    to_unit = (lambda t: t.float() / 255.0) if x.dtype == torch.uint8 else (lambda t: t.float())
    metric = cw_ssim if cfg.fidelity == "cw_ssim" else ssim
    return metric(to_unit(x), to_unit(x_ldg)).clamp(0.0, 1.0)


def check_fidelity_size(key: str, hw: tuple[int, int], cfg: LDGConfig) -> None:
    """Images scored with local distortions at input size hw (named by config key) are ones f can compare: CW-SSIM
    needs cw_ssim_min_side() px a side. Checked before any work, not when the first such batch arrives."""
    if cfg.fidelity == "cw_ssim" and min(hw) < cw_ssim_min_side():
        raise ConfigError(f"{key}: CW-SSIM (ldg.fidelity) compares images of at least {cw_ssim_min_side()} px a side, "
                          f"this one has {min(hw)}; use a larger size or ldg.fidelity=ssim")


def ldg_targets(x: torch.Tensor, x_ldg: torch.Tensor, mos: torch.Tensor, cfg: LDGConfig) -> torch.Tensor:
    """Eq. 10: y' = f(x, x') * y."""
    return fidelity(x, x_ldg, cfg).to(mos.dtype) * mos
