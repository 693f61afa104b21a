"""GPTQ: round a linear's weights column by column, feeding each column's rounding error forward.

Objective, per linear with weight ``W: [out, in]`` and calibration inputs ``X: [in, n]``::

    min over grid points Q of   ‖(W − Q) X‖²  =  (n / 2) · tr((W − Q) H (W − Q)ᵀ),   H = (2 / n) · X Xᵀ

GPTQ (Frantar et al., ICLR 2023) visits the columns in a fixed order. After rounding column ``i``
it moves the not-yet-rounded columns by the optimal (Optimal Brain Surgeon) correction for that
column's error, read off row ``i`` of ``U``, the upper Cholesky factor of ``H⁻¹``. Corrections are
applied lazily: immediately inside a block of ``block_size`` columns, to the rest of the matrix
once per block, which changes the arithmetic order only.

* act order: visit columns by decreasing ``diag(H)`` (the inputs with most energy first, while
  the most columns are still free to absorb their error).
* static groups: every group's scale/zero comes from the original weight's contiguous group
  before anything moves, so an act-order checkpoint keeps plain contiguous groups (no ``g_idx``).
  Without static groups a group's parameters are fitted when its first column is reached, on the
  already-corrected weights; with act order the groups then form in visiting order and the result
  carries ``g_idx`` (original column → group).
* AWQ clip ratios ``clip: [out, in // group]`` shrink each group's range before its scale is set.

The functions here are pure tensor math; :class:`GPTQ` is the thin per-layer wrapper the
block-wise driver runs (true-sequential capture of each linear's inputs; every RTN fallback and
raised damping listed under the layer's ``fallbacks`` metric).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from quantcli import dist
from quantcli.algos.driver import LayerContext, LayerResult
from quantcli.algos.replay import register_no_replay
from quantcli.errors import SpecError
from quantcli.models.arch import expand
from quantcli.quant import QuantizedWeight, QuantSpec, compute_qparams, dequantize_affine, quantize_affine, quantize_weight

DAMP_RETRIES = 3  # each retry multiplies the damping by 10


@dataclass(frozen=True)
class GPTQParams:
    """damp:              diagonal damping, as a fraction of mean(diag H).
    block_size:           columns per lazy-update block.
    act_order:            visit columns by decreasing diag(H).
    static_groups:        fit group scales/zeros on the original weight's contiguous groups first.
    true_sequential:      capture each stage's inputs after the earlier stages of the layer are quantized.
    min_expert_tokens:    a MoE expert that saw fewer calibration tokens (rarely routed) is rounded to nearest;
                          dense linears always get GPTQ, however few tokens calibrate them.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    min_expert_tokens: int = 64

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise SpecError(f"--damp {self.damp}: use a positive fraction of mean(diag H), e.g. 0.01")
        if self.block_size < 1:
            raise SpecError(f"--block-size {self.block_size}: use a positive number of columns, e.g. 128")


class GPTQOutput(NamedTuple):
    weight: QuantizedWeight
    err: float  # tr((W − Q) H (W − Q)ᵀ) with the undamped H
    damp: float | None  # relative damping that factored H; None when rounded to nearest
    fallback: str | None  # why this linear was rounded to nearest instead, else None


# --------------------------------------------------------------------------- Hessian


def make_hessian(in_features: int, device: torch.device | str | None = None) -> Tensor:
    """An empty running Hessian ``float32 [in, in]``."""
    return torch.zeros(in_features, in_features, dtype=torch.float32, device=device)


def accumulate_hessian(H: Tensor, x: Tensor, count: int) -> int:
    """Fold inputs ``x: [..., in]`` into ``H = (2 / count) · Σ xᵢ xᵢᵀ`` in place; return the new count.

    ``count`` is the number of input vectors (tokens) already in ``H``; one ``addmm_`` per call.
    """
    x = x.reshape(-1, x.shape[-1]).to(H.dtype)
    total = count + x.shape[0]
    if total > count:
        H.addmm_(x.T, x, beta=count / total, alpha=2.0 / total)
    return total


def hessian_error(W: Tensor, Q: Tensor, H: Tensor) -> float:
    """``tr((W − Q) H (W − Q)ᵀ)`` for ``W, Q: [out, in]``, ``H: [in, in]``: the output error on the inputs of ``H``."""
    D = W.float() - Q.float()
    return float(((D @ H) * D).sum())


