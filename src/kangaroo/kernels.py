"""Matrix products for the step engine: the kernel, the weight dtype and row invariance.

Nearly all of a small model's decoding time on a CPU goes into products ``y = x Wᵀ`` with a handful
of rows ``x`` (one per token in the step). Which kernel is fastest for that depends on the CPU and
on torch's build, so the engine times the candidates on the machine at hand (:mod:`kangaroo.tuning`);
this module only provides them:

* ``stock``: ``F.linear`` (MKL or oneDNN, torch's own dispatch);
* ``packed``: oneDNN with the weight reordered once into its blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise``), CPU only;
* ``dpbf16``: our own bfloat16 product for CPUs with AVX512-BF16 (``csrc/linear_bf16.cpp``, in the
  module :mod:`kangaroo.attention` compiles for the machine): weights packed once into blocks of 16
  outputs, streamed in the order they are used; each output is one fixed chain of ``vdpbf16ps`` over
  K, so it is row-invariant by construction. On the AMD machine a step's products took 4.6 ms
  against oneDNN's 6.4 (``scripts/product_bench.py``, docs/ENGINE.md §3).

Kangaroo is lossless only if the target computes every token's logits the same way whether the
token is verified in a batch of ``k`` rows or decoded alone. A product kernel may sum over ``K`` in
another order for another number of rows (oneDNN does so for ``K`` above about 1,024), which moves
the last bits and can flip a near-tied argmax. So every :class:`Linear` is made **row-invariant**
before use: its row results are checked bit for bit against one-row products for every row count
the engine will ask for; a product that fails runs instead always padded to the largest row count
(one fixed shape), or failing that split along ``K`` into chunks that pass (partial products summed
in float32). The choice follows a fixed order, never a timing, so a machine computes the same bits
in every run.
"""

from __future__ import annotations

import logging

import torch
from torch.nn import functional as F

from . import attention as native  # the compiled module (built on first use): dpbf16's product

logger = logging.getLogger(__name__)

KERNELS = ("stock", "packed", "dpbf16")
#: products over a file's own quantised blocks (kangaroo.quantized), for a model loaded from GGUF:
#: the decoder layers' matrices only; the engine's other products run on dpbf16
#: q4_1 keeps bfloat16 activations for steps; q4_1_int8 computes every step as llama.cpp does (int8
#: activations, exact int32 block sums; on AMX tiles for steps of several rows where measured faster)
QUANTIZED_KERNELS = ("q4_1", "q4_1_int8")
#: largest number of rows a step engine forward passes through a product (verification of a
#: 16-node tree); row invariance is checked for every count in 1..MAX_ROWS.
MAX_ROWS = 16
_INVARIANCE: dict = {}  # (kernel, dtype, N, K, bias, device) -> mode, so each shape is checked once


