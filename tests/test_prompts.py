import sys
import types

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


@pytest.mark.parametrize("prompt", ["coop", "cocoop"])
@pytest.mark.parametrize("position, text", [("middle", "a photo {} of a"), ("front", "{} a photo of a")])
def test_words_in_the_middle_or_front_of_each_prompts_own_context_are_clip_encode_text_of_that_text(
        prompt, position, text):
    # Each prompt's own context, started from the same words; the prompts' words of unequal length ("Very good
    # photo." is a token longer), each moved into its place: CLIP's own features of the text so laid out.
    pairs = '[["Very good photo.", "Bad photo."]]'
    config = tiny_config(f"model.prompt={prompt}", "model.n_ctx=4", "model.ctx_init=a photo of a",
                         "model.ctx_per_prompt=true", f"model.class_position={position}", f"model.prompt_pairs={pairs}")
    model = build_model(config)
    assert model.prompts.ctx.shape[:2] == (2, 4)
    texts = [text.format(words) for words in ("Very good photo.", "Bad photo.")]
    tokens = open_clip.get_tokenizer("Test-Tiny-ViT-16")(texts)
    with torch.no_grad():
        if prompt == "cocoop":
            for m in model.prompts.meta_net:
                if isinstance(m, torch.nn.Linear):
                    m.weight.zero_()
                    m.bias.zero_()
        expected = F.normalize(create_clip(config.model, config.seed).encode_text(tokens), dim=-1)
        got = model.prompts(torch.randn(2, model.prompts.meta_net[0].in_features) if prompt == "cocoop" else None)
    for image in got:
        torch.testing.assert_close(image.view(2, -1), expected, rtol=1e-5, atol=1e-6)


def test_iqa_pytorchs_clip_iqa_plus_learner_is_these_options_as_the_config_says(monkeypatch):
    # IQA-PyTorch's PromptLearner (the paper's code base): its prompt embeddings, position by position, are ours
    # with the options model.ctx_per_prompt's comment gives. Its `clip` package needs pkg_resources, which today's
    # setuptools lacks: open_clip's tokenizer stands in, OpenAI's BPE as clip's is.
    clip = types.ModuleType("clip")
    clip.tokenize = open_clip.tokenize
    monkeypatch.setitem(sys.modules, "clip", clip)
    monkeypatch.setitem(sys.modules, "clip.simple_tokenizer", types.SimpleNamespace(SimpleTokenizer=None))
    monkeypatch.delitem(sys.modules, "pyiqa.archs.clipiqa_arch", raising=False)
    monkeypatch.delitem(sys.modules, "pyiqa.archs.clip_imports", raising=False)
    from pyiqa.archs.clipiqa_arch import PromptLearner as PyiqaLearner

    x16 = " ".join(["X"] * 16)
    config = tiny_config("model.prompt=coop", "model.n_ctx=16", f"model.ctx_init={x16}", "model.ctx_per_prompt=true",
                         "model.class_position=middle", 'model.prompt_pairs=[["Good photo..", "Bad photo.."]]')
    ours = build_model(config).prompts
    theirs = PyiqaLearner(create_clip(config.model, config.seed), n_ctx=16)
    with torch.no_grad():
        expected = theirs.get_prompts_with_middle_class()
        got = ours._laid_out(torch.cat([ours.prefix, ours.ctx, ours.suffix], dim=1))
    torch.testing.assert_close(got, expected[:, :got.shape[1]])
    assert ours.ctx.shape == theirs.ctx.shape
