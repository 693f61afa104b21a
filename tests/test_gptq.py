"""GPTQ: the math on tiny linears, the fallbacks, MoE routing, and the command on a tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantcli.algos.gptq import (
    GPTQ,
    GPTQParams,
    accumulate_hessian,
    damp_and_factor,
    gptq_quantize,
    hessian_error,
    make_hessian,
    rtn_error_estimate,
)
from quantcli.quant import QuantSpec, compute_qparams, quantize_weight

torch.set_num_threads(1)

SPEC = QuantSpec(wbits=4, group=32)


@pytest.fixture(scope="module")
def problem():
    """W [64, 128] and correlated inputs X [512, 128] with uneven channel energy, and H = (2/n) XᵀX."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=gen)
    mix = torch.eye(128) + 2 * torch.randn(128, 128, generator=gen) / 128**0.5
    X = (torch.randn(512, 128, generator=gen) @ mix) * torch.linspace(0.1, 3.0, 128)
    H = make_hessian(128)
    count = 0
    for batch in X.split(100):  # uneven batches: the running average must not care
        count = accumulate_hessian(H, batch, count)
    return W, X, H


def output_error(W, Q, X) -> float:
    return float(((W - Q) @ X.T).pow(2).sum())


def test_hessian_is_the_running_average(problem):
    _, X, H = problem
    torch.testing.assert_close(H, 2 / X.shape[0] * X.T @ X, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, True), (True, False)])
def test_gptq_beats_rtn_on_the_calibration_inputs(problem, act_order, static_groups):
    W, X, H = problem
    out = gptq_quantize(W, H, SPEC, GPTQParams(act_order=act_order, static_groups=static_groups, block_size=48))
    rtn = output_error(W, quantize_weight(W, SPEC).dequantize(), X)
    gptq = output_error(W, out.weight.dequantize(), X)
    assert out.fallback is None and out.damp == 0.01
    assert gptq < 0.9 * rtn
    assert out.err == pytest.approx(gptq * 2 / X.shape[0], rel=1e-3)  # err = tr((W-Q)H(W-Q)ᵀ)


