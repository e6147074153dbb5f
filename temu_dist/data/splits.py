"""Which split each image belongs to: the release's official split, a seeded ratio split (by reference image for
synthetic datasets, so no content leaks between train and test), the i-th of a series of such splits, a user file, or
a split column of the label CSV (IQA-PyTorch's meta CSVs hold its ten random splits so).

Assignments depend only on the image names, the seed and the index, never on file order or the machine: names are
sorted, then permuted by numpy's PCG64 generator, whose streams are the same on every platform.
"""
from __future__ import annotations

import csv
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, get_args

import numpy as np

from temu_dist.config import Split
from temu_dist.data.keys import name_key
from temu_dist.data.sources import DataError, Record, read_pyiqa_split

SPLITS = get_args(Split)
NOT_LISTED = 255  # the split code of a record a split file leaves out


@dataclass(frozen=True)
class SplitSpec:
    protocol: Literal["official", "ratio", "file", "column"] = "ratio"
    ratios: tuple[float, float, float] = (0.8, 0.0, 0.2)  # train, val, test
    seed: int = 0
    index: int = 0  # the i-th split of a seeded series (the seed's Table 6 averages 10)
    file: str | None = None  # protocol 'file': a name,split CSV or an IQA-PyTorch split pickle
    by_reference: bool | None = None  # None: the dataset's own way (pack: by reference where it has references)
    column: str | None = None  # protocol 'column': the label CSV's column of train/val/test (or 0/1/2)

    def describe(self) -> dict:
        """What a manifest records of the split: the options its protocol reads."""
        return split_read({"protocol": self.protocol, "ratios": list(self.ratios), "seed": self.seed,
                           "index": self.index, "file": self.file, "by_reference": self.by_reference,
                           "column": self.column})


# The options each protocol reads: a release's official split has no ratios, seed or index.
READS = {"official": (), "ratio": ("ratios", "seed", "index", "by_reference"),
         "file": ("file", "index", "file_sha256"), "column": ("column",)}


def split_read(described: dict) -> dict:
    """Of a described split, the options its protocol reads: older packs recorded every option, used or not."""
    reads = READS.get(described.get("protocol"))
    return described if reads is None else {"protocol": described["protocol"], **{k: described.get(k) for k in reads}}


class _Strings:
    """Strings in one UTF-8 buffer, about len + 8 bytes each where a list of str costs 57 + len: splitting AVA's 255k
    names must not hold each as a Python object."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.ends = array("q")

    def append(self, text: str) -> None:
        self.buffer += text.encode()
        self.ends.append(len(self.buffer))

    def as_array(self) -> np.ndarray:
        """The strings as a fixed-width bytes array: numpy sorts it as Python sorts the str (UTF-8 keeps code-point
        order)."""
        width = int(np.diff(np.frombuffer(self.ends, dtype=np.int64), prepend=0).max(initial=1))
        out = np.zeros(len(self.ends), dtype=f"S{width}")
        flat = out.view(np.uint8).reshape(len(self.ends), width)
        buffer = np.frombuffer(self.buffer, dtype=np.uint8)
        start = 0
        for i, end in enumerate(self.ends):  # array's own ints, one at a time: a list of them would cost 36 B each
            flat[i, :end - start] = buffer[start:end]
            start = end
        return out


def _ratio_codes(records: Iterable[Record], spec: SplitSpec) -> np.ndarray:
    """Each record's split code (index into SPLITS): its group (reference image or name) among the sorted distinct
    groups, permuted."""
    if abs(sum(spec.ratios) - 1.0) > 1e-6 or min(spec.ratios) < 0:
        raise DataError(f"--ratios {' '.join(f'{r:g}' for r in spec.ratios)}: fractions >= 0 that sum to 1 "
                        "(0.8 0 0.2)")
    strings = _Strings()
    for r in records:
        strings.append(r.ref or r.name if spec.by_reference else r.name)
    groups = strings.as_array()
    del strings  # before np.unique's own copies: the peak of a 255k-name split is what stays in RSS
    distinct, inverse = np.unique(groups, return_inverse=True)
    # One generator per (seed, index): the i-th split of a series is independent of the others and of their count.
    order = np.random.Generator(np.random.PCG64([spec.seed, spec.index])).permutation(len(distinct))
    rank = np.empty(len(distinct), dtype=np.int64)
    rank[order] = np.arange(len(distinct))
    n_train = int(round(spec.ratios[0] * len(distinct)))
    n_val = int(round(spec.ratios[1] * len(distinct)))
    codes = np.where(rank < n_train, 0, np.where(rank < n_train + n_val, 1, 2)).astype(np.uint8)
    return codes[inverse.reshape(-1)]


def _file_assignment(spec: SplitSpec) -> dict[str, str] | dict[int, str]:
    """name -> split from a name,split CSV, or 0-based record position -> split from an IQA-PyTorch split pickle
    (which indexes the rows of its meta CSV, in the order the records are read)."""
    path = Path(spec.file)
    if not path.is_file():
        raise DataError(f"split file {path} not found")
    if path.suffix == ".pkl":
        positions = {}
        for split, rows in read_pyiqa_split(path, spec.index).items():
            for i in rows:
                if positions.setdefault(i, split) != split:
                    raise DataError(f"{path}: split {spec.index} puts row {i} in both {positions[i]} and {split}")
        return positions
    assignment, rows = {}, {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        try:
            for row_no, row in enumerate(csv.reader(fh), start=1):
                if row_no == 1 and row[:2] == ["name", "split"]:
                    continue
                if len(row) != 2 or row[1] not in SPLITS:
                    raise DataError(f"{path} row {row_no}: expected 'name,split' with split one of {', '.join(SPLITS)}")
                if assignment.setdefault(row[0], row[1]) != row[1]:  # an image in two splits leaks between them
                    raise DataError(f"{path} row {row_no}: {row[0]} in {row[1]}, but row {rows[row[0]]} puts it in "
                                    f"{assignment[row[0]]}")
                rows.setdefault(row[0], row_no)
        except UnicodeDecodeError:
            raise DataError(f"split file {path}: not UTF-8 text") from None
    return assignment


def _file_codes(records: Iterable[Record], spec: SplitSpec) -> np.ndarray:
    """Each record's split code from the split file (NOT_LISTED where it leaves the record out)."""
    assignment = _file_assignment(spec)
    if not assignment:  # else a finished pack of nothing
        raise DataError(f"split file {spec.file} lists no images")
    by_position = Path(spec.file).suffix == ".pkl"
    codes, known = array("B"), None
    for position, r in enumerate(records):
        known = known or r.name
        split = assignment.pop(position if by_position else r.name, None)
        codes.append(NOT_LISTED if split is None else SPLITS.index(split))
    if assignment:
        if by_position:
            raise DataError(f"{spec.file}: split {spec.index} '{assignment[min(assignment)]}' has row "
                            f"{min(assignment)}, the labels have {len(codes)}")
        raise DataError(f"split file {spec.file} names {len(assignment)} images the labels do not have, "
                        f"e.g. {sorted(assignment)[0]}" + (f" (the labels name them from --root, e.g. {known})"
                                                            if known else ""))
    return np.frombuffer(codes, dtype=np.uint8)


