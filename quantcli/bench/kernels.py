"""Run quantized linears through real low-bit matmul kernels (not dequantize-then-matmul).

Kernels used, ATen's and quantcli's own native ones (no extra dependency):

* ``int4``  CPU : ``aten._convert_weight_to_int4pack_for_cpu`` + ``aten._weight_int4pack_mm_for_cpu``
            CUDA: ``aten._convert_weight_to_int4pack`` + ``aten._weight_int4pack_mm`` (bf16, sm80+)
  Both compute ``w = scale·(q − 8) + offset`` per ``(row, group)`` with group sizes 32/64/128/256.
  Our codes mean ``w = (q − zero)·scale``, so ``offset = (8 − zero)·scale`` (verified by the tests).
  Any codes in ``[0, 15]`` go through exactly: 2-, 3- and 4-bit weights alike.
* ``int8``  CPU and CUDA: ``aten._weight_int8pack_mm(x, w_int8[N, K], scale[N])`` = ``x @ (scale·w)ᵀ``.
  Per-channel only (one scale per output row), ``K`` a multiple of 16. ``w = (q − zero)·scale`` is stored as
  ``int8 = q − zero`` when that fits in ``[−128, 127]``; otherwise (8-bit asymmetric) as
  ``int8 = q − 128`` plus a per-row correction ``(128 − zero)·scale·Σx``.
* ``quantcli::int4_gemv`` CPU decode: reads the same int4 pack as the ATen kernel, several rows per
  call at most (:mod:`quantcli.bench.gemv`, native AVX-512 VNNI, built on first use); used per weight
  shape up to the row count where it measured faster than the ATen kernel (:func:`choose_gemv`).
* ``quantcli::int4_gemm_amx`` CPU prefill on AMX CPUs: the same pack, each 64-row block unpacked once
  per call into bf16 tiles; used per weight shape instead of the ATen kernel for the rows between
  the GEMV and the dense path where it measured faster over the probes (:func:`choose_amx`).
* ``quantcli::bf16_gemv`` CPU decode, for the dense bf16 linears a model keeps (an unquantized
  ``lm_head``; every linear of a bf16 baseline): a streaming AVX-512 BF16 matrix-vector product
  (:class:`DenseGemvLinear`, :func:`swap_in_dense_gemv`), used per weight shape up to the row count
  where it measured faster than ATen's dense bf16 matmul.
* ``dequant-fp`` : a plain ``nn.Linear`` holding the dequantized weight, used for a layer no kernel
  can take; :class:`KernelReport` says which layers and why.

Prefill path: a low-bit kernel wins at one token (decode: it reads 4× fewer bytes) but can lose
badly to the device's dense bf16 matmul on many tokens (on CPUs with AMX the int4 kernel is 5-20×
slower at 1000 tokens). :func:`choose_dense_threshold` times both on each weight shape once, at the
token counts that will run (every prompt length); from the measured token count on, a layer
dequantizes its packed weight to bf16 once per call, in one fused pass (:func:`unpack_cpu_int4pack`
in a native AVX-512 loop or compiled by torch.compile, whichever :func:`fused_unpacker` finds),
and runs the dense matmul (``dequant-per-call+dense``). The
weight stays packed in memory, no dense copy is cached; every choice, with the timings behind it,
and how the unpacking ran, is in :class:`KernelReport`.

Activations are cast to bf16 for the kernels (the CPU int4 kernel is many times slower on fp32
activations) and the output is cast back to the input dtype. After swapping, move a model with
``model.to(device)`` only: ``model.to(dtype)`` would cast the kernels' bf16 scale buffers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from quantcli.bench import gemv
from quantcli.bench.latency import fastest_ms, synchronize
from quantcli.quant.affine import QuantizedWeight

INT4_GROUPS = (32, 64, 128, 256)  # group sizes the int4 kernels accept
KERNEL_DTYPE = torch.bfloat16  # activation dtype fed to the kernels
VERIFY_TOL = 5e-2  # relative error of a kernel vs the dequantized weight above which we fall back

INT4_CPU = "aten._weight_int4pack_mm_for_cpu"
INT4_CUDA = "aten._weight_int4pack_mm"
INT8 = "aten._weight_int8pack_mm"
DEQUANT = "dequant-fp"
DENSE = "dequant-per-call+dense"  # unpack to bf16 once per call, then the dense matmul (prefill)
INT4_GEMV = gemv.OP  # the native AVX-512 VNNI int4 matrix-vector kernel (CPU decode)
BF16_GEMV = gemv.BF16_OP  # the native AVX-512 BF16 dense matrix-vector kernel (CPU decode)
INT4_AMX = gemv.AMX_OP  # the native AMX int4 GEMM (CPU prefill: unpack each weight block once into bf16 tiles)
DENSE_PROBE_TOKENS = (8, 32, 128, 512)  # token counts at which kernel and dense path are timed
GEMV_PROBE_ROWS = (1, 2, 4, 8)  # rows per call at which quantcli::int4_gemv and the ATen kernel are timed
DEQUANT_LABEL = "quantcli::dequantize"  # torch.profiler label of the per-call unpacking
INT8_LABEL = "quantcli::int8_linear"  # torch.profiler label of a whole W8A8 call (quantize, int8 GEMM, epilogue)
UNPACK_NATIVE = "one AVX-512 pass (native C, built with cc)"  # how the dense prefill path unpacks int4 weights
UNPACK_FUSED = "one fused pass (torch.compile)"
UNPACK_EAGER = "eager, five passes"


# --------------------------------------------------------------------------------------------
# Layout helpers (pure tensor functions)
# --------------------------------------------------------------------------------------------


def code_bits(qw: QuantizedWeight) -> int:
    """Bits the codes actually use: ``max(codes).bit_length()`` (at least 1)."""
    return max(1, int(qw.codes.max()).bit_length())


def static_group_order(qw: QuantizedWeight) -> tuple[Tensor | None, str]:
    """Input-column permutation that turns ``g_idx`` into contiguous groups.

    Returns ``(perm, "")`` with ``perm: int64 [in]`` (None when columns are already in group
    order) so that ``codes[:, perm]`` has column ``j`` in group ``j // group``; or ``(None, reason)``
    when the groups are not all ``group`` columns wide.
    """
    if qw.g_idx is None:
        return None, ""
    in_features = qw.codes.shape[1]
    g_idx = qw.g_idx.long().cpu()
    expected = torch.arange(in_features) // qw.group
    if torch.equal(g_idx, expected):
        return None, ""
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], expected):
        return None, "g_idx groups are not all the same width"
    return perm, ""


def kernel_group(group: int, in_features: int) -> int | None:
    """Group size for the int4 kernel that represents our ``group`` exactly, or None.

    A supported size is used as is; a multiple of one (e.g. 512, or per-channel ``group == in``)
    repeats each scale ``group // G`` times with the largest supported ``G`` dividing it.
    """
    if in_features % group:
        return None
    for g in sorted(INT4_GROUPS, reverse=True):
        if group % g == 0:
            return g
    return None


def int4_scale_and_zero(qw: QuantizedWeight, kgroup: int, dtype: torch.dtype) -> Tensor:
    """The kernels' ``scale_and_zero: [K / kgroup, N, 2]`` (``[..., 0]`` scale, ``[..., 1]`` offset).

    ``offset = (8 − zero)·scale`` so that ``scale·(q − 8) + offset == (q − zero)·scale``.
    """
    repeat = qw.group // kgroup
    scale = qw.scale.float().repeat_interleave(repeat, dim=1)  # [N, K / kgroup]
    offset = (8.0 - qw.zero.float().repeat_interleave(repeat, dim=1)) * scale
    return torch.stack([scale, offset], dim=-1).transpose(0, 1).contiguous().to(dtype)


def _device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def centred_int8(qw: QuantizedWeight) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-channel ``qw`` as ``(int8 [N, K], scale float32 [N], row_offset float32 [N] or None)``.

    ``w = (q − zero)·scale`` is stored as ``int8 = q − zero`` when that fits in ``[−128, 127]``
    (exact for ≤ 8 bits), else as ``q − 128`` with ``row_offset = (128 − zero)·scale`` to be added
    times ``Σ_k x_k``.
    """
    scale, zero = qw.scale.float()[:, 0], qw.zero.float()[:, 0]
    signed = qw.codes.to(torch.int32) - zero.round().to(torch.int32)[:, None]
    row_offset = None
    if signed.min() < -128 or signed.max() > 127:
        signed = qw.codes.to(torch.int32) - 128
        row_offset = (128.0 - zero) * scale
    return signed.to(torch.int8), scale, row_offset


