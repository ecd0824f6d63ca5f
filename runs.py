"""A training run's folder: checked, locked, resumed, checkpointed and reported on.

train.py runs BiCoT-GRPO into its --out folder; everything here is about that folder. An existing run is
continued (--resume) or replaced (--overwrite), never overwritten by accident; one process writes it at a time
(`claim_run_folder`); a checkpoint is the base's folder with the trained tensors in place (a complete
Janus-Pro checkpoint in the base's layout, `checkpoints.save_like`) plus train_state.pt, written whole or not
at all (`save_checkpoint`); at the end, summary.md and curves.png (`write_report`). The functions take
train.py's `Run` (and its TrainConfig) as they find them.
"""

import errno
import json
import os
import shutil
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image, ImageDraw

import sample as S
from checkpoints import atomic, lock_folder, read_json, save_like, write_json

RUN_FILES = ("config.json", "metrics.jsonl", "train.log", "summary.md", "curves.png", "eval", "samples", "ckpt",
             "ckpt.old", "ckpt.tmp")


def check_run_folder(cfg):
    """--out against what is there; ValueError naming the folder."""
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out} is a file, not a folder")
    present = [n for n in RUN_FILES if os.path.exists(os.path.join(cfg.out, n))]
    if cfg.resume and last_checkpoint(cfg.out) is None:
        held = f"it holds {', '.join(present)} but" if present else "no run there,"
        raise ValueError(f"--resume: {cfg.out} holds no checkpoint to continue ({held} no ckpt/train_state.pt); "
                         f"check the folder's name, or start a new run there without --resume"
                         + (" and with --overwrite" if present else ""))
    if present and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{cfg.out} already holds a run ({', '.join(present)}): --resume continues it, --overwrite "
                         f"deletes it and starts afresh, or choose another --out")


