"""Native CPU kernels for ``quant bench``, registered as torch ops in one C++ library:

* ``quantcli::int4_gemv`` (decode, AVX-512 VNNI): described below;
* ``quantcli::bf16_gemv`` (decode, AVX-512 BF16): ``x @ wᵀ`` for the dense bf16 linears a model
  keeps, a streaming read of ``w`` (four rows per pass, ``vdpbf16ps``, float32 sums);
* ``quantcli::int4_gemm_amx`` (prefill, AMX-BF16): many rows times ATen's int4 pack; each thread
  unpacks a 64-row block of ``w`` once per call into bf16 AMX tiles and multiplies every 16 rows of
  ``x`` by them (``tdpbf16ps``), so no dense copy of the weight is made. :func:`amx_status` says
  whether Linux granted the tile state.

The int4 matrix-vector kernel:

Decode multiplies a few rows (one per sequence) by every weight, so its time is how fast the
weights stream through the cores. ``quantcli::int4_gemv`` reads ATen's CPU int4 pack as it is (no
second copy of the weight) and computes, for ``x`` bf16 ``[M, K]``, ``packed`` uint8 ``[N, K/2]``
(64-row blocks stored as ``[K, 32]`` bytes: byte ``j`` holds row ``j`` in its low nibble and row
``j + 32`` in its high nibble) and ``scale_and_zero`` bf16 ``[K/G, N, 2]``, the bf16 ``[M, N]``

    y[m, n] = Σ_g scale[g, n] · Σ_{k ∈ g} q[n, k] · x̃[m, k]  +  (offset[g, n] − 8·scale[g, n]) · Σ_{k ∈ g} x̃[m, k]

i.e. ``x̃ @ wᵀ`` for ATen's ``w = scale·(q − 8) + offset``, summed in int32 within a group and in
float32 across groups. ``x̃`` is ``x`` in 16-bit fixed point per row and group: scaled by the power
of two that puts the group's largest ``|x|`` in ``[2^14, 2^15)`` and rounded. A bf16 value has 8
significant bits, so every ``x`` within 2^7 of its group's largest is exact, and a smaller one is
off by at most 2^-16 of the largest: far below the bf16 rounding of the output.

Why fixed point: the loop is bound by its multiply-add instructions, not by memory. On the CPU this
was written on (AVX-512 with BF16 and VNNI), ``vpdpwssd`` (int16 pairs into int32) issues about
twice as fast as ``vdpbf16ps`` (bf16 pairs into float32); a bf16 version of this kernel was no faster
than ATen's, this one about twice as fast on one thread. Per iteration: 64 bytes (two ``k`` of a
64-row block) are masked into nibbles, one byte permute (VBMI) per 16 rows pairs ``(q[k], q[k+1])``
as int16, and one ``vpdpwssd`` per 16 rows multiplies them by ``(x̃[k], x̃[k+1])``. Work is split
across OpenMP threads (torch's own libgomp, so ``torch.set_num_threads`` applies) in contiguous
ranges of (block, group) pairs, so a layer with fewer blocks than threads is still split; each
thread sums into its own float32 output, added up at the end. Groups up to 256 cannot overflow
int32 (256 × 15 × 2^15 < 2^31).

It is C++ built on first use with the system compiler against the installed torch's headers (like
a torch C++ extension, without ninja or setuptools) into :func:`quantcli.bench.native._cache_dir`,
and loaded with ``torch.ops.load_library``, so a compiled decode graph calls it through the
dispatcher as cheaply as an ATen op (a Python custom op costs ~100 µs per call). Where it cannot
build (no compiler, no AVX-512 BF16/VBMI/VNNI, no torch headers) :func:`gemv_status` says why and
ATen's kernel runs. :func:`quantcli.bench.kernels.choose_gemv` uses it per weight shape only where
it measured faster.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch import Tensor

from quantcli.bench.native import cpu_has_avx512_bf16, compiled_library

OP = "quantcli::int4_gemv"
BF16_OP = "quantcli::bf16_gemv"
AMX_OP = "quantcli::int4_gemm_amx"

SOURCE = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

/* Word r of a permuted vector: (lo byte r, lo byte 32 + r) as two int16 = (q[row, k], q[row, k + 1]);
   table 0 makes rows 0-15 of a half (low or high nibbles), table 1 rows 16-31; index 64 = a zero byte. */
alignas(64) static const uint8_t PAIRS[2][64] = {
    {0,64,32,64, 1,64,33,64, 2,64,34,64, 3,64,35,64, 4,64,36,64, 5,64,37,64, 6,64,38,64, 7,64,39,64,
     8,64,40,64, 9,64,41,64, 10,64,42,64, 11,64,43,64, 12,64,44,64, 13,64,45,64, 14,64,46,64, 15,64,47,64},
    {16,64,48,64, 17,64,49,64, 18,64,50,64, 19,64,51,64, 20,64,52,64, 21,64,53,64, 22,64,54,64, 23,64,55,64,
     24,64,56,64, 25,64,57,64, 26,64,58,64, 27,64,59,64, 28,64,60,64, 29,64,61,64, 30,64,62,64, 31,64,63,64}};

/* bytes ahead in a block to prefetch: decode reads each weight once, from memory or L3 */
#define PREFETCH 2048
/* acc[i] (rows 16i..16i+15 of a 64-row block, int32) += sum_{k0 <= k < k1} q[row, k] * xq[k] */
static inline void block_dot(const uint8_t *block, const int16_t *xq, int k0, int k1, __m512i acc[4]) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
    const __m512i first = _mm512_load_si512(PAIRS[0]), second = _mm512_load_si512(PAIRS[1]);
    for (int k = k0; k < k1; k += 2) {
        _mm_prefetch((const char *)(block + (size_t)k * 32 + PREFETCH), _MM_HINT_T0);
        __m512i bytes = _mm512_loadu_si512(block + (size_t)k * 32);  /* the block's rows at k, then at k + 1 */
        __m512i lo = _mm512_and_si512(bytes, low4), hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
        __m512i xs = _mm512_set1_epi32(*(const int32_t *)(xq + k));  /* (x[k], x[k + 1]) */
        acc[0] = _mm512_dpwssd_epi32(acc[0], _mm512_permutex2var_epi8(lo, first, zero), xs);
        acc[1] = _mm512_dpwssd_epi32(acc[1], _mm512_permutex2var_epi8(lo, second, zero), xs);
        acc[2] = _mm512_dpwssd_epi32(acc[2], _mm512_permutex2var_epi8(hi, first, zero), xs);
        acc[3] = _mm512_dpwssd_epi32(acc[3], _mm512_permutex2var_epi8(hi, second, zero), xs);
    }
}

/* One row of x in 16-bit fixed point per group: xq = round(x * 2^shift[g]), shift[g] putting the
   group's largest |x| in [2^14, 2^15), unit[g] = 2^-shift[g], total[g] = sum of the rounded x times
   unit[g] (float32). A bf16 x has 8 significant bits, so every x within 2^7 of its group's largest
   is exact; a smaller one is off by at most 2^-16 of the largest. */
struct FixedRow { std::vector<int16_t> xq; std::vector<float> unit, total; };

static inline __m512 power_of_two(int e) { return _mm512_castsi512_ps(_mm512_set1_epi32((e + 127) << 23)); }

static FixedRow to_fixed(const uint16_t *x, int K, int G) {
    FixedRow row{std::vector<int16_t>(K), std::vector<float>(K / G), std::vector<float>(K / G)};
    for (int g = 0; g < K / G; g++) {
        const uint16_t *xg = x + (size_t)g * G;
        __m512 largest = _mm512_setzero_ps();
        for (int k = 0; k < G; k += 16) {
            __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xg + k))), 16));
            largest = _mm512_max_ps(largest, _mm512_abs_ps(v));
        }
        const float top = _mm512_reduce_max_ps(largest);
        uint32_t bits;
        std::memcpy(&bits, &top, 4);
        const int exponent = (int)(bits >> 23) - 127;  /* floor(log2(top)) for a normal top */
        const int shift = top > 0.f && std::isfinite(top) ? std::max(-126, std::min(126, 14 - exponent)) : 0;
        const __m512 up = power_of_two(shift);
        __m512i sum = _mm512_setzero_si512();
        for (int k = 0; k < G; k += 16) {
            __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xg + k))), 16));
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, up));  /* round to nearest even */
            _mm256_storeu_si256((__m256i *)(row.xq.data() + (size_t)g * G + k), _mm512_cvtsepi32_epi16(q));
            sum = _mm512_add_epi32(sum, q);
        }
        row.unit[g] = std::ldexp(1.f, -shift);
        row.total[g] = std::isfinite(top) ? (float)_mm512_reduce_add_epi32(sum) * row.unit[g] : NAN;
    }
    return row;
}

/* y[64] += x . w over groups [g0, g1) of block b, for one row of x */
static void block_groups(const uint8_t *packed, const uint32_t *sz, const FixedRow &x,
                         int K, int N, int G, int b, int g0, int g1, float *y) {
    const __m512i high16 = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 out[4];
    for (int i = 0; i < 4; i++) out[i] = _mm512_loadu_ps(y + 16 * i);
    for (int g = g0; g < g1; g++) {
        __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
        block_dot(packed + (size_t)b * K * 32, x.xq.data(), g * G, (g + 1) * G, acc);
        const __m512 unit = _mm512_set1_ps(x.unit[g]), total = _mm512_set1_ps(x.total[g]);
        for (int i = 0; i < 4; i++) {
            __m512i words = _mm512_loadu_si512((const void *)(sz + (size_t)g * N + (size_t)b * 64 + 16 * i));
            __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));       /* low bf16 */
            __m512 offset = _mm512_castsi512_ps(_mm512_and_si512(words, high16));  /* high bf16 */
            __m512 shift = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale, offset);   /* w = scale*q + shift */
            __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[i]), unit);
            out[i] = _mm512_fmadd_ps(scale, dot, _mm512_fmadd_ps(shift, total, out[i]));
        }
    }
    for (int i = 0; i < 4; i++) _mm512_storeu_ps(y + 16 * i, out[i]);
}

at::Tensor int4_gemv(const at::Tensor &x_in, const at::Tensor &packed_in, const at::Tensor &sz_in, int64_t group) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "int4_gemv: x must be bf16 [M, K]");
    TORCH_CHECK(packed_in.scalar_type() == at::kByte && sz_in.scalar_type() == at::kBFloat16 && sz_in.dim() == 3,
                "int4_gemv: packed must be uint8, scale_and_zero bf16 [K/G, N, 2]");
    at::Tensor x = x_in.contiguous(), packed = packed_in.contiguous(), sz = sz_in.contiguous();
    const int M = (int)x.size(0), K = (int)x.size(1), N = (int)sz.size(1), G = (int)group;
    TORCH_CHECK(G >= 16 && G <= 256 && G % 16 == 0 && K % G == 0 && sz.size(0) == K / G && N % 64 == 0 &&
                packed.numel() * 2 == (int64_t)N * K, "int4_gemv: shapes do not match ATen's CPU int4 pack (group a multiple of 16, at most 256)");
    const int blocks = N / 64, groups = K / G, units = blocks * groups;
    const uint16_t *xp = (const uint16_t *)x.data_ptr();
    const uint8_t *pp = (const uint8_t *)packed.data_ptr();
    const uint32_t *sp = (const uint32_t *)sz.data_ptr();
    std::vector<FixedRow> rows;
    for (int m = 0; m < M; m++) rows.push_back(to_fixed(xp + (size_t)m * K, K, G));
    const int threads = std::max(1, std::min(at::get_num_threads(), units));
    std::vector<float> partial((size_t)threads * M * N, 0.f);  /* one float32 copy of y per thread */
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        const int u0 = (int)((int64_t)units * t / count), u1 = (int)((int64_t)units * (t + 1) / count);
        float *mine = partial.data() + (size_t)t * M * N;
        for (int u = u0; u < u1;) {  /* block-major units: this thread's groups of one block at a time */
            const int b = u / groups, g0 = u % groups, g1 = std::min(groups, g0 + (u1 - u));
            for (int m = 0; m < M; m++)
                block_groups(pp, sp, rows[m], K, N, G, b, g0, g1, mine + (size_t)m * N + (size_t)b * 64);
            u += g1 - g0;
        }
    }
    at::Tensor out = at::empty({M, N}, x.options());
    uint16_t *op = (uint16_t *)out.data_ptr();
    for (size_t i = 0; i < (size_t)M * N; i += 16) {
        __m512 sum = _mm512_loadu_ps(partial.data() + i);
        for (int t = 1; t < threads; t++) sum = _mm512_add_ps(sum, _mm512_loadu_ps(partial.data() + (size_t)t * M * N + i));
        _mm256_storeu_si256((__m256i *)(op + i), (__m256i)_mm512_cvtneps_pbh(sum));
    }
    return out;
}

/* y[m, n] = sum_k x[m, k] w[n, k] for bf16 x [M, K] and a bf16 row-major w [N, K]: vdpbf16ps (bf16 pairs
   into float32) over 32 k at a time, four rows of w per pass, each thread a contiguous range of rows
   (a streaming read of the weight), float32 sums rounded once to bf16. */
at::Tensor bf16_gemv(const at::Tensor &x_in, const at::Tensor &w_in) {
    TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16 && w_in.scalar_type() == at::kBFloat16 &&
                x_in.size(1) == w_in.size(1), "bf16_gemv: x must be bf16 [M, K], w bf16 [N, K]");
    at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
    const int M = (int)x.size(0), K = (int)x.size(1), N = (int)w.size(0);
    at::Tensor out = at::empty({M, N}, x.options());
    const uint16_t *xp = (const uint16_t *)x.data_ptr(), *wp = (const uint16_t *)w.data_ptr();
    at::BFloat16 *op = out.data_ptr<at::BFloat16>();
    const int quads = (N + 3) / 4, threads = std::max(1, std::min(at::get_num_threads(), quads / 16 + 1));
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        const int n0 = 4 * (int)((int64_t)quads * t / count), n1 = std::min(N, 4 * (int)((int64_t)quads * (t + 1) / count));
        for (int n = n0; n < n1; n += 4) {
            const int rows = std::min(4, n1 - n);
            for (int m = 0; m < M; m++) {
                __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                for (int k = 0; k < K; k += 32) {
                    const __mmask32 live = K - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1);
                    const __m512bh xs = (__m512bh)_mm512_maskz_loadu_epi16(live, xp + (size_t)m * K + k);
                    for (int r = 0; r < rows; r++)
                        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(live, wp + (size_t)(n + r) * K + k), xs);
                }
                for (int r = 0; r < rows; r++) op[(size_t)m * N + n + r] = at::BFloat16(_mm512_reduce_add_ps(acc[r]));
            }
        }
    }
    return out;
}

/* int4_gemm_amx: y = x @ wᵀ for bf16 x [M, K] and ATen's CPU int4 pack, for prefill (many rows) on CPUs
   with AMX. Each thread takes whole 64-row blocks of w: it dequantizes a block once into bf16 AMX tiles
   (w = scale·q + offset − 8·scale rounded to bf16, as the dense path's unpacking) and multiplies every
   16 rows of x by them with tdpbf16ps (float32 sums), so the weight is unpacked once per call and no
   dense copy of it is made. */

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct TileConfig { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };

static bool amx_permitted() {
    static const bool ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return ok;
}

/* Tiles 0-3: 16 x 16 float32 sums (2 x 2: two 16-row tiles of x by two 16-column slices of a block);
   4-5: 16 rows of x by 32 k; 6-7: 16 k-pairs by 16 columns of bf16 weights (VNNI order). */
static void configure_tiles() {
    TileConfig cfg{};
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
}

/* The bf16 weights of 64-row block b as AMX B tiles: tiles[s][j] (1 KB each) holds k in [32s, 32s + 32)
   for rows 16j..16j+15 of the block; row r of a tile is the pairs (w[n, 32s + 2r], w[n, 32s + 2r + 1]). */
static void unpack_block_tiles(const uint8_t *block, const uint32_t *sz, int K, int N, int G, int b, uint16_t *tiles) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
    const __m512i first = _mm512_load_si512(PAIRS[0]), second = _mm512_load_si512(PAIRS[1]);
    const __m512i high16 = _mm512_set1_epi32((int)0xFFFF0000u);
    const __m512i dup_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i dup_hi = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
    __m512 scale_lo[4], scale_hi[4], shift_lo[4], shift_hi[4];
    for (int s = 0; s < K / 32; s++) {
        if ((32 * s) % G == 0) {  /* a new group: per-column scale and shift, each duplicated for a k-pair */
            const int g = 32 * s / G;
            for (int j = 0; j < 4; j++) {
                __m512i words = _mm512_loadu_si512((const void *)(sz + (size_t)g * N + (size_t)b * 64 + 16 * j));
                __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
                __m512 shift = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale, _mm512_castsi512_ps(_mm512_and_si512(words, high16)));
                scale_lo[j] = _mm512_permutexvar_ps(dup_lo, scale); scale_hi[j] = _mm512_permutexvar_ps(dup_hi, scale);
                shift_lo[j] = _mm512_permutexvar_ps(dup_lo, shift); shift_hi[j] = _mm512_permutexvar_ps(dup_hi, shift);
            }
        }
        uint16_t *out = tiles + (size_t)s * 4 * 512;
        for (int r = 0; r < 16; r++) {
            const int k = 32 * s + 2 * r;
            __m512i bytes = _mm512_loadu_si512(block + (size_t)k * 32);
            __m512i lo = _mm512_and_si512(bytes, low4), hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
            __m512i q[4] = {_mm512_permutex2var_epi8(lo, first, zero), _mm512_permutex2var_epi8(lo, second, zero),
                            _mm512_permutex2var_epi8(hi, first, zero), _mm512_permutex2var_epi8(hi, second, zero)};
            for (int j = 0; j < 4; j++) {
                __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(q[j])));
                __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(q[j], 1)));
                a = _mm512_fmadd_ps(a, scale_lo[j], shift_lo[j]);
                c = _mm512_fmadd_ps(c, scale_hi[j], shift_hi[j]);
                _mm512_store_si512((void *)(out + (size_t)j * 512 + 32 * r), (__m512i)_mm512_cvtne2ps_pbh(c, a));
            }
        }
    }
}

at::Tensor int4_gemm_amx(const at::Tensor &x_in, const at::Tensor &packed_in, const at::Tensor &sz_in, int64_t group) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "int4_gemm_amx: x must be bf16 [M, K]");
    TORCH_CHECK(amx_permitted(), "int4_gemm_amx: the kernel did not grant AMX tile data to this process");
    at::Tensor packed = packed_in.contiguous(), sz = sz_in.contiguous();
    const int M = (int)x_in.size(0), K = (int)x_in.size(1), N = (int)sz.size(1), G = (int)group;
    TORCH_CHECK(G >= 32 && G % 32 == 0 && K % G == 0 && sz.size(0) == K / G && N % 64 == 0 && packed.numel() * 2 == (int64_t)N * K,
                "int4_gemm_amx: shapes do not match ATen's CPU int4 pack (group a multiple of 32)");
    const int Mp = (M + 31) / 32 * 32;  /* whole pairs of 16-row tiles: the rest zero */
    at::Tensor x = x_in.contiguous();
    if (Mp != M) {
        at::Tensor padded = at::empty({Mp, K}, x.options());
        std::memcpy(padded.data_ptr(), x.data_ptr(), (size_t)M * K * 2);
        std::memset((uint16_t *)padded.data_ptr() + (size_t)M * K, 0, (size_t)(Mp - M) * K * 2);
        x = padded;
    }
    at::Tensor out = at::empty({M, N}, x_in.options());
    const uint16_t *xp = (const uint16_t *)x.data_ptr();
    const uint8_t *pp = (const uint8_t *)packed.data_ptr();
    const uint32_t *sp = (const uint32_t *)sz.data_ptr();
    uint16_t *op = (uint16_t *)out.data_ptr();
    const int blocks = N / 64, threads = std::max(1, std::min(at::get_num_threads(), blocks));
    #pragma omp parallel num_threads(threads)
    {
        configure_tiles();
        std::vector<uint16_t> raw((size_t)K / 32 * 4 * 512 + 32);
        uint16_t *tiles = (uint16_t *)(((uintptr_t)raw.data() + 63) & ~(uintptr_t)63);
        alignas(64) float sums[32 * 32];
        #pragma omp for schedule(static)
        for (int b = 0; b < blocks; b++) {
            unpack_block_tiles(pp + (size_t)b * K * 32, sp, K, N, G, b, tiles);
            for (int m0 = 0; m0 < Mp; m0 += 32) {
                for (int h = 0; h < 2; h++) {  /* columns 32h..32h+31 of the block: 2 x 2 tiles of 16 x 16 sums */
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    const uint16_t *a = xp + (size_t)m0 * K;
                    for (int s = 0; s < K / 32; s++) {
                        const uint16_t *bt = tiles + (size_t)s * 4 * 512 + (size_t)h * 1024;
                        _tile_loadd(4, a + 32 * s, K * 2);
                        _tile_loadd(6, bt, 64);
                        _tile_loadd(5, a + (size_t)16 * K + 32 * s, K * 2);
                        _tile_loadd(7, bt + 512, 64);
                        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
                    }
                    _tile_stored(0, sums, 128); _tile_stored(1, sums + 16, 128);
                    _tile_stored(2, sums + 16 * 32, 128); _tile_stored(3, sums + 16 * 32 + 16, 128);
                    for (int r = 0; r < 32 && m0 + r < M; r++) {
                        uint16_t *row = op + (size_t)(m0 + r) * N + (size_t)b * 64 + 32 * h;
                        _mm256_storeu_si256((__m256i *)row, (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sums + 32 * r)));
                        _mm256_storeu_si256((__m256i *)(row + 16), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sums + 32 * r + 16)));
                    }
                }
            }
        }
        _tile_release();
    }
    return out;
}

TORCH_LIBRARY(quantcli, m) {
    m.def("int4_gemv(Tensor x, Tensor packed, Tensor scale_and_zero, int group) -> Tensor");
    m.def("bf16_gemv(Tensor x, Tensor w) -> Tensor");
    m.def("int4_gemm_amx(Tensor x, Tensor packed, Tensor scale_and_zero, int group) -> Tensor");
}
TORCH_LIBRARY_IMPL(quantcli, CPU, m) {
    m.impl("int4_gemv", &int4_gemv);
    m.impl("bf16_gemv", &bf16_gemv);
    m.impl("int4_gemm_amx", &int4_gemm_amx);
}
"""

