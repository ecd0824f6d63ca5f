"""Tests for t2i-r1. CPU only, tiny random models, seconds each; GPU and reference checks skip cleanly.

Run: python -m pytest -q test_t2i_r1.py
"""

import json
import os

import pytest
import torch

import model as M
import vq as V

# ---- shared helpers ---------------------------------------------------------


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


@torch.no_grad()
def outputs(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 6), generator=g)
    codes = torch.randint(0, m.cfg.vq.codebook_size, (2, m.cfg.image_tokens), generator=g)
    h = m(torch.cat([m.embed_text(ids), m.embed_image(codes[:, :5])], 1))
    return m.text_logits(h), m.image_logits(h), m.vq.decode_code(codes)


# ---- Janus-Pro foundation: model, VQ, checkpoints, tokenizer ----------------


def converted_layout(state):
    """Rename our (deepseek) keys to the transformers-converted layout, written independently of model.py."""
    import re
    out = {}
    for k, v in state.items():
        if k == "gen_vision_model.quantize.codebook_used":
            continue  # the conversion drops it
        k = re.sub(r"^language_model\.model\.", "model.language_model.", k)
        k = re.sub(r"^language_model\.lm_head\.", "lm_head.", k)
        k = re.sub(r"^gen_embed\.", "model.generation_embeddings.", k)
        k = re.sub(r"^gen_aligner\.layers\.0\.", "model.generation_aligner.fc1.", k)
        k = re.sub(r"^gen_aligner\.layers\.2\.", "model.generation_aligner.hidden_layers.0.", k)
        k = re.sub(r"^gen_head\.output_mlp_projector\.", "model.generation_head.proj_out.", k)
        k = re.sub(r"^gen_head\.vision_head\.", "model.generation_head.vision_head.", k)
        k = re.sub(r"^gen_vision_model\.", "model.vqmodel.", k)
        k = re.sub(r"encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.conv_blocks\.", "encoder.down.", k)
        k = re.sub(r"decoder\.conv_blocks\.(\d+)\.res\.", r"decoder.up.\1.block.", k)
        k = re.sub(r"decoder\.conv_blocks\.", "decoder.up.", k)
        k = k.replace("mid.0.", "mid.block_1.").replace("mid.1.", "mid.attn_1.").replace("mid.2.", "mid.block_2.")
        out[k] = v
    return out


def converted_config(cfg):
    vq = cfg.vq
    return {"model_type": "janus", "tie_word_embeddings": False,
            "text_config": {"model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
                            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layer,
                            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
                            "max_position_embeddings": cfg.max_position_embeddings},
            "vision_config": {"image_size": vq.grid * 16, "patch_size": 16},
            "vq_config": {"embed_dim": vq.codebook_embed_dim, "num_embeddings": vq.codebook_size,
                          "base_channels": vq.ch, "channel_multiplier": list(vq.encoder_ch_mult),
                          "num_res_blocks": vq.num_res_blocks, "latent_channels": vq.z_channels}}


@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded", "bin", "bin-sharded", "converted",
                                    "understanding-keys"])
def test_checkpoint_layouts_reload_identically(tmp_path, layout):
    m = tiny_model()
    want = outputs(m)
    if layout == "converted":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in converted_layout(m.state_dict()).items()},
                  str(tmp_path / "model.safetensors"))
        (tmp_path / "config.json").write_text(json.dumps(converted_config(m.cfg)))
    elif layout == "understanding-keys":  # a full Janus-Pro file also holds the understanding tower
        state = dict(m.state_dict())
        state["vision_model.vision_tower.pos_embed"] = torch.zeros(1, 4, 8)
        state["aligner.layers.0.weight"] = torch.zeros(8, 8)
        M.save_state_dict(state, tmp_path, weights="bin")
        (tmp_path / "config.json").write_text(json.dumps(M.config_to_dict(m.cfg)))
    else:
        weights, _, sharded = layout.partition("-")
        m.save_pretrained(tmp_path, weights=weights, shards=3 if sharded else 1)
        if sharded:
            assert len(list(tmp_path.glob(f"*-of-00003.*"))) == 3
            assert list(tmp_path.glob("*.index.json"))
    m2 = M.Janus.from_pretrained(tmp_path, device="cpu")
    assert m2.cfg == m.cfg
    for a, b in zip(want, outputs(m2)):
        assert torch.equal(a, b)


