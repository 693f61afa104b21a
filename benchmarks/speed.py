"""Time to first token and decode latency of the w4 model (fastest path per phase) against fp32 and
bf16 on SmolLM2-135M, in ONE process, with a profile of where the time goes.

    python benchmarks/speed.py [--artifact W4_ARTIFACT] [--random-weights] [--prompt-lens 100,1000,2000,4000]
                               [--gen 32] [--reps 2] [--threads N] [--out benchmarks/results/speed.json]

Makes an RTN w4g64 artifact of the embedded SmolLM2-135M when none is given (kernel speed does not
depend on how the codes were found). ``--random-weights`` builds the same architecture with random
weights instead (for a machine without the model package; latency is the same, the text is not).
Then the w4 model (quant bench's fastest paths: int4 kernel for decode, dequantize-per-call + dense
bf16 for prefill from a measured token count, attention / KV-cache dtype per prompt length) and the
unquantized model in fp32 and in bf16 are timed one after another, each profiled at the longest
prompt (attention vs matmuls vs dequantization vs the rest). The JSON records the machine, its load
before and after, every choice, and whether each target was met:

* w4 decode ≥ 2× fp32 and ≥ 1.2× bf16 at every prompt length;
* w4 TTFT ≤ bf16 TTFT at every prompt length.

Compare only numbers from one run: on a shared machine the load changes between runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _compare import compare, print_table, save_random_model, write_plot
from _quant import ROOT, quant, rel

from quantcli.bench.run import BenchParams

SMOLLM2 = dict(  # SmolLM2-135M (shared/DATA.md)
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
)
TARGETS = {"decode_vs_fp32": 2.0, "decode_vs_bf16": 1.2, "ttft_vs_bf16": 1.0}


def check_targets(result: dict) -> dict:
    """Per prompt length, the measured ratio and whether it meets :data:`TARGETS`."""
    out = {}
    fp32 = {r["prompt_len"]: r for r in result["ratios"]["fp32"]["per_prompt_len"]}
    bf16 = {r["prompt_len"]: r for r in result["ratios"]["bf16"]["per_prompt_len"]}
    for length in fp32:
        row = {
            "decode_vs_fp32": fp32[length].get("decode_speedup"),
            "decode_vs_bf16": bf16[length].get("decode_speedup"),
            "ttft_vs_bf16": bf16[length]["prefill_speedup"],
        }
        out[str(length)] = {k: {"ratio": round(v, 3), "target": TARGETS[k], "met": v >= TARGETS[k]} for k, v in row.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--random-weights", action="store_true", help="SmolLM2-135M's architecture with random weights")
    ap.add_argument("--prompt-lens", default="100,1000,2000,4000")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed.json"))
    args = ap.parse_args()

    work = ROOT / "benchmarks" / "results" / "work"
    artifact = args.artifact
    if artifact is None and args.random_weights:
        from transformers import LlamaConfig

        config = LlamaConfig(**SMOLLM2)
        config.architectures = ["LlamaForCausalLM"]
        base, _ = save_random_model(config, work / "smollm2-random")
        artifact = quant("rtn", str(base), "--w4", "--group", "64", "-o", str(work / "smollm2-random-w4g64"), "--force", "-q")
    elif artifact is None:
        artifact = quant("rtn", "--w4", "--group", "64", "-o", str(work / "rtn-w4g64"), "--force", "-q")
    params = BenchParams(
        prompt_lens=tuple(int(x) for x in args.prompt_lens.split(",")), gen=args.gen, reps=args.reps, warmup=1,
        device=args.device, threads=args.threads,
    )
    result = compare(artifact, params, ("fp32", "bf16"), log=lambda m: print(m, file=sys.stderr, flush=True))
    result["input"] = rel(artifact)
    result["weights"] = "random (SmolLM2-135M architecture)" if args.random_weights and args.artifact is None else "SmolLM2-135M"
    result["targets"] = check_targets(result)
    result["command"] = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    write_plot(result, Path(args.out).with_suffix(".png"))
    print_table(result)
    for length, row in result["targets"].items():
        missed = [f"{k} {v['ratio']:.2f} < {v['target']}" for k, v in row.items() if not v["met"]]
        print(f"targets @{length}: {'all met' if not missed else 'MISSED ' + ', '.join(missed)}")
    print(f"profile (ms) quantized: {result['profile']}")
    for name, base in result["baselines"].items():
        print(f"profile (ms) {name}: {base['profile']}")
    print(f"\nwrote {rel(args.out)}")


if __name__ == "__main__":
    main()
