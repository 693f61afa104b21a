"""Does AWQ's default search match the float32 search? Scale agreement and perplexity on the real model.

For each calibration text and weight spec, runs ``quant awq`` once per ``--search-dtype`` (the
first is the reference, float32), evaluates each artifact on the same windows, and counts per
scaling group (every layer) whether the chosen scale equals the reference's. Calibration: 8 × 256
tokens, as ``ppl_table.py``'s benchmark; evaluation: ``prideprejudice.txt``, 16 × 512 windows.

    python benchmarks/awq_speed.py --search-dtypes float32,mixed --specs w4g64,w3g64
    python benchmarks/awq_speed.py --search-dtypes float32,float32-batch4 --specs w3g64  # the noise floor

``float32-batch4`` is the float32 search in mini-batches of 4 instead of 8: the same method with
another summation order, whose change against float32 is the search's own noise floor.

Texts: ``emma.txt`` (Austen) and, from outside Austen, the English text of Python's own
``pydoc_data.topics`` (the help topics shipped with CPython), written to the work directory.
Runs already in the work directory's ``runs.json`` are reused (``--rerun`` to redo them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _quant import rel, timed_quant

ROOT = Path(__file__).resolve().parent.parent
AUSTEN = ROOT.parent / "shared" / "data" / "austen"


def pydoc_text(path: Path) -> Path:
    """CPython's help-topic text (non-Austen English, available offline) as one file."""
    import pydoc_data.topics as topics

    if not path.exists():
        path.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)))
    return path


def scale_agreement(a: Path, b: Path) -> dict:
    """Per scaling group (all layers): how many chosen scale vectors are equal in artifacts a and b."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "awq.safetensors")), load_file(str(b / "awq.safetensors"))
    keys = sorted(k for k in ta if k.endswith(".scales"))
    same = sum(int(k in tb and ta[k].shape == tb[k].shape and bool((ta[k] == tb[k]).all())) for k in keys)
    return {"groups": len(keys), "same_scale": same, "fraction": round(same / max(len(keys), 1), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--search-dtypes", default="float32,mixed")
    ap.add_argument("--specs", default="w4g64,w3g64")
    ap.add_argument("--texts", default="emma,pydoc")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "work" / "awq_speed"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "awq_speed.json"))
    ap.add_argument("--rerun", action="store_true")
    ap.add_argument("--summary-only", action="store_true", help="write the JSON from the runs done so far, run nothing")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    texts = {"emma": AUSTEN / "emma.txt", "pydoc": pydoc_text(work / "pydoc_topics.txt")}
    eval_text = AUSTEN / "prideprejudice.txt"
    runs_file = work / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
    dtypes = args.search_dtypes.split(",")
    specs = {"w4g64": ["--wbits", "4", "--group", "64"], "w3g64": ["--wbits", "3", "--group", "64"]}
    evaluate = ["--dataset", str(eval_text), "--seqlen", str(args.seqlen), "--max-windows", str(args.windows), "--json", "-q"]

    for name in [] if args.summary_only else args.texts.split(","):
        calib = work / f"calib-{name}"
        if not (calib / "manifest.json").exists():
            timed_quant("calibrate", "--dataset", str(texts[name]), "--nsamples", str(args.nsamples),
                        "--seqlen", str(args.calib_seqlen), "-o", str(calib), "--force", "-q")
        for spec in args.specs.split(","):
            for dtype in dtypes:
                key = f"{name}/{spec}/{dtype}"
                if key in runs and not args.rerun:
                    continue
                out = work / f"awq-{name}-{spec}-{dtype}"
                search = dtype.split("-batch")  # e.g. float32-batch4: float32 in mini-batches of 4 (the noise floor)
                batch = ["--batch-size", search[1]] if len(search) > 1 else []
                cmd = ["awq", *specs[spec], "--calib", str(calib), "--search-dtype", search[0], *batch, "-o", str(out), "--force", "-q"]
                _, seconds = timed_quant(*cmd)
                result = json.loads(timed_quant("eval-ppl", str(out), *evaluate)[0])
                runs[key] = {"ppl": result["ppl"], "awq_seconds": round(seconds, 1), "artifact": rel(out),
                             "command": "quant " + " ".join(rel(c) if c.startswith("/") else c for c in cmd)}
                runs_file.write_text(json.dumps(runs, indent=2))
                print(f"{key:>28}  ppl {result['ppl']:8.3f}  awq {seconds:6.1f}s", file=sys.stderr, flush=True)

    ref = dtypes[0]
    rows = []
    for key, run in sorted(runs.items()):
        name, spec, dtype = key.split("/")
        row = {"calibration": name, "spec": spec, "search_dtype": dtype, **run}
        base = runs.get(f"{name}/{spec}/{ref}")
        if base and dtype != ref:
            row["ppl_change_vs_" + ref] = round(run["ppl"] / base["ppl"] - 1, 5)
            row["scale_agreement_vs_" + ref] = scale_agreement(ROOT / base["artifact"], ROOT / run["artifact"])
        rows.append(row)
    table = {"command": "python benchmarks/awq_speed.py " + " ".join(sys.argv[1:]), "model": "default (SmolLM2-135M)",
             "calibration": {"texts": {k: rel(v) if k != "pydoc" else "CPython pydoc_data.topics (help topics text)"
                                       for k, v in texts.items()}, "nsamples": args.nsamples, "seqlen": args.calib_seqlen},
             "evaluation": {"text": rel(eval_text), "seqlen": args.seqlen, "windows": args.windows}, "rows": rows}
    Path(args.out).write_text(json.dumps(table, indent=2))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
