import open_clip
import pytest
import torch
import torch.nn.functional as F

from temu_dist.config import ConfigError
from temu_dist.model.backbone import create_clip
from temu_dist.model.clipiqa import build_clipiqa, layer_spec
from tests.conftest import tiny_config


def _by_hand(clip, x, image_features):
    tokens = open_clip.get_tokenizer("Test-Tiny-ViT-16")(["Good photo.", "Bad photo."])
    text = F.normalize(clip.encode_text(tokens), dim=-1)
    logits = clip.logit_scale.exp() * F.normalize(image_features, dim=-1) @ text.T
    return logits.softmax(dim=-1)[:, 0]


def test_option_a_is_clip_iqa():
    config = tiny_config("model.layers=only:13")  # a config written for ViT-L: CLIP-IQA picks its own layers
    clip = create_clip(config.model, config.seed)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = _by_hand(clip, x, clip.encode_image(x))
    torch.testing.assert_close(build_clipiqa(config, "a")(x), expected, rtol=1e-5, atol=1e-5)
    # Option b at the last layer is option a.
    torch.testing.assert_close(build_clipiqa(config, "b", layer=4)(x), expected, rtol=1e-5, atol=1e-5)


def test_option_b_and_c_use_the_cls_of_chosen_and_all_layers():
    config = tiny_config()
    clip = create_clip(config.model, config.seed)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = clip.visual.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True,
                                                 intermediates_only=True)
        per_layer = [F.normalize(clip.visual.ln_post(c[:, 0]) @ clip.visual.proj, dim=-1)
                     for c in out["image_intermediates_prefix"]]
        expected_b = _by_hand(clip, x, per_layer[1])
        expected_c = _by_hand(clip, x, torch.stack(per_layer).mean(dim=0))
    torch.testing.assert_close(build_clipiqa(config, "b", layer=2)(x), expected_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(build_clipiqa(config, "c")(x), expected_c, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"^--clipiqa b scores one layer: name it with --layer N \(1-4\)$"):
        layer_spec("b", None, 4)


def test_option_table_scores_every_layer_and_their_average_in_one_pass_as_the_single_options_do():
    config = tiny_config()
    x = torch.randn(2, 3, 64, 64)
    table = build_clipiqa(config, "table")
    assert table.columns == ["layer 1 (b)", "layer 2 (b)", "layer 3 (b)", "layer 4 (a: CLIP-IQA)", "all layers (c)"]
    scores = table(x)
    assert scores.shape == (2, 5)
    singles = [build_clipiqa(config, "b", layer=k)(x) for k in (1, 2, 3)] + \
        [build_clipiqa(config, "a")(x), build_clipiqa(config, "c")(x)]
    torch.testing.assert_close(scores, torch.stack(singles, dim=1), rtol=1e-5, atol=1e-5)
    assert build_clipiqa(config, "b", layer=2).columns == ["layer 2 (b)"]
