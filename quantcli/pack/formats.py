"""Export formats: quantcli's quantized weights as the tensors and config other engines load.

Pure functions on tensors. A writer ``pack_<format>(quantized, spec, ignore)`` returns the
tensors to save (keyed ``{module}.{param}``) and the ``quantization_config`` dict for
config.json; the reader ``unpack_<format>(tensors, quantization_config)`` inverts it exactly
(codes, zeros and g_idx bit for bit; scales up to the format's scale dtype).

Layouts, for a linear with weight ``[out, in]``, ``G`` groups and ``b`` bits (see
:mod:`quantcli.quant.bits` for the word layout):

compressed-tensors ``pack-quantized`` (weight-only, or int weights below 8 bits with int activations)
    ``weight_packed``  int32 ``[out, ceil(in·b/32)]``    codes packed along ``in``
    ``weight_scale``   float32 ``[out, G]``               (``G = 1`` for the ``channel`` strategy)
    ``weight_zero_point`` int32 ``[ceil(out·b/32), G]``   asymmetric only: zeros packed along ``out``
    ``weight_shape``   int64 ``[2]`` = ``(out, in)``
    Codes and zeros are stored unsigned, i.e. compressed-tensors' signed value plus ``2**(b-1)``;
    symmetric weights have no zero tensor (signed zero point 0, i.e. our ``zero = 2**(b-1)``).
    2/4/8 bits have the same layout in every compressed-tensors release; 3/5/6/7 bits use the
    dense layout of current releases (checked against 0.20.0), which older releases, packing
    ``32 // b`` codes per word, do not read. Our tensors equal compressed-tensors' own compressor's
    bit for bit; still, transformers (5.23 with compressed-tensors 0.20) loads the asymmetric variant
    only with ``quantization_config=CompressedTensorsConfig(dequantize=True)``: its compressed
    layout expects an unpacked zero point (a known upstream limitation, llm-compressor#1618).
compressed-tensors ``int-quantized`` (W8A8: 8-bit weights, int activations)
    ``weight`` int8 ``[out, in]`` = code − 128, ``weight_scale`` float32 ``[out, G]``,
    ``weight_zero_point`` int8 ``[out, G]`` = zero − 128 (asymmetric only).
compressed-tensors activations (any spec with ``abits < 16``)
    ``input_activations``: ``strategy: token, dynamic: true`` (per-token scales at run time) or,
    for ``act_static``, ``strategy: tensor, dynamic: false`` with the calibrated scale stored per
    linear: ``input_scale`` float32 ``[1]`` and, asymmetric only, ``input_zero_point`` int8 ``[1]``
    = zero − ``2**(abits-1)``; ``symmetric`` is the spec's ``act_sym``. The KV-cache fake quant
    (``kv_bits``) has no compressed-tensors scheme here (ours is per head and per token, dynamic):
    it is recorded in the ``quantcli`` spec only, which our loader honours.
autoawq (AutoAWQ ``GEMM``, 4-bit only)
    ``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[G, out/8]`` (AWQ interleaved order along
    ``out``), ``scales`` float16 ``[G, out]``. ``zero_point`` is always written ``true``: the GEMM
    layout always carries ``qzeros`` (AutoAWQ's GEMM module cannot be built without them), so a
    symmetric spec is stored exactly as zeros equal to 8.
gptq (GPTQ ``v1``/``v2``, 2/3/4/8 bits)
    ``qweight`` int32 ``[in·b/32, out]`` (codes packed along ``in``; 3-bit codes straddle words),
    ``qzeros`` int32 ``[G, out·b/32]``, ``scales`` float16 ``[G, out]``, ``g_idx`` int32 ``[in]``.
    v1 stores ``zero − 1``, so an asymmetric zero of 0 would be written as −1 and read back as
    ``2**b``, and GPTQModel refuses asymmetric v1 written by anything but itself. Decision:
    symmetric checkpoints (zeros ``2**(b-1) ≥ 1``) are v1 (``checkpoint_format: gptq``, which
    every GPTQ loader reads); asymmetric ones are always ``gptq_v2`` (zeros stored as is). ``desc_act`` is true only when some
    linear has a real act-order ``g_idx``; static groups are written with ``g_idx = j // g`` and
    no permutation of ``qweight``.

A format that cannot express an artifact raises :class:`SpecError` naming those that can.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from quantcli import __version__
from quantcli.errors import ArtifactError, InputError, SpecError
from quantcli.quant.bits import pack_int32, pack_int32_awq, unpack_int32, unpack_int32_awq
from quantcli.quant.affine import QuantizedWeight
from quantcli.quant.spec import QuantSpec

FORMATS = ("compressed-tensors", "autoawq", "gptq")
DEFAULT_FORMAT = "compressed-tensors"

# Tensor names each format stores per quantized module (``{module}.{suffix}``).
SUFFIXES = {
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight", "input_scale", "input_zero_point"),
    "autoawq": ("qweight", "qzeros", "scales"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
}
# The suffix whose tensor marks a module as quantized in each format (its reader keys on it).
MARKERS = {"compressed-tensors": "weight_scale", "autoawq": "qweight", "gptq": "qweight"}


# --------------------------------------------------------------------------- what each format can hold


def has_act_order(qw: QuantizedWeight) -> bool:
    """True when ``qw.g_idx`` is a real permutation of groups, not the static ``j // group``."""
    if qw.g_idx is None:
        return False
    static = torch.arange(qw.codes.shape[1], device=qw.g_idx.device) // qw.group
    return not torch.equal(qw.g_idx.long(), static)


