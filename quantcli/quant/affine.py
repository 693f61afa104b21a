"""Affine (scale, zero-point) quantization of weights and activations.

Conventions, shared by every algorithm and every pack format:

* A weight ``w`` has shape ``[out, in]``; with group size ``g`` it is viewed as
  ``[out, in // g, g]`` and every ``(row, group)`` has one ``scale`` and one ``zero``:
  ``scale, zero: [out, in // g]`` (float32; ``zero`` holds integers).
* Codes are unsigned integers in ``[0, 2**bits - 1]``, stored as ``uint8 [out, in]``.
* ``w ≈ (code - zero) * scale``. Symmetric quantization fixes ``zero = 2**(bits-1)`` and
  ``scale = max|w| / ((2**bits - 1) / 2)``, so signed values ``code - zero`` lie in
  ``[-2**(bits-1), 2**(bits-1) - 1]`` (the compressed-tensors / GPTQ convention).
* Asymmetric quantization takes the group's range ``[min(w, 0), max(w, 0)]``, so zero is
  always representable and ``zero`` stays in ``[0, 2**bits - 1]``.
* A clip ratio ``r ∈ (0, 1]`` per ``(row, group)`` (AWQ's clip search, OmniQuant's LWC) shrinks
  that range before the scale is computed: ``[r·min, r·max]``.
* An optional ``g_idx: [in]`` maps each input column to its group (GPTQ act-order without
  static groups); without it column ``j`` belongs to group ``j // g``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantcli.quant.spec import QuantSpec

_EPS = 1e-8


@dataclass
class QuantizedWeight:
    """Integer codes with their quantization parameters; ``dequantize()`` gives the weight back."""

    codes: Tensor  # uint8 [out, in]
    scale: Tensor  # float32 [out, n_groups]
    zero: Tensor  # float32 [out, n_groups], integer-valued
    group: int
    g_idx: Tensor | None = None  # int32 [in] or None

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.group, self.g_idx)


def grouped(w: Tensor, group: int) -> Tensor:
    """View ``[out, in]`` as ``[out, in // group, group]`` (``group`` must divide ``in``)."""
    out_features, in_features = w.shape
    return w.reshape(out_features, in_features // group, group)


def compute_qparams(
    w: Tensor, bits: int, group: int, sym: bool, clip: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Scale and zero of ``w: [out, in]`` per ``(row, group)``; ``clip: [out, in // group]`` or None.

    Returns ``scale, zero: [out, in // group]`` in float32.
    """
    wg = grouped(w.float(), group)
    maxq = 2**bits - 1
    wmax = wg.amax(dim=-1).clamp(min=0)
    wmin = wg.amin(dim=-1).clamp(max=0)
    if clip is not None:
        wmax = wmax * clip
        wmin = wmin * clip
    if sym:
        amax = torch.maximum(wmax, -wmin)
        scale = (amax / (maxq / 2)).clamp(min=_EPS)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = ((wmax - wmin) / maxq).clamp(min=_EPS)
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def _expand(param: Tensor, group: int, g_idx: Tensor | None) -> Tensor:
    """Broadcast ``[out, n_groups]`` parameters to ``[out, in]`` columns."""
    if g_idx is not None:
        return param[:, g_idx.long()]
    return param.repeat_interleave(group, dim=1)


def quantize(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int, g_idx: Tensor | None = None
) -> Tensor:
    """Codes ``uint8 [out, in]``: ``clamp(round(w / scale) + zero, 0, 2**bits - 1)``."""
    s = _expand(scale, group, g_idx)
    z = _expand(zero, group, g_idx)
    return torch.clamp(torch.round(w.float() / s) + z, 0, 2**bits - 1).to(torch.uint8)


def dequantize(
    codes: Tensor, scale: Tensor, zero: Tensor, group: int, g_idx: Tensor | None = None
) -> Tensor:
    """Weights ``float32 [out, in]``: ``(codes - zero) * scale``."""
    s = _expand(scale.float(), group, g_idx)
    z = _expand(zero.float(), group, g_idx)
    return (codes.float() - z) * s


def quantize_weight(w: Tensor, spec: QuantSpec, clip: Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w: [out, in]`` under ``spec`` (optionally clipped)."""
    group = spec.group_for(w.shape[1])
    scale, zero = compute_qparams(w, spec.wbits, group, spec.sym, clip)
    codes = quantize(w, scale, zero, spec.wbits, group)
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, group=group)


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` in the forward pass, identity gradient in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int, ste: bool = True
) -> Tensor:
    """Quantize then dequantize ``w: [out, in]``, differentiable through the rounding (STE).

    Gradients flow to ``w`` (identity inside the clamp range) and to ``scale`` and ``zero``, as
    learnable weight clipping needs.
    """
    rnd = round_ste if ste else torch.round
    s = _expand(scale, group, None)
    z = _expand(zero, group, None)
    q = torch.clamp(rnd(w / s) + z, 0, 2**bits - 1)
    return (q - z) * s


def fake_quantize_activation(x: Tensor, bits: int, sym: bool = False) -> Tensor:
    """Per-token dynamic fake quantization of activations ``x: [..., features]`` (STE rounding).

    Each token (last-dim vector) gets its own scale (and zero when asymmetric), computed on the fly.
    """
    if bits >= 16:
        return x
    maxq = 2**bits - 1
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0)
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0)
    if sym:
        scale = (torch.maximum(xmax, -xmin) / (maxq / 2)).clamp(min=_EPS)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        scale = ((xmax - xmin) / maxq).clamp(min=_EPS)
        zero = torch.round(-xmin / scale)
    q = torch.clamp(round_ste(x / scale) + zero, 0, maxq)
    return (q - zero) * scale
