"""The real SmolLM2-135M (see ../shared/DATA.md): eval-ppl against a plain loop, RTN's degradation.

Slow (minutes on 2 CPU cores): deselect with ``-m "not slow"``. Windows are small and few.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantcli.cli.app import app

pytestmark = pytest.mark.slow

AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"
EVAL_TEXT = AUSTEN / "prideprejudice.txt"
SEQLEN, WINDOWS = 512, 4
runner = CliRunner()


@pytest.fixture(scope="module")
def real():
    pytest.importorskip("gguf")
    from quantcli.loading import load_input

    if not EVAL_TEXT.is_file():
        pytest.skip(f"{EVAL_TEXT} missing (../shared beside the checkout)")
    return load_input(None)


def ppl(*args):
    result = runner.invoke(app, ["eval-ppl", *map(str, args), "--dataset", str(EVAL_TEXT), "--seqlen", str(SEQLEN),
                                 "--max-windows", str(WINDOWS), "--json", "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["ppl"]


def test_eval_ppl_matches_a_plain_transformers_loop(real):
    """Our protocol's number equals exp(mean of model(..., labels=...).loss) over the same windows."""
    ids = real.tokenizer(EVAL_TEXT.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    losses = []
    with torch.no_grad():
        for i in range(WINDOWS):
            window = ids[i * SEQLEN : (i + 1) * SEQLEN].unsqueeze(0)
            losses.append(real.model(input_ids=window, labels=window).loss.item())
    plain = math.exp(sum(losses) / len(losses))
    ours = ppl()
    assert abs(ours - plain) / plain < 1e-3, (ours, plain)


@pytest.fixture(scope="module")
def rtn_ppls(real, tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    results = {"fp": ppl()}
    for bits, group in ((4, 64), (3, 64), (2, 64)):
        path = out / f"w{bits}"
        made = runner.invoke(app, ["rtn", "--wbits", str(bits), "--group", str(group), "-o", str(path), "-q", "--device", "cpu"])
        assert made.exit_code == 0, made.output
        results[f"w{bits}"] = ppl(path)
    print("real-model RTN perplexities:", results)
    return results


def test_rtn_w4_stays_within_a_quarter_of_fp(rtn_ppls):
    assert rtn_ppls["fp"] < rtn_ppls["w4"] < 1.3 * rtn_ppls["fp"]


def test_lower_bits_degrade_in_order(rtn_ppls):
    assert rtn_ppls["w3"] > 1.5 * rtn_ppls["w4"]  # clearly worse
    assert rtn_ppls["w2"] > 10 * rtn_ppls["w3"]  # much worse
