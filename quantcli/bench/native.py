"""A native CPU kernel for the dense prefill path: unpack ATen's CPU int4 pack to bf16 in one pass.

From a measured token count on, a quantized linear's prefill dequantizes its packed weight once
per call and runs the dense bf16 matmul (:mod:`quantcli.bench.kernels`). The unpacking is pure
overhead against a bf16 model, so its speed decides how close a 4-bit prefill gets to bf16's.
:func:`unpack_int4` writes ``wᵀ [K, N]`` bf16 from ``packed`` uint8 ``[N, K/2]`` and
``scale_and_zero`` bf16 ``[K/G, N, 2]`` (the kernel's own tensors, no copy kept):

    wᵀ[k, n] = round_bf16(q[n, k]·scale[g, n] + round_bf16(offset[g, n] − 8·scale[g, n])),  g = k // G

computed in float32 with one fused multiply-add (``q·scale`` is exact: 4 × 8 significant bits), so
the bits equal the eager reference's (``torch.addcmul`` in bf16). One AVX-512 loop: per 64-row
block and input column, 32 bytes in, 64 bf16 out, contiguous; blocks split across OpenMP threads
(torch's own libgomp, so ``torch.set_num_threads`` applies).

The C source is compiled on first use with the system C compiler (``cc``, as torch.compile's
inductor does) into a cache directory (:func:`_cache_dir`), keyed by its hash, and loaded with ctypes. Where there is
no compiler or no AVX-512 (with BF16), :func:`native_status` says why and callers use the
torch.compile'd unpacker instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

static inline __m512 to_ps(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }

/* 32 bf16 = round(q * scale + shift) for the 32 codes in bytes (as uint8), rows r..r+31 */
static inline void store32(uint16_t *dst, __m256i q, const __m512 scale[2], const __m512 shift[2]) {
    __m512 a = _mm512_fmadd_ps(to_ps(_mm256_castsi256_si128(q)), scale[0], shift[0]);
    __m512 b = _mm512_fmadd_ps(to_ps(_mm256_extracti128_si256(q, 1)), scale[1], shift[1]);
    _mm512_storeu_si512((void *)dst, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

/* out [K, N] bf16 = w^T; packed uint8 [N/64][K][32]: byte j of row k of block b holds row 64b+j
   (low nibble) and row 64b+32+j (high nibble); sz: per group g and row n one 32-bit word =
   bf16 scale (low half) | bf16 offset (high half), w = scale*(q-8)+offset. */
void unpack_int4(const uint8_t *packed, const uint32_t *sz, int K, int N, int G, uint16_t *out) {
    const int blocks = N / 64, groups = K / G;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m512i high16 = _mm512_set1_epi32((int)0xFFFF0000u);
    #pragma omp parallel for schedule(static)
    for (int b = 0; b < blocks; b++) {
        for (int g = 0; g < groups; g++) {
            __m512 scale[4], shift[4];
            for (int i = 0; i < 4; i++) {
                __m512i words = _mm512_loadu_si512((const void *)(sz + (size_t)g * N + (size_t)b * 64 + 16 * i));
                scale[i] = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
                __m512 offset = _mm512_castsi512_ps(_mm512_and_si512(words, high16));
                __m512 s = _mm512_sub_ps(offset, _mm512_mul_ps(_mm512_set1_ps(8.0f), scale[i]));
                /* round the shift to bf16 (nearest even) and back, as the reference does */
                __m256i s16 = (__m256i)_mm512_cvtneps_pbh(s);
                shift[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(s16), 16));
            }
            for (int k = g * G; k < (g + 1) * G; k++) {
                __m256i bytes = _mm256_loadu_si256((const __m256i *)(packed + ((size_t)b * K + k) * 32));
                uint16_t *row = out + (size_t)k * N + (size_t)b * 64;
                store32(row, _mm256_and_si256(bytes, low4), scale, shift);
                store32(row + 32, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4), scale + 2, shift + 2);
            }
        }
    }
}
"""
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mfma", "-fopenmp", "-shared", "-fPIC")

_STATE: dict[str, object] = {}


def _cache_dir() -> Path:
    """``$XDG_CACHE_HOME/quantcli`` (``~/.cache/quantcli``), or a per-user temporary directory where
    that cannot be created (a read-only home, as on some CI runners)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for path in (Path(root) / "quantcli", Path(tempfile.gettempdir()) / f"quantcli-{os.getuid()}"):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            return path
    return Path(tempfile.mkdtemp(prefix="quantcli-"))


def cpu_has_avx512_bf16() -> bool:
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and bool(
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def compiled_library(
    stem: str, source: str, suffix: str, command: list[str], link: tuple[str, ...] = ()
) -> tuple[Path | None, str]:
    """The shared library built from ``source`` by ``command`` (compiler and flags), with the source
    path, ``-o`` output and then the ``link`` arguments appended (libraries after the code that uses
    them). Cached in :func:`_cache_dir` under ``stem`` and a hash of source, command and link
    arguments, so an edit rebuilds and concurrent processes never load half a file. Returns
    ``(path, "")``, or ``(None, why not)``: no compiler, or the compile error's first line."""
    digest = hashlib.sha256((source + repr((command, link))).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"{stem}_{digest}.so"
    if lib.exists():
        return lib, ""
    try:
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            src, built = Path(tmp) / f"{stem}{suffix}", Path(tmp) / lib.name
            src.write_text(source)
            proc = subprocess.run([*command, str(src), "-o", str(built), *link], capture_output=True, text=True)
            if proc.returncode != 0:
                first = next((line for line in proc.stderr.splitlines() if "error" in line), None)
                return None, f"{command[0]} failed: {(first or proc.stderr.strip() or 'no output')[:200]}"
            os.replace(built, lib)  # atomic: a concurrent process never loads half a file
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"cannot build {stem}: {err}"
    return lib, ""


def _build() -> tuple[ctypes.CDLL | None, str]:
    """Compile :data:`SOURCE` once per source and flags (cached on disk) and load it."""
    if not cpu_has_avx512_bf16():
        return None, f"this CPU has no AVX-512 BF16 (vector unit: {torch.backends.cpu.get_cpu_capability()})"
    lib, why = compiled_library("unpack_int4", SOURCE, ".c", ["cc", *FLAGS])
    if lib is None:
        return None, why
    try:
        handle = ctypes.CDLL(str(lib))
    except OSError as err:
        return None, f"cannot load {lib}: {err}"
    handle.unpack_int4.restype = None
    handle.unpack_int4.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return handle, ""


def native_status() -> str:
    """"" when the native unpacker is built and loaded (decided once per process), else why not."""
    if "why" not in _STATE:
        handle, why = _build()
        _STATE.update(handle=handle, why=why)
    return _STATE["why"]  # type: ignore[return-value]


def unpack_int4(packed: Tensor, scale_and_zero: Tensor, group: int) -> Tensor:
    """``wᵀ`` bf16 ``[K, N]`` from ``packed`` uint8 ``[N, K/2]`` and ``scale_and_zero`` bf16
    ``[K/group, N, 2]`` (CPU, contiguous, ``N`` a multiple of 64); see the module docstring.
    Call only after :func:`native_status` returned ""."""
    n = scale_and_zero.shape[1]
    k = packed.numel() * 2 // n
    packed, scale_and_zero = packed.contiguous(), scale_and_zero.contiguous()
    out = torch.empty(k, n, dtype=torch.bfloat16)
    _STATE["handle"].unpack_int4(packed.data_ptr(), scale_and_zero.data_ptr(), k, n, group, out.data_ptr())  # type: ignore[attr-defined]
    return out
