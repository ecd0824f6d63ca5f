"""T2I-R1's method on Janus-Pro: the two-level chain of thought and the BiCoT-GRPO objective.

Sampling (inference and rollouts):
  1. semantic level: the model answers a reasoning request about the prompt with a short plan, sampled
     from the text head (`generate_text`);
  2. token level: the image prompt "{prompt}. {plan}" in the chat format, then 576 image tokens sampled
     from the image head with classifier-free guidance (`generate_images`).
Both prefill once into a static KV cache and then run a one-token decode step, which `compile=True`
wraps in torch.compile(fullgraph=True) (fast_decode.py); several samples of one prompt share its prefill.
How they sample is one `SamplingConfig`; what they produce is one `Rollout` of tensors, which carries each
sample's reward and advantage on to the loss.

Training (BiCoT-GRPO): group-normalised advantages (`group_advantages`), the log-probabilities of the plan
and the image tokens side by side under one advantage (`rollout_logprobs`), the clipped objective with a k3
KL term (`grpo_loss`). train.py runs the loop around them.

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
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fast_decode import AllDone, bucket_width, decode_fn, static_cache, static_decode
from model import Janus, Tokenizer, chat_prompt, image_prompt
from settings import setting
from vq import to_uint8

# Our wording of the semantic-level request; {prompt} is replaced by the user's prompt. T2I-R1's own request
# is a file in its repository (data/prompt/reasoning_prompt.txt, placeholder {}): pass it with --reasoning-prompt.
REASONING_PROMPT = (
    "You will draw an image for the prompt below. First write its plan: every object the prompt names, "
    "each with the attributes the prompt gives it (color, number, shape, texture, size) and the relations "
    "the prompt states between them (where each one is, what they do). Use at most 50 words, add nothing "
    "the prompt does not say, and write the description alone, without any preamble.\nPrompt: {prompt}")
PLACEHOLDERS = ("{prompt}", "{}")  # ours, and T2I-R1's (it fills its template with str.format(prompt))


def utf8_lines(path):
    """(line number, text without its newline) for each line of a UTF-8 text file; a byte that is not UTF-8 is
    a ValueError naming the file, the line and the column."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 f"convert the file to UTF-8") from None


def load_reasoning_prompt(path=None, ckpt=None) -> str:
    """The reasoning template: an explicit file, else the checkpoint's own `reasoning_prompt.txt`, else ours.
    The template holds the prompt's place with {prompt} or, as T2I-R1's file does, with {}."""
    own = os.path.join(os.path.expanduser(ckpt), "reasoning_prompt.txt") if ckpt is not None else None
    if path is None and own is not None and os.path.isfile(own):
        path = own
    if path is None:
        return REASONING_PROMPT
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reasoning prompt file {path} not found")
    text = "\n".join(line for _, line in utf8_lines(path)).strip()  # T2I-R1 strips the filled request too
    found = [p for p in PLACEHOLDERS if p in text]
    if len(found) != 1:
        raise ValueError(f"reasoning prompt file {path} must hold the prompt's place with exactly one kind of "
                         f"placeholder, {{prompt}} or {{}}; found {found or 'none'}")
    return text


@dataclass(frozen=True)
class ChatFormat:
    """How requests are wrapped in deepseek's SFT layout, `[system\n\n]{user}: {text}\n\n{assistant}:`.
    The plan request may carry a system prompt; the image request never does."""
    user: str
    assistant: str
    plan_system: str = ""
    raw_join: bool = False  # image text f"{prompt}. {plan as decoded}" (T2I-R1); else one period, plan stripped

    def request_text(self, template: str, prompt: str) -> str:
        """The plan request for one prompt: the template (the text of a reasoning prompt file, not its path)
        filled by a plain replace, so that other braces stay as written."""
        key = next((p for p in PLACEHOLDERS if p in template), None)
        if key is None:
            raise ValueError(f"reasoning template {template!r:.80} holds no {{prompt}} or {{}} placeholder")
        filled = template.replace(key, prompt)
        return chat_prompt(filled.strip(), self.plan_system, self.user, self.assistant)

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


# -----------------------------------------------------------------------------
# sampling settings: one dataclass for sample.py, train.py's rollouts and evaluations, and the shapes world


