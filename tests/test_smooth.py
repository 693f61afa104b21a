"""SmoothQuant: function preservation on every table entry, the α search on an outlier toy, CLI chains."""

import copy

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import tiny_models
from quantcli.algos.driver import LayerContext, layer_forward, run_blockwise
from quantcli.algos.replay import StageReplay
from quantcli.algos.smooth import (
    SMOOTH_FILE,
    Smooth,
    SmoothParams,
    quantized_block_loss,
    smooth_scales,
)
from quantcli.artifact import BaseModelRef, Manifest, open_artifact, write_artifact
from quantcli.cli.app import app
from quantcli.models.arch import ArchSpec, ScalingGroup
from quantcli.models.canonical import canonicalize
from quantcli.loading import load_input, materialize, replay_lineage
from quantcli.quant import QuantSpec

W8A8 = QuantSpec(8, -1, abits=8)


def test_smooth_scales_balance_the_ranges():
    """s = max|X|^α / max|W|^(1−α): after folding, max|X|/s = (max|X|·max|W|)^(1−α) and max|W|·s = (max|X|·max|W|)^α."""
    x, w = torch.tensor([100.0, 1.0, 4.0]), torch.tensor([0.5, 2.0, 1.0])
    s = smooth_scales(x, w, 0.5)
    assert torch.allclose(x / s, w * s)  # α = ½: equal ranges on every channel
    s = smooth_scales(x, w, 0.75)
    assert torch.allclose(x / s, (x * w).pow(0.25)) and torch.allclose(w * s, (x * w).pow(0.75))


@pytest.mark.parametrize("arch", sorted(tiny_models()))
def test_smoothing_preserves_the_function_on_every_table_entry(arch, tmp_path):
    """Smoothing (no quantization) keeps the logits, in the driver and replayed on a fresh model;
    every group is scaled, v→o under GQA and every MoE expert included."""
    factory = tiny_models()[arch]
    model = canonicalize(factory())
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    held = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(held).logits
    result = run_blockwise(model, ids, Smooth(SmoothParams(0.5)), W8A8, torch.device("cpu"), batch=2)
    assert not result.quantized
    attn = model.model.layers[0].self_attn
    assert attn.v_proj.out_features < attn.o_proj.in_features  # GQA
    for name in ("attn_in", "attn_out"):
        s = result.saved[f"model.layers.0.{name}.scales"]
        assert torch.all(s > 0) and s.std() > 0.01  # really scaled, not ones
    if "Moe" in arch or "Mixtral" in arch:
        assert "model.layers.1.moe_in.scales" in result.saved
        assert any(".expert_out." in k for k in result.saved)
    with torch.no_grad():
        assert torch.allclose(model(held).logits, before, atol=1e-4, rtol=1e-4)
        artifact = write_artifact(
            tmp_path / "smooth", Manifest(kind="smooth", base_model=BaseModelRef("x", "h", arch)), {SMOOTH_FILE: result.saved}
        )
        fresh = canonicalize(factory())
        replay_lineage(fresh, [StageReplay.of(artifact)], {})  # the registered "smooth" replay, layer by layer
        assert not torch.allclose(fresh.model.layers[0].input_layernorm.weight, canonicalize(factory()).model.layers[0].input_layernorm.weight)
        assert torch.allclose(fresh(held).logits, before, atol=1e-4, rtol=1e-4)


class Toy(nn.Module):
    """One scaling group: a norm-like diagonal op feeding two linears."""

    def __init__(self, dim=64, out=48):
        super().__init__()
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(dim))
        self.a = nn.Linear(dim, out, bias=False)
        self.b = nn.Linear(dim, out, bias=False)

    def forward(self, x):
        h = x * self.norm.weight
        return self.a(h) + self.b(h)


TOY_ARCH = ArchSpec(groups=(ScalingGroup("toy", "norm", ("a", "b"), ""),), sequential=(("a", "b"),))


