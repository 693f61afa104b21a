"""Interleaved timing: models held at once and timed one repetition each in turn, so a change in a
shared machine's load hits every model alike."""

from __future__ import annotations

import pytest
import torch

from quantcli.bench import latency
from quantcli.bench.latency import drain, interleave, prefill_decode_reps
from quantcli.bench.run import BenchParams, bench_model_steps
from test_bench_kernels import one_thread, tiny_llama  # noqa: F401 (one_thread: autouse fixture)


def test_interleave_alternates_steps_and_returns_each_result() -> None:
    """One step of each run in turn, runs of different lengths, each one's return value: catches a
    driver that runs one to its end before the next (what sequential timing does)."""
    order = []

    def run(name: str, steps: int):
        for i in range(steps):
            order.append(f"{name}{i}")
            yield
        return name.upper()

    assert interleave({"a": run("a", 3), "b": run("b", 2)}) == {"a": "A", "b": "B"}
    assert order == ["a0", "b0", "a1", "b1", "a2"]
    assert drain(run("c", 2)) == "C"


def test_interleave_waits_at_each_length_for_every_run() -> None:
    """A run that finishes a prompt length waits until the others have too: catches a faster model
    running ahead to the next length, so that its reps meet another minute's load."""
    order = []

    def run(name: str, reps_per_length: tuple[int, ...]):
        for length, reps in enumerate(reps_per_length):
            for i in range(reps):
                order.append(f"{name}{length}")
                yield
            yield latency.LENGTH_DONE
        return name

    interleave({"a": run("a", (1, 1)), "b": run("b", (3, 1))})
    assert order == ["a0", "b0", "b0", "b0", "a1", "b1"]


def test_models_timed_together_alternate_rep_by_rep(monkeypatch) -> None:
    """Two models through bench_model_steps under interleave: every timed prefill + decode of one
    sits between two of the other, at every prompt length, and each gets its full rows."""
    calls = []
    real = latency.generate_once
    monkeypatch.setattr(latency, "generate_once", lambda model, *a, **k: (calls.append(model.tag), real(model, *a, **k))[1])
    models = {}
    for tag in ("a", "b"):
        models[tag] = tiny_llama().eval()
        models[tag].tag = tag
    params = BenchParams(prompt_lens=(8, 12), gen=2, reps=3, warmup=0, fast_paths=False)
    runs = {tag: bench_model_steps(m, params, torch.float32, 10**9, None, tag) for tag, m in models.items()}
    done = interleave(runs)
    assert calls == ["a", "b"] * 6  # 2 lengths × 3 reps, alternating
    for result in done.values():
        assert [r["prompt_len"] for r in result["results"]] == [8, 12] and all(r["reps"] == 3 for r in result["results"])


def test_compiled_warm_up_decodes_over_the_timed_cache_size(monkeypatch) -> None:
    """Warm-ups of the compiled step decode as many tokens as the timed reps, so the static cache has
    the timed shape before timing: a shorter warm-up leaves a recompile inside the first timed rep."""
    gens = []
    real = latency.decode_with_step
    monkeypatch.setattr(latency, "decode_with_step", lambda model, ids, gen, *a: (gens.append(gen), real(model, ids, gen, *a))[1])
    model = tiny_llama().eval()
    step = lambda token, position, cache: latency.greedy_step(model)(token, position, cache)  # noqa: E731 (eager: no compile here)
    rows = drain(prefill_decode_reps(model, [8], gen=6, batch=1, reps=2, warmup=1, device="cpu", compiled_step=step))
    assert gens == [6, 6, 6]  # one warm-up, two timed reps
    assert "decode_compiled" in rows[0] and "decode_ms" in rows[0]["decode_compiled"]


def test_compiled_steps_of_two_models_keep_their_own_code() -> None:
    """Each model's compiled step wraps a code object of its own, so dynamo's graphs, guards and
    shape history of one model never serve or reshape the other's."""
    a, b = tiny_llama().eval(), tiny_llama().eval()
    step_a, step_b = latency.compiled_greedy_step(a), latency.compiled_greedy_step(b)
    code = lambda step: getattr(step, "_torchdynamo_orig_callable", step).__code__  # noqa: E731
    assert code(step_a) is not code(step_b)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = [latency.decode_with_step(m, ids, 3, torch.device("cpu"), latency.greedy_step(m))[1] for m in (a, b)]
        got = [latency.decode_with_step(m, ids, 3, torch.device("cpu"), s)[1] for m, s in ((a, step_a), (b, step_b))]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_kernel_choices_time_their_paths_in_turns(monkeypatch) -> None:
    """The per-shape choices (dense threshold, GEMV, AMX) time each path once per round, in turns,
    and keep each one's fastest: catches timing all of one path's reps before the other's, where a
    burst of load on a shared machine picks the kernel."""
    from torch import nn

    from quantcli.bench import kernels

    order, times = [], iter([5.0, 4.0, 3.0, 9.0, 4.0, 1.0])
    monkeypatch.setattr(kernels, "time_call", lambda module, x, reps: (order.append(module.state), next(times))[1])
    module = nn.Identity()
    best = kernels.time_paths(module, torch.zeros(1), (1,), 3,
                              {"a": lambda m: setattr(module, "state", "a"), "b": lambda m: setattr(module, "state", "b")})
    assert order == ["a", "b"] * 3
    assert best == {"a": {1: 3.0}, "b": {1: 1.0}}


