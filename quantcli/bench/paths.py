"""The fastest path per phase for ``quant bench``, chosen by measuring on the device, and reported.

* Quantized linears: the low-bit kernel for decode; from a per-shape measured token count on,
  dequantize-per-call + dense matmul for prefill (:func:`quantcli.bench.kernels.choose_dense_threshold`).
* Attention and the KV cache, per prompt length ``L``: the residual stream and KV cache in the dtype
  whose decode attention is fastest at cache length ``L + gen/2``; prefill attention in the dtype
  fastest for ``L`` queries given that stream (q, k, v cast for the call). Measured with
  :func:`time_attention` on the model's own head geometry; the candidates are bf16 and fp32 where
  the device computes bf16 natively (CUDA, AVX512-BF16/AMX CPUs), else the one ``--dtype`` named.
* Decode attention over a bf16 cache on the CPU: ``quantcli::decode_attention``
  (:mod:`quantcli.bench.decode_attention`) or SDPA, whichever measured faster for the model's head
  geometry over the prompt lengths run (:func:`choose_decode_attention`, every model alike).
* :func:`profile_phases` says where the time of one prefill + decode goes (attention, matmuls,
  dequantization, the rest), so a missed target can be explained.

Every choice and the timings behind it land in the bench JSON (``paths``, ``kernels``) and in the
human table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from quantcli.bench import decode_attention as native_attention
from quantcli.bench.kernels import BF16_GEMV, DEQUANT_LABEL, INT4_AMX, INT4_GEMV, INT8_LABEL, KERNEL_MODULES, KernelReport
from quantcli.bench.latency import (
    _attention_geometry,
    _forward_kwargs,
    cache_kwarg,
    fastest_ms,
    prefill_static,
    synchronize,
)

PHASE_ATTENTION = "quantcli_phase_sdpa"  # transformers attention implementation registered below
PREFILL_DTYPE_ATTR = "quantcli_prefill_dtype"  # set on attention modules: dtype of prefill attention
NATIVE_DECODE_ATTR = "quantcli_native_decode"  # set on attention modules: decode through quantcli::decode_attention
DECODE_CHOICE_ATTR = "quantcli_decode_attention"  # set on the model: what choose_decode_attention measured and chose


def packed_decode_sdpa(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None] | None:
    """One query token's attention with the query heads that share a KV head packed as that head's
    rows: ``query [B, H, 1, D]`` → ``[B, KV, H/KV, D]`` against ``key/value [B, KV, Lk, D]``, so the
    cache is read in place instead of copied ``H/KV`` times (transformers' ``repeat_kv``, which its
    SDPA path takes under ``torch.compile``; its eager decode packs the same way). The same
    arithmetic per head (softmax of scaled q·k over the masked keys, times v). Returns
    ``(out [B, 1, H, D], None)``, or None where packing does not apply (one query head per KV
    head without the native kernel, more than one query token, a per-head mask, a position bias or
    softcap). Where the module was chosen for it (:func:`choose_decode_attention`) and the inputs
    suit it, :func:`quantcli.bench.decode_attention.decode_attention` computes it instead of SDPA."""
    groups = getattr(module, "num_key_value_groups", 1)
    native = getattr(module, NATIVE_DECODE_ATTR, False)
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if query.shape[2] != 1 or (groups <= 1 and not native) or per_head_mask or kwargs.get("position_bias") is not None or kwargs.get("softcap"):
        return None
    batch, heads, _, dim = query.shape
    packed, scale = query.reshape(batch, heads // groups, groups, dim), kwargs.get("scaling")
    if native and not native_attention.unsupported(packed, key, attention_mask):
        out = native_attention.decode_attention(packed, key, value, attention_mask, dim**-0.5 if scale is None else scale)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scale)
    return out.reshape(out.shape[0], heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _phase_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA in the cache dtype for decode (query heads packed per KV head, see
    :func:`packed_decode_sdpa`), in ``module.quantcli_prefill_dtype`` for prefill.

    ``query [B, H, Lq, D]``, ``key/value [B, KV, Lk, D]``; prefill (``Lq > 1``) casts q, k, v (and a
    float mask) to the prefill dtype for the call and the output back, so the KV cache and the
    residual stream stay in the model's dtype.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = packed_decode_sdpa(module, query, key, value, attention_mask, **kwargs)
    if packed is not None:
        return packed
    dtype = getattr(module, PREFILL_DTYPE_ATTR, None)
    if query.shape[2] == 1 or dtype is None or dtype == query.dtype:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(dtype)
    out, weights = sdpa_attention_forward(
        module, query.to(dtype), key.to(dtype), value.to(dtype), attention_mask, **kwargs
    )
    return out.to(query.dtype), weights


def install_phase_attention(model: nn.Module) -> str:
    """Route the model's attention through :func:`_phase_sdpa`; "" on success, else why not."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as err:
        return f"transformers has no attention registry ({err})"
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", PHASE_ATTENTION):
        return f"model uses {model.config._attn_implementation!r} attention, not sdpa"
    AttentionInterface.register(PHASE_ATTENTION, _phase_sdpa)
    AttentionMaskInterface.register(PHASE_ATTENTION, sdpa_mask)
    model.config._attn_implementation = PHASE_ATTENTION
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", None) == "sdpa":
            cfg._attn_implementation = PHASE_ATTENTION
    return ""