def int4_unsupported(qw: QuantizedWeight, device: str | torch.device) -> str:
    """Why the int4 kernel cannot take ``qw`` on ``device`` ("" when it can)."""
    device = _device(device)
    out_features, in_features = qw.codes.shape
    if int(qw.codes.max()) > 15:
        return f"{code_bits(qw)}-bit codes do not fit the int4 kernel"
    if kernel_group(qw.group, in_features) is None:
        return f"group {qw.group} is not a multiple of {'/'.join(map(str, INT4_GROUPS))}"
    _, why = static_group_order(qw)
    if why:
        return why
    if device.type == "cpu":
        if out_features % 16:
            return f"out_features {out_features} is not a multiple of 16"
        return ""
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "the CUDA int4 kernel needs compute capability 8.0+"
        if out_features % 8:
            return f"out_features {out_features} is not a multiple of 8"
        if in_features % 32:
            return f"in_features {in_features} is not a multiple of 32"
        return ""
    return f"no int4 kernel on {device.type}"


def int8_unsupported(qw: QuantizedWeight, device: str | torch.device) -> str:
    """Why the int8 kernel cannot take ``qw`` on ``device`` ("" when it can)."""
    device = _device(device)
    if device.type not in ("cpu", "cuda"):
        return f"no int8 kernel on {device.type}"
    if qw.scale.shape[1] != 1:
        return f"group {qw.group} < in_features: the int8 kernel takes one scale per output channel"
    if qw.codes.shape[1] % 16:
        # torch 2.13's CPU kernel reads out of bounds (garbage or a segfault) otherwise
        return f"in_features {qw.codes.shape[1]} is not a multiple of 16"
    return ""


# --------------------------------------------------------------------------------------------
# Unpacking the CPU int4 layout (the dense prefill path)
# --------------------------------------------------------------------------------------------


