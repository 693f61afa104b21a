"""Learnable equivalent transforms (LET): a positive channel scale per foldable scaling group.

For a scaling group ``prev → linears`` of the architecture table and ``s: [C_prev]``, ``prev``'s
output channels are divided by ``s`` and every consumer's input columns multiplied by ``s`` (under
GQA, v→o, each ``o_proj`` column takes the scale of the value channel feeding it:
``scaling.channel_map``). The layer's function is unchanged, ``T_s(W)``; only the split of
magnitude between activations and weights moves, which is what the quantizers see.

The learned scales ARE the full-precision transform OmniQuant makes: they are saved as
``<group>.let_scale`` and :func:`fold_let` folds them, both after training and when an artifact is
replayed onto its base model, so the replayed fp model computes the base model's function and the
codes were made from exactly its weights.

Initialised with SmoothQuant's ``s = max|X|^½ / max|W|^½`` or with AWQ's searched scales. Channel
shifts are not used: they need a bias slot after every ``prev`` and the supported architectures
have none.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantcli.algos.replay import register_replay
from quantcli.algos.scaling import channel_map, fold_scales, out_channels, to_consumers, to_prev
from quantcli.models.arch import ArchSpec, ScalingGroup, resolve_groups

SCALE_MIN = 1e-2  # LET scales are kept ≥ this (straight-through), as the original truncation
LET_SUFFIX = ".let_scale"  # saved name of a group's scale: "<group>.let_scale"


def positive(s: Tensor) -> Tensor:
    """``max(s, SCALE_MIN)`` with an identity gradient (keeps LET scales positive and bounded)."""
    return s + (s.clamp(min=SCALE_MIN) - s).detach()


@torch.no_grad()
def let_init(layer: nn.Module, group: ScalingGroup, act_absmax: Tensor, alpha: float = 0.5) -> Tensor:
    """SmoothQuant's start ``s = max|X|^α / max|W|^(1-α)`` per ``prev`` channel ``[C_prev]`` for one group.

    ``act_absmax: [C_in]``: per-channel ``max|x|`` of the group's consumers' input.
    """
    w_absmax = torch.stack([layer.get_submodule(n).weight.abs().amax(dim=0).float() for n in group.linears]).amax(dim=0)
    index, width = channel_map(layer, group), out_channels(layer.get_submodule(group.prev))
    act, wmax = to_prev(act_absmax.to(w_absmax), index, width, "amax"), to_prev(w_absmax, index, width, "amax")
    s = act.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=SCALE_MIN)


def transformed_params(layer: nn.Module, groups: list[ScalingGroup], scales: dict[str, Tensor]) -> dict[str, Tensor]:
    """``T_s(W)``: the layer's parameters changed by the LET ``scales`` (group name → ``s [C_prev]``).

    Name → tensor, differentiable in the scales, without touching the layer; the same arithmetic
    as :func:`fold_let` (``prev`` ÷ s, consumers × s).
    """
    base = dict(layer.named_parameters())
    out: dict[str, Tensor] = {}

    def get(name: str) -> Tensor:
        return out.get(name, base[name])

    for group in groups:
        s = scales.get(group.name)
        if s is None:
            continue
        s = positive(s)
        w = get(f"{group.prev}.weight")
        out[f"{group.prev}.weight"] = w / s if w.dim() == 1 else w / s.view(-1, 1)
        if f"{group.prev}.bias" in base:
            out[f"{group.prev}.bias"] = get(f"{group.prev}.bias") / s
        s_in = to_consumers(s, channel_map(layer, group)).view(1, -1)
        for name in group.linears:
            out[f"{name}.weight"] = get(f"{name}.weight") * s_in
    return out


def saved_scales(scales: dict[str, Tensor]) -> dict[str, Tensor]:
    """What training hands on: ``"<group>.let_scale"`` → ``max(s, SCALE_MIN)`` float32 (detached)."""
    return {f"{g}{LET_SUFFIX}": s.detach().clamp(min=SCALE_MIN).float() for g, s in scales.items()}


@register_replay("omniquant")
@torch.no_grad()
def fold_let(layer: nn.Module, arch: ArchSpec, tensors: dict[str, Tensor]) -> None:
    """Fold saved LET scales (``"<group>.let_scale"`` among ``tensors``, names relative to the layer) into ``layer``.

    The replay of an OmniQuant stage: run after training on the trained layer and on a fresh base
    layer when an artifact is materialised, so both hold the same weights. Groups without a saved
    scale are left alone.
    """
    for group in resolve_groups(layer, arch):
        s = tensors.get(f"{group.name}{LET_SUFFIX}")
        if s is not None:
            fold_scales(layer, group, s)
