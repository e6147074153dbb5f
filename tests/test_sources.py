"""Dataset readers against tiny fixtures written here in each release's own format (csv, xlsx, .mat, AVA.txt)."""
from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import openpyxl
import pytest
import scipy.io as sio
from PIL import Image

from temu_dist.config import ConfigError
from temu_dist.data.sources import (DATASETS, DataError, _scale, label_scale, read_pyiqa_meta, read_pyiqa_split,
                                    read_records)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_xlsx(path: Path, header: list[str], rows: list[list[object]], sheet: str = "Sheet1",
               top: int = 1, left: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = sheet
    wb.create_sheet("notes")  # the wanted sheet must be found by name (CSIQ) or be the first (SPAQ)
    for r, values in enumerate([header, *rows]):
        for c, value in enumerate(values):
            ws.cell(row=top + r, column=left + c, value=value)
    wb.save(path)
    return path


def cell_array(names: list[str], shape: tuple[int, int]) -> np.ndarray:
    """A MATLAB cell array of strings, as savemat writes it and the releases ship it."""
    arr = np.empty(len(names), dtype=object)
    arr[:] = names
    return arr.reshape(shape)


def tiny_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (128, 64, 32)).save(path)


def by_name(records) -> dict:
    return {r.name: r for r in records}


# --- the nine releases ---------------------------------------------------------------------------------------------

KONIQ_HEADER = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]


def koniq(root: Path, zscore: tuple[object, ...] = (77.38, 78.63, 0.0), sets: bool = True) -> Path:
    # The MOS column, the ratings' plain mean, ranks the first two otherwise, as the release's first images do
    # (10004473376.jpg: MOS 3.83, MOS_zscore 77.38; 10007903636.jpg: 3.78, 78.63); the sets file's MOS is MOS_zscore.
    rows = [[f"{i}.jpg", 1, 2, 3, 4, 5, 15, (3.83, 3.78)[i] if i < 2 else 1.0, 0.5, z] for i, z in enumerate(zscore)]
    write_csv(root / "koniq10k_scores_and_distributions.csv", KONIQ_HEADER, rows)
    if sets:
        write_csv(root / "koniq10k_distributions_sets.csv",
                  ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "set"],
                  [[f"{i}.jpg", 1, 2, 3, 4, 5, 15, z, 0.5, ("training", "validation", "test")[i % 3]]
                   for i, z in enumerate(zscore)])
    return root


def test_koniq10k_mos_and_official_split(tmp_path):
    recs = list(read_records("koniq10k", koniq(tmp_path)))
    assert [r.name for r in recs] == ["1024x768/0.jpg", "1024x768/1.jpg", "1024x768/2.jpg"]
    assert recs[0].path == tmp_path.absolute() / "1024x768" / "0.jpg" and recs[0].path.is_absolute()
    # MOS_zscore, on 0-100, as IQA-PyTorch and the papers read KonIQ-10k; not the MOS column.
    assert [(r.mos_raw, r.mos) for r in recs] == [(77.38, pytest.approx(0.7738)), (78.63, pytest.approx(0.7863)),
                                                  (0.0, 0.0)]
    assert [r.split for r in recs] == ["train", "val", "test"]
    assert [r.row for r in recs] == [2, 3, 4] and {r.ref for r in recs} == {None}


def test_koniq10k_without_its_sets_file_has_no_split(tmp_path):
    assert {r.split for r in read_records("koniq10k", koniq(tmp_path, sets=False))} == {None}


