"""Replay what a stage changed in the full-precision model, one decoder layer at a time.

A stage's search result is its artifact: ``<kind>.safetensors`` (AWQ's scales and clips, …) and
``overrides.safetensors`` (fp parameters it changed), both under full parameter names. To rebuild
the model a stage describes, its transform is replayed onto the base model layer by layer:

    for each decoder layer i:  replay_<kind>(layer_i, arch, search[i])  then  overrides[i]

where ``search[i]`` and ``overrides[i]`` are the tensors under ``<layers_path>.<i>.``, renamed
relative to the layer (``"input_layernorm.scales"``). Each algorithm module registers its own
layer replay with :func:`register_replay` (a kind whose transform lives entirely in its codes and
overrides registers :func:`register_no_replay`), so adding an algorithm touches no loader, and an
artifact of a kind nobody registered fails loudly instead of loading as something else.
Importing this module imports the package ``quantcli.algos`` first, whose ``__init__`` imports
every algorithm module, so the table is full whenever a replay is looked up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from torch import Tensor, nn

from quantcli.artifact import Artifact
from quantcli.errors import ArtifactError
from quantcli.models.arch import ArchSpec
from quantcli.models.weights import OVERRIDES_FILE, apply_overrides

LayerReplay = Callable[[nn.Module, ArchSpec, dict[str, Tensor]], None]
"""``replay(layer, arch, tensors)``: redo one stage's fp transform on one decoder layer in place."""

V = TypeVar("V")

_REPLAYS: dict[str, LayerReplay] = {}


def register_replay(kind: str) -> Callable[[LayerReplay], LayerReplay]:
    """Decorator: ``fn`` replays artifacts of ``kind`` onto one decoder layer."""

    def register(fn: LayerReplay) -> LayerReplay:
        if kind in _REPLAYS:
            raise RuntimeError(f"a replay for artifact kind {kind!r} is already registered ({_REPLAYS[kind].__module__})")
        _REPLAYS[kind] = fn
        return fn

    return register


def _nothing(_layer: nn.Module, _arch: ArchSpec, _tensors: dict[str, Tensor]) -> None:
    """The stage changed nothing in full precision beyond its overrides."""


def register_no_replay(kind: str) -> None:
    """Register ``kind`` as having no fp transform to replay (its codes say everything)."""
    register_replay(kind)(_nothing)


def replay_for(artifact: Artifact) -> LayerReplay:
    """The registered layer replay of ``artifact``'s kind; a one-line error when there is none."""
    if artifact.kind not in _REPLAYS:
        raise ArtifactError(
            f"{artifact.path}: no algorithm registers a replay for artifact kind {artifact.kind!r}; "
            "this quantcli cannot rebuild its model (re-create the artifact with a supported stage)"
        )
    return _REPLAYS[artifact.kind]


def layer_tensors(tensors: Mapping[str, V], prefix: str) -> dict[str, V]:
    """The tensors under ``prefix`` (e.g. ``"model.layers.3."``), names made relative to it
    (only those values are read from a lazy mapping)."""
    return {key[len(prefix) :]: tensors[key] for key in tensors if key.startswith(prefix)}


@dataclass
class StageReplay:
    """One stage of a lineage, ready to replay layer by layer (payloads read once, lazily)."""

    artifact: Artifact
    replay: LayerReplay
    _search: dict[str, Tensor] | None = field(default=None, repr=False)
    _overrides: dict[str, Tensor] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, artifact: Artifact) -> "StageReplay":
        return cls(artifact, replay_for(artifact))

    def _payload(self, name: str) -> dict[str, Tensor]:
        return self.artifact.tensors(name) if self.artifact.has(name) else {}

    @property
    def search(self) -> dict[str, Tensor]:
        if self._search is None:
            self._search = self._payload(f"{self.artifact.kind}.safetensors")
        return self._search

    @property
    def overrides(self) -> dict[str, Tensor]:
        if self._overrides is None:
            self._overrides = self._payload(OVERRIDES_FILE)
        return self._overrides

    def replay_layer(self, layer: nn.Module, arch: ArchSpec, index: int) -> None:
        """Redo this stage's transform on decoder layer ``index`` (``layer``, in place)."""
        prefix = f"{arch.layers_path}.{index}."
        self.replay(layer, arch, layer_tensors(self.search, prefix))
        apply_overrides(layer, layer_tensors(self.overrides, prefix), where=f"{self.artifact.path}: layer {index}")

    def replay_outside_layers(self, model: nn.Module, arch: ArchSpec) -> None:
        """Apply this stage's overrides of parameters outside the decoder layers (if any)."""
        outside = {k: v for k, v in self.overrides.items() if not k.startswith(f"{arch.layers_path}.")}
        apply_overrides(model, outside, where=str(self.artifact.path))
