"""Mixture-of-experts blocks in ``quant bench``: experts through the low-bit kernels, grouped by expert.

Loading makes fused experts canonical (:class:`quantcli.models.canonical.LinearExperts`, one
``gate_proj / up_proj / down_proj`` linear per expert), so :func:`quantcli.bench.kernels.swap_in_kernels`
already puts every expert linear on a kernel; the router (``mlp.gate``) is never quantized and runs
in the model's dtype. :class:`GroupedExperts` replaces the per-expert ``torch.where`` scan with one
sort of the routed (token, slot) pairs: each expert that received tokens is called once with all
of them as one ``[tokens, hidden]`` matrix (so prefill calls the kernels with many rows and can take
the dense path), and experts that received none are not called at all.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantcli.models.canonical import LinearExperts


class GroupedExperts(LinearExperts):
    """:class:`LinearExperts` with sorted dispatch; counts its expert calls and routed rows.

    ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` computes
    ``Σ_slots w[t, s] · expert_{idx[t, s]}(hidden[t])``, as the fused experts do.
    """

    def __init__(self, experts: LinearExperts):
        super().__init__(list(experts))
        self.calls = 0  # expert calls so far
        self.rows = 0  # routed (token, slot) rows so far

    def forward(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self)).tolist()  # the one host sync
        token = order // top_k_index.shape[-1]
        weight = top_k_weights.reshape(-1)[order]
        out = torch.zeros_like(hidden)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = token[start:start + n]
                y = self[e](hidden[rows]) * weight[start:start + n, None]
                out.index_add_(0, rows, y.to(out.dtype))
                self.calls += 1
                self.rows += n
            start += n
        return out


def group_experts(model: nn.Module) -> dict | None:
    """Swap every :class:`LinearExperts` of ``model`` for :class:`GroupedExperts` (same weights and
    kernels); returns what the bench report says about the MoE blocks, or None for a dense model."""
    blocks = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LinearExperts) and not isinstance(module, GroupedExperts):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, GroupedExperts(module))
            blocks.append((parent_name, parent))
    if not blocks:
        return None
    cfg = model.config.get_text_config()
    first_name, first = blocks[0]
    router = getattr(first, "gate", None)
    router_weight = getattr(router, "weight", None)
    return {
        "blocks": len(blocks),
        "experts_per_block": len(first.experts),
        "top_k": getattr(cfg, "num_experts_per_tok", None),
        "router": {
            "module": f"{first_name}.gate" if router is not None else None,
            "quantized": False,
            "dtype": str(router_weight.dtype).replace("torch.", "") if router_weight is not None else None,
        },
        "dispatch": "tokens sorted by expert: one call per expert that received tokens, per block and forward",
    }


def expert_call_stats(model: nn.Module) -> dict:
    """Expert calls and routed rows counted by every :class:`GroupedExperts` so far."""
    calls = rows = 0
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            calls += module.calls
            rows += module.rows
    return {"expert_calls": calls, "routed_rows": rows, "rows_per_call": rows / calls if calls else 0.0}
