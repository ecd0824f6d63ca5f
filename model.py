"""Janus-Pro's generation path from scratch: a LLaMA decoder with a text head and an image head.

Text tokens enter through `embed_tokens` and leave through `lm_head`; image tokens (VQ codes) enter as
`gen_aligner(gen_embed(code))` and leave through `gen_head`, both around the same decoder. The VQ-16
tokenizer lives in vq.py and hangs off the model as `janus.vq`.

Also here: the static KV cache, the tokenizer (tokenizer.json through `tokenizers`) with the deepseek chat
format, and checkpoint loading/saving for the published layouts (deepseek's original keys, which our
module names follow, and the transformers-converted keys, renamed on load).

Departures from the reference code:
- only the generation path: the understanding tower (SigLIP + aligner) is not built; its tensors in a
  checkpoint are skipped on load, and `save_like` carries them over unchanged when it writes a trained one;
- rotary angles are computed from the positions on the fly (no cached tables, no length limit);
- a padded query row attends to itself so that left-padded batches never produce NaN (the reference
  relies on the same trick inside transformers' mask code);
- `text_logits`/`image_logits` compute in float32 (a bf16 product rounds logits of size ~10 by up to 0.03),
  except in decode steps, which sample from the compute dtype's product as Janus-Pro's own sampler does;
- under autocast every weight enters the compute in autocast's dtype, norms and embeddings included, so a
  model with float32 master weights computes exactly what the same model held in bf16 computes;
- on CPU, linear layers pick their matmul kernel (MKL as x W^T or W x^T, or oneDNN) by measuring, per
  shape, in a decode step, and take oneDNN elsewhere (`Linear`).
"""

import argparse
import contextlib
import fcntl
import inspect
import json
import os
import platform
import re
import shutil
import time
from dataclasses import MISSING, dataclass, field, fields, is_dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from torch.utils.checkpoint import checkpoint

from vq import VQConfig, VQModel

# -----------------------------------------------------------------------------
# config


@dataclass
class JanusConfig:
    vocab_size: int = 102400
    n_layer: int = 24
    n_head: int = 16
    n_kv_head: int = 16
    n_embd: int = 2048
    intermediate_size: int = 5632
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 16384  # bookkeeping only: rotary angles are computed, not tabled
    tie_word_embeddings: bool = False    # Janus-Pro has a separate lm_head
    vq: VQConfig = field(default_factory=VQConfig)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def image_tokens(self) -> int:
        return self.vq.num_tokens

    def __post_init__(self):
        if isinstance(self.vq, dict):
            self.vq = VQConfig(**self.vq)
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd {self.n_embd}, n_head {self.n_head}, n_kv_head {self.n_kv_head}: "
                             "heads must divide n_embd and kv heads must divide heads")


PRESETS = {
    "janus-pro-1b": dict(n_layer=24, n_head=16, n_kv_head=16, n_embd=2048, intermediate_size=5632),
    "janus-pro-7b": dict(n_layer=30, n_head=32, n_kv_head=32, n_embd=4096, intermediate_size=11008),
    # tests and CPU runs: grouped-query attention on purpose, so that path is exercised too
    "tiny": dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=176,
                 vq=dict(image_size=32, codebook_size=64, ch=32, encoder_ch_mult=(1, 1, 2),
                         decoder_ch_mult=(1, 1, 2), z_channels=32, num_res_blocks=1)),
}


def preset(name: str, **overrides) -> JanusConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return JanusConfig(**{**PRESETS[name], **overrides})


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: the description as written, and every flag's default after its help line."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default is argparse.SUPPRESS or not action.option_strings:
            return action.help
        return f"{action.help} (default: {'unset' if action.default is None else '%(default)s'})"


def config_flags(parser, cls, choices=None, given_only=False, aliases=None):
    """A command-line flag per field of a dataclass config (TrainConfig, SamplingConfig, PretrainConfig):
    --field-name, typed as the field, its help the field's trailing comment and its default. given_only:
    parse_args returns only the flags given (a resumed run lays them over its saved config). aliases:
    {field: extra flag}."""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    for f in fields(cls):
        if is_dataclass(f.type):  # a nested config (TrainConfig.sampling) brings its own flags
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        flags = ["--" + f.name.replace("_", "-")] + ([aliases[f.name]] if f.name in (aliases or {}) else [])
        kind = (dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(nargs="*") if f.type is list
                else dict(type=f.type, choices=(choices or {}).get(f.name)))
        parser.add_argument(*flags, default=argparse.SUPPRESS if given_only else default, **kind,
                            help=f"{comments.get(f.name, '')} (default: {'unset' if default is None else default})")


