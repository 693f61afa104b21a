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
    one_line_error(quant("awq", tiny_model_dir, "--search-dtype", "fp8", "-o", tmp_path / "o"), "--search-dtype fp8: use mixed, auto, float32")
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


# ---------------------------------------------------------------- stages chain without repeating themselves


def test_stage_without_output_inherits_spec_and_calibration(tiny_model_dir, tmp_path):
    """The design card's shape on a small calibration: no -o, no weight flags, no calibration flags."""
    text = tiny_model_dir.parent / "text.txt"
    awq = quant("awq", tiny_model_dir, "--w3", "--group", 32, "--dataset", text, "--nsamples", 4, "--seqlen", 16, "-o", tmp_path / "out", "-q")
    assert awq.exit_code == 0, awq.output
    omni = quant("omniquant", tmp_path / "out", "--init-from", tmp_path / "out", "--epochs", 1, "-q")
    assert omni.exit_code == 0, omni.output
    made = tmp_path / "out-omniquant"
    assert omni.stdout.strip() == str(made)
    parent, child = open_artifact(tmp_path / "out").manifest, open_artifact(made).manifest
    assert child.spec == parent.spec and child.spec["wbits"] == 3 and child.spec["group"] == 32
    assert child.params["calibration"]["ids_sha256"] == parent.params["calibration"]["ids_sha256"]
    assert (child.params["calibration"]["nsamples"], child.params["calibration"]["seqlen"]) == (4, 16)
    before = (made / "manifest.json").read_text()
    one_line_error(quant("omniquant", tmp_path / "out", "--init-from", tmp_path / "out", "--epochs", 1), "already exists")
    assert (made / "manifest.json").read_text() == before


def test_calibration_flags_override_the_parent(tiny_model_dir, tmp_path):
    text = tiny_model_dir.parent / "text.txt"
    awq = quant("awq", tiny_model_dir, "--group", 32, "--dataset", text, "--nsamples", 4, "--seqlen", 16, "-o", tmp_path / "awq", "-q")
    assert awq.exit_code == 0, awq.output
    gptq = quant("gptq", tmp_path / "awq", "--dataset", text, "--nsamples", 3, "--seqlen", 16, "--seed", 1, "-o", tmp_path / "g", "-q")
    assert gptq.exit_code == 0, gptq.output
    calibration = open_artifact(tmp_path / "g").manifest.params["calibration"]
    assert (calibration["nsamples"], calibration["seed"]) == (3, 1) and "inherited_from" not in calibration
    assert open_artifact(tmp_path / "g").manifest.spec["group"] == 32  # the spec still comes from the AWQ INPUT


def test_default_seqlen_is_capped_at_the_context(tmp_path):
    from conftest import TINY_TEXT, char_tokenizer, tiny_llama

    model = tiny_llama()
    model.config.max_position_embeddings = 24
    model.save_pretrained(tmp_path / "m")
    char_tokenizer(TINY_TEXT).save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(TINY_TEXT)
    made = quant("calibrate", tmp_path / "m", "--dataset", tmp_path / "t.txt", "--nsamples", 2, "-o", tmp_path / "c", "-q")
    assert made.exit_code == 0, made.output
    assert open_artifact(tmp_path / "c").tensors("calib.safetensors")["input_ids"].shape == (2, 24)


def test_refusal_names_every_group_that_divides(tiny_model_dir, tmp_path):
    one_line_error(quant("rtn", tiny_model_dir, "--group", 128, "-o", tmp_path / "o"), "try --group 64 or 32 or 16")


# ---------------------------------------------------------------- fallbacks are shown, dense linears get GPTQ


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    from conftest import TINY_TEXT, char_tokenizer, tiny_models

    path = tmp_path_factory.mktemp("moe") / "model"
    tiny_models()["MixtralForCausalLM"]().save_pretrained(path)
    char_tokenizer(TINY_TEXT).save_pretrained(path)
    return path


