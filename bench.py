"""Benchmarks on random weights (no download needed). Prints markdown tables for docs/speed.md.

  python bench.py gpu                                       # GPU: docs/speed.md's GPU section, every table of it
  python bench.py speed --preset cpu-768 --batch 1 4 --hf   # CPU: image-token throughput, ours vs transformers
  python bench.py speed --preset janus-pro-1b --batch 1 16  # GPU: eager vs compiled, bandwidth floor
  python bench.py load --preset janus-pro-7b                # peak memory of loading a bf16 sharded checkpoint
  python bench.py train --preset janus-pro-1b               # GPU: seconds and peak memory of a BiCoT-GRPO step
  python bench.py train --preset janus-pro-7b --lora-rank 64
  python bench.py memory --preset janus-pro-7b --lora-rank 64  # no GPU: a step's GPU memory, estimated from shapes
  python bench.py rl                                        # CPU: seconds per shapes-world RL step (train.py defaults)

Speed compares, in one run and on one machine: our sampler eager, with the compiled decode step, eager
with every linear layer pinned to one CPU matmul kernel (F.linear: nn.Linear's own, MKL's x W^T; "W x^T";
oneDNN: see kernels.Linear), and without the KV cache (the whole sequence recomputed every step, timed over
the first --nocache-tokens tokens only, since it slows down further on), plus transformers' Janus image
generation with --hf. Each column is warmed up once, then the columns run in turn --repeats times and the
best run counts, so that other work on the machine slows every column alike. It also prints the bandwidth
floor: bytes a decode step reads (weights, and the KV cache at its average fill) over the measured copy
bandwidth. A column that raises prints its error; the others go on.

`gpu` runs, in one command, the sampling columns at batch 1 and 16 (Janus-Pro-1B size, bf16) against that
floor, one BiCoT-GRPO step of a Janus-Pro-1B full fine-tune and of Janus-Pro-7B LoRA at T2I-R1's per-GPU
batch, and the shapes world's `python train.py`; its flags shrink every part (the tests run it on CPU).

Nothing here departs from the paper: it times the code the other files run (train.py's own steps, the
t2i_r1.py sampler), on random weights where the published ones cannot be downloaded.
"""

import argparse
import contextlib
import functools
import gc
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import torch

import checkpoints as C
import fast_decode as FD
import kernels as K
import model as M
import settings
import shapes
import t2i_r1 as R
import train as T

# sizes for speed runs: the published presets, and a CPU-sized model for the comparison with transformers
SIZES = {**{k: dict(v) for k, v in M.PRESETS.items()},
         "cpu-768": dict(n_layer=8, n_head=12, n_kv_head=12, n_embd=768, intermediate_size=2048)}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


@torch.no_grad()
def write_random_checkpoint(cfg, folder, dtype=torch.bfloat16, weights="bin", shards=2):
    """Random weights of a preset's size in a published layout (Janus-Pro-7B: bf16, 2 .bin shards + index)."""
    with torch.device("meta"):
        sizes = {k: v.shape for k, v in M.Janus(cfg).state_dict().items()}
    state = {k: torch.empty(s, dtype=dtype).normal_(0, 0.02) for k, s in sizes.items()}
    os.makedirs(folder, exist_ok=True)
    C.save_state_dict(state, folder, weights=weights, shards=shards)
    C.write_json(os.path.join(folder, "config.json"), C.config_to_dict(cfg, dtype))
    return sum(v.numel() * v.element_size() for v in state.values())


def load_child(folder, dtype):
    """Runs in a fresh process: load, touch every weight with a forward pass, report peak RSS."""
    t0 = time.time()
    m = C.from_pretrained(folder, device="cpu", dtype=getattr(torch, dtype))
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
        total = sum(os.path.getsize(f) for f in C.weight_files(folder))
    out = subprocess.run([sys.executable, __file__, "load-child", folder, args.dtype],
                         capture_output=True, text=True, check=True).stdout
    res = dict(kv.split("=") for kv in out.split("RESULT ")[1].split())
    print(f"\n| preset | checkpoint | load dtype | weights (GiB) | load (s) | peak RSS after load (GiB) "
          f"| peak RSS after a forward (GiB) |\n|---|---|---|---|---|---|---|\n"
          f"| {args.preset} | bf16, {args.shards} .bin shards | {args.dtype} | {total / 2**30:.2f} | {res['load_s']} "
          f"| {res['peak_after_load_gb']} | {res['peak_after_use_gb']} |")
    if not args.keep and not args.folder:
        shutil.rmtree(folder)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


