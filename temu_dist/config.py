"""One typed config: defaults here, a YAML file over them, dotted `key=value` overrides over that.

Every verb builds a `Config` with `load_config` before doing any work, so a typo or a wrong type fails in one line
that names the key, and saves the resolved copy with what it writes.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import UnionType
from typing import Any, Iterator, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

LAYER_SPEC = re.compile(r"^(all|upto:[1-9]\d*|only:[1-9]\d*)$")
# Segments may be numbers too (eval.cross.0.name=x), to be refused with the way to set a list.
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


class ConfigError(ValueError):
    """A config that cannot be used; its message is one line naming the file and key."""


def _checked_size(v: int | tuple[int, int]) -> int | tuple[int, int]:
    sides = (v, v) if isinstance(v, int) else v
    if min(sides) < 16:
        raise ValueError(f"{v} is too small (each side must be >= 16)")
    return v


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def comparable(key: str, value: Any) -> Any:
    """A dotted key's value as settings are compared (a resume's, a search's, report's columns): an image size n is
    [n, n], which a config may give instead."""
    return list(_hw(value)) if key.endswith("image_size") and isinstance(value, (int, list, tuple)) else value


def differ(key: str, a: Any, b: Any) -> bool:
    """Whether two values of a dotted key are other settings, as comparable sees them."""
    return comparable(key, a) != comparable(key, b)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    # Any open_clip model name, or the 'hf-hub:'/'local-dir:' schemas open_clip accepts.
    backbone: str = "ViT-L-14"
    # An open_clip pretrained tag, a local checkpoint file, or null for random weights (tests, benchmarks).
    pretrained: str | None = "openai"
    # The towers' MLP activation. auto: what the pretrained tag says (OpenAI's weights: QuickGELU); a checkpoint file
    # records no activation, so for one saved as a state dict auto asks for true (OpenAI's weights) or false.
    quick_gelu: bool | Literal["auto"] = "auto"
    # Square side, or [height, width] (KADID-10k keeps its native 384x512).
    image_size: int | tuple[int, int] = 448
    # How images are resized to image_size, with antialiasing: bicubic, as CLIP's preprocessing; bilinear, as
    # IQA-PyTorch's (torchvision's default).
    resize: Literal["bicubic", "bilinear"] = "bicubic"
    # all | upto:K (layers 1..K, the paper's "dagger" models) | only:K (the single-layer study).
    layers: str = "all"
    # S: score-level fusion over layers; I: image-feature-level fusion.
    variant: Literal["S", "I"] = "I"
    # Prompt tuning: none (fixed prompts), CoOp, CoCoOp. The paper's TeMu-IQA models are CoCoOp (seed Table 5's
    # option (3) and Table 7 report the same KonIQ-10k figures).
    prompt: Literal["none", "coop", "cocoop"] = "cocoop"
    # Antonym pairs (good, bad); with several, the patch scores of all pairs are averaged.
    prompt_pairs: list[tuple[str, str]] = [("Good photo.", "Bad photo.")]
    # CoOp/CoCoOp learnable context length and init std (CoOp's own defaults: 16 and 0.02).
    n_ctx: int = Field(16, ge=1)
    ctx_init_std: float = 0.02
    # Words whose token embeddings start the context instead of random vectors, as CoOp's and CoCoOp's CTX_INIT (their
    # published setting: "a photo of a", with n_ctx its 4 tokens); null: random, std ctx_init_std.
    ctx_init: str | None = Field(None, min_length=1)
    # CoOp's CSC and CLASS_TOKEN_POSITION: a context of each prompt's own rather than one shared, and where the prompt's
    # words stand: after the context (end), in its middle, or before it (front). IQA-PyTorch's CLIP-IQA+ learner, in the
    # code base the paper names: ctx_per_prompt=true, class_position=middle, ctx_init sixteen "X",
    # prompt_pairs [["Good photo..", "Bad photo.."]] (configs/experiments/table5-koniq.yaml).
    ctx_per_prompt: bool = False
    class_position: Literal["end", "middle", "front"] = "end"
    # CoCoOp meta-net bottleneck: hidden width = embed_dim // this.
    cocoop_reduction: int = Field(16, ge=1)
    # A trainable affine LayerNorm per layer before the frozen ln_post (initialised to identity).
    layer_norm: bool = False
    # Initial temperature of the patch weights softmax(<f, g> / tau_w); learnable.
    tau_w_init: float = Field(1.0, gt=0)
    # Frozen towers' dtype: auto = bf16 on GPU, fp32 on CPU. fp16: for GPUs without bf16 tensor cores (compute
    # capability below 8.0: V100, T4, RTX 20xx), launched with mixed_precision fp16 or no.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # The frozen image tower's linear layers (over 80% of its FLOPs) as fp8 matmuls, per-token and per-channel scales,
    # bf16 out: on Hopper GPUs (H100, H200) with model.compile, a ViT-L-14 step 11% faster (benchmarks/RESULTS.md), with
    # rounding bf16 has not. Compare the scores with it on and off on your own weights and data
    # (`python -m temu_dist.evaluate ... model.tower_fp8=true model.compile=true`) before relying on it.
    tower_fp8: bool = False
    # torch.compile the model: a one-off compile (ViT-L-14 on an H100: 20-50 s), then faster steps
    # (benchmarks/RESULTS.md).
    compile: bool = False
    # torch.compile's mode, when compile is on: reduce-overhead replays CUDA graphs (no launch gaps, more memory);
    # max-autotune also times Triton GEMMs that can fuse the GELU after them (minutes more compile).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str) -> str:
        if not LAYER_SPEC.match(v):
            raise ValueError(f"'{v}' is not one of all, upto:K, only:K (K >= 1)")
        return v

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        return _checked_size(v)

    @field_validator("prompt_pairs")
    @classmethod
    def _pairs(cls, v: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if not v:
            raise ValueError("at least one (good, bad) pair is needed")
        return v

    @model_validator(mode="after")
    def _context(self) -> "ModelConfig":
        if self.prompt == "none":
            for key, value, default in (("ctx_init", self.ctx_init, None),
                                        ("ctx_per_prompt", self.ctx_per_prompt, False),
                                        ("class_position", self.class_position, "end")):
                if value != default:
                    raise ValueError(f"{key} {value!r} shapes a learned context, which prompt none has none of: set "
                                     f"model.prompt to coop or cocoop, or leave {key} out")
        return self

    def image_hw(self) -> tuple[int, int]:
        return _hw(self.image_size)


# The splits a pack can hold: a misspelt one fails here, not as a set quietly left out.
Split = Literal["train", "val", "test"]


class DataConfig(Section):
    # A shard folder written by `python -m temu_dist.pack` (it holds manifest.json) and the split to train on.
    train: str | None = None
    train_split: Split = "train"
    workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(1000, ge=0)
    # Shards drawn with replacement; otherwise each epoch is a reshuffled pass, each reader taking its own share.
    resampled: bool = False
    flip: bool = True


class LDGConfig(Section):
    """Local distortion guidance: a distorted region x' joins the batch with target f(x, x') * y."""

    enabled: bool = True
    p: float = Field(1.0, ge=0, le=1)  # probability per image
    weight: float = Field(1.0, ge=0)  # the distorted images' weight in the MSE and the PLCC (0: they drop out)
    fidelity: Literal["cw_ssim", "ssim", "constant"] = "cw_ssim"
    constant: float = Field(0.5, ge=0, le=1)  # f when fidelity is 'constant' (the Fig. 11 study: 0, 0.3, 0.5, 0.7)
    region_min: int = 40  # w_min = h_min of Eq. 8
    region_max: int = 150  # w_max = h_max
    ops: int = Field(6, ge=0)  # RandAugment N
    magnitude: int = Field(18, ge=0, le=30)  # RandAugment M, of torchvision's 31 bins (0..30)

    @model_validator(mode="after")
    def _region(self) -> "LDGConfig":
        if not 1 <= self.region_min <= self.region_max:
            raise ValueError(f"region_min {self.region_min} and region_max {self.region_max} need "
                             "1 <= region_min <= region_max")
        return self


class EvalSetConfig(Section):
    # Names metrics (NAME/srcc) and plots: letters, digits, _ . - only, as MLflow takes them.
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    shards: str  # a pack folder
    split: Split = "test"
    # This set's input size; null: the model's. The seed keeps KADID-10k at its native [384, 512] wherever it is used.
    image_size: int | tuple[int, int] | None = None

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        return None if v is None else _checked_size(v)

    def image_hw(self) -> tuple[int, int] | None:
        return None if self.image_size is None else _hw(self.image_size)


class TrainConfig(Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)  # the global batch, whatever the number of processes
    # Per-process micro-batch; default batch_size / processes. Gradient accumulation makes up the rest.
    per_device_batch: int | None = Field(None, ge=1)
    lr: float = Field(0.002, ge=0)
    # adam: the seed's, weight_decay an L2 term on every trained parameter. adamw: decoupled weight decay on the
    # matrices alone (context vectors, meta-net weights), none on gains, biases, layer weights and the temperature,
    # as open_clip's trainer applies it.
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    # How the cosine from lr to 0 steps. step: each optimizer step, over the run's steps. epoch: once an epoch, the
    # rate lr (1 + cos(pi e / epochs)) / 2 throughout epoch e (from 0), as IQA-PyTorch, the seed's code base, steps its
    # CosineAnnealingLR (T_max: its epochs).
    lr_schedule: Literal["step", "epoch"] = "step"
    # Optimizer steps over which the rate climbs linearly to lr (from lr / (W + 1)) before the cosine, over the
    # remaining steps, begins; 0: the seed's cosine from the first step.
    warmup_steps: int = Field(0, ge=0)
    # Clip the gradients' global norm to this before each optimizer step (open_clip's --grad-clip-norm); 0: no
    # clipping. Under DeepSpeed its engine clips, at this value.
    grad_clip_norm: float = Field(0.0, ge=0)
    mse_weight: float = Field(1.0, ge=0)
    plcc_weight: float = Field(1.0, ge=0)
    # With gradient accumulation, what the PLCC loss correlates over. step: the optimizer step's whole batch, as one
    # without accumulation would (every micro-batch is scored first, then run again with autograd, as open_clip
    # accumulates its contrastive loss); micro_batch: each micro-batch's samples, at one pass each.
    plcc_over: Literal["step", "micro_batch"] = "step"
    # With PLCC over the step, keep each micro-batch's frozen-tower tokens from the first pass, so the second runs the
    # head alone (ViT-L-14 at 448 in bf16: 48 MiB per tower image, kept for the whole step); false runs the tower
    # again, at one micro-batch's memory.
    keep_tokens: bool = True
    # "SET/METRIC" that picks the best epoch, e.g. test/srcc, val/plcc.
    key_metric: str = "test/srcc"
    # auto: continue from the run folder's last checkpoint when there is one. extend: continue from it with another
    # train.epochs, more than it has trained; the cosine schedule takes the new length from its step on.
    resume: Literal["auto", "never", "extend"] = "auto"
    # Cap optimizer steps per epoch (smoke runs); null: whole epochs.
    max_steps_per_epoch: int | None = Field(None, ge=1)
    # Also write checkpoints/last every this many optimizer steps within an epoch (long epochs: FLIVE, AVA); null: at
    # epoch ends only. A resume replays the epoch's data up to that step and goes on exactly as an unbroken run.
    checkpoint_every: int | None = Field(None, ge=1)
    # Every this many optimizer steps, the mean loss since the last such step: to MLflow as train/step_loss (its step
    # the run's optimizer step) and beside the progress bar, so that a long epoch's course shows before its end; 0: at
    # epoch ends only.
    log_every: int = Field(50, ge=0)
    # How long processes wait for each other at a collective (gather, gradient all-reduce) before failing: one slow
    # to read its shards or to evaluate holds up the rest. torch's own default is 10 minutes for NCCL, 30 for gloo.
    timeout_min: float = Field(30.0, ge=1, le=24 * 60)  # torch fails on an infinite or a huge one

    @field_validator("key_metric")
    @classmethod
    def _key(cls, v: str) -> str:
        return metric_key(v)

    @model_validator(mode="after")
    def _warmup(self) -> "TrainConfig":
        if self.warmup_steps and self.lr_schedule == "epoch":
            raise ValueError(f"warmup_steps {self.warmup_steps} climbs a step at a time, and lr_schedule epoch steps "
                             "the rate once an epoch: leave warmup_steps at 0 with it")
        return self


# The logistics a PLCC may be fitted through (metrics.fitted_plcc): VQEG's 4-parameter one, a 5-parameter one.
Curve = Literal["logistic_4params", "logistic_5params"]


class EvalConfig(Section):
    batch_size: int = Field(64, ge=1)
    # Splits of data.train evaluated after each epoch, and cross-dataset sets. The default skips a split the pack
    # lacks; splits named otherwise must all be there.
    splits: list[Split] = ["val", "test"]
    cross: list[EvalSetConfig] = []
    # Also score every set with one local distortion per image (the ldg section's region, RandAugment and fidelity,
    # seeded by seed and image name) against y' = f(x, x') * y: sets named SET-ldg, with the mean prediction and
    # target (seed Figs. 10, 11). Training need not use LDG.
    ldg: bool = False
    # Also each set's PLCC after fitting this logistic of the scores to the MOS (VQEG's 4-parameter one, or the
    # 5-parameter one), as plcc_fit, as many papers report PLCC on synthetic sets; none: the seed's PLCC alone (Eq. 12,
    # on the raw scores), which training and report give either way.
    plcc_fit: Literal["none", Curve] = "none"


class TrackingConfig(Section):
    enabled: bool = True
    # null: MLFLOW_TRACKING_URI if set, else out_dir/mlflow.db, shared by every run there; or a server, e.g.
    # http://127.0.0.1:5000.
    uri: str | None = None
    experiment: str = "temu-dist"
    # The MLflow run's name; null: the run's name. A search names each trial's by the values it tries.
    run_name: str | None = None
    # Set by a Ray Tune search: this run is a child of the search's MLflow run.
    parent_run_id: str | None = None


# What MLflow keeps under out_dir beside the runs (artifacts of its sqlite store, its file store).
MLFLOW_FOLDERS = ("mlartifacts", "mlruns")


def folder_name(name: str) -> str:
    """A name whose folder lies under out_dir (ablations/coop too): one that leaves it (../x, /x) would write beside
    other work."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise ValueError(f"{name!r} is no folder under out_dir: the work goes to out_dir/NAME (set out_dir for where)")
    return name


