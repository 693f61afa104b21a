"""quantcli against its peers on the same model, calibration tokens and evaluation windows.

    python benchmarks/peers/compare.py --wbits 4 --group 64 [--nsamples 8 --calib-len 256 --windows 4]

Steps: builds the peer venvs (setup_peers.sh, idempotent), writes calib.pt / eval.pt with
prepare_inputs.py, checks that `quant calibrate` produces the very same calibration tokens, runs
quantcli's AWQ and GPTQ and the peers (llm-compressor AWQ, GPTQModel GPTQ), evaluates all on the
same windows, prints a table and writes JSON. Each tool's wall time is its quantization process
(quantcli: the whole `quant awq|gptq` command, model load included, with the driver's own time in
the notes; peers: the quantize call only). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
AUSTEN = ROOT.parent / "shared" / "data" / "austen"
VENVS = ROOT / ".peer-venvs"
PEERS = {"awq": ("llmcompressor", "llmcompressor-awq"), "gptq": ("gptqmodel", "gptqmodel-gptq")}


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip()


def quant(*args: str) -> str:
    return run([sys.executable, "-m", "quantcli", *args])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wbits", default="4")
    ap.add_argument("--group", default="64")
    ap.add_argument("--nsamples", default="8")
    ap.add_argument("--calib-len", default="256")
    ap.add_argument("--windows", default="16")
    ap.add_argument("--eval-len", default="512")
    ap.add_argument("--methods", default="awq,gptq")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "work" / "peers")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peers.json")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    calib_text, eval_text = AUSTEN / "emma.txt", AUSTEN / "prideprejudice.txt"

    run(["bash", str(HERE / "setup_peers.sh")])
    run([str(VENVS / "llmcompressor" / "bin" / "python"), str(HERE / "prepare_inputs.py"), "--out", str(a.work),
         "--calib-text", str(calib_text), "--calib-blocks", a.nsamples, "--calib-len", a.calib_len,
         "--eval-text", str(eval_text), "--eval-windows", a.windows, "--eval-len", a.eval_len])
    calib = quant("calibrate", "--dataset", str(calib_text), "--nsamples", a.nsamples, "--seqlen", a.calib_len,
                  "-o", str(a.work / "calib"), "--force", "-q")
    from safetensors.torch import load_file

    ours = load_file(str(Path(calib) / "calib.safetensors"))["input_ids"]
    if not torch.equal(ours, torch.load(a.work / "calib.pt")):
        raise SystemExit("quant calibrate and prepare_inputs.py disagree on the calibration tokens")

    spec = ["--wbits", a.wbits, "--group", a.group, "--asym"]
    evaluate = ["--dataset", str(eval_text), "--seqlen", a.eval_len, "--max-windows", a.windows, "--json", "-q", "--device", "cpu"]
    rows = []
    for method in a.methods.split(","):
        started = time.time()
        artifact = quant(method, *spec, "--calib", calib, "-o", str(a.work / f"quantcli-{method}"), "--force", "-q", "--device", "cpu")
        seconds = time.time() - started
        ppl = json.loads(quant("eval-ppl", artifact, *evaluate))["ppl"]
        driver = json.loads((Path(artifact) / "manifest.json").read_text())["metrics"]["seconds"]
        rows.append({"tool": f"quantcli-{method}", "ppl": ppl, "quant_seconds": round(seconds, 1),
                     "notes": f"quant_seconds: the whole `quant {method}` process (Python start, model load, calibration "
                              f"capture, writing the artifact); the layer-by-layer algorithm itself took {driver:.1f} s"})
        venv, tool = PEERS[method]
        result = a.work / f"{tool}.json"
        run([str(VENVS / venv / "bin" / "python"), str(HERE / "run_peer.py"), "--tool", tool,
             "--model", str(a.work / "smollm2-135m-fp32"), "--calib", str(a.work / "calib.pt"), "--eval", str(a.work / "eval.pt"),
             "--wbits", a.wbits, "--group", a.group, "--asym", "--out", str(result)])
        peer = json.loads(result.read_text())
        rows.append({"tool": tool, "version": peer["version"], "ppl": peer["ppl"], "quant_seconds": peer["quant_seconds"], "notes": peer.get("notes")})
        for r in rows[-2:]:
            print(f"{r['tool']:>20}  ppl {r['ppl']:8.3f}  {r['quant_seconds']:7.1f}s", file=sys.stderr, flush=True)
    fp = json.loads(quant("eval-ppl", *evaluate))["ppl"]
    out = {"wbits": a.wbits, "group": a.group, "calibration": f"{a.nsamples}x{a.calib_len} tokens of emma.txt (seed 0)",
           "evaluation": f"first {a.windows}x{a.eval_len} windows of prideprejudice.txt", "fp_ppl": fp, "rows": rows}
    a.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
