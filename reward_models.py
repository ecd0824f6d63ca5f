"""The networks the rewards run: CLIP, OWL-ViT and GIT, their tokenizers, image preprocessing and loaders.

Top to bottom:
  1. CLIP: a pre-LN ViT and a causal text transformer with a dataclass config and presets. The module tree
     is named like transformers' CLIPModel so its checkpoints load as they are; OpenCLIP checkpoints (HPS)
     are renamed into the same tree. The CLIP BPE tokenizer (via `tokenizers`) and image preprocessing.
  2. OWL-ViT detection heads on the same CLIP towers, and class-wise NMS; GIT (VQA): the same ViT, a
     projection and a BERT decoder, in transformers' GitForCausalLM layout, with its WordPiece tokenizer.
rewards.py builds the rewards on them.

Where this departs from the reference code, and why:
  - Every model's resize is PIL bicubic on uint8 pixels (OpenAI CLIP, HF and OpenCLIP do the same up to
    rounding; HPS's own code resizes float tensors with torchvision, a difference near 1/255 per pixel).
  - Text is normalised the way transformers' fast CLIP tokenizer does it (NFC, collapse whitespace,
    lowercase); OpenAI/OpenCLIP also run ftfy and html.unescape, which only matters for broken unicode or
    HTML entities in a prompt.
  - RGBA input: the alpha channel is dropped (what PIL's convert("RGB") does), not composited.
  - OWL-ViT's post-processing has no NMS; `nms` is class-wise NMS, which the rewards apply at IoU 0.5.
  - HPS preprocessing pads every non-square image; HPS's code skips the pad when the longest side is
    already 224, which would hand a non-square tensor to a fixed-size ViT.
"""

import gzip
import json
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE, WordPiece

from checkpoints import check_finite_weight, mismatch_error, read_tensors

# -----------------------------------------------------------------------------------------------------
# CLIP


@dataclass
class CLIPConfig:
    embed_dim: int = 768  # size of the shared image/text embedding (the projections' output)
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    vocab_size: int = 49408
    context_length: int = 77  # text positions; OWL-ViT has 16
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_mlp: int = 3072
    act: str = "quick_gelu"  # OpenAI CLIP and OWL-ViT; LAION's ViT-H/14 (PickScore, HPS) uses exact "gelu"
    eps: float = 1e-5


PRESETS = {
    "clip-vit-large-patch14": CLIPConfig(),
    "vit-h-14": CLIPConfig(embed_dim=1024, vision_width=1280, vision_layers=32, vision_heads=16, vision_mlp=5120,
                           text_width=1024, text_layers=24, text_heads=16, text_mlp=4096, act="gelu"),
    "owlvit-base-patch32": CLIPConfig(embed_dim=512, image_size=768, patch_size=32, vision_width=768,
                                      vision_layers=12, vision_heads=12, vision_mlp=3072, context_length=16,
                                      text_width=512, text_layers=12, text_heads=8, text_mlp=2048),
    "tiny": CLIPConfig(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4,
                       vision_mlp=64, vocab_size=1000, text_width=16, text_layers=2, text_heads=2, text_mlp=32),
}

# transformers' defaults (ViT-B/32 sizes) for the fields a config.json may leave out, as
# google/owlvit-base-patch32's does
_HF_DEFAULTS = {"clip": CLIPConfig(embed_dim=512, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
                                   vision_mlp=3072, text_width=512, text_heads=8, text_mlp=2048)}
_HF_DEFAULTS["owlvit"] = replace(_HF_DEFAULTS["clip"], image_size=768, context_length=16)
_HF_FIELDS = {  # our field: (sub-config or None for the top level, transformers' name)
    "embed_dim": (None, "projection_dim"), "image_size": ("vision_config", "image_size"),
    "patch_size": ("vision_config", "patch_size"), "vision_width": ("vision_config", "hidden_size"),
    "vision_layers": ("vision_config", "num_hidden_layers"), "vision_heads": ("vision_config", "num_attention_heads"),
    "vision_mlp": ("vision_config", "intermediate_size"), "vocab_size": ("text_config", "vocab_size"),
    "context_length": ("text_config", "max_position_embeddings"), "text_width": ("text_config", "hidden_size"),
    "text_layers": ("text_config", "num_hidden_layers"), "text_heads": ("text_config", "num_attention_heads"),
    "text_mlp": ("text_config", "intermediate_size"), "eps": ("vision_config", "layer_norm_eps")}


