"""How every benchmark script calls the documented CLI: ``python -m quantcli`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
