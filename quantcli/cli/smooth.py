"""quant smooth: SmoothQuant, a transform stage every other stage accepts as INPUT."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Annotated

import typer

from quantcli.algos.smooth import Smooth, SmoothParams
from quantcli.cli import _options as opt
from quantcli.cli._stage import load_for_stage, run_algorithm
from quantcli.errors import InputError
from quantcli.stage import CalibParams

EPILOG = """Examples:

  quant smooth model/ --alpha 0.5 -o smooth/ && quant rtn smooth/ --w8a8 --group -1 -o w8a8/

  quant smooth model/ --alpha auto --w4a8 --dataset ../texts/emma.txt --nsamples 32 --seqlen 512 -o smooth/

  quant smooth model/ --w4a4 -o smooth/ | quant gptq --w4 --group 64 --abits 4 -o gptq/
"""

Alpha = Annotated[str, typer.Option("--alpha", help="Migration strength in [0, 1], or auto (searched per layer on the quantized block's output error).")]
Grid = Annotated[int, typer.Option("--grid", help="--alpha auto tries 1/grid … (grid-1)/grid.", min=2)]


def parse_alpha(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        alpha = float(text)
    except ValueError:
        alpha = -1.0
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"--alpha {text}: use a number in [0, 1] or auto")
    return alpha


def smooth_command(
    input: opt.InputArg = None,
    output: opt.Output = ...,
    alpha: Alpha = "0.5",
    grid: Grid = 10,
    w8a8: opt.W8A8 = False,
    w4a8: opt.W4A8 = False,
    w4a4: opt.W4A4 = False,
    wbits: opt.WBits = None,
    group: opt.Group = -1,
    sym: opt.Sym = False,
    abits: opt.ABits = 8,
    act_sym: opt.ActSym = False,
    calib: opt.Calib = None,
    dataset: opt.Dataset = "builtin",
    nsamples: opt.NSamples = 128,
    seqlen: opt.SeqLen = 512,
    seed: opt.Seed = 0,
    device: opt.Device = "auto",
    batch_size: opt.Batch = 8,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Fold s = max|X|^α / max|W|^(1-α) into every scaling group; quantizes nothing (the spec flags only steer --alpha auto)."""
    params = SmoothParams(alpha=parse_alpha(alpha), grid=grid)
    spec = opt.weight_spec(False, False, False, False, wbits if wbits is not None else 8, group, sym, abits)
    shorthand = opt.wa_shorthand(w8a8, w4a8, w4a4)
    if shorthand is not None and wbits is not None:
        raise InputError(f"--wbits {wbits} conflicts with --w{shorthand[0]}a{shorthand[1]}: give one of them")
    if shorthand is not None:
        spec = replace(spec, wbits=shorthand[0], abits=shorthand[1])
    spec = replace(spec, act_sym=act_sym)
    loaded = load_for_stage(opt.input_or_stdin(input), output, force, quiet)
    run_algorithm(
        "SmoothQuant", "smooth", Smooth(params), asdict(params), loaded, spec, output, calib,
        CalibParams(dataset, nsamples, seqlen, seed), device, batch_size, force, quiet,
    )
