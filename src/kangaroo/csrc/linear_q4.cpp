// y = x W^T (+ b) with W in GGUF's Q4_1 blocks, on AVX512-BF16 CPUs: the step engine's "q4_1" product,
// computing with exactly the weights a Q4_1 file distributes (no rounding to another format).
//
// Q4_1 stores each run of 32 inputs of an output row as 4-bit q (0..15), a scale d and a minimum m
// (float16): w = d q + m. So a block's share of an output is d (sum x q) + m (sum x). Here x is the
// engine's bfloat16 activation row; q is exact in bfloat16, so vdpbf16ps forms sum x q with exact
// products and float32 sums, and two FMAs apply d and m per block. An output is one fixed chain
// (blocks in order; within a block two chains of pairs, then added), then + bias, then rounded to
// bfloat16 (nearest even): a row's bits depend only on that row (row invariance by construction).
//
// Layout (packed in kangaroo/quantized.py): nibbles [N/16][K/32][4][32] 16-bit words: word 2o+s of
// chunk c (output block n16, input block b) holds q[16 n16 + o][32 b + 2(4c + k) + s] in nibble k
// (k = 0..3, lowest first); scales [N/16][K/32][2][16] float16 (d, then m, of the 16 outputs).
//
// Prompts (more than Q4_STEP_ROWS rows, i.e. kangaroo.kernels.MAX_ROWS) may instead take the int8 path
// llama.cpp computes every Q4_1 product with: each row's 32-input block is quantised to int8 (Q8_1:
// dx = max |x| / 127, qx = round(x / dx)), and vpdpbusd forms the block's sum qx q exactly in int32;
// the block adds dw dx (sum qx q) + m (dx sum qx). vpdpbusd does 64 products per instruction against
// vdpbf16ps's 32, so a prompt's products run ~1.5x faster (docs/ENGINE.md §9). It is only for
// prompts on the q4_1 kernel: its steps and verification keep bfloat16 activations, so Kangaroo's
// verification still computes each row as plain decoding does. Rows stay independent (a row's bits
// depend only on it). The q4_1_int8 kernel (the int8 argument) computes every call this way, steps
// included; on CPUs with AMX-INT8 the same sums can come from tiles with the same bits (q8_amx_run),
// and long prompts can run as a bfloat16 GEMM on AMX tiles instead (q4_amx_bf16_run).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "module.h"  // store_rows, linear_q4_part

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define KANGAROO_Q4 1
#if defined(__AVX512VNNI__)
#define KANGAROO_Q8 1
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
#define KANGAROO_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif
#endif

namespace {

// rows up to which products keep bfloat16 activations (kangaroo.kernels.MAX_ROWS: every decoding step
// and verification); larger calls are prompts, which take the int8 path when it is switched on
constexpr int64_t Q4_STEP_ROWS = 16;

#ifdef KANGAROO_Q4
constexpr int64_t Q4_PF = 8;  // blocks (320 bytes each) prefetched ahead

// Outputs n0 .. n0 + 16 GN of M rows. A 64-byte chunk holds 4 input pairs of a block's 16 outputs,
// one 16-bit word per (output, input of the pair) with the 4 pairs' q in its 4 nibbles; OR-ing a
// nibble into 0x4300 makes the bfloat16 number 128 + q, so the weights need no shuffles, only a
// shift and one vpternlog each. The block's products then sum x (128 + q); 128 (sum x) comes off
// with the minimum's FMA: d (sum x (128 + q)) + (m - 128 d) (sum x).
template <int M, int GN>
inline void q4_block(const uint16_t* q, const uint16_t* sc, int64_t nb32, const int32_t* x, int64_t xs, const float* sx,
                     int64_t n0, const float* bias, uint16_t* y, int64_t ys) {
    const __m512i low = _mm512_set1_epi16(0x000F), base = _mm512_set1_epi16(0x4300);
    __m512 acc[GN][M];
    for (int g = 0; g < GN; ++g)
        for (int m = 0; m < M; ++m) acc[g][m] = _mm512_setzero_ps();
    const int64_t qstride = nb32 * 128, sstride = nb32 * 32;  // per output block, in 16-bit words
    for (int64_t b = 0; b < nb32; ++b) {
        __m512 t[GN][M], u[GN][M];  // nibbles 0, 2 and 1, 3: two chains, twice the products in flight
        for (int g = 0; g < GN; ++g)
            for (int m = 0; m < M; ++m) t[g][m] = u[g][m] = _mm512_setzero_ps();
        for (int g = 0; g < GN; ++g) {  // the weights Q4_PF blocks ahead, as they stream in per output block
            const char* ahead = reinterpret_cast<const char*>(q + g * qstride + (b + Q4_PF) * 128);
            for (int line = 0; line < 4; ++line) _mm_prefetch(ahead + line * 64, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(sc + g * sstride + (b + Q4_PF) * 32), _MM_HINT_T0);
        }
        for (int c = 0; c < 4; ++c) {
            __m512bh w[GN][4];
            for (int g = 0; g < GN; ++g) {
                const __m512i raw = _mm512_loadu_si512(q + g * qstride + b * 128 + c * 32);
                // (v & 0xF) | 0x4300: vpternlog with truth table 0xEA = (A & B) | C
                w[g][0] = (__m512bh)_mm512_ternarylogic_epi32(raw, low, base, 0xEA);
                w[g][1] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(raw, 4), low, base, 0xEA);
                w[g][2] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(raw, 8), low, base, 0xEA);
                w[g][3] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(raw, 12), base);
            }
            for (int m = 0; m < M; ++m) {
                const int32_t* xr = x + m * xs + b * 16 + c * 4;
                for (int k = 0; k < 4; ++k) {
                    const __m512bh xb = (__m512bh)_mm512_set1_epi32(xr[k]);
                    for (int g = 0; g < GN; ++g) {
                        if (k % 2 == 0) t[g][m] = _mm512_dpbf16_ps(t[g][m], xb, w[g][k]);
                        else u[g][m] = _mm512_dpbf16_ps(u[g][m], xb, w[g][k]);
                    }
                }
            }
        }
        for (int g = 0; g < GN; ++g) {
            const uint16_t* s = sc + g * sstride + b * 32;
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
            const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 16)));
            const __m512 m2 = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), d, mn);  // m - 128 d
            for (int m = 0; m < M; ++m) {
                acc[g][m] = _mm512_fmadd_ps(d, _mm512_add_ps(t[g][m], u[g][m]), acc[g][m]);
                acc[g][m] = _mm512_fmadd_ps(m2, _mm512_set1_ps(sx[m * nb32 + b]), acc[g][m]);
            }
        }
    }
    store_rows<M, GN>(acc, bias, n0, y, ys);
}

