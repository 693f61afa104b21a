"""Perplexity and wall time of every stage on the real model, through the documented CLI.

Calibrates once (same tokens for every method), runs each method at each weight spec, evaluates
every artifact on the same windows, prints a table and writes JSON.

    python benchmarks/ppl_table.py --methods fp,rtn,awq,gptq,awq+gptq --specs w4g64,w3g64
    python benchmarks/ppl_table.py --methods fp,rtn,awq,omniquant,awq+omniquant \
        --specs w4g64,w3g64,w2g32,w6a6g-1,w4a4g-1 --omni-epochs 20 --omni-init-epochs 5

Defaults: the embedded SmolLM2-135M, calibration on emma.txt, evaluation on prideprejudice.txt
(512-token windows, the first 40), as ../shared/DATA.md suggests. Each stage's seconds are the
wall time of its `quant` process (model load included).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from _quant import rel, timed_quant

ROOT = Path(__file__).resolve().parent.parent
AUSTEN = ROOT.parent / "shared" / "data" / "austen"


def parse_spec(label: str) -> list[str]:
    """``w4g64`` → ``--wbits 4 --group 64``; ``w4a8g-1`` and ``s`` (symmetric) suffix understood."""
    m = re.fullmatch(r"w(\d)(?:a(\d+))?g(-?\d+)(s?)", label)
    if not m:
        raise SystemExit(f"bad spec {label!r}: use e.g. w4g64, w3g64, w6a6g-1")
    flags = ["--wbits", m[1], "--group", m[3]]
    if m[2]:
        flags += ["--abits", m[2]]
    if m[4]:
        flags.append("--sym")
    return flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M)")
    ap.add_argument("--methods", default="fp,rtn,awq,gptq,awq+gptq")
    ap.add_argument("--specs", default="w4g64,w3g64")
    ap.add_argument("--calib-text", default=str(AUSTEN / "emma.txt"))
    ap.add_argument("--eval-text", default=str(AUSTEN / "prideprejudice.txt"))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--omni-epochs", type=int, default=20, help="epochs of omniquant on its own (paper init)")
    ap.add_argument("--omni-init-epochs", type=int, default=5, help="epochs of omniquant after awq (--init-from)")
    ap.add_argument("--gptq-args", default="", help="extra options for every `quant gptq` stage, as one string: --gptq-args='--capture-dtype auto'")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "work"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ppl_table.json"))
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = [args.model] if args.model else []
    calib, calib_s = timed_quant("calibrate", *model, "--dataset", args.calib_text, "--nsamples", str(args.nsamples),
                           "--seqlen", str(args.calib_seqlen), "-o", str(work / "calib"), "--force", "-q")
    evaluate = ["--dataset", args.eval_text, "--seqlen", str(args.seqlen), "--max-windows", str(args.windows), "--json", "-q"]

    rows = []

    def record(method: str, spec: str, artifact: str | None, seconds: float) -> None:
        out, eval_s = timed_quant("eval-ppl", *([artifact] if artifact else model), *evaluate)
        result = json.loads(out)
        rows.append({"method": method, "spec": spec, "ppl": result["ppl"], "quant_seconds": round(seconds, 1),
                     "eval_seconds": round(eval_s, 1), "windows": result["windows"], "seqlen": result["seqlen"],
                     "tokens": result["tokens"], "artifact": rel(artifact)})
        print(f"{method:>12} {spec:>8}  ppl {result['ppl']:8.3f}  quant {seconds:7.1f}s", file=sys.stderr, flush=True)

    methods = args.methods.split(",")
    if "fp" in methods:
        record("fp", "-", None, 0.0)
    for spec in args.specs.split(","):
        flags = parse_spec(spec)
        done: dict[str, tuple[str, float]] = {}
        for method in [m for m in methods if m != "fp"]:
            out = str(work / f"{method.replace('+', '-')}-{spec}")
            stages = method.split("+")
            source, total = model, 0.0
            for i, stage in enumerate(stages):
                key = "+".join(stages[: i + 1])
                if key in done:
                    path, seconds = done[key]
                else:
                    extra = [] if stage == "rtn" else ["--calib", calib]
                    if stage == "omniquant":
                        extra += ["--epochs", str(args.omni_epochs if i == 0 else args.omni_init_epochs)]
                        if i > 0:
                            extra += ["--init-from", source[0]]
                    if stage == "gptq":
                        extra += shlex.split(args.gptq_args)
                    path, seconds = timed_quant(stage, *source, *flags, *extra, "-o", f"{out}.{i}" if i < len(stages) - 1 else out, "--force", "-q")
                    done[key] = (path, seconds)
                source, total = [path], total + seconds
            record(method, spec, source[0], total)

    table = {"command": " ".join(sys.argv[1:]), "model": args.model or "default (SmolLM2-135M)", "calibration": {"text": rel(args.calib_text), "nsamples": args.nsamples,
             "seqlen": args.calib_seqlen, "seconds": round(calib_s, 1)}, "omniquant_epochs": {"omniquant": args.omni_epochs,
             "awq+omniquant": args.omni_init_epochs}, "gptq_args": args.gptq_args, "evaluation": {"text": rel(args.eval_text), "seqlen": args.seqlen,
             "windows": args.windows}, "rows": rows}
    Path(args.out).write_text(json.dumps(table, indent=2))
    print(f"\n{'method':>12} {'spec':>8} {'ppl':>9} {'quant s':>8}")
    for r in rows:
        print(f"{r['method']:>12} {r['spec']:>8} {r['ppl']:9.3f} {r['quant_seconds']:8.1f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
