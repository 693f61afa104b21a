"""What OmniQuant's q·kᵀ scale gains with a quantized KV cache, on the real model.

For each weight-activation spec and KV-cache width, OmniQuant (LWC + LET) is run twice on the same
calibration tokens, with ``--no-qk-scale`` and ``--qk-scale``, through the documented CLI; every
artifact is evaluated on the same windows (its activations and KV cache fake-quantized as the spec
says). Prints a table and writes JSON with the exact commands.

    python benchmarks/omniquant_qk.py --specs w4a4g-1,w4a8g-1 --kv 4,8 --epochs 2

Defaults: the embedded SmolLM2-135M; calibration on emma.txt (4 × 256 tokens, 2 epochs: a run
takes minutes); evaluation on the first 16 512-token windows of prideprejudice.txt. On a shared
machine run it with ``OMP_NUM_THREADS=1`` (recorded), one process per ``--kv`` value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from _quant import add_protocol_args, rel, timed_quant
from ppl_table import parse_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap, "omniquant_qk", nsamples=4, calib_seqlen=256)
    ap.add_argument("--specs", default="w4a4g-1,w4a8g-1")
    ap.add_argument("--kv", default="4,8", help="KV-cache bits, comma-separated")
    ap.add_argument("--qk", default="off,on", help="q·kᵀ scale settings to run: off, on (stats init), ones (on, s = 1 start)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out and measure only the missing ones")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = [args.model] if args.model else []
    calib = work / "calib"
    calib_cmd = ["calibrate", *model, "--dataset", rel(args.calib_text), "--nsamples", str(args.nsamples),
                 "--seqlen", str(args.calib_seqlen), "-o", rel(calib), "--force", "-q"]
    if not (args.resume and (calib / "manifest.json").is_file()):
        timed_quant(*calib_cmd)

    out_path = Path(args.out)
    rows: list[dict] = json.loads(out_path.read_text())["rows"] if args.resume and out_path.is_file() else []
    done = {(r["spec"], r["kv_bits"], r["qk"]) for r in rows}
    result = {
        "model": args.model or "default:SmolLM2-135M-Instruct.Q4_1.gguf",
        "calibration": {"text": rel(args.calib_text), "nsamples": args.nsamples, "seqlen": args.calib_seqlen, "command": "quant " + " ".join(calib_cmd)},
        "evaluation": {"text": rel(args.eval_text), "seqlen": args.seqlen, "windows": args.windows},
        "omniquant": {"epochs": args.epochs, "lwc": True, "let": True, "init": "paper (LWC a=4, LET SmoothQuant α=0.5)"},
        "activations": "per-token dynamic asymmetric linear inputs; keys (after RoPE) and values per head and token, asymmetric; weights per output channel",
        "script": "python benchmarks/omniquant_qk.py " + " ".join(sys.argv[1:]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rows": rows,
    }

    def save() -> None:
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    qk_flags = {"off": ["--no-qk-scale"], "on": ["--qk-scale", "--qk-init", "stats"], "ones": ["--qk-scale", "--qk-init", "ones"]}
    for kv in args.kv.split(","):
        for label in args.specs.split(","):
            for qk in args.qk.split(","):
                if (label, int(kv), qk) in done:
                    continue
                out = work / f"omni-{label}-kv{kv}-qk{qk}"
                cmd = ["omniquant", *model, *parse_spec(label), "--kv-bits", kv, "--epochs", str(args.epochs), *qk_flags[qk],
                       "--calib", rel(calib), "-o", rel(out), "--force", "-q"]
                _, seconds = timed_quant(*cmd)
                eval_cmd = ["eval-ppl", rel(out), "--dataset", rel(args.eval_text), "--seqlen", str(args.seqlen),
                            "--max-windows", str(args.windows), "--json", "-q"]
                ppl = json.loads(timed_quant(*eval_cmd)[0])["ppl"]
                manifest = json.loads((out / "manifest.json").read_text())
                layers = manifest["metrics"]["layers"]
                rows.append({
                    "spec": label, "kv_bits": int(kv), "qk": qk, "ppl": ppl, "seconds": round(seconds, 1),
                    "mean_layer_loss_end": sum(m["loss_end"] for m in layers) / len(layers),
                    "reverted_layers": sum(bool(m.get("reverted")) for m in layers),
                    "commands": ["quant " + " ".join(cmd), "quant " + " ".join(eval_cmd)],
                })
                print(f"{label:>10} kv{kv} qk {qk:>4}: ppl {ppl:.3f} ({seconds:.0f} s)", file=sys.stderr)
                save()
    save()
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
