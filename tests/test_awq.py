"""AWQ on toys: injected outlier channels, scale candidates, clip search, replay preserves function."""

import pytest
import torch
from torch import nn

from conftest import tiny_models
from quantcli.algos.awq import AWQ, AWQParams, candidate_scales, fake_quant, input_gram, search_clip, search_scale
from quantcli.algos.driver import run_blockwise
from quantcli.models.arch import ScalingGroup
from quantcli.models.canonical import canonicalize
from quantcli.quant import QuantSpec


class NormLinear(nn.Module):
    """A scaling group in miniature: a norm-like diagonal op feeding two linears."""

    def __init__(self, dim=64, out=48):
        super().__init__()
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(dim))
        self.a = nn.Linear(dim, out, bias=False)
        self.b = nn.Linear(dim, out, bias=False)

    def forward(self, x):
        return self.a(x) + self.b(x)


def outlier_inputs(n=2048, dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    x[:, :4] *= 40  # a few salient channels with huge activations
    return x


def test_awq_error_not_above_rtn_with_outlier_channels():
    torch.manual_seed(0)
    module = NormLinear()
    x = outlier_inputs()
    spec = QuantSpec(wbits=3, group=32)
    layer = nn.Module()
    layer.block = module  # the inspected module: the group's whole output
    group = ScalingGroup("toy", "block.norm", ("block.a", "block.b"), "block")
    s, awq_loss, rtn_loss = search_scale(layer, group, ["block.a", "block.b"], x, {}, spec, AWQParams(), "cpu", 4096)
    assert awq_loss <= rtn_loss
    assert awq_loss < 0.8 * rtn_loss  # the outliers give AWQ real room
    assert s[:4].mean() > s[4:].mean()  # salient channels get the larger scales


def test_weight_activation_search_smooths_outlier_activations():
    """W4A4: per-token activation quantization is part of the loss, so scales that move the
    outlier channels' magnitude into the weights cut the error well below plain RTN's."""
    module = NormLinear()
    x = outlier_inputs()
    layer = nn.Module()
    layer.block = module
    group = ScalingGroup("toy", "block.norm", ("block.a", "block.b"), "block")
    _, wa_loss, wa_rtn = search_scale(layer, group, ["block.a", "block.b"], x, {}, QuantSpec(4, 32, abits=4), AWQParams(), "cpu", 4096)
    _, _, w_rtn = search_scale(layer, group, ["block.a", "block.b"], x, {}, QuantSpec(4, 32), AWQParams(), "cpu", 4096)
    assert wa_rtn > w_rtn  # the activation quantizer is in the loss
    assert wa_loss < 0.5 * wa_rtn


def test_bfloat16_search_finds_scales_that_hold_in_float32():
    """The search's forwards in bfloat16 (the CPU/GPU default where fast) still pick scales whose
    float32 error is well below RTN's: target and candidates share the rounding."""
    torch.manual_seed(0)
    module = NormLinear()
    x = outlier_inputs()
    layer = nn.Module()
    layer.block = module
    group = ScalingGroup("toy", "block.norm", ("block.a", "block.b"), "block")
    spec = QuantSpec(wbits=3, group=32)
    s, _, _ = search_scale(layer, group, ["block.a", "block.b"], x, {}, spec, AWQParams(search_dtype="bfloat16"), "cpu", 4096)
    with torch.no_grad():
        target = module(x)
        def error(scale):
            q = {n: fake_quant(getattr(module, n).weight * scale, spec) / scale for n in ("a", "b")}
            return ((x @ q["a"].T + x @ q["b"].T - target) ** 2).mean()
        assert error(s) < 0.8 * error(torch.ones_like(s))


def test_candidate_scales_are_normalised():
    s = candidate_scales(torch.rand(32) + 0.1, torch.rand(32) + 0.1, 0.5)
    assert torch.isclose((s.max() * s.min()).sqrt(), torch.tensor(1.0))


def test_clip_search_never_worse_than_unclipped():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[0, 3] = 12.0  # an outlier weight makes clipping pay
    x = torch.randn(256, 64)
    spec = QuantSpec(wbits=3, group=32)
    r = search_clip(w, input_gram(x), spec, AWQParams())
    assert r.shape == (16, 2) and torch.all(r <= 1) and torch.all(r >= 0.5)
    err = lambda q: ((q - w) @ x.T).pow(2).sum()
    assert err(fake_quant(w, spec, clip=r)) <= err(fake_quant(w, spec))
    assert r[0, 0] < 1


def test_clip_search_counts_a_rare_token_with_a_huge_activation():
    """One token in thousands whose channel 3 is huge (an attention sink): clipping the outlier
    weight on that channel would wreck that token's output, so the group keeps its full range."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[0, 3] = 12.0
    x = torch.randn(4096, 64)
    x[1234, 3] = 2000.0
    spec = QuantSpec(wbits=3, group=32)
    r = search_clip(w, input_gram(x), spec, AWQParams())
    assert r[0, 0] == 1
    err = lambda q: ((q - w) @ x.T).pow(2).sum()
    assert err(fake_quant(w, spec, clip=r)) <= err(fake_quant(w, spec))


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma3ForCausalLM", "Qwen2MoeForCausalLM"])
def test_awq_runs_on_table_entries_and_scales_fold_without_changing_function(arch, tmp_path):
    """AWQ's searched scales, replayed on a fresh copy without quantization, keep the logits."""
    from quantcli.algos.replay import StageReplay
    from quantcli.loading import replay_lineage
    from quantcli.artifact import BaseModelRef, Manifest, write_artifact

    factory = tiny_models()[arch]
    model = canonicalize(factory())
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    result = run_blockwise(model, ids, AWQ(AWQParams(n_grid=5)), QuantSpec(4, 32), torch.device("cpu"), batch=2)
    scales = {k: v for k, v in result.saved.items() if k.endswith(".scales")}
    assert scales and all(torch.all(v > 0) for v in scales.values())
    assert any(not torch.allclose(v, torch.ones_like(v)) for v in scales.values())
    v_proj = model.model.layers[0].self_attn.v_proj
    assert v_proj.out_features < model.model.layers[0].self_attn.o_proj.in_features  # the tiny models use GQA
    assert "model.layers.0.attn_out.scales" not in scales  # v→o under GQA is skipped, and said so
    assert any(s.startswith("attn_out") for s in result.layers[0]["skipped"])
    artifact = write_artifact(
        tmp_path / "awq", Manifest(kind="awq", base_model=BaseModelRef("x", "h", arch)), {"awq.safetensors": result.saved}
    )
    fresh = canonicalize(factory())
    before = fresh(ids).logits
    replay_lineage(fresh, [StageReplay.of(artifact)], {})
    assert torch.allclose(fresh(ids).logits, before, atol=1e-4, rtol=1e-4)
