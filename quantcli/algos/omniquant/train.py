"""The OmniQuant layer algorithm: train LWC and LET on one decoder layer, fold, quantize.

For every decoder layer ``F`` with full-precision weights ``W`` the learnable parameters are trained
to minimise

    L(γ, β, s) = ‖ F(W', X_q) − F(W, X_fp) ‖²     (mean squared error, AdamW, weight decay 0)

where ``X_fp`` is the layer's input on the full-precision stream (so ``F(W, X_fp)`` is the target),
``X_q`` its input on the quantized stream, and ``W' = Q_{γ,β}(T_s(W))`` the weights after the LET
transform (``let.py``) and LWC fake quantization (``lwc.py``). With activation bits (``abits < 16``)
every quantized linear's input is fake-quantized per token during training, the quantizer
``materialize()`` installs at evaluation; with ``kv_bits < 16`` the keys and values are too, and
``s`` includes the q·kᵀ scale (``Q/s``, ``K·s``) that smooths the keys' channels for their quantizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from quantcli import dist
from quantcli.algos.driver import LayerContext, LayerResult
from quantcli.algos.omniquant.let import QK, QKSite, fold_let, let_init, qk_init, qk_site, saved_scales, transformed_params
from quantcli.algos.omniquant.lwc import lwc_fake_quant, lwc_init, lwc_quantize
from quantcli.algos.scaling import can_fold
from quantcli.errors import InputError
from quantcli.models.arch import ScalingGroup, resolve_groups
from quantcli.models.act_hooks import install_spec_hooks, search_spec
from quantcli.quant import QuantSpec


@dataclass(frozen=True)
class OmniQuantParams:
    """Training settings; activation bits come from the QuantSpec.

    ``let=None`` means: on for weight-activation quantization (abits < 16), off for weight-only.
    ``qk``: the q·kᵀ scale; it acts only on a quantized KV cache (``kv_bits < 16``), where ``None``
    means: with LET. ``qk_init``: ``"stats"`` (``s = (max|Q| / max|K|)^½`` per rotary pair) or
    ``"ones"`` (the original code's start).
    """

    epochs: int = 5
    lwc: bool = True
    let: bool | None = None
    lwc_lr: float = 1e-2
    let_lr: float = 5e-3
    batch_size: int = 1
    seed: int = 0
    qk: bool | None = None
    qk_init: str = "stats"

    def let_for(self, spec: QuantSpec) -> bool:
        return (not spec.weight_only) if self.let is None else self.let

    def qk_for(self, spec: QuantSpec) -> bool:
        """Whether the q·kᵀ scale is trained: only with a quantized KV cache (elsewhere it cancels)."""
        return spec.kv_bits < 16 and (self.let_for(spec) if self.qk is None else self.qk)


@dataclass
class Learnables:
    """What is learned (or fixed) for one layer; tensors live on the layer's device."""

    clips: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)  # linear → (a_hi, a_lo)
    scales: dict[str, Tensor] = field(default_factory=dict)  # scaling group name → s [C_prev]
    qk: Tensor | None = None  # the q·kᵀ scale's free parameter [kv_heads, head_dim/2]
    qk_site: QKSite | None = None

    def all_scales(self) -> dict[str, Tensor]:
        """Every LET scale by name, the q·kᵀ one (``"qk"``) expanded to its channels."""
        if self.qk is None:
            return self.scales
        return {**self.scales, QK: self.qk_site.expand(self.qk)}


def block_params(layer: nn.Module, groups: list[ScalingGroup], linears: list[str], learn: Learnables, spec: QuantSpec) -> dict[str, Tensor]:
    """``W' = Q_{γ,β}(T_s(W))`` for ``functional_call``: transformed, quantized linears fake-quantized."""
    params = transformed_params(layer, groups, learn.all_scales())
    for name in linears:
        w = params.get(f"{name}.weight", layer.get_parameter(f"{name}.weight"))
        a_hi, a_lo = learn.clips.get(name, (None, None))
        params[f"{name}.weight"] = lwc_fake_quant(w, a_hi, a_lo, spec)
    return params


