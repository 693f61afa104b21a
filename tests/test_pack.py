"""quantcli.pack: exact bit packing, format round trips, refusals, and interop with compressed-tensors."""

from __future__ import annotations

import json

import conftest
import pytest
import torch
from torch import nn

from quantcli.errors import InputError, SpecError
from quantcli.quant.bits import (
    awq_deinterleave,
    awq_interleave,
    pack_int32,
    pack_int32_awq,
    unpack_int32,
    unpack_int32_awq,
)
from quantcli.pack.checkpoint import read_packed, write_packed
from quantcli.pack.formats import READERS, WRITERS, check_format, detect_format, formats_for, spec_from_config
from quantcli.quant.affine import QuantizedWeight, quantize, quantize_weight
from quantcli.quant.spec import QuantSpec


def u32(words: torch.Tensor) -> list[int]:
    return [w & 0xFFFFFFFF for w in words.reshape(-1).tolist()]


# --------------------------------------------------------------------------- bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(5, 37), (3, 64), (1, 1), (7, 96), (2, 200)])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_int32_round_trip(bits, shape, dim):
    gen = torch.Generator().manual_seed(bits * 100 + shape[0])
    codes = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int64).to(torch.uint8)
    words = pack_int32(codes, bits, dim=dim)
    assert words.dtype == torch.int32
    assert words.shape[dim] == -(-shape[dim] * bits // 32)
    assert torch.equal(unpack_int32(words, bits, shape[dim], dim=dim), codes)


def test_pack_int32_extremes_round_trip():
    for bits in range(1, 9):
        codes = torch.full((2, 64), 2**bits - 1, dtype=torch.uint8)
        assert torch.equal(unpack_int32(pack_int32(codes, bits), bits, 64), codes)


def test_pack_int32_known_words():
    # 4 bits: code j of a word at bit 4j.
    assert u32(pack_int32(torch.arange(8).reshape(1, 8), 4)) == [0x76543210]
    # 8 bits: 4 per word; 2 bits: 16 per word.
    assert u32(pack_int32(torch.tensor([[1, 2, 3, 4]]), 8)) == [0x04030201]
    assert u32(pack_int32(torch.tensor([[3] + [0] * 15]), 2)) == [0x3]
    # 3 bits (GPTQ layout): code 10 straddles words 0/1 (bits 30-32), code 21 words 1/2 (bits 63-65).
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 10] = 0b111
    assert u32(pack_int32(codes, 3)) == [0b11 << 30, 0b1, 0]
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 21] = 0b111
    assert u32(pack_int32(codes, 3)) == [0, 1 << 31, 0b11]
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 31] = 0b101
    assert u32(pack_int32(codes, 3)) == [0, 0, 0b101 << 29]


def test_awq_order_known_word():
    # AutoAWQ GEMM: nibble i of a word holds column AWQ_ORDER[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i].
    assert u32(pack_int32_awq(torch.arange(8).reshape(1, 8))) == [0x75316420]
    codes = torch.randint(0, 16, (3, 40), dtype=torch.int64).to(torch.uint8)
    assert torch.equal(awq_deinterleave(awq_interleave(codes)), codes)
    assert torch.equal(unpack_int32_awq(pack_int32_awq(codes, dim=1), 40, dim=1), codes)
    assert torch.equal(unpack_int32_awq(pack_int32_awq(codes.t(), dim=0), 40, dim=0), codes.t())


def test_pack_int32_refuses_bad_input():
    with pytest.raises(ValueError):
        pack_int32(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError):
        pack_int32(torch.tensor([[0]]), 9)
    with pytest.raises(ValueError):
        pack_int32_awq(torch.zeros(1, 12, dtype=torch.uint8))
    with pytest.raises(ValueError):
        unpack_int32(torch.zeros(1, 3, dtype=torch.int32), 4, 8)


def test_pack_int32_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    gen = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        for dim in (0, 1):
            codes = torch.randint(0, 2**bits, (6, 45), generator=gen).to(torch.uint8)
            signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
            assert torch.equal(pack_int32(codes, bits, dim), helpers.pack_to_int32(signed, bits, packed_dim=dim))


# --------------------------------------------------------------------------- formats


