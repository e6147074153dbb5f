"""Model FLOPs of TeMu-IQA from its modules' shapes, for model FLOPs utilisation (MFU).

Counted by hand, because MFU needs the count for shapes and devices that are not run here (ViT-L-14 at 448 on an
H100); the tests hold it to torch's FlopCounterMode. Conventions: 2 FLOPs per multiply-add of every matmul and
convolution, attention's two batched matmuls included; norms, softmax, activations and the scoring head's einsums
(under 0.1% on ViT-L-14) left out.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from temu_dist.model.temu import TeMuIQA


def block_flops(tokens: int, width: int, mlp: int) -> tuple[int, int]:
    """(projections and MLP, attention) FLOPs of one pre-norm transformer block's forward over `tokens` tokens."""
    linear = 2 * tokens * (4 * width * width + 2 * width * mlp)
    attention = 4 * tokens * tokens * width
    return linear, attention


def _blocks(transformer: nn.Module, tokens: int) -> tuple[int, int]:
    linear = attention = 0
    for block in transformer.resblocks:
        lin, att = block_flops(tokens, block.mlp.c_fc.in_features, block.mlp.c_fc.out_features)
        linear, attention = linear + lin, attention + att
    return linear, attention


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step on `images` tower images."""

    image_forward: int  # the frozen image tower (its kept blocks) and the projection of the selected layers' tokens
    text: int  # the text passes of CoOp/CoCoOp, forward and backward (none: 0, its features are fixed)

    @property
    def total(self) -> int:
        return self.image_forward + self.text


def image_forward_flops(model: TeMuIQA) -> int:
    """One image through the kept blocks of the frozen tower, then ln_post and proj of every selected layer's tokens."""
    backbone = model.backbone
    visual = backbone.visual
    gh, gw = backbone.grid
    tokens = gh * gw + 1
    patch_embed = 2 * gh * gw * visual.conv1.weight.numel()
    linear, attention = _blocks(visual.transformer, tokens)
    projection = 2 * backbone.num_selected * tokens * backbone.width * backbone.embed_dim
    return patch_embed + linear + attention + projection


def text_pass_flops(model: TeMuIQA) -> int:
    """One forward and backward of all prompt sequences for one image-conditioned context (CoCoOp), or the shared one
    (CoOp). The backward computes input gradients only, the tower being frozen: one matmul per forward matmul, two
    per attention matmul."""
    prompts = model.prompts
    if prompts.mode == "none":
        return 0
    text = prompts.text
    sequences, length = prompts.tokens.shape
    linear, attention = _blocks(text.transformer, length)
    proj = text.text_projection
    out = proj.out_features if isinstance(proj, nn.Linear) else 0 if proj is None else proj.shape[-1]
    head = 2 * text.width * out
    return sequences * (2 * linear + 3 * attention + 2 * head)


def step_flops(model: TeMuIQA, images: int) -> StepFlops:
    """Model FLOPs of a training step whose batch puts `images` images through the tower (LDG copies included)."""
    passes = images if model.prompts.mode == "cocoop" else 1
    return StepFlops(image_forward=images * image_forward_flops(model), text=passes * text_pass_flops(model))