ISA = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vbmi", "-mavx512vnni", "-mavx512bf16", "-mfma", "-mamx-tile", "-mamx-bf16")

_STATE: dict[str, str] = {}


def _cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere: the kernel is then not used)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _command() -> tuple[list[str], tuple[str, ...]]:
    """``c++`` with the flags a torch C++ extension needs (torch's headers, its C++ ABI), and the
    link arguments (torch's libraries)."""
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    compile_flags = [
        "c++", "-O3", "-std=c++20", "-w", "-shared", "-fPIC", "-fopenmp", *ISA, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
    ]
    return compile_flags, (f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}", "-lc10", "-ltorch_cpu")


def build_and_load(name: str, source: str) -> str:
    """Compile C++ ``source`` that registers torch ops (cached by its hash) and load it: "" or why not."""
    lib, why = compiled_library(name, source, ".cpp", *_command())
    if lib is None:
        return why
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as err:
        return f"cannot load {lib}: {str(err).splitlines()[0][:200]}"
    return ""


def _load() -> str:
    if platform.system() != "Linux":
        return f"the int4 GEMV is built for Linux only (this is {platform.system()})"
    if not cpu_has_avx512_bf16() or not {"avx512vbmi", "avx512_vnni"} <= _cpu_flags():
        return f"this CPU lacks AVX-512 BF16, VBMI or VNNI (vector unit: {torch.backends.cpu.get_cpu_capability()})"
    if not (Path(torch.__file__).parent / "include" / "torch" / "library.h").exists():
        return "this torch build ships no C++ headers"
    why = build_and_load("int4_gemv", SOURCE)
    if why:
        return why

    @torch.library.register_fake(OP)
    def _(x: Tensor, packed: Tensor, scale_and_zero: Tensor, group: int) -> Tensor:
        return x.new_empty(x.shape[0], scale_and_zero.shape[1])

    @torch.library.register_fake(BF16_OP)
    def _(x: Tensor, w: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake(AMX_OP)
    def _(x: Tensor, packed: Tensor, scale_and_zero: Tensor, group: int) -> Tensor:
        return x.new_empty(x.shape[0], scale_and_zero.shape[1])

    return ""


def gemv_status() -> str:
    """"" when ``quantcli::int4_gemv`` is built and registered (decided once per process), else why not."""
    if "why" not in _STATE:
        _STATE["why"] = _load()
    return _STATE["why"]


def shape_unsupported(out_features: int, in_features: int, group: int) -> str:
    """Why :func:`int4_gemv` cannot take this weight ("" when it can): the checks of the C++ op."""
    if out_features % 64:
        return f"out_features {out_features} is not a multiple of 64 (CPU int4 pack blocks)"
    if group % 16 or not 16 <= group <= 256 or in_features % group:
        return f"group {group} of {in_features} inputs: the GEMV takes groups of 16-256 in steps of 16 that divide the inputs"
    return ""


def int4_gemv(x: Tensor, packed: Tensor, scale_and_zero: Tensor, group: int) -> Tensor:
    """``x @ wᵀ`` bf16 ``[M, N]`` for bf16 ``x [M, K]`` and ATen's CPU int4 pack (see the module
    docstring). Call only after :func:`gemv_status` returned ""."""
    return torch.ops.quantcli.int4_gemv(x, packed, scale_and_zero, group)


def bf16_gemv(x: Tensor, w: Tensor) -> Tensor:
    """``x @ wᵀ`` bf16 ``[M, N]`` for bf16 ``x [M, K]`` and ``w [N, K]``, float32 sums (see the C++
    source). Call only after :func:`gemv_status` returned ""."""
    return torch.ops.quantcli.bf16_gemv(x, w)


def amx_status() -> str:
    """"" when :func:`int4_gemm_amx` can run here (the library built, the CPU has AMX-BF16, Linux
    granted this process the AMX tile state), else why not."""
    why = gemv_status()
    if why:
        return why
    if not {"amx_tile", "amx_bf16"} <= _cpu_flags():
        return "this CPU has no AMX-BF16 tiles"
    if "amx" not in _STATE:
        try:
            torch.ops.quantcli.int4_gemm_amx(torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(64, 16, dtype=torch.uint8),
                                             torch.zeros(1, 64, 2, dtype=torch.bfloat16), 32)
            _STATE["amx"] = ""
        except RuntimeError as err:
            _STATE["amx"] = str(err).splitlines()[0][:200]
    return _STATE["amx"]


def int4_gemm_amx(x: Tensor, packed: Tensor, scale_and_zero: Tensor, group: int) -> Tensor:
    """``x @ wᵀ`` bf16 ``[M, N]`` for bf16 ``x [M, K]`` and ATen's CPU int4 pack (groups a multiple of
    32), through AMX tiles (see the C++ source). Call only after :func:`amx_status` returned ""."""
    return torch.ops.quantcli.int4_gemm_amx(x, packed, scale_and_zero, group)