def packed_available(device: torch.device | str) -> bool:
    """Whether the oneDNN prepacked product exists here (CPU builds of torch with mkldnn)."""
    return (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


#: what a kernel needs, for the errors that refuse it
REQUIRES = {"packed": "a CPU build of torch with oneDNN", "dpbf16": "a CPU with AVX512-BF16",
            "q4_1": "a CPU with AVX512-BF16 and a model loaded from a GGUF file with Q4_1 layers",
            "q4_1_int8": "a CPU with AVX512-BF16 and AVX512-VNNI and a model loaded from a GGUF file with Q4_1 layers"}


def dpbf16_available(device: torch.device | str) -> bool:
    """Whether our AVX512-BF16 product runs here: on a CPU whose compiled module (built on first use
    with ``-march=native``, ~80–100 s once per machine) has it, i.e. where the CPU has AVX512-BF16."""
    if torch.device(device).type != "cpu":
        return False
    module = native.load()
    return module is not None and bool(module.linear_bf16_available())


def kernel_available(kernel: str, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether ``kernel`` can run products of weight ``dtype`` on ``device``."""
    if kernel == "packed":
        return packed_available(device)
    if kernel in ("dpbf16", "q4_1"):  # q4_1 also needs the model's Q4_1 blocks (kangaroo.quantized)
        return dtype == torch.bfloat16 and dpbf16_available(device)
    if kernel == "q4_1_int8":
        return dtype == torch.bfloat16 and dpbf16_available(device) and bool(native.load().linear_q4_int8_available())
    return kernel == "stock"


class Linear:
    """``y = x Wᵀ + b`` on one kernel, in one weight dtype, row-invariant (see the module doc).

    Args:
        weight: ``[N, K]`` (any dtype; converted to ``dtype`` and, for ``packed``, reordered once).
        bias: ``[N]`` or None.
        dtype: the dtype inputs are cast to and outputs come in.
        kernel: one of :data:`KERNELS`.
        check: make the product row-invariant (False only for products that never see a batch of
            steps, e.g. training).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, kernel: str,
                 check: bool = True) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}" + (" for a dense weight" if kernel in QUANTIZED_KERNELS else ""))
        if not kernel_available(kernel, dtype, weight.device):
            raise ValueError(f"the {kernel} kernel cannot run {str(dtype).removeprefix('torch.')} products here"
                             + (f" (it needs {REQUIRES[kernel]})" if kernel in REQUIRES else ""))
        self.dtype, self.kernel, self.device = dtype, kernel, weight.device
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        # dpbf16 adds the bias in float32, over the weight's rows padded to a multiple of 16
        self.bias_f32 = None if bias is None else F.pad(self.bias.float(), (0, -self.out_features % 16)).contiguous()
        self.chunks = [(0, self.in_features, self._prepare(weight))]  # (k0, k1, weight) along K
        self.pad_to = 0  # > 0: always run with this many rows
        if check:
            self._make_row_invariant(weight)

    def _prepare(self, w: torch.Tensor) -> torch.Tensor:
        if self.kernel == "packed":
            return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), MAX_ROWS)
        if self.kernel == "dpbf16":  # [N, K] -> [N/16, K/2, 16, 2], N padded to 16 and K to 2 with zeros
            N, K = w.shape
            w = F.pad(w, (0, K % 2, 0, -N % 16))
            return w.view(w.shape[0] // 16, 16, w.shape[1] // 2, 2).permute(0, 2, 1, 3).contiguous()
        return w.contiguous()

    def _product(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kernel == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [None], "")
        if self.kernel == "dpbf16":
            if x.shape[1] % 2:
                x = F.pad(x, (0, 1))
            y = native.linear_bf16(x, w, None if bias is None else self.bias_f32)
            return y if y.shape[1] == self.out_features else y[:, :self.out_features]
        return F.linear(x, w, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[M, K]`` (any float dtype) -> ``[M, N]`` in :attr:`dtype`."""
        x = x.to(self.dtype)
        rows = x.shape[0]
        if self.pad_to and rows < self.pad_to:
            x = torch.cat([x, x.new_zeros(self.pad_to - rows, x.shape[1])])
        if len(self.chunks) == 1:
            y = self._product(x, self.chunks[0][2], self.bias)
        else:  # split along K: partial products summed in float32, bias last
            y = sum(self._product(x[:, k0:k1], w, None).float() for k0, k1, w in self.chunks)
            y = (y if self.bias is None else y + self.bias).to(self.dtype)
        return y[:rows] if self.pad_to and rows < self.pad_to else y

    def native(self) -> tuple | None:
        """This product as the compiled layer loop takes it (``csrc/layer_stack.cpp``):
        ``(packed weights, an empty tensor, float32 bias or an empty tensor, out_features)``, or None
        where it runs some other way (another kernel, split along K, padded rows, odd K)."""
        if self.kernel != "dpbf16" or len(self.chunks) != 1 or self.pad_to or self.in_features % 2:
            return None
        empty = torch.empty(0)
        return self.chunks[0][2], empty, empty if self.bias_f32 is None else self.bias_f32, self.out_features

    # ------------------------------------------------------------------ row invariance
    def _make_row_invariant(self, weight: torch.Tensor) -> None:
        key = (self.kernel, self.dtype, self.out_features, self.in_features, self.bias is not None, weight.device.type)
        mode = _INVARIANCE.get(key)
        if mode is None:
            mode = self._find_invariant_mode(weight)
            _INVARIANCE[key] = mode
            if mode != ("direct", 0):
                logger.info("%s %s product [%d x %d]: rows vary with the row count; using %s",
                            self.kernel, str(self.dtype).removeprefix("torch."), self.out_features, self.in_features, mode)
        self._apply(weight, mode)

    def _apply(self, weight: torch.Tensor, mode: tuple[str, int]) -> None:
        kind, n = mode
        self.pad_to = n if kind == "pad" else 0
        if kind == "split":
            size = self.in_features // n
            self.chunks = [(k0, k0 + size, self._prepare(weight[:, k0:k0 + size])) for k0 in range(0, self.in_features, size)]
        else:
            self.chunks = [(0, self.in_features, self._prepare(weight))]

    def _find_invariant_mode(self, weight: torch.Tensor) -> tuple[str, int]:
        """The first row-invariant way to run this product, in a fixed order: as is, padded to
        :data:`MAX_ROWS` rows, split along K. The order is fixed (not timed) so that the same machine
        always computes the same bits, run after run."""
        K = self.in_features
        candidates = [("direct", 0), ("pad", MAX_ROWS)]
        candidates += [("split", n) for n in (2, 3, 4, 6, 8) if K % n == 0 and (K // n) % 16 == 0]
        for mode in candidates:
            self._apply(weight, mode)
            if row_invariant(self):
                return mode
        raise RuntimeError(f"no row-invariant {self.kernel} product found for a [{self.out_features} x {K}] weight")


def row_invariant(fn, in_features: int | None = None, max_rows: int = MAX_ROWS, trials: int = 3) -> bool:
    """Whether ``fn`` (``[M, K] -> [M, N]``) gives every row the same bits for M = 1..``max_rows``,
    wherever the row sits among the others.

    The kernels' order of summation does not depend on the values, so random rows decide it, but
    rows of similar magnitude hide a changed order behind rounding (a bfloat16 output rounds most
    such differences away). The rows are therefore spread over 2^±12 in magnitude, so that sums
    cancel and any other order shows in the leading bits.
    """
    K = in_features or fn.in_features
    device = getattr(fn, "device", "cpu")
    with torch.no_grad():
        for seed in range(trials):
            gen = torch.Generator().manual_seed(seed)
            scale = torch.exp2(torch.randint(-12, 13, (max_rows, K), generator=gen).float())
            x = (torch.randn(max_rows, K, generator=gen) * scale).to(device)
            alone = torch.cat([fn(x[i:i + 1]) for i in range(max_rows)])
            for m in range(2, max_rows + 1):
                if not torch.equal(fn(x[:m]), alone[:m]):
                    return False
            if not torch.equal(fn(torch.flip(x, dims=[0])), torch.flip(alone, dims=[0])):
                return False
    return True
