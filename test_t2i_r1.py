"""Tests for t2i-r1. CPU only, tiny random models, seconds each; GPU and reference checks skip cleanly.

Run: python -m pytest -q test_t2i_r1.py
"""


# ---- rewards ----
# Tiny random (or constructed) weights written in the published layouts: HF CLIPModel safetensors + config.json
# (clip, pickscore), an fp16 OpenCLIP pickle {'state_dict': ...} with 'module.' prefixes (hps), the aesthetic
# .pth with layers.{0,2,4,6,7}, OWL-ViT safetensors + vocab.json + merges.txt (geneval).
import argparse
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import rewards as R


def _bytes_alphabet():
    # byte-level BPE's printable stand-ins, in CLIP's vocabulary order (written here independently of rewards.py)
    shown = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    return [chr(b) for b in shown] + [chr(256 + n) for n in range(256 - len(shown))]


# merges spelling "photo", "of", "cat"; with the alphabet above, "a</w>" lands on id 320 as in the real vocab
_MERGES = [("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("o", "f</w>"), ("c", "a"), ("ca", "t</w>")]
_SOT, _EOT = 519, 520  # 512 byte tokens, 7 merges, then the two specials: EOT is the largest id
_VOCAB = 521


def _write_vocab(folder):
    base = _bytes_alphabet()
    words = base + [b + "</w>" for b in base] + ["".join(m) for m in _MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({w: i for i, w in enumerate(words)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in _MERGES) + "\n")


def _tiny_cfg(**kw):
    base = dict(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4,
                vision_mlp=64, vocab_size=_VOCAB, context_length=77, text_width=24, text_layers=2, text_heads=2,
                text_mlp=48, act="quick_gelu")
    return R.CLIPConfig(**{**base, **kw})


def _hf_config(c, model_type="clip"):
    return {"model_type": model_type, "projection_dim": c.embed_dim,
            "text_config": {"vocab_size": c.vocab_size, "hidden_size": c.text_width, "intermediate_size": c.text_mlp,
                            "num_hidden_layers": c.text_layers, "num_attention_heads": c.text_heads,
                            "max_position_embeddings": c.context_length, "hidden_act": c.act},
            "vision_config": {"hidden_size": c.vision_width, "intermediate_size": c.vision_mlp,
                              "num_hidden_layers": c.vision_layers, "num_attention_heads": c.vision_heads,
                              "image_size": c.image_size, "patch_size": c.patch_size, "hidden_act": c.act}}


def _random_state(module, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    # fp16-representable values, so the fp16 OpenCLIP copy holds exactly the same numbers
    return {k: (torch.randn(v.shape, generator=g) * scale).half().float() for k, v in module.state_dict().items()}


def _write_hf_clip(folder, c, sd, model_type="clip"):
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(_hf_config(c, model_type), f)
    _write_vocab(folder)


def _to_openclip(sd, c):
    """HF CLIPModel keys -> OpenCLIP keys, written out by hand (the reverse of what rewards.py must do)."""
    out = {}
    for tower, pre, n in [("vision_model.", "visual.", c.vision_layers), ("text_model.", "", c.text_layers)]:
        for i in range(n):
            h, o = f"{tower}encoder.layers.{i}.", f"{pre}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[o + f"attn.in_proj_{kind}"] = torch.cat([sd[h + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
                out[o + f"attn.out_proj.{kind}"] = sd[h + f"self_attn.out_proj.{kind}"]
                out[o + f"ln_1.{kind}"] = sd[h + f"layer_norm1.{kind}"]
                out[o + f"ln_2.{kind}"] = sd[h + f"layer_norm2.{kind}"]
                out[o + f"mlp.c_fc.{kind}"] = sd[h + f"mlp.fc1.{kind}"]
                out[o + f"mlp.c_proj.{kind}"] = sd[h + f"mlp.fc2.{kind}"]
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = sd[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    out["visual.proj"] = sd["visual_projection.weight"].t()
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = sd["text_projection.weight"].t()
    out["logit_scale"] = sd["logit_scale"]
    return {"module." + k: v.half().contiguous() for k, v in out.items()}


def _clip_sd(c, seed=0, logit_scale=math.log(100.0)):
    sd = _random_state(R.CLIP(c), seed)
    sd["logit_scale"] = torch.tensor(logit_scale)
    return sd


def _images(n=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def _meta(n, prompt="a photo of a cat"):
    return [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": prompt} for _ in range(n)]


# ---- rewards: tokenizer


def test_clip_tokenizer_small_vocab(tmp_path):
    _write_vocab(tmp_path)
    tok = R.CLIPTokenizer.from_folder(str(tmp_path))
    ids = tok(["a photo of a cat", "  A PHOTO\tof a  Cat "])
    expect = [_SOT, 320, 515, 516, 320, 518, _EOT]  # a</w>, photo</w>, of</w>, a</w>, cat</w>
    assert ids.shape == (2, 77)
    assert ids[0, :7].tolist() == expect and ids[0, 7:].eq(0).all()
    assert ids[1, :7].tolist() == expect  # lowercase and whitespace clean-up
    long = tok(["cat " * 200])[0]
    assert long[0] == _SOT and long[-1] == _EOT and long[1:-1].eq(518).all()  # truncated, EOT kept last
    owl = R.CLIPTokenizer.from_folder(str(tmp_path), context_length=16)
    assert owl(["a cat"]).shape == (1, 16) and owl(["a cat"])[0, 4:].eq(0).all()  # OWL-ViT: 16, padded with 0


def test_clip_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    _write_vocab(tmp_path)
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    ours = R.CLIPTokenizer.from_folder(str(tmp_path))
    for text in ["a photo of a cat", "Photo OF cats!! don't 42", "héllo wörld\n\tphoto", "cat, cat; cat.", "🐱 of"]:
        want = ref(text)["input_ids"]
        assert ours([text])[0, :len(want)].tolist() == want, text


def _published_bpe():
    path = os.environ.get("T2I_R1_CLIP_BPE")
    if not path:
        import importlib.util
        spec = importlib.util.find_spec("open_clip")  # finds the package without importing it (needs torchvision)
        path = spec and os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    return path if path and os.path.isfile(path) else None


def test_clip_tokenizer_published_ids():
    path = _published_bpe()
    if path is None:
        pytest.skip("published CLIP BPE (open_clip's bpe_simple_vocab_16e6.txt.gz) not found; set T2I_R1_CLIP_BPE")
    tok = R.CLIPTokenizer.from_folder(os.path.dirname(path))
    assert tok(["a photo of a cat"])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]


# ---- rewards: CLIP loading


def test_openclip_and_hf_layouts_give_same_embeddings(tmp_path):
    c = _tiny_cfg(act="gelu")
    sd = _clip_sd(c)
    _write_hf_clip(tmp_path / "hf", c, sd)
    torch.save({"state_dict": _to_openclip(sd, c), "epoch": 3}, tmp_path / "openclip.pt")
    # old HF repos ship pytorch_model.bin, sometimes with position_ids buffers
    torch.save({**sd, "text_model.embeddings.position_ids": torch.arange(77)[None]}, tmp_path / "pytorch_model.bin")
    hf = R.load_clip(str(tmp_path / "hf" / "model.safetensors"), c)
    oc = R.load_clip(str(tmp_path / "openclip.pt"), c)
    bin_ = R.load_clip(str(tmp_path / "pytorch_model.bin"), c)
    ids = R.CLIPTokenizer.from_folder(str(tmp_path / "hf"))(["a photo of a cat", "photo"])
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(hf.encode_text(ids), oc.encode_text(ids), atol=1e-5)
        assert torch.allclose(hf.encode_image(px), oc.encode_image(px), atol=1e-5)
        assert torch.equal(hf.encode_image(px), bin_.encode_image(px))
        # and the weights are really used: a different seed gives different embeddings
        other = R.load_clip(str(tmp_path / "hf" / "model.safetensors"), c)
        other.visual_projection.weight.mul_(-1)
        assert not torch.allclose(hf.encode_image(px), other.encode_image(px))


def test_config_from_hf_fills_published_defaults():
    # google/owlvit-base-patch32's config.json leaves most sizes to transformers' defaults
    c = R.config_from_hf({"model_type": "owlvit", "projection_dim": 512, "text_config": {"max_length": 16},
                          "vision_config": {}})
    assert c == R.PRESETS["owlvit-base-patch32"]
    c = R.config_from_hf({"model_type": "clip", "projection_dim": 1024,
                          "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                          "num_hidden_layers": 24, "hidden_act": "gelu"},
                          "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                                            "num_hidden_layers": 32, "patch_size": 14, "hidden_act": "gelu"}})
    assert c == R.PRESETS["vit-h-14"]


def test_wrong_keys_error_lists_them_and_names_file(tmp_path):
    c = _tiny_cfg()
    sd = _clip_sd(c)
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # old checkpoints: ignored
    del sd["vision_model.post_layernorm.bias"]
    sd["vision_model.extra_head.weight"] = torch.zeros(3)
    sd["text_projection.weight"] = torch.zeros(5, 5)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        R.load_clip(str(tmp_path / "model.safetensors"), c)
    msg = str(e.value)
    assert "model.safetensors" in msg and "vision_model.post_layernorm.bias" in msg
    assert "vision_model.extra_head.weight" in msg and "text_projection.weight" in msg
    assert "position_ids" not in msg


# ---- rewards: the rewards on tiny published-layout files


def _reward_folders(tmp_path):
    """clip (quick_gelu) and pickscore (gelu) in HF layout, hps in OpenCLIP fp16 layout with the same weights
    as pickscore, the aesthetic head, and a random OWL-ViT."""
    clip_c, h_c = _tiny_cfg(), _tiny_cfg(act="gelu")
    _write_hf_clip(tmp_path / "clip", clip_c, _clip_sd(clip_c, seed=1))
    h_sd = _clip_sd(h_c, seed=2)
    _write_hf_clip(tmp_path / "pickscore", h_c, h_sd)
    os.makedirs(tmp_path / "hps")
    torch.save({"state_dict": _to_openclip(h_sd, h_c)}, tmp_path / "hps" / "HPS_v2.1_compressed.pt")
    _write_vocab(tmp_path / "hps")
    with open(tmp_path / "hps" / "config.json", "w") as f:  # the published folder has none: preset vit-h-14
        json.dump(_hf_config(h_c), f)
    os.makedirs(tmp_path / "aesthetic")
    dims = [16, 1024, 128, 64, 16, 1]
    g = torch.Generator().manual_seed(3)
    head = {}
    for k, (i, o) in zip([0, 2, 4, 6, 7], zip(dims, dims[1:])):
        head[f"layers.{k}.weight"] = torch.randn(o, i, generator=g) / math.sqrt(i)
        head[f"layers.{k}.bias"] = torch.randn(o, generator=g) * 0.1
    torch.save(head, tmp_path / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")
    owl_c = _tiny_cfg(image_size=64, patch_size=32, context_length=16, text_width=16)
    sd = _random_state(R.OwlViT(owl_c), seed=4)
    sd = {k.replace(".pre_layrnorm.", ".pre_layernorm."): v for k, v in sd.items()}  # OWL-ViT's spelling
    _write_hf_clip(tmp_path / "owlvit", owl_c, sd, model_type="owlvit")
    return {k: str(tmp_path / v) for k, v in
            [("clip", "clip"), ("pickscore", "pickscore"), ("hps", "hps"), ("aesthetic", "aesthetic"),
             ("geneval", "owlvit")]}, head


def test_every_reward_loads_and_scores(tmp_path):
    ckpt, head = _reward_folders(tmp_path)
    weights = {"clip": 1, "pickscore": 1, "hps": 1, "aesthetic": 0.5, "geneval": 1}
    ens = R.RewardEnsemble(weights, ckpt, device="cpu", batch_size=3)
    imgs, meta = _images(5), _meta(5)
    scores, info = ens(imgs, meta)
    for name in weights:
        assert scores[name].shape == (5,) and scores[name].dtype == torch.float32, name
        assert torch.isfinite(scores[name]).all(), name
    # clip = max(100 cos, 0)
    cos = torch.tensor(info["clip"]["cos"])
    assert torch.allclose(scores["clip"], (100 * cos).clamp(min=0), atol=1e-4) and cos.abs().max() <= 1
    # pickscore (logit_scale = ln 100 in the file) = 100 cos; hps holds the same weights in OpenCLIP fp16 layout
    # and, for square images, its preprocessing equals CLIP's: hps = cos of pickscore
    assert torch.allclose(scores["pickscore"], 100 * torch.tensor(info["pickscore"]["cos"]), atol=1e-4)
    assert torch.allclose(scores["hps"], scores["pickscore"] / 100, atol=1e-5)
    # aesthetic = the head applied, by hand here, to the unit ViT-L/14 (clip folder) image embedding
    emb = ens.rewards["clip"].image_embeddings(imgs)
    x = emb
    for k in [0, 2, 4, 6, 7]:
        x = x @ head[f"layers.{k}.weight"].t() + head[f"layers.{k}.bias"]
    assert torch.allclose(scores["aesthetic"], x.squeeze(-1), atol=1e-4)
    assert ens.rewards["aesthetic"].clip is ens.rewards["clip"].clip  # ViT-L/14 loaded once
    assert set(info["geneval"]) >= {"strict", "dense", "detections"} and len(info["geneval"]["dense"]) == 5
    total = ens.combine(scores)
    assert torch.allclose(total, sum(w * scores[n] for n, w in weights.items()))


def test_missing_files_fail_at_construction(tmp_path):
    ckpt, _ = _reward_folders(tmp_path)
    os.remove(os.path.join(ckpt["hps"], "HPS_v2.1_compressed.pt"))
    with pytest.raises(FileNotFoundError) as e:
        R.RewardEnsemble({"clip": 1, "hps": 1}, ckpt, device="cpu")
    msg = str(e.value)
    assert msg.startswith("hps:") and "HPS_v2.1_compressed.pt" in msg and ckpt["hps"] in msg
    assert "huggingface.co/xswu/HPSv2" in msg
    with pytest.raises(FileNotFoundError, match=r"aesthetic: needs the 'clip' checkpoint.*--reward-ckpt clip="):
        R.RewardEnsemble({"aesthetic": 1}, {"aesthetic": ckpt["aesthetic"]}, device="cpu")
    os.remove(os.path.join(ckpt["geneval"], "merges.txt"))
    with pytest.raises(FileNotFoundError,
                       match=r"geneval: vocab.json \+ merges.txt or tokenizer.json not found.*owlvit"):
        R.GenEvalReward(ckpt, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"pickscore: .*yuvalkirstain/PickScore_v1"):
        R.PickScore({"pickscore": str(tmp_path / "nowhere")}, device="cpu")


def test_weight_file_path_and_bad_images(tmp_path):
    ckpt, _ = _reward_folders(tmp_path)
    ckpt["hps"] = os.path.join(ckpt["hps"], "HPS_v2.1_compressed.pt")  # a file path works as well as its folder
    hps = R.HPS(ckpt, device="cpu")
    rgb = _images(2, size=48)
    base, _ = hps(rgb, _meta(2))
    gray = rgb[..., 0]
    s_gray, _ = hps(gray, _meta(2))
    s_gray1, _ = hps(gray[..., None], _meta(2))
    s_gray3, _ = hps(gray[..., None].expand(-1, -1, -1, 3).contiguous(), _meta(2))
    assert torch.allclose(s_gray, s_gray3) and torch.allclose(s_gray1, s_gray3)
    rgba = torch.cat([rgb, torch.zeros_like(rgb[..., :1])], -1)  # alpha 0 everywhere: dropped, not composited
    assert torch.allclose(hps(rgba, _meta(2))[0], base)
    assert torch.allclose(hps(rgb.numpy(), _meta(2))[0], base)
    pil = [Image.fromarray(np.full((30, 70, 3), 200, np.uint8)), Image.fromarray(np.zeros((90, 20), np.uint8))]
    assert hps(pil, _meta(2))[0].shape == (2,)
    with pytest.raises(ValueError, match="float32"):
        hps(rgb.float(), _meta(2))
    with pytest.raises(ValueError, match=r"shape \(48, 48\)"):
        hps(rgb[0, ..., 0], _meta(1))  # one grayscale image without the batch axis
    with pytest.raises(ValueError, match=r"images\[0\].*shape \(48, 48, 2\)"):
        hps(rgb[..., :2], _meta(2))
    with pytest.raises(ValueError, match="metadata: expected a list of 48"):
        hps(rgb[0], _meta(1))  # (48, 48, 3) reads as 48 grayscale images; the metadata count catches it
    with pytest.raises(ValueError, match="empty"):
        hps([], [])
    with pytest.raises(ValueError, match="metadata"):
        hps(rgb, _meta(1))
    with pytest.raises(ValueError, match="prompt"):
        hps(rgb, [{"tag": "x"}, {"tag": "y"}])


def test_preprocessing_geometry():
    img = np.zeros((50, 100, 3), np.uint8)
    img[:, :50] = 255  # left half white
    x = R.hps_preprocess([img], size=20)  # long side 100 -> 20: a 10 x 20 image padded 5 rows top and bottom
    black = (0 - torch.tensor(R.CLIP_MEAN)) / torch.tensor(R.CLIP_STD)
    white = (1 - torch.tensor(R.CLIP_MEAN)) / torch.tensor(R.CLIP_STD)
    assert x.shape == (1, 3, 20, 20)
    assert torch.allclose(x[0, :, :5].mean((1, 2)), black, atol=1e-5)
    assert torch.allclose(x[0, :, 15:].mean((1, 2)), black, atol=1e-5)
    assert torch.allclose(x[0, :, 6:14, :8].mean((1, 2)), white, atol=0.05)
    y = R.clip_preprocess([img], size=20)  # short side 50 -> 20 (40 wide), centre crop keeps x 10..30 of 40
    assert y.shape == (1, 3, 20, 20)
    assert torch.allclose(y[0, :, :, :8].mean((1, 2)), white, atol=0.05)
    assert torch.allclose(y[0, :, :, 12:].mean((1, 2)), black, atol=0.05)
    z = R.owlvit_preprocess([img], size=20)  # plain resize: left half stays white
    assert torch.allclose(z[0, :, :, :9].mean((1, 2)), white, atol=0.05)


def test_nan_reward_raises_naming_it(tmp_path):
    c = _tiny_cfg()
    sd = _clip_sd(c)
    sd["visual_projection.weight"][0, 0] = float("nan")
    _write_hf_clip(tmp_path / "clip", c, sd)
    ens = R.RewardEnsemble({"clip": 1}, {"clip": str(tmp_path / "clip")}, device="cpu")
    with pytest.raises(FloatingPointError, match="reward 'clip'"):
        ens(_images(2), _meta(2))
    with pytest.raises(FloatingPointError, match="reward 'hps'"):
        R.combine_rewards({"hps": torch.tensor([1.0, float("inf")])}, {"hps": 1.0})


# ---- rewards: OWL-ViT


def _planted_owlvit(folder, k=5.0, box_logits=None):
    """A 3 x 3 patch OWL-ViT whose class logit is k * (bright - dark) per patch and whose box head outputs a
    constant chosen so that the box of patch (row 1, col 2) is exactly that patch."""
    c = _tiny_cfg(image_size=96, patch_size=32, vision_width=4, vision_layers=1, vision_heads=1, vision_mlp=4,
                  context_length=16, text_width=16)
    sd = _random_state(R.OwlViT(c), seed=5)
    v = "owlvit.vision_model."
    zero = lambda *names: [sd.__setitem__(n, torch.zeros_like(sd[n])) for n in names]
    w = torch.zeros(4, 3, 32, 32)
    w[0], w[1] = 1 / (3 * 32 * 32), -1 / (3 * 32 * 32)  # dims 0/1: +-(mean normalised pixel of the patch)
    sd[v + "embeddings.patch_embedding.weight"] = w
    sd[v + "embeddings.class_embedding"] = torch.tensor([0.0, 0.0, 1.0, -1.0])
    zero(v + "embeddings.position_embedding.weight")
    for ln, bias in [(v + "pre_layrnorm", 0.0), (v + "post_layernorm", 1.0), ("layer_norm", 0.0)]:
        sd[ln + ".weight"], sd[ln + ".bias"] = torch.ones(4), torch.full((4,), bias)
    L = v + "encoder.layers.0."
    zero(L + "self_attn.out_proj.weight", L + "self_attn.out_proj.bias", L + "mlp.fc2.weight", L + "mlp.fc2.bias")
    # LN keeps only the sign of the patch's brightness: (+-sqrt2, -+sqrt2, 0, 0); after post_layernorm, the
    # product with the class token and layer_norm, feature0 - feature1 has the sign of the brightness
    zero("class_head.dense0.weight", "class_head.dense0.bias", "class_head.logit_shift.bias",
         "class_head.logit_scale.weight", "class_head.logit_scale.bias")
    sd["class_head.logit_shift.weight"] = torch.tensor([[k, -k, 0.0, 0.0]])
    for n in ("dense0", "dense1", "dense2"):
        zero(f"box_head.{n}.weight", f"box_head.{n}.bias")
    logit = lambda p: math.log(p) - math.log1p(-p)
    prior = lambda p: math.log(p + 1e-4) - math.log1p(-p + 1e-4)  # the published prior, at the patch corner
    # patch (row 1, col 2) of 3: corner (1, 2/3); we want centre (2.5/3, 1.5/3) and size 1/3
    sd["box_head.dense2.bias"] = torch.tensor([logit(2.5 / 3) - prior(1.0), logit(1.5 / 3) - prior(2 / 3), 0.0, 0.0])
    if box_logits is not None:
        sd["box_head.dense2.bias"] = torch.tensor(box_logits)
    sd = {k.replace(".pre_layrnorm.", ".pre_layernorm."): t for k, t in sd.items()}
    _write_hf_clip(folder, c, sd, model_type="owlvit")


def test_owlvit_box_lands_on_planted_patch(tmp_path):
    _planted_owlvit(tmp_path / "owl")
    c = _tiny_cfg()
    _write_hf_clip(tmp_path / "clip", c, _clip_sd(c))
    reward = R.GenEvalReward({"geneval": str(tmp_path / "owl"), "clip": str(tmp_path / "clip")}, device="cpu")
    img = np.zeros((2, 192, 192, 3), np.uint8)
    img[0, 64:128, 128:192] = 255  # patch row 1, column 2 at the model's 96 px (2x down)
    meta = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}] * 2
    scores, info = reward(torch.from_numpy(img), meta)
    dets = info["detections"]
    assert len(dets[0]) == 1 and dets[1] == []
    d = dets[0][0]
    assert d["class"] == "cat" and d["score"] > 0.9
    assert np.allclose(d["box"], (128, 64, 192, 128), atol=0.5)
    assert scores.tolist() == [1.0, 0.0] and info["strict"] == [True, False]


def test_detection_pipeline_nms_decides_the_count(tmp_path):
    # a box logit of +20 saturates every patch's box to the same (clamped) whole-image box, so two bright
    # patches give two identical boxes: NMS must merge them, and without NMS the count is 2
    _planted_owlvit(tmp_path / "owl", box_logits=[20.0, 20.0, 20.0, 20.0])
    c = _tiny_cfg()
    _write_hf_clip(tmp_path / "clip", c, _clip_sd(c))
    ckpt = {"geneval": str(tmp_path / "owl"), "clip": str(tmp_path / "clip")}
    img = np.zeros((1, 96, 96, 3), np.uint8)
    img[0, :32, :32] = img[0, 64:, 64:] = 255
    meta = [{"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}],
             "prompt": "a photo of two cups"}]
    with_nms = R.GenEvalReward(ckpt, device="cpu")
    scores, info = with_nms(img, meta)
    assert len(info["detections"][0]) == 1 and scores.tolist() == [0.5]  # count credit 1 - |2 - 1| / 2
    without = R.GenEvalReward(ckpt, device="cpu", config=R.GenEvalConfig(nms_iou=1.01))
    scores, info = without(img, meta)
    assert len(info["detections"][0]) == 2 and scores.tolist() == [1.0] and info["strict"] == [True]
    boxes = [d["box"] for d in info["detections"][0]]
    assert boxes[0] == boxes[1] and np.allclose(boxes[0], (48, 48, 96, 96), atol=0.1)  # centre ~1, size ~1, clamped


def test_owlvit_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.OwlViTConfig(
        text_config=dict(vocab_size=_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=96, patch_size=32), projection_dim=32)
    ref = transformers.OwlViTForObjectDetection(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # LayerNorms and biases off their init values too
    ref.save_pretrained(str(tmp_path))
    _write_vocab(tmp_path)
    c = R.read_config(str(tmp_path), "owlvit-base-patch32")
    ours = R.load_owlvit(str(tmp_path / "model.safetensors"), c)
    ids = R.CLIPTokenizer.from_folder(str(tmp_path), 16)(["a photo of a cat", "a photo of", "cat"])
    px = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out = ref(input_ids=ids.repeat(2, 1), pixel_values=px, attention_mask=(ids > 0).long().repeat(2, 1))
        logits, boxes = ours(px, ids)
    err_logits, err_boxes = (logits - out.logits).abs().max().item(), (boxes - out.pred_boxes).abs().max().item()
    print(f"\nOWL-ViT vs transformers: logits max abs err {err_logits:.2e}, boxes {err_boxes:.2e}")
    assert err_logits <= 1e-4 and err_boxes <= 1e-4


def test_clip_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    for act in ("quick_gelu", "gelu"):
        cfg = transformers.CLIPConfig(
            text_config=dict(vocab_size=_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, hidden_act=act, eos_token_id=2),
            vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8, hidden_act=act), projection_dim=24)
        ref = transformers.CLIPModel(cfg).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ref.save_pretrained(str(tmp_path / act))
        ours = R.load_clip(str(tmp_path / act / "model.safetensors"), R.read_config(str(tmp_path / act), "tiny"))
        _write_vocab(tmp_path / act)
        ids = R.CLIPTokenizer.from_folder(str(tmp_path / act))(["a photo of a cat", "cat"])
        px = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            t = ref.get_text_features(input_ids=ids)
            i = ref.get_image_features(pixel_values=px)
            t, i = getattr(t, "pooler_output", t), getattr(i, "pooler_output", i)  # transformers 4 vs 5
            err_t = (ours.encode_text(ids) - t).abs().max().item()
            err_i = (ours.encode_image(px) - i).abs().max().item()
        print(f"\nCLIP ({act}) vs transformers: text max abs err {err_t:.2e}, image {err_i:.2e}")
        assert err_t <= 1e-4 and err_i <= 1e-4, act


def test_presets_match_transformers_trees():
    """Full-size presets against transformers' module trees (meta device: shapes only, no weights)."""
    transformers = pytest.importorskip("transformers")
    tc = lambda w, m, h, n, **kw: dict(hidden_size=w, intermediate_size=m, num_attention_heads=h, num_hidden_layers=n,
                                       **kw)
    cases = [("clip-vit-large-patch14", transformers.CLIPModel, transformers.CLIPConfig(
                 text_config=tc(768, 3072, 12, 12), vision_config=tc(1024, 4096, 16, 24, patch_size=14),
                 projection_dim=768), R.CLIP),
             ("vit-h-14", transformers.CLIPModel, transformers.CLIPConfig(
                 text_config=tc(1024, 4096, 16, 24, hidden_act="gelu"),
                 vision_config=tc(1280, 5120, 16, 32, patch_size=14, hidden_act="gelu"), projection_dim=1024), R.CLIP),
             ("owlvit-base-patch32", transformers.OwlViTForObjectDetection, transformers.OwlViTConfig(), R.OwlViT)]
    for name, ref_cls, cfg, ours_cls in cases:
        with torch.device("meta"):
            ref, ours = ref_cls(cfg), ours_cls(R.PRESETS[name])
        want = {k.replace(".pre_layernorm.", ".pre_layrnorm."): tuple(v.shape) for k, v in ref.state_dict().items()
                if not k.endswith(("position_ids", "box_bias"))}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want, name
        assert R.config_from_hf(cfg.to_dict()) == R.PRESETS[name], name


def test_iou_and_nms():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 5], [20, 20, 30, 30]], dtype=torch.float)
    iou = R.box_iou(boxes[:1], boxes)[0]
    assert torch.allclose(iou, torch.tensor([1.0, 90 / 110, 0.5, 0.0]))
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert R.nms(boxes, scores, 0.5).tolist() == [0, 2, 3]  # box 1 overlaps box 0 by 0.82; box 2 by exactly 0.5
    assert R.nms(boxes, torch.tensor([0.5, 0.9, 0.7, 0.6]), 0.5).tolist() == [1, 2, 3]
    assert R.nms(boxes, scores, 0.45).tolist() == [0, 3]
    assert R.nms(boxes[:0], scores[:0]).tolist() == []


# ---- rewards: GenEval rules


def _det(cls, box, score=0.9, color=None):
    return {"class": cls, "box": box, "score": score, "color": color}


def test_relative_position_thresholds():
    b = (0, 0, 10, 10)  # centre (5, 5), size 10 x 10
    assert R.relative_position((20, 0, 30, 10), b) == {"right of"}
    assert R.relative_position((-20, 0, -10, 10), b) == {"left of"}
    assert R.relative_position((0, -20, 10, -10), b) == {"above"}  # y grows downward
    assert R.relative_position((0, 20, 10, 30), b) == {"below"}
    # shrink = 0.1 * (10 + 10) = 2 per axis: an offset of 2 or less is no relation at all; beyond that the
    # shrunk offset is divided by the ORIGINAL length: (d - 2) / d > 0.5 needs d > 4
    assert R.relative_position((2, 0, 12, 10), b) == set()
    assert R.relative_position((3.99, 0, 13.99, 10), b) == set()
    assert R.relative_position((4.01, 0, 14.01, 10), b) == {"right of"}
    assert R.relative_position((0, -4.01, 10, 5.99), b) == {"above"}
    # diagonal: offset (10, 10) -> shrunk (8, 8) / |offset| 14.14 = 0.566 > 0.5 on both axes
    assert R.relative_position((10, 10, 20, 20), b) == {"right of", "below"}
    # offset (10, 7): shrunk (8, 5) / 12.21 = (0.655, 0.410): right only
    assert R.relative_position((10, 7, 20, 17), b) == {"right of"}
    # just around 0.5 on x with dy = 10: (dx - 2) / sqrt(dx^2 + 100) = 0.5 at dx = 8.6
    assert R.relative_position((8.7, 10, 18.7, 20), b) == {"right of", "below"}
    assert R.relative_position((8.5, 10, 18.5, 20), b) == {"below"}
    # big boxes shrink more: 0.1 * (40 + 10) = 5 swallows an offset of 4.9
    assert R.relative_position((-10.1, -15, 29.9, 25), b) == set()


def test_geneval_counting_is_exact_with_exclude():
    meta = {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}],
            "prompt": "a photo of three dogs"}
    dogs = [_det("dog", (i * 20, 0, i * 20 + 10, 10), 0.9 - i * 0.1) for i in range(5)]
    r = [R.geneval_score(dogs[:n] + [_det("cat", (0, 0, 5, 5))], meta) for n in range(6)]
    assert [x["strict"] for x in r] == [False, False, False, True, False, False]
    assert [round(x["dense"], 4) for x in r] == [0.0, round(1 / 3, 4), round(2 / 3, 4), 1.0, round(2 / 3, 4),
                                                 round(1 / 3, 4)]
    other = {"tag": "single_object", "include": [{"class": "cup", "count": 1}],
             "exclude": [{"class": "bird", "count": 1}], "prompt": "a cup"}
    assert R.geneval_score([_det("cup", (0, 0, 1, 1))], other) == {"strict": True, "dense": 1.0, "reasons": []}
    bad = R.geneval_score([_det("cup", (0, 0, 1, 1)), _det("bird", (0, 0, 1, 1))], other)
    assert not bad["strict"] and bad["dense"] == 0.5  # cup clause 1, bird exclude clause 0


def test_geneval_colors_and_partial_credit():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 2, "color": "red"},
                                             {"class": "bench", "count": 1, "color": "blue"}], "prompt": "..."}
    cars = [_det("car", (0, 0, 9, 9), 0.9, "red"), _det("car", (20, 0, 29, 9), 0.8, "green"),
            _det("car", (40, 0, 49, 9), 0.3, "red")]  # the third red car is not among the 2 most confident
    bench = [_det("bench", (0, 20, 9, 29), 0.9, "blue")]
    r = R.geneval_score(cars + bench, meta)
    assert not r["strict"]
    # car: count 1 - |2 - 3| / 2 = 0.5, colour 1/2 -> 0.5; bench: 1 -> dense 0.75
    assert r["dense"] == pytest.approx(0.75)
    cars[1]["color"] = "red"
    r = R.geneval_score(cars[:2] + bench, meta)
    assert r["strict"] and r["dense"] == 1.0


