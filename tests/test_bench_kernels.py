"""Real low-bit kernels (quantcli.bench.kernels) match the dequantized weights; KV-cache arithmetic."""

from __future__ import annotations

import copy
import json
import os

import conftest
import pytest
import torch
from torch import nn

from quantcli.bench import kernels
from quantcli.bench.kernels import (
    DEQUANT,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    int4_scale_and_zero,
    swap_in_kernels,
)
from quantcli.bench.latency import kv_bytes_per_token, kv_cache_capacity, measure_prefill_decode, weight_bytes
from quantcli.quant import QuantizedWeight, QuantSpec, quantize_weight

BF16_TOL = 3e-2  # relative error allowed between a bf16 kernel and the fp32 dequantized reference


def tiny_llama() -> nn.Module:
    return conftest.tiny_llama(0, hidden=128, intermediate=256, vocab=256, tie=False)


def quantize_linears(model: nn.Module, spec: QuantSpec) -> dict[str, QuantizedWeight]:
    """Quantize every linear but lm_head; write the dequantized weights into ``model`` (fake quant)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            qw = quantize_weight(module.weight.data, spec)
            module.weight.data = qw.dequantize()
            out[name] = qw
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls are dominated by thread hand-offs (badly so on a shared machine): use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama()


@pytest.mark.parametrize(
    "spec, kernel",
    [
        (QuantSpec(wbits=4, group=32, sym=False), kernels.INT4_CPU),
        (QuantSpec(wbits=4, group=32, sym=True), kernels.INT4_CPU),
        (QuantSpec(wbits=3, group=64, sym=False), kernels.INT4_CPU),
        (QuantSpec(wbits=4, group=-1, sym=False), kernels.INT4_CPU),
        (QuantSpec(wbits=8, group=-1, sym=True), kernels.INT8),
        (QuantSpec(wbits=8, group=-1, sym=False), kernels.INT8),
        (QuantSpec(wbits=6, group=-1, sym=False), kernels.INT8),
    ],
    ids=lambda v: v.label() if isinstance(v, QuantSpec) else "",
)
def test_kernel_logits_match_fake_quant(base: nn.Module, spec: QuantSpec, kernel: str) -> None:
    fake = copy.deepcopy(base)
    quantized = quantize_linears(fake, spec)
    real = copy.deepcopy(base)
    report = swap_in_kernels(real, quantized, "cpu")
    assert report.counts() == {kernel: len(quantized)}, report.to_dict()
    assert report.fallbacks() == {}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = fake(ids).logits
        got = real(ids).logits
    assert got.dtype == torch.float32
    assert rel_err(got, ref) < BF16_TOL


def test_int4_offset_convention() -> None:
    """The kernel computes scale·(q − 8) + offset, so offset = (8 − zero)·scale reproduces (q − zero)·scale."""
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (32, 64), generator=gen, dtype=torch.uint8)
    scale = torch.rand(32, 2, generator=gen) + 0.5
    zero = torch.randint(0, 16, (32, 2), generator=gen).float()
    qw = QuantizedWeight(codes, scale, zero, group=32)
    sz = int4_scale_and_zero(qw, 32, torch.float32)
    assert sz.shape == (2, 32, 2)
    assert torch.allclose(sz[..., 0].t(), scale) and torch.allclose(sz[..., 1].t(), (8 - zero) * scale)
    layer = Int4WeightOnlyLinear.from_quantized(qw)
    x = torch.randn(3, 64, generator=gen)
    assert rel_err(layer(x), x @ qw.dequantize().t()) < 1e-2


def test_act_order_g_idx_runs_through_int4() -> None:
    """A GPTQ act-order g_idx (equal-width groups in shuffled columns) is exact via a column permutation."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(32, 128, generator=gen)
    perm = torch.randperm(128, generator=gen)
    qw = quantize_weight(w[:, perm], QuantSpec(wbits=4, group=32))  # quantize in permuted order
    inv = torch.argsort(perm)
    g_idx = (torch.arange(128) // 32)[inv].to(torch.int32)
    shuffled = QuantizedWeight(qw.codes[:, inv], qw.scale, qw.zero, 32, g_idx)
    layer = Int4WeightOnlyLinear.from_quantized(shuffled)
    assert layer.perm is not None
    x = torch.randn(4, 128, generator=gen)
    assert rel_err(layer(x), x @ shuffled.dequantize().t()) < 1e-2


def test_int8_layer_with_bias_and_3d_input() -> None:
    gen = torch.Generator().manual_seed(3)
    qw = quantize_weight(torch.randn(24, 48, generator=gen), QuantSpec(wbits=8, group=-1, sym=False))
    bias = torch.randn(24, generator=gen)
    layer = Int8WeightOnlyLinear.from_quantized(qw, bias)
    assert layer.row_offset is not None  # asymmetric 8-bit needs the shifted form
    x = torch.randn(2, 5, 48, generator=gen)
    y = layer(x)
    assert y.shape == (2, 5, 24)
    assert rel_err(y, x @ qw.dequantize().t() + bias) < 1e-2


def test_fallbacks_are_reported() -> None:
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 24), nn.Linear(24, 48), nn.Linear(48, 48), nn.Linear(48, 32))
    specs = [
        QuantSpec(wbits=4, group=32),  # N=24 is not a multiple of 16 and grouped scales: no kernel
        QuantSpec(wbits=4, group=-1),  # K=24: no int4 group size, and the int8 kernel needs K % 16 == 0
        QuantSpec(wbits=4, group=-1),  # K=48: no int4 group size (48 % 32), the int8 kernel takes it
        QuantSpec(wbits=5, group=16),  # grouped 5-bit: nothing takes it
    ]
    quantized = {str(i): quantize_weight(model[i].weight.data, spec) for i, spec in enumerate(specs)}
    x = torch.randn(3, 64, generator=gen)
    report = swap_in_kernels(model, quantized, "cpu")
    layers = report.layers
    assert layers["0"].kernel == DEQUANT and "multiple of 16" in layers["0"].reason and "int8:" in layers["0"].reason
    assert layers["1"].kernel == DEQUANT and "group 24" in layers["1"].reason and "in_features 24" in layers["1"].reason
    assert layers["2"].kernel == kernels.INT8 and layers["2"].reason.startswith("int4:")
    assert layers["3"].kernel == DEQUANT and layers["3"].bits == 5
    assert set(report.fallbacks()) == {"0", "1", "3"}
    assert report.counts() == {DEQUANT: 3, kernels.INT8: 1}
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], Int8WeightOnlyLinear)
    with torch.inference_mode():
        assert model(x).shape == (3, 32)


