// The greedy token of each row from the LM head, exactly as argmax over the dpbf16 head's logits,
// while reading the head mostly as int8 (kangaroo/screened_head.py; docs/ENGINE.md §3).
//
// Why: the LM head is the largest single product of a step (49,152 x 576 for SmolLM2, 57 MB in
// bfloat16), and greedy decoding and verification need only each row's argmax. Pass 1 computes cheap
// logits from int8 weights (one float scale per token) and the row quantised to int16 (one scale per
// row), both integer products summed exactly in int32, and a rigorous bound E_n on their distance from
// the logit the dpbf16 head would give (bfloat16 rounding included):
//
//   |a_n - ã_n| <= ||x̂|| (||ŵ_n - d_n q_n|| + 1e-4 ||ŵ_n||) + ||x̂ - s x16|| ||d_n q_n||   (Cauchy-Schwarz)
//
// (1e-4 ||x̂|| ||ŵ_n|| covers dpbf16's float32 chain of K/2 steps: K 2^-24 sum |x w| < 3.5e-5 ||x|| ||w||
// for K <= 576, and generously for larger K since the chain's error grows only with its length:
// see head_eps in screened_head.py), then 2^-7 (|ã_n| + E_n) for the bfloat16 rounding of the output
// (half an ulp is 2^-8 of it) and the float rounding of ã_n. The true argmax n* satisfies
// a_n* >= max_m a_m >= max_m (ã_m - E_m) = lo, so it is among the tokens with ã_n + E_n >= lo. Pass 2
// recomputes exactly those tokens' blocks of 16 with the dpbf16 head's own chain (same instructions,
// same order: identical bits, whatever the rows) and returns the first index of the largest value,
// as torch.argmax does. Integer sums are exact in any order, so pass 1 needs no fixed order either.
//
// Layouts: q8 [N/16][K/2][16][2] int8 (as dpbf16's [N/16][K/2][16][2] bfloat16, so one vpmovsxbw
// gives the 16 outputs' int16 pairs for inputs 2p, 2p+1); meta [N, 3] float32: d_n, e_n, g_n with
// e_n = ||ŵ_n - d_n q_n|| + eps ||ŵ_n||, g_n = ||d_n q_n||, each rounded up.

#include "module.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define KANGAROO_HEAD_ARGMAX 1
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define KANGAROO_HEAD_AMX 1
#endif
#endif

namespace {

#ifdef KANGAROO_HEAD_ARGMAX
constexpr int ROWS = 8;  // rows per pass over a loaded weight block
constexpr int64_t PREFETCH = 64;  // weight vectors (32 bytes) ahead: 2 KB

struct RowPrep {
    std::vector<int32_t> x16;  // [M][K/2] pairs of int16
    std::vector<float> scale;  // s_m
    std::vector<float> xnorm;  // ||x̂_m||, rounded up
    std::vector<float> dnorm;  // ||x̂_m - s_m x16_m||, rounded up
};

// The approximate logits and bounds of output block nb (16 outputs) for M rows, from their int32
// sums: hi = ã + E into the hi rows, the running max of lo = ã - E into lo_max.
inline void finish_block(const __m512i* sums, int64_t M, const float* meta, const RowPrep& rp, int64_t m0, int64_t nb,
                         int64_t n_vocab, float* hi, int64_t hs, __m512* lo_max) {
    // meta rows nb*16 .. +15: d, e, g interleaved [16][3]
    alignas(64) float d[16], e[16], g[16];
    for (int j = 0; j < 16; ++j) {
        d[j] = meta[(nb * 16 + j) * 3];
        e[j] = meta[(nb * 16 + j) * 3 + 1];
        g[j] = meta[(nb * 16 + j) * 3 + 2];
    }
    const __m512 dv = _mm512_load_ps(d), ev = _mm512_load_ps(e), gv = _mm512_load_ps(g);
    // outputs past n_vocab (padding, zero weights) must not set the threshold
    const int64_t valid = std::min<int64_t>(16, n_vocab - nb * 16);
    const __mmask16 real = valid >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << std::max<int64_t>(valid, 0)) - 1);
    const __m512 round_slack = _mm512_set1_ps(0x1p-7f), margin = _mm512_set1_ps(1.001f), tiny = _mm512_set1_ps(1e-6f);
    for (int64_t m = 0; m < M; ++m) {
        const __m512 approx = _mm512_mul_ps(_mm512_cvtepi32_ps(sums[m]), _mm512_mul_ps(dv, _mm512_set1_ps(rp.scale[m0 + m])));
        __m512 bound = _mm512_fmadd_ps(_mm512_set1_ps(rp.xnorm[m0 + m]), ev, _mm512_mul_ps(_mm512_set1_ps(rp.dnorm[m0 + m]), gv));
        bound = _mm512_mul_ps(bound, margin);
        bound = _mm512_add_ps(_mm512_fmadd_ps(_mm512_add_ps(_mm512_abs_ps(approx), bound), round_slack, bound), tiny);
        _mm512_storeu_ps(hi + m * hs + nb * 16, _mm512_add_ps(approx, bound));
        lo_max[m] = _mm512_mask_max_ps(lo_max[m], real, lo_max[m], _mm512_sub_ps(approx, bound));
    }
}

