// The small operations around a layer's products, fused, for the step engine (kangaroo/engine.py).
//
// Why: once the products stream at memory speed (linear_bf16.cpp), what is left of a one-token step
// besides them and attention is ~45 small torch ops a layer (casts, slices, a complex multiply for
// RoPE, cache writes, adds, SiLU), ~1.4 ms of a ~7.5 ms step on the AMD machine. Here they are a
// few calls a layer. Every function works row by row in a fixed order, so a row's result never
// depends on the other rows (the engine's row invariance), and the engine uses them on every path
// that computes the target's layers while they are loaded (plain steps, verification, token trees,
// prompts, the adapter), so every path computes the same bits.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "exp512.h"
#include "module.h"

namespace {

inline float bf16_to_float(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

// Rotate one head's interleaved pairs (x_i, y_i) by (c_i, s_i): x c - y s, x s + y c. The engine's
// RoPE everywhere the module is loaded (the same expression in one place, so every path agrees).
inline void rotate(const float* in, const float* cs, float* out, int64_t half) {
    for (int64_t i = 0; i < half; ++i) {
        const float x = in[2 * i], y = in[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
        const float xc = x * c, ys = y * s, xs = x * s, yc = y * c;
        out[2 * i] = xc - ys;
        out[2 * i + 1] = xs + yc;
    }
}

// Row t's first n floats of qkv (bfloat16 or float32, row stride qs) as float32.
inline void row_to_float(const void* qkv, bool bf16, int64_t qs, int64_t t, int64_t n, float* dst) {
    if (bf16) {
        const auto* src = static_cast<const uint16_t*>(qkv) + t * qs;
        for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
    } else {
        std::memcpy(dst, static_cast<const float*>(qkv) + t * qs, n * sizeof(float));
    }
}

}  // namespace

// RoPE over x [T, n_heads, d] float32 (head dimension contiguous) with cs [T, d/2, 2] (cos, sin) per
// row: a new [T, n_heads, d] float32 tensor.
torch::Tensor rope(torch::Tensor x, torch::Tensor cs) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && cs.dtype() == torch::kFloat32, "rope: float32 only");
    TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rope: x [T, heads, d] with d contiguous");
    const int64_t T = x.size(0), n = x.size(1), d = x.size(2), half = d / 2;
    cs = cs.reshape({cs.size(0), half, 2}).contiguous();
    TORCH_CHECK(cs.size(0) == T, "rope: one (cos, sin) row per row of x");
    auto out = torch::empty({T, n, d}, x.options());
    const float *xp = x.data_ptr<float>(), *cp = cs.data_ptr<float>();
    float* op = out.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < n; ++h)
            rotate(xp + t * x.stride(0) + h * x.stride(1), cp + t * d, op + (t * n + h) * d, half);
    return out;
}

namespace {

// The checks an attention block's call makes of its QKV output, its RoPE rows and one layer's cache
// buffers kbuf/vbuf [H_kv, capacity, d]; returns the (cos, sin) rows as [T, d/2, 2], contiguous.
torch::Tensor check_block(const char* who, const torch::Tensor& qkv, torch::Tensor cs, const torch::Tensor& kbuf,
                          const torch::Tensor& vbuf, int64_t H, int64_t Hkv) {
    TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, who, ": qkv [T, (H + 2 H_kv) d] with rows contiguous");
    TORCH_CHECK(qkv.scalar_type() == torch::kBFloat16 || qkv.scalar_type() == torch::kFloat32, who, ": bfloat16 or float32 qkv");
    TORCH_CHECK((kbuf.scalar_type() == torch::kFloat32 || kbuf.scalar_type() == torch::kBFloat16) && vbuf.dtype() == kbuf.dtype()
                && kbuf.is_contiguous() && vbuf.is_contiguous() && kbuf.dim() == 3 && vbuf.sizes() == kbuf.sizes() && kbuf.size(0) == Hkv,
                who, ": caches [H_kv, capacity, d], both float32 or both bfloat16");
    const int64_t d = kbuf.size(2);
    TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * d && d % 2 == 0, who, ": qkv width");
    cs = cs.reshape({cs.size(0), d / 2, 2}).contiguous();
    TORCH_CHECK(cs.size(0) == qkv.size(0) && cs.dtype() == torch::kFloat32, who, ": one float32 (cos, sin) row per row");
    return cs;
}