@pytest.mark.parametrize("seed", range(4))
def test_rtn_error_estimate_tracks_the_exact_error(seed):
    """Rows of very different scales (log-normal) and row-varying clips: the 512-row estimate is
    within 3 % of the exact tr(D H Dᵀ) (measured ≤ 1 %). Catches a sample not scaled to all rows
    (8× off), a plain out/rows scaling without the per-row diagonal ratio (off by more than
    3 % at two of the four seeds), clips not subset with the rows, and any drift from H's off-diagonal part."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(4096, 64, generator=gen) * torch.exp(0.5 * torch.randn(4096, 1, generator=gen))
    mix = torch.eye(64) + 2 * torch.randn(64, 64, generator=gen) / 8
    X = (torch.randn(1024, 64, generator=gen) @ mix) * torch.linspace(0.1, 3.0, 64)
    H = make_hessian(64)
    accumulate_hessian(H, X, 0)
    clip = 0.7 + 0.3 * torch.rand(4096, 2, generator=gen)
    exact = hessian_error(W, quantize_weight(W, SPEC, clip).dequantize(), H)
    assert rtn_error_estimate(W, H, SPEC, clip) == pytest.approx(exact, rel=0.03)
    small = W[:300]  # no more rows than the sample: exact
    assert rtn_error_estimate(small, H, SPEC, clip[:300]) == pytest.approx(hessian_error(small, quantize_weight(small, SPEC, clip[:300]).dequantize(), H), rel=1e-6)


def test_block_size_does_not_change_the_result(problem):
    W, _, H = problem
    a = gptq_quantize(W, H, SPEC, GPTQParams(block_size=128)).weight
    b = gptq_quantize(W, H, SPEC, GPTQParams(block_size=16)).weight
    assert (a.codes != b.codes).float().mean() < 0.01  # float summation order only


def _textbook_gptq(W, H, spec, damp=0.01):
    """GPTQ as the paper writes it, in float64, no lazy blocks, natural order, static groups:
    round column i, then W[:, j] -= e_i · U[i, j] / U[i, i] for every later column j."""
    W = W.double().clone()
    Hd = H.double() + damp * H.diagonal().double().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    scale, zero = compute_qparams(W.float(), spec.wbits, spec.group, spec.sym)
    codes = torch.empty(W.shape, dtype=torch.long)
    for i in range(W.shape[1]):
        s, z = scale[:, i // spec.group].double(), zero[:, i // spec.group].double()
        q = torch.clamp(torch.round(W[:, i] / s) + z, 0, 2**spec.wbits - 1)
        codes[:, i] = q.long()
        e = (W[:, i] - (q - z) * s) / U[i, i]
        W[:, i + 1 :] -= torch.outer(e, U[i, i + 1 :])
    return codes


@pytest.mark.parametrize("block_size", [128, 96, 16])
def test_column_loop_matches_the_textbook_algorithm(problem, block_size):
    """The blocked, transposed column loop (sub-blocks of INNER_BLOCK inside lazy blocks) makes the
    codes of the plain per-column algorithm in float64. Catches a correction applied to the wrong
    columns (a transposed U, a skipped sub-block or block update, an off-by-one at a sub-block
    edge): each of those changes far more than 1 % of the codes."""
    W, _, H = problem
    ours = gptq_quantize(W, H, SPEC, GPTQParams(act_order=False, block_size=block_size)).weight
    assert (ours.codes.long() != _textbook_gptq(W, H, SPEC)).float().mean() < 0.01


def test_identity_hessian_gives_rtn(problem):
    W, _, _ = problem
    rtn = quantize_weight(W, SPEC)
    out = gptq_quantize(W, torch.eye(128), SPEC, GPTQParams())
    assert torch.equal(out.weight.codes, rtn.codes)
    assert torch.equal(out.weight.scale, rtn.scale) and torch.equal(out.weight.zero, rtn.zero)
    clip = torch.full((64, 4), 0.7)
    clipped = gptq_quantize(W, torch.eye(128), SPEC, GPTQParams(), clip=clip).weight
    assert torch.equal(clipped.codes, quantize_weight(W, SPEC, clip).codes)


def test_act_order_static_groups_keeps_contiguous_groups(problem):
    W, _, H = problem
    out = gptq_quantize(W, H, SPEC, GPTQParams(act_order=True, static_groups=True))
    scale, zero = compute_qparams(W, SPEC.wbits, SPEC.group, SPEC.sym)
    assert out.weight.g_idx is None
    assert torch.equal(out.weight.scale, scale) and torch.equal(out.weight.zero, zero)


def test_act_order_without_static_groups_writes_g_idx(problem):
    W, X, H = problem
    out = gptq_quantize(W, H, SPEC, GPTQParams(act_order=True, static_groups=False))
    g_idx = out.weight.g_idx
    assert g_idx is not None and g_idx.dtype == torch.int32 and g_idx.shape == (128,)
    assert torch.equal(torch.bincount(g_idx.long()), torch.full((4,), 32))
    order = torch.argsort(H.diagonal(), descending=True)  # the first visited columns form group 0
    assert torch.equal(g_idx[order[:32]], torch.zeros(32, dtype=torch.int32))
    Q = out.weight.dequantize()
    assert hessian_error(W, Q, H) == pytest.approx(out.err)
    assert output_error(W, Q, X) < output_error(W, quantize_weight(W, SPEC).dequantize(), X)
    ignored = type(out.weight)(out.weight.codes, out.weight.scale, out.weight.zero, 32)  # g_idx dropped
    assert output_error(W, ignored.dequantize(), X) > 2 * output_error(W, Q, X)


def test_dead_columns_are_rounded_to_nearest(problem):
    W, _, H = problem
    H = H.clone()
    H[:, 5] = 0
    H[5, :] = 0
    out = gptq_quantize(W, H, SPEC, GPTQParams())
    assert out.fallback is None and torch.isfinite(out.weight.dequantize()).all()


def test_indefinite_hessian_retries_with_more_damping():
    n = 64
    H = torch.eye(n) + 2 * (torch.ones(n, n) - torch.eye(n))  # smallest eigenvalue -1, mean diagonal 1
    R, damp = damp_and_factor(H, 0.01)
    assert R is not None and damp == pytest.approx(10.0)
    out = gptq_quantize(torch.randn(8, n), H, SPEC, GPTQParams())
    assert out.fallback is None and out.damp == pytest.approx(10.0)


@pytest.mark.parametrize(
    "H,reason",
    [
        (torch.zeros(128, 128), "zero"),
        (-torch.eye(128), "negative"),
        (torch.full((128, 128), float("nan")), "non-finite"),
        (torch.eye(128) - 100 * (torch.ones(128, 128) - torch.eye(128)), "Cholesky"),
    ],
)
def test_unusable_hessian_falls_back_to_rtn_with_a_reason(problem, H, reason):
    W, _, _ = problem
    out = gptq_quantize(W, H, SPEC, GPTQParams())
    assert out.fallback is not None and reason in out.fallback and out.damp is None
    assert torch.equal(out.weight.codes, quantize_weight(W, SPEC).codes)


def test_bad_params_are_one_line_errors():
    from quantcli.errors import SpecError

    with pytest.raises(SpecError, match="--damp"):
        GPTQParams(damp=0)


def _tiny_mixtral(layers: int):
    """A canonical random Mixtral (hidden 64, 4 experts, top-2), seeded."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from quantcli.models.canonical import canonicalize

    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    config.architectures = ["MixtralForCausalLM"]
    return canonicalize(MixtralForCausalLM(config).eval())


