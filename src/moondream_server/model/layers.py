"""Small building blocks shared by the vision, text and region networks."""

from __future__ import annotations

from collections.abc import Callable

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


class FusedGeluMLP(MLP):
    """``MLP`` whose many-row fc1 runs as one oneDNN GEMM with the bias and the GELU applied to
    its float32 accumulators before they are stored (CPU only).

    Unfused, a bf16 GEMM writes the bias first (a copy of the bias into every output row), then
    multiplies, then GELU reads and writes the whole activation once more: for the vision
    encoder's 6561 x 4304 activations that is ~25% on top of the GEMM itself. The fused GELU is
    computed before the bf16 rounding instead of after it, a difference of one bf16 rounding.
    One-row inputs (decode steps) keep the plain path, whose kernel ``precision.py`` chose.
    Switched in place (same parameters) by ``use_fused_gelu``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1 = self.fc1
        if isinstance(fc1, Int8ComputeLinear):
            return self.fc2(fc1(x, "gelu"))
        if x.device.type != "cpu" or x.numel() == fc1.in_features:
            return super().forward(x)
        flat = x.reshape(-1, fc1.in_features)
        h = torch.ops.mkldnn._linear_pointwise(flat, fc1.weight, fc1.bias, "gelu", [], "tanh")
        return self.fc2(h.view(*x.shape[:-1], fc1.out_features))  # type: ignore[no-any-return]


def fused_gelu_works(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build has oneDNN's fused linear + GELU for `dtype`, and it computes
    what the unfused layer computes (to a few roundings of `dtype`)."""
    return _onednn_available() and _product_is_right(
        lambda x, w, b: torch.ops.mkldnn._linear_pointwise(
            x, w.to(x.dtype), b.to(x.dtype), "gelu", [], "tanh"
        ),
        dtype,
    )


def _onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]


def _product_is_right(
    product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    gelu: bool = True,
) -> bool:
    """Load-time self-check of a private kernel: x @ w.T + b (then GELU, with `gelu`) for x in
    `dtype` (w, b in float32) lands near the float64 product, and the kernel exists in this build."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 64, generator=gen).to(dtype)
    w = torch.randn(96, 64, generator=gen) / 8
    b = torch.randn(96, generator=gen)
    try:
        with torch.inference_mode():
            y = product(x, w, b)
    except (RuntimeError, NotImplementedError):
        return False
    exact = F.linear(x.double(), w.double(), b.double())
    if gelu:
        exact = F.gelu(exact, approximate="tanh")
    return y.shape == exact.shape and bool((y.double() - exact).abs().max() < 0.1)


def use_fused_gelu(modules: list[nn.Module]) -> int:
    """Switch every ``MLP`` under `modules` whose fc1 is a plain linear layer to ``FusedGeluMLP``."""
    count = 0
    for root in modules:
        for m in root.modules():
            if type(m) is MLP and isinstance(m.fc1, nn.Linear | Int8ComputeLinear):
                m.__class__ = FusedGeluMLP
                count += 1
    return count


class Fp16Linear(nn.Module):
    """Inference-only stand-in for ``nn.Linear`` on the CPU: 16-bit weights, float32 arithmetic.

    Two ways to multiply, by the same numbers: widened (each call converts the 16-bit weight to
    float32 for MKL's GEMM) or packed (fbgemm's fp16-weight GEMM widens inside the kernel). Both
    accumulate in float32, so where the 16-bit values hold the weight (``fp16_lossless``, as for
    the official bf16 checkpoint) the layer computes what ``nn.Linear`` computes in float32, up
    to summation order. Packed is 3-25x faster for 1-40 rows (decode, short prompts) and reads
    half the bytes; for thousands of rows (the vision encoder) it is ~6 % faster. fbgemm packs at
    ~9 ns per weight on one core, so a layer built with ``pack=False`` computes widened at once
    and ``pack`` may run later, on another thread, while the layer is in use.
    A bf16 weight widens exactly whatever its values; one that float16 cannot hold (beyond its
    range) is never packed and keeps computing widened.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pack: bool = True) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        held = weight.detach()
        if held.dtype not in (torch.bfloat16, torch.float16):
            held = held.to(torch.float16)  # the numbers fbgemm would round it to when packing
        # Buffers, so that the loader sees the layer holding the checkpoint's pages of its weight.
        # ``pack`` sets ``_packed`` before it drops ``weight16``; ``forward`` reads them in the
        # opposite order, so it always finds one of them.
        self.weight16: torch.Tensor | None
        self.bias32: torch.Tensor | None
        self.register_buffer("weight16", held, persistent=False)
        self.register_buffer("bias32", None if bias is None else bias.detach().float(), persistent=False)
        self._packed: torch.ScriptObject | None = None
        if pack:
            self.pack()

    @property
    def packed(self) -> bool:
        return self._packed is not None

    def pack(self, scratch: torch.Tensor | None = None) -> torch.Tensor | None:
        """Pack the weight for fbgemm; returns the 16-bit tensor let go, None when already packed
        or when float16 cannot hold it.

        fbgemm takes float32: the weight is widened into `scratch` (float32, reused by the
        caller) when it is large enough, which skips faulting in fresh pages for every layer
        (0.23 against 1.9 ns per weight, beside fbgemm's own ~7.9).
        """
        weight = self.weight16
        if weight is None or (weight.dtype == torch.bfloat16 and not fp16_lossless(weight)):
            return None
        if scratch is not None and scratch.numel() >= weight.numel():
            wide = scratch[: weight.numel()].view(weight.shape).copy_(weight)
        else:
            wide = weight.float()
        self._packed = torch.ops.quantized.linear_prepack_fp16(wide, self.bias32)
        self.weight16 = None
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        weight = self.weight16
        packed = self._packed
        y: torch.Tensor
        if packed is not None:
            y = torch.ops.quantized.linear_dynamic_fp16(flat, packed)
        else:
            assert weight is not None
            y = F.linear(flat, weight.float(), self.bias32)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        how = "packed" if self.packed else "widened per call"
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=16-bit {how}"


