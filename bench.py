"""Benchmarks on random weights (no download needed). Prints markdown tables for README.

  python bench.py load --preset janus-pro-7b        # peak memory of loading a bf16 sharded checkpoint
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import model as M


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


@torch.no_grad()
def write_random_checkpoint(cfg, folder, dtype=torch.bfloat16, weights="bin", shards=2):
    """Random weights of a preset's size in a published layout (Janus-Pro-7B: bf16, 2 .bin shards + index)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in M.Janus(cfg).state_dict().items()}
    state = {k: torch.empty(s, dtype=dtype).normal_(0, 0.02) for k, s in shapes.items()}
    os.makedirs(folder, exist_ok=True)
    M.save_state_dict(state, folder, weights=weights, shards=shards)
    M._write_json(os.path.join(folder, "config.json"), M.config_to_dict(cfg, dtype))
    return sum(v.numel() * v.element_size() for v in state.values())


def load_child(folder, dtype):
    """Runs in a fresh process: load, touch every weight with a forward pass, report peak RSS."""
    t0 = time.time()
    m = M.Janus.from_pretrained(folder, device="cpu", dtype=getattr(torch, dtype))
    t_load = time.time() - t0
    rss_after_load = peak_rss_gb()
    with torch.no_grad():  # touch every weight: a memory-mapped tensor is only read on use
        h = m(m.embed_text(torch.tensor([[1, 2, 3]])))
        m.text_logits(h), m.image_logits(h), m.embed_image(torch.tensor([[0]]))
        sum(float(p.float().sum()) for p in m.vq.parameters())
    print(f"RESULT load_s={t_load:.1f} peak_after_load_gb={rss_after_load:.2f} peak_after_use_gb={peak_rss_gb():.2f}")


def bench_load(args):
    cfg = M.preset(args.preset)
    folder = args.folder or tempfile.mkdtemp(prefix=f"{args.preset}-")
    if not os.path.exists(os.path.join(folder, "config.json")):
        print(f"writing random {args.preset} weights (bf16, {args.shards} .bin shards) to {folder} ...", flush=True)
        total = write_random_checkpoint(cfg, folder, shards=args.shards)
    else:
        total = sum(os.path.getsize(f) for f in M.weight_files(folder))
    out = subprocess.run([sys.executable, __file__, "load-child", folder, args.dtype],
                         capture_output=True, text=True, check=True).stdout
    res = dict(kv.split("=") for kv in out.split("RESULT ")[1].split())
    print(f"\n| preset | checkpoint | load dtype | weights (GiB) | load (s) | peak RSS after load (GiB) "
          f"| peak RSS after a forward (GiB) |\n|---|---|---|---|---|---|---|\n"
          f"| {args.preset} | bf16, {args.shards} .bin shards | {args.dtype} | {total / 2**30:.2f} | {res['load_s']} "
          f"| {res['peak_after_load_gb']} | {res['peak_after_use_gb']} |")
    if not args.keep and not args.folder:
        import shutil
        shutil.rmtree(folder)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "load-child":
        load_child(sys.argv[2], sys.argv[3])
        sys.exit()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("load", help="peak memory of loading a checkpoint written with random weights")
    pl.add_argument("--preset", default="janus-pro-7b", choices=sorted(M.PRESETS))
    pl.add_argument("--dtype", default="bfloat16")
    pl.add_argument("--shards", type=int, default=2)
    pl.add_argument("--folder", help="reuse (or keep) the random checkpoint here")
    pl.add_argument("--keep", action="store_true")
    args = p.parse_args()
    {"load": bench_load}[args.cmd](args)
