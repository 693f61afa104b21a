"""SmoothQuant: migrate activation outliers into the weights with a per-channel scale.

For every scaling group ``prev → linears`` of the architecture table, with ``X`` the linears'
input (calibration tokens) and ``W`` their weights stacked by rows, the scale on channel ``j`` is

    s_j = max_t |X_tj|^α / max_i |W_ij|^(1−α)            (clamped to ≥ ``min_scale``)

and it is folded into ``prev`` (a norm's weight or a linear's rows are divided by ``s``) and into
the consumers' input columns (multiplied by ``s``), so the function is unchanged while the
activation range becomes ``max|X_j| / s_j = (max|X_j|·max|W_j|)^(1−α)`` and the weight range
``max|W_j|·s_j = (max|X_j|·max|W_j|)^α``: α = ½ splits the difficulty evenly. Under grouped-query attention v→o folds through
``scaling.channel_map``: the statistics of the ``o_proj`` input channels are reduced (max) onto
the ``v_proj`` channel that feeds them. A MoE router is scaled with its group (and stays fp).

``alpha="auto"`` picks α per decoder layer from a grid, minimising the block output error

    L(α) = ‖ B_Q(α)(x) − B(x) ‖²

where ``B`` is the full-precision layer and ``B_Q(α)`` the layer smoothed with α, its linears
round-to-nearest quantized under the stage's spec and their inputs fake-quantized as the spec
says (e.g. W8A8); the chosen α and the loss per candidate go to the layer's metrics.

The stage quantizes nothing: its artifact (kind ``smooth``) stores the scales
(``smooth.safetensors``, ``<layer>.<group>.scales``) and :func:`replay_smooth_layer` folds them
into a fresh model, layer by layer, so every other stage accepts it as INPUT.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
import torch
from torch import Tensor, nn

from quantcli import dist
from quantcli.algos.awq import replay_awq_layer
from quantcli.algos.driver import LayerContext, LayerResult, layer_forward
from quantcli.algos.omniquant.train import input_absmax  # max_t |x_tj| of named linears' inputs over ctx
from quantcli.algos.replay import register_replay
from quantcli.algos.scaling import channel_map, fold_scales, out_channels, to_prev
from quantcli.models.arch import ArchSpec, ScalingGroup, quantizable_linears, resolve_groups
from quantcli.models.act_hooks import calibrate_static_inputs, install_spec_hooks
from quantcli.quant import QuantSpec, quantize_weight

SMOOTH_FILE = "smooth.safetensors"


@dataclass(frozen=True)
class SmoothParams:
    """alpha: migration strength in [0, 1], or ``"auto"`` (searched per layer on ``grid``).
    grid: ``auto`` tries α = 1/grid, 2/grid, …, (grid−1)/grid.
    min_scale: lower bound of every scale (and of the statistics it is computed from)."""

    alpha: float | str = 0.5
    grid: int = 10
    min_scale: float = 1e-5

    def alphas(self) -> list[float]:
        if self.alpha != "auto":
            return [float(self.alpha)]
        return [round(i / self.grid, 4) for i in range(1, self.grid)]


# ------------------------------------------------------------------------------ pure math


def smooth_scales(x_absmax: Tensor, w_absmax: Tensor, alpha: float, min_scale: float = 1e-5) -> Tensor:
    """``s = max|X|^α / max|W|^(1−α)`` per channel; ``x_absmax, w_absmax: [C]`` → ``[C]`` float32."""
    x = x_absmax.float().clamp(min=min_scale)
    w = w_absmax.float().clamp(min=min_scale)
    return (x.pow(alpha) / w.pow(1 - alpha)).clamp(min=min_scale)


def weight_absmax(weights: list[Tensor]) -> Tensor:
    """``max_i |W_ij|`` over the rows of all ``weights: [out_k, C]``: ``[C]``."""
    return torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)


# ------------------------------------------------------------------------------ on a layer


def group_scales(layer: nn.Module, group: ScalingGroup, x_absmax: Tensor, alpha: float, min_scale: float) -> Tensor:
    """The scale ``[C_prev]`` of one group from its consumers' input statistic ``x_absmax: [C_in]``."""
    index = channel_map(layer, group)
    width = out_channels(layer.get_submodule(group.prev))
    w = weight_absmax([layer.get_submodule(n).weight for n in group.linears])
    x_prev = to_prev(x_absmax.to(w.device), index, width, reduce="amax")
    w_prev = to_prev(w, index, width, reduce="amax")
    return smooth_scales(x_prev, w_prev, alpha, min_scale)


