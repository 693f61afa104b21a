"""GPTQ: round a linear's weights column by column, feeding each column's rounding error forward.

Objective, per linear with weight ``W: [out, in]`` and calibration inputs ``X: [in, n]``::

    min over grid points Q of   ‖(W − Q) X‖²  =  (n / 2) · tr((W − Q) H (W − Q)ᵀ),   H = (2 / n) · X Xᵀ

GPTQ (Frantar et al., ICLR 2023) visits the columns in a fixed order. After rounding column ``i``
it moves the not-yet-rounded columns by the optimal (Optimal Brain Surgeon) correction for that
column's error, read off row ``i`` of ``U``, the upper Cholesky factor of ``H⁻¹`` — here in the
equivalent form that needs only ``R = U⁻¹`` (``H = R Rᵀ``, one Cholesky factorisation, no
inverse): column ``j`` moves by ``Σ_{k<j} (w_k − q_k) R[k, j] / R[j, j]``. Corrections are
applied lazily, which changes the arithmetic order only: immediately (rank 1) inside a sub-block
of ``INNER_BLOCK`` columns, to the rest of its block once per sub-block, and to the rest of the
matrix once per block of ``block_size`` columns. The weight is held transposed, so every update
writes contiguous rows.

* act order: visit columns by decreasing ``diag(H)`` (the inputs with most energy first, while
  the most columns are still free to absorb their error).
* static groups: every group's scale/zero comes from the original weight's contiguous group
  before anything moves, so an act-order checkpoint keeps plain contiguous groups (no ``g_idx``).
  Without static groups a group's parameters are fitted when its first column is reached, on the
  already-corrected weights; with act order the groups then form in visiting order and the result
  carries ``g_idx`` (original column → group).
* AWQ clip ratios ``clip: [out, in // group]`` shrink each group's range before its scale is set.

The functions here are pure tensor math; :class:`GPTQ` is the thin per-layer wrapper the
block-wise driver runs (true-sequential capture of each linear's inputs, replaying the outputs
of the stages already quantized instead of recomputing them; every RTN fallback and raised
damping listed under the layer's ``fallbacks`` metric).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from quantcli import dist
from quantcli.algos.driver import COMPUTE_DTYPES, LayerContext, LayerResult, autocast_to, resolve_compute_dtype
from quantcli.algos.replay import register_no_replay
from quantcli.errors import SpecError
from quantcli.models.arch import expand
from quantcli.quant import QuantizedWeight, QuantSpec, compute_qparams, dequantize_affine, quantize_affine, quantize_weight

DAMP_RETRIES = 3  # each retry multiplies the damping by 10
INNER_BLOCK = 32  # columns per rank-1 sub-block inside a lazy-update block (arithmetic order only)
CAPTURE_DTYPES = ("auto", *COMPUTE_DTYPES)


@dataclass(frozen=True)
class GPTQParams:
    """damp:              diagonal damping, as a fraction of mean(diag H).
    block_size:           columns per lazy-update block.
    act_order:            visit columns by decreasing diag(H).
    static_groups:        fit group scales/zeros on the original weight's contiguous groups first.
    true_sequential:      capture each stage's inputs after the earlier stages of the layer are quantized.
    min_expert_tokens:    a MoE expert that saw fewer calibration tokens (rarely routed) is rounded to nearest;
                          dense linears always get GPTQ, however few tokens calibrate them.
    capture_dtype:        dtype of the forwards that capture the linears' inputs (and of the loss-only targets
                          forward): float32, bfloat16, float16, or auto (bfloat16 where the device runs it fast).
                          The Hessians are accumulated in float32; the propagated stream stays float32.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    min_expert_tokens: int = 64
    capture_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise SpecError(f"--damp {self.damp}: use a positive fraction of mean(diag H), e.g. 0.01")
        if self.block_size < 1:
            raise SpecError(f"--block-size {self.block_size}: use a positive number of columns, e.g. 128")
        if self.capture_dtype not in CAPTURE_DTYPES:
            raise SpecError(f"--capture-dtype {self.capture_dtype}: use one of {', '.join(CAPTURE_DTYPES)}")


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
    return _quadratic(W.float() - Q.float(), H)


