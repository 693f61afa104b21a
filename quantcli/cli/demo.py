"""quant demo: the whole pipeline on the embedded model and text, sized for a laptop CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from quantcli.algos.awq import AWQ
from quantcli.algos.rtn import RTN
from quantcli.calib.data import BUILTIN, load_texts, tokenize
from quantcli.cli import _options as opt
from quantcli.cli._console import LayerProgress, emit, err, status
from quantcli.eval.ppl import perplexity
from quantcli.loading import load_input
from quantcli.quant import QuantSpec
from quantcli.stage import CalibParams, RunParams, StageParams, make_calibration, run_stage

EPILOG = """Examples:

  quant demo

  quant demo --wbits 3 --workdir /tmp/quant-demo
"""


def demo_command(
    wbits: Annotated[int, typer.Option("--wbits", help="Weight bits.")] = 4,
    group: opt.Group = 64,
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo's artifacts go.")] = Path("quant-demo"),
    windows: Annotated[int, typer.Option("--windows", help="Evaluation windows of 512 tokens.", min=1)] = 8,
    device: opt.Device = "auto",
    quiet: opt.Quiet = False,
    model: Annotated[Optional[str], typer.Option("--model", hidden=True, help="Another model instead of the embedded one (for tests).")] = None,
) -> None:
    """Quantize the embedded SmolLM2-135M with RTN and AWQ on the embedded text, and compare perplexities."""
    spec = QuantSpec(wbits=wbits, group=group)
    test = load_texts(BUILTIN, "test")
    rows = []
    with status("loading the embedded model", quiet):
        fp = load_input(model)
    tokens = tokenize(fp.tokenizer, test.joined())
    started = time.time()
    rows.append(("fp32", perplexity(fp.model, tokens, 512, windows)["ppl"], 0.0))
    calibration = make_calibration(fp, CalibParams(BUILTIN, nsamples=8, seqlen=256))
    for name, algo, calib in (("rtn", RTN(), None), ("awq", AWQ(), calibration)):
        loaded = load_input(model)
        t0 = time.time()
        with LayerProgress(f"{name.upper()} {spec.label()}", quiet) as bar:
            artifact = run_stage(
                StageParams(name, algo, spec), loaded, workdir / f"{name}-{spec.label()}", calib,
                RunParams(device, force=True), on_layer=bar.on_layer, on_update=bar.on_update,
            )
        seconds = time.time() - t0
        quantized = load_input(str(artifact.path))
        rows.append((f"{name} {spec.label()}", perplexity(quantized.model, tokens, 512, windows)["ppl"], seconds))
    table = Table(title=f"SmolLM2-135M on the Python docs (test split, {windows} × 512 tokens)")
    for column in ("model", "perplexity", "quantize s"):
        table.add_column(column, justify="right")
    for name, ppl, seconds in rows:
        table.add_row(name, f"{ppl:.3f}", f"{seconds:.1f}")
    if not quiet:
        err.print(table)
        err.print(f"demo took {time.time() - started:.0f}s; artifacts in {workdir}/ — try: quant eval-ppl {workdir}/awq-{spec.label()}")
    emit(json.dumps({name: round(ppl, 4) for name, ppl, _ in rows}))
