"""Time to first token and decode latency of the w4 model (fastest path per phase) against fp32 and
bf16 on SmolLM2-135M, in ONE process, with a profile of where the time goes.

    python benchmarks/speed.py [--artifact W4_ARTIFACT] [--random-weights] [--prompt-lens 100,1000,2000,4000]
                               [--gen 32] [--reps 2] [--threads N] [--profile-steps 8]
                               [--out benchmarks/results/speed.json] [--plot FILE.png]
    python benchmarks/speed.py --micro [--threads 1] [--out benchmarks/results/speed_micro.json]
    python benchmarks/speed.py --explain [--out benchmarks/results/speed.json]

Makes an RTN w4g64 artifact of the embedded SmolLM2-135M when none is given (kernel speed does not
depend on how the codes were found). ``--random-weights`` builds the same architecture with random
weights instead (for a machine without the model package; latency is the same, the text is not).
Then the w4 model (quant bench's fastest paths: for decode the int4 kernel, ATen's or quantcli::int4_gemv,
whichever measured faster per weight shape; dequantize-per-call + dense
bf16 for prefill from a measured token count, attention / KV-cache dtype per prompt length) and the
unquantized model in fp32 and in bf16 are held at once and timed in turn, one repetition of each
model after the other (``--sequential``: one model after another), each profiled at every prompt
length with its own paths (linears vs attention vs dequantization vs the rest; a table per phase).
Decode is timed eagerly and through a compiled step (``quant bench --compile-decode``: torch.compile
over a static KV cache) for every model alike, and each uses its faster runtime per prompt length
(``--no-compile-decode``: eager only). The JSON records the machine, its load
before and after, every choice, and whether each target was met:

* w4 decode ≥ 2× fp32 and ≥ 1.2× bf16 at every prompt length;
* w4 TTFT ≤ bf16 TTFT at every prompt length.

For every missed target the JSON's ``why_missed`` gives the bound the profile sets: the time the
quantized model spends outside its quantized linears and their unpacking (attention, norms,
embeddings, Python), and the ratio it would reach were those linears free; for time to first token
also the ratio were they exactly as fast as the bf16 baseline's dense matmuls (a W4A16 GEMM does
the same bf16 multiply-adds), and the ratio a perfect int4 GEMM would reach, the baseline's time
less its reading of the weight bytes 4 bits do not store. ``--explain`` adds it to an existing JSON. With a weight-activation (W8A8) artifact the target is prefill faster than fp32.

Compare only numbers from one run: on a shared machine the load changes between runs.

``--micro`` times no whole model: per SmolLM2 linear shape (random w4g64 weights) the int4 kernel,
the dense path (fused unpack + bf16 matmul; the eager five-pass unpack next to it), inductor's
int4 GEMM (max-autotune with the weight frozen: its AMX weight-only template or the ATen kernel,
whichever it times faster; one compile per shape and row count), a bf16 and an fp32 linear at 1
row and at every prompt length, and attention per prompt length in bf16 and fp32;
then sums them over the model's 210 linears. Short calls, fastest of a few, by default one thread:
the figures that decisions rest on when the machine is too loaded for whole-model numbers. The
file records the load average around the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import os
import statistics
import time

import torch
from _compare import compare, machine, print_table, save_random_model, write_plot
from _quant import ROOT, quant, rel

from quantcli.bench.latency import fastest_ms
from quantcli.bench.run import BenchParams

SMOLLM2 = dict(  # SmolLM2-135M (shared/DATA.md)
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
)
TARGETS = {"decode_vs_fp32": 2.0, "decode_vs_bf16": 1.2, "ttft_vs_bf16": 1.0}  # a weight-only (w4) artifact: issue #15
TARGETS_WA = {"ttft_vs_fp32": 1.0}  # a weight-activation (W8A8) artifact: prefill faster than fp32 (issue #13)


def weight_only(result: dict) -> bool:
    """Whether the timed artifact quantizes weights only (W4A16 and the like), not activations."""
    return (result.get("spec") or {}).get("abits", 16) >= 16


def check_targets(result: dict, targets: dict[str, float]) -> dict:
    """Per prompt length, the measured ratio (of the models' median times) and whether it meets
    ``targets``; with per-rep times, also the paired per-rep ratios (rep ``i`` of each model, timed
    back to back when interleaved): their median, range and how many reps met the target, so a
    ratio whose reps fall on both sides of the target reads as the tie it is."""
    out = {}
    per_len = {name: {r["prompt_len"]: r for r in result["ratios"][name]["per_prompt_len"]} for name in ("fp32", "bf16")}
    for length in per_len["fp32"]:
        out[str(length)] = {}
        for key, target in targets.items():
            phase, base = key.split("_vs_")
            row = per_len[base][length]
            field = "prefill_speedup" if phase == "ttft" else "decode_speedup"
            ratio = row.get(field)
            check = {"ratio": round(ratio, 3), "target": target, "met": ratio >= target}
            reps = row.get(f"{field}_reps")
            if reps:
                check.update({
                    "paired_median": round(statistics.median(reps), 3), "paired_min": min(reps), "paired_max": max(reps),
                    "reps_met": f"{sum(r >= target for r in reps)}/{len(reps)}",
                })
            out[str(length)][key] = check
    return out


def explain_misses(result: dict) -> dict:
    """For every missed target, the bound the profiles set on it (same run): quantization changes
    only the quantized linears (their kernels, plus the dense-prefill unpacking), so the time the
    quantized model spends elsewhere (attention, norms, embeddings, Python) stays whatever the linears
    cost. ``bound`` is the ratio the target asks for, were the quantized linears and their unpacking
    free; below the target, no faster kernel reaches it on this machine with this eager runtime.

    For time to first token of a weight-only artifact also the bound physics sets on any W4A16
    kernel: it does the baseline's bf16 multiply-adds on the same matrix unit, so 4-bit weights can
    save only the time the baseline spends reading the weight bytes they do not store (at the
    bandwidth the baseline's linears reach in its decode steps of this run: an upper bound on the
    saving, as a prefill reads each weight once, from memory or cache). ``bound_if_baselines_time_minus_weight_reads`` is the baseline's
    time over that time minus the saving: the ratio a perfect int4 GEMM would reach."""
    models = {"w4": result["results"], **{n: b["results"] for n, b in result["baselines"].items()}}
    rows = {name: {r["prompt_len"]: r for r in rs} for name, rs in models.items()}
    out = {}
    for length, checks in result.get("targets", {}).items():
        for key, check in checks.items():
            if check["met"]:
                continue
            phase, base = key.split("_vs_")
            q, b = rows["w4"][int(length)], rows[base][int(length)]
            if "profile" not in q:
                continue
            prof = q["profile"]["prefill" if phase == "ttft" else "decode_per_step"]
            timed_q = q["prefill_ms"] if phase == "ttft" else q["decode_ms"]
            timed_b = b["prefill_ms"] if phase == "ttft" else b["decode_ms"]
            changed = (prof["matmul_ms"] + prof["dequantize_ms"]) / prof["wall_ms"]  # share quantization acts on
            rest_ms = timed_q * (1 - changed)
            bound = timed_b / rest_ms if rest_ms > 0 else float("inf")
            out.setdefault(length, {})[key] = {
                "ratio": check["ratio"], "target": check["target"], "bound_if_linears_free": round(bound, 3),
                "untouched_ms": round(rest_ms, 2), "linears_and_unpack_ms": round(timed_q - rest_ms, 2),
                "reachable_by_kernels": bound >= check["target"],
            }
            if "profile" not in b:
                continue
            # one decode token: the baseline's linears stream their weights from memory (SmolLM2 ties
            # lm_head, so every byte is read per step): the bandwidth they reach in this run
            base_decode = b["profile"]["decode_per_step"]
            base_bytes = result["baselines"][base]["weight_bytes"]
            gb_s = base_bytes / (b["decode_ms"] * base_decode["matmul_ms"] / base_decode["wall_ms"]) / 1e6
            if phase == "decode":
                ideal = result["weight_bytes"] / gb_s / 1e6
                out[length][key].update({
                    "baseline_linears_gb_s": round(gb_s, 1),
                    "quantized_linears_ms_at_that_bandwidth": round(ideal, 2),
                    "bound_if_linears_read_at_baselines_bandwidth": round(timed_b / (rest_ms + ideal), 3),
                })
            else:  # a W4A16 GEMM does the baseline's bf16 multiply-adds; 4-bit weights only save reading bytes
                base_prof = b["profile"]["prefill"]
                base_linears = timed_b * base_prof["matmul_ms"] / base_prof["wall_ms"]
                as_bf16 = timed_b / (rest_ms + base_linears)
                out[length][key].update({
                    "baseline_linears_ms": round(base_linears, 2),
                    "bound_if_linears_as_fast_as_baselines": round(as_bf16, 3),
                    "needs_int4_gemm_faster_than_dense": as_bf16 < check["target"],
                })
                if not weight_only(result):  # int8 activations change the multiply-adds: no such bound
                    continue
                saved = max(0.0, base_bytes - result["weight_bytes"]) / gb_s / 1e6
                perfect = timed_b / max(timed_b - saved, 1e-9)
                out[length][key].update({
                    "weight_read_saving_ms": round(saved, 2),
                    "bound_if_baselines_time_minus_weight_reads": round(perfect, 3),
                    "reachable_by_kernels": perfect >= check["target"],  # free linears are not a W4A16 kernel
                })
                if "paired_min" in check:  # the perfect kernel's margin over the target against this run's per-rep spread
                    spread = (check["paired_max"] - check["paired_min"]) / 2
                    out[length][key]["margin_within_rep_spread"] = perfect - check["target"] < spread
    return out


def print_misses(result: dict) -> None:
    for length, misses in result.get("why_missed", {}).items():
        for key, m in misses.items():
            if "weight_read_saving_ms" in m:  # TTFT: free linears are no W4A16 kernel; the perfect-GEMM bound decides
                verdict = "no W4A16 kernel can make them free: see the last line"
            else:
                verdict = "a faster kernel could reach it" if m["reachable_by_kernels"] else "out of the kernels' reach"
            print(f"missed @{length} {key} {m['ratio']:.2f} < {m['target']}: {m['untouched_ms']:.1f} ms outside the quantized "
                  f"linears; free linears would give {m['bound_if_linears_free']:.2f} ({verdict})")
            if "bound_if_linears_read_at_baselines_bandwidth" in m:
                print(f"    were the quantized linears to read their weights at the baseline's {m['baseline_linears_gb_s']:.1f} GB/s "
                      f"({m['quantized_linears_ms_at_that_bandwidth']:.1f} ms): {m['bound_if_linears_read_at_baselines_bandwidth']:.2f}")
            if "bound_if_linears_as_fast_as_baselines" in m:
                print(f"    with the w4 linears exactly as fast as the baseline's dense ones ({m['baseline_linears_ms']:.1f} ms): "
                      f"{m['bound_if_linears_as_fast_as_baselines']:.2f}"
                      + (": it needs an int4 GEMM faster than the dense bf16 one" if m["needs_int4_gemm_faster_than_dense"] else ""))
            if "weight_read_saving_ms" in m:
                print(f"    a W4A16 prefill does the baseline's bf16 multiply-adds; 4-bit weights save only reading "
                      f"{m['weight_read_saving_ms']:.1f} ms of bytes, so even a perfect int4 GEMM reaches "
                      f"{m['bound_if_baselines_time_minus_weight_reads']:.3f}"
                      + (" (out of any W4A16 kernel's reach)" if not m["reachable_by_kernels"]
                         else ", a margin inside this run's per-rep spread: a tie" if m.get("margin_within_rep_spread") else ""))


PHASES = ("wall_ms", "matmul_ms", "attention_ms", "dequantize_ms", "other_ms")


def profile_rows(result: dict) -> list[tuple[str, int, str, dict]]:
    """``(model, prompt_len, phase, split)`` for every profiled row of every model in ``result``."""
    models = {"w4": result["results"], **{n: b["results"] for n, b in result["baselines"].items()}}
    return [(name, r["prompt_len"], phase, r["profile"][phase])
            for name, rows in models.items() for r in rows if "profile" in r for phase in ("prefill", "decode_per_step")]


def print_profile(result: dict) -> None:
    """Where the time goes: ms per phase (prefill: one call; decode: per step) by model and prompt length."""
    rows = profile_rows(result)
    if not rows:
        return
    print(f"\n{'model':>5} {'prompt':>6} {'phase':>7} {'wall':>9} {'linears':>9} {'attention':>9} {'dequant':>9} {'other':>9}  (ms; op self time)")
    for name, length, phase, split in rows:
        cells = " ".join(f"{split[k]:>9.1f}" for k in PHASES)
        print(f"{name:>5} {length:>6} {phase.replace('_per_step', ''):>7} {cells}")


# SmolLM2-135M's linears per decoder layer: (out, in) → how many
SMOLLM2_LINEARS = {"q_proj,o_proj": ((576, 576), 2), "k_proj,v_proj": ((192, 576), 2),
                   "gate_proj,up_proj": ((1536, 576), 2), "down_proj": ((576, 1536), 1)}


def inductor_int4_ms(packed: torch.Tensor, scale_and_zero: torch.Tensor, group: int, x: torch.Tensor, reps: int) -> tuple[float | None, str]:
    """Fastest ms of ``aten._weight_int4pack_mm_for_cpu(x, packed, …)`` compiled by inductor with
    max-autotune and frozen weights, which offers its AMX int4 weight-only GEMM template (it
    dequantizes tiles of the packed weight into AMX registers inside the GEMM) beside the ATen
    kernel and keeps whichever it timed faster; ``(None, why)`` where it does not compile. The
    weight must be a constant of the graph (freezing), so this is one compile per weight and row
    count: fine for a probe, not for a model's 210 linears at every prompt length."""
    import torch._inductor.config as inductor_config

    class Int4Mm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("packed", packed.clone())
            self.register_buffer("scale_and_zero", scale_and_zero.clone())

        def forward(self, a):
            return torch.ops.aten._weight_int4pack_mm_for_cpu(a, self.packed, group, self.scale_and_zero)

    module = Int4Mm()
    try:
        with inductor_config.patch(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN", freezing=True), torch.no_grad():
            torch.compiler.reset()
            compiled = torch.compile(module, dynamic=False)
            got, want = compiled(x), module(x)
            if not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * float(want.abs().max())):
                return None, "compiled result differs from the ATen kernel"
            return fastest_ms(lambda: compiled(x), reps), ""
    except Exception as err:  # no C++ compiler, no AMX template for this shape, …
        return None, (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def decode_bandwidth(shapes: dict, group: int = 64) -> dict:
    """Weight bytes each format streams when every linear of ``shapes`` (micro's rows, keyed
    ``"names [NxK]"`` with a ``count``) runs one row in turn, and the GB/s that
    ``decode_all_layers_ms`` makes of them: w4 = packed nibbles + bf16 (scale, offset) per group."""
    keys = next(iter(shapes.values()))["decode_all_layers_ms"]  # w4_gemv only where the native GEMV ran
    bytes_ = {key: 0 for key in keys}
    ms = {key: 0.0 for key in bytes_}
    for name, row in shapes.items():
        n, k = map(int, name.rsplit("[", 1)[1].rstrip("]").split("x"))
        w4 = n * k // 2 + (k // group) * n * 2 * 2
        per = {"w4_int4": w4, "w4_gemv": w4, "bf16": n * k * 2, "fp32": n * k * 4}
        for key in bytes_:
            bytes_[key] += per[key] * row["count"]
            ms[key] += row["decode_all_layers_ms"][key]
    return {key: {"bytes": bytes_[key], "ms": round(ms[key], 2), "gb_s": round(bytes_[key] / ms[key] / 1e6, 2)} for key in bytes_}


def micro(lens: list[int], threads: int, reps: int) -> dict:
    """Per-shape and whole-model sums of linear and attention times (see the module docstring)."""
    from transformers import LlamaConfig

    import copy

    from quantcli.bench.gemv import gemv_status
    from quantcli.bench.kernels import Int4WeightOnlyLinear, fused_unpacker, unpack_scale_and_zero
    from quantcli.bench.paths import time_attention
    from quantcli.quant import QuantSpec, quantize_weight

    torch.set_num_threads(threads)
    load_before, started = os.getloadavg(), time.time()
    unpack, how = fused_unpacker()
    gen = torch.Generator().manual_seed(0)
    counts = [1, *lens]
    shapes, totals = {}, {m: {"w4_int4": 0.0, "w4_dense": 0.0, "w4_dense_parts": 0.0, "w4_inductor": 0.0, "w4_best": 0.0, "bf16": 0.0, "bf16_kn": 0.0, "fp32": 0.0} for m in counts}
    inductor_failures = {}
    unpack_total = {"eager_ms": 0.0, "fused_ms": 0.0}
    decode = {"w4_int4": 0.0, "bf16": 0.0, "fp32": 0.0}  # one row through every layer's own weights
    layers = SMOLLM2["num_hidden_layers"]
    with torch.inference_mode():
        for names, ((n, k), per_layer) in SMOLLM2_LINEARS.items():
            w = torch.randn(n, k, generator=gen) * 0.02
            layer = Int4WeightOnlyLinear.from_quantized(quantize_weight(w, QuantSpec(wbits=4, group=64)))
            # the baselines' nn.Linear layout: weight [N, K] contiguous (the dense path's is [K, N])
            w16, w32 = layer.dense_weight().contiguous(), layer.dense_weight().float().contiguous()
            w16_kn = w16.t().contiguous().t()  # the same weight stored [K, N], as the dense path makes it
            row = {"count": per_layer * layers,
                   "unpack_eager_ms": fastest_ms(lambda: unpack_scale_and_zero(layer.packed, layer.scale_and_zero, 64), reps),
                   "unpack_fused_ms": fastest_ms(lambda: unpack(layer.packed, layer.scale_and_zero, 64), reps)}
            for key in ("eager", "fused"):
                unpack_total[f"{key}_ms"] += row[f"unpack_{key}_ms"] * row["count"]
            for m in counts:
                x = torch.randn(m, k, generator=gen)
                xb = x.bfloat16()
                r = max(1, reps if m <= 1000 else reps // 2)
                layer.dense_from = None
                t = {"w4_int4": fastest_ms(lambda: layer(xb), r)}
                layer.dense_from = 0
                t["w4_dense"] = fastest_ms(lambda: layer(xb), r)
                t["bf16"] = fastest_ms(lambda: torch.nn.functional.linear(xb, w16), r)
                t["bf16_kn"] = fastest_ms(lambda: torch.nn.functional.linear(xb, w16_kn), r)
                # the dense path timed in its two parts: calls longer than a scheduler slice are
                # preempted on a loaded machine, so the whole call's minimum overstates it there
                t["w4_dense_parts"] = row["unpack_fused_ms"] + t["bf16_kn"]
                with torch.inference_mode(False):
                    inductor_ms, why = inductor_int4_ms(layer.packed, layer.scale_and_zero, 64, xb.clone(), r)
                if inductor_ms is None:
                    inductor_failures[f"{names} [{n}x{k}] x {m}"] = why
                t["w4_inductor"] = inductor_ms if inductor_ms is not None else float("nan")
                t["w4_best"] = min(v for v in (t["w4_int4"], t["w4_dense"], t["w4_dense_parts"], inductor_ms) if v is not None)
                t["fp32"] = fastest_ms(lambda: torch.nn.functional.linear(x, w32), r)
                row[str(m)] = {key: round(v, 4) for key, v in t.items()}
                for key, v in t.items():
                    totals[m][key] += v * row["count"]
            # decode as the model runs it: `count` distinct weights in turn, so they stream from memory
            layer.dense_from = None
            xb, x = torch.randn(1, k, generator=gen).bfloat16(), torch.randn(1, k, generator=gen)
            mods = [copy.deepcopy(layer) for _ in range(row["count"])]
            ws16 = [w16.clone() for _ in range(row["count"])]
            ws32 = [w32.clone() for _ in range(row["count"])]
            sweep = {"w4_int4": lambda: [mod(xb) for mod in mods],
                     "bf16": lambda: [torch.nn.functional.linear(xb, wi) for wi in ws16],
                     "fp32": lambda: [torch.nn.functional.linear(x, wi) for wi in ws32]}
            row["decode_all_layers_ms"] = {key: round(fastest_ms(fn, reps), 3) for key, fn in sweep.items()}
            if not gemv_status():  # the same modules through quantcli::int4_gemv
                for mod in mods:
                    mod.gemv_upto = 1
                row["decode_all_layers_ms"]["w4_gemv"] = round(fastest_ms(sweep["w4_int4"], reps), 3)
            for key, v in row["decode_all_layers_ms"].items():
                decode[key] = decode.get(key, 0.0) + v
            del mods, ws16, ws32
            shapes[f"{names} [{n}x{k}]"] = row
        # lm_head (tied to the embedding, never quantized: bf16 in the w4 model and the bf16 baseline)
        head32 = torch.randn(SMOLLM2["vocab_size"], SMOLLM2["hidden_size"], generator=gen) * 0.02
        head16, h = head32.bfloat16(), torch.randn(1, SMOLLM2["hidden_size"], generator=gen)
        lm_head = {"bf16": fastest_ms(lambda: torch.nn.functional.linear(h.bfloat16(), head16), reps),
                   "fp32": fastest_ms(lambda: torch.nn.functional.linear(h, head32), reps)}
    config = LlamaConfig(**SMOLLM2)
    attention, estimate = {}, {}
    for m in lens:
        attention[str(m)] = {
            f"{phase}_{str(dt).replace('torch.', '')}_ms": round(
                time_attention(config, m, 1, dt, dt, phase, torch.device("cpu"), reps=max(1, reps // 2)), 3)
            for phase in ("prefill", "decode") for dt in (torch.bfloat16, torch.float32)
        }
        a = attention[str(m)]
        best_prefill = min(a["prefill_bfloat16_ms"], a["prefill_float32_ms"])
        best_decode = min(a["decode_bfloat16_ms"], a["decode_float32_ms"])
        w4_prefill, bf16_prefill = totals[m]["w4_best"] + best_prefill, totals[m]["bf16"] + a["prefill_bfloat16_ms"]
        w4_dec = min(decode["w4_int4"], decode.get("w4_gemv", float("inf"))) + lm_head["bf16"] + best_decode
        fp32_dec = decode["fp32"] + lm_head["fp32"] + a["decode_float32_ms"]
        bf16_dec = decode["bf16"] + lm_head["bf16"] + a["decode_bfloat16_ms"]
        estimate[str(m)] = {
            "prefill_ms": {"w4": round(w4_prefill, 1), "bf16": round(bf16_prefill, 1)},
            "decode_ms": {"w4": round(w4_dec, 2), "fp32": round(fp32_dec, 2), "bf16": round(bf16_dec, 2)},
            "ttft_vs_bf16": round(bf16_prefill / w4_prefill, 3),
            "decode_vs_fp32": round(fp32_dec / w4_dec, 3), "decode_vs_bf16": round(bf16_dec / w4_dec, 3),
        }
    return {
        "what": "micro-benchmarks (no whole model): SmolLM2-135M linear shapes with random w4g64 weights, "
                "fastest of a few calls; model sums = per-shape ms × count (210 linears, lm_head excluded). "
                "One weight per shape is called repeatedly, so it sits in cache: the 1-row (decode) sums "
                "understate the fp32/bf16 models; decode_linears_all_layers_ms runs each of the 210 weights in turn instead",
        "threads": threads, "reps": reps, "unpack": how,
        "loadavg": {"before": list(load_before), "after": list(os.getloadavg())},
        "wall_s": round(time.time() - started, 1),
        "shapes": shapes,
        "model_linears_ms": {str(m): {k: round(v, 2) for k, v in t.items()} for m, t in totals.items()},
        "model_unpack_ms": {k: round(v, 2) for k, v in unpack_total.items()},
        "attention_ms_all_layers": attention,
        "decode_linears_all_layers_ms": {k: round(v, 2) for k, v in decode.items()},
        "decode_linears_bandwidth": decode_bandwidth(shapes),
        "lm_head_ms": {k: round(v, 3) for k, v in lm_head.items()},
        "estimate": estimate,
        "inductor_int4": "w4_inductor: aten._weight_int4pack_mm_for_cpu compiled by inductor (max-autotune, frozen "
                         "weight): its AMX int4 weight-only GEMM template or the ATen kernel, whichever it timed faster",
        "inductor_failures": inductor_failures,
        "estimate_note": "linears (w4: the fastest of int4 kernel, dense path, dense path as unpack + matmul timed apart, inductor's int4 GEMM, per shape; "
                         "decode: the faster of the ATen int4 kernel and quantcli::int4_gemv) + attention (w4: the faster "
                         "dtype) + lm_head for decode; norms, RoPE, embedding and Python overhead are left out",
        "machine": machine(),
    }


def print_micro(res: dict) -> None:
    print(f"unpack of all 210 linears: eager {res['model_unpack_ms']['eager_ms']:.1f} ms, "
          f"fused {res['model_unpack_ms']['fused_ms']:.1f} ms ({res['unpack']})")
    cols = ("w4_int4", "w4_dense", "w4_dense_parts", "w4_inductor", "w4_best", "bf16", "bf16_kn", "fp32")
    print(" ".join(f"{c:>14}" for c in ("rows",) + cols) + "  (ms, 210 linears; bf16_kn: weight stored [K, N])")
    for m, t in res["model_linears_ms"].items():
        print(f"{m:>14} " + " ".join(f"{t[k]:>14.1f}" for k in cols))
    for m, t in res["attention_ms_all_layers"].items():
        print(f"attention @{m}: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    print(f"decode, all 210 linears in turn (ms): {res['decode_linears_all_layers_ms']}; lm_head {res['lm_head_ms']}")
    print("decode weight streaming: " + ", ".join(f"{k} {v['bytes'] / 1e6:.1f} MB in {v['ms']:.1f} ms = {v['gb_s']:.1f} GB/s"
                                                 for k, v in res["decode_linears_bandwidth"].items()))
    for m, e in res["estimate"].items():
        print(f"estimate @{m}: TTFT w4/bf16 {e['prefill_ms']['w4']:.0f}/{e['prefill_ms']['bf16']:.0f} ms ({e['ttft_vs_bf16']:.2f}×), "
              f"decode w4/fp32/bf16 {e['decode_ms']['w4']:.1f}/{e['decode_ms']['fp32']:.1f}/{e['decode_ms']['bf16']:.1f} ms "
              f"({e['decode_vs_fp32']:.2f}× fp32, {e['decode_vs_bf16']:.2f}× bf16)")
    print(f"threads {res['threads']}; loadavg before {res['loadavg']['before']}, after {res['loadavg']['after']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--random-weights", action="store_true", help="SmolLM2-135M's architecture with random weights")
    ap.add_argument("--prompt-lens", default="100,1000,2000,4000")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile-steps", type=int, default=8, help="decode steps profiled per prompt length (0: none)")
    ap.add_argument("--no-compile-decode", action="store_true",
                    help="eager decode only (default: also a compiled decode step for every model, the faster one used)")
    ap.add_argument("--sequential", action="store_true",
                    help="time one model after another, one in memory at a time (default: all held, timed rep by rep in turn)")
    ap.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    ap.add_argument("--micro", action="store_true", help="micro-benchmarks only (see above)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--explain", action="store_true", help="only add the missed targets' bounds (why_missed) to an existing --out JSON")
    args = ap.parse_args()
    if args.explain:
        path = Path(args.out or ROOT / "benchmarks" / "results" / "speed.json")
        result = json.loads(path.read_text())
        result["why_missed"] = explain_misses(result)
        result["why_missed_command"] = "python benchmarks/speed.py " + " ".join(sys.argv[1:])  # recomputed from this file's data
        path.write_text(json.dumps(result, indent=1))
        print_misses(result)
        return
    lens = [int(x) for x in args.prompt_lens.split(",")]
    if args.micro:
        res = micro(lens, args.threads or 1, max(2, args.reps))
        res["command"] = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
        out = Path(args.out or ROOT / "benchmarks" / "results" / "speed_micro.json")
        out.write_text(json.dumps(res, indent=1))
        print_micro(res)
        print(f"\nwrote {rel(out)}")
        return
    args.out = args.out or str(ROOT / "benchmarks" / "results" / "speed.json")

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
        prompt_lens=tuple(lens), gen=args.gen, reps=args.reps, warmup=1,
        device=args.device, threads=args.threads, profile_steps=args.profile_steps,
        compile_decode=not args.no_compile_decode,
    )
    result = compare(artifact, params, ("fp32", "bf16"), log=lambda m: print(m, file=sys.stderr, flush=True),
                     interleave=not args.sequential)
    result["input"] = rel(artifact)
    result["weights"] = "random (SmolLM2-135M architecture)" if args.random_weights and args.artifact is None else "SmolLM2-135M"
    result["targets"] = check_targets(result, TARGETS if weight_only(result) else TARGETS_WA)
    result["why_missed"] = explain_misses(result)
    result["command"] = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    write_plot(result, Path(args.plot) if args.plot else Path(args.out).with_suffix(".png"))
    print_table(result)
    for length, row in result["targets"].items():
        missed = [f"{k} {v['ratio']:.2f} < {v['target']}" for k, v in row.items() if not v["met"]]
        paired = "; ".join(f"{k} per rep {v['paired_min']:.2f}-{v['paired_max']:.2f} ({v['reps_met']} met)"
                           for k, v in row.items() if "reps_met" in v)
        print(f"targets @{length}: {'all met' if not missed else 'MISSED ' + ', '.join(missed)}" + (f"  [{paired}]" if paired else ""))
    kernels = result.get("kernels") or {}
    if "dense_prefill_shapes" in kernels:
        print(f"dense prefill: unpack {kernels.get('dense_prefill_unpack') or 'not used'}; per shape "
              + ", ".join(f"{k} from {v['dense_from']}" for k, v in kernels["dense_prefill_shapes"].items()))
    for length, chosen in (result.get("paths") or {}).get("per_prompt_len", {}).items():
        if chosen:
            print(f"attention @{length}: measured {chosen['measured_ms']}")
    print_profile(result)
    print_misses(result)
    print(f"\nwrote {rel(args.out)}")


if __name__ == "__main__":
    main()
