"""Finished runs as one table, as a paper prints one: a row per run or repeat series, a column per evaluation set,
SRCC / PLCC in each cell (the seed's Tables 5-13).

    python -m temu_dist.report runs/table8-* --cross-only --merge-train   # Table 8 from its 12 runs
    python -m temu_dist.report runs/table6-agiqa3k-S runs/table6-agiqa3k-I   # repeat series: mean +- sd
    python -m temu_dist.report runs/table5-prompts                       # a search: a row per trial
    python -m temu_dist.report runs/table11.json     # evaluate --clipiqa table --out runs/table11.json: a row a layer
    python -m temu_dist.report runs/table7-* --merge-train --out table7.md --plot table7.png    # .csv, .tex too

A folder is a finished run (results.json), a finished repeat series (repeat.json), a search (its trials, finished or
stopped early, running or done) or a folder of them (out_dir); a .json file is what `evaluate --out` wrote, a row for
each model it scored (`--clipiqa table`: the seed's Tables 11-13). A series' own split runs are left out where the
series is there too, and what is left out is said. Rows are labelled by the config keys whose values differ between them
(the training set, model.variant, model.layers, ...). A run's own splits are named after the dataset it trained on,
so that runs trained on different sets line up with each other's cross-dataset columns. Each set is taken at its
own best epoch, as IQA-PyTorch reports it (--each-at key: every set at the key metric's best epoch, that of the
weights in checkpoints/best).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from temu_dist import lock
from temu_dist.atomic import write_text_atomic
from temu_dist.config import (KEY_METRICS, MLFLOW_FOLDERS, ConfigError, check_output_folder, comparable, dump,
                              error_line, flatten, load_config, notices_as_lines, read_yaml, settings_label)
from temu_dist.data.manifest import dataset_name

# plcc_fit: PLCC after a fitted logistic, where eval.plcc_fit scored it. pred_mean and target_mean: a SET-ldg set's
# mean prediction on distorted images and mean target (seed Fig. 11).
UNRANKED = ("pred_mean", "target_mean")  # no best to bold: a mean prediction is compared with its target
METRICS = (*KEY_METRICS, *UNRANKED)
# Folders of runs are searched this many levels below the one named (names a/b/c), never in MLflow's own stores.
NESTED = 3
_TRAINER_INFO = "trainer.json"  # checkpoint.TRAINER_INFO, whose module would bring torch into a table's command
_REPEAT_STARTED = "repeat-started.json"  # repeat.STARTED, for the same reason
_NONFINITE = "nonfinite.txt"  # train.NONFINITE, for the same reason
RUN_LOCK = "train.lock"  # train.RUN_LOCK, for the same reason
# Config keys that do not tell runs apart as a paper's rows do: where they ran, how they were tracked or loaded.
# The evaluation sets are the columns.
NOT_SETTINGS = ("name", "out_dir", "device", "tracking.", "data.workers", "eval.", "train.resume",
                "train.checkpoint_every", "train.log_every", "train.timeout_min", "model.compile")


@dataclass
class Row:
    folder: Path
    config: dict  # flattened
    # column -> metric -> (value, standard deviation over a series' splits or None)
    cells: dict[str, dict[str, tuple[float, float | None]]]
    splits: int | None = None  # a series' number of splits
    counts: dict[str, int] = field(default_factory=dict)  # column -> samples scored (a run's)
    stopped: str = ""  # a search's trial without results: how far its last checkpoint got
    # The epochs a run (a series' runs) was started for, where train.resume=extend changed them.
    started_for: list[int] = field(default_factory=list)
    # (column, metric) -> the splits a series' value is over, where a metric undefined in some left fewer
    fewer: dict[tuple[str, str], int] = field(default_factory=dict)
    split_runs: list[Path] = field(default_factory=list)  # a series' own runs
    label: str = ""  # a row of `evaluate --out`: named as evaluate named it, not by its settings
    epoch: int | None = None  # a row of --by-epoch: the run's scores after this epoch
    merged: list[Path] = field(default_factory=list)  # a row of --merge-train: its runs' folders
    started_on: list[str] = field(default_factory=list)  # a merged row's training sets whose runs were extended
    own: set[str] = field(default_factory=set)  # the columns holding its own splits (its training pack's)
    history: list[dict] | None = None  # a finished run's epochs, as results.json holds them (for --by-epoch)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None


def _config(run: Path) -> dict:
    """The run's resolved config, with the keys added since an older version wrote it at their defaults (else they
    would read as settings that differ)."""
    path = run / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found: the run's config, which train writes beside results.json")
    saved = read_yaml(path, "run config")
    try:
        return flatten(dump(load_config(None, (), base=saved)))
    except ConfigError:  # a key since renamed or removed: as saved
        return flatten(saved)


def _value(v: float | None) -> float:
    return math.nan if v is None else float(v)  # results.json writes an undefined metric as null


def _columns(sets: dict, config: dict) -> tuple[dict[str, str], set[str]]:
    """Each set's column, and the columns of the run's own splits: those (test, val, and their LDG copies) are named
    after its dataset (koniq10k, koniq10k val, koniq10k-ldg), unless a cross-dataset set of the run has that name."""
    own, dataset = config.get("eval.splits") or [], dataset_name(config.get("data.train"))
    named, owned = {}, set()
    for name in sets:
        split, ldg = name.removesuffix("-ldg"), "-ldg" if name.endswith("-ldg") else ""
        column = (dataset if split == "test" else f"{dataset} {split}") + ldg if split in own else name
        named[name] = column if column not in sets else name
        if split in own:
            owned.add(named[name])
    return named, owned


def read_run(folder: Path, each_at: str) -> Row:
    path = folder / "results.json"
    results, config = _read_json(path), _config(folder)
    key = "own_best" if each_at == "own" else "best"
    if key not in results:
        raise ConfigError(f"{path}: no own_best, as results were written before it: run the run's train command "
                          "again, which adds it without training, or use --each-at key")
    row = _row(folder, config, results[key])
    row.started_for = [results["extended"][0]["epochs_from"]] if results.get("extended") else []
    row.history = [r for r in results.get("history") or [] if isinstance(r, dict)]
    return row


def read_evaluation(path: Path) -> list[Row]:
    """The rows `evaluate --out` wrote: a model's (a checkpoint, a CLIP-IQA option) or each of a CLIP-IQA table's."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("rows"), dict) or not isinstance(data.get("config"), dict):
        raise ConfigError(f"{path}: not a file `python -m temu_dist.evaluate --out` wrote (no rows and config)")
    config = flatten(data["config"])
    rows = []
    for label, sets in data["rows"].items():
        row = _row(path, config, sets)
        row.label = label
        rows.append(row)
    return rows