def outlier_tokens(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 64, 64, generator=gen)
    x[..., :2] *= 60  # two outlier channels
    return x


def test_auto_alpha_beats_half_on_held_out_tokens():
    """Outlier channels whose weights are small: less migration than α = ½ is best at W4A8. The α
    searched on some tokens gives a lower quantized block error than α = ½ on other tokens."""
    torch.manual_seed(0)
    toy = Toy()
    with torch.no_grad():
        toy.a.weight[:, :2] *= 0.05
        toy.b.weight[:, :2] *= 0.05
    spec = QuantSpec(4, -1, abits=8)
    search, held = outlier_tokens(0), outlier_tokens(1)
    held_target = layer_forward(toy, held, {}, "cpu", 8)
    errors, alphas = {}, {}
    for alpha in ("auto", 0.5):
        block = copy.deepcopy(toy)
        ctx = LayerContext(0, "toy", block, search, layer_forward(toy, search, {}, "cpu", 8), {}, torch.device("cpu"), spec, TOY_ARCH)
        result = Smooth(SmoothParams(alpha)).run_layer(ctx)
        alphas[alpha] = result.metrics["alpha"]
        errors[alpha] = quantized_block_loss(block, TOY_ARCH, spec, held, held_target, {}, "cpu", 8)
    assert alphas["auto"] < 0.5
    assert errors["auto"] < 0.9 * errors[0.5]
    assert set(result.metrics) >= {"quant_loss", "quant_loss_unsmoothed"}


def test_smoothing_cuts_w8a8_error_on_outlier_activations():
    torch.manual_seed(0)
    toy = Toy()
    x = outlier_tokens(0)
    ctx = LayerContext(0, "toy", toy, x, layer_forward(toy, x, {}, "cpu", 8), {}, torch.device("cpu"), QuantSpec(8, -1, abits=4), TOY_ARCH)
    metrics = Smooth(SmoothParams(0.5)).run_layer(ctx).metrics
    assert metrics["quant_loss"] < 0.5 * metrics["quant_loss_unsmoothed"]


# ---------------------------------------------------------------- CLI: smooth → rtn / gptq / awq / omniquant

runner = CliRunner()


