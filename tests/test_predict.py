import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from temu_dist.data.augment import normalize, to_input
from temu_dist.model.io import save_model
from temu_dist.model.temu import build_model
from temu_dist.predict import predict
from tests.conftest import tiny_config


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    good = []
    for i, size in enumerate([(80, 60), (64, 64), (33, 90)]):
        path = tmp_path / f"photo{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        good.append(path)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return good, corrupt


@pytest.fixture
def checkpoint(tmp_path):
    config = tiny_config("model.prompt=coop")
    model = build_model(config)
    save_model(model, config, tmp_path / "run")
    return tmp_path / "run", model


def test_scores_good_images_and_names_the_corrupt_one(images, checkpoint, tmp_path, capsys):
    (good, corrupt), (run, model) = images, checkpoint
    paths = [str(good[0]), str(corrupt), str(good[1]), str(good[2])]
    # Flags among the images too, as a shell's history edits a command.
    status = predict(["--checkpoint", str(run), *paths[:2], "--batch-size", "2", "--heatmap", str(tmp_path / "maps"),
                      *paths[2:]])
    out, err = capsys.readouterr()
    assert status == 1
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in good]
    assert all(0 < line["score"] < 1 for line in lines)
    errors = [line for line in err.splitlines() if "cannot read" in line]
    assert len(errors) == 1 and f"cannot read image {corrupt}" in errors[0]
    # The printed score is the model's score of that image.
    x = normalize(to_input(Image.open(good[2]).convert("RGB"), (64, 64))[None], model.backbone.mean,
                  model.backbone.std)
    with torch.no_grad():
        assert lines[2]["score"] == pytest.approx(float(model.eval()(x).score[0]), abs=1e-6)
    for p in good:
        heat = np.asarray(Image.open(tmp_path / "maps" / f"{p.name}.heatmap.png").convert("RGB")).astype(int)
        w, h = Image.open(p).size
        scale = 256 / max(w, h)  # small images are shown larger, in a column at least 160 px wide
        column = max(round(w * scale), 160)
        assert heat.shape == (round(h * scale) + 30, column + 130, 3)
        # The colour bar beside the image runs from green (1, better) at the top to red (0, worse) at the bottom.
        bar = heat[30:, column + 16]
        top, bottom = bar[round(0.1 * len(bar))], bar[round(0.9 * len(bar))]
        assert top[1] > top[0] + 60 and bottom[0] > bottom[1] + 60, (top, bottom)
    assert not (tmp_path / "maps" / "corrupt.jpg.heatmap.png").exists()