def test_moe_experts_see_their_routed_tokens_and_rare_ones_fall_back():
    from quantcli.algos.driver import run_blockwise

    model = _tiny_mixtral(1)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    tokens = ids.numel()  # dense linears see every token; an expert only the ones routed to it
    result = run_blockwise(model, ids, GPTQ(GPTQParams(min_expert_tokens=tokens)), SPEC, torch.device("cpu"))
    assert len(result.quantized) == 4 + 4 * 3
    fallbacks = result.layers[0]["fallbacks"]
    assert fallbacks and all(note.startswith("mlp.experts.") for note in fallbacks)
    assert all("calibration tokens" in note for note in fallbacks)
    assert result.layers[0]["gptq_err"] <= result.layers[0]["rtn_err"]


def test_gptq_command_on_a_tiny_llama(tiny_model_dir, tmp_path):
    from quantcli.artifact import open_artifact
    from quantcli.cli.app import app
    from quantcli.models.weights import read_quantized

    text = tiny_model_dir.parent / "text.txt"
    common = ["--w4", "--group", "32", "--nsamples", "4", "--seqlen", "32", "--dataset", str(text), "--device", "cpu"]
    expected = {
        f"model.layers.{i}.{name}"
        for i in range(2)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    runner = CliRunner()

    out = tmp_path / "out"
    result = runner.invoke(app, ["gptq", str(tiny_model_dir), *common, "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip()).resolve() == out.resolve()  # stdout: only the artifact path
    artifact = open_artifact(out)
    assert artifact.kind == "gptq"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["true_sequential"] is True
    layers = manifest["metrics"]["layers"]
    assert all(0 <= m["gptq_err"] <= m["rtn_err"] for m in layers)
    weights = read_quantized(artifact)
    assert set(weights) == expected
    assert all(w.g_idx is None for w in weights.values())

    out2 = tmp_path / "out-act-order"
    result = runner.invoke(app, ["gptq", str(tiny_model_dir), *common, "--act-order", "--no-static-groups", "--no-true-sequential", "-q", "-o", str(out2)])
    assert result.exit_code == 0, result.output
    weights = read_quantized(open_artifact(out2))
    assert set(weights) == expected and all(w.g_idx is not None for w in weights.values())


def test_capture_stops_early_but_sees_every_input():
    from quantcli.algos.driver import LayerContext
    from quantcli.algos.gptq import capture_hessians
    from quantcli.calib.capture import capture_layer_inputs
    from quantcli.models.arch import arch_spec

    from conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture_layer_inputs(model, model.model.layers, ids, batch=5)
    layer = model.model.layers[0]
    ctx = LayerContext(0, "model.layers.0", layer, inputs, None, kwargs[0], torch.device("cpu"), SPEC, arch_spec(model), batch=2)
    seen: dict[str, list] = {}
    hooks = [
        layer.get_submodule(name).register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, []).append(args[0]))
        for stage in ctx.linears() for name in stage
    ]
    ctx.forward()
    for h in hooks:
        h.remove()
    for stage in ctx.linears():
        groups = capture_hessians(ctx, stage)
        assert sorted(name for g in groups for name in g.names) == sorted(stage)
        for group in groups:
            for name in group.names:
                x = torch.cat(seen[name]).reshape(-1, group.H.shape[0])
                assert group.count == x.shape[0] == 80
                torch.testing.assert_close(group.H, 2 / group.count * x.T @ x, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- speed levers: exact, or bounded


def _old_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float]:
    """The factorisation GPTQ used before: cholesky, cholesky_inverse, cholesky again (the reference)."""
    H = H.clone()
    diag = H.diagonal()
    diag[diag == 0] = 1.0
    mean = diag.mean()
    for attempt in range(4):
        rel = damp * 10**attempt
        L, info = torch.linalg.cholesky_ex(H + rel * mean * torch.eye(H.shape[0]))
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return U, rel
    return None, rel


def test_reversed_cholesky_factor_is_the_inverse_of_the_old_one(problem):
    # catches: a wrong reversal (lower instead of upper, L instead of J L J, whose inverse is not
    # the old factor), lost dead-column or damping handling
    _, _, H = problem
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(3000, 1100, generator=gen) * torch.linspace(0.1, 3.0, 1100)
    big = 2 / 3000 * X.T @ X
    big[:, 7] = big[7, :] = 0  # a dead column
    n = 64
    retry = 1.03 * torch.ones(n, n) - 0.03 * torch.eye(n)  # smallest eigenvalue −0.03: fails at 0.01, factors at 0.1
    for matrix, damp in [(H, 0.01), (big, 0.01), (retry, 0.1)]:
        R, used = damp_and_factor(matrix, 0.01)
        U_old, used_old = _old_factor(matrix, 0.01)
        assert used == used_old == pytest.approx(damp)
        assert torch.equal(R, R.triu())
        U = torch.linalg.solve_triangular(R.double(), torch.eye(R.shape[0], dtype=torch.float64), upper=True).float()
        torch.testing.assert_close(U, U_old, rtol=1e-4, atol=1e-4 * float(U_old.abs().max()))
        # the visiting order is gathered inside: the same factor as for the permuted matrix
        # (catches the inverse permutation, or the reversal applied before the permutation)
        perm = torch.randperm(matrix.shape[0], generator=gen)
        R_perm, used_perm = damp_and_factor(matrix, 0.01, perm)
        R_ref, used_ref = damp_and_factor(matrix[perm][:, perm], 0.01)
        assert used_perm == used_ref and torch.equal(R_perm, R_ref)


def _tiny_layer_ctx(batch: int = 2):
    from quantcli.algos.driver import ActivationStore, Boundary, LayerContext
    from quantcli.calib.capture import capture_layer_inputs
    from quantcli.models.arch import arch_spec

    from conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture_layer_inputs(model, model.model.layers, ids, batch=5)
    layer = model.model.layers[0]
    ctx = LayerContext(0, "model.layers.0", layer, inputs, None, kwargs[0], torch.device("cpu"), SPEC, arch_spec(model), batch=batch)
    return model, ctx, Boundary(0, inputs), ActivationStore()


def _inputs_of(layer, names, run) -> dict[str, torch.Tensor]:
    """Every input each named linear receives while ``run()`` runs, as ``[tokens, in]``."""
    seen: dict[str, list] = {name: [] for name in names}
    hooks = [layer.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1]).float())) for n in names]
    run()
    for h in hooks:
        h.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}


