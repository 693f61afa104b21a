"""The shared shape of every algorithm command: resolve INPUT, spec and output, load, calibrate,
run with a progress bar, summarise (fallbacks included), emit the artifact path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from quantcli.artifact import Artifact, check_output_free, is_artifact, open_artifact
from quantcli.cli._console import LayerProgress, emit, err, layer_table, show_fallbacks, status
from quantcli.cli._options import CalibArgs, RunArgs, WeightArgs, default_output, input_or_stdin
from quantcli.loading import Loaded, load_input, spec_of
from quantcli.quant import QuantSpec
from quantcli.stage import StageParams, choose_calibration, run_stage


@dataclass(frozen=True)
class StagePlan:
    """What a stage command resolved before loading anything.

    ``parent``: the artifact the stage inherits from (``--init-from``, else an artifact INPUT),
    whose spec fills the weight flags not given and whose calibration is used when no
    calibration flag is given.
    """

    command: str
    source: str | None
    parent: Artifact | None
    spec: QuantSpec
    output: Path


def plan_stage(command: str, input: str | None, weights: WeightArgs, run: RunArgs, init_from: Path | None = None) -> StagePlan:
    """Resolve INPUT (argument or pipe), the parent artifact, the spec and the output; refuse an existing output."""
    source = input_or_stdin(input)
    parent = None
    if init_from is not None and is_artifact(init_from):
        parent = open_artifact(init_from)
    elif source is not None and is_artifact(source):
        parent = open_artifact(source)
    spec = weights.spec(spec_of(parent))
    output = run.output or default_output(source, command)
    check_output_free(output, run.force)
    return StagePlan(command, source, parent, spec, output)


def run_algorithm(
    title: str,
    plan: StagePlan,
    build: Callable[[Loaded], StageParams],
    calibration: CalibArgs,
    run: RunArgs,
    needs_data: bool = True,
    default_batch: int | None = None,
) -> Artifact:
    """Load the fp model the stage starts from, build its :class:`StageParams`, calibrate (unless
    data-free), run the driver under a progress bar, print the summary and emit the artifact path.

    ``needs_data=False`` (RTN): calibrate only when a calibration flag is given.
    """
    with status("loading model", run.quiet):
        loaded = load_input(plan.source, quantized=False, stream=True)
    stage = build(loaded)
    parent = plan.parent if needs_data else None
    with status("preparing calibration data", run.quiet):
        calib = choose_calibration(
            loaded, calibration.calib, calibration.params() if calibration.given and calibration.calib is None else None,
            parent, required=needs_data,
        )
    if not run.quiet and calib is not None and "inherited_from" in calib.info:
        err.print(f"{title}: calibrating on the tokens of {plan.parent.path} ({calib.ids.shape[0]} × {calib.ids.shape[1]})")
    with LayerProgress(f"{title} {stage.spec.label()}", run.quiet) as bar:
        artifact = run_stage(stage, loaded, plan.output, calib, run.params(default_batch), on_layer=bar.on_layer, on_update=bar.on_update)
    layers = artifact.manifest.metrics["layers"]
    if not run.quiet:
        layer_table(f"{title} per-layer summary", layers)
    show_fallbacks(title, layers, run.quiet)
    if not run.quiet:
        err.print(f"{title}: {artifact.manifest.metrics['seconds']:.1f}s → {artifact.path}")
    emit(str(artifact.path))
    return artifact
