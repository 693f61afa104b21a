"""Interleaved timing: models held at once and timed one repetition each in turn, so a change in a
shared machine's load hits every model alike."""

from __future__ import annotations

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
