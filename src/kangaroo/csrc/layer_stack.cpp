// A range of decoder layers in one call: the step engine's per-layer loop (kangaroo/engine.py,
// FusedEngine.run_layers) moved out of Python, calling the same compiled products and small ops in
// the same order, so every bit is what the Python loop gives. A layer is ~8 calls; from Python each
// costs a few microseconds of argument parsing, attribute lookups and dtype casts, 0.3-0.5 ms of a
// 30-layer step of ~4-7 ms (docs/ENGINE.md §2). Here they cost what the ops themselves cost.
// A chain step (up to 16 rows) goes further and runs all its layers in one parallel region
// (run_region), calling the same pieces the ops are made of, and so do token trees; prompts go op by op.
//
// The weights are registered once per layer (add_layer); a call passes what changes per step: the
// residual stream, the layers' cache buffers and write positions, and the RoPE rows.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <thread>
#include <utility>
#include <vector>

#include "module.h"

namespace {

// One product, as kangaroo.quantized.Q4Linear (nibbles int16, scales float16) or as kangaroo.kernels.
// Linear on the dpbf16 kernel (packed bfloat16 weights, outputs padded to a multiple of 16) calls it.
struct Product {
    bool q4 = false, int8 = false;  // int8: Q4_1 on int8 activations at every row count (q4_1_int8 kernel)
    torch::Tensor a, b;
    c10::optional<torch::Tensor> bias;
    int64_t out = 0;

    int64_t K = 0, N = 0;  // inputs, and outputs as computed (dpbf16: padded to a multiple of 16)

    // the pieces of operator() for the one-region step: x [T, K] bfloat16 made ready by a thread for
    // its own use (q4: block sums or int8 blocks into its scratch), then one part of y [T, N]
    void prepare(const uint16_t* x, int64_t T, int8_t* xq, float* dx, float* sdx, float* sx) const {
        if (q4) linear_q4_prepare(x, 0, T, K, int8, xq, dx, sdx, sx);
    }
    void part(const uint16_t* x, int64_t T, const int8_t* xq, const float* dx, const float* sdx, const float* sx, uint16_t* y,
              int64_t p, int64_t parts) const {
        const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
        if (q4)
            linear_q4_part(reinterpret_cast<const uint16_t*>(a.data_ptr()), reinterpret_cast<const uint16_t*>(this->b.data_ptr()), K, N, T,
                           int8, x, xq, dx, sdx, sx, b, y, p, parts);
        else
            linear_bf16_part(reinterpret_cast<const uint16_t*>(a.data_ptr()), K, N, T, x, b, y, p, parts);
    }

    torch::Tensor operator()(const torch::Tensor& x) const {
        const torch::Tensor xb = x.scalar_type() == torch::kBFloat16 ? x : x.to(torch::kBFloat16);
        if (q4) return linear_q4(xb, a, b, bias, int8);
        torch::Tensor y = linear_bf16(xb, a, bias);
        return y.size(1) == out ? y : y.narrow(1, 0, out);
    }
};

struct Layer {
    torch::Tensor in_w, post_w;
    double in_eps = 0, post_eps = 0;
    Product qkv, o, gate_up, down;
    int64_t H = 0, Hkv = 0, window = 0, rope = 0;
    double scale = 1;
};


// A stage of the one-region step (LayerStack::run_region): n items that any thread of the region may
// take, then a barrier: a thread leaves when all n items are done and all `team` threads have
// arrived, so the stage's outputs are visible to every thread (release/acquire) and no thread is
// still reading what the stage before it wrote.
struct alignas(64) Stage {
    std::atomic<int64_t> next{0};
    alignas(64) std::atomic<int64_t> done{0};
    alignas(64) std::atomic<int64_t> arrived{0};
};

// spin (the other threads are on other cores, microseconds away), then yield where threads outnumber cores
template <class Ready>
inline void spin_until(Ready&& ready) {
    for (int64_t spins = 0; !ready(); ++spins) {
        if (spins < (1 << 16)) {
#if defined(__x86_64__)
            __builtin_ia32_pause();
#endif
        } else {
            std::this_thread::yield();
        }
    }
}

template <class F>
inline void run_stage(Stage& s, int64_t n, int64_t team, F&& f) {
    for (int64_t i = s.next.fetch_add(1, std::memory_order_relaxed); i < n; i = s.next.fetch_add(1, std::memory_order_relaxed)) {
        f(i);
        s.done.fetch_add(1, std::memory_order_release);
    }
    s.arrived.fetch_add(1, std::memory_order_acq_rel);
    spin_until([&] {
        return s.done.load(std::memory_order_acquire) >= n && s.arrived.load(std::memory_order_acquire) >= team;
    });
}

// float32 -> bfloat16 as torch's .to(torch.bfloat16) rounds (nearest even; what Product's cast gives)
inline void to_bf16(const float* x, uint16_t* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(x[i]);
}

std::atomic<bool> region_on{true};
std::atomic<int64_t> region_runs{0};  // steps run in one region (tests check the path was taken)

}  // namespace

