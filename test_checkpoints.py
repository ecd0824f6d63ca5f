"""Tests of checkpoints.py: the published checkpoint layouts, their config.json, and clear errors on bad folders.
"""

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

import checkpoints as C
import model as M
import vq as V
from conftest import make_word_tokenizer, tiny_cfg, tiny_model


@torch.no_grad()
def outputs(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 6), generator=g)
    codes = torch.randint(0, m.cfg.vq.codebook_size, (2, m.cfg.image_tokens), generator=g)
    h = m(torch.cat([m.embed_text(ids), m.embed_image(codes[:, :5])], 1))
    return m.text_logits(h), m.image_logits(h), m.vq.decode_code(codes)


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
        C.save_state_dict(state, tmp_path, weights="bin")
        (tmp_path / "config.json").write_text(json.dumps(C.config_to_dict(m.cfg)))
    else:
        weights, _, sharded = layout.partition("-")
        C.save_pretrained(m, tmp_path, weights=weights, shards=3 if sharded else 1)
        if sharded:
            assert len(list(tmp_path.glob("*-of-00003.*"))) == 3
            assert list(tmp_path.glob("*.index.json"))
    m2 = C.from_pretrained(tmp_path, device="cpu")
    assert m2.cfg == m.cfg
    for a, b in zip(want, outputs(m2)):
        assert torch.equal(a, b)


def test_image_positions_round_trip_and_stay_out_of_published_configs(tmp_path):
    """The shapes world's cell table (JanusConfig.image_positions) is saved as gen_pos_embed with its own
    config block, read back, and changes the outputs; a published config (no block) builds a model without it."""
    m = tiny_model(image_positions=True)
    with torch.no_grad():
        m.gen_pos_embed.weight.normal_()
    C.save_pretrained(m, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["gen_position_config"]["params"] == {"num_positions": m.cfg.image_tokens, "n_embed": m.cfg.n_embd}
    m2 = C.from_pretrained(tmp_path, device="cpu")
    assert m2.cfg.image_positions and m2.cfg == m.cfg
    for a, b in zip(outputs(m), outputs(m2)):
        assert torch.equal(a, b)
    with torch.no_grad():
        m2.gen_pos_embed.weight.zero_()
    assert not torch.equal(outputs(m)[1], outputs(m2)[1])
    assert "gen_position_config" not in C.config_to_dict(tiny_cfg())
    d["gen_position_config"]["params"]["num_positions"] = 7  # a table for another grid is refused by name
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="gen_position_config.params.num_positions = 7"):
        C.from_pretrained(tmp_path, device="cpu")


def test_bf16_checkpoint_loads_in_requested_dtype(tmp_path):
    m = tiny_model().to(torch.bfloat16)
    C.save_pretrained(m, tmp_path, weights="bin")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert next(iter(torch.load(tmp_path / "pytorch_model.bin").values())).dtype == torch.bfloat16
    m32 = C.from_pretrained(tmp_path, device="cpu")  # CPU default: float32
    assert all(p.dtype == torch.float32 for p in m32.parameters())
    m16 = C.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    sd = m.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in m16.state_dict().items())