def test_bf16_checkpoint_loads_in_requested_dtype(tmp_path):
    m = tiny_model().to(torch.bfloat16)
    m.save_pretrained(tmp_path, weights="bin")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert next(iter(torch.load(tmp_path / "pytorch_model.bin").values())).dtype == torch.bfloat16
    m32 = M.Janus.from_pretrained(tmp_path, device="cpu")  # CPU default: float32
    assert all(p.dtype == torch.float32 for p in m32.parameters())
    m16 = M.Janus.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    sd = m.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in m16.state_dict().items())


def test_saved_config_is_the_published_layout(tmp_path):
    d = M.config_to_dict(M.preset("janus-pro-7b"))
    assert d["gen_vision_config"] == {"cls": "VQ-16", "model_type": "gen_vision",
                                      "params": {"image_token_size": 16384, "n_embed": 8}}
    assert d["language_config"]["hidden_size"] == 4096 and d["gen_head_config"]["params"]["n_embed"] == 4096
    # a partial LLaMA language_config is completed with LLaMA's defaults; VQ overrides are optional
    partial = {"language_config": {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                                   "intermediate_size": 176, "vocab_size": 300},
               "gen_vision_config": {"cls": "VQ-16", "params": {"image_token_size": 16384, "n_embed": 8}}}
    cfg = M.config_from_dict(partial)
    assert (cfg.n_kv_head, cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (4, 10000.0, 1e-6, False)
    assert cfg.vq == V.VQConfig() and cfg.image_tokens == 576
    partial["gen_vision_config"]["params"].update(image_size=64, ch=32, encoder_ch_mult=[1, 2, 2, 4],
                                                  decoder_ch_mult=[1, 2, 2, 4], num_res_blocks=1)
    cfg = M.config_from_dict(partial)
    assert cfg.image_tokens == 64 and cfg.vq.ch == 32 and cfg.vq.z_channels == 256
    assert M.config_from_dict(M.config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="rope_scaling"):
        M.config_from_dict({"language_config": {"rope_scaling": {"type": "linear", "factor": 2.0}}})


def test_presets_have_the_published_keys_and_shapes():
    # key names and shapes of Janus-Pro-1B's generation path (from its published checkpoint)
    with torch.device("meta"):
        sd = M.Janus(M.preset("janus-pro-1b")).state_dict()
    assert len(sd) == 572
    expect = {"language_model.model.embed_tokens.weight": (102400, 2048),
              "language_model.model.layers.23.mlp.gate_proj.weight": (5632, 2048),
              "language_model.lm_head.weight": (102400, 2048), "gen_embed.weight": (16384, 8),
              "gen_aligner.layers.2.weight": (2048, 2048), "gen_head.vision_head.weight": (16384, 2048),
              "gen_vision_model.quantize.codebook_used": (65536,),
              "gen_vision_model.decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
              "gen_vision_model.encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith(("vision_model.", "aligner.")) for k in sd)


def test_kv_cache_incremental_decoding_equals_full_forward():
    m = tiny_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.cfg.vocab_size, (3, 5), generator=g)
    codes = torch.randint(0, m.cfg.vq.codebook_size, (3, 6), generator=g)
    with torch.no_grad():
        x = torch.cat([m.embed_text(ids), m.embed_image(codes)], 1)  # (3, 11, H)
        full = m(x)
        cache = m.new_cache(3, 16)
        steps = [m(x[:, :5], cache=cache, input_pos=torch.arange(5))]  # prefill
        for t in range(5, 11):                                          # one token at a time
            steps.append(m(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


def test_left_padded_batch_equals_rows_alone():
    m = tiny_model()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, m.cfg.vocab_size, (n,), generator=g) for n in (7, 3, 5)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(3, T, dtype=torch.long)  # pad id 0, never attended to
    mask = torch.zeros(3, T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, True
    with torch.no_grad():
        h = m(m.embed_text(ids), mask=mask)
        assert torch.isfinite(h).all()
        # with the cache too: prefill the padded prompt, then two decode steps
        cache = m.new_cache(3, T + 2)
        cmask = torch.cat([mask, torch.ones(3, 2, dtype=torch.bool)], 1)
        m(m.embed_text(ids), mask=cmask, cache=cache, input_pos=torch.arange(T))
        nxt = torch.randint(0, m.cfg.vq.codebook_size, (3, 2), generator=g)
        hc = [m(m.embed_image(nxt[:, j:j + 1]), mask=cmask, cache=cache, input_pos=torch.tensor([T + j]))
              for j in range(2)]
        for i, r in enumerate(rows):
            alone = m(torch.cat([m.embed_text(r[None]), m.embed_image(nxt[i:i + 1])], 1))
            torch.testing.assert_close(h[i, T - len(r):], alone[0, :len(r)], rtol=0, atol=1e-5)
            torch.testing.assert_close(torch.cat(hc, 1)[i], alone[0, len(r):], rtol=0, atol=1e-5)


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


def write_tiny(tmp_path, weights="safetensors", shards=1):
    m = tiny_model()
    m.save_pretrained(tmp_path, weights=weights, shards=shards)
    return m


def test_bad_checkpoints_fail_with_clear_errors(tmp_path):
    # no folder, no config, no weights
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.Janus.from_pretrained(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.Janus.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps(M.config_to_dict(tiny_cfg())))
    with pytest.raises(FileNotFoundError, match="expected one of model.safetensors"):
        M.Janus.from_pretrained(tmp_path / "a")
    # a shard named by the index is missing
    d = tmp_path / "b"
    write_tiny(d, weights="bin", shards=2)
    os.remove(d / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model-00002-of-00002.bin"):
        M.Janus.from_pretrained(d)
    # truncated downloads, both formats
    for weights, name in [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")]:
        d = tmp_path / f"trunc-{weights}"
        write_tiny(d, weights=weights)
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(M.CheckpointError, match=f"could not read .*{name}"):
            M.Janus.from_pretrained(d)
    # missing, unexpected and mis-shaped keys: one error listing all of them, naming the file
    d = tmp_path / "keys"
    m = write_tiny(d, weights="bin")
    state = dict(m.state_dict())
    del state["gen_head.vision_head.bias"]
    state["language_model.model.layers.7.mlp.up_proj.weight"] = torch.zeros(3)
    state["gen_embed.weight"] = torch.zeros(5, 8)
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(M.CheckpointError) as e:
        M.Janus.from_pretrained(d)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "config.json" in msg
    assert "missing (2)" in msg and "gen_head.vision_head.bias" in msg and "gen_embed.weight" in msg
    assert "unexpected (1)" in msg and "layers.7.mlp.up_proj.weight" in msg
    assert "mis-shaped (1)" in msg and "(5, 8), expected (64, 8)" in msg
    # a config that does not describe the weights
    d = tmp_path / "cfg"
    write_tiny(d)
    (d / "config.json").write_text(json.dumps(M.config_to_dict(tiny_cfg(n_embd=32, intermediate_size=88))))
    with pytest.raises(M.CheckpointError, match="mis-shaped"):
        M.Janus.from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(M.CheckpointError, match="not valid JSON"):
        M.Janus.from_pretrained(d)


def test_tokenizer_one_bos_special_tokens_and_chat_format(tmp_path):
    tok = make_word_tokenizer(tmp_path)
    assert tok.tk.encode("a photo").ids[0] == tok.bos_id  # the post-processor adds BOS by itself ...
    ids = tok.encode("a photo of a red circle")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # ... but we get exactly one
    assert tok.encode(M.Tokenizer.BOS + " a photo").count(tok.bos_id) == 1
    assert tok.encode("a photo", bos=False)[0] != tok.bos_id
    assert tok.decode(ids) == "a photo of a red circle"
    assert M.chat_prompt("a red circle") == "<|User|>: a red circle\n\n<|Assistant|>:"
    assert M.chat_prompt("x", system="be brief") == "be brief\n\n<|User|>: x\n\n<|Assistant|>:"
    img = tok.encode(M.image_prompt("a red circle"))
    assert img[-1] == tok.boi_id and img[0] == tok.bos_id
    (tmp_path / "copy").mkdir()
    tok.save(tmp_path / "copy")
    assert M.Tokenizer.from_pretrained(tmp_path / "copy").encode("a photo") == tok.encode("a photo")
    # a tokenizer without the special tokens is refused by name
    from tokenizers import Tokenizer as HFTokenizer, models
    HFTokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(tmp_path / "bare.json"))
    with pytest.raises(ValueError, match="no bos token"):
        M.Tokenizer(str(tmp_path / "bare.json"))


def test_gradient_checkpointing_gives_the_same_gradients():
    m = tiny_model().train()
    x = torch.randint(0, m.cfg.vocab_size, (2, 6))
    grads = []
    for gc in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = gc
        m.text_logits(m(m.embed_text(x))).logsumexp(-1).sum().backward()
        grads.append(m.language_model.model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# ---- fidelity against transformers' Janus port (optional: skips without transformers) ----


def test_matches_transformers_janus(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "JanusForConditionalGeneration"):
        pytest.skip("this transformers has no Janus")
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig,
                              LlamaConfig)
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                               patch_size=16, projection_dim=64)
    vqc = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, base_channels=32, channel_multiplier=[1, 1, 2],
                           num_res_blocks=1, latent_channels=32, projection_dim=64, image_token_embed_dim=64)
    ref = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vqc,
                                                    tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norms, biases and all
    ref.save_pretrained(tmp_path)
    ours = M.Janus.from_pretrained(tmp_path, device="cpu")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 7), generator=g)
    codes = torch.randint(0, 64, (2, ours.cfg.image_tokens), generator=g)
    with torch.no_grad():
        h = ours(torch.cat([ours.embed_text(ids), ours.embed_image(codes)], 1))
        emb = torch.cat([ref.get_input_embeddings()(ids), ref.prepare_embeddings_for_image_generation(codes)], 1)
        hr = ref.model.language_model(inputs_embeds=emb).last_hidden_state
        assert (h - hr).abs().max() <= 1e-4
        assert (ours.text_logits(h) - ref.lm_head(hr)).abs().max() <= 1e-4
        assert (ours.image_logits(h) - ref.model.generation_head(hr)).abs().max() <= 1e-4
        assert (ours.vq.decode_code(codes) - ref.model.vqmodel.decode(codes)).abs().max() <= 1e-4


