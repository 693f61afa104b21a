"""AWQ: activation-aware scale search and clip search.

Scale search, per scaling group ``prev → linears`` of the architecture table, minimises

    L(s) = ‖ M(Q(W·diag(s)) · diag(s)⁻¹, x) − M(W, x) ‖²

over ``s = mean|x|^α / mean|ŵ|^(1-α)`` (duo scaling; ``ŵ`` is ``|W|`` normalised per quantization
group) or ``s = mean|x|^α`` (x-only), for ``α`` on a grid in ``[0, 1)`` plus the identity ``s = 1``.
``M`` is the inspected module (attention block, MLP, MoE block with its router, or the linear
itself) and ``x`` its calibration input. The best ``s`` is folded into ``prev`` and the linears.

Clip search, per linear after scaling, picks for every ``(row, group)`` the ratio ``r`` of the
range kept, ``1 ≥ r ≥ 1 − max_shrink``, minimising ``‖(Q_r(w) − w)·x‖²`` of that group's partial
output on sampled tokens. Query and key projections keep ``r = 1`` (their error is not visible in
a per-linear output; AutoAWQ does the same).

Search is apart from apply: the artifact stores the scales and clip ratios (``awq.safetensors``)
and :func:`replay_search` folds the scales into a fresh base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantcli.algos.driver import LayerContext, LayerResult
from quantcli.algos.scaling import can_fold, fold_scales
from quantcli.artifact import Artifact
from quantcli.models.arch import ScalingGroup, arch_spec, decoder_layers, resolve_groups
from quantcli.quant import QuantSpec, quantize_weight
from quantcli.quant.affine import grouped

AWQ_FILE = "awq.safetensors"
NO_CLIP = ("q_proj", "k_proj")


@dataclass(frozen=True)
class AWQParams:
    n_grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    max_shrink: float = 0.5
    clip_tokens: int = 512
    seed: int = 0


def fake_quant(w: Tensor, spec: QuantSpec, clip: Tensor | None = None) -> Tensor:
    """``Q(w)``: quantize and dequantize ``w: [out, in]`` (optionally with clip ratios)."""
    return quantize_weight(w, spec, clip).dequantize().to(w.dtype)


def weight_magnitude(weights: list[Tensor], spec: QuantSpec) -> Tensor:
    """Mean over output rows of ``|W|`` normalised by its quantization group's max: ``[in]``."""
    w = torch.cat([x.float() for x in weights])
    g = spec.group_for(w.shape[1])
    wg = grouped(w.abs(), g)
    wg = wg / wg.amax(dim=-1, keepdim=True).clamp(min=1e-8)
    return wg.reshape(w.shape).mean(dim=0)


