"""Weight formats chosen at load: the float16-storage test and int8 quantization, against definitions."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.nn import functional as F

from moondream_server.model.layers import FP16_TOLERANCE, Fp16Linear, Int8Linear, fp16_lossless, pack_fp16


def _round_trip_exact(weight: torch.Tensor) -> bool:
    """The definition: float16 returns every value to within FP16_TOLERANCE (NaN and overflow fail)."""
    exact = weight.double()
    back = weight.to(torch.float16).double()
    return bool(((back - exact).abs() <= FP16_TOLERANCE).all())


def test_fp16_lossless_agrees_with_the_round_trip_on_every_bf16_value() -> None:
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    verdicts = [fp16_lossless(v.reshape(1, 1)) for v in every]
    expected = [_round_trip_exact(v.reshape(1, 1)) for v in every]
    assert verdicts == expected
    assert 0 < sum(verdicts) < len(verdicts)  # both answers occur: the largest values overflow float16
    weights = torch.randn(64, 32).to(torch.bfloat16)
    assert fp16_lossless(weights) and fp16_lossless(weights.float())
    for bad in (70000.0, float("inf"), float("nan")):
        spoiled = weights.clone()
        spoiled[5, 7] = bad
        assert not fp16_lossless(spoiled)
    assert not fp16_lossless(torch.tensor([[0.1]]))  # float32 values float16 cannot hold


def test_int8_quantization_matches_its_formula_across_row_blocks() -> None:
    torch.manual_seed(3)
    # rows well past one quantization block and not a multiple of it; a zero row; an outlier row
    for dtype in (torch.bfloat16, torch.float32):
        w = (torch.randn(3001, 700) / 10).to(dtype)
        w[17] = 0
        w[2999, 3] = 40.0
        layer = Int8Linear(w, None, torch.bfloat16)
        exact = w.float()
        scale = exact.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        # the whole matrix at once, as the layer computed it before quantizing a block at a time
        q = (exact * scale.reciprocal()[:, None]).round().clamp(-127, 127).to(torch.int8)
        assert torch.equal(layer.qweight, q)
        assert torch.equal(layer.scale, scale.to(torch.bfloat16))
        assert (layer.qweight[17] == 0).all() and layer.qweight[2999, 3] == 127


def _bf16_layer(rows: int = 48, cols: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(rows, cols, generator=g) / 8).bfloat16(), (
        torch.randn(rows, generator=g) / 8
    ).bfloat16()


@pytest.mark.parametrize("rows", [1, 5, 300])
def test_fp16_linear_computes_the_float32_products_before_and_after_packing(rows: int) -> None:
    weight, bias = _bf16_layer()
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(4))
    want = F.linear(x.double(), weight.double(), bias.double())  # the exact products, summed in float64
    layer = Fp16Linear(weight, bias, pack=False)
    assert not layer.packed
    widened = layer(x)
    released = layer.pack()
    assert layer.packed and released is not None and released.data_ptr() == weight.data_ptr()
    assert layer.pack() is None  # once
    packed = layer(x)
    for got in (widened, packed):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_fp16_linear_keeps_a_weight_float16_cannot_hold_widened() -> None:
    weight, bias = _bf16_layer()
    weight[0, 0] = 1e5  # beyond float16's 65504: packing would make it an infinity
    layer = pack_fp16(weight, bias)  # bf16: held whatever its values
    assert isinstance(layer, Fp16Linear)
    assert layer.pack() is None and not layer.packed
    x = torch.ones(2, 64)
    torch.testing.assert_close(layer(x), F.linear(x, weight.float(), bias.float()))
    assert pack_fp16(weight.float(), bias) is None  # a float32 weight is checked when built


def test_fp16_linear_can_be_packed_while_another_thread_uses_it() -> None:
    weight, bias = _bf16_layer(512, 256)
    layer = Fp16Linear(weight, bias, pack=False)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(5))
    want = F.linear(x, weight.float(), bias.float())
    outputs: list[torch.Tensor] = []
    failures: list[BaseException] = []
    started = threading.Event()

    def use() -> None:
        try:
            started.set()
            while not layer.packed:
                outputs.append(layer(x))
            outputs.append(layer(x))
        except BaseException as e:
            failures.append(e)

    user = threading.Thread(target=use)
    user.start()
    started.wait()
    layer.pack()
    user.join(timeout=30)
    assert not failures and outputs
    for got in outputs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fp16_linear_packed_through_a_scratch_buffer_owns_its_weights() -> None:
    weight, bias = _bf16_layer()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    plain = Fp16Linear(weight, bias)
    scratch = torch.empty(weight.numel() + 10)
    through = Fp16Linear(weight, bias, pack=False)
    through.pack(scratch)
    scratch.fill_(float("nan"))  # reused for the next layer: the packed copy must not see it
    assert through.packed and torch.equal(through(x), plain(x))
    small = Fp16Linear(weight, bias, pack=False)
    small.pack(torch.empty(10))  # too small to use: widened on its own
    assert torch.equal(small(x), plain(x))