def test_geneval_position_rules():
    meta = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                           {"class": "cat", "count": 1, "position": ["left of", 0]}], "prompt": "..."}
    dog = _det("dog", (50, 0, 60, 10))
    assert R.geneval_score([dog, _det("cat", (0, 0, 10, 10))], meta)["strict"]
    wrong = R.geneval_score([dog, _det("cat", (100, 0, 110, 10))], meta)
    assert not wrong["strict"] and wrong["dense"] == pytest.approx(0.75)  # cat: count 1, position 0
    missing_ref = R.geneval_score([_det("cat", (0, 0, 10, 10))], meta)
    assert not missing_ref["strict"] and missing_ref["dense"] == pytest.approx(0.25)  # dog 0; cat (1 + 0) / 2
    # count 2: both cats must be left of the dog; one is, so strict fails and position credit is 1/2
    meta2 = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                            {"class": "cat", "count": 2, "position": ["left of", 0]}], "prompt": ""}
    cats = [_det("cat", (0, 0, 10, 10), 0.9), _det("cat", (100, 0, 110, 10), 0.8)]
    r = R.geneval_score([dog] + cats, meta2)
    assert not r["strict"] and r["dense"] == pytest.approx((1 + (1 + 0.5) / 2) / 2)


def test_geneval_summary():
    recs = [("counting", True), ("counting", False), {"tag": "colors", "strict": True}, ("position", False)]
    s = R.geneval_summary(recs)
    assert s["per_tag"] == {"counting": 0.5, "colors": 1.0, "position": 0.0}
    assert s["overall"] == pytest.approx(0.5) and s["count"]["counting"] == 2