def _quadratic(D: Tensor, H: Tensor) -> float:
    """``tr(D H Dᵀ)`` for ``D: [rows, in]``."""
    return float(((D @ H) * D).sum())


RTN_ERR_ROWS = 512  # rows sampled by rtn_error_estimate


def rtn_error_estimate(W: Tensor, H: Tensor, spec: QuantSpec, clip: Tensor | None = None, rows: int = RTN_ERR_ROWS) -> float:
    """Estimate of ``tr(D H Dᵀ)``, ``D = W − RTN(W)`` (``W: [out, in]``, ``H: [in, in]``): the
    error of plain rounding that GPTQ's exact ``gptq_err`` is shown against (a displayed metric).

    The trace is a sum of per-row errors ``eᵣ = dᵣ H dᵣᵀ``. Every row's diagonal part
    ``pᵣ = Σⱼ dᵣⱼ² Hⱼⱼ`` is cheap (``out · in``); the full ``eᵣ`` is computed on a fixed subset of
    ``rows`` rows (drawn once from a seeded generator: deterministic) and the total is the ratio
    estimate ``Σ p · (Σₛ e / Σₛ p)``. Exact when ``out <= rows``. The cost is ``rows · in²``
    instead of ``out · in²`` (a LLaMA-2-7B layer: ~0.1 instead of ~1.4 plain forwards over
    8 × 512 tokens). The relative error is about ``cv / √rows`` with ``cv`` the spread of ``e / p``
    over the rows, which does not grow with the rows' scale: within ~1 % at 512 rows on tests.
    """
    D = W.float() - quantize_weight(W.float(), spec, clip).dequantize()
    out = D.shape[0]
    if out <= rows:
        return _quadratic(D, H)
    pick = torch.randperm(out, generator=torch.Generator().manual_seed(0))[:rows].sort().values.to(D.device)
    diag = D.pow(2) @ H.diagonal().float()  # pᵣ, every row
    exact = _quadratic(D[pick], H)
    part = float(diag[pick].sum())
    return float(diag.sum()) * exact / part if part > 0 else exact * out / rows


def damp_and_factor(
    H: Tensor, damp: float, perm: Tensor | None = None, retries: int = DAMP_RETRIES
) -> tuple[Tensor | None, float]:
    """Upper triangular ``R: [in, in]`` with ``Hₚ + λ I = R Rᵀ``, ``Hₚ = H[perm][:, perm]`` (``perm``:
    the visiting order, default the identity), ``λ = damp · mean(diag H)``: ``U = R⁻¹`` is the upper
    Cholesky factor of ``(Hₚ + λ I)⁻¹`` that GPTQ's corrections are read from, and
    :func:`gptq_quantize` uses ``R`` itself, so no inverse is ever formed.

    One Cholesky factorisation of the index-reversed matrix: with ``J`` the reversal,
    ``J Hₚ J = L Lᵀ`` gives ``R = J L J``. ``J Hₚ J`` is gathered from ``H`` in one step and damped
    in place, so at most three ``[in, in]`` matrices exist here at once besides ``H`` (it, ``L``
    and ``R``: the Hessian is the largest thing GPTQ holds, 3.3 GB for a 70B model's down_proj).
    Dead columns (zero diagonal: inputs that were always zero) get 1 on the diagonal, so they are
    rounded to nearest without touching the others. When a factorisation fails the damping is
    multiplied by 10, up to ``retries`` times (a factorisation whose smallest pivot² is below
    ``λ / 2`` fails too: that cannot happen for a positive semi-definite ``H``). Returns
    ``(R, damp used)``, or ``(None, last damp tried)`` when ``H`` cannot be factored (non-finite,
    non-positive diagonal, every retry failed). ``H`` is not modified.
    """
    order = torch.arange(H.shape[0], device=H.device) if perm is None else perm
    backwards = order.flip(0)
    reversed_ = H.index_select(0, backwards).index_select(1, backwards).float()  # J Hₚ J, a new matrix
    diag = reversed_.diagonal()
    diag[diag == 0] = 1.0
    mean = diag.flip(0).mean()  # summed in visiting order
    if not (torch.isfinite(reversed_).all() and mean > 0):
        return None, damp
    undamped = diag.clone()
    rel = damp
    for attempt in range(retries + 1):
        rel = damp * 10**attempt
        torch.add(undamped, rel * mean, out=diag)
        L, info = torch.linalg.cholesky_ex(reversed_)
        # H positive semi-definite ⇒ every pivot² ≥ λ_min(H + λ I) ≥ λ; a smaller one means H is
        # indefinite beyond rounding: damp more
        if info == 0 and L.diagonal().min() ** 2 >= 0.5 * rel * mean and torch.isfinite(L).all():
            del reversed_, diag  # free J Hₚ J before R is made
            return L.flip(0, 1), rel
        del L
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


