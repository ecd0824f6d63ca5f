"""Janus-Pro's generation path from scratch: a LLaMA decoder with a text head and an image head.

Text tokens enter through `embed_tokens` and leave through `lm_head`; image tokens (VQ codes) enter as
`gen_aligner(gen_embed(code))` and leave through `gen_head`, both around the same decoder. The VQ-16
tokenizer lives in vq.py and hangs off the model as `janus.vq`.

Also here: the static KV cache and the tokenizer (tokenizer.json through `tokenizers`) with the deepseek chat
format. Checkpoints in the published layouts are read and written by checkpoints.py; the CPU matmul kernel
of each linear layer is chosen by kernels.py.

Departures from the reference code:
- only the generation path: the understanding tower (SigLIP + aligner) is not built; its tensors in a
  checkpoint are skipped on load, and `checkpoints.save_like` carries them over unchanged when it writes a
  trained one;
- rotary angles are computed from the positions on the fly (no cached tables, no length limit);
- a padded query row attends to itself so that left-padded batches never produce NaN (the reference
  relies on the same trick inside transformers' mask code);
- `text_logits`/`image_logits` compute in float32 (a bf16 product rounds logits of size ~10 by up to 0.03),
  except in decode steps, which sample from the compute dtype's product as Janus-Pro's own sampler does;
- under autocast every weight enters the compute in autocast's dtype, norms and embeddings included, so a
  model with float32 master weights computes exactly what the same model held in bf16 computes;
- on CPU, linear layers pick their matmul kernel (MKL as x W^T or W x^T, or oneDNN) by measuring, per
  shape, in a decode step, and take oneDNN elsewhere (`kernels.Linear`);
- `image_positions` (off for Janus-Pro, on for the shapes world's tiny base): a learned table of the image
  grid's cells, added to each image token's input. Janus-Pro finds its place on the 24x24 grid from 1-D
  rotary angles alone; a 2M-parameter drawer trained for minutes does not (docs/shapes.md).
"""

import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from torch.utils.checkpoint import checkpoint

from kernels import Linear
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
    image_positions: bool = False        # a learned embedding of each image token's grid cell (not in Janus-Pro)
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
        if cfg.image_positions:  # built at zero and left there by init_weights, so the other weights draw the
            # initial values they draw without it, and adding it changes nothing until it is trained
            self.gen_pos_embed = nn.Embedding(cfg.image_tokens, cfg.n_embd, _weight=torch.zeros(cfg.image_tokens, cfg.n_embd))
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """GPT-style init for training from scratch (shapes world); loading overwrites it."""
        for name, p in self.named_parameters():
            if name.startswith("gen_vision_model."):
                continue  # the VQ keeps torch's conv init; it is trained on its own
            if name.startswith("gen_pos_embed."):
                continue  # the cell table starts at zero
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)

    def image_modules(self) -> list:
        """The VQ, the image embedding (with its cell table, if any) and the image head: frozen in RL and SFT,
        as T2I-R1 freezes them."""
        parts = [self.gen_vision_model, self.gen_embed, self.gen_aligner, self.gen_head]
        return parts + ([self.gen_pos_embed] if self.cfg.image_positions else [])

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

    def embed_image(self, codes, cells=None):  # (B, T) -> (B, T, H)
        """cells: the grid cell of each code, (T,) or (B, T), by default 0..T-1; used with image_positions only."""
        e = self.gen_embed(codes)
        h = self.gen_aligner.layers(e.to(compute_dtype(e.device, e.dtype)))
        if self.cfg.image_positions:
            cells = torch.arange(codes.shape[1], device=codes.device) if cells is None else cells
            h = h + self.gen_pos_embed(cells).to(h.dtype)
        return h

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

    def export_state(self) -> dict:
        """The tensors a checkpoint holds, under their published names: adapters (train.LoRALinear) merged,
        torch.compile's prefix dropped."""
        state = {k.replace("_orig_mod.", ""): v for k, v in self.state_dict().items() if ".lora_" not in k}
        for name, module in self.named_modules():
            if hasattr(module, "merged_weight"):
                state[name.replace("_orig_mod.", "") + ".weight"] = module.merged_weight()
        return state


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


def chat_prompt(text: str, system: str = "", user: str = "<|User|>", assistant: str = "<|Assistant|>") -> str:
    """deepseek's SFT chat format for one user turn, ready for the assistant's answer. Janus-Pro's demos name
    the roles <|User|> and <|Assistant|>; T2I-R1's code passes plain User and Assistant."""
    return (system + "\n\n" if system else "") + f"{user}: {text}\n\n{assistant}:"


def image_prompt(text: str, system: str = "", **roles) -> str:
    """The chat prompt followed by <begin_of_image>: the model answers with image tokens."""
    return chat_prompt(text, system, **roles) + Tokenizer.BOI