def candidate_scales(x_mean: Tensor, w_mean: Tensor | None, alpha: float) -> Tensor:
    """``s = x_mean^α / w_mean^(1-α)`` (or ``x_mean^α``), normalised so that ``sqrt(max·min) = 1``."""
    s = x_mean.pow(alpha)
    if w_mean is not None:
        s = s / w_mean.pow(1 - alpha).clamp(min=1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _out(value):
    return value[0] if isinstance(value, tuple) else value


@torch.no_grad()
def run_inspect(module: nn.Module, x: Tensor, kwargs: dict, device, batch: int) -> Tensor:
    """``module(x)`` over ``x`` (``[N, L, C]`` in chunks of ``batch`` samples, or ``[T, C]`` in
    chunks of ``batch · 2048`` tokens); output on CPU."""
    step = batch if x.dim() == 3 else batch * 2048
    outs = [_out(module(x[i : i + step].to(device), **kwargs)).float().cpu() for i in range(0, x.shape[0], step)]
    return torch.cat(outs)


@torch.no_grad()
def search_scale(
    layer: nn.Module,
    group: ScalingGroup,
    quantized: list[str],
    x: Tensor,
    kwargs: dict,
    spec: QuantSpec,
    params: AWQParams,
    device,
    batch: int,
) -> tuple[Tensor, float, float]:
    """Best scale ``[C]`` for one group, with its loss and the loss at ``s = 1`` (plain RTN)."""
    inspect = layer.get_submodule(group.inspect)
    linears = {n: layer.get_submodule(n) for n in quantized}
    originals = {n: m.weight.data.clone() for n, m in linears.items()}
    target = run_inspect(inspect, x, kwargs, device, batch)
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(dim=0).to(device)
    w_mean = weight_magnitude(list(originals.values()), spec).to(device) if params.duo_scaling else None

    def loss_for(s: Tensor) -> float:
        for n, m in linears.items():
            m.weight.data = fake_quant(originals[n] * s.view(1, -1), spec) / s.view(1, -1)
        out = run_inspect(inspect, x, kwargs, device, batch)
        return torch.mean((out - target) ** 2).item()

    ones = torch.ones_like(x_mean)
    best_s, best_loss = ones, loss_for(ones)
    rtn_loss = best_loss
    for i in range(params.n_grid):
        s = candidate_scales(x_mean, w_mean, i / params.n_grid)
        loss = loss_for(s)
        if loss < best_loss:
            best_s, best_loss = s, loss
    for n, m in linears.items():
        m.weight.data = originals[n]
    return best_s.float().cpu(), best_loss, rtn_loss


@torch.no_grad()
def search_clip(w: Tensor, x: Tensor, spec: QuantSpec, params: AWQParams, rows_per_chunk: int = 256) -> Tensor:
    """Clip ratio per ``(row, group)`` ``[out, in // g]`` minimising each group's partial-output error.

    ``w: [out, in]``; ``x: [T, in]`` sampled input tokens.
    """
    g = spec.group_for(w.shape[1])
    xg = grouped(x.float(), g).permute(1, 2, 0)  # [G, g, T]
    steps = max(1, int(params.max_shrink * params.n_grid))
    ratios = []
    for start in range(0, w.shape[0], rows_per_chunk):
        wc = w[start : start + rows_per_chunk].float()
        ref = torch.einsum("ogk,gkt->ogt", grouped(wc, g), xg)
        best_err = torch.full(ref.shape[:2], float("inf"), device=w.device)
        best_r = torch.ones(ref.shape[:2], device=w.device)
        for i in range(steps + 1):
            r = torch.full_like(best_r, 1 - i / params.n_grid)
            q = fake_quant(wc, spec, clip=r)
            err = (torch.einsum("ogk,gkt->ogt", grouped(q, g), xg) - ref).pow(2).mean(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, r, best_r)
        ratios.append(best_r)
    return torch.cat(ratios).cpu()


def _capture_inputs(ctx: LayerContext, names: list[str]) -> tuple[dict[str, Tensor], dict]:
    """Inputs ``[T, C]`` of the named submodules over the layer's inputs, and the attention kwargs."""
    feats: dict[str, list[Tensor]] = {n: [] for n in names}
    attn_kwargs: dict = {}

    def hook(name):
        def fn(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            feats[name].append(x.detach().reshape(-1, x.shape[-1]).cpu())
            if name == "self_attn" and not attn_kwargs:
                attn_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})

        return fn

    handles = [ctx.module.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    try:
        ctx.forward()
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in feats.items() if v}, attn_kwargs


def _sample_tokens(x: Tensor, count: int, seed: int) -> Tensor:
    if x.shape[0] <= count:
        return x
    gen = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=gen)[:count]]


