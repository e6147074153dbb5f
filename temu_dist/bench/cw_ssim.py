"""cw_ssim: pairs/s of our batched CW-SSIM and SSIM versus IQA-PyTorch's on the same 448x448 pairs (real photos with
a local RandAugment region, as LDG makes them), on the CPU and, where there is one, the GPU; and the largest
difference in value. Ours runs in float32, as training calls it; IQA-PyTorch converts its inputs to float64, so ours
is timed in float64 too, and `speedup_float64` compares like with like."""
from __future__ import annotations

import torch
from torchvision.transforms.functional import pil_to_tensor

from temu_dist.bench.common import device_name, now, sync, timed
from temu_dist.config import LDGConfig
from temu_dist.data.ldg import LocalDistortion
from temu_dist.demo_data import PHOTOS, photo
from temu_dist.fidelity import cw_ssim, ssim


def pairs_of(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n (original, locally distorted) pairs in [0, 1], 448x448."""
    torch.manual_seed(0)
    sources = [pil_to_tensor(photo(name, (448, 448))) for name in PHOTOS]
    ldg = LocalDistortion(LDGConfig())
    x = torch.stack([sources[i % len(sources)] for i in range(n)])
    y = torch.stack([ldg(img)[0] for img in x])
    return x.float() / 255, y.float() / 255


def _on(device: torch.device, x: torch.Tensor, y: torch.Tensor, repeat: int) -> dict:
    x, y = x.to(device), y.to(device)
    ours_fn = {"cw_ssim": cw_ssim, "ssim": ssim}
    result = {"device": device_name(device)}
    ours = {k: f(x, y) for k, f in ours_fn.items()}  # also the warm-up
    seconds = {k: timed(lambda f=f: (f(x, y), sync(device)), repeat) for k, f in ours_fn.items()}
    result["ours_pairs_per_s"] = {k: round(len(x) / s, 1) for k, s in seconds.items()}
    result["fidelity_range"] = [round(float(ours["cw_ssim"].min()), 4), round(float(ours["cw_ssim"].max()), 4)]
    try:
        from pyiqa.archs.ssim_arch import CW_SSIM, SSIM
    except ImportError:
        result["pyiqa"] = "not installed (make setup)"
        return result
    import pyiqa

    x64, y64 = x.double(), y.double()
    ours64 = {k: f(x64, y64) for k, f in ours_fn.items()}
    seconds64 = {k: timed(lambda f=f: (f(x64, y64), sync(device)), repeat) for k, f in ours_fn.items()}
    theirs_fn = {"cw_ssim": CW_SSIM().eval().to(device), "ssim": SSIM().eval().to(device)}
    with torch.no_grad():
        theirs = {k: f(x, y).flatten() for k, f in theirs_fn.items()}
        their_s = {k: timed(lambda f=f: (f(x, y), sync(device)), repeat) for k, f in theirs_fn.items()}
    result["pyiqa"] = f"{pyiqa.__version__}, float64"
    result["ours_float64_pairs_per_s"] = {k: round(len(x) / s, 1) for k, s in seconds64.items()}
    result["pyiqa_pairs_per_s"] = {k: round(len(x) / s, 1) for k, s in their_s.items()}
    result["speedup"] = {k: round(their_s[k] / seconds[k], 1) for k in ours}
    result["speedup_float64"] = {k: round(their_s[k] / seconds64[k], 1) for k in ours}
    result["max_abs_diff"] = {k: float((ours[k] - theirs[k]).abs().max()) for k in ours}
    result["max_abs_diff_float64"] = {k: float((ours64[k] - theirs[k].double()).abs().max()) for k in ours}
    return result


def run(pairs: int, repeat: int) -> dict:
    x, y = pairs_of(pairs)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return {"suite": "cw_ssim", "pairs": pairs, "size": [448, 448], "date": now(),
            "rows": [_on(d, x, y, repeat) for d in devices]}