def unpack_cpu_int4pack(packed: Tensor, scale: Tensor, shift: Tensor, group: int) -> Tensor:
    """The transposed weight ``wᵀ = q·scale + shift``, bf16 ``[K, N]``, from the CPU int4 pack.

    ``packed``: uint8 ``[N, K/2]`` from ``_convert_weight_to_int4pack_for_cpu``, i.e. 64-row blocks
    stored as ``[K, 32]`` bytes whose low nibble is row ``j`` and high nibble row ``j + 32`` of the
    block. ``scale``, ``shift``: bf16 ``[K/group, N]`` (the kernel's own ``scale_and_zero`` layout;
    ``shift = offset − 8·scale`` rounded to bf16). Each element is ``round_bf16(shift + q·scale)``
    computed in float32, as ``addcmul`` rounds. Transposed because this pack is row-block-major:
    for each ``k`` the 32 bytes of a block give 64 consecutive output rows, so every byte is read
    once and the writes are contiguous (``x @ wᵀ`` is then a plain matmul). Eagerly this is five
    passes (shift, mask, permute, cast, addcmul); compiled by :func:`fused_unpacker` it is one loop
    with the same bits (``q·scale`` is exact in float32: 4 × 8 significant bits, so a fused
    multiply-add rounds as ``addcmul`` does).
    """
    n = scale.shape[1]
    k = packed.numel() * 2 // n
    nibbles = torch.tensor([0, 4], dtype=torch.uint8, device=packed.device).view(1, 1, 2, 1)
    q = ((packed.view(n // 64, k, 1, 32) >> nibbles) & 15).permute(1, 0, 2, 3).reshape(k // group, group, n)
    return torch.addcmul(shift[:, None, :], q.to(KERNEL_DTYPE), scale[:, None, :]).view(k, n)


def unpack_scale_and_zero(packed: Tensor, scale_and_zero: Tensor, group: int) -> Tensor:
    """:func:`unpack_cpu_int4pack` from the kernel's own ``scale_and_zero`` bf16 ``[K/G, N, 2]``
    (``w = scale·(q − 8) + offset``): ``shift = offset − 8·scale`` in float32, rounded to bf16."""
    scale, offset = scale_and_zero.unbind(-1)
    shift = (offset.float() - 8 * scale.float()).to(KERNEL_DTYPE)
    return unpack_cpu_int4pack(packed, scale, shift, group)


def checked_compile(fn: Callable, dynamic: bool, agrees: Callable[[Callable], bool]) -> tuple[Callable, str]:
    """``(torch.compile(fn), "")`` when the compiled function runs and ``agrees(compiled)`` holds on
    the caller's probe, else ``(fn, why not)``: no C++ compiler, an unsupported build, or a
    compiled result that differs from the eager one."""
    compiled = torch.compile(fn, dynamic=dynamic)
    try:
        same = agrees(compiled)
    except Exception as err:  # inductor reports a missing compiler etc. with many exception types
        return fn, f"torch.compile failed: {(str(err).splitlines() or [type(err).__name__])[0][:200]}"
    return (compiled, "") if same else (fn, "the compiled call differed from the eager one")


_FUSED: dict[str, object] = {}  # "fn": the unpacker in use, "how": what it is (for the report)


def _probe_weight() -> tuple[Tensor, Tensor]:
    """A small packed weight (64 × 64, group 64) and its ``scale_and_zero``, to check an unpacker."""
    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (64, 32), dtype=torch.uint8, generator=gen)
    scale_and_zero = torch.stack([torch.rand(1, 64, generator=gen), torch.randn(1, 64, generator=gen)], -1)
    return packed, scale_and_zero.to(KERNEL_DTYPE).contiguous()


def unpackers() -> Iterator[tuple[str, Callable[..., Tensor] | None, str]]:
    """``(how, fn, why_not)`` for each int4 unpacker, fastest first, each tried only when the
    caller asks for the next: ``fn(packed, scale_and_zero, group) → wᵀ [K, N]`` bf16, or None where
    it cannot run here (``why_not`` says why). The native AVX-512 loop
    (:mod:`quantcli.bench.native`); :func:`unpack_scale_and_zero` compiled by ``torch.compile``
    (once per weight shape on first use, cached on disk by torch; past dynamo's recompile limit of
    8 shapes torch runs it eagerly, same bits); and the eager five-pass reference, which always runs."""
    from quantcli.bench import native

    why = native.native_status()
    yield UNPACK_NATIVE, None if why else native.unpack_int4, why
    packed, scale_and_zero = _probe_weight()
    # static shapes: one compile per weight shape (dynamic shapes compiled 20× slower code)
    fn, why = checked_compile(unpack_scale_and_zero, False, lambda compiled: torch.equal(
        compiled(packed, scale_and_zero, 64), unpack_scale_and_zero(packed, scale_and_zero, 64)))
    yield UNPACK_FUSED, None if why else fn, why
    yield UNPACK_EAGER, unpack_scale_and_zero, ""


def fused_unpacker() -> tuple[Callable[..., Tensor], str]:
    """``(unpack, how)``: the first of :func:`unpackers` that runs and whose bits equal the eager
    reference's on a probe weight, with ``how`` saying which (and, for the eager one, why no faster
    one ran). Decided once per process; slower unpackers are not even built."""
    if "fn" not in _FUSED:
        packed, scale_and_zero = _probe_weight()
        reference = unpack_scale_and_zero(packed, scale_and_zero, 64).view(torch.int16)
        reasons = []
        for how, fn, why in unpackers():
            if fn is not None and (how == UNPACK_EAGER or torch.equal(fn(packed, scale_and_zero, 64).view(torch.int16), reference)):
                break
            reasons.append(f"{how}: {why or 'differed from the eager reference'}")
        _FUSED.update(fn=fn, how=f"{how} ({'; '.join(reasons)})" if how == UNPACK_EAGER else how)
    return _FUSED["fn"], _FUSED["how"]


# --------------------------------------------------------------------------------------------
# Kernel modules
# --------------------------------------------------------------------------------------------


def _flatten(x: Tensor, perm: Tensor | None) -> Tensor:
    """``[..., K]`` → ``[M, K]`` in the kernel dtype, columns permuted when ``perm`` is set."""
    x2 = x.reshape(-1, x.shape[-1])
    if perm is not None:
        x2 = x2.index_select(1, perm)
    return x2.to(KERNEL_DTYPE)


class Int4WeightOnlyLinear(nn.Module):
    """``y = x @ wᵀ + b`` with ``w`` held as packed 4-bit codes and bf16 (scale, offset) per group.

    Buffers: ``packed`` (CPU: uint8 ``[N, K/2]``; CUDA: the tinygemm int32 tile layout),
    ``scale_and_zero`` bf16 ``[K/G, N, 2]``, optional ``perm`` int64 ``[K]`` (act-order ``g_idx``)
    and ``bias`` ``[N]``. Input ``[..., K]`` of any float dtype, output ``[..., N]`` of the same.
    """

    def __init__(
        self,
        packed: Tensor,
        scale_and_zero: Tensor,
        group_size: int,
        in_features: int,
        out_features: int,
        bias: Tensor | None = None,
        perm: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scale_and_zero", scale_and_zero)
        self.register_buffer("perm", perm)
        self.register_buffer("bias", bias)
        self.kernel = INT4_CPU if packed.device.type == "cpu" else INT4_CUDA
        self.dense_from: int | None = None  # from this many rows on: dequantize + dense matmul
        self.gemv_upto: int | None = None  # up to this many rows: quantcli::int4_gemv (CPU decode)
        self.amx = False  # rows between the GEMV and the dense path: quantcli::int4_gemm_amx, not ATen's kernel

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: Tensor | None = None, device: str | torch.device = "cpu"
    ) -> "Int4WeightOnlyLinear":
        """Pack ``qw`` (codes in ``[0, 15]``) for the int4 kernel of ``device``."""
        device = _device(device)
        why = int4_unsupported(qw, device)
        if why:
            raise ValueError(f"int4 kernel cannot take this weight: {why}")
        out_features, in_features = qw.codes.shape
        perm, _ = static_group_order(qw)
        codes = qw.codes if perm is None else qw.codes[:, perm.to(qw.codes.device)]
        kgroup = kernel_group(qw.group, in_features)
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.cpu().to(torch.int32).contiguous(), 1)
        else:
            q = codes.to(device=device, dtype=torch.uint8)
            q = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()  # [N, K/2], even column in the high nibble
            inner_k_tiles = next(t for t in (8, 4, 2) if in_features % (t * 16) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(q, inner_k_tiles)
        return cls(
            packed.to(device),
            int4_scale_and_zero(qw, kgroup, KERNEL_DTYPE).to(device),
            kgroup,
            in_features,
            out_features,
            bias=None if bias is None else bias.detach().to(device),
            perm=None if perm is None else perm.to(device),
        )

    def dense_unsupported(self) -> str:
        """Why :meth:`dense_weight` cannot unpack this layout ("" when it can)."""
        if self.packed.device.type != "cpu":
            return f"no unpacker for the {self.packed.device.type} int4 tile layout"
        if self.out_features % 64:
            return f"out_features {self.out_features} is not a multiple of 64 (CPU int4 pack blocks)"
        return ""

    def dense_weight(self) -> Tensor:
        """The dequantized weight ``[N, K]`` in bf16 (columns in kernel order, i.e. permuted by ``perm``),
        a transposed view of :func:`unpack_cpu_int4pack`'s ``[K, N]``, made in one pass by the
        unpacker :func:`fused_unpacker` chose. It lives only for the call that asked for it: no dense copy
        is kept (the transient peak is one layer's bf16 weight)."""
        unpack, _ = fused_unpacker()
        with torch.profiler.record_function(DEQUANT_LABEL):
            return unpack(self.packed, self.scale_and_zero, self.group_size).t()

    def forward(self, x: Tensor) -> Tensor:
        x2 = _flatten(x, self.perm)
        if self.dense_from is not None and x2.shape[0] >= self.dense_from:
            y = nn.functional.linear(x2, self.dense_weight())
        elif self.gemv_upto is not None and x2.shape[0] <= self.gemv_upto:
            y = torch.ops.quantcli.int4_gemv(x2, self.packed, self.scale_and_zero, self.group_size)
        elif self.amx:
            y = torch.ops.quantcli.int4_gemm_amx(x2, self.packed, self.scale_and_zero, self.group_size)
        elif self.packed.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_and_zero)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scale_and_zero)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        dense = f", dense from {self.dense_from} tokens" if self.dense_from is not None else ""
        native_gemv = f", {INT4_GEMV} up to {self.gemv_upto} tokens" if self.gemv_upto is not None else ""
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}, kernel={self.kernel}{dense}{native_gemv}"