constexpr int64_t Q4_ROWS = 8;  // rows per pass over a loaded block (registers: 3 M + 4 + 2 <= 32, one output block at a time)

// q4_block for mm (1 .. MR) rows, the row count a compile-time constant
template <int GN, int MR>
inline void q4_block_rows(int64_t mm, const uint16_t* q, const uint16_t* sc, int64_t nb32, const int32_t* x, int64_t xs,
                          const float* sx, int64_t n0, const float* bias, uint16_t* y, int64_t ys) {
    if constexpr (MR > 1) {
        if (mm < MR) return q4_block_rows<GN, MR - 1>(mm, q, sc, nb32, x, xs, sx, n0, bias, y, ys);
    }
    q4_block<MR, GN>(q, sc, nb32, x, xs, sx, n0, bias, y, ys);
}

// mm rows of g (GN, or fewer at a thread's last blocks, one at a time) output blocks from n0
template <int GN>
inline void q4_rows(int64_t mm, int64_t g, const uint16_t* q, const uint16_t* sc, int64_t nb32, const int32_t* x,
                    int64_t xs, const float* sx, int64_t n0, const float* bias, uint16_t* y, int64_t ys) {
    if (g == GN) return q4_block_rows<GN, Q4_ROWS>(mm, q, sc, nb32, x, xs, sx, n0, bias, y, ys);
    for (int64_t j = 0; j < g; ++j)
        q4_block_rows<1, Q4_ROWS>(mm, q + j * nb32 * 128, sc + j * nb32 * 32, nb32, x, xs, sx, n0 + j * 16, bias, y, ys);
}

// Part `part` of `parts` of the outputs (a contiguous range of output blocks), every row
template <int GN>
void q4_part(const uint16_t* q, const uint16_t* sc, int64_t K, int64_t N, int64_t M, const int32_t* x, const float* sx,
             const float* bias, uint16_t* y, int64_t part, int64_t parts) {
    const int64_t nblocks = N / 16, nb32 = K / 32, xs = K / 2, ys = N;
    const int64_t s = nblocks * part / parts, e = nblocks * (part + 1) / parts;
    for (int64_t nb = s; nb < e; nb += GN) {
        const int64_t g = std::min<int64_t>(GN, e - nb);
        for (int64_t m0 = 0; m0 < M; m0 += Q4_ROWS)
            q4_rows<GN>(std::min<int64_t>(Q4_ROWS, M - m0), g, q + nb * nb32 * 128, sc + nb * nb32 * 32, nb32,
                        x + m0 * xs, xs, sx + m0 * nb32, nb * 16, bias, y + m0 * ys, ys);
    }
}
#endif

