"""One process or many: the Accelerator, and how a global batch splits into per-process micro-batches."""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, parse_flag_from_env

from temu_dist.config import Config, ConfigError, differ, dump, flatten
from temu_dist.model.temu import resolve_device


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    per_device: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.accumulation * self.world_size


def batch_plan(global_batch: int, per_device: int | None, world_size: int) -> BatchPlan:
    """The global batch stays what the config says whatever the number of processes."""
    per_device = per_device or global_batch // world_size
    if per_device < 1 or global_batch % (per_device * world_size):
        raise ConfigError(f"train.batch_size: {global_batch} is not a multiple of {world_size} processes x "
                          f"train.per_device_batch {per_device}")
    return BatchPlan(world_size, per_device, global_batch // (per_device * world_size))


def process_group_kwargs(config: Config, world_size: int, cuda: bool) -> list[InitProcessGroupKwargs]:
    """accelerate's process-group settings: train.timeout_min whatever the backend. Without CUDA, processes talk over
    gloo; DeepSpeed in particular needs it said explicitly. A single process has no process group, and accelerate
    fails if told its backend."""
    if world_size == 1:
        return []
    timeout = timedelta(minutes=config.train.timeout_min)
    if timeout == InitProcessGroupKwargs().timeout:
        # accelerate passes on only what differs from its own default, 10 minutes: that would leave torch's (gloo: 30).
        timeout += timedelta(milliseconds=1)
    return [InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timeout)]


def keep_buffers_in_place(model: torch.nn.Module) -> None:
    """A DDP-wrapped model's buffers are constants (the fp8 tower's weights among them, 300 MB for ViT-L-14): DDP
    would broadcast them from process 0 before every forward. Set on the wrapped model, not as DDP's keyword: that
    would also skip their sync when DDP wraps, and torch 2.14 warns that the keyword is deprecated."""
    ddp = getattr(model, "_orig_mod", model)  # under accelerate's dynamo backend, DDP inside the compiled wrapper
    if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        ddp.broadcast_buffers = False


def _no_gpu() -> bool:
    if torch.cuda.is_available():
        return False
    # accelerate imports DeepSpeed (where installed) to unwrap models; told the device, it does not warn that it found
    # no GPU on every process.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return True


def eval_accelerator() -> Accelerator:
    """For scoring outside train() (the evaluate verb): the launched processes as one group on CPU too, which
    accelerate makes only when told it runs on CPU; else each process would score every set on its own."""
    return Accelerator(cpu=_no_gpu())


def make_accelerator(config: Config) -> tuple[Accelerator, BatchPlan]:
    # Launchers (accelerate, torchrun, deepspeed) say the world size before any process group exists.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    handlers = process_group_kwargs(config, world_size, torch.cuda.is_available())
    plan = batch_plan(config.train.batch_size, config.train.per_device_batch, world_size)
    # accelerate treats several CPU processes as one group only when told it runs on CPU; launchers other than
    # `accelerate launch` (Ray Train, torchrun) do not say so. DeepSpeed refuses the flag and finds the group itself.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and parse_flag_from_env("ACCELERATE_USE_CPU"):
        # accelerate would quietly run plain data parallel instead, with none of the DeepSpeed checks below.
        raise ConfigError("ACCELERATE_USE_CPU=true turns DeepSpeed off: unset it for a DeepSpeed launch file "
                          "(DeepSpeed finds the CPU without it)")
    on_cpu = (_no_gpu() or config.device == "cpu") and not deepspeed
    resolve_device(config.device)  # device=cuda with a broken CUDA would otherwise train for hours on the CPU
    _take_accumulation_from_the_config(plan)
    accelerator = Accelerator(cpu=on_cpu, gradient_accumulation_steps=plan.accumulation, kwargs_handlers=handlers)
    if config.model.precision == "fp16" and accelerator.mixed_precision == "bf16":
        # Autocast would cast the fp16 tower's weights to bf16 in every matmul, each step.
        raise ConfigError("model.precision=fp16 under the launch file's mixed_precision bf16 runs the tower in bf16: "
                          "launch with --mixed_precision fp16 (or no)")
    if accelerator.state.deepspeed_plugin is not None:
        _check_deepspeed(accelerator)
        # Our loaders stay out of prepare(), so DeepSpeed cannot read the micro-batch from them.
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = plan.per_device
        ds["train_batch_size"] = plan.global_batch
        ds["gradient_accumulation_steps"] = plan.accumulation
        deepspeed_clipping(ds, config)
    return accelerator, plan


