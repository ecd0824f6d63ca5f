"""BiCoT-GRPO training (T2I-R1): sample plans and images, score them, reinforce what beat its group.

  python train.py                                   # shapes world on a CPU: base (pretrained if absent) -> RL -> table
  python train.py --levels semantic                 # the paper's ablation: only the plans are trained
  python train.py --ckpt ~/models/Janus-Pro-1B --prompts T2I-R1/data/geneval_and_t2i_data_final.json \\
      --rewards hps:1,geneval:1 --reward-ckpt hps=ckpt/hps geneval=ckpt/owlvit clip=ckpt/clip \\
      --prompts-per-step 16 --rollout-batch 2 --micro-batch 4 --lr 1e-6 --schedule linear   # README has the recipes
  torchrun --nproc_per_node 8 train.py --ckpt ...   # data parallel (DDP)

One step: prompts_per_step prompts, group_size (plan, image) samples each -> rewards -> group-normalised
advantages -> mu AdamW updates of the clipped objective with a k3 KL leash to the starting policy
(t2i_r1.grpo_loss), on the plan tokens and the image tokens of every sample.

Departures from T2I-R1's trainer:
- the loss is normalised by the token (or sequence) count of the whole step, so micro-batch size and the
  number of GPUs do not change it (T2I-R1 averages per micro-batch);
- every random draw is keyed by (seed, step, sampling call), so a resumed or re-sharded run samples the
  same images as an uninterrupted one;
- optional LoRA, whose reference policy is the same model with the adapters switched off;
- rule rewards (geneval) abstain on prompts without GenEval metadata (T2I-R1's shape, texture and most
  complex rows): a constant score within the group, so the other rewards set those advantages; T2I-R1's
  GroundingDINO reward scores them by object presence instead;
- `--image-logp cfg` (an option) scores image tokens under the guided distribution they were sampled from;
  the default is T2I-R1's conditional forward alone (`cond`). In the shapes ablation the two ended within
  noise of each other (0.263 with cfg, 0.265 with cond: README, "Results on the shapes world").
"""

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import sample as S
import t2i_r1 as R
from model import Janus, Tokenizer, load_config


@dataclass
class TrainConfig:
    # model and prompts (None: the shapes world, its base pretrained first when absent)
    ckpt: str = None               # starting policy, a Janus-Pro folder (unset: the shapes world's base)
    prompts: str = None            # plain lines, JSON lines with "prompt" + GenEval metadata, or T2I-R1's file
    eval_prompts: str = None       # held-out test prompts, evaluated at the start and the end (e.g. GenEval's)
    val_prompts: str = None        # validation prompts, evaluated every eval_every steps (choose settings here)
    test_eval: bool = True         # evaluate the test prompts (off while choosing settings on val)
    out: str = "runs/shapes"       # run folder: logs, metrics.jsonl, samples, eval/, ckpt/
    # rewards (rewards.py): NAME:WEIGHT list, checkpoint folders, how they add up
    rewards: str = "shapes"        # NAME[:WEIGHT],...: clip, pickscore, hps, aesthetic, geneval, shapes
    reward_ckpt: list = field(default_factory=list)  # NAME=PATH ...: the reward checkpoints' folders (README, Rewards)
    reward_combine: str = "sum"    # sum: weighted sum (T2I-R1); group: each reward normalised in its group first
    # the method
    levels: str = "both"           # both | semantic (plans trained, image tokens not) | token (no plan)
    group_size: int = 8            # G samples per prompt
    prompts_per_step: int = 8      # prompts per optimizer step, each with group_size samples
    rollout_batch: int = 8         # prompts per sampling call
    mu: int = 1                    # policy updates per rollout batch (1: on-policy, the ratio is exactly 1)
    beta: float = 0.01             # KL weight
    clip_eps: float = 0.2          # ratios clipped to [1 - eps, 1 + eps] (inactive with mu = 1)
    loss_norm: str = "token"       # token: one mean over every token (T2I-R1); sequence: per sample, then mean
    image_logp: str = "cond"       # cond: conditional forward only (T2I-R1); cfg: the guided distribution sampled
    # sampling (rollouts and evaluation)
    cfg: float = None              # guidance weight of image tokens (1: none); unset: 5 for Janus-Pro, 2 for shapes
    temperature: float = 1.0       # image tokens; 0: argmax
    top_k: int = None              # image tokens: keep the k most likely (None: all, as Janus-Pro and T2I-R1)
    text_temperature: float = 1.0  # plan tokens; 0: argmax
    text_top_k: int = None         # plan tokens (0: all); unset: 50 for Janus-Pro (T2I-R1), 0 for shapes
    text_top_p: float = None       # plan tokens: nucleus sampling mass (unset: off)
    max_plan_tokens: int = None    # unset: 1024 for Janus-Pro (T2I-R1's limit), 64 for the shapes world
    reasoning_prompt: str = None   # template file, {prompt} or {} placeholder; unset: the checkpoint's, else ours
    chat_format: str = None        # t2i-r1 | janus; unset: janus if the checkpoint has a reasoning_prompt.txt
    # optimisation
    steps: int = 200               # optimizer steps
    lr: float = 5e-5               # AdamW learning rate: chosen on the shapes val split (README); T2I-R1: 1e-6 on Janus-Pro
    schedule: str = "constant"     # constant | linear (to 0, T2I-R1) | cosine (to 0)
    warmup: int = 0                # linear warmup steps
    weight_decay: float = 0.0      # AdamW weight decay
    grad_clip: float = 1.0         # gradient norm clip
    micro_batch: int = 32          # samples per forward/backward (gradients accumulate over the step)
    lora_rank: int = 0             # > 0: LoRA on every attention and MLP projection instead of full fine-tuning
    lora_alpha: float = 16.0       # LoRA scale alpha / rank
    grad_checkpointing: bool = False  # recompute each decoder layer in backward (less memory, more time)
    # system
    device: str = None             # cuda, cpu, ...; unset: CUDA when present (torchrun: GPU LOCAL_RANK)
    dtype: str = None              # autocast over float32 weights: bfloat16 | float32; unset: bf16 on GPU
    seed: int = 0                  # every random draw is keyed by (seed, step, sampling call)
    compile: bool = False          # torch.compile the sampling decode steps (GPU; on CPU a few % after ~20 s of compiling)
    fsdp: bool = False             # with torchrun: shard parameters, gradients and optimizer state (FSDP2)
    # logs, evaluation, checkpoints
    sample_every: int = 25         # a grid of the step's samples (and their plans and rewards)
    eval_every: int = 50           # validation evaluation (also at the start and the end)
    eval_n: int = 16               # images per evaluated prompt
    save_every: int = 50           # checkpoint (also at the end)
    resume: bool = False           # continue the run in out/ from its last checkpoint, with its saved settings


