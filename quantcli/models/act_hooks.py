"""Install activation and KV-cache fake quantization into a model (hooks; the math is ``quant/act.py``).

* Linear inputs: a forward pre-hook per quantized linear, per-token dynamic (``spec.act_sym``) or
  per-tensor static from calibrated ``(scale, zero)`` (``spec.act_static``).
* KV cache: keys (after RoPE) and values are fake-quantized per head and per token where attention
  reads them, by routing the model's attention through a registered wrapper of its own
  implementation (transformers' ``AttentionInterface``); only attention modules marked with
  ``quantcli_kv_bits`` quantize, so one decoder layer can be marked at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from quantcli import dist
from quantcli.quant.act import fake_quant_per_token, fake_quant_with, observe_range, static_qparams
from quantcli.quant.spec import QuantSpec

INPUT_SCALE, INPUT_ZERO = "input_scale", "input_zero"
KV_ATTR = "quantcli_kv_bits"


def install_linear_act_quant(
    model: nn.Module, names: list[str], spec: QuantSpec, static: dict[str, Tensor] | None = None
) -> list:
    """Fake-quantize the input of every named linear of ``model`` under ``spec``; the hook handles.

    ``static``: ``"<name>.input_scale"`` / ``"<name>.input_zero"`` scalars for ``spec.act_static``.
    """
    if spec.abits >= 16:
        return []
    handles = []
    for name in names:
        if spec.act_static:
            scale, zero = static[f"{name}.{INPUT_SCALE}"], static[f"{name}.{INPUT_ZERO}"]

            def hook(_m, args, scale=scale, zero=zero):
                x = args[0]
                return (fake_quant_with(x, scale.to(x), zero.to(x), spec.abits),) + tuple(args[1:])
        else:

            def hook(_m, args):
                return (fake_quant_input(args[0], spec),) + tuple(args[1:])

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    return handles


@torch.no_grad()
def calibrate_static_inputs(module: nn.Module, names: list[str], spec: QuantSpec, run) -> dict[str, Tensor]:
    """Per-tensor ``input_scale`` / ``input_zero`` of each named linear's input over ``run()`` (a forward;
    under torch.distributed, over every rank's calibration shard)."""
    ranges: dict[str, tuple[Tensor, Tensor]] = {}

    def observer(name):
        def fn(_m, args):
            if args[0].numel():
                ranges[name] = observe_range(args[0], ranges.get(name))

        return fn

    handles = [module.get_submodule(n).register_forward_pre_hook(observer(n)) for n in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name in names:
        hi, lo = ranges.get(name, (torch.zeros(()), torch.zeros(())))
        hi, lo = dist.all_max(hi), -dist.all_max(-lo)  # the range over every rank's tokens: one scale for all
        scale, zero = static_qparams((hi, lo), spec.abits, spec.act_sym)
        out[f"{name}.{INPUT_SCALE}"], out[f"{name}.{INPUT_ZERO}"] = scale.cpu(), zero.cpu()
    return out


# ------------------------------------------------------------------------------ KV cache


def _wrapped_attention(inner: str):
    """An attention function that quantizes K and V of marked modules, then runs implementation ``inner``."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        bits = getattr(module, KV_ATTR, 16)
        if bits < 16:
            sym = getattr(module, KV_ATTR + "_sym", False)
            key, value = fake_quant_per_token(key, bits, sym), fake_quant_per_token(value, bits, sym)
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
        impl = eager if inner == "eager" else ALL_ATTENTION_FUNCTIONS.get_interface(inner, eager)
        return impl(module, query, key, value, attention_mask, **kwargs)

    return attention


def _route_attention(config) -> None:
    """Point ``config`` at the KV-quantizing wrapper of its current attention implementation (once)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    inner = config._attn_implementation or "eager"
    if inner.startswith("quantcli_kv_"):
        return
    name = f"quantcli_kv_{inner}"
    AttentionInterface.register(name, _wrapped_attention(inner))
    if inner in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    config._attn_implementation = name


@dataclass
class KVQuantHandle:
    """Undo for :func:`install_kv_quant`: unmark the attention modules (routing stays; it is a no-op)."""

    modules: list[nn.Module] = field(default_factory=list)

    def remove(self) -> None:
        for module in self.modules:
            if hasattr(module, KV_ATTR):
                delattr(module, KV_ATTR)


def install_kv_quant(root: nn.Module, bits: int, sym: bool = False) -> KVQuantHandle:
    """Quantize K (after RoPE) and V per head and per token in every attention module under ``root``.

    ``root`` may be a whole model or one decoder layer. Attention modules are those with a
    ``k_proj`` and a ``config`` (every table entry's self-attention).
    """
    handle = KVQuantHandle()
    if bits >= 16:
        return handle
    for module in root.modules():
        if hasattr(module, "k_proj") and hasattr(module, "config"):
            _route_attention(module.config)
            setattr(module, KV_ATTR, bits)
            setattr(module, KV_ATTR + "_sym", sym)
            handle.modules.append(module)
    return handle


def search_spec(spec: QuantSpec) -> QuantSpec:
    """The activation quantizer a search scores (AWQ) or trains (OmniQuant) through: ``spec``'s bits,
    symmetry and KV cache, with per-token dynamic scales standing in for static ones (those depend on
    the transform being searched; the driver calibrates them on the result)."""
    return replace(spec, act_static=False)


def fake_quant_input(x: Tensor, spec: QuantSpec) -> Tensor:
    """A linear input ``x: [..., C]`` fake-quantized per token as :func:`search_spec` ``(spec)`` says (``x`` when weight-only)."""
    return fake_quant_per_token(x, spec.abits, spec.act_sym)


def install_spec_hooks(root: nn.Module, names: list[str], spec: QuantSpec, static: dict[str, Tensor] | None = None) -> list:
    """Everything ``spec`` fake-quantizes at run time (linear inputs and the KV cache); handles with ``remove()``."""
    handles = install_linear_act_quant(root, names, spec, static)
    if spec.kv_bits < 16:
        handles.append(install_kv_quant(root, spec.kv_bits))
    return handles