# ---- two-step sampler ---------------------------------------------------------

import t2i_r1 as R

PAD = 0


def image_prompts(m, lengths=(6, 9, 4), seed=0):
    """Random image prompts: BOS-like first token, body, and a fixed last token standing for <begin_of_image>."""
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, m.cfg.vocab_size, (L - 2,), generator=g).tolist() + [2] for L in lengths]


@torch.no_grad()
def reference_images(m, prompt, cfg_weight, steps, temperature=0.0, generator=None):
    """Janus-Pro's procedure with plain full-sequence forwards: no cache, no padding, one prompt."""
    cond = torch.tensor([prompt])
    uncond = torch.tensor([R.unconditional(prompt, PAD)])
    codes = torch.zeros(1, 0, dtype=torch.long)
    for _ in range(steps):
        def last_logits(ids):
            x = torch.cat([m.embed_text(ids), m.embed_image(codes)], 1)
            return m.image_logits(m(x))[:, -1]
        c = last_logits(cond)
        logits = c if cfg_weight is None else last_logits(uncond) + cfg_weight * (c - last_logits(uncond))
        nxt = R.sample_from_logits(logits, temperature, generator=generator)
        codes = torch.cat([codes, nxt[:, None]], 1)
    return codes[0]


def test_greedy_guided_generation_equals_plain_forwards():
    m = tiny_model()
    prompts = image_prompts(m)  # different lengths: left padding inside one batch
    codes = R.generate_images(m, prompts, pad_id=PAD, n=2, cfg_weight=5.0, temperature=0)
    assert codes.shape == (6, m.cfg.image_tokens)
    for i, p in enumerate(prompts):
        want = reference_images(m, p, 5.0, m.cfg.image_tokens)
        assert torch.equal(codes[2 * i], want) and torch.equal(codes[2 * i + 1], want)