// G consecutive output blocks from nb for M rows: G weight streams read side by side (more memory
// requests in flight when few rows leave the loop waiting on memory), M x G independent int32
// chains (integer sums are exact in any order).
template <int M, int G>
inline void screen_blocks(const int8_t* w, int64_t kp2, const int32_t* x, int64_t xs, const float* meta, const RowPrep& rp,
                          int64_t m0, int64_t nb, int64_t n_vocab, float* hi, int64_t hs, __m512* lo_max) {
    __m512i acc[G][M];
    for (int gi = 0; gi < G; ++gi)
        for (int m = 0; m < M; ++m) acc[gi][m] = _mm512_setzero_si512();
    const int64_t stride = kp2 * 32;
    for (int64_t p = 0; p < kp2; ++p) {
        for (int gi = 0; gi < G; ++gi) {
            const int8_t* wp = w + gi * stride + p * 32;
            _mm_prefetch(reinterpret_cast<const char*>(wp + PREFETCH * 32), _MM_HINT_T0);
            const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp)));
            for (int m = 0; m < M; ++m) acc[gi][m] = _mm512_dpwssd_epi32(acc[gi][m], _mm512_set1_epi32(x[m * xs + p]), wv);
        }
    }
    for (int gi = 0; gi < G; ++gi) finish_block(acc[gi], M, meta, rp, m0, nb + gi, n_vocab, hi, hs, lo_max);
}

template <int M>
void screen_rows(const int8_t* q8, int64_t kp2, const int32_t* x, int64_t xs, const float* meta, const RowPrep& rp,
                 int64_t m0, int64_t s, int64_t e, int64_t n_vocab, float* hi, int64_t hs, __m512* lo_max) {
    constexpr int G = M == 1 ? 4 : (M == 2 ? 2 : 1);
    int64_t nb = s;
    for (; nb + G <= e; nb += G)
        screen_blocks<M, G>(q8 + nb * kp2 * 32, kp2, x, xs, meta, rp, m0, nb, n_vocab, hi, hs, lo_max);
    for (; nb < e; ++nb) screen_blocks<M, 1>(q8 + nb * kp2 * 32, kp2, x, xs, meta, rp, m0, nb, n_vocab, hi, hs, lo_max);
}

#ifdef KANGAROO_HEAD_AMX
// Pass 1 on AMX tiles, for M <= 16 rows at m0: the same int32 sums as screen_blocks, hence the same
// bits after them (integer sums are exact in any order), so the unit is a choice of speed only
// (kangaroo.screened_head.choose_amx_rows). Tiles multiply int8 by int8, so each int16 row value is
// split as x16 = 256 h + l (h signed, l = 0..255 unsigned): C_h = h . w (tdpbssd) and C_l = l . w
// (tdpbusd) over all of K, then 256 C_h + C_l. With |x16| <= 16383 (the row scale's qmax) |h| <= 64,
// so |256 C_h + C_l| <= (64 * 256 + 255) * 128 K < 2^31 for K <= 1024, and for larger K the smaller
// qmax keeps |x16| 127 K, hence every partial sum, inside int32 too. One tdpbssd covers 64 inputs of
// 16 outputs for every row, where vpdpwssd covers 2 inputs of 16 outputs for one row: the AVX-512
// pass becomes bound by its arithmetic from ~8 rows, the tiles stay bound by the head's stream (a
// token tree's 12-16 rows ~30% faster; docs/ENGINE.md §3).
// wt: [N/16][K/4][16][4] int8 (B tiles: 4 inputs of each of 16 outputs per 64-byte row).
// The tiles' sums of block nb for M rows (256 ch + cl, each [M][16] int32) through finish_block.
inline void finish_amx(const int32_t* ch, const int32_t* cl, int64_t M, const float* meta, const RowPrep& rp, int64_t m0,
                       int64_t nb, int64_t n_vocab, float* hi, int64_t hs, __m512* lo_max) {
    __m512i sums[16];
    for (int64_t m = 0; m < M; ++m)
        sums[m] = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(ch + m * 16), 8), _mm512_load_si512(cl + m * 16));
    finish_block(sums, M, meta, rp, m0, nb, n_vocab, hi, hs, lo_max);
}

