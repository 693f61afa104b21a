"""Activation and KV-cache quantization: error bounds, static scales through the artifact, KV at the read site."""

import pytest
import torch

from conftest import tiny_llama, tiny_models
from quantcli.algos.rtn import RTN
from quantcli.artifact import open_artifact
from quantcli.errors import SpecError
from quantcli.models.act_hooks import INPUT_SCALE, install_kv_quant, install_linear_act_quant, install_spec_hooks
from quantcli.models.canonical import canonicalize
from quantcli.loading import load_input, materialize
from quantcli.models.weights import QUANTIZED_FILE, read_quantized
from quantcli.quant import QuantSpec
from quantcli.quant.act import act_qparams, fake_quant_per_token, quantize_per_token_int8
from quantcli.stage import Calibration, RunParams, StageParams, run_stage


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_per_token_error_is_at_most_half_a_step(bits, sym):
    """|x − Q(x)| ≤ scale/2 per element (K and V per head and token, linear inputs per token)."""
    x = torch.randn(2, 3, 17, 32) * torch.rand(2, 3, 17, 1) * 10  # [B, heads, T, head_dim], varied ranges
    x[0, 0, 0, 0] = 80.0
    q = fake_quant_per_token(x, bits, sym)
    scale, _ = act_qparams(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True), bits, sym)
    assert torch.all((x - q).abs() <= scale / 2 * (1 + 1e-3))  # the symmetric positive end sits exactly half a step off
    assert torch.all(((q / scale) - (q / scale).round()).abs() < 1e-3)  # on the grid of its own token
    levels = q[1, 2, 5].unique().numel()
    assert levels <= 2**bits


