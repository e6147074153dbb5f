"""Evaluate saved weights, or zero-shot CLIP-IQA: SRCC, PLCC, KRCC and the sample count per evaluation set, every
sample exactly once across all processes.

    python -m temu_dist.evaluate --checkpoint RUN_DIR [--shards DIR[:SPLIT]]... [--out FILE.json] [key=value ...]
    python -m temu_dist.evaluate --clipiqa {a,b,c,table} [--layer K] --config C.yaml [--shards ...] [key=value ...]
    accelerate launch --config_file launch/cpu2.yaml -m temu_dist.evaluate --checkpoint RUN_DIR

RUN_DIR is a run folder (its best checkpoint is used) or a checkpoint folder. --clipiqa scores with the frozen
backbone alone (seed Tables 11-13, Fig. 9): a, the last layer's [cls]; b, layer K's; c, all layers' averaged; table,
each of them in one pass. Without --shards the sets come from the config (data.train's eval.splits and eval.cross).
A set packed from the checkpoint's training labels by another split (another --split-index, the whole set) is warned
of: some of its images may be ones the checkpoint trained on.
With eval.ldg=true each set is also scored on locally distorted copies against f(x, x') * MOS (SET-ldg; seed Figs.
10, 11). Prints one JSON object:
{set: {srcc, plcc, krcc, count, expected}} ({row: {set: ...}} for a table), strict JSON (an undefined metric is null);
--out writes it with what was scored, for `python -m temu_dist.report FILE.json`; --scores writes each image's
score (set, name, target, score) to a CSV.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

from temu_dist.atomic import strict, write_json_atomic, write_text_atomic
from temu_dist.checkpoint import epoch_of
from temu_dist.config import (Config, ConfigError, Curve, EvalConfig, check_output_folder, dump, is_override,
                              load_config, notices_as_lines)
from temu_dist.data.augment import normalize
from temu_dist.data.keys import name_key
from temu_dist.data.ldg import LocalDistortion, check_fidelity_size, ldg_targets
from temu_dist.data.manifest import naming_unpacked, pack_named_by
from temu_dist.data.splits import SPLITS, split_read
from temu_dist.data.stream import eval_loader, read_manifest, split_shards
from temu_dist.distributed import eval_accelerator
from temu_dist.metrics import correlations, fitted_plcc
from temu_dist.model.backbone import weights_said
from temu_dist.model.io import checkpoint_dir, configs_of, load_model
from temu_dist.model.clipiqa import ClipIQA, build_clipiqa, check_clipiqa
from temu_dist.model.temu import QualityOutput, TeMuIQA
from temu_dist.plots import scatter
from temu_dist.report import is_evaluation
from temu_dist.stop import Terminated, sigterm_as_ctrl_c, stop_code

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    name: str
    shards: str
    split: str
    image_hw: tuple[int, int] | None = None  # None: the model's input size


@dataclass
class SetResult:
    metrics: dict  # srcc, plcc, krcc, count, expected; a SET-ldg set's also pred_mean, target_mean; plcc_fit if asked
    pred: np.ndarray
    mos: np.ndarray  # the targets: normalised MOS, or f(x, x') * MOS for a SET-ldg set
    names: list[str] | None = None  # the samples', in pred's order, where asked for


def scatter_plots(results: dict[str, SetResult], folder: Path, label: str) -> list[Path]:
    """A predicted-versus-target scatter of each scored set (seed Fig. 10), titled with its figures."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, r in results.items():
        if r.metrics["count"]:
            m = r.metrics
            # Two lines: names and figures on one overran the plot's width.
            title = f"{name}, {label}\nSRCC {m['srcc']:.3f} PLCC {m['plcc']:.3f} (n={m['count']})"
            file = "scatter_" + name.replace("/", "_").replace(":", "_") + ".png"  # --shards sets are DIR:SPLIT
            # A SET-ldg set (the one with pred_mean) has f(x, x') * MOS for targets.
            target = "target: f(x, x') * normalised MOS" if "pred_mean" in m else "ground truth (normalised MOS)"
            paths.append(scatter(r.pred, r.mos, title, target, folder / file))
    return paths


