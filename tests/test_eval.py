"""Perplexity windows with and without BOS, against a plain ``model(labels=...)`` loop, and what the CLI records."""

import json
import math

import pytest
import torch
from conftest import TINY_TEXT, bos_char_tokenizer, tiny_llama
from typer.testing import CliRunner

from quantcli.artifact import open_artifact
from quantcli.cli.app import app
from quantcli.eval.ppl import perplexity, windows

runner = CliRunner()
SEQLEN = 32


def quant(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer puts [BOS] first by default (as Gemma's does), and a text file."""
    root = tmp_path_factory.mktemp("bos")
    tiny_llama(seed=1).save_pretrained(root / "model")
    bos_char_tokenizer(TINY_TEXT).save_pretrained(root / "model")
    (root / "text.txt").write_text(TINY_TEXT)
    return root / "model"


def plain_loop(model, rows: torch.Tensor) -> float:
    """exp(mean over windows of HF's own shifted loss), the reference every protocol must match."""
    with torch.no_grad():
        losses = [model(input_ids=row[None], labels=row[None]).loss.item() for row in rows]
    return math.exp(sum(losses) / len(losses))


def test_windows_without_bos_are_todays_windows():
    tokens = torch.arange(100)
    assert torch.equal(windows(tokens, 16), tokens[:96].view(6, 16))
    assert torch.equal(windows(tokens, 16, max_windows=2), tokens[:32].view(2, 16))


def test_windows_with_bos_are_bos_then_the_next_seqlen_minus_one_tokens():
    tokens = torch.arange(100)
    wins = windows(tokens, 16, bos=999)
    assert wins.shape == (6, 16)  # 100 // 15 chunks
    assert (wins[:, 0] == 999).all()
    assert torch.equal(wins[:, 1:].reshape(-1), tokens[:90])  # no text token lost or repeated


def test_perplexity_with_bos_scores_every_text_token_once_and_never_the_bos():
    model = tiny_llama(seed=2)
    tokens = torch.randint(1, 100, (200,), generator=torch.Generator().manual_seed(0))
    bos = 127
    result = perplexity(model, tokens, SEQLEN, bos=bos)
    count = 200 // (SEQLEN - 1)
    rows = torch.stack([torch.cat([torch.tensor([bos]), tokens[i * 31 : (i + 1) * 31]]) for i in range(count)])
    assert result["windows"] == count and result["scored_tokens"] == count * (SEQLEN - 1)
    assert result["bos_token_id"] == bos
    assert result["ppl"] == pytest.approx(plain_loop(model, rows), rel=1e-5)
    without = perplexity(model, tokens, SEQLEN)
    assert without["ppl"] == pytest.approx(plain_loop(model, tokens[: 6 * SEQLEN].view(6, SEQLEN)), rel=1e-5)
    assert without["ppl"] != pytest.approx(result["ppl"], rel=1e-3)


def test_eval_ppl_without_bos_is_todays_number(tiny_model_dir):
    """A tokenizer that adds no BOS: the old protocol (tokenize with defaults, plain windows) to the digit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = tiny_model_dir.parent / "text.txt"
    args = ("eval-ppl", tiny_model_dir, "--dataset", text, "--seqlen", SEQLEN, "--max-windows", 4, "--json", "-q", "--device", "cpu")
    out = json.loads(quant(*args).stdout)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(text.read_text(), return_tensors="pt").input_ids[0]
    assert out["bos"] == "auto" and out["bos_token_id"] is None and out["windows"] == 4
    assert out["ppl"] == pytest.approx(plain_loop(model, ids[: 4 * SEQLEN].view(4, SEQLEN)), rel=1e-5)


def test_eval_ppl_puts_bos_first_when_the_tokenizer_adds_one(bos_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = bos_model_dir.parent / "text.txt"
    args = ("eval-ppl", bos_model_dir, "--dataset", text, "--seqlen", SEQLEN, "--max-windows", 4, "--json", "-q", "--device", "cpu")
    auto = json.loads(quant(*args).stdout)
    never = json.loads(quant(*args, "--bos", "never").stdout)
    tok = AutoTokenizer.from_pretrained(bos_model_dir)
    model = AutoModelForCausalLM.from_pretrained(bos_model_dir).eval()
    stream = tok(text.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    bos = torch.tensor([tok.bos_token_id])
    with_bos = torch.stack([torch.cat([bos, stream[i * 31 : (i + 1) * 31]]) for i in range(4)])
    assert auto["bos"] == "auto" and auto["bos_token_id"] == tok.bos_token_id and "BOS" in auto["protocol"]
    assert auto["scored_tokens"] == 4 * (SEQLEN - 1)
    assert auto["ppl"] == pytest.approx(plain_loop(model, with_bos), rel=1e-5)
    assert never["bos"] == "never" and never["bos_token_id"] is None and "BOS" not in never["protocol"]
    assert never["ppl"] == pytest.approx(plain_loop(model, stream[: 4 * SEQLEN].view(4, SEQLEN)), rel=1e-5)


def test_calibration_records_and_applies_bos(bos_model_dir, tmp_path):
    text = bos_model_dir.parent / "text.txt"
    common = ("--dataset", text, "--nsamples", 4, "--seqlen", SEQLEN, "-q")
    quant("calibrate", bos_model_dir, *common, "-o", tmp_path / "auto")
    art = open_artifact(tmp_path / "auto")
    ids = art.tensors("calib.safetensors")["input_ids"]
    bos = art.manifest.params["bos_token_id"]
    assert art.manifest.params["bos"] == "auto" and bos is not None
    assert ids.shape == (4, SEQLEN) and (ids[:, 0] == bos).all() and not (ids[:, 1:] == bos).any()

    quant("gptq", bos_model_dir, "--w4", "--group", 32, *common, "--bos", "never", "-o", tmp_path / "gptq", "--device", "cpu")
    calib = open_artifact(tmp_path / "gptq").manifest.params["calibration"]
    assert calib["bos"] == "never" and calib["bos_token_id"] is None
