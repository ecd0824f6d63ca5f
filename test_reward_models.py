"""Tests of reward_models.py: CLIP, OWL-ViT and GIT against transformers, their tokenizers, preprocessing
and loaders.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import checkpoints as C
import reward_models as RM
import rewards as RW
from conftest import (_EOT, _GIT_WORDS, _SOT, _VOCAB, _clip_sd, _git_config_json, _images, _planted_owlvit,
                      _tiny_cfg, _tiny_git_cfg, _to_openclip, _write_git_folder, _write_hf_clip, _write_vocab,
                      reference_transformers)


def test_clip_tokenizer_small_vocab(tmp_path):
    _write_vocab(tmp_path)
    tok = RM.CLIPTokenizer.from_folder(str(tmp_path))
    ids = tok(["a photo of a cat", "  A PHOTO\tof a  Cat "])
    expect = [_SOT, 320, 515, 516, 320, 518, _EOT]  # a</w>, photo</w>, of</w>, a</w>, cat</w>
    assert ids.shape == (2, 77)
    assert ids[0, :7].tolist() == expect and ids[0, 7:].eq(0).all()
    assert ids[1, :7].tolist() == expect  # lowercase and whitespace clean-up
    long = tok(["cat " * 200])[0]
    assert long[0] == _SOT and long[-1] == _EOT and long[1:-1].eq(518).all()  # truncated, EOT kept last
    owl = RM.CLIPTokenizer.from_folder(str(tmp_path), context_length=16)
    assert owl(["a cat"]).shape == (1, 16) and owl(["a cat"])[0, 4:].eq(0).all()  # OWL-ViT: 16, padded with 0


def test_clip_tokenizer_matches_transformers(tmp_path):
    transformers = reference_transformers()
    _write_vocab(tmp_path)
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    ours = RM.CLIPTokenizer.from_folder(str(tmp_path))
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
    tok = RM.CLIPTokenizer.from_folder(os.path.dirname(path))
    assert tok(["a photo of a cat"])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]


def test_openclip_and_hf_layouts_give_same_embeddings(tmp_path):
    c = _tiny_cfg(act="gelu")
    sd = _clip_sd(c)
    _write_hf_clip(tmp_path / "hf", c, sd)
    torch.save({"state_dict": _to_openclip(sd, c), "epoch": 3}, tmp_path / "openclip.pt")
    # old HF repos ship pytorch_model.bin, sometimes with position_ids buffers
    torch.save({**sd, "text_model.embeddings.position_ids": torch.arange(77)[None]}, tmp_path / "pytorch_model.bin")
    hf = RM.load_clip(str(tmp_path / "hf" / "model.safetensors"), c)
    oc = RM.load_clip(str(tmp_path / "openclip.pt"), c)
    bin_ = RM.load_clip(str(tmp_path / "pytorch_model.bin"), c)
    ids = RM.CLIPTokenizer.from_folder(str(tmp_path / "hf"))(["a photo of a cat", "photo"])
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(hf.encode_text(ids), oc.encode_text(ids), atol=1e-5)
        assert torch.allclose(hf.encode_image(px), oc.encode_image(px), atol=1e-5)
        assert torch.equal(hf.encode_image(px), bin_.encode_image(px))
        # and the weights are really used: a different seed gives different embeddings
        other = RM.load_clip(str(tmp_path / "hf" / "model.safetensors"), c)
        other.visual_projection.weight.mul_(-1)
        assert not torch.allclose(hf.encode_image(px), other.encode_image(px))


def test_non_finite_reward_weights_are_refused_at_load_naming_the_tensor(tmp_path):
    c = _tiny_cfg()
    sd = _clip_sd(c)
    sd["visual_projection.weight"][0, 1] = float("nan")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(C.CheckpointError, match=r"model.safetensors: tensor visual_projection.weight holds 1 non-finite"):
        RM.load_clip(str(tmp_path / "model.safetensors"), c)


def test_config_from_hf_fills_published_defaults():
    # google/owlvit-base-patch32's config.json leaves most sizes to transformers' defaults
    c = RM.config_from_hf({"model_type": "owlvit", "projection_dim": 512, "text_config": {"max_length": 16},
                          "vision_config": {}})
    assert c == RM.PRESETS["owlvit-base-patch32"]
    c = RM.config_from_hf({"model_type": "clip", "projection_dim": 1024,
                          "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                          "num_hidden_layers": 24, "hidden_act": "gelu"},
                          "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                                            "num_hidden_layers": 32, "patch_size": 14, "hidden_act": "gelu"}})
    assert c == RM.PRESETS["vit-h-14"]


def test_wrong_keys_error_lists_them_and_names_file(tmp_path):
    c = _tiny_cfg()
    sd = _clip_sd(c)
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # old checkpoints: ignored
    del sd["vision_model.post_layernorm.bias"]
    sd["vision_model.extra_head.weight"] = torch.zeros(3)
    sd["text_projection.weight"] = torch.zeros(5, 5)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        RM.load_clip(str(tmp_path / "model.safetensors"), c)
    msg = str(e.value)
    assert "model.safetensors" in msg and "vision_model.post_layernorm.bias" in msg
    assert "vision_model.extra_head.weight" in msg and "text_projection.weight" in msg
    assert "position_ids" not in msg


def test_preprocessing_geometry():
    img = np.zeros((50, 100, 3), np.uint8)
    img[:, :50] = 255  # left half white
    x = RM.hps_preprocess([img], size=20)  # long side 100 -> 20: a 10 x 20 image padded 5 rows top and bottom
    black = (0 - torch.tensor(RM.CLIP_MEAN)) / torch.tensor(RM.CLIP_STD)
    white = (1 - torch.tensor(RM.CLIP_MEAN)) / torch.tensor(RM.CLIP_STD)
    assert x.shape == (1, 3, 20, 20)
    assert torch.allclose(x[0, :, :5].mean((1, 2)), black, atol=1e-5)
    assert torch.allclose(x[0, :, 15:].mean((1, 2)), black, atol=1e-5)
    assert torch.allclose(x[0, :, 6:14, :8].mean((1, 2)), white, atol=0.05)
    y = RM.clip_preprocess([img], size=20)  # short side 50 -> 20 (40 wide), centre crop keeps x 10..30 of 40
    assert y.shape == (1, 3, 20, 20)
    assert torch.allclose(y[0, :, :, :8].mean((1, 2)), white, atol=0.05)
    assert torch.allclose(y[0, :, :, 12:].mean((1, 2)), black, atol=0.05)
    z = RM.owlvit_preprocess([img], size=20)  # plain resize: left half stays white
    assert torch.allclose(z[0, :, :, :9].mean((1, 2)), white, atol=0.05)


def test_owlvit_box_lands_on_planted_patch(tmp_path):
    _planted_owlvit(tmp_path / "owl")
    c = _tiny_cfg()
    _write_hf_clip(tmp_path / "clip", c, _clip_sd(c))
    reward = RW.GenEvalReward({"geneval": str(tmp_path / "owl"), "clip": str(tmp_path / "clip")}, device="cpu")
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


def test_owlvit_matches_transformers(tmp_path):
    transformers = reference_transformers()
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
    c = RM.read_config(str(tmp_path), "owlvit-base-patch32")
    ours = RM.load_owlvit(str(tmp_path / "model.safetensors"), c)
    ids = RM.CLIPTokenizer.from_folder(str(tmp_path), 16)(["a photo of a cat", "a photo of", "cat"])
    px = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out = ref(input_ids=ids.repeat(2, 1), pixel_values=px, attention_mask=(ids > 0).long().repeat(2, 1))
        logits, boxes = ours(px, ids)
    err_logits, err_boxes = (logits - out.logits).abs().max().item(), (boxes - out.pred_boxes).abs().max().item()
    print(f"\nOWL-ViT vs transformers: logits max abs err {err_logits:.2e}, boxes {err_boxes:.2e}")
    assert err_logits <= 1e-4 and err_boxes <= 1e-4


def test_clip_matches_transformers(tmp_path):
    transformers = reference_transformers()
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
        ours = RM.load_clip(str(tmp_path / act / "model.safetensors"), RM.read_config(str(tmp_path / act), "tiny"))
        _write_vocab(tmp_path / act)
        ids = RM.CLIPTokenizer.from_folder(str(tmp_path / act))(["a photo of a cat", "cat"])
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
    transformers = reference_transformers()
    tc = lambda w, m, h, n, **kw: dict(hidden_size=w, intermediate_size=m, num_attention_heads=h, num_hidden_layers=n,
                                       **kw)
    cases = [("clip-vit-large-patch14", transformers.CLIPModel, transformers.CLIPConfig(
                 text_config=tc(768, 3072, 12, 12), vision_config=tc(1024, 4096, 16, 24, patch_size=14),
                 projection_dim=768), RM.CLIP),
             ("vit-h-14", transformers.CLIPModel, transformers.CLIPConfig(
                 text_config=tc(1024, 4096, 16, 24, hidden_act="gelu"),
                 vision_config=tc(1280, 5120, 16, 32, patch_size=14, hidden_act="gelu"), projection_dim=1024), RM.CLIP),
             ("owlvit-base-patch32", transformers.OwlViTForObjectDetection, transformers.OwlViTConfig(), RM.OwlViT)]
    for name, ref_cls, cfg, ours_cls in cases:
        with torch.device("meta"):
            ref, ours = ref_cls(cfg), ours_cls(RM.PRESETS[name])
        want = {k.replace(".pre_layernorm.", ".pre_layrnorm."): tuple(v.shape) for k, v in ref.state_dict().items()
                if not k.endswith(("position_ids", "box_bias"))}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want, name
        assert RM.config_from_hf(cfg.to_dict()) == RM.PRESETS[name], name


def test_iou_and_nms():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 5], [20, 20, 30, 30]], dtype=torch.float)
    iou = RM.box_iou(boxes[:1], boxes)[0]
    assert torch.allclose(iou, torch.tensor([1.0, 90 / 110, 0.5, 0.0]))
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert RM.nms(boxes, scores, 0.5).tolist() == [0, 2, 3]  # box 1 overlaps box 0 by 0.82; box 2 by exactly 0.5
    assert RM.nms(boxes, torch.tensor([0.5, 0.9, 0.7, 0.6]), 0.5).tolist() == [1, 2, 3]
    assert RM.nms(boxes, scores, 0.45).tolist() == [0, 3]
    assert RM.nms(boxes[:0], scores[:0]).tolist() == []


def test_git_matches_transformers(tmp_path):
    """GIT against transformers' GitForCausalLM on a tiny random checkpoint in both published weight files."""
    transformers = reference_transformers()
    cfg = transformers.GitConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        vocab_size=len(_GIT_WORDS), hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=32, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    ref = transformers.GitForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # LayerNorms and biases off their init values too
    ref.save_pretrained(str(tmp_path / "st"))  # model.safetensors + config.json
    c = RM.git_config_from_hf(json.loads((tmp_path / "st" / "config.json").read_text()))
    assert c == _tiny_git_cfg()
    _write_git_folder(tmp_path / "bin", c, {k: v for k, v in ref.state_dict().items() if "position_ids" not in k})
    ids = torch.tensor([[2, 8, 9, 7], [2, 10, 11, 12]])  # [CLS] purple elephant ? / [CLS] blue teddy bear
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=px).logits  # (2, 17 image tokens + 4, vocab)
        for weights in (tmp_path / "st" / "model.safetensors", tmp_path / "bin" / "pytorch_model.bin"):
            got = RM.load_git(str(weights), c)(px, ids)
            err = (got - want).abs().max().item()
            print(f"\nGIT vs transformers ({weights.name}): logits max abs err {err:.2e}")
            assert got.shape == want.shape and err <= 1e-4