# LLaMA's defaults complete the partial `language_config` of the published config.json
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                      max_position_embeddings=2048, tie_word_embeddings=False, hidden_act="silu")
VQ_PARAMS = [f.name for f in fields(VQConfig)]


def _from_llama(lc: dict, vq: VQConfig, where: str) -> JanusConfig:
    lc = {**LLAMA_DEFAULTS, **{k: v for k, v in lc.items() if v is not None}}
    for key, ok in [("hidden_act", lambda v: v == "silu"), ("rope_scaling", lambda v: not v),
                    ("attention_bias", lambda v: not v), ("mlp_bias", lambda v: not v)]:
        if key in lc and not ok(lc[key]):
            raise ValueError(f"{where}: {key}={lc[key]!r} is not supported (Janus-Pro uses plain LLaMA)")
    return JanusConfig(
        vocab_size=lc["vocab_size"], n_layer=lc["num_hidden_layers"], n_head=lc["num_attention_heads"],
        n_kv_head=lc.get("num_key_value_heads") or lc["num_attention_heads"], n_embd=lc["hidden_size"],
        intermediate_size=lc["intermediate_size"], rope_theta=float(lc["rope_theta"]),
        rms_norm_eps=lc["rms_norm_eps"], max_position_embeddings=lc["max_position_embeddings"],
        tie_word_embeddings=bool(lc["tie_word_embeddings"]), vq=vq)


def config_from_dict(d: dict, where: str = "config.json") -> JanusConfig:
    """Parse a published config.json: deepseek's original layout or the transformers-converted one."""
    if "language_config" in d:  # deepseek original
        params = dict((d.get("gen_vision_config") or {}).get("params") or {})
        vq = dict(codebook_size=params.pop("image_token_size", 16384), codebook_embed_dim=params.pop("n_embed", 8))
        vq.update({k: params[k] for k in VQ_PARAMS if k in params})
        cfg = _from_llama(d["language_config"], VQConfig(**vq), where)
        head = (d.get("gen_head_config") or {}).get("params") or {}
        aligner = (d.get("gen_aligner_config") or {}).get("params") or {}
        checks = [("gen_head_config.params.n_embed", head.get("n_embed"), cfg.n_embd),
                  ("gen_head_config.params.image_token_embed", head.get("image_token_embed"), cfg.n_embd),
                  ("gen_head_config.params.image_token_size", head.get("image_token_size"), cfg.vq.codebook_size),
                  ("gen_aligner_config.params.input_dim", aligner.get("input_dim"), cfg.vq.codebook_embed_dim),
                  ("gen_aligner_config.params.n_embed", aligner.get("n_embed"), cfg.n_embd),
                  ("gen_aligner_config.params.depth", aligner.get("depth"), 2)]
        for name, got, want in checks:
            if got is not None and got != want:
                raise ValueError(f"{where}: {name} = {got}, but this implementation needs {want}")
        return cfg
    if "text_config" in d and "vq_config" in d:  # transformers' JanusConfig
        v, vis = d["vq_config"], d.get("vision_config") or {}
        mult = tuple(v.get("channel_multiplier", (1, 1, 2, 2, 4)))
        grid = vis.get("image_size", 384) // vis.get("patch_size", 16)  # transformers ties the VQ grid to it
        vq = VQConfig(image_size=grid * 2 ** (len(mult) - 1), codebook_size=v.get("num_embeddings", 16384),
                      codebook_embed_dim=v.get("embed_dim", 8), ch=v.get("base_channels", 128),
                      encoder_ch_mult=mult, decoder_ch_mult=mult, z_channels=v.get("latent_channels", 256),
                      num_res_blocks=v.get("num_res_blocks", 2))
        tc = dict(d["text_config"])
        tc.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", False))
        return _from_llama(tc, vq, where)
    raise ValueError(f"{where}: neither a deepseek Janus config (language_config) nor a transformers "
                     "JanusConfig (text_config + vq_config)")


