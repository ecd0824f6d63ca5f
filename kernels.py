"""CPU matmul kernels for linear layers: which of MKL (as x W^T or W x^T) or oneDNN computes a product.

model.py builds every linear layer of the decoder as `Linear`; nothing here changes what is computed, only
which kernel sums the same products (so outputs agree to float rounding). On GPUs, under autocast and for
bf16 weights, `Linear` is nn.Linear.
"""

import os
import platform
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
#
# A CPU linear layer can run through three kernels that form the same products and sum them in other
# orders, so their outputs agree to float rounding: MKL's GEMM as x W^T (nn.Linear), MKL's GEMM with the
# weight as the left operand, W x^T, and oneDNN's matmul. Which one is fastest depends on the CPU, not only
# on the shapes: MKL picks its code by CPU vendor (on an AMD EPYC it computes at about half of oneDNN's rate,
# and streams a weight multiplied by 2 rows ~3x faster as W x^T than as x W^T; on an Intel Xeon that W x^T
# halves the speed), while oneDNN picks its code by instruction set. So:
# - a decode step (at most FEW_ROWS rows, no autograd) is bound by reading the weights, and each
#   (out, in, rows) takes the kernel measured fastest on this machine, once per process (oneDNN unless
#   another is 10% faster: a measurement on a busy machine is noisy);
# - everything else (prefill, log-probs, training) computes enough per weight byte that oneDNN is the
#   kernel on x86 CPUs, with the backward below, unless the product is too small to pay for its call;
#   elsewhere nn.Linear's F.linear.
# CPU_KERNEL (env T2I_R1_CPU_KERNEL) pins one kernel for every CPU linear layer: tests use it, and so can a
# run that must give the same bits in every process (measurements may pick differently in another process
# when two kernels are about as fast). All of this is float32: under CPU autocast every layer takes F.linear,
# the one autocast knows, and computes in bf16 as it would on a GPU.


def _x_wt(x, w, b):
    return F.linear(x, w, b)


def _w_xt(x, w, b):
    y = (w @ x.reshape(-1, x.shape[-1]).t()).t().contiguous()  # (rows, out)
    y = y.view(*x.shape[:-1], w.shape[0])
    return y if b is None else y + b


def _onednn(x, w, b):  # the kernel torch.compile itself emits for CPU linear layers whose weights it freezes
    if torch.compiler.is_compiling():
        return _onednn_in_graph(x, w, b)
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


# inductor lowers mkldnn._linear_pointwise only with frozen (constant) weights; wrapped as an op of our own,
# a compiled graph calls it as it is
@torch.library.custom_op("t2i_r1::onednn_linear", mutates_args=())
def _onednn_in_graph(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@_onednn_in_graph.register_fake
def _(x, w, b):
    return x.new_empty(*x.shape[:-1], w.shape[0])


CPU_KERNELS = {"x W^T": _x_wt, "W x^T": _w_xt, "oneDNN": _onednn}
CPU_KERNEL = os.environ.get("T2I_R1_CPU_KERNEL") or None
FEW_ROWS = 16        # a decode step of up to 8 prompts with guidance
_fastest = {}        # (out, in, rows, dtype) -> kernel name, measured once per process


# oneDNN's matmul is used on x86 CPUs only (elsewhere it may exist without fast kernels behind it)
ONEDNN = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
          and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def measure_kernels(x, w, b, tries=7) -> dict:
    """Seconds per call of each CPU kernel on these arguments, the best of `tries` (a busy machine only ever
    adds time), kernels interleaved. A weight of 1 MiB or more is first evicted from the caches by reading
    128 MiB of other memory, as a decode step finds it (every layer's weights stream through the caches
    between two uses of one)."""
    kernels = {k: f for k, f in CPU_KERNELS.items() if k != "oneDNN" or ONEDNN}
    evict = torch.ones(2**25) if w.numel() * w.element_size() >= 2**20 else None  # more than last-level caches
    best = {k: float("inf") for k in kernels}
    for f in kernels.values():  # first calls build kernels and workspaces
        f(x, w, b)
    for _ in range(tries):
        for k, f in kernels.items():
            if evict is not None:
                evict.sum()
            t0 = time.perf_counter()
            f(x, w, b)
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


class _OneDNNLinear(torch.autograd.Function):
    """x W^T + b through oneDNN, backward too (the op has no autograd formula of its own)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _onednn(x, w, b)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gy2, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])  # (rows, out), (rows, in)
        gx = _onednn(gy2, w.t(), None).view(x.shape) if ctx.needs_input_grad[0] else None  # gy W
        gw = _onednn(gy2.t(), x2.t(), None) if ctx.needs_input_grad[1] else None            # gy^T x
        gb = gy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) whose CPU matmul kernel is chosen as described above."""

    def forward(self, x):
        w, b = self.weight, self.bias
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # autocast knows F.linear (it computes in bf16 from cached casts of trainable weights) but not
            # our kernels, which would compute and return float32
            return F.linear(x, w, b)
        if (x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or x.numel() == 0
                or type(w) not in (nn.Parameter, torch.Tensor)):
            return F.linear(x, w, b)  # GPUs, bf16, FSDP's sharded tensors
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b))
        rows = x.numel() // x.shape[-1]
        kernel = CPU_KERNEL
        if kernel is None and rows <= FEW_ROWS and not grad:
            key = (w.shape[0], w.shape[1], rows, x.dtype)
            if key not in _fastest and not torch.compiler.is_compiling():  # a compiled step takes eager's choice
                times = measure_kernels(x, w, b)
                best = min(times, key=times.get)
                # near-ties go to oneDNN, so that timing noise does not decide them
                _fastest[key] = best if times[best] < 0.9 * times.get("oneDNN", float("inf")) else "oneDNN"
            kernel = _fastest.get(key)
        if kernel is None:
            # below ~1M multiply-adds oneDNN's fixed cost per call (~10 us) outweighs its faster arithmetic
            kernel = "oneDNN" if ONEDNN and rows * w.numel() >= 2**20 else "x W^T"
        if kernel == "oneDNN" and grad:
            return _OneDNNLinear.apply(x, w, b)
        return CPU_KERNELS[kernel](x, w, b)
