"""Label files of the public IQA releases -> `Record`s, for the packer that writes WebDataset shards.

Two sources are accepted: each release's own label files (`read_records`), and IQA-PyTorch's meta-info CSVs
(`read_pyiqa_meta`, with `read_pyiqa_split` for its split pickles). Readers are generators that never open an
image: whether a file exists and decodes is the packer's check.

Conventions, the same for every dataset:
- `name` is the image path relative to the dataset root, POSIX style; `path` is root / name.
- `mos` is the label rescaled from `DatasetInfo.raw_range` to [0, 1], flipped where lower is better (DMOS); LIVE's
  few labels past its range land a little outside.
- `ref` is the reference image's file name (synthetic sets only), so both sources give the same ids.
- `row` is where a person finds the entry: the CSV/xlsx row with the header as row 1, the text line (AVA.txt),
  or the 1-based element of a .mat array.
- Side files (LIVE Challenge's image list, KonIQ's and FLIVE's split files, ...) are looked up next to the label
  file, as the releases ship them.
"""
from __future__ import annotations

import csv
import math
import os
import pickle
import zipfile
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple, get_args

import numpy as np
import openpyxl
import scipy.io as sio
from openpyxl.utils.exceptions import InvalidFileException
from scipy.io.matlab import MatReadError

from temu_dist.config import ConfigError, Split
from temu_dist.data.keys import name_key


class DataError(ConfigError):
    """A dataset label file that cannot be used; one line naming the file and, where it applies, row or column."""


@dataclass(frozen=True)
class Record:
    name: str            # image path relative to the dataset root, POSIX style; unique key within the dataset
    path: Path           # absolute path of the image file
    mos: float           # normalised to [0, 1] (LIVE: a little past), higher is better (DMOS datasets flipped)
    mos_raw: float       # the value exactly as in the label file (AVA: the mean of its vote counts)
    ref: str | None      # reference image file name for synthetic datasets (KADID-10k, CSIQ, LIVE), else None
    split: str | None    # the release's official split ('train' | 'val' | 'test') where it has one, else None
    row: int             # 1-based row/line/index in the label file, for error messages


@dataclass(frozen=True)
class DatasetInfo:
    name: str                 # registry key
    label_file: str           # default label file path relative to root, as released
    raw_range: tuple[float, float]
    higher_better: bool
    has_reference: bool
    official_split: str | None  # where the release's split is read from, beside the label file; None: it has none
    # Values a label file may hold where it overshoots raw_range; normalised, they fall a little outside [0, 1].
    accept_range: tuple[float, float] | None = None
    # The label file's score column, where it holds more than one score of an image; a pack records it.
    mos_column: str | None = None
    # The release's one folder of images, under root, where it ships them at more than one size (image_dir replaces it).
    image_dir: str | None = None


DATASETS: dict[str, DatasetInfo] = {i.name: i for i in (
    # MOS_zscore (0-100) of koniq10k_scores_and_distributions.csv, images in 1024x768/: the MOS that
    # koniq10k_distributions_sets.csv and IQA-PyTorch (the seed's code base) give and papers report on; the file's MOS
    # column, the ratings' plain mean (1-5), ranks the images otherwise. Split from the optional
    # koniq10k_distributions_sets.csv (github.com/subpic/koniq metadata), as IQA-PyTorch uses it.
    DatasetInfo("koniq10k", "koniq10k_scores_and_distributions.csv", (0.0, 100.0), True, False,
                "koniq10k_distributions_sets.csv", mos_column="MOS_zscore", image_dir="1024x768"),
    # 'Image name' and 'MOS' (0-100) of the first sheet; images in TestImage/.
    DatasetInfo("spaq", "Annotations/MOS and Image attribute scores.xlsx", (0.0, 100.0), True, False, None),
    # AllMOS_release (0-100) with AllImages_release.mat beside it; images in Images/.
    DatasetInfo("livec", "Data/AllMOS_release.mat", (0.0, 100.0), True, False, None),
    # 'name' and 'mos' (0-100); split from PaQ-2-PiQ's labels640.csv (test) and labels=640_padded.csv
    # ('is_valid' -> val) when both lie beside it, as IQA-PyTorch's process_flive.py derives it.
    DatasetInfo("flive", "labels_image.csv", (0.0, 100.0), True, False, "labels640.csv and labels=640_padded.csv"),
    # Mean of the 10 vote counts (1-10); test split from aesthetics_image_lists/generic_test.jpgl when present.
    DatasetInfo("ava", "AVA.txt", (1.0, 10.0), True, False, "aesthetics_image_lists/generic_test.jpgl"),
    DatasetInfo("kadid10k", "dmos.csv", (1.0, 5.0), True, True, None),
    DatasetInfo("csiq", "csiq.DMOS.xlsx", (0.0, 1.0), False, True, None),
    # dmos.mat's dmos (as IQA-PyTorch's process_live.py reads it, not dmos_realigned.mat), about 0-100; entries a
    # little outside are kept as they are: clipped, they would tie at 0 or 1 and bias the correlations scored against
    # them. The acceptance range still catches a wrong file.
    DatasetInfo("live", "dmos.mat", (0.0, 100.0), False, True, None, accept_range=(-10.0, 120.0)),
    # mos_quality (0-5); images beside data.csv or in a folder there (the release ships them as a separate zip),
    # or pass label_file when data.csv lies elsewhere.
    DatasetInfo("agiqa3k", "data.csv", (0.0, 5.0), True, False, None),
)}

