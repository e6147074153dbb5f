"""Whether a run may go on from its checkpoint, and where: the settings a resume may change and those it may not, the
packs it was trained and scored on, an extension's longer schedule, and a mid-epoch position in another batch plan.
train() asks; tune asks which settings a run's results depend on."""
from __future__ import annotations

from pathlib import Path

import torch

from temu_dist.checkpoint import find_checkpoint, load_saved_config, load_trainer_info
from temu_dist.config import Config, ConfigError, differ, dump, flatten, list_of, value_at
from temu_dist.data.manifest import pack_digest
from temu_dist.data.stream import read_by
from temu_dist.distributed import BatchPlan
from temu_dist.model.io import MODEL_ADDED, with_legacy_fields
from temu_dist.optim import epoch_schedule, lengthen

# What a resumed run may change: everything else must match the checkpoint, or the resumed run would not be the
# run it continues. Of the model, only how it is compiled: evaluate and predict may also load a checkpoint onto another
# input size, resize, dtype or frozen tower, a resumed run may not train on one.
RESUME_MAY_CHANGE = {"train.resume", "train.checkpoint_every", "train.log_every", "train.timeout_min", "data.workers",
                     "eval.batch_size", "tracking.enabled", "tracking.uri", "model.compile", "model.compile_mode",
                     "train.keep_tokens"}


# Keys added since checkpoints were first written, each with the value a run saved before it had (trained or was
# scored with); None where no value holds (train.plcc_over: such a run resumes with this run's value, and says so).
ADDED_SINCE: dict[str, object] = {"train.plcc_over": None, "model.tower_fp8": False, "eval.ldg": False,
                                   "train.optimizer": "adam", "train.warmup_steps": 0, "train.grad_clip_norm": 0.0,
                                   "eval.plcc_fit": "none", "train.lr_schedule": "step",
                                   **{f"model.{key}": value for key, value in MODEL_ADDED.items()}}


# The config sections a run's weights depend on (a search's results also on eval, what they are scored on).
TRAINED_SECTIONS = ("seed", "model", "train", "ldg", "data")
REPLACE = "start anew in its place with train.resume=never, which replaces its checkpoints and results"


def first_change(saved: dict, config: Config, sections: tuple[str, ...],
                 may_change: set[str]) -> tuple[str, object, object] | None:
    """(key, saved value, this run's value) of the first key of `sections` that differs, but those in may_change. A
    list of sections (eval.cross), which is given whole, is named and shown whole."""
    tree = dump(config)
    ours, theirs = flatten(tree), flatten(saved)
    for key in sorted(set(ours) | set(theirs)):
        if key.split(".")[0] not in sections or key in may_change:
            continue
        if key in ADDED_SINCE and key not in theirs:
            if ADDED_SINCE[key] is not None and ours.get(key) != ADDED_SINCE[key]:
                return key, ADDED_SINCE[key], ours.get(key)
        elif differ(key, ours.get(key), theirs.get(key)):
            whole = list_of(key)
            if whole != key or isinstance(ours.get(key, theirs.get(key)), list):
                return whole, value_at(saved, whole), value_at(tree, whole)
            return key, theirs.get(key), ours.get(key)
    return None


def packs(config: Config) -> dict[str, tuple[str, str]]:
    """The packs a run trains and is scored on, by the key that names each: (path, manifest.pack_digest)."""
    paths = {"data.train": config.data.train, **{f"eval.cross.{s.name}": s.shards for s in config.eval.cross}}
    return {key: (path, pack_digest(path)) for key, path in paths.items()}


def as_packed_here(saved: dict, packs: dict[str, tuple[str, str]], info: dict, last: Path) -> dict:
    """`saved` with this config's pack paths where they hold the packs the run was trained and scored on: a pack is
    known by what it holds, not by how its path is spelt (relative, absolute, copied to a node's own disk). A pack
    that holds another (packed again in place) is refused. A checkpoint saved before it recorded them: by path."""
    was = info.get("packs")
    if not isinstance(was, dict):
        return saved
    cross = {s.get("name"): s for s in saved.get("eval", {}).get("cross", []) if isinstance(s, dict)}
    for key, (path, digest) in packs.items():
        if key not in was:
            continue  # a set the run was not scored on: the evaluation check says so
        if was[key] != digest:
            if key != "data.train" and not info.get("history"):
                continue  # not scored on yet: any evaluation goes (check_same_evaluation)
            raise ConfigError(f"{'data.train' if key == 'data.train' else 'eval.cross'}: {path} holds another pack "
                              f"than {last} was {'trained' if key == 'data.train' else 'scored'} on (its manifest "
                              f"differs: packed again?); resume with that pack, or give this run another name=, or "
                              f"{REPLACE}")
        if key == "data.train":
            saved["data"]["train"] = path
        elif key.removeprefix("eval.cross.") in cross:
            cross[key.removeprefix("eval.cross.")]["shards"] = path
    return saved


