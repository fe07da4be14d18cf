// Decode attention for the step engine: a few query rows over a KV cache, each row computed with
// exactly the same arithmetic whatever the other rows are (see kangaroo/attention.py for why).
//
// out[t, h] = softmax(scale * q[t, h] . K[g, j]) . V[g, j]  over keys j in [begin[t], end[t]),
// g = h / (H / H_kv). Keys are cut into chunks at fixed absolute positions (multiples of CHUNK);
// each (kv head, chunk) is one work item that computes, for every row with keys in the chunk and
// its query heads, the chunk's max, exp-sum and weighted value sum in a fixed order; the chunks
// are then combined in position order. Nothing depends on the number of rows, the thread count or which thread ran an item, so
// a verification row gives the bits its one-token step gives.
//
// Built at first use by torch.utils.cpp_extension with -O3 -march=native (per machine). Every row
// goes through the same vector code (tails are padded, not peeled), so wherever the compiler fuses
// a multiply and an add it does so for every row alike; on AVX-512 machines the reduction and exp
// are written with intrinsics (cheap in-lane shuffles, vscalefps), elsewhere with generic vectors.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <algorithm>
#include <atomic>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include "exp512.h"
#include "module.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define KANGAROO_BF16_TILES 1
#else
#define KANGAROO_BF16_TILES 0
#endif
#if KANGAROO_BF16_TILES && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define KANGAROO_AMX_TILES 1
#else
#define KANGAROO_AMX_TILES 0
#endif

namespace {

constexpr int64_t CHUNK = 128;  // keys per work item; a fixed constant: chunk borders are part of the arithmetic
constexpr int64_t MAX_G = 16, MAX_GD = 16 * 256;  // query heads per kv head, and times the head dimension
constexpr int W = 16;           // floats per vector
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

inline vf splat(float x) { return vf{} + x; }

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(vf)); return v; }

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

// Sum of a vector's lanes in a fixed pairwise order.
inline float hsum(vf a) {
    float t[W];
    store(t, a);
    for (int w = W / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; ++i) t[i] = t[i] + t[i + w];
    return t[0];
}

inline float hmax(vf a) {
    float t[W];
    store(t, a);
    float m = t[0];
    for (int i = 1; i < W; ++i) m = t[i] > m ? t[i] : m;
    return m;
}

#ifdef __AVX512F__
inline __m512 m(vf a) { __m512 r; std::memcpy(&r, &a, sizeof(r)); return r; }
inline vf u(__m512 a) { vf r; std::memcpy(&r, &a, sizeof(r)); return r; }

// exp(x) lane by lane (exp512.h)
inline vf vexp(vf xv) { return u(exp512(m(xv))); }

// Sixteen dot products at once: lane i of the result is the sum of the lanes of a[i], added in the
// same tree for every i: within each 128-bit quarter lanes (0+2)+(1+3), then quarters (0+2)+(1+3).
// In-lane unpacks do most of the moving (cross-lane permutes are slow on some cores).
inline vf reduce16(vf a[W]) {
    __m512 t[8], v[4], w[2];
    for (int i = 0; i < 8; ++i) {
        const __m512 x = m(a[2 * i]), y = m(a[2 * i + 1]);
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    }
    for (int i = 0; i < 4; ++i) {
        const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
        v[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; ++i)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    return u(_mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD)));
}
#else
// exp(x) lane by lane (Cephes' single-precision polynomial, ~1 ulp); -inf and very negative
// inputs give 0. Each lane's result depends on that lane's input only.
inline vf vexp(vf x) {
    const vf lo = splat(-87.3f), hi = splat(88.3f);
    vi under = x < lo;
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    vf fx = x * splat(1.44269504088896341f) + splat(0.5f);
    vi n = __builtin_convertvector(fx, vi);
    vf fn = __builtin_convertvector(n, vf);
    n = fn > fx ? n - 1 : n;  // floor
    fn = __builtin_convertvector(n, vf);
    x = x - fn * splat(0.693359375f);
    x = x - fn * splat(-2.12194440e-4f);
    vf z = x * x;
    vf y = splat(1.9875691500E-4f);
    y = y * x + splat(1.3981999507E-3f);
    y = y * x + splat(8.3334519073E-3f);
    y = y * x + splat(4.1665795894E-2f);
    y = y * x + splat(1.6666665459E-1f);
    y = y * x + splat(5.0000001201E-1f);
    y = y * z + x + splat(1.0f);
    vi bits = (n + 127) << 23;
    vf scale;
    std::memcpy(&scale, &bits, sizeof(vf));
    y = y * scale;
    return under ? splat(0.0f) : y;
}

// Sixteen dot products at once: lane i of the result is the sum of the lanes of a[i], added in
// the same pairwise tree for every i (lane e with e + 8, then + 4, + 2, + 1).
inline vf reduce16(vf a[W]) {
    vf b[8], c[4], d[2];
    for (int i = 0; i < 8; ++i)
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; ++i)
        c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; ++i)
        d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

#endif

// Exp-weighted value sums for NH heads: o[h] = sum_j p[h][j] v[j], keys in order, one running
// sum per head and vector; each value row is loaded once for all NH heads.
template <int D, int NH>
inline void pv_pass(const float (*p)[CHUNK], const float* v, int64_t kv_stride, int64_t j0, int64_t n, float* o_out) {
    constexpr int C = D / W;
    vf o[NH][C];
#pragma GCC unroll 16
    for (int hh = 0; hh < NH; ++hh)
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) o[hh][c] = splat(0.0f);
    for (int64_t j = 0; j < n; ++j) {
        const float* vr = v + (j0 + j) * kv_stride;
        vf vv[C];
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) vv[c] = load(vr + c * W);
#pragma GCC unroll 16
        for (int hh = 0; hh < NH; ++hh) {
            const vf ph = splat(p[hh][j]);
#pragma GCC unroll 16
            for (int c = 0; c < C; ++c) o[hh][c] = o[hh][c] + ph * vv[c];
        }
    }
#pragma GCC unroll 16
    for (int hh = 0; hh < NH; ++hh)
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) store(o_out + hh * D + c * W, o[hh][c]);
}

// A work item's scores s[h][0, npad) per head h < G, sixteen keys at a time: dot(h, key) gives one
// key's 16 lanes of partial sums, reduced in reduce16's fixed tree and scaled; keys past n read
// `zeros` (k: the item's first key, rows kv_stride apart) and score -inf.
template <typename E, typename Dot>
inline void chunk_scores(float (*s)[CHUNK], int64_t G, int64_t n, int64_t npad, const E* k, int64_t kv_stride,
                         const E* zeros, float scale, Dot dot) {
    const vf lane = vf{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int64_t j = 0; j < npad; j += W) {
        const E* kr[W];
        for (int i = 0; i < W; ++i) kr[i] = j + i < n ? k + (j + i) * kv_stride : zeros;
        for (int64_t hh = 0; hh < G; ++hh) {
            vf acc[W];
            for (int i = 0; i < W; ++i) acc[i] = dot(hh, kr[i]);
            vf r = reduce16(acc) * splat(scale);
            r = lane < splat((float)(n - j)) ? r : splat(-std::numeric_limits<float>::infinity());
            store(s[hh] + j, r);
        }
    }
}

// A work item's scores s[h][0, npad) per head h < G turned into exps in place, sixteen keys at a
// time: the max m_out[h], then exp(s - m) and their sum l_out[h] (padding, -inf, adds exact zeros).
inline void chunk_softmax(float (*s)[CHUNK], int64_t G, int64_t npad, float* m_out, float* l_out) {
    for (int64_t hh = 0; hh < G; ++hh) {
        vf mv = splat(-std::numeric_limits<float>::infinity());
        for (int64_t j = 0; j < npad; j += W) { vf x = load(s[hh] + j); mv = x > mv ? x : mv; }
        const float m = hmax(mv);
        vf lv = splat(0.0f);
        for (int64_t j = 0; j < npad; j += W) {
            vf p = vexp(load(s[hh] + j) - splat(m));
            store(s[hh] + j, p);
            lv = lv + p;
        }
        m_out[hh] = m;
        l_out[hh] = hsum(lv);
    }
}