def config_from_hf(cfg: dict) -> CLIPConfig:
    """CLIPConfig from a transformers config.json dict (CLIPModel or OwlViTForObjectDetection)."""
    c = _HF_DEFAULTS["owlvit" if cfg.get("model_type") == "owlvit" else "clip"]
    found = {ours: (cfg if sub is None else cfg.get(sub) or {}).get(key) for ours, (sub, key) in _HF_FIELDS.items()}
    acts = {(cfg.get(sub) or {}).get("hidden_act") for sub in ("text_config", "vision_config")} - {None}
    if len(acts) > 1:
        raise ValueError(f"config.json: text and vision towers use different activations {sorted(acts)}")
    found["act"] = acts.pop() if acts else None
    return replace(c, **{k: v for k, v in found.items() if v is not None})


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x, causal):
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, C/H)
        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                           is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class Layer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width, heads, mlp, act, eps):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.self_attn = Attention(width, heads)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(width, mlp), fc2=nn.Linear(mlp, width)))
        self.act = act

    def forward(self, x, causal):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        h = self.mlp["fc1"](self.layer_norm2(x))
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return x + self.mlp["fc2"](h)


class Encoder(nn.Module):
    def __init__(self, width, layers, heads, mlp, act, eps):
        super().__init__()
        self.layers = nn.ModuleList(Layer(width, heads, mlp, act, eps) for _ in range(layers))

    def forward(self, x, causal=False):
        for layer in self.layers:
            x = layer(x, causal)
        return x


class TextTower(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.embeddings = nn.ModuleDict(dict(token_embedding=nn.Embedding(c.vocab_size, c.text_width),
                                             position_embedding=nn.Embedding(c.context_length, c.text_width)))
        self.encoder = Encoder(c.text_width, c.text_layers, c.text_heads, c.text_mlp, c.act, c.eps)
        self.final_layer_norm = nn.LayerNorm(c.text_width, eps=c.eps)

    def forward(self, ids):  # ids (B, T) -> pooled (B, text_width)
        T = ids.shape[1]
        x = self.embeddings["token_embedding"](ids) + self.embeddings["position_embedding"].weight[:T]  # (B, T, W)
        x = self.final_layer_norm(self.encoder(x, causal=True))
        # pool at end-of-text: it has the largest id, and causal attention keeps the padding after it out
        return x[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]


class VisionEmbeddings(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.vision_width))
        self.patch_embedding = nn.Conv2d(3, c.vision_width, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.vision_width)

    def forward(self, pixels):  # (B, 3, S, S) -> (B, 1 + P, W), patches in raster order
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, P, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class VisionTower(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.vision_width, eps=c.eps)  # [sic], the published key
        self.encoder = Encoder(c.vision_width, c.vision_layers, c.vision_heads, c.vision_mlp, c.act, c.eps)
        self.post_layernorm = nn.LayerNorm(c.vision_width, eps=c.eps)

    def forward(self, pixels):  # -> tokens (B, 1 + P, W) before post_layernorm, pooled (B, W)
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return x, self.post_layernorm(x[:, 0])


