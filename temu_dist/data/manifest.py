"""A pack's manifest.json, which the packer writes last: read by the streams, by pack --verify and by a pack rerun into
a finished folder. Its own module so the packer does not import the streams (torch, webdataset)."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import get_args

from temu_dist.config import Config, ConfigError, Split

MANIFEST = "manifest.json"
STARTED = "pack.json"  # the options a pack was started with, written before its first shard
PACK_LOCK = "pack.lock"  # held by the pack writing the folder
# The image formats a shard stores, by PIL's name, each under its extension (the key's suffix the streams read). MPO,
# a phone camera's JPEG with its other pictures after the first, is a JPEG to every decoder.
IMAGE_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
# What a pack folder holds: shards, the images each left out, pack.json, the lock, the manifest; each as NAME.tmp while
# written.
PACK_FILE = re.compile(rf"(?:(?:{'|'.join(get_args(Split))})-\d{{6,}}\.tar(?:\.skipped\.json)?|"
                       rf"{re.escape(STARTED)}|{re.escape(PACK_LOCK)}|{re.escape(MANIFEST)})(?:\.tmp)?")


class ShardsMissing(ConfigError):
    """A shard folder or split that is not there; the message says which pack command makes it, then which other
    packs the config names are not there either, as (key, folder)."""

    def __init__(self, message: str, unpacked: Sequence[tuple[str, str]] = ()):
        self.message, self.unpacked = message, list(unpacked)
        others = ", ".join(f"{key} ({folder})" for key, folder in self.unpacked)
        super().__init__(message + (f"; not packed either: {others}" if others else ""))


@contextmanager
def pack_named_by(key: str) -> Iterator[None]:
    """A missing pack's message, within, starts with the key that named the folder (data.train, eval.cross.0.shards)."""
    try:
        yield
    except ShardsMissing as e:
        raise ShardsMissing(f"{key}: {e.message}", e.unpacked) from None


@contextmanager
def naming_unpacked(then: Iterable[tuple[str, str]], covered: Iterable[str] = ()) -> Iterator[None]:
    """A missing pack's message, within, names those of the packs checked after it, (key, folder), that are not there
    either (no manifest), each folder once, but the `covered` ones, which the checks within name: one check lists every
    pack a config of several sets, splits or trials still needs."""
    try:
        yield
    except ShardsMissing as e:
        unpacked = list(e.unpacked)
        seen = {Path(folder).resolve() for folder in [*covered, *(folder for _, folder in unpacked)]}
        for key, folder in then:
            if Path(folder).resolve() not in seen and not (Path(folder) / MANIFEST).is_file():
                unpacked.append((key, folder))
                seen.add(Path(folder).resolve())
        raise ShardsMissing(e.message, unpacked) from None