class Int8WeightOnlyLinear(nn.Module):
    """``y = x @ wᵀ + b`` with ``w = scale[n]·int8[n, k] (+ row_offset[n])``.

    Buffers: ``weight`` int8 ``[N, K]``, ``scale`` bf16 ``[N]``, optional ``row_offset`` float32
    ``[N]`` (added as ``row_offset·Σ_k x_k`` when the codes needed a shift of 128), ``bias`` ``[N]``.
    """

    def __init__(
        self,
        weight: Tensor,
        scale: Tensor,
        bias: Tensor | None = None,
        row_offset: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("row_offset", row_offset)
        self.register_buffer("bias", bias)
        self.kernel = INT8
        self.dense_from: int | None = None

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: Tensor | None = None, device: str | torch.device = "cpu"
    ) -> "Int8WeightOnlyLinear":
        """Store per-channel ``qw`` as int8 codes centred on its zero point (exact for ≤ 8 bits)."""
        device = _device(device)
        why = int8_unsupported(qw, device)
        if why:
            raise ValueError(f"int8 kernel cannot take this weight: {why}")
        signed, scale, row_offset = centred_int8(qw)
        row_offset = None if row_offset is None else row_offset.to(device)
        return cls(
            signed.contiguous().to(device),
            scale.to(device=device, dtype=KERNEL_DTYPE),
            bias=None if bias is None else bias.detach().to(device),
            row_offset=row_offset,
        )

    def dense_unsupported(self) -> str:
        return ""

    def dense_weight(self) -> Tensor:
        """The dequantized weight ``[N, K]`` in bf16: ``scale[n]·int8[n, k] + row_offset[n]``."""
        with torch.profiler.record_function(DEQUANT_LABEL):
            w = self.weight.to(KERNEL_DTYPE) * self.scale[:, None]
            return w if self.row_offset is None else w + self.row_offset[:, None].to(KERNEL_DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        x2 = _flatten(x, None)
        if self.dense_from is not None and x2.shape[0] >= self.dense_from:
            y = nn.functional.linear(x2, self.dense_weight())
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale)
            if self.row_offset is not None:
                y = y.float() + x2.float().sum(dim=1, keepdim=True) * self.row_offset
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        shifted = ", shifted" if self.row_offset is not None else ""
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}{shifted}"


