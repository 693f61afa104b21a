"""One SmolLM2-135M-shaped linear (576 → 1536 and 1536 → 576) through the W8A8 int8 GEMM vs fp32 and bf16.

    python benchmarks/w8a8_linear.py --out benchmarks/results/w8a8_linear.json

Times ``Int8DynamicLinear`` (per-token int8 activation quantization + ``torch._int_mm`` + rescale,
all inside the timed call) against ``nn.Linear`` in float32 and bfloat16 at 100/1000/2000/4000
tokens on the CPU (median of ``--reps``, ``--threads`` torch threads). A proxy for ``quant bench`` prefill, which times the
whole model; the machine's other load is recorded as the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from quantcli.bench.w8a8 import Int8DynamicLinear
from quantcli.quant import QuantSpec, quantize_weight

ROOT = Path(__file__).resolve().parent.parent


def median_ms(fn, x, reps: int) -> float:
    fn(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="100,1000,2000,4000")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a loaded machine)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "w8a8_linear.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for k, n in ((576, 1536), (1536, 576)):
        linear = nn.Linear(k, n, bias=False)
        int8 = Int8DynamicLinear.from_quantized(quantize_weight(linear.weight.data, QuantSpec(8, -1, sym=True, abits=8)), None, torch.device("cpu"))
        bf16 = nn.Linear(k, n, bias=False).to(torch.bfloat16)
        for m in map(int, args.tokens.split(",")):
            x = torch.randn(m, k)
            row = {
                "in": k, "out": n, "tokens": m,
                "fp32_ms": median_ms(linear, x, args.reps),
                "bf16_ms": median_ms(bf16, x.bfloat16(), args.reps),
                "w8a8_int_mm_ms": median_ms(int8, x, args.reps),
            }
            row["speedup_vs_fp32"] = row["fp32_ms"] / row["w8a8_int_mm_ms"]
            rows.append(row)
            print(f"{k:>5}->{n:<5} M={m:<5} fp32 {row['fp32_ms']:8.2f} ms  bf16 {row['bf16_ms']:8.2f} ms  "
                  f"w8a8 {row['w8a8_int_mm_ms']:8.2f} ms  ({row['speedup_vs_fp32']:.2f}x vs fp32)")
    result = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
        "load_avg_1min": os.getloadavg()[0], "reps": args.reps, "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
