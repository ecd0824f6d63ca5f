"""Data parallel training over processes (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK): DDP, or FSDP2 with
--fsdp. train.py calls these; a single process (world 1) passes through each of them unchanged.
"""

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from settings import default_device


def train_device(cfg):
    """The device this process trains on: --device, else CUDA when present; under torchrun the GPU of LOCAL_RANK."""
    device = default_device(cfg.device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def dist_setup(device):
    """Join the process group torchrun describes. Returns (rank, world, device). device: train_device's, on
    CUDA the GPU of LOCAL_RANK, made current before the group exists so that NCCL binds the right card."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # NCCL reduces CUDA tensors only; gloo serves any CPU tensor a collective may still meet (FSDP's
        # CPU-offloaded state dicts), so the group has one backend per device type
        # the other processes wait while the first one evaluates: a 7B evaluation outlasts the 10-minute default
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
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


def shard(root, janus, dtype):
    """FSDP2 over processes: each decoder layer is a unit, the rest (embeddings, heads, VQ) the root's. Weights
    are gathered in the compute dtype (half the traffic and memory of float32 in bf16) and gradients reduced
    in float32. Inputs are left as they are: autocast casts what it computes with, while the loss's inputs
    (old and reference log-probs, advantages) must stay float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in janus.language_model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(root, mp_policy=policy)
    # FSDP2 finds its root on the first forward; sampling calls the layers before any root forward does
    root._get_fsdp_state()._lazy_init()
    return root
