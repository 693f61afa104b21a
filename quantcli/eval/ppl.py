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
