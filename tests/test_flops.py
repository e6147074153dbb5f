import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from temu_dist.model.flops import block_flops, image_forward_flops, step_flops, text_pass_flops
from temu_dist.model.temu import build_model
from tests.conftest import tiny_config


def _counted(fn) -> int:
    # The math attention kernel is plain matmuls, which FlopCounterMode counts; the fused CPU kernels it skips.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("overrides", [("model.layers=all",), ("model.layers=upto:2",), ("model.layers=only:3",),
                                       ("model.backbone=Test-Tiny-ViT-14", "model.image_size=[56,84]")])
def test_image_flops_match_torch_flop_counter(overrides):
    model = build_model(tiny_config(*overrides))
    b = model.backbone
    h, w = model.cfg.image_hw()
    # An input that needs grad keeps nn.MultiheadAttention off its fused inference path, which the counter cannot see.
    x = torch.randn(3, 3, h, w, requires_grad=True)

    def forward():
        out = b.visual.forward_intermediates(x, indices=b.indices, stop_early=True, output_fmt="NLC",
                                             output_extra_tokens=True, intermediates_only=True)
        b.project(torch.stack(out["image_intermediates"], dim=1))
        b.project(torch.cat(out["image_intermediates_prefix"], dim=1))

    assert image_forward_flops(model) * 3 == _counted(forward)


@pytest.mark.parametrize("prompt, images", [("coop", 1), ("cocoop", 3)])
def test_text_flops_forward_and_backward_match_torch_flop_counter(prompt, images):
    model = build_model(tiny_config(f"model.prompt={prompt}"))
    g = torch.randn(images, model.backbone.embed_dim)
    counted = _counted(lambda: model.prompts(g).sum().backward())
    # CoCoOp's meta-net is left out of the count: under 0.1% of it here, less on real backbones.
    assert step_flops(model, images).text == pytest.approx(counted, rel=1e-3)
    assert text_pass_flops(build_model(tiny_config("model.prompt=none"))) == 0


def test_vit_l_14_at_448_is_the_figure_mfu_is_quoted_against():
    # 32x32 patches + [cls], width 1024, MLP 4096, 24 blocks; the patch embedding; the "about 724 GFLOPs".
    linear, attention = block_flops(1025, 1024, 4096)
    total = 24 * (linear + attention) + 2 * 1024 * 1024 * 3 * 14 * 14
    assert total / 1e9 == pytest.approx(724, rel=0.005)