// A cache as float32 (a bfloat16 one widened, exactly).
inline torch::Tensor as_float(const torch::Tensor& t) {
    return t.scalar_type() == torch::kFloat32 ? t : t.to(torch::kFloat32);
}

// One work item: query heads [0, G) (of one row and kv head) against keys [j0, j1) of that kv head.
// Writes per head: m (max score), l (sum of exp), o[D] (exp-weighted value sum).
template <int D>
void chunk_item(const float* q, int64_t G, const float* k, const float* v, int64_t kv_stride,
                int64_t j0, int64_t j1, float scale, float* m_out, float* l_out, float* o_out) {
    constexpr int C = D / W;
    static const float zeros[D] = {};
    const int64_t n = j1 - j0, npad = (n + W - 1) / W * W;
    float s[MAX_G][CHUNK];
    vf qv[MAX_G][C];
    for (int64_t hh = 0; hh < G; ++hh)
        for (int c = 0; c < C; ++c) qv[hh][c] = load(q + hh * D + c * W);
    // 1. scores: the query's dot product with each key, as 16 lanes of partial sums
    chunk_scores(s, G, n, npad, k + j0 * kv_stride, kv_stride, zeros, scale, [&](int64_t hh, const float* key) {
        vf a = qv[hh][0] * load(key);
        for (int c = 1; c < C; ++c) a = a + qv[hh][c] * load(key + c * W);
        return a;
    });
    // 2. per head: max, then exp and their sum
    chunk_softmax(s, G, npad, m_out, l_out);
    // 3. values weighted by the exps: lanes over the head dimension, one running sum per head and
    // vector, keys in order; a value row is loaded once for up to 16 / (D / 16) heads
    constexpr int HB = C >= 16 ? 1 : 16 / C;
    for (int64_t h0 = 0; h0 < G; h0 += HB) {
        const int64_t nh = G - h0 < HB ? G - h0 : HB;
        switch (nh) {
            case 1: pv_pass<D, 1>(s + h0, v, kv_stride, j0, n, o_out + h0 * D); break;
            case 2: pv_pass<D, 2>(s + h0, v, kv_stride, j0, n, o_out + h0 * D); break;
            case 3: pv_pass<D, 3>(s + h0, v, kv_stride, j0, n, o_out + h0 * D); break;
            default: pv_pass<D, (HB >= 4 ? 4 : HB)>(s + h0, v, kv_stride, j0, n, o_out + h0 * D); break;
        }
    }
}

#if KANGAROO_BF16_TILES
// chunk_item_bf16's weighted value sums for NH heads (see below), accumulators in registers.
template <int D, int NH>
inline void pv_pass_bf16(const uint16_t (*pb)[CHUNK], const uint16_t* v, int64_t kv_stride, int64_t j0, int64_t n,
                         const uint16_t* zeros, float* o_out) {
    constexpr int C = D / 32;
    __m512 lo[NH][C], hi[NH][C];
#pragma GCC unroll 16
    for (int hh = 0; hh < NH; ++hh)
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) lo[hh][c] = hi[hh][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 2) {
        const uint16_t* v0 = v + (j0 + j) * kv_stride;
        const uint16_t* v1 = j + 1 < n ? v0 + kv_stride : zeros;
        __m512i vl[C], vh[C];
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) {
            const __m512i a = _mm512_loadu_si512(v0 + c * 32), b = _mm512_loadu_si512(v1 + c * 32);
            vl[c] = _mm512_unpacklo_epi16(a, b);
            vh[c] = _mm512_unpackhi_epi16(a, b);
        }
#pragma GCC unroll 16
        for (int hh = 0; hh < NH; ++hh) {
            int32_t pair;  // (p_j, p_j+1) as two bfloat16 words
            std::memcpy(&pair, pb[hh] + j, sizeof(pair));
            const __m512bh pp = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 16
            for (int c = 0; c < C; ++c) {
                lo[hh][c] = _mm512_dpbf16_ps(lo[hh][c], pp, (__m512bh)vl[c]);
                hi[hh][c] = _mm512_dpbf16_ps(hi[hh][c], pp, (__m512bh)vh[c]);
            }
        }
    }
    // lane 4k + i of lo holds dimension 8k + i, of hi 8k + 4 + i (k = 0..3, i = 0..3) of a 32-block
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
#pragma GCC unroll 16
    for (int hh = 0; hh < NH; ++hh)
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) {
            _mm512_storeu_ps(o_out + hh * D + c * 32, _mm512_permutex2var_ps(lo[hh][c], first, hi[hh][c]));
            _mm512_storeu_ps(o_out + hh * D + c * 32 + 16, _mm512_permutex2var_ps(lo[hh][c], second, hi[hh][c]));
        }
}

// chunk_item over a bfloat16 cache (D a multiple of 32), with vdpbf16ps: the query rounded to
// bfloat16, a score is the key's dimension pairs multiplied with the query's and summed in float32
// (then reduce16, as above); the exps (float32, their sum too) are rounded to bfloat16 and weight
// the values two keys at a time: rows j and j+1 interleaved word by word (unpacklo/hi_epi16), so
// each float32 lane sums p_j v_j[e] + p_j+1 v_j+1[e] for one dimension e, lanes in the unpacks'
// order (put back in place when stored). Half the bytes of the float32 cache to read and fewer
// instructions (1.35-1.7x chunk_item's speed, docs/ENGINE.md §4); every row still computes alone,
// in one order.
template <int D>
void chunk_item_bf16(const float* q, int64_t G, const uint16_t* k, const uint16_t* v, int64_t kv_stride,
                     int64_t j0, int64_t j1, float scale, float* m_out, float* l_out, float* o_out) {
    constexpr int C = D / 32;  // 32-dimension blocks
    alignas(64) static const uint16_t zeros[D] = {};
    const int64_t n = j1 - j0, npad = (n + W - 1) / W * W;
    float s[MAX_G][CHUNK];
    __m512bh qb[MAX_G][C];
    for (int64_t hh = 0; hh < G; ++hh)
        for (int c = 0; c < C; ++c)
            qb[hh][c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + hh * D + c * 32 + 16), _mm512_loadu_ps(q + hh * D + c * 32));
    // 1. scores: the rounded query's dimension pairs with each key's, as 16 lanes of float32 sums
    chunk_scores(s, G, n, npad, k + j0 * kv_stride, kv_stride, zeros, scale, [&](int64_t hh, const uint16_t* key) {
        __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[hh][0], (__m512bh)_mm512_loadu_si512(key));
        for (int c = 1; c < C; ++c) a = _mm512_dpbf16_ps(a, qb[hh][c], (__m512bh)_mm512_loadu_si512(key + c * 32));
        return u(a);
    });
    // 2. per head: max, then exp and their sum
    chunk_softmax(s, G, npad, m_out, l_out);
    // 3. values weighted by the exps (rounded to bfloat16, nearest even), two keys a product; past n
    // the exps are exact zeros (npad > n when n is odd)
    alignas(64) uint16_t pb[MAX_G][CHUNK];
    for (int64_t hh = 0; hh < G; ++hh)
        for (int64_t j = 0; j < npad; j += W)
            _mm256_store_si256(reinterpret_cast<__m256i*>(pb[hh] + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s[hh] + j)));
    constexpr int HB = C >= 8 ? 1 : C >= 4 ? 2 : 4;  // heads a value pair is loaded for (accumulators in registers)
    for (int64_t h0 = 0; h0 < G; h0 += HB) {
        const int64_t nh = G - h0 < HB ? G - h0 : HB;
        switch (nh) {
            case 1: pv_pass_bf16<D, 1>(pb + h0, v, kv_stride, j0, n, zeros, o_out + h0 * D); break;
            case 2: pv_pass_bf16<D, 2>(pb + h0, v, kv_stride, j0, n, zeros, o_out + h0 * D); break;
            case 3: pv_pass_bf16<D, 3>(pb + h0, v, kv_stride, j0, n, zeros, o_out + h0 * D); break;
            default: pv_pass_bf16<D, HB>(pb + h0, v, kv_stride, j0, n, zeros, o_out + h0 * D); break;
        }
    }
}
#endif

