"""python -m temu_dist.report: finished runs, repeat series and searches as one paper-style table."""
import csv
import io
import json
import math
import os
import shutil
import socket

import pytest
import yaml
from PIL import Image

from temu_dist import report
from temu_dist.data.splits import SplitSpec
from temu_dist.pack import PackOptions, pack
from temu_dist.train import train
from tests.conftest import tiny_config, write_kadid


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One real finished run (trained on a KADID-10k pack, tested on its own test split and on a cross set)."""
    root = tmp_path_factory.mktemp("report")
    write_kadid(root / "kadid", refs=6, per_ref=3, size=(64, 64))
    shards = root / "shards" / "kadid10k"
    pack(PackOptions("kadid10k", str(root / "kadid"), str(shards), split=SplitSpec("ratio", (0.5, 0.0, 0.5),
                                                                                   by_reference=True), workers=1))
    train(tiny_config(f"data.train={shards}", f"out_dir={root / 'runs'}", "name=koniq-I", "data.workers=0",
                      "train.epochs=2", "train.batch_size=4", "ldg.region_min=8", "ldg.region_max=24",
                      "tracking.enabled=false", f"eval.cross=[{{name: csiq, shards: '{shards}', split: test}}]"))
    return root / "runs" / "koniq-I"


def _copy(run, to, config: dict, results: dict):
    """`run` copied to `to` with its config and results changed: a run of other settings, as train writes it."""
    shutil.copytree(run, to)
    saved = yaml.safe_load((to / "config.yaml").read_text())
    for dotted, value in config.items():
        section, key = dotted.split(".")
        saved[section][key] = value
    (to / "config.yaml").write_text(yaml.safe_dump(saved))
    data = json.loads((to / "results.json").read_text())
    for which, sets in results.items():
        for name, metrics in sets.items():
            data[which][name].update(metrics)
    (to / "results.json").write_text(json.dumps(data))
    return to


def test_runs_line_up_as_a_cross_dataset_table_with_their_own_split_named_after_their_dataset(finished, tmp_path,
                                                                                             capsys):
    results = json.loads((finished / "results.json").read_text())
    other = _copy(finished, tmp_path / "koniq-S", {"model.variant": "S"},
                  {"own_best": {"csiq": {"srcc": 0.9, "plcc": 0.8}}, "best": {"csiq": {"srcc": 0.7}}})
    # Two --out: both written (the second replaced the first).
    assert report.main([str(finished), str(other), "--out", str(tmp_path / "t.csv"), "--out", str(tmp_path / "t.md"),
                        "--plot", str(tmp_path / "t.png")]) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "t.md").read_text() == out
    out = out.splitlines()
    assert err.splitlines() == [f"report: written to {tmp_path / 't.csv'}", f"report: written to {tmp_path / 't.md'}",
                                f"report: plot in {tmp_path / 't.png'}"]
    assert not any(line.startswith("report:") for line in out)  # stdout holds the table alone, for a redirect
    own, cross = results["own_best"]["test"], results["own_best"]["csiq"]
    assert out[0] == "| run | kadid10k | csiq |"
    first = f"| variant=I | {own['srcc']:.4f} / {own['plcc']:.4f} | {cross['srcc']:.4f} / {cross['plcc']:.4f} |"
    assert out[2] == first.replace(f"| {own['srcc']:.4f}", f"| **{own['srcc']:.4f}**", 1)  # tied with S: both bold
    assert out[3].endswith("| **0.9000** / 0.8000 |") and out[3].startswith("| variant=S | **")
    assert out[5] == "SRCC / PLCC; each set at its own best epoch (IQA-PyTorch's way)"
    table = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert [r["run"] for r in table] == ["variant=I", "variant=S"]
    assert float(table[1]["csiq/srcc"]) == 0.9 and table[1]["csiq/srcc_sd"] == "" and table[1]["splits"] == ""
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")
    # The same table for a paper, in LaTeX.
    assert report.main([str(finished), str(other), "--out", str(tmp_path / "t.tex")]) == 0
    capsys.readouterr()
    tex = (tmp_path / "t.tex").read_text().splitlines()
    assert tex[:5] == ["% needs \\usepackage{booktabs}", "\\begin{tabular}{lcc}", "\\toprule",
                       "Run & kadid10k & csiq \\\\", "\\midrule"]
    assert tex[6].startswith("{}variant=S & \\textbf{") and tex[6].endswith(" & \\textbf{0.9000} / 0.8000 \\\\")
    assert tex[7:] == ["\\bottomrule", "\\end{tabular}", "\\par\\smallskip{\\footnotesize SRCC / PLCC; each set at "
                       "its own best epoch (IQA-PyTorch's way)}"]
    assert report._tex("run_1 & 50% #2 {a} ~^\\ <|> 0.6±0.1") == (
        "run\\_1 \\& 50\\% \\#2 \\{a\\} \\textasciitilde{}\\textasciicircum{}\\textbackslash{} "
        "\\textless{}\\textbar{}\\textgreater{} 0.6$\\pm$0.1")
    # At the key metric's best epoch instead: the weights one would ship.
    assert report.main([str(finished), str(other), "--each-at", "key", "--metrics", "srcc"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[3].endswith("| **0.7000** |")
    assert out[5].startswith("SRCC; every set at the epoch the key metric chose")


def test_a_run_extended_past_the_epochs_it_started_for_says_so_in_its_label(finished, tmp_path):
    longer = _copy(finished, tmp_path / "longer", {"train.epochs": 3}, {})
    results = json.loads((longer / "results.json").read_text())
    results["extended"] = [{"epochs_from": 2, "epochs_to": 3, "after_step": 4, "lr_from": 0.0, "lr_to": 5e-5}]
    (longer / "results.json").write_text(json.dumps(results))
    rows = report.collect([finished, longer])
    assert report.labels(rows) == ["epochs=2", "epochs=3 [started for 2 epochs]"]


def test_an_image_size_given_as_a_pair_is_the_same_setting_as_one_number(finished, tmp_path):
    pair = _copy(finished, tmp_path / "pair", {"model.image_size": [64, 64]}, {})
    larger = _copy(finished, tmp_path / "larger", {"model.image_size": [64, 96]}, {})
    assert report.labels(report.collect([finished, pair])) == ["koniq-I", "pair"]
    assert report.labels(report.collect([finished, pair, larger])) == ["image_size=64", "image_size=[64, 64]",
                                                                        "image_size=[64, 96]"]


def test_rows_and_columns_print_under_the_names_a_paper_gives_them(finished, tmp_path, capsys):
    other = _copy(finished, tmp_path / "koniq-S", {"model.variant": "S"}, {})
    runs = [str(finished), str(other)]
    assert report.main([*runs, "--rename", "variant=S", "TeMu-IQA (S)", "--rename", "kadid10k", "KADID-10k",
                        "--out", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| run | KADID-10k | csiq |"
    assert out[2].startswith("| variant=I |") and out[3].startswith("| TeMu-IQA (S) |")
    # A | of a name stays in its cell.
    assert report.main([*runs, "--rename", "kadid10k", "KADID|train", "--rename", "variant=S", "S|1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == r"| run | KADID\|train | csiq |" and out[3].startswith(r"| S\|1 |")
    table = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert table[1]["run"] == "TeMu-IQA (S)" and "KADID-10k/srcc" in table[1]
    assert report.main([*runs, "--rename", "variant=s", "x"]) == 1
    assert capsys.readouterr().err == "report: --rename 'variant=s': no row label or column is named so; the rows: " \
                                      "'variant=I', 'variant=S'; the columns: 'kadid10k', 'csiq'\n"
    assert report.main([*runs, "--rename", "kadid10k", "csiq"]) == 1
    assert capsys.readouterr().err == "report: --rename: two columns would both be named 'csiq'\n"
    # A name outside ASCII: the LaTeX says what it needs.
    assert report.main([*runs, "--rename", "variant=S", "Ours (κ=1, é)", "--out", str(tmp_path / "t.tex")]) == 0
    tex = (tmp_path / "t.tex").read_text().splitlines()
    assert tex[0] == "% holds characters outside the Latin script (κ), which pdfLaTeX has no glyphs for: compile " \
                     "with XeLaTeX or LuaLaTeX" and tex[1] == "% needs \\usepackage{booktabs}"
    capsys.readouterr()
    assert report.main([*runs, "--rename", "variant=S", "variant=I"]) == 1
    assert capsys.readouterr().err == "report: --rename: two rows would both be named 'variant=I'\n"
    # Rows alike of themselves (the same run in two folders of one name) are still shown.
    twin = _copy(finished, tmp_path / "b" / finished.name, {}, {})
    assert report.main([str(finished), str(twin)]) == 0


def test_an_unfinished_series_is_said_and_its_finished_splits_are_not_rows_of_their_own(finished, tmp_path, capsys):
    # A series stopped during split 2: its first split showed as a run of its own, bolded against the series' means,
    # and the series was not named at all.
    split0 = _copy(finished, tmp_path / "part-split0", {}, {})
    other = _copy(finished, tmp_path / "other", {"model.variant": "S"}, {})
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "repeat-started.json").write_text(json.dumps({
        "splits": 3, "runs": [str(tmp_path / f"part-split{i}") for i in range(3)]}))
    rows = report.collect([tmp_path])
    assert capsys.readouterr().err == "report: left out: part (an unfinished repeat series, 1 of 3 splits finished: " \
        "rerun its repeat command to go on); part-split0 (a split of the unfinished series part)\n"
    assert [r.folder for r in rows] == [other] and split0.is_dir()
    assert report.main([str(tmp_path / "part")]) == 1
    assert capsys.readouterr().err == f"report: {tmp_path / 'part'}: an unfinished repeat series (1 of 3 splits " \
        "finished): rerun its repeat command to go on\n"
    # Splits being added to a finished series (rerun with more --splits): not rows of their own either.
    (tmp_path / "part" / "repeat.json").write_text(json.dumps({
        "splits": 1, "runs": [str(split0)], "sets_own_best": {"test": {"srcc": {"mean": 0.5, "std": 0.0, "n": 1}}}}))
    _copy(finished, tmp_path / "part-split1", {}, {})
    assert [r.folder.name for r in report.collect([tmp_path])] == ["other", "part"]
    assert "; part-split1 (a split being added to the series part)" in capsys.readouterr().err


def test_report_reads_the_file_repeat_starts_a_series_with():
    from temu_dist.repeat import STARTED

    assert report._REPEAT_STARTED == STARTED


def test_a_series_is_its_mean_and_sd_and_its_split_runs_are_left_out(finished, tmp_path, capsys, monkeypatch):
    for i, srcc in enumerate((0.5, 0.7)):
        _copy(finished, tmp_path / f"rep-split{i}", {}, {"own_best": {"test": {"srcc": srcc}}})
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "repeat.json").write_text(json.dumps({
        "splits": 2, "runs": [str(tmp_path / f"rep-split{i}") for i in range(2)],
        "sets": {"test": {"srcc": {"mean": 0.6, "std": 0.0, "n": 2}}},
        "sets_own_best": {"test": {"srcc": {"mean": 0.6, "std": 0.1414, "n": 2}}}}))
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    rows = report.collect([tmp_path])  # the out_dir: the series, its two split runs, an unfinished run
    assert capsys.readouterr().err == "report: left out: cut (not finished); rep-split0 (a split of the series rep, " \
                                      "in its row); rep-split1 (a split of the series rep, in its row)\n"
    assert [r.folder.name for r in rows] == ["rep"]
    assert rows[0].cells == {"kadid10k": {"srcc": (0.6, 0.1414)}}
    text = report.markdown(rows, ("srcc",), "own")
    assert "| rep (2 splits) | 0.6000±0.1414 |" in text and "a repeat series: mean±sd (sample, n-1)" in text
    # Renamed, a series keeps its marks: the splits, and a mean over fewer of them.
    rows[0].fewer = {("kadid10k", "srcc"): 1}
    assert "| Ours (2 splits) | 0.6000±0.1414 (n=1) |" in report.markdown(
        rows, ("srcc",), "own", report.rename(rows, [("rep", "Ours"), ("kadid10k", "KADID")]))
    table = report.table_csv(report.collect([tmp_path / "rep"], "key"), ("srcc",))
    assert list(csv.DictReader(io.StringIO(table)))[0]["kadid10k/srcc_sd"] == "0.0"  # an sd of 0 is a value
    # One split has no spread; a metric undefined in every split (null in repeat.json) is nan, not a crash.
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "repeat.json").write_text(json.dumps({
        "splits": 1, "runs": [str(tmp_path / "rep-split0")],
        "sets_own_best": {"test": {"srcc": {"mean": 0.5, "std": 0.0, "n": 1}, "plcc": {"mean": None, "std": None,
                                                                                       "n": 0}}}}))
    assert "| one (1 split) | 0.5000 / nan (n=0) |" in report.markdown(report.collect([tmp_path / "one"]),
                                                                        ("srcc", "plcc"), "own")
    # A metric defined in one split of two: its value, over how many, and no spread (repeat writes an sd of 0).
    summary = json.loads((tmp_path / "rep" / "repeat.json").read_text())
    summary["sets_own_best"]["test"]["plcc"] = {"mean": 0.4, "std": 0.0, "n": 1}
    (tmp_path / "rep" / "repeat.json").write_text(json.dumps(summary))
    assert "| rep (2 splits) | 0.6000±0.1414 / 0.4000 (n=1) |" in report.markdown(
        report.collect([tmp_path / "rep"]), ("srcc", "plcc"), "own")
    # A series whose runs were extended (repeat ... train.resume=extend) says the epochs they were started for.
    summary["started_for"] = [1]
    (tmp_path / "rep" / "repeat.json").write_text(json.dumps(summary))
    assert report.labels(report.collect([tmp_path / "rep"])) == ["rep (2 splits) [started for 1 epoch]"]
    # Reached from inside the series' folder: its split runs are still found, and its row named.
    monkeypatch.chdir(tmp_path / "rep")
    assert [r.folder.name for r in report.collect(["."])] == ["rep"]


def test_a_search_is_a_row_per_trial_labelled_by_what_it_tried_with_those_stopped_early_marked(finished, tmp_path,
                                                                                               capsys):
    search = tmp_path / "prompts"
    (search / "trials").mkdir(parents=True)  # still running: no search.json yet
    for prompt in ("none", "coop"):
        _copy(finished, search / "trials" / f"trial-{prompt}", {"model.prompt": prompt}, {})
    # Stopped by ASHA after its first epoch: its best so far, from its last checkpoint.
    cut = _copy(finished, search / "trials" / "trial-cut", {"model.prompt": "cocoop"}, {})
    (cut / "results.json").unlink()
    info = json.loads((cut / "checkpoints" / "last" / "trainer.json").read_text())
    first = info["history"][0]
    first["eval"]["test"].update(srcc=0.123, plcc=0.456)
    info.update(next_epoch=1, history=[first], best={"epoch": 1, "value": 0.123, "eval": first["eval"]})
    (cut / "checkpoints" / "last" / "trainer.json").write_text(json.dumps(info))
    (search / "trials" / "trial-new").mkdir()  # not started: no row
    early = shutil.copytree(cut, search / "trials" / "trial-early")  # checkpointed within its first epoch: no row
    (early / "checkpoints" / "last" / "trainer.json").write_text(json.dumps({**info, "next_epoch": 0, "history": [],
                                                                              "best": None}))
    rows = report.collect([tmp_path])  # a folder holding the search, still running: it may go on
    assert report.labels(rows) == ["prompt=coop", "prompt=none", "prompt=cocoop [last checkpoint at epoch 1 of 2]"]
    assert rows[2].cells["kadid10k"]["srcc"] == (0.123, None) and rows[2].cells["kadid10k"]["plcc"] == (0.456, None)
    assert capsys.readouterr().err == "report: left out: prompts/trials/trial-early (no epoch yet); prompts/trials/" \
                                      "trial-new (no epoch yet)\n"
    damaged = cut / "checkpoints" / "last" / "trainer.json"
    damaged.write_text(json.dumps({**info, "history": None}))
    with pytest.raises(report.ConfigError, match=f"^{damaged}: not a checkpoint's trainer state"):
        report.collect([search])
    damaged.write_text(json.dumps(info))
    # Once the search is over, its search.json says whether the trial failed or was stopped (by ASHA).
    for error, said in ((None, "stopped after"), ("NonFiniteLoss: loss is nan", "failed after")):
        (search / "search.json").write_text(json.dumps({"trials": [{"trial": "trial-cut", "error": error}]}))
        assert report.labels(report.collect([search]))[2] == f"prompt=cocoop [{said} epoch 1 of 2]"
    # A trial whose loss went non-finite says so, from train's mark in its folder, with or without an epoch to show.
    (cut / "nonfinite.txt").write_text("epoch 2: the loss became non-finite on 1 of 1 process(es) (this one's: nan)")
    (early / "nonfinite.txt").write_text("epoch 1: the loss became non-finite on 1 of 1 process(es) (this one's: nan)")
    capsys.readouterr()
    assert report.labels(report.collect([tmp_path]))[2] == \
        "prompt=cocoop [loss non-finite in epoch 2, best of epochs 1-1]"
    assert "prompts/trials/trial-early (loss non-finite in epoch 1)" in capsys.readouterr().err
    # Alike but for a setting the table does not show: told apart by their folders.
    twin = _copy(finished, tmp_path / "koniq-I-again", {"data.workers": 4}, {})
    assert report.labels(report.collect([finished, twin])) == ["koniq-I", "koniq-I-again"]
    # A key an older version did not write reads as its default, not as a setting that differs.
    old = _copy(finished, tmp_path / "old", {"model.variant": "S"}, {})
    saved = yaml.safe_load((old / "config.yaml").read_text())
    del saved["model"]["layer_norm"]
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    assert report.labels(report.collect([finished, old])) == ["variant=I", "variant=S"]


def test_undefined_metrics_and_ldg_copies_take_their_places(finished, tmp_path):
    # SRCC over constant scores is undefined: results.json says null.
    run = _copy(finished, tmp_path / "constant", {"eval.ldg": True}, {})
    results = json.loads((run / "results.json").read_text())
    results["own_best"]["test-ldg"] = {**results["own_best"]["test"], "srcc": None, "pred_mean": 0.3,
                                       "target_mean": 0.4}
    results["own_best"]["csiq-ldg"] = results["own_best"]["csiq"]
    (run / "results.json").write_text(json.dumps(results))
    (row,) = report.collect([run])
    assert list(row.cells) == ["kadid10k", "csiq", "kadid10k-ldg", "csiq-ldg"]  # its own split's LDG copy named too
    assert math.isnan(row.cells["kadid10k-ldg"]["srcc"][0])
    assert "| nan / " in report.markdown([row, *report.collect([finished])], ("srcc", "plcc"), "own")
    # Fig. 11's figures: the mean prediction on the distorted images beside the mean of their targets, none of them
    # a best.
    text = report.markdown([row, row], ("pred_mean", "target_mean"), "own")
    assert "| 0.3000 / 0.4000 |" in text and "**" not in text


def test_report_reads_the_checkpoint_file_train_writes():
    from temu_dist.checkpoint import TRAINER_INFO

    assert report._TRAINER_INFO == TRAINER_INFO  # kept apart only so that report does not import torch


def test_report_reads_the_mark_train_leaves_where_the_loss_went_non_finite():
    from temu_dist.train import NONFINITE

    assert report._NONFINITE == NONFINITE


def test_what_is_not_a_finished_run_is_one_line_naming_it(finished, tmp_path, capsys):
    unfinished = tmp_path / "cut"
    (unfinished / "checkpoints").mkdir(parents=True)
    assert report.main([str(unfinished)]) == 1
    assert capsys.readouterr().err == f"report: {unfinished}: has not finished (no results.json): rerun its train " \
                                      "command to go on\n"
    # Stopped by a non-finite loss, which a rerun would replay.
    (unfinished / "nonfinite.txt").write_text("epoch 3: the loss became non-finite on 2 of 2 process(es) (this one's: "
                                              "nan); stopped.")
    assert report.main([str(unfinished)]) == 1
    assert capsys.readouterr().err == f"report: {unfinished}: has not finished: its loss non-finite in epoch 3 (no " \
                                      "results.json); start it anew (train.resume=never) with a lower train.lr or " \
                                      "another seed\n"
    # Still training: rerunning its train command would be refused, and it needs none.
    from temu_dist import lock

    held = lock.take(unfinished / "train.lock")
    try:
        assert report.main([str(unfinished)]) == 1
        assert capsys.readouterr().err == f"report: {unfinished}: still training (pid {os.getpid()} on " \
            f"{socket.gethostname()}, since {(unfinished / 'train.lock').read_text().split(', since ')[1].strip()}): " \
            "no results.json until it finishes\n"
    finally:
        lock.let_go(held)
    assert "has not finished" in (report.main([str(unfinished)]), capsys.readouterr().err)[1]
    # Only its own splits scored, --cross-only has nothing to lay out: said, not an empty table.
    own_only = _copy(finished, tmp_path / "own-only", {"eval.cross": []}, {})
    results = json.loads((own_only / "results.json").read_text())
    for part in (results["best"], results["own_best"], *(h["eval"] for h in results["history"])):
        del part["csiq"]
    (own_only / "results.json").write_text(json.dumps(results))
    assert report.main([str(own_only), "--cross-only"]) == 1
    assert capsys.readouterr().err == "report: --cross-only: no run here was scored on a set other than its own " \
                                      "(eval.cross, or evaluate --shards): nothing to lay out\n"
    _copy(finished, tmp_path / "done", {}, {})
    assert report.main([str(tmp_path)]) == 0
    assert "report: left out: cut (loss non-finite in epoch 3)\n" in capsys.readouterr().err
    assert report.main([str(tmp_path / "nothing")]) == 1
    assert capsys.readouterr().err == f"report: {tmp_path / 'nothing'}: no such run or folder\n"
    (tmp_path / "list.json").write_text("[]")
    assert report.main([str(tmp_path / "list.json")]) == 1
    assert capsys.readouterr().err == f"report: {tmp_path / 'list.json'}: not a file `python -m temu_dist.evaluate " \
                                      "--out` wrote (no rows and config)\n"
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 1
    assert "no results.json (a finished run), repeat.json (a finished repeat series) or search" in \
        capsys.readouterr().err
    (tmp_path / "empty" / "trials").mkdir(parents=True)
    assert report.main([str(tmp_path / "empty")]) == 1
    assert capsys.readouterr().err.endswith("empty: no finished run, series or trial to report\n")
    old = shutil.copytree(finished, tmp_path / "old")
    results = json.loads((old / "results.json").read_text())
    del results["own_best"]
    (old / "results.json").write_text(json.dumps(results))
    assert report.main([str(old)]) == 1
    assert capsys.readouterr().err.startswith(f"report: {old / 'results.json'}: no own_best")
    assert report.main([str(old), "--each-at", "key"]) == 0
    for flag, path, said in (("--out", "t.txt", "a .md or .csv or .tex file"), ("--plot", "t.jpg", "a .png file"),
                             ("--out", "no/t.md", f"no folder {tmp_path / 'no'}"),
                             ("--out", "dir.md", "it is a folder, not a file")):
        (tmp_path / "dir.md").mkdir(exist_ok=True)
        capsys.readouterr()
        assert report.main([str(finished), flag, str(tmp_path / path)]) == 1
        assert capsys.readouterr() == ("", f"report: {flag} {tmp_path / path}: {said}\n")  # before any table


def test_a_folder_of_runs_is_searched_in_its_subfolders_as_names_a_b_make_them_but_not_mlflows_store(
        finished, tmp_path, capsys):
    # A search named ablations/prompts sits in runs/ablations/; MLflow's artifact store logs results.json files too.
    search = tmp_path / "runs" / "ablations" / "prompts"
    _copy(finished, search / "trials" / "trial-coop", {"model.prompt": "coop"}, {})
    (search / "trials" / "trial-nan").mkdir()
    (search / "search.json").write_text(json.dumps({"trials": [{"trial": "trial-coop", "error": None},
                                                               {"trial": "trial-nan", "error": "NonFiniteLoss: nan"}]}))
    _copy(finished, tmp_path / "runs" / "mlartifacts" / "1" / "abc" / "artifacts", {"model.prompt": "none"}, {})
    # Deeper down such a name is a run's own (name=abl/mlruns).
    _copy(finished, tmp_path / "runs" / "abl" / "mlruns", {"model.prompt": "cocoop"}, {})
    # Beside them, a file evaluate --out wrote (as the README writes runs/table11.json), and a JSON file of another's.
    evaluated = {"scored": {"clipiqa": "c"}, "config": yaml.safe_load((finished / "config.yaml").read_text()),
                 "rows": {"CLIP-IQA c": json.loads((finished / "results.json").read_text())["best"]}}
    (tmp_path / "runs" / "ablations" / "table11.json").write_text(json.dumps(evaluated))
    (tmp_path / "runs" / "notes.json").write_text(json.dumps({"rows": "not evaluate's"}))
    rows = report.collect([tmp_path / "runs"])
    assert [r.folder for r in rows] == [tmp_path / "runs" / "abl" / "mlruns", search / "trials" / "trial-coop",
                                        tmp_path / "runs" / "ablations" / "table11.json"]
    assert rows[2].label == "CLIP-IQA c"
    assert capsys.readouterr().err == "report: left out: ablations/prompts/trials/trial-nan (failed)\n"


def _trained_on_csiq(finished, tmp_path):
    """The fixture's run as if trained on CSIQ, with a cross-dataset set named after the fixture's dataset (SRCC
    0.01): the two runs' own and cross sets share columns, as Table 8's runs on each training set do."""
    other = _copy(finished, tmp_path / "csiq-I", {"data.train": str(tmp_path / "shards" / "csiq")}, {})
    results = json.loads((other / "results.json").read_text())
    for key in ("own_best", "best"):
        results[key]["kadid10k"] = {**results[key].pop("csiq"), "srcc": 0.01}
    (other / "results.json").write_text(json.dumps(results))
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["eval"]["cross"][0]["name"] = "kadid10k"
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    return other


def test_a_runs_own_test_split_beside_other_runs_cross_sets_is_marked_and_bolded_among_its_kind(finished, tmp_path,
                                                                                               capsys):
    # Table 8: a KonIQ-trained run's own test split would share the koniq10k column with the SPAQ-trained run's
    # cross-dataset koniq10k, and outshine it.
    other = _trained_on_csiq(finished, tmp_path)
    assert report.main([str(finished), str(other)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| run | kadid10k | csiq |"
    own = json.loads((finished / "results.json").read_text())["own_best"]["test"]
    assert out[2].startswith(f"| train=kadid10k | **{own['srcc']:.4f}*** / ")
    assert out[3].startswith("| train=csiq | **0.0100** / ")
    assert "*: the run's own test split, in a column of other runs' cross-dataset sets" in out[-1]
    assert report.main([str(finished), str(other), "--cross-only"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[0].strip("| ").split(" | ")
    cells = [dict(zip(header, line.strip("| ").split(" | "))) for line in out[2:4]]
    assert sorted(header) == ["csiq", "kadid10k", "run"] and "own test split" not in out[-1]
    cross = json.loads((finished / "results.json").read_text())["own_best"]["csiq"]["srcc"]
    assert [(c["run"], c["kadid10k"].split(" / ")[0], c["csiq"].split(" / ")[0]) for c in cells] == [
        ("train=kadid10k", "-", f"**{cross:.4f}**"), ("train=csiq", "**0.0100**", "-")]


def test_a_layer_plot_draws_each_set_against_the_layer_of_single_layer_runs(finished, tmp_path, capsys):
    # Seed Fig. 8: a model per single layer K, its SRCC on each test set against K.
    runs = [_copy(finished, tmp_path / f"only{k}", {"model.layers": f"only:{k}"},
                  {"own_best": {"test": {"srcc": 0.1 * k}, "csiq": {"srcc": 0.2 * k}}}) for k in (1, 2, 3)]
    assert report.main([*map(str, runs), "--layer-plot", str(tmp_path / "layers.png")]) == 0
    assert capsys.readouterr().err == f"report: layer plot in {tmp_path / 'layers.png'}\n"
    assert Image.open(tmp_path / "layers.png").size[0] > 300
    lines = report.layer_points(report.collect(runs), "srcc")
    assert {name: [(k, round(v, 4)) for k, v in sorted(points)] for name, points in lines.items()} == {
        "kadid10k": [(1, 0.1), (2, 0.2), (3, 0.3)], "csiq": [(1, 0.2), (2, 0.4), (3, 0.6)]}
    # A search of prompts by layers: a line per prompt, where two rows at one layer were refused as a zig-zag.
    coop = [_copy(finished, tmp_path / f"coop{k}", {"model.layers": f"only:{k}", "model.prompt": "none"},
                  {"own_best": {"test": {"srcc": 0.05 * k}, "csiq": {"srcc": 0.1}}}) for k in (1, 2)]
    lines = report.layer_points(report.collect([*runs, *coop]), "srcc")
    assert {name: len(points) for name, points in lines.items()} == {
        "kadid10k (prompt=cocoop)": 3, "csiq (prompt=cocoop)": 3, "kadid10k (prompt=none)": 2, "csiq (prompt=none)": 2}
    # A run's epochs at one layer would draw a zig-zag through it.
    assert report.main([*map(str, runs), "--by-epoch", "--layer-plot", str(tmp_path / "epochs.png")]) == 1
    assert capsys.readouterr().err.startswith("report: --layer-plot: two rows at layer 1 for ")
    assert report.main([str(finished), "--layer-plot", str(tmp_path / "none.png")]) == 1
    assert capsys.readouterr().err.startswith("report: --layer-plot: no row has model.layers only:K or upto:K with a "
                                              "srcc (they have ")
    assert not (tmp_path / "none.png").exists()


def test_runs_alike_but_for_their_training_set_merge_into_one_row_as_the_seeds_tables_print_a_model(finished, tmp_path,
                                                                                                     capsys):
    # Tables 5, 7 and 8: a row per model, its KonIQ-trained and FLIVE-trained runs side by side.
    other = _trained_on_csiq(finished, tmp_path)
    variant_s = _copy(finished, tmp_path / "kadid-S", {"model.variant": "S"}, {})
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["train"]["epochs"] = 1  # FLIVE's 5 epochs beside KonIQ-10k's 30: one model still
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    rows = report.merge_train(report.collect([finished, other, variant_s]))
    assert report.labels(rows) == ["variant=I", "variant=S"]
    assert list(rows[0].cells) == ["kadid10k", "kadid10k→csiq", "csiq", "csiq→kadid10k"]
    assert rows[0].cells["csiq→kadid10k"]["srcc"] == (0.01, None) and rows[0].own == {"kadid10k", "csiq"}
    assert list(rows[1].cells) == ["kadid10k", "kadid10k→csiq"]
    assert report.main([str(finished), str(other), "--merge-train", "--cross-only", "--out", str(tmp_path / "t.tex")]) \
        == 0
    assert capsys.readouterr().out.splitlines()[0] == "| run | kadid10k→csiq | csiq→kadid10k |"
    tex = (tmp_path / "t.tex").read_text()
    assert "kadid10k$\\rightarrow$csiq" in tex and "XeLaTeX" not in tex  # pdfLaTeX builds it
    # A run extended on one training set: the merged row says on which.
    results = json.loads((other / "results.json").read_text())
    (other / "results.json").write_text(json.dumps({**results, "extended": [{"epochs_from": 1}]}))
    assert report.labels(report.merge_train(report.collect([finished, other]))) == \
        ["koniq-I+csiq-I [started for 1 epoch on csiq]"]
    # A row per model and epoch; a model's row with nothing to tell it apart is named after its runs.
    rows = report.merge_train(report.by_epoch(report.collect([finished, other])))
    assert report.labels(rows) == [f"koniq-I+csiq-I [epoch {n}] [started for 1 epoch on csiq]" for n in (1, 2)]
    # Two runs of one model on one training set: which to show is the user's to say.
    twin = _copy(finished, tmp_path / "again", {}, {})
    assert report.main([str(finished), str(twin), "--merge-train"]) == 1
    assert capsys.readouterr().err == f"report: --merge-train: {finished} and {twin} are one model (model.* and " \
                                      "ldg.* alike) trained on kadid10k twice: name one\n"


def test_by_epoch_gives_a_row_per_epoch_of_a_run_with_every_set_as_scored_then(finished, tmp_path, capsys):
    # Table 9 read off one run: its epochs as rows.
    history = json.loads((finished / "results.json").read_text())["history"]
    assert report.main([str(finished), "--by-epoch"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in out[2:4]] == ["| koniq-I [epoch 1]", "| koniq-I [epoch 2]"]
    assert f"| {history[0]['eval']['test']['srcc']:.4f}" in out[2].replace("**", "")
    assert out[-1] == "SRCC / PLCC; every set as scored after the row's epoch"
    assert report.main([str(finished), "--by-epoch", "2"]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if "[epoch" in line][0].startswith(
        "| koniq-I [epoch 2] |")
    # An epoch the run has not: said, not an empty table.
    assert report.main([str(finished), "--by-epoch", "2", "7"]) == 1
    assert capsys.readouterr().err == f"report: {finished / 'results.json'}: --by-epoch 7: no such epoch in its " \
                                      "history (it has 1, 2)\n"
    results = json.loads((finished / "results.json").read_text())
    (tmp_path / "empty").mkdir()
    shutil.copy(finished / "config.yaml", tmp_path / "empty" / "config.yaml")
    (tmp_path / "empty" / "results.json").write_text(json.dumps({**results, "history": []}))
    assert report.main([str(tmp_path / "empty"), "--by-epoch"]) == 1
    assert capsys.readouterr().err == f"report: {tmp_path / 'empty' / 'results.json'}: --by-epoch: no epochs in its " \
                                      "history\n"
    # Renamed, a run's epochs keep their one name.
    assert report.main([str(finished), "--by-epoch", "--rename", "koniq-I", "TeMu-IQA-I"]) == 0
    assert "| TeMu-IQA-I [epoch 2] |" in capsys.readouterr().out


def test_the_fitted_plcc_evaluate_wrote_is_a_metric_of_the_table(finished, tmp_path, capsys):
    best = json.loads((finished / "results.json").read_text())["best"]
    fitted = {name: {**metrics, "plcc_fit": 0.5 + i / 10} for i, (name, metrics) in enumerate(best.items())}
    evaluated = {"scored": {"checkpoint": str(finished)}, "rows": {"fitted": fitted},
                 "config": yaml.safe_load((finished / "config.yaml").read_text())}
    (tmp_path / "fitted.json").write_text(json.dumps(evaluated))
    assert report.main([str(tmp_path / "fitted.json"), str(finished), "--metrics", "srcc", "plcc_fit"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| run | kadid10k | csiq |"
    # A run scored without eval.plcc_fit holds no fitted PLCC: its cells say so.
    test, csiq = f"**{best['test']['srcc']:.4f}**", f"**{best['csiq']['srcc']:.4f}**"
    assert out[2:4] == [f"| koniq-I | {test} / - | {csiq} / - |", f"| fitted | {test} / 0.5000 | {csiq} / 0.6000 |"]
    assert out[-1].startswith("SRCC / PLCC_FIT; ")
