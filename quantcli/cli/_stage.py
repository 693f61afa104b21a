"""The shared shape of every algorithm command: load, calibrate, run with a progress bar, emit."""

from __future__ import annotations

from pathlib import Path

from quantcli.artifact import check_output_free
from quantcli.cli._console import LayerProgress, emit, err, layer_table, status
from quantcli.loading import Loaded, load_input
from quantcli.stage import CalibParams, calibration_for, run_stage


def load_for_stage(source: str | None, output: Path, force: bool, quiet: bool) -> Loaded:
    """The full-precision (transformed) model a stage starts from; refuses an existing output first."""
    check_output_free(output, force)
    with status("loading model", quiet):
        return load_input(source, quantized=False)


def run_algorithm(
    title: str,
    kind: str,
    algo,
    params: dict,
    loaded: Loaded,
    spec,
    output: Path,
    calib: Path | None,
    calib_params: CalibParams | None,
    device: str,
    batch: int,
    force: bool,
    quiet: bool,
    upstream=lambda _i: {},
) -> None:
    """Calibrate (unless data-free), run the driver under a progress bar, write and emit the artifact."""
    calib_ids, calib_info = None, None
    if calib is not None or calib_params is not None:
        with status("preparing calibration data", quiet):
            calib_ids, calib_info = calibration_for(loaded, str(calib) if calib else None, calib_params or CalibParams())
    with LayerProgress(f"{title} {spec.label()}", quiet) as bar:
        artifact = run_stage(
            kind, algo, params, loaded, spec, output, calib_ids, calib_info, device, batch, force,
            upstream=upstream, on_layer=bar.on_layer, on_update=bar.on_update,
        )
    if not quiet:
        layer_table(f"{title} per-layer summary", artifact.manifest.metrics["layers"])
        err.print(f"{title}: {artifact.manifest.metrics['seconds']:.1f}s → {artifact.path}")
    emit(str(artifact.path))
