"""Score images with a saved model: one JSON line (path, score) per image, optional patch-score heatmaps.

    python -m temu_dist.predict --checkpoint RUN_DIR IMAGE|FOLDER... [--heatmap DIR] [--out FILE] [key=value ...]
    python -m temu_dist.predict --config configs/X.yaml IMAGE...   (an untrained head: zero-shot multi-layer scoring)

With --out, the scores go to a CSV (path,score) or JSON-lines file, written whole when every image is done, with a
progress bar on stderr and nothing on stdout.

Scores are in [0, 1], higher better: the training set's MOS mapped linearly from its scale, as its pack's
manifest.json records it under "scale". An image that cannot be read, or whose heatmap cannot be written, gets an
error line on stderr naming it; the others are still scored, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import struct
import sys
import warnings
from pathlib import Path

import torch
from PIL import ExifTags, Image
from torchvision.transforms import functional as TF
from tqdm import tqdm

from temu_dist.atomic import write_text_atomic
from temu_dist.checkpoint import epoch_of
from temu_dist.config import ConfigError, check_output_folder, is_override, notices_as_lines
from temu_dist.data.augment import decode_rgb
from temu_dist.model.io import checkpoint_dir
from temu_dist.plots import heatmap
from temu_dist.scorer import Scorer
from temu_dist.stop import Terminated, sigterm_as_ctrl_c, stop_code

OUT_FORMATS = (".csv", ".jsonl")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of at least 1: {text!r}")
    return int(text)


HEATMAP = ".heatmap.png"


def _images_in(folder: Path) -> tuple[list[str], list[str]]:
    """The image files in folder and below, sorted by path: those whose extension PIL opens (torchvision's decoders
    take a subset of them), less the heatmaps of an earlier run writing into the folder; and the files left out."""
    opened = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    taken = [p for p in files if p.suffix.lower() in opened and not p.name.endswith(HEATMAP)]
    return [str(p) for p in taken], [str(p) for p in sorted(set(files) - set(taken))]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m temu_dist.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run folder (its best checkpoint) or a checkpoint folder")
    source.add_argument("--config", help="a config YAML: score with a freshly initialised head")
    parser.add_argument("--heatmap", help=f"write IMAGE{HEATMAP} patch-score maps into this folder (photo.jpg's: "
                                          f"photo.jpg{HEATMAP}; an image found in a folder's subfolder, into the "
                                          "same subfolder of it)")
    parser.add_argument("--heatmap-scale", choices=["fixed", "stretch"], default="fixed",
                        help="colours over 0-1 for every map (fixed, default), or over each map's own lowest to "
                             "highest score (stretch: where a model's scores differ little, where it looks)")
    parser.add_argument("--out", help="write the scores to this .csv (path,score) or .jsonl file instead of stdout")
    parser.add_argument("--batch-size", type=_positive, default=8, help="images scored at once (default 8)")
    parser.add_argument("items", nargs="+", metavar="IMAGE | FOLDER | key=value",
                        help="images, folders (every image in them and below, by path) and config overrides")
    args = parser.parse_intermixed_args(argv)
    overrides = [a for a in args.items if is_override(a) and not Path(a).exists()]
    args.images, args.heat_names = [], []  # each image's heatmap, as a path under --heatmap
    for item in (a for a in args.items if a not in overrides):
        if not Path(item).exists():  # a slip of the path, said before a model takes its time to load
            parser.error(f"{item}: no such file or folder")
        if not Path(item).is_dir():
            args.images.append(item)
            args.heat_names.append(Path(item).name + HEATMAP)
            continue
        found, others = _images_in(Path(item))
        if not found:
            parser.error(f"{item}: a folder with no image files in it or below")
        if others:
            print(f"predict: {item}: {len(others)} files left out, not images or named as heatmaps (*{HEATMAP}), "
                  f"e.g. {others[0]}", file=sys.stderr)
        args.images += found
        # As the folder holds them: class_a/001.jpg and class_b/001.jpg do not write one map.
        args.heat_names += [str(Path(f).relative_to(item)) + HEATMAP for f in found]
    if not args.images:
        parser.error("no images given")
    return args, overrides


def _orientation(data: bytes) -> int:
    """An image file's EXIF orientation tag; 1 (as stored) where it has none or its EXIF cannot be parsed: the tag
    only turns a heatmap upright, and the score stands without it."""
    # Only the header is read: PIL's guard against decompression bombs, for images it would decode, is beside the
    # point here (torchvision decoded this one).
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError):
        return 1


def _check_heatmaps(heat_dir: Path, images: list[str], names: list[str]) -> None:
    """Before any work: the folder can be made, and no two images would write the same heatmap file."""
    check_output_folder(heat_dir, "--heatmap")
    first: dict[str, str] = {}
    clashes = [(other, path, name) for path, name in zip(images, names)
               if (other := first.setdefault(name, path)) != path]
    if clashes:  # all at once, not one pair a run
        shown = "; ".join(f"{a} and {b} would both write {name}" for a, b, name in clashes[:3])
        more = f" ({len(clashes)} such images in all)" if len(clashes) > 3 else ""
        raise ConfigError(f"--heatmap: {shown}{more}; score them in separate runs")


def _check_out(out: Path) -> None:
    if out.suffix.lower() not in OUT_FORMATS:
        raise ConfigError(f"--out {out}: name a .csv or a .jsonl file")
    if out.is_dir():
        raise ConfigError(f"--out {out}: it is a folder, not a file")
    if out.exists() and not os.access(out, os.W_OK):  # the rename that writes it whole would replace it regardless
        raise ConfigError(f"--out {out}: a read-only file; make it writable, or name another")
    check_output_folder(out.parent, "--out")


def _scores_text(rows: list[dict], out: Path) -> str:
    if out.suffix.lower() == ".jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["path", "score"], lineterminator="\n")  # quotes paths with commas
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _weights_said(args: argparse.Namespace, scorer: Scorer) -> list[str]:
    """What a user may not know the scores come from: a run's best so far, or no training at all."""
    if args.checkpoint is None:
        tuned = scorer.config.model.prompt != "none"
        return [f"--config {args.config or '(defaults)'}: no --checkpoint, so an untrained head scores"
                + (f": its {scorer.config.model.prompt} prompt context is random" if tuned else
                   " (zero-shot, the fixed prompts)")]
    run = Path(args.checkpoint)
    if (run / "checkpoints").is_dir() and not (run / "results.json").is_file():
        epoch = epoch_of(checkpoint_dir(run))
        return [f"{run} has not finished: scoring its best so far"
                + (f", epoch {epoch}" if epoch is not None else "")]
    return []