# Float16's subnormal spacing is 2**-24, so round-to-nearest moves a value below its normal range
# (|v| < 2**-14) by at most 2**-25; values in the normal range must survive unchanged.
FP16_TOLERANCE = 2.0**-25
_FP16_MAX = torch.finfo(torch.float16).max


def fp16_lossless(weight: torch.Tensor) -> bool:
    """True when float16 holds `weight` exactly, up to the tiniest values' 3e-8 rounding.

    bf16 checkpoints (as the official one) pass: float16 has more mantissa bits than bf16, and
    their values are far inside its range. The 3e-8 moves of near-zero weights are below float32
    accumulation noise for these layer widths. Float32 checkpoints fail (23 mantissa bits).
    """
    if weight.dtype == torch.bfloat16:
        # bf16 carries 8 significant bits, float16 11: every bf16 value in float16's normal range
        # converts exactly, and below it the rounding is at most half float16's subnormal spacing,
        # 2**-25. So only a magnitude beyond float16's largest finite value (65504), an infinity
        # or a NaN fails the test below, and one pass over the bf16 data finds those.
        low, high = (float(v) for v in torch.aminmax(weight.detach()))
        return low >= -_FP16_MAX and high <= _FP16_MAX  # False for NaN
    exact = weight.float()  # compare in float32, whatever the stored dtype
    back = exact.to(torch.float16).float()
    return bool((back - exact).abs().max() <= FP16_TOLERANCE)


def pack_fp16(
    weight: torch.Tensor, bias: torch.Tensor | None, *, exact_only: bool = True, pack: bool = True
) -> Fp16Linear | None:
    """An ``Fp16Linear`` for these tensors; None when `exact_only` and 16 bits cannot hold them.

    A bf16 weight is always held as it is (whether float16 holds it is checked when packing);
    the bias is kept in float32 either way, as fbgemm keeps it.
    """
    if exact_only and weight.dtype != torch.bfloat16 and not fp16_lossless(weight):
        return None
    return Fp16Linear(weight, bias, pack=pack)


