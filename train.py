"""BiCoT-GRPO training (T2I-R1): sample plans and images, score them, reinforce what beat its group.

  python train.py                                   # shapes world on a CPU: base (pretrained if absent) -> RL -> table
  python train.py --levels semantic                 # the paper's ablation: only the plans are trained
  python train.py --ckpt ~/models/Janus-Pro-1B --prompts T2I-R1/data/geneval_and_t2i_data_final.json \\
      --rewards hps:1,geneval:1 --reward-ckpt hps=ckpt/hps geneval=ckpt/owlvit clip=ckpt/clip \\
      --prompts-per-step 16 --rollout-batch 2 --micro-batch 4 --lr 1e-6 --schedule linear   # docs/janus-pro.md
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
  own rules (`--rewards t2i-r1`: its GroundingDINO rules on OWL-ViT, and GIT) score them as it does;
- `--image-logp cfg` (an option) scores image tokens under the guided distribution they were sampled from;
  the default is T2I-R1's conditional forward alone (`cond`); on the shapes world's validation split they
  end within the spread of seeds (docs/shapes.md, "Results on the shapes world").
"""

import argparse
import contextlib
import errno
import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import rewards
import sample as S
import shapes
import t2i_r1 as R
from checkpoints import from_pretrained, load_config, write_json
from distributed import all_sum, dist_setup, gathered, grad_sync, shard, train_device
from model import Janus, Tokenizer
from runs import (check_run_folder, claim_run_folder, clock, last_checkpoint, load_optimizer, logging_to, record,
                  record_settings, resumed_place, save_checkpoint, write_report)
from settings import HelpFormatter, check_settings, config_flags, setting


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
    rewards: str = "shapes"        # NAME[:WEIGHT],... (docs/rewards.md); the preset t2i-r1 = hps,t2i-r1-detect,git
    reward_ckpt: list = field(default_factory=list)  # NAME=PATH ...: the reward checkpoints' folders (docs/rewards.md)
    reward_combine: str = setting(  # sum: weighted sum (T2I-R1); group: each reward normalised in its group first
        "sum", choices=("sum", "group"))
    t2i_r1_as_released: bool = False  # t2i-r1-detect keeps T2I-R1's code where it looks wrong (docs/rewards.md)
    # the method
    levels: str = setting("both", choices=R.LEVELS)  # semantic: plans trained, image tokens not; token: no plan
    group_size: int = setting(8, low=2, why=": advantages are relative to the group")  # G samples per prompt
    prompts_per_step: int = setting(8, low=1)  # prompts per optimizer step, each with group_size samples
    rollout_batch: int = setting(8, low=1)     # prompts per sampling call
    mu: int = setting(1, low=1)                # policy updates per rollout batch (1: on-policy, the ratio is exactly 1)
    beta: float = setting(0.01, low=0)         # KL weight
    clip_eps: float = setting(0.2, above=0)    # ratios clipped to [1 - eps, 1 + eps] (inactive with mu = 1)
    loss_norm: str = setting(  # token: one mean over every token (T2I-R1); sequence: per sample, then mean
        "token", choices=("token", "sequence"))
    image_logp: str = setting(  # cond: conditional forward only (T2I-R1); cfg: the guided distribution sampled
        "cond", choices=("cond", "cfg"))
    # sampling of rollouts and evaluations: t2i_r1.SamplingConfig, its fields are flags too (--cfg, --text-top-k, ...)
    sampling: R.SamplingConfig = field(default_factory=R.SamplingConfig)
    # optimisation
    steps: int = setting(200, low=1)           # optimizer steps
    lr: float = setting(5e-5, above=0)         # AdamW learning rate, chosen on the shapes val split; T2I-R1: 1e-6
    schedule: str = setting(  # constant | linear (to 0, T2I-R1) | cosine (to 0)
        "constant", choices=("constant", "linear", "cosine"))
    warmup: int = setting(0, low=0)            # linear warmup steps
    weight_decay: float = setting(0.0, low=0)  # AdamW weight decay
    grad_clip: float = setting(1.0, above=0)   # gradient norm clip
    micro_batch: int = setting(32, low=1)      # samples per forward/backward (gradients accumulate over the step)
    lora_rank: int = setting(  # > 0: LoRA on every attention and MLP projection instead of full fine-tuning
        0, low=0)
    lora_alpha: float = setting(16.0, above=0)  # LoRA scale alpha / rank
    grad_checkpointing: bool = False  # recompute each decoder layer in backward (less memory, more time)
    # system
    device: str = None             # cuda, cpu, ...; unset: CUDA when present (torchrun: GPU LOCAL_RANK)
    dtype: str = setting(  # autocast dtype, frozen weights held in it; unset: bf16 on GPU
        None, choices=("float32", "bfloat16"))
    seed: int = 0                  # every random draw is keyed by (seed, step, sampling call)
    compile: bool = False          # torch.compile the decode steps (GPU; on CPU a few percent after ~20 s of compiling)
    threads: int = setting(  # CPU threads of torch (unset: torch's default, one per core); 1 on a shared machine
        None, low=1)
    fsdp: bool = False             # with torchrun: shard parameters, gradients and optimizer state (FSDP2)
    # logs, evaluation, checkpoints
    sample_every: int = setting(25, low=0)     # a grid of the step's samples (and their plans and rewards)
    eval_every: int = setting(50, low=0)       # validation evaluation (also at the start and the end)
    eval_n: int = setting(16, low=1)           # images per evaluated prompt
    save_every: int = setting(50, low=0)       # checkpoint (also at the end)
    resume: bool = False           # continue the run in out/ from its last checkpoint, with its saved settings
    overwrite: bool = False        # start afresh in out/: the run there (checkpoint, metrics, evaluations) is deleted

    def __post_init__(self):
        if isinstance(self.sampling, dict):  # a saved config.json
            self.sampling = R.SamplingConfig(**self.sampling)
        self.ckpt = self.ckpt and os.path.expanduser(self.ckpt)  # "~/models/Janus-Pro-1B" as written in a shell