class _ColorStubCLIP:
    """A stand-in CLIP with known behaviour: image embedding = mean RGB of the crop - 0.5, text embedding =
    the RGB of the colour named in the prompt - 0.5, so the right answer is the crop's own colour."""
    RGB = {"red": (1, 0, 0), "orange": (1, .5, 0), "yellow": (1, 1, 0), "green": (0, .5, 0), "blue": (0, 0, 1),
           "purple": (.5, 0, .5), "pink": (1, .75, .8), "brown": (.6, .3, 0), "black": (0, 0, 0), "white": (1, 1, 1)}
    config = types.SimpleNamespace(image_size=16)

    def __init__(self):
        self.prompts = []

    def tokenizer(self, texts):
        self.prompts += list(texts)
        found = [next(i for i, c in enumerate(R.GENEVAL_COLORS) if f" {c} " in t or f" {c}-" in t) for t in texts]
        return torch.tensor(found)[:, None]

    def encode_text(self, ids):
        return torch.tensor([self.RGB[R.GENEVAL_COLORS[i]] for i in ids[:, 0].tolist()]) - 0.5

    def encode_image(self, pixels):
        rgb = pixels * torch.tensor(R.CLIP_STD).view(1, 3, 1, 1) + torch.tensor(R.CLIP_MEAN).view(1, 3, 1, 1)
        return rgb.mean((2, 3)) - 0.5