def predict(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    heat_dir = Path(args.heatmap) if args.heatmap else None
    if heat_dir:
        _check_heatmaps(heat_dir, args.images, args.heat_names)
    out_file = Path(args.out) if args.out else None
    if out_file:
        _check_out(out_file)
    scorer = Scorer.load(args.checkpoint, overrides) if args.checkpoint else Scorer.from_config(args.config, overrides)
    for line in _weights_said(args, scorer):
        print(f"predict: {line}", file=sys.stderr)
    if scorer.config.model.pretrained is None:
        print("predict: model.pretrained is null: a random backbone carries little quality information, so these "
              "scores show the pipeline working, not what TeMu-IQA reaches", file=sys.stderr)
    if heat_dir:
        heat_dir.mkdir(parents=True, exist_ok=True)
    failed, rows, scored, maps = 0, [], 0, 0
    progress = tqdm(total=len(args.images), desc="predict", unit="img", file=sys.stderr, disable=out_file is None)
    try:
        for start in range(0, len(args.images), args.batch_size):
            chunk = args.images[start:start + args.batch_size]
            good: list[tuple[str, str, torch.Tensor, int]] = []  # and each one's EXIF orientation, for its heatmap
            for path, name in zip(chunk, args.heat_names[start:start + args.batch_size]):
                try:
                    data = Path(path).read_bytes()  # once, for the pixels and the heatmap's orientation
                    good.append((path, name, decode_rgb(data), _orientation(data) if heat_dir else 1))
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    failed += 1
                    progress.write(f"predict: cannot read image {path}: {e}", file=sys.stderr)
            progress.update(len(chunk) - len(good))
            if not good:
                continue
            out = scorer.outputs([im for _, _, im, _ in good])
            for i, (path, name, im, orientation) in enumerate(good):
                row = {"path": path, "score": round(float(out.score[i]), 6)}
                if out_file:
                    rows.append(row)
                else:
                    print(json.dumps(row), flush=True)
                scored += 1
                if heat_dir:
                    try:
                        (heat_dir / name).parent.mkdir(parents=True, exist_ok=True)
                        heatmap(TF.to_pil_image(im), out.patch_scores[i].float().cpu().numpy(), row["score"],
                                heat_dir / name, Path(path).name, stretch=args.heatmap_scale == "stretch",
                                orientation=orientation)
                        maps += 1
                    except OSError as e:  # a subfolder not writable, or a file in its place: the scores go on
                        failed += 1
                        progress.write(f"predict: cannot write heatmap {heat_dir / name}: {e.strerror or e}",
                                       file=sys.stderr)
            progress.update(len(good))
    except KeyboardInterrupt as e:
        progress.close()
        wrote = [f"{maps} heatmaps in {heat_dir}"] if heat_dir else []
        kept = [f"{out_file} not written{' (the earlier one is as it was)' if out_file.exists() else ''}"] \
            if out_file else []
        by = " by SIGTERM" if isinstance(e, Terminated) else ""
        print("\n" + "; ".join([f"predict: stopped{by} after scoring {scored} of {len(args.images)} images", *wrote,
                                *kept]), file=sys.stderr)
        return stop_code(e)
    progress.close()
    if out_file:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_file, _scores_text(rows, out_file))
        print(f"predict: {len(rows)} scores written to {out_file}", file=sys.stderr)
    return 1 if failed else 0


def main() -> None:
    try:
        with sigterm_as_ctrl_c(), notices_as_lines("predict"):  # SIGTERM: scancel, a job's time limit, kill
            sys.exit(predict())
    except ConfigError as e:
        sys.exit(f"predict: {e}")
    except KeyboardInterrupt as e:  # while the model loads; once scoring, predict says what it wrote
        sys.stderr.write("\npredict: stopped before scoring any image; nothing written\n")
        sys.exit(stop_code(e))


if __name__ == "__main__":
    main()
