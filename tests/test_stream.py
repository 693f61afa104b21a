"""Streaming: layers read from safetensors shards one at a time equal the eagerly loaded ones."""

import copy

import pytest
import torch

from conftest import tiny_models
from quantcli.algos.driver import ActivationStore, run_blockwise
from quantcli.algos.gptq import GPTQ, GPTQParams
from quantcli.models.canonical import canonical_tensors, canonicalize, hf_state_dict
from quantcli.models.stream import INDEX_FILE, StreamedModel, can_stream
from quantcli.quant import QuantSpec

DENSE = ["LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM"]
MOE = ["MixtralForCausalLM", "Qwen3MoeForCausalLM"]  # checkpoints store experts one by one (w1/w3/w2; gate/up/down_proj)


def _save(arch, root, shard):
    model = tiny_models()[arch]().to(torch.bfloat16)
    out = root / ("sharded" if shard else "single")
    model.save_pretrained(out, max_shard_size="50KB" if shard else "1GB")
    return out


@pytest.mark.parametrize("arch", DENSE + MOE)
def test_streamed_layers_equal_eager(arch, tmp_path):
    sharded = _save(arch, tmp_path, shard=True)
    assert (sharded / INDEX_FILE).is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    from transformers import AutoModelForCausalLM

    eager = canonicalize(AutoModelForCausalLM.from_pretrained(str(sharded), dtype=torch.float32)).eval()
    streamed = StreamedModel(sharded)
    assert all(p.is_meta for p in streamed.model.parameters())  # nothing read yet
    for i in range(len(streamed.layers)):
        layer = streamed.onload_layer(i, "cpu")
        ref, got = eager.model.layers[i].state_dict(), layer.state_dict()
        assert ref.keys() == got.keys()
        for key in ref:
            assert got[key].dtype == torch.float32 and torch.equal(ref[key], got[key]), key
        streamed.offload_layer(i)
        assert all(p.is_meta for p in layer.parameters())
    streamed.onload("", "cpu")
    ids = torch.randint(0, 128, (2, 12))
    assert torch.equal(streamed.model(ids).logits, eager(ids).logits)


def test_sharded_bf16_streams_like_unsharded_through_the_driver(tmp_path):
    """GPTQ over the streamed sharded checkpoint gives the codes of GPTQ over the eager unsharded one."""
    sharded, single = _save("LlamaForCausalLM", tmp_path, True), _save("LlamaForCausalLM", tmp_path, False)
    from transformers import AutoModelForCausalLM

    eager = canonicalize(AutoModelForCausalLM.from_pretrained(str(single), dtype=torch.float32)).eval()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(wbits=4, group=32)
    algo = GPTQ(GPTQParams())
    ref = run_blockwise(eager, ids, algo, spec, torch.device("cpu"), batch=2)
    got = run_blockwise(StreamedModel(sharded), ids, algo, spec, torch.device("cpu"), batch=2)
    assert ref.quantized.keys() == got.quantized.keys() and len(ref.quantized) == 14
    for name, qw in ref.quantized.items():
        assert torch.equal(qw.codes, got.quantized[name].codes), name
        assert torch.equal(qw.scale, got.quantized[name].scale), name
    assert [m["loss"] for m in ref.layers] == [m["loss"] for m in got.layers]

    on_disk = run_blockwise(StreamedModel(sharded), ids, algo, spec, torch.device("cpu"), batch=2, acts=ActivationStore(tmp_path / "acts"))
    assert all(torch.equal(qw.codes, on_disk.quantized[name].codes) for name, qw in ref.quantized.items())
    assert [m["loss"] for m in ref.layers] == [m["loss"] for m in on_disk.layers]
    assert not list((tmp_path / "acts").iterdir())  # the streams' files are unlinked as soon as mapped


