"""scale: peak memory and time of packing and of streaming evaluation over a synthetic AVA-sized set (255k small
samples) versus a smaller one (10k by default). Memory must stay flat and time grow linearly with the count.

Each set is written in AVA's released layout (AVA.txt, images/ID.jpg; 32x32 JPEGs, so the disk holds the large set
easily), packed into shards of 1000 with 2 processes, then scored by the tiny packaged backbone at 32x32 with 2 loader
workers. Each stage runs in a fresh process; its peak resident memory is that process's (`main_mib`) and that of
its largest worker (`worker_mib`, forked: it counts the pages it shares with its parent).
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path
from queue import Empty

from PIL import Image


def write_ava_like(root: Path, n: int) -> Path:
    """n images and AVA.txt (index, id, 10 vote counts, 2 tags, challenge) in AVA's layout."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    variants = []
    for v in range(16):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (16 * v, 255 - 16 * v, 128)).save(buf, format="JPEG", quality=90)
        variants.append(buf.getvalue())
    with (root / "AVA.txt").open("w") as fh:
        for i in range(n):
            image_id = 100000 + i
            (folder / f"{image_id}.jpg").write_bytes(variants[i % len(variants)])
            votes = " ".join(str((i * (k + 3)) % 17 + 1) for k in range(10))
            fh.write(f"{i + 1} {image_id} {votes} 0 0 {i % 1400}\n")
    return root


def _peaks() -> dict:
    # ru_maxrss is in KiB on Linux.
    return {"main_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def _pack(root: str, out: str, queue: mp.Queue) -> None:
    from temu_dist.data.splits import SplitSpec
    from temu_dist.pack import PackOptions, pack

    start = time.perf_counter()
    manifest = pack(PackOptions("ava", root, out, split=SplitSpec("ratio", (0.0, 0.0, 1.0)), shard_size=1000,
                                workers=2))
    queue.put({"seconds": time.perf_counter() - start, "count": manifest["splits"]["test"]["count"], **_peaks()})


def _evaluate(shards: str, queue: mp.Queue) -> None:
    from accelerate import Accelerator

    from temu_dist.config import load_config
    from temu_dist.evaluate import EvalSet, evaluate_sets
    from temu_dist.model.temu import build_model

    config = load_config(None, ["model.backbone=TeMu-Tiny-ViT-16", "model.pretrained=null", "model.image_size=32",
                                "model.prompt=none", "data.workers=2", "eval.batch_size=256", "device=cpu"])
    accelerator = Accelerator(cpu=True)
    model = build_model(config, accelerator.device)
    start = time.perf_counter()
    result = evaluate_sets(model, [EvalSet("test", shards, "test")], accelerator, config)["test"]
    queue.put({"seconds": time.perf_counter() - start, "count": result.metrics["count"], **_peaks()})


def _in_fresh_process(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not process.is_alive():
                raise RuntimeError(f"{target.__name__} died with exit code {process.exitcode}; its error is above") \
                    from None
    process.join()
    return result


def run(sizes: list[int], workdir: str | None = None) -> dict:
    rows = []
    if workdir is not None:  # mkdtemp needs its folder to be there
        Path(workdir).mkdir(parents=True, exist_ok=True)
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix=f"scale-{n}-", dir=workdir))
        try:
            start = time.perf_counter()
            root = write_ava_like(tmp / "ava", n)
            written = time.perf_counter() - start
            for stage, target, args in (("pack", _pack, (str(root), str(tmp / "shards"))),
                                        ("evaluate", _evaluate, (str(tmp / "shards"),))):
                got = _in_fresh_process(target, *args)
                if got["count"] != n:
                    raise RuntimeError(f"{stage} of {n} samples saw {got['count']}")
                row = {"samples": n, "stage": stage, "seconds": round(got["seconds"], 1),
                       "us_per_sample": round(1e6 * got["seconds"] / n, 1), "main_mib": got["main_mib"],
                       "worker_mib": got["worker_mib"], "write_release_s": round(written, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    import torch  # not at the top: the packing stage's process imports this module, and torch is 470 MiB of it

    from temu_dist.bench.common import device_name, now

    return {"suite": "scale", "device": device_name(torch.device("cpu")), "date": now(),
            "images": "32x32 JPEG, AVA layout", "rows": rows}
