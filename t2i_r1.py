"""T2I-R1's method on Janus-Pro: the two-level chain of thought and the BiCoT-GRPO objective.

Sampling (inference and rollouts):
  1. semantic level: the model answers a reasoning request about the prompt with a short plan, sampled
     from the text head (`generate_text`);
  2. token level: the image prompt "{prompt}. {plan}" in the chat format, then 576 image tokens sampled
     from the image head with classifier-free guidance (`generate_images`).
Both prefill once into a static KV cache and then run a one-token decode step, which `compile=True`
wraps in torch.compile(fullgraph=True); several samples of one prompt share its prefill.

Departures from the paper's code:
- the reasoning request is our own wording (replaceable from a file, see `load_reasoning_prompt`);
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
import torch.nn.functional as F

from model import Janus, Tokenizer, chat_prompt, image_prompt

# Our wording of the semantic-level request; {prompt} is replaced by the user's prompt.
REASONING_PROMPT = (
    "You will draw an image for the prompt below. First write its plan: every object the prompt names, "
    "each with the attributes the prompt gives it (color, number, shape, texture, size) and the relations "
    "the prompt states between them (where each one is, what they do). Use at most 50 words, add nothing "
    "the prompt does not say, and write the description alone, without any preamble.\nPrompt: {prompt}")


def load_reasoning_prompt(path=None, ckpt=None) -> str:
    """The reasoning template: an explicit file, else the checkpoint's own `reasoning_prompt.txt`, else ours."""
    if path is None and ckpt is not None and os.path.isfile(os.path.join(ckpt, "reasoning_prompt.txt")):
        path = os.path.join(ckpt, "reasoning_prompt.txt")
    if path is None:
        return REASONING_PROMPT
    with open(path) as f:
        text = f.read().strip()
    if "{prompt}" not in text:
        raise ValueError(f"reasoning prompt file {path} must contain the placeholder {{prompt}}")
    return text


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


def text_step(janus: Janus, tokens, cache, input_pos, positions, mask):
    """tokens (B,) fed at slot input_pos (1,) -> next-token logits (B, vocab) float32."""
    h = janus(janus.embed_text(tokens[:, None]), positions=positions, mask=mask, cache=cache, input_pos=input_pos)
    return janus.text_logits(h[:, -1])


def image_step(janus: Janus, codes, cache, input_pos, positions, mask, cfg_weight):
    """codes (B,) fed to the conditional and the unconditional rows -> guided logits (B, codebook) float32.

    Rows of the cache are [cond (B); uncond (B)], or only cond when there is no guidance (cfg_weight None).
    """
    rows = codes if cfg_weight is None else torch.cat([codes, codes])
    h = janus(janus.embed_image(rows[:, None]), positions=positions, mask=mask, cache=cache, input_pos=input_pos)
    return guide(janus.image_logits(h[:, -1]), cfg_weight)


def guide(logits, cfg_weight):
    """Classifier-free guidance on raw logits: u + w (c - u), rows stacked as [cond; uncond]."""
    if cfg_weight is None:
        return logits
    cond, uncond = logits.chunk(2)
    return uncond + cfg_weight * (cond - uncond)


_compiled = {}


def decode_fn(step, compile):
    """The eager step, or its torch.compile(fullgraph=True) version; `compile` may name a backend."""
    if not compile:
        return step
    backend = compile if isinstance(compile, str) else "inductor"
    key = (step.__name__, backend)
    if key not in _compiled:
        # CUDA graphs remove the per-kernel launch cost that dominates one-token steps on a GPU
        mode = "reduce-overhead" if backend == "inductor" and torch.cuda.is_available() else None
        _compiled[key] = torch.compile(step, backend=backend, mode=mode, fullgraph=True, dynamic=False)
    return _compiled[key]