class CLIP(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.config = c
        self.text_model, self.vision_model = TextTower(c), VisionTower(c)
        self.visual_projection = nn.Linear(c.vision_width, c.embed_dim, bias=False)
        self.text_projection = nn.Linear(c.text_width, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def encode_text(self, ids):  # (B, T) -> (B, E), not normalised
        return self.text_projection(self.text_model(ids))

    def encode_image(self, pixels):  # (B, 3, S, S) -> (B, E), not normalised
        return self.visual_projection(self.vision_model(pixels)[1])


# ---- checkpoints


_OPENCLIP_NAMES = [  # OpenCLIP name piece -> ours, in order: each visual.* rule before its text namesake
    ("visual.conv1.", "vision_model.embeddings.patch_embedding."),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.", "vision_model.pre_layrnorm."),
    ("visual.ln_post.", "vision_model.post_layernorm."),
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("token_embedding.", "text_model.embeddings.token_embedding."),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.", "text_model.final_layer_norm."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
    ("attn.out_proj.", "self_attn.out_proj."), ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."),
]


def openclip_to_hf(sd):
    """Rename an OpenCLIP CLIP state dict (HPS) into the HF CLIPModel tree used here."""
    out = {}
    for k, v in sd.items():
        if k in ("visual.proj", "text_projection"):  # stored (in, out) for x @ proj; a Linear weight is (out, in)
            out["visual_projection.weight" if k == "visual.proj" else "text_projection.weight"] = v.t()
            continue
        name = k
        for old, new in _OPENCLIP_NAMES:
            name = name.replace(old, new)
        if ".attn.in_proj_" in name:  # packed (3W, W) and (3W,): q, k, v in that order
            head, kind = name.split(".attn.in_proj_")
            for proj, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{head}.self_attn.{proj}_proj.{kind}"] = part
        else:
            out[name] = v  # unknown keys pass through unchanged, so the key check reports them
    return out


def load_weights(model, sd, path):
    """Strict load: missing, unexpected or mis-shaped keys raise one error that lists them and names the file."""
    sd = {k: v for k, v in sd.items() if not k.endswith(("position_ids", "attn_mask"))}  # derived buffers
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    shaped = [f"{k} {tuple(sd[k].shape)} != {tuple(want[k].shape)}" for k in sorted(set(sd) & set(want))
              if sd[k].shape != want[k].shape]
    if missing or unexpected or shaped:
        raise mismatch_error(f"{path}: checkpoint does not match {type(model).__name__}", missing, unexpected, shaped)
    for k, v in sd.items():  # a NaN weight would score every image NaN or 0, far from its cause
        check_finite_weight(v, k, path)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def read_config(folder, preset):
    """config.json in the folder when present (published HF repos and tiny test checkpoints), else the preset."""
    p = os.path.join(folder, "config.json")
    if os.path.isfile(p):
        with open(p) as f:
            return config_from_hf(json.load(f))
    return PRESETS[preset]


def load_clip(weights, config: CLIPConfig, device="cpu", dtype=torch.float32) -> CLIP:
    """A CLIP from an HF CLIPModel file or an OpenCLIP pickle (detected by its 'visual.' keys)."""
    sd = dict(read_tensors(weights))
    if any(k.startswith("visual.") for k in sd):
        sd = openclip_to_hf(sd)
    with torch.device("meta"):  # no random init of a billion parameters we overwrite anyway
        model = CLIP(config)
    return load_weights(model, sd, weights).to(device, dtype)


# ---- tokenizer


def _byte_alphabet():
    """The 256 printable stand-ins byte-level BPE uses for bytes, in the order CLIP's vocabulary lists them."""
    shown = [*range(33, 127), *range(161, 173), *range(174, 256)]
    hidden = [b for b in range(256) if b not in shown]
    return [chr(b) for b in shown] + [chr(256 + i) for i in range(len(hidden))]


class CLIPTokenizer:
    """CLIP's byte-level BPE: ids = [SOT] + bpe(text) + [EOT], truncated to the context, padded with 0."""

    SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

    def __init__(self, tok, sot_id, eot_id, context_length=77):
        tok.no_truncation()
        tok.no_padding()
        self.tok, self.sot, self.eot, self.context_length = tok, sot_id, eot_id, context_length

    @classmethod
    def from_bpe(cls, vocab: dict, merges: list, context_length=77):
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                            unk_token="<|endoftext|>", fuse_unk=False))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(cls.SPLIT), behavior="removed", invert=True),  # keep the matches only
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        return cls(tok, vocab["<|startoftext|>"], vocab["<|endoftext|>"], context_length)

    @classmethod
    def from_folder(cls, folder, context_length=77):
        """tokenizer.json (openai/clip-*, PickScore), vocab.json + merges.txt (OWL-ViT), or OpenAI's
        bpe_simple_vocab_16e6.txt.gz (shipped inside the open_clip package), in that order."""
        p = lambda name: os.path.join(folder, name)
        if os.path.isfile(p("tokenizer.json")):
            tok = Tokenizer.from_file(p("tokenizer.json"))
            return cls(tok, tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>"), context_length)
        if os.path.isfile(p("vocab.json")) and os.path.isfile(p("merges.txt")):
            with open(p("vocab.json"), encoding="utf-8") as f:
                vocab = json.load(f)
            with open(p("merges.txt"), encoding="utf-8") as f:
                merges = [tuple(line.split()) for line in f.read().split("\n")
                          if line.strip() and not line.startswith("#version")]
            return cls.from_bpe(vocab, merges, context_length)
        if os.path.isfile(p("bpe_simple_vocab_16e6.txt.gz")):
            with gzip.open(p("bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")[1:49152 - 256 - 2 + 1]  # CLIP uses the first 48894 merges only
            merges = [tuple(line.split()) for line in lines]
            base = _byte_alphabet()
            words = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
            words += ["<|startoftext|>", "<|endoftext|>"]
            return cls.from_bpe({w: i for i, w in enumerate(words)}, merges, context_length)
        raise FileNotFoundError(f"no CLIP tokenizer (tokenizer.json, vocab.json + merges.txt, "
                                f"bpe_simple_vocab_16e6.txt.gz) in {folder}")

    def __call__(self, texts) -> torch.Tensor:  # list of N strings -> (N, context_length) int64
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, enc in enumerate(self.tok.encode_batch(texts, add_special_tokens=False)):
            ids = [self.sot] + enc.ids[:self.context_length - 2] + [self.eot]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


# ---- images

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _rgb(a, what):
    a = np.asarray(a)
    if a.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 pixels, got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{what}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])  # RGBA: alpha dropped, as PIL's convert("RGB") does


