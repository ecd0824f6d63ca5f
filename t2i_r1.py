"""T2I-R1's method on Janus-Pro: the two-level chain of thought and the BiCoT-GRPO objective.

Sampling (inference and rollouts):
  1. semantic level: the model answers a reasoning request about the prompt with a short plan, sampled
     from the text head (`generate_text`);
  2. token level: the image prompt "{prompt}. {plan}" in the chat format, then 576 image tokens sampled
     from the image head with classifier-free guidance (`generate_images`).
Both prefill once into a static KV cache and then run a one-token decode step, which `compile=True`
wraps in torch.compile(fullgraph=True); several samples of one prompt share its prefill.

Departures from the paper's code:
- the reasoning request is our own wording (T2I-R1's file is accepted as it is, see `load_reasoning_prompt`);
  the chat around it is T2I-R1's by default (its system prompt, roles User/Assistant, `CHAT_FORMATS`);
- conditional and unconditional rows are stacked ([cond; uncond]) rather than interleaved: the same
  arithmetic, simpler indexing;
- prompts of different lengths are batched with left padding and an attention mask (the reference
  generates one prompt at a time);
- guidance weight 1 skips the unconditional rows, since u + 1 * (c - u) = c.
"""

import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from model import Janus, Tokenizer, chat_prompt, image_prompt

# Our wording of the semantic-level request; {prompt} is replaced by the user's prompt. T2I-R1's own request
# is a file in its repository (data/prompt/reasoning_prompt.txt, placeholder {}): pass it with --reasoning-prompt.
REASONING_PROMPT = (
    "You will draw an image for the prompt below. First write its plan: every object the prompt names, "
    "each with the attributes the prompt gives it (color, number, shape, texture, size) and the relations "
    "the prompt states between them (where each one is, what they do). Use at most 50 words, add nothing "
    "the prompt does not say, and write the description alone, without any preamble.\nPrompt: {prompt}")
PLACEHOLDERS = ("{prompt}", "{}")  # ours, and T2I-R1's (it fills its template with str.format(prompt))


def load_reasoning_prompt(path=None, ckpt=None) -> str:
    """The reasoning template: an explicit file, else the checkpoint's own `reasoning_prompt.txt`, else ours.
    The template holds the prompt's place with {prompt} or, as T2I-R1's file does, with {}."""
    if path is None and ckpt is not None and os.path.isfile(os.path.join(ckpt, "reasoning_prompt.txt")):
        path = os.path.join(ckpt, "reasoning_prompt.txt")
    if path is None:
        return REASONING_PROMPT
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reasoning prompt file {path} not found")
    with open(path) as f:
        text = f.read().strip()  # T2I-R1 strips the filled request too, so edges never matter
    found = [p for p in PLACEHOLDERS if p in text]
    if len(found) != 1:
        raise ValueError(f"reasoning prompt file {path} must hold the prompt's place with exactly one kind of "
                         f"placeholder, {{prompt}} or {{}}; found {found or 'none'}")
    return text


def fill_request(template: str, prompt: str) -> str:
    """The reasoning request for one prompt (a plain replace: other braces in the template stay as written)."""
    key = next(p for p in PLACEHOLDERS if p in template)
    return template.replace(key, prompt)


@dataclass(frozen=True)
class ChatFormat:
    """How requests are wrapped in deepseek's SFT layout, `[system\n\n]{user}: {text}\n\n{assistant}:`.
    The plan request may carry a system prompt; the image request never does."""
    user: str
    assistant: str
    plan_system: str = ""
    raw_join: bool = False  # image text f"{prompt}. {plan as decoded}" (T2I-R1); else one period, plan stripped

    def request_text(self, template: str, prompt: str) -> str:
        return chat_prompt(fill_request(template, prompt).strip(), self.plan_system, self.user, self.assistant)

    def image_text(self, prompt: str, plan: str = None) -> str:
        """The image request (ending with <begin_of_image>) for a prompt and its decoded plan (None: no plan)."""
        if plan is None:
            text = prompt.strip()
        elif self.raw_join:
            text = f"{prompt}. {plan}".strip()  # an empty plan leaves "{prompt}.", as in T2I-R1
        else:
            text = image_prompt_text(prompt, plan)
        return image_prompt(text, user=self.user, assistant=self.assistant)


