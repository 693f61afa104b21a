"""quantcli::int4_gemv, the native int4 GEMV for CPU decode: its math, its use from compiled graphs,
and how swap_in_kernels chooses and reports it."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from quantcli.bench import gemv, kernels
from quantcli.bench.kernels import INT4_CPU, INT4_GEMV, Int4WeightOnlyLinear, swap_in_kernels
from quantcli.quant import QuantizedWeight, QuantSpec, quantize_weight

BF16_OUT = 4e-3  # relative error of a bf16 output rounded from an exact float32 sum (≈ 2^-9), with margin


def _native_or_skip() -> None:
    why = gemv.gemv_status()
    if why:
        pytest.skip(f"quantcli::int4_gemv does not run here: {why}")


def _layer(n: int, k: int, group: int, seed: int = 0) -> tuple[Int4WeightOnlyLinear, QuantizedWeight]:
    gen = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, QuantSpec(wbits=4, group=group))
    return Int4WeightOnlyLinear.from_quantized(qw), qw


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(
    "n,k,group,rows",
    [(64, 128, 32, 1), (192, 576, 64, 1), (576, 256, 128, 3), (128, 512, 256, 2), (64, 64, 32, 5)],
)
def test_gemv_equals_the_dequantized_weight(n, k, group, rows) -> None:
    """``x @ wᵀ`` for the layer's own dequantized weight, to bf16 output precision, at every group size
    the kernels take and several rows. (64, 128, 32) has 4 (block, group) units for 2 threads, so one
    block is split between threads. Catches: the two nibbles of a byte swapped, pairs of ``k`` crossed,
    the offset term dropped or with the wrong constant, a split block summed twice or not at all."""
    _native_or_skip()
    torch.set_num_threads(2)
    layer, qw = _layer(n, k, group)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = gemv.int4_gemv(x, layer.packed, layer.scale_and_zero, layer.group_size)
    ref = x.float() @ qw.dequantize().t()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert rel_err(got, ref) < BF16_OUT
    aten = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.packed, layer.group_size, layer.scale_and_zero)
    assert rel_err(got, aten) < BF16_OUT


def test_gemv_scales_activations_per_group() -> None:
    """Activations of very different size per group (1e3 in the first, 1e-3 in the second) while the
    first group's weights are all zero, so the output comes from the small group alone. The kernel
    puts each group in its own 16-bit fixed point: a scale shared by the row (set by its largest
    value) rounds the small group to nothing, an error of about 1."""
    _native_or_skip()
    layer, qw = _layer(64, 128, 64, seed=2)
    codes, scale, zero = qw.codes.clone(), qw.scale.clone(), qw.zero.clone()
    scale[:, 0] = 0.0  # group 0: w = (q − zero)·0 = 0
    qw = QuantizedWeight(codes, scale, zero, qw.group)
    layer = Int4WeightOnlyLinear.from_quantized(qw)
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(1, 64, generator=gen) * 1e3, torch.randn(1, 64, generator=gen) * 1e-3], dim=1).bfloat16()
    got = gemv.int4_gemv(x, layer.packed, layer.scale_and_zero, layer.group_size)
    ref = x.float() @ qw.dequantize().t()
    assert rel_err(got, ref) < BF16_OUT


def test_gemv_runs_inside_a_compiled_graph() -> None:
    """The op has a fake implementation, so torch.compile (fullgraph) traces through the layer and
    calls it: the compiled output equals the eager one. Catches a missing or wrongly shaped fake."""
    _native_or_skip()
    layer, _ = _layer(128, 256, 64)
    layer.gemv_upto = 1
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
    compiled = torch.compile(lambda t: layer(t) * 2, fullgraph=True)
    with torch.inference_mode():
        assert torch.equal(compiled(x), layer(x) * 2)


def test_layer_routes_rows_to_the_gemv_up_to_its_threshold(monkeypatch) -> None:
    """With ``gemv_upto = 2`` calls of 1-2 rows go to quantcli::int4_gemv and 3 rows to ATen's kernel.
    Catches an inverted or off-by-one comparison."""
    _native_or_skip()
    layer, _ = _layer(64, 128, 32)
    layer.gemv_upto = 2
    calls = []
    real = torch.ops.quantcli.int4_gemv

    def spy(x, *args):
        calls.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(torch.ops.quantcli, "int4_gemv", spy)
    for rows in (1, 2, 3):
        layer(torch.randn(rows, 128))
    assert calls == [1, 2]


def test_swap_in_kernels_reports_the_measured_gemv_choice(monkeypatch) -> None:
    """A fake timer where the GEMV wins at 1 row only: every int4 layer runs it up to 1 row, the
    report gives the reason and both timings, and decode (1 row) counts the GEMV path while 2 rows
    count ATen's kernel. Catches a choice that ignores the timings or a report that drops it."""
    _native_or_skip()

    def fake_time(module, x, reps):
        gemv_on = module.gemv_upto is not None and x.shape[0] <= module.gemv_upto
        return (1.0 if x.shape[0] == 1 else 3.0) if gemv_on else 2.0

    monkeypatch.setattr(kernels, "time_call", fake_time)
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 128))
    quantized = {n: quantize_weight(model.get_submodule(n).weight.data, QuantSpec(wbits=4, group=32)) for n in ("0", "1")}
    report = swap_in_kernels(model, quantized, "cpu", decode_gemv=True, gemv_rows=(1, 2))
    assert {lk.gemv_upto for lk in report.layers.values()} == {1}
    assert report.path_counts(1) == {INT4_GEMV: 2} and report.path_counts(2) == {INT4_CPU: 2}
    shapes = report.to_dict()["decode_gemv_shapes"]
    assert len(shapes) == 2 and all(s["gemv_ms"] and s["aten_ms"] and "up to 1 rows" in s["reason"] for s in shapes.values())
    assert all(m.gemv_upto == 1 for m in model if isinstance(m, Int4WeightOnlyLinear))


