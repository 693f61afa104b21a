"""Texts and calibration blocks: named datasets fail offline at once, BOS per block when the tokenizer wants it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, bos_char_tokenizer, char_tokenizer

from quantcli.calib.data import Texts, bos_token, calibration_blocks, hub_offline, load_texts, tokenize
from quantcli.errors import DatasetError, InputError

ROOT = Path(__file__).resolve().parents[1]


def test_uncached_named_dataset_fails_at_once_with_one_line(tiny_model_dir, tmp_path):
    """No network retries (they took ~25 s and printed ten lines on stderr): one error line, exit ≠ 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "QUANTCLI_ALLOW"))}
    env.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "quantcli", "eval-ppl", str(tiny_model_dir), "--dataset", "wikitext2"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and proc.stdout == ""
    assert len(lines) == 1 and lines[0].startswith("quant: error: dataset wikitext2"), proc.stderr
    for hint in (".txt", "cache", "QUANTCLI_ALLOW_DOWNLOAD=1"):
        assert hint in lines[0]


def test_hub_offline_reaches_modules_imported_before_it(monkeypatch):
    """The offline switches are read at import: already-imported hub/datasets modules must be switched too."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "QUANTCLI_ALLOW_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("QUANTCLI_ALLOW_DOWNLOAD", "1")
    hub_offline()
    assert not huggingface_hub.constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE
    monkeypatch.delenv("QUANTCLI_ALLOW_DOWNLOAD")
    hub_offline()
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_unknown_dataset_is_one_line():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_texts("no-such-dataset", "test")


def test_bos_token_follows_what_the_tokenizer_does_by_default():
    adds = bos_char_tokenizer(TINY_TEXT)
    plain = char_tokenizer(TINY_TEXT)
    has_but_never_adds = char_tokenizer(TINY_TEXT)  # like SmolLM2: a bos_token it does not add
    has_but_never_adds.add_special_tokens({"bos_token": "[BOS]"})
    bos = adds.bos_token_id
    assert bos is not None and adds("ab")["input_ids"][0] == bos
    assert bos_token(adds, "auto") == bos and bos_token(adds, "always") == bos
    assert bos_token(adds, "never") is None
    assert bos_token(plain, "auto") is None and bos_token(plain, "never") is None
    assert bos_token(has_but_never_adds, "auto") is None
    assert bos_token(has_but_never_adds, "always") == has_but_never_adds.bos_token_id
    with pytest.raises(InputError, match="no BOS token"):
        bos_token(plain, "always")
    with pytest.raises(InputError, match="--bos"):
        bos_token(adds, "sometimes")


def test_tokenize_adds_no_special_tokens():
    """The stream is text only; a BOS at its head (today's add_special_tokens=True) would leak into window 0."""
    tok = bos_char_tokenizer(TINY_TEXT)
    ids = tokenize(tok, TINY_TEXT)
    assert ids.numel() == len(TINY_TEXT) and not (ids == tok.bos_token_id).any()


def _texts():
    return Texts([TINY_TEXT], {"dataset": "tiny"})


def test_blocks_without_bos_are_todays_blocks():
    """A tokenizer that adds no BOS keeps the plain protocol bit for bit (the old code, inlined)."""
    tok = char_tokenizer(TINY_TEXT)
    ids = tok(TINY_TEXT, return_tensors="pt", add_special_tokens=True).input_ids[0]
    gen = torch.Generator().manual_seed(3)
    starts = torch.randint(0, ids.numel() - 32, (6,), generator=gen)
    old = torch.stack([ids[s : s + 32] for s in starts.tolist()])
    assert torch.equal(calibration_blocks(tok, _texts(), 6, 32, 3, bos_token(tok, "auto")), old)


def test_blocks_with_bos_hold_bos_then_seqlen_minus_one_consecutive_text_tokens():
    tok = bos_char_tokenizer(TINY_TEXT)
    bos = bos_token(tok, "auto")
    blocks = calibration_blocks(tok, _texts(), 6, 32, 3, bos)
    stream = tokenize(tok, TINY_TEXT)
    assert blocks.shape == (6, 32)
    assert (blocks[:, 0] == bos).all() and not (blocks[:, 1:] == bos).any()
    windows = stream.unfold(0, 31, 1)  # every run of 31 consecutive text tokens
    for block in blocks:
        assert (windows == block[1:]).all(dim=1).any()
    never = calibration_blocks(tok, _texts(), 6, 32, 3, bos_token(tok, "never"))
    assert never.shape == (6, 32) and not (never == bos).any()


def test_too_little_text_is_one_line():
    tok = bos_char_tokenizer(TINY_TEXT)
    with pytest.raises(DatasetError, match="fewer than --seqlen"):
        calibration_blocks(tok, Texts(["short"], {"dataset": "tiny"}), 2, 32, 0, bos_token(tok, "auto"))