def _first(quantized: dict[str, QuantizedWeight], bad) -> str | None:
    return next((name for name, qw in quantized.items() if bad(qw)), None)


def _why_not_compressed_tensors(spec: QuantSpec, quantized: dict[str, QuantizedWeight]) -> str | None:
    if (name := _first(quantized, has_act_order)) is not None:
        return f"compressed-tensors has no act-order g_idx (needed by {name})"
    return None


def _why_not_autoawq(spec: QuantSpec, quantized: dict[str, QuantizedWeight]) -> str | None:
    if spec.wbits != 4:
        return f"AutoAWQ GEMM packs only 4-bit weights, not {spec.wbits}-bit"
    if not spec.weight_only:
        return f"AutoAWQ stores weight-only checkpoints, not {spec.abits}-bit activations"
    if (name := _first(quantized, has_act_order)) is not None:
        return f"AutoAWQ has no act-order g_idx (needed by {name})"
    if (name := _first(quantized, lambda qw: qw.codes.shape[0] % 8)) is not None:
        return f"AutoAWQ GEMM needs output features divisible by 8 ({name} has {quantized[name].codes.shape[0]})"
    return None


def _why_not_gptq(spec: QuantSpec, quantized: dict[str, QuantizedWeight]) -> str | None:
    if spec.wbits not in (2, 3, 4, 8):
        return f"GPTQ packs 2, 3, 4 or 8-bit weights, not {spec.wbits}-bit"
    if not spec.weight_only:
        return f"GPTQ stores weight-only checkpoints, not {spec.abits}-bit activations"
    bad = _first(quantized, lambda qw: qw.codes.shape[0] % 32 or qw.codes.shape[1] % 32)
    if bad is not None:
        out_f, in_f = quantized[bad].codes.shape
        return f"GPTQ needs input and output features divisible by 32 ({bad} is {out_f}x{in_f})"
    return None


_WHY_NOT = {
    "compressed-tensors": _why_not_compressed_tensors,
    "autoawq": _why_not_autoawq,
    "gptq": _why_not_gptq,
}


def formats_for(spec: QuantSpec, quantized: dict[str, QuantizedWeight]) -> list[str]:
    """The export formats that can store these quantized weights exactly."""
    return [fmt for fmt in FORMATS if _WHY_NOT[fmt](spec, quantized) is None]


