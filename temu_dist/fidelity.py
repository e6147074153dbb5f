"""Fidelity score f(x, x') for local distortion guidance: a locally distorted image x' is trained towards f(x, x') * y.

    python -m temu_dist.fidelity A.png B.png [--metric cw_ssim|ssim]

prints {"a": ..., "b": ..., "metric": ..., "score": ...} as one JSON line.

Both metrics take float RGB batches in [0, 1] of shape (B, 3, H, W) on any device and return shape (B,), batched with
no loop over images. They reproduce IQA-PyTorch's (pyiqa) `cw_ssim` and `ssim` defaults: luma (Y of YIQ) on the
0-255 scale, rounded to whole grey levels as MATLAB sees a uint8 image.

cw_ssim is complex-wavelet SSIM (Wang & Simoncelli 2005) on the coarsest band of a complex steerable pyramid
(Portilla & Simoncelli construction, as pyiqa and matlabPyrTools build it). Only that band enters the score, so
instead of building the pyramid level by level it takes the small block of the image's spectrum that survives the
level-by-level cropping and multiplies it by the product of every mask on the way down, one filter per orientation,
built once per (size, device, dtype) and cached. float64 input is computed in float64, anything else in float32.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from temu_dist.data.augment import decode_rgb

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # Y row of RGB -> YIQ
CW_WINDOW = 7  # box window over which band correlations are pooled
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def _check_pair(x: Tensor, y: Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[1] != 3 or not t.is_floating_point():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a float RGB batch of shape (B, 3, H, W) in [0, 1], got {got}")
    if x.shape != y.shape:
        raise ValueError(f"expected x and y of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _luma255(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, H, W) luma in whole grey levels 0..255, in the working dtype."""
    x = x.to(_work_dtype(x))
    weights = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device)
    return (torch.einsum("bchw,c->bhw", x, weights) * 255).round()


def _band_size(n: int, level: int) -> int:
    # Each pyramid level below the first keeps the central ceil(n / 2) frequencies of the one above.
    for _ in range(level - 1):
        n = (n + 1) // 2
    return n