class Int8Linear(nn.Module):
    """Inference-only stand-in for ``nn.Linear``: int8 weights, one scale per output channel.

    Symmetric per-channel quantization (scale = max |w| / 127 of each row): half the bytes of a
    16-bit weight. Up to ``DIRECT_ROWS`` rows (decode steps, batched decode, short prompts) go
    through PyTorch's int8-weight kernel (``_weight_int8pack_mm``: bf16 activations, the int8
    weights widened in registers). Longer inputs (prompt and image prefill) are compute-bound,
    where that kernel is ~4x slower than oneDNN's bf16 GEMM. With ``int8_rows`` (set at load on
    CPUs with int8 dot products) they are multiplied in int8 against the same int8 weights:
    each row quantized on its own (symmetric, one scale per token, so a token's result never
    depends on what else shares the packed batch), int32 accumulators scaled back to float
    (``_int8_row_product``); so is a lone row (a decode step with nothing beside it), where
    ``torch._int_mm`` streams the weights ~1.3x faster than the int8-weight kernel (24 text
    layers: 47.6 against 63.6 ms, Zen 4), though not 2-16 rows (2-2.5x slower there).
    Otherwise the layer's weights are widened to the compute dtype for that one call.
    """

    DIRECT_ROWS = 16

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
        *,
        int8_rows: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.int8_rows = int8_rows
        q, scale = _quantize_rows(weight.detach())
        self.register_buffer("qweight", q, persistent=False)
        # the int8 kernel wants its scales in the activations' dtype (bf16 there)
        self.register_buffer("scale", scale.to(torch.bfloat16), persistent=False)
        self.register_buffer("wide_scale", scale.to(compute_dtype), persistent=False)
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(compute_dtype), persistent=False
        )
        self.qweight: torch.Tensor
        self.scale: torch.Tensor
        self.wide_scale: torch.Tensor
        self.bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y: torch.Tensor
        rows = flat.shape[0]
        if self.int8_rows and (rows == 1 or rows > self.DIRECT_ROWS):
            y = _int8_row_product(flat, self.qweight, self.wide_scale, self.bias).to(x.dtype)
        elif rows <= self.DIRECT_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.qweight, self.scale)
            y = y.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        else:
            w = self.qweight.to(self.compute_dtype).mul_(self.wide_scale[:, None])
            y = F.linear(flat.to(self.compute_dtype), w, self.bias).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=int8"


