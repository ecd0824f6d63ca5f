"""Tests for t2i-r1. CPU only, tiny random models, seconds each; GPU and reference checks skip cleanly.

Run: python -m pytest -q test_t2i_r1.py
"""

import collections
import io
import json
import math
import os
import re
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import checkpoints as C
import fast_decode as FD
import kernels as K
import model as M
import reward_models as RM
import rewards as RW
import sample as SA
import settings as ST
import shapes as S
import t2i_r1 as R
import train as T
import vq as V


# ---- shared helpers ------------------------------------------------------------------------------------------------


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


@torch.no_grad()
def outputs(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 6), generator=g)
    codes = torch.randint(0, m.cfg.vq.codebook_size, (2, m.cfg.image_tokens), generator=g)
    h = m(torch.cat([m.embed_text(ids), m.embed_image(codes[:, :5])], 1))
    return m.text_logits(h), m.image_logits(h), m.vq.decode_code(codes)


PAD = 0


def gen_images(m, prompts, **kw):
    """generate_images on token lists (left-padded here)."""
    return R.generate_images(m, *R.pad_tokens(prompts, PAD), pad_id=PAD, **kw)


def gen_text(m, prompts, pad_id=PAD, **kw):
    """generate_text on token lists -> each plan as a token list (its real tokens)."""
    ids, mask = R.generate_text(m, *R.pad_tokens(prompts, pad_id), pad_id=pad_id, **kw)
    return [row[:k] for row, k in zip(ids.tolist(), mask.sum(1).tolist())]


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


def byte_tokenizer(folder):
    """A byte-level BPE without merges plus the deepseek special tokens: any text encodes, and decodes back
    exactly, so a request can be compared with the text it should be."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([M.Tokenizer.BOS, M.Tokenizer.EOS, M.Tokenizer.PAD, M.Tokenizer.BOI, M.Tokenizer.EOI])
    os.makedirs(folder, exist_ok=True)
    tk.save(os.path.join(folder, "tokenizer.json"))
    return M.Tokenizer(os.path.join(folder, "tokenizer.json"))


def cli_error(main, argv, capsys, prog):
    """Run a script's main with bad input: it must exit with one `prog: error: ...` line, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith(f"{prog}: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


class CastCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the dtype casts (aten._to_copy) of the tensors in `names` ({data_ptr: name}), by name."""

    def __init__(self, names):
        super().__init__()
        self.names, self.counts = names, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.names:
            name = self.names[args[0].data_ptr()]
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


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


# ---- model.py and vq.py: the Janus-Pro transformer, VQ-16, checkpoints, tokenizer ----------------------------------


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


@pytest.mark.parametrize("kernel", [None, *K.CPU_KERNELS])
def test_linear_cpu_kernels_equal_f_linear(monkeypatch, kernel):
    """Every CPU matmul kernel of kernels.Linear (pinned, or None: the measured choice) gives F.linear's values
    and gradients to float rounding, for decode-sized and larger inputs, with and without autograd."""
    if kernel == "oneDNN" and not K.ONEDNN:
        pytest.skip("oneDNN's matmul is not available here")
    monkeypatch.setattr(K, "CPU_KERNEL", kernel)
    torch.manual_seed(0)
    for bias in (False, True):
        lin = K.Linear(48, 80, bias=bias)
        for shape in [(2, 1, 48), (5, 48), (0, 3, 48), (1, 64, 48), (3, 30, 48), (48,)]:
            x = torch.randn(shape)
            with torch.no_grad():
                y = lin(x)
            assert y.shape == shape[:-1] + (80,) and y.is_contiguous()
            torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), rtol=0, atol=1e-5)
            xg = x.clone().requires_grad_()
            lin(xg).square().sum().backward()
            grads = [xg.grad] + [p.grad.clone() for p in lin.parameters()]
            xg.grad = None
            lin.zero_grad()
            F.linear(xg, lin.weight, lin.bias).square().sum().backward()
            for got, want in zip(grads, [xg.grad] + [p.grad for p in lin.parameters()]):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
            lin.zero_grad()


def test_linear_takes_the_measured_kernel_once_per_shape(monkeypatch):
    """A decode-sized call without autograd takes the kernel measure_kernels finds fastest (oneDNN when another
    is less than 10% faster), measured once per (out, in, rows); calls under autograd and large calls are
    not measured."""
    calls, measure = [], K.measure_kernels
    timings = [{"x W^T": 3.0, "W x^T": 1.0, "oneDNN": 2.0}, {"x W^T": 1.0, "W x^T": 2.0},
               {"x W^T": 0.95, "W x^T": 2.0, "oneDNN": 1.0}]
    def fake_measure(x, w, b):
        calls.append(x.numel() // x.shape[-1])
        return timings[len(calls) - 1]
    monkeypatch.setattr(K, "measure_kernels", fake_measure)
    monkeypatch.setattr(K, "_fastest", {})
    monkeypatch.setattr(K, "CPU_KERNEL", None)
    lin = K.Linear(48, 80)
    with torch.no_grad():
        for shape in [(2, 1, 48), (2, 48), (4, 48), (6, 48), (64, 48)]:
            assert lin(torch.randn(shape)).shape == shape[:-1] + (80,)
    assert calls == [2, 4, 6]
    assert K._fastest == {(80, 48, 2, torch.float32): "W x^T", (80, 48, 4, torch.float32): "x W^T",
                          (80, 48, 6, torch.float32): "oneDNN"}
    lin(torch.randn(3, 48)).sum().backward()  # autograd: not measured
    assert calls == [2, 4, 6]
    # the real measurement times every kernel available here
    times = measure(torch.randn(2, 48), lin.weight, lin.bias, tries=2)
    assert set(times) == {k for k in K.CPU_KERNELS if k != "oneDNN" or K.ONEDNN} and min(times.values()) > 0


@pytest.mark.parametrize("kernel", [None, *K.CPU_KERNELS])
def test_linear_computes_in_bf16_under_cpu_autocast_whatever_its_kernel(monkeypatch, kernel):
    """Under CPU autocast kernels.Linear computes in bf16 and returns bf16, as F.linear does and as every layer does
    on a GPU, with any kernel pinned or measured, with and without autograd; its oneDNN kernel, which autocast
    does not know, returned float32 there."""
    if kernel == "oneDNN" and not K.ONEDNN:
        pytest.skip("oneDNN's matmul is not available here")
    monkeypatch.setattr(K, "CPU_KERNEL", kernel)
    torch.manual_seed(0)
    lin = K.Linear(256, 512)
    for shape in [(2, 256), (64, 256)]:  # a decode step's rows (measured kernel), and a prefill's
        x = torch.randn(shape)
        want = F.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16())
        for grad in (False, True):
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
                y = lin(x)
            assert y.dtype == torch.bfloat16, (shape, grad)
            torch.testing.assert_close(y.float(), want.float(), rtol=0, atol=0.05)
        y.float().sum().backward()
        assert lin.weight.grad.dtype == torch.float32 and lin.weight.grad.abs().sum() > 0
        lin.zero_grad()


def test_float32_master_weights_under_autocast_compute_exactly_what_a_bf16_copy_computes():
    """Mixed precision (float32 weights, bf16 autocast) gives bit for bit the hidden states and logits of the same
    model held in bf16, which is what the KL reference is (so the first step's KL is exactly 0); it decodes
    through a bf16 KV cache; and the heads return float32 logits of their bf16 inputs, not bf16 logits cast."""
    import copy
    m = tiny_model()
    half = copy.deepcopy(m).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 5), generator=g)
    codes = torch.randint(0, m.cfg.vq.codebook_size, (2, 6), generator=g)
    outs = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for model in (m, half):
            x = torch.cat([model.embed_text(ids), model.embed_image(codes)], 1)  # (2, 11, H)
            h = model(x)
            outs.append((h, model.text_logits(h), model.image_logits(h)))
        cache = m.new_cache(2, 11)
        x = torch.cat([m.embed_text(ids), m.embed_image(codes)], 1)
        steps = [m(x[:, :5], cache=cache, input_pos=torch.arange(5))]
        for t in range(5, 11):
            steps.append(m(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])))
        head_in = F.gelu(m.gen_head.output_mlp_projector(outs[0][0]))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert outs[0][0].dtype == torch.bfloat16 and outs[0][1].dtype == outs[0][2].dtype == torch.float32
    assert cache.k[0].dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat(steps, 1).float(), outs[0][0].float(), rtol=0.05, atol=0.05)
    # the image head's product in float32 (float64 here) of its bf16 inputs: a bf16 product is ~1e-3 off
    head = m.gen_head.vision_head
    want = F.linear(head_in.double(), head.weight.bfloat16().double(), head.bias.bfloat16().double())
    assert (outs[0][2].double() - want).abs().max() < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the head a few rows at a time, as a large head goes
        blocks = M.float32_logits(head, head_in, chunk_bytes=4 * head.weight.shape[1] * 5)
    assert (blocks.double() - want).abs().max() < 1e-6


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
    # z's channels meet convolutions only (no GroupNorm), so any count works, as in deepseek's and transformers' VQ
    small_z = V.VQModel(V.VQConfig(**{**vars(cfg), "z_channels": 8})).eval()
    with torch.no_grad():
        assert small_z.decode_code(small_z.encode(torch.zeros(1, 3, cfg.image_size, cfg.image_size))).shape[1] == 3
    with pytest.raises(ValueError, match="channel count 48 is not divisible by 32"):
        V.VQConfig(**{**vars(cfg), "ch": 48})


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
    C.save_tokenizer(tok, tmp_path / "copy")
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


# ---- model.py: fidelity against transformers' Janus port and deepseek's own code (optional: skipped without them) ---


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


@pytest.mark.parametrize("kernel", [None, *K.CPU_KERNELS])
def test_matches_transformers_janus(tmp_path, monkeypatch, kernel):
    if kernel == "oneDNN" and not K.ONEDNN:
        pytest.skip("oneDNN's matmul is not available here")
    monkeypatch.setattr(K, "CPU_KERNEL", kernel)  # None: as in normal use; else every linear layer pinned
    ref = tiny_hf_janus(0.05, image_size=64)
    ref.save_pretrained(tmp_path)
    ours = C.from_pretrained(tmp_path, device="cpu")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 7), generator=g)
    codes = torch.randint(0, 64, (2, ours.cfg.image_tokens), generator=g)
    with torch.no_grad():
        h = ours(torch.cat([ours.embed_text(ids), ours.embed_image(codes)], 1))
        emb = torch.cat([ref.get_input_embeddings()(ids), ref.prepare_embeddings_for_image_generation(codes)], 1)
        hr = ref.model.language_model(inputs_embeds=emb).last_hidden_state
        errs = [(h - hr).abs().max().item(), (ours.text_logits(h) - ref.lm_head(hr)).abs().max().item(),
                (ours.image_logits(h) - ref.model.generation_head(hr)).abs().max().item(),
                (ours.vq.decode_code(codes) - ref.model.vqmodel.decode(codes)).abs().max().item()]
    print("Janus vs transformers: hidden, text logits, image logits, VQ pixels max abs err "
          + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) <= 1e-4, errs


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
    m = C.from_pretrained(folder, device="cpu", dtype=torch.float32)
    f = d["forward"]
    with torch.no_grad():
        h = m(torch.cat([m.embed_text(f["ids"][None]), m.embed_image(f["image_tokens"][None])], 1))[0]
        errs = [(h - f["hidden"]).abs().max().item(), (m.text_logits(h) - f["text_logits"]).abs().max().item(),
                (m.image_logits(h) - f["image_logits"]).abs().max().item(),
                (m.vq.decode_code(d["vq_decode"]["codes"]) - d["vq_decode"]["image"]).abs().max().item()]
        print("Janus vs deepseek: hidden, text logits, image logits, VQ decode max abs err "
              + ", ".join(f"{e:.2e}" for e in errs))
        assert max(errs) <= 1e-4, errs
        assert torch.equal(m.vq.encode(d["vq_encode"]["image"]), d["vq_encode"]["codes"])
    g = d["generate"]
    ours = R.generate_images(m, [prompt], pad_id=int(g["pad_id"]), cfg_weight=5.0, temperature=0)
    assert torch.equal(ours[:, :24], g["codes"])


# ---- t2i_r1.py: the two-step sampler -------------------------------------------------------------------------------


@torch.no_grad()
def reference_images(m, prompt, cfg_weight, steps, temperature=0.0, generator=None):
    """Janus-Pro's procedure with plain full-sequence forwards: no cache, no padding, one prompt."""
    cond = torch.tensor([prompt])
    uncond = R.unconditional(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.bool), PAD)
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
    codes = gen_images(m, prompts, n=2, cfg_weight=5.0, temperature=0)
    assert codes.shape == (6, m.cfg.image_tokens)
    for i, p in enumerate(prompts):
        want = reference_images(m, p, 5.0, m.cfg.image_tokens)
        assert torch.equal(codes[2 * i], want) and torch.equal(codes[2 * i + 1], want)