def test_geneval_color_step_on_crops(tmp_path):
    img = np.full((60, 150, 3), 128, np.uint8)  # grey background, three coloured blocks left to right
    img[:, 0:50] = (255, 0, 0)
    img[:, 50:100] = (0, 0, 255)
    img[10:50, 100:150] = (255, 255, 255)
    stub = _ColorStubCLIP()
    boxes = [(105, 12, 145, 48), (2, 2, 48, 58), (55, 5, 95, 55), (100, 10, 150, 50)]
    assert R.classify_colors(stub, stub.tokenizer, img, boxes, "car") == ["white", "red", "blue", "white"]
    assert "a photo of a red car" in stub.prompts and "a photo of a red-colored car" in stub.prompts
    assert "a photo of a red object" in stub.prompts
    # through the reward: only the `count` most confident cars are coloured, and the rules see the colours
    ckpt, _ = _reward_folders(tmp_path)
    reward = R.GenEvalReward(ckpt, device="cpu")
    reward._ensure_loaded()
    reward.clip, reward.tok = stub, stub.tokenizer
    dets = [_det("car", (105, 12, 145, 48), 0.9), _det("car", (2, 2, 48, 58), 0.8), _det("car", (55, 5, 95, 55), 0.2)]
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 2, "color": "white"}],
            "prompt": "two white cars"}
    reward.add_colors(img, dets, meta)
    assert [d["color"] for d in dets] == ["white", "red", None]
    r = R.geneval_score(dets, meta)
    assert not r["strict"] and r["dense"] == pytest.approx((1 - 1 / 2 + 1 / 2) / 2)


