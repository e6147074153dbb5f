"""One config trained on N packs, a dataset's N random splits: mean and standard deviation of each evaluation set's
metrics (seed Table 6).

    python -m temu_dist.repeat --config configs/experiments/table6-agiqa3k.yaml --splits 10 [key=value ...]
    accelerate launch --config_file launch/gpu1.yaml -m temu_dist.repeat --config ... --splits 10

Split i trains on the pack named by data.train with "{split}" replaced by i (pack them with
`python -m temu_dist.pack ... --out shards/agiqa3k/split$i --split-index $i`), in run folder NAME-split{i}. Each split's
run resumes as `train` resumes: a finished one returns its results without training, one trained with other settings
is an error naming the key, so a broken series continues where it stopped. Writes out_dir/NAME/repeat-started.json at
the start (report tells an unfinished series by it), out_dir/NAME/repeat.json at the end, and prints the latter; a
metric that is NaN in some splits (constant scores) is averaged over the others, and `n` says over how many.
MLflow: a parent run NAME with each split's run as a child, and the mean and standard deviation of every set's
metrics (SET/srcc_mean, SET/srcc_std, ...; own_best/SET/... for each set at its own best epochs) once all splits are
done.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

from accelerate import PartialState

from temu_dist.atomic import write_json_atomic
from temu_dist.checkpoint import find_checkpoint, where_it_goes_on
from temu_dist.config import KEY_METRICS, Config, ConfigError, check_run_folder, load_config, notices_as_lines
from temu_dist.data.manifest import naming_later_packs, read_manifest
from temu_dist.tracking import config_params, config_tags, finish_run, parent_run, tracking_uri
from temu_dist.stop import Terminated, sigterm_as_ctrl_c, sigterm_at_step_ends, stop_code
from temu_dist.resume import check_extendable
from temu_dist.train import NonFiniteLoss, check_data, train
from temu_dist.train import check_lines as train_check_lines

# In a series' folder from its start: its splits and their runs, so that report can tell an unfinished series.
STARTED = "repeat-started.json"


def split_config(config: Config, index: int, parent: str | None = None) -> Config:
    if not config.data.train or "{split}" not in config.data.train:
        raise ConfigError("data.train: must contain {split}, e.g. shards/agiqa3k/split{split}: repeat trains on each "
                          "of N packs (a dataset's splits); to repeat seeds on one pack, search a grid over seed with "
                          "temu_dist.tune")
    data = config.data.model_copy(update={"train": config.data.train.replace("{split}", str(index))})
    tracking = config.tracking.model_copy(update={"parent_run_id": parent, "run_name": config.tracking.run_name and
                                                  f"{config.tracking.run_name}-split{index}"})
    return config.model_copy(update={"data": data, "name": f"{config.name}-split{index}", "tracking": tracking})


def summarize(runs: list[dict], best: str = "best") -> dict:
    """{set: {metric: {mean, std, n, values}}} over the runs' `best` (each set at the key metric's best epoch) or
    `own_best` (each at its own, see best.own_best); std is the sample standard deviation (n - 1), 0 for one split;
    NaN values are left out of mean, std, n."""
    out: dict = {}
    for name in runs[0][best]:
        out[name] = {}
        for metric in [m for m in KEY_METRICS if m in runs[0][best][name]]:  # plcc_fit: eval.plcc_fit's
            values = [r[best][name].get(metric, math.nan) for r in runs]
            finite = [v for v in values if not math.isnan(v)]
            out[name][metric] = {"mean": statistics.fmean(finite) if finite else math.nan,
                                 "std": statistics.stdev(finite) if len(finite) > 1 else 0.0, "n": len(finite),
                                 "values": values}
    return out


def _differs(a: dict, b: dict) -> bool:
    """Whether two summaries of a set differ in any split's value (NaN as equal to NaN)."""
    return any(x != y and not (math.isnan(x) and math.isnan(y))
               for m in a for x, y in zip(a[m]["values"], b[m]["values"]))