def claim_run_folder(cfg):
    """On the first process: lock out/, check it again under the lock, and with --overwrite delete the run
    there. Returns the lock (close it to release)."""
    lock = lock_folder(cfg.out, "train")
    try:
        check_run_folder(cfg)
        if cfg.overwrite:
            for name in RUN_FILES:
                p = os.path.join(cfg.out, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
    except BaseException:
        lock.close()
        raise
    return lock


def logging_to(path, log):
    """log, and each line appended to path as well (the run's train.log)."""
    def both(*args, **kwargs):
        log(*args, **kwargs)
        with open(path, "a") as f:
            print(*args, file=f)
    return both


def train_table(step_metrics, k=10):
    """Markdown: mean training reward (and per reward model), KL and plan length over the first and the last
    k logged steps."""
    if not step_metrics:
        return "training: no steps logged"
    names = [n for n in step_metrics[0] if n.startswith("reward_") and n != "reward_std"]
    cols = ["reward", *names, "kl", "plan_tokens"]
    def row(name, ms):
        return f"| {name} | " + " | ".join(f"{np.nanmean([m[c] for m in ms]):.3f}" for c in cols) + " |"
    spans = [step_metrics[:k]] + ([step_metrics[-k:]] if len(step_metrics) > k else [])  # first and last k
    return "\n".join([f"training, mean over {len(spans[0])} steps:", "", "| steps | " + " | ".join(cols) + " |",
                      "|---" * (len(cols) + 1) + "|"] + [row(f"{ms[0]['step']}-{ms[-1]['step']}", ms) for ms in spans])


def plot_curves(metrics, path, keys=("reward", "val_overall", "test_overall")):
    """A small line chart (PIL only) of the mean reward per step and the GenEval accuracy at evaluations."""
    W, H, pad = 640, 360, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad // 2, W - pad // 2, H - pad], outline="black")
    steps = [m["step"] for m in metrics if "reward" in m]
    if not steps:
        S.save_png(img, path)
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
    S.save_png(img, path)


def write_report(run):
    """summary.md (the held-out splits before and after, the training reward at the start and the end) and
    curves.png."""
    cfg, report = run.cfg, []
    for split in run.eval_sets:
        rows = [(name, read_json(p)) for name, p in
                (("base", os.path.join(cfg.out, "eval", f"{split}_00000.json")),
                 (f"after {cfg.steps} steps", os.path.join(cfg.out, "eval", f"{split}_{cfg.steps:05d}.json")))
                if os.path.isfile(p)]
        if rows:
            report.append(f"{split} prompts ({len(run.eval_sets[split])}, {cfg.eval_n} images each), "
                          f"before and after:\n\n{S.summary_table(rows)}\n")
    report.append(train_table([m for m in run.metrics if "reward" in m]))
    run.log("\n" + "\n".join(report))
    with atomic(os.path.join(cfg.out, "summary.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(report) + "\n")
    plot_curves(run.metrics, os.path.join(cfg.out, "curves.png"))


def trained_state(run, model_state=None) -> dict:
    """The tensors training changes, under their published names: the trainable parameters (LoRA: the
    adapted weights, merged), from model_state (FSDP's gathered tensors) when given."""
    names = {n.rsplit(".lora_", 1)[0] + ".weight" if ".lora_" in n else n
             for n, p in run.policy.named_parameters() if p.requires_grad}
    state = run.policy.export_state() if model_state is None else model_state
    return {k: v for k, v in state.items() if k in names}


def save_checkpoint(run, step):
    """out/ckpt: the starting checkpoint's folder, every file and tensor of it, with the trained tensors in
    float32 in place (checkpoints.save_like; FSDP shards gathered, a collective), and train_state.pt (optimizer,
    adapters, config, metrics). The previous one stays whole until the new one is; a failed save leaves
    nothing partial, and a full disk is named as the cause."""
    cfg, model_state, opt_state = run.cfg, None, run.opt.state_dict()
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = {k.removeprefix("janus."): v for k, v in get_model_state_dict(run.loss_module, options=o).items()}
        opt_state = get_optimizer_state_dict(run.loss_module, run.opt, options=o)
    if run.rank != 0:
        return
    path, tmp, old = (os.path.join(cfg.out, name) for name in ("ckpt", "ckpt.tmp", "ckpt.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_like(run.base, tmp, trained_state(run, model_state))
        lora = {k: v for k, v in run.policy.state_dict().items() if ".lora_" in k} if model_state is None else {}
        torch.save({"step": step, "optimizer": opt_state, "config": asdict(cfg), "lora": lora or None,
                    "metrics": run.metrics}, os.path.join(tmp, "train_state.pt"))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise disk_full(e, cfg.out, step, run) from e
        raise
    # a crash leaves ckpt, or ckpt.old
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def disk_full(e, out, step, run):
    """e, or an OSError(ENOSPC) saying so when the disk is full: torch.save reports a full disk as
    "basic_ios::clear: iostream error", naming neither the cause nor the file."""
    need = sum(t.numel() * t.element_size() for t in run.policy.state_dict().values())
    need += sum(t.numel() * t.element_size() for s in run.opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    free = shutil.disk_usage(out).free
    if getattr(e, "errno", None) != errno.ENOSPC and free >= need:
        return e
    last = last_checkpoint(out)
    return OSError(errno.ENOSPC, f"no space left on the disk of {out} for the step-{step} checkpoint: "
                   f"{free / 2**30:.1f} GiB free, about {need / 2**30:.1f} GiB needed (a save writes the new checkpoint "
                   f"beside the last one, so the disk needs room for two); nothing partial was left. "
                   + (f"The last checkpoint, {last}, is whole: free some space and continue with "
                      f"`python train.py --out {out} --resume`" if last else "There is no earlier checkpoint"))


def last_checkpoint(out):
    """The run folder's last whole checkpoint (ckpt, or ckpt.old when a save was interrupted), or None."""
    for name in ("ckpt", "ckpt.old"):
        p = os.path.join(out, name)
        if os.path.isfile(os.path.join(p, "train_state.pt")):
            return p
    return None


def load_optimizer(loss_module, opt, state, fsdp):
    """A saved optimizer state into opt (FSDP: each process takes its shards from the full state)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(loss_module, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def resumed_place(cfg, state, path, rank, log):
    """(step, metrics) of a saved run; metrics.jsonl is cut back to the checkpoint."""
    start, metrics = state["step"], [m for m in state["metrics"] if m["step"] <= state["step"]]
    if rank == 0:  # lines and evaluations written after the checkpoint by the interrupted run are dropped
        S.write_records(metrics, os.path.join(cfg.out, "metrics.jsonl"))
        folder = os.path.join(cfg.out, "eval")
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.endswith(".json") and name[-10:-5].isdigit() and int(name[-10:-5]) > start:
                os.remove(os.path.join(folder, name))
    log(f"resumed from {path} at step {start}")
    return start, metrics


def record_settings(run, changes):
    """out/config.json: the run's settings, and for each resume that changed some, its step and the changes
    ({name: [before, after]}), so the folder tells how every part of the run was trained."""
    path = os.path.join(run.cfg.out, "config.json")
    resumes = read_json(path).get("resumes", []) if run.start and os.path.isfile(path) else []
    if run.start and changes:
        resumes.append({"step": run.start, "changed": changes})
        run.log("resumed with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    write_json(path, {**asdict(run.cfg), **({"resumes": resumes} if resumes else {})})


def record(run, m):
    """A metrics line: kept for the report and, on the first process, appended to metrics.jsonl."""
    run.metrics.append(m)
    if run.rank == 0:
        with open(os.path.join(run.cfg.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(m) + "\n")


def clock(seconds):
    """1h02m, 3m05s, 42s."""
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s" if m else f"{s}s"
