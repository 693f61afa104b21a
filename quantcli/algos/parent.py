"""Reuse a parent artifact's search results in a later stage (GPTQ's clips, OmniQuant's start).

A *scale parent* is an AWQ or a smooth artifact: per decoder layer it stores ``<group>.scales``
(folded into the weights on replay); an AWQ one also stores ``<linear>.clip`` (clip ratios
``[out, in // g]`` per contiguous group of its spec). One rule, whichever the kind:

* the scale parent is INPUT itself (no ``--init-from``): its scales are already folded into the
  weights the stage starts from, so they are handed on as ones (identity on top) with its clips;
* an explicit ``--init-from`` scale parent of the same base model: its scales are handed on as
  searched (OmniQuant starts LET from them), or as ones when INPUT's lineage already contains it;
  when INPUT carries another scale parent's scales ``--init-from`` is refused (two sets would compound).

An AWQ parent must have been made for the stage's weight spec (bits, group, symmetry): clip ratios
searched for another grid are refused with one line, never silently dropped. Smoothing scales do
not depend on the weight grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from quantcli.algos.awq import AWQ_FILE
from quantcli.algos.replay import layer_tensors
from quantcli.algos.smooth import SMOOTH_FILE
from quantcli.artifact import Artifact, is_artifact, open_artifact
from quantcli.errors import ArtifactError, InputError
from quantcli.models.arch import arch_spec
from quantcli.quant import QuantSpec

Upstream = Callable[[int], dict[str, Tensor]]  # layer index → that layer's tensors, names relative to it

SCALE_FILES = {"awq": AWQ_FILE, "smooth": SMOOTH_FILE}  # scale-parent kind → its search-result file


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


def _wanted(kinds: tuple[str, ...]) -> tuple[str, str]:
    """``("an awq or smooth", "quant awq or quant smooth")`` for error lines."""
    return f"an {' or '.join(kinds)}", " or ".join(f"quant {k}" for k in kinds)


def check_parent(artifact: Artifact, spec: QuantSpec, where: str, kinds: tuple[str, ...] = ("awq",)) -> Artifact:
    """Refuse unless ``artifact`` is a scale parent of one of ``kinds`` (an AWQ one made with ``spec``'s
    weight grid) holding its search results; ``where`` names it in the error."""
    kind_text, producers = _wanted(kinds)
    if artifact.kind not in kinds:
        raise InputError(f"{where}: is a {artifact.kind} artifact, not {kind_text} one; pass the output of {producers}")
    if artifact.kind == "awq" and (diff := spec_mismatch(artifact, spec)) is not None:
        theirs = QuantSpec.from_dict(artifact.manifest.spec) if artifact.manifest.spec else None
        hint = f"use {theirs.label()} or re-run quant awq with this spec" if theirs else "re-run quant awq with this spec"
        raise ArtifactError(f"{where}: made for another quantization spec ({diff}); {hint}")
    if not artifact.has(SCALE_FILES[artifact.kind]):
        raise ArtifactError(f"{where}: holds no {SCALE_FILES[artifact.kind]}; re-run quant {artifact.kind}")
    return artifact


def open_parent(path: str | Path, spec: QuantSpec, kinds: tuple[str, ...] = ("awq",), option: str = "--init-from") -> Artifact:
    """Open an explicitly named scale parent (before the model is loaded), refused unless :func:`check_parent` passes."""
    if not is_artifact(path):
        raise InputError(f"{option} {path}: not a quantcli artifact; pass the output directory of {_wanted(kinds)[1]}")
    return check_parent(open_artifact(path), spec, f"{option} {path}", kinds)


def reuse_parent(
    loaded, spec: QuantSpec, init_from: Artifact | None = None, kinds: tuple[str, ...] = ("awq",)
) -> tuple[Upstream, dict | None]:
    """Per-layer scale-parent tensors for the stage run on ``loaded`` (a ``Loaded``), and their provenance.

    ``init_from``: an artifact from :func:`open_parent`, or None to use INPUT when its kind is in
    ``kinds``. Returns ``(upstream, provenance)``; ``upstream(i)`` holds layer ``i``'s
    ``<group>.scales`` (ones when INPUT already carries them) and, from AWQ, ``<linear>.clip``;
    provenance is ``{"from", "kind", "spec", "scales": "searched" | "folded into INPUT"}``, or None
    (and an empty upstream) when no parent is reused.
    """
    lineage = loaded.artifact.lineage() if loaded.artifact is not None else []
    if init_from is not None:
        if init_from.manifest.base_model.config_sha256 != loaded.base.config_sha256:
            theirs, ours = init_from.manifest.base_model, loaded.base
            raise ArtifactError(
                f"--init-from {init_from.path}: made for another base model ({theirs.ref}, config {theirs.config_sha256[:12]}) "
                f"than INPUT ({ours.ref}, config {ours.config_sha256[:12]}); run quant {init_from.kind} on this model"
            )
        folded = any(a.path.resolve() == init_from.path.resolve() for a in lineage)
        carried = [a for a in lineage if a.kind in SCALE_FILES]
        if carried and not folded:
            raise InputError(
                f"--init-from {init_from.path}: INPUT already carries the {carried[-1].kind.upper()} scales of {carried[-1].path}; "
                "pass that artifact or omit --init-from"
            )
        source = init_from
    elif loaded.artifact is not None and loaded.artifact.kind in kinds:
        source, folded = check_parent(loaded.artifact, spec, str(loaded.artifact.path), kinds), True
    else:
        return no_upstream, None
    tensors = {k: v for k, v in source.tensors(SCALE_FILES[source.kind]).items() if k.endswith((".clip", ".scales"))}
    if folded:  # already folded into INPUT's weights: identity on top
        tensors = {k: torch.ones_like(v) if k.endswith(".scales") else v for k, v in tensors.items()}
    upstream = layer_view(tensors, arch_spec(loaded.model).layers_path)
    provenance = {
        "from": str(source.path.resolve()),
        "kind": source.kind,
        "spec": QuantSpec.from_dict(source.manifest.spec).label() if source.manifest.spec else None,
        "scales": "folded into INPUT" if folded else "searched",
    }
    return upstream, provenance
