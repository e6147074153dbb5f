import math

import pytest
import torch
import torch.nn.functional as F

from temu_dist.model.temu import build_model, tps
from tests.conftest import tiny_config

MODES = [(v, p) for v in "SI" for p in ("none", "coop", "cocoop")]


@pytest.mark.parametrize("variant, prompt", MODES)
def test_gradients_reach_exactly_the_trainable_parameters(variant, prompt):
    model = build_model(tiny_config(f"model.variant={variant}", f"model.prompt={prompt}", "model.layer_norm=true"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"layer_logits", "log_tau_w"} | {n for n in trainable if n.startswith("layer_norms.")}
    if prompt != "none":
        expected.add("prompts.ctx")
    if prompt == "cocoop":
        expected |= {n for n in trainable if n.startswith("prompts.meta_net.")}
    assert trainable == expected
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = ((model(torch.randn(3, 3, 64, 64)).score - torch.tensor([0.2, 0.5, 0.9])) ** 2).mean()
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), before[n]), f"{n} did not move"
        else:
            assert torch.equal(p.detach(), frozen[n]), f"frozen {n} changed"


@pytest.mark.parametrize("variant, prompt", MODES)
@pytest.mark.parametrize("layers, n", [("all", 4), ("upto:2", 2), ("only:3", 1)])
def test_shapes_and_scores_in_unit_interval(variant, prompt, layers, n):
    model = build_model(tiny_config(f"model.variant={variant}", f"model.prompt={prompt}", f"model.layers={layers}"))
    out = model(torch.randn(2, 3, 64, 64) * 3)
    assert out.score.shape == (2,)
    assert ((out.score > 0) & (out.score < 1)).all()
    assert out.layer_scores.shape == (2, n if variant == "S" else 1)
    assert out.patch_scores.shape == (2, 4, 4) and out.patch_weights.shape == (2, 4, 4)
    assert ((out.patch_scores > 0) & (out.patch_scores < 1)).all()
    torch.testing.assert_close(out.patch_weights.sum(dim=(1, 2)), torch.ones(2))


def method_score(model, x: torch.Tensor) -> torch.Tensor:
    """The score as method.md writes it: every layer's features normalised first, then TPS and the fusion."""
    cls, patches = model.backbone(x)
    if model.layer_norms is not None:
        cls = torch.stack([ln(cls[:, i].float()) for i, ln in enumerate(model.layer_norms)], dim=1)
        patches = torch.stack([ln(patches[:, i].float()) for i, ln in enumerate(model.layer_norms)], dim=1)
    f = F.normalize(model.backbone.project(patches).float(), dim=-1)
    g = F.normalize(model.backbone.project(cls).float(), dim=-1)
    a = model.layer_weights()
    g_fused = F.normalize(torch.einsum("s,bsd->bd", a, g), dim=-1)
    text = model.prompts(g_fused)
    if model.cfg.variant == "I":
        f, g = F.normalize(torch.einsum("s,bsnd->bnd", a, f), dim=-1).unsqueeze(1), g_fused.unsqueeze(1)
    s = (model.logit_scale * torch.einsum("bsnd,bpkd->bsnpk", f, text)).softmax(dim=-1)[..., 0].mean(dim=-1)
    w = (torch.einsum("bsnd,bsd->bsn", f, g) / model.log_tau_w.exp()).softmax(dim=-1)
    q = (w * s).sum(dim=-1)
    return q[:, 0] if model.cfg.variant == "I" else q @ a