def test_shared_hessian_gives_the_codes_of_per_linear_hessians():
    # catches: rows of the stacked q/k/v (gate/up) handed to the wrong linear, one linear's Hessian
    # used for another input, a stage captured before the earlier one was written back, and
    # the observed stage-1 Hessian counted twice (k and v folding it again)
    from quantcli.algos.driver import layer_step

    model, ctx, boundary, acts = _tiny_layer_ctx()
    layer = ctx.module
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    result, _, _, _ = layer_step(GPTQ(), layer, boundary, ctx.kwargs, SPEC, ctx.arch, ctx.device, ctx.batch, acts, {})
    layer.load_state_dict(original)

    for stage in ctx.linears():  # the reference: each linear its own Hessian, stage after stage
        xs = _inputs_of(layer, stage, lambda: ctx.forward())
        for name in stage:
            x = xs[name]
            H = 2 / x.shape[0] * x.T @ x
            ref = gptq_quantize(layer.get_submodule(name).weight.data, H, SPEC, GPTQParams())
            assert torch.equal(result.quantized[name].codes, ref.weight.codes), name
            assert torch.equal(result.quantized[name].scale, ref.weight.scale), name
        for name in stage:
            layer.get_submodule(name).weight.data.copy_(result.quantized[name].dequantize())
    assert set(result.quantized) == {n for stage in ctx.linears() for n in stage}


