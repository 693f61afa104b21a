"""The committed completion scripts are the ones the app generates, and they complete commands."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMPLETIONS = Path(__file__).resolve().parent.parent / "completions"
sys.path.insert(0, str(COMPLETIONS))
from generate import SHELLS, script  # noqa: E402


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_committed_scripts_are_current(shell):
    assert (COMPLETIONS / SHELLS[shell]).read_text() == script(shell), "run: python completions/generate.py"


def test_bash_completion_lists_the_commands():
    env = {**os.environ, "_QUANT_COMPLETE": "complete_bash", "COMP_WORDS": "quant ", "COMP_CWORD": "1"}
    proc = subprocess.run([sys.executable, "-m", "quantcli"], env=env, capture_output=True, text=True)
    for command in ("calibrate", "rtn", "awq", "gptq", "omniquant", "pack", "eval-ppl"):
        assert command in proc.stdout
