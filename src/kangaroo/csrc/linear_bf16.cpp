// y = x W^T (+ b) for bfloat16 weights on AVX512-BF16 CPUs: the step engine's "dpbf16" product.
//
// Why our own product: a decoding step of a small model reads every weight once, and oneDNN's
// prepacked product reached ~60% of this machine's memory bandwidth over a step's 121 small matrices
// (a 1-row step's products took 7.9 ms where streaming 268 MB at the measured 47 GB/s takes 5.7 ms).
// This loop streams the weights in the order it uses them and keeps up to 8 output blocks in
// flight for one row; verification's rows reuse each loaded weight vector (see docs/ENGINE.md §3).
//
// Layout: W [N, K] is packed (in Python, kangaroo/kernels.py) as [N/16][K/2][16][2]: for each block
// of 16 outputs, K/2 vectors holding the 16 outputs' weights for inputs 2p and 2p+1. One
// vdpbf16ps then adds x[2p] w[2p] + x[2p+1] w[2p+1] into 16 output lanes. Each output is one chain
// over p = 0..K/2-1 in order, then + bias, then rounded to bfloat16 (round to nearest even): the
// arithmetic of an output depends on nothing but its row of x and its weights, so a row gets the
// same bits whatever the number of rows (row invariance by construction; kernels.py checks it).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "module.h"  // store_rows

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define KANGAROO_DPBF16 1
#endif

namespace {

#ifdef KANGAROO_DPBF16
constexpr int64_t PREFETCH = 32;  // weight vectors (64 bytes each) ahead
constexpr int64_t ROWS = 8;  // rows computed together over one loaded weight block (registers: ROWS x GN + GN <= 32)

// Outputs n0 .. n0 + 16 GN of M rows: GN weight blocks (each K/2 vectors, block stride kp2 * 32
// bf16), M x GN accumulators; x rows are pairs of bf16 read as int32 and broadcast.
template <int M, int GN>
inline void block(const uint16_t* w, int64_t kp2, const int32_t* x, int64_t xs, int64_t n0, const float* bias,
                  uint16_t* y, int64_t ys) {
    __m512 acc[GN][M];
    for (int g = 0; g < GN; ++g)
        for (int m = 0; m < M; ++m) acc[g][m] = _mm512_setzero_ps();
    const int64_t stride = kp2 * 32;
    for (int64_t p = 0; p < kp2; ++p) {
        __m512bh wv[GN];
        for (int g = 0; g < GN; ++g) {
            wv[g] = (__m512bh)_mm512_loadu_si512(w + g * stride + p * 32);
            // several rows: ask for the weights 2 KB ahead, so that the products of these rows run
            // while those lines arrive (a step's products, 8 rows: 7.5 ms without, 5.7 at 1 KB, 5.0 at 2 KB; one or two rows are faster without)
            if (M >= 3) _mm_prefetch(reinterpret_cast<const char*>(w + g * stride + (p + PREFETCH) * 32), _MM_HINT_T0);
        }
        for (int m = 0; m < M; ++m) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(x[m * xs + p]);
            for (int g = 0; g < GN; ++g) acc[g][m] = _mm512_dpbf16_ps(acc[g][m], xb, wv[g]);
        }
    }
    store_rows<M, GN>(acc, bias, n0, y, ys);
}

template <int GN>
inline void rows_block(int64_t mm, int64_t g, const uint16_t* w, int64_t kp2, const int32_t* x, int64_t xs,
                       int64_t n0, const float* bias, uint16_t* y, int64_t ys) {
#define KANGAROO_ROWS(G)                                                                   \
    switch (mm) {                                                                          \
        case 1: block<1, G>(w, kp2, x, xs, n0, bias, y, ys); break;                        \
        case 2: block<2, G>(w, kp2, x, xs, n0, bias, y, ys); break;                        \
        case 3: block<3, G>(w, kp2, x, xs, n0, bias, y, ys); break;                        \
        case 4: block<4, G>(w, kp2, x, xs, n0, bias, y, ys); break;                        \
        case 5: block<5, G>(w, kp2, x, xs, n0, bias, y, ys); break;                        \
        case 6: block<6, G>(w, kp2, x, xs, n0, bias, y, ys); break;                        \
        case 7: block<7, G>(w, kp2, x, xs, n0, bias, y, ys); break;                        \
        default: block<8, G>(w, kp2, x, xs, n0, bias, y, ys); break;                       \
    }
    if (g == GN) {
        KANGAROO_ROWS(GN)
    } else {  // the last blocks of a thread's range, one at a time
        for (int64_t j = 0; j < g; ++j) {
            const uint16_t* wj = w + j * kp2 * 32;
            const int64_t nj = n0 + j * 16;
            {
                const uint16_t* w = wj;
                const int64_t n0 = nj;
                KANGAROO_ROWS(1)
            }
        }
    }
#undef KANGAROO_ROWS
}