// B (1 or 2) output blocks from nb side by side: B weight streams, the A tiles shared. Tiles 0-3: C_h,
// C_l of each block; 4, 5: A_h, A_l; 6, 7: each block's B. (Software prefetching 8-24 KB ahead, as the
// AVX-512 pass does, measured no faster here: the tile loads stream.)
template <int B>
inline void amx_blocks(const int8_t* w, int64_t bstride, int64_t chunks, const int8_t* ah, const uint8_t* al, int64_t K,
                       int64_t M, const float* meta, const RowPrep& rp, int64_t m0, int64_t nb, int64_t n_vocab, float* hi,
                       int64_t hs, __m512* lo_max, int32_t (*c)[256]) {
    _tile_zero(0);
    _tile_zero(1);
    if (B == 2) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t k = 0; k < chunks; ++k) {
        _tile_loadd(4, ah + k * 64, K);
        _tile_loadd(5, al + k * 64, K);
        _tile_loadd(6, w + k * 1024, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbusd(1, 5, 6);
        if (B == 2) {
            _tile_loadd(7, w + bstride + k * 1024, 64);
            _tile_dpbssd(2, 4, 7);
            _tile_dpbusd(3, 5, 7);
        }
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    finish_amx(c[0], c[1], M, meta, rp, m0, nb, n_vocab, hi, hs, lo_max);
    if (B == 2) {
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        finish_amx(c[2], c[3], M, meta, rp, m0, nb + 1, n_vocab, hi, hs, lo_max);
    }
}

void screen_amx(const int8_t* wt, int64_t kp4, const int8_t* ah, const uint8_t* al, int64_t M, const float* meta,
                const RowPrep& rp, int64_t m0, int64_t s, int64_t e, int64_t n_vocab, float* hi, int64_t hs, float* lo_out) {
    TileConfig cfg;
    for (int t = 0; t < 6; ++t) cfg.rows[t] = static_cast<uint8_t>(M), cfg.colsb[t] = 64;  // C tiles; A_h, A_l
    cfg.rows[6] = cfg.rows[7] = 16;  // the B tiles
    cfg.colsb[6] = cfg.colsb[7] = 64;
    _tile_loadconfig(&cfg);
    const int64_t K = kp4 * 4, chunks = kp4 / 16, bstride = kp4 * 64;
    alignas(64) int32_t c[4][256];
    __m512 lo_max[16];
    for (int m = 0; m < 16; ++m) lo_max[m] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t nb = s;
    for (; nb + 2 <= e; nb += 2)
        amx_blocks<2>(wt + nb * bstride, bstride, chunks, ah, al, K, M, meta, rp, m0, nb, n_vocab, hi, hs, lo_max, c);
    if (nb < e) amx_blocks<1>(wt + nb * bstride, bstride, chunks, ah, al, K, M, meta, rp, m0, nb, n_vocab, hi, hs, lo_max, c);
    _tile_release();
    for (int64_t m = 0; m < M; ++m) lo_out[m] = _mm512_reduce_max_ps(lo_max[m]);
}
#endif

// The dpbf16 head's 16 outputs of block nb for one row, exactly as linear_bf16 computes them.
inline void exact_block(const uint16_t* packed, int64_t kp2, const int32_t* xb, int64_t nb, float* out) {
    const uint16_t* w = packed + nb * kp2 * 32;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t p = 0; p < kp2; ++p)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(xb[p]), (__m512bh)_mm512_loadu_si512(w + p * 32));
    const __m256i r = (__m256i)_mm512_cvtneps_pbh(acc);
    _mm512_storeu_ps(out, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16)));
}
#endif

}  // namespace