def test_guidance_weight_one_is_conditional_sampling():
    m = tiny_model()
    prompts = image_prompts(m, lengths=(7, 7))
    got = gen_images(m, prompts, cfg_weight=1.0, temperature=1.0,
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
    greedy = [gen_images(m, prompts, cfg_weight=w, temperature=0) for w in (1.0, 5.0)]
    assert not torch.equal(*greedy)


def test_left_padded_batch_equals_prompts_one_by_one():
    m = tiny_model()
    prompts = image_prompts(m, lengths=(5, 10, 7))
    batch = gen_images(m, prompts, cfg_weight=3.0, temperature=0)
    for i, p in enumerate(prompts):
        assert torch.equal(batch[i], gen_images(m, [p], cfg_weight=3.0, temperature=0)[0])
    texts = gen_text(m, prompts, eos_id=-1, max_new_tokens=6, temperature=0)
    for i, p in enumerate(prompts):
        assert texts[i] == gen_text(m, [p], eos_id=-1, max_new_tokens=6, temperature=0)[0]


def test_text_generation_matches_plain_forwards_and_stops_at_eos():
    m = tiny_model()
    prompt = image_prompts(m, lengths=(6,))[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():  # greedy reference, full forwards
        for _ in range(8):
            nxt = m.text_logits(m(m.embed_text(ids)))[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
    ref = ids[0, len(prompt):].tolist()
    assert gen_text(m, [prompt], eos_id=-1, max_new_tokens=8, temperature=0)[0] == ref
    eos = ref[3]  # pretend the 4th generated token is EOS: generation must stop right after it
    cut = ref.index(eos) + 1
    out = gen_text(m, [prompt, prompt[:4]], eos_id=eos, n=2, max_new_tokens=8, temperature=0)
    assert out[0] == out[1] == ref[:cut]
    assert len(out) == 4
    # a sampled token that happens to be the pad token stays in the plan (the plan's log-probs are later
    # computed in the context it was sampled in); only what follows EOS is cut
    pad = ref[1]
    assert pad not in ref[:1] and pad != eos
    out = gen_text(m, [prompt, prompt[:4]], eos_id=eos, pad_id=pad, n=2, max_new_tokens=8, temperature=0)
    assert out[0] == out[1] == ref[:cut]
    assert gen_text(m, [prompt], eos_id=-1, pad_id=pad, max_new_tokens=8, temperature=0)[0] == ref


def test_seeds_reproduce_and_differ():
    m = tiny_model()
    prompts = image_prompts(m, lengths=(6, 8))
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return (gen_images(m, prompts, n=2, cfg_weight=5.0, generator=g),
                gen_text(m, prompts, eos_id=-1, n=2, max_new_tokens=5, top_p=0.9, generator=g))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("kernel", [None, "oneDNN"])
def test_compiled_decode_step_equals_eager(monkeypatch, kernel):
    """The compiled steps (one graph for every position on CPU) sample what the eager ones sample, also
    with the linear layers pinned to oneDNN, which a graph calls through an op of our own."""
    if kernel == "oneDNN" and not K.ONEDNN:
        pytest.skip("oneDNN's matmul is not available here")
    monkeypatch.setattr(K, "CPU_KERNEL", kernel)
    torch._dynamo.reset()
    m = tiny_model()
    prompts = image_prompts(m, lengths=(6, 8))
    for compile in (False, "aot_eager"):
        g = torch.Generator().manual_seed(0)
        out = (gen_images(m, prompts, n=2, cfg_weight=5.0, generator=g, compile=compile),
               gen_text(m, prompts, eos_id=-1, max_new_tokens=5, generator=g, compile=compile))
        if compile:
            assert torch.equal(out[0], eager[0]) and out[1] == eager[1]
        eager = out


def test_left_padding_does_not_change_samples():
    """Static decoding pads prompts on the left up to a bucket's width: masked slots change no sample."""
    m = tiny_model()
    ids, mask = R.pad_tokens(image_prompts(m, lengths=(6, 9)), PAD)
    wide = F.pad(ids, (7, 0), value=PAD), F.pad(mask, (7, 0), value=False)  # (2, 16)
    out = []
    for ids_, mask_ in ((ids, mask), wide):
        g = torch.Generator().manual_seed(0)
        plans = R.generate_text(m, ids_, mask_, eos_id=-1, pad_id=PAD, n=2, max_new_tokens=5, generator=g)
        out.append((R.generate_images(m, ids_, mask_, pad_id=PAD, n=2, cfg_weight=5.0, generator=g), *plans))
    assert all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.parametrize("widths", [range(4, 20)])
def test_static_decode_compiles_a_graph_per_width_bucket(monkeypatch, widths):
    """Static shapes (CUDA graphs), 16 prompt widths: the steps compile once per bucket of widths (16, 32),
    not once per width (which hit dynamo's recompile limit at the 9th), and sample what eager steps do."""
    from torch._dynamo.testing import CompileCounterWithBackend
    monkeypatch.setattr(FD, "STATIC_DECODE", True)
    FD.release_decoding()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    m = tiny_model()
    for w in widths:
        prompts = image_prompts(m, lengths=(w, max(3, w - 3)), seed=w)
        for compile in (False, counter):
            out = (gen_images(m, prompts, n=2, cfg_weight=5.0, temperature=0, compile=compile),
                   gen_text(m, prompts, eos_id=-1, max_new_tokens=4, temperature=0, compile=compile))
            if compile:
                assert torch.equal(out[0], eager[0]) and out[1] == eager[1], w
            eager = out
    assert {FD.bucket_width(w) for w in widths} == {16, 32}
    assert counter.frame_count == 2 * 2  # image and text steps, two buckets each
    assert len(FD._arena) == 1  # one set of cache buffers, reused: fixed addresses for CUDA graphs


def test_static_decode_does_not_recompile_per_call_whatever_torch_guards_by_default(monkeypatch):
    """torch releases whose mark_static_address guards by default (guard=True, an ID_MATCH on the tensor)
    would recompile the static step at every sampling call, since each call views the held cache buffers
    anew: the cache marks them unguarded itself. Same width, three calls: one graph per step kind."""
    from torch._dynamo.testing import CompileCounterWithBackend
    mark = torch._dynamo.mark_static_address
    monkeypatch.setattr(torch._dynamo, "mark_static_address", lambda t, guard=True: mark(t, guard=guard))
    monkeypatch.setattr(FD, "STATIC_DECODE", True)
    FD.release_decoding()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    m = tiny_model()
    for seed in range(3):
        prompts = image_prompts(m, lengths=(7, 5), seed=seed)
        gen_images(m, prompts, n=2, cfg_weight=5.0, temperature=0, compile=counter)
        gen_text(m, prompts, eos_id=-1, max_new_tokens=4, temperature=0, compile=counter)
    assert counter.frame_count == 2


def test_static_decode_repeats_samples_straight_into_the_held_cache(monkeypatch):
    """n samples per prompt: a static decode copies each prefilled row n times into the held buffers, with no
    repeated cache built first (it would hold the samples' cache twice at the rollout's peak), and draws
    what eager decoding draws, row i * n + j being sample j of prompt i."""
    monkeypatch.setattr(FD, "STATIC_DECODE", True)
    FD.release_decoding()
    torch._dynamo.reset()
    m = tiny_model()
    prompts = image_prompts(m, lengths=(7, 5, 9))
    out = []
    for compile in (False, "aot_eager"):
        g = torch.Generator().manual_seed(0)
        out.append((gen_images(m, prompts, n=3, cfg_weight=5.0, generator=g, compile=compile),
                    gen_text(m, prompts, eos_id=-1, n=3, max_new_tokens=4, generator=g, compile=compile)))
        if not compile:  # from here on a repeated cache is an error
            monkeypatch.setattr(M.KVCache, "repeat_rows", lambda *a: pytest.fail("a repeated cache was built"))
    assert torch.equal(out[0][0], out[1][0]) and out[0][1] == out[1][1]


def test_decode_loops_never_wait_for_the_device(monkeypatch):
    """No host sync per token: no multinomial (its checks read the probabilities back), no tensor read into
    Python, no position or weight copied from the host. The plan loop asks whether all rows are done every
    8 tokens (on CUDA without waiting: AllDone)."""
    m = tiny_model()
    prompts = image_prompts(m, lengths=(6, 9))
    calls = collections.Counter()

    def counted(name, f):
        def wrapper(*a, **k):
            calls[name] += 1
            return f(*a, **k)
        return wrapper
    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for name in ("tensor", "multinomial"):
        monkeypatch.setattr(torch, name, counted(name, getattr(torch, name)))
    ids, mask = R.pad_tokens(prompts, PAD)
    g = torch.Generator().manual_seed(0)
    R.generate_images(m, ids, mask, pad_id=PAD, n=2, cfg_weight=5.0, generator=g)
    assert not calls, calls
    calls.clear()
    R.generate_text(m, ids, mask, eos_id=-1, pad_id=PAD, n=2, max_new_tokens=24, generator=g)
    assert calls["__bool__"] == 2 and calls["item"] + calls["tolist"] + calls["multinomial"] <= 1, calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_decode_loops_never_sync_on_cuda():
    m = tiny_model().cuda()
    ids, mask = R.pad_tokens(image_prompts(m, lengths=(6, 9)), PAD, "cuda")
    g = torch.Generator("cuda").manual_seed(0)
    R.generate_images(m, ids, mask, pad_id=PAD, n=2, cfg_weight=5.0, generator=g)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        R.generate_images(m, ids, mask, pad_id=PAD, n=2, cfg_weight=5.0, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_cuda_graph_decode_samples_what_eager_decode_samples(autocast):
    """Images and plans (the plan loop's AllDone too) as eager steps sample them, in float32; as train.py's
    rollouts sample (bf16 autocast over float32 weights) the graphs run at all. Inductor must not skip the
    CUDA graph (e.g. for the cache's in-place writes): it would run, only slowly."""
    from torch._dynamo.utils import counters
    counters.clear()
    m = tiny_model().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for w in (5, 9, 20):
            ids, mask = R.pad_tokens(image_prompts(m, lengths=(w, 4), seed=w), PAD, "cuda")
            out = [(R.generate_images(m, ids, mask, pad_id=PAD, n=2, cfg_weight=5.0, temperature=0, compile=compile),
                    *R.generate_text(m, ids, mask, eos_id=-1, pad_id=PAD, n=2, max_new_tokens=20, temperature=0,
                                     compile=compile)) for compile in (False, True)]
            # bf16: inductor's fused kernels round otherwise, and a tiny random model's argmax may flip
            assert all(torch.equal(a, b) if not autocast else a.shape == b.shape for a, b in zip(*out)), w
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_sampling_draws_what_torch_multinomial_draws():
    """sample_from_logits draws, without torch.multinomial (which waits for the GPU), the very tokens it
    would draw from the same random stream: the samples behind README's figures stay as they were."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)) * 3
    cold = logits / 0.7
    top50 = cold.masked_fill(cold < torch.topk(cold, 50).values[:, -1:], float("-inf"))
    for temperature, top_k, probs in ((1.0, None, logits.softmax(-1)), (0.7, 50, top50.softmax(-1))):
        g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
        for _ in range(5):
            assert torch.equal(R.sample_from_logits(logits, temperature, top_k, generator=g1),
                               torch.multinomial(probs, 1, generator=g2).squeeze(-1))


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
    s = R.sample_t2i(m, tok, ["a red circle", "a blue square"], settings(max_plan_tokens=5), n=2, generator=g)
    assert s.codes.shape == (4, m.cfg.image_tokens) and len(s.plans) == 4 and len(s) == 4
    assert s.prompts == ["a red circle", "a red circle", "a blue square", "a blue square"]
    requests, plans = real(s.request_ids, s.request_mask), real(s.plan_ids, s.plan_mask)
    for i in range(4):
        assert requests[i][0] == tok.bos_id and 0 < len(plans[i]) <= 5
        want = tok.encode(M.image_prompt(R.image_prompt_text(s.prompts[i], s.plans[i])))
        assert real(s.image_prompt_ids, s.image_prompt_mask)[i] == want and want[-1] == tok.boi_id
    assert R.image_prompt_text("a red circle.", " red circle left ") == "a red circle. red circle left"
    # the rows of a rollout keep their tokens, with padding trimmed to the longest of them, and rollouts join
    for i, j in ((0, 4), (1, 3), (3, 4)):
        part = s.rows(i, j)
        assert real(part.plan_ids, part.plan_mask) == plans[i:j] and part.plan_mask[:, -1].any()
        assert real(part.request_ids, part.request_mask) == requests[i:j] and part.request_mask[:, 0].any()
    both = R.Rollout.cat([s.rows(2, 4), s.rows(0, 1)], tok.pad_id)
    assert real(both.plan_ids, both.plan_mask) == plans[2:4] + plans[:1] and both.prompts == s.prompts[2:] + s.prompts[:1]
    s2 = R.sample_t2i(m, tok, ["a red circle"], settings(), n=3, levels="token", generator=g)
    assert s2.plans == ["", "", ""] and s2.plan_ids.shape == (3, 0)
    assert real(s2.image_prompt_ids, s2.image_prompt_mask)[0] == tok.encode(M.image_prompt("a red circle"))
    with pytest.raises(ValueError, match="empty prompt"):
        R.sample_t2i(m, tok, ["  "], settings())
    with pytest.raises(ValueError, match="unset"):
        R.sample_t2i(m, tok, ["a red circle"], R.SamplingConfig())
    (tmp_path / "bad.txt").write_text("no placeholder")
    with pytest.raises(ValueError, match="bad.txt"):
        R.load_reasoning_prompt(str(tmp_path / "bad.txt"))
    (tmp_path / "reasoning_prompt.txt").write_text("plan {prompt}")
    assert R.load_reasoning_prompt(ckpt=str(tmp_path)) == "plan {prompt}"


def test_t2i_r1_requests_are_written_as_t2i_r1_writes_them(tmp_path):
    """The plan request as T2I-R1's trainer builds it: its system prompt, a blank line, 'User: ' + the filled
    template (stripped), a blank line, 'Assistant:'; the template file with T2I-R1's {} placeholder; the image
    request 'User: {prompt}. {plan as decoded}' + 'Assistant:' + <begin_of_image>, no system prompt."""
    system = "You are a helpful assistant that receives an image prompt and generate a visualization of the prompt."
    # a template laid out like T2I-R1's file: {} in quotes, a trailing space and no final newline
    (tmp_path / "request.txt").write_text('Describe the picture for "{}" in a few words.\nDescription: ')
    template = R.load_reasoning_prompt(str(tmp_path / "request.txt"))
    tok = byte_tokenizer(tmp_path / "tok")
    m = tiny_model(vocab_size=tok.vocab_size)
    g = torch.Generator().manual_seed(0)
    prompts = ["a red apple.", "two cups {on} a table"]
    t2i = settings(chat_format="t2i-r1", max_plan_tokens=6)
    s = R.sample_t2i(m, tok, prompts, t2i, n=2, reasoning_template=template, generator=g)
    requests, images = real(s.request_ids, s.request_mask), real(s.image_prompt_ids, s.image_prompt_mask)
    for i, p in enumerate(s.prompts):
        want = f'{system}\n\nUser: Describe the picture for "{p}" in a few words.\nDescription:\n\nAssistant:'
        assert requests[i][0] == tok.bos_id and tok.tk.decode(requests[i][1:]) == want
        assert requests[i] == tok.encode(want)
        plan = tok.tk.decode(real(s.plan_ids, s.plan_mask)[i], skip_special_tokens=True)
        image = "User: " + f"{p}. {plan}".strip() + "\n\nAssistant:"
        assert images[i] == tok.encode(image) + [tok.boi_id]
    assert R.CHAT_FORMATS["t2i-r1"].image_text("a cup", "") == "User: a cup.\n\nAssistant:<begin_of_image>"
    s = R.sample_t2i(m, tok, prompts, t2i, n=1, levels="token", generator=g)
    assert real(s.image_prompt_ids, s.image_prompt_mask)[1] == (tok.encode("User: two cups {on} a table\n\nAssistant:")
                                                                + [tok.boi_id])
    # Janus-Pro's demos (and the shapes world): roles <|User|>/<|Assistant|>, no system prompt
    s = R.sample_t2i(m, tok, prompts[:1], settings(max_plan_tokens=3), reasoning_template="plan {prompt}", generator=g)
    assert tok.tk.decode(real(s.request_ids, s.request_mask)[0][1:]) == "<|User|>: plan a red apple.\n\n<|Assistant|>:"
    # which format a checkpoint gets: its own reasoning_prompt.txt means it was trained on the janus format
    assert R.default_chat_format(str(tmp_path)) == "t2i-r1" and R.default_chat_format(None) == "t2i-r1"
    (tmp_path / "reasoning_prompt.txt").write_text("describe {prompt}")
    assert R.default_chat_format(str(tmp_path)) == "janus"
    for text, bad in [("no placeholder", "none"), ("both {} and {prompt}", "{prompt}")]:
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(ValueError, match=r"bad.txt must hold .* found .*" + re.escape(bad)):
            R.load_reasoning_prompt(str(tmp_path / "bad.txt"))
    with pytest.raises(ValueError, match="chat format must be one of"):
        R.sample_t2i(m, tok, prompts, settings(chat_format="llama"))
    with pytest.raises(ValueError, match="--chat-format must be one of"):
        ST.check_settings(R.SamplingConfig(chat_format="llama"))


# ---- t2i_r1.py: the BiCoT-GRPO objective (advantages, log-probabilities, loss) -------------------------------------


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
    # flat groups of rewards that float32 cannot hold exactly: the mean rounds, the advantage must not
    for v, G in [(0.1, 8), (1 / 3, 3), (0.7, 8), (2.3, 16), (1e-3, 5), (123.456, 7)]:
        rewards = torch.cat([torch.full((G,), v), torch.tensor([0.0] * (G - 1) + [1.0])])
        a = R.group_advantages(rewards, G)
        assert a[:G].eq(0).all(), (v, G, a[:G])
        assert a[G:].ne(0).all() and a.dtype == torch.float32
        combined = T.combined_reward({"r": rewards}, {"r": 1.0}, "group", group_size=G)
        assert combined[:G].eq(0).all(), (v, G, combined[:G])
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
    codes = torch.randint(0, m.cfg.vq.codebook_size, (2, 6))
    ids, mask = R.pad_tokens(prompts, PAD)
    plan_ids, plan_mask = R.pad_tokens(plans, PAD, side="right")
    assert plan_mask.tolist() == [[True] * 3, [True, True, False]]
    uncond = R.unconditional(ids, mask, PAD)
    assert real(uncond, mask) == [[p[0]] + [PAD] * (len(p) - 2) + [p[-1]] for p in prompts]
    full = torch.ones_like(codes, dtype=torch.bool)
    text_lp = R.completion_logprobs(m, ids, mask, plan_ids, plan_mask, "text")
    img_lp = R.completion_logprobs(m, ids, mask, codes, full, "image")
    cfg_lp = R.completion_logprobs(m, ids, mask, codes, full, "image", uncond_ids=uncond, cfg_weight=3.0,
                                   temperature=0.7)
    assert text_lp[1, 2] == 0
    uncond, codes = real(uncond, mask), codes.tolist()
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


def test_kl_term_gradient_matches_its_derivative():
    """With zero advantages the loss is beta * mean k3, whose derivative in logp is beta (1 - exp(ref - logp))
    per token: a KL with a wrong sign or estimator fails here."""
    torch.manual_seed(0)
    logp = (-torch.rand(3, 5) * 3).requires_grad_()
    ref = -torch.rand(3, 5) * 3
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    beta = 0.3
    for norm in ("token", "sequence"):
        loss, stats = R.grpo_loss(logp, logp.detach(), ref, torch.zeros(3), mask, beta=beta, norm=norm)
        g, = torch.autograd.grad(loss, logp)
        per = beta * (1 - torch.exp(ref - logp.detach())) * mask           # d(beta k3)/d logp per token
        want = per / mask.sum() if norm == "token" else per / mask.sum(1, keepdim=True) / 3
        torch.testing.assert_close(g, want)
        d = ref - logp.detach()
        assert stats["kl"] == pytest.approx(float(((d.exp() - d - 1) * mask).sum() / mask.sum()), rel=1e-6)
    # at the reference the KL and its gradient vanish
    loss, _ = R.grpo_loss(ref.clone().requires_grad_(), ref, ref, torch.zeros(3), mask, beta=beta)
    assert loss.item() == 0


# ---- rewards.py: CLIP, the reward models, OWL-ViT, the GenEval rules, T2I-R1's prompt file -------------------------


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


def _meta(n, prompt="a photo of a cat"):
    return [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": prompt} for _ in range(n)]


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


def test_every_reward_loads_and_scores(tmp_path):
    ckpt, head = _reward_folders(tmp_path)
    weights = {"clip": 1, "pickscore": 1, "hps": 1, "aesthetic": 0.5, "geneval": 1}
    ens = RW.RewardEnsemble(weights, ckpt, device="cpu", batch_size=3)
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
        RW.RewardEnsemble({"clip": 1, "hps": 1}, ckpt, device="cpu")
    msg = str(e.value)
    assert msg.startswith("hps:") and "HPS_v2.1_compressed.pt" in msg and ckpt["hps"] in msg
    assert "huggingface.co/xswu/HPSv2" in msg
    with pytest.raises(FileNotFoundError, match=r"aesthetic: needs the 'clip' checkpoint.*--reward-ckpt clip="):
        RW.RewardEnsemble({"aesthetic": 1}, {"aesthetic": ckpt["aesthetic"]}, device="cpu")
    os.remove(os.path.join(ckpt["geneval"], "merges.txt"))
    with pytest.raises(FileNotFoundError,
                       match=r"geneval: vocab.json \+ merges.txt or tokenizer.json not found.*owlvit"):
        RW.GenEvalReward(ckpt, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"pickscore: .*yuvalkirstain/PickScore_v1"):
        RW.PickScore({"pickscore": str(tmp_path / "nowhere")}, device="cpu")


def test_weight_file_path_and_bad_images(tmp_path):
    ckpt, _ = _reward_folders(tmp_path)
    ckpt["hps"] = os.path.join(ckpt["hps"], "HPS_v2.1_compressed.pt")  # a file path works as well as its folder
    hps = RW.HPS(ckpt, device="cpu")
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


def test_nan_reward_raises_naming_it(tmp_path):
    c = _tiny_cfg()
    _write_hf_clip(tmp_path / "clip", c, _clip_sd(c))
    ens = RW.RewardEnsemble({"clip": 1}, {"clip": str(tmp_path / "clip")}, device="cpu")
    ens(_images(2), _meta(2))  # loads the model; a NaN in its file is refused at load (the test above)
    with torch.no_grad():
        ens.rewards["clip"].clip.visual_projection.weight[0, 0] = float("nan")  # a model that diverges later
    with pytest.raises(FloatingPointError, match="reward 'clip'"):
        ens(_images(2), _meta(2))
    with pytest.raises(FloatingPointError, match="reward 'hps'"):
        RW.combine_rewards({"hps": torch.tensor([1.0, float("inf")])}, {"hps": 1.0})


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
    with_nms = RW.GenEvalReward(ckpt, device="cpu")
    scores, info = with_nms(img, meta)
    assert len(info["detections"][0]) == 1 and scores.tolist() == [0.5]  # count credit 1 - |2 - 1| / 2
    without = RW.GenEvalReward(ckpt, device="cpu", config=RW.GenEvalConfig(nms_iou=1.01))
    scores, info = without(img, meta)
    assert len(info["detections"][0]) == 2 and scores.tolist() == [1.0] and info["strict"] == [True]
    boxes = [d["box"] for d in info["detections"][0]]
    assert boxes[0] == boxes[1] and np.allclose(boxes[0], (48, 48, 96, 96), atol=0.1)  # centre ~1, size ~1, clamped


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


def _det(cls, box, score=0.9, color=None):
    return {"class": cls, "box": box, "score": score, "color": color}


def test_relative_position_thresholds():
    b = (0, 0, 10, 10)  # centre (5, 5), size 10 x 10
    assert RW.relative_position((20, 0, 30, 10), b) == {"right of"}
    assert RW.relative_position((-20, 0, -10, 10), b) == {"left of"}
    assert RW.relative_position((0, -20, 10, -10), b) == {"above"}  # y grows downward
    assert RW.relative_position((0, 20, 10, 30), b) == {"below"}
    # shrink = 0.1 * (10 + 10) = 2 per axis: an offset of 2 or less is no relation at all; beyond that the
    # shrunk offset is divided by the ORIGINAL length: (d - 2) / d > 0.5 needs d > 4
    assert RW.relative_position((2, 0, 12, 10), b) == set()
    assert RW.relative_position((3.99, 0, 13.99, 10), b) == set()
    assert RW.relative_position((4.01, 0, 14.01, 10), b) == {"right of"}
    assert RW.relative_position((0, -4.01, 10, 5.99), b) == {"above"}
    # diagonal: offset (10, 10) -> shrunk (8, 8) / |offset| 14.14 = 0.566 > 0.5 on both axes
    assert RW.relative_position((10, 10, 20, 20), b) == {"right of", "below"}
    # offset (10, 7): shrunk (8, 5) / 12.21 = (0.655, 0.410): right only
    assert RW.relative_position((10, 7, 20, 17), b) == {"right of"}
    # just around 0.5 on x with dy = 10: (dx - 2) / sqrt(dx^2 + 100) = 0.5 at dx = 8.6
    assert RW.relative_position((8.7, 10, 18.7, 20), b) == {"right of", "below"}
    assert RW.relative_position((8.5, 10, 18.5, 20), b) == {"below"}
    # big boxes shrink more: 0.1 * (40 + 10) = 5 swallows an offset of 4.9
    assert RW.relative_position((-10.1, -15, 29.9, 25), b) == set()


def test_geneval_counting_is_exact_with_exclude():
    meta = {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}],
            "prompt": "a photo of three dogs"}
    dogs = [_det("dog", (i * 20, 0, i * 20 + 10, 10), 0.9 - i * 0.1) for i in range(5)]
    r = [RW.geneval_score(dogs[:n] + [_det("cat", (0, 0, 5, 5))], meta) for n in range(6)]
    assert [x["strict"] for x in r] == [False, False, False, True, False, False]
    assert [round(x["dense"], 4) for x in r] == [0.0, round(1 / 3, 4), round(2 / 3, 4), 1.0, round(2 / 3, 4),
                                                 round(1 / 3, 4)]
    other = {"tag": "single_object", "include": [{"class": "cup", "count": 1}],
             "exclude": [{"class": "bird", "count": 1}], "prompt": "a cup"}
    assert RW.geneval_score([_det("cup", (0, 0, 1, 1))], other) == {"strict": True, "dense": 1.0, "reasons": []}
    bad = RW.geneval_score([_det("cup", (0, 0, 1, 1)), _det("bird", (0, 0, 1, 1))], other)
    assert not bad["strict"] and bad["dense"] == 0.5  # cup clause 1, bird exclude clause 0


def test_geneval_colors_and_partial_credit():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 2, "color": "red"},
                                             {"class": "bench", "count": 1, "color": "blue"}], "prompt": "..."}
    cars = [_det("car", (0, 0, 9, 9), 0.9, "red"), _det("car", (20, 0, 29, 9), 0.8, "green"),
            _det("car", (40, 0, 49, 9), 0.3, "red")]  # the third red car is not among the 2 most confident
    bench = [_det("bench", (0, 20, 9, 29), 0.9, "blue")]
    r = RW.geneval_score(cars + bench, meta)
    assert not r["strict"]
    # car: count 1 - |2 - 3| / 2 = 0.5, colour 1/2 -> 0.5; bench: 1 -> dense 0.75
    assert r["dense"] == pytest.approx(0.75)
    cars[1]["color"] = "red"
    r = RW.geneval_score(cars[:2] + bench, meta)
    assert r["strict"] and r["dense"] == 1.0


def test_geneval_position_rules():
    meta = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                           {"class": "cat", "count": 1, "position": ["left of", 0]}], "prompt": "..."}
    dog = _det("dog", (50, 0, 60, 10))
    assert RW.geneval_score([dog, _det("cat", (0, 0, 10, 10))], meta)["strict"]
    wrong = RW.geneval_score([dog, _det("cat", (100, 0, 110, 10))], meta)
    assert not wrong["strict"] and wrong["dense"] == pytest.approx(0.75)  # cat: count 1, position 0
    missing_ref = RW.geneval_score([_det("cat", (0, 0, 10, 10))], meta)
    assert not missing_ref["strict"] and missing_ref["dense"] == pytest.approx(0.25)  # dog 0; cat (1 + 0) / 2
    # count 2: both cats must be left of the dog; one is, so strict fails and position credit is 1/2
    meta2 = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                            {"class": "cat", "count": 2, "position": ["left of", 0]}], "prompt": ""}
    cats = [_det("cat", (0, 0, 10, 10), 0.9), _det("cat", (100, 0, 110, 10), 0.8)]
    r = RW.geneval_score([dog] + cats, meta2)
    assert not r["strict"] and r["dense"] == pytest.approx((1 + (1 + 0.5) / 2) / 2)


def test_geneval_include_means_at_least_and_positions_are_checked_against_every_pair():
    # an include clause asks for at least `count` (GenEval): two circles still show "a photo of a circle"
    one = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
    assert RW.geneval_score([_det("circle", (0, 0, 10, 10)), _det("circle", (30, 0, 40, 10), 0.8)], one)["strict"]
    # position credit is over every (clause object, reference object) pair: two cats, two dogs, one cat left of
    # both dogs and the other right of both: 2 of 4 pairs
    meta = {"tag": "position", "include": [{"class": "dog", "count": 2},
                                           {"class": "cat", "count": 2, "position": ["left of", 0]}], "prompt": ""}
    dogs = [_det("dog", (50, 0, 60, 10)), _det("dog", (200, 0, 210, 10), 0.8)]
    cats = [_det("cat", (0, 0, 10, 10)), _det("cat", (300, 0, 310, 10), 0.8)]
    r = RW.geneval_score(dogs + cats, meta)
    assert not r["strict"] and r["dense"] == pytest.approx((1 + (1 + 2 / 4) / 2) / 2)
    # a clause placed relative to itself has nothing matched to compare with: refused at validation
    with pytest.raises(ValueError, match=r"include\[1\]: 'position' must be"):
        RW.check_geneval_metadata({**meta, "include": [meta["include"][0], {**meta["include"][1],
                                                                             "position": ["left of", 1]}]})


def test_geneval_summary():
    recs = [("counting", True), ("counting", False), {"tag": "colors", "strict": True}, ("position", False)]
    s = RW.geneval_summary(recs)
    assert s["per_tag"] == {"counting": 0.5, "colors": 1.0, "position": 0.0}
    assert s["overall"] == pytest.approx(0.5) and s["count"]["counting"] == 2
    # a tag outside GenEval's six (the shapes world's reasoning) is reported beside the overall score, not in it
    s = RW.geneval_summary(recs + [("reasoning", True), ("reasoning", True)])
    assert s["per_tag"]["reasoning"] == 1.0 and s["overall"] == pytest.approx(0.5)
    assert RW.geneval_summary([("reasoning", True), ("reasoning", False)])["overall"] == 0.5


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
        found = [next(i for i, c in enumerate(RW.GENEVAL_COLORS) if f" {c} " in t or f" {c}-" in t) for t in texts]
        return torch.tensor(found)[:, None]

    def encode_text(self, ids):
        return torch.tensor([self.RGB[RW.GENEVAL_COLORS[i]] for i in ids[:, 0].tolist()]) - 0.5

    def encode_image(self, pixels):
        rgb = pixels * torch.tensor(RM.CLIP_STD).view(1, 3, 1, 1) + torch.tensor(RM.CLIP_MEAN).view(1, 3, 1, 1)
        return rgb.mean((2, 3)) - 0.5


def test_geneval_color_step_on_crops(tmp_path):
    img = np.full((60, 150, 3), 128, np.uint8)  # grey background, three coloured blocks left to right
    img[:, 0:50] = (255, 0, 0)
    img[:, 50:100] = (0, 0, 255)
    img[10:50, 100:150] = (255, 255, 255)
    stub = _ColorStubCLIP()
    boxes = [(105, 12, 145, 48), (2, 2, 48, 58), (55, 5, 95, 55), (100, 10, 150, 50)]
    assert RW.classify_colors(stub, stub.tokenizer, img, boxes, "car") == ["white", "red", "blue", "white"]
    assert "a photo of a red car" in stub.prompts and "a photo of a red-colored car" in stub.prompts
    assert "a photo of a red object" in stub.prompts
    # through the reward: only the `count` most confident cars are coloured, and the rules see the colours
    ckpt, _ = _reward_folders(tmp_path)
    reward = RW.GenEvalReward(ckpt, device="cpu")
    reward._ensure_loaded()
    reward.clip, reward.tok = stub, stub.tokenizer
    dets = [_det("car", (105, 12, 145, 48), 0.9), _det("car", (2, 2, 48, 58), 0.8), _det("car", (55, 5, 95, 55), 0.2)]
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 2, "color": "white"}],
            "prompt": "two white cars"}
    reward.add_colors(img, dets, meta)
    assert [d["color"] for d in dets] == ["white", "red", None]
    r = RW.geneval_score(dets, meta)
    assert not r["strict"] and r["dense"] == pytest.approx((1 - 1 / 2 + 1 / 2) / 2)


def test_rule_rewards_refuse_classes_colours_and_tags_they_cannot_recognise(tmp_path, capsys):
    """A misspelt class, an unknown colour or tag could never be found: its prompt scored 0 forever."""
    reward = S.ShapesReward()
    good = {"prompt": "a photo of a red circle", "tag": "colors", "include": [{"class": "circle", "count": 1,
                                                                              "color": "red"}]}
    reward.check_metadata([good])
    for bad, msg in [({"class": "cirlce"}, "include\\[0\\]: class 'cirlce' is not one it detects \\(circle, square, triangle\\)"),
                     ({"color": "cyan"}, "include\\[0\\]: color 'cyan' is not one it tells apart"),
                     ({"color": "pink"}, "color 'pink'")]:  # a GenEval colour, but not one of this world's
        m = {**good, "include": [{**good["include"][0], **bad}]}
        with pytest.raises(ValueError, match="shapes: prompt 0 .*" + msg):
            reward.check_metadata([m])
    with pytest.raises(ValueError, match="tag 'colours' is not one of"):
        reward.check_metadata([{**good, "tag": "colours"}])
    assert RW.GenEvalReward.classes is None and "pink" in RW.GenEvalReward.colors  # OWL-ViT: any class name
    (tmp_path / "p.jsonl").write_text(json.dumps({**good, "include": [{"class": "cirlce", "count": 1}]}) + "\n")
    err = cli_error(T.main, ["--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "run")], capsys, "train.py")
    assert "class 'cirlce'" in err and not (tmp_path / "run").exists()


def test_reward_args_parsing():
    assert RW.parse_rewards("hps:1,geneval, aesthetic:0.5") == {"hps": 1.0, "geneval": 1.0, "aesthetic": 0.5}
    assert RW.parse_reward_ckpt(["hps=/a/b", "clip=~/c"]) == {"hps": "/a/b", "clip": os.path.expanduser("~/c")}
    assert RW.parse_reward_ckpt("hps=/a,clip=/b") == {"hps": "/a", "clip": "/b"}
    assert T.parse_args([]).reward_combine == "sum"
    for bad, match in [("hps:x", "not a number"), ("nope:1", "unknown reward"), ("hps,hps", "twice"), ("", "no reward"),
                       ("hps:nan", "finite")]:
        with pytest.raises(ValueError, match=match):
            RW.parse_rewards(bad)
    with pytest.raises(ValueError, match="NAME=PATH"):
        RW.parse_reward_ckpt(["hps"])
    with pytest.raises(ValueError, match="unknown checkpoint"):
        RW.parse_reward_ckpt(["foo=/x"])


def test_combine_sum_and_group():
    s = {"a": torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), "b": torch.tensor([0.0, 0.0, 10.0, 1.0, 2.0, 3.0])}
    w = {"a": 1.0, "b": 0.5}
    assert torch.allclose(T.combined_reward(s, w, "sum"), torch.tensor([1.0, 2.0, 8.0, 5.5, 6.0, 6.5]))
    g = T.combined_reward(s, w, "group", group_size=3)
    # group 1: a -> (-1, 0, 1) / (1 + 1e-4); b: mean 10/3, unbiased std 5.7735
    # group 2: a equal -> 0 (no NaN); b -> (-1, 0, 1) / (1 + 1e-4)
    bstd = math.sqrt(((10 / 3) ** 2 * 2 + (20 / 3) ** 2) / 2)
    want = [-1 / 1.0001 + 0.5 * (-10 / 3) / (bstd + 1e-4), 0.5 * (-10 / 3) / (bstd + 1e-4),
            1 / 1.0001 + 0.5 * (20 / 3) / (bstd + 1e-4), -0.5 / 1.0001, 0.0, 0.5 / 1.0001]
    assert torch.allclose(g, torch.tensor(want), atol=1e-5)
    same = T.combined_reward({"a": torch.full((4,), 7.0)}, {"a": 1.0}, "group", group_size=2)
    assert torch.equal(same, torch.zeros(4))
    with pytest.raises(ValueError, match="group_size"):
        T.combined_reward(s, w, "group", group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        T.combined_reward(s, w, "group")


def test_diversity():
    e = torch.eye(3)
    assert RW.diversity([e]) == pytest.approx(1.0)  # orthogonal: distance 1
    assert RW.diversity([torch.ones(4, 3)]) == pytest.approx(0.0, abs=1e-6)  # identical
    assert RW.diversity(torch.stack([torch.tensor([[1.0, 0], [-1.0, 0]]), torch.ones(2, 2)])) == pytest.approx(1.0)
    assert RW.diversity([e, e[:1]]) == pytest.approx(1.0)  # a prompt with one image is skipped
    with pytest.raises(ValueError):
        RW.diversity([e[:1]])


def test_shapes_t2i_r1_prompts_convert_to_geneval():
    lines = [
        '{"prompt": "a photo of a car below a zebra", "nouns": ["car", "zebra"], "spatial_info": {"obj1": "car", '
        '"obj2": "zebra", "locality": "below"}, "task_type": "spatial"}',
        '{"task_type": "spatial", "prompt": "a bowl on the left of a man", "nouns": ["bowl", "man"], '
        '"spatial_info": {"obj1": "bowl", "obj2": "man", "locality": "on the left of"}}',
        '{"task_type": "complex", "prompt": "The black mug was on top of the white coaster.", '
        '"nouns": ["mug", "coaster"], "spatial_info": {"obj1": "mug", "obj2": "coaster", "locality": "on top of"}}',
        '{"task_type": "spatial", "prompt": "a mouse next to a backpack", "nouns": ["mouse", "backpack"], '
        '"spatial_info": {"obj1": "mouse", "obj2": "backpack", "locality": "next to"}}',
        '{"task_type": "numeracy", "prompt": "two plates and three microphones", "nouns": ["plate", "microphone"], '
        '"numeracy_info": [{"obj_name": "plate", "num": 2}, {"obj_name": "microphone", "num": 3}]}',
        '{"task_type": "color", "prompt": "a green duck and a yellow frog", "nouns": ["duck", "frog"], '
        '"attr_nouns": ["green duck", "yellow frog"]}',
        '{"task_type": "color", "prompt": "A red bathroom has a white towel on the bar.", '
        '"nouns": ["bathroom", "towel", "bar"], "attr_nouns": ["red towel"]}',
        '{"task_type": "color", "prompt": "a gold clock and a red train", "nouns": ["clock", "train"], '
        '"attr_nouns": ["gold clock", "red train"]}',
        '{"task_type": "color", "prompt": "A room with white walls.", "nouns": ["room", "wall"], '
        '"attr_nouns": ["white wall"]}',
        '{"prompt": "a photo of a bottle and a teddy bear", "nouns": ["bottle", "teddy bear"], "task_type": "object"}',
        '{"task_type": "texture", "prompt": "a wooden desk and a leather shoes", "nouns": ["desk", "shoe"], '
        '"attr_nouns": ["wooden desk", "leather shoe"]}',
        '{"task_type": "non", "prompt": "A child is jumping on a trampoline.", "nouns": ["child", "trampoline"]}',
    ]
    got = [RW.from_t2i_r1(json.loads(line)) for line in lines]
    assert got[0] == {"tag": "position", "include": [{"class": "zebra", "count": 1},
                                                     {"class": "car", "count": 1, "position": ["below", 0]}],
                      "prompt": "a photo of a car below a zebra"}
    assert got[1]["include"][1] == {"class": "bowl", "count": 1, "position": ["left of", 0]}
    assert got[2]["include"] == [{"class": "coaster", "count": 1},
                                 {"class": "mug", "count": 1, "position": ["above", 0]}]
    assert got[3] is None  # "next to" has no GenEval relation
    assert got[4] == {"tag": "counting",
                      "include": [{"class": "plate", "count": 2}, {"class": "microphone", "count": 3}],
                      "exclude": [{"class": "plate", "count": 3}, {"class": "microphone", "count": 4}],
                      "prompt": "two plates and three microphones"}
    assert got[5] == {"tag": "color_attr", "include": [{"class": "duck", "count": 1, "color": "green"},
                                                       {"class": "frog", "count": 1, "color": "yellow"}],
                      "prompt": "a green duck and a yellow frog"}
    assert got[6] is None  # attr_nouns contradict the prompt
    assert got[7] is None  # gold is not a GenEval colour
    assert got[8] == {"tag": "colors", "include": [{"class": "wall", "count": 1, "color": "white"}],
                      "prompt": "A room with white walls."}
    assert got[9]["tag"] == "two_object" and got[9]["include"][1] == {"class": "teddy bear", "count": 1}
    assert got[10] is None and got[11] is None


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


def test_git_questions_follow_t2i_r1():
    rows = [{"task_type": "color", "prompt": "a purple elephant and a blue teddy bear",
             "nouns": ["elephant", "teddy bear"], "attr_nouns": ["purple elephant", "blue teddy bear"]},
            {"task_type": "complex", "prompt": "The rectangular mirror was hung above the marble sink.",
             "nouns": ["mirror", "sink"]},
            {"task_type": "spatial", "prompt": "a car below a zebra", "nouns": ["car", "zebra"],
             "spatial_info": {"obj1": "car", "obj2": "zebra", "locality": "below"}},
            {"task_type": "numeracy", "prompt": "two plates", "nouns": ["plate"],
             "numeracy_info": [{"obj_name": "plate", "num": 2}]},
            {"task_type": "non", "prompt": "A quiet street.", "nouns": []},
            {"task_type": "shape", "prompt": "an oval mirror", "nouns": ["mirror"], "attr_nouns": []},
            {"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]}]
    assert [RW.git_questions(r) for r in rows] == [
        (["purple elephant?", "blue teddy bear?"], None), (["mirror?", "sink?"], None), ([], 0.0), ([], 0.0),
        ([], 1.0), (["mirror?"], None), ([], 0.0)]


def _planted_git(folder, yes_logit, no_logit):
    """A tiny GIT whose output layer ignores the hidden state for 'yes' and 'no': their logits are biases."""
    c = _tiny_git_cfg()
    sd = _random_state(RM.GIT(c), seed=3)
    sd["output.weight"][[5, 6]] = 0.0
    sd["output.bias"][5], sd["output.bias"][6] = yes_logit, no_logit
    return _write_git_folder(folder, c, sd)


def test_git_reward_is_yes_over_yes_plus_no_as_t2i_r1_computes_it_with_transformers(tmp_path):
    # a known answer: p(yes) / (p(yes) + p(no)) = 3 / (3 + 1) when the logits differ by ln 3, whatever the rest
    folder = _planted_git(tmp_path / "planted", math.log(3.0), 0.0)
    rows = [dict(r) for r in T2I_R1_ROWS]
    scores, info = RW.GitVQA({"git": folder}, device="cpu")(_images(len(rows), 40), rows)
    asked = [bool(RW.git_questions(r)[0]) for r in rows]  # spatial and numeracy are not asked
    assert asked == [False, False, True, True, True, True] and info["checked"] == asked
    assert torch.allclose(scores, torch.tensor([0.0, 0.0, 0.75, 0.75, 0.75, 0.75]), atol=1e-6)
    assert info["questions"][2] == ["wooden desk?", "leather shoe?"] and len(info["yes"][2]) == 2
    # against T2I-R1's own procedure, one question at a time on transformers' GitForCausalLM: [CLS] + question,
    # softmax over the vocabulary at the last position, p(yes) / (p(yes) + p(no)), mean over the questions
    transformers = reference_transformers()
    folder = _write_git_folder(tmp_path / "random", _tiny_git_cfg(), seed=7)
    ref = transformers.GitForCausalLM.from_pretrained(folder).eval()
    reward = RW.GitVQA({"git": folder}, device="cpu")
    images = _images(len(rows), 40)
    scores, info = reward(images, rows)
    tok = RM.WordPieceTokenizer(folder)
    for i, r in enumerate(rows):
        qs = RW.git_questions(r)[0]
        if not qs:
            continue
        px = RM.clip_preprocess(images[i:i + 1], 32)
        ps = []
        for q in qs:
            with torch.no_grad():
                p = ref(input_ids=torch.tensor([[2] + tok.encode(q)]), pixel_values=px).logits[0, -1].softmax(-1)
            ps.append((p[5] / (p[5] + p[6])).item())
        err = abs(scores[i].item() - sum(ps) / len(ps))
        print(f"\ngit score vs T2I-R1's procedure on GitForCausalLM ({r['prompt']!r}): abs err {err:.2e}")
        assert err <= 1e-5, r["prompt"]
    # bf16 (the GPU precision policy) stays close
    bf16 = RW.GitVQA({"git": folder}, device="cpu", dtype=torch.bfloat16)(images, rows)[0]
    assert (bf16 - scores).abs().max() < 0.05


def test_t2i_r1_position_rule_on_hand_boxes():
    left, right = (0.0, 0.4, 0.2, 0.6), (0.8, 0.4, 1.0, 0.6)  # same height, far apart
    top, bottom = (0.4, 0.0, 0.6, 0.2), (0.4, 0.8, 0.6, 1.0)
    pos = RW.t2i_r1_position
    assert pos("left of", left, right) == 1 and pos("on the left of", left, right) == 1
    assert pos("right of", left, right) == 0 and pos("right of", right, left) == 1
    assert pos("below", bottom, top) == 1 and pos("on the bottom of", top, bottom) == 0
    assert pos("on the top of", top, bottom) == 1 and pos("top of", bottom, top) == 0
    # "above" and "on top of" have no branch in T2I-R1's code: 0 as released, the "on the top of" rule here
    for rel in ("above", "on top of"):
        assert pos(rel, top, bottom) == 1 and pos(rel, top, bottom, as_released=True) == 0
        assert pos(rel, bottom, top) == 0
    # the other axis dominates: no credit
    assert pos("left of", (0.0, 0.0, 0.2, 0.2), (0.1, 0.8, 0.3, 1.0)) == 0
    # overlapping boxes: 0.1 / IoU; here IoU = (0.1 * 0.2) / (2 * 0.04 - 0.02) = 1/3
    assert pos("left of", (0.0, 0.4, 0.2, 0.6), (0.1, 0.4, 0.3, 0.6)) == pytest.approx(0.3)
    # near: 1 when either offset is under 150/512 of the side, else that threshold over the larger offset;
    # T2I-R1 compares normalised boxes with 150 (pixels), so every pair is near as released
    assert pos("next to", left, right) == 1  # same row: dy = 0
    far = (0.8, 0.8, 1.0, 1.0)
    assert pos("near", (0.0, 0.0, 0.2, 0.2), far) == pytest.approx((150 / 512) / 0.8)
    assert pos("on side of", (0.0, 0.0, 0.2, 0.2), far, as_released=True) == 1
    assert pos("inside", left, right) == 0


def test_t2i_r1_detect_rules_on_hand_boxes():
    box = lambda x0, y0=0.4: (x0, y0, x0 + 0.2, y0 + 0.2)
    det = lambda cls, b, s=0.5: {"class": cls, "box": b, "score": s}
    score = lambda dets, row, **kw: RW.t2i_r1_detect_score(dets, row, **kw)[0]
    obj = {"task_type": "object", "prompt": "a bottle and a teddy bear", "nouns": ["bottle", "teddy bear"]}
    assert score([det("bottle", box(0))], obj) == 0.5 and score([], obj) == 0
    assert score([det("bottle", box(0)), det("teddy bear", box(0.5))], obj) == 1
    num = {"task_type": "numeracy", "prompt": "two plates and three cups", "nouns": ["plate", "cup"],
           "numeracy_info": [{"obj_name": "plate", "num": 2}, {"obj_name": "cup", "num": 3}]}
    plates = [det("plate", box(0)), det("plate", box(0.5))]
    assert score(plates, num) == 0.5  # plates exact (1), cups absent (0)
    assert score(plates + [det("cup", box(0.1, 0))], num) == pytest.approx(0.6)  # cups present, wrong count: 0.2
    assert score(plates + [det("cup", box(x, 0)) for x in (0, 0.3, 0.6)], num) == 1
    assert score(plates[:1], num) == pytest.approx(0.1)
    sp = {"task_type": "spatial", "prompt": "a car left of a zebra", "nouns": ["car", "zebra"],
          "spatial_info": {"obj1": "car", "obj2": "zebra", "locality": "left of"}}
    assert score([], sp) == 0 and score([det("car", box(0))], sp) == pytest.approx(0.2)
    assert score([det("car", box(0)), det("zebra", box(0.7))], sp) == pytest.approx(0.9)  # 0.4 + 1 / 2
    assert score([det("car", box(0.7)), det("zebra", box(0))], sp) == pytest.approx(0.4)
    # the most confident box of each object decides the position
    dets = [det("car", box(0.7), 0.9), det("car", box(0), 0.2), det("zebra", box(0.4))]
    assert score(dets, sp) == pytest.approx(0.4)
    above = {**sp, "spatial_info": {"obj1": "car", "obj2": "zebra", "locality": "above"}}
    stacked = [det("car", box(0.4, 0)), det("zebra", box(0.4, 0.7))]
    assert score(stacked, above) == pytest.approx(0.9)
    assert score(stacked, above, as_released=True) == pytest.approx(0.4)
    # one object named twice: the two most confident boxes of it; T2I-R1's code fails there and scores 0
    twice = {**sp, "nouns": ["car", "car"], "spatial_info": {"obj1": "car", "obj2": "car", "locality": "left of"}}
    pair = [det("car", box(0), 0.9), det("car", box(0.7), 0.8)]
    assert score(pair, twice) == pytest.approx(0.9) and score(pair, twice, as_released=True) == 0
    # a complex row with spatial_info is scored by object presence, as T2I-R1 does; no nouns: 1
    cx = {**sp, "task_type": "complex"}
    assert score([det("car", box(0.7)), det("zebra", box(0))], cx) == 1
    assert score([], {"task_type": "non", "prompt": "A quiet street.", "nouns": []}) == 1


def test_t2i_r1_detect_as_released_keeps_its_nms_on_centre_size_boxes_and_its_phrase_match():
    # reward_gdino.py hands GroundingDINO's (cx, cy, w, h) boxes to torchvision's nms, which reads them as
    # corners: two copies of one small cup survive it (they count as two cups), a large box near the top-left
    # corner still suppresses its copy
    cups = torch.tensor([[0.6, 0.6, 0.8, 0.8], [0.61, 0.6, 0.81, 0.8]])  # (x0, y0, x1, y1), IoU 0.9
    big = torch.tensor([[0.0, 0.0, 0.9, 0.9], [0.0, 0.0, 0.88, 0.9]])
    scores = torch.tensor([0.9, 0.8])
    assert RW.t2i_r1_nms(cups, scores, 0.5).tolist() == [0]
    assert RW.t2i_r1_nms(cups, scores, 0.5, as_released=True).tolist() == [0, 1]
    assert RW.t2i_r1_nms(big, scores, 0.5, as_released=True).tolist() == [0]
    # its detection phrase for a noun is the noun's first and last word, so a noun of three or more words
    # ("roll of paper towel", four rows of the file) is never matched as released
    row = {"task_type": "shape", "prompt": "a tissue box and a roll of paper towel",
           "nouns": ["tissue box", "roll of paper towel"]}
    dets = [{"class": n, "box": (0.1, 0.1, 0.3, 0.3), "score": 0.5} for n in row["nouns"]]
    assert RW.t2i_r1_detect_score(dets, row)[0] == 1
    assert RW.t2i_r1_detect_score(dets, row, as_released=True)[0] == 0.5


def test_t2i_r1_detect_reward_counts_duplicate_boxes_as_released(tmp_path):
    # two bright patches whose boxes the planted box head puts on one spot, a third of the side wide, at the
    # bottom-right corner: one cup after NMS on boxes, two after NMS on (cx, cy, w, h) read as corners
    _planted_owlvit(tmp_path / "owl", box_logits=[10.0, 10.0, 0.0, 0.0])
    img = np.zeros((1, 96, 96, 3), np.uint8)
    img[0, 32:64, 32:96] = 255
    rows = [{"task_type": "numeracy", "prompt": "one cup", "nouns": ["cup"],
             "numeracy_info": [{"obj_name": "cup", "num": 1}]}]
    for as_released, want in ((False, 1.0), (True, 0.2)):
        cfg = RW.T2IR1DetectConfig(as_released=as_released)
        scores, info = RW.T2IR1Detect({"geneval": str(tmp_path / "owl")}, device="cpu", config=cfg)(img, rows)
        assert scores.tolist() == pytest.approx([want]), info["reasons"]


def test_t2i_r1_detect_reward_scores_a_row_without_nouns_with_t2i_r1s_constant(tmp_path):
    _planted_owlvit(tmp_path / "owl")
    reward = RW.T2IR1Detect({"geneval": str(tmp_path / "owl")}, device="cpu")
    rows = [{"task_type": "non", "prompt": "A quiet street.", "nouns": []}, {"prompt": "a cat"}]
    scores, info = reward(np.zeros((2, 96, 96, 3), np.uint8), rows)
    assert scores.tolist() == [1.0, 0.0] and info["checked"] == [False, False]
    assert info["reasons"][0].startswith("no nouns") and info["reasons"][1] == "no T2I-R1 fields"


def test_t2i_r1_detect_reward_on_planted_owlvit(tmp_path):
    # the planted detector finds every queried object on the bright patch (row 1, column 2), none elsewhere
    _planted_owlvit(tmp_path / "owl")
    reward = RW.T2IR1Detect({"geneval": str(tmp_path / "owl")}, device="cpu")
    img = np.zeros((2, 96, 96, 3), np.uint8)
    img[0, 32:64, 64:96] = 255
    rows = [{"task_type": "numeracy", "prompt": "one cup", "nouns": ["cup"],
             "numeracy_info": [{"obj_name": "cup", "num": 1}]},
            {"task_type": "numeracy", "prompt": "two cups", "nouns": ["cup"],
             "numeracy_info": [{"obj_name": "cup", "num": 2}]}]
    scores, info = reward(np.stack([img[0], img[0], img[1]]), rows + [rows[0]])
    assert scores.tolist() == pytest.approx([1.0, 0.2, 0.0])
    d = info["detections"][0]
    assert len(d) == 1 and d[0]["class"] == "cup" and np.allclose(d[0]["box"], (2 / 3, 1 / 3, 1, 2 / 3), atol=1e-3)
    rows = [dict(r) for r in T2I_R1_ROWS]
    scores, info = reward(np.repeat(img[:1], len(rows), 0), rows)
    # spatial: both found on the same box, so no position credit; objects all found; every row checked
    assert scores.tolist() == pytest.approx([0.4, 0.2, 1.0, 1.0, 1.0, 1.0]) and all(info["checked"])
    # the preset, and how many prompts each reward scores
    assert RW.parse_rewards("t2i-r1") == {"hps": 1.0, "t2i-r1-detect": 1.0, "git": 1.0}
    assert RW.parse_rewards("t2i-r1,aesthetic:0.5")["aesthetic"] == 0.5
    with pytest.raises(ValueError, match="the preset 't2i-r1' takes no weight"):
        RW.parse_rewards("t2i-r1:2")
    ens = RW.RewardEnsemble({"t2i-r1-detect": 1, "git": 1}, {"geneval": str(tmp_path / "owl"),
                                                             "git": _planted_git(tmp_path / "git", 0.0, 0.0)})
    bare = [{"prompt": "a cat"}, {"task_type": "non", "prompt": "A quiet street.", "nouns": []}]
    report = ens.unchecked_report(rows + bare, "training prompts")
    assert report == [
        "t2i-r1-detect: scores 6 of the 8 training prompts; the other 2 (T2I-R1 task types: non 1) get T2I-R1's "
        "constant (0 without its fields), the same for every sample, so the other rewards alone set their "
        "advantages (and its logged means leave them out)",
        "git: scores 4 of the 8 training prompts; the other 4 (T2I-R1 task types: non 1, numeracy 1, spatial 1) get "
        "T2I-R1's constant (0 without its fields), the same for every sample, so the other rewards alone set their "
        "advantages (and its logged means leave them out)"]
    assert RW.RewardEnsemble({"t2i-r1-detect": 1}, {"geneval": str(tmp_path / "owl")}).unchecked_report(rows) == []
    with pytest.raises(ValueError, match=r"t2i-r1-detect: prompt 1 .*'numeracy_info' must be"):
        ens.check_metadata([rows[0], {**rows[1], "numeracy_info": [{"obj_name": "cup", "num": "two"}]}])


# ---- shapes.py: the world, its detector and reward, the tiny base, the ablation report -----------------------------


def _relations(a, b):
    """GenEval's position arithmetic for box a relative to box b -> ({relations}, dx, dy). Test-only: the rule
    engine proper lives in rewards.py."""
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    dims = np.array([a[2] - a[0] + b[2] - b[0], a[3] - a[1] + b[3] - b[1]], dtype=float)
    offset = ca - cb
    shrunk = np.maximum(np.abs(offset) - 0.1 * dims, 0) * np.sign(offset)
    dx, dy = shrunk / np.linalg.norm(offset)
    tests = (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5), ("below", dy > 0.5))
    rel = {r for r, hit in tests if hit}
    return rel, dx, dy


def _strict_pass(dets, meta):
    """GenEval's strict rule on a list of detections (test-only checker)."""
    chosen = []
    for clause in meta["include"]:
        found = [d for d in dets if d["class"] == clause["class"]][:clause["count"]]
        if len(found) < clause["count"]:
            return False
        if "color" in clause and any(d["color"] != clause["color"] for d in found):
            return False
        if "position" in clause:
            relation, j = clause["position"]
            if not any(relation in _relations(d["box"], t["box"])[0] for d in found for t in chosen[j]):
                return False
        chosen.append(found)
    return all(sum(d["class"] == c["class"] for d in dets) < c["count"] for c in meta.get("exclude", []))


def _same_objects(scene, dets):
    return sorted((o.shape, o.color, tuple(o.box)) for o in scene.objects) == \
        sorted((d["class"], d["color"], d["box"]) for d in dets)


def _iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _found_all(scene, dets, min_iou=0.5):
    """Every object found once with its class and colour, box IoU >= min_iou, and nothing else."""
    left = list(dets)
    for o in scene.objects:
        match = next((d for d in left if d["class"] == o.shape and d["color"] == o.color
                      and _iou(d["box"], o.box) >= min_iou), None)
        if match is None:
            return False
        left.remove(match)
    return not left


def test_shapes_masks_touch_every_side_of_their_box():
    for w, h in [(s, s) for s in range(4, 50)] + [(12, 20), (31, 9)]:
        for shape in S.SHAPES:
            m = S.shape_mask(shape, w, h)
            assert m.shape == (h, w) and m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any(), (shape, w, h)
    # the shapes are what their names say: a square fills its box, a circle pi/4 of it, a triangle half
    for shape, fill in (("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)):
        assert S.shape_mask(shape, 200).mean() == pytest.approx(fill, abs=0.01), shape
    tri = S.shape_mask("triangle", 200)
    assert tri[0].sum() <= 2 and tri[-1].all()  # apex up, base down


def test_shapes_detector_recovers_clean_renders_exactly():
    for size in (64, 32, 96):
        metas = S.all_prompts() if size == 64 else S.all_prompts()[::7]
        scenes = [S.sample_scene(m, seed, size=size) for seed in range(2) for m in metas]
        images = np.stack([S.render(s) for s in scenes])
        for scene, dets in zip(scenes, S.detect_batch(images)):
            assert _same_objects(scene, dets), (scene, dets)
            assert all(0 < d["score"] <= 1 and d["score"] > 0.5 for d in dets)


def test_shapes_scenes_and_images_are_deterministic():
    meta = S.color_attr("red", "circle", "blue", "square")
    a, b = S.sample_scene(meta, 7), S.sample_scene(meta, np.random.default_rng(7))
    assert a == b and np.array_equal(S.render(a), S.render(b)) and S.plan_of(a) == S.plan_of(b)
    others = {S.plan_of(S.sample_scene(meta, seed)) for seed in range(20)}
    assert len(others) > 5  # many scenes, so many plans, satisfy one prompt


def test_shapes_scenes_satisfy_their_metadata():
    for seed in range(3):
        for meta in S.all_prompts():
            scene = S.sample_scene(meta, seed)
            objs = scene.objects
            assert len(objs) == sum(c["count"] for c in meta["include"])  # exactly the prompt's objects
            assert _strict_pass(scene.detections(), meta), (meta, scene)
            cell = scene.size // S.CELLS
            gap = S.GAP_CELLS * cell
            for i, a in enumerate(objs):  # on the grid, no overlap, with a gap
                assert 0 <= a.box[0] < a.box[2] <= scene.size and 0 <= a.box[1] < a.box[3] <= scene.size
                assert all(v % cell == 0 for v in a.box) and a.box[2] - a.box[0] == a.box[3] - a.box[1]
                assert (a.box[2] - a.box[0]) // cell in S.OBJECT_CELLS
                for b in objs[i + 1:]:
                    assert (a.box[0] >= b.box[2] + gap or b.box[0] >= a.box[2] + gap
                            or a.box[1] >= b.box[3] + gap or b.box[1] >= a.box[3] + gap)
            if meta["tag"] == "position":  # the asked relation with margin, and no other
                relation, _ = meta["include"][1]["position"]
                rel, dx, dy = _relations(objs[1].box, objs[0].box)
                assert rel == {relation}
                assert max(abs(dx), abs(dy)) >= 0.7
            if meta["tag"] == "counting":  # one more would fail, one fewer too
                assert not _strict_pass(scene.detections()[1:], meta)
                assert not _strict_pass(scene.detections() + scene.detections()[:1], meta)
    # the checker is not vacuous: the opposite relation fails on the same scene
    scene = S.sample_scene(S.position("circle", "left of", "square"), 0)
    assert not _strict_pass(scene.detections(), S.position("circle", "right of", "square"))


def test_shapes_prompts_follow_geneval_layout():
    assert S.position("dog", "right of", "teddy bear") == {
        "tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                       {"class": "dog", "count": 1, "position": ["right of", 0]}],
        "prompt": "a photo of a dog right of a teddy bear"}
    assert S.counting("circle", 3) == {"tag": "counting", "include": [{"class": "circle", "count": 3}],
                                       "exclude": [{"class": "circle", "count": 4}],
                                       "prompt": "a photo of three circles"}
    assert S.colors("orange", "square")["prompt"] == "a photo of an orange square"
    assert S.color_attr("red", "circle", "blue", "square")["prompt"] == "a photo of a red circle and a blue square"
    assert {m["tag"] for m in S.all_prompts()} == set(S.TAGS)


def test_shapes_split_holds_out_what_it_claims(tmp_path):
    train, val, test = S.prompt_sets()
    everything = S.all_prompts()
    assert len({m["prompt"] for m in everything}) == len(everything)
    # train + val is exactly the prompts without a held-out combination; val is carved from them
    trainable = [m for m in everything if not S.is_held_out(m)]
    assert sorted(train + val, key=everything.index) == trainable
    seen = {m["prompt"] for m in train}
    assert not seen & {m["prompt"] for m in val} and not seen & {m["prompt"] for m in test if S.is_held_out(m)}
    assert not {m["prompt"] for m in val} & {m["prompt"] for m in test}
    assert {m["tag"] for m in val} == {"colors", "position", "color_attr", "reasoning"}
    train_text = " | ".join(m["prompt"] for m in train + val)
    for color, shape in S.HELD_OUT_PAIRS:
        assert f"{color} {shape}" not in train_text
        assert any(f"{color} {shape}" in m["prompt"] for m in test)
    for a, relation, b in S.HELD_OUT_LAYOUTS:
        assert S.position(a, relation, b) not in train + val and S.position(a, relation, b) in test
    for shape, n in S.HELD_OUT_COUNTS:
        assert S.counting(shape, n) not in train + val and S.counting(shape, n) in test
    # every colour and every shape is still seen in training, just not in the held-out pairs
    assert {c["color"] for m in train if m["tag"] == "colors" for c in m["include"]} == set(S.COLORS)
    assert {c["class"] for m in train if m["tag"] == "colors" for c in m["include"]} == set(S.SHAPES)
    # the tags that can hold out are wholly novel in test; every tag is tested
    assert all(S.is_held_out(m) for m in test if m["tag"] in ("colors", "position", "color_attr"))
    assert {m["tag"] for m in test} == set(S.TAGS) == set(S.GENEVAL_TAGS) | {"reasoning"}
    # reasoning: a riddle whose answer is a held-out pair or count is never trained on, though each thing
    # ("the sky") and each riddle form is
    riddles = [m for m in test if m["tag"] == "reasoning" and m["riddle"] != "shape"]
    assert len(riddles) == 13 and all(S.is_held_out(m) for m in riddles)
    assert "a photo of a triangle the color of the sky" in {m["prompt"] for m in riddles}
    for thing in S.THINGS.values():
        assert any(f"the color of {thing}" in p for p in seen), thing
    assert {m["riddle"] for m in train if m["tag"] == "reasoning"} == {"shape", "color", "shape+color", "count"}
    # random colours avoid the held-out pairs when asked to
    for seed, meta in enumerate(train):
        for o in S.sample_scene(meta, seed, avoid=S.HELD_OUT_PAIRS).objects:
            assert (o.color, o.shape) not in S.HELD_OUT_PAIRS
    # written files round-trip and are deterministic
    paths = S.write_prompt_sets(tmp_path / "a")
    again = S.write_prompt_sets(tmp_path / "b")
    assert [os.path.basename(p) for p in paths] == ["train.jsonl", "val.jsonl", "test.jsonl"]
    for p, q, metas in zip(paths, again, (train, val, test)):
        assert open(p).read() == open(q).read()
        assert [json.loads(line) for line in open(p)] == metas


def test_shapes_reasoning_prompts_resolve_to_what_they_describe():
    by_prompt = {m["prompt"]: m for m in S.all_prompts() if m["tag"] == "reasoning"}
    assert len(by_prompt) == 45
    # written out by hand: what a reader resolves each riddle to
    expect = {
        "a photo of the shape with three corners": [{"class": "triangle", "count": 1}],
        "a photo of the shape with four corners": [{"class": "square", "count": 1}],
        "a photo of the shape with no corners": [{"class": "circle", "count": 1}],
        "a photo of a circle the color of the sky": [{"class": "circle", "count": 1, "color": "blue"}],
        "a photo of a square the color of grass": [{"class": "square", "count": 1, "color": "green"}],
        "a photo of a triangle the color of a lemon": [{"class": "triangle", "count": 1, "color": "yellow"}],
        "a photo of a circle the color of a cherry": [{"class": "circle", "count": 1, "color": "red"}],
        "a photo of a square the color of a pumpkin": [{"class": "square", "count": 1, "color": "orange"}],
        "a photo of a triangle the color of a plum": [{"class": "triangle", "count": 1, "color": "purple"}],
        "a photo of the shape with three corners, the color of the sky":
            [{"class": "triangle", "count": 1, "color": "blue"}],
        "a photo of the shape with no corners, the color of grass": [{"class": "circle", "count": 1, "color": "green"}],
        "a photo of as many circles as a triangle has corners": [{"class": "circle", "count": 3}],
        "a photo of as many squares as a square has corners": [{"class": "square", "count": 4}],
    }
    for prompt, include in expect.items():
        assert by_prompt[prompt]["include"] == include, prompt
    assert by_prompt["a photo of as many circles as a triangle has corners"]["exclude"] == [{"class": "circle", "count": 4}]
    # the resolved metadata is checked by the same rules as GenEval's: a true scene passes, a literal misreading fails
    meta = by_prompt["a photo of a circle the color of the sky"]
    assert _strict_pass(S.sample_scene(meta, 0).detections(), meta)
    wrong = S.Scene([S.Obj("circle", "green", (8, 8, 24, 24))])
    assert not _strict_pass(wrong.detections(), meta)
    meta = by_prompt["a photo of as many circles as a triangle has corners"]
    scene = S.sample_scene(meta, 0)
    assert len(scene.objects) == 3 and _strict_pass(scene.detections(), meta)
    assert not _strict_pass(scene.detections() + scene.detections()[:1], meta)


def test_shapes_detector_names_only_what_a_person_would():
    def draw(mask_fn, color="red"):
        img = np.full((64, 64, 3), S.BACKGROUND, np.uint8)
        m = np.zeros((64, 64), bool)
        mask_fn(m)
        img[m] = S.COLORS[color]
        return img
    yy, xx = np.mgrid[:64, :64] + 0.5
    def circle(m, cx=24, cy=24, r=12):
        m |= (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    def blob(m):  # a lumpy, star-ish outline: neither round nor square
        ang, rad = np.arctan2(yy - 32, xx - 32), np.hypot(xx - 32, yy - 32)
        m |= rad <= 12 * (1 + 0.3 * np.sin(5 * ang))
    def rounded_square(m):  # half-way between a circle and a square
        m |= (np.abs(xx - 32) / 12) ** 3.2 + (np.abs(yy - 32) / 12) ** 3.2 <= 1
    def two_touching(m):  # two squares merged into one long box
        m[16:32, 8:24] = True
        m[16:32, 24:40] = True
    def dented_square(m):  # a square with a bite out of a corner
        m[16:40, 16:40] = True
        m[16:28, 28:40] = False
    assert [d["class"] for d in S.detect(draw(circle))] == ["circle"]
    for name, fn in (("blob", blob), ("rounded square", rounded_square), ("merged", two_touching),
                     ("dented", dented_square)):
        assert S.detect(draw(fn)) == [], name
    # colour bleeding: a square half red, half purple is neither
    img = draw(lambda m: m.__setitem__((slice(16, 40), slice(16, 40)), True))
    img[16:40, 28:40] = S.COLORS["purple"]
    assert S.detect(img) == []
    img[16:40, 16:40] = S.COLORS["purple"]
    assert [(d["class"], d["color"]) for d in S.detect(img)] == [("square", "purple")]


def test_shapes_plans_describe_the_scene_and_parse_back():
    from tokenizers import pre_tokenizers
    vocab = set(S.vocabulary())
    splitter = pre_tokenizers.Whitespace()
    for seed, meta in enumerate(S.all_prompts()):
        scene = S.sample_scene(meta, seed)
        plan = S.plan_of(scene)
        parsed = S.parse_plan(plan)
        expect = {(o.color, o.shape, S.place_of(o.box, scene.size)) for o in scene.objects}
        assert len(parsed) == len(scene.objects) and set(parsed) == expect
        text = f"{meta['prompt']}. {plan}"
        assert set(S.split_words(text)) <= vocab, text
        assert [w for w, _ in splitter.pre_tokenize_str(text)] == S.split_words(text)  # same word rule
    assert S.place_of((0, 0, 10, 10), 64) == "top left" and S.place_of((27, 27, 37, 37), 64) == "center"
    assert S.place_of((50, 27, 60, 37), 64) == "right" and S.place_of((27, 54, 37, 64), 64) == "bottom"
    # reading order: top row first, then left to right
    scene = S.Scene([S.Obj("square", "blue", (40, 40, 60, 60)), S.Obj("circle", "red", (2, 2, 14, 14))], 64)
    assert S.plan_of(scene) == "red circle top left, blue square bottom right"
    # junk is skipped, plurals and missing places tolerated
    assert S.parse_plan("um red circle top left and ,, blah BLUE squares , green triangle zzz right top") == [
        ("red", "circle", "top left"), ("blue", "square", None), ("green", "triangle", "top right")]
    assert S.parse_plan("") == [] and S.parse_plan("red blue circle center") == [("blue", "circle", "center")]


def _blur(img, sigma):
    r = int(3 * sigma)
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    f = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(f, pad, mode="edge")
        f = sum(w * np.take(p, range(i, i + img.shape[axis]), axis=axis) for i, w in enumerate(k))
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def _jpeg(img, quality):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.array(Image.open(buf).convert("RGB"))


def _down_up(img, factor):
    s = img.shape[0]
    small = Image.fromarray(img).resize((s // factor, s // factor), Image.BILINEAR)
    return np.array(small.resize((s, s), Image.BILINEAR))


def test_shapes_detector_survives_degraded_renders():
    rng = np.random.default_rng(0)
    scenes = [S.sample_scene(m, 100 + i) for i, m in enumerate(S.all_prompts()[::2])]
    clean = [S.render(s) for s in scenes]
    degradations = {
        "blur": lambda x: _blur(x, 1.0),
        "noise": lambda x: np.clip(x + rng.normal(0, 15, x.shape), 0, 255).astype(np.uint8),
        "colour shift": lambda x: np.clip(x.astype(int) + rng.integers(-20, 21, 3), 0, 255).astype(np.uint8),
        "desaturate": lambda x: (0.5 * x + 0.5 * x.mean(-1, keepdims=True)).astype(np.uint8),
        "jpeg": lambda x: _jpeg(x, 50),
        "down-up": lambda x: _down_up(x, 2),
        "all at once": lambda x: _jpeg(np.clip(_blur(x, 0.8) + rng.normal(0, 8, x.shape) + rng.integers(-15, 16, 3),
                                               0, 255).astype(np.uint8), 75),
    }
    for name, degrade in degradations.items():
        dets = S.detect_batch(np.stack([degrade(x) for x in clean]))
        ok = np.mean([_found_all(s, d) for s, d in zip(scenes, dets)])
        assert ok >= 0.98, (name, ok)
    # speckle (isolated coloured pixels) is not an object
    speckled = clean[0].copy()
    speckled[rng.integers(0, 64, 40), rng.integers(0, 64, 40)] = S.COLORS["red"]
    assert _found_all(scenes[0], S.detect(speckled))


def test_shapes_detect_batch_api():
    import torch
    scenes = [S.sample_scene(m, i) for i, m in enumerate(S.all_prompts()[:6])]
    images = np.stack([S.render(s) for s in scenes])  # (B, H, W, 3) uint8
    batch = S.detect_batch(torch.from_numpy(images))
    assert batch == [S.detect(x) for x in images] == S.detect_batch(images)
    assert all(set(d) == {"class", "color", "box", "score"} for dets in batch for d in dets)
    assert all([d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True) for dets in batch)
    assert S.detect(np.full((64, 64, 3), 240, np.uint8)) == []
    assert S.detect_batch(np.zeros((0, 64, 64, 3), np.uint8)) == []
    with pytest.raises(AssertionError):
        S.detect(images[0].astype(np.float32))


def test_shapes_reward_found_without_importing_shapes():
    """--rewards shapes works in a process that imported rewards alone: the registry names the module."""
    import subprocess
    import sys
    code = ("import sys, rewards; assert 'shapes' not in sys.modules; print(rewards.parse_rewards('shapes'), "
            "rewards.reward_class('shapes').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["{'shapes':", "1.0}", "ShapesReward"]


def test_shapes_reward_uses_shapes_detect(monkeypatch):
    calls = []

    def detect(image):
        calls.append(image.shape)
        return [_det("circle", (0, 0, 4, 4), 1.0, "red"), _det("square", (10, 0, 14, 4), 1.0, "blue")]

    monkeypatch.setattr(S, "detect", detect)
    assert RW.reward_class("shapes") is S.ShapesReward
    reward = RW.RewardEnsemble({"shapes": 1.0}, {}).rewards["shapes"]
    meta = [{"tag": "position", "include": [{"class": "square", "count": 1},
                                            {"class": "circle", "count": 1, "color": "red",
                                             "position": ["left of", 0]}], "prompt": "a red circle left of a square"},
            {"tag": "counting", "include": [{"class": "circle", "count": 2}], "prompt": "two circles"}]
    scores, info = reward(np.zeros((2, 16, 16, 3), np.uint8), meta)
    assert calls == [(16, 16, 3)] * 2
    assert scores.tolist() == [1.0, 0.5] and info["strict"] == [True, False]
    # a plain prompt has no clauses and would pass every rule (a silent 1.0): the reward abstains on it
    # (score 0, not checked, not even detected), and refuses a set of prompts none of which it can check
    scores, info = reward(np.zeros((2, 16, 16, 3), np.uint8), [meta[0], {"prompt": "a red circle"}])
    assert scores.tolist() == [1.0, 0.0] and info["checked"] == [True, False] and info["strict"] == [True, None]
    assert len(calls) == 3
    with pytest.raises(ValueError, match="shapes: none of the 1 prompt.*'a red circle'"):
        reward.check_metadata([{"prompt": "a red circle"}])
    # a direct call checks each clause too: a position naming a missing clause is named, not an IndexError
    bad = {"prompt": "a red circle", "include": [{"class": "circle", "count": 1, "position": ["left of", 3]}]}
    with pytest.raises(ValueError, match=r"shapes: prompt 1 .*include\[0\]: 'position' must be"):
        reward(np.zeros((2, 16, 16, 3), np.uint8), [meta[0], bad])


def test_tiny_pretraining_lowers_its_losses_and_reloads(tmp_path):
    c = S.PretrainConfig(scenes=200, vq_steps=40, vq_batch=8, n_layer=2, n_embd=64, n_head=2, lm_steps=60,
                         lm_batch=16, lm_lr=3e-3)
    losses = S.pretrain(str(tmp_path / "base"), c, log=lambda *a, **k: None)
    for k in ("vq", "vq_code", "text", "image"):
        assert np.mean(losses[k][-8:]) < 0.8 * np.mean(losses[k][:8]), (k, losses[k][:8], losses[k][-8:])
    folder = tmp_path / "base"
    assert {"config.json", "model.safetensors", "tokenizer.json", "reasoning_prompt.txt"} <= set(os.listdir(folder))
    assert not (tmp_path / "base.tmp").exists()
    janus, tok = C.from_pretrained(str(folder)), M.Tokenizer.from_pretrained(str(folder))
    assert janus.cfg.vq.image_size == 64 and janus.cfg.image_tokens == 64 and janus.cfg.vq.codebook_size == 128
    reasoning = R.load_reasoning_prompt(ckpt=str(folder))
    assert reasoning == S.REASONING_TEMPLATE
    assert R.default_chat_format(str(folder)) == "janus"  # it was pretrained on its own request, janus format
    records, images = SA.generate(janus, tok, [S.colors("red", "circle")], settings(max_plan_tokens=12), n=2,
                                  reasoning_template=reasoning, show_progress=False)
    assert images.shape == (2, 64, 64, 3) and images.dtype == torch.uint8 and len(records) == 2
    # the diagnostics run on it: true scenes pass by construction, everything else is a fraction
    rows = S.diagnose(str(folder), [S.colors("red", "circle"), S.riddle("count", "square", count=3)], n=2,
                      log=lambda *a, **k: None)
    assert rows["true scenes"]["per_tag"] == {"colors": 1.0, "reasoning": 1.0}
    assert set(rows) == {"true scenes", "VQ ceiling", "drawn from true plans", "own plans, as text",
                         "drawn from own plans", "drawn from the prompt alone", "plan-following, true plans",
                         "plan-following, own plans"}
    assert all(0 <= a <= 1 for r in rows.values() for a in r["per_tag"].values())


def test_shipped_base_is_the_pretrain_recipe_in_published_layout():
    """The base in assets/ is what `python shapes.py pretrain` makes with its defaults (its recorded recipe is
    PretrainConfig()), within the 10 MB budget, in Janus-Pro's layout, and it plans and draws."""
    from dataclasses import asdict
    folder = S.BASE_DIR
    record = json.load(open(os.path.join(folder, "pretrain.json")))
    assert record["config"] == asdict(S.PretrainConfig())
    assert record["vq_encode_accuracy"] == 1.0
    assert sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) < 10 * 2**20
    janus, tok = C.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    assert janus.cfg.n_layer == S.PretrainConfig().n_layer and janus.cfg.n_embd == S.PretrainConfig().n_embd
    assert R.default_chat_format(folder) == "janus"
    assert S.ensure_base() == folder  # train.py and sample.py use it without pretraining
    meta = S.colors("red", "circle")
    records, images = SA.generate(janus, tok, [meta], settings(max_plan_tokens=24, cfg_weight=2.0), n=4,
                                  reasoning_template=R.load_reasoning_prompt(ckpt=folder), show_progress=False, seed=0)
    assert all("red circle" in r["plan"] for r in records), [r["plan"] for r in records]
    dets = S.detect_batch(images)
    assert sum(any(d["class"] == "circle" and d["color"] == "red" for d in ds) for ds in dets) >= 2, dets


def test_shapes_tokens_are_cells_and_lossless():
    contents = S.cell_contents()
    assert contents.shape[1:] == (8, 8, 3) and (contents[0] == S.BACKGROUND).all()
    assert len({c.tobytes() for c in contents}) == len(contents) <= S.PretrainConfig().codebook_size
    scenes = [S.sample_scene(m, i) for i, m in enumerate(S.all_prompts()[::5])]
    images = np.stack([S.render(s) for s in scenes])
    codes = S.tokenize(images, contents)
    assert codes.shape == (len(images), 64)
    # putting each code's cell back in place rebuilds every render exactly
    rebuilt = contents[codes].reshape(len(images), 8, 8, 8, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(images.shape)
    assert np.array_equal(rebuilt, images)
    # one content, one code: the same object drawn elsewhere has the same codes
    a = S.Scene([S.Obj("circle", "red", (0, 0, 16, 16))])
    b = S.Scene([S.Obj("circle", "red", (40, 24, 56, 40)), S.Obj("square", "blue", (0, 0, 24, 24))])
    ca, cb = S.tokenize(np.stack([S.render(a), S.render(b)]), contents)
    assert sorted(ca[ca > 0]) == sorted(cb[[3 * 8 + 5, 3 * 8 + 6, 4 * 8 + 5, 4 * 8 + 6]])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        S.tokenize(_blur(images[0], 1.0)[None], contents)


def test_shapes_plans_read_as_detections():
    meta = S.position("circle", "left of", "square")
    assert RW.geneval_score(S.plan_detections("red square right , blue circle left"), meta)["strict"]
    assert not RW.geneval_score(S.plan_detections("red square left , blue circle right"), meta)["strict"]
    assert not RW.geneval_score(S.plan_detections("blue circle left"), meta)["strict"]
    meta = S.counting("triangle", 3)
    assert RW.geneval_score(S.plan_detections("red triangle top , red triangle left , red triangle right"), meta)["strict"]
    assert not RW.geneval_score(S.plan_detections("red triangle top , red triangle left"), meta)["strict"]


def test_shapes_plan_following_counts_planned_objects_drawn_as_planned():
    red = S.Obj("circle", "red", (0, 0, 16, 16))            # top left
    blue = S.Obj("square", "blue", (40, 40, 64, 64))        # bottom right
    plan = "red circle top left , blue square bottom right"
    def follows(*objects, plan=plan):
        return S.plan_following(plan, S.detect(S.render(S.Scene(list(objects)))))
    assert follows(red, blue) == 1.0
    assert follows(red, blue, S.Obj("triangle", "green", (40, 0, 56, 16))) == 1.0  # extras are GenEval's business
    assert follows(red) == 0.5                                                      # one object missing
    assert follows(red, S.Obj("square", "green", (40, 40, 64, 64))) == 0.5          # wrong colour
    assert follows(red, S.Obj("circle", "blue", (40, 40, 64, 64))) == 0.5           # wrong shape
    assert follows(red, S.Obj("square", "blue", (0, 40, 24, 64))) == 0.5            # wrong place
    # one drawn object cannot follow two planned ones; an unplaced object takes any place left
    assert follows(red, plan="red circle top left , red circle top left") == 0.5
    assert follows(red, blue, plan="blue square , red circle top left") == 1.0
    assert follows(red, plan="red circle , red circle top left") == 0.5
    assert S.plan_following("nothing to draw", []) is None
    metas = [{"tag": "colors"}, {"tag": "colors"}, {"tag": "position"}, {"tag": "position"}]
    summary = S.following_summary(metas, [plan, plan, plan, "junk"],
                                  [S.detect(S.render(S.Scene([red, blue]))), [], S.detect(S.render(S.Scene([red]))), []])
    assert summary["per_tag"] == {"colors": 0.5, "position": 0.5} and summary["overall"] == 0.5


def _fake_run(folder, levels, base, final, steps=10, seed=0):
    """A finished train.py run folder as shapes.report reads it: config.json and eval/test_*.json."""
    os.makedirs(folder / "eval")
    (folder / "config.json").write_text(json.dumps({"levels": levels, "seed": seed}))
    for step, acc in ((0, base), (steps, final)):
        g = {"per_tag": acc, "overall": float(np.mean([v for t, v in acc.items() if t in S.GENEVAL_TAGS]))}
        (folder / "eval" / f"test_{step:05d}.json").write_text(json.dumps({"rewards": {}, "geneval_shapes": g}))


def test_shapes_diagnose_checks_its_flags_first(tmp_path, capsys):
    """A bad guidance weight, a missing checkpoint or an unknown device stops `shapes.py diagnose` with one error
    line."""
    assert "--cfg must be positive" in cli_error(S.main, ["diagnose", "--cfg", "0"], capsys, "shapes.py")
    assert "does not exist" in cli_error(S.main, ["diagnose", "--ckpt", str(tmp_path / "none")], capsys, "shapes.py")
    assert "not a device name" in cli_error(S.main, ["diagnose", "--device", "cdua"], capsys, "shapes.py")


def test_shapes_diagnose_runs_in_bf16_with_every_tensor_on_the_models_device(monkeypatch):
    """diagnose on the model's device and dtype: its generator, prompts and images were made on the CPU (on_device:
    a GPU run's stray tensors are caught on the CPU)."""
    load = C.from_pretrained
    def load_unchecked(*a, **k):  # loading builds the model on "meta" on purpose
        with torch.device("cpu"), torch.utils._python_dispatch._disable_current_modes():
            return load(*a, **k)
    monkeypatch.setattr(S, "from_pretrained", load_unchecked)
    items = S.prompt_sets()[2][:2]
    lines = []
    rows = on_device(S.diagnose)(S.BASE_DIR, items, n=2, device="cpu", dtype=torch.bfloat16, log=lines.append)
    assert {"VQ ceiling", "drawn from true plans", "drawn from own plans", "drawn from the prompt alone"} <= set(rows)
    assert all(0 <= r["overall"] <= 1 for r in rows.values()) and len(lines) >= len(rows)


def test_shapes_report_averages_seeds_per_level(tmp_path):
    tags = list(S.GENEVAL_TAGS)
    def acc(v, reasoning):
        return {**{t: v for t in tags}, "reasoning": reasoning}
    runs = []
    for levels, finals in (("both", (0.6, 0.8)), ("token", (0.5, 0.5)), ("semantic", (0.3, 0.4))):
        for seed, f in enumerate(finals):
            runs.append(tmp_path / f"{levels}{seed}")
            base = 0.2 + 0.1 * seed if levels != "token" else 0.1  # one base per seed for semantic and both
            _fake_run(runs[-1], levels, acc(base, 0.3), acc(f, f / 2), seed=seed)
    table = S.report([str(r) for r in runs])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
            if line.startswith("| ") and "±" in line or line.startswith("| semantic level") or line.startswith("| token level")}
    # both levels: seeds 0.6 and 0.8 -> mean 0.7, sample std 0.141; reasoning 0.3 and 0.4 -> 0.35 +- 0.071
    assert rows["both levels (T2I-R1), 2 seeds"][0] == "0.700 ± 0.141"
    assert rows["both levels (T2I-R1), 2 seeds"][-1] == "0.350 ± 0.071"
    # the base with plans: seeds 0.2 and 0.3, each counted once although a semantic and a both run evaluated it
    assert rows["base, with its plans"][0] == "0.250 ± 0.071" and rows["base, no plan"][0] == "0.100 ± 0.000"
    assert rows["semantic level (both - token)"][0] == "+0.200" and rows["token level (both - semantic)"][0] == "+0.350"
    with pytest.raises(FileNotFoundError, match="not a train.py run folder"):
        S.report([str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"levels": "both", "seed": 0}))
    with pytest.raises(FileNotFoundError, match="no test evaluation"):
        S.report([str(tmp_path)])  # a run that never evaluated


def test_shapes_report_refuses_to_pool_runs_with_other_settings(tmp_path):
    """Runs with another --image-logp or --eval-n were pooled as seeds of one row: refused, naming each setting
    that differs. A run scored without a rule reward, or a torn evaluation, is named too."""
    acc = {t: 0.5 for t in S.GENEVAL_TAGS}
    runs = [tmp_path / f"both{seed}" for seed in range(3)]
    for seed, run in enumerate(runs):
        _fake_run(run, "both", acc, acc, seed=seed)
        extra = {"image_logp": "cfg" if seed == 2 else "cond", "eval_n": 16, "micro_batch": 4 + seed,
                 "sampling": {"cfg_weight": 3.0, "temperature": 1.0 + (seed == 1)}}
        (run / "config.json").write_text(json.dumps({"levels": "both", "seed": seed, **extra}))
    S.report([str(r) for r in runs[:1]])
    with pytest.raises(ValueError, match=r"differ in more than the seed .*--image-logp \('cond' in .*both0, 'cond' in "
                                         r".*both1, 'cfg' in .*both2\); --temperature"):
        S.report([str(r) for r in runs])
    (runs[1] / "eval" / "test_00010.json").write_text(json.dumps({"rewards": {"clip": 0.3}}))
    with pytest.raises(ValueError, match=r"test_00010.json holds no GenEval accuracy"):
        S.report([str(runs[1])])
    (runs[1] / "eval" / "test_00010.json").write_text('{"rewards": {"cl')
    with pytest.raises(ValueError, match=r"test_00010.json is not valid JSON"):
        S.report([str(runs[1])])


# ---- sample.py: prompt files, the command line, fidelity of whole samples, progress --------------------------------


def test_sample_cli_writes_images_grids_and_jsonl(tmp_path, capsys):
    m = tiny_model()
    tok = make_word_tokenizer(tmp_path / "ckpt")
    C.save_pretrained(m, tmp_path / "ckpt", tokenizer=tok)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle", "tag": "colors"}\n\na blue square\n')
    args = ["--ckpt", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "p.jsonl"), "--n", "2",
            "--rollout-batch", "1", "--max-plan-tokens", "4", "--seed", "7"]
    recs = SA.main(args + ["--out", str(tmp_path / "a")])
    assert len(recs) == 4 and recs[0]["metadata"]["tag"] == "colors" and recs[2]["prompt"] == "a blue square"
    lines = [json.loads(l) for l in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert [l["image_tokens"] for l in lines] == [r["image_tokens"] for r in recs]
    from PIL import Image
    img = Image.open(tmp_path / "a" / lines[0]["file"])
    assert img.size == (m.cfg.vq.image_size,) * 2 and img.mode == "RGB"
    assert (tmp_path / "a" / "grid_0000.png").exists() and (tmp_path / "a" / "grid_0001.png").exists()
    again = SA.main(args + ["--out", str(tmp_path / "b")])  # the same seed gives the same output
    assert [r["image_tokens"] for r in again] == [r["image_tokens"] for r in recs]
    assert [r["plan"] for r in again] == [r["plan"] for r in recs]
    (tmp_path / "empty.txt").write_text("\n\n")
    ck = ["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "c")]
    assert "empty.txt holds no prompts" in cli_error(SA.main, ck + ["--prompts", str(tmp_path / "empty.txt")],
                                                     capsys, "sample.py")
    msg = cli_error(SA.main, ck + ["--prompt", "a red circle", "--rewards", "shapes"], capsys, "sample.py")
    assert "carries GenEval metadata" in msg
    assert "--n must be at least 1, got 0" in cli_error(SA.main, ck + ["--n", "0"], capsys, "sample.py")
    assert "no-such-folder does not exist" in cli_error(SA.main, ["--ckpt", str(tmp_path / "no-such-folder")],
                                                        capsys, "sample.py")
    assert not (tmp_path / "c").exists()  # every error came before any sampling
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*\"prompt\""):
        SA.read_prompts(str(tmp_path / "bad.jsonl"))


def test_one_check_of_the_settings_for_every_script(tmp_path, capsys):
    """A bound is declared once, beside its setting, and checked by one function: the same flag out of range is
    the same error from train.py and sample.py (sampling settings too), and shapes.py's diagnose."""
    out = ["--out", str(tmp_path / "o")]
    for flag, value, want in [("--rollout-batch", "0", "--rollout-batch must be at least 1, got 0"),
                              ("--threads", "0", "--threads must be at least 1, got 0"),
                              ("--text-top-p", "1.5", "--text-top-p must lie in (0, 1], got 1.5"),
                              ("--cfg", "inf", "--cfg must be a finite number, got inf")]:
        errors = {cli_error(main, out + [flag, value], capsys, prog).split(": error: ")[1]
                  for main, prog in ((T.main, "train.py"), (SA.main, "sample.py"))}
        assert errors == {want}, (flag, errors)
    assert cli_error(S.main, ["diagnose", "--cfg", "inf"], capsys, "shapes.py").endswith(want)
    with pytest.raises(ValueError, match="--temperature must be at least 0, got -1"):
        ST.check_settings(T.TrainConfig(sampling=R.SamplingConfig(temperature=-1.0)))


def test_sample_refuses_an_out_holding_samples_unless_overwritten_and_names_bad_bytes(tmp_path, capsys):
    m = tiny_model()
    C.save_pretrained(m, tmp_path / "ckpt", tokenizer=make_word_tokenizer(tmp_path / "ckpt"))
    args = ["--ckpt", str(tmp_path / "ckpt"), "--prompt", "a red circle", "--n", "1", "--max-plan-tokens", "2",
            "--out", str(tmp_path / "a")]
    SA.main(args + ["--n", "3"])
    err = cli_error(SA.main, args, capsys, "sample.py")
    assert "already holds samples" in err and "--overwrite" in err
    SA.main(args + ["--overwrite"])  # one image now: none of the three earlier ones stays beside it
    assert sorted(p.name for p in (tmp_path / "a").glob("0000_*.png")) == ["0000_0.png"]
    lock = C.lock_folder(str(tmp_path / "b"), "sample")  # another sample.py writing there
    err = cli_error(SA.main, args[:-1] + [str(tmp_path / "b")], capsys, "sample.py")
    assert "in use by another sample.py process" in err and str(os.getpid()) in err
    lock.close()
    (tmp_path / "p.txt").write_bytes(b"a red circle\na blue \xff square\n")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "p.txt")) + r":2: not UTF-8 .*0xff at column 8"):
        SA.read_prompts(str(tmp_path / "p.txt"))


@pytest.mark.parametrize("kernel", [None, *K.CPU_KERNELS])
def test_sample_matches_transformers_janus_generate(tmp_path, monkeypatch, kernel):
    """`sample.py --levels token --temperature 0 --cfg 5` gives exactly the image tokens of transformers' Janus
    `generate` in image mode (guidance 5, greedy), on the same random weights, whichever CPU matmul kernel
    kernels.Linear takes."""
    if kernel == "oneDNN" and not K.ONEDNN:
        pytest.skip("oneDNN's matmul is not available here")
    monkeypatch.setattr(K, "CPU_KERNEL", kernel)
    # large noise: peaked distributions, so a wrong token cannot hide in a near-tie
    ref = tiny_hf_janus(0.3, image_size=96, num_image_tokens=36)
    from transformers import GenerationConfig
    ref.save_pretrained(tmp_path / "ckpt")
    tok = make_word_tokenizer(tmp_path / "ckpt")
    prompts = ["a red circle", "a photo of a blue square"]
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    recs = SA.main(["--ckpt", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "p.txt"), "--levels", "token",
                   "--chat-format", "janus", "--temperature", "0", "--cfg", "5", "--n", "1", "--rollout-batch", "2",
                   "--out", str(tmp_path / "o")])
    gen = GenerationConfig(bos_token_id=tok.bos_id, pad_token_id=tok.pad_id, do_sample=False, guidance_scale=5.0,
                           generation_kwargs={"boi_token_id": tok.boi_id})
    for rec, prompt in zip(recs, prompts):
        ids = torch.tensor([tok.encode(M.image_prompt(prompt))])
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", generation_config=gen)
        assert rec["image_tokens"] == want[0].tolist()


def test_progress_is_rewritten_on_a_terminal_and_whole_lines_elsewhere():
    buf = io.StringIO()  # not a terminal: whole lines, the last one always
    bar = SA.Progress(5, "image tokens", stream=buf, every_line=0)
    for _ in range(5):
        bar.update()
    lines = buf.getvalue().split("\n")
    assert "\r" not in buf.getvalue() and lines[-1] == "" and len(lines) == 6 and lines[-2].startswith("image tokens 5/5")
    buf = io.StringIO()
    bar = SA.Progress(5, "x", stream=buf, every_line=3600)
    for _ in range(5):
        bar.update()
    assert buf.getvalue().count("\n") == 1 and buf.getvalue().startswith("x 5/5")  # a long stage: a few lines

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    buf = Terminal()
    bar = SA.Progress(3, "x", stream=buf, every=0)
    for _ in range(3):
        bar.update()
    assert buf.getvalue().count("\r") == 3 and buf.getvalue().count("\n") == 1


def test_plan_tokens_have_progress_and_the_image_eta_leaves_the_plans_out(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(SA.time, "time", lambda: clock[0])
    buf = io.StringIO()
    images, plans = SA.Progress(4, "image tokens", stream=buf, every_line=0), SA.Progress(8, "plan tokens", stream=buf,
                                                                                          every_line=0)
    image_cb, plan_cb = SA.stage_progress(images, plans), SA.stage_progress(plans, images)
    for batch in range(2):  # per batch: 2 plan tokens, 50 s each, then every plan has ended (a jump to 4 of 4)
        for i in (1, 2):
            clock[0] += 50
            plan_cb(i, 4)
        plan_cb(4, 4)
        for i in (1, 2)[:2 - batch]:  # then the image tokens, 1 s each
            clock[0] += 1
            image_cb(i, 2)
    lines = buf.getvalue().splitlines()
    assert lines[-1].startswith("image tokens 3/4 [203s, eta 1s]"), lines  # 1 s per image token, plans apart
    assert [l.split(" [")[0] for l in lines if l.startswith("plan")] == [f"plan tokens {n}/8" for n in (1, 2, 4, 5, 6, 8)]
    monkeypatch.undo()  # the real clock again; a real sampler's plans and images
    err, m = io.StringIO(), tiny_model()
    monkeypatch.setattr(SA.sys, "stderr", err)
    SA.generate(m, make_word_tokenizer(tmp_path), [{"prompt": "a red circle"}], settings(max_plan_tokens=3), n=2,
                batch_size=1)
    assert "plan tokens 3/3" in err.getvalue() and f"image tokens {m.cfg.image_tokens}/{m.cfg.image_tokens}" in err.getvalue()


def test_shapes_t2i_r1_file_counts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one hamburger", "nouns": ["hamburger"], "task_type": "numeracy", '
                    '"numeracy_info": [{"obj_name": "hamburger", "num": 1}]}\n\n'
                    '{"task_type": "shape", "prompt": "an oval mirror", "nouns": ["mirror"], '
                    '"attr_nouns": ["oval mirror"]}')
    items = SA.read_prompts(str(path))
    assert [it["task_type"] for it in items] == ["numeracy", "shape"] and "include" not in items[1]
    assert {k: items[0][k] for k in ("tag", "include", "exclude", "prompt")} == {
        "tag": "counting", "include": [{"class": "hamburger", "count": 1}],
        "exclude": [{"class": "hamburger", "count": 2}], "prompt": "one hamburger"}


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


def test_t2i_r1_prompt_file_reads_as_published_and_rule_rewards_abstain_where_they_cannot_check(tmp_path):
    path = tmp_path / "geneval_and_t2i_data_final.json"
    path.write_text("\n".join(json.dumps(r) for r in T2I_R1_ROWS))  # no final newline, as published
    items = SA.read_prompts(str(path))
    assert [it["prompt"] for it in items] == [r["prompt"] for r in T2I_R1_ROWS]
    assert [it.get("tag") for it in items] == ["position", "counting", None, "color_attr", None, "two_object"]
    assert items[0]["include"][1] == {"class": "car", "count": 1, "position": ["below", 0]}
    assert items[2]["nouns"] == ["desk", "shoe"] and "include" not in items[2]  # its own fields are kept
    # the rules abstain on rows they cannot check: score 0 (a constant within the group), marked unchecked
    shapes_reward = S.ShapesReward()
    shapes_reward.classes = None  # the shapes detector stands in for an open-vocabulary one (T2I-R1's nouns)
    scores, info = shapes_reward(np.full((6, 8, 8, 3), 240, np.uint8), items)
    assert info["checked"] == [True, True, False, True, False, True]
    assert scores[2] == 0 and scores[4] == 0 and info["strict"][2] is None
    ens = RW.RewardEnsemble({"shapes": 1.0}, {})
    report = ens.unchecked_report(items, "training prompts")
    assert report == [report[0]] and report[0].startswith("shapes: 2 of the 6 training prompts carry no GenEval")
    assert "(T2I-R1 task types: non 1, texture 1)" in report[0]
    # a prompt set none of whose rows a rule reward can check is refused
    with pytest.raises(ValueError, match="shapes: none of the 2 prompt"):
        ens.check_metadata([items[2], items[4]])
    # malformed rows: the error names the file, the line and the field
    bad = [({**T2I_R1_ROWS[0], "spatial_info": {"obj1": "car", "locality": "below"}}, "'spatial_info' needs"),
           ({**T2I_R1_ROWS[1], "numeracy_info": [{"obj_name": "plate", "num": "two"}]}, "'numeracy_info' must be"),
           ({"prompt": "a cat", "tag": "single_object", "include": [{"count": 1}]}, r"include\[0\] needs a 'class'"),
           ({"prompt": "a cat", "include": [{"class": "cat", "count": 0}]}, r"include\[0\] needs a 'count'"),
           ({"prompt": "a cat", "include": [{"class": "cat", "count": 1, "position": ["near", 0]}]},
            r"include\[0\]: 'position' must be"),
           # geneval_score places a clause relative to one already matched: a later one cannot be scored
           ({"prompt": "a cat left of a dog", "include": [{"class": "cat", "count": 1, "position": ["left of", 1]},
                                                          {"class": "dog", "count": 1}]},
            r"include\[0\]: 'position' must be")]
    for row, msg in bad:
        path.write_text(json.dumps(T2I_R1_ROWS[0]) + "\n\n" + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=re.escape(str(path)) + ":3: " + msg):
            SA.read_prompts(str(path))


# ---- train.py: the BiCoT-GRPO loop, processes, checkpoints, recipes ------------------------------------------------


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
    with torch.no_grad():
        # the image path is frozen during RL, so give it unit-scale weights: with GPT-style 0.02 init the image
        # logits barely move whatever the trainable decoder does
        m.gen_embed.weight.normal_()
        for w in (m.gen_aligner.layers[0].weight, m.gen_aligner.layers[2].weight,
                  m.gen_head.output_mlp_projector.weight, m.gen_head.vision_head.weight):
            w.normal_(0, w.shape[1] ** -0.5)
    C.save_pretrained(m, folder, tokenizer=tok)
    (folder / "reasoning_prompt.txt").write_text(S.REASONING_TEMPLATE)
    return str(folder)


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


def final_weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "ckpt", "model.safetensors"))


def test_a_few_steps_raise_the_reward(random_base, redness, tmp_path):
    """A real effect on a random tiny model: 25 BiCoT-GRPO steps raise a reward it can learn (redness of the
    decoded image) by at least 3 standard errors. Guidance 1 keeps the sampled and the scored distributions
    the same; with guidance, T2I-R1's conditional-only log-probs are off-policy and this tiny model moves less
    reliably (the margin held for training seeds 0-5, 3.6 to 5.5 standard errors, when it was set)."""
    (tmp_path / "p.jsonl").write_text(json.dumps(S.colors("red", "circle")) + "\n")  # one fixed shapes prompt
    _, metrics = T.train(T.parse_args(train_args(random_base, tmp_path / "run", "--prompts", str(tmp_path / "p.jsonl"),
                                                 "--steps", "25", "--group-size", "8", "--prompts-per-step", "4",
                                                 "--rollout-batch", "4", "--micro-batch", "32", "--cfg", "1")),
                         log=lambda *a, **k: None)
    r = np.array([m["reward"] for m in metrics])
    noise = np.mean([m["reward_std"] for m in metrics[:5]]) / np.sqrt(5 * 32)  # std error of a 5-step mean
    assert r[-5:].mean() > r[:5].mean() + 3 * noise, r
    assert all(math.isfinite(m["loss"]) and m["kl"] >= 0 for m in metrics)


def test_resume_continues_to_the_same_parameters(random_base, redness, tmp_path):
    quiet = dict(log=lambda *a, **k: None)
    T.train(T.parse_args(train_args(random_base, tmp_path / "a", "--steps", "4", "--save-every", "2")), **quiet)
    T.train(T.parse_args(train_args(random_base, tmp_path / "b", "--steps", "2", "--save-every", "2")), **quiet)
    T.train(T.parse_args(["--out", str(tmp_path / "b"), "--resume", "--steps", "4"]), **quiet)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = C.from_pretrained(random_base).state_dict()
    assert not torch.equal(a["language_model.model.layers.0.mlp.up_proj.weight"],
                           base["language_model.model.layers.0.mlp.up_proj.weight"])
    # the VQ and the image embedding/head stay frozen, as in T2I-R1
    for k in ("gen_head.vision_head.weight", "gen_embed.weight", "gen_vision_model.decoder.conv_out.weight"):
        assert torch.equal(a[k], base[k])
    lines = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]


def test_a_crash_while_saving_keeps_the_previous_checkpoint(random_base, redness, tmp_path, monkeypatch):
    quiet = dict(log=lambda *a, **k: None)
    real, calls = C.write_tensors, []
    def dying_save(state, path):  # the second save dies half-way through writing its weights
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt("killed while saving")
        return real(state, path)
    monkeypatch.setattr(C, "write_tensors", dying_save)
    with pytest.raises(KeyboardInterrupt):
        T.train(T.parse_args(train_args(random_base, tmp_path / "run", "--steps", "4", "--save-every", "2")), **quiet)
    monkeypatch.setattr(C, "write_tensors", real)
    ckpt = T.last_checkpoint(str(tmp_path / "run"))
    assert ckpt.endswith("ckpt")
    C.from_pretrained(ckpt)  # loads: the half-written one never replaced it
    assert torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=True)["step"] == 2
    T.train(T.parse_args(["--out", str(tmp_path / "run"), "--resume"]), **quiet)
    T.train(T.parse_args(train_args(random_base, tmp_path / "ref", "--steps", "4", "--save-every", "2")), **quiet)
    a, b = final_weights(tmp_path / "run"), final_weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_step_lines_show_each_reward_elapsed_time_and_eta_and_eval_every_0_means_no_validation(random_base, redness,
                                                                                              tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps(S.colors("red", "circle")) + "\n")
    lines = []
    T.train(T.parse_args(train_args(random_base, tmp_path / "run", "--steps", "2", "--rewards", "redness,shapes",
                                    "--prompts", str(tmp_path / "p.jsonl"), "--val-prompts", str(tmp_path / "p.jsonl"))),
            log=lines.append)
    steps = [l for l in lines if l.startswith("step ")]
    assert len(steps) == 2 and all(re.search(r"\| reward -?\d\.\d{3}±\d\.\d{3} redness -?\d\.\d{3} shapes \d\.\d{3} \| kl ", l)
                                   for l in steps), steps
    assert re.search(r"\| \d+s elapsed, eta \d+s$", steps[0]) and steps[1].endswith("elapsed, eta 0s"), steps
    assert os.listdir(tmp_path / "run" / "eval") == []  # --eval-every 0: validation neither at the start nor the end
    assert all(l in (tmp_path / "run" / "train.log").read_text() for l in steps)  # a log beside metrics.jsonl