def is_evaluation(path: Path) -> bool:
    """Whether `evaluate --out` wrote the file."""
    try:
        read_evaluation(path)
    except ConfigError:
        return False
    return True


def _row(folder: Path, config: dict, sets: dict, stopped: str = "") -> Row:
    named, own = _columns(sets, config)
    cells = {named[n]: {m: (_value(values[m]), None) for m in METRICS if m in values} for n, values in sets.items()}
    counts = {named[n]: values["count"] for n, values in sets.items() if "count" in values}
    return Row(folder, config, cells, counts=counts, stopped=stopped, own=own)


def read_stopped_trial(folder: Path, each_at: str, search: dict) -> Row:
    """A search's trial without results: its best so far, from its last checkpoint. `search`: its search.json, which
    says whether it failed; where there is none yet (a search running or cut), it may still run."""
    from temu_dist.best import own_best

    path = folder / "checkpoints" / "last" / _TRAINER_INFO
    info = _read_json(path)
    config = _config(folder)
    try:
        best, epoch = info["best"], info["next_epoch"]
        sets = own_best(info["history"], config["train.key_metric"], best) if each_at == "own" else best["eval"]
    except (KeyError, TypeError, IndexError) as e:
        raise ConfigError(f"{path}: not a checkpoint's trainer state ({error_line(e)})") from None
    row = next((r for r in search.get("trials", []) if r.get("trial") == folder.name), None)
    how = "last checkpoint at" if row is None else "failed after" if row.get("error") else "stopped after"
    nonfinite = _went_nonfinite(folder)
    return _row(folder, config, sets, f"{nonfinite}, best of epochs 1-{epoch}" if nonfinite else
                f"{how} epoch {epoch} of {config['train.epochs']}")


def _went_nonfinite(run: Path) -> str | None:
    """'loss non-finite in epoch N' where the run stopped so (its mark from train), else None."""
    try:
        said = (run / _NONFINITE).read_text()
    except OSError:
        return None
    epoch = said.removeprefix("epoch ").partition(":")[0]
    return f"loss non-finite in epoch {epoch}" if epoch.isdigit() else "loss non-finite"


def _has_an_epoch(trial: Path) -> bool:
    """A trial without results whose last checkpoint holds an evaluated epoch (a checkpoint within its first epoch
    has none to show)."""
    try:
        return bool(json.loads((trial / "checkpoints" / "last" / _TRAINER_INFO).read_text()).get("best"))
    except (OSError, ValueError, AttributeError):
        return False