# -----------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x with W frozen and B = 0 at the start. The frozen weight keeps its published
    key (`...q_proj.weight`); save_pretrained writes W + (alpha / r) B A under it."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.enabled:
            y = y + (F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale).to(y.dtype)
        return y

    def merged_weight(self):
        return (self.weight.float() + self.scale * self.lora_B.float() @ self.lora_A.float()).to(self.weight.dtype)


def add_lora(janus: Janus, rank: int, alpha: float):
    """Wrap every attention and MLP projection of the language model; everything else is frozen."""
    janus.requires_grad_(False)
    for layer in janus.language_model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))


@contextlib.contextmanager
def adapters_off(janus: Janus):
    """The reference policy of a LoRA run: the same model with its adapters switched off."""
    mods = [m for m in janus.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield janus
    finally:
        for m in mods:
            m.enabled = True


# -----------------------------------------------------------------------------
# distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)


def dist_setup(device):
    """Join the process group torchrun describes. Returns (rank, world, device): on CUDA each process takes
    the GPU of its LOCAL_RANK before the group exists, so NCCL binds the right card."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # NCCL reduces CUDA tensors only; gloo serves any CPU tensor a collective may still meet (FSDP's
        # CPU-offloaded state dicts), so the group has one backend per device type
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world, device) if world > 1 else (0, 1, device)


def all_sum(x: torch.Tensor, world, device):
    """Sum x over processes -> a CPU tensor. The collective gets a copy on the training device: the counts
    and logs are built on the CPU, which NCCL would refuse."""
    if world == 1:
        return x
    y = x.to(device)
    dist.all_reduce(y)
    return y.cpu()


@contextlib.contextmanager
def gathered(module):
    """FSDP2: every parameter whole on every process, for code that calls submodules outside a forward
    (sampling, log-probs of the reference). Collective: all processes enter. A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield module
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


def grad_sync(module, sync):
    """Skip the gradient all-reduce on all micro-batches but the last (DDP: no_sync; FSDP2: a flag)."""
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync or not hasattr(module, "no_sync") else module.no_sync()


def shard(root, janus):
    """FSDP2 over processes: each decoder layer is a unit, the rest (embeddings, heads, VQ) the root's."""
    from torch.distributed.fsdp import fully_shard
    for block in janus.language_model.model.layers:
        fully_shard(block)
    fully_shard(root)
    # FSDP2 finds its root on the first forward; sampling calls the layers before any root forward does
    root._get_fsdp_state()._lazy_init()
    return root


# -----------------------------------------------------------------------------
# rollouts


def step_seed(*keys):
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def step_prompts(items, cfg: TrainConfig, step):
    """The step's prompts: a fixed function of (seed, step), so resumed runs see the same ones."""
    rng = np.random.default_rng(step_seed(cfg.seed, step, 0))
    return [items[i] for i in rng.choice(len(items), cfg.prompts_per_step, replace=len(items) < cfg.prompts_per_step)]


@torch.no_grad()
def rollout(policy, tok, chunks, cfg: TrainConfig, step, scorer, reasoning, chat, device, autocast):
    """Sample, decode and score this rank's sampling calls. Returns a list of per-sample dicts and the
    decoded images (uint8)."""
    policy.eval()
    samples, images = [], []
    for c, items in chunks:
        g = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, 1 + c))
        with autocast:
            s = R.sample_t2i(policy, tok, [it["prompt"] for it in items], n=cfg.group_size,
                             cot=cfg.levels != "token", reasoning_prompt=reasoning, chat=chat, cfg_weight=cfg.cfg,
                             temperature=cfg.temperature, top_k=cfg.top_k, text_temperature=cfg.text_temperature,
                             text_top_k=cfg.text_top_k, text_top_p=cfg.text_top_p,
                             max_plan_tokens=cfg.max_plan_tokens, generator=g,
                             compile=cfg.compile)
            imgs = S.decode_images(policy, s.codes)
        metas = [it for it in items for _ in range(cfg.group_size)]
        scores, info = scorer(imgs, metas)
        total = scorer.combine(scores, mode=cfg.reward_combine, group_size=cfg.group_size)
        adv = R.group_advantages(total, cfg.group_size)
        checked = {k: info[k]["checked"] for k in scores}  # rule rewards may abstain
        for i in range(len(metas)):
            samples.append({"prompt": s.prompts[i], "plan": s.plans[i], "reasoning_ids": s.reasoning_ids[i],
                            "plan_ids": s.plan_ids[i], "image_prompt_ids": s.image_prompt_ids[i],
                            "codes": s.codes[i].tolist(), "reward": float(total[i]), "advantage": float(adv[i]),
                            "scores": {k: float(v[i]) for k, v in scores.items()},
                            "checked": {k: checked[k][i] for k in scores}})
        images.append(imgs)
    return samples, torch.cat(images)


