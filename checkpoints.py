"""Janus-Pro checkpoints in their published layouts: reading, writing, and the file habits around them.

Two layouts are read: deepseek's original keys (which model.py's module names follow) and the
transformers-converted ones, renamed on load (`to_original_key`); weights as model.safetensors,
pytorch_model.bin, or shards with their index. The understanding tower's tensors are skipped on load, and
`save_like` carries them over unchanged when it writes a trained checkpoint in its base's layout. Every file
is written atomically (`atomic`), and a weight holding NaN or inf is refused on load, naming it.
"""

import contextlib
import fcntl
import json
import os
import shutil
from dataclasses import fields

import torch
import torch.nn as nn

from model import Janus, JanusConfig, Tokenizer
from settings import default_device
from vq import VQConfig

# -----------------------------------------------------------------------------
# config.json: deepseek's layout or transformers'

# LLaMA's defaults complete the partial `language_config` of the published config.json
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                      max_position_embeddings=2048, tie_word_embeddings=False, hidden_act="silu")
VQ_PARAMS = [f.name for f in fields(VQConfig)]


def _from_llama(lc: dict, vq: VQConfig, where: str) -> JanusConfig:
    lc = {**LLAMA_DEFAULTS, **{k: v for k, v in lc.items() if v is not None}}
    for key, ok in [("hidden_act", lambda v: v == "silu"), ("rope_scaling", lambda v: not v),
                    ("attention_bias", lambda v: not v), ("mlp_bias", lambda v: not v)]:
        if key in lc and not ok(lc[key]):
            raise ValueError(f"{where}: {key}={lc[key]!r} is not supported (Janus-Pro uses plain LLaMA)")
    return JanusConfig(
        vocab_size=lc["vocab_size"], n_layer=lc["num_hidden_layers"], n_head=lc["num_attention_heads"],
        n_kv_head=lc.get("num_key_value_heads") or lc["num_attention_heads"], n_embd=lc["hidden_size"],
        intermediate_size=lc["intermediate_size"], rope_theta=float(lc["rope_theta"]),
        rms_norm_eps=lc["rms_norm_eps"], max_position_embeddings=lc["max_position_embeddings"],
        tie_word_embeddings=bool(lc["tie_word_embeddings"]), vq=vq)


def config_from_dict(d: dict, where: str = "config.json") -> JanusConfig:
    """Parse a published config.json: deepseek's original layout or the transformers-converted one."""
    if "language_config" in d:  # deepseek original
        params = dict((d.get("gen_vision_config") or {}).get("params") or {})
        vq = dict(codebook_size=params.pop("image_token_size", 16384), codebook_embed_dim=params.pop("n_embed", 8))
        vq.update({k: params[k] for k in VQ_PARAMS if k in params})
        cfg = _from_llama(d["language_config"], VQConfig(**vq), where)
        head = (d.get("gen_head_config") or {}).get("params") or {}
        aligner = (d.get("gen_aligner_config") or {}).get("params") or {}
        checks = [("gen_head_config.params.n_embed", head.get("n_embed"), cfg.n_embd),
                  ("gen_head_config.params.image_token_embed", head.get("image_token_embed"), cfg.n_embd),
                  ("gen_head_config.params.image_token_size", head.get("image_token_size"), cfg.vq.codebook_size),
                  ("gen_aligner_config.params.input_dim", aligner.get("input_dim"), cfg.vq.codebook_embed_dim),
                  ("gen_aligner_config.params.n_embed", aligner.get("n_embed"), cfg.n_embd),
                  ("gen_aligner_config.params.depth", aligner.get("depth"), 2)]
        positions = (d.get("gen_position_config") or {}).get("params")  # ours only: JanusConfig.image_positions
        if positions is not None:
            cfg.image_positions = True
            checks += [("gen_position_config.params.num_positions", positions.get("num_positions"), cfg.image_tokens),
                       ("gen_position_config.params.n_embed", positions.get("n_embed"), cfg.n_embd)]
        for name, got, want in checks:
            if got is not None and got != want:
                raise ValueError(f"{where}: {name} = {got}, but this implementation needs {want}")
        return cfg
    if "text_config" in d and "vq_config" in d:  # transformers' JanusConfig
        v, vis = d["vq_config"], d.get("vision_config") or {}
        mult = tuple(v.get("channel_multiplier", (1, 1, 2, 2, 4)))
        grid = vis.get("image_size", 384) // vis.get("patch_size", 16)  # transformers ties the VQ grid to it
        vq = VQConfig(image_size=grid * 2 ** (len(mult) - 1), codebook_size=v.get("num_embeddings", 16384),
                      codebook_embed_dim=v.get("embed_dim", 8), ch=v.get("base_channels", 128),
                      encoder_ch_mult=mult, decoder_ch_mult=mult, z_channels=v.get("latent_channels", 256),
                      num_res_blocks=v.get("num_res_blocks", 2))
        tc = dict(d["text_config"])
        tc.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", False))
        return _from_llama(tc, vq, where)
    raise ValueError(f"{where}: neither a deepseek Janus config (language_config) nor a transformers "
                     "JanusConfig (text_config + vq_config)")


