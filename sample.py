"""Sample images with T2I-R1's two-level chain of thought: a plan, then the image.

  python sample.py                                         # the shapes world's tiny base (trained first if absent)
  python sample.py --ckpt ~/models/Janus-Pro-7B --prompt "a red apple left of a blue cup" --n 4
  python sample.py --ckpt DIR --prompts prompts.jsonl --levels token --cfg 5 --temperature 0
  python sample.py --prompts data/shapes/test.jsonl --rewards shapes   # evaluation (after `python shapes.py prompts`)

Writes PNGs, one grid per prompt and samples.jsonl (one line per image) into --out; with --rewards also
summary.json. Sampling departs from T2I-R1's code only as t2i_r1.py lists; evaluation with the geneval
reward departs from GenEval as rewards.py lists (OWL-ViT instead of Mask2Former).
"""

import argparse
import json
import os
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from PIL import Image, ImageDraw

import rewards
import shapes
import t2i_r1 as R
from checkpoints import atomic, from_pretrained, load_config, lock_folder, write_json
from model import Tokenizer
from settings import HelpFormatter, check_settings, config_flags, default_device, setting


def read_prompts(path):
    """Plain lines, or JSON lines with a "prompt" field: GenEval metadata (GenEval's evaluation_metadata.jsonl,
    the shapes world's files), or T2I-R1's prompt file as published (data/geneval_and_t2i_data_final.json:
    "prompt", "task_type", "nouns", "spatial_info", ...), whose rows get GenEval metadata where their fields
    allow (rewards.from_t2i_r1) and keep their own fields. Returns a list of dicts that each hold "prompt".
    A malformed line raises ValueError naming the file, the line and the field."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path} not found")
    out = []
    for n, line in R.utf8_lines(path):
        line = line.strip()
        if not line:
            continue
        if not line.startswith("{"):
            out.append({"prompt": line})
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(d.get("prompt"), str) or not d["prompt"].strip():
            raise ValueError(f"{path}:{n}: a JSON line needs a non-empty \"prompt\" string")
        try:
            if "include" in d or "exclude" in d:
                rewards.check_geneval_metadata(d)
            elif "task_type" in d or "nouns" in d:  # a T2I-R1 row
                d = {**d, **(rewards.from_t2i_r1(d) or {})}
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        out.append(d)
    if not out:
        raise ValueError(f"prompt file {path} holds no prompts")
    return out


def vocabulary_warnings(tok, items, what="prompts") -> list:
    """A warning naming the words of the prompts that the tokenizer's vocabulary lacks (they would be read as
    <unk>: the shapes world's word-level vocabulary), or none."""
    unknown = [tok.unknown_words(it["prompt"]) for it in items]
    first = {}  # word -> the first prompt using it
    for it, words in zip(items, unknown):
        for w in words:
            first.setdefault(w, it["prompt"])
    if not first:
        return []
    words = sorted(first)
    shown = ", ".join(repr(w) for w in words[:20]) + (f" and {len(words) - 20} more" if len(words) > 20 else "")
    n = sum(bool(u) for u in unknown)
    return [f"warning: {n} of the {len(items)} {what} use words outside the model's vocabulary, which it reads as "
            f"unknown tokens: {shown} (e.g. in {first[words[0]]!r})"]


def check_lengths(tok, items, settings: R.SamplingConfig, reasoning, model_cfg, levels="both", what="prompts"):
    """ValueError naming the first prompt whose longest sequence does not fit the model's context
    (max_position_embeddings): the plan request and a plan of max_plan_tokens, or the image request with that
    plan and the image tokens. Checked on the tokenizer alone: a 1 MB prompt would otherwise ask for a cache
    of a million positions."""
    fmt, limit = R.CHAT_FORMATS[settings.chat_format], model_cfg.max_position_embeddings
    plan = settings.max_plan_tokens if levels != "token" else 0
    for i, it in enumerate(items):
        n = len(tok.encode(fmt.image_text(it["prompt"]))) + plan + model_cfg.image_tokens
        if levels != "token":
            n = max(n, len(tok.encode(fmt.request_text(reasoning, it["prompt"]))) + plan)
        if n > limit:
            raise ValueError(f"{what}: prompt {i + 1} ({it['prompt'][:60]!r}{'...' if len(it['prompt']) > 60 else ''}, "
                             f"{len(it['prompt'])} characters) needs {n} positions with a {plan}-token plan and "
                             f"{model_cfg.image_tokens} image tokens; the model's context is {limit}")