def read_series(folder: Path, each_at: str) -> Row:
    path = folder / "repeat.json"
    summary = _read_json(path)
    key = "sets_own_best" if each_at == "own" else "sets"
    if key not in summary or not summary.get("runs"):
        raise ConfigError(f"{path}: written before it held {key} and its runs: run the repeat command again, which "
                          "adds them without training")
    # Each split's config differs in data.train alone.
    config = _config(_split_run(folder, summary["runs"][0]))
    splits = summary["splits"]
    # An sd over fewer than 2 values (a metric undefined in the other splits) is none.
    named, own = _columns(summary[key], config)
    cells = {named[name]: {m: (_value(v["mean"]), _value(v["std"]) if v.get("n", splits) > 1 else None)
                           for m, v in values.items()} for name, values in summary[key].items()}
    fewer = {(named[name], m): v["n"] for name, values in summary[key].items() for m, v in values.items()
             if v.get("n", splits) < splits}
    return Row(folder, config, cells, splits, fewer=fewer,
               split_runs=[_split_run(folder, run) for run in summary["runs"]],
               started_for=summary.get("started_for", []), own=own)


def _split_run(series: Path, run: str) -> Path:
    """A series' split run as repeat.json names it (relative to where repeat ran), else beside the series
    (out_dir/NAME-splitI), wherever the series was reached from."""
    return Path(run) if (Path(run) / "config.yaml").is_file() else series.parent / Path(run).name


def _unfinished_series(folder: Path) -> tuple[list[Path], int] | None:
    """A repeat series started and not finished: its split runs and how many of them have finished; None for any
    other folder."""
    if (folder / "repeat.json").is_file() or not (folder / _REPEAT_STARTED).is_file():
        return None
    runs = _started_runs(folder)
    return runs, sum((run / "results.json").is_file() for run in runs)


def _started_runs(folder: Path) -> list[Path]:
    """The split runs a series was (last) started with; none where it says none."""
    try:
        return [_split_run(folder, run) for run in _read_json(folder / _REPEAT_STARTED)["runs"]]
    except (ConfigError, KeyError, TypeError):  # none there (a series of an earlier version), or not ours
        return []


def _is_search(folder: Path) -> bool:
    """A Ray Tune search, finished (search.json) or not (its trials' folder)."""
    return (folder / "search.json").is_file() or (folder / "trials").is_dir()