def set_compute_dtype(model: nn.Module, dtype: torch.dtype, keep: tuple[type, ...] = ()) -> None:
    """Cast the floating parameters and buffers of every module but those of type ``keep`` (the
    low-bit kernels, whose bf16 scales must stay bf16) to ``dtype``, in place; tied weights stay
    tied. Going fp32 → bf16 → fp32 keeps bf16 precision: fine for timing, not for evaluation."""
    for module in model.modules():
        if isinstance(module, keep):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                module._buffers[name] = b.to(dtype)


def set_prefill_attention_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Make :func:`_phase_sdpa` run prefill attention in ``dtype`` (None: the stream's dtype)."""
    for module in attention_modules(model):
        setattr(module, PREFILL_DTYPE_ATTR, dtype)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules (those :func:`_phase_sdpa` is called with)."""
    return [m for m in model.modules() if hasattr(m, "num_key_value_groups") or type(m).__name__.endswith("Attention")]


def time_attention(
    config, length: int, batch: int, dtype: torch.dtype, stream: torch.dtype, phase: str, device: torch.device, reps: int = 3,
    native: bool = False,
) -> float:
    """Milliseconds of one forward's attention over all layers, fastest of ``reps`` (× layers).

    ``decode``: append one token to a ``[batch, KV, length, D]`` cache in ``dtype`` and attend
    one query per head, the heads packed per KV head as :func:`packed_decode_sdpa` runs them (the
    work a decode step does per layer), through SDPA or with ``native`` through
    :func:`quantcli.bench.decode_attention.decode_attention`. ``prefill``: causal SDPA of
    ``length`` queries, inputs made in ``stream`` and cast to ``dtype`` inside the timed call.
    """
    layers, heads, kv_heads, head_dim = _attention_geometry(config)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dt):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    if phase == "decode":
        q = rand(batch, kv_heads, heads // kv_heads, head_dim, dt=dtype)
        k, v = rand(batch, kv_heads, length, head_dim, dt=dtype), rand(batch, kv_heads, length, head_dim, dt=dtype)
        new = rand(batch, kv_heads, 1, head_dim, dt=dtype)
        attend = native_attention.decode_attention if native else (lambda q, k, v, mask, scale: sdpa(q, k, v, scale=scale))

        def step():
            attend(q, torch.cat([k, new], dim=-2), torch.cat([v, new], dim=-2), None, head_dim**-0.5)
            synchronize(device)
    else:
        gqa = {"enable_gqa": True} if heads != kv_heads else {}
        q, k, v = rand(batch, heads, length, head_dim, dt=stream), rand(batch, kv_heads, length, head_dim, dt=stream), rand(batch, kv_heads, length, head_dim, dt=stream)

        def step():
            sdpa(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True, **gqa).to(stream)
            synchronize(device)

    with torch.inference_mode():
        return fastest_ms(step, reps) * layers


def time_dense_linears(model: nn.Module, dtype: torch.dtype, rows: int, device: torch.device, reps: int = 3) -> float:
    """Milliseconds of one call of every dense linear ``model`` keeps (an unquantized ``lm_head``;
    not the low-bit kernels, whose compute dtype is fixed) at ``rows`` rows with the weights in
    ``dtype``: the work of one decode step that follows the stream dtype. Timed once per weight
    shape on a random weight (ATen, or :data:`BF16_GEMV` for bf16 on the CPU where faster)."""
    from quantcli.bench.kernels import DenseGemvLinear, choose_dense_gemv

    shapes: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if type(m) in (nn.Linear, DenseGemvLinear):
            shapes[(m.out_features, m.in_features)] = shapes.get((m.out_features, m.in_features), 0) + 1
    gen = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.inference_mode():
        for (out_features, in_features), count in shapes.items():
            linear = nn.Linear(in_features, out_features, bias=False, device="meta")
            linear.weight = nn.Parameter(torch.randn(out_features, in_features, generator=gen).to(device=device, dtype=dtype), requires_grad=False)
            timings = choose_dense_gemv(DenseGemvLinear(linear), (rows,), reps)[2] if dtype == torch.bfloat16 and device.type == "cpu" else {}
            if timings:  # ATen's and the GEMV's, timed once each: the faster
                ms = min(ms for path in timings.values() for ms in path.values())
            else:
                x = torch.randn(rows, in_features, generator=gen).to(device=device, dtype=dtype)
                ms = fastest_ms(lambda: (linear(x), synchronize(device)), reps)
            total += ms * count
    return total


def mean_cache_len(length: int, gen: int) -> int:
    """The KV cache's mean length while ``gen`` tokens are decoded after a prompt of ``length``."""
    return length + max(gen, 1) // 2


def plan_attention(
    config, prompt_lens: list[int], gen: int, batch: int, candidates: tuple[torch.dtype, ...], device: torch.device,
    dense_decode_ms: dict[torch.dtype, float] | None = None, native_decode: bool = False,
) -> dict[int, dict]:
    """Per prompt length: the KV-cache (and residual-stream) dtype that decodes fastest at the
    cache's mean length ``L + gen/2``, and the dtype that prefill attention is fastest in given
    that stream dtype, each from :func:`time_attention` over ``candidates``. ``dense_decode_ms``
    (:func:`time_dense_linears` per candidate) is added to each decode time: the dense linears a
    model keeps follow the stream dtype, and an fp32 ``lm_head`` reads twice the bytes. With
    ``native_decode`` (:func:`choose_decode_attention` chose it) bf16 decode is timed through
    ``quantcli::decode_attention``, as the model will run it.

    Returns ``{L: {"kv_cache": dtype, "prefill_attention": dtype, "decode_attention_ms": {...},
    "prefill_attention_ms": {...}}}`` (dtype names in the ms dicts; with ``dense_decode_ms`` also
    ``"decode_dense_linears_ms"``).
    """
    dense = dense_decode_ms or dict.fromkeys(candidates, 0.0)
    plans = {}
    for length in prompt_lens:
        cache_len = mean_cache_len(length, gen)
        decode_ms = {d: time_attention(config, cache_len, batch, d, d, "decode", device, native=native_decode and d == torch.bfloat16)
                     for d in candidates}
        cache = min(candidates, key=lambda d: decode_ms[d] + dense[d])
        prefill_ms = {d: time_attention(config, length, batch, d, cache, "prefill", device) for d in candidates}
        plans[length] = {
            "kv_cache": cache,
            "prefill_attention": min(candidates, key=prefill_ms.__getitem__),
            "decode_attention_ms": {_name(d): round(t, 3) for d, t in decode_ms.items()},
            "prefill_attention_ms": {_name(d): round(t, 3) for d, t in prefill_ms.items()},
            **({"decode_dense_linears_ms": {_name(d): round(t, 3) for d, t in dense.items()}} if dense_decode_ms else {}),
        }
    return plans


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class PhasePaths:
    """What runs each phase at each prompt length; ``configure(L)`` applies it to the model."""

    model: nn.Module
    report: KernelReport | None
    batch: int
    plans: dict[int, dict]
    default: torch.dtype  # the 16-bit (or --dtype) serving dtype: restored after timing, used for capacity
    attention_note: str = ""  # why prefill attention cannot differ from the stream dtype ("" if it can)
    candidates: tuple[str, ...] = ()
    applied: dict[int, dict] = field(default_factory=dict)

    def configure(self, length: int | None) -> dict | None:
        """Cast the stream / KV cache and set the prefill attention dtype for ``length``; the choices.
        ``None`` restores the default dtype (after timing, before weights and capacity are sized)."""
        if length is None:
            set_compute_dtype(self.model, self.default, keep=KERNEL_MODULES)
            set_prefill_attention_dtype(self.model, None)
            return None
        plan = self.plans[length]
        set_compute_dtype(self.model, plan["kv_cache"], keep=KERNEL_MODULES)
        prefill_attention = plan["prefill_attention"] if not self.attention_note else plan["kv_cache"]
        set_prefill_attention_dtype(self.model, None if self.attention_note else prefill_attention)
        tokens = self.batch * length
        chosen = {
            "prefill": {
                "tokens": tokens,
                "attention": _name(prefill_attention),
                "linears": self.report.path_counts(tokens) if self.report else {"dense (unquantized)": None},
            },
            "decode": {
                "tokens": self.batch,
                "attention_and_kv_cache": _name(plan["kv_cache"]),
                "linears": self.report.path_counts(self.batch) if self.report else {"dense (unquantized)": None},
            },
            "measured_ms": {"decode_attention": plan["decode_attention_ms"], "prefill_attention": plan["prefill_attention_ms"],
                            **({"decode_dense_linears": plan["decode_dense_linears_ms"]} if "decode_dense_linears_ms" in plan else {})},
        }
        self.applied[length] = chosen
        return chosen

    def to_dict(self) -> dict:
        return {
            "candidates": list(self.candidates),
            "attention_note": self.attention_note,
            "kv_cache_dtype_for_capacity": _name(self.default),
            "capacity_note": "capacity is sized with the KV cache in the default dtype; where decode chose a wider "
                             "KV dtype for speed, that prompt length holds proportionally fewer tokens",
            "per_prompt_len": {str(length): self.applied.get(length) for length in self.plans},
        }


NATIVE_DECODE = native_attention.OP
SDPA_DECODE = "sdpa"


def choose_decode_attention(model: nn.Module, params, dtype: torch.dtype) -> dict:
    """Run decode attention over a ``dtype`` KV cache through ``quantcli::decode_attention`` where it is
    faster than SDPA for ``model``: one decode step's attention over all layers, the model's head
    geometry, timed both ways (:func:`time_attention`) at the mean cache length of every prompt length
    in ``params`` and chosen by the total. Sets the choice on the model's attention modules, once per
    model (a second call returns the first one's result).

    Returns ``{"kernel": NATIVE_DECODE or SDPA_DECODE, "measured_ms": {cache length: {kernel: ms}}}``,
    or with SDPA and ``"native_unavailable": why`` where the kernel cannot run (not bf16, not a CPU, a
    head dim it lacks, no AVX-512 BF16).
    """
    chosen = getattr(model, DECODE_CHOICE_ATTR, None)
    if chosen is not None:
        return chosen
    device = torch.device(params.device)
    _, heads, kv_heads, head_dim = _attention_geometry(model.config)
    probe = torch.empty(params.batch, kv_heads, heads // kv_heads, head_dim, dtype=dtype, device=device)
    why = native_attention.unsupported(probe, probe, None) or native_attention.status()
    if why:
        chosen = {"kernel": SDPA_DECODE, "native_unavailable": why}
    else:
        measured = {
            length: {kernel: round(time_attention(model.config, length, params.batch, dtype, dtype, "decode", device,
                                                  native=kernel == NATIVE_DECODE), 3)
                     for kernel in (SDPA_DECODE, NATIVE_DECODE)}
            for length in sorted({mean_cache_len(n, params.gen) for n in params.prompt_lens})
        }
        native = sum(ms[NATIVE_DECODE] for ms in measured.values()) < sum(ms[SDPA_DECODE] for ms in measured.values())
        chosen = {"kernel": NATIVE_DECODE if native else SDPA_DECODE, "measured_ms": measured}
        for module in attention_modules(model):
            setattr(module, NATIVE_DECODE_ATTR, native)
    setattr(model, DECODE_CHOICE_ATTR, chosen)
    return chosen


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 GEMMs beat fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def attention_candidates(dtype_name: str, dtype: torch.dtype, device: torch.device, native_bf16: bool) -> tuple[torch.dtype, ...]:
    """Dtypes to try for attention / KV cache: bf16 and fp32 under ``--dtype auto`` where bf16 is
    native (CUDA or AVX512-BF16/AMX), else only ``dtype``."""
    if dtype_name == "auto" and (device.type == "cuda" or native_bf16):
        return (torch.bfloat16, torch.float32)
    return (dtype,)


def fastest_paths(model: nn.Module, report: KernelReport | None, params, dtype: torch.dtype, progress=None) -> PhasePaths:
    """Measure and return the per-phase plan for ``params.prompt_lens`` (see the module docstring)."""
    device = torch.device(params.device)
    candidates = attention_candidates(params.dtype, dtype, device, native_bf16_cpu())
    if progress:
        progress(f"timing attention in {', '.join(map(_name, candidates))} per prompt length")
    native = torch.bfloat16 in candidates and choose_decode_attention(model, params, torch.bfloat16)["kernel"] == NATIVE_DECODE
    dense = {d: time_dense_linears(model, d, params.batch, device) for d in candidates} if len(candidates) > 1 else None
    plans = plan_attention(model.config, list(params.prompt_lens), params.gen, params.batch, candidates, device, dense, native)
    note = install_phase_attention(model)
    return PhasePaths(model, report, params.batch, plans, dtype, note, tuple(map(_name, candidates)))


# --------------------------------------------------------------------------------------------
# Where the time goes
# --------------------------------------------------------------------------------------------

ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "aten::cat", "aten::softmax", "aten::_softmax", native_attention.OP)
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", INT4_GEMV, BF16_GEMV, INT4_AMX)  # and ATen's low-bit kernels (…pack_mm…)


def profile_phases(
    model: nn.Module, length: int, steps: int, device: torch.device, seed: int = 0, batch: int = 1,
    decode_step: Callable | None = None,
) -> dict:
    """Milliseconds of one prefill of ``length`` tokens and of ``steps`` decode steps, split by
    torch.profiler self time into attention (SDPA, KV-cache append, softmax), matmuls (low-bit
    kernels, dense and lm_head), dequantization (the dense-prefill unpacking) and everything else.
    With ``decode_step`` (a compiled :func:`~quantcli.bench.latency.greedy_step`) the decode steps
    run through it over a static cache, as timed; the profiler still sees each low-bit kernel and
    matmul the compiled graph calls, and the fused loops it generated count as "other".

    Returns ``{"prefill": {...}, "decode_per_step": {...}}``, each with ``wall_ms`` and the shares.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)
    extra, cache_name = _forward_kwargs(model), cache_kwarg(model)
    out = {}
    with torch.inference_mode():
        for phase in ("prefill", "decode_per_step"):
            if phase == "prefill":
                with profile(activities=activities) as prof:
                    t0 = time.perf_counter()
                    res = model(input_ids=ids, use_cache=True, **extra)
                    synchronize(device)
                    wall = time.perf_counter() - t0
                cache, token = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
                n = 1
            elif decode_step is not None:
                token, static = prefill_static(model, ids, length + steps + 1)
                token = decode_step(token, torch.tensor([length], device=device), static)  # compiled before: untimed
                with profile(activities=activities) as prof:
                    t0 = time.perf_counter()
                    for i in range(steps):
                        token = decode_step(token, torch.tensor([length + 1 + i], device=device), static)
                    synchronize(device)
                    wall = time.perf_counter() - t0
                n = steps
            else:
                with profile(activities=activities) as prof:
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        res = model(input_ids=token, use_cache=True, **{cache_name: cache}, **extra)
                        cache, token = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
                    synchronize(device)
                    wall = time.perf_counter() - t0
                n = steps
            out[phase] = _split(prof.key_averages(), wall * 1e3 / n, n)
    return out


def _split(averages, wall_ms: float, n: int) -> dict:
    """Bucket self CPU time (ms per call of the phase) by op name. A W8A8 linear's whole call
    (activation quantization, int8 GEMM, epilogue: the :data:`INT8_LABEL` range) counts as matmul."""
    buckets = {"attention_ms": 0.0, "matmul_ms": 0.0, "dequantize_ms": 0.0}
    labelled = {DEQUANT_LABEL: 0.0, INT8_LABEL: 0.0}  # inclusive time of our labelled ranges
    for ev in averages:
        if ev.key in labelled:
            labelled[ev.key] += ev.cpu_time_total / 1e3 / n
            continue
        self_ms = ev.self_cpu_time_total / 1e3 / n
        if any(op in ev.key for op in ATTENTION_OPS):
            buckets["attention_ms"] += self_ms
        elif ev.key in MATMUL_OPS or "pack_mm" in ev.key:
            buckets["matmul_ms"] += self_ms
    buckets["dequantize_ms"] = labelled[DEQUANT_LABEL]
    buckets["matmul_ms"] += labelled[INT8_LABEL]
    # profiler self times are summed over threads of one op, so shares are of the ops' total
    ops_total = sum(ev.self_cpu_time_total for ev in averages if ev.key not in labelled) / 1e3 / n
    buckets["other_ms"] = max(0.0, ops_total - sum(buckets.values()))
    shares = {k.replace("_ms", "_share"): (v / ops_total if ops_total else 0.0) for k, v in buckets.items()}
    return {"wall_ms": wall_ms, **{k: round(v, 3) for k, v in buckets.items()}, **{k: round(v, 3) for k, v in shares.items()}}
