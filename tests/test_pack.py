import hashlib
import io
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from tqdm import tqdm

from temu_dist.data.sources import CsvLabels, DataError
from temu_dist.data.splits import SplitSpec
import temu_dist.pack as pack_module
from temu_dist.pack import MANIFEST, PackOptions, ShardResult, main, pack, verify, write_shard
from tests.conftest import write_kadid


def _opts(root, out, **kw):
    kw.setdefault("split", SplitSpec("ratio", (0.6, 0.2, 0.2), seed=1, by_reference=True))
    return PackOptions("kadid10k", str(root), str(out), shard_size=kw.pop("shard_size", 4), workers=2, **kw)


def _samples(out: Path) -> dict[str, dict]:
    """name -> label, plus the stored image bytes, read back from every shard."""
    found = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for key in {n.split(".")[0] for n in members}:
            label = json.loads(members[f"{key}.json"])
            assert label["name"] not in found, f"{label['name']} packed twice"
            label["bytes"] = members[f"{key}.png"]
            label["shard"] = shard.name
            found[label["name"]] = label
    return found


def test_pack_then_read_round_trip(tmp_path):
    labels = write_kadid(tmp_path / "kadid", refs=5, per_ref=5)
    manifest = pack(_opts(tmp_path / "kadid", tmp_path / "out"))
    samples = _samples(tmp_path / "out")
    assert set(samples) == set(labels)
    for name, label in samples.items():
        ref, mos = labels[name]
        assert label["ref"] == ref and label["mos_raw"] == pytest.approx(mos)
        assert label["mos"] == pytest.approx((mos - 1) / 4)
        assert label["bytes"] == (tmp_path / "kadid" / name).read_bytes()
        assert label["shard"].startswith(label["split"])
    # Split by reference: each reference's images all land in one split.
    by_ref = {}
    for label in samples.values():
        by_ref.setdefault(label["ref"], set()).add(label["split"])
    assert all(len(s) == 1 for s in by_ref.values())
    assert {s: info["count"] for s, info in manifest["splits"].items()} == \
        {s: sum(1 for x in samples.values() if x["split"] == s) for s in manifest["splits"]}
    assert manifest["split"]["seed"] == 1 and manifest["source"]["label_sha256"]
    assert manifest["scale"] == {"raw_range": [1.0, 5.0], "higher_better": True}  # how the MOS was normalised
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["splits"] == manifest["splits"]
    assert verify(tmp_path / "out") == []


def test_the_python_api_splits_a_dataset_with_references_by_reference_unless_told(tmp_path):
    write_kadid(tmp_path / "kadid", refs=6, per_ref=3)
    for by_reference, pure in ((None, True), (False, False)):
        out = tmp_path / f"out-{by_reference}"
        pack(_opts(tmp_path / "kadid", out, split=SplitSpec("ratio", (0.5, 0.0, 0.5), by_reference=by_reference)))
        splits = {}
        for label in _samples(out).values():
            splits.setdefault(label["ref"], set()).add(label["split"])
        assert all(len(s) == 1 for s in splits.values()) == pure


def test_same_seed_same_shards_other_index_other_split(tmp_path):
    write_kadid(tmp_path / "kadid", refs=8, per_ref=2)
    a = pack(_opts(tmp_path / "kadid", tmp_path / "a"))
    b = pack(_opts(tmp_path / "kadid", tmp_path / "b"))
    assert a["splits"] == b["splits"]
    c = pack(_opts(tmp_path / "kadid", tmp_path / "c",
                   split=SplitSpec("ratio", (0.6, 0.2, 0.2), seed=1, index=1, by_reference=True)))
    assert c["splits"] != a["splits"]


def test_interrupted_pack_resumes_to_the_same_result(tmp_path):
    write_kadid(tmp_path / "kadid", refs=4, per_ref=5)
    clean = pack(_opts(tmp_path / "kadid", tmp_path / "clean", shard_size=2))
    # Break one image in the middle: the pack stops, keeps its finished shards, leaves no partial one.
    victim = tmp_path / "kadid" / "images" / "I03_02_01.png"
    good_bytes = victim.read_bytes()
    victim.write_bytes(good_bytes[:40])
    with pytest.raises(DataError, match=r"I03_02_01.png \(dmos.csv row \d+\): cannot read image"):
        pack(_opts(tmp_path / "kadid", tmp_path / "out", shard_size=2))
    out = tmp_path / "out"
    assert not (out / MANIFEST).exists()
    assert not list(out.glob("*.tmp"))
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert finished, "no shard finished before the failure"
    # A killed run can leave a temporary file behind; it must not count.
    (out / "train-000099.tar.tmp").write_bytes(b"half a shard")
    # Resuming with other options would mix shards of two packs.
    with pytest.raises(DataError, match=r"unfinished pack made with another --resize-shorter: pack into another "
                                        r"--out, or delete it$"):
        pack(_opts(tmp_path / "kadid", out, shard_size=2, resize_shorter=16))
    victim.write_bytes(good_bytes)
    resumed = pack(_opts(tmp_path / "kadid", out, shard_size=2))
    assert resumed["splits"] == clean["splits"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in finished} == finished
    assert not list(out.glob("*.tmp"))
    assert verify(out) == []


def test_a_finished_pack_packed_again_rewrites_a_shard_that_differs_from_its_manifest(tmp_path, capsys):
    # Taken as it is, the damage would be recorded as the shard's hash, and --verify would pass it from then on.
    write_kadid(tmp_path / "kadid", refs=3, per_ref=3)
    out = tmp_path / "out"
    first = pack(_opts(tmp_path / "kadid", out))
    shard = sorted(out.glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    image = data.index(b"IDAT")
    data[image + 8:image + 48] = bytes(40)
    shard.write_bytes(bytes(data))
    assert any("sha256 differs" in p for p in verify(out))
    again = pack(_opts(tmp_path / "kadid", out))
    err = capsys.readouterr().err
    assert f"pack: {shard} differs from the hash its manifest recorded (changed or corrupt); writing it again" in err
    assert err.count(f"pack: {out} holds shards an earlier run finished: kept, not written again") == 1
    assert again["splits"] == first["splits"] and verify(out) == []


def test_a_pack_whose_every_image_is_unreadable_is_refused_with_skip_bad(tmp_path):
    write_kadid(tmp_path / "kadid", refs=2, per_ref=2)
    kept = {image: image.read_bytes() for image in (tmp_path / "kadid" / "images").iterdir()}
    for image in kept:
        image.write_bytes(b"not an image")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'out'}: every one of its 4 images was unreadable \(the first, "
                                        r"images/\S+ of row \d+: .+\); is --root .* the release's folder\? Nothing "
                                        r"was written as a finished pack$"):
        pack(_opts(tmp_path / "kadid", tmp_path / "out", skip_bad=True))
    assert not (tmp_path / "out" / MANIFEST).exists()
    # The images mended, the same command packs them: the refused pack's empty shards are not kept.
    for image, data in kept.items():
        image.write_bytes(data)
    manifest = pack(_opts(tmp_path / "kadid", tmp_path / "out", skip_bad=True))
    assert sum(s["count"] for s in manifest["splits"].values()) == 4 and not manifest["skipped"]


def test_a_pack_reopened_for_its_left_out_images_still_checks_its_shards_hashes(tmp_path, capsys):
    write_kadid(tmp_path / "kadid", refs=3, per_ref=3)
    bad = tmp_path / "kadid" / "images" / "I02_01_01.png"
    good = bad.read_bytes()
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    pack(_opts(tmp_path / "kadid", out, skip_bad=True))
    shard = next(s for s in sorted(out.glob("*.tar")) if not s.with_name(s.name + ".skipped.json").exists())
    data = bytearray(shard.read_bytes())
    data[data.index(b"IDAT") + 8:data.index(b"IDAT") + 48] = bytes(40)
    shard.write_bytes(bytes(data))
    bad.write_bytes(good)
    pack(_opts(tmp_path / "kadid", out))  # without --skip-bad: the image left out goes in, its manifest is rewritten
    assert f"pack: {shard} differs from the hash its manifest recorded" in capsys.readouterr().err
    assert verify(out) == []


