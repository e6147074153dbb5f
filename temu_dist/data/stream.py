"""Shards -> batches. The training stream reshuffles shards each epoch from seed + epoch, splits them over ranks and
workers, shuffles samples in a buffer and gives every rank the same number of batches (no rank waits at the end of an
epoch for one that ran dry). The evaluation stream gives every sample exactly once across all ranks and workers.

Both stay out of accelerate's `prepare()`, which would re-shard them; batches are moved to the device by the caller.
All epoch/seed/shard-split logic is in this file; train asks it where a saved position leaves the readers.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import random
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from temu_dist.config import Config, ConfigError, error_line
from temu_dist.data.augment import decode_rgb, to_input
from temu_dist.data.keys import name_key
from temu_dist.data.ldg import LocalDistortion
from temu_dist.data.manifest import IMAGE_FORMATS, ShardsMissing, read_manifest
from temu_dist.stop import sigterm_from_the_trainer_only

log = logging.getLogger(__name__)


def split_shards(folder: str | Path, split: str) -> tuple[list[str], list[int]]:
    """Shard paths and their sample counts, of one split of a finished pack."""
    manifest = read_manifest(folder)
    if split not in manifest["splits"]:
        raise ShardsMissing(f"{folder}: no '{split}' split (it has {', '.join(manifest['splits']) or 'none'}); "
                            "pack with other --ratios or --split")
    info = manifest["splits"][split]
    paths = [str(Path(folder) / s["name"]) for s in info["shards"]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ShardsMissing(f"{missing[0]} is listed in the manifest but missing: rerun the pack command "
                            f"(python -m temu_dist.pack --verify {folder} lists what is wrong)")
    return paths, [s["count"] for s in info["shards"]]


class SharedEpoch:
    """The epoch, and how many of its first micro-batches the trainer discards (those a resumed epoch already trained),
    visible to persistent workers (they keep their own copy of the dataset object). `context`: the multiprocessing
    context the loader starts its workers with, where it is not the platform's default."""

    def __init__(self, epoch: int = 0, replay: int = 0, context=mp):
        self.state = context.Array("i", [epoch, replay])

    def set(self, epoch: int, replay: int = 0) -> None:
        self.state[:] = [epoch, replay]

    def get(self) -> int:
        return self.state[0]

    def replay(self) -> int:
        return self.state[1]


def _worker() -> tuple[int, int]:
    """This loader worker's index and the number of workers (0, 1 when the loader has none)."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def reader_count(world_size: int, workers: int) -> int:
    """How many readers (rank x loader worker) the training stream is split over; its sample order depends on it."""
    return world_size * max(1, workers)


def read_by(worker: int, workers: int, micro_batches: int, batch_size: int) -> int:
    """How many samples a rank's worker has given after the rank's first `micro_batches`: the loader takes batches
    from its workers in turn, so it made every workers-th."""
    return len(range(worker, micro_batches, workers)) * batch_size


def _slot(rank: int, world_size: int) -> tuple[int, int]:
    """This reader's index among all readers (ranks x workers), and their number."""
    worker, workers = _worker()
    return rank * workers + worker, world_size * workers