// The same for any head dimension (tiny test models): plain loops, still one fixed order.
void chunk_item_any(const float* q, int64_t G, int64_t D, const float* k, const float* v, int64_t kv_stride,
                    int64_t j0, int64_t j1, float scale, float* m_out, float* l_out, float* o_out) {
    const int64_t n = j1 - j0;
    float s[CHUNK];
    for (int64_t hh = 0; hh < G; ++hh) {
        const float* qh = q + hh * D;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
            const float* kj = k + (j0 + j) * kv_stride;
            float acc = 0.0f;
            for (int64_t e = 0; e < D; ++e) acc = acc + qh[e] * kj[e];
            s[j] = acc * scale;
            m = s[j] > m ? s[j] : m;
        }
        float l = 0.0f;
        for (int64_t j = 0; j < n; ++j) { s[j] = std::exp(s[j] - m); l = l + s[j]; }
        float* o = o_out + hh * D;
        for (int64_t e = 0; e < D; ++e) o[e] = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
            const float* vj = v + (j0 + j) * kv_stride;
            for (int64_t e = 0; e < D; ++e) o[e] = o[e] + s[j] * vj[e];
        }
        m_out[hh] = m;
        l_out[hh] = l;
    }
}

// Work items spread over the threads by their cost (largest first onto the least loaded thread,
// plus `fixed` per item): item costs are uneven (a step's last chunk often holds a few keys, a
// prompt's later rows see more keys), and contiguous ranges would leave one thread most of the work.
// Which thread runs an item changes no bits.
std::vector<std::vector<int64_t>> plan_items(const std::vector<int64_t>& cost, int64_t fixed) {
    const int64_t n = static_cast<int64_t>(cost.size());
    const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
    std::vector<int64_t> order(n);
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
    std::vector<std::vector<int64_t>> plan(nthreads);
    std::vector<int64_t> busy(nthreads, 0);
    for (int64_t i : order) {
        const int64_t th = std::min_element(busy.begin(), busy.end()) - busy.begin();
        plan[th].push_back(i);
        busy[th] += cost[i] + fixed;
    }
    return plan;
}

// ---------------------------------------------------------------------------- prompts
// A prompt's rows need no row invariance (a prompt is not re-verified; plain decoding and Kangaroo
// share its prefill), so they take a flash-attention tile instead of the per-row decode items:
// PR rows x G query heads of one kv head against chunks of CHUNK keys, keys transposed once per
// chunk so that a score is a chain of broadcast FMAs (no per-key horizontal reduction), an online
// softmax per query, and the values' weighted sums register-blocked over several queries.
constexpr int64_t PR = 16;  // prompt rows per work item
constexpr int QT = 6;       // query vectors per score tile (x 32 keys: 12 accumulators)

// BF (AVX512-BF16 only): scores and value sums with vdpbf16ps on bfloat16 queries, keys, values and
// probabilities (float32 sums, softmax in float32), two dimensions or two keys per product: ktg is
// then [D/2][kts][2] bfloat16 (a key's dimensions e, e+1 side by side), vg [S/2][D][2] (keys j, j+1
// side by side per dimension), and chunks start at even positions.
template <int D, bool BF>
void prompt_item(const float* q, int64_t qs0, int64_t G, int64_t h0, const void* ktv, int64_t kts, const void* vv_,
                 int64_t t0, int64_t R, int64_t start, int64_t window, float scale, float* out, int64_t H,
                 std::vector<float>& buf) {
    constexpr int C = D / W;
    constexpr int QP = C >= 16 ? 1 : 16 / C;  // query vectors per value tile (16 accumulators)
    static const float zeros[D] = {};
    const float* ktg = static_cast<const float*>(ktv);
    const float* vg = static_cast<const float*>(vv_);
    const int64_t NQ = R * G, NQP = (NQ + QT - 1) / QT * QT;
    // BF: + the queries' bfloat16 pairs [NQP][D/2] and the probabilities' [NQP][CHUNK/2], as 32-bit words
    buf.resize(NQP * CHUNK + 2 * NQP + NQP * D + (BF ? NQP * (D / 2 + CHUNK / 2) : 0));
    float *s = buf.data(), *mq = s + NQP * CHUNK, *lq = mq + NQP, *o = lq + NQP;
    uint32_t* qb = reinterpret_cast<uint32_t*>(o + NQP * D);
    uint32_t* pb = qb + NQP * D / 2;
    const float neg = -std::numeric_limits<float>::infinity();
    std::vector<const float*> qrow(NQP);
    std::vector<int64_t> qpos(NQP), qlo(NQP);
    for (int64_t i = 0; i < NQP; ++i) {
        const int64_t r = i / G, hh = i % G;
        qrow[i] = i < NQ ? q + (t0 + r) * qs0 + (h0 + hh) * D : zeros;
        qpos[i] = i < NQ ? start + t0 + r : -1;  // padding queries see no key
        qlo[i] = window > 0 ? std::max<int64_t>(0, qpos[i] + 1 - window) : 0;
        mq[i] = neg;
        lq[i] = 0.0f;
#if KANGAROO_BF16_TILES
        if constexpr (BF)  // the query's bfloat16 pairs (round to nearest even)
            for (int c = 0; c < C; c += 2) {
                const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qrow[i] + (c + 1) * W), _mm512_loadu_ps(qrow[i] + c * W));
                _mm512_storeu_si512(qb + i * (D / 2) + c * W / 2, (__m512i)b);
            }
#endif
    }
    std::memset(o, 0, NQP * D * sizeof(float));
    const int64_t hi = start + t0 + R;  // keys [lo, hi) cover every row of the tile
    int64_t lo = window > 0 ? std::max<int64_t>(0, start + t0 + 1 - window) : 0;
    if (BF) lo &= ~int64_t{1};  // key pairs start at even positions (a key before a window's start scores -inf)
    const vf lane = vf{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int64_t c0 = lo; c0 < hi; c0 += CHUNK) {
        const int64_t n = std::min(CHUNK, hi - c0), npad = (n + W - 1) / W * W;
        // 2. scores (keys transposed once per call: ktg[e][position], zeros past the rows' keys), QT queries x 16 keys a tile; keys outside a row's range are -inf
        for (int64_t i0 = 0; i0 < NQP; i0 += QT) {
            for (int64_t jb = 0; jb < npad; jb += 2 * W) {  // 32 keys (the buffers are padded for it)
                vf acc[QT][2];
#pragma GCC unroll 8
                for (int i = 0; i < QT; ++i) acc[i][0] = acc[i][1] = splat(0.0f);
                if constexpr (!BF) {
                    const float* kc = ktg + c0 + jb;
                    for (int e = 0; e < D; ++e) {
                        const vf k0 = load(kc + e * kts), k1 = load(kc + e * kts + W);
#pragma GCC unroll 8
                        for (int i = 0; i < QT; ++i) {
                            const vf qe = splat(qrow[i0 + i][e]);
                            acc[i][0] = acc[i][0] + qe * k0;
                            acc[i][1] = acc[i][1] + qe * k1;
                        }
                    }
                } else {
#if KANGAROO_BF16_TILES
                    const uint16_t* kc = static_cast<const uint16_t*>(ktv) + (c0 + jb) * 2;
                    __m512 a0[QT], a1[QT];
                    for (int i = 0; i < QT; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
                    for (int e2 = 0; e2 < D / 2; ++e2) {
                        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kc + e2 * kts * 2);
                        const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kc + e2 * kts * 2 + 2 * W);
#pragma GCC unroll 8
                        for (int i = 0; i < QT; ++i) {
                            const __m512bh qe = (__m512bh)_mm512_set1_epi32(static_cast<int>(qb[(i0 + i) * (D / 2) + e2]));
                            a0[i] = _mm512_dpbf16_ps(a0[i], qe, k0);
                            a1[i] = _mm512_dpbf16_ps(a1[i], qe, k1);
                        }
                    }
                    for (int i = 0; i < QT; ++i) { acc[i][0] = u(a0[i]); acc[i][1] = u(a1[i]); }
#endif
                }
                for (int half = 0; half < 2 && jb + half * W < npad; ++half) {
                    const vf pos = lane + splat((float)(c0 + jb + half * W));
                    for (int i = 0; i < QT; ++i) {
                        const vi ok = (pos <= splat((float)qpos[i0 + i])) & (pos >= splat((float)qlo[i0 + i]));
                        store(s + (i0 + i) * CHUNK + jb + half * W, ok ? acc[i][half] * splat(scale) : splat(neg));
                    }
                }
            }
        }
        // 3. online softmax per query: rescale what came before by exp(m_old - m_new)
        for (int64_t i = 0; i < NQP; ++i) {
            float* sr = s + i * CHUNK;
            vf mv = splat(neg);
            for (int64_t j = 0; j < npad; j += W) { const vf x = load(sr + j); mv = x > mv ? x : mv; }
            const float cm = hmax(mv);
            if (cm == neg) {  // no key of this row in the chunk (a window's start, or padding)
                for (int64_t j = 0; j < npad; j += W) store(sr + j, splat(0.0f));
                continue;
            }
            const float mn = mq[i] > cm ? mq[i] : cm;
            const float corr = mq[i] == neg ? 0.0f : std::exp(mq[i] - mn);
            vf lv = splat(0.0f);
            for (int64_t j = 0; j < npad; j += W) {
                const vf p = vexp(load(sr + j) - splat(mn));
                store(sr + j, p);
                lv = lv + p;
            }
            lq[i] = lq[i] * corr + hsum(lv);
            mq[i] = mn;
            if (corr != 1.0f)
                for (int c = 0; c < C; ++c) store(o + i * D + c * W, load(o + i * D + c * W) * splat(corr));
        }
