import io
import json
import logging
import re
import multiprocessing
import tarfile
from pathlib import Path

import pytest
import torch

from temu_dist.config import ConfigError
from temu_dist.data.augment import decode_rgb, to_input
from temu_dist.data.splits import SplitSpec
from temu_dist.data.stream import SharedEpoch, ShardsMissing, eval_loader, split_shards, train_loader
from temu_dist.pack import PackOptions, pack
from tests.conftest import tiny_config, write_kadid


def _pack(tmp_path, refs, per_ref, shard_size, ratios=(1.0, 0.0, 0.0)):
    labels = write_kadid(tmp_path / "kadid", refs=refs, per_ref=per_ref, size=(40, 30))
    pack(PackOptions("kadid10k", str(tmp_path / "kadid"), str(tmp_path / "shards"),
                     split=SplitSpec("ratio", ratios), shard_size=shard_size, workers=1))
    return str(tmp_path / "shards"), labels


def _names(loader):
    return [name for batch in loader for name in batch["name"]]


@pytest.mark.parametrize("shard_size", [4, 10], ids=["more-shards-than-readers", "fewer-shards-than-readers"])
def test_eval_gives_every_sample_exactly_once_over_2_ranks_and_2_workers(tmp_path, shard_size):
    folder, labels = _pack(tmp_path, refs=23, per_ref=1, shard_size=shard_size)
    seen = []
    for rank in range(2):
        loader, expected = eval_loader(folder, "train", batch_size=3, rank=rank, world_size=2, workers=2,
                                       image_hw=(30, 40))
        assert expected == 23
        seen += _names(loader)
    assert len(seen) == 23 and set(seen) == set(labels)


def test_train_stream_equal_length_per_rank_reshuffled_per_epoch(tmp_path):
    # 24 samples in 8 shards over 2 ranks x 2 workers: each reader's quota is exactly its 2 shards.
    folder, labels = _pack(tmp_path, refs=12, per_ref=2, shard_size=3)
    config = tiny_config("data.workers=2", "data.shuffle_buffer=8", "ldg.enabled=false")
    epoch = SharedEpoch(0)
    orders = {}
    for rank in range(2):
        loader, steps = train_loader(config, folder, "train", per_device_batch=3, accumulation=1, rank=rank,
                                     world_size=2, epoch=epoch, image_hw=(30, 40))
        assert steps == 24 // 6
        batches = [b for _, b in zip(range(steps), loader)]
        assert len(batches) == steps
        assert all(b["image"].shape == (3, 3, 30, 40) and b["image"].dtype == torch.uint8 for b in batches)
        orders[rank] = [n for b in batches for n in b["name"]]
    # One epoch reads every sample once over both ranks.
    assert sorted(orders[0] + orders[1]) == sorted(labels)

    def epoch_order(e, seed=0):
        torch.manual_seed(0)
        cfg = tiny_config("data.workers=2", "data.shuffle_buffer=8", "ldg.enabled=false", f"seed={seed}")
        shared = SharedEpoch(e)
        loader, steps = train_loader(cfg, folder, "train", 3, 1, 0, 2, shared, (30, 40))
        return [n for _, b in zip(range(steps), loader) for n in b["name"]]

    assert epoch_order(0) == orders[0]
    assert epoch_order(1) != orders[0]
    assert epoch_order(0, seed=5) != orders[0]


def test_uneven_shards_still_give_every_rank_the_same_batches_without_repeats(tmp_path):
    # 13 samples in 4 shards over 3 ranks x 2 workers: shards do not divide over the 6 readers.
    folder, labels = _pack(tmp_path, refs=13, per_ref=1, shard_size=4)
    config = tiny_config("data.workers=2", "data.shuffle_buffer=4", "ldg.enabled=false")
    seen = []
    for rank in range(3):
        loader, steps = train_loader(config, folder, "train", 2, 1, rank, 3, SharedEpoch(0), (30, 40))
        assert steps == 2
        batches = [b for _, b in zip(range(steps), loader)]
        assert len(batches) == steps
        seen += [n for b in batches for n in b["name"]]
    assert len(seen) == 12 and len(set(seen)) == 12 and set(seen) <= set(labels)