def _trials(search: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """A search's trials: those finished, those without results whose checkpoint has an epoch to show, and those
    with none yet."""
    trials = sorted(p for p in (search / "trials").glob("*") if p.is_dir())
    done = [t for t in trials if (t / "results.json").is_file()]
    cut = [t for t in trials if t not in done and _has_an_epoch(t)]
    return done, cut, [t for t in trials if t not in done and t not in cut]


def collect(folders: list[str | Path], each_at: str = "own") -> list[Row]:
    """The rows of the given folders (runs and series, then searches' stopped trials, then evaluate's files); a
    folder of runs stands for the runs, series, searches and evaluate's files in it. What is left out of a folder of
    runs (unfinished runs, a series' split runs) is said on stderr."""
    finished: list[Path] = []
    stopped: list[Path] = []
    left_out: list[str] = []
    apart: dict[Path, str] = {}  # split runs of a series not yet in a row of its own: why they are left out

    def take(folder: Path, named: str) -> bool:
        """Takes a finished run or series, or a search's trials, or leaves out an unfinished series, saying so; False
        for anything else."""
        if (folder / "results.json").is_file() or (folder / "repeat.json").is_file():
            finished.append(folder)
        elif (series := _unfinished_series(folder)) is not None:
            runs, done = series
            name = named.removesuffix("/trials/") or folder.name
            apart.update((run.resolve(), f"a split of the unfinished series {name}") for run in runs)
            left_out.append(f"{name} (an unfinished repeat series, {done} of {len(runs)} splits finished: rerun its "
                            "repeat command to go on)")
        elif _is_search(folder):
            done, cut, empty = _trials(folder)
            finished.extend(done)
            stopped.extend(cut)
            said = _read_json(folder / "search.json") if (folder / "search.json").is_file() else {}
            failed = {t.get("trial") for t in said.get("trials", []) if t.get("error")}
            for t in empty:
                why = _went_nonfinite(t) or ("failed" if t.name in failed else "no epoch yet")
                left_out.append(f"{named}{t.name} ({why})")
        else:
            return False
        return True

    def scan(folder: Path, prefix: str, depth: int) -> bool:
        """Takes what a folder of runs holds, in its subfolders too (a run named a/b is b in a); False: nothing."""
        found = False
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                          and not (p.name in MLFLOW_FOLDERS and not prefix)):  # out_dir's own, not a run's name
            if take(sub, f"{prefix}{sub.name}/trials/"):
                found = True
            elif (sub / "checkpoints").is_dir():
                left_out.append(f"{prefix}{sub.name} ({_went_nonfinite(sub) or 'not finished'})")
            elif depth > 0:
                found = scan(sub, f"{prefix}{sub.name}/", depth - 1) or found
        # Beside the runs, the files evaluate --out wrote there (the README's runs/table11.json): their rows too.
        for path in sorted(folder.glob("*.json")):
            try:
                evaluated.setdefault(path, read_evaluation(path))
            except ConfigError:  # another program's JSON file
                continue
            found = True
        return found

    evaluated: dict[Path, list[Row]] = {}  # each file evaluate wrote, read once
    for folder in (Path(f).absolute() for f in folders):  # a folder's name and parent, also for `report .`
        if folder.suffix == ".json" and folder.is_file():
            evaluated.setdefault(folder, read_evaluation(folder))
            continue
        if (series := _unfinished_series(folder)) is not None:
            raise ConfigError(f"{folder}: an unfinished repeat series ({series[1]} of {len(series[0])} splits "
                              "finished): rerun its repeat command to go on")
        if take(folder, ""):
            continue
        if (folder / "checkpoints").is_dir():
            if training := lock.holder(folder / RUN_LOCK):
                raise ConfigError(f"{folder}: still training ({training}): no results.json until it finishes")
            if nonfinite := _went_nonfinite(folder):
                raise ConfigError(f"{folder}: has not finished: its {nonfinite} (no results.json); start it anew "
                                  "(train.resume=never) with a lower train.lr or another seed")
            raise ConfigError(f"{folder}: has not finished (no results.json): rerun its train command to go on")
        if not folder.exists():
            raise ConfigError(f"{folder}: no such run or folder")
        if not (folder.is_dir() and scan(folder, "", NESTED)):
            raise ConfigError(f"{folder}: no results.json (a finished run), repeat.json (a finished repeat series) "
                              "or search in it or in its subfolders")
    rows = [read_series(f, each_at) if (f / "repeat.json").is_file() else read_run(f, each_at)
            for f in dict.fromkeys(finished)]
    for trial in dict.fromkeys(stopped):
        search = trial.parent.parent / "search.json"
        rows.append(read_stopped_trial(trial, each_at, _read_json(search) if search.is_file() else {}))
    rows += [row for scored in evaluated.values() for row in scored]
    in_series = {run.resolve(): r.folder.name for r in rows for run in r.split_runs}
    left_out += [f"{r.folder.name} (a split of the series {in_series[r.folder.resolve()]}, in its row)"
                 for r in rows if r.folder.resolve() in in_series]
    for r in (r for r in rows if r.split_runs):  # splits being added to a finished series (more --splits)
        apart.update((run.resolve(), f"a split being added to the series {r.folder.name}")
                     for run in _started_runs(r.folder) if run.resolve() not in in_series)
    left_out += [f"{r.folder.name} ({apart[r.folder.resolve()]})" for r in rows if r.folder.resolve() in apart]
    if left_out:
        print(f"report: left out: {'; '.join(left_out)}", file=sys.stderr)
    rows = [r for r in rows if r.folder.resolve() not in in_series and r.folder.resolve() not in apart]
    if not rows:
        raise ConfigError(f"{', '.join(map(str, folders))}: no finished run, series or trial to report")
    return rows


def by_epoch(rows: list[Row], epochs: list[int] | None = None) -> list[Row]:
    """Each finished run as a row per epoch of its history (`epochs`: those alone), every set as scored after that
    epoch: Table 9 read off one run. Series, trials and evaluate's rows stay as they are."""
    out = []
    for row in rows:
        if row.history is None:
            out.append(row)
            continue
        path, history = row.folder / "results.json", row.history
        have = [r.get("epoch") for r in history]
        missing = [e for e in epochs or [] if e not in have]
        if not history:
            raise ConfigError(f"{path}: --by-epoch: no epochs in its history")
        if missing:
            raise ConfigError(f"{path}: --by-epoch {' '.join(map(str, missing))}: no such epoch in its history "
                              f"(it has {', '.join(map(str, have))})")
        for record in history:
            if epochs is None or record.get("epoch") in epochs:
                each = _row(row.folder, row.config, record.get("eval") or {})
                each.epoch, each.started_for = record.get("epoch"), row.started_for
                out.append(each)
    return out


def _model_settings(config: dict) -> dict:
    """What makes a model, of a run's settings: its model.* and ldg.* keys, less where and how it ran."""
    return {k: v for k, v in config.items() if k.startswith(("model.", "ldg.")) and not k.startswith(NOT_SETTINGS)}


