"""Option aliases shared by the commands (``Annotated`` types), and their parsing helpers."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from quantcli.errors import InputError, SpecError
from quantcli.quant import QuantSpec

InputArg = Annotated[
    Optional[str],
    typer.Argument(
        help="Model directory, .gguf file, cached hub id or quantcli artifact. Omitted: the path piped on stdin, else the embedded default model.",
        show_default=False,
    ),
]
Output = Annotated[Path, typer.Option("--output", "-o", help="Artifact directory to create.")]
Force = Annotated[bool, typer.Option("--force", help="Replace the output if it exists.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables on stderr.")]
Batch = Annotated[int, typer.Option("--batch-size", help="Calibration samples per forward pass.", min=1)]

W2 = Annotated[bool, typer.Option("--w2", help="2-bit weights.")]
W3 = Annotated[bool, typer.Option("--w3", help="3-bit weights.")]
W4 = Annotated[bool, typer.Option("--w4", help="4-bit weights (the default).")]
W8 = Annotated[bool, typer.Option("--w8", help="8-bit weights.")]
WBits = Annotated[Optional[int], typer.Option("--wbits", help="Weight bits, 2..8.", show_default=False)]
Group = Annotated[int, typer.Option("--group", help="Input channels per scale; -1 = per output channel.")]
Sym = Annotated[bool, typer.Option("--sym/--asym", help="Symmetric or asymmetric (zero point) weights.")]
ABits = Annotated[int, typer.Option("--abits", help="Activation bits: 16 (weight-only), 8, 6 or 4 (per-token dynamic).")]

Calib = Annotated[Optional[Path], typer.Option("--calib", help="Calibration artifact from quant calibrate.", show_default=False)]
Dataset = Annotated[str, typer.Option("--dataset", help="wikitext2, c4, ptb, pileval, builtin, or a .txt/.jsonl/.parquet file or folder.")]
NSamples = Annotated[int, typer.Option("--nsamples", help="Calibration blocks.", min=1)]
SeqLen = Annotated[int, typer.Option("--seqlen", help="Tokens per block.", min=2)]
Seed = Annotated[int, typer.Option("--seed", help="Seed for sampling the blocks.")]


def weight_spec(w2: bool, w3: bool, w4: bool, w8: bool, wbits: int | None, group: int, sym: bool, abits: int = 16) -> QuantSpec:
    """One QuantSpec from the shorthand flags; conflicting flags are an error."""
    chosen = {bits for bits, on in ((2, w2), (3, w3), (4, w4), (8, w8)) if on}
    if wbits is not None:
        chosen.add(wbits)
    if len(chosen) > 1:
        raise SpecError(f"conflicting weight bit flags ({', '.join(map(str, sorted(chosen)))} bits): give one of --w2/--w3/--w4/--w8/--wbits")
    return QuantSpec(wbits=chosen.pop() if chosen else 4, group=group, sym=sym, abits=abits)


def _stdin_is_pipe() -> bool | None:
    """True for a pipe or file on stdin, False for a terminal or /dev/null, None if unknown."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return None
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def input_or_stdin(value: str | None) -> str | None:
    """INPUT as given, else the last path a previous stage printed on a piped stdin, else None.

    An empty pipe is an error (the previous stage failed), never a silent fall-back to the default.
    """
    if value is not None:
        return value
    piped = _stdin_is_pipe()
    if sys.stdin is None or piped is False:
        return None
    try:
        lines = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    except (OSError, ValueError):
        lines = []
    if not lines:
        if piped:
            raise InputError("stdin: the previous stage printed no artifact path (did it fail?); pass INPUT explicitly")
        return None
    if not Path(lines[-1]).exists():
        raise InputError(f"stdin: {lines[-1][:120]!r} is not a path; pipe in a command that prints an artifact path")
    return lines[-1]
