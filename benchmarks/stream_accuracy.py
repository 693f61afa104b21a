"""Accuracy with streaming on vs off: the real model's perplexity after RTN, AWQ, GPTQ and OmniQuant.

Runs benchmarks/ppl_table.py twice on the same calibration tokens and evaluation windows: once
as users get it (layers streamed from the safetensors shards, ``QUANTCLI_STREAM=1``) and once with
the whole model loaded first (``QUANTCLI_STREAM=0``, the path before streaming), then prints both
and the relative change per method (issue 12: < 0.5 %).

    python benchmarks/stream_accuracy.py            # w4g64, 8 × 256 calibration, 16 × 512 windows

Writes benchmarks/results/stream_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="fp,rtn,awq,gptq,omniquant")
    ap.add_argument("--specs", default="w4g64")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--omni-epochs", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "stream_accuracy.json"))
    args = ap.parse_args()

    runs = {}
    for label, flag in (("streamed", "1"), ("whole_model", "0")):
        out = RESULTS / "work" / f"stream_accuracy_{label}.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "ppl_table.py"), "--methods", args.methods, "--specs", args.specs,
               "--nsamples", str(args.nsamples), "--calib-seqlen", str(args.calib_seqlen), "--windows", str(args.windows),
               "--omni-epochs", str(args.omni_epochs), "--work", str(RESULTS / "work" / f"stream_{label}"), "--out", str(out)]
        print(f"{label}: QUANTCLI_STREAM={flag} {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "QUANTCLI_STREAM": flag})
        runs[label] = json.loads(out.read_text())

    def rows(run: dict) -> dict[str, float]:
        return {f"{r['method']} {r['spec']}": r["ppl"] for r in run["rows"]}

    on, off = rows(runs["streamed"]), rows(runs["whole_model"])
    table = {key: {"streamed": on[key], "whole_model": off[key], "relative_change": (on[key] - off[key]) / off[key]} for key in on if key in off}
    result = {
        "protocol": {k: v for k, v in runs["streamed"].items() if k != "rows"},
        "rows": table,
        "max_abs_relative_change": max(abs(v["relative_change"]) for v in table.values()),
        "runs": {label: [{k: r.get(k) for k in ("method", "spec", "ppl", "quant_seconds")} for r in run["rows"]] for label, run in runs.items()},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'method':<22}{'streamed':>10}{'whole model':>13}{'change':>10}")
    for key, row in table.items():
        print(f"{key:<22}{row['streamed']:>10.3f}{row['whole_model']:>13.3f}{100 * row['relative_change']:>9.3f}%")


if __name__ == "__main__":
    main()
