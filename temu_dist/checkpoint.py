"""Training checkpoints: `last` (to resume) and `best` (the reported weights), each a folder.

    weights.safetensors, config.json   the model, as temu_dist.model.io saves it (predict/evaluate read these)
    trainer.pt                         optimiser and scheduler state, RNG states (loaded with weights_only=True)
    trainer.json                       position (next epoch), history, best epoch and metric, elapsed time

A checkpoint folder is written beside its final name and swapped in whole, so a kill never leaves half of one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from temu_dist.config import Config
from temu_dist.model.io import save_model
from temu_dist.model.temu import TeMuIQA

TRAINER_STATE = "trainer.pt"
TRAINER_INFO = "trainer.json"


def rng_state() -> dict:
    # Data order and augmentation are seeded from (seed, epoch), so torch's own generators are all a resume needs.
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, model: TeMuIQA, config: Config, optimizer, scheduler, info: dict) -> Path:
    """Writes the whole checkpoint next to `folder`, then swaps it in."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, config, tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               tmp / TRAINER_STATE)
    (tmp / TRAINER_INFO).write_text(json.dumps(info, indent=2) + "\n")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def find_checkpoint(folder: Path) -> Path | None:
    """The folder, or the copy a kill left between the two renames of `save_checkpoint`."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / TRAINER_INFO).is_file():
            return candidate
    return None


def load_trainer_state(folder: Path) -> tuple[dict, dict]:
    """(tensors: optimizer, scheduler, rng; info) of a checkpoint; tensors and plain data only, nothing unpickled."""
    state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
    info = json.loads((folder / TRAINER_INFO).read_text())
    return state, info