def smooth_layer(
    layer: nn.Module, groups: list[ScalingGroup], stats: dict[str, Tensor], alpha: float, min_scale: float = 1e-5
) -> dict[str, Tensor]:
    """Fold SmoothQuant scales with strength ``alpha`` into every group of ``layer`` that has statistics.

    ``stats``: ``max|x|`` ``[C_in]`` of each group's first consumer's input (``omniquant.train.input_absmax``). Each
    group's scales are computed from the weights just before its own fold; a fold never changes
    another group's consumers, so the order of the groups does not matter. Returns name → ``s``.
    """
    out = {}
    for group in groups:
        x = stats.get(group.linears[0])
        if x is None:
            continue
        s = group_scales(layer, group, x, alpha, min_scale)
        fold_scales(layer, group, s)
        out[group.name] = s.cpu()
    return out


@torch.no_grad()
def quantized_block_loss(layer: nn.Module, arch: ArchSpec, spec: QuantSpec, x: Tensor, targets: Tensor, kwargs: dict, device, batch: int) -> float:
    """``‖B_Q(x) − targets‖² / numel`` over all ranks' tokens: ``layer`` with its linears RTN-quantized under ``spec`` and
    their inputs (and the KV cache) fake-quantized as ``spec`` says, on ``x: [N, L, H]``. ``layer`` is left unchanged."""
    block = copy.deepcopy(layer)
    names = [n for stage in quantizable_linears(block, arch) for n in stage]
    for name in names:
        weight = block.get_submodule(name).weight
        weight.data.copy_(quantize_weight(weight.data, spec).dequantize().to(weight))
    static = None
    if spec.act_static and not spec.weight_only:
        static = calibrate_static_inputs(block, names, spec, lambda: layer_forward(block, x, kwargs, device, batch))
    hooks = install_spec_hooks(block, names, spec, static)
    try:
        out = layer_forward(block, x, kwargs, device, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return dist.all_mean(torch.mean((out.float() - targets.float()) ** 2).item(), out.numel())  # every rank: the same loss, so the same α


@dataclass(frozen=True)
class Smooth:
    """The SmoothQuant stage for the block-wise driver: folds scales, returns them, quantizes nothing."""

    params: SmoothParams = SmoothParams()
    needs_fp_stream: bool = False

    def run_layer(self, ctx: LayerContext) -> LayerResult:
        layer, params = ctx.module, self.params
        groups = resolve_groups(layer, ctx.arch)
        stats = input_absmax(ctx, sorted({g.linears[0] for g in groups}))
        unseen = [g.name for g in groups if g.linears[0] not in stats]
        losses: dict[float, float] = {}
        alphas = params.alphas()
        if len(alphas) > 1:
            for alpha in alphas:
                trial = copy.deepcopy(layer)
                smooth_layer(trial, groups, stats, alpha, params.min_scale)
                losses[alpha] = quantized_block_loss(trial, ctx.arch, ctx.spec, ctx.inputs, ctx.targets, ctx.kwargs, ctx.device, ctx.batch)
                del trial
            alpha = min(losses, key=losses.get)
        else:
            alpha = alphas[0]
        plain = quantized_block_loss(layer, ctx.arch, ctx.spec, ctx.inputs, ctx.targets, ctx.kwargs, ctx.device, ctx.batch)
        scales = smooth_layer(layer, groups, stats, alpha, params.min_scale)
        smoothed = losses.get(alpha)
        if smoothed is None:
            smoothed = quantized_block_loss(layer, ctx.arch, ctx.spec, ctx.inputs, ctx.targets, ctx.kwargs, ctx.device, ctx.batch)
        metrics = {"alpha": alpha, "quant_loss": smoothed, "quant_loss_unsmoothed": plain}
        if losses:
            metrics["alpha_losses"] = {str(a): v for a, v in losses.items()}
        if unseen:
            metrics["skipped"] = [f"{name}: no calibration tokens reached it (s = 1)" for name in unseen]
        return LayerResult(saved={f"{name}.scales": s for name, s in scales.items()}, metrics=metrics)


# ------------------------------------------------------------------------------ replay (OmniQuant starts LET from these scales: algos.parent)


# Replay is AWQ's: fold each layer's stored ``"<group>.scales"`` into the fresh layer.
replay_smooth_layer = register_replay("smooth")(replay_awq_layer)

