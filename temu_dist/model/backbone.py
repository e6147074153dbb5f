"""The frozen CLIP image encoder: loading, input size, layer selection and the tokens of every selected layer."""
from __future__ import annotations

import copy
import difflib
import functools
import logging
import timeit
import warnings
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import huggingface_hub
import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub.utils import HfHubHTTPError
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from temu_dist.config import ConfigError, ModelConfig, Notice, error_line
from temu_dist.model.fp8 import linears_to_fp8

# The tiny backbones the demo runs on ship with the package; registering them makes their names valid everywhere.
PACKAGE_MODEL_CONFIGS = Path(__file__).parent / "configs"
open_clip.add_model_config(PACKAGE_MODEL_CONFIGS)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The frozen towers' dtype. bf16 or fp16 asked for on a CPU that runs it slowly is warned of: on AVX2-only AMD
    EPYCs a 512^3 bf16 matmul ran 110 times slower than fp32, and on another a 256^3 one 48 times (fp16 49), where a
    CPU with AVX512-BF16 steps 1.6-1.8x faster in bf16. So is bf16 on a GPU whose tensor cores have no bf16 (compute
    capability below 8.0), where fp16 has them."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return torch.float32
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    name = "fp16" if dtype == torch.float16 else "bf16"
    if device.type == "cuda" and dtype == torch.bfloat16 and \
            (capability := torch.cuda.get_device_capability(device)) < (8, 0):
        warnings.warn(f"model.precision={precision}: {torch.cuda.get_device_name(device)} (compute capability "
                      f"{capability[0]}.{capability[1]}) has no bf16 tensor cores; model.precision=fp16, launched "
                      "with --mixed_precision fp16, runs the frozen tower on its fp16 ones", Notice, stacklevel=3)
    if device.type == "cpu" and (slower := cpu_slowdown(dtype)) > 4:
        warnings.warn(f"model.precision={name}: this CPU runs a {name} matmul {slower:.0f}x slower than fp32 (it has "
                      f"no {name} instructions); model.precision=auto (fp32 on a CPU) runs far faster", Notice,
                      stacklevel=3)
    return dtype


@functools.cache
def cpu_slowdown(dtype: torch.dtype) -> float:
    """How many times longer a 256^3 matmul takes in `dtype` than in fp32 here (best of 3 each): measured, since
    torch's CPU capability ("AVX2", "AVX512") does not say whether the CPU has bf16 or fp16 instructions."""
    x = torch.randn(256, 256)
    best = {}
    for each in (torch.float32, dtype):
        y = x.to(each)
        y @ y  # warm-up
        best[each] = min(timeit.repeat(lambda: y @ y, number=1, repeat=3))
    return best[dtype] / best[torch.float32]


def _check_name(name: str) -> None:
    if ":" not in name and open_clip_name(name) not in open_clip.list_models():  # hf-hub: names, checked on loading
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.4)
        examples = close or ["ViT-L-14", "ViT-B-16", "ViT-B-32"]
        raise ConfigError(f"model.backbone: unknown open_clip model '{name}'; valid names include {', '.join(examples)}"
                          " (open_clip.list_models() lists all)")


def check_backbone(cfg: ModelConfig) -> None:
    """model.backbone is an open_clip model and model.layers within its depth, from open_clip's config alone (no
    weights, no model built): train checks it before any work, a search every trial's before Ray starts. (Not in
    create_clip: CLIP-IQA builds the tower whatever model.layers says, then picks its own layers.)"""
    if (depth := vit_depth(cfg.backbone)) is not None:
        layer_indices(cfg.layers, depth)


def vit_depth(name: str) -> int | None:
    """The layers of model.backbone's image tower, from open_clip's config alone; None for an hf-hub: or local-dir:
    model, whose config comes with it. A tower that is no [cls]-token ViT (ResNet, timm, attention-pooled, average-
    pooled) is refused here, as create_clip refuses it once built."""
    _check_name(name)
    if ":" in name:
        return None
    vision = open_clip.get_model_config(open_clip_name(name))["vision_cfg"]
    depth = vision.get("layers")
    if not isinstance(depth, int) or vision.get("timm_model_name") or vision.get("attentional_pool") \
            or vision.get("pool_type", "tok") != "tok":
        raise _no_cls_vit(name)
    return depth