def test_shapes_reward_uses_shapes_detect(monkeypatch):
    fake = types.ModuleType("shapes")
    calls = []

    def detect(image):
        calls.append(image.shape)
        return [_det("circle", (0, 0, 4, 4), 1.0, "red"), _det("square", (10, 0, 14, 4), 1.0, "blue")]

    fake.detect = detect
    monkeypatch.setitem(sys.modules, "shapes", fake)
    reward = R.ShapesReward()
    meta = [{"tag": "position", "include": [{"class": "square", "count": 1},
                                            {"class": "circle", "count": 1, "color": "red",
                                             "position": ["left of", 0]}], "prompt": "a red circle left of a square"},
            {"tag": "counting", "include": [{"class": "circle", "count": 2}], "prompt": "two circles"}]
    scores, info = reward(np.zeros((2, 16, 16, 3), np.uint8), meta)
    assert calls == [(16, 16, 3)] * 2
    assert scores.tolist() == [1.0, 0.5] and info["strict"] == [True, False]


# ---- rewards: command line, combination, evaluation extras


def test_reward_args_parsing():
    p = R.add_reward_args(argparse.ArgumentParser())
    args = p.parse_args(["--rewards", "hps:1,geneval, aesthetic:0.5", "--reward-ckpt", "hps=/a/b", "clip=~/c"])
    assert R.parse_rewards(args.rewards) == {"hps": 1.0, "geneval": 1.0, "aesthetic": 0.5}
    assert R.parse_reward_ckpt(args.reward_ckpt) == {"hps": "/a/b", "clip": os.path.expanduser("~/c")}
    assert R.parse_reward_ckpt("hps=/a,clip=/b") == {"hps": "/a", "clip": "/b"}
    assert p.parse_args([]).reward_combine == "sum"
    for bad, match in [("hps:x", "not a number"), ("nope:1", "unknown reward"), ("hps,hps", "twice"), ("", "no reward"),
                       ("hps:nan", "finite")]:
        with pytest.raises(ValueError, match=match):
            R.parse_rewards(bad)
    with pytest.raises(ValueError, match="NAME=PATH"):
        R.parse_reward_ckpt(["hps"])
    with pytest.raises(ValueError, match="unknown checkpoint"):
        R.parse_reward_ckpt(["foo=/x"])


