"""Perplexity under the GPTQ protocol.

The test texts are joined with ``"\\n\\n"`` and tokenized once; the token stream is cut into
non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped); each
window's mean next-token negative log-likelihood is computed, and the perplexity is
``exp(mean over windows)``.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from quantcli import dist
from quantcli.errors import DatasetError


def windows(tokens: Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:
    """Non-overlapping windows ``[W, seqlen]`` of a token stream ``tokens: [T]``."""
    count = tokens.numel() // seqlen
    if count == 0:
        raise DatasetError(f"the evaluation text has {tokens.numel()} tokens, fewer than --seqlen {seqlen}: lower --seqlen")
    if max_windows is not None:
        count = min(count, max_windows)
    return tokens[: count * seqlen].view(count, seqlen)


@torch.no_grad()
def window_nll(model: nn.Module, window: Tensor) -> float:
    """Mean next-token negative log-likelihood of one window ``[L]`` (float32 loss)."""
    device = next(model.parameters()).device
    ids = window.view(1, -1).to(device)
    logits = model(ids, use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[0, 1:]).item()


def perplexity(
    model: nn.Module,
    tokens: Tensor,
    seqlen: int,
    max_windows: int | None = None,
    on_window: Callable[[int, int, float], None] = lambda _i, _n, _nll: None,
) -> dict:
    """Perplexity of ``model`` on ``tokens: [T]`` and the protocol that produced it."""
    all_wins = windows(tokens, seqlen, max_windows)
    wins = dist.shard(all_wins)  # this rank's windows (all of them on one process)
    started = time.time()
    nlls = []
    for i, window in enumerate(wins):
        nlls.append(window_nll(model, window))
        on_window(i, len(wins), nlls[-1])
    total, count = dist.all_sum(sum(nlls), len(nlls))
    mean_nll = total / count
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "windows": len(all_wins),
        "seqlen": seqlen,
        "tokens": int(all_wins.numel()),
        "seconds": round(time.time() - started, 2),
    }


@torch.no_grad()
def perplexity_streamed(source, tokens: Tensor, seqlen: int, max_windows: int | None = None, device="cpu", batch: int = 8) -> dict:
    """:func:`perplexity` of a streamed model (:class:`quantcli.models.stream.StreamedModel`),
    layer by layer as the GPTQ reference evaluation does: every window through layer ``i``, then
    layer ``i + 1``, so only one layer (and the windows' hidden states) is in memory at a time."""
    from quantcli.calib.capture import capture_layer_inputs
    from quantcli.models.stream import to_device

    wins = windows(tokens, seqlen, max_windows)
    started = time.time()
    with source.outside_layers(device) as outer:
        hidden, layer_kwargs = capture_layer_inputs(outer, source.layers, wins, batch)
    for index in range(len(source.layers)):
        layer = source.onload_layer(index, device)
        kwargs = {k: to_device(v, device) for k, v in layer_kwargs[index].items()}
        for start in range(0, len(hidden), batch):
            out = layer(hidden[start : start + batch].to(device), **kwargs)
            hidden[start : start + batch] = (out[0] if isinstance(out, tuple) else out).to(hidden.device)
        source.offload_layer(index)
    nlls = []
    with source.outside_layers(device, head=True) as model:
        norm, head = model.get_decoder().norm, model.get_output_embeddings()
        cap = getattr(model.config, "final_logit_softcapping", None)
        for window, h in zip(wins, hidden):
            logits = head(norm(h.to(device)))[:-1].float()
            if cap:  # Gemma's soft cap, as its causal-LM head applies it
                logits = torch.tanh(logits / cap) * cap
            nlls.append(F.cross_entropy(logits, window[1:].to(device)).item())
    mean_nll = sum(nlls) / len(nlls)
    return {
        "ppl": math.exp(mean_nll), "nll": mean_nll, "windows": len(wins), "seqlen": seqlen,
        "tokens": int(wins.numel()), "seconds": round(time.time() - started, 2), "layer_by_layer": True,
    }
