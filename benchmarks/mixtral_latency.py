"""The seed's Mixtral latency study, scaled to this machine: W4A16 (RTN w4g128) vs bf16 vs fp32.

    python benchmarks/mixtral_latency.py [--scale quarter|tiny] [--prompt-lens 100,1000,2000,4000]
                                         [--gen 16] [--reps 2] [--device cpu|cuda] [--sequential]
                                         [--out benchmarks/results/mixtral_latency.json]

The seed compared Mixtral-8x7B W4A16 on one 80 GB GPU with bf16 on two: time to first token and
per-token decode at prompts of 100/1000/2000/4000 tokens, and KV-cache capacity (16-token blocks,
the largest batch at 3000 tokens per request). This script builds a Mixtral-architecture model
with random weights in Mixtral-8x7B's proportions (8 experts, top-2, intermediate = 3.5 × hidden,
4 query heads per KV head, head_dim 128, vocab 32000), scaled down:

* ``quarter``: hidden 1024, intermediate 3584, 8 layers, 8 heads / 2 KV heads (width and depth ÷ 4,
  ~0.79 B parameters, 3.2 GB in fp32);
* ``tiny``: hidden 256, intermediate 896, 2 layers, 2 heads / 1 KV head (a smoke run).

It quantizes it with ``quant rtn --w4 --group 128`` and times the W4 model (experts grouped by
expert through the int4 kernel, router unquantized, fastest path per phase) and the unquantized
model in bf16 and fp32 in the same process: held at once and timed one repetition each in turn, so
the machine's load hits all three alike (``--sequential``: one model after another, one in memory at
a time). KV capacity in the seed's terms: one "device" holds
80/93.4 of the bf16 weights (Mixtral-8x7B is 93.4 GB in bf16 on an 80 GB GPU); the W4 model gets
one device, bf16 and fp32 get two. Writes the table, every linear's kernel and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _compare import compare, print_table, save_random_model, write_plot
from _quant import ROOT, quant, rel

from quantcli.bench.run import BenchParams

MIXTRAL_8X7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=32000)
SCALES = {
    "quarter": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2),
    "tiny": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
}
DEVICE_SHARE = 80 / 93.4  # an 80 GB GPU / Mixtral-8x7B's bf16 weights
SEED_BF16_GPUS, SEED_W4_GPUS = 2, 1


def mixtral_config(scale: str):
    from transformers import MixtralConfig

    config = MixtralConfig(
        **SCALES[scale], head_dim=128, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False,
    )
    config.architectures = ["MixtralForCausalLM"]
    return config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="quarter")
    ap.add_argument("--prompt-lens", default="100,1000,2000,4000")
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mixtral_latency.json"))
    ap.add_argument("--sequential", action="store_true", help="time one model after another instead of rep by rep in turn")
    args = ap.parse_args()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    work = ROOT / "benchmarks" / "results" / "work"
    config = mixtral_config(args.scale)
    log(f"building a random Mixtral ({args.scale}) in {rel(work)}")
    base, n_params = save_random_model(config, work / f"mixtral-{args.scale}")
    log("quant rtn --w4 --group 128")
    artifact = quant("rtn", str(base), "--w4", "--group", "128", "-o", str(work / f"mixtral-{args.scale}-w4g128"), "--force", "-q")

    device_bytes = int(DEVICE_SHARE * 2 * n_params)  # bf16 weights × 80/93.4
    budgets = {"quantized": SEED_W4_GPUS * device_bytes, "bf16": SEED_BF16_GPUS * device_bytes,
               "fp32": SEED_BF16_GPUS * device_bytes}
    params = BenchParams(
        prompt_lens=tuple(int(x) for x in args.prompt_lens.split(",")), gen=args.gen, reps=args.reps, warmup=1,
        device=args.device, threads=args.threads,
    )
    result = compare(artifact, params, ("bf16", "fp32"), budgets=budgets, log=log, interleave=not args.sequential)
    result["input"] = rel(artifact)
    result["model"] = {
        "architecture": "MixtralForCausalLM, random weights",
        "scale": args.scale,
        "config": {k: getattr(config, k) for k in (*SCALES[args.scale], "head_dim", "vocab_size", "num_local_experts", "num_experts_per_tok")},
        "mixtral_8x7b": MIXTRAL_8X7B,
        "parameters": n_params,
    }
    result["kv_capacity_terms"] = {
        "device_bytes": device_bytes,
        "why": f"one device = {DEVICE_SHARE:.3f} × bf16 weights (80 GB GPU / 93.4 GB Mixtral-8x7B bf16); "
               f"W4 on {SEED_W4_GPUS} device, bf16 and fp32 on {SEED_BF16_GPUS} (the seed's setup)",
        "rows": {
            name: {k: r["kv_cache"][k] for k in ("dtype", "memory_budget_bytes", "capacity_tokens", "blocks", "max_batch")}
            for name, r in {"w4": result, **result["baselines"]}.items()
        },
    }
    result["command"] = "python benchmarks/mixtral_latency.py " + " ".join(sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    write_plot(result, Path(args.out).with_suffix(".png"))
    print_table(result)
    for name, row in result["kv_capacity_terms"]["rows"].items():
        print(f"KV {name}: {row['blocks']:,} blocks of 16 tokens ({row['dtype']}) → max batch {row['max_batch']} at 3000 tokens")
    print(f"kernels: {result['kernels']['counts']}; moe: {result.get('moe')}")
    print(f"\nwrote {rel(args.out)}")


if __name__ == "__main__":
    main()
