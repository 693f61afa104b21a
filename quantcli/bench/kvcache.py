"""An int8 KV cache for ``quant bench``, and the KV bytes per token measured from what a cache holds.

Keys (after RoPE) and values ``[B, KV, T, D]`` are quantized on append, per head and per token, with
the asymmetric 8-bit quantizer ``--kv-bits 8`` fake-quantizes with in evaluation
(:func:`quantcli.quant.act.act_qparams`): ``codes`` uint8 ``[B, KV, T, D]``, ``zero`` uint8
``[B, KV, T, 1]`` (an integer in ``[0, 255]``) and ``scale`` float32 ``[B, KV, T, 1]``,
``x ≈ (codes − zero)·scale``. On read the whole cache is dequantized to the attention's dtype and
attention runs as usual, so decode logits are those of the fake-quantized model. Per token and KV
head that is ``2·(D + 1 + 4)`` bytes against ``2·2·D`` in bf16 (``D = 64``: 138 vs 256).

Sliding-window layers (Gemma3's local attention) keep transformers' own cache in the model's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from quantcli.quant.act import act_qparams

KV_INT8 = "int8 codes + uint8 zero + float32 scale per head and token, dequantized on read"


def quantize_kv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``x: [..., D]`` → ``(codes uint8 [..., D], zero uint8 [..., 1], scale float32 [..., 1])``, per last-dim vector."""
    xf = x.float()
    scale, zero = act_qparams(xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True), 8, sym=False)
    codes = torch.clamp(torch.round(xf / scale) + zero, 0, 255)
    return codes.to(torch.uint8), zero.to(torch.uint8), scale


def dequantize_kv(codes: Tensor, zero: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``(codes − zero)·scale`` in ``dtype`` (the inverse of :func:`quantize_kv` up to rounding)."""
    return ((codes.float() - zero.float()) * scale).to(dtype)


def _int8_layer_class():
    from transformers.cache_utils import DynamicLayer

    class Int8KVLayer(DynamicLayer):
        """One attention layer's cache as uint8 codes with per-(head, token) zero and scale (see the module)."""

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            super().lazy_initialization(key_states, value_states)  # empty fp placeholders, 0 bytes
            self.stored: dict[str, tuple[Tensor, Tensor, Tensor] | None] = {"k": None, "v": None}

        def _append(self, name: str, x: Tensor) -> Tensor:
            new = quantize_kv(x)
            old = self.stored[name]
            self.stored[name] = new if old is None else tuple(torch.cat([a, b], dim=-2) for a, b in zip(old, new))
            return dequantize_kv(*self.stored[name], x.dtype)

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            return self._append("k", key_states), self._append("v", value_states)

        def get_seq_length(self) -> int:
            if not self.is_initialized or self.stored["k"] is None:
                return 0
            return self.stored["k"][0].shape[-2]

        def tensors(self) -> list[Tensor]:
            return [t for part in self.stored.values() if part is not None for t in part] if self.is_initialized else []

    return Int8KVLayer


def int8_kv_cache(config) -> object:
    """A transformers ``DynamicCache`` for ``config`` whose full-attention layers store int8 (see the module)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layer_cls = _int8_layer_class()
    cache = DynamicCache(config=config)
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = layer_cls
    cache.layers = [layer_cls() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def cache_tensors(cache) -> list[Tensor]:
    """Every tensor a transformers cache holds (keys and values, or an int8 layer's codes, zeros and scales)."""
    out = []
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "tensors"):
            out += layer.tensors()
        out += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, Tensor)]
    return out


def cache_bytes(cache) -> int:
    """Bytes of the storages behind :func:`cache_tensors` (each storage counted once)."""
    seen, total = set(), 0
    for t in cache_tensors(cache):
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


@torch.inference_mode()
def measured_kv_bytes_per_token(model: nn.Module, make_cache: Callable[[], object] | None, device: torch.device, tokens: int = 32) -> int:
    """KV bytes per token of ``model``'s cache as allocated: a ``tokens``-token prefill into a fresh cache
    (``make_cache()``, or the model's default cache), then the bytes the cache holds ÷ ``tokens``."""
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    from quantcli.bench.latency import cache_kwarg

    kwargs = {cache_kwarg(model): make_cache()} if make_cache is not None else {}
    out = model(input_ids=ids, use_cache=True, **kwargs)
    return -(-cache_bytes(out.past_key_values) // tokens)