def test_guidance_weight_one_is_conditional_sampling():
    m = tiny_model()
    prompts = image_prompts(m, lengths=(7, 7))
    got = R.generate_images(m, prompts, pad_id=PAD, cfg_weight=1.0, temperature=1.0,
                            generator=torch.Generator().manual_seed(3))
    # reference: conditional rows only, full forwards, the same random stream
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor(prompts)
    codes = torch.zeros(2, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(m.cfg.image_tokens):
            logits = m.image_logits(m(torch.cat([m.embed_text(ids), m.embed_image(codes)], 1)))[:, -1]
            codes = torch.cat([codes, R.sample_from_logits(logits, 1.0, generator=g)[:, None]], 1)
    assert torch.equal(got, codes)
    # and guidance does change the outcome
    greedy = [R.generate_images(m, prompts, pad_id=PAD, cfg_weight=w, temperature=0) for w in (1.0, 5.0)]
    assert not torch.equal(*greedy)


def test_left_padded_batch_equals_prompts_one_by_one():
    m = tiny_model()
    prompts = image_prompts(m, lengths=(5, 10, 7))
    batch = R.generate_images(m, prompts, pad_id=PAD, cfg_weight=3.0, temperature=0)
    for i, p in enumerate(prompts):
        assert torch.equal(batch[i], R.generate_images(m, [p], pad_id=PAD, cfg_weight=3.0, temperature=0)[0])
    texts = R.generate_text(m, prompts, eos_id=-1, pad_id=PAD, max_new_tokens=6, temperature=0)
    for i, p in enumerate(prompts):
        assert texts[i] == R.generate_text(m, [p], eos_id=-1, pad_id=PAD, max_new_tokens=6, temperature=0)[0]


def test_text_generation_matches_plain_forwards_and_stops_at_eos():
    m = tiny_model()
    prompt = image_prompts(m, lengths=(6,))[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():  # greedy reference, full forwards
        for _ in range(8):
            nxt = m.text_logits(m(m.embed_text(ids)))[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
    ref = ids[0, len(prompt):].tolist()
    assert R.generate_text(m, [prompt], eos_id=-1, pad_id=PAD, max_new_tokens=8, temperature=0)[0] == ref
    eos = ref[3]  # pretend the 4th generated token is EOS: generation must stop right after it
    cut = ref.index(eos) + 1
    out = R.generate_text(m, [prompt, prompt[:4]], eos_id=eos, pad_id=PAD, n=2, max_new_tokens=8, temperature=0)
    assert out[0] == out[1] == ref[:cut]
    assert len(out) == 4


def test_seeds_reproduce_and_differ():
    m = tiny_model()
    prompts = image_prompts(m, lengths=(6, 8))
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return (R.generate_images(m, prompts, pad_id=PAD, n=2, cfg_weight=5.0, generator=g),
                R.generate_text(m, prompts, eos_id=-1, pad_id=PAD, n=2, max_new_tokens=5, top_p=0.9, generator=g))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])


def test_compiled_decode_step_equals_eager():
    torch._dynamo.reset()
    m = tiny_model()
    prompts = image_prompts(m, lengths=(6, 8))
    for compile in (False, "aot_eager"):
        g = torch.Generator().manual_seed(0)
        out = (R.generate_images(m, prompts, pad_id=PAD, n=2, cfg_weight=5.0, generator=g, compile=compile),
               R.generate_text(m, prompts, eos_id=-1, pad_id=PAD, max_new_tokens=5, generator=g, compile=compile))
        if compile:
            assert torch.equal(out[0], eager[0]) and out[1] == eager[1]
        eager = out


def test_sample_from_logits_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(2000, 1)
    assert R.sample_from_logits(logits, 0).eq(1).all()
    top2 = R.sample_from_logits(logits, 1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {1, 2}
    # probabilities 0.43, 0.39, 0.12, ...: top-p 0.5 keeps the first two, top-p 0.1 only the first
    p = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).softmax(-1)[0]
    assert p[1] < 0.5 < p[1] + p[2]
    assert set(R.sample_from_logits(logits, 1.0, top_p=0.5, generator=g).tolist()) == {1, 2}
    assert set(R.sample_from_logits(logits, 1.0, top_p=0.1, generator=g).tolist()) == {1}
    full = R.sample_from_logits(logits, 1.0, generator=g)
    assert set(full.tolist()) == {0, 1, 2, 3, 4}


def test_two_step_sampler_builds_prompts_and_plans(tmp_path):
    m = tiny_model()
    tok = make_word_tokenizer(tmp_path)
    g = torch.Generator().manual_seed(0)
    s = R.sample_t2i(m, tok, ["a red circle", "a blue square"], n=2, max_plan_tokens=5, generator=g)
    assert s.codes.shape == (4, m.cfg.image_tokens) and len(s.plans) == 4
    assert s.prompts == ["a red circle", "a red circle", "a blue square", "a blue square"]
    for i in range(4):
        assert s.reasoning_ids[i][0] == tok.bos_id and 0 < len(s.plan_ids[i]) <= 5
        want = tok.encode(M.image_prompt(R.image_prompt_text(s.prompts[i], s.plans[i])))
        assert s.image_prompt_ids[i] == want and want[-1] == tok.boi_id
    assert R.image_prompt_text("a red circle.", " red circle left ") == "a red circle. red circle left"
    s2 = R.sample_t2i(m, tok, ["a red circle"], n=3, cot=False, generator=g)
    assert s2.plans == ["", "", ""] and s2.image_prompt_ids[0] == tok.encode(M.image_prompt("a red circle"))
    with pytest.raises(ValueError, match="empty prompt"):
        R.sample_t2i(m, tok, ["  "])
    (tmp_path / "bad.txt").write_text("no placeholder")
    with pytest.raises(ValueError, match="bad.txt"):
        R.load_reasoning_prompt(str(tmp_path / "bad.txt"))
    (tmp_path / "reasoning_prompt.txt").write_text("plan {prompt}")
    assert R.load_reasoning_prompt(ckpt=str(tmp_path)) == "plan {prompt}"


def test_sample_cli_writes_images_grids_and_jsonl(tmp_path):
    import sample as S
    m = tiny_model()
    tok = make_word_tokenizer(tmp_path / "ckpt")
    m.save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle", "tag": "colors"}\n\na blue square\n')
    args = ["--ckpt", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "p.jsonl"), "--n", "2",
            "--batch-size", "1", "--max-plan-tokens", "4", "--seed", "7"]
    recs = S.main(args + ["--out", str(tmp_path / "a")])
    assert len(recs) == 4 and recs[0]["metadata"]["tag"] == "colors" and recs[2]["prompt"] == "a blue square"
    lines = [json.loads(l) for l in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert [l["image_tokens"] for l in lines] == [r["image_tokens"] for r in recs]
    from PIL import Image
    img = Image.open(tmp_path / "a" / lines[0]["file"])
    assert img.size == (m.cfg.vq.image_size,) * 2 and img.mode == "RGB"
    assert (tmp_path / "a" / "grid_0000.png").exists() and (tmp_path / "a" / "grid_0001.png").exists()
    again = S.main(args + ["--out", str(tmp_path / "b")])  # the same seed gives the same output
    assert [r["image_tokens"] for r in again] == [r["image_tokens"] for r in recs]
    assert [r["plan"] for r in again] == [r["plan"] for r in recs]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt holds no prompts"):
        S.main(["--ckpt", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "empty.txt")])
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*\"prompt\""):
        S.read_prompts(str(tmp_path / "bad.jsonl"))


