"""The optimizer and learning-rate schedule a config asks for: the seed's Adam and cosine annealing over the run, or
AdamW; the cosine a step at a time after an optional linear warmup, or once an epoch. And a schedule made longer from
the step (or epoch) it stands at (train.resume=extend)."""
from __future__ import annotations

import math
import warnings

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from temu_dist.config import Config, Notice


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """Adam over every trained parameter (weight decay, where asked, an L2 term on each: the seed's optimizer), or
    AdamW with its decoupled decay on the matrices alone, as open_clip's trainer applies it."""
    trained = [p for p in model.parameters() if p.requires_grad]
    t = config.train
    if t.optimizer == "adam":
        return torch.optim.Adam(trained, lr=t.lr, weight_decay=t.weight_decay)
    # Decay would pull LayerNorm gains to 0, the layer weights to uniform and the temperature to 1: vectors are kept
    # out of it (context vectors and the meta-net's weights are matrices).
    groups = [{"params": [p for p in trained if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}]
    if t.weight_decay and not groups[0]["params"]:
        warnings.warn(f"train.weight_decay {t.weight_decay:g} decays nothing: AdamW leaves vectors out of it, and "
                      f"model.prompt={config.model.prompt} trains no matrix", Notice, stacklevel=2)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, config: Config, steps_per_epoch: int) -> LRScheduler:
    """Cosine annealing from train.lr to 0 over the run's optimizer steps; with train.warmup_steps W (fewer than
    those: train.check_data), the rate climbs from lr / (W + 1) by as much each step to lr at step W, where a cosine
    over the remaining steps begins. With train.lr_schedule=epoch, a cosine over the run's epochs, which the trainer
    steps as each epoch begins (epoch_schedule)."""
    if config.train.lr_schedule == "epoch":
        return CosineAnnealingLR(optimizer, T_max=config.train.epochs)
    steps, warmup = steps_per_epoch * config.train.epochs, config.train.warmup_steps
    if not warmup:
        return CosineAnnealingLR(optimizer, T_max=steps)
    return SequentialLR(optimizer, [LinearLR(optimizer, 1 / (warmup + 1), total_iters=warmup),
                                    CosineAnnealingLR(optimizer, T_max=steps - warmup)], milestones=[warmup])


def epoch_schedule(scheduler: LRScheduler, epoch: int) -> None:
    """A per-epoch cosine (train.lr_schedule=epoch) at `epoch` (from 0), as an epoch's training begins: a step for each
    epoch begun since it stood, none where a checkpoint saved within this epoch holds it there already."""
    while scheduler.last_epoch < epoch:
        # A resumed run steps it before its own optimizer has stepped, which torch warns of, for per-step schedules.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            scheduler.step()


def lengthen(scheduler: LRScheduler, steps: int) -> tuple[int, float, float]:
    """Makes a make_scheduler schedule `steps` long (its own steps: epochs for a per-epoch cosine) from the step it
    stands at; returns that step and the rate before and after. The cosine's rate is set by hand: CosineAnnealingLR
    scales the last rate step by step, so a new length alone would scale the old schedule's rate (0 at its end).
    Within a warmup, the cosine to come is made longer."""
    state = scheduler.state_dict()
    sequential = isinstance(scheduler, SequentialLR)
    cosine, warmup = (state["_schedulers"][1], state["_milestones"][0]) if sequential else (state, 0)
    t, before = state["last_epoch"], state["_last_lr"]
    cosine["T_max"] = steps - warmup
    after = before
    if t >= warmup:
        low = cosine["eta_min"]
        after = [low + (base - low) * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup))) / 2
                 for base in cosine["base_lrs"]]
        for group, rate in zip(scheduler.optimizer.param_groups, after, strict=True):
            group["lr"] = rate
        cosine["_last_lr"] = state["_last_lr"] = after
    scheduler.load_state_dict(state)
    return t, before[0], after[0]
