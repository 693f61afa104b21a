"""Data-parallel calibration (issue 14): 2 Gloo ranks on CPU give the 1-process artifacts.

The 2-process runs are real ``torchrun`` launches (``python -m torch.distributed.run``) in a
subprocess: one launch of this file as a worker runs gptq, awq, omniquant and eval-ppl through the
CLI app (one interpreter start per rank instead of four), and one launch of ``-m quantcli`` checks
that a failing rank ends both with one line. The 1-process references run in this process.

Floating-point reduction order (a sum over two shards instead of one running sum) moves the
reduced statistics by ~1e-7 relative; a weight on a rounding boundary, or two columns with nearly
equal diag(H) under GPTQ's act order, can then go the other way. Measured on this tiny model
(nsamples 8 × 64 tokens, w4 g32): 0 of 76032 codes and zero points differ for GPTQ, AWQ and
OmniQuant (three runs), and OmniQuant's trained clips agree to 0.0 (a CLI run at 1 thread; with
gradients left unreduced they differ by 1.3e-3). The tests allow FLIP_BOUND = 1 % of the codes
and 1e-5 on the saved AWQ scales/clips and OmniQuant clips. (On the real model act
order makes GPTQ chaotic: see benchmarks/results/dist.json for the flips there and the
single-process control with another thread count.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FLIP_BOUND = 1e-2  # fraction of integer codes (and zero points) allowed to differ
STAGES = ("gptq", "gptq-one-stage", "awq", "omniquant")


def stage_args(model: Path, text: Path, out: Path) -> list[list[str]]:
    """The commands compared: three stages, the perplexity of the GPTQ artifact, and SmoothQuant's α search."""
    calib = ["--w4", "--group", "32", "--dataset", str(text), "--nsamples", "8", "--seqlen", "64", "--device", "cpu", "-q"]
    return [
        ["gptq", str(model), *calib, "-o", str(out / "gptq")],
        ["gptq", str(model), *calib, "--no-true-sequential", "-o", str(out / "gptq-one-stage")],
        ["awq", str(model), *calib, "-o", str(out / "awq")],
        ["omniquant", str(model), *calib, "--epochs", "4", "--batch-size", "2", "-o", str(out / "omniquant")],
        ["eval-ppl", str(out / "gptq"), "--dataset", str(text), "--seqlen", "32", "--max-windows", "5", "--device", "cpu", "--json", "-q"],
        ["smooth", str(model), "--alpha", "auto", "--grid", "5", "--w8a8", "--group", "-1", "--act-static", *calib[3:], "-o", str(out / "smooth")],
    ]


