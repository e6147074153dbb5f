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

from temu_dist.atomic import write_atomic, write_text_atomic
from temu_dist.config import Config, ConfigError
from temu_dist.model.io import CONFIG, read_json_object, save_model
from temu_dist.model.temu import TeMuIQA

TRAINER_STATE = "trainer.pt"
TRAINER_INFO = "trainer.json"
# What a resume reads from trainer.json, and its types; in_epoch is there only in a checkpoint taken within an epoch.
INFO_FIELDS = {"next_epoch": int, "history": list, "best": (dict, type(None)), "elapsed_s": (int, float)}
IN_EPOCH_FIELDS = {"micro_batches": int, "loss_sum": (int, float), "images": int, "train_s": (int, float),
                   "readers": int}
# Saved since a resume may change the batch plan (steps, processes), since each reader takes a contiguous run of the
# samples (reader_runs), and since a SIGTERM saves an epoch whose evaluation is to come (lr: its record's, the rate of
# its last step); older checkpoints lack them.
IN_EPOCH_ADDED = {"steps": int, "processes": int, "reader_runs": bool, "lr": (int, float), "to_evaluate": bool}


def rng_state() -> dict:
    # Data order and augmentation are seeded from (seed, epoch), so torch's own generators are all a resume needs.
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        # One state per GPU the saving process saw: a resume on a machine with fewer sets those it has (torch's
        # set_rng_state_all would fail on the first it lacks).
        for index, gpu_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)


def save_checkpoint(folder: Path, model: TeMuIQA, config: Config, optimizer, scheduler, info: dict) -> Path:
    """Writes the whole checkpoint next to `folder`, then swaps it in."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, config, tmp)
    # Each file synced before the folder is swapped in: a node that crashes must not leave one cut short under `last`.
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    write_atomic(tmp / TRAINER_STATE, lambda p: torch.save(state, p))
    write_text_atomic(tmp / TRAINER_INFO, json.dumps(info, indent=2) + "\n")
    old = folder.with_name(folder.name + ".old")
    # Where a kill between the renames left only `old`, it is the checkpoint until the new one is in place.
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def find_checkpoint(folder: Path) -> Path | None:
    """The folder, or the copy a kill left between the two renames of `save_checkpoint`. The folder is only ever
    swapped in whole, so one that is there is the checkpoint even when damaged: a resume reports it rather than start
    over on top of it."""
    if folder.is_dir():
        return folder
    old = folder.with_name(folder.name + ".old")
    return old if (old / TRAINER_INFO).is_file() else None


def epoch_of(checkpoint: Path) -> int | None:
    """The epoch whose weights a checkpoint folder holds, from its trainer.json; None where it has none, or the
    weights are from within an epoch (a last checkpoint saved mid-epoch). An epoch trained whole, its evaluation to
    come (a stop saved it), is that epoch."""
    try:
        info = json.loads((checkpoint / TRAINER_INFO).read_text())
        within = info.get("in_epoch")
        if not within:
            return int(info["next_epoch"])
        return int(info["next_epoch"]) + 1 if within.get("to_evaluate") else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


_RESTORE = "restore it, or start anew with train.resume=never or another name"


def _damaged(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {problem}; {_RESTORE}")


def _reason(e: Exception) -> str:
    # torch's messages run to several sentences and lines; the first says what failed.
    first = str(e).strip().split("\n")[0].split(". ")[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _read_json(path: Path) -> dict:
    try:
        return read_json_object(path)
    except ConfigError as e:
        raise ConfigError(f"{e}; {_RESTORE}") from None


def _check_fields(data: dict, fields: dict, path: Path, within: str = "") -> None:
    for key, kind in fields.items():
        if key not in data or not isinstance(data[key], kind):
            raise _damaged(path, f"'{within}{key}' is missing or malformed")


def load_saved_config(folder: Path) -> dict:
    """The resolved config a checkpoint was trained with, as saved; a damaged file is a ConfigError naming it."""
    return _read_json(folder / CONFIG)


def load_trainer_state(folder: Path) -> tuple[dict, dict]:
    """(tensors: optimizer, scheduler, rng; info) of a checkpoint; tensors and plain data only, nothing unpickled.
    A damaged file is a ConfigError naming it."""
    path = folder / TRAINER_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise _damaged(path, "not found") from None
    except Exception as e:  # noqa: BLE001 - a damaged file raises any of several types, by where the damage lies
        raise _damaged(path, f"not a readable torch file ({_reason(e)})") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= set(state):
        raise _damaged(path, "not a trainer state (optimizer, scheduler, rng)")
    return state, load_trainer_info(folder)


def load_trainer_info(folder: Path) -> dict:
    """A checkpoint's trainer.json (epochs done, position, history, best), checked; a damaged one is a ConfigError."""
    info_path = folder / TRAINER_INFO
    info = _read_json(info_path)
    _check_fields(info, INFO_FIELDS, info_path)
    if "in_epoch" in info:
        _check_fields(info, {"in_epoch": dict}, info_path)
        _check_fields(info["in_epoch"], IN_EPOCH_FIELDS, info_path, "in_epoch.")
        added = {k: kind for k, kind in IN_EPOCH_ADDED.items() if k in info["in_epoch"]}
        _check_fields(info["in_epoch"], added, info_path, "in_epoch.")
    return info


def where_it_goes_on(last: Path) -> str:
    """Where a resume from this checkpoint goes on, as a stop line says it: " (after epoch 2)", " (epoch 3, after its
    step 40)"."""
    try:
        info = load_trainer_info(last)
    except ConfigError:
        return ""  # the resume says what is wrong with it
    within = info.get("in_epoch")
    if not within:
        return f" (after epoch {info['next_epoch']})"
    if within.get("to_evaluate"):
        return f" (epoch {info['next_epoch'] + 1} trained, its evaluation to come)"
    step = f", after its step {within['steps']}" if "steps" in within else ""
    return f" (epoch {info['next_epoch'] + 1}{step})"
