"""Tests of vq.py: VQ-16's shapes, ranges and quantizer.
"""

import pytest
import torch

import kernels as K
import vq as V
from conftest import tiny_cfg


def test_vq_shapes_range_and_quantizer():
    torch.manual_seed(0)
    cfg = tiny_cfg().vq
    vq = V.VQModel(cfg).eval()
    B, N, K = 3, cfg.num_tokens, cfg.codebook_size
    codes = torch.randint(0, K, (B, N))
    with torch.no_grad():
        img = vq.decode_code(codes)
        assert img.shape == (B, 3, cfg.image_size, cfg.image_size)
        u8 = V.to_uint8(img)
        assert u8.dtype == torch.uint8 and u8.shape == (B, cfg.image_size, cfg.image_size, 3)
        # pixel convention: -1 -> 0, 1 -> 255, out of range clipped, truncation
        edge = V.to_uint8(torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 3, 1, 2))
        assert sorted(edge.flatten().tolist()) == sorted([0, 0, 127, 254, 255, 255])
        # decoding a codebook vector and re-quantizing it gives the code back
        z = vq.quantize.entries(codes, cfg.grid)
        assert torch.equal(vq.quantize.codes(z), codes)
        assert torch.equal(vq.quantize.codes(3.7 * z), codes)  # l2-normalised: the scale is irrelevant
        # encode = nearest codebook entry by cosine, computed here independently
        x = torch.rand(B, 3, cfg.image_size, cfg.image_size) * 2 - 1
        got = vq.encode(x)
        lat = vq.quant_conv(vq.encoder(x)).permute(0, 2, 3, 1).reshape(B, N, -1)
        cos = torch.nn.functional.cosine_similarity(lat[:, :, None], vq.quantize.embedding.weight[None, None], dim=-1)
        assert torch.equal(got, cos.argmax(-1))
    with pytest.raises(ValueError, match="codes of shape"):
        vq.decode_code(codes[:, :-1])  # not a square grid
    assert vq.decode_code(codes[:, :4]).shape == (B, 3, 2 * cfg.downsample, 2 * cfg.downsample)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        vq.decode_code(torch.full((1, N), K))
    with pytest.raises(ValueError, match="images of shape"):
        vq.encode(torch.zeros(1, 3, 8, 6))
    # z's channels meet convolutions only (no GroupNorm), so any count works, as in deepseek's and transformers' VQ
    small_z = V.VQModel(V.VQConfig(**{**vars(cfg), "z_channels": 8})).eval()
    with torch.no_grad():
        assert small_z.decode_code(small_z.encode(torch.zeros(1, 3, cfg.image_size, cfg.image_size))).shape[1] == 3
    with pytest.raises(ValueError, match="channel count 48 is not divisible by 32"):
        V.VQConfig(**{**vars(cfg), "ch": 48})
