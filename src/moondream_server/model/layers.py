"""Small building blocks shared by the vision, text and region networks."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    """fc1 -> GELU (tanh approximation, as the reference) -> fc2."""

    def __init__(self, dim: int, inner: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, inner)
        self.fc2 = nn.Linear(inner, dim if out is None else out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # type: ignore[no-any-return]


class Fp16Linear(nn.Module):
    """Inference-only stand-in for ``nn.Linear`` on the CPU: float16 weights, float32 arithmetic.

    fbgemm's fp16-weight GEMM widens the weights to float32 inside the kernel and accumulates
    in float32, so the products are those of the float32 layer: where float16 holds the weight
    (``fp16_lossless``, as for the official bf16 checkpoint) the layer computes what
    ``nn.Linear`` computes in float32, up to summation order, reading half the bytes. On an
    AVX2 CPU it is also 2-4x faster than MKL's float32 GEMM for 2-32 rows (batched decode,
    short prompts), where MKL falls off a cliff, and on par for long prefills.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        b = None if bias is None else bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        y: torch.Tensor = torch.ops.quantized.linear_dynamic_fp16(flat, self._packed)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=float16"


# Float16's subnormal spacing is 2**-24, so round-to-nearest moves a value below its normal range
# (|v| < 2**-14) by at most 2**-25; values in the normal range must survive unchanged.
FP16_TOLERANCE = 2.0**-25


def fp16_lossless(weight: torch.Tensor) -> bool:
    """True when float16 holds `weight` exactly, up to the tiniest values' 3e-8 rounding.

    bf16 checkpoints (as the official one) pass: float16 has more mantissa bits than bf16, and
    their values are far inside its range. The 3e-8 moves of near-zero weights are below float32
    accumulation noise for these layer widths. Float32 checkpoints fail (23 mantissa bits).
    """
    exact = weight.float()  # compare in float32, whatever the stored dtype (bf16 while loading)
    back = exact.to(torch.float16).float()
    return bool((back - exact).abs().max() <= FP16_TOLERANCE)


def pack_fp16(
    weight: torch.Tensor, bias: torch.Tensor | None, *, exact_only: bool = True
) -> Fp16Linear | None:
    """An ``Fp16Linear`` for these tensors; None when `exact_only` and float16 cannot hold them."""
    if exact_only and not (fp16_lossless(weight) and (bias is None or fp16_lossless(bias))):
        return None
    return Fp16Linear(weight, bias)
