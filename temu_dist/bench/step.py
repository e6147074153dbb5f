"""step: images/s and model FLOPs utilisation (MFU) of the training step, for TeMu-IQA-S and -I with each prompt mode,
on whatever device is present; random weights (throughput does not depend on them).

The step is the trainer's own without gradient accumulation: `loss_fn` (MSE + PLCC over the batch and its locally
distorted copies, CW-SSIM fidelity on the device), backward and Adam, on a batch already on the device (the data
stream is the `data` suite's business). Accumulated with PLCC over the step (train.plcc_over), each micro-batch's head
runs twice, its tower once. With LDG at p=1 every sample enters the tower twice, so a global batch of 32 is 64 tower
images.

MFU = achieved FLOPs/s over the device's dense bf16 datasheet peak (none for fp32 or CPUs). `mfu` counts the frozen
image tower's forward only (as the issue defines it); `mfu_all` adds the text passes of CoOp/CoCoOp. `gemm_tflops` is
a large square matmul measured in the same dtype on the same device: the practical ceiling next to the datasheet's.

With `--profile N`, one more step of each row runs under torch.profiler: its N costliest operations (on a GPU,
kernels) by self time, and on a GPU the share of the step's wall time that kernels kept the device busy, so one device
run says where an MFU short of the target goes.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import time

import torch
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from temu_dist.bench.common import device_name, now, sig, sync, timed
from temu_dist.config import Config, ConfigError, load_config
from temu_dist.data.ldg import sample_region
from temu_dist.model.backbone import Backbone, compute_dtype, create_clip
from temu_dist.model.flops import step_flops
from temu_dist.model.fp8 import E4M3, check_fp8, fp8_matmul, quantize_rows
from temu_dist.model.temu import build_model, resolve_device
from temu_dist.optim import make_optimizer
from temu_dist.train import loss_fn

# Datasheet dense (no sparsity) tensor-core peaks, TFLOP/s, bf16 with fp32 accumulation. Matched in order against
# torch.cuda.get_device_name(); the first name that is a substring wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("RTX A6000", 154.8), ("L40S", 362.1),
    ("L40", 181.0), ("A40", 149.7), ("RTX 6000 Ada", 364.2), ("RTX 4090", 165.2),
]


def datasheet_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def gemm_tflops(device: torch.device, dtype: torch.dtype, repeat: int = 5) -> float:
    """Best achieved TFLOP/s of an n x n matmul (n = 8192 on GPU; on CPU the first of 256, 512, 1024, 2048 to take
    0.1 s: a CPU without bf16 instructions ran 2048 at 1.3 GFLOP/s, 13 s a matmul); for torch.float8_e4m3fn, the
    fp8 tower's (rowwise scales, bf16 out)."""
    for n in (8192,) if device.type == "cuda" else (256, 512, 1024, 2048):
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        if dtype == E4M3:
            (a, scale_a), (b, scale_b) = quantize_rows(a), quantize_rows(b)
            mm = functools.partial(fp8_matmul, a, scale_a, b, scale_b.t())
        else:
            mm = functools.partial(torch.matmul, a.to(dtype), b.to(dtype))
        mm()  # warm-up
        if timed(lambda: (mm(), sync(device)), 1) >= 0.1:
            break
    return 2 * n ** 3 / timed(lambda: (mm(), sync(device)), repeat) / 1e12


def fp8_figures(config: Config, device: torch.device, images: int = 8) -> dict:
    """The fp8 matmul's ceiling on this device, and how far the fp8 tower's tokens lie from the bf16 tower's on the
    same (random) weights: relative RMS error of each selected layer's patch tokens, and the worst layer's."""
    try:
        check_fp8(device, compiled=True)
    except ConfigError as e:
        return {"fp8_error": str(e)}
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(images, 3, *config.model.image_hw(), generator=generator).to(device)
    clip = create_clip(config.model, config.seed)
    patches = {}
    for fp8 in (False, True):
        cfg = config.model.model_copy(update={"tower_fp8": fp8})
        with torch.no_grad():
            patches[fp8] = Backbone(clip, cfg, torch.bfloat16).to(device)(x)[1].float()
    ref = patches[False]
    rel = ((patches[True] - ref).pow(2).mean(dim=(0, 2, 3)) / ref.pow(2).mean(dim=(0, 2, 3))).sqrt()
    return {"fp8_gemm_tflops": sig(gemm_tflops(device, E4M3)), "fp8_tokens_rel_rms": [sig(v) for v in rel.tolist()],
            "fp8_tokens_rel_rms_worst": sig(rel.max().item())}


