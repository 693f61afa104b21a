"""Run one quantization stage end to end: calibration, the block-wise driver, the artifact.

:func:`run_stage` is the single core function behind ``rtn``, ``awq``, ``gptq`` and ``omniquant``;
the CLI commands only parse flags into params objects (:class:`StageParams`, :class:`RunParams`,
:class:`CalibParams`) and call it. :func:`choose_calibration` decides which tokens a stage
calibrates on, including a parent artifact's own calibration.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch

from quantcli import dist
from quantcli.algos.driver import ActivationStore, LayerAlgo, LayerEvent, resolve_device, run_blockwise
from quantcli.algos.parent import Upstream, no_upstream
from quantcli.artifact import Artifact, Manifest, check_output_free, is_artifact, open_artifact, write_artifact
from quantcli.calib.data import BUILTIN, bos_token, calibration_blocks, load_texts
from quantcli.errors import ArtifactError, InputError
from quantcli.loading import Loaded
from quantcli.models.arch import arch_spec, decoder_layers
from quantcli.resume import PartialRun
from quantcli.quant import QuantSpec

CALIB_FILE = "calib.safetensors"
DEFAULT_SEQLEN = 2048  # GPTQ and OmniQuant calibrate on 128 × 2048 tokens; eval-ppl scores 2048-token windows


def context_window(model) -> int | None:
    """The model's context length (``max_position_embeddings``), or None when it declares none."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def default_seqlen(model) -> int:
    """:data:`DEFAULT_SEQLEN`, capped at the model's context window.

    2048 is the GPTQ and OmniQuant papers' calibration block (128 × 2048 tokens) and the window
    ``eval-ppl`` scores, so calibration sees the positions evaluation does. (AWQ's paper used
    128 × 512; its search is cheaper with ``--seqlen 512`` and loses little.) A block longer than
    the model's context would put tokens at positions it never saw (or past its position table).
    """
    context = context_window(model)
    return min(DEFAULT_SEQLEN, context) if context else DEFAULT_SEQLEN


@dataclass(frozen=True)
class CalibParams:
    """Where calibration tokens come from when no ``--calib`` artifact is given.

    ``seqlen=None``: :func:`default_seqlen` of the model being calibrated.
    """

    dataset: str = BUILTIN
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    bos: str = "auto"  # auto | always | never: a BOS token at position 0 of every block (calib.data.bos_token)

    def for_model(self, model) -> "CalibParams":
        return self if self.seqlen is not None else replace(self, seqlen=default_seqlen(model))


@dataclass(frozen=True)
class Calibration:
    """Token blocks ``ids: [N, L]`` and the record of where they came from (``info``, in the manifest)."""

    ids: torch.Tensor
    info: dict


@dataclass(frozen=True)
class RunParams:
    """How a stage runs: the device, calibration samples per forward pass, whether to replace the
    output, and where the calibration activations live (None: in memory). None of it changes the result."""

    device: str = "auto"
    batch: int = 8
    force: bool = False
    offload: Path | None = None  # --offload-activations: the calibration streams memory-mapped in this directory


@dataclass(frozen=True)
class StageParams:
    """One stage: the artifact kind, the per-layer algorithm, the spec, the algorithm's parameters as
    recorded in the manifest, and the parent's per-layer tensors (``upstream(i)``, names relative to layer i)."""

    kind: str
    algo: LayerAlgo
    spec: QuantSpec
    recorded: dict = field(default_factory=dict)
    upstream: Upstream = no_upstream