def eval_sets(config: Config) -> list[EvalSet]:
    """The configured evaluation sets: those of eval.splits that data.train's pack has, then eval.cross. The default
    splits skip one the pack lacks (most packs have no val); splits given otherwise must all be there."""
    sets = []
    if config.data.train:
        with naming_unpacked(config.pack_folders(), covered=[config.data.train]), pack_named_by("data.train"):
            have = read_manifest(config.data.train)["splits"]
        missing = [split for split in config.eval.splits if split not in have]
        if missing and config.eval.splits != EvalConfig.model_fields["splits"].default:
            raise ConfigError(f"eval.splits: data.train's pack {config.data.train} has no '{missing[0]}' split (it has "
                              f"{', '.join(have) or 'none'}): leave it out of eval.splits ({config.eval.splits} now), "
                              "or pack one with it (python -m temu_dist.pack --ratios)")
        sets += [EvalSet(split, config.data.train, split) for split in config.eval.splits if split in have]
    sets += [EvalSet(c.name, c.shards, c.split, c.image_hw()) for c in config.eval.cross]
    _check_sets(sets, config)
    return sets


def _check_sets(sets: list[EvalSet], config: Config, flag: str | None = None) -> None:
    """Unique names (the SET-ldg ones too), every pack and split there, and with eval.ldg input sizes the fidelity
    can compare: a typo fails now, not after an epoch of training."""
    names = result_names(sets, config)
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"eval: two evaluation sets are named '{duplicate}'; give each a name of its own")
    cross = {c.name: i for i, c in enumerate(config.eval.cross)}
    # Named as the user named the pack: on the command line (flag), in eval.cross, or as data.train.
    keys = [flag or (f"eval.cross.{cross[s.name]}.shards" if s.name in cross else "data.train") for s in sets]
    for i, (s, key) in enumerate(zip(sets, keys)):
        with naming_unpacked(zip(keys[i + 1:], (t.shards for t in sets[i + 1:])), covered=[s.shards]), \
                pack_named_by(key):
            split_shards(s.shards, s.split)
        if config.eval.ldg:
            key = "model.image_size" if s.image_hw is None else f"eval.cross.{cross[s.name]}.image_size"
            check_fidelity_size(key, s.image_hw or config.model.image_hw(), config.ldg)


def check_metric(key: str, metric: str, sets: list[EvalSet], config: Config) -> None:
    """A SET/METRIC (`key`: the option naming it) that evaluation reports: its set among the sets, and a fitted PLCC
    only where eval.plcc_fit asks for one."""
    name, measure = metric.split("/")
    if name not in result_names(sets, config):
        raise no_such_set(key, name, sets, config)
    if measure == "plcc_fit" and config.eval.plcc_fit == "none":
        raise ConfigError(f"{key}: {metric} is scored with eval.plcc_fit=logistic_4params (or logistic_5params), "
                          "which is none")


def no_such_set(key: str, name: str, sets: list[EvalSet], config: Config) -> ConfigError:
    """A metric named after a set evaluation does not report; where it names a split of the training pack or a set's
    locally distorted copy, why."""
    why, split = "", name.removesuffix("-ldg")
    if split in SPLITS and config.data.train and not any(s.name == split for s in sets):
        have = read_manifest(config.data.train)["splits"]
        why = (f"; data.train's pack {config.data.train} has no '{split}' split (it has {', '.join(have) or 'none'}): "
               "pack one into another folder (python -m temu_dist.pack --ratios) and train on that, or name another "
               "set" if split not in have else f"; add it to eval.splits ({config.eval.splits} now)")
    elif name != split and not config.eval.ldg and any(s.name == split for s in sets):
        why = f"; {name} is scored with eval.ldg=true"
    return ConfigError(f"{key}: no evaluation set '{name}' (sets: {', '.join(result_names(sets, config)) or 'none'})"
                       f"{why}")


def result_names(sets: list[EvalSet], config: Config) -> list[str]:
    """The names evaluation reports: each set's, and with eval.ldg each set's locally distorted copy, SET-ldg."""
    return [name for s in sets for name in (s.name, f"{s.name}-ldg")[:1 + config.eval.ldg]]


def evaluate_sets(model: TeMuIQA | ClipIQA, sets: list[EvalSet], accelerator: Accelerator, config: Config,
                  names: bool = False) -> dict[str, SetResult]:
    """Scores every set on every process, gathers (name, score, target) from all of them; metrics on every process.
    With eval.ldg, each set's images are scored a second time with a local distortion, against y' = f(x, x') * y.
    `names`: the results hold the samples' names (every process gathers them)."""
    return {name: results[0] for name, results in _evaluate(model, sets, accelerator, config, 1, names).items()}