def test_int8_per_token_codes():
    x = torch.randn(20, 64) * 3
    q, scale = quantize_per_token_int8(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and q.abs().amax(-1).min() == 127
    assert torch.all((q.float() * scale - x).abs() <= scale / 2 * (1 + 1e-3))


def test_spec_options_are_checked_and_recorded():
    with pytest.raises(SpecError, match="--act-static"):
        QuantSpec(8, -1, abits=16, act_static=True)
    with pytest.raises(SpecError, match="--kv-bits 3"):
        QuantSpec(8, -1, abits=8, kv_bits=3)
    spec = QuantSpec(4, 32, abits=8, act_sym=True, act_static=True, kv_bits=4)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert spec.label() == "w4a8statickv4g32"


def _loaded(model_dir):
    return load_input(str(model_dir), quantized=False)


def rtn(model_dir, spec: QuantSpec, out, ids, batch: int = 8):
    """RTN of the tiny model under ``spec`` on calibration ``ids`` (so activation/KV quant is in the stream)."""
    return run_stage(StageParams("rtn", RTN(), spec), _loaded(model_dir), out, Calibration(ids, {}), RunParams("cpu", batch))


def test_static_activation_scales_round_trip_through_the_artifact(tiny_model_dir, tmp_path):
    """W8A8 static: scales calibrated by the driver are stored per linear and materialize uses them
    (same logits as the in-memory quantized model; other logits than with dynamic scales)."""
    spec = QuantSpec(8, -1, abits=8, act_static=True)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    held = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    artifact = rtn(tiny_model_dir, spec, tmp_path / "rtn", ids, batch=2)
    tensors = artifact.tensors(QUANTIZED_FILE)
    names = sorted(read_quantized(artifact))
    assert names and all(f"{n}.{INPUT_SCALE}" in tensors for n in names)
    scales = torch.stack([tensors[f"{n}.{INPUT_SCALE}"] for n in names])
    assert torch.all(scales > 0) and scales.unique().numel() > 1

    rebuilt, _ = materialize(open_artifact(tmp_path / "rtn"))
    static = {k: v for k, v in tensors.items() if k.endswith(("input_scale", "input_zero"))}
    with torch.no_grad():
        got = rebuilt(held).logits
        reference = _loaded(tiny_model_dir).model  # quantized weights + the stored static scales, by hand
        for name, qw in read_quantized(artifact).items():
            reference.get_submodule(name).weight.data.copy_(qw.dequantize())
        handles = install_linear_act_quant(reference, names, spec, static)
        assert torch.allclose(got, reference(held).logits, atol=1e-5)
        for h in handles:
            h.remove()
        install_linear_act_quant(reference, names, QuantSpec(8, -1, abits=8))
        assert not torch.allclose(got, reference(held).logits, atol=1e-3)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma3ForCausalLM", "Qwen3MoeForCausalLM"])
def test_kv_quantization_reads_quantized_keys_after_rope(arch):
    """Keys reaching attention (after RoPE) are on a per-(head, token) grid of 2**bits levels, the model's output
    moves a little at 8 bits, more at 4, and not at all once removed."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    model = canonicalize(tiny_models()[arch]())
    seen = []
    inner = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None)

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(key.detach())
        return inner(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("test_spy", spy)
    model.config._attn_implementation = "test_spy"
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp = model(ids).logits
        errors = {}
        for bits in (8, 4):
            handle = install_kv_quant(model, bits)
            seen.clear()
            errors[bits] = ((model(ids).logits - fp).norm() / fp.norm()).item()
            key = seen[0]  # on its own per-(head, token) grid: quantizing it again changes nothing
            assert torch.allclose(fake_quant_per_token(key, bits), key, atol=1e-5)
            handle.remove()
        assert torch.allclose(model(ids).logits, fp, atol=1e-6)
        assert not torch.allclose(fake_quant_per_token(seen[-1], 8), seen[-1], atol=1e-5)  # unmarked: fp keys again
    assert 0 < errors[8] < errors[4] < 0.5


def test_kv_bits_in_the_driver_changes_the_next_layer_inputs(tiny_model_dir, tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = {}
    for kv in (16, 4):
        art = rtn(tiny_model_dir, QuantSpec(8, -1, abits=8, kv_bits=kv), tmp_path / f"r{kv}", ids)
        losses[kv] = art.manifest.metrics["mean_layer_loss"]
    assert losses[4] > 2 * losses[16]
    assert install_spec_hooks(model, [], QuantSpec(8, -1)) == []


# ---------------------------------------------------------------- W8A8 for real: the int8 GEMM in quant bench


def test_int8_gemm_linear_matches_fake_quant_within_int8_precision():
    from quantcli.bench.w8a8 import Int8DynamicLinear
    from quantcli.quant import quantize_weight

    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(3, 20, 64) * 4
    x[..., 5] *= 30  # an outlier channel
    for spec in (QuantSpec(8, -1, sym=True, abits=8), QuantSpec(8, -1, abits=8), QuantSpec(4, -1, abits=8)):
        qw = quantize_weight(w, spec)
        module = Int8DynamicLinear.from_quantized(qw, None, torch.device("cpu"))
        y = module(x)
        assert y.shape == (3, 20, 48)
        q_x, s_x = quantize_per_token_int8(x.reshape(-1, 64))
        reference = (q_x.float() * s_x) @ qw.dequantize().T  # the same int8 activations, in float
        # int8 activations: each token's error is at most half a step per element, through |W|
        bound = (s_x / 2) * qw.dequantize().abs().sum(dim=1) + 1e-3
        assert torch.all((y.reshape(-1, 48) - (x.reshape(-1, 64) @ qw.dequantize().T)).abs() <= bound)
        assert torch.allclose(y.reshape(-1, 48), reference, rtol=1e-4, atol=1e-3)


def test_bench_swaps_in_the_int8_gemm_and_lists_fallbacks(tiny_model_dir, tmp_path):
    """A W8A8 artifact runs through the int8 GEMM with logits matching the fake-quant model; a
    grouped W4A8 one falls back, and the report says so."""
    from quantcli.bench.kernels import swap_in_kernels
    from quantcli.bench.w8a8 import FALLBACK, FORWARD_EAGER, FORWARD_FUSED, INT_MM, fused_int8_linear, w8a8_builder

    ids = torch.randint(0, 60, (4, 32), generator=torch.Generator().manual_seed(0))
    held = torch.randint(0, 60, (2, 32), generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(8, -1, sym=True, abits=8, act_sym=True)
    rtn(tiny_model_dir, spec, tmp_path / "w8a8", ids)
    loaded = load_input(str(tmp_path / "w8a8"))
    with torch.no_grad():
        fake = loaded.model(held).logits
        report = swap_in_kernels(loaded.model, loaded.quantized, "cpu", builder=w8a8_builder(loaded.spec))
        real = loaded.model(held).logits
    assert report.counts() == {INT_MM: len(loaded.quantized)} and not report.fallbacks()
    assert ((real - fake).norm() / fake.norm()).item() < 1e-2
    # how the quantize/GEMM/epilogue call ran is reported (fused where torch.compile works here)
    assert report.to_dict()["int8_forward"] == fused_int8_linear(torch.device("cpu"))[1]
    assert report.int8_forward == FORWARD_FUSED or report.int8_forward.startswith(FORWARD_EAGER + "; ")

    grouped = QuantSpec(4, 32, abits=8)
    rtn(tiny_model_dir, grouped, tmp_path / "w4a8", ids)
    loaded = load_input(str(tmp_path / "w4a8"))
    report = swap_in_kernels(loaded.model, loaded.quantized, "cpu", builder=w8a8_builder(loaded.spec))
    assert set(report.counts()) == {FALLBACK} and len(report.fallbacks()) == len(loaded.quantized)
    assert all("group 32" in why for why in report.fallbacks().values())


def test_cli_w8a8_static_then_eval_and_bench(tiny_model_dir, tmp_path):
    """The shared flags reach the spec; an act-static W8A8 artifact evaluates and benches through the int8 GEMM."""
    import json

    from typer.testing import CliRunner

    from quantcli.bench.w8a8 import INT_MM
    from quantcli.cli.app import app

    runner = CliRunner()
    quant = lambda *a: runner.invoke(app, [str(x) for x in a])  # noqa: E731
    text = tiny_model_dir.parent / "text.txt"
    calib = quant("calibrate", tiny_model_dir, "--dataset", text, "--nsamples", 2, "--seqlen", 32, "-o", tmp_path / "calib", "-q")
    assert calib.exit_code == 0, calib.output
    made = quant("rtn", tiny_model_dir, "--w8a8", "--group", -1, "--act-static", "--kv-bits", 8, "--calib", tmp_path / "calib", "-o", tmp_path / "q", "-q")
    assert made.exit_code == 0, made.output
    spec = open_artifact(tmp_path / "q").manifest.spec
    assert (spec["wbits"], spec["abits"], spec["act_static"], spec["kv_bits"]) == (8, 8, True, 8)
    ppl = quant("eval-ppl", tmp_path / "q", "--dataset", text, "--seqlen", 32, "--max-windows", 2, "--json", "-q")
    assert ppl.exit_code == 0 and json.loads(ppl.stdout)["ppl"] > 1, ppl.output
    bench = quant("bench", tmp_path / "q", "--prompt-lens", 20, "--gen", 2, "--reps", 1, "--warmup", 0, "--dtype", "fp32", "--json", "-q")
    assert bench.exit_code == 0, bench.output
    record = json.loads(bench.stdout)
    assert record["kernels"]["counts"] == {INT_MM: 14} and not record["kernels"]["fallbacks"]
    assert any("static activation scales" in n for n in record["notes"])
    # the spec's --kv-bits 8: an int8 KV cache in the timed path, its room beside the fp32 cache's
    kv, fp = record["kv_cache"], record["kv_cache_fp"]
    assert kv["dtype"].startswith("int8") and fp["dtype"] == "float32" and any("int8" in n for n in record["notes"])
    assert (kv["bytes_per_token"], fp["bytes_per_token"]) == (2 * 2 * 2 * (16 + 1 + 4), 2 * 2 * 2 * 16 * 4)  # layers × K,V × KV heads × (…)
    assert kv["capacity_tokens"] > 3 * fp["capacity_tokens"] > 0
    plain = quant("bench", tmp_path / "q", "--kv-bits", 16, "--prompt-lens", 8, "--gen", 1, "--reps", 1, "--warmup", 0, "--dtype", "fp32", "--json", "-q")
    assert plain.exit_code == 0 and "kv_cache_fp" not in json.loads(plain.stdout), plain.output
    assert json.loads(plain.stdout)["kv_cache"]["bytes_per_token"] == fp["bytes_per_token"]
    four = quant("bench", tmp_path / "q", "--kv-bits", 4)
    assert four.exit_code != 0 and "--kv-bits 4" in four.stderr and "Traceback" not in four.output
    conflict = quant("rtn", tiny_model_dir, "--w8a8", "--w4", "-o", tmp_path / "x")
    assert conflict.exit_code != 0 and "--w8a8 sets the weight bits" in conflict.stderr


# ------------------------------------------------------------------------------ searches quantize as evaluation does


def _spy_linear(linear: torch.nn.Module) -> tuple[list, list, list]:
    """Record a linear's raw input (a pre-hook registered before the search's own) and the input it
    finally computes with (a forward hook, after every pre-hook)."""
    raw, seen = [], []
    handles = [
        linear.register_forward_pre_hook(lambda _m, args: raw.append(args[0].detach().clone())),
        linear.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().clone())),
    ]
    return raw, seen, handles


@pytest.mark.parametrize("act_sym", [True, False])
def test_awq_search_quantizes_activations_with_the_spec_quantizer(act_sym):
    """AWQ's scale search scores candidates with the spec's activation quantizer (symmetric under
    --act-sym); catches the search's own asymmetric per-token quantizer ignoring ``act_sym``."""
    from quantcli.algos.awq import AWQParams, search_scale
    from quantcli.models.arch import ScalingGroup

    torch.manual_seed(0)
    layer = torch.nn.Module()
    layer.block = torch.nn.Module()
    layer.block.norm = torch.nn.Module()
    layer.block.norm.weight = torch.nn.Parameter(torch.ones(64))
    layer.block.a = torch.nn.Linear(64, 32, bias=False)
    layer.block.forward = lambda x: layer.block.a(x)
    x = torch.randn(256, 64) + 0.5  # off-centre: asymmetric and symmetric codes differ
    raw, seen, handles = _spy_linear(layer.block.a)
    spec = QuantSpec(4, 32, abits=8, act_sym=act_sym)
    search_scale(layer, ScalingGroup("toy", "block.norm", ("block.a",), "block"), ["block.a"], x, {}, spec, AWQParams(n_grid=2), "cpu", 4096)
    for h in handles:
        h.remove()
    # the first candidate is s = 1: the linear sees Q_a(x) exactly
    assert torch.equal(seen[1], fake_quant_per_token(raw[1], 8, act_sym))
    assert not torch.equal(seen[1], fake_quant_per_token(raw[1], 8, not act_sym))


def test_omniquant_trains_through_the_spec_quantizer():
    """OmniQuant's training loss sees symmetric activations under --act-sym (and the KV cache quantized
    under --kv-bits); catches the training hooks ignoring ``act_sym``/``kv_bits``."""
    from test_omniquant import _layer_ctx, _tiny_llama

    from quantcli.algos.omniquant import OmniQuant, OmniQuantParams

    model = canonicalize(_tiny_llama())
    spec = QuantSpec(4, 32, abits=8, act_sym=True, kv_bits=4)
    ctx = _layer_ctx(model, 0, spec)
    proj = ctx.module.self_attn.o_proj
    raw, seen, handles = _spy_linear(proj)
    attn_seen = []
    handles.append(ctx.module.self_attn.register_forward_hook(lambda m, _a, _o: attn_seen.append(getattr(m, "quantcli_kv_bits", 16))))
    OmniQuant(OmniQuantParams(epochs=1, batch_size=2)).run_layer(ctx)
    for h in handles:
        h.remove()
    trained = [i for i, (r, s) in enumerate(zip(raw, seen)) if not torch.equal(r, s)]
    assert trained and all(torch.equal(seen[i], fake_quant_per_token(raw[i], 8, True)) for i in trained)
    assert 4 in attn_seen
