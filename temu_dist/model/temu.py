"""TeMu-IQA: text-guided patch scoring (TPS) over the tokens of many CLIP layers, fused by score (S) or feature (I)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from temu_dist.config import Config, ModelConfig
from temu_dist.model.backbone import Backbone, compute_dtype, create_clip
from temu_dist.model.prompts import PromptLearner


@dataclass
class QualityOutput:
    score: torch.Tensor  # [B] in [0, 1], higher is better
    layer_scores: torch.Tensor  # [B, S] per selected layer (S variant) or [B, 1] (I variant)
    patch_scores: torch.Tensor  # [B, gh, gw] the quality map, fused over layers as the score is
    patch_weights: torch.Tensor  # [B, gh, gw] how much each patch counts in the score


def tps(f: torch.Tensor, g: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
        tau_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text-guided patch scoring.

    f [B, S, N, D] patch features, g [B, S, D] [cls] features (both normalised), text [1|B, P, 2, D] (good, bad).
    Returns per-layer image scores q [B, S], patch scores s [B, S, N] and patch weights w [B, S, N].
    """
    logits = logit_scale * torch.einsum("bsnd,bpkd->bsnpk", f, text)
    s = logits.softmax(dim=-1)[..., 0].mean(dim=-1)
    w = (torch.einsum("bsnd,bsd->bsn", f, g) / tau_w).softmax(dim=-1)
    return (w * s).sum(dim=-1), s, w


class TeMuIQA(nn.Module):
    """The one trainable module: a frozen backbone and text tower, and a few trainable fusion/prompt parameters."""

    def __init__(self, cfg: ModelConfig, backbone: Backbone, prompts: PromptLearner, logit_scale: float):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.prompts = prompts
        n = backbone.num_selected
        self.layer_logits = nn.Parameter(torch.zeros(n))
        # Shape (1,), not a scalar: DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be viewed as.
        self.log_tau_w = nn.Parameter(torch.tensor([math.log(cfg.tau_w_init)]))
        # Identity at init (LayerNorm's affine starts at ones/zeros) so the option changes nothing until trained.
        self.layer_norms = nn.ModuleList([nn.LayerNorm(backbone.width) for _ in range(n)]) if cfg.layer_norm else None
        self.register_buffer("logit_scale", torch.tensor([float(logit_scale)]), persistent=False)

    def layer_weights(self) -> torch.Tensor:
        return self.layer_logits.softmax(dim=0)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised joint-space features: patches f [B, S, N, D] and [cls] g [B, S, D] of the selected layers."""
        cls, patches = self.backbone(images)
        if self.layer_norms is not None:
            cls, patches = cls.float(), patches.float()
            cls = torch.stack([ln(cls[:, i]) for i, ln in enumerate(self.layer_norms)], dim=1)
            patches = torch.stack([ln(patches[:, i]) for i, ln in enumerate(self.layer_norms)], dim=1)
        return F.normalize(self.backbone.project(patches), dim=-1), F.normalize(self.backbone.project(cls), dim=-1)

    def forward(self, images: torch.Tensor) -> QualityOutput:
        f, g = self.features(images)
        # Scores are averages of softmaxes: under bf16 autocast they would be quantised to about 0.004, ties for
        # SRCC. The fusion and scoring are cheap, so they run in fp32 whatever the caller's autocast says.
        with torch.autocast(images.device.type, enabled=False):
            return self._score(f.float(), g.float())

    def _score(self, f: torch.Tensor, g: torch.Tensor) -> QualityOutput:
        a = self.layer_weights().float()
        g_fused = F.normalize(torch.einsum("s,bsd->bd", a, g), dim=-1)
        text = self.prompts(g_fused).float()
        if self.cfg.variant == "I":
            f = F.normalize(torch.einsum("s,bsnd->bnd", a, f), dim=-1).unsqueeze(1)
            q_l, s, w = tps(f, g_fused.unsqueeze(1), text, self.logit_scale, self.log_tau_w.exp())
            score, s_map, w_map = q_l[:, 0], s[:, 0], w[:, 0]
        else:
            q_l, s, w = tps(f, g, text, self.logit_scale, self.log_tau_w.exp())
            score = q_l @ a
            s_map, w_map = torch.einsum("s,bsn->bn", a, s), torch.einsum("s,bsn->bn", a, w)
        gh, gw = self.backbone.grid
        return QualityOutput(score, q_l, s_map.view(-1, gh, gw), w_map.view(-1, gh, gw))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(config: Config, device: torch.device | None = None) -> TeMuIQA:
    """Backbone, prompts and head from the config; trainable parameters seeded from config.seed."""
    device = device or resolve_device(config.device)
    cfg = config.model
    dtype = compute_dtype(cfg.precision, device)
    generator = torch.Generator().manual_seed(config.seed)
    clip = create_clip(cfg, config.seed)
    backbone = Backbone(clip, cfg, dtype)
    prompts = PromptLearner(cfg, clip, dtype, generator)
    model = TeMuIQA(cfg, backbone, prompts, clip.logit_scale.exp().item())
    return model.to(device)