def config_to_dict(cfg: JanusConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The published (deepseek original) config.json layout. VQ sizes are written only where they differ
    from VQ-16, so a full-size model's file reads exactly like Janus-Pro's."""
    default_vq = VQConfig()
    vq_params = {"image_token_size": cfg.vq.codebook_size, "n_embed": cfg.vq.codebook_embed_dim}
    for k in VQ_PARAMS:
        if k not in ("codebook_size", "codebook_embed_dim") and getattr(cfg.vq, k) != getattr(default_vq, k):
            val = getattr(cfg.vq, k)
            vq_params[k] = list(val) if isinstance(val, tuple) else val
    H = cfg.n_embd
    extra = {}
    if cfg.image_positions:  # not in any published layout: written only when set, so Janus-Pro's file stays its own
        extra["gen_position_config"] = {"cls": "ImagePositions", "model_type": "gen_position",
                                        "params": {"num_positions": cfg.image_tokens, "n_embed": H}}
    return {
        "model_type": "multi_modality",
        "torch_dtype": str(dtype).removeprefix("torch."),
        "language_config": {
            "hidden_size": H, "intermediate_size": cfg.intermediate_size,
            "max_position_embeddings": cfg.max_position_embeddings, "model_type": "llama",
            "num_attention_heads": cfg.n_head, "num_hidden_layers": cfg.n_layer,
            "num_key_value_heads": cfg.n_kv_head, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "torch_dtype": str(dtype).removeprefix("torch."), "vocab_size": cfg.vocab_size},
        # the understanding path is not part of this implementation; its config is kept so that
        # deepseek's own classes can still build the model from our folders
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
                          "params": {"image_size": 384, "model_name": "siglip_large_patch16_384",
                                     "select_feature": "same", "select_layer": -1}},
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                           "params": {"depth": 2, "input_dim": 1024, "n_embed": H, "projector_type": "mlp_gelu"}},
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": vq_params},
        "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner",
                               "params": {"depth": 2, "input_dim": cfg.vq.codebook_embed_dim, "n_embed": H,
                                          "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                            "params": {"image_token_embed": H, "image_token_size": cfg.vq.codebook_size,
                                       "n_embed": H}},
        **extra,
    }


# -----------------------------------------------------------------------------
# weight files

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")
UNDERSTANDING_PREFIXES = ("vision_model.", "aligner.", "model.vision_model.", "model.aligner.")
# transformers' names -> deepseek's (ours); applied in order, first match on the prefix
CONVERTED_PREFIXES = [
    ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
    ("model.generation_embeddings.", "gen_embed."), ("model.generation_aligner.fc1.", "gen_aligner.layers.0."),
    ("model.generation_aligner.hidden_layers.0.", "gen_aligner.layers.2."),
    ("model.generation_head.proj_out.", "gen_head.output_mlp_projector."),
    ("model.generation_head.vision_head.", "gen_head.vision_head."), ("model.vqmodel.", "gen_vision_model.")]
CONVERTED_VQ_PARTS = [("encoder.down.", "encoder.conv_blocks."), ("decoder.up.", "decoder.conv_blocks."),
                      (".block.", ".res."), ("mid.block_1.", "mid.0."), ("mid.attn_1.", "mid.1."),
                      ("mid.block_2.", "mid.2.")]


class CheckpointError(ValueError):
    pass


@contextlib.contextmanager
def atomic(path):
    """Yield a temporary name to write path under; renamed over path once whole. On any error (a full disk, a
    Ctrl-C) the partial file is removed: path is the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """obj as indented JSON at path, written atomically."""
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def read_json(path):
    """A JSON file; a torn or invalid one is a ValueError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): a torn write? delete it or rerun what wrote it") from None


def load_config(path) -> JanusConfig:
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: a Janus-Pro folder needs config.json next to its weights")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from e
    return config_from_dict(d, where=cfg_path)


def weight_files(path) -> list:
    """The weight files of a folder, shards resolved through their index; errors name what is missing."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    for name in WEIGHT_FILES:
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            continue
        if not name.endswith(".index.json"):
            return [p]
        try:
            with open(p) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{p} is not a weight index (needs a 'weight_map'): {e}") from e
        files = [os.path.join(path, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{p} lists shards that are not there: {', '.join(missing)}")
        return files
    raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")


def read_tensors(file):
    """Yield (key, tensor) from a .safetensors file or a torch pickle, one tensor at a time, memory-mapped.
    A pickle's {"state_dict": ...} wrapper and DataParallel's "module." prefixes are unwrapped."""
    try:
        if file.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)
            return
        try:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) pickle
    except Exception as e:  # truncated downloads surface here as zip/header errors
        raise CheckpointError(f"could not read {file} (truncated or corrupt download?): {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a state dict")
    for k, v in state.items():
        yield k.removeprefix("module."), v


def mismatch_error(what, missing, unexpected, misshaped, limit=40) -> "CheckpointError":
    """The one report of a strict load: every missing, unexpected and mis-shaped key (up to limit of each)."""
    def listing(title, items):
        shown = items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
        return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(shown) if items else ""
    return CheckpointError(what + listing("missing", missing) + listing("unexpected", unexpected)
                           + listing("mis-shaped", misshaped))


def to_original_key(key: str):
    """Any published key -> our (deepseek) name, or None for tensors the generation path does not use."""
    if key.startswith(UNDERSTANDING_PREFIXES) or key.endswith((".rotary_emb.inv_freq", ".position_ids")):
        return None
    for old, new in CONVERTED_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            if new == "gen_vision_model.":
                for a, b in CONVERTED_VQ_PARTS:
                    key = key.replace(a, b)
            break
    return key


def lock_folder(folder, script):
    """An exclusive lock on folder/{script}.lock, held while the returned file is open, so that two runs of a
    script never write one folder at once. flock's lock goes with the process: a crashed or killed run leaves
    nothing stuck."""
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, f"{script}.lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise ValueError(f"{folder} is in use by another {script}.py process (pid {pid}): two runs in one folder "
                         f"would interleave their outputs") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def check_finite_weight(t: torch.Tensor, key, file):
    """Refuse a weight holding NaN or inf, naming it and its file: such a checkpoint fails far from the cause."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{file}: tensor {key} holds {int((~torch.isfinite(t)).sum())} non-finite "
                              f"values (NaN or inf) of {t.numel()}: a corrupt or diverged checkpoint")


def load_state_dict(path, model: nn.Module, device="cpu", dtype=torch.float32) -> dict:
    """Read every weight file of `path` into tensors shaped for `model` (typically on the meta device),
    converting each tensor to dtype/device as it is read so at most one copy of the weights exists."""
    expected = model.state_dict()
    files = weight_files(path)
    state, unexpected, misshaped = {}, [], []
    for file in files:
        for key, t in read_tensors(file):
            name = to_original_key(key)
            if name is None:
                continue
            where = os.path.basename(file)
            if name not in expected:
                unexpected.append(f"{key} ({where})")
                continue
            if tuple(t.shape) != tuple(expected[name].shape):
                misshaped.append(f"{key} ({where}): {tuple(t.shape)}, expected {tuple(expected[name].shape)}")
                continue
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            # a NaN in the VQ decoder draws cyan images that score 0; one in the decoder fails steps later
            check_finite_weight(t, key, file)
            if t.device.type == "cpu" and t.data_ptr() % 64:
                # safetensors maps tensors at 8-byte offsets; CPU GEMM kernels round differently on such
                # addresses, so a checkpoint would compute other last bits depending on its file format
                t = t.clone()
            state[name] = t
    head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if model.cfg.tie_word_embeddings and head not in state and embed in state:
        state[head] = state[embed]  # tied checkpoints store the matrix once
    # transformers' conversion drops the VQ's unused usage counter
    if "gen_vision_model.quantize.codebook_used" not in state:
        state["gen_vision_model.quantize.codebook_used"] = torch.zeros(65536, device=device, dtype=dtype)
    missing = [k for k in expected if k not in state]
    if missing or unexpected or misshaped:
        raise mismatch_error(f"checkpoint {', '.join(files)} does not fit the model described by "
                             f"{os.path.join(path, 'config.json')}:", missing, unexpected, misshaped)
    return state


def save_state_dict(state: dict, folder, weights="safetensors", shards=1):
    """Write a state dict as model.safetensors / pytorch_model.bin, or as N shards plus the index JSON
    (file names as the published checkpoints). Each file is written to a temp name, then renamed."""
    if weights not in ("safetensors", "bin"):
        raise ValueError(f"weights must be 'safetensors' or 'bin', got {weights!r}")
    state = {k: v.detach().contiguous() for k, v in state.items()}
    stem, ext = ("model", "safetensors") if weights == "safetensors" else ("pytorch_model", "bin")
    keys = list(state)
    sizes = [state[k].numel() * state[k].element_size() for k in keys]
    # contiguous groups of keys with roughly equal bytes
    total, groups, acc = sum(sizes), [[] for _ in range(shards)], 0
    for k, s in zip(keys, sizes):
        groups[min(shards - 1, int(acc * shards / max(total, 1)))].append(k)
        acc += s
    names = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    for name, group in zip(names, groups):
        write_tensors({k: state[k] for k in group}, os.path.join(folder, name))
    if shards > 1:
        weight_map = {k: name for name, group in zip(names, groups) for k in group}
        write_json(os.path.join(folder, f"{stem}.{ext}.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_tensors(tensors: dict, path):
    """One weight file, its format by its name (.safetensors or a torch pickle), written atomically."""
    with atomic(path) as tmp:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file
            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)


def save_like(base, folder, state: dict):
    """A complete checkpoint in the layout of the Janus-Pro folder base: its config.json, tokenizer and other
    files as they are, its weight files under their names holding every tensor of the base, those named in
    state (our names, e.g. the trained language model) replaced by state's, at state's dtype. Everything else
    (the understanding tower, the frozen image path) is the base's, byte for byte. So the loader that read
    the base reads the result: deepseek's for its layout, transformers' for the converted one."""
    files = weight_files(base)
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(base)):  # config, tokenizer, processor, reasoning template, ...
        src = os.path.join(base, name)
        if (os.path.isfile(src) and src not in files and name not in WEIGHT_FILES and name != "train_state.pt"
                and not name.endswith(".tmp")):
            shutil.copy(src, folder)
    placed, total = set(), 0
    for file in files:
        out = {}
        for key, t in read_tensors(file):
            name = to_original_key(key)
            out[key] = state[name].detach().contiguous() if name in state else t.contiguous()
            placed.add(name)
            total += out[key].numel() * out[key].element_size()
        write_tensors(out, os.path.join(folder, os.path.basename(file)))
    lost = sorted(set(state) - placed)
    if lost:
        raise CheckpointError(f"{base} has no place for these trained tensors: {', '.join(lost[:10])}")
    index = next((n for n in WEIGHT_FILES if n.endswith(".index.json") and os.path.isfile(os.path.join(base, n))), None)
    if index:  # the same keys in the same files; only the byte count changes with the dtype
        d = read_json(os.path.join(base, index))
        write_json(os.path.join(folder, index), {**d, "metadata": {**d.get("metadata", {}), "total_size": total}})


# -----------------------------------------------------------------------------
# whole models


def from_pretrained(path, device=None, dtype=None) -> Janus:
    """Load a local Janus-Pro folder (any published layout). Default precision: bf16 on GPU, fp32 on CPU."""
    device = default_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    path = os.path.expanduser(path)  # "~/models/Janus-Pro-1B" as written in a shell
    cfg = load_config(path)
    with torch.device("meta"):
        model = Janus(cfg)
    state = load_state_dict(path, model, device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_word_embeddings:  # assign replaced the shared tensor: share it again
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    return model.eval()


def save_pretrained(janus: Janus, folder, tokenizer=None, weights="safetensors", shards=1, state=None):
    """Write a model's config.json + weights in deepseek's original layout (+ tokenizer files).

    weights: "safetensors" (model.safetensors) or "bin" (pytorch_model.bin, as Janus-Pro ships);
    shards > 1 writes the sharded form with its index, as Janus-Pro-7B ships. state: the tensors to
    write instead of the model's own (e.g. gathered from FSDP shards).
    """
    folder = os.path.expanduser(folder)
    os.makedirs(folder, exist_ok=True)
    state = janus.export_state() if state is None else state
    dtype = state["language_model.model.embed_tokens.weight"].dtype
    write_json(os.path.join(folder, "config.json"), config_to_dict(janus.cfg, dtype))
    if janus.cfg.tie_word_embeddings:  # stored once, as tied checkpoints are
        state = {k: v for k, v in state.items() if k != "language_model.lm_head.weight"}
    save_state_dict(state, folder, weights=weights, shards=shards)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)


def save_tokenizer(tok: Tokenizer, folder):
    """tokenizer.json and the two small files transformers' tokenizer classes read beside it."""
    tok.tk.save(os.path.join(folder, "tokenizer.json"))
    write_json(os.path.join(folder, "special_tokens_map.json"),
               {"bos_token": tok.BOS, "eos_token": tok.EOS, "pad_token": tok.PAD})
    write_json(os.path.join(folder, "tokenizer_config.json"),
               {"bos_token": tok.BOS, "eos_token": tok.EOS, "pad_token": tok.PAD, "tokenizer_class": "LlamaTokenizerFast"})
