"""Fold a per-channel scale out of one op and into the ops that consume its output.

For a scaling group ``prev → linears`` and a positive scale ``s: [C]`` over the ``C`` channels
between them, ``prev``'s output is divided by ``s`` and every consumer's input columns are
multiplied by ``s``: ``W·x = (W·diag(s)) · (x / s)``. The function is unchanged; only the
distribution of magnitudes between activations and weights moves.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantcli.models.arch import ScalingGroup


def out_channels(module: nn.Module) -> int:
    """Number of output channels of a norm (its weight length) or a linear (its rows)."""
    return module.weight.shape[0]


def can_fold(layer: nn.Module, group: ScalingGroup) -> bool:
    """Whether ``prev``'s outputs feed the consumers channel for channel (not so for v→o under GQA)."""
    width = out_channels(layer.get_submodule(group.prev))
    return all(layer.get_submodule(n).weight.shape[1] == width for n in group.linears)


@torch.no_grad()
def divide_output(prev: nn.Module, scales: Tensor) -> None:
    """Divide ``prev``'s output channels by ``scales``: a norm's weight, or a linear's rows."""
    weight = prev.weight
    if weight.dim() == 1:
        weight.div_(scales.to(weight))
    else:
        weight.div_(scales.to(weight).view(-1, 1))
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias.div_(scales.to(bias))


@torch.no_grad()
def multiply_input(consumer: nn.Module, scales: Tensor) -> None:
    """Multiply a consumer's input columns (``weight: [out, in]``) by ``scales``."""
    consumer.weight.mul_(scales.to(consumer.weight).view(1, -1))


def fold_scales(layer: nn.Module, group: ScalingGroup, scales: Tensor) -> None:
    """Fold ``scales: [C]`` into ``group`` of ``layer`` without changing the layer's function."""
    divide_output(layer.get_submodule(group.prev), scales)
    for name in group.linears:
        multiply_input(layer.get_submodule(name), scales)
