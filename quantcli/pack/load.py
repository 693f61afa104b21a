"""Load a packed checkpoint directory back into a runnable model (for eval-ppl and bench)."""

from __future__ import annotations

from pathlib import Path

import torch

from quantcli.errors import InputError
from quantcli.models.canonical import canonicalize
from quantcli.models.load import Loaded, apply_quantized, base_ref, install_activation_quant
from quantcli.pack.checkpoint import read_packed
from quantcli.pack.formats import spec_from_config


def load_packed(path: Path, device: str = "cpu") -> Loaded:
    """Build the model from config.json, load its fp tensors, unpack and dequantize the rest."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_dict, quantized, fp_state = read_packed(path)
    plain = {k: v for k, v in config_dict.items() if k not in ("quantization_config", "quantcli")}
    try:
        config = AutoConfig.for_model(**plain)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"{path}: cannot build the model from its config.json ({str(exc).splitlines()[0][:160]})") from None
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in fp_state.items()}, strict=False)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.tie_weights()
    canonicalize(model)
    apply_quantized(model, quantized)
    expected_missing = {f"{name}.weight" for name in quantized} | {"lm_head.weight"}
    absent = [k for k in missing if k not in expected_missing and ".experts." not in k]
    if absent or unexpected:
        raise InputError(f"{path}: tensors do not match the config (missing {absent[:2]}, unexpected {unexpected[:2]}); re-pack it")
    spec = spec_from_config(config_dict)
    install_activation_quant(model, sorted(quantized), spec.abits)
    model.eval().to(device)
    return Loaded(model, tokenizer, path, base_ref(path, str(path)), None, spec, quantized)