def test_gptq_summary_shows_fallbacks(tiny_moe_dir, tiny_model_dir, tmp_path):
    text = tiny_model_dir.parent / "text.txt"
    args = ["gptq", tiny_moe_dir, "--group", 32, "--dataset", text, "--nsamples", 2, "--seqlen", 16, "--min-expert-tokens", 10**6]
    shown = quant(*args, "-o", tmp_path / "g")
    assert shown.exit_code == 0, shown.output
    assert "fallbacks" in shown.stderr and "mlp.experts.0.gate_proj: rounded to nearest" in shown.stderr
    recorded = [note for m in open_artifact(tmp_path / "g").manifest.metrics["layers"] for note in m.get("fallbacks", [])]
    assert recorded and all(note.startswith("mlp.experts.") for note in recorded)
    quiet = quant(*args, "-o", tmp_path / "q", "-q")
    assert quiet.exit_code == 0 and f"{len(recorded)} fallbacks" in quiet.stderr


def test_dense_linears_get_gptq_under_min_expert_tokens(tiny_model_dir, tmp_path):
    text = tiny_model_dir.parent / "text.txt"
    calib = ["--dataset", text, "--nsamples", 2, "--seqlen", 8, "--group", 32, "-q"]  # 16 tokens < 64
    assert quant("gptq", tiny_model_dir, *calib, "-o", tmp_path / "g").exit_code == 0
    assert quant("rtn", tiny_model_dir, *calib, "-o", tmp_path / "r").exit_code == 0
    gptq, rtn = read_quantized(open_artifact(tmp_path / "g")), read_quantized(open_artifact(tmp_path / "r"))
    assert not any(m.get("fallbacks") for m in open_artifact(tmp_path / "g").manifest.metrics["layers"])
    assert all(not torch.equal(gptq[name].codes, rtn[name].codes) for name in gptq)


# ---------------------------------------------------------------- packed checkpoints, bench, demo, transforms, W-A


BENCH_FAST = ["--prompt-lens", 8, "--gen", 2, "--reps", 1, "--warmup", 0, "--device", "cpu", "--json", "-q"]


@pytest.fixture(scope="module")
def packed(calib_and_rtn, tiny_model_dir, tmp_path_factory):
    import shutil

    out, _ = calib_and_rtn
    root = tmp_path_factory.mktemp("packed")
    shutil.copytree(tiny_model_dir, root / "model")  # a base model this module may delete
    made = quant("rtn", root / "model", "--group", 32, "-o", root / "rtn", "-q")
    assert made.exit_code == 0, made.output
    pack = quant("pack", root / "rtn", "-o", root / "packed", "-q")  # default: asymmetric compressed-tensors
    assert pack.exit_code == 0, pack.output
    assert pack.stdout.strip() == str(root / "packed")
    return root


def test_eval_ppl_reads_a_packed_checkpoint(packed, tiny_model_dir):
    text = tiny_model_dir.parent / "text.txt"
    args = ["--dataset", text, "--seqlen", 64, "--max-windows", 2, "--json", "-q"]
    from_packed = json.loads(quant("eval-ppl", packed / "packed", *args).stdout)
    from_artifact = json.loads(quant("eval-ppl", packed / "rtn", *args).stdout)
    assert from_packed["kind"] == "packed" and from_packed["format"] == "compressed-tensors"
    assert from_packed["spec"]["group"] == 32 and from_packed["spec"]["sym"] is False
    assert from_packed["ppl"] == pytest.approx(from_artifact["ppl"], rel=2e-3)  # fp16 scales in the pack


def test_bench_packed_with_baseline(packed):
    result = quant("bench", packed / "packed", "--baseline", "bf16", *BENCH_FAST)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["kind"] == "packed" and record["format"] == "compressed-tensors"
    assert record["baseline"]["dtype"] == "bfloat16" and record["ratios"]["weight_bytes_ratio"] < 1


def test_bench_artifact_with_baseline(packed):
    result = quant("bench", packed / "rtn", "--baseline", "fp32", *BENCH_FAST)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["kind"] == "rtn" and record["baseline"]["weight_bytes"] > record["weight_bytes"]


