"""Shared test helpers and fixtures: tiny models and tokenizers, the command-line error check, dispatch
modes that catch tensors off the model's device, tiny CLIP/OWL-ViT/GIT folders, a random Janus-Pro-layout base
and a toy reward.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import checkpoints as C
import model as M
import reward_models as RM
import rewards as RW
import shapes as S
import t2i_r1 as R


def reference_transformers():
    """transformers, the fidelity tests' reference (requirements-test.txt). Without it those tests skip, except
    under CI (CI=true), which installs it: there a missing reference is a failure, not a silent skip."""
    if os.environ.get("CI", "").lower() in ("1", "true"):
        import transformers
        return transformers
    return pytest.importorskip("transformers")


def tiny_cfg(**over):
    return M.preset("tiny", **over)


def tiny_model(seed=0, **over):
    """A tiny random Janus whose norms and biases are random too, so a wrong norm shows up."""
    torch.manual_seed(seed)
    m = M.Janus(tiny_cfg(**over)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def make_word_tokenizer(folder, words=("a", "photo", "of", "red", "circle", "blue", "square", "<|User|>:",
                                       "<|Assistant|>:"), add_bos_postprocessor=True):
    """A tiny word-level tokenizer.json with the deepseek special tokens (looked up by their strings)."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, processors
    specials = [M.Tokenizer.BOS, M.Tokenizer.EOS, M.Tokenizer.PAD, M.Tokenizer.BOI, M.Tokenizer.EOI]
    vocab = {w: i for i, w in enumerate(["<unk>", *words])}
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(specials)
    if add_bos_postprocessor:  # like LLaMA tokenizers: the post-processor prepends BOS by itself
        bos = tk.token_to_id(M.Tokenizer.BOS)
        tk.post_processor = processors.TemplateProcessing(single=f"{M.Tokenizer.BOS} $A",
                                                          special_tokens=[(M.Tokenizer.BOS, bos)])
    os.makedirs(folder, exist_ok=True)
    tk.save(os.path.join(folder, "tokenizer.json"))
    return M.Tokenizer(os.path.join(folder, "tokenizer.json"))


PAD = 0


def real(ids, mask):
    """The real tokens of each row of a padded (ids, mask) pair, as lists."""
    return [row[m].tolist() for row, m in zip(ids, mask)]


def settings(**kw):
    """Sampling settings with the shapes world's defaults for what kw leaves unset."""
    return R.SamplingConfig(**kw).resolved(kind="janus")


def image_prompts(m, lengths=(6, 9, 4), seed=0):
    """Random image prompts: BOS-like first token, body, and a fixed last token standing for <begin_of_image>."""
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, m.cfg.vocab_size, (L - 2,), generator=g).tolist() + [2] for L in lengths]


def cli_error(main, argv, capsys, prog):
    """Run a script's main with bad input: it must exit with one `prog: error: ...` line, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith(f"{prog}: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


class OnDevice(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails the first op that takes a tensor on another device than `device`."""

    def __init__(self, device):
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        wrong = [str(t.device) for t in leaves if isinstance(t, torch.Tensor) and t.device != self.device]
        assert not wrong, f"{func} got tensors on {wrong}, the policy is on {self.device}"
        return func(*args, **kwargs)


def on_device(fn, device=torch.device("cpu")):
    """fn, run with "meta" as the default device and every op checked by OnDevice: "meta" stands in for the CPU
    that a GPU run's stray tensors land on, so a tensor made without device= is on the wrong device here as it
    would be there."""
    def wrapped(*a, **k):
        with torch.device("meta"), OnDevice(device):
            return fn(*a, **k)
    return wrapped


def tiny_hf_janus(noise, vocab_size=300, **vision):
    """transformers' JanusForConditionalGeneration at a tiny random size (GQA), every weight (norms and
    biases too) moved by `noise` * N(0, 1); skips the test when transformers or its Janus is missing."""
    transformers = reference_transformers()
    if not hasattr(transformers, "JanusForConditionalGeneration"):
        pytest.skip("this transformers has no Janus")
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig,
                              LlamaConfig)
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=16,
                               projection_dim=64, **vision)
    vqc = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, base_channels=32, channel_multiplier=[1, 1, 2],
                           num_res_blocks=1, latent_channels=32, projection_dim=64, image_token_embed_dim=64)
    ref = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vqc,
                                                    tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(noise * torch.randn_like(p))
    return ref


