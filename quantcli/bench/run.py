"""The core of ``quant bench``: swap real kernels into a loaded model, time it, size it, compare it.

``run_bench(loaded, params, progress)`` returns one JSON-able dict; the CLI only prints it.
"""

from __future__ import annotations

import gc
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from quantcli.artifact import sha256_file
from quantcli.bench.kernels import DENSE_PROBE_TOKENS, swap_in_dense_gemv, swap_in_kernels
from quantcli.bench.kvcache import KV_INT8, int8_kv_cache, measured_kv_bytes_per_token
from quantcli.bench.w8a8 import w8a8_builder
from quantcli.bench.latency import (
    Progress,
    Steps,
    compiled_greedy_step,
    current_rss_bytes,
    drain,
    free_memory_bytes,
    kv_capacity_in_blocks,
    prefill_decode_reps,
    peak_memory_bytes,
    tokens_in_budget,
    weight_bytes,
)
from quantcli.bench.moe import expert_call_stats, group_experts
from quantcli.bench.paths import SDPA_DECODE, choose_decode_attention, fastest_paths, install_phase_attention, native_bf16_cpu, profile_phases
from quantcli.errors import InputError
from quantcli.pack.checkpoint import BASE_CONFIG_SHA256, BASE_MODEL, packed_info

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class BenchParams:
    """What ``quant bench`` measures.

    dtype:    dtype of everything that is not a quantized linear (embeddings, norms, attention,
              lm_head, KV cache) and of fallback linears: fp32/bf16/fp16, or auto (bf16 on CUDA
              and on CPUs with native bf16, else fp32). The int4/int8 kernels take bf16 inside.
    baseline: None, or fp32/bf16/fp16: also time the unquantized base model in that dtype.
    memory_budget: bytes for weights + KV cache in the capacity estimate (None: free memory + weights).
    threads:  CPU threads for torch (None: torch's default, one per core).
    profile_steps: after timing each prompt length, profile one prefill and this many decode steps
              (torch.profiler: linears, attention, dequantization, the rest; 0: no profile).
    fast_paths: choose per phase what runs fastest (see :mod:`quantcli.bench.paths`): dense prefill
              for quantized linears from a measured token count, and with ``dtype="auto"`` the KV
              cache / prefill attention dtype per prompt length. False: kernels always, one dtype.
    compile_decode: also time decode with a compiled step (``torch.compile`` over a static KV cache,
              :func:`quantcli.bench.latency.compiled_greedy_step`) and use the faster of eager and
              compiled per prompt length, both reported. Off by default: compiling costs a minute or
              more per model on a small CPU. Not with the int8 KV cache (eager only).
    kv_bits:  None: as the input's spec says (``kv_bits 8`` → an int8 KV cache, see
              :mod:`quantcli.bench.kvcache`); 8: an int8 KV cache whatever the spec; 16: the cache in ``dtype``.
    """

    prompt_lens: tuple[int, ...] = (100, 1000, 2000, 4000)
    gen: int = 64
    batch: int = 1
    reps: int = 3
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "auto"
    memory_budget: int | None = None
    baseline: str | None = None
    threads: int | None = None
    seed: int = 0
    fast_paths: bool = True
    profile_steps: int = 0
    kv_bits: int | None = None
    compile_decode: bool = False


