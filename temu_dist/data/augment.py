"""Image -> model input: resize to the configured input size and normalise with the backbone's mean and std."""
from __future__ import annotations

from torchvision import transforms
from torchvision.transforms import InterpolationMode


def eval_transform(image_hw: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> transforms.Compose:
    """PIL RGB image -> float tensor [3, H, W]. A square resize, as the paper feeds 448x448 whatever the aspect."""
    return transforms.Compose([
        transforms.Resize(image_hw, interpolation=InterpolationMode.BICUBIC, antialias=True),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
