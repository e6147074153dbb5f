import json
import re

import pytest
import torch
from safetensors import safe_open

from temu_dist.config import ConfigError
from temu_dist.model.io import load_model, save_model
from temu_dist.model.temu import build_model
from tests.conftest import tiny_config


def _trained(*overrides):
    config = tiny_config(*overrides)
    model = build_model(config)
    # Move every trainable parameter off its initial value, so a reload that re-initialises would be caught.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval(), config


@pytest.mark.parametrize("overrides", [("model.prompt=none", "model.variant=S"),
                                       ("model.prompt=coop", "model.layers=upto:3"),
                                       ("model.prompt=cocoop", "model.layer_norm=true")])
def test_round_trip_gives_identical_scores(tmp_path, overrides):
    model, config = _trained(*overrides)
    save_model(model, config, tmp_path / "run")
    x = torch.randn(2, 3, 64, 64)
    loaded, loaded_config = load_model(tmp_path / "run")
    assert loaded_config == config
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).score, model(x).score, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x).patch_scores, model(x).patch_scores, rtol=0, atol=0)


def test_files_hold_only_trainable_tensors_and_the_resolved_config(tmp_path):
    model, config = _trained("model.prompt=coop")
    save_model(model, config, tmp_path)
    with safe_open(str(tmp_path / "weights.safetensors"), "pt") as fh:
        assert set(fh.keys()) == {"layer_logits", "log_tau_w", "prompts.ctx"}
    assert json.loads((tmp_path / "config.json").read_text())["model"]["prompt"] == "coop"
    assert not list(tmp_path.glob("*.tmp"))


def test_override_of_a_weight_shaping_field_is_named(tmp_path):
    model, config = _trained("model.prompt=none")
    save_model(model, config, tmp_path)
    with pytest.raises(ConfigError, match=r"config.json: checkpoint has model.prompt='none' but model.prompt='coop'"):
        load_model(tmp_path, ["model.prompt=coop"])
    # Where the frozen weights come from, and the input size, may change at load time.
    loaded, loaded_config = load_model(tmp_path, ["model.image_size=128"])
    assert loaded_config.model.image_size == 128 and loaded.backbone.grid == (8, 8)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'} \\+ overrides: invalid config: eval.batch_size"):
        load_model(tmp_path, ["eval.batch_size=abc"])


def test_a_random_backbone_reloads_as_drawn_at_any_input_size_or_seed(tmp_path):
    model, config = _trained("model.prompt=coop")
    save_model(model, config, tmp_path)
    loaded, loaded_config = load_model(tmp_path, ["model.image_size=128", "seed=7"])
    assert loaded_config.model.image_size == 128 and loaded.backbone.grid == (8, 8)
    # The same tower: an input of the size it was trained at scores as before, where a tower drawn anew would not.
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).score, model(x).score, rtol=0, atol=0)


def test_config_that_disagrees_with_the_weights_is_named(tmp_path):
    model, config = _trained("model.prompt=coop")
    save_model(model, config, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["model"]["n_ctx"] = 8
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="model.n_ctx=4 but model.n_ctx=8"):
        load_model(tmp_path)


def test_missing_or_broken_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        load_model(tmp_path)
    model, config = _trained()
    save_model(model, config, tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ConfigError, match="weights.safetensors: not a readable safetensors file"):
        load_model(tmp_path)
    for damaged, says in ((b"\xff{", r"not valid JSON \(not UTF-8 text\)"), (b"[]", "not a JSON object"),
                          (b"{", r"not valid JSON \(.*line 1\)")):
        (tmp_path / "config.json").write_bytes(damaged)
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'config.json'))}: {says}$"):
            load_model(tmp_path)


def test_a_checkpoint_saved_before_quick_gelu_keeps_the_gelu_tower_of_its_weights_file(tmp_path):
    # Then a weights file always built GELU towers; its head was trained on those.
    from temu_dist.model.backbone import create_clip
    from temu_dist.model.io import configs_of

    weights = tmp_path / "clip.bin"
    torch.save(create_clip(tiny_config().model).state_dict(), weights)
    config = tiny_config(f"model.pretrained={weights}", "model.quick_gelu=false")
    save_model(build_model(config), config, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del saved["model"]["quick_gelu"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(saved))
    assert configs_of(tmp_path / "ckpt")[1].model.quick_gelu is False


def test_a_checkpoint_saved_before_the_context_layout_options_loads_as_the_layout_it_had(tmp_path):
    from safetensors.torch import load_file, save_file

    model, config = _trained("model.prompt=coop")
    save_model(model, config, tmp_path)
    path = tmp_path / "weights.safetensors"
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    old = json.loads(meta["model"])
    del old["ctx_per_prompt"], old["class_position"]
    save_file(load_file(str(path)), str(path), metadata={**meta, "model": json.dumps(old)})
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["ctx_per_prompt"], saved["model"]["class_position"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded, loaded_config = load_model(tmp_path)
    assert (loaded_config.model.ctx_per_prompt, loaded_config.model.class_position) == (False, "end")
    with pytest.raises(ConfigError, match="checkpoint has model.class_position='end' but model.class_position="
                                          "'middle' was asked"):
        load_model(tmp_path, ["model.class_position=middle"])