def check_config(cfg: TrainConfig):
    """Every setting's value, alone (as its field declares) and with the others; ValueError names the flag."""
    check_settings(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.fsdp and (world < 2 or cfg.lora_rank):
        raise ValueError("--fsdp shards a full fine-tune over several processes: run it with torchrun, without LoRA")
    calls = -(-cfg.prompts_per_step // cfg.rollout_batch)
    if calls % world:
        raise ValueError(f"--prompts-per-step / --rollout-batch = {calls} sampling calls per step do not split over "
                         f"{world} processes")


def resolve_defaults(cfg: TrainConfig, device=None) -> TrainConfig:
    """Fill the settings left unset: sampling as the starting checkpoint samples (the shapes world's base when
    cfg.ckpt is None: t2i_r1.MODEL_DEFAULTS), bf16 autocast over float32 master weights on a GPU. device: the
    one train_device decided (prepare passes it), else decided here."""
    dtype = cfg.dtype or ("bfloat16" if (device or train_device(cfg)).type == "cuda" else "float32")
    return replace(cfg, dtype=dtype, sampling=cfg.sampling.resolved(cfg.ckpt, kind=None if cfg.ckpt else "janus"))


# -----------------------------------------------------------------------------
# resumes (run folders themselves: runs.py)

# what a resume may change: how long the run goes, what it logs, evaluates and saves, and how the same
# computation is laid out on the machine; anything else would change the run half-way without a trace
RESUMABLE = ("steps", "sample_every", "eval_every", "save_every", "test_eval", "device", "compile", "threads",
             "micro_batch", "grad_checkpointing", "fsdp", "resume", "overwrite")


def saved_state(out) -> dict:
    """train_state.pt of out's last checkpoint, memory-mapped (its config and step are read without reading
    the optimizer state), its config in this version's form."""
    path = os.path.join(last_checkpoint(out), "train_state.pt")
    # on the CPU whatever device saved it (the optimizer moves its state to its parameters' device), so a run
    # saved on a GPU resumes anywhere and no process loads onto cuda:0; memory-mapped, so processes read the
    # pages they use rather than each a private copy
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    saved = state["config"]
    if "sampling" not in saved:  # saved before SamplingConfig: the sampling settings sat among the others
        names = {f.name for f in fields(R.SamplingConfig)} | {"cfg"}
        saved["sampling"] = {"cfg_weight" if k == "cfg" else k: saved.pop(k) for k in list(saved) if k in names}
    try:
        TrainConfig(**saved)
    except TypeError as e:  # a setting this version does not have
        raise ValueError(f"{path}: its saved settings do not fit: {e}") from None
    return state


def resume_changes(cfg: TrainConfig) -> dict:
    """The settings this resume changes, {name: [saved, now]}; ValueError naming every change a resume may not
    make (another --lr, --levels or --seed; a new --ckpt would swap the KL reference half-way)."""
    state = saved_state(cfg.out)
    def flat(c):
        d = asdict(c)
        return {**{k: v for k, v in d.items() if k != "sampling"}, **d["sampling"]}
    saved, now = flat(TrainConfig(**state["config"])), flat(cfg)
    changed = {k: [saved[k], now[k]] for k in now if now[k] != saved[k]}
    refused = [k for k in changed if k not in RESUMABLE]
    if refused:
        raise ValueError(f"--resume: {cfg.out} was trained with other settings, which a resume may not change: "
                         + "; ".join(f"--{k.replace('_', '-')} {changed[k][1]!r} (the run's: {changed[k][0]!r})"
                                     for k in refused) + ". Leave these flags out, or start a new run")
    if cfg.steps < state["step"]:
        raise ValueError(f"--steps {cfg.steps}: {cfg.out}'s checkpoint is already at step {state['step']}")
    return {k: v for k, v in changed.items() if k not in ("resume", "overwrite")}


# -----------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x with W frozen and B = 0 at the start. The frozen weight keeps its published
    key (`...q_proj.weight`); checkpoints hold W + (alpha / r) B A under it (Janus.export_state)."""

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

    def merged_weight(self):  # float32 as the trained tensors are saved: a bf16 base would round the update away
        return self.weight.float() + self.scale * self.lora_B.float() @ self.lora_A.float()


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
# set-up: inputs checked first, then processes, models, optimizer, resumed state


def prepare(cfg: TrainConfig, log=functools.partial(print, flush=True)) -> dict:
    """Everything that can be decided or checked without a model, before pretraining, model loading or the first
    evaluation: the device, the settings' defaults (the one place they are filled), the settings, the checkpoint
    folder, the reasoning template, the prompt files and their metadata, the rewards' names and files. Raises
    ValueError or FileNotFoundError naming what is wrong. Returns the resolved settings, the device, the
    training and held-out prompts, the reward ensemble, the template (None while the shapes base it comes from
    is still to be pretrained), the settings a resume changes, and on the first process the run folder's lock
    (train releases it)."""
    device = train_device(cfg)
    cfg = resolve_defaults(cfg, device)
    check_config(cfg)
    base = cfg.ckpt or shapes.BASE_DIR  # the shapes base: shipped, or pretrained later (its context fits)
    template = None  # read here once: from the file given, else the base's own (if it is there yet), else ours
    if os.path.isdir(base) or cfg.sampling.reasoning_prompt:
        template = R.load_reasoning_prompt(cfg.sampling.reasoning_prompt, base)
    check_run_folder(cfg)
    changes = resume_changes(cfg) if cfg.resume else {}
    if cfg.ckpt is not None:
        load_config(cfg.ckpt)  # the folder, its config.json (weights are checked on load)
        tok_file = os.path.join(cfg.ckpt, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"{tok_file} not found: a Janus-Pro folder needs its tokenizer.json")
    train_items, eval_sets = prompt_sets(cfg)
    scorer = rewards.RewardEnsemble(rewards.parse_rewards(cfg.rewards), rewards.parse_reward_ckpt(cfg.reward_ckpt),
                                    device=device,
                                    t2i_r1_detect=rewards.T2IR1DetectConfig(as_released=cfg.t2i_r1_as_released))
    for items in (train_items, *eval_sets.values()):
        scorer.check_metadata(items)
    if os.path.isdir(base):
        tok = Tokenizer.from_pretrained(base)
        for what, items in {"training": train_items, **eval_sets}.items():
            S.check_lengths(tok, items, cfg.sampling, template, load_config(base), cfg.levels, f"{what} prompts")
    if int(os.environ.get("RANK", "0")) == 0:
        for what, items in {"training": train_items, **eval_sets}.items():
            for line in scorer.unchecked_report(items, f"{what} prompts"):
                log(line)
    # last, once every input is known to be good: the folder is locked (and with --overwrite emptied)
    lock = claim_run_folder(cfg) if int(os.environ.get("RANK", "0")) == 0 else None
    return {"cfg": cfg, "device": device, "train_items": train_items, "eval_sets": eval_sets, "scorer": scorer,
            "template": template, "changes": changes, "lock": lock}


def prompt_sets(cfg: TrainConfig):
    """The training prompts and the held-out sets {"test": ..., "val": ...} (those evaluated). The shapes world's
    defaults: RL on its train split, validation curves on val, the report on test."""
    world_sets = dict(zip(("train", "val", "test"), shapes.prompt_sets()))
    train_items = S.read_prompts(cfg.prompts) if cfg.prompts else world_sets["train"]
    shapes_base = cfg.ckpt is None
    eval_sets = {"test": S.read_prompts(cfg.eval_prompts) if cfg.eval_prompts else shapes_base and world_sets["test"],
                 "val": S.read_prompts(cfg.val_prompts) if cfg.val_prompts else shapes_base and world_sets["val"]}
    return train_items, {k: v for k, v in eval_sets.items() if v and (k != "test" or cfg.test_eval)}


@dataclass
class Run:
    """What a training run holds while it runs, created whole by start_run."""
    cfg: TrainConfig
    train_items: list
    eval_sets: dict
    scorer: rewards.RewardEnsemble
    log: callable
    rank: int
    world: int
    device: torch.device
    autocast: object          # torch.autocast, or a null context in float32
    base: str                 # the starting checkpoint's folder
    reasoning: str            # the reasoning request's template
    tok: Tokenizer
    policy: Janus
    ref: Janus                # the frozen reference (None: beta 0, or LoRA with its adapters off)
    loss_module: nn.Module    # PolicyLoss, wrapped for DDP or sharded for FSDP
    params: list
    opt: torch.optim.Optimizer
    start: int                # the first step to run (a resumed run's checkpoint step)
    metrics: list
    t0: float = 0.0           # when this process's first step began (elapsed time and ETA)


def start_run(setup: dict, log) -> Run:
    """The run, whole: processes, the starting checkpoint (the shapes base pretrained first when absent), its
    tokenizer and reasoning template, the models and optimizer, and a resumed run's place."""
    cfg = setup["cfg"]
    rank, world, device = dist_setup(setup["device"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    autocast = (torch.autocast(device.type, dtype=getattr(torch, cfg.dtype)) if cfg.dtype != "float32"
                else contextlib.nullcontext())  # bf16 compute over float32 weights, or plain float32
    torch.manual_seed(cfg.seed)
    base = cfg.ckpt or (shapes.ensure_base() if rank == 0 else shapes.BASE_DIR)
    if world > 1:
        dist.barrier()  # rank 0 may have just pretrained the base
    log, tok = log if rank == 0 else (lambda *a: None), Tokenizer.from_pretrained(base)
    for what, items in {"training": setup["train_items"], **setup["eval_sets"]}.items():
        for line in S.vocabulary_warnings(tok, items, f"{what} prompts"):
            log(line)
    load, cores = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0, os.cpu_count() or 1
    if device.type == "cpu" and not cfg.threads and torch.get_num_threads() > 1 and load > cores / 2:
        log(f"warning: load average {load:.1f} on {cores} cores before this run started: other processes use "
            f"them, and torch's {torch.get_num_threads()} threads would wait on each other; --threads 1 (or "
            f"OMP_NUM_THREADS=1) is often several times faster on a shared machine")
    resume_from = last_checkpoint(cfg.out) if cfg.resume else None
    state = saved_state(cfg.out) if resume_from else None
    models = build_models(cfg, base, resume_from, state, device, world, tok.pad_id)
    start, metrics = resumed_place(cfg, state, resume_from, rank, log) if state is not None else (0, [])
    run = Run(cfg, setup["train_items"], setup["eval_sets"], setup["scorer"], log, rank, world, device, autocast, base,
              setup["template"] or R.load_reasoning_prompt(cfg.sampling.reasoning_prompt, base), tok, **models,
              start=start, metrics=metrics)
    n_trained = sum(p.numel() for p in run.params)
    log(f"policy: {run.policy.n_params() / 1e6:.2f}M parameters, {n_trained / 1e6:.2f}M "
        f"trainable{' (sharded)' if cfg.fsdp else ''}{f' (LoRA rank {cfg.lora_rank})' if cfg.lora_rank else ''}; "
        f"{len(run.train_items)} training prompts; {run.world} process(es) on {run.device}")
    return run


def build_models(cfg: TrainConfig, base, resume_from, state, device, world, pad_id) -> dict:
    """Policy, reference, loss module and optimizer, from resume_from (a checkpoint of out/, its train_state.pt
    read as state) with --resume. What trains keeps float32 master weights (autocast computes in cfg.dtype);
    what stays frozen is held in cfg.dtype itself: the VQ and the image embedding and head (frozen, as in
    T2I-R1), the reference, and the base under LoRA. So a bf16 reference takes half a float32 copy's memory,
    and autocast, which caches its casts of trainable weights only, does not cast the frozen ones again at
    every decode step."""
    dtype, lora = getattr(torch, cfg.dtype), cfg.lora_rank > 0
    full_ft_resume = state is not None and state["lora"] is None
    policy = from_pretrained(resume_from if full_ft_resume else base, device=device,
                             dtype=dtype if lora else torch.float32)
    for part in policy.image_modules():
        part.requires_grad_(False).to(dtype)
    if lora:  # the adapters are float32 master weights, the base stays in the compute dtype
        add_lora(policy, cfg.lora_rank, cfg.lora_alpha)
        if state is not None:
            policy.load_state_dict(state["lora"], strict=False)
    policy.gradient_checkpointing = cfg.grad_checkpointing
    ref = None
    if cfg.beta > 0 and not lora:  # the starting weights, read again in the compute dtype (not a deep copy)
        ref = from_pretrained(base, device=device, dtype=dtype).eval().requires_grad_(False)
    loss_module = PolicyLoss(policy, cfg, pad_id)
    if cfg.fsdp:
        shard(loss_module, policy, dtype)
        if ref is not None:
            shard(ref, ref, dtype)
    elif world > 1:  # with levels=token the text head has no gradient; otherwise every trained weight has
        loss_module = nn.parallel.DistributedDataParallel(loss_module, find_unused_parameters=cfg.levels == "token")
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state is not None:
        load_optimizer(loss_module, opt, state["optimizer"], cfg.fsdp)
    return dict(policy=policy, ref=ref, loss_module=loss_module, params=params, opt=opt)


# -----------------------------------------------------------------------------
# one step: rollout -> rewards -> advantages -> log-probs -> update -> log


def step_seed(*keys):
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def step_prompts(items, cfg: TrainConfig, step):
    """The step's prompts: a fixed function of (seed, step), so resumed runs see the same ones."""
    rng = np.random.default_rng(step_seed(cfg.seed, step, 0))
    return [items[i] for i in rng.choice(len(items), cfg.prompts_per_step, replace=len(items) < cfg.prompts_per_step)]


@torch.no_grad()
def rollout(run: Run, step):
    """This process's share of the step's sampling calls: group_size (plan, image) samples of each prompt.
    Each call draws from its own generator, keyed by (seed, step, call). Returns the rollout, its images
    (uint8) and each sample's metadata."""
    cfg, items = run.cfg, step_prompts(run.train_items, run.cfg, step)
    calls = range(-(-cfg.prompts_per_step // cfg.rollout_batch))  # split over processes: check_config
    parts, images, metas = [], [], []
    run.policy.eval()
    with gathered(run.loss_module):
        for c in calls[run.rank::run.world]:
            batch = items[c * cfg.rollout_batch:(c + 1) * cfg.rollout_batch]
            g = torch.Generator(device=run.device).manual_seed(step_seed(cfg.seed, step, 1 + c))
            with run.autocast:
                parts.append(R.sample_t2i(run.policy, run.tok, [it["prompt"] for it in batch], cfg.sampling,
                                          n=cfg.group_size, levels=cfg.levels, reasoning_template=run.reasoning,
                                          generator=g, compile=cfg.compile))
                images.append(R.decode_images(run.policy, parts[-1].codes))
            metas += [it for it in batch for _ in range(cfg.group_size)]
    return R.Rollout.cat(parts, run.tok.pad_id), torch.cat(images), metas


def logprobs(janus, batch: R.Rollout, cfg: TrainConfig, pad_id):
    """t2i_r1.rollout_logprobs with a run's settings: the levels trained, the sampling temperatures, and
    guidance for image tokens with --image-logp cfg."""
    s = cfg.sampling
    guided = cfg.image_logp == "cfg" and s.cfg_weight != 1.0
    return R.rollout_logprobs(janus, batch, cfg.levels, text_temperature=s.text_temperature, temperature=s.temperature,
                              pad_id=pad_id, cfg_weight=s.cfg_weight if guided else None)


class PolicyLoss(nn.Module):
    """The loss of one micro-batch (t2i_r1.grpo_loss) as a module, so that DDP can wrap it."""

    def __init__(self, janus, cfg: TrainConfig, pad_id):
        super().__init__()
        self.janus, self.cfg, self.pad_id = janus, cfg, pad_id

    def forward(self, batch: R.Rollout, old_logp, ref_logp, n_total):
        logp, mask = logprobs(self.janus, batch, self.cfg, self.pad_id)
        old = logp.detach() if old_logp is None else old_logp
        ref = logp.detach() if ref_logp is None else ref_logp
        return R.grpo_loss(logp, old, ref, batch.advantages.to(logp.device), mask, clip_eps=self.cfg.clip_eps,
                           beta=self.cfg.beta, norm=self.cfg.loss_norm, n_total=n_total)


@torch.no_grad()
def fixed_logprobs(run: Run, batches):
    """Log-probs that stay fixed through the step's updates: the sampling policy's (mu > 1) and the reference's
    (beta > 0); None where not needed."""
    cfg, policy, pad = run.cfg, run.policy, run.tok.pad_id
    old, ref = [None] * len(batches), [None] * len(batches)
    with run.autocast:
        if cfg.mu > 1:
            with gathered(run.loss_module):
                old = [logprobs(policy, b, cfg, pad)[0] for b in batches]
        if cfg.beta > 0:
            with (adapters_off(policy) if run.ref is None else gathered(run.ref)):
                ref = [logprobs(run.ref or policy, b, cfg, pad)[0] for b in batches]
    return old, ref


def update(run: Run, step, r: R.Rollout):
    """mu AdamW steps on the rollout, a micro-batch at a time. The loss is normalised by the token (or
    sequence) count of the whole step over every process, so micro-batches and processes add up to one mean.
    Returns the sums the step's log needs."""
    cfg = run.cfg
    n_image = r.codes.shape[1] if cfg.levels != "semantic" else 0
    n_tokens = r.plan_mask.sum(1) + n_image                                   # (B,) tokens trained per sample
    local = torch.tensor([float(n_tokens.sum()), float((n_tokens > 0).sum())])
    n_total = all_sum(local, run.world, run.device)[0 if cfg.loss_norm == "token" else 1].item()
    batches = [r.rows(i, i + cfg.micro_batch) for i in range(0, len(r), cfg.micro_batch)]
    old, ref = fixed_logprobs(run, batches)
    run.policy.train()
    for pg in run.opt.param_groups:
        pg["lr"] = lr_at(cfg, step)
    acc = {"loss": 0.0, "tokens": 0.0, "kl": 0.0, "clipped": 0.0, "rmin": float("inf"), "rmax": 0.0}
    for _ in range(cfg.mu):
        run.opt.zero_grad(set_to_none=True)
        for i, batch in enumerate(batches):
            with grad_sync(run.loss_module, i == len(batches) - 1), run.autocast:
                loss, st = run.loss_module(batch, old[i], ref[i], n_total)
            # DDP averages gradients over processes; the loss is already this process's share of the mean
            (loss * run.world).backward()
            acc["loss"] += loss.item() / cfg.mu
            acc["tokens"] += st["tokens"]
            acc["kl"] += st["kl"] * st["tokens"]
            acc["clipped"] += st["clip_frac"] * st["tokens"]
            acc["rmin"], acc["rmax"] = min(acc["rmin"], st["ratio_min"]), max(acc["rmax"], st["ratio_max"])
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        acc["grad_norm"] = float(grad_norm)
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)  # the next rollout runs without a float32 gradient per weight
    return acc


def step_metrics(run: Run, step, r: R.Rollout, scores, checked, acc, seconds, rollout_seconds):
    """The step's log line, over every process: mean (and spread) of the rewards, KL, clipping, plan lengths."""
    cfg, names = run.cfg, list(scores)
    x = torch.stack([r.rewards] + [scores[k] for k in names]).double()          # (1 + rewards, samples)
    # each reward's mean over the samples it checked (rule rewards abstain on prompts without metadata)
    w = torch.stack([torch.ones(len(r))] + [torch.tensor(checked[k]) for k in names]).double()
    sums = all_sum(torch.stack([(w * x).sum(1), (w * x * x).sum(1), w.sum(1)]), run.world, run.device)
    plan_len = r.plan_mask.sum(1).cpu()
    last = r.plan_ids.cpu().gather(1, (plan_len - 1).clamp(min=0)[:, None])[:, 0] if r.plan_ids.shape[1] else plan_len
    cut = (plan_len >= cfg.sampling.max_plan_tokens) & (last != run.tok.eos_id)  # plans that reached the cap, no EOS
    local = {"samples": len(r), "plan_tokens": float(plan_len.sum()), "cut": float(cut.sum()), "tokens": acc["tokens"],
             "kl": acc["kl"], "clipped": acc["clipped"], "loss": acc["loss"]}
    tot = dict(zip(local, all_sum(torch.tensor(list(local.values()), dtype=torch.float64), run.world, run.device).tolist()))
    n, mean = tot["samples"], (sums[0] / sums[2]).tolist()           # nan for a reward that checked nothing
    std = (sums[1] / n - (sums[0] / n) ** 2).clamp(min=0).sqrt().tolist()  # [0]: the total reward's
    return {"step": step + 1, "reward": mean[0], "reward_std": std[0],
            **{f"reward_{k}": mean[1 + j] for j, k in enumerate(names)},
            "kl": tot["kl"] / max(tot["tokens"], 1), "clipped_frac": tot["clipped"] / max(tot["tokens"], 1),
            "loss": tot["loss"], "plan_tokens": tot["plan_tokens"] / n, "plan_cut_frac": tot["cut"] / n,
            "grad_norm": acc["grad_norm"],
            "ratio_min": acc["rmin"], "ratio_max": acc["rmax"], "lr": lr_at(cfg, step), "seconds": seconds,
            "rollout_seconds": rollout_seconds}


def combined_reward(scores: dict, weights: dict, combine="sum", group_size=None):
    """Each sample's reward (B,): the weighted sum of its rewards (T2I-R1); with combine "group" each reward is
    first normalised within its group of group_size samples as the advantages are (a flat group exactly 0), so
    that no reward dominates by its scale alone."""
    if combine == "group":
        for name, r in scores.items():
            rewards.check_finite(name, r)
            if not group_size or group_size < 2 or r.numel() % group_size:
                raise ValueError(f"group combination needs group_size >= 2 dividing the batch ({r.numel()}), "
                                 f"got {group_size}")
        scores = {name: R.group_advantages(r.float(), group_size) for name, r in scores.items()}
    elif combine != "sum":
        raise ValueError(f"combine mode must be 'sum' or 'group', got '{combine}'")
    return rewards.combine_rewards(scores, weights)


def train_step(run: Run, step):
    t0 = time.time()
    r, images, metas = rollout(run, step)
    scores, info = run.scorer(images, metas)
    checked = {k: info[k]["checked"] for k in scores}  # rule rewards may abstain
    r.rewards = combined_reward(scores, run.scorer.weights, run.cfg.reward_combine, run.cfg.group_size)
    r.advantages = R.group_advantages(r.rewards, run.cfg.group_size)
    t_roll = time.time() - t0
    acc = update(run, step, r)
    m = step_metrics(run, step, r, scores, checked, acc, time.time() - t0, t_roll)
    log_step(run, m, r, images, scores, checked)


def log_step(run: Run, m, r: R.Rollout, images, scores, checked):
    """The step's line on the console and in metrics.jsonl; every sample_every steps a grid of the first
    prompts' samples, with their plans and rewards, and the same as JSON lines."""
    cfg, names = run.cfg, [k for k in m if k.startswith("reward_") and k != "reward_std"]
    per = "".join(f" {k[7:]} {m[k]:.3f}" for k in names) if len(names) > 1 else ""
    elapsed = time.time() - run.t0  # since this process's first step, evaluations and saves included
    eta = elapsed / (m["step"] - run.start) * (cfg.steps - m["step"])
    run.log(f"step {m['step']}/{cfg.steps} | reward {m['reward']:.3f}±{m['reward_std']:.3f}{per} | kl {m['kl']:.4f} "
            f"| loss {m['loss']:.4f} | plan {m['plan_tokens']:.1f} tok, {m['plan_cut_frac']:.2f} cut "
            f"| clipped {m['clipped_frac']:.3f} | grad {m['grad_norm']:.2f} | {m['seconds']:.1f}s "
            f"(rollout {m['rollout_seconds']:.1f}s) | {clock(elapsed)} elapsed, eta {clock(eta)}")
    record(run, m)
    if run.rank == 0 and cfg.sample_every and m["step"] % cfg.sample_every == 0:
        k = min(len(r), 4 * cfg.group_size)
        rows = [{"prompt": r.prompts[i], "plan": r.plans[i], "reward": float(r.rewards[i]),
                 "advantage": float(r.advantages[i]), "scores": {n: float(v[i]) for n, v in scores.items()},
                 "checked": {n: checked[n][i] for n in scores}} for i in range(k)]
        path = os.path.join(cfg.out, "samples", f"step_{m['step']:05d}")
        captions = [S.caption({"prompt": x["prompt"], "plan": x["plan"], "scores": {"reward": x["reward"]}}) for x in rows]
        S.save_png(S.make_grid(images[:k].numpy(), ncol=cfg.group_size, captions=captions), path + ".png")
        S.write_records(rows, path + ".jsonl")


# -----------------------------------------------------------------------------
# evaluation (the report: runs.py)


def evaluate(run: Run, step, splits):
    """GenEval-style evaluation of the policy on the held-out splits (eval_n images per prompt, seed + 1):
    eval/{split}_{step}.json, a metrics line and a table in the log."""
    cfg = run.cfg
    for split in [s for s in splits if s in run.eval_sets]:
        t0 = time.time()
        with gathered(run.loss_module):
            if run.rank == 0:
                run.policy.eval()
                with run.autocast:
                    records, images = S.generate(run.policy, run.tok, run.eval_sets[split], cfg.sampling, n=cfg.eval_n,
                                                 batch_size=max(1, 64 // cfg.eval_n), seed=cfg.seed + 1,
                                                 levels=cfg.levels, reasoning_template=run.reasoning,
                                                 desc=f"{split} evaluation: image tokens")
                summary = S.score(run.scorer, images, records, group_size=cfg.eval_n,
                                  desc=f"{split} evaluation: scoring")
        if run.rank != 0:
            continue
        write_json(os.path.join(cfg.out, "eval", f"{split}_{step:05d}.json"), summary)
        g = next((v for k, v in summary.items() if k.startswith("geneval_")), None)
        record(run, {"step": step, f"{split}_overall": g["overall"] if g else float("nan"),
                     **{f"{split}_{k}": v for k, v in summary["rewards"].items()},
                     **({f"{split}_{t}": a for t, a in g["per_tag"].items()} if g else {})})
        run.log(f"{split} evaluation at step {step} ({time.time() - t0:.0f}s):\n{S.summary_table([(f'step {step}', summary)])}")


# -----------------------------------------------------------------------------
# the loop


def lr_at(cfg: TrainConfig, step):
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    frac = step / max(1, cfg.steps)
    decay = {"constant": 1.0, "linear": 1 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[cfg.schedule]
    return cfg.lr * warm * decay


def train(cfg: TrainConfig, log=functools.partial(print, flush=True), setup=None):
    """Run BiCoT-GRPO. setup: what prepare(cfg) returned (main() runs it first, to report bad input as a
    command-line error); None runs it here. Returns the policy and the metrics."""
    setup = setup or prepare(cfg, log)
    cfg = setup["cfg"]  # its defaults resolved
    with setup["lock"] or contextlib.nullcontext():  # the run folder's lock, released on leaving
        run = start_run(setup, logging_to(os.path.join(cfg.out, "train.log"), log) if setup["lock"] else log)
        for folder in ("samples", "eval"):
            os.makedirs(os.path.join(cfg.out, folder), exist_ok=True)
        if run.rank == 0:
            record_settings(run, setup["changes"])
        at_ends = ("test", "val") if cfg.eval_every else ("test",)  # --eval-every 0: no validation at all
        if run.start == 0:
            evaluate(run, 0, at_ends)
        run.t0 = time.time()
        for step in range(run.start, cfg.steps):
            train_step(run, step)
            if step + 1 == cfg.steps:
                evaluate(run, step + 1, at_ends)
            elif cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                evaluate(run, step + 1, ("val",))
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
                save_checkpoint(run, step + 1)
            if run.world > 1:
                dist.barrier()
        if run.rank == 0:
            write_report(run)
        if run.world > 1:
            # leave together, DDP's reducer first: gloo aborts a process whose peer closes the group under it
            dist.barrier()
            run.loss_module = None
            dist.destroy_process_group()
    return run.policy, run.metrics


# -----------------------------------------------------------------------------
# command line: every TrainConfig and SamplingConfig field is a flag; a resumed run takes its saved config,
# with the flags given on this command line on top


def build_parser():
    p = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=HelpFormatter)
    config_flags(p, TrainConfig, given_only=True)
    config_flags(p.add_argument_group("sampling (t2i_r1.SamplingConfig, shared with sample.py)"), R.SamplingConfig,
                 given_only=True)
    return p


def parse_args(argv=None, parser=None) -> TrainConfig:
    """Flags -> TrainConfig. With --resume, the run's saved settings, the flags given here on top."""
    given = vars((parser or build_parser()).parse_args(argv))
    sampling = {k: given.pop(k) for k in list(given) if k in {f.name for f in fields(R.SamplingConfig)}}
    cfg = TrainConfig(**given)
    if cfg.resume and last_checkpoint(cfg.out) is not None:  # without one, prepare names the folder
        saved = {k: v for k, v in saved_state(cfg.out)["config"].items() if k not in ("resume", "overwrite")}
        cfg = TrainConfig(**{**saved, **given})
    return replace(cfg, sampling=replace(cfg.sampling, **sampling))


def main(argv=None):
    parser = build_parser()
    try:  # bad input is a command-line error, reported before any pretraining, model loading or evaluation
        setup = prepare(parse_args(argv, parser))
        cfg = setup["cfg"]
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    try:
        return train(cfg, setup=setup)
    except KeyboardInterrupt:  # one line, not a traceback: where the run stands and how to continue it
        last = last_checkpoint(cfg.out)
        where = (f"the last checkpoint is {last} (step {saved_state(cfg.out)['step']}); continue with `python train.py "
                 f"--out {cfg.out} --resume`" if last else f"no checkpoint was saved in {cfg.out} yet")
        print(f"\ntrain.py: interrupted; {where}", file=sys.stderr, flush=True)
        sys.exit(130)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"train.py: error: {e.strerror}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
