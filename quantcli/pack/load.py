"""Read a packed checkpoint directory back into a runnable model (for eval-ppl and bench).

The model is built from ``config.json``, canonicalised like any base model, its full-precision
tensors loaded and its packed linears unpacked and dequantized into it, with the activation (and
KV-cache) fake quantization its spec names installed, static input scales from the checkpoint. Every parameter starts
as NaN, so one that neither the checkpoint's tensors nor its codes fill (an expert dropped from
a MoE checkpoint, a truncated shard) is found by name and refused instead of running random.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantcli.errors import InputError
from quantcli.models.canonical import canonicalize
from quantcli.models.act_hooks import install_spec_hooks
from quantcli.models.stream import ShardIndex, StreamedModel, all_keys_present, skeleton
from quantcli.models.weights import apply_quantized
from quantcli.pack.checkpoint import INDEX_NAME, WEIGHTS_NAME, read_packed
from quantcli.pack.formats import MARKERS, READERS, SUFFIXES, detect_format, spec_from_config, unpack_input_scales
from quantcli.quant import QuantizedWeight, QuantSpec


@dataclass
class PackedModel:
    """A packed checkpoint loaded for running: the dequantized model and what it was packed with."""

    model: nn.Module
    tokenizer: object
    spec: QuantSpec
    quantized: dict[str, QuantizedWeight]
    config: dict  # config.json as written (with ``quantization_config`` and quantcli's provenance)


def _plain_config(path: Path, config_dict: dict):
    """The transformers config of a packed checkpoint, without its quantization blocks."""
    from transformers import AutoConfig

    plain = {k: v for k, v in config_dict.items() if k not in ("quantization_config", "quantcli")}
    try:
        return AutoConfig.for_model(**plain)
    except (ValueError, KeyError) as exc:
        raise InputError(f"{path}: cannot build the model from its config.json ({str(exc).splitlines()[0][:160]})") from None


def _check_input_scales(where: Path, spec: QuantSpec, names: list[str], act_qparams: dict) -> None:
    """Refuse a static-activation checkpoint that lacks one of its linears' input scales."""
    if spec.act_static and (absent := [n for n in names if f"{n}.input_scale" not in act_qparams]):
        raise InputError(f"{where}: static activations but no input_scale for {absent[0]}; re-pack it")


