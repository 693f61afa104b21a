"""quant omniquant: learnable weight clipping and equivalent transforms, trained block by block."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from quantcli.algos.omniquant import OmniQuant, OmniQuantParams, init_record
from quantcli.algos.parent import open_awq, reuse_awq
from quantcli.cli import _options as opt
from quantcli.cli._stage import load_for_stage, run_algorithm
from quantcli.stage import CalibParams

EPILOG = """Examples:

  quant omniquant model/ --w3 --group 64 --epochs 5 -o omni-w3/

  quant omniquant model/ --w4 --group 128 --abits 4 --epochs 10 -o omni-w4a4/   (LET on by default)

  quant awq model/ --w4 --group 128 -o awq/ && quant omniquant awq/ --w4 --group 128 -o omni/   (start from AWQ)

  quant omniquant model/ --w3 --group 64 --init-from awq-w3/ --dataset ../texts/emma.txt --nsamples 32 --seqlen 512 -o omni/
"""


def omniquant_command(
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
    init_from: Annotated[
        Optional[Path],
        typer.Option("--init-from", help="AWQ artifact (same model and spec) whose scales and clips start LET and LWC.", show_default=False),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the calibration set per layer.", min=0)] = 5,
    lwc: Annotated[bool, typer.Option("--lwc/--no-lwc", help="Learnable weight clipping.")] = True,
    let: Annotated[
        Optional[bool],
        typer.Option("--let/--no-let", help="Learnable equivalent transform (default: on when --abits < 16).", show_default=False),
    ] = None,
    lwc_lr: Annotated[float, typer.Option("--lwc-lr", help="AdamW learning rate of the clip factors.", min=0.0)] = 1e-2,
    let_lr: Annotated[float, typer.Option("--let-lr", help="AdamW learning rate of the LET scales.", min=0.0)] = 5e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Calibration samples per training step (and per forward pass).", min=1)] = 1,
    calib: opt.Calib = None,
    dataset: opt.Dataset = "builtin",
    nsamples: opt.NSamples = 128,
    seqlen: opt.SeqLen = 2048,
    seed: opt.Seed = 0,
    device: opt.Device = "auto",
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Train clip factors (and channel scales) per decoder layer to match the fp layer's outputs, then quantize."""
    spec = opt.weight_spec(w2, w3, w4, w8, wbits, group, sym, abits)
    params = OmniQuantParams(epochs=epochs, lwc=lwc, let=let, lwc_lr=lwc_lr, let_lr=let_lr, batch_size=batch_size, seed=seed)
    init_artifact = open_awq(init_from, spec) if init_from is not None else None  # refuse before loading
    loaded = load_for_stage(opt.input_or_stdin(input), output, force, quiet)
    upstream, awq = reuse_awq(loaded, spec, init_artifact)
    recorded = {**asdict(params), "let": params.let_for(spec), "init": init_record(awq)}
    run_algorithm(
        "OmniQuant", "omniquant", OmniQuant(params), recorded, loaded, spec, output, calib,
        CalibParams(dataset, nsamples, seqlen, seed), device, batch_size, force, quiet, upstream=upstream,
    )
