"""Compiled decode in quant bench: same tokens as eager decoding, the faster runtime chosen and both reported."""

from __future__ import annotations

import copy
import json

import conftest
import pytest
import torch
from transformers import StaticCache

from quantcli.bench import latency
from quantcli.bench.kernels import swap_in_kernels
from quantcli.bench.latency import choose_decode, compiled_greedy_step, decode_with_step, greedy_step, measure_prefill_decode
from quantcli.quant import QuantSpec
from test_bench_kernels import one_thread, quantize_linears, tiny_llama  # noqa: F401 (one_thread: autouse fixture)


def _reference(model, ids: torch.Tensor, gen: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy tokens and each layer's cached keys from transformers' own generate (dynamic cache)."""
    out = model.generate(ids, max_new_tokens=gen + 1, do_sample=False, attention_mask=torch.ones_like(ids),
                         return_dict_in_generate=True)
    keys = [layer.keys for layer in out.past_key_values.layers]  # L + gen positions: the last token is not fed
    return out.sequences[:, ids.shape[1] + 1:], keys  # the first token comes from the prefill, not a decode step


@pytest.mark.slow
def test_compiled_decode_writes_generates_cache_and_tokens_through_the_int4_kernels(monkeypatch) -> None:
    """The compiled step over a static cache decodes what ``generate`` decodes and leaves the same
    keys at every position, on the plain model and with the int4 kernels swapped in (the same
    kernels eager and compiled). A step written at the wrong cache position (off by one), a cache
    that is not written, or a step that ignores the cache changes the keys."""
    caches = []
    monkeypatch.setattr(latency, "static_cache", lambda model, n: caches.append(StaticCache(config=model.config, max_cache_len=n)) or caches[-1])
    base = tiny_llama().eval()
    real = copy.deepcopy(base)
    swap_in_kernels(real, quantize_linears(copy.deepcopy(base), QuantSpec(wbits=4, group=32)), "cpu")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    gen, n = 6, 12 + 6
    with torch.inference_mode():
        for model in (base, real):
            tokens, keys = _reference(model, ids, gen)
            _, eager = decode_with_step(model, ids, gen, torch.device("cpu"), greedy_step(model))
            torch.compiler.reset()
            _, compiled = decode_with_step(model, ids, gen, torch.device("cpu"), compiled_greedy_step(model))
            assert torch.equal(eager, tokens) and torch.equal(compiled, tokens), (eager, compiled, tokens)
            for cache in caches[-2:]:
                for layer, expected in zip(cache.layers, keys):
                    assert expected.shape[2] == n
                    torch.testing.assert_close(layer.keys[:, :, :n], expected, rtol=1e-4, atol=1e-4)


def _decode(decode_ms: float) -> dict:
    return {"decode_ms": decode_ms, "decode_ms_min": decode_ms - 1, "decode_ms_max": decode_ms + 1, "decode_ms_std": 0.5,
            "decode_ms_reps": [decode_ms - 1, decode_ms, decode_ms + 1]}


@pytest.mark.parametrize("eager_ms, compiled_ms, path", [(10.0, 4.0, "compiled"), (4.0, 10.0, "eager")])
def test_the_faster_decode_runtime_is_the_rows_and_both_are_kept(eager_ms, compiled_ms, path) -> None:
    row = {"batch": 1, **_decode(eager_ms), "decode_tok_s": 1e3 / eager_ms}
    choose_decode(row, _decode(compiled_ms))
    assert row["decode_path"] == path
    assert row["decode_ms"] == min(eager_ms, compiled_ms) and row["decode_ms_min"] == min(eager_ms, compiled_ms) - 1
    assert row["decode_ms_reps"] == _decode(min(eager_ms, compiled_ms))["decode_ms_reps"]  # pairs with the chosen runtime's reps
    assert row["decode_tok_s"] == pytest.approx(1e3 / min(eager_ms, compiled_ms))
    assert row["decode_eager"]["decode_ms"] == eager_ms and row["decode_compiled"]["decode_ms"] == compiled_ms


def test_a_step_that_cannot_compile_is_reported_and_decode_stays_eager() -> None:
    model = tiny_llama().eval()

    def broken(token, position, cache):
        raise RuntimeError("inductor: no working C++ compiler\nsecond line")

    rows = measure_prefill_decode(model, [8], gen=2, batch=1, reps=1, warmup=0, device="cpu", compiled_step=broken)
    assert rows[0]["decode_path"] == "eager"
    assert rows[0]["decode_compiled"] == {"error": "inductor: no working C++ compiler"}
    assert rows[0]["decode_ms"] == rows[0]["decode_eager"]["decode_ms"]


def test_bench_cli_compile_decode_times_both_runtimes_for_model_and_baseline(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """``--compile-decode`` reaches both the quantized model and the baseline (the eager step stands
    in for the compiled one here: what is compiled is checked above, at a compile's cost)."""
    from typer.testing import CliRunner

    from quantcli.bench import run
    from quantcli.cli.app import app

    made = []
    monkeypatch.setattr(run, "compiled_greedy_step", lambda model: made.append(model) or greedy_step(model))
    runner = CliRunner()
    rtn = runner.invoke(app, ["rtn", str(tiny_model_dir), "--w4", "--group", "32", "-o", str(tmp_path / "rtn"), "-q"])
    assert rtn.exit_code == 0, rtn.output
    res = runner.invoke(app, ["bench", str(tmp_path / "rtn"), "--prompt-lens", "8", "--gen", "2", "--reps", "1",
                              "--warmup", "0", "--baseline", "fp32", "--compile-decode", "--json", "-q"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(made) == 2 and made[0] is not made[1]
    for model in (out, out["baseline"]):
        row = model["results"][0]
        assert row["decode_path"] in ("eager", "compiled")
        assert row["decode_compiled"]["decode_ms"] > 0 and row["decode_eager"]["decode_ms"] > 0
        assert row["decode_ms"] == min(row["decode_compiled"]["decode_ms"], row["decode_eager"]["decode_ms"])


def test_bench_without_compile_decode_compiles_nothing(tiny_model_dir, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from quantcli.bench import run
    from quantcli.cli.app import app

    monkeypatch.setattr(run, "compiled_greedy_step", lambda model: pytest.fail("compiled without --compile-decode"))
    res = CliRunner().invoke(app, ["bench", str(tiny_model_dir), "--prompt-lens", "8", "--gen", "2", "--reps", "1",
                                   "--warmup", "0", "--json", "-q"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout.strip().splitlines()[-1])["results"][0]
    assert "decode_path" not in row and row["decode_ms"] > 0
