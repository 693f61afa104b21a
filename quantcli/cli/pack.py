"""quant pack: write a quantized artifact as a checkpoint inference engines load."""

from __future__ import annotations

from typing import Annotated

import torch
import typer

from quantcli.artifact import check_output_free
from quantcli.cli import _options as opt
from quantcli.cli._console import emit, err, status
from quantcli.errors import InputError
from quantcli.loading import load_input
from quantcli.pack.checkpoint import write_packed

EPILOG = """Examples:

  quant pack awq-w4/ --format compressed-tensors -o smollm2-w4-ct/

  quant pack gptq-w4/ --format gptq -o smollm2-w4-gptq/

  quant awq model/ --w4 --group 128 -o out/ | quant pack --format autoawq -o packed/
"""

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pack_command(
    input: opt.InputArg = None,
    output: opt.Output = ...,
    format: Annotated[str, typer.Option("--format", help="compressed-tensors, autoawq or gptq.")] = "compressed-tensors",
    dtype: Annotated[str, typer.Option("--dtype", help="dtype of the unquantized tensors: float16, bfloat16 or float32.")] = "float16",
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Pack an artifact's integer codes into a standard Hugging Face checkpoint."""
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    check_output_free(output, force)
    with status("loading artifact", quiet):
        loaded = load_input(opt.input_or_stdin(input), stream=True)  # layers read from the base model's shards as they are packed
    if loaded.artifact is None or not loaded.quantized:
        raise InputError(f"{input or 'input'}: not a quantized quantcli artifact; run rtn, awq, gptq or omniquant first")
    lineage = [
        {"kind": a.kind, "path": str(a.path.resolve()), "created_at": a.manifest.created_at, "spec": a.manifest.spec}
        for a in loaded.artifact.lineage()
    ]
    act_qparams = loaded.quantized.act_qparams() if loaded.spec.act_static else None
    with status("packing", quiet):
        out = write_packed(
            output, loaded.stream or loaded.model, loaded.tokenizer, loaded.quantized, loaded.spec, format, {"lineage": lineage},
            base=loaded.base, dtype=DTYPES[dtype], act_qparams=act_qparams, force=force,
        )
    if not quiet:
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        fp16 = 2 * sum(p.numel() for p in loaded.model.parameters())
        err.print(f"packed {len(loaded.quantized)} linears as {format}: {size / 2**20:.1f} MiB on disk, fp16 {fp16 / 2**20:.1f} MiB ({size / fp16:.2f}×)")
    emit(str(out))
