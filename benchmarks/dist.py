"""Data-parallel calibration (torchrun): 1 vs 2 processes on the real model, and a projection to 8 GPUs.

    python benchmarks/dist.py [--nsamples 8] [--seqlen 256] [--group 64]
    python benchmarks/dist.py --layer-work cuda --out benchmarks/results/dist_layer_gpu.json   (GPU machine)

Default mode, on this machine (CPU, Gloo): GPTQ w4g64 of SmolLM2-135M (the default model) on
``nsamples × seqlen`` tokens of ``../shared/data/austen/emma.txt``, launched with
``python -m torch.distributed.run --nproc-per-node W -m quantcli gptq ...`` for W = 1 and 2
(``OMP_NUM_THREADS=1`` per rank: the CPU is shared by other jobs, and more threads than free
cores make OpenMP spin). Records the wall time, the stage's
own seconds, each rank's peak RSS (psutil, polled every 0.2 s), the fraction of integer codes
that differ between the two artifacts, their perplexities (``eval-ppl`` with W ranks, 4 windows
× 512 tokens of ``prideprejudice.txt``) and ``os.getloadavg()`` (the CPU is shared).

Also on paper in the JSON: the bytes all-reduced per decoder layer (GPTQ Hessians, AWQ activation
statistics and clip Gram matrices) for SmolLM2-135M, LLaMA-2-7B and 70B, and the projected GPTQ
time of 7B and 70B on 1 and 8 GPUs from a FLOP model of one layer's work (forward passes and
Hessian updates, which data parallelism divides by the ranks; the GPTQ solve, which every rank
repeats) with the assumed GPU rates and NCCL bandwidth listed under ``assumptions``.

``--layer-work DEVICE`` (for a GPU machine; not run in this session) times one GPTQ decoder layer
with 7B and 70B shapes and random weights through the real ``GPTQ.run_layer``, split into the data
part and the ``gptq_quantize`` part, to replace the assumed rates with measured ones.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from _quant import ROOT, rel

RESULTS = ROOT / "benchmarks" / "results"
WORK = RESULTS / "work" / "dist"
EMMA = ROOT.parent / "shared" / "data" / "austen" / "emma.txt"
PRIDE = ROOT.parent / "shared" / "data" / "austen" / "prideprejudice.txt"

# decoder-layer shapes (hidden, intermediate, query heads, kv heads, layers)
SHAPES = {
    "SmolLM2-135M": dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, layers=30),
    "LLaMA-2-7B": dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=32),
    "LLaMA-2-70B": dict(hidden=8192, intermediate=28672, heads=64, kv_heads=8, layers=80),
}
GPU_FLOPS = 40e12  # assumed sustained float32 FLOP/s of one H100-class GPU (60 % of 67 TFLOP/s; the stages run in float32)
COLUMN_STEP_S = 60e-6  # assumed cost of one GPTQ column step (≈ 6 small kernels at ~10 µs launch each)
FORWARD_PASSES = 3.4  # targets 1 (stage 1's Hessian recorded there), captures of o, gate/up, down ≈ 1.4 (each stops after its stage), next inputs 1
NCCL_BUSBW = 150e9  # bytes/s: assumed reduce/all-reduce bus bandwidth of 8 GPUs on NVLink (H100 class, large messages)
CALIB_TOKENS = 128 * 2048  # the usual GPTQ calibration set


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: list[str]) -> dict:
    """``torchrun --nproc-per-node world -m quantcli ARGS``: stdout, wall seconds, peak RSS per rank."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port", str(_free_port()), "-m", "quantcli", *args]
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    peak: dict[int, int] = {}

    def poll() -> None:
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                for child in parent.children(recursive=True):
                    try:
                        rank = int(child.environ().get("RANK", -1))
                        if rank >= 0:
                            peak[rank] = max(peak.get(rank, 0), child.memory_info().rss)
                    except (psutil.Error, ValueError):
                        pass
            except psutil.Error:
                pass
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out, err = proc.communicate()
    poller.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"stdout": out.strip(), "wall_s": round(time.time() - started, 2), "peak_rss_mb_per_rank": {r: round(b / 2**20) for r, b in sorted(peak.items())}}