def as_rgb_list(images) -> list:
    """Images -> list of (H, W, 3) uint8 numpy arrays.

    Accepts a uint8 torch tensor or numpy array (B, H, W, 3) (the project's convention), (B, H, W) grayscale,
    (B, H, W, 1), (B, H, W, 4) RGBA (alpha dropped), or a list of PIL images / (H, W[, C]) arrays or tensors of
    different sizes."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise ValueError(f"images: expected dtype torch.uint8, got {images.dtype}")
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"images: expected dtype uint8, got {images.dtype}")
        if images.ndim not in (3, 4):
            raise ValueError(f"images: expected (B, H, W) or (B, H, W, C), got shape {images.shape}")
        images = list(images)
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"images: expected a tensor, array or list of images, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images: empty batch")
    out = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            im = np.asarray(im.convert("RGB"))
        elif isinstance(im, torch.Tensor):
            im = im.detach().cpu().numpy()
        out.append(_rgb(im, f"images[{i}]"))
    return out


def _to_pixels(pils, mean=CLIP_MEAN, std=CLIP_STD):  # PIL RGB images of one size -> (B, 3, S, S) float32
    x = torch.from_numpy(np.stack([np.asarray(p) for p in pils])).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def clip_preprocess(images, size=224, crop=None, mean=CLIP_MEAN, std=CLIP_STD, floor_offset=False):
    """CLIP / PickScore / GIT: bicubic resize of the short side to `size`, centre crop to `crop` (default
    `size`), normalise. The crop offset is rounded as OpenAI CLIP's torchvision CenterCrop does, or floored
    as transformers' CLIPImageProcessor (GIT's) does (floor_offset); they differ on non-square images only."""
    crop, pils = crop or size, []
    offset = (lambda n: (n - crop) // 2) if floor_offset else (lambda n: int(round((n - crop) / 2)))
    for a in as_rgb_list(images):
        h, w = a.shape[:2]
        s = size / min(h, w)
        nh, nw = (size, int(w * s)) if h <= w else (int(h * s), size)
        im = Image.fromarray(a).resize((nw, nh), Image.BICUBIC)
        top, left = offset(nh), offset(nw)
        pils.append(im.crop((left, top, left + crop, top + crop)))
    return _to_pixels(pils, mean, std)


def hps_preprocess(images, size=224):
    """HPSv2: bicubic resize of the long side to `size`, zero (black) padding centred to a square, normalise."""
    pils = []
    for a in as_rgb_list(images):
        h, w = a.shape[:2]
        s = size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        canvas = Image.new("RGB", (size, size))
        canvas.paste(Image.fromarray(a).resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
        pils.append(canvas)
    return _to_pixels(pils)


def owlvit_preprocess(images, size=768):
    """OWL-ViT: plain bicubic resize to size x size (aspect not kept, so boxes scale back per axis)."""
    return _to_pixels([Image.fromarray(a).resize((size, size), Image.BICUBIC) for a in as_rgb_list(images)])


# -----------------------------------------------------------------------------------------------------
# OWL-ViT


def owlvit_box_bias(grid):
    """Box prior per patch, in logit space: centre at the patch's bottom-right corner, size one patch."""
    c = torch.arange(1, grid + 1, dtype=torch.float32) / grid
    cy, cx = torch.meshgrid(c, c, indexing="ij")  # (g, g): row i, column j, raster order like the patches
    b = torch.cat([torch.stack([cx, cy], -1).reshape(-1, 2), torch.full((grid * grid, 2), 1.0 / grid)], -1)
    return torch.log(b + 1e-4) - torch.log1p(-b + 1e-4)  # (P, 4) inverse sigmoid, offset to stay finite at 1