// n floats into a cache of element E: float32 as they are, bfloat16 rounded to nearest even.
template <typename E>
inline void put(E* dst, const float* src, int64_t n) {
    if constexpr (std::is_same_v<E, float>) {
        std::memcpy(dst, src, n * sizeof(float));
    } else {
        int64_t i = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
        // vcvtneps2bf16: nearest even as float_to_bf16, denormals to zero; an element of a head
        // always takes the same branch (the head size decides), so every path writes the same bits
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
#endif
        for (; i < n; ++i) dst[i] = float_to_bf16(src[i]);
    }
}

// Row t of an attention block: Q rotated into q [H, d], K rotated into k + g * kv_stride and V copied
// into v + g * kv_stride for each kv head g, in the cache's element type E (float, or uint16_t for
// bfloat16). `row` is scratch of (H + 2 H_kv) d floats, then d more for a rotated key.
template <typename E>
inline void rotate_row(const void* qkv, bool bf16, int64_t qs, int64_t t, const float* cs, int64_t H, int64_t Hkv, int64_t d,
                       float* row, float* q, E* k, E* v, int64_t kv_stride) {
    row_to_float(qkv, bf16, qs, t, (H + 2 * Hkv) * d, row);
    float* key = row + (H + 2 * Hkv) * d;
    for (int64_t h = 0; h < H; ++h) rotate(row + h * d, cs, q + h * d, d / 2);
    for (int64_t g = 0; g < Hkv; ++g) {
        rotate(row + (H + g) * d, cs, key, d / 2);
        put(k + g * kv_stride, key, d);
        put(v + g * kv_stride, row + (H + Hkv + g) * d, d);
    }
}

}  // namespace

// Rows [t0, t1) of an attention block at positions start + t: Q rotated into q [T, H, d], K rotated
// and V copied into slot start + t of kbuf/vbuf [H_kv, cap, d] (bfloat16 with kv16, else float32).
// qkv [T, (H + 2 H_kv) d] bfloat16 or float32 with row stride qs, cs [T, d/2, 2]; `row` is scratch of
// (H + 2 H_kv + 1) d floats.
__attribute__((noinline)) void rope_rows(const void* qkv, bool qkv_bf16, int64_t qs, int64_t t0, int64_t t1, const float* cs,
                                         int64_t H, int64_t Hkv, int64_t d, float* q, void* kbuf, void* vbuf, bool kv16,
                                         int64_t start, int64_t cap, float* row) {
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t at = (start + t) * d;
        if (kv16)
            rotate_row(qkv, qkv_bf16, qs, t, cs + t * d, H, Hkv, d, row, q + t * H * d, static_cast<uint16_t*>(kbuf) + at,
                       static_cast<uint16_t*>(vbuf) + at, cap * d);
        else
            rotate_row(qkv, qkv_bf16, qs, t, cs + t * d, H, Hkv, d, row, q + t * H * d, static_cast<float*>(kbuf) + at,
                       static_cast<float*>(vbuf) + at, cap * d);
    }
}

// One attention block's work between its two products, for rows at positions start .. start+T-1
// over a pre-allocated cache: qkv [T, (H + 2 H_kv) d] (the QKV product's output, bfloat16 or
// float32), cs [T, d/2, 2] RoPE (cos, sin) per row, kbuf/vbuf [H_kv, capacity, d] float32 or bfloat16 (one
// layer's cache; slots start .. start+T-1 are written here). Rotates Q and K, writes K and V, and
// attends each row over its prefix (its last `window` keys when window > 0): up to `step_rows` rows
// with decode_attention (row-invariant), more (a prompt) with prompt_attention. Rows before
// `first_out` are only written to the cache (the adapter's prompt: only its last row's output
// drafts). Returns [T - first_out, H d] float32.
torch::Tensor rope_attend(torch::Tensor qkv, torch::Tensor cs, torch::Tensor kbuf, torch::Tensor vbuf, int64_t start,
                          int64_t H, int64_t Hkv, double scale, int64_t window, int64_t first_out, int64_t step_rows) {
    cs = check_block("rope_attend", qkv, cs, kbuf, vbuf, H, Hkv);
    const int64_t T = qkv.size(0), d = kbuf.size(2), cap = kbuf.size(1);
    TORCH_CHECK(start >= 0 && start + T <= cap, "rope_attend: the cache has no room for these rows");
    TORCH_CHECK(0 <= first_out && first_out < T, "rope_attend: first_out outside the rows");
    auto q = torch::empty({T, H, d}, qkv.options().dtype(torch::kFloat32));
    float* qp = q.data_ptr<float>();
    const float* cp = cs.data_ptr<float>();
    const bool kv16 = kbuf.scalar_type() == torch::kBFloat16, bf16 = qkv.scalar_type() == torch::kBFloat16;
    // row by row (a prompt's rows over the threads; each row's bits are its own)
    at::parallel_for(0, T, 32, [&](int64_t a, int64_t b) {
        std::vector<float> row((H + 2 * Hkv + 1) * d);
        rope_rows(qkv.data_ptr(), bf16, qkv.stride(0), a, b, cp, H, Hkv, d, qp, kbuf.data_ptr(), vbuf.data_ptr(), kv16, start, cap,
                  row.data());
    });
    auto keys = kbuf.narrow(1, 0, start + T), values = vbuf.narrow(1, 0, start + T);
    const int64_t n = T - first_out;
    if (n > step_rows)
        return prompt_attention(q.narrow(0, first_out, n), keys, values, start + first_out, window, scale).view({n, H * d});
    auto [begins, ends] = key_ranges(start + first_out, n, window);
    return decode_attention(q.narrow(0, first_out, n), keys, values, begins, ends, scale).view({n, H * d});
}

