"""Pictures people look at instead of tables: heatmaps, prediction scatter (seed Fig. 10), score vs time (Fig. 6)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from PIL import Image  # noqa: E402


def heatmap_overlay(image: Image.Image, patch_scores: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The patch-score map [gh, gw] in [0, 1], upsampled over the image: red is bad, green is good."""
    rgb = image.convert("RGB")
    scores = Image.fromarray(np.clip(patch_scores, 0.0, 1.0).astype(np.float32), mode="F")
    scores = np.asarray(scores.resize(rgb.size, Image.BILINEAR))
    colours = (colormaps["RdYlGn"](scores)[..., :3] * 255).astype(np.uint8)
    return Image.blend(rgb, Image.fromarray(colours), alpha)


def scatter(pred: np.ndarray, mos: np.ndarray, title: str, path: str | Path) -> Path:
    """Predicted versus ground-truth score, both in [0, 1], with the identity line (seed Fig. 10)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    ax.scatter(mos, pred, s=8, alpha=0.6)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="ground truth (normalised MOS)", ylabel="predicted score", title=title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def score_vs_time(history: list[dict], sets: list[str], path: str | Path) -> Path:
    """(SRCC + PLCC) / 2 of each evaluation set against cumulative train + eval time, one point per epoch (Fig. 6)."""
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for name in sets:
        points = [(h["elapsed_s"], (h["eval"][name]["srcc"] + h["eval"][name]["plcc"]) / 2)
                  for h in history if name in h["eval"]]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, label=name)
    ax.set(xlabel="cumulative train + eval time (s)", ylabel="(SRCC + PLCC) / 2", title="score vs time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
