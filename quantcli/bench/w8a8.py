"""Weight-activation quantized linears for ``quant bench``: int8 × int8 → int32 GEMM.

``y = (q_x · q_wᵀ) · s_x · s_w`` with ``q_x = round(x / s_x)`` per token (symmetric int8,
``s_x = max|x_t| / 127``, computed in the timed forward) and ``q_w = codes − zero`` per output
channel (``s_w`` one scale per row). The GEMM is ``torch._int_mm`` (``int8 [M, K] @ int8 [K, N] →
int32 [M, N]``). Any per-channel weight of ≤ 8 bits fits (W8A8 and W4A8 alike); 8-bit asymmetric
codes whose ``codes − zero`` leaves ``[−128, 127]`` are stored as ``codes − 128`` with the per-row
correction ``(128 − zero)·s_w·Σ_k x_k``.

On CUDA ``_int_mm`` needs ``M > 16`` and ``K``, ``N`` multiples of 8: decode steps (``M = 1``) are
padded to 17 rows. Weights the kernel cannot take (grouped scales) run as a dequantized linear
with per-token fake-quantized inputs, reported as a fallback (``dequant-fp+fake-act``), never silently.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantcli.bench.kernels import LayerKernel, centred_int8, code_bits, dequantized_linear
from quantcli.quant.act import fake_quant_per_token, quantize_per_token_int8
from quantcli.quant.affine import QuantizedWeight
from quantcli.quant.spec import QuantSpec

INT_MM = "aten._int_mm (int8 x int8 -> int32, per-token dynamic activations)"
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
        q, s_x = quantize_per_token_int8(x2)
        if x2.device.type == "cuda" and rows < CUDA_MIN_ROWS:
            q = torch.nn.functional.pad(q, (0, 0, 0, CUDA_MIN_ROWS - rows))
        acc = torch._int_mm(q, self.weight_t)[:rows]
        y = acc.float() * s_x * self.w_scale
        if self.row_offset is not None:
            y = y + (q[:rows].float() * s_x).sum(dim=1, keepdim=True) * self.row_offset
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

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