@pytest.mark.parametrize("offload", [False, True])
def test_captures_replay_the_quantized_stages_instead_of_recomputing(offload, tmp_path, monkeypatch):
    # catches: captures that recompute the earlier stages anyway (the call counts), and a replay
    # that returns stale or foreign outputs (full-precision ones recorded before the codes were
    # written, another mini-batch's: 5 samples in mini-batches of 2, the last one short), which
    # change the codes against the recomputing reference of the test above
    import torch.nn.functional as F

    from quantcli.algos.driver import ActivationStore, layer_step

    model, ctx, boundary, _ = _tiny_layer_ctx()
    layer = ctx.module
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    acts = ActivationStore(tmp_path if offload else None)
    computed: dict[int, int] = {}
    linear = F.linear

    def counting(x, weight, bias=None):
        computed[id(weight)] = computed.get(id(weight), 0) + 1
        return linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", counting)
    result, _, _, _ = layer_step(GPTQ(), layer, boundary, ctx.kwargs, SPEC, ctx.arch, ctx.device, ctx.batch, acts, {})
    monkeypatch.undo()
    batches = 3
    runs = {name: computed.get(id(layer.get_submodule(name).weight), 0) for stage in ctx.linears() for name in stage}
    # per mini-batch: the targets and the propagation forward run every linear; the captures run
    # each stage once after it was quantized (q/k/v in o_proj's capture, o_proj in gate/up's,
    # gate/up in down_proj's) and replay it later; a stage's own capture never computes it
    # (without that, gate_proj would run before up_proj's input ends the capture)
    b = batches
    assert runs == {"self_attn.q_proj": 3 * b, "self_attn.k_proj": 3 * b, "self_attn.v_proj": 3 * b,
                    "self_attn.o_proj": 3 * b, "mlp.gate_proj": 3 * b, "mlp.up_proj": 3 * b, "mlp.down_proj": 2 * b}, runs

    layer.load_state_dict(original)
    for stage in ctx.linears():  # the reference: every capture recomputes the whole layer up to the stage
        xs = _inputs_of(layer, stage, lambda: ctx.forward())
        for name in stage:
            H = 2 / xs[name].shape[0] * xs[name].T @ xs[name]
            ref = gptq_quantize(layer.get_submodule(name).weight.data, H, SPEC, GPTQParams())
            assert torch.equal(result.quantized[name].codes, ref.weight.codes), name
        for name in stage:
            layer.get_submodule(name).weight.data.copy_(result.quantized[name].dequantize())


