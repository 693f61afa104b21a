"""Check the ``--device cuda`` path of every stage against ``--device cpu`` on a small random Llama.

Run on a machine with a GPU (the CPU-only CI never runs it):

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

It builds a random Llama (hidden 256, 4 layers, GQA) with a character tokenizer in a temporary
directory, then runs each stage through the documented CLI twice — once with ``--device cpu`` and
once with ``--device cuda`` — and records exit codes, wall time and perplexity. The two devices
must agree within float tolerance (the algorithms are the same code; only reduction order
differs). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. "
    "However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so "
    "well fixed in the minds of the surrounding families, that he is considered the rightful property of some one or other "
    "of their daughters.\n\n"
)


def build_model(directory: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import char_tokenizer, tiny_llama  # the tests' own builders

    model = tiny_llama(hidden=256, intermediate=512, vocab=128)
    model.save_pretrained(directory)
    char_tokenizer(TEXT * 4).save_pretrained(directory)


def quant(args: list[str], cwd: Path) -> tuple[int, float, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "quantcli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    return proc.returncode, time.time() - t0, proc.stdout.strip(), proc.stderr.strip()[-600:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; run cpu here and cuda there to save GPU time")
    parser.add_argument("--stages", default=None, help="comma-separated subset of the stages")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    build_model(work / "model")
    (work / "text.txt").write_text(TEXT * 200)
    calib = ["--dataset", "text.txt", "--nsamples", "8", "--seqlen", "128"]
    stages = {
        "rtn": ["rtn", "model", "--w4", "--group", "64"],
        "awq": ["awq", "model", "--w4", "--group", "64", *calib],
        "gptq": ["gptq", "model", "--w4", "--group", "64", *calib],
        "omniquant": ["omniquant", "model", "--w4", "--group", "64", "--epochs", "1", *calib],
        "omniquant-w4a8": ["omniquant", "model", "--w4", "--group", "-1", "--abits", "8", "--epochs", "1", *calib],
    }
    if args.stages:
        stages = {k: v for k, v in stages.items() if k in args.stages.split(",")}
    rows = []
    for name, stage_args in stages.items():
        for device in args.devices.split(","):
            out = f"{name}-{device}"
            rc, seconds, stdout, stderr = quant([*stage_args, "--device", device, "-o", out, "--quiet", "--force"], work)
            row = {"stage": name, "device": device, "rc": rc, "seconds": round(seconds, 2)}
            if rc == 0:
                rc2, _, ppl_out, stderr2 = quant(
                    ["eval-ppl", out, "--dataset", "text.txt", "--seqlen", "128", "--max-windows", "16", "--device", device, "--json", "--quiet"],
                    work,
                )
                row["eval_rc"] = rc2
                try:
                    row["ppl"] = json.loads(ppl_out.splitlines()[-1])["ppl"]
                except (ValueError, IndexError, KeyError):
                    row["eval_stderr"] = stderr2
            else:
                row["stderr"] = stderr
            rows.append(row)
            print(json.dumps(row), flush=True)
    if "cuda" not in args.devices:
        bench = {"skipped": "no cuda in --devices"}
    else:
        rc, seconds, stdout, stderr = quant(["bench", "rtn-cuda", "--device", "cuda", "--prompt-lens", "32,128", "--baseline", "bf16", "--json", "--quiet"], work)
        bench = {"rc": rc, "seconds": round(seconds, 2)}
        try:
            bench["result"] = json.loads(stdout.splitlines()[-1])
        except (ValueError, IndexError):
            bench["stderr"] = stderr
    print(json.dumps(bench)[:2000], flush=True)

    agree = {}
    for name in stages:
        pair = [r for r in rows if r["stage"] == name and "ppl" in r]
        if len(pair) == 2:
            cpu, cuda = (p["ppl"] for p in sorted(pair, key=lambda r: r["device"]))
            agree[name] = {"cpu": cpu, "cuda": cuda, "relative_difference": abs(cuda - cpu) / cpu}
    result = {
        "what": "every stage with --device cuda vs --device cpu on a random Llama (hidden 256, 2 layers, GQA), char tokenizer",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rows": rows,
        "agreement": agree,
        "bench_cuda": bench,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'stage':<16}{'cpu ppl':>10}{'cuda ppl':>10}{'rel diff':>10}")
    for name, a in agree.items():
        print(f"{name:<16}{a['cpu']:>10.3f}{a['cuda']:>10.3f}{a['relative_difference']:>10.2e}")


if __name__ == "__main__":
    main()