def test_kv_cache_capacity_arithmetic(base: nn.Module) -> None:
    config = base.config  # 2 layers, 2 kv heads, head_dim 128 / 4 = 32
    assert kv_bytes_per_token(config, torch.float16) == 2 * 2 * 32 * 2 * 2
    assert kv_bytes_per_token(config, torch.float32) == 2 * 2 * 32 * 2 * 4
    assert kv_cache_capacity(config, 1_000_000, torch.float16) == 1_000_000 // 512
    assert kv_cache_capacity(config, 100, torch.float16) == 0


def test_parse_bytes() -> None:
    from quantcli.bench.run import parse_bytes
    from quantcli.errors import InputError

    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("500MB") == 500 * 10**6 and parse_bytes("1e3") == 1000
    with pytest.raises(InputError):
        parse_bytes("lots")


def test_weight_bytes_and_latency_smoke(base: nn.Module) -> None:
    fake = copy.deepcopy(base)
    quantized = quantize_linears(fake, QuantSpec(wbits=4, group=32))
    real = copy.deepcopy(base)
    swap_in_kernels(real, quantized, "cpu")
    linear_fp32 = sum(qw.codes.numel() * 4 for qw in quantized.values())
    saved = weight_bytes(fake) - weight_bytes(real)
    assert saved > 0.8 * linear_fp32  # packed int4 + bf16 scales is ~1/7 of fp32
    rows = measure_prefill_decode(real, [8, 16], gen=3, batch=1, reps=2, warmup=1, device="cpu")
    assert [r["prompt_len"] for r in rows] == [8, 16]
    for r in rows:
        assert r["prefill_ms"] > 0 and r["decode_ms"] > 0 and r["decode_tok_s"] > 0
        assert r["prefill_ms_min"] <= r["prefill_ms"] <= r["prefill_ms_max"]


