"""Resumable stages: each finished layer is written at once, and a killed run continues.

The partial state of a stage writing ``out/`` lives in the hidden sibling ``.out.partial/``
(never something that opens as an artifact: it has no manifest):

* ``fingerprint.json``: what the run depends on (model config hash, calibration token digest,
  spec, parameters, parent, quantcli version). A run with another fingerprint starts over and
  says which parts differ in one line.
* ``layer-00003/<payload>.safetensors``: layer 3's tensors under full module names;
  ``layer-00003.json``: its metrics, written last (the layer is finished once it exists).
* ``acts-00004.safetensors``: the activation streams layer 4 receives (exactly the tensors the
  driver would hand it, so a resumed run is bit-identical); older ones are deleted.

When every layer is finished the payloads are concatenated tensor by tensor into the artifact
(the manifest written last, atomically) and the partial state is removed.

Test hook: with ``QUANTCLI_TEST_KILL_AFTER_LAYER=k`` the process SIGKILLs itself right after
layer ``k`` is saved (used by ``tests/test_resume.py`` to simulate a crash).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from quantcli import __version__
from quantcli.algos.driver import Boundary, LayerResult
from quantcli.artifact import Artifact, Manifest, write_artifact
from quantcli.errors import QuantCliError
from quantcli.models.weights import OVERRIDES_FILE, QUANTIZED_FILE, quantized_payload

KILL_ENV = "QUANTCLI_TEST_KILL_AFTER_LAYER"


class Interrupted(QuantCliError):
    """The user stopped a stage (Ctrl-C); its finished layers are kept."""

    exit_code = 130


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")


class PartialRun:
    """The on-disk state of one stage run; :meth:`save` is the driver's per-layer sink."""

    def __init__(
        self, out: Path, parts: dict, layers_path: str, bits: int = 8, note: Callable[[str], None] = _stderr, rank: int | None = None
    ):
        """``rank``: under torch.distributed each rank keeps its own partial state (its activation shard)."""
        self.out, self.bits = Path(out), bits
        self.dir = self.out.parent / (f".{self.out.name}.partial" + ("" if rank is None else f"-rank{rank}"))
        self.layers_path = layers_path
        parts = json.loads(json.dumps({**parts, "quantcli": __version__}, sort_keys=True, default=str))
        stamp = self.dir / "fingerprint.json"
        if stamp.is_file():
            old = json.loads(stamp.read_text())
            if old != parts:
                changed = sorted(k for k in parts.keys() | old.keys() if old.get(k) != parts.get(k))
                note(f"quant: starting over: the unfinished run in {self.dir} had different {', '.join(changed)}")
                shutil.rmtree(self.dir)
        self.parts = parts
        self.layers = self._finished() if self.dir.is_dir() else []

    def _create(self) -> None:
        """The partial directory with its fingerprint, made when the first layer is saved."""
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.dir.with_name(self.dir.name + ".new")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "fingerprint.json").write_text(json.dumps(self.parts, indent=1, sort_keys=True))
        tmp.rename(self.dir)

    def _finished(self) -> list[dict]:
        """Metrics of the finished layers 0 … k-1 (contiguous)."""
        done = []
        while (marker := self.dir / f"layer-{len(done):05d}.json").is_file():
            done.append(json.loads(marker.read_text()))
        return done

    def boundary(self, data_free: bool) -> Boundary | None:
        """Where to resume (None: from the start)."""
        if not self.layers:
            return None
        index = len(self.layers)
        if data_free:
            return Boundary(index)
        acts = load_file(str(self.dir / f"acts-{index:05d}.safetensors"))
        return Boundary(index, acts["inputs"], acts.get("fp_inputs"))

    def save(self, index: int, result: LayerResult, boundary: Boundary) -> None:
        """Write layer ``index``'s tensors and the streams the next layer needs; then mark it finished."""
        prefix = f"{self.layers_path}.{index}."
        payloads = {
            QUANTIZED_FILE: {
                **quantized_payload({prefix + k: v for k, v in result.quantized.items()}, self.bits),
                **{prefix + k: v for k, v in result.act_qparams.items()},  # static activation scales beside the codes
            },
            "saved.safetensors": {prefix + k: v for k, v in result.saved.items()},
            OVERRIDES_FILE: {prefix + k: v for k, v in result.overrides.items()},
        }
        if not self.dir.is_dir():
            self._create()
        layer_dir = self.dir / f"layer-{index:05d}"
        layer_dir.mkdir(exist_ok=True)
        for name, tensors in payloads.items():
            if tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(layer_dir / name))
        if boundary.inputs is not None:
            streams = {"inputs": boundary.inputs}
            if boundary.fp_inputs is not None:
                streams["fp_inputs"] = boundary.fp_inputs
            save_file({k: v.contiguous() for k, v in streams.items()}, str(self.dir / f"acts-{index + 1:05d}.safetensors"))
        marker = self.dir / f"layer-{index:05d}.json"
        marker.with_suffix(".tmp").write_text(json.dumps(result.metrics))
        marker.with_suffix(".tmp").rename(marker)
        (self.dir / f"acts-{index:05d}.safetensors").unlink(missing_ok=True)
        self.layers.append(result.metrics)
        if os.environ.get(KILL_ENV) == str(index):
            os.kill(os.getpid(), signal.SIGKILL)

    def interrupted(self, total: int) -> Interrupted:
        return Interrupted(
            f"interrupted after {len(self.layers)} of {total} layers; they are kept in {self.dir}: "
            f"run the same command again to resume"
        )

    def discard(self) -> None:
        """Remove the partial state without writing an artifact (ranks other than 0 when done)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def assemble(self, manifest: Manifest, kind: str, force: bool) -> Artifact:
        """Write the artifact from the finished layers (manifest last) and remove the partial state."""
        if not self.dir.is_dir():  # a model without layers: nothing was saved
            self._create()
        layer_dirs = sorted(self.dir.glob("layer-*/"))
        payloads: dict[str, Path] = {}
        for name, target in ((QUANTIZED_FILE, QUANTIZED_FILE), ("saved.safetensors", f"{kind}.safetensors"), (OVERRIDES_FILE, OVERRIDES_FILE)):
            parts = [d / name for d in layer_dirs if (d / name).is_file()]
            if parts or name == QUANTIZED_FILE:
                payloads[target] = concat_safetensors(parts, self.dir / f"all-{target}")
        artifact = write_artifact(self.out, manifest, payloads, force=force)
        shutil.rmtree(self.dir)
        return artifact


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def concat_safetensors(parts: list[Path], out: Path) -> Path:
    """One safetensors file holding every tensor of ``parts`` (distinct names), copied tensor by
    tensor so memory stays at one tensor; tensors ordered by item size then name, as
    ``safetensors`` itself does, so every tensor stays aligned."""
    entries = []
    for part in parts:
        start, header = _header(part)
        entries += [(name, info, part, start) for name, info in header.items()]
    entries.sort(key=lambda e: (-_ITEMSIZE.get(e[1]["dtype"], 1), e[0]))
    header, offset = {}, 0
    for name, info, _, _ in entries:
        size = info["data_offsets"][1] - info["data_offsets"][0]
        header[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(out, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for _, info, part, start in entries:
            with open(part, "rb") as src:
                src.seek(start + info["data_offsets"][0])
                fh.write(src.read(info["data_offsets"][1] - info["data_offsets"][0]))
    return out