def merge_train(rows: list[Row]) -> list[Row]:
    """The runs (and series) of one model, its model.* and ldg.* settings, as one row, as the seed's Tables 5, 7 and 8
    print a model trained on each set (FLIVE for fewer epochs): each run's own splits under its dataset's name, its
    cross-dataset sets as TRAIN→SET; with --by-epoch, a row per model and epoch. A stopped trial is a row of its own,
    named alike; evaluate's rows stay as they are."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        key = "" if row.label or row.stopped else \
            json.dumps([_model_settings(row.config), row.splits, row.epoch], sort_keys=True, default=str)
        groups.setdefault(key or str(id(row)), []).append(row)
    merged = []
    for group in groups.values():
        if group[0].label:
            merged.append(group[0])
            continue
        trains = [dataset_name(r.config.get("data.train")) for r in group]
        twice = next((t for t in trains if trains.count(t) > 1), None)
        if twice is not None:
            a, b = [r.folder for r, t in zip(group, trains) if t == twice][:2]
            raise ConfigError(f"--merge-train: {a} and {b} are one model (model.* and ldg.* alike) trained on {twice} "
                              "twice: name one")
        # Labelled by what makes the model: the schedules of its runs may differ by training set.
        row = Row(group[0].folder, _model_settings(group[0].config), {}, group[0].splits, stopped=group[0].stopped,
                  epoch=group[0].epoch, merged=[r.folder for r in group],
                  started_for=sorted({e for r in group for e in r.started_for}),
                  started_on=[t for r, t in zip(group, trains) if r.started_for])
        for r, train in zip(group, trains):
            named = {c: c if c in r.own else f"{train}→{c}" for c in r.cells}
            row.cells.update({named[c]: v for c, v in r.cells.items()})
            row.counts.update({named[c]: v for c, v in r.counts.items()})
            row.fewer.update({(named[c], m): n for (c, m), n in r.fewer.items()})
            row.own |= r.own
        merged.append(row)
    return merged


def labels(rows: list[Row]) -> list[str]:
    return _marked(rows, _base_labels(rows))


def _base_labels(rows: list[Row]) -> list[str]:
    """Each row's settings that differ between the rows (the training set by its dataset), and its folder's name
    where none do or two rows would read alike; evaluate's rows by their own names, with their file's where two
    would read alike."""
    named = [r.label for r in rows if r.label]
    runs = iter(_settings_labels([r for r in rows if not r.label]))
    return [(f"{r.label} ({r.folder.name})" if named.count(r.label) > 1 else r.label) if r.label else next(runs)
            for r in rows]


def _differing(rows: list[Row], besides: str | None = None) -> list[str]:
    """Each row's settings that differ between the rows (the training set by its dataset), but for `besides`."""
    keys = sorted({k for r in rows for k in r.config if not k.startswith(NOT_SETTINGS) and k != besides},
                  key=lambda k: (k != "data.train", k))
    shown = [{("train" if k == "data.train" else k): dataset_name(r.config.get(k)) if k == "data.train"
              else r.config.get(k) for k in keys} for r in rows]
    differ = [k for k in shown[0] if len({json.dumps(comparable(k, s[k]), default=str) for s in shown}) > 1] \
        if rows else []
    return [settings_label({k: s[k] for k in differ}) for s in shown]


def _settings_labels(rows: list[Row]) -> list[str]:
    said = _differing(rows)
    alike = [(label, r.epoch) for label, r in zip(said, rows)]  # a run's epochs (--by-epoch) differ by their mark
    return [(f"{label} ({_folder_name(r)})" if alike.count((label, r.epoch)) > 1 else label) if label else
            _folder_name(r) for label, r in zip(said, rows)]


def _folder_name(row: Row) -> str:
    return "+".join(f.name for f in row.merged) if row.merged else row.folder.name


def _marked(rows: list[Row], names: list[str]) -> list[str]:
    """The names with what a reader must know of each row: its splits, how far a stopped trial got, and the epochs
    it was started for where train.resume=extend changed them (its config alone would not train it so)."""
    return [name + (f" ({r.splits} split{'s' * (r.splits != 1)})" if r.splits else "")
            + (f" [{r.stopped}]" if r.stopped else "") + (f" [epoch {r.epoch}]" if r.epoch is not None else "")
            + (f" [started for {', '.join(map(str, r.started_for))} epoch{'s' * (r.started_for != [1])}"
               f"{' on ' + ', '.join(r.started_on) if r.started_on else ''}]" if r.started_for else "")
            for name, r in zip(names, rows)]


def columns(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(c for r in rows for c in r.cells))


