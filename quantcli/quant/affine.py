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
  that range before the scale is computed: ``[r·min, r·max]`` (LWC: one ratio per end).
* The formula lives once, in :func:`choose_qparams` (scale/zero of last-dim blocks) →
  :func:`quantize_affine` → :func:`dequantize_affine`; weights, activations, GPTQ's columns,
  AWQ's clip search and OmniQuant's LWC all go through it.
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


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` in the forward pass, identity gradient in the backward pass (straight-through)."""
    return x + (torch.round(x) - x).detach()


def clip_range(x: Tensor, clip_hi: Tensor | None = None, clip_lo: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The range ``[lo, hi]`` over the last dim of ``x: [..., n]`` that the quantizer covers: ``[...]`` each.

    ``lo = clip_lo · min(x, 0)``, ``hi = clip_hi · max(x, 0)`` (zero always inside); ``clip_lo``
    defaults to ``clip_hi``, and no ratio means the full range. Differentiable in the ratios.
    """
    hi = x.amax(dim=-1).clamp(min=0)
    lo = x.amin(dim=-1).clamp(max=0)
    if clip_hi is not None:
        hi = hi * clip_hi
        lo = lo * (clip_hi if clip_lo is None else clip_lo)
    return lo, hi


def choose_qparams(
    x: Tensor, bits: int, sym: bool, clip_hi: Tensor | None = None, clip_lo: Tensor | None = None, ste: bool = False
) -> tuple[Tensor, Tensor]:
    """Scale and zero of each last-dim block of ``x: [..., n]`` (``scale, zero: [...]``): THE quantizer formula.

    Weights pass ``grouped(w, g)`` (one block per ``(row, group)``), activations ``[tokens, C]``
    (one per token). Over the clipped range ``[lo, hi]`` (:func:`clip_range`):

    * asymmetric: ``scale = (hi − lo) / (2**bits − 1)``, ``zero = clamp(round(−lo / scale), 0, 2**bits − 1)``;
    * symmetric: ``scale = max(hi, −lo) / ((2**bits − 1) / 2)``, ``zero = 2**(bits−1)``.

    ``scale ≥ 1e-8``. Built without in-place ops, so it is differentiable in ``x`` and the clip
    ratios (learnable clipping); ``ste=True`` rounds the zero straight-through, else its gradient is 0.
    """
    maxq = 2**bits - 1
    lo, hi = clip_range(x, clip_hi, clip_lo)
    if sym:
        scale = (torch.maximum(hi, -lo) / (maxq / 2)).clamp(min=_EPS)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    scale = ((hi - lo) / maxq).clamp(min=_EPS)
    zero = torch.clamp((round_ste if ste else torch.round)(-lo / scale), 0, maxq)
    return scale, zero


def quantize_affine(x: Tensor, scale: Tensor, zero: Tensor, bits: int, ste: bool = False) -> Tensor:
    """Integer levels (as floats) ``clamp(round(x / scale) + zero, 0, 2**bits − 1)``; ``scale, zero`` broadcast to ``x``.

    ``ste=True``: straight-through rounding (identity gradient inside the clamp range).
    """
    return torch.clamp((round_ste if ste else torch.round)(x / scale) + zero, 0, 2**bits - 1)


def dequantize_affine(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``(q − zero) · scale`` with ``scale, zero`` broadcast to ``q``."""
    return (q - zero) * scale


def compute_qparams(
    w: Tensor, bits: int, group: int, sym: bool, clip: Tensor | None = None, clip_lo: Tensor | None = None, ste: bool = False
) -> tuple[Tensor, Tensor]:
    """Scale and zero of ``w: [out, in]`` per ``(row, group)`` (:func:`choose_qparams` on ``grouped(w, group)``).

    ``clip`` (upper, and lower unless ``clip_lo`` is given): ratios ``[out, in // group]`` or None.
    Returns ``scale, zero: [out, in // group]`` in float32.
    """
    return choose_qparams(grouped(w.float(), group), bits, sym, clip, clip_lo, ste)


def _expand(param: Tensor, group: int, g_idx: Tensor | None) -> Tensor:
    """Broadcast ``[out, n_groups]`` parameters to ``[out, in]`` columns."""
    if g_idx is not None:
        return param[:, g_idx.long()]
    return param.repeat_interleave(group, dim=1)


def _per_group(fn, x: Tensor, scale: Tensor, zero: Tensor, group: int, g_idx: Tensor | None) -> Tensor:
    """``fn(x, scale, zero)`` elementwise with each ``(row, group)`` parameter applied to its columns:
    contiguous groups broadcast over ``grouped(x)`` (no ``[out, in]`` copies of the parameters),
    a ``g_idx`` map gathers them per column. Same arithmetic per element either way."""
    if g_idx is not None:
        return fn(x, _expand(scale, group, g_idx), _expand(zero, group, g_idx))
    return fn(grouped(x, group), scale.unsqueeze(-1), zero.unsqueeze(-1)).reshape(x.shape)


def quantize(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int, g_idx: Tensor | None = None
) -> Tensor:
    """Codes ``uint8 [out, in]``: ``clamp(round(w / scale) + zero, 0, 2**bits - 1)``."""
    def codes(x: Tensor, s: Tensor, z: Tensor) -> Tensor:  # quantize_affine's arithmetic, in place on one buffer
        return torch.div(x, s).round_().add_(z).clamp_(0, 2**bits - 1)

    return _per_group(codes, w.float(), scale, zero, group, g_idx).to(torch.uint8)


def dequantize(
    codes: Tensor, scale: Tensor, zero: Tensor, group: int, g_idx: Tensor | None = None
) -> Tensor:
    """Weights ``float32 [out, in]``: ``(codes - zero) * scale``."""
    def weights(q: Tensor, s: Tensor, z: Tensor) -> Tensor:  # dequantize_affine's arithmetic, in place on one buffer
        return q.to(torch.float32, copy=True).sub_(z).mul_(s)

    return _per_group(weights, codes, scale.float(), zero.float(), group, g_idx)


def quantize_weight(w: Tensor, spec: QuantSpec, clip: Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w: [out, in]`` under ``spec`` (optionally clipped)."""
    group = spec.group_for(w.shape[1])
    scale, zero = compute_qparams(w, spec.wbits, group, spec.sym, clip)
    codes = quantize(w, scale, zero, spec.wbits, group)
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, group=group)


def fake_quantize(
    w: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int, ste: bool = True
) -> Tensor:
    """Quantize then dequantize ``w: [out, in]``, differentiable through the rounding (STE).

    Gradients flow to ``w`` (identity inside the clamp range) and to ``scale`` and ``zero``, as
    learnable weight clipping needs.
    """
    return _per_group(lambda x, s, z: dequantize_affine(quantize_affine(x, s, z, bits, ste), s, z), w, scale, zero, group, None)


def fake_quantize_activation(x: Tensor, bits: int, sym: bool = False) -> Tensor:
    """Per-token dynamic fake quantization of activations ``x: [..., features]`` (STE rounding).

    Each token (last-dim vector) gets its own scale (and zero when asymmetric), computed on the fly.
    """
    if bits >= 16:
        return x
    scale, zero = choose_qparams(x, bits, sym)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return dequantize_affine(quantize_affine(x, scale, zero, bits, ste=True), scale, zero)