@pytest.mark.parametrize("shape", [(128, 256), (64, 128)])
def test_dense_prefill_path_matches_kernel(shape: tuple[int, int]) -> None:
    """The per-call unpacked weight reproduces the packed codes: dense path == kernel path == dequantized."""
    gen = torch.Generator().manual_seed(5)
    qw = quantize_weight(torch.randn(*shape, generator=gen), QuantSpec(wbits=4, group=32))
    layer = Int4WeightOnlyLinear.from_quantized(qw)
    assert layer.dense_unsupported() == ""
    assert rel_err(layer.dense_weight(), qw.dequantize()) < 1e-2
    x = torch.randn(40, shape[1], generator=gen)
    kernel_out = layer(x)
    layer.dense_from = 16
    assert rel_err(layer(x), x @ qw.dequantize().t()) < 1e-2
    assert rel_err(layer(x), kernel_out) < 1e-2
    threshold, reason, timings = kernels.choose_dense_threshold(layer, probe_tokens=(4, 16), reps=1)
    assert set(timings) == {"kernel_ms", "dense_ms"} and set(timings["dense_ms"]) == {4, 16}
    assert threshold in (None, 4, 16) and reason


def test_dense_path_refused_and_reported() -> None:
    """A layout the unpacker does not know (N not a multiple of 64 on CPU) keeps the kernel, with the reason."""
    model = nn.Sequential(nn.Linear(64, 48))
    quantized = {"0": quantize_weight(model[0].weight.data, QuantSpec(wbits=4, group=32))}
    report = swap_in_kernels(model, quantized, "cpu", dense_prefill=True)
    layer = report.layers["0"]
    assert layer.kernel == kernels.INT4_CPU and layer.dense_from is None and "multiple of 64" in layer.dense_reason
    assert report.path_counts(4000) == {kernels.INT4_CPU: 1}


def test_path_counts_follow_threshold() -> None:
    lk = kernels.LayerKernel(kernels.INT4_CPU, 4, 64, dense_from=128)
    report = kernels.KernelReport("cpu", {"a": lk, "b": kernels.LayerKernel(kernels.DEQUANT, 5, 16, "why")})
    assert report.path_counts(1) == {kernels.INT4_CPU: 1, kernels.DEQUANT: 1}
    assert report.path_counts(127) == {kernels.INT4_CPU: 1, kernels.DEQUANT: 1}
    assert report.path_counts(128) == {kernels.DENSE: 1, kernels.DEQUANT: 1}


def test_kv_capacity_in_blocks() -> None:
    from quantcli.bench.latency import kv_capacity_in_blocks

    cap = kv_capacity_in_blocks(100_000)
    assert cap["blocks"] == 6250 and cap["max_batch"] == 6250 // 188  # 3000 tokens → 188 blocks of 16


def test_phase_attention_keeps_logits_and_casts_prefill(base: nn.Module) -> None:
    """Prefill attention in bf16 on an fp32 stream changes logits only at bf16 precision; decode is untouched."""
    from quantcli.bench import paths

    model = copy.deepcopy(base)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids).logits
    assert paths.install_phase_attention(model) == ""
    seen = []
    orig = torch.nn.functional.scaled_dot_product_attention
    try:
        torch.nn.functional.scaled_dot_product_attention = lambda q, *a, **k: (seen.append(q.dtype), orig(q, *a, **k))[1]
        paths.set_prefill_attention_dtype(model, torch.bfloat16)
        with torch.inference_mode():
            got = model(ids).logits
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    assert seen and set(seen) == {torch.bfloat16}
    assert got.dtype == torch.float32 and 0 < rel_err(got, ref) < BF16_TOL