def test_sample_matches_transformers_janus_generate(tmp_path):
    """`sample.py --no-cot --temperature 0 --cfg 5` gives exactly the image tokens of transformers' Janus
    `generate` in image mode (guidance 5, greedy), on the same random weights."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "JanusForConditionalGeneration"):
        pytest.skip("this transformers has no Janus")
    from transformers import (GenerationConfig, JanusConfig, JanusForConditionalGeneration, JanusVisionConfig,
                              JanusVQVAEConfig, LlamaConfig)
    import sample as S
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=96,
                               patch_size=16, projection_dim=64, num_image_tokens=36)
    vqc = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, base_channels=32, channel_multiplier=[1, 1, 2],
                           num_res_blocks=1, latent_channels=32, projection_dim=64, image_token_embed_dim=64)
    ref = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vqc,
                                                    tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))  # peaked distributions: a wrong token cannot hide in a near-tie
    ref.save_pretrained(tmp_path / "ckpt")
    tok = make_word_tokenizer(tmp_path / "ckpt")
    prompts = ["a red circle", "a photo of a blue square"]
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    recs = S.main(["--ckpt", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "p.txt"), "--no-cot",
                   "--temperature", "0", "--cfg", "5", "--n", "1", "--batch-size", "2", "--out", str(tmp_path / "o")])
    gen = GenerationConfig(bos_token_id=tok.bos_id, pad_token_id=tok.pad_id, do_sample=False, guidance_scale=5.0,
                           generation_kwargs={"boi_token_id": tok.boi_id})
    for rec, prompt in zip(recs, prompts):
        ids = torch.tensor([tok.encode(M.image_prompt(prompt))])
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", generation_config=gen)
        assert rec["image_tokens"] == want[0].tolist()


# ---- BiCoT-GRPO objective -------------------------------------------------------

import math


def hand_case():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]])
    old = torch.tensor([[-1.0, -2.2], [-0.5, -1.0]])
    ref = torch.tensor([[-1.1, -2.0], [-0.5, -1.5]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    return logp, old, ref, adv, mask


def test_grpo_loss_hand_values():
    logp, old, ref, adv, mask = hand_case()
    # worked out by hand: token (0,0) ratio 1, k3 = e^-0.1 + 0.1 - 1; token (0,1) ratio e^0.2 > 1.2 with A > 0:
    # clipped to 1.2; token (1,0) ratio 1, A = -2; token (1,1) masked out
    k3 = math.exp(-0.1) + 0.1 - 1
    t00, t01, t10 = -(1 - 0.1 * k3), -1.2, 2.0
    loss, stats = R.grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.1, norm="token")
    assert loss.item() == pytest.approx((t00 + t01 + t10) / 3, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(1 / 3) and stats["kl"] == pytest.approx(k3 / 3, abs=1e-7)
    assert stats["ratio_max"] == pytest.approx(math.exp(0.2), rel=1e-6) and stats["tokens"] == 3
    loss, _ = R.grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.1, norm="sequence")
    assert loss.item() == pytest.approx(((t00 + t01) / 2 + t10) / 2, abs=1e-6)
    # clipping inactive with a wider range: the unclipped ratio e^0.2 counts
    loss, stats = R.grpo_loss(logp, old, ref, adv, mask, clip_eps=0.5, beta=0.1, norm="token")
    assert loss.item() == pytest.approx((t00 - math.exp(0.2) + t10) / 3, abs=1e-6)
    assert stats["clip_frac"] == 0
    # a negative advantage with a ratio below 1 - eps is clipped too (pessimistic bound)
    loss, stats = R.grpo_loss(torch.tensor([[-1.0]]), torch.tensor([[-0.5]]), torch.tensor([[-1.0]]),
                              torch.tensor([-2.0]), torch.ones(1, 1), clip_eps=0.2, beta=0.0)
    assert loss.item() == pytest.approx(1.6) and stats["clip_frac"] == 1
    with pytest.raises(ValueError, match="norm"):
        R.grpo_loss(logp, old, ref, adv, mask, norm="batch")


def test_grpo_micro_batches_add_up_to_the_full_batch():
    logp, old, ref, adv, mask = hand_case()
    for norm, n_total in [("token", 3), ("sequence", 2)]:
        full, _ = R.grpo_loss(logp, old, ref, adv, mask, beta=0.1, norm=norm)
        parts = sum(R.grpo_loss(logp[i:i + 1], old[i:i + 1], ref[i:i + 1], adv[i:i + 1], mask[i:i + 1],
                                beta=0.1, norm=norm, n_total=n_total)[0] for i in range(2))
        assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_group_advantages():
    a = R.group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    # group 1: mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + 1e-4); group 2: all equal -> zeros, no NaN
    torch.testing.assert_close(a, torch.tensor([-1, 0, 1, 0, 0, 0]) / torch.tensor([1 + 1e-4] * 3 + [1] * 3))
    assert torch.isfinite(R.group_advantages(torch.ones(4), 4)).all()
    assert R.group_advantages(torch.tensor([3.0, 4.0]), 1).eq(0).all()
    with pytest.raises(ValueError, match=r"non-finite rewards at samples \[1\]"):
        R.group_advantages(torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="groups of 3"):
        R.group_advantages(torch.ones(4), 3)


def test_on_policy_gradient_is_reinforce_with_a_group_baseline():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, 10, requires_grad=True)          # 3 groups of 2 samples, 4 tokens each
    tokens = torch.randint(0, 10, (6, 4))
    mask = torch.ones(6, 4)
    mask[1, 2:] = 0
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5, 2.0, -1.0])
    adv = R.group_advantages(rewards, 2)
    def logp():
        return logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    lp = logp()
    loss, _ = R.grpo_loss(lp, lp.detach(), lp.detach(), adv, mask, beta=0.0)   # mu = 1: ratio exactly 1
    g_grpo, = torch.autograd.grad(loss, logits)
    # REINFORCE: -sum_i (r_i - mean of its group) / (std + 1e-4) * log p(token) over tokens, / #tokens
    r = rewards.view(3, 2)
    baseline_adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(6, 1)
    reinforce = -(baseline_adv * logp() * mask).sum() / mask.sum()
    g_ref, = torch.autograd.grad(reinforce, logits)
    torch.testing.assert_close(g_grpo, g_ref)
    # equal rewards: zero advantage, a finite loss and a zero policy gradient
    lp = logp()
    loss, _ = R.grpo_loss(lp, lp.detach(), lp.detach(), R.group_advantages(torch.ones(6), 2), mask, beta=0.0)
    g, = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and g.abs().max() == 0


def test_completion_logprobs_match_plain_forwards():
    m = tiny_model()
    prompts = image_prompts(m, lengths=(5, 8))
    plans = [[7, 8, 9], [10, 11]]
    codes = torch.randint(0, m.cfg.vq.codebook_size, (2, 6)).tolist()
    uncond = [R.unconditional(p, PAD) for p in prompts]
    text_lp, text_mask = R.completion_logprobs(m, prompts, plans, "text", pad_id=PAD)
    img_lp, _ = R.completion_logprobs(m, prompts, codes, "image", pad_id=PAD)
    cfg_lp, _ = R.completion_logprobs(m, prompts, codes, "image", pad_id=PAD, uncond_prompts=uncond,
                                      cfg_weight=3.0, temperature=0.7)
    assert text_mask.tolist() == [[True] * 3, [True, True, False]] and text_lp[1, 2] == 0
    with torch.no_grad():
        for i, p in enumerate(prompts):
            P = len(p)
            h = m(m.embed_text(torch.tensor([p + plans[i]])))
            want = m.text_logits(h)[0, P - 1:-1].log_softmax(-1).gather(-1, torch.tensor(plans[i])[:, None])[:, 0]
            torch.testing.assert_close(text_lp[i, :len(plans[i])], want, rtol=0, atol=1e-5)
            c = torch.tensor([codes[i]])
            def img_logits(ids):
                return m.image_logits(m(torch.cat([m.embed_text(torch.tensor([ids])), m.embed_image(c)], 1)))[0, P - 1:-1]
            lc, lu = img_logits(p), img_logits(uncond[i])
            pick = torch.tensor(codes[i])[:, None]
            torch.testing.assert_close(img_lp[i], lc.log_softmax(-1).gather(-1, pick)[:, 0], rtol=0, atol=1e-5)
            guided = (lu + 3.0 * (lc - lu)) / 0.7
            torch.testing.assert_close(cfg_lp[i], guided.log_softmax(-1).gather(-1, pick)[:, 0], rtol=0, atol=1e-4)


def test_chunked_logprobs_same_values_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    h = torch.randn(13, 8, requires_grad=True)
    t = torch.randint(0, 50, (13,))
    grads = []
    for chunk in (2**28, 4 * 50 * 3):  # one chunk, or chunks of 3 rows
        lp = R.chunked_logprobs(lambda x: head(x).float(), h, t, chunk_bytes=chunk)
        torch.testing.assert_close(lp, head(h).log_softmax(-1).gather(-1, t[:, None])[:, 0])
        grads.append(torch.autograd.grad(lp.sum(), h)[0])
    torch.testing.assert_close(grads[0], grads[1])


# ---- fidelity against deepseek's original Janus code (optional) --------------------------
# Runs when T2I_R1_DEEPSEEK_REF names a folder holding `janus_ref.py` (a small driver around deepseek's
# own classes, github.com/deepseek-ai/Janus) and `venv-janus/` (a Python environment where that code
# imports). The driver builds a tiny random model with deepseek's MultiModalityCausalLM in the published
# layout (config.json + pytorch_model.bin; the VQ is the full VQ-16) and dumps its outputs.


def test_matches_deepseek_janus(tmp_path):
    import subprocess
    ref = os.environ.get("T2I_R1_DEEPSEEK_REF")
    if not ref or not os.path.isfile(os.path.join(ref, "janus_ref.py")):
        pytest.skip("set T2I_R1_DEEPSEEK_REF to a folder with janus_ref.py and venv-janus/")
    py, script = os.path.join(ref, "venv-janus", "bin", "python"), os.path.join(ref, "janus_ref.py")
    folder, dump = tmp_path / "tiny", tmp_path / "dump.pt"
    subprocess.run([py, script, "make-tiny", str(folder), "--seed", "1", "--dtype", "fp32"], check=True,
                   capture_output=True)
    codes16 = ",".join(str(i * 977 % 16384) for i in range(16))
    prompt = [0, 11, 12, 13, 14, 510]
    subprocess.run([py, script, "run", str(folder), "--dump", str(dump), "--ids", "0,5,17,200,3,511",
                    "--image-tokens", "7,16383,42,9000", "--vq-codes", codes16, "--vq-grid", "4x4",
                    "--vq-image-rand", "64", "--gen-ids", ",".join(map(str, prompt)), "--n-tokens", "24",
                    "--cfg", "5", "--temperature", "0"], check=True, capture_output=True)
    d = torch.load(dump)
    m = M.Janus.from_pretrained(folder, device="cpu", dtype=torch.float32)
    f = d["forward"]
    with torch.no_grad():
        h = m(torch.cat([m.embed_text(f["ids"][None]), m.embed_image(f["image_tokens"][None])], 1))[0]
        assert (h - f["hidden"]).abs().max() <= 1e-4
        assert (m.text_logits(h) - f["text_logits"]).abs().max() <= 1e-4
        assert (m.image_logits(h) - f["image_logits"]).abs().max() <= 1e-4
        assert (m.vq.decode_code(d["vq_decode"]["codes"]) - d["vq_decode"]["image"]).abs().max() <= 1e-4
        assert torch.equal(m.vq.encode(d["vq_encode"]["image"]), d["vq_encode"]["codes"])
    g = d["generate"]
    ours = R.generate_images(m, [prompt], pad_id=int(g["pad_id"]), cfg_weight=5.0, temperature=0)
    assert torch.equal(ours[:, :24], g["codes"])
