"""Stream a model from its safetensors shards, one decoder layer at a time.

The model's skeleton is built from ``config.json`` with every parameter on the ``meta`` device
(no memory), made canonical (``canonical.py``) like an eagerly loaded model. A module is
materialised on demand straight from the shards (``safe_open``, tensor by tensor, read in the
checkpoint's dtype and cast to the compute dtype on the device) and released back to ``meta``
afterwards. Peak memory is one decoder layer, whatever the depth.

A checkpoint is either one ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (``weight_map``: tensor name → shard file). Where the
checkpoint's tensor names differ from the modules' (transformers converts them at load time),
the differences this module knows are data, :data:`KEY_RENAMES` and :data:`EXPERT_LAYOUTS`: an
older module name (Mixtral's ``block_sparse_moe`` for ``mlp``), and fused expert tensors
(``experts.gate_up_proj: [E, 2I, H]``, ``experts.down_proj: [E, H, I]``) stored per expert
(``experts.{e}.w1/w3/w2`` in Mixtral checkpoints, ``experts.{e}.gate_proj/up_proj/down_proj`` in
Qwen-MoE-style ones), read one layer's experts at a time. A checkpoint with other differences is
not streamed: :func:`can_stream` says so and callers load it eagerly.
"""

from __future__ import annotations

import ctypes
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from quantcli.errors import InputError
from quantcli.models.arch import arch_spec, decoder_layers
from quantcli.models.canonical import canonical_tensors, canonicalize, hf_keys

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# a module path fragment → the name older checkpoints store it under
KEY_RENAMES = ((".mlp.", ".block_sparse_moe."),)
# per-expert names of a fused experts module's (gate, up, down) weights, as checkpoints store them
EXPERT_LAYOUTS = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
FUSED_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


class ShardIndex:
    """Tensor name → shard file of a safetensors checkpoint; reads one tensor at a time."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE_FILE).is_file():
            with safe_open(str(self.dir / SINGLE_FILE), "pt") as fh:
                self.weight_map = {key: SINGLE_FILE for key in fh.keys()}
        else:
            raise InputError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE}; streaming needs safetensors weights")
        missing = sorted(f for f in set(self.weight_map.values()) if not (self.dir / f).is_file())
        if missing:  # callers fall back to the whole-model loader, which names the file
            raise InputError(f"{self.dir / missing[0]}: missing, though {INDEX_FILE} lists it; restore the checkpoint")
        self._handles: dict[str, object] = {}

    def __contains__(self, key: str) -> bool:
        return self._source(key) is not None

    def _source(self, key: str) -> tuple[str, ...] | tuple[str, tuple[str, ...], int] | None:
        """Where tensor ``key`` of the module tree lives: ``("direct", name)``, or ``("experts",
        per-expert name template, expert count)`` for a fused experts tensor stored per expert
        (see the module docstring), or None when the checkpoint does not hold it."""
        names = [key] + [key.replace(new, old) for new, old in KEY_RENAMES if new in key]
        for name in names:
            if name in self.weight_map:
                return ("direct", name)
        for fused in FUSED_EXPERTS:
            if not key.endswith(fused):
                continue
            for name in names:
                base = name.rsplit(".", 1)[0] + "."  # "….experts."
                for gate, up, down in EXPERT_LAYOUTS:
                    parts = (gate, up) if fused == FUSED_EXPERTS[0] else (down,)
                    templates = tuple(f"{base}{{e}}.{part}.weight" for part in parts)
                    count = 0
                    while all(t.format(e=count) in self.weight_map for t in templates):
                        count += 1
                    if count:
                        return ("experts", templates, count)
        return None

    def get(self, key: str) -> Tensor:
        """Tensor ``key`` on the CPU in the checkpoint's dtype (a fused experts tensor stacked from
        its per-expert tensors, gate before up)."""
        source = self._source(key)
        if source is None:
            raise InputError(f"{self.dir}: the checkpoint has no tensor {key}; is it complete?")
        if source[0] == "direct":
            return self._tensor(source[1])
        _, templates, count = source
        return torch.stack([torch.cat([self._tensor(t.format(e=e)) for t in templates]) for e in range(count)])

    def _tensor(self, name: str) -> Tensor:
        file = self.weight_map[name]
        try:
            if file not in self._handles:
                self._handles[file] = safe_open(str(self.dir / file), "pt")
            return self._handles[file].get_tensor(name)
        except (OSError, SafetensorError) as exc:
            raise InputError(f"{self.dir / file}: cannot read {name} ({str(exc).splitlines()[0][:120]}); restore the checkpoint") from None

    def close(self) -> None:
        """Unmap the shards: pages read through a mapping count in the process's RSS until then."""
        self._handles.clear()


