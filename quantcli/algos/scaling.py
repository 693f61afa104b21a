"""Fold a per-channel scale out of one op and into the ops that consume its output.

For a scaling group ``prev → linears`` and a positive scale ``s: [C]`` over the ``C`` channels
between them, ``prev``'s output is divided by ``s`` and every consumer's input columns are
multiplied by ``s``: ``W·x = (W·diag(s)) · (x / s)``. The function is unchanged; only the
distribution of magnitudes between activations and weights moves.

Under grouped-query attention ``v_proj`` has fewer output channels than ``o_proj`` has inputs:
value head ``h // n_rep`` is read by query heads ``h``. The scale then lives on ``v_proj``'s
channels and each consumer input channel takes the scale of the channel that feeds it
(:func:`channel_map`), which folds exactly too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantcli.models.arch import ScalingGroup


def out_channels(module: nn.Module) -> int:
    """Number of output channels of a norm (its weight length) or a linear (its rows)."""
    return module.weight.shape[0]


def channel_map(layer: nn.Module, group: ScalingGroup) -> Tensor | None:
    """Index ``[C_in]`` of the ``prev`` channel feeding each consumer input channel; None when one to one.

    Raises ValueError when the consumers' width cannot be mapped onto ``prev``'s channels.
    """
    width = out_channels(layer.get_submodule(group.prev))
    consumer_widths = {layer.get_submodule(n).weight.shape[1] for n in group.linears}
    if consumer_widths == {width}:
        return None
    (consumer_width,) = consumer_widths if len(consumer_widths) == 1 else (None,)
    head_dim = getattr(getattr(layer, "self_attn", None), "head_dim", None)
    if not group.kv_heads or consumer_width is None or not head_dim or width % head_dim or consumer_width % width:
        raise ValueError(f"{group.prev} ({width} channels) does not feed {', '.join(group.linears)} channel for channel")
    n_kv, n_rep = width // head_dim, consumer_width // width
    heads = torch.arange(n_kv * n_rep).repeat_interleave(head_dim) // n_rep  # kv head of each query channel
    return heads * head_dim + torch.arange(head_dim).repeat(n_kv * n_rep)


def can_fold(layer: nn.Module, group: ScalingGroup) -> bool:
    """Whether a scale on ``prev``'s outputs can be folded into the consumers exactly."""
    try:
        channel_map(layer, group)
    except ValueError:
        return False
    return True


def to_consumers(scales: Tensor, index: Tensor | None) -> Tensor:
    """``scales: [C_prev]`` as seen by the consumers' input channels ``[C_in]``."""
    return scales if index is None else scales[index.to(scales.device)]


def to_prev(stat: Tensor, index: Tensor | None, width: int, reduce: str = "mean") -> Tensor:
    """A per-consumer-channel statistic ``[C_in]`` reduced onto ``prev``'s ``width`` channels (mean or amax)."""
    if index is None:
        return stat
    out = torch.zeros(width, dtype=stat.dtype, device=stat.device)
    return out.scatter_reduce(0, index.to(stat.device), stat, reduce=reduce, include_self=False)


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
    """Fold ``scales: [C_prev]`` into ``group`` of ``layer`` without changing the layer's function."""
    divide_output(layer.get_submodule(group.prev), scales)
    consumer_scales = to_consumers(scales, channel_map(layer, group))
    for name in group.linears:
        multiply_input(layer.get_submodule(name), consumer_scales)