@torch.no_grad()
def generate_nocache(janus, prompts, pad_id, cfg_weight, steps, generator):
    """The baseline without a KV cache: every step runs the whole sequence again."""
    ids, mask = R.pad_tokens(prompts, pad_id, janus.device)
    ids, mask = torch.cat([ids, R.unconditional(ids, mask, pad_id)]), torch.cat([mask, mask])
    codes = torch.zeros(len(prompts), 0, dtype=torch.long, device=ids.device)
    for _ in range(steps):
        x = torch.cat([janus.embed_text(ids), janus.embed_image(torch.cat([codes, codes]))], 1)
        full = torch.cat([mask, torch.ones_like(codes, dtype=torch.bool).repeat(2, 1)], 1)
        logits = R.guide(janus.image_logits(janus(x, mask=full)[:, -1]), cfg_weight)
        codes = torch.cat([codes, R.sample_from_logits(logits, 1.0, generator=generator)[:, None]], 1)
    return codes


def build_hf(cfg, vocab_size):
    """transformers' Janus with our config and random weights, plus our model loaded from its files."""
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig,
                              LlamaConfig)
    vq = cfg.vq
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.n_kv_head, tie_word_embeddings=False)
    vision = JanusVisionConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=vq.grid * 16, patch_size=16, num_image_tokens=vq.num_tokens,
                               projection_dim=cfg.n_embd)
    vqc = JanusVQVAEConfig(embed_dim=vq.codebook_embed_dim, num_embeddings=vq.codebook_size, base_channels=vq.ch,
                           channel_multiplier=list(vq.encoder_ch_mult), num_res_blocks=vq.num_res_blocks,
                           latent_channels=vq.z_channels, projection_dim=cfg.n_embd, image_token_embed_dim=cfg.n_embd)
    ref = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vqc,
                                                    tie_word_embeddings=False)).eval()
    folder = tempfile.mkdtemp(prefix="hf-janus-")
    ref.save_pretrained(folder)
    ours = C.from_pretrained(folder, device="cpu", dtype=torch.float32)
    shutil.rmtree(folder)
    return ref, ours