def rename(rows: list[Row], pairs: list[tuple[str, str]]) -> list[str]:
    """The rows' labels, and their columns (in place), as --rename pairs (label or column, new name) give them. A
    label is renamed without its marks (splits, stopped, started for), which it keeps."""
    names, cols = _base_labels(rows), columns(rows)
    for old, _ in pairs:
        if old not in names and old not in cols:
            raise ConfigError(f"--rename {old!r}: no row label or column is named so; the rows: "
                              f"{', '.join(repr(n) for n in names)}; the columns: {', '.join(repr(c) for c in cols)}")
    new = dict(pairs)
    for kind, given in (("rows", names), ("columns", cols)):
        # Rows alike before (same folder names and settings) stay so: only a rename that makes two alike is refused.
        renamed = [new.get(n, n) for n in given]
        sources: dict[str, set[str]] = {}
        for n, m in zip(given, renamed):
            sources.setdefault(m, set()).add(n)
        twice = next((m for m, ns in sources.items() if len(ns) > 1 and ns & set(new)), None)
        if twice is not None:
            raise ConfigError(f"--rename: two {kind} would both be named {twice!r}")
    for row in rows:
        row.cells = {new.get(c, c): v for c, v in row.cells.items()}
        row.counts = {new.get(c, c): v for c, v in row.counts.items()}
        row.fewer = {(new.get(c, c), m): n for (c, m), n in row.fewer.items()}
        row.own = {new.get(c, c) for c in row.own}
    return _marked(rows, [new.get(n, n) for n in names])


def _cell(value: tuple[float, float | None] | None) -> str:
    if value is None:
        return "-"
    mean, sd = value
    return f"{mean:.4f}" if sd is None else f"{mean:.4f}±{sd:.4f}"


def _mixed(rows: list[Row]) -> set[str]:
    """The columns where some rows hold their own test split and others a cross-dataset set (Table 8's)."""
    return {c for c in columns(rows) if len({c in r.own for r in rows if c in r.cells}) > 1}


def _grid(rows: list[Row], metrics: tuple[str, ...]) -> list[list[tuple[list[str], bool]]]:
    """Each row's cells: the metrics' values as text, and whether the first is its column's best (as the seed marks
    its best in bold). In a column that mixes own splits and cross-dataset sets, own cells are marked * and each kind
    has its own best: a model scored on its own test split would otherwise outshine every cross-dataset score."""
    cols, mixed = columns(rows), _mixed(rows)
    ranked = metrics[0] not in UNRANKED
    best = {(c, own): max((r.cells[c][metrics[0]][0] for r in rows if c in r.cells and (c in r.own) == own
                           and metrics[0] in r.cells[c] and not math.isnan(r.cells[c][metrics[0]][0])), default=None)
            for c in cols for own in (False, True)}
    return [[([_cell(row.cells.get(c, {}).get(m)) + (f" (n={row.fewer[c, m]})" if (c, m) in row.fewer else "")
               + ("*" if i == 0 and c in mixed and c in row.own and c in row.cells else "")
               for i, m in enumerate(metrics)],
              ranked and len(rows) > 1 and c in row.cells
              and row.cells[c].get(metrics[0], (None,))[0] == best[c, c in row.own])
             for c in cols] for row in rows]


def _footer(rows: list[Row], metrics: tuple[str, ...], each_at: str) -> str:
    return f"{' / '.join(m.upper() for m in metrics)}; {_taken(rows, each_at)}" + (
        "; a repeat series: mean±sd (sample, n-1) over its splits" if any(r.splits for r in rows) else "") + (
        "; *: the run's own test split, in a column of other runs' cross-dataset sets (each kind's best in bold; "
        "--cross-only leaves them out)" if _mixed(rows) else "") + (
        "; [epoch N]: every set as scored after epoch N" if any(r.epoch is not None for r in rows)
        and not _by_epoch_alone(rows) else "")


def markdown(rows: list[Row], metrics: tuple[str, ...], each_at: str, names: list[str] | None = None) -> str:
    """A row per run, SRCC / PLCC per set; each column's best first metric in bold."""
    cols = columns(rows)
    lines = ["| run | " + " | ".join(map(_md, cols)) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, cells in zip(names or labels(rows), _grid(rows, metrics)):
        lines.append(f"| {_md(name)} | " + " | ".join(
            " / ".join([f"**{values[0]}**" if top else values[0], *values[1:]]) for values, top in cells) + " |")
    return "\n".join([*lines, "", _footer(rows, metrics, each_at)]) + "\n"


def _md(text: str) -> str:
    """Text as a markdown table cell holds it: a bare | would end the cell."""
    return text.replace("|", r"\|")


# LaTeX's special characters in text, each as LaTeX writes it (<, > and | print otherwise as other glyphs in the default
# font encoding).
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
        "|": r"\textbar{}", "→": r"$\rightarrow$"}


def _tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text).replace("±", r"$\pm$")


