"""Rewards for T2I-R1: one CLIP implementation, the reward models built on it, and the GenEval rule engine.

Top to bottom:
  1. CLIP: a pre-LN ViT and a causal text transformer with a dataclass config and presets. The module tree
     is named like transformers' CLIPModel so its checkpoints load as they are; OpenCLIP checkpoints (HPS)
     are renamed into the same tree. The CLIP BPE tokenizer (via `tokenizers`) and image preprocessing.
  2. OWL-ViT detection heads on the same CLIP towers, and class-wise NMS; GIT (VQA): the same ViT, a
     projection and a BERT decoder, in transformers' GitForCausalLM layout, with its WordPiece tokenizer.
  3. The GenEval rule engine (strict pass/fail as GenEval computes it, plus a dense score for RL),
     T2I-R1's prompt file read as GenEval metadata where its fields allow, and T2I-R1's own rules read from
     its released reward_git.py and reward_gdino.py (GIT questions; detection scores and position rule).
  4. Rewards, all called as `reward(images, metadata) -> (scores (B,) float32, info dict of per-image lists)`:
     clip, pickscore, hps, aesthetic, geneval, git, t2i-r1-detect (shapes.py registers shapes, its world's
     detector + the GenEval rules).
  5. Selection and weights from the command line (and the t2i-r1 preset), the reward ensemble, `sum` /
     `group` combination, evaluation extras (diversity).

Where this departs from the reference code, and why:
  - Every model's resize is PIL bicubic on uint8 pixels (OpenAI CLIP, HF and OpenCLIP do the same up to
    rounding; HPS's own code resizes float tensors with torchvision, a difference near 1/255 per pixel).
  - Text is normalised the way transformers' fast CLIP tokenizer does it (NFC, collapse whitespace,
    lowercase); OpenAI/OpenCLIP also run ftfy and html.unescape, which only matters for broken unicode or
    HTML entities in a prompt.
  - RGBA input: the alpha channel is dropped (what PIL's convert("RGB") does), not composited.
  - geneval: GenEval detects with Mask2Former; we use OWL-ViT (open vocabulary, torch-only, 613 MB).
    OWL-ViT has no masks, so colour is classified on the box crop without greying the background
    (GenEval's own code path when it has no mask). OWL-ViT's post-processing has no NMS; we add
    class-wise NMS at IoU 0.5. See GenEvalConfig for the score threshold.
  - The rule rewards (geneval, shapes) abstain on a prompt without GenEval metadata: score 0, marked not
    checked (see RuleReward); GenEval has no such prompts, and T2I-R1's GroundingDINO reward scores them by
    object presence.
  - t2i-r1-detect: T2I-R1's GroundingDINO rules on OWL-ViT boxes (a query per object, threshold 0.1, NMS on
    every row); where its code looks wrong ("above" and "on top of" never get position credit, every pair
    is "near", a spatial row naming one object twice scores 0, its counting NMS reads (cx, cy, w, h) boxes as
    corners, a noun of three or more words is never found) T2IR1DetectConfig.as_released keeps it, the
    default does what it means (see t2i_r1_position, t2i_r1_nms). git: an empty attr_nouns list falls back to
    the nouns.
  - HPS preprocessing pads every non-square image; HPS's code skips the pad when the longest side is
    already 224, which would hand a non-square tensor to a fixed-size ViT.
"""
import collections
import gzip
import json
import math
import os
import re
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE, WordPiece

from model import check_finite_weight, default_device, mismatch_error, read_tensors
from t2i_r1 import group_advantages

# -----------------------------------------------------------------------------------------------------
# 1. CLIP


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
# 2. OWL-ViT


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


def _read_json(path) -> dict:
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
    p = _read_json(path)
    size, crop = p.get("size", config.image_size), p.get("crop_size", config.image_size)
    size = size.get("shortest_edge") if isinstance(size, dict) else size
    crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
    if crop != (config.image_size, config.image_size) or not isinstance(size, int) or p.get("resample", 3) != 3:
        raise ValueError(f"{path}: expected a bicubic resize (resample 3) and a square crop of the ViT's "
                         f"{config.image_size} px, got size {size!r}, crop {crop!r}, resample {p.get('resample')!r}")
    return dict(size=size, crop=config.image_size, mean=tuple(p.get("image_mean", CLIP_MEAN)),
                std=tuple(p.get("image_std", CLIP_STD)), floor_offset=True)


# -----------------------------------------------------------------------------------------------------
# 3. GenEval rules
#
# Detection: {"class": str, "box": (x0, y0, x1, y1) pixels, "score": float, "color": str or None}
# Metadata:  {"tag": ..., "prompt": ..., "include": [{"class", "count", "color"?, "position"?: [relation, index]}],
#             "exclude": [{"class", "count"}]?}; y grows downward.

GENEVAL_COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
GENEVAL_COLOR_TEMPLATES = ["a photo of a {c} {o}", "a photo of a {c}-colored {o}", "a photo of a {c} object"]


GENEVAL_RELATIONS = ("left of", "right of", "above", "below")