def _fft_freqs(size: int) -> Tensor:
    """Integer frequencies of a length-`size` FFT in FFT order (0, 1, ..., then negatives), as torch.fft.fftfreq*n."""
    j = torch.arange(size)
    return torch.where(j < size - size // 2, j, j - size)


def _highpass(t: Tensor) -> Tensor:
    """The pyramid's raised-cosine radial transition, 0 below log2-frequency t = -1, 1 above t = 0."""
    return torch.cos(math.pi / 2 * t.clamp(-1.0, 0.0))


def _lowpass(t: Tensor) -> Tensor:
    """The complement of _highpass: lowpass^2 + highpass^2 = 1."""
    return torch.sin(math.pi / 2 * t.clamp(-1.0, 0.0)).abs()


def _band_filters(h: int, w: int, level: int, ori: int) -> Tensor:
    """(ori, bh, bw) frequency response of the coarsest band, in FFT order, in float64.

    Frequencies are those of the full (h, w) image, as the pyramid keeps them when it crops; the response is the
    low-pass at the top, the low-pass of every level above, the high-pass of this level and the orientation mask.
    The pyramid's (-i)^(ori-1) phase factor is left out: it cancels in b1 * conj(b2) and |b|^2.
    """
    fr, fc = _fft_freqs(_band_size(h, level)), _fft_freqs(_band_size(w, level))
    u = (2.0 * fr / h).double()[:, None]
    v = (2.0 * fc / w).double()[None, :]
    rad = torch.hypot(u, v)
    rad[0, 0] = 2.0 / w  # the pyramid gives DC its left neighbour's radius, to keep log2 finite
    log_rad = torch.log2(rad)
    # Each level halves the frequencies, i.e. shifts the transition by one octave.
    radial = _lowpass(log_rad) * _highpass(log_rad + level)
    for k in range(1, level):
        radial = radial * _lowpass(log_rad + k)
    order = ori - 1
    const = 2 ** (2 * order) * math.factorial(order) ** 2 / (ori * math.factorial(2 * order))
    angle = torch.atan2(u.expand_as(rad), v.expand_as(rad))
    shifts = torch.arange(ori, dtype=torch.float64)[:, None, None] * math.pi / ori
    angular = 2 * math.sqrt(const) * torch.cos(angle - shifts).clamp_min(0.0) ** order
    return radial * angular


@functools.lru_cache(maxsize=16)
def _band_plan(h: int, w: int, level: int, ori: int, device: torch.device, dtype: torch.dtype
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row indices, column indices, negative-column flags (into an rfft over width) and band filters."""
    fr, fc = _fft_freqs(_band_size(h, level)), _fft_freqs(_band_size(w, level))
    filters = _band_filters(h, w, level, ori).to(device=device, dtype=dtype)
    return (fr.remainder(h).to(device), fc.abs().to(device), (fc < 0).to(device)[None, :], filters)


def _coarse_bands(luma: Tensor, level: int, ori: int) -> Tensor:
    """(N, H, W) real -> (N, ori, bh, bw) complex coefficients of the pyramid's coarsest oriented band."""
    rows, cols, negative, filters = _band_plan(*luma.shape[-2:], level, ori, luma.device, luma.dtype)
    # Only the low corner of the spectrum is needed: rfft along width, keep those columns (negative ones are the
    # conjugates for a real image), then transform along height only those columns.
    spectrum = torch.fft.rfft(luma, dim=-1).index_select(-1, cols)
    spectrum = torch.where(negative, spectrum.conj(), spectrum)
    spectrum = torch.fft.fft(spectrum, dim=-2).index_select(-2, rows)
    return torch.fft.ifft2(spectrum[:, None] * filters)


def _gaussian(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Normalised 1-D Gaussian of `size` taps centred on the middle, as MATLAB's fspecial builds it."""
    t = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-t * t / (2 * sigma * sigma))
    return g / g.sum()


def _cw_index_map(b1: Tensor, b2: Tensor, K: float) -> Tensor:
    """(B, ori, h, w) complex bands -> (B, ori, h - 6, w - 6) CW-SSIM index over 7x7 windows."""
    corr = b1 * b2.conj()
    energy = b1.abs() ** 2 + b2.abs() ** 2
    pooled = F.avg_pool2d(torch.stack([corr.real, corr.imag, energy], 2).flatten(1, 2), CW_WINDOW, stride=1)
    pooled = pooled.unflatten(1, (b1.shape[1], 3))
    # tiny keeps 0/0 (no energy in either window, e.g. black on black) at 1 instead of NaN.
    tiny = torch.finfo(pooled.dtype).tiny
    return (2 * torch.hypot(pooled[:, :, 0], pooled[:, :, 1]) + K + tiny) / (pooled[:, :, 2] + K + tiny)


def cw_ssim_min_side(level: int = 4) -> int:
    """The smallest image side cw_ssim takes at `level`: its coarsest band must still be 4 px."""
    return 2 ** (level + 2)


def cw_ssim(x: Tensor, y: Tensor, *, level: int = 4, ori: int = 8, guardb: int = 0, K: float = 0.0) -> Tensor:
    """Complex-wavelet SSIM of each pair, shape (B,); 1 for identical images. Defaults are pyiqa's.

    level: pyramid levels (the coarsest is compared); ori: orientations; guardb: pixels discarded at each image
    border (scaled to the band); K: stabilising constant of the index.
    """
    _check_pair(x, y)
    h, w = x.shape[-2:]
    if min(h, w) < cw_ssim_min_side(level):
        raise ValueError(f"cw_ssim with level={level} expects images at least {cw_ssim_min_side(level)} px a side, "
                         f"got {h}x{w}")
    gb = guardb // 2 ** (level - 1)
    bands = _coarse_bands(torch.cat([_luma255(x), _luma255(y)]), level, ori)
    bh, bw = bands.shape[-2] - 2 * gb, bands.shape[-1] - 2 * gb
    if min(bh, bw) < CW_WINDOW:
        raise ValueError(f"cw_ssim expects guardb to leave at least {CW_WINDOW} band pixels a side, got {bh}x{bw}")
    index = _cw_index_map(*bands[..., gb:gb + bh, gb:gb + bw].chunk(2), K)
    # The weighting Gaussian's sigma is a quarter of the band height in both directions, as in the MATLAB original.
    gy = _gaussian(bh - CW_WINDOW + 1, bh / 4, index.device, index.dtype)
    gx = _gaussian(bw - CW_WINDOW + 1, bh / 4, index.device, index.dtype)
    return torch.einsum("bohw,h,w->bo", index, gy, gx).mean(1)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """SSIM of each pair on luma, shape (B,): 11x11 Gaussian window (sigma 1.5), valid region, as pyiqa's `ssim`."""
    _check_pair(x, y)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim expects images at least {SSIM_WINDOW} px a side, got {x.shape[-2]}x{x.shape[-1]}")
    a, b = _luma255(x)[:, None], _luma255(y)[:, None]
    maps = torch.cat([a, b, a * a, b * b, a * b], 1)
    g = _gaussian(SSIM_WINDOW, SSIM_SIGMA, maps.device, maps.dtype)
    # The 2-D Gaussian is separable: two 1-D passes instead of one 11x11 convolution.
    maps = F.conv2d(maps, g.view(1, 1, 1, -1).expand(5, 1, 1, -1), groups=5)
    mu_a, mu_b, aa, bb, ab = F.conv2d(maps, g.view(1, 1, -1, 1).expand(5, 1, -1, 1), groups=5).unbind(1)
    var_a, var_b, cov = aa - mu_a ** 2, bb - mu_b ** 2, ab - mu_a * mu_b
    # pyiqa clamps the structure term at 0 so that SSIM stays non-negative.
    structure = ((2 * cov + SSIM_C2) / (var_a + var_b + SSIM_C2)).clamp_min(0.0)
    luminance = (2 * mu_a * mu_b + SSIM_C1) / (mu_a ** 2 + mu_b ** 2 + SSIM_C1)
    return (luminance * structure).mean((1, 2))


METRICS = {"cw_ssim": cw_ssim, "ssim": ssim}


def _load_image(path: str) -> Tensor:
    """(1, 3, H, W) float RGB in [0, 1], decoded as training decodes (PIL's convert would clip 16-bit greys)."""
    return decode_rgb(Path(path).read_bytes())[None].float() / 255


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m temu_dist.fidelity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="reference image")
    parser.add_argument("b", help="distorted image, same size")
    parser.add_argument("--metric", choices=sorted(METRICS), default="cw_ssim")
    args = parser.parse_args(argv)
    images = []
    for path in (args.a, args.b):
        try:
            images.append(_load_image(path))
        except (OSError, ValueError) as e:
            print(f"fidelity: cannot read image {path}: {e}", file=sys.stderr)
            return 1
    if images[0].shape != images[1].shape:
        (ha, wa), (hb, wb) = images[0].shape[-2:], images[1].shape[-2:]
        print(f"fidelity: size mismatch: {args.a} is {wa}x{ha} but {args.b} is {wb}x{hb}", file=sys.stderr)
        return 1
    try:
        score = METRICS[args.metric](*images)
    except ValueError as e:
        print(f"fidelity: {args.a}, {args.b}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"a": args.a, "b": args.b, "metric": args.metric, "score": round(float(score[0]), 6)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