def test_a_short_row_is_named_not_a_crash(tmp_path):
    koniq(tmp_path)
    with (tmp_path / "koniq10k_distributions_sets.csv").open("a") as fh:
        fh.write("3.jpg\n")
    with pytest.raises(DataError, match=r"^koniq10k_distributions_sets.csv row 5: 1 fields, the header has 10$"):
        list(read_records("koniq10k", tmp_path))
    koniq(tmp_path / "b")
    with (tmp_path / "b" / "koniq10k_scores_and_distributions.csv").open("a") as fh:
        fh.write("4.jpg,1,2,3\n")  # cut short before its MOS
    with pytest.raises(DataError, match=r"^koniq10k_scores_and_distributions.csv row \d+: 4 fields, the header has "):
        list(read_records("koniq10k", tmp_path / "b"))
    # One longer than its header: a comma in an unquoted name shifts its MOS into another column; it was read.
    koniq(tmp_path / "c")
    with (tmp_path / "c" / "koniq10k_scores_and_distributions.csv").open("a") as fh:
        fh.write("4,5.jpg,1,2,3,4,5,15,60.0,0.5,3.1,9\n")
    with pytest.raises(DataError, match=r"^koniq10k_scores_and_distributions.csv row \d+: 12 fields, the header has "
                                        r"\d+ \(a comma in an unquoted name\?\)$"):
        list(read_records("koniq10k", tmp_path / "c"))
    # Empty fields past the header's, as a spreadsheet's export leaves them, are read as before.
    koniq(tmp_path / "e", sets=False)
    with (tmp_path / "e" / "koniq10k_scores_and_distributions.csv").open("a") as fh:
        fh.write("5.jpg,1,2,3,4,5,15,3.0,0.5,3.1,,\n")
    assert len(list(read_records("koniq10k", tmp_path / "e"))) == 4
    # An empty name is said as such, not as the split file's missing row.
    koniq(tmp_path / "d")
    with (tmp_path / "d" / "koniq10k_scores_and_distributions.csv").open("a") as fh:
        fh.write(",1,2,3,4,5,15,3.0,0.5,3.1\n")
    with pytest.raises(DataError, match=r"^koniq10k_scores_and_distributions.csv row \d+: empty image name$"):
        list(read_records("koniq10k", tmp_path / "d"))


def test_koniq10k_image_missing_from_sets_file(tmp_path):
    koniq(tmp_path)
    write_csv(tmp_path / "koniq10k_distributions_sets.csv", ["image_name", "set"], [["0.jpg", "training"]])
    with pytest.raises(DataError, match=r"koniq10k_distributions_sets.csv: no row for '1.jpg'"):
        list(read_records("koniq10k", tmp_path))


def test_koniq10k_image_in_two_sets_is_named(tmp_path):
    koniq(tmp_path)
    with (tmp_path / "koniq10k_distributions_sets.csv").open("a") as fh:
        fh.write("0.jpg,1,2,3,4,5,15,60.0,0.5,test\n")  # listed as training at row 2
    with pytest.raises(DataError, match=r"^koniq10k_distributions_sets.csv row 5: image '0.jpg' already listed at "
                                        r"row 2$"):
        list(read_records("koniq10k", tmp_path))


def test_spaq_first_sheet_of_the_xlsx(tmp_path):
    write_xlsx(tmp_path / "Annotations" / "MOS and Image attribute scores.xlsx",
               ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"],
               [["00001.jpg", 25, 1, 2, 3, 4, 5], ["00002.jpg", 80.5, 1, 2, 3, 4, 5]])
    recs = list(read_records("spaq", tmp_path))
    assert [(r.name, r.mos_raw, r.mos, r.split, r.row) for r in recs] == [
        ("TestImage/00001.jpg", 25.0, 0.25, None, 2), ("TestImage/00002.jpg", 80.5, 0.805, None, 3)]


def test_livec_skips_the_seven_training_images(tmp_path):
    names = [f"t{i}.bmp" for i in range(1, 8)] + ["10.bmp", "100.bmp"]
    (tmp_path / "Data").mkdir()
    sio.savemat(tmp_path / "Data" / "AllImages_release.mat", {"AllImages_release": cell_array(names, (9, 1))})
    sio.savemat(tmp_path / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([[50.0] * 7 + [20.0, 75.0]])})
    recs = list(read_records("livec", tmp_path))
    assert [(r.name, r.mos_raw, r.mos, r.row) for r in recs] == [("Images/10.bmp", 20.0, 0.2, 8),
                                                                ("Images/100.bmp", 75.0, 0.75, 9)]


def test_livec_needs_its_image_list(tmp_path):
    (tmp_path / "Data").mkdir()
    sio.savemat(tmp_path / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([[50.0]])})
    with pytest.raises(DataError, match=r"AllImages_release.mat not found"):
        list(read_records("livec", tmp_path))


def flive(root: Path, splits: bool = True) -> Path:
    names = ["voc_emotic_ava/AVA__1.jpg", "blur_dataset/motion0001.jpg", "EE371R/a.jpg"]
    write_csv(root / "labels_image.csv", ["name", "mos", "zscores"], [[n, 60 + i, 0.1] for i, n in enumerate(names)])
    if splits:
        write_csv(root / "labels640.csv", ["name_image", "mos_image"], [[names[2], 62]])
        write_csv(root / "labels=640_padded.csv", ["name_image", "mos_image", "is_valid"],
                  [[names[0], 60, "False"], [names[1], 61, "True"]])
    return root


