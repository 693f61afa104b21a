"""AWQ: activation-aware scale search and clip search.

Scale search, per scaling group ``prev → linears`` of the architecture table, minimises

    L(s) = ‖ M(Q(W·diag(s)) · diag(s)⁻¹, x) − M(W, x) ‖²

over ``s = mean|x|^α / mean|ŵ|^(1-α)`` (duo scaling; ``ŵ`` is ``|W|`` normalised per quantization
group) or ``s = mean|x|^α`` (x-only), for ``α`` on a grid in ``[0, 1)`` plus the identity ``s = 1``.
``M`` is the inspected module (attention block, MLP, MoE block with its router, or the linear
itself) and ``x`` its calibration input; with activation bits (W-A specs) the linears' inputs
``x / s`` are fake-quantized per token inside ``M``, so ``s`` also smooths activations. The best
``s`` is folded into ``prev`` and the linears. v→o under grouped-query attention is skipped: it
could fold (``scaling.channel_map``), but its loss on ``o_proj`` alone cannot see the error its
scale moves into ``v_proj``, and on SmolLM2-135M searching it made perplexity worse.

Clip search, per linear after scaling, picks for every ``(row, group)`` the ratio ``r`` of the
range kept, ``1 ≥ r ≥ 1 − max_shrink``, minimising ``‖(Q_r(w) − w)·x‖²`` of that group's partial
output over all calibration tokens (exactly, through ``XᵀX``), and keeps the result only if the whole
linear's output error is not worse than unclipped. Query and key projections keep ``r = 1`` (their
error is not visible in a per-linear output; AutoAWQ does the same).

Search is apart from apply: the artifact stores the scales and clip ratios (``awq.safetensors``)
and :func:`replay_awq_layer` folds one layer's scales into a fresh base model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantcli import dist
from quantcli.algos.driver import COMPUTE_DTYPES, LayerContext, LayerResult, autocast_to, resolve_compute_dtype
from quantcli.algos.replay import register_replay
from quantcli.algos.scaling import can_fold, channel_map, fold_scales
from quantcli.artifact import Artifact
from quantcli.models.arch import ARCHITECTURES, ArchSpec, ScalingGroup, resolve_groups
from quantcli.models.act_hooks import fake_quant_input
from quantcli.quant import QuantSpec, clip_range, quantize_weight
from quantcli.quant.affine import grouped

AWQ_FILE = "awq.safetensors"
NO_CLIP = ("q_proj", "k_proj")


@dataclass(frozen=True)
class AWQParams:
    n_grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    max_shrink: float = 0.5
    # of the scale search's forward passes: float32, mixed, auto, bfloat16, float16. float32 stays the default until
    # mixed is shown to match it on the real model (benchmarks/awq_speed.py): auto cost perplexity off the tuning text
    search_dtype: str = "float32"
    finalists: int = 2  # mixed: grid candidates the float32 decision re-evaluates, best of the low-precision screen


SEARCH_MODES = ("mixed", "auto", *COMPUTE_DTYPES)


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
def run_inspect(module: nn.Module, x: Tensor, kwargs: dict, device, batch: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``module(x)`` over ``x`` (``[N, L, C]`` in chunks of ``batch`` samples, or ``[T, C]`` in
    chunks of ``batch · 2048`` tokens), under autocast to ``dtype`` unless float32; output float32 on CPU."""
    step = batch if x.dim() == 3 else batch * 2048
    with autocast_to(device, dtype):
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
    target: Tensor | None = None,
) -> tuple[Tensor, float, float]:
    """Best scale ``[C]`` for one group, with its loss and the loss at ``s = 1`` (plain RTN).

    ``target``: the inspected module's full-precision output over ``x`` when already known (seen
    during the driver's targets forward), else computed here. ``params.search_dtype``:

    - ``float32`` (default), ``bfloat16``, ``float16``: target and every candidate forward in that dtype;
    - ``auto``: bfloat16 where the device runs it fast, else float32 (see :func:`~quantcli.algos.driver.resolve_compute_dtype`);
    - ``mixed``: every grid candidate is screened with bfloat16 forwards against a
      bfloat16 target (where bfloat16 is fast; elsewhere this is the float32 search), then the
      ``params.finalists`` best of the screen and ``s = 1`` are evaluated in float32 against the
      float32 target, and the float32 loss decides. Reported losses are always float32 ones.
    """
    inspect = layer.get_submodule(group.inspect)
    linears = {n: layer.get_submodule(n) for n in quantized}
    originals = {n: m.weight.data.clone() for n, m in linears.items()}
    mixed = params.search_dtype == "mixed"
    dtype = resolve_compute_dtype("auto" if mixed else params.search_dtype, device)
    screen = mixed and dtype != torch.float32
    final_dtype = torch.float32 if mixed else dtype
    if target is None or final_dtype != torch.float32:
        target = run_inspect(inspect, x, kwargs, device, batch, final_dtype)
    screen_target = run_inspect(inspect, x, kwargs, device, batch, dtype) if screen else None
    x_mean = dist.all_mean(x.abs().reshape(-1, x.shape[-1]).float().mean(dim=0), x.shape[:-1].numel()).to(device)
    w_mean = weight_magnitude(list(originals.values()), spec).to(device) if params.duo_scaling else None

    current = [torch.ones(1)]  # the consumers' input scale under test

    def quantize_input(_m, args):  # W-A settings: the linear sees Q_a(x / s) (the spec's quantizer, per token), put back on x's scale
        return (fake_quant_input(args[0] / current[0], spec) * current[0],) + tuple(args[1:])

    def loss_for(s: Tensor, dtype: torch.dtype, reference: Tensor) -> float:
        current[0] = s_in = s.view(1, -1)
        for n, m in linears.items():
            m.weight.data = fake_quant(originals[n] * s_in, spec) / s_in
        out = run_inspect(inspect, x, kwargs, device, batch, dtype)
        return dist.all_mean(torch.mean((out - reference) ** 2).item(), out.numel())

    hooks = [m.register_forward_pre_hook(quantize_input) for m in linears.values()] if spec.abits < 16 else []
    try:
        ones = torch.ones_like(x_mean)
        grid = [candidate_scales(x_mean, w_mean, i / params.n_grid) for i in range(params.n_grid)]
        if screen:  # a bfloat16 screen keeps the best few; float32 decides among them
            screened = [loss_for(s, dtype, screen_target) for s in grid]
            keep = sorted(range(len(grid)), key=screened.__getitem__)[: params.finalists]
            grid = [grid[i] for i in sorted(keep)]  # in grid order, so ties resolve as the full search's would
        best_s, best_loss = ones, loss_for(ones, final_dtype, target)
        rtn_loss = best_loss
        for s in grid:
            loss = loss_for(s, final_dtype, target)
            if loss < best_loss:
                best_s, best_loss = s, loss
    finally:
        for hook in hooks:
            hook.remove()
        for n, m in linears.items():
            m.weight.data = originals[n]
    return best_s.float().cpu(), best_loss, rtn_loss