def _static_decode_logits(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits ``[steps, vocab]`` of greedy decode steps over a static cache after prefilling ``ids``."""
    from quantcli.bench.latency import cache_kwarg, position_kwargs, prefill_static

    token, cache = prefill_static(model, ids, ids.shape[1] + steps)
    out = []
    for i in range(steps):
        position = position_kwargs(model, torch.tensor([ids.shape[1] + i]))
        logits = model(input_ids=token, use_cache=True, **position, **{cache_kwarg(model): cache}).logits[:, -1]
        out.append(logits[0])
        token = logits.argmax(-1, keepdim=True)
    return torch.stack(out)


def test_packed_decode_attention_equals_repeated_heads(base: nn.Module) -> None:
    """Decode with query heads packed per KV head (4 heads over 2 KV heads here) gives the logits of
    transformers' eager attention, which copies each KV head to its query heads; a wrong head to KV
    head assignment (e.g. heads 0 and 2 on KV head 0) changes them."""
    from quantcli.bench import paths

    ref_model = copy.deepcopy(base)
    ref_model.config._attn_implementation = "eager"
    model = copy.deepcopy(base)
    assert paths.install_phase_attention(model) == ""
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    packed_queries = []
    orig = paths.packed_decode_sdpa

    def spy(module, query, *args, **kwargs):
        out = orig(module, query, *args, **kwargs)
        packed_queries.append(out is not None)
        return out

    with torch.inference_mode():
        ref = _static_decode_logits(ref_model, ids, 3)
        paths.packed_decode_sdpa = spy
        try:
            got = _static_decode_logits(model, ids, 3)
        finally:
            paths.packed_decode_sdpa = orig
    assert packed_queries.count(True) == 3 * 2  # every decode step, both layers; prefill not packed
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_bench_cli_reports_paths_and_writes_plot(tiny_model_dir, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from typer.testing import CliRunner

    from quantcli.cli.app import app

    runner = CliRunner()
    rtn = runner.invoke(app, ["rtn", str(tiny_model_dir), "--w4", "--group", "32", "-o", str(tmp_path / "rtn"), "-q"])
    assert rtn.exit_code == 0, rtn.output
    png = tmp_path / "plots" / "latency.png"
    res = runner.invoke(app, ["bench", str(tmp_path / "rtn"), "--prompt-lens", "8,16", "--gen", "2", "--reps", "1",
                              "--warmup", "0", "--baseline", "fp32", "--plot", str(png), "--profile-steps", "2", "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for length in ("8", "16"):
        chosen = out["paths"]["per_prompt_len"][length]
        assert chosen["prefill"]["attention"] in ("bfloat16", "float32")
        assert sum(chosen["decode"]["linears"].values()) == len(out["kernels"]["layers"])
    assert {"blocks", "max_batch"} <= set(out["kv_cache"])
    # the dense-prefill choice was measured at the lengths run (16 is no default probe)
    probed = [set(shape["dense_ms"]) for shape in out["kernels"]["dense_prefill_shapes"].values() if "dense_ms" in shape]
    assert probed and all({"8", "16"} <= keys for keys in probed), out["kernels"]["dense_prefill_shapes"]
    for model in (out, out["baseline"]):  # both decodes read the KV cache in place
        attention = model["decode_attention"]
        assert attention["packed"].startswith("query heads packed"), attention
        assert attention["kernel"] in ("sdpa", "quantcli::decode_attention"), attention  # chosen, with why
        assert "measured_ms" in attention or "native_unavailable" in attention, attention
    for model in (out, out["baseline"]):  # a per-phase profile at every prompt length
        for row in model["results"]:
            assert row["profile"]["prefill"]["wall_ms"] > 0 and "dequantize_ms" in row["profile"]["decode_per_step"]


def test_plot_without_matplotlib_is_one_line_error(monkeypatch, tmp_path) -> None:
    import builtins

    from quantcli.bench.plot import pyplot
    from quantcli.errors import InputError

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("matplotlib") else real_import(name, *a, **k))
    with pytest.raises(InputError, match="quantcli\\[plot\\]"):
        pyplot(tmp_path / "x.png")


def _multipass_dense_weight(layer: Int4WeightOnlyLinear) -> torch.Tensor:
    """The dense-prefill unpacking as it was before it was fused (five eager passes), kept as the reference."""
    n, k, g = layer.out_features, layer.in_features, layer.group_size
    v = layer.packed.view(n // 64, k, 32)
    q = torch.stack((v & 15, v >> 4), dim=1).transpose(2, 3).reshape(n, k // g, g)
    scale, offset = layer.scale_and_zero.unbind(-1)
    shift = (offset.float() - 8 * scale.float()).t().contiguous().to(torch.bfloat16)
    return torch.addcmul(shift[..., None], q.to(torch.bfloat16), scale.t().contiguous()[..., None]).view(n, k)


@pytest.mark.parametrize(
    "spec, act_order",
    [
        (QuantSpec(wbits=4, group=64, sym=False), False),
        (QuantSpec(wbits=4, group=32, sym=True), False),
        (QuantSpec(wbits=4, group=-1, sym=False), False),
        (QuantSpec(wbits=3, group=128, sym=False), False),
        (QuantSpec(wbits=2, group=32, sym=False), False),
        (QuantSpec(wbits=4, group=64, sym=False), True),
    ],
    ids=lambda v: v.label() if isinstance(v, QuantSpec) else ("g_idx" if v else "in-order"),
)
def test_every_unpacker_equals_multipass_bit_for_bit(spec: QuantSpec, act_order: bool) -> None:
    """Each unpacker this machine runs (native AVX-512 loop, torch.compile'd, eager) and the model's
    own dense weight equal the five-pass reference bit for bit. Catches an unpacker that swaps
    nibbles or block rows, drops the bf16 rounding of the shift, rounds ``q·scale`` before adding,
    reads the scale/offset halves the wrong way round, or reads a permuted (g_idx) layout in the
    wrong order."""
    _, how = kernels.fused_unpacker()
    if "torch.compile failed" in how:
        pytest.skip(f"no compiler for torch.compile here: {how}")
    assert how in (kernels.UNPACK_NATIVE, kernels.UNPACK_FUSED)  # not a fallback because one disagreed
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(192, 256, generator=gen) * torch.rand(192, 1, generator=gen)
    qw = quantize_weight(w, spec)
    if act_order:
        g_idx = (torch.arange(256) // spec.group)[torch.randperm(256, generator=gen)]
        qw = QuantizedWeight(qw.codes, qw.scale, qw.zero, spec.group, g_idx=g_idx.int())
    layer = Int4WeightOnlyLinear.from_quantized(qw)
    assert (layer.perm is not None) == act_order
    ref = _multipass_dense_weight(layer)
    for name, unpack, _ in kernels.unpackers():
        if unpack is None:
            continue
        got = unpack(layer.packed, layer.scale_and_zero, layer.group_size).t()
        assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), ref.view(torch.int16)), name
    fused = layer.dense_weight()
    assert fused.dtype == torch.bfloat16 and torch.equal(fused.view(torch.int16), ref.view(torch.int16))
    # and the dense path still computes the quantized layer (columns in kernel order)
    x = torch.randn(3, 256, generator=gen)
    cols = x if layer.perm is None else x[:, layer.perm]
    assert rel_err(cols.bfloat16().float() @ fused.float().t(), x @ qw.dequantize().t()) < BF16_TOL


def test_the_native_unpacker_runs_where_the_cpu_has_avx512_bf16() -> None:
    """Where the CPU has AVX-512 BF16 and a C compiler is installed, the dense prefill path uses the
    native unpacker: catches a build or load that fails silently (the slower unpackers would hide it)."""
    import shutil

    from quantcli.bench import native

    if not (native.cpu_has_avx512_bf16() and shutil.which("cc")):
        pytest.skip("no AVX-512 BF16 or no C compiler here: the compiled unpacker is used")
    assert native.native_status() == ""
    assert kernels.fused_unpacker()[1] == kernels.UNPACK_NATIVE


def test_dense_choice_probed_at_the_lengths_run(monkeypatch) -> None:
    """A fake timer where dense wins only above 1000 tokens: the choice flips at 2000, the first run
    length past it. Catches probing a fixed range (≤ 512 tokens: never dense) or an off-by-one
    threshold (dense already at 1000)."""
    from quantcli.bench.run import BenchParams, dense_probe_tokens

    def fake_time(module, x, reps):
        rows = x.shape[0]
        dense = module.dense_from == 0
        return (1.0 if rows > 1000 else 3.0) if dense else 2.0

    monkeypatch.setattr(kernels, "time_call", fake_time)
    params = BenchParams(prompt_lens=(100, 1000, 2000, 4000), batch=1)
    probes = dense_probe_tokens(params)
    assert {100, 1000, 2000, 4000} <= set(probes)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 128))
    quantized = {n: quantize_weight(model.get_submodule(n).weight.data, QuantSpec(wbits=4, group=32)) for n in ("0", "1")}
    report = swap_in_kernels(model, quantized, "cpu", dense_prefill=True, probe_tokens=probes)
    for layer in report.layers.values():
        assert layer.dense_from == 2000 and "4000" in layer.dense_reason
        assert layer.path(1000) == kernels.INT4_CPU and layer.path(2000) == layer.path(4000) == kernels.DENSE
    assert report.unpack  # the report says how the dense path unpacks
    assert set(report.shapes["Int4WeightOnlyLinear[64x128]g32"]["dense_ms"]) == set(probes)
    # twice the batch: every probe doubles
    assert {200, 2000, 4000, 8000} <= set(dense_probe_tokens(BenchParams(prompt_lens=(100, 1000, 2000, 4000), batch=2)))
    del gen


def test_native_unpacker_builds_in_a_temporary_directory_when_the_cache_cannot_be_made(monkeypatch, tmp_path) -> None:
    """A cache directory that cannot be made (a read-only home, as on some CI runners) must not
    cost the native unpacker: it builds under the temporary directory instead. Catches a cache
    directory used without checking that it can be made."""
    from quantcli.bench import native

    blocked = tmp_path / "home"
    blocked.write_text("a file where the cache's parent should be: no directory can be made under it, even as root")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked / ".cache"))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert native._cache_dir() == tmp_path / "tmp" / f"quantcli-{os.getuid()}"
