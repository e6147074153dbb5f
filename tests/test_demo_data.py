import csv

from PIL import Image

from temu_dist.demo_data import DISTORTIONS, PHOTOS, write_demo_data


def test_demo_data_is_kadid_layout_with_a_mos_that_falls_with_the_level(tmp_path):
    out = write_demo_data(tmp_path / "demo")
    with open(out / "dmos.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["dist_img", "ref_img", "dmos", "var"]
    assert len(rows) == len(PHOTOS) * len(DISTORTIONS) * 5
    for row in rows:
        assert Image.open(out / "images" / row["dist_img"]).size == (512, 384)
        assert (out / "images" / row["ref_img"]).exists()
        assert 1.0 <= float(row["dmos"]) <= 5.0
    by_series = {}
    for row in rows:
        ref, kind, level = row["dist_img"][:-4].split("_")
        by_series.setdefault((ref, kind), []).append((int(level), float(row["dmos"])))
    for (ref, kind), series in by_series.items():
        mos = [m for _, m in sorted(series)]
        assert mos[0] > mos[-1], f"{ref} type {kind}: level 5 is not worse than level 1"
    assert not list(out.glob("*.tmp"))


def test_an_out_path_that_is_a_file_is_one_line_naming_it(tmp_path, monkeypatch):
    import pytest

    from temu_dist.demo_data import main

    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    monkeypatch.setattr("sys.argv", ["demo_data", "--out", str(taken)])
    with pytest.raises(SystemExit, match=f"demo_data: cannot write {taken}/images: "):
        main()
