"""Run one quantization stage end to end: calibration, the block-wise driver, the artifact.

This is the single core function behind ``rtn``, ``awq``, ``gptq`` and ``omniquant``; the CLI
commands only parse flags into params and call it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from quantcli.algos.driver import LayerAlgo, LayerEvent, resolve_device, run_blockwise
from quantcli.artifact import Artifact, Manifest, check_output_free, is_artifact, open_artifact, write_artifact
from quantcli.calib.data import BUILTIN, calibration_blocks, load_texts
from quantcli.errors import ArtifactError, InputError
from quantcli.loading import Loaded
from quantcli.models.weights import OVERRIDES_FILE, QUANTIZED_FILE, quantized_payload
from quantcli.quant import QuantSpec

CALIB_FILE = "calib.safetensors"


@dataclass(frozen=True)
class CalibParams:
    """Where calibration tokens come from when no ``--calib`` artifact is given."""

    dataset: str = BUILTIN
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0


def make_calibration(tokenizer, params: CalibParams) -> tuple[torch.Tensor, dict]:
    """Seeded calibration blocks ``[N, L]`` and a record of where they came from."""
    texts = load_texts(params.dataset, "train")
    ids = calibration_blocks(tokenizer, texts, params.nsamples, params.seqlen, params.seed)
    return ids, {**asdict(params), "source": texts.source}


def write_calibration(loaded: Loaded, params: CalibParams, out: Path, force: bool) -> Artifact:
    check_output_free(out, force)
    ids, provenance = make_calibration(loaded.tokenizer, params)
    manifest = Manifest(kind="calib", base_model=loaded.base, params=provenance)
    return write_artifact(out, manifest, {CALIB_FILE: {"input_ids": ids}}, force=force)


def read_calibration(path: str | Path, loaded: Loaded) -> tuple[torch.Tensor, dict]:
    """Token blocks of a calib artifact, refused when it was made for another base model."""
    if not is_artifact(path):
        raise InputError(f"--calib {path}: not a calibration artifact (make one with quant calibrate)")
    artifact = open_artifact(path)
    if artifact.kind != "calib":
        raise InputError(f"--calib {path}: is a {artifact.kind} artifact, not a calibration artifact")
    if artifact.manifest.base_model.config_sha256 != loaded.base.config_sha256:
        raise ArtifactError(
            f"--calib {path}: was made for model {artifact.manifest.base_model.ref}, not {loaded.base.ref}; calibrate this model"
        )
    ids = artifact.tensors(CALIB_FILE)["input_ids"]
    return ids, {**artifact.manifest.params, "artifact": str(Path(path).resolve())}


def calibration_for(loaded: Loaded, calib: str | None, params: CalibParams) -> tuple[torch.Tensor, dict]:
    return read_calibration(calib, loaded) if calib else make_calibration(loaded.tokenizer, params)


def run_stage(
    kind: str,
    algo: LayerAlgo,
    params: dict,
    loaded: Loaded,
    spec: QuantSpec,
    out: Path,
    calib_ids: torch.Tensor | None,
    calib_info: dict | None,
    device: str = "auto",
    batch: int = 8,
    force: bool = False,
    upstream: Callable[[int], dict[str, torch.Tensor]] = lambda _i: {},
    on_layer: Callable[[LayerEvent], None] = lambda _e: None,
    on_update: Callable[..., None] = lambda **_: None,
) -> Artifact:
    """Quantize ``loaded.model`` with ``algo`` layer by layer and write artifact ``out``."""
    check_output_free(out, force)
    result = run_blockwise(
        loaded.model, calib_ids, algo, spec, resolve_device(device), batch, upstream, on_layer, on_update
    )
    losses = [m["loss"] for m in result.layers if m.get("loss") is not None]
    manifest = Manifest(
        kind=kind,
        base_model=loaded.base,
        parent=str(loaded.artifact.path) if loaded.artifact is not None else None,
        spec=spec.to_dict(),
        params={**params, "calibration": calib_info},
        metrics={
            "seconds": round(result.seconds, 2),
            "mean_layer_loss": sum(losses) / len(losses) if losses else None,
            "layers": result.layers,
        },
    )
    payloads = {QUANTIZED_FILE: quantized_payload(result.quantized)}
    if result.saved:
        payloads[f"{kind}.safetensors"] = result.saved
    if result.overrides:
        payloads[OVERRIDES_FILE] = result.overrides
    return write_artifact(out, manifest, payloads, force=force)

