"""Does GPTQ's ``--capture-dtype auto`` (bfloat16 capture forwards where the device runs bf16 fast)
keep its perplexity? Measured against the noise floor of GPTQ itself.

GPTQ with act order is sensitive to the floating-point summation order of its Hessians: the same
run with another mini-batch size moves perplexity by itself. So each spec is run three times on
the same calibration tokens and windows (through ``benchmarks/ppl_table.py``, the documented CLI):

* ``float32``          the default;
* ``float32-batch4``   the default with ``--batch-size 4``: only the summation order changes (the noise floor);
* ``auto``             ``--capture-dtype auto``.

The verdict per spec: ``auto`` is within the noise when ``|auto − float32| ≤ max(|batch4 − float32|, 0.5 %)``.

    python benchmarks/gptq_capture.py [--specs w4g64,w3g64] [--nsamples 8] [--calib-seqlen 256] [--windows 16]

Writes benchmarks/results/gptq_capture.json and prints a table. Run with ``OMP_NUM_THREADS=1`` on
a shared machine (recorded); the seconds are whole ``quant gptq`` processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _quant import ROOT, rel

VARIANTS = {"float32": "", "float32-batch4": "--batch-size 4", "auto": "--capture-dtype auto"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", default="w4g64,w3g64")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "work" / "gptq_capture"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gptq_capture.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name, extra in VARIANTS.items():
        part = work / f"{name}.json"
        if not part.is_file():  # a finished variant is kept: rerun the script to resume
            cmd = [sys.executable, str(ROOT / "benchmarks" / "ppl_table.py"), "--methods", "gptq", "--specs", args.specs,
                   "--nsamples", str(args.nsamples), "--calib-seqlen", str(args.calib_seqlen), "--windows", str(args.windows),
                   "--work", str(work / name), "--out", str(part), f"--gptq-args={extra}"]
            subprocess.run(cmd, check=True, cwd=ROOT)
        runs[name] = {r["spec"]: r for r in json.loads(part.read_text())["rows"]}
    rows = []
    for spec in args.specs.split(","):
        ppl = {name: runs[name][spec]["ppl"] for name in VARIANTS}
        noise = abs(ppl["float32-batch4"] / ppl["float32"] - 1)
        change = abs(ppl["auto"] / ppl["float32"] - 1)
        rows.append({
            "spec": spec, "ppl": ppl, "quant_seconds": {name: runs[name][spec]["quant_seconds"] for name in VARIANTS},
            "auto_change": round(change, 5), "noise_floor": round(noise, 5), "auto_within_noise": change <= max(noise, 0.005),
        })
    result = {
        "question": "does GPTQ --capture-dtype auto keep perplexity within GPTQ's own summation-order noise (or 0.5 %)?",
        "protocol": json.loads((work / "float32.json").read_text())["calibration"] | {"windows": args.windows},
        "commands": {name: f"python benchmarks/ppl_table.py --methods gptq --specs {args.specs} --nsamples {args.nsamples} "
                           f"--calib-seqlen {args.calib_seqlen} --windows {args.windows} --gptq-args='{extra}'" for name, extra in VARIANTS.items()},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'spec':>7} {'float32':>9} {'batch4':>9} {'auto':>9} {'noise':>7} {'change':>7}  within")
    for r in rows:
        p = r["ppl"]
        print(f"{r['spec']:>7} {p['float32']:9.3f} {p['float32-batch4']:9.3f} {p['auto']:9.3f} "
              f"{100 * r['noise_floor']:6.2f}% {100 * r['auto_change']:6.2f}%  {r['auto_within_noise']}")
    print(f"wrote {rel(args.out)}")


if __name__ == "__main__":
    main()