def damp_and_invert(H: Tensor, damp: float, retries: int = DAMP_RETRIES) -> tuple[Tensor | None, float]:
    """Upper Cholesky factor ``U: [in, in]`` of ``(H + λ I)⁻¹``, ``λ = damp · mean(diag H)``.

    Dead columns (zero diagonal: inputs that were always zero) get 1 on the diagonal, so they are
    rounded to nearest without touching the others. When a factorisation fails the damping is
    multiplied by 10, up to ``retries`` times. Returns ``(U, damp used)``, or ``(None, last damp
    tried)`` when ``H`` cannot be factored (non-finite, non-positive diagonal, every retry failed).
    ``H`` is not modified.
    """
    H = H.float().clone()
    diag = H.diagonal()
    diag[diag == 0] = 1.0
    mean = diag.mean()
    if not (torch.isfinite(H).all() and mean > 0):
        return None, damp
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(retries + 1):
        rel = damp * 10**attempt
        L, info = torch.linalg.cholesky_ex(H + (rel * mean) * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, rel
    return None, rel


def _hessian_problem(H: Tensor) -> str | None:
    """Why ``H`` cannot drive GPTQ at all (before any damping), or None."""
    if not torch.isfinite(H).all():
        return "Hessian has non-finite entries"
    diag = H.diagonal()
    if (diag < 0).any():
        return "Hessian has a negative diagonal"
    if not (diag > 0).any():
        return "Hessian is zero (no calibration input reached this linear)"
    return None


# --------------------------------------------------------------------------- quantization


def rtn_fallback(W: Tensor, H: Tensor, spec: QuantSpec, clip: Tensor | None, reason: str) -> GPTQOutput:
    """Round-to-nearest codes for ``W`` with the reason recorded (GPTQ could not run on this linear)."""
    weight = quantize_weight(W.float(), spec, clip)
    err = hessian_error(W, weight.dequantize(), H) if torch.isfinite(H).all() else float("nan")
    return GPTQOutput(weight, err, None, reason)


def _blocks(n: int, group: int, block: int):
    """Lazy-update column ranges ``[i1, i2)``; a group either lies inside one block or starts one,
    so its columns are fully corrected when its parameters are fitted at its first column."""
    i1 = 0
    while i1 < n:
        if group <= block:
            i2 = min(i1 + block // group * group, n)
        else:
            i2 = min(i1 + block, n, (i1 // group + 1) * group)
        yield i1, i2
        i1 = i2


@torch.no_grad()
def gptq_quantize(W: Tensor, H: Tensor, spec: QuantSpec, params: GPTQParams, clip: Tensor | None = None) -> GPTQOutput:
    """GPTQ codes for ``W: [out, in]`` that minimise ``tr((W − Q) H (W − Q)ᵀ)``, ``H: [in, in]``.

    ``clip: [out, in // group]`` optional AWQ clip ratios. Returns the quantized weight (codes in
    the original column order; ``g_idx`` only with act order without static groups), its error,
    the damping used, and a fallback reason when ``H`` was unusable and the linear was rounded to
    nearest instead (never raises on a bad Hessian).
    """
    W = W.float()
    out_features, n = W.shape
    group = spec.group_for(n)
    n_groups = n // group
    permuted_groups = params.act_order and not params.static_groups and n_groups > 1
    if permuted_groups and clip is not None:
        raise ValueError("AWQ clip ratios belong to contiguous groups: use static groups with act order")

    if (problem := _hessian_problem(H)) is not None:
        return rtn_fallback(W, H, spec, clip, problem)
    perm = torch.argsort(H.diagonal(), descending=True) if params.act_order else torch.arange(n, device=W.device)
    U, damp = damp_and_invert(H[perm][:, perm], params.damp)
    if U is None:
        return rtn_fallback(W, H, spec, clip, f"Cholesky failed with damping up to {damp:g}")

    Wp = W[:, perm].clone()  # visiting order; corrected in place, column by column
    codes = torch.empty(out_features, n, dtype=torch.uint8, device=W.device)
    if params.static_groups:
        scale, zero = compute_qparams(W, spec.wbits, group, spec.sym, clip)
        group_of = (perm // group).tolist()  # each visited column keeps its original contiguous group
    else:
        scale = torch.empty(out_features, n_groups, device=W.device)
        zero = torch.empty_like(scale)
        group_of = [i // group for i in range(n)]  # groups form in visiting order

    for i1, i2 in _blocks(n, group, params.block_size):
        errors = torch.empty(out_features, i2 - i1, device=W.device)
        for i in range(i1, i2):
            j = group_of[i]
            if not params.static_groups and i % group == 0:
                ratio = None if clip is None else clip[:, j : j + 1]
                scale[:, j : j + 1], zero[:, j : j + 1] = compute_qparams(Wp[:, i : i + group], spec.wbits, group, spec.sym, ratio)
            w, s, z = Wp[:, i], scale[:, j], zero[:, j]
            q = quantize_affine(w, s, z, spec.wbits)
            codes[:, i] = q.to(torch.uint8)
            e = (w - dequantize_affine(q, s, z)) / U[i, i]
            Wp[:, i + 1 : i2].addr_(e, U[i, i + 1 : i2], alpha=-1)
            errors[:, i - i1] = e
        Wp[:, i2:].addmm_(errors, U[i1:i2, i2:], alpha=-1)

    inverse = torch.argsort(perm)
    g_idx = torch.tensor(group_of, dtype=torch.int32, device=W.device)[inverse] if permuted_groups else None
    weight = QuantizedWeight(codes[:, inverse], scale, zero, group, g_idx)
    return GPTQOutput(weight, hessian_error(W, weight.dequantize(), H), damp, None)


# --------------------------------------------------------------------------- the layer algorithm


class _Captured(Exception):
    """Every linear of the stage has seen this mini-batch: the rest of the layer need not run."""


@torch.no_grad()
def capture_hessians(ctx: LayerContext, names: list[str]) -> dict[str, tuple[Tensor, int]]:
    """Run the layer over ``ctx.inputs`` and return each named linear's ``(H, tokens seen)``.

    Each mini-batch stops as soon as all the named linears have seen their inputs. A routed
    expert only sees the tokens sent to it, so its count may be small or zero.
    """
    state = {name: [make_hessian(ctx.module.get_submodule(name).in_features, ctx.device), 0] for name in names}
    waiting: set[str] = set()

    def hook(name):
        def accumulate(_module, args):
            entry = state[name]
            entry[1] = accumulate_hessian(entry[0], args[0], entry[1])
            waiting.discard(name)
            if not waiting:
                raise _Captured

        return accumulate

    handles = [ctx.module.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        for start in range(0, ctx.inputs.shape[0], ctx.batch):
            waiting.update(names)
            try:
                ctx.module(ctx.inputs[start : start + ctx.batch].to(ctx.device), **ctx.kwargs)
            except _Captured:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: (H, count) for name, (H, count) in state.items()}


def expert_linears(layer, arch) -> list[str]:
    """The layer's MoE expert linears: those its architecture entry names with an expert wildcard ``*``."""
    return [name for stage in arch.sequential for pattern in stage if "*" in pattern for name in expand(layer, pattern)]


@dataclass(frozen=True)
class GPTQ:
    params: GPTQParams = GPTQParams()
    needs_fp_stream: bool = False

    def run_layer(self, ctx: LayerContext) -> LayerResult:
        if ctx.inputs is None:
            raise ValueError("GPTQ needs calibration inputs")
        p = self.params
        stages = ctx.linears()
        if not p.true_sequential:
            stages = [[name for stage in stages for name in stage]]
        quantized: dict[str, QuantizedWeight] = {}
        gptq_err = rtn_err = 0.0
        fallbacks: list[str] = []  # one note per linear not quantized as configured
        experts = set(expert_linears(ctx.module, ctx.arch))
        for stage in stages:
            hessians = dist.all_mean_counted(capture_hessians(ctx, stage))  # summed over ranks; earlier stages are already quantized in place
            for name in stage:
                linear = ctx.module.get_submodule(name)
                W, (H, count) = linear.weight.data, hessians.pop(name)
                clip = ctx.upstream.get(f"{name}.clip")
                clip = None if clip is None else clip.to(W.device)
                if name in experts and count < p.min_expert_tokens:
                    res = rtn_fallback(W, H, ctx.spec, clip, f"expert saw {count} calibration tokens (< --min-expert-tokens {p.min_expert_tokens})")
                else:
                    res = gptq_quantize(W, H, ctx.spec, p, clip)
                gptq_err += res.err
                rtn_err += res.err if res.fallback else hessian_error(W, quantize_weight(W, ctx.spec, clip).dequantize(), H)
                if res.fallback is not None:
                    fallbacks.append(f"{name}: rounded to nearest ({res.fallback})")
                elif res.damp != p.damp:
                    fallbacks.append(f"{name}: damping raised to {res.damp:g} (Cholesky failed at {p.damp:g})")
                linear.weight.data.copy_(res.weight.dequantize().to(W.dtype))
                quantized[name] = _to_cpu(res.weight)
                del H
            ctx.report(gptq_err=gptq_err, rtn_err=rtn_err)
        metrics: dict = {"gptq_err": gptq_err, "rtn_err": rtn_err}
        if fallbacks:
            metrics["fallbacks"] = fallbacks
        return LayerResult(quantized=quantized, metrics=metrics)


def _to_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    g_idx = None if qw.g_idx is None else qw.g_idx.cpu()
    return QuantizedWeight(qw.codes.cpu(), qw.scale.cpu(), qw.zero.cpu(), qw.group, g_idx)


register_no_replay("gptq")  # GPTQ's error feedback lives in its codes: nothing to replay in full precision