def code_flips(a: Path, b: Path) -> dict:
    """Integer codes (unpacked: one per weight) and zero points that differ between two artifacts."""
    from quantcli.artifact import open_artifact
    from quantcli.models.weights import read_quantized

    qa, qb = read_quantized(open_artifact(a)), read_quantized(open_artifact(b))
    diff = total = 0
    for name in qa:
        x, y = qa[name], qb[name]
        diff += int((x.codes != y.codes).sum()) + int((x.zero != y.zero).sum())
        total += x.codes.numel() + x.zero.numel()
    return {"differing": diff, "total": total, "fraction": diff / total}


# --------------------------------------------------------------------------- on paper


def linears(shape: dict) -> dict[str, tuple[int, int]]:
    """``name → (in, out)`` of one decoder layer's quantized linears."""
    h, i, d = shape["hidden"], shape["intermediate"], shape["hidden"] // shape["heads"]
    kv = shape["kv_heads"] * d
    return {
        "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }


def comm_bytes(shape: dict, n_grid: int = 20) -> dict:
    """Bytes reduced per decoder layer (float32), as implemented.

    GPTQ: one Hessian ``[in, in]`` per group of linears fed the same input (q/k/v, o, gate/up,
    down), summed onto the group's owner rank (a reduce, not an all-reduce), whose codes (one
    byte per weight, plus scales) are then broadcast. AWQ: per scaling group ``mean|x|`` ``[C]``
    and one loss per grid candidate, then one Gram matrix ``XᵀX`` per distinct captured input for
    the clip search (all-reduced: every rank searches the clips).
    """
    lin = linears(shape)
    h, i = shape["hidden"], shape["intermediate"]
    hessian = 4 * (h * h + h * h + h * h + i * i)  # q/k/v input, o input, gate/up input, down input
    codes = sum(n_in * n_out for n_in, n_out in lin.values())  # uint8 codes broadcast by the owners
    groups = [h, h, i]  # input_layernorm → q/k/v, post_attention_layernorm → gate/up, up → down (v → o skipped under GQA)
    awq_stats = sum(4 * c for c in groups) + len(groups) * (n_grid + 1) * 8
    awq_gram = 4 * (h * h + h * h + i * i + h * h)  # q/k/v input, gate/up input, down input, o input
    return {"gptq_hessians": hessian, "gptq_codes_broadcast": codes, "awq_activation_stats": awq_stats, "awq_clip_grams": awq_gram}


def allreduce_seconds(nbytes: int, ranks: int, busbw: float = NCCL_BUSBW) -> float:
    """Ring all-reduce time: each rank sends and receives ``2 (N−1)/N · bytes`` at the bus bandwidth."""
    return 0.0 if ranks == 1 else 2 * (ranks - 1) / ranks * nbytes / busbw


def reduce_seconds(nbytes: int, ranks: int, busbw: float = NCCL_BUSBW) -> float:
    """Ring reduce (or broadcast) time: ``(N−1)/N · bytes`` at the bus bandwidth, half an all-reduce."""
    return 0.0 if ranks == 1 else (ranks - 1) / ranks * nbytes / busbw


def layer_flops(shape: dict, tokens: int, seqlen: int = 2048) -> dict:
    """FLOPs of one GPTQ decoder layer over ``tokens`` calibration tokens.

    data: ``FORWARD_PASSES`` forward passes (2 · params per token, plus attention ``4 · L · h``) and
    the Hessian updates ``2 · in²`` per token per distinct input; quant: per linear the Cholesky factor,
    inverse and factor of ``H`` (≈ ``2 in³``) and the column updates (≈ ``2 · out · in²``), and
    ``columns`` Python-loop steps.
    """
    lin = linears(shape)
    params = sum(i * o for i, o in lin.values())
    forward = FORWARD_PASSES * tokens * (2 * params + 4 * seqlen * shape["hidden"])
    h, inter = shape["hidden"], shape["intermediate"]
    hessian = tokens * 2 * (3 * h * h + inter * inter)  # one Hessian per input: q/k/v, o, gate/up, down
    quant = sum(2 * i**3 + 2 * o * i * i for i, o in lin.values())
    return {"data": forward + hessian, "quant": quant, "columns": sum(i for i, _ in lin.values())}


def project(ranks: int = 8) -> dict:
    """Projected GPTQ times (128 × 2048 tokens) on 1 and ``ranks`` GPUs from the FLOP model and the assumed rates."""
    out = {}
    for name in ("LLaMA-2-7B", "LLaMA-2-70B"):
        shape = SHAPES[name]
        f = layer_flops(shape, CALIB_TOKENS)
        data = f["data"] / GPU_FLOPS
        quant = f["quant"] / GPU_FLOPS + f["columns"] * COLUMN_STEP_S
        volume = comm_bytes(shape)
        comm = reduce_seconds(volume["gptq_hessians"], ranks) + reduce_seconds(volume["gptq_codes_broadcast"], ranks)
        n = shape["layers"]
        out[name] = {
            "per_layer_data_s": round(data, 2),
            "per_layer_quant_s": round(quant, 2),
            "per_layer_reduce_and_broadcast_s": round(comm, 3),
            "one_gpu_s": round(n * (data + quant)),
            # true-sequential (default): a dense layer's four stages each have one Hessian group, solved
            # one after the other, so the owner ranks take turns and the quantization is not divided
            f"{ranks}_gpus_s": round(n * (data / ranks + quant + comm)),
            # --no-true-sequential: the four groups of a layer are solved at once on four owner ranks
            f"{ranks}_gpus_one_stage_s": round(n * (data / ranks + quant / min(ranks, 4) + comm)),
        }
    return out


# --------------------------------------------------------------------------- one layer's work


def layer_work(device: str, samples: dict[str, int], seqlen: int = 2048) -> dict:
    """Seconds of one GPTQ layer (random weights) split into data and quantization, per shape."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    import quantcli.algos.gptq as gptq
    from quantcli.algos.driver import LayerContext
    from quantcli.models.arch import arch_spec
    from quantcli.quant import QuantSpec

    results = {}
    for name, n in samples.items():
        s = SHAPES[name]
        config = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_attention_heads=s["heads"],
                             num_key_value_heads=s["kv_heads"], num_hidden_layers=1, max_position_embeddings=seqlen)
        dev = torch.device(device)
        torch.manual_seed(0)
        layer = LlamaDecoderLayer(config, 0).to(dev).eval()
        x = torch.randn(n, seqlen, s["hidden"]) * 0.5
        pos = torch.arange(seqlen, device=dev).unsqueeze(0)
        kwargs = {"position_embeddings": LlamaRotaryEmbedding(config).to(dev)(x[:1].to(dev), pos), "position_ids": pos}
        spent = [0.0]
        original = gptq.gptq_quantize

        def timed(*a, **k):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            r = original(*a, **k)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            spent[0] += time.time() - t0
            return r

        gptq.gptq_quantize = timed
        try:
            ctx = LayerContext(0, "layer", layer, x, None, kwargs, dev, QuantSpec(4, 64), arch_spec("LlamaForCausalLM"), batch=4)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            gptq.GPTQ().run_layer(ctx)
            target = time.time()
            ctx.forward()  # the driver's two forwards around the algorithm: targets and the next layer's inputs
            ctx.forward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            total = time.time() - t0
        finally:
            gptq.gptq_quantize = original
        results[name] = {"tokens": n * seqlen, "total_s": round(total, 3), "quant_s": round(spent[0], 3), "data_s": round(total - spent[0], 3),
                         "algo_s": round(target - t0, 3), "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
        print(name, results[name], flush=True)
        del layer, x, ctx
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--layer-work", default=None, help="only time one GPTQ layer of 7B/70B shapes on this device")
    ap.add_argument("--out", default=str(RESULTS / "dist.json"))
    args = ap.parse_args()

    if args.layer_work:
        work = layer_work(args.layer_work, {"LLaMA-2-7B": 16, "LLaMA-2-70B": 4})
        Path(args.out).write_text(json.dumps({"layer_work": work, "assumptions": assumptions()}, indent=2))
        return

    load_before = os.getloadavg()
    common = ["--w4", "--group", str(args.group), "--dataset", str(EMMA), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu", "--force", "-q"]
    runs = {}
    for world in (1, 2):
        out = WORK / f"gptq-w4g{args.group}-ranks{world}"
        run = launch(world, ["gptq", *common, "-o", str(out)])
        manifest = json.loads((out / "manifest.json").read_text())
        layers = manifest["metrics"]["layers"]
        ppl = launch(world, ["eval-ppl", str(out), "--dataset", str(PRIDE), "--seqlen", "512", "--max-windows", "4", "--device", "cpu", "--json", "-q"])
        runs[world] = {
            "artifact": rel(out),
            "wall_s": run["wall_s"],
            "stage_s": manifest["metrics"]["seconds"],
            "mean_layer_s": round(sum(m["seconds"] for m in layers) / len(layers), 3),
            "peak_rss_mb_per_rank": run["peak_rss_mb_per_rank"],
            "world_size_in_manifest": manifest["metrics"]["world_size"],
            "mean_layer_loss": manifest["metrics"]["mean_layer_loss"],
            "ppl_pride_4x512": json.loads(ppl["stdout"])["ppl"],
            "eval_wall_s": ppl["wall_s"],
            "eval_peak_rss_mb_per_rank": ppl["peak_rss_mb_per_rank"],
            "omp_threads_per_rank": 1,
        }
    flips = code_flips(WORK / f"gptq-w4g{args.group}-ranks1", WORK / f"gptq-w4g{args.group}-ranks2")
    record = {
        "command": f"python benchmarks/dist.py --nsamples {args.nsamples} --seqlen {args.seqlen} --group {args.group}",
        "model": "SmolLM2-135M (default model)",
        "calibration": f"{args.nsamples} x {args.seqlen} tokens of {rel(EMMA)}",
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "runs": runs,
        "code_flips_1_vs_2": flips,
        "comm_bytes_per_layer": {name: comm_bytes(shape) for name, shape in SHAPES.items()},
        "projection_128x2048": project(),
        "assumptions": assumptions(),
    }
    previous = Path(args.out)
    previous.write_text(json.dumps(record, indent=2, default=str))  # written before the control, which can be slow
    # control: the same single process with the Hessians accumulated in mini-batches of 4 instead of 8
    # (another floating-point summation order, the same mathematics, no torch.distributed)
    control_dir = WORK / f"gptq-w4g{args.group}-ranks1-batch4"
    control = launch(1, ["gptq", *common, "--batch-size", "4", "-o", str(control_dir)])
    control_ppl = launch(1, ["eval-ppl", str(control_dir), "--dataset", str(PRIDE), "--seqlen", "512", "--max-windows", "4", "--device", "cpu", "--json", "-q"])
    control_record = {
        "what": "1 process, --batch-size 4 (Hessian sums in another order): the floating-point noise floor of GPTQ with act order on this model",
        "wall_s": control["wall_s"],
        "code_flips_vs_ranks1": code_flips(WORK / f"gptq-w4g{args.group}-ranks1", control_dir),
        "ppl_pride_4x512": json.loads(control_ppl["stdout"])["ppl"],
        "mean_layer_loss": json.loads((control_dir / "manifest.json").read_text())["metrics"]["mean_layer_loss"],
    }
    record["control_1_process_batch4"] = control_record
    previous.write_text(json.dumps(record, indent=2, default=str))
    print(f"{'ranks':>5} {'wall s':>8} {'stage s':>8} {'s/layer':>8} {'peak RSS MB/rank':>18} {'ppl':>8}")
    for world, r in runs.items():
        print(f"{world:>5} {r['wall_s']:>8} {r['stage_s']:>8} {r['mean_layer_s']:>8} {str(list(r['peak_rss_mb_per_rank'].values())):>18} {r['ppl_pride_4x512']:>8.4f}")
    print(f"control (1 process, batch 4): ppl {control_record['ppl_pride_4x512']:.4f}, codes differing from 1 rank batch 8: {control_record['code_flips_vs_ranks1']['fraction']:.3f}")
    print(f"codes differing 1 vs 2 ranks: {flips['differing']}/{flips['total']}; load average {record['loadavg_before']} → {record['loadavg_after']}")
    print(f"wrote {rel(previous)}")


def assumptions() -> dict:
    return {
        "nccl_allreduce_busbw_bytes_per_s": NCCL_BUSBW,
        "reduce_model": "ring: (N-1)/N x bytes / busbw per rank for a reduce or a broadcast (an all-reduce is twice that)",
        "calibration_tokens": CALIB_TOKENS,
        "gpu_float32_flops": GPU_FLOPS,
        "gptq_column_step_s": COLUMN_STEP_S,
        "forward_passes_per_layer": FORWARD_PASSES,
        "data_part": "forward passes + Hessian updates per layer, divided by the number of ranks (each holds 1/N of the tokens)",
        "quant_part": "gptq_quantize of each Hessian group on its owner rank only (owners rotate over the layer's groups); with true-sequential stages the groups of a dense layer are solved one after the other, so the quantization is not divided; with --no-true-sequential the four groups run at once (quant / min(ranks, 4), bounded by the largest group)",
        "hessians": "float32, one [in, in] per group of linears fed the same input (q/k/v, o, gate/up, down), reduced to its owner rank; codes broadcast as uint8",
    }


if __name__ == "__main__":
    main()