@dataclass
class SamplingConfig:
    """How plans and images are drawn. Unset (None) settings take the checkpoint's defaults (`resolved`)."""
    cfg_weight: float = setting(None, above=0, flag="--cfg")  # image tokens' guidance (1: none); unset: 5, shapes 2
    temperature: float = setting(1.0, low=0)       # image tokens; 0: argmax
    top_k: int = setting(None, low=1)              # image tokens: keep the k most likely (unset: all, as T2I-R1)
    text_temperature: float = setting(1.0, low=0)  # plan tokens; 0: argmax
    text_top_k: int = setting(None, low=0)         # plan tokens: keep the k most likely, 0: all; unset: 50, shapes 0
    text_top_p: float = setting(None, above=0, high=1)  # plan tokens: nucleus sampling mass (unset: off)
    max_plan_tokens: int = setting(None, low=1)    # plans are cut here; unset: 1024 (T2I-R1's limit), shapes 64
    chat_format: str = setting(None, choices=tuple(CHAT_FORMATS))  # unset: janus if the ckpt has reasoning_prompt.txt
    reasoning_prompt: str = None   # file: the plan request, {prompt} or {} in it; unset: the checkpoint's, else ours

    def resolved(self, ckpt=None, kind=None) -> "SamplingConfig":
        """These settings with the unset ones filled in for a checkpoint folder (see default_chat_format) or
        a kind of checkpoint (a MODEL_DEFAULTS key)."""
        defaults = MODEL_DEFAULTS[kind or default_chat_format(ckpt)]
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


# The defaults of the unset settings, per kind of checkpoint. text_top_k 0: off.
MODEL_DEFAULTS = {
    # a model trained on its own request (the shapes world): short plans (a few words each object), plain sampling
    # and a light guidance weight: its image logits are sharp (one code per cell content), and at Janus-Pro's
    # w = 5 the guided logits u + w (c - u) mix pieces of different objects (docs/shapes.md)
    "janus": dict(chat_format="janus", max_plan_tokens=64, text_top_k=0, cfg_weight=2.0),
    # Janus-Pro as T2I-R1 samples it: plans of up to 1024 tokens (its max_completion_length; its plans average
    # about 97, so a shorter cap would cut many before EOS), drawn with transformers' generate defaults for an
    # unset generation config: temperature 1, top-k 50
    "t2i-r1": dict(chat_format="t2i-r1", max_plan_tokens=1024, text_top_k=50, cfg_weight=5.0),
}


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
    # torch.multinomial's own one-sample draw, argmax(p / q) with q ~ Exp(1), without the checks on the
    # probabilities that make it wait for the GPU: the same random numbers, the same tokens
    probs = logits.softmax(-1)
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1)


def pad_tokens(seqs, pad_id, device=None, side="left"):
    """list of token lists -> ids (B, T) padded with pad_id on the left (prompts) or the right (completions),
    and mask (B, T), True on real tokens."""
    T = max(len(s) for s in seqs)
    # built on the CPU (one small copy per row), then moved in one transfer
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros(len(seqs), T, dtype=torch.bool, device="cpu")
    for i, s in enumerate(seqs):
        if len(s):
            cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[i, cols] = torch.as_tensor(s, dtype=torch.long, device="cpu")
            mask[i, cols] = True
    return ids.to(device), mask.to(device)


def unconditional(ids, mask, pad_id):
    """Janus-Pro's unconditional prompts: every token but the first (BOS) and the last (<begin_of_image>) is
    the pad token. ids, mask (B, T) left-padded."""
    first = mask & (mask.cumsum(1) == 1)
    keep = first | ~mask
    keep[:, -1] = True
    return ids.masked_fill(~keep, pad_id)


# -----------------------------------------------------------------------------
# decode steps (the only code torch.compile sees, through fast_decode.decode_fn) and their set-up


def text_step(janus: Janus, tokens, cache, input_pos, positions, mask, kv_len=None):
    """tokens (B,) fed at slot input_pos (1,) -> next-token logits (B, vocab), the compute dtype's product cast to
    float32. kv_len: see Janus.forward."""
    h = janus(janus.embed_text(tokens[:, None]), positions=positions, mask=mask, cache=cache, input_pos=input_pos,
              kv_len=kv_len)
    return janus.text_logits(h[:, -1], float32=False)