def check_format(fmt: str, spec: QuantSpec, quantized: dict[str, QuantizedWeight]) -> None:
    """Raise :class:`SpecError` (one line naming the formats that can) when ``fmt`` cannot store this."""
    if fmt not in FORMATS:
        raise SpecError(f"--format {fmt} is unknown: use one of {', '.join(FORMATS)}")
    reason = _WHY_NOT[fmt](spec, quantized)
    if reason is None:
        return
    others = formats_for(spec, quantized)
    hint = f"use --format {' or '.join(others)}" if others else "no pack format can store it"
    raise SpecError(f"--format {fmt} cannot store {spec.label()}: {reason}; {hint}")


def _check_symmetric(spec: QuantSpec, quantized: dict[str, QuantizedWeight]) -> None:
    if not spec.sym:
        return
    mid = 2 ** (spec.wbits - 1)
    if (name := _first(quantized, lambda qw: bool((qw.zero != mid).any()))) is not None:
        raise ArtifactError(f"{name}: the spec is symmetric but its zero points are not {mid}; the artifact is inconsistent")


# --------------------------------------------------------------------------- compressed-tensors


def _ct_weight_args(spec: QuantSpec) -> dict:
    channel = spec.group == -1
    return {
        "num_bits": spec.wbits,
        "type": "int",
        "symmetric": spec.sym,
        "group_size": None if channel else spec.group,
        "strategy": "channel" if channel else "group",
        "dynamic": False,
    }


def _ct_activation_args(spec: QuantSpec) -> dict | None:
    if spec.weight_only:
        return None
    return {
        "num_bits": spec.abits,
        "type": "int",
        "symmetric": spec.act_sym,
        "group_size": None,
        "strategy": "tensor" if spec.act_static else "token",
        "dynamic": not spec.act_static,
    }


def pack_input_scales(names: Iterable[str], spec: QuantSpec, act_qparams: dict[str, Tensor]) -> dict[str, Tensor]:
    """compressed-tensors' static activation tensors of the linears ``names`` (empty unless ``spec.act_static``).

    ``act_qparams``: ``"<name>.input_scale"`` / ``"<name>.input_zero"`` scalars as a stage
    calibrated them (``models.act_hooks.calibrate_static_inputs``; zero unsigned).
    """
    if spec.weight_only or not spec.act_static:
        return {}
    offset, out = 2 ** (spec.abits - 1), {}
    for name in names:
        if f"{name}.input_scale" not in act_qparams:
            raise ArtifactError(f"{name}: the spec has static activations but no calibrated input_scale; re-run the stage with --act-static")
        out[f"{name}.input_scale"] = act_qparams[f"{name}.input_scale"].float().reshape(1)
        if not spec.act_sym:
            out[f"{name}.input_zero_point"] = (act_qparams[f"{name}.input_zero"].round().reshape(1) - offset).to(torch.int8)
    return out


def unpack_input_scales(tensors: dict[str, Tensor], quantization_config: dict) -> dict[str, Tensor]:
    """Inverse of :func:`pack_input_scales`: ``"<name>.input_scale"`` / ``"<name>.input_zero"`` scalars (float32)."""
    if quantization_config.get("quant_method") != "compressed-tensors":
        return {}
    acts = next(iter((quantization_config.get("config_groups") or {"": {}}).values())).get("input_activations") or {}
    offset = 2 ** (int(acts.get("num_bits", 8)) - 1)
    out = {}
    for key, scale in tensors.items():
        if key.endswith(".input_scale"):
            name = key.removesuffix(".input_scale")
            zp = tensors.get(f"{name}.input_zero_point")
            out[key] = scale.float().reshape(())
            out[f"{name}.input_zero"] = torch.tensor(float(offset)) if zp is None else zp.float().reshape(()) + offset
    return out