def test_an_existing_run_is_refused_unless_resumed_or_overwritten(random_base, redness, tmp_path, capsys):
    """A second run into the same --out was silently clobbering the first: refused, unless --resume continues
    it or --overwrite replaces it, and then nothing of the old run (metrics, evaluations) stays."""
    out = tmp_path / "run"
    T.main(train_args(random_base, out, "--steps", "2"))
    err = cli_error(T.main, train_args(random_base, out, "--steps", "1"), capsys, "train.py")
    assert str(out) in err and "already holds a run" in err and "--overwrite" in err
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=True)["step"] == 2  # untouched
    (out / "eval").mkdir(exist_ok=True)
    (out / "eval" / "val_00008.json").write_text("{}")  # an evaluation the old run wrote
    T.main(train_args(random_base, out, "--steps", "1", "--overwrite"))
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (out / "eval" / "val_00008.json").exists()
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=True)["step"] == 1
    assert "step 1/1" in (out / "train.log").read_text()  # the log beside metrics.jsonl
    assert "one of them" in cli_error(T.main, train_args(random_base, out, "--resume", "--overwrite"), capsys,
                                      "train.py")


def test_resume_of_a_folder_without_a_checkpoint_is_refused(random_base, redness, tmp_path, capsys):
    err = cli_error(T.main, ["--out", str(tmp_path / "typo"), "--resume"], capsys, "train.py")
    assert str(tmp_path / "typo") in err and "no checkpoint" in err
    assert not (tmp_path / "typo").exists()
    (tmp_path / "crashed").mkdir()  # a run that died before its first checkpoint
    (tmp_path / "crashed" / "metrics.jsonl").write_text("")
    err = cli_error(T.main, train_args(random_base, tmp_path / "crashed", "--resume"), capsys, "train.py")
    assert "no checkpoint" in err and "metrics.jsonl" in err


