"""VQ-16, the image tokenizer of Janus-Pro's generation path (LlamaGen's VQ model).

encode: image in [-1, 1] (B, 3, S, S) -> codes (B, (S/16)^2), raster order.
decode_code: codes (B, N) -> image in [-1, 1] (B, 3, S, S).

Module and parameter names follow the published `gen_vision_model.*` keys, so the deepseek checkpoint
loads without renaming (checkpoints.py maps the transformers layout onto these names).

Departures from the reference code:
- sizes are configurable (`VQConfig`): the published model always uses the defaults here, the shapes
  world and the tests use tiny ones; a deepseek checkpoint with other sizes cannot exist, so nothing
  is lost by allowing them;
- only what inference and RL need: no losses, no dropout, no codebook-usage statistics (the
  `codebook_used` buffer is kept only so saved files have the published keys);
- the single-head spatial attention goes through `scaled_dot_product_attention`.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQConfig:
    image_size: int = 384              # the published weights only work at 384
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    ch: int = 128                      # base channels
    encoder_ch_mult: tuple = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2            # per encoder level; the decoder uses one more

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @property
    def grid(self) -> int:             # image tokens per side
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid ** 2

    def __post_init__(self):
        self.encoder_ch_mult = tuple(self.encoder_ch_mult)
        self.decoder_ch_mult = tuple(self.decoder_ch_mult)
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(f"encoder_ch_mult {self.encoder_ch_mult} and decoder_ch_mult "
                             f"{self.decoder_ch_mult} must have the same length")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the VQ's "
                             f"downsampling factor {self.downsample}")
        for c in {self.ch * m for m in self.encoder_ch_mult + self.decoder_ch_mult}:  # z only meets convolutions
            if c % 32:
                raise ValueError(f"VQ channel count {c} is not divisible by 32 (GroupNorm groups)")


def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """One attention head over the h*w positions, 1x1 convs for q, k, v and the output."""

    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # scale C^-0.5, as the reference
        h = h[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only, as the reference


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        # nearest interpolation in float32: bf16 upsampling is not supported everywhere
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))


class Level(nn.Module):
    """One resolution level: res blocks, each followed by an attention block where the level has them."""

    def __init__(self, c_in, c_out, n_res, attn, resample=None):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c_in if i == 0 else c_out, c_out) for i in range(n_res))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_res if attn else 0))
        self.downsample = Downsample(c_out) if resample == "down" else None
        self.upsample = Upsample(c_out) if resample == "up" else None

    def forward(self, x):
        for i, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[i](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult = cfg.encoder_ch_mult
        n = len(mult)
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        chans = [cfg.ch] + [cfg.ch * m for m in mult]  # level i maps chans[i] -> chans[i + 1]
        # attention only at the lowest resolution; downsample after every level but the last
        self.conv_blocks = nn.ModuleList(
            Level(chans[i], chans[i + 1], cfg.num_res_blocks, attn=i == n - 1, resample="down" if i < n - 1 else None)
            for i in range(n))
        c = chans[-1]
        self.mid = nn.ModuleList([ResBlock(c, c), AttnBlock(c), ResBlock(c, c)])
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult = cfg.decoder_ch_mult
        n = len(mult)
        c = cfg.ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(c, c), AttnBlock(c), ResBlock(c, c)])
        # index 0 is the lowest resolution; attention there only; upsample after every level but the last
        chans = [c] + [cfg.ch * m for m in reversed(mult)]
        self.conv_blocks = nn.ModuleList(
            Level(chans[i], chans[i + 1], cfg.num_res_blocks + 1, attn=i == 0, resample="up" if i < n - 1 else None)
            for i in range(n))
        self.norm_out = group_norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    """Nearest codebook entry under l2 normalisation of both the latent and the codebook."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        # unused at inference; kept (zeros, float32, length 65536) so saved files carry the published keys
        self.register_buffer("codebook_used", torch.zeros(65536))

    def codes(self, z):  # z (B, D, h, w) -> codes (B, h*w)
        B = z.shape[0]
        z = F.normalize(z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)  # (B*h*w, D)
        e = F.normalize(self.embedding.weight.float(), dim=-1)                          # (K, D)
        # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e ; the first two terms are 1 after normalisation but we keep
        # the reference's full expression so ties break the same way
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()             # (B*h*w, K)
        return d.argmin(1).view(B, -1)

    def entries(self, codes, grid):  # codes (B, N) -> (B, D, grid, grid)
        e = F.normalize(self.embedding(codes), dim=-1)  # (B, N, D)
        return e.view(codes.shape[0], grid, grid, -1).permute(0, 3, 1, 2)


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    @torch.no_grad()
    def encode(self, images):
        """images in [-1, 1], (B, 3, S, S) -> codes (B, (S/16)^2), raster order. The published weights are
        meant for S = 384 (cfg.image_size), but any multiple of the downsampling factor runs."""
        f = self.cfg.downsample
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3] or images.shape[2] % f:
            raise ValueError(f"VQ.encode expects images of shape (B, 3, S, S) with S a multiple of {f} "
                             f"(the model's S is {self.cfg.image_size}), got {tuple(images.shape)}")
        dtype = self.quant_conv.weight.dtype
        return self.quantize.codes(self.quant_conv(self.encoder(images.to(dtype))))

    def decode_code(self, codes):
        """codes (B, g*g), raster order -> images in [-1, 1] (not clamped), (B, 3, 16g, 16g); g is the model's
        grid (cfg.grid) in normal use, any square works."""
        K = self.cfg.codebook_size
        g = int(round(codes.shape[-1] ** 0.5)) if codes.ndim == 2 else 0
        if codes.ndim != 2 or g * g != codes.shape[1] or g == 0:
            raise ValueError(f"VQ.decode_code expects codes of shape (B, g*g), e.g. (B, {self.cfg.num_tokens}), "
                             f"got {tuple(codes.shape)}")
        if codes.min() < 0 or codes.max() >= K:
            raise ValueError(f"VQ codes must lie in [0, {K}), got [{codes.min().item()}, {codes.max().item()}]")
        z = self.quantize.entries(codes, g)
        return self.decoder(self.post_quant_conv(z))


def to_uint8(images):
    """Pixels in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), the project's image convention."""
    # truncation, not rounding, as the reference's assignment into a uint8 array
    x = ((images.float() + 1) / 2 * 255).clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def from_uint8(images):
    """uint8 (B, H, W, 3) -> float pixels in [-1, 1] (B, 3, H, W)."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1
