"""Self-describing artifact directories: ``manifest.json`` plus safetensors payloads.

Every stage writes one. The manifest says what the directory holds (``kind``), who wrote it,
which base model it belongs to (with a hash of that model's config), which artifact it was made
from (``parent``), the quantization spec, the parameters, the metrics and a sha256 of every file.

Writes are atomic: everything is written into a hidden temporary sibling directory, the manifest
last, and the directory is then renamed into place. A crash leaves at most a ``.name.tmp-*``
directory, never something that opens as a valid artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from quantcli import __version__
from quantcli.errors import ArtifactError, InputError

SCHEMA_VERSION = 2  # 2: codes under 8 bits packed into int32 words (schema 1 still read)
MANIFEST = "manifest.json"
KINDS = ("calib", "rtn", "awq", "gptq", "omniquant", "smooth")


@dataclass
class BaseModelRef:
    """The full-precision model an artifact belongs to."""

    ref: str  # a local directory (absolute) or a hub id
    config_sha256: str  # hash of that model's config.json
    architecture: str
    source: str = ""  # what the user gave (a GGUF file, a hub id, ...), for humans

    @classmethod
    def from_dict(cls, data: dict) -> "BaseModelRef":
        return cls(**data)


@dataclass
class Manifest:
    kind: str
    base_model: BaseModelRef
    parent: str | None = None  # path of the parent artifact, relative to this artifact's directory
    spec: dict | None = None
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    schema: int = SCHEMA_VERSION
    created_by: str = f"quantcli {__version__}"
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unreadable(file: Path, exc: Exception) -> ArtifactError:
    """The one-line error for a payload file safetensors cannot read."""
    return ArtifactError(f"{file}: not a readable safetensors file ({exc})")


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass
class Artifact:
    """An opened artifact directory."""

    path: Path
    manifest: Manifest

    @property
    def kind(self) -> str:
        return self.manifest.kind

    def checked_file(self, name: str) -> Path:
        """The path of payload file ``name``, checked to exist and to match its recorded sha256."""
        file = self.path / name
        if name not in self.manifest.files or not file.is_file():
            raise ArtifactError(f"{self.path}: payload {name} is missing; re-run the stage that wrote it")
        if sha256_file(file) != self.manifest.files[name]:
            raise ArtifactError(f"{file}: contents do not match the manifest's sha256; the artifact is corrupt, re-create it")
        return file

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Load one payload file (checked against its recorded sha256)."""
        file = self.checked_file(name)
        try:
            return load_file(str(file))
        except SafetensorError as exc:
            raise unreadable(file, exc) from None

    def has(self, name: str) -> bool:
        return name in self.manifest.files

    def parent(self) -> "Artifact | None":
        """The artifact this one was made from, checked to belong to the same base model."""
        if self.manifest.parent is None:
            return None
        parent_path = (self.path / self.manifest.parent).resolve()
        if not is_artifact(parent_path):
            raise ArtifactError(
                f"{self.path}: its parent artifact {parent_path} is missing; keep parent artifacts beside their children"
            )
        parent = open_artifact(parent_path)
        if parent.manifest.base_model.config_sha256 != self.manifest.base_model.config_sha256:
            raise ArtifactError(f"{self.path}: its parent {parent_path} was made from a different base model")
        return parent

    def lineage(self) -> list["Artifact"]:
        """This artifact and its ancestors, the root first."""
        chain: list[Artifact] = [self]
        while (parent := chain[-1].parent()) is not None:
            chain.append(parent)
        return chain[::-1]


def open_artifact(path: str | Path) -> Artifact:
    """Open and validate an artifact directory's manifest (payloads are read lazily)."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if not manifest_file.is_file():
        raise ArtifactError(f"{path}: not a quantcli artifact (no {MANIFEST})")
    try:
        data = json.loads(manifest_file.read_text())
        schema = int(data["schema"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_file}: corrupt manifest ({exc.__class__.__name__}); re-create the artifact") from None
    if schema > SCHEMA_VERSION:
        raise ArtifactError(
            f"{manifest_file}: schema {schema} is newer than this quantcli understands ({SCHEMA_VERSION}); upgrade quantcli"
        )
    if schema < 1:
        raise ArtifactError(f"{manifest_file}: unknown schema {schema}; re-create the artifact")
    try:
        data["base_model"] = BaseModelRef.from_dict(data["base_model"])
        manifest = Manifest(**data)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{manifest_file}: corrupt manifest ({exc}); re-create the artifact") from None
    if manifest.kind not in KINDS:
        raise ArtifactError(f"{manifest_file}: unknown artifact kind {manifest.kind!r}")
    return Artifact(path=path, manifest=manifest)


def check_output_free(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless forced (checked before any work starts)."""
    if out.exists() and not force:
        raise InputError(f"{out}: output already exists; choose another -o or pass --force")


def write_artifact(
    out: str | Path,
    manifest: Manifest,
    payloads: dict[str, dict[str, torch.Tensor] | Path],
    force: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Artifact:
    """Atomically create artifact directory ``out`` with ``payloads`` (file name → tensors, or the
    path of a safetensors file to move in).

    ``manifest.parent`` may be given as any path; it is stored relative to ``out``.
    ``extra_files`` (name → text) are written beside the payloads and hashed like them.
    """
    out = Path(out)
    check_output_free(out, force)
    with atomic_directory(out) as tmp:
        files: dict[str, str] = {}
        for name, tensors in payloads.items():
            if isinstance(tensors, Path):  # a safetensors file written already (per-layer stages)
                os.replace(tensors, tmp / name)
            else:
                save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / name))
            files[name] = sha256_file(tmp / name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
            files[name] = sha256_file(tmp / name)
        manifest.files = files
        if manifest.parent is not None:
            manifest.parent = os.path.relpath(Path(manifest.parent).resolve(), out.resolve())
        (tmp / MANIFEST).write_text(manifest.to_json())
    return open_artifact(out)


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Build directory ``out`` in a hidden temporary sibling, renamed into place on success.

    On any failure the temporary directory is removed and ``out`` is left as it was; an existing
    ``out`` is replaced only after the new one is complete (callers check ``--force`` first).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            shutil.rmtree(trash)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
