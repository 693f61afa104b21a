"""quant eval-ppl: perplexity of a model or artifact under the GPTQ protocol."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from quantcli.algos.driver import resolve_device
from quantcli.bench.run import describe_input
from quantcli.calib.data import bos_token, load_texts, tokenize
from quantcli.cli import _options as opt
from quantcli.cli._console import emit, err, status
from quantcli.eval.ppl import perplexity, perplexity_streamed
from quantcli.loading import load_input
from quantcli.stage import activation_store, default_seqlen

EPILOG = """Examples:

  quant eval-ppl model/ --dataset wikitext2

  quant awq model/ --w4 --group 128 -o out/ | quant eval-ppl --dataset wikitext2 --json

  quant eval-ppl out/ --dataset ../texts/prideprejudice.txt --seqlen 512 --max-windows 40
"""


def eval_ppl_command(
    input: opt.InputArg = None,
    dataset: opt.Dataset = "builtin",
    seqlen: opt.SeqLen = None,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", help="Evaluate only the first N windows.", min=1)] = None,
    bos: opt.Bos = "auto",
    device: opt.Device = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    quiet: opt.Quiet = False,
    offload_activations: opt.OffloadActivations = None,
) -> None:
    """Perplexity on a dataset's test split: joined with "\\n\\n", non-overlapping windows, exp(mean NLL)."""
    source = opt.input_or_stdin(input)
    acts = activation_store(offload_activations)  # a bad DIR fails before the model loads
    texts = load_texts(dataset, "test")
    with status("loading model", quiet):
        target = resolve_device(device)
        loaded = load_input(source, device=str(target), stream=True)
    bos_id = bos_token(loaded.tokenizer, bos)
    tokens = tokenize(loaded.tokenizer, texts.joined())
    seqlen = seqlen or default_seqlen(loaded.model)
    with status("evaluating", quiet):
        if loaded.stream is not None:  # layer by layer from the shards: one layer in memory
            result = perplexity_streamed(loaded.stream, tokens, seqlen, max_windows, target, bos_id, acts=acts)
        else:
            result = perplexity(loaded.model, tokens, seqlen, max_windows, bos_id)
    record = {
        **result,
        "model": source or "default",
        **describe_input(loaded),
        "dataset": texts.source["dataset"],
        "split": texts.source["split"],
        "text_sha256": texts.source["sha256"],
        "dtype": str(loaded.stream.dtype if loaded.stream else next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "device": str(target if loaded.stream else next(loaded.model.parameters()).device),
        "bos": bos,
        "protocol": "gptq: test split joined with \\n\\n, non-overlapping windows, exp(mean window NLL)"
        + ("" if bos_id is None else "; each window = BOS + seqlen-1 text tokens, BOS not scored"),
    }
    if as_json:
        emit(json.dumps(record))
    else:
        if not quiet:
            err.print(
                f"{record['dataset']} ({record['split']}): {record['windows']} windows × {seqlen} tokens"
                f"{'' if bos_id is None else ' (BOS first)'}, "
                f"{record['seconds']}s"
            )
        emit(f"{record['ppl']:.4f}")
