"""Architecture differences as data.

Each entry describes one decoder layer in module paths relative to that layer:

* ``groups``: the scaling groups. A per-input-channel scale ``s`` may be folded out of the
  previous op (``prev``: a norm or a linear) into the ops that consume its output
  (``linears``) without changing the function. ``inspect`` is the module whose output AWQ's
  loss is measured on. A ``*`` in a path stands for an expert index; a group whose ``prev``
  holds one is repeated per expert. ``kv_heads`` marks v→o: under grouped-query attention each
  value channel feeds the same channel of every query head that shares its key/value head.
* ``sequential``: the order in which the linears see their inputs (GPTQ's true-sequential):
  stages whose linears never consume one another's outputs.
* ``keep_fp``: consumers that are scaled with their group but never quantized (MoE routers).

Quirky modules are made canonical at load time (``canonical.py``): Gemma's ``(1 + w)`` norms
become plain norms and fused 3-D MoE experts become per-expert ``nn.Linear`` modules, so every
algorithm sees the same shapes for every entry.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace

from torch import nn

from quantcli.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class ScalingGroup:
    name: str
    prev: str
    linears: tuple[str, ...]
    inspect: str
    kv_heads: bool = False  # prev writes per key/value head, consumers read per query head (GQA)


@dataclass(frozen=True)
class ArchSpec:
    groups: tuple[ScalingGroup, ...]
    sequential: tuple[tuple[str, ...], ...]
    keep_fp: tuple[str, ...] = ()
    layers_path: str = "model.layers"


_ATTN = (
    ScalingGroup("attn_in", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScalingGroup("attn_out", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", kv_heads=True),
)
_QKV, _O = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",)

LLAMA = ArchSpec(
    groups=_ATTN
    + (
        ScalingGroup("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScalingGroup("mlp_out", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    sequential=(_QKV, _O, ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
)

GEMMA3 = ArchSpec(
    groups=_ATTN
    + (
        ScalingGroup("mlp_in", "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScalingGroup("mlp_out", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    sequential=LLAMA.sequential,
)

_EXPERT_OUT = ScalingGroup("expert_out", "mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), "mlp.experts.*.down_proj")

MIXTRAL = ArchSpec(
    groups=_ATTN
    + (
        ScalingGroup(
            "moe_in",
            "post_attention_layernorm",
            ("mlp.gate", "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
            "mlp",
        ),
        _EXPERT_OUT,
    ),
    sequential=(_QKV, _O, ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"), ("mlp.experts.*.down_proj",)),
    keep_fp=("mlp.gate",),
)

QWEN2_MOE = ArchSpec(
    groups=_ATTN
    + (
        ScalingGroup(
            "moe_in",
            "post_attention_layernorm",
            (
                "mlp.gate",
                "mlp.shared_expert_gate",
                "mlp.experts.*.gate_proj",
                "mlp.experts.*.up_proj",
                "mlp.shared_expert.gate_proj",
                "mlp.shared_expert.up_proj",
            ),
            "mlp",
        ),
        _EXPERT_OUT,
        ScalingGroup("shared_out", "mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), "mlp.shared_expert.down_proj"),
    ),
    sequential=(
        _QKV,
        _O,
        ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
        ("mlp.experts.*.down_proj", "mlp.shared_expert.down_proj"),
    ),
    keep_fp=("mlp.gate", "mlp.shared_expert_gate"),
)

QWEN3_MOE = MIXTRAL

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
    "Qwen3ForCausalLM": LLAMA,
    "Gemma3ForCausalLM": GEMMA3,
    "MixtralForCausalLM": MIXTRAL,
    "Qwen2MoeForCausalLM": QWEN2_MOE,
    "Qwen3MoeForCausalLM": QWEN3_MOE,
}


def architecture_name(model: nn.Module) -> str:
    archs = getattr(model.config, "architectures", None)
    return archs[0] if archs else type(model).__name__


def arch_spec(model_or_name: nn.Module | str) -> ArchSpec:
    """The table entry for a model (or an architecture name); unknown → one-line error."""
    name = model_or_name if isinstance(model_or_name, str) else architecture_name(model_or_name)
    if name not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"architecture {name} is not in quantcli's table: add an ArchSpec for it to "
            f"ARCHITECTURES in quantcli/models/arch.py (known: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[name]


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    module = model
    for part in spec.layers_path.split("."):
        module = getattr(module, part)
    return module


def expand(layer: nn.Module, pattern: str) -> list[str]:
    """Module paths in ``layer`` that match ``pattern`` (``*`` = an expert index), in module order."""
    if "*" not in pattern:
        return [pattern] if _has(layer, pattern) else []
    return [name for name, _ in layer.named_modules() if fnmatch.fnmatchcase(name, pattern) and "." in name]


def _has(layer: nn.Module, path: str) -> bool:
    try:
        layer.get_submodule(path)
        return True
    except AttributeError:
        return False


def resolve_groups(layer: nn.Module, spec: ArchSpec) -> list[ScalingGroup]:
    """Concrete scaling groups of one layer: wildcards expanded, absent modules dropped."""
    out: list[ScalingGroup] = []
    for group in spec.groups:
        prevs = expand(layer, group.prev)
        for prev in prevs:
            index = _expert_index(group.prev, prev)
            linears = tuple(
                name
                for pattern in group.linears
                for name in expand(layer, pattern if index is None or "*" not in pattern else pattern.replace("*", index))
            )
            inspect = group.inspect if index is None else group.inspect.replace("*", index)
            if linears:
                suffix = "" if index is None else f".{index}"
                out.append(replace(group, name=group.name + suffix, prev=prev, linears=linears, inspect=inspect))
    return out


def _expert_index(pattern: str, concrete: str) -> str | None:
    if "*" not in pattern:
        return None
    head = pattern.split("*")[0]
    return concrete[len(head):].split(".")[0]


def quantizable_linears(layer: nn.Module, spec: ArchSpec) -> list[list[str]]:
    """The layer's linears to quantize, in true-sequential stages (each stage a list of paths)."""
    skip = {name for pattern in spec.keep_fp for name in expand(layer, pattern)}
    stages = []
    for stage in spec.sequential:
        names = [n for pattern in stage for n in expand(layer, pattern) if n not in skip]
        if names:
            stages.append(names)
    return stages