@pytest.mark.parametrize("arch", ["Gemma3ForCausalLM", "Qwen3MoeForCausalLM"])
def test_canonical_tensors_per_layer_invert_hf_layout(arch):
    """One layer's HF tensors (offset norms, fused 3-D experts) → its canonical tensors."""
    original = tiny_models()[arch]()
    canonical = canonicalize(copy.deepcopy(original))
    hf = hf_state_dict(canonical)
    layer = canonical.model.layers[1]
    got = canonical_tensors(layer, lambda rel: hf[f"model.layers.1.{rel}"])
    ref = layer.state_dict()
    assert got.keys() == ref.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_checkpoint_with_unknown_expert_names_is_not_streamed(tmp_path):
    """Per-expert tensors under names the layout table does not know: streaming refuses (the
    loader falls back to eager); the same checkpoint with Mixtral's own names streams."""
    from safetensors.torch import load_file, save_file

    single = _save("MixtralForCausalLM", tmp_path, False)
    assert can_stream(single)
    tensors = load_file(str(single / "model.safetensors"))
    save_file({k.replace(".w1.", ".wx."): v for k, v in tensors.items()}, str(single / "model.safetensors"), metadata={"format": "pt"})
    assert not can_stream(single)


@pytest.mark.parametrize("stage", ["rtn", "awq"])
def test_eval_ppl_layer_by_layer_equals_eager(stage, tiny_model_dir, tmp_path):
    """Perplexity of an artifact streamed and replayed layer by layer = the eagerly materialised one."""
    from typer.testing import CliRunner

    from quantcli.calib.data import tokenize
    from quantcli.cli.app import app
    from quantcli.eval.ppl import perplexity, perplexity_streamed
    from quantcli.loading import load_input

    text = tiny_model_dir.parent / "text.txt"
    out = tmp_path / stage
    calib = ["--dataset", str(text), "--nsamples", "4", "--seqlen", "32"] if stage == "awq" else []
    result = CliRunner().invoke(app, [stage, str(tiny_model_dir), "--w4", "--group", "32", *calib, "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    eager, streamed = load_input(str(out)), load_input(str(out), stream=True)
    assert eager.stream is None and streamed.stream is not None
    tokens = tokenize(eager.tokenizer, text.read_text())
    ref = perplexity(eager.model, tokens, 32, 6)
    got = perplexity_streamed(streamed.stream, tokens, 32, 6, batch=4)
    base = perplexity(load_input(str(tiny_model_dir)).model, tokens, 32, 6)
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-5) and abs(ref["ppl"] - base["ppl"]) > 1e-3


# ---------------------------------------------------------------- lazy codes and streamed pack


def _stage(tiny_model_dir, out, *args):
    from typer.testing import CliRunner

    from quantcli.cli.app import app

    text = tiny_model_dir.parent / "text.txt"
    calib = ["--dataset", str(text), "--nsamples", "4", "--seqlen", "32"]
    result = CliRunner().invoke(app, [*map(str, args[:1]), str(tiny_model_dir), *map(str, args[1:]), *calib, "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    return out


def _eager_read(artifact):
    """The old read_quantized: the whole file loaded, every linear unpacked at once."""
    from safetensors.torch import load_file

    from quantcli.quant import QuantizedWeight
    from quantcli.quant.bits import unpack_int32

    tensors, out = load_file(str(artifact.path / "quantized.safetensors")), {}
    for key in tensors:
        if key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            codes, scale = tensors[key], tensors[f"{name}.scales"]
            if f"{name}.qshape" in tensors:
                _, length, bits = (int(v) for v in tensors[f"{name}.qshape"])
                codes = unpack_int32(codes, bits, length)
            out[name] = QuantizedWeight(codes, scale.float(), tensors[f"{name}.zeros"].float(), codes.shape[1] // scale.shape[1], tensors.get(f"{name}.g_idx"))
    return out


@pytest.mark.parametrize("args", [("rtn", "--w4", "--group", "32"), ("rtn", "--w8", "--group", "-1"), ("gptq", "--w4", "--group", "32", "--act-order", "--no-static-groups")])
def test_lazy_codes_equal_eager_read_and_read_one_linear(args, tiny_model_dir, tmp_path, monkeypatch):
    """read_quantized is a lazy Mapping: same codes as loading the whole file, and reading one linear
    touches only that linear's tensors (keys come from the header)."""
    import safetensors

    from quantcli.artifact import open_artifact
    from quantcli.models import weights

    artifact = open_artifact(_stage(tiny_model_dir, tmp_path / "art", *args))
    eager = _eager_read(artifact)
    assert any(qw.g_idx is not None for qw in eager.values()) == ("--act-order" in args)
    read = []

    class Counting:
        def __init__(self, *a, **k):
            self.inner = safetensors.safe_open(*a, **k)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(weights, "safe_open", Counting)
    lazy = weights.read_quantized(artifact)
    assert sorted(lazy) == sorted(eager) and len(lazy) == len(eager) == 14 and read == []
    for name in eager:
        read.clear()
        qw, ref = lazy[name], eager[name]
        assert read and all(key.startswith(f"{name}.") for key in read), read
        assert torch.equal(qw.codes, ref.codes) and qw.codes.dtype == ref.codes.dtype
        assert torch.equal(qw.scale, ref.scale) and torch.equal(qw.zero, ref.zero) and qw.group == ref.group
        assert (qw.g_idx is None) == (ref.g_idx is None) and (qw.g_idx is None or torch.equal(qw.g_idx, ref.g_idx))
    assert "lm_head" not in lazy and "model.layers.0.mlp.up_proj" in lazy


def _packed_tensors(path):
    import json

    from safetensors.torch import load_file

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for file in sorted(set(index.values())):
        tensors.update(load_file(str(path / file)))
    assert sorted(tensors) == sorted(index)
    return tensors


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_streamed_pack_equals_eager_pack(fmt, tiny_model_dir, tmp_path):
    """quant pack of a streamable artifact writes one shard per layer as it replays it; the tensors
    equal those of packing the eagerly materialised model, and both load to the same model."""
    import json

    from quantcli.loading import load_input
    from quantcli.pack.checkpoint import write_packed
    from quantcli.pack.load import load_packed

    art = _stage(tiny_model_dir, tmp_path / "awq", "awq", "--w4", "--group", "32")  # AWQ: a replay changes the norms
    outs = {}
    for stream in (False, True):
        loaded = load_input(str(art), stream=stream)
        assert (loaded.stream is not None) == stream
        outs[stream] = write_packed(
            tmp_path / f"packed-{stream}", loaded.stream or loaded.model, loaded.tokenizer, loaded.quantized, loaded.spec, fmt,
            {"lineage": []}, base=loaded.base, dtype=torch.float16,
        )
    eager, streamed = _packed_tensors(outs[False]), _packed_tensors(outs[True])
    assert sorted(eager) == sorted(streamed) and "lm_head.weight" not in streamed  # tied: stored once
    assert len(set(json.loads((outs[True] / "model.safetensors.index.json").read_text())["weight_map"].values())) == 3
    for key, value in eager.items():
        assert streamed[key].dtype == value.dtype and torch.equal(streamed[key], value), key
    read = lambda out, name: json.loads((out / name).read_text())  # noqa: E731
    assert read(outs[True], "config.json") == read(outs[False], "config.json")
    base = load_input(str(tiny_model_dir)).model
    assert not torch.equal(eager["model.layers.0.input_layernorm.weight"], base.model.layers[0].input_layernorm.weight.half())
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = load_packed(outs[True]).model(ids).logits, load_packed(outs[False]).model(ids).logits
        artifact = load_input(str(art)).model(ids).logits
    assert torch.equal(got, ref)
    torch.testing.assert_close(got, artifact, rtol=2e-2, atol=2e-2)  # fp16 norms and scales in the pack