def _prefill(janus, ids, mask, extra):
    """Run the prompt through a fresh cache with room for `extra` more tokens; return (h_last, cache, mask)."""
    B, T = ids.shape
    cache = janus.new_cache(B, T + extra)
    full_mask = torch.cat([mask, torch.ones(B, extra, dtype=torch.bool, device=ids.device)], 1)  # (B, T+extra)
    h = janus(janus.embed_text(ids), mask=full_mask, cache=cache, input_pos=torch.arange(T, device=ids.device))
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
    step = decode_fn(text_step, compile)
    out = torch.full((B * n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B * n, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        tok = sample_from_logits(logits, temperature, top_k, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out[:, i] = tok
        done |= tok == eos_id
        if i == max_new_tokens - 1 or (i % 8 == 7 and bool(done.all())):  # a host sync every 8 tokens only
            break
        pos = torch.tensor([T + i], device=device)
        logits = step(janus, tok, cache, pos, lengths + i, mask)
    result = []
    for row in out.tolist():
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        result.append([t for t in row[:cut] if t != pad_id])
    return result


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
    step = decode_fn(image_step, compile)
    codes = torch.empty(len(prompts) * n, N, dtype=torch.long, device=device)
    for i in range(N):
        codes[:, i] = sample_from_logits(logits, temperature, top_k, None, generator)
        if i < N - 1:
            pos = torch.tensor([T + i], device=device)
            logits = step(janus, codes[:, i], cache, pos, lengths + i, mask, w)
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
    plan = plan.strip()
    return f"{prompt.strip().rstrip('.')}. {plan}" if plan else prompt.strip()


@torch.no_grad()
def sample_t2i(janus: Janus, tok: Tokenizer, prompts, *, n=1, cot=True, reasoning_prompt=REASONING_PROMPT,
               cfg_weight=5.0, temperature=1.0, top_k=None, text_temperature=1.0, text_top_k=None,
               text_top_p=None, max_plan_tokens=96, generator=None, compile=False, progress=None) -> Samples:
    """T2I-R1 sampling for a batch of prompts: n plans per prompt, one image per plan (or, with cot=False,
    n images per prompt from the prompt alone, sharing one prefill)."""
    for p in prompts:
        if not p or not p.strip():
            raise ValueError("empty prompt")
    rep = [p for p in prompts for _ in range(n)]
    if cot:
        requests = [tok.encode(chat_prompt(reasoning_prompt.format(prompt=p))) for p in prompts]
        plan_ids = generate_text(janus, requests, eos_id=tok.eos_id, pad_id=tok.pad_id, n=n,
                                 max_new_tokens=max_plan_tokens, temperature=text_temperature, top_k=text_top_k,
                                 top_p=text_top_p, generator=generator, compile=compile)
        plans = [tok.decode(ids).strip() for ids in plan_ids]
        reasoning_ids = [r for r in requests for _ in range(n)]
        image_ids = [tok.encode(image_prompt(image_prompt_text(p, plan))) for p, plan in zip(rep, plans)]
        codes = generate_images(janus, image_ids, pad_id=tok.pad_id, n=1, cfg_weight=cfg_weight,
                                temperature=temperature, top_k=top_k, generator=generator, compile=compile,
                                progress=progress)
    else:
        plans, plan_ids, reasoning_ids = [""] * len(rep), [[] for _ in rep], [[] for _ in rep]
        distinct = [tok.encode(image_prompt(image_prompt_text(p, ""))) for p in prompts]
        image_ids = [d for d in distinct for _ in range(n)]
        codes = generate_images(janus, distinct, pad_id=tok.pad_id, n=n, cfg_weight=cfg_weight,
                                temperature=temperature, top_k=top_k, generator=generator, compile=compile,
                                progress=progress)
    return Samples(prompts=rep, plans=plans, reasoning_ids=reasoning_ids, plan_ids=plan_ids,
                   image_prompt_ids=image_ids, codes=codes)


# -----------------------------------------------------------------------------
# a progress line for long runs (stderr, one line, rewritten in place)


class Progress:
    def __init__(self, total, desc="", stream=sys.stderr, every=0.5):
        self.total, self.desc, self.stream, self.every = total, desc, stream, every
        self.t0 = self.last = time.time()
        self.n = 0

    def update(self, k=1, note=""):
        self.n += k
        now = time.time()
        if now - self.last >= self.every or self.n >= self.total:
            self.last = now
            rate = self.n / max(now - self.t0, 1e-9)
            eta = (self.total - self.n) / max(rate, 1e-9)
            self.stream.write(f"\r{self.desc} {self.n}/{self.total} [{now - self.t0:.0f}s, eta {eta:.0f}s] {note}")
            if self.n >= self.total:
                self.stream.write("\n")
            self.stream.flush()
