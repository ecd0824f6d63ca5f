"""Sample images with T2I-R1's two-level chain of thought: a plan, then the image.

  python sample.py                                         # the shapes world's tiny base (trained first if absent)
  python sample.py --ckpt ~/models/Janus-Pro-7B --prompt "a red apple left of a blue cup" --n 4
  python sample.py --ckpt DIR --prompts prompts.jsonl --no-cot --cfg 5 --temperature 0
  python sample.py --prompts shapes_test.jsonl --score shapes   # evaluation: per-tag GenEval accuracy

Writes PNGs, one grid per prompt and samples.jsonl (one line per image) into --out.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image

import t2i_r1 as R
from model import Janus, Tokenizer
from vq import to_uint8


def read_prompts(path):
    """Plain lines, or JSON lines with a "prompt" field (GenEval metadata, T2I-R1's prompt file).
    Returns a list of dicts that each hold at least "prompt"."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path} not found")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
                if not isinstance(d.get("prompt"), str) or not d["prompt"].strip():
                    raise ValueError(f"{path}:{n}: a JSON line needs a non-empty \"prompt\" string")
                out.append(d)
            else:
                out.append({"prompt": line})
    if not out:
        raise ValueError(f"prompt file {path} holds no prompts")
    return out


def make_grid(images, ncol=None, pad=2):
    """uint8 (n, H, W, 3) -> one uint8 image with the n images in a grid, ncol per row."""
    images = np.asarray(images)
    n, H, W, C = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    grid = np.full((nrow * (H + pad) + pad, ncol * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    return grid


def save_png(image, path):
    Image.fromarray(np.asarray(image)).save(path)


@torch.no_grad()
def decode_images(janus, codes, batch=16):
    """VQ codes (B, N) -> uint8 images (B, S, S, 3), decoded a few at a time to bound memory."""
    return torch.cat([to_uint8(janus.vq.decode_code(codes[i:i + batch])).cpu() for i in range(0, len(codes), batch)])


def add_sampling_args(p):
    """Sampling settings shared by sample.py and train.py."""
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance weight (1 = none)")
    p.add_argument("--temperature", type=float, default=1.0, help="image tokens; 0 = argmax")
    p.add_argument("--top-k", type=int, default=None, help="image tokens: keep the k most likely")
    p.add_argument("--text-temperature", type=float, default=1.0, help="plan tokens; 0 = argmax")
    p.add_argument("--text-top-k", type=int, default=None)
    p.add_argument("--text-top-p", type=float, default=None)
    p.add_argument("--max-plan-tokens", type=int, default=96)
    p.add_argument("--no-cot", action="store_true", help="skip the plan: the image prompt is the prompt itself")
    p.add_argument("--reasoning-prompt", default=None,
                   help="file holding the reasoning request with a {prompt} placeholder")


def sampling_kwargs(args):
    return dict(cot=not args.no_cot, cfg_weight=args.cfg, temperature=args.temperature, top_k=args.top_k,
                text_temperature=args.text_temperature, text_top_k=args.text_top_k,
                text_top_p=args.text_top_p, max_plan_tokens=args.max_plan_tokens)


def resolve_device(device, dtype):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}[dtype]
    return device, dtype


def load(ckpt, device=None, dtype=None):
    """Model and tokenizer from a checkpoint folder; None means the shapes world's base."""
    if ckpt is None:
        import shapes
        ckpt = shapes.ensure_base()
    device, dtype = resolve_device(device, dtype)
    return Janus.from_pretrained(ckpt, device=device, dtype=dtype), Tokenizer.from_pretrained(ckpt), ckpt


def generate(janus, tok, items, *, n=4, batch_size=4, seed=0, reasoning_prompt=R.REASONING_PROMPT,
             compile=False, show_progress=True, **sampling):
    """Sample n images for each item ({"prompt": ..., metadata}), batch_size prompts at a time, with one
    generator seeded once (the same seed and batch size give the same output).
    Returns records (one dict per image) and uint8 images (len(items) * n, S, S, 3)."""
    device = janus.language_model.lm_head.weight.device
    g = torch.Generator(device=device).manual_seed(seed)
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    bar = R.Progress(len(batches) * janus.cfg.image_tokens, desc="image tokens") if show_progress else None
    records, images = [], []
    for b, batch in enumerate(batches):
        s = R.sample_t2i(janus, tok, [it["prompt"] for it in batch], n=n, reasoning_prompt=reasoning_prompt,
                         generator=g, compile=compile, progress=bar and (lambda i, N: bar.update(1)), **sampling)
        images.append(decode_images(janus, s.codes))
        for r in range(len(s.prompts)):
            j, k = divmod(r, n)
            records.append({"index": b * batch_size + j, "sample": k, "prompt": s.prompts[r], "plan": s.plans[r],
                            "image_tokens": s.codes[r].tolist(), "metadata": batch[j]})
    return records, torch.cat(images)


def score(scorer, images, records, group_size=None):
    """Score images with a rewards.RewardEnsemble; per-image scores go into the records. Returns a summary:
    mean of every reward, GenEval per-tag accuracy and overall score for the rule rewards (geneval, shapes)
    on prompts that carry a tag, and, when a CLIP checkpoint is at hand, the diversity of each prompt's images."""
    import rewards
    scores, info = scorer(images, [r["metadata"] for r in records])
    summary = {"images": len(records), "rewards": {k: float(v.mean()) for k, v in scores.items()}}
    for name, v in scores.items():
        strict = info[name].get("strict")
        for i, rec in enumerate(records):
            rec.setdefault("scores", {})[name] = float(v[i])
            if strict is not None:
                rec.setdefault("strict", {})[name] = bool(strict[i])
        tagged = [(rec["metadata"]["tag"], rec["strict"][name]) for rec in records
                  if strict is not None and "tag" in rec["metadata"]]
        if tagged:
            summary[f"geneval_{name}"] = rewards.geneval_summary(tagged)
    clip = scorer.rewards.get("clip")
    if clip is not None and group_size and group_size > 1:
        emb = clip.image_embeddings(images).view(-1, group_size, clip.clip.config.projection_dim)
        summary["diversity"] = rewards.diversity(emb)
    return summary


def format_summary(summary) -> str:
    """The summary as markdown: GenEval per-tag accuracy tables, then the mean rewards."""
    lines = []
    for key, g in summary.items():
        if key.startswith("geneval_"):
            tags = sorted(g["per_tag"])
            lines += [f"GenEval ({key[8:]} detector), strict accuracy per tag:", "",
                      "| " + " | ".join(tags) + " | overall |", "|---" * (len(tags) + 1) + "|",
                      "| " + " | ".join(f"{g['per_tag'][t]:.3f}" for t in tags) + f" | {g['overall']:.3f} |", ""]
    lines.append("mean rewards: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["rewards"].items()))
    if "diversity" in summary:
        lines.append(f"diversity (mean pairwise CLIP cosine distance within a prompt): {summary['diversity']:.4f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="Janus-Pro folder (default: the shapes world base)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None)
    src.add_argument("--prompts", default=None, help="file: plain lines or JSON lines with a \"prompt\" field")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per generation batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/samples")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (GPUs; on CPU a few percent faster than eager after a compile of ~20 s, see README)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--score", default=None, metavar="NAMES",
                   help="score with these rewards (e.g. shapes, or geneval,clip,aesthetic) and print GenEval accuracy")
    p.add_argument("--reward-ckpt", nargs="*", default=[], metavar="NAME=PATH", help="reward checkpoints, see README")
    add_sampling_args(p)
    args = p.parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        p.error("--n and --batch-size must be at least 1")

    janus, tok, ckpt = load(args.ckpt, args.device, args.dtype)
    if args.prompts:
        items = read_prompts(args.prompts)
    elif args.prompt is not None:
        if not args.prompt.strip():
            p.error("--prompt is empty")
        items = [{"prompt": args.prompt}]
    else:
        import shapes
        items = shapes.example_prompts()
    scorer = None
    if args.score:  # build the rewards (and check their files) before spending time on sampling
        import rewards
        scorer = rewards.RewardEnsemble(rewards.parse_rewards(args.score), rewards.parse_reward_ckpt(args.reward_ckpt),
                                        device=janus.language_model.lm_head.weight.device)
        scorer.check_metadata(items)
    reasoning = R.load_reasoning_prompt(args.reasoning_prompt, ckpt)
    os.makedirs(args.out, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("prompt", "prompts", "out")}
    settings["ckpt"] = ckpt

    t0 = time.time()
    records, images = generate(janus, tok, items, n=args.n, batch_size=args.batch_size, seed=args.seed,
                               reasoning_prompt=reasoning, compile=args.compile, **sampling_kwargs(args))
    elapsed = time.time() - t0
    for rec, img in zip(records, images):
        rec["file"] = f"{rec['index']:04d}_{rec['sample']}.png"
        rec["seed"], rec["settings"] = args.seed, settings
        save_png(img.numpy(), os.path.join(args.out, rec["file"]))
    for i in range(0, len(images), args.n):
        save_png(make_grid(images[i:i + args.n].numpy()), os.path.join(args.out, f"grid_{i // args.n:04d}.png"))
    print(f"{len(records)} images in {elapsed:.1f}s ({len(records) / elapsed:.2f} images/s) -> {args.out}")
    if scorer is not None:
        summary = score(scorer, images, records, group_size=args.n)
        print(format_summary(summary))
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    with open(os.path.join(args.out, "samples.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


if __name__ == "__main__":
    main()
