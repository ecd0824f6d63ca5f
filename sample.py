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
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--score", default=None, help="comma-separated rewards to score with, e.g. shapes or geneval,clip")
    p.add_argument("--reward-ckpt", nargs="*", default=[], metavar="NAME=PATH", help="reward checkpoint files")
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
    if args.score:  # build (and check the files of) the rewards before spending time on sampling
        import rewards
        scorer = rewards.build_rewards(args.score, args.reward_ckpt, device=janus.language_model.lm_head.weight.device)
    reasoning = R.load_reasoning_prompt(args.reasoning_prompt, ckpt)
    os.makedirs(args.out, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("prompt", "prompts", "out")}
    settings["ckpt"] = ckpt

    g = torch.Generator(device=janus.language_model.lm_head.weight.device).manual_seed(args.seed)
    batches = [items[i:i + args.batch_size] for i in range(0, len(items), args.batch_size)]
    bar = R.Progress(len(batches) * janus.cfg.image_tokens, desc="image tokens")
    records, all_images, t0 = [], [], time.time()
    for b, batch in enumerate(batches):
        s = R.sample_t2i(janus, tok, [it["prompt"] for it in batch], n=args.n, reasoning_prompt=reasoning,
                         generator=g, compile=args.compile, progress=lambda i, N: bar.update(1),
                         **sampling_kwargs(args))
        images = decode_images(janus, s.codes)
        for j, item in enumerate(batch):
            idx = b * args.batch_size + j
            rows = range(j * args.n, (j + 1) * args.n)
            for k, r in enumerate(rows):
                file = f"{idx:04d}_{k}.png"
                save_png(images[r].numpy(), os.path.join(args.out, file))
                records.append({"index": idx, "sample": k, "prompt": item["prompt"], "plan": s.plans[r],
                                "image_tokens": s.codes[r].tolist(), "file": file, "seed": args.seed,
                                "metadata": item, "settings": settings})
            save_png(make_grid(images[rows.start:rows.stop].numpy()), os.path.join(args.out, f"grid_{idx:04d}.png"))
        all_images.append(images)
    elapsed = time.time() - t0
    print(f"{len(records)} images in {elapsed:.1f}s ({len(records) / elapsed:.2f} images/s) -> {args.out}")

    if scorer is not None:
        import rewards
        images = torch.cat(all_images)
        summary = rewards.evaluate(scorer, images, [r["metadata"] for r in records], records, group_size=args.n)
        print(rewards.format_summary(summary))
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    with open(os.path.join(args.out, "samples.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


if __name__ == "__main__":
    main()
