"""Benchmarks that print figures as JSON, one line per measurement and the whole result at the end (tests never
time). Results are kept in benchmarks/RESULTS.md with the machine and the date.

    python -m temu_dist.bench step [--backbone ViT-L-14] [--image-size 448] [--batch 32] [--modes eager default ...]
        [--towers plain fp8] [--out FILE]
    python -m temu_dist.bench data [--workers 0 1 2] [--feed 375] [--dataset NAME --root DIR]
    python -m temu_dist.bench cw_ssim [--pairs 32]
    python -m temu_dist.bench scale [--sizes 10000 255000]
    python -m temu_dist.bench model [--backbones ViT-B-16 ViT-L-14]

Each suite's module (temu_dist/bench/SUITE.py) says what it measures and how.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from temu_dist.atomic import write_text_atomic
from temu_dist.config import ConfigError, check_output_folder

SUITES = ("step", "data", "cw_ssim", "scale", "model")
# The options each suite reads (--out for all): another's, given, would be ignored without a word.
READS = {"step": {"backbone", "image_size", "batch", "steps", "warmup", "precision", "modes", "towers", "sdpa",
                  "variants", "prompts", "peak_tflops", "profile"},
         "data": {"workers", "epochs", "image_size", "images", "feed", "dataset", "root"},
         "cw_ssim": {"pairs", "repeat"}, "scale": {"sizes", "workdir"}, "model": {"backbones", "image_size", "repeat"}}


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"at least {low}, not {value}")
        return value
    return parse


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"more than 0, not {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m temu_dist.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument("--out", help="also write the JSON result here")
    parser.add_argument("--repeat", type=_at_least(1), default=3, help="model, cw_ssim: best of this many runs")
    step = parser.add_argument_group("step")
    step.add_argument("--backbone", default="ViT-L-14")
    step.add_argument("--image-size", type=_at_least(1), default=448, help="also model and data")
    step.add_argument("--batch", type=_at_least(1), default=32,
                      help="global batch (samples; LDG doubles the tower images)")
    step.add_argument("--steps", type=_at_least(1), default=10, help="timed steps (the median counts)")
    step.add_argument("--warmup", type=_at_least(0), default=3)
    step.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    step.add_argument("--modes", nargs="+", default=["eager"],
                      choices=["eager", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                      help="eager and/or model.compile_mode values (each compiled): a row for each")
    step.add_argument("--towers", nargs="+", choices=["plain", "fp8"], default=["plain"],
                      help="the frozen tower in --precision's dtype (plain), and/or with fp8 matmuls (model.tower_fp8)")
    step.add_argument("--sdpa", nargs="+", choices=["default", "flash", "efficient", "cudnn", "math"],
                      default=["default"], help="the attention kernel: torch's choice and/or one forced on every "
                      "SDPA call")
    step.add_argument("--variants", nargs="+", choices=["S", "I"], default=["S", "I"])
    step.add_argument("--prompts", nargs="+", choices=["none", "coop", "cocoop"], default=["none", "coop", "cocoop"])
    step.add_argument("--peak-tflops", type=_positive, help="the device's peak, where the datasheet table lacks it")
    step.add_argument("--profile", type=_at_least(0), default=0, metavar="N",
                      help="profile one more step per row: its N costliest operations (GPU: kernels)")
    data = parser.add_argument_group("data")
    data.add_argument("--workers", type=_at_least(0), nargs="+", default=[0, 1, 2])
    data.add_argument("--epochs", type=_at_least(1), default=2)
    data.add_argument("--images", type=_at_least(1), default=256, help="size of the KonIQ-10k-like set")
    data.add_argument("--feed", type=_positive, help="samples/s the workers must feed (default: the H100 target, 375)")
    data.add_argument("--dataset", help="measure this release instead (with --root)")
    data.add_argument("--root")
    other = parser.add_argument_group("cw_ssim, scale, model")
    other.add_argument("--pairs", type=_at_least(1), default=32)
    other.add_argument("--sizes", type=_at_least(1), nargs="+", default=[10_000, 255_000])
    other.add_argument("--workdir", help="scale: where to write the synthetic sets (default: the temp folder)")
    other.add_argument("--backbones", nargs="+", default=["ViT-B-16", "ViT-L-14"])
    args = parser.parse_args(argv)
    if (args.dataset is None) != (args.root is None):
        parser.error("--dataset and --root go together")
    unread = [name for name in vars(args) if name not in ("suite", "out", *READS[args.suite])
              and getattr(args, name) != parser.get_default(name)]
    if unread:
        parser.error(f"--{unread[0].replace('_', '-')}: the {args.suite} suite does not read it")
    try:
        if args.out:  # before the benchmark, not after its minutes
            out = Path(args.out)
            check_output_folder(out.parent, "--out")
            if out.is_dir() or (out.exists() and not os.access(out, os.W_OK)):
                raise ConfigError(f"--out {out}: {'a folder' if out.is_dir() else 'not writable'}; name a file")
        result = _run(args)
    except ConfigError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.out), text + "\n")
    failed = [row for row in result.get("rows", []) if "error" in row]
    if failed:
        # The rows that ran are kept above; the exit status tells a script that some did not.
        print(f"bench: {len(failed)} of {len(result['rows'])} rows failed, the first with {failed[0]['error']}",
              file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> dict:
    if args.suite == "step":
        from temu_dist.bench import step as suite

        return suite.run(args.backbone, args.image_size, args.batch, args.steps, args.warmup, args.precision,
                         args.modes, args.variants, args.prompts, args.peak_tflops, args.profile,
                         tuple(args.towers), tuple(args.sdpa))
    if args.suite == "data":
        from temu_dist.bench import data as suite

        return suite.run(args.workers, args.epochs, args.image_size, args.images,
                         args.feed or suite.H100_TARGET_SAMPLES_PER_S, args.dataset, args.root)
    if args.suite == "cw_ssim":
        from temu_dist.bench import cw_ssim as suite

        return suite.run(args.pairs, args.repeat)
    if args.suite == "scale":
        from temu_dist.bench import scale as suite

        return suite.run(args.sizes, args.workdir)
    from temu_dist.bench import model as suite

    return suite.run(args.backbones, args.image_size, args.repeat)


if __name__ == "__main__":
    raise SystemExit(main())