def test_without_the_native_gemv_every_layer_keeps_atens_kernel(monkeypatch) -> None:
    """Where the op cannot run (here: its status says no compiler) the layers keep ATen's kernel and
    the report says why, in one line, instead of failing."""
    monkeypatch.setattr(gemv, "gemv_status", lambda: "c++ failed: no compiler")
    model = nn.Sequential(nn.Linear(128, 64))
    quantized = {"0": quantize_weight(model[0].weight.data, QuantSpec(wbits=4, group=32))}
    report = swap_in_kernels(model, quantized, "cpu", decode_gemv=True)
    assert report.layers["0"].gemv_upto is None and report.layers["0"].gemv_reason == "c++ failed: no compiler"
    assert report.to_dict()["decode_gemv_unavailable"] == "c++ failed: no compiler"
    assert report.path_counts(1) == {INT4_CPU: 1}


def test_unsupported_shapes_are_refused_before_the_op() -> None:
    """A 96-row weight (not whole 64-row blocks) gets a reason, not a C++ error from the op."""
    assert "multiple of 64" in gemv.shape_unsupported(96, 128, 32)
    assert "groups of 16-256" in gemv.shape_unsupported(64, 96, 24)
    assert gemv.shape_unsupported(64, 128, 32) == ""


def test_the_native_gemv_builds_where_the_cpu_has_the_instructions() -> None:
    """On a CPU with AVX-512 BF16, VBMI and VNNI and a C++ compiler, the op builds and loads: catches
    a build that breaks and silently leaves every layer on the slower ATen kernel."""
    from quantcli.bench.native import cpu_has_avx512_bf16

    flags = gemv._cpu_flags()
    if not (cpu_has_avx512_bf16() and {"avx512vbmi", "avx512_vnni"} <= flags and shutil.which("c++")):
        pytest.skip("this CPU or machine cannot build the native GEMV")
    assert gemv.gemv_status() == ""


