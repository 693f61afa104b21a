"""AWQ on toys: injected outlier channels, scale candidates, clip search, replay preserves function."""

import pytest
import torch
from torch import nn

from conftest import tiny_models
from quantcli.algos.awq import AWQ, AWQParams, candidate_scales, fake_quant, input_gram, search_clip, search_scale, weight_magnitude
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


def _toy_group():
    layer = nn.Module()
    layer.block = NormLinear()  # the inspected module: the group's whole output
    return layer, ScalingGroup("toy", "block.norm", ("block.a", "block.b"), "block")


def test_scale_search_picks_the_best_candidate_and_protects_the_outlier_channels():
    """The search's CHOICE: the returned scale is the candidate (s = 1 or a grid point) with the lowest
    exact objective ‖Q(W·s)(x/s) − W·x‖², computed here independently, and the four injected
    outlier input channels get the four largest scales."""
    torch.manual_seed(0)
    layer, group = _toy_group()
    x = outlier_inputs()
    spec, params = QuantSpec(wbits=3, group=32), AWQParams()
    s, awq_loss, rtn_loss = search_scale(layer, group, ["block.a", "block.b"], x, {}, spec, params, "cpu", 4096)
    assert set(s.topk(4).indices.tolist()) == {0, 1, 2, 3}

    weights = [layer.block.a.weight.detach(), layer.block.b.weight.detach()]
    target = x @ (weights[0] + weights[1]).T

    def objective(c: torch.Tensor) -> float:
        out = sum((x / c) @ fake_quant(w * c, spec).T for w in weights)
        return torch.mean((out - target) ** 2).item()

    x_mean, w_mean = x.abs().mean(dim=0), weight_magnitude(weights, spec)
    candidates = [torch.ones(64)] + [candidate_scales(x_mean, w_mean, i / params.n_grid) for i in range(params.n_grid)]
    losses = [objective(c) for c in candidates]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert best > 0 and losses[best] < 0.8 * losses[0]  # the outliers give AWQ real room over s = 1
    assert torch.allclose(s, candidates[best]) and awq_loss == pytest.approx(losses[best], rel=1e-4)
    assert rtn_loss == pytest.approx(losses[0], rel=1e-4)


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


def exact_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, params: AWQParams = AWQParams()) -> torch.Tensor:
    """Reference: per (row, group) the grid ratio minimising ‖(Q_r(w_g) − w_g)·x_gᵀ‖² over EVERY token,
    computed from the tokens themselves in float64 (no Gram matrix); ties keep the larger ratio."""
    g, n_groups = spec.group, w.shape[1] // spec.group
    best_r = torch.ones(w.shape[0], n_groups)
    best = torch.full((w.shape[0], n_groups), float("inf"), dtype=torch.float64)
    for i in range(int(params.max_shrink * params.n_grid) + 1):
        r = 1 - i / params.n_grid
        d = (fake_quant(w, spec, clip=torch.full_like(best_r, r)) - w).double()
        for j in range(n_groups):
            cols = slice(j * g, (j + 1) * g)
            err = ((d[:, cols] @ x[:, cols].double().T) ** 2).sum(dim=1)
            better = err < best[:, j]
            best[:, j] = torch.where(better, err, best[:, j])
            best_r[:, j] = torch.where(better, torch.tensor(r), best_r[:, j])
    return best_r


def test_clip_search_finds_the_exact_optimum_and_clips_an_outlier_weight():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[0, 3] = 12.0  # an outlier weight makes clipping its group pay
    x = torch.randn(4096, 64)
    spec = QuantSpec(wbits=3, group=32)
    r = search_clip(w, input_gram(x), spec, AWQParams())
    assert r.shape == (16, 2)
    assert torch.equal(r, exact_clip(w, x, spec))
    assert r[0, 0] < 1  # the outlier's group is clipped


def test_clip_search_counts_a_rare_token_with_a_huge_activation():
    """One token in 4096 has a huge channel 3 (an attention sink). The search must match the exact
    objective over every token, which keeps the outlier weight on that channel unclipped, while the
    other groups are still clipped (the whole-linear fallback did not reset everything to 1). A
    search on a 512-token sample (every 8th token, as AutoAWQ samples) misses the sink and
    chooses differently: the construction check at the end."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[0, 3] = 12.0
    x = torch.randn(4096, 64)
    x[1234, 3] = 2000.0
    spec = QuantSpec(wbits=3, group=32)
    r = search_clip(w, input_gram(x), spec, AWQParams())
    assert torch.equal(r, exact_clip(w, x, spec))
    assert r[0, 0] == 1 and (r[:, 1] < 1).sum() >= 8
    sampled = search_clip(w, input_gram(x[::8]), spec, AWQParams())
    assert sampled[0, 0] < 1 and (sampled != r).sum() >= 8


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
    assert any("attn_out" in s for s in result.layers[0]["fallbacks"])
    artifact = write_artifact(
        tmp_path / "awq", Manifest(kind="awq", base_model=BaseModelRef("x", "h", arch)), {"awq.safetensors": result.saved}
    )
    fresh = canonicalize(factory())
    before = fresh(ids).logits
    replay_lineage(fresh, [StageReplay.of(artifact)], {})
    assert torch.allclose(fresh(ids).logits, before, atol=1e-4, rtol=1e-4)


def test_cli_awq_searches_in_float32_unless_asked(tiny_model_dir, tmp_path):
    """Defect 9: the bfloat16 search cost perplexity on text it was not tuned on, so the default (of the
    params AND of the CLI flag, which had drifted apart before) is float32; ``auto`` stays available."""
    import json

    from typer.testing import CliRunner

    from quantcli.cli.app import app

    assert AWQParams().search_dtype == "float32"
    common = ["--w4", "--group", "32", "--dataset", str(tiny_model_dir.parent / "text.txt"), "--nsamples", "2", "--seqlen", "16",
              "--n-grid", "2", "--no-clip", "--device", "cpu", "-q"]
    for extra, expect in (([], "float32"), (["--search-dtype", "auto"], "auto")):
        out = tmp_path / f"awq-{expect}"
        res = CliRunner().invoke(app, ["awq", str(tiny_model_dir), *common, *extra, "-o", str(out)])
        assert res.exit_code == 0, res.output
        assert json.loads((out / "manifest.json").read_text())["params"]["search_dtype"] == expect
