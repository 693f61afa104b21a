"""OmniQuant: learnable weight clipping (LWC) and learnable equivalent transforms (LET), block by block.

For every decoder layer ``F`` with full-precision weights ``W`` the learnable parameters are trained
to minimise

    L(γ, β, s) = ‖ F(W', X_q) − F(W, X_fp) ‖²     (mean squared error, AdamW, weight decay 0)

where ``X_fp`` is the layer's input on the full-precision stream (so ``F(W, X_fp)`` is the target),
``X_q`` its input on the quantized stream, and ``W'`` the weights after the transform and fake
quantization: ``W' = Q_{γ,β}(T_s(W))``.

* LWC: per ``(row, group)`` of every quantized linear, ``γ = σ(a_hi)`` and ``β = σ(a_lo)`` shrink
  the range ``[β·min, γ·max]`` before scale and zero are computed (one factor on ``max|w|`` when
  symmetric); rounding is straight-through, so gradients reach ``a_hi, a_lo``. Initialised at
  ``a = 4`` as in the paper, or at ``logit(r)`` from AWQ's clip ratios ``r`` (clamped to
  ``(ε, 1 − ε)``: an unclipped group, ``r = 1``, still gets a finite start and a gradient).
* LET: a positive channel scale ``s`` per foldable scaling group of the architecture table
  (``prev``'s output divided by ``s``, its consumers' input columns multiplied by ``s``), plus a
  query/key scale (q_proj's rows divided, k_proj's rows multiplied). The q/k scale is shared by
  the query heads of one key/value head (GQA) and equal on each rotary pair ``(i, i + d/2)`` so it
  commutes with RoPE; it is skipped where q/k norms follow the projections. Channel shifts are not
  used: they need a bias slot after every ``prev`` and the supported architectures have none.
  Initialised with SmoothQuant's ``s = max|X|^½ / max|W|^½`` or with AWQ's searched scales.
* Activations (``abits < 16``): per-token dynamic fake quantization of every quantized linear's
  input during training, the same quantizer ``materialize()`` installs at evaluation.

After training the transform is folded into the weights (``fold_scales``), the learned clip
gives the integer codes, and the layer is a plain model again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from quantcli.algos.driver import LayerContext, LayerResult
from quantcli.algos.scaling import can_fold, channel_map, fold_scales, out_channels, to_consumers, to_prev
from quantcli.artifact import Artifact, is_artifact, open_artifact
from quantcli.errors import ArtifactError, InputError
from quantcli.models.arch import ScalingGroup, arch_spec, resolve_groups
from quantcli.models.weights import install_activation_quant
from quantcli.quant import QuantizedWeight, QuantSpec, fake_quantize, quantize, round_ste
from quantcli.quant.affine import grouped

AWQ_FILE = "awq.safetensors"
LWC_INIT = 4.0  # the paper's start: σ(4) ≈ 0.982 of the range
CLIP_EPS = 1e-4  # AWQ clip ratios are clamped to (ε, 1 − ε) before the logit
SCALE_MIN = 1e-2  # LET scales are kept ≥ this (straight-through), as the original truncation
_QP_EPS = 1e-8


@dataclass(frozen=True)
class OmniQuantParams:
    """Training settings; activation bits come from the QuantSpec.

    ``let=None`` means: on for weight-activation quantization (abits < 16), off for weight-only.
    """

    epochs: int = 5
    lwc: bool = True
    let: bool | None = None
    lwc_lr: float = 1e-2
    let_lr: float = 5e-3
    batch_size: int = 1
    seed: int = 0

    def let_for(self, spec: QuantSpec) -> bool:
        return (not spec.weight_only) if self.let is None else self.let


# --------------------------------------------------------------------------- LWC


def clip_logit(r: Tensor, eps: float = CLIP_EPS) -> Tensor:
    """``logit(r)`` of clip ratios clamped to ``(eps, 1 - eps)``: finite also for ``r = 1``."""
    r = r.float().clamp(eps, 1 - eps)
    return torch.log(r) - torch.log1p(-r)


def lwc_init(w: Tensor, spec: QuantSpec, clip: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Initial clip logits ``(a_hi, a_lo)``, each ``[out, in // g]``; ``a_lo`` is None when symmetric.

    ``clip``: AWQ clip ratios ``[out, in // g]`` (start at ``logit(r)``), else the paper's ``a = 4``.
    """
    g = spec.group_for(w.shape[1])
    shape = (w.shape[0], w.shape[1] // g)
    if clip is None:
        a = torch.full(shape, LWC_INIT, device=w.device)
    else:
        if tuple(clip.shape) != shape:
            raise ArtifactError(f"AWQ clip ratios have shape {tuple(clip.shape)}, expected {shape} for this spec")
        a = clip_logit(clip.to(w.device))
    return a, (None if spec.sym else a.clone())


def lwc_qparams(w: Tensor, a_hi: Tensor | None, a_lo: Tensor | None, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero ``[out, in // g]`` of ``w`` from the clipped range, differentiable in ``a_hi, a_lo``.

    ``a_hi = None``: no clipping (plain min/max). Same conventions as ``compute_qparams``.
    """
    wg = grouped(w, spec.group_for(w.shape[1]))
    maxq = spec.maxq
    wmax = wg.amax(dim=-1).clamp(min=0)
    wmin = wg.amin(dim=-1).clamp(max=0)
    if spec.sym:
        amax = torch.maximum(wmax, -wmin)
        if a_hi is not None:
            amax = amax * torch.sigmoid(a_hi)
        scale = (amax / (maxq / 2)).clamp(min=_QP_EPS)
        return scale, torch.full_like(scale, float(2 ** (spec.wbits - 1)))
    if a_hi is not None:
        wmax = wmax * torch.sigmoid(a_hi)
        wmin = wmin * torch.sigmoid(a_lo if a_lo is not None else a_hi)
    scale = ((wmax - wmin) / maxq).clamp(min=_QP_EPS)
    zero = torch.clamp(round_ste(-wmin / scale), 0, maxq)
    return scale, zero


def lwc_fake_quant(w: Tensor, a_hi: Tensor | None, a_lo: Tensor | None, spec: QuantSpec) -> Tensor:
    """``Q_{γ,β}(w)``: fake-quantized ``w: [out, in]`` with straight-through rounding."""
    scale, zero = lwc_qparams(w, a_hi, a_lo, spec)
    return fake_quantize(w, scale, zero, spec.wbits, spec.group_for(w.shape[1]))


@torch.no_grad()
def lwc_quantize(w: Tensor, a_hi: Tensor | None, a_lo: Tensor | None, spec: QuantSpec) -> QuantizedWeight:
    """Integer codes of ``w`` under the learned clip (what ``lwc_fake_quant`` rounds to)."""
    w = w.float()
    scale, zero = lwc_qparams(w, a_hi, a_lo, spec)
    g = spec.group_for(w.shape[1])
    return QuantizedWeight(quantize(w, scale, zero, spec.wbits, g), scale.float(), zero.float(), g)


# --------------------------------------------------------------------------- LET


@dataclass
class QKLayout:
    """How the query/key scale maps onto q_proj and k_proj rows."""

    n_kv: int
    head_dim: int
    n_rep: int  # query heads per key/value head


def qk_layout(layer: nn.Module) -> QKLayout | str:
    """The q·kᵀ scale layout of a decoder layer, or why no such scale can be expressed."""
    attn = getattr(layer, "self_attn", None)
    if attn is None or not hasattr(attn, "q_proj") or not hasattr(attn, "k_proj"):
        return "no self_attn.q_proj/k_proj"
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return "q/k norms follow the projections and do not commute with a channel scale"
    head_dim = getattr(attn, "head_dim", None)
    config = getattr(attn, "config", None)
    rope = getattr(config, "rope_parameters", None) or {}
    partial = getattr(config, "partial_rotary_factor", None) or (rope.get("partial_rotary_factor") if isinstance(rope, dict) else None)
    if partial not in (None, 1, 1.0):
        return f"partial rotary embedding ({partial})"
    if not head_dim or head_dim % 2:
        return f"head_dim {head_dim} is not even"
    q_rows, k_rows = attn.q_proj.out_features, attn.k_proj.out_features
    if q_rows % head_dim or k_rows % head_dim or (q_rows // head_dim) % (k_rows // head_dim):
        return f"q/k rows ({q_rows}, {k_rows}) do not split into heads of {head_dim}"
    return QKLayout(k_rows // head_dim, head_dim, (q_rows // head_dim) // (k_rows // head_dim))


def qk_row_scales(t: Tensor, layout: QKLayout) -> tuple[Tensor, Tensor]:
    """Row scales of q_proj and k_proj from ``t: [n_kv, head_dim / 2]``.

    Equal on rotary pairs ``(i, i + d/2)`` (``rotate_half`` layout) and repeated over the query
    heads that share a key/value head, so ``(q / s)·(k · s)ᵀ`` equals ``q·kᵀ`` after RoPE.
    """
    s_k = torch.cat([t, t], dim=-1)  # [n_kv, d]
    s_q = s_k.repeat_interleave(layout.n_rep, dim=0)  # [n_heads, d]
    return s_q.reshape(-1), s_k.reshape(-1)


def positive(s: Tensor) -> Tensor:
    """``max(s, SCALE_MIN)`` with an identity gradient (keeps LET scales positive and bounded)."""
    return s + (s.clamp(min=SCALE_MIN) - s).detach()


@torch.no_grad()
def input_absmax(ctx: LayerContext, names: list[str]) -> dict[str, Tensor]:
    """Per-channel ``max|x|`` of the inputs of the named linears over the layer's calibration inputs."""
    stats: dict[str, Tensor] = {}

    def hook(name):
        def fn(_m, args):
            m = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)

        return fn

    handles = [ctx.module.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        ctx.forward()
    finally:
        for h in handles:
            h.remove()
    return stats


def let_init(layer: nn.Module, group: ScalingGroup, act_absmax: Tensor, alpha: float = 0.5) -> Tensor:
    """SmoothQuant's start ``s = max|X|^α / max|W|^(1-α)`` per ``prev`` channel ``[C_prev]`` for one group."""
    w_absmax = torch.stack([layer.get_submodule(n).weight.detach().abs().amax(dim=0).float() for n in group.linears]).amax(dim=0)
    index, width = channel_map(layer, group), out_channels(layer.get_submodule(group.prev))
    act, wmax = to_prev(act_absmax.to(w_absmax), index, width, "amax"), to_prev(w_absmax, index, width, "amax")
    s = act.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=SCALE_MIN)


# --------------------------------------------------------------------------- the block's weights


@dataclass
class Learnables:
    """What is learned (or fixed) for one layer; tensors live on the layer's device."""

    clips: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)  # linear → (a_hi, a_lo)
    scales: dict[str, Tensor] = field(default_factory=dict)  # scaling group name → s [C]
    qk: Tensor | None = None  # [n_kv, head_dim / 2]
    qk_layout: QKLayout | None = None


def transformed_params(layer: nn.Module, groups: list[ScalingGroup], learn: Learnables) -> dict[str, Tensor]:
    """``T_s(W)``: the layer's parameters changed by the LET scales (name → tensor, differentiable).

    Same effect as :func:`fold_scales` per group plus the q/k row scales, without touching the layer.
    """
    base = dict(layer.named_parameters())
    out: dict[str, Tensor] = {}

    def get(name: str) -> Tensor:
        return out.get(name, base[name])

    def scale_rows(module: str, s: Tensor, divide: bool) -> None:
        w = get(f"{module}.weight")
        out[f"{module}.weight"] = (w / s if divide else w * s) if w.dim() == 1 else (w / s.view(-1, 1) if divide else w * s.view(-1, 1))
        if f"{module}.bias" in base:
            b = get(f"{module}.bias")
            out[f"{module}.bias"] = b / s if divide else b * s

    for group in groups:
        s = learn.scales.get(group.name)
        if s is None:
            continue
        s = positive(s)
        scale_rows(group.prev, s, divide=True)
        s_in = to_consumers(s, channel_map(layer, group)).view(1, -1)
        for name in group.linears:
            out[f"{name}.weight"] = get(f"{name}.weight") * s_in
    if learn.qk is not None:
        s_q, s_k = qk_row_scales(positive(learn.qk), learn.qk_layout)
        scale_rows("self_attn.q_proj", s_q, divide=True)
        scale_rows("self_attn.k_proj", s_k, divide=False)
    return out


def block_params(layer: nn.Module, groups: list[ScalingGroup], linears: list[str], learn: Learnables, spec: QuantSpec) -> dict[str, Tensor]:
    """``W' = Q_{γ,β}(T_s(W))`` for ``functional_call``: transformed, quantized linears fake-quantized."""
    params = transformed_params(layer, groups, learn)
    for name in linears:
        w = params.get(f"{name}.weight", layer.get_parameter(f"{name}.weight"))
        a_hi, a_lo = learn.clips.get(name, (None, None))
        params[f"{name}.weight"] = lwc_fake_quant(w, a_hi, a_lo, spec)
    return params


@torch.no_grad()
def fold_into(layer: nn.Module, groups: list[ScalingGroup], learn: Learnables) -> None:
    """Fold the (learned) LET scales into the layer in place: a plain model again."""
    for group in groups:
        s = learn.scales.get(group.name)
        if s is not None:
            fold_scales(layer, group, s.detach().clamp(min=SCALE_MIN))
    if learn.qk is not None:
        s_q, s_k = qk_row_scales(learn.qk.detach().clamp(min=SCALE_MIN), learn.qk_layout)
        attn = layer.self_attn
        attn.q_proj.weight.div_(s_q.view(-1, 1))
        attn.k_proj.weight.mul_(s_k.view(-1, 1))
        if attn.q_proj.bias is not None:
            attn.q_proj.bias.div_(s_q)
        if attn.k_proj.bias is not None:
            attn.k_proj.bias.mul_(s_k)


# --------------------------------------------------------------------------- training


def _output(value) -> Tensor:
    return value[0] if isinstance(value, tuple) else value


def block_loss(
    layer: nn.Module, build: Callable[[], dict[str, Tensor]], inputs: Tensor, targets: Tensor, kwargs: dict, device, batch: int
) -> float:
    """Mean squared error of the block with parameters ``build()`` against the targets (no grad)."""
    with torch.no_grad():
        params = build()
        total, count = 0.0, 0
        for start in range(0, inputs.shape[0], batch):
            x = inputs[start : start + batch].to(device)
            y = targets[start : start + batch].to(device)
            out = _output(functional_call(layer, params, (x,), kwargs))
            total += torch.sum((out.float() - y.float()) ** 2).item()
            count += y.numel()
    return total / max(count, 1)


def train_layer(
    layer: nn.Module,
    build: Callable[[], dict[str, Tensor]],
    param_groups: list[dict],
    inputs: Tensor,
    targets: Tensor,
    kwargs: dict,
    device,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    report: Callable[..., None] = lambda **_: None,
) -> dict:
    """Minimise ``‖F(build(), X_q) − Y_fp‖²`` over the tensors in ``param_groups`` with AdamW.

    ``inputs, targets: [N, L, H]`` (any device; mini-batches move to ``device``). Each epoch visits
    the ``N`` samples once in a seeded random order. Returns ``loss_start``, ``loss_end`` (full
    passes before and after) and ``curve`` (mean training loss per epoch). Should training diverge
    or end above the start, the parameters go back to their initial values (``reverted: True``).
    """
    loss_start = block_loss(layer, build, inputs, targets, kwargs, device, batch_size)
    curve: list[float] = []
    trainable = [p for g in param_groups for p in g["params"]]
    if trainable and epochs > 0:
        initial = [p.detach().clone() for p in trainable]
        optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        diverged = False
        for epoch in range(epochs):
            order = torch.randperm(inputs.shape[0], generator=gen)
            losses = []
            for start in range(0, inputs.shape[0], batch_size):
                idx = order[start : start + batch_size]
                x, y = inputs[idx].to(device), targets[idx].to(device)
                out = _output(functional_call(layer, build(), (x,), kwargs))
                loss = torch.nn.functional.mse_loss(out.float(), y.float())
                if not math.isfinite(loss.item()):
                    diverged = True
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            if diverged:
                break
            curve.append(sum(losses) / len(losses))
            report(epoch=epoch + 1, loss=curve[-1])
        loss_end = math.inf if diverged else block_loss(layer, build, inputs, targets, kwargs, device, batch_size)
        if not loss_end <= loss_start:  # diverged, or worse than the start: go back to the start
            with torch.no_grad():
                for p, p0 in zip(trainable, initial):
                    p.copy_(p0)
            return {"loss_start": loss_start, "loss_end": loss_start, "curve": curve, "reverted": True}
        return {"loss_start": loss_start, "loss_end": loss_end, "curve": curve, "reverted": False}
    return {"loss_start": loss_start, "loss_end": loss_start, "curve": curve, "reverted": False}


# --------------------------------------------------------------------------- the algorithm


@dataclass(frozen=True)
class OmniQuant:
    """Per-layer OmniQuant; ``ctx.upstream`` may carry AWQ ``<group>.scales`` and ``<linear>.clip`` as init."""

    params: OmniQuantParams = OmniQuantParams()
    needs_fp_stream: bool = True

    def setup(self, ctx: LayerContext) -> tuple[Learnables, list[ScalingGroup], list[str], list[str]]:
        """The layer's learnable parameters at their initial values, its LET groups, linears and skip notes."""
        layer, spec, params = ctx.module, ctx.spec, self.params
        linears = [n for stage in ctx.linears() for n in stage]
        learn, skipped = Learnables(), []
        for name in linears:
            clip = ctx.upstream.get(f"{name}.clip")
            if params.lwc or clip is not None:
                a_hi, a_lo = lwc_init(layer.get_parameter(f"{name}.weight").detach(), spec, clip)
                learn.clips[name] = (a_hi, a_lo)

        let = params.let_for(spec)
        groups = []
        for group in resolve_groups(layer, ctx.arch):
            awq = ctx.upstream.get(f"{group.name}.scales")
            if not can_fold(layer, group):
                if let:
                    skipped.append(f"{group.name}: {group.prev} feeds {group.linears[0]} not channel for channel")
                continue
            if let or (awq is not None and not torch.all(awq == 1)):
                groups.append(group)
        need_stats = [g.linears[0] for g in groups if f"{g.name}.scales" not in ctx.upstream]
        stats = input_absmax(ctx, need_stats) if need_stats else {}
        for group in groups:
            awq = ctx.upstream.get(f"{group.name}.scales")
            s = awq.float().to(ctx.device) if awq is not None else let_init(layer, group, stats[group.linears[0]]).to(ctx.device)
            learn.scales[group.name] = s
        if let:
            layout = qk_layout(layer)
            if isinstance(layout, str):
                skipped.append(f"q·kᵀ scale: {layout}")
            else:
                learn.qk, learn.qk_layout = torch.ones(layout.n_kv, layout.head_dim // 2, device=ctx.device), layout
        return learn, groups, linears, skipped

    def run_layer(self, ctx: LayerContext) -> LayerResult:
        if ctx.inputs is None or ctx.targets is None:
            raise InputError("OmniQuant needs calibration data")
        layer, spec, params = ctx.module, ctx.spec, self.params
        learn, groups, linears, skipped = self.setup(ctx)
        let = params.let_for(spec)

        lwc_tensors = [t for pair in learn.clips.values() for t in pair if t is not None]
        let_tensors = list(learn.scales.values()) + ([learn.qk] if learn.qk is not None else [])
        param_groups = []
        if params.lwc and lwc_tensors:
            param_groups.append({"params": lwc_tensors, "lr": params.lwc_lr})
        if let and let_tensors:
            param_groups.append({"params": let_tensors, "lr": params.let_lr})
        for group in param_groups:
            for t in group["params"]:
                t.requires_grad_(True)

        frozen = {n: p.requires_grad for n, p in layer.named_parameters()}
        for p in layer.parameters():
            p.requires_grad_(False)
        hooks = install_activation_quant(layer, linears, spec.abits)
        try:
            stats = train_layer(
                layer,
                lambda: block_params(layer, groups, linears, learn, spec),
                param_groups,
                ctx.inputs,
                ctx.targets,
                ctx.kwargs,
                ctx.device,
                params.epochs,
                params.batch_size,
                params.seed + ctx.index,
                ctx.report,
            )
        finally:
            for h in hooks:
                h.remove()
            for n, p in layer.named_parameters():
                p.requires_grad_(frozen[n])

        # Fold the transform into the layer, then quantize with the learned clips.
        before = {n: p.detach().clone() for n, p in layer.named_parameters()}
        fold_into(layer, groups, learn)
        quantized = {}
        for name in linears:
            a_hi, a_lo = learn.clips.get(name, (None, None))
            quantized[name] = lwc_quantize(
                layer.get_parameter(f"{name}.weight").detach(),
                None if a_hi is None else a_hi.detach(),
                None if a_lo is None else a_lo.detach(),
                spec,
            )
        weights = {f"{n}.weight" for n in linears}
        overrides = {
            n: p.detach().clone() for n, p in layer.named_parameters() if n not in weights and not torch.equal(p, before[n])
        }

        saved = {f"{g}.let_scale": s.detach().clamp(min=SCALE_MIN).float() for g, s in learn.scales.items()}
        if learn.qk is not None:
            saved["self_attn.qk_scale"] = learn.qk.detach().clamp(min=SCALE_MIN).float()
        for name, (a_hi, a_lo) in learn.clips.items():
            saved[f"{name}.lwc_hi"] = torch.sigmoid(a_hi.detach()).float()
            if a_lo is not None:
                saved[f"{name}.lwc_lo"] = torch.sigmoid(a_lo.detach()).float()

        metrics = {"epoch": params.epochs if stats["curve"] else 0, **stats}
        if skipped:
            metrics["let_skipped"] = skipped
        return LayerResult(quantized=quantized, saved=saved, overrides=overrides, metrics=metrics)


# --------------------------------------------------------------------------- AWQ as the start


def _spec_mismatch(artifact: Artifact, spec: QuantSpec) -> str | None:
    """What differs between an artifact's weight spec and ``spec`` (None when bits/group/sym agree)."""
    if artifact.manifest.spec is None:
        return "it records no quantization spec"
    theirs = QuantSpec.from_dict(artifact.manifest.spec)
    diffs = [f"{k} {getattr(theirs, k)} vs {getattr(spec, k)}" for k in ("wbits", "group", "sym") if getattr(theirs, k) != getattr(spec, k)]
    return ", ".join(diffs) or None


def open_awq_init(path: str | Path, spec: QuantSpec) -> Artifact:
    """Open ``--init-from``: refused unless it is an AWQ artifact made with the same weight spec."""
    if not is_artifact(path):
        raise InputError(f"--init-from {path}: not a quantcli artifact; pass the output directory of quant awq")
    artifact = open_artifact(path)
    if artifact.kind != "awq":
        raise InputError(f"--init-from {path}: is a {artifact.kind} artifact, not an awq one; pass the output of quant awq")
    if (diff := _spec_mismatch(artifact, spec)) is not None:
        raise ArtifactError(f"--init-from {path}: made for another quantization spec ({diff}); re-run quant awq with this spec")
    return artifact


def _awq_in_lineage(artifact: Artifact | None) -> Artifact | None:
    if artifact is None:
        return None
    found = [a for a in artifact.lineage() if a.kind == "awq"]
    return found[-1] if found else None


def awq_init(loaded, init_from: Artifact | None, spec: QuantSpec) -> tuple[Callable[[int], dict[str, Tensor]], dict]:
    """Per-layer AWQ tensors to start from (relative names), and a record of what was used.

    * ``init_from`` (checked by :func:`open_awq_init`) must belong to ``loaded``'s base model.
    * When INPUT already carries AWQ scales (an AWQ artifact or one made from it), they are folded
      into the weights training starts from: LET then starts at ``s = 1`` on top, and only the
      clips are taken. ``init_from`` must then be that same AWQ artifact (other scales would
      describe other weights).
    * Otherwise ``init_from``'s scales start LET (folded as a fixed transform under ``--no-let``)
      and its clips start LWC.
    * Without ``init_from``, an AWQ INPUT of the same spec gives its clips.
    """
    carried = _awq_in_lineage(loaded.artifact)
    if init_from is not None:
        if init_from.manifest.base_model.config_sha256 != loaded.base.config_sha256:
            theirs, ours = init_from.manifest.base_model, loaded.base
            raise ArtifactError(
                f"--init-from {init_from.path}: made for another base model ({theirs.ref}, config {theirs.config_sha256[:12]}) "
                f"than INPUT ({ours.ref}, config {ours.config_sha256[:12]}); run quant awq on this model"
            )
        if carried is not None and carried.path.resolve() != init_from.path.resolve():
            raise InputError(
                f"--init-from {init_from.path}: INPUT already carries the AWQ scales of {carried.path}; pass that artifact or omit --init-from"
            )
        source = init_from
    elif loaded.artifact is not None and loaded.artifact.kind == "awq" and _spec_mismatch(loaded.artifact, spec) is None:
        source = loaded.artifact
    else:
        return (lambda _i: {}), {"lwc": "paper (a=4)", "let": "smoothquant (alpha 0.5)"}
    if not source.has(AWQ_FILE):
        raise ArtifactError(f"{source.path}: holds no {AWQ_FILE}; re-run quant awq")
    tensors = source.tensors(AWQ_FILE)
    take_scales = carried is None
    layers_path = arch_spec(loaded.model).layers_path

    def for_layer(index: int) -> dict[str, Tensor]:
        prefix = f"{layers_path}.{index}."
        out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and k.endswith((".clip", ".scales"))}
        if not take_scales:  # already folded into INPUT's weights: LET starts at identity on top
            out = {k: torch.ones_like(v) if k.endswith(".scales") else v for k, v in out.items()}
        return out

    info = {
        "from": str(source.path.resolve()),
        "lwc": "awq clips (logit of r clamped to (1e-4, 1-1e-4))",
        "let": "awq scales" if take_scales else "identity (s = 1): INPUT already carries the awq scales",
    }
    return for_layer, info
