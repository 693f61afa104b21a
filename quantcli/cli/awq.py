"""quant awq: activation-aware scale and clip search."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from quantcli.algos.awq import AWQ, SEARCH_DTYPES, AWQParams, clip_weights
from quantcli.cli import _options as opt
from quantcli.cli._console import err
from quantcli.cli._stage import load_for_stage, run_algorithm
from quantcli.errors import InputError
from quantcli.stage import CalibParams

EPILOG = """Examples:

  quant awq model/ --w4 --group 128 -o awq-w4/

  quant awq model/ --w3 --group 64 --dataset wikitext2 --nsamples 128 --seqlen 512 -o awq-w3/

  quant awq model/ --w4 --group 128 --calib calib/ -o out/ | quant eval-ppl --dataset wikitext2
"""


def awq_command(
    input: opt.InputArg = None,
    output: opt.Output = ...,
    w2: opt.W2 = False,
    w3: opt.W3 = False,
    w4: opt.W4 = False,
    w8: opt.W8 = False,
    wbits: opt.WBits = None,
    group: opt.Group = 128,
    sym: opt.Sym = False,
    abits: opt.ABits = 16,
    calib: opt.Calib = None,
    dataset: opt.Dataset = "builtin",
    nsamples: opt.NSamples = 128,
    seqlen: opt.SeqLen = 512,
    seed: opt.Seed = 0,
    n_grid: Annotated[int, typer.Option("--n-grid", help="Grid points for the scale exponent α in [0, 1).", min=1)] = 20,
    x_only: Annotated[bool, typer.Option("--x-only", help="s = mean|x|^α instead of duo scaling mean|x|^α / mean|w|^(1-α).")] = False,
    max_shrink: Annotated[float, typer.Option("--max-shrink", help="Largest fraction of a group's range the clip search may cut.", min=0.0, max=0.99)] = 0.5,
    no_clip: Annotated[bool, typer.Option("--no-clip", help="Skip the clip search.")] = False,
    search_dtype: Annotated[
        str, typer.Option("--search-dtype", help="float32, auto, bfloat16 or float16: the scale search's forward passes (auto: bfloat16 where fast, which cost perplexity on text it was not tuned on).")
    ] = "float32",
    save_transformed: Annotated[Optional[Path], typer.Option("--save-transformed", help="Also write the scaled, clipped fp model as an HF directory.", show_default=False)] = None,
    device: opt.Device = "auto",
    batch_size: opt.Batch = 8,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Search per-channel scales and clip ratios that protect salient weights, then quantize."""
    if search_dtype != "auto" and search_dtype not in SEARCH_DTYPES:
        raise InputError(f"--search-dtype {search_dtype}: use auto, {', '.join(SEARCH_DTYPES)}")
    spec = opt.weight_spec(w2, w3, w4, w8, wbits, group, sym, abits)
    params = AWQParams(n_grid=n_grid, duo_scaling=not x_only, clip=not no_clip, max_shrink=max_shrink, search_dtype=search_dtype)
    loaded = load_for_stage(opt.input_or_stdin(input), output, force, quiet)
    run_algorithm(
        "AWQ", "awq", AWQ(params), asdict(params), loaded, spec, output, calib,
        CalibParams(dataset, nsamples, seqlen, seed), device, batch_size, force, quiet,
    )
    if save_transformed is not None:
        write_transformed(output, save_transformed, spec, force)
        if not quiet:
            err.print(f"transformed fp model → {save_transformed}")


def write_transformed(artifact_dir: Path, out: Path, spec, force: bool) -> None:
    """The scaled and clipped full-precision model of an AWQ artifact, as a Hugging Face directory."""
    from quantcli.artifact import atomic_directory, check_output_free, open_artifact
    from quantcli.models.canonical import hf_state_dict
    from quantcli.loading import materialize

    check_output_free(out, force)
    artifact = open_artifact(artifact_dir)
    model, tokenizer = materialize(artifact, quantized=False)
    clip_weights(model, artifact, spec)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, state_dict=hf_state_dict(model))
        tokenizer.save_pretrained(tmp)
