import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from temu_dist.data.sources import DataError
from temu_dist.data.splits import SplitSpec
from temu_dist.pack import MANIFEST, PackOptions, main, pack, verify
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
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["splits"] == manifest["splits"]
    assert verify(tmp_path / "out") == []


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
    with pytest.raises(DataError, match=r"I03_02_01.png \(label row \d+\): cannot read image"):
        pack(_opts(tmp_path / "kadid", tmp_path / "out", shard_size=2))
    out = tmp_path / "out"
    assert not (out / MANIFEST).exists()
    assert not list(out.glob("*.tmp"))
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert finished, "no shard finished before the failure"
    # A killed run can leave a temporary file behind; it must not count.
    (out / "train-000099.tar.tmp").write_bytes(b"half a shard")
    # Resuming with other options would mix shards of two packs.
    with pytest.raises(DataError, match="unfinished pack made with other options"):
        pack(_opts(tmp_path / "kadid", out, shard_size=2, resize_shorter=16))
    victim.write_bytes(good_bytes)
    resumed = pack(_opts(tmp_path / "kadid", out, shard_size=2))
    assert resumed["splits"] == clean["splits"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in finished} == finished
    assert not list(out.glob("*.tmp"))
    assert verify(out) == []


def test_skip_bad_reports_every_skipped_image(tmp_path):
    labels = write_kadid(tmp_path / "kadid", refs=3, per_ref=3)
    (tmp_path / "kadid" / "images" / "I02_01_01.png").write_bytes(b"not an image")
    (tmp_path / "kadid" / "images" / "I03_03_01.png").unlink()
    with pytest.raises(DataError, match=r"I02_01_01.png .*not an image|I03_03_01.png .*file not found"):
        pack(_opts(tmp_path / "kadid", tmp_path / "strict"))
    manifest = pack(_opts(tmp_path / "kadid", tmp_path / "out", skip_bad=True))
    assert sorted(s["name"] for s in manifest["skipped"]) == ["images/I02_01_01.png", "images/I03_03_01.png"]
    assert all(s["row"] >= 2 and s["reason"] for s in manifest["skipped"])
    assert sum(info["count"] for info in manifest["splits"].values()) == len(labels) - 2
    assert set(_samples(tmp_path / "out")) == set(labels) - {"images/I02_01_01.png", "images/I03_03_01.png"}


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
    assert shards[1].name in capsys.readouterr().err
    assert "never finished" in verify(tmp_path / "nothing")[0]


def test_a_finished_pack_with_other_options_is_left_alone(tmp_path):
    write_kadid(tmp_path / "kadid", refs=3, per_ref=3)
    first = pack(_opts(tmp_path / "kadid", tmp_path / "out"))
    with pytest.raises(DataError, match="other split"):
        pack(_opts(tmp_path / "kadid", tmp_path / "out", split=SplitSpec("ratio", (0.5, 0.0, 0.5), seed=9)))
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
    assert main(["--dataset", "kadid10k", "--root", str(tmp_path / "kadid"), "--out", str(tmp_path / "out"),
                 "--workers", "1", "--ratios", "0.5", "0", "0.5"]) == 0
    assert "pack:" in capsys.readouterr().out
    assert main(["--dataset", "kadid10k", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "o2")]) == 1
    assert "dmos.csv" in capsys.readouterr().err
