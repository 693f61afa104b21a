"""quant calibrate: cut seeded calibration token blocks from a dataset for one model's tokenizer."""

from __future__ import annotations

from quantcli.cli import _options as opt
from quantcli.cli._console import emit, err, status
from quantcli.loading import load_input
from quantcli.stage import CalibParams, write_calibration

EPILOG = """Examples:

  quant calibrate --dataset builtin -o calib/

  quant calibrate model/ --dataset wikitext2 --nsamples 128 --seqlen 2048 -o calib/

  quant calibrate model/ --dataset ../texts/emma.txt --nsamples 32 --seqlen 512 -o calib/
"""


def calibrate_command(
    input: opt.InputArg = None,
    output: opt.Output = ...,
    dataset: opt.Dataset = CalibParams.dataset,
    nsamples: opt.NSamples = CalibParams.nsamples,
    seqlen: opt.SeqLen = None,
    seed: opt.Seed = CalibParams.seed,
    bos: opt.Bos = CalibParams.bos,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Write a calibration artifact: token blocks [N, L] and where they came from."""
    source = opt.input_or_stdin(input)
    with status("loading tokenizer", quiet):
        loaded = load_input(source, quantized=False, stream=True)  # only the tokenizer and config are needed
    artifact = write_calibration(loaded, CalibParams(dataset, nsamples, seqlen, seed, bos), output, force)
    if not quiet:
        recorded = artifact.manifest.params
        err.print(f"calibration: {recorded['nsamples']} × {recorded['seqlen']} tokens from {dataset} (seed {seed}, {'no BOS' if recorded['bos_token_id'] is None else 'BOS first'})")
    emit(str(artifact.path))