def image_step(janus: Janus, codes, cache, input_pos, positions, mask, cfg_weight, kv_len=None):
    """codes (B,) fed to the conditional and the unconditional rows -> guided logits (B, codebook) float32.

    Rows of the cache are [cond (B); uncond (B)], or only cond when there is no guidance (cfg_weight None).
    """
    rows = codes if cfg_weight is None else torch.cat([codes, codes])
    # the cache holds the prompt's slots, then one per image token: the code fed at slot s sits in cell
    # s - (prompt slots), computed here on the device (a static shape and input_pos, so a graph replays it)
    cells = input_pos - (mask.shape[1] - janus.cfg.image_tokens) if janus.cfg.image_positions else None
    h = janus(janus.embed_image(rows[:, None], cells), positions=positions, mask=mask, cache=cache, input_pos=input_pos,
              kv_len=kv_len)
    return guide(janus.image_logits(h[:, -1], float32=False), cfg_weight)


def guide(logits, cfg_weight):
    """Classifier-free guidance on raw logits: u + w (c - u), rows stacked as [cond; uncond]."""
    if cfg_weight is None:
        return logits
    cond, uncond = logits.chunk(2)
    return uncond + cfg_weight * (cond - uncond)


def prefill(janus, ids, mask, extra):
    """Run the prompt through a fresh cache with room for `extra` more tokens; return (h_last, cache, mask)."""
    B, T = ids.shape
    cache = janus.new_cache(B, T + extra)
    full_mask = torch.cat([mask, torch.ones(B, extra, dtype=torch.bool, device=ids.device)], 1)  # (B, T+extra)
    h = janus(janus.embed_text(ids), mask=full_mask, cache=cache, input_pos=torch.arange(T, device=ids.device),
              kv_len=T)
    return h[:, -1:], cache, full_mask


def start_decoding(janus, step_fn, ids, mask, first_logits, n, steps, compile, *extra):
    """One prefill of (ids, mask), shared by n samples of each row, with room for `steps` more tokens.
    Returns the logits (R*n, V) of the first new token and step(i, tokens): token i in, logits of i + 1 out.
    Nothing here waits for the device: positions and slots are computed there."""
    static = static_decode(compile, ids.device)  # a compiled GPU step: static shapes over the whole cache
    if static:  # left padding up to the bucket's width: masked, so the samples stay the same
        W = bucket_width(ids.shape[1])
        ids, mask = F.pad(ids, (W - ids.shape[1], 0)), F.pad(mask, (W - ids.shape[1], 0), value=False)  # (R, W)
    T = ids.shape[1]
    h, cache, full_mask = prefill(janus, ids, mask, steps)
    logits = first_logits(h[:, -1])
    if static:  # into the held buffers, each row repeated for its n samples as it is copied
        cache = static_cache(cache, n)
    elif n > 1:  # one prefill, n samples
        cache = cache.repeat_rows(n)
    if n > 1:
        full_mask, logits = full_mask.repeat_interleave(n, 0), logits.repeat_interleave(n, 0)
    lengths = full_mask[:, :T].sum(1, keepdim=True)  # (R*n, 1) real prompt lengths: the rotary positions
    first_slot = torch.full((1,), T, device=ids.device)  # filled there: a copy from the host would wait for it
    compiled = decode_fn(step_fn, compile, ids.device)

    def step(i, tokens):  # token i of every row -> logits of token i + 1
        kv_len = None if static and i > 0 else T + i + 1  # eager steps attend to the filled slots only
        return (compiled if i > 0 else step_fn)(janus, tokens, cache, first_slot + i, lengths + i, full_mask,
                                                *extra, kv_len)
    return logits, step


# -----------------------------------------------------------------------------
# semantic level: the plan