def input_gram(x: Tensor) -> Tensor:
    """``XᵀX / T`` ``[in, in]`` (float32) of input tokens ``x: [T, in]``."""
    x = x.float()
    return dist.all_mean(x.T @ x / max(x.shape[0], 1), x.shape[0])


def output_error(delta: Tensor, gram: Tensor) -> Tensor:
    """``‖Δ·X‖² / T`` per output row from ``delta: [out, in]`` and ``gram = XᵀX / T``: ``[out]``."""
    return ((delta.float() @ gram) * delta.float()).sum(dim=1)


@torch.no_grad()
def search_clip(w: Tensor, gram: Tensor, spec: QuantSpec, params: AWQParams, rows_per_chunk: int = 1024) -> Tensor:
    """Clip ratio per ``(row, group)`` ``[out, in // g]`` minimising each group's partial-output error.

    ``w: [out, in]``; ``gram = XᵀX / T`` ``[in, in]`` over all calibration tokens, so the error of a
    group ``δ = Q_r(w_g) − w_g`` is ``δᵀ G_gg δ`` exactly, rare tokens with huge activations
    included (sampling tokens can miss them and clip the weights they depend on). The chosen clips
    are kept only if the whole linear's output error ``tr(Δ G Δᵀ)``, cross-group terms included, is
    not above that of the unclipped weights; otherwise all ratios are 1.
    """
    g = spec.group_for(w.shape[1])
    n_groups = w.shape[1] // g
    index = torch.arange(n_groups, device=gram.device)
    blocks = grouped(gram, g).view(n_groups, g, n_groups, g)[index, :, index]  # [G, g, g]
    steps = max(1, int(params.max_shrink * params.n_grid))
    ratios = []
    for start in range(0, w.shape[0], rows_per_chunk):
        wc = w[start : start + rows_per_chunk].float()
        best_err = torch.full((wc.shape[0], n_groups), float("inf"), device=w.device)
        best_r = torch.ones_like(best_err)
        for i in range(steps + 1):
            r = torch.full_like(best_r, 1 - i / params.n_grid)
            d = grouped(fake_quant(wc, spec, clip=r) - wc, g)  # [o, G, g]
            err = torch.einsum("ogk,gkl,ogl->og", d, blocks, d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, r, best_r)
        ratios.append(best_r)
    clip = torch.cat(ratios)
    clipped = output_error(fake_quant(w.float(), spec, clip=clip) - w.float(), gram).sum()
    plain = output_error(fake_quant(w.float(), spec) - w.float(), gram).sum()
    return (clip if clipped <= plain else torch.ones_like(clip)).cpu()