def synthetic_batch(config: Config, batch: int, device: torch.device, generator: torch.Generator) -> dict:
    """A batch as the loader gives it, on the device: uint8 images, each with a locally distorted copy."""
    h, w = config.model.image_hw()
    image = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=generator)
    ldg_image = image.clone()
    for i in range(batch):
        top, left, rh, rw = sample_region(h, w, config.ldg.region_min, config.ldg.region_max)
        ldg_image[i, :, top:top + rh, left:left + rw] = torch.randint(0, 256, (3, rh, rw), dtype=torch.uint8,
                                                                      generator=generator)
    return {"image": image.to(device), "ldg_image": ldg_image.to(device), "ldg": torch.ones(batch, dtype=torch.bool),
            "mos": torch.rand(batch, generator=generator).to(device), "name": [str(i) for i in range(batch)]}


def top_ops(step, device: torch.device, n: int) -> dict:
    """One step under torch.profiler: its n costliest operations by self time (on a GPU: kernels, device time), and
    on a GPU how busy kernels kept the device over the step's wall time."""
    gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]) as prof:
        start = time.perf_counter()
        step()
        sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    self_us = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    events = sorted((e for e in prof.key_averages()
                     if self_us(e) > 0 and (not gpu or e.device_type == DeviceType.CUDA)), key=self_us, reverse=True)
    total = sum(self_us(e) for e in events)
    out = {"ops": [{"op": e.key[:100], "calls": e.count, "self_ms": round(self_us(e) / 1e3, 3),
                    "share": round(self_us(e) / total, 3)} for e in events[:n]]}
    if gpu:
        out["device_busy"] = round(total / wall_us, 3)
    return out


# The attention kernels that --sdpa can force (default: torch's own choice).
SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def forced_attention(attention: str) -> contextlib.ExitStack:
    """Every scaled_dot_product_attention call (the image tower's, and the text tower's for CoOp/CoCoOp) on the kernel
    `attention` names, with inductor's caches off: they key a graph without the SDPA flags, so a compiled row would
    run a graph traced for another kernel. "default": torch's own choice."""
    stack = contextlib.ExitStack()
    if attention != "default":
        stack.enter_context(sdpa_kernel(SDPA[attention]))
        stack.enter_context(torch._inductor.config.patch(force_disable_caches=True))
    return stack