def evaluate_columns(model: ClipIQA, sets: list[EvalSet], accelerator: Accelerator, config: Config,
                     names: bool = False) -> dict[str, dict[str, SetResult]]:
    """{column: {set: result}} of a model that gives several scores an image (CLIP-IQA's option table), in one pass."""
    by_set = _evaluate(model, sets, accelerator, config, len(model.columns), names)
    return {column: {name: results[i] for name, results in by_set.items()} for i, column in enumerate(model.columns)}


@torch.no_grad()
def _evaluate(model: TeMuIQA | ClipIQA, sets: list[EvalSet], accelerator: Accelerator, config: Config,
              width: int, names: bool) -> dict[str, list[SetResult]]:
    """Each set's results, one per score the model gives an image (`width` of them)."""
    was_training = model.training
    model.eval()
    ldg = LocalDistortion(config.ldg) if config.eval.ldg else None
    results = {}
    for s in sets:
        loader, expected = eval_loader(s.shards, s.split, config.eval.batch_size, accelerator.process_index,
                                       accelerator.num_processes, config.data.workers,
                                       s.image_hw or config.model.image_hw(), ldg, config.seed, config.model.resize)
        keys, named, scored, distorted = [], [] if names else None, ([], []), ([], [])
        # Shown where a set takes more than a few seconds (FLIVE's and AVA's take minutes), as train's epoch bar is
        # shown: on a terminal it gives way to what follows, in a log it ends its own line.
        tty = sys.stderr.isatty()
        with tqdm(total=expected, desc=f"evaluate {s.name}", unit="img", file=sys.stderr, leave=not tty, delay=5,
                  mininterval=0.1 if tty else 30, disable=not accelerator.is_main_process) as bar:
            for batch in loader:
                x = batch["image"].to(accelerator.device, non_blocking=True)
                mos = batch["mos"].to(accelerator.device, non_blocking=True)
                keys.append(np.array([name_key(n) for n in batch["name"]], dtype=np.int64))
                if named is not None:
                    named.extend(batch["name"])
                _append(scored, _score(model, x), mos)
                if ldg is not None:
                    x_ldg = batch["ldg_image"].to(accelerator.device, non_blocking=True)
                    _append(distorted, _score(model, x_ldg), ldg_targets(x, x_ldg, mos, config.ldg))
                # The first process's pace, taken for all of theirs (its share may be one sample more).
                bar.update(min(len(mos) * accelerator.num_processes, expected - bar.n))
        fit = config.eval.plcc_fit
        results[s.name] = _gathered(s.name, keys, named, scored, expected, accelerator, width, fit)
        if ldg is not None:
            results[f"{s.name}-ldg"] = _gathered(f"{s.name}-ldg", keys, named, distorted, expected, accelerator, width,
                                                 fit)
            for result in results[f"{s.name}-ldg"]:
                # Fig. 11 compares the mean prediction on distorted images with the mean of their targets.
                result.metrics.update(pred_mean=float(result.pred.mean()), target_mean=float(result.mos.mean()))
    model.train(was_training)
    return results


def _score(model: TeMuIQA | ClipIQA, x: torch.Tensor) -> torch.Tensor:
    """[B, width]: the model's scores of each image."""
    out = model(normalize(x, model.backbone.mean, model.backbone.std))
    score = out.score if isinstance(out, QualityOutput) else out
    return score.reshape(len(x), -1)


def _append(lists: tuple[list, list], pred: torch.Tensor, target: torch.Tensor) -> None:
    # Copies: a view would keep alive the memory each batch came in (shared with a loader worker).
    lists[0].append(pred.float().cpu().numpy().copy())
    lists[1].append(target.float().cpu().numpy().copy())


