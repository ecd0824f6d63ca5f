"""Speed tricks for the one-token decode steps, apart from the method: what torch.compile and CUDA graphs need.

t2i_r1.py's samplers call `decode_fn` for their step (eager, or compiled with fullgraph=True), and on a GPU
pad prompts to a few widths (`bucket_width`) and hold the KV cache in buffers at fixed addresses
(`static_cache`), since CUDA graphs replay only with the shapes and addresses they were recorded with.
`AllDone` asks whether every plan has ended without waiting for the GPU. None of this changes a sample.
"""

import functools

import torch

from model import KVCache

_compiled = {}
STATIC_DECODE = None  # compiled steps with static shapes (CUDA graphs): None on CUDA only; True/False forces it


def static_decode(compile, device) -> bool:
    """Whether a compiled decode step runs with static shapes: on CUDA, where CUDA graphs need them."""
    return bool(compile) and (torch.device(device).type == "cuda" if STATIC_DECODE is None else STATIC_DECODE)


def decode_fn(step, compile, device):
    """The eager step, or its torch.compile(fullgraph=True) version; `compile` may name a backend.

    On a GPU the graph has static shapes and attends to every slot of the static cache: CUDA graphs, which
    remove the per-kernel launch cost that dominates one-token steps there, need them. Prompt widths then
    come in buckets (`bucket_width`) and the cache lives at fixed addresses (`static_cache`), so a whole
    run compiles and records a handful of graphs. On CPU the attended length (kv_len) stays symbolic
    (dynamic=True), so one graph serves every position and skips the empty tail of the cache as eager
    steps do. The samplers run their first step eagerly even when compiling: on CPU that step measures
    the linear layers' matmul kernels (kernels.Linear), which the compiled graph then takes."""
    if not compile:
        return step
    backend = "inductor" if compile is True else compile
    static, cuda = static_decode(compile, device), torch.device(device).type == "cuda"
    key = (step.__name__, backend, static, cuda)
    if key not in _compiled:
        mode = "reduce-overhead" if backend == "inductor" and cuda and static else None
        compiled = torch.compile(step, backend=backend, mode=mode, fullgraph=True, dynamic=not static)
        if static:  # buckets x step kinds x batch sizes (rollouts, evaluations) may pass dynamo's default of 8
            compiled = functools.partial(_more_recompiles, compiled)
        _compiled[key] = compiled
    return _compiled[key]


# dynamo's setting was called cache_size_limit before torch renamed it (both names work on 2.13)
_RECOMPILE_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def _more_recompiles(compiled, *args):
    with torch._dynamo.config.patch(**{_RECOMPILE_LIMIT: 64}):
        return compiled(*args)


def bucket_width(T: int) -> int:
    """The padded prompt width of a static decode: the next power of two (at least 16), so that the prompts
    of a whole run (T2I-R1's image prompts: a prompt and a plan of up to 1,024 tokens) take seven widths
    or fewer."""
    return max(16, 1 << (T - 1).bit_length())


_arena = {}  # (device, dtype, layers) -> the flat key and value buffers of every layer, reused by static decodes


def static_cache(cache: KVCache, n=1) -> KVCache:
    """A copy of cache, each row repeated n times (row i * n + j is row i), in buffers that every static decode
    reuses: CUDA graphs replay only at the addresses they were recorded at, so a fresh cache per sampling call
    would record the graph again each time. The buffers grow to the largest cache asked for and are then
    kept; each call views their first slots as contiguous (B * n, n_kv, max_len, hd) tensors, so a graph's
    input strides depend on its shape alone. The rows are repeated straight into them: a repeated cache
    first (repeat_rows) would hold the n samples' cache twice at the rollout's peak."""
    L, (B, *rest) = len(cache.k), cache.k[0].shape
    key, size = (cache.k[0].device, cache.k[0].dtype, L), cache.k[0].numel() * n
    if key not in _arena or _arena[key][0].numel() < size:
        _arena.pop(key, None)  # the old buffers go before the new ones come
        _arena[key] = [torch.empty(size, device=key[0], dtype=key[1]) for _ in range(2 * L)]
    views = [buf[:size].view(B * n, *rest) for buf in _arena[key]]
    for view, t in zip(views, cache.k + cache.v):
        view.view(B, n, *rest).copy_(t[:, None])  # every slot, the zeros of the empty tail too
    held = KVCache.__new__(KVCache)
    held.k, held.v = views[:L], views[L:]
    held._mark_static()
    return held


def release_decoding():
    """Forget the compiled decode steps and free the static cache buffers (bench.py, before it measures memory)."""
    _compiled.clear()
    _arena.clear()


class AllDone:
    """Whether every row is done, asked from the host without waiting for the device. On CUDA each call
    queues a copy of the answer and returns the one queued by the call before (8 tokens earlier, long
    arrived); rows never come back from done, so an old yes is still a yes. On CPU the answer is current."""

    def __init__(self, device):
        self.cuda, self.queued = device.type == "cuda", None

    def __call__(self, done) -> bool:
        if not self.cuda:
            return bool(done.all())
        earlier = self.queued
        answer = torch.empty((), dtype=torch.bool, pin_memory=True).copy_(done.all(), non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record()
        self.queued = answer, arrived
        if earlier is None:
            return False
        earlier[1].synchronize()
        return bool(earlier[0])