def test_all_good_exits_zero_and_overrides_apply(images, checkpoint, capsys):
    (good, _), (run, _) = images, checkpoint
    assert predict(["--checkpoint", str(run), str(good[0]), "model.image_size=96"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_config_without_checkpoint_scores_with_a_fresh_head(images, tmp_path, capsys):
    good, _ = images
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  backbone: Test-Tiny-ViT-16\n  pretrained: null\n  image_size: 64\n")
    assert predict(["--config", str(cfg), *map(str, good)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3
    # Said, for a slip for --checkpoint: with real weights nothing else would tell these scores from a trained run's.
    assert f"predict: --config {cfg}: no --checkpoint, so an untrained head scores (zero-shot, the fixed prompts)\n" \
        in err
    assert predict(["--config", str(cfg), str(good[0]), "model.prompt=coop"]) == 0
    assert f"predict: --config {cfg}: no --checkpoint, so an untrained head scores: its coop prompt context is " \
        "random\n" in capsys.readouterr().err


def test_a_run_not_finished_is_scored_at_its_best_so_far_and_said_so(images, checkpoint, tmp_path, capsys):
    from temu_dist.checkpoint import TRAINER_INFO

    (good, _), (weights, _) = images, checkpoint
    run = tmp_path / "unfinished"
    shutil.copytree(weights, run / "checkpoints" / "best")
    (run / "checkpoints" / "best" / TRAINER_INFO).write_text(json.dumps({"next_epoch": 3}))
    assert predict(["--checkpoint", str(run), str(good[0])]) == 0
    assert f"predict: {run} has not finished: scoring its best so far, epoch 3\n" in capsys.readouterr().err
    (run / "results.json").write_text("{}")
    assert predict(["--checkpoint", str(run), str(good[0])]) == 0
    assert "has not finished" not in capsys.readouterr().err


def test_heatmaps_that_cannot_be_written_fail_before_any_scoring(images, checkpoint, tmp_path):
    from temu_dist.config import ConfigError

    (good, _), (run, _) = images, checkpoint
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(ConfigError, match=f"--heatmap {taken}: it is a file, not a folder"):
        predict(["--checkpoint", str(run), "--heatmap", str(taken), str(good[0])])
    with pytest.raises(ConfigError, match=f"--heatmap {taken / 'maps'}: {taken} is a file, not a folder"):
        predict(["--checkpoint", str(run), "--heatmap", str(taken / "maps"), str(good[0])])
    twin = tmp_path / "other" / good[0].name
    twin.parent.mkdir()
    twin.write_bytes(good[0].read_bytes())
    with pytest.raises(ConfigError, match=f"{good[0]} and {twin} would both write photo0.png.heatmap.png; score"):
        predict(["--checkpoint", str(run), "--heatmap", str(tmp_path / "maps"), str(good[0]), str(twin)])
    # Every clash at once, not one a run.
    other_twin = tmp_path / "other" / good[1].name
    other_twin.write_bytes(good[1].read_bytes())
    with pytest.raises(ConfigError, match=f"photo0.png.heatmap.png; {good[1]} and {other_twin} would both write "
                                          f"photo1.png.heatmap.png; score them"):
        predict(["--checkpoint", str(run), "--heatmap", str(tmp_path / "maps"), *map(str, [*good, twin, other_twin])])
    assert not (tmp_path / "maps").exists()


def test_heatmaps_of_a_folder_keep_its_subfolders_so_names_repeated_in_them_do_not_clash(images, checkpoint, tmp_path,
                                                                                          capsys):
    (good, _), (run, _) = images, checkpoint
    for folder in ("class_a", "class_b"):
        (tmp_path / "set" / folder).mkdir(parents=True)
        shutil.copy(good[0], tmp_path / "set" / folder / "001.png")
    shutil.copy(good[1], tmp_path / "set" / "top.png")
    (tmp_path / "set" / "notes.txt").write_text("not an image")
    assert predict(["--checkpoint", str(run), "--heatmap", str(tmp_path / "maps"), str(tmp_path / "set"),
                    str(good[2])]) == 0
    assert f"predict: {tmp_path / 'set'}: 1 files left out, not images or named as heatmaps (*.heatmap.png), e.g. " \
           f"{tmp_path / 'set' / 'notes.txt'}" in capsys.readouterr().err
    assert sorted(str(p.relative_to(tmp_path / "maps")) for p in (tmp_path / "maps").rglob("*.png")) == \
        ["class_a/001.png.heatmap.png", "class_b/001.png.heatmap.png", "photo2.png.heatmap.png", "top.png.heatmap.png"]
    # The same photo in two formats (a codec comparison) writes two maps.
    Image.open(good[0]).save(tmp_path / "set" / "top.webp")
    assert predict(["--checkpoint", str(run), "--heatmap", str(tmp_path / "maps2"), str(tmp_path / "set")]) == 0
    assert {"top.png.heatmap.png", "top.webp.heatmap.png"} <= {p.name for p in (tmp_path / "maps2").iterdir()}


def test_heatmaps_written_into_the_scored_folder_are_not_scored_on_the_next_run(images, checkpoint, tmp_path, capsys):
    (good, _), (run, _) = images, checkpoint
    (tmp_path / "set").mkdir()
    shutil.copy(good[0], tmp_path / "set" / "a.png")
    for _ in range(2):
        assert predict(["--checkpoint", str(run), "--heatmap", str(tmp_path / "set" / "maps"),
                        str(tmp_path / "set")]) == 0
        assert [json.loads(line)["path"] for line in capsys.readouterr().out.splitlines()] == \
            [str(tmp_path / "set" / "a.png")]
    assert [p.name for p in (tmp_path / "set" / "maps").rglob("*")] == ["a.png.heatmap.png"]


def test_a_heatmap_that_cannot_be_written_is_named_and_the_scores_go_on(images, checkpoint, tmp_path, capsys):
    (good, _), (run, _) = images, checkpoint
    for folder in ("sub", "ok"):
        (tmp_path / "set" / folder).mkdir(parents=True)
    shutil.copy(good[0], tmp_path / "set" / "sub" / "a.png")
    shutil.copy(good[1], tmp_path / "set" / "ok" / "b.png")
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "sub").write_text("a file where the subfolder would be")
    assert predict(["--checkpoint", str(run), "--heatmap", str(tmp_path / "maps"), str(tmp_path / "set"),
                    "--out", str(tmp_path / "scores.csv")]) == 1
    err = capsys.readouterr().err
    assert f"predict: cannot write heatmap {tmp_path / 'maps' / 'sub' / 'a.png.heatmap.png'}: " in err
    assert [row["path"] for row in csv.DictReader((tmp_path / "scores.csv").open())] == \
        [str(tmp_path / "set" / "ok" / "b.png"), str(tmp_path / "set" / "sub" / "a.png")]
    assert (tmp_path / "maps" / "ok" / "b.png.heatmap.png").is_file()


def test_a_16_bit_grey_png_scores_as_its_8_bit_copy(checkpoint, tmp_path, capsys):
    run, _ = checkpoint
    wide = np.linspace(0, 65535, 64 * 80).reshape(64, 80).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "grey16.png")
    Image.fromarray((wide >> 8).astype(np.uint8)).save(tmp_path / "grey8.png")
    assert predict(["--checkpoint", str(run), str(tmp_path / "grey16.png"), str(tmp_path / "grey8.png")]) == 0
    scores = [json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()]
    assert scores[0] == scores[1]


def test_a_phone_photo_is_scored_as_stored_and_its_heatmap_shown_upright(checkpoint, tmp_path, capsys,
                                                                        monkeypatch):
    run, _ = checkpoint
    pixels = np.random.default_rng(0).integers(0, 255, (40, 80, 3), dtype=np.uint8)  # stored lying on its side
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # as a phone held upright tags it: viewers turn it a quarter clockwise
    Image.fromarray(pixels).save(tmp_path / "tagged.jpg", exif=exif)
    Image.fromarray(pixels).save(tmp_path / "plain.jpg")
    paths = [str(tmp_path / "tagged.jpg"), str(tmp_path / "plain.jpg")]
    assert predict(["--checkpoint", str(run), "--heatmap", str(tmp_path / "maps"), *paths]) == 0
    scores = [json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()]
    assert scores[0] == scores[1]
    tagged, plain = (np.asarray(Image.open(tmp_path / "maps" / f"{n}.jpg.heatmap.png")) for n in ("tagged", "plain"))
    # A 40x80 image shown 128x256 (portrait) beside the 130 px colour bar, under the 30 px title; its plain copy
    # 256x128.
    assert tagged.shape[:2] == (256 + 30, 160 + 130) and plain.shape[:2] == (128 + 30, 256 + 130)
    # A photo over PIL's decompression-bomb limit, which torchvision decodes: scored and mapped, as stored.
    with monkeypatch.context() as patched:
        patched.setattr(Image, "MAX_IMAGE_PIXELS", 100)
        assert predict(["--checkpoint", str(run), "--heatmap", str(tmp_path / "huge"), paths[0]]) == 0
    assert np.asarray(Image.open(tmp_path / "huge" / "tagged.jpg.heatmap.png")).shape[:2] == plain.shape[:2]


def test_an_image_too_large_to_open_is_named_and_the_rest_scored(images, checkpoint, tmp_path, monkeypatch, capsys):
    (good, _), (run, _) = images, checkpoint
    huge = tmp_path / "huge.tif"  # TIFF: read by PIL, which guards against decompression bombs
    Image.open(good[0]).save(huge)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert predict(["--checkpoint", str(run), str(huge), str(good[1])]) == 1
    out, err = capsys.readouterr()
    assert [json.loads(line)["path"] for line in out.splitlines()] == [str(good[1])]
    assert f"predict: cannot read image {huge}: Image size (4800 pixels) exceeds limit" in err


def test_a_path_that_does_not_exist_is_refused_before_the_model_loads(images, checkpoint, tmp_path, monkeypatch,
                                                                       capsys):
    from temu_dist.scorer import Scorer

    (good, _), (run, _) = images, checkpoint
    monkeypatch.setattr(Scorer, "load", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as stopped:
        predict(["--checkpoint", str(run), str(good[0]), str(tmp_path / "phot0.png")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: {tmp_path / 'phot0.png'}: no such file or folder\n")


@pytest.mark.parametrize("size", ["0", "-1", "two"])
def test_a_batch_size_under_1_is_refused(images, checkpoint, size, capsys):
    (good, _), (run, _) = images, checkpoint
    with pytest.raises(SystemExit):
        predict(["--checkpoint", str(run), "--batch-size", size, str(good[0])])
    assert f"--batch-size: not a whole number of at least 1: '{size}'" in capsys.readouterr().err


def test_a_heatmap_folder_this_user_cannot_write_fails_before_any_scoring(images, checkpoint, tmp_path, monkeypatch):
    from temu_dist.config import ConfigError

    (good, _), (run, _) = images, checkpoint
    monkeypatch.setattr("os.access", lambda path, mode: path != tmp_path)  # root may write anywhere: say it may not
    with pytest.raises(ConfigError, match=f"^--heatmap {tmp_path / 'maps'}: {tmp_path} is not writable by this user$"):
        predict(["--checkpoint", str(run), "--heatmap", str(tmp_path / "maps"), str(good[0])])


def test_a_folder_is_scored_image_by_image_in_path_order(images, checkpoint, tmp_path, capsys):
    (good, _), (run, _) = images, checkpoint
    (tmp_path / "notes.txt").write_text("not an image")  # left alone, as the corrupt .jpg is not
    nested = tmp_path / "more" / "photo9.png"
    nested.parent.mkdir()
    nested.write_bytes(good[0].read_bytes())
    assert predict(["--checkpoint", str(run), str(tmp_path)]) == 1
    scored = [json.loads(line)["path"] for line in capsys.readouterr().out.splitlines()]
    assert scored == sorted(map(str, [*good, nested]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        predict(["--checkpoint", str(run), str(tmp_path / "empty")])
    assert f"{tmp_path / 'empty'}: a folder with no image files in it or below" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_scores_go_to_a_file_written_whole_with_progress_on_stderr(images, checkpoint, tmp_path, capsys, suffix):
    (good, corrupt), (run, _) = images, checkpoint
    comma = tmp_path / "a, bü.png"  # a path the CSV must quote, written as it is named
    comma.write_bytes(good[0].read_bytes())
    paths = [str(comma), str(corrupt), str(good[1])]
    out = tmp_path / "scores" / f"all{suffix}"
    assert predict(["--checkpoint", str(run), "--out", str(out), *paths]) == 1
    printed, err = capsys.readouterr()
    assert printed == ""
    assert f"cannot read image {corrupt}" in err and "predict: 2 scores written to" in err
    assert "3/3" in err  # the progress bar reached every image, the unreadable one included
    if suffix == ".csv":
        rows = list(csv.DictReader(out.open()))
        assert [r["path"] for r in rows] == [str(comma), str(good[1])]
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert predict(["--checkpoint", str(run), str(comma), str(good[1])]) == 0
    printed = [json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()]
    assert [float(r["score"]) for r in rows] == printed


def test_a_stopped_run_says_so_in_a_line_and_leaves_an_earlier_scores_file_as_it_was(images, checkpoint, tmp_path,
                                                                                     monkeypatch, capsys):
    import temu_dist.predict as predict_mod

    (good, _), (run, _) = images, checkpoint
    out = tmp_path / "scores.csv"
    out.write_text("path,score\nearlier.png,0.5\n")
    real = predict_mod.heatmap
    drawn = []

    def ctrl_c_at_the_second(*args, **kwargs):
        if drawn:
            raise KeyboardInterrupt
        drawn.append(real(*args, **kwargs))

    monkeypatch.setattr(predict_mod, "heatmap", ctrl_c_at_the_second)
    assert predict(["--checkpoint", str(run), "--heatmap", str(tmp_path / "maps"), "--out", str(out),
                    *map(str, good)]) == 130
    assert out.read_text() == "path,score\nearlier.png,0.5\n"
    assert capsys.readouterr().err.endswith(f"\npredict: stopped after scoring 2 of 3 images; 1 heatmaps in "
                                            f"{tmp_path / 'maps'}; {out} not written (the earlier one is as it "
                                            "was)\n")


@pytest.mark.parametrize(("name", "says"), [("scores.txt", "name a .csv or a .jsonl file"),
                                             ("folder.csv", "it is a folder, not a file"),
                                             ("kept.csv", "a read-only file; make it writable, or name another")])
def test_an_out_file_that_cannot_be_written_fails_before_any_scoring(images, checkpoint, tmp_path, monkeypatch,
                                                                      name, says):
    from temu_dist.config import ConfigError

    (good, _), (run, _) = images, checkpoint
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "kept.csv").write_text("path,score\n")
    (tmp_path / "kept.csv").chmod(0o444)
    # As root, who may write any file, os.access calls a read-only one writable: answered as for its owner.
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not (Path(path).name == "kept.csv" and mode & os.W_OK)
                        and real(path, mode))
    with pytest.raises(ConfigError, match=f"^--out {tmp_path / name}: {says}$"):
        predict(["--checkpoint", str(run), "--out", str(tmp_path / name), str(good[0])])


def test_ctrl_c_while_the_model_loads_is_one_line(images, checkpoint, monkeypatch, capsys):
    import temu_dist.predict as predict_mod

    (good, _), (run, _) = images, checkpoint
    monkeypatch.setattr(predict_mod.Scorer, "load", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr("sys.argv", ["predict", "--checkpoint", str(run), str(good[0])])
    with pytest.raises(SystemExit) as stopped:
        predict_mod.main()
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "\npredict: stopped before scoring any image; nothing written\n"