def _gathered(name: str, keys: list[np.ndarray], named: list[str] | None, scored: tuple[list, list], expected: int,
              accelerator: Accelerator, width: int, fit: str) -> list[SetResult]:
    """Every process's (name key, scores [n, width], target) of one set, in name order, with each score's
    metrics (and its PLCC after the logistic `fit`, unless none); and the names, where `named` holds this
    process's."""
    mine = tuple(np.concatenate(p) if p else np.zeros(shape, dtype) for p, shape, dtype in
                 ((keys, 0, np.int64), (scored[0], (0, width), np.float32), (scored[1], 0, np.float32)))
    parts = gather_object([(*mine, named)])
    key, pred, target = (np.concatenate([part[i] for part in parts]) for i in range(3))
    if len(np.unique(key)) != len(key):
        raise RuntimeError(f"evaluation of {name} saw a sample twice: the exactly-once split is broken")
    order = np.argsort(key)  # the same order whatever the number of processes
    pred, target = pred[order].astype(np.float64), target[order].astype(np.float64)
    names = None
    if named is not None:
        every = [n for part in parts for n in part[3]]
        names = [every[i] for i in order]
    results = [SetResult({**correlations(column, target), "expected": expected,
                          **({"plcc_fit": fitted_plcc(column, target, fit)} if fit != "none" else {})},
                         column, target, names) for column in pred.T]
    if results[0].metrics["count"] != expected and accelerator.is_main_process:
        log.warning("%s: scored %d of %d samples (corrupt samples were skipped, named above)", name,
                    results[0].metrics["count"], expected)
    return results


def _shard_sets(items: list[str]) -> list[EvalSet]:
    """--shards [NAME=]DIR[:SPLIT] as sets named NAME, or else DIR's last part:SPLIT, or DIR as given where two
    folders share that part (shards/agiqa3k/split0 and shards/livec/split0). NAME: the column report gives the set,
    that of training runs' eval.cross set of that name."""
    given = []
    for item in items:
        name, named, where = item.partition("=")
        if not named or "/" in name:  # a path with an = in it
            name, where = "", item
        elif not name:
            raise ConfigError(f"--shards {item}: an empty NAME before '='")
        folder, _, split = where.partition(":")
        given.append((name, folder, split or "test"))
    folders = [Path(folder).name for folder in dict.fromkeys(folder for name, folder, _ in given if not name)]
    sets = [EvalSet(name or f"{Path(folder).name if folders.count(Path(folder).name) == 1 else folder}:{split}",
                    folder, split) for name, folder, split in given]
    names = [s.name for s in sets]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"--shards: two sets named {twice[0]}; name each with NAME=DIR[:SPLIT]")
    return sets


def seen_in_training(sets: list[EvalSet], config: Config) -> list[str]:
    """The sets drawn from the label file of the config's training pack (its hash) by another split: another
    --split-index, or the whole set (--ratios 0 0 1); some of their images may be training ones. None where that pack
    is not on this machine."""
    try:
        trained = read_manifest(config.data.train)
    except ConfigError:
        return []

    def labels(manifest: dict) -> tuple:
        return manifest.get("dataset"), manifest.get("source", {}).get("label_sha256")

    def split(manifest: dict) -> dict:  # as the packer reads it: older packs recorded options their split ignores
        return split_read(manifest.get("split") or {})

    return [s.name for s in sets if s.split != "train" and labels(m := read_manifest(s.shards)) == labels(trained)
            and split(m) != split(trained)]


def _check_out(out: Path) -> None:
    if out.suffix != ".json":
        raise ConfigError(f"--out {out}: a .json file (python -m temu_dist.report reads it)")
    if out.is_dir():
        raise ConfigError(f"--out {out}: it is a folder, not a file")
    # Only a file evaluate wrote is replaced: `--out RUN_DIR/results.json` lost a run's training results.
    if out.exists() and not is_evaluation(out):
        raise ConfigError(f"--out {out}: it holds what evaluate did not write (a run's results?); give another path")
    # A run's folder holds config.yaml, a series' repeat-started.json (repeat.STARTED) from their starts.
    if out.name in ("results.json", "repeat.json") and any((out.parent / f).is_file()
                                                           for f in ("config.yaml", "repeat-started.json")):
        raise ConfigError(f"--out {out}: train or repeat writes that file in {out.parent} (a run folder) when it "
                          "finishes; give another path")
    check_output_folder(out.parent, "--out")


SCORES_HEADER = ["set", "name", "target"]  # then a score column per option (score, for one)