def test_the_profile_counts_the_gemv_as_a_matmul() -> None:
    """profile_phases' split puts quantcli::int4_gemv's time with the matmuls, where the bounds of
    benchmarks/speed.py look for the quantized linears: catches the op's time landing in "other"."""
    from quantcli.bench.paths import _split

    _native_or_skip()
    layer, _ = _layer(576, 576, 64)
    layer.gemv_upto = 1
    x = torch.randn(1, 576).bfloat16()
    with torch.inference_mode(), torch.profiler.profile() as prof:
        for _ in range(20):
            layer(x)
    averages = prof.key_averages()
    gemv_ms = sum(ev.self_cpu_time_total for ev in averages if ev.key == "quantcli::int4_gemv") / 1e3  # all 20 calls
    assert gemv_ms > 0
    assert _split(averages, 1.0, 1)["matmul_ms"] >= gemv_ms - 0.001  # _split rounds to 1 µs


# ---------------------------------------------------------------------------------------------
# quantcli::bf16_gemv: the dense bf16 linears a model keeps (lm_head; a bf16 baseline's layers)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k,rows", [(64, 576, 1), (37, 100, 2), (7, 40, 3), (1024, 33, 1)])
def test_bf16_gemv_equals_the_float_product(n, k, rows) -> None:
    """``x @ wᵀ`` to bf16 output precision, with ``k`` not a multiple of 32 (masked tail), rows of
    ``w`` not a multiple of the 4 per pass, and several rows of ``x``. Catches a dropped tail, a
    row of a pass skipped or written twice, rows of ``x`` mixed up."""
    _native_or_skip()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(5)
    w, x = torch.randn(n, k, generator=gen).bfloat16(), torch.randn(rows, k, generator=gen).bfloat16()
    got = gemv.bf16_gemv(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert rel_err(got, x.float() @ w.float().t()) < BF16_OUT


def _tied_model() -> nn.Module:
    import conftest

    return conftest.tiny_llama(0, hidden=64, intermediate=128, vocab=128, tie=True).to(torch.bfloat16)


def test_dense_gemv_keeps_tied_weights_and_logits(monkeypatch) -> None:
    """swap_in_dense_gemv on a bf16 model with a tied lm_head: every dense linear is wrapped, the
    lm_head still shares the embedding's tensor, one-token logits stay within bf16 precision of
    F.linear's, and the calls reach the op. A fake timer makes the GEMV win at one row. Catches a
    swap that copies (unties) the weight, skips layers, or never calls the op."""
    _native_or_skip()
    monkeypatch.setattr(kernels, "time_call", lambda module, x, reps: 1.0 if module.gemv_upto else 2.0)
    model = _tied_model()
    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = model(ids).logits
    report = kernels.swap_in_dense_gemv(model, (1,))
    assert report["layers"] == report["layers_with_gemv"] == 2 * 7 + 1 and report["unavailable"] == ""
    assert all(s["gemv_upto"] == 1 and s["gemv_ms"] and s["aten_ms"] for s in report["shapes"].values())
    assert isinstance(model.lm_head, kernels.DenseGemvLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    calls = []
    real = torch.ops.quantcli.bf16_gemv
    monkeypatch.setattr(torch.ops.quantcli, "bf16_gemv", lambda x, w: (calls.append(x.shape[0]), real(x, w))[1])
    with torch.inference_mode():
        got = model(ids).logits
    assert calls.count(1) == 15
    assert rel_err(got, ref) < 2e-2


def test_dense_gemv_routes_by_rows_and_dtype(monkeypatch) -> None:
    """Up to ``gemv_upto`` bf16 rows go to the op; more rows, or the weight cast to fp32 (a stream
    dtype chosen per prompt length), go to F.linear. Catches an inverted comparison or the op fed
    an fp32 weight."""
    _native_or_skip()
    layer = kernels.DenseGemvLinear(nn.Linear(64, 32).bfloat16(), gemv_upto=2)
    calls = []
    real = torch.ops.quantcli.bf16_gemv
    monkeypatch.setattr(torch.ops.quantcli, "bf16_gemv", lambda x, w: (calls.append(x.shape[0]), real(x, w))[1])
    for rows in (1, 2, 3):
        layer(torch.randn(rows, 64).bfloat16())
    layer.float()
    layer(torch.randn(1, 64))
    assert calls == [1, 2]


def test_dense_gemv_runs_inside_a_compiled_graph() -> None:
    """The op's fake gives the compiled graph the right shape: compiled equals eager."""
    _native_or_skip()
    layer = kernels.DenseGemvLinear(nn.Linear(96, 40, bias=False).bfloat16(), gemv_upto=1)  # a bias add fuses with "+ 1" (one rounding)
    x = torch.randn(1, 1, 96).bfloat16()
    compiled = torch.compile(lambda t: layer(t) + 1, fullgraph=True)
    with torch.inference_mode():
        assert torch.equal(compiled(x), layer(x) + 1)


def test_without_the_native_gemv_dense_layers_stay_as_they_are(monkeypatch) -> None:
    monkeypatch.setattr(gemv, "gemv_status", lambda: "c++ failed: no compiler")
    model = nn.Sequential(nn.Linear(64, 32).bfloat16())
    report = kernels.swap_in_dense_gemv(model)
    assert report == {"layers": 0, "layers_with_gemv": 0, "shapes": {}, "unavailable": "c++ failed: no compiler"}
    assert type(model[0]) is nn.Linear


def test_the_stream_dtype_counts_the_dense_linears() -> None:
    """plan_attention picks the stream dtype by attention plus the dense linears that follow it: with
    attention alike in both dtypes and an lm_head three times slower in fp32, bf16 wins. Catches a
    plan that looks at attention alone (which chose an fp32 lm_head by noise at 100 tokens)."""
    from quantcli.bench.paths import plan_attention

    config = _tied_model().config
    dense = {torch.bfloat16: 30.0, torch.float32: 90.0}  # far beyond any attention time here
    plans = plan_attention(config, [8], 2, 1, (torch.bfloat16, torch.float32), torch.device("cpu"), dense)
    assert plans[8]["kv_cache"] == torch.bfloat16 and plans[8]["decode_dense_linears_ms"] == {"bfloat16": 30.0, "float32": 90.0}
    dense = {torch.bfloat16: 90.0, torch.float32: 30.0}
    assert plan_attention(config, [8], 2, 1, (torch.bfloat16, torch.float32), torch.device("cpu"), dense)[8]["kv_cache"] == torch.float32


# ---------------------------------------------------------------------------------------------
# quantcli::int4_gemm_amx: prefill rows through AMX tiles, the weight unpacked once per call
# ---------------------------------------------------------------------------------------------


def _amx_or_skip() -> None:
    why = gemv.amx_status()
    if why:
        pytest.skip(f"quantcli::int4_gemm_amx does not run here: {why}")


@pytest.mark.parametrize("n,k,group,rows", [(64, 128, 32, 1), (192, 576, 64, 17), (128, 512, 256, 100), (128, 256, 128, 33)])
def test_amx_gemm_equals_the_dequantized_weight(n, k, group, rows) -> None:
    """``x @ wᵀ`` of the layer's own dequantized weight to bf16 precision (the weight is rounded to
    bf16 in the tiles, as the dense path does), for row counts that fill whole 16-row tiles or not,
    and every group size it takes. Catches k-pairs or columns out of VNNI order, a group's scale
    applied to the wrong columns, rows past ``M`` written or the last partial tile dropped."""
    _amx_or_skip()
    torch.set_num_threads(2)
    layer, qw = _layer(n, k, group)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(6)).bfloat16()
    got = gemv.int4_gemm_amx(x, layer.packed, layer.scale_and_zero, layer.group_size)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert rel_err(got, x.float() @ qw.dequantize().t()) < 2 * BF16_OUT


def test_layer_routes_rows_gemv_then_amx_then_dense(monkeypatch) -> None:
    """With ``gemv_upto = 1``, ``amx`` and ``dense_from = 64``: one row runs the GEMV, 2-63 the AMX
    GEMM, 64 the dense path. Catches the AMX branch shadowing the GEMV or the dense path."""
    _amx_or_skip()
    layer, _ = _layer(64, 128, 32)
    layer.gemv_upto, layer.amx, layer.dense_from = 1, True, 64
    calls = []
    real = torch.ops.quantcli.int4_gemm_amx
    monkeypatch.setattr(torch.ops.quantcli, "int4_gemm_amx", lambda x, *a: (calls.append(x.shape[0]), real(x, *a))[1])
    for rows in (1, 2, 63, 64):
        layer(torch.randn(rows, 128))
    assert calls == [2, 63]
    lk = kernels.LayerKernel(INT4_CPU, 4, 32, dense_from=64, gemv_upto=1, amx=True)
    assert [lk.path(t) for t in (1, 2, 63, 64)] == [INT4_GEMV, kernels.INT4_AMX, kernels.INT4_AMX, kernels.DENSE]


@pytest.mark.parametrize("amx_wins", [True, False])
def test_swap_in_kernels_reports_the_measured_amx_choice(monkeypatch, amx_wins) -> None:
    """A fake timer decides: where the AMX GEMM is faster at every probe the layers use it and
    prefill counts it; where not, ATen's kernel stays. Both timings are in the report. Catches a
    choice that ignores the timings."""
    _amx_or_skip()

    def fake_time(module, x, reps):
        if module.dense_from is not None and x.shape[0] >= module.dense_from:
            return 100.0  # the dense path never wins here
        return (1.0 if amx_wins else 3.0) if module.amx else 2.0

    monkeypatch.setattr(kernels, "time_call", fake_time)
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 128))
    quantized = {n: quantize_weight(model.get_submodule(n).weight.data, QuantSpec(wbits=4, group=32)) for n in ("0", "1")}
    report = swap_in_kernels(model, quantized, "cpu", dense_prefill=True, probe_tokens=(8, 32))
    path = kernels.INT4_AMX if amx_wins else INT4_CPU
    assert report.path_counts(32) == {path: 2} and all(m.amx == amx_wins for m in model)
    shapes = report.to_dict()["prefill_amx_shapes"]
    assert len(shapes) == 2 and all(s["amx"] == amx_wins and set(s["amx_ms"]) == {8, 32} for s in shapes.values())