def test_flive_official_split_from_paq2piq_lists(tmp_path):
    recs = by_name(read_records("flive", flive(tmp_path)))
    assert {n: r.split for n, r in recs.items()} == {"voc_emotic_ava/AVA__1.jpg": "train",
                                                     "blur_dataset/motion0001.jpg": "val", "EE371R/a.jpg": "test"}
    assert recs["EE371R/a.jpg"].mos == pytest.approx(0.62) and recs["EE371R/a.jpg"].path.parent.name == "EE371R"


def test_flive_without_split_lists(tmp_path):
    assert {r.split for r in read_records("flive", flive(tmp_path, splits=False))} == {None}


def ava_line(index: int, image_id: str, votes: list[int]) -> str:
    return " ".join(map(str, [index, image_id, *votes, 0, 15, 1396])) + "\n"


def test_ava_mean_vote_and_official_test_list(tmp_path):
    (tmp_path / "AVA.txt").write_text(ava_line(1, "953619", [0, 0, 0, 0, 10, 0, 0, 0, 0, 0])
                                      + ava_line(2, "953958", [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]))
    (tmp_path / "aesthetics_image_lists").mkdir()
    (tmp_path / "aesthetics_image_lists" / "generic_test.jpgl").write_text("953958\n")
    recs = list(read_records("ava", tmp_path))
    assert [(r.name, r.mos_raw, r.split, r.row) for r in recs] == [("images/953619.jpg", 5.0, "train", 1),
                                                                  ("images/953958.jpg", 5.5, "test", 2)]
    assert recs[1].mos == pytest.approx(0.5)
    # Saved by an editor that writes a byte-order mark: its first id is still a test image.
    for name in ("aesthetics_image_lists/generic_test.jpgl", "AVA.txt"):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + (tmp_path / name).read_bytes())
    assert [r.split for r in read_records("ava", tmp_path)] == ["train", "test"]


def test_ava_streams_line_by_line(tmp_path):
    (tmp_path / "AVA.txt").write_text(ava_line(1, "1", [1] * 10) + "2 2 x\n")
    recs = read_records("ava", tmp_path)
    first = next(recs)  # the broken second line is not read yet
    assert first.name == "images/1.jpg" and first.split is None
    with pytest.raises(DataError, match=r"AVA.txt row 2: 3 fields"):
        next(recs)


def test_ava_line_without_votes(tmp_path):
    (tmp_path / "AVA.txt").write_text(ava_line(1, "1", [0] * 10))
    with pytest.raises(DataError, match=r"AVA.txt row 1: no votes"):
        list(read_records("ava", tmp_path))


def test_kadid10k_reference_ids(tmp_path):
    write_csv(tmp_path / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"],
              [["I01_01_01.png", "I01.png", 4.57, 0.29], ["I02_05_05.png", "I02.png", 1.0, 0.1]])
    recs = list(read_records("kadid10k", tmp_path))
    assert [(r.name, r.ref, r.mos_raw) for r in recs] == [("images/I01_01_01.png", "I01.png", 4.57),
                                                         ("images/I02_05_05.png", "I02.png", 1.0)]
    assert recs[0].mos == pytest.approx(0.8925) and recs[1].mos == 0.0


def test_csiq_release_file_names_and_flipped_dmos(tmp_path):
    # The release's sheet does not start at A1; image ids such as 1600 are numbers in it.
    write_xlsx(tmp_path / "csiq.DMOS.xlsx", ["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"],
               [[1600, 1, "noise", 1, 0.02, 0.062], ["boston", 3, "jpeg 2000", 5, 0.05, 0.75],
                [1600, 2, "jpeg", 2, 0.03, 0.25], [1600, 5, "blur", 3, 0.03, 0.5],
                ["aerial_city", 6, "contrast", 4, 0.1, 1.0], ["child_swimming", 4, "fnoise", 1, 0.1, 0.0]],
               sheet="all_by_image", top=3, left=2)
    expected = ["dst_imgs/awgn/1600.AWGN.1.png", "dst_imgs/jpeg2000/boston.jpeg2000.5.png",
                "dst_imgs/jpeg/1600.JPEG.2.png", "dst_imgs/blur/1600.BLUR.3.png",
                "dst_imgs/contrast/aerial_city.contrast.4.png", "dst_imgs/fnoise/child_swimming.fnoise.1.png"]
    for name in expected:
        tiny_image(tmp_path / name)
    recs = list(read_records("csiq", tmp_path))
    assert [r.name for r in recs] == expected and all(r.path.is_file() for r in recs)
    assert [r.ref for r in recs] == ["1600.png", "boston.png", "1600.png", "1600.png", "aerial_city.png",
                                     "child_swimming.png"]
    assert [r.mos for r in recs] == pytest.approx([0.938, 0.25, 0.75, 0.5, 0.0, 1.0])
    assert recs[0].mos_raw == 0.062 and recs[0].row == 4