// A tree segment's keys and values (rows [first, first + n) of the stashes [H_kv, T, d], elements of
// es bytes) into slots at .. at + n - 1 of the cache buffers [H_kv, cap, d].
void write_tree_segment(void* kbuf, void* vbuf, int64_t cap, const void* kstash, const void* vstash, int64_t T, int64_t Hkv,
                        int64_t d, int64_t es, int64_t first, int64_t n, int64_t at) {
    char *kp = static_cast<char*>(kbuf), *vp = static_cast<char*>(vbuf);
    const char *ksp = static_cast<const char*>(kstash), *vsp = static_cast<const char*>(vstash);
    for (int64_t g = 0; g < Hkv; ++g) {
        std::memcpy(kp + (g * cap + at) * d * es, ksp + (g * T + first) * d * es, n * d * es);
        std::memcpy(vp + (g * cap + at) * d * es, vsp + (g * T + first) * d * es, n * d * es);
    }
}

// A token tree's attention block between its products (kangaroo/tree.py): qkv [T, (H + 2 H_kv) d] in
// depth-first order, cs [T, d/2, 2] RoPE at each row's own position pos + depth. Rotates Q and K and
// keeps every row's K and V in kstash/vstash [H_kv, T, d] (for the cache's commit); then segment by
// segment (rows [first, stop) continuing the row before `first`, the first at depth `depth`) writes the
// segment's K and V at slots pos + depth .. of kbuf/vbuf [H_kv, capacity, d], so that the slots
// before each row hold exactly its ancestors, and attends its rows with decode_attention: each row
// gets the bits its one-token step gets. Returns [T, H d] float32.
torch::Tensor rope_attend_tree(torch::Tensor qkv, torch::Tensor cs, torch::Tensor kbuf, torch::Tensor vbuf, int64_t pos,
                               std::vector<int64_t> first, std::vector<int64_t> stop, std::vector<int64_t> depth,
                               int64_t H, int64_t Hkv, double scale, int64_t window, torch::Tensor kstash,
                               torch::Tensor vstash) {
    cs = check_block("rope_attend_tree", qkv, cs, kbuf, vbuf, H, Hkv);
    const int64_t T = qkv.size(0), d = kbuf.size(2), cap = kbuf.size(1);
    TORCH_CHECK(kstash.dtype() == kbuf.dtype() && vstash.dtype() == kbuf.dtype() && kstash.is_contiguous()
                && vstash.is_contiguous() && kstash.dim() == 3 && kstash.size(0) == Hkv && kstash.size(1) == T
                && kstash.size(2) == d && vstash.sizes() == kstash.sizes(), "rope_attend_tree: stashes [H_kv, T, d] in the cache's dtype");
    const int64_t S = static_cast<int64_t>(first.size());
    TORCH_CHECK(S >= 1 && (int64_t)stop.size() == S && (int64_t)depth.size() == S, "rope_attend_tree: one (first, stop, depth) per segment");
    for (int64_t s = 0; s < S; ++s)
        TORCH_CHECK(0 <= first[s] && first[s] < stop[s] && stop[s] <= T && depth[s] >= 0 && pos + depth[s] + stop[s] - first[s] <= cap,
                    "rope_attend_tree: a segment outside the rows or the cache");
    auto q = torch::empty({T, H, d}, qkv.options().dtype(torch::kFloat32));
    float* qp = q.data_ptr<float>();
    const float* cp = cs.data_ptr<float>();
    const bool kv16 = kbuf.scalar_type() == torch::kBFloat16, bf16 = qkv.scalar_type() == torch::kBFloat16;
    std::vector<float> row((H + 2 * Hkv + 1) * d);  // the rotations rope_attend computes, into the stash
    rope_rows(qkv.data_ptr(), bf16, qkv.stride(0), 0, T, cp, H, Hkv, d, qp, kstash.data_ptr(), vstash.data_ptr(), kv16, 0, T,
              row.data());
    auto out = torch::empty({T, H, d}, q.options());
    for (int64_t s = 0; s < S; ++s) {
        const int64_t n = stop[s] - first[s], at = pos + depth[s];
        write_tree_segment(kbuf.data_ptr(), vbuf.data_ptr(), cap, kstash.data_ptr(), vstash.data_ptr(), T, Hkv, d,
                           kbuf.element_size(), first[s], n, at);
        auto [begins, ends] = key_ranges(at, n, window);
        out.narrow(0, first[s], n).copy_(decode_attention(q.narrow(0, first[s], n), kbuf.narrow(1, 0, at + n),
                                                           vbuf.narrow(1, 0, at + n), begins, ends, scale));
    }
    return out.view({T, H * d});
}

