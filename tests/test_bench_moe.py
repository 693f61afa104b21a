"""Mixture-of-experts through the low-bit kernels (quantcli.bench.moe) on a tiny Mixtral."""

from __future__ import annotations

import copy

import conftest
import pytest
import torch
from torch import nn

from test_bench_kernels import BF16_TOL, one_thread, rel_err  # noqa: F401 (one_thread: autouse fixture)

from quantcli.bench import kernels
from quantcli.bench.kernels import swap_in_kernels
from quantcli.bench.moe import GroupedExperts, expert_call_stats, group_experts
from quantcli.models.canonical import LinearExperts, canonicalize
from quantcli.quant import QuantSpec, quantize_weight


@pytest.fixture(scope="module")
def mixtral() -> nn.Module:
    model = canonicalize(conftest.tiny_models()["MixtralForCausalLM"](0))
    assert any(isinstance(m, LinearExperts) for m in model.modules())
    return model


def fake_quantize(model: nn.Module, spec: QuantSpec) -> dict:
    """Quantize every linear except the routers and lm_head; write the dequantized weights back."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head" and not name.endswith("mlp.gate"):
            qw = quantize_weight(module.weight.data, spec)
            module.weight.data = qw.dequantize()
            out[name] = qw
    return out


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("device, path", [("cpu", "kernel"), ("cpu", "dense"), ("cpu", "gemv"), pytest.param("cuda", "kernel", marks=CUDA)])
def test_moe_kernel_path_matches_fake_quant(mixtral: nn.Module, device: str, path: str) -> None:
    """Experts on the int4 kernel (decode path), on quantcli::int4_gemv (the native decode kernel, here
    with every expert's grouped rows) or unpacked per call + dense (prefill path) give the fake-quant
    MoE model's logits within bf16 precision, with tokens grouped by expert."""
    from quantcli.bench import gemv

    if path == "gemv" and gemv.gemv_status():
        pytest.skip(f"quantcli::int4_gemv does not run here: {gemv.gemv_status()}")
    fake = copy.deepcopy(mixtral)
    quantized = fake_quantize(fake, QuantSpec(wbits=4, group=32))
    assert sum(".experts." in n for n in quantized) == 2 * 4 * 3  # 2 layers × 4 experts × 3 linears
    real = copy.deepcopy(mixtral)
    report = swap_in_kernels(real, quantized, device)
    expected = kernels.INT4_CPU if device == "cpu" else kernels.INT4_CUDA
    assert report.counts() == {expected: len(quantized)}, report.to_dict()["fallbacks"]
    real.to(device)
    dense = native = 0
    for module in real.modules():
        if isinstance(module, kernels.Int4WeightOnlyLinear) and path == "dense" and not module.dense_unsupported():
            module.dense_from, dense = 0, dense + 1
        if isinstance(module, kernels.Int4WeightOnlyLinear) and path == "gemv" and not gemv.shape_unsupported(
                module.out_features, module.in_features, module.group_size):
            module.gemv_upto, native = 1 << 20, native + 1
    assert (dense > 0) == (path == "dense") and (native > 0) == (path == "gemv")
    summary = group_experts(real)
    assert summary["blocks"] == 2 and summary["experts_per_block"] == 4 and summary["top_k"] == 2

    calls: dict[str, int] = {}
    for name, module in real.named_modules():
        if isinstance(module, kernels.Int4WeightOnlyLinear) and ".experts." in name:
            module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = fake(ids).logits
        got = real(ids.to(device)).logits.cpu()
    assert rel_err(got, ref) < BF16_TOL
    # grouped by expert: one call per expert linear per forward, never one per token
    assert calls and max(calls.values()) == 1
    stats = expert_call_stats(real)
    assert stats["routed_rows"] == 2 * 2 * 24 * 2  # layers × batch × tokens × top-k
    assert stats["expert_calls"] == len(calls) // 3


def test_grouped_experts_equal_linear_experts(mixtral: nn.Module) -> None:
    """Sorted dispatch computes exactly what the per-expert scan computes (fp32, no quantization)."""
    experts = copy.deepcopy(mixtral.model.layers[0].mlp.experts)
    grouped = GroupedExperts(copy.deepcopy(experts))
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 64, generator=gen)
    index = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=gen)
    with torch.inference_mode():
        assert torch.allclose(grouped(hidden, index, weights), experts(hidden, index, weights), atol=1e-6)