def pack_compressed_tensors(
    quantized: dict[str, QuantizedWeight], spec: QuantSpec, ignore: Iterable[str] = ()
) -> tuple[dict[str, Tensor], dict]:
    """compressed-tensors ``pack-quantized`` (or ``int-quantized`` for W8A8); see the module docstring."""
    check_format("compressed-tensors", spec, quantized)
    _check_symmetric(spec, quantized)
    bits, offset = spec.wbits, 2 ** (spec.wbits - 1)
    int_quantized = bits == 8 and not spec.weight_only
    tensors: dict[str, Tensor] = {}
    for name, qw in quantized.items():
        tensors[f"{name}.weight_scale"] = qw.scale.float().contiguous()
        if int_quantized:
            tensors[f"{name}.weight"] = (qw.codes.to(torch.int16) - offset).to(torch.int8)
            if not spec.sym:
                tensors[f"{name}.weight_zero_point"] = (qw.zero.to(torch.int16) - offset).to(torch.int8)
        else:
            tensors[f"{name}.weight_packed"] = pack_int32(qw.codes, bits, dim=1)
            tensors[f"{name}.weight_shape"] = torch.tensor(list(qw.codes.shape), dtype=torch.int64)
            if not spec.sym:
                tensors[f"{name}.weight_zero_point"] = pack_int32(qw.zero.to(torch.uint8), bits, dim=0)
    fmt = "int-quantized" if int_quantized else "pack-quantized"
    scheme = {
        "targets": ["Linear"],
        "weights": _ct_weight_args(spec),
        "input_activations": _ct_activation_args(spec),
        "output_activations": None,
    }
    config = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "config_groups": {"group_0": scheme},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
    return tensors, config


def unpack_compressed_tensors(tensors: dict[str, Tensor], quantization_config: dict) -> dict[str, QuantizedWeight]:
    """Inverse of :func:`pack_compressed_tensors` (one int config group, group or channel strategy)."""
    groups = quantization_config.get("config_groups") or {}
    if len(groups) != 1:
        raise InputError(f"quantization_config has {len(groups)} config groups; quantcli reads exactly one")
    weights = next(iter(groups.values())).get("weights") or {}
    if weights.get("type", "int") != "int" or weights.get("strategy") not in ("group", "channel"):
        raise InputError("quantization_config: quantcli reads int weights with group or channel strategy only")
    bits = int(weights["num_bits"])
    offset = 2 ** (bits - 1)
    symmetric = weights.get("symmetric", True)
    quantized: dict[str, QuantizedWeight] = {}
    for key in tensors:
        if not key.endswith(".weight_scale"):
            continue
        name = key.removesuffix(".weight_scale")
        scale = tensors[key].float()
        zp = tensors.get(f"{name}.weight_zero_point")
        if f"{name}.weight_packed" in tensors:
            out_f, in_f = (int(v) for v in tensors[f"{name}.weight_shape"].tolist())
            codes = unpack_int32(tensors[f"{name}.weight_packed"], bits, in_f, dim=1)
            zero = None if symmetric else unpack_int32(zp, bits, out_f, dim=0).float()
        else:
            codes = (tensors[f"{name}.weight"].to(torch.int16) + offset).to(torch.uint8)
            zero = None if symmetric else zp.float() + offset
        if zero is None:
            zero = torch.full_like(scale, float(offset))
        quantized[name] = QuantizedWeight(codes, scale, zero, group=codes.shape[1] // scale.shape[1])
    return quantized


# --------------------------------------------------------------------------- AutoAWQ GEMM


def pack_autoawq(
    quantized: dict[str, QuantizedWeight], spec: QuantSpec, ignore: Iterable[str] = ()
) -> tuple[dict[str, Tensor], dict]:
    """AutoAWQ GEMM: transposed, AWQ-interleaved 4-bit words; see the module docstring."""
    check_format("autoawq", spec, quantized)
    _check_symmetric(spec, quantized)
    tensors: dict[str, Tensor] = {}
    for name, qw in quantized.items():
        tensors[f"{name}.qweight"] = pack_int32_awq(qw.codes.t(), dim=1)
        tensors[f"{name}.qzeros"] = pack_int32_awq(qw.zero.t().to(torch.uint8), dim=1)
        tensors[f"{name}.scales"] = qw.scale.t().to(torch.float16).contiguous()
    config = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": spec.group,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": sorted(ignore) or None,
    }
    return tensors, config