def naming_later_packs(configs: Sequence[Config], index: int) -> AbstractContextManager:
    """Within the checks of configs[index] (a series' splits, a search's trials, each checked in turn): a missing pack
    names the later configs' missing packs too."""
    return naming_unpacked([pack for later in configs[index + 1:] for pack in later.pack_folders()],
                           covered=[folder for _, folder in configs[index].pack_folders()])


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        _refuse_other_files(Path(folder))
        how = "make demo" if Path(folder).resolve() == Path("shards/demo").resolve() else _pack_command(Path(folder))
        # A run's config keeps the path as given: evaluated from another folder, a relative one is looked for there.
        where = "" if Path(folder).is_absolute() else \
            f" (a relative path, read from the working folder {Path.cwd()}; give the pack's whole path if it lies " \
            "elsewhere)"
        raise ShardsMissing(f"{path} not found{where}: make the shards first, e.g. {how}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardsMissing(f"{path}: unreadable ({e}): rerun the pack command that made {folder}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ShardsMissing(f"{path}: not a pack manifest (no 'splits'): rerun the pack command that made {folder}")
    return manifest


def pack_digest(folder: str | Path) -> str:
    """What a finished pack holds, as one hash of its manifest's shards (names, hashes, counts), split and order: the
    same pack wherever it is copied to or however its path is spelt, another one once packed again."""
    manifest = read_manifest(folder)
    held = {key: manifest.get(key) for key in ("dataset", "split", "order", "splits")}
    return hashlib.sha256(json.dumps(held, sort_keys=True).encode()).hexdigest()


def _refuse_other_files(folder: Path) -> None:
    """A folder named as a pack that holds something else: packs in its subfolders (a series' parent), or a dataset's
    own files, which the pack command a missing pack is told would write its pack into. A pack being written
    (pack.json, shards) and an empty folder pass: they are missing packs."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
    if not entries or any(PACK_FILE.fullmatch(p.name) for p in entries):
        return
    packs = sorted(p.name for p in entries if (p / MANIFEST).is_file())
    if packs:
        raise ShardsMissing(f"{folder} is no pack but holds packs ({', '.join(packs[:3])}{', ...' * (len(packs) > 3)})"
                            f": name one, e.g. {folder / packs[0]}")
    dataset = dataset_of(folder)
    raise ShardsMissing(f"{folder} holds no pack (.tar shards and a {MANIFEST}): if these are a dataset's own files, "
                        f"pack them into a folder of their own, e.g. python -m temu_dist.pack --dataset {dataset} "
                        f"--root {folder} --out shards/{dataset}, and name that")


def _pack_command(folder: Path) -> str:
    """The pack command for a folder, with the split its name asks for in the configs' convention: NAME-all (the whole
    set, for cross-dataset tests), NAME-qalign (Q-Align's split), NAME-official, NAME-loda (LoDa's KonIQ-10k split),
    NAME/splitI (the i-th seeded split), NAME alone (the release's own split where it has one, as the configs train
    KonIQ-10k and FLIVE, else 80/20)."""
    from temu_dist.data.sources import DATASETS

    dataset = dataset_of(folder)
    how = f"python -m temu_dist.pack --dataset {dataset} --root DATASET_DIR --out {folder}"
    words = set(re.split(r"[-_. ]", folder.name.lower()))
    index = re.fullmatch(r"split(\d+)", folder.name)
    if "all" in words:
        return how + " --ratios 0 0 1 (the whole set as its test split)"
    if "qalign" in words:
        return (how + f" --split file --split-file {dataset}-qalign.csv (made from Q-Align's JSON files by python -m "
                f"temu_dist.data.qalign)")
    if "official" in words or folder.name == dataset and dataset in DATASETS and DATASETS[dataset].official_split:
        return how + " --split official"
    if "loda" in words and dataset == "koniq10k":
        return (how + " --meta-csv meta_info_KonIQ10kDataset.csv --split file --split-file koniq10k_82_seed3407.pkl "
                "--split-index 0 (LoDa's split, from IQA-PyTorch's files: configs/experiments/fig6-vitb16-time.yaml "
                "says how to check its order)")
    return how + f" --split-index {index[1]}" if index else how


# The names the papers and IQA-PyTorch give the datasets whose pack names differ.
ALIASES = {"clive": "livec", "livechallenge": "livec", "liveitw": "livec", "livefb": "flive", "paq2piq": "flive"}


def dataset_name(train: str | None) -> str:
    """The dataset a training pack holds (a series' packs, data.train with {split}: the first's), as its manifest
    says; else as its folder's name suggests; else the path as given."""
    if not train:
        return ""
    folder = Path(train.replace("{split}", "0"))
    try:
        return str(json.loads((folder / MANIFEST).read_text())["dataset"])
    except (OSError, ValueError, KeyError, TypeError):
        guess = dataset_of(folder)
        return guess if guess != "NAME" else train


def dataset_of(folder: Path) -> str:
    """The dataset a pack folder's name, or its parent's, points at (shards/KonIQ-10k, shards/koniq_1024,
    shards/csiq-all, shards/agiqa3k/split3, shards/clive), else NAME."""
    # Imported only for this message: the module holds the release readers.
    from temu_dist.data.sources import DATASETS

    for part in (folder.name, folder.parent.name):
        # The whole name, then its first word (koniq_1024, csiq-all).
        for name in (part, re.split(r"[-_. ]", part)[0]):
            name = "".join(c for c in name.lower() if c.isalnum())
            name = ALIASES.get(name, name)
            if name in DATASETS:
                return name
            # A shortened name (koniq, kadid, agiqa), long enough to mean one dataset only.
            matches = [d for d in DATASETS if len(name) >= 4 and d.startswith(name)]
            if len(matches) == 1:
                return matches[0]
    return "NAME"