def config_to_dict(cfg: JanusConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The published (deepseek original) config.json layout. VQ sizes are written only where they differ
    from VQ-16, so a full-size model's file reads exactly like Janus-Pro's."""
    default_vq = VQConfig()
    vq_params = {"image_token_size": cfg.vq.codebook_size, "n_embed": cfg.vq.codebook_embed_dim}
    for k in VQ_PARAMS:
        if k not in ("codebook_size", "codebook_embed_dim") and getattr(cfg.vq, k) != getattr(default_vq, k):
            val = getattr(cfg.vq, k)
            vq_params[k] = list(val) if isinstance(val, tuple) else val
    H = cfg.n_embd
    return {
        "model_type": "multi_modality",
        "torch_dtype": str(dtype).removeprefix("torch."),
        "language_config": {
            "hidden_size": H, "intermediate_size": cfg.intermediate_size,
            "max_position_embeddings": cfg.max_position_embeddings, "model_type": "llama",
            "num_attention_heads": cfg.n_head, "num_hidden_layers": cfg.n_layer,
            "num_key_value_heads": cfg.n_kv_head, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "torch_dtype": str(dtype).removeprefix("torch."), "vocab_size": cfg.vocab_size},
        # the understanding path is not part of this implementation; its config is kept so that
        # deepseek's own classes can still build the model from our folders
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
                          "params": {"image_size": 384, "model_name": "siglip_large_patch16_384",
                                     "select_feature": "same", "select_layer": -1}},
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                           "params": {"depth": 2, "input_dim": 1024, "n_embed": H, "projector_type": "mlp_gelu"}},
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": vq_params},
        "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner",
                               "params": {"depth": 2, "input_dim": cfg.vq.codebook_embed_dim, "n_embed": H,
                                          "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                            "params": {"image_token_embed": H, "image_token_size": cfg.vq.codebook_size,
                                       "n_embed": H}},
    }


# -----------------------------------------------------------------------------
# the decoder


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32, scale in the input dtype: the order transformers' LLaMA uses. The weight is
        # cast too, so float32 master weights under autocast keep a bf16 stream bf16, as bf16 weights do
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * x.to(dtype)


def rotary(positions, head_dim, theta):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim) in float32, rotate-half layout (LLaMA HF weights)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)      # (B, T, head_dim)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x, cos, sin):  # x (B, nh, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def compute_dtype(device, default: torch.dtype) -> torch.dtype:
    """The dtype layers compute in on this device: autocast's when it is on there, else `default` (the
    weights' own)."""
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else default


class KVCache:
    """Static cache: keys and values of every layer, preallocated for (batch, max_len) and written by slot.

    Rows of a left-padded batch share slot numbers; which slots hold real tokens is the caller's `mask`.
    The buffers never change shape, so a compiled decode step sees the same graph at every position. Each
    layer has buffers of its own rather than a slice of one big tensor: torch.compile writes a step's
    keys into a buffer it was given in place, but into a slice of one only by copying the whole buffer.
    """

    def __init__(self, cfg: JanusConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self._mark_static()

    def _mark_static(self):
        if hasattr(torch, "_dynamo"):  # lets CUDA graphs treat the buffers as fixed addresses
            for t in self.k + self.v:
                # unguarded, as later torch releases default to: a guard on the tensor itself (older
                # releases' default) would recompile the step for every new cache, every sampling call
                torch._dynamo.mark_static_address(t, guard=False)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer, input_pos, k, v):  # k, v (B, n_kv, T, hd) written at slots input_pos (T,)
        self.k[layer].index_copy_(2, input_pos, k)
        self.v[layer].index_copy_(2, input_pos, v)
        return self.k[layer], self.v[layer]

    def repeat_rows(self, n: int) -> "KVCache":
        """A new cache whose row i*n + j is row i of this one: prefill a prompt once, sample n times."""
        new = KVCache.__new__(KVCache)
        new.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        new.v = [t.repeat_interleave(n, dim=0) for t in self.v]
        new._mark_static()
        return new


# -----------------------------------------------------------------------------
# linear layers on CPU: which matmul kernel
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


def float32_logits(head: nn.Linear, h, chunk_bytes=2**28):
    """A head's logits in float32. Under autocast the weight and h are first rounded to its dtype, as every
    other layer sees them, and the product is then formed in float32: a bf16 product would round logits of
    size ~10 by up to 0.03 (log-probs off by up to 0.09 nats), while the same rounding of the inputs lets a
    bf16 copy of the model (the KL reference) give exactly the logits of its float32 master weights. The
    weight goes to float32 a block of rows at a time, so no float32 copy of a whole head (1.7 GB for
    Janus-Pro-7B's text head) is ever made."""
    if not torch.is_autocast_enabled(h.device.type):
        return head(h).float()
    dtype = torch.get_autocast_dtype(h.device.type)
    w, b, x = head.weight, head.bias, h.to(dtype).float()
    rows = max(1, chunk_bytes // (4 * w.shape[1]))
    with torch.autocast(h.device.type, enabled=False):
        return torch.cat([F.linear(x, w[i:i + rows].to(dtype).float(),
                                   None if b is None else b[i:i + rows].to(dtype).float())
                          for i in range(0, w.shape[0], rows)], -1)


class Attention(nn.Module):
    def __init__(self, cfg: JanusConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache=None, layer=0, input_pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, input_pos, k, v)                        # (B, nkv, max_len, hd)
            S = attn_mask.shape[-1]  # the slots this call attends to: all, or the filled head (kv_len)
            k, v = k[:, :, :S], v[:, :, :S]                                    # (B, nkv, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: JanusConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: JanusConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask, cache=None, layer=0, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, layer, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Janus(nn.Module):
    """Attribute names follow deepseek's checkpoint keys (language_model.model.layers.N..., gen_head...)."""

    def __init__(self, cfg: JanusConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        self.language_model = nn.ModuleDict(dict(
            model=nn.ModuleDict(dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                norm=RMSNorm(cfg.n_embd, cfg.rms_norm_eps))),
            lm_head=Linear(cfg.n_embd, cfg.vocab_size, bias=False)))
        if cfg.tie_word_embeddings:
            self.language_model.lm_head.weight = self.language_model.model.embed_tokens.weight
        self.gen_vision_model = VQModel(cfg.vq)
        self.gen_embed = nn.Embedding(cfg.vq.codebook_size, cfg.vq.codebook_embed_dim)
        self.gen_aligner = nn.Module()
        self.gen_aligner.layers = nn.Sequential(
            Linear(cfg.vq.codebook_embed_dim, cfg.n_embd), nn.GELU(), Linear(cfg.n_embd, cfg.n_embd))
        self.gen_head = nn.Module()
        self.gen_head.output_mlp_projector = Linear(cfg.n_embd, cfg.n_embd)
        self.gen_head.vision_head = Linear(cfg.n_embd, cfg.vq.codebook_size)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """GPT-style init for training from scratch (shapes world); loading overwrites it."""
        for name, p in self.named_parameters():
            if name.startswith("gen_vision_model."):
                continue  # the VQ keeps torch's conv init; it is trained on its own
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)

    @property
    def vq(self) -> VQModel:
        return self.gen_vision_model

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    # --- inputs and outputs
    def embed_text(self, ids):   # (B, T) -> (B, T, H)
        e = self.language_model.model.embed_tokens(ids)  # autocast leaves embeddings in the table's dtype
        return e.to(compute_dtype(e.device, e.dtype))

    def embed_image(self, codes):  # (B, T) -> (B, T, H)
        e = self.gen_embed(codes)
        return self.gen_aligner.layers(e.to(compute_dtype(e.device, e.dtype)))

    # float32=False (decode steps): the product in the compute dtype, cast; float32 takes a float32 copy of the
    # head's weight (in blocks), which would add ~10% to the bytes a bandwidth-bound image decode step reads
    def text_logits(self, h, float32=True):    # (B, T, H) -> (B, T, vocab) float32
        head = self.language_model.lm_head
        return float32_logits(head, h) if float32 else head(h).float()

    def image_logits(self, h, float32=True):   # (B, T, H) -> (B, T, codebook) float32
        head = self.gen_head
        x = F.gelu(head.output_mlp_projector(h))
        return float32_logits(head.vision_head, x) if float32 else head.vision_head(x).float()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A cache in the compute dtype: autocast's (bf16 over float32 master weights), else the weights'."""
        p = self.language_model.lm_head.weight
        return KVCache(self.cfg, batch, max_len, device=p.device, dtype=compute_dtype(p.device, p.dtype))

    def forward(self, x, positions=None, mask=None, cache=None, input_pos=None, kv_len=None):
        """x (B, T, H) embeddings -> final-normed hidden states (B, T, H).

        mask: (B, S) bool, True where a key slot holds a real token (False for left padding), with S = T
            without a cache and S = cache.max_len with one. None means every slot is real.
        cache, input_pos: a KVCache and the (T,) slots where this call's keys and values are written.
        kv_len: with a cache, attend to its first kv_len slots only (they must include input_pos): eager
            decoding then skips the empty tail of the cache. None attends to every slot, the static shape
            a compiled step needs.
        positions: (B, T) rotary positions; by default counted from each row's first real token.
        """
        B, T, _ = x.shape
        if cache is None:
            input_pos = torch.arange(T, device=x.device)
        elif input_pos is None:
            raise ValueError("a cache needs input_pos, the slots this call writes")
        if positions is None:
            if mask is None:
                positions = input_pos.expand(B, T)
            else:
                positions = (mask.long().cumsum(1) - 1).clamp(min=0)[:, input_pos]
        attn_mask = None
        if mask is not None or cache is not None:
            S = T if cache is None else kv_len or cache.max_len
            slots = torch.arange(S, device=x.device)
            attn_mask = slots <= input_pos[:, None]                                    # (T, S) causal
            if mask is not None:
                # a padded query sees itself, so no softmax row is empty (an empty row gives NaN)
                attn_mask = (attn_mask & mask[:, None, :S]) | (slots == input_pos[:, None])  # (B, T, S)
            attn_mask = attn_mask.unsqueeze(-3)                                        # (B|1, 1, T, S)
        cos, sin = rotary(positions, self.cfg.head_dim, self.cfg.rope_theta)
        lm = self.language_model.model
        for i, layer in enumerate(lm.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attn_mask, cache, i, input_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, cache, i, input_pos)
        return lm.norm(x)

    def n_params(self, trainable_only=False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # --- checkpoints
    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "Janus":
        """Load a local Janus-Pro folder (any published layout). Default precision: bf16 on GPU, fp32 on CPU."""
        device = default_device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        path = os.path.expanduser(path)  # "~/models/Janus-Pro-1B" as written in a shell
        cfg = load_config(path)
        with torch.device("meta"):
            model = cls(cfg)
        state = load_state_dict(path, model, device=device, dtype=dtype)
        model.load_state_dict(state, assign=True, strict=True)
        if cfg.tie_word_embeddings:  # assign replaced the shared tensor: share it again
            model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
        return model.eval()

    def export_state(self) -> dict:
        """The tensors a checkpoint holds, under their published names: adapters (train.LoRALinear) merged,
        torch.compile's prefix dropped."""
        state = {k.replace("_orig_mod.", ""): v for k, v in self.state_dict().items() if ".lora_" not in k}
        for name, module in self.named_modules():
            if hasattr(module, "merged_weight"):
                state[name.replace("_orig_mod.", "") + ".weight"] = module.merged_weight()
        return state

    def save_pretrained(self, folder, tokenizer=None, weights="safetensors", shards=1, state=None):
        """Write config.json + weights in deepseek's original layout (+ tokenizer files).

        weights: "safetensors" (model.safetensors) or "bin" (pytorch_model.bin, as Janus-Pro ships);
        shards > 1 writes the sharded form with its index, as Janus-Pro-7B ships. state: the tensors to
        write instead of this module's own (e.g. gathered from FSDP shards).
        """
        folder = os.path.expanduser(folder)
        os.makedirs(folder, exist_ok=True)
        state = self.export_state() if state is None else state
        dtype = state["language_model.model.embed_tokens.weight"].dtype
        write_json(os.path.join(folder, "config.json"), config_to_dict(self.cfg, dtype))
        if self.cfg.tie_word_embeddings:  # stored once, as tied checkpoints are
            state = {k: v for k, v in state.items() if k != "language_model.lm_head.weight"}
        save_state_dict(state, folder, weights=weights, shards=shards)
        if tokenizer is not None:
            tokenizer.save(folder)


# -----------------------------------------------------------------------------
# checkpoint files

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")
UNDERSTANDING_PREFIXES = ("vision_model.", "aligner.", "model.vision_model.", "model.aligner.")
# transformers' names -> deepseek's (ours); applied in order, first match on the prefix
CONVERTED_PREFIXES = [
    ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
    ("model.generation_embeddings.", "gen_embed."), ("model.generation_aligner.fc1.", "gen_aligner.layers.0."),
    ("model.generation_aligner.hidden_layers.0.", "gen_aligner.layers.2."),
    ("model.generation_head.proj_out.", "gen_head.output_mlp_projector."),
    ("model.generation_head.vision_head.", "gen_head.vision_head."), ("model.vqmodel.", "gen_vision_model.")]
CONVERTED_VQ_PARTS = [("encoder.down.", "encoder.conv_blocks."), ("decoder.up.", "decoder.conv_blocks."),
                      (".block.", ".res."), ("mid.block_1.", "mid.0."), ("mid.attn_1.", "mid.1."),
                      ("mid.block_2.", "mid.2.")]


class CheckpointError(ValueError):
    pass


def default_device(device=None) -> torch.device:
    """The device asked for, else CUDA when present, else the CPU. ValueError for a name torch does not know
    (`cdua`) or a GPU this torch cannot see, instead of a traceback at the first tensor put there."""
    if device is None or isinstance(device, torch.device):
        return device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name torch knows (cpu, cuda, cuda:1, mps, ...)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        why = "was built without CUDA" if torch.version.cuda is None else "sees no GPU"
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) {why}; use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return d