#ifdef KANGAROO_Q8
// The int8 prompt path. x: M rows of K/4 int32 words, each 8 inputs of a block in the order
// 0 4 1 5 2 6 3 7, which is how a chunk's nibbles fall into the bytes of a 32-bit lane: the low
// nibbles of output o's two words are inputs {0, 4, 1, 5} + 8c, the high nibbles {2, 6, 3, 7} + 8c.
// dx, sdx: per row and block the scale dx and dx (sum qx). Outputs n0 .. n0 + 16 GN of M rows.
template <int M, int GN>
inline void q8_block(const uint16_t* q, const uint16_t* sc, int64_t nb32, const int32_t* x, int64_t xs, const float* dx,
                     const float* sdx, int64_t n0, const float* bias, uint16_t* y, int64_t ys) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const int64_t qstride = nb32 * 128, sstride = nb32 * 32;
    __m512 acc[GN][M];
    for (int g = 0; g < GN; ++g)
        for (int m = 0; m < M; ++m) acc[g][m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb32; ++b) {
        __m512i is[GN][M];
        for (int g = 0; g < GN; ++g)
            for (int m = 0; m < M; ++m) is[g][m] = _mm512_setzero_si512();
        for (int c = 0; c < 4; ++c) {
            __m512i w0[GN], w1[GN];
            for (int g = 0; g < GN; ++g) {
                const __m512i raw = _mm512_loadu_si512(q + g * qstride + b * 128 + c * 32);
                w0[g] = _mm512_and_si512(raw, low);
                w1[g] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
            }
            for (int m = 0; m < M; ++m) {
                const int32_t* xr = x + m * xs + b * 8 + c * 2;
                const __m512i x0 = _mm512_set1_epi32(xr[0]), x1 = _mm512_set1_epi32(xr[1]);
                for (int g = 0; g < GN; ++g) {
                    is[g][m] = _mm512_dpbusd_epi32(is[g][m], w0[g], x0);
                    is[g][m] = _mm512_dpbusd_epi32(is[g][m], w1[g], x1);
                }
            }
        }
        for (int g = 0; g < GN; ++g) {
            const uint16_t* s = sc + g * sstride + b * 32;
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
            const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 16)));
            for (int m = 0; m < M; ++m) {
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(dx[m * nb32 + b]));
                acc[g][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[g][m]), scale, acc[g][m]);
                acc[g][m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sdx[m * nb32 + b]), acc[g][m]);
            }
        }
    }
    store_rows<M, GN>(acc, bias, n0, y, ys);
}

// q8_block for mm (1 .. MR) rows, the row count a compile-time constant
template <int GN, int MR>
inline void q8_rows(int64_t mm, const uint16_t* q, const uint16_t* sc, int64_t nb32, const int32_t* x, int64_t xs,
                    const float* dx, const float* sdx, int64_t n0, const float* bias, uint16_t* y, int64_t ys) {
    if constexpr (MR > 1) {
        if (mm < MR) return q8_rows<GN, MR - 1>(mm, q, sc, nb32, x, xs, dx, sdx, n0, bias, y, ys);
    }
    q8_block<MR, GN>(q, sc, nb32, x, xs, dx, sdx, n0, bias, y, ys);
}

// Prompts: rows per pass (two output blocks side by side: 2 x 4 int32 sums + 2 x 4 float sums in
// registers) and rows per tile (each thread walks its output blocks over one tile of rows, then the
// next). Steps (at most Q8_STEP_PASS rows per pass): one output block at a time, all of a step's rows
// in one pass over its weights. A step streams its weights from memory, and one stream per thread
// kept them flowing where two side by side did not; one pass over a block unpacks it once (docs/
// ENGINE.md §3, "Steps in one pass"). The sums' order per output is the same on every path, so the
// bits are too.
constexpr int64_t Q8_ROWS = 4, Q8_TILE = 64, Q8_STEP_PASS = 8;

#ifdef KANGAROO_AMX
// The same product on AMX tiles (Intel CPUs with AMX-INT8). Per output block (16 outputs) and input
// block b, one tdpbsud forms C [rows x 16] = qx [rows x 32] (int8, a tile's rows) . q [32 x 16]
// (0..15 as unsigned bytes, 8 tile rows of 16 outputs x 4 inputs). C holds exactly the int32 sums
// vpdpbusd forms in q8_block, and the same float operations follow in the same order, so every
// output has the same bits on either path: the AMX path is chosen by speed alone (for how many rows,
// kangaroo.quantized.choose_amx_rows measures), never by numerics. A tdpbsud costs about what one
// vpdpbusd per row costs for 1 row, but the same for 16 rows, so steps of several rows (Kangaroo's
// verification) cost little more than one. Tile registers are not renamed, so two sets of tiles
// (C, A, B = 0, 1, 2 and 3, 4, 5) take alternate input blocks and their work overlaps.
// An input block's weights as the B tile wants them: 8 rows of 64 bytes, row 2c the low nibbles of
// chunk c (16 outputs x 4 inputs, q8_block's input order), row 2c + 1 the high ones.
inline void unpack_block(const uint16_t* qb, uint8_t* w) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const char* ahead = reinterpret_cast<const char*>(qb + Q4_PF * 128);
    for (int line = 0; line < 4; ++line) _mm_prefetch(ahead + line * 64, _MM_HINT_T0);
    for (int c = 0; c < 4; ++c) {
        const __m512i raw = _mm512_loadu_si512(qb + c * 32);
        _mm512_store_si512(w + (2 * c) * 64, _mm512_and_si512(raw, low));
        _mm512_store_si512(w + (2 * c + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low));
    }
}