KERNEL_MODULES = (Int4WeightOnlyLinear, Int8WeightOnlyLinear)  # modules whose bf16 buffers keep their dtype


def dequantized_linear(
    qw: QuantizedWeight, bias: Tensor | None, device: str | torch.device, dtype: torch.dtype
) -> nn.Linear:
    """Fallback: an ``nn.Linear`` holding ``qw.dequantize()`` in ``dtype`` (``[out, in]``)."""
    out_features, in_features = qw.codes.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(qw.dequantize().to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype), requires_grad=False)
    return linear


# --------------------------------------------------------------------------------------------
# Swapping kernels into a model
# --------------------------------------------------------------------------------------------


@dataclass
class LayerKernel:
    """What one quantized linear runs on: ``kernel`` (op name or ``dequant-fp``), and why not better."""

    kernel: str
    bits: int
    group: int
    reason: str = ""  # non-empty when a faster kernel was refused (always for dequant-fp)
    dense_from: int | None = None  # from this many tokens per call on: dequant-per-call+dense
    dense_reason: str = ""  # why that threshold (measured, or why there is no dense path)
    gemv_upto: int | None = None  # up to this many tokens per call: quantcli::int4_gemv
    gemv_reason: str = ""  # why (measured, or why the native GEMV does not run)
    amx: bool = False  # between the two: quantcli::int4_gemm_amx instead of the kernel
    amx_reason: str = ""  # why (measured, or why the AMX GEMM does not run)

    def path(self, tokens: int) -> str:
        """What runs a call with ``tokens`` rows: :data:`DENSE` from ``dense_from`` on,
        :data:`INT4_GEMV` up to ``gemv_upto``, else :data:`INT4_AMX` where chosen, else the kernel."""
        if self.dense_from is not None and tokens >= self.dense_from:
            return DENSE
        if self.gemv_upto is not None and tokens <= self.gemv_upto:
            return INT4_GEMV
        return INT4_AMX if self.amx else self.kernel


@dataclass
class KernelReport:
    """Per-layer kernel choice after :func:`swap_in_kernels`; ``layers`` keeps the model's order."""

    device: str
    layers: dict[str, LayerKernel] = field(default_factory=dict)
    shapes: dict[str, dict] = field(default_factory=dict)  # per weight shape: kernel vs dense timings
    gemv_shapes: dict[str, dict] = field(default_factory=dict)  # per weight shape: ATen vs native GEMV timings
    gemv: str = ""  # why quantcli::int4_gemv cannot run here ("" when it can or was not asked for)
    amx_shapes: dict[str, dict] = field(default_factory=dict)  # per weight shape: ATen kernel vs AMX GEMM timings
    amx: str = ""  # why quantcli::int4_gemm_amx cannot run here ("" when it can or was not asked for)
    unpack: str = ""  # how the dense prefill path unpacks int4 weights ("" when no layer has that path)
    int8_forward: str = ""  # how the int8 GEMM's activation quantization and epilogue run ("" without W8A8 layers)

    def path_counts(self, tokens: int) -> dict[str, int]:
        """Number of layers per path for a call with ``tokens`` rows (1: decode; batch·L: prefill)."""
        out: dict[str, int] = {}
        for layer in self.layers.values():
            path = layer.path(tokens)
            out[path] = out.get(path, 0) + 1
        return out

    def counts(self) -> dict[str, int]:
        """Number of layers per kernel, e.g. ``{"aten._weight_int4pack_mm_for_cpu": 210}``."""
        out: dict[str, int] = {}
        for layer in self.layers.values():
            out[layer.kernel] = out.get(layer.kernel, 0) + 1
        return out

    def fallbacks(self) -> dict[str, str]:
        """Layers that run dequantized, with the reason each kernel refused them."""
        return {name: lk.reason for name, lk in self.layers.items() if lk.kernel.startswith(DEQUANT)}

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "counts": self.counts(),
            "fallbacks": self.fallbacks(),
            "dense_prefill_shapes": self.shapes,
            "dense_prefill_unpack": self.unpack,
            "decode_gemv_shapes": self.gemv_shapes,
            "decode_gemv_unavailable": self.gemv,
            "prefill_amx_shapes": self.amx_shapes,
            "prefill_amx_unavailable": self.amx,
            "int8_forward": self.int8_forward,
            "layers": {name: asdict(lk) for name, lk in self.layers.items()},
        }


