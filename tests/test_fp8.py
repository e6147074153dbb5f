import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from temu_dist.config import ConfigError
from temu_dist.model import fp8
from temu_dist.model.clipiqa import build_clipiqa
from temu_dist.model.fp8 import E4M3_MAX, Fp8Linear, check_fp8, quantize_rows
from temu_dist.model.io import load_model, save_model
from temu_dist.model.temu import build_model
from tests.conftest import tiny_config


def test_each_row_is_scaled_to_e4m3s_range_and_kept_to_its_rounding():
    x = torch.randn(5, 64, dtype=torch.bfloat16) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 0.0]).to(torch.bfloat16)[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 1) and scale.dtype == torch.float32
    back = q.float() * scale
    assert not back.isnan().any() and (back[4] == 0).all()  # a row of zeros stays zeros, not NaN
    assert q[:4].float().abs().amax(dim=1).tolist() == [E4M3_MAX] * 4
    # 3 mantissa bits: a normal number rounds to within 2^-4 of itself, a subnormal to within half of 2^-9.
    error = (back - x.float()).abs()
    assert (error <= x.float().abs() / 16 + scale * 2 ** -10).all()


def test_an_fp8_linear_is_the_matmul_of_its_quantised_operands():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    layer = Fp8Linear(linear)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    out = layer(x)
    assert out.shape == (2, 7, 48) and out.dtype == torch.bfloat16
    q, scale = quantize_rows(x.reshape(-1, 64))
    expected = (q.float() * scale) @ layer.dequantized_weight().t() + linear.bias.float()
    torch.testing.assert_close(out.reshape(-1, 48).float(), expected, rtol=1e-2, atol=1e-2)
    # ...and not far from the bf16 layer: per-token and per-channel scales keep each operand to a few percent.
    ref = linear(x).float()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.parametrize("quick_gelu", ["false", "true"])  # true: the OpenAI weights' tower, its scale folded first
def test_the_fp8_tower_swaps_every_linear_layer_and_scores_close_to_the_bf16_one(quick_gelu):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 64, 64)
    bf16 = build_model(tiny_config("model.precision=bf16", f"model.quick_gelu={quick_gelu}"))
    model = build_model(tiny_config("model.precision=bf16", f"model.quick_gelu={quick_gelu}", "model.tower_fp8=true"))
    blocks = model.backbone.visual.transformer
    assert sum(isinstance(m, Fp8Linear) for m in blocks.modules()) == 4 * 4  # qkv, out, fc1, fc2 of 4 blocks
    assert not any(isinstance(m, nn.Linear) for m in blocks.modules())
    with torch.no_grad():
        ref, out = bf16(x, keep_tokens=True), model(x, keep_tokens=True)
        ref_tokens, tokens = bf16.backbone(x)[1].float(), model.backbone(x)[1].float()
    error = ((tokens - ref_tokens).norm() / ref_tokens.norm()).item()
    assert 0.001 < error < 0.1
    assert spearmanr(out.score, ref.score).statistic > 0.9


def test_an_fp8_tower_needs_bf16_a_compiled_gpu_model_and_widths_of_16():
    with pytest.raises(ConfigError, match=r"^model.tower_fp8: the fp8 tower writes bf16; set model.precision=bf16"):
        build_model(tiny_config("model.precision=fp32", "model.tower_fp8=true"))
    with pytest.raises(ConfigError, match=r"^model.tower_fp8: on a GPU .* set model.compile=true$"):
        check_fp8(torch.device("cuda"), compiled=False)
    with pytest.raises(ConfigError, match=r"^model.tower_fp8: fp8 matmuls need widths divisible by 16; .* 24 -> 48"):
        Fp8Linear(nn.Linear(24, 48))
    with pytest.raises(ConfigError, match=r"^model.tower_fp8: CLIP-IQA scores with the bf16 tower; set "
                                          r"model.tower_fp8=false$"):
        build_clipiqa(tiny_config("model.precision=bf16", "model.tower_fp8=true"))


def test_a_device_torch_cannot_run_fp8_on_is_one_line(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0\nmore")

    monkeypatch.setattr(fp8.torch, "_scaled_mm", refuse)
    with pytest.raises(ConfigError) as e:
        build_model(tiny_config("model.precision=bf16", "model.tower_fp8=true"))
    assert str(e.value) == (f"model.tower_fp8: torch {torch.__version__} cannot run a rowwise-scaled fp8 matmul on cpu "
                            "(RuntimeError: torch._scaled_mm is only supported on CUDA devices with compute capability "
                            ">= 9.0); fp8 needs a Hopper-class GPU (H100, H200) or newer, or set model.tower_fp8=false")


def test_a_run_trained_in_bf16_is_scored_with_the_fp8_tower_by_an_override(tmp_path):
    config = tiny_config("model.precision=bf16", "model.prompt=coop")
    model = build_model(config)
    save_model(model, config, tmp_path)
    loaded, loaded_config = load_model(tmp_path, ["model.tower_fp8=true"])
    assert loaded_config.model.tower_fp8 and isinstance(loaded.backbone.visual.transformer.resblocks[0].mlp.c_fc,
                                                        Fp8Linear)
    torch.testing.assert_close(loaded.prompts.ctx, model.prompts.ctx, rtol=0, atol=0)


def test_a_score_used_as_a_loss_has_a_gradient_through_the_fp8_tower():
    from temu_dist.scorer import Scorer
    from tests.conftest import TINY_OVERRIDES

    grads = {}
    for on in ("false", "true"):
        scorer = Scorer.from_config(None, [*TINY_OVERRIDES, "model.precision=bf16", f"model.tower_fp8={on}"])
        x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).requires_grad_()
        (1 - scorer(x).mean()).backward()
        grads[on] = x.grad.flatten()
    # Through the dequantised weights, the activations' rounding passed straight through: near the bf16 tower's.
    assert torch.nn.functional.cosine_similarity(grads["true"], grads["false"], dim=0) > 0.95