def test_csiq_unknown_distortion_type(tmp_path):
    write_xlsx(tmp_path / "csiq.DMOS.xlsx", ["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"],
               [[1600, 1, "rain", 1, 0.02, 0.1]], sheet="all_by_image")
    with pytest.raises(DataError, match=r"csiq.DMOS.xlsx row 2: dst_type 'rain'"):
        list(read_records("csiq", tmp_path))


def test_csiq_needs_its_sheet(tmp_path):
    write_xlsx(tmp_path / "csiq.DMOS.xlsx", ["image", "dmos"], [[1600, 0.1]], sheet="all_by_distortion")
    with pytest.raises(DataError, match=r"csiq.DMOS.xlsx: no sheet 'all_by_image'"):
        list(read_records("csiq", tmp_path))


def live(root: Path, dmos: np.ndarray, orgs: np.ndarray, n: int = 982) -> Path:
    refs = [f"ref{i % 29}.bmp" for i in range(n)]
    sio.savemat(root / "dmos.mat", {"dmos": dmos.reshape(1, -1), "orgs": orgs.reshape(1, -1)})
    sio.savemat(root / "refnames_all.mat", {"refnames_all": cell_array(refs, (1, n))})
    return root


def test_live_folders_references_skipped_and_tolerance(tmp_path):
    dmos = np.linspace(10, 90, 982)
    orgs = np.zeros(982)
    orgs[[0, 300, 981]] = 1
    dmos[[0, 300, 981]] = 0.0
    dmos[1], dmos[2] = 105.0, -3.0  # a little outside 0..100: kept, not clipped (which would tie them)
    recs = by_name(read_records("live", live(tmp_path, dmos, orgs)))
    assert len(recs) == 979
    assert "jp2k/img1.bmp" not in recs and "jpeg/img74.bmp" not in recs and "fastfading/img174.bmp" not in recs
    assert recs["jpeg/img1.bmp"].row == 228 and recs["wn/img1.bmp"].row == 461
    assert recs["gblur/img174.bmp"].row == 808 and recs["fastfading/img173.bmp"].row == 981
    assert recs["jpeg/img1.bmp"].ref == "ref24.bmp"  # entry 228 of refnames_all
    assert (recs["jp2k/img2.bmp"].mos_raw, recs["jp2k/img2.bmp"].mos) == (105.0, pytest.approx(-0.05))
    assert (recs["jp2k/img3.bmp"].mos_raw, recs["jp2k/img3.bmp"].mos) == (-3.0, pytest.approx(1.03))
    assert recs["jp2k/img4.bmp"].mos == pytest.approx(1 - dmos[3] / 100)


def test_live_reads_the_realigned_dmos_as_its_label_file(tmp_path):
    """dmos_realigned.mat, beside dmos.mat in the release: its dmos_new in dmos.mat's order, the same orgs."""
    orgs = np.zeros(982)
    orgs[0] = 1
    sio.savemat(tmp_path / "dmos_realigned.mat", {"dmos_new": np.linspace(0, 98.1, 982).reshape(1, -1),
                                                  "orgs": orgs.reshape(1, -1), "dmos_std": np.ones((1, 982))})
    live(tmp_path, np.full(982, 50.0), orgs)
    recs = by_name(read_records("live", tmp_path, "dmos_realigned.mat"))
    assert len(recs) == 981 and recs["jp2k/img2.bmp"].mos_raw == pytest.approx(0.1)
    assert recs["fastfading/img174.bmp"].mos_raw == pytest.approx(98.1) and recs["jp2k/img2.bmp"].row == 2


def test_live_far_out_of_range_and_wrong_length(tmp_path):
    dmos = np.full(982, 50.0)
    dmos[10] = 130.0
    with pytest.raises(DataError, match=r"dmos.mat row 11: DMOS 130 is outside -10..120"):
        list(read_records("live", live(tmp_path, dmos, np.zeros(982))))
    with pytest.raises(DataError, match=r"dmos.mat: 5 dmos, 5 orgs and 5 refnames_all entries; release 2 has 982"):
        list(read_records("live", live(tmp_path, np.full(5, 50.0), np.zeros(5), n=5)))