CHAT_FORMATS = {
    # T2I-R1's trainer and inference script: this system prompt before the plan request, roles named User and
    # Assistant in both requests, the image request "{prompt}. {plan}" with the plan as decoded
    "t2i-r1": ChatFormat("User", "Assistant", raw_join=True, plan_system=(
        "You are a helpful assistant that receives an image prompt and generate a visualization of the prompt.")),
    # Janus-Pro's demos, and the format the shapes world's base was pretrained on
    "janus": ChatFormat("<|User|>", "<|Assistant|>"),
}


def default_chat_format(ckpt=None) -> str:
    """A checkpoint that carries its own reasoning_prompt.txt (the shapes world's base, and runs trained from
    it) was trained on that request in Janus-Pro's format ("janus"); any other (Janus-Pro, T2I-R1's release,
    runs from them) is asked as T2I-R1 asks ("t2i-r1")."""
    own = ckpt is not None and os.path.isfile(os.path.join(os.path.expanduser(ckpt), "reasoning_prompt.txt"))
    return "janus" if own else "t2i-r1"


# Sampling defaults per kind of checkpoint, for the flags sample.py and train.py leave unset. text_top_k 0: off.
MODEL_DEFAULTS = {
    # a model trained on its own request (the shapes world): short plans (a few words each object), plain sampling
    # and a light guidance weight: its image logits are sharp (one code per cell content), and at Janus-Pro's
    # w = 5 the guided logits u + w (c - u) mix pieces of different objects (README, the shapes world)
    "janus": dict(chat_format="janus", max_plan_tokens=64, text_top_k=0, cfg=2.0),
    # Janus-Pro as T2I-R1 samples it: plans of up to 1024 tokens (its max_completion_length; its plans average
    # about 97, so a shorter cap would cut many before EOS), drawn with transformers' generate defaults for an
    # unset generation config: temperature 1, top-k 50
    "t2i-r1": dict(chat_format="t2i-r1", max_plan_tokens=1024, text_top_k=50, cfg=5.0),
}


def sampling_defaults(ckpt=None) -> dict:
    """chat_format, max_plan_tokens, text_top_k and cfg for a checkpoint folder (see default_chat_format)."""
    return dict(MODEL_DEFAULTS[default_chat_format(ckpt)])


def chat_format(chat) -> ChatFormat:
    if isinstance(chat, ChatFormat):
        return chat
    if chat not in CHAT_FORMATS:
        raise ValueError(f"chat format must be one of {', '.join(CHAT_FORMATS)}, got {chat!r}")
    return CHAT_FORMATS[chat]


# -----------------------------------------------------------------------------
# token sampling


def sample_from_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) float32 -> tokens (B,). Temperature 0 means argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already reaches top_p
        drop[:, 0] = False                       # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(seqs, pad_id, device=None):
    """list of token lists -> ids (B, T) left-padded with pad_id, mask (B, T) True on real tokens."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = True
    return ids.to(device), mask.to(device)


def unconditional(ids, pad_id):
    """Janus-Pro's unconditional prompt: every token but the first (BOS) and last (<begin_of_image>) -> pad."""
    return [ids[0]] + [pad_id] * (len(ids) - 2) + [ids[-1]] if len(ids) > 2 else list(ids)


# -----------------------------------------------------------------------------
# decode steps (the only code torch.compile sees)


def text_step(janus: Janus, tokens, cache, input_pos, positions, mask, kv_len=None):
    """tokens (B,) fed at slot input_pos (1,) -> next-token logits (B, vocab) float32. kv_len: see Janus.forward."""
    h = janus(janus.embed_text(tokens[:, None]), positions=positions, mask=mask, cache=cache, input_pos=input_pos,
              kv_len=kv_len)
    return janus.text_logits(h[:, -1])


def image_step(janus: Janus, codes, cache, input_pos, positions, mask, cfg_weight, kv_len=None):
    """codes (B,) fed to the conditional and the unconditional rows -> guided logits (B, codebook) float32.

    Rows of the cache are [cond (B); uncond (B)], or only cond when there is no guidance (cfg_weight None).
    """
    rows = codes if cfg_weight is None else torch.cat([codes, codes])
    h = janus(janus.embed_image(rows[:, None]), positions=positions, mask=mask, cache=cache, input_pos=input_pos,
              kv_len=kv_len)
    return guide(janus.image_logits(h[:, -1]), cfg_weight)


