// A range of decoder layers in one call: the step engine's per-layer loop (kangaroo/engine.py,
// FusedEngine.run_layers) moved out of Python, calling the same compiled products and small ops in
// the same order, so every bit is what the Python loop gives. A layer is ~8 calls; from Python each
// costs a few microseconds of argument parsing, attribute lookups and dtype casts, 0.3-0.5 ms of a
// 30-layer step of ~4-7 ms (docs/ENGINE.md §2). Here they cost what the ops themselves cost.
//
// The weights are registered once per layer (add_layer); a call passes what changes per step: the
// residual stream, the layers' cache buffers and write positions, and the RoPE rows.

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
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