def test_combine_sum_and_group():
    s = {"a": torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), "b": torch.tensor([0.0, 0.0, 10.0, 1.0, 2.0, 3.0])}
    w = {"a": 1.0, "b": 0.5}
    assert torch.allclose(R.combine_rewards(s, w, "sum"), torch.tensor([1.0, 2.0, 8.0, 5.5, 6.0, 6.5]))
    g = R.combine_rewards(s, w, "group", group_size=3)
    # group 1: a -> (-1, 0, 1) / (1 + 1e-4); b: mean 10/3, unbiased std 5.7735
    # group 2: a equal -> 0 (no NaN); b -> (-1, 0, 1) / (1 + 1e-4)
    bstd = math.sqrt(((10 / 3) ** 2 * 2 + (20 / 3) ** 2) / 2)
    want = [-1 / 1.0001 + 0.5 * (-10 / 3) / (bstd + 1e-4), 0.5 * (-10 / 3) / (bstd + 1e-4),
            1 / 1.0001 + 0.5 * (20 / 3) / (bstd + 1e-4), -0.5 / 1.0001, 0.0, 0.5 / 1.0001]
    assert torch.allclose(g, torch.tensor(want), atol=1e-5)
    same = R.combine_rewards({"a": torch.full((4,), 7.0)}, {"a": 1.0}, "group", group_size=2)
    assert torch.equal(same, torch.zeros(4))
    with pytest.raises(ValueError, match="group_size"):
        R.combine_rewards(s, w, "group", group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        R.combine_rewards(s, w, "group")


def test_diversity_and_mean_aesthetic(tmp_path):
    e = torch.eye(3)
    assert R.diversity([e]) == pytest.approx(1.0)  # orthogonal: distance 1
    assert R.diversity([torch.ones(4, 3)]) == pytest.approx(0.0, abs=1e-6)  # identical
    assert R.diversity(torch.stack([torch.tensor([[1.0, 0], [-1.0, 0]]), torch.ones(2, 2)])) == pytest.approx(1.0)
    assert R.diversity([e, e[:1]]) == pytest.approx(1.0)  # a prompt with one image is skipped
    with pytest.raises(ValueError):
        R.diversity([e[:1]])
    ckpt, head = _reward_folders(tmp_path)
    aes = R.Aesthetic(ckpt, device="cpu")
    imgs = _images(5)
    assert R.mean_aesthetic(aes, imgs, batch_size=2) == pytest.approx(aes(imgs, _meta(5))[0].mean().item(), abs=1e-5)
