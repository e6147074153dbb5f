from temu_dist.config import dump
from temu_dist.tracking import flatten
from tests.conftest import tiny_config


def test_params_are_flat_with_each_cross_set_field_a_key_of_its_own():
    config = tiny_config("eval.cross=[{name: csiq, shards: s/csiq}, {name: live, shards: s/live, split: all}]")
    params = flatten(dump(config))
    assert params["model.backbone"] == "Test-Tiny-ViT-16" and params["train.lr"] == config.train.lr
    assert params["eval.cross.0.name"] == "csiq" and params["eval.cross.1.split"] == "all"
    assert params["eval.splits"] == ["val", "test"] and "eval.cross" not in params
