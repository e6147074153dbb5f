"""Pictures people look at instead of tables."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image


def heatmap_overlay(image: Image.Image, patch_scores: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The patch-score map [gh, gw] in [0, 1], upsampled over the image: red is bad, green is good."""
    rgb = image.convert("RGB")
    scores = Image.fromarray(np.clip(patch_scores, 0.0, 1.0).astype(np.float32), mode="F")
    scores = np.asarray(scores.resize(rgb.size, Image.BILINEAR))
    colours = (colormaps["RdYlGn"](scores)[..., :3] * 255).astype(np.uint8)
    return Image.blend(rgb, Image.fromarray(colours), alpha)
