"""Weight-activation quantization on the real model: every method at W8A8, W6A6, W4A8 and W4A4,
without and with a quantized KV cache, plus the seed's W4A16 comparison (smooth + OmniQuant vs
OmniQuant vs AWQ + OmniQuant). Perplexity and wall time per row, through the documented CLI.

    python benchmarks/wa_table.py [--specs w8a8g-1,w6a6g-1,w4a8g-1,w4a4g-1] [--kv off,on]
        [--methods rtn,smooth+rtn,smooth+gptq,awq,omniquant,smooth+omniquant,awq+omniquant]
        [--w4a16 w4g64] [--w4a16-methods awq,omniquant,smooth+omniquant,awq+omniquant]
        [--epochs 2] [--nsamples 4] [--calib-seqlen 256] [--windows 16] [--collect]

A method ``a+b`` runs stage ``a`` and feeds its artifact to ``b`` (``quant b A/ --init-from A/``
for OmniQuant, so LET starts from the parent's scales). SmoothQuant uses ``--alpha 0.5``.
``--kv on`` adds ``--kv-bits 8`` to A8/A6 specs and ``--kv-bits 4`` to A4 (the OmniQuant paper's
W4A4 protocol quantizes the KV cache with the activations). Every stage gets the same
calibration tokens; every artifact is evaluated on the same windows. Activations are per-token
dynamic, asymmetric; weights per output channel (``g-1``) in the W-A rows.

Each finished row is written to ``WORK/rows/`` at once, so an interrupted run, or several
processes given disjoint ``--specs``, resume and share; ``--collect`` (also run at the end)
gathers the rows into ``--out`` and prints the table. On a shared machine run each process with
``OMP_NUM_THREADS=1`` (recorded per row); ``quant_seconds`` is the wall time of the whole ``quant``
processes of a row, ``quant_cpu_seconds`` their CPU time (not inflated by other jobs; a prefix an
earlier row made counts in the wall time only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from _quant import add_protocol_args, rel, timed_quant
from ppl_table import parse_spec

METHODS = "rtn,smooth+rtn,smooth+gptq,awq,omniquant,smooth+omniquant,awq+omniquant"


def kv_bits(label: str) -> int:
    """The KV-cache width that goes with a W-A spec: 4 with 4-bit activations, else 8."""
    abits = int(label.split("a")[1].split("g")[0]) if "a" in label else 16
    return 4 if abits <= 4 else 8


def row_key(method: str, label: str, kv: int) -> str:
    return f"{method.replace('+', '-')}-{label}-kv{kv}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap, "wa_table", nsamples=4, calib_seqlen=256)
    ap.add_argument("--specs", default="w8a8g-1,w6a6g-1,w4a8g-1,w4a4g-1")
    ap.add_argument("--kv", default="off,on", help="off, on, or both (comma-separated)")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--w4a16", default="w4g64", help="weight-only spec of the W4A16 comparison ('' to skip)")
    ap.add_argument("--w4a16-methods", default="awq,omniquant,smooth+omniquant,awq+omniquant")
    ap.add_argument("--epochs", type=int, default=2, help="OmniQuant epochs, alone and after a parent")
    ap.add_argument("--alpha", default="0.5", help="SmoothQuant strength")
    ap.add_argument("--collect", action="store_true", help="only gather the finished rows into --out")
    ap.add_argument("--markdown", action="store_true", help="print the table from --out as Markdown (perplexity; CPU seconds) and exit")
    args = ap.parse_args()

    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())["rows"]))
        return
    work = Path(args.work)
    rows_dir = work / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    model = [args.model] if args.model else []
    calib = work / "calib"
    calib_cmd = ["calibrate", *model, "--dataset", rel(args.calib_text), "--nsamples", str(args.nsamples),
                 "--seqlen", str(args.calib_seqlen), "-o", rel(calib), "-q"]
    evaluate = ["--dataset", rel(args.eval_text), "--seqlen", str(args.seqlen), "--max-windows", str(args.windows), "--json", "-q"]
    header = {
        "model": args.model or "default:SmolLM2-135M-Instruct.Q4_1.gguf",
        "calibration": {"text": rel(args.calib_text), "nsamples": args.nsamples, "seqlen": args.calib_seqlen, "command": "quant " + " ".join(calib_cmd)},
        "evaluation": {"text": rel(args.eval_text), "seqlen": args.seqlen, "windows": args.windows},
        "omniquant_epochs": args.epochs,
        "smooth_alpha": args.alpha,
        "activations": "per-token dynamic asymmetric linear inputs; KV cache (keys after RoPE, values) per head and token, "
                       "asymmetric, when kv_bits < 16; W-A weights per output channel",
    }
    if not args.collect:
        if not (calib / "manifest.json").is_file():
            timed_quant(*calib_cmd)
        plan = [(m, label, kv) for label in args.specs.split(",") if label for kv_mode in args.kv.split(",")
                for m in ["fp", *args.methods.split(",")] for kv in [kv_bits(label) if kv_mode == "on" else 16]]
        if args.w4a16:
            plan += [(m, args.w4a16, 16) for m in args.w4a16_methods.split(",")]
        for method, label, kv in plan:
            run_row(method, label, kv, model, calib, evaluate, args, rows_dir)
    collect(header, rows_dir, Path(args.out))


def run_row(method: str, label: str, kv: int, model: list[str], calib: Path, evaluate: list[str], args, rows_dir: Path) -> None:
    """Run one (method, spec, KV width) row unless its file exists; write it when done."""
    if method == "fp":  # the unquantized model, once (its KV cache is not quantized)
        if label != args.specs.split(",")[0] or kv != 16:
            return
        label = "-"
    path = rows_dir / f"{row_key(method, label, kv)}.json"
    if path.is_file():
        return
    flags = [] if method == "fp" else parse_spec(label) + (["--kv-bits", str(kv)] if kv < 16 else [])
    work = rows_dir.parent / "artifacts"
    source, seconds, commands = model, 0.0, []
    cpu_start = _children_cpu()
    for i, stage in enumerate(method.split("+") if method != "fp" else []):
        out = work / row_key("+".join(method.split("+")[: i + 1]), label, kv)
        extra = ["--calib", rel(calib)]
        if stage == "smooth":
            extra += ["--alpha", args.alpha]
        if stage == "omniquant":
            extra += ["--epochs", str(args.epochs)] + (["--init-from", source[0]] if i > 0 else [])
        cmd = [stage, *source, *flags, *extra, "-o", rel(out), "--force", "-q"]
        if (out / "manifest.json").is_file() and i < len(method.split("+")) - 1:  # a shared prefix an earlier row made
            seconds += json.loads((out / "manifest.json").read_text())["metrics"].get("seconds", 0.0)
        else:
            seconds += timed_quant(*cmd)[1]
        commands.append("quant " + " ".join(cmd))
        source = [rel(out)]
    cpu = _children_cpu() - cpu_start
    eval_cmd = ["eval-ppl", *source, *evaluate]
    result, eval_s = timed_quant(*eval_cmd)
    commands.append("quant " + " ".join(eval_cmd))
    ppl = json.loads(result)["ppl"]
    row = {"method": method, "spec": label, "kv_bits": kv, "ppl": ppl, "quant_seconds": round(seconds, 1), "quant_cpu_seconds": round(cpu, 1),
           "eval_seconds": round(eval_s, 1), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "load_avg_end": os.getloadavg()[0], "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "commands": commands}
    path.write_text(json.dumps(row, indent=2) + "\n")
    print(f"{method:>18} {label:>8} kv{kv:<2} ppl {ppl:9.3f}  quant {seconds:6.0f} s", file=sys.stderr, flush=True)


def markdown(rows: list[dict]) -> str:
    """Markdown: method × (W-A spec, KV width) perplexities with each method's median wall seconds
    over its rows (the whole chain, a reused prefix counted by its recorded time), and the W4A16
    comparison."""
    def label(spec: str, kv: int) -> str:
        return spec.split("g")[0].upper() + (f" kv{kv}" if kv < 16 else "")

    wa = [r for r in rows if "a" in r["spec"].split("g")[0]]
    cols = sorted({(r["spec"], r["kv_bits"]) for r in wa}, key=lambda c: (-int(c[0][1]), -int(c[0].split("a")[1].split("g")[0]), -c[1]))
    cells = {(r["method"], r["spec"], r["kv_bits"]): r for r in wa}
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    lines = [f"fp: {fp:.2f}" if fp else "", "", "| method | " + " | ".join(label(*c) for c in cols) + " | median s |",
             "|---|" + "---|" * (len(cols) + 1)]
    for method in METHODS.split(","):
        row = [cells.get((method, *c)) for c in cols]
        done = sorted(r["quant_seconds"] for r in row if r)
        if done:
            lines.append(f"| {method.replace('+', ' → ')} | " + " | ".join(f"{r['ppl']:.2f}" if r else "–" for r in row)
                         + f" | {done[len(done) // 2]:.0f} |")
    w4 = [r for r in rows if r["spec"] != "-" and "a" not in r["spec"].split("g")[0]]
    if w4:
        lines += ["", f"| W4A16 ({w4[0]['spec']}) | ppl | s |", "|---|---|---|"]
        lines += [f"| {r['method'].replace('+', ' → ')} | {r['ppl']:.2f} | {r['quant_seconds']:.0f} |" for r in w4]
    return "\n".join(lines)


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (the ``quant`` runs): unlike wall
    time, not inflated when other jobs share the machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def collect(header: dict, rows_dir: Path, out: Path) -> None:
    """Gather every finished row into ``out`` (sorted by spec, KV width, method) and print the table."""
    order = {m: i for i, m in enumerate(["fp", *METHODS.split(",")])}
    rows = [json.loads(p.read_text()) for p in rows_dir.glob("*.json")]
    rows.sort(key=lambda r: (r["spec"] != "-", "a" not in r["spec"], r["spec"], r["kv_bits"], order.get(r["method"], 99)))
    out.write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    print(f"{'method':>18} {'spec':>8} {'kv':>3} {'ppl':>9} {'quant s':>8}")
    for r in rows:
        print(f"{r['method']:>18} {r['spec']:>8} {r['kv_bits']:>3} {r['ppl']:9.3f} {r['quant_seconds']:8.1f}")
    print(f"wrote {rel(out)} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
