"""Decode tokens/s, time to first token and weight memory: fp32, bf16 and w4 (int4 kernel) on the real model.

    python benchmarks/speed.py [--artifact W4_ARTIFACT] [--prompt-lens 100,1000,2000,4000] [--gen 64]

Makes an RTN w4g64 artifact of the embedded SmolLM2-135M when none is given (kernel speed does not
depend on how the codes were found), then runs `quant bench` twice in separate processes — the w4
model against an fp32 baseline and against a bf16 baseline — and prints the ratio table.
Run it on a quiet machine: timings under load are meaningless.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _quant import quant

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--prompt-lens", default="100,1000,2000,4000")
    ap.add_argument("--gen", default="64")
    ap.add_argument("--reps", default="3")
    ap.add_argument("--threads", default=None, help="torch threads (default: bench's own default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed.json"))
    args = ap.parse_args()

    artifact = args.artifact
    if artifact is None:
        artifact = quant("rtn", "--w4", "--group", "64", "-o", str(ROOT / "benchmarks" / "results" / "work" / "rtn-w4g64"), "--force", "-q")
    common = ["--prompt-lens", args.prompt_lens, "--gen", args.gen, "--reps", args.reps, "--device", "cpu", "--json", "-q"]
    if args.threads:
        common += ["--threads", args.threads]
    runs = {}
    for baseline in ("fp32", "bf16"):
        runs[baseline] = json.loads(quant("bench", artifact, "--baseline", baseline, *common))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(runs, indent=2))
    print(json.dumps(runs, indent=2)[:6000])
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