@contextlib.contextmanager
def atomic(path):
    """Yield a temporary name to write path under; renamed over path once whole. On any error (a full disk, a
    Ctrl-C) the partial file is removed: path is the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """obj as indented JSON at path, written atomically."""
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def read_json(path):
    """A JSON file; a torn or invalid one is a ValueError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): a torn write? delete it or rerun what wrote it") from None


def load_config(path) -> JanusConfig:
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: a Janus-Pro folder needs config.json next to its weights")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from e
    return config_from_dict(d, where=cfg_path)


def weight_files(path) -> list:
    """The weight files of a folder, shards resolved through their index; errors name what is missing."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    for name in WEIGHT_FILES:
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            continue
        if not name.endswith(".index.json"):
            return [p]
        try:
            with open(p) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{p} is not a weight index (needs a 'weight_map'): {e}") from e
        files = [os.path.join(path, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{p} lists shards that are not there: {', '.join(missing)}")
        return files
    raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")


def read_tensors(file):
    """Yield (key, tensor) from a .safetensors file or a torch pickle, one tensor at a time, memory-mapped.
    A pickle's {"state_dict": ...} wrapper and DataParallel's "module." prefixes are unwrapped."""
    try:
        if file.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)
            return
        try:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) pickle
    except Exception as e:  # truncated downloads surface here as zip/header errors
        raise CheckpointError(f"could not read {file} (truncated or corrupt download?): {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a state dict")
    for k, v in state.items():
        yield k.removeprefix("module."), v


def mismatch_error(what, missing, unexpected, misshaped, limit=40) -> "CheckpointError":
    """The one report of a strict load: every missing, unexpected and mis-shaped key (up to limit of each)."""
    def listing(title, items):
        shown = items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
        return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(shown) if items else ""
    return CheckpointError(what + listing("missing", missing) + listing("unexpected", unexpected)
                           + listing("mis-shaped", misshaped))


def to_original_key(key: str):
    """Any published key -> our (deepseek) name, or None for tensors the generation path does not use."""
    if key.startswith(UNDERSTANDING_PREFIXES) or key.endswith((".rotary_emb.inv_freq", ".position_ids")):
        return None
    for old, new in CONVERTED_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            if new == "gen_vision_model.":
                for a, b in CONVERTED_VQ_PARTS:
                    key = key.replace(a, b)
            break
    return key


def lock_folder(folder, script):
    """An exclusive lock on folder/{script}.lock, held while the returned file is open, so that two runs of a
    script never write one folder at once. flock's lock goes with the process: a crashed or killed run leaves
    nothing stuck."""
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, f"{script}.lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise ValueError(f"{folder} is in use by another {script}.py process (pid {pid}): two runs in one folder "
                         f"would interleave their outputs") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def check_finite_weight(t: torch.Tensor, key, file):
    """Refuse a weight holding NaN or inf, naming it and its file: such a checkpoint fails far from the cause."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{file}: tensor {key} holds {int((~torch.isfinite(t)).sum())} non-finite "
                              f"values (NaN or inf) of {t.numel()}: a corrupt or diverged checkpoint")