def test_agiqa3k_quality_mos(tmp_path):
    write_csv(tmp_path / "data.csv",
              ["name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality", "mos_align", "std_align"],
              [["AttnGAN_normal_000.jpg", "statue of a man", "", "", "", 0.965602553, 0.2, 0.4, 0.6],
               ["sd1.5_normal_060.jpg", "artwork with only triangles, anime style", "", "", "anime style", 4.0,
                0.7, 0.8, 0.8]])
    recs = list(read_records("agiqa3k", tmp_path))
    assert [(r.name, r.row) for r in recs] == [("AttnGAN_normal_000.jpg", 2), ("sd1.5_normal_060.jpg", 3)]
    assert recs[0].mos == pytest.approx(0.965602553 / 5) and recs[1].mos == pytest.approx(0.8)
    # The images come as a separate zip: unpacked into a folder beside data.csv, they are found there.
    (tmp_path / "AGIQA-3K").mkdir()
    (tmp_path / "notes").mkdir()
    for r in recs:
        (tmp_path / "AGIQA-3K" / r.name).write_bytes(b"jpeg")
    recs = list(read_records("agiqa3k", tmp_path))
    assert [r.name for r in recs] == ["AGIQA-3K/AttnGAN_normal_000.jpg", "AGIQA-3K/sd1.5_normal_060.jpg"]
    assert all(r.path.is_file() for r in recs)
    # Its first image missing, the folder is found from the next: that one alone is missing, not all of them.
    recs[0].path.unlink()
    assert [r.name for r in read_records("agiqa3k", tmp_path)] == \
        ["AGIQA-3K/AttnGAN_normal_000.jpg", "AGIQA-3K/sd1.5_normal_060.jpg"]


# --- errors --------------------------------------------------------------------------------------------------------