class OwlViT(nn.Module):
    """OWL-ViT detector (transformers' OwlViTForObjectDetection key layout)."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.config, w = c, c.vision_width
        self.owlvit = CLIP(c)
        self.class_head = nn.ModuleDict(dict(dense0=nn.Linear(w, c.text_width), logit_shift=nn.Linear(w, 1),
                                             logit_scale=nn.Linear(w, 1)))
        self.box_head = nn.ModuleDict(dict(dense0=nn.Linear(w, w), dense1=nn.Linear(w, w), dense2=nn.Linear(w, 4)))
        self.layer_norm = nn.LayerNorm(w, eps=c.eps)

    def forward(self, pixels, query_ids):
        """pixels (B, 3, S, S), query_ids (Q, T) -> logits (B, P, Q), boxes (B, P, 4) as (cx, cy, w, h) in [0, 1]."""
        tokens, _ = self.owlvit.vision_model(pixels)
        tokens = self.owlvit.vision_model.post_layernorm(tokens)  # on every token, not only the class token
        feats = self.layer_norm(tokens[:, 1:] * tokens[:, :1])  # (B, P, W) patches modulated by the class token
        q = F.normalize(self.owlvit.encode_text(query_ids), dim=-1)  # (Q, E)
        e = self.class_head["dense0"](feats)
        e = e / (e.norm(dim=-1, keepdim=True) + 1e-6)  # (B, P, E)
        logits = (e @ q.t() + self.class_head["logit_shift"](feats)) * (
            F.elu(self.class_head["logit_scale"](feats)) + 1)
        h = F.gelu(self.box_head["dense0"](feats))
        h = self.box_head["dense2"](F.gelu(self.box_head["dense1"](h)))  # (B, P, 4)
        grid = self.config.image_size // self.config.patch_size
        # bias and sigmoid in fp32: in bf16 a box edge would move by ~3 px at 768
        return logits, torch.sigmoid(h.float() + owlvit_box_bias(grid).to(h.device))


def load_owlvit(weights, config: CLIPConfig, device="cpu", dtype=torch.float32) -> OwlViT:
    sd = {k.replace(".pre_layernorm.", ".pre_layrnorm."): v for k, v in dict(read_tensors(weights)).items()}
    with torch.device("meta"):
        model = OwlViT(config)
    return load_weights(model, sd, weights).to(device, dtype)


def box_iou(a, b):
    """(N, 4), (M, 4) boxes as x0, y0, x1, y1 -> (N, M) IoU (continuous coordinates)."""
    area = lambda t: (t[:, 2] - t[:, 0]).clamp(min=0) * (t[:, 3] - t[:, 1]).clamp(min=0)
    lt, rb = torch.max(a[:, None, :2], b[None, :, :2]), torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area(a)[:, None] + area(b)[None] - inter).clamp(min=1e-9)


def nms(boxes, scores, iou_threshold=0.5):
    """Greedy NMS: keep the best box, drop boxes overlapping it by IoU > threshold, repeat. -> kept indices."""
    order = scores.argsort(descending=True)
    iou = box_iou(boxes, boxes)
    keep, dropped = [], torch.zeros(len(scores), dtype=torch.bool)
    for i in order.tolist():
        if not dropped[i]:
            keep.append(i)
            dropped |= iou[i] > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


# ---- GIT (microsoft/git-*-vqav2): CLIP's ViT, a projection, and a BERT decoder over [image; question]


@dataclass
class GITConfig:
    image_size: int = 420  # git-large-vqav2; git-base-vqav2 is 480 with patch 16 and a ViT-B
    patch_size: int = 14
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    vision_act: str = "quick_gelu"
    vision_eps: float = 1e-5  # the ViT's LayerNorms and the projection's
    vocab_size: int = 30522  # bert-base-uncased WordPiece
    width: int = 768
    layers: int = 6
    heads: int = 12
    mlp: int = 3072
    max_positions: int = 1024
    eps: float = 1e-12  # BERT's LayerNorms

    def vision(self) -> CLIPConfig:  # the image tower as a CLIPConfig (its text fields are unused)
        return replace(PRESETS["tiny"], image_size=self.image_size, patch_size=self.patch_size,
                       vision_width=self.vision_width, vision_layers=self.vision_layers, vision_heads=self.vision_heads,
                       vision_mlp=self.vision_mlp, act=self.vision_act, eps=self.vision_eps)


GIT_PRESETS = {
    "git-large-vqav2": GITConfig(),
    "git-base-vqav2": GITConfig(image_size=480, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                                vision_mlp=3072),
}
# transformers' GitConfig / GitVisionConfig defaults fill what a config.json leaves out (git-base-vqav2's
# vision_config names only image_size)
_GIT_DEFAULTS = GITConfig(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                          vision_mlp=3072)
_GIT_FIELDS = {"image_size": "image_size", "patch_size": "patch_size", "vision_width": "hidden_size",
               "vision_layers": "num_hidden_layers", "vision_heads": "num_attention_heads",
               "vision_mlp": "intermediate_size", "vision_act": "hidden_act", "vision_eps": "layer_norm_eps"}
_GIT_TEXT_FIELDS = {"vocab_size": "vocab_size", "width": "hidden_size", "layers": "num_hidden_layers",
                    "heads": "num_attention_heads", "mlp": "intermediate_size",
                    "max_positions": "max_position_embeddings", "eps": "layer_norm_eps"}


def git_config_from_hf(cfg: dict, path="config.json") -> GITConfig:
    """GITConfig from a transformers GitForCausalLM config.json dict; refuses what this GIT does not build."""
    vis = cfg.get("vision_config") or {}
    vision_act = vis.get("hidden_act", "quick_gelu")  # the ViT's MLP knows these two only (CLIP's Encoder)
    if (cfg.get("model_type") != "git" or cfg.get("num_image_with_embedding")
            or cfg.get("hidden_act", "gelu") != "gelu" or vision_act not in ("quick_gelu", "gelu")):
        raise ValueError(f"{path}: not a single-image GIT with gelu (model_type {cfg.get('model_type')!r}, "
                         f"num_image_with_embedding {cfg.get('num_image_with_embedding')!r}, "
                         f"hidden_act {cfg.get('hidden_act')!r}, vision hidden_act {vision_act!r})")
    found = {ours: vis.get(key) for ours, key in _GIT_FIELDS.items()}
    found |= {ours: cfg.get(key) for ours, key in _GIT_TEXT_FIELDS.items()}
    return replace(_GIT_DEFAULTS, **{k: v for k, v in found.items() if v is not None})


class GITLayer(nn.Module):
    """BERT's post-LN block (transformers' GitLayer key names): x = LN(x + attn(x)), x = LN(x + mlp(x)).
    Image tokens attend to their own image only, so they are computed once per image however many questions
    ask about it; question tokens attend to their image's tokens and, causally, to themselves."""

    def __init__(self, c: GITConfig):
        super().__init__()
        w, self.heads = c.width, c.heads
        self.attention = nn.ModuleDict(dict(
            self=nn.ModuleDict(dict(query=nn.Linear(w, w), key=nn.Linear(w, w), value=nn.Linear(w, w))),
            output=nn.ModuleDict(dict(dense=nn.Linear(w, w), LayerNorm=nn.LayerNorm(w, eps=c.eps)))))
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(w, c.mlp)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(c.mlp, w), LayerNorm=nn.LayerNorm(w, eps=c.eps)))

    def forward(self, image, text, rows, mask):
        """image (K, I, C), text (N, T, C) whose row n asks about image rows[n], mask (T, I + T) ->
        the next image and text states."""
        qkv = self.attention["self"]
        split = lambda t: t.view(*t.shape[:2], self.heads, -1).transpose(1, 2)  # (B, H, T, C/H)
        qi, ki, vi = (split(qkv[n](image)) for n in ("query", "key", "value"))
        qt, kt, vt = (split(qkv[n](text)) for n in ("query", "key", "value"))
        yi = F.scaled_dot_product_attention(qi, ki, vi)
        yt = F.scaled_dot_product_attention(qt, torch.cat([ki[rows], kt], 2), torch.cat([vi[rows], vt], 2),
                                            attn_mask=mask)
        return self.finish(image, yi), self.finish(text, yt)

    def finish(self, x, y):  # residual + LN after attention (y (B, H, T, C/H)), then the MLP block
        out = self.attention["output"]
        x = out["LayerNorm"](x + out["dense"](y.transpose(1, 2).flatten(2)))
        return self.output["LayerNorm"](x + self.output["dense"](F.gelu(self.intermediate["dense"](x))))