def test_git_presets_match_transformers_trees():
    """The full-size GIT presets against transformers' module tree (meta device: shapes only, no weights)."""
    transformers = reference_transformers()
    vision = {"git-large-vqav2": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                      num_attention_heads=16, image_size=420, patch_size=14),
              "git-base-vqav2": dict(image_size=480)}  # the published config names only image_size
    for name, vc in vision.items():
        cfg = transformers.GitConfig(vision_config=vc)
        with torch.device("meta"):
            ref, ours = transformers.GitForCausalLM(cfg), RM.GIT(RM.GIT_PRESETS[name])
        want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want, name
        assert RM.git_config_from_hf(cfg.to_dict()) == RM.GIT_PRESETS[name], name
        assert RM.git_config_from_hf({"model_type": "git", "vision_config": vc}) == RM.GIT_PRESETS[name], name
    n = sum(v.numel() for v in RM.GIT(RM.GIT_PRESETS["git-large-vqav2"]).state_dict().values())
    assert 394e6 < n < 396e6  # 1.58 GB of float32, the published file's size


def test_git_tokenizer_matches_transformers_bert_and_files_are_checked(tmp_path):
    transformers = reference_transformers()
    folder = _write_git_folder(tmp_path / "git", _tiny_git_cfg())
    ref = transformers.BertTokenizer(os.path.join(folder, "vocab.txt"))
    ours = RM.WordPieceTokenizer(folder)
    for text in ["purple elephant?", "Blue  Teddy bears?", "wooden desk", "a photo of a zébra?", "unknownword?"]:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    assert ours.cls == 2 and ours.word_id("yes") == 5 and ours.word_id("no") == 6
    fast = transformers.BertTokenizerFast(os.path.join(folder, "vocab.txt"))
    fast.save_pretrained(str(tmp_path / "fast"))  # tokenizer.json, as published beside vocab.txt
    assert RM.WordPieceTokenizer(str(tmp_path / "fast")).encode("Blue teddy bears?") == [10, 11, 12, 27, 7]
    with pytest.raises(ValueError, match="'teddy bear' is 2 tokens"):
        ours.word_id("teddy bear")
    # the published preprocessing: resize the short side, centre crop, CLIP's mean and std
    prep = RM.git_preprocessing(folder, _tiny_git_cfg())
    assert prep == dict(size=32, crop=32, mean=RM.CLIP_MEAN, std=RM.CLIP_STD, floor_offset=True)
    img = _images(1, 48)
    assert torch.equal(RM.clip_preprocess(img, **prep), RM.clip_preprocess(img, 32))
    # a resize larger than the crop, on a non-square image, as transformers' CLIPImageProcessor (PIL backend)
    conf = {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}, "resample": 3,
            "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.4]}
    (tmp_path / "git" / "preprocessor_config.json").write_text(json.dumps(conf))
    prep = RM.git_preprocessing(folder, _tiny_git_cfg())
    wide = np.random.RandomState(0).randint(0, 256, (48, 64, 3)).astype(np.uint8)
    processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)(**conf)
    want = processor(images=Image.fromarray(wide), return_tensors="pt").pixel_values
    err = (RM.clip_preprocess(wide[None], **prep) - want).abs().max().item()
    print(f"\nGIT preprocessing vs transformers' CLIPImageProcessor: max abs err {err:.2e}")
    assert err < 1e-5
    (tmp_path / "git" / "preprocessor_config.json").write_text(json.dumps({"crop_size": 224, "size": 224}))
    with pytest.raises(ValueError, match="preprocessor_config.json: expected .* crop of the ViT's 32 px"):
        RM.git_preprocessing(folder, _tiny_git_cfg())
    # files are checked when the reward is built, naming the file and where to get it
    os.remove(tmp_path / "git" / "vocab.txt")
    with pytest.raises(FileNotFoundError, match=r"git: tokenizer.json or vocab.txt not found in .*git-large-vqav2"):
        RW.GitVQA({"git": folder}, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"git: needs the 'git' checkpoint .*--reward-ckpt git="):
        RW.RewardEnsemble({"git": 1.0}, {}, device="cpu")
    bad = json.loads((tmp_path / "git" / "config.json").read_text()) | {"num_image_with_embedding": 6}
    with pytest.raises(ValueError, match="config.json: not a single-image GIT"):
        RM.git_config_from_hf(bad, "config.json")
    (tmp_path / "git" / "vocab.txt").write_text("\n".join(_GIT_WORDS))
    (tmp_path / "git" / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"git/config.json is not valid JSON"):
        RW.GitVQA({"git": folder}, device="cpu")


