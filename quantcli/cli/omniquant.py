"""quant omniquant: learnable weight clipping and equivalent transforms, trained block by block."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from quantcli.algos.omniquant import OmniQuant, OmniQuantParams, init_record
from quantcli.algos.parent import open_parent, reuse_parent
from quantcli.cli import _options as opt
from quantcli.cli._options import CalibArgs, RunArgs, WeightArgs, option_groups
from quantcli.cli._stage import plan_stage, run_algorithm
from quantcli.errors import InputError
from quantcli.stage import StageParams

EPILOG = """Examples:

  quant omniquant model/ --w3 --group 64 --epochs 5 -o omni-w3/

  quant omniquant model/ --w4 --group 128 --abits 4 --epochs 10 -o omni-w4a4/   (LET on by default)

  quant awq model/ --w4 --group 128 -o awq/ && quant omniquant awq/ --w4 --group 128 -o omni/   (start from AWQ)

  quant smooth model/ --alpha 0.5 -o smooth/ && quant omniquant model/ --w4 --group 128 --init-from smooth/ -o omni/   (smooth + OmniQuant)

  quant omniquant model/ --w4 --group -1 --w4a4 --kv-bits 4 --epochs 5 -o omni-w4a4kv4/   (with the q·kᵀ scale)

  quant omniquant out/ --init-from out/ --epochs 5   (spec and calibration from out/; writes out-omniquant/)

  quant omniquant model/ --w3 --group 64 --init-from awq-w3/ --dataset ../texts/emma.txt --nsamples 32 --seqlen 512 -o omni/
"""


InitFrom = Annotated[
    Optional[Path],
    typer.Option(
        "--init-from", show_default=False,
        help="AWQ or smooth artifact (same model) whose scales start LET (and AWQ clips start LWC); its spec and calibration are used for flags not given.",
    ),
]
QK_INITS = ("stats", "ones")
PARENTS = ("awq", "smooth")  # kinds whose scales (INPUT or --init-from) start LET
Epochs = Annotated[int, typer.Option("--epochs", help="Passes over the calibration set per layer.", min=0)]
Lwc = Annotated[bool, typer.Option("--lwc/--no-lwc", help="Learnable weight clipping.")]
Let = Annotated[
    Optional[bool],
    typer.Option("--let/--no-let", help="Learnable equivalent transform (default: on when --abits < 16).", show_default=False),
]
QkScale = Annotated[
    Optional[bool],
    typer.Option(
        "--qk-scale/--no-qk-scale", show_default=False,
        help="Learn a q·kᵀ scale (Q/s, K·s per rotary pair) that smooths the keys for the KV-cache quantizer; acts only with --kv-bits (default: with LET there).",
    ),
]
QkInit = Annotated[str, typer.Option("--qk-init", help="Start of the q·kᵀ scale: stats ((max|Q|/max|K|)^½) or ones.")]
LwcLr = Annotated[float, typer.Option("--lwc-lr", help="AdamW learning rate of the clip factors.", min=0.0)]
LetLr = Annotated[float, typer.Option("--let-lr", help="AdamW learning rate of the LET scales.", min=0.0)]


@option_groups
def omniquant_command(
    input: opt.InputArg = None,
    weights: WeightArgs = WeightArgs(),
    init_from: InitFrom = None,
    epochs: Epochs = OmniQuantParams.epochs,
    lwc: Lwc = OmniQuantParams.lwc,
    let: Let = OmniQuantParams.let,
    qk_scale: QkScale = OmniQuantParams.qk,
    qk_init: QkInit = OmniQuantParams.qk_init,
    lwc_lr: LwcLr = OmniQuantParams.lwc_lr,
    let_lr: LetLr = OmniQuantParams.let_lr,
    calibration: CalibArgs = CalibArgs(),
    run: RunArgs = RunArgs(),
) -> None:
    """Train clip factors (and channel scales) per decoder layer to match the fp layer's outputs, then quantize."""
    plan = plan_stage("omniquant", input, weights, run, init_from=init_from)
    batch = run.batch_size or OmniQuantParams.batch_size
    seed = calibration.seed if calibration.seed is not None else OmniQuantParams.seed
    if qk_init not in QK_INITS:
        raise InputError(f"--qk-init {qk_init}: use {' or '.join(QK_INITS)}")
    if qk_scale and plan.spec.kv_bits >= 16:
        raise InputError("--qk-scale acts only on a quantized KV cache: add --kv-bits 8 or 4 (without it the scale cancels)")
    params = OmniQuantParams(
        epochs=epochs, lwc=lwc, let=let, lwc_lr=lwc_lr, let_lr=let_lr, batch_size=batch, seed=seed, qk=qk_scale, qk_init=qk_init,
    )
    init_artifact = open_parent(init_from, plan.spec, PARENTS) if init_from is not None else None  # refuse before loading

    def build(loaded) -> StageParams:
        upstream, parent = reuse_parent(loaded, plan.spec, init_artifact, PARENTS)
        recorded = {**asdict(params), "let": params.let_for(plan.spec), "qk": params.qk_for(plan.spec), "init": init_record(parent)}
        return StageParams("omniquant", OmniQuant(params), plan.spec, recorded, upstream)

    run_algorithm("OmniQuant", plan, build, calibration, run, default_batch=batch)