# Tiny random (or constructed) weights written in the published layouts: HF CLIPModel safetensors + config.json
# (clip, pickscore), an fp16 OpenCLIP pickle {'state_dict': ...} with 'module.' prefixes (hps), the aesthetic
# .pth with layers.{0,2,4,6,7}, OWL-ViT safetensors + vocab.json + merges.txt (geneval).
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
    return RM.CLIPConfig(**{**base, **kw})


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
    sd = _random_state(RM.CLIP(c), seed)
    sd["logit_scale"] = torch.tensor(logit_scale)
    return sd


def _images(n=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


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
    sd = _random_state(RM.OwlViT(owl_c), seed=4)
    sd = {k.replace(".pre_layrnorm.", ".pre_layernorm."): v for k, v in sd.items()}  # OWL-ViT's spelling
    _write_hf_clip(tmp_path / "owlvit", owl_c, sd, model_type="owlvit")
    return {k: str(tmp_path / v) for k, v in
            [("clip", "clip"), ("pickscore", "pickscore"), ("hps", "hps"), ("aesthetic", "aesthetic"),
             ("geneval", "owlvit")]}, head


def _planted_owlvit(folder, k=5.0, box_logits=None):
    """A 3 x 3 patch OWL-ViT whose class logit is k * (bright - dark) per patch and whose box head outputs a
    constant chosen so that the box of patch (row 1, col 2) is exactly that patch."""
    c = _tiny_cfg(image_size=96, patch_size=32, vision_width=4, vision_layers=1, vision_heads=1, vision_mlp=4,
                  context_length=16, text_width=16)
    sd = _random_state(RM.OwlViT(c), seed=5)
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


def _det(cls, box, score=0.9, color=None):
    return {"class": cls, "box": box, "score": score, "color": color}


# GIT as published (microsoft/git-{base,large}-vqav2): config.json (GitForCausalLM), pytorch_model.bin in fp32
# with the two int64 position_ids buffers the 2022 conversion saved (model.safetensors is the later variant),
# a bert-base-uncased vocab.txt / tokenizer.json and a CLIPImageProcessor preprocessor_config.json. The tiny
# vocabulary below keeps BERT's special tokens at the front; tiny models use image size 32, patch 8.
_GIT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no", "?", "purple", "elephant", "blue", "teddy",
              "bear", "wooden", "desk", "leather", "shoe", "green", "duck", "yellow", "frog", "child", "car", "zebra",
              "plate", "cup", "bottle", "##s", "a", "photo", "of"]


def _tiny_git_cfg(image_size=32):
    return RM.GITConfig(image_size=image_size, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4,
                        vision_mlp=64, vocab_size=len(_GIT_WORDS), width=48, layers=2, heads=4, mlp=96, max_positions=32)


def _git_config_json(c):  # transformers' GitConfig names, written by hand
    return {"model_type": "git", "architectures": ["GitForCausalLM"], "vocab_size": c.vocab_size,
            "hidden_size": c.width, "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
            "intermediate_size": c.mlp, "max_position_embeddings": c.max_positions, "hidden_act": "gelu",
            "layer_norm_eps": c.eps, "num_image_with_embedding": None, "bos_token_id": 2, "eos_token_id": 3,
            "vision_config": {"model_type": "git_vision_model", "image_size": c.image_size, "patch_size": c.patch_size,
                              "hidden_size": c.vision_width, "num_hidden_layers": c.vision_layers,
                              "num_attention_heads": c.vision_heads, "intermediate_size": c.vision_mlp}}


def _write_git_folder(folder, c, sd=None, seed=0):
    """A tiny GIT folder in the published layout; sd defaults to random weights (norms and biases random too)."""
    os.makedirs(folder, exist_ok=True)
    sd = _random_state(RM.GIT(c), seed) if sd is None else sd
    n_img = (c.image_size // c.patch_size) ** 2 + 1
    buffers = {"git.embeddings.position_ids": torch.arange(c.max_positions)[None],
               "git.image_encoder.vision_model.embeddings.position_ids": torch.arange(n_img)[None]}
    torch.save({**sd, **buffers}, os.path.join(folder, "pytorch_model.bin"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(_git_config_json(c), f)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(_GIT_WORDS) + "\n")
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": {"height": c.image_size, "width": c.image_size}, "do_center_crop": True,
                   "image_mean": list(RM.CLIP_MEAN), "image_std": list(RM.CLIP_STD), "resample": 3,
                   "image_processor_type": "CLIPImageProcessor", "processor_class": "GitProcessor",
                   "size": {"shortest_edge": c.image_size}}, f)
    return str(folder)


