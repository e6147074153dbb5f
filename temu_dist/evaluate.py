"""Evaluate saved weights, or zero-shot CLIP-IQA: SRCC, PLCC, KRCC and the sample count per evaluation set, every
sample exactly once across all processes.

    python -m temu_dist.evaluate --checkpoint RUN_DIR [--shards DIR[:SPLIT]]... [key=value ...]
    python -m temu_dist.evaluate --clipiqa {a,b,c} [--layer K] --config C.yaml [--shards ...] [key=value ...]
    accelerate launch --config_file launch/cpu2.yaml -m temu_dist.evaluate --checkpoint RUN_DIR

RUN_DIR is a run folder (its best checkpoint is used) or a checkpoint folder. --clipiqa scores with the frozen
backbone alone (seed Tables 11-13, Fig. 9): a, the last layer's [cls]; b, layer K's; c, all layers' averaged. Without
--shards the sets come from the config (data.train's eval.splits and eval.cross). Prints one JSON object:
{set: {srcc, plcc, krcc, count, expected}}.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from temu_dist.config import Config, ConfigError, is_override, load_config
from temu_dist.data.augment import normalize
from temu_dist.data.keys import name_key
from temu_dist.data.stream import eval_loader, read_manifest, split_shards
from temu_dist.metrics import correlations
from temu_dist.model.io import checkpoint_dir, load_model
from temu_dist.model.clipiqa import ClipIQA, build_clipiqa
from temu_dist.model.temu import QualityOutput, TeMuIQA


@dataclass(frozen=True)
class EvalSet:
    name: str
    shards: str
    split: str
    image_hw: tuple[int, int] | None = None  # None: the model's input size


@dataclass
class SetResult:
    metrics: dict  # srcc, plcc, krcc, count, expected
    pred: np.ndarray
    mos: np.ndarray


def eval_sets(config: Config) -> list[EvalSet]:
    """The configured evaluation sets: those of eval.splits that data.train's pack has, then eval.cross."""
    sets = []
    if config.data.train:
        have = read_manifest(config.data.train)["splits"]
        sets += [EvalSet(split, config.data.train, split) for split in config.eval.splits if split in have]
    sets += [EvalSet(c.name, c.shards, c.split, c.image_hw()) for c in config.eval.cross]
    _check_sets(sets)
    return sets


def _check_sets(sets: list[EvalSet]) -> None:
    """Unique names, and every pack and split there: a typo fails now, not after an epoch of training."""
    names = [s.name for s in sets]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"eval: two evaluation sets are named '{duplicate}'; give each a name of its own")
    for s in sets:
        split_shards(s.shards, s.split)


@torch.no_grad()
def evaluate_sets(model: TeMuIQA | ClipIQA, sets: list[EvalSet], accelerator: Accelerator,
                  config: Config) -> dict[str, SetResult]:
    """Scores every set on every process, gathers (name, score, mos) from all of them; metrics on every process."""
    was_training = model.training
    model.eval()
    results = {}
    for s in sets:
        loader, expected = eval_loader(s.shards, s.split, config.eval.batch_size, accelerator.process_index,
                                       accelerator.num_processes, config.data.workers,
                                       s.image_hw or config.model.image_hw())
        keys, preds, targets = [], [], []
        for batch in loader:
            x = normalize(batch["image"].to(accelerator.device, non_blocking=True), model.backbone.mean,
                          model.backbone.std)
            out = model(x)
            # Copies: a view would keep alive the memory each batch came in (shared with a loader worker).
            preds.append((out.score if isinstance(out, QualityOutput) else out).float().cpu().numpy().copy())
            targets.append(batch["mos"].numpy().copy())
            keys.append(np.array([name_key(n) for n in batch["name"]], dtype=np.int64))
        mine = tuple(np.concatenate(p) if p else np.zeros(0, dtype) for p, dtype in
                     ((keys, np.int64), (preds, np.float32), (targets, np.float32)))
        parts = gather_object([mine])
        key, pred, mos = (np.concatenate([part[i] for part in parts]) for i in range(3))
        if len(np.unique(key)) != len(key):
            raise RuntimeError(f"evaluation of {s.name} saw a sample twice: the exactly-once split is broken")
        order = np.argsort(key)  # the same order whatever the number of processes
        pred, mos = pred[order].astype(np.float64), mos[order].astype(np.float64)
        metrics = {**correlations(pred, mos), "expected": expected}
        if metrics["count"] != expected and accelerator.is_main_process:
            warnings.warn(f"{s.name}: scored {metrics['count']} of {expected} samples (corrupt samples were skipped)",
                          stacklevel=2)
        results[s.name] = SetResult(metrics, pred, mos)
    model.train(was_training)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m temu_dist.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run folder or a checkpoint folder")
    source.add_argument("--clipiqa", choices=["a", "b", "c"], help="zero-shot CLIP-IQA option (needs --config)")
    parser.add_argument("--layer", type=int, help="the layer (1-based) of --clipiqa b")
    parser.add_argument("--config", help="config YAML for --clipiqa (backbone, input size, prompts, sets)")
    parser.add_argument("--shards", action="append", default=[], metavar="DIR[:SPLIT]",
                        help="evaluate this pack (split: test unless given) instead of the configured sets; repeatable")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if not is_override(o)]
    if bad:
        parser.error(f"not key=value: {bad[0]}")
    accelerator = Accelerator()
    try:
        if args.checkpoint:
            model, config = load_model(checkpoint_dir(args.checkpoint), args.overrides, accelerator.device)
        else:
            if not args.config:
                parser.error("--clipiqa needs --config (backbone, input size, prompts and sets)")
            config = load_config(args.config, args.overrides)
            model = build_clipiqa(config, args.clipiqa, args.layer, accelerator.device)
        if args.shards:
            sets = []
            for item in args.shards:
                folder, _, split = item.partition(":")
                split = split or "test"
                sets.append(EvalSet(f"{Path(folder).name}:{split}", folder, split))
            _check_sets(sets)
        else:
            sets = eval_sets(config)
        if not sets:
            raise ConfigError("nothing to evaluate: the config names no sets; pass --shards DIR[:SPLIT]")
        results = evaluate_sets(model, sets, accelerator, config)
    except ConfigError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 1
    if accelerator.is_main_process:
        print(json.dumps({name: r.metrics for name, r in results.items()}, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