def latex(rows: list[Row], metrics: tuple[str, ...], each_at: str, names: list[str] | None = None) -> str:
    """The same table as a booktabs tabular, to paste into a paper's table environment, with the markdown's footer
    below it (a row of the table would widen its last column to the footer's length)."""
    cols = columns(rows)
    lines = ["% needs \\usepackage{booktabs}", f"\\begin{{tabular}}{{l{'c' * len(cols)}}}", "\\toprule",
             " & ".join(["Run", *map(_tex, cols)]) + " \\\\", "\\midrule"]
    for name, cells in zip(names or labels(rows), _grid(rows, metrics)):
        # {} first: a row that began with [ would be read as the optional argument of the \\ before it.
        lines.append(" & ".join(["{}" + _tex(name), *(" / ".join(
            [f"\\textbf{{{_tex(values[0])}}}" if top else _tex(values[0]), *map(_tex, values[1:])])
            for values, top in cells)]) + " \\\\")
    footer = f"\\par\\smallskip{{\\footnotesize {_tex(_footer(rows, metrics, each_at))}}}"
    text = "\n".join([*lines, "\\bottomrule", "\\end{tabular}", footer]) + "\n"
    # Named by the user (--rename, folder names): pdfLaTeX reads UTF-8 but has glyphs for Latin scripts only.
    other = "".join(dict.fromkeys(ch for ch in text if ord(ch) > 127 and "LATIN" not in unicodedata.name(ch, "")))
    return text if not other else f"% holds characters outside the Latin script ({other}), which pdfLaTeX has no " \
        f"glyphs for: compile with XeLaTeX or LuaLaTeX\n{text}"


def _by_epoch_alone(rows: list[Row]) -> bool:
    """Whether every run's row is one of its epochs (--by-epoch), evaluate's rows aside."""
    return any(r.epoch is not None for r in rows) and all(r.epoch is not None or r.label for r in rows)


def _taken(rows: list[Row], each_at: str) -> str:
    """How the rows' values were taken, for the footer and the plots' titles."""
    return "every set as scored after the row's epoch" if _by_epoch_alone(rows) else _at(each_at)


def _at(each_at: str) -> str:
    return "each set at its own best epoch (IQA-PyTorch's way)" if each_at == "own" else \
        "every set at the epoch the key metric chose (the weights in checkpoints/best)"


def table_csv(rows: list[Row], metrics: tuple[str, ...], names: list[str] | None = None) -> str:
    """A row per run, a column per set and metric (and its sd over a series' splits), for a spreadsheet."""
    cols = columns(rows)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run", "folder", "splits", *(name for c in cols for name in (
        *(f"{c}/{m}{s}" for m in metrics for s in ("", "_sd")), f"{c}/count"))])
    for name, row in zip(names or labels(rows), rows):
        values = []
        for c in cols:
            for m in metrics:
                mean, sd = row.cells.get(c, {}).get(m) or ("", None)
                values += [mean, "" if sd is None else sd]
            values.append(row.counts.get(c, ""))  # the samples a run's set scored: which set a column holds
        writer.writerow([name, ";".join(map(str, row.merged or [row.folder])), row.splits or "", *values])
    return out.getvalue()


def layer_points(rows: list[Row], metric: str) -> dict[str, list[tuple[int, float]]]:
    """Each column's (K, value) over the rows whose model.layers is only:K or upto:K: a line per kind where the rows
    hold both, and per other setting in which they differ (a search of prompts by layers); a ConfigError where none
    does."""
    layered = [r for r in rows if re.fullmatch(r"(only|upto):\d+", str(r.config.get("model.layers")))]
    kinds = {str(r.config.get("model.layers")).partition(":")[0] for r in layered}
    lines: dict[str, list[tuple[int, float]]] = {}
    for row, others in zip(layered, _differing(layered, besides="model.layers")):
        kind, _, k = str(row.config.get("model.layers")).partition(":")
        apart = [f"{kind}:K"] * (len(kinds) > 1) + [others] * bool(others)
        for column, values in row.cells.items():
            if metric in values and not math.isnan(values[metric][0]):
                name = column + (f" ({', '.join(apart)})" if apart else "")
                if int(k) in (at for at, _ in lines.get(name, [])):  # a line through both would draw a zig-zag
                    raise ConfigError(f"--layer-plot: two rows at layer {k} for {name} ({row.folder.name} among "
                                      "them): give one row a layer (not --by-epoch)")
                lines.setdefault(name, []).append((int(k), values[metric][0]))
    if not lines:
        raise ConfigError(f"--layer-plot: no row has model.layers only:K or upto:K with a {metric} (they have "
                          f"{', '.join(sorted(map(str, {r.config.get('model.layers') for r in rows})))})")
    return lines


