"""Architecture table, canonicalisation and function preservation for every table entry."""

import pytest
import torch
from torch import nn

from conftest import tiny_models
from quantcli.algos.scaling import can_fold, fold_scales
from quantcli.errors import UnsupportedArchitecture
from quantcli.models.arch import ARCHITECTURES, arch_spec, decoder_layers, quantizable_linears, resolve_groups
from quantcli.models.canonical import LinearExperts, RMSNorm, canonicalize, hf_state_dict

MODELS = tiny_models()
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def test_every_table_entry_has_a_tiny_model():
    assert set(MODELS) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_canonicalize_keeps_logits_and_state(arch):
    model = MODELS[arch]()
    before = model(IDS).logits
    original = {k: v.clone() for k, v in model.state_dict().items()}
    canonicalize(model)
    assert torch.allclose(model(IDS).logits, before, atol=1e-5)
    restored = hf_state_dict(model)
    assert set(restored) == set(original)
    for key, value in original.items():
        assert torch.allclose(restored[key], value, atol=1e-6), key
    if "Gemma" in arch:
        assert any(isinstance(m, RMSNorm) for m in model.modules())
    if "Moe" in arch or "Mixtral" in arch:
        assert any(isinstance(m, LinearExperts) for m in model.modules())


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_folding_random_scales_preserves_function(arch):
    """Folding random positive scales into every foldable group leaves the logits unchanged."""
    model = canonicalize(MODELS[arch]())
    spec = arch_spec(model)
    before = model(IDS).logits
    gen = torch.Generator().manual_seed(1)
    folded = 0
    with torch.no_grad():
        for layer in decoder_layers(model, spec):
            for group in resolve_groups(layer, spec):
                if not can_fold(layer, group):
                    continue
                width = layer.get_submodule(group.prev).weight.shape[0]
                fold_scales(layer, group, torch.rand(width, generator=gen) * 4 + 0.25)
                folded += 1
    after = model(IDS).logits
    assert folded >= 2 * 3
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4), (after - before).abs().max()


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_groups_and_linears_resolve(arch):
    model = canonicalize(MODELS[arch]())
    spec = arch_spec(model)
    layer = decoder_layers(model, spec)[0]
    stages = quantizable_linears(layer, spec)
    names = [n for stage in stages for n in stage]
    assert all(isinstance(layer.get_submodule(n), nn.Linear) for n in names)
    assert "self_attn.q_proj" in names and not any(n in ("mlp.gate", "mlp.shared_expert_gate") for n in names)
    groups = {g.name: g for g in resolve_groups(layer, spec)}
    assert "attn_in" in groups
    if "Moe" in arch or "Mixtral" in arch:
        assert "mlp.gate" in groups["moe_in"].linears  # the router is scaled with its group
        assert sum(n.startswith("expert_out.") for n in groups) == 4


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(UnsupportedArchitecture, match="add an ArchSpec for it to ARCHITECTURES in quantcli/models/arch.py"):
        arch_spec("FalconForCausalLM")


def test_aliases_share_the_llama_entry():
    for name in ("MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert ARCHITECTURES[name] is ARCHITECTURES["LlamaForCausalLM"]
