"""Weights an artifact or a packed checkpoint puts into a model: codes, fp overrides, static activation scales.

``quantized.safetensors`` holds, per quantized linear ``name``, ``name.qweight`` (integer codes
``[out, in]``; since schema 2 codes of under 8 bits are packed along ``in`` into int32 words,
``[out, ceil(in·bits/32)]`` (:func:`quantcli.quant.bits.pack_int32`), with ``name.qshape`` =
``[out, in, bits]``; schema 1 stored one uint8 per code), ``name.scales`` and ``name.zeros`` (``[out, in // group]``) and, under
act-order, ``name.g_idx`` (``[in]``); under ``act_static`` also ``name.input_scale`` and
``name.input_zero`` (per-tensor activation scale and unsigned zero, scalars). ``overrides.safetensors`` holds full-precision parameters
a stage changed (full names, e.g. ``model.layers.0.input_layernorm.weight``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from quantcli.artifact import Artifact, unreadable
from quantcli.errors import ArtifactError
from quantcli.models.act_hooks import INPUT_SCALE, INPUT_ZERO
from quantcli.quant import QuantizedWeight
from quantcli.quant.bits import pack_int32, unpack_int32

QUANTIZED_FILE = "quantized.safetensors"
OVERRIDES_FILE = "overrides.safetensors"
QWEIGHT = ".qweight"


class QuantizedCodes(Mapping[str, QuantizedWeight]):
    """The quantized linears of a ``quantized.safetensors`` file, read lazily: module name →
    :class:`QuantizedWeight`.

    The names come from the file's header; each value is read (``safe_open``, only that linear's
    tensors) and its codes unpacked on every access, so holding the mapping costs no memory and
    iterating it holds one linear at a time. ``file`` is trusted (its sha256 checked by the caller);
    ``None`` (an artifact without codes) gives an empty mapping.
    """

    def __init__(self, file: Path | None):
        self.file = file
        self._keys: frozenset[str] = frozenset()
        self._names: list[str] = []
        if file is not None:
            try:
                with safe_open(str(file), "pt") as fh:
                    keys = list(fh.keys())
            except SafetensorError as exc:
                raise unreadable(file, exc) from None
            self._keys = frozenset(keys)
            self._names = [key.removesuffix(QWEIGHT) for key in keys if key.endswith(QWEIGHT)]

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and f"{name}{QWEIGHT}" in self._keys

    def __getitem__(self, name: str) -> QuantizedWeight:
        if name not in self:
            raise KeyError(name)
        with safe_open(str(self.file), "pt") as fh:
            tensor = lambda suffix: fh.get_tensor(f"{name}.{suffix}").clone()  # a copy: the file is unmapped on close
            codes, scale, zero = tensor("qweight"), tensor("scales"), tensor("zeros")
            if f"{name}.qshape" in self._keys:  # packed (schema 2)
                _, length, bits = (int(v) for v in tensor("qshape"))
                codes = unpack_int32(codes, bits, length)
            g_idx = tensor("g_idx") if f"{name}.g_idx" in self._keys else None
        return QuantizedWeight(codes, scale.float(), zero.float(), codes.shape[1] // scale.shape[1], g_idx)

    def act_qparams(self) -> dict[str, torch.Tensor]:
        """The calibrated static activation scales stored beside the codes (only those tensors are read)."""
        if self.file is None:
            return {}
        with safe_open(str(self.file), "pt") as fh:
            return {k: fh.get_tensor(k).clone() for k in sorted(self._keys) if k.endswith((INPUT_SCALE, INPUT_ZERO))}


def read_quantized(artifact: Artifact) -> QuantizedCodes:
    """The artifact's quantized linears: module name → codes, scales, zeros (and g_idx), read lazily
    (:class:`QuantizedCodes`); the file's sha256 is checked once, here."""
    return QuantizedCodes(artifact.checked_file(QUANTIZED_FILE) if artifact.has(QUANTIZED_FILE) else None)


def quantized_payload(quantized: Mapping[str, QuantizedWeight], bits: int = 8) -> dict[str, torch.Tensor]:
    """Inverse of :func:`read_quantized`: the tensors of ``quantized.safetensors``; codes of
    ``bits < 8`` are packed into int32 words."""
    payload: dict[str, torch.Tensor] = {}
    for name, qw in quantized.items():
        if bits < 8:
            payload[f"{name}.qweight"] = pack_int32(qw.codes, bits)
            payload[f"{name}.qshape"] = torch.tensor([*qw.codes.shape, bits], dtype=torch.int32)
        else:
            payload[f"{name}.qweight"] = qw.codes.to(torch.uint8)
        payload[f"{name}.scales"] = qw.scale.float()
        payload[f"{name}.zeros"] = qw.zero.round().to(torch.uint8)
        if qw.g_idx is not None:
            payload[f"{name}.g_idx"] = qw.g_idx.to(torch.int32)
    return payload


def set_weight(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    module = model.get_submodule(name)
    module.weight.data.copy_(weight.to(module.weight.dtype))


def apply_overrides(model: nn.Module, tensors: dict[str, torch.Tensor], where: str = "artifact") -> None:
    """Copy full-precision tensors (names relative to ``model``) into its parameters and buffers.

    ``where`` names the source in the error raised for a tensor the model does not have.
    """
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for key, value in tensors.items():
        if key not in params:
            raise ArtifactError(f"{where}: overrides tensor {key}, which this model does not have; re-create the artifact")
        params[key].data.copy_(value.to(params[key].dtype))


def apply_quantized(model: nn.Module, quantized: Mapping[str, QuantizedWeight]) -> None:
    """Put each quantized linear's dequantized weight (names relative to ``model``) into it."""
    for name, qw in quantized.items():
        set_weight(model, name, qw.dequantize())
