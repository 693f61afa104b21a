"""OmniQuant: LWC/LET math, training lowers the block loss, the transform preserves the function,
an artifact replays to its base model's function, --init-from refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_TEXT, char_tokenizer, tiny_llama, tiny_models
from quantcli.algos.driver import LayerContext, layer_forward
from quantcli.algos.omniquant import OmniQuant, OmniQuantParams
from quantcli.algos.omniquant.let import fold_let, saved_scales, transformed_params
from quantcli.algos.omniquant.lwc import clip_logit, lwc_fake_quant, lwc_init, lwc_quantize
from quantcli.algos.omniquant.train import Learnables, block_params
from quantcli.algos.scaling import can_fold
from quantcli.artifact import Manifest, write_artifact
from quantcli.calib.capture import capture_layer_inputs
from quantcli.models.arch import arch_spec, decoder_layers, resolve_groups
from quantcli.models.canonical import canonicalize
from quantcli.quant import QuantSpec, quantize_weight


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is several times faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_llama(seed: int = 0):
    """The shared tiny Llama (4 heads / 2 KV heads) with a few outlier norm channels, as real LLMs have."""
    model = tiny_llama(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 8.0
            layer.post_attention_layernorm.weight[[5]] = 6.0
    return model


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    """Folder holding ``model/`` (tiny Llama + char tokenizer) and ``text.txt``; artifacts go beside them."""
    return tiny_model_dir.parent


def _layer_ctx(model, index: int, spec: QuantSpec, n: int = 4, length: int = 16, seed: int = 0) -> LayerContext:
    """A driver-like context for one layer: random token inputs through the model up to that layer."""
    arch = arch_spec(model)
    layers = decoder_layers(model, arch)
    ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))
    inputs, kwargs = capture_layer_inputs(model, layers, ids, batch=n)
    for i in range(index):
        inputs = layer_forward(layers[i], inputs, kwargs[i], torch.device("cpu"), n)
    layer = layers[index]
    targets = layer_forward(layer, inputs, kwargs[index], torch.device("cpu"), n)
    return LayerContext(index, f"model.layers.{index}", layer, inputs, targets, kwargs[index], torch.device("cpu"), spec, arch, n)


# --------------------------------------------------------------------------- math


def test_clip_logit_of_one_is_finite_and_round_trips():
    a = clip_logit(torch.tensor([1.0, 0.5, 0.9, 0.0]))
    assert torch.isfinite(a).all()
    assert torch.allclose(torch.sigmoid(a), torch.tensor([1 - 1e-4, 0.5, 0.9, 1e-4]), atol=1e-6)


@pytest.mark.parametrize("sym", [False, True])
def test_lwc_matches_compute_qparams_and_has_gradient(sym):
    spec = QuantSpec(wbits=3, group=16, sym=sym)
    w = torch.randn(8, 64)
    r = torch.full((8, 4), 0.9)
    a_hi, a_lo = lwc_init(w, spec, clip=r)
    assert (a_lo is None) == sym
    ref = quantize_weight(w, spec, clip=r)
    got = lwc_quantize(w, a_hi, a_lo, spec)
    assert torch.equal(got.codes, ref.codes) and torch.allclose(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)
    for a in (a_hi, a_lo):
        if a is not None:
            a.requires_grad_(True)
    fq = lwc_fake_quant(w, a_hi, a_lo, spec)
    assert torch.allclose(fq, ref.dequantize(), atol=1e-6)
    fq.sub(w).pow(2).sum().backward()
    assert a_hi.grad is not None and a_hi.grad.abs().sum() > 0
    if not sym:  # the lower end trains on its own factor
        assert a_lo.grad is not None and a_lo.grad.abs().sum() > 0 and not torch.allclose(a_lo.grad, a_hi.grad)


def test_lwc_default_init_is_the_paper_value():
    a_hi, a_lo = lwc_init(torch.randn(4, 32), QuantSpec(wbits=4, group=16))
    assert torch.all(a_hi == 4.0) and torch.all(a_lo == 4.0) and a_hi.shape == (4, 2)


def _random_scales(layer, groups, seed=3, lo=0.25, width=4.0):
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(layer.get_submodule(g.prev).weight.shape[0], generator=gen) * width + lo for g in groups}


def _out(x):
    return x[0] if isinstance(x, tuple) else x


def test_let_transform_preserves_the_function():
    """Random positive scales on every foldable group (v→o under GQA included) leave the layer's output
    unchanged, both as ``T_s(W)`` and folded in place by the replay function."""
    from torch.func import functional_call

    model = _tiny_llama(1)
    ctx = _layer_ctx(model, 0, QuantSpec(wbits=4, group=16))
    layer = ctx.module
    groups = [g for g in resolve_groups(layer, ctx.arch) if can_fold(layer, g)]
    assert {g.name for g in groups} == {"attn_in", "attn_out", "mlp_in", "mlp_out"}  # v→o folds under GQA too
    scales = _random_scales(layer, groups)
    with torch.no_grad():
        ref = _out(layer(ctx.inputs, **ctx.kwargs))
        out = _out(functional_call(layer, transformed_params(layer, groups, scales), (ctx.inputs,), ctx.kwargs))
        fold_let(layer, ctx.arch, saved_scales(scales))
        folded = _out(layer(ctx.inputs, **ctx.kwargs))
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(folded, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(tiny_models()))
def test_every_table_entry_let_transform_preserves_function_and_training_lowers_the_loss(arch):
    """Per table entry: T_s keeps the layer's function; one epoch of W4A8 training with revert OFF ends
    below where it started (with revert on, ``loss_end ≤ loss_start`` would hold even if nothing trained)."""
    from torch.func import functional_call

    model = canonicalize(tiny_models()[arch](0))
    ctx = _layer_ctx(model, 0, QuantSpec(wbits=4, group=16, abits=8), n=4, length=12)
    layer = ctx.module
    groups = [g for g in resolve_groups(layer, ctx.arch) if can_fold(layer, g)]
    scales = _random_scales(layer, groups, seed=0, lo=0.5, width=1.0)
    with torch.no_grad():
        ref = _out(layer(ctx.inputs, **ctx.kwargs))
        out = _out(functional_call(layer, transformed_params(layer, groups, scales), (ctx.inputs,), ctx.kwargs))
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)

    params = OmniQuantParams(epochs=1, batch_size=1, lwc_lr=5e-2, let_lr=2e-2)
    result = OmniQuant(params, revert=False).run_layer(ctx)
    m = result.metrics
    assert not m["reverted"] and len(m["curve"]) == 1
    assert m["loss_end"] < m["loss_start"] < float("inf"), m
    assert set(result.quantized) == {n for stage in ctx.linears() for n in stage}


def _run(ctx: LayerContext, params: OmniQuantParams):
    snapshot = {n: p.detach().clone() for n, p in ctx.module.named_parameters()}
    result = OmniQuant(params).run_layer(ctx)
    return result, snapshot


def test_lwc_training_lowers_the_layer_loss_w3():
    torch.manual_seed(0)
    model = _tiny_llama(2)
    ctx = _layer_ctx(model, 1, QuantSpec(wbits=3, group=16))
    result, _ = _run(ctx, OmniQuantParams(epochs=8, lwc=True, batch_size=2, lwc_lr=5e-2))
    m = result.metrics
    assert len(m["curve"]) == 8
    assert m["loss_end"] < m["loss_start"]
    assert not result.overrides  # weight-only without LET changes no fp parameter
    # the codes reproduce what the block was trained with
    for name, qw in result.quantized.items():
        assert qw.codes.dtype == torch.uint8 and qw.codes.max() <= 7


@pytest.mark.parametrize("abits", [4, 6])
def test_let_training_lowers_the_layer_loss_weight_activation(abits):
    model = _tiny_llama(3)
    ctx = _layer_ctx(model, 0, QuantSpec(wbits=4, group=16, abits=abits), n=8, length=32)
    result, before = _run(ctx, OmniQuantParams(epochs=6, lwc=True, let=None, batch_size=2, let_lr=2e-2))
    m = result.metrics
    assert m["loss_end"] < m["loss_start"] and not m["reverted"]
    assert not result.overrides  # the saved scales are the fp transform; the replay folds them
    assert not any("qk" in k for k in result.saved)  # no q·kᵀ scale: it cancels without Q/K quantization
    assert {k for k in result.saved if k.endswith("let_scale")} == {f"{g}.let_scale" for g in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
    # the layer is left folded exactly as the replay folds the saved scales into the untouched layer
    fresh = _tiny_llama(3).model.layers[0]
    fold_let(fresh, ctx.arch, result.saved)
    norm = "input_layernorm.weight"
    assert not torch.equal(fresh.get_parameter(norm), before[norm])
    assert torch.equal(fresh.get_parameter(norm), ctx.module.get_parameter(norm))


def test_let_only_lowers_loss_without_lwc():
    model = _tiny_llama(4)
    ctx = _layer_ctx(model, 0, QuantSpec(wbits=4, group=16, abits=4))
    result, _ = _run(ctx, OmniQuantParams(epochs=6, lwc=False, let=True, batch_size=2, let_lr=2e-2))
    assert result.metrics["loss_end"] < result.metrics["loss_start"]
    assert not any(k.endswith("lwc_hi") for k in result.saved)


def test_block_params_fake_quantizes_every_linear():
    model = _tiny_llama(5)
    ctx = _layer_ctx(model, 0, QuantSpec(wbits=2, group=16))
    linears = [n for stage in ctx.linears() for n in stage]
    params = block_params(ctx.module, [], linears, Learnables(), ctx.spec)
    for name in linears:
        w = params[f"{name}.weight"]
        levels = (w.reshape(w.shape[0], -1, 16).sort(dim=-1).values.diff(dim=-1) != 0).sum(dim=-1) + 1
        assert levels.max() <= 4 and levels.max() >= 3  # 2 bits: at most 4 distinct values per (row, group)
        assert torch.allclose(w, quantize_weight(ctx.module.get_parameter(f"{name}.weight"), ctx.spec).dequantize(), atol=1e-6)


# --------------------------------------------------------------------------- CLI


def _quant(*args, input=None):
    from quantcli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def _fake_awq(tiny_dir, name, kind="awq", spec=QuantSpec(wbits=3, group=16), config_sha=None, clip=0.9, scales=1.5):
    """A hand-made AWQ-style artifact with the documented tensor names."""
    from quantcli.loading import load_input

    loaded = load_input(str(tiny_dir / "model"), quantized=False)
    base = loaded.base if config_sha is None else dataclasses.replace(loaded.base, config_sha256=config_sha)
    arch = arch_spec(loaded.model)
    tensors = {}
    for i, layer in enumerate(loaded.model.model.layers):
        for g in resolve_groups(layer, arch):
            if can_fold(layer, g):
                tensors[f"model.layers.{i}.{g.name}.scales"] = torch.full((layer.get_submodule(g.prev).weight.shape[0],), scales)
        for stage in arch.sequential:
            for lin in stage:
                w = layer.get_submodule(lin).weight
                r = torch.full((w.shape[0], w.shape[1] // spec.group), clip)
                if lin.endswith(("q_proj", "k_proj")):
                    r[:] = 1.0
                tensors[f"model.layers.{i}.{lin}.clip"] = r
    manifest = Manifest(kind=kind, base_model=base, spec=spec.to_dict())
    return write_artifact(tiny_dir / name, manifest, {"awq.safetensors": tensors}, force=True).path


CALIB = ("--nsamples", 4, "--seqlen", 32)


def test_cli_omniquant_writes_an_artifact(tiny_dir):
    out = tiny_dir / "omni-cli"
    text = tiny_dir / "text.txt"
    res = _quant("omniquant", tiny_dir / "model", "--w3", "--group", 16, "--epochs", 2, "--dataset", text, *CALIB, "-o", out, "-q", "--force", "--device", "cpu")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "omniquant" and manifest["params"]["let"] is False
    layers = manifest["metrics"]["layers"]
    assert len(layers) == 2 and all(len(m["curve"]) == 2 and "loss_start" in m and "loss_end" in m for m in layers)
    from quantcli.loading import load_input

    loaded = load_input(str(out))
    assert len(loaded.quantized) == 14


def test_cli_init_from_awq_and_let(tiny_dir):
    awq = _fake_awq(tiny_dir, "omni-awq-ok")
    out = tiny_dir / "omni-init"
    res = _quant(
        "omniquant", tiny_dir / "model", "--w3", "--group", 16, "--abits", 8, "--epochs", 1, "--init-from", awq,
        "--dataset", tiny_dir / "text.txt", *CALIB, "-o", out, "-q", "--force", "--device", "cpu",
    )
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["init"]["let"] == "awq scales" and manifest["params"]["let"] is True
    assert "omniquant.safetensors" in manifest["files"] and "overrides.safetensors" not in manifest["files"]


@pytest.mark.parametrize(
    "case, expect",
    [
        ("kind", "not an awq or smooth one"),
        ("model", "made for another base model"),
        ("bits", "another quantization spec"),
        ("group", "another quantization spec"),
    ],
)
def test_cli_init_from_refusals_are_one_line(tiny_dir, case, expect):
    kwargs = {
        "kind": {"kind": "rtn"},
        "model": {"config_sha": "0" * 64},
        "bits": {"spec": QuantSpec(wbits=4, group=16)},
        "group": {"spec": QuantSpec(wbits=3, group=32)},
    }[case]
    bad = _fake_awq(tiny_dir, f"omni-bad-{case}", **kwargs)
    res = _quant(
        "omniquant", tiny_dir / "model", "--w3", "--group", 16, "--epochs", 1, "--init-from", bad,
        "--dataset", tiny_dir / "text.txt", *CALIB, "-o", tiny_dir / f"omni-never-{case}", "-q", "--device", "cpu",
    )
    assert res.exit_code != 0
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = [line for line in res.output.splitlines() if line.startswith("quant:")]
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in res.output, res.output
    assert not (tiny_dir / f"omni-never-{case}").exists()


def test_cli_awq_input_starts_from_its_clips_and_refuses_other_scales(tiny_dir):
    data = ("--dataset", tiny_dir / "text.txt", *CALIB, "-q", "--force", "--device", "cpu")
    awq = tiny_dir / "omni-awq-real"
    assert _quant("awq", tiny_dir / "model", "--w3", "--group", 16, *data, "-o", awq).exit_code == 0
    out = tiny_dir / "omni-on-awq"
    res = _quant("omniquant", awq, "--w3", "--group", 16, "--abits", 8, "--epochs", 1, *data, "-o", out)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["init"]["let"].startswith("identity") and manifest["parent"] is not None
    other = _fake_awq(tiny_dir, "omni-awq-other")
    res = _quant("omniquant", awq, "--w3", "--group", 16, "--epochs", 1, "--init-from", other, *data, "-o", tiny_dir / "omni-never")
    assert res.exit_code != 0 and "already carries the AWQ scales" in res.output


# --------------------------------------------------------------------------- replay: the chain is exact


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _omniquant_stage(arch: str, spec: QuantSpec, params: OmniQuantParams, tmp_path):
    """A saved tiny ``arch`` model through one OmniQuant stage: ``(loaded, ids, base logits, artifact)``;
    the driver leaves ``loaded.model`` quantized in place."""
    from quantcli.loading import load_input
    from quantcli.stage import Calibration, RunParams, StageParams, run_stage

    model_dir = tmp_path / "model"
    tiny_models()[arch](0).save_pretrained(model_dir)
    char_tokenizer(TINY_TEXT).save_pretrained(model_dir)
    loaded = load_input(str(model_dir), quantized=False)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = loaded.model(ids).logits
    stage = StageParams("omniquant", OmniQuant(params), spec)
    artifact = run_stage(stage, loaded, tmp_path / "omni", Calibration(ids, {}), RunParams("cpu", batch=2))
    return loaded, ids, base, artifact


@pytest.mark.parametrize("epochs", [0, 1])
@pytest.mark.parametrize("arch", sorted(tiny_models()))
def test_artifact_replays_to_the_base_function_and_to_its_codes(arch, epochs, tmp_path):
    """W4A8 with LET: the fp model a following stage starts from (``materialize(quantized=False)``)
    computes the base model's function, and the quantized materialisation holds exactly the weights
    the driver left in the model (folded norms, dequantized codes)."""
    from quantcli.loading import materialize
    from quantcli.models.weights import read_quantized

    spec = QuantSpec(wbits=4, group=16, abits=8)
    loaded, ids, base, artifact = _omniquant_stage(arch, spec, OmniQuantParams(epochs=epochs, let=True, let_lr=2e-2), tmp_path)
    assert any(k.endswith(".let_scale") for k in artifact.tensors("omniquant.safetensors"))

    fp, _ = materialize(artifact, quantized=False)
    with torch.no_grad():
        assert _rel(fp(ids).logits, base) < 1e-4

    quantized, _ = materialize(artifact, quantized=True)
    driven = dict(loaded.model.named_parameters())  # the driver quantized this model in place
    for name, p in quantized.named_parameters():
        assert torch.equal(p, driven[name]), name
    codes = read_quantized(artifact)
    for name, qw in codes.items():
        assert torch.equal(quantized.get_submodule(name).weight, qw.dequantize()), name


def test_cli_gptq_after_omniquant_starts_from_the_base_function(tiny_dir):
    """``quant gptq <omniquant artifact>``: its fp start is the base model's function, and its
    quantized model is as close to the base as GPTQ run on the base model itself."""
    from quantcli.artifact import open_artifact
    from quantcli.loading import load_input, materialize

    data = ("--dataset", tiny_dir / "text.txt", *CALIB, "-q", "--force", "--device", "cpu")
    omni, chained, direct = tiny_dir / "chain-omni", tiny_dir / "chain-omni-gptq", tiny_dir / "chain-gptq"
    res = _quant("omniquant", tiny_dir / "model", "--w4", "--group", 16, "--abits", 8, "--let", "--epochs", 0, *data, "-o", omni)
    assert res.exit_code == 0, res.output
    res = _quant("gptq", omni, "--w4", "--group", 16, *data, "-o", chained)
    assert res.exit_code == 0, res.output
    assert _quant("gptq", tiny_dir / "model", "--w4", "--group", 16, *data, "-o", direct).exit_code == 0
    assert [a.kind for a in open_artifact(chained).lineage()] == ["omniquant", "gptq"]

    ids = torch.randint(1, 30, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = load_input(str(tiny_dir / "model")).model(ids).logits
        start = load_input(str(chained), quantized=False).model(ids).logits
        after_omni = materialize(open_artifact(chained))[0](ids).logits
        on_base = materialize(open_artifact(direct))[0](ids).logits
    assert _rel(start, base) < 1e-4
    assert _rel(after_omni, base) < 1.5 * _rel(on_base, base) + 1e-3, (_rel(after_omni, base), _rel(on_base, base))


@pytest.mark.parametrize("command", ["gptq", "omniquant"])
def test_cli_awq_input_of_another_spec_is_refused_by_every_stage(tiny_dir, command):
    """One parent-AWQ rule for GPTQ and OmniQuant: clip ratios searched for another grid are refused
    with one line (OmniQuant used to drop them silently, GPTQ checked only the group)."""
    awq = _fake_awq(tiny_dir, f"parent-awq-w4-{command}", spec=QuantSpec(wbits=4, group=16))
    out = tiny_dir / f"parent-never-{command}"
    extra = ("--epochs", 0) if command == "omniquant" else ()
    res = _quant(command, awq, "--w3", "--group", 16, *extra, "--dataset", tiny_dir / "text.txt", *CALIB, "-o", out, "-q", "--device", "cpu")
    lines = [line for line in res.output.splitlines() if line.startswith("quant:")]
    assert res.exit_code != 0 and len(lines) == 1 and "another quantization spec (wbits 4 vs 3)" in lines[0], res.output
    assert "use w4g16" in lines[0] and not out.exists()


# --------------------------------------------------------------------------- the q·kᵀ scale (with a quantized KV cache)


@pytest.mark.parametrize("arch", sorted(tiny_models()))
def test_qk_scale_folds_without_changing_the_layer(arch):
    """A random q·kᵀ scale (one value per key head and rotary pair) leaves every table entry's layer
    unchanged, as ``T_s(W)`` and folded by the replay: GQA (4 query / 2 key heads), Qwen2's q/k biases,
    Qwen3's and Gemma3's per-head norms. A scale that differs within a rotary pair does change it:
    the pairing (or the query head → key head map) being wrong would fail the first assertion."""
    from torch.func import functional_call

    from quantcli.algos.omniquant.let import QK, fold_qk, qk_site

    model = canonicalize(tiny_models()[arch](0))
    ctx = _layer_ctx(model, 0, QuantSpec(wbits=4, group=16), n=2, length=12)
    layer = ctx.module
    site = qk_site(layer)
    assert site is not None and site.q.endswith("norm") == hasattr(layer.self_attn, "q_norm")
    s = site.expand(torch.rand(site.free_shape, generator=torch.Generator().manual_seed(1)) * 3 + 0.3)
    unpaired = torch.rand(site.width, generator=torch.Generator().manual_seed(2)) * 3 + 0.3
    with torch.no_grad():
        ref = _out(layer(ctx.inputs, **ctx.kwargs))
        out = _out(functional_call(layer, transformed_params(layer, [], {QK: s}), (ctx.inputs,), ctx.kwargs))
        broken = _out(functional_call(layer, transformed_params(layer, [], {QK: unpaired}), (ctx.inputs,), ctx.kwargs))
        fold_let(layer, ctx.arch, saved_scales({QK: s}))
        folded = _out(layer(ctx.inputs, **ctx.kwargs))
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(folded, ref, atol=1e-4, rtol=1e-4)
    delta = (ref - ctx.inputs).norm()  # the attention + MLP part of the residual output
    assert (broken - ref).norm() > 1e-3 * delta > 100 * (folded - ref).norm(), ((broken - ref).norm(), delta, (folded - ref).norm())
    with pytest.raises(Exception, match="another model"):
        fold_qk(layer, torch.ones(site.width + 2))


def _outlier_keys(seed: int, factor: float = 12.0):
    """The tiny Llama with a few key channels (whole rotary pairs, every key head) ``factor``× larger
    and every query 4× larger (attention that is not uniform, so key errors matter): what real LLMs'
    keys look like and what a per-token key quantizer suffers from."""
    model = _tiny_llama(seed)
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 4.0
            for h in range(model.config.num_key_value_heads):
                for c in (1, 5):
                    layer.self_attn.k_proj.weight[[h * d + c, h * d + c + d // 2]] *= factor
    return model


@pytest.mark.parametrize("init", ["stats", "ones"])
def test_qk_scale_lowers_the_layer_error_under_kv_quantization(init):
    """W8A8 with a 4-bit KV cache on keys with outlier channels: the layer's output error with the
    q·kᵀ scale is lower than without it, from the statistics start alone (no training) and after
    training from s = 1 (the original code's start). Catches a scale that never reaches the keys'
    quantizer (e.g. folded after RoPE-free statistics the wrong way round, or not trained)."""
    spec = QuantSpec(wbits=8, group=-1, abits=8, kv_bits=4)
    epochs = 0 if init == "stats" else 4
    loss = {}
    for qk in (False, True):
        ctx = _layer_ctx(canonicalize(_outlier_keys(7)), 0, spec, n=8, length=32)
        params = OmniQuantParams(epochs=epochs, lwc=False, let=True, qk=qk, qk_init=init, batch_size=2, let_lr=5e-2)
        result = OmniQuant(params, revert=False).run_layer(ctx)
        assert ("qk.let_scale" in result.saved) == qk
        loss[qk] = result.metrics["loss_end"]
        if qk:
            s = result.saved["qk.let_scale"].view(2, 2, -1)  # [kv heads, pair half, head_dim/2]
            assert torch.equal(s[:, 0], s[:, 1])  # constant on every rotary pair
            assert s[:, 0, [1, 5]].max() < s[:, 0].median()  # the outlier key channels were scaled down
    assert loss[True] < 0.7 * loss[False], loss


def test_qk_scale_needs_a_quantized_kv_cache(tiny_dir):
    """On by default with LET and --kv-bits (recorded, saved per layer); refused with one line without --kv-bits."""
    assert not OmniQuantParams(qk=True).qk_for(QuantSpec(4, 16, abits=8))
    assert OmniQuantParams().qk_for(QuantSpec(4, 16, abits=8, kv_bits=8))
    assert not OmniQuantParams(let=False).qk_for(QuantSpec(4, 16, abits=8, kv_bits=8))
    res = _quant("omniquant", tiny_dir / "model", "--w4", "--group", 16, "--abits", 8, "--qk-scale", "--epochs", 0,
                 "--dataset", tiny_dir / "text.txt", *CALIB, "-o", tiny_dir / "omni-never-qk", "-q", "--device", "cpu")
    assert res.exit_code != 0 and "--kv-bits" in res.output and not (tiny_dir / "omni-never-qk").exists()
    out = tiny_dir / "omni-qk"
    res = _quant("omniquant", tiny_dir / "model", "--w4", "--group", 16, "--abits", 8, "--kv-bits", 4, "--epochs", 0,
                 "--dataset", tiny_dir / "text.txt", *CALIB, "-o", out, "-q", "--force", "--device", "cpu")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["qk"] is True and manifest["params"]["qk_init"] == "stats"
    from quantcli.artifact import open_artifact

    assert sum(k.endswith("qk.let_scale") for k in open_artifact(out).tensors("omniquant.safetensors")) == 2


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_artifact_with_a_qk_scale_replays_to_the_trained_model(arch, tmp_path):
    """W4A8 + 4-bit KV cache with the q·kᵀ scale trained: the artifact's fp replay is the base model's
    function and its quantized replay holds exactly the weights the driver left (q/k rows, or Qwen3's
    folded q/k norms), so its evaluation is the trained model's. Catches a qk scale missing from the
    artifact or folded differently by the replay than after training."""
    from quantcli.loading import materialize
    from quantcli.models.act_hooks import install_spec_hooks

    spec = QuantSpec(wbits=4, group=16, abits=8, kv_bits=4)
    loaded, ids, base, artifact = _omniquant_stage(arch, spec, OmniQuantParams(epochs=1, let=True, let_lr=2e-2), tmp_path)
    qk = {k: v for k, v in artifact.tensors("omniquant.safetensors").items() if k.endswith("qk.let_scale")}
    assert len(qk) == 2 and all(not torch.allclose(v, torch.ones_like(v)) for v in qk.values())

    fp, _ = materialize(artifact, quantized=False)
    with torch.no_grad():
        assert _rel(fp(ids).logits, base) < 1e-4
    quantized, _ = materialize(artifact, quantized=True)
    driven = loaded.model
    for name, p in quantized.named_parameters():
        assert torch.equal(p, driven.get_parameter(name)), name
    linears = [n for n, m in driven.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    handles = install_spec_hooks(driven, linears, spec)  # as the driver ran it; the replay installs its own
    with torch.no_grad():
        assert torch.allclose(quantized(ids).logits, driven(ids).logits, atol=1e-5)
    for h in handles:
        h.remove()