def unpack_autoawq(tensors: dict[str, Tensor], quantization_config: dict) -> dict[str, QuantizedWeight]:
    """Inverse of :func:`pack_autoawq`."""
    bits = int(quantization_config.get("bits", quantization_config.get("w_bit", 4)))
    version = str(quantization_config.get("version", quantization_config.get("format", "gemm"))).lower()
    if bits != 4 or version != "gemm":
        raise InputError(f"quantization_config: quantcli reads 4-bit AutoAWQ GEMM only, not {bits}-bit {version}")
    quantized: dict[str, QuantizedWeight] = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key.removesuffix(".qweight")
        if f"{name}.qzeros" not in tensors:
            raise InputError(f"{name}: AutoAWQ checkpoint without qzeros; quantcli reads zero_point checkpoints only")
        qweight = tensors[key]
        out_f = qweight.shape[1] * 8
        codes = unpack_int32_awq(qweight, out_f, dim=1).t().contiguous()
        zero = unpack_int32_awq(tensors[f"{name}.qzeros"], out_f, dim=1).t().float()
        scale = tensors[f"{name}.scales"].t().float()
        quantized[name] = QuantizedWeight(codes, scale.contiguous(), zero.contiguous(), group=codes.shape[1] // scale.shape[1])
    return quantized


# --------------------------------------------------------------------------- GPTQ


def pack_gptq(
    quantized: dict[str, QuantizedWeight], spec: QuantSpec, ignore: Iterable[str] = ()
) -> tuple[dict[str, Tensor], dict]:
    """GPTQ v1 for symmetric, v2 for asymmetric weights; see the module docstring.

    Asymmetric v1 is ambiguous (readers differ on the stored ``zero − 1``; GPTQModel refuses
    asymmetric v1 unless GPTQModel wrote it), so asymmetric checkpoints are always ``gptq_v2``.

    Every module in ``ignore`` other than ``lm_head`` is also listed in GPTQModel's ``dynamic``
    as a negative match (``-:^name$``) so that loaders keep it in full precision.
    """
    check_format("gptq", spec, quantized)
    _check_symmetric(spec, quantized)
    bits = spec.wbits
    v2 = not spec.sym
    tensors: dict[str, Tensor] = {}
    desc_act = False
    for name, qw in quantized.items():
        in_f = qw.codes.shape[1]
        act_order = has_act_order(qw)
        desc_act |= act_order
        g_idx = qw.g_idx if act_order else torch.arange(in_f) // qw.group
        stored_zero = qw.zero.t().to(torch.int64) - (0 if v2 else 1)
        tensors[f"{name}.qweight"] = pack_int32(qw.codes.t(), bits, dim=0)
        tensors[f"{name}.qzeros"] = pack_int32(stored_zero, bits, dim=1)
        tensors[f"{name}.scales"] = qw.scale.t().to(torch.float16).contiguous()
        tensors[f"{name}.g_idx"] = g_idx.to(torch.int32).contiguous()
    checkpoint_format = "gptq_v2" if v2 else "gptq"
    config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": spec.group,
        "desc_act": desc_act,
        "sym": spec.sym,
        "lm_head": "lm_head" in quantized,
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"quantcli:{__version__}"]},
    }
    skipped = sorted(name for name in ignore if name != "lm_head")
    if skipped:
        config["dynamic"] = {f"-:^{name.replace('.', '[.]')}$": {} for name in skipped}
    return tensors, config