def bandwidth_gbs(device, mb=1024):
    """Measured device copy bandwidth (read + write bytes per second)."""
    x = torch.empty(mb * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    best = float("inf")
    for _ in range(10):
        t, _ = timed(lambda: y.copy_(x), device)
        best = min(best, t)
    return 2 * x.numel() / best / 1e9


def decode_weight_bytes(janus):
    """Bytes of the weights one image decode step reads: decoder layers, final norm, image head and aligner."""
    skip = ("language_model.model.embed_tokens.", "language_model.lm_head.", "gen_vision_model.", "gen_embed.")
    return sum(p.numel() * p.element_size() for n, p in janus.named_parameters() if not n.startswith(skip))


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform) and the cores torch uses."""
    name = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    n = torch.get_num_threads()
    return f"{name}, {n} thread{'s' if n > 1 else ''}"


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


@contextlib.contextmanager
def cpu_kernel(kernel):
    """Pin every kernels.Linear on CPU to one matmul kernel (None: each picks its own, as in normal use)."""
    old = K.CPU_KERNEL
    K.CPU_KERNEL = kernel
    try:
        yield
    finally:
        K.CPU_KERNEL = old


# speed modes that pin kernels.Linear's CPU kernel; "F.linear" is nn.Linear's own (MKL's GEMM as x W^T)
PINNED = {"F.linear": "x W^T", "W x^T": "W x^T", "oneDNN": "oneDNN"}


def speed_model(preset, vocab_size, device, dtype, hf=False):
    """Random weights of a size on the device -> (our model, transformers' Janus or None). With hf, ours is
    loaded from transformers' files (the same weights); if transformers fails, its error is printed and
    ours gets random weights of its own."""
    cfg = M.JanusConfig(**{**SIZES[preset], **({"vocab_size": vocab_size} if vocab_size else {})})
    torch.manual_seed(0)
    if hf:
        pair = attempt("transformers' Janus", build_hf, cfg, cfg.vocab_size)
        if pair is not None:
            return pair[1].to(device, dtype), pair[0].to(device, dtype)
    with torch.device(device):
        return M.Janus(cfg).to(dtype).eval(), None


def speed_columns(janus, ref, B, modes, w, prompt_len, repeats, nocache_tokens=48, backend="inductor"):
    """Image tokens per second of each sampler variant (mode) at batch B, and of transformers' Janus (ref).
    Each column is warmed up once, then the columns run in turn `repeats` times, so that a machine busy
    with something else slows every column alike; the best run counts. A column that raises prints its
    error and drops out; the others go on."""
    device, N = janus.device, janus.cfg.image_tokens
    prompts = [[1] + [5 + (i * 7 + j) % 90 for j in range(prompt_len - 2)] + [2] for i in range(B)]
    g = torch.Generator(device=device).manual_seed(0)
    runs = {}  # column -> (function, image tokens it generates)
    for mode in modes:
        if mode == "nocache":
            K = min(nocache_tokens, N)
            runs[mode] = (lambda K=K: generate_nocache(janus, prompts, 0, w, K, g), B * K)
        else:
            runs[mode] = (lambda mode=mode: R.generate_images(janus, *R.pad_tokens(prompts, 0, device), pad_id=0,
                                                              cfg_weight=w, generator=g,
                                                              compile=backend if mode == "compiled" else False),
                          B * N)
    if ref is not None:
        from transformers import GenerationConfig
        gen = GenerationConfig(bos_token_id=1, pad_token_id=0, do_sample=True, guidance_scale=w,
                               generation_kwargs={"boi_token_id": 2})
        ids = torch.tensor(prompts, device=device)
        runs["transformers"] = (lambda: ref.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                                     generation_config=gen), B * N)
    result = {}
    for rep in range(repeats + 1):
        for mode, (fn, tokens) in list(runs.items()):
            with cpu_kernel(PINNED[mode]) if mode in PINNED else contextlib.nullcontext():
                t = attempt(f"batch {B} {mode}", timed, fn, device)
            if t is None:
                del runs[mode]
            elif rep:
                result[mode] = max(result.get(mode, 0.0), tokens / t[0])
    for mode, v in result.items():
        print(f"  batch {B} {mode}: {v:.1f} tokens/s", flush=True)
    return result


def kv_bytes(cfg, B, prompt_len, itemsize):
    """Bytes of the KV cache a guided decode step at batch B reads at its average fill (2B rows)."""
    return 2 * cfg.n_layer * 2 * B * cfg.n_kv_head * cfg.head_dim * (prompt_len + cfg.image_tokens / 2) * itemsize


def bench_speed(args):
    device = settings.default_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    janus, ref = speed_model(args.preset, args.vocab_size, device, dtype, args.hf)
    cfg, N, w = janus.cfg, janus.cfg.image_tokens, args.cfg_weight
    print(f"{args.preset}: hidden {cfg.n_embd}, {cfg.n_layer} layers, {N} image tokens, cfg {w}, {dtype}, "
          f"{device_name(device)}, torch {torch.__version__}; best of {args.repeats} interleaved runs per column",
          flush=True)
    rows = [(B, speed_columns(janus, ref, B, args.modes, w, args.prompt_len, args.repeats, args.nocache_tokens))
            for B in args.batch]
    modes = [*args.modes] + (["transformers"] if args.hf else [])  # a failed column shows as "failed"
    gbs, wbytes = bandwidth_gbs(device), decode_weight_bytes(janus)  # the floor: bytes read over bandwidth
    kv = lambda B: kv_bytes(cfg, B, args.prompt_len, dtype.itemsize)
    print(f"\ncopy bandwidth {gbs:.1f} GB/s; a decode step reads {wbytes / 1e6:.0f} MB of weights "
          f"+ the KV cache ({kv(1) / 1e6:.0f} MB per prompt at its average fill)")
    hf = args.hf
    print("\n| batch | " + " | ".join(f"{m} (tokens/s)" for m in modes) + " | images/s (best) |"
          + (" ours / transformers |" if hf else "") + " floor (tokens/s) | best / floor |")
    print("|---" * (len(modes) + 4 + hf) + "|")
    for B, r in rows:
        best = max([v for k, v in r.items() if k in ("eager", "compiled")], default=float("nan"))
        line = f"| {B} | " + " | ".join(f"{r[m]:.1f}" if m in r else "failed" for m in modes) + f" | {best / N:.3f} |"
        if hf:
            line += f" {best / r['transformers']:.2f}x |" if "transformers" in r else " - |"
        floor_tps = B / ((wbytes + kv(B)) / (gbs * 1e9))
        print(line + f" {floor_tps:.1f} | {best / floor_tps:.2f} |")


def bench_gpu(args):
    """docs/speed.md's GPU section: sampling throughput against the bandwidth floor, a BiCoT-GRPO step's time and peak
    memory for a full fine-tune and for LoRA, the shapes world's train.py. Each part, and each column in it,
    that fails prints its error; the others go on."""
    device = settings.default_device(args.device)
    print(f"{device_name(device)}, torch {torch.__version__}", flush=True)
    for part in args.parts:
        t0 = time.perf_counter()
        attempt(part, {"sampling": gpu_sampling, "training": gpu_training, "shapes": gpu_shapes}[part], args, device)
        print(f"({part}: {time.perf_counter() - t0:.0f} s)", flush=True)


def gpu_sampling(args, device):
    """Eager and compiled image-token throughput at each batch, beside the floor: the bytes a guided decode
    step must read (the weights, the KV cache at its average fill) over the measured copy bandwidth."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    janus, ref = speed_model(args.preset, None, device, dtype, args.hf)
    cfg, N = janus.cfg, janus.cfg.image_tokens
    rows = [(B, speed_columns(janus, ref, B, ["eager", "compiled"], args.cfg_weight, args.prompt_len, args.repeats,
                              backend=args.backend)) for B in args.batch]
    gbs, wbytes = bandwidth_gbs(device), decode_weight_bytes(janus)
    print(f"\nSampling, {args.preset} size ({cfg.n_layer} layers x {cfg.n_embd}), {dtype}, CFG {args.cfg_weight}, {N} image "
          f"tokens, {args.prompt_len}-token prompts; copy bandwidth {gbs:.0f} GB/s, {wbytes / 1e9:.2f} GB of weights "
          f"read per step\n")
    modes = ["eager", "compiled"] + (["transformers"] if args.hf else [])  # a failed column shows as "failed"
    print("| batch | " + " | ".join(f"{m} (tokens/s)" for m in modes)
          + " | images/s (best) | floor (ms / step) | best step (ms) | step / floor |")
    print("|---" * (len(modes) + 5) + "|")
    for B, r in rows:
        best = max([v for k, v in r.items() if k in ("eager", "compiled")], default=float("nan"))
        floor_ms = (wbytes + kv_bytes(cfg, B, args.prompt_len, dtype.itemsize)) / (gbs * 1e9) * 1e3
        step_ms = B / best * 1e3  # one step samples a token of each of the B images
        print(f"| {B} | " + " | ".join(f"{r[m]:.1f}" if m in r else "failed" for m in modes)
              + f" | {best / N:.2f} | {floor_ms:.4g} | {step_ms:.4g} | {step_ms / floor_ms:.2f} |")
    del janus, ref
    FD.release_decoding()
    torch._dynamo.reset()  # and with it the CUDA graphs' memory


def gpu_training(args, device):
    """Seconds per BiCoT-GRPO step and peak memory at T2I-R1's per-GPU batch (one prompt, G samples in one
    micro-batch), plans up to T2I-R1's length, gradient checkpointing; random weights of published sizes."""
    timing = ("one step, its warm-up included" if args.train_steps == 1
              else f"mean of the {args.train_steps - 1} step(s) after the first")
    print(f"\nBiCoT-GRPO on random weights: G = {args.group_size} samples of one prompt per step and per "
          f"micro-batch, plans of {args.max_plan_tokens} tokens (random weights never write EOS), gradient "
          f"checkpointing; s / step: {timing}\n")
    print("| preset | training | s / step | of which rollout (s) | peak memory (GiB) |\n|---|---|---|---|---|",
          flush=True)
    for preset, rank in ((args.full_preset, 0), (args.lora_preset, args.lora_rank)):
        what = f"LoRA rank {rank}" if rank else "full fine-tune"
        got = attempt(f"{preset} {what}", train_column, preset, device, rank, steps=args.train_steps,
                      group_size=args.group_size, prompts_per_step=1, micro_batch=args.group_size,
                      max_plan_tokens=args.max_plan_tokens, grad_checkpointing=True)
        cells = "failed | failed | failed" if got is None else " | ".join(f"{x:.2f}" for x in got[:3])
        print(f"| {preset} | {what}{'' if got is None else f', {got[3]}'} | {cells} |", flush=True)


def gpu_shapes(args, device):
    """Wall time of the shapes world's `python train.py` (README's quick start) as a command of its own."""
    flags = shlex.split(args.shapes_flags)
    with tempfile.TemporaryDirectory(prefix="bench-shapes-") as out:
        cmd = [sys.executable, "train.py", "--out", out, "--device", str(device), *flags]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"train.py exited with {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}")
    shown = " ".join(["python train.py", *flags])
    print(f"\n| command | wall time (s) |\n|---|---|\n| `{shown}` | {wall:.0f} |", flush=True)


