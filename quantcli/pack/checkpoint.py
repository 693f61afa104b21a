"""Packed checkpoint directories: a standard Hugging Face model directory other tools load.

``write_packed`` writes ``config.json`` (the model's config plus ``quantization_config`` and a
``quantcli`` provenance key), the tokenizer files, ``generation_config.json`` when the model has
one, and one ``model.safetensors`` holding the packed tensors of the quantized linears and every
other tensor of the model's state dict in full precision. ``read_packed`` reads such a
directory back (also sharded ones written by other tools) into quantcli's own terms.

This is the plumbing half of :mod:`quantcli.pack`; the tensor layouts live in
:mod:`quantcli.pack.formats`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from quantcli import __version__
from quantcli.artifact import BaseModelRef, atomic_directory, check_output_free
from quantcli.errors import InputError
from quantcli.pack.formats import READERS, SUFFIXES, WRITERS, check_format, detect_format, pack_input_scales, unpack_input_scales
from quantcli.quant.affine import QuantizedWeight
from quantcli.quant.spec import QuantSpec

WEIGHTS_NAME = "model.safetensors"
BASE_MODEL, BASE_CONFIG_SHA256 = "base_model", "base_config_sha256"  # keys of config.json's quantcli block
INDEX_NAME = "model.safetensors.index.json"


def full_precision_state(model: nn.Module, quantized: dict[str, QuantizedWeight], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """``model.state_dict()`` minus ``{name}.weight`` of quantized linears and minus tied copies.

    Tensors sharing storage (lm_head tied to embed_tokens) are kept once, under the first name,
    as ``save_pretrained`` does; loaders re-tie them from ``tie_word_embeddings``. Floating
    tensors are cast to ``dtype`` when given.
    """
    dropped = {f"{name}.weight" for name in quantized}
    state: dict[str, Tensor] = {}
    seen: set[tuple] = set()
    for key, tensor in model.state_dict().items():
        if key in dropped:
            continue
        if tensor.numel():
            identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            if identity in seen:
                continue
            seen.add(identity)
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous()
    return state


def write_packed(
    out_dir: str | Path,
    model: nn.Module,
    tokenizer,
    quantized: dict[str, QuantizedWeight],
    spec: QuantSpec,
    fmt: str,
    provenance: dict | None = None,
    *,
    base: BaseModelRef | None = None,
    dtype: torch.dtype | None = None,
    act_qparams: dict[str, Tensor] | None = None,
    force: bool = False,
) -> Path:
    """Atomically write a packed HF model directory ``out_dir`` and return its path.

    model:      HF causal LM whose quantized linears are named by ``quantized``'s keys.
    tokenizer:  saved beside the weights; ``None`` writes no tokenizer files.
    provenance: stored under config.json's ``quantcli`` key (e.g. ``{"lineage": [...]}``) with the
                quantcli version, the spec and the format.
    base:       the unquantized model the codes came from; its directory and config hash are
                recorded there too (:func:`packed_info` reads them back, e.g. for a bench baseline).
    dtype:      dtype of the full-precision tensors (default: as they are in ``model``).
    act_qparams: calibrated ``"<linear>.input_scale"`` / ``".input_zero"`` of a ``spec.act_static``
                artifact (``models.weights.read_act_qparams``); stored as the format's static input scales.
    Linears that are not quantized (``lm_head``, ...) are listed as the format's ignored modules.
    Raises SpecError when ``fmt`` cannot store ``spec`` (naming the formats that can).
    """
    out = Path(out_dir)
    check_format(fmt, spec, quantized)
    check_output_free(out, force)
    ignore = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in quantized]
    packed, quantization_config = WRITERS[fmt](quantized, spec, ignore)
    packed.update(pack_input_scales(sorted(quantized), spec, act_qparams or {}))  # only formats with activations get here
    state = full_precision_state(model, quantized, dtype)
    clash = sorted(set(state) & set(packed))
    if clash:
        raise InputError(f"{out}: packed tensor {clash[0]} clashes with a model tensor of the same name")

    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config
    recorded_base = {} if base is None else {BASE_MODEL: base.ref, BASE_CONFIG_SHA256: base.config_sha256}
    config.quantcli = {"version": __version__, **(provenance or {}), **recorded_base, "spec": spec.to_dict(), "format": fmt}
    saved_dtype = dtype or next((t.dtype for t in state.values() if t.is_floating_point()), None)
    if saved_dtype is not None:
        config.dtype = saved_dtype

    with atomic_directory(out) as tmp:
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file({**state, **packed}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def packed_info(path: str | Path) -> dict | None:
    """What a packed directory says about itself, or None when ``path`` holds no quantized config.json.

    ``{"format": ..., "base_model": dir or None, "base_config_sha256": hash or None}``; the base
    model is None for checkpoints packed by other tools (they record no provenance).
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not config.get("quantization_config"):
        return None
    ours = config.get("quantcli") or {}
    return {
        "format": ours.get("format") or detect_format(config["quantization_config"]),
        BASE_MODEL: ours.get(BASE_MODEL),
        BASE_CONFIG_SHA256: ours.get(BASE_CONFIG_SHA256),
    }


def _load_tensors(path: Path) -> dict[str, Tensor]:
    index = path / INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS_NAME]
    tensors: dict[str, Tensor] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise InputError(f"{file}: missing; a packed checkpoint needs its safetensors files")
        try:
            tensors.update(load_file(str(file)))
        except SafetensorError as exc:
            raise InputError(f"{file}: not a readable safetensors file ({exc})") from None
    return tensors


def read_packed(path: str | Path) -> tuple[dict, dict[str, QuantizedWeight], dict[str, Tensor], dict[str, Tensor]]:
    """Read a packed checkpoint directory (ours or another tool's, in a format quantcli writes).

    Returns ``(config, quantized, fp_state, act_qparams)``: config.json as a dict, module name →
    :class:`QuantizedWeight`, every other tensor (biases, norms, embeddings, ignored linears)
    by its state-dict name (a tied ``lm_head.weight`` is absent, as on disk), and the static
    activation scales ``"<linear>.input_scale"`` / ``".input_zero"`` (empty for dynamic ones).
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path}: no config.json; not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{config_file}: not valid JSON ({exc.__class__.__name__})") from None
    quantization_config = config.get("quantization_config")
    if not quantization_config:
        raise InputError(f"{config_file}: no quantization_config; this is not a packed quantized checkpoint")
    try:
        fmt = detect_format(quantization_config)
    except InputError as exc:
        raise InputError(f"{config_file}: {exc}") from None
    tensors = _load_tensors(path)
    try:
        quantized = READERS[fmt](tensors, quantization_config)
        act_qparams = unpack_input_scales(tensors, quantization_config)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    except (KeyError, ValueError) as exc:
        raise InputError(f"{path}: packed tensors do not match its quantization_config ({exc}); re-pack it") from None
    consumed = {f"{name}.{suffix}" for name in quantized for suffix in SUFFIXES[fmt]}
    fp_state = {key: tensor for key, tensor in tensors.items() if key not in consumed}
    return config, quantized, fp_state, act_qparams
