"""Activation and KV-cache quantization math: tensors in, tensors out.

Activations ``x: [..., C]`` are quantized either

* per token, dynamically: each last-dim vector gets its own scale (and zero) at run time, or
* per tensor, statically: one ``scale`` (and ``zero``) calibrated beforehand, stored in the artifact.

Codes are unsigned in ``[0, 2**bits − 1]``; ``x ≈ (code − zero)·scale``. Symmetric activations fix
``zero = 2**(bits−1)`` and ``scale = max|x| / ((2**bits − 1) / 2)``; asymmetric ones take the range
``[min(x, 0), max(x, 0)]``. Rounding is straight-through (identity gradient), as training needs.

KV cache: keys and values ``[B, heads, T, head_dim]`` are quantized per head and per token (one
scale over ``head_dim``), which is :func:`fake_quant_per_token` on the last dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantcli.quant.affine import round_ste

_EPS = 1e-8


def act_qparams(xmax: Tensor, xmin: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero from a range ``[xmin, xmax]`` (any matching shapes; 0 is always representable)."""
    maxq = 2**bits - 1
    xmax, xmin = xmax.clamp(min=0), xmin.clamp(max=0)
    if sym:
        scale = (torch.maximum(xmax, -xmin) / (maxq / 2)).clamp(min=_EPS)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    scale = ((xmax - xmin) / maxq).clamp(min=_EPS)
    return scale, torch.round(-xmin / scale).clamp(0, maxq)


def fake_quant_with(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """``(clamp(round(x / scale) + zero, 0, 2**bits − 1) − zero)·scale`` with broadcastable ``scale, zero``."""
    q = torch.clamp(round_ste(x / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def fake_quant_per_token(x: Tensor, bits: int, sym: bool = False) -> Tensor:
    """Per-token dynamic fake quant of ``x: [..., C]`` (one scale/zero per last-dim vector)."""
    if bits >= 16:
        return x
    scale, zero = act_qparams(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True), bits, sym)
    return fake_quant_with(x, scale, zero, bits)


def observe_range(x: Tensor, running: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Running per-tensor ``(max, min)`` of ``x`` (scalars, float32), updated from ``running``."""
    hi, lo = x.detach().amax().float(), x.detach().amin().float()
    if running is None:
        return hi, lo
    return torch.maximum(running[0], hi.to(running[0])), torch.minimum(running[1], lo.to(running[1]))


def static_qparams(running: tuple[Tensor, Tensor], bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Per-tensor static ``scale, zero`` (scalars) from a calibrated range (:func:`observe_range`)."""
    return act_qparams(running[0], running[1], bits, sym)


def quantize_per_token_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-token int8 codes of ``x: [M, K]``: ``(q int8 [M, K], scale float32 [M, 1])``,
    ``x ≈ q·scale`` with ``q ∈ [−127, 127]`` (the input an int8 × int8 GEMM takes)."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / 127).clamp(min=_EPS)
    q = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale
