"""Weight-activation quantized linears for ``quant bench``: int8 × int8 → int32 GEMM.

``y = (q_x · q_wᵀ) · s_x · s_w`` with ``q_x = round(x / s_x)`` per token (symmetric int8,
``s_x = max|x_t| / 127``, computed in the timed forward) and ``q_w = codes − zero`` per output
channel (``s_w`` one scale per row). The GEMM is ``torch._int_mm`` (``int8 [M, K] @ int8 [K, N] →
int32 [M, N]``). Any per-channel weight of ≤ 8 bits fits (W8A8 and W4A8 alike); 8-bit asymmetric
codes whose ``codes − zero`` leaves ``[−128, 127]`` are stored as ``codes − 128`` with the per-row
correction ``(128 − zero)·s_w·Σ_k x_k``.

The activation quantization (absmax, divide, round, cast: five passes over the input in eager
mode) and the epilogue (cast, two scalings, cast back) cost more than the GEMM itself at
prefill sizes; :func:`fused_int8_linear` compiles the whole call with ``torch.compile`` (dynamic
in the number of rows, so one compile per weight shape serves every prompt length), so each of
them is one pass, and falls back to the eager function, saying why, where it cannot compile.

On CUDA ``_int_mm`` needs ``M > 16`` and ``K``, ``N`` multiples of 8: decode steps (``M = 1``) are
padded to 17 rows. Weights the kernel cannot take (grouped scales) run as a dequantized linear
with per-token fake-quantized inputs, reported as a fallback (``dequant-fp+fake-act``), never silently.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantcli.bench.kernels import INT8_LABEL, LayerKernel, checked_compile, centred_int8, code_bits, dequantized_linear
from quantcli.quant.act import fake_quant_per_token, quantize_per_token_int8
from quantcli.quant.affine import QuantizedWeight
from quantcli.quant.spec import QuantSpec

INT_MM = "aten._int_mm (int8 x int8 -> int32, per-token dynamic activations)"
FORWARD_FUSED = "activation quantization and epilogue fused (torch.compile)"
FORWARD_EAGER = "eager (activation quantization and epilogue op by op)"
FALLBACK = "dequant-fp+fake-act"
CUDA_MIN_ROWS = 17


def int_mm_available(device: torch.device) -> str:
    """Why ``torch._int_mm`` cannot run on ``device`` ("" when it can)."""
    if not hasattr(torch, "_int_mm"):
        return "this torch has no torch._int_mm"
    if device.type not in ("cpu", "cuda"):
        return f"no int8 GEMM on {device.type}"
    try:
        a = torch.ones(CUDA_MIN_ROWS + 15, 32, dtype=torch.int8, device=device)
        torch._int_mm(a, torch.ones(32, 32, dtype=torch.int8, device=device))
    except RuntimeError as err:
        return str(err).splitlines()[0]
    return ""


def w8a8_unsupported(qw: QuantizedWeight, device: torch.device) -> str:
    """Why the int8 GEMM cannot take ``qw`` ("" when it can)."""
    if qw.scale.shape[1] != 1:
        return f"group {qw.group} < in_features: the int8 GEMM takes one weight scale per output channel"
    if qw.g_idx is not None:
        return "act-order g_idx"
    out_features, in_features = qw.codes.shape
    if device.type == "cuda" and (in_features % 8 or out_features % 8):
        return f"in/out features {in_features}/{out_features} are not multiples of 8 (CUDA _int_mm)"
    return int_mm_available(device)


def int8_linear(x: Tensor, weight_t: Tensor, w_scale: Tensor, row_offset: Tensor | None, bias: Tensor | None) -> Tensor:
    """``x: [M, K]`` (any float dtype) through the int8 GEMM: per-token symmetric int8 codes of
    ``x``, ``_int_mm`` with ``weight_t: int8 [K, N]``, then ``· s_x · w_scale`` (``[N]``), plus the
    8-bit asymmetric ``row_offset · Σ x̂`` and ``bias`` when given. Returns ``[M, N]`` in x's dtype."""
    q, s_x = quantize_per_token_int8(x)
    y = torch._int_mm(q, weight_t).float() * s_x * w_scale
    if row_offset is not None:
        y = y + (q.float() * s_x).sum(dim=1, keepdim=True) * row_offset
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


_FUSED: dict[str, tuple] = {}  # device type → (forward, how)