class GIT(nn.Module):
    """GIT (transformers' GitForCausalLM key layout): the ViT's tokens, projected, are a prefix the question
    tokens attend to; image tokens attend to each other only, question tokens causally."""

    def __init__(self, c: GITConfig):
        super().__init__()
        self.config, w = c, c.width
        self.git = nn.Module()
        self.git.embeddings = nn.ModuleDict(dict(word_embeddings=nn.Embedding(c.vocab_size, w),
                                                 position_embeddings=nn.Embedding(c.max_positions, w),
                                                 LayerNorm=nn.LayerNorm(w, eps=c.eps)))
        self.git.image_encoder = nn.Module()
        self.git.image_encoder.vision_model = VisionTower(c.vision())
        self.git.visual_projection = nn.Module()
        self.git.visual_projection.visual_projection = nn.Sequential(nn.Linear(c.vision_width, w),
                                                                     nn.LayerNorm(w, eps=c.vision_eps))
        self.git.encoder = nn.Module()
        self.git.encoder.layer = nn.ModuleList(GITLayer(c) for _ in range(c.layers))
        self.output = nn.Linear(w, c.vocab_size)

    def image_tokens(self, pixels):  # (B, 3, S, S) -> (B, 1 + P, width)
        vit = self.git.image_encoder.vision_model
        tokens, _ = vit(pixels)
        return self.git.visual_projection.visual_projection(vit.post_layernorm(tokens))  # post-LN on every token

    def hidden(self, image_tokens, ids, rows=None):
        """image_tokens (K, I, width), ids (N, T) whose row n asks about image rows[n] (default: row n) ->
        final image states (K, I, width) and text states (N, T, width)."""
        I, T = image_tokens.shape[1], ids.shape[1]
        rows = torch.arange(len(ids), device=ids.device) if rows is None else rows
        e = self.git.embeddings
        text = e["LayerNorm"](e["word_embeddings"](ids) + e["position_embeddings"].weight[:T])  # positions from 0
        image, text = image_tokens, text.to(image_tokens.dtype)
        mask = torch.ones(T, I + T, dtype=torch.bool, device=ids.device)  # all of the image, then causal text
        mask[:, I:] = mask[:, I:].tril()
        for layer in self.git.encoder.layer:
            image, text = layer(image, text, rows, mask)
        return image, text

    def forward(self, pixels, ids):  # -> logits (B, I + T, vocab), as GitForCausalLM returns them
        return self.output(torch.cat(self.hidden(self.image_tokens(pixels), ids), dim=1))


