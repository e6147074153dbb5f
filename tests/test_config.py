import re
from pathlib import Path

import pytest

from temu_dist.config import Config, ConfigError, dump, load_config
from temu_dist.tune import load_search

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers():
    c = load_config()
    assert (c.model.backbone, c.model.pretrained, c.model.image_size) == ("ViT-L-14", "openai", 448)
    # CoCoOp: Table 7's TeMu-IQA-I on KonIQ-10k (0.946/0.957) is Table 5's option (3).
    assert (c.model.layers, c.model.variant, c.model.prompt) == ("all", "I", "cocoop")
    assert c.model.prompt_pairs == [("Good photo.", "Bad photo.")]


def test_yaml_then_dotted_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: x\nmodel:\n  variant: S\n  layers: upto:14\n")
    c = load_config(path, ["model.prompt=cocoop", "model.image_size=[384, 512]", "seed=7"])
    assert (c.name, c.seed, c.model.variant, c.model.layers, c.model.prompt) == ("x", 7, "S", "upto:14", "cocoop")
    assert c.model.image_hw() == (384, 512)


@pytest.mark.parametrize("overrides, names", [
    (["model.imag_size=448"], "model.imag_size: unknown key"),
    (["model.image_size=big"], "model.image_size"),
    (["model.variant=X"], "model.variant"),
    (["model.layers=upto:0"], "model.layers"),
    (["model.layers=some"], "model.layers"),
    (["trainer.lr=0.1"], "trainer: unknown key"),
    (["model.n_ctx=0"], "model.n_ctx"),
    (["eval.cross=[{name: k, shards: s, image_size: 8}]"], "eval.cross.0.image_size: 8 is too small"),
    (["model.image_size=[64, 64, 64]"], "model.image_size: expected int or tuple[int, int] (got [64, 64, 64])"),
    (["model.quick_gelu=maybe"], "model.quick_gelu: expected bool or literal['auto'] (got 'maybe')"),
    (["model.layers=[1"], "override model.layers=[1: the value is not valid YAML"),
    # Values torch, numpy or the stream would fail on, or quietly take for something else.
    (["seed=-1"], "seed: Input should be greater than or equal to 0"),
    (["train.lr=-1"], "train.lr"),
    (["train.weight_decay=-1"], "train.weight_decay"),
    (["train.max_steps_per_epoch=0"], "train.max_steps_per_epoch"),
    (["train.per_device_batch=0"], "train.per_device_batch"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["ldg.ops=-1"], "ldg.ops"),
    # A misspelt split was left out of evaluation without a word (only the pack's splits are scored).
    (["eval.splits=[val, tset]"], "eval.splits.1: Input should be 'train', 'val' or 'test' (got 'tset')"),
    (["data.train_split=tarin"], "data.train_split"),
    (["eval.cross=[{name: k, shards: s, split: tst}]"], "eval.cross.0.split"),
    # The run's folder is out_dir/NAME: one that leaves it would write elsewhere.
    (["name=../esc"], "name: '../esc' is no folder under out_dir: the work goes to out_dir/NAME (set "
                      "out_dir for where)"),
    (["name=/tmp/x"], "name: '/tmp/x' is no folder under out_dir"),
    (["name=a/../../b"], "name: 'a/../../b' is no folder under out_dir"),
])
def test_bad_values_fail_in_one_line_naming_the_key(overrides, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert names in message
    assert "\n" not in message


def test_bad_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  variant: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML at line 3, column 1"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"{tmp_path}: cannot read the config file"):
        load_config(tmp_path)
    path.write_bytes(b"model: {variant: \xff\xfe}\n")
    with pytest.raises(ConfigError, match="bad.yaml: cannot read the config file"):
        load_config(path)
    path.write_text("model:\n  prompt: coopp\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid config: model.prompt"):
        load_config(path)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_search_space_values_are_checked_against_the_training_config(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"base: {REPO / 'configs' / 'demo.yaml'}\nspace:\n  model.layers: {{grid: [all, 'upto:x']}}\n")
    with pytest.raises(ConfigError, match="model.layers"):
        load_search(path)
    path.write_text(f"base: {REPO / 'configs' / 'demo.yaml'}\nspace:\n  model.promt: {{grid: [none]}}\n")
    with pytest.raises(ConfigError, match=f"{path} space .*model.promt: unknown key"):
        load_search(path)
    path.write_text(f"base: {REPO / 'configs' / 'demo.yaml'}\nspace:\n  train.lr: {{normal: [0, 1]}}\n")
    with pytest.raises(ConfigError, match="space.train.lr: expected one of grid"):
        load_search(path)
    for bad in ("{uniform: [0.1]}", "{loguniform: [0.1, 0.01]}", "{randint: [a, b]}", "{grid: []}"):
        path.write_text(f"base: {REPO / 'configs' / 'demo.yaml'}\nspace:\n  train.lr: {bad}\n")
        with pytest.raises(ConfigError, match=f"{path}: space.train.lr: .* takes "):
            load_search(path)
    path.write_text(f"base: {REPO / 'configs' / 'demo.yaml'}\nspace:\n  train.lr: {{grid: [0.1]}}\n")
    with pytest.raises(ConfigError, match=r"name: '\.\./x' is no folder under out_dir"):
        load_search(path, ["name=../x"])  # the search's folder is out_dir/NAME too
    with pytest.raises(ConfigError, match=r"num_sample: unknown key \(did you mean num_samples\?\)$"):
        load_search(path, ["num_sample=2"])
    with pytest.raises(ConfigError, match=r"asha.grace_perod: unknown key \(did you mean asha.grace_period\?\)$"):
        load_search(path, ["asha.grace_perod=2"])


def test_override_must_be_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.prompt"])
    with pytest.raises(ConfigError, match="model.variant"):
        load_config(None, ["model.variant.x=1"])
    # A list's item is not set on its own: the message says how to set the list.
    with pytest.raises(ConfigError, match=r"^override 'eval.cross.0.name=csiq': eval.cross is a list, set whole, e.g. "
                                          r"'eval.cross=\[\.\.\.\]'$"):
        load_config(None, ["eval.cross.0.name=csiq"])
    for not_a_list in ("train.0=3", "model.n_ctx.0=1"):  # no list there: not said to be one
        with pytest.raises(ConfigError) as err:
            load_config(None, [not_a_list])
        assert "is a list" not in str(err.value)


@pytest.mark.parametrize(("overrides", "says"), [
    (["model.ctx_init="], "model.ctx_init: String should have at least 1 character"),
    (["model.prompt=none", "model.ctx_init=a photo of a"], "model: ctx_init 'a photo of a' shapes a "
                                                           "learned context, which prompt none has none of"),
    (["model.prompt=none", "model.class_position=middle"], "model: class_position 'middle' shapes a "
                                                           "learned context, which prompt none has none of: set "
                                                           "model.prompt to coop or cocoop, or leave class_position "
                                                           "out"),
])
def test_context_words_need_a_learned_context(overrides, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(None, overrides)


@pytest.mark.parametrize(("override", "says"), [
    ("train.epoch=3", "train.epoch: unknown key (did you mean train.epochs?)"),
    ("model.varient=S", "model.varient: unknown key (did you mean model.variant?)"),
    ("model.colour=red", "model.colour: unknown key"),  # nothing close: no guess
    # A list item's keys: eval.cross.image_size is no key to give.
    ("eval.cross=[{name: k, shards: s, imge_size: 64}]", "eval.cross.0.imge_size: unknown key"),
])
def test_a_misspelt_key_is_named_with_the_key_it_may_mean(override, says):
    with pytest.raises(ConfigError, match=re.escape(says) + "$"):
        load_config(None, [override])


def test_a_name_may_group_runs_in_a_folder_of_out_dir():
    assert load_config(None, ["name=ablations/coop"]).run_dir() == Path("runs/ablations/coop")


def test_overrides_leave_the_base_they_start_from_untouched():
    base = dump(load_config())
    load_config(None, ["model.prompt=coop", "train.lr=0.1"], base=base)
    assert base == dump(load_config())


def test_resolved_copy_reloads_to_the_same_config():
    c = load_config(None, ["model.layers=only:13", "model.prompt_pairs=[[High quality., Low quality.]]"])
    assert load_config(None, (), base=dump(c)) == c


TRAINING_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "tune")


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "tune").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_search_is_valid(path):
    search = load_search(path)
    assert Path(search.base).is_file() and search.space
