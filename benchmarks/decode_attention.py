"""quantcli::decode_attention against SDPA on the real SmolLM2-135M: accuracy and speed.

    python benchmarks/decode_attention.py [--steps 16] [--prompt 1984] [--out benchmarks/results/decode_attention.json]

Accuracy: the bf16 model decodes ``--steps`` tokens of Austen's text teacher-forced over a static
cache after a ``--prompt``-token prefix, once with SDPA and once with the native kernel at every
decode step; each step's logits are compared with the fp32 model's (SDPA), and the next-token
negative log-likelihood of each is given. Speed: one decode step's attention over all 30 layers
(each layer its own cache, so it streams from memory, as in a model) at several cache lengths,
fastest of a few, both ways. The file records the load average around the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from _compare import machine
from _quant import ROOT, rel

from quantcli.bench import decode_attention as native_attention
from quantcli.bench import paths
from quantcli.bench.latency import _attention_geometry, cache_kwarg, fastest_ms, position_kwargs, prefill_static
from quantcli.models.load import load_base

AUSTEN = ROOT.parent / "shared" / "data" / "austen"


def teacher_forced_logits(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits ``[steps, vocab]`` (float32) of the last ``steps`` tokens of ``ids``, each fed as one
    decode step over a static cache holding everything before it."""
    length = ids.shape[1] - steps
    _, cache = prefill_static(model, ids[:, :length], ids.shape[1])
    out = []
    for i in range(steps):
        position = torch.tensor([length + i])
        logits = model(input_ids=ids[:, length + i:length + i + 1], use_cache=True, **position_kwargs(model, position),
                       **{cache_kwarg(model): cache}).logits[0, -1]
        out.append(logits.float())
    return torch.stack(out)


def accuracy(model_dir: Path, prompt: int, steps: int) -> dict:
    from transformers import AutoTokenizer

    fp32, _ = load_base(model_dir)
    fp32.eval()
    text = (AUSTEN / "emma.txt").read_text()[:40_000]
    ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt").input_ids[:, :prompt + steps]
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    assert paths.install_phase_attention(bf16) == ""
    with torch.inference_mode():
        reference = teacher_forced_logits(fp32, ids, steps)
        runs = {"bf16 sdpa": teacher_forced_logits(bf16, ids, steps)}
        for module in paths.attention_modules(bf16):
            setattr(module, paths.NATIVE_DECODE_ATTR, True)
        runs["bf16 quantcli::decode_attention"] = teacher_forced_logits(bf16, ids, steps)
    targets = ids[0, -steps + 1:]

    def nll(logits):
        return round(float(torch.nn.functional.cross_entropy(logits[:-1], targets)), 4)

    out = {"fp32 sdpa": {"nll": nll(reference)}}
    for name, logits in runs.items():
        err = (logits - reference).norm(dim=-1) / reference.norm(dim=-1)
        out[name] = {"rel_err_vs_fp32_mean": round(float(err.mean()), 5), "rel_err_vs_fp32_max": round(float(err.max()), 5),
                     "argmax_agrees_with_fp32": round(float((logits.argmax(-1) == reference.argmax(-1)).float().mean()), 4),
                     "nll": nll(logits)}
    return {"text": "emma.txt", "prompt_tokens": prompt, "decode_steps": steps, "per_run": out}


def speed(config, lengths: list[int], reps: int) -> dict:
    layers, heads, kv_heads, dim = _attention_geometry(config)
    gen = torch.Generator().manual_seed(0)
    out = {}
    with torch.inference_mode():
        for length in lengths:
            q = torch.randn(1, kv_heads, heads // kv_heads, dim, generator=gen).bfloat16()
            caches = [(torch.randn(1, kv_heads, length, dim, generator=gen).bfloat16(),
                       torch.randn(1, kv_heads, length, dim, generator=gen).bfloat16()) for _ in range(layers)]
            sdpa = lambda: [torch.nn.functional.scaled_dot_product_attention(q, k, v) for k, v in caches]  # noqa: E731
            native = lambda: [native_attention.decode_attention(q, k, v, None, dim**-0.5) for k, v in caches]  # noqa: E731
            row = {"sdpa_ms": round(fastest_ms(sdpa, reps), 3), "native_ms": round(fastest_ms(native, reps), 3)}
            row["cache_mb"] = round(layers * kv_heads * length * dim * 2 * 2 / 1e6, 1)
            row["native_gb_s"] = round(row["cache_mb"] / row["native_ms"], 1)
            row["sdpa_gb_s"] = round(row["cache_mb"] / row["sdpa_ms"], 1)
            out[str(length)] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=1984)
    ap.add_argument("--lengths", default="116,1016,2016,4016")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_attention.json"))
    args = ap.parse_args()
    why = native_attention.status()
    if why:
        raise SystemExit(f"quantcli::decode_attention does not run here: {why}")
    from quantcli.models.load import resolve_base_dir

    model_dir, _ = resolve_base_dir(None)  # the embedded SmolLM2-135M
    load_before, started = os.getloadavg(), time.time()
    result = {"model": "SmolLM2-135M", "accuracy": accuracy(model_dir, args.prompt, args.steps)}
    from transformers import AutoConfig

    result["speed_all_layers"] = speed(AutoConfig.from_pretrained(model_dir), [int(n) for n in args.lengths.split(",")], args.reps)
    result.update(threads=torch.get_num_threads(), loadavg={"before": list(load_before), "after": list(os.getloadavg())},
                  wall_s=round(time.time() - started, 1), machine=machine(),
                  command="python benchmarks/decode_attention.py " + " ".join(sys.argv[1:]))
    Path(args.out).write_text(json.dumps(result, indent=1))
    for name, row in result["accuracy"]["per_run"].items():
        print(f"{name:>32}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    for length, row in result["speed_all_layers"].items():
        print(f"cache {length:>5} tokens ({row['cache_mb']} MB): sdpa {row['sdpa_ms']} ms ({row['sdpa_gb_s']} GB/s), "
              f"native {row['native_ms']} ms ({row['native_gb_s']} GB/s)")
    print(f"wrote {rel(args.out)}")


if __name__ == "__main__":
    main()