@dataclass
class TrainSamples(IterableDataset):
    """Endless raw samples for one reader (rank x worker), in passes over the data.

    Each pass permutes all shards with (seed, epoch, pass) and gives each of the n readers its own n-th of the pass's
    samples, a contiguous run in that order (by the manifest's shard counts): readers differ by at most one sample,
    whatever the shards' sizes, none is read twice within a pass, and a reader opens only the shards its run touches.
    Samples are shuffled within a pass, so a pass is read whole before the next one starts. Resampled: shards drawn
    with replacement, seeded by (seed, epoch, reader).

    Each sample carries `__seed__`, a function of (seed, epoch, reader, position): its flip and local distortion draw
    from it alone, so a resumed epoch passes over the samples the trainer discards (`SharedEpoch.replay`) as
    `{"__replayed__": True}` without decoding them and still augments the rest as the unbroken run did. A corrupt
    sample among those passed over would have been dropped and its place taken; there the rest of the epoch shifts
    by one sample.
    """

    urls: list[str]
    counts: list[int]  # samples per shard
    seed: int
    epoch: SharedEpoch
    rank: int
    world_size: int
    resampled: bool
    shuffle_buffer: int
    batch_size: int

    def _passes(self, slot: int, slots: int, epoch: int) -> Iterator[Iterator[dict]]:
        read = wds.tarfile_to_samples(handler=wds.warn_and_continue)
        if self.resampled:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch, slot]))
            yield read({"url": self.urls[int(i)]} for i in iter(lambda: rng.integers(len(self.urls)), None))
            return
        total = sum(self.counts)
        start, end = slot * total // slots, (slot + 1) * total // slots
        for cycle in range(1 << 30):
            order = np.random.Generator(np.random.PCG64([self.seed, epoch, cycle])).permutation(len(self.urls))
            yield _run(read, [self.urls[int(i)] for i in order], [self.counts[int(i)] for i in order], start, end)

    def __iter__(self) -> Iterator[dict]:
        slot, slots = _slot(self.rank, self.world_size)
        worker, workers = _worker()
        epoch = self.epoch.get()
        replayed = read_by(worker, workers, self.epoch.replay(), self.batch_size)
        rng = random.Random(f"{self.seed}-{epoch}-{slot}")
        shuffle = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)
        position = 0
        for samples in self._passes(slot, slots, epoch):
            for sample in shuffle(samples):
                if position < replayed:
                    yield {"__replayed__": True}
                else:
                    sample["__seed__"] = int(np.random.SeedSequence([self.seed, epoch, slot, position])
                                             .generate_state(1)[0])
                    yield sample
                position += 1


def _run(read, urls: list[str], counts: list[int], start: int, end: int) -> Iterator[dict]:
    """Samples start..end (end excluded) of the shards `urls` read one after another, holding `counts` samples."""
    at = 0
    for url, count in zip(urls, counts):
        if at < end and at + count > start:
            skip = max(start - at, 0)
            yield from islice(read(iter([{"url": url}])), skip, min(end, at + count) - at)
        at += count


@dataclass
class EvalShards(IterableDataset):
    """Every shard once, split over readers: by shard when there are enough shards, else every reader reads all shards
    and keeps every n-th sample (see `_keep_mine`)."""

    urls: list[str]
    rank: int
    world_size: int

    def __iter__(self) -> Iterator[dict]:
        slot, slots = _slot(self.rank, self.world_size)
        mine = self.urls[slot::slots] if len(self.urls) >= slots else self.urls
        for url in mine:
            yield {"url": url}


def _keep_mine(samples: Iterator[dict], rank: int, world_size: int, n_shards: int) -> Iterator[dict]:
    slot, slots = _slot(rank, world_size)
    if n_shards >= slots:
        yield from samples
        return
    for i, sample in enumerate(samples):
        if i % slots == slot:
            yield sample


def decode_sample(sample: dict, image_hw: tuple[int, int], flip: bool, ldg: LocalDistortion | None,
                  ldg_p: float, resize: str = "bicubic") -> dict | None:
    """Raw tar sample -> tensors; a corrupt sample is logged and dropped (the caller counts what it got)."""
    label = None
    try:
        label = json.loads(sample["json"])
        ext = next(e for e in IMAGE_FORMATS.values() if e in sample)
        image = to_input(decode_rgb(sample[ext]), image_hw, flip=flip and bool(torch.rand(()) < 0.5), resize=resize)
    except Exception as e:  # noqa: BLE001 - any undecodable sample is skipped, whatever the decoder raised
        # The image's name as the labels give it, where its label survived; else the sample's key in the shard.
        what = label["name"] if isinstance(label, dict) and "name" in label else f"sample {sample.get('__key__')}"
        log.warning("skipping corrupt sample %s in %s: %s", what, sample.get("__url__"), error_line(e))
        return None
    out = {"image": image, "mos": torch.tensor(label["mos"], dtype=torch.float32), "name": label["name"]}
    if ldg is not None:
        use = bool(torch.rand(()) < ldg_p)
        out["ldg_image"] = ldg(image)[0] if use else image
        out["ldg"] = torch.tensor(use)
    return out


def _decoded(samples: Iterator[dict], image_hw: tuple[int, int], flip: bool, ldg: LocalDistortion | None,
             ldg_p: float, resize: str) -> Iterator[dict]:
    for sample in samples:
        if "__replayed__" in sample:
            yield sample
            continue
        if "__seed__" in sample:
            # Flips and local distortions draw from torch's global generator (RandAugment takes no other).
            torch.default_generator.manual_seed(sample["__seed__"])
        out = decode_sample(sample, image_hw, flip, ldg, ldg_p, resize)
        if out is not None:
            yield out