def measure(config: Config, batch: int, steps: int, warmup: int, device: torch.device, profile_top: int = 0,
            attention: str = "default") -> dict:
    """Seconds per training step (the median of `steps` after `warmup`), images/s, FLOPs and peak memory; the steps
    (and the compile, in the first) on the attention kernel `attention` names."""
    model = build_model(config, device).train()
    optimizer = make_optimizer(model, config)
    stats = (model.backbone.mean, model.backbone.std)
    data = synthetic_batch(config, batch, device, torch.Generator().manual_seed(0))

    def step() -> None:
        loss = loss_fn(model, data, config, device, stats)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Not around the build: a model without prompt tuning encodes its prompts then, on the CPU, which a GPU's
    # kernels (cuDNN's, the memory-efficient one) do not serve.
    with forced_attention(attention):
        start = time.perf_counter()  # the warm-up holds any compile
        for _ in range(warmup):
            step()
        sync(device)
        warmup_s = time.perf_counter() - start
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - start)
        profiled = top_ops(step, device, profile_top) if profile_top else None
    seconds = sorted(times)[len(times) // 2]  # the median: one slow step (a GC, a page fault) does not count
    tower_images = 2 * batch
    flops = step_flops(model, tower_images)
    # The fastest and slowest timed step: how far apart two rows' medians must be to tell them apart.
    row = {"step_s": round(seconds, 4), "step_s_range": [round(min(times), 4), round(max(times), 4)],
           "samples_per_s": sig(batch / seconds),
           "tower_images_per_s": sig(tower_images / seconds), "warmup_s": round(warmup_s, 1),
           "image_gflops_per_image": sig(flops.image_forward / tower_images / 1e9),
           "text_gflops_per_step": sig(flops.text / 1e9),
           "image_tflops_per_s": sig(flops.image_forward / seconds / 1e12),
           "all_tflops_per_s": sig(flops.total / seconds / 1e12), "trainable": model.num_trainable()}
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    if profiled is not None:
        row["profile"] = profiled
    return row


def run(backbone: str, image_size: int, batch: int, steps: int, warmup: int, precision: str, modes: list[str],
        variants: list[str], prompts: list[str], peak_tflops: float | None, profile_top: int = 0,
        towers: tuple[str, ...] = ("plain",), sdpa: tuple[str, ...] = ("default",)) -> dict:
    """`modes`: "eager" and/or torch.compile modes (model.compile_mode); `towers`: "plain" (the tower in `precision`'s
    dtype) and/or "fp8" (model.tower_fp8, bf16 around it); `sdpa`: "default" and/or an attention kernel forced
    (forced_attention); a row for each with each variant and prompt, so one run compares them on the same machine. A
    row's "tower" says which ran: bf16, fp32 or fp8."""
    device = resolve_device("auto")
    base = [f"model.backbone={backbone}", "model.pretrained=null", f"model.image_size={image_size}",
            f"model.precision={precision}", "ldg.p=1.0", f"train.batch_size={batch}"]
    dtype = compute_dtype(precision, device)
    gemm = gemm_tflops(device, dtype)
    peak = peak_tflops or datasheet_peak(device, dtype)
    result = {"suite": "step", "device": device_name(device), "torch": torch.__version__, "date": now(),
              "backbone": backbone, "image_size": image_size, "global_batch": batch, "dtype": str(dtype),
              "gemm_tflops": sig(gemm),
              "peak_tflops": peak, "peak_source": "given" if peak_tflops else "datasheet" if peak else None,
              "rows": []}
    if "fp8" in towers:
        result.update(fp8_figures(load_config(None, [*base, "model.precision=bf16"]), device))
    for mode, tower, attention, variant, prompt in itertools.product(modes, towers, sdpa, variants, prompts):
        compiled = ["model.compile=false"] if mode == "eager" else ["model.compile=true", f"model.compile_mode={mode}"]
        fp8 = ["model.tower_fp8=true", "model.precision=bf16"] if tower == "fp8" else []
        config = load_config(None, [*base, *compiled, *fp8, f"model.variant={variant}", f"model.prompt={prompt}"])
        # Each model is compiled afresh: dynamo's cache of the same forward would fill up and fall back to eager.
        torch._dynamo.reset()
        row = {"variant": variant, "prompt": prompt, "mode": mode,
               "tower": tower if tower == "fp8" else "bf16" if dtype == torch.bfloat16 else "fp32", "sdpa": attention}
        try:
            row.update(measure(config, batch, steps, warmup, device, profile_top, attention))
        except Exception as e:  # noqa: BLE001 - one failing mode or variant must not lose the rows of a device run
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        if "step_s" in row:
            # Significant digits, not decimals: a small model on a CPU runs at a few thousandths of a given peak.
            row["mfu_of_gemm"] = sig(row["image_tflops_per_s"] / gemm)
            if peak:
                row["mfu"] = sig(row["image_tflops_per_s"] / peak)
                row["mfu_all"] = sig(row["all_tflops_per_s"] / peak)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timed_rows = [r for r in result["rows"] if "step_s" in r]

    def key(r: dict) -> str:
        return " ".join([r["variant"], r["mode"], r["tower"], *([] if r["sdpa"] == "default" else [r["sdpa"]])])

    coop = {key(r): r["step_s"] for r in timed_rows if r["prompt"] == "coop"}
    result["cocoop_over_coop"] = {key(r): round(r["step_s"] / coop[key(r)], 3) for r in timed_rows
                                  if r["prompt"] == "cocoop" and key(r) in coop}
    return result
