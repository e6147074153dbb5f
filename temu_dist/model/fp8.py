"""The frozen image tower's linear layers as fp8 matmuls (`model.tower_fp8`): e4m3 weights with one scale per output
channel, quantised once, and activations quantised per token on the fly, written in the tower's dtype (bf16).

Written here rather than taken from torchao: this is the one matmul torch itself ships (`torch._scaled_mm`, rowwise
scales), and torchao's releases each pin a narrow range of torch versions, which the GPU nodes and the CPU tests here
do not share. The tower is frozen: a backward is needed only towards its input, where a score is used as a loss.
"""
from __future__ import annotations

import torch
from torch import nn

from temu_dist.config import ConfigError, error_line

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, 1]) with x ~ q * scale, each row's largest magnitude at E4M3_MAX.
    (A rounding of amax / scale a hair over 448 needs no clamp: the cast to e4m3fn saturates.)"""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


def fp8_matmul(x: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(x * scale) @ (weight * weight_scale.T).T + bias for e4m3 x [M, K] and weight [N, K] with their row scales
    ([M, 1], [1, N]). Fast accumulation made the ViT-L-14 step 5% faster on an H200 and left the tokens' error where
    it was (benchmarks/RESULTS.md)."""
    # mat2 must be column-major: the [N, K] row-major weight, transposed, is.
    return torch._scaled_mm(x, weight.t(), scale_a=scale, scale_b=weight_scale, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=True)


class _TowardsInput(torch.autograd.Function):
    """The fp8 product, with a gradient towards its input through the dequantised weight: the activations' rounding
    taken as the identity (the straight-through estimate), since _scaled_mm has no backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Fp8Linear") -> torch.Tensor:
        ctx.layer = layer
        return layer.product(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None


class Fp8Linear(nn.Module):
    """A frozen nn.Linear as a rowwise-scaled fp8 matmul. The weight is held as uint8 bits: DDP broadcasts buffers
    at start, and Gloo (the CPU backend) has no fp8 type."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % 16 or self.out_features % 16:
            raise ConfigError(f"model.tower_fp8: fp8 matmuls need widths divisible by 16; this tower has a "
                              f"{self.in_features} -> {self.out_features} linear layer")
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_bits", weight.view(torch.uint8))
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]: one per output channel
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.out_dtype = linear.weight.dtype

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the matmul uses, in fp32."""
        return self.weight_bits.view(E4M3).float() * self.weight_scale.t()

    def product(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_rows(x.reshape(-1, self.in_features))
        out = fp8_matmul(q, scale, self.weight_bits.view(E4M3), self.weight_scale, self.bias, self.out_dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # a score used as a loss (temu_dist.scorer)
            return _TowardsInput.apply(x, self)
        return self.product(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3, rowwise scales"


def linears_to_fp8(module: nn.Module) -> None:
    """Replaces every nn.Linear inside `module` by an Fp8Linear of its weights."""
    for name in [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent)
        setattr(owner, child, Fp8Linear(getattr(owner, child)))


def check_fp8(device: torch.device, compiled: bool) -> None:
    """A one-line error where the fp8 tower would not pay: uncompiled on a GPU, or on a device where torch cannot run
    the rowwise-scaled fp8 matmul (GPUs before Hopper)."""
    if device.type == "cuda" and not compiled:
        # Eager, each quantisation is several kernels of its own: an H200's ViT-L-14 step took 219.5 ms, against 123.0
        # in bf16; compiled, they fuse into the kernels before them.
        raise ConfigError("model.tower_fp8: on a GPU the fp8 tower is slower than bf16 unless compiled; set "
                          "model.compile=true")
    try:
        q, scale = quantize_rows(torch.ones(16, 16, device=device, dtype=torch.bfloat16))
        fp8_matmul(q, scale, q, scale.t())
    except (RuntimeError, NotImplementedError) as e:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise ConfigError(f"model.tower_fp8: torch {torch.__version__} cannot run a rowwise-scaled fp8 matmul on "
                          f"{name} ({error_line(e)[:160]}); fp8 needs a Hopper-class GPU (H100, H200) or newer, or set "
                          "model.tower_fp8=false") from None