def unpack_gptq(tensors: dict[str, Tensor], quantization_config: dict) -> dict[str, QuantizedWeight]:
    """Inverse of :func:`pack_gptq`; reads v1 (``zero − 1``) and v2 (``zero``) checkpoints."""
    bits = int(quantization_config["bits"])
    checkpoint_format = quantization_config.get("checkpoint_format") or quantization_config.get("format") or "gptq"
    if checkpoint_format not in ("gptq", "gptq_v2") or bits not in (2, 3, 4, 8):
        raise InputError(f"quantization_config: quantcli reads 2/3/4/8-bit gptq or gptq_v2, not {bits}-bit {checkpoint_format}")
    zero_offset = 1 if checkpoint_format == "gptq" else 0
    quantized: dict[str, QuantizedWeight] = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key.removesuffix(".qweight")
        qweight, scales = tensors[key], tensors[f"{name}.scales"]
        in_f, out_f = qweight.shape[0] * 32 // bits, qweight.shape[1]
        codes = unpack_int32(qweight, bits, in_f, dim=0).t().contiguous()
        zero = unpack_int32(tensors[f"{name}.qzeros"], bits, out_f, dim=1).t().float() + zero_offset
        scale = scales.t().float().contiguous()
        group = in_f // scale.shape[1]
        g_idx = tensors.get(f"{name}.g_idx")
        if g_idx is not None and torch.equal(g_idx.long(), torch.arange(in_f) // group):
            g_idx = None  # static groups: quantcli's convention is no g_idx
        g_idx = None if g_idx is None else g_idx.to(torch.int32)
        quantized[name] = QuantizedWeight(codes, scale, zero.contiguous(), group=group, g_idx=g_idx)
    return quantized


# --------------------------------------------------------------------------- dispatch

WRITERS = {"compressed-tensors": pack_compressed_tensors, "autoawq": pack_autoawq, "gptq": pack_gptq}
READERS = {"compressed-tensors": unpack_compressed_tensors, "autoawq": unpack_autoawq, "gptq": unpack_gptq}


def detect_format(quantization_config: dict) -> str:
    """The export format (one of :data:`FORMATS`) a ``quantization_config`` dict describes."""
    method = str(quantization_config.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        fmt = quantization_config.get("format")
        if fmt not in ("pack-quantized", "int-quantized", "naive-quantized"):
            raise InputError(f"quantization_config: compressed-tensors format {fmt!r} is not one quantcli reads (pack-quantized, int-quantized)")
        return "compressed-tensors"
    if method == "awq":
        return "autoawq"
    if method == "gptq":
        return "gptq"
    raise InputError(f"quantization_config: quant_method {method!r} is not one quantcli reads (compressed-tensors, awq, gptq)")


def spec_from_config(config: dict) -> QuantSpec:
    """The :class:`QuantSpec` of a packed checkpoint's config.json (quantcli's record, else inferred)."""
    recorded = (config.get("quantcli") or {}).get("spec")
    if recorded:
        return QuantSpec.from_dict(recorded)
    qcfg = config["quantization_config"]
    fmt = detect_format(qcfg)
    if fmt == "compressed-tensors":
        scheme = next(iter(qcfg["config_groups"].values()))
        weights, acts = scheme["weights"], scheme.get("input_activations")
        group = -1 if weights.get("strategy") == "channel" else int(weights["group_size"])
        if not acts:
            return QuantSpec(int(weights["num_bits"]), group, bool(weights.get("symmetric", True)))
        return QuantSpec(
            int(weights["num_bits"]), group, bool(weights.get("symmetric", True)), int(acts["num_bits"]),
            act_sym=bool(acts.get("symmetric", True)), act_static=acts.get("dynamic", False) is False,
        )
    if fmt == "autoawq":
        return QuantSpec(4, int(qcfg.get("group_size", qcfg.get("q_group_size", 128))), False)
    return QuantSpec(int(qcfg["bits"]), int(qcfg.get("group_size", 128)), bool(qcfg.get("sym", True)))