def attempt(what, fn, *args, **kwargs):
    """fn(*args, **kwargs), or None after printing what failed: one failing column must not lose the others."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 (any error of a column is reported, and the benchmark goes on)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"  {what}: failed: {type(e).__name__}: {first}", flush=True)
        return None
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def bench_train(args):
    """A few BiCoT-GRPO steps of train.py on random weights of a preset: seconds per step and peak memory."""
    device = settings.default_device(args.device)
    sec, roll, peak, dtype = train_column(args.preset, device, args.lora_rank, steps=args.steps,
                                          group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                                          micro_batch=args.micro_batch, max_plan_tokens=args.max_plan_tokens,
                                          grad_checkpointing=args.grad_checkpointing, compile=args.compile,
                                          dtype=args.dtype)
    what = (f"LoRA rank {args.lora_rank}" if args.lora_rank else "full fine-tune") + f", {dtype}"
    print(f"\n| preset | training | G x prompts | device | s / step | of which rollout (s) | peak memory (GiB) |"
          f"\n|---|---|---|---|---|---|---|\n| {args.preset} | {what} | {args.group_size} x {args.prompts_per_step} "
          f"| {device_name(device)} | {sec:.2f} | {roll:.2f} | {peak:.2f} |")


def train_column(preset, device, lora_rank, *, steps, group_size, prompts_per_step, micro_batch, max_plan_tokens,
                 grad_checkpointing, compile=False, dtype=None):
    """train.py's steps on random weights of a preset -> (seconds per step, of which rollout, peak memory in
    GiB: allocated on a GPU, the process's peak RSS on CPU; the dtype train.py computed in). The checkpoint
    gets the shapes world's tokenizer and prompts and the `shapes` reward, so nothing needs a download; random
    weights write random plans (never an EOS, so every plan runs to max_plan_tokens) and noise images."""
    cfg = M.preset(preset)
    folder = tempfile.mkdtemp(prefix=f"{preset}-train-")
    try:
        write_random_checkpoint(cfg, folder, weights="safetensors", shards=1)
        shapes.make_tokenizer().save(os.path.join(folder, "tokenizer.json"))
        flags = ["--rewards", "shapes", "--steps", str(steps), "--group-size", str(group_size),
                 "--prompts-per-step", str(prompts_per_step), "--rollout-batch", str(prompts_per_step),
                 "--micro-batch", str(micro_batch), "--max-plan-tokens", str(max_plan_tokens),
                 "--lora-rank", str(lora_rank), "--device", str(device)]
        flags += ["--grad-checkpointing"] if grad_checkpointing else []
        flags += ["--dtype", dtype] if dtype else []
        flags += ["--compile"] if compile else []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run_cfg, sec, roll = time_steps(folder, *flags)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gb()
        return sec, roll, peak, T.resolve_defaults(run_cfg).dtype
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def time_steps(ckpt, *flags):
    """train.py from ckpt with these flags, quietly, in a temporary folder, no evaluation, samples or periodic
    checkpoints -> (its config, mean seconds per step, of which rollout) over the steps after the first (a
    warm-up that also measures kernels.Linear's kernels), unless there is only one."""
    with tempfile.TemporaryDirectory(prefix="bench-run-") as out:
        cfg = T.parse_args(["--ckpt", ckpt, "--out", out, "--eval-every", "0", "--sample-every", "0",
                            "--save-every", "0", *flags])
        _, metrics = T.train(cfg, log=lambda *a, **k: None)
    steps = [m for m in metrics if "rollout_seconds" in m]
    steps = steps[1:] or steps
    return cfg, sum(m["seconds"] for m in steps) / len(steps), sum(m["rollout_seconds"] for m in steps) / len(steps)


def memory_estimate(cfg: M.JanusConfig, lora_rank=0, group=8, micro_batch=8, request=200, image_prompt=40, plan=100,
                    cfg_logp=False):
    """GiB a BiCoT-GRPO step on one GPU holds, estimated from parameter counts and tensor shapes (train.py's
    precision: float32 master weights for what trains, bf16 for what is frozen and for the compute; gradient
    checkpointing; one prompt's group of samples per sampling call, guidance rows doubling the image rows).
    Returns {part: GiB} for what the step keeps (weights, gradients, AdamW) and for its two peaks: the rollout
    (KV caches, then the VQ decoder) and the update (activations). Not counted: CUDA's context (~0.5 GiB), the
    allocator's slack, the reward models."""
    with torch.device("meta"):
        janus = M.Janus(cfg)
    lm = sum(p.numel() for p in janus.language_model.parameters())
    every = sum(p.numel() for p in janus.parameters())
    H, I, L, kv = cfg.n_embd, cfg.intermediate_size, cfg.n_layer, cfg.n_kv_head * cfg.head_dim
    adapters = L * lora_rank * (6 * H + 2 * kv + 3 * (H + I)) if lora_rank else 0  # q, o; k, v; the MLP
    trained = adapters or lm
    frozen = every if lora_rank else every - lm
    gib, bf16 = 2**30, 2
    cache = lambda rows, T: 2 * L * rows * T * kv * bf16  # keys and values of every layer
    head_f32 = 2**28 * (1 if lora_rank else 1.5)  # model.float32_logits: a 256 MiB block of the head at a time
    t_text, t_image = request + plan, image_prompt + plan + cfg.image_tokens
    checkpointed = L * micro_batch * (t_text + t_image * (2 if cfg_logp else 1)) * H * bf16  # each layer's input
    layer = 2 * micro_batch * t_image * (2 if cfg_logp else 1) * (4 * H + 4 * I) * bf16  # one layer recomputed
    vq_decode = 4 * group * cfg.vq.ch * cfg.vq.image_size ** 2 * 4  # ~4 full-resolution float32 activations
    kept = {"trained weights (float32)": trained * 4, "gradients (float32)": trained * 4,
            "AdamW moments (float32)": trained * 8, "frozen weights (bf16)": frozen * bf16,
            "KL reference (bf16)": 0 if lora_rank else every * bf16}
    rollout = {"bf16 casts of trained weights": trained * bf16,
               "KV cache (image rows with guidance)": max(cache(group, t_text), cache(2 * group, t_image)),
               "VQ decoder (after the cache is freed)": vq_decode}
    update = {"bf16 casts of trained weights": trained * bf16, "head blocks in float32": head_f32,
              "checkpointed layer inputs": checkpointed, "one layer recomputed, its gradients": layer,
              "logits, two 256 MiB chunks": 2 * 2**28}
    kept_sum = sum(kept.values())
    return {**{k: v / gib for k, v in kept.items()},
            **{f"rollout: {k}": v / gib for k, v in rollout.items()},
            **{f"update: {k}": v / gib for k, v in update.items()},
            # gradients are freed after each step; the decoder runs once the cache is gone
            "peak: rollout": (kept_sum - trained * 4 + sum(rollout.values()) - min(vq_decode, rollout[
                "KV cache (image rows with guidance)"])) / gib,
            "peak: update": (kept_sum + sum(update.values())) / gib}


def bench_memory(args):
    """Print memory_estimate's table for a preset, a column per plan length."""
    cfg = M.preset(args.preset)
    plans = args.plan_tokens
    est = [memory_estimate(cfg, args.lora_rank, args.group_size, args.micro_batch, plan=p,
                           cfg_logp=args.image_logp == "cfg") for p in plans]
    what = f"LoRA rank {args.lora_rank}" if args.lora_rank else "full fine-tune"
    print(f"{args.preset}, {what}: estimated GiB per GPU (G = {args.group_size}, one prompt per sampling call, "
          f"micro-batch {args.micro_batch}, gradient checkpointing, --image-logp {args.image_logp})\n")
    print("| part | " + " | ".join(f"plans of {p} tokens" for p in plans) + " |\n" + "|---" * (len(plans) + 1) + "|")
    for k in est[0]:
        print(f"| {'**' + k + '**' if k.startswith('peak') else k} | " + " | ".join(f"{e[k]:.2f}" for e in est) + " |")


def bench_rl(args):
    """Seconds per BiCoT-GRPO step of train.py with its own defaults on a shapes-world base (its tokenizer, the
    shapes training prompts, the exact `shapes` reward), split into rollout (sampling, VQ decoding, rewards) and
    update (reference log-probs, policy forward and backward, AdamW). The first step is not counted: it also
    measures kernels.Linear's kernels and warms the allocator. No evaluation; the final checkpoint is written
    after the last step's clock stops."""
    base = args.ckpt or shapes.ensure_base()
    # train.py's defaults: the shapes training prompts, no evaluation sets for a named checkpoint
    cfg, sec, roll = time_steps(base, "--steps", str(args.steps))
    mc = C.load_config(base)
    print(f"\n| base | G x prompts | CPU | s / step | rollout (s) | update (s) |\n|---|---|---|---|---|---|\n"
          f"| {mc.n_layer} layers x {mc.n_embd} | {cfg.group_size} x {cfg.prompts_per_step} "
          f"| {cpu_name()} | {sec:.3f} | {roll:.3f} | {sec - roll:.3f} |")


def build_parser():
    HelpFormatter = settings.HelpFormatter
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    add = functools.partial(sub.add_parser, formatter_class=HelpFormatter)
    pl = add("load", help="peak memory of loading a checkpoint written with random weights")
    pl.add_argument("--preset", default="janus-pro-7b", choices=sorted(M.PRESETS), help="model size (model.PRESETS)")
    pl.add_argument("--dtype", default="bfloat16", help="dtype of the written weights and of the load")
    pl.add_argument("--shards", type=int, default=2, help=".bin shards written (Janus-Pro-7B ships 2)")
    pl.add_argument("--folder", help="reuse (or keep) the random checkpoint here (unset: a temporary folder)")
    pl.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    ps = add("speed", help="image-token throughput")
    speed_flags(ps)
    pt = add("train", help="seconds and peak memory of BiCoT-GRPO steps on random weights")
    pt.add_argument("--preset", default="janus-pro-1b", choices=sorted(M.PRESETS), help="model size (model.PRESETS)")
    pt.add_argument("--steps", type=int, default=3, help="steps timed (the first is a warm-up)")
    pt.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    pt.add_argument("--prompts-per-step", type=int, default=2, help="prompts per step (one sampling call)")
    pt.add_argument("--micro-batch", type=int, default=4, help="samples per forward/backward")
    pt.add_argument("--max-plan-tokens", type=int, default=96, help="plan length cap")
    pt.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA instead of a full fine-tune")
    pt.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="recompute decoder layers in backward")
    pt.add_argument("--compile", action="store_true", help="torch.compile the sampling decode steps")
    pt.add_argument("--device", default=None, help="cuda, cpu, ... (unset: CUDA when present)")
    pt.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="train.py's --dtype: autocast over float32 master weights (unset: bf16 on GPU, fp32 on CPU)")
    pm = add("memory", help="estimated GPU memory of a BiCoT-GRPO step, from parameter counts and shapes")
    pm.add_argument("--preset", default="janus-pro-1b", choices=sorted(M.PRESETS), help="model size (model.PRESETS)")
    pm.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA instead of a full fine-tune")
    pm.add_argument("--group-size", type=int, default=8, help="samples per prompt (T2I-R1: 8)")
    pm.add_argument("--micro-batch", type=int, default=8, help="samples per forward/backward (T2I-R1: 8 per GPU)")
    pm.add_argument("--image-logp", default="cond", choices=["cond", "cfg"], help="train.py's --image-logp")
    pm.add_argument("--plan-tokens", type=int, nargs="+", default=[100, 1024],
                    help="plan lengths, a column each (T2I-R1's plans average ~97 tokens, its cap is 1024)")
    pg = add("gpu", help="docs/speed.md, GPU: sampling against the bandwidth floor, BiCoT-GRPO steps, train.py")
    gpu_flags(pg)
    pr = add("rl", help="seconds per step of train.py's shapes-world RL (its defaults), rollout and update")
    pr.add_argument("--ckpt", default=None, help="a shapes base folder (unset: the shipped shapes base)")
    pr.add_argument("--steps", type=int, default=6, help="steps to run; the first is not counted")
    return p



