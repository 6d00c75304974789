"""Layer stand-ins chosen at load: the fused linear + GELU MLP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from moondream_server.model import load
from moondream_server.model.layers import MLP, FusedGeluMLP, fused_gelu_works, use_fused_gelu

pytestmark = pytest.mark.skipif(not fused_gelu_works(torch.bfloat16), reason="no oneDNN linear + GELU here")


def _mlp(dim: int = 64, inner: int = 256) -> MLP:
    torch.manual_seed(0)
    mlp = MLP(dim, inner).to(torch.bfloat16)
    with torch.no_grad():
        mlp.fc1.bias.normal_()  # the default init leaves biases near zero: make them count
    return mlp


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_fused_mlp_matches_the_float64_mlp_as_closely_as_the_unfused_one(rows: int) -> None:
    mlp = _mlp()
    x = torch.randn(2, rows, 64).to(torch.bfloat16)
    with torch.inference_mode():
        plain = mlp(x).double()
        w1, b1, w2, b2 = (p.double() for p in (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias))
        exact = F.linear(F.gelu(F.linear(x.double(), w1, b1), approximate="tanh"), w2, b2)
        assert use_fused_gelu([mlp]) == 1 and type(mlp) is FusedGeluMLP
        fused = mlp(x).double()
    assert fused.shape == exact.shape == (2, rows, 64)
    scale = exact.abs().max().item()
    # both are one GEMM pair in bf16; the fused one rounds once less, so it is no further off
    assert (fused - exact).abs().max().item() <= max((plain - exact).abs().max().item() * 1.5, scale * 2**-7)
    assert (fused - plain).abs().max().item() <= scale * 2**-6


def test_one_row_takes_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    mlp = _mlp()
    use_fused_gelu([mlp])

    def refuse(*_: object) -> torch.Tensor:
        raise AssertionError("one row went to the fused GEMM")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", refuse)
    with torch.inference_mode():
        out = mlp(torch.randn(1, 1, 64).to(torch.bfloat16))
    assert out.shape == (1, 1, 64)


def test_use_fused_gelu_skips_mlps_of_packed_layers() -> None:
    plain, packed = _mlp(), _mlp()
    packed.fc1 = nn.Identity()  # type: ignore[assignment]  # anything that is not a linear layer
    assert use_fused_gelu([nn.ModuleList([plain, packed])]) == 1
    assert type(plain) is FusedGeluMLP and type(packed) is MLP


def test_bf16_load_fuses_every_mlp_and_float32_none(random_folder: Path) -> None:
    bf16 = load(random_folder, device="cpu", dtype="bfloat16")
    mlps = [m for m in bf16.net.modules() if isinstance(m, MLP)]
    assert mlps and all(type(m) is FusedGeluMLP for m in mlps)
    fp32 = load(random_folder, device="cpu", dtype="float32")
    assert not any(type(m) is FusedGeluMLP for m in fp32.net.modules())