def _int8_row_product(
    x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x @ (qweight * wscale).T + bias with x quantized to int8 row by row (symmetric).

    ``torch._int_mm`` multiplies int8 by int8 into int32 on the plain int8 weights that decode
    reads (no second, repacked copy). For a 730-token prefill through a 2048 -> 8192 layer:
    36 ms against 58 ms for oneDNN's bf16 GEMM (Zen 4, 2 threads), quantization included.
    """
    xf = x.float()
    row_scale = xf.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127.0)
    xq = torch.div(xf, row_scale).round_().clamp_(-127, 127).to(torch.int8)  # never in place: x may be xf
    # The float32 result takes the compute-dtype scales and bias in place, widened exactly inside
    # the ops: no float32 copies of them made per call (two per layer of every decode step).
    y = torch._int_mm(xq, qweight.t()).float().mul_(row_scale).mul_(wscale)
    if bias is not None:
        y.add_(bias)
    return y


def int8_rows_work() -> bool:
    """Whether this PyTorch build multiplies int8 matrices on the CPU (``torch._int_mm``) and the
    row-quantized product lands near the float one."""
    return _product_is_right(
        lambda x, w, b: Int8Linear(w, b, x.dtype, int8_rows=True)(x), torch.float32, gelu=False
    )


# Elements quantized per pass: the float32 work block (1 MiB) stays in a core's cache (whole-layer
# passes over a fresh float32 copy took 2.5-5x longer), and it is large enough that the seven
# small ops per block cost little Python: with 32,767 (PyTorch's intra-op grain) the loader's
# threads spent most of their time in dispatch, 2.5 ns per weight against 0.63 here (Zen 4, two
# threads, intra-op parallelism off as ``build_and_load`` sets it).
_QUANT_BLOCK = 262144


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (round(w / scale) clamped to +-127, scale = max |row| / 127).

    Computed in float32 a block of rows at a time (each row's scale depends on that row only),
    as w * (1 / scale) like the whole-matrix expression it replaces, so the result is the same.
    """
    rows, cols = w.shape
    q = torch.empty((rows, cols), dtype=torch.int8, device=w.device)
    scale = torch.empty(rows, dtype=torch.float32, device=w.device)
    step = max(1, _QUANT_BLOCK // max(1, cols))
    work = torch.empty((min(step, rows), cols), dtype=torch.float32, device=w.device)
    for i in range(0, rows, step):
        block = work[: min(step, rows - i)].copy_(w[i : i + step])
        part = scale[i : i + step]
        torch.amax(block.abs(), dim=1, out=part)
        part.clamp_min_(1e-12).div_(127.0)
        block.mul_(part.reciprocal()[:, None]).round_().clamp_(-127, 127)
        q[i : i + step].copy_(block)
    return q, scale


def pack_int8(
    weight: torch.Tensor, bias: torch.Tensor | None, *, compute_dtype: torch.dtype, int8_rows: bool = False
) -> Int8Linear:
    return Int8Linear(weight, bias, compute_dtype, int8_rows=int8_rows)


class Int8ComputeLinear(nn.Module):
    """Int8 weights and int8 arithmetic (oneDNN's u8 x s8 GEMM: VNNI / AMX instructions).

    Made from an ``Int8Linear`` (same int8 weights and per-channel scales, repacked once for
    oneDNN; the plain copy is dropped). The activations are quantized on the fly to uint8 with
    one scale and zero point per leading index (each crop of a vision batch: a crop's result
    never depends on what else shares its batch); the products accumulate in int32 and come
    back in the activations' dtype with the bias (and optionally the GELU) applied in the same
    kernel. ~2x the bf16 GEMM's speed on the vision encoder's shapes on a Zen 4; what it costs in
    accuracy is measured with ``benchmarks/golden_check.py`` (README, Performance).
    """

    def __init__(self, layer: Int8Linear) -> None:
        super().__init__()
        self.out_features, self.in_features = layer.out_features, layer.in_features
        self.packed = torch.ops.onednn.qlinear_prepack(layer.qweight, None)
        self.wscale = layer.wide_scale.float()
        self.zero_points = torch.zeros(self.out_features, dtype=torch.long)
        self.bias = None if layer.bias is None else layer.bias.float()

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        groups = [rows] if x.dim() < 3 else list(x.reshape(x.shape[0], -1, self.in_features))
        outs = [self._product(g, activation) for g in groups]
        y = outs[0] if len(outs) == 1 else torch.stack(outs)
        return y.view(*x.shape[:-1], self.out_features)

    def _product(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        lo_hi = torch.aminmax(x)
        lo, hi = min(float(lo_hi.min), 0.0), max(float(lo_hi.max), 0.0)
        scale = (hi - lo) / 255.0 or 1.0
        zero = min(255, max(0, round(-lo / scale)))
        q = x.float().div_(scale).round_().add_(zero).clamp_(0, 255).to(torch.uint8)
        algorithm = "tanh" if activation == "gelu" else ""
        y: torch.Tensor = torch.ops.onednn.qlinear_pointwise(
            q, scale, zero, self.packed, self.wscale, self.zero_points, self.bias,
            1.0, 0, x.dtype, activation, [], algorithm,
        )  # fmt: skip
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=int8, compute=int8"


def int8_compute_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN's int8 GEMM runs in this build and lands near the float product with
    output in `dtype` (with torch 2.13 only bf16 does: float32 outputs come back wrong)."""
    return _onednn_available() and _product_is_right(
        lambda x, w, b: Int8ComputeLinear(Int8Linear(w, b, x.dtype))(x, "gelu"), dtype
    )


def use_int8_compute(modules: list[nn.Module]) -> int:
    """Replace every ``Int8Linear`` under `modules` by an ``Int8ComputeLinear``; returns how many."""
    count = 0
    for root in modules:
        for name, m in list(root.named_modules()):
            if type(m) is Int8Linear:
                parent_name, _, attr = name.rpartition(".")
                setattr(root.get_submodule(parent_name) if parent_name else root, attr, Int8ComputeLinear(m))
                count += 1
    return count
