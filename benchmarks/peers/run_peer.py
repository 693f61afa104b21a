"""Quantize a model with a peer tool and measure its perplexity on fixed evaluation windows.

Runs INSIDE the peer's venv (see setup_peers.sh):

    .peer-venvs/llmcompressor/bin/python benchmarks/peers/run_peer.py --tool llmcompressor-awq \
        --model HF_DIR --calib calib.pt --eval eval.pt --wbits 4 --group 64 --asym --out result.json
    .peer-venvs/gptqmodel/bin/python benchmarks/peers/run_peer.py --tool gptqmodel-gptq ...

calib.pt: LongTensor [N, L] of calibration blocks; eval.pt: LongTensor [W, L] of evaluation windows.
quant_seconds times the peer's quantization call only (not loading, saving or evaluation).
Perplexity follows the GPTQ protocol: exp(mean over windows of the window's mean next-token NLL),
computed in float32 on the CPU with the peer's own quantized model (see `notes` in the JSON).
The peer's default settings are kept except bits, group size and symmetry; lm_head stays fp.
"""

import argparse
import importlib.metadata
import json
import math
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    model.eval()
    nlls = []
    for w in windows:
        ids = w.view(1, -1)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nlls.append(F.cross_entropy(logits, ids[0, 1:]).item())
    return math.exp(sum(nlls) / len(nlls))


def run_llmcompressor_awq(a, calib, windows):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM

    # llmcompressor 0.13-0.14 AWQ pins cached activations unconditionally, which raises
    # "Cannot access accelerator device when none is available" on a CPU-only torch. Pinning only
    # speeds host-to-GPU copies, so skipping it on CPU changes no number.
    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    weights = QuantizationArgs(num_bits=a.wbits, type="int", symmetric=a.sym, strategy="group", group_size=a.group)
    recipe = [
        AWQModifier(),  # default Llama mappings, duo_scaling, n_grid=20
        QuantizationModifier(ignore=["lm_head"], config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}),
    ]
    t0 = time.time()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    seconds = time.time() - t0
    ppl = perplexity(model, windows)
    count = sum(getattr(getattr(m, "quantization_scheme", None), "weights", None) is not None for m in model.modules())
    notes = (f"AWQModifier + QuantizationModifier (group strategy, int, default observer); evaluated with the "
             f"in-memory compressed-tensors fake-quant forward ({count} Linear layers, weights quantize-dequantized "
             "on each forward), fp32; "
             "IntermediatesCache.pin_memory made a no-op on CPU (CUDA-only bug in the peer)")
    return "llmcompressor " + importlib.metadata.version("llmcompressor"), seconds, ppl, notes


def run_gptqmodel_gptq(a, calib, windows):
    # GPTQModel sizes its CPU pool as (cores+1)//2 but asks for a 2-worker loader sub-pool, so on
    # a 2-core machine quantize() fails: "Virtual pool 'model_loader:cpu' requests 2 workers but
    # parent 'cpu' only has 1". Its own env override fixes it.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from transformers import AutoModelForCausalLM

    qcfg = QuantizeConfig(bits=a.wbits, group_size=a.group, sym=a.sym, device="cpu")
    model = GPTQModel.load(a.model, qcfg, dtype=torch.float32)
    data = [{"input_ids": row.view(1, -1), "attention_mask": torch.ones(1, row.numel(), dtype=torch.long)} for row in calib]
    t0 = time.time()
    model.quantize(data, batch_size=1)
    seconds = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        saved = a.keep or tmp
        model.save(saved)
        del model
        qcfg_used = json.load(open(os.path.join(saved, "quantize_config.json")))
        # The torch kernel refuses float32 ("only supports [float16, bfloat16]"), so load the saved
        # checkpoint with it in float16 (its scales are stored as float16 anyway), dequantize each
        # layer with the peer's own unpacking, in float32, into the fp32 model and evaluate that.
        qmodel = GPTQModel.load(saved, backend=BACKEND.GPTQ_TORCH, device="cpu", dtype=torch.float16)
        fp = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        linears = dict(fp.named_modules())
        count = 0
        for name, m in qmodel.model.named_modules():
            if hasattr(m, "dequantize_weight") and hasattr(m, "qweight"):
                m.scales = m.scales.float()
                linears[name].weight.data.copy_(m.dequantize_weight().T)
                count += 1
        ppl = perplexity(fp, windows)
    meta = qcfg_used.get("meta", {})
    notes = (f"{count} layers dequantized (peer's TorchLinear.dequantize_weight, float32) from the saved GPTQ "
             f"checkpoint into the fp32 model; desc_act={qcfg_used.get('desc_act')} "
             f"damp_percent={meta.get('damp_percent')} act_group_aware={meta.get('act_group_aware')} "
             f"true_sequential={meta.get('true_sequential')}")
    return "gptqmodel " + importlib.metadata.version("gptqmodel"), seconds, ppl, notes


TOOLS = {"llmcompressor-awq": run_llmcompressor_awq, "gptqmodel-gptq": run_gptqmodel_gptq}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tool", choices=sorted(TOOLS), required=True)
    p.add_argument("--model", required=True, help="fp Hugging Face model directory")
    p.add_argument("--calib", required=True, help="calib.pt: LongTensor [N, L]")
    p.add_argument("--eval", required=True, help="eval.pt: LongTensor [W, L]")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--sym", dest="sym", action="store_true", help="symmetric grid")
    p.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (default)")
    p.set_defaults(sym=False)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--keep", default=None, help="gptqmodel: keep the saved quantized checkpoint in this directory")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    calib, windows = torch.load(a.calib).long(), torch.load(a.eval).long()
    version, seconds, ppl, notes = TOOLS[a.tool](a, calib, windows)
    result = {"tool": a.tool, "version": f"{version}; torch {torch.__version__}", "wbits": a.wbits,
              "group": a.group, "sym": a.sym, "quant_seconds": round(seconds, 2), "ppl": ppl,
              "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "notes": notes}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
