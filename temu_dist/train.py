"""Train TeMu-IQA: `train(config) -> results`, the one entry point of `accelerate launch`, plain python, the tests and
Ray Tune.

    python -m temu_dist.train --config configs/X.yaml [key=value ...]
    accelerate launch --config_file launch/gpu1.yaml -m temu_dist.train --config configs/X.yaml [key=value ...]

Each run writes one folder, out_dir/name: config.yaml (resolved), checkpoints/{last,best}, results.json and plots/;
by default it tracks into out_dir/mlflow.db, the MLflow store of every run under out_dir. Rerunning the same command
continues from checkpoints/last (train.resume=auto).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

import open_clip
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from temu_dist.atomic import write_json_atomic, write_text_atomic
from temu_dist import lock, resume
from temu_dist.best import better, own_best
from temu_dist.checkpoint import find_checkpoint, load_trainer_state, save_checkpoint, set_rng_state, where_it_goes_on
from temu_dist.config import (KEY_METRICS, MLFLOW_FOLDERS, Config, ConfigError, check_output_folder, check_run_folder,
                              dump, flatten, load_config, notices_as_lines)
from temu_dist.data.augment import normalize
from temu_dist.data.ldg import check_fidelity_size, ldg_targets
from temu_dist.data.manifest import naming_unpacked, pack_named_by, read_manifest
from temu_dist.data.sources import DATASETS
from temu_dist.data.stream import SharedEpoch, epoch_steps, reader_count, split_shards, train_loader
from temu_dist.distributed import BatchPlan, check_processes_agree, keep_buffers_in_place, make_accelerator
from temu_dist.evaluate import EvalSet, check_metric, eval_sets, evaluate_sets, scatter_plots, seen_in_training
from temu_dist.gather import across_ranks
from temu_dist.metrics import plcc_loss
from temu_dist.model.io import load_weights
from temu_dist.model.backbone import check_backbone, pretrained_weights, vit_depth, weights_said
from temu_dist.model.temu import TeMuIQA, Tokens, build_model
from temu_dist.optim import epoch_schedule, make_optimizer, make_scheduler
from temu_dist.plots import score_vs_time
from temu_dist.stop import Terminated, sigterm_as_ctrl_c, sigterm_at_once, sigterm_at_step_ends, stop_code
from temu_dist.tracking import Tracker, tracking_uri


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# Left in the run folder by a run whose loss went non-finite, holding the error, so that report and a search's retry
# can tell such a run from one cut short; an attempt removes its earlier one.
NONFINITE = "nonfinite.txt"
RUN_LOCK = "train.lock"  # in a run folder: held while a training writes it


# torch's report of a data worker a SIGTERM ended: sent to the whole process group (scancel, docker stop), the signal
# ends a worker not yet past its worker_init_fn (stop.sigterm_from_the_trainer_only), or one started by spawn or
# forkserver, and this error would stand in for the stop.
WORKER_TERMINATED = re.compile(r"DataLoader worker \(pid \d+\) is killed by signal: Terminated")


def _stopped_by_sigterm(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and bool(WORKER_TERMINATED.search(str(e)))


@dataclass
class Inputs:
    """What one micro-batch trains on, on the device: images (raw, unnormalised) with their locally distorted copies
    after them, each image's target and its weight in the loss."""

    images: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    # Whether every process holds as many rows: not with LDG at p < 1, where each distorts its own number of images.
    same_length: bool


def training_inputs(batch: dict, config: Config, device: torch.device) -> Inputs:
    """A micro-batch and its locally distorted copies (targets f * y; ldg.weight weighs them), on the device."""
    x = batch["image"].to(device, non_blocking=True)
    y = batch["mos"].to(device, non_blocking=True)
    images, targets, weights = x, y, torch.ones_like(y)
    use = batch.get("ldg")  # on the host, so the branches below need no device sync
    if use is not None and use.any():
        x_ldg = batch["ldg_image"].to(device, non_blocking=True)
        x_orig, y_orig = x, y
        if not use.all():  # LDG at p < 1; a boolean mask on the device would wait for it
            keep = use.to(device)
            x_ldg, x_orig, y_orig = x_ldg[keep], x[keep], y[keep]
        images = torch.cat([x, x_ldg])
        targets = torch.cat([y, ldg_targets(x_orig, x_ldg, y_orig, config.ldg)])
        weights = torch.cat([weights, torch.full_like(targets[len(y):], config.ldg.weight)])
    return Inputs(images, targets, weights, use is None or config.ldg.p == 1.0)


def _loss(score: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, config: Config,
          same_length: bool) -> torch.Tensor:
    """MSE over this process's rows + PLCC over the rows of all processes together."""
    mse = (weights * (score - targets) ** 2).sum() / weights.sum()
    plcc = 0.0
    if config.train.plcc_weight:
        # Scores, targets and weights in one gather.
        rows = across_ranks(torch.stack([score, targets, weights], dim=1), same_length=same_length)
        plcc = plcc_loss(rows[:, 0], rows[:, 1], rows[:, 2])
    return config.train.mse_weight * mse + config.train.plcc_weight * plcc


def loss_fn(model: torch.nn.Module, batch: dict, config: Config, device: torch.device,
            stats: tuple[tuple[float, ...], tuple[float, ...]]) -> torch.Tensor:
    """MSE + PLCC loss over one micro-batch and its locally distorted copies. PLCC does not split over samples, so it
    is taken over the micro-batches of all processes together: the same whatever the number of processes.

    `model` is the prepared (possibly wrapped) model; `stats` the backbone's normalisation mean and std."""
    inputs = training_inputs(batch, config, device)
    score = model(normalize(inputs.images, *stats)).score.float()
    return _loss(score, inputs.targets, inputs.weights, config, inputs.same_length)