def test_a_second_process_on_a_run_folder_is_refused_and_a_dead_one_leaves_no_lock(random_base, redness, tmp_path,
                                                                                    capsys):
    import subprocess
    import sys
    out = tmp_path / "run"
    lock = C.lock_folder(str(out), "train")  # another process's lock (flock locks are per open file)
    err = cli_error(T.main, train_args(random_base, out, "--steps", "1"), capsys, "train.py")
    assert "in use by another train.py process" in err and str(os.getpid()) in err
    lock.close()
    # a process killed while holding the lock leaves the folder free
    code = f"import os, checkpoints; checkpoints.lock_folder({str(out)!r}, 'train'); os.kill(os.getpid(), 9)"
    assert subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(T.__file__)).returncode == -9
    T.main(train_args(random_base, out, "--steps", "1"))
    assert (out / "ckpt" / "train_state.pt").exists()


def test_resume_refuses_changed_settings_and_records_the_allowed_ones(random_base, redness, tmp_path, capsys):
    out = tmp_path / "run"
    T.main(train_args(random_base, out, "--steps", "1"))
    first = json.loads((out / "config.json").read_text())
    err = cli_error(T.main, ["--out", str(out), "--resume", "--lr", "0.01", "--seed", "3", "--ckpt", str(tmp_path),
                             "--steps", "2"], capsys, "train.py")
    for flag in ("--lr 0.01", "--seed 3", "--ckpt"):
        assert flag in err, err
    assert "--steps" not in err  # more steps is a change a resume may make
    assert "--cfg" in cli_error(T.main, ["--out", str(out), "--resume", "--cfg", "3"], capsys, "train.py")
    T.main(["--out", str(out), "--resume", "--steps", "2", "--save-every", "1"])
    config = json.loads((out / "config.json").read_text())
    assert config["resumes"] == [{"step": 1, "changed": {"steps": [1, 2], "save_every": [50, 1]}}]
    assert {k: v for k, v in config.items() if k not in ("steps", "save_every", "resume", "resumes")} == \
        {k: v for k, v in first.items() if k not in ("steps", "save_every", "resume")}
    assert "already at step 2" in cli_error(T.main, ["--out", str(out), "--resume", "--steps", "1"], capsys, "train.py")


