"""Tests of t2i_r1.py, the method: the two-step sampler and the BiCoT-GRPO objective.

Run every test file: python -m pytest -q
"""

import collections
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import fast_decode as FD
import kernels as K
import model as M
import settings as ST
import t2i_r1 as R
import train as T
from conftest import PAD, image_prompts, make_word_tokenizer, real, settings, tiny_model


def gen_images(m, prompts, **kw):
    """generate_images on token lists (left-padded here)."""
    return R.generate_images(m, *R.pad_tokens(prompts, PAD), pad_id=PAD, **kw)


def gen_text(m, prompts, pad_id=PAD, **kw):
    """generate_text on token lists -> each plan as a token list (its real tokens)."""
    ids, mask = R.generate_text(m, *R.pad_tokens(prompts, pad_id), pad_id=pad_id, **kw)
    return [row[:k] for row, k in zip(ids.tolist(), mask.sum(1).tolist())]


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


@pytest.mark.parametrize("image_positions", [False, True])
def test_greedy_guided_generation_equals_plain_forwards(image_positions):
    """Cached decoding equals full forwards; with image_positions, each decode step finds its code's grid cell
    from its cache slot (the full forward numbers the cells 0..T-1)."""
    m = tiny_model(image_positions=image_positions)
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


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [None, "oneDNN"])
def test_compiled_decode_step_equals_eager(monkeypatch, kernel):
    """The compiled steps (one graph for every position on CPU) sample what the eager ones sample, also
    with the linear layers pinned to oneDNN, which a graph calls through an op of our own."""
    if kernel == "oneDNN" and not K.ONEDNN:
        pytest.skip("oneDNN's matmul is not available here")
    monkeypatch.setattr(K, "CPU_KERNEL", kernel)
    torch._dynamo.reset()
    m = tiny_model(image_positions=True)  # the cell of a step comes from its slot, a tensor in the graph
    prompts = image_prompts(m, lengths=(6, 8))
    for compile in (False, "aot_eager"):
        g = torch.Generator().manual_seed(0)
        out = (gen_images(m, prompts, n=2, cfg_weight=5.0, generator=g, compile=compile),
               gen_text(m, prompts, eos_id=-1, max_new_tokens=5, generator=g, compile=compile))
        if compile:
            assert torch.equal(out[0], eager[0]) and out[1] == eager[1]
        eager = out


@pytest.mark.parametrize("image_positions", [False, True])
def test_left_padding_does_not_change_samples(image_positions):
    """Static decoding pads prompts on the left up to a bucket's width: masked slots change no sample (nor the
    grid cell an image step reads from its slot)."""
    m = tiny_model(image_positions=image_positions)
    ids, mask = R.pad_tokens(image_prompts(m, lengths=(6, 9)), PAD)
    wide = F.pad(ids, (7, 0), value=PAD), F.pad(mask, (7, 0), value=False)  # (2, 16)
    out = []
    for ids_, mask_ in ((ids, mask), wide):
        g = torch.Generator().manual_seed(0)
        plans = R.generate_text(m, ids_, mask_, eos_id=-1, pad_id=PAD, n=2, max_new_tokens=5, generator=g)
        out.append((R.generate_images(m, ids_, mask_, pad_id=PAD, n=2, cfg_weight=5.0, generator=g), *plans))
    assert all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.slow
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