def test_paired_ratios_pair_reps_in_the_order_timed(monkeypatch) -> None:
    """Each model's row keeps its reps in the order timed, and the ratios pair rep i of the baseline
    with rep i of the quantized model: catches reps stored sorted (pairing a fast rep of one with a
    slow rep of the other) and an inverted ratio."""
    from quantcli.bench.run import _ratios

    prefill_s = {"q": iter([0.003, 0.001, 0.002]), "b": iter([0.006, 0.001, 0.004])}
    monkeypatch.setattr(latency, "generate_once", lambda model, ids, gen, *a: (next(prefill_s[model.tag]), [0.01] * gen))
    models = {}
    for tag in ("q", "b"):
        models[tag] = tiny_llama().eval()
        models[tag].tag = tag
    params = BenchParams(prompt_lens=(8,), gen=2, reps=3, warmup=0, fast_paths=False)
    done = interleave({tag: bench_model_steps(m, params, torch.float32, 10**9, None, tag) for tag, m in models.items()})
    assert done["q"]["results"][0]["prefill_ms_reps"] == [3.0, 1.0, 2.0]
    row = _ratios(done["q"], done["b"])["per_prompt_len"][0]
    assert row["prefill_speedup_reps"] == [2.0, 1.0, 2.0]
    assert row["decode_speedup_reps"] == [1.0, 1.0, 1.0]


def test_speed_report_pairs_reps_and_bounds_a_w4a16_prefill_by_its_weight_reads(monkeypatch) -> None:
    """benchmarks/speed.py on a made-up run: the target check counts the paired reps, and a missed
    TTFT gets the ratio a perfect int4 GEMM would reach, the bf16 baseline's time less reading the
    weight bytes 4 bits do not store (at the bandwidth its decode linears reach): catches a bound
    from the w4 model's bytes instead of the saved ones, or from the prefill's bandwidth."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import speed

    profile = lambda prefill_matmul, decode_matmul: {  # noqa: E731
        "prefill": {"wall_ms": 100.0, "matmul_ms": prefill_matmul, "dequantize_ms": 0.0},
        "decode_per_step": {"wall_ms": 20.0, "matmul_ms": decode_matmul, "dequantize_ms": 0.0}}
    row = lambda prefill_ms, decode_ms, prof: {"prompt_len": 1000, "prefill_ms": prefill_ms, "decode_ms": decode_ms, "profile": prof}  # noqa: E731
    result = {
        "weight_bytes": 90e6,
        "results": [row(1020.0, 8.0, profile(40.0, 5.0))],
        "baselines": {"bf16": {"weight_bytes": 270e6, "results": [row(1000.0, 20.0, profile(30.0, 10.0))]},
                      "fp32": {"weight_bytes": 540e6, "results": [row(2000.0, 40.0, profile(60.0, 30.0))]}},
        "ratios": {
            "bf16": {"per_prompt_len": [{"prompt_len": 1000, "prefill_speedup": 1000 / 1020, "decode_speedup": 2.5,
                                         "prefill_speedup_reps": [0.9, 1.05, 0.98], "decode_speedup_reps": [2.4, 2.5, 2.6]}]},
            "fp32": {"per_prompt_len": [{"prompt_len": 1000, "prefill_speedup": 2000 / 1020, "decode_speedup": 5.0}]},
        },
    }
    result["targets"] = speed.check_targets(result, speed.TARGETS)
    ttft = result["targets"]["1000"]["ttft_vs_bf16"]
    assert not ttft["met"] and ttft["reps_met"] == "1/3" and ttft["paired_median"] == 0.98
    assert (ttft["paired_min"], ttft["paired_max"]) == (0.9, 1.05)
    assert "reps_met" not in result["targets"]["1000"]["decode_vs_fp32"]  # no per-rep times: no paired claim
    why = speed.explain_misses(result)
    assert set(why) == {"1000"} and set(why["1000"]) == {"ttft_vs_bf16"}
    m = why["1000"]["ttft_vs_bf16"]
    # bf16 decode linears: 270 MB in 20 ms · 10/20 = 10 ms → 27 GB/s; 180 MB not stored → 6.67 ms
    assert m["weight_read_saving_ms"] == pytest.approx(180 / 27, abs=0.01)
    assert m["bound_if_baselines_time_minus_weight_reads"] == pytest.approx(1000 / (1000 - 180 / 27), abs=1e-3)
    assert m["reachable_by_kernels"] and m["margin_within_rep_spread"]
    # int8 activations (a W8A8 artifact) change the multiply-adds: no W4A16 bound, the free-linears verdict stays
    result["spec"] = {"abits": 8}
    m8 = speed.explain_misses(result)["1000"]["ttft_vs_bf16"]
    assert "bound_if_baselines_time_minus_weight_reads" not in m8 and m8["reachable_by_kernels"] == (m8["bound_if_linears_free"] >= 1.0)