def quant(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def smoothed(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smooth")
    text = tiny_model_dir.parent / "text.txt"
    calib = quant("calibrate", tiny_model_dir, "--dataset", text, "--nsamples", 4, "--seqlen", 32, "-o", out / "calib", "-q")
    assert calib.exit_code == 0, calib.output
    result = quant("smooth", tiny_model_dir, "--alpha", "auto", "--grid", 4, "--w8a8", "--calib", out / "calib", "-o", out / "smooth", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out / "smooth")
    return out


def test_smooth_artifact_holds_scales_and_no_codes(smoothed, tiny_model_dir):
    artifact = open_artifact(smoothed / "smooth")
    assert artifact.kind == "smooth"
    tensors = artifact.tensors(SMOOTH_FILE)
    assert {"model.layers.0.attn_in.scales", "model.layers.1.mlp_out.scales"} <= set(tensors)
    assert all(layer["alpha"] in (0.25, 0.5, 0.75) for layer in artifact.manifest.metrics["layers"])
    base = load_input(str(tiny_model_dir)).model
    model, _ = materialize(artifact)
    ids = torch.randint(0, 60, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, base(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(model.model.layers[0].input_layernorm.weight, base.model.layers[0].input_layernorm.weight)


@pytest.mark.parametrize(
    "stage,flags",
    [
        ("rtn", ["--w8", "--group", "-1", "--abits", "8"]),
        ("gptq", ["--w4", "--group", "32", "--abits", "8"]),
        ("awq", ["--w4", "--group", "32", "--n-grid", "4"]),
        ("omniquant", ["--w4", "--group", "32", "--abits", "8", "--epochs", "1"]),
    ],
)
def test_smooth_then_every_stage(smoothed, stage, flags):
    """Each stage accepts a smooth artifact as INPUT and starts from the smoothed model (replay alone)."""
    out = smoothed / f"smooth-{stage}"
    result = quant(stage, smoothed / "smooth", *flags, "--calib", smoothed / "calib", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    artifact = open_artifact(out)
    assert [a.kind for a in artifact.lineage()] == ["smooth", stage]
    fp_smooth, _ = materialize(open_artifact(smoothed / "smooth"))
    start, _ = materialize(artifact, quantized=False)
    for name, p in fp_smooth.named_parameters():
        if name.endswith("norm.weight") and stage not in ("awq", "omniquant"):  # awq/omniquant fold more on top
            assert torch.allclose(dict(start.named_parameters())[name], p)
    model, _ = materialize(artifact)
    ids = torch.randint(0, 60, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        drift = (model(ids).logits - fp_smooth(ids).logits).norm() / fp_smooth(ids).logits.norm()
    assert 0 < drift < 0.5  # quantized, and still the smoothed model's function


def _let_and_smooth_scales(omni, smooth) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(LET scale, smoothing scale) per group the smooth artifact scaled, from the two payloads."""
    let = open_artifact(omni).tensors("omniquant.safetensors")
    scales = open_artifact(smooth).tensors(SMOOTH_FILE)
    pairs = [(let[k.removesuffix(".scales") + ".let_scale"], v) for k, v in scales.items()]
    assert len(pairs) >= 4
    return pairs


def test_omniquant_init_from_smooth_starts_let_at_the_smoothing_scales(smoothed, tiny_model_dir):
    """Seed's "smooth + OmniQuant": at 0 epochs the saved LET scales are the smoothing scales
    (catches LET ignoring --init-from smooth/ and starting from its own α = 0.5 init, or a refusal)."""
    out = smoothed / "omni-init-smooth"
    res = quant("omniquant", tiny_model_dir, "--w4", "--group", "32", "--abits", "8", "--epochs", 0,
                "--init-from", smoothed / "smooth", "--calib", smoothed / "calib", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    init = open_artifact(out).manifest.params["init"]
    assert init["from"] == str((smoothed / "smooth").resolve()) and init["let"] == "smooth scales"
    for let, s in _let_and_smooth_scales(out, smoothed / "smooth"):
        assert torch.allclose(let, s.clamp(min=let.min().item())) and not torch.allclose(s, torch.ones_like(s))


def test_omniquant_on_smooth_input_starts_let_at_identity(smoothed):
    """INPUT smooth/ (scales folded in already): LET starts at s = 1 on top (catches the smoothing
    scales applied twice, or LET re-initialised from the smoothed model's statistics)."""
    out = smoothed / "omni-on-smooth"
    res = quant("omniquant", smoothed / "smooth", "--w4", "--group", "32", "--abits", "8", "--epochs", 0,
                "--calib", smoothed / "calib", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    assert open_artifact(out).manifest.params["init"]["let"].startswith("identity")
    assert all(torch.all(let == 1) for let, _ in _let_and_smooth_scales(out, smoothed / "smooth"))


def test_omniquant_init_from_other_kinds_is_one_line(smoothed, tiny_model_dir):
    rtn = smoothed / "smooth-rtn-for-init"
    assert quant("rtn", tiny_model_dir, "--w4", "--group", "32", "-o", rtn, "-q").exit_code == 0
    out = smoothed / "omni-never"
    res = quant("omniquant", tiny_model_dir, "--w4", "--group", "32", "--epochs", 0, "--init-from", rtn,
                "--calib", smoothed / "calib", "-o", out, "-q")
    lines = [line for line in res.output.splitlines() if line.startswith("quant:")]
    assert res.exit_code != 0 and len(lines) == 1 and "not an awq or smooth one" in lines[0], res.output
    assert not out.exists()


def test_bad_alpha_is_one_line(tiny_model_dir, tmp_path):
    result = quant("smooth", tiny_model_dir, "--alpha", "1.5", "-o", tmp_path / "s")
    assert result.exit_code != 0 and "--alpha 1.5" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()
