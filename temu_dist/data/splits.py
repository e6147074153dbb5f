"""Which split each image belongs to: the release's official split, a seeded ratio split (by reference image for
synthetic datasets, so no content leaks between train and test), the i-th of a series of such splits, or a user file.

Assignments depend only on the image names, the seed and the index, never on file order or the machine: names are
sorted, then permuted by numpy's PCG64 generator, whose streams are the same on every platform.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np

from temu_dist.data.sources import DataError, Record, read_pyiqa_split

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSpec:
    protocol: Literal["official", "ratio", "file"] = "ratio"
    ratios: tuple[float, float, float] = (0.8, 0.0, 0.2)  # train, val, test
    seed: int = 0
    index: int = 0  # the i-th split of a seeded series (the seed's Table 6 averages 10)
    file: str | None = None  # protocol 'file': a name,split CSV or an IQA-PyTorch split pickle
    by_reference: bool = False

    def describe(self) -> dict:
        return {"protocol": self.protocol, "ratios": list(self.ratios), "seed": self.seed, "index": self.index,
                "file": self.file, "by_reference": self.by_reference}


def _ratio_assignment(groups: list[str], spec: SplitSpec) -> dict[str, str]:
    if abs(sum(spec.ratios) - 1.0) > 1e-6 or min(spec.ratios) < 0:
        raise DataError(f"split ratios {list(spec.ratios)} must be >= 0 and sum to 1")
    groups = sorted(set(groups))
    # One generator per (seed, index): the i-th split of a series is independent of the others and of their count.
    order = np.random.Generator(np.random.PCG64([spec.seed, spec.index])).permutation(len(groups))
    n_train = int(round(spec.ratios[0] * len(groups)))
    n_val = int(round(spec.ratios[1] * len(groups)))
    assignment = {}
    for rank, i in enumerate(order):
        assignment[groups[i]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return assignment


def _file_assignment(spec: SplitSpec, names: list[str]) -> dict[str, str]:
    path = Path(spec.file)
    if not path.is_file():
        raise DataError(f"split file {path} not found")
    if path.suffix == ".pkl":
        # IQA-PyTorch's split pickles index the rows of its meta CSV, in the order the records were read.
        indices = read_pyiqa_split(path, spec.index)
        assignment = {}
        for split, rows in indices.items():
            for i in rows:
                if not 0 <= i < len(names):
                    raise DataError(f"{path}: split {spec.index} '{split}' has row {i}, the labels have {len(names)}")
                assignment[names[i]] = split
        return assignment
    assignment = {}
    with open(path, newline="") as fh:
        for row_no, row in enumerate(csv.reader(fh), start=1):
            if row_no == 1 and row[:2] == ["name", "split"]:
                continue
            if len(row) != 2 or row[1] not in SPLITS:
                raise DataError(f"{path} row {row_no}: expected 'name,split' with split one of {', '.join(SPLITS)}")
            assignment[row[0]] = row[1]
    return assignment


def _official(record: Record) -> str:
    if record.split is None:
        raise DataError(f"row {record.row} ({record.name}) has no official split: this release has none, "
                        "use the ratio protocol")
    return record.split


def splitter(records: Iterable[Record], spec: SplitSpec) -> Callable[[Record], str | None]:
    """A function record -> 'train' | 'val' | 'test' (None: a split file leaves it out).

    Only names and reference ids are kept from `records` (the official protocol reads none), so the packer can stream
    the records again afterwards without ever holding a large dataset's records in memory.
    """
    if spec.protocol == "official":
        return _official
    names, refs = [], []
    for r in records:
        names.append(r.name)
        refs.append(r.ref or r.name)
    if spec.protocol == "file":
        assignment = _file_assignment(spec, names)
        unknown = sorted(set(assignment) - set(names))
        if unknown:
            raise DataError(f"split file {spec.file} names {len(unknown)} images the labels do not have, "
                            f"e.g. {unknown[0]}")
    elif spec.by_reference:
        by_ref = _ratio_assignment(refs, spec)
        assignment = {name: by_ref[ref] for name, ref in zip(names, refs)}
    else:
        assignment = _ratio_assignment(names, spec)
    return lambda record: assignment.get(record.name)
