import open_clip
import pytest
import torch
import torch.nn.functional as F

from temu_dist.config import ConfigError
from temu_dist.model.backbone import create_clip
from temu_dist.model.temu import build_model
from tests.conftest import tiny_config


def test_coop_with_the_placeholder_words_as_context_is_clip_encode_text():
    config = tiny_config("model.prompt=coop", "model.n_ctx=4")
    model = build_model(config)
    prompts = model.prompts
    tokenizer = open_clip.get_tokenizer("Test-Tiny-ViT-16")
    texts = ["X X X X Good photo.", "X X X X Bad photo."]
    tokens = tokenizer(texts)
    # The text passes run only up to the longest prompt's [EOS], not over the 77 positions of padding.
    assert prompts.tokens.shape[1] == int((tokens != 0).sum(dim=1).max()) < 77
    with torch.no_grad():
        prompts.ctx.copy_(prompts.text.embed(tokens[:1, 1:5])[0])
        clip = create_clip(config.model, config.seed)
        expected = F.normalize(clip.encode_text(tokens), dim=-1)
        torch.testing.assert_close(prompts().view(2, -1), expected, rtol=1e-5, atol=1e-6)


def test_context_started_from_words_is_clip_encode_text_of_those_words_until_trained():
    config = tiny_config("model.prompt=cocoop", "model.n_ctx=4", "model.ctx_init=a photo of a")
    model = build_model(config)
    tokens = open_clip.get_tokenizer("Test-Tiny-ViT-16")(["a photo of a Good photo.", "a photo of a Bad photo."])
    with torch.no_grad():
        for m in model.prompts.meta_net:  # no shift per image: CoCoOp is then CoOp
            if isinstance(m, torch.nn.Linear):
                m.weight.zero_()
                m.bias.zero_()
        expected = F.normalize(create_clip(config.model, config.seed).encode_text(tokens), dim=-1)
        got = model.prompts(torch.randn(3, model.prompts.meta_net[0].in_features))
    for image in got:
        torch.testing.assert_close(image.view(2, -1), expected, rtol=1e-5, atol=1e-6)
    assert model.prompts.ctx.requires_grad


def test_context_words_that_are_not_n_ctx_tokens_are_refused_naming_the_count():
    with pytest.raises(ConfigError, match=r"^model.ctx_init: 'a photo of a' is 4 token\(s\), model.n_ctx is 6: set "
                                          r"model.n_ctx=4$"):
        build_model(tiny_config("model.prompt=coop", "model.n_ctx=6", "model.ctx_init=a photo of a"))
