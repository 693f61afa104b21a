"""quant awq: activation-aware scale and clip search."""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from quantcli.algos.awq import AWQ, AWQ_FILE, SEARCH_MODES, AWQParams, clip_weights
from quantcli.cli import _options as opt
from quantcli.cli._console import err
from quantcli.cli._options import CalibArgs, RunArgs, WeightArgs, option_groups
from quantcli.cli._stage import plan_stage, run_algorithm
from quantcli.artifact import check_output_free
from quantcli.errors import InputError
from quantcli.stage import StageParams

EPILOG = """Examples:

  quant awq model/ --w4 --group 128 -o awq-w4/

  quant awq model/ --w3 --group 64 --dataset wikitext2 --nsamples 128 --seqlen 512 -o awq-w3/

  quant awq model/ --w4 --group 128 --calib calib/ -o out/ | quant eval-ppl --dataset wikitext2
"""

NGrid = Annotated[int, typer.Option("--n-grid", help="Grid points for the scale exponent α in [0, 1).", min=1)]
DuoScaling = Annotated[
    bool, typer.Option("--duo-scaling/--x-only", help="s = mean|x|^α / mean|w|^(1-α) (duo scaling), or s = mean|x|^α (--x-only).")
]
MaxShrink = Annotated[float, typer.Option("--max-shrink", help="Largest fraction of a group's range the clip search may cut.", min=0.0, max=0.99)]
Clip = Annotated[bool, typer.Option("--clip/--no-clip", help="Search per-group clip ratios after the scales.")]
SearchDtype = Annotated[
    str, typer.Option("--search-dtype", help="float32 (default), mixed, auto, bfloat16 or float16: the scale search's forward passes. mixed: every candidate screened in bfloat16 where fast, the best few and s = 1 decided in float32 (float32 elsewhere); float32: all in float32; auto: all in bfloat16 where fast (cost perplexity on text it was not tuned on).")
]
SaveTransformed = Annotated[
    Optional[Path], typer.Option("--save-transformed", help="Also write the scaled, clipped fp model as an HF directory.", show_default=False)
]


@option_groups
def awq_command(
    input: opt.InputArg = None,
    weights: WeightArgs = WeightArgs(),
    calibration: CalibArgs = CalibArgs(),
    n_grid: NGrid = AWQParams.n_grid,
    duo_scaling: DuoScaling = AWQParams.duo_scaling,
    max_shrink: MaxShrink = AWQParams.max_shrink,
    clip: Clip = AWQParams.clip,
    search_dtype: SearchDtype = AWQParams.search_dtype,
    save_transformed: SaveTransformed = None,
    run: RunArgs = RunArgs(),
) -> None:
    """Search per-channel scales and clip ratios that protect salient weights, then quantize."""
    if search_dtype not in SEARCH_MODES:
        raise InputError(f"--search-dtype {search_dtype}: use {', '.join(SEARCH_MODES)}")
    params = AWQParams(n_grid=n_grid, duo_scaling=duo_scaling, clip=clip, max_shrink=max_shrink, search_dtype=search_dtype)
    plan = plan_stage("awq", input, weights, run)
    if save_transformed is not None:
        check_output_free(save_transformed, run.force)
    artifact = run_algorithm(
        "AWQ", plan, lambda _loaded: StageParams("awq", AWQ(params), plan.spec, asdict(params)), calibration, run
    )
    if save_transformed is not None:
        write_transformed(artifact.path, save_transformed, plan.spec, run.force)
        if not run.quiet:
            err.print(f"transformed fp model → {save_transformed}")


def write_transformed(artifact_dir: Path, out: Path, spec, force: bool) -> None:
    """The scaled and clipped full-precision model of an AWQ artifact, as a Hugging Face directory
    (float32 shards, one per decoder layer, each written as it is read from the base model's
    checkpoint and replayed, so peak memory is one layer when the base model streams)."""
    from quantcli.artifact import atomic_directory, open_artifact
    from quantcli.loading import load_input
    from quantcli.models.canonical import hf_state_dict
    from quantcli.pack.checkpoint import layer_source, save_beside, write_layer_shards

    check_output_free(out, force)
    loaded = load_input(str(artifact_dir), quantized=False, stream=True)
    artifact = open_artifact(artifact_dir)
    if loaded.stream is None:
        clip_weights(loaded.model, artifact, spec)
    else:  # clip each layer as it is replayed: clip_weights finds the ratios of the layer that is loaded
        clips = {k: v for k, v in artifact.tensors(AWQ_FILE).items() if k.endswith(".clip")}
        replay = loaded.stream.prepare_layer

        def prepare(index: int, layer) -> None:
            replay(index, layer)
            prefix = f"{loaded.stream.layer_path(index)}."
            clip_weights(loaded.model, _Clips({k: v for k, v in clips.items() if k.startswith(prefix)}), spec)

        loaded.stream.prepare_layer = prepare
    source = layer_source(loaded.stream or loaded.model)
    with atomic_directory(out) as tmp:
        write_layer_shards(tmp, source, hf_state_dict)
        config = copy.deepcopy(loaded.model.config)
        config.dtype = torch.float32
        save_beside(tmp, source, config, loaded.tokenizer)


class _Clips:
    """Stands in for an AWQ artifact in :func:`clip_weights`: the clip ratios of one decoder layer."""

    def __init__(self, tensors: dict):
        self._tensors = tensors

    def tensors(self, _name: str) -> dict:
        return self._tensors