def _no_cls_vit(name: str) -> ConfigError:
    return ConfigError(f"model.backbone: '{name}' has no [cls]-token ViT image tower; TeMu-IQA needs one "
                       "(e.g. ViT-L-14, ViT-B-16, ViT-B-32)")


def create_clip(cfg: ModelConfig, seed: int = 0, drawn_at: tuple[int, int] | None = None) -> nn.Module:
    """An open_clip model (fp32, CPU), or a one-line error saying what to do. Pretrained weights keep their own grid
    of positional embeddings (Backbone resizes them once, to whatever input comes); a random initialisation is drawn,
    seeded, at the input size `drawn_at` (default: the configured one) and then treated as weights with that grid, so a
    saved run reloads onto the very same backbone at any input size.
    """
    name = open_clip_name(cfg.backbone)
    _check_name(name)
    pretrained = cfg.pretrained
    file, torchscript, quick_gelu = pretrained_weights(cfg)
    # open_clip would resize pretrained positions to the configured size, and Backbone would resize that copy again for
    # any other input size (KADID-10k's native 384x512): a second bicubic pass over already resampled values.
    kwargs = {"weights_only": not torchscript, "force_image_size": None if pretrained else drawn_at or cfg.image_hw(),
              "force_quick_gelu": quick_gelu}
    hub = _hub_file(open_clip.get_pretrained_cfg(name, pretrained)) if pretrained and file is None and ":" not in name \
        else None
    try:
        # open_clip asks the Hub before it looks in the cache, and with no network huggingface_hub retries for about
        # 46 s first: its own lookup, with the Hub switched off, finds weights already downloaded at once.
        model = _create(name, pretrained, seed, torchscript, kwargs, hub_offline=True) if hub else None
        if model is None:
            if hub and (why := _hub_unreachable(*hub)) is not None:
                raise _cannot_fetch(name, pretrained, quick_gelu, why, hub)
            model = _create(name, str(file) if file else pretrained, seed, torchscript, kwargs)
    except RuntimeError as e:
        if pretrained and file is None and "download" in str(e).lower():
            raise _cannot_fetch(name, pretrained, quick_gelu, hub=hub) from None
        raise
    visual = model.visual
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.pool_type != "tok":
        raise _no_cls_vit(name)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _create(name: str, pretrained: str | None, seed: int, torchscript: bool, kwargs: dict,
            hub_offline: bool = False) -> nn.Module | None:
    """open_clip.create_model, seeded; with `hub_offline`, as HF_HUB_OFFLINE=1 would run it: None where a tag's weights
    are not in the local cache."""
    # Random weights asked for (model.pretrained null on an open_clip name; an hf-hub: one would be a failed fetch).
    asked_random = pretrained is None and ":" not in name
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), \
            _root_log_without(_not_random_weights_warning) if asked_random else nullcontext():
        if torchscript:
            # torch announces that it hands the archive to torch.jit.load, and that TorchScript is deprecated: the
            # archive is only read for its weights.
            warnings.filterwarnings("ignore", "'torch.load' received a zip file that looks like a TorchScript")
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
        torch.manual_seed(seed)
        if not hub_offline:
            return open_clip.create_model(name, pretrained=pretrained, **kwargs)
        # huggingface_hub reads the switch at each request, and has no narrower one that open_clip passes on (nothing
        # here asks the Hub from another thread meanwhile). A miss is no error yet: open_clip's log line saying its
        # download failed is held back.
        was = huggingface_hub.constants.HF_HUB_OFFLINE
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        try:
            with _root_log_without(_no_download_error):
                return open_clip.create_model(name, pretrained=pretrained, **kwargs)
        except RuntimeError as e:
            if "download" in str(e).lower():
                return None
            raise
        finally:
            huggingface_hub.constants.HF_HUB_OFFLINE = was