// x [T, D] float32 (contiguous) += y (bfloat16 or float32, row stride ys) over rows [t0, t1), element
// by element, so neither the threads nor the vector width change a bit; the stride is read once (a
// call inside the loop kept it scalar: 0.5 ms for a prompt's 810 rows).
__attribute__((noinline)) void add_rows(float* xp, const void* y, bool y_bf16, int64_t ys, int64_t t0, int64_t t1, int64_t D) {
    for (int64_t t = t0; t < t1; ++t) {
        float* xr = xp + t * D;
        if (y_bf16) {
            const auto* yr = static_cast<const uint16_t*>(y) + t * ys;
            for (int64_t i = 0; i < D; ++i) xr[i] = xr[i] + bf16_to_float(yr[i]);
        } else {
            const float* yr = static_cast<const float*>(y) + t * ys;
            for (int64_t i = 0; i < D; ++i) xr[i] = xr[i] + yr[i];
        }
    }
}

// x += y (y [T, D] bfloat16 or float32, added as float32: what `x + y` computes), then RMSNorm of
// the new x with weight w: returns [T, D] float32. x [T, D] float32, contiguous, updated in place.
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor y, torch::Tensor w, double eps) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "add_rms_norm: x [T, D] float32, contiguous");
    TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == x.size(1) && y.stride(1) == 1, "add_rms_norm: y like x");
    const int64_t T = x.size(0), D = x.size(1), ys = y.stride(0);
    float* xp = x.data_ptr<float>();
    const bool bf16 = y.scalar_type() == torch::kBFloat16;
    TORCH_CHECK(bf16 || y.scalar_type() == torch::kFloat32, "add_rms_norm: y bfloat16 or float32");
    at::parallel_for(0, T, 16, [&](int64_t a, int64_t b) { add_rows(xp, y.data_ptr(), bf16, ys, a, b, D); });
    return rms_norm(x, w, eps);
}

// Rows [t0, t1) of silu(g) u from gu [T, 2I] (gate first; bfloat16 or float32, row stride gs) into
// out [T, I] of gu's dtype: computed in float32, rounded once. silu(x) u = x u / (1 + exp(-x)), lane
// by lane (exp512.h where AVX-512 is there, else std::exp). `scratch`: 3 I floats.
__attribute__((noinline)) void silu_rows(const void* gu, bool bf16, int64_t gs, int64_t t0, int64_t t1, int64_t I, void* out,
                                         float* scratch) {
    float *x = scratch, *u = scratch + I, *r = scratch + 2 * I;
    for (int64_t t = t0; t < t1; ++t) {
        if (bf16) {
            const auto* g = static_cast<const uint16_t*>(gu) + t * gs;
            for (int64_t i = 0; i < I; ++i) { x[i] = bf16_to_float(g[i]); u[i] = bf16_to_float(g[I + i]); }
        } else {
            const float* g = static_cast<const float*>(gu) + t * gs;
            std::memcpy(x, g, I * sizeof(float));
            std::memcpy(u, g + I, I * sizeof(float));
        }
        int64_t i = 0;
#ifdef __AVX512F__
        for (; i + 16 <= I; i += 16) {
            const __m512 xv = _mm512_loadu_ps(&x[i]);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), xv));
            const __m512 s = _mm512_div_ps(xv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            _mm512_storeu_ps(&r[i], _mm512_mul_ps(s, _mm512_loadu_ps(&u[i])));
        }
