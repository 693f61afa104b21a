"""How every benchmark script calls the documented CLI: ``python -m quantcli`` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import time


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
