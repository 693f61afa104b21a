"""The int8 KV cache of ``quant bench``: decode logits equal the fake-quantized-KV model's, and its
bytes per token (measured from the tensors a cache holds) are about half of bf16's."""

from __future__ import annotations

import conftest
import torch
from test_bench_kernels import one_thread  # noqa: F401  (autouse: one intra-op thread for tiny tensors)

from quantcli.bench.kvcache import cache_bytes, dequantize_kv, int8_kv_cache, measured_kv_bytes_per_token, quantize_kv
from quantcli.bench.latency import generate_once, kv_bytes_per_token
from quantcli.models.act_hooks import install_kv_quant
from quantcli.quant.act import fake_quant_per_token


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _model(hidden: int = 64):
    """The shared tiny Llama with a few large key channels, so 8-bit keys visibly move its logits."""
    model = conftest.tiny_llama(0, hidden=hidden, intermediate=2 * hidden)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 4
            layer.self_attn.k_proj.weight[:4] *= 8
    return model


def test_quantize_kv_is_the_evaluation_quantizer():
    """Stored codes dequantize to exactly what ``--kv-bits 8`` fake-quantizes to in evaluation."""
    x = torch.randn(2, 3, 5, 16) * torch.linspace(0.1, 10, 16)
    codes, zero, scale = quantize_kv(x)
    assert codes.dtype == zero.dtype == torch.uint8 and scale.dtype == torch.float32 and zero.shape == (2, 3, 5, 1)
    assert torch.allclose(dequantize_kv(codes, zero, scale, torch.float32), fake_quant_per_token(x, 8), atol=1e-6)


def test_int8_cache_decode_matches_the_fake_quant_kv_model():
    """Greedy decode through the int8 cache: every step's logits equal, within int8 precision, the
    logits the fake-quantized-KV model computes for the same position over the whole sequence, and
    differ from the fp model's by much more (the cache really quantizes). Catches a cache that
    quantizes with another grid (per channel, symmetric), stores fp, or misplaces appended tokens."""
    model = _model()
    prompt = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    steps = 6
    with torch.no_grad():
        cache = int8_kv_cache(model.config)
        out = model(input_ids=prompt, cache=cache, use_cache=True)
        logits, tokens = [out.logits[:, -1]], [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(steps):
            out = model(input_ids=tokens[-1], cache=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1])
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        decoded = torch.stack(logits, 1)  # [B, steps + 1, V]: positions 11 … 11 + steps
        full = torch.cat([prompt, *tokens[:-1]], dim=1)
        fp = model(full).logits[:, prompt.shape[1] - 1 :]
        handle = install_kv_quant(model, 8)
        fake = model(full).logits[:, prompt.shape[1] - 1 :]
        handle.remove()
    assert type(out.past_key_values.layers[0]).__name__ == "Int8KVLayer"
    assert out.past_key_values.get_seq_length() == full.shape[1]
    assert _rel(decoded, fake) < 1e-5 < 1e-2 * _rel(fp, fake), (_rel(decoded, fake), _rel(fp, fake))


def test_int8_kv_bytes_per_token_halve_bf16():
    """Bytes per token measured from the allocated cache tensors: bf16's are the formula's, the int8
    cache's are (D + 1 + 4)/(2·D) of them (codes, zero, float32 scale; D = 64 here: 0.54)."""
    model = _model(hidden=256).to(torch.bfloat16)  # 4 heads of 64, 2 KV heads
    fp = measured_kv_bytes_per_token(model, None, torch.device("cpu"))
    int8 = measured_kv_bytes_per_token(model, lambda: int8_kv_cache(model.config), torch.device("cpu"))
    assert fp == kv_bytes_per_token(model.config, torch.bfloat16) == 2 * 2 * 64 * 2 * 2
    assert int8 == 2 * 2 * 2 * (64 + 1 + 4)
    assert 0.5 < int8 / fp < 0.55


def test_generate_once_times_the_given_cache():
    model = _model()
    made = []

    def make():
        made.append(int8_kv_cache(model.config))
        return made[-1]

    with torch.inference_mode():
        generate_once(model, torch.randint(0, 128, (1, 10)), 3, torch.device("cpu"), make)
    assert len(made) == 1 and made[0].get_seq_length() == 10 + 3  # the prompt, then one token per decode step
    assert cache_bytes(made[0]) == 2 * 2 * 2 * 13 * (16 + 1 + 4)  # layers × K,V × KV heads × tokens × (D + zero + scale)
