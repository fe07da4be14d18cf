// The functions the compiled module's source files call in one another (kangaroo/attention.py builds
// decode_attention.cpp, linear_bf16.cpp, linear_q4.cpp, head_argmax.cpp, step_ops.cpp and
// layer_stack.cpp into one module; decode_attention.cpp binds them for Python).
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// torch's float -> bfloat16 rounding (c10::BFloat16: round to nearest even, NaN kept quiet).
inline uint16_t float_to_bf16(float f) {
    if (std::isnan(f)) return 0x7FC0;
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    const uint32_t bias = ((bits >> 16) & 1u) + 0x7FFFu;
    return static_cast<uint16_t>((bits + bias) >> 16);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

// The outputs n0 .. n0 + 16 GN of the first `valid` of M rows (all of them by default; a prompt's last
// tile may be padded) from their float32 sums: + bias, rounded to bfloat16 (nearest even), as the
// dpbf16 and Q4_1 products store them.
template <int M, int GN>
inline void store_rows(const __m512 (&acc)[GN][M], const float* bias, int64_t n0, uint16_t* y, int64_t ys,
                       int64_t valid = M) {
    for (int g = 0; g < GN; ++g)
        for (int m = 0; m < M && m < valid; ++m) {
            __m512 r = acc[g][m];
            if (bias != nullptr) r = _mm512_add_ps(r, _mm512_loadu_ps(bias + n0 + g * 16));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * ys + n0 + g * 16), (__m256i)_mm512_cvtneps_pbh(r));
        }
}
#endif

#if defined(__AMX_TILE__)
// AMX's tile configuration (ldtilecfg's 64-byte layout): palette 1, then per tile its bytes per row
// and rows. Used by linear_q4.cpp's products and decode_attention.cpp's prompt tiles.
struct TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};
#endif

// decode_attention.cpp
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, std::vector<int64_t> begin,
                               std::vector<int64_t> end, double scale_);
torch::Tensor prompt_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t start, int64_t window,
                               double scale_);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
void rms_norm_rows(const float* x, int64_t xs, const float* w, float* out, int64_t t0, int64_t t1, int64_t D, float eps);
// A step's attention over a KV cache, as work items (kv head, chunk of keys) spread over workers
// (decode_plan), each worker's items (decode_items), then each (row, head)'s chunks combined
// (decode_combine): what decode_attention runs over its threads, and the layer stack's one-region
// step runs between its barriers.
struct DecodePlan {
    int64_t T = 0, H = 0, Hkv = 0, D = 0, G = 0, nchunks = 0, c_first = 0;
    std::vector<int64_t> begin, end;            // each row's keys
    std::vector<std::vector<int64_t>> workers;  // each worker's items
};
std::pair<std::vector<int64_t>, std::vector<int64_t>> key_ranges(int64_t at, int64_t n, int64_t window);
DecodePlan decode_plan(int64_t T, int64_t H, int64_t Hkv, int64_t D, std::vector<int64_t> begin, std::vector<int64_t> end);
void decode_items(const DecodePlan& p, int64_t w, const float* q, int64_t qs0, const void* k, const void* v, int64_t ks0,
                  bool kv16, float scale, float* m, float* l, float* o);
void decode_combine(const DecodePlan& p, int64_t a, int64_t b, const float* m, const float* l, const float* o, float* out);
bool decode_kv16_native(int64_t D);
bool prompt_attention_tiles_available(int64_t mode);
int64_t prompt_attention_tiles(int64_t mode);

// linear_bf16.cpp, linear_q4.cpp
bool linear_bf16_available();
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias);
int64_t linear_parts(int64_t N);  // parts (one per thread, at most one per 16 outputs) a product of N outputs runs in
void linear_bf16_part(const uint16_t* w, int64_t K, int64_t N, int64_t M, const uint16_t* x, const float* bias, uint16_t* y,
                      int64_t part, int64_t parts);
bool linear_q4_available();
bool linear_q4_int8_available();
int64_t linear_q4_step_rows();
bool linear_q4_prompt_int8(bool on);
bool linear_q4_amx_available();
int64_t linear_q4_amx_rows(int64_t rows);
int64_t linear_q4_amx_rows_get();  // the current setting
int64_t linear_q4_prompt_amx(int64_t rows);
torch::Tensor linear_q4(torch::Tensor x, torch::Tensor nibbles, torch::Tensor scales, c10::optional<torch::Tensor> bias,
                        bool int8);
void linear_q4_prepare(const uint16_t* xh, int64_t m0, int64_t m1, int64_t K, bool int8, int8_t* xq, float* dx, float* sdx,
                       float* sx);
void linear_q4_part(const uint16_t* q, const uint16_t* sc, int64_t K, int64_t N, int64_t M, bool int8, const uint16_t* xh,
                    const int8_t* xq, const float* dx, const float* sdx, const float* sx, const float* bias, uint16_t* y,
                    int64_t part, int64_t parts);

// head_argmax.cpp
bool head_argmax_available();
bool head_argmax_amx_available();
std::vector<torch::Tensor> head_argmax(torch::Tensor x, torch::Tensor q8, torch::Tensor meta, torch::Tensor packed,
                                       int64_t n_vocab, torch::Tensor q8t, int64_t amx_rows);

// step_ops.cpp
torch::Tensor rope(torch::Tensor x, torch::Tensor cs);
torch::Tensor rope_attend(torch::Tensor qkv, torch::Tensor cs, torch::Tensor kbuf, torch::Tensor vbuf, int64_t start,
                          int64_t H, int64_t Hkv, double scale, int64_t window, int64_t first_out, int64_t step_rows);
torch::Tensor rope_attend_tree(torch::Tensor qkv, torch::Tensor cs, torch::Tensor kbuf, torch::Tensor vbuf, int64_t pos,
                               std::vector<int64_t> first, std::vector<int64_t> stop, std::vector<int64_t> depth,
                               int64_t H, int64_t Hkv, double scale, int64_t window, torch::Tensor kstash,
                               torch::Tensor vstash);
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor y, torch::Tensor w, double eps);
torch::Tensor silu_mul(torch::Tensor gu);
std::tuple<int64_t, double> top1_prob(torch::Tensor logits);
// the row functions behind them, which the layer stack's one-region step calls too
void rope_rows(const void* qkv, bool qkv_bf16, int64_t qs, int64_t t0, int64_t t1, const float* cs, int64_t H, int64_t Hkv,
               int64_t d, float* q, void* kbuf, void* vbuf, bool kv16, int64_t start, int64_t cap, float* row);
void write_tree_segment(void* kbuf, void* vbuf, int64_t cap, const void* kstash, const void* vstash, int64_t T, int64_t Hkv,
                        int64_t d, int64_t es, int64_t first, int64_t n, int64_t at);
void add_rows(float* x, const void* y, bool y_bf16, int64_t ys, int64_t t0, int64_t t1, int64_t D);
void silu_rows(const void* gu, bool bf16, int64_t gs, int64_t t0, int64_t t1, int64_t I, void* out, float* scratch);

// layer_stack.cpp
void bind_layer_stack(pybind11::module& mod);
bool layer_stack_region(bool on);
int64_t layer_stack_region_runs();