def janus_pro_like_base(random_base, folder, layout):
    """A base as the published folders are: deepseek's layout (bf16 tensors in two pytorch_model shards with
    their index, as Janus-Pro-7B ships, the understanding tower beside the generation path) or transformers'
    (JanusForConditionalGeneration.save_pretrained, its SigLIP tower included), with processor files."""
    import shutil
    os.makedirs(folder)
    if layout == "deepseek":
        m = C.from_pretrained(random_base)
        state = {k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}
        state["vision_model.vision_tower.pos_embed"] = torch.randn(1, 4, 8, dtype=torch.bfloat16)
        state["aligner.layers.0.weight"] = torch.randn(8, 8, dtype=torch.bfloat16)
        C.save_state_dict(state, folder, weights="bin", shards=2)
        C.write_json(os.path.join(folder, "config.json"), C.config_to_dict(m.cfg, torch.bfloat16))
    else:
        tiny_hf_janus(0.05, vocab_size=M.Tokenizer.from_pretrained(random_base).vocab_size,
                      image_size=64).save_pretrained(folder)
    for name in ("tokenizer.json", "reasoning_prompt.txt"):
        shutil.copy(os.path.join(random_base, name), folder)
    with open(os.path.join(folder, "processor_config.json"), "w") as f:
        f.write('{"image_tag": "<image_placeholder>"}')
    return folder