def speed_flags(ps):
    """bench.py speed's flags."""
    # --preset names a size as everywhere else: model.PRESETS plus cpu-768 (this was --size)
    ps.add_argument("--preset", default="cpu-768", choices=sorted(SIZES),
                    help="model size: model.PRESETS, or cpu-768 (hidden 768, 8 layers) for CPU comparisons")
    ps.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="prompts per batch, one run each")
    ps.add_argument("--modes", nargs="+", default=["eager", "compiled", "F.linear", "nocache"],
                    choices=["eager", "compiled", "F.linear", "W x^T", "oneDNN", "nocache"],
                    help="sampler variants to time; F.linear, W x^T, oneDNN: eager with every linear layer pinned to "
                         "that CPU kernel")
    ps.add_argument("--repeats", type=int, default=2, help="timed runs per column (after a warm-up), interleaved")
    ps.add_argument("--hf", action="store_true", help="also time transformers' Janus (must be installed)")
    ps.add_argument("--cfg", dest="cfg_weight", type=float, default=5.0, help="guidance weight")
    ps.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    ps.add_argument("--nocache-tokens", type=int, default=48, help="image tokens timed without the KV cache")
    ps.add_argument("--vocab-size", type=int, default=102400, help="text vocabulary (Janus-Pro's)")
    ps.add_argument("--device", default=None, help="cuda, cpu, ... (unset: CUDA when present)")
    ps.add_argument("--dtype", default=None, help="float32, bfloat16, ... (unset: bf16 on GPU, fp32 on CPU)")