def test_saved_config_is_the_published_layout(tmp_path):
    d = C.config_to_dict(M.preset("janus-pro-7b"))
    assert d["gen_vision_config"] == {"cls": "VQ-16", "model_type": "gen_vision",
                                      "params": {"image_token_size": 16384, "n_embed": 8}}
    assert d["language_config"]["hidden_size"] == 4096 and d["gen_head_config"]["params"]["n_embed"] == 4096
    # a partial LLaMA language_config is completed with LLaMA's defaults; VQ overrides are optional
    partial = {"language_config": {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                                   "intermediate_size": 176, "vocab_size": 300},
               "gen_vision_config": {"cls": "VQ-16", "params": {"image_token_size": 16384, "n_embed": 8}}}
    cfg = C.config_from_dict(partial)
    assert (cfg.n_kv_head, cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (4, 10000.0, 1e-6, False)
    assert cfg.vq == V.VQConfig() and cfg.image_tokens == 576
    partial["gen_vision_config"]["params"].update(image_size=64, ch=32, encoder_ch_mult=[1, 2, 2, 4],
                                                  decoder_ch_mult=[1, 2, 2, 4], num_res_blocks=1)
    cfg = C.config_from_dict(partial)
    assert cfg.image_tokens == 64 and cfg.vq.ch == 32 and cfg.vq.z_channels == 256
    assert C.config_from_dict(C.config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="rope_scaling"):
        C.config_from_dict({"language_config": {"rope_scaling": {"type": "linear", "factor": 2.0}}})


def write_tiny(tmp_path, weights="safetensors", shards=1):
    m = tiny_model()
    C.save_pretrained(m, tmp_path, weights=weights, shards=shards)
    return m


def test_home_relative_paths_load_as_written_in_a_shell(tmp_path, monkeypatch):
    """checkpoints.from_pretrained("~/models/...") and the tokenizer expand ~, as README's snippets write them."""
    monkeypatch.setenv("HOME", str(tmp_path))
    m = tiny_model()
    tok = make_word_tokenizer(tmp_path / "models" / "tiny")
    C.save_pretrained(m, "~/models/tiny", tokenizer=tok)
    assert (tmp_path / "models" / "tiny" / "model.safetensors").exists()
    again = C.from_pretrained("~/models/tiny", device="cpu")
    assert torch.equal(again.language_model.lm_head.weight, m.language_model.lm_head.weight)
    assert M.Tokenizer.from_pretrained("~/models/tiny").vocab_size == tok.vocab_size


def test_bad_checkpoints_fail_with_clear_errors(tmp_path):
    # no folder, no config, no weights
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.from_pretrained(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        C.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps(C.config_to_dict(tiny_cfg())))
    with pytest.raises(FileNotFoundError, match="expected one of model.safetensors"):
        C.from_pretrained(tmp_path / "a")
    # a shard named by the index is missing
    d = tmp_path / "b"
    write_tiny(d, weights="bin", shards=2)
    os.remove(d / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model-00002-of-00002.bin"):
        C.from_pretrained(d)
    # truncated downloads, both formats
    for weights, name in [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")]:
        d = tmp_path / f"trunc-{weights}"
        write_tiny(d, weights=weights)
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(C.CheckpointError, match=f"could not read .*{name}"):
            C.from_pretrained(d)
    # missing, unexpected and mis-shaped keys: one error listing all of them, naming the file
    d = tmp_path / "keys"
    m = write_tiny(d, weights="bin")
    state = dict(m.state_dict())
    del state["gen_head.vision_head.bias"]
    state["language_model.model.layers.7.mlp.up_proj.weight"] = torch.zeros(3)
    state["gen_embed.weight"] = torch.zeros(5, 8)
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(C.CheckpointError) as e:
        C.from_pretrained(d)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "config.json" in msg
    assert "missing (2)" in msg and "gen_head.vision_head.bias" in msg and "gen_embed.weight" in msg
    assert "unexpected (1)" in msg and "layers.7.mlp.up_proj.weight" in msg
    assert "mis-shaped (1)" in msg and "(5, 8), expected (64, 8)" in msg
    # a config that does not describe the weights
    d = tmp_path / "cfg"
    write_tiny(d)
    (d / "config.json").write_text(json.dumps(C.config_to_dict(tiny_cfg(n_embd=32, intermediate_size=88))))
    with pytest.raises(C.CheckpointError, match="mis-shaped"):
        C.from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(C.CheckpointError, match="not valid JSON"):
        C.from_pretrained(d)


@pytest.mark.parametrize("key", ["gen_vision_model.decoder.conv_out.weight", "language_model.model.layers.1.mlp.up_proj.weight"])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, key):
    """A NaN in the VQ decoder drew cyan images that scored 0 with exit code 0; one in the decoder failed
    steps later inside torch.multinomial. Both are refused at load, naming the tensor and its file."""
    m = tiny_model()
    with torch.no_grad():
        m.state_dict()[key].view(-1)[3] = float("inf" if "vision" in key else "nan")
    C.save_pretrained(m, tmp_path)
    with pytest.raises(C.CheckpointError, match=r"model.safetensors: tensor " + re.escape(key) + " holds 1 non-finite"):
        C.from_pretrained(tmp_path)