_SPLITS = get_args(Split)
# CSIQ's dst_type -> (folder under dst_imgs/, token in the file name) of the release.
_CSIQ_TYPES = {"noise": ("awgn", "AWGN"), "jpeg": ("jpeg", "JPEG"), "jpeg 2000": ("jpeg2000", "jpeg2000"),
               "fnoise": ("fnoise", "fnoise"), "blur": ("blur", "BLUR"), "contrast": ("contrast", "contrast")}
# LIVE's dmos.mat lists the distorted images folder by folder, img1..imgN in each.
_LIVE_FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))
# The release's first 7 LIVE Challenge images are its training images; IQA work leaves them out.
_LIVEC_SKIP = 7


def _need(path: Path, what: str) -> Path:
    if path.is_dir():
        raise DataError(f"{path} is a folder: expected {what}")
    if not path.is_file():
        raise DataError(f"{path} not found: expected {what}")
    return path


def _label_under(root: Path, label_file: str | Path, what: str) -> Path:
    """root / label_file, which must be there. A relative label file that is not under root but in the working folder
    is said so: a shell's user reads a relative path from the working folder."""
    path = root / label_file
    if not path.is_file() and not Path(label_file).is_absolute() and Path(label_file).is_file():
        raise DataError(f"{path} not found: expected {what}; a relative --label-file is read under --root, and "
                        f"{label_file} is in the working folder: give it as {Path(label_file).absolute()}")
    return _need(path, what)


def _text(value: object) -> str:
    """A cell as text: spreadsheets store image ids and levels such as 1600 or 3 as numbers."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "" if value is None else str(value).strip()


def _checked(info: DatasetInfo, value: object, label: Path, row: int, column: str | None = None) -> float:
    """The score as a number on the dataset's scale; `column`: the score's column, to name it by."""
    score = column or ("MOS" if info.higher_better else "DMOS")
    try:
        raw = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"{label.name} row {row}: {score} {_text(value)!r} is not a number") from None
    lo, hi = info.accept_range or info.raw_range
    if not lo <= raw <= hi:
        raise DataError(f"{label.name} row {row}: {score} {raw:g} is outside {lo:g}..{hi:g} for {info.name}")
    return raw


def _scale(raw: float, raw_range: tuple[float, float], higher_better: bool) -> float:
    lo, hi = raw_range
    x = (raw - lo) / (hi - lo)
    return x if higher_better else 1.0 - x


def _record(dataset: str | DatasetInfo, root: Path, name: str, value: object, label: Path, row: int,
            ref: str | None = None, split: str | None = None, column: str | None = None) -> Record:
    # A name ending in "/" is a reader's folder prefix with an empty cell after it.
    if not PurePosixPath(name).name or name.endswith("/"):
        raise DataError(f"{label.name} row {row}: empty image name")
    if ref == "":  # the split by reference image would take the image for its own reference
        raise DataError(f"{label.name} row {row}: empty reference image name")
    info = dataset if isinstance(dataset, DatasetInfo) else DATASETS[dataset]
    raw = _checked(info, value, label, row, column)
    return Record(name, root / name, _scale(raw, info.raw_range, info.higher_better), raw, ref, split, row)


def _not_utf8(path: Path) -> DataError:
    """The error for a text file that does not decode, naming its first bad line (the decoder only knows a position
    in the block it was reading)."""
    with path.open("rb") as fh:
        for row, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(f"{path.name} row {row}: not UTF-8 text (byte {line[e.start]:#04x})")
    return DataError(f"{path.name}: not UTF-8 text")


def _lines(fh: Iterable[str], path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) pairs of a text file opened as UTF-8."""
    try:
        yield from enumerate(fh, 1)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        try:
            return [c.strip() for c in next(csv.reader(fh), [])]
        except UnicodeDecodeError:
            raise _not_utf8(path) from None