#if KANGAROO_BF16_TILES
        if constexpr (BF) {
            // 4'. values in bfloat16: o[i] += sum over key pairs of (p[i][j], p[i][j+1]) . (v[j], v[j+1])
            const int64_t n2 = (n + 1) / 2;
            for (int64_t i = 0; i < NQ; ++i)
                for (int64_t j = 0; j < npad; j += 2 * W) {
                    const float* sr = s + i * CHUNK + j;
                    const __m512 lo16 = _mm512_loadu_ps(sr), hi16 = j + W < npad ? _mm512_loadu_ps(sr + W) : _mm512_setzero_ps();
                    _mm512_storeu_si512(pb + i * (CHUNK / 2) + j / 2, (__m512i)_mm512_cvtne2ps_pbh(hi16, lo16));
                }
            const uint16_t* vc = static_cast<const uint16_t*>(vv_) + c0 * D;  // pair c0 / 2, each D x 2 values
            for (int64_t i0 = 0; i0 < NQ; i0 += QP) {
                const int np = (int)std::min<int64_t>(QP, NQ - i0);
                __m512 acc[QP][C];
                for (int i = 0; i < QP; ++i)
                    for (int c = 0; c < C; ++c) acc[i][c] = i < np ? _mm512_loadu_ps(o + (i0 + i) * D + c * W) : _mm512_setzero_ps();
                for (int64_t j2 = 0; j2 < n2; ++j2) {
                    __m512bh vv[C];
#pragma GCC unroll 16
                    for (int c = 0; c < C; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vc + j2 * 2 * D + c * 2 * W);
#pragma GCC unroll 16
                    for (int i = 0; i < QP; ++i) {
                        const __m512bh p = (__m512bh)_mm512_set1_epi32(i < np ? static_cast<int>(pb[(i0 + i) * (CHUNK / 2) + j2]) : 0);
#pragma GCC unroll 16
                        for (int c = 0; c < C; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], p, vv[c]);
                    }
                }
                for (int i = 0; i < np; ++i)
                    for (int c = 0; c < C; ++c) _mm512_storeu_ps(o + (i0 + i) * D + c * W, acc[i][c]);
            }
            continue;
        }
#endif
        // 4. values: o[i] += sum_j p[i][j] v[j], QP queries a tile, each value row loaded once per tile
        for (int64_t i0 = 0; i0 < NQ; i0 += QP) {
            const int np = (int)std::min<int64_t>(QP, NQ - i0);
            vf acc[QP][C];
            for (int i = 0; i < QP; ++i)
                for (int c = 0; c < C; ++c) acc[i][c] = i < np ? load(o + (i0 + i) * D + c * W) : splat(0.0f);
            for (int64_t j = 0; j < n; ++j) {
                const float* vr = vg + (c0 + j) * D;
                vf vv[C];
#pragma GCC unroll 16
                for (int c = 0; c < C; ++c) vv[c] = load(vr + c * W);
#pragma GCC unroll 16
                for (int i = 0; i < QP; ++i) {
                    const vf p = splat(i < np ? s[(i0 + i) * CHUNK + j] : 0.0f);
#pragma GCC unroll 16
                    for (int c = 0; c < C; ++c) acc[i][c] = acc[i][c] + p * vv[c];
                }
            }
            for (int i = 0; i < np; ++i)
                for (int c = 0; c < C; ++c) store(o + (i0 + i) * D + c * W, acc[i][c]);
        }
    }
    for (int64_t i = 0; i < NQ; ++i) {
        const int64_t r = i / G, hh = i % G;
        float* dst = out + ((t0 + r) * H + h0 + hh) * D;
        const vf inv = splat(1.0f / lq[i]);
        for (int c = 0; c < C; ++c) store(dst + c * W, load(o + i * D + c * W) * inv);
    }
}

