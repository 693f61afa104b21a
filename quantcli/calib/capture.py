"""Capture what the decoder layers receive: layer-0 hidden states and every layer's keyword args.

The decoder layers never run here: each is swapped for a stand-in that records its inputs and
passes the hidden states through, so only the embeddings (and rotary frequencies) need to be
materialised — a streamed model's layers can stay on the ``meta`` device.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn


class _Stop(Exception):
    pass


def _clean(kwargs: dict) -> dict:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "cache_position")}
    kwargs["use_cache"] = False
    return kwargs


@contextmanager
def _stand_ins(layers: nn.ModuleList, on_call):
    """Replace each layer's forward by ``on_call(index, hidden, kwargs)``, which returns the hidden states."""
    for index, layer in enumerate(layers):
        layer.forward = lambda *args, _i=index, **kwargs: on_call(_i, args[0] if args else kwargs.pop("hidden_states"), kwargs)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, input_ids: Tensor, batch: int = 1
) -> tuple[Tensor, list[dict]]:
    """Layer-0 hidden states ``[N, L, H]`` (on CPU) for ``input_ids: [N, L]`` and per-layer kwargs.

    The kwargs (attention mask, position embeddings, …) are recorded for every layer from the
    first sample, since some architectures give layers different ones (Gemma3's sliding and
    global attention). They broadcast over any batch of the same length.
    """
    device = model.get_input_embeddings().weight.device
    per_layer: list[dict] = [{} for _ in layers]
    hidden: list[Tensor] = []

    def record_kwargs(index, x, kwargs):
        per_layer[index] = _clean(kwargs)
        if index == len(layers) - 1:
            raise _Stop
        return x

    def record_hidden(_index, x, _kwargs):
        hidden.append(x.detach().to("cpu"))
        raise _Stop

    for on_call, starts, size in ((record_kwargs, [0], 1), (record_hidden, range(0, input_ids.shape[0], batch), batch)):
        with _stand_ins(layers, on_call):
            for start in starts:
                try:
                    model(input_ids[start : start + size].to(device), use_cache=False)
                except _Stop:
                    pass
    return torch.cat(hidden), per_layer
