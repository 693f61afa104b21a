"""How every benchmark script calls the documented CLI: ``python -m quantcli`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AUSTEN = ROOT.parent / "shared" / "data" / "austen"


def add_protocol_args(ap, name: str, nsamples: int, calib_seqlen: int, windows: int = 16, seqlen: int = 512) -> None:
    """The options every perplexity benchmark shares: the model, the calibration text and size,
    the evaluation text and windows, and where the work and the results file go (``name``)."""
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M)")
    ap.add_argument("--calib-text", default=str(AUSTEN / "emma.txt"))
    ap.add_argument("--eval-text", default=str(AUSTEN / "prideprejudice.txt"))
    ap.add_argument("--nsamples", type=int, default=nsamples)
    ap.add_argument("--calib-seqlen", type=int, default=calib_seqlen)
    ap.add_argument("--seqlen", type=int, default=seqlen, help="evaluation window length")
    ap.add_argument("--windows", type=int, default=windows)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "work" / name))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"{name}.json"))


def rel(path: str | Path | None) -> str | None:
    """``path`` relative to the repository root (``../shared/...`` for the shared data), for results files."""
    if path is None:
        return None
    return os.path.relpath(Path(path).resolve(), ROOT)


def quant(*args: str) -> str:
    """Run ``quant ARGS`` and return its stdout (stripped); exit with its stderr's tail if it fails."""
    proc = subprocess.run([sys.executable, "-m", "quantcli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"quant {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip()


def timed_quant(*args: str) -> tuple[str, float]:
    """``quant(*args)`` and the wall seconds of the whole process."""
    started = time.time()
    return quant(*args), time.time() - started