def load_state_dict(path, model: nn.Module, device="cpu", dtype=torch.float32) -> dict:
    """Read every weight file of `path` into tensors shaped for `model` (typically on the meta device),
    converting each tensor to dtype/device as it is read so at most one copy of the weights exists."""
    expected = model.state_dict()
    files = weight_files(path)
    state, unexpected, misshaped = {}, [], []
    for file in files:
        for key, t in read_tensors(file):
            name = to_original_key(key)
            if name is None:
                continue
            where = os.path.basename(file)
            if name not in expected:
                unexpected.append(f"{key} ({where})")
                continue
            if tuple(t.shape) != tuple(expected[name].shape):
                misshaped.append(f"{key} ({where}): {tuple(t.shape)}, expected {tuple(expected[name].shape)}")
                continue
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            # a NaN in the VQ decoder draws cyan images that score 0; one in the decoder fails steps later
            check_finite_weight(t, key, file)
            if t.device.type == "cpu" and t.data_ptr() % 64:
                # safetensors maps tensors at 8-byte offsets; CPU GEMM kernels round differently on such
                # addresses, so a checkpoint would compute other last bits depending on its file format
                t = t.clone()
            state[name] = t
    head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if model.cfg.tie_word_embeddings and head not in state and embed in state:
        state[head] = state[embed]  # tied checkpoints store the matrix once
    # transformers' conversion drops the VQ's unused usage counter
    if "gen_vision_model.quantize.codebook_used" not in state:
        state["gen_vision_model.quantize.codebook_used"] = torch.zeros(65536, device=device, dtype=dtype)
    missing = [k for k in expected if k not in state]
    if missing or unexpected or misshaped:
        raise mismatch_error(f"checkpoint {', '.join(files)} does not fit the model described by "
                             f"{os.path.join(path, 'config.json')}:", missing, unexpected, misshaped)
    return state


