"""quant smooth: SmoothQuant, a transform stage every other stage accepts as INPUT."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Annotated

import typer

from quantcli.algos.smooth import Smooth, SmoothParams
from quantcli.cli import _options as opt
from quantcli.cli._options import CalibArgs, RunArgs, WeightArgs, option_groups
from quantcli.cli._stage import plan_stage, run_algorithm
from quantcli.errors import InputError
from quantcli.quant import QuantSpec
from quantcli.stage import StageParams

EPILOG = """Examples:

  quant smooth model/ --alpha 0.5 -o smooth/ && quant rtn smooth/ --w8a8 --group -1 -o w8a8/

  quant smooth model/ --alpha auto --w4a8 --dataset ../texts/emma.txt --nsamples 32 --seqlen 512 -o smooth/

  quant smooth model/ --w4a4 -o smooth/ | quant gptq --w4 --group 64 --abits 4 -o gptq/
"""

# The spec --alpha auto scores when no flag and no parent artifact says otherwise: SmoothQuant's W8A8
# (per-channel weights, per-token activations). The stage itself quantizes nothing.
SMOOTH_SPEC = QuantSpec(wbits=8, group=-1, abits=8)

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


@option_groups
def smooth_command(
    input: opt.InputArg = None,
    alpha: Alpha = "0.5",
    grid: Grid = SmoothParams.grid,
    weights: WeightArgs = WeightArgs(),
    calibration: CalibArgs = CalibArgs(),
    run: RunArgs = RunArgs(),
) -> None:
    """Fold s = max|X|^α / max|W|^(1-α) into every scaling group; quantizes nothing (the spec flags only steer --alpha auto; default W8A8 per channel)."""
    params = SmoothParams(alpha=parse_alpha(alpha), grid=grid)
    plan = plan_stage("smooth", input, weights, run)
    if plan.parent is None or plan.parent.manifest.spec is None:
        plan = replace(plan, spec=weights.spec(SMOOTH_SPEC))
    run_algorithm("SmoothQuant", plan, lambda _loaded: StageParams("smooth", Smooth(params), plan.spec, asdict(params)), calibration, run)