#if KANGAROO_AMX_TILES
// Mode 2: the bfloat16 tiles' numbers (bfloat16 queries, keys, values and probabilities; float32
// sums and softmax) on AMX tiles. Where vdpbf16ps forms 16 dot products a cycle at best, one
// tdpbf16ps forms a 16 x 16 tile of them over 32 dimensions, so the products that bound the other
// tiles cost little and the softmax's exps are most of the time. No online softmax: a tile's 16
// queries (rows x heads of one kv head, in prompt_item's order) score every key of the item at once
// into s [16][nkp] (64 KB per 1,024 keys), then max, exp and sum per query in float32, then
// probabilities (bfloat16) x values accumulate in C tiles over all keys and are scaled once.
// kb: this kv head's keys [D/2][kts][2], vb: its values [kts/2][D][2] (bfloat16, zero past the
// prompt). Tiles: 0-3 C (scores; the output's 16-dimension blocks), 4 A, 5-7 B; all 16 x 64 bytes.
template <int D>
void prompt_item_amx(const float* q, int64_t qs0, int64_t G, int64_t h0, const uint16_t* kb, int64_t kts,
                     const uint16_t* vb, int64_t t0, int64_t R, int64_t start, int64_t window, float scale, float* out,
                     int64_t H, std::vector<float>& buf) {
    constexpr int DC = D / 32, DB = D / 16;  // 32-dimension chunks of a query; 16-dimension blocks of a value
    const int64_t NQ = R * G, hi = start + t0 + R;
    const int64_t lo = (window > 0 ? std::max<int64_t>(0, start + t0 + 1 - window) : 0) & ~int64_t{31};
    const int64_t nkp = (hi - lo + 31) / 32 * 32;  // keys [lo, lo + nkp): whole pairs of key tiles (zeros past the prompt)
    buf.resize(16 * nkp + 8 * nkp + 8 * D + 16 * D + 16);
    float* const s = buf.data();                                          // scores [16][nkp]
    uint16_t* const pb = reinterpret_cast<uint16_t*>(s + 16 * nkp);       // probabilities [16][nkp] bfloat16
    uint16_t* const qb = reinterpret_cast<uint16_t*>(s + 24 * nkp);       // queries [16][D] bfloat16
    float* const o = s + 24 * nkp + 8 * D;                                // values' sums [16][D]
    float* const lsum = o + 16 * D;                                       // exp sums [16]
    const float neg = -std::numeric_limits<float>::infinity();
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t i0 = 0; i0 < NQ; i0 += 16) {
        const int64_t nq = std::min<int64_t>(16, NQ - i0);
        // 1. the tile's queries in bfloat16 (rows past the queries: zeros)
        for (int64_t i = 0; i < 16; ++i) {
            uint16_t* dst = qb + i * D;
            if (i >= nq) { std::memset(dst, 0, D * sizeof(uint16_t)); continue; }
            const float* qr = q + (t0 + (i0 + i) / G) * qs0 + (h0 + (i0 + i) % G) * D;
            for (int c = 0; c < D; c += 32)
                _mm512_storeu_si512(dst + c, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(qr + c + 16), _mm512_loadu_ps(qr + c)));
        }
        // 2. scores, 64 keys at a time in four C tiles [16 queries x 16 keys] (independent, so their
        // products overlap: tiles are not renamed), each += A (the queries' 32 dimensions, tile 4 or 5)
        // . B (16 dimension pairs x 16 keys, tiles 6 and 7 in turn)
        for (int64_t jg = 0; jg < nkp; jg += 64) {
            const bool four = jg + 64 <= nkp;  // else two (nkp is a multiple of 32)
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int c = 0; c < DC; ++c) {
                const uint16_t* kc = kb + (c * 16) * kts * 2 + (lo + jg) * 2;
#define KANGAROO_SCORE_TILES(A)                          \
                _tile_loadd(A, qb + c * 32, D * 2);      \
                _tile_loadd(6, kc, kts * 4);             \
                _tile_dpbf16ps(0, A, 6);                 \
                _tile_loadd(7, kc + 32, kts * 4);        \
                _tile_dpbf16ps(1, A, 7);                 \
                if (four) {                              \
                    _tile_loadd(6, kc + 64, kts * 4);    \
                    _tile_dpbf16ps(2, A, 6);             \
                    _tile_loadd(7, kc + 96, kts * 4);    \
                    _tile_dpbf16ps(3, A, 7);             \
                }
                if (c % 2 == 0) {
                    KANGAROO_SCORE_TILES(4)
                } else {
                    KANGAROO_SCORE_TILES(5)
                }
#undef KANGAROO_SCORE_TILES
            }
            _tile_stored(0, s + jg, nkp * 4);
            _tile_stored(1, s + jg + 16, nkp * 4);
            if (four) {
                _tile_stored(2, s + jg + 32, nkp * 4);
                _tile_stored(3, s + jg + 48, nkp * 4);
            }
        }
        // 3. per query: scores scaled, keys outside [its window's start, its position] -inf; max; exps
        // and their sum in float32; the exps rounded to bfloat16 for the values' products
        for (int64_t i = 0; i < 16; ++i) {
            uint16_t* pr = pb + i * nkp;
            if (i >= nq) { std::memset(pr, 0, nkp * sizeof(uint16_t)); continue; }
            const int64_t pos = start + t0 + (i0 + i) / G;
            const int64_t jlo = (window > 0 ? std::max<int64_t>(0, pos + 1 - window) : 0) - lo, jhi = pos + 1 - lo;
            float* sr = s + i * nkp;
            __m512 mv = _mm512_set1_ps(neg);
            const __m512 sv = _mm512_set1_ps(scale);
            for (int64_t j = 0; j < nkp; j += 16) {
                __m512 x = _mm512_mul_ps(_mm512_loadu_ps(sr + j), sv);
                if (j < jlo || j + 16 > jhi) {  // a vector at the range's edges (most are inside)
                    const __m512i jj = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j)));
                    const __mmask16 ok = _mm512_cmpge_epi32_mask(jj, _mm512_set1_epi32(static_cast<int>(jlo)))
                                       & _mm512_cmplt_epi32_mask(jj, _mm512_set1_epi32(static_cast<int>(jhi)));
                    x = _mm512_mask_mov_ps(_mm512_set1_ps(neg), ok, x);
                }
                _mm512_storeu_ps(sr + j, x);
                mv = _mm512_max_ps(mv, x);
            }
            const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
            __m512 lv = _mm512_setzero_ps();
            for (int64_t j = 0; j < nkp; j += 32) {
                const __m512 p0 = m(vexp(u(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mx))));
                const __m512 p1 = m(vexp(u(_mm512_sub_ps(_mm512_loadu_ps(sr + j + 16), mx))));
                lv = _mm512_add_ps(lv, _mm512_add_ps(p0, p1));
                _mm512_storeu_si512(pr + j, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
            }
            lsum[i] = _mm512_reduce_add_ps(lv);
        }
        // 4. values: C [16 queries x 16 dimensions] += A (probabilities, 32 keys) . B (16 key pairs x 16 dimensions), four blocks at a time
        for (int db = 0; db < DB; db += 4) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t kc = 0; kc < nkp; kc += 32) {
                const uint16_t* vr = vb + (lo + kc) * D + db * 32;  // key pair (lo + kc) / 2, dimension 16 db
                _tile_loadd(4, pb + kc, nkp * 2);
                _tile_loadd(5, vr, D * 4);
                _tile_dpbf16ps(0, 4, 5);
                _tile_loadd(6, vr + 32, D * 4);
                _tile_dpbf16ps(1, 4, 6);
                _tile_loadd(7, vr + 64, D * 4);
                _tile_dpbf16ps(2, 4, 7);
                _tile_loadd(5, vr + 96, D * 4);
                _tile_dpbf16ps(3, 4, 5);
            }
            _tile_stored(0, o + db * 16, D * 4);
            _tile_stored(1, o + db * 16 + 16, D * 4);
            _tile_stored(2, o + db * 16 + 32, D * 4);
            _tile_stored(3, o + db * 16 + 48, D * 4);
        }
        for (int64_t i = 0; i < nq; ++i) {
            float* dst = out + ((t0 + (i0 + i) / G) * H + h0 + (i0 + i) % G) * D;
            const __m512 inv = _mm512_set1_ps(1.0f / lsum[i]);
            for (int e = 0; e < D; e += 16) _mm512_storeu_ps(dst + e, _mm512_mul_ps(_mm512_loadu_ps(o + i * D + e), inv));
        }
    }
}
#endif

// How prompts' tiles compute: 0 float32, 1 bfloat16 (vdpbf16ps), 2 bfloat16 on AMX tiles (set by the
// engine before each prompt, as measured by kangaroo.attention.choose_prompt_tiles).
std::atomic<int64_t> prompt_tiles_mode{0};

}  // namespace

bool prompt_attention_tiles_available(int64_t mode) {
    if (mode == 0) return true;
    if (mode == 1) return KANGAROO_BF16_TILES;
    if (mode == 2) return KANGAROO_AMX_TILES && linear_q4_amx_available();  // AMX tiles granted by the kernel
    return false;
}

int64_t prompt_attention_tiles(int64_t mode) {
    TORCH_CHECK(0 <= mode && mode <= 2, "prompt_attention_tiles: 0 (float32), 1 (bfloat16) or 2 (AMX)");
    TORCH_CHECK(prompt_attention_tiles_available(mode),
                mode == 1 ? "prompt_attention: this CPU (or compiler) has no AVX512-BF16 for bfloat16 tiles"
                          : "prompt_attention: this CPU (or compiler, or kernel) gives no AMX-BF16 tiles");
    return prompt_tiles_mode.exchange(mode);
}