def _check_fewer_splits(out: Path, splits: int, config: Config) -> None:
    """A series rerun with fewer --splits (a slip for 10) would be written as the mean of those alone."""
    for file, held in (("repeat.json", "a finished series of"), (STARTED, "a series started with")):
        try:
            before = json.loads((out / file).read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if splits < before and config.train.resume != "never":
            raise ConfigError(f"--splits {splits}: {out} holds {held} {before} splits, which this would write as the "
                              f"mean of the first {splits}: give --splits {before} (or more, to add splits), or "
                              "another name=")


def _check_distinct_packs(config: Config, splits: int) -> None:
    """Two of the series' packs holding one split (a slip of --split-index) would count it twice in the mean and sd."""
    seen: dict[str, str] = {}
    for i in range(splits):
        split = split_config(config, i)
        manifest = read_manifest(split.data.train)
        # The training split's shards, by hash: alike only where the images are (a split file's path says less).
        key = json.dumps([s["sha256"] for s in manifest["splits"][split.data.train_split]["shards"]])
        if key in seen:
            described = manifest.get("split") or {}
            indexed = described.get("protocol") == "ratio" or str(described.get("file")).endswith(".pkl")
            raise ConfigError(f"data.train: {seen[key]} and {split.data.train} hold the same training images: the "
                              f"series would count that split twice; pack {split.data.train} again "
                              + (f"with --split-index {i}" if indexed else "from its own split"))
        seen[key] = split.data.train


def _is_first_process() -> bool:
    """Asked before train() has set up the process group, which PartialState() alone would not join on CPU (every
    process would take itself for the first): the launcher's RANK says."""
    return int(os.environ.get("RANK", "0")) == 0


def _series_folder(config: Config, splits: int) -> Path:
    """The series' folder, checked before any split's run: a series' own, not cut short by fewer --splits."""
    if splits < 1:
        raise ConfigError(f"--splits: at least 1, not {splits}")
    out = Path(config.out_dir) / config.name
    check_run_folder(out, series=True)
    _check_fewer_splits(out, splits, config)
    return out


def check_lines(config: Config, splits: int) -> list[str]:
    """`--check`: the series' checks before its first split trains, and what each split's run would do (train's
    --check), with nothing built or written."""
    out = _series_folder(config, splits)
    lines, series = [], [split_config(config, i) for i in range(splits)]
    for i, split in enumerate(series):
        with naming_later_packs(series, i):
            said = train_check_lines(split)
        lines += [said[0]] if i == 0 else []  # the model, alike in every split
        lines += [f"split {i}: {line}" for line in said[1:]]
    _check_distinct_packs(config, splits)
    return [*lines, f"series folder: {out}, the mean and sd over its {splits} splits in repeat.json"]


def repeat(config: Config, splits: int) -> dict:
    out = _series_folder(config, splits)
    extending, series = False, [split_config(config, i) for i in range(splits)]
    for i, split in enumerate(series):  # every split's pack (and run to extend), before the first trains for hours
        with naming_later_packs(series, i):
            check_data(split)
        if config.train.resume == "extend":
            extending |= check_extendable(split)
    _check_distinct_packs(config, splits)
    main = _is_first_process()
    anew = extending or config.train.resume == "never"  # its splits train again: the series is no longer finished
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / STARTED, {"splits": splits,
                                          "runs": [str(split_config(config, i).run_dir()) for i in range(splits)]})
    if main and anew:  # stale until every split has its new epochs
        (out / "repeat.json").unlink(missing_ok=True)
    uri = tracking_uri(config.tracking.uri, config.out_dir)
    parent = was = None
    if main and config.tracking.enabled:
        # The series' config, as each split's run has it, so the UI tells series (S from I, ...) apart.
        params = {"splits": splits, **config_params(config)}
        # Started anew, perhaps with other settings, which MLflow cannot change in the old parent's params.
        parent, was = parent_run(uri, config.tracking.experiment, config.name, out / "mlflow_parent_run_id", params,
                                 {"temu.repeat": "true", **config_tags(config)}, "repeat",
                                 same_params=config.train.resume == "never")
    try:
        runs = []
        # A SIGTERM between two splits' trainings waits for the next one's first agreement: a process that stopped
        # there alone left the others to fail in that training's first collective.
        with sigterm_at_step_ends():
            for i in range(splits):
                split = split_config(config, i, parent)
                if main:  # each split's train says the same lines
                    print(f"repeat: split {i + 1}/{splits}: {split.data.train} -> {split.run_dir()}", flush=True)
                runs.append(train(split))
    except BaseException as e:
        # A finished series' results stand, whatever stops a rerun; one trained again is no longer finished.
        if parent is not None and (was != "FINISHED" or anew):
            finish_run(uri, parent, [], {}, {}, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    # The epochs splits were started for where train.resume=extend changed them: report marks the series so.
    started_for = sorted({r["extended"][0]["epochs_from"] for r in runs if r.get("extended")})
    summary = {"config": config.name, "splits": splits, "key_metric": config.train.key_metric,
               "sets": summarize(runs), "sets_own_best": summarize(runs, "own_best"),
               "runs": [r["run_dir"] for r in runs], **({"started_for": started_for} if started_for else {})}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "repeat.json", summary)
        if parent is not None:
            metrics = {f"{prefix}{name}/{metric}_{stat}": values[stat]
                       for prefix, sets in (("", summary["sets"]), ("own_best/", summary["sets_own_best"]))
                       for name, by_metric in sets.items() for metric, values in by_metric.items()
                       for stat in ("mean", "std")}
            # MLflow keeps a param's first value: the parent's train.epochs stays the one the series started with.
            extended = {"extended": f"{', '.join(map(str, started_for))} -> {config.train.epochs} epochs"} \
                if started_for else {}
            finish_run(uri, parent, [out / "repeat.json"], metrics, extended, "FINISHED")
    return summary