def make_grid(images, ncol=None, pad=2, captions=None, min_width=160):
    """uint8 (n, H, W, 3) -> one uint8 image with the n images in a grid, ncol per row. With captions (n
    strings, lines split on newlines and wrapped), each image is shown at least min_width pixels wide
    (nearest-neighbour upscaling, so small images stay crisp) with its caption under it."""
    images = np.asarray(images)
    n, H, W, C = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    lines, line_h = [[] for _ in range(n)], 11
    if captions is not None:
        scale = max(1, -(-min_width // W))
        images = images.repeat(scale, 1).repeat(scale, 2)
        H, W = H * scale, W * scale
        per_line = max(8, W // 6)  # PIL's default bitmap font is 6 pixels wide
        lines = [[line for part in str(cap).split("\n") for line in textwrap.wrap(part, per_line) or [""]]
                 for cap in captions]
    text_h = line_h * max((len(x) for x in lines), default=0)
    grid = np.full((nrow * (H + text_h + pad) + pad, ncol * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        y, x = pad + r * (H + text_h + pad), pad + c * (W + pad)
        grid[y:y + H, x:x + W] = img
    if text_h:
        pil = Image.fromarray(grid)
        draw = ImageDraw.Draw(pil)
        for i, caption_lines in enumerate(lines):
            r, c = divmod(i, ncol)
            y, x = pad + r * (H + text_h + pad) + H, pad + c * (W + pad)
            for k, line in enumerate(caption_lines):
                draw.text((x + 1, y + k * line_h), line, fill=(0, 0, 0))
        grid = np.array(pil)
    return grid


def save_png(image, path):
    """A PIL image or a uint8 (H, W, 3) array as a PNG, written atomically."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    with atomic(path) as tmp:
        image.save(tmp, format="PNG")


class Progress:
    """Progress of a long stage on stderr. On a terminal, one line rewritten in place every `every` seconds;
    otherwise (a log file, CI) whole lines, at most one every `every_line` seconds, and always the last.
    The ETA counts only this stage's own time: while another stage runs (the plans between batches of image
    tokens) it is paused."""

    def __init__(self, total, desc="", stream=None, every=0.5, every_line=30.0):
        self.total, self.desc, self.stream = total, desc, stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if self.tty else every_line
        self.t0 = self.last = self.prev = time.time()
        self.n, self.busy = 0, 0.0  # work done, and the seconds this stage took for it

    def pause(self):
        """Another stage runs: the time until this one's next update is not this one's."""
        self.prev = None

    def update(self, k=1, note=""):
        self.n += k
        now = time.time()
        self.busy += now - self.prev if self.prev is not None else 0.0
        self.prev = now
        if now - self.last >= self.every or self.n >= self.total:
            self.last = now
            rate = self.n / max(self.busy, 1e-9)
            eta = (self.total - self.n) / max(rate, 1e-9)
            line = f"{self.desc} {self.n}/{self.total} [{now - self.t0:.0f}s, eta {eta:.0f}s] {note}".rstrip()
            end = "\n" if self.n >= self.total or not self.tty else ""  # a terminal rewrites one line
            self.stream.write(("\r" if self.tty else "") + line + end)
            self.stream.flush()


def stage_progress(bar, other):
    """A sampler's progress(i, N) callback (token i of N in each batch; plans that all end early jump to N)
    advancing bar; other, the stage it alternates with, is paused meanwhile."""
    last = [0]
    def advance(i, N):
        if other is not None and other.prev is not None:  # the other stage ran until its last update: this
            bar.prev = other.prev if bar.prev is None else bar.prev  # one took over then
            other.pause()
        bar.update(i - last[0] if i > last[0] else i)
        last[0] = i % N
    return advance


def generate(janus, tok, items, settings: R.SamplingConfig, *, n=4, batch_size=4, seed=0, show_progress=True,
             desc="image tokens", **kwargs):
    """Sample n images for each item ({"prompt": ..., metadata}) with t2i_r1.sample_batches (kwargs: levels,
    reasoning_template, compile). Returns records (one dict per image) and uint8 images (len(items) * n, S, S, 3).
    Progress: a line for the plan tokens and one for the image tokens, each with its own ETA."""
    batches = -(-len(items) // batch_size)
    bar = Progress(batches * janus.cfg.image_tokens, desc=desc) if show_progress else None
    plans = (Progress(batches * settings.max_plan_tokens, desc=desc.replace("image tokens", "plan tokens"))
             if show_progress and kwargs.get("levels", "both") != "token" else None)
    rollout, images = R.sample_batches(janus, tok, [it["prompt"] for it in items], settings, n=n,
                                       batch_size=batch_size, seed=seed, progress=bar and stage_progress(bar, plans),
                                       plan_progress=plans and stage_progress(plans, bar), **kwargs)
    records = [{"index": r // n, "sample": r % n, "prompt": rollout.prompts[r], "plan": rollout.plans[r],
                "image_tokens": codes, "metadata": items[r // n]} for r, codes in enumerate(rollout.codes.tolist())]
    return records, images


def score(scorer, images, records, group_size=None, show_progress=True, desc="scoring"):
    """Score images with a rewards.RewardEnsemble; per-image scores go into the records. Returns a summary:
    mean of every reward, GenEval per-tag accuracy and overall score for the rule rewards (geneval, shapes)
    on prompts that carry a tag, and, when a CLIP checkpoint is at hand, the diversity of each prompt's images
    (with a shapes reward, also shapes.group_diversity's scene and plan diversity)."""
    bar = Progress(len(records) * len(scorer.rewards), desc=desc) if show_progress else None
    scores, info = scorer(images, [r["metadata"] for r in records], progress=bar and bar.update)
    summary = {"images": len(records), "rewards": {}}
    for name, v in scores.items():
        # rule rewards abstain on prompts without GenEval metadata: their means and accuracies leave them out
        checked = info[name]["checked"]
        mask = torch.tensor(checked, dtype=torch.bool)
        summary["rewards"][name] = float(v[mask].mean()) if mask.any() else float("nan")
        if not all(checked):
            summary.setdefault("unchecked", {})[name] = len(checked) - sum(checked)
        strict = info[name].get("strict")
        for i, rec in enumerate(records):
            rec.setdefault("scores", {})[name] = float(v[i]) if checked[i] else None
            if strict is not None and checked[i]:
                rec.setdefault("strict", {})[name] = bool(strict[i])
        tagged = [(rec["metadata"]["tag"], rec["strict"][name]) for rec in records
                  if name in rec.get("strict", {}) and "tag" in rec["metadata"]]
        if tagged:
            summary[f"geneval_{name}"] = rewards.geneval_summary(tagged)
    clip = scorer.rewards.get("clip")
    if clip is not None and group_size and group_size > 1:
        emb = clip.image_embeddings(images).view(-1, group_size, clip.clip.config.embed_dim)  # (prompts, n, E)
        summary["diversity"] = rewards.diversity(emb)
    # a reward that can judge what a prompt leaves open (shapes) adds its own diversity scores of each group
    judge = next((r for r in scorer.rewards.values() if hasattr(r, "group_diversity")), None)
    if judge is not None and group_size and group_size > 1:
        summary.update(judge.group_diversity(records, images, info[judge.name], group_size))
    return summary


def write_records(records, path):
    """JSON lines, written atomically."""
    with atomic(path) as tmp, open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def summary_table(rows) -> str:
    """[(name, summary)] -> one markdown table, a row per summary: strict GenEval accuracy per tag and overall
    (the first rule reward's), then the mean of every reward."""
    g = next((v for k, v in rows[0][1].items() if k.startswith("geneval_")), None)
    tags = sorted(g["per_tag"]) if g else []
    head = ["", *tags] + (["GenEval overall"] if g else []) + [f"mean {k}" for k in rows[0][1]["rewards"]]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, summary in rows:
        g = next((v for k, v in summary.items() if k.startswith("geneval_")), None)
        cells = [g["per_tag"][t] for t in tags] + ([g["overall"]] if g else []) + list(summary["rewards"].values())
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines)


@dataclass
class SampleConfig:
    ckpt: str = None               # Janus-Pro folder (unset: the shapes world's base, pretrained first when absent)
    prompt: str = None             # one prompt
    prompts: str = None            # prompt file (lines, JSON lines, T2I-R1's file); unset: a shapes prompt per tag
    n: int = setting(4, low=1)     # images per prompt
    rollout_batch: int = setting(4, low=1)  # prompts per sampling call, each with its n images
    seed: int = 0                  # seeds one generator for the whole run
    out: str = "out/samples"       # folder for the PNGs, grids and samples.jsonl
    overwrite: bool = False        # replace the samples in --out (without it a folder holding samples is refused)
    compile: bool = False          # torch.compile the decode step (GPUs; on CPU a few percent after a compile of ~20 s)
    device: str = None             # cuda, cpu, ... (unset: CUDA when present)
    threads: int = setting(None, low=1)  # CPU threads of torch (unset: one per core); 1 on a shared machine
    dtype: str = setting(None, choices=("float32", "bfloat16", "float16"))  # weights' precision (unset: bf16 on GPU)
    rewards: str = None            # score with these rewards (e.g. shapes, or geneval,clip) and print GenEval accuracy
    reward_ckpt: list = field(default_factory=list)  # NAME=PATH ...: reward checkpoints, see docs/rewards.md
    levels: str = setting("both", choices=("both", "token"))  # both: a plan, then the image (T2I-R1); token: no plan


def build_parser():
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__, formatter_class=HelpFormatter)
    config_flags(p, SampleConfig)
    config_flags(p.add_argument_group("sampling (t2i_r1.SamplingConfig, shared with train.py)"), R.SamplingConfig)
    return p


def parse_args(argv=None, parser=None):
    """Flags -> (SampleConfig, SamplingConfig)."""
    given = vars((parser or build_parser()).parse_args(argv))
    sampling = {f.name: given.pop(f.name) for f in fields(R.SamplingConfig)}
    return SampleConfig(**given), R.SamplingConfig(**sampling)


def check_inputs(args: SampleConfig, settings):
    """Every command-line input, checked before any model loads (a problem is one usage error naming it).
    Returns the device, the reasoning template of --reasoning-prompt (None: the checkpoint's, read later), the
    prompt items and the reward ensemble (None without --rewards)."""
    check_settings(args)
    check_settings(settings)
    device = default_device(args.device)
    template = R.load_reasoning_prompt(settings.reasoning_prompt) if settings.reasoning_prompt else None
    refuse_old_samples(args)
    if args.ckpt is not None:
        args.ckpt = os.path.expanduser(args.ckpt)
        load_config(args.ckpt)
    if args.prompt is not None and args.prompts:
        raise ValueError("--prompt and --prompts: give one of them")
    if args.prompts:
        items = read_prompts(args.prompts)
    elif args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        items = [{"prompt": args.prompt}]
    else:
        items = shapes.example_prompts()
    scorer = None
    if args.rewards:  # the rewards' files are checked here; their models load on first use
        scorer = rewards.RewardEnsemble(rewards.parse_rewards(args.rewards),
                                        rewards.parse_reward_ckpt(args.reward_ckpt), device=device)
        scorer.check_metadata(items)
        for line in scorer.unchecked_report(items):
            print(line)
    return device, template, items, scorer


def refuse_old_samples(args) -> list:
    """The samples an earlier run left in --out: an error unless --overwrite, which main then removes."""
    old = sample_files(args.out)
    if old and not args.overwrite:
        raise ValueError(f"{args.out} already holds samples ({len(old)} files, e.g. {old[0]}): --overwrite replaces "
                         f"them, or choose another --out")
    return old


def main(argv=None):
    p = build_parser()
    args, settings = parse_args(argv, p)
    try:  # every input is checked before the model is loaded (or the shapes base pretrained)
        device, reasoning, items, scorer = check_inputs(args, settings)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = args.ckpt or shapes.ensure_base()  # unset: the shapes world's base
    tok = Tokenizer.from_pretrained(ckpt)
    settings = settings.resolved(ckpt)
    reasoning = reasoning or R.load_reasoning_prompt(None, ckpt)
    try:
        check_lengths(tok, items, settings, reasoning, load_config(ckpt), levels=args.levels)
    except ValueError as e:
        p.error(str(e))
    janus = from_pretrained(ckpt, device=device, dtype=args.dtype and getattr(torch, args.dtype))
    for line in vocabulary_warnings(tok, items):
        print(line)
    lock = None
    try:  # one sample.py per folder (checkpoints.lock_folder), and --out looked at again under the lock
        lock = lock_folder(args.out, "sample")
        old = refuse_old_samples(args)
    except ValueError as e:
        if lock is not None:
            lock.close()
        p.error(str(e))
    for name in old:  # --overwrite: none of the last run's images stays among the new ones
        os.remove(os.path.join(args.out, name))
    recorded = {**{k: v for k, v in asdict(args).items() if k not in ("prompt", "prompts", "out")},
                **asdict(settings), "ckpt": ckpt}
    t0 = time.time()
    records, images = generate(janus, tok, items, settings, n=args.n, batch_size=args.rollout_batch, seed=args.seed,
                               levels=args.levels, reasoning_template=reasoning, compile=args.compile)
    write_samples(args, records, images, recorded, time.time() - t0, scorer)
    lock.close()
    return records


def write_samples(args: SampleConfig, records, images, recorded, elapsed, scorer):
    """Into --out: the PNGs, a grid per prompt and samples.jsonl; with rewards the scores, summary.json and
    the table; a captioned overview grid."""
    for rec, img in zip(records, images):
        rec["file"] = f"{rec['index']:04d}_{rec['sample']}.png"
        rec["seed"], rec["settings"] = args.seed, recorded
        save_png(img.numpy(), os.path.join(args.out, rec["file"]))
    for i in range(0, len(images), args.n):
        save_png(make_grid(images[i:i + args.n].numpy()), os.path.join(args.out, f"grid_{i // args.n:04d}.png"))
    print(f"{len(records)} images in {elapsed:.1f}s ({len(records) / elapsed:.2f} images/s) -> {args.out}")
    # the samples are on disk before scoring starts, so a failing reward model loses none of them
    write_records(records, os.path.join(args.out, "samples.jsonl"))
    if scorer is not None:
        summary = score(scorer, images, records, group_size=args.n)
        print(summary_table([(f"{summary['images']} images", summary)]))
        for k, n in summary.get("unchecked", {}).items():
            print(f"{k}: {n} of {summary['images']} images not checked (their prompts carry no GenEval metadata)")
        if "diversity" in summary:
            print(f"diversity (mean pairwise CLIP cosine distance within a prompt): {summary['diversity']:.4f}")
        write_json(os.path.join(args.out, "summary.json"), summary)
        write_records(records, os.path.join(args.out, "samples.jsonl"))  # now with each image's scores
    if len(records) <= 256:  # one captioned overview: a row per prompt, its plans and scores under the images
        save_png(make_grid(images.numpy(), ncol=args.n, captions=[caption(r) for r in records]),
                 os.path.join(args.out, "grid.png"))


def sample_files(folder) -> list:
    """The files an earlier sample.py run left in folder (images, grids, samples.jsonl, summary.json)."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [n for n in names if n.endswith(".png") or n in ("samples.jsonl", "summary.json")]


def caption(record):
    """Prompt, plan and scores of one sampled image, for the captioned grids."""
    lines = [record["prompt"], f"plan: {record['plan']}" if record["plan"] else "(no plan)"]
    scores = [f"{k} {v:.2f}" + (" pass" if record.get("strict", {}).get(k) else " fail" if k in record.get("strict", {})
                                else "") for k, v in record.get("scores", {}).items()]
    return "\n".join(lines + ([", ".join(scores)] if scores else []))


if __name__ == "__main__":
    main()