@dataclass(frozen=True)
class AWQ:
    params: AWQParams = AWQParams()
    needs_fp_stream: bool = False

    def run_layer(self, ctx: LayerContext) -> LayerResult:
        layer, spec, params = ctx.module, ctx.spec, self.params
        quantizable = {n for stage in ctx.linears() for n in stage}
        groups = resolve_groups(layer, ctx.arch)
        n_tokens_shape = ctx.inputs.shape[:2]
        saved: dict[str, Tensor] = {}
        skipped, group_losses = [], {}

        names = sorted({g.linears[0] for g in groups} | {"self_attn"} & {g.inspect for g in groups})
        feats, attn_kwargs = _capture_inputs(ctx, names)
        for group in groups:
            targets = [n for n in group.linears if n in quantizable]
            if not targets:
                continue
            if not can_fold(layer, group):
                skipped.append(f"{group.name}: {group.prev} → {group.linears[0]} (shapes differ)")
                continue
            x = feats.get(group.linears[0])
            if x is None or x.shape[0] == 0:
                skipped.append(f"{group.name}: no calibration tokens reached it")
                continue
            inspect = layer.get_submodule(group.inspect)
            module_input = x.view(*n_tokens_shape, -1) if not isinstance(inspect, nn.Linear) else x
            kwargs = attn_kwargs if group.inspect == "self_attn" else {}
            s, loss, rtn = search_scale(layer, group, targets, module_input, kwargs, spec, params, ctx.device, ctx.batch)
            fold_scales(layer, group, s.to(ctx.device))
            for n in group.linears:
                if n in feats:
                    feats[n] = feats[n] / s  # these consumers now see x / s
            saved[f"{group.name}.scales"] = s
            group_losses[group.name] = (loss, rtn)

        quantized = {}
        for name in sorted(quantizable):
            w = layer.get_submodule(name).weight.data
            clip = None
            x = feats.get(name)
            if x is None:
                x = feats.get(_group_input(groups, name), None)
            if params.clip and x is not None and not name.endswith(NO_CLIP):
                clip = search_clip(w, _sample_tokens(x, params.clip_tokens, params.seed).to(w.device), spec, params)
            g = spec.group_for(w.shape[1])
            saved[f"{name}.clip"] = clip if clip is not None else torch.ones(w.shape[0], w.shape[1] // g)
            quantized[name] = quantize_weight(w, spec, None if clip is None else clip.to(w.device))

        metrics = {
            "awq_loss": sum(v[0] for v in group_losses.values()),
            "rtn_loss": sum(v[1] for v in group_losses.values()),
        }
        if skipped:
            metrics["skipped"] = skipped
        return LayerResult(quantized=quantized, saved=saved, metrics=metrics)


def _group_input(groups: list[ScalingGroup], name: str) -> str | None:
    """The captured input that feeds linear ``name``: the first linear of its group."""
    for group in groups:
        if name in group.linears:
            return group.linears[0]
    return None


def replay_search(model: nn.Module, artifact: Artifact) -> None:
    """Fold an AWQ artifact's searched scales into ``model`` (the base model, in place)."""
    tensors = artifact.tensors(AWQ_FILE)
    arch = arch_spec(model)
    for index, layer in enumerate(decoder_layers(model, arch)):
        prefix = f"{arch.layers_path}.{index}."
        for group in resolve_groups(layer, arch):
            scales = tensors.get(f"{prefix}{group.name}.scales")
            if scales is not None:
                fold_scales(layer, group, scales)


def clip_weights(model: nn.Module, artifact: Artifact, spec: QuantSpec) -> None:
    """Clamp each quantized linear's weights to its searched clip range (for ``--save-transformed``)."""
    tensors = artifact.tensors(AWQ_FILE)
    for key, ratio in tensors.items():
        if not key.endswith(".clip"):
            continue
        weight = model.get_submodule(key[: -len(".clip")]).weight
        g = spec.group_for(weight.shape[1])
        wg = grouped(weight.data, g)
        hi = wg.amax(dim=-1).clamp(min=0) * ratio
        lo = wg.amin(dim=-1).clamp(max=0) * ratio
        if spec.sym:
            hi = torch.maximum(hi, -lo)
            lo = -hi
        weight.data = torch.max(torch.min(wg, hi.unsqueeze(-1)), lo.unsqueeze(-1)).reshape(weight.shape)