def ids_digest(ids: torch.Tensor) -> str:
    """sha256 of token blocks ``[N, L]`` (int64, row-major): the identity of a calibration set."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def make_calibration(loaded: Loaded, params: CalibParams) -> Calibration:
    """Seeded calibration blocks ``[N, L]`` for ``loaded``'s tokenizer and a record of where they came from.

    The record holds the params (``bos`` as asked) and ``bos_token_id``, what it resolved to for
    this tokenizer (None: no BOS in the blocks).
    """
    params = params.for_model(loaded.model)
    bos = bos_token(loaded.tokenizer, params.bos)
    texts = load_texts(params.dataset, "train")
    ids = calibration_blocks(loaded.tokenizer, texts, params.nsamples, params.seqlen, params.seed, bos)
    return Calibration(ids, {**asdict(params), "bos_token_id": bos, "source": texts.source, "ids_sha256": ids_digest(ids)})


def write_calibration(loaded: Loaded, params: CalibParams, out: Path, force: bool) -> Artifact:
    check_output_free(out, force)
    calibration = make_calibration(loaded, params)
    manifest = Manifest(kind="calib", base_model=loaded.base, params=calibration.info)
    return dist.on_main(lambda: write_artifact(out, manifest, {CALIB_FILE: {"input_ids": calibration.ids}}, force=force), lambda: Artifact(out, manifest))


def read_calibration(path: str | Path, loaded: Loaded) -> Calibration:
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
    return Calibration(ids, {**artifact.manifest.params, "artifact": str(Path(path).resolve()), "ids_sha256": ids_digest(ids)})


def inherited_calibration(loaded: Loaded, parent: Artifact) -> Calibration | None:
    """The calibration tokens ``parent`` was made with, or None when it used none (data-free RTN).

    From its calib artifact when it used one, else regenerated from its recorded dataset,
    nsamples, seqlen and seed and checked against its recorded digest of the tokens.
    """
    info = (parent.manifest.params or {}).get("calibration")
    if not info:
        return None
    if info.get("artifact"):
        if not is_artifact(info["artifact"]):
            raise ArtifactError(
                f"{parent.path}: its calibration artifact {info['artifact']} is gone; pass --calib or calibration flags"
            )
        calibration = read_calibration(info["artifact"], loaded)
    else:
        calibration = make_calibration(loaded, CalibParams(**{f.name: info[f.name] for f in fields(CalibParams) if f.name in info}))
    recorded = info.get("ids_sha256")
    if recorded is not None and calibration.info["ids_sha256"] != recorded:
        raise ArtifactError(
            f"{parent.path}: its calibration tokens no longer come out the same (dataset {info.get('dataset')!r} changed?); "
            "pass --calib or calibration flags"
        )
    return Calibration(calibration.ids, {**calibration.info, "inherited_from": str(parent.path.resolve())})


def choose_calibration(
    loaded: Loaded, calib: str | Path | None, params: CalibParams | None, parent: Artifact | None, required: bool
) -> Calibration | None:
    """The calibration a stage runs on, first that applies: the ``--calib`` artifact, the calibration
    flags (``params``), the parent artifact's calibration, :class:`CalibParams`' defaults when the
    algorithm ``required`` data, else None (data-free)."""
    if calib is not None:
        return read_calibration(calib, loaded)
    if params is not None:
        return make_calibration(loaded, params)
    if parent is not None and (inherited := inherited_calibration(loaded, parent)) is not None:
        return inherited
    return make_calibration(loaded, CalibParams()) if required else None


def forward_multiple(layers: list[dict]) -> float | None:
    """The stage's cost in plain forwards: its layers' wall seconds over the seconds of their
    propagation forward (one forward of the calibration set through the quantized layer, measured
    in the same run, so a busy machine inflates both alike). None for data-free stages."""
    forward = sum(m.get("forward_seconds") or 0.0 for m in layers)
    return round(sum(m["seconds"] for m in layers) / forward, 2) if forward > 0 else None


def activation_store(directory: Path | None) -> ActivationStore | None:
    """The disk-backed store of ``--offload-activations directory`` (None: keep activations in memory);
    a one-line InputError when the directory cannot be created or written."""
    if directory is None:
        return None
    try:
        store = ActivationStore(Path(directory))
    except OSError as exc:
        raise InputError(f"--offload-activations {directory}: cannot use it as a directory ({exc.strerror or exc}); give a writable directory") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputError(f"--offload-activations {directory}: the directory is not writable; give a writable directory")
    return store


def run_stage(
    stage: StageParams,
    loaded: Loaded,
    out: Path,
    calibration: Calibration | None,
    run: RunParams = RunParams(),
    on_layer: Callable[[LayerEvent], None] = lambda _e: None,
    on_update: Callable[..., None] = lambda **_: None,
    acts: ActivationStore | None = None,
) -> Artifact:
    """Quantize ``loaded.model`` with ``stage.algo`` layer by layer and write artifact ``out``.

    Each finished layer is written at once beside ``out``; a run killed mid-way and started
    again with the same inputs and parameters continues from its last finished layer.
    """
    check_output_free(out, run.force)
    acts = acts or activation_store(run.offload)
    ids = calibration.ids if calibration is not None else None
    parts = {
        "kind": stage.kind, "params": stage.recorded, "spec": stage.spec.to_dict(), "model_config": loaded.base.config_sha256,
        "parent": str(loaded.artifact.path.resolve()) if loaded.artifact is not None else None,
        "calibration_tokens": ids_digest(ids) if ids is not None else None,
    }
    layers_path = arch_spec(loaded.model).layers_path
    world = dist.world()
    if world.size > 1:
        parts["world_size"] = world.size
    partial = PartialRun(out, parts, layers_path, stage.spec.wbits, rank=world.rank if world.size > 1 else None)
    try:
        result = run_blockwise(
            loaded.stream or loaded.model, ids, stage.algo, stage.spec, resolve_device(run.device), run.batch,
            stage.upstream, on_layer, on_update, acts=acts, resume=partial.boundary(ids is None), sink=partial.save,
        )
    except KeyboardInterrupt:
        raise partial.interrupted(len(decoder_layers(loaded.model, arch_spec(loaded.model)))) from None
    losses = [m["loss"] for m in partial.layers if m.get("loss") is not None]
    manifest = Manifest(
        kind=stage.kind,
        base_model=loaded.base,
        parent=str(loaded.artifact.path) if loaded.artifact is not None else None,
        spec=stage.spec.to_dict(),
        params={**stage.recorded, "calibration": calibration.info if calibration is not None else None},
        metrics={
            "seconds": round(sum(m["seconds"] for m in partial.layers) + result.seconds - sum(m["seconds"] for m in result.layers), 2),
            "world_size": dist.world().size,
            "mean_layer_loss": sum(losses) / len(losses) if losses else None,
            "forward_multiple": forward_multiple(partial.layers),
            "layers": partial.layers,
        },
    )
    return dist.on_main(lambda: partial.assemble(manifest, stage.kind, run.force), lambda: (partial.discard(), Artifact(out, manifest))[1])