def test_a_short_last_shard_leaves_no_reader_short(tmp_path):
    # 16 samples in shards of 5, 5, 5 and 1 over 2 ranks x 2 workers: one shard a reader would be a short reader.
    folder, labels = _pack(tmp_path, refs=16, per_ref=1, shard_size=5)
    config = tiny_config("data.workers=2", "data.shuffle_buffer=4", "ldg.enabled=false")
    for epoch in range(3):
        seen = []
        for rank in range(2):
            loader, steps = train_loader(config, folder, "train", 2, 1, rank, 2, SharedEpoch(epoch), (30, 40))
            assert steps == 4
            seen += [n for _, b in zip(range(steps), loader) for n in b["name"]]
        assert sorted(seen) == sorted(labels)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_epoch_passes_over_trained_batches_undecoded_then_augments_as_the_unbroken_one(tmp_path, workers):
    folder, _ = _pack(tmp_path, refs=8, per_ref=2, shard_size=3)
    config = tiny_config(f"data.workers={workers}", "data.shuffle_buffer=4", "ldg.p=0.5", "ldg.region_min=5",
                         "ldg.region_max=10")

    def epoch_batches(shared):
        torch.manual_seed(123)  # whatever the generator held before, the stream's draws must not depend on it
        loader, steps = train_loader(config, folder, "train", 2, 1, 0, 1, shared, (30, 40))
        return [b for _, b in zip(range(steps), loader)]

    whole = epoch_batches(SharedEpoch(1))
    assert len(whole) == 8 and any(b["ldg"].any() for b in whole) and not all(b["ldg"].all() for b in whole)
    resumed = epoch_batches(SharedEpoch(1, replay=3))
    assert resumed[:3] == [{"replayed": 2}] * 3
    for a, b in zip(whole[3:], resumed[3:], strict=True):
        assert a["name"] == b["name"]
        assert all(torch.equal(a[k], b[k]) for k in ("image", "ldg_image", "mos", "ldg"))


@pytest.mark.parametrize("resampled", [False, True])
def test_capped_epochs_each_read_a_fresh_draw_of_the_whole_pack(tmp_path, resampled):
    # train.max_steps_per_epoch as open_clip's --train-num-samples: evaluating every N steps of a large set. An epoch
    # of 2 steps of 4 reads 8 of the 24 samples (none twice without resampling); the next epochs read others.
    folder, labels = _pack(tmp_path, refs=12, per_ref=2, shard_size=3)
    config = tiny_config("data.workers=0", "data.shuffle_buffer=8", "ldg.enabled=false",
                         "train.max_steps_per_epoch=2", f"data.resampled={str(resampled).lower()}")
    epoch = SharedEpoch(0)
    loader, micro = train_loader(config, folder, "train", 4, 1, 0, 1, epoch, (30, 40))
    assert micro == 2
    read = []
    for e in range(12):
        epoch.set(e)
        read.append([n for _, b in zip(range(micro), loader) for n in b["name"]])
        assert len(read[-1]) == 8
        if not resampled:
            assert len(set(read[-1])) == 8
    assert len({tuple(sorted(names)) for names in read}) == 12
    assert {n for names in read for n in names} == set(labels)


def test_resampled_stream_and_ldg_batches(tmp_path):
    folder, _ = _pack(tmp_path, refs=5, per_ref=2, shard_size=3)
    config = tiny_config("data.workers=0", "data.resampled=true", "ldg.p=1.0", "ldg.region_min=5",
                         "ldg.region_max=10")
    loader, steps = train_loader(config, folder, "train", 2, 1, 0, 1, SharedEpoch(0), (30, 40))
    batches = [b for _, b in zip(range(steps), loader)]
    assert len(batches) == steps == 5
    for b in batches:
        assert b["ldg"].all()
        changed = (b["ldg_image"] != b["image"]).any(dim=1)  # [B, H, W]
        for mask in changed:
            rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
            if len(rows):
                assert rows.max() - rows.min() < 10 and cols.max() - cols.min() < 10


def test_corrupt_sample_is_skipped_logged_and_counted(tmp_path, caplog):
    folder, labels = _pack(tmp_path, refs=7, per_ref=1, shard_size=7)
    shard = next(iter(sorted((tmp_path / "shards").glob("*.tar"))))
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for i, (m, data) in enumerate(members):
            if m.name.endswith(".png") and i == 2:
                data = b"broken" * 10
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    caplog.set_level(logging.WARNING)
    loader, expected = eval_loader(folder, "train", 4, 0, 1, 0, (30, 40))
    names = _names(loader)
    assert expected == 7 and len(names) == 6
    # Named as the labels name the image, with why in one line (PIL's own message names an in-memory buffer).
    assert re.search(r"skipping corrupt sample images/I\d\d_\d\d_\d\d.png in \S+.tar: ValueError: not an image "
                     r"torchvision or PIL can decode$", caplog.text, re.M), caplog.text