def _mean_diag(H: Tensor) -> Tensor:
    """``mean(diag H)`` with dead columns counted as 1, as :func:`damp_and_factor` damps."""
    diag = H.diagonal().float()
    return torch.where(diag == 0, torch.ones_like(diag), diag).mean()


@torch.no_grad()
def gptq_quantize(W: Tensor, H: Tensor, spec: QuantSpec, params: GPTQParams, clip: Tensor | None = None) -> GPTQOutput:
    """GPTQ codes for ``W: [out, in]`` that minimise ``tr((W − Q) H (W − Q)ᵀ)``, ``H: [in, in]``.

    ``clip: [out, in // group]`` optional AWQ clip ratios. Returns the quantized weight (codes in
    the original column order; ``g_idx`` only with act order without static groups), its error,
    the damping used, and a fallback reason when ``H`` was unusable and the linear was rounded to
    nearest instead (never raises on a bad Hessian). The rows are independent given ``H``: linears
    that see the same inputs can be quantized as one ``W`` (their rows stacked).
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
    R, damp = damp_and_factor(H, params.damp, perm)
    if R is None:
        return rtn_fallback(W, H, spec, clip, f"Cholesky failed with damping up to {damp:g}")

    # the weight transposed, in visiting order: each column is a contiguous row of WT, so every
    # correction below writes whole contiguous rows, never strided column slices
    WT = W.T[perm].contiguous()  # [in, out]
    codes_t = torch.empty(n, out_features, dtype=torch.uint8, device=W.device)
    if params.static_groups:
        scale, zero = compute_qparams(W, spec.wbits, group, spec.sym, clip)
        group_index = perm // group  # each visited column keeps its original contiguous group
        group_of = group_index.tolist()
        scale_t, zero_t = scale.T.contiguous(), zero.T.contiguous()  # [groups, out]
    else:
        scale = torch.empty(out_features, n_groups, device=W.device)
        zero = torch.empty_like(scale)
        group_of = [i // group for i in range(n)]  # groups form in visiting order

    # With H_d = R Rᵀ and U = R⁻¹, the rounding errors D = W − Q and GPTQ's scaled errors E obey
    # D = E U, i.e. E = D R: column j, once its earlier columns are rounded, is corrected to
    # w̃_j = w_j + Σ_{k<j} d_k R[k, j] / R[j, j] and scaled as e_j = (w̃_j − q_j) · R[j, j]. The
    # corrections therefore come from R scaled column-wise (Rn) and the errors d, no inverse needed.
    diag_r = R.diagonal().tolist()
    Rn = R.div_(R.diagonal().clone())  # Rn[k, j] = R[k, j] / R[j, j], in place (R itself is not needed again)
    squared = torch.zeros(out_features, dtype=torch.float64, device=W.device)  # ‖E‖² per row
    for i1, i2 in _blocks(n, group, params.block_size):
        original = W.index_select(1, perm[i1:i2]).T.contiguous()  # the block's columns before any correction [B, out]
        diffs_t = torch.empty(i2 - i1, out_features, device=W.device)  # d = w − q of the block's columns
        errors_t = torch.empty_like(diffs_t)  # e = (w̃ − q) · R[j, j], for the error metric
        for j1, j2 in _blocks(i2 - i1, group, INNER_BLOCK):  # two-level lazy updates: rank-1 inside a sub-block
            j1, j2 = j1 + i1, j2 + i1
            for i in range(j1, j2):
                if params.static_groups:
                    s, z = scale_t[group_of[i]], zero_t[group_of[i]]
                else:
                    j = group_of[i]
                    if i % group == 0:
                        ratio = None if clip is None else clip[:, j : j + 1]
                        scale[:, j : j + 1], zero[:, j : j + 1] = compute_qparams(WT[i : i + group].T, spec.wbits, group, spec.sym, ratio)
                    s, z = scale[:, j], zero[:, j]
                w = WT[i]
                q = quantize_affine(w, s, z, spec.wbits)
                codes_t[i] = q
                dq = dequantize_affine(q, s, z)
                torch.sub(w, dq, out=errors_t[i - i1]).mul_(diag_r[i])
                d = torch.sub(original[i - i1], dq, out=diffs_t[i - i1])
                if i + 1 < j2:
                    WT[i + 1 : j2].addr_(Rn[i, i + 1 : j2], d)
            if j2 < i2:
                WT[j2:i2].addmm_(Rn[j1:j2, j2:i2].T, diffs_t[j1 - i1 : j2 - i1])
        squared += errors_t.double().pow(2).sum(dim=0)
        WT[i2:].addmm_(Rn[i1:i2, i2:].T, diffs_t)

    inverse = torch.argsort(perm)
    g_idx = torch.tensor(group_of, dtype=torch.int32, device=W.device)[inverse] if permuted_groups else None
    weight = QuantizedWeight(codes_t[inverse].T.contiguous(), scale, zero, group, g_idx)
    # W − Q = E U (E: the scaled errors), and U H_d Uᵀ = I for the damped H_d = H + λ I (+ 1 on dead
    # columns' diagonal), so tr((W−Q) H (W−Q)ᵀ) = ‖E‖² − λ ‖W−Q‖² − ‖(W−Q) on dead columns‖²
    D = (W - weight.dequantize()).double()
    dead = H.diagonal() == 0
    err = squared - damp * float(_mean_diag(H)) * D.pow(2).sum(dim=1) - D[:, dead].pow(2).sum(dim=1)
    return GPTQOutput(weight, float(err.sum()), damp, None)


# --------------------------------------------------------------------------- the layer algorithm


class _Captured(Exception):
    """Every linear of the stage has seen this mini-batch: the rest of the layer need not run."""


@dataclass
class HessianGroup:
    """Linears fed the same input tensor (q/k/v; gate/up) and their one running Hessian ``H``
    over ``count`` tokens. A routed expert sees its own tokens: it is a group of its own."""

    names: list[str]
    H: Tensor | None  # None once handed to its owner rank
    count: int = 0


class _HessianHooks:
    """Forward pre-hooks that fold each distinct input of the named linears into a Hessian once.

    A linear called with the very tensor an earlier one of the same forward received joins that
    one's group (decided on its first call, checked on every later one). With ``first_only`` only
    the first input the layer's linears see is recorded (the input of its first stage).
    """

    def __init__(self, modules: dict[str, nn.Module], device: torch.device, first_only: bool = False):
        self.device, self.first_only = device, first_only
        self.groups: dict[str, HessianGroup] = {}  # leader name → group
        self.leader: dict[str, str | None] = {}  # name → its group's leader (None: not recorded)
        self.latest: dict[str, Tensor] = {}  # leader → the input it folded last
        self.waiting: set[str] = set()
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def fold(_module, args):
            x = args[0]
            if name not in self.leader:
                lead = next((k for k, seen in self.latest.items() if seen is x), None)
                if lead is not None:
                    self.groups[lead].names.append(name)
                elif self.first_only and self.groups:
                    lead = None
                else:
                    lead = name
                    self.groups[name] = HessianGroup([name], make_hessian(x.shape[-1], self.device))
                self.leader[name] = lead
            lead = self.leader[name]
            if lead == name:
                group = self.groups[name]
                group.count = accumulate_hessian(group.H, x, group.count)
                self.latest[name] = x
            elif lead is not None and self.latest.get(lead) is not x:
                raise RuntimeError(f"{name} shares {lead}'s Hessian but received another input")
            self.waiting.discard(name)
            if not self.waiting and not self.first_only:
                raise _Captured

        return fold

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.latest.clear()


@contextmanager
def _forwards_replaced(forwards: dict[nn.Module, object]):
    """Within it, each module's ``forward`` is the given function (the module's hooks still run)."""
    for module, forward in forwards.items():
        module.forward = forward
    try:
        yield
    finally:
        for module in forwards:
            del module.forward


def _zeros_out(linear: nn.Module):
    return lambda x, *_a, **_k: x.new_zeros(*x.shape[:-1], linear.out_features)


class OutputReplay:
    """The outputs of a layer's already-quantized dense linears over every calibration mini-batch,
    recorded by one capture forward and returned by the later ones instead of recomputed.

    Capture ``k`` runs the layer from its input up to stage ``k``'s linears, through every
    earlier stage, whose weights no longer change: a mini-batch's outputs of those stages are the
    same in every later capture. Recording each stage's outputs the first time they are computed
    runs every linear once over the captures instead of once per later stage (Llama: q/k/v and
    o_proj once instead of three and two times). The outputs ``[N, L, out]`` live in the
    context's activation store (host memory, or files with ``--offload-activations``) in the
    dtype they were computed in, so a replay is bit-identical to the recomputation. A linear
    whose output is not one row per input token (a routed expert) is never recorded.
    """

    def __init__(self, ctx: LayerContext):
        self.ctx = ctx
        self.outputs: dict[str, Tensor] = {}  # name → [N, L, out], complete
        self._partial: dict[str, Tensor] = {}  # recording in progress
        self._batches: dict[str, int] = {}  # mini-batches recorded per name

    @contextmanager
    def batch(self, start: int, stop: int, record: list[str]):
        """Within it, the recorded linears return their outputs of mini-batch ``[start, stop)``
        without computing, and the linears ``record`` store theirs."""
        module, device = self.ctx.module, self.ctx.device
        replayed = {module.get_submodule(name): lambda *_a, out=out, **_k: out[start:stop].to(device, copy=True) for name, out in self.outputs.items()}
        handles = [module.get_submodule(name).register_forward_hook(self._recorder(name, start, stop)) for name in record]
        try:
            with _forwards_replaced(replayed):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _recorder(self, name: str, start: int, stop: int):
        def store(_module, _args, y):
            if y.shape[0] != stop - start or self._partial.get(name, y).shape[1:] != y.shape[1:]:
                self._batches[name] = -1  # not one output per input row: never replayed
            elif self._batches.get(name, 0) >= 0:
                if name not in self._partial:
                    self._partial[name] = self.ctx.acts.empty((self.ctx.inputs.shape[0], *y.shape[1:]), y.dtype)
                self._partial[name][start:stop] = y
                self._batches[name] = self._batches.get(name, 0) + 1

        return store

    def commit(self, batches: int) -> None:
        """Make the outputs recorded over all ``batches`` mini-batches replayable; drop the rest."""
        for name, tensor in self._partial.items():
            if self._batches.get(name) == batches:
                self.outputs[name] = tensor
        self._partial.clear()
        self._batches.clear()


@torch.no_grad()
def capture_hessians(
    ctx: LayerContext,
    names: list[str],
    dtype: torch.dtype = torch.float32,
    replay: OutputReplay | None = None,
    record: list[str] = (),
    independent: bool = False,
) -> list[HessianGroup]:
    """Run the layer over ``ctx.inputs`` (computing in ``dtype``) and return the named linears'
    Hessians, one per group of linears fed the same input, in the order of ``names``.

    Each mini-batch stops as soon as all the named linears have seen their inputs. A routed
    expert only sees the tokens sent to it, so its count may be small or zero (a zero Hessian
    when no token reached it). With ``replay``, linears it holds return their recorded outputs
    and those in ``record`` (already quantized, run before the named ones) are recorded.
    ``independent``: no named linear's input depends on another named linear's output (a
    true-sequential stage), so their outputs are not computed (zeros stand in).
    """
    modules = {name: ctx.module.get_submodule(name) for name in names}
    hooks = _HessianHooks(modules, ctx.device)
    # the capture needs only the named linears' inputs: when none of them consumes another's
    # output (a true-sequential stage), their outputs are never used and need not be computed
    unused = {m: _zeros_out(m) for m in modules.values()} if independent else {}
    batches = 0
    try:
        for start in range(0, ctx.inputs.shape[0], ctx.batch):
            stop = min(start + ctx.batch, ctx.inputs.shape[0])
            hooks.waiting.update(names)
            try:
                with autocast_to(ctx.device, dtype), _forwards_replaced(unused), replay.batch(start, stop, list(record)) if replay else nullcontext():
                    ctx.module(ctx.inputs[start:stop].to(ctx.device), **ctx.kwargs)
            except _Captured:
                pass
            batches += 1
    finally:
        hooks.remove()
    if replay:
        replay.commit(batches)
    for name in names:  # never called (an expert no token was routed to)
        if name not in hooks.leader:
            hooks.groups[name] = HessianGroup([name], make_hessian(ctx.module.get_submodule(name).in_features, ctx.device))
    order = {name: i for i, name in enumerate(names)}
    return sorted(hooks.groups.values(), key=lambda g: order[g.names[0]])


def expert_linears(layer, arch) -> list[str]:
    """The layer's MoE expert linears: those its architecture entry names with an expert wildcard ``*``."""
    return [name for stage in arch.sequential for pattern in stage if "*" in pattern for name in expand(layer, pattern)]


