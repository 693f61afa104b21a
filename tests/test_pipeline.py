"""The README's worked pipeline and the design card's three commands, run verbatim through a shell.

README.md is read at run time: the fenced ``bash`` block under "## A worked pipeline" is run line by
line in a temporary directory that holds a tiny Llama as ``model/``. The only substitution is
``wikitext2`` (not available offline) → a local text file; nothing else is shrunk, so a README
change that breaks the pipeline (a flag that does not exist, a stage that cannot read the previous
one's output, a default that crashes) fails here.

Both tests are in the slow tier: verbatim means the papers' defaults (128 calibration blocks,
5 OmniQuant epochs), about a minute of CPU even on a tiny model. ``tests/test_cli.py`` checks the
same mechanics (no ``-o``, spec and calibration inherited from ``--init-from``) in seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_TEXT, char_tokenizer, tiny_llama

REPO = Path(__file__).resolve().parent.parent
# The card: quantize with AWQ, start OmniQuant from it (spec and calibration taken from the AWQ
# artifact, output next to it), evaluate what the previous stage printed.
DESIGN_CARD = (
    "quant awq model/ --w4 --group 128 -o out/",
    "quant omniquant out/ --init-from out/ --epochs 5",
    "quant eval-ppl --dataset wikitext2",
)


def readme_pipeline() -> list[str]:
    """The command lines of the ```bash block under "## A worked pipeline" (comments stripped)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## A worked pipeline", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md: no ```bash block under '## A worked pipeline'"
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def make_workdir(tmp: Path, max_positions: int) -> Path:
    """``tmp/model/`` (a tiny Llama whose dims 128 divides), ``tmp/text.txt``, and a ``quant``
    on PATH that runs this checkout."""
    model = tiny_llama(hidden=128, intermediate=256)
    model.config.max_position_embeddings = max_positions
    model.save_pretrained(tmp / "model")
    char_tokenizer(TINY_TEXT).save_pretrained(tmp / "model")
    (tmp / "text.txt").write_text(TINY_TEXT * 3)
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "quant").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m quantcli "$@"\n')
    (bin_dir / "quant").chmod(0o755)
    return tmp


def shell(workdir: Path, line: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    line = line.replace("wikitext2", str(workdir / "text.txt"))
    env = {
        **os.environ,
        "PATH": f"{workdir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "QUANTCLI_CACHE": str(workdir / "cache"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # a tiny model gains nothing from threads
    }
    proc = subprocess.run(["bash", "-c", line], cwd=workdir, env=env, input=stdin or "", capture_output=True, text=True)
    assert proc.returncode == 0, f"$ {line}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.slow
def test_readme_pipeline_runs_verbatim(tmp_path):
    lines = readme_pipeline()
    assert len(lines) >= 4 and all(line.startswith("quant ") for line in lines), lines
    workdir = make_workdir(tmp_path, max_positions=8192)  # bench's default prompts reach 4000 + 64 tokens
    outputs = {}
    for line in lines:
        proc = shell(workdir, line)
        out = re.search(r"(?:-o|--output)\s+(\S+)", line)
        if out:
            assert (workdir / out.group(1)).is_dir(), line
            assert (workdir / proc.stdout.strip()).resolve() == (workdir / out.group(1)).resolve(), line
        outputs[line.split()[1]] = proc.stdout
    record = json.loads(outputs["eval-ppl"])
    assert record["kind"] == "packed" and record["format"] == "compressed-tensors" and record["ppl"] > 1
    assert "bench" in outputs


@pytest.mark.slow
def test_design_card_commands_run_verbatim(tmp_path):
    workdir = make_workdir(tmp_path, max_positions=64)  # default calibration: 128 blocks × the 64-token context
    awq, omni, evaluate = DESIGN_CARD
    shell(workdir, awq)
    printed = shell(workdir, omni).stdout.strip()
    assert (workdir / printed).resolve() == (workdir / "out-omniquant").resolve()
    manifest = json.loads((workdir / "out-omniquant" / "manifest.json").read_text())
    awq_manifest = json.loads((workdir / "out" / "manifest.json").read_text())
    assert manifest["spec"] == awq_manifest["spec"] and manifest["spec"]["group"] == 128
    calib, parent_calib = manifest["params"]["calibration"], awq_manifest["params"]["calibration"]
    assert calib["ids_sha256"] == parent_calib["ids_sha256"] and calib["seqlen"] == 64
    ppl = shell(workdir, evaluate, stdin=printed + "\n")  # the card pipes the path omniquant printed
    assert float(ppl.stdout.strip()) > 1 and "windows" in ppl.stderr


@pytest.mark.slow
def test_readme_opening_pipe_runs_verbatim(tmp_path):
    """The one-line pipe at the top of README.md: awq | gptq (spec inherited from the piped AWQ artifact) | eval-ppl."""
    text = (REPO / "README.md").read_text()
    line = re.search(r"```\n(quant .*?)\n```", text, re.S).group(1).strip()
    assert line.count("|") == 2, line
    workdir = make_workdir(tmp_path, max_positions=64)
    ppl = shell(workdir, line)
    assert float(ppl.stdout.strip()) > 1
    gptq = json.loads((workdir / "awq-gptq" / "manifest.json").read_text())
    assert gptq["kind"] == "gptq" and gptq["spec"]["group"] == 128 and gptq["parent"] is not None