bool head_argmax_amx_available() {
#ifdef KANGAROO_HEAD_AMX
    return linear_q4_amx_available();  // the CPU has the tiles and the OS granted them (asked once there)
#else
    return false;
#endif
}

bool head_argmax_available() {
#ifdef KANGAROO_HEAD_ARGMAX
    return true;
#else
    return false;
#endif
}

// x [M, K] bfloat16 (the head's input rows, K even), q8 [N/16, K/2, 16, 2] int8, meta [Npad, 3] float32,
// packed [N/16, K/2, 16, 2] bfloat16 (the dpbf16 head), n_vocab = N (outputs past it are padding)
// -> (argmax [M] int64, survivors [M] int64: the tokens pass 2 recomputed); argmax is empty when a row
// is not finite (NaN or inf: no bound holds, and torch.argmax has its own rule for NaN).
// q8t: the same int8 weights as [N/16, K/4, 16, 4] for AMX tiles (or no elements), used for pass 1 when
// the call has at least amx_rows rows (0: never) and K is a multiple of 64: the same bits either way.
std::vector<torch::Tensor> head_argmax(torch::Tensor x, torch::Tensor q8, torch::Tensor meta, torch::Tensor packed,
                                       int64_t n_vocab, torch::Tensor q8t, int64_t amx_rows) {
#ifdef KANGAROO_HEAD_ARGMAX
    TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.dim() == 2 && x.device().is_cpu(), "head_argmax: x [M, K] bfloat16 on CPU");
    TORCH_CHECK(q8.dtype() == torch::kInt8 && q8.dim() == 4 && q8.size(2) == 16 && q8.size(3) == 2 && q8.is_contiguous(),
                "head_argmax: q8 [N/16, K/2, 16, 2] int8");
    TORCH_CHECK(packed.dtype() == torch::kBFloat16 && packed.sizes() == q8.sizes() && packed.is_contiguous(),
                "head_argmax: packed [N/16, K/2, 16, 2] bfloat16 like q8");
    TORCH_CHECK(x.size(1) == q8.size(1) * 2, "head_argmax: x has K = 2 * q8.size(1) columns");
    const int64_t nblocks = q8.size(0), kp2 = q8.size(1), K = kp2 * 2, Npad = nblocks * 16, M = x.size(0);
    TORCH_CHECK(meta.dtype() == torch::kFloat32 && meta.is_contiguous() && meta.numel() == Npad * 3, "head_argmax: meta [N, 3] float32");
    TORCH_CHECK(n_vocab > 0 && n_vocab <= Npad, "head_argmax: 0 < n_vocab <= padded outputs");
    x = x.contiguous();
    auto tokens = torch::empty({M}, torch::kInt64);
    auto survivors = torch::empty({M}, torch::kInt64);
    if (M == 0) return {tokens, survivors};

    // rows -> int16 with one scale each, so that |x16| * 127 * K stays inside int32
    // per-thread scratch kept between calls: a step's buffers (~200 KB a row) would otherwise be
    // allocated, zeroed and returned to the system every call
    // (the calling thread's: the workers below reach them through these references, not their own)
    thread_local RowPrep tls_rp;
    thread_local std::vector<float> tls_hi, tls_row;
    RowPrep& rp = tls_rp;
    std::vector<float>& hi = tls_hi;
    std::vector<float>& row = tls_row;
    rp.x16.resize(M * kp2);
    rp.scale.resize(M);
    rp.xnorm.resize(M);
    rp.dnorm.resize(M);
    const double qmax = std::min(16383.0, std::floor(2147483647.0 / (127.0 * static_cast<double>(K))));
    const auto* xh = reinterpret_cast<const uint16_t*>(x.data_ptr());
    row.resize(K);
    for (int64_t m = 0; m < M; ++m) {
        float amax = 0.f;
        bool finite = true;  // std::max skips a NaN, so amax alone would not show one
        for (int64_t k = 0; k < K; ++k) {
            uint32_t bits = static_cast<uint32_t>(xh[m * K + k]) << 16;
            float v;
            std::memcpy(&v, &bits, 4);
            row[k] = v;
            amax = std::max(amax, std::fabs(v));
            finite = finite && std::isfinite(v);
        }
        if (!finite) return {torch::empty({0}, torch::kInt64), survivors};  // no bound holds: the caller takes the full head
        const float s = amax > 0.f ? static_cast<float>(amax / qmax) : 1.f;
        double xx = 0., dd = 0.;
        auto* pairs = reinterpret_cast<int16_t*>(rp.x16.data() + m * kp2);
        for (int64_t k = 0; k < K; ++k) {
            const double q = std::nearbyint(static_cast<double>(row[k]) / s);
            pairs[k] = static_cast<int16_t>(std::max(-qmax, std::min(qmax, q)));
            const double diff = static_cast<double>(row[k]) - static_cast<double>(s) * pairs[k];
            xx += static_cast<double>(row[k]) * row[k];
            dd += diff * diff;
        }
        rp.scale[m] = s;
        rp.xnorm[m] = static_cast<float>(std::sqrt(xx) * (1 + 1e-6));
        rp.dnorm[m] = static_cast<float>(std::sqrt(dd) * (1 + 1e-6) + 1e-30);
    }

    // pass 1: every thread screens a contiguous range of output blocks for all rows
    if (static_cast<int64_t>(hi.size()) < M * Npad) hi.resize(M * Npad);  // every entry is written in pass 1
    const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
    std::vector<float> lo(nth * M, -std::numeric_limits<float>::infinity());
    const auto* q8p = q8.data_ptr<int8_t>();
    const float* mp = meta.data_ptr<float>();
    const bool amx = amx_rows > 0 && M >= amx_rows && q8t.numel() > 0;