def save_state_dict(state: dict, folder, weights="safetensors", shards=1):
    """Write a state dict as model.safetensors / pytorch_model.bin, or as N shards plus the index JSON
    (file names as the published checkpoints). Each file is written to a temp name, then renamed."""
    if weights not in ("safetensors", "bin"):
        raise ValueError(f"weights must be 'safetensors' or 'bin', got {weights!r}")
    state = {k: v.detach().contiguous() for k, v in state.items()}
    stem, ext = ("model", "safetensors") if weights == "safetensors" else ("pytorch_model", "bin")
    keys = list(state)
    sizes = [state[k].numel() * state[k].element_size() for k in keys]
    # contiguous groups of keys with roughly equal bytes
    total, groups, acc = sum(sizes), [[] for _ in range(shards)], 0
    for k, s in zip(keys, sizes):
        groups[min(shards - 1, int(acc * shards / max(total, 1)))].append(k)
        acc += s
    names = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    for name, group in zip(names, groups):
        write_tensors({k: state[k] for k in group}, os.path.join(folder, name))
    if shards > 1:
        weight_map = {k: name for name, group in zip(names, groups) for k in group}
        write_json(os.path.join(folder, f"{stem}.{ext}.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_tensors(tensors: dict, path):
    """One weight file, its format by its name (.safetensors or a torch pickle), written atomically."""
    with atomic(path) as tmp:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file
            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)


def save_like(base, folder, state: dict):
    """A complete checkpoint in the layout of the Janus-Pro folder base: its config.json, tokenizer and other
    files as they are, its weight files under their names holding every tensor of the base, those named in
    state (our names, e.g. the trained language model) replaced by state's, at state's dtype. Everything else
    (the understanding tower, the frozen image path) is the base's, byte for byte. So the loader that read
    the base reads the result: deepseek's for its layout, transformers' for the converted one."""
    files = weight_files(base)
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(base)):  # config, tokenizer, processor, reasoning template, ...
        src = os.path.join(base, name)
        if (os.path.isfile(src) and src not in files and name not in WEIGHT_FILES and name != "train_state.pt"
                and not name.endswith(".tmp")):
            shutil.copy(src, folder)
    placed, total = set(), 0
    for file in files:
        out = {}
        for key, t in read_tensors(file):
            name = to_original_key(key)
            out[key] = state[name].detach().contiguous() if name in state else t.contiguous()
            placed.add(name)
            total += out[key].numel() * out[key].element_size()
        write_tensors(out, os.path.join(folder, os.path.basename(file)))
    lost = sorted(set(state) - placed)
    if lost:
        raise CheckpointError(f"{base} has no place for these trained tensors: {', '.join(lost[:10])}")
    index = next((n for n in WEIGHT_FILES if n.endswith(".index.json") and os.path.isfile(os.path.join(base, n))), None)
    if index:  # the same keys in the same files; only the byte count changes with the dtype
        d = read_json(os.path.join(base, index))
        write_json(os.path.join(folder, index), {**d, "metadata": {**d.get("metadata", {}), "total_size": total}})