@torch.no_grad()
def generate_text(janus: Janus, ids, mask, *, eos_id, pad_id, n=1, max_new_tokens=96, temperature=1.0,
                  top_k=None, top_p=None, generator=None, compile=False, progress=None):
    """Sample n continuations of each prompt (ids, mask (B, T) left-padded, BOS included). Returns plan ids
    (B * n, L) right-padded with pad_id and their mask: each plan ends with its first EOS, or after
    max_new_tokens. Sample j of prompt i is row i * n + j. progress(i, N) is called after each token, and
    with i = N when every plan has ended early."""
    def first_logits(h):
        return janus.text_logits(h, float32=False)
    logits, step = start_decoding(janus, text_step, ids, mask, first_logits, n, max_new_tokens, compile)
    out = torch.full((logits.shape[0], max_new_tokens), pad_id, dtype=torch.long, device=ids.device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=ids.device)
    all_done = AllDone(ids.device)
    for i in range(max_new_tokens):
        tok = sample_from_logits(logits, temperature, top_k, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)  # finished rows: filler, masked below
        out[:, i] = tok
        done |= tok == eos_id
        if progress is not None:
            progress(i + 1, max_new_tokens)
        if i == max_new_tokens - 1 or (i % 8 == 7 and all_done(done)):  # asked every 8 tokens only
            if progress is not None and i < max_new_tokens - 1:
                progress(max_new_tokens, max_new_tokens)
            break
        logits = step(i, tok)
    # a plan ends at its first EOS (inclusive): the mask is cut there, never by token value, since a plan may
    # sample the pad token, and dropping it would score the plan later under another context
    eos = out == eos_id
    plan_mask = (eos.cumsum(1) - eos.long()) == 0                     # nothing before this position was EOS
    L = max(1, int(plan_mask.sum(1).max()))
    return out[:, :L], plan_mask[:, :L]


# -----------------------------------------------------------------------------
# token level: the image


@torch.no_grad()
def generate_images(janus: Janus, ids, mask, *, pad_id, n=1, cfg_weight=5.0, temperature=1.0, top_k=None,
                    generator=None, compile=False, progress=None):
    """Sample n images (VQ codes) per image prompt (ids, mask (B, T) left-padded, ending with
    <begin_of_image>) with classifier-free guidance. Returns codes (B * n, image_tokens), sample j of prompt i
    at row i * n + j. progress(i, N) is called after each image token."""
    N = janus.cfg.image_tokens
    guided = cfg_weight is not None and cfg_weight != 1.0
    if guided:  # the cache holds [cond; uncond] rows (image_step)
        ids, mask = torch.cat([ids, unconditional(ids, mask, pad_id)]), torch.cat([mask, mask])
    w = torch.full((), float(cfg_weight), device=ids.device) if guided else None
    def first_logits(h):
        return guide(janus.image_logits(h, float32=False), cfg_weight if guided else None)
    logits, step = start_decoding(janus, image_step, ids, mask, first_logits, n, N, compile, w)
    codes = torch.empty(logits.shape[0], N, dtype=torch.long, device=ids.device)
    for i in range(N):
        codes[:, i] = sample_from_logits(logits, temperature, top_k, None, generator)
        if i < N - 1:
            logits = step(i, codes[:, i])
        if progress is not None:
            progress(i + 1, N)
    return codes


@torch.no_grad()
def decode_images(janus, codes, batch=16):
    """VQ codes (B, N) -> uint8 images (B, S, S, 3) on the CPU, decoded a few at a time to bound memory."""
    return torch.cat([to_uint8(janus.vq.decode_code(codes[i:i + batch])).cpu() for i in range(0, len(codes), batch)])


# -----------------------------------------------------------------------------
# both levels: the rollout record, from the sampler to the loss