def tensors(folder):
    return {k: v for f in C.weight_files(folder) for k, v in C.read_tensors(f)}


@pytest.mark.parametrize("layout", ["deepseek", "transformers"])
def test_checkpoints_are_the_base_folder_with_the_trained_tensors_in_place(random_base, redness, tmp_path, layout):
    """A trained checkpoint holds every file and tensor of its base, in the base's layout (the understanding
    tower included), so the loader that read the base reads it; only the trained language model differs."""
    base = janus_pro_like_base(random_base, str(tmp_path / "base"), layout)
    policy, _ = T.train(T.parse_args(train_args(base, tmp_path / "run", "--steps", "1", "--cfg", "1")),
                        log=lambda *a, **k: None)
    ckpt = str(tmp_path / "run" / "ckpt")
    assert set(os.listdir(base)) | {"train_state.pt"} == set(os.listdir(ckpt))
    for name in ("config.json", "processor_config.json", "tokenizer.json"):
        assert open(os.path.join(base, name)).read() == open(os.path.join(ckpt, name)).read(), name
    before, after = tensors(base), tensors(ckpt)
    assert before.keys() == after.keys()
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    ours = policy.state_dict()
    changed = 0
    for k, v in before.items():
        name = C.to_original_key(k)
        if name in trained:  # float32 master weights, as the policy holds them
            assert after[k].dtype == torch.float32 and torch.equal(after[k], ours[name]), k
            changed += not torch.equal(after[k], v.float())
        else:  # understanding tower, VQ, image embedding and head: the base's, dtype and all
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert changed > 0 and any(k.startswith(("vision_model.", "model.vision_model.")) for k in before)
    C.from_pretrained(ckpt)
    if layout == "transformers":  # transformers' own loader takes it, every key in place
        from transformers import JanusForConditionalGeneration
        hf, info = JanusForConditionalGeneration.from_pretrained(ckpt, output_loading_info=True)
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
        assert torch.equal(hf.lm_head.weight, ours["language_model.lm_head.weight"])


