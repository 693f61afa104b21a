"""Scale: peak memory and time of every stage on random-weight models too big to load in float32.

Builds once (cached under benchmarks/results/work/scale/) random-weight Llama models as bf16
safetensors shards, one shard per decoder layer, written layer by layer so building never holds
the model: ``1.2b`` (hidden 2048, 16 layers, issue 12's model) and ``7b`` (LLaMA-2-7B's shapes:
hidden 4096, intermediate 11008, 32 heads, 32 layers, vocab 32000; ~13.5 GB). Then runs
``quant calibrate``, ``rtn --w4 --group 128``, ``gptq``, ``awq``, ``eval-ppl``, ``pack`` and
``eval-packed`` (``eval-ppl`` of the packed checkpoint) on it,
each in its own process, recording wall time and the peak RSS of the process (polled with psutil
every 0.2 s), and one plain layer-by-layer forward over the same calibration set (streamed) so
each stage's time is also given as a multiple of that forward (``x_plain_forward``). On a shared
machine the load changes between those two runs, so each calibrated stage also gives its
layers' seconds over the seconds of their own propagation forward (one float32 forward of the
calibration set through the layer, timed inside the same run: ``x_forward_same_run``).

    python benchmarks/scale.py --model 1.2b --nsamples 4 --seqlen 256
    python benchmarks/scale.py --model 7b --stages rtn,gptq
    QUANTCLI_STREAM=0 python benchmarks/scale.py --model 1.2b --stages eval-packed --no-forward  # whole-model loading

Writes benchmarks/results/scale.json (one entry per model and run label, merged with what is
there) and prints a table. The machine is shared: the JSON records os.getloadavg() per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "results" / "work" / "scale"
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
SHAPES = {
    "smoke": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=32000),
    "1.2b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000),
}
TEXT_CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"


def build(name: str) -> Path:
    """The cached random-weight model directory for ``name`` (built layer by layer if missing)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out = WORK / name
    if (out / "model.safetensors.index.json").is_file():
        return out
    tmp = WORK / f".{name}.building"
    tmp.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES[name], max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp)
    h, inter, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}

    def shard(file: str, tensors: dict) -> None:
        save_file(tensors, str(tmp / file))
        weight_map.update({k: file for k in tensors})

    shard("outer.safetensors", {
        "model.embed_tokens.weight": rand(config.vocab_size, h),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        "lm_head.weight": rand(config.vocab_size, h),
    })
    for i in range(n):
        p = f"model.layers.{i}."
        shard(f"layer-{i:03d}.safetensors", {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            **{p + f"self_attn.{x}_proj.weight": rand(h, h) for x in "qkvo"},
            p + "mlp.gate_proj.weight": rand(inter, h),
            p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
        })
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _char_tokenizer().save_pretrained(tmp)
    tmp.rename(out)
    return out