// Part `part` of `parts` of the outputs: a contiguous range of output blocks (one stream of weights)
// and, block group by block group, every row in groups of ROWS (later groups find the weights in
// cache).
template <int GN>
void run_part(const uint16_t* w, int64_t K, int64_t N, int64_t M, const int32_t* x, const float* bias, uint16_t* y,
              int64_t part, int64_t parts) {
    const int64_t nblocks = N / 16, kp2 = K / 2, xs = K / 2, ys = N;
    const int64_t s = nblocks * part / parts, e = nblocks * (part + 1) / parts;
    for (int64_t nb = s; nb < e; nb += GN) {
        const int64_t g = std::min<int64_t>(GN, e - nb);
        for (int64_t m0 = 0; m0 < M; m0 += ROWS)
            rows_block<GN>(std::min<int64_t>(ROWS, M - m0), g, w + nb * kp2 * 32, kp2, x + m0 * xs, xs, nb * 16,
                           bias, y + m0 * ys, ys);
    }
}
#endif

}  // namespace

#ifdef KANGAROO_DPBF16
// One part of a product (linear_bf16's threads, or a share of the layer stack's one-region step): the
// same code either way, so the same bits. Output blocks in flight per row group: more for few rows
// (independent dependency chains), fewer for many (accumulators must stay in the 32 vector registers).
__attribute__((noinline)) void linear_bf16_part(const uint16_t* w, int64_t K, int64_t N, int64_t M, const uint16_t* x,
                                                const float* bias, uint16_t* y, int64_t part, int64_t parts) {
    const auto* xp = reinterpret_cast<const int32_t*>(x);
    if (M == 1) run_part<8>(w, K, N, M, xp, bias, y, part, parts);
    else if (M == 2) run_part<6>(w, K, N, M, xp, bias, y, part, parts);
    else if (M <= 4) run_part<4>(w, K, N, M, xp, bias, y, part, parts);
    else run_part<3>(w, K, N, M, xp, bias, y, part, parts);
}
#endif

int64_t linear_parts(int64_t N) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 16)); }

bool linear_bf16_available() {
#ifdef KANGAROO_DPBF16
    return true;
#else
    return false;
#endif
}

// x [M, K] bfloat16, packed [N/16, K/2, 16, 2] bfloat16, bias [N] float32 or None -> [M, N] bfloat16.
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias) {
#ifdef KANGAROO_DPBF16
    TORCH_CHECK(x.dtype() == torch::kBFloat16 && packed.dtype() == torch::kBFloat16, "linear_bf16: bfloat16 only");
    TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "linear_bf16: CPU only");
    TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 2
                && packed.size(1) * 2 == x.size(1) && packed.is_contiguous(), "linear_bf16: x [M, K], packed [N/16, K/2, 16, 2]");
    x = x.contiguous();
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * 16;
    const float* b = nullptr;
    torch::Tensor bf;
    if (bias.has_value() && bias->defined()) {
        bf = bias->to(torch::kFloat32).contiguous();
        TORCH_CHECK(bf.numel() == N, "linear_bf16: bias of N values");
        b = bf.data_ptr<float>();
    }
    auto y = torch::empty({M, N}, x.options());
    if (M == 0) return y;
    const auto* w = reinterpret_cast<const uint16_t*>(packed.data_ptr());
    const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
    auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
    const int64_t parts = linear_parts(N);
    at::parallel_for(0, parts, 1, [&](int64_t a, int64_t bth) {
        for (int64_t t = a; t < bth; ++t) linear_bf16_part(w, K, N, M, xp, b, yp, t, parts);
    });
    return y;
#else
    (void)x; (void)packed; (void)bias;
    TORCH_CHECK(false, "linear_bf16: this CPU (or compiler) has no AVX512-BF16");
    return torch::Tensor();
#endif
}
