"""The CLI through typer's CliRunner: the pipeline on a tiny model, and one-line errors for bad input."""

import json

import pytest
import torch
from typer.testing import CliRunner

from quantcli.artifact import open_artifact
from quantcli.cli.app import app
from quantcli.models.weights import read_quantized

runner = CliRunner()


def quant(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_line_error(result, pattern):
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("quant: error:"), result.stderr
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def calib_and_rtn(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    text = tiny_model_dir.parent / "text.txt"
    calib = quant("calibrate", tiny_model_dir, "--dataset", text, "--nsamples", 4, "--seqlen", 32, "-o", out / "calib", "-q")
    assert calib.exit_code == 0, calib.output
    rtn = quant("rtn", tiny_model_dir, "--w4", "--group", 32, "--calib", out / "calib", "-o", out / "rtn", "-q")
    assert rtn.exit_code == 0, rtn.output
    return out, text


def test_calibrate_writes_seeded_blocks(calib_and_rtn, tiny_model_dir):
    out, text = calib_and_rtn
    art = open_artifact(out / "calib")
    ids = art.tensors("calib.safetensors")["input_ids"]
    assert art.kind == "calib" and ids.shape == (4, 32)
    again = quant("calibrate", tiny_model_dir, "--dataset", text, "--nsamples", 4, "--seqlen", 32, "-o", out / "calib2", "-q")
    assert again.stdout.strip() == str(out / "calib2")
    assert torch.equal(open_artifact(out / "calib2").tensors("calib.safetensors")["input_ids"], ids)


def test_rtn_artifact_holds_codes_for_every_linear_but_lm_head(calib_and_rtn):
    out, _ = calib_and_rtn
    art = open_artifact(out / "rtn")
    weights = read_quantized(art)
    assert len(weights) == 2 * 7 and not any("lm_head" in n for n in weights)
    assert art.manifest.spec["wbits"] == 4 and art.manifest.spec["group"] == 32
    layers = art.manifest.metrics["layers"]
    assert len(layers) == 2 and all(m["loss"] > 0 for m in layers)


def test_eval_ppl_json_and_pipe(calib_and_rtn, tiny_model_dir):
    out, text = calib_and_rtn
    fp = quant("eval-ppl", tiny_model_dir, "--dataset", text, "--seqlen", 64, "--max-windows", 3, "--json", "-q")
    assert fp.exit_code == 0, fp.output
    record = json.loads(fp.stdout)
    assert record["windows"] == 3 and record["tokens"] == 192 and record["kind"] == "fp" and record["ppl"] > 1
    piped = quant("eval-ppl", "--dataset", text, "--seqlen", 64, "--max-windows", 3, "--json", "-q", input=f"{out / 'rtn'}\n")
    assert piped.exit_code == 0, piped.output
    assert json.loads(piped.stdout)["kind"] == "rtn"


def test_awq_then_gptq_chain(calib_and_rtn, tiny_model_dir):
    out, _ = calib_and_rtn
    awq = quant("awq", tiny_model_dir, "--w4", "--group", 32, "--calib", out / "calib", "-o", out / "awq", "-q")
    assert awq.exit_code == 0, awq.output
    tensors = open_artifact(out / "awq").tensors("awq.safetensors")
    assert "model.layers.0.attn_in.scales" in tensors and "model.layers.1.mlp.down_proj.clip" in tensors
    chained = quant("gptq", "--w4", "--group", 32, "--calib", out / "calib", "-o", out / "awq-gptq", "-q", input=str(out / "awq"))
    assert chained.exit_code == 0, chained.output
    assert [a.kind for a in open_artifact(out / "awq-gptq").lineage()] == ["awq", "gptq"]


# ---------------------------------------------------------------- bad input: one line, exit != 0, nothing written


def test_missing_path(tmp_path):
    one_line_error(quant("rtn", tmp_path / "nope", "-o", tmp_path / "o"), "no such file or directory")
    assert not (tmp_path / "o").exists()


def test_not_a_model(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hi")
    one_line_error(quant("rtn", tmp_path / "junk", "-o", tmp_path / "o"), "not a model directory")
    assert not (tmp_path / "o").exists()


def test_corrupt_manifest(tmp_path, calib_and_rtn):
    out, _ = calib_and_rtn
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{oops")
    one_line_error(quant("eval-ppl", broken), "corrupt manifest")


def test_group_not_dividing(tiny_model_dir, tmp_path):
    one_line_error(quant("rtn", tiny_model_dir, "--group", 48, "-o", tmp_path / "o"), "does not divide the input dimension 64")
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())


def test_unsupported_bits(tiny_model_dir, tmp_path):
    one_line_error(quant("rtn", tiny_model_dir, "--wbits", 9, "-o", tmp_path / "o"), "--wbits 9 is not supported")
    one_line_error(quant("rtn", tiny_model_dir, "--w3", "--w4", "-o", tmp_path / "o"), "conflicting weight bit flags")


def test_unknown_search_dtype(tiny_model_dir, tmp_path):
    one_line_error(quant("awq", tiny_model_dir, "--search-dtype", "fp8", "-o", tmp_path / "o"), "--search-dtype fp8: use auto, float32")
    assert not (tmp_path / "o").exists()


def test_unknown_dataset(tiny_model_dir, tmp_path):
    one_line_error(quant("calibrate", tiny_model_dir, "--dataset", "mystery", "-o", tmp_path / "c"), "unknown dataset 'mystery'")
    assert not (tmp_path / "c").exists()


def test_offline_dataset_not_cached(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    one_line_error(quant("eval-ppl", tiny_model_dir, "--dataset", "wikitext2"), "is not available offline")


def test_output_exists(calib_and_rtn, tiny_model_dir):
    out, _ = calib_and_rtn
    before = (out / "rtn" / "manifest.json").read_text()
    one_line_error(quant("rtn", tiny_model_dir, "--group", 32, "-o", out / "rtn"), "already exists")
    assert (out / "rtn" / "manifest.json").read_text() == before


def test_calibration_from_another_model(calib_and_rtn, tmp_path):
    from conftest import char_tokenizer, tiny_llama, TINY_TEXT

    out, _ = calib_and_rtn
    other = tmp_path / "other"
    model = tiny_llama(seed=1)
    model.config.num_hidden_layers = 2
    model.config.rms_norm_eps = 1e-5 + 1e-7  # another config → another hash
    model.save_pretrained(other)
    char_tokenizer(TINY_TEXT).save_pretrained(other)
    one_line_error(quant("awq", other, "--group", 32, "--calib", out / "calib", "-o", tmp_path / "o"), "was made for model")
    assert not (tmp_path / "o").exists()


def test_empty_pipe_is_an_error(tmp_path):
    result = runner.invoke(app, ["eval-ppl"], input="not/a/path\n")
    one_line_error(result, "is not a path")


def test_base_model_changed_since_the_artifact(tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    made = quant("rtn", model, "--group", 32, "-o", tmp_path / "rtn", "-q")
    assert made.exit_code == 0, made.output
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (model / "config.json").write_text(json.dumps(config))
    one_line_error(quant("eval-ppl", tmp_path / "rtn"), "has changed since the artifact was made")
