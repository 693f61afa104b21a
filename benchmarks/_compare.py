"""One in-process latency comparison for the speed benchmarks: a quantized artifact and its base
model in several dtypes, timed in the same process one after another, with the machine's load
recorded around the run and a torch.profiler split of where the time goes.

Ratios are only meaningful within one run: on a shared machine, compare nothing across files.
"""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantcli.bench.latency import interleave as interleave_runs, peak_memory_bytes  # noqa: E402
from quantcli.bench.paths import profile_phases  # noqa: E402
from quantcli.bench.run import DTYPES, BenchParams, _ratios, bench_model, bench_model_steps, run_bench, run_bench_steps  # noqa: E402

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.\n"


def save_random_model(config, directory: Path, seed: int = 0) -> tuple[Path, int]:
    """Save a causal LM with random weights built from ``config`` plus a character tokenizer;
    returns the directory and the number of parameters."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import char_tokenizer  # the tests' own builder

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF init gives tiny-norm weights; a plausible spread matters for RTN only
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    model.save_pretrained(directory)
    char_tokenizer(TEXT).save_pretrained(directory)
    return directory, sum(p.numel() for p in model.parameters())


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    except OSError:
        pass
    flags = ""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "amx": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def compare(
    artifact: str,
    params: BenchParams,
    baselines: tuple[str, ...] = ("fp32", "bf16"),
    budgets: dict[str, int] | None = None,
    profile_steps: int = 8,
    log=print,
    interleave: bool = False,
) -> dict:
    """Time ``artifact`` (fastest paths) and its base model in each of ``baselines``, same process.

    ``interleave``: hold every model at once and time them rep by rep in turn
    (:func:`quantcli.bench.latency.interleave`), so a change in the machine's load hits all of them
    alike; else one model after another (one in memory at a time).

    ``budgets`` maps ``"quantized"`` and baseline names to the memory budget of each KV-capacity
    estimate (default: ``params.memory_budget`` for all). Each model is profiled once at the longest
    prompt (``profile_phases``). Returns the quantized result with ``baselines``, ``ratios`` per
    baseline, ``loadavg`` before/after and ``wall_s``.
    """
    from quantcli.loading import load_input
    from quantcli.models.load import load_base

    budgets = budgets or {}
    started, load_before = time.time(), os.getloadavg()
    device = torch.device(params.device)
    progress = lambda msg: log(f"  {msg}")  # noqa: E731
    loaded = load_input(artifact, device="cpu")
    base_dir = loaded.base_dir
    params_q = BenchParams(**{**params.__dict__, "baseline": None, "memory_budget": budgets.get("quantized", params.memory_budget)})
    if interleave:
        result = _time_interleaved(loaded, params, params_q, baselines, budgets, profile_steps, log)
    else:
        result = run_bench(loaded, params_q, progress=progress)
        longest = max(params.prompt_lens)
        if not params.profile_steps:  # else every row already holds its own profile
            log(f"  profiling quantized at {longest} tokens")
            result["profile"] = profile_phases(loaded.model, longest, profile_steps, device)
        del loaded
        gc.collect()
        result["baselines"] = {}
        for name in baselines:
            dtype = DTYPES[name]
            model, _ = load_base(base_dir)
            model.to(device=device, dtype=dtype)
            budget = budgets.get(name, result["memory_budget"]["bytes"])
            base = bench_model(model, params, dtype, budget, progress, f"baseline {name}")
            if not params.profile_steps:
                log(f"  profiling {name} at {longest} tokens")
                base["profile"] = profile_phases(model, longest, profile_steps, device)
            result["baselines"][name] = base
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["ratios"] = {name: _ratios(result, base) for name, base in result["baselines"].items()}
    result["peak_mem_bytes_process"] = peak_memory_bytes(device)
    result["loadavg"] = {"before": list(load_before), "after": list(os.getloadavg())}
    result["wall_s"] = round(time.time() - started, 1)
    result["machine"] = machine()
    return result


def _time_interleaved(loaded, params, params_q, baselines, budgets, profile_steps, log) -> dict:
    """The timing part of :func:`compare` with every model held at once and timed rep by rep in turn:
    the quantized model's result with ``baselines`` filled in. Each model's compiled decode step has
    a code object of its own (:func:`quantcli.bench.latency.compiled_greedy_step`), so dynamo's
    per-code recompile limit is not shared between them."""
    from quantcli.models.load import load_base

    device = torch.device(params.device)
    progress = lambda msg: log(f"  {msg}")  # noqa: E731
    torch.compiler.reset()
    runs = {"quantized": run_bench_steps(loaded, params_q, progress, reset_compiler=False)}
    budget = next(runs["quantized"])  # set up (kernels, paths), nothing timed yet
    models = {"quantized": loaded.model}
    for name in baselines:
        models[name], _ = load_base(loaded.base_dir)
        models[name].to(device=device, dtype=DTYPES[name])
        runs[name] = bench_model_steps(models[name], params, DTYPES[name], budgets.get(name, budget), progress,
                                       f"baseline {name}", reset_compiler=False)
    done = interleave_runs(runs)
    result = done["quantized"]
    result["timing"] = f"interleaved: the quantized model and {', '.join(baselines)} held at once, timed one repetition each in turn"
    if not params.profile_steps:
        for name, model in models.items():
            log(f"  profiling {name} at {max(params.prompt_lens)} tokens")
            (result if name == "quantized" else done[name])["profile"] = profile_phases(model, max(params.prompt_lens), profile_steps, device)
    result["baselines"] = {name: done[name] for name in baselines}
    return result


def print_table(result: dict, targets: dict | None = None) -> None:
    """TTFT and decode per prompt length for every model, and the speedups."""
    names = ["quantized", *result["baselines"]]
    rows = {"quantized": result["results"], **{n: b["results"] for n, b in result["baselines"].items()}}
    head = f"{'prompt':>6} " + " ".join(f"{'TTFT ' + n:>16} {'decode ' + n:>16}" for n in names)
    print(head)
    for i, r in enumerate(result["results"]):
        cells = " ".join(f"{rows[n][i]['prefill_ms']:>14.1f}ms {rows[n][i].get('decode_ms', float('nan')):>14.2f}ms" for n in names)
        print(f"{r['prompt_len']:>6} {cells}")
    for name, ratio in result["ratios"].items():
        per = ", ".join(f"{r['prompt_len']}: TTFT {r['prefill_speedup']:.2f}× decode {r.get('decode_speedup', float('nan')):.2f}×"
                        for r in ratio["per_prompt_len"])
        print(f"vs {name}: {per}")
    for length, chosen in (result.get("paths") or {}).get("per_prompt_len", {}).items():
        if chosen:
            print(f"paths @{length}: prefill linears {chosen['prefill']['linears']}, attention {chosen['prefill']['attention']}; "
                  f"decode linears {chosen['decode']['linears']}, attention+KV {chosen['decode']['attention_and_kv_cache']}")
    print(f"loadavg before {result['loadavg']['before']}, after {result['loadavg']['after']}; {result['wall_s']} s")


def write_plot(result: dict, path: Path) -> None:
    """The ``quant bench --plot`` figure of ``result`` next to its JSON (skipped without matplotlib)."""
    from quantcli.bench.plot import plot_latency
    from quantcli.errors import InputError

    try:
        plot_latency(result, path)
    except InputError as err:
        print(f"no plot: {err}", file=sys.stderr)