def sample_logprobs(janus, batch, cfg: TrainConfig, pad_id):
    """Log-probs (B, T) and mask of the tokens a sample is trained on: its plan (text head) and/or its
    image (image head), concatenated so that both share the sample's advantage in one loss."""
    parts = []
    if cfg.levels in ("both", "semantic"):
        parts.append(R.completion_logprobs(janus, [b["reasoning_ids"] for b in batch], [b["plan_ids"] for b in batch],
                                           "text", pad_id=pad_id, temperature=cfg.text_temperature or 1.0))
    if cfg.levels in ("both", "token"):
        guided = cfg.image_logp == "cfg" and cfg.cfg != 1.0
        parts.append(R.completion_logprobs(
            janus, [b["image_prompt_ids"] for b in batch], [b["codes"] for b in batch], "image", pad_id=pad_id,
            uncond_prompts=[R.unconditional(b["image_prompt_ids"], pad_id) for b in batch] if guided else None,
            cfg_weight=cfg.cfg if guided else None, temperature=cfg.temperature or 1.0))
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


class PolicyLoss(nn.Module):
    """The loss of one micro-batch as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, janus, cfg: TrainConfig, pad_id):
        super().__init__()
        self.janus, self.cfg, self.pad_id = janus, cfg, pad_id

    def forward(self, batch, old_logp, ref_logp, n_total):
        logp, mask = sample_logprobs(self.janus, batch, self.cfg, self.pad_id)
        adv = torch.tensor([b["advantage"] for b in batch], device=logp.device)
        old = logp.detach() if old_logp is None else old_logp
        ref = logp.detach() if ref_logp is None else ref_logp
        return R.grpo_loss(logp, old, ref, adv, mask, clip_eps=self.cfg.clip_eps, beta=self.cfg.beta,
                           norm=self.cfg.loss_norm, n_total=n_total)


# -----------------------------------------------------------------------------
# checkpoints: save_pretrained (merged weights, loadable anywhere) + train_state.pt, written atomically


def save_checkpoint(out, policy, tok, opt_state, step, cfg, reasoning_src, metrics, model_state=None):
    path, tmp, old = os.path.join(out, "ckpt"), os.path.join(out, "ckpt.tmp"), os.path.join(out, "ckpt.old")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp, tokenizer=tok, state=model_state)
    if reasoning_src and os.path.isfile(os.path.join(reasoning_src, "reasoning_prompt.txt")):
        shutil.copy(os.path.join(reasoning_src, "reasoning_prompt.txt"), tmp)
    lora = {k: v for k, v in policy.state_dict().items() if ".lora_" in k} if model_state is None else {}
    torch.save({"step": step, "optimizer": opt_state, "config": asdict(cfg), "lora": lora or None,
                "metrics": metrics}, os.path.join(tmp, "train_state.pt"))
    # the previous checkpoint stays whole until the new one is: a crash leaves ckpt, or ckpt.old
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out):
    for name in ("ckpt", "ckpt.old"):
        p = os.path.join(out, name)
        if os.path.isfile(os.path.join(p, "train_state.pt")):
            return p
    return None


# -----------------------------------------------------------------------------
# evaluation and reports


def evaluate(policy, tok, items, cfg: TrainConfig, scorer, reasoning, chat, autocast, split="test"):
    policy.eval()
    with autocast:
        records, images = S.generate(policy, tok, items, n=cfg.eval_n, batch_size=max(1, 64 // cfg.eval_n),
                                     seed=cfg.seed + 1, reasoning_prompt=reasoning, chat=chat,
                                     desc=f"{split} evaluation: image tokens",
                                     cot=cfg.levels != "token", cfg_weight=cfg.cfg, temperature=cfg.temperature,
                                     top_k=cfg.top_k, text_temperature=cfg.text_temperature,
                                     text_top_k=cfg.text_top_k, text_top_p=cfg.text_top_p,
                                     max_plan_tokens=cfg.max_plan_tokens)
    return S.score(scorer, images, records, group_size=cfg.eval_n, desc=f"{split} evaluation: scoring")


def eval_row(name, summary):
    """One markdown row: per-tag strict accuracy, GenEval overall, mean rewards."""
    g = next((v for k, v in summary.items() if k.startswith("geneval_")), None)
    tags = " | ".join(f"{g['per_tag'][t]:.3f}" for t in sorted(g["per_tag"])) + " | " if g else ""
    overall = f"{g['overall']:.3f} | " if g else ""
    return f"| {name} | {tags}{overall}" + " | ".join(f"{v:.3f}" for v in summary["rewards"].values()) + " |"


def eval_table(rows):
    """rows: [(name, summary)] -> markdown table (held-out strict accuracy per tag, overall, mean rewards)."""
    g = next((v for k, v in rows[0][1].items() if k.startswith("geneval_")), None)
    tags = sorted(g["per_tag"]) if g else []
    head = ["", *tags] + (["GenEval overall"] if g else []) + [f"mean {k}" for k in rows[0][1]["rewards"]]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return "\n".join(lines + [eval_row(n, s) for n, s in rows])


def train_table(step_metrics, k=10):
    """Markdown: mean training reward (and per reward model), KL and plan length over the first and the last
    k logged steps."""
    if not step_metrics:
        return "training: no steps logged"
    names = [n for n in step_metrics[0] if n.startswith("reward_") and n != "reward_std"]
    cols = ["reward", *names, "kl", "plan_tokens"]
    def row(name, ms):
        return f"| {name} | " + " | ".join(f"{np.nanmean([m[c] for m in ms]):.3f}" for c in cols) + " |"
    first, last = step_metrics[:k], step_metrics[-k:]
    return "\n".join([f"training, mean over {len(first)} steps:", "", "| steps | " + " | ".join(cols) + " |",
                      "|---" * (len(cols) + 1) + "|",
                      row(f"{first[0]['step']}-{first[-1]['step']}", first),
                      row(f"{last[0]['step']}-{last[-1]['step']}", last)])


def plot_curves(metrics, path, keys=("reward", "val_overall", "test_overall")):
    """A small line chart (PIL only) of the mean reward per step and the GenEval accuracy at evaluations."""
    from PIL import Image, ImageDraw
    W, H, pad = 640, 360, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad // 2, W - pad // 2, H - pad], outline="black")
    steps = [m["step"] for m in metrics if "reward" in m]
    if not steps:
        img.save(path)
        return
    x_max = max(1, max(m["step"] for m in metrics))
    colors = {"reward": (31, 119, 180), "val_overall": (214, 39, 40), "test_overall": (44, 160, 44)}
    series = {k: [(m["step"], m[k]) for m in metrics if k in m] for k in keys}
    lo = min(min(v for _, v in s) for s in series.values() if s)
    hi = max(max(v for _, v in s) for s in series.values() if s)
    lo, hi = min(lo, 0.0), max(hi, 1.0) if hi <= 1.0 else hi
    def xy(s, v):
        return pad + (W - 1.5 * pad) * s / x_max, (H - pad) - (H - 1.5 * pad) * (v - lo) / max(hi - lo, 1e-9)
    for k, s in series.items():
        if len(s) > 1:
            if k == "reward" and len(s) > 10:  # a running mean: single steps are noisy
                vals = np.convolve([v for _, v in s], np.ones(5) / 5, mode="valid")
                s = list(zip([t for t, _ in s][4:], vals))
            d.line([xy(t, v) for t, v in s], fill=colors[k], width=2)
        for t, v in s if k != "reward" else []:
            x, y = xy(t, v)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colors[k])
    d.text((pad, H - pad + 8), f"step 0 .. {x_max}", fill="black")
    d.text((4, pad // 2), f"{hi:.2f}", fill="black")
    d.text((4, H - pad - 10), f"{lo:.2f}", fill="black")
    d.text((W // 3, H - pad + 8), "train reward (blue), GenEval on val (red) and test (green)", fill="black")
    img.save(path)


# -----------------------------------------------------------------------------
# the loop


def lr_at(cfg: TrainConfig, step):
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    frac = step / max(1, cfg.steps)
    decay = {"constant": 1.0, "linear": 1 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[cfg.schedule]
    return cfg.lr * warm * decay


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the per-model sampling settings left unset (None): the shapes world's for its base (cfg.ckpt None)
    and checkpoints with their own reasoning_prompt.txt, T2I-R1's for Janus-Pro (t2i_r1.MODEL_DEFAULTS)."""
    d = dict(R.MODEL_DEFAULTS["janus"]) if cfg.ckpt is None else R.sampling_defaults(cfg.ckpt)  # a copy
    # compute precision: bf16 autocast over float32 master weights on a GPU, float32 on a CPU
    d["dtype"] = "bfloat16" if train_device(cfg).type == "cuda" else "float32"
    return replace(cfg, **{k: v for k, v in d.items() if getattr(cfg, k) is None})