def test_evaluations_are_written_whole_and_a_torn_one_is_named(random_base, redness, tmp_path, monkeypatch):
    (tmp_path / "p.jsonl").write_text(json.dumps(S.colors("red", "circle")) + "\n")
    args = train_args(random_base, tmp_path / "run", "--steps", "1", "--eval-prompts", str(tmp_path / "p.jsonl"),
                      "--eval-n", "2")
    real = json.dump
    def dying_dump(obj, f, **kw):  # killed half-way through writing the base's evaluation
        if isinstance(obj, dict) and "images" in obj:
            f.write('{"images": 2, "rew')
            raise KeyboardInterrupt
        return real(obj, f, **kw)
    monkeypatch.setattr(json, "dump", dying_dump)
    with pytest.raises(KeyboardInterrupt):
        T.train(T.parse_args(args), log=lambda *a, **k: None)
    monkeypatch.setattr(json, "dump", real)
    assert os.listdir(tmp_path / "run" / "eval") == []  # no half file
    T.train(T.parse_args(args + ["--overwrite"]), log=lambda *a, **k: None)
    (tmp_path / "run" / "eval" / "test_00000.json").write_text('{"images": 2, "rew')  # torn by other means
    with pytest.raises(ValueError, match=r"test_00000.json is not valid JSON"):
        T.train(T.parse_args(["--out", str(tmp_path / "run"), "--resume", "--steps", "2"]), log=lambda *a, **k: None)