def make_quantized(spec: QuantSpec, shapes, seed: int = 0, zero_at_zero: bool = False) -> dict[str, QuantizedWeight]:
    gen = torch.Generator().manual_seed(seed)
    quantized = {}
    for i, (out_f, in_f) in enumerate(shapes):
        w = torch.randn(out_f, in_f, generator=gen)  # every group has negatives: asymmetric zeros ≥ 1
        if zero_at_zero:
            w[0] = w[0].abs()  # a row without negatives: asymmetric zero 0
        quantized[f"model.layers.{i}.mlp.proj"] = quantize_weight(w, spec)
    return quantized


def assert_same(back: dict[str, QuantizedWeight], quantized: dict[str, QuantizedWeight], scale_dtype):
    assert back.keys() == quantized.keys()
    for name, qw in quantized.items():
        got = back[name]
        assert torch.equal(got.codes, qw.codes), name
        assert torch.equal(got.zero, qw.zero), name
        assert got.group == qw.group, name
        assert torch.equal(got.scale, qw.scale.to(scale_dtype).float()), name
        if qw.g_idx is None:
            assert got.g_idx is None
        else:
            assert torch.equal(got.g_idx.long(), qw.g_idx.long())


CT_CASES = [
    (QuantSpec(wbits, group, sym), shapes)
    for wbits in (2, 3, 4, 5, 6, 7, 8)
    for group in (32, -1)
    for sym in (True, False)
    for shapes in ([(48, 64)], [(37, 96), (5, 32)])
] + [
    (QuantSpec(8, -1, True, 8), [(48, 64)]),  # W8A8 int-quantized
    (QuantSpec(8, -1, False, 8), [(37, 64)]),
    (QuantSpec(8, 32, True, 8), [(48, 64)]),
    (QuantSpec(4, 32, False, 8), [(48, 64)]),  # W4A8 pack-quantized
]


@pytest.mark.parametrize("spec,shapes", CT_CASES, ids=lambda v: v.label() if isinstance(v, QuantSpec) else str(v))
def test_compressed_tensors_round_trip(spec, shapes):
    quantized = make_quantized(spec, shapes)
    tensors, qcfg = WRITERS["compressed-tensors"](quantized, spec, ["lm_head"])
    expected = "int-quantized" if spec.wbits == 8 and not spec.weight_only else "pack-quantized"
    assert qcfg["format"] == expected and qcfg["ignore"] == ["lm_head"]
    assert all(not k.endswith("weight_zero_point") for k in tensors) == spec.sym
    assert_same(READERS["compressed-tensors"](tensors, qcfg), quantized, torch.float32)
    assert spec_from_config({"quantization_config": qcfg}) == spec


AWQ_CASES = [(QuantSpec(4, group, sym), shapes) for group in (32, 64, -1) for sym in (True, False) for shapes in ([(64, 128)], [(40, 64), (8, 128)])]