@dataclass
class Rollout:
    """Samples of a batch of prompts, from the sampler to the loss; row i * n + k is sample k of prompt i.
    Prompts are padded on the left and plans on the right, each with its mask (True on real tokens)."""
    prompts: list                 # (B,) the user prompt of each row
    plans: list                   # (B,) the plan as text ("" without the semantic level)
    request_ids: torch.Tensor     # (B, Tr) the reasoning request; (B, 0) without the semantic level
    request_mask: torch.Tensor
    plan_ids: torch.Tensor        # (B, Tp) the plan, EOS included when it came; (B, 0) without the semantic level
    plan_mask: torch.Tensor
    image_prompt_ids: torch.Tensor   # (B, Ti) "{prompt}. {plan}" in the chat format, then <begin_of_image>
    image_prompt_mask: torch.Tensor
    codes: torch.Tensor           # (B, N) the image tokens
    rewards: torch.Tensor = None     # (B,) the combined reward (set by the trainer)
    advantages: torch.Tensor = None  # (B,) the rewards normalised within each prompt's group (set by the trainer)

    PADDED = (("request_ids", "request_mask", "left"), ("plan_ids", "plan_mask", "right"),
              ("image_prompt_ids", "image_prompt_mask", "left"))  # token tensors, their masks, the padded side

    def __len__(self):
        return len(self.prompts)

    def rows(self, i, j) -> "Rollout":
        """Rows i..j-1, with padding only as wide as their longest prompt and plan."""
        out = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[i:j] for f in fields(self)}
        for ids, mask, side in self.PADDED:
            n = int(out[mask].sum(1).max()) if out[mask].numel() else 0
            keep = slice(out[mask].shape[1] - n, None) if side == "left" else slice(0, n)
            out[ids], out[mask] = out[ids][:, keep], out[mask][:, keep]
        return Rollout(**out)

    @staticmethod
    def cat(parts, pad_id) -> "Rollout":
        """The rows of several rollouts in one, padding widened to the widest."""
        def widen(ts, side, value):
            W = max(t.shape[1] for t in ts)
            return torch.cat([F.pad(t, (W - t.shape[1], 0) if side == "left" else (0, W - t.shape[1]), value=value)
                              for t in ts])
        out = {}
        for ids, mask, side in Rollout.PADDED:
            out[ids] = widen([getattr(p, ids) for p in parts], side, pad_id)
            out[mask] = widen([getattr(p, mask) for p in parts], side, False)
        for f in fields(Rollout):
            vals = [getattr(p, f.name) for p in parts]
            if f.name not in out:  # the texts are joined as lists, the other tensors as they are
                out[f.name] = (None if vals[0] is None else [x for v in vals for x in v] if isinstance(vals[0], list)
                               else torch.cat(vals))
        return Rollout(**out)


# which levels of the chain of thought a sample has (both, semantic: a plan, then the image) and training trains
# (semantic: the plan tokens only; token: the image tokens only, drawn from the prompt alone)
LEVELS = ("both", "semantic", "token")


def image_prompt_text(prompt: str, plan: str) -> str:
    """The "janus" format's image text: the prompt, one period, the plan (T2I-R1 doubles a final period)."""
    plan = plan.strip()
    return f"{prompt.strip().rstrip('.')}. {plan}" if plan else prompt.strip()


@torch.no_grad()
def sample_t2i(janus: Janus, tok: Tokenizer, prompts, settings: SamplingConfig, *, n=1, levels="both",
               reasoning_template=REASONING_PROMPT, generator=None, compile=False, progress=None,
               plan_progress=None) -> Rollout:
    """T2I-R1 sampling for a batch of prompts: n plans per prompt, one image per plan (or, with levels="token",
    n images per prompt from the prompt alone, sharing one prefill). settings: resolved for the checkpoint;
    reasoning_template: the request's text (load_reasoning_prompt reads it from a file or a checkpoint).
    progress(i, N), plan_progress(i, N): after each image token, after each plan token."""
    unset = [k for k in ("cfg_weight", "max_plan_tokens", "chat_format") if getattr(settings, k) is None]
    if unset:
        raise ValueError(f"sampling settings {', '.join(unset)} unset: fill them for the checkpoint with "
                         f"SamplingConfig.resolved")
    if any(not p or not p.strip() for p in prompts):
        raise ValueError("empty prompt")
    if levels not in LEVELS:
        raise ValueError(f"levels must be one of {', '.join(LEVELS)}, got {levels!r}")
    if settings.chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat format must be one of {', '.join(CHAT_FORMATS)}, got {settings.chat_format!r}")
    s, fmt, device = settings, CHAT_FORMATS[settings.chat_format], janus.device
    rep = [p for p in prompts for _ in range(n)]

    def images(ids, mask, n=1):  # the token level: n images for each image prompt
        return generate_images(janus, ids, mask, pad_id=tok.pad_id, n=n, cfg_weight=s.cfg_weight,
                               temperature=s.temperature, top_k=s.top_k, generator=generator, compile=compile,
                               progress=progress)
    if levels != "token":  # both, semantic: a plan first
        request_ids, request_mask = pad_tokens([tok.encode(fmt.request_text(reasoning_template, p)) for p in prompts],
                                             tok.pad_id, device)
        plan_ids, plan_mask = generate_text(janus, request_ids, request_mask, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                            n=n, max_new_tokens=s.max_plan_tokens, temperature=s.text_temperature,
                                            top_k=s.text_top_k or None, top_p=s.text_top_p, generator=generator,
                                            compile=compile, progress=plan_progress)
        decoded = [tok.decode(ids[:k]) for ids, k in zip(plan_ids.tolist(), plan_mask.sum(1).tolist())]
        request_ids, request_mask = request_ids.repeat_interleave(n, 0), request_mask.repeat_interleave(n, 0)
        image_ids, image_mask = pad_tokens([tok.encode(fmt.image_text(p, d)) for p, d in zip(rep, decoded)],
                                         tok.pad_id, device)
        codes = images(image_ids, image_mask)
    else:
        decoded = [""] * len(rep)
        request_ids = plan_ids = torch.zeros(len(rep), 0, dtype=torch.long, device=device)
        request_mask = plan_mask = torch.zeros(len(rep), 0, dtype=torch.bool, device=device)
        image_ids, image_mask = pad_tokens([tok.encode(fmt.image_text(p)) for p in prompts], tok.pad_id, device)
        codes = images(image_ids, image_mask, n)
        image_ids, image_mask = image_ids.repeat_interleave(n, 0), image_mask.repeat_interleave(n, 0)
    return Rollout(rep, [d.strip() for d in decoded], request_ids, request_mask, plan_ids, plan_mask,
                   image_ids, image_mask, codes)