def skeleton(model_dir: Path, config=None) -> nn.Module:
    """The canonical model of ``model_dir`` (or of ``config``, a transformers config) with its
    parameters on ``meta`` (buffers computed)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config or AutoConfig.from_pretrained(str(model_dir))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    arch_spec(model)  # unknown architecture → one-line error before any work
    canonicalize(model)
    return model.eval()


def can_stream(model_dir: Path) -> bool:
    """Whether every tensor of the canonical model maps onto a checkpoint tensor by name."""
    try:
        model, index = skeleton(model_dir), ShardIndex(model_dir)
    except InputError:
        return False
    return all_keys_present(model, index)


def all_keys_present(model: nn.Module, index) -> bool:
    """Whether ``index`` holds every tensor of the canonical ``model`` (a tied head may be absent)."""
    tied = _tied_keys(model)
    return all(key in index or key in tied for key in hf_keys(model))


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """Output-head weight name → input-embedding weight name when the two are tied."""
    if not getattr(model.config, "tie_word_embeddings", False) and not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return {}
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(head)]}.weight": f"{names[id(emb)]}.weight"}


def _set(module: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise: RSS grew ~50 MB per
    released 1.2B layer without this); a no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def to_device(value, device: torch.device | str):
    """``value`` (a tensor, or a tuple of them, e.g. rotary position embeddings) on ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    return value


def _buffers_to(module: nn.Module, device: torch.device | str) -> None:
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and not buf.is_meta:
                sub._buffers[name] = buf.to(device)


class StreamedModel:
    """A model whose modules live in their safetensors shards until :meth:`onload` is called.

    ``model`` is the canonical skeleton (parameters on ``meta``); ``dtype`` the compute dtype.
    """

    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32, model: nn.Module | None = None, index=None):
        self.dir = Path(model_dir)
        self.model = model if model is not None else skeleton(self.dir)
        self.index = index if index is not None else ShardIndex(self.dir)  # anything with ``in``, ``get`` and ``close``
        self.dtype = dtype
        self.arch = arch_spec(self.model)
        self.layers = decoder_layers(self.model, self.arch)
        self._tied = _tied_keys(self.model)
        # what a loader replays onto each module as it is read (an artifact's lineage and codes)
        self.prepare_layer: Callable[[int, nn.Module], None] = lambda _index, _layer: None
        self.prepare_outside: Callable[[nn.Module], None] = lambda _model: None

    def _read(self, key: str, device: torch.device | str) -> Tensor:
        key = key if key in self.index or key not in self._tied else self._tied[key]
        tensor = self.index.get(key)  # may be a view of the memory-mapped file: always copy
        return tensor.to(device, self.dtype if tensor.is_floating_point() else tensor.dtype, copy=True)

    def onload(self, path: str, device: torch.device | str = "cpu") -> nn.Module:
        """Materialise module ``path`` (``""`` = the whole model) on ``device``; return it."""
        module = self.model.get_submodule(path)
        prefix = f"{path}." if path else ""
        try:
            tensors = canonical_tensors(module, lambda rel: self._read(prefix + rel, device))
        finally:
            self.index.close()
        for name, value in tensors.items():
            _set(module, name, value)
        _buffers_to(module, device)  # buffers computed at build time (rotary frequencies)
        return module

    def offload(self, path: str) -> None:
        """Release module ``path``'s parameters back to ``meta``."""
        module = self.model.get_submodule(path)
        for name, p in list(module.named_parameters()):
            _set(module, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        _buffers_to(module, "cpu")
        _return_freed_memory()

    def layer_path(self, index: int) -> str:
        return f"{self.arch.layers_path}.{index}"

    def onload_layer(self, index: int, device: torch.device | str) -> nn.Module:
        layer = self.onload(self.layer_path(index), device)
        self.prepare_layer(index, layer)
        return layer

    def offload_layer(self, index: int) -> None:
        self.offload(self.layer_path(index))

    @contextmanager
    def outside_layers(self, device: torch.device | str, head: bool = False) -> Iterator[nn.Module]:
        """Embeddings and rotary frequencies (and with ``head`` the final norm and head) on ``device``."""
        paths = outer_paths(self.model, self.arch.layers_path, head)
        try:
            for path in paths:
                self.onload(path, device)
            self.prepare_outside(self.model)
            yield self.model
        finally:
            for path in paths:
                self.offload(path)


def outer_paths(model: nn.Module, layers_path: str, head: bool) -> list[str]:
    """Top-level modules outside the decoder layers (embeddings, rotary frequencies, …);
    the final norm and the output head only with ``head``."""
    skip = set() if head else {id(model.get_output_embeddings()), id(getattr(model.get_decoder(), "norm", None))}
    stack, out = [("", model)], []
    while stack:
        name, module = stack.pop()
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if full == layers_path or id(child) in skip:
                continue
            if layers_path.startswith(full + "."):
                stack.append((full, child))
            else:
                out.append(full)
    return out


class InMemoryModel:
    """The layer-source interface of :class:`StreamedModel` for a model already in memory:
    modules are moved to the device and back to the CPU."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.arch = arch_spec(model)
        self.layers = decoder_layers(model, self.arch)

    def onload_layer(self, index: int, device: torch.device | str) -> nn.Module:
        return self.layers[index].to(device)

    def offload_layer(self, index: int) -> None:
        self.layers[index].to("cpu")

    @contextmanager
    def outside_layers(self, device: torch.device | str, head: bool = False) -> Iterator[nn.Module]:
        paths = outer_paths(self.model, self.arch.layers_path, head)
        try:
            for path in paths:
                self.model.get_submodule(path).to(device)
            yield self.model
        finally:
            for path in paths:
                self.model.get_submodule(path).to("cpu")