def test_both_loaders_resize_as_model_resize_asks(tmp_path):
    folder, _ = _pack(tmp_path, refs=2, per_ref=2, shard_size=4)
    with tarfile.open(next(Path(folder).glob("*.tar"))) as tar:
        stored = {json.loads(tar.extractfile(m).read())["name"]: tar.extractfile(m.name.replace(".json", ".png")).read()
                  for m in tar if m.name.endswith(".json")}
    hw = (24, 24)
    for resize in ("bicubic", "bilinear"):
        expected = {name: to_input(decode_rgb(data), hw, resize=resize) for name, data in stored.items()}
        config = tiny_config("data.workers=0", "ldg.enabled=false", "data.flip=false", f"model.resize={resize}")
        loader, _ = train_loader(config, folder, "train", 4, 1, 0, 1, SharedEpoch(0), hw)
        evaluated, _ = eval_loader(folder, "train", 4, 0, 1, 0, hw, resize=resize)
        for batch in (next(iter(loader)), next(iter(evaluated))):
            assert all(torch.equal(image, expected[name]) for image, name in zip(batch["image"], batch["name"]))
    assert not all(torch.equal(to_input(decode_rgb(d), hw), to_input(decode_rgb(d), hw, resize="bilinear"))
                   for d in stored.values())