@pytest.mark.parametrize("spec,shapes", AWQ_CASES, ids=lambda v: v.label() if isinstance(v, QuantSpec) else str(v))
def test_autoawq_round_trip(spec, shapes):
    quantized = make_quantized(spec, shapes)
    tensors, qcfg = WRITERS["autoawq"](quantized, spec, ["lm_head"])
    assert qcfg == {"quant_method": "awq", "bits": 4, "group_size": spec.group, "zero_point": True, "version": "gemm", "modules_to_not_convert": ["lm_head"]}
    for name, qw in quantized.items():
        out_f, in_f = qw.codes.shape
        n_groups = qw.scale.shape[1]
        assert tensors[f"{name}.qweight"].shape == (in_f, out_f // 8)
        assert tensors[f"{name}.qzeros"].shape == (n_groups, out_f // 8)
        assert tensors[f"{name}.scales"].shape == (n_groups, out_f) and tensors[f"{name}.scales"].dtype == torch.float16
        if spec.sym:
            assert set(u32(tensors[f"{name}.qzeros"])) == {0x88888888}
    assert_same(READERS["autoawq"](tensors, qcfg), quantized, torch.float16)


GPTQ_CASES = [
    (QuantSpec(wbits, group, sym), shapes)
    for wbits in (2, 3, 4, 8)
    for group in (32, -1)
    for sym in (True, False)
    for shapes in ([(64, 96)], [(32, 128), (96, 32)])
]


@pytest.mark.parametrize("spec,shapes", GPTQ_CASES, ids=lambda v: v.label() if isinstance(v, QuantSpec) else str(v))
def test_gptq_round_trip(spec, shapes):
    quantized = make_quantized(spec, shapes)
    tensors, qcfg = WRITERS["gptq"](quantized, spec, ["lm_head"])
    assert qcfg["checkpoint_format"] == ("gptq" if spec.sym else "gptq_v2") and qcfg["desc_act"] is False and qcfg["sym"] == spec.sym
    assert "dynamic" not in qcfg
    for name, qw in quantized.items():
        out_f, in_f = qw.codes.shape
        assert tensors[f"{name}.qweight"].shape == (in_f * spec.wbits // 32, out_f)
        assert tensors[f"{name}.qzeros"].shape == (qw.scale.shape[1], out_f * spec.wbits // 32)
        assert torch.equal(tensors[f"{name}.g_idx"], (torch.arange(in_f) // qw.group).to(torch.int32))
    if spec.sym and spec.wbits == 4:  # v1 stores zero - 1 = 7
        assert set(u32(tensors[f"{name}.qzeros"])) == {0x77777777}
    assert_same(READERS["gptq"](tensors, qcfg), quantized, torch.float16)


@pytest.mark.parametrize("wbits", [2, 3, 4, 8])
def test_gptq_asymmetric_is_written_v2(wbits):
    spec = QuantSpec(wbits, 32, False)
    quantized = make_quantized(spec, [(64, 64)], zero_at_zero=True)
    assert (quantized["model.layers.0.mlp.proj"].zero == 0).any()
    tensors, qcfg = WRITERS["gptq"](quantized, spec)
    assert qcfg["checkpoint_format"] == "gptq_v2" and qcfg["format"] == "gptq_v2"
    assert_same(READERS["gptq"](tensors, qcfg), quantized, torch.float16)


def test_gptq_act_order_g_idx_round_trip():
    spec = QuantSpec(4, 32, True)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=gen)
    perm = torch.randperm(128, generator=gen)
    g_idx = torch.empty(128, dtype=torch.int32)
    g_idx[perm] = (torch.arange(128) // 32).to(torch.int32)  # GPTQ act-order without static groups
    base = quantize_weight(w, spec)
    codes = quantize(w, base.scale, base.zero, 4, 32, g_idx)
    quantized = {"model.layers.0.self_attn.q_proj": QuantizedWeight(codes, base.scale, base.zero, 32, g_idx)}
    tensors, qcfg = WRITERS["gptq"](quantized, spec)
    assert qcfg["desc_act"] is True
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.g_idx"], g_idx)
    back = READERS["gptq"](tensors, qcfg)
    assert_same(back, quantized, torch.float16)
    assert torch.allclose(back["model.layers.0.self_attn.q_proj"].dequantize(), QuantizedWeight(codes, base.scale.half().float(), base.zero, 32, g_idx).dequantize())
    assert formats_for(spec, quantized) == ["gptq"]


def test_gptq_static_g_idx_is_not_act_order():
    spec = QuantSpec(4, 32, True)
    qw = make_quantized(spec, [(32, 64)])["model.layers.0.mlp.proj"]
    qw.g_idx = (torch.arange(64) // 32).to(torch.int32)
    tensors, qcfg = WRITERS["gptq"]({"m": qw}, spec)
    assert qcfg["desc_act"] is False
    assert READERS["gptq"](tensors, qcfg)["m"].g_idx is None


def test_gptq_ignored_inner_linears_are_dynamic_negatives():
    spec = QuantSpec(4, 32, True)
    _, qcfg = WRITERS["gptq"](make_quantized(spec, [(32, 64)]), spec, ["lm_head", "model.layers.0.mlp.gate"])
    assert qcfg["dynamic"] == {"-:^model[.]layers[.]0[.]mlp[.]gate$": {}}


# --------------------------------------------------------------------------- refusals

REFUSALS = [
    ("autoawq", QuantSpec(3, 32, False), [(64, 64)], "use --format compressed-tensors or gptq"),
    ("autoawq", QuantSpec(4, 32, False, 4), [(64, 64)], "use --format compressed-tensors"),
    ("autoawq", QuantSpec(6, 32, False), [(64, 64)], "use --format compressed-tensors"),
    ("autoawq", QuantSpec(4, 32, False), [(36, 64)], "use --format compressed-tensors"),
    ("gptq", QuantSpec(5, 32, True), [(64, 64)], "use --format compressed-tensors"),
    ("gptq", QuantSpec(8, -1, True, 8), [(64, 64)], "use --format compressed-tensors"),
    ("gptq", QuantSpec(4, 32, True), [(48, 64)], "use --format compressed-tensors or autoawq"),
    ("gguf", QuantSpec(4, 32, True), [(64, 64)], "use one of compressed-tensors, autoawq, gptq"),
]


@pytest.mark.parametrize("fmt,spec,shapes,hint", REFUSALS)
def test_format_refusals_name_formats_that_can(fmt, spec, shapes, hint):
    quantized = make_quantized(spec, shapes)
    with pytest.raises(SpecError) as info:
        check_format(fmt, spec, quantized)
    message = str(info.value)
    assert "\n" not in message and hint in message
    if fmt in WRITERS:
        with pytest.raises(SpecError):
            WRITERS[fmt](quantized, spec)


def test_act_order_refused_by_compressed_tensors_and_autoawq():
    spec = QuantSpec(4, 32, True)
    qw = make_quantized(spec, [(64, 64)])["model.layers.0.mlp.proj"]
    qw.g_idx = torch.arange(64, dtype=torch.int32) % 2  # not j // 32
    for fmt in ("compressed-tensors", "autoawq"):
        with pytest.raises(SpecError, match="act-order.*use --format gptq$"):
            check_format(fmt, spec, {"m": qw})


def test_detect_format():
    assert detect_format({"quant_method": "compressed-tensors", "format": "pack-quantized"}) == "compressed-tensors"
    assert detect_format({"quant_method": "awq", "version": "gemm"}) == "autoawq"
    assert detect_format({"quant_method": "gptq", "bits": 4}) == "gptq"
    with pytest.raises(InputError):
        detect_format({"quant_method": "bitsandbytes"})
    with pytest.raises(InputError):
        detect_format({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"})


# --------------------------------------------------------------------------- packed directories


def tiny_llama(tie: bool = False, seed: int = 0):
    return conftest.tiny_llama(seed, tie=tie)


def fake_quantize_model(model, spec: QuantSpec) -> dict[str, QuantizedWeight]:
    """Quantize every linear but lm_head and put the dequantized weights in the model."""
    quantized = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            qw = quantize_weight(module.weight.data, spec)
            module.weight.data = qw.dequantize()
            quantized[name] = qw
    return quantized


def tiny_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"t{i}": i + 1 for i in range(127)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize("fmt,spec", [
    ("compressed-tensors", QuantSpec(4, 32, False)),
    ("compressed-tensors", QuantSpec(8, -1, True, 8)),
    ("autoawq", QuantSpec(4, 32, True)),
    ("gptq", QuantSpec(3, 32, False)),
])
@pytest.mark.parametrize("tie", [False, True])
def test_write_read_packed_round_trip(tmp_path, fmt, spec, tie):
    model = tiny_llama(tie)
    quantized = fake_quantize_model(model, spec)
    out = write_packed(tmp_path / "packed", model, tiny_tokenizer(), quantized, spec, fmt, {"lineage": [{"kind": "rtn"}]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]  # no temporary left behind
    assert (out / "tokenizer.json").is_file()
    config, back, fp_state, act_qparams = read_packed(out)
    assert act_qparams == {}
    assert config["quantcli"]["lineage"] == [{"kind": "rtn"}] and config["quantcli"]["format"] == fmt
    assert spec_from_config(config) == spec
    assert detect_format(config["quantization_config"]) == fmt
    assert_same(back, quantized, torch.float32 if fmt == "compressed-tensors" else torch.float16)
    state = model.state_dict()
    expected = {k for k in state if k.removesuffix(".weight") not in quantized}
    if tie:
        expected.discard("lm_head.weight")
    assert set(fp_state) == expected
    for key in expected:
        assert torch.equal(fp_state[key], state[key]), key
    with pytest.raises(InputError, match="already exists"):
        write_packed(out, model, None, quantized, spec, fmt)


def test_write_packed_refuses_before_writing(tmp_path):
    model = tiny_llama()
    spec = QuantSpec(3, 32, False)
    quantized = fake_quantize_model(model, spec)
    with pytest.raises(SpecError, match="use --format compressed-tensors or gptq"):
        write_packed(tmp_path / "packed", model, None, quantized, spec, "autoawq")
    assert not any(tmp_path.iterdir())


def test_read_packed_refuses_non_packed(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="no quantization_config"):
        read_packed(tmp_path)
    with pytest.raises(InputError, match="no config.json"):
        read_packed(tmp_path / "missing")


# --------------------------------------------------------------------------- interop with compressed-tensors


def _ct_reference_compress(qw: QuantizedWeight, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """compressed-tensors' own compressor on the dequantized weight and our scale/zero."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from quantcli.pack.formats import _ct_activation_args, _ct_weight_args

    acts = _ct_activation_args(spec)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(**_ct_weight_args(spec)),
        input_activations=QuantizationArgs(**acts) if acts else None,
    )
    fmt = "int-quantized" if spec.wbits == 8 and not spec.weight_only else "pack-quantized"
    state = {
        "weight": qw.dequantize(),
        "weight_scale": qw.scale,
        "weight_zero_point": (qw.zero - 2 ** (spec.wbits - 1)).to(torch.int8),
    }
    return BaseCompressor.get_value_from_registry(fmt).compress(state, scheme)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 32, False), QuantSpec(3, -1, False), QuantSpec(8, -1, False, 8)], ids=QuantSpec.label)
def test_tensors_match_compressed_tensors_compressor(spec):
    pytest.importorskip("compressed_tensors")
    quantized = make_quantized(spec, [(40, 64)])
    ours, _ = WRITERS["compressed-tensors"](quantized, spec)
    ref = _ct_reference_compress(quantized["model.layers.0.mlp.proj"], spec)
    ours = {k.removeprefix("model.layers.0.mlp.proj."): v for k, v in ours.items()}
    assert ours.keys() == ref.keys()
    for key in ours:
        assert ours[key].dtype == ref[key].dtype and torch.equal(ours[key], ref[key]), key


@pytest.mark.filterwarnings("ignore:You passed .quantization_config.")
@pytest.mark.parametrize("sym,tie", [(True, True), (False, False)])
def test_compressed_tensors_loads_in_transformers(tmp_path, sym, tie):
    ct = pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    spec = QuantSpec(4, 32, sym)
    model = tiny_llama(tie)
    quantized = fake_quantize_model(model, spec)
    out = write_packed(tmp_path / "packed", model, None, quantized, spec, "compressed-tensors")
    kwargs = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        got = loaded(ids).logits
    assert ct.__version__
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the packed weights really are quantized: not equal to the full-precision model's
    fp_logits = tiny_llama(tie)(ids).logits
    assert not torch.allclose(fp_logits, expected, atol=1e-4)


W8A8_ACTS = [QuantSpec(8, -1, True, 8, act_sym=sym, act_static=static) for static in (False, True) for sym in (False, True)]


def _w8a8_packed(tmp_path, spec: QuantSpec):
    """A tiny Llama with W8A8 weights, its static input scales (if any) calibrated, packed; (model, scales, dir, ids)."""
    from quantcli.models.act_hooks import calibrate_static_inputs

    model = tiny_llama()
    quantized = fake_quantize_model(model, spec)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    static = calibrate_static_inputs(model, sorted(quantized), spec, lambda: model(ids)) if spec.act_static else None
    out = write_packed(tmp_path / "packed", model, tiny_tokenizer(), quantized, spec, "compressed-tensors", act_qparams=static)
    return model, quantized, static, out, ids


@pytest.mark.parametrize("spec", W8A8_ACTS, ids=lambda s: f"{'static' if s.act_static else 'dynamic'}-{'sym' if s.act_sym else 'asym'}")
def test_w8a8_activation_scheme_round_trips(tmp_path, spec):
    """The activation scheme and static scales come back from the checkpoint alone (quantcli's record
    dropped); catches a hard-coded asymmetric/per-token scheme, or scales lost or offset wrongly."""
    _, _, static, out, _ = _w8a8_packed(tmp_path, spec)
    config, _, _, act_qparams = read_packed(out)
    acts = config["quantization_config"]["config_groups"]["group_0"]["input_activations"]
    assert (acts["strategy"], acts["dynamic"], acts["symmetric"]) == (("tensor", False) if spec.act_static else ("token", True)) + (spec.act_sym,)
    config.pop("quantcli")
    assert spec_from_config(config) == spec
    assert act_qparams.keys() == (static or {}).keys()
    for key, value in act_qparams.items():
        assert torch.equal(value, static[key].float()), key


@pytest.mark.filterwarnings("ignore:You passed .quantization_config.")
@pytest.mark.parametrize("spec", W8A8_ACTS, ids=lambda s: f"{'static' if s.act_static else 'dynamic'}-{'sym' if s.act_sym else 'asym'}")
def test_w8a8_loads_in_transformers_with_our_activation_quantizer(tmp_path, spec):
    """transformers + compressed-tensors run the packed W8A8 checkpoint with activation quantization
    and compute exactly our fake-quant model (weights and inputs quantized as the spec says); our
    packed loader does too. Catches the scheme or static scales written unlike what compressed-tensors reads."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from quantcli.loading import load_input
    from quantcli.models.act_hooks import install_spec_hooks

    model, quantized, static, out, ids = _w8a8_packed(tmp_path, spec)
    with torch.no_grad():
        weight_only = model(ids).logits
        install_spec_hooks(model, sorted(quantized), spec, static)
        expected = model(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
        ours = load_input(str(out)).model(ids).logits
    assert not torch.allclose(expected, weight_only, atol=1e-4)  # the activations really are quantized
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags", [["--act-static"], ["--act-sym"]], ids=["static-asym", "dynamic-sym"])
def test_cli_pack_w8a8_evaluates_like_the_artifact(tiny_model_dir, tmp_path, flags):
    """quant rtn --w8a8 → quant pack → eval-ppl: the packed directory's perplexity is the artifact's
    (catches the static scales not passed from the artifact to the checkpoint, or the packed loader
    installing another activation quantizer than the artifact's)."""
    from typer.testing import CliRunner

    from quantcli.cli.app import app

    runner = CliRunner()
    quant = lambda *a: runner.invoke(app, [str(x) for x in a])  # noqa: E731
    text = tiny_model_dir.parent / "text.txt"
    data = ("--dataset", text, "--nsamples", 2, "--seqlen", 32)
    made = quant("rtn", tiny_model_dir, "--w8a8", "--group", -1, *flags, *data, "-o", tmp_path / "q", "-q")
    assert made.exit_code == 0, made.output
    packed = quant("pack", tmp_path / "q", "--format", "compressed-tensors", "--dtype", "float32", "-o", tmp_path / "ct", "-q")
    assert packed.exit_code == 0, packed.output
    ppl = {}
    for name in ("q", "ct"):
        res = quant("eval-ppl", tmp_path / name, "--dataset", text, "--seqlen", 32, "--max-windows", 2, "--json", "-q")
        assert res.exit_code == 0, res.output
        ppl[name] = json.loads(res.stdout)["ppl"]
    assert abs(ppl["ct"] - ppl["q"]) <= 1e-3 * ppl["q"], ppl


# --------------------------------------------------------------------------- packed MoE checkpoints


def _packed_mixtral(tmp_path):
    """A tiny Mixtral (4 experts) with every quantizable linear at w4g32, packed; the model and its dir."""
    from quantcli.models.arch import arch_spec, decoder_layers, quantizable_linears
    from quantcli.models.canonical import canonicalize

    model = canonicalize(conftest.tiny_models()["MixtralForCausalLM"]())
    arch, spec = arch_spec(model), QuantSpec(4, 32)
    quantized = {}
    for i, layer in enumerate(decoder_layers(model, arch)):
        for name in (n for stage in quantizable_linears(layer, arch) for n in stage):
            qw = quantize_weight(layer.get_submodule(name).weight.data, spec)
            layer.get_submodule(name).weight.data = qw.dequantize()
            quantized[f"{arch.layers_path}.{i}.{name}"] = qw
    assert any(".experts.3." in name for name in quantized)
    out = write_packed(tmp_path / "packed", model, tiny_tokenizer(), quantized, spec, "compressed-tensors")
    return model, out


@torch.no_grad()
def test_packed_moe_loads_whole_and_refuses_a_missing_expert(tmp_path):
    """Defect 8: a packed MoE checkpoint missing an expert's tensors ran with that expert random."""
    from safetensors.torch import load_file, save_file

    from quantcli.loading import load_input

    model, out = _packed_mixtral(tmp_path)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    loaded = load_input(str(out))
    torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)

    index = out / "model.safetensors.index.json"
    shard = out / json.loads(index.read_text())["weight_map"]["model.layers.1.mlp.experts.2.down_proj.weight_packed"]
    tensors = load_file(str(shard))
    dropped = [k for k in tensors if k.startswith("model.layers.1.mlp.experts.2.")]
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(shard), metadata={"format": "pt"})
    with pytest.raises(InputError) as info:
        load_input(str(out))
    message = str(info.value)
    assert "\n" not in message and str(index) in message and "re-pack" in message
    assert "model.layers.1.mlp.experts.2.down_proj.weight" in message and "3 parameters" in message


@pytest.mark.parametrize("fmt,spec", [
    ("compressed-tensors", QuantSpec(4, 32, False)),
    ("compressed-tensors", QuantSpec(8, -1, True, 8)),
    ("autoawq", QuantSpec(4, 32, True)),
    ("gptq", QuantSpec(3, 32, False)),
])
@torch.no_grad()
def test_packed_checkpoint_streams_layer_by_layer_like_the_whole_model(tmp_path, fmt, spec):
    # catches: a packed 70B loaded whole for evaluation (eval-ppl), a streamed layer whose weight
    # is read from another module's packed tensors or left undequantized, and the activation
    # quantizer of a W8A8 checkpoint missing from the streamed layers
    from quantcli.eval.ppl import perplexity, perplexity_streamed
    from quantcli.loading import load_input

    model = tiny_llama(False)
    quantized = fake_quantize_model(model, spec)
    out = write_packed(tmp_path / "packed", model, tiny_tokenizer(), quantized, spec, fmt)
    streamed = load_input(str(out), stream=True)
    whole = load_input(str(out))
    assert streamed.stream is not None and whole.stream is None and streamed.spec == whole.spec == spec
    layers = whole.model.model.layers
    for index in range(len(layers)):
        layer = streamed.stream.onload_layer(index, "cpu")
        for name, tensor in layers[index].state_dict().items():
            assert torch.equal(layer.state_dict()[name], tensor), (index, name)
        streamed.stream.offload_layer(index)
    tokens = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(0))
    expected = perplexity(whole.model, tokens, 32, 4)["ppl"]
    assert perplexity_streamed(streamed.stream, tokens, 32, 4)["ppl"] == pytest.approx(expected, rel=1e-5)


def test_packed_checkpoint_with_an_unexplained_tensor_is_loaded_whole_and_refused(tmp_path):
    # catches: streaming silently ignoring a tensor the config does not describe (the whole-model
    # loader refuses it with a one-line error)
    from safetensors.torch import load_file, save_file

    from quantcli.loading import load_input

    model = tiny_llama(False)
    quantized = fake_quantize_model(model, QuantSpec(4, 32))
    out = write_packed(tmp_path / "packed", model, tiny_tokenizer(), quantized, QuantSpec(4, 32), "compressed-tensors")
    file = next(out.glob("*.safetensors"))
    tensors = load_file(str(file))
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(file), metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"]["model.layers.0.mlp.extra.weight"] = file.name
        index.write_text(json.dumps(data))
    with pytest.raises(InputError, match="re-pack"):
        load_input(str(out), stream=True)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_packed_checkpoint_with_a_damaged_shard_is_one_line_error(tmp_path, damage):
    # catches: a traceback from safe_open when a listed shard is gone or cut short (the streamed
    # reader used to open shards unchecked, in the middle of evaluation)
    from quantcli.loading import load_input

    model = tiny_llama(False)
    quantized = fake_quantize_model(model, QuantSpec(4, 32))
    out = write_packed(tmp_path / "packed", model, tiny_tokenizer(), quantized, QuantSpec(4, 32), "compressed-tensors")  # one shard per layer
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    if damage == "missing":
        shards[1].unlink()
    else:
        shards[1].write_bytes(shards[1].read_bytes()[:1000])
    with pytest.raises(InputError) as info:
        loaded = load_input(str(out), stream=True)
        for index in range(len(loaded.stream.layers)):
            loaded.stream.onload_layer(index, "cpu")
    message = str(info.value)
    assert "\n" not in message and shards[1].name in message