def load_git(weights, config: GITConfig, device="cpu", dtype=torch.float32) -> GIT:
    with torch.device("meta"):
        model = GIT(config)
    return load_weights(model, dict(read_tensors(weights)), weights).to(device, dtype)


class WordPieceTokenizer:
    """bert-base-uncased's WordPiece (GIT's tokenizer): tokenizer.json, or vocab.txt built the way BERT's
    uncased tokenizer reads it (clean text, split CJK, strip accents, lowercase; split on spaces and punctuation)."""

    def __init__(self, folder):
        p = lambda name: os.path.join(folder, name)
        if os.path.isfile(p("tokenizer.json")):
            self.tok = Tokenizer.from_file(p("tokenizer.json"))
        elif os.path.isfile(p("vocab.txt")):
            with open(p("vocab.txt"), encoding="utf-8") as f:
                vocab = {w: i for i, w in enumerate(line.rstrip("\n") for line in f)}
            self.tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
            self.tok.normalizer = normalizers.BertNormalizer(lowercase=True)
            self.tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        else:
            raise FileNotFoundError(f"no WordPiece vocabulary (tokenizer.json or vocab.txt) in {folder}")
        self.tok.no_truncation()
        self.tok.no_padding()
        self.cls = self.tok.token_to_id("[CLS]")
        if self.cls is None:
            raise ValueError(f"{folder}: the vocabulary has no [CLS] token")

    def encode(self, text) -> list:  # no special tokens
        return self.tok.encode(text, add_special_tokens=False).ids

    def word_id(self, word) -> int:
        ids = self.encode(word)
        if len(ids) != 1:
            raise ValueError(f"'{word}' is {len(ids)} tokens in this vocabulary, not one")
        return ids[0]


def read_json_object(path) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def git_preprocessing(folder, config: GITConfig) -> dict:
    """clip_preprocess arguments from preprocessor_config.json (CLIPImageProcessor: resize the short side,
    centre crop, normalise); without the file, the published vqav2 values: short side = crop = the ViT's size,
    CLIP's mean and std."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return dict(size=config.image_size, crop=config.image_size, mean=CLIP_MEAN, std=CLIP_STD, floor_offset=True)
    p = read_json_object(path)
    size, crop = p.get("size", config.image_size), p.get("crop_size", config.image_size)
    size = size.get("shortest_edge") if isinstance(size, dict) else size
    crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
    if crop != (config.image_size, config.image_size) or not isinstance(size, int) or p.get("resample", 3) != 3:
        raise ValueError(f"{path}: expected a bicubic resize (resample 3) and a square crop of the ViT's "
                         f"{config.image_size} px, got size {size!r}, crop {crop!r}, resample {p.get('resample')!r}")
    return dict(size=size, crop=config.image_size, mean=tuple(p.get("image_mean", CLIP_MEAN)),
                std=tuple(p.get("image_std", CLIP_STD)), floor_offset=True)