// Whether chain steps run LayerStack's one-region path (the default); returns the old setting. The
// other path is the reference in tests and the comparison in docs/ENGINE.md.
bool layer_stack_region(bool on) { return region_on.exchange(on); }
int64_t layer_stack_region_runs() { return region_runs.load(); }

namespace {
}  // namespace

class LayerStack {
  public:
    // mats: for qkv, o, gate_up, down in turn, (weights a, weights b, bias): a int16 = Q4_1 nibbles
    // with b their scales, a bfloat16 = dpbf16-packed weights (b unused); a bias of no elements = none.
    // outs: the four products' output features. rope: index of this layer's RoPE rows in run()'s list.
    // int8: the Q4_1 products on int8 activations at every row count (the q4_1_int8 kernel).
    void add_layer(torch::Tensor in_w, double in_eps, torch::Tensor post_w, double post_eps, std::vector<torch::Tensor> mats,
                   std::vector<int64_t> outs, int64_t H, int64_t Hkv, double scale, int64_t window, int64_t rope, bool int8) {
        TORCH_CHECK(mats.size() == 12 && outs.size() == 4, "LayerStack.add_layer: four products of (a, b, bias)");
        TORCH_CHECK(in_w.dtype() == torch::kFloat32 && post_w.dtype() == torch::kFloat32, "LayerStack.add_layer: float32 norms");
        Layer l;
        l.in_w = in_w.contiguous();
        l.post_w = post_w.contiguous();
        l.in_eps = in_eps;
        l.post_eps = post_eps;
        Product* ps[4] = {&l.qkv, &l.o, &l.gate_up, &l.down};
        for (int i = 0; i < 4; ++i) {
            Product& p = *ps[i];
            p.a = mats[3 * i];
            p.b = mats[3 * i + 1];
            p.q4 = p.a.scalar_type() == torch::kShort;
            p.int8 = p.q4 && int8;
            TORCH_CHECK(p.q4 || p.a.scalar_type() == torch::kBFloat16, "LayerStack.add_layer: Q4_1 or dpbf16 products only");
            if (mats[3 * i + 2].numel() > 0) p.bias = mats[3 * i + 2].to(torch::kFloat32).contiguous();
            p.out = outs[i];
            p.a = p.a.contiguous();
            p.K = p.q4 ? p.a.size(1) * 32 : p.a.size(1) * 2;
            p.N = p.a.size(0) * 16;
        }
        l.H = H;
        l.Hkv = Hkv;
        l.scale = scale;
        l.window = window;
        l.rope = rope;
        ropes_ = std::max(ropes_, rope + 1);
        layers_.push_back(std::move(l));
    }

    int64_t size() const { return static_cast<int64_t>(layers_.size()); }