#ifdef KANGAROO_HEAD_AMX
    if (amx) {
        TORCH_CHECK(q8t.dtype() == torch::kInt8 && q8t.is_contiguous() && q8t.dim() == 4 && q8t.size(0) == nblocks
                    && q8t.size(1) * 4 == K && q8t.size(2) == 16 && q8t.size(3) == 4 && K % 64 == 0,
                    "head_argmax: q8t [N/16, K/4, 16, 4] int8 with K a multiple of 64");
        TORCH_CHECK(head_argmax_amx_available(), "head_argmax: no AMX-INT8 tiles on this CPU (or OS)");
        // each row's int16 values split into A tiles' bytes: h = x16 >> 8 (signed), l = x16 & 255
        thread_local std::vector<int8_t> tls_ah;
        thread_local std::vector<uint8_t> tls_al;
        std::vector<int8_t>& ah = tls_ah;
        std::vector<uint8_t>& al = tls_al;
        ah.resize(M * K);
        al.resize(M * K);
        for (int64_t m = 0; m < M; ++m) {
            const auto* v = reinterpret_cast<const int16_t*>(rp.x16.data() + m * kp2);
            for (int64_t k = 0; k < K; ++k) {
                ah[m * K + k] = static_cast<int8_t>(v[k] >> 8);
                al[m * K + k] = static_cast<uint8_t>(v[k] & 0xFF);
            }
        }
        const auto* wt = q8t.data_ptr<int8_t>();
        at::parallel_for(0, nth, 1, [&](int64_t a, int64_t b) {
            for (int64_t t = a; t < b; ++t) {
                const int64_t s = nblocks * t / nth, e = nblocks * (t + 1) / nth;
                for (int64_t m0 = 0; m0 < M; m0 += 16)
                    screen_amx(wt, K / 4, ah.data() + m0 * K, al.data() + m0 * K, std::min<int64_t>(16, M - m0), mp, rp, m0, s, e,
                               n_vocab, hi.data() + m0 * Npad, Npad, lo.data() + t * M + m0);
            }
        });
    }
#else
    TORCH_CHECK(!amx, "head_argmax: built without AMX-INT8 tiles");