# allowed values of the string settings (argparse choices and the checks for API callers)
CHOICES = {"levels": ("both", "semantic", "token"), "loss_norm": ("token", "sequence"), "image_logp": ("cond", "cfg"),
           "schedule": ("constant", "linear", "cosine"), "reward_combine": ("sum", "group"),
           "chat_format": tuple(R.CHAT_FORMATS), "dtype": ("float32", "bfloat16")}


def check_config(cfg: TrainConfig):
    """Every setting's value, alone and with the others; ValueError names the flag."""
    def flag(name):
        return "--" + name.replace("_", "-")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) is not None and getattr(cfg, name) not in allowed:
            raise ValueError(f"{flag(name)} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    at_least = {"group_size": 2, "prompts_per_step": 1, "rollout_batch": 1, "mu": 1, "micro_batch": 1, "steps": 1,
                "eval_n": 1, "max_plan_tokens": 1, "text_top_k": 0, "top_k": 1, "lora_rank": 0, "warmup": 0,
                "sample_every": 0, "eval_every": 0, "save_every": 0}
    for name, low in at_least.items():
        v = getattr(cfg, name)
        if v is not None and v < low:
            why = ": advantages are relative to the group" if name == "group_size" else ""
            raise ValueError(f"{flag(name)} must be at least {low}{why}, got {v}")
    for name in ("lr", "clip_eps", "grad_clip", "lora_alpha"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{flag(name)} must be positive, got {getattr(cfg, name)}")
    for name in ("beta", "weight_decay", "temperature", "text_temperature"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{flag(name)} must be at least 0, got {getattr(cfg, name)}")
    if cfg.cfg is not None and not (math.isfinite(cfg.cfg) and cfg.cfg > 0):
        raise ValueError(f"--cfg must be a positive guidance weight (1: none), got {cfg.cfg}")
    if cfg.text_top_p is not None and not 0 < cfg.text_top_p <= 1:
        raise ValueError(f"--text-top-p must lie in (0, 1], got {cfg.text_top_p}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.fsdp and (world < 2 or cfg.lora_rank):
        raise ValueError("--fsdp shards a full fine-tune over several processes: run it with torchrun, without LoRA")
    calls = -(-cfg.prompts_per_step // cfg.rollout_batch)
    if calls % world:
        raise ValueError(f"--prompts-per-step / --rollout-batch = {calls} sampling calls per step do not split over "
                         f"{world} processes")


def train_device(cfg: TrainConfig):
    """The device this process trains on: --device, else CUDA when present; under torchrun the GPU of LOCAL_RANK."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def prepare(cfg: TrainConfig, log=functools.partial(print, flush=True)):
    """Everything that can be checked without a model, before pretraining, model loading or the first
    evaluation: the settings, the checkpoint folder, the reasoning template, the prompt files and their
    metadata, the rewards' names and files. Raises ValueError or FileNotFoundError naming what is wrong.
    Returns the training and held-out prompts and the reward ensemble."""
    import rewards
    import shapes
    check_config(cfg)
    if cfg.ckpt is not None:
        load_config(os.path.expanduser(cfg.ckpt))  # the folder, its config.json (weights are checked on load)
        tok_file = os.path.join(os.path.expanduser(cfg.ckpt), "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"{tok_file} not found: a Janus-Pro folder needs its tokenizer.json")
    if cfg.reasoning_prompt is not None:
        R.load_reasoning_prompt(cfg.reasoning_prompt)
    # the shapes world's defaults: RL on its train split, validation curves on val, the report on test
    world_sets = dict(zip(("train", "val", "test"), shapes.prompt_sets()))
    train_items = S.read_prompts(cfg.prompts) if cfg.prompts else world_sets["train"]
    shapes_base = cfg.ckpt is None
    eval_sets = {"test": S.read_prompts(cfg.eval_prompts) if cfg.eval_prompts else shapes_base and world_sets["test"],
                 "val": S.read_prompts(cfg.val_prompts) if cfg.val_prompts else shapes_base and world_sets["val"]}
    eval_sets = {k: v for k, v in eval_sets.items() if v and (k != "test" or cfg.test_eval)}
    scorer = rewards.RewardEnsemble(rewards.parse_rewards(cfg.rewards), rewards.parse_reward_ckpt(cfg.reward_ckpt),
                                    device=train_device(cfg))
    for items in (train_items, *eval_sets.values()):
        scorer.check_metadata(items)
    if int(os.environ.get("RANK", "0")) == 0:
        lines = S.unchecked_report(scorer, train_items, "training prompts")
        for split, items in eval_sets.items():
            lines += S.unchecked_report(scorer, items, f"{split} prompts")
        for line in lines:
            log(line)
    return {"train_items": train_items, "eval_sets": eval_sets, "scorer": scorer}


def train(cfg: TrainConfig, log=functools.partial(print, flush=True), setup=None):
    """Run BiCoT-GRPO. setup: what prepare(cfg) returned (main() runs it first, to report bad input as a
    command-line error); None runs it here."""
    cfg = resolve_defaults(cfg)
    setup = setup or prepare(cfg, log)
    train_items, eval_sets, scorer = setup["train_items"], setup["eval_sets"], setup["scorer"]
    rank, world, device = dist_setup(train_device(cfg))
    log = log if rank == 0 else (lambda *a, **k: None)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    torch.manual_seed(cfg.seed)

    # the starting policy: the shapes world's base is pretrained first when absent
    import shapes
    base = os.path.expanduser(cfg.ckpt) if cfg.ckpt else (shapes.ensure_base() if rank == 0 else shapes.BASE_DIR)
    if world > 1:
        dist.barrier()  # rank 0 may have just pretrained the base
    reasoning = R.load_reasoning_prompt(cfg.reasoning_prompt, base)
    chat = cfg.chat_format
    tok = Tokenizer.from_pretrained(base)
    for items, what in ((train_items, "training prompts"), *((v, f"{k} prompts") for k, v in eval_sets.items())):
        warning = S.vocabulary_warning(tok, items, what)
        if warning:
            log(warning)

    # models: the policy in float32 (bf16 autocast on GPU), frozen VQ and image embedding/head as in T2I-R1
    resume_from = find_checkpoint(cfg.out) if cfg.resume else None
    state = torch.load(os.path.join(resume_from, "train_state.pt"), weights_only=True) if resume_from else None
    full_ft_resume = state is not None and state["lora"] is None
    policy = Janus.from_pretrained(resume_from if full_ft_resume else base, device=device, dtype=torch.float32)
    for part in (policy.gen_vision_model, policy.gen_embed, policy.gen_aligner, policy.gen_head):
        part.requires_grad_(False)
    if cfg.lora_rank > 0:
        add_lora(policy, cfg.lora_rank, cfg.lora_alpha)
        if state is not None:
            policy.load_state_dict(state["lora"], strict=False)
    policy.gradient_checkpointing = cfg.grad_checkpointing
    ref = None
    if cfg.beta > 0 and cfg.lora_rank == 0:
        ref = (Janus.from_pretrained(base, device=device, dtype=torch.float32) if full_ft_resume
               else copy.deepcopy(policy)).eval().requires_grad_(False)
    loss_module = PolicyLoss(policy, cfg, tok.pad_id)
    if cfg.fsdp:
        shard(loss_module, policy)
        if ref is not None:
            shard(ref, ref)
    elif world > 1:  # unused: with levels=token the text head, with an empty micro-batch part anything
        loss_module = nn.parallel.DistributedDataParallel(loss_module, find_unused_parameters=True)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, metrics = 0, []
    if state is not None:
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(loss_module, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state["optimizer"])
        start, metrics = state["step"], [m for m in state["metrics"] if m["step"] <= state["step"]]
        if rank == 0:  # lines written after the checkpoint by the interrupted run are dropped
            with open(os.path.join(cfg.out, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in metrics)
        log(f"resumed from {resume_from} at step {start}")
    log(f"policy: {policy.n_params() / 1e6:.2f}M parameters, {sum(p.numel() for p in params) / 1e6:.2f}M trainable"
        f"{' (sharded)' if cfg.fsdp else ''}"
        f"{f' (LoRA rank {cfg.lora_rank})' if cfg.lora_rank else ''}; {len(train_items)} training prompts; "
        f"{world} process(es) on {device}")

    chunks_per_step = -(-cfg.prompts_per_step // cfg.rollout_batch)  # split over processes: check_config
    os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    os.makedirs(os.path.join(cfg.out, "eval"), exist_ok=True)

    def run_eval(step, splits):
        for split in [s for s in splits if s in eval_sets]:
            t0 = time.time()
            with gathered(loss_module):
                summary = (evaluate(policy, tok, eval_sets[split], cfg, scorer, reasoning, chat, autocast, split)
                           if rank == 0 else None)
            if rank != 0:
                continue
            with open(os.path.join(cfg.out, "eval", f"{split}_{step:05d}.json"), "w") as f:
                json.dump(summary, f, indent=1)
            g = next((v for k, v in summary.items() if k.startswith("geneval_")), None)
            metrics.append({"step": step, f"{split}_overall": g["overall"] if g else float("nan"),
                            **{f"{split}_{k}": v for k, v in summary["rewards"].items()},
                            **({f"{split}_{t}": a for t, a in g["per_tag"].items()} if g else {})})
            with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics[-1]) + "\n")
            log(f"{split} evaluation at step {step} ({time.time() - t0:.0f}s):\n"
                f"{eval_table([(f'step {step}', summary)])}")

    if start == 0:
        run_eval(0, ("test", "val"))
    for step in range(start, cfg.steps):
        t0 = time.time()
        items = step_prompts(train_items, cfg, step)
        chunks = [(c, items[c * cfg.rollout_batch:(c + 1) * cfg.rollout_batch]) for c in range(chunks_per_step)]
        with gathered(loss_module):
            samples, images = rollout(policy, tok, chunks[rank::world], cfg, step, scorer, reasoning, chat, device,
                                      autocast)
        t_roll = time.time() - t0

        # the whole step's token (or sequence) count, so micro-batches and processes add up to one mean
        policy.train()
        n_plan = [len(s["plan_ids"]) for s in samples] if cfg.levels != "token" else [0] * len(samples)
        n_img = [len(s["codes"]) if cfg.levels != "semantic" else 0 for s in samples]
        local = torch.tensor([float(sum(n_plan) + sum(n_img)), float(sum(a + b > 0 for a, b in zip(n_plan, n_img)))])
        n_total = all_sum(local, world, device)[0 if cfg.loss_norm == "token" else 1].item()
        mbs = [samples[i:i + cfg.micro_batch] for i in range(0, len(samples), cfg.micro_batch)]
        with torch.no_grad(), autocast:
            with gathered(loss_module):
                old = [sample_logprobs(policy, mb, cfg, tok.pad_id)[0] for mb in mbs] if cfg.mu > 1 else [None] * len(mbs)
            if cfg.beta > 0:
                with (adapters_off(policy) if ref is None else gathered(ref)):
                    refs = [sample_logprobs(ref or policy, mb, cfg, tok.pad_id)[0] for mb in mbs]
            else:
                refs = [None] * len(mbs)
        for pg in opt.param_groups:
            pg["lr"] = lr_at(cfg, step)
        acc = {"loss": 0.0, "tokens": 0.0, "kl": 0.0, "clipped": 0.0, "rmin": float("inf"), "rmax": 0.0}
        for _ in range(cfg.mu):
            opt.zero_grad(set_to_none=True)
            for i, mb in enumerate(mbs):
                with grad_sync(loss_module, i == len(mbs) - 1), autocast:
                    loss, st = loss_module(mb, old[i], refs[i], n_total)
                # DDP averages gradients over processes; the loss is already this process's share of the mean
                (loss * world).backward()
                acc["loss"] += loss.item() / cfg.mu
                acc["tokens"] += st["tokens"]
                acc["kl"] += st["kl"] * st["tokens"]
                acc["clipped"] += st["clip_frac"] * st["tokens"]
                acc["rmin"], acc["rmax"] = min(acc["rmin"], st["ratio_min"]), max(acc["rmax"], st["ratio_max"])
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
            opt.step()

        # logs, gathered over processes
        names = list(samples[0]["scores"])
        cols = [[s["reward"] for s in samples]] + [[s["scores"][k] for s in samples] for k in names]
        x = torch.tensor(cols, dtype=torch.float64)                      # (1 + rewards, samples)
        # each reward's mean over the samples it checked (rule rewards abstain on prompts without metadata)
        w = torch.tensor([[1.0] * len(samples)] + [[float(s["checked"][k]) for s in samples] for k in names],
                         dtype=torch.float64)                            # (1 + rewards, samples)
        sums = all_sum(torch.stack([(w * x).sum(1), (w * x * x).sum(1), w.sum(1)]), world, device)  # (3, 1 + rewards)
        # a plan is cut when it reached max_plan_tokens without EOS
        n_cut = sum(len(p) >= cfg.max_plan_tokens and p[-1] != tok.eos_id for p in (s["plan_ids"] for s in samples) if p)
        tot = all_sum(torch.tensor([len(samples), sum(n_plan), acc["tokens"], acc["kl"], acc["clipped"], acc["loss"],
                                    n_cut], dtype=torch.float64), world, device).tolist()
        n, mean = tot[0], (sums[0] / sums[2]).tolist()                  # nan for a reward that checked nothing
        std = (sums[1] / n - (sums[0] / n) ** 2).clamp(min=0).sqrt().tolist()  # [0]: the total reward's
        m = {"step": step + 1, "reward": mean[0], "reward_std": std[0],
             **{f"reward_{k}": mean[1 + j] for j, k in enumerate(names)},
             "kl": tot[3] / max(tot[2], 1), "clipped_frac": tot[4] / max(tot[2], 1), "loss": tot[5],
             "plan_tokens": tot[1] / n, "plan_cut_frac": tot[6] / n, "grad_norm": float(grad_norm),
             "ratio_min": acc["rmin"],
             "ratio_max": acc["rmax"], "lr": lr_at(cfg, step), "seconds": time.time() - t0, "rollout_seconds": t_roll}
        metrics.append(m)
        per = " ".join(f"{k} {m[f'reward_{k}']:.3f}" for k in names) if len(names) > 1 else ""
        log(f"step {step + 1}/{cfg.steps} | reward {m['reward']:.3f}±{m['reward_std']:.3f} {per}| kl {m['kl']:.4f} "
            f"| loss {m['loss']:.4f} | plan {m['plan_tokens']:.1f} tok, {m['plan_cut_frac']:.2f} cut "
            f"| clipped {m['clipped_frac']:.3f} "
            f"| grad {m['grad_norm']:.2f} | {m['seconds']:.1f}s (rollout {t_roll:.1f}s)")
        if rank == 0:
            with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(m) + "\n")
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                k = min(len(samples), 4 * cfg.group_size)
                captions = [S.caption({"prompt": s["prompt"], "plan": s["plan"], "scores": {"reward": s["reward"]}})
                            for s in samples[:k]]
                S.save_png(S.make_grid(images[:k].numpy(), ncol=cfg.group_size, captions=captions),
                           os.path.join(cfg.out, "samples", f"step_{step + 1:05d}.png"))
                with open(os.path.join(cfg.out, "samples", f"step_{step + 1:05d}.jsonl"), "w") as f:
                    for s in samples[:k]:
                        keys = ("prompt", "plan", "reward", "advantage", "scores", "checked")
                        f.write(json.dumps({x: s[x] for x in keys}) + "\n")
        if step + 1 == cfg.steps:
            run_eval(step + 1, ("test", "val"))
        elif cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            run_eval(step + 1, ("val",))
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
            model_state, opt_state = None, opt.state_dict()
            if cfg.fsdp:  # gather the shards (collective), rank 0 writes
                from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                     get_optimizer_state_dict)
                o = StateDictOptions(full_state_dict=True, cpu_offload=True)
                model_state = {k.removeprefix("janus."): v for k, v in get_model_state_dict(loss_module, options=o).items()}
                opt_state = get_optimizer_state_dict(loss_module, opt, options=o)
            if rank == 0:
                save_checkpoint(cfg.out, policy, tok, opt_state, step + 1, cfg, base, metrics, model_state)
        if world > 1:
            dist.barrier()

    if rank == 0:  # summary.md and curves.png, with or without evaluated prompts
        report = []
        for split in eval_sets:
            rows = [(name, json.load(open(p))) for name, p in
                    (("base", os.path.join(cfg.out, "eval", f"{split}_00000.json")),
                     (f"after {cfg.steps} steps", os.path.join(cfg.out, "eval", f"{split}_{cfg.steps:05d}.json")))
                    if os.path.isfile(p)]
            if rows:
                report.append(f"{split} prompts ({len(eval_sets[split])}, {cfg.eval_n} images each), "
                              f"before and after:\n\n{eval_table(rows)}\n")
        report.append(train_table([m for m in metrics if "reward" in m]))
        log("\n" + "\n".join(report))
        with open(os.path.join(cfg.out, "summary.md"), "w") as f:
            f.write("\n".join(report) + "\n")
        plot_curves(metrics, os.path.join(cfg.out, "curves.png"))
    if world > 1:
        # leave together, DDP's reducer first: gloo aborts a process whose peer closes the group under it
        dist.barrier()
        del loss_module
        dist.destroy_process_group()
    return policy, metrics


# -----------------------------------------------------------------------------
# command line: every TrainConfig field is a flag; a resumed run takes its saved config, with the flags
# given on this command line on top


def build_parser():
    """Every TrainConfig field as a flag; its help line is the field's comment, with its default."""
    p = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = S.field_comments(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if callable(f.default_factory) else f.default
        h = f"{helps.get(f.name, '')} (default: {'unset' if default is None else default})"
        if f.type is bool or isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=h)
        elif f.name == "reward_ckpt":
            p.add_argument(flag, nargs="*", default=argparse.SUPPRESS, metavar="NAME=PATH", help=h)
        else:
            p.add_argument(flag, type=f.type, default=argparse.SUPPRESS, choices=CHOICES.get(f.name), help=h)
    return p


def parse_args(argv=None, parser=None) -> TrainConfig:
    """Flags -> TrainConfig. With --resume, the run's saved settings, the flags given here on top."""
    given = vars((parser or build_parser()).parse_args(argv))
    cfg = TrainConfig(**given)
    if cfg.resume:
        ckpt = find_checkpoint(cfg.out)
        if ckpt is not None:
            saved = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=True)["config"]
            cfg = TrainConfig(**{**saved, **given})
    return cfg


def main(argv=None):
    parser = build_parser()
    cfg = resolve_defaults(parse_args(argv, parser))
    try:  # bad input is a command-line error, reported before any pretraining, model loading or evaluation
        setup = prepare(cfg)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return train(cfg, setup=setup)


if __name__ == "__main__":
    main()