def step_scores(model: torch.nn.Module, inputs: list[Inputs], config: Config, stats: tuple[tuple[float, ...],
                tuple[float, ...]]) -> tuple[torch.Tensor, list[torch.Tensor], list[Tokens | None]]:
    """The first pass of a step whose PLCC spans all its micro-batches: every micro-batch scored without autograd, the
    step's loss over all of them, d loss / d score for each micro-batch's rows and, with train.keep_tokens, its tower
    tokens. The second pass runs each micro-batch again with autograd (from its tokens: the head alone) and
    back-propagates these through its scores: the gradient of the whole step's loss, at the memory of one
    micro-batch (and the step's tokens).

    As in loss_fn, the PLCC part of each process's d loss / d score comes back multiplied by the number of processes
    (the autograd gather sums it over them) and data parallel's gradient averaging divides that out again, while it
    averages the per-process MSE."""
    keep = config.train.keep_tokens
    # With CUDA graphs (model.compile_mode reduce-overhead, max-autotune) each call reuses the last one's output
    # memory: what is kept past the next call is copied.
    reused = config.model.compile and config.model.compile_mode in ("reduce-overhead", "max-autotune")
    scores, tokens = [], []
    with torch.no_grad():
        for x in inputs:
            out = model(normalize(x.images, *stats), keep_tokens=keep)
            scores.append(out.score.float().clone())
            tokens.append(tuple(t.clone() for t in out.tokens) if keep and reused else out.tokens)
            del out  # before the next micro-batch's tower runs
    score = torch.cat(scores).requires_grad_()
    loss = _loss(score, torch.cat([x.targets for x in inputs]), torch.cat([x.weights for x in inputs]), config,
                 all(x.same_length for x in inputs))
    (grad,) = torch.autograd.grad(loss, score)
    return loss.detach(), list(grad.split([len(s) for s in scores])), tokens


def eval_metrics(evals: dict[str, dict[str, float]], prefix: str = "") -> dict[str, float]:
    """Evaluation results as flat metric names: SET/srcc, SET/count, ... (after `prefix`)."""
    return {f"{prefix}{name}/{k}": v for name, m in evals.items() for k, v in m.items()}


def epoch_metrics(record: dict) -> dict[str, float]:
    """An epoch's record as flat metric names: train/loss, train/lr, train/images_per_s, SET/srcc, SET/count, ..."""
    return {**{f"train/{k}": record[k] for k in ("loss", "lr", "images_per_s")}, **eval_metrics(record["eval"])}


def _describe(config: Config, plan: BatchPlan, micro_batches: int, accelerator: Accelerator, model: TeMuIQA) -> None:
    steps = micro_batches // plan.accumulation
    _say(accelerator,
        f"train: {plan.world_size} process(es) on {accelerator.device}, global batch {plan.global_batch} = "
        f"{plan.per_device} per process x {plan.accumulation} accumulated x {plan.world_size} process(es); "
        f"{steps} optimizer step(s) per epoch, {steps * config.train.epochs} in all")
    if not config.train.plcc_weight:
        return
    micro = plan.per_device * plan.world_size  # one micro-batch's samples over the processes
    if _plcc_over_step(config, plan):
        images = plan.per_device * plan.accumulation * (2 if config.ldg.enabled else 1)
        size = images * model.backbone.tokens_bytes(*config.model.image_hw())
        kept = f"{size / 2 ** 30:.1f} GiB" if size >= 2 ** 29 else f"{size / 2 ** 20:.1f} MiB"
        tower_images = f"{images} tower images{', the samples and their LDG copies' if config.ldg.enabled else ''}"
        how = (f"each micro-batch's tower tokens are kept for the step ({tower_images}: up to {kept} per process), so "
               "its second pass, with autograd, runs the head alone (train.keep_tokens=false: the tower again, "
               "nothing kept)" if config.train.keep_tokens else
               f"each micro-batch runs through the tower twice (train.keep_tokens=true: once, keeping its tokens for "
               f"the step, up to {kept} per process)")
        _say(accelerator, f"train: PLCC over each step's {plan.global_batch} samples, not each micro-batch's {micro} "
                          f"(train.plcc_over=micro_batch): {how}")
    elif plan.accumulation > 1:
        _say(accelerator, f"train: PLCC over each micro-batch's {micro} sample(s), not the step's "
                          f"{plan.global_batch} (train.plcc_over=step)")
    whole = plan.accumulation == 1 or _plcc_over_step(config, plan)  # PLCC over the step's samples
    if (plan.global_batch if whole else micro) < 2:
        _say(accelerator, "train: warning: PLCC over 1 sample at a time is no correlation (0 alone, +-1 with its LDG "
                          "copy): " + ("raise train.batch_size" if whole else
                                       "raise train.per_device_batch, or use train.plcc_over=step"))


def _say(accelerator: Accelerator, line: str) -> None:
    """Prints on the job's first process: accelerate's print says it on each node's first."""
    if accelerator.is_main_process:
        print(line, flush=True)


def _said(metrics: dict, krcc: bool = False) -> str:
    """A set's correlations as the command's lines give them: srcc, plcc, krcc if asked, plcc_fit where scored."""
    return " ".join(f"{m} {metrics[m]:.4f}" for m in KEY_METRICS if m in metrics and (krcc or m != "krcc"))


def _log_line(record: dict, epochs: int) -> str:
    evals = " | ".join(f"{n} {_said(m)} (n={m['count']})" for n, m in record["eval"].items())
    return (f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"{record['images_per_s']:.1f} img/s elapsed {record['elapsed_s']:.0f}s | {evals}")


