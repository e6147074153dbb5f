"""model: trainable parameter counts of TeMu-IQA-S/-I with each prompt mode, and the wall time of one forward of
batch 1 at the input size, next to open_clip's own forward of the same tower (random weights: time does not depend
on them)."""
from __future__ import annotations

import json
from functools import partial

import torch

from temu_dist.bench.common import device_name, now, sync, timed
from temu_dist.config import load_config
from temu_dist.model.backbone import create_clip
from temu_dist.model.temu import build_model, resolve_device


def run(backbones: list[str], image_size: int, repeat: int) -> dict:
    device = resolve_device("auto")

    def forward_time(fn) -> float:
        with torch.no_grad():
            fn()  # warm-up
            return round(timed(lambda: (fn(), sync(device)), repeat), 4)

    rows = []
    x = torch.randn(1, 3, image_size, image_size, device=device)
    for name in backbones:
        base = [f"model.backbone={name}", "model.pretrained=null", f"model.image_size={image_size}"]
        # The peer baseline: open_clip's own image forward of the same tower, last layer only.
        clip = create_clip(load_config(None, base).model).to(device)
        baseline = forward_time(partial(clip.encode_image, x))
        del clip
        for variant in "SI":
            for prompt in ("none", "coop", "cocoop"):
                cfg = load_config(None, [*base, f"model.variant={variant}", f"model.prompt={prompt}"])
                model = build_model(cfg, device).eval()
                row = {"backbone": name, "variant": variant, "prompt": prompt, "trainable": model.num_trainable(),
                       "forward_s_batch1": forward_time(partial(model, x)), "open_clip_encode_image_s": baseline}
                rows.append(row)
                print(json.dumps(row), flush=True)
                del model
    return {"suite": "model", "device": device_name(device), "torch": torch.__version__, "date": now(),
            "image_size": image_size, "rows": rows}
