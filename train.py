"""BiCoT-GRPO training (T2I-R1): sample plans and images, score them, reinforce what beat its group.

  python train.py                                   # shapes world on a CPU: base (pretrained if absent) -> RL -> table
  python train.py --levels semantic                 # the paper's ablation: only the plans are trained
  python train.py --ckpt ~/models/Janus-Pro-1B --prompts prompts.jsonl --rewards hps:1,geneval:1 \\
      --reward-ckpt hps=ckpt/hps geneval=ckpt/owlvit clip=ckpt/clip --lr 1e-6 --schedule linear
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
- image tokens are scored by default under the guided (CFG) distribution they were sampled from
  (`--image-logp cfg`); T2I-R1 scores them with the conditional forward alone (`--image-logp cond`), which
  did no better in our shapes runs (README, "Results on the shapes world").
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
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import sample as S
import t2i_r1 as R
from model import Janus, Tokenizer


@dataclass
class TrainConfig:
    # model and prompts (None: the shapes world, its base pretrained first when absent)
    ckpt: str = None               # starting policy, a Janus-Pro folder
    prompts: str = None            # training prompts: plain lines, or JSON lines with "prompt" (+ GenEval metadata)
    eval_prompts: str = None       # held-out prompts evaluated every eval_every steps
    out: str = "runs/shapes"
    # rewards (rewards.py): NAME:WEIGHT list, checkpoint folders, how they add up
    rewards: str = "shapes"
    reward_ckpt: list = field(default_factory=list)
    reward_combine: str = "sum"    # sum: weighted sum (T2I-R1); group: each reward normalised in its group first
    # the method
    levels: str = "both"           # both | semantic (plans trained, image tokens not) | token (no plan)
    group_size: int = 8            # G samples per prompt
    prompts_per_step: int = 8
    rollout_batch: int = 8         # prompts per sampling call
    mu: int = 1                    # policy updates per rollout batch (1: on-policy, the ratio is exactly 1)
    beta: float = 0.01             # KL weight
    clip_eps: float = 0.2
    loss_norm: str = "token"       # token: one mean over every token (T2I-R1); sequence: per sample, then mean
    image_logp: str = "cfg"        # cfg: the guided distribution sampled; cond: conditional forward only (T2I-R1)
    # sampling (rollouts and evaluation)
    cfg: float = 5.0
    temperature: float = 1.0
    top_k: int = None
    text_temperature: float = 1.0
    text_top_p: float = None
    max_plan_tokens: int = 64
    reasoning_prompt: str = None   # file with a {prompt} placeholder; default: the checkpoint's, else ours
    # optimisation
    steps: int = 200
    lr: float = 3e-5
    schedule: str = "constant"     # constant | linear (to 0, T2I-R1) | cosine (to 0)
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch: int = 32          # samples per forward/backward
    lora_rank: int = 0             # > 0: LoRA on every attention and MLP projection instead of full fine-tuning
    lora_alpha: float = 16.0
    grad_checkpointing: bool = False
    # system
    device: str = None
    seed: int = 0
    compile: bool = False          # torch.compile the sampling decode steps (GPU; on CPU a few % after ~20 s of compiling)
    fsdp: bool = False             # with torchrun: shard parameters, gradients and optimizer state (FSDP2)
    # logs, evaluation, checkpoints
    sample_every: int = 25         # a grid of the step's samples (and their plans and rewards)
    eval_every: int = 50           # held-out evaluation (also at the start and the end)
    eval_n: int = 8                # images per held-out prompt
    save_every: int = 50
    resume: bool = False


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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def all_sum(x: torch.Tensor, world):
    if world > 1:
        dist.all_reduce(x)
    return x


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
def rollout(policy, tok, chunks, cfg: TrainConfig, step, scorer, reasoning, device, autocast):
    """Sample, decode and score this rank's sampling calls. Returns a list of per-sample dicts and the
    decoded images (uint8)."""
    policy.eval()
    samples, images = [], []
    for c, items in chunks:
        g = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, 1 + c))
        with autocast:
            s = R.sample_t2i(policy, tok, [it["prompt"] for it in items], n=cfg.group_size,
                             cot=cfg.levels != "token", reasoning_prompt=reasoning, cfg_weight=cfg.cfg,
                             temperature=cfg.temperature, top_k=cfg.top_k, text_temperature=cfg.text_temperature,
                             text_top_p=cfg.text_top_p, max_plan_tokens=cfg.max_plan_tokens, generator=g,
                             compile=cfg.compile)
            imgs = S.decode_images(policy, s.codes)
        metas = [it for it in items for _ in range(cfg.group_size)]
        scores, _ = scorer(imgs, metas)
        total = scorer.combine(scores, mode=cfg.reward_combine, group_size=cfg.group_size)
        adv = R.group_advantages(total, cfg.group_size)
        for i in range(len(metas)):
            samples.append({"prompt": s.prompts[i], "plan": s.plans[i], "reasoning_ids": s.reasoning_ids[i],
                            "plan_ids": s.plan_ids[i], "image_prompt_ids": s.image_prompt_ids[i],
                            "codes": s.codes[i].tolist(), "reward": float(total[i]), "advantage": float(adv[i]),
                            "scores": {k: float(v[i]) for k, v in scores.items()}})
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


def evaluate(policy, tok, items, cfg: TrainConfig, scorer, reasoning, autocast):
    policy.eval()
    with autocast:
        records, images = S.generate(policy, tok, items, n=cfg.eval_n, batch_size=max(1, 64 // cfg.eval_n),
                                     seed=cfg.seed + 1, reasoning_prompt=reasoning, show_progress=False,
                                     cot=cfg.levels != "token", cfg_weight=cfg.cfg, temperature=cfg.temperature,
                                     top_k=cfg.top_k, text_temperature=cfg.text_temperature,
                                     text_top_p=cfg.text_top_p, max_plan_tokens=cfg.max_plan_tokens)
    return S.score(scorer, images, records, group_size=cfg.eval_n)


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


def plot_curves(metrics, path, keys=("reward", "eval_overall")):
    """A small line chart (PIL only) of the mean reward per step and the held-out accuracy at evaluations."""
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
    colors = {"reward": (31, 119, 180), "eval_overall": (214, 39, 40)}
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
    d.text((W // 2, H - pad + 8), "mean train reward (blue), held-out GenEval (red)", fill="black")
    img.save(path)


# -----------------------------------------------------------------------------
# the loop


def lr_at(cfg: TrainConfig, step):
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    frac = step / max(1, cfg.steps)
    decay = {"constant": 1.0, "linear": 1 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[cfg.schedule]
    return cfg.lr * warm * decay


def train(cfg: TrainConfig, log=functools.partial(print, flush=True)):
    if cfg.levels not in ("both", "semantic", "token"):
        raise ValueError(f"levels must be both, semantic or token, got {cfg.levels!r}")
    if cfg.image_logp not in ("cond", "cfg") or cfg.loss_norm not in ("token", "sequence"):
        raise ValueError("image_logp must be cond or cfg; loss_norm token or sequence")
    if cfg.group_size < 2:
        raise ValueError("group_size must be at least 2: advantages are relative to the group")
    import rewards
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = dist_setup(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    log = log if rank == 0 else (lambda *a, **k: None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    torch.manual_seed(cfg.seed)

    # data
    import shapes
    base = cfg.ckpt or (shapes.ensure_base() if rank == 0 else shapes.BASE_DIR)
    if world > 1:
        dist.barrier()  # rank 0 may have just pretrained the base
    train_items = S.read_prompts(cfg.prompts) if cfg.prompts else shapes.prompt_sets()[0]
    eval_items = S.read_prompts(cfg.eval_prompts) if cfg.eval_prompts else (
        shapes.prompt_sets()[1] if cfg.ckpt is None else None)
    scorer = rewards.RewardEnsemble(rewards.parse_rewards(cfg.rewards), rewards.parse_reward_ckpt(cfg.reward_ckpt),
                                    device=device)
    scorer.check_metadata(train_items)
    if eval_items is not None:
        scorer.check_metadata(eval_items)
    reasoning = R.load_reasoning_prompt(cfg.reasoning_prompt, base)

    # models: the policy in float32 (bf16 autocast on GPU), frozen VQ and image embedding/head as in T2I-R1
    resume_from = find_checkpoint(cfg.out) if cfg.resume else None
    state = torch.load(os.path.join(resume_from, "train_state.pt"), weights_only=False) if resume_from else None
    full_ft_resume = state is not None and state["lora"] is None
    policy = Janus.from_pretrained(resume_from if full_ft_resume else base, device=device, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(base)
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
        if world < 2 or cfg.lora_rank:
            raise ValueError("--fsdp shards a full fine-tune over several processes: run it with torchrun, without LoRA")
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

    chunks_per_step = -(-cfg.prompts_per_step // cfg.rollout_batch)
    if chunks_per_step % world:
        raise ValueError(f"prompts_per_step / rollout_batch = {chunks_per_step} sampling calls per step do not "
                         f"split over {world} processes")
    os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    evals = []

    def run_eval(step):
        if eval_items is None:
            return
        t0 = time.time()
        with gathered(loss_module):
            summary = evaluate(policy, tok, eval_items, cfg, scorer, reasoning, autocast) if rank == 0 else None
        if rank != 0:
            return
        evals.append((f"step {step}", summary))
        g = next((v for k, v in summary.items() if k.startswith("geneval_")), None)
        metrics.append({"step": step, "eval_overall": g["overall"] if g else float("nan"),
                        **{f"eval_{k}": v for k, v in summary["rewards"].items()},
                        **({f"eval_{t}": a for t, a in g["per_tag"].items()} if g else {})})
        with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics[-1]) + "\n")
        log(f"eval at step {step} ({time.time() - t0:.0f}s):\n{eval_table([(f'step {step}', summary)])}")

    if start == 0:
        run_eval(0)
    for step in range(start, cfg.steps):
        t0 = time.time()
        items = step_prompts(train_items, cfg, step)
        chunks = [(c, items[c * cfg.rollout_batch:(c + 1) * cfg.rollout_batch]) for c in range(chunks_per_step)]
        with gathered(loss_module):
            samples, images = rollout(policy, tok, chunks[rank::world], cfg, step, scorer, reasoning, device, autocast)
        t_roll = time.time() - t0

        # the whole step's token (or sequence) count, so micro-batches and processes add up to one mean
        policy.train()
        n_plan = [len(s["plan_ids"]) for s in samples] if cfg.levels != "token" else [0] * len(samples)
        n_img = [len(s["codes"]) if cfg.levels != "semantic" else 0 for s in samples]
        local = torch.tensor([float(sum(n_plan) + sum(n_img)), float(sum(a + b > 0 for a, b in zip(n_plan, n_img)))])
        n_total = all_sum(local, world)[0 if cfg.loss_norm == "token" else 1].item()
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
        acc = {"loss": 0.0, "tokens": 0.0, "kl": 0.0, "clip": 0.0, "rmin": float("inf"), "rmax": 0.0}
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
                acc["clip"] += st["clip_frac"] * st["tokens"]
                acc["rmin"], acc["rmax"] = min(acc["rmin"], st["ratio_min"]), max(acc["rmax"], st["ratio_max"])
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
            opt.step()

        # logs, gathered over processes
        names = list(samples[0]["scores"])
        cols = [[s["reward"] for s in samples]] + [[s["scores"][k] for s in samples] for k in names]
        x = torch.tensor(cols, dtype=torch.float64)                      # (1 + rewards, samples)
        sums = all_sum(torch.stack([x.sum(1), (x * x).sum(1)]), world)  # (2, 1 + rewards)
        tot = all_sum(torch.tensor([len(samples), sum(n_plan), acc["tokens"], acc["kl"], acc["clip"], acc["loss"]],
                                   dtype=torch.float64), world).tolist()
        n, mean = tot[0], (sums[0] / tot[0]).tolist()
        std = (sums[1] / n - (sums[0] / n) ** 2).clamp(min=0).sqrt().tolist()
        m = {"step": step + 1, "reward": mean[0], "reward_std": std[0],
             **{f"reward_{k}": mean[1 + j] for j, k in enumerate(names)},
             "kl": tot[3] / max(tot[2], 1), "clip_frac": tot[4] / max(tot[2], 1), "loss": tot[5],
             "plan_tokens": tot[1] / n, "grad_norm": float(grad_norm), "ratio_min": acc["rmin"],
             "ratio_max": acc["rmax"], "lr": lr_at(cfg, step), "seconds": time.time() - t0, "rollout_seconds": t_roll}
        metrics.append(m)
        per = " ".join(f"{k} {m[f'reward_{k}']:.3f}" for k in names) if len(names) > 1 else ""
        log(f"step {step + 1}/{cfg.steps} | reward {m['reward']:.3f}±{m['reward_std']:.3f} {per}| kl {m['kl']:.4f} "
            f"| loss {m['loss']:.4f} | plan {m['plan_tokens']:.1f} tok | clip {m['clip_frac']:.3f} "
            f"| grad {m['grad_norm']:.2f} | {m['seconds']:.1f}s (rollout {t_roll:.1f}s)")
        if rank == 0:
            with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(m) + "\n")
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                k = min(len(samples), 4 * cfg.group_size)
                S.save_png(S.make_grid(images[:k].numpy(), ncol=cfg.group_size),
                           os.path.join(cfg.out, "samples", f"step_{step + 1:05d}.png"))
                with open(os.path.join(cfg.out, "samples", f"step_{step + 1:05d}.jsonl"), "w") as f:
                    for s in samples[:k]:
                        f.write(json.dumps({x: s[x] for x in ("prompt", "plan", "reward", "advantage", "scores")}) + "\n")
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
            run_eval(step + 1)
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

    if rank == 0 and evals:
        base_row = evals[0] if start == 0 else None
        rows = ([("base", base_row[1])] if base_row else []) + [(f"after {cfg.steps} steps", evals[-1][1])]
        table = eval_table(rows)
        log("\nheld-out evaluation, before and after:\n" + table)
        with open(os.path.join(cfg.out, "summary.md"), "w") as f:
            f.write(table + "\n")
        plot_curves(metrics, os.path.join(cfg.out, "curves.png"))
    if world > 1:
        # leave together, DDP's reducer first: gloo aborts a process whose peer closes the group under it
        dist.barrier()
        del loss_module
        dist.destroy_process_group()
    return policy, metrics, evals


# -----------------------------------------------------------------------------
# command line: every TrainConfig field is a flag; a resumed run takes its saved config, with the flags
# given on this command line on top


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif f.name == "reward_ckpt":
            p.add_argument(flag, nargs="*", default=argparse.SUPPRESS, metavar="NAME=PATH")
        else:
            p.add_argument(flag, type=f.type, default=argparse.SUPPRESS)
    given = vars(p.parse_args(argv))
    cfg = TrainConfig(**given)
    if cfg.resume:
        ckpt = find_checkpoint(cfg.out)
        if ckpt is not None:
            saved = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=False)["config"]
            cfg = TrainConfig(**{**saved, **given})
    return cfg


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