@torch.no_grad()
def channel_absmax(ctx: LayerContext, inputs_of: list[str], outputs_of: list[str] = ()) -> dict[str, Tensor]:
    """Per-channel ``max|x|`` over the layer's calibration inputs, in one forward: of the input ``[C_in]``
    of each module in ``inputs_of`` (keyed by its name) and of the output ``[C_out]`` (last dim) of each
    in ``outputs_of`` (keyed ``"<name>:out"``)."""
    stats: dict[str, Tensor] = {}

    def record(key: str, x: Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        stats[key] = m if key not in stats else torch.maximum(stats[key], m)

    def pre(name):
        return lambda _m, args: record(name, args[0])

    def post(name):
        return lambda _m, _args, out: record(f"{name}:out", out)

    handles = [ctx.module.get_submodule(n).register_forward_pre_hook(pre(n)) for n in inputs_of]
    handles += [ctx.module.get_submodule(n).register_forward_hook(post(n)) for n in outputs_of]
    try:
        ctx.forward()
    finally:
        for h in handles:
            h.remove()
    return {name: dist.all_max(m) for name, m in stats.items()}


def input_absmax(ctx: LayerContext, names: list[str]) -> dict[str, Tensor]:
    """Per-channel ``max|x|`` ``[C_in]`` of the inputs of the named linears over the layer's calibration inputs."""
    return channel_absmax(ctx, names)


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
    total, count = dist.all_sum(total, count)
    return total / max(count, 1)


def _batch_loss(layer: nn.Module, build, inputs: Tensor, targets: Tensor, idx: Tensor, kwargs: dict, device) -> Tensor:
    """Mean squared error of the block with parameters ``build()`` on samples ``idx`` (with grad)."""
    x, y = inputs[idx].to(device), targets[idx].to(device)
    out = _output(functional_call(layer, build(), (x,), kwargs))
    return torch.nn.functional.mse_loss(out.float(), y.float())


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
    revert: bool = True,
) -> dict:
    """Minimise ``‖F(build(), X_q) − Y_fp‖²`` over the tensors in ``param_groups`` with AdamW.

    ``inputs, targets: [N, L, H]`` (any device; mini-batches move to ``device``). Each epoch visits
    the ``N`` samples once in a seeded random order. Returns ``loss_start``, ``loss_end`` (full
    passes before and after) and ``curve`` (mean training loss per epoch). With ``revert``, should
    training diverge or end above the start, the parameters go back to their initial values
    (``reverted: True``).
    """
    loss_start = block_loss(layer, build, inputs, targets, kwargs, device, batch_size)
    curve: list[float] = []
    trainable = [p for g in param_groups for p in g["params"]]
    if not trainable or epochs <= 0:
        return {"loss_start": loss_start, "loss_end": loss_start, "curve": curve, "reverted": False}
    initial = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    diverged = False
    for epoch in range(epochs):
        order = torch.randperm(dist.all_sum(inputs.shape[0])[0], generator=gen)  # one order of all ranks' samples
        losses = []
        for start in range(0, len(order), batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = dist.backward(lambda idx: _batch_loss(layer, build, inputs, targets, idx, kwargs, device), order[start : start + batch_size], len(order), trainable)
            if not math.isfinite(loss):
                diverged = True
                break
            optimizer.step()
            losses.append(loss)
        if diverged:
            break
        curve.append(sum(losses) / len(losses))
        report(epoch=epoch + 1, loss=curve[-1])
    loss_end = math.inf if diverged else block_loss(layer, build, inputs, targets, kwargs, device, batch_size)
    if revert and not loss_end <= loss_start:  # diverged, or worse than the start: go back to the start
        with torch.no_grad():
            for p, p0 in zip(trainable, initial):
                p.copy_(p0)
        return {"loss_start": loss_start, "loss_end": loss_start, "curve": curve, "reverted": True}
    return {"loss_start": loss_start, "loss_end": loss_end, "curve": curve, "reverted": False}


@dataclass(frozen=True)
class OmniQuant:
    """Per-layer OmniQuant; ``ctx.upstream`` may carry AWQ ``<group>.scales`` and ``<linear>.clip`` as init.

    ``revert=False`` keeps whatever training reached (tests of the training itself).
    """

    params: OmniQuantParams = OmniQuantParams()
    needs_fp_stream: bool = True
    revert: bool = True

    def setup(self, ctx: LayerContext) -> tuple[Learnables, list[ScalingGroup], list[str], list[str]]:
        """The layer's learnable parameters at their initial values, its LET groups, linears and skip notes."""
        layer, spec, params = ctx.module, ctx.spec, self.params
        linears = [n for stage in ctx.linears() for n in stage]
        learn, skipped = Learnables(), []
        for name in linears:
            clip = ctx.upstream.get(f"{name}.clip")
            if params.lwc or clip is not None:
                learn.clips[name] = lwc_init(layer.get_parameter(f"{name}.weight").detach(), spec, clip)

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
        site = qk_site(layer) if params.qk_for(spec) else None
        if params.qk_for(spec) and site is None:
            skipped.append("qk: the attention's heads do not split into rotary pairs")
        qk_stats = [site.q, site.k] if site is not None and params.qk_init == "stats" else []
        stats = channel_absmax(ctx, need_stats, qk_stats) if need_stats or qk_stats else {}
        for group in groups:
            awq = ctx.upstream.get(f"{group.name}.scales")
            s = awq.float().to(ctx.device) if awq is not None else let_init(layer, group, stats[group.linears[0]]).to(ctx.device)
            learn.scales[group.name] = s
        if site is not None:
            learn.qk_site = site
            if qk_stats:
                learn.qk = qk_init(site, stats[f"{site.q}:out"], stats[f"{site.k}:out"]).to(ctx.device)
            else:
                learn.qk = torch.ones(site.free_shape, device=ctx.device)
        return learn, groups, linears, skipped

    def run_layer(self, ctx: LayerContext) -> LayerResult:
        if ctx.inputs is None or ctx.targets is None:
            raise InputError("OmniQuant needs calibration data")
        layer, spec, params = ctx.module, ctx.spec, self.params
        learn, groups, linears, skipped = self.setup(ctx)
        let = params.let_for(spec)

        lwc_tensors = [t for pair in learn.clips.values() for t in pair if t is not None]
        let_tensors = list(learn.scales.values()) if let else []
        if learn.qk is not None:
            let_tensors.append(learn.qk)
        param_groups = []
        if params.lwc and lwc_tensors:
            param_groups.append({"params": lwc_tensors, "lr": params.lwc_lr})
        if let_tensors:
            param_groups.append({"params": let_tensors, "lr": params.let_lr})
        for group in param_groups:
            for t in group["params"]:
                t.requires_grad_(True)

        frozen = {n: p.requires_grad for n, p in layer.named_parameters()}
        for p in layer.parameters():
            p.requires_grad_(False)
        hooks = install_spec_hooks(layer, linears, search_spec(spec))  # activations (and KV cache) as evaluation quantizes them
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
                self.revert,
            )
        finally:
            for h in hooks:
                h.remove()
            for n, p in layer.named_parameters():
                p.requires_grad_(frozen[n])

        # The scales are the stage's fp transform: fold them exactly as a replay will, then quantize
        # the folded weights with the learned clips. No fp overrides: the replay recreates them.
        saved = saved_scales(learn.all_scales())
        fold_let(layer, ctx.arch, saved)
        quantized = {}
        for name in linears:
            a_hi, a_lo = learn.clips.get(name, (None, None))
            quantized[name] = lwc_quantize(
                layer.get_parameter(f"{name}.weight").detach(),
                None if a_hi is None else a_hi.detach(),
                None if a_lo is None else a_lo.detach(),
                spec,
            )
        for name, (a_hi, a_lo) in learn.clips.items():
            saved[f"{name}.lwc_hi"] = torch.sigmoid(a_hi.detach()).float()
            if a_lo is not None:
                saved[f"{name}.lwc_lo"] = torch.sigmoid(a_lo.detach()).float()

        metrics = {"epoch": params.epochs if stats["curve"] else 0, **stats}
        if skipped:
            metrics["fallbacks"] = [f"LET skipped for {note}" for note in skipped]
        return LayerResult(quantized=quantized, saved=saved, metrics=metrics)
