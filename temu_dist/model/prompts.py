"""Text features of the antonym prompt pairs: fixed (none), learnable context (CoOp) or image-conditioned (CoCoOp)."""
from __future__ import annotations

import copy
import functools

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from temu_dist.config import ConfigError, ModelConfig


@functools.cache
def _tokenizer(backbone: str):
    """open_clip's tokenizer for a backbone, built once a process: get_tokenizer builds its BPE tables anew each call
    (0.14 s here), and a repeat or a test builds many models."""
    return open_clip.get_tokenizer(backbone)


class TextTower(nn.Module):
    """CLIP's frozen text transformer, entered at the token-embedding level so learned context vectors can be fed in.

    It mirrors open_clip's `CLIP.encode_text` (and `TextTransformer.forward`) from the embeddings onwards, which is the
    one step open_clip does not expose.
    """

    def __init__(self, clip: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        text = getattr(clip, "text", clip)
        if getattr(text, "cls_emb", None) is not None or not hasattr(text, "token_embedding"):
            raise ConfigError("model.prompt: this backbone's text tower cannot take learned context (CoOp/CoCoOp); "
                              "use model.prompt=none")
        self.token_embedding = copy.deepcopy(text.token_embedding)
        self.transformer = copy.deepcopy(text.transformer)
        self.ln_final = copy.deepcopy(text.ln_final)
        self.text_projection = copy.deepcopy(text.text_projection)
        self.register_buffer("positional_embedding", text.positional_embedding.detach().clone(), persistent=False)
        self.register_buffer("attn_mask", None if text.attn_mask is None else text.attn_mask.clone(), persistent=False)
        self.pool_type = getattr(clip, "text_pool_type", getattr(text, "pool_type", "argmax"))
        self.eos_id = getattr(clip, "text_eos_id", getattr(text, "eos_id", None))
        self.width = self.token_embedding.weight.shape[1]
        self.context_length = self.positional_embedding.shape[0]
        self.to(dtype)
        self.dtype = dtype
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def causal(self) -> bool:
        """Whether each position attends only to itself and those before it."""
        m = self.attn_mask
        if m is None:
            return False
        above = torch.ones_like(m, dtype=torch.bool).triu(1)
        return bool((m[above] == float("-inf")).all() and (m[~above] == 0).all())

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens)

    def forward(self, embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """embeds [n, ctx, width] (gradients may flow), tokens [n, ctx] (for pooling) -> features [n, D], fp32."""
        n = embeds.shape[1]
        x = embeds.to(self.dtype) + self.positional_embedding[:n].to(self.dtype)
        x = self.transformer(x, attn_mask=None if self.attn_mask is None else self.attn_mask[:n, :n])
        x = self.ln_final(x)
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        return x.float()


class PromptLearner(nn.Module):
    """Returns normalised text features [1 or B, P, 2, D] for P (good, bad) pairs.

    none: computed once at construction, the text tower is then dropped. coop: learnable context (shared, or each
    prompt's own) around each prompt's words, one text pass per step. cocoop: that context shifted per image by a
    meta-net on the image feature, one batched text pass over all images and prompts.
    """

    def __init__(self, cfg: ModelConfig, clip: nn.Module, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.mode = cfg.prompt
        self.num_pairs = len(cfg.prompt_pairs)
        texts = [t for pair in cfg.prompt_pairs for t in pair]
        tokenizer = _tokenizer(cfg.backbone)
        if self.mode == "none":
            with torch.no_grad():
                feats = clip.encode_text(tokenizer(texts)).float()
            self.register_buffer("fixed", F.normalize(feats, dim=-1).view(1, self.num_pairs, 2, -1), persistent=False)
            return
        # In the image tower's dtype: CoCoOp runs the text tower once per image, and in fp32 (no tensor cores: 67
        # against 989 TFLOP/s on an H100's datasheet) those 2% of a step's FLOPs would take about 12% of its time.
        # The fixed prompts above are encoded once, in fp32.
        self.text = TextTower(clip, dtype)
        if cfg.ctx_init is not None:
            words = int((tokenizer([cfg.ctx_init]) != 0).sum()) - 2  # less [SOS] and [EOS]
            if words != cfg.n_ctx:
                raise ConfigError(f"model.ctx_init: {cfg.ctx_init!r} is {words} token(s), model.n_ctx is {cfg.n_ctx}: "
                                  f"set model.n_ctx={words}")
        placeholder = cfg.ctx_init or " ".join(["X"] * cfg.n_ctx)
        tokens = tokenizer([f"{placeholder} {t}" for t in texts])
        longest = int((tokens != 0).sum(dim=1).max())
        if longest >= self.text.context_length:
            raise ConfigError(f"model.n_ctx: {cfg.n_ctx} context tokens plus the longest prompt do not fit the text "
                              f"encoder's {self.text.context_length} tokens")
        if self.text.causal and self.text.pool_type in ("argmax", "eos"):
            # Under the causal mask no token after [EOS] reaches it: dropping the padding is exact, and it cuts each
            # text pass (every step for CoOp, every image for CoCoOp) to `longest` of the context's positions.
            tokens = tokens[:, :longest]
        with torch.no_grad():
            embeds = self.text.embed(tokens).float()
        # Laid out as [SOS], context, the prompt words, [EOS] and padding (the last three frozen); `order` moves the
        # words into or before the context, a prompt at a time as their lengths differ. [EOS] stays where it is.
        order = _class_order(tokens, cfg.n_ctx, cfg.class_position)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("tokens", tokens if order is None else tokens.gather(1, order), persistent=False)
        self.register_buffer("prefix", embeds[:, :1], persistent=False)
        self.register_buffer("suffix", embeds[:, 1 + cfg.n_ctx:], persistent=False)
        shape = (len(texts), cfg.n_ctx) if cfg.ctx_per_prompt else (cfg.n_ctx,)
        ctx = embeds[0, 1:1 + cfg.n_ctx].expand(*shape, -1).clone() if cfg.ctx_init is not None else \
            torch.randn(*shape, self.text.width, generator=generator) * cfg.ctx_init_std
        self.ctx = nn.Parameter(ctx)
        if self.mode == "cocoop":
            embed_dim = clip.visual.proj.shape[1]
            hidden = max(1, embed_dim // cfg.cocoop_reduction)
            self.meta_net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True),
                                          nn.Linear(hidden, self.text.width))
            for m in self.meta_net:
                if isinstance(m, nn.Linear):
                    _seeded_linear_init(m, generator)

    def forward(self, image_feature: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "none":
            return self.fixed
        k = self.tokens.shape[0]
        if self.mode == "coop":
            ctx = self.ctx.expand(k, -1, -1)
            feats = self.text(self._laid_out(torch.cat([self.prefix, ctx, self.suffix], dim=1)), self.tokens)
            return F.normalize(feats, dim=-1).view(1, self.num_pairs, 2, -1)
        b = image_feature.shape[0]
        shift = self.meta_net(image_feature)[:, None, None]  # [B, 1, 1, width]
        ctx = (self.ctx + shift).expand(-1, k, -1, -1)  # [B, K, n_ctx, width]
        prefix = self.prefix.unsqueeze(0).expand(b, -1, -1, -1)
        suffix = self.suffix.unsqueeze(0).expand(b, -1, -1, -1)
        prompts = self._laid_out(torch.cat([prefix, ctx, suffix], dim=2))
        feats = self.text(prompts.flatten(0, 1), self.tokens.repeat(b, 1))
        return F.normalize(feats, dim=-1).view(b, self.num_pairs, 2, -1)

    def _laid_out(self, prompts: torch.Tensor) -> torch.Tensor:
        """[..., K, T, width] in the context-then-words layout -> in class_position's."""
        if self.order is None:
            return prompts
        return prompts[..., torch.arange(self.order.shape[0], device=prompts.device)[:, None], self.order, :]


def _class_order(tokens: torch.Tensor, n_ctx: int, position: str) -> torch.Tensor | None:
    """Per prompt, the positions of its context-then-words layout ([SOS], n_ctx context, its words, [EOS], ...) that
    make its `position` layout: words after the context (end: None, as it is), in its middle (the first n_ctx // 2
    context tokens before them, as CoOp's), or before it."""
    if position == "end":
        return None
    steps = torch.arange(tokens.shape[1])
    half = n_ctx // 2 if position == "middle" else 0
    rows = []
    for row in tokens:
        words = int((row != 0).sum()) - 2 - n_ctx  # less [SOS], [EOS] and the context
        context, after = list(range(1, 1 + n_ctx)), steps[1 + n_ctx + words:].tolist()
        rows.append([0, *context[:half], *range(1 + n_ctx, 1 + n_ctx + words), *context[half:], *after])
    return torch.tensor(rows)


def _seeded_linear_init(layer: nn.Linear, generator: torch.Generator | None) -> None:
    # nn.Linear's own init (kaiming-uniform, a=sqrt(5)) but drawn from our generator so a seed fixes it.
    bound = 1.0 / layer.in_features ** 0.5
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
