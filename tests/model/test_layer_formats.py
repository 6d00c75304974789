"""Weight formats chosen at load: the float16-storage test and int8 quantization, against definitions."""

from __future__ import annotations

import torch

from moondream_server.model.layers import FP16_TOLERANCE, Int8Linear, fp16_lossless


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
