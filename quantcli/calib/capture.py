"""Capture what the decoder layers receive: layer-0 hidden states and every layer's keyword args."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _Stop(Exception):
    pass


def _clean(kwargs: dict) -> dict:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "cache_position")}
    kwargs["use_cache"] = False
    return kwargs


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, input_ids: Tensor, batch: int = 1
) -> tuple[Tensor, list[dict]]:
    """Layer-0 hidden states ``[N, L, H]`` (on CPU) for ``input_ids: [N, L]`` and per-layer kwargs.

    The kwargs (attention mask, position embeddings, …) are recorded for every layer from one
    full forward of the first sample, since some architectures give layers different ones
    (Gemma3's sliding and global attention). They broadcast over any batch of the same length.
    """
    device = next(model.parameters()).device
    per_layer: list[dict] = [{} for _ in layers]

    def record(index):
        def hook(_module, _args, kwargs):
            per_layer[index] = _clean(kwargs)

        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(input_ids[:1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()

    hidden: list[Tensor] = []

    def stop(_module, args, kwargs):
        hidden.append((args[0] if args else kwargs["hidden_states"]).detach().to("cpu"))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch):
            try:
                model(input_ids[start : start + batch].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(hidden), per_layer