def check_resumable(saved: dict, config: Config, where: Path) -> None:
    # With PLCC over the step the micro-batch only sets memory: a resume on a smaller device may change it. (Without
    # PLCC the micro-batches' own MSE, weighted by their LDG copies, still depends on it.)
    may_change = RESUME_MAY_CHANGE | ({"train.per_device_batch"} if config.train.plcc_over == "step"
                                      and config.train.plcc_weight else set()) \
        | ({"train.epochs"} if config.train.resume == "extend" else set())
    change = first_change(saved, config, TRAINED_SECTIONS, may_change)
    if change:
        key, theirs, ours = change
        further = "train it for another number of epochs with train.resume=extend, or " if key == "train.epochs" else ""
        raise ConfigError(f"{key}: {where} was trained with {theirs!r}, this run asks for {ours!r}; {further}resume "
                          f"with the same value, or give this run another name=, or {REPLACE}")


def check_extendable(config: Config) -> bool:
    """train.resume=extend asks a run to go on for train.epochs: it must be there, resumable with this config, have an
    epoch or part of one left under the new count, and be scored as its epochs so far were, so that they compare.
    Checked before anything is written (repeat: for every split before the first trains). Whether train.epochs
    changes."""
    return going_on(config, last_checkpoint(config), packs(config))[2] == "extended"


def last_checkpoint(config: Config) -> Path | None:
    """The checkpoint a run of this config goes on from (none with train.resume=never)."""
    return find_checkpoint(config.run_dir() / "checkpoints" / "last") if config.train.resume != "never" else None


def going_on(config: Config, last: Path | None,
             packs_here: dict[str, tuple[str, str]]) -> tuple[dict, dict, str] | None:
    """saved_run of the checkpoint `last`, or None for a run that starts anew; train.resume=extend needs one."""
    if config.train.resume == "extend" and last is None:
        raise ConfigError(f"train.resume: extend, but {config.run_dir()} holds no run to extend (checkpoints/last); "
                          "start it with train.resume=auto")
    return None if last is None else saved_run(config, last, packs_here)


def saved_run(config: Config, last: Path, packs_here: dict[str, tuple[str, str]]) -> tuple[dict, dict, str]:
    """The config (its packs' paths as here) and trainer info of the run the checkpoint `last` holds, checked as going
    on from it with this config needs: resumable, extendable where asked, scored as its epochs were. Also how it goes
    on: finished, extended or resumed."""
    info = load_trainer_info(last)
    saved = as_packed_here(with_legacy_fields(load_saved_config(last)), packs_here, info, last)
    check_resumable(saved, config, last)
    position = info.get("in_epoch", {})
    if position and "steps" not in position and saved["train"].get("per_device_batch") != config.train.per_device_batch:
        raise ConfigError(f"train.per_device_batch: {last} holds a mid-epoch position saved before a resume could "
                          f"change it; resume with {saved['train'].get('per_device_batch')!r}")
    extending = config.train.resume == "extend" and extends(saved, info, config, last)
    how = "finished" if info["next_epoch"] >= config.train.epochs else "extended" if extending else "resumed"
    check_same_evaluation(saved, config, last, info, how)
    return saved, info, how


def extends(saved: dict, info: dict, config: Config, last: Path) -> bool:
    """Whether train.resume=extend gives the run `last` holds another train.epochs: one more than it has trained."""
    epochs, trained = saved["train"]["epochs"], info["next_epoch"]
    if config.train.epochs == epochs:
        return False
    if config.train.epochs <= trained:
        raise ConfigError(f"train.epochs: {last} has trained {trained} epoch{'s' * (trained != 1)}; extend it to "
                          f"more than {trained}, or leave it at {epochs}")
    return True