def _verify(module: nn.Module, qw: QuantizedWeight, bias: Tensor | None, device: torch.device) -> str:
    """Compare ``module`` on two random rows with the dequantized weight; "" when they agree."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, qw.codes.shape[1], generator=gen).to(device)
    ref = x @ qw.dequantize().to(device).t()
    if bias is not None:
        ref = ref + bias.detach().float().to(device)
    try:
        y = module(x).float()
    except RuntimeError as err:  # the op refused this shape/dtype on this build
        return str(err).splitlines()[0]
    rel = float((y - ref).norm() / ref.norm().clamp(min=1e-12))
    if not rel <= VERIFY_TOL:
        return f"output differs from the dequantized weight (relative error {rel:.3g})"
    return ""


def build_kernel(
    qw: QuantizedWeight,
    bias: Tensor | None,
    device: str | torch.device,
    fallback_dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> tuple[nn.Module, LayerKernel]:
    """The best module for one quantized weight: int4, else int8, else dequantized fp."""
    device = _device(device)
    bits = code_bits(qw)
    reasons = []
    for name, cls, unsupported in (
        ("int4", Int4WeightOnlyLinear, int4_unsupported),
        ("int8", Int8WeightOnlyLinear, int8_unsupported),
    ):
        why = unsupported(qw, device)
        if not why:
            try:
                module = cls.from_quantized(qw, bias, device)
            except RuntimeError as err:
                why = str(err).splitlines()[0]
            else:
                why = _verify(module, qw, bias, device) if verify else ""
                if not why:
                    return module, LayerKernel(module.kernel, bits, qw.group, "; ".join(reasons))
        reasons.append(f"{name}: {why}")
    module = dequantized_linear(qw, bias, device, fallback_dtype)
    return module, LayerKernel(DEQUANT, bits, qw.group, "; ".join(reasons))


def time_call(module: nn.Module, x: Tensor, reps: int) -> float:
    """Fastest of ``reps`` calls of ``module(x)`` in ms (after one untimed call)."""
    return fastest_ms(lambda: (module(x), synchronize(x.device)), reps)


def time_paths(
    module: nn.Module, x: Tensor, probe_rows: tuple[int, ...], reps: int, setups: dict[str, Callable[[int], None]]
) -> dict[str, dict[int, float]]:
    """``{key: {rows: ms}}``: the fastest of ``reps`` calls of ``module(x[:rows])`` at each of
    ``probe_rows`` under each of ``setups`` (``setups[key](rows)`` switches the module to one path),
    the paths taking turns (:func:`time_call` once each per round), so that a burst of other load on
    a shared machine slows every path alike instead of deciding between them. The module is left in
    whichever path ran last (callers restore it)."""
    timings: dict[str, dict[int, float]] = {key: {} for key in setups}
    for m in probe_rows:
        for _ in range(reps):
            for key, setup in setups.items():
                setup(m)
                timings[key][m] = min(timings[key].get(m, float("inf")), time_call(module, x[:m], 1))
    return timings


def choose_dense_threshold(
    module: nn.Module, probe_tokens: tuple[int, ...] = DENSE_PROBE_TOKENS, reps: int = 3
) -> tuple[int | None, str, dict]:
    """From how many tokens per call ``module`` should dequantize + dense-matmul instead of its kernel.

    Times the kernel and the dense path in turns (:func:`time_paths`) at each ``probe_tokens`` count (random
    bf16 rows) and returns ``(threshold, reason, timings)``: the smallest probed count from which
    the dense path is faster at every larger probe too, or None (kernel always) with the reason.
    Pass the token counts the model will actually be called with (every prompt length run): a
    choice between or beyond the probes is an extrapolation. The unpacked weight is first checked
    against the kernel's output, so a changed packing layout disables the dense path instead of
    computing garbage.
    """
    why = module.dense_unsupported()
    if why:
        return None, why, {}
    probe_tokens = tuple(sorted(set(probe_tokens)))
    device = module.scale_and_zero.device if hasattr(module, "scale_and_zero") else module.weight.device
    gen = torch.Generator().manual_seed(0)
    saved = module.dense_from
    try:
        with torch.inference_mode():
            x = torch.randn(max(probe_tokens), module.in_features, generator=gen).to(device=device, dtype=KERNEL_DTYPE)
            module.dense_from = None
            ref = module(x[:4]).float()
            module.dense_from = 0
            rel = float((module(x[:4]).float() - ref).norm() / ref.norm().clamp(min=1e-12))
            if not rel <= VERIFY_TOL:
                return None, f"unpacked weight differs from the kernel (relative error {rel:.3g})", {}
            timings = time_paths(module, x, probe_tokens, reps, {"kernel_ms": lambda m: setattr(module, "dense_from", None),
                                                                 "dense_ms": lambda m: setattr(module, "dense_from", 0)})
    finally:
        module.dense_from = saved
    wins = [timings["dense_ms"][m] < timings["kernel_ms"][m] for m in probe_tokens]
    threshold = None
    for i, m in enumerate(probe_tokens):
        if all(wins[i:]):
            threshold = m
            break
    probed = ", ".join(map(str, probe_tokens))
    if threshold is None:
        return None, f"kernel faster at {max(probe_tokens)} tokens (probed {probed})", timings
    return threshold, f"dense faster from {threshold} tokens on (probed {probed})", timings


def choose_gemv(module: nn.Module, probe_rows: tuple[int, ...] = GEMV_PROBE_ROWS, reps: int = 5) -> tuple[int | None, str, dict]:
    """Up to how many rows per call ``module`` (an :class:`Int4WeightOnlyLinear` on the CPU) should
    run :data:`INT4_GEMV` instead of the ATen int4 kernel.

    Checks the native kernel's output against the ATen kernel's on random bf16 rows, then times both
    (:func:`time_paths`) at each of ``probe_rows`` and returns ``(upto, reason, timings)``: the largest
    probed count up to which the native kernel was faster at every probe, or None (ATen always)
    with the reason. Pass the row counts decode will run (the batch size).
    """
    why = gemv.gemv_status() or gemv.shape_unsupported(module.out_features, module.in_features, module.group_size)
    if why:
        return None, why, {}
    saved_dense, module.dense_from = module.dense_from, None
    try:
        return _verify_and_time_gemv(module, probe_rows, reps, INT4_GEMV, "ATen kernel")
    finally:
        module.dense_from = saved_dense


class DenseGemvLinear(nn.Module):
    """A dense ``nn.Linear`` (the same ``weight`` and ``bias`` parameters, so tied weights stay tied)
    that runs :data:`BF16_GEMV` for bf16 inputs of up to ``gemv_upto`` rows on a bf16 weight on the
    CPU, and ``F.linear`` otherwise (more rows, another dtype: the stream may be cast per prompt
    length). ``x [..., in] → [..., out]``."""

    def __init__(self, linear: nn.Linear, gemv_upto: int | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.gemv_upto = gemv_upto

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.gemv_upto is not None and x.dtype == w.dtype == torch.bfloat16 and x.device.type == "cpu":
            x2 = x.reshape(-1, self.in_features)
            if x2.shape[0] <= self.gemv_upto:
                y = torch.ops.quantcli.bf16_gemv(x2, w)
                y = y if self.bias is None else y + self.bias
                return y.reshape(*x.shape[:-1], self.out_features)
        return nn.functional.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}" + (f", {BF16_GEMV} up to {self.gemv_upto} rows" if self.gemv_upto else "")


def choose_dense_gemv(module: DenseGemvLinear, probe_rows: tuple[int, ...] = GEMV_PROBE_ROWS, reps: int = 5) -> tuple[int | None, str, dict]:
    """Up to how many rows per call ``module`` should run :data:`BF16_GEMV` instead of ATen's dense
    bf16 matmul: its output is checked against ``F.linear``'s on random bf16 rows, then both are
    timed at each of ``probe_rows``; ``(upto, reason, timings)`` as :func:`choose_gemv` returns."""
    why = gemv.gemv_status()
    if why or module.weight.dtype != torch.bfloat16 or module.weight.device.type != "cpu":
        return None, why or f"weight is {module.weight.dtype} on {module.weight.device.type} (the GEMV takes bf16 on the CPU)", {}
    return _verify_and_time_gemv(module, probe_rows, reps, BF16_GEMV, "ATen bf16 matmul")


def choose_amx(module: nn.Module, probe_tokens: tuple[int, ...] = DENSE_PROBE_TOKENS, reps: int = 3) -> tuple[bool, str, dict]:
    """Whether ``module`` (an :class:`Int4WeightOnlyLinear` on the CPU) should run :data:`INT4_AMX`
    instead of ATen's int4 kernel for calls of more rows than the GEMV takes (below the dense path).

    Checks the AMX GEMM's output against ATen's on random bf16 rows, then times both in turns (:func:`time_paths`)
    at each of ``probe_tokens`` and returns ``(use, reason, timings)``: used where its total over the
    probes is smaller. The dense-prefill threshold is measured afterwards against whichever won.
    """
    why = gemv.amx_status() or ("" if module.group_size % 32 == 0 else f"group {module.group_size} is not a multiple of 32")
    why = why or gemv.shape_unsupported(module.out_features, module.in_features, module.group_size)
    if why:
        return False, why, {}
    probe_tokens = tuple(sorted(set(probe_tokens)))
    saved = module.amx, module.gemv_upto, module.dense_from
    module.gemv_upto = module.dense_from = None
    try:
        timings, why = _verify_and_time(module, probe_tokens, reps, lambda rows: setattr(module, "amx", rows is not None),
                                        INT4_AMX, "ATen kernel", "amx_ms", verify_rows=20)
    finally:
        module.amx, module.gemv_upto, module.dense_from = saved
    if why:
        return False, why, {}
    probed = ", ".join(map(str, probe_tokens))
    amx, aten = sum(timings["amx_ms"].values()), sum(timings["aten_ms"].values())
    if amx < aten:
        return True, f"{INT4_AMX} faster over the probes ({probed} tokens: {amx:.3g} vs {aten:.3g} ms)", timings
    return False, f"ATen kernel faster over the probes ({probed} tokens: {aten:.3g} vs {amx:.3g} ms)", timings


def _verify_and_time(
    module: nn.Module, probe_rows: tuple[int, ...], reps: int, use_native: Callable[[int | None], None],
    native: str, aten: str, native_key: str, verify_rows: int | None = None,
) -> tuple[dict[str, dict[int, float]], str]:
    """Check a native path against ATen's and time both on random bf16 rows. ``use_native(rows)``
    switches ``module`` to the native path for calls of up to ``rows`` rows (None: ATen's). The two
    must agree on ``verify_rows`` rows (default: the largest probe) within :data:`VERIFY_TOL`; then
    each is timed (:func:`time_paths`) at every ``probe_rows`` count. Returns ``({"aten_ms": {rows:
    ms}, native_key: {rows: ms}}, "")``, or ``({}, why)`` where they disagree. The caller restores
    the module's state."""
    x = torch.randn(max(probe_rows), module.in_features, generator=torch.Generator().manual_seed(0)).to(KERNEL_DTYPE)
    check = x[:verify_rows] if verify_rows is not None else x
    with torch.inference_mode():
        use_native(None)
        ref = module(check).float()
        use_native(max(probe_rows))
        rel = float((module(check).float() - ref).norm() / ref.norm().clamp(min=1e-12))
        if not rel <= VERIFY_TOL:
            return {}, f"{native} differs from the {aten} (relative error {rel:.3g})"
        timings = time_paths(module, x, probe_rows, reps, {"aten_ms": lambda m: use_native(None), native_key: use_native})
    return timings, ""


def _verify_and_time_gemv(module: nn.Module, probe_rows: tuple[int, ...], reps: int, native: str, aten: str) -> tuple[int | None, str, dict]:
    """For a module that runs ``native`` up to ``module.gemv_upto`` rows and ``aten`` beyond: check
    and time both (:func:`_verify_and_time`) and return ``(upto, reason, timings)``, ``upto`` the
    largest probed count up to which ``native`` was faster at every probe (None: ``aten`` from the
    first). ``gemv_upto`` is restored."""
    probe_rows = tuple(sorted(set(probe_rows)))
    saved = module.gemv_upto
    try:
        timings, why = _verify_and_time(module, probe_rows, reps, lambda rows: setattr(module, "gemv_upto", rows),
                                        native, aten, "gemv_ms")
    finally:
        module.gemv_upto = saved
    if why:
        return None, why, {}
    upto = None
    for m in probe_rows:
        if timings["gemv_ms"][m] >= timings["aten_ms"][m]:
            break
        upto = m
    probed = ", ".join(map(str, probe_rows))
    if upto is None:
        return None, f"{aten} faster at {probe_rows[0]} rows (probed {probed})", timings
    return upto, f"{native} faster up to {upto} rows (probed {probed})", timings


def swap_in_dense_gemv(model: nn.Module, rows: tuple[int, ...] = GEMV_PROBE_ROWS) -> dict:
    """Wrap every bf16 ``nn.Linear`` of ``model`` on the CPU (the quantized layers are kernel modules
    by now, so these are the layers a quantized model keeps dense) in a :class:`DenseGemvLinear`
    that runs :data:`BF16_GEMV` up to the row count measured faster per weight shape
    (:func:`choose_dense_gemv` at ``rows``). Returns the report: ``{"layers": how many were wrapped,
    "layers_with_gemv": how many run the GEMV, "shapes": {shape: choice and timings},
    "unavailable": why it cannot run here ("" when it can)}``."""
    report: dict = {"layers": 0, "layers_with_gemv": 0, "shapes": {}, "unavailable": gemv.gemv_status()}
    if report["unavailable"]:
        return report
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"]
    for name, linear in targets:
        module = DenseGemvLinear(linear)
        probe = _per_shape(report["shapes"], module, lambda m: _probe("gemv_upto", *choose_dense_gemv(m, rows)))
        module.gemv_upto = probe["gemv_upto"]
        report["layers"] += 1
        report["layers_with_gemv"] += module.gemv_upto is not None
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
    return report


def _probe(name: str, value: int | None, reason: str, timings: dict) -> dict:
    """A per-shape choice as the report stores it: ``{name: value, "reason": ..., **timings}``."""
    return {name: value, "reason": reason, **timings}


def _per_shape(cache: dict[str, dict], module: nn.Module, measure: Callable[[nn.Module], dict]) -> dict:
    """``measure(module)`` once per weight shape (:func:`_shape_key`), kept in ``cache``."""
    key = _shape_key(module)
    if key not in cache:
        cache[key] = measure(module)
    return cache[key]


def _shape_key(module: nn.Module) -> str:
    extra = "perm" if getattr(module, "perm", None) is not None else ""
    group = f"g{module.group_size}" if hasattr(module, "group_size") else ""
    return f"{type(module).__name__}[{module.out_features}x{module.in_features}]{group}{extra}"


def swap_in_kernels(
    model: nn.Module,
    quantized: dict[str, QuantizedWeight],
    device: str | torch.device,
    verify: bool = True,
    dense_prefill: bool = False,
    builder: Callable[..., tuple[nn.Module, "LayerKernel"]] | None = None,
    probe_tokens: tuple[int, ...] = DENSE_PROBE_TOKENS,
    decode_gemv: bool = False,
    gemv_rows: tuple[int, ...] = GEMV_PROBE_ROWS,
) -> KernelReport:
    """Replace each quantized ``nn.Linear`` of ``model`` (by module name) with a kernel module.

    Every layer gets the best kernel that represents its codes exactly (int4, then int8) or a
    dequantized ``nn.Linear`` in the layer's own dtype; with ``verify`` each choice is checked
    against the dequantized weight on random inputs and falls back on failure. With
    ``dense_prefill`` each distinct weight shape is timed once at ``probe_tokens`` rows per call
    (:func:`choose_dense_threshold`; give it the token counts that will run) and its layers
    dequantize + dense-matmul from the measured token count on. With ``decode_gemv`` each CPU int4
    weight shape is timed at ``gemv_rows`` rows per call (:func:`choose_gemv`) and its layers run
    :data:`INT4_GEMV` up to the measured row count. The model is
    changed in place; move its other parts with ``model.to(device)`` (never ``.to(dtype)``).
    ``builder(qw, bias, device, dtype)`` replaces :func:`build_kernel` for every layer (the
    weight-activation kernels of :mod:`quantcli.bench.w8a8` plug in here).
    """
    device = _device(device)
    report = KernelReport(device=str(device))
    for name, qw in quantized.items():
        linear = model.get_submodule(name)
        weight = getattr(linear, "weight", None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        bias = getattr(linear, "bias", None)
        if builder is not None:  # weight-activation kernels: no dense-prefill probe
            module, choice = builder(qw, bias, device, dtype)
        else:
            module, choice = build_kernel(qw, bias, device, dtype, verify)
        if builder is None and choice.kernel != DEQUANT:
            if not dense_prefill:
                choice.dense_reason = "dense prefill not requested"
            else:
                if choice.kernel == INT4_CPU:  # first the multi-row kernel, then the dense path against it
                    amx = _per_shape(report.amx_shapes, module, lambda m: _probe("amx", *choose_amx(m, probe_tokens)))
                    module.amx = choice.amx = amx["amx"]
                    choice.amx_reason = amx["reason"]
                probe = _per_shape(report.shapes, module, lambda m: _probe("dense_from", *choose_dense_threshold(m, probe_tokens)))
                module.dense_from = choice.dense_from = probe["dense_from"]
                choice.dense_reason = probe["reason"]
            if decode_gemv and choice.kernel == INT4_CPU:
                probe = _per_shape(report.gemv_shapes, module, lambda m: _probe("gemv_upto", *choose_gemv(m, gemv_rows)))
                module.gemv_upto = choice.gemv_upto = probe["gemv_upto"]
                choice.gemv_reason = probe["reason"]
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
        report.layers[name] = choice
        report.int8_forward = getattr(module, "forward_how", report.int8_forward)
    if any(lk.dense_from is not None and lk.kernel in (INT4_CPU, INT4_CUDA) for lk in report.layers.values()):
        report.unpack = fused_unpacker()[1]
    if decode_gemv and any(lk.kernel == INT4_CPU for lk in report.layers.values()):
        report.gemv = gemv.gemv_status()
    if dense_prefill and builder is None and any(lk.kernel == INT4_CPU for lk in report.layers.values()):
        report.amx = gemv.amx_status()
    return report