def _held_out_in_val_as_test(codes: np.ndarray) -> np.ndarray:
    """IQA-PyTorch's random 80/20 splits (its split pickles, its meta CSVs' split columns) hold rows out in val alone,
    with no test: the set it reports, and the one the configs score, here test."""
    val, test = SPLITS.index("val"), SPLITS.index("test")
    return np.where(codes == val, test, codes).astype(np.uint8) if (codes == val).any() and not (codes == test).any() \
        else codes


def splitter(records: Iterable[Record], spec: SplitSpec, label: str = "label file", official: str | None = None
             ) -> tuple[Callable[[Record], str | None], int, int, np.ndarray]:
    """A function record -> 'train' | 'val' | 'test' (None: a split file leaves it out), how many records it sends
    to a split and how many it leaves out, and each record's split code in the order read (an index of SPLITS, or
    NOT_LISTED). `label` names the label file and `official` where the release's split is read from, in messages.

    Reads every record of `records` first, so a bad label row or a repeated name stops the packer before it writes a
    shard. Keeps 9 bytes a record (its name's key and split code), so the packer can stream the records again
    afterwards with memory flat whatever the dataset's size.
    """
    if spec.protocol == "official":
        codes = array("B")
        for record in records:
            if record.split is None:
                how = f"it is read from {official}: add that, or use" if official else "this release has none, use"
                raise DataError(f"{label} row {record.row} ({record.name}) has no official split: {how} the ratio "
                                "protocol")
            codes.append(SPLITS.index(record.split))
        return lambda record: record.split, len(codes), 0, np.frombuffer(codes, dtype=np.uint8)
    keys = array("q")

    def keyed() -> Iterator[Record]:
        for r in records:
            keys.append(name_key(r.name))
            yield r

    if spec.protocol == "ratio":
        codes = _ratio_codes(keyed(), spec)
    elif spec.protocol == "file":
        codes = _file_codes(keyed(), spec)
    else:  # column: each record's split as its label file's column gives it
        codes = np.fromiter((SPLITS.index(r.split) for r in keyed()), dtype=np.uint8)
    if spec.protocol == "column" or str(spec.file).endswith(".pkl"):
        codes = _held_out_in_val_as_test(codes)
    keys_np = np.frombuffer(keys, dtype=np.int64)
    order = np.argsort(keys_np)
    sorted_keys, sorted_codes = keys_np[order], codes[order]

    def route(record: Record) -> str | None:
        key = name_key(record.name)
        i = int(np.searchsorted(sorted_keys, key))
        if i == len(sorted_keys) or sorted_keys[i] != key or sorted_codes[i] == NOT_LISTED:
            return None
        return SPLITS[sorted_codes[i]]

    listed = int((codes != NOT_LISTED).sum())
    return route, listed, len(codes) - listed, codes
