"""quant gptq: second-order rounding with error feedback (GPTQ), optionally on top of AWQ."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from quantcli.algos.gptq import GPTQ, GPTQParams
from quantcli.algos.parent import reuse_parent
from quantcli.cli import _options as opt
from quantcli.cli._options import CalibArgs, RunArgs, WeightArgs, option_groups
from quantcli.cli._stage import plan_stage, run_algorithm
from quantcli.errors import SpecError
from quantcli.stage import StageParams

EPILOG = """Examples:

  quant gptq model/ --w4 --group 128 -o gptq-w4/

  quant gptq model/ --w4 --group 128 --act-order --static-groups --calib calib/ -o gptq-w4/

  quant gptq --w3 --group 64 --dataset ../texts/emma.txt --nsamples 16 --seqlen 512 -o gptq-w3/

  quant awq model/ --w4 --group 64 -o awq/ | quant gptq --w4 --group 64 -o awq-gptq/   (GPTQ on AWQ-scaled weights, AWQ clips)
"""

Damp = Annotated[float, typer.Option("--damp", help="Hessian damping as a fraction of mean(diag H); raised ×10 automatically when Cholesky fails.", min=0.0)]
BlockSize = Annotated[int, typer.Option("--block-size", help="Columns per lazy-update block.", min=1)]
ActOrder = Annotated[bool, typer.Option("--act-order/--no-act-order", help="Quantize columns by decreasing input energy (diag H).")]
StaticGroups = Annotated[bool, typer.Option("--static-groups/--no-static-groups", help="Fix group scales on the unpermuted weight: act-order without g_idx.")]
TrueSequential = Annotated[
    bool,
    typer.Option("--true-sequential/--no-true-sequential", help="Capture each stage's inputs after the earlier stages of the layer are quantized."),
]
CaptureDtype = Annotated[
    str,
    typer.Option(
        "--capture-dtype",
        help="Dtype of the forwards that capture the linears' inputs: auto (bfloat16 where the device runs it fast), float32, bfloat16, float16. Hessians accumulate in float32.",
    ),
]
MinExpertTokens = Annotated[int, typer.Option("--min-expert-tokens", help="A MoE expert that saw fewer calibration tokens is rounded to nearest (dense linears never are).", min=0)]


@option_groups
def gptq_command(
    input: opt.InputArg = None,
    weights: WeightArgs = WeightArgs(),
    calibration: CalibArgs = CalibArgs(),
    damp: Damp = GPTQParams.damp,
    block_size: BlockSize = GPTQParams.block_size,
    act_order: ActOrder = GPTQParams.act_order,
    static_groups: StaticGroups = GPTQParams.static_groups,
    true_sequential: TrueSequential = GPTQParams.true_sequential,
    min_expert_tokens: MinExpertTokens = GPTQParams.min_expert_tokens,
    capture_dtype: CaptureDtype = GPTQParams.capture_dtype,
    run: RunArgs = RunArgs(),
) -> None:
    """Quantize every linear with GPTQ: round column by column, feeding the error into the columns still to come."""
    params = GPTQParams(damp, block_size, act_order, static_groups, true_sequential, min_expert_tokens, capture_dtype)
    plan = plan_stage("gptq", input, weights, run)

    def build(loaded) -> StageParams:
        upstream, awq = reuse_parent(loaded, plan.spec)  # INPUT an AWQ artifact: its clips (scales are folded in already)
        if awq is not None and params.act_order and not params.static_groups and plan.spec.group != -1:
            raise SpecError(f"{awq['from']}: AWQ clip ratios belong to contiguous groups; add --static-groups to --act-order")
        return StageParams("gptq", GPTQ(params), plan.spec, asdict(params), upstream)

    run_algorithm("GPTQ", plan, build, calibration, run)