def _columns_said(header: list[str]) -> str:
    """A header as an error names it, with why a spreadsheet's export would not read: another separator."""
    if not header:
        return "no header: an empty file"
    sep = next((s for s in (";", "\t") if len(header) == 1 and s in header[0]), None)
    return f"columns: {', '.join(header)}" + (f"; its fields are separated by {sep!r}: save it comma-separated"
                                                if sep else "")


def _csv_rows(path: Path, columns: Iterable[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, row) pairs, streamed; the header must hold every column asked for, and each row a value for them (a
    row cut short is named as such, not as an empty value); other fields a short row lacks are empty."""
    columns = list(columns)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)  # a short row's missing fields: None
        try:
            reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
            for col in columns:
                if col not in reader.fieldnames:
                    raise DataError(f"{path.name}: no column '{col}' ({_columns_said(reader.fieldnames)})")
            for row in reader:
                # Cut short, or with values past the header's fields (empty ones: a spreadsheet's trailing commas).
                extra = any(v.strip() for v in row.get(None, ()))
                if any(row[c] is None for c in columns) or extra:
                    fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, ()))
                    raise DataError(f"{path.name} row {reader.line_num}: {fields} fields, the header has "
                                    f"{len(reader.fieldnames)}" + (" (a comma in an unquoted name?)" if extra else ""))
                yield reader.line_num, {k: "" if v is None else v for k, v in row.items()}
        except UnicodeDecodeError:
            raise _not_utf8(path) from None


def _xlsx_rows(path: Path, sheet: str | None, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, object]]]:
    """(sheet row, row) pairs below the header: the first row holding columns[0], as CSIQ's sheet need not
    start at A1. Blank rows are skipped."""
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, InvalidFileException, OSError) as e:
        raise DataError(f"{path.name}: not a readable xlsx file ({e})") from None
    try:
        if sheet is not None and sheet not in wb.sheetnames:
            raise DataError(f"{path.name}: no sheet '{sheet}' (sheets: {', '.join(wb.sheetnames)})")
        where: dict[str, int] | None = None
        ws = wb[sheet] if sheet else wb.worksheets[0]
        for r, values in enumerate(ws.iter_rows(values_only=True), 1):
            if where is None:
                header = [_text(v) for v in values]
                if columns[0] in header:
                    where = {c: header.index(c) for c in header if c}
                    missing = [c for c in columns if c not in where]
                    if missing:
                        raise DataError(f"{path.name}: no column '{missing[0]}' (columns: {', '.join(where)})")
                continue
            cells = {c: values[where[c]] if where[c] < len(values) else None for c in columns}
            if any(_text(v) for v in cells.values()):
                yield r, cells
        if where is None:
            others = "" if sheet or len(wb.sheetnames) == 1 else \
                f"; the release's labels are on its first sheet, and it has {', '.join(map(repr, wb.sheetnames))}"
            raise DataError(f"{path.name}: no column '{columns[0]}' in any row of sheet '{ws.title}'{others}")
    finally:
        wb.close()


def _mat(path: Path, var: str, *others: str) -> np.ndarray:
    """A variable of a .mat file: `var`, or the first of `others` there where it is not."""
    try:
        data = sio.loadmat(path)
    except (MatReadError, ValueError, OSError) as e:
        raise DataError(f"{path.name}: not a readable .mat file ({e})") from None
    found = next((v for v in (var, *others) if v in data), None)
    if found is None:
        names = ", ".join(k for k in data if not k.startswith("__"))
        raise DataError(f"{path.name}: no variable {' or '.join(repr(v) for v in (var, *others))} (variables: {names})")
    return np.ravel(data[found])


def _mat_strings(path: Path, var: str) -> list[str]:
    # A MATLAB cell array of strings loads as an object array of 1-element string arrays.
    return [str(np.ravel(item)[0]).strip() for item in _mat(path, var)]


def _read_koniq10k(root: Path, label: Path, image_dir: str) -> Iterator[Record]:
    sets = label.parent / "koniq10k_distributions_sets.csv"
    splits = None
    if sets.is_file():
        names = {"training": "train", "validation": "val", "test": "test"}
        splits, rows = {}, {}
        for row, rec in _csv_rows(sets, ("image_name", "set")):
            if rec["set"].strip() not in names:
                raise DataError(f"{sets.name} row {row}: set {rec['set']!r} is not training, validation or test")
            image = rec["image_name"].strip()
            if image in rows:  # in two sets, it would land in the last one's split without a word
                raise DataError(f"{sets.name} row {row}: image {image!r} already listed at row {rows[image]}")
            splits[image], rows[image] = names[rec["set"].strip()], row
    column = DATASETS["koniq10k"].mos_column
    for row, rec in _csv_rows(label, ("image_name", column)):
        image = rec["image_name"].strip()
        if not image:
            raise DataError(f"{label.name} row {row}: empty image name")
        if splits is not None and image not in splits:
            raise DataError(f"{sets.name}: no row for {image!r} ({label.name} row {row})")
        yield _record("koniq10k", root, f"{image_dir}/{image}", rec[column], label, row,
                      split=None if splits is None else splits[image], column=column)


def _read_spaq(root: Path, label: Path) -> Iterator[Record]:
    for row, rec in _xlsx_rows(label, None, ("Image name", "MOS")):
        yield _record("spaq", root, f"TestImage/{_text(rec['Image name'])}", rec["MOS"], label, row)


def _read_livec(root: Path, label: Path) -> Iterator[Record]:
    images = _need(label.parent / "AllImages_release.mat", "the LIVE Challenge release's Data/AllImages_release.mat")
    names, mos = _mat_strings(images, "AllImages_release"), _mat(label, "AllMOS_release")
    if len(names) != len(mos):
        raise DataError(f"{label.name}: {len(mos)} MOS values for {len(names)} images in {images.name}")
    for i in range(_LIVEC_SKIP, len(names)):
        yield _record("livec", root, f"Images/{names[i]}", mos[i], label, i + 1)


def _flive_splits(folder: Path) -> Callable[[str], str] | None:
    """PaQ-2-PiQ's split, read as IQA-PyTorch does: test if listed in labels640.csv, else val if is_valid in
    labels=640_padded.csv, else train. Without both files there is no split."""
    test_file, train_file = folder / "labels640.csv", folder / "labels=640_padded.csv"
    if not (test_file.is_file() and train_file.is_file()):
        return None
    test = {rec["name_image"].strip() for _, rec in _csv_rows(test_file, ("name_image",))}
    val = {rec["name_image"].strip() for _, rec in _csv_rows(train_file, ("name_image", "is_valid"))
           if rec["is_valid"].strip().lower() in ("true", "1")}
    return lambda name: "test" if name in test else "val" if name in val else "train"


def _read_flive(root: Path, label: Path) -> Iterator[Record]:
    split_of = _flive_splits(label.parent)
    for row, rec in _csv_rows(label, ("name", "mos")):
        name = rec["name"].strip()
        yield _record("flive", root, name, rec["mos"], label, row, split=split_of(name) if split_of else None)


def _read_ava(root: Path, label: Path) -> Iterator[Record]:
    test_list = label.parent / "aesthetics_image_lists" / "generic_test.jpgl"
    try:
        test = set(test_list.read_text(encoding="utf-8-sig").split()) if test_list.is_file() else None
    except UnicodeDecodeError:
        raise _not_utf8(test_list) from None
    with label.open(encoding="utf-8-sig") as fh:
        for row, line in _lines(fh, label):
            fields = line.split()
            if not fields:
                continue
            # index, image id, counts of votes 1..10, two semantic tags, challenge id
            where = f"{label.name} row {row}"
            if len(fields) < 12:
                raise DataError(f"{where}: {len(fields)} fields, expected at least 12 (index, id, 10 vote counts)")
            try:
                votes = [int(v) for v in fields[2:12]]
            except ValueError:
                raise DataError(f"{where}: vote counts {' '.join(fields[2:12])!r} are not all numbers") from None
            if sum(votes) <= 0:
                raise DataError(f"{where}: no votes")
            mean = sum(score * n for score, n in enumerate(votes, 1)) / sum(votes)
            split = None if test is None else "test" if fields[1] in test else "train"
            yield _record("ava", root, f"images/{fields[1]}.jpg", mean, label, row, split=split)


def _read_kadid10k(root: Path, label: Path) -> Iterator[Record]:
    for row, rec in _csv_rows(label, ("dist_img", "ref_img", "dmos")):
        yield _record("kadid10k", root, f"images/{rec['dist_img'].strip()}", rec["dmos"], label, row,
                      ref=rec["ref_img"].strip())


def _read_csiq(root: Path, label: Path) -> Iterator[Record]:
    for row, rec in _xlsx_rows(label, "all_by_image", ("image", "dst_type", "dst_lev", "dmos")):
        image, kind = _text(rec["image"]), _text(rec["dst_type"]).lower()
        if kind not in _CSIQ_TYPES:
            raise DataError(f"{label.name} row {row}: dst_type {rec['dst_type']!r} is not one of "
                            f"{', '.join(_CSIQ_TYPES)}")
        folder, token = _CSIQ_TYPES[kind]
        name = f"dst_imgs/{folder}/{image}.{token}.{_text(rec['dst_lev'])}.png"
        yield _record("csiq", root, name, rec["dmos"], label, row, ref=f"{image}.png")


def _read_live(root: Path, label: Path) -> Iterator[Record]:
    refnames = _need(label.parent / "refnames_all.mat", "the LIVE release's refnames_all.mat beside dmos.mat")
    # dmos_new: the release's dmos_realigned.mat (--label-file), which others train on, in the same order.
    dmos, orgs, refs = _mat(label, "dmos", "dmos_new"), _mat(label, "orgs"), _mat_strings(refnames, "refnames_all")
    names = [f"{folder}/img{k}.bmp" for folder, n in _LIVE_FOLDERS for k in range(1, n + 1)]
    if not len(dmos) == len(orgs) == len(refs) == len(names):
        raise DataError(f"{label.name}: {len(dmos)} dmos, {len(orgs)} orgs and {len(refs)} refnames_all entries; "
                        f"release 2 has {len(names)} of each")
    for i, name in enumerate(names):
        if orgs[i] != 1:  # orgs == 1 marks the reference images themselves
            yield _record("live", root, name, dmos[i], label, i + 1, ref=refs[i])


def _folder_holding(root: Path, names: Iterable[str]) -> str:
    """Where the first of names found lies, as a prefix: root itself (""), else the first folder directly under root
    that holds it ("SUB/"); where none is found, root, so the packer reports the images missing there."""
    subs = [sub for sub in sorted(root.iterdir()) if sub.is_dir()] if root.is_dir() else []
    for name in names:
        if (root / name).is_file():
            return ""
        found = next((f"{sub.name}/" for sub in subs if (sub / name).is_file()), None)
        if found is not None:
            return found
    return ""


def _read_agiqa3k(root: Path, label: Path) -> Iterator[Record]:
    # AGIQA-3K.zip unpacks to a folder whose name the release does not document; its 2982 rows are read whole to
    # find it, so that a first image missing does not make every other one look missing.
    rows = [(row, rec["name"].strip(), rec["mos_quality"]) for row, rec in _csv_rows(label, ("name", "mos_quality"))]
    folder = _folder_holding(root, (name for _, name, _ in rows))
    for row, name, mos in rows:
        yield _record("agiqa3k", root, folder + name, mos, label, row)


# Each takes (root, label file), and image_dir where DatasetInfo has one.
_READERS: dict[str, Callable[..., Iterator[Record]]] = {
    "koniq10k": _read_koniq10k, "spaq": _read_spaq, "livec": _read_livec, "flive": _read_flive, "ava": _read_ava,
    "kadid10k": _read_kadid10k, "csiq": _read_csiq, "live": _read_live, "agiqa3k": _read_agiqa3k,
}


def _info(dataset: str) -> DatasetInfo:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset '{dataset}'; valid: {', '.join(DATASETS)}")
    return DATASETS[dataset]


def _unique(read: Callable[[], Iterator[Record]], label: Path) -> Iterator[Record]:
    """The records of read(), then an error if a name repeats: the packer keys samples by name, so a repeated one is
    an error, not a silent overwrite. Checked once all are read, on 8 bytes a name; the packer reads every record
    (to split them) before it writes anything."""
    keys = array("q")
    for rec in read():
        keys.append(name_key(rec.name))
        yield rec
    if not keys:  # else a finished pack of nothing
        raise DataError(f"{label.name}: lists no images")
    keys_np = np.frombuffer(keys, dtype=np.int64)
    in_order = np.sort(keys_np)
    if not (in_order[1:] == in_order[:-1]).any():
        return
    order = np.argsort(keys_np, kind="stable")
    # The first record whose key an earlier one has, and that earlier one.
    later, earlier = min((int(order[i + 1]), int(order[i]))
                         for i in np.flatnonzero(keys_np[order[1:]] == keys_np[order[:-1]]))
    at = {i: rec for i, rec in enumerate(read()) if i in (later, earlier)}
    if at[later].name == at[earlier].name:
        raise DataError(f"{label.name} row {at[later].row}: image {at[later].name!r} already listed at row "
                        f"{at[earlier].row}")
    raise DataError(f"{label.name} rows {at[earlier].row} and {at[later].row}: the names {at[earlier].name!r} and "
                    f"{at[later].name!r} share a 64-bit hash, which the packer keys samples by; rename one")


def image_folder(dataset: str, image_dir: str | None, meta: bool = False) -> str | None:
    """An image folder asked for (pack's --image-dir) as a pack records it: a relative POSIX path under the root, or
    None where it is the release's own (KonIQ-10k's 1024x768) or, with a meta CSV (`meta`), IQA-PyTorch's layout.
    DataError where the release's images are in folders of its own, or the folder is not under the root."""
    if image_dir is None:
        return None
    info = _info(dataset)
    if not meta and info.image_dir is None:
        taken = ", ".join(name for name, i in DATASETS.items() if i.image_dir)
        raise DataError(f"--image-dir {image_dir}: the {dataset} release's images are in folders of its own; it is "
                        f"taken by {taken} and --meta-csv")
    folder = PurePosixPath(image_dir)
    if folder.is_absolute() or ".." in folder.parts:
        raise DataError(f"--image-dir {image_dir}: a folder under --root, named from there")
    own = _PYIQA_META[dataset].image_dir if meta and dataset in _PYIQA_META else info.image_dir
    return None if folder == PurePosixPath(own or ".") else folder.as_posix()


def read_records(dataset: str, root: str | Path, label_file: str | Path | None = None,
                 image_dir: str | None = None) -> Iterator[Record]:
    """Records of one release, lazily. label_file defaults to the release's; a relative one is under root. image_dir
    replaces the folder of a release that ships its images at more than one size (KonIQ-10k's 1024x768: 512x384).
    The dataset name, image_dir and the label file's presence are checked now, the rows as they are read."""
    info = _info(dataset)
    image_dir = image_folder(dataset, image_dir)
    root = Path(root).absolute()
    what = f"the {dataset} release's '{info.label_file}'"
    label = _label_under(root, label_file, what) if label_file else _need(root / info.label_file, what)
    folder = {"image_dir": image_dir or info.image_dir} if info.image_dir else {}
    return _unique(lambda: _READERS[dataset](root, label, **folder), label)


class _Meta(NamedTuple):
    image_dir: str    # IQA-PyTorch's dataroot_target relative to its dataset folder
    name_col: str
    mos_col: str
    ref_col: str | None = None


# Columns as IQA-PyTorch's scripts/process_*.py write them.
_PYIQA_META = {
    # koniq10k_distributions_sets.csv's MOS, the release's MOS_zscore (IQA-PyTorch's koniq10k-1024 config: mos_range
    # [0, 100]).
    "koniq10k": _Meta("1024x768", "img_name", "mos"),
    "spaq": _Meta("TestImage", "Image name", "MOS"),
    "livec": _Meta("", "img_name", "mos"),
    "flive": _Meta("", "img_name/patch_name", "mos"),  # images, then their patches
    "ava": _Meta("ava_images", "img_name", "MOS"),
    "kadid10k": _Meta("images", "dist_name", "dmos", "ref_name"),
    "csiq": _Meta("dst_imgs", "dist_name", "dmos", "ref_name"),
    "live": _Meta("", "dist_name", "mos", "ref_name"),  # 'mos' holds LIVE's DMOS
}
# IQA-PyTorch's official-split column: 'split' (KonIQ, FLIVE) or 'official split' (AVA) from its scripts,
# 'official_split' in its documented format; 0/1/2 or the phase name.
META_SPLIT_COLUMNS = ("official_split", "official split", "split")
_META_SPLIT_VALUES = {"0": "train", "1": "val", "2": "test", **{s: s for s in _SPLITS}}


def _split_column(label: Path, header: list[str], column: str | None, official: bool = True) -> str | None:
    """The column each record's split is read from: the one asked for, else an official split column if any."""
    if column and column not in header:
        raise DataError(f"{label.name}: no split column '{column}' ({_columns_said(header)})")
    return column or (next((c for c in META_SPLIT_COLUMNS if c in header), None) if official else None)


def _read_meta(dataset: str, root: Path, meta: Path, image_dir: Path, split_column: str | None) -> Iterator[Record]:
    spec, info = _PYIQA_META[dataset], DATASETS[dataset]
    header = _header(meta)
    split_col = _split_column(meta, header, split_column, bool(info.official_split))
    columns = [c for c in (spec.name_col, spec.mos_col, spec.ref_col) if c]
    for i, (row, rec) in enumerate(_csv_rows(meta, columns)):
        if dataset == "livec" and i < _LIVEC_SKIP:  # IQA-PyTorch's LIVEChallengeDataset drops them too
            continue
        split = None
        if split_col:
            split = _META_SPLIT_VALUES.get(rec[split_col].strip())
            if split is None:
                raise DataError(f"{meta.name} row {row}: {split_col} {rec[split_col]!r} is not 0/1/2 or train/val/test")
        cell = rec[spec.name_col].strip()
        name = Path(os.path.relpath(image_dir / cell, root)).as_posix() if cell else ""  # "": reported as empty
        ref = PurePosixPath(rec[spec.ref_col].strip()).name if spec.ref_col else None
        yield _record(dataset, root, name, rec[spec.mos_col], meta, row, ref, split)


def label_scale(info: DatasetInfo) -> dict:
    """How a pack's labels were normalised, for its manifest: mos = (raw - lo) / (hi - lo), and 1 minus that where
    lower is better."""
    lo, hi = info.raw_range
    return {"raw_range": [lo, hi], "higher_better": info.higher_better}


def read_pyiqa_meta(dataset: str, root: str | Path, meta_csv: str | Path, image_dir: str | Path | None = None,
                    split_column: str | None = None) -> Iterator[Record]:
    """Records from IQA-PyTorch's meta_info_<Dataset>.csv, lazily, normalised like the release's own labels.

    image_dir is the folder the CSV's names are relative to (IQA-PyTorch's dataroot_target), under root when
    relative; by default IQA-PyTorch's own layout (e.g. 1024x768 for KonIQ, dst_imgs for CSIQ). Names stay
    relative to root, so they match read_records' wherever the layouts agree. Each record's split is read from
    split_column (e.g. ratio802_seed123_split_01, one of IQA-PyTorch's random splits), else from the official split
    column where the dataset has one."""
    _info(dataset)
    if dataset not in _PYIQA_META:
        raise DataError(f"IQA-PyTorch has no meta-info CSV for {dataset}; read its release with read_records")
    root = Path(root).absolute()
    meta = _need(Path(meta_csv).absolute(), f"IQA-PyTorch's meta-info CSV for {dataset}")
    folder = root / (image_dir if image_dir is not None else _PYIQA_META[dataset].image_dir)
    return _unique(lambda: _read_meta(dataset, root, meta, folder, split_column), meta)


@dataclass(frozen=True)
class CsvLabels:
    """A dataset outside the nine, as IQA-PyTorch's general datasets take one: a CSV with a header and a row per image.
    `columns` name the image path (relative to the root), its score and optionally its reference image (for splits by
    reference); left empty, the first column is the image and the second its score, as IQA-PyTorch's GeneralNRDataset
    reads its meta CSV. A split column (official_split, official split or split) gives an official split."""
    name: str
    mos_range: tuple[float, float]
    higher_better: bool = True
    columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.name in DATASETS:
            raise DataError(f"--dataset {self.name} is one of the nine releases, read from its own label files, not "
                            "with --mos-range")
        lo, hi = self.mos_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise DataError(f"--mos-range {lo:g} {hi:g}: the lowest score first, then the highest, both finite")
        if self.columns and len(self.columns) not in (2, 3):
            raise DataError(f"--columns takes the image and score columns and optionally the reference's, not "
                            f"{len(self.columns)}")

    def info(self, label_file: str) -> DatasetInfo:
        return DatasetInfo(self.name, label_file, self.mos_range, self.higher_better, len(self.columns) == 3,
                           f"its split column ({', '.join(META_SPLIT_COLUMNS)})")

    def describe(self) -> dict:
        return {"columns": list(self.columns), "mos_range": list(self.mos_range), "higher_better": self.higher_better}


def _read_csv(spec: CsvLabels, root: Path, label: Path, split_column: str | None) -> Iterator[Record]:
    header = _header(label)
    columns = spec.columns or tuple(header[:2])
    listed = _columns_said(header)
    if len(columns) < 2:
        raise DataError(f"{label.name}: a header with the image and score columns is needed ({listed})")
    if not spec.columns and _is_number(columns[1]):
        raise DataError(f"{label.name} row 1 is data ({columns[1]!r} where the score column's name belongs): the "
                        "first line must be a header naming the columns")
    split_col = _split_column(label, header, split_column)
    twice = next((c for c in (*columns, split_col) if c and header.count(c) > 1), None)
    if twice:  # read by name, the last of them would be taken
        raise DataError(f"{label.name}: the header names column '{twice}' {header.count(twice)} times; rename all "
                        "but one")
    info = spec.info(label.name)
    for i, (row, rec) in enumerate(_csv_rows(label, columns)):
        # Text in the first row's score column: another column order, not one bad value.
        if i == 0 and not spec.columns and not _is_number(rec[columns[1]]):
            raise DataError(f"{label.name} row {row}: score {rec[columns[1]].strip()!r} of the second column, "
                            f"'{columns[1]}', is not a number: name the image and score columns with --columns "
                            f"({listed})")
        image = PurePosixPath(rec[columns[0]].strip())
        if image.is_absolute() or ".." in image.parts:
            raise DataError(f"{label.name} row {row}: image {str(image)!r} is not under --root: name images by their "
                            "path relative to it")
        split = None
        if split_col:
            split = _META_SPLIT_VALUES.get(rec[split_col].strip())
            if split is None:
                raise DataError(f"{label.name} row {row}: {split_col} {rec[split_col]!r} is not 0/1/2 or "
                                "train/val/test")
        ref = PurePosixPath(rec[columns[2]].strip()).name if len(columns) == 3 else None
        yield _record(info, root, image.as_posix() if image.name else "", rec[columns[1]], label, row, ref, split)


def read_csv_labels(spec: CsvLabels, root: str | Path, label_file: str | Path,
                    split_column: str | None = None) -> Iterator[Record]:
    """Records of a dataset of one's own from its CSV (a relative path is under root), lazily, normalised from
    spec.mos_range to [0, 1], higher better; each one's split from split_column, else an official split column."""
    root = Path(root).absolute()
    label = _label_under(root, label_file, f"{spec.name}'s label CSV (--label-file)")
    return _unique(lambda: _read_csv(spec, root, label, split_column), label)


class _PlainUnpickler(pickle.Unpickler):
    """Loads dicts, lists, ints and strs only: any global (class or function) could run code, so none loads."""

    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def read_pyiqa_split(pkl: str | Path, index: int = 0) -> dict[str, list[int]]:
    """IQA-PyTorch split pickle {split number: {'train': [...], 'val': [...], 'test': [...]}} -> one split's
    0-based row indices into its meta-info CSV (for LIVE Challenge, after dropping the first 7 rows), with every
    phase present. `index` is 0-based over the pickle's split numbers in order (IQA-PyTorch numbers them from 1), as
    the split index of every other protocol is; 0 is the only split of an official-split file."""
    path = _need(Path(pkl), "an IQA-PyTorch split pickle")
    try:
        with path.open("rb") as fh:
            data = _PlainUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path.name}: not a plain-data split pickle ({e})") from None
    if not isinstance(data, dict) or not data or not all(isinstance(k, int) for k in data):
        raise DataError(f"{path.name}: expected {{split number: {{phase: [row indices]}}}}")
    keys = sorted(data)
    if not 0 <= index < len(keys):
        raise DataError(f"{path.name}: no split index {index} (0-based); it holds {len(keys)} splits, "
                        f"numbered {', '.join(map(str, keys))}")
    key = keys[index]
    split = data[key]
    if not isinstance(split, dict) or set(split) - set(_SPLITS):
        raise DataError(f"{path.name} split {key}: expected phases {', '.join(_SPLITS)}")
    for phase, rows in split.items():
        if not isinstance(rows, list) or not all(isinstance(r, int) and r >= 0 for r in rows):
            raise DataError(f"{path.name} split {key}: '{phase}' is not a list of row indices")
    return {phase: list(split.get(phase, [])) for phase in _SPLITS}
