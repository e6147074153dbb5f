"""Q-Align's train/test split (its train_*.json / test_*.json) as the `name,split` CSV that `pack --split file` reads.

    python -m temu_dist.data.qalign --dataset spaq --root ~/data/spaq --train train_spaq.json --test test_spaq.json \
        --out spaq-qalign.csv
    python -m temu_dist.pack --dataset spaq --root ~/data/spaq --out shards/spaq-qalign --split file \
        --split-file spaq-qalign.csv

The seed's Tables 9 and 10 and Fig. 8 follow Q-Align's split. Its files name images in folders of their own
("spaq/00001.jpg"); they are matched to the release's records by file name, which is unique within KonIQ-10k, SPAQ
and KADID-10k (an ambiguous or unknown one is an error naming it). Images a file does not list are left out.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path, PurePosixPath

from temu_dist.config import ConfigError
from temu_dist.data.sources import DATASETS, DataError, read_records
from temu_dist.atomic import write_text_atomic


def _images(path: Path) -> list[str]:
    """The 'image' of each entry of a Q-Align split file."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of entries with an 'image', as Q-Align's split files hold")
    images = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise DataError(f"{path} entry {i}: no 'image'")
        images.append(entry["image"])
    return images


def assignment(dataset: str, root: str | Path, files: dict[str, Path]) -> dict[str, str]:
    """Record name -> split for the images of `files` ({split: Q-Align file})."""
    by_file: dict[str, list[str]] = {}
    for record in read_records(dataset, root):
        by_file.setdefault(PurePosixPath(record.name).name, []).append(record.name)
    out: dict[str, str] = {}
    for split, path in files.items():
        for image in _images(path):
            names = by_file.get(PurePosixPath(image).name)
            if not names:
                raise DataError(f"{path}: {image} is not among the {dataset} release's images under {root}")
            if len(names) > 1:
                raise DataError(f"{path}: {image} matches {len(names)} images of the release ({', '.join(names[:3])})")
            if out.setdefault(names[0], split) != split:
                raise DataError(f"{path}: {image} is in the {out[names[0]]} split too")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m temu_dist.data.qalign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--root", required=True, help="the dataset's release folder")
    for split in ("train", "val", "test"):
        parser.add_argument(f"--{split}", type=Path, help=f"Q-Align's {split}_*.json")
    parser.add_argument("--out", required=True, type=Path, help="the name,split CSV to write")
    args = parser.parse_args(argv)
    files = {split: getattr(args, split) for split in ("train", "val", "test") if getattr(args, split)}
    if not files:
        parser.error("give at least one of --train, --val, --test")
    try:
        names = assignment(args.dataset, args.root, files)
        text = io.StringIO(newline="")
        csv.writer(text).writerows([("name", "split"), *names.items()])
        write_text_atomic(args.out, text.getvalue())
    except ConfigError as e:
        print(f"qalign: {e}", file=sys.stderr)
        return 1
    counts = {split: sum(1 for s in names.values() if s == split) for split in files}
    print(f"qalign: {args.out}: " + ", ".join(f"{split} {n}" for split, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
