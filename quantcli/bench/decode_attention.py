"""``quantcli::decode_attention``: one query token's attention over a bf16 KV cache, at memory speed.

A decode step attends one query per head over the whole KV cache, so at long context its time is
how fast the cache streams through the cores: every key and value is read once and used for a few
multiply-adds. ATen's CPU SDPA runs this through its flash-attention kernel, built for many query
rows (GEMM blocks); with one row it read SmolLM2's 4000-token bf16 cache at about a quarter of
this machine's memory bandwidth.

For the query heads that share a KV head, packed as that head's rows (``q [B, KV, G, D]``, see
:func:`quantcli.bench.paths.packed_decode_sdpa`), and ``k, v [B, KV, S, D]`` read in place, it
returns bf16 ``[B, KV, G, D]``:

    out[g] = Σ_s softmax_s(scale · q[g]·k[s] + mask[s]) · v[s]

Keys are split in chunks of 256 over OpenMP threads ("flash decoding"): each (batch, KV head,
chunk) keeps per query head its largest score, its sum of exponentials and its weighted sum of
``v`` in float32, and the chunks are merged at the end. Per chunk:

* scores: 16 keys at a time, each key's ``q·k`` as ``vdpbf16ps`` partial sums across ``D``, the 16
  partial-sum vectors reduced to one vector of 16 scores by a shuffle tree (no horizontal sum per
  key); the mask (bool: attend where true; or float, added) applied per 16 lanes;
* softmax in float32 (exp as 2^n times a degree-6 polynomial, relative error ~2e-7), the weights
  rounded to bf16 as ATen's CPU flash attention does before its ``p·v`` GEMM;
* ``p·v``: two keys at a time, their value rows interleaved into bf16 pairs and ``vdpbf16ps``'d
  with the pair of weights, float32 sums.

Keys after the last one any batch row's bool mask attends are not read: a static cache's unused
tail costs nothing. Head dims 64, 128 and 256 are compiled (the loops unrolled for them); others,
non-bf16 caches, other devices and CPUs without AVX-512 BF16 keep SDPA (:func:`unsupported` says
why). Built like the GEMV (:mod:`quantcli.bench.gemv`), as a fragment of the same ``quantcli`` op
library, so a compiled decode graph calls it through the dispatcher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantcli.bench import gemv

OP = "quantcli::decode_attention"
HEAD_DIMS = (64, 128, 256)
MAX_GROUP = 16  # query heads per KV head

SOURCE = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#define CHUNK 256
#define MAX_G 16
#define PREFETCH_KEYS 32  /* keys ahead to prefetch (past a chunk's end: harmless) */

/* exp(x) for float32 lanes: 2^(x log2 e) as 2^n (scalef) times a degree-6 polynomial of the
   remainder (relative error ~2e-7); -inf and anything below -100 give ~0. */
static inline __m512 exp_ps(__m512 x) {
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-100.f)), _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* Key m of a 16-key block goes to slot SLOT[m] of the reduction tree below, so that lane m of the
   tree's result is key m's sum. */
static const int SLOT[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

/* lane j of the result = the sum of the 16 lanes of v[j'] (j' = the slot of key j): a shuffle tree. */
static inline __m512 sum16(const __m512 v[16]) {
    __m512 w[8], x[4], y[2];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
    for (int i = 0; i < 4; i++)
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88), _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
    for (int i = 0; i < 2; i++)
        y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[i], x[i + 2], 0x44), _mm512_shuffle_ps(x[i], x[i + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

/* q.k in float32 for one key (a tail key): D/32 vdpbf16ps and one horizontal sum. */
template <int D>
static inline float dot1(const uint16_t *k, const __m512bh *q) {
    __m512 a = _mm512_setzero_ps();
    for (int i = 0; i < D / 32; i++) a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(k + 32 * i), q[i]);
    return _mm512_reduce_add_ps(a);
}

/* One chunk of n keys of one (batch, KV head): for each of its G query heads, the largest score
   (top), the sum of exp(score - top) (total) and the weighted sum of v (acc, float32 [G][D]).
   mb / mf: the chunk's bool / float mask or null. */
template <int D>
static void chunk(const uint16_t *q, const uint16_t *k, const uint16_t *v, int G, int n, float scale,
                  const bool *mb, const float *mf, float *top, float *total, float *acc) {
    constexpr int V = D / 32;                      /* zmm per row of k or v (32 bf16 each) */
    constexpr int GB = std::max(1, 16 / (2 * V));  /* query heads per p.v pass: GB * 2V accumulators */
    alignas(64) float scores[MAX_G][CHUNK];
    alignas(64) uint16_t weights[MAX_G][CHUNK];
    __m512bh qv[MAX_G][V];
    for (int g = 0; g < G; g++)
        for (int i = 0; i < V; i++) qv[g][i] = (__m512bh)_mm512_loadu_si512(q + (size_t)g * D + 32 * i);
    const __m512 vscale = _mm512_set1_ps(scale), minus_inf = _mm512_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        __mmask16 live = 0xFFFF;
        if (mb != nullptr) live = _mm_cmpneq_epi8_mask(_mm_loadu_si128((const __m128i *)(mb + j)), _mm_setzero_si128());
        for (int m = 0; m < 16 * D / 32; m++) {  /* this block's value rows, for p.v; keys further on */
            _mm_prefetch((const char *)(v + (size_t)j * D) + 64 * m, _MM_HINT_T0);
            _mm_prefetch((const char *)(k + (size_t)(j + PREFETCH_KEYS) * D) + 64 * m, _MM_HINT_T0);
        }
        for (int g = 0; g < G; g++) {
            __m512 part[16];
            for (int m = 0; m < 16; m++) {
                const uint16_t *km = k + (size_t)(j + m) * D;
                __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(km), qv[g][0]);
                for (int i = 1; i < V; i++) a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(km + 32 * i), qv[g][i]);
                part[SLOT[m]] = a;
            }
            __m512 s = _mm512_mul_ps(sum16(part), vscale);
            if (mf != nullptr) s = _mm512_add_ps(s, _mm512_loadu_ps(mf + j));
            _mm512_store_ps(scores[g] + j, _mm512_mask_blend_ps(live, minus_inf, s));
        }
    }
    for (; j < n; j++)
        for (int g = 0; g < G; g++)
            scores[g][j] = (mb != nullptr && !mb[j]) ? -INFINITY : dot1<D>(k + (size_t)j * D, qv[g]) * scale + (mf ? mf[j] : 0.f);
    /* softmax numerators, rounded to bf16 pairs (keys j, j + 1) for p.v; an odd tail pads a 0 */
    const int even = (n + 1) & ~1;
    for (int g = 0; g < G; g++) {
        __m512 mx = minus_inf;
        int i = 0;
        for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(scores[g] + i));
        float t = _mm512_reduce_max_ps(mx);
        for (; i < n; i++) t = std::max(t, scores[g][i]);
        float sum = 0.f;
        if (t == -INFINITY) {
            for (i = 0; i < even; i++) weights[g][i] = 0;
        } else {
            const __m512 vt = _mm512_set1_ps(t);
            __m512 vs = _mm512_setzero_ps();
            for (i = 0; i + 32 <= n; i += 32) {
                __m512 e0 = exp_ps(_mm512_sub_ps(_mm512_load_ps(scores[g] + i), vt));
                __m512 e1 = exp_ps(_mm512_sub_ps(_mm512_load_ps(scores[g] + i + 16), vt));
                vs = _mm512_add_ps(vs, _mm512_add_ps(e0, e1));
                _mm512_store_si512((__m512i *)(weights[g] + i), (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
            }
            sum = _mm512_reduce_add_ps(vs);
            for (; i < even; i++) {
                const float e = i < n ? std::exp(scores[g][i] - t) : 0.f;
                sum += e;
                const __m128bh h = _mm_cvtneps_pbh(_mm_set1_ps(e));
                weights[g][i] = (uint16_t)_mm_extract_epi16((__m128i)h, 0);
            }
        }
        top[g] = t;
        total[g] = sum;
    }
    /* p.v: value rows j and j + 1 interleaved into bf16 pairs. unpacklo/hi work within 128-bit lanes:
       for row slice h (d 32h..32h+31), pair vector 2h holds d = 32h + 8l + t at dword 4l + t, vector
       2h + 1 holds d = 32h + 8l + 4 + t (l lane, t 0..3). */
    const __m512i zero = _mm512_setzero_si512();
    for (int g0 = 0; g0 < G; g0 += GB) {
        __m512 a[GB][2 * V];
        for (int b = 0; b < GB; b++)
            for (int i = 0; i < 2 * V; i++) a[b][i] = _mm512_setzero_ps();
        for (int jj = 0; jj < n; jj += 2) {
            const uint16_t *v0 = v + (size_t)jj * D;
            __m512i pairs[2 * V];
            for (int h = 0; h < V; h++) {
                const __m512i r0 = _mm512_loadu_si512(v0 + 32 * h);
                const __m512i r1 = jj + 1 < n ? _mm512_loadu_si512(v0 + D + 32 * h) : zero;
                pairs[2 * h] = _mm512_unpacklo_epi16(r0, r1);
                pairs[2 * h + 1] = _mm512_unpackhi_epi16(r0, r1);
            }
            for (int b = 0; b < GB; b++) {
                if (g0 + b >= G) break;
                const __m512bh w = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(weights[g0 + b] + jj));
                for (int i = 0; i < 2 * V; i++) a[b][i] = _mm512_dpbf16_ps(a[b][i], (__m512bh)pairs[i], w);
            }
        }
        for (int b = 0; b < GB && g0 + b < G; b++) {
            alignas(64) float lanes[16];
            float *row = acc + (size_t)(g0 + b) * D;
            for (int i = 0; i < 2 * V; i++) {
                _mm512_store_ps(lanes, a[b][i]);
                for (int l = 0; l < 4; l++)
                    for (int t = 0; t < 4; t++) row[32 * (i / 2) + 8 * l + 4 * (i % 2) + t] = lanes[4 * l + t];
            }
        }
    }
}

at::Tensor decode_attention(const at::Tensor &q_in, const at::Tensor &k_in, const at::Tensor &v_in,
                            const c10::optional<at::Tensor> &mask_in, double scale) {
    TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.sizes() == k_in.sizes() && q_in.scalar_type() == at::kBFloat16 &&
                k_in.scalar_type() == at::kBFloat16 && v_in.scalar_type() == at::kBFloat16,
                "decode_attention: q [B, KV, G, D], k and v [B, KV, S, D], all bf16");
    const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
    const int B = (int)q.size(0), KV = (int)q.size(1), G = (int)q.size(2), D = (int)q.size(3);
    int S = (int)k.size(2);
    TORCH_CHECK(k.size(0) == B && k.size(1) == KV && k.size(3) == D && (D == 64 || D == 128 || D == 256) && G >= 1 && G <= MAX_G,
                "decode_attention: head dim 64, 128 or 256 and 1-16 query heads per KV head");
    at::Tensor mask;
    bool bool_mask = false;
    int mask_rows = 0;
    const int S_all = S;
    if (mask_in.has_value() && mask_in->defined()) {
        mask = mask_in->reshape({-1, S});
        mask_rows = (int)mask.size(0);
        TORCH_CHECK(mask_rows == 1 || mask_rows == B, "decode_attention: the mask must be [B or 1, S] after dropping unit dims");
        bool_mask = mask.scalar_type() == at::kBool;
        mask = bool_mask ? mask.contiguous() : mask.to(at::kFloat).contiguous();
        if (bool_mask) {  /* read no key after the last one any row attends */
            const bool *m = mask.data_ptr<bool>();
            int last = 0;
            for (int r = 0; r < mask_rows; r++)
                for (int s = S - 1; s >= last; s--)
                    if (m[(size_t)r * S + s]) { last = s + 1; break; }
            S = std::max(last, 1);
        }
    }
    const int chunks = (S + CHUNK - 1) / CHUNK, units = B * KV * chunks;
    std::vector<float> tops((size_t)units * G), totals((size_t)units * G), accs((size_t)units * G * D);
    const uint16_t *qp = (const uint16_t *)q.data_ptr(), *kp = (const uint16_t *)k.data_ptr(), *vp = (const uint16_t *)v.data_ptr();
    const float fscale = (float)scale;
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; u++) {
            const int c = (int)(u % chunks), h = (int)(u / chunks % KV), b = (int)(u / chunks / KV);
            const int s0 = c * CHUNK, n = std::min(CHUNK, S - s0);
            const size_t head = (size_t)(b * KV + h);
            const size_t mrow = (size_t)(mask_rows == 1 ? 0 : b) * S_all + s0;
            const bool *mb = bool_mask ? mask.data_ptr<bool>() + mrow : nullptr;
            const float *mf = mask.defined() && !bool_mask ? mask.data_ptr<float>() + mrow : nullptr;
            const uint16_t *qh = qp + head * G * D, *kh = kp + (head * S_all + s0) * D, *vh = vp + (head * S_all + s0) * D;
            float *top = tops.data() + (size_t)u * G, *total = totals.data() + (size_t)u * G, *acc = accs.data() + (size_t)u * G * D;
            if (D == 64) chunk<64>(qh, kh, vh, G, n, fscale, mb, mf, top, total, acc);
            else if (D == 128) chunk<128>(qh, kh, vh, G, n, fscale, mb, mf, top, total, acc);
            else chunk<256>(qh, kh, vh, G, n, fscale, mb, mf, top, total, acc);
        }
    });
    at::Tensor out = at::empty({B, KV, G, D}, q.options());
    uint16_t *op = (uint16_t *)out.data_ptr();
    std::vector<float> row(D);
    for (int bh = 0; bh < B * KV; bh++)
        for (int g = 0; g < G; g++) {
            float t = -INFINITY, sum = 0.f;
            for (int c = 0; c < chunks; c++) t = std::max(t, tops[((size_t)bh * chunks + c) * G + g]);
            std::fill(row.begin(), row.end(), 0.f);
            for (int c = 0; c < chunks; c++) {
                const size_t i = ((size_t)bh * chunks + c) * G + g;
                if (tops[i] == -INFINITY) continue;
                const float w = std::exp(tops[i] - t);
                sum += w * totals[i];
                for (int d = 0; d < D; d++) row[d] += w * accs[i * D + d];
            }
            for (int d = 0; d < D; d += 16) {
                const __m512 r = _mm512_mul_ps(_mm512_loadu_ps(row.data() + d), _mm512_set1_ps(sum > 0.f ? 1.f / sum : NAN));
                _mm256_storeu_si256((__m256i *)(op + ((size_t)bh * G + g) * D + d), (__m256i)_mm512_cvtneps_pbh(r));
            }
        }
    return out;
}

TORCH_LIBRARY_FRAGMENT(quantcli, m) {
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(quantcli, CPU, m) {
    m.impl("decode_attention", &decode_attention);
}
"""

