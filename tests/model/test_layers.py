"""Layer stand-ins chosen at load: the fused linear + GELU MLP, int8 compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from moondream_server.model import load
from moondream_server.model.layers import (
    MLP,
    FusedGeluMLP,
    Int8ComputeLinear,
    Int8Linear,
    fused_gelu_works,
    int8_compute_works,
    int8_rows_work,
    use_fused_gelu,
)

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


int8_compute = pytest.mark.skipif(not int8_compute_works(torch.bfloat16), reason="no oneDNN int8 GEMM here")


@int8_compute
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_int8_compute_linear_is_close_to_the_float_layer(activation: str) -> None:
    torch.manual_seed(2)
    w, b = torch.randn(96, 64) / 8, torch.randn(96) / 4
    layer = Int8ComputeLinear(Int8Linear(w, b, torch.bfloat16))
    x = torch.randn(3, 50, 64)
    exact = F.linear(x.double(), w.double(), b.double())
    if activation == "gelu":
        exact = F.gelu(exact, approximate="tanh")
    with torch.inference_mode():
        got = layer(x.to(torch.bfloat16), activation)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 50, 96)
    # 8-bit weights and activations: within a few % of the largest output
    assert (got.double() - exact).abs().max().item() < 0.04 * exact.abs().max().item()


@int8_compute
def test_int8_compute_quantizes_each_crop_on_its_own() -> None:
    """A crop's result must not depend on the other crops in its batch (one scale per crop)."""
    torch.manual_seed(3)
    layer = Int8ComputeLinear(Int8Linear(torch.randn(32, 16), torch.randn(32), torch.bfloat16))
    quiet, loud = torch.randn(1, 20, 16), 100 * torch.randn(1, 20, 16)
    with torch.inference_mode():
        alone = layer(quiet.to(torch.bfloat16))
        batched = layer(torch.cat([quiet, loud]).to(torch.bfloat16))
    assert torch.equal(batched[:1], alone)


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_load_computes_the_vision_encoder_in_int8_only_with_vnni(
    monkeypatch: pytest.MonkeyPatch, random_folder: Path, vnni: bool
) -> None:
    import moondream_server.model.loading as loading

    monkeypatch.setattr(loading, "cpu_has_int8_dot", lambda: vnni)
    model = load(random_folder, device="cpu", dtype="bfloat16", quantize="int8")
    on = vnni and int8_compute_works(torch.bfloat16)
    vision = {type(m) for m in model.net.vision.modules() if isinstance(m, Int8Linear | Int8ComputeLinear)}
    assert vision == ({Int8ComputeLinear} if on else {Int8Linear})
    assert type(model.net.vision.blocks[0].mlp) is (FusedGeluMLP if on else MLP)
    text = [m for m in model.net.text.modules() if isinstance(m, Int8Linear | Int8ComputeLinear)]
    assert {type(m) for m in text} == {Int8Linear}  # decode keeps the int8-weight kernel
    rows_on = vnni and int8_rows_work()
    assert {m.int8_rows for m in text if isinstance(m, Int8Linear)} == {rows_on}
    assert model.precision is not None and ("vision encoder in int8" in model.precision.reason) == on
    assert ("prefill in int8" in model.precision.reason) == rows_on
    with torch.inference_mode():
        emb = model.embed_image(Image.new("RGB", (300, 200), (90, 160, 30)))
    assert torch.isfinite(emb.float()).all()


int8_rows = pytest.mark.skipif(not int8_rows_work(), reason="no CPU int8 matrix product here")


@int8_rows
def test_int8_row_product_is_close_to_the_float_layer_and_leaves_its_input_alone() -> None:
    torch.manual_seed(4)
    w, b = torch.randn(96, 64) / 8, torch.randn(96) / 4
    x = torch.randn(40, 64)  # past DIRECT_ROWS: the int8 x int8 product, not the int8-weight kernel
    exact = F.linear(x.double(), w.double(), b.double())
    for dtype in (torch.float32, torch.bfloat16):
        layer = Int8Linear(w, b, dtype, int8_rows=True)
        before = x.to(dtype)
        given = before.clone()
        with torch.inference_mode():
            got = layer(given)
        assert torch.equal(given, before)
        assert got.dtype == dtype and got.shape == (40, 96)
        assert (got.double() - exact).abs().max().item() < 0.04 * exact.abs().max().item()


@int8_rows
def test_int8_row_product_quantizes_each_token_on_its_own() -> None:
    """A token's result must not depend on the other sequences packed beside it (one scale per row)."""
    torch.manual_seed(5)
    layer = Int8Linear(torch.randn(32, 16), torch.randn(32), torch.bfloat16, int8_rows=True)
    quiet, loud = torch.randn(20, 16), 100 * torch.randn(20, 16)
    with torch.inference_mode():
        alone = layer(quiet.to(torch.bfloat16))
        packed = layer(torch.cat([quiet, loud]).to(torch.bfloat16))
    assert torch.equal(packed[:20], alone)


@int8_rows
def test_int8_prefills_give_each_sequence_what_it_gets_alone(random_folder: Path) -> None:
    """The engine packs several prompts into one forward: with int8 prefills each keeps its own
    activation scales, so its keys, values and output do not depend on its neighbours."""
    from moondream_server.model.text import SeqSlice

    model = load(random_folder, device="cpu", dtype="bfloat16", quantize="int8")
    text = model.net.text
    assert all(m.int8_rows for m in text.modules() if isinstance(m, Int8Linear))
    gen = torch.Generator().manual_seed(6)
    quiet = torch.randn(20, text.config.dim, generator=gen).to(torch.bfloat16)
    loud = (50 * torch.randn(30, text.config.dim, generator=gen)).to(torch.bfloat16)
    with torch.inference_mode():
        alone_cache = text.new_cache()
        alone = text(quiet, [SeqSlice(alone_cache, 20, prefix=8)])
        caches = [text.new_cache(), text.new_cache()]
        packed = text(torch.cat([quiet, loud]), [SeqSlice(caches[0], 20, prefix=8), SeqSlice(caches[1], 30)])
    assert torch.equal(packed[:20], alone)
    assert torch.equal(caches[0].k[:, :, :20], alone_cache.k[:, :, :20])
    assert torch.equal(caches[0].v[:, :, :20], alone_cache.v[:, :, :20])


@int8_rows
def test_a_lone_decode_row_takes_the_int8_product_too() -> None:
    """One row (a decode step) is multiplied in int8 like a prefill row: the same answer as that
    row inside a long prefill, where the int8-weight kernel (bf16 activations) would differ."""
    torch.manual_seed(7)
    w, b = torch.randn(96, 64) / 8, torch.randn(96) / 4
    x = torch.randn(40, 64).to(torch.bfloat16)
    layer = Int8Linear(w, b, torch.bfloat16, int8_rows=True)
    weight_only = Int8Linear(w, b, torch.bfloat16)
    with torch.inference_mode():
        long = layer(x)
        lone = layer(x[5:6])
        widened = weight_only(x[5:6])
    assert torch.equal(lone, long[5:6])
    assert not torch.equal(widened, long[5:6])