// One tile of M rows over one output block. UNPACK: unpack each pair of input blocks into w (1 KB)
// just before its tiles (a step: one tile of rows, so the unpacking overlaps the tile work); else w
// holds the whole output block unpacked already (a prompt: once for all its tiles of rows).
template <int M, bool UNPACK>
inline void amx_tile(const uint16_t* q, uint8_t* w, const uint16_t* sc, int64_t nb32, const int8_t* xq, int64_t K,
                     const float* dx, const float* sdx, int64_t n0, const float* bias, uint16_t* y, int64_t ys, int64_t valid,
                     int32_t* cbuf) {
    __m512 acc[1][M];
    for (int m = 0; m < M; ++m) acc[0][m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb32; b += 2) {
        const bool two = b + 1 < nb32;
        const uint8_t* wb = w + b * 512;
        if (UNPACK) {
            wb = w;
            unpack_block(q + b * 128, w);
            if (two) unpack_block(q + (b + 1) * 128, w + 512);
        }
        _tile_loadd(1, xq + b * 32, K);
        _tile_loadd(2, wb, 64);
        _tile_zero(0);
        _tile_dpbsud(0, 1, 2);
        if (two) {
            _tile_loadd(4, xq + (b + 1) * 32, K);
            _tile_loadd(5, wb + 512, 64);
            _tile_zero(3);
            _tile_dpbsud(3, 4, 5);
        }
        _tile_stored(0, cbuf, 64);
        if (two) _tile_stored(3, cbuf + 256, 64);
        for (int h = 0; h < (two ? 2 : 1); ++h) {
            const uint16_t* s = sc + (b + h) * 32;
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
            const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 16)));
            for (int m = 0; m < M; ++m) {  // as q8_block
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(dx[m * nb32 + b + h]));
                acc[0][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cbuf + h * 256 + m * 16)), scale, acc[0][m]);
                acc[0][m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sdx[m * nb32 + b + h]), acc[0][m]);
            }
        }
    }
    store_rows<M, 1>(acc, bias, n0, y, ys, valid);
}

// xq: Mp rows (M rounded up to 16 when M > 16, the padding rows zero) of K int8 in q8_block's order.
void q8_amx_run(const uint16_t* q, const uint16_t* sc, int64_t K, int64_t N, int64_t M, const int8_t* xq, const float* dx,
                const float* sdx, const float* bias, uint16_t* y) {
    const int64_t nb32 = K / 32, nblocks = N / 16, tile = std::min<int64_t>(M, 16);
    const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
    at::parallel_for(0, nth, 1, [&](int64_t a, int64_t bth) {
        std::vector<uint8_t> wbuf(static_cast<size_t>(nb32) * 512 + 64);
        uint8_t* w = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(wbuf.data()) + 63) & ~uintptr_t(63));
        alignas(64) int32_t cbuf[512];
        TileConfig cfg;
        for (int t = 0; t < 6; t += 3) {  // C: rows x 16 int32; A: rows x 32 int8; B: 8 x 64 bytes
            cfg.rows[t] = cfg.rows[t + 1] = static_cast<uint8_t>(tile);
            cfg.colsb[t] = 64;
            cfg.colsb[t + 1] = 32;
            cfg.rows[t + 2] = 8;
            cfg.colsb[t + 2] = 64;
        }
        _tile_loadconfig(&cfg);
        for (int64_t t = a; t < bth; ++t) {
            const int64_t s = nblocks * t / nth, e = nblocks * (t + 1) / nth;
            for (int64_t nb = s; nb < e; ++nb) {
                const uint16_t* qb = q + nb * nb32 * 128;
                if (M > 16)  // a prompt: the output block's weights unpacked once for all its tiles of rows
                    for (int64_t b = 0; b < nb32; ++b) unpack_block(qb + b * 128, w + b * 512);
                const uint16_t* sb = sc + nb * nb32 * 32;
                for (int64_t m0 = 0; m0 < M; m0 += tile) {
                    const int8_t* xt = xq + m0 * K;
                    const float *dt = dx + m0 * nb32, *st = sdx + m0 * nb32;
                    uint16_t* yt = y + m0 * N;
                    const int64_t valid = std::min<int64_t>(tile, M - m0);
                    if (M > 16) {
                        amx_tile<16, false>(qb, w, sb, nb32, xt, K, dt, st, nb * 16, bias, yt, N, valid, cbuf);
                        continue;
                    }
                    switch (tile) {
#define KANGAROO_AMX_TILE(R) case R: amx_tile<R, true>(qb, w, sb, nb32, xt, K, dt, st, nb * 16, bias, yt, N, valid, cbuf); break;
                        KANGAROO_AMX_TILE(1) KANGAROO_AMX_TILE(2) KANGAROO_AMX_TILE(3) KANGAROO_AMX_TILE(4)
                        KANGAROO_AMX_TILE(5) KANGAROO_AMX_TILE(6) KANGAROO_AMX_TILE(7) KANGAROO_AMX_TILE(8)
                        KANGAROO_AMX_TILE(9) KANGAROO_AMX_TILE(10) KANGAROO_AMX_TILE(11) KANGAROO_AMX_TILE(12)
                        KANGAROO_AMX_TILE(13) KANGAROO_AMX_TILE(14) KANGAROO_AMX_TILE(15) KANGAROO_AMX_TILE(16)
#undef KANGAROO_AMX_TILE
                    }
                }
            }
        }
        _tile_release();
    });
}

// Linux hands AMX's tile state to a process only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without it the first tile instruction faults. Asked once.
bool amx_permitted() {
    static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return ok;
}