def _observed_names(layer: nn.Module) -> tuple[list[str], list[str]]:
    """Submodules whose inputs (first linear of a group, ``self_attn``) and outputs (inspected
    modules) the search needs, for any architecture in the table (absent modules dropped)."""
    inputs, outputs = set(), set()
    for arch in ARCHITECTURES.values():
        for group in resolve_groups(layer, arch):
            inputs.add(group.linears[0])
            outputs.add(group.inspect)
            if group.inspect == "self_attn":
                inputs.add("self_attn")
    return sorted(inputs), sorted(outputs)


@contextmanager
def observe_layer(layer: nn.Module):
    """Record, during one forward of ``layer``, the inputs ``[T, C]`` of the groups' first
    linears (and ``self_attn``, with its attention kwargs) and the inspected modules' outputs
    (``[N, L, C]`` for blocks, ``[T, out]`` for linears), on CPU in float32.

    Yields ``{"inputs": {name: Tensor}, "outputs": {name: Tensor}, "attn_kwargs": dict}``,
    filled when the context exits. A module returning the very tensor another one returned
    (``o_proj`` inside ``self_attn``) shares its copy.
    """
    input_names, output_names = _observed_names(layer)
    feats: dict[str, list[Tensor]] = {n: [] for n in input_names}
    outs: dict[str, list[Tensor]] = {n: [] for n in output_names}
    attn_kwargs: dict = {}
    last: list = [None, None]  # the last output seen and its CPU copy

    def pre_hook(name):
        def fn(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            feats[name].append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
            if name == "self_attn" and not attn_kwargs:
                attn_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})

        return fn

    def post_hook(name):
        def fn(module, _args, output):
            y = _out(output)
            if last[0] is not y:
                last[0], last[1] = y, y.detach().float().cpu()
            outs[name].append(last[1] if not isinstance(module, nn.Linear) else last[1].reshape(-1, y.shape[-1]))

        return fn

    handles = [layer.get_submodule(n).register_forward_pre_hook(pre_hook(n), with_kwargs=True) for n in input_names]
    handles += [layer.get_submodule(n).register_forward_hook(post_hook(n)) for n in output_names]
    seen: dict = {}
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
        last.clear()
    seen.update(
        inputs={n: torch.cat(v) for n, v in feats.items() if v},
        outputs={n: torch.cat(v) for n, v in outs.items() if v},
        attn_kwargs=attn_kwargs,
    )


def _capture(ctx: LayerContext) -> dict:
    """What :func:`observe_layer` records, from ``ctx.seen`` or (when the driver did not observe
    the targets forward, e.g. a direct call) from a forward of its own."""
    if ctx.seen:
        return ctx.seen
    with observe_layer(ctx.module) as seen:
        ctx.forward()
    return seen