def gpu_flags(pg):
    """bench.py gpu's flags: its three parts' settings."""
    pg.add_argument("--parts", nargs="+", default=["sampling", "training", "shapes"],
                    choices=["sampling", "training", "shapes"], help="what to measure, in this order")
    pg.add_argument("--preset", default="janus-pro-1b", choices=sorted(SIZES), help="model size of the sampling part")
    pg.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="prompts per batch, one row each")
    pg.add_argument("--repeats", type=int, default=1, help="timed runs per column (after a warm-up), interleaved")
    pg.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    pg.add_argument("--cfg", dest="cfg_weight", type=float, default=5.0, help="guidance weight")
    pg.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled column")
    pg.add_argument("--hf", action="store_true", help="also time transformers' Janus (must be installed)")
    pg.add_argument("--full-preset", default="janus-pro-1b", choices=sorted(M.PRESETS), help="full fine-tune's size")
    pg.add_argument("--lora-preset", default="janus-pro-7b", choices=sorted(M.PRESETS), help="LoRA's size")
    pg.add_argument("--lora-rank", type=int, default=64, help="LoRA rank")
    pg.add_argument("--group-size", type=int, default=8, help="samples of the one prompt per step (T2I-R1: 8)")
    pg.add_argument("--max-plan-tokens", type=int, default=1024, help="plan length (T2I-R1's max_completion_length)")
    pg.add_argument("--train-steps", type=int, default=1, help="steps per training column (more: the first is a warm-up)")
    pg.add_argument("--shapes-flags", default="", help="flags added to the shapes world's `python train.py`")
    pg.add_argument("--device", default=None, help="cuda, cpu, ... (unset: CUDA when present)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "load-child":
        load_child(sys.argv[2], sys.argv[3])
        sys.exit()
    args = build_parser().parse_args()
    commands = {"load": bench_load, "speed": bench_speed, "train": bench_train, "memory": bench_memory, "rl": bench_rl,
                "gpu": bench_gpu}
    commands[args.cmd](args)
