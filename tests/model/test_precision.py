"""Per-phase kernels: one-row products off oneDNN, the load-time choice, int8 weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from moondream_server.model import load
from moondream_server.model import precision as prec
from moondream_server.model.layers import Int8Linear
from moondream_server.model.precision import RowLinear, onednn_off, time_one_row, use_native_gemv


def _linear(n_in: int = 64, n_out: int = 48, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(n_in, n_out).to(dtype)


def test_onednn_off_restores_the_flag() -> None:
    before = torch._C._get_mkldnn_enabled()
    with onednn_off():
        assert torch._C._get_mkldnn_enabled() is False
    assert torch._C._get_mkldnn_enabled() == before
    with pytest.raises(RuntimeError), onednn_off():
        raise RuntimeError("boom")
    assert torch._C._get_mkldnn_enabled() == before


def test_row_linear_routes_only_single_rows_off_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _linear()
    reference = _linear()
    use_native_gemv([layer])
    assert type(layer) is RowLinear
    seen: list[bool] = []
    real = F.linear

    def spy(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(torch._C._get_mkldnn_enabled())
        return real(x, w, b)

    monkeypatch.setattr(prec.F, "linear", spy)
    for shape in [(1, 64), (1, 1, 64), (3, 64)]:
        x = torch.randn(shape, dtype=torch.bfloat16)
        # same parameters, same products (both accumulate in float32) as the untouched layer
        torch.testing.assert_close(layer(x), real(x, reference.weight, reference.bias), rtol=0, atol=2e-2)
    assert seen == [False, False, torch._C._get_mkldnn_enabled()]


def test_use_native_gemv_leaves_other_modules_alone() -> None:
    net = nn.Sequential(_linear(), nn.LayerNorm(48), Int8Linear(torch.randn(8, 48), None, torch.bfloat16))
    assert use_native_gemv([net]) == 1
    assert [type(m) for m in net] == [RowLinear, nn.LayerNorm, Int8Linear]


def test_time_one_row_measures_both_paths() -> None:
    onednn_s, native_s = time_one_row([torch.randn(256, 128, dtype=torch.bfloat16)], reps=2)
    assert onednn_s > 0 and native_s > 0


# (oneDNN, own kernel) seconds: the own kernel is kept unless oneDNN is clearly faster
@pytest.mark.parametrize(("timings", "native"), [((2.0, 1.0), True), ((1.0, 1.2), True), ((1.0, 2.0), False)])
def test_load_keeps_the_faster_one_row_kernel(
    monkeypatch: pytest.MonkeyPatch, random_folder: Path, timings: tuple[float, float], native: bool
) -> None:
    import moondream_server.model.loading as loading

    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(loading, "time_one_row", lambda weights, reps=0: timings)
    model = load(random_folder, device="cpu", dtype="auto")
    assert model.dtype == torch.bfloat16
    assert model.precision is not None and model.precision.compute == "bfloat16"
    kinds = {type(model.net.text.blocks[0].mlp.fc1), type(model.net.region.coord_decoder.fc1)}
    assert kinds == ({RowLinear} if native else {nn.Linear})
    assert type(model.net.vision.blocks[0].mlp.fc1) is nn.Linear  # the encoder never sees one row
    assert ("matrix-vector" in model.precision.decode) is native


def test_load_without_native_bf16_packs_float16(monkeypatch: pytest.MonkeyPatch, random_folder: Path) -> None:
    import moondream_server.model.loading as loading

    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    model = load(random_folder, device="cpu", dtype="auto")
    assert model.dtype == torch.float32
    assert model.precision is not None and model.precision.decode.startswith("fbgemm fp16")


def test_int8_linear_is_close_to_the_float_layer() -> None:
    torch.manual_seed(1)
    w, b = torch.randn(96, 64) / 8, torch.randn(96) / 20
    layer = Int8Linear(w, b, torch.bfloat16)
    assert layer.qweight.dtype == torch.int8 and layer.qweight.shape == (96, 64)
    # per-channel symmetric: every row uses the full int8 range, and dequantizes to within half a step
    assert (layer.qweight.abs().amax(dim=1) == 127).all()
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((layer.qweight.float() * step - w).abs() <= step / 2 + 1e-6).all()
    for rows in (1, Int8Linear.DIRECT_ROWS, Int8Linear.DIRECT_ROWS + 1, 200):  # both kernels
        x = torch.randn(rows, 64)
        exact = F.linear(x, w, b)
        got = layer(x.to(torch.bfloat16)).float()
        assert got.shape == exact.shape
        assert (got - exact).abs().max().item() < 0.05 * exact.abs().max().item()


def test_quantize_int8_replaces_every_linear(random_folder: Path) -> None:
    model = load(random_folder, device="cpu", dtype="bfloat16", quantize="int8")
    assert not [n for n, m in model.net.named_modules() if isinstance(m, nn.Linear)]
    assert model.precision is not None and model.precision.weights.startswith("int8")
    with pytest.raises(ValueError, match="quantize"):
        load(random_folder, device="cpu", quantize="int4")