def fused_int8_linear(device: torch.device) -> tuple:
    """``(forward, how)``: :func:`int8_linear` compiled by ``torch.compile`` (dynamic rows), checked
    once per process and device type against the eager function on a probe (outputs within 1 %,
    with and without the row offset and bias), or the eager function with ``how`` saying why not."""
    device = torch.device(device)
    if device.type not in _FUSED:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(CUDA_MIN_ROWS + 15, 64, generator=gen).to(device, torch.bfloat16)
        args = (torch.randint(-127, 128, (64, 32), dtype=torch.int8, generator=gen).to(device), torch.rand(32, generator=gen).to(device))
        extras = (torch.randn(32, generator=gen).to(device), torch.randn(32, generator=gen).to(device))

        def agrees(compiled) -> bool:
            return all(torch.allclose(compiled(x, *args, *e).float(), int8_linear(x, *args, *e).float(), rtol=1e-2, atol=1e-2)
                       for e in ((None, None), extras))

        fn, why = checked_compile(int8_linear, True, agrees)
        _FUSED[device.type] = (fn, f"{FORWARD_EAGER}; {why}" if why else FORWARD_FUSED)
    return _FUSED[device.type]


class Int8DynamicLinear(nn.Module):
    """``y ≈ x @ wᵀ + b`` through an int8 GEMM with per-token dynamic activation quantization.

    Buffers: ``weight_t`` int8 ``[K, N]``, ``w_scale`` float32 ``[N]``, optional ``row_offset``
    float32 ``[N]`` and ``bias`` ``[N]``. Input ``[..., K]`` of any float dtype, output of the same dtype.
    """

    def __init__(self, weight_t: Tensor, w_scale: Tensor, bias: Tensor | None = None, row_offset: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        self.register_buffer("weight_t", weight_t)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("row_offset", row_offset)
        self.register_buffer("bias", bias)
        self.kernel = INT_MM
        self.forward_int8, self.forward_how = fused_int8_linear(weight_t.device)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Tensor | None, device: torch.device) -> "Int8DynamicLinear":
        signed, scale, row_offset = centred_int8(qw)
        return cls(
            signed.t().contiguous().to(device),
            scale.to(device),
            bias=None if bias is None else bias.detach().float().to(device),
            row_offset=None if row_offset is None else row_offset.to(device),
        )

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if x2.device.type == "cuda" and rows < CUDA_MIN_ROWS:  # zero rows quantize to zero codes
            x2 = torch.nn.functional.pad(x2, (0, 0, 0, CUDA_MIN_ROWS - rows))
        with torch.profiler.record_function(INT8_LABEL):  # profiled as the linear's time (bench --profile-steps)
            y = self.forward_int8(x2, self.weight_t, self.w_scale, self.row_offset, self.bias)[:rows]
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


class FakeActLinear(nn.Module):
    """Fallback: per-token fake-quantized input (``abits``) into a dequantized ``nn.Linear``."""

    def __init__(self, linear: nn.Linear, abits: int, sym: bool):
        super().__init__()
        self.linear, self.abits, self.sym = linear, abits, sym
        self.kernel = FALLBACK

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(fake_quant_per_token(x, self.abits, self.sym))


def build_w8a8(
    qw: QuantizedWeight, bias: Tensor | None, device: torch.device, dtype: torch.dtype, spec: QuantSpec
) -> tuple[nn.Module, LayerKernel]:
    """The int8-GEMM module for one weight-activation quantized linear, or the fallback (a dequantized
    linear in ``dtype`` behind activation fake quant) with the reason in the :class:`LayerKernel`."""
    device = torch.device(device)
    why = "" if spec.abits == 8 else f"{spec.abits}-bit activations: the int8 GEMM takes 8-bit activations only"
    why = why or w8a8_unsupported(qw, device)
    if not why:
        return Int8DynamicLinear.from_quantized(qw, bias, device), LayerKernel(INT_MM, code_bits(qw), qw.group)
    fallback = FakeActLinear(dequantized_linear(qw, bias, device, dtype), spec.abits, spec.act_sym)
    return fallback, LayerKernel(FALLBACK, code_bits(qw), qw.group, f"int8 GEMM: {why}")


def w8a8_builder(spec: QuantSpec):
    """``builder(qw, bias, device, dtype)`` for :func:`quantcli.bench.kernels.swap_in_kernels`."""
    return lambda qw, bias, device, dtype: build_w8a8(qw, bias, device, dtype, spec)
