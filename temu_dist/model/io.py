"""Save and load a model: trainable weights as safetensors, the resolved config as JSON. Nothing is ever unpickled."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from temu_dist.atomic import write_atomic, write_json_atomic
from temu_dist.config import Config, ConfigError, dump, load_config
from temu_dist.model.backbone import names_a_file
from temu_dist.model.temu import TeMuIQA, build_model

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
# Model fields added since checkpoints were first saved, at the value their weights were trained with.
MODEL_ADDED = {"ctx_per_prompt": False, "class_position": "end", "resize": "bicubic"}
# Fields a loaded checkpoint may take from the command line: where the frozen weights come from and the activation they
# were trained with, their dtype and the input size and resize. Everything else shapes the trainable weights or what
# they mean.
LOAD_TIME_FIELDS = {"pretrained", "quick_gelu", "precision", "tower_fp8", "image_size", "resize", "compile",
                    "compile_mode"}
# Which config field decides the shape of which trainable parameter, for errors.
PARAM_FIELDS = {"prompts.ctx": "model.n_ctx", "prompts.meta_net": "model.cocoop_reduction",
                "layer_logits": "model.layers", "layer_norms": "model.layer_norm"}


def save_model(model: TeMuIQA, config: Config, directory: str | Path) -> Path:
    """Writes weights.safetensors and config.json into `directory`, each file replaced whole or not at all."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.float().cpu().contiguous() for k, v in model.trainable_state().items()}
    # The model section rides in the weights' metadata, so weights and config.json can be checked against each other.
    meta = {"format": "temu-dist/1", "model": json.dumps(dump(config)["model"], sort_keys=True)}
    write_atomic(directory / WEIGHTS, lambda p: save_file(state, str(p), metadata=meta))
    write_json_atomic(directory / CONFIG, dump(config))
    return directory


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder as given, or the best checkpoint of a run folder."""
    path = Path(path)
    # best.old: the copy a kill can leave while a new best checkpoint is swapped in.
    for candidate in (path, path / "checkpoints" / "best", path / "checkpoints" / "best.old"):
        if (candidate / WEIGHTS).is_file():
            return candidate
    last = path / "checkpoints" / "last"
    if (last / WEIGHTS).is_file():  # a run stopped before its first epoch was scored
        raise ConfigError(f"{path}: a run with no checkpoints/best yet (none of its epochs has been scored); its "
                          f"latest weights are {last}: name that")
    raise ConfigError(f"{path}: neither a checkpoint folder ({WEIGHTS}) nor a run folder with checkpoints/best")


def _mismatch(saved: dict, asked: dict, source: str) -> None:
    saved = {**MODEL_ADDED, **saved}
    for key in sorted(set(saved) | set(asked)):
        if key in LOAD_TIME_FIELDS:
            continue
        if saved.get(key) != asked.get(key):
            raise ConfigError(f"{source}: checkpoint has model.{key}={saved.get(key)!r} but "
                              f"model.{key}={asked.get(key)!r} was asked")


def with_legacy_fields(saved: dict) -> dict:
    """A saved config with the fields added since, as they were then: model.quick_gelu, before which a weights file
    always gave GELU and a pretrained tag its own activation."""
    model = saved.get("model") if isinstance(saved, dict) else None
    if isinstance(model, dict) and "quick_gelu" not in model:
        model["quick_gelu"] = False if names_a_file(model.get("pretrained")) else "auto"
    return saved


def read_json_object(path: Path) -> dict:
    """A JSON object this package wrote; what else the file holds is a one-line ConfigError naming it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return data


def configs_of(directory: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, Config]:
    """The checkpoint's own config, and that config with load-time overrides; an override of a field the weights
    depend on is an error."""
    directory = Path(directory)
    path = directory / CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: not found; is {directory} a saved run or checkpoint folder?")
    saved = with_legacy_fields(read_json_object(path))
    own, config = load_config(None, (), base=saved, base_source=str(path)), \
        load_config(None, overrides, base=saved, base_source=str(path))
    _mismatch(own.model.model_dump(mode="json"), config.model.model_dump(mode="json"), str(path))
    return own, config


def load_weights(model: TeMuIQA, directory: str | Path, config: Config) -> None:
    """Copies a checkpoint's trainable weights into `model`, after checking them against `config`."""
    path = Path(directory) / WEIGHTS
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except (SafetensorError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
    if "model" in meta:
        _mismatch(json.loads(meta["model"]), dump(config)["model"], f"{path} vs {Path(directory) / CONFIG}")
    expected = {k: v.shape for k, v in model.trainable_state().items()}
    for name in sorted(set(expected) | set(state)):
        field = next((f for prefix, f in PARAM_FIELDS.items() if name.startswith(prefix)), "model.prompt")
        if name not in state:
            raise ConfigError(f"{path}: parameter '{name}' is missing ({field} does not match the checkpoint)")
        if name not in expected:
            raise ConfigError(f"{path}: unexpected parameter '{name}' ({field} does not match the checkpoint)")
        if state[name].shape != expected[name]:
            raise ConfigError(f"{path}: parameter '{name}' has shape {list(state[name].shape)} but {field} gives "
                              f"{list(expected[name])}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)


def load_model(directory: str | Path, overrides: list[str] | tuple[str, ...] = (),
               device: torch.device | None = None) -> tuple[TeMuIQA, Config]:
    saved, config = configs_of(directory, overrides)
    # A random backbone is drawn again as the run drew it, whatever seed or input size this load asks for.
    model = build_model(config, device, drawn_as=(saved.seed, saved.model.image_hw()))
    load_weights(model, directory, config)
    return model, config
