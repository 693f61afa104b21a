"""quant bench: prefill / decode latency, memory and KV-cache room, through real low-bit kernels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from quantcli.algos.driver import resolve_device
from quantcli.bench.kernels import DENSE, DEQUANT, INT4_CPU, INT4_CUDA, INT8
from quantcli.bench.plot import plot_latency, pyplot
from quantcli.bench.run import BenchParams, parse_bytes, run_bench
from quantcli.cli import _options as opt
from quantcli.cli._console import emit, err, status
from quantcli.errors import InputError
from quantcli.loading import load_input

EPILOG = """Examples:

  quant bench rtn4/

  quant bench rtn4/ --prompt-lens 100,1000 --gen 32 --baseline fp32

  quant rtn --w4 --group 128 -o rtn4/ | quant bench --json > bench.json

  quant bench rtn4/ --device cuda --memory-budget 20GiB --baseline bf16

  quant bench rtn4/ --baseline bf16 --plot latency.png

  quant bench rtn4/ --baseline fp32 --compile-decode   (eager and compiled decode, the faster one used)

  quant bench w8a8kv8/ --baseline bf16   (the artifact's --kv-bits 8: an int8 KV cache in the timed path)

  quant bench rtn4/ --kv-bits 8   (an int8 KV cache for any model; its capacity beside the fp cache's)
"""


def _lens(text: str) -> tuple[int, ...]:
    try:
        lens = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        lens = ()
    if not lens or min(lens) < 1:
        raise InputError(f"--prompt-lens {text!r}: give positive token counts separated by commas, e.g. 100,1000")
    return lens


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _latency_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    runtimes = any("decode_path" in r for r in rows)
    for col in ("prompt", "TTFT ms (min–max)", "prefill tok/s", "decode ms/tok (min–max)", "decode tok/s") + (("decode runs",) if runtimes else ()):
        table.add_column(col, justify="right")
    for r in rows:
        decode = "–" if "decode_ms" not in r else f"{r['decode_ms']:.2f} ({r['decode_ms_min']:.2f}–{r['decode_ms_max']:.2f})"
        table.add_row(
            str(r["prompt_len"]),
            f"{r['prefill_ms']:.1f} ({r['prefill_ms_min']:.0f}–{r['prefill_ms_max']:.0f})",
            f"{r['prefill_tok_s']:,.0f}",
            decode,
            f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "–",
            *((_decode_runtimes(r),) if runtimes else ()),
        )
    return table


def _decode_runtimes(row: dict) -> str:
    """The decode runtime chosen and what the other measured (or why it could not run)."""
    if "decode_path" not in row:
        return "eager"
    compiled = row["decode_compiled"]
    other = f"compile failed: {compiled['error']}" if "error" in compiled else (
        f"eager {row['decode_eager']['decode_ms']:.2f}" if row["decode_path"] == "compiled" else f"compiled {compiled['decode_ms']:.2f}")
    return f"{row['decode_path']} ({other})"


def _profile_table(title: str, rows: list[dict]) -> Table:
    """ms per phase (prefill: one call; decode: per step) split into linears, attention, dequantization, the rest."""
    table = Table(title=f"{title} (ms, op self time)")
    for col in ("prompt", "phase", "wall", "linears", "attention", "dequant", "other"):
        table.add_column(col, justify="right")
    for r in rows:
        for phase, split in r.get("profile", {}).items():
            table.add_row(str(r["prompt_len"]), phase.replace("_per_step", ""), *(f"{split[k]:.1f}" for k in
                          ("wall_ms", "matmul_ms", "attention_ms", "dequantize_ms", "other_ms")))
    return table


_SHORT = {INT4_CPU: "int4", INT4_CUDA: "int4", INT8: "int8", DEQUANT: "fp", DENSE: "dequant+dense bf16"}


def _counts(counts: dict) -> str:
    return ", ".join(f"{n} {_SHORT.get(k, k)}" if n is not None else k for k, n in counts.items())


def _paths_table(paths: dict) -> Table:
    """What ran each phase at each prompt length (the measured fastest path)."""
    table = Table(title=f"fastest path per phase (tried {', '.join(paths['candidates'])})")
    for col in ("prompt", "prefill linears", "prefill attention", "decode linears", "decode attention + KV cache"):
        table.add_column(col, justify="right" if col == "prompt" else "left")
    for length, chosen in paths["per_prompt_len"].items():
        if chosen is None:
            continue
        pre, dec = chosen["prefill"], chosen["decode"]
        table.add_row(length, _counts(pre["linears"]), pre["attention"], _counts(dec["linears"]), dec["attention_and_kv_cache"])
    return table


def _decode_attention_line(label: str, entry: dict) -> str:
    """Which kernel decode attention ran and why: measured ms per cache length, or why not native."""
    why = entry.get("native_unavailable")
    measured = "; ".join(f"{n} tokens " + ", ".join(f"{k} {ms:.2f}" for k, ms in per.items())
                         for n, per in entry.get("measured_ms", {}).items())
    detail = f"native kernel unavailable: {why}" if why else (f"ms per step, all layers: {measured}" if measured else entry["packed"])
    return f"{label} decode attention: {entry['kernel']} ({detail})"


def _print_human(result: dict) -> None:
    kernels = result["kernels"]
    if kernels is not None:
        counts = ", ".join(f"{n} × {k}" for k, n in kernels["counts"].items())
        err.print(f"kernels on {kernels['device']}: {counts}")
        for name, reason in kernels["fallbacks"].items():
            err.print(f"  [yellow]fallback[/] {name}: dequantized fp ({reason})")
        if kernels.get("dense_prefill_unpack"):
            err.print(f"dense prefill unpacks int4 weights per call: {kernels['dense_prefill_unpack']}")
        for shape, probe in kernels["dense_prefill_shapes"].items():
            err.print(f"  {shape}: {probe['reason']}")
        if kernels.get("decode_gemv_unavailable"):
            err.print(f"decode int4 GEMV not used: {kernels['decode_gemv_unavailable']}")
        for shape, probe in kernels.get("decode_gemv_shapes", {}).items():
            err.print(f"  decode {shape}: {probe['reason']}")
    for note in result["notes"]:
        err.print(f"note: {note}")
    if result.get("paths"):
        err.print(_paths_table(result["paths"]))
    if result.get("decode_attention"):
        err.print(_decode_attention_line(result["kind"], result["decode_attention"]))
    err.print(_latency_table(f"{result['kind']} on {result['device']} ({result['dtype']} activations)", result["results"]))
    if any("profile" in r for r in result["results"]):
        err.print(_profile_table("where the time goes", result["results"]))
    kv, budget = result["kv_cache"], result["memory_budget"]
    err.print(
        f"weights {_mb(result['weight_bytes'])}, peak memory {_mb(result['peak_mem_bytes'])}; "
        f"KV cache ({kv['dtype']}) {kv['bytes_per_token']:,} B/token → {kv['capacity_tokens']:,} tokens "
        f"({kv['blocks']:,} blocks of {kv['block_tokens']}, max batch {kv['max_batch']:,} at {kv['request_tokens']:,} tokens) "
        f"in a {_mb(budget['bytes'])} budget ({budget['source']}) after the weights"
    )
    if "kv_cache_fp" in result:
        fp = result["kv_cache_fp"]
        err.print(
            f"  the same budget with the KV cache in {fp['dtype']}: {fp['bytes_per_token']:,} B/token → "
            f"{fp['capacity_tokens']:,} tokens, max batch {fp['max_batch']:,} "
            f"(int8 holds {kv['capacity_tokens'] / max(1, fp['capacity_tokens']):.2f}×)"
        )
    if "baseline" in result:
        base = result["baseline"]
        err.print(_decode_attention_line(f"baseline {base['dtype']}", base["decode_attention"]))
        err.print(_latency_table(f"baseline {base['dtype']}", base["results"]))
        if any("profile" in r for r in base["results"]):
            err.print(_profile_table(f"baseline {base['dtype']}: where the time goes", base["results"]))
        ratios = result["ratios"]
        table = Table(title="baseline / quantized (× faster)")
        for col in ("prompt", "prefill", "decode"):
            table.add_column(col, justify="right")
        for r in ratios["per_prompt_len"]:
            table.add_row(str(r["prompt_len"]), f"{r['prefill_speedup']:.2f}×", f"{r.get('decode_speedup', float('nan')):.2f}×")
        err.print(table)
        err.print(
            f"weights {_mb(result['weight_bytes'])} vs {_mb(base['weight_bytes'])} "
            f"({ratios['weight_bytes_ratio']:.2f}×); KV capacity {result['kv_cache']['capacity_tokens']:,} vs "
            f"{base['kv_cache']['capacity_tokens']:,} tokens ({ratios['kv_capacity_ratio']:.2f}×)"
        )


def bench_command(
    input: opt.InputArg = None,
    prompt_lens: Annotated[str, typer.Option("--prompt-lens", help="Prompt lengths in tokens, comma-separated.")] = "100,1000,2000,4000",
    gen: Annotated[int, typer.Option("--gen", help="Tokens to decode greedily after each prompt.", min=0)] = 64,
    batch: Annotated[int, typer.Option("--batch", help="Sequences per forward pass.", min=1)] = 1,
    reps: Annotated[int, typer.Option("--reps", help="Timed repetitions per prompt length (median reported).", min=1)] = 3,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed warm-up runs per prompt length.", min=0)] = 1,
    device: opt.Device = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Dtype of the non-quantized parts and KV cache: auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32, bf16, fp16.")] = "auto",
    memory_budget: Annotated[Optional[str], typer.Option("--memory-budget", help="Memory for weights + KV cache in the capacity estimate, e.g. 8GiB. Default: free device memory + the model's weights.", show_default=False)] = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="Also time the unquantized base model: fp32, bf16 or fp16.", show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch. Default: one per core.", min=1, show_default=False)] = None,
    seed: opt.Seed = 0,
    profile_steps: Annotated[int, typer.Option("--profile-steps", help="After timing each prompt length, profile one prefill and this many decode steps: time in linears, attention, dequantization and the rest.", min=0)] = 0,
    kv_bits: Annotated[Optional[int], typer.Option("--kv-bits", help="KV cache storage: 8 = int8 per head and token (quantized on append), 16 = the --dtype cache. Default: as the artifact's spec (--kv-bits 8 → int8).", show_default=False)] = None,
    compile_decode: Annotated[bool, typer.Option("--compile-decode", help="Also time decode through torch.compile over a static KV cache (the model and any baseline alike) and report the faster runtime per prompt length, both shown. Compiling takes a minute or more per model on a small CPU.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also write a PNG of TTFT and decode latency against prompt length (needs the 'plot' extra: matplotlib).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    quiet: opt.Quiet = False,
) -> None:
    """Time to first token, decode latency and tokens/s per prompt length, weight and peak memory,
    and KV-cache capacity, running quantized linears through real int4/int8 kernels."""
    if baseline is not None and baseline not in ("fp32", "bf16", "fp16"):
        raise InputError(f"--baseline {baseline}: use fp32, bf16 or fp16")
    if kv_bits is not None and kv_bits not in (8, 16):
        raise InputError(f"--kv-bits {kv_bits}: bench stores the KV cache in int8 (8) or in --dtype (16)")
    source = opt.input_or_stdin(input)
    if plot is not None:
        pyplot(plot)  # fail now, not after the benchmark, when matplotlib is missing
    params = BenchParams(
        prompt_lens=_lens(prompt_lens), gen=gen, batch=batch, reps=reps, warmup=warmup,
        device=str(resolve_device(device)), dtype=dtype,
        memory_budget=parse_bytes(memory_budget) if memory_budget is not None else None,
        baseline=baseline, threads=threads, seed=seed, profile_steps=profile_steps, kv_bits=kv_bits,
        compile_decode=compile_decode,
    )
    with status("loading model", quiet):
        loaded = load_input(source, device="cpu")
    if quiet:
        result = run_bench(loaded, params)
    elif err.is_terminal:
        with err.status("benchmarking") as spinner:
            result = run_bench(loaded, params, progress=lambda msg: spinner.update(f"benchmarking {msg}"))
    else:
        result = run_bench(loaded, params, progress=lambda msg: err.print(f"bench: {msg}"))
    result["input"] = source or "default"
    if not quiet:
        _print_human(result)
    if plot is not None:
        plot_latency(result, plot)
        if not quiet:
            err.print(f"plot: {plot}")
    if as_json:
        emit(json.dumps(result))
