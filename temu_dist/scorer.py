"""Score images from Python, as IQA-PyTorch's metrics are called: a saved run (or a config) in, a score per image out.

    from temu_dist.scorer import Scorer
    scorer = Scorer.load("runs/koniq")     # a run folder (its best checkpoint) or a checkpoint folder
    scorer(["a.jpg", "b.png"])             # tensor([0.61, 0.43]): in [0, 1], higher is better
    scorer(batch)                          # images as tensors: float [N, 3, H, W] in [0, 1], or uint8; any size
    scorer.to("cuda")                      # an nn.Module: .to(), .cuda() move the model

Scores are [N] (IQA-PyTorch's metrics give [N, 1]), higher is better (`lower_better` is False, as pyiqa names it).
A float tensor that requires grad gets scores with gradients towards it, on the model's device: a loss, as pyiqa's
`as_loss` metrics are (`loss = 1 - scorer(restored).mean()`); the scorer's own weights stay frozen. Float images may
overshoot [0, 1] by up to 0.25, as a restoration's output may, and are scored as they are, unclamped.

Images are decoded and resized as training and evaluation decode and resize them, so a file scores here as it does in
`evaluate`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence, Union

import torch
from PIL import Image
from torch import nn

from temu_dist.config import Config, load_config
from temu_dist.data.augment import decode_rgb, normalize, to_input
from temu_dist.data.images import pil_rgb
from temu_dist.model.io import checkpoint_dir, load_model
from temu_dist.model.temu import QualityOutput, TeMuIQA, build_model

ImageLike = Union[str, Path, Image.Image, torch.Tensor]
OVERSHOOT = 0.25  # how far past [0, 1] a float image is still taken as one in [0, 1]


class Scorer(nn.Module):
    lower_better = False
    score_range = (0.0, 1.0)

    def __init__(self, model: TeMuIQA, config: Config):
        super().__init__()
        self.model = model.requires_grad_(False)  # a loss's gradients go to its input, not to the scorer
        self.config = config
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        m = self.config.model
        return (f"Scorer({m.backbone}, variant={m.variant}, prompt={m.prompt}, layers={m.layers}, "
                f"image_size={m.image_size}, device={self.device})")

    @classmethod
    def load(cls, checkpoint: str | Path, overrides: Sequence[str] = (),
             device: torch.device | str | None = None) -> Scorer:
        """A trained run; overrides as on the command line (e.g. `model.precision=bf16`); device as .to() takes it
        ("cuda:1")."""
        model, config = load_model(checkpoint_dir(checkpoint), list(overrides),
                                   None if device is None else torch.device(device))
        return cls(model, config)

    @classmethod
    def from_config(cls, path: str | Path | None, overrides: Sequence[str] = (),
                    device: torch.device | None = None) -> Scorer:
        """An untrained head on the config's backbone: zero-shot multi-layer scoring, with the fixed prompts unless the
        config names a prompt tuning (whose context would be random here)."""
        config = load_config(path, list(overrides), base={"model": {"prompt": "none"}}, base_source="untrained head")
        return cls(build_model(config, device), config)

    @staticmethod
    def read(path: str | Path) -> torch.Tensor:
        """An image file -> uint8 [3, H, W] RGB; OSError or ValueError if it cannot be read."""
        return decode_rgb(Path(path).read_bytes())

    def _prepared(self, image: ImageLike) -> torch.Tensor:
        """One image -> float [3, h, w] in [0, 1] at the model's input size."""
        if isinstance(image, (str, Path)):
            image = self.read(image)
        elif isinstance(image, Image.Image):
            image = pil_rgb(image)  # not convert("RGB"), which clips 16-bit greys to white
        elif not isinstance(image, torch.Tensor):
            raise TypeError(f"an image is a file path, a PIL image or a [3, H, W] tensor, not a {type(image).__name__}")
        elif image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor is [3, H, W] (a batch [N, 3, H, W]); this one is {list(image.shape)}")
        elif image.is_floating_point() and image.numel():
            lo, hi = (float(v) for v in image.detach().aminmax())
            if not image.isfinite().all():  # a diverged network's output: no scale of its values helps
                raise ValueError("a float image holds NaN or infinite values")
            # A restoration network's output (a loss's input) may overshoot a little; 0-255 or -1..1 ones go far past.
            if not -OVERSHOOT <= lo <= hi <= 1.0 + OVERSHOOT:
                raise ValueError(f"a float image is read as [0, 1] (up to {OVERSHOOT:g} past it as it is); this one "
                                 f"spans [{lo:g}, {hi:g}]: divide 0-255 values by 255 (or pass uint8), map -1..1 ones "
                                 "by (x + 1) / 2")
        # As the loader resizes; differentiable for floats.
        x = to_input(image, self.config.model.image_hw(), resize=self.config.model.resize)
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

    def outputs(self, images: Sequence[ImageLike]) -> QualityOutput:
        """One batch: the scores with the patch-score maps and per-layer scores; with gradients where an image
        requires grad."""
        batch = torch.stack([self._prepared(im) for im in images]).to(self.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and batch.requires_grad):
            return self.model(normalize(batch, self.model.backbone.mean, self.model.backbone.std))

    def forward(self, images: ImageLike | Iterable[ImageLike], batch_size: int = 8) -> torch.Tensor:
        """Scores [N] (fp32) of an image, a batch tensor [N, 3, H, W] or a list of images, in order: on the CPU, or
        where images require grad, with gradients towards them on the model's device."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, (str, Path, Image.Image, torch.Tensor)):
            images = [images]
        else:
            images = list(images)  # a list, or any iterable of images
        scores = [self.outputs(images[i:i + batch_size]).score.float() for i in range(0, len(images), batch_size)]
        scores = torch.cat(scores) if scores else torch.empty(0)
        return scores if scores.requires_grad else scores.cpu()