def run_stages(model: Path, text: Path, out: Path) -> None:
    """Run every command of :func:`stage_args` through the CLI app in this process."""
    from quantcli.cli.app import app

    for args in stage_args(model, text, out):
        app(args, prog_name="quant", standalone_mode=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def code_flips(a: Path, b: Path) -> tuple[int, int]:
    """(differing, total) integer codes (unpacked, one per weight) and zero points between two artifacts."""
    from quantcli.artifact import open_artifact
    from quantcli.models.weights import read_quantized

    qa, qb = read_quantized(open_artifact(a)), read_quantized(open_artifact(b))
    assert set(qa) == set(qb) and len(qa)
    differing = sum(int((qa[n].codes != qb[n].codes).sum()) + int((qa[n].zero != qb[n].zero).sum()) for n in qa)
    return differing, sum(qa[n].codes.numel() + qa[n].zero.numel() for n in qa)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """1-process (in this process) and 2-process (torchrun, Gloo) runs of the same commands."""
    text = tiny_model_dir.parent / "text.txt"
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    captured = StringIO()
    with redirect_stdout(captured):
        run_stages(tiny_model_dir, text, one)
    launched = torchrun(str(Path(__file__)), str(tiny_model_dir), str(text), str(two))
    assert launched.returncode == 0, launched.stderr[-3000:]
    return one, two, captured.getvalue(), launched


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_give_the_one_process_artifact(runs, stage):
    one, two, _, _ = runs
    flips, total = code_flips(one / stage, two / stage)
    print(f"{stage}: {flips}/{total} codes differ ({flips / total:.2e})")
    assert flips / total <= FLIP_BOUND
    m1, m2 = (json.loads((d / stage / "manifest.json").read_text()) for d in (one, two))
    assert (m1["metrics"]["world_size"], m2["metrics"]["world_size"]) == (1, 2)
    assert m1["params"] == m2["params"]
    # the reduced per-layer loss is the 1-process one (a rank's own shard would give another value)
    for l1, l2 in zip(m1["metrics"]["layers"], m2["metrics"]["layers"]):
        assert l2["loss"] == pytest.approx(l1["loss"], rel=5e-2)
    if stage.startswith("gptq"):  # each Hessian group solved on one rank (its owner), both ranks working
        assert all("groups_by_rank" not in layer for layer in m1["metrics"]["layers"])
        assert all(layer["groups_by_rank"] == [2, 2] for layer in m2["metrics"]["layers"])  # q/k/v, o, gate/up, down
    else:  # AWQ's searched scales and clips, OmniQuant's trained clips: the 1-process ones
        from safetensors.torch import load_file

        s1, s2 = (load_file(d / stage / f"{stage}.safetensors") for d in (one, two))
        assert s1.keys() == s2.keys() and s1
        for key in s1:
            torch.testing.assert_close(s2[key], s1[key], rtol=1e-4, atol=1e-5)


def test_two_ranks_give_the_one_process_perplexity_and_rank_0_alone_prints(runs):
    one, two, out1, launched = runs
    lines1, lines2 = out1.strip().splitlines(), launched.stdout.strip().splitlines()
    assert len(lines2) == len(lines1) == 6, launched.stdout  # rank 1 printed nothing
    assert lines2[:4] == [str(two / s) for s in STAGES]
    ppl1, ppl2 = json.loads(lines1[4]), json.loads(lines2[4])
    assert ppl2["windows"] == ppl1["windows"] == 5 and ppl2["tokens"] == ppl1["tokens"]
    assert ppl2["ppl"] == pytest.approx(ppl1["ppl"], rel=1e-4)
    assert not [p for p in two.iterdir() if p.name.startswith(".")]  # no half-written directory


def test_two_ranks_pick_the_one_process_alpha(runs):
    """``smooth --alpha auto`` (W8A8 static): each candidate's block error is reduced over ranks (and
    the static input ranges with it), so the losses, the α picked per layer and the scales are the
    1-process ones (catches a rank choosing α on its own shard's error, or calibrating its own static scales)."""
    from safetensors.torch import load_file

    one, two, _, _ = runs
    m1, m2 = (json.loads((d / "smooth" / "manifest.json").read_text())["metrics"]["layers"] for d in (one, two))
    for l1, l2 in zip(m1, m2, strict=True):
        assert l2["alpha"] == l1["alpha"]
        assert l2["alpha_losses"] == pytest.approx(l1["alpha_losses"], rel=1e-4)
    s1, s2 = (load_file(d / "smooth" / "smooth.safetensors") for d in (one, two))
    assert s1.keys() == s2.keys() and s1
    for key in s1:
        torch.testing.assert_close(s2[key], s1[key], rtol=1e-5, atol=1e-6)


def test_a_failing_rank_ends_both_with_one_line_naming_it(tiny_model_dir, tmp_path):
    """One calibration block for two ranks: rank 1 has none and fails; rank 0 is stopped."""
    text = tiny_model_dir.parent / "text.txt"
    args = ["gptq", str(tiny_model_dir), "--w4", "--group", "32", "--dataset", str(text), "--nsamples", "1", "--seqlen", "32"]
    launched = torchrun("-m", "quantcli", *args, "--device", "cpu", "-o", str(tmp_path / "out"), timeout=120)
    assert launched.returncode != 0
    ours = [line for line in launched.stderr.splitlines() if line.startswith("quant:")]
    assert len(ours) == 1, launched.stderr[-3000:]
    assert ours[0].startswith("quant: error: rank 1/2: ") and "calibration blocks" in ours[0]
    assert not (tmp_path / "out").exists() and launched.stdout == ""


if __name__ == "__main__":  # one rank of the torchrun launch above
    from quantcli import dist
    from quantcli.__main__ import _silence

    dist.run(lambda: run_stages(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])), _silence)