def _check_scores(path: Path) -> None:
    if path.suffix.lower() != ".csv":
        raise ConfigError(f"--scores {path}: a .csv file")
    if path.is_dir():
        raise ConfigError(f"--scores {path}: it is a folder, not a file")
    # Only a file evaluate wrote is replaced: a slip could name a dataset's label CSV.
    if path.exists() and path.stat().st_size:  # an empty one (mktemp's) holds nothing to lose
        try:
            with open(path, encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            header = []
        if header[:len(SCORES_HEADER)] != SCORES_HEADER:
            raise ConfigError(f"--scores {path}: it holds what evaluate did not write (a label file?); give another "
                              "path")
    check_output_folder(path.parent, "--scores")


def _write_scores(path: Path, rows: dict[str, dict[str, SetResult]]) -> int:
    """Every sample of every set, a row each (set, name, target, then each option's score), by name within a set,
    written whole; returns the rows."""
    labels = list(rows)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([*SCORES_HEADER, *(["score"] if len(labels) == 1 else labels)])
    count = 0
    for name, first in rows[labels[0]].items():
        # As float32, the precision scored in: the shortest digits that give it back (0.0065, not 0.00650000013).
        columns = [first.mos.astype(np.float32), *(rows[label][name].pred.astype(np.float32) for label in labels)]
        for i in sorted(range(len(first.names)), key=first.names.__getitem__):
            writer.writerow([name, first.names[i], *(str(c[i]) for c in columns)])
        count += len(first.names)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text.getvalue())
    return count


def main(argv: list[str] | None = None) -> int:
    with sigterm_as_ctrl_c(), notices_as_lines("evaluate"):  # SIGTERM: scancel, a job's time limit, kill
        return _command(argv)


def _check_lines(config: Config, sets: list[EvalSet], folder: Path | None, clipiqa: str | None) -> list[str]:
    """`--check`: what would be scored, by which model, with the weights' name checked and whether they are cached."""
    m = config.model
    epoch = epoch_of(folder) if folder else None
    what = f"{folder}" + (f" (epoch {epoch})" if epoch is not None else "") if folder else f"CLIP-IQA {clipiqa}"
    sized = [f"{s.name} ({s.shards} {s.split}, {sum(split_shards(s.shards, s.split)[1]):,} images)" for s in sets]
    return [f"model: {what}: {m.backbone}, {weights_said(m)}, input {'x'.join(map(str, m.image_hw()))} ({m.resize})",
            f"sets: {', '.join(sized)}"]