// Prompts as a plain bfloat16 GEMM on AMX tiles: each output block's weights de-quantised once per
// prompt to bfloat16 (w = d q + m in float32, rounded to nearest even; the bfloat16 engine's rounding
// of the same weights), then C [16 rows x 16 outputs] accumulates tdpbf16ps over all of K in its tile
// and is stored once: no per-block scaling, which is what bounds the int8 products on long prompts.
// Prompts only: no step computes this way, so Kangaroo's identity with plain decoding is untouched.
// A prompt's rows are independent (a row's bits depend only on it), as on every path.
constexpr int64_t AMX_PANEL = 64;  // prompt rows per panel (their bfloat16 rows stay in cache across the output blocks)

void q4_amx_bf16_run(const uint16_t* q, const uint16_t* sc, int64_t K, int64_t N, int64_t M, const uint16_t* xh,
                     const float* bias, uint16_t* y) {
    const int64_t nb32 = K / 32, nblocks = N / 16, Mfull = M / 32 * 32;  // two tiles of 16 rows at a time
    // the tiles read whole pairs of tiles: the rows past the last whole pair, copied once, zero-padded
    thread_local std::vector<uint16_t> tail;
    tail.assign(32 * K, 0);
    std::memcpy(tail.data(), xh + Mfull * K, (M - Mfull) * K * sizeof(uint16_t));
    const uint16_t* const tp = tail.data();
    const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
    at::parallel_for(0, nth, 1, [&](int64_t a, int64_t bth) {
        alignas(64) float cbuf[512];
        TileConfig cfg;
        for (int t = 0; t < 5; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;  // C0, C1, A0, A1, B
        _tile_loadconfig(&cfg);
        for (int64_t t = a; t < bth; ++t) {
            const int64_t s = nblocks * t / nth, e = nblocks * (t + 1) / nth;
            // this thread's output blocks de-quantised once (1 KB per block of 32 inputs): the row
            // panels below then read them from cache, and each panel's rows stay in cache too
            thread_local std::vector<uint16_t> wbuf;  // grown, never cleared: kept between a prompt's products
            if (wbuf.size() < static_cast<size_t>((e - s) * nb32) * 512 + 32) wbuf.resize(static_cast<size_t>((e - s) * nb32) * 512 + 32);
            uint16_t* const w = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(wbuf.data()) + 63) & ~uintptr_t(63));
            const __m512i low = _mm512_set1_epi16(0x000F);
            const __m512i dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
            const __m512i dup_hi = _mm512_add_epi32(dup, _mm512_set1_epi32(8));
            for (int64_t nb = s; nb < e; ++nb) {
                const uint16_t* qb = q + nb * nb32 * 128;
                const uint16_t* sb = sc + nb * nb32 * 32;
                uint16_t* wn = w + (nb - s) * nb32 * 512;
                for (int64_t b = 0; b < nb32; ++b) {  // B tiles: row p holds pair p's (output, input) words
                    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + b * 32)));
                    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + b * 32 + 16)));
                    // word 2o + s of a row belongs to output o: d and m of outputs 0..7, then 8..15, each twice
                    const __m512 d0 = _mm512_permutexvar_ps(dup, d), d1 = _mm512_permutexvar_ps(dup_hi, d);
                    const __m512 m0 = _mm512_permutexvar_ps(dup, mn), m1 = _mm512_permutexvar_ps(dup_hi, mn);
                    for (int c = 0; c < 4; ++c) {
                        const __m512i raw = _mm512_loadu_si512(qb + b * 128 + c * 32);
                        for (int k = 0; k < 4; ++k) {
                            const __m512i qk = _mm512_and_si512(_mm512_srli_epi16(raw, 4 * k), low);  // 32 words
                            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(qk)));
                            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(qk, 1)));
                            const __m512bh row = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(d1, hi, m1), _mm512_fmadd_ps(d0, lo, m0));
                            _mm512_store_si512(wn + b * 512 + (4 * c + k) * 32, (__m512i)row);
                        }
                    }
                }
            }
            for (int64_t p0 = 0; p0 < M; p0 += AMX_PANEL)
                for (int64_t nb = s; nb < e; ++nb) {
                    const uint16_t* wn = w + (nb - s) * nb32 * 512;
                    for (int64_t m0 = p0; m0 < std::min(M, p0 + AMX_PANEL); m0 += 32) {
                        const uint16_t* xr = m0 < Mfull ? xh + m0 * K : tp;
                        _tile_zero(0);
                        _tile_zero(1);
                        for (int64_t b = 0; b < nb32; ++b) {
                            _tile_loadd(4, wn + b * 512, 64);
                            _tile_loadd(2, xr + b * 32, K * 2);
                            _tile_loadd(3, xr + 16 * K + b * 32, K * 2);
                            _tile_dpbf16ps(0, 2, 4);
                            _tile_dpbf16ps(1, 3, 4);
                        }
                        _tile_stored(0, cbuf, 64);
                        _tile_stored(1, cbuf + 256, 64);
                        const __m512 bv = bias != nullptr ? _mm512_loadu_ps(bias + nb * 16) : _mm512_setzero_ps();
                        for (int64_t r = 0; r < 32 && m0 + r < M; ++r)
                            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (m0 + r) * N + nb * 16),
                                                (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(cbuf + r * 16), bv)));
                    }
                }
        }
        _tile_release();
    });
}
#endif