def collate(samples: list[dict]) -> dict:
    if "__replayed__" in samples[0]:
        return {"replayed": len(samples)}
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "name"}
    batch["name"] = [s["name"] for s in samples]
    return batch


def epoch_steps(count: int, global_batch: int, max_steps: int | None) -> int:
    """Optimizer steps in an epoch of `count` samples: whole global batches, at most train.max_steps_per_epoch."""
    return min(count // global_batch, max_steps or count)


def train_loader(config: Config, folder: str, split: str, per_device_batch: int, accumulation: int, rank: int,
                 world_size: int, epoch: SharedEpoch, image_hw: tuple[int, int]) -> tuple[DataLoader, int]:
    """(loader, micro-batches per epoch). Every rank takes the same number of micro-batches of `per_device_batch`:
    whole global batches (per_device_batch x accumulation x world_size) of the split, capped by
    train.max_steps_per_epoch. Stop after that many. Batches: image and ldg_image uint8 [B, 3, H, W], mos [B],
    ldg [B] bool, name; the first `epoch.replay()` of an epoch are {"replayed": B}, not decoded."""
    urls, counts = split_shards(folder, split)
    count = sum(counts)
    data = config.data
    global_batch = per_device_batch * accumulation * world_size
    steps = epoch_steps(count, global_batch, config.train.max_steps_per_epoch)
    if steps == 0:
        raise ConfigError(f"train.batch_size: a global batch of {global_batch} is larger than the {count} images of "
                          f"{folder} '{split}'")
    micro_batches = steps * accumulation
    workers = data.workers
    readers = reader_count(world_size, workers)
    if count < readers and not data.resampled:  # a reader with no samples would wait for one for ever
        raise ConfigError(f"data.workers: {readers} data readers (processes x data.workers) for the {count} images of "
                          f"{folder} '{split}'; use fewer data.workers")
    ldg = LocalDistortion(config.ldg) if config.ldg.enabled else None

    per_worker = -(-micro_batches // max(1, workers))  # ceil: each worker's share of the epoch's batches
    pipeline = wds.DataPipeline(
        TrainSamples(urls, counts, config.seed, epoch, rank, world_size, data.resampled, data.shuffle_buffer,
                     per_device_batch),
        partial(_decoded, image_hw=image_hw, flip=data.flip, ldg=ldg, ldg_p=config.ldg.p, resize=config.model.resize),
        wds.batched(per_device_batch, collation_fn=collate, partial=False),
    ).with_epoch(nbatches=per_worker)
    loader = DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=torch.cuda.is_available(), worker_init_fn=sigterm_from_the_trainer_only)
    return loader, micro_batches


def _seeded_by_name(samples: Iterator[dict], seed: int) -> Iterator[dict]:
    """Each sample's local distortion drawn from (seed, its name): the same whatever the processes and workers."""
    for sample in samples:
        try:
            name = json.loads(sample["json"])["name"]
        except Exception:  # noqa: BLE001 - left for decode_sample, which logs and drops a corrupt sample
            yield sample
            continue
        sample["__seed__"] = int(np.random.SeedSequence([seed, name_key(name) & (2**64 - 1)]).generate_state(1)[0])
        yield sample


def eval_loader(folder: str, split: str, batch_size: int, rank: int, world_size: int, workers: int,
                image_hw: tuple[int, int], ldg: LocalDistortion | None = None,
                seed: int = 0, resize: str = "bicubic") -> tuple[DataLoader, int]:
    """(loader, expected count): every sample of the split exactly once over all ranks and workers, unshuffled,
    with partial last batches, resized (`resize`: model.resize) to image_hw. Batches: image uint8, mos, name; with
    `ldg`, also ldg_image, each image's local distortion seeded by `seed` and its name."""
    urls, counts = split_shards(folder, split)
    pipeline = wds.DataPipeline(
        EvalShards(urls, rank, world_size),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        # Partials, not closures: workers started by spawn or forkserver get the pipeline pickled.
        partial(_keep_mine, rank=rank, world_size=world_size, n_shards=len(urls)),
        *([partial(_seeded_by_name, seed=seed)] if ldg else []),
        partial(_decoded, image_hw=image_hw, flip=False, ldg=ldg, ldg_p=1.0, resize=resize),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    loader = DataLoader(pipeline, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=sigterm_from_the_trainer_only)
    return loader, sum(counts)
