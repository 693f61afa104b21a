"""What the user named → a model: the one place that turns an input into something that runs.

An input is ``None`` (the embedded default model), a Hugging Face model directory, a GGUF file
(or a directory holding one), a hub id already in the local cache, a quantcli artifact, or a
packed checkpoint directory. This module sits above :mod:`quantcli.models` (base models and
weights), :mod:`quantcli.algos` (each algorithm's layer replay) and :mod:`quantcli.pack` (packed
checkpoints); none of them imports it.

``materialize(artifact)`` rebuilds the model an artifact describes from its base model, one
decoder layer at a time: for layer ``i``, every stage of the lineage (root first) replays its
full-precision transform on it (:mod:`quantcli.algos.replay`), then the last stage's integer
codes are dequantized into its linears. Activation fake-quant is installed when the spec
quantizes activations.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from quantcli.algos.replay import StageReplay, layer_tensors
from quantcli.artifact import Artifact, BaseModelRef, is_artifact, open_artifact
from quantcli.errors import ArtifactError, InputError
from quantcli.models.arch import arch_spec, architecture_name, decoder_layers
from quantcli.models.load import base_ref, config_hash, load_base, quiet_hub, resolve_base_dir
from quantcli.models.act_hooks import install_spec_hooks
from quantcli.models.stream import StreamedModel, can_stream
from quantcli.models.weights import QuantizedCodes, apply_quantized, read_quantized
from quantcli.pack.load import load_packed, stream_packed
from quantcli.quant import QuantizedWeight, QuantSpec

STREAM_ENV = "QUANTCLI_STREAM"


@dataclass
class Loaded:
    """A model ready to run, with everything the stages need to know about where it came from."""

    model: nn.Module
    tokenizer: object
    base_dir: Path
    base: BaseModelRef
    artifact: Artifact | None = None
    spec: QuantSpec | None = None
    quantized: Mapping[str, QuantizedWeight] = field(default_factory=dict)
    stream: StreamedModel | None = None  # when ``model`` is its meta-device skeleton

    @property
    def architecture(self) -> str:
        return architecture_name(self.model)


def base_dir_of(artifact: Artifact) -> Path:
    """The base model directory of an artifact, refused if it is gone or its config changed."""
    ref = artifact.manifest.base_model
    model_dir = Path(ref.ref)
    if not (model_dir / "config.json").is_file():
        raise ArtifactError(f"{artifact.path}: its base model {model_dir} is missing; restore it or re-run the stage")
    if config_hash(model_dir) != ref.config_sha256:
        raise ArtifactError(
            f"{artifact.path}: base model {model_dir} has changed since the artifact was made (config hash differs); re-run the stage"
        )
    return model_dir


def spec_of(artifact: Artifact | None) -> QuantSpec | None:
    if artifact is None or artifact.manifest.spec is None:
        return None
    return QuantSpec.from_dict(artifact.manifest.spec)


def replay_lineage(model: nn.Module, stages: list[StageReplay], codes: Mapping[str, QuantizedWeight]) -> None:
    """Replay ``stages`` (root first) onto ``model`` layer by layer, then put ``codes`` (full names) in.

    Layer ``i`` gets every stage's transform in lineage order, then its own dequantized codes;
    overrides and codes outside the decoder layers follow.
    """
    arch = arch_spec(model)
    replay_layer = layer_replayer(stages, codes, arch)
    for index, layer in enumerate(decoder_layers(model, arch)):
        replay_layer(index, layer)
    replay_outside(stages, codes, arch)(model)


def layer_replayer(stages: list[StageReplay], codes: Mapping[str, QuantizedWeight], arch) -> Callable[[int, nn.Module], None]:
    """``f(index, layer)``: every stage's transform on decoder layer ``index``, then its codes."""

    def replay_layer(index: int, layer: nn.Module) -> None:
        for stage in stages:
            stage.replay_layer(layer, arch, index)
        apply_quantized(layer, layer_tensors(codes, f"{arch.layers_path}.{index}."))

    return replay_layer


def replay_outside(stages: list[StageReplay], codes: Mapping[str, QuantizedWeight], arch) -> Callable[[nn.Module], None]:
    """``f(model)``: the stages' overrides and codes outside the decoder layers."""

    def replay(model: nn.Module) -> None:
        for stage in stages:
            stage.replay_outside_layers(model, arch)
        apply_quantized(model, {k: codes[k] for k in codes if not k.startswith(f"{arch.layers_path}.")})

    return replay