// each row's blocks as int8, in AVX-512: 32 bfloat16 -> float32, dx = max |x| / 127, qx = x (1 / dx)
// rounded to nearest even (the default rounding, as np.rint), then each 8 bytes put in the order
// 0 4 1 5 2 6 3 7 (see q8_block) with one in-lane byte shuffle. A block holding a NaN gets
// dx = NaN (and infinities give 0 * inf), so its outputs are NaN, as the bfloat16 path's would be.
void q8_quantize_rows(const uint16_t* xh, int64_t m0, int64_t m1, int64_t K, int8_t* xqp, float* dxp, float* sdxp) {
    const int64_t nb32 = K / 32;
    const __m256i order = _mm256_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15,
                                           0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
    for (int64_t m = m0; m < m1; ++m)
        for (int64_t b = 0; b < nb32; ++b) {
            const uint16_t* src = xh + m * K + b * 32;
            const __m512 v0 = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))), 16));
            const __m512 v1 = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16))), 16));
            const bool nan = (_mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q)) != 0;
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const float d = nan ? std::numeric_limits<float>::quiet_NaN() : amax / 127.0f;
            const float id = d > 0.0f ? 1.0f / d : 0.0f;
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
            const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            const __m256i bytes = _mm256_set_m128i(_mm512_cvtepi32_epi8(q1), _mm512_cvtepi32_epi8(q0));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(xqp + m * K + b * 32), _mm256_shuffle_epi8(bytes, order));
            dxp[m * nb32 + b] = d;
            sdxp[m * nb32 + b] = d * static_cast<float>(sum);
        }
}

// llama.cpp's Q8_1 x Q4_1 product of M rows: quantise each row's blocks, then vpdpbusd (q8_block) or,
// from `amx_rows` rows on (0: never), AMX tiles (q8_amx_run): the same bits either way.
void q8_run(const uint16_t* q, const uint16_t* sc, int64_t K, int64_t N, int64_t M, const uint16_t* xh, const float* bias,
            uint16_t* y, int64_t amx_rows) {
    const int64_t nb32 = K / 32, xs = K / 4, nblocks = N / 16;
    const bool amx = amx_rows > 0 && M >= amx_rows;
    const int64_t Mp = amx && M > 16 ? (M + 15) / 16 * 16 : M;  // AMX prompts: whole tiles of 16 rows
    // buffers kept between calls (grown, never cleared: every byte used is written first), so a
    // prompt's 120 products do not each allocate and fault in fresh pages
    thread_local std::vector<int8_t> xq;
    thread_local std::vector<float> dx, sdx;
    if (static_cast<int64_t>(xq.size()) < Mp * K) xq.resize(Mp * K);
    if (static_cast<int64_t>(dx.size()) < Mp * nb32) dx.resize(Mp * nb32), sdx.resize(Mp * nb32);
    // (the worker threads see their own thread_locals: they get this thread's buffers as pointers)
    int8_t* const xqp = xq.data();
    float* const dxp = dx.data();
    float* const sdxp = sdx.data();
    if (Mp > M) {  // padding rows: zero, computed by the tiles and never stored
        std::memset(xqp + M * K, 0, (Mp - M) * K);
        std::fill(dxp + M * nb32, dxp + Mp * nb32, 0.0f);
        std::fill(sdxp + M * nb32, sdxp + Mp * nb32, 0.0f);
    }
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) { q8_quantize_rows(xh, m0, m1, K, xqp, dxp, sdxp); });
#ifdef KANGAROO_AMX
    if (amx) {
        q8_amx_run(q, sc, K, N, M, xqp, dxp, sdxp, bias, y);
        return;
    }
#endif
    const auto* xp = reinterpret_cast<const int32_t*>(xqp);
    const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
    at::parallel_for(0, nth, 1, [&](int64_t a, int64_t bth) {
        for (int64_t t = a; t < bth; ++t) {
            const int64_t s = nblocks * t / nth, e = nblocks * (t + 1) / nth;
            if (M <= Q4_STEP_ROWS) {  // a step
                linear_q4_part(q, sc, K, N, M, true, nullptr, xqp, dxp, sdxp, nullptr, bias, y, t, nth);
                continue;
            }
            for (int64_t mt = 0; mt < M; mt += Q8_TILE) {
                const int64_t mend = std::min(M, mt + Q8_TILE);
                for (int64_t nb = s; nb < e;) {
                    const bool pair = nb + 1 < e;
                    for (int64_t m0 = mt; m0 < mend; m0 += Q8_ROWS) {
                        const int64_t mm = std::min<int64_t>(Q8_ROWS, mend - m0);
                        const uint16_t* qb = q + nb * nb32 * 128;
                        const uint16_t* sb = sc + nb * nb32 * 32;
                        if (pair) q8_rows<2, Q8_ROWS>(mm, qb, sb, nb32, xp + m0 * xs, xs, dxp + m0 * nb32, sdxp + m0 * nb32, nb * 16, bias, y + m0 * N, N);
                        else q8_rows<1, Q8_ROWS>(mm, qb, sb, nb32, xp + m0 * xs, xs, dxp + m0 * nb32, sdxp + m0 * nb32, nb * 16, bias, y + m0 * N, N);
                    }
                    nb += pair ? 2 : 1;
                }
            }
        }
    });
}
#endif

}  // namespace