@contextmanager
def _root_log_without(keep: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    # open_clip logs on the root logger itself, which is where a filter sees its records.
    logging.getLogger().addFilter(keep)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(keep)


def _no_download_error(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to download weights")


def _not_random_weights_warning(record: logging.LogRecord) -> bool:
    """Not open_clip's warning of random weights, where the config asked for them (the demo's every command printed
    it): train and predict say what they mean for the scores."""
    return not record.getMessage().startswith("No pretrained weights loaded for model")


def _hub_file(tag_cfg: dict) -> tuple[str, str] | None:
    """The Hub repo and weights file of a pretrained tag; None where open_clip does not fetch them from the Hub."""
    hub = tag_cfg.get("hf_hub", "")
    if not hub or "file" in tag_cfg or not open_clip.pretrained.has_hf_hub():
        return None
    repo, _, filename = hub.rpartition("/")  # 'org/name/' means open_clip's default file name
    return repo, filename or open_clip.constants.HF_WEIGHTS_NAME


def weights_cached(name: str, tag: str) -> bool | None:
    """Whether an open_clip tag's weights (`name`: as open_clip_name gives it) are in the Hugging Face cache already,
    where a node without network loads them from, looked up without a request; None for a tag not fetched from the
    Hub."""
    if (hub := _hub_file(open_clip.get_pretrained_cfg(name, tag))) is None:
        return None
    repo, filename = hub
    # open_clip takes a .safetensors file in place of a .bin one where the repo has it.
    safe = open_clip.constants.HF_SAFE_WEIGHTS_NAME if filename == open_clip.constants.HF_WEIGHTS_NAME \
        else str(Path(filename).with_suffix(".safetensors"))
    return any(isinstance(huggingface_hub.try_to_load_from_cache(repo, f), str) for f in (safe, filename))


def weights_said(cfg: ModelConfig) -> str:
    """The backbone's weights as --check says them, checked (pretrained_weights), with whether a tag's are cached."""
    file, _, _ = pretrained_weights(cfg)
    # open_clip takes an hf-hub: or local-dir: model's weights from where it names, whatever model.pretrained says.
    if ":" in cfg.backbone:
        return "its own weights"
    if cfg.pretrained is None:
        return "random weights"
    cached = None if file else weights_cached(open_clip_name(cfg.backbone), cfg.pretrained)
    return f"weights {cfg.pretrained}" + {True: " (in the Hugging Face cache)", None: "",
                                          False: " (not in the Hugging Face cache: fetched from the Hub as the run "
                                                 "starts, which a node without network cannot)"}[cached]


def _hub_unreachable(repo: str, filename: str) -> str | None:
    """Why the Hub cannot be reached, or None where it can. One HEAD request, as hf_hub_download's own first one (its
    etag timeout, no retries): with no network, hf_hub_download retries 5 times with backoff, for each of the 2 files
    open_clip tries (about 46 s)."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo, filename),
                                             timeout=huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError:
        return None  # the Hub answered (no such file, a gated repo, a server error): open_clip's download goes on
    except Exception as e:  # noqa: BLE001 - no answer at all; its type depends on huggingface_hub's HTTP client
        return f"offline? no answer from the Hub: {error_line(e)}"
    return None


def _cannot_fetch(name: str, tag: str, quick_gelu: bool, why: str = "offline?",
                  hub: tuple[str, str] | None = None) -> ConfigError:
    what = f"{hub[1]} of huggingface.co/{hub[0]}" if hub else "them"
    return ConfigError(
        f"model.pretrained: could not fetch '{tag}' weights for {name} ({why}): download {what} once where there is a "
        f"network, then pass the file: model.pretrained=/path/to/{name}.bin model.quick_gelu={str(quick_gelu).lower()}"
        "; or copy that machine's Hugging Face cache (HF_HUB_CACHE) here")


def names_a_file(pretrained: object) -> bool:
    """Whether model.pretrained reads as a checkpoint path rather than an open_clip tag (the file may be elsewhere)."""
    return isinstance(pretrained, str) and ("/" in pretrained
                                            or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")))


def pretrained_weights(cfg: ModelConfig) -> tuple[Path | None, bool, bool]:
    """model.pretrained's checkpoint file (None for a tag or random weights), whether it is a TorchScript archive, and
    whether the towers take QuickGELU, from the file's index alone (no weights read): a tag open_clip does not know
    for the model, a file not there, or a state dict without model.quick_gelu is refused."""
    name, pretrained = open_clip_name(cfg.backbone), cfg.pretrained
    is_file = pretrained is not None and Path(pretrained).expanduser().is_file()
    if pretrained is not None and not is_file and ":" not in name:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            what = "checkpoint file not found" if names_a_file(pretrained) else "unknown pretrained tag"
            raise ConfigError(f"model.pretrained: {what} '{pretrained}' for {name}; known tags: "
                              f"{', '.join(tags) or 'none'}, or pass a local checkpoint path")
    file = Path(pretrained).expanduser() if is_file else None
    # OpenAI's own release (the `clip` package's ~/.cache/clip/*.pt) is a TorchScript archive, which torch loads only
    # with weights_only off.
    torchscript = file is not None and _is_torchscript(file)
    return file, torchscript, _quick_gelu(cfg, name, file, torchscript)


def open_clip_name(name: str) -> str:
    """model.backbone as open_clip's registries know it: OpenAI's own spelling, ViT-B/32, is open_clip's ViT-B-32 (its
    tags and the activation its weights want are looked up by that name)."""
    return name if ":" in name else name.replace("/", "-")


def _quick_gelu(cfg: ModelConfig, name: str, file: Path | None, torchscript: bool) -> bool:
    """Whether to build the towers with QuickGELU. OpenAI's weights were trained with it, and GELU in its place
    silently degrades them; nothing in a state dict says which activation its weights were trained with."""
    if cfg.quick_gelu != "auto":
        return cfg.quick_gelu
    if file is None:
        return bool(cfg.pretrained and open_clip.get_pretrained_cfg(name, cfg.pretrained).get("quick_gelu", False))
    if name.endswith("-quickgelu") or ":" in name:
        return False  # the model's own config already says QuickGELU, or holds its activation (hf-hub:, local-dir:)
    if torchscript:
        return True  # OpenAI's own release
    raise ConfigError(f"model.quick_gelu: say true or false for {file}: a state dict does not record the activation "
                      "its weights were trained with (OpenAI's CLIP weights: true; LAION's and DataComp's: false)")


def _is_torchscript(file: Path) -> bool:
    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as archive:
        # As torch tells one: constants.pkl in the archive's one top folder (deeper, it could be any zip).
        return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in archive.namelist())


def layer_indices(spec: str, num_layers: int) -> list[int]:
    """0-based block indices for `all`, `upto:K` (blocks 1..K) or `only:K` (block K)."""
    if spec == "all":
        return list(range(num_layers))
    kind, k = spec.split(":")
    k = int(k)
    if k > num_layers:
        raise ConfigError(f"model.layers: {spec} asks for layer {k} but the backbone has {num_layers} layers")
    return list(range(k)) if kind == "upto" else [k - 1]


class SelfAttention(nn.Module):
    """A frozen nn.MultiheadAttention's unmasked self-attention, with its weights, through scaled_dot_product_attention.

    Written here because nn.MultiheadAttention's inference path runs attention as plain matmuls on CPU (1.5x slower
    than SDPA's fused kernel at 1025 tokens, fp32); SDPA picks a fused kernel on CPU and GPU alike.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha.batch_first or mha.in_proj_weight is None:
            raise ConfigError("model.backbone: this image tower's attention layout is not supported (needs open_clip's "
                              "batch-first, packed-projection attention)")
        self.heads = mha.num_heads
        # The packed q, k, v projection as a module of its own, so model.tower_fp8 swaps it as it does the others
        # (made on the meta device: no initialisation drawn from the global generator, then the tower's own weights).
        self.in_proj = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None, device="meta")
        self.in_proj.weight, self.in_proj.bias = mha.in_proj_weight, mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query or attn_mask is not None:
            raise ValueError("SelfAttention takes unmasked self-attention only")
        b, n, d = query.shape
        q, k, v = self.in_proj(query).view(b, n, 3, self.heads, -1).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), None


