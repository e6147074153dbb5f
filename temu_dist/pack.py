"""Released files -> WebDataset shards per split, with manifest.json. Parallel, resumable, atomic.

    python -m temu_dist.pack --dataset kadid10k --root ~/data/kadid10k --out shards/kadid10k
    python -m temu_dist.pack --dataset agiqa3k --root DIR --out shards/agiqa3k/split3 --split-index 3
    python -m temu_dist.pack --verify shards/kadid10k

A dataset of your own is read from a CSV, as IQA-PyTorch's general datasets are: a header, then a row per image with
its path under --root and its score on the scale --mos-range gives (--lower-better for DMOS); --columns names the
image, score and reference columns where they are not the first two:

    python -m temu_dist.pack --dataset mine --root DIR --out shards/mine --label-file scores.csv --mos-range 1 5

Each sample is the image's bytes (re-encoded only when resized or when the release stores BMP/TIFF; a phone's
multi-picture JPEG, MPO, is kept as the JPEG it is) and a JSON label (name, dataset, mos, mos_raw, ref, split). A shard
appears under its final name only once complete; the manifest is written last, so a folder with a manifest is a finished
pack. Rerunning after an interruption keeps finished shards (writing again any that a power loss cut short) and writes
the rest. Each split's samples are dealt to its shards at random (seed 0). Records are streamed and handed to workers a
shard at a time: memory stays flat whatever the dataset size.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import signal
import sys
import tarfile
import threading
import time
from array import array
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from temu_dist import lock
from temu_dist.atomic import write_json_atomic
from temu_dist.config import ConfigError, check_output_folder
from temu_dist.data.images import pil_rgb
from temu_dist.data.manifest import (IMAGE_FORMATS, MANIFEST, PACK_FILE, PACK_LOCK, STARTED, ShardsMissing,
                                     read_manifest)
from temu_dist.data.sources import (DATASETS, META_SPLIT_COLUMNS, CsvLabels, DataError, DatasetInfo, Record,
                                    image_folder, label_scale, read_csv_labels, read_pyiqa_meta, read_records)
from temu_dist.data.splits import NOT_LISTED, SPLITS, SplitSpec, split_read, splitter
from temu_dist.stop import Terminated, sigterm_as_ctrl_c, stop_code

FORMAT = "temu-dist-shards/1"
# Samples dealt to shards at random by ORDER_SEED (a manifest's "order"); packs without one kept the label file's.
ORDER = "shuffled"
ORDER_SEED = 0
# Labels held at once while the shards are dealt (a few hundred bytes each).
WINDOW = 32768


def _cpus() -> int:
    """The CPUs this process may run on (taskset, a SLURM job's share), not the node's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class PackOptions:
    dataset: str
    root: str
    out: str
    label_file: str | None = None
    meta_csv: str | None = None  # IQA-PyTorch meta-info CSV instead of the release's label file
    split: SplitSpec = field(default_factory=SplitSpec)
    shard_size: int = 1000
    workers: int = field(default_factory=_cpus)
    resize_shorter: int | None = None
    skip_bad: bool = False
    csv: CsvLabels | None = None  # a dataset of one's own, from label_file
    image_dir: str | None = None  # under root: the images' folder, where not the release's or IQA-PyTorch's layout

    def info(self) -> DatasetInfo:
        return self.csv.info(str(self.label_file)) if self.csv else DATASETS[self.dataset]


@dataclass
class ShardResult:
    name: str
    split: str
    count: int
    sha256: str
    skipped: list[dict]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _encode(path: Path, resize_shorter: int | None) -> tuple[bytes, str] | str:
    """The bytes to store and their extension, or why the image cannot be read. Decodes the whole image, so a
    truncated file is caught here rather than in training."""
    try:
        return _encode_image(path, resize_shorter)
    except FileNotFoundError as e:
        return f"file not found: {e.filename}"
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"not an image ({type(e).__name__}: {e})".splitlines()[0]


def _encode_image(path: Path, resize_shorter: int | None) -> tuple[bytes, str]:
    with Image.open(path) as im:
        im.load()
        fmt = im.format
        if resize_shorter and min(im.size) > resize_shorter:
            scale = resize_shorter / min(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            small = pil_rgb(im).resize(size, Image.BICUBIC)
            buf = io.BytesIO()
            if IMAGE_FORMATS.get(fmt) == "jpg":
                small.save(buf, format="JPEG", quality=95)
                return buf.getvalue(), "jpg"
            small.save(buf, format="PNG")
            return buf.getvalue(), "png"
        if fmt in IMAGE_FORMATS:  # kept byte for byte; anything else (BMP, TIFF, ...) is stored losslessly as PNG
            return path.read_bytes(), IMAGE_FORMATS[fmt]
        buf = io.BytesIO()
        pil_rgb(im).save(buf, format="PNG")
        return buf.getvalue(), "png"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # identical inputs give identical shards, hence identical hashes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(directory: str, name: str, split: str, samples: list[tuple[str, dict]], resize_shorter: int | None,
                skip_bad: bool, label_file: str) -> ShardResult:
    """Writes one shard to NAME.tmp and renames it; a bad image raises DataError (no partial shard stays) or, with
    skip_bad, is left out and reported. label_file names the label file in messages."""
    final = Path(directory) / name
    tmp = final.with_name(name + ".tmp")
    sidecar = final.with_name(name + ".skipped.json")
    skipped = []
    count = 0
    try:
        # A plain tar of key.ext members is the WebDataset format; writing it directly lets us fix mtimes.
        with open(tmp, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w") as tar:
                for key, label in samples:
                    encoded = _encode(Path(label.pop("path")), resize_shorter)
                    if isinstance(encoded, str):
                        if not skip_bad:
                            raise DataError(f"{label['name']} ({label_file} row {label['row']}): cannot read image: "
                                            f"{encoded}; fix or remove it, or leave it out with --skip-bad")
                        skipped.append({"name": label["name"], "row": label["row"], "reason": encoded})
                        _note_read()
                        continue
                    _note_read()
                    data, ext = encoded
                    _add(tar, f"{key}.{ext}", data)
                    _add(tar, f"{key}.json", json.dumps(label, sort_keys=True).encode())
                    count += 1
            fh.flush()
            os.fsync(fh.fileno())  # before the rename that publishes it, as temu_dist.atomic does
        if skipped:
            write_json_atomic(sidecar, skipped)
        else:  # one a run stopped before its shard's rename left behind would leave images out on resume
            sidecar.unlink(missing_ok=True)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return ShardResult(name, split, count, sha256_of(final), skipped)


# What shard_names raises for a damaged shard: its tar, or a label's JSON (not UTF-8, not JSON, not an object).
DAMAGED = (tarfile.TarError, ValueError, KeyError, TypeError)


def shard_names(path: Path) -> list[str]:
    """The image names in a finished shard, in order (from its JSON labels); DAMAGED where it cannot be read."""
    names = []
    with tarfile.open(path) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                names.append(json.loads(tar.extractfile(member).read())["name"])
    return names


def _whole_shard_names(path: Path) -> list[str] | None:
    """shard_names, or None where the shard is not a whole tar: empty, cut short or zero-filled, as a power loss can
    leave it. Every tar this packer writes ends in two zero blocks."""
    end_marker = 2 * tarfile.BLOCKSIZE
    if path.stat().st_size < end_marker:
        return None
    with open(path, "rb") as fh:
        fh.seek(-end_marker, os.SEEK_END)
        if fh.read() != bytes(end_marker):
            return None
    try:
        return shard_names(path)
    except DAMAGED:
        return None


def _read_json(path: Path) -> object | None:
    """A file this packer wrote, or None where a kill or power cut left it unreadable."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _existing(directory: Path, name: str, split: str, samples: list[tuple[str, dict]], skip_bad: bool,
              recorded: dict[str, str]) -> ShardResult | None:
    """A shard a previous run finished, if it holds exactly these images (less any it reported skipped, with
    skip_bad); None where there is none, it is incomplete or it differs from the hash a finished pack's manifest
    `recorded` for it, so it is written again."""
    final = directory / name
    if not final.exists():
        return None
    sidecar = final.with_name(name + ".skipped.json")
    skipped = _read_json(sidecar) if sidecar.exists() else []
    # Cut short, which images it left out is unknown. Without --skip-bad, those it left out are read again: fixed
    # since, they go in; still bad, the pack stops, naming the first, as a first pack without --skip-bad would.
    if skipped is None or (skipped and not skip_bad):
        return None
    left_out = {s["name"] for s in skipped}
    expected = [label["name"] for _, label in samples if label["name"] not in left_out]
    names = _whole_shard_names(final)
    # tarfile takes zeros in place of a header for the archive's end: a shard with only its first images was cut short.
    if names is None or (len(names) < len(expected) and names == expected[:len(names)]):
        tqdm.write(f"pack: {final} is incomplete; writing it again", file=sys.stderr)
        return None
    if names != expected:
        raise DataError(f"{final} holds other images than this pack would write there (a pack with other "
                        "options?): pack into an empty --out")
    digest = sha256_of(final)
    if recorded.get(name, digest) != digest:  # taken as it is, a damaged image would pass --verify from now on
        tqdm.write(f"pack: {final} differs from the hash its manifest recorded (changed or corrupt); writing it again",
                   file=sys.stderr)
        return None
    return ShardResult(name, split, len(expected), digest, skipped)


def _recorded_hashes(out: Path) -> dict[str, str]:
    """Each shard's sha256 as a finished pack's manifest in `out` records it; none where there is none."""
    manifest = _read_json(out / MANIFEST) if (out / MANIFEST).is_file() else None
    try:
        return {s["name"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}
    except (TypeError, KeyError, AttributeError):
        return {}


def _records(opts: PackOptions) -> Iterator[Record]:
    if opts.csv:
        return read_csv_labels(opts.csv, opts.root, opts.label_file, opts.split.column)
    if opts.meta_csv:
        return read_pyiqa_meta(opts.dataset, opts.root, opts.meta_csv, opts.image_dir, split_column=opts.split.column)
    return read_records(opts.dataset, opts.root, opts.label_file, opts.image_dir)


def _noting_missing(records: Iterator[Record], missing: array) -> Iterator[Record]:
    """The records, each one's position added to `missing` where its image file is not there (8 bytes each: memory
    stays flat, as the label pass's does)."""
    for position, record in enumerate(records):
        if not record.path.exists():  # what is there but unreadable, the worker names
            missing.append(position)
        yield record


def _refuse_missing(missing: array, route: Callable[[Record], str | None], opts: PackOptions, label_file: str) -> None:
    """All the images to pack that are not there, in one error before any shard (a worker stops at the first). Images
    a split file leaves out need not be there. Reads the labels again to name them, only when some are missing."""
    if not missing:
        return
    wanted, absent, shown, first = iter(missing), 0, [], ""
    next_missing = next(wanted)
    for position, record in enumerate(_records(opts)):
        if position != next_missing:
            continue
        if route(record) is not None:
            absent += 1
            first = first or record.name
            if len(shown) < 3:
                shown.append(f"{record.name} (row {record.row})")
        next_missing = next(wanted, -1)
        if next_missing < 0:
            break
    if absent:
        layout = " (an IQA-PyTorch meta CSV names them as its downloads lay them out; for the release's own layout, " \
            "name their folder with --image-dir or pack the release's label file without --meta-csv)" \
            if opts.meta_csv else ""
        # A release whose label file lies above its images' folder (FLIVE_Database's copy of labels_image.csv beside
        # database/): where the first one is, one folder down.
        root = Path(opts.root)
        below = next((sub for sub in sorted(root.iterdir()) if sub.is_dir() and (sub / first).is_file()), None) \
            if root.is_dir() else None
        there = f"; {first} is under {below}: give that as --root" if below else ""
        raise DataError(f"{label_file}: {absent} of the images it names {'is' if absent == 1 else 'are'} not under "
                        f"{opts.root}, e.g. {', '.join(shown)}: fix --root or the files, or leave them out with "
                        f"--skip-bad{layout}{there}")


def _reopens_for_left_out(out: Path, opts: PackOptions, label_file: str) -> bool:
    """Whether a finished pack that left images out (--skip-bad), packed again without --skip-bad, writes again the
    shards that left them out, whole: then each of their images must read now (those it left out and those it holds),
    or nothing changes; the pack is unfinished until they are written."""
    if opts.skip_bad or not (out / MANIFEST).is_file():
        return False
    left_out, held = set(), set()
    for sidecar in out.glob("*.tar.skipped.json"):
        skipped = _read_json(sidecar)
        if isinstance(skipped, list):
            left_out |= {s.get("name") for s in skipped if isinstance(s, dict)}
            held |= set(_whole_shard_names(out / sidecar.name.removesuffix(".skipped.json")) or ())
    if not left_out:
        return False
    needed = left_out | held
    for record in _records(opts):
        if record.name not in needed or not isinstance(why := _encode(record.path, opts.resize_shorter), str):
            continue
        if record.name in left_out:
            raise DataError(f"{record.name} ({label_file} row {record.row}), which {out} left out (--skip-bad), "
                            f"still cannot be read: {why}; fix it, or pack with --skip-bad as before")
        raise DataError(f"{record.name} ({label_file} row {record.row}) cannot be read ({why}), and its shard is "
                        f"written again to take in the images {out} left out (--skip-bad): put it back, or pack with "
                        "--skip-bad as before")
    return True


def _chunks(opts: PackOptions, codes: np.ndarray) -> Iterator[tuple[str, str, list[tuple[str, dict]]]]:
    """(shard name, split, samples), each shard a seeded random draw from its split (`codes`: each record's, as the
    splitter read them). A reader streams a few shards an epoch and shuffles only within a buffer: shards in the label
    file's order would give each batch a stretch of it, one generator (AGIQA-3K), distortion (LIVE) or few reference
    images (KADID-10k). The labels of a window of shards are held at a time, over a pass of the label file each; per
    record, 4 bytes more: memory stays flat."""
    rng = np.random.default_rng(ORDER_SEED)
    slots = np.zeros(len(codes), np.int32)
    shards = []
    for code in range(len(SPLITS)):
        where = np.flatnonzero(codes == code)
        slots[where] = rng.permutation(len(where))
        shards += [(code, j) for j in range(-(-len(where) // opts.shard_size))]
    per_window = max(1, WINDOW // opts.shard_size)
    for start in range(0, len(shards), per_window):
        buffers: dict[tuple[int, int], list[tuple[int, dict]]] = {k: [] for k in shards[start:start + per_window]}
        for position, record in enumerate(_records(opts)):
            code, slot = int(codes[position]), int(slots[position])
            if (code, slot // opts.shard_size) in buffers:
                buffers[code, slot // opts.shard_size].append(
                    (slot, {"name": record.name, "dataset": opts.dataset, "mos": record.mos, "mos_raw": record.mos_raw,
                            "ref": record.ref, "split": SPLITS[code], "row": record.row, "path": str(record.path)}))
        for (code, j), samples in buffers.items():
            split = SPLITS[code]
            yield f"{split}-{j:06d}.tar", split, [(f"{split}-{slot:08d}", label) for slot, label in sorted(samples,
                                                                                                    key=lambda s: s[0])]


def pack(opts: PackOptions, check: bool = False) -> dict:
    """Packs and returns the manifest (also written to OUT/manifest.json, last). `check`: makes every check the pack
    makes before it writes (labels, images there, the split, the folder) and returns, with nothing written, what it
    would hold: {"splits": {split: images}, "unlisted": left out by a split file, "missing": left out by --skip-bad
    for want of a file (an unreadable one is found as its shard is written)}."""
    _check(opts)
    if not opts.csv:  # as the pack records it, so that one folder named two ways is one pack
        opts = replace(opts, image_dir=image_folder(opts.dataset, opts.image_dir, bool(opts.meta_csv)))
    if opts.split.by_reference is None:
        opts = replace(opts, split=replace(opts.split, by_reference=opts.info().has_reference))
    out = Path(opts.out)
    # As the readers find it: a relative label file is under the root, a meta CSV where it is named.
    label_path = (Path(opts.meta_csv) if opts.meta_csv else
                  Path(opts.root) / (opts.label_file or opts.info().label_file))
    identity = _identity(opts, label_path)
    kept_split = _refuse_other_pack(out, identity)
    # Shards are only ever resumed with the options and labels they were written with; before the first, any go.
    started = out / STARTED
    begun = _as_identity(_read_json(started)) if started.exists() and any(out.glob("*.tar")) else identity
    if not isinstance(begun, dict) or _differing(identity, begun):
        if isinstance(begun, dict) and "order" not in begun:
            raise DataError(f"{out} holds an unfinished pack an earlier temu-dist began in its label file's order: "
                            "delete it and pack again, or pack into another --out")
        if not isinstance(begun, dict):
            raise DataError(f"{out} holds an unfinished pack whose {STARTED} is unreadable (a power cut?): delete "
                            "it, or pack into another --out")
        differs = _differing(identity, begun)
        raise DataError(f"{out} holds an unfinished pack made with another {' and another '.join(differs)}: pack into "
                        "another --out, or delete it")
    # Reads and checks every label row, so bad labels stop the pack before anything is written.
    info = opts.info()
    official = None if not info.official_split else \
        f"the meta CSV's split column ({', '.join(META_SPLIT_COLUMNS)})" if opts.meta_csv else \
        f"{label_path.name}'s split column ({', '.join(META_SPLIT_COLUMNS)})" if opts.csv else \
        f"{info.official_split} beside {label_path.name}"
    # Only before a pack's first shard: a rerun reuses finished shards, whose images need not be there any more.
    missing = array("q")
    rerun = any(out.glob("*.tar"))
    records = _records(opts) if rerun or opts.skip_bad and not check else _noting_missing(_records(opts), missing)
    route, total, unlisted, codes = splitter(records, opts.split, label_path.name, official)
    if not (check and opts.skip_bad):  # --skip-bad leaves them out: the check counts them
        _refuse_missing(missing, route, opts, label_path.name)
    if check:
        if (holder := lock.holder(out / PACK_LOCK)) is not None:
            raise _busy(out, holder)
        _reopens_for_left_out(out, opts, label_path.name)
        absent = np.zeros(len(codes), dtype=bool)
        absent[np.frombuffer(missing, dtype=np.int64)] = True
        listed = codes != NOT_LISTED
        counts = np.bincount(codes[listed & ~absent], minlength=len(SPLITS))
        return {"splits": {split: int(n) for split, n in zip(SPLITS, counts) if n}, "unlisted": unlisted,
                "missing": int((listed & absent).sum())}
    out.mkdir(parents=True, exist_ok=True)
    held = _hold(out)
    try:
        return _write(opts, out, label_path, identity, codes, total, unlisted, kept_split)
    finally:
        if held is not None:
            lock.let_go(held)


def _busy(out: Path, holder: object) -> DataError:
    return DataError(f"{out}: another pack is writing this folder ({holder}): wait for it to end or stop it")


def _hold(out: Path):
    """The pack folder for this pack alone: a second started into it (the same command twice, a job requeued)
    overwrote the first's shards under it, whose manifest then named hashes they no longer had."""
    try:
        return lock.take(out / PACK_LOCK)
    except lock.Busy as e:
        raise _busy(out, e) from None
    except lock.NoLocks as e:
        tqdm.write(f"pack: warning: {out / PACK_LOCK} cannot be locked ({e}): a second pack into {out} will not be "
                   "refused", file=sys.stderr)
        return None


def _write(opts: PackOptions, out: Path, label_path: Path, identity: dict, codes: np.ndarray, total: int,
           unlisted: int, kept_split: dict | None) -> dict:
    """pack()'s writing, once the labels have passed their checks and the folder is held. `kept_split`: the split as
    a finished pack of the same identity recorded it, written back so."""
    started = out / STARTED
    recorded = _recorded_hashes(out)  # before a reopen for its left-out images removes the manifest
    if _reopens_for_left_out(out, opts, label_path.name):
        (out / MANIFEST).unlink()
    write_json_atomic(started, identity)
    for stale in out.iterdir():  # the packer's own only: a user's dot files stay
        if stale.name.endswith(".tmp") and PACK_FILE.fullmatch(stale.name):
            stale.unlink()
    results: list[ShardResult] = []
    told = False  # that an earlier run's shards are kept
    kept = 0  # images in the shards an earlier run finished
    context = multiprocessing.get_context()
    read = context.Value("q", 0)

    def shown() -> int:
        # Without the counter's lock, which a worker killed holding it (OOM, kill -9) would keep for ever.
        return kept + read.get_obj().value

    # In a log (nohup, sbatch) rather than on a terminal, a line every half minute.
    progress = tqdm(total=total, desc=f"pack {opts.dataset}", unit="img", file=sys.stderr,
                    mininterval=0.1 if sys.stderr.isatty() else 30)
    pool = ProcessPoolExecutor(max_workers=opts.workers, mp_context=context, initializer=_start_worker,
                               initargs=(read,))
    pending: set[Future] = set()
    try:
        for name, split, samples in _chunks(opts, codes):
            done = _existing(out, name, split, samples, opts.skip_bad, recorded)
            if done is not None:
                if not told:  # said once, as the bar jumps
                    tqdm.write(f"pack: {out} holds shards an earlier run finished: kept, not written again",
                               file=sys.stderr)
                    told = True
                results.append(done)
                kept += done.count + len(done.skipped)
                progress.update(shown() - progress.n)
                continue
            pending.add(pool.submit(write_shard, str(out), name, split, samples, opts.resize_shorter, opts.skip_bad,
                                    label_path.name))
            # A bounded window of shards in flight keeps memory flat for any dataset size.
            while len(pending) >= 2 * opts.workers:
                pending = _collect(pending, results, progress, shown)
        while pending:
            pending = _collect(pending, results, progress, shown)
    except (KeyboardInterrupt, BrokenProcessPool):
        # Stop now, not after the shards in flight: the rerun writes them again (a bad image's DataError lets them
        # finish theirs). ProcessPoolExecutor has no public way to end its workers before Python 3.14; they ignore
        # SIGTERM, which is also how the pool stops the others where one crashed, so SIGKILL.
        for process in list(pool._processes.values()):
            process.kill()
            process.join()
        for stale in out.glob("*.tar.tmp"):  # the shards they were writing
            stale.unlink(missing_ok=True)
        raise
    finally:
        progress.close()
        pool.shutdown(cancel_futures=True)
    manifest = _manifest(opts, label_path, identity if kept_split is None else {**identity, "split": kept_split},
                         results, unlisted)
    if manifest["skipped"] and not any(r.count for r in results):
        first = manifest["skipped"][0]
        # Its empty shards would be kept by the rerun that follows a fix, as holding every image less those skipped.
        for path in out.iterdir():
            if PACK_FILE.fullmatch(path.name) and path.name != PACK_LOCK:  # held by this pack
                path.unlink()
        raise DataError(f"{out}: every one of its {len(manifest['skipped'])} images was unreadable (the first, "
                        f"{first['name']} of row {first['row']}: {first['reason']}); is --root {opts.root} the "
                        "release's folder? Nothing was written as a finished pack")
    write_json_atomic(out / MANIFEST, manifest)
    empty = [s for s, r in zip(SPLITS, opts.split.ratios) if r > 0 and s not in manifest["splits"]]
    if opts.split.protocol == "ratio" and empty:  # a run would find no such set to score
        groups = "reference images" if opts.split.by_reference else "images"
        tqdm.write(f"pack: warning: {out}: the ratios {list(opts.split.ratios)} of its {groups} leave no images in "
                   f"its {' and '.join(empty)} split: pack a larger set, or other --ratios", file=sys.stderr)
    return manifest


def _check(opts: PackOptions) -> None:
    """Refuses options no pack can be made with, before anything is read or written."""
    if opts.csv:
        if opts.csv.name != opts.dataset:
            raise DataError(f"--dataset {opts.dataset}: its CSV's labels name it {opts.csv.name}")
        if not opts.label_file or opts.meta_csv:
            raise DataError(f"--dataset {opts.dataset}, a dataset of your own, is read from its CSV: give it with "
                            "--label-file (not --meta-csv)")
    elif opts.dataset not in DATASETS:
        need = "its scale with --mos-range" if opts.label_file else "--label-file and --mos-range"
        raise DataError(f"unknown dataset '{opts.dataset}'; one of {', '.join(DATASETS)}, or a dataset of your own "
                        f"read from a CSV: add {need}")
    if opts.image_dir is not None and opts.csv:
        raise DataError(f"--image-dir {opts.image_dir}: a CSV of your own names its images under --root")
    if opts.split.by_reference and not opts.info().has_reference:
        # Else each image would be its own reference: a split by image, said to be by reference.
        raise DataError(f"--by-reference yes: {opts.dataset} has no reference images"
                        + (": name its reference column with --columns IMAGE SCORE REF" if opts.csv else ""))
    for flag, value in (("--shard-size", opts.shard_size), ("--workers", opts.workers),
                        ("--resize-shorter", opts.resize_shorter)):
        if value is not None and value < 1:
            raise DataError(f"{flag} must be at least 1, not {value}")
    split = opts.split
    for flag, value in (("--split-seed", split.seed), ("--split-index", split.index)):
        if value < 0:
            raise DataError(f"{flag} must be 0 or more, not {value}")
    if (split.protocol == "file") != (split.file is not None):
        raise DataError("--split file needs --split-file" if split.file is None else
                        f"--split-file {split.file} is read only with --split file")
    if (split.protocol == "column") != (split.column is not None):
        raise DataError("--split column needs --split-column" if split.column is None else
                        f"--split-column {split.column} is read only with --split column")
    if split.protocol == "column" and not (opts.meta_csv or opts.csv):
        raise DataError(f"--split column: {split.column} is a column of IQA-PyTorch's meta CSV (--meta-csv) or of a "
                        "CSV of your own; a release's label file has none")
    pickled = split.file is not None and Path(split.file).suffix == ".pkl"
    if split.index and split.protocol != "ratio" and not pickled:
        raise DataError(f"--split-index {split.index} picks a seeded --split ratio or a split of an IQA-PyTorch "
                        f"pickle; --split {split.protocol}{' with a CSV' if split.file else ''} has one split only")
    if split.protocol == "official" and not opts.csv and not opts.info().official_split:
        raise DataError(f"--split official: the {opts.dataset} release has no official split; use --split ratio (the "
                        "default) or --split file")
    if pickled and not (opts.meta_csv or opts.csv):
        # Its row numbers are those of IQA-PyTorch's meta CSV, whose order the release's label file does not keep.
        raise DataError(f"--split-file {split.file}: an IQA-PyTorch split numbers the rows of its meta CSV; pass that "
                        "CSV with --meta-csv")
    check_output_folder(Path(opts.out), "--out")
    _refuse_foreign_files(Path(opts.out))


def _refuse_foreign_files(out: Path) -> None:
    """A pack goes into a folder of its own (new, empty, or a pack's): shards written among a dataset's or a user's
    files would mix with them, and a rerun clears the pack's unfinished files."""
    if not out.is_dir():
        return
    # Dot files are the system's (.DS_Store, NFS's .nfsXXXX), not the user's work.
    foreign = sorted(p.name + "/" * p.is_dir() for p in out.iterdir()
                     if not p.name.startswith(".") and not PACK_FILE.fullmatch(p.name))
    if foreign:
        raise DataError(f"--out {out} holds files that are no pack's ({', '.join(foreign[:3])}"
                        f"{', ...' * (len(foreign) > 3)}): pack into a new or an empty folder")


# A worker's count of the images it has read (skipped ones too), shared with the main process: its bar then moves an
# image at a time where a shard's end moved it, minutes apart for 1000 large images.
_read = None


def _start_worker(read) -> None:
    """Ctrl-C reaches every process of the terminal's group, and SIGTERM every one of a job's (scancel): the main
    process alone handles them, stopping the workers; a SIGTERM to it alone left them packing on, orphaned."""
    global _read
    _read = read
    threading.Thread(target=_end_with, args=(os.getppid(),), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _identity(opts: PackOptions, label_path: Path) -> dict:
    """What decides a pack's content: two packs that agree on it write the same shards."""
    split = opts.split.describe()
    if opts.split.file is not None and Path(opts.split.file).is_file():  # (the splitter says where it is not)
        # Its path as given, for the reader; its contents, for comparing packs.
        split["file_sha256"] = sha256_of(Path(opts.split.file))
    identity = {"dataset": opts.dataset, "split": split, "resize_shorter": opts.resize_shorter,
                "shard_size": opts.shard_size, "order": ORDER,
                "label_sha256": sha256_of(label_path) if label_path.is_file() else None}
    if opts.csv:  # a CSV of one's own has labels read by options; a release's are read as released
        return {**identity, "labels": opts.csv.describe()}
    # None where a pack has neither, as a manifest without them reads: an older pack of a release has the same identity.
    return {**identity, "mos_column": None if opts.meta_csv else opts.info().mos_column, "image_dir": opts.image_dir}


def _as_identity(written: object) -> object:
    """An identity as read back from a pack, as _identity now writes it (what is no identity, as it is)."""
    split = written.get("split") if isinstance(written, dict) else None
    return {**written, "split": split_read(split)} if isinstance(split, dict) else written


# _identity's keys as a user knows them, for messages.
IDENTITY_NAMES = {"dataset": "--dataset", "split": "split (--split and its options)",
                  "resize_shorter": "--resize-shorter", "shard_size": "--shard-size",
                  "label_sha256": "label file (its contents changed)",
                  "labels": "--columns, --mos-range or --lower-better", "order": "sample order",
                  "image_dir": "--image-dir",
                  # The one release so far: KonIQ-10k, whose packs read its 1-5 MOS before.
                  "mos_column": "score column (a KonIQ-10k release pack reads MOS_zscore, 0-100, as IQA-PyTorch does; "
                                "one before 2026-11-29 read its 1-5 MOS; a meta CSV has its own)"}


def _differing(ours: dict, theirs: dict) -> list[str]:
    """The options (IDENTITY_NAMES) two identities differ in. A split file by its contents where both packs recorded
    them: the same file named by another path is the same split, a file changed under the same path another."""
    differs = []
    for key, value in ours.items():
        other = theirs.get(key)
        if key == "split" and isinstance(other, dict):
            mine, its = value.get("file_sha256"), other.get("file_sha256")
            if mine and its:
                if mine != its:
                    differs.append("split file (its contents changed)")
                other = {**other, "file": value.get("file"), "file_sha256": mine}
            else:  # a pack from before the contents were recorded: by the path, as then
                value, other = {**value, "file_sha256": None}, {**other, "file_sha256": None}
        if value != other:
            differs.append(IDENTITY_NAMES[key])
    return differs


def _refuse_other_pack(out: Path, ours: dict) -> dict | None:
    """A finished pack in `out` made with other options stays untouched. The same pack's split as its manifest
    records it, if there is one: a rerun writes it back as it was (the path it named a split file by, no hash where an
    older version recorded none), since runs trained on the pack know it by a digest of it (manifest.pack_digest)."""
    try:
        old = read_manifest(out)
    except ShardsMissing:
        return None  # none, or one a kill cut short: an unfinished pack, which pack.json speaks for
    # The manifest holds _identity's keys at its top level, but the label file's hash, under source.
    theirs = _as_identity({k: old.get("source", {}).get(k) if k == "label_sha256" else old.get(k) for k in ours})
    if theirs["order"] is None:
        raise DataError(f"{out} holds a pack an earlier temu-dist wrote in its label file's order, in which a batch is "
                        "a stretch of it (one generator, distortion or reference image): delete it and pack again, "
                        "or pack into another --out")
    differs = _differing(ours, theirs)
    if differs:
        raise DataError(f"{out} already holds a finished pack made with another {' and another '.join(differs)}: "
                        "pack into another --out")
    return old.get("split")


def _end_with(parent: int) -> None:
    """Ends the worker once its parent is gone (kill -9, the OOM killer): orphaned, it would pack on, or wait for work
    for ever, holding the folder's lock. Polled: waiting for work, a worker reads a pipe its siblings keep open."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _note_read() -> None:
    if _read is not None:  # None where write_shard runs outside a pack's pool
        with _read.get_lock():
            _read.value += 1


def _collect(pending: set[Future], results: list[ShardResult], progress: tqdm, shown: Callable[[], int]) -> set[Future]:
    """Waits for a shard to finish, moving the bar meanwhile to the `shown()` images read so far."""
    while True:
        done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        progress.update(shown() - progress.n)
        if done:
            break
    results.extend(f.result() for f in done)
    return pending


def _manifest(opts: PackOptions, label_path: Path, identity: dict, results: list[ShardResult],
              unlisted: int) -> dict:
    splits = {}
    for split in SPLITS:
        shards = sorted((r for r in results if r.split == split), key=lambda r: r.name)
        if shards:
            splits[split] = {"count": sum(r.count for r in shards),
                             "shards": [{"name": r.name, "count": r.count, "sha256": r.sha256} for r in shards]}
    return {
        "format": FORMAT,
        "dataset": opts.dataset,
        "source": {"root": str(Path(opts.root).resolve()), "label_file": str(label_path.resolve()),
                   "label_sha256": identity["label_sha256"],
                   "kind": "csv" if opts.csv else "pyiqa-meta" if opts.meta_csv else "release"},
        **({"labels": identity["labels"]} if opts.csv else {}),
        **{key: identity[key] for key in ("mos_column", "image_dir") if identity.get(key) is not None},
        "scale": label_scale(opts.info()),
        "split": identity["split"],
        "resize_shorter": opts.resize_shorter,
        "shard_size": opts.shard_size,
        "order": ORDER,
        "splits": splits,
        "skipped": [s for r in sorted(results, key=lambda r: r.name) for s in r.skipped],
        # The labelled images a split file leaves out, in no split.
        **({"unlisted": unlisted} if opts.split.protocol == "file" else {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def verify(directory: str | Path) -> list[str]:
    """What is wrong with a finished pack (empty: nothing): missing shards, hashes and counts that differ."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory}: no such folder"]
    if not (directory / MANIFEST).exists():
        if not any(directory.glob("*.tar")) and not (directory / STARTED).exists():
            return [f"{directory}: not a pack (no {MANIFEST}, no shards)"]
        return [f"{directory / MANIFEST} is missing: the pack never finished (rerun the same pack command)"]
    try:
        manifest = read_manifest(directory)
    except ShardsMissing as e:
        return [str(e)]
    problems = []
    for split, info in manifest["splits"].items():
        total = 0
        for shard in info["shards"]:
            path = directory / shard["name"]
            if not path.exists():
                problems.append(f"{path}: missing")
                continue
            if sha256_of(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest (changed or corrupt)")
            try:
                count = len(shard_names(path))
            except DAMAGED as e:
                problems.append(f"{path}: unreadable ({e})")
                continue
            if count != shard["count"]:
                problems.append(f"{path}: {count} samples, the manifest says {shard['count']}")
            total += count
        if total != info["count"] and not any(p.startswith(str(directory / split)) for p in problems):
            problems.append(f"split {split}: {total} samples, the manifest says {info['count']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m temu_dist.pack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verify", metavar="DIR", help="recheck a finished pack's counts and hashes")
    parser.add_argument("--dataset", metavar="NAME", help=f"{', '.join(sorted(DATASETS))}, or a name of your own "
                        "with --label-file and --mos-range")
    parser.add_argument("--root", help="the dataset's release folder")
    parser.add_argument("--out", help="shard folder, e.g. shards/NAME")
    parser.add_argument("--label-file", help="label file, if not at its released place; a relative path is under "
                        "--root")
    parser.add_argument("--meta-csv", help="read labels from an IQA-PyTorch meta-info CSV instead")
    parser.add_argument("--image-dir", metavar="DIR", help="the images' folder under --root, where not the release's "
                        "(koniq10k: 512x384 for its half-size images, which IQA-PyTorch's configs read) or a meta "
                        "CSV's IQA-PyTorch layout")
    parser.add_argument("--mos-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="a dataset of your own: its score scale, mapped to 0-1")
    parser.add_argument("--lower-better", action="store_true", help="a dataset of your own: its scores are DMOS")
    parser.add_argument("--columns", nargs="+", metavar="COLUMN",
                        help="a dataset of your own: its image, score and (optional) reference columns; default: the "
                        "first two")
    parser.add_argument("--split", choices=["official", "ratio", "file", "column"], default="ratio")
    parser.add_argument("--ratios", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                        help="--split ratio's fractions (default 0.8 0 0.2)")
    parser.add_argument("--split-seed", type=int, help="--split ratio's seed (default 0)")
    parser.add_argument("--split-index", type=int, default=0, help="the i-th (from 0) of a series of seeded splits, "
                        "or of an IQA-PyTorch pickle's splits (numbered from 1 there: its split 1 is index 0)")
    parser.add_argument("--split-file", help="name,split CSV, or an IQA-PyTorch split pickle (with --meta-csv and "
                        "--split-index)")
    parser.add_argument("--split-column", help="--split column: the label CSV's column of train/val/test, e.g. "
                        "ratio802_seed123_split_01, IQA-PyTorch's first random split in its meta CSVs")
    parser.add_argument("--by-reference", choices=["auto", "yes", "no"], default="auto",
                        help="split by reference image (auto: for datasets that have references)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=_cpus(), help="processes that read and write images "
                        "(default: the CPUs this process may use)")
    parser.add_argument("--resize-shorter", type=int, help="shrink images whose shorter side is larger than this")
    parser.add_argument("--skip-bad", action="store_true", help="leave out unreadable images, listed in the manifest")
    parser.add_argument("--check", action="store_true",
                        help="read and check the labels, the images' files and the split as the pack does before it "
                             "writes, say how many images each split would hold, and stop (nothing written)")
    args = parser.parse_args(argv)
    if args.verify:
        problems = verify(args.verify)
        for p in problems:
            print(f"verify: {p}", file=sys.stderr)
        if not problems:
            print(f"verify: {args.verify}: all shards present, hashes and counts match")
        return 1 if problems else 0
    if not (args.dataset and args.root and args.out):
        parser.error("--dataset, --root and --out are needed (or --verify DIR)")
    by_ref = None if args.by_reference == "auto" else args.by_reference == "yes"
    by_ratio = {k: v for k, v in (("ratios", args.ratios and tuple(args.ratios)), ("seed", args.split_seed))
                if v is not None}
    spec = SplitSpec(args.split, index=args.split_index, file=args.split_file, by_reference=by_ref,
                     column=args.split_column, **by_ratio)
    try:
        if by_ratio and args.split != "ratio":
            flags = " and ".join({"ratios": "--ratios", "seed": "--split-seed"}[k] for k in by_ratio)
            raise DataError(f"{flags}: read only with --split ratio, not --split {args.split}")
        own = args.mos_range is not None
        given = [flag for flag, value in (("--lower-better", args.lower_better), ("--columns", args.columns)) if value]
        if not own and given:
            raise DataError(f"{' and '.join(given)} describe{'s' if len(given) == 1 else ''} a dataset of your own: "
                            "give its --mos-range too")
        labels = CsvLabels(args.dataset, tuple(args.mos_range), not args.lower_better,
                           tuple(args.columns or ())) if own else None
        opts = PackOptions(args.dataset, args.root, args.out, args.label_file, args.meta_csv, spec, args.shard_size,
                           args.workers, args.resize_shorter, args.skip_bad, labels, args.image_dir)
        with sigterm_as_ctrl_c():
            manifest = pack(opts, check=args.check)
        if args.check:
            absent = manifest["missing"]
            left = [f"{absent} image{'s' * (absent != 1)} not there, left out (--skip-bad)"] if absent else []
            left += [f"not in the split file {manifest['unlisted']}"] if manifest["unlisted"] else []
            print(f"pack: {args.out}: would hold " + ", ".join(f"{s} {n}" for s, n in manifest["splits"].items())
                  + f" (shards of {args.shard_size}){''.join(f'; {x}' for x in left)}; nothing written")
            return 0
    except ConfigError as e:
        print(f"pack: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a quota, a mount gone: the pack stops where it was
        print(f"pack: {e.filename or args.out}: {e.strerror or e}; finished shards are kept, rerun the same command "
              "to continue", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        by = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        print(f"\npack: {by}; finished shards are kept, rerun the same command to continue", file=sys.stderr)
        return stop_code(e)
    counts = ", ".join(f"{s} {info['count']}" for s, info in manifest["splits"].items())
    unlisted = f"; not in the split file {manifest['unlisted']}" if manifest.get("unlisted") else ""
    print(f"pack: {args.out}: {counts}; skipped {len(manifest['skipped'])}{unlisted}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
