"""Read a packed checkpoint directory back into a runnable model (for eval-ppl and bench).

The model is built from ``config.json``, canonicalised like any base model, its full-precision
tensors loaded and its packed linears unpacked and dequantized into it, with the activation (and
KV-cache) fake quantization its spec names installed, static input scales from the checkpoint. Every parameter starts
as NaN, so one that neither the checkpoint's tensors nor its codes fill (an expert dropped from
a MoE checkpoint, a truncated shard) is found by name and refused instead of running random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantcli.errors import InputError
from quantcli.models.canonical import canonicalize
from quantcli.models.act_hooks import install_spec_hooks
from quantcli.models.weights import apply_quantized
from quantcli.pack.checkpoint import INDEX_NAME, WEIGHTS_NAME, read_packed
from quantcli.pack.formats import spec_from_config
from quantcli.quant import QuantizedWeight, QuantSpec


@dataclass
class PackedModel:
    """A packed checkpoint loaded for running: the dequantized model and what it was packed with."""

    model: nn.Module
    tokenizer: object
    spec: QuantSpec
    quantized: dict[str, QuantizedWeight]
    config: dict  # config.json as written (with ``quantization_config`` and quantcli's provenance)


def load_packed(path: Path) -> PackedModel:
    """Build the model from config.json, load its fp tensors, unpack and dequantize the rest (on CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_dict, quantized, fp_state, act_qparams = read_packed(path)
    plain = {k: v for k, v in config_dict.items() if k not in ("quantization_config", "quantcli")}
    try:
        config = AutoConfig.for_model(**plain)
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
    if spec.act_static and (absent := [n for n in sorted(quantized) if f"{n}.input_scale" not in act_qparams]):
        raise InputError(f"{weights}: static activations but no input_scale for {absent[0]}; re-pack it")
    install_spec_hooks(model, sorted(quantized), spec, act_qparams)  # activations (and KV cache) as the spec says
    model.eval()
    return PackedModel(model, tokenizer, spec, quantized, config_dict)