#endif
    if (!amx) at::parallel_for(0, nth, 1, [&](int64_t a, int64_t b) {
        for (int64_t t = a; t < b; ++t) {
            const int64_t s = nblocks * t / nth, e = nblocks * (t + 1) / nth;
            for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
                const int64_t mm = std::min<int64_t>(ROWS, M - m0);
                __m512 lo_max[ROWS];
                for (int r = 0; r < ROWS; ++r) lo_max[r] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
                const int32_t* xr = rp.x16.data() + m0 * kp2;
                float* hr = hi.data() + m0 * Npad;
                switch (mm) {
                    case 1: screen_rows<1>(q8p, kp2, xr, kp2, mp, rp, m0, s, e, n_vocab, hr, Npad, lo_max); break;
                    case 2: screen_rows<2>(q8p, kp2, xr, kp2, mp, rp, m0, s, e, n_vocab, hr, Npad, lo_max); break;
                    case 3: screen_rows<3>(q8p, kp2, xr, kp2, mp, rp, m0, s, e, n_vocab, hr, Npad, lo_max); break;
                    case 4: screen_rows<4>(q8p, kp2, xr, kp2, mp, rp, m0, s, e, n_vocab, hr, Npad, lo_max); break;
                    case 5: screen_rows<5>(q8p, kp2, xr, kp2, mp, rp, m0, s, e, n_vocab, hr, Npad, lo_max); break;
                    case 6: screen_rows<6>(q8p, kp2, xr, kp2, mp, rp, m0, s, e, n_vocab, hr, Npad, lo_max); break;
                    case 7: screen_rows<7>(q8p, kp2, xr, kp2, mp, rp, m0, s, e, n_vocab, hr, Npad, lo_max); break;
                    default: screen_rows<8>(q8p, kp2, xr, kp2, mp, rp, m0, s, e, n_vocab, hr, Npad, lo_max); break;
                }
                for (int64_t r = 0; r < mm; ++r) lo[t * M + m0 + r] = _mm512_reduce_max_ps(lo_max[r]);
            }
        }
    });

    // pass 2: per row, the survivors' blocks recomputed exactly; the first index of the largest value
    auto* tp = tokens.data_ptr<int64_t>();
    auto* sp = survivors.data_ptr<int64_t>();
    const auto* pk = reinterpret_cast<const uint16_t*>(packed.data_ptr());
    const auto* xpairs = reinterpret_cast<const int32_t*>(xh);
    at::parallel_for(0, M, 1, [&](int64_t a, int64_t b) {
        alignas(64) float exact[16];
        for (int64_t m = a; m < b; ++m) {
            const float* hm = hi.data() + m * Npad;
            float best_lo = -std::numeric_limits<float>::infinity();
            for (int64_t t = 0; t < nth; ++t) best_lo = std::max(best_lo, lo[t * M + m]);
            int64_t arg = -1, count = 0;
            float best = -std::numeric_limits<float>::infinity();
            const __m512 threshold = _mm512_set1_ps(best_lo);
            for (int64_t nb = 0; nb * 16 < n_vocab; ++nb) {
                __mmask16 alive = _mm512_cmp_ps_mask(_mm512_loadu_ps(hm + nb * 16), threshold, _CMP_GE_OQ);
                const int64_t valid = std::min<int64_t>(16, n_vocab - nb * 16);
                if (valid < 16) alive &= static_cast<__mmask16>((1u << valid) - 1);
                if (!alive) continue;
                exact_block(pk, kp2, xpairs + m * kp2, nb, exact);
                for (int j = 0; j < 16; ++j) {  // in index order: a tie keeps the first
                    if (!((alive >> j) & 1)) continue;
                    ++count;
                    if (arg < 0 || exact[j] > best) {
                        best = exact[j];
                        arg = nb * 16 + j;
                    }
                }
            }
            TORCH_CHECK(arg >= 0, "head_argmax: no token survived the screen (non-finite logits?)");
            tp[m] = arg;
            sp[m] = count;
        }
    });
    if (M > 16) {  // keep a step's scratch, not a long teacher-forced call's
        hi.clear();
        hi.shrink_to_fit();
    }
    return {tokens, survivors};
#else
    (void)x; (void)q8; (void)meta; (void)packed; (void)n_vocab; (void)q8t; (void)amx_rows;
    TORCH_CHECK(false, "head_argmax: this CPU (or compiler) has no AVX512-BF16 and AVX512-VNNI");
    return {};
#endif
}
