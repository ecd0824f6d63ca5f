"""Tests of model.py (and kernels.py): the Janus-Pro decoder, its CPU kernels, cache, tokenizer, and its
fidelity to transformers' Janus port and deepseek's own code (those skip when the references are absent).
"""

import os

import pytest
import torch
import torch.nn.functional as F

import checkpoints as C
import kernels as K
import model as M
import t2i_r1 as R
import train as T
from conftest import make_word_tokenizer, tiny_hf_janus, tiny_model


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