def test_without_amx_the_layers_keep_atens_kernel(monkeypatch) -> None:
    monkeypatch.setattr(gemv, "amx_status", lambda: "this CPU has no AMX-BF16 tiles")
    model = nn.Sequential(nn.Linear(128, 64))
    quantized = {"0": quantize_weight(model[0].weight.data, QuantSpec(wbits=4, group=32))}
    report = swap_in_kernels(model, quantized, "cpu", dense_prefill=True, probe_tokens=(8,))
    assert not report.layers["0"].amx and report.layers["0"].amx_reason == "this CPU has no AMX-BF16 tiles"
    assert report.to_dict()["prefill_amx_unavailable"] == "this CPU has no AMX-BF16 tiles"


def test_the_amx_gemm_runs_where_the_cpu_has_amx() -> None:
    """On a CPU with AMX-BF16 (and the GEMV's instructions) and a compiler, the op builds, Linux grants
    the tile state and it runs: catches a build or permission failure that silently keeps ATen's kernel."""
    flags = gemv._cpu_flags()
    if not ({"amx_tile", "amx_bf16", "avx512vbmi", "avx512_vnni"} <= flags and shutil.which("c++")):
        pytest.skip("this CPU or machine cannot run the AMX GEMM")
    assert gemv.amx_status() == ""