QUICK_GELU_SCALE = 1.702  # open_clip's QuickGELU: x * sigmoid(1.702 * x)


def quick_gelu_as_silu(mlp: nn.Sequential) -> None:
    """Rewrites an MLP's QuickGELU, h * sigmoid(1.702 h), as SiLU(1.702 h) / 1.702 with the 1.702 folded into c_fc
    and its inverse into c_proj (in fp32, before any cast), exact up to rounding.

    Without torch.compile, QuickGELU is three kernels (multiply, sigmoid, multiply: 21.6 ms of a 137 ms ViT-L-14
    step on an H200) where SiLU is one, as GELU is.
    """
    with torch.no_grad():
        mlp.c_fc.weight.mul_(QUICK_GELU_SCALE)
        mlp.c_fc.bias.mul_(QUICK_GELU_SCALE)
        mlp.c_proj.weight.div_(QUICK_GELU_SCALE)
    mlp.gelu = nn.SiLU()


class PatchEmbed(nn.Module):
    """A ViT's patch-embedding convolution (kernel = stride, no padding) as one matmul over the unfolded patches, plus
    the patches' positional embeddings, resized to the grid of whatever image comes in.

    Written here because cuDNN's choice for the 14x14, stride-14 bf16 convolution on an H100 is a kernel without tensor
    cores (4 ms of a 130 ms ViT-L-14 step at 448); as a matmul it is an ordinary tensor-core GEMM. The positions are
    added here, not by open_clip, because open_clip's tower takes one input size only; here a model built at 448 also
    scores KADID-10k at its native 384x512, as the seed evaluates it. Every grid's positions are the weights' own
    (`source`, on `grid`) resized once, bicubically with antialiasing, as open_clip resizes them for a new input
    size; those of the model's input size (`size`, height and width) are resized once, here.
    Returns [B, width, gh, gw] as a view of [B, gh, gw, width], so open_clip's flattening into tokens is free.
    """

    def __init__(self, conv: nn.Conv2d, positions: torch.Tensor, grid: tuple[int, int],
                 size: tuple[int, int] | None = None):
        super().__init__()
        if conv.kernel_size != conv.stride or conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ConfigError("model.backbone: this image tower's patch embedding is not a plain kernel=stride "
                              "convolution")
        self.patch = conv.kernel_size
        self.weight, self.bias = conv.weight, conv.bias
        self.register_buffer("source", positions.detach().reshape(*grid, -1).clone(), persistent=False)
        self.register_buffer("positions", self._resized(*(self.grid_of(*size) if size else grid)), persistent=False)

    def grid_of(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid of an input of this size (a remainder short of a whole patch is left out)."""
        return height // self.patch[0], width // self.patch[1]

    def _resized(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.source
        if pos.shape[:2] != (gh, gw):
            grid = pos.permute(2, 0, 1).unsqueeze(0).float()
            pos = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
            pos = pos[0].permute(1, 2, 0).to(self.source.dtype)
        return pos

    def positions_for(self, gh: int, gw: int) -> torch.Tensor:
        """[gh * gw, width] positional embeddings of a gh x gw grid."""
        pos = self.positions if self.positions.shape[:2] == (gh, gw) else self._resized(gh, gw)
        return pos.reshape(gh * gw, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ph, pw = self.patch
        gh, gw = self.grid_of(h, w)
        patches = x[:, :, :gh * ph, :gw * pw].reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
        out = F.linear(patches.reshape(b, gh * gw, c * ph * pw), self.weight.flatten(1), self.bias)
        out = out + self.positions_for(gh, gw)
        return out.view(b, gh, gw, -1).permute(0, 3, 1, 2)


class Backbone(nn.Module):
    """Frozen ViT tower returning raw [cls] and patch tokens of the selected layers, plus the frozen joint-space head.

    Blocks after the last selected layer are pruned (never computed). `ln_post` and `proj` are kept apart so
    gradients can pass through them to trainable modules in front while the tower itself runs without autograd. They
    run in the tower's dtype: projecting every patch token of every layer is about 5% of the FLOPs of ViT-L-14, and
    in fp32 (no tensor cores) it would take most of the time the bf16 tower takes.
    """

    def __init__(self, clip: nn.Module, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        visual = clip.visual
        self.num_layers = len(visual.transformer.resblocks)
        self.indices = layer_indices(cfg.layers, self.num_layers)
        self.ln_post = copy.deepcopy(visual.ln_post).to(dtype)
        self.register_buffer("proj", visual.proj.detach().clone().to(dtype), persistent=False)
        self.visual = copy.deepcopy(visual)
        self.visual.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        # The patches' positions move into PatchEmbed (any input size); the [cls] token's into its embedding. What
        # open_clip still adds is one zero row, broadcast over however many tokens there are.
        positions = self.visual.positional_embedding.detach()
        self.visual.conv1 = PatchEmbed(self.visual.conv1, positions[1:], tuple(visual.grid_size), cfg.image_hw())
        self.grid = self.grid_of(*cfg.image_hw())  # the configured input's
        with torch.no_grad():
            self.visual.class_embedding += positions[0]
        self.visual.positional_embedding = nn.Parameter(torch.zeros_like(positions[:1]))
        for block in self.visual.transformer.resblocks:
            block.attn = SelfAttention(block.attn)
            # Only the plain fc -> activation -> fc MLP: a norm in between (open_clip's scale_fc) would undo the scale.
            layout = [name for name, _ in block.mlp.named_children()]
            if layout == ["c_fc", "gelu", "c_proj"] and isinstance(block.mlp.gelu, QuickGELU):
                quick_gelu_as_silu(block.mlp)
        self.visual.to(dtype)
        if cfg.tower_fp8:
            if dtype != torch.bfloat16:
                raise ConfigError("model.tower_fp8: the fp8 tower writes bf16; set model.precision=bf16 (auto is "
                                  "bf16 on a GPU only), or model.tower_fp8=false")
            linears_to_fp8(self.visual.transformer)
        self.dtype = dtype
        self.width = visual.transformer.width
        self.embed_dim = visual.proj.shape[1]
        pp = visual.preprocess_cfg
        self.mean, self.std = tuple(pp["mean"]), tuple(pp["std"])
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def num_selected(self) -> int:
        return len(self.indices)

    def grid_of(self, height: int, width: int) -> tuple[int, int]:
        return self.visual.conv1.grid_of(height, width)

    def tokens_bytes(self, height: int, width: int) -> int:
        """The size of one image's output of forward at this input size: each selected layer's [cls] and patches."""
        gh, gw = self.grid_of(height, width)
        return self.num_selected * (gh * gw + 1) * self.width * self.dtype.itemsize

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen means frozen: dropout and friends stay in eval mode whatever the trainer asks.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> cls [B, S, width], patches [B, S, N, width] (tower dtype), S selected layers.
        Without autograd, unless the images require grad (a score used as a loss): then only towards them."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            out = self.visual.forward_intermediates(
                images.to(self.dtype), indices=self.indices, stop_early=True, output_fmt="NLC",
                output_extra_tokens=True, intermediates_only=True)
        patches = torch.stack(out["image_intermediates"], dim=1)
        cls = torch.cat(out["image_intermediates_prefix"], dim=1)
        return cls, patches

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen ln_post and proj into the joint image-text space (not normalised), in the tower's dtype."""
        return self.ln_post(tokens.to(self.dtype)) @ self.proj