    // Layers [start, end) over x [T, D] float32 (contiguous; the residual stream, updated in place):
    // kbufs/vbufs the layers' cache buffers [H_kv, capacity, d] (one per layer of the range), kv_start
    // where each layer writes its T rows, ropes the RoPE rows [T, 1, d/2, 2] by index. A token tree
    // passes its segments (first, stop, depth) and one key and one value stash [H_kv, T, d] per layer
    // (kangaroo.attention.rope_attend_tree); a chain passes none. As FusedEngine.run_layers with the
    // fused ops: norm, QKV, rope_attend, o, residual + norm, gate/up, SiLU gating, down, residual
    // (+ the next layer's norm). With first_out > 0 (a chain only), the last layer's rows before it
    // only write their keys and values, and only x's rows from first_out on hold its output.
    void run(torch::Tensor x, int64_t start, int64_t end, std::vector<torch::Tensor> kbufs, std::vector<torch::Tensor> vbufs,
             std::vector<int64_t> kv_start, std::vector<torch::Tensor> ropes, int64_t step_rows, std::vector<int64_t> seg_first,
             std::vector<int64_t> seg_stop, std::vector<int64_t> seg_depth, std::vector<torch::Tensor> kstash,
             std::vector<torch::Tensor> vstash, int64_t first_out) const {
        TORCH_CHECK(0 <= start && start < end && end <= size(), "LayerStack.run: layers outside the stack");
        const size_t n = static_cast<size_t>(end - start);
        TORCH_CHECK(kbufs.size() == n && vbufs.size() == n && kv_start.size() == n, "LayerStack.run: one cache per layer");
        TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "LayerStack.run: x [T, D] float32, contiguous");
        const bool tree = !seg_first.empty();
        TORCH_CHECK(!tree || (kstash.size() == n && vstash.size() == n), "LayerStack.run: a tree needs one stash per layer");
        TORCH_CHECK((int64_t)ropes.size() >= ropes_, "LayerStack.run: missing RoPE rows");
        TORCH_CHECK(0 <= first_out && first_out < x.size(0) && (first_out == 0 || !tree), "LayerStack.run: first_out outside the rows");
        if (first_out == 0 && run_region(x, start, end, kbufs, vbufs, kv_start, ropes, step_rows, seg_first, seg_stop, seg_depth, kstash, vstash))
            return;
        torch::NoGradGuard no_grad;
        torch::Tensor h = rms_norm(x, layers_[start].in_w, layers_[start].in_eps);
        for (int64_t i = start; i < end; ++i) {
            const Layer& l = layers_[i];
            const size_t j = static_cast<size_t>(i - start);
            const int64_t first = i + 1 < end ? 0 : first_out;
            const torch::Tensor qkv = l.qkv(h);
            const torch::Tensor att =
                tree ? rope_attend_tree(qkv, ropes[l.rope], kbufs[j], vbufs[j], kv_start[j], seg_first, seg_stop, seg_depth, l.H, l.Hkv,
                                        l.scale, l.window, kstash[j], vstash[j])
                     : rope_attend(qkv, ropes[l.rope], kbufs[j], vbufs[j], kv_start[j], l.H, l.Hkv, l.scale, l.window, first, step_rows);
            if (first) x = x.narrow(0, first, x.size(0) - first);  // the trailing rows: still contiguous, updated in place
            h = add_rms_norm(x, l.o(att), l.post_w, l.post_eps);
            const torch::Tensor down = l.down(silu_mul(l.gate_up(h)));
            if (i + 1 < end)
                h = add_rms_norm(x, down, layers_[i + 1].in_w, layers_[i + 1].in_eps);
            else
                x.add_(down);
        }
    }

  private:
    // A chain step's layers [start, end) over x [T, D] (T <= step_rows, at most 16 rows) in one
    // parallel region, or false where the step needs run()'s op-by-op path. Why: op by op, a one-row
    // step is ~180 parallel regions of a few microseconds each, and between them the calling thread
    // allocates, casts and dispatches (~0.9 ms of a ~4.3 ms step on 2 cores) while the other thread
    // spins (~45% of its time). Here the threads stay in one region: each keeps its own copy of the
    // residual stream and computes the norms, SiLU gating and activation preparation itself
    // (identical arithmetic on identical inputs, so identical copies), and they share out each
    // product's parts, the attention's work items and the combination of its chunks, meeting after
    // each (7 stages a layer for a chain, run_stage). Every piece is the function the op-by-op path calls (the
    // products' parts, rope_rows, decode_items, decode_combine, rms_norm_rows, add_rows, silu_rows),
    // with the same parts and plans, so every bit is that path's.
    //
    // A token tree (segments (first, stop, depth) and stashes as run() takes them) does what
    // rope_attend_tree does op by op: its rows rotated into the queries and the stashes, then segment
    // by segment the segment's keys and values written at slots pos + depth .. and its rows' attention
    // items, a barrier between a segment's items and the next segment's writes (those overwrite slots
    // the items read), and one combination over all rows: 5 + 2 x segments stages a layer.
    bool run_region(torch::Tensor& x, int64_t start, int64_t end, const std::vector<torch::Tensor>& kbufs,
                    const std::vector<torch::Tensor>& vbufs, const std::vector<int64_t>& kv_start,
                    const std::vector<torch::Tensor>& ropes, int64_t step_rows, const std::vector<int64_t>& seg_first,
                    const std::vector<int64_t>& seg_stop, const std::vector<int64_t>& seg_depth,
                    const std::vector<torch::Tensor>& kstash, const std::vector<torch::Tensor>& vstash) const {
        const int64_t T = x.size(0), D = x.size(1);
        const bool tree = !seg_first.empty();
        // a chain is one segment of all rows at depth 0, written straight into the cache
        const std::vector<int64_t> first_of = tree ? seg_first : std::vector<int64_t>{0},
                                   stop_of = tree ? seg_stop : std::vector<int64_t>{T},
                                   depth_of = tree ? seg_depth : std::vector<int64_t>{0};
        const int64_t S = static_cast<int64_t>(first_of.size()), per_layer = 5 + 2 * S;
        if (tree && (seg_stop.size() != first_of.size() || seg_depth.size() != first_of.size())) return false;
        int64_t reach = 0;  // slots past a layer's start its segments write: depth + rows, at most
        for (int64_t s = 0; s < S; ++s) {  // segments cover the rows in order (the combination's plan joins them)
            if (first_of[s] != (s ? stop_of[s - 1] : 0) || first_of[s] >= stop_of[s] || depth_of[s] < 0) return false;
            reach = std::max(reach, depth_of[s] + stop_of[s] - first_of[s]);
        }
        if (stop_of[S - 1] != T) return false;
#if !AT_PARALLEL_OPENMP
        return false;  // the region's threads must run at once (an OpenMP team), not as queued tasks
#endif
        if (!region_on.load() || T > step_rows || T > 16) return false;
        const int64_t amx_rows = linear_q4_amx_rows_get();
        int64_t kmax = D, nmax = 0, hd_max = 0, imax = 0, dmax = 0;
        for (int64_t i = start; i < end; ++i) {
            const Layer& l = layers_[i];
            const size_t j = static_cast<size_t>(i - start);
            for (const Product* p : {&l.qkv, &l.o, &l.gate_up, &l.down}) {
                if (p->int8 && amx_rows > 0 && T >= amx_rows) return false;  // AMX tiles: op by op
                kmax = std::max(kmax, p->K);
                nmax = std::max(nmax, p->N);
            }
            const int64_t d = kbufs[j].size(2);
            const bool kv16 = kbufs[j].scalar_type() == torch::kBFloat16;
            if ((kv16 && !decode_kv16_native(d)) || l.gate_up.out % 2 || l.o.K != l.H * d || l.qkv.out != (l.H + 2 * l.Hkv) * d
                || l.down.K != l.gate_up.out / 2 || !kbufs[j].is_contiguous() || !vbufs[j].is_contiguous()
                || kv_start[j] < 0 || kv_start[j] + T > kbufs[j].size(1))
                return false;
            if (tree) {  // what rope_attend_tree checks: else its error comes from the op-by-op path
                for (const torch::Tensor* st : {&kstash[j], &vstash[j]})
                    if (st->scalar_type() != kbufs[j].scalar_type() || !st->is_contiguous() || st->dim() != 3 || st->size(0) != l.Hkv
                        || st->size(1) != T || st->size(2) != d)
                        return false;
                if (kv_start[j] + reach > kbufs[j].size(1)) return false;
            }
            hd_max = std::max(hd_max, (l.H + 2 * l.Hkv + 1) * d);
            dmax = std::max(dmax, d);
            imax = std::max(imax, l.gate_up.out / 2);
        }
        // the plans, made here as the op-by-op path makes them (the thread count inside the region
        // need not be the calling thread's): each layer's attention plans, shared by key ranges, one per
        // segment for its items, and one over all rows for the combination; all index the partial
        // results with the largest chunk count (only their layout, not their arithmetic, changes)
        struct Plans {
            std::vector<DecodePlan> seg;
            DecodePlan all;
        };
        std::map<std::pair<int64_t, int64_t>, Plans> plans;
        std::vector<const Plans*> plan(end - start);
        int64_t chunks_max = 0;
        for (int64_t i = start; i < end; ++i) {
            const Layer& l = layers_[i];
            const size_t j = static_cast<size_t>(i - start);
            auto key = std::make_pair(kv_start[j], l.window);
            auto it = plans.find(key);
            if (it == plans.end()) {
                Plans ps;
                for (int64_t s = 0; s < S; ++s) {
                    auto [begins, ends] = key_ranges(kv_start[j] + depth_of[s], stop_of[s] - first_of[s], l.window);
                    ps.seg.push_back(decode_plan(stop_of[s] - first_of[s], l.H, l.Hkv, kbufs[j].size(2), begins, ends));
                }
                ps.all = ps.seg[0];  // a chain: its one plan; a tree: every row's range, the largest chunk count
                for (int64_t s = 1; s < S; ++s) {
                    const DecodePlan& p = ps.seg[s];
                    ps.all.T += p.T;
                    ps.all.nchunks = std::max(ps.all.nchunks, p.nchunks);
                    ps.all.begin.insert(ps.all.begin.end(), p.begin.begin(), p.begin.end());
                    ps.all.end.insert(ps.all.end.end(), p.end.begin(), p.end.end());
                }
                for (DecodePlan& p : ps.seg) p.nchunks = ps.all.nchunks;
                it = plans.emplace(key, std::move(ps)).first;
            }
            plan[j] = &it->second;
            chunks_max = std::max(chunks_max, it->second.all.nchunks * l.H);
        }
        std::vector<torch::Tensor> cs(ropes.size());  // the RoPE rows as rope_rows reads them: [T, d/2, 2]
        for (int64_t i = start; i < end; ++i) {
            const Layer& l = layers_[i];
            if (cs[l.rope].defined()) continue;
            const int64_t d = kbufs[i - start].size(2);
            if (ropes[l.rope].scalar_type() != torch::kFloat32 || ropes[l.rope].numel() != T * d) return false;
            cs[l.rope] = ropes[l.rope].reshape({T, d / 2, 2}).contiguous();
        }
        // shared buffers: the four products' outputs [T, N] (consecutive products write different
        // ones: a thread may start the next product while another still reads the last one's
        // output), the rotated queries and the attention output [T, H d] float32, the attention's
        // partial results
        thread_local std::vector<uint16_t> y_buf;
        thread_local std::vector<float> q_buf, att_buf, m_buf, l_buf, o_buf;
        auto grow = [](auto& v, int64_t n) { if (static_cast<int64_t>(v.size()) < n) v.resize(n); };
        grow(y_buf, 4 * T * nmax), grow(q_buf, T * hd_max), grow(att_buf, T * hd_max);
        grow(m_buf, T * chunks_max), grow(l_buf, T * chunks_max), grow(o_buf, T * chunks_max * dmax);
        // each thread's own (in floats, each piece 64-byte aligned): residual copy [T, D], norm output
        // [T, D], a product's input [T, kmax] bfloat16, its int8 blocks [T, kmax] and their scales and
        // sums [T, kmax / 32] x 3, RoPE scratch, SiLU scratch
        auto up16 = [](int64_t n) { return (n + 15) / 16 * 16; };
        const int64_t nb = up16(T * (kmax / 32));
        const int64_t off_hf = up16(T * D), off_hb = off_hf + up16(T * D), off_xq = off_hb + up16((T * kmax + 1) / 2),
                      off_dx = off_xq + up16((T * kmax + 3) / 4), off_row = off_dx + 3 * nb, off_silu = off_row + up16(hd_max),
                      per_slot = off_silu + up16(3 * imax);
        const int64_t nslots = std::max<int64_t>(1, at::get_num_threads());
        thread_local std::vector<float> slot_buf;
        grow(slot_buf, nslots * per_slot + 16);
        const int64_t n_stages = per_layer * (end - start);
        thread_local std::vector<Stage> stages;
        if (static_cast<int64_t>(stages.size()) < n_stages) stages = std::vector<Stage>(n_stages);
        for (int64_t i = 0; i < n_stages; ++i) {
            stages[i].next.store(0, std::memory_order_relaxed);
            stages[i].done.store(0, std::memory_order_relaxed);
            stages[i].arrived.store(0, std::memory_order_relaxed);
        }
        std::vector<int64_t> parts(4 * (end - start));
        for (int64_t i = start; i < end; ++i) {
            const Layer& l = layers_[i];
            const Product* ps[4] = {&l.qkv, &l.o, &l.gate_up, &l.down};
            for (int k = 0; k < 4; ++k) parts[4 * (i - start) + k] = linear_parts(ps[k]->N);
        }
        float* const xp = x.data_ptr<float>();
        uint16_t *const yq = y_buf.data(), *const yo = yq + T * nmax, *const yg = yo + T * nmax, *const yd = yg + T * nmax;
        float* const slots = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(slot_buf.data()) + 63) / 64 * 64);
        Stage* const stage0 = stages.data();  // (thread_locals named inside the region would be each thread's own)
        std::atomic<int64_t> members{0}, covered{0};
        float *const qr = q_buf.data(), *const att = att_buf.data(), *const mp = m_buf.data(), *const lp = l_buf.data(),
                     *const op = o_buf.data();
        at::parallel_for(0, nslots, 1, [&](int64_t a, int64_t b) {
            // the team: however many threads OpenMP gave the region (each covers slots [a, b))
            members.fetch_add(1, std::memory_order_acq_rel);
            covered.fetch_add(b - a, std::memory_order_acq_rel);
            spin_until([&] { return covered.load(std::memory_order_acquire) >= nslots; });
            const int64_t team = members.load(std::memory_order_acquire);
            float* const sl = slots + a * per_slot;
            float* const xs = sl;             // [T, D] this thread's residual stream
            float* const hf = sl + off_hf;    // [T, D] a norm's output
            auto* const hb = reinterpret_cast<uint16_t*>(sl + off_hb);  // [T, K] a product's input
            auto* const xq = reinterpret_cast<int8_t*>(sl + off_xq);   // [T, K] its int8 blocks
            float *const dx = sl + off_dx, *const sdx = dx + nb, *const sx = sdx + nb;  // [T, K / 32] each
            float* const row = sl + off_row;       // RoPE scratch
            float* const scratch = sl + off_silu;  // SiLU scratch
            std::memcpy(xs, xp, T * D * sizeof(float));
            // a product: its input hb made ready, then its parts shared out; its output in y
            auto product = [&](const Product& p, int64_t nparts, Stage& st, uint16_t* y) {
                p.prepare(hb, T, xq, dx, sdx, sx);
                run_stage(st, nparts, team, [&](int64_t k) { p.part(hb, T, xq, dx, sdx, sx, y, k, nparts); });
            };
            auto norm_into_hb = [&](const torch::Tensor& w, double eps) {
                rms_norm_rows(xs, D, w.data_ptr<float>(), hf, 0, T, D, static_cast<float>(eps));
                to_bf16(hf, hb, T * D);
            };
            norm_into_hb(layers_[start].in_w, layers_[start].in_eps);
            for (int64_t i = start; i < end; ++i) {
                const Layer& l = layers_[i];
                const size_t j = static_cast<size_t>(i - start);
                Stage* st = stage0 + per_layer * j;
                const int64_t* np = &parts[4 * j];
                const Plans& pl = *plan[j];
                const int64_t d = kbufs[j].size(2), Hd = l.H * d, nch = pl.all.nchunks;
                const bool kv16 = kbufs[j].scalar_type() == torch::kBFloat16;
                const int64_t cap = kbufs[j].size(1);
                auto write_segment = [&](int64_t s) {  // a segment's keys and values from the stashes into slots pos + depth ..
                    write_tree_segment(kbufs[j].data_ptr(), vbufs[j].data_ptr(), cap, kstash[j].data_ptr(), vstash[j].data_ptr(), T,
                                       l.Hkv, d, kbufs[j].element_size(), first_of[s], stop_of[s] - first_of[s],
                                       kv_start[j] + depth_of[s]);
                };
                // 1. QKV; 2. RoPE and the cache's new rows (a tree: into the stashes, then its first
                // segment's); 3. each segment's attention items (a tree: then the next segment's rows);
                // 4. their combination
                product(l.qkv, np[0], st[0], yq);
                run_stage(st[1], 1, team, [&](int64_t) {
                    if (tree) {
                        rope_rows(yq, true, l.qkv.N, 0, T, cs[l.rope].data_ptr<float>(), l.H, l.Hkv, d, qr, kstash[j].data_ptr(),
                                  vstash[j].data_ptr(), kv16, 0, T, row);
                        write_segment(0);
                    } else {
                        rope_rows(yq, true, l.qkv.N, 0, T, cs[l.rope].data_ptr<float>(), l.H, l.Hkv, d, qr, kbufs[j].data_ptr(),
                                  vbufs[j].data_ptr(), kv16, kv_start[j], cap, row);
                    }
                });
                for (int64_t s = 0; s < S; ++s) {
                    const DecodePlan& sp = pl.seg[s];
                    const int64_t f = first_of[s] * l.H * nch;
                    run_stage(st[2 + 2 * s], static_cast<int64_t>(sp.workers.size()), team, [&](int64_t w) {
                        decode_items(sp, w, qr + first_of[s] * Hd, Hd, kbufs[j].data_ptr(), vbufs[j].data_ptr(), cap * d, kv16,
                                     static_cast<float>(l.scale), mp + f, lp + f, op + f * d);
                    });
                    if (s + 1 < S) run_stage(st[3 + 2 * s], 1, team, [&](int64_t) { write_segment(s + 1); });
                }
                run_stage(st[1 + 2 * S], (T * l.H + 15) / 16, team, [&](int64_t k) {
                    decode_combine(pl.all, 16 * k, std::min<int64_t>(T * l.H, 16 * (k + 1)), mp, lp, op, att);
                });
                // 5. O, then the residual and the post-attention norm
                to_bf16(att, hb, T * Hd);
                product(l.o, np[1], st[2 + 2 * S], yo);
                add_rows(xs, yo, true, l.o.N, 0, T, D);
                norm_into_hb(l.post_w, l.post_eps);
                // 6. gate/up, then SiLU gating; 7. down, then the residual (and the next layer's norm)
                product(l.gate_up, np[2], st[3 + 2 * S], yg);
                silu_rows(yg, true, l.gate_up.N, 0, T, l.gate_up.out / 2, hb, scratch);
                product(l.down, np[3], st[4 + 2 * S], yd);
                add_rows(xs, yd, true, l.down.N, 0, T, D);
                if (i + 1 < end) norm_into_hb(layers_[i + 1].in_w, layers_[i + 1].in_eps);
            }
            if (a == 0) std::memcpy(xp, xs, T * D * sizeof(float));
        });
        region_runs.fetch_add(1);
        return true;
    }

    std::vector<Layer> layers_;
    int64_t ropes_ = 0;  // RoPE row sets the layers use (run() takes at least this many)
};

void bind_layer_stack(pybind11::module& mod) {
    pybind11::class_<LayerStack>(mod, "LayerStack")
        .def(pybind11::init<>())
        .def("add_layer", &LayerStack::add_layer)
        .def("size", &LayerStack::size)
        .def("run", &LayerStack::run, pybind11::call_guard<pybind11::gil_scoped_release>());
}