@dataclass(frozen=True)
class AWQ:
    params: AWQParams = AWQParams()
    needs_fp_stream: bool = False

    def observe(self, layer: nn.Module):
        """Record the search's inputs and targets during the driver's full-precision forward."""
        return observe_layer(layer)

    def run_layer(self, ctx: LayerContext) -> LayerResult:
        layer, spec, params = ctx.module, ctx.spec, self.params
        quantizable = {n for stage in ctx.linears() for n in stage}
        groups = resolve_groups(layer, ctx.arch)
        n_tokens_shape = ctx.inputs.shape[:2]
        saved: dict[str, Tensor] = {}
        skipped, group_losses = [], {}

        seen = _capture(ctx)
        feats, outputs, attn_kwargs = dict(seen["inputs"]), seen["outputs"], seen["attn_kwargs"]
        for group in groups:
            targets = [n for n in group.linears if n in quantizable]
            if not targets:
                continue
            if not can_fold(layer, group) or channel_map(layer, group) is not None:
                skipped.append(f"{group.name}: {group.prev} → {group.linears[0]} (channels do not map one to one)")
                continue
            x = feats.get(group.linears[0])
            if x is None or x.shape[0] == 0:
                skipped.append(f"{group.name}: no calibration tokens reached it")
                continue
            inspect = layer.get_submodule(group.inspect)
            module_input = x.view(*n_tokens_shape, -1) if not isinstance(inspect, nn.Linear) else x
            kwargs = attn_kwargs if group.inspect == "self_attn" else {}
            # the unquantized layer's output of the inspected module: folding earlier groups' scales kept the function
            s, loss, rtn = search_scale(
                layer, group, targets, module_input, kwargs, spec, params, ctx.device, ctx.batch, outputs.get(group.inspect)
            )
            fold_scales(layer, group, s.to(ctx.device))
            for n in group.linears:
                if n in feats:
                    feats[n] = feats[n] / s  # these consumers now see x / s
            saved[f"{group.name}.scales"] = s
            group_losses[group.name] = (loss, rtn)

        quantized, grams = {}, {}
        for name in sorted(quantizable):
            w = layer.get_submodule(name).weight.data
            clip = None
            source = name if name in feats else _group_input(groups, name)  # the captured input feeding it
            if params.clip and source in feats and not name.endswith(NO_CLIP):
                if source not in grams:  # linears fed by the same input share its Gram matrix
                    grams[source] = input_gram(feats[source].to(w.device))
                clip = search_clip(w, grams[source], spec, params)
            g = spec.group_for(w.shape[1])
            saved[f"{name}.clip"] = clip if clip is not None else torch.ones(w.shape[0], w.shape[1] // g)
            quantized[name] = quantize_weight(w, spec, None if clip is None else clip.to(w.device))

        metrics = {
            "awq_loss": sum(v[0] for v in group_losses.values()),
            "rtn_loss": sum(v[1] for v in group_losses.values()),
        }
        if skipped:
            metrics["fallbacks"] = [f"no scale search for {note}" for note in skipped]
        return LayerResult(quantized=quantized, saved=saved, metrics=metrics)


def _group_input(groups: list[ScalingGroup], name: str) -> str | None:
    """The captured input that feeds linear ``name``: the first linear of its group."""
    for group in groups:
        if name in group.linears:
            return group.linears[0]
    return None


@register_replay("awq")
def replay_awq_layer(layer: nn.Module, arch: ArchSpec, tensors: dict[str, Tensor]) -> None:
    """Fold one decoder layer's searched scales (``"<group>.scales"``, ``[C]``) into ``layer`` in place.

    Folding divides ``prev``'s output channels by ``s`` and multiplies the consumers' input
    channels by it, so the layer computes the same function; clip ratios act only on the codes.
    """
    device = next(layer.parameters()).device
    for group in resolve_groups(layer, arch):
        scales = tensors.get(f"{group.name}.scales")
        if scales is not None:
            fold_scales(layer, group, scales.to(device))


def clip_weights(model: nn.Module, artifact: Artifact, spec: QuantSpec) -> None:
    """Clamp each quantized linear's weights to its searched clip range (for ``--save-transformed``)."""
    tensors = artifact.tensors(AWQ_FILE)
    for key, ratio in tensors.items():
        if not key.endswith(".clip"):
            continue
        weight = model.get_submodule(key[: -len(".clip")]).weight
        g = spec.group_for(weight.shape[1])
        wg = grouped(weight.data, g)
        lo, hi = clip_range(wg, ratio)
        if spec.sym:
            hi = torch.maximum(hi, -lo)
            lo = -hi
        weight.data = torch.max(torch.min(wg, hi.unsqueeze(-1)), lo.unsqueeze(-1)).reshape(weight.shape)