class Config(Section):
    name: str = "temu"
    _name = field_validator("name")(folder_name)
    seed: int = Field(0, ge=0, lt=2**32)  # np.random.seed, which accelerate's set_seed calls, takes no other
    # Runs write under out_dir/name.
    out_dir: str = "runs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    ldg: LDGConfig = LDGConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def pack_folders(self) -> list[tuple[str, str]]:
        """The packs the config names, with the key that names each: data.train's, then each eval.cross set's."""
        return [("data.train", self.data.train)] * bool(self.data.train) + [
            (f"eval.cross.{i}.shards", c.shards) for i, c in enumerate(self.eval.cross)]


def set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for i, key in enumerate(parents):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parents[: i + 1])} is not a section, cannot set {dotted}")
        node = child
    node[leaf] = value


def _union_member(loc_part: Any) -> bool:
    # pydantic reports a value that fits no member of a union once per member, the member's type last in the key.
    return isinstance(loc_part, str) and ("[" in loc_part or loc_part in ("int", "float", "bool", "str"))


def one_line_error(err: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """The errors of validating `model` (default: Config) in one line, an unknown key with the known one it may
    mean."""
    known = field_keys(model or Config)
    found: dict[str, str | list[str]] = {}  # key -> its message, or the union members its value fitted none of
    inputs: dict[str, Any] = {}
    for e in err.errors():
        loc = e["loc"]
        at = next((i for i in range(1, len(loc)) if _union_member(loc[i])), None)
        if at is not None:  # within a union member (image_size.tuple[int, int].1): reported once, as the union
            key = ".".join(str(p) for p in loc[:at])
            members = found.setdefault(key, [])
            if str(loc[at]) not in members:
                members.append(str(loc[at]))
            inputs.setdefault(key, e["input"])
        else:
            key = ".".join(str(p) for p in loc) or "<root>"
            # A validator's own words, without pydantic's "Value error, "; a section's input (a dict) is not repeated.
            said = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
            got = "" if e["type"] == "value_error" and isinstance(e["input"], dict) else f" (got {e['input']!r})"
            found[key] = _unknown(key, known) if e["type"] == "extra_forbidden" else said + got
    parts = [f"{key}: {v}" if isinstance(v, str) else f"{key}: expected {' or '.join(v)} (got {inputs[key]!r})"
             for key, v in found.items()]
    return f"{source}: invalid config: " + "; ".join(parts)


def settings_label(values: dict[str, Any]) -> str:
    """Settings as a short line (prompt=coop layers=upto:12 lr=0.0001235): each key by its last part where that is
    unique among them, a float to 4 digits, a path (data.train, a weights file) by its last part."""
    last = [key.rsplit(".", 1)[-1] for key in values]
    shown = [short if last.count(short) == 1 else key for key, short in zip(values, last)]
    told = [f"{v:.4g}" if isinstance(v, float) else Path(v).name if k in ("data.train", "model.pretrained")
            and isinstance(v, str) and "/" in v and ":" not in v else v for k, v in values.items()]
    return " ".join(f"{k}={v}" for k, v in zip(shown, told))


# The metrics a SET/METRIC name may pick; plcc_fit with eval.plcc_fit.
KEY_METRICS = ("srcc", "plcc", "krcc", "plcc_fit")


def metric_key(v: str) -> str:
    """A SET/METRIC name (train.key_metric, a search's metric), or ValueError."""
    if v.count("/") != 1 or v.split("/")[1] not in KEY_METRICS:
        raise ValueError(f"'{v}' is not SET/METRIC with METRIC one of {', '.join(KEY_METRICS)}")
    return v


def field_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a config class, those of its sections (optional ones too) included; not those within a
    list's items (eval.cross.0.name), which no name alone stands for."""
    keys = []
    for name, info in model.model_fields.items():
        keys.append(prefix + name)
        optional = get_args(info.annotation) if get_origin(info.annotation) in (Union, UnionType) else ()
        for kind in (info.annotation, *optional):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                keys += field_keys(kind, f"{prefix}{name}.")
    return keys


def _unknown(key: str, known: list[str]) -> str:
    # A training key unknown where it stands (at the top of a search config) would be its own closest match.
    close = [k for k in difflib.get_close_matches(key, known, n=2, cutoff=0.8) if k != key]
    started = [k for k in known if k.startswith(key) and k != key]  # cut short: asha.grace for asha.grace_period
    close = close or started if len(started) < 2 else close
    return f"unknown key (did you mean {close[0]}?)" if close else "unknown key"


def check_output_folder(folder: Path, flag: str) -> None:
    """Refuses, before any work, a folder to write into that is a file, lies under one, or where this user may not
    write."""
    there = next(p for p in (folder, *folder.parents) if p.exists())
    if not there.is_dir():
        raise ConfigError(f"{flag} {folder}: {'it' if there == folder else there} is a file, not a folder")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {folder}: {there} is not writable by this user")


class Notice(UserWarning):
    """A warning for the person at the terminal (tracking lost, a cluster short of room), not for a developer."""


@contextmanager
def notices_as_lines(prog: str) -> Iterator[None]:
    """Within, a Notice prints as `PROG: warning: ...`, as the command says its errors, not with Python's file and
    source line; other warnings as Python prints them."""
    with warnings.catch_warnings():
        python = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # warnings.showwarning's signature
            if issubclass(category, Notice):
                print(f"{prog}: warning: {message}", file=file or sys.stderr)
            else:
                python(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to plain values; a list of sections (eval.cross) by position, eval.cross.0.name, so each of its
    fields is a column of its own in MLflow's UI, and a setting of its own where runs are compared."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_run_folder(folder: Path, series: bool) -> None:
    """A folder under out_dir holds a training run or a repeat series (`series`: what is asked for), not both:
    report would take it for the series and show the run no more. Both already there (an earlier version's config
    headers ran a series under its single run's name): how to part them."""
    run = (folder / "results.json").is_file() or (folder / "checkpoints").is_dir()
    if run and (folder / "repeat.json").is_file():
        raise ConfigError(f"name: {folder} holds both a training run and a repeat series (an earlier version's "
                          f"headers put them in one folder): move the run to a folder of its own (mkdir "
                          f"{folder}-single && mv {folder}/results.json {folder}/config.yaml {folder}/checkpoints "
                          f"{folder}/plots {folder}-single/), then run this again")
    if series and run:
        raise ConfigError(f"name: {folder} is a training run's folder; give the series a name of its own (name=...)")
    if not series and (folder / "repeat.json").is_file():
        raise ConfigError(f"name: {folder} holds a repeat series (repeat.json): give the run another name=")


def error_line(e: BaseException) -> str:
    """An exception in one line for a message: its type and its message's first line."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def is_override(arg: str) -> bool:
    return bool(OVERRIDE.match(arg))


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML mapping from a file, or a one-line error naming the file."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the {what} ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML{_where(e)}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping of keys to values")
    return loaded


def _where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def apply_overrides(tree: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """`key.sub=value` items set into the tree, values parsed as YAML."""
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value, f"override {item}")
    return tree


def list_of(key: str) -> str:
    """The key up to its first position in a list: eval.cross for eval.cross.0.name (flattened, or as typed)."""
    return re.split(r"\.\d+(?:\.|$)", key)[0]


def value_at(tree: Any, dotted: str) -> Any:
    """tree's value at a dotted key, or None."""
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def parse_override(item: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key.sub, the value parsed as YAML)."""
    if not is_override(item):
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. model.prompt=coop)")
    key, raw = item.split("=", 1)
    whole = list_of(key)
    if whole != key and isinstance(value_at(Config().model_dump(), whole), list):
        raise ConfigError(f"override '{item}': {whole} is a list, set whole, e.g. '{whole}=[...]'")
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                          "quote it if it is a string") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None, base_source: str = "defaults") -> Config:
    """Defaults <- `base` (a saved config, named in errors by `base_source`) <- YAML file <- `key=value` overrides
    (values parsed as YAML)."""
    tree: dict = copy.deepcopy(base or {})  # the overrides below write into nested sections
    source = base_source
    if path is not None:
        source = str(path)
        tree = _merge(tree, read_yaml(path))
    apply_overrides(tree, overrides)
    if overrides:
        source += " + overrides"
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(one_line_error(e, source)) from None


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dump(config: Config) -> dict:
    """The resolved config as plain JSON-able data (what runs save and MLflow logs)."""
    return config.model_dump(mode="json")
