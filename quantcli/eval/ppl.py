"""Perplexity under the GPTQ protocol, with an optional BOS token at the head of every window.

The test texts are joined with ``"\\n\\n"`` and tokenized once, text tokens only (no special
tokens). Without BOS (the GPTQ papers' protocol, ``bos=None``) the token stream is cut into
non-overlapping windows of ``seqlen`` tokens; with BOS, into non-overlapping chunks of
``seqlen - 1`` tokens, each window being ``[bos] + chunk`` (``seqlen`` tokens). A tail shorter
than a window is dropped. Every window scores ``seqlen - 1`` next-token predictions: positions
``1 .. seqlen-1`` given everything before them. The BOS position is never a target (it is only
context), so with BOS every text token of the window is scored; without, the window's first
token is context only. Each window's mean negative log-likelihood is computed in float32, and
the perplexity is ``exp(mean over windows)`` — the same number as
``exp(mean(model(window, labels=window).loss))`` over the same windows.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from quantcli import dist
from quantcli.calib.data import with_bos
from quantcli.errors import DatasetError


def windows(tokens: Tensor, seqlen: int, max_windows: int | None = None, bos: int | None = None) -> Tensor:
    """Non-overlapping windows ``[W, seqlen]`` of a token stream ``tokens: [T]``, each led by ``bos`` if given."""
    span = seqlen - (bos is not None)
    count = tokens.numel() // span
    if count == 0:
        raise DatasetError(f"the evaluation text has {tokens.numel()} tokens, fewer than --seqlen {seqlen}: lower --seqlen")
    if max_windows is not None:
        count = min(count, max_windows)
    return with_bos(tokens[: count * span].view(count, span), bos)


@torch.no_grad()
def window_nll(model: nn.Module, window: Tensor) -> float:
    """Mean next-token negative log-likelihood of one window ``[L]`` over its ``L - 1`` targets (float32 loss)."""
    device = next(model.parameters()).device
    ids = window.view(1, -1).to(device)
    logits = model(ids, use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[0, 1:]).item()


def perplexity(
    model: nn.Module,
    tokens: Tensor,
    seqlen: int,
    max_windows: int | None = None,
    bos: int | None = None,
    on_window: Callable[[int, int, float], None] = lambda _i, _n, _nll: None,
) -> dict:
    """Perplexity of ``model`` on ``tokens: [T]`` (text tokens) and the protocol that produced it."""
    all_wins = windows(tokens, seqlen, max_windows, bos)
    wins = dist.shard(all_wins)  # this rank's windows (all of them on one process)
    started = time.time()
    nlls = []
    for i, window in enumerate(wins):
        nlls.append(window_nll(model, window))
        on_window(i, len(wins), nlls[-1])
    return _record(nlls, all_wins, seqlen, bos, started)


def _record(nlls: list[float], all_wins: Tensor, seqlen: int, bos: int | None, started: float, **extra) -> dict:
    """The result of an evaluation: this rank's window NLLs reduced over all ranks, and the protocol."""
    total, count = dist.all_sum(sum(nlls), len(nlls))
    mean_nll = total / count
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "windows": len(all_wins),
        "seqlen": seqlen,
        "tokens": int(all_wins.numel()),
        "scored_tokens": len(all_wins) * (seqlen - 1),
        "bos_token_id": bos,
        "seconds": round(time.time() - started, 2),
        **extra,
    }


@torch.no_grad()
def perplexity_streamed(
    source, tokens: Tensor, seqlen: int, max_windows: int | None = None, device="cpu", bos: int | None = None, batch: int = 8,
    acts=None,
) -> dict:
    """:func:`perplexity` of a streamed model (:class:`quantcli.models.stream.StreamedModel`),
    layer by layer as the GPTQ reference evaluation does: every window through layer ``i``, then
    layer ``i + 1``, so only one layer (and the windows' hidden states ``[W, seqlen, H]``) is in
    memory at a time; ``acts`` (a :class:`quantcli.algos.driver.ActivationStore`) keeps the hidden
    states in memory-mapped files instead."""
    from quantcli.calib.capture import capture_layer_inputs
    from quantcli.models.stream import to_device

    all_wins = windows(tokens, seqlen, max_windows, bos)
    wins = dist.shard(all_wins)  # this rank's windows (all of them on one process)
    started = time.time()
    with source.outside_layers(device) as outer:
        hidden, layer_kwargs = capture_layer_inputs(outer, source.layers, wins, batch)
    if acts is not None:
        hidden = acts.put(hidden)
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
    return _record(nlls, all_wins, seqlen, bos, started, layer_by_layer=True)