def _command(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m temu_dist.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run folder or a checkpoint folder")
    source.add_argument("--clipiqa", choices=["a", "b", "c", "table"],
                        help="zero-shot CLIP-IQA option (needs --config); table: every layer (b), the last (a) and all "
                             "averaged (c) in one pass, the rows of the seed's Tables 11-13")
    parser.add_argument("--layer", type=int, help="the layer (1-based) of --clipiqa b")
    parser.add_argument("--config", help="config YAML for --clipiqa (backbone, input size, prompts, sets)")
    parser.add_argument("--shards", action="append", default=[], metavar="[NAME=]DIR[:SPLIT]",
                        help="evaluate this pack (split: test unless given) instead of the configured sets, named NAME "
                        "(as an eval.cross set, report's column) or DIR:SPLIT; repeatable")
    parser.add_argument("--plots", metavar="DIR", help="also draw each set's predicted-versus-target scatter here")
    parser.add_argument("--out", metavar="FILE.json",
                        help="also write the scores, with what was scored, to this file (a row of `report`'s tables)")
    parser.add_argument("--scores", metavar="FILE.csv",
                        help="also write every image's score to this CSV: set, name, target (MOS normalised to [0, 1] "
                             "by the pack's scale, as trained; f(x, x') * that for a SET-ldg set), then the score (a "
                             "column per option of a table)")
    parser.add_argument("--plcc-fit", choices=get_args(Curve), metavar="CURVE",
                        help="also each set's PLCC after fitting this logistic of the scores to the MOS, as plcc_fit: "
                             "logistic_4params (VQEG's) or logistic_5params, as IQA-PyTorch's calculate_plcc fits "
                             "(eval.plcc_fit=CURVE)")
    parser.add_argument("--check", action="store_true",
                        help="check the sets and the model's config and weights' name, say what would be scored, and "
                             "stop (no model built, nothing written)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    bad = [o for o in args.overrides if not is_override(o)]
    if bad:
        folder = Path(bad[0].partition(":")[0])
        parser.error(f"not key=value: {bad[0]}" + (" (a pack? give each its own --shards)"
                                                    if folder.is_dir() and args.shards else ""))
    args.overrides += [f"eval.plcc_fit={args.plcc_fit}"] if args.plcc_fit else []
    if args.config and args.checkpoint:
        parser.error("--config is for --clipiqa: a checkpoint brings its own config (change a key with key=value)")
    if args.layer is not None and args.clipiqa != "b":
        parser.error("--layer is for --clipiqa b (a scores the last layer, c averages all, table each of them)")
    if args.plots and args.clipiqa == "table":
        parser.error("--plots draws one option's scatters; give --clipiqa a, b or c")
    if args.clipiqa and not args.config:
        parser.error("--clipiqa needs --config (backbone, input size, prompts and sets)")
    accelerator = eval_accelerator()
    try:
        if args.plots:
            check_output_folder(Path(args.plots), "--plots")
        if args.out:
            _check_out(Path(args.out))
        if args.scores:
            _check_scores(Path(args.scores))
        folder = checkpoint_dir(args.checkpoint) if args.checkpoint else None
        config = configs_of(folder, args.overrides)[1] if folder else load_config(args.config, args.overrides)
        # The sets before the model: a missing pack fails before the backbone's weights are fetched.
        sets = _shard_sets(args.shards) if args.shards else eval_sets(config)
        if args.shards:
            _check_sets(sets, config, "--shards")
        if not sets:
            raise ConfigError("nothing to evaluate: the config names no sets; pass --shards [NAME=]DIR[:SPLIT]")
        if args.clipiqa:
            check_clipiqa(config, args.clipiqa, args.layer)
        if args.check:
            if accelerator.is_main_process:
                print("\n".join(f"evaluate: {line}" for line in _check_lines(config, sets, folder, args.clipiqa)))
            return 0
        if folder:
            model, config = load_model(folder, args.overrides, accelerator.device)
            epoch = epoch_of(folder)
            scored = {"checkpoint": str(folder), **({"epoch": epoch} if epoch is not None else {})}
            label = config.name + (f" (epoch {epoch})" if epoch is not None else "")
        else:
            model = build_clipiqa(config, args.clipiqa, args.layer, accelerator.device)
            scored = {"clipiqa": args.clipiqa, **({"layer": args.layer} if args.layer else {}), "config": args.config}
            label = model.columns[0] if len(model.columns) == 1 else None
        seen = seen_in_training(sets, config) if args.checkpoint else []
        if seen and accelerator.is_main_process:
            print(f"evaluate: warning: {', '.join(seen)}: packed from the labels the checkpoint trained on "
                  f"({config.data.train}) but split otherwise, so some of the images may be ones it trained on",
                  file=sys.stderr)
        if accelerator.is_main_process:
            print(f"evaluate: scoring {scored.get('checkpoint') or f'CLIP-IQA {args.clipiqa}'}"
                  + (f" (epoch {scored['epoch']})" if "epoch" in scored else "") + " on "
                  + ", ".join(f"{s.name} ({s.shards} {s.split})" for s in sets), file=sys.stderr)
        named = bool(args.scores)
        rows = evaluate_columns(model, sets, accelerator, config, named) if label is None else \
            {label: evaluate_sets(model, sets, accelerator, config, named)}
    except ConfigError as e:
        if accelerator.is_main_process:  # every process meets it alike
            print(f"evaluate: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if accelerator.is_main_process:  # a terminal's Ctrl-C reaches every process
            by = " by SIGTERM" if isinstance(e, Terminated) else ""
            print(f"\nevaluate: stopped{by}; nothing written", file=sys.stderr)
        return stop_code(e)
    if accelerator.is_main_process:
        metrics = {row: {name: r.metrics for name, r in results.items()} for row, results in rows.items()}
        print(json.dumps(strict(metrics if label is None else metrics[label]), indent=2, allow_nan=False))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(args.out), {
                "scored": scored, "sets": {s.name: {"shards": s.shards, "split": s.split} for s in sets},
                "config": dump(config), "rows": metrics})
            print(f"evaluate: written to {args.out}", file=sys.stderr)
        if args.scores:
            count = _write_scores(Path(args.scores), rows)
            print(f"evaluate: {count} images' scores written to {args.scores}", file=sys.stderr)
        if args.plots:
            for path in scatter_plots(rows[label], Path(args.plots), label):
                print(f"evaluate: wrote {path}", file=sys.stderr)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
