"""Image -> model input. Resize and flip run in the loader workers on uint8 tensors; normalisation with the
backbone's mean and std runs on the device, after local distortion and fidelity, which need the [0, 1] pixels."""
from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF


def decode_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def to_input(image: Image.Image, image_hw: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """PIL image -> uint8 [3, H, W] at the input size. A square resize, as the paper feeds 448x448 whatever the
    aspect; an image already at the input size (KADID-10k at its native 384x512) is left untouched."""
    if (image.height, image.width) != tuple(image_hw):
        image = TF.resize(image, list(image_hw), interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = TF.pil_to_tensor(image)
    return x.flip(-1) if flip else x


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (or [0, 1] float) [B, 3, H, W] -> the backbone's normalised float input, on x's device."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
