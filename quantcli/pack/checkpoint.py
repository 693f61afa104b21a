"""Packed checkpoint directories: a standard Hugging Face model directory other tools load.

``write_packed`` writes ``config.json`` (the model's config plus ``quantization_config`` and a
``quantcli`` provenance key), the tokenizer files, ``generation_config.json`` when the model has
one, and the weights as Hugging Face shards listed in ``model.safetensors.index.json``: one per
decoder layer (its packed quantized linears and every other tensor of it in full precision),
written as the layer is read, and one for the tensors outside the layers, so packing a model
streamed from its shards holds one layer at a time. ``read_packed`` reads such a directory back
(also one-file or sharded ones written by other tools) into quantcli's own terms.

This is the plumbing half of :mod:`quantcli.pack`; the tensor layouts live in
:mod:`quantcli.pack.formats`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from quantcli import __version__
from quantcli.artifact import BaseModelRef, atomic_directory, check_output_free
from quantcli.errors import InputError
from quantcli.models.canonical import strip_norm_offsets
from quantcli.models.stream import InMemoryModel, _tied_keys as tied_keys, outer_paths
from quantcli.pack.formats import READERS, SUFFIXES, WRITERS, check_format, detect_format, pack_input_scales, unpack_input_scales
from quantcli.quant.affine import QuantizedWeight
from quantcli.quant.spec import QuantSpec

WEIGHTS_NAME = "model.safetensors"  # the one weights file of an unsharded checkpoint (other tools write them)
BASE_MODEL, BASE_CONFIG_SHA256 = "base_model", "base_config_sha256"  # keys of config.json's quantcli block
INDEX_NAME = "model.safetensors.index.json"


def full_precision_state(state: dict[str, Tensor], quantized: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """A state dict minus ``{name}.weight`` of the quantized linears ``quantized`` and minus tied copies.

    Tensors sharing storage (lm_head tied to embed_tokens) are kept once, under the first name,
    as ``save_pretrained`` does; loaders re-tie them from ``tie_word_embeddings``. Floating
    tensors are cast to ``dtype`` when given.
    """
    dropped = {f"{name}.weight" for name in quantized}
    out: dict[str, Tensor] = {}
    seen: set[tuple] = set()
    for key, tensor in state.items():
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
        out[key] = tensor.contiguous()
    return out


def write_packed(
    out_dir: str | Path,
    model,
    tokenizer,
    quantized: Mapping[str, QuantizedWeight],
    spec: QuantSpec,
    fmt: str,
    provenance: dict | None = None,
    *,
    base: BaseModelRef | None = None,
    dtype: torch.dtype | None = None,
    act_qparams: dict[str, Tensor] | None = None,
    force: bool = False,
) -> Path:
    """Atomically write a packed HF model directory ``out_dir``, one decoder layer at a time, and return its path.

    model:      HF causal LM whose quantized linears are named by ``quantized``'s keys, or a layer
                source (:class:`quantcli.models.stream.StreamedModel`, whose layers are read and
                replayed one at a time as they are written, so peak memory is one layer). Its
                offset norms are put back in the Hugging Face form (use the model only to save).
    quantized:  module name → codes; read one layer's linears at a time (a lazy mapping stays lazy).
    tokenizer:  saved beside the weights; ``None`` writes no tokenizer files.
    provenance: stored under config.json's ``quantcli`` key (e.g. ``{"lineage": [...]}``) with the
                quantcli version, the spec and the format.
    base:       the unquantized model the codes came from; its directory and config hash are
                recorded there too (:func:`packed_info` reads them back, e.g. for a bench baseline).
    dtype:      dtype of the full-precision tensors (default: as they are in ``model``).
    act_qparams: calibrated ``"<linear>.input_scale"`` / ``".input_zero"`` of a ``spec.act_static``
                artifact (``QuantizedCodes.act_qparams``); stored as the format's static input scales.
    The weights are Hugging Face shards: ``model-0000k-of-0000n.safetensors``, one per decoder
    layer (its full-precision tensors and its linears' packed tensors) and the last for everything
    outside the layers, listed in ``model.safetensors.index.json``.
    Linears that are not quantized (``lm_head``, ...) are listed as the format's ignored modules.
    Raises SpecError when ``fmt`` cannot store ``spec`` (naming the formats that can).
    """
    out = Path(out_dir)
    check_format(fmt, spec, {})  # what the spec alone rules out, before any work; each layer's linears are checked as packed
    check_output_free(out, force)
    source = layer_source(model)
    layers_path = source.arch.layers_path
    ignore = [name for name, module in source.model.named_modules() if isinstance(module, nn.Linear) and name not in quantized]
    configs: list[dict] = []
    saved_dtype = dtype

    def pack_shard(state: dict[str, Tensor], prefix: str | None) -> dict[str, Tensor]:
        """One shard: the fp tensors of ``state`` (a layer's, or with ``prefix=None`` those outside
        the layers) but the quantized linears' weights, and those linears packed."""
        nonlocal saved_dtype
        names = [n for n in quantized if n.startswith(prefix)] if prefix else [n for n in quantized if not n.startswith(f"{layers_path}.")]
        fp = full_precision_state(state, names, dtype)
        packed, quantization_config = WRITERS[fmt]({name: quantized[name] for name in names}, spec, ignore)
        packed.update(pack_input_scales(names, spec, act_qparams or {}))  # only formats with activations get here
        configs.append(quantization_config)
        clash = sorted(set(fp) & set(packed))
        if clash:
            raise InputError(f"{out}: packed tensor {clash[0]} clashes with a model tensor of the same name")
        saved_dtype = saved_dtype or next((t.dtype for t in fp.values() if t.is_floating_point()), None)
        return {**fp, **packed}

    with atomic_directory(out) as tmp:
        write_layer_shards(tmp, source, _hf_norms_state, pack_shard)
        config = copy.deepcopy(source.model.config)
        config.quantization_config = _merge_configs(configs)
        recorded_base = {} if base is None else {BASE_MODEL: base.ref, BASE_CONFIG_SHA256: base.config_sha256}
        config.quantcli = {"version": __version__, **(provenance or {}), **recorded_base, "spec": spec.to_dict(), "format": fmt}
        if saved_dtype is not None:
            config.dtype = saved_dtype
        save_beside(tmp, source, config, tokenizer)
    return out


def layer_source(model):
    """``model`` as a layer source: a :class:`StreamedModel` as it is, a model in memory wrapped."""
    return InMemoryModel(model) if isinstance(model, nn.Module) else model


def _hf_norms_state(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state dict with offset norms put back in the Hugging Face form (in place)."""
    strip_norm_offsets(module)
    return module.state_dict()


def write_layer_shards(
    directory: Path,
    source,
    state_of: Callable[[nn.Module], dict[str, Tensor]],
    finish: Callable[[dict[str, Tensor], str | None], dict[str, Tensor]] = lambda state, _prefix: state,
) -> None:
    """Write a model's weights into ``directory`` as Hugging Face shards, one decoder layer at a time.

    source:   a layer source (:class:`quantcli.models.stream.StreamedModel`, whose layers are read
              from their checkpoint and replayed as they are onloaded, or :class:`InMemoryModel`).
    state_of: the tensors of one module, names relative to it (e.g. ``hf_state_dict``).
    finish:   ``(state, prefix) → tensors`` to store, from one shard's state (full names): a decoder
              layer's under ``prefix`` (``"model.layers.3."``), or with ``prefix=None`` that of the
              modules outside the layers, without the output head when the config ties it to the
              input embeddings (loaders re-tie it).
    Shard ``k`` of ``n`` is ``model-0000k-of-0000n.safetensors``: one per layer, the last for the
    rest; ``model.safetensors.index.json`` maps every tensor to its shard. Peak memory is one layer.
    """
    layers_path, count = source.arch.layers_path, len(source.layers) + 1
    weight_map: dict[str, str] = {}
    total_size = 0

    def save(k: int, tensors: dict[str, Tensor]) -> None:
        nonlocal total_size
        name = f"model-{k + 1:05d}-of-{count:05d}.safetensors"
        save_file({key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())

    for index in range(len(source.layers)):
        prefix = f"{layers_path}.{index}."
        layer = source.onload_layer(index, "cpu")
        save(index, finish({prefix + key: value for key, value in state_of(layer).items()}, prefix))
        del layer
        source.offload_layer(index)
    with source.outside_layers("cpu", head=True) as model:
        tied = tied_keys(model)
        state = {}
        for path in outer_paths(model, layers_path, head=True):
            state.update({f"{path}.{key}": value for key, value in state_of(model.get_submodule(path)).items()})
        save(count - 1, finish({key: value for key, value in state.items() if key not in tied}, None))
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))


def save_beside(directory: Path, source, config, tokenizer) -> None:
    """``config`` (a ``PretrainedConfig``), the generation config and the tokenizer (unless None) into
    ``directory``; a model streamed from a checkpoint keeps that checkpoint's generation config."""
    config.save_pretrained(directory)
    generation = _generation_config(source)
    if generation is not None:
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _merge_configs(configs: list[dict]) -> dict:
    """One ``quantization_config`` from each shard's: a flag set by any shard (GPTQ's ``desc_act``,
    ``lm_head``) is set; every other field is the same in all of them."""
    merged = dict(configs[0])
    for config in configs[1:]:
        for key, value in config.items():
            if isinstance(value, bool):
                merged[key] = merged[key] or value
    return merged


def _generation_config(source):
    """The generation config to save: the checkpoint's own file when the model is streamed from one."""
    directory = getattr(source, "dir", None)
    if directory is not None and (Path(directory) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(str(directory))
    return getattr(source.model, "generation_config", None)


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
