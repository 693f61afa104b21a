"""Artifact directories: round trip, atomic writes, schema, corruption and lineage checks."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from quantcli.artifact import BaseModelRef, Manifest, SCHEMA_VERSION, is_artifact, open_artifact, write_artifact
from quantcli.errors import ArtifactError, InputError

BASE = BaseModelRef(ref="/models/x", config_sha256="abc", architecture="LlamaForCausalLM")


def make(path, kind="rtn", parent=None, base=BASE):
    return write_artifact(path, Manifest(kind=kind, base_model=base, parent=parent, spec={"wbits": 4}), {"t.safetensors": {"a": torch.arange(6.0).view(2, 3)}})


def test_round_trip(tmp_path):
    art = make(tmp_path / "a")
    again = open_artifact(tmp_path / "a")
    assert again.manifest.kind == "rtn" and again.manifest.schema == SCHEMA_VERSION
    assert again.manifest.created_by.startswith("quantcli ")
    assert again.manifest.base_model == BASE
    assert torch.equal(again.tensors("t.safetensors")["a"], torch.arange(6.0).view(2, 3))
    assert set(art.manifest.files) == {"t.safetensors"} and len(art.manifest.files["t.safetensors"]) == 64


def test_existing_output_refused_without_force(tmp_path):
    make(tmp_path / "a")
    with pytest.raises(InputError, match="already exists"):
        make(tmp_path / "a")
    write_artifact(tmp_path / "a", Manifest(kind="awq", base_model=BASE), {}, force=True)
    assert open_artifact(tmp_path / "a").kind == "awq"


def test_killed_write_leaves_no_valid_artifact(tmp_path):
    out = tmp_path / "big"
    script = textwrap.dedent(f"""
        import os, signal, torch
        import quantcli.artifact as A
        real = A.sha256_file
        def slow(path):
            os.kill(os.getpid(), signal.SIGKILL)  # die mid-write, after the payload, before the manifest
        A.sha256_file = slow
        A.write_artifact({str(out)!r}, A.Manifest(kind="rtn", base_model=A.BaseModelRef("m", "h", "Llama")),
                         {{"t.safetensors": {{"a": torch.zeros(1000)}}}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert not is_artifact(out) and not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(".big.tmp-") for name in leftovers)


def test_newer_schema_refused(tmp_path):
    make(tmp_path / "a")
    manifest = tmp_path / "a" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["schema"] = SCHEMA_VERSION + 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="newer"):
        open_artifact(tmp_path / "a")


def test_corrupt_manifest_and_payload(tmp_path):
    make(tmp_path / "a")
    (tmp_path / "a" / "t.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="sha256"):
        open_artifact(tmp_path / "a").tensors("t.safetensors")
    (tmp_path / "a" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        open_artifact(tmp_path / "a")


def test_lineage_and_missing_parent(tmp_path):
    parent = make(tmp_path / "p", kind="awq")
    child = make(tmp_path / "c", kind="gptq", parent=parent.path)
    assert [a.kind for a in open_artifact(child.path).lineage()] == ["awq", "gptq"]
    assert open_artifact(child.path).manifest.parent == "../p"
    os.rename(tmp_path / "p", tmp_path / "moved")
    with pytest.raises(ArtifactError, match="parent artifact .* is missing"):
        open_artifact(child.path).lineage()


def test_parent_of_another_base_model_refused(tmp_path):
    parent = make(tmp_path / "p", base=BaseModelRef("/models/y", "other", "LlamaForCausalLM"))
    child = make(tmp_path / "c", parent=parent.path)
    with pytest.raises(ArtifactError, match="different base model"):
        child.lineage()