def _run_tags(accelerator: Accelerator, plan: BatchPlan, run_dir: Path) -> dict[str, str]:
    """How the run was launched and on what: none of it is in the config, all of it changes the timings. And where
    its checkpoints are: out_dir is relative to wherever the command ran."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"run_dir": str(run_dir.resolve()), "host": socket.gethostname(), "processes": str(plan.world_size),
            "per_device_batch": str(plan.per_device), "accumulation": str(plan.accumulation),
            "distributed": accelerator.distributed_type.value, "device": name, "torch": torch.__version__,
            "open_clip": open_clip.__version__}


@dataclass
class Run:
    """What the epoch loop works on; history, best and elapsed come back from a checkpoint on resume."""

    accelerator: Accelerator
    plan: BatchPlan
    model: torch.nn.Module  # as prepared by accelerate (DDP, DeepSpeed engine or the module itself)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader
    micro_batches: int
    epoch: SharedEpoch
    sets: list[EvalSet]
    tracker: Tracker
    on_epoch: Callable[[dict], None] | None = None
    start_epoch: int = 0
    # Where a mid-epoch checkpoint left start_epoch: micro-batches done, their loss sum, images and training seconds.
    in_epoch: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    elapsed_s: float = 0.0
    # Each time train.resume=extend gave the run another train.epochs (resume.extend_schedule).
    extended: list[dict] = field(default_factory=list)
    packs: dict[str, str] = field(default_factory=dict)  # digests of the packs it trained and was scored on
    lr: float = 0.0  # the rate the last optimizer step used
    grad_norm: torch.Tensor | float | None = None  # with train.grad_clip_norm, the last step's, before clipping


def _plcc_over_step(config: Config, plan: BatchPlan) -> bool:
    return plan.accumulation > 1 and bool(config.train.plcc_weight) and config.train.plcc_over == "step"


def _train_step(config: Config, run: Run, batches: list[dict], stats: tuple[tuple[float, ...], tuple[float, ...]],
                epoch: int, asked: Callable[[], bool]) -> tuple[torch.Tensor, bool]:
    """Trains on these micro-batches (one, or a whole step's); returns the sum of their losses (detached), and
    whether any process was asked to stop (`asked()`: this one was, as its losses were taken)."""
    accelerator, model, device = run.accelerator, run.model, run.accelerator.device
    if len(batches) == 1:
        with accelerator.accumulate(model):
            loss = loss_fn(model, batches[0], config, device, stats)
            stop = _check_finite(loss, accelerator, epoch, config, asked())
            accelerator.backward(loss)
            _optimizer_step(run, config.train.grad_clip_norm, config.train.lr_schedule == "step")
        return loss.detach(), stop
    inputs = [training_inputs(b, config, device) for b in batches]
    loss, grads, tokens = step_scores(model, inputs, config, stats)
    stop = _check_finite(loss, accelerator, epoch, config, asked())
    for x, grad, t in zip(inputs, grads, tokens, strict=True):
        with accelerator.accumulate(model):
            score = model(normalize(x.images, *stats), tokens=t).score.float()
            # backward() divides by the accumulation steps, for micro-batch losses that each stand for the step;
            # these gradients are already the whole step's.
            accelerator.backward((score * grad).sum() * len(batches))
            _optimizer_step(run, config.train.grad_clip_norm, config.train.lr_schedule == "step")
    return loss * len(batches), stop


def _optimizer_step(run: Run, clip: float, per_step: bool) -> None:
    # Inside accumulate(): the optimizer prepared by accelerate steps only at the step's last micro-batch.
    if clip and run.accelerator.sync_gradients:
        # Under DeepSpeed its engine has clipped already (in backward); this gives the norm it kept, None at stage 0
        # with our fp32 optimizer, where train/grad_norm is not logged.
        run.grad_norm = run.accelerator.clip_grad_norm_(run.model.parameters(), clip)
    run.optimizer.step()
    if run.accelerator.sync_gradients:
        run.lr = run.scheduler.get_last_lr()[0]
        if per_step:
            run.scheduler.step()
    run.optimizer.zero_grad()


def _check_finite(loss: torch.Tensor, accelerator: Accelerator, epoch: int, config: Config, asked: bool) -> bool:
    """Whether any process was asked to stop (SIGTERM); raises where any loss is not finite. A host sync every step
    (with ldg.p < 1, gathering the distorted images is another): every process must stop together, or the others
    hang; a stop asked rides along."""
    finite = torch.isfinite(loss.detach()).float()
    finite, stop = accelerator.reduce(torch.stack([finite, torch.full_like(finite, float(asked))]),
                                      reduction="mean").tolist()
    if finite < 1.0:
        _last_collective(accelerator)  # every process stops here
        # Only the first process of a node prints: say how many went wrong, not just this one's loss.
        where, n = find_checkpoint(config.run_dir() / "checkpoints" / "last"), accelerator.num_processes
        bad = round((1 - finite) * n)
        raise NonFiniteLoss(f"epoch {epoch + 1}: the loss became non-finite on {bad} of {n} process(es) "
                            f"(this one's: {loss.item()}); stopped. The last good checkpoint is "
                            f"{where or 'none (nothing saved yet)'}; resuming replays the same batches to the same "
                            "loss: start anew (train.resume=never) with a lower train.lr or another seed")
    return stop > 0


def _fit(config: Config, run: Run, asked: Callable[[], bool]) -> None:
    """The epochs from run.start_epoch on: train, evaluate, checkpoint, track; updates run.history and run.best.
    `asked()`: whether this process has noted a SIGTERM (stop.sigterm_at_step_ends)."""
    accelerator, model, optimizer, scheduler = run.accelerator, run.model, run.optimizer, run.scheduler
    main = accelerator.is_main_process
    device = accelerator.device
    plain = accelerator.unwrap_model(model)
    stats = (plain.backbone.mean, plain.backbone.std)
    run_dir = config.run_dir()
    ckpt_dir = run_dir / "checkpoints"
    set_name, metric = config.train.key_metric.split("/")
    micro_batches = run.micro_batches
    history = run.history
    started = time.perf_counter() - run.elapsed_s
    every, log_every = config.train.checkpoint_every, config.train.log_every
    # Micro-batches trained together: a whole step where PLCC spans it, else one at a time.
    group = run.plan.accumulation if _plcc_over_step(config, run.plan) else 1
    acc = run.plan.accumulation

    def save_within(epoch: int, steps: int, loss_sum: float, images: int, train_s: float) -> None:
        """A `last` checkpoint after this many steps of the epoch: all of them where its evaluation is still to come."""
        in_epoch = {"micro_batches": steps * acc, "steps": steps, "processes": run.plan.world_size,
                    "loss_sum": loss_sum, "images": images, "train_s": train_s,
                    "readers": reader_count(run.plan.world_size, config.data.workers), "reader_runs": True,
                    "lr": run.lr, **({"to_evaluate": True} if steps * acc == micro_batches else {})}
        info = {"next_epoch": epoch, "in_epoch": in_epoch, "history": history, "best": run.best,
                "elapsed_s": time.perf_counter() - started, "extended": run.extended, "packs": run.packs}
        save_checkpoint(ckpt_dir / "last", plain, config, optimizer, scheduler, info)

    for epoch in range(run.start_epoch, config.train.epochs):
        done = run.in_epoch if epoch == run.start_epoch else {}
        skip = done.get("micro_batches", 0)
        run.epoch.set(epoch, replay=skip)
        if config.train.lr_schedule == "epoch":
            epoch_schedule(scheduler, epoch)
        model.train()
        total = torch.tensor(done.get("loss_sum", 0.0), device=device)  # over whole steps; `part`: the step's so far
        images, seen, train_before = done.get("images", 0), skip, done.get("train_s", 0.0)
        part, part_images = 0, 0
        logged = (done.get("loss_sum", 0.0), skip)  # the loss sum and micro-batches at the last step_loss
        tick = time.perf_counter()
        trained = together = False
        try:
            # On a terminal the bar gives way to the epoch's line; in a log it ends its own line, updated twice a
            # minute. Closed however the loop ends, so that a stopped run's last line is its own, not the bar's.
            tty = sys.stderr.isatty()
            with tqdm(total=micro_batches, desc=f"epoch {epoch + 1}", disable=not main, leave=not tty,
                      file=sys.stderr, mininterval=0.1 if tty else 30) as bar:
                pending: list[dict] = []
                # An epoch trained whole before the resume (its evaluation to come) is not read again.
                for i, batch in zip(range(micro_batches), run.loader) if skip < micro_batches else ():
                    if i < skip:
                        # Trained before the resume: the loader passed over these samples without decoding them
                        # (thousands a second), so a SIGTERM meanwhile waits for the first step's agreement: one
                        # process stopping here alone left the others in that step's collectives.
                        bar.update()
                        tick = time.perf_counter()
                        continue
                    pending.append(batch)
                    if len(pending) < group:
                        continue
                    loss, stop = _train_step(config, run, pending, stats, epoch, asked)
                    bar.update(len(pending))  # trained, not only read: a stopped run's bar says how far it got
                    seen += len(pending)
                    part = part + loss
                    part_images += sum(len(b["name"]) for b in pending)
                    pending = []
                    if seen % acc == 0:
                        total += part
                        images += part_images
                        part, part_images = 0, 0
                    step = seen // acc  # the whole steps trained
                    if stop:
                        # Every process stops after the same step; a step begun is let go (the rest of its data
                        # may be gone with the workers), its checkpoint is the one after the step before. Where
                        # that is the epoch's start, the last epoch's checkpoint holds it already. The others wait
                        # for it, so that every node's hint names it.
                        try:
                            if main and step > 0:
                                save_within(epoch, step, total.item(), images,
                                            train_before + time.perf_counter() - tick)
                        finally:
                            accelerator.wait_for_everyone()
                        raise Terminated
                    if log_every and main and seen % acc == 0 and step % log_every == 0:
                        now = total.item()
                        loss_now, logged = (now - logged[0]) / (seen - logged[1]), (now, seen)
                        norm = {} if run.grad_norm is None else {"train/grad_norm": float(run.grad_norm)}
                        run.tracker.metrics({"train/step_loss": loss_now, "train/step_lr": run.lr, **norm},
                                            step=epoch * (micro_batches // acc) + step)
                        bar.set_postfix(loss=f"{loss_now:.4f}", refresh=False)
                    if every and main and seen % acc == 0 and step % every == 0 and seen < micro_batches:
                        save_within(epoch, step, total.item(), images, train_before + time.perf_counter() - tick)
                if skip >= micro_batches:
                    bar.update(micro_batches)
            train_s = train_before + time.perf_counter() - tick
            trained = True
            # A SIGTERM noted after the epoch's last step: every process stops before the evaluation, together.
            if _any(accelerator, asked()):
                together = True
                raise Terminated
            with sigterm_at_once():  # an evaluation has no step to end at
                results = evaluate_sets(plain, run.sets, accelerator, config)
        except Terminated:
            # Stopped after the epoch's training: its evaluation is what a resume does first. Saved with SIGTERM
            # noted, not raised: a second one (the launcher's) would cut the save short.
            if trained:
                try:
                    if main:
                        save_within(epoch, micro_batches // acc, total.item(), images, train_s)
                finally:
                    if together:
                        accelerator.wait_for_everyone()
            raise
        record = {"epoch": epoch + 1, "loss": total.item() / max(seen, 1), "lr": run.lr,
                  "images_per_s": images * run.plan.world_size / train_s, "elapsed_s": time.perf_counter() - started,
                  "eval": {name: r.metrics for name, r in results.items()}}
        history.append(record)
        value = results[set_name].metrics[metric]
        improved = better(value, None if run.best is None else run.best["value"])
        if improved:
            run.best = {"epoch": epoch + 1, "value": value, "eval": record["eval"]}
        if main:
            info = {"next_epoch": epoch + 1, "history": history, "best": run.best, "elapsed_s": record["elapsed_s"],
                    "extended": run.extended, "packs": run.packs}
            # best first: a kill between the two leaves `last` (what a resume trusts) naming the older best.
            if improved:
                save_checkpoint(ckpt_dir / "best", plain, config, optimizer, scheduler, info)
                # Logged now, not only at the end: a run killed or stopped early still shows its best epoch's plots.
                for path in scatter_plots(results, run_dir / "plots", f"epoch {epoch + 1}"):
                    run.tracker.artifact(path, "plots")
            save_checkpoint(ckpt_dir / "last", plain, config, optimizer, scheduler, info)
            run.tracker.metrics(epoch_metrics(record), step=epoch + 1)
            _say(accelerator, _log_line(record, config.train.epochs))
        if run.on_epoch is not None:
            run.on_epoch(record)
        # Every process waits for the epoch's checkpoint; one that noted a SIGTERM meanwhile stops them all after it.
        if _any(accelerator, asked()):
            raise Terminated


def _any(accelerator: Accelerator, flag: bool) -> bool:
    """Whether any process's flag is set: a collective, so every process learns the same (and waits for the rest).
    Where one is, every process is about to stop: a barrier after, as at train()'s end."""
    anyone = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0
    if anyone:
        _last_collective(accelerator)
    return anyone


def _last_collective(accelerator: Accelerator) -> None:
    """A barrier, before the process group may be torn down: an all-reduce's end followed at once by the teardown
    let gloo abort a process at exit (-6, "terminate called without an active exception"; 2 of 14 two-process tests
    in one CI run ending on the all-reduce, 3 of 97 runs of a stop after an epoch)."""
    accelerator.wait_for_everyone()


def check_data(config: Config) -> list[EvalSet]:
    """What train() reads, checked before it starts (Ray Tune checks a search's trials with it too): the backbone, its
    layers and weights, the training pack and split, and the evaluation sets, the key metric's among them. Returns the
    sets."""
    if not config.data.train:
        zero_shot = "; a config of evaluation sets alone (eval.cross) is scored zero-shot with python -m " \
            "temu_dist.evaluate --clipiqa table --config FILE" if config.eval.cross else ""
        raise ConfigError(f"data.train: no training shards named (a pack folder, e.g. shards/kadid10k){zero_shot}")
    if "{split}" in config.data.train:  # repeat puts each split's index in
        raise ConfigError(f"data.train: {config.data.train} names a series of packs, one per split: train the series "
                          "with python -m temu_dist.repeat --config FILE --splits N, or one split with data.train="
                          f"{config.data.train.replace('{split}', '0')}")
    check_output_folder(Path(config.out_dir), "out_dir")
    if (top := Path(config.name).parts[0]) in MLFLOW_FOLDERS:  # here, not in the config: runs saved so still load
        raise ConfigError(f"name: {config.name!r}: out_dir/{top} is MLflow's own store of the runs' files; take "
                          "another name")
    if config.run_dir().exists() and not config.run_dir().is_dir():
        raise ConfigError(f"name: {config.run_dir()} is a file, not a run folder: give the run another name=")
    check_run_folder(config.run_dir(), series=False)
    check_backbone(config.model)
    pretrained_weights(config.model)  # a misspelt tag or a missing file, now rather than after the data checks
    if config.ldg.enabled:
        check_fidelity_size("model.image_size", config.model.image_hw(), config.ldg)
    with naming_unpacked(config.pack_folders(), covered=[config.data.train]), pack_named_by("data.train"):
        _, counts = split_shards(config.data.train, config.data.train_split)
    if config.train.batch_size > sum(counts):  # here too, not only in the loader: a search checks its trials with it
        raise ConfigError(f"train.batch_size: a global batch of {config.train.batch_size} is larger than the "
                          f"{sum(counts)} images of {config.data.train} '{config.data.train_split}'")
    per_epoch = epoch_steps(sum(counts), config.train.batch_size, config.train.max_steps_per_epoch)
    if config.train.warmup_steps >= per_epoch * config.train.epochs:
        raise ConfigError(f"train.warmup_steps: {config.train.warmup_steps} is not fewer than the run's "
                          f"{per_epoch * config.train.epochs} optimizer steps ({config.train.epochs} epochs of "
                          f"{per_epoch}); lower it")
    sets = eval_sets(config)
    check_metric("train.key_metric", config.train.key_metric, sets, config)
    return sets


def data_warnings(config: Config, sets: list[EvalSet]) -> list[str]:
    """What the checked data holds that a run goes on with but should not."""
    warnings = []
    for key, folder in config.pack_folders():
        manifest = read_manifest(folder)
        if key == "data.train" and "order" not in manifest:
            warnings.append(f"{folder} was packed by an earlier temu-dist in its label file's order, in which a batch "
                            "is a stretch of it (one generator, distortion or reference image): pack it again")
        info = DATASETS.get(manifest.get("dataset"))
        # A release pack from before its score column was recorded read another one (KonIQ-10k: its 1-5 MOS).
        if info and info.mos_column and manifest.get("source", {}).get("kind", "release") == "release" and \
                "mos_column" not in manifest:
            warnings.append(f"{folder} ({key}) holds {manifest['dataset']}'s labels as an earlier temu-dist packed "
                            f"them, not its {info.mos_column}, which IQA-PyTorch and papers use: pack it again into "
                            "a new folder")
    if seen := seen_in_training(sets, config):  # their scores would overstate the model in a paper's table
        warnings.append(f"{', '.join(seen)}: packed from the labels data.train was ({config.data.train}) but split "
                        "otherwise, so some of the images may be ones this run trains on")
    return warnings


def _replaced(run_dir: Path) -> list[Path]:
    """What a run started anew in run_dir removes: its checkpoints would be taken for this run's until it wrote its own
    (predict, evaluate, the hint of a stop; .old: what a kill between save_checkpoint's renames leaves, which they take
    too), its results.json would mark it finished, and its plots be logged as this run's."""
    ckpt_dir = run_dir / "checkpoints"
    return [p for p in (ckpt_dir / "last", ckpt_dir / "last.old", ckpt_dir / "best", ckpt_dir / "best.old",
                        run_dir / "results.json", run_dir / "plots") if p.exists()]


def _held(run_dir: Path, old: list[Path]) -> str:
    names = ", ".join(str(p.relative_to(run_dir)) for p in old)
    finished = "finished " if (run_dir / "results.json").is_file() else ""
    return f"a {finished}run: its {names} {'is' if len(old) == 1 else 'are'} removed"


def _busy(run_dir: Path, holder: object) -> str:
    return f"{run_dir}: another training is writing this run folder ({holder}): wait for it to end or stop it, or " \
        "give this one another name="


def check_lines(config: Config) -> list[str]:
    """`--check`: what a run of this config would train and score, and where it would go on from, checked as train()
    checks it before any work (data, backbone and weights' names, the run folder and its checkpoint), with no model
    built and nothing written: on a login node before a job waits in a queue for hours."""
    sets = check_data(config)
    m, t = config.model, config.train
    depth = vit_depth(m.backbone)
    weights = weights_said(m)
    height, width = m.image_hw()
    _, counts = split_shards(config.data.train, config.data.train_split)
    steps = epoch_steps(sum(counts), t.batch_size, t.max_steps_per_epoch)
    scored = [f"{s.name} ({sum(split_shards(s.shards, s.split)[1]):,} images)" for s in sets]
    lines = [f"model: {m.backbone}, {weights}, layers {m.layers}{f' of {depth}' if depth else ''}, "
             f"TeMu-IQA-{m.variant}, prompts {m.prompt}, input {height}x{width} ({m.resize})",
             f"training: {config.data.train} '{config.data.train_split}', {sum(counts):,} images: {steps:,} optimizer "
             f"steps an epoch at a global batch of {t.batch_size}, {steps * t.epochs:,} in {t.epochs} epoch"
             f"{'s' * (t.epochs != 1)}, cosine per {t.lr_schedule}" + (", LDG on" if config.ldg.enabled else ""),
             f"scored after each epoch: {', '.join(scored)}" + (" and each on local distortions" if config.eval.ldg
                                                              else "") + f"; the best epoch by {t.key_metric}"]
    lines += [f"warning: {warning}" for warning in data_warnings(config, sets)]
    run_dir = config.run_dir()
    if (holder := lock.holder(run_dir / RUN_LOCK)) is not None:
        raise ConfigError(_busy(run_dir, holder))
    last = resume.last_checkpoint(config)
    if (going_on := resume.going_on(config, last, resume.packs(config))) is None:
        old = _replaced(run_dir)
        return [*lines, f"run folder: {run_dir}, a new run" + (f" (it held {_held(run_dir, old)})" if old else "")]
    said = {"finished": "finished: the same command reports its results",
            "resumed": f"resumes from {last}{where_it_goes_on(last)}",
            "extended": f"extends to {t.epochs} epochs from {last}{where_it_goes_on(last)}"}[going_on[2]]
    return [*lines, f"run folder: {run_dir}, {said}"]


def train(config: Config, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Trains and evaluates as the config says; returns what results.json holds. `on_epoch` gets each epoch's record
    (loss, lr, images/s, elapsed, per-set metrics) on every process: Ray Tune reports it to its scheduler."""
    accelerator, plan = make_accelerator(config)
    # From here to the end, a SIGTERM waits for a point where the processes agree (the end of the checks, a step's or
    # an epoch's end) or stops an evaluation, so that every process stops at the same place, with its checkpoint saved
    # where there is one to save: a process that stopped alone left the others to fail in their next collective.
    with sigterm_at_step_ends() as asked:
        return _train(config, on_epoch, accelerator, plan, asked)


def _train(config: Config, on_epoch: Callable[[dict], None] | None, accelerator: Accelerator, plan: BatchPlan,
           asked: Callable[[], bool]) -> dict:
    """train()'s work, with SIGTERM deferred: `asked()` says whether this process has noted one."""
    # One process has no other to agree with: a SIGTERM in its checks and loading (a download of pretrained weights
    # may take minutes) stops it at once.
    with sigterm_at_once() if accelerator.num_processes == 1 else nullcontext():
        check_processes_agree(config, accelerator)
        main = accelerator.is_main_process
        sets = check_data(config)
        for warning in data_warnings(config, sets):
            _say(accelerator, f"train: warning: {warning}")
        run_dir = config.run_dir()
        ckpt_dir = run_dir / "checkpoints"
        set_seed(config.seed)
        device = accelerator.device
        epoch_shared = SharedEpoch(0)
        loader, micro_batches = train_loader(config, config.data.train, config.data.train_split, plan.per_device,
                                             plan.accumulation, accelerator.process_index, plan.world_size,
                                             epoch_shared, config.model.image_hw())
        steps_per_epoch = micro_batches // plan.accumulation
        model = build_model(config, device)
        _describe(config, plan, micro_batches, accelerator, model)
        optimizer = make_optimizer(model, config)
        scheduler = make_scheduler(optimizer, config, steps_per_epoch)
        resumed = {}
        last = resume.last_checkpoint(config)
        packs = resume.packs(config)  # once: checked against a resumed run's, and kept in this run's checkpoints
        if len(set(gather_object([last is not None]))) > 1:
            raise ConfigError(f"out_dir: some processes see {ckpt_dir / 'last'} and some do not; a run folder must lie "
                              "on a filesystem every node shares")
        extending = False
        if (going_on := resume.going_on(config, last, packs)) is not None:
            saved, info, how = going_on
            extending = how == "extended"
            if "train.plcc_over" not in flatten(saved) and _plcc_over_step(config, plan):
                _say(accelerator, f"train: warning: {last} predates train.plcc_over, when PLCC under gradient "
                                  "accumulation was taken over each micro-batch; the rest of this run takes it over "
                                  "the whole step (train.plcc_over=micro_batch: as before)")
            load_weights(model, last, config)
            state, _ = load_trainer_state(last)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            saved_position = info.get("in_epoch", {})
            in_epoch = resume.in_this_plan(saved_position, plan)
            extended = info.get("extended", [])
            if extending:
                steps = in_epoch.get("micro_batches", 0) // plan.accumulation
                # An epoch trained whole, its evaluation to come: the run trains on at the next one.
                going_on_at = (info["next_epoch"] + 1, 0) if steps == steps_per_epoch else (info["next_epoch"], steps)
                extended = [*extended, resume.extend_schedule(
                    scheduler, saved["train"]["epochs"], config.train.epochs, steps_per_epoch,
                    going_on_at if config.train.lr_schedule == "epoch" else None)]
                _say(accelerator, f"train: {run_dir} goes from {extended[-1]['epochs_from']} to {config.train.epochs} "
                                  f"epochs: from its step {extended[-1]['after_step']} on, the learning rate follows a "
                                  f"{config.train.epochs}-epoch cosine ({extended[-1]['lr_from']:.3g} -> "
                                  f"{extended[-1]['lr_to']:.3g}), unlike a run started for {config.train.epochs} "
                                  "epochs")
            resumed = {"start_epoch": info["next_epoch"], "in_epoch": in_epoch, "history": info["history"],
                       "best": info["best"], "elapsed_s": info["elapsed_s"], "extended": extended,
                       "lr": in_epoch.get("lr", 0.0)}
            at = f", after its step {in_epoch['micro_batches'] // plan.accumulation} of {steps_per_epoch}," \
                if in_epoch else ""
            if info["next_epoch"] >= config.train.epochs:
                epochs = config.train.epochs
                _say(accelerator, f"train: {run_dir} has finished its {epochs} epoch{'s' * (epochs != 1)} ({last}): "
                                  "nothing left to train")
            else:
                _say(accelerator, f"train: resuming {run_dir} at epoch {info['next_epoch'] + 1}{at} from {last}")
            # Lists of another length where the readers' number changed; a checkpoint that does not say its plan is only
            # compared by that number.
            reads = resume.saved_reads(saved_position, config) if in_epoch else None
            readers = reader_count(plan.world_size, config.data.workers)
            moved = reads != resume.read_per_reader(in_epoch["micro_batches"], plan.per_device, plan.world_size,
                                                    readers // plan.world_size) if reads is not None \
                else bool(in_epoch) and saved_position["readers"] != readers
            rest = f"the rest of epoch {info['next_epoch'] + 1} reads the samples in another order, so some repeat " \
                "in it and some are left out"
            if moved:
                saved = resume.readers_said(saved_position["processes"], saved_position["readers"],
                                            resume.saved_per_device(saved_position, config)) \
                    if reads is not None else f"{saved_position['readers']} data readers"
                _say(accelerator, f"train: warning: the data readers stand elsewhere than where {last} left off "
                                  f"({resume.readers_said(plan.world_size, readers, plan.per_device)} now, {saved} at "
                                  f"the checkpoint): {rest}")
            elif in_epoch and saved_position["readers"] > 1 and "reader_runs" not in saved_position \
                    and not config.data.resampled:
                _say(accelerator, f"train: warning: {last} was saved by a version that split the samples over its "
                                  f"{saved_position['readers']} data readers otherwise: {rest}")
        model, optimizer = accelerator.prepare(model, optimizer)
        keep_buffers_in_place(model)
        if accelerator.state.deepspeed_plugin is not None:
            clipping = model.gradient_clipping()  # what DeepSpeed's engine does, not what the launch file asked
            _say(accelerator, f"train: DeepSpeed ZeRO stage {accelerator.state.deepspeed_plugin.zero_stage}, gradient "
                              f"clipping {clipping or 'off'}")
    # A SIGTERM in the checks and loading stops every process here, before the run folder or MLflow is touched; after
    # here, at the first step's end, with a checkpoint.
    if _any(accelerator, asked()):
        raise Terminated
    # Only now that every input has passed its checks: a command that fails must leave an existing run as it was.
    held = _hold_run_folder(run_dir, accelerator)
    try:
        if main:
            if last is None and (old := _replaced(run_dir)):
                _say(accelerator, f"train: warning: starting anew in {run_dir}, which held {_held(run_dir, old)}")
                for path in old:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / NONFINITE).unlink(missing_ok=True)
            write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(dump(config), sort_keys=False))
            if extending and (run_dir / "results.json").is_file():
                # Stale until the new epochs end: a kill before then must not leave the run looking finished.
                (run_dir / "results.json").unlink()
        tracker = Tracker(config, run_dir, main, resuming=last is not None,
                          tags=resume.extended_tag(resumed.get("extended", [])),
                          past=[(h["epoch"], epoch_metrics(h)) for h in resumed.get("history", [])])
        if resumed.get("start_epoch", 0) < config.train.epochs:  # a finished run's epochs all ran on an earlier launch
            tracker.launch_tags(_run_tags(accelerator, plan, run_dir), resumed.get("start_epoch", 0) + 1)
        if not resumed.get("extended"):  # set by an extension stopped before it saved a checkpoint, then given up
            tracker.drop_tag("extended")
        run = Run(accelerator, plan, model, optimizer, scheduler, loader, micro_batches, epoch_shared, sets, tracker,
                  on_epoch, packs={key: digest for key, (_, digest) in packs.items()}, **resumed)
        try:
            _fit(config, run, asked)
        except (SystemExit, KeyboardInterrupt):
            tracker.end("KILLED")  # how Ray Tune stops a trial early (ASHA), and Ctrl-C
            raise
        except BaseException as e:
            stopped = _stopped_by_sigterm(e)
            tracker.end("KILLED" if stopped else "FAILED")
            if main and isinstance(e, NonFiniteLoss):
                write_text_atomic(run_dir / NONFINITE, str(e))
            if stopped:
                raise Terminated from e
            raise
        summary = {"run_dir": str(run_dir), "processes": plan.world_size, "key_metric": config.train.key_metric,
                   "best_epoch": run.best["epoch"], "best": run.best["eval"],
                   "own_best": own_best(run.history, config.train.key_metric, run.best), "history": run.history,
                   "mlflow_run_id": tracker.run_id, **({"extended": run.extended} if run.extended else {})}
        # A run that had finished before this call (repeat goes through its splits again) wrote its results then,
        # and logged them if its MLflow run has the best_epoch tag, which is set last.
        finished = resumed.get("start_epoch", 0) >= config.train.epochs and (run_dir / "results.json").is_file()
        if main:
            if not finished:
                write_json_atomic(run_dir / "results.json", summary)
                (run_dir / "plots").mkdir(exist_ok=True)
                score_vs_time(run.history, [s.name for s in sets], run_dir / "plots" / "score_vs_time.png")
            elif _add_own_best(run_dir / "results.json", summary["own_best"]) \
                    and "best_epoch" in tracker.tags_before:
                _log_own_best(tracker, summary["own_best"])
            if not (finished and "best_epoch" in tracker.tags_before):
                # The epoch results.json reports, beside the per-epoch curves (whose latest value is the last
                # epoch's).
                tracker.metrics(eval_metrics(run.best["eval"], "best/"), step=run.best["epoch"])
                _log_own_best(tracker, summary["own_best"])
                for path in [run_dir / "results.json", *sorted((run_dir / "plots").glob("*.png"))]:
                    tracker.artifact(path, None if path.suffix != ".png" else "plots")
                for path in sorted((ckpt_dir / "best").glob("*")):
                    tracker.artifact(path, "best")
                tracker.tags({"best_epoch": str(run.best["epoch"])})
            tracker.end()
        # The process group stays up: repeat and other callers may train again; the entry points tear it down.
        # Every process waits for the results; one that noted a SIGTERM meanwhile stops them all (the next split
        # of a series is not begun without it).
        if _any(accelerator, asked()):
            raise Terminated
        _last_collective(accelerator)
        return summary
    finally:
        if held is not None:
            lock.let_go(held)


def _hold_run_folder(run_dir: Path, accelerator: Accelerator) -> IO[str] | None:
    """The run folder for this job alone, until train() lets go of what this returns: a second training into it
    would interleave its checkpoints, results and MLflow epochs with this one's. The main process holds an flock on
    run_dir/train.lock, which the OS lets go however the job ends (kill -9 too); every process hears if it got it."""
    handle, refusal = None, None
    if accelerator.is_main_process:
        try:
            handle, refusal = _lock_run_folder(run_dir, accelerator)
        except OSError as e:  # a full disk, a read-only mount: said by every process, where the others would wait
            refusal = f"{run_dir}: cannot write the run folder ({e.strerror})"
    refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise ConfigError(refusal)
    return handle


def _lock_run_folder(run_dir: Path, accelerator: Accelerator) -> tuple[IO[str] | None, str | None]:
    """The locked run_dir/train.lock, or None where it cannot be locked; and why this job must not go on, if so."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return lock.take(run_dir / RUN_LOCK), None
    except lock.Busy as e:
        return None, _busy(run_dir, e)
    except lock.NoLocks as e:
        _say(accelerator, f"train: warning: {run_dir / RUN_LOCK} cannot be locked ({e}): a second training into "
                          "this run folder will not be refused")
        return None, None


def _log_own_best(tracker: Tracker, own: dict[str, dict]) -> None:
    for name, metrics in own.items():
        tracker.metrics(eval_metrics({name: metrics}, "own_best/"), step=metrics["epoch"])


def _add_own_best(path: Path, own: dict[str, dict]) -> bool:
    """A run finished before results.json reported own_best gets it, from its history, when it is run again."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return False  # the results it has stay as they are
    if "own_best" in results:
        return False
    write_json_atomic(path, {**results, "own_best": own})
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m temu_dist.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML config (configs/*.yaml)")
    parser.add_argument("--check", action="store_true",
                        help="check the config, data and run folder as a run does before any work, say what it would "
                             "train, and stop (no model built, nothing written)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    config = None
    # Every process stops alike: the first on each node says why, in one write, so that two nodes' lines cannot run
    # together.
    says = os.environ.get("LOCAL_RANK", "0") == "0"
    try:
        config = load_config(args.config, args.overrides)
        if args.check:
            print("\n".join(f"train: {line}" for line in check_lines(config)))
            return 0
        with sigterm_as_ctrl_c(), notices_as_lines("train"):
            results = train(config)
    except (ConfigError, NonFiniteLoss) as e:
        if says:
            sys.stderr.write(f"train: {e}\n")
        return 1
    except KeyboardInterrupt as e:
        by = " by SIGTERM" if isinstance(e, Terminated) else ""
        if says and config is not None:
            last = find_checkpoint(config.run_dir() / "checkpoints" / "last")
            at = "" if last is None else where_it_goes_on(last)
            how = "the same command starts it anew" if last is None else \
                f"run the same command again to go on from {last}{at}" if config.train.resume == "auto" else \
                f"run it with train.resume=auto to go on from {last}{at}"
            sys.stderr.write(f"\ntrain: stopped{by}{' before its first checkpoint' if last is None else ''}; {how}\n")
        return stop_code(e)
    finally:
        PartialState().destroy_process_group()
    if not PartialState().is_main_process:
        return 0
    best = results["best"]
    print(f"train: best epoch {results['best_epoch']} by {results['key_metric']}: " + "; ".join(
        f"{n} {_said(m, krcc=True)} (n={m['count']})" for n, m in best.items()))
    others = {n: m for n, m in results["own_best"].items() if m["epoch"] != results["best_epoch"]}
    if others:
        print(f"train: at their own best epochs by {results['key_metric'].split('/')[1]} (as IQA-PyTorch reports "
              "each set): " + "; ".join(f"{n} {_said(m, krcc=True)} (epoch {m['epoch']})" for n, m in others.items()))
    print(f"train: results in {results['run_dir']}/results.json")
    if config.model.pretrained is None:
        print("train: model.pretrained is null: a random backbone carries little quality information; these figures "
              "show the pipeline working, not what TeMu-IQA reaches with pretrained weights")
    uri = tracking_uri(config.tracking.uri, config.out_dir)
    if results["mlflow_run_id"] and uri.startswith("sqlite:///"):
        print(f"train: compare runs with: mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