def check_geneval_metadata(m) -> None:
    """Raise ValueError naming the field when m is not GenEval metadata the rules can read: include clauses
    with a class, a count >= 1, an optional colour and an optional [relation, index of an earlier include
    clause]; optional exclude clauses with a class and a count."""
    def count_ok(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    include, exclude = m.get("include"), m.get("exclude", [])
    if not isinstance(include, list) or not include:
        raise ValueError(f"'include' must be a non-empty list of clauses, got {include!r:.80}")
    if not isinstance(exclude, list):
        raise ValueError(f"'exclude' must be a list of clauses, got {exclude!r:.80}")
    for part, clauses in (("include", include), ("exclude", exclude)):
        for i, c in enumerate(clauses):
            where = f"{part}[{i}]"
            if not isinstance(c, dict):
                raise ValueError(f"{where} must be a dict, got {c!r:.80}")
            if not isinstance(c.get("class"), str) or not c["class"].strip():
                raise ValueError(f"{where} needs a 'class' (a non-empty string), got {c.get('class')!r:.80}")
            if not count_ok(c.get("count")):
                raise ValueError(f"{where} needs a 'count' (an integer >= 1), got {c.get('count')!r:.80}")
            if "color" in c and not isinstance(c["color"], str):
                raise ValueError(f"{where}: 'color' must be a string, got {c['color']!r:.80}")
            if "position" in c:
                pos = c["position"]
                ok = (part == "include" and isinstance(pos, list) and len(pos) == 2 and pos[0] in GENEVAL_RELATIONS
                      and isinstance(pos[1], int) and not isinstance(pos[1], bool) and 0 <= pos[1] < i)
                if not ok:  # geneval_score places a clause relative to one it has already matched
                    raise ValueError(f"{where}: 'position' must be [relation, index of an earlier include clause] "
                                     f"with relation one of {', '.join(GENEVAL_RELATIONS)}, got {pos!r:.80}")


def relative_position(box_a, box_b, shrink=0.1):
    """Relations of A to B as GenEval computes them -> subset of {"left of", "right of", "above", "below"}.

    offset = centre(A) - centre(B); per axis it shrinks towards 0 by shrink * (size of A + size of B) on that
    axis (clamped at 0, sign kept); a shrunk offset of ~0 means no relation; otherwise the shrunk offset is
    divided by the length of the original offset and compared with +-0.5."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    sizes = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    shrunk = np.maximum(np.abs(offset) - shrink * sizes, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    return {r for r, hit in [("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                             ("below", dy > 0.5)] if hit}


def geneval_score(detections, metadata, with_parts=False):
    """Strict GenEval verdict and a dense score in [0, 1] for one image -> {"strict", "dense", "reasons"}.

    Strict (GenEval): include clauses are ANDed. A clause takes the `count` most confident detections of its
    class and fails with fewer; with "color", at least `count` of them must have that colour; with
    "position" [relation, i], every one of them must stand in `relation` to every object matched by include
    clause i, and fails if clause i failed. An exclude clause fails once its class has `count` detections
    (GenEval's counting prompts exclude count + 1, which makes counts exact).

    Dense: per include clause with n = count, found = all detections of the class, top = the n best:
      count    = max(0, 1 - |n - found| / n)               (too many is penalised like too few)
      color    = #(top with the asked colour) / n           (only if the clause asks a colour)
      position = #(pairs (a in top, b in top of clause i) with the relation) / (n * count_i)  (if asked)
      clause   = mean of the parts it has.
    An exclude clause of a class no include clause names scores 1 if found < count else 0 (a class that is
    included already pays for overshooting in its count part). dense = mean over clauses (1 if none).

    with_parts: also "parts", what each kind of part adds to dense (DENSE_PARTS; they sum to dense when there
    is a clause): "presence" the count part of clauses asking for one object (is it there, once), "count"
    the count part of clauses asking for two or more and the exclude clauses, "color" and "position" theirs.
    So a weighted sum of the parts reweighs them (the shapes world's split rewards)."""
    by_class = {}
    for d in sorted(detections, key=lambda d: -float(d["score"])):
        by_class.setdefault(d["class"], []).append(d)
    include, exclude = metadata.get("include", []), metadata.get("exclude", [])
    strict, reasons, matched, clause_scores, clause_parts = True, [], [], [], []
    for c in include:
        n, found = c["count"], by_class.get(c["class"], [])
        top, ok = found[:n], len(found) >= n
        if not ok:
            reasons.append(f"expected {c['class']} >= {n}, found {len(found)}")
        parts = [max(0.0, 1 - abs(n - len(found)) / n)]
        names = ["presence" if n == 1 else "count"]
        if "color" in c:
            hits = sum(d.get("color") == c["color"] for d in top)
            parts.append(hits / n)
            names.append("color")
            if ok and hits < n:
                ok = False
                reasons.append(f"expected {n} {c['color']} {c['class']}, found {hits}")
        if "position" in c:
            rel, ref = c["position"]
            ref_top = by_class.get(include[ref]["class"], [])[:include[ref]["count"]]
            good = sum(rel in relative_position(a["box"], b["box"]) for a in top for b in ref_top)
            parts.append(good / (n * include[ref]["count"]))
            names.append("position")
            if ok and (matched[ref] is None or good < len(top) * len(matched[ref])):
                ok = False
                reasons.append(f"expected {c['class']} {rel} {include[ref]['class']}")
        strict &= ok
        matched.append(top if ok else None)
        clause_scores.append(sum(parts) / len(parts))
        clause_parts.append(list(zip(names, parts)))
    included = {c["class"] for c in include}
    for c in exclude:
        found = len(by_class.get(c["class"], []))
        if found >= c["count"]:
            strict = False
            reasons.append(f"expected {c['class']} < {c['count']}, found {found}")
        if c["class"] not in included:
            clause_scores.append(float(found < c["count"]))
            clause_parts.append([("count", clause_scores[-1])])
    dense = sum(clause_scores) / len(clause_scores) if clause_scores else 1.0
    out = {"strict": bool(strict), "dense": float(dense), "reasons": reasons}
    if with_parts:
        out["parts"] = dict.fromkeys(DENSE_PARTS, 0.0)
        for named in clause_parts:  # each clause weighs 1 / (clauses), shared equally among its parts
            for name, v in named:
                out["parts"][name] += v / (len(named) * len(clause_parts))
    return out


DENSE_PARTS = ("presence", "count", "color", "position")  # geneval_score's "parts"


GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def geneval_summary(records):
    """records: iterable of (tag, strict) pairs or dicts with "tag" and "strict" ->
    {"per_tag": {tag: accuracy}, "count": {tag: images}, "overall": mean of the accuracies of GenEval's six
    tags (the GenEval score)}. Other tags (the shapes world's "reasoning") are reported per tag beside it and
    stay out of the mean, as WISE stays beside GenEval; with none of GenEval's tags, all tags are averaged."""
    hits, count = {}, {}
    for r in records:
        tag, ok = (r["tag"], r["strict"]) if isinstance(r, dict) else r
        hits[tag] = hits.get(tag, 0) + bool(ok)
        count[tag] = count.get(tag, 0) + 1
    per_tag = {t: hits[t] / count[t] for t in count}
    core = [a for t, a in per_tag.items() if t in GENEVAL_TAGS] or list(per_tag.values())
    return {"per_tag": per_tag, "count": count, "overall": sum(core) / len(core) if core else float("nan")}


@torch.no_grad()
def classify_colors(clip, tokenizer, image, boxes, object_class, device="cpu", dtype=torch.float32, classifier=None):
    """GenEval's colour step: CLIP zero-shot over GENEVAL_COLORS on each box crop -> list of colour names.

    Text side (as GenEval via clip_benchmark): per colour, the three templates are encoded, each normalised,
    averaged and renormalised. Image side: the crop (box clamped to the image, at least 1 px) goes through
    the CLIP preprocessing; prediction = argmax of cosine similarity."""
    if classifier is None:
        classifier = color_classifier(clip, tokenizer, object_class, device)
    if len(boxes) == 0:
        return []
    h, w = image.shape[:2]
    crops = []
    for x0, y0, x1, y1 in boxes:
        x0, y0 = min(max(int(x0), 0), w - 1), min(max(int(y0), 0), h - 1)
        x1, y1 = max(min(int(math.ceil(x1)), w), x0 + 1), max(min(int(math.ceil(y1)), h), y0 + 1)
        crops.append(image[y0:y1, x0:x1])
    size = getattr(getattr(clip, "config", None), "image_size", 224)
    emb = F.normalize(clip.encode_image(clip_preprocess(crops, size).to(device, dtype)).float(), dim=-1)
    return [GENEVAL_COLORS[i] for i in (emb @ classifier.t()).argmax(-1).tolist()]


@torch.no_grad()
def color_classifier(clip, tokenizer, object_class, device="cpu"):  # -> (10, E) unit text embeddings
    rows = []
    for color in GENEVAL_COLORS:
        ids = tokenizer([t.format(c=color, o=object_class) for t in GENEVAL_COLOR_TEMPLATES]).to(device)
        rows.append(F.normalize(F.normalize(clip.encode_text(ids).float(), dim=-1).mean(0), dim=-1))
    return torch.stack(rows)


# ---- T2I-R1's prompt file -> GenEval metadata

# Localities in T2I-R1's file that GenEval's arithmetic can check; "next to", "near" and "on side of" cannot.
# "on top of" (resting on) is read as "above": the object on top has its centre higher in the picture
# (a flat object lying on a much bigger one can still miss GenEval's margin).
_LOCALITIES = {"left of": "left of", "on the left of": "left of", "right of": "right of",
               "on the right of": "right of", "above": "above", "on the top of": "above", "on top of": "above",
               "below": "below", "on the bottom of": "below"}


def check_t2i_r1_row(row):
    """Raise ValueError naming the field when a T2I-R1 prompt-file row (JSON object) cannot be read."""
    def strings(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise ValueError(f"'prompt' must be a non-empty string, got {row.get('prompt')!r:.80}")
    if "task_type" in row and not isinstance(row["task_type"], str):
        raise ValueError(f"'task_type' must be a string, got {row['task_type']!r:.80}")
    for key in ("nouns", "attr_nouns"):
        if row.get(key) is not None and not strings(row[key]):
            raise ValueError(f"'{key}' must be a list of strings, got {row[key]!r:.80}")
    sp = row.get("spatial_info")
    if sp and not (isinstance(sp, dict) and all(isinstance(sp.get(k), str) for k in ("obj1", "obj2", "locality"))):
        raise ValueError(f"'spatial_info' needs the strings obj1, obj2 and locality, got {sp!r:.80}")
    nu = row.get("numeracy_info")
    if nu and not (isinstance(nu, list) and all(isinstance(i, dict) and isinstance(i.get("obj_name"), str)
                                                and isinstance(i.get("num"), int) for i in nu)):
        raise ValueError(f"'numeracy_info' must be a list of {{\"obj_name\": string, \"num\": integer}}, "
                         f"got {nu!r:.80}")


def from_t2i_r1(row):
    """One T2I-R1 prompt-file record (dict) -> GenEval metadata, or None when its fields cannot be checked
    by GenEval's rules. The prompt text is kept as is. Which fields decide:
    spatial_info with a checkable locality and two different objects -> position;
    numeracy_info -> counting (every object counted exactly, as GenEval does);
    attr_nouns that are all '<GenEval colour> <noun>' and appear in the prompt -> colors / color_attr
    (the file has some attr_nouns that contradict their prompt, e.g. 'red towel' for 'a white towel');
    task_type 'object' with one or two nouns -> single_object / two_object. Anything else (shape, texture,
    non-spatial, most complex prompts) -> None. A malformed row raises ValueError naming the field."""
    check_t2i_r1_row(row)
    prompt, text = row["prompt"], row["prompt"].lower()
    meta = None
    if row.get("spatial_info"):
        sp = row["spatial_info"]
        relation = _LOCALITIES.get(sp["locality"].strip().lower())
        if relation and sp["obj1"] != sp["obj2"]:
            meta = {"tag": "position", "include": [{"class": sp["obj2"], "count": 1},
                                                    {"class": sp["obj1"], "count": 1, "position": [relation, 0]}]}
    elif row.get("numeracy_info"):
        info = row["numeracy_info"]
        if len({i["obj_name"] for i in info}) == len(info) and all(int(i["num"]) >= 1 for i in info):
            meta = {"tag": "counting", "include": [{"class": i["obj_name"], "count": int(i["num"])} for i in info],
                    "exclude": [{"class": i["obj_name"], "count": int(i["num"]) + 1} for i in info]}
    elif row.get("attr_nouns"):
        include = []
        for phrase in row["attr_nouns"]:
            color, _, noun = phrase.strip().lower().partition(" ")
            # the phrase must really be in the prompt (singular or plural) with a GenEval colour in front
            in_prompt = re.search(rf"\b{re.escape(phrase.strip().lower())}(s|es)?\b", text)
            if color not in GENEVAL_COLORS or not noun or not in_prompt:
                return None
            include.append({"class": noun, "count": 1, "color": color})
        meta = {"tag": "colors" if len(include) == 1 else "color_attr", "include": include}
    elif row.get("task_type") == "object" and 1 <= len(row.get("nouns", [])) <= 2:
        nouns = row["nouns"]
        if len(set(nouns)) == len(nouns):
            meta = {"tag": "single_object" if len(nouns) == 1 else "two_object",
                    "include": [{"class": c, "count": 1} for c in nouns]}
    if meta is not None:
        meta["prompt"] = prompt
    return meta


# ---- T2I-R1's own rules (CaraJ7/T2I-R1, src/t2i-r1/src/utils/reward_git.py and reward_gdino.py), on its rows

T2I_R1_NOT_ASKED = ("spatial", "numeracy")  # reward_git.py scores these task types 0 without asking GIT
T2I_R1_NO_NOUNS = 1.0  # both reward_git.py and reward_gdino.py: a row with no nouns scores 1


def t2i_r1_row(m) -> bool:
    """Whether a prompt carries T2I-R1's fields (a prompt-file row), which its own rules read."""
    return "task_type" in m or "nouns" in m


def git_questions(m):
    """T2I-R1's GIT questions for one row -> (questions, constant): questions to ask, or a constant score.
    As reward_git.py: task types spatial and numeracy are not asked (constant 0); the phrases are the row's
    attr_nouns when it has them (e.g. "purple elephant"), else its nouns; each is asked as "<phrase>?"; a row
    with neither scores 1. (An empty attr_nouns list falls back to the nouns here; there it averaged nothing.)
    A prompt without T2I-R1's fields is not asked either (constant 0: the reward abstains)."""
    if not t2i_r1_row(m) or m.get("task_type") in T2I_R1_NOT_ASKED:
        return [], 0.0
    phrases = m.get("attr_nouns") or m.get("nouns") or []
    return ([f"{p}?" for p in phrases], None) if phrases else ([], T2I_R1_NO_NOUNS)


@dataclass
class T2IR1DetectConfig:
    # reward_gdino.py keeps GroundingDINO boxes whose phrase score exceeds 0.3; OWL-ViT's sigmoid scores run
    # lower, so the threshold is OWL-ViT's text-query value, as in GenEvalConfig (NOT calibrated on real images)
    threshold: float = 0.1
    nms_iou: float = 0.5  # reward_gdino.py's NMS before counting
    query: str = "a photo of a {}"  # OWL-ViT's prompt style; GroundingDINO reads "noun1 . noun2." spans instead
    # True: reward_gdino.py's behaviour where it looks wrong ("above" and "on top of" get no position credit,
    # every pair is "near", a spatial prompt naming one object twice scores 0, NMS reads (cx, cy, w, h) as
    # corners, a noun of 3+ words is never found); see t2i_r1_position, t2i_r1_nms, t2i_r1_detect_score
    as_released: bool = False


# "near" within 150 px: T2I-CompBench's threshold for its 512 px images, which reward_gdino.py applies to boxes
# normalised to [0, 1] (so every pair is near); here 150 / 512 of the image side
T2I_R1_NEAR = 150 / 512
_T2I_R1_SIDES = {"right of": ("x", -1), "on the right of": ("x", -1), "left of": ("x", 1), "on the left of": ("x", 1),
                 "below": ("y", -1), "on the bottom of": ("y", -1), "on the top of": ("y", 1), "top of": ("y", 1),
                 "above": ("y", 1), "on top of": ("y", 1)}


def t2i_r1_position(locality, box1, box2, as_released=False) -> float:
    """reward_gdino.py's position rule (T2I-CompBench's), box1 = obj1's box, box2 = obj2's, (x0, y0, x1, y1)
    normalised to [0, 1], y down. d = centre(box2) - centre(box1).
    near / next to / on side of: 1 if |dx| or |dy| < T2I_R1_NEAR, else T2I_R1_NEAR / max(|dx|, |dy|);
    left/right/above/below: 0 unless d points the right way along the relation's axis and is longer there than
    on the other axis; then 1 if IoU < 0.1, else 0.1 / IoU (overlapping boxes get partial credit);
    anything else: 0. Its code has no branch for "above" and "on top of" (only "on the top of" and "top of"),
    so they score 0 there; here they use the "on the top of" rule unless as_released."""
    locality = locality.strip().lower()
    c1 = ((box1[0] + box1[2]) / 2, (box1[1] + box1[3]) / 2)
    c2 = ((box2[0] + box2[2]) / 2, (box2[1] + box2[3]) / 2)
    d = {"x": c2[0] - c1[0], "y": c2[1] - c1[1]}
    if locality in ("next to", "on side of", "near"):
        near = 150 if as_released else T2I_R1_NEAR
        return 1.0 if min(abs(d["x"]), abs(d["y"])) < near else near / max(abs(d["x"]), abs(d["y"]))
    if locality not in _T2I_R1_SIDES or (as_released and locality in ("above", "on top of")):
        return 0.0
    axis, sign = _T2I_R1_SIDES[locality]
    other = "y" if axis == "x" else "x"
    if d[axis] * sign <= 0 or abs(d[axis]) <= abs(d[other]):
        return 0.0
    iou = box_iou(torch.tensor([box1], dtype=torch.float64), torch.tensor([box2], dtype=torch.float64)).item()
    return 1.0 if iou < 0.1 else 0.1 / iou


def t2i_r1_nms(boxes, scores, iou_threshold=0.5, as_released=False):
    """Class-wise NMS of one object's boxes (x0, y0, x1, y1) -> kept indices. reward_gdino.py runs it before
    counting, but on GroundingDINO's (cx, cy, w, h) boxes, which torchvision's nms reads as corners: a box
    narrower than its centre's x (or shorter than its y) then overlaps nothing, so most duplicates survive and
    are counted. as_released keeps that; otherwise the boxes are compared as boxes."""
    if as_released:
        boxes = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], -1)  # (N, 4) cx cy w h
    return nms(boxes, scores, iou_threshold)


def t2i_r1_detect_classes(m) -> list:
    """The objects reward_gdino.py looks for in a row: a spatial row's two objects, a numeracy row's counted
    objects, else its nouns."""
    if m.get("task_type") == "spatial" and m.get("spatial_info"):
        return [m["spatial_info"]["obj1"], m["spatial_info"]["obj2"]]
    if m.get("task_type") == "numeracy" and m.get("numeracy_info"):
        return [i["obj_name"] for i in m["numeracy_info"]]
    return list(m.get("nouns") or [])


def t2i_r1_detect_score(detections, m, as_released=False):
    """reward_gdino.py's score for one image -> (score, reason). detections: {"class", "box" (x0, y0, x1, y1)
    in [0, 1], "score"} after the threshold and class-wise NMS.
    no nouns: 1. spatial: 0.2 per object found; with both, + position / 2 of the two most confident boxes
    (at most 0.9). numeracy: per counted object, 1 for the exact count, 0.2 when found with another count,
    0 when absent, averaged over the objects. Other task types: the fraction of nouns found."""
    by_class = {}
    for d in sorted(detections, key=lambda d: -float(d["score"])):
        # reward_gdino.py names a box by its noun's first and last word, so a noun of three or more words
        # ("roll of paper towel") never matches itself there
        if not (as_released and len(d["class"].split()) > 2):
            by_class.setdefault(d["class"], []).append(d["box"])
    if not m.get("nouns"):
        return T2I_R1_NO_NOUNS, "no nouns: T2I-R1's constant"
    task = m.get("task_type")
    if task == "spatial" and m.get("spatial_info"):
        sp = m["spatial_info"]
        a, b = by_class.get(sp["obj1"], []), by_class.get(sp["obj2"], [])
        score = 0.2 * bool(a) + 0.2 * bool(b)
        if a and b:
            if sp["obj1"] == sp["obj2"]:  # reward_gdino.py fails on this pair and scores the image 0
                if as_released:
                    return 0.0, f"{sp['obj1']} twice: 0 as released"
                a, b = a[:1], a[1:2]
            if b:
                score += t2i_r1_position(sp["locality"], a[0], b[0], as_released) / 2
        return score, f"{sp['obj1']} {sp['locality']} {sp['obj2']}: found {len(a)} and {len(b)}"
    if task == "numeracy" and m.get("numeracy_info"):
        info = m["numeracy_info"]
        found = [len(by_class.get(i["obj_name"], [])) for i in info]
        score = sum(1.0 if n == i["num"] else 0.2 if n else 0.0 for n, i in zip(found, info)) / len(info)
        return score, ", ".join(f"{i['obj_name']}: {n} of {i['num']}" for n, i in zip(found, info))
    found = [n for n in m["nouns"] if n in by_class]
    return len(found) / len(m["nouns"]), f"found {len(found)} of {len(m['nouns'])} nouns"


# -----------------------------------------------------------------------------------------------------
# 4. Rewards: reward(images, metadata) -> (scores (B,) float32 on CPU, info {key: list of B values})


@dataclass(frozen=True)
class Checkpoint:
    files: tuple  # one entry per needed file: alternatives, first found wins; "a + b" means both
    where: str  # where it is published


_CLIP_FILES = (("model.safetensors", "pytorch_model.bin"), ("tokenizer.json", "vocab.json + merges.txt"))
CHECKPOINTS = {
    "clip": Checkpoint(_CLIP_FILES, "https://huggingface.co/openai/clip-vit-large-patch14"),
    "pickscore": Checkpoint(_CLIP_FILES, "https://huggingface.co/yuvalkirstain/PickScore_v1"),
    "hps": Checkpoint((("HPS_v2.1_compressed.pt",),
                       ("tokenizer.json", "vocab.json + merges.txt", "bpe_simple_vocab_16e6.txt.gz")),
                      "https://huggingface.co/xswu/HPSv2 (HPS_v2.1_compressed.pt); put the CLIP tokenizer.json of "
                      "https://huggingface.co/openai/clip-vit-large-patch14 beside it (same BPE as OpenCLIP)"),
    "aesthetic": Checkpoint((("sac+logos+ava1-l14-linearMSE.pth",),),
                            "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                            "sac+logos+ava1-l14-linearMSE.pth"),
    "geneval": Checkpoint((("model.safetensors", "pytorch_model.bin"), ("vocab.json + merges.txt", "tokenizer.json")),
                          "https://huggingface.co/google/owlvit-base-patch32"),
    "git": Checkpoint((("model.safetensors", "pytorch_model.bin"), ("tokenizer.json", "vocab.txt"), ("config.json",)),
                      "https://huggingface.co/microsoft/git-large-vqav2 (T2I-R1's choice, 1.6 GB) or "
                      "https://huggingface.co/microsoft/git-base-vqav2 (0.7 GB)"),
}


def reward_files(reward, key, ckpt):
    """Paths of checkpoint `key`'s files for `reward`, from ckpt[key] (a folder, or the weight file itself).
    Raises FileNotFoundError naming the reward, the file and where it is published."""
    spec, path = CHECKPOINTS[key], ckpt.get(key)
    if not path:
        raise FileNotFoundError(f"{reward}: needs the '{key}' checkpoint ({spec.files[0][0]}); pass "
                                f"--reward-ckpt {key}=PATH; download from {spec.where}")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    found = []
    for i, group in enumerate(spec.files):
        if i == 0 and os.path.isfile(path):
            found.append(path)
            continue
        for alt in group:
            names = alt.split(" + ")
            if all(os.path.isfile(os.path.join(folder, n)) for n in names):
                found.append(os.path.join(folder, names[0]))
                break
        else:
            raise FileNotFoundError(f"{reward}: {' or '.join(group)} not found in {path}; download from {spec.where}")
    return found


def default_dtype(device):
    """Precision policy: bf16 (fp16 where bf16 is missing) on GPU, fp32 on CPU."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_batch(images, metadata):
    images = as_rgb_list(images)
    if not isinstance(metadata, (list, tuple)) or len(metadata) != len(images):
        raise ValueError(f"metadata: expected a list of {len(images)} dicts (one per image), got {metadata!r:.120}")
    for i, m in enumerate(metadata):
        if not isinstance(m, dict) or "prompt" not in m:
            raise ValueError(f"metadata[{i}]: expected a dict with a 'prompt' key, got {m!r:.120}")
    return images, list(metadata)


def check_finite(name, scores):
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise FloatingPointError(f"reward '{name}' returned non-finite scores {scores[bad[:8]].tolist()} at batch "
                                 f"positions {bad[:8]}; refusing to train on them")


class Reward:
    """Base: validates files at construction, loads models on first call, checks inputs and outputs."""
    name = ""
    needs = ()  # the checkpoints it reads (CHECKPOINTS keys), each passed as --reward-ckpt KEY=PATH

    def __init__(self, ckpt=None, device=None, dtype=None, cache=None):
        self.device = default_device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.cache = {} if cache is None else cache  # shared by an ensemble so ViT-L/14 loads once
        self.files = {key: reward_files(self.name, key, ckpt or {}) for key in self.needs}
        self.loaded = False

    def __call__(self, images, metadata):
        images, metadata = check_batch(images, metadata)
        self.check_metadata(metadata, require_any=False)  # a batch may hold only prompts a rule cannot check
        self._ensure_loaded()
        with torch.no_grad():
            scores, info = self.score(images, metadata)
        scores = scores.float().cpu()
        check_finite(self.name, scores)
        return scores, info

    def _ensure_loaded(self):
        if not self.loaded:
            self.load()
            self.loaded = True

    def load(self):
        pass

    def check_metadata(self, metadata, require_any=True):
        pass

    def checks(self, m) -> bool:
        """Whether this reward really scores prompt m (rewards that abstain on some prompts say False)."""
        return True

    def owlvit_model(self):  # -> (OwlViT, CLIPTokenizer) from the 'geneval' checkpoint, cached like clip_model
        weights, tok_file = self.files["geneval"]
        cache_key = ("owlvit", weights, str(self.device), self.dtype)
        if cache_key not in self.cache:
            c = read_config(os.path.dirname(weights), "owlvit-base-patch32")
            self.cache[cache_key] = (load_owlvit(weights, c, self.device, self.dtype),
                                     CLIPTokenizer.from_folder(os.path.dirname(tok_file), c.context_length))
        return self.cache[cache_key]

    def owlvit_scores(self, images, classes, query):
        """OWL-ViT on images with one text query per class -> probabilities (B, P, Q) and boxes (B, P, 4) as
        (x0, y0, x1, y1) in [0, 1], float32 on the CPU."""
        owl, tok = self.owlvit_model()
        pixels = owlvit_preprocess(images, owl.config.image_size).to(self.device, self.dtype)
        logits, boxes = owl(pixels, tok([query.format(c) for c in classes]).to(self.device))  # (B, P, Q), (B, P, 4)
        cx, cy, w, h = boxes.float().cpu().unbind(-1)
        return torch.sigmoid(logits.float()).cpu(), torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)

    def clip_model(self, key, preset):  # -> (CLIP, CLIPTokenizer), cached per file, device and dtype
        weights, tok_file = self.files[key]
        cache_key = ("clip", weights, str(self.device), self.dtype)
        if cache_key not in self.cache:
            cfg = read_config(os.path.dirname(weights), preset)
            self.cache[cache_key] = (load_clip(weights, cfg, self.device, self.dtype),
                                     CLIPTokenizer.from_folder(os.path.dirname(tok_file), cfg.context_length))
        return self.cache[cache_key]

    def cosine(self, clip, tok, pixels, prompts):  # -> (B,) float32 cosine of image and prompt embeddings
        img = F.normalize(clip.encode_image(pixels.to(self.device, self.dtype)).float(), dim=-1)
        txt = F.normalize(clip.encode_text(tok(prompts).to(self.device)).float(), dim=-1)
        return (img * txt).sum(-1)


class ClipScore(Reward):
    """CLIPScore, OpenAI CLIP ViT-L/14: max(100 * cos(image, prompt), 0)."""
    name, needs, preset, preprocess = "clip", ("clip",), "clip-vit-large-patch14", staticmethod(clip_preprocess)

    def load(self):
        self.clip, self.tok = self.clip_model(self.name, self.preset)

    def score(self, images, metadata):
        cos = self.cosine(self.clip, self.tok, self.preprocess(images, self.clip.config.image_size),
                          [m["prompt"] for m in metadata]).cpu()
        return self.from_cosine(cos), {"cos": cos.tolist()}

    def from_cosine(self, cos):
        return (100 * cos).clamp(min=0)

    @torch.no_grad()
    def image_embeddings(self, images):  # -> (B, E) float32 unit vectors (for diversity)
        self._ensure_loaded()
        pixels = self.preprocess(images, self.clip.config.image_size).to(self.device, self.dtype)
        return F.normalize(self.clip.encode_image(pixels).float(), dim=-1).cpu()


class PickScore(ClipScore):
    """PickScore_v1 (CLIP ViT-H/14 fine-tuned on Pick-a-Pic): exp(logit_scale) * cos."""
    name, needs, preset = "pickscore", ("pickscore",), "vit-h-14"

    def from_cosine(self, cos):
        return self.clip.logit_scale.float().exp().cpu() * cos


class HPS(ClipScore):
    """HPSv2.1 (OpenCLIP ViT-H/14 fine-tuned on HPD v2): cos(image, prompt), no scale."""
    name, needs, preset, preprocess = "hps", ("hps",), "vit-h-14", staticmethod(hps_preprocess)

    def from_cosine(self, cos):
        return cos


class Aesthetic(Reward):
    """LAION aesthetic predictor v2: a linear MLP on the unit CLIP ViT-L/14 image embedding (AVA 1-10 scale)."""
    name, needs = "aesthetic", ("aesthetic", "clip")  # the MLP reads CLIP ViT-L/14's embedding

    def load(self):
        self.clip, _ = self.clip_model("clip", "clip-vit-large-patch14")
        dims = [self.clip.config.embed_dim, 1024, 128, 64, 16, 1]
        # published keys layers.{0,2,4,6,7}: the Identity slots are the training-time dropouts
        layers = [nn.Linear(dims[0], 1024), nn.Identity(), nn.Linear(1024, 128), nn.Identity(),
                  nn.Linear(128, 64), nn.Identity(), nn.Linear(64, 16), nn.Linear(16, 1)]
        self.head = nn.Module()
        self.head.layers = nn.Sequential(*layers)
        path = self.files["aesthetic"][0]
        load_weights(self.head, dict(read_tensors(path)), path).float().to(self.device)  # tiny: kept in fp32

    def score(self, images, metadata):
        pixels = clip_preprocess(images, self.clip.config.image_size).to(self.device, self.dtype)
        emb = F.normalize(self.clip.encode_image(pixels).float(), dim=-1)
        return self.head.layers(emb).squeeze(-1), {}


@dataclass
class GenEvalConfig:
    # OWL-ViT's sigmoid scores are not on the scale of GenEval's Mask2Former thresholds (0.3, and 0.9 for
    # counting). 0.1 is the text-query threshold of transformers' own OWL-ViT example for base-patch32. It was
    # NOT calibrated on real images in this repo (no weights here): check detections on GenEval prompts (and
    # the counting threshold in particular) before trusting the scores.
    threshold: float = 0.1
    counting_threshold: float = 0.1  # used for tag "counting", as GenEval keeps a separate one
    nms_iou: float = 0.5  # class-wise; OWL-ViT predicts one box per patch, so an object gets several
    max_objects: int = 16  # per class, as GenEval
    query: str = "a photo of a {}"  # text query per class, OWL-ViT's prompt style
    score: str = "dense"  # what the reward returns: "dense" in [0, 1] or "strict" in {0, 1}


def _by_task(items):  # " (T2I-R1 task types: color 2, shape 1)" for the rows that carry a task type, or ""
    tasks = collections.Counter(m["task_type"] for m in items if "task_type" in m)
    return f" (T2I-R1 task types: {', '.join(f'{t} {c}' for t, c in sorted(tasks.items()))})" if tasks else ""


def _clauses(m):
    return m.get("include", []) + m.get("exclude", [])


def checkable(m) -> bool:
    """Whether the GenEval rules can check a prompt: it carries include clauses."""
    return bool(m.get("include"))


class RuleReward(Reward):
    """Base of the rewards scored by the GenEval rule engine.

    A prompt without GenEval metadata (no include clauses) would pass every rule, a silent 1.0. Such a prompt
    is not checked: the reward abstains with a score of 0 and info["checked"] False. Within a prompt's group
    that is a constant, so it moves no advantage (sum: the group mean absorbs it; group: a flat group gets
    exactly 0); the other rewards alone decide. The caller reports how many prompts that concerns
    (RewardEnsemble.unchecked_report); a set of prompts none of which can be checked is refused."""

    # what its metadata may name: a class, colour or tag outside these could never be found, and its prompt
    # would score 0 forever (a misspelt "cirlce"). classes None: an open vocabulary (OWL-ViT reads any name)
    classes, colors, tags = None, tuple(GENEVAL_COLORS), GENEVAL_TAGS

    def __init__(self, ckpt=None, device=None, dtype=None, cache=None, config=None):
        super().__init__(ckpt, device, dtype, cache)
        self.cfg = config or GenEvalConfig()

    def check_vocabulary(self, m):
        """ValueError naming the first class, colour or tag of metadata m that this reward cannot recognise."""
        if "tag" in m and m["tag"] not in self.tags:
            raise ValueError(f"tag {m['tag']!r} is not one of {', '.join(self.tags)}")
        for part in ("include", "exclude"):
            for j, c in enumerate(m.get(part, [])):
                if self.classes is not None and c["class"] not in self.classes:
                    raise ValueError(f"{part}[{j}]: class {c['class']!r} is not one it detects "
                                     f"({', '.join(self.classes)})")
                if "color" in c and c["color"] not in self.colors:
                    raise ValueError(f"{part}[{j}]: color {c['color']!r} is not one it tells apart "
                                     f"({', '.join(self.colors)})")

    def check_metadata(self, metadata, require_any=True):
        for i, m in enumerate(metadata):
            if checkable(m) or "exclude" in m:
                try:
                    check_geneval_metadata(m)
                    self.check_vocabulary(m)
                except ValueError as e:
                    raise ValueError(f"{self.name}: prompt {i} ({m.get('prompt', '')!r:.60}): {e}") from None
        if require_any and metadata and not any(checkable(m) for m in metadata):
            raise ValueError(f"{self.name}: none of the {len(metadata)} prompt(s) carries GenEval metadata (no "
                             f"'include' clauses), e.g. {metadata[0].get('prompt', '')!r}; score this reward on JSON "
                             f"lines with GenEval metadata (the files `python shapes.py prompts` writes, GenEval's "
                             f"evaluation_metadata.jsonl) or T2I-R1's prompt file")

    def checks(self, m) -> bool:
        return checkable(m)

    def unchecked_line(self, bare, items, what):
        return (f"{self.name}: {len(bare)} of the {len(items)} {what} carry no GenEval metadata it can check"
                f"{_by_task(bare)}; it scores them 0 for every sample, a constant within their groups, so the other "
                f"rewards alone set their advantages (and its logged means leave them out)")

    def rule_scores(self, dets, metadata):
        res = [geneval_score(d, m, with_parts=True) if checkable(m) else None for d, m in zip(dets, metadata)]
        scores = torch.tensor([float(r[self.cfg.score]) if r else 0.0 for r in res])
        return scores, {"strict": [r and r["strict"] for r in res], "dense": [r and r["dense"] for r in res],
                        "parts": [r and r["parts"] for r in res],
                        "reasons": [r["reasons"] if r else ["not checked: no GenEval metadata"] for r in res],
                        "detections": dets, "checked": [r is not None for r in res]}


class GenEvalReward(RuleReward):
    """GenEval rules on OWL-ViT detections with CLIP ViT-L/14 colours; see geneval_score for the scores."""
    name, needs = "geneval", ("geneval", "clip")  # OWL-ViT boxes, CLIP ViT-L/14 colours

    def load(self):
        self.owlvit_model()
        self.clip, self.tok = self.clip_model("clip", "clip-vit-large-patch14")
        self.color_heads = {}  # object class -> (10, E) colour classifier

    def detect(self, images, metadata):
        """-> per image, detections of the classes its metadata names (threshold, one class per box, NMS)."""
        classes = sorted({c["class"] for m in metadata for c in _clauses(m)})
        if not classes:
            return [[] for _ in images]
        column = {c: i for i, c in enumerate(classes)}
        probs, boxes = self.owlvit_scores(images, classes, self.cfg.query)  # (B, P, Q), (B, P, 4) x0 y0 x1 y1
        out = []
        for img, m, p, bx in zip(images, metadata, probs, boxes):
            names = sorted({c["class"] for c in _clauses(m)})
            if not names:
                out.append([])
                continue
            # each box goes to its best class among this prompt's classes, as OWL-ViT's post-processing does
            score, label = p[:, [column[n] for n in names]].max(-1)  # (P,)
            thr = self.cfg.counting_threshold if m.get("tag") == "counting" else self.cfg.threshold
            h, w = img.shape[:2]
            xyxy = bx * torch.tensor([w, h, w, h])
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
            dets = []
            for k, name in enumerate(names):
                idx = ((label == k) & (score > thr)).nonzero().flatten()
                for i in idx[nms(xyxy[idx], score[idx], self.cfg.nms_iou)][:self.cfg.max_objects].tolist():
                    dets.append({"class": name, "box": tuple(xyxy[i].tolist()), "score": score[i].item(),
                                 "color": None})
            out.append(dets)
        return out

    def add_colors(self, image, dets, metadata):
        """Colour the `count` best detections of every include clause that asks for a colour (in place)."""
        for c in metadata.get("include", []):
            if "color" not in c:
                continue
            top = sorted([d for d in dets if d["class"] == c["class"]], key=lambda d: -d["score"])[:c["count"]]
            if not top:
                continue
            if c["class"] not in self.color_heads:
                self.color_heads[c["class"]] = color_classifier(self.clip, self.tok, c["class"], self.device)
            colors = classify_colors(self.clip, self.tok, image, [d["box"] for d in top], c["class"],
                                     self.device, self.dtype, self.color_heads[c["class"]])
            for d, color in zip(top, colors):
                d["color"] = color

    def score(self, images, metadata):
        dets = self.detect(images, metadata)
        for img, d, m in zip(images, dets, metadata):
            self.add_colors(img, d, m)
        return self.rule_scores(dets, metadata)


class T2IR1Reward(Reward):
    """Base of the rewards that score T2I-R1's prompt-file rows by its own rules (git, t2i-r1-detect). Where
    those rules give a constant (see git_questions, t2i_r1_detect_score), and on prompts without T2I-R1's
    fields (score 0), the sample is marked not checked: a constant within its group moves no advantage, and
    the logged means leave it out."""

    def check_metadata(self, metadata, require_any=True):
        for i, m in enumerate(metadata):
            if t2i_r1_row(m):
                try:
                    check_t2i_r1_row(m)
                except ValueError as e:
                    raise ValueError(f"{self.name}: prompt {i} ({m.get('prompt', '')!r:.60}): {e}") from None

    def unchecked_line(self, bare, items, what):
        return (f"{self.name}: scores {len(items) - len(bare)} of the {len(items)} {what}; the other {len(bare)}"
                f"{_by_task(bare)} get T2I-R1's constant (0 without its fields), the same for every sample, so the "
                f"other rewards alone set their advantages (and its logged means leave them out)")


class GitVQA(T2IR1Reward):
    """T2I-R1's GIT reward: per question "<phrase>?" (git_questions), p(yes) / (p(yes) + p(no)) of the first
    answer token, averaged over the prompt's questions."""
    name, needs = "git", ("git",)

    def __init__(self, ckpt=None, device=None, dtype=None, cache=None):
        super().__init__(ckpt, device, dtype, cache)
        weights, tok_file, cfg_file = self.files["git"]
        # the small files are read at start-up, so their errors come before any sampling
        self.config = git_config_from_hf(_read_json(cfg_file), cfg_file)
        self.prep = git_preprocessing(os.path.dirname(weights), self.config)
        self.tok = WordPieceTokenizer(os.path.dirname(tok_file))
        self.yes, self.no = self.tok.word_id("yes"), self.tok.word_id("no")

    def checks(self, m) -> bool:
        return bool(git_questions(m)[0])

    def load(self):
        self.model = load_git(self.files["git"][0], self.config, self.device, self.dtype)

    def yes_probability(self, images, questions):
        """images (K of them), questions [(image index, text)] -> (N,) p(yes) / (p(yes) + p(no)), float32 CPU."""
        tokens = self.model.image_tokens(clip_preprocess(images, **self.prep).to(self.device, self.dtype))  # (K, I, W)
        ids = [[self.tok.cls] + self.tok.encode(q) for _, q in questions]  # GIT's VQA input: [CLS] question
        if max(map(len, ids)) > self.config.max_positions:
            raise ValueError(f"git: a question is longer than GIT's {self.config.max_positions} text positions")
        batch = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)  # right-padded: causal text never
        for j, x in enumerate(ids):                                           # sees the padding after it
            batch[j, :len(x)] = torch.tensor(x)
        rows = torch.tensor([i for i, _ in questions], device=self.device)
        _, h = self.model.hidden(tokens, batch.to(self.device), rows)  # (N, T, W): each image computed once
        last = torch.tensor([len(x) - 1 for x in ids], device=h.device)
        logits = self.model.output(h[torch.arange(len(ids), device=h.device), last]).float()  # (N, vocab)
        # p(yes) / (p(yes) + p(no)) under the softmax is sigmoid(logit_yes - logit_no): no vocabulary-wide sum
        return torch.sigmoid(logits[:, self.yes] - logits[:, self.no]).cpu()

    def score(self, images, metadata):
        asked = [git_questions(m) for m in metadata]
        rows = [i for i, (qs, _) in enumerate(asked) if qs]
        pairs = [(k, q) for k, i in enumerate(rows) for q in asked[i][0]]
        p = self.yes_probability([images[i] for i in rows], pairs).tolist() if rows else []
        yes = [[] for _ in images]
        for (k, _), v in zip(pairs, p):
            yes[rows[k]].append(v)
        scores = torch.tensor([sum(y) / len(y) if y else c for y, (_, c) in zip(yes, asked)])
        return scores, {"questions": [qs for qs, _ in asked], "yes": yes, "checked": [bool(y) for y in yes]}


class T2IR1Detect(T2IR1Reward):
    """T2I-R1's GroundingDINO scoring rules (t2i_r1_detect_score) on OWL-ViT detections: each of a row's
    objects is its own text query, every box above the threshold counts for it, class-wise NMS."""
    name, needs = "t2i-r1-detect", ("geneval",)  # the OWL-ViT folder the geneval reward reads

    def __init__(self, ckpt=None, device=None, dtype=None, cache=None, config=None):
        super().__init__(ckpt, device, dtype, cache)
        self.cfg = config or T2IR1DetectConfig()

    def checks(self, m) -> bool:
        return t2i_r1_row(m) and bool(m.get("nouns"))

    def load(self):
        self.owlvit_model()

    def detect(self, images, metadata):
        """-> per image, detections {"class", "box" (x0, y0, x1, y1) in [0, 1], "score"} of its row's objects."""
        classes = sorted({c for m in metadata if self.checks(m) for c in t2i_r1_detect_classes(m)})
        if not classes:
            return [[] for _ in images]
        probs, boxes = self.owlvit_scores(images, classes, self.cfg.query)  # (B, P, Q), (B, P, 4)
        out = []
        for m, p, bx in zip(metadata, probs, boxes):
            dets = []
            for name in sorted(set(t2i_r1_detect_classes(m))) if self.checks(m) else []:
                q = p[:, classes.index(name)]
                idx = (q > self.cfg.threshold).nonzero().flatten()
                for i in idx[t2i_r1_nms(bx[idx], q[idx], self.cfg.nms_iou, self.cfg.as_released)].tolist():
                    dets.append({"class": name, "box": tuple(bx[i].clamp(0, 1).tolist()), "score": q[i].item()})
            out.append(dets)
        return out

    def score(self, images, metadata):
        dets = self.detect(images, metadata)
        # a T2I-R1 row without nouns gets its constant 1 from t2i_r1_detect_score; other prompts abstain with 0
        res = [t2i_r1_detect_score(d, m, self.cfg.as_released) if t2i_r1_row(m) else (0.0, "no T2I-R1 fields")
               for d, m in zip(dets, metadata)]
        return torch.tensor([r[0] for r in res]), {"reasons": [r[1] for r in res], "detections": dets,
                                                   "checked": [self.checks(m) for m in metadata]}


# -----------------------------------------------------------------------------------------------------
# 5. Selection, weights, combination, evaluation extras

# name -> Reward class; the shapes world registers its own ("shapes") when imported
REWARDS = {"clip": ClipScore, "pickscore": PickScore, "hps": HPS, "aesthetic": Aesthetic, "geneval": GenEvalReward,
           "git": GitVQA, "t2i-r1-detect": T2IR1Detect}
# T2I-R1's ensemble minus its 7B LLaVA output reward model (README, Rewards): each at weight 1, summed
REWARD_PRESETS = {"t2i-r1": "hps:1,t2i-r1-detect:1,git:1"}


def parse_rewards(spec: str) -> dict:
    """'hps:1,geneval:1,aesthetic:0.5' -> {"hps": 1.0, "geneval": 1.0, "aesthetic": 0.5}; weight defaults to 1.
    A preset name (REWARD_PRESETS: t2i-r1) stands for its list."""
    weights = {}
    items = [REWARD_PRESETS.get(item.strip(), item) for item in (spec or "").split(",")]
    for item in ",".join(items).split(","):
        if not item.strip():
            continue
        name, _, w = (s.strip() for s in item.partition(":"))
        if name in REWARD_PRESETS:
            raise ValueError(f"--rewards: the preset '{name}' takes no weight (it is {REWARD_PRESETS[name]})")
        if name not in REWARDS:
            raise ValueError(f"--rewards: unknown reward '{name}'; choose from {', '.join(REWARDS)} or the preset "
                             f"{', '.join(REWARD_PRESETS)}"
                             + ("" if "shapes" in REWARDS else " (shapes: import shapes, which registers it)"))
        if name in weights:
            raise ValueError(f"--rewards: '{name}' given twice")
        try:
            weights[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"--rewards: weight of '{name}' is not a number: '{w}'") from None
        if not math.isfinite(weights[name]):
            raise ValueError(f"--rewards: weight of '{name}' must be finite, got {w}")
    if not weights:
        raise ValueError("--rewards: no reward given")
    return weights


def parse_reward_ckpt(items) -> dict:
    """['hps=PATH', 'clip=PATH'] (or one string with spaces/commas between them) -> {"hps": PATH, ...}."""
    if isinstance(items, str):
        items = items.replace(",", " ").split()
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--reward-ckpt: expected NAME=PATH, got '{item}'")
        if name not in CHECKPOINTS:
            raise ValueError(f"--reward-ckpt: unknown checkpoint '{name}'; choose from {', '.join(CHECKPOINTS)}")
        out[name] = os.path.expanduser(path)
    return out


def combine_rewards(scores: dict, weights: dict, mode="sum", group_size=None):
    """Weighted combination of per-reward scores (B,) -> (B,).

    sum:   sum_k w_k * r_k (T2I-R1 adds its rewards unweighted).
    group: sum_k w_k * (r_k - mean_g) / (std_g + 1e-4), mean and unbiased std over each group of group_size
           consecutive samples (the G images of one prompt), so no reward dominates by its scale alone."""
    total = None
    for name, w in weights.items():
        r = scores[name].float()
        check_finite(name, r)
        if mode == "group":
            if not group_size or group_size < 2 or r.numel() % group_size:
                raise ValueError(f"group combination needs group_size >= 2 dividing the batch ({r.numel()}), "
                                 f"got {group_size}")
            r = group_advantages(r, group_size)  # the advantages' normalisation: flat groups exactly 0
        elif mode != "sum":
            raise ValueError(f"combine mode must be 'sum' or 'group', got '{mode}'")
        total = w * r if total is None else total + w * r
    return total


class RewardEnsemble:
    """The chosen rewards with their weights. Construction checks every file (fails at start-up, not at step
    500); models load on first use; scoring runs in batches and refuses NaN/inf."""

    def __init__(self, weights: dict, ckpt: dict, device=None, dtype=None, batch_size=16, geneval=None,
                 t2i_r1_detect=None):
        cache = {}
        self.weights, self.batch_size = dict(weights), batch_size
        self.rewards = {}
        for name in self.weights:
            config = geneval if issubclass(REWARDS[name], RuleReward) else t2i_r1_detect if name == "t2i-r1-detect" \
                else None
            extra = {"config": config} if config is not None else {}
            self.rewards[name] = REWARDS[name](ckpt, device, dtype, cache, **extra)

    def check_metadata(self, metadata):
        """Fail before any sampling when a reward cannot score these prompts (malformed GenEval metadata, or
        none at all for a rule reward)."""
        for reward in self.rewards.values():
            reward.check_metadata(metadata)

    def unchecked_report(self, items, what="prompts") -> list:
        """How many of these prompts each reward scores, a line per reward, when some reward abstains on some
        of them (a rule reward without GenEval metadata, git and t2i-r1-detect where T2I-R1 gives a constant):
        how many, by T2I-R1 task type when the rows carry one, and what that means. Nothing when every reward
        scores every prompt."""
        bare = {name: [m for m in items if not r.checks(m)] for name, r in self.rewards.items()}
        if not any(bare.values()):
            return []
        return [r.unchecked_line(bare[name], items, what) if bare[name] else f"{name}: scores all {len(items)} {what}"
                for name, r in self.rewards.items()]

    def __call__(self, images, metadata, progress=None):
        """-> scores {name: (B,) float32}, info {name: {key: list of B values}}. progress(k) is called after
        each batch of k images of each reward."""
        images, metadata = check_batch(images, metadata)
        scores, info = {}, {}
        for name, reward in self.rewards.items():
            parts, merged = [], {}
            for i in range(0, len(images), self.batch_size):
                s, inf = reward(images[i:i + self.batch_size], metadata[i:i + self.batch_size])
                parts.append(s)
                for k, v in inf.items():
                    merged.setdefault(k, []).extend(v)
                if progress is not None:
                    progress(len(s))
            merged.setdefault("checked", [True] * len(images))  # rewards that never abstain check every image
            scores[name], info[name] = torch.cat(parts), merged
        return scores, info

    def combine(self, scores, mode="sum", group_size=None):
        return combine_rewards(scores, self.weights, mode, group_size)


def diversity(embeddings_per_prompt) -> float:
    """Mean over prompts of the mean pairwise cosine distance (1 - cos) among one prompt's image embeddings.
    Input: a list of (N_i, E) tensors or one (P, N, E) tensor; prompts with fewer than 2 images are skipped."""
    vals = []
    for e in embeddings_per_prompt:
        if e.shape[0] < 2:
            continue
        e = F.normalize(e.float(), dim=-1)
        i, j = torch.triu_indices(e.shape[0], e.shape[0], 1)
        vals.append((1 - (e[i] * e[j]).sum(-1)).mean())
    if not vals:
        raise ValueError("diversity: needs at least one prompt with 2 or more images")
    return torch.stack(vals).mean().item()
