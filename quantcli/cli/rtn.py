"""quant rtn: round-to-nearest, the baseline."""

from __future__ import annotations

from quantcli.algos.rtn import RTN
from quantcli.cli import _options as opt
from quantcli.cli._stage import load_for_stage, run_algorithm

EPILOG = """Examples:

  quant rtn model/ --w4 --group 128 -o rtn-w4/

  quant rtn model/ --w3 --group 64 --calib calib/ -o rtn-w3/   (with per-layer output loss)
"""


def rtn_command(
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
    device: opt.Device = "auto",
    batch_size: opt.Batch = 8,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Round every linear's weights to the nearest grid point (data-free unless --calib is given)."""
    spec = opt.weight_spec(w2, w3, w4, w8, wbits, group, sym, abits)
    loaded = load_for_stage(opt.input_or_stdin(input), output, force, quiet)
    run_algorithm("RTN", "rtn", RTN(), {}, loaded, spec, output, calib, None, device, batch_size, force, quiet)