def _how_to_go_on(config: Config | None, splits: int) -> str:
    """The stop line's rest: the split stopped (the first without results), and where it goes on."""
    again = "the same command starts the series anew; run it with train.resume=auto" \
        if config is not None and config.train.resume == "never" else "run the same command again"
    rest = f"; {again}: finished splits are kept"
    try:
        runs = [] if config is None else [split_config(config, i).run_dir() for i in range(splits)]
    except ConfigError:  # stopped before repeat checked data.train
        runs = []
    for i, run_dir in enumerate(runs):
        if (run_dir / "results.json").is_file():
            continue
        last = find_checkpoint(run_dir / "checkpoints" / "last")
        at = "starts anew" if last is None else f"goes on from {last}{where_it_goes_on(last)}"
        return f" in split {i + 1}/{splits}{rest}, split {i + 1} {at}"
    return f"{rest}, the stopped one goes on from its last checkpoint"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m temu_dist.repeat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--splits", type=int, default=10,
                        help="how many packs, data.train with {split} = 0 .. N-1 (default: 10, the seed's tables')")
    parser.add_argument("--check", action="store_true",
                        help="check every split's packs and run folder as the series does before its first split "
                             "trains, say what each would do, and stop (nothing built or written)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    says = os.environ.get("LOCAL_RANK", "0") == "0"  # the first process on each node says why it stops
    config = None
    try:
        config = load_config(args.config, args.overrides)
        if args.check:
            print("\n".join(f"repeat: {line}" for line in check_lines(config, args.splits)))
            return 0
        with sigterm_as_ctrl_c(), notices_as_lines("repeat"):
            summary = repeat(config, args.splits)
    except (ConfigError, NonFiniteLoss) as e:
        if says:
            print(f"repeat: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (scancel)
        if says:
            by = " by SIGTERM" if isinstance(e, Terminated) else ""
            print(f"\nrepeat: stopped{by}{_how_to_go_on(config, args.splits)}", file=sys.stderr)
        return stop_code(e)
    finally:
        PartialState().destroy_process_group()
    if _is_first_process():
        own = {n: m for n, m in summary["sets_own_best"].items() if _differs(m, summary["sets"][n])}
        for name, metrics, at in [*((n, m, "") for n, m in summary["sets"].items()),
                                  *((n, m, " at its own best epochs") for n, m in own.items())]:
            print(f"repeat: {name}{at} over {args.splits} splits: " + "; ".join(
                f"{m} {v['mean']:.4f} +- {v['std']:.4f}" + (f" (n={v['n']})" if v["n"] < args.splits else "")
                for m, v in metrics.items()))
        print(f"repeat: results in {Path(config.out_dir) / config.name / 'repeat.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