@dataclass(frozen=True)
class GPTQ:
    params: GPTQParams = GPTQParams()
    needs_fp_stream: bool = False

    @contextmanager
    def observe(self, layer: nn.Module):
        """Record the Hessian of the layer's first stage (q/k/v: the linears fed the layer's first
        linear input) during the driver's targets forward, which sees exactly the inputs GPTQ would
        capture for it. With a bfloat16 capture dtype that forward runs under autocast too: GPTQ
        uses its targets only for the driver's loss metric."""
        device = next(layer.parameters()).device
        hooks = _HessianHooks({n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}, device, first_only=True)
        seen: dict = {}
        try:
            with autocast_to(device, resolve_compute_dtype(self.params.capture_dtype, device)):
                yield seen
        finally:
            hooks.remove()
        if hooks.groups:
            seen["hessian"] = next(iter(hooks.groups.values()))

    def run_layer(self, ctx: LayerContext) -> LayerResult:
        if ctx.inputs is None:
            raise ValueError("GPTQ needs calibration inputs")
        p = self.params
        dtype = resolve_compute_dtype(p.capture_dtype, ctx.device)
        stages = ctx.linears()
        if not p.true_sequential:
            stages = [[name for stage in stages for name in stage]]
        quantized: dict[str, QuantizedWeight] = {}
        gptq_err = rtn_err = 0.0
        fallbacks: list[str] = []  # one note per linear not quantized as configured
        experts = set(expert_linears(ctx.module, ctx.arch))
        observed: HessianGroup | None = ctx.seen.get("hessian")
        world, owned, solved_here = dist.world(), 0, 0  # under torchrun, Hessian group i of the layer belongs to rank i mod world size
        # on the CPU each capture replays the earlier stages' outputs; on an accelerator recomputing
        # them is cheaper than bringing them back from host memory
        replay = OutputReplay(ctx) if ctx.device.type == "cpu" and len(stages) > 2 else None
        for k, stage in enumerate(stages):
            groups: list[HessianGroup] = []
            if k == 0 and observed is not None and (known := [n for n in stage if n in observed.names]):
                groups.append(HessianGroup(known, observed.H, observed.count))  # from the targets forward
            todo = [n for n in stage if not any(n in g.names for g in groups)]
            if todo:  # earlier stages are already quantized in place; the last capture records nothing
                record = [n for n in stages[k - 1] if n not in experts] if 0 < k < len(stages) - 1 else []
                groups += capture_hessians(ctx, todo, dtype, replay, record, independent=p.true_sequential)
            totals = dist.all_sum(*(g.count for g in groups))
            mine: dict[int, Tensor] = {}
            for i, (group, total) in enumerate(zip(groups, totals)):  # each Hessian summed on its owner rank only
                H = dist.reduce_mean(group.H, group.count, total, (owned + i) % world.size)
                group.H = None
                if H is not None:
                    mine[i] = H
            solved = {i: self._solve_group(ctx, groups[i].names, mine.pop(i), totals[i], experts) for i in sorted(mine)}  # ranks in parallel
            solved_here += len(solved)
            for i, group in enumerate(groups):  # every rank takes the owner's codes
                result = dist.broadcast_object(solved.get(i), (owned + i) % world.size)
                self._apply(ctx, group.names, result, quantized)
                gptq_err += result.err
                rtn_err += result.rtn_err
                fallbacks += result.notes
            owned += len(groups)
            ctx.report(gptq_err=gptq_err, rtn_err=rtn_err)
        metrics: dict = {"gptq_err": gptq_err, "rtn_err": rtn_err}  # gptq_err exact; rtn_err estimated (rtn_error_estimate)
        if world.size > 1:  # how the layer's GPTQ work was spread: Hessian groups solved on each rank
            metrics["groups_by_rank"] = list(dist.all_sum(*(solved_here if r == world.rank else 0 for r in range(world.size))))
        if fallbacks:
            metrics["fallbacks"] = fallbacks
        return LayerResult(quantized=quantized, metrics=metrics)

    def _solve_group(self, ctx: LayerContext, names: list[str], H: Tensor, count: int, experts: set[str]) -> "GroupResult":
        """GPTQ on the stacked rows of the linears ``names`` (one Hessian, one factorisation):
        their codes (on the CPU), the errors and the fallback notes. The layer is not changed."""
        p = self.params
        weights = [ctx.module.get_submodule(name).weight.data for name in names]
        W = torch.cat(weights) if len(weights) > 1 else weights[0]
        clips = [ctx.upstream.get(f"{name}.clip") for name in names]
        clip = None
        if any(c is not None for c in clips):
            n_groups = W.shape[1] // ctx.spec.group_for(W.shape[1])
            clip = torch.cat([torch.ones(w.shape[0], n_groups) if c is None else c.float() for w, c in zip(weights, clips)]).to(W.device)
        notes: list[str] = []
        if all(name in experts for name in names) and count < p.min_expert_tokens:
            res = rtn_fallback(W, H, ctx.spec, clip, f"expert saw {count} calibration tokens (< --min-expert-tokens {p.min_expert_tokens})")
        else:
            res = gptq_quantize(W, H, ctx.spec, p, clip)
        rtn = res.err if res.fallback else rtn_error_estimate(W, H, ctx.spec, clip)
        parts: dict[str, QuantizedWeight] = {}
        start = 0
        for name, w in zip(names, weights):
            rows = slice(start, start + w.shape[0])
            start += w.shape[0]
            qw = res.weight
            part = qw if len(names) == 1 else QuantizedWeight(  # own storage: artifacts refuse shared tensors
                qw.codes[rows].clone(), qw.scale[rows].clone(), qw.zero[rows].clone(), qw.group, None if qw.g_idx is None else qw.g_idx.clone()
            )
            if res.fallback is not None:
                notes.append(f"{name}: rounded to nearest ({res.fallback})")
            elif res.damp != p.damp:
                notes.append(f"{name}: damping raised to {res.damp:g} (Cholesky failed at {p.damp:g})")
            parts[name] = _to_cpu(part)
        return GroupResult(parts, res.err, rtn, notes)

    @staticmethod
    def _apply(ctx: LayerContext, names: list[str], result: "GroupResult", quantized: dict) -> None:
        """Write a group's dequantized codes into the layer (later stages see them) and record them."""
        for name in names:
            linear, part = ctx.module.get_submodule(name), result.parts[name]
            linear.weight.data.copy_(part.dequantize().to(linear.weight.device, linear.weight.dtype))
            quantized[name] = part


class GroupResult(NamedTuple):
    """What GPTQ made of one Hessian group: codes per linear (CPU), errors, fallback notes."""

    parts: dict[str, QuantizedWeight]
    err: float
    rtn_err: float
    notes: list[str]


def _to_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    g_idx = None if qw.g_idx is None else qw.g_idx.cpu()
    return QuantizedWeight(qw.codes.cpu(), qw.scale.cpu(), qw.zero.cpu(), qw.group, g_idx)


register_no_replay("gptq")  # GPTQ's error feedback lives in its codes: nothing to replay in full precision
