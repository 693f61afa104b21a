"""quant rtn: round-to-nearest, the baseline."""

from __future__ import annotations

from quantcli.algos.rtn import RTN
from quantcli.cli import _options as opt
from quantcli.cli._options import CalibArgs, RunArgs, WeightArgs, option_groups
from quantcli.cli._stage import plan_stage, run_algorithm
from quantcli.stage import StageParams

EPILOG = """Examples:

  quant rtn model/ --w4 --group 128 -o rtn-w4/

  quant rtn model/ --w3 --group 64 --calib calib/ -o rtn-w3/   (with per-layer output loss)
"""


@option_groups
def rtn_command(
    input: opt.InputArg = None,
    weights: WeightArgs = WeightArgs(),
    calibration: CalibArgs = CalibArgs(),
    run: RunArgs = RunArgs(),
) -> None:
    """Round every linear's weights to the nearest grid point (data-free unless a calibration flag is given)."""
    plan = plan_stage("rtn", input, weights, run)
    run_algorithm("RTN", plan, lambda _loaded: StageParams("rtn", RTN(), plan.spec), calibration, run, needs_data=False)