# -----------------------------------------------------------------------------
# tokenizer and chat format


class Tokenizer:
    """tokenizer.json through the `tokenizers` library; special tokens looked up by their strings."""

    BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
    BOI, EOI = "<begin_of_image>", "<end_of_image>"

    def __init__(self, file):
        file = os.path.expanduser(file)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"tokenizer file {file} not found")
        self.file = file
        self.tk = HFTokenizer.from_file(file)
        for name, s in [("bos", self.BOS), ("eos", self.EOS), ("pad", self.PAD), ("boi", self.BOI), ("eoi", self.EOI)]:
            if self.tk.token_to_id(s) is None:
                raise ValueError(f"{file} has no {name} token {s!r}")
            setattr(self, f"{name}_id", self.tk.token_to_id(s))  # bos_id, eos_id, pad_id, boi_id, eoi_id
        self.vocab_size = self.tk.get_vocab_size()

    @classmethod
    def from_pretrained(cls, path):
        return cls(os.path.join(path, "tokenizer.json"))

    def encode(self, text: str, bos: bool = True) -> list:
        """Exactly one BOS at the start (when asked), whatever the tokenizer's post-processor adds."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        while ids and ids[0] == self.bos_id:
            ids = ids[1:]
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def unknown_words(self, text: str) -> list:
        """The words of text this vocabulary maps to its unknown token: a word-level vocabulary (the shapes
        world's) has one, a byte-level BPE (Janus-Pro's) none, so this is always empty there."""
        unk = getattr(self.tk.model, "unk_token", None)
        unk_id = self.tk.token_to_id(unk) if unk else None
        if unk_id is None:
            return []
        enc = self.tk.encode(text, add_special_tokens=False)
        return [text[a:b] for (a, b), i in zip(enc.offsets, enc.ids) if i == unk_id]

    def save(self, folder):
        self.tk.save(os.path.join(folder, "tokenizer.json"))
        write_json(os.path.join(folder, "special_tokens_map.json"),
                    {"bos_token": self.BOS, "eos_token": self.EOS, "pad_token": self.PAD})
        write_json(os.path.join(folder, "tokenizer_config.json"),
                    {"bos_token": self.BOS, "eos_token": self.EOS, "pad_token": self.PAD,
                     "tokenizer_class": "LlamaTokenizerFast"})


def chat_prompt(text: str, system: str = "", user: str = "<|User|>", assistant: str = "<|Assistant|>") -> str:
    """deepseek's SFT chat format for one user turn, ready for the assistant's answer. Janus-Pro's demos name
    the roles <|User|> and <|Assistant|>; T2I-R1's code passes plain User and Assistant."""
    return (system + "\n\n" if system else "") + f"{user}: {text}\n\n{assistant}:"


def image_prompt(text: str, system: str = "", **roles) -> str:
    """The chat prompt followed by <begin_of_image>: the model answers with image tokens."""
    return chat_prompt(text, system, **roles) + Tokenizer.BOI