#endif
        for (; i < I; ++i) r[i] = x[i] / (1.0f + std::exp(-x[i])) * u[i];
        if (bf16) {
            auto* o = static_cast<uint16_t*>(out) + t * I;
            for (int64_t j = 0; j < I; ++j) o[j] = float_to_bf16(r[j]);
        } else {
            std::memcpy(static_cast<float*>(out) + t * I, r, I * sizeof(float));
        }
    }
}

// SiLU-gated product of the MLP's fused gate/up output gu [T, 2I] (gate first): silu(g) * u,
// computed in float32 and rounded to gu's dtype once. Returns [T, I].
torch::Tensor silu_mul(torch::Tensor gu) {
    TORCH_CHECK(gu.dim() == 2 && gu.stride(1) == 1 && gu.size(1) % 2 == 0, "silu_mul: gu [T, 2I] with rows contiguous");
    const int64_t T = gu.size(0), I = gu.size(1) / 2;
    auto out = torch::empty({T, I}, gu.options());
    const bool bf16 = gu.scalar_type() == torch::kBFloat16;
    TORCH_CHECK(bf16 || gu.scalar_type() == torch::kFloat32, "silu_mul: bfloat16 or float32");
    at::parallel_for(0, T, 4, [&](int64_t a, int64_t b) {
        std::vector<float> scratch(3 * I);
        silu_rows(gu.data_ptr(), bf16, gu.stride(0), a, b, I, out.data_ptr(), scratch.data());
    });
    return out;
}

// The draft's second early exit wants the draft head's top-1 token and its softmax probability,
// nothing else: the first index of the largest logit (as torch.max), then 1 / sum_i exp(l_i - max),
// in float32, over the last row of logits [..., V] (bfloat16 or float32). One call in place of the
// cast, softmax, max and two scalar reads, whose dispatch cost more than their arithmetic. NaN logits
// give a NaN probability (never below the threshold, as torch's). Drafts are only proposals, so this
// changes no output, only how the step is computed.
std::tuple<int64_t, double> top1_prob(torch::Tensor logits) {
    TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, "top1_prob: logits [..., V] with V > 0");
    const bool bf16 = logits.scalar_type() == torch::kBFloat16;
    TORCH_CHECK(bf16 || logits.scalar_type() == torch::kFloat32, "top1_prob: bfloat16 or float32 logits");
    const int64_t V = logits.size(-1);
    const auto x = logits.contiguous();
    std::vector<float> l(V);
    row_to_float(x.data_ptr(), bf16, V, x.numel() / V - 1, V, l.data());
    int64_t i = 0, best = 0;
    float m = l[0];
    bool nan = false;
#ifdef __AVX512F__
    __m512 vm = _mm512_set1_ps(l[0]);
    __mmask16 unordered = 0;
    for (; i + 16 <= V; i += 16) {
        const __m512 v = _mm512_loadu_ps(&l[i]);
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vm = _mm512_max_ps(vm, v);
    }
    nan = unordered != 0;
    m = _mm512_reduce_max_ps(vm);
#endif
    for (; i < V; ++i) nan |= std::isnan(l[i]), m = l[i] > m ? l[i] : m;
    if (nan) {  // torch.max's answer: the first NaN
        for (best = 0; !std::isnan(l[best]); ++best) {}
        return {best, std::numeric_limits<double>::quiet_NaN()};
    }
    for (best = 0; l[best] != m; ++best) {}  // the first index of the largest
    float sum = 0.0f;
    i = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= V; i += 16) acc = _mm512_add_ps(acc, exp512(_mm512_sub_ps(_mm512_loadu_ps(&l[i]), _mm512_set1_ps(m))));
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < V; ++i) sum += std::exp(l[i] - m);
    return {best, 1.0 / static_cast<double>(sum)};
}