def test_git_preprocessing_crops_where_clip_image_processor_does(tmp_path):
    """transformers' CLIPImageProcessor (GIT's) floors the centre-crop offset; OpenAI CLIP's torchvision
    CenterCrop rounds it. A 64x48 image, short side to 40 (53x40), crop 30: the left offset is 11.5."""
    transformers = reference_transformers()
    folder = _write_git_folder(tmp_path / "git", _tiny_git_cfg(image_size=30))
    conf = {"size": {"shortest_edge": 40}, "crop_size": {"height": 30, "width": 30}, "resample": 3}
    (tmp_path / "git" / "preprocessor_config.json").write_text(json.dumps(conf))
    wide = np.random.RandomState(1).randint(0, 256, (48, 64, 3)).astype(np.uint8)
    processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)(
        **conf, image_mean=list(RM.CLIP_MEAN), image_std=list(RM.CLIP_STD))
    want = processor(images=Image.fromarray(wide), return_tensors="pt").pixel_values
    got = RM.clip_preprocess(wide[None], **RM.git_preprocessing(folder, _tiny_git_cfg(image_size=30)))
    assert got.shape == want.shape and (got - want).abs().max().item() < 1e-5


def test_git_config_refuses_a_vision_activation_it_does_not_build():
    good = _git_config_json(_tiny_git_cfg())
    assert RM.git_config_from_hf(good | {"vision_config": good["vision_config"] | {"hidden_act": "gelu"}}).vision_act \
        == "gelu"
    bad = good | {"vision_config": good["vision_config"] | {"hidden_act": "relu"}}
    with pytest.raises(ValueError, match="git/config.json: .*vision hidden_act 'relu'"):
        RM.git_config_from_hf(bad, "git/config.json")