# T2I-R1's prompt file as published (data/geneval_and_t2i_data_final.json: JSON lines despite the name), a few
# rows of each kind written here: convertible spatial, numeracy, colour and object rows; shape, texture and
# non-spatial rows the GenEval rules cannot check
T2I_R1_ROWS = [
    {"prompt": "a photo of a car below a zebra", "nouns": ["car", "zebra"],
     "spatial_info": {"obj1": "car", "obj2": "zebra", "locality": "below"}, "task_type": "spatial"},
    {"task_type": "numeracy", "prompt": "two plates and three cups", "nouns": ["plate", "cup"],
     "numeracy_info": [{"obj_name": "plate", "num": 2}, {"obj_name": "cup", "num": 3}]},
    {"task_type": "texture", "prompt": "a wooden desk and a leather shoe", "nouns": ["desk", "shoe"],
     "attr_nouns": ["wooden desk", "leather shoe"]},
    {"task_type": "color", "prompt": "a green duck and a yellow frog", "nouns": ["duck", "frog"],
     "attr_nouns": ["green duck", "yellow frog"]},
    {"task_type": "non", "prompt": "A child is jumping on a trampoline.", "nouns": ["child", "trampoline"]},
    {"prompt": "a photo of a bottle and a teddy bear", "nouns": ["bottle", "teddy bear"], "task_type": "object"},
]


@pytest.fixture(scope="session")
def random_base(tmp_path_factory):
    """A random tiny Janus with the shapes world's tokenizer and reasoning template, saved like the base."""
    folder = tmp_path_factory.mktemp("random_base")
    tk = S.make_tokenizer()
    tk.save(str(folder / "tokenizer.json"))
    tok = M.Tokenizer(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = M.preset("tiny", vocab_size=tok.vocab_size, n_embd=32, n_head=2, n_kv_head=2, intermediate_size=64,
                   vq=dict(image_size=4, codebook_size=8, ch=32, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                           z_channels=32, num_res_blocks=1))  # 2x2 image tokens: each one moves the reward
    m = M.Janus(cfg)
    unit_scale_image_path(m)
    C.save_pretrained(m, folder, tokenizer=tok)
    (folder / "reasoning_prompt.txt").write_text(S.REASONING_TEMPLATE)
    return str(folder)


def unit_scale_image_path(m):
    """Unit-scale weights for the image path (embedding, aligner, head), frozen during RL and SFT: with GPT-style
    0.02 init the image logits barely move whatever the trainable decoder does."""
    with torch.no_grad():
        m.gen_embed.weight.normal_()
        for w in (m.gen_aligner.layers[0].weight, m.gen_aligner.layers[2].weight,
                  m.gen_head.output_mlp_projector.weight, m.gen_head.vision_head.weight):
            w.normal_(0, w.shape[1] ** -0.5)


class Redness(RW.Reward):
    """A test reward a random model can improve on: how red the decoded image is, on average."""
    name = "redness"

    def score(self, images, metadata):
        # a spatial contrast (red in the top-left quarter against the rest): the VQ decoder's GroupNorm
        # normalises away whole-image colour shifts, so a random model could not move a plain mean
        red = torch.as_tensor(np.stack(images)).float()[..., 0] / 255  # (B, H, W)
        h, w = red.shape[1] // 2, red.shape[2] // 2
        return red[:, :h, :w].mean((1, 2)) - red.mean((1, 2)), {}


@pytest.fixture
def redness(monkeypatch):
    monkeypatch.setitem(RW.REWARDS, "redness", Redness)


def train_args(base, out, *extra):
    return ["--ckpt", base, "--out", str(out), "--rewards", "redness", "--group-size", "4", "--prompts-per-step", "4",
            "--rollout-batch", "2", "--micro-batch", "4", "--max-plan-tokens", "6", "--eval-every", "0",
            "--sample-every", "0", "--lr", "3e-3", *extra]


# A GPU run, emulated on the CPU: bf16 autocast over float32 master weights, gradient checkpointing
BF16 = ("--dtype", "bfloat16", "--device", "cpu", "--grad-checkpointing")
