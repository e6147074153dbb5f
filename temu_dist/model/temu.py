"""TeMu-IQA: text-guided patch scoring (TPS) over the tokens of many CLIP layers, fused by score (S) or feature (I)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from temu_dist.config import Config, ConfigError, ModelConfig
from temu_dist.model.backbone import Backbone, compute_dtype, create_clip
from temu_dist.model.fp8 import check_fp8
from temu_dist.model.prompts import PromptLearner


# The frozen tower's output: raw [cls] tokens [B, S, width] and patch tokens [B, S, N, width] of the S selected layers.
Tokens = tuple[torch.Tensor, torch.Tensor]


@dataclass
class QualityOutput:
    score: torch.Tensor  # [B] in [0, 1], higher is better
    layer_scores: torch.Tensor  # [B, S] per selected layer (S variant) or [B, 1] (I variant)
    patch_scores: torch.Tensor  # [B, gh, gw] the quality map, fused over layers as the score is
    patch_weights: torch.Tensor  # [B, gh, gw] how much each patch counts in the score
    tokens: Tokens | None = None  # the tower's output, where asked for (keep_tokens)


def tps(f: torch.Tensor, inv_norm: torch.Tensor, g: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
        tau_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text-guided patch scoring.

    f [B, S, N, D] patch features and inv_norm [B, S, N] their inverse norms (f * inv_norm is the normalised feature),
    g [B, S, D] normalised [cls] features, text [1|B, P, 2, D] normalised (good, bad) features. Returns per-layer image
    scores q [B, S], patch scores s [B, S, N] and patch weights w [B, S, N].

    Every cosine of a patch (with each text and with its [cls]) comes from one batched matmul over f, scaled after:
    f is the step's largest tensor, and normalising it first would cost two more passes over it and a copy.
    """
    b, s_, _, d = f.shape
    k = text.shape[1] * 2
    columns = torch.cat([text.flatten(1, 2).unsqueeze(1).expand(b, s_, k, d), g.unsqueeze(2)], dim=2)
    cos = torch.einsum("bsnd,bskd->bsnk", f, columns) * inv_norm.unsqueeze(-1)
    logits = logit_scale * cos[..., :k].unflatten(-1, (k // 2, 2))
    s = logits.softmax(dim=-1)[..., 0].mean(dim=-1)
    w = (cos[..., k] / tau_w).softmax(dim=-1)
    return (w * s).sum(dim=-1), s, w


def _weighted_layer_sum(c: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """sum_l c[:, l, :, None] * f[:, l] in fp32: c [B, S, N] fp32, f [B, S, N, D] in the tower's dtype -> [B, N, D].

    A layer at a time, so f is never copied to fp32 or normalised whole (a [B, S, N, D] fp32 tensor, 4.8 GB at
    ViT-L-14 batch 64, kept for the backward pass), and autograd keeps only f itself; on CPU the fusion alone ran
    2.6-3.8x faster in bf16 than one einsum over the normalised copy (ViT-L-14 shapes, 4 images). addcmul is one
    kernel a layer where a multiply and an add are two (CPU: 0.101, 0.132 -> 0.093, 0.114 s)."""
    out = c[:, 0, :, None] * f[:, 0]
    for layer in range(1, f.shape[1]):
        out = out.addcmul(c[:, layer, :, None], f[:, layer])
    return out


def inverse_norm(x: torch.Tensor) -> torch.Tensor:
    """1 / |x| over the last dimension, in fp32 whatever x's dtype (F.normalize's epsilon)."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(1e-12).reciprocal()


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

    def features(self, images: torch.Tensor, tokens: Tokens | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Joint-space features of the selected layers: patches f [B, S, N, D] as projected (tower dtype, not
        normalised), their inverse norms [B, S, N] and normalised [cls] g [B, S, D], all but f in fp32. `tokens`, the
        tower's output for these images where already at hand, stand in for running it."""
        cls, patches = self.backbone(images) if tokens is None else tokens
        if self.layer_norms is not None:
            cls, patches = cls.float(), patches.float()
            cls = torch.stack([ln(cls[:, i]) for i, ln in enumerate(self.layer_norms)], dim=1)
            patches = torch.stack([ln(patches[:, i]) for i, ln in enumerate(self.layer_norms)], dim=1)
        f = self.backbone.project(patches)
        return f, inverse_norm(f), F.normalize(self.backbone.project(cls).float(), dim=-1)

    def forward(self, images: torch.Tensor, tokens: Tokens | None = None, keep_tokens: bool = False) -> QualityOutput:
        """Scores of normalised images [B, 3, H, W]. The tower is frozen: a second pass over the same images may start
        from the first's `tokens` (in its output where asked for by `keep_tokens`) and run the head alone."""
        if tokens is None:
            tokens = self.backbone(images)
        f, inv_norm, g = self.features(images, tokens)
        # Scores are averages of softmaxes: under bf16 autocast they would be quantised to about 0.004, ties for
        # SRCC. The fusion and scoring are cheap, so they run in fp32 whatever the caller's autocast says.
        with torch.autocast(images.device.type, enabled=False):
            out = self._score(f, inv_norm, g, self.backbone.grid_of(*images.shape[-2:]))
        if keep_tokens:
            out.tokens = tokens
        return out

    def _score(self, f: torch.Tensor, inv_norm: torch.Tensor, g: torch.Tensor, grid: tuple[int, int]) -> QualityOutput:
        a = self.layer_weights().float()
        g_fused = F.normalize(torch.einsum("s,bsd->bd", a, g), dim=-1)
        text = self.prompts(g_fused).float()
        if self.cfg.variant == "I":
            f = _weighted_layer_sum(a.unsqueeze(-1) * inv_norm, f).unsqueeze(1)
            q_l, s, w = tps(f, inverse_norm(f), g_fused.unsqueeze(1), text, self.logit_scale, self.log_tau_w.exp())
            score, s_map, w_map = q_l[:, 0], s[:, 0], w[:, 0]
        else:
            q_l, s, w = tps(f.float(), inv_norm, g, text, self.logit_scale, self.log_tau_w.exp())
            score = q_l @ a
            s_map, w_map = torch.einsum("s,bsn->bn", a, s), torch.einsum("s,bsn->bn", a, w)
        return QualityOutput(score, q_l, s_map.view(-1, *grid), w_map.view(-1, *grid))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda, but torch finds no GPU (torch.cuda.is_available() is False): check the "
                          "driver, CUDA_VISIBLE_DEVICES and torch's CUDA build, or use device=auto")
    return torch.device(name)


def build_model(config: Config, device: torch.device | None = None,
                drawn_as: tuple[int, tuple[int, int]] | None = None) -> TeMuIQA:
    """Backbone, prompts and head from the config; trainable parameters seeded from config.seed. A random backbone
    (`model.pretrained: null`) is drawn from `drawn_as`, (seed, input size), where given: a saved run's own."""
    device = device or resolve_device(config.device)
    cfg = config.model
    dtype = compute_dtype(cfg.precision, device)
    if cfg.tower_fp8:
        check_fp8(device, cfg.compile)
    generator = torch.Generator().manual_seed(config.seed)
    seed, drawn_at = drawn_as or (config.seed, cfg.image_hw())
    clip = create_clip(cfg, seed, drawn_at)
    backbone = Backbone(clip, cfg, dtype)
    prompts = PromptLearner(cfg, clip, dtype, generator)
    model = TeMuIQA(cfg, backbone, prompts, clip.logit_scale.exp().item()).to(device)
    if cfg.compile:
        # The whole model as one graph, not block by block: only then are each block's last residual add and the
        # next block's layer norm one kernel, and the head's casts and norms one pass (H100: 5-6% faster per step).
        model.compile(mode=cfg.compile_mode)
    return model