def guide(logits, cfg_weight):
    """Classifier-free guidance on raw logits: u + w (c - u), rows stacked as [cond; uncond]."""
    if cfg_weight is None:
        return logits
    cond, uncond = logits.chunk(2)
    return uncond + cfg_weight * (cond - uncond)


_compiled = {}


def decode_fn(step, compile, device):
    """The eager step, or its torch.compile(fullgraph=True) version; `compile` may name a backend.

    On a GPU the graph attends to every slot of the static cache: CUDA graphs, which remove the per-kernel
    launch cost that dominates one-token steps there, need fixed shapes. On CPU the attended length (kv_len)
    stays symbolic (dynamic=True), so one graph serves every position and skips the empty tail of the cache
    as eager steps do. The samplers run their first step eagerly even when compiling: on CPU that step
    measures the linear layers' matmul kernels (model.Linear), which the compiled graph then takes."""
    if not compile:
        return step
    backend = compile if isinstance(compile, str) else "inductor"
    cuda = torch.device(device).type == "cuda"
    key = (step.__name__, backend, cuda)
    if key not in _compiled:
        mode = "reduce-overhead" if backend == "inductor" and cuda else None
        _compiled[key] = torch.compile(step, backend=backend, mode=mode, fullgraph=True, dynamic=not cuda)
    return _compiled[key]


def _prefill(janus, ids, mask, extra):
    """Run the prompt through a fresh cache with room for `extra` more tokens; return (h_last, cache, mask)."""
    B, T = ids.shape
    cache = janus.new_cache(B, T + extra)
    full_mask = torch.cat([mask, torch.ones(B, extra, dtype=torch.bool, device=ids.device)], 1)  # (B, T+extra)
    h = janus(janus.embed_text(ids), mask=full_mask, cache=cache, input_pos=torch.arange(T, device=ids.device),
              kv_len=T)
    return h[:, -1:], cache, full_mask


# -----------------------------------------------------------------------------
# semantic level: the plan


