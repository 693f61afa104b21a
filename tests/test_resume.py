"""Resume: a stage killed after layer k and run again equals an uninterrupted run."""

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from quantcli.algos.driver import LayerContext, LayerResult
from quantcli.artifact import open_artifact
from quantcli.cli.app import app
from quantcli.errors import NumericalError
from quantcli.loading import load_input
from quantcli.quant import QuantSpec
from quantcli.resume import KILL_ENV, Interrupted, concat_safetensors
from quantcli.stage import Calibration, RunParams, StageParams, run_stage

CPU = RunParams(device="cpu")

runner = CliRunner()


def _args(stage, model_dir, out, *extra):
    text = model_dir.parent / "text.txt"
    common = ["--w4", "--group", "32", "--dataset", str(text), "--nsamples", "4", "--seqlen", "32", "-q", "-o", str(out)]
    return [stage, str(model_dir), *common, *extra]


def _tensors(artifact_dir):
    artifact = open_artifact(artifact_dir)
    return {name: artifact.tensors(name) for name in artifact.manifest.files}


def _assert_identical(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].keys() == tb[name].keys(), name
        for key in ta[name]:
            assert torch.equal(ta[name][key], tb[name][key]), (name, key)


@pytest.mark.parametrize("stage", ["gptq", "awq"])
def test_sigkill_after_layer_then_rerun_equals_uninterrupted(stage, tiny_model_dir, tmp_path):
    ref = runner.invoke(app, _args(stage, tiny_model_dir, tmp_path / "ref"))
    assert ref.exit_code == 0, ref.output
    out = tmp_path / "out"
    env = {**os.environ, KILL_ENV: "0", "PYTHONPATH": os.getcwd()}
    killed = subprocess.run([sys.executable, "-m", "quantcli", *_args(stage, tiny_model_dir, out)], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    partial = tmp_path / ".out.partial"
    assert not out.exists() and (partial / "layer-00000.json").is_file() and not (partial / "layer-00001.json").exists()
    rerun = runner.invoke(app, _args(stage, tiny_model_dir, out))
    assert rerun.exit_code == 0, rerun.output
    assert "starting over" not in rerun.stderr and not partial.exists()
    _assert_identical(ref.stdout.strip(), out)
    assert [m["layer"] for m in open_artifact(out).manifest.metrics["layers"]] == [0, 1]


@dataclass(frozen=True)
class _Breaks:
    """Stand-in algorithm: scales each layer's first norm by ``scale``; layer ``at`` gets a NaN
    norm weight (``how="nan"``) or raises Ctrl-C (``how="ctrl-c"``)."""

    at: int
    how: str
    scale: float = 2.0
    needs_fp_stream: bool = False

    def run_layer(self, ctx: LayerContext) -> LayerResult:
        if ctx.index == self.at and self.how == "ctrl-c":
            raise KeyboardInterrupt
        weight = ctx.module.input_layernorm.weight.data
        new = torch.full_like(weight, float("nan")) if ctx.index == self.at else weight * self.scale
        return LayerResult(overrides={"input_layernorm.weight": new})


def _overrides(artifact):
    return artifact.tensors("overrides.safetensors")


@pytest.mark.parametrize("how", ["nan", "ctrl-c"])
def test_nan_and_ctrl_c_stop_at_the_layer_and_leave_a_resumable_state(how, tiny_model_dir, tmp_path):
    loaded = load_input(str(tiny_model_dir), stream=True)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "out"
    error = NumericalError if how == "nan" else Interrupted
    with pytest.raises(error, match="layer 1|after 1 of 2 layers"):
        run_stage(StageParams("rtn", _Breaks(1, how), QuantSpec(group=32), {}), loaded, out, Calibration(ids, {}), CPU)
    assert not out.exists() and (tmp_path / ".out.partial" / "layer-00000.json").is_file()
    artifact = run_stage(StageParams("rtn", _Breaks(-1, how), QuantSpec(group=32), {}), loaded, out, Calibration(ids, {}), CPU)
    assert [m["layer"] for m in artifact.manifest.metrics["layers"]] == [0, 1]
    assert not (tmp_path / ".out.partial").exists()


def test_concat_safetensors_keeps_every_tensor(tmp_path):
    parts = []
    for i, dtype in enumerate([torch.uint8, torch.float32, torch.bfloat16]):
        parts.append(tmp_path / f"p{i}.safetensors")
        save_file({f"t{i}.a": torch.arange(7 + i).to(dtype), f"t{i}.b": torch.ones(3, i + 1, dtype=dtype)}, str(parts[-1]))
    merged = load_file(str(concat_safetensors(parts, tmp_path / "all.safetensors")))
    expected = {k: v for p in parts for k, v in load_file(str(p)).items()}
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) and merged[k].dtype == expected[k].dtype for k in expected)
    assert load_file(str(concat_safetensors([], tmp_path / "empty.safetensors"))) == {}


def test_changed_parameter_starts_over_with_a_message(tiny_model_dir, tmp_path, capsys):
    loaded = load_input(str(tiny_model_dir), stream=True)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    out, spec = tmp_path / "out", QuantSpec(group=32)
    with pytest.raises(Interrupted):
        run_stage(StageParams("rtn", _Breaks(1, "ctrl-c", 2.0), spec, {"scale": 2.0}), loaded, out, Calibration(ids, {}), CPU)
    capsys.readouterr()
    artifact = run_stage(StageParams("rtn", _Breaks(-1, "-", 3.0), spec, {"scale": 3.0}), loaded, out, Calibration(ids, {}), CPU)
    lines = [line for line in capsys.readouterr().err.splitlines() if "starting over" in line]
    assert len(lines) == 1 and "params" in lines[0] and "spec" not in lines[0]
    fresh = run_stage(StageParams("rtn", _Breaks(-1, "-", 3.0), spec, {"scale": 3.0}), loaded, tmp_path / "fresh", Calibration(ids, {}), CPU)
    got, ref = _overrides(artifact), _overrides(fresh)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)  # layer 0 recomputed, not reused


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_under_8_bits_are_stored_packed_and_schema_1_still_reads(bits, tmp_path):
    from quantcli.artifact import BaseModelRef, Manifest, write_artifact
    from quantcli.models.weights import QUANTIZED_FILE, quantized_payload, read_quantized
    from quantcli.quant import QuantizedWeight

    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (6, 64), generator=gen).to(torch.uint8)
    qw = QuantizedWeight(codes, torch.rand(6, 2) + 0.1, torch.randint(0, 2**bits, (6, 2)).float(), 32, None)
    base = BaseModelRef("m", "0" * 64, "LlamaForCausalLM")
    packed = quantized_payload({"lin": qw}, bits)
    assert packed["lin.qweight"].dtype == torch.int32 and packed["lin.qweight"].numel() * 4 == codes.numel() * bits // 8
    for schema, payload in ((2, packed), (1, quantized_payload({"lin": qw}))):  # schema 1: one uint8 per code
        artifact = write_artifact(tmp_path / f"s{schema}", Manifest("rtn", base, schema=schema), {QUANTIZED_FILE: payload})
        back = read_quantized(artifact)["lin"]
        assert torch.equal(back.codes, codes) and back.group == 32 and torch.equal(back.zero, qw.zero)
