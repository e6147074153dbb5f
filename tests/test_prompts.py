import open_clip
import torch
import torch.nn.functional as F

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
