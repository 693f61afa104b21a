"""Reuse a parent AWQ artifact's search results in a later stage (GPTQ's clips, OmniQuant's start).

An AWQ artifact stores, per decoder layer, ``<group>.scales`` (folded into the weights on replay)
and ``<linear>.clip`` (clip ratios ``[out, in // g]`` per contiguous group of its spec). A stage
may take them from

* its INPUT, when INPUT is an AWQ artifact: the scales are already folded into the weights the
  stage starts from, so they are handed on as ones (identity on top) and only the clips matter;
* an explicit ``--init-from`` AWQ artifact of the same base model: its scales are handed on as
  searched (OmniQuant starts LET from them), unless INPUT already carries AWQ scales, in which
  case ``--init-from`` must be that same artifact.

Either way the AWQ artifact must have been made for the same weight spec (bits, group, symmetry):
clip ratios searched for another grid are refused with one line, never silently dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from quantcli.algos.awq import AWQ_FILE
from quantcli.algos.replay import layer_tensors
from quantcli.artifact import Artifact, is_artifact, open_artifact
from quantcli.errors import ArtifactError, InputError
from quantcli.models.arch import arch_spec
from quantcli.quant import QuantSpec

Upstream = Callable[[int], dict[str, Tensor]]  # layer index → that layer's tensors, names relative to it


def no_upstream(_index: int) -> dict[str, Tensor]:
    return {}


def layer_view(tensors: dict[str, Tensor], layers_path: str) -> Upstream:
    """Per-layer view of a payload: ``view(3)`` holds ``<layers_path>.3.*`` with the prefix cut."""
    return lambda index: layer_tensors(tensors, f"{layers_path}.{index}.")


def spec_mismatch(artifact: Artifact, spec: QuantSpec) -> str | None:
    """What differs between an artifact's weight spec and ``spec`` (None when bits/group/sym agree)."""
    if artifact.manifest.spec is None:
        return "it records no quantization spec"
    theirs = QuantSpec.from_dict(artifact.manifest.spec)
    diffs = [f"{k} {getattr(theirs, k)} vs {getattr(spec, k)}" for k in ("wbits", "group", "sym") if getattr(theirs, k) != getattr(spec, k)]
    return ", ".join(diffs) or None


def check_awq(artifact: Artifact, spec: QuantSpec, where: str) -> Artifact:
    """Refuse unless ``artifact`` is an AWQ artifact made with ``spec``'s weight grid; ``where`` names it in the error."""
    if artifact.kind != "awq":
        raise InputError(f"{where}: is a {artifact.kind} artifact, not an awq one; pass the output of quant awq")
    if (diff := spec_mismatch(artifact, spec)) is not None:
        theirs = QuantSpec.from_dict(artifact.manifest.spec) if artifact.manifest.spec else None
        hint = f"use {theirs.label()} or re-run quant awq with this spec" if theirs else "re-run quant awq with this spec"
        raise ArtifactError(f"{where}: made for another quantization spec ({diff}); {hint}")
    if not artifact.has(AWQ_FILE):
        raise ArtifactError(f"{where}: holds no {AWQ_FILE}; re-run quant awq")
    return artifact


def open_awq(path: str | Path, spec: QuantSpec, option: str = "--init-from") -> Artifact:
    """Open an explicitly named AWQ artifact (before the model is loaded), refused unless :func:`check_awq` passes."""
    if not is_artifact(path):
        raise InputError(f"{option} {path}: not a quantcli artifact; pass the output directory of quant awq")
    return check_awq(open_artifact(path), spec, f"{option} {path}")


def _awq_in_lineage(artifact: Artifact | None) -> Artifact | None:
    found = [a for a in artifact.lineage() if a.kind == "awq"] if artifact is not None else []
    return found[-1] if found else None


def reuse_awq(loaded, spec: QuantSpec, init_from: Artifact | None = None) -> tuple[Upstream, dict | None]:
    """Per-layer AWQ tensors for the stage run on ``loaded`` (a ``Loaded``), and their provenance.

    ``init_from``: an artifact from :func:`open_awq`, or None to use INPUT when it is an AWQ
    artifact. Returns ``(upstream, provenance)``; ``upstream(i)`` holds layer ``i``'s
    ``<group>.scales`` (ones when INPUT already carries them) and ``<linear>.clip``; provenance is
    ``{"from", "spec", "scales": "searched" | "folded into INPUT"}``, or None (and an empty
    upstream) when no AWQ artifact is reused.
    """
    carried = _awq_in_lineage(loaded.artifact)
    if init_from is not None:
        if init_from.manifest.base_model.config_sha256 != loaded.base.config_sha256:
            theirs, ours = init_from.manifest.base_model, loaded.base
            raise ArtifactError(
                f"--init-from {init_from.path}: made for another base model ({theirs.ref}, config {theirs.config_sha256[:12]}) "
                f"than INPUT ({ours.ref}, config {ours.config_sha256[:12]}); run quant awq on this model"
            )
        if carried is not None and carried.path.resolve() != init_from.path.resolve():
            raise InputError(
                f"--init-from {init_from.path}: INPUT already carries the AWQ scales of {carried.path}; pass that artifact or omit --init-from"
            )
        source = init_from
    elif loaded.artifact is not None and loaded.artifact.kind == "awq":
        source = check_awq(loaded.artifact, spec, str(loaded.artifact.path))
    else:
        return no_upstream, None
    tensors = {k: v for k, v in source.tensors(AWQ_FILE).items() if k.endswith((".clip", ".scales"))}
    folded = carried is not None
    if folded:  # already folded into INPUT's weights: identity on top
        tensors = {k: torch.ones_like(v) if k.endswith(".scales") else v for k, v in tensors.items()}
    upstream = layer_view(tensors, arch_spec(loaded.model).layers_path)
    provenance = {
        "from": str(source.path.resolve()),
        "spec": QuantSpec.from_dict(source.manifest.spec).label(),
        "scales": "folded into INPUT" if folded else "searched",
    }
    return upstream, provenance