def materialize(artifact: Artifact, quantized: bool = True) -> tuple[nn.Module, object]:
    """The model an artifact describes: the base model with its lineage replayed onto it.

    ``quantized=False`` stops before the last stage's codes: the transformed full-precision
    model a following stage starts from (it computes the base model's function).
    """
    model, tokenizer, _, _ = _rebuild(artifact, quantized)
    return model, tokenizer


def _rebuild(artifact: Artifact, quantized: bool, stream: bool = False) -> tuple[nn.Module, object, Mapping[str, QuantizedWeight], StreamedModel | None]:
    """:func:`materialize`, also returning the codes it put in (empty when ``quantized=False``)
    and, with ``stream``, the streamed model whose skeleton ``model`` is (None when not streamed)."""
    chain = [a for a in artifact.lineage() if a.kind != "calib"]
    stages = [StageReplay.of(a) for a in chain]  # an unknown kind fails before the model loads
    base_dir = base_dir_of(chain[0])
    codes = read_quantized(artifact) if quantized else QuantizedCodes(None)
    if stream and can_stream(base_dir):  # each layer replayed as the driver or evaluation reads it
        from transformers import AutoTokenizer

        streamed = StreamedModel(base_dir)
        streamed.prepare_layer = layer_replayer(stages, codes, streamed.arch)
        streamed.prepare_outside = replay_outside(stages, codes, streamed.arch)
        model, tokenizer = streamed.model, AutoTokenizer.from_pretrained(str(base_dir))
    else:
        streamed = None
        model, tokenizer = load_base(base_dir)
        replay_lineage(model, stages, codes)
    spec = spec_of(artifact)
    if quantized and spec is not None:
        static = codes.act_qparams() if spec.act_static else None  # calibrated per-tensor input scales
        install_spec_hooks(model, sorted(codes), spec, static)
    return model, tokenizer, codes, streamed


def is_packed_dir(path: Path) -> bool:
    """Whether ``path`` is a packed (quantized Hugging Face) checkpoint directory."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("quantization_config"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{config}: not valid JSON") from None


def load_input(source: str | None, device: str = "cpu", quantized: bool = True, stream: bool = False) -> Loaded:
    """Load what the user named: None (the default model), a model directory, GGUF, hub id,
    artifact or packed checkpoint directory; the model is moved to ``device``.

    For an artifact, ``quantized=True`` gives the quantized model it describes and
    ``quantized=False`` the transformed full-precision model the next stage starts from.
    ``stream=True`` gives a base model whose decoder layers stay in its safetensors shards until
    the block-wise driver reads them one at a time (``loaded.stream``), when the checkpoint allows
    and the environment does not say ``QUANTCLI_STREAM=0`` (load the whole model first: the
    pre-streaming path, kept to compare against).
    """
    quiet_hub()
    stream = stream and os.environ.get(STREAM_ENV, "1") != "0"
    if source is not None and is_artifact(source):
        artifact = open_artifact(source)
        if artifact.kind == "calib":
            raise InputError(f"{source}: a calibration artifact is not a model; pass it with --calib")
        model, tokenizer, codes, streamed = _rebuild(artifact, quantized, stream)
        loaded = Loaded(model, tokenizer, base_dir_of(artifact), artifact.manifest.base_model, artifact, spec_of(artifact), codes, streamed)
        if streamed is not None:
            return loaded
    elif source is not None and is_packed_dir(Path(source)):
        if stream and (streamed := stream_packed(Path(source))) is not None:  # dequantized one layer at a time
            from transformers import AutoTokenizer

            model, spec, weights = streamed
            return Loaded(model.model, AutoTokenizer.from_pretrained(source), Path(source), base_ref(Path(source), source), None, spec, weights, model)
        packed = load_packed(Path(source))
        loaded = Loaded(packed.model, packed.tokenizer, Path(source), base_ref(Path(source), source), None, packed.spec, packed.quantized)
    else:
        base_dir, label = resolve_base_dir(source)
        if stream and can_stream(base_dir):
            from transformers import AutoTokenizer

            streamed = StreamedModel(base_dir)
            return Loaded(streamed.model, AutoTokenizer.from_pretrained(str(base_dir)), base_dir, base_ref(base_dir, label), stream=streamed)
        model, tokenizer = load_base(base_dir)
        loaded = Loaded(model, tokenizer, base_dir, base_ref(base_dir, label))
    loaded.model.to(device)
    return loaded