// The pieces of a product that the layer stack's one-region step (layer_stack.cpp) calls directly,
// and linear_q4 through its threads: the same code either way, so the same bits.
//
// Rows [m0, m1) of x [M, K] bfloat16 made ready: int8 -> each block quantised (xq [M, K], dx and
// sdx [M, K/32]); otherwise each block's sum (sx [M, K/32]) for the minima: every block is one chain
// over its 32 values in order, and the blocks' chains advance side by side (one block at a time was
// a chain of K dependent adds, ~2 us a row for K = 1536).
__attribute__((noinline)) void linear_q4_prepare(const uint16_t* xh, int64_t m0, int64_t m1, int64_t K, bool int8,
                                                 int8_t* xq, float* dx, float* sdx, float* sx) {
#ifdef KANGAROO_Q4
    const int64_t nb32 = K / 32;
    if (int8) {
#ifdef KANGAROO_Q8
        q8_quantize_rows(xh, m0, m1, K, xq, dx, sdx);
#endif
        return;
    }
    for (int64_t m = m0; m < m1; ++m) {
        float* s = sx + m * nb32;
        for (int64_t bb = 0; bb < nb32; ++bb) s[bb] = 0.0f;
        const uint16_t* xr = xh + m * K;
        for (int64_t i = 0; i < 32; ++i)
            for (int64_t bb = 0; bb < nb32; ++bb) {
                const uint32_t bits = static_cast<uint32_t>(xr[bb * 32 + i]) << 16;
                float f;
                std::memcpy(&f, &bits, sizeof(f));
                s[bb] = s[bb] + f;
            }
    }
#else
    (void)xh; (void)m0; (void)m1; (void)K; (void)int8; (void)xq; (void)dx; (void)sdx; (void)sx;
#endif
}

// Part `part` of `parts` of y [M, N] (a contiguous range of output blocks), from what
// linear_q4_prepare made of x: int8 -> xq, dx, sdx (at most Q4_STEP_ROWS rows: one output block at a
// time, all rows in one pass over its weights); otherwise x itself (xh) and sx, any row count.
__attribute__((noinline)) void linear_q4_part(const uint16_t* q, const uint16_t* sc, int64_t K, int64_t N, int64_t M,
                                              bool int8, const uint16_t* xh, const int8_t* xq, const float* dx,
                                              const float* sdx, const float* sx, const float* bias, uint16_t* y,
                                              int64_t part, int64_t parts) {
#ifdef KANGAROO_Q4
    if (!int8) return q4_part<1>(q, sc, K, N, M, reinterpret_cast<const int32_t*>(xh), sx, bias, y, part, parts);
#ifdef KANGAROO_Q8
    const int64_t nb32 = K / 32, xs = K / 4, nblocks = N / 16;
    const int64_t s = nblocks * part / parts, e = nblocks * (part + 1) / parts;
    const auto* xp = reinterpret_cast<const int32_t*>(xq);
    for (int64_t nb = s; nb < e; ++nb)
        for (int64_t m0 = 0; m0 < M; m0 += Q8_STEP_PASS)
            q8_rows<1, Q8_STEP_PASS>(std::min<int64_t>(Q8_STEP_PASS, M - m0), q + nb * nb32 * 128, sc + nb * nb32 * 32,
                                     nb32, xp + m0 * xs, xs, dx + m0 * nb32, sdx + m0 * nb32, nb * 16, bias, y + m0 * N, N);
#endif
#else
    (void)q; (void)sc; (void)K; (void)N; (void)M; (void)int8; (void)xh; (void)xq; (void)dx; (void)sdx; (void)sx;
    (void)bias; (void)y; (void)part; (void)parts;
#endif
}

static std::atomic<bool> q4_prompt_int8{false};
// rows from which int8-activation products run on AMX tiles (0: never); the same bits either way
static std::atomic<int64_t> q4_amx_rows{0};
// prompts of at least this many rows take the bfloat16 AMX GEMM (q4_amx_bf16_run), before the int8 setting; 0: none
static std::atomic<int64_t> q4_prompt_amx{0};

int64_t linear_q4_step_rows() { return Q4_STEP_ROWS; }

int64_t linear_q4_amx_rows_get() { return q4_amx_rows.load(); }

bool linear_q4_int8_available() {
#ifdef KANGAROO_Q8
    return true;
#else
    return false;
#endif
}

// Whether prompts take the int8 path (the engine decides by measurement, kangaroo.calibration); returns the old value.
bool linear_q4_prompt_int8(bool on) {
#ifdef KANGAROO_Q8
    return q4_prompt_int8.exchange(on);
#else
    TORCH_CHECK(!on, "linear_q4: this CPU (or compiler) has no AVX512-VNNI for the int8 prompt path");
    return false;
#endif
}

bool linear_q4_amx_available() {
#ifdef KANGAROO_AMX
    return amx_permitted();
#else
    return false;
#endif
}

// From how many rows int8-activation products (steps of the q4_1_int8 kernel, int8 prompts) use AMX
// tiles, 0 = never (the engine decides by measurement, kangaroo.quantized.choose_amx_rows); returns the old value.
int64_t linear_q4_amx_rows(int64_t rows) {
    TORCH_CHECK(rows >= 0, "linear_q4_amx_rows: a row count >= 0");
    TORCH_CHECK(rows == 0 || linear_q4_amx_available(), "linear_q4: this CPU (or compiler, or kernel) gives no AMX-INT8 tiles");
    return q4_amx_rows.exchange(rows);
}