@torch.no_grad()
def generate_text(janus: Janus, prompts, *, eos_id, pad_id, n=1, max_new_tokens=96, temperature=1.0,
                  top_k=None, top_p=None, generator=None, compile=False):
    """Sample n continuations of each prompt (token lists, BOS included). Returns len(prompts) * n token
    lists (sample j of prompt i at i * n + j), each ending with EOS unless max_new_tokens cut it short."""
    device = janus.language_model.lm_head.weight.device
    ids, mask = left_pad(prompts, pad_id, device)
    B, T = ids.shape
    h, cache, mask = _prefill(janus, ids, mask, max_new_tokens)
    logits = janus.text_logits(h[:, -1])
    if n > 1:  # one prefill, n samples
        cache, mask, logits = cache.repeat_rows(n), mask.repeat_interleave(n, 0), logits.repeat_interleave(n, 0)
    lengths = mask[:, :T].sum(1, keepdim=True)  # (B*n, 1) real prompt lengths
    step = decode_fn(text_step, compile, device)
    static = compile and device.type == "cuda"  # a compiled GPU step attends to the whole cache (decode_fn)
    out = torch.full((B * n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B * n, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        tok = sample_from_logits(logits, temperature, top_k, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)  # finished rows: filler, cut below
        out[:, i] = tok
        done |= tok == eos_id
        if i == max_new_tokens - 1 or (i % 8 == 7 and bool(done.all())):  # a host sync every 8 tokens only
            break
        pos = torch.tensor([T + i], device=device)
        kv_len = None if static and i > 0 else T + i + 1  # eager steps attend to the filled slots only
        logits = (step if i > 0 else text_step)(janus, tok, cache, pos, lengths + i, mask, kv_len)
    # each row ends at its first EOS (inclusive), else after max_new_tokens: only filler follows an EOS. Rows
    # are cut there, never filtered by token value: a plan may sample the pad token, and dropping it would
    # score the plan later under another context than the one it was sampled in.
    return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in out.tolist()]


# -----------------------------------------------------------------------------
# token level: the image


@torch.no_grad()
def generate_images(janus: Janus, prompts, *, pad_id, n=1, cfg_weight=5.0, temperature=1.0, top_k=None,
                    generator=None, compile=False, progress=None):
    """Sample n images (VQ codes) per image prompt (token lists ending with <begin_of_image>) with
    classifier-free guidance. Returns codes (len(prompts) * n, image_tokens), sample j of prompt i at i * n + j."""
    device = janus.language_model.lm_head.weight.device
    N = janus.cfg.image_tokens
    guided = cfg_weight is not None and cfg_weight != 1.0
    rows = list(prompts) + ([unconditional(p, pad_id) for p in prompts] if guided else [])
    ids, mask = left_pad(rows, pad_id, device)
    R, T = ids.shape
    h, cache, mask = _prefill(janus, ids, mask, N)
    logits = guide(janus.image_logits(h[:, -1]), cfg_weight if guided else None)
    if n > 1:
        cache, mask, logits = cache.repeat_rows(n), mask.repeat_interleave(n, 0), logits.repeat_interleave(n, 0)
    lengths = mask[:, :T].sum(1, keepdim=True)  # (R*n, 1)
    w = torch.tensor(float(cfg_weight), device=device) if guided else None
    step = decode_fn(image_step, compile, device)
    static = compile and device.type == "cuda"
    codes = torch.empty(len(prompts) * n, N, dtype=torch.long, device=device)
    for i in range(N):
        codes[:, i] = sample_from_logits(logits, temperature, top_k, None, generator)
        if i < N - 1:
            pos = torch.tensor([T + i], device=device)
            kv_len = None if static and i > 0 else T + i + 1
            logits = (step if i > 0 else image_step)(janus, codes[:, i], cache, pos, lengths + i, mask, w, kv_len)
        if progress is not None:
            progress(i + 1, N)
    return codes


# -----------------------------------------------------------------------------
# both levels


@dataclass
class Samples:
    """Sample k of prompt i sits at row i * n + k of every field."""
    prompts: list                                        # the user prompt of each sample
    plans: list                                          # plan text ("" without the semantic level)
    reasoning_ids: list = field(default_factory=list)    # the reasoning request's tokens
    plan_ids: list = field(default_factory=list)         # the plan's tokens (with EOS when it ended)
    image_prompt_ids: list = field(default_factory=list)  # "{prompt}. {plan}" in the chat format + <begin_of_image>
    codes: torch.Tensor = None                           # (B*n, image_tokens)


def image_prompt_text(prompt: str, plan: str) -> str:
    """The "janus" format's image text: the prompt, one period, the plan (T2I-R1 doubles a final period)."""
    plan = plan.strip()
    return f"{prompt.strip().rstrip('.')}. {plan}" if plan else prompt.strip()


@torch.no_grad()
def sample_t2i(janus: Janus, tok: Tokenizer, prompts, *, n=1, cot=True, reasoning_prompt=REASONING_PROMPT,
               chat="t2i-r1", cfg_weight=5.0, temperature=1.0, top_k=None, text_temperature=1.0, text_top_k=None,
               text_top_p=None, max_plan_tokens=96, generator=None, compile=False, progress=None) -> Samples:
    """T2I-R1 sampling for a batch of prompts: n plans per prompt, one image per plan (or, with cot=False,
    n images per prompt from the prompt alone, sharing one prefill). chat: a CHAT_FORMATS name or a
    ChatFormat, how both requests are written."""
    fmt = chat_format(chat)
    for p in prompts:
        if not p or not p.strip():
            raise ValueError("empty prompt")
    rep = [p for p in prompts for _ in range(n)]
    if cot:
        requests = [tok.encode(fmt.request_text(reasoning_prompt, p)) for p in prompts]
        plan_ids = generate_text(janus, requests, eos_id=tok.eos_id, pad_id=tok.pad_id, n=n,
                                 max_new_tokens=max_plan_tokens, temperature=text_temperature, top_k=text_top_k or None,
                                 top_p=text_top_p, generator=generator, compile=compile)
        decoded = [tok.decode(ids) for ids in plan_ids]
        plans = [d.strip() for d in decoded]
        reasoning_ids = [r for r in requests for _ in range(n)]
        image_ids = [tok.encode(fmt.image_text(p, d)) for p, d in zip(rep, decoded)]
        codes = generate_images(janus, image_ids, pad_id=tok.pad_id, n=1, cfg_weight=cfg_weight,
                                temperature=temperature, top_k=top_k, generator=generator, compile=compile,
                                progress=progress)
    else:
        plans, plan_ids, reasoning_ids = [""] * len(rep), [[] for _ in rep], [[] for _ in rep]
        distinct = [tok.encode(fmt.image_text(p)) for p in prompts]
        image_ids = [d for d in distinct for _ in range(n)]
        codes = generate_images(janus, distinct, pad_id=tok.pad_id, n=n, cfg_weight=cfg_weight,
                                temperature=temperature, top_k=top_k, generator=generator, compile=compile,
                                progress=progress)
    return Samples(prompts=rep, plans=plans, reasoning_ids=reasoning_ids, plan_ids=plan_ids,
                   image_prompt_ids=image_ids, codes=codes)


# -----------------------------------------------------------------------------
# progress of long stages (sampling, evaluation, scoring, pretraining), on stderr


class Progress:
    """On a terminal, one line rewritten in place every `every` seconds; otherwise (a log file, CI) whole
    lines, at most one every `every_line` seconds, and always the last."""

    def __init__(self, total, desc="", stream=None, every=0.5, every_line=30.0):
        self.total, self.desc, self.stream = total, desc, stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if self.tty else every_line
        self.t0 = self.last = time.time()
        self.n = 0

    def update(self, k=1, note=""):
        self.n += k
        now = time.time()
        if now - self.last >= self.every or self.n >= self.total:
            self.last = now
            rate = self.n / max(now - self.t0, 1e-9)
            eta = (self.total - self.n) / max(rate, 1e-9)
            line = f"{self.desc} {self.n}/{self.total} [{now - self.t0:.0f}s, eta {eta:.0f}s] {note}".rstrip()
            if self.tty:
                self.stream.write("\r" + line + ("\n" if self.n >= self.total else ""))
            else:
                self.stream.write(line + "\n")
            self.stream.flush()


# -----------------------------------------------------------------------------
# BiCoT-GRPO: advantages, log-probabilities, loss


def group_advantages(rewards, group_size):
    """rewards (B,) in groups of group_size consecutive samples -> (r - group mean) / (group std + 1e-4),
    unbiased std, float32. A group whose rewards are all equal gets exactly zero advantage (never NaN)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"non-finite rewards at samples {bad}: {rewards[bad].tolist()}")
    # float64: a float32 mean of equal values rounds (0.1 x 8 gives a mean 1 ulp off, and A = -7e-5 for
    # every sample of a flat group); flat groups are also zeroed explicitly, whatever the rounding
    r = rewards.double().view(-1, group_size)                        # (groups, G)
    std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    adv = (r - r.mean(1, keepdim=True)) / (std + 1e-4)
    flat = (r == r[:, :1]).all(1, keepdim=True)                      # (groups, 1)
    return adv.masked_fill(flat, 0.0).float().view(-1)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.01, norm="token", n_total=None):
    """The clipped GRPO objective with the k3 KL estimator, per token:
        -( min(r A, clip(r, 1 - eps, 1 + eps) A) - beta * k3 ),  r = exp(logp - old_logp),
        k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1.
    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,).
    norm="token": one masked mean over every token (T2I-R1); "sequence": mean per sequence, then over
    sequences (the GRPO paper). n_total, when given, replaces the local count of tokens (token) or of
    sequences (sequence) in the denominator: pass the whole batch's count and micro-batches add up to
    the same loss and gradient whatever their size. Returns (loss, stats)."""
    mask = mask.to(logp.dtype)
    A = advantages.to(logp.dtype)[:, None]                           # (B, 1)
    ratio = torch.exp(logp - old_logp)                               # (B, T)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    surrogate = torch.minimum(ratio * A, clipped * A)
    d = ref_logp - logp
    k3 = torch.exp(d) - d - 1                                        # >= 0, unbiased for KL(pi || ref)
    per_token = -(surrogate - beta * k3)                             # (B, T)
    if norm == "token":
        denom = mask.sum() if n_total is None else torch.as_tensor(float(n_total))
        loss = (per_token * mask).sum() / denom.clamp(min=1)
    elif norm == "sequence":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        count = (mask.sum(1) > 0).sum() if n_total is None else torch.as_tensor(float(n_total))
        loss = per_seq.sum() / count.clamp(min=1)
    else:
        raise ValueError(f"norm must be 'token' or 'sequence', got {norm!r}")
    with torch.no_grad():
        m, n = mask.bool(), mask.sum().clamp(min=1)
        is_clipped = ((ratio < 1 - clip_eps) & (A < 0)) | ((ratio > 1 + clip_eps) & (A > 0))
        r = ratio[m] if m.any() else torch.ones(1)
        stats = {"kl": float((k3 * mask).sum() / n), "clip_frac": float((is_clipped & m).sum() / n),
                 "ratio_min": float(r.min()), "ratio_max": float(r.max()), "tokens": int(mask.sum())}
    return loss, stats


def _selected_logprobs(head, h, targets, temperature):
    logits = head(h)
    if temperature not in (0, 1):
        logits = logits / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def chunked_logprobs(head, h, targets, temperature=1.0, chunk_bytes=2**28):
    """h (M, H) hidden states, targets (M,) -> log p(target) (M,) under head(h) (float32 logits), a chunk of
    rows at a time; under autograd each chunk is recomputed in backward, so no (M, vocab) tensor is ever
    kept. The head is probed once for its vocabulary size."""
    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=torch.float32)
    vocab = head(h[:1]).shape[-1]
    rows = max(1, chunk_bytes // (4 * vocab))
    out = []
    for i in range(0, h.shape[0], rows):
        hc, tc = h[i:i + rows], targets[i:i + rows]
        if torch.is_grad_enabled() and hc.requires_grad:
            out.append(checkpoint(_selected_logprobs, head, hc, tc, temperature, use_reentrant=False))
        else:
            out.append(_selected_logprobs(head, hc, tc, temperature))
    return torch.cat(out)


def completion_logprobs(janus: Janus, prompts, completions, kind, *, pad_id, uncond_prompts=None,
                        cfg_weight=None, temperature=1.0):
    """Log-probabilities of completion tokens after their prompts, in one forward.

    prompts: token lists (left-padded here); completions: token lists (right-padded here), plan tokens
    for kind="text", VQ codes for kind="image". With uncond_prompts and cfg_weight (images only) the
    log-probs are under the guided distribution u + w (c - u) that sampling used. Returns logp (B, L)
    float32 (0 on padding) and mask (B, L)."""
    device = janus.language_model.lm_head.weight.device
    P_ids, P_mask = left_pad(prompts, pad_id, device)
    B, P = P_ids.shape
    L = max(1, max(len(c) for c in completions))
    C = torch.full((B, L), 0, dtype=torch.long, device=device)
    C_mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    for i, c in enumerate(completions):
        C[i, :len(c)] = torch.as_tensor(c, dtype=torch.long)
        C_mask[i, :len(c)] = True
    embed = janus.embed_text if kind == "text" else janus.embed_image
    head = janus.text_logits if kind == "text" else janus.image_logits

    def hidden(ids, mask):  # (R, L, H), R a multiple of B: the states that predict each completion token
        n = ids.shape[0] // B
        x = torch.cat([janus.embed_text(ids), embed(C[:, :-1]).repeat(n, 1, 1)], 1)  # the last token is never an input
        h = janus(x, mask=torch.cat([mask, C_mask[:, :-1].repeat(n, 1)], 1))
        return h[:, P - 1:]
    targets = C[C_mask]                                                    # (M,)
    if uncond_prompts is not None and cfg_weight is not None and kind == "image":
        U_ids, U_mask = left_pad(uncond_prompts, pad_id, device)
        if U_ids.shape != P_ids.shape:
            raise ValueError("unconditional prompts must have the shapes of the conditional ones")
        # one forward for the conditional and the unconditional rows: half the calls, larger matmuls
        hc, hu = hidden(torch.cat([P_ids, U_ids]), torch.cat([P_mask, U_mask])).chunk(2)
        h = torch.cat([hc[C_mask], hu[C_mask]], -1)                       # (M, 2H)
        H = hc.shape[-1]
        def head(x):
            return guide(janus.image_logits(torch.cat([x[:, :H], x[:, H:]])), cfg_weight)
    else:
        h = hidden(P_ids, P_mask)[C_mask]                                  # (M, H)
    logp = torch.zeros(B, L, dtype=torch.float32, device=device)
    logp[C_mask] = chunked_logprobs(head, h, targets, temperature)
    return logp, C_mask