@torch.no_grad()
def sample_batches(janus: Janus, tok: Tokenizer, prompts, settings: SamplingConfig, *, n, batch_size, seed,
                   progress=None, plan_progress=None, **kwargs):
    """sample_t2i over a list of prompts, batch_size prompts at a time, with one generator seeded once (the
    same seed and batch size give the same samples). Returns the rollout and its images, uint8 (B, S, S, 3)."""
    g = torch.Generator(device=janus.device).manual_seed(seed)
    parts, images = [], []
    for i in range(0, len(prompts), batch_size):
        parts.append(sample_t2i(janus, tok, prompts[i:i + batch_size], settings, n=n, generator=g,
                                progress=progress, plan_progress=plan_progress, **kwargs))
        images.append(decode_images(janus, parts[-1].codes))
    return Rollout.cat(parts, tok.pad_id), torch.cat(images)


# -----------------------------------------------------------------------------
# BiCoT-GRPO: advantages, log-probabilities of both levels, loss


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


def _selected_logprobs(logits_fn, states, targets, temperature):
    logits = logits_fn(states)
    if temperature not in (0, 1):
        logits = logits / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def chunked_logprobs(logits_fn, states, targets, temperature=1.0, chunk_bytes=2**28):
    """states (M, ...) -> log p(target) (M,) under logits_fn(states) (float32 logits), a chunk of rows at a
    time; under autograd each chunk is recomputed in backward, so no (M, vocab) tensor is ever kept."""
    if states.shape[0] == 0:
        return states.new_zeros(0, dtype=torch.float32)
    vocab = logits_fn(states[:1]).shape[-1]
    rows = max(1, chunk_bytes // (4 * vocab))
    out = []
    for i in range(0, states.shape[0], rows):
        s, t = states[i:i + rows], targets[i:i + rows]
        if torch.is_grad_enabled() and s.requires_grad:
            out.append(checkpoint(_selected_logprobs, logits_fn, s, t, temperature, use_reentrant=False))
        else:
            out.append(_selected_logprobs(logits_fn, s, t, temperature))
    return torch.cat(out)


def completion_logprobs(janus: Janus, prompt_ids, prompt_mask, completion, completion_mask, kind, *,
                        temperature=1.0, uncond_ids=None, cfg_weight=None):
    """log p(token | prompt, the completion before it) of every completion token, in one forward.

    prompt_ids, prompt_mask (B, P) left-padded; completion, completion_mask (B, L) right-padded: plan tokens
    for kind="text", VQ codes for kind="image". With uncond_ids (B, P) and cfg_weight (images only) the
    probabilities are those of the guided logits u + w (c - u) that sampling drew from, the conditional and
    unconditional rows in one forward. Returns logp (B, L) float32, 0 on padding."""
    B, P = prompt_ids.shape
    completion = completion.masked_fill(~completion_mask, 0)
    embed = janus.embed_text if kind == "text" else janus.embed_image
    guided = uncond_ids is not None and cfg_weight is not None
    n = 2 if guided else 1                                                     # rows per sample: cond (, uncond)
    prompts = torch.cat([prompt_ids, uncond_ids]) if guided else prompt_ids   # (n B, P)
    # input: the prompt, then every completion token but the last, which predicts nothing
    x = torch.cat([janus.embed_text(prompts), embed(completion[:, :-1]).repeat(n, 1, 1)], 1)
    h = janus(x, mask=torch.cat([prompt_mask, completion_mask[:, :-1]], 1).repeat(n, 1))  # (n B, P + L - 1, H)
    # position P - 1 (the prompt's last token) predicts completion token 0, position P - 1 + j token j
    h = h[:, P - 1:]                                                           # (n B, L, H)
    states = torch.stack([part[completion_mask] for part in h.chunk(n)], 1)   # (M, n, H): a row per real token

    def logits(s):  # (m, n, H) -> (m, V), the logits sampling drew from
        if kind == "text":
            return janus.text_logits(s[:, 0])
        return guide(janus.image_logits(torch.cat(s.unbind(1))), cfg_weight if guided else None)
    logp = torch.zeros(B, completion.shape[1], dtype=torch.float32, device=h.device)
    logp[completion_mask] = chunked_logprobs(logits, states, completion[completion_mask], temperature)
    return logp


def rollout_logprobs(janus: Janus, r: Rollout, levels, *, text_temperature=1.0, temperature=1.0, pad_id=0,
                     cfg_weight=None):
    """Log-probs (B, T) and mask (B, T) of the tokens BiCoT-GRPO trains: the plan (text head, levels both and
    semantic) beside the image (image head, levels both and token), so both take the sample's one advantage.
    cfg_weight: image tokens under the guided distribution they were drawn from (unset: the conditional one,
    as T2I-R1). Temperatures are the sampling ones (0, argmax, scores at 1)."""
    logps, masks = [], []
    if levels in ("both", "semantic"):
        logps.append(completion_logprobs(janus, r.request_ids, r.request_mask, r.plan_ids, r.plan_mask, "text",
                                         temperature=text_temperature or 1.0))
        masks.append(r.plan_mask)
    if levels in ("both", "token"):
        uncond = unconditional(r.image_prompt_ids, r.image_prompt_mask, pad_id) if cfg_weight else None
        image_mask = torch.ones_like(r.codes, dtype=torch.bool)
        logps.append(completion_logprobs(janus, r.image_prompt_ids, r.image_prompt_mask, r.codes, image_mask, "image",
                                         temperature=temperature or 1.0, uncond_ids=uncond, cfg_weight=cfg_weight))
        masks.append(image_mask)
    return torch.cat(logps, 1), torch.cat(masks, 1)


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
        denom = mask.sum() if n_total is None else torch.tensor(float(n_total), device=logp.device)
        loss = (per_token * mask).sum() / denom.clamp(min=1)
    elif norm == "sequence":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        count = (mask.sum(1) > 0).sum() if n_total is None else torch.tensor(float(n_total), device=logp.device)
        loss = per_seq.sum() / count.clamp(min=1)
    else:
        raise ValueError(f"norm must be 'token' or 'sequence', got {norm!r}")
    with torch.no_grad():
        m, n = mask.bool(), mask.sum().clamp(min=1)
        is_clipped = ((ratio < 1 - clip_eps) & (A < 0)) | ((ratio > 1 + clip_eps) & (A > 0))
        r = ratio[m] if m.any() else torch.ones(1, device=ratio.device)
        stats = {"kl": float((k3 * mask).sum() / n), "clip_frac": float((is_clipped & m).sum() / n),
                 "ratio_min": float(r.min()), "ratio_max": float(r.max()), "tokens": int(mask.sum())}
    return loss, stats
