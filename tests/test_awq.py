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
    params AND of the CLI flag, which had drifted apart before) is float32; ``mixed`` (float32 decides
    after a bfloat16 screen) and ``auto`` are explicit choices."""
    import json

    from typer.testing import CliRunner

    from quantcli.cli.app import app

    assert AWQParams().search_dtype == "float32"
    common = ["--w4", "--group", "32", "--dataset", str(tiny_model_dir.parent / "text.txt"), "--nsamples", "2", "--seqlen", "16",
              "--n-grid", "2", "--no-clip", "--device", "cpu", "-q"]
    for extra, expect in (([], "float32"), (["--search-dtype", "mixed"], "mixed"), (["--search-dtype", "auto"], "auto")):
        out = tmp_path / f"awq-{expect}"
        res = CliRunner().invoke(app, ["awq", str(tiny_model_dir), *common, *extra, "-o", str(out)])
        assert res.exit_code == 0, res.output
        assert json.loads((out / "manifest.json").read_text())["params"]["search_dtype"] == expect


def test_observed_inputs_and_targets_equal_separately_captured_ones():
    """What ``AWQ.observe`` records during the driver's targets forward equals what a forward of
    its own captures (each group's first-linear input, concatenated in sample order) and what the
    search computed as its target (the inspected module over that input), for every group, also
    after the earlier groups' scales are folded (folding keeps the function). Catches a hook on
    the wrong module or side (pre/post), outputs shared between modules that did not return the
    same tensor, batches concatenated out of order, or targets that no longer hold after a fold."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantcli.algos.awq import run_inspect
    from quantcli.algos.driver import LayerResult
    from quantcli.algos.scaling import fold_scales
    from quantcli.models.arch import arch_spec, resolve_groups

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         vocab_size=128, max_position_embeddings=256)  # no GQA: v→o is a group too
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (4, 16))
    seen_by_layer = {}

    class Spy(AWQ):
        def run_layer(self, ctx):
            seen_by_layer[ctx.index] = (ctx.seen, ctx.inputs.clone(), dict(ctx.kwargs))
            return LayerResult()

    run_blockwise(model, ids, Spy(), QuantSpec(4, 32), torch.device("cpu"), batch=3)  # 3 ∤ 4: uneven batches
    layer = model.model.layers[1]
    seen, inputs, _ = seen_by_layer[1]

    feats, attn_kwargs = {}, {}

    def hook(name):
        def fn(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            feats.setdefault(name, []).append(x.reshape(-1, x.shape[-1]))
            if name == "self_attn":
                attn_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        return fn

    groups = resolve_groups(layer, arch_spec(model))
    handles = [layer.get_submodule(g.linears[0]).register_forward_pre_hook(hook(g.linears[0]), with_kwargs=True) for g in groups]
    handles.append(layer.self_attn.register_forward_pre_hook(hook("self_attn"), with_kwargs=True))
    with torch.no_grad():
        for i in range(0, 4, 3):
            layer(inputs[i : i + 3], **seen_by_layer[1][2])
    for h in handles:
        h.remove()
    assert len(groups) == 4
    torch.manual_seed(2)
    for group in groups:
        x = torch.cat(feats[group.linears[0]])
        assert torch.allclose(seen["inputs"][group.linears[0]], x, atol=1e-6)
        inspect = layer.get_submodule(group.inspect)
        module_input = x if isinstance(inspect, nn.Linear) else x.view(4, 16, -1)
        kwargs = seen["attn_kwargs"] if group.inspect == "self_attn" else {}
        target = run_inspect(inspect, module_input, kwargs, "cpu", 3)
        assert torch.allclose(seen["outputs"][group.inspect].reshape(target.shape), target, atol=1e-5), group.name
        s = torch.rand(x.shape[-1]) + 0.5  # fold like the search does; later consumers see x / s
        fold_scales(layer, group, s)
        for other in groups:
            if other.linears[0] in group.linears:
                feats[other.linears[0]] = [f / s for f in feats[other.linears[0]]]


def test_mixed_search_lets_float32_overrule_the_screen():
    """``mixed``: the low-precision screen only shortlists; float32 decides. On a toy where the
    float32 argmin is grid point 7, a screen whose own best is grid point 3 (its losses are
    replaced here by a ranking that puts 3 first and 7 second) still returns point 7 with
    ``finalists=2``; with ``finalists=1`` the screen's choice is all that is left. Catches a
    search that trusts the screen's argmin, or reports screen losses instead of float32 ones."""
    from quantcli.algos import awq

    torch.manual_seed(0)
    layer, group = _toy_group()
    x = outlier_inputs()
    spec = QuantSpec(wbits=3, group=32)
    params = AWQParams(n_grid=10, search_dtype="float32")
    s32, loss32, rtn32 = search_scale(layer, group, ["block.a", "block.b"], x, {}, spec, params, "cpu", 4096)
    weights = [layer.block.a.weight.detach(), layer.block.b.weight.detach()]
    x_mean, w_mean = x.abs().mean(dim=0), weight_magnitude(weights, spec)
    grid = [candidate_scales(x_mean, w_mean, i / 10) for i in range(10)]
    best = next(i for i, c in enumerate(grid) if torch.equal(c, s32))
    decoy = (best + 4) % 10
    ranking = [decoy, best] + [i for i in range(10) if i not in (decoy, best)]
    calls = []
    real = awq.run_inspect

    def fake_screen(module, xx, kwargs, device, batch, dtype=torch.float32):
        out = real(module, xx, kwargs, device, batch, torch.float32)
        if dtype == torch.float32:
            return out
        calls.append(len(calls))  # call 0: the screen's target; then one per grid point
        if len(calls) == 1:
            return out * 0
        return torch.full_like(out, float(ranking.index(len(calls) - 2) + 1))  # screen loss ∝ rank

    original = awq.resolve_compute_dtype
    awq.run_inspect, awq.resolve_compute_dtype = fake_screen, lambda name, device: torch.bfloat16 if name == "auto" else original(name, device)
    try:
        s2, loss2, rtn2 = search_scale(layer, group, ["block.a", "block.b"], x, {}, spec, AWQParams(n_grid=10, search_dtype="mixed", finalists=2), "cpu", 4096)
        calls.clear()
        s1, _, _ = search_scale(layer, group, ["block.a", "block.b"], x, {}, spec, AWQParams(n_grid=10, search_dtype="mixed", finalists=1), "cpu", 4096)
    finally:
        awq.run_inspect, awq.resolve_compute_dtype = real, original
    assert best > 0 and torch.equal(s2, s32) and loss2 == pytest.approx(loss32) and rtn2 == pytest.approx(rtn32)
    assert torch.equal(s1, grid[decoy]) or torch.equal(s1, torch.ones_like(s1))  # the float32 decision is what found point `best`