def parse_bytes(text: str) -> int:
    """``"8GiB"``, ``"500MB"``, ``"2e9"`` → bytes; a bad value is an InputError."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise InputError(f"--memory-budget {text!r}: not a size; write e.g. 8GiB, 500MB or a number of bytes")
    try:
        return int(float(m.group(1)) * _UNITS[unit])
    except ValueError:
        raise InputError(f"--memory-budget {text!r}: not a size; write e.g. 8GiB, 500MB or a number of bytes") from None


def dense_probe_tokens(params: BenchParams) -> tuple[int, ...]:
    """Rows per linear call at which the dense-prefill choice is measured: the small default counts
    (MoE experts get a share of the tokens) and ``batch × L`` for every prompt length ``L`` run, so the
    path each timed prefill takes was measured at its own size, up to the largest."""
    return tuple(sorted(set(DENSE_PROBE_TOKENS) | {params.batch * n for n in params.prompt_lens}))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA and on CPUs with native bf16, else fp32; or fp32/bf16/fp16 as named."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or native_bf16_cpu() else torch.float32
    if name not in DTYPES:
        raise InputError(f"--dtype {name}: use auto, fp32, bf16 or fp16")
    return DTYPES[name]


def describe_input(loaded) -> dict:
    """What a loaded model is, for results files: ``kind`` (an artifact's kind, ``"packed"`` for a
    packed checkpoint, else ``"fp"``), its ``spec``, and for a packed checkpoint its ``format``."""
    spec = loaded.spec.to_dict() if loaded.spec is not None else None
    if loaded.artifact is not None:
        return {"kind": loaded.artifact.kind, "spec": spec}
    packed = packed_info(loaded.base_dir) if loaded.quantized else None
    if packed is not None:
        return {"kind": "packed", "spec": spec, "format": packed["format"]}
    return {"kind": "fp", "spec": spec}


def baseline_dir(loaded) -> Path:
    """The unquantized model directory behind ``loaded``: an artifact's base model, the base model a
    packed checkpoint records, or the model itself. One-line InputError when it is gone or changed."""
    packed = packed_info(loaded.base_dir) if loaded.artifact is None and loaded.quantized else None
    if packed is None:
        return loaded.base_dir
    ref, digest = packed[BASE_MODEL], packed[BASE_CONFIG_SHA256]
    if ref is None:
        raise InputError(
            f"{loaded.base_dir}: this packed checkpoint records no base model (packed by another tool?); "
            "bench the unquantized model on its own instead of --baseline"
        )
    base = Path(ref)
    if not (base / "config.json").is_file():
        raise InputError(f"{loaded.base_dir}: its base model {base} is gone; restore it or bench without --baseline")
    if digest and sha256_file(base / "config.json") != digest:
        raise InputError(f"{loaded.base_dir}: its base model {base} has changed since packing (config hash differs); bench without --baseline")
    return base


def check_context(model: nn.Module, params: BenchParams) -> None:
    """Refuse prompt lengths (plus generated tokens) beyond the model's context window."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    too_long = [n for n in params.prompt_lens if limit and n + params.gen > limit]
    if too_long:
        raise InputError(
            f"--prompt-lens {','.join(map(str, too_long))} plus --gen {params.gen} exceed the model's "
            f"context of {limit} tokens; use shorter prompts"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def kv_capacity(model: nn.Module, make_cache, dtype: str, budget: int, weights: int, device: torch.device, storage: str = "") -> dict:
    """The KV cache's room in ``budget`` after ``weights``: bytes per token measured from the tensors a
    cache (``make_cache()``, or the model's default) holds after a short prefill, tokens and blocks."""
    per_token = measured_kv_bytes_per_token(model, make_cache, device)
    capacity = tokens_in_budget(budget - weights, per_token)
    return {
        "dtype": dtype,
        **({"storage": storage} if storage else {}),
        "bytes_per_token": per_token,
        "bytes_per_token_source": "allocated cache tensors after a 32-token prefill",
        "memory_budget_bytes": budget,
        "capacity_tokens": capacity,
        **kv_capacity_in_blocks(capacity),
    }


def bench_model(*args, **kwargs) -> dict:
    """:func:`bench_model_steps` run to its end (one model on its own)."""
    return drain(bench_model_steps(*args, **kwargs))


def bench_model_steps(
    model: nn.Module, params: BenchParams, dtype: torch.dtype, budget: int, progress: Progress | None, label: str,
    configure=None, int8_kv: bool = False, reset_compiler: bool = True,
) -> Steps:
    """Latency rows, weight bytes, peak memory and KV-cache room of a model already on its device.

    ``budget`` is the memory for weights + KV cache; the KV cache gets what the weights leave, in
    ``dtype`` (and, with ``int8_kv``, the timed int8 cache's room as ``kv_cache`` beside the
    ``dtype`` cache's as ``kv_cache_fp``). ``configure(L)`` (see :func:`prefill_decode_reps`)
    sets per-length paths. A generator yielding after every timed repetition (see
    :func:`quantcli.bench.latency.interleave`); ``reset_compiler=False`` keeps the compiled graphs of
    models timed alongside.
    """
    device = torch.device(params.device)
    make_cache = (lambda: int8_kv_cache(model.config)) if int8_kv else None
    profile, step = None, None
    if params.profile_steps:
        profile = lambda length, step: profile_phases(model, length, params.profile_steps, device, params.seed, params.batch, step)  # noqa: E731
    dense_gemv = None
    if params.fast_paths and device.type == "cpu":  # every model alike: its dense bf16 linears
        dense_gemv = swap_in_dense_gemv(model, tuple(sorted({1, params.batch})))
    if params.compile_decode and not int8_kv:
        if reset_compiler:
            torch.compiler.reset()  # each model compiles afresh: no stale graphs, no recompile limit shared
        step = compiled_greedy_step(model)
    why_not = install_phase_attention(model)  # every model alike: decode reads its KV cache in place
    kernel = choose_decode_attention(model, params, dtype) if params.fast_paths and not why_not else None
    rows = yield from prefill_decode_reps(
        model, list(params.prompt_lens), params.gen, params.batch, params.reps, params.warmup, device,
        seed=params.seed, progress=(lambda msg: progress(f"{label}: {msg}")) if progress else None,
        configure=configure, profile=profile, make_cache=make_cache, compiled_step=step,
    )
    if configure is not None:
        configure(None)  # back to the serving dtype before sizing weights and KV cache
    weights = weight_bytes(model)
    fp = kv_capacity(model, None, _dtype_name(dtype), budget, weights, device)
    out = {
        "dtype": _dtype_name(dtype),
        "weight_bytes": weights,
        "peak_mem_bytes": peak_memory_bytes(device),
        "rss_bytes": current_rss_bytes(),
        "kv_cache": fp,
        **({"dense_gemv": dense_gemv} if dense_gemv is not None else {}),
        "decode_attention": {"packed": why_not or "query heads packed per KV head (no repeat_kv copy)",
                             **(kernel or {"kernel": SDPA_DECODE})},
        "results": rows,
    }
    if int8_kv:
        out["kv_cache"], out["kv_cache_fp"] = kv_capacity(model, make_cache, "int8", budget, weights, device, KV_INT8), fp
    return out


def kv_cache_plan(loaded, params: BenchParams) -> tuple[bool, list[str]]:
    """Whether the timed path stores the KV cache in int8, and notes for the report."""
    spec_bits = loaded.spec.kv_bits if loaded.spec is not None else 16
    bits = spec_bits if params.kv_bits is None else params.kv_bits
    if bits == 8:
        source = "--kv-bits 8" if params.kv_bits is not None else "the spec's --kv-bits 8"
        return True, [f"KV cache stored in int8 ({source}): {KV_INT8}"]
    if bits < 16:
        return False, [f"KV cache kept in {params.dtype}: --kv-bits {bits} is fake-quantized in evaluation only (bench stores 8-bit KV)"]
    if spec_bits < 16:
        return False, [f"KV cache kept in {params.dtype} (--kv-bits 16): the spec's --kv-bits {spec_bits} is not applied here"]
    return False, []


def paired_speedups(base_reps: list[float] | None, quant_reps: list[float] | None) -> list[float] | None:
    """Baseline / quantized time of each repetition with the same index: when the models were timed
    in turn (:func:`quantcli.bench.latency.interleave`), rep ``i`` of each ran back to back, under
    the same load, so the spread of these ratios is the run's own noise. None when either side has
    no per-rep times or their counts differ."""
    if not base_reps or not quant_reps or len(base_reps) != len(quant_reps):
        return None
    return [round(b / q, 4) for b, q in zip(base_reps, quant_reps)]


def _ratios(quant: dict, base: dict) -> dict:
    """Baseline / quantized time ratios (> 1 means the quantized model is faster): of the medians,
    and per repetition (``*_speedup_reps``, :func:`paired_speedups`)."""
    per_len = []
    for q, b in zip(quant["results"], base["results"]):
        row = {"prompt_len": q["prompt_len"], "prefill_speedup": b["prefill_ms"] / q["prefill_ms"]}
        paired = {"prefill_speedup_reps": paired_speedups(b.get("prefill_ms_reps"), q.get("prefill_ms_reps"))}
        if "decode_ms" in q and "decode_ms" in b:
            row["decode_speedup"] = b["decode_ms"] / q["decode_ms"]
            paired["decode_speedup_reps"] = paired_speedups(b.get("decode_ms_reps"), q.get("decode_ms_reps"))
        row.update({k: v for k, v in paired.items() if v is not None})
        per_len.append(row)
    return {
        "weight_bytes_ratio": quant["weight_bytes"] / base["weight_bytes"],
        "kv_capacity_ratio": quant["kv_cache"]["capacity_tokens"] / max(1, base["kv_cache"]["capacity_tokens"]),
        "per_prompt_len": per_len,
    }


def run_bench(loaded, params: BenchParams, progress: Progress | None = None) -> dict:
    """:func:`run_bench_steps` run to its end."""
    return drain(run_bench_steps(loaded, params, progress))


def run_bench_steps(loaded, params: BenchParams, progress: Progress | None = None, reset_compiler: bool = True) -> Steps:
    """Bench ``loaded`` (a :class:`quantcli.loading.Loaded`, model on CPU) on ``params.device``.

    Quantized linears are swapped for the best real kernel (see :mod:`quantcli.bench.kernels`);
    the rest of the model runs in ``params.dtype``. With ``params.baseline`` the unquantized base
    model is then loaded and timed in the same process. The KV-cache capacity of both is what the
    same memory budget (``--memory-budget``, else free memory + this model's weights) leaves after
    the weights. Peak memory on CPU is the process's
    lifetime peak RSS, so the baseline's figure includes the quantized run.

    A generator: its first yield, once the model is set up and before any timing, gives the memory
    budget (bytes) of the capacity estimate; later ones come after every timed repetition.
    """
    device = torch.device(params.device)
    dtype = resolve_dtype(params.dtype, device)
    base_dir = baseline_dir(loaded) if params.baseline else None  # refused before any timing
    if params.threads is not None:
        torch.set_num_threads(params.threads)
    model = loaded.model
    check_context(model, params)
    notes = []
    model.to(dtype)  # before the swap: .to(dtype) would cast the kernels' bf16 scale buffers
    report = None
    if loaded.quantized:
        if progress:
            progress(f"swapping in kernels for {len(loaded.quantized)} quantized linears")
        builder = w8a8_builder(loaded.spec) if loaded.spec is not None and not loaded.spec.weight_only else None
        report = swap_in_kernels(
            model, loaded.quantized, device, dense_prefill=params.fast_paths, builder=builder,
            probe_tokens=dense_probe_tokens(params), decode_gemv=params.fast_paths,
            gemv_rows=tuple(sorted({1, params.batch})),
        )
        if loaded.spec is not None and loaded.spec.act_static:
            notes.append("static activation scales are not used here: the timed path quantizes activations per token")
        gc.collect()
    if loaded.spec is not None and loaded.spec.kv_bits < 16:
        from quantcli.models.act_hooks import KVQuantHandle

        KVQuantHandle(list(model.modules())).remove()  # no fake-quant KV in the timed path: the cache itself quantizes
    int8_kv, kv_notes = kv_cache_plan(loaded, params)
    notes += kv_notes
    moe = group_experts(model)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    configure, paths = None, None
    if params.fast_paths:
        paths = fastest_paths(model, report, params, dtype, progress)
        configure = paths.configure
    if params.memory_budget is not None:
        budget, budget_source = params.memory_budget, "--memory-budget"
    else:  # what this model could use on its own: its weights plus the device's free memory
        budget, budget_source = free_memory_bytes(device) + weight_bytes(model), f"free {device.type} memory + weights"
    yield budget
    result = {
        "input": loaded.artifact.path.as_posix() if loaded.artifact is not None else str(loaded.base_dir),
        **describe_input(loaded),
        "device": str(device),
        "params": asdict(params),
        "kernels": report.to_dict() if report is not None else None,
        "memory_budget": {"bytes": budget, "source": budget_source},
        **(yield from bench_model_steps(model, params, dtype, budget, progress, "quantized" if report else "model", configure,
                                        int8_kv, reset_compiler)),
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "notes": notes,
    }
    result["paths"] = paths.to_dict() if paths is not None else None  # filled in while timing
    if moe is not None:
        result["moe"] = {**moe, **expert_call_stats(model)}
    if params.baseline:
        base_dtype = DTYPES[params.baseline]
        from quantcli.models.load import load_base

        if progress:
            progress(f"loading the unquantized base model ({params.baseline})")
        base, _ = load_base(base_dir)
        base.to(device=device, dtype=base_dtype)
        baseline = yield from bench_model_steps(base, params, base_dtype, budget, progress, f"baseline {params.baseline}")
        del base
        gc.collect()
        result["baseline"] = baseline
        result["ratios"] = _ratios(result, baseline)
    return result
