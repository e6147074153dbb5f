"""data: images/s of the training stream (decode, resize, flip, local distortion) per loader worker and in total,
from shards versus the same images read as loose files, and of the samples a mid-epoch resume passes over; the time
of each stage of one sample; and how many CPU workers it takes to feed a training step of a given rate.

By default the images are KonIQ-10k-like: 1024x768 JPEGs (quality 90) in KonIQ-10k's released layout, made from the
offline photos; --dataset/--root measure a release on disk instead (packed into a temporary folder first).
"""
from __future__ import annotations

import csv
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from temu_dist.bench.common import device_name, now
from temu_dist.config import Config, load_config
from temu_dist.data.augment import decode_rgb, to_input
from temu_dist.data.ldg import LocalDistortion
from temu_dist.data.sources import Record, read_records
from temu_dist.data.splits import SplitSpec
from temu_dist.data.stream import SharedEpoch, collate, decode_sample, train_loader
from temu_dist.demo_data import PHOTOS, photo
from temu_dist.pack import PackOptions, pack

# The training step to feed by default: the H100 target, 55% MFU of ViT-L-14 at 448 (about 750 tower
# images/s), in samples/s: with LDG at p=1 every sample enters the tower twice (itself and its distorted copy).
H100_TARGET_SAMPLES_PER_S = 375.0


def write_koniq_like(root: Path, n: int) -> Path:
    """n 1024x768 JPEGs and koniq10k_scores_and_distributions.csv (image_name, MOS_zscore), as KonIQ-10k releases
    them."""
    folder = root / "1024x768"
    folder.mkdir(parents=True, exist_ok=True)
    sources = [photo(name, (1024, 768)) for name in PHOTOS]
    with (root / "koniq10k_scores_and_distributions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_name", "MOS_zscore"])
        for i in range(n):
            name = f"{i:06d}.jpg"
            sources[i % len(sources)].save(folder / name, quality=90)
            writer.writerow([name, 100.0 * (i % 97) / 96])
    return root


class LooseFiles(Dataset):
    """The same decode and augmentation as the shard stream, reading each image file from disk."""

    def __init__(self, records: list[Record], config: Config):
        self.records = records
        self.hw = config.model.image_hw()
        self.ldg = LocalDistortion(config.ldg)
        self.p = config.ldg.p

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        ext = "png" if r.path.suffix.lower() == ".png" else "jpg"
        sample = {ext: r.path.read_bytes(), "json": json.dumps({"mos": r.mos, "name": r.name})}
        return decode_sample(sample, self.hw, True, self.ldg, self.p)


def stage_ms(records: list[Record], config: Config, n: int = 32) -> dict:
    """Milliseconds per sample of each stage, one thread, as one loader worker runs them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ldg = LocalDistortion(config.ldg)
    hw = config.model.image_hw()
    totals = {"read": 0.0, "decode": 0.0, "resize": 0.0, "local_distortion": 0.0}
    try:
        for r in records[:n]:
            t0 = time.perf_counter()
            data = r.path.read_bytes()
            t1 = time.perf_counter()
            image = decode_rgb(data)
            t2 = time.perf_counter()
            x = to_input(image, hw, flip=True)
            t3 = time.perf_counter()
            ldg(x)
            t4 = time.perf_counter()
            for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                totals[key] += dt
    finally:
        torch.set_num_threads(threads)
    count = min(n, len(records))
    return {k: round(1000 * v / count, 2) for k, v in totals.items()}


def _rate(make_loader, steps: int, epochs: int) -> tuple[int, float]:
    next(iter(make_loader()))  # start the workers before timing
    start, images = time.perf_counter(), 0
    for _ in range(epochs):
        for _, b in zip(range(steps), make_loader()):
            images += b["replayed"] if "replayed" in b else len(b["name"])
    return images, images / (time.perf_counter() - start)


def run(workers_list: list[int], epochs: int, image_size: int, images: int, feed: float,
        dataset: str | None = None, root: str | None = None) -> dict:
    config = load_config(None, [f"model.image_size={image_size}"])
    hw = config.model.image_hw()
    batch = 16
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if dataset is None:
            dataset, root, what = "koniq10k", write_koniq_like(Path(tmp) / "koniq", images), \
                f"{images} KonIQ-10k-like 1024x768 JPEGs (quality 90)"
        else:
            what = f"{dataset} release at {root}"
        records = list(read_records(dataset, root))
        pack(PackOptions(dataset, str(root), f"{tmp}/shards", split=SplitSpec("ratio", (1.0, 0.0, 0.0)),
                         shard_size=32))
        stages = stage_ms(records, config)
        print(json.dumps({"stage_ms_per_sample": stages}), flush=True)
        for workers in workers_list:
            cfg = config.model_copy(update={"data": config.data.model_copy(update={"workers": workers})})
            loader, steps = train_loader(cfg, f"{tmp}/shards", "train", batch, 1, 0, 1, SharedEpoch(0), hw)
            loose = DataLoader(LooseFiles(records, config), batch_size=batch, shuffle=True, drop_last=True,
                               num_workers=workers, collate_fn=collate, persistent_workers=workers > 0)
            # What a mid-epoch resume passes over: every batch of the epoch, read but not decoded.
            replay, _ = train_loader(cfg, f"{tmp}/shards", "train", batch, 1, 0, 1, SharedEpoch(0, replay=steps), hw)
            for source, make in (("shards", lambda: loader), ("loose files", lambda: loose),
                                 ("shards, passed over on resume", lambda: replay)):
                count, rate = _rate(make, steps, epochs)
                row = {"source": source, "workers": workers, "images": count, "images_per_s": round(rate, 1),
                       "per_worker": round(rate / max(workers, 1), 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"suite": "data", "image_size": image_size, "ldg": True, "batch": batch, "images": what,
              "device": device_name(torch.device("cpu")), "date": now(), "stage_ms_per_sample": stages, "rows": rows,
              "feed_samples_per_s": feed}
    result.update(workers_to_feed(rows, feed))
    return result


def workers_to_feed(rows: list[dict], feed: float) -> dict:
    """The fewest measured shard-reading workers that stream `feed` samples/s, or, where none did, an estimate from
    the per-worker rate of the most workers measured: a worker's rate falls as workers share the node's cores and
    memory, so one worker's rate would promise too much (H100 node: 82 samples/s alone, 48 among 15)."""
    shards = sorted((r for r in rows if r["source"] == "shards" and r["workers"] > 0), key=lambda r: r["workers"])
    if not shards:
        return {}
    fed = next((r["workers"] for r in shards if r["images_per_s"] >= feed), None)
    if fed is not None:
        return {"workers_to_feed": fed, "workers_to_feed_from": "measured"}
    most = shards[-1]
    return {"workers_to_feed": math.ceil(feed / most["per_worker"]),
            "workers_to_feed_from": f"estimated from the rate per worker of {most['workers']} workers"}