// A prompt's rows at positions start .. start+T-1 over k/v [H_kv, S, D] (each over its prefix, its
// last `window` keys when window > 0): q [T, H, D] (heads contiguous). Tiles for D in {64, 128, 256},
// else decode_attention in blocks of rows. Not row-invariant (see prompt_item); decoding steps use
// decode_attention. Returns [T, H, D] float32.
torch::Tensor prompt_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t start, int64_t window,
                               double scale_) {
    TORCH_CHECK(q.dtype() == torch::kFloat32, "prompt_attention: float32 queries");
    TORCH_CHECK(k.dtype() == v.dtype() && (k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kBFloat16),
                "prompt_attention: float32 or bfloat16 keys and values");
    k = as_float(k);  // a bfloat16 cache widened once (exactly): a prompt reads every key many times
    v = as_float(v);
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "prompt_attention: q [T, H, D], k/v [H_kv, S, D]");
    const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(0);
    if (D != 64 && D != 128 && D != 256) {  // no tile for this head size: the decode kernel, 64 rows a call
        std::vector<torch::Tensor> parts;
        for (int64_t b = 0; b < T; b += 64) {
            const int64_t n = std::min<int64_t>(64, T - b);
            auto [begins, ends] = key_ranges(start + b, n, window);
            parts.push_back(decode_attention(q.narrow(0, b, n), k, v, begins, ends, scale_));
        }
        return torch::cat(parts);
    }
    TORCH_CHECK(H % Hkv == 0 && k.size(2) == D && v.sizes() == k.sizes(), "prompt_attention: shapes");
    TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == D && k.stride(2) == 1 && k.stride(1) == D && v.stride(2) == 1
                && v.stride(1) == D && k.stride(0) == v.stride(0), "prompt_attention: the head dimension must be contiguous");
    TORCH_CHECK(start >= 0 && start + T <= k.size(1), "prompt_attention: rows past the keys");
    const int64_t G = H / Hkv, nblocks = (T + PR - 1) / PR, n_items = Hkv * nblocks;
    const float scale = static_cast<float>(scale_);
    auto out = torch::empty({T, H, D}, q.options());
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    float* outp = out.data_ptr<float>();
    const int64_t qs0 = q.stride(0), ks0 = k.stride(0);
    std::vector<int64_t> cost(n_items);  // keys a tile attends over
    for (int64_t i = 0; i < n_items; ++i) {
        const int64_t b = i / Hkv, hi = start + std::min(T, (b + 1) * PR);
        cost[i] = window > 0 ? std::min(hi, window + PR) : hi;
    }
    const auto plan = plan_items(cost, 0);
    const int64_t nthreads = static_cast<int64_t>(plan.size());
    const int64_t S = start + T, kts = (S + CHUNK + 2 * W - 1) / W * W;
    const int64_t mode = prompt_tiles_mode.load();
    const bool bf16 = KANGAROO_BF16_TILES && mode >= 1;  // bfloat16 copies for modes 1 and 2
    std::vector<float> kt;
    std::vector<uint16_t> kb, vb;
    if (bf16) {
        // bfloat16 copies (round to nearest even): keys kb[g][e/2][j][2] (dimension pairs), values
        // vb[g][j/2][e][2] (key pairs), zeros past position S (so padding reads no NaN a cache may
        // hold there). Per 16 keys: their rows converted, then each dimension pair's 16 words
        // gathered into place; per pair of keys: their rows converted and interleaved.
        kb.assign(Hkv * D * kts, 0);
        vb.assign(Hkv * D * kts, 0);
        const int64_t nb16 = (S + 15) / 16;
        at::parallel_for(0, Hkv * nb16, 4, [&](int64_t a, int64_t b) {
#if KANGAROO_BF16_TILES
            alignas(64) uint32_t words[16 * 128];  // 16 keys x D/2 dimension pairs (D <= 256)
            const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                   _mm512_set1_epi32(static_cast<int>(D / 2)));
#endif
            for (int64_t x = a; x < b; ++x) {
                const int64_t g = x / nb16, j0 = (x % nb16) * 16, n = std::min<int64_t>(16, S - j0);
                const float *kg = kp + g * ks0, *vg = vp + g * ks0;
#if KANGAROO_BF16_TILES
                for (int64_t jj = 0; jj < 16; ++jj)
                    for (int64_t c = 0; c < D; c += 32)
                        _mm512_store_si512(words + jj * (D / 2) + c / 2, jj < n
                            ? (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(kg + (j0 + jj) * D + c + 16), _mm512_loadu_ps(kg + (j0 + jj) * D + c))
                            : _mm512_setzero_si512());
                uint32_t* kw = reinterpret_cast<uint32_t*>(kb.data() + g * D * kts) + j0;
                for (int64_t e2 = 0; e2 < D / 2; ++e2)
                    _mm512_storeu_si512(kw + e2 * kts, _mm512_i32gather_epi32(_mm512_add_epi32(idx, _mm512_set1_epi32(static_cast<int>(e2))), words, 4));
                for (int64_t jj = 0; jj < n; jj += 2) {
                    const float *v0 = vg + (j0 + jj) * D, *v1 = v0 + D;
                    uint16_t* vd = vb.data() + g * D * kts + (j0 + jj) * D;  // pair (j0 + jj) / 2
                    for (int64_t e = 0; e < D; e += 16) {
                        const __m512i w0 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v0 + e)));
                        const __m512i w1 = jj + 1 < n ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v1 + e)))
                                                      : _mm512_setzero_si512();
                        _mm512_storeu_si512(vd + e * 2, _mm512_or_si512(w0, _mm512_slli_epi32(w1, 16)));
                    }
                }
#endif
            }
        });
    } else {
        // keys transposed once, kt[g][e][j] for positions j < start + T (padded with zeros to a vector
        // and a chunk past the end): every tile's scores are then broadcast FMAs over contiguous keys
        kt.assign(Hkv * D * kts, 0.0f);
        at::parallel_for(0, Hkv * ((S + W - 1) / W), 8, [&](int64_t a, int64_t b) {
            const int64_t nb = (S + W - 1) / W;
            for (int64_t x = a; x < b; ++x) {
                const int64_t g = x / nb, j0 = (x % nb) * W, n = std::min<int64_t>(W, S - j0);
                float* dst = kt.data() + g * D * kts + j0;
                for (int64_t j = 0; j < n; ++j) {
                    const float* kr = kp + g * ks0 + (j0 + j) * D;
                    for (int64_t e = 0; e < D; ++e) dst[e * kts + j] = kr[e];
                }
            }
        });
    }
#if KANGAROO_AMX_TILES
    if (mode == 2) {
        using AmxItem = void (*)(const float*, int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t,
                                 int64_t, int64_t, int64_t, float, float*, int64_t, std::vector<float>&);
        const AmxItem item = D == 64 ? &prompt_item_amx<64> : D == 128 ? &prompt_item_amx<128> : &prompt_item_amx<256>;
        at::parallel_for(0, nthreads, 1, [&](int64_t a, int64_t b) {
            std::vector<float> buf;
            TileConfig cfg;
            for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
            _tile_loadconfig(&cfg);
            for (int64_t worker = a; worker < b; ++worker)
                for (int64_t i : plan[worker]) {
                    const int64_t g = i % Hkv, blk = i / Hkv, t0 = blk * PR, R = std::min(PR, T - t0);
                    item(qp, qs0, G, g * G, kb.data() + g * D * kts, kts, vb.data() + g * D * kts, t0, R, start, window,
                         scale, outp, H, buf);
                }
            _tile_release();
        });
        return out;
    }
#endif
    using Item = void (*)(const float*, int64_t, int64_t, int64_t, const void*, int64_t, const void*, int64_t, int64_t,
                          int64_t, int64_t, float, float*, int64_t, std::vector<float>&);
    const Item item = D == 64 ? (bf16 ? &prompt_item<64, true> : &prompt_item<64, false>)
                    : D == 128 ? (bf16 ? &prompt_item<128, true> : &prompt_item<128, false>)
                               : (bf16 ? &prompt_item<256, true> : &prompt_item<256, false>);
    at::parallel_for(0, nthreads, 1, [&](int64_t a, int64_t b) {
        std::vector<float> buf;
        for (int64_t worker = a; worker < b; ++worker)
            for (int64_t i : plan[worker]) {
                const int64_t g = i % Hkv, blk = i / Hkv, t0 = blk * PR, R = std::min(PR, T - t0);
                const void* ktg = bf16 ? static_cast<const void*>(kb.data() + g * D * kts) : kt.data() + g * D * kts;
                const void* vg = bf16 ? static_cast<const void*>(vb.data() + g * D * kts) : vp + g * ks0;
                item(qp, qs0, G, g * G, ktg, kts, vg, t0, R, start, window, scale, outp, H, buf);
            }
    });
    return out;
}

