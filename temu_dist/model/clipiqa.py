"""Zero-shot CLIP-IQA on [cls] tokens, the baseline of the seed's Tables 11-13 (Fig. 9 options a, b, c).

(a) the last layer's [cls] (CLIP-IQA itself); (b) the [cls] of one chosen layer; (c) the [cls] vectors of all layers,
each projected and normalised, averaged into one image vector. `table`: every row of those tables in one pass, a score
per layer (b, the last one a) and the layers averaged (c).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from temu_dist.config import Config, ConfigError
from temu_dist.model.backbone import Backbone, compute_dtype, create_clip, vit_depth
from temu_dist.model.prompts import PromptLearner
from temu_dist.model.temu import resolve_device

Option = Literal["a", "b", "c", "table"]


def option_name(option: Option, layer: int | None, num_layers: int) -> str:
    """A row's name in the seed's Tables 11-13."""
    if option == "c":
        return "all layers (c)"
    if option == "a" or layer == num_layers:
        return f"layer {num_layers} (a: CLIP-IQA)"
    return f"layer {layer} (b)"


class ClipIQA(nn.Module):
    def __init__(self, backbone: Backbone, prompts: PromptLearner, logit_scale: float, columns: list[str]):
        super().__init__()
        self.backbone = backbone
        self.prompts = prompts
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)), persistent=False)
        # The name of each score it gives an image: one, its option's; option table's, a score per layer, then the
        # layers averaged.
        self.columns = columns

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images -> scores [B] in [0, 1] ([B, len(columns)] for several columns): softmax over each (good, bad)
        pair, averaged over pairs."""
        cls, _ = self.backbone(images)
        layers = F.normalize(self.backbone.project(cls).float(), dim=-1)  # [B, L, D]: the layers the option takes
        g = F.normalize(layers.mean(dim=1, keepdim=True), dim=-1)
        if len(self.columns) > 1:
            g = torch.cat([layers, g], dim=1)
        text = self.prompts()  # [1, P, 2, D]
        logits = self.logit_scale * torch.einsum("bld,pkd->blpk", g, text[0])
        scores = logits.softmax(dim=-1)[..., 0].mean(dim=-1)
        return scores if len(self.columns) > 1 else scores[:, 0]


def layer_spec(option: Option, layer: int | None, num_layers: int) -> str:
    if option == "a":
        return f"only:{num_layers}"
    if option == "b":
        if layer is None:
            raise ConfigError(f"--clipiqa b scores one layer: name it with --layer N (1-{num_layers})")
        if not 1 <= layer <= num_layers:  # 0 and -k would read as Python indices: another layer, without a word
            raise ConfigError(f"--layer {layer}: this backbone's layers are 1-{num_layers}")
        return f"only:{layer}"
    return "all"


def check_clipiqa(config: Config, option: Option = "a", layer: int | None = None) -> None:
    """What build_clipiqa refuses, from the config alone (open_clip's for the depth): before any weights are fetched."""
    if config.model.tower_fp8:
        # Zero-shot scoring runs uncompiled, where the fp8 tower is slower than bf16 on a GPU.
        raise ConfigError("model.tower_fp8: CLIP-IQA scores with the bf16 tower; set model.tower_fp8=false")
    if (depth := vit_depth(config.model.backbone)) is not None:
        layer_spec(option, layer, depth)


def build_clipiqa(config: Config, option: Option = "a", layer: int | None = None,
                  device: torch.device | None = None) -> ClipIQA:
    """Fixed prompts (model.prompt_pairs) whatever model.prompt says: zero-shot means nothing is learned."""
    check_clipiqa(config, option, layer)
    device = device or resolve_device(config.device)
    clip = create_clip(config.model, config.seed)
    num_layers = len(clip.visual.transformer.resblocks)
    cfg = config.model.model_copy(update={"layers": layer_spec(option, layer, num_layers), "prompt": "none"})
    backbone = Backbone(clip, cfg, compute_dtype(cfg.precision, device))
    columns = [option_name("b", k, num_layers) for k in range(1, num_layers + 1)] + \
        [option_name("c", None, num_layers)] if option == "table" else [option_name(option, layer, num_layers)]
    return ClipIQA(backbone, PromptLearner(cfg, clip), clip.logit_scale.exp().item(), columns).to(device)
