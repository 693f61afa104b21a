"""Make quirky modules canonical at load time, and undo it when saving.

* Gemma's RMSNorm computes ``norm(x) * (1 + w)``; it becomes :class:`RMSNorm` with weight ``1 + w``
  so that scales fold into it like into any other norm.
* Fused MoE experts (``gate_up_proj: [E, 2I, H]``, ``down_proj: [E, H, I]``) become
  :class:`LinearExperts`, a list of per-expert ``gate_proj / up_proj / down_proj`` linears with
  the same forward, so every expert is quantized like any other linear.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """``norm(x) * w`` computed in float32, as Gemma does, with the offset already in ``w``."""

    def __init__(self, weight: Tensor, eps: float, offset: float):
        super().__init__()
        self.weight = nn.Parameter(weight + offset)
        self.eps = eps
        self.offset = offset  # what was added; subtracted again on save

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).type_as(x)


class ExpertMLP(nn.Module):
    def __init__(self, gate: Tensor, up: Tensor, down: Tensor, act: nn.Module):
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _linear(weight: Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    lin.weight.data.copy_(weight)
    return lin


class LinearExperts(nn.ModuleList):
    """Per-expert linears with the fused experts' call signature ``(x, top_k_index, top_k_weights)``."""

    def forward(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel():
                y = expert(hidden[token]) * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out

    def fused(self) -> dict[str, Tensor]:
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self])
        down = torch.stack([e.down_proj.weight for e in self])
        return {"gate_up_proj": gate_up, "down_proj": down}


def canonicalize(model: nn.Module) -> nn.Module:
    """Replace offset norms and fused experts in place; returns the model."""
    for name, module in list(model.named_modules()):
        replacement = _canonical(module)
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return model


def _canonical(module: nn.Module) -> nn.Module | None:
    cls = type(module).__name__
    if cls.startswith("Gemma") and cls.endswith("RMSNorm"):
        return RMSNorm(module.weight.data, module.eps, offset=1.0)
    if hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and isinstance(module.gate_up_proj, nn.Parameter):
        gate_up, down = module.gate_up_proj.data, module.down_proj.data
        inter = down.shape[2]
        return LinearExperts(
            ExpertMLP(gate_up[e, :inter], gate_up[e, inter:], down[e], module.act_fn) for e in range(gate_up.shape[0])
        )
    return None


def hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict in the original Hugging Face layout (offsets removed, experts fused)."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, RMSNorm) and module.offset:
            state[f"{prefix}weight"] = module.weight.data - module.offset
        elif isinstance(module, LinearExperts):
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
            for key, value in module.fused().items():
                state[f"{prefix}{key}"] = value
    return state


def strip_norm_offsets(model: nn.Module) -> None:
    """Put offset norms back in their original ``w`` form (before saving; the model then computes
    ``norm(x)·w`` with the original ``w``, so use it only to save)."""
    for module in model.modules():
        if isinstance(module, RMSNorm) and module.offset:
            module.weight.data -= module.offset
            module.offset = 0.0


def _units(module: nn.Module):
    """``(prefix, submodule)`` for every module that owns tensors in the HF layout (a fused
    experts module counts as one unit; its per-expert children are not visited)."""
    fused = ()
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        if fused and prefix.startswith(fused):
            continue
        if isinstance(sub, LinearExperts):
            fused = prefix
        yield prefix, sub


def hf_keys(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of the HF-layout tensors a canonical ``module`` is made from."""
    keys = []
    for prefix, sub in _units(module):
        if isinstance(sub, LinearExperts):
            keys += [f"{prefix}gate_up_proj", f"{prefix}down_proj"]
        else:
            keys += [prefix + n for n in _own_tensors(sub)]
    return keys


def _own_tensors(module: nn.Module) -> list[str]:
    """Names of ``module``'s own parameters and persistent buffers (not its children's)."""
    names = [n for n, _ in module.named_parameters(recurse=False)]
    return names + [n for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set]


def canonical_tensors(module: nn.Module, read) -> dict[str, Tensor]:
    """The tensors of canonical ``module`` (names relative to it) built from HF-layout tensors.

    ``read(name)`` returns the HF-layout tensor ``name`` (relative to ``module``), e.g. one
    decoder layer's tensors read from a checkpoint. Inverse of :func:`hf_state_dict` per module:
    offset norms get ``w + offset``, fused experts ``gate_up_proj: [E, 2I, H]``,
    ``down_proj: [E, H, I]`` are split into ``{e}.gate_proj / up_proj / down_proj .weight``.
    """
    out: dict[str, Tensor] = {}
    for prefix, sub in _units(module):
        if isinstance(sub, LinearExperts):
            gate_up, down = read(f"{prefix}gate_up_proj"), read(f"{prefix}down_proj")
            inter = down.shape[2]
            for e in range(gate_up.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, :inter]
                out[f"{prefix}{e}.up_proj.weight"] = gate_up[e, inter:]
                out[f"{prefix}{e}.down_proj.weight"] = down[e]
            continue
        for name in _own_tensors(sub):
            value = read(prefix + name)
            out[prefix + name] = value + sub.offset if isinstance(sub, RMSNorm) and sub.offset and name == "weight" else value
    return out