def extend_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, saved_epochs: int, epochs: int,
                    steps_per_epoch: int, epoch_from: tuple[int, int] | None = None) -> dict:
    """Makes the schedule of a run started for `saved_epochs` as long as `epochs` from the step it stands at; what
    changed, for the run's records (extended so, it does not train as one started for `epochs` would). A per-epoch
    cosine (train.lr_schedule=epoch) is made longer at `epoch_from`, (epoch, its steps trained), where the run goes on:
    a finished run's rate is its next epoch's."""
    if epoch_from is None:
        t, lr_from, lr_to = lengthen(scheduler, steps_per_epoch * epochs)
    else:
        epoch_schedule(scheduler, epoch_from[0])
        _, lr_from, lr_to = lengthen(scheduler, epochs)
        t = epoch_from[0] * steps_per_epoch + epoch_from[1]
    return {"epochs_from": saved_epochs, "epochs_to": epochs, "after_step": t, "lr_from": lr_from, "lr_to": lr_to}


def extended_tag(extended: list[dict]) -> dict[str, str]:
    return {"extended": "; ".join(f"{e['epochs_from']} -> {e['epochs_to']} epochs after step {e['after_step']}"
                                  for e in extended)} if extended else {}


def check_same_evaluation(saved: dict, config: Config, last: Path, info: dict, how: str) -> None:
    """A run goes on scored as its epochs so far were (`how` it goes on: finished, resumed, extended). Finished, it
    returns the results it has, which other evaluation sets or settings would pass off as theirs; resumed or extended,
    its epochs compare, and its best is picked among them, only so. Before its first epoch's scores anything goes."""
    change = first_change(saved, config, ("eval",), RESUME_MAY_CHANGE) if info["history"] else None
    if not change:
        return
    key, theirs, ours = change
    if how == "finished":
        run_dir = last.parent.parent
        override = f"'{key}=[...]'" if isinstance(ours, list) else f"{key}=..."  # a list is given whole
        raise ConfigError(f"{key}: {run_dir} finished with {theirs!r}, this run asks for {ours!r}; a finished run is "
                          f"not evaluated again: score its best weights with python -m temu_dist.evaluate --checkpoint "
                          f"{run_dir} {override}, or train under another name=, or {REPLACE}")
    a_run, verb = {"resumed": ("a resumed", "resume"), "extended": ("an extended", "extend")}[how]
    raise ConfigError(f"{key}: {last} was scored with {theirs!r}, this run asks for {ours!r}; {a_run} run is scored "
                      f"as its epochs so far were, so that they compare: {verb} it with the same value and score its "
                      f"weights otherwise with python -m temu_dist.evaluate, or train under another name=, or "
                      f"{REPLACE}")


def in_this_plan(in_epoch: dict, plan: BatchPlan) -> dict:
    """A mid-epoch position, saved under any batch plan (processes, micro-batch), in this plan's micro-batches: the
    same optimizer steps, whatever micro-batches make them up. A checkpoint written before `steps` was saved is taken
    to share this plan."""
    if not in_epoch:
        return {}
    saved = in_epoch["micro_batches"]
    micro = in_epoch.get("steps", saved // plan.accumulation) * plan.accumulation
    return {**in_epoch, "micro_batches": micro, "loss_sum": in_epoch["loss_sum"] * micro / saved if saved else 0.0,
            "images": round(in_epoch["images"] * in_epoch.get("processes", plan.world_size) / plan.world_size)}


def read_per_reader(micro_batches: int, per_device: int, processes: int, workers: int) -> list[int]:
    """How many samples each data reader (rank x worker) has read after this many micro-batches: over several workers
    the same step may leave them elsewhere in another plan."""
    return [read_by(w, workers, micro_batches, per_device) for _ in range(processes) for w in range(workers)]


def saved_reads(position: dict, config: Config) -> list[int] | None:
    """read_per_reader at a saved mid-epoch position, in the plan it was saved in; None where it does not say."""
    if "processes" not in position:
        return None
    processes, micro = position["processes"], position["micro_batches"]
    return read_per_reader(micro, saved_per_device(position, config), processes, position["readers"] // processes)


def saved_per_device(position: dict, config: Config) -> int:
    """The micro-batch a mid-epoch position that says its plan was saved in."""
    return config.train.batch_size // (position["micro_batches"] // position["steps"] * position["processes"])


def readers_said(processes: int, readers: int, per_device: int) -> str:
    """The data readers' layout, which decides where each stands in the epoch (a process's data.workers, or itself
    where it has none)."""
    each = readers // processes
    return (f"{processes} process{'es' * (processes != 1)} x {each} reader{'s' * (each != 1)} in micro-batches of "
            f"{per_device}")
