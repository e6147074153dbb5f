"""Benchmarks that print figures as JSON (tests never time).

    python -m temu_dist.bench model [--backbones ViT-B-16 ViT-L-14] [--repeat 3] [--out FILE]
    python -m temu_dist.bench data [--workers 0 1 2] [--epochs 2]
    python -m temu_dist.bench cw_ssim [--pairs 32] [--repeat 3]

model: trainable parameter counts of TeMu-IQA-S/-I with each prompt mode, and the wall time of one forward of batch 1
at the configured input size, on random weights (time does not depend on the weights).
data: training-stream images/s (decode, resize to 448, flip, local distortion) from shards versus the same images read
as loose files with the same decode and augmentation, on the offline demo data.
cw_ssim: seconds for N pairs at 448x448 (real photos, local RandAugment regions), ours versus IQA-PyTorch's, and the
largest difference in value.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import torch

from temu_dist.config import load_config
from temu_dist.model.temu import build_model, resolve_device


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _timed(fn, repeat: int) -> float:
    """Best of `repeat` wall times of fn()."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def model_suite(backbones: list[str], image_size: int, repeat: int) -> dict:
    from temu_dist.model.backbone import create_clip

    device = resolve_device("auto")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward_time(fn) -> float:
        with torch.no_grad():
            fn()  # warm-up
            return round(_timed(lambda: (fn(), sync()), repeat), 4)

    rows = []
    x = torch.randn(1, 3, image_size, image_size, device=device)
    for name in backbones:
        config = load_config(None, [f"model.backbone={name}", "model.pretrained=null", f"model.image_size={image_size}"])
        # The peer baseline: open_clip's own image forward of the same tower, last layer only.
        clip = create_clip(config.model).to(device)
        baseline = forward_time(lambda: clip.encode_image(x))
        del clip
        for variant in "SI":
            for prompt in ("none", "coop", "cocoop"):
                cfg = load_config(None, [f"model.backbone={name}", "model.pretrained=null",
                                         f"model.image_size={image_size}", f"model.variant={variant}",
                                         f"model.prompt={prompt}"])
                model = build_model(cfg, device).eval()
                row = {"backbone": name, "variant": variant, "prompt": prompt, "trainable": model.num_trainable(),
                       "forward_s_batch1": forward_time(lambda: model(x)), "open_clip_encode_image_s": baseline}
                rows.append(row)
                print(json.dumps(row), flush=True)
                del model
    return {"suite": "model", "device": _device_name(device), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "image_size": image_size, "rows": rows}


def data_suite(workers_list: list[int], epochs: int, image_size: int) -> dict:
    import tempfile
    from pathlib import Path

    from torch.utils.data import DataLoader, Dataset

    from temu_dist.data.ldg import LocalDistortion
    from temu_dist.data.sources import read_records
    from temu_dist.data.splits import SplitSpec
    from temu_dist.data.stream import SharedEpoch, collate, decode_sample, train_loader
    from temu_dist.demo_data import write_demo_data
    from temu_dist.pack import PackOptions, pack

    config = load_config(None, [f"model.image_size={image_size}"])
    hw = config.model.image_hw()
    ldg = LocalDistortion(config.ldg)

    class LooseFiles(Dataset):
        """The same decode and augmentation as the shard stream, reading each image file from disk."""

        def __init__(self, records):
            self.records = records

        def __len__(self) -> int:
            return len(self.records)

        def __getitem__(self, i: int) -> dict:
            r = self.records[i]
            sample = {"png": r.path.read_bytes(), "json": json.dumps({"mos": r.mos, "name": r.name})}
            return decode_sample(sample, hw, True, ldg, config.ldg.p)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_demo_data(Path(tmp) / "demo")
        pack(PackOptions("kadid10k", str(root), f"{tmp}/shards", split=SplitSpec("ratio", (1.0, 0.0, 0.0)),
                         shard_size=32))
        records = list(read_records("kadid10k", root))
        batch = 16
        for workers in workers_list:
            cfg = config.model_copy(update={"data": config.data.model_copy(update={"workers": workers})})
            loader, steps = train_loader(cfg, f"{tmp}/shards", "train", batch, 1, 0, 1, SharedEpoch(0), hw)
            loose = DataLoader(LooseFiles(records), batch_size=batch, shuffle=True, drop_last=True,
                               num_workers=workers, collate_fn=collate, persistent_workers=workers > 0)
            for source, make in (("shards", lambda: loader), ("loose files", lambda: loose)):
                next(iter(make()))  # start the workers before timing
                start, images = time.perf_counter(), 0
                for _ in range(epochs):
                    for _, b in zip(range(steps), make()):
                        images += len(b["name"])
                rate = images / (time.perf_counter() - start)
                row = {"source": source, "workers": workers, "images": images, "images_per_s": round(rate, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"suite": "data", "image_size": image_size, "ldg": True, "device": _device_name(torch.device("cpu")),
            "images": "offline demo data: 512x384 PNG (KADID-10k layout)", "rows": rows,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def cw_ssim_suite(pairs: int, repeat: int) -> dict:
    from torchvision.transforms.functional import pil_to_tensor

    from temu_dist.config import LDGConfig
    from temu_dist.data.ldg import LocalDistortion
    from temu_dist.demo_data import PHOTOS, photo
    from temu_dist.fidelity import cw_ssim, ssim

    torch.manual_seed(0)
    sources = [pil_to_tensor(photo(name, (448, 448))) for name in PHOTOS]
    ldg = LocalDistortion(LDGConfig())
    x = torch.stack([sources[i % len(sources)] for i in range(pairs)])
    y = torch.stack([ldg(img)[0] for img in x])
    x, y = x.float() / 255, y.float() / 255
    result = {"suite": "cw_ssim", "pairs": pairs, "size": [448, 448], "threads": torch.get_num_threads(),
              "device": _device_name(torch.device("cpu")),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    ours = {"cw_ssim": cw_ssim(x, y), "ssim": ssim(x, y)}
    result["ours_s"] = {"cw_ssim": round(_timed(lambda: cw_ssim(x, y), repeat), 4),
                        "ssim": round(_timed(lambda: ssim(x, y), repeat), 4)}
    result["fidelity_range"] = [round(float(ours["cw_ssim"].min()), 4), round(float(ours["cw_ssim"].max()), 4)]
    try:
        from pyiqa.archs.ssim_arch import CW_SSIM, SSIM
    except ImportError:
        result["pyiqa"] = "not installed (pip install -e '.[dev]')"
        return result
    theirs_fn = {"cw_ssim": CW_SSIM().eval(), "ssim": SSIM().eval()}
    with torch.no_grad():
        theirs = {k: f(x, y).flatten() for k, f in theirs_fn.items()}
        result["pyiqa_s"] = {k: round(_timed(lambda f=f: f(x, y), repeat), 4) for k, f in theirs_fn.items()}
    result["speedup"] = {k: round(result["pyiqa_s"][k] / result["ours_s"][k], 1) for k in ours}
    result["max_abs_diff"] = {k: float((ours[k] - theirs[k]).abs().max()) for k in ours}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m temu_dist.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["model", "data", "cw_ssim"])
    parser.add_argument("--backbones", nargs="+", default=["ViT-B-16", "ViT-L-14"])
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--out", help="also write the JSON result here")
    args = parser.parse_args()
    if args.suite == "model":
        result = model_suite(args.backbones, args.image_size, args.repeat)
    elif args.suite == "data":
        result = data_suite(args.workers, args.epochs, args.image_size)
    else:
        result = cw_ssim_suite(args.pairs, args.repeat)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