def _char_tokenizer():
    """A character-level tokenizer (ids < 100, inside any vocabulary): the weights are random anyway."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{ch: i + 1 for i, ch in enumerate(TEXT_CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def measure(cmd: list[str], src: Path = ROOT, timeout: float | None = None, out: Path | None = None) -> dict:
    """Run ``cmd``; its wall seconds, peak RSS (GB, the process and its children) and exit code.

    After ``timeout`` seconds the stage gets Ctrl-C (SIGINT: it keeps its finished layers in the
    hidden ``.OUT.partial/`` beside its output ``out``); the row then records how many layers were
    finished and their mean seconds, and a run of the same command later resumes from there.
    """
    started = time.time()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(src)},
        cwd=src,  # ``python -m`` puts the working directory ahead of PYTHONPATH: run inside the checkout measured
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job inherits SIGINT ignored
    )
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        if timeout is not None and time.time() - started > timeout and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            timeout = None
        time.sleep(0.2)
    stdout, err = proc.communicate()
    row, layers = {}, []
    if out is not None and (partial := out.parent / f".{out.name}.partial").is_dir():
        layers = [json.loads(f.read_text()) for f in sorted(partial.glob("layer-*.json"))]
        row = {"stopped_after_layers": len(layers), "mean_layer_seconds": round(sum(m["seconds"] for m in layers) / max(len(layers), 1), 1)}
    elif out is not None and (out / "manifest.json").is_file() and proc.returncode == 0:
        layers = json.loads((out / "manifest.json").read_text())["metrics"].get("layers", [])
    if sum(m.get("forward_seconds") or 0 for m in layers) > 0:  # the stage's own propagation forwards, timed in the same run
        row["x_forward_same_run"] = round(sum(m["seconds"] for m in layers) / sum(m.get("forward_seconds") or 0 for m in layers), 2)
    return {**row,
        "seconds": round(time.time() - started, 1), "peak_rss_gb": round(peak / 1e9, 2), "rc": proc.returncode,
        "loadavg": [round(x, 1) for x in os.getloadavg()], "stdout": stdout.strip()[-300:].replace(f"{ROOT}/", ""),
        "stderr_tail": err.strip()[-300:].replace(f"{ROOT}/", "") if proc.returncode else "",
    }


def plain_forward(model_dir: str, calib_dir: str, batch: int) -> None:
    """One streamed layer-by-layer forward of the calibration set (the unit of the multiples)."""
    import torch

    from quantcli.algos.driver import layer_forward
    from quantcli.artifact import open_artifact
    from quantcli.calib.capture import capture_layer_inputs
    from quantcli.models.stream import StreamedModel

    ids = open_artifact(calib_dir).tensors("calib.safetensors")["input_ids"]
    streamed = StreamedModel(Path(model_dir))
    streamed.model.config.use_cache = False
    started = time.time()
    with torch.no_grad(), streamed.outside_layers("cpu") as outer:
        x, kwargs = capture_layer_inputs(outer, streamed.layers, ids, batch)
    for i in range(len(streamed.layers)):
        layer = streamed.onload_layer(i, "cpu")
        x = layer_forward(layer, x, kwargs[i], torch.device("cpu"), batch)
        streamed.offload_layer(i)
    print(json.dumps({"seconds": time.time() - started}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(SHAPES), default="1.2b")
    ap.add_argument("--stages", default="rtn,gptq,awq,eval-ppl,pack")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--label", default="after", help="run label in the JSON (e.g. before = main's code)")
    ap.add_argument("--stage-timeout", type=float, default=None, help="Ctrl-C a stage after this many seconds (rows then hold layers done)")
    ap.add_argument("--src", type=Path, default=ROOT, help="quantcli checkout the stages run (e.g. main's, for before)")
    ap.add_argument("--no-forward", action="store_true", help="skip the plain forward (keep the one already in the JSON)")
    ap.add_argument("--note", default="", help="what else ran on the machine (recorded with the load averages)")
    ap.add_argument("--forward", nargs=3, metavar=("MODEL", "CALIB", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.forward:
        return plain_forward(args.forward[0], args.forward[1], int(args.forward[2]))

    t0 = time.time()
    model = build(args.model)
    build_s = time.time() - t0
    run = WORK / f"runs-{args.model}-{args.label}"
    q = [sys.executable, "-m", "quantcli"]
    calib = run / "calib"
    text = ROOT / "benchmarks" / "results" / "work" / "scale" / "text.txt"
    if not text.is_file():
        from quantcli.calib.data import load_texts

        text.write_text(load_texts("builtin", "train").joined())
    rows: dict[str, dict] = {}
    if not (calib / "manifest.json").is_file():
        rows["calibrate"] = measure(q + ["calibrate", str(model), "--dataset", str(text), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "-o", str(calib), "--force", "-q"], args.src)  # the checkout measured reads its own artifacts
    forward_s = None
    if not args.no_forward:
        fwd = measure([sys.executable, __file__, "--forward", str(model), str(calib), "8"])
        forward_s = json.loads(fwd.pop("stdout"))["seconds"] if fwd["rc"] == 0 else None
        rows["plain_forward"] = {**fwd, "forward_seconds": forward_s}
    weights = ["--w4", "--group", "128"]
    commands = {
        "rtn": q + ["rtn", str(model), *weights, "-o", str(run / "rtn"), "--force", "-q", "--device", "cpu"],
        "gptq": q + ["gptq", str(model), *weights, "--calib", str(calib), "-o", str(run / "gptq"), "--force", "-q", "--device", "cpu"],
        "awq": q + ["awq", str(model), *weights, "--calib", str(calib), "-o", str(run / "awq"), "--force", "-q", "--device", "cpu"],
        "eval-ppl": q + ["eval-ppl", str(run / "rtn"), "--dataset", str(text), "--seqlen", str(args.seqlen), "--max-windows", str(args.windows), "--json", "-q", "--device", "cpu"],
        "pack": q + ["pack", str(run / "rtn"), "-o", str(run / "packed"), "--force", "-q"],
        "eval-packed": q + ["eval-ppl", str(run / "packed"), "--dataset", str(text), "--seqlen", str(args.seqlen), "--max-windows", str(args.windows), "--json", "-q", "--device", "cpu"],
    }
    whole = os.environ.get("QUANTCLI_STREAM") == "0"  # every stage loads the whole model first (the pre-streaming path)
    for name in args.stages.split(","):
        stage = f"{name} (QUANTCLI_STREAM=0)" if whole else name
        print(f"running {stage} …", file=sys.stderr, flush=True)
        output = run / name if name in ("rtn", "gptq", "awq", "pack") else None
        rows[stage] = measure(commands[name], args.src, args.stage_timeout if name in ("gptq", "awq") else None, output)
        if forward_s and name in ("gptq", "awq", "rtn") and rows[stage]["rc"] in (0, 130):
            if "stopped_after_layers" in rows[stage]:  # stopped early: whole-stage time estimated from its layers
                estimate = rows[stage]["mean_layer_seconds"] * SHAPES[args.model]["num_hidden_layers"]
                rows[stage]["x_plain_forward_estimated"] = round(estimate / forward_s, 1)
            elif rows[stage]["rc"] == 0:
                rows[stage]["x_plain_forward"] = round(rows[stage]["seconds"] / forward_s, 1)
        print(f"  {stage}: {rows[stage]['seconds']} s, peak {rows[stage]['peak_rss_gb']} GB, rc {rows[stage]['rc']}", file=sys.stderr, flush=True)

    shape = SHAPES[args.model]
    params = shape["num_hidden_layers"] * (4 * shape["hidden_size"] ** 2 + 3 * shape["hidden_size"] * shape["intermediate_size"]) + 2 * shape["vocab_size"] * shape["hidden_size"]
    entry = {
        "model": {"name": args.model, **shape, "parameters": params, "float32_gb": round(4 * params / 1e9, 2),
                  "bf16_on_disk_gb": round(sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9, 2),
                  "path": str(model.relative_to(ROOT))},
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.windows},
        "build_seconds": round(build_s, 1),
        "machine": {"cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
                    "note": args.note},
        "code": "this branch" if args.src == ROOT else str(args.src),
        "stages": rows,
    }
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    key = f"{args.model}/{args.label}"
    if key in data:  # a run of some stages adds to the stages of the earlier run
        entry["stages"] = {**data[key].get("stages", {}), **rows}
    data[key] = entry
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{'stage':<14}{'seconds':>10}{'peak RSS GB':>14}{'x forward':>11}{'x fwd same run':>16}{'rc':>4}")
    for stage, row in rows.items():
        print(f"{stage:<14}{row['seconds']:>10}{row['peak_rss_gb']:>14}{row.get('x_plain_forward', row.get('x_plain_forward_estimated', '')):>11}{row.get('x_forward_same_run', ''):>16}{row['rc']:>4}")
    print(f"float32 size {entry['model']['float32_gb']} GB → 25 % = {entry['model']['float32_gb'] / 4:.2f} GB")


if __name__ == "__main__":
    main()
