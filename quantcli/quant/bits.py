"""Packing integer codes into int32 words, exactly reversibly.

One layout covers every packed format quantcli writes: the codes along a dimension form a
little-endian bit stream, code ``i`` occupying bits ``[bits·i, bits·i + bits)``, cut into 32-bit
words. When ``bits`` divides 32 (2, 4, 8) this is the classic layout "word ``k`` holds codes
``k·(32/bits) …`` with code ``j`` of the word at bit ``bits·j``" (GPTQ, compressed-tensors).
For 3, 5, 6 and 7 bits codes straddle word boundaries: 32 codes fill exactly ``bits`` words.
That is GPTQ's 3-bit layout (32 input rows in 3 words) and compressed-tensors' dense layout.

AutoAWQ's GEMM layout packs 8 four-bit codes per word in the interleaved order
``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``: nibble ``i`` of a word holds code ``AWQ_ORDER[i]`` of
its chunk of 8. :func:`awq_interleave` reorders a tensor into that order, after which the
plain stream packing applies.

Words are returned as ``torch.int32`` (the storage dtype every format uses); a word whose top
bit is set is a negative int32 with the same 32 bits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_MASK32 = 0xFFFFFFFF


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"can only pack 1..8-bit codes, got {bits}")


def packed_length(length: int, bits: int) -> int:
    """Number of int32 words holding ``length`` codes of ``bits`` bits: ``ceil(length·bits / 32)``."""
    return math.ceil(length * bits / 32)


def _to_int32(words: Tensor) -> Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int32(codes: Tensor, bits: int, dim: int = -1) -> Tensor:
    """Pack codes along ``dim`` into int32 words.

    codes: integer tensor ``[..., n, ...]`` (``n`` along ``dim``) with values in ``[0, 2**bits)``.
    Returns int32 ``[..., ceil(n·bits/32), ...]``; the tail of the last word is zero.
    """
    _check_bits(bits)
    x = codes.movedim(dim, -1).to(torch.int64)
    if x.numel() and (x.min() < 0 or x.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(x.min())}, {int(x.max())}]")
    n = x.shape[-1]
    if 32 % bits == 0:  # whole codes per word: one vectorised shift-and-sum (same layout, much faster)
        per = 32 // bits
        x = torch.nn.functional.pad(x, (0, -n % per)).reshape(*x.shape[:-1], -1, per)
        shifts = torch.arange(0, 32, bits, device=x.device)
        return _to_int32((x << shifts).sum(-1)).movedim(-1, dim).contiguous()
    blocks = math.ceil(n / 32)
    x = torch.nn.functional.pad(x, (0, blocks * 32 - n)).reshape(*x.shape[:-1], blocks, 32)
    words = torch.zeros(*x.shape[:-1], bits, dtype=torch.int64, device=x.device)
    for i in range(32):  # code i of each block of 32 starts at bit bits·i of that block's stream
        word, shift = divmod(bits * i, 32)
        words[..., word] |= (x[..., i] << shift) & _MASK32
        if shift + bits > 32:  # spills into the next word
            words[..., word + 1] |= x[..., i] >> (32 - shift)
    words = words.reshape(*x.shape[:-2], blocks * bits)[..., : packed_length(n, bits)]
    return _to_int32(words).movedim(-1, dim).contiguous()


def unpack_int32(words: Tensor, bits: int, length: int, dim: int = -1) -> Tensor:
    """Inverse of :func:`pack_int32`: the first ``length`` codes along ``dim``.

    words: int32 ``[..., ceil(length·bits/32), ...]``. Returns uint8 ``[..., length, ...]``.
    """
    _check_bits(bits)
    w = words.movedim(dim, -1).to(torch.int64) & _MASK32
    if w.shape[-1] != packed_length(length, bits):
        raise ValueError(f"{w.shape[-1]} words cannot hold exactly {length} codes of {bits} bits")
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, device=w.device)
        codes = ((w.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(*w.shape[:-1], -1)[..., :length]
        return codes.to(torch.uint8).movedim(-1, dim).contiguous()
    blocks = math.ceil(length / 32)
    w = torch.nn.functional.pad(w, (0, blocks * bits - w.shape[-1])).reshape(*w.shape[:-1], blocks, bits)
    codes = torch.empty(*w.shape[:-1], 32, dtype=torch.int64, device=w.device)
    for i in range(32):
        word, shift = divmod(bits * i, 32)
        value = w[..., word] >> shift
        if shift + bits > 32:
            value = value | (w[..., word + 1] << (32 - shift))
        codes[..., i] = value & (2**bits - 1)
    codes = codes.reshape(*w.shape[:-2], blocks * 32)[..., :length]
    return codes.to(torch.uint8).movedim(-1, dim).contiguous()


def awq_interleave(x: Tensor, dim: int = -1) -> Tensor:
    """Reorder each chunk of 8 along ``dim`` into AWQ order: ``out[8c + i] = x[8c + AWQ_ORDER[i]]``.

    x: ``[..., n, ...]`` with ``n`` a multiple of 8; returns the same shape.
    """
    return _permute_chunks(x, AWQ_ORDER, dim)


def awq_deinterleave(x: Tensor, dim: int = -1) -> Tensor:
    """Inverse of :func:`awq_interleave`."""
    inverse = [AWQ_ORDER.index(i) for i in range(8)]
    return _permute_chunks(x, inverse, dim)


def _permute_chunks(x: Tensor, order, dim: int) -> Tensor:
    n = x.shape[dim]
    if n % len(order):
        raise ValueError(f"AWQ packing needs a multiple of {len(order)} along the packed dimension, got {n}")
    index = (torch.arange(0, n, len(order)).unsqueeze(1) + torch.tensor(order)).reshape(-1)
    return x.index_select(dim, index.to(x.device))


def pack_int32_awq(codes: Tensor, dim: int = -1) -> Tensor:
    """AutoAWQ GEMM packing of 4-bit codes along ``dim``: 8 per word, interleaved.

    codes: ``[..., n, ...]`` with ``n % 8 == 0`` and values in ``[0, 16)``.
    Returns int32 ``[..., n / 8, ...]``.
    """
    return pack_int32(awq_interleave(codes, dim), 4, dim)


def unpack_int32_awq(words: Tensor, length: int, dim: int = -1) -> Tensor:
    """Inverse of :func:`pack_int32_awq`: uint8 ``[..., length, ...]`` from int32 ``[..., length / 8, ...]``."""
    return awq_deinterleave(unpack_int32(words, 4, length, dim), dim)