def _pack_files(folder: Path) -> dict[str, bytes]:
    """What a pack holds, by name, but its lock, which each pack names itself in (a second's change failed a CI run)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "pack.lock"}


def test_skip_bad_reports_every_skipped_image(tmp_path):
    labels = write_kadid(tmp_path / "kadid", refs=3, per_ref=3)
    (tmp_path / "kadid" / "images" / "I02_01_01.png").write_bytes(b"not an image")
    (tmp_path / "kadid" / "images" / "I03_03_01.png").unlink()
    # Every missing image at once, before any shard: a worker would stop at the first.
    (tmp_path / "kadid" / "images" / "I01_02_01.png").unlink()
    with pytest.raises(DataError, match=rf"^dmos.csv: 2 of the images it names are not under {tmp_path / 'kadid'}, "
                                        r"e.g. images/I01_02_01.png \(row \d+\), images/I03_03_01.png \(row \d+\): "
                                        r"fix --root or the files, or leave them out with --skip-bad$"):
        pack(_opts(tmp_path / "kadid", tmp_path / "strict2"))
    assert not (tmp_path / "strict2").exists()
    (tmp_path / "kadid" / "images" / "I01_02_01.png").write_bytes((tmp_path / "kadid" / "images" /
                                                                  "I01_01_01.png").read_bytes())
    with pytest.raises(DataError, match=r"^dmos.csv: 1 of the images it names is not under .*images/I03_03_01.png"):
        pack(_opts(tmp_path / "kadid", tmp_path / "strict"))
    manifest = pack(_opts(tmp_path / "kadid", tmp_path / "out", skip_bad=True))
    assert sorted(s["name"] for s in manifest["skipped"]) == ["images/I02_01_01.png", "images/I03_03_01.png"]
    assert all(s["row"] >= 2 and s["reason"] for s in manifest["skipped"])
    assert sum(info["count"] for info in manifest["splits"].values()) == len(labels) - 2
    assert set(_samples(tmp_path / "out")) == set(labels) - {"images/I02_01_01.png", "images/I03_03_01.png"}
    # Packed again without --skip-bad, the images it left out must read now: one does not, so nothing changes.
    images = tmp_path / "kadid" / "images"
    (images / "I02_01_01.png").write_bytes((images / "I02_02_01.png").read_bytes())
    before = _pack_files(tmp_path / "out")
    with pytest.raises(DataError, match=rf"^images/I03_03_01.png \(dmos.csv row \d+\), which {tmp_path / 'out'} left "
                                        r"out \(--skip-bad\), still cannot be read: file not found: .*; fix it, or "
                                        r"pack with --skip-bad as before$"):
        pack(_opts(tmp_path / "kadid", tmp_path / "out"))
    assert _pack_files(tmp_path / "out") == before
    # The shards that left images out are written again whole: an image they hold that is gone since stops it too.
    (images / "I03_03_01.png").write_bytes((images / "I03_02_01.png").read_bytes())
    shard = next(label["shard"] for label in _samples(tmp_path / "out").values()
                 if label["shard"] + ".skipped.json" in before)
    held = next(name for name, label in _samples(tmp_path / "out").items() if label["shard"] == shard)
    kept = (tmp_path / "kadid" / held).read_bytes()
    (tmp_path / "kadid" / held).unlink()
    with pytest.raises(DataError, match=rf"^{held} \(dmos.csv row \d+\) cannot be read \(file not found: .*\), and "
                                        r"its shard is written again to take in the images .* left out \(--skip-bad\)"):
        pack(_opts(tmp_path / "kadid", tmp_path / "out"))
    assert _pack_files(tmp_path / "out") == before
    (tmp_path / "kadid" / held).write_bytes(kept)
    # Both fixed, they go in.
    whole = pack(_opts(tmp_path / "kadid", tmp_path / "out"))
    assert whole["skipped"] == [] and set(_samples(tmp_path / "out")) == set(labels)
    assert not list((tmp_path / "out").glob("*.skipped.json")) and not verify(tmp_path / "out")


def test_verify_names_what_is_wrong(tmp_path, capsys):
    write_kadid(tmp_path / "kadid", refs=3, per_ref=3)
    pack(_opts(tmp_path / "kadid", tmp_path / "out"))
    out = tmp_path / "out"
    assert main(["--verify", str(out)]) == 0
    shards = sorted(out.glob("*.tar"))
    with open(shards[0], "ab") as fh:
        fh.write(b"\0" * 512)
    shards[1].unlink()
    problems = verify(out)
    assert any(shards[0].name in p and "sha256" in p for p in problems)
    assert any(shards[1].name in p and "missing" in p for p in problems)
    assert main(["--verify", str(out)]) == 1
    # A label not UTF-8, or JSON but not an object: the shard is named, not a traceback.
    for label in (b"\xff", b"[]"):
        with tarfile.open(shards[2], "w") as tar:
            member = tarfile.TarInfo("s.json")
            member.size = len(label)
            tar.addfile(member, io.BytesIO(label))
        assert any(p.startswith(f"{shards[2]}: unreadable (") for p in verify(out))
    for damaged, says in (("{", "unreadable"), ("[]", "not a pack manifest")):
        (out / "manifest.json").write_text(damaged)
        problems = verify(out)
        assert len(problems) == 1 and f"manifest.json: {says}" in problems[0]
    assert shards[1].name in capsys.readouterr().err
    (tmp_path / "unfinished").mkdir()
    assert verify(tmp_path / "unfinished") == [f"{tmp_path / 'unfinished'}: not a pack (no manifest.json, no shards)"]
    (tmp_path / "unfinished" / "pack.json").write_text("{}")  # killed within its first shard
    assert "never finished" in verify(tmp_path / "unfinished")[0]
    assert verify(tmp_path / "nothing") == [f"{tmp_path / 'nothing'}: no such folder"]


def test_a_finished_pack_with_other_options_is_left_alone(tmp_path):
    write_kadid(tmp_path / "kadid", refs=3, per_ref=3)
    first = pack(_opts(tmp_path / "kadid", tmp_path / "out"))
    with pytest.raises(DataError, match=r"made with another split \(--split and its options\): pack into another"):
        pack(_opts(tmp_path / "kadid", tmp_path / "out", split=SplitSpec("ratio", (0.5, 0.0, 0.5), seed=9)))
    labels = tmp_path / "kadid" / "dmos.csv"
    labels.write_bytes(labels.read_bytes().replace(b"\r\n", b"\n"))  # the same rows, another file
    with pytest.raises(DataError, match=r"made with another label file \(its contents changed\): pack into another"):
        pack(_opts(tmp_path / "kadid", tmp_path / "out"))
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["splits"] == first["splits"]
    assert verify(tmp_path / "out") == []


def test_resize_shorter_shrinks_large_images_only(tmp_path):
    write_kadid(tmp_path / "kadid", refs=2, per_ref=2, size=(90, 60))
    pack(_opts(tmp_path / "kadid", tmp_path / "out", resize_shorter=30,
               split=SplitSpec("ratio", (1.0, 0.0, 0.0))))
    for label in _samples(tmp_path / "out").values():
        assert Image.open(io.BytesIO(label["bytes"])).size == (45, 30)


def test_cli_packs_and_reports(tmp_path, capsys):
    write_kadid(tmp_path / "kadid", refs=3, per_ref=2)
    args = ["--dataset", "kadid10k", "--root", str(tmp_path / "kadid"), "--out", str(tmp_path / "out"), "--workers",
            "1", "--ratios", "0.5", "0", "0.5"]
    # --check: the split the pack would write, from the same checks, with nothing written.
    assert main([*args, "--check"]) == 0
    said = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert main(args) == 0
    assert "pack:" in capsys.readouterr().out
    splits = json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]
    assert said == f"pack: {tmp_path / 'out'}: would hold " + ", ".join(
        f"{name} {info['count']}" for name, info in splits.items()) + " (shards of 1000); nothing written\n"
    (tmp_path / "kadid" / "images" / "I01_01_01.png").unlink()
    assert main([*args[:5], str(tmp_path / "o3"), "--check"]) == 1
    assert "1 of the images it names is not under" in capsys.readouterr().err
    # With --skip-bad, left out of its split's count.
    assert main([*args[:5], str(tmp_path / "o3"), *args[6:], "--check", "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("; 1 image not there, left out (--skip-bad); nothing written\n")
    counts = dict(item.rsplit(" ", 1) for item in out.split("would hold ")[1].split(" (")[0].split(", "))
    assert sum(map(int, counts.values())) == sum(info["count"] for info in splits.values()) - 1
    assert not (tmp_path / "o3").exists()
    assert main(["--dataset", "kadid10k", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "o2")]) == 1
    assert "dmos.csv" in capsys.readouterr().err


def _edit_row(csv_file: Path, row: int, column: int, value: str) -> None:
    """Sets one cell of a label CSV (rows counted from 1, the header's)."""
    lines = csv_file.read_text().splitlines()
    cells = lines[row - 1].split(",")
    cells[column] = value
    lines[row - 1] = ",".join(cells)
    csv_file.write_text("\n".join(lines) + "\n")


def test_a_pack_stopped_before_its_first_shard_reruns_with_fixed_labels(tmp_path):
    write_kadid(tmp_path / "kadid", refs=3, per_ref=2)
    labels = tmp_path / "kadid" / "dmos.csv"
    good = labels.read_text()
    out = tmp_path / "out"
    _edit_row(labels, 5, 2, "abc")
    with pytest.raises(DataError, match=r"^dmos.csv row 5: MOS 'abc' is not a number$"):
        pack(_opts(tmp_path / "kadid", out))
    labels.unlink()
    with pytest.raises(DataError, match=r"dmos.csv not found"):
        pack(_opts(tmp_path / "kadid", out))
    assert not out.exists(), "written before the labels were read"
    # A bad image in the first shard: the labels were fine, but no shard was written, so other labels may follow.
    labels.write_text(good)
    (tmp_path / "kadid" / "images" / "I01_01_01.png").write_bytes(b"not an image")
    one_shard = SplitSpec("ratio", (1.0, 0.0, 0.0))
    with pytest.raises(DataError, match=r"images/I01_01_01.png \(dmos.csv row 2\): cannot read image: .*; fix or "
                                        r"remove it, or leave it out with --skip-bad$"):
        pack(_opts(tmp_path / "kadid", out, shard_size=100, split=one_shard))
    assert (out / "pack.json").exists() and not list(out.glob("*.tar"))
    labels.write_text("".join(line for line in good.splitlines(keepends=True) if "I01_01_01" not in line))
    manifest = pack(_opts(tmp_path / "kadid", out, shard_size=100, split=one_shard))
    assert sum(info["count"] for info in manifest["splits"].values()) == 5
    assert verify(out) == []


def test_resume_writes_again_the_shards_a_power_loss_cut_short(tmp_path, capsys):
    write_kadid(tmp_path / "kadid", refs=4, per_ref=2)
    clean = pack(_opts(tmp_path / "kadid", tmp_path / "clean", shard_size=2))
    out = tmp_path / "out"
    pack(_opts(tmp_path / "kadid", out, shard_size=2))
    (out / MANIFEST).write_text('{"splits": {"train"')  # a manifest cut short, as a power cut leaves it
    shards = sorted(out.glob("*.tar"))
    assert len(shards) >= 4
    data = [s.read_bytes() for s in shards]
    shards[0].write_bytes(b"")  # renamed before any of it reached the disk
    shards[1].write_bytes(data[1][:len(data[1]) // 2])  # cut short
    with tarfile.open(shards[2]) as tar:
        last = tar.getmembers()[-1]
    shards[2].write_bytes(data[2][:last.offset_data + 512 * -(-last.size // 512)])  # every member, no end of archive
    shards[3].write_bytes(data[3][:1024] + bytes(len(data[3]) - 1024))  # zeros past the first header
    resumed = pack(_opts(tmp_path / "kadid", out, shard_size=2))
    assert resumed["splits"] == clean["splits"]
    assert [s.read_bytes() for s in shards] == data
    assert verify(out) == []
    err = capsys.readouterr().err
    assert all(f"{s} is incomplete; writing it again" in err for s in shards[:4])


def _samples_of(root: Path, names: list[str]) -> list[tuple[str, dict]]:
    return [(f"train-{i:08d}", {"name": n, "dataset": "kadid10k", "mos": 0.5, "mos_raw": 3.0, "ref": "I01.png",
                                "split": "train", "row": i + 2, "path": str(root / n)}) for i, n in enumerate(names)]


def test_a_shard_is_on_disk_before_its_final_name_and_no_stale_skip_list_stays(tmp_path, monkeypatch):
    names = list(write_kadid(tmp_path / "kadid", refs=1, per_ref=2))
    out = tmp_path / "out"
    out.mkdir()
    # A run stopped between its skip list and its shard's rename; the images are readable now.
    (out / "train-000000.tar.skipped.json").write_text(json.dumps([{"name": names[0], "row": 2, "reason": "x"}]))
    synced, renamed = set(), []
    real_replace = os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.add(os.fstat(fd).st_ino))

    def replace(src, dst):
        renamed.append((Path(dst).name, os.stat(src).st_ino in synced))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    result = write_shard(str(out), "train-000000.tar", "train", _samples_of(tmp_path / "kadid", names), None, False,
                         "dmos.csv")
    assert renamed == [("train-000000.tar", True)]
    assert result.count == 2 and not (out / "train-000000.tar.skipped.json").exists()


def test_a_worker_counts_each_image_it_reads_and_the_bar_moves_while_a_shard_is_written(tmp_path, monkeypatch):
    """The bar moved when a whole shard was done: minutes apart for 1000 large images on each of 16 workers."""
    names = list(write_kadid(tmp_path / "kadid", refs=1, per_ref=2))
    (tmp_path / "kadid" / names[0]).write_bytes(b"not an image")
    read = multiprocessing.get_context().Value("q", 0)
    monkeypatch.setattr(pack_module, "_read", read)
    write_shard(str(tmp_path), "train-000000.tar", "train", _samples_of(tmp_path / "kadid", names), None, True,
                "dmos.csv")
    assert read.value == 2  # the skipped image too: the bar's total counts it
    shard, seen = Future(), []

    def shown() -> int:  # the bar's place at each look; the shard ends after the second
        seen.append(progress.n)
        if len(seen) == 2:
            shard.set_result(ShardResult("train-000000.tar", "train", 2, "x", []))
        return 7

    progress = tqdm(total=9, file=io.StringIO())
    results = []
    assert pack_module._collect({shard}, results, progress, shown) == set()
    assert seen == [0, 7, 7] and progress.n == 7 and [r.count for r in results] == [2]


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, capsys):
    write_kadid(tmp_path / "kadid", refs=2, per_ref=2)
    (tmp_path / "file").write_text("x")
    base = ["--dataset", "kadid10k", "--root", str(tmp_path / "kadid")]
    for args, message in [(["--out", str(tmp_path / "file")], f"--out {tmp_path / 'file'}: it is a file, not a folder"),
                          (["--out", str(tmp_path / "file" / "sub")], f"{tmp_path / 'file'} is a file, not a folder"),
                          (["--out", str(tmp_path / "o"), "--workers", "0"], "--workers must be at least 1, not 0"),
                          (["--out", str(tmp_path / "o"), "--shard-size", "0"],
                           "--shard-size must be at least 1, not 0"),
                          (["--out", str(tmp_path / "o"), "--resize-shorter", "-5"],
                           "--resize-shorter must be at least 1, not -5"),
                          (["--out", str(tmp_path / "o"), "--split-index", "-1"], "--split-index must be 0 or more"),
                          (["--out", str(tmp_path / "o"), "--split", "file"], "--split file needs --split-file"),
                          (["--out", str(tmp_path / "o"), "--split-file", "s.csv"],
                           "--split-file s.csv is read only with --split file"),
                          # A release's split is its own: no fractions or seed of ours move it.
                          (["--out", str(tmp_path / "o"), "--split", "official", "--ratios", "0.7", "0.1", "0.2"],
                           "--ratios: read only with --split ratio, not --split official"),
                          (["--out", str(tmp_path / "o"), "--split", "file", "--split-file", "s.csv", "--split-seed",
                            "3", "--ratios", "0", "0", "1"],
                           "--ratios and --split-seed: read only with --split ratio, not --split file"),
                          (["--out", str(tmp_path / "o"), "--split", "official", "--split-index", "3"],
                           "--split-index 3 picks a seeded --split ratio or a split of an IQA-PyTorch pickle; --split "
                           "official has one split only"),
                          # Its rows are numbered in IQA-PyTorch's meta CSV, in an order of its own.
                          (["--out", str(tmp_path / "o"), "--split", "file", "--split-file", "s.pkl"],
                           "--split-file s.pkl: an IQA-PyTorch split numbers the rows of its meta CSV; pass that CSV "
                           "with --meta-csv"),
                          (["--out", str(tmp_path / "o"), "--split", "column"], "--split column needs --split-column"),
                          (["--out", str(tmp_path / "o"), "--split-column", "s"],
                           "--split-column s is read only with --split column"),
                          (["--out", str(tmp_path / "o"), "--split", "column", "--split-column", "s"],
                           "--split column: s is a column of IQA-PyTorch's meta CSV (--meta-csv) or of a CSV of your "
                           "own; a release's label file has none")]:
        assert main(base + args) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_images_one_folder_below_the_root_are_pointed_to(tmp_path):
    """FLIVE_Database has a copy of labels_image.csv at its top and the images in database/."""
    from tests.test_sources import flive

    root = flive(tmp_path / "FLIVE_Database", splits=False)
    for i, name in enumerate(["voc_emotic_ava/AVA__1.jpg", "blur_dataset/motion0001.jpg", "EE371R/a.jpg"]):
        (root / "database" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), (40 * i, 0, 0)).save(root / "database" / name)
    shutil.copy(root / "labels_image.csv", root / "database")
    opts = PackOptions("flive", str(root), str(tmp_path / "o"), workers=1)
    with pytest.raises(DataError, match=rf"^labels_image.csv: 3 of the images it names are not under {root}, .*"
                                        rf"--skip-bad; voc_emotic_ava/AVA__1.jpg is under {root / 'database'}: give "
                                        r"that as --root$"):
        pack(opts)
    assert sum(s["count"] for s in pack(replace(opts, root=str(root / "database")))["splits"].values()) == 3


def test_a_koniq_pack_holds_its_mos_zscore_and_one_from_before_is_not_taken_for_it(tmp_path, capsys):
    from tests.test_sources import koniq

    root = koniq(tmp_path / "koniq", zscore=(77.38, 78.63, 0.0, 50.0, 60.0, 30.0))
    (root / "1024x768").mkdir()
    for i in range(6):
        Image.new("RGB", (32, 24), (40 * i, 0, 0)).save(root / "1024x768" / f"{i}.jpg")
    out = tmp_path / "shards"
    args = ["--dataset", "koniq10k", "--root", str(root), "--out", str(out), "--split", "official", "--workers", "1"]
    assert main(args) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["mos_column"] == "MOS_zscore" and manifest["scale"]["raw_range"] == [0.0, 100.0]
    labels = {}
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            labels.update((label["name"], label["mos_raw"]) for label in
                          (json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")))
    assert labels == {f"1024x768/{i}.jpg": z for i, z in enumerate((77.38, 78.63, 0.0, 50.0, 60.0, 30.0))}
    # A pack of the same files that an earlier temu-dist made of the MOS column: kept, not taken for this one.
    del manifest["mos_column"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(args) == 1
    assert capsys.readouterr().err == f"pack: {out} already holds a finished pack made with another score column " \
        "(a KonIQ-10k release pack reads MOS_zscore, 0-100, as IQA-PyTorch does; one before 2026-11-29 read its 1-5 " \
        "MOS; a meta CSV has its own): pack into another --out\n"

    # The release's half-size images, which IQA-PyTorch's KonIQ-10k configs read.
    (root / "1024x768").rename(root / "512x384")
    half = [*args[:5], str(tmp_path / "half"), *args[6:], "--image-dir", "512x384"]
    assert main(half) == 0
    assert json.loads((tmp_path / "half" / MANIFEST).read_text())["image_dir"] == "512x384"
    names = set()
    for shard in (tmp_path / "half").glob("*.tar"):
        with tarfile.open(shard) as tar:
            names |= {json.load(tar.extractfile(m))["name"] for m in tar if m.name.endswith(".json")}
    assert names == {f"512x384/{i}.jpg" for i in range(6)}
    assert "image_dir" not in manifest  # the full-size pack's, which named none
    capsys.readouterr()
    assert main([*half[:-2]]) == 1  # the same folder without it: another pack
    assert capsys.readouterr().err.startswith(f"pack: {tmp_path / 'half'} already holds a finished pack made with "
                                              "another --image-dir")
    with pytest.raises(DataError, match=r"^--image-dir x: the csiq release's images are in folders of its own; it is "
                                        r"taken by koniq10k and --meta-csv$"):
        pack(PackOptions("csiq", str(root), str(tmp_path / "c"), image_dir="x"))
    with pytest.raises(DataError, match=r"^--image-dir \.\./x: a folder under --root, named from there$"):
        pack(PackOptions("koniq10k", str(root), str(tmp_path / "c"), image_dir="../x"))
    # The release's own folder, named or not, is one pack; so is a folder named with a trailing slash.
    assert main([*half[:-1], "512x384/"]) == 0
    (root / "512x384").rename(root / "1024x768")
    assert main([*half[:-1], "1024x768"]) == 1 and "another --image-dir" in capsys.readouterr().err
    (out / MANIFEST).write_text(json.dumps({**manifest, "mos_column": "MOS_zscore"}))  # as this version wrote it
    assert main([*args, "--image-dir", "1024x768"]) == 0
    with pytest.raises(DataError, match=r"^--image-dir x: a CSV of your own names its images under --root"):
        pack(PackOptions("mine", str(root), str(tmp_path / "c"), label_file="l.csv", image_dir="x",
                         csv=CsvLabels("mine", (1.0, 5.0))))


def test_label_problems_stop_the_pack_with_one_line_naming_the_label_file(tmp_path, capsys):
    write_kadid(tmp_path / "kadid", refs=2, per_ref=2)
    labels = tmp_path / "kadid" / "dmos.csv"
    good = labels.read_text()
    args = ["--dataset", "kadid10k", "--root", str(tmp_path / "kadid"), "--out", str(tmp_path / "o")]
    assert main([*args, "--split", "official"]) == 1
    assert capsys.readouterr().err == "pack: --split official: the kadid10k release has no official split; use " \
                                      "--split ratio (the default) or --split file\n"
    # KonIQ-10k has one, in a file of its own that may be missing.
    (tmp_path / "koniq").mkdir()
    (tmp_path / "koniq" / "koniq10k_scores_and_distributions.csv").write_text("image_name,MOS_zscore\n0.jpg,30\n")
    assert main(["--dataset", "koniq10k", "--root", str(tmp_path / "koniq"), "--out", str(tmp_path / "o"),
                 "--split", "official"]) == 1
    assert capsys.readouterr().err == "pack: koniq10k_scores_and_distributions.csv row 2 (1024x768/0.jpg) has no " \
        "official split: it is read from koniq10k_distributions_sets.csv beside " \
        "koniq10k_scores_and_distributions.csv: add that, or use the ratio protocol\n"
    for row, column, message in [(None, None, "dmos.csv: lists no images"), (3, 0, "dmos.csv row 3: empty image name"),
                                 (4, 1, "dmos.csv row 4: empty reference image name")]:
        if row is None:
            labels.write_text(good.splitlines()[0] + "\n")
        else:
            labels.write_text(good)
            _edit_row(labels, row, column, "")
        assert main(args) == 1
        assert capsys.readouterr().err == f"pack: {message}\n"


def test_relative_label_file_is_under_the_root(tmp_path, monkeypatch):
    write_kadid(tmp_path / "kadid", refs=2, per_ref=2)
    (tmp_path / "kadid" / "labels").mkdir()
    moved = (tmp_path / "kadid" / "dmos.csv").rename(tmp_path / "kadid" / "labels" / "dmos.csv")
    monkeypatch.chdir(tmp_path)
    manifest = pack(_opts(tmp_path / "kadid", tmp_path / "out", label_file="labels/dmos.csv"))
    assert manifest["source"]["label_file"] == str(moved)
    assert manifest["source"]["label_sha256"] == hashlib.sha256(moved.read_bytes()).hexdigest()
    # One in the working folder but not under the root: the error says how to give it.
    shutil.copy(moved, tmp_path / "mine.csv")
    with pytest.raises(DataError, match=r"kadid/mine.csv not found: .*; a relative --label-file is read under --root, "
                                        r"and mine.csv is in the working folder: give it as .*/mine.csv$"):
        pack(_opts(tmp_path / "kadid", tmp_path / "out2", label_file="mine.csv"))
    assert not (tmp_path / "out2").exists()
    # Not asked for by name, the release's label file is not looked for in the working folder.
    shutil.copy(moved, tmp_path / "dmos.csv")
    with pytest.raises(DataError, match=r"kadid/dmos.csv not found: expected the kadid10k release's 'dmos.csv'$"):
        pack(_opts(tmp_path / "kadid", tmp_path / "out2"))


def test_progress_shows_its_total_when_stderr_is_no_terminal(tmp_path, capsys):
    write_kadid(tmp_path / "kadid", refs=3, per_ref=2)
    assert main(["--dataset", "kadid10k", "--root", str(tmp_path / "kadid"), "--out", str(tmp_path / "out"),
                 "--workers", "1", "--ratios", "0.5", "0", "0.5"]) == 0
    assert "6/6" in capsys.readouterr().err


@pytest.mark.parametrize("stop, code, said", [
    (lambda pid: os.killpg(pid, signal.SIGINT), 130, "interrupted"),
    # A SIGTERM to the main process alone (kill PID): its workers went on packing, orphaned.
    (lambda pid: os.kill(pid, signal.SIGTERM), 143, "stopped by SIGTERM"),
])
def test_ctrl_c_or_sigterm_stops_the_workers_at_once_with_one_line(tmp_path, stop, code, said):
    """A worker stuck on an image (a named pipe nobody writes to) holds the pack: Ctrl-C, sent to the process group as
    a terminal sends it, or SIGTERM must end it at once, keeping the finished shards."""
    write_kadid(tmp_path / "kadid", refs=2, per_ref=2)
    stuck = tmp_path / "kadid" / "images" / "I02_02_01.png"
    stuck.unlink()
    os.mkfifo(stuck)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "temu_dist.pack", "--dataset", "kadid10k", "--root",
                             str(tmp_path / "kadid"), "--out", str(out), "--shard-size", "1", "--workers", "2",
                             "--ratios", "1", "0", "0"], stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # A test run in the background inherits SIGINT ignored; a terminal's pack would not.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        while not (out / "train-000000.tar").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        stop(proc.pid)
        _, err = proc.communicate(timeout=30)
        _gone(proc.pid, 10)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code
    assert err.splitlines()[-1] == f"pack: {said}; finished shards are kept, rerun the same command to continue"
    assert "Traceback" not in err
    assert (out / "train-000000.tar").exists() and not (out / MANIFEST).exists()
    assert not list(out.glob("*.tmp")), "the shard a stopped worker was writing stays until the rerun"


def test_workers_whose_pack_was_killed_stop_and_let_the_folder_go(tmp_path):
    """kill -9 or the OOM killer end the main process alone: its workers, which leave SIGTERM to it, packed on."""
    write_kadid(tmp_path / "kadid", refs=40, per_ref=4, size=(512, 384))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "temu_dist.pack", "--dataset", "kadid10k", "--root", str(tmp_path / "kadid"),
           "--out", str(out), "--shard-size", "2", "--workers", "2"]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the pack ended before it could be killed"
        proc.kill()
        proc.wait()
        _gone(proc.pid, 20)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    assert main(cmd[3:]) == 0 and verify(out) == []


def test_a_second_pack_into_a_folder_being_packed_is_refused_naming_the_first(tmp_path):
    """Two at once (a command typed twice, a job requeued) overwrote each other's shards: the finished pack's manifest
    named hashes its shards no longer had."""
    from temu_dist import lock

    write_kadid(tmp_path / "kadid", refs=3, per_ref=3)
    out = tmp_path / "out"
    out.mkdir()
    held = lock.take(out / "pack.lock")
    try:
        for check in (False, True):
            with pytest.raises(DataError, match=rf"^{out}: another pack is writing this folder \(pid {os.getpid()} "
                                                r"on .*\): wait for it to end or stop it$"):
                pack(_opts(tmp_path / "kadid", out), check=check)
        assert sorted(p.name for p in out.iterdir()) == ["pack.lock"]
    finally:
        lock.let_go(held)
    pack(_opts(tmp_path / "kadid", out))
    assert verify(out) == []


def test_a_split_file_is_known_by_its_contents_not_by_how_its_path_is_spelt(tmp_path, monkeypatch):
    labels = write_kadid(tmp_path / "kadid", refs=3, per_ref=3)
    split_file = tmp_path / "split.csv"
    split_file.write_text("name,split\n" + "".join(f"{n},{'train' if i < 6 else 'test'}\n"
                                                   for i, n in enumerate(sorted(labels))))
    out = tmp_path / "out"
    first = pack(_opts(tmp_path / "kadid", out, split=SplitSpec("file", file=str(split_file))))
    monkeypatch.chdir(tmp_path)
    again = pack(_opts(tmp_path / "kadid", out, split=SplitSpec("file", file="./split.csv")))
    assert again["splits"] == first["splits"]
    assert again["split"] == first["split"]  # as recorded: the digest runs trained on it know it by stays
    split_file.write_text(split_file.read_text().replace(",test", ",val"))
    with pytest.raises(DataError, match=r"made with another split file \(its contents changed\): pack into another"):
        pack(_opts(tmp_path / "kadid", out, split=SplitSpec("file", file=str(split_file))))
    assert verify(out) == [] and json.loads((out / MANIFEST).read_text())["splits"] == first["splits"]


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    import errno

    write_kadid(tmp_path / "kadid", refs=3, per_ref=3)
    out = tmp_path / "out"

    def full(tar, name, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "train-000000.tar.tmp"))

    monkeypatch.setattr(pack_module, "_add", full)  # in the workers too: forked after it
    assert main(["--dataset", "kadid10k", "--root", str(tmp_path / "kadid"), "--out", str(out), "--workers", "1"]) == 1
    assert capsys.readouterr().err.endswith(f"pack: {out / 'train-000000.tar.tmp'}: No space left on device; finished "
                                            "shards are kept, rerun the same command to continue\n")


def test_a_phones_multi_picture_jpeg_is_kept_as_the_jpeg_it_is(tmp_path):
    """MPO (Pillow's name for a JPEG with more pictures after the first) was stored as a PNG three times its size."""
    labels = write_kadid(tmp_path / "kadid", refs=1, per_ref=2, size=(64, 48))
    name = sorted(labels)[0]
    photo = Image.open(tmp_path / "kadid" / name).convert("RGB")
    mpo = tmp_path / "kadid" / name
    photo.save(mpo, format="MPO", save_all=True, append_images=[photo.rotate(90)])
    assert Image.open(mpo).format == "MPO"
    pack(_opts(tmp_path / "kadid", tmp_path / "out", split=SplitSpec("ratio", (1.0, 0.0, 0.0))))
    stored = {}
    for shard in (tmp_path / "out").glob("*.tar"):
        with tarfile.open(shard) as tar:
            stored.update({m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar})
    assert stored["jpg"] == mpo.read_bytes()


def _gone(pgid: int, seconds: float) -> None:
    """Waits for every process of the group to end, for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _group_alive(pgid), "a worker outlived the pack"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_qalign_split_becomes_the_split_file_pack_reads(tmp_path, capsys):
    from temu_dist.data.qalign import main as qalign

    labels = write_kadid(tmp_path / "kadid", refs=3, per_ref=2)
    names = sorted(labels)  # images/I01_01_01.png, ...
    # Q-Align names images in a folder of its own, and leaves some out.
    for split, part in (("train", names[:3]), ("test", names[3:5])):
        (tmp_path / f"{split}_kadid.json").write_text(json.dumps(
            [{"id": n, "image": f"kadid10k/{Path(n).name}", "conversations": []} for n in part]))
    args = ["--dataset", "kadid10k", "--root", str(tmp_path / "kadid"), "--train", str(tmp_path / "train_kadid.json"),
            "--test", str(tmp_path / "test_kadid.json"), "--out", str(tmp_path / "qalign.csv")]
    assert qalign(args) == 0
    assert capsys.readouterr().out == f"qalign: {tmp_path / 'qalign.csv'}: train 3, test 2\n"
    assert main(["--dataset", "kadid10k", "--root", str(tmp_path / "kadid"), "--out", str(tmp_path / "out"),
                 "--split", "file", "--split-file", str(tmp_path / "qalign.csv")]) == 0
    assert {n: s["split"] for n, s in _samples(tmp_path / "out").items()} == \
        {**{n: "train" for n in names[:3]}, **{n: "test" for n in names[3:5]}}
    # The image it leaves out is counted, in the manifest and in the summary line.
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["unlisted"] == 1
    assert capsys.readouterr().out == f"pack: {tmp_path / 'out'}: train 3, test 2; skipped 0; not in the split file 1\n"
    # An image the release does not have, or one in two splits, is named; the CSV stays as it was.
    for split, image, message in (("test", "kadid10k/I09_01_01.png", "kadid10k/I09_01_01.png is not among"),
                                  ("test", f"kadid10k/{Path(names[0]).name}", "is in the train split too")):
        (tmp_path / f"{split}_kadid.json").write_text(json.dumps([{"image": image}]))
        before = (tmp_path / "qalign.csv").read_text()
        assert qalign(args) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1
        assert (tmp_path / "qalign.csv").read_text() == before


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_greys_are_scaled_not_clipped_when_re_encoded(tmp_path, fmt):
    import numpy as np

    from temu_dist.pack import _encode

    wide = np.linspace(0, 65535, 96 * 128).reshape(96, 128).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / f"grey16.{fmt}")
    Image.fromarray((wide >> 8).astype(np.uint8)).save(tmp_path / f"grey8.{fmt}")
    # Resized (--resize-shorter), or re-encoded as PNG (TIFF is not a kept format): the same pixels either way.
    resize = 48 if fmt == "png" else None
    decoded = [np.asarray(Image.open(io.BytesIO(_encode(tmp_path / f"grey{bits}.{fmt}", resize)[0])).convert("RGB"))
               for bits in (16, 8)]
    assert np.array_equal(decoded[0], decoded[1])


def test_a_pack_goes_into_a_folder_of_its_own(tmp_path):
    write_kadid(tmp_path / "kadid", refs=2, per_ref=2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "draft.tmp").write_text("precious")  # a rerun clears a pack's own unfinished files only
    with pytest.raises(DataError, match=rf"^--out {tmp_path / 'mine'} holds files that are no pack's \(draft.tmp\): "
                                        r"pack into a new or an empty folder$"):
        pack(_opts(tmp_path / "kadid", tmp_path / "mine"))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["draft.tmp"]
    with pytest.raises(DataError, match=r"holds files that are no pack's \(dmos.csv, images/\)"):
        pack(_opts(tmp_path / "kadid", tmp_path / "kadid"))  # shards among the dataset's own files
    # A pack's unfinished files and the system's dot files are no obstacle.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".nfs0001").write_text("")
    (tmp_path / "out" / ".notes.tmp").write_text("mine")
    (tmp_path / "out" / "train-000000.tar.tmp").write_text("cut short")
    pack(_opts(tmp_path / "kadid", tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tmp")) == [".notes.tmp"]  # the packer's own went
    assert not verify(tmp_path / "out")
    # An unfinished pack whose pack.json a power cut emptied is taken for another pack's, not a crash.
    (tmp_path / "out" / MANIFEST).unlink()
    (tmp_path / "out" / "pack.json").write_text("")
    with pytest.raises(DataError, match=r"holds an unfinished pack whose pack.json is unreadable \(a power cut\?\)"):
        pack(_opts(tmp_path / "kadid", tmp_path / "out"))


def test_ratios_that_leave_a_split_empty_are_warned_of(tmp_path, capsys):
    write_kadid(tmp_path / "kadid", refs=2, per_ref=2)
    manifest = pack(_opts(tmp_path / "kadid", tmp_path / "out", split=SplitSpec("ratio", (0.8, 0.0, 0.2))))
    assert list(manifest["splits"]) == ["train"]  # 2 references: 80% is both
    assert f"pack: warning: {tmp_path / 'out'}: the ratios [0.8, 0.0, 0.2] of its reference images leave no images " \
        "in its test split: pack a larger set, or other --ratios" in capsys.readouterr().err


def test_a_rerun_reuses_finished_shards_whose_images_are_gone(tmp_path):
    write_kadid(tmp_path / "kadid", refs=3, per_ref=3)
    first = pack(_opts(tmp_path / "kadid", tmp_path / "out"))
    (tmp_path / "kadid" / "images" / "I01_01_01.png").unlink()  # packed already: the pack need not read it again
    assert pack(_opts(tmp_path / "kadid", tmp_path / "out"))["splits"] == first["splits"]


def _own_csv(root: Path, header: str, rows: list[str]) -> Path:
    path = root / "scores.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_a_dataset_of_ones_own_packs_from_a_csv_as_iqa_pytorch_reads_one(tmp_path, capsys):
    labels = write_kadid(tmp_path / "mine", refs=4, per_ref=3)
    # IQA-PyTorch's general NR meta CSV: image, then score, by position; other columns are left alone.
    _own_csv(tmp_path / "mine", "img_name,mos,std", [f"{n},{m},0.1" for n, (_, m) in labels.items()])
    out = tmp_path / "shards" / "mine"
    assert main(["--dataset", "mine", "--root", str(tmp_path / "mine"), "--out", str(out), "--label-file",
                 "scores.csv", "--mos-range", "1", "5", "--workers", "1"]) == 0
    assert f"pack: {out}: train 10, test 2" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["dataset"] == "mine" and manifest["source"]["kind"] == "csv"
    assert manifest["labels"] == {"columns": [], "mos_range": [1.0, 5.0], "higher_better": True}
    assert manifest["scale"] == {"raw_range": [1.0, 5.0], "higher_better": True}
    samples = _samples(out)
    assert {n: (s["mos_raw"], s["mos"], s["dataset"], s["ref"]) for n, s in samples.items()} == \
        {f"{n}": (pytest.approx(m), pytest.approx((m - 1) / 4), "mine", None) for n, (_, m) in labels.items()}

    # Named columns, with references (split by reference unless told) and DMOS, lower better.
    _own_csv(tmp_path / "mine", "ref,dmos,image", [f"{r},{m},{n}" for n, (r, m) in labels.items()])
    assert main(["--dataset", "mine", "--root", str(tmp_path / "mine"), "--out", str(tmp_path / "by-ref"),
                 "--label-file", "scores.csv", "--mos-range", "1", "5", "--lower-better", "--columns", "image", "dmos",
                 "ref", "--ratios", "0.5", "0", "0.5", "--workers", "1"]) == 0
    samples = _samples(tmp_path / "by-ref")
    by_ref: dict[str, set] = {}
    for label in samples.values():
        by_ref.setdefault(label["ref"], set()).add(label["split"])
    assert len(by_ref) == 4 and all(len(s) == 1 for s in by_ref.values())
    assert all(s["mos"] == pytest.approx(1 - (s["mos_raw"] - 1) / 4) for s in samples.values())
    # Another scale for the same folder is another pack.
    assert main(["--dataset", "mine", "--root", str(tmp_path / "mine"), "--out", str(tmp_path / "by-ref"),
                 "--label-file", "scores.csv", "--mos-range", "0", "5", "--lower-better", "--columns", "image", "dmos",
                 "ref", "--ratios", "0.5", "0", "0.5", "--workers", "1"]) == 1
    assert "already holds a finished pack made with another --columns, --mos-range or --lower-better" in \
        capsys.readouterr().err


def test_a_csv_of_ones_own_with_a_split_column_gives_the_official_split(tmp_path):
    labels = write_kadid(tmp_path / "mine", refs=3, per_ref=2)
    splits = ["train", "0", "test", "2", "val", "1"]
    _own_csv(tmp_path / "mine", "img_name,mos,split",
             [f"{n},{m},{splits[i]}" for i, (n, (_, m)) in enumerate(labels.items())])
    manifest = pack(PackOptions("mine", str(tmp_path / "mine"), str(tmp_path / "out"), "scores.csv",
                                split=SplitSpec("official"), workers=1, csv=CsvLabels("mine", (1.0, 5.0))))
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 2, "val": 2, "test": 2}
    assert manifest["split"] == {"protocol": "official"}  # no ratios or seed, which it does not read
    # A pack written when manifests recorded every option is the same pack: a rerun finishes it, its split kept as
    # recorded, so that the runs trained on it, which know it by a digest of its manifest, still resume.
    from temu_dist.data.manifest import pack_digest

    path = tmp_path / "out" / "manifest.json"
    old = {"protocol": "official", "ratios": [0.8, 0.0, 0.2], "seed": 0, "index": 0, "file": None, "by_reference": True}
    path.write_text(json.dumps({**manifest, "split": old}))
    digest = pack_digest(tmp_path / "out")
    assert pack(PackOptions("mine", str(tmp_path / "mine"), str(tmp_path / "out"), "scores.csv",
                            split=SplitSpec("official"), workers=1, csv=CsvLabels("mine", (1.0, 5.0)))) \
        == {**manifest, "split": old, "created": json.loads(path.read_text())["created"]}
    assert pack_digest(tmp_path / "out") == digest
    # An IQA-PyTorch split pickle numbers the CSV's rows, as for its general datasets.
    with open(tmp_path / "split.pkl", "wb") as fh:
        pickle.dump({1: {"train": [0, 1, 2], "val": [], "test": [5]}}, fh)
    manifest = pack(PackOptions("mine", str(tmp_path / "mine"), str(tmp_path / "pkl"), "scores.csv",
                                split=SplitSpec("file", file=str(tmp_path / "split.pkl")), workers=1,
                                csv=CsvLabels("mine", (1.0, 5.0))))
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 3, "test": 1}
    assert manifest["split"] == {"protocol": "file", "file": str(tmp_path / "split.pkl"), "index": 0,
                                 "file_sha256": hashlib.sha256((tmp_path / "split.pkl").read_bytes()).hexdigest()}
    assert {x["name"] for x in _samples(tmp_path / "pkl").values() if x["split"] == "test"} == {list(labels)[5]}


def test_what_a_csv_of_ones_own_cannot_be_read_with_is_one_line_naming_it(tmp_path, capsys):
    labels = write_kadid(tmp_path / "mine", refs=2, per_ref=2)
    rows = [f"{n},{m}" for n, (_, m) in labels.items()]
    base = ["--root", str(tmp_path / "mine"), "--out", str(tmp_path / "o")]
    mine = ["--dataset", "mine", *base, "--label-file", "scores.csv"]
    for header, body, args, message in [
        ("img_name,mos", rows, ["--dataset", "koniq", *base],
         "unknown dataset 'koniq'; one of koniq10k, spaq, livec, flive, ava, kadid10k, csiq, live, agiqa3k, or a "
         "dataset of your own read from a CSV: add --label-file and --mos-range"),
        ("img_name,mos", rows, mine, "unknown dataset 'mine'; one of koniq10k, spaq, livec, flive, ava, kadid10k, "
         "csiq, live, agiqa3k, or a dataset of your own read from a CSV: add its scale with --mos-range"),
        ("img_name,mos", rows, ["--dataset", "kadid10k", *base, "--mos-range", "1", "5"],
         "--dataset kadid10k is one of the nine releases, read from its own label files, not with --mos-range"),
        ("img_name,mos", rows, [*mine, "--lower-better"],
         "--lower-better describes a dataset of your own: give its --mos-range too"),
        ("img_name,mos", rows, [*mine, "--mos-range", "5", "1"],
         "--mos-range 5 1: the lowest score first, then the highest, both finite"),
        ("img_name,mos", rows, [*mine, "--mos-range", "0", "inf"],
         "--mos-range 0 inf: the lowest score first, then the highest, both finite"),
        ("img_name,mos", rows, [*mine, "--mos-range", "1", "5", "--by-reference", "yes"],
         "--by-reference yes: mine has no reference images: name its reference column with --columns IMAGE SCORE REF"),
        ("img_name,mos", rows, ["--dataset", "koniq10k", *base, "--by-reference", "yes"],
         "--by-reference yes: koniq10k has no reference images"),
        (rows[0], rows[1:], [*mine, "--mos-range", "1", "5"],
         f"scores.csv row 1 is data ('{rows[0].split(',')[1]}' where the score column's name belongs): the first line "
         "must be a header naming the columns"),
        ("img_name,mos,mos", [r + ",9" for r in rows], [*mine, "--mos-range", "1", "5"],
         "scores.csv: the header names column 'mos' 2 times; rename all but one"),
        ("ref_name,dist_name,mos", [f"I01.png,{r}" for r in rows], [*mine, "--mos-range", "1", "5"],
         f"scores.csv row 2: score '{rows[0].split(',')[0]}' of the second column, 'dist_name', is not a number: name "
         "the image and score columns with --columns (columns: ref_name, dist_name, mos)"),
        ("img_name,mos", rows[:1] + [rows[1].split(",")[0] + ",NA"], [*mine, "--mos-range", "1", "5"],
         "scores.csv row 3: MOS 'NA' is not a number"),
        ("img_name,mos", [f"{tmp_path}/mine/{rows[0]}"], [*mine, "--mos-range", "1", "5"],
         f"scores.csv row 2: image '{tmp_path}/mine/{rows[0].split(',')[0]}' is not under --root: name images by their "
         "path relative to it"),
        ("img_name,mos", [f"../mine/{rows[0]}"], [*mine, "--mos-range", "1", "5"],
         f"scores.csv row 2: image '../mine/{rows[0].split(',')[0]}' is not under --root: name images by their path "
         "relative to it"),
        ("img_name,mos", rows, [*mine, "--mos-range", "1", "5", "--split", "official"],
         f"scores.csv row 2 ({rows[0].split(',')[0]}) has no official split: it is read from scores.csv's split column "
         "(official_split, official split, split): add that, or use the ratio protocol"),
        ("img_name,mos", rows, ["--dataset", "mine", *base, "--mos-range", "1", "5"],
         "--dataset mine, a dataset of your own, is read from its CSV: give it with --label-file (not --meta-csv)"),
        ("img_name,mos", rows, [*mine, "--mos-range", "1", "5", "--columns", "img_name"],
         "--columns takes the image and score columns and optionally the reference's, not 1"),
        ("img_name,mos", rows, [*mine, "--mos-range", "1", "5", "--columns", "image", "mos"],
         "scores.csv: no column 'image' (columns: img_name, mos)"),
        ("img_name;mos", [r.replace(",", ";") for r in rows], [*mine, "--mos-range", "1", "5"],
         "scores.csv: a header with the image and score columns is needed (columns: img_name;mos; its fields are "
         "separated by ';': save it comma-separated)"),
        ("img_name,mos", rows[:1] + ["images/x.png,7.5"], [*mine, "--mos-range", "1", "5"],
         "scores.csv row 3: MOS 7.5 is outside 1..5 for mine"),
        ("img_name,mos,split", [r + ",later" for r in rows], [*mine, "--mos-range", "1", "5"],
         "scores.csv row 2: split 'later' is not 0/1/2 or train/val/test"),
        ("img_name,mos", rows + [rows[0]], [*mine, "--mos-range", "1", "5"],
         f"scores.csv row 6: image '{rows[0].split(',')[0]}' already listed at row 2"),
    ]:
        _own_csv(tmp_path / "mine", header, body)
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err == f"pack: {message}\n"
    assert not (tmp_path / "o").exists()


def test_shards_are_random_draws_from_their_split_whatever_the_label_order_and_window(tmp_path, monkeypatch):
    # KADID-10k's label file runs reference by reference: shards in its order would give a reader, and each batch, a
    # few references. Dealt at random, a shard of 5 from the 16 training references' 80 images spans several, and
    # a pack held to a window of 2 shards a label pass writes the same shards.
    write_kadid(tmp_path / "kadid", refs=20, per_ref=5, size=(8, 8))
    split = SplitSpec("ratio", (0.8, 0.0, 0.2), seed=0, by_reference=True)
    whole = pack(_opts(tmp_path / "kadid", tmp_path / "a", split=split, shard_size=5))
    assert whole["order"] == "shuffled"
    samples = _samples(tmp_path / "a")
    train = [s for s in samples.values() if s["split"] == "train"]
    refs_by_shard = {}
    for s in train:
        refs_by_shard.setdefault(s["shard"], set()).add(s["ref"])
    assert len(refs_by_shard) == 16 and min(len(r) for r in refs_by_shard.values()) >= 3
    import temu_dist.pack as pack_mod

    monkeypatch.setattr(pack_mod, "WINDOW", 10)
    windowed = pack(_opts(tmp_path / "kadid", tmp_path / "b", split=split, shard_size=5))
    assert windowed["splits"] == whole["splits"]


def test_a_pack_in_its_label_files_order_is_not_reused(tmp_path):
    write_kadid(tmp_path / "kadid", refs=5, per_ref=2, size=(8, 8))
    pack(_opts(tmp_path / "kadid", tmp_path / "out"))
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    del manifest["order"]
    (tmp_path / "out" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"out holds a pack an earlier temu-dist wrote in its label file's order.*"
                                        r"delete it and pack again"):
        pack(_opts(tmp_path / "kadid", tmp_path / "out"))
    # One it left unfinished: said so, not as a pack of other options.
    (tmp_path / "out" / MANIFEST).unlink()
    started = json.loads((tmp_path / "out" / "pack.json").read_text())
    del started["order"]
    (tmp_path / "out" / "pack.json").write_text(json.dumps(started))
    with pytest.raises(DataError, match=r"out holds an unfinished pack an earlier temu-dist began in its label file's "
                                        r"order: delete it and pack again"):
        pack(_opts(tmp_path / "kadid", tmp_path / "out"))


def test_iqa_pytorchs_livec_meta_and_random_split_pack_its_held_out_val_as_test(tmp_path):
    """As a user with IQA-PyTorch's meta_info_LIVEChallengeDataset.csv and livechallenge_seed123.pkl packs them."""
    images = tmp_path / "LIVEC" / "Images"  # the release's folder; IQA-PyTorch's CSV names the images without it
    images.mkdir(parents=True)
    names = [f"t{i}.bmp" for i in range(1, 8)] + [f"{i}.bmp" for i in range(100, 105)]
    for i, name in enumerate(names):
        Image.new("RGB", (16, 12), (i * 20, 0, 0)).save(images / name)
    meta = tmp_path / "meta_info_LIVEChallengeDataset.csv"
    meta.write_text("img_name,mos,std\n" + "".join(f"{n},{50 + i},10\n" for i, n in enumerate(names)))
    # Rows counted after the 7 training images, as IQA-PyTorch's LIVEChallengeDataset drops them.
    pkl = tmp_path / "livechallenge_seed123.pkl"
    pkl.write_bytes(pickle.dumps({1: {"train": [0, 2, 4], "val": [1, 3]}, 2: {"train": [1, 2, 3], "val": [0, 4]}}))
    opts = dict(meta_csv=str(meta), split=SplitSpec("file", file=str(pkl), index=1), workers=1)
    with pytest.raises(DataError, match=r"not under .*LIVEC, e.g. 100.bmp \(row 9\).*--skip-bad \(an IQA-PyTorch "
                                        r"meta CSV names them as its downloads lay them out; for the release's own "
                                        r"layout, name their folder with --image-dir or pack the release's label file "
                                        rf"without --meta-csv\); 100.bmp is under {images}: give that as --root$"):
        pack(PackOptions("livec", str(tmp_path / "LIVEC"), str(tmp_path / "no"), **opts))
    manifest = pack(PackOptions("livec", str(images), str(tmp_path / "out"), **opts))
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 3, "test": 2}
    # Or the folder named under the release's root, as IQA-PyTorch's configs name it (dataroot_target LIVEC/Images).
    within = pack(PackOptions("livec", str(tmp_path / "LIVEC"), str(tmp_path / "within"), image_dir="Images", **opts))
    assert within["image_dir"] == "Images" and within["splits"]["test"]["count"] == 2
    held_out = {x["name"] for x in _samples(tmp_path / "out").values() if x["split"] == "test"}
    assert held_out == {"100.bmp", "104.bmp"}


def test_a_split_column_of_iqa_pytorchs_meta_csv_picks_one_of_its_random_splits(tmp_path, capsys):
    """IQA-PyTorch's meta CSVs hold its ten random splits as columns (ratio802_seed123_split_01, ...); an 80/20 one
    holds rows out in val alone, which pack as test, as its split pickles do."""
    images = tmp_path / "SPAQ" / "TestImage"
    images.mkdir(parents=True)
    names = [f"{i:05d}.jpg" for i in range(1, 6)]
    for i, name in enumerate(names):
        Image.new("RGB", (16, 12), (i * 40, 0, 0)).save(images / name)
    first, second = ["train", "val", "train", "val", "train"], ["val", "train", "train", "train", "test"]
    meta = tmp_path / "meta_info_SPAQDataset.csv"
    meta.write_text("Image name,MOS,ratio802_seed123_split_01,other_split\n" +
                    "".join(f"{n},{40 + i},{a},{b}\n" for i, (n, a, b) in enumerate(zip(names, first, second))))
    base = ["--dataset", "spaq", "--root", str(tmp_path / "SPAQ"), "--meta-csv", str(meta), "--workers", "1",
            "--split", "column"]
    assert main([*base, "--out", str(tmp_path / "one"), "--split-column", "ratio802_seed123_split_01"]) == 0
    assert "train 3, test 2" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["split"] == {"protocol": "column", "column": "ratio802_seed123_split_01"}
    labels = []
    for shard in (tmp_path / "one").glob("*.tar"):
        with tarfile.open(shard) as tar:
            labels += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    assert {x["name"] for x in labels if x["split"] == "test"} == {"TestImage/00002.jpg", "TestImage/00004.jpg"}
    # A column with a test split of its own keeps its val.
    assert main([*base, "--out", str(tmp_path / "two"), "--split-column", "other_split"]) == 0
    capsys.readouterr()
    counts = json.loads((tmp_path / "two" / "manifest.json").read_text())["splits"]
    assert {s: v["count"] for s, v in counts.items()} == {"train": 3, "val": 1, "test": 1}
    assert main([*base, "--out", str(tmp_path / "three"), "--split-column", "ratio802_seed123_split_02"]) == 1
    assert capsys.readouterr().err == "pack: meta_info_SPAQDataset.csv: no split column 'ratio802_seed123_split_02' " \
                                      "(columns: Image name, MOS, ratio802_seed123_split_01, other_split)\n"
    assert not (tmp_path / "three").exists()