def test_unknown_dataset_lists_the_valid_names(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset 'koniq'; valid: koniq10k, spaq, livec, flive, ava"):
        read_records("koniq", tmp_path)  # raised at the call, before any iteration
    assert issubclass(DataError, ConfigError)


def test_missing_label_file_names_path_and_release_file(tmp_path):
    with pytest.raises(DataError) as err:
        read_records("koniq10k", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "koniq10k_scores_and_distributions.csv") in msg
    assert "koniq10k release's 'koniq10k_scores_and_distributions.csv'" in msg
    with pytest.raises(DataError, match=r"elsewhere.csv not found: expected the kadid10k release's 'dmos.csv'"):
        read_records("kadid10k", tmp_path, "elsewhere.csv")


def test_missing_column_names_file_and_column(tmp_path):
    write_csv(tmp_path / "dmos.csv", ["dist_img", "ref_img", "var"], [["a.png", "r.png", 0.1]])
    with pytest.raises(DataError, match=r"dmos.csv: no column 'dmos' \(columns: dist_img, ref_img, var\)"):
        list(read_records("kadid10k", tmp_path))
    # Exported with another separator, or empty: said so.
    (tmp_path / "dmos.csv").write_text("dist_img;ref_img;dmos\na.png;r.png;3\n")
    with pytest.raises(DataError, match=r"^dmos.csv: no column 'dist_img' \(columns: dist_img;ref_img;dmos; its "
                                        r"fields are separated by ';': save it comma-separated\)$"):
        list(read_records("kadid10k", tmp_path))
    (tmp_path / "dmos.csv").write_text("")
    with pytest.raises(DataError, match=r"^dmos.csv: no column 'dist_img' \(no header: an empty file\)$"):
        list(read_records("kadid10k", tmp_path))
    write_xlsx(tmp_path / "Annotations" / "MOS and Image attribute scores.xlsx", ["Image name", "Mos"], [["a", 1]])
    with pytest.raises(DataError, match=r"MOS and Image attribute scores.xlsx: no column 'MOS'"):
        list(read_records("spaq", tmp_path))
    # Another sheet put first: the one read is named, and the sheets listed.
    write_xlsx(tmp_path / "Annotations" / "MOS and Image attribute scores.xlsx", ["Readme"], [["x"]], sheet="Readme")
    with pytest.raises(DataError, match=r"^MOS and Image attribute scores.xlsx: no column 'Image name' in any row of "
                                        r"sheet 'Readme'; the release's labels are on its first sheet, and it has "
                                        r"'Readme', 'notes'$"):
        list(read_records("spaq", tmp_path))
    sio.savemat(tmp_path / "dmos.mat", {"dmos_std": np.zeros((1, 982)), "orgs": np.zeros((1, 982))})
    sio.savemat(tmp_path / "refnames_all.mat", {"refnames_all": cell_array(["a.bmp"] * 982, (1, 982))})
    with pytest.raises(DataError, match=r"dmos.mat: no variable 'dmos' or 'dmos_new' \(variables: dmos_std, orgs\)"):
        list(read_records("live", tmp_path))


def test_non_numeric_mos_names_file_and_row(tmp_path):
    with pytest.raises(DataError, match=r"^koniq10k_scores_and_distributions.csv row 3: MOS_zscore 'abc' is not a "
                                        r"number$"):
        list(read_records("koniq10k", koniq(tmp_path, zscore=(30.0, "abc"))))
    write_xlsx(tmp_path / "Annotations" / "MOS and Image attribute scores.xlsx", ["Image name", "MOS"],
               [["a.jpg", 20], ["b.jpg", None]])
    with pytest.raises(DataError, match=r"MOS and Image attribute scores.xlsx row 3: MOS '' is not a number"):
        list(read_records("spaq", tmp_path))


def test_out_of_range_mos_names_file_and_row(tmp_path):
    with pytest.raises(DataError, match=r"koniq10k_scores_and_distributions.csv row 4: MOS_zscore 150 is outside "
                                        r"0..100"):
        list(read_records("koniq10k", koniq(tmp_path, zscore=(30.0, 40.0, 150.0))))
    write_csv(tmp_path / "data.csv", ["name", "mos_quality"], [["a.jpg", "nan"]])
    with pytest.raises(DataError, match=r"data.csv row 2: MOS nan is outside 0..5"):
        list(read_records("agiqa3k", tmp_path))


def test_label_file_not_utf8_names_file_and_row(tmp_path):
    (tmp_path / "dmos.csv").write_bytes(b"dist_img,ref_img,dmos\na.png,r.png,2\nb\xe9.png,r.png,3\n")
    with pytest.raises(DataError, match=r"^dmos.csv row 3: not UTF-8 text \(byte 0xe9\)$"):
        list(read_records("kadid10k", tmp_path))
    (tmp_path / "dmos.csv").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(DataError, match=r"^dmos.csv row 1: not UTF-8 text \(byte 0x89\)$"):
        list(read_records("kadid10k", tmp_path))
    (tmp_path / "AVA.txt").write_bytes(ava_line(1, "1", [1] * 10).encode() + b"2 caf\xe9 1 1\n")
    with pytest.raises(DataError, match=r"^AVA.txt row 2: not UTF-8 text \(byte 0xe9\)$"):
        list(read_records("ava", tmp_path))
    meta = tmp_path / "meta_info_KADID10kDataset.csv"
    meta.write_bytes(b"ref_name,dist_name,dmos\xe9\nI01.png,I01_01_01.png,2\n")
    with pytest.raises(DataError, match=r"^meta_info_KADID10kDataset.csv row 1: not UTF-8 text"):
        list(read_pyiqa_meta("kadid10k", tmp_path, meta))


def test_label_file_without_rows_is_an_error(tmp_path):
    write_csv(tmp_path / "dmos.csv", ["dist_img", "ref_img", "dmos"], [])
    with pytest.raises(DataError, match=r"^dmos.csv: lists no images$"):
        list(read_records("kadid10k", tmp_path))


def test_empty_image_or_reference_name_names_the_row(tmp_path):
    write_csv(tmp_path / "dmos.csv", ["dist_img", "ref_img", "dmos"], [["a.png", "r.png", 2], [" ", "r.png", 3]])
    with pytest.raises(DataError, match=r"^dmos.csv row 3: empty image name$"):
        list(read_records("kadid10k", tmp_path))
    write_csv(tmp_path / "dmos.csv", ["dist_img", "ref_img", "dmos"], [["a.png", "r.png", 2], ["b.png", "", 3]])
    with pytest.raises(DataError, match=r"^dmos.csv row 3: empty reference image name$"):
        list(read_records("kadid10k", tmp_path))
    meta = write_csv(tmp_path / "meta_info_KADID10kDataset.csv", ["ref_name", "dist_name", "dmos"],
                     [["I01.png", "", 2.0]])
    with pytest.raises(DataError, match=r"^meta_info_KADID10kDataset.csv row 2: empty image name$"):
        list(read_pyiqa_meta("kadid10k", tmp_path, meta))


def test_duplicate_image_is_an_error(tmp_path):
    write_csv(tmp_path / "dmos.csv", ["dist_img", "ref_img", "dmos"], [["a.png", "r.png", 2], ["a.png", "r.png", 3]])
    with pytest.raises(DataError, match=r"dmos.csv row 3: image 'images/a.png' already listed at row 2"):
        list(read_records("kadid10k", tmp_path))


def test_normalise_range_and_direction():
    def normalise(name, raw):
        return _scale(raw, DATASETS[name].raw_range, DATASETS[name].higher_better)

    assert normalise("koniq10k", 0.0) == 0.0 and normalise("koniq10k", 100.0) == 1.0
    assert normalise("csiq", 0.2) == pytest.approx(0.8)
    assert normalise("live", 25.0) == 0.75 and normalise("live", 110.0) == pytest.approx(-0.1)
    assert normalise("ava", 5.5) == 0.5
    assert [n for n, i in DATASETS.items() if not i.higher_better] == ["csiq", "live"]
    # As a pack's manifest says it.
    assert label_scale(DATASETS["live"]) == {"raw_range": [0.0, 100.0], "higher_better": False}
    assert [n for n, i in DATASETS.items() if i.has_reference] == ["kadid10k", "csiq", "live"]


# --- IQA-PyTorch meta-info CSVs and split pickles ------------------------------------------------------------------

def test_pyiqa_koniq_meta_on_its_0_100_scale(tmp_path):
    meta = write_csv(tmp_path / "meta" / "meta_info_KonIQ10kDataset.csv",
                     ["img_name", "mos", "std", "split", "c1", "c2", "c3", "c4", "c5", "c_total"],
                     [["10004473376.jpg", 77.3836206897, 0.52, 0, 0, 0, 0.2, 0.7, 0.1, 105],
                      ["10007357496.jpg", 68.7285714286, 0.58, 2, 0, 0, 0.5, 0.5, 0.0, 96],
                      ["10043785683.jpg", 71.2043269231, 0.50, 1, 0, 0, 0.4, 0.6, 0.0, 106]])
    recs = list(read_pyiqa_meta("koniq10k", tmp_path / "koniq10k", meta))
    assert [(r.name, r.split, r.row) for r in recs] == [("1024x768/10004473376.jpg", "train", 2),
                                                        ("1024x768/10007357496.jpg", "test", 3),
                                                        ("1024x768/10043785683.jpg", "val", 4)]
    assert recs[0].mos_raw == 77.3836206897 and recs[0].mos == pytest.approx(0.773836206897)
    assert recs[0].path == (tmp_path / "koniq10k" / "1024x768" / "10004473376.jpg").absolute()
    other = next(read_pyiqa_meta("koniq10k", tmp_path / "koniq10k", meta, image_dir="512x384"))
    assert other.name == "512x384/10004473376.jpg"


def test_pyiqa_fr_meta_reference_ids_match_the_release_readers(tmp_path):
    csiq = write_csv(tmp_path / "meta_info_CSIQDataset.csv", ["ref_name", "dist_name", "dmos"],
                     [["1600.png", "1600.AWGN.1.png", 0.062]])
    rec = next(read_pyiqa_meta("csiq", tmp_path / "CSIQ", csiq))
    assert (rec.name, rec.ref, rec.mos) == ("dst_imgs/1600.AWGN.1.png", "1600.png", pytest.approx(0.938))
    live_meta = write_csv(tmp_path / "meta_info_LIVEIQADataset.csv", ["ref_name", "dist_name", "mos"],
                          [["refimgs/bikes.bmp", "jp2k/img1.bmp", 40.0], ["refimgs/bikes.bmp", "wn/img2.bmp", 104.0]])
    recs = list(read_pyiqa_meta("live", tmp_path / "LIVE", live_meta))
    assert [(r.name, r.ref, r.mos) for r in recs] == [("jp2k/img1.bmp", "bikes.bmp", pytest.approx(0.6)),
                                                      ("wn/img2.bmp", "bikes.bmp", pytest.approx(-0.04))]


def test_pyiqa_livec_meta_drops_the_seven_training_images(tmp_path):
    rows = [[f"t{i}.bmp", 50.0, 10.0] for i in range(1, 8)] + [["10.bmp", 30.0, 12.0]]
    meta = write_csv(tmp_path / "meta_info_LIVEChallengeDataset.csv", ["img_name", "mos", "std"], rows)
    recs = list(read_pyiqa_meta("livec", tmp_path / "LIVEC", meta, image_dir="Images"))
    assert [(r.name, r.mos, r.row, r.split) for r in recs] == [("Images/10.bmp", pytest.approx(0.3), 9, None)]


def test_pyiqa_ava_meta_official_split_column(tmp_path):
    header = ["img_name", "MOS", *[f"c{i}" for i in range(1, 11)], "semantic_tag1", "semantic_tag2",
              "official split", "ILGnet split"]
    meta = write_csv(tmp_path / "meta_info_AVADataset.csv", header,
                     [["1.jpg", 5.5, *[1] * 10, 0, 15, 0, 2], ["2.jpg", 7.75, *[1] * 10, 0, 15, 2, 0]])
    recs = list(read_pyiqa_meta("ava", tmp_path / "AVA_dataset", meta))
    assert [(r.name, r.split, r.mos) for r in recs] == [("ava_images/1.jpg", "train", pytest.approx(0.5)),
                                                        ("ava_images/2.jpg", "test", pytest.approx(0.75))]


def test_pyiqa_meta_errors(tmp_path):
    with pytest.raises(DataError, match="IQA-PyTorch has no meta-info CSV for agiqa3k"):
        read_pyiqa_meta("agiqa3k", tmp_path, tmp_path / "x.csv")
    with pytest.raises(DataError, match=r"meta_info_SPAQDataset.csv not found"):
        read_pyiqa_meta("spaq", tmp_path, tmp_path / "meta_info_SPAQDataset.csv")
    meta = write_csv(tmp_path / "meta_info_FLIVEDataset.csv", ["img_name/patch_name", "mos", "split"],
                     [["a/b.jpg", 50, 0], ["a/c.jpg", 50, 7]])
    with pytest.raises(DataError, match=r"meta_info_FLIVEDataset.csv row 3: split '7' is not 0/1/2"):
        list(read_pyiqa_meta("flive", tmp_path, meta))
    meta = write_csv(tmp_path / "meta_info_KADID10kDataset.csv", ["ref_name", "dist_name", "dmos"],
                     [["I01.png", "I01_01_01.png", 5.5]])
    with pytest.raises(DataError, match=r"meta_info_KADID10kDataset.csv row 2: MOS 5.5 is outside 1..5"):
        list(read_pyiqa_meta("kadid10k", tmp_path, meta))


def dump(path: Path, obj: object) -> Path:
    path.write_bytes(pickle.dumps(obj))
    return path


def test_pyiqa_split_pickle_of_plain_data(tmp_path):
    official = dump(tmp_path / "koniq10k_official.pkl", {1: {"train": [0, 3], "val": [1], "test": [2]}})
    assert read_pyiqa_split(official) == {"train": [0, 3], "val": [1], "test": [2]}
    seeds = dump(tmp_path / "livechallenge_seed123.pkl", {i: {"train": [i], "val": [i + 10]} for i in range(1, 11)})
    assert read_pyiqa_split(seeds) == {"train": [1], "val": [11], "test": []}
    assert read_pyiqa_split(seeds, index=3) == {"train": [4], "val": [14], "test": []}
    assert read_pyiqa_split(seeds, index=9) == {"train": [10], "val": [20], "test": []}
    with pytest.raises(DataError, match=r"no split index 10 \(0-based\); it holds 10 splits, numbered 1, 2, 3"):
        read_pyiqa_split(seeds, index=10)
    with pytest.raises(DataError, match=r"expected \{split number"):
        read_pyiqa_split(dump(tmp_path / "flat.pkl", {"train": [0]}))


class Payload:
    """Unpickling this would create a file: proof that no global is ever resolved."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pyiqa_split_pickle_with_objects_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    bad = dump(tmp_path / "evil.pkl", {1: {"train": [0], "val": [Payload(marker)]}})
    with pytest.raises(DataError, match=r"evil.pkl: not a plain-data split pickle \(refusing io.open\)"):
        read_pyiqa_split(bad)
    assert not marker.exists()
    with pytest.raises(DataError, match=r"refusing numpy"):
        read_pyiqa_split(dump(tmp_path / "np.pkl", {1: {"train": list(np.arange(3))}}))


def test_a_folder_given_as_the_label_file_is_said_to_be_one(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=rf"^{tmp_path / 'images'} is a folder: expected "):
        list(read_records("kadid10k", tmp_path, "images"))
