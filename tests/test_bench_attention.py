"""quantcli::decode_attention, the native bf16 decode attention of ``quant bench``: its math against a
float32 reference, its use inside a model's decode (eager and compiled), and how bench chooses it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quantcli.bench import decode_attention as native_attention
from quantcli.bench import paths
from quantcli.bench.run import BenchParams
from test_bench_kernels import _static_decode_logits


def _native_or_skip() -> None:
    why = native_attention.status()
    if why:
        pytest.skip(f"quantcli::decode_attention does not run here: {why}")


def _reference(q, k, v, mask, scale) -> torch.Tensor:
    """softmax(scale q·kᵀ + mask) v in float64, from the bf16 inputs."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    return torch.softmax(s, dim=-1) @ v.double()


def _mask(kind: str, batch: int, length: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "float":
        return torch.randn(1, 1, 1, length, generator=gen)
    mask = torch.ones(batch if kind == "per-row" else 1, 1, 1, length, dtype=torch.bool)
    mask[..., length - 30:] = False  # a static cache's unused tail
    mask[..., 5] = False
    if kind == "per-row":
        mask[0, ..., length // 2:] = False  # batch rows with different lengths
    return mask


@pytest.mark.parametrize(
    "batch,kv,groups,dim,length,mask_kind",
    [
        (1, 3, 3, 64, 4064, "bool"),  # SmolLM2's geometry, 16 chunks of 256 keys
        (1, 3, 3, 64, 100, "none"),  # one chunk, a 4-key tail after the 16-key blocks
        (2, 2, 4, 128, 517, "bool"),  # 3 chunks, the last of 5 keys: an odd tail
        (2, 8, 8, 128, 1000, "per-row"),  # Llama-70B's 8 heads per KV head
        (1, 1, 1, 256, 33, "float"),  # one head per KV head, an additive mask
        (1, 2, 16, 64, 300, "float"),
        (1, 3, 3, 64, 7, "none"),  # fewer keys than one block
    ],
)
def test_native_decode_attention_equals_the_reference(batch, kv, groups, dim, length, mask_kind) -> None:
    """Within bf16 output precision of a float64 reference at head dims 64/128/256, 1-16 query heads
    per KV head, chunk boundaries and odd tails, bool/float/per-row masks. Catches keys' scores put
    in the wrong lanes by the shuffle tree, value pairs mis-interleaved, a dropped tail, chunks merged
    with the wrong weights, and keys read past the last attended one."""
    _native_or_skip()
    gen = torch.Generator().manual_seed(length + dim)
    q = torch.randn(batch, kv, groups, dim, generator=gen).bfloat16()
    k, v = (torch.randn(batch, kv, length, dim, generator=gen).bfloat16() for _ in range(2))
    mask = _mask(mask_kind, batch, length, gen)
    got = native_attention.decode_attention(q, k, v, mask, dim**-0.5).double()
    want = _reference(q, k, v, mask, dim**-0.5)
    assert got.shape == want.shape
    # bf16 weights (as ATen's CPU flash attention rounds them) and a bf16 output: ~2^-8 relative
    assert float((got - want).norm() / want.norm()) < 6e-3
    assert float((got - want).abs().max()) < 2e-2 * float(want.abs().max())


def test_unsupported_inputs_are_refused_before_the_op() -> None:
    q = torch.empty(1, 2, 3, 64, dtype=torch.bfloat16)
    assert "bf16 on the CPU" in native_attention.unsupported(q.float(), q.float(), None)
    assert "head dim 80" in native_attention.unsupported(torch.empty(1, 2, 3, 80, dtype=torch.bfloat16), q, None)
    k = torch.empty(1, 2, 9, 64, dtype=torch.bfloat16)
    assert "per batch entry" in native_attention.unsupported(q, k, torch.ones(1, 3, 1, 9, dtype=torch.bool))
    assert "per batch entry" in native_attention.unsupported(q, k, torch.ones(1, 1, 1, 12, dtype=torch.bool))  # not one per key
    assert native_attention.unsupported(q, k, torch.ones(1, 1, 1, 9, dtype=torch.bool)) == ""


def _tiny_llama(dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)  # head dim 64
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval().to(dtype)


def test_native_decode_gives_the_logits_of_eager_attention(monkeypatch) -> None:
    """A bf16 model decoding through the native kernel (4 query heads over 2 KV heads, head dim 64)
    gives transformers' eager attention's logits to bf16 precision, and the kernel ran at every
    decode step of every layer: catches a crossed head assignment or the kernel silently skipped."""
    _native_or_skip()
    ref_model = _tiny_llama(torch.bfloat16)
    ref_model.config._attn_implementation = "eager"
    model = copy.deepcopy(ref_model)
    model.config._attn_implementation = "sdpa"
    assert paths.install_phase_attention(model) == ""
    for module in paths.attention_modules(model):
        setattr(module, paths.NATIVE_DECODE_ATTR, True)
    calls = []
    orig = native_attention.decode_attention
    monkeypatch.setattr(native_attention, "decode_attention", lambda *a: (calls.append(1), orig(*a))[1])
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = _static_decode_logits(ref_model, ids, 4).float()
        got = _static_decode_logits(model, ids, 4).float()
    assert len(calls) == 4 * 2
    assert float((got - want).norm() / want.norm()) < 2e-2


def test_native_decode_runs_inside_a_compiled_step() -> None:
    """The op traces into a whole-graph compiled decode step (its fake kernel gives the shape; a graph
    break raises), runs there at every layer, and decodes the tokens the eager model decodes."""
    _native_or_skip()
    from quantcli.bench.latency import compiled_greedy_step, decode_with_step

    cpu = torch.device("cpu")
    model = _tiny_llama(torch.bfloat16)
    assert paths.install_phase_attention(model) == ""
    for module in paths.attention_modules(model):
        setattr(module, paths.NATIVE_DECODE_ATTR, True)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    torch.compiler.reset()
    with torch.inference_mode():
        eager = _static_decode_logits(model, ids, 3).argmax(-1)
        step = compiled_greedy_step(model)
        decode_with_step(model, ids, 1, cpu, step)  # compiles
        decode_with_step(model, ids, 3, cpu, step)  # compiles again, the cache length dynamic
        with torch.profiler.profile() as prof:
            compiled = decode_with_step(model, ids, 3, cpu, step)[1][0]
    assert torch.equal(compiled, eager)
    assert sum(ev.count for ev in prof.key_averages() if ev.key == native_attention.OP) == 3 * 2


@pytest.mark.parametrize("native_wins", [True, False])
def test_choose_decode_attention_picks_the_faster_total(monkeypatch, native_wins) -> None:
    """The kernel is switched on for every attention module exactly when its measured total over the
    cache lengths is smaller, and the timings are reported: catches a choice by one length, or one
    made and not applied."""
    _native_or_skip()
    model = _tiny_llama(torch.bfloat16)
    ms = {False: 3.0, True: 2.0 if native_wins else 4.0}  # per call, by native
    monkeypatch.setattr(paths, "time_attention", lambda *a, native=False, **k: ms[native] * (1 + a[1] / 1000))
    chosen = paths.choose_decode_attention(model, BenchParams(prompt_lens=(100, 1000), gen=8), torch.bfloat16)
    assert chosen["kernel"] == (paths.NATIVE_DECODE if native_wins else paths.SDPA_DECODE)
    assert set(chosen["measured_ms"]) == {104, 1004}
    flags = [getattr(m, paths.NATIVE_DECODE_ATTR) for m in paths.attention_modules(model)]
    assert flags and all(flag == native_wins for flag in flags)
    assert paths.choose_decode_attention(model, BenchParams(), torch.bfloat16) is chosen  # once per model


def test_an_fp32_cache_keeps_sdpa_and_says_why() -> None:
    model = _tiny_llama(torch.float32)
    chosen = paths.choose_decode_attention(model, BenchParams(prompt_lens=(16,), gen=2), torch.float32)
    assert chosen["kernel"] == paths.SDPA_DECODE and "bf16" in chosen["native_unavailable"]
    assert not any(getattr(m, paths.NATIVE_DECODE_ATTR, False) for m in paths.attention_modules(model))


def test_the_profile_counts_the_native_kernel_as_attention() -> None:
    """profile_phases' split puts quantcli::decode_attention's time with attention (the bound of
    benchmarks/speed.py subtracts attention from what the linears can change): catches its time
    landing in "other"."""
    _native_or_skip()
    q = torch.randn(1, 3, 3, 64).bfloat16()
    k = v = torch.randn(1, 3, 512, 64).bfloat16()
    with torch.inference_mode(), torch.profiler.profile() as prof:
        for _ in range(10):
            native_attention.decode_attention(q, k, v, None, 0.125)
    averages = prof.key_averages()
    native_ms = sum(ev.self_cpu_time_total for ev in averages if ev.key == native_attention.OP) / 1e3
    assert native_ms > 0
    assert paths._split(averages, 1.0, 1)["attention_ms"] >= native_ms - 0.001