def test_accumulation_multiplies_micro_batches_and_a_too_large_batch_is_named(tmp_path):
    folder, _ = _pack(tmp_path, refs=12, per_ref=2, shard_size=3)
    config = tiny_config("data.workers=0", "ldg.enabled=false")
    loader, micro = train_loader(config, folder, "train", 2, 3, 0, 2, SharedEpoch(0), (30, 40))
    assert micro == (24 // 12) * 3
    assert len([b for _, b in zip(range(micro), loader)]) == micro
    capped = tiny_config("data.workers=0", "ldg.enabled=false", "train.max_steps_per_epoch=1")
    assert train_loader(capped, folder, "train", 2, 3, 0, 2, SharedEpoch(0), (30, 40))[1] == 3
    with pytest.raises(ConfigError, match="train.batch_size: a global batch of 50 is larger than the 24 images"):
        train_loader(config, folder, "train", 25, 1, 0, 2, SharedEpoch(0), (30, 40))
    # A reader with no sample would wait for one for ever.
    many = tiny_config("data.workers=13", "ldg.enabled=false")
    with pytest.raises(ConfigError, match=r"^data.workers: 26 data readers \(processes x data.workers\) for the 24 "):
        train_loader(many, folder, "train", 2, 1, 0, 2, SharedEpoch(0), (30, 40))


def test_missing_shards_name_the_pack_command(tmp_path, monkeypatch):
    with pytest.raises(ShardsMissing, match=r"python -m temu_dist.pack --dataset NAME --root DATASET_DIR"):
        split_shards(tmp_path / "nowhere", "train")
    # A dataset's own folder named where a pack belongs: the command would pack it into itself.
    (tmp_path / "koniq10k").mkdir()
    (tmp_path / "koniq10k" / "scores.csv").write_text("x")
    with pytest.raises(ShardsMissing, match=rf"^{tmp_path / 'koniq10k'} holds no pack \(.tar shards and a "
                                            rf"manifest.json\): if these are a dataset's own files, pack them into a "
                                            rf"folder of their own, e.g. python -m temu_dist.pack --dataset koniq10k "
                                            rf"--root {tmp_path / 'koniq10k'} --out shards/koniq10k, and name that$"):
        split_shards(tmp_path / "koniq10k", "train")
    # A series' parent folder names its packs; hidden files alone are no dataset.
    for i in range(2):
        (tmp_path / "agiqa3k" / f"split{i}").mkdir(parents=True)
        (tmp_path / "agiqa3k" / f"split{i}" / "manifest.json").write_text("{}")
    with pytest.raises(ShardsMissing, match=rf"^{tmp_path / 'agiqa3k'} is no pack but holds packs \(split0, split1\): "
                                            rf"name one, e.g. {tmp_path / 'agiqa3k' / 'split0'}$"):
        split_shards(tmp_path / "agiqa3k", "train")
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".DS_Store").write_text("x")
    with pytest.raises(ShardsMissing, match="manifest.json not found: make the shards first"):
        split_shards(tmp_path / "hidden", "train")
    # The demo's own folder (the Makefile packs it), and only that one.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShardsMissing, match=r"make the shards first, e.g. make demo$"):
        split_shards("shards/demo", "train")
    # A relative path (as a run's config keeps it) is read from the working folder: said, for a run evaluated elsewhere.
    with pytest.raises(ShardsMissing, match=rf"^shards/demo/manifest.json not found \(a relative path, read from the "
                                            rf"working folder {tmp_path}; give the pack's whole path if it lies "
                                            rf"elsewhere\): make"):
        split_shards("shards/demo", "train")
    with pytest.raises(ShardsMissing, match=r"e.g. python -m temu_dist.pack --dataset NAME .*mine/demo$"):
        split_shards(tmp_path / "mine" / "demo", "train")
    # A folder named after its dataset gets that dataset's command.
    for folder, dataset in (("KonIQ-10k", "koniq10k"), ("kadid", "kadid10k"), ("live", "live"), ("livec", "livec"),
                            ("CLIVE", "livec"), ("LIVE_itW", "livec"), ("livefb", "flive"), ("f", "NAME"),
                            ("csi", "NAME"), ("mine", "NAME"), ("NAME", "NAME"), ("koniq_1024", "koniq10k"),
                            ("spaq-loda", "spaq")):
        with pytest.raises(ShardsMissing, match=rf"pack --dataset {dataset} --root DATASET_DIR --out .*{folder}$"):
            split_shards(tmp_path / "shards" / folder, "train")
    # With the split the configs' folder names stand for: a cross-dataset set packed whole, Q-Align's, a series'.
    for folder, dataset, split in (
            ("csiq-all", "csiq", " --ratios 0 0 1 (the whole set as its test split)"),
            ("spaq-qalign", "spaq", " --split file --split-file spaq-qalign.csv (made from Q-Align's JSON files by "
                                    "python -m temu_dist.data.qalign)"),
            ("koniq10k-official", "koniq10k", " --split official"), ("agiqa3k/split3", "agiqa3k", " --split-index 3"),
            # A dataset's bare name, as the configs name their packs: its release's split where it has one.
            ("koniq10k", "koniq10k", " --split official"), ("flive", "flive", " --split official"),
            ("spaq", "spaq", ""),
            ("koniq10k-loda", "koniq10k", " --meta-csv meta_info_KonIQ10kDataset.csv --split file --split-file "
                                          "koniq10k_82_seed3407.pkl --split-index 0 (LoDa's split, from IQA-PyTorch's "
                                          "files: configs/experiments/fig6-vitb16-time.yaml says how to check its "
                                          "order)")):
        with pytest.raises(ShardsMissing) as refused:
            split_shards(tmp_path / "shards" / folder, "train")
        assert str(refused.value).endswith(f"pack --dataset {dataset} --root DATASET_DIR --out "
                                           f"{tmp_path / 'shards' / folder}{split}")
    folder, _ = _pack(tmp_path, refs=3, per_ref=1, shard_size=2)
    with pytest.raises(ShardsMissing, match="no 'test' split"):
        split_shards(folder, "test")
    manifest = Path(folder) / "manifest.json"
    for damaged, says in (("{", "unreadable"), ("{}", "not a pack manifest")):
        manifest.write_text(damaged)
        with pytest.raises(ShardsMissing, match=f"{manifest}: {says}.*rerun the pack command"):
            split_shards(folder, "train")


def test_loaders_work_with_spawned_workers(tmp_path):
    # macOS starts loader workers by spawn and Python 3.14 by forkserver: both pipelines must pickle.
    folder, labels = _pack(tmp_path, refs=6, per_ref=2, shard_size=3)
    loader, _ = eval_loader(folder, "train", batch_size=4, rank=0, world_size=1, workers=1, image_hw=(30, 40))
    loader.multiprocessing_context = "spawn"
    assert sorted(_names(loader)) == sorted(labels)
    # Where spawn is the default, the shared epoch is made in its context too; here the test must say so.
    epoch = SharedEpoch(0, context=multiprocessing.get_context("spawn"))
    train, steps = train_loader(tiny_config("data.workers=1"), folder, "train", 4, 1, 0, 1, epoch, (30, 40))
    train.multiprocessing_context = "spawn"
    assert len(list(zip(range(steps), train))) == steps == 3
