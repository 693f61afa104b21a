"""quant gptq: second-order rounding with error feedback (GPTQ), optionally on top of AWQ."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from quantcli.algos.gptq import GPTQ, GPTQParams
from quantcli.algos.parent import reuse_awq
from quantcli.cli import _options as opt
from quantcli.cli._stage import load_for_stage, run_algorithm
from quantcli.errors import SpecError
from quantcli.stage import CalibParams

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
MinExpertTokens = Annotated[int, typer.Option("--min-expert-tokens", help="A linear (MoE expert) that saw fewer calibration tokens is rounded to nearest.", min=0)]


def gptq_command(
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
    damp: Damp = 0.01,
    block_size: BlockSize = 128,
    act_order: ActOrder = True,
    static_groups: StaticGroups = True,
    true_sequential: TrueSequential = True,
    min_expert_tokens: MinExpertTokens = 64,
    calib: opt.Calib = None,
    dataset: opt.Dataset = "builtin",
    nsamples: opt.NSamples = 128,
    seqlen: opt.SeqLen = 2048,
    seed: opt.Seed = 0,
    device: opt.Device = "auto",
    batch_size: opt.Batch = 8,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Quantize every linear with GPTQ: round column by column, feeding the error into the columns still to come."""
    spec = opt.weight_spec(w2, w3, w4, w8, wbits, group, sym, abits)
    params = GPTQParams(damp, block_size, act_order, static_groups, true_sequential, min_expert_tokens)
    loaded = load_for_stage(opt.input_or_stdin(input), output, force, quiet)
    upstream, awq = reuse_awq(loaded, spec)  # INPUT an AWQ artifact: its clips (scales are folded in already)
    if awq is not None and params.act_order and not params.static_groups and spec.group != -1:
        raise SpecError(f"{awq['from']}: AWQ clip ratios belong to contiguous groups; add --static-groups to --act-order")
    run_algorithm(
        "GPTQ", "gptq", GPTQ(params), asdict(params), loaded, spec, output, calib,
        CalibParams(dataset, nsamples, seqlen, seed), device, batch_size, force, quiet, upstream=upstream,
    )