// The key ranges of n rows at positions at .. at + n - 1 that each attend over their prefix (their
// last `window` keys when window > 0): (begins, ends).
std::pair<std::vector<int64_t>, std::vector<int64_t>> key_ranges(int64_t at, int64_t n, int64_t window) {
    std::vector<int64_t> begins(n), ends(n);
    for (int64_t i = 0; i < n; ++i) {
        ends[i] = at + i + 1;
        begins[i] = window > 0 ? std::max<int64_t>(0, ends[i] - window) : 0;
    }
    return {std::move(begins), std::move(ends)};
}

// q [T, H, D] (rows and heads may be strided, D contiguous), k/v [H_kv, S, D] (D contiguous),
// begin/end: each row's key range. Returns [T, H, D] float32.
DecodePlan decode_plan(int64_t T, int64_t H, int64_t Hkv, int64_t D, std::vector<int64_t> begin, std::vector<int64_t> end) {
    TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && H / Hkv <= MAX_G && H / Hkv * D <= MAX_GD, "decode_attention: too many query heads per kv head");
    DecodePlan p;
    p.T = T, p.H = H, p.Hkv = Hkv, p.D = D, p.G = H / Hkv;
    p.nchunks = 0;
    for (int64_t t = 0; t < T; ++t) p.nchunks = std::max(p.nchunks, (end[t] - 1) / CHUNK + 1);
    // work items (kv head g, chunk c): every row with keys in the chunk, one after the other while
    // the chunk's keys and values are in cache; a row's arithmetic does not depend on the others
    p.c_first = p.nchunks;
    for (int64_t t = 0; t < T; ++t) p.c_first = std::min(p.c_first, begin[t] / CHUNK);
    const int64_t n_items = Hkv * (p.nchunks - p.c_first);
    std::vector<int64_t> cost(n_items, 0);  // keys summed over rows
    for (int64_t i = 0; i < n_items; ++i) {
        const int64_t c = p.c_first + i / Hkv;
        for (int64_t t = 0; t < T; ++t)
            cost[i] += std::max<int64_t>(0, std::min(end[t], (c + 1) * CHUNK) - std::max(begin[t], c * CHUNK));
    }
    p.workers = plan_items(cost, 16);  // + a fixed cost per item, in keys
    p.begin = std::move(begin);
    p.end = std::move(end);
    return p;
}

// Worker w's items of plan p: q [T, H, D] float32 (row stride qs0), keys and values [H_kv, S, D]
// (kv head stride ks0) float32 or, with kv16, bfloat16; each (row, head, chunk)'s max, exp-sum and
// value sums into m, l [T, H, nchunks] and o [T, H, nchunks, D].
__attribute__((noinline)) void decode_items(const DecodePlan& p, int64_t w, const float* qp, int64_t qs0, const void* k,
                                            const void* v, int64_t ks0, bool kv16, float scale, float* mp, float* lp,
                                            float* op) {
    const int64_t T = p.T, H = p.H, D = p.D, G = p.G, Hkv = p.Hkv, nchunks = p.nchunks;
    float mb[MAX_G], lb[MAX_G], ob[MAX_GD];
    for (int64_t i : p.workers[w]) {
        const int64_t g = i % Hkv, c = p.c_first + i / Hkv, h0 = g * G;
        for (int64_t t = 0; t < T; ++t) {
            const int64_t j0 = std::max(p.begin[t], c * CHUNK), j1 = std::min(p.end[t], (c + 1) * CHUNK);
            if (j0 >= j1) continue;
            const float* qh = qp + t * qs0 + h0 * D;
            if (kv16) {  // straight from the bfloat16 cache
#if KANGAROO_BF16_TILES
                const uint16_t *kg = static_cast<const uint16_t*>(k) + g * ks0, *vg = static_cast<const uint16_t*>(v) + g * ks0;
                if (D == 64)
                    chunk_item_bf16<64>(qh, G, kg, vg, D, j0, j1, scale, mb, lb, ob);
                else if (D == 128)
                    chunk_item_bf16<128>(qh, G, kg, vg, D, j0, j1, scale, mb, lb, ob);
                else
                    chunk_item_bf16<256>(qh, G, kg, vg, D, j0, j1, scale, mb, lb, ob);
#endif
            } else {
                const float *kg = static_cast<const float*>(k) + g * ks0, *vg = static_cast<const float*>(v) + g * ks0;
                if (D == 64)
                    chunk_item<64>(qh, G, kg, vg, D, j0, j1, scale, mb, lb, ob);
                else if (D == 128)
                    chunk_item<128>(qh, G, kg, vg, D, j0, j1, scale, mb, lb, ob);
                else if (D == 256)
                    chunk_item<256>(qh, G, kg, vg, D, j0, j1, scale, mb, lb, ob);
                else
                    chunk_item_any(qh, G, D, kg, vg, D, j0, j1, scale, mb, lb, ob);
            }
            for (int64_t hh = 0; hh < G; ++hh) {  // this row's max, sum and value sums per head
                const int64_t th = t * H + h0 + hh;
                mp[th * nchunks + c] = mb[hh];
                lp[th * nchunks + c] = lb[hh];
                std::memcpy(op + (th * nchunks + c) * D, ob + hh * D, D * sizeof(float));
            }
        }
    }
}

// (row, head) pairs [a, b) of plan p: their chunks combined in position order into out [T, H, D].
__attribute__((noinline)) void decode_combine(const DecodePlan& p, int64_t a, int64_t b, const float* mp, const float* lp,
                                              const float* op, float* outp) {
    const int64_t H = p.H, D = p.D, nchunks = p.nchunks;
    for (int64_t th = a; th < b; ++th) {
        const int64_t t = th / H;
        const int64_t c0 = p.begin[t] / CHUNK, c1 = (p.end[t] - 1) / CHUNK + 1;
        const float* mr = mp + th * nchunks;
        float M = -std::numeric_limits<float>::infinity();
        for (int64_t c = c0; c < c1; ++c) M = mr[c] > M ? mr[c] : M;
        float L = 0.0f;
        float* res = outp + th * D;
        if (D % W == 0) {
            for (int64_t e = 0; e < D; e += W) store(res + e, splat(0.0f));
            for (int64_t c = c0; c < c1; ++c) {
                const float w = std::exp(mr[c] - M);
                L = L + lp[th * nchunks + c] * w;
                const float* oc = op + (th * nchunks + c) * D;
                for (int64_t e = 0; e < D; e += W) store(res + e, load(res + e) + load(oc + e) * splat(w));
            }
            const vf inv = splat(1.0f / L);
            for (int64_t e = 0; e < D; e += W) store(res + e, load(res + e) * inv);
            continue;
        }
        for (int64_t e = 0; e < D; ++e) res[e] = 0.0f;
        for (int64_t c = c0; c < c1; ++c) {
            const float w = std::exp(mr[c] - M);
            L = L + lp[th * nchunks + c] * w;
            const float* oc = op + (th * nchunks + c) * D;
            for (int64_t e = 0; e < D; ++e) res[e] = res[e] + oc[e] * w;
        }
        const float inv = 1.0f / L;
        for (int64_t e = 0; e < D; ++e) res[e] = res[e] * inv;
    }
}