def test_a_full_disk_is_named_and_leaves_nothing_partial(random_base, redness, tmp_path, monkeypatch, capsys):
    import shutil
    real_save, saves = torch.save, []
    def full_disk_save(obj, f, *a, **k):  # the second checkpoint's train_state.pt hits a full disk
        saves.append(f)
        if str(f).endswith("train_state.pt") and len(saves) > 1:
            open(f, "wb").write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0 "
                               "basic_ios::clear: iostream error")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**9, used=10**9, free=4096))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        T.main(train_args(random_base, out, "--steps", "2", "--save-every", "1"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and err.startswith("train.py: error: no space left on the disk of " + str(out)), err
    assert "room for two" in err and "--resume" in err
    assert sorted(os.listdir(out)) == ["ckpt", "config.json", "eval", "metrics.jsonl", "samples", "train.lock",
                                       "train.log"]  # no ckpt.tmp
    assert real_save and torch.load(out / "ckpt" / "train_state.pt", weights_only=True)["step"] == 1


def test_ctrl_c_prints_the_last_checkpoint_and_the_resume_command(random_base, redness, tmp_path, monkeypatch,
                                                                 capsys):
    out = tmp_path / "run"
    real = T.train_step
    def interrupted(run, step):
        if step == 1:
            raise KeyboardInterrupt
        return real(run, step)
    monkeypatch.setattr(T, "train_step", interrupted)
    with pytest.raises(SystemExit) as e:
        T.main(train_args(random_base, out, "--steps", "3", "--save-every", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and "Traceback" not in "\n".join(err)
    assert err[-1] == (f"train.py: interrupted; the last checkpoint is {out}/ckpt (step 1); continue with "
                       f"`python train.py --out {out} --resume`")


def test_bad_devices_and_prompts_too_long_for_the_context_are_one_line_errors(tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    row = S.colors("red", "circle")
    long.write_text(json.dumps(row) + "\n" + json.dumps({**row, "prompt": "a photo of a red circle " * 200}) + "\n")
    for main, prog in ((T.main, "train.py"), (SA.main, "sample.py")):
        err = cli_error(main, ["--prompts", str(long), "--out", str(tmp_path / "out")], capsys, prog)
        assert re.search(r"prompt 2 \('a photo of a red circle a photo.*4800 characters\) needs \d+ positions .* "
                         r"context is 512", err), err
        assert "not a device name" in cli_error(main, ["--device", "cdua", "--out", str(tmp_path / "out")], capsys,
                                                prog)
        if not torch.cuda.is_available():
            assert "--device cuda: this torch" in cli_error(main, ["--device", "cuda", "--out", str(tmp_path / "out")],
                                                          capsys, prog)
    assert not (tmp_path / "out").exists()


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single")


def _record_collectives(calls):
    """Wrap torch.distributed's tensor collectives: each call appends (name, device of every tensor given)."""
    import torch.distributed as dist

    def devices(x):
        if isinstance(x, torch.Tensor):
            return [str(x.device)]
        if isinstance(x, (list, tuple)):
            return [d for v in x for d in devices(v)]
        return []
    for name in COLLECTIVES:
        def wrapped(*a, _real=getattr(dist, name), _name=name, **k):
            calls.append((_name, devices(list(a) + list(k.values()))))
            return _real(*a, **k)
        setattr(dist, name, wrapped)


def _ddp_worker(rank, port, args, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    RW.REWARDS["redness"] = Redness
    calls = []
    _record_collectives(calls)
    T.train(T.parse_args(args), log=lambda *a, **k: None)
    if out:
        with open(os.path.join(out, f"collectives-{rank}.json"), "w") as f:
            json.dump(calls, f)
    # everything is on disk; skip interpreter teardown, where gloo's threads now and then abort the process
    os._exit(0)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_group_has_a_backend_for_cpu_and_cuda_tensors(monkeypatch):
    """On CUDA the group must also take CPU tensors (an NCCL-only group crashed at the first step), and each
    process must own the GPU of its LOCAL_RANK before the group is created."""
    import torch.distributed as dist
    events = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, **k: events.append(("init", backend)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(("set_device", str(d))))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda is checked against the machine
    rank, world, device = T.dist_setup(T.train_device(T.TrainConfig(device="cuda")))
    assert (rank, world, str(device)) == (1, 2, "cuda:1")
    assert events[0] == ("set_device", "cuda:1") and events[1][0] == "init"
    backends = dict(part.split(":") for part in events[1][1].split(","))
    assert backends == {"cpu": "gloo", "cuda": "nccl"}
    events.clear()
    assert T.dist_setup(torch.device("cpu"))[2] == torch.device("cpu") and events == [("init", "gloo")]


def _check_collectives(out, device):
    """Every tensor handed to a collective by either process lived on that process's training device."""
    for rank in range(2):
        calls = json.loads(open(os.path.join(out, f"collectives-{rank}.json")).read())
        want = device if device == "cpu" else f"cuda:{rank}"
        assert calls and any(name == "all_reduce" for name, _ in calls)
        wrong = [(name, d) for name, devs in calls for d in devs if d != want]
        assert not wrong, (rank, wrong[:5])


# each process needs its own GPU: NCCL refuses two ranks on one card
TWO_PROCESS_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.device_count() >= 2 else [])


@pytest.mark.parametrize("device", TWO_PROCESS_DEVICES)
def test_two_processes_match_one(random_base, redness, tmp_path, device):
    import torch.multiprocessing as mp
    one = train_args(random_base, tmp_path / "one", "--steps", "2", "--device", device)
    T.train(T.parse_args(one), log=lambda *a, **k: None)
    two = train_args(random_base, tmp_path / "two", "--steps", "2", "--device", device)
    mp.spawn(_ddp_worker, args=(_free_port(), two, str(tmp_path / "two")), nprocs=2, join=True)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6 if device == "cpu" else 1e-4)
    base = C.from_pretrained(random_base).state_dict()
    assert not torch.equal(a["language_model.lm_head.weight"], base["language_model.lm_head.weight"])
    _check_collectives(tmp_path / "two", device)


@pytest.mark.parametrize("device", TWO_PROCESS_DEVICES)
def test_fsdp_over_two_processes_matches_one(random_base, redness, tmp_path, device):
    import torch.multiprocessing as mp
    tol = dict(rtol=0, atol=1e-6 if device == "cpu" else 1e-4)
    T.train(T.parse_args(train_args(random_base, tmp_path / "one", "--steps", "2", "--device", device)),
            log=lambda *a, **k: None)
    two = train_args(random_base, tmp_path / "two", "--steps", "2", "--fsdp", "--device", device)
    mp.spawn(_ddp_worker, args=(_free_port(), two, str(tmp_path / "two")), nprocs=2, join=True)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)
    _check_collectives(tmp_path / "two", device)
    # the gathered optimizer state resumes a sharded run
    mp.spawn(_ddp_worker, args=(_free_port(), ["--out", str(tmp_path / "two"), "--resume", "--steps", "3"], None),
             nprocs=2, join=True)
    T.train(T.parse_args(["--out", str(tmp_path / "one"), "--resume", "--steps", "3"]), log=lambda *a, **k: None)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_bf16_processes_roll_out_update_save_resume_and_evaluate(random_base, redness, tmp_path, fsdp):
    """The two-process gloo run under bf16, data parallel and FSDP (weights gathered in bf16 by its mixed-precision
    policy, gradients reduced in float32): train, save, resume, evaluate; the first step's KL is exactly 0, and the
    run ends where one bf16 process ends."""
    import torch.multiprocessing as mp
    (tmp_path / "p.txt").write_text("a red circle\n")
    common = [*BF16, "--save-every", "1", "--eval-prompts", str(tmp_path / "p.txt"), "--eval-n", "2"]
    T.train(T.parse_args(train_args(random_base, tmp_path / "one", *common, "--steps", "2")), log=lambda *a, **k: None)
    two = train_args(random_base, tmp_path / "two", *common, "--steps", "1", *(["--fsdp"] if fsdp else []))
    mp.spawn(_ddp_worker, args=(_free_port(), two, None), nprocs=2, join=True)
    mp.spawn(_ddp_worker, args=(_free_port(), ["--out", str(tmp_path / "two"), "--resume", "--steps", "2"], None),
             nprocs=2, join=True)
    steps = [m for m in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2] and steps[0]["kl"] == 0
    assert sorted(os.listdir(tmp_path / "two" / "eval")) == ["test_00000.json", "test_00001.json", "test_00002.json"]
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    if not fsdp:  # the same float32 gradients, summed over processes
        assert diff.max() < 1e-6
    else:  # FSDP forms gradients of its gathered bf16 weights (an embedding's rows add up in bf16): AdamW's first
        # steps move a weight by about lr = 3e-3 whatever its gradient's size, so a rounding that flips a tiny
        # gradient moves it by up to 2 lr a step; that happens to a few weights only
        assert diff.max() <= 4 * 3e-3 and (diff > 1e-4).float().mean() < 1e-4


def test_lora_trains_adapters_only_and_saves_merged(random_base, redness, tmp_path):
    policy, _ = T.train(T.parse_args(train_args(random_base, tmp_path / "run", "--steps", "2", "--lora-rank", "4")),
                           log=lambda *a, **k: None)
    base = C.from_pretrained(random_base)
    layer = policy.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, T.LoRALinear) and layer.lora_B.abs().sum() > 0
    assert torch.equal(layer.weight, base.language_model.model.layers[0].self_attn.q_proj.weight)
    x = torch.randint(0, base.cfg.vocab_size, (1, 5))
    with torch.no_grad(), T.adapters_off(policy):  # the reference policy is the base model
        torch.testing.assert_close(policy(policy.embed_text(x)), base(base.embed_text(x)))
    saved = C.from_pretrained(str(tmp_path / "run" / "ckpt"))  # merged: loads with no adapter code
    with torch.no_grad():
        torch.testing.assert_close(saved(saved.embed_text(x)), policy(policy.embed_text(x)), rtol=0, atol=1e-5)


# A GPU run, emulated on the CPU: bf16 autocast over float32 master weights, gradient checkpointing
BF16 = ("--dtype", "bfloat16", "--device", "cpu", "--grad-checkpointing")


def saved_as_on_cuda(path, monkeypatch):
    """Rewrite a torch.save file so that its tensors are tagged cuda:0, byte for byte as a GPU run saves them."""
    import torch.serialization
    state = torch.load(path, weights_only=True)
    with monkeypatch.context() as mp:
        mp.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)


@pytest.mark.parametrize("variant", [(), ("--lora-rank", "4"), ("--image-logp", "cfg")], ids=["full", "lora", "cfg"])
def test_bf16_runs_roll_out_update_save_resume_and_evaluate(random_base, redness, tmp_path, monkeypatch, variant):
    """The whole loop under bf16 (rollout, update with gradient checkpointing, sample grids, checkpoint, resume from
    a state saved on cuda:0, evaluation) for a full fine-tune, LoRA and --image-logp cfg. With mu = 1 the ratio is
    exactly 1, and the first step's KL exactly 0: the bf16 reference (the base with its adapters off, under
    LoRA) computes bit for bit what the policy computes before its first update."""
    quiet = dict(log=lambda *a, **k: None)
    (tmp_path / "p.txt").write_text("a red circle\n")
    T.train(T.parse_args(train_args(random_base, tmp_path / "run", *BF16, *variant, "--steps", "1", "--save-every", "1",
                                    "--sample-every", "1", "--eval-prompts", str(tmp_path / "p.txt"), "--eval-n", "2")),
            **quiet)
    saved_as_on_cuda(tmp_path / "run" / "ckpt" / "train_state.pt", monkeypatch)
    policy, metrics = T.train(T.parse_args(["--out", str(tmp_path / "run"), "--resume", "--steps", "2"]), **quiet)
    steps = [m for m in metrics if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2] and all(math.isfinite(m["loss"]) for m in steps)
    assert steps[0]["kl"] == 0 and steps[1]["kl"] > 0, [m["kl"] for m in steps]
    assert all(m["ratio_min"] == m["ratio_max"] == 1 for m in steps)
    assert sorted(os.listdir(tmp_path / "run" / "eval")) == ["test_00000.json", "test_00001.json", "test_00002.json"]
    grids = [f"step_0000{i}.{ext}" for i in (1, 2) for ext in ("jsonl", "png")]
    assert sorted(os.listdir(tmp_path / "run" / "samples")) == grids
    saved = C.from_pretrained(str(tmp_path / "run" / "ckpt"))
    assert not torch.equal(saved.language_model.model.layers[0].mlp.up_proj.weight,
                           C.from_pretrained(random_base).language_model.model.layers[0].mlp.up_proj.weight)
    # the trained tensors are saved in float32, LoRA's merged ones too (over a bf16 base they were rounded to bf16)
    assert final_weights(tmp_path / "run")["language_model.model.layers.0.mlp.up_proj.weight"].dtype == torch.float32


@pytest.mark.parametrize("lora", [False, True])
def test_what_trains_is_float32_and_what_is_frozen_is_held_in_bf16(random_base, redness, tmp_path, lora):
    """Under --dtype bfloat16 the trained weights stay float32 (the optimizer's master copy) and everything frozen
    is held in bf16: the VQ, the image embedding and head, the reference (half a float32 copy's bytes) and,
    under LoRA, the base."""
    cfg = T.resolve_defaults(T.parse_args(train_args(random_base, tmp_path / "run", *BF16,
                                                     *(["--lora-rank", "4"] if lora else []))))
    run = T.start_run(T.prepare(cfg, log=lambda *a: None), log=lambda *a: None)
    trained = {n: p.dtype for n, p in run.policy.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in run.policy.named_parameters() if not p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    assert all(n.startswith(("gen_", "language_model")) for n in frozen)
    assert any(".lora_" in n for n in trained) == lora and any(n.startswith("language_model") for n in frozen) == lora
    if lora:
        assert run.ref is None  # the policy with its adapters off
    else:
        assert {p.dtype for p in run.ref.parameters()} == {torch.bfloat16}
        nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.language_model.parameters())
        assert 2 * nbytes(run.ref) == nbytes(run.policy)
    # decoding under autocast never casts a frozen weight, and casts a trained matrix once for the whole call
    names = {p.data_ptr(): n for n, p in run.policy.named_parameters()}
    casts = CastCounter(names)
    with torch.no_grad(), run.autocast, casts:
        ids, mask = R.pad_tokens([[1, 5, 6, 2], [1, 7, 2]], 0)
        R.generate_images(run.policy, ids, mask, pad_id=0, cfg_weight=2.0)
        R.generate_text(run.policy, ids, mask, eos_id=-1, pad_id=0, max_new_tokens=4)
    assert not [n for n in casts.counts if n in frozen], casts.counts
    assert casts.counts  # the trained weights (LoRA: the adapters), cast by autocast once each
    assert all(k == 1 for n, k in casts.counts.items() if run.policy.get_parameter(n).ndim == 2), casts.counts


def test_every_tensor_of_a_bf16_step_lives_on_the_policy_device(random_base, redness, tmp_path, monkeypatch):
    """GPU defects caught on the CPU (on_device): sampling, decoding images, scoring log-probs and forming the loss
    of a bf16 step with --image-logp cfg, and an evaluation, create no tensor off the policy's device. The linear
    layers are pinned to oneDNN, whose kernel computed in float32 under autocast."""
    monkeypatch.setattr(K, "CPU_KERNEL", "oneDNN" if K.ONEDNN else None)
    for module, name in ((R, "sample_t2i"), (R, "decode_images"), (T, "logprobs"), (R, "grpo_loss")):
        monkeypatch.setattr(module, name, on_device(getattr(module, name)))
    (tmp_path / "p.txt").write_text("a red circle\n")
    _, metrics = T.train(T.parse_args(train_args(random_base, tmp_path / "run", *BF16, "--steps", "1",
                                                 "--image-logp", "cfg", "--eval-prompts", str(tmp_path / "p.txt"),
                                                 "--eval-n", "2")), log=lambda *a, **k: None)
    assert metrics[-1]["step"] == 1 and (tmp_path / "run" / "eval" / "test_00001.json").exists()


def test_default_image_logprobs_are_conditional_as_in_t2i_r1():
    """T2I-R1 samples image tokens with CFG but scores them with the conditional forward alone; that is the
    default, and --image-logp cfg scores them under the guided distribution."""
    m = tiny_model()
    ids, mask = R.pad_tokens(image_prompts(m, lengths=(5, 7)), PAD)
    codes = torch.randint(0, m.cfg.vq.codebook_size, (2, 4), generator=torch.Generator().manual_seed(0))
    batch = R.Rollout(["a", "b"], ["", ""], ids, mask, *R.pad_tokens([[5, 6]] * 2, PAD, side="right"), ids, mask, codes)
    full = torch.ones_like(codes, dtype=torch.bool)
    cond = R.completion_logprobs(m, ids, mask, codes, full, "image")
    guided = R.completion_logprobs(m, ids, mask, codes, full, "image", cfg_weight=5.0,
                                   uncond_ids=R.unconditional(ids, mask, PAD))
    with torch.no_grad():
        default = T.logprobs(m, batch, T.resolve_defaults(T.parse_args(["--levels", "token"])), PAD)[0]
        with_guidance = T.logprobs(m, batch, T.resolve_defaults(T.parse_args(["--levels", "token", "--image-logp",
                                                                             "cfg", "--cfg", "5"])), PAD)[0]
    torch.testing.assert_close(default, cond)
    torch.testing.assert_close(with_guidance, guided)
    assert not torch.allclose(cond, guided)


def test_each_level_is_scored_at_its_own_sampling_temperature():
    """Plan tokens are scored at --text-temperature, image tokens at --temperature, as each was sampled."""
    m = tiny_model()
    ids, mask = R.pad_tokens(image_prompts(m, lengths=(5, 7)), PAD)
    codes = torch.randint(0, m.cfg.vq.codebook_size, (2, 4), generator=torch.Generator().manual_seed(0))
    plan_ids, plan_mask = R.pad_tokens([[5, 6, 7], [8]], PAD, side="right")
    batch = R.Rollout(["a", "b"], ["", ""], ids, mask, plan_ids, plan_mask, ids, mask, codes)
    cfg = T.resolve_defaults(T.parse_args(["--text-temperature", "0.5", "--temperature", "1.7"]))
    with torch.no_grad():
        logp, got_mask = T.logprobs(m, batch, cfg, PAD)
        plan = R.completion_logprobs(m, ids, mask, plan_ids, plan_mask, "text", temperature=0.5)
        image = R.completion_logprobs(m, ids, mask, codes, torch.ones_like(codes, dtype=torch.bool), "image",
                                      temperature=1.7)
        image_at_plan_t = R.completion_logprobs(m, ids, mask, codes, torch.ones_like(codes, dtype=torch.bool),
                                                "image", temperature=0.5)
    assert got_mask.shape == (2, 3 + 4)
    torch.testing.assert_close(logp[:, :3][plan_mask], plan[plan_mask])
    torch.testing.assert_close(logp[:, 3:], image)
    assert not torch.allclose(image, image_at_plan_t)


def test_rollout_samples_keep_plans_with_their_prompts(random_base, redness, tmp_path):
    """Over a step's sampling calls each sample's request, plan and image prompt belong together, and the
    log-prob pass over a micro-batch of different prompts gives each sample the log-probs it gets alone."""
    prompts = [S.colors("red", "circle"), S.counting("square", 3), S.position("triangle", "left of", "circle")]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    cfg = T.resolve_defaults(T.parse_args(train_args(random_base, tmp_path / "run", "--group-size", "3", "--prompts",
                                                     str(tmp_path / "p.jsonl"), "--prompts-per-step", "3")))
    run = T.start_run(T.prepare(cfg, log=lambda *a: None), log=lambda *a: None)
    r, images, metas = T.rollout(run, 0)  # two sampling calls: 2 prompts, then 1
    assert len(r) == 9 and images.shape[0] == 9 and r.prompts == [m["prompt"] for m in metas]
    assert metas[::3] == T.step_prompts(run.train_items, cfg, 0)
    fmt, tok = R.CHAT_FORMATS["janus"], run.tok
    plans, requests = real(r.plan_ids, r.plan_mask), real(r.request_ids, r.request_mask)
    for i, prompt in enumerate(r.prompts):
        assert requests[i] == tok.encode(fmt.request_text(run.reasoning, prompt))
        assert real(r.image_prompt_ids, r.image_prompt_mask)[i] == tok.encode(fmt.image_text(prompt, tok.decode(plans[i])))
        assert r.plans[i] == tok.decode(plans[i]).strip()
    with torch.no_grad():
        together, mask = T.logprobs(run.policy, r, cfg, tok.pad_id)
        for i in range(len(r)):
            alone, m = T.logprobs(run.policy, r.rows(i, i + 1), cfg, tok.pad_id)
            assert int(m.sum()) == len(plans[i]) + r.codes.shape[1]
            torch.testing.assert_close(together[i][mask[i]], alone[0][m[0]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_training_steps_pass_the_reference_models_logprobs(random_base, redness, tmp_path, monkeypatch, lora):
    """Every loss call gets the reference log-probs of its own samples under the starting model (a frozen copy,
    or the same model with its LoRA adapters off); after the first update they differ from the policy's and
    the logged KL is positive."""
    calls, real = [], T.PolicyLoss.forward
    def recording(self, batch, old_logp, ref_logp, n_total):
        calls.append((batch, None if ref_logp is None else ref_logp.clone()))
        return real(self, batch, old_logp, ref_logp, n_total)
    monkeypatch.setattr(T.PolicyLoss, "forward", recording)
    extra = ["--lora-rank", "4", "--lr", "3e-2"] if lora else []
    _, metrics = T.train(T.parse_args(train_args(random_base, tmp_path / "run", "--steps", "3", *extra)),
                            log=lambda *a, **k: None)
    assert all(ref is not None for _, ref in calls)
    base = C.from_pretrained(random_base)
    cfg = T.resolve_defaults(T.parse_args(train_args(random_base, tmp_path / "x")))
    pad = M.Tokenizer.from_pretrained(random_base).pad_id
    with torch.no_grad():
        for batch, ref in calls:
            torch.testing.assert_close(ref, T.logprobs(base, batch, cfg, pad)[0], rtol=0, atol=1e-5)
    assert metrics[0]["kl"] == pytest.approx(0, abs=1e-9)  # the first step's policy is the reference
    assert all(m["kl"] > 1e-6 for m in metrics[1:]), [m["kl"] for m in metrics]


def test_plan_settings_default_per_model_and_cut_plans_are_counted(random_base, redness, tmp_path):
    """Janus-Pro gets T2I-R1's plan settings (1024 tokens, top-k 50, its chat format), the shapes world short
    plans; the step log reports the fraction of plans cut before EOS."""
    janus = tmp_path / "janus"  # a Janus-Pro-like folder: no reasoning_prompt.txt of its own
    os.makedirs(janus)
    (janus / "config.json").write_text((open(os.path.join(random_base, "config.json")).read()))
    defaults = json.dumps(R.MODEL_DEFAULTS)
    c = T.resolve_defaults(T.parse_args(["--ckpt", str(janus)])).sampling
    assert (c.max_plan_tokens, c.text_top_k, c.chat_format, c.cfg_weight) == (1024, 50, "t2i-r1", 5.0)
    c = T.resolve_defaults(T.parse_args(["--ckpt", str(janus), "--max-plan-tokens", "300", "--text-top-k", "0"])).sampling
    assert (c.max_plan_tokens, c.text_top_k) == (300, 0)
    for args in ([], ["--ckpt", random_base]):  # the shapes world's base, and a folder with its own request
        c = T.resolve_defaults(T.parse_args(args)).sampling
        assert (c.max_plan_tokens, c.text_top_k, c.chat_format, c.cfg_weight) == (64, 0, "janus", 2.0)
    assert json.dumps(R.MODEL_DEFAULTS) == defaults  # resolving fills a copy, never the shared table
    lines = []
    _, metrics = T.train(T.parse_args(train_args(random_base, tmp_path / "run", "--steps", "1",
                                                    "--max-plan-tokens", "2")), log=lines.append)
    assert metrics[0]["plan_cut_frac"] > 0.5 and metrics[0]["plan_tokens"] <= 2
    step_line = next(l for l in lines if l.startswith("step 1/1"))
    assert f"{metrics[0]['plan_cut_frac']:.2f} cut" in step_line and "| clip " not in step_line


def test_clip_scores_samples_and_training_evaluations(random_base, tmp_path, monkeypatch, capsys):
    """`--score clip` with several images per prompt (diversity needs the embedding width) in sample.py and in
    train.py's evaluation; the samples are written before scoring, so a failing reward loses none."""
    c = _tiny_cfg()
    _write_hf_clip(tmp_path / "clip", c, _clip_sd(c, seed=1))
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    common = ["--ckpt", random_base, "--prompts", str(tmp_path / "p.txt"), "--n", "2", "--max-plan-tokens", "4",
              "--rewards", "clip", "--reward-ckpt", f"clip={tmp_path / 'clip'}"]
    recs = SA.main(common + ["--out", str(tmp_path / "a")])
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert 0 <= summary["diversity"] <= 2 and summary["images"] == 4
    lines = [json.loads(l) for l in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert [l["scores"]["clip"] for l in lines] == [r["scores"]["clip"] for r in recs]

    def broken(*a, **k):
        raise RuntimeError("reward model died")
    monkeypatch.setattr(SA, "score", broken)
    with pytest.raises(RuntimeError, match="died"):
        SA.main(common + ["--out", str(tmp_path / "b")])
    lines = [json.loads(l) for l in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    assert [l["image_tokens"] for l in lines] == [r["image_tokens"] for r in recs]  # same seed, same samples
    assert all((tmp_path / "b" / l["file"]).exists() for l in lines)
    monkeypatch.undo()

    T.train(T.parse_args(train_args(
        random_base, tmp_path / "run", "--steps", "1", "--rewards", "clip", "--reward-ckpt", f"clip={tmp_path / 'clip'}",
        "--eval-prompts", str(tmp_path / "p.txt"), "--eval-n", "2")), log=lambda *a, **k: None)
    assert sorted(os.listdir(tmp_path / "run" / "eval")) == ["test_00000.json", "test_00001.json"]
    evals = [json.loads((tmp_path / "run" / "eval" / f).read_text()) for f in ("test_00000.json", "test_00001.json")]
    assert all(0 <= s["diversity"] <= 2 and "clip" in s["rewards"] for s in evals)
    err = capsys.readouterr().err  # the evaluation shows its progress, as whole lines in a log
    assert "test evaluation: image tokens" in err and "test evaluation: scoring 4/4" in err
    assert "\r" not in err


def test_janus_pro_recipe_starts_on_t2i_r1_file_with_hps_and_geneval(random_base, tmp_path, capsys):
    """The README's recipe (T2I-R1's prompt file, --rewards hps:1,geneval:1) on tiny published-layout files:
    it reports the prompts the rules cannot check and trains; bad input stops it with one error line before
    any model is loaded."""
    ckpt, _ = _reward_folders(tmp_path / "rw")
    path = tmp_path / "geneval_and_t2i_data_final.json"
    path.write_text("\n".join(json.dumps(r) for r in T2I_R1_ROWS))
    recipe = train_args(random_base, tmp_path / "run", "--prompts", str(path), "--rewards", "hps:1,geneval:1",
                        "--reward-ckpt", f"hps={ckpt['hps']}", f"geneval={ckpt['geneval']}", f"clip={ckpt['clip']}",
                        "--steps", "1", "--sample-every", "1")
    lines = []
    _, metrics = T.train(T.parse_args(recipe), log=lines.append)
    saved = [json.loads(l) for l in (tmp_path / "run" / "samples" / "step_00001.jsonl").read_text().splitlines()]
    by_prompt = {r["prompt"]: r for r in T2I_R1_ROWS}
    for r in saved:  # which samples the geneval rules checked: those whose rows converted
        assert r["checked"]["hps"] and r["checked"]["geneval"] == (by_prompt[r["prompt"]]["task_type"] not in
                                                                  ("texture", "non"))
    assert any(l.startswith("geneval: 2 of the 6 training prompts carry no GenEval metadata") for l in lines), lines
    m = metrics[0]
    assert math.isfinite(m["reward"]) and math.isfinite(m["reward_hps"]) and m["step"] == 1
    # words the shapes world's vocabulary lacks are named
    warning = next(l for l in lines if l.startswith("warning: "))
    assert "'zebra'" in warning and "training prompts" in warning
    # bad input: one command-line error, nothing loaded or written
    out = tmp_path / "bad"
    bad = train_args(random_base, out, "--prompts", str(path), "--rewards", "hps:1,geneval:1")
    assert "needs the 'hps' checkpoint" in cli_error(T.main, bad, capsys, "train.py")
    assert "--levels" in cli_error(T.main, bad + ["--levels", "plans"], capsys, "train.py")
    assert "--group-size must be at least 2" in cli_error(T.main, bad + ["--group-size", "1"], capsys, "train.py")
    assert "unknown reward 'hsp'" in cli_error(T.main, bad + ["--rewards", "hsp"], capsys, "train.py")
    assert "reasoning prompt file" in cli_error(T.main, bad + ["--reasoning-prompt", str(tmp_path / "x.txt")],
                                                 capsys, "train.py")
    (tmp_path / "latin1.txt").write_bytes(b"Plan the image of\n{prompt} \xe9tape par \xe9tape\n")
    assert re.search(re.escape(str(tmp_path / "latin1.txt")) + r":2: not UTF-8 text \(byte 0xe9 at column 10\)",
                     cli_error(T.main, bad + ["--reasoning-prompt", str(tmp_path / "latin1.txt")], capsys, "train.py"))
    assert not out.exists()


def test_t2i_r1_preset_trains_a_step_on_t2i_r1_file(random_base, tmp_path):
    """--rewards t2i-r1 (hps, t2i-r1-detect, git) on tiny published-layout folders and T2I-R1's prompt-file
    format: it prints how many prompts each reward scores and trains one step."""
    ckpt, _ = _reward_folders(tmp_path / "rw")
    git = _write_git_folder(tmp_path / "rw" / "git", _tiny_git_cfg())
    path = tmp_path / "geneval_and_t2i_data_final.json"
    path.write_text("\n".join(json.dumps(r) for r in T2I_R1_ROWS))
    args = train_args(random_base, tmp_path / "run", "--prompts", str(path), "--rewards", "t2i-r1", "--reward-ckpt",
                      f"hps={ckpt['hps']}", f"geneval={ckpt['geneval']}", f"git={git}", "--steps", "1",
                      "--sample-every", "1")
    cfg = T.parse_args(args + ["--t2i-r1-as-released"])
    assert cfg.t2i_r1_as_released and not T.parse_args(args).t2i_r1_as_released
    lines = []
    _, metrics = T.train(cfg, log=lines.append)
    assert "hps: scores all 6 training prompts" in lines
    assert "t2i-r1-detect: scores all 6 training prompts" in lines
    assert any(l.startswith("git: scores 4 of the 6 training prompts; the other 2 (T2I-R1 task types: numeracy 1, "
                            "spatial 1)") for l in lines), lines
    saved = [json.loads(l) for l in (tmp_path / "run" / "samples" / "step_00001.jsonl").read_text().splitlines()]
    task = {r["prompt"]: r["task_type"] for r in T2I_R1_ROWS}
    for r in saved:
        asked = task[r["prompt"]] not in ("spatial", "numeracy")
        assert r["checked"]["t2i-r1-detect"] and r["checked"]["git"] == asked
    m = metrics[0]
    assert all(math.isfinite(m[k]) for k in ("reward", "reward_hps", "reward_t2i-r1-detect", "reward_git"))
    assert 0 < m["reward_git"] < 1 and m["step"] == 1


def test_resume_reads_train_state_with_weights_only_and_reports_without_held_out_prompts(random_base, redness,
                                                                                       tmp_path, monkeypatch):
    """train_state.pt is read with weights_only=True; a run without held-out prompts still writes summary.md
    (its training rewards) and curves.png."""
    quiet = dict(log=lambda *a, **k: None)
    T.train(T.parse_args(train_args(random_base, tmp_path / "a", "--steps", "2", "--save-every", "1")), **quiet)
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "| steps | reward | reward_redness | kl | plan_tokens |" in summary and "| 1-2 |" in summary
    assert Image.open(tmp_path / "a" / "curves.png").size == (640, 360)
    real, seen = torch.load, []
    def recording_load(f, *a, **k):
        if str(f).endswith("train_state.pt"):
            seen.append(k.get("weights_only"))
        return real(f, *a, **k)
    monkeypatch.setattr(torch, "load", recording_load)
    _, metrics = T.train(T.parse_args(["--out", str(tmp_path / "a"), "--resume", "--steps", "3"]), **quiet)
    assert seen and all(w is True for w in seen) and [m["step"] for m in metrics] == [1, 2, 3]
    # a run saved before SamplingConfig kept the sampling settings beside the others ("cfg" the guidance)
    state_file = tmp_path / "a" / "ckpt" / "train_state.pt"
    state = torch.load(state_file, weights_only=True)
    flat = {k: v for k, v in state["config"].items() if k != "sampling"}
    flat.update({("cfg" if k == "cfg_weight" else k): v for k, v in state["config"]["sampling"].items()},
                cfg=3.0, max_plan_tokens=5)
    torch.save({**state, "config": flat}, state_file)
    cfg = T.parse_args(["--out", str(tmp_path / "a"), "--resume", "--text-top-k", "3"])
    assert (cfg.sampling.cfg_weight, cfg.sampling.max_plan_tokens, cfg.sampling.text_top_k) == (3.0, 5, 3)
    assert cfg.ckpt == random_base and cfg.steps == 3
    torch.save({**state, "config": {**state["config"], "no_such_setting": 1}}, state_file)
    with pytest.raises(ValueError, match="train_state.pt: its saved settings do not fit.*no_such_setting"):
        T.parse_args(["--out", str(tmp_path / "a"), "--resume"])


# ---- bench.py, and the command line of every script ----------------------------------------------------------------


def test_bench_train_measures_steps_on_random_weights(capsys):
    import argparse
    import bench
    args = argparse.Namespace(preset="tiny", steps=2, group_size=4, prompts_per_step=2, micro_batch=4,
                              max_plan_tokens=6, lora_rank=4, grad_checkpointing=True, compile=False, device="cpu",
                              dtype="bfloat16")
    bench.bench_train(args)
    row = capsys.readouterr().out.strip().splitlines()[-1].split("|")
    assert row[1].strip() == "tiny" and row[2].strip() == "LoRA rank 4, bfloat16" and row[3].strip() == "4 x 2"
    sec, roll, peak = (float(x) for x in row[5:8])
    assert 0 < roll <= sec and peak > 0


@pytest.mark.parametrize("lora", [False, True])
def test_bench_memory_counts_the_weights_train_py_holds(random_base, redness, tmp_path, lora, capsys):
    """bench.py memory's weight rows are the bytes train.py's models hold under bf16 (trained float32 weights,
    frozen bf16 ones, the bf16 reference), and its table prints a peak per plan length."""
    import bench
    cfg = T.resolve_defaults(T.parse_args(train_args(random_base, tmp_path / "run", *BF16,
                                                     *(["--lora-rank", "4"] if lora else []))))
    run = T.start_run(T.prepare(cfg, log=lambda *a: None), log=lambda *a: None)
    est = bench.memory_estimate(run.policy.cfg, lora_rank=4 if lora else 0)
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps) / 2**30
    params = list(run.policy.parameters())
    assert est["trained weights (float32)"] == pytest.approx(nbytes(p for p in params if p.requires_grad))
    assert est["frozen weights (bf16)"] == pytest.approx(nbytes(p for p in params if not p.requires_grad))
    assert est["KL reference (bf16)"] == pytest.approx(0 if lora else nbytes(run.ref.parameters()))
    bench.bench_memory(bench.build_parser().parse_args(["memory", "--preset", "janus-pro-7b", "--lora-rank", "64"]))
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| **peak")]
    assert len(rows) == 2 and all(0 < float(x) < 40 for row in rows for x in row[2:4])


def test_bench_gpu_prints_every_part_and_a_failing_column_leaves_the_others(capsys, monkeypatch):
    """`bench.py gpu` end to end on CPU with everything shrunk, so that README's GPU command cannot rot; the
    transformers column fails (as transformers' own Janus generate has), and every other figure still comes."""
    import bench

    def broken(*a):
        raise TypeError("_prepare_static_cache() missing 1 required positional argument")
    monkeypatch.setattr(bench, "build_hf", broken)
    shapes_flags = "--steps 1 --prompts-per-step 1 --group-size 2 --eval-n 1 --no-test-eval --sample-every 0"
    args = bench.build_parser().parse_args(
        ["gpu", "--device", "cpu", "--preset", "tiny", "--batch", "1", "--backend", "aot_eager", "--hf",
         "--full-preset", "tiny", "--lora-preset", "tiny", "--lora-rank", "4", "--group-size", "2",
         "--max-plan-tokens", "4", f"--shapes-flags={shapes_flags}"])
    bench.bench_gpu(args)
    out = capsys.readouterr().out
    assert "transformers' Janus: failed: TypeError: _prepare_static_cache()" in out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| batch")}
    eager, compiled, hf, images, floor, step, ratio = rows["1"]
    assert hf == "failed" and float(eager) > 0 and float(compiled) > 0
    assert float(step) / float(floor) == pytest.approx(float(ratio), rel=0.02) and float(ratio) > 1
    full, lora = [line for line in out.splitlines() if line.startswith("| tiny |")]
    for line, what in ((full, "full fine-tune"), (lora, "LoRA rank 4")):
        cells = [c.strip() for c in line.split("|")[2:-1]]
        assert cells[0] == f"{what}, float32" and all(float(c) > 0 for c in cells[1:])
    assert float(rows[f"`python train.py {shapes_flags}`"][0]) > 0


def test_every_flag_of_every_script_has_a_help_line_with_its_default(tmp_path):
    import argparse
    import bench

    def parsers(p):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from parsers(sub)
    seen = 0
    for script in (T, SA, bench, S):
        for p in parsers(script.build_parser()):
            fmt = p._get_formatter()
            for a in p._actions:
                if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                    continue
                text = fmt._expand_help(a) if a.help else ""
                assert a.help and "(default: " in text, (p.prog, a.dest, text)
                # argparse reads a bare % as a format code: "a few % after" came out garbled
                assert "%" not in re.sub(r"%\(\w+\)s", "", fmt._get_help_string(a)), (p.prog, a.dest, a.help)
                seen += 1
    assert seen > 80
    # one name per idea across the scripts
    flags = {s: {o for a in s.build_parser()._actions for o in a.option_strings} for s in (T, SA)}
    for both in ("--rewards", "--reward-ckpt", "--rollout-batch", "--levels", "--dtype", "--text-top-k",
                 "--max-plan-tokens", "--chat-format", "--reasoning-prompt", "--device", "--seed", "--out"):
        assert all(both in f for f in flags.values()), both
    assert not ({"--score", "--no-cot", "--batch-size"} & flags[SA])
    assert bench.build_parser().parse_args(["speed", "--preset", "cpu-768"]).preset == "cpu-768"
    assert "a few percent after ~20 s of compiling" in " ".join(T.build_parser().format_help().split())
    # the examples of sample.py's help read files that exist once the command before them has run
    written = [os.path.relpath(f) for f in S.write_prompt_sets(os.path.join(tmp_path, "data", "shapes"))]
    examples = [e for e in re.findall(r"--prompts (\S+\.jsonl)", SA.__doc__) if "/" in e]  # not a user's own file
    assert examples and all(os.path.join(os.path.relpath(tmp_path), e) in written for e in examples), examples
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert bench.cpu_name().endswith(", 1 thread")
    torch.set_num_threads(threads)
