"""Packed checkpoints on the real model: perplexity equal to the artifact's, size on disk against fp16.

    python benchmarks/pack_check.py ARTIFACT [--formats compressed-tensors,autoawq,gptq]

Packs ARTIFACT (a w4 artifact, e.g. benchmarks/results/work/awq-w4g64) into each format, evaluates
the artifact and every packed directory on the same windows, and writes JSON.
"""

from __future__ import annotations

import argparse
import math
import json
from pathlib import Path

from safetensors import safe_open

from _quant import quant, rel

ROOT = Path(__file__).resolve().parent.parent
AUSTEN = ROOT.parent / "shared" / "data" / "austen"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--formats", default="compressed-tensors,autoawq,gptq")
    ap.add_argument("--eval-text", default=str(AUSTEN / "prideprejudice.txt"))
    ap.add_argument("--seqlen", default="512")
    ap.add_argument("--windows", default="20")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pack_check.json"))
    args = ap.parse_args()

    evaluate = ["--dataset", args.eval_text, "--seqlen", args.seqlen, "--max-windows", args.windows, "--json", "-q", "--device", "cpu"]
    reference = json.loads(quant("eval-ppl", args.artifact, *evaluate))["ppl"]
    manifest = json.loads((Path(args.artifact) / "manifest.json").read_text())
    config = json.loads((Path(manifest["base_model"]["ref"]) / "config.json").read_text())
    rows = []
    for fmt in args.formats.split(","):
        out = Path(args.artifact).parent / f"packed-{fmt}"
        quant("pack", args.artifact, "--format", fmt, "-o", str(out), "--force", "-q")
        ppl = json.loads(quant("eval-ppl", str(out), *evaluate))["ppl"]
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        rows.append({"format": fmt, "ppl": ppl, "artifact_ppl": reference, "rel_diff": abs(ppl - reference) / reference,
                     "bytes": size})
    base = Path(manifest["base_model"]["ref"])
    params = 0
    for file in base.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            params += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    fp16_bytes = 2 * params
    for r in rows:
        r["vs_fp16"] = r["bytes"] / fp16_bytes
    result = {"artifact": rel(args.artifact), "spec": manifest["spec"], "fp16_bytes": fp16_bytes, "tie_word_embeddings": config.get("tie_word_embeddings"), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"artifact ppl {reference:.4f}; fp16 {fp16_bytes / 2**20:.1f} MiB")
    print(f"{'format':>20} {'ppl':>9} {'rel diff':>9} {'MiB':>7} {'vs fp16':>8}")
    for r in rows:
        print(f"{r['format']:>20} {r['ppl']:9.4f} {r['rel_diff']:9.2e} {r['bytes'] / 2**20:7.1f} {r['vs_fp16']:8.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