// Whether decode_items computes straight from a bfloat16 cache of head size D (a bfloat16 cache is
// widened to float32 first where it cannot; the engine keeps one only where it can).
bool decode_kv16_native(int64_t D) { return KANGAROO_BF16_TILES && (D == 64 || D == 128 || D == 256); }

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               std::vector<int64_t> begin, std::vector<int64_t> end, double scale_) {
    TORCH_CHECK(q.dtype() == torch::kFloat32, "decode_attention: float32 queries");
    TORCH_CHECK(k.dtype() == v.dtype() && (k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kBFloat16),
                "decode_attention: float32 or bfloat16 keys and values");
    TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention: CPU only");
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "decode_attention: q [T, H, D], k/v [H_kv, S, D]");
    const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(0);
    TORCH_CHECK(H % Hkv == 0 && k.size(2) == D && v.size(2) == D && v.size(0) == Hkv, "decode_attention: shapes");
    TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && q.stride(1) == D
                && k.stride(1) == D && v.stride(1) == D && k.stride(0) == v.stride(0),
                "decode_attention: the head dimension must be contiguous");
    TORCH_CHECK((int64_t)begin.size() == T && (int64_t)end.size() == T, "decode_attention: one key range per row");
    for (int64_t t = 0; t < T; ++t)
        TORCH_CHECK(0 <= begin[t] && begin[t] < end[t] && end[t] <= k.size(1), "decode_attention: bad key range");
    const DecodePlan plan = decode_plan(T, H, Hkv, D, std::move(begin), std::move(end));
    const int64_t nchunks = plan.nchunks;
    auto opts = q.options();
    auto m = torch::empty({T, H, nchunks}, opts), l = torch::empty({T, H, nchunks}, opts);
    auto o = torch::empty({T, H, nchunks, D}, opts);
    auto out = torch::empty({T, H, D}, opts);
    // a bfloat16 cache (half the bytes to stream: at 1,536 keys the cache outweighs the layer's
    // weights) is computed on natively on AVX512-BF16 machines for head sizes 64/128/256
    // (chunk_item_bf16); elsewhere it is widened to float32 (exactly) for chunk_item, which saves
    // nothing, so the engine only keeps a bfloat16 cache where it is native (kangaroo.calibration)
    const bool kv16 = k.scalar_type() == torch::kBFloat16 && decode_kv16_native(D);
    if (!kv16) {
        k = as_float(k);
        v = as_float(v);
    }
    float *mp = m.data_ptr<float>(), *lp = l.data_ptr<float>(), *op = o.data_ptr<float>(), *outp = out.data_ptr<float>();
    const float scale = static_cast<float>(scale_);
    const int64_t nworkers = static_cast<int64_t>(plan.workers.size());
    at::parallel_for(0, nworkers, 1, [&](int64_t a, int64_t b) {
        for (int64_t w = a; w < b; ++w)
            decode_items(plan, w, q.data_ptr<float>(), q.stride(0), k.data_ptr(), v.data_ptr(), k.stride(0), kv16, scale, mp, lp, op);
    });
    // combine each (row, head)'s chunks in position order
    at::parallel_for(0, T * H, 16, [&](int64_t a, int64_t b) { decode_combine(plan, a, b, mp, lp, op, outp); });
    return out;
}

// RMSNorm over the last dimension of x [T, D] (rows contiguous): x / sqrt(mean(x^2) + eps) * w.
// Each row is summed in one fixed order, so a row's result does not depend on the other rows; one
// call costs ~1 us where F.rms_norm costs ~8 us on a decoding step's few rows. Here rows [t0, t1)
// of x (row stride xs) into out [T, D] (contiguous); rms_norm below runs it over its threads.
__attribute__((noinline)) void rms_norm_rows(const float* xp, int64_t xs, const float* wp, float* op, int64_t t0, int64_t t1,
                                             int64_t D, float e) {
    const float inv_d = 1.0f / static_cast<float>(D);
    for (int64_t t = t0; t < t1; ++t) {
        const float* xr = xp + t * xs;
        float* orow = op + t * D;
        if (D % W == 0) {
            vf acc = splat(0.0f);
            for (int64_t i = 0; i < D; i += W) { const vf v = load(xr + i); acc = acc + v * v; }
            const vf r = splat(1.0f / std::sqrt(hsum(acc) * inv_d + e));
            for (int64_t i = 0; i < D; i += W) store(orow + i, load(xr + i) * r * load(wp + i));
        } else {
            float ss = 0.0f;
            for (int64_t i = 0; i < D; ++i) ss = ss + xr[i] * xr[i];
            const float r = 1.0f / std::sqrt(ss * inv_d + e);
            for (int64_t i = 0; i < D; ++i) orow[i] = xr[i] * r * wp[i];
        }
    }
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "rms_norm: float32 only");
    TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rms_norm: CPU only");
    TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0) && x.stride(1) == 1 && w.stride(0) == 1,
                "rms_norm: x [T, D] with contiguous rows, w [D]");
    const int64_t T = x.size(0), D = x.size(1), xs = x.stride(0);
    auto out = torch::empty({T, D}, x.options());
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float e = static_cast<float>(eps);
    at::parallel_for(0, T, 64, [&](int64_t a, int64_t b) { rms_norm_rows(xp, xs, wp, op, a, b, D, e); });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    mod.def("decode_attention", &decode_attention, "decode attention with row-invariant arithmetic");
    mod.def("decode_attention_bf16_native", []() { return static_cast<bool>(KANGAROO_BF16_TILES); },
            "whether decode_attention computes on a bfloat16 cache natively (AVX512-BF16; else it widens the cache)");
    mod.def("prompt_attention", &prompt_attention, "a prompt's causal attention, flash tiles (not row-invariant)");
    mod.def("prompt_attention_tiles_available", &prompt_attention_tiles_available, "whether prompt tiles of this mode (0 float32, 1 bfloat16, 2 AMX) can run here");
    mod.def("prompt_attention_tiles", &prompt_attention_tiles, "how prompt tiles compute (0 float32, 1 bfloat16, 2 AMX); returns the old mode");
    mod.def("layer_stack_region", &layer_stack_region, "whether LayerStack runs chain steps in one parallel region; returns the old setting");
    mod.def("layer_stack_region_runs", &layer_stack_region_runs, "how many steps LayerStack has run in one region");
    mod.def("rms_norm", &rms_norm, "row-wise RMSNorm in a fixed summation order");
    mod.def("linear_bf16_available", &linear_bf16_available, "whether linear_bf16 was built (AVX512-BF16)");
    mod.def("linear_bf16", &linear_bf16, "x W^T (+ b) over prepacked bfloat16 weights, row-invariant",
            py::arg("x"), py::arg("packed"), py::arg("bias") = py::none());
    mod.def("linear_q4_available", &linear_q4_available, "whether linear_q4 was built (AVX512-BF16)");
    mod.def("linear_q4_int8_available", &linear_q4_int8_available, "whether linear_q4's int8 prompt path was built (AVX512-VNNI)");
    mod.def("linear_q4_step_rows", &linear_q4_step_rows, "rows up to which linear_q4 keeps bfloat16 activations");
    mod.def("linear_q4_prompt_int8", &linear_q4_prompt_int8, "switch linear_q4's int8 path for prompts on or off; returns the old setting");
    mod.def("linear_q4_amx_available", &linear_q4_amx_available, "whether int8-activation products can use AMX tiles (AMX-INT8, granted by the kernel)");
    mod.def("linear_q4_prompt_amx", &linear_q4_prompt_amx, "from how many rows prompts take linear_q4's bfloat16 AMX GEMM (0: never); returns the old setting");
    mod.def("linear_q4_amx_rows", &linear_q4_amx_rows, "from how many rows int8-activation products use AMX tiles (0: never); returns the old setting");
    mod.def("linear_q4", &linear_q4, "x W^T (+ b) over GGUF Q4_1 weights, row-invariant",
            py::arg("x"), py::arg("nibbles"), py::arg("scales"), py::arg("bias") = py::none(), py::arg("int8") = false);
    mod.def("head_argmax_available", &head_argmax_available, "whether head_argmax was built (AVX512-BF16 and VNNI)");
    mod.def("head_argmax", &head_argmax, "greedy tokens of a dpbf16 LM head, screened through int8 weights");
    mod.def("head_argmax_amx_available", &head_argmax_amx_available, "whether head_argmax can screen on AMX-INT8 tiles");
    mod.def("rope", &rope, "RoPE over interleaved pairs, row by row");
    mod.def("rope_attend", &rope_attend, "RoPE, cache write and decode attention between an attention block's products");
    mod.def("rope_attend_tree", &rope_attend_tree, "a token tree's RoPE, stash, per-segment cache writes and decode attention");
    mod.def("add_rms_norm", &add_rms_norm, "residual add in place, then RMSNorm");
    mod.def("top1_prob", &top1_prob, "a draft head's top-1 token and its softmax probability (last row)");
    mod.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up product");
    bind_layer_stack(mod);
}
