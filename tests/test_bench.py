"""The benchmark suites run end to end on tiny inputs and report what they promise; no figure is judged here."""
import json

import pytest

from temu_dist.bench import data, model, scale, step
from temu_dist.bench.__main__ import main


def test_cli_writes_the_result_it_prints(tmp_path, capsys):
    out = tmp_path / "cw.json"
    assert main(["cw_ssim", "--pairs", "2", "--repeat", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["suite"] == "cw_ssim" and json.dumps(result, indent=2) in capsys.readouterr().out
    cpu = result["rows"][0]
    assert cpu["max_abs_diff"]["cw_ssim"] < 1e-3 and cpu["ours_pairs_per_s"]["cw_ssim"] > 0
    # IQA-PyTorch computes in float64: ours is timed so too, and agrees closer there.
    assert cpu["pyiqa"].endswith(", float64") and cpu["speedup_float64"]["cw_ssim"] > 0
    assert cpu["max_abs_diff_float64"]["cw_ssim"] < 1e-5


def test_dataset_needs_its_root():
    with pytest.raises(SystemExit):
        main(["data", "--dataset", "koniq10k"])


@pytest.mark.parametrize(("argv", "says"), [
    (["cw_ssim", "--pairs", "0"], "argument --pairs: at least 1, not 0"),
    (["cw_ssim", "--repeat", "0"], "argument --repeat: at least 1, not 0"),
    (["scale", "--sizes", "10", "0"], "argument --sizes: at least 1, not 0"),
    (["step", "--steps", "0"], "argument --steps: at least 1, not 0"),
    (["data", "--feed", "0"], "argument --feed: more than 0, not 0"),
    # Another suite's option would be ignored without a word.
    (["cw_ssim", "--batch", "7"], "--batch: the cw_ssim suite does not read it"),
])
def test_options_are_checked_before_a_suite_runs(argv, says, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {says}")


def test_an_out_file_that_cannot_be_written_is_refused_before_the_suite_runs(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["cw_ssim", "--pairs", "2", "--repeat", "1", "--out", str(tmp_path / "file" / "x.json")]) == 1
    assert capsys.readouterr() == ("", f"bench: --out {tmp_path / 'file'}: it is a file, not a folder\n")
    assert main(["cw_ssim", "--pairs", "2", "--repeat", "1", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr() == ("", f"bench: --out {tmp_path}: a folder; name a file\n")
    assert main(["cw_ssim", "--pairs", "2", "--repeat", "1", "--out", str(tmp_path / "new" / "x.json")]) == 0
    assert json.loads((tmp_path / "new" / "x.json").read_text())["suite"] == "cw_ssim"


def test_a_release_that_is_not_there_is_one_line_and_a_failed_row_fails_the_command(tmp_path, capsys):
    assert main(["data", "--dataset", "koniq10k", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bench: ") and "koniq10k_scores_and_distributions.csv not found" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["step", "--backbone", "nope", "--batch", "1", "--image-size", "32", "--variants", "S",
                 "--prompts", "none"]) == 1
    out, err = capsys.readouterr()
    assert '"error": "ConfigError: model.backbone: unknown open_clip model' in out  # the rows are still printed
    assert err.startswith("bench: 1 of 1 rows failed, the first with ConfigError: model.backbone")


def test_step_suite_rows():
    result = step.run("Test-Tiny-ViT-16", 64, 2, 3, 1, "auto", ["eager"], ["I"], ["none", "coop", "cocoop"], 2.0,
                      profile_top=5)  # 3 timed steps: a median between the fastest and the slowest
    rows = {r["prompt"]: r for r in result["rows"]}
    assert set(rows) == {"none", "coop", "cocoop"} and result["peak_source"] == "given"
    assert {r["mode"] for r in rows.values()} == {"eager"}
    assert rows["none"]["text_gflops_per_step"] == 0 < rows["cocoop"]["text_gflops_per_step"]
    for r in rows.values():
        assert r["step_s"] > 0 and r["tower_images_per_s"] == pytest.approx(2 * r["samples_per_s"], rel=0.01)
        assert r["step_s_range"][0] <= r["step_s"] <= r["step_s_range"][1]
        assert 0 < r["mfu"] <= r["mfu_all"]
        ops = r["profile"]["ops"]
        assert len(ops) == 5 and ops[0]["self_ms"] >= ops[-1]["self_ms"] > 0 and sum(o["share"] for o in ops) <= 1.001
    ratio = rows["cocoop"]["step_s"] / rows["coop"]["step_s"]
    assert result["cocoop_over_coop"] == {"I eager fp32": pytest.approx(ratio, abs=1e-3)}


def test_step_suite_compares_compile_modes_on_the_same_machine():
    result = step.run("Test-Tiny-ViT-16", 64, 2, 1, 1, "auto", ["eager", "default"], ["S"], ["none"], 2.0)
    assert [r["mode"] for r in result["rows"]] == ["eager", "default"]
    assert all(r["step_s"] > 0 for r in result["rows"])


def test_step_suite_forces_the_attention_kernel_asked_for_on_the_steps_only(monkeypatch):
    import torch

    def flags():
        return torch.backends.cuda.flash_sdp_enabled(), torch._inductor.config.force_disable_caches

    real_build, real_loss, built, stepped = step.build_model, step.loss_fn, [], []
    monkeypatch.setattr(step, "build_model", lambda *a, **k: built.append(flags()) or real_build(*a, **k))
    monkeypatch.setattr(step, "loss_fn", lambda *a, **k: stepped.append(flags()) or real_loss(*a, **k))
    result = step.run("Test-Tiny-ViT-16", 64, 2, 1, 1, "auto", ["eager"], ["S"], ["none", "coop", "cocoop"], 2.0,
                      sdpa=("math", "cudnn"))
    math_rows, cudnn_rows = result["rows"][:3], result["rows"][3:]
    assert all(r["sdpa"] == "math" and r["step_s"] > 0 for r in math_rows)
    # A CPU has no cuDNN kernel: forced, the step has none left to run.
    assert all(r["sdpa"] == "cudnn" and "No viable backend" in r["error"] for r in cudnn_rows)
    assert list(result["cocoop_over_coop"]) == ["S eager fp32 math"]
    # Built as usual (prompts without tuning are encoded then, on the CPU), stepped forced and compiled afresh:
    # inductor's caches would hand a compiled row a graph traced with another kernel.
    assert set(built) == {(True, False)} and len(built) == 6 and set(stepped) == {(False, True)}
    stepped.clear()
    assert step.run("Test-Tiny-ViT-16", 64, 2, 1, 1, "auto", ["eager"], ["S"], ["none"], 2.0)["rows"][0]["sdpa"] == \
        "default" and set(stepped) == {(True, False)}


def test_step_suite_compares_the_fp8_tower_with_the_bf16_one():
    result = step.run("Test-Tiny-ViT-16", 64, 2, 1, 1, "bf16", ["eager"], ["S"], ["none"], 2.0,
                      towers=("plain", "fp8"))
    bf16, fp8 = result["rows"]
    assert (bf16["tower"], fp8["tower"]) == ("bf16", "fp8") and bf16["step_s"] > 0 and fp8["step_s"] > 0
    # A plain row is named by the dtype it ran in (fp32: auto on a CPU).
    assert step.run("Test-Tiny-ViT-16", 64, 2, 1, 1, "auto", ["eager"], ["S"], ["none"], 2.0)["rows"][0]["tower"] == \
        "fp32"
    # fp8 keeps 3 mantissa bits to bf16's 8: a few percent off on every layer, not more, and not nothing.
    errors = result["fp8_tokens_rel_rms"]
    assert len(errors) == 4 and all(0.001 < e < 0.1 for e in errors)
    assert result["fp8_tokens_rel_rms_worst"] == max(errors) and result["fp8_gemm_tflops"] > 0


def test_a_row_that_fails_is_recorded_and_the_other_rows_still_run(monkeypatch):
    real = step.measure

    def measure(config, *args, **kwargs):
        if config.model.compile:
            raise RuntimeError("no CUDA graphs on this device")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(step, "measure", measure)
    result = step.run("Test-Tiny-ViT-16", 64, 2, 1, 1, "auto", ["reduce-overhead", "eager"], ["S"], ["none"], 2.0)
    failed, timed = result["rows"]
    assert failed == {"variant": "S", "prompt": "none", "mode": "reduce-overhead", "tower": "fp32", "sdpa": "default",
                      "error": "RuntimeError: no CUDA graphs on this device"}
    assert timed["mode"] == "eager" and timed["step_s"] > 0 and timed["mfu"] > 0


def test_datasheet_peak_is_only_claimed_for_known_gpus():
    import torch

    assert step.datasheet_peak(torch.device("cpu"), torch.bfloat16) is None
    names = [key for key, _ in step.PEAK_BF16_TFLOPS]
    # A more specific name must come before any name it contains, or it would never match.
    for i, key in enumerate(names):
        assert not any(other in key for other in names[:i]), key


def test_data_suite_counts_workers_to_feed(tmp_path):
    result = data.run([0, 1], 1, 64, 32, feed=1000.0)
    assert {(r["source"], r["workers"]) for r in result["rows"]} == {
        (s, w) for s in ("shards", "loose files", "shards, passed over on resume") for w in (0, 1)}
    assert all(r["images"] == 32 for r in result["rows"])
    one = next(r for r in result["rows"] if r["source"] == "shards" and r["workers"] == 1)
    assert result["workers_to_feed"] >= 1000 / one["images_per_s"]
    assert set(result["stage_ms_per_sample"]) == {"read", "decode", "resize", "local_distortion"}


def test_workers_to_feed_is_measured_where_a_row_fed_it_and_estimated_from_the_most_workers_else():
    rows = [{"source": s, "workers": w, "images_per_s": rate, "per_worker": rate / max(w, 1)}
            for s in ("shards", "loose files") for w, rate in ((0, 70.0), (1, 80.0), (8, 400.0), (15, 720.0))]
    assert data.workers_to_feed(rows, 375.0) == {"workers_to_feed": 8, "workers_to_feed_from": "measured"}
    # 1000 / 48 per worker among 15, not 1000 / 80 alone
    assert data.workers_to_feed(rows, 1000.0) == {
        "workers_to_feed": 21, "workers_to_feed_from": "estimated from the rate per worker of 15 workers"}
    assert data.workers_to_feed(rows[:1], 375.0) == {}


def test_scale_suite_packs_and_evaluates_every_sample(tmp_path):
    result = scale.run([300], str(tmp_path / "new"))  # a --workdir not there yet is made
    assert [(r["stage"], r["samples"]) for r in result["rows"]] == [("pack", 300), ("evaluate", 300)]
    assert all(r["main_mib"] > 0 for r in result["rows"])
    assert list((tmp_path / "new").iterdir()) == []  # the synthetic set is removed


def test_model_suite_times_each_variant_and_prompt_next_to_open_clip():
    result = model.run(["TeMu-Tiny-ViT-16"], 64, 1)
    rows = {(r["variant"], r["prompt"]): r for r in result["rows"]}
    assert set(rows) == {(v, p) for v in "SI" for p in ("none", "coop", "cocoop")}
    for variant in "SI":
        assert rows[variant, "none"]["trainable"] < rows[variant, "coop"]["trainable"] \
            < rows[variant, "cocoop"]["trainable"]
    assert all(r["forward_s_batch1"] > 0 and r["open_clip_encode_image_s"] > 0 for r in rows.values())
