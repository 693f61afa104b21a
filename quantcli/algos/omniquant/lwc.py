"""Learnable weight clipping (LWC): per ``(row, group)`` clip factors trained through the quantizer.

For a linear's weight ``w: [out, in]`` with group ``g`` the learnable logits ``a_hi, a_lo: [out, in // g]``
give ``γ = σ(a_hi)``, ``β = σ(a_lo)``, and the quantizer covers ``[β·min(w, 0), γ·max(w, 0)]``
(one factor on ``max|w|`` when symmetric): the same :func:`quantcli.quant.choose_qparams` every
other algorithm uses, with straight-through rounding so gradients reach ``a_hi, a_lo``.
Initialised at ``a = 4`` as in the paper, or at ``logit(r)`` from AWQ's clip ratios ``r``
(clamped to ``(ε, 1 − ε)``: an unclipped group, ``r = 1``, still gets a finite start and a gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantcli.errors import ArtifactError
from quantcli.quant import QuantizedWeight, QuantSpec, compute_qparams, fake_quantize, quantize

LWC_INIT = 4.0  # the paper's start: σ(4) ≈ 0.982 of the range
CLIP_EPS = 1e-4  # AWQ clip ratios are clamped to (ε, 1 − ε) before the logit


def clip_logit(r: Tensor, eps: float = CLIP_EPS) -> Tensor:
    """``logit(r)`` of clip ratios clamped to ``(eps, 1 - eps)``: finite also for ``r = 1``."""
    r = r.float().clamp(eps, 1 - eps)
    return torch.log(r) - torch.log1p(-r)


def lwc_init(w: Tensor, spec: QuantSpec, clip: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Initial clip logits ``(a_hi, a_lo)``, each ``[out, in // g]``; ``a_lo`` is None when symmetric.

    ``clip``: AWQ clip ratios ``[out, in // g]`` (start at ``logit(r)``), else the paper's ``a = 4``.
    """
    g = spec.group_for(w.shape[1])
    shape = (w.shape[0], w.shape[1] // g)
    if clip is None:
        a = torch.full(shape, LWC_INIT, device=w.device)
    else:
        if tuple(clip.shape) != shape:
            raise ArtifactError(f"AWQ clip ratios have shape {tuple(clip.shape)}, expected {shape} for this spec")
        a = clip_logit(clip.to(w.device))
    return a, (None if spec.sym else a.clone())


def lwc_qparams(w: Tensor, a_hi: Tensor | None, a_lo: Tensor | None, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero ``[out, in // g]`` of ``w`` from the clipped range, differentiable in ``a_hi, a_lo``.

    ``a_hi = None``: no clipping (plain min/max); ``a_lo = None``: the lower end takes ``a_hi``'s factor.
    """
    hi = None if a_hi is None else torch.sigmoid(a_hi)
    lo = None if a_hi is None or a_lo is None else torch.sigmoid(a_lo)
    return compute_qparams(w, spec.wbits, spec.group_for(w.shape[1]), spec.sym, hi, lo, ste=True)


def lwc_fake_quant(w: Tensor, a_hi: Tensor | None, a_lo: Tensor | None, spec: QuantSpec) -> Tensor:
    """``Q_{γ,β}(w)``: fake-quantized ``w: [out, in]`` with straight-through rounding."""
    scale, zero = lwc_qparams(w, a_hi, a_lo, spec)
    return fake_quantize(w, scale, zero, spec.wbits, spec.group_for(w.shape[1]))


@torch.no_grad()
def lwc_quantize(w: Tensor, a_hi: Tensor | None, a_lo: Tensor | None, spec: QuantSpec) -> QuantizedWeight:
    """Integer codes of ``w`` under the learned clip (what ``lwc_fake_quant`` rounds to)."""
    w = w.float()
    scale, zero = lwc_qparams(w, a_hi, a_lo, spec)
    g = spec.group_for(w.shape[1])
    return QuantizedWeight(quantize(w, scale, zero, spec.wbits, g), scale.float(), zero.float(), g)
