"""OmniQuant: LWC/LET math, training lowers the block loss, the transform preserves the function, --init-from refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_llama, tiny_models
from quantcli.algos.driver import LayerContext, layer_forward
from quantcli.algos.omniquant import (
    Learnables,
    OmniQuant,
    OmniQuantParams,
    block_params,
    clip_logit,
    fold_into,
    lwc_fake_quant,
    lwc_init,
    lwc_quantize,
    qk_layout,
    transformed_params,
)
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
    a_hi.requires_grad_(True)
    fq = lwc_fake_quant(w, a_hi, a_lo, spec)
    assert torch.allclose(fq, ref.dequantize(), atol=1e-6)
    fq.sub(w).pow(2).sum().backward()
    assert a_hi.grad is not None and a_hi.grad.abs().sum() > 0


def test_lwc_default_init_is_the_paper_value():
    a_hi, a_lo = lwc_init(torch.randn(4, 32), QuantSpec(wbits=4, group=16))
    assert torch.all(a_hi == 4.0) and torch.all(a_lo == 4.0) and a_hi.shape == (4, 2)


def test_let_transform_preserves_the_function():
    """Random positive scales (groups + GQA/RoPE-aware q·kᵀ) leave the layer's output unchanged."""
    from torch.func import functional_call

    model = _tiny_llama(1)
    ctx = _layer_ctx(model, 0, QuantSpec(wbits=4, group=16))
    layer = ctx.module
    layout = qk_layout(layer)
    assert not isinstance(layout, str) and layout.n_rep == 2 and layout.n_kv == 2
    groups = [g for g in resolve_groups(layer, ctx.arch) if can_fold(layer, g)]
    assert {g.name for g in groups} == {"attn_in", "attn_out", "mlp_in", "mlp_out"}  # v→o folds under GQA too
    gen = torch.Generator().manual_seed(3)
    learn = Learnables(
        scales={g.name: torch.rand(layer.get_submodule(g.prev).weight.shape[0], generator=gen) * 4 + 0.25 for g in groups},
        qk=torch.rand(layout.n_kv, layout.head_dim // 2, generator=gen) * 4 + 0.25,
        qk_layout=layout,
    )
    with torch.no_grad():
        ref = layer(ctx.inputs, **ctx.kwargs)
        out = functional_call(layer, transformed_params(layer, groups, learn), (ctx.inputs,), ctx.kwargs)
        fold_into(layer, groups, learn)
        folded = layer(ctx.inputs, **ctx.kwargs)
    ref, out, folded = (x[0] if isinstance(x, tuple) else x for x in (ref, out, folded))
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(folded, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(tiny_models()))
def test_every_table_entry_trains_and_its_let_transform_preserves_function(arch):
    from torch.func import functional_call

    model = canonicalize(tiny_models()[arch](0))
    ctx = _layer_ctx(model, 0, QuantSpec(wbits=4, group=16, abits=8), n=2, length=12)
    layer = ctx.module
    groups = [g for g in resolve_groups(layer, ctx.arch) if can_fold(layer, g)]
    layout = qk_layout(layer)
    assert isinstance(layout, str) == hasattr(layer.self_attn, "q_norm")  # Qwen3/Gemma3: q/k norms → no q·kᵀ scale
    gen = torch.Generator().manual_seed(0)
    learn = Learnables(scales={g.name: torch.rand(layer.get_submodule(g.prev).weight.shape[0], generator=gen) + 0.5 for g in groups})
    if not isinstance(layout, str):
        learn.qk, learn.qk_layout = torch.rand(layout.n_kv, layout.head_dim // 2, generator=gen) + 0.5, layout
    with torch.no_grad():
        ref = layer(ctx.inputs, **ctx.kwargs)
        out = functional_call(layer, transformed_params(layer, groups, learn), (ctx.inputs,), ctx.kwargs)
    ref, out = (x[0] if isinstance(x, tuple) else x for x in (ref, out))
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)

    result = OmniQuant(OmniQuantParams(epochs=1, batch_size=1)).run_layer(ctx)
    assert result.metrics["loss_end"] <= result.metrics["loss_start"] < float("inf")
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
    assert "input_layernorm.weight" in result.overrides and "post_attention_layernorm.weight" in result.overrides
    assert {k for k in result.saved if k.endswith("let_scale")} == {f"{g}.let_scale" for g in ("attn_in", "attn_out", "mlp_in", "mlp_out")}


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
        assert w.reshape(w.shape[0], -1, 16).unique(dim=-1).shape[-1] <= 16  # at most 4 levels per group
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
    assert "overrides.safetensors" in manifest["files"]


@pytest.mark.parametrize(
    "case, expect",
    [
        ("kind", "not an awq one"),
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