def deepspeed_clipping(ds: dict, config: Config) -> None:
    """DeepSpeed's engine clips at train.grad_clip_norm, as the trainer does under every other launcher. accelerate
    passes the launch file's gradient_clipping on only when it is non-zero, and DeepSpeed then clips at its default of
    1.0: the same config would train differently here."""
    launched, asked = ds.get("gradient_clipping", "auto"), config.train.grad_clip_norm
    if launched != "auto" and float(launched) != asked:
        raise ConfigError(f"train.grad_clip_norm: {asked}, where the launch file's deepspeed_config asks for "
                          f"gradient_clipping {launched}: set train.grad_clip_norm={launched} and leave the launch "
                          "file's at 0.0, so that the config says how every launcher clips")
    ds["gradient_clipping"] = asked


def _take_accumulation_from_the_config(plan: BatchPlan) -> None:
    """`accelerate launch --gradient_accumulation_steps N` (read for DeepSpeed launches) is not what a run does:
    train.batch_size and train.per_device_batch plan its accumulation, and the flag went without a word. A value the
    plan does not have is refused; any is dropped, so that accelerate cannot set it over the plan's."""
    launched = os.environ.pop("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", None)
    if launched in (None, "1", str(plan.accumulation)):
        return
    steps = int(launched) if launched.isdigit() else 0
    per_device = plan.global_batch // (plan.world_size * steps) if steps else 0
    how = f"train.per_device_batch={per_device}" if per_device and plan.global_batch % (plan.world_size * steps) == 0 \
        else "train.per_device_batch (train.batch_size / processes / steps)"
    raise ConfigError(f"--gradient_accumulation_steps {launched} (the launcher's): train.batch_size "
                      f"{plan.global_batch} is {plan.per_device} per process x {plan.accumulation} accumulated x "
                      f"{plan.world_size} process(es); leave the flag out and give {how} for {launched} steps")


def _check_deepspeed(accelerator: Accelerator) -> None:
    """What our checkpoints and frozen fp32 head can run under DeepSpeed: ZeRO stage 0, no DeepSpeed mixed precision.

    ZeRO 1-3 partition the optimiser state, which trainer.pt cannot resume; DeepSpeed's bf16/fp16 casts the whole
    module, the fp32 projection head included. Neither buys anything for a few MB of trainable weights, and the
    frozen towers already run in bf16 on GPU (model.precision)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin.zero_stage != 0:
        raise ConfigError(f"DeepSpeed ZeRO stage {plugin.zero_stage}: only stage 0 is supported "
                          "(launch/deepspeed.yaml)")
    if accelerator.mixed_precision != "no":
        raise ConfigError(f"DeepSpeed with mixed_precision {accelerator.mixed_precision}: use 'no' (the frozen towers "
                          "run in bf16 on GPU anyway, model.precision=auto)")


def check_processes_agree(config: Config, accelerator: Accelerator) -> None:
    """Every process trains the same config, in an out_dir they all see. Nodes started with other overrides would
    train apart under one run's name, or wait on a collective that never matches; an out_dir private to one node
    keeps checkpoints that the others, or a requeued job on other nodes, never find. Each process raises the same
    one-line error, so all stop alike."""
    if accelerator.num_processes == 1:
        return
    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    broadcast_object_list(token)
    probe = Path(config.out_dir) / f".temu-shared-{token[0]}"
    if accelerator.is_main_process:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
    accelerator.wait_for_everyone()
    seen = gather_object([(probe.is_file(), flatten(dump(config)), socket.gethostname())])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [(rank, host) for rank, (sees, _, host) in enumerate(seen) if not sees]
    if blind:
        where = ", ".join(sorted({host for _, host in blind}))
        ranks = f"rank {blind[0][0]}{', ...' * (len(blind) > 1)}"
        raise ConfigError(f"out_dir: {len(blind)} process(es) on {where} ({ranks}) do not see the file process 0 "
                          f"wrote in {seen[0][1]['out_dir']} (on {seen[0][2]}): the run folder must lie on a "
                          "filesystem every node shares")
    # Tracking is process 0's alone, and a repeat's parent run is made there only.
    ours = {k: v for k, v in seen[0][1].items() if not k.startswith("tracking.")}
    for rank, (_, theirs, host) in enumerate(seen[1:], 1):
        theirs = {k: v for k, v in theirs.items() if not k.startswith("tracking.")}
        key = next((k for k in sorted(set(ours) | set(theirs)) if differ(k, ours.get(k), theirs.get(k))), None)
        if key:
            raise ConfigError(f"{key}: process {rank} (on {host}) was given {theirs.get(key)!r}, process 0 "
                              f"{ours.get(key)!r}: start every node with the same config and overrides")