OUT_SUFFIXES = (".md", ".csv", ".tex")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m temu_dist.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", metavar="RUN",
                        help="run folders, repeat series, searches, folders of them, or files evaluate --out wrote")
    parser.add_argument("--each-at", choices=("own", "key"), default="own",
                        help="own: each set at its own best epoch (IQA-PyTorch); key: at the key metric's best epoch")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=["srcc", "plcc"],
                        help="plcc_fit: PLCC after a fitted logistic, where eval.plcc_fit scored it; pred_mean, "
                             "target_mean: an eval.ldg set's mean prediction and target (Fig. 11)")
    parser.add_argument("--out", action="append", default=[], metavar="FILE",
                        help="also write the table to this .md, .csv or .tex (LaTeX, booktabs) file (repeatable)")
    parser.add_argument("--plot", help="also draw the first metric as a coloured grid to this .png file")
    parser.add_argument("--layer-plot", metavar="FILE.png",
                        help="also draw the first metric against each row's layer K (model.layers only:K or upto:K), "
                             "a line per set (and per other setting the rows differ in): the seed's Fig. 8 from a "
                             "single-layer search")
    parser.add_argument("--merge-train", action="store_true",
                        help="a row per model (model.* and ldg.* settings), its runs on each training set side by side "
                             "(own splits by dataset, cross sets as TRAIN→SET), as the seed's Tables 5, 7 and 8")
    parser.add_argument("--by-epoch", nargs="*", type=int, metavar="N",
                        help="a row per epoch of each run (those N alone, where given), every set as scored after it: "
                             "the seed's Table 9 read off one run (give it after the folders)")
    parser.add_argument("--cross-only", action="store_true",
                        help="leave out each run's own splits: cross-dataset sets alone, as the seed's Table 8")
    parser.add_argument("--rename", nargs=2, action="append", default=[], metavar=("NAME", "NEW"),
                        help="print a row label or a column under another name, e.g. --rename variant=S 'TeMu-IQA (S)' "
                             "--rename kadid10k KADID-10k (repeatable)")
    args = parser.parse_args(argv)
    metrics = tuple(args.metrics)
    try:
        for flag, path, suffixes in (*(("--out", out, OUT_SUFFIXES) for out in args.out),
                                     ("--plot", args.plot, (".png",)), ("--layer-plot", args.layer_plot, (".png",))):
            if path and Path(path).suffix not in suffixes:
                raise ConfigError(f"{flag} {path}: a {' or '.join(suffixes)} file")
            if path and not Path(path).resolve().parent.is_dir():
                raise ConfigError(f"{flag} {path}: no folder {Path(path).resolve().parent}")
            if path and Path(path).is_dir():
                raise ConfigError(f"{flag} {path}: it is a folder, not a file")
            if path:
                check_output_folder(Path(path).resolve().parent, flag)
        rows = collect(args.folders, args.each_at)
        if args.by_epoch is not None:
            rows = by_epoch(rows, args.by_epoch or None)
        if args.cross_only:
            for row in rows:
                row.cells = {c: v for c, v in row.cells.items() if c not in row.own}
                row.counts = {c: v for c, v in row.counts.items() if c not in row.own}
                row.fewer = {(c, m): n for (c, m), n in row.fewer.items() if c not in row.own}
                row.own = set()
            if not any(row.cells for row in rows):
                raise ConfigError("--cross-only: no run here was scored on a set other than its own (eval.cross, or "
                                  "evaluate --shards): nothing to lay out")
        if args.merge_train:
            rows = merge_train(rows)
        names = rename(rows, args.rename)  # each run's pack manifest read once, for every output
        by_layer = layer_points(rows, metrics[0]) if args.layer_plot else {}
    except ConfigError as e:
        print(f"report: {e}", file=sys.stderr)
        return 1
    table = markdown(rows, metrics, args.each_at, names)
    print(table, end="")
    for out in args.out:
        suffix = Path(out).suffix
        write_text_atomic(Path(out), table if suffix == ".md" else table_csv(rows, metrics, names)
                          if suffix == ".csv" else latex(rows, metrics, args.each_at, names))
        print(f"report: written to {out}", file=sys.stderr)  # stdout is the table, for a redirect
    if args.plot:
        from temu_dist.plots import results_grid

        cols = columns(rows)
        values = [[r.cells.get(c, {}).get(metrics[0], (math.nan, None))[0] for c in cols] for r in rows]
        with notices_as_lines("report"):
            results_grid(names, cols, values, metrics[0].upper(), args.plot, _taken(rows, args.each_at))
        print(f"report: plot in {args.plot}", file=sys.stderr)
    if args.layer_plot:
        from temu_dist.plots import layer_sets

        with notices_as_lines("report"):
            layer_sets(by_layer, metrics[0].upper(), args.layer_plot, _taken(rows, args.each_at))
        print(f"report: layer plot in {args.layer_plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