def test_observed_stage1_hessian_equals_a_captured_one():
    # catches: observe recording another linear's input (o_proj, the MLP), folding q/k/v's input
    # three times, or missing mini-batches of the targets forward
    from quantcli.algos.gptq import capture_hessians

    _, ctx, _, _ = _tiny_layer_ctx()
    with GPTQ().observe(ctx.module) as seen:
        ctx.forward()
    observed = seen["hessian"]
    (captured,) = capture_hessians(ctx, ctx.linears()[0])
    assert sorted(observed.names) == sorted(captured.names) == sorted(ctx.linears()[0])
    assert observed.count == captured.count == 80
    torch.testing.assert_close(observed.H, captured.H, rtol=1e-6, atol=1e-7)


def test_bfloat16_capture_stays_near_float32_and_propagation_stays_float32():
    # catches: Hessians accumulated in bfloat16 (or from a layer left in bfloat16), a capture dtype
    # that is ignored, and autocast leaking into the propagated stream (which must stay exact)
    from quantcli.algos.driver import layer_forward, layer_step
    from quantcli.algos.gptq import capture_hessians

    _, ctx, boundary, acts = _tiny_layer_ctx()
    for stage in ctx.linears():
        for exact, low in zip(capture_hessians(ctx, stage), capture_hessians(ctx, stage, torch.bfloat16)):
            assert exact.names == low.names and low.H.dtype == torch.float32
            rel = float((low.H - exact.H).norm() / exact.H.norm())
            assert rel < 2e-2, (stage, rel)  # bfloat16 keeps 8 bits: ~0.4 % per input, less once averaged
            if stage != ctx.linears()[0]:
                assert rel > 0  # the forward did run in bfloat16
    layer = ctx.module
    _, nxt, _, _ = layer_step(GPTQ(GPTQParams(capture_dtype="bfloat16")), layer, boundary, ctx.kwargs, SPEC, ctx.arch, ctx.device, ctx.batch, acts, {})
    assert nxt.inputs.dtype == torch.float32
    torch.testing.assert_close(nxt.inputs, layer_forward(layer, boundary.inputs, ctx.kwargs, ctx.device, ctx.batch), rtol=0, atol=0)


def test_capture_dtype_is_checked_and_recorded():
    from quantcli.errors import SpecError

    with pytest.raises(SpecError, match="--capture-dtype"):
        GPTQParams(capture_dtype="int8")


def test_replayed_captures_give_a_moe_layer_the_codes_of_recomputing_ones(monkeypatch):
    # catches: a replay or a skipped output that changes what a routed MoE layer's later stages
    # see (a router fed a replayed tensor of the wrong mini-batch, experts' outputs replayed
    # although each mini-batch routes other tokens to them): the codes must equal those of
    # captures that recompute everything
    from quantcli.algos import gptq as gptq_module
    from quantcli.algos.driver import run_blockwise

    def run():
        model = _tiny_mixtral(2)
        ids = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
        return run_blockwise(model, ids, GPTQ(GPTQParams(min_expert_tokens=1)), SPEC, torch.device("cpu"), batch=2).quantized

    replayed = run()
    monkeypatch.setattr(gptq_module.OutputReplay, "commit", lambda self, batches: None)  # nothing is ever replayed
    monkeypatch.setattr(gptq_module, "_zeros_out", lambda linear: linear.__class__.forward.__get__(linear))  # outputs computed
    recomputed = run()
    assert replayed.keys() == recomputed.keys() and len(replayed) == 2 * (4 + 4 * 3)
    for name in replayed:
        assert torch.equal(replayed[name].codes, recomputed[name].codes), name
