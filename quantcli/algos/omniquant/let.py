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

The q·kᵀ scale (only with a quantized KV cache, where it acts): ``Q' = Q / s``, ``K' = K · s`` per
head-dim channel, so ``Q'·K'ᵀ = Q·Kᵀ`` while the per-token quantizer of the keys sees smoother
channels. It folds into the rows of ``q_proj`` (÷) and ``k_proj`` (×), biases included, or, where
the attention normalises each head (``q_norm``/``k_norm``: Qwen3, Gemma3), into those norms'
weights. RoPE rotates channel ``i`` with ``i + head_dim/2`` (``rotate_half``), so ``s`` is
constant on each such pair and commutes with the rotation; under GQA ``s`` lives on the key
heads' channels and every query head takes the scale of the key head it reads
(:class:`QKSite`). Saved as ``qk.let_scale`` (``s`` over ``k``'s output channels) and folded by
:func:`fold_let` like the groups' scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from quantcli.algos.replay import register_replay
from quantcli.algos.scaling import channel_map, fold_scales, out_channels, to_consumers, to_prev
from quantcli.errors import ArtifactError
from quantcli.models.arch import ArchSpec, ScalingGroup, resolve_groups

SCALE_MIN = 1e-2  # LET scales are kept ≥ this (straight-through), as the original truncation
LET_SUFFIX = ".let_scale"  # saved name of a group's scale: "<group>.let_scale"
QK = "qk"  # the q·kᵀ scale's name among the scales (saved as "qk.let_scale")


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
    if QK in scales:
        out.update(qk_site(layer).transform(positive(scales[QK]), get, base))
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
    s = tensors.get(f"{QK}{LET_SUFFIX}")
    if s is not None:
        fold_qk(layer, s)


# ------------------------------------------------------------------------------ the q·kᵀ scale


@dataclass(frozen=True)
class QKSite:
    """Where one layer's q·kᵀ scale folds: ``q`` ÷ s, ``k`` × s (module paths relative to the layer).

    ``q``, ``k``: ``self_attn.q_proj``/``k_proj`` (rows: ``s`` is ``[kv_heads · head_dim]``, query
    head ``h`` takes key head ``h // n_rep``'s part) or ``self_attn.q_norm``/``k_norm`` (weights
    ``[head_dim]`` shared by every head: ``kv_heads = n_rep = 1``).
    """

    q: str
    k: str
    head_dim: int
    kv_heads: int
    n_rep: int

    @property
    def free_shape(self) -> tuple[int, int]:
        """Shape of the free parameter: one value per (key head, rotary pair)."""
        return (self.kv_heads, self.head_dim // 2)

    @property
    def width(self) -> int:
        """Length of the full scale ``s`` (the ``k`` op's output channels it touches)."""
        return self.kv_heads * self.head_dim

    def expand(self, free: Tensor) -> Tensor:
        """``free: [kv_heads, head_dim/2]`` → ``s: [kv_heads · head_dim]``, equal on channels ``i`` and ``i + head_dim/2``."""
        return torch.cat([free, free], dim=-1).reshape(-1)

    def pairs(self, stat: Tensor, query: bool) -> Tensor:
        """A per-channel statistic of the ``q`` (``query``) or ``k`` op's output → ``[kv_heads, head_dim/2]`` (amax
        over each rotary pair and, for queries, over the query heads of the group)."""
        heads = self.kv_heads * (self.n_rep if query else 1)
        x = stat.reshape(heads, 2, self.head_dim // 2).amax(dim=1)
        return x.reshape(self.kv_heads, -1, self.head_dim // 2).amax(dim=1)

    def transform(self, s: Tensor, get: Callable[[str], Tensor], names) -> dict[str, Tensor]:
        """The ``q``/``k`` parameters with ``s: [width]`` folded in (``get(name)`` gives the current tensor;
        only names in ``names`` exist). Differentiable in ``s``; :func:`fold_qk` writes the same values."""
        s_q = s.view(self.kv_heads, 1, self.head_dim).expand(-1, self.n_rep, -1).reshape(-1)
        out = {}
        for op, factor in ((self.q, 1 / s_q), (self.k, s)):
            for kind in ("weight", "bias"):
                name = f"{op}.{kind}"
                if name in names:
                    t = get(name)
                    out[name] = t * (factor.view(-1, 1) if t.dim() == 2 else factor).to(t.dtype)
        return out


def qk_site(layer: nn.Module) -> QKSite | None:
    """The q·kᵀ fold site of a decoder layer, or None when it has no foldable attention (an even
    ``head_dim`` with rotary halves and ``q_proj``/``k_proj`` whose rows are whole heads)."""
    attn = getattr(layer, "self_attn", None)
    head_dim = getattr(attn, "head_dim", None)
    if attn is None or not head_dim or head_dim % 2 or not all(hasattr(attn, n) for n in ("q_proj", "k_proj")):
        return None
    q_rows, k_rows = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
    if q_rows % head_dim or k_rows % head_dim or (q_rows // head_dim) % (k_rows // head_dim):
        return None
    if hasattr(attn, "q_norm") and hasattr(attn, "k_norm"):  # per-head norms after the projections: fold there
        if getattr(attn.q_norm, "weight", None) is None or attn.q_norm.weight.shape != (head_dim,):
            return None
        return QKSite("self_attn.q_norm", "self_attn.k_norm", head_dim, 1, 1)
    kv = k_rows // head_dim
    return QKSite("self_attn.q_proj", "self_attn.k_proj", head_dim, kv, q_rows // k_rows)


@torch.no_grad()
def qk_init(site: QKSite, q_absmax: Tensor, k_absmax: Tensor, alpha: float = 0.5) -> Tensor:
    """Free parameter ``[kv_heads, head_dim/2]`` balancing queries and keys: ``s = (max|Q| / max|K|)^α``,
    so that ``max|K·s| = max|Q/s|`` at α = ½ (``q_absmax``/``k_absmax``: per-channel ``max`` of the
    ``q``/``k`` ops' outputs, ``[heads · head_dim]`` or ``[head_dim]``)."""
    q, k = site.pairs(q_absmax.float(), True), site.pairs(k_absmax.float(), False)
    return (q.clamp(min=1e-5) / k.clamp(min=1e-5)).pow(alpha).clamp(min=SCALE_MIN)


@torch.no_grad()
def fold_qk(layer: nn.Module, s: Tensor) -> None:
    """Fold a saved q·kᵀ scale ``s: [width]`` into ``layer`` in place (see :class:`QKSite`)."""
    site = qk_site(layer)
    if site is None or s.numel() != site.width:
        raise ArtifactError(
            f"the saved q·kᵀ scale has {s.numel()} channels but this layer's attention takes "
            f"{'none' if site is None else site.width}: the artifact was made for another model"
        )
    params = dict(layer.named_parameters())
    for name, value in site.transform(s.float().clamp(min=SCALE_MIN), lambda n: params[n], params).items():
        params[name].copy_(value)
