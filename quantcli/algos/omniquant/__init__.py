"""OmniQuant: learnable weight clipping (LWC) and learnable equivalent transforms (LET), block by block.

* ``lwc.py``: the clip factors and the quantizer they train through.
* ``let.py``: the channel scales, the transform they make and :func:`fold_let`, which is also this
  kind's replay (an artifact's fp model = its base model with the saved scales folded in).
* ``train.py``: the per-layer algorithm (:class:`OmniQuant`) and its training loop.

The q·kᵀ scale (``Q/s``, ``K·s``) is learned only with a quantized KV cache (``--kv-bits``): without
it neither Q nor K is quantized and the scale cancels (weights are quantized per row/group,
``Q(c·w) = c·Q(w)``); with it the keys' per-token quantizer sees the smoothed channels.
"""

from __future__ import annotations

from quantcli.algos.omniquant.let import fold_let
from quantcli.algos.omniquant.train import OmniQuant, OmniQuantParams


def init_record(parent: dict | None) -> dict:
    """What LWC and LET started from, for the manifest (``parent``: ``algos.parent.reuse_parent``'s provenance, or None)."""
    if parent is None:
        return {"lwc": "paper (a=4)", "let": "smoothquant (alpha 0.5)"}
    kind = parent["kind"]
    return {
        "from": parent["from"],
        "lwc": "awq clips (logit of r clamped to (1e-4, 1-1e-4))" if kind == "awq" else "paper (a=4)",
        "let": f"{kind} scales" if parent["scales"] == "searched" else f"identity (s = 1): INPUT already carries the {kind} scales",
    }


__all__ = ["OmniQuant", "OmniQuantParams", "fold_let", "init_record"]