// From how many rows prompts (more than Q4_STEP_ROWS rows) take the bfloat16 AMX GEMM, 0 = never (set by
// measurement, kangaroo.quantized.choose_prompt_amx_rows); returns the old value.
int64_t linear_q4_prompt_amx(int64_t rows) {
    TORCH_CHECK(rows >= 0, "linear_q4_prompt_amx: a row count >= 0");
    TORCH_CHECK(rows == 0 || linear_q4_amx_available(), "linear_q4: this CPU (or compiler, or kernel) gives no AMX tiles");
    return q4_prompt_amx.exchange(rows);
}

bool linear_q4_available() {
#ifdef KANGAROO_Q4
    return true;
#else
    return false;
#endif
}

// x [M, K] bfloat16, nibbles [N/16, K/32, 4, 32] int16, scales [N/16, K/32, 2, 16] float16, bias [N]
// float32 or None -> [M, N] bfloat16. int8: every row count on int8 activations (the q4_1_int8
// kernel: llama.cpp's arithmetic for steps too); otherwise steps keep bfloat16 activations.
torch::Tensor linear_q4(torch::Tensor x, torch::Tensor nibbles, torch::Tensor scales, c10::optional<torch::Tensor> bias,
                        bool int8) {
#ifdef KANGAROO_Q4
    TORCH_CHECK(x.dtype() == torch::kBFloat16 && nibbles.dtype() == torch::kInt16 && scales.dtype() == torch::kFloat16,
                "linear_q4: x bfloat16, nibbles int16, scales float16");
    TORCH_CHECK(x.device().is_cpu() && nibbles.device().is_cpu() && scales.device().is_cpu(), "linear_q4: CPU only");
    TORCH_CHECK(x.dim() == 2 && nibbles.dim() == 4 && nibbles.size(2) == 4 && nibbles.size(3) == 32 && nibbles.is_contiguous()
                && scales.dim() == 4 && scales.size(0) == nibbles.size(0) && scales.size(1) == nibbles.size(1)
                && scales.size(2) == 2 && scales.size(3) == 16 && scales.is_contiguous()
                && nibbles.size(1) * 32 == x.size(1), "linear_q4: x [M, K], nibbles [N/16, K/32, 4, 32], scales [N/16, K/32, 2, 16]");
    x = x.contiguous();
    const int64_t M = x.size(0), K = x.size(1), N = nibbles.size(0) * 16, nb32 = K / 32;
    const float* b = nullptr;
    torch::Tensor bf;
    if (bias.has_value() && bias->defined()) {
        bf = bias->to(torch::kFloat32).contiguous();
        TORCH_CHECK(bf.numel() == N, "linear_q4: bias of N values");
        b = bf.data_ptr<float>();
    }
    auto y = torch::empty({M, N}, x.options());
    if (M == 0) return y;
#ifdef KANGAROO_AMX
    const int64_t prompt_amx = q4_prompt_amx.load();
    if (M > Q4_STEP_ROWS && prompt_amx > 0 && M >= prompt_amx) {
        q4_amx_bf16_run(reinterpret_cast<const uint16_t*>(nibbles.data_ptr()), reinterpret_cast<const uint16_t*>(scales.data_ptr()), K, N,
                        M, reinterpret_cast<const uint16_t*>(x.data_ptr()), b, reinterpret_cast<uint16_t*>(y.data_ptr()));
        return y;
    }
#endif
#ifdef KANGAROO_Q8
    if (int8 || (M > Q4_STEP_ROWS && q4_prompt_int8.load())) {
        q8_run(reinterpret_cast<const uint16_t*>(nibbles.data_ptr()), reinterpret_cast<const uint16_t*>(scales.data_ptr()), K, N, M,
               reinterpret_cast<const uint16_t*>(x.data_ptr()), b, reinterpret_cast<uint16_t*>(y.data_ptr()), q4_amx_rows.load());
        return y;
    }
#else
    TORCH_CHECK(!int8, "linear_q4: this CPU (or compiler) has no AVX512-VNNI for int8 activations");
#endif
    std::vector<float> sx(M * nb32);
    const auto* xh = reinterpret_cast<const uint16_t*>(x.data_ptr());
    linear_q4_prepare(xh, 0, M, K, false, nullptr, nullptr, nullptr, sx.data());
    const auto* qp = reinterpret_cast<const uint16_t*>(nibbles.data_ptr());
    const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
    auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
    const int64_t parts = linear_parts(N);
    at::parallel_for(0, parts, 1, [&](int64_t a, int64_t bth) {
        for (int64_t t = a; t < bth; ++t) linear_q4_part(qp, sp, K, N, M, false, xh, nullptr, nullptr, nullptr, sx.data(), b, yp, t, parts);
    });
    return y;
#else
    (void)x; (void)nibbles; (void)scales; (void)bias; (void)int8;
    TORCH_CHECK(false, "linear_q4: this CPU (or compiler) has no AVX512-BF16");
    return torch::Tensor();
#endif
}