@pytest.mark.parametrize("variant, prompt", MODES)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_scores_and_gradients_match_the_method_as_written(variant, prompt, layer_norm):
    model = build_model(tiny_config(f"model.variant={variant}", f"model.prompt={prompt}",
                                    f"model.layer_norm={str(layer_norm).lower()}"))
    with torch.no_grad():  # away from the init, where layer weights are uniform and the norms are identities
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    x = torch.randn(3, 3, 64, 64) * 3
    params = [p for p in model.parameters() if p.requires_grad]
    ours = model(x).score
    reference = method_score(model, x)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(ours.sum(), params), torch.autograd.grad(reference.sum(), params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_cocoop_prompts_differ_between_images_and_coop_does_not():
    model = build_model(tiny_config("model.prompt=cocoop"))
    _, _, g = model.features(torch.randn(2, 3, 64, 64))
    image_feature = F.normalize(g.mean(dim=1), dim=-1)
    text = model.prompts(image_feature)
    assert text.shape == (2, 1, 2, 32)
    assert not torch.allclose(text[0], text[1])
    coop = build_model(tiny_config("model.prompt=coop"))
    assert coop.prompts(image_feature).shape == (1, 1, 2, 32)


def test_s_and_i_agree_on_a_single_layer():
    x = torch.randn(2, 3, 64, 64)
    s = build_model(tiny_config("model.variant=S", "model.layers=only:2"))(x)
    i = build_model(tiny_config("model.variant=I", "model.layers=only:2"))(x)
    torch.testing.assert_close(s.score, i.score)
    torch.testing.assert_close(s.patch_scores, i.patch_scores)


def test_identity_layer_norm_changes_nothing_at_init():
    x = torch.randn(2, 3, 64, 64)
    plain = build_model(tiny_config())(x).score
    with_ln = build_model(tiny_config("model.layer_norm=true"))(x).score
    torch.testing.assert_close(plain, with_ln, rtol=1e-4, atol=1e-4)


def test_several_prompt_pairs_average_their_patch_scores():
    pairs = "model.prompt_pairs=[[Good photo., Bad photo.], [High quality., Low quality.]]"
    model = build_model(tiny_config(pairs, "model.variant=S", "model.prompt=none"))
    assert model.prompts().shape == (1, 2, 2, 32)
    x = torch.randn(1, 3, 64, 64)
    f, inv_norm, g = model.features(x)
    text = model.prompts()
    both = tps(f, inv_norm, g, text, model.logit_scale, model.log_tau_w.exp())[1]
    first = tps(f, inv_norm, g, text[:, :1], model.logit_scale, model.log_tau_w.exp())[1]
    second = tps(f, inv_norm, g, text[:, 1:], model.logit_scale, model.log_tau_w.exp())[1]
    torch.testing.assert_close(both, (first + second) / 2)


def test_tps_by_hand():
    # Two patches: one on the "good" text direction, one on "bad"; [cls] closer to the good patch.
    good, bad = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    f = torch.stack([good, bad]).view(1, 1, 2, 2)
    g = F.normalize(torch.tensor([2.0, 1.0]), dim=0).view(1, 1, 2)
    text = torch.stack([good, bad]).view(1, 1, 2, 2)
    # Features given at three times their length: the inverse norms must make them unit vectors.
    q, s, w = tps(3 * f, torch.full((1, 1, 2), 1 / 3), g, text, torch.tensor(10.0), torch.tensor(0.5))
    s_good = 1 / (1 + math.exp(-10.0))
    torch.testing.assert_close(s[0, 0], torch.tensor([s_good, 1 - s_good]))
    sim = g[0, 0] / 0.5
    w_expected = sim.softmax(dim=0)
    torch.testing.assert_close(w[0, 0], w_expected)
    torch.testing.assert_close(q[0, 0], w_expected[0] * s_good + w_expected[1] * (1 - s_good))


def test_seed_fixes_the_initial_prompt_context():
    a = build_model(tiny_config("model.prompt=cocoop", "seed=3"))
    b = build_model(tiny_config("model.prompt=cocoop", "seed=3"))
    c = build_model(tiny_config("model.prompt=cocoop", "seed=4"))
    for name, value in a.trainable_state().items():
        assert torch.equal(value, b.trainable_state()[name])
    assert not torch.equal(a.prompts.ctx, c.prompts.ctx)
