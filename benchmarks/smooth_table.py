"""SmoothQuant on the real model: perplexity and wall time of FP, RTN and SmoothQuant → RTN.

Calibrates once (the same tokens for every stage), runs each method at each weight-activation
spec through the documented CLI, evaluates every artifact on the same windows, prints a table
and writes JSON.

    python benchmarks/smooth_table.py --specs w8a8g-1,w4a8g-1 --methods fp,rtn,smooth0.5+rtn,smoothauto+rtn

Defaults: the embedded SmolLM2-135M, calibration on emma.txt (16 × 512 tokens), evaluation on
the first 16 512-token windows of prideprejudice.txt. Activations are per-token dynamic,
asymmetric; weights per output channel (g-1) unless the spec says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _quant import rel, timed_quant
from ppl_table import AUSTEN, ROOT, parse_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M)")
    ap.add_argument("--methods", default="fp,rtn,smooth0.5+rtn,smoothauto+rtn")
    ap.add_argument("--specs", default="w8a8g-1,w4a8g-1")
    ap.add_argument("--calib-text", default=str(AUSTEN / "emma.txt"))
    ap.add_argument("--eval-text", default=str(AUSTEN / "prideprejudice.txt"))
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "work" / "smooth"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "smooth_table.json"))
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out and measure only the missing ones")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = [args.model] if args.model else []
    if not (args.resume and (work / "calib" / "manifest.json").is_file()):
        timed_quant("calibrate", *model, "--dataset", args.calib_text, "--nsamples", str(args.nsamples),
                    "--seqlen", str(args.seqlen), "-o", str(work / "calib"), "--force", "-q")

    def ppl(target: list[str]) -> float:
        out, _ = timed_quant("eval-ppl", *target, "--dataset", args.eval_text, "--seqlen", str(args.seqlen),
                             "--max-windows", str(args.windows), "--json", "-q")
        return json.loads(out)["ppl"]

    rows: list[dict] = []
    out_path = Path(args.out)
    if args.resume and out_path.is_file():  # keep the rows an earlier run of the same protocol measured
        rows = json.loads(out_path.read_text())["rows"]
    done = {(r["method"], r["spec"]) for r in rows}
    result = {
        "model": args.model or "default:SmolLM2-135M-Instruct.Q4_1.gguf",
        "calibration": {"text": rel(args.calib_text), "nsamples": args.nsamples, "seqlen": args.seqlen},
        "evaluation": {"text": rel(args.eval_text), "seqlen": args.seqlen, "windows": args.windows},
        "activations": "per-token dynamic, asymmetric; weights RTN",
        "rows": rows,
    }

    def save() -> None:  # after every row, so an interrupted run keeps what it measured
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for method in args.methods.split(","):
        for label in (["-"] if method == "fp" else args.specs.split(",")):
            if (method, label) in done:
                continue
            if method == "fp":
                rows.append({"method": "fp", "spec": "-", "ppl": ppl(model), "seconds": 0.0})
                print(f"{'fp':>16} {'-':>10} ppl {rows[-1]['ppl']:.3f}", file=sys.stderr)
                save()
                break
            flags = parse_spec(label)
            source, seconds, alphas = model, 0.0, None
            if method.startswith("smooth"):
                alpha = method.split("+")[0][len("smooth"):]
                out = work / f"smooth{alpha}-{label}"
                manifest_file = out / "manifest.json"
                if args.resume and manifest_file.is_file():  # made by an interrupted run: reuse, time from its manifest
                    seconds += json.loads(manifest_file.read_text())["metrics"]["seconds"]
                else:
                    seconds += timed_quant("smooth", *source, "--alpha", alpha, *flags, "--calib", str(work / "calib"),
                                           "-o", str(out), "--force", "-q")[1]
                source = [str(out)]
                manifest = json.loads((out / "manifest.json").read_text())
                alphas = [layer["alpha"] for layer in manifest["metrics"]["layers"]]
            out = work / f"{method}-{label}"
            _, s = timed_quant("rtn", *source, *flags, "--calib", str(work / "calib"), "-o", str(out), "--force", "-q")
            seconds += s
            row = {"method": method, "spec": label, "ppl": ppl([str(out)]), "seconds": round(seconds, 1)}
            if alphas is not None:
                row["alphas"] = alphas
            rows.append(row)
            print(f"{method:>16} {label:>10} ppl {row['ppl']:.3f} ({row['seconds']:.0f} s)", file=sys.stderr)
            save()

    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