_STATE: dict[str, str] = {}


def _load() -> str:
    why = gemv.gemv_status()  # the library's checks (Linux, AVX-512 BF16, headers), and its namespace defined
    if why:
        return why
    why = gemv.build_and_load("decode_attention", SOURCE)
    if why:
        return why

    @torch.library.register_fake(OP)
    def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        return torch.empty_like(q)

    return ""


def status() -> str:
    """"" when ``quantcli::decode_attention`` is built and registered (once per process), else why not."""
    if "why" not in _STATE:
        _STATE["why"] = _load()
    return _STATE["why"]


def unsupported(query: Tensor, key: Tensor, mask: Tensor | None) -> str:
    """Why :func:`decode_attention` cannot take these packed inputs ("" when it can; whether the op
    is built is :func:`status`'s: checked once, before a model is set to use it, so that this
    check traces into a compiled graph)."""
    if query.device.type != "cpu" or query.dtype != torch.bfloat16 or key.dtype != torch.bfloat16:
        return f"q and the KV cache are {query.dtype}/{key.dtype} on {query.device.type} (it takes bf16 on the CPU)"
    dim, groups = query.shape[-1], query.shape[2]
    if dim not in HEAD_DIMS or not 1 <= groups <= MAX_GROUP:
        return f"head dim {dim} (it takes {', '.join(map(str, HEAD_DIMS))}) or {groups} query heads per KV head (1-{MAX_GROUP})"
    if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[0] not in (1, query.shape[0])
                             or mask.shape[3] != key.shape[2]):
        return f"a mask of shape {tuple(mask.shape)} (it takes one row per batch entry, one value per cached key, shared by the heads)"
    return ""


def decode_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """``softmax(scale·q·kᵀ + mask)·v``, bf16 ``[B, KV, G, D]``, for the query heads packed per KV head
    ``query [B, KV, G, D]`` and a bf16 cache ``key, value [B, KV, S, D]`` read in place; ``mask``
    ``[B or 1, 1, 1, S]``, bool (True: attend) or float (added), or None. Call only where
    :func:`status` and :func:`unsupported` returned ""."""
    return torch.ops.quantcli.decode_attention(query, key, value, mask, scale)
