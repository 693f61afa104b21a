"""Load a `quant pack --format gptq` checkpoint with GPTQModel itself and compare its perplexity.

Runs inside the gptqmodel venv (benchmarks/peers/setup_peers.sh):

    .peer-venvs/gptqmodel/bin/python benchmarks/peers/load_packed_gptq.py PACKED_DIR --eval eval.pt

Loads with GPTQModel's torch backend in float16, evaluates the windows of eval.pt (LongTensor
[W, L]) with GPTQModel's own forward, and prints JSON {ppl, windows, dtype, backend}.
"""

import argparse
import json
import math
import os

import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed")
    ap.add_argument("--eval", required=True)
    a = ap.parse_args()
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(a.packed, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    windows = torch.load(a.eval)
    nlls = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w.view(1, -1)).logits[0, :-1].float()
            nlls.append(torch.nn.functional.cross_entropy(logits, w[1:]).item())
    print(json.dumps({"ppl": math.exp(sum(nlls) / len(nlls)), "windows": len(nlls), "dtype": "float16", "backend": "gptqmodel torch"}))


if __name__ == "__main__":
    main()