def test_bench_baseline_of_a_packed_checkpoint_whose_base_is_gone(packed, tmp_path):
    import shutil

    shutil.copytree(packed / "packed", tmp_path / "packed")
    shutil.move(packed / "model", tmp_path / "moved")
    try:
        one_line_error(quant("bench", tmp_path / "packed", "--baseline", "bf16", *BENCH_FAST), "is gone")
        assert quant("bench", tmp_path / "packed", *BENCH_FAST).exit_code == 0  # without --baseline it needs no base
    finally:
        shutil.move(tmp_path / "moved", packed / "model")


def test_demo_on_a_tiny_model(tiny_model_dir, tmp_path):
    result = quant("demo", "--model", tiny_model_dir, "--windows", 1, "--workdir", tmp_path / "demo", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert set(rows) == {"fp32", "rtn w4g64", "awq w4g64"} and all(v > 1 for v in rows.values())
    assert open_artifact(tmp_path / "demo" / "awq-w4g64").kind == "awq"


def test_awq_save_transformed(calib_and_rtn, tiny_model_dir, tmp_path):
    from quantcli.loading import load_input
    from quantcli.quant import QuantSpec, quantize_weight

    out, _ = calib_and_rtn
    made = quant("awq", tiny_model_dir, "--w3", "--group", 32, "--calib", out / "calib", "-o", tmp_path / "awq",
                 "--save-transformed", tmp_path / "fp", "-q")
    assert made.exit_code == 0, made.output
    codes = read_quantized(open_artifact(tmp_path / "awq"))
    transformed = load_input(str(tmp_path / "fp")).model  # a plain HF directory
    spec = QuantSpec(wbits=3, group=32)
    for name, qw in codes.items():  # rounding the scaled, clipped weights gives the artifact's weights
        w = transformed.get_submodule(name).weight.data
        torch.testing.assert_close(quantize_weight(w, spec).dequantize(), qw.dequantize(), rtol=0, atol=1e-4)
    # written layer by layer from the streamed base model: the same tensors as the eagerly materialised, clipped model
    from safetensors.torch import load_file

    from quantcli.algos.awq import clip_weights
    from quantcli.loading import materialize
    from quantcli.models.canonical import hf_state_dict

    index = json.loads((tmp_path / "fp" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 3  # one shard per decoder layer and one for the rest
    saved = {k: v for file in set(index.values()) for k, v in load_file(str(tmp_path / "fp" / file)).items()}
    eager, _ = materialize(open_artifact(tmp_path / "awq"), quantized=False)
    clip_weights(eager, open_artifact(tmp_path / "awq"), spec)
    expected = {k: v for k, v in hf_state_dict(eager).items() if k != "lm_head.weight"}  # tied: stored once
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        assert saved[key].dtype == torch.float32 and torch.equal(saved[key], value), key
    one_line_error(quant("awq", tiny_model_dir, "--calib", out / "calib", "--group", 32, "-o", tmp_path / "again",
                         "--save-transformed", tmp_path / "fp"), "already exists")
    assert not (tmp_path / "again").exists()  # refused before any work


def test_eval_a_weight_activation_artifact(tiny_model_dir, tmp_path):
    text = tiny_model_dir.parent / "text.txt"
    ppl = {}
    for abits in (16, 8):
        made = quant("rtn", tiny_model_dir, "--w8", "--group", 32, "--abits", abits, "-o", tmp_path / f"a{abits}", "-q")
        assert made.exit_code == 0, made.output
        result = quant("eval-ppl", tmp_path / f"a{abits}", "--dataset", text, "--seqlen", 64, "--max-windows", 2, "--json", "-q")
        record = json.loads(result.stdout)
        assert record["kind"] == "rtn" and record["spec"]["abits"] == abits
        ppl[abits] = record["ppl"]
    assert ppl[8] != ppl[16]  # the activation quantizer is installed at evaluation


def test_inherited_calibration_from_a_calib_artifact_or_a_changed_dataset(calib_and_rtn, tiny_model_dir, tmp_path):
    out, text = calib_and_rtn
    awq = quant("awq", tiny_model_dir, "--group", 32, "--calib", out / "calib", "-o", tmp_path / "awq", "-q")
    assert awq.exit_code == 0, awq.output
    gptq = quant("gptq", tmp_path / "awq", "-q")  # no -o, no spec, no calibration flags
    assert gptq.exit_code == 0, gptq.output
    calibration = open_artifact(tmp_path / "awq-gptq").manifest.params["calibration"]
    assert calibration["artifact"] == str((out / "calib").resolve()) and calibration["inherited_from"] == str((tmp_path / "awq").resolve())

    moved = tmp_path / "text.txt"
    moved.write_text(text.read_text())
    made = quant("awq", tiny_model_dir, "--group", 32, "--dataset", moved, "--nsamples", 2, "--seqlen", 16, "-o", tmp_path / "a2", "-q")
    assert made.exit_code == 0, made.output
    moved.write_text(text.read_text()[::-1])  # same length, other tokens: the recorded digest no longer matches
    one_line_error(quant("gptq", tmp_path / "a2"), "no longer come out the same")
    assert not (tmp_path / "a2-gptq").exists()


def test_layer_progress_reports_eta_and_peak_memory(tiny_model_dir, tmp_path):
    """Off a terminal each finished layer is one stderr line with elapsed time, an ETA and the peak RSS.

    Catches a bar that drops the time estimate or the memory figure on long runs (issue 12).
    """
    text = tiny_model_dir.parent / "text.txt"
    result = quant(
        "gptq", tiny_model_dir, "--w4", "--group", 32, "--dataset", text, "--nsamples", 2, "--seqlen", 16, "-o", tmp_path / "gptq")
    assert result.exit_code == 0, result.output
    layer_lines = [line for line in result.stderr.splitlines() if " layer " in line and "/2:" in line]
    assert len(layer_lines) == 2, result.stderr
    first, last = layer_lines
    assert "peak RSS" in first and "GiB" in first and "eta" in first
    assert last.rstrip().endswith("eta 0s"), last


# ---------------------------------------------------------------- --offload-activations


def test_offload_activations_gives_the_same_artifact_and_ppl(calib_and_rtn, tiny_model_dir, tmp_path, monkeypatch):
    """The calibration streams (and eval-ppl's hidden states) in memory-mapped files in DIR: the
    artifact is bit-identical, the perplexity equal, and DIR is left empty."""
    from quantcli.algos.driver import ActivationStore

    out, text = calib_and_rtn
    mapped = []
    empty = ActivationStore.empty

    def spy(self, shape, dtype=None):
        mapped.append(self.directory is not None)
        return empty(self, shape, dtype)

    monkeypatch.setattr(ActivationStore, "empty", spy)
    offload = tmp_path / "acts" / "nested"
    args = ["--w4", "--group", 32, "--calib", out / "calib", "-q"]
    plain = quant("gptq", tiny_model_dir, *args, "-o", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    assert mapped and not any(mapped)
    disk = quant("gptq", tiny_model_dir, *args, "-o", tmp_path / "disk", "--offload-activations", offload)
    assert disk.exit_code == 0, disk.output
    assert mapped.count(True) >= 2 and offload.is_dir() and not any(offload.iterdir())
    files = lambda name: open_artifact(tmp_path / name).manifest.files  # noqa: E731
    assert files("disk") == files("plain")
    mapped.clear()
    evaluate = ["eval-ppl", out / "rtn", "--dataset", text, "--seqlen", 32, "--max-windows", 4, "--json", "-q"]
    ppl = json.loads(quant(*evaluate).stdout)["ppl"]
    assert ppl == json.loads(quant(*evaluate, "--offload-activations", offload).stdout)["ppl"] and True in mapped


@pytest.mark.parametrize("command", ["gptq", "eval-ppl"])
def test_offload_activations_bad_dir_is_one_line(command, calib_and_rtn, tiny_model_dir, tmp_path):
    out, _ = calib_and_rtn
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = ["--w4", "--calib", out / "calib", "-o", tmp_path / "g"] if command == "gptq" else []
    for bad in (blocker, blocker / "below"):
        one_line_error(quant(command, tiny_model_dir, *args, "--offload-activations", bad), f"--offload-activations {bad}")
    assert not (tmp_path / "g").exists()