def load_packed(path: Path) -> PackedModel:
    """Build the model from config.json, load its fp tensors, unpack and dequantize the rest (on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_dict, quantized, fp_state, act_qparams = read_packed(path)
    config = _plain_config(path, config_dict)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"{path}: cannot build the model from its config.json ({str(exc).splitlines()[0][:160]})") from None
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(math.nan)
    state = {k: v.float() for k, v in fp_state.items()}
    _, unexpected = model.load_state_dict(state, strict=False)  # the Hugging Face layout (fused experts, …)
    model.tie_weights()
    canonicalize(model)
    leftover = {k: state[k] for k in unexpected}  # tensors stored in the canonical layout (per-expert linears)
    _, unexpected = model.load_state_dict(leftover, strict=False)
    apply_quantized(model, quantized)
    weights = path / (INDEX_NAME if (path / INDEX_NAME).is_file() else WEIGHTS_NAME)
    missing = [name for name, param in model.named_parameters() if torch.isnan(param).all()]
    if missing:
        raise InputError(
            f"{weights}: holds no tensors for {len(missing)} parameters of the model "
            f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}); the checkpoint is incomplete, re-pack it"
        )
    if unexpected:
        raise InputError(f"{weights}: tensors the config does not describe ({', '.join(unexpected[:3])}); re-pack it")
    spec = spec_from_config(config_dict)
    _check_input_scales(weights, spec, sorted(quantized), act_qparams)
    install_spec_hooks(model, sorted(quantized), spec, act_qparams)  # activations (and KV cache) as the spec says
    model.eval()
    return PackedModel(model, tokenizer, spec, quantized, config_dict)


class PackedIndex:
    """The tensors of a packed checkpoint as a base checkpoint's: a quantized linear's ``weight``
    is unpacked and dequantized from that module's packed tensors when it is read, every other
    tensor is read as stored. Reads one module's tensors at a time (:class:`ShardIndex`)."""

    def __init__(self, path: Path, config_dict: dict):
        self.shards = ShardIndex(path)
        self.qconfig = config_dict["quantization_config"]
        self.format = detect_format(self.qconfig)
        marker = f".{MARKERS[self.format]}"
        self.quantized = {key.removesuffix(marker) for key in self.shards.weight_map if key.endswith(marker)}

    def _module(self, key: str) -> str | None:
        name = key.removesuffix(".weight")
        return name if key.endswith(".weight") and name in self.quantized else None

    def __contains__(self, key: str) -> bool:
        return self._module(key) is not None or key in self.shards

    def get(self, key: str) -> torch.Tensor:
        name = self._module(key)
        return self.shards.get(key) if name is None else self.quantized_weight(name).dequantize()

    def quantized_weight(self, name: str) -> QuantizedWeight:
        """Module ``name``'s codes and parameters, read from its packed tensors."""
        parts = {f"{name}.{s}": self.shards.get(f"{name}.{s}") for s in SUFFIXES[self.format] if f"{name}.{s}" in self.shards}
        return READERS[self.format](parts, self.qconfig)[name]

    def input_scales(self) -> dict[str, torch.Tensor]:
        """The static activation scales (scalars), read all at once."""
        keys = [k for k in self.shards.weight_map if k.endswith((".input_scale", ".input_zero_point"))]
        return unpack_input_scales({k: self.shards.get(k) for k in keys}, self.qconfig)

    def close(self) -> None:
        self.shards.close()


class PackedWeights(Mapping):
    """Module name → :class:`QuantizedWeight` of a packed checkpoint, each read from the shards when
    it is looked up (nothing is held)."""

    def __init__(self, index: PackedIndex):
        self.index = index

    def __getitem__(self, name: str) -> QuantizedWeight:
        if name not in self.index.quantized:
            raise KeyError(name)
        return self.index.quantized_weight(name)

    def __iter__(self):
        return iter(sorted(self.index.quantized))

    def __len__(self) -> int:
        return len(self.index.quantized)


def stream_packed(path: Path) -> tuple[StreamedModel, QuantSpec, PackedWeights] | None:
    """A packed checkpoint as a :class:`StreamedModel` (one decoder layer dequantized at a time,
    activation quantization installed as its spec says), its spec and its quantized weights (read
    on lookup), or None when its tensors do not map onto the model's by name (e.g. per-expert MoE
    tensors): then it is loaded whole."""
    config_dict = json.loads((path / "config.json").read_text())
    try:
        index = PackedIndex(path, config_dict)
    except InputError:
        return None
    model = skeleton(path, _plain_config(path, config_dict))
    modules = dict(model.named_modules())
    if (
        not all_keys_present(model, index)
        or set(index.shards.weight_map) - _covered(model, index)
        or any(not isinstance(modules.get(name), nn.Linear) for name in index.quantized)
    ):
        return None  # absent or unexplained tensors: the whole-model loader names them
    spec = spec_from_config(config_dict)
    names = sorted(index.quantized)
    static = index.input_scales() if spec.act_static else None
    _check_input_scales(path, spec, names, static)
    install_spec_hooks(model, names, spec, static)
    return StreamedModel(path, model=model, index=index), spec, PackedWeights(index)


def _covered(model: nn.Module, index: PackedIndex) -> set[str]:
    """The stored tensor names the model's tensors are read from (packed modules: all their parts)."""
    from quantcli.models.canonical import hf_keys

    covered = set(index.shards.weight_map) & set(hf_keys(model))
    for name in index.quantized:
        covered |= {f"{name}.{s}" for s in SUFFIXES[index.format]}
    return covered
