"""The loading layer: every artifact kind replays exactly, packed MoE checkpoints load whole.

For an artifact made by a stage, ``load_input(artifact, quantized=False)`` must compute the base
model's function (the stage's fp transform replayed, e.g. AWQ's scales folded), and
``load_input(artifact, quantized=True)`` must be the model the stage left behind: every
quantized linear holding exactly its dequantized codes, on top of the replayed transform.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_TEXT, char_tokenizer, tiny_models
from quantcli.algos.awq import AWQ, AWQParams
from quantcli.algos.gptq import GPTQ, GPTQParams
from quantcli.algos.rtn import RTN
from quantcli.artifact import BaseModelRef, Manifest, write_artifact
from quantcli.errors import ArtifactError
from quantcli.loading import load_input, materialize
from quantcli.models.weights import read_quantized
from quantcli.quant import QuantSpec
from quantcli.stage import Calibration, RunParams, StageParams, run_stage

SPEC = QuantSpec(3, 16)
IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
ALGOS = {"rtn": RTN(), "awq": AWQ(AWQParams(n_grid=4, search_dtype="float32")), "gptq": GPTQ(GPTQParams())}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Saved tiny models by architecture (grouped-query attention: 4 heads, 2 KV heads; random norms)."""
    made = {}

    def get(arch: str):
        if arch not in made:
            made[arch] = tmp_path_factory.mktemp(arch) / "model"
            tiny_models()[arch]().save_pretrained(made[arch])
            char_tokenizer(TINY_TEXT).save_pretrained(made[arch])
        return made[arch]

    return get


def run(kind: str, source, out):
    """Run stage ``kind`` on ``source`` (a model dir or an artifact); the artifact and the model it left behind."""
    loaded = load_input(str(source), quantized=False)
    artifact = run_stage(StageParams(kind, ALGOS[kind], SPEC), loaded, out, Calibration(IDS, {}), RunParams("cpu", batch=2))
    return artifact, loaded.model


@torch.no_grad()
@pytest.mark.parametrize("arch,chain", [
    ("LlamaForCausalLM", ("rtn",)),
    ("LlamaForCausalLM", ("awq",)),
    ("LlamaForCausalLM", ("awq", "gptq")),
    ("Gemma3ForCausalLM", ("awq", "gptq")),  # offset norms made canonical, q/k norms
])
def test_replay_is_exact(model_dirs, arch, chain, tmp_path):
    model_dir = model_dirs(arch)
    base = load_input(str(model_dir)).model
    base_logits = base(IDS).logits
    source = model_dir
    for i, kind in enumerate(chain):
        artifact, left_behind = run(kind, source, tmp_path / f"{i}-{kind}")
        source = artifact.path

    fp = load_input(str(source), quantized=False).model
    assert rel(fp(IDS).logits, base_logits) < 1e-4  # the next stage starts from the base model's function
    if "awq" in chain:  # and really from the transformed one: the scales are folded into the norms
        norm = "model.layers.0.input_layernorm.weight"
        assert not torch.allclose(fp.get_parameter(norm), base.get_parameter(norm))

    quantized = load_input(str(source))
    codes = read_quantized(artifact)
    assert codes and set(codes) == set(quantized.quantized)
    for name, qw in codes.items():
        assert torch.equal(quantized.model.get_submodule(name).weight, qw.dequantize()), name
    torch.testing.assert_close(quantized.model(IDS).logits, left_behind(IDS).logits, rtol=1e-5, atol=1e-5)
    assert rel(quantized.model(IDS).logits, base_logits) > 1e-3  # 3-bit codes really are in


def test_unregistered_kind_is_one_line(model_dirs, tmp_path, monkeypatch):
    from quantcli.algos import replay as registry

    monkeypatch.delitem(registry._REPLAYS, "smooth")  # a declared kind whose algorithm registered nothing
    artifact, _ = run("rtn", model_dirs("LlamaForCausalLM"), tmp_path / "rtn")
    odd = write_artifact(tmp_path / "smooth", Manifest(kind="smooth", base_model=artifact.manifest.base_model), {})
    with pytest.raises(ArtifactError, match="no algorithm registers a replay for artifact kind 'smooth'"):
        materialize(odd)


def test_stream_env_switch(tiny_model_dir, monkeypatch):
    """QUANTCLI_STREAM=0 loads the whole model (the path streaming is compared against); by
    default a safetensors model streams. Fails if the switch is ignored either way."""
    streamed = load_input(str(tiny_model_dir), stream=True)
    assert streamed.stream is not None and streamed.model.device.type == "meta"
    monkeypatch.setenv("QUANTCLI_STREAM", "0")
    eager = load_input(str(tiny_model_dir), stream=True)
    assert eager.stream is None and next(eager.model.parameters()).device.type == "cpu"


def test_stage_cost_in_forwards(model_dirs, tmp_path):
    """Each calibrated layer records the seconds of its propagation forward, and the manifest the
    stage's cost in such forwards: GPTQ (targets, captures, propagation) costs more than one.
    Fails if the forward is not timed, or timed over the whole layer step (multiple 1.0)."""
    artifact, _ = run("gptq", model_dirs("LlamaForCausalLM"), tmp_path / "gptq")
    layers = artifact.manifest.metrics["layers"]
    assert all(0 < m["forward_seconds"] < m["seconds"] for m in layers)
    assert artifact.manifest.metrics["forward_multiple"] > 1.5
