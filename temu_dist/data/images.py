"""PIL images as 8-bit RGB, one rule for packing, training and scoring. Without torch, so that pack stays light."""
from __future__ import annotations

import numpy as np
from PIL import Image


def pil_rgb(im: Image.Image) -> Image.Image:
    """im as 8-bit RGB. PIL's convert clips 16-bit greys (mode I;16, or I from older Pillows) at 255, which turns most
    of an image white; they are scaled here as torchvision's decoders scale them (the top 8 bits)."""
    if im.mode.startswith("I"):
        grey = np.asarray(im).astype(np.int64) >> 8
        im = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
    return im.convert("RGB")
