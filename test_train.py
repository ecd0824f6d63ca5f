"""Tests of train.py (and runs.py, distributed.py): the BiCoT-GRPO loop, run folders, processes,
checkpoints, recipes.
"""

import json
import math
import os
import re
import types

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints as C
import kernels as K
import model as M
import rewards as RW
import runs as RN
import sample as SA
import shapes as S
import t2i_r1 as R
import train as T
from conftest import (BF16, PAD, Redness, T2I_R1_ROWS, _clip_sd, _reward_folders, _tiny_cfg, _tiny_git_cfg,
                      _write_git_folder, _write_hf_clip, cli_error, image_prompts, on_device, real, tiny_hf_janus,
                      tiny_model, train_args)


class CastCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the dtype casts (aten._to_copy) of the tensors in `names` ({data_ptr: name}), by name."""

    def __init__(self, names):
        super().__init__()
        self.names, self.counts = names, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.names:
            name = self.names[args[0].data_ptr()]
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_combine_sum_and_group():
    s = {"a": torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), "b": torch.tensor([0.0, 0.0, 10.0, 1.0, 2.0, 3.0])}
    w = {"a": 1.0, "b": 0.5}
    assert torch.allclose(T.combined_reward(s, w, "sum"), torch.tensor([1.0, 2.0, 8.0, 5.5, 6.0, 6.5]))
    g = T.combined_reward(s, w, "group", group_size=3)
    # group 1: a -> (-1, 0, 1) / (1 + 1e-4); b: mean 10/3, unbiased std 5.7735
    # group 2: a equal -> 0 (no NaN); b -> (-1, 0, 1) / (1 + 1e-4)
    bstd = math.sqrt(((10 / 3) ** 2 * 2 + (20 / 3) ** 2) / 2)
    want = [-1 / 1.0001 + 0.5 * (-10 / 3) / (bstd + 1e-4), 0.5 * (-10 / 3) / (bstd + 1e-4),
            1 / 1.0001 + 0.5 * (20 / 3) / (bstd + 1e-4), -0.5 / 1.0001, 0.0, 0.5 / 1.0001]
    assert torch.allclose(g, torch.tensor(want), atol=1e-5)
    same = T.combined_reward({"a": torch.full((4,), 7.0)}, {"a": 1.0}, "group", group_size=2)
    assert torch.equal(same, torch.zeros(4))
    with pytest.raises(ValueError, match="group_size"):
        T.combined_reward(s, w, "group", group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        T.combined_reward(s, w, "group")


def final_weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "ckpt", "model.safetensors"))


def test_a_few_steps_raise_the_reward(random_base, redness, tmp_path):
    """A real effect on a random tiny model: 25 BiCoT-GRPO steps raise a reward it can learn (redness of the
    decoded image) by at least 3 standard errors. Guidance 1 keeps the sampled and the scored distributions
    the same; with guidance, T2I-R1's conditional-only log-probs are off-policy and this tiny model moves less
    reliably (the margin held for training seeds 0-5, 3.6 to 5.5 standard errors, when it was set)."""
    (tmp_path / "p.jsonl").write_text(json.dumps(S.colors("red", "circle")) + "\n")  # one fixed shapes prompt
    _, metrics = T.train(T.parse_args(train_args(random_base, tmp_path / "run", "--prompts", str(tmp_path / "p.jsonl"),
                                                 "--steps", "25", "--group-size", "8", "--prompts-per-step", "4",
                                                 "--rollout-batch", "4", "--micro-batch", "32", "--cfg", "1")),
                         log=lambda *a, **k: None)
    r = np.array([m["reward"] for m in metrics])
    noise = np.mean([m["reward_std"] for m in metrics[:5]]) / np.sqrt(5 * 32)  # std error of a 5-step mean
    assert r[-5:].mean() > r[:5].mean() + 3 * noise, r
    assert all(math.isfinite(m["loss"]) and m["kl"] >= 0 for m in metrics)


def test_resume_continues_to_the_same_parameters(random_base, redness, tmp_path):
    quiet = dict(log=lambda *a, **k: None)
    T.train(T.parse_args(train_args(random_base, tmp_path / "a", "--steps", "4", "--save-every", "2")), **quiet)
    T.train(T.parse_args(train_args(random_base, tmp_path / "b", "--steps", "2", "--save-every", "2")), **quiet)
    T.train(T.parse_args(["--out", str(tmp_path / "b"), "--resume", "--steps", "4"]), **quiet)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = C.from_pretrained(random_base).state_dict()
    assert not torch.equal(a["language_model.model.layers.0.mlp.up_proj.weight"],
                           base["language_model.model.layers.0.mlp.up_proj.weight"])
    # the VQ and the image embedding/head stay frozen, as in T2I-R1
    for k in ("gen_head.vision_head.weight", "gen_embed.weight", "gen_vision_model.decoder.conv_out.weight"):
        assert torch.equal(a[k], base[k])
    lines = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]


def test_a_crash_while_saving_keeps_the_previous_checkpoint(random_base, redness, tmp_path, monkeypatch):
    quiet = dict(log=lambda *a, **k: None)
    real, calls = C.write_tensors, []
    def dying_save(state, path):  # the second save dies half-way through writing its weights
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt("killed while saving")
        return real(state, path)
    monkeypatch.setattr(C, "write_tensors", dying_save)
    with pytest.raises(KeyboardInterrupt):
        T.train(T.parse_args(train_args(random_base, tmp_path / "run", "--steps", "4", "--save-every", "2")), **quiet)
    monkeypatch.setattr(C, "write_tensors", real)
    ckpt = T.last_checkpoint(str(tmp_path / "run"))
    assert ckpt.endswith("ckpt")
    C.from_pretrained(ckpt)  # loads: the half-written one never replaced it
    assert torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=True)["step"] == 2
    T.train(T.parse_args(["--out", str(tmp_path / "run"), "--resume"]), **quiet)
    T.train(T.parse_args(train_args(random_base, tmp_path / "ref", "--steps", "4", "--save-every", "2")), **quiet)
    a, b = final_weights(tmp_path / "run"), final_weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_step_lines_show_each_reward_elapsed_time_and_eta_and_eval_every_0_means_no_validation(random_base, redness,
                                                                                              tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps(S.colors("red", "circle")) + "\n")
    lines = []
    T.train(T.parse_args(train_args(random_base, tmp_path / "run", "--steps", "2", "--rewards", "redness,shapes",
                                    "--prompts", str(tmp_path / "p.jsonl"), "--val-prompts", str(tmp_path / "p.jsonl"))),
            log=lines.append)
    steps = [l for l in lines if l.startswith("step ")]
    assert len(steps) == 2 and all(re.search(r"\| reward -?\d\.\d{3}±\d\.\d{3} redness -?\d\.\d{3} shapes \d\.\d{3} \| kl ", l)
                                   for l in steps), steps
    assert re.search(r"\| \d+s elapsed, eta \d+s$", steps[0]) and steps[1].endswith("elapsed, eta 0s"), steps
    assert os.listdir(tmp_path / "run" / "eval") == []  # --eval-every 0: validation neither at the start nor the end
    assert all(l in (tmp_path / "run" / "train.log").read_text() for l in steps)  # a log beside metrics.jsonl


def test_an_existing_run_is_refused_unless_resumed_or_overwritten(random_base, redness, tmp_path, capsys):
    """A second run into the same --out was silently clobbering the first: refused, unless --resume continues
    it or --overwrite replaces it, and then nothing of the old run (metrics, evaluations) stays."""
    out = tmp_path / "run"
    T.main(train_args(random_base, out, "--steps", "2"))
    err = cli_error(T.main, train_args(random_base, out, "--steps", "1"), capsys, "train.py")
    assert str(out) in err and "already holds a run" in err and "--overwrite" in err
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=True)["step"] == 2  # untouched
    (out / "eval").mkdir(exist_ok=True)
    (out / "eval" / "val_00008.json").write_text("{}")  # an evaluation the old run wrote
    T.main(train_args(random_base, out, "--steps", "1", "--overwrite"))
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (out / "eval" / "val_00008.json").exists()
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=True)["step"] == 1
    assert "step 1/1" in (out / "train.log").read_text()  # the log beside metrics.jsonl
    assert "one of them" in cli_error(T.main, train_args(random_base, out, "--resume", "--overwrite"), capsys,
                                      "train.py")


def test_resume_of_a_folder_without_a_checkpoint_is_refused(random_base, redness, tmp_path, capsys):
    err = cli_error(T.main, ["--out", str(tmp_path / "typo"), "--resume"], capsys, "train.py")
    assert str(tmp_path / "typo") in err and "no checkpoint" in err
    assert not (tmp_path / "typo").exists()
    (tmp_path / "crashed").mkdir()  # a run that died before its first checkpoint
    (tmp_path / "crashed" / "metrics.jsonl").write_text("")
    err = cli_error(T.main, train_args(random_base, tmp_path / "crashed", "--resume"), capsys, "train.py")
    assert "no checkpoint" in err and "metrics.jsonl" in err


def test_a_second_process_on_a_run_folder_is_refused_and_a_dead_one_leaves_no_lock(random_base, redness, tmp_path,
                                                                                    capsys):
    import subprocess
    import sys
    out = tmp_path / "run"
    lock = C.lock_folder(str(out), "train")  # another process's lock (flock locks are per open file)
    err = cli_error(T.main, train_args(random_base, out, "--steps", "1"), capsys, "train.py")
    assert "in use by another train.py process" in err and str(os.getpid()) in err
    lock.close()
    # a process killed while holding the lock leaves the folder free
    code = f"import os, checkpoints; checkpoints.lock_folder({str(out)!r}, 'train'); os.kill(os.getpid(), 9)"
    assert subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(T.__file__)).returncode == -9
    T.main(train_args(random_base, out, "--steps", "1"))
    assert (out / "ckpt" / "train_state.pt").exists()


def test_resume_refuses_changed_settings_and_records_the_allowed_ones(random_base, redness, tmp_path, capsys):
    out = tmp_path / "run"
    T.main(train_args(random_base, out, "--steps", "1"))
    first = json.loads((out / "config.json").read_text())
    err = cli_error(T.main, ["--out", str(out), "--resume", "--lr", "0.01", "--seed", "3", "--ckpt", str(tmp_path),
                             "--steps", "2"], capsys, "train.py")
    for flag in ("--lr 0.01", "--seed 3", "--ckpt"):
        assert flag in err, err
    assert "--steps" not in err  # more steps is a change a resume may make
    assert "--cfg" in cli_error(T.main, ["--out", str(out), "--resume", "--cfg", "3"], capsys, "train.py")
    T.main(["--out", str(out), "--resume", "--steps", "2", "--save-every", "1"])
    config = json.loads((out / "config.json").read_text())
    assert config["resumes"] == [{"step": 1, "changed": {"steps": [1, 2], "save_every": [50, 1]}}]
    assert {k: v for k, v in config.items() if k not in ("steps", "save_every", "resume", "resumes")} == \
        {k: v for k, v in first.items() if k not in ("steps", "save_every", "resume")}
    assert "already at step 2" in cli_error(T.main, ["--out", str(out), "--resume", "--steps", "1"], capsys, "train.py")


def janus_pro_like_base(random_base, folder, layout):
    """A base as the published folders are: deepseek's layout (bf16 tensors in two pytorch_model shards with
    their index, as Janus-Pro-7B ships, the understanding tower beside the generation path) or transformers'
    (JanusForConditionalGeneration.save_pretrained, its SigLIP tower included), with processor files."""
    import shutil
    os.makedirs(folder)
    if layout == "deepseek":
        m = C.from_pretrained(random_base)
        state = {k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}
        state["vision_model.vision_tower.pos_embed"] = torch.randn(1, 4, 8, dtype=torch.bfloat16)
        state["aligner.layers.0.weight"] = torch.randn(8, 8, dtype=torch.bfloat16)
        C.save_state_dict(state, folder, weights="bin", shards=2)
        C.write_json(os.path.join(folder, "config.json"), C.config_to_dict(m.cfg, torch.bfloat16))
    else:
        tiny_hf_janus(0.05, vocab_size=M.Tokenizer.from_pretrained(random_base).vocab_size,
                      image_size=64).save_pretrained(folder)
    for name in ("tokenizer.json", "reasoning_prompt.txt"):
        shutil.copy(os.path.join(random_base, name), folder)
    with open(os.path.join(folder, "processor_config.json"), "w") as f:
        f.write('{"image_tag": "<image_placeholder>"}')
    return folder


def tensors(folder):
    return {k: v for f in C.weight_files(folder) for k, v in C.read_tensors(f)}


@pytest.mark.parametrize("layout", ["deepseek", "transformers"])
def test_checkpoints_are_the_base_folder_with_the_trained_tensors_in_place(random_base, redness, tmp_path, layout):
    """A trained checkpoint holds every file and tensor of its base, in the base's layout (the understanding
    tower included), so the loader that read the base reads it; only the trained language model differs."""
    base = janus_pro_like_base(random_base, str(tmp_path / "base"), layout)
    policy, _ = T.train(T.parse_args(train_args(base, tmp_path / "run", "--steps", "1", "--cfg", "1")),
                        log=lambda *a, **k: None)
    ckpt = str(tmp_path / "run" / "ckpt")
    assert set(os.listdir(base)) | {"train_state.pt"} == set(os.listdir(ckpt))
    for name in ("config.json", "processor_config.json", "tokenizer.json"):
        assert open(os.path.join(base, name)).read() == open(os.path.join(ckpt, name)).read(), name
    before, after = tensors(base), tensors(ckpt)
    assert before.keys() == after.keys()
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    ours = policy.state_dict()
    changed = 0
    for k, v in before.items():
        name = C.to_original_key(k)
        if name in trained:  # float32 master weights, as the policy holds them
            assert after[k].dtype == torch.float32 and torch.equal(after[k], ours[name]), k
            changed += not torch.equal(after[k], v.float())
        else:  # understanding tower, VQ, image embedding and head: the base's, dtype and all
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert changed > 0 and any(k.startswith(("vision_model.", "model.vision_model.")) for k in before)
    C.from_pretrained(ckpt)
    if layout == "transformers":  # transformers' own loader takes it, every key in place
        from transformers import JanusForConditionalGeneration
        hf, info = JanusForConditionalGeneration.from_pretrained(ckpt, output_loading_info=True)
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
        assert torch.equal(hf.lm_head.weight, ours["language_model.lm_head.weight"])


def test_evaluations_are_written_whole_and_a_torn_one_is_named(random_base, redness, tmp_path, monkeypatch):
    (tmp_path / "p.jsonl").write_text(json.dumps(S.colors("red", "circle")) + "\n")
    args = train_args(random_base, tmp_path / "run", "--steps", "1", "--eval-prompts", str(tmp_path / "p.jsonl"),
                      "--eval-n", "2")
    real = json.dump
    def dying_dump(obj, f, **kw):  # killed half-way through writing the base's evaluation
        if isinstance(obj, dict) and "images" in obj:
            f.write('{"images": 2, "rew')
            raise KeyboardInterrupt
        return real(obj, f, **kw)
    monkeypatch.setattr(json, "dump", dying_dump)
    with pytest.raises(KeyboardInterrupt):
        T.train(T.parse_args(args), log=lambda *a, **k: None)
    monkeypatch.setattr(json, "dump", real)
    assert os.listdir(tmp_path / "run" / "eval") == []  # no half file
    T.train(T.parse_args(args + ["--overwrite"]), log=lambda *a, **k: None)
    (tmp_path / "run" / "eval" / "test_00000.json").write_text('{"images": 2, "rew')  # torn by other means
    with pytest.raises(ValueError, match=r"test_00000.json is not valid JSON"):
        T.train(T.parse_args(["--out", str(tmp_path / "run"), "--resume", "--steps", "2"]), log=lambda *a, **k: None)


def test_a_full_disk_is_named_and_leaves_nothing_partial(random_base, redness, tmp_path, monkeypatch, capsys):
    import shutil
    real_save, saves = torch.save, []
    def full_disk_save(obj, f, *a, **k):  # the second checkpoint's train_state.pt hits a full disk
        saves.append(f)
        if str(f).endswith("train_state.pt") and len(saves) > 1:
            open(f, "wb").write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0 "
                               "basic_ios::clear: iostream error")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**9, used=10**9, free=4096))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        T.main(train_args(random_base, out, "--steps", "2", "--save-every", "1"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and err.startswith("train.py: error: no space left on the disk of " + str(out)), err
    assert "room for two" in err and "--resume" in err
    assert sorted(os.listdir(out)) == ["ckpt", "config.json", "eval", "metrics.jsonl", "samples", "train.lock",
                                       "train.log"]  # no ckpt.tmp
    assert real_save and torch.load(out / "ckpt" / "train_state.pt", weights_only=True)["step"] == 1


def test_ctrl_c_prints_the_last_checkpoint_and_the_resume_command(random_base, redness, tmp_path, monkeypatch,
                                                                 capsys):
    out = tmp_path / "run"
    real = T.train_step
    def interrupted(run, step):
        if step == 1:
            raise KeyboardInterrupt
        return real(run, step)
    monkeypatch.setattr(T, "train_step", interrupted)
    with pytest.raises(SystemExit) as e:
        T.main(train_args(random_base, out, "--steps", "3", "--save-every", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and "Traceback" not in "\n".join(err)
    assert err[-1] == (f"train.py: interrupted; the last checkpoint is {out}/ckpt (step 1); continue with "
                       f"`python train.py --out {out} --resume`")


def test_bad_devices_and_prompts_too_long_for_the_context_are_one_line_errors(tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    row = S.colors("red", "circle")
    long.write_text(json.dumps(row) + "\n" + json.dumps({**row, "prompt": "a photo of a red circle " * 200}) + "\n")
    for main, prog in ((T.main, "train.py"), (SA.main, "sample.py")):
        err = cli_error(main, ["--prompts", str(long), "--out", str(tmp_path / "out")], capsys, prog)
        assert re.search(r"prompt 2 \('a photo of a red circle a photo.*4800 characters\) needs \d+ positions .* "
                         r"context is 512", err), err
        assert "not a device name" in cli_error(main, ["--device", "cdua", "--out", str(tmp_path / "out")], capsys,
                                                prog)
        if not torch.cuda.is_available():
            assert "--device cuda: this torch" in cli_error(main, ["--device", "cuda", "--out", str(tmp_path / "out")],
                                                          capsys, prog)
    assert not (tmp_path / "out").exists()


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single")


def _record_collectives(calls):
    """Wrap torch.distributed's tensor collectives: each call appends (name, device of every tensor given)."""
    import torch.distributed as dist

    def devices(x):
        if isinstance(x, torch.Tensor):
            return [str(x.device)]
        if isinstance(x, (list, tuple)):
            return [d for v in x for d in devices(v)]
        return []
    for name in COLLECTIVES:
        def wrapped(*a, _real=getattr(dist, name), _name=name, **k):
            calls.append((_name, devices(list(a) + list(k.values()))))
            return _real(*a, **k)
        setattr(dist, name, wrapped)


def _ddp_worker(rank, port, args, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    RW.REWARDS["redness"] = Redness
    calls = []
    _record_collectives(calls)
    T.train(T.parse_args(args), log=lambda *a, **k: None)
    if out:
        with open(os.path.join(out, f"collectives-{rank}.json"), "w") as f:
            json.dump(calls, f)
    # everything is on disk; skip interpreter teardown, where gloo's threads now and then abort the process
    os._exit(0)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_group_has_a_backend_for_cpu_and_cuda_tensors(monkeypatch):
    """On CUDA the group must also take CPU tensors (an NCCL-only group crashed at the first step), and each
    process must own the GPU of its LOCAL_RANK before the group is created."""
    import torch.distributed as dist
    events = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, **k: events.append(("init", backend)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(("set_device", str(d))))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda is checked against the machine
    rank, world, device = T.dist_setup(T.train_device(T.TrainConfig(device="cuda")))
    assert (rank, world, str(device)) == (1, 2, "cuda:1")
    assert events[0] == ("set_device", "cuda:1") and events[1][0] == "init"
    backends = dict(part.split(":") for part in events[1][1].split(","))
    assert backends == {"cpu": "gloo", "cuda": "nccl"}
    events.clear()
    assert T.dist_setup(torch.device("cpu"))[2] == torch.device("cpu") and events == [("init", "gloo")]


def _check_collectives(out, device):
    """Every tensor handed to a collective by either process lived on that process's training device."""
    for rank in range(2):
        calls = json.loads(open(os.path.join(out, f"collectives-{rank}.json")).read())
        want = device if device == "cpu" else f"cuda:{rank}"
        assert calls and any(name == "all_reduce" for name, _ in calls)
        wrong = [(name, d) for name, devs in calls for d in devs if d != want]
        assert not wrong, (rank, wrong[:5])


# each process needs its own GPU: NCCL refuses two ranks on one card
TWO_PROCESS_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.device_count() >= 2 else [])


@pytest.mark.slow
@pytest.mark.parametrize("device", TWO_PROCESS_DEVICES)
def test_two_processes_match_one(random_base, redness, tmp_path, device):
    import torch.multiprocessing as mp
    one = train_args(random_base, tmp_path / "one", "--steps", "2", "--device", device)
    T.train(T.parse_args(one), log=lambda *a, **k: None)
    two = train_args(random_base, tmp_path / "two", "--steps", "2", "--device", device)
    mp.spawn(_ddp_worker, args=(_free_port(), two, str(tmp_path / "two")), nprocs=2, join=True)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6 if device == "cpu" else 1e-4)
    base = C.from_pretrained(random_base).state_dict()
    assert not torch.equal(a["language_model.lm_head.weight"], base["language_model.lm_head.weight"])
    _check_collectives(tmp_path / "two", device)


@pytest.mark.slow
@pytest.mark.parametrize("device", TWO_PROCESS_DEVICES)
def test_fsdp_over_two_processes_matches_one(random_base, redness, tmp_path, device):
    import torch.multiprocessing as mp
    tol = dict(rtol=0, atol=1e-6 if device == "cpu" else 1e-4)
    T.train(T.parse_args(train_args(random_base, tmp_path / "one", "--steps", "2", "--device", device)),
            log=lambda *a, **k: None)
    two = train_args(random_base, tmp_path / "two", "--steps", "2", "--fsdp", "--device", device)
    mp.spawn(_ddp_worker, args=(_free_port(), two, str(tmp_path / "two")), nprocs=2, join=True)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)
    _check_collectives(tmp_path / "two", device)
    # the gathered optimizer state resumes a sharded run
    mp.spawn(_ddp_worker, args=(_free_port(), ["--out", str(tmp_path / "two"), "--resume", "--steps", "3"], None),
             nprocs=2, join=True)
    T.train(T.parse_args(["--out", str(tmp_path / "one"), "--resume", "--steps", "3"]), log=lambda *a, **k: None)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_bf16_processes_roll_out_update_save_resume_and_evaluate(random_base, redness, tmp_path, fsdp):
    """The two-process gloo run under bf16, data parallel and FSDP (weights gathered in bf16 by its mixed-precision
    policy, gradients reduced in float32): train, save, resume, evaluate; the first step's KL is exactly 0, and the
    run ends where one bf16 process ends."""
    import torch.multiprocessing as mp
    (tmp_path / "p.txt").write_text("a red circle\n")
    common = [*BF16, "--save-every", "1", "--eval-prompts", str(tmp_path / "p.txt"), "--eval-n", "2"]
    T.train(T.parse_args(train_args(random_base, tmp_path / "one", *common, "--steps", "2")), log=lambda *a, **k: None)
    two = train_args(random_base, tmp_path / "two", *common, "--steps", "1", *(["--fsdp"] if fsdp else []))
    mp.spawn(_ddp_worker, args=(_free_port(), two, None), nprocs=2, join=True)
    mp.spawn(_ddp_worker, args=(_free_port(), ["--out", str(tmp_path / "two"), "--resume", "--steps", "2"], None),
             nprocs=2, join=True)
    steps = [m for m in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2] and steps[0]["kl"] == 0
    assert sorted(os.listdir(tmp_path / "two" / "eval")) == ["test_00000.json", "test_00001.json", "test_00002.json"]
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    if not fsdp:  # the same float32 gradients, summed over processes
        assert diff.max() < 1e-6
    else:  # FSDP forms gradients of its gathered bf16 weights (an embedding's rows add up in bf16): AdamW's first
        # steps move a weight by about lr = 3e-3 whatever its gradient's size, so a rounding that flips a tiny
        # gradient moves it by up to 2 lr a step; that happens to a few weights only
        assert diff.max() <= 4 * 3e-3 and (diff > 1e-4).float().mean() < 1e-4


def test_lora_trains_adapters_only_and_saves_merged(random_base, redness, tmp_path):
    policy, _ = T.train(T.parse_args(train_args(random_base, tmp_path / "run", "--steps", "2", "--lora-rank", "4")),
                           log=lambda *a, **k: None)
    base = C.from_pretrained(random_base)
    layer = policy.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, T.LoRALinear) and layer.lora_B.abs().sum() > 0
    assert torch.equal(layer.weight, base.language_model.model.layers[0].self_attn.q_proj.weight)
    x = torch.randint(0, base.cfg.vocab_size, (1, 5))
    with torch.no_grad(), T.adapters_off(policy):  # the reference policy is the base model
        torch.testing.assert_close(policy(policy.embed_text(x)), base(base.embed_text(x)))
    saved = C.from_pretrained(str(tmp_path / "run" / "ckpt"))  # merged: loads with no adapter code
    with torch.no_grad():
        torch.testing.assert_close(saved(saved.embed_text(x)), policy(policy.embed_text(x)), rtol=0, atol=1e-5)


def saved_as_on_cuda(path, monkeypatch):
    """Rewrite a torch.save file so that its tensors are tagged cuda:0, byte for byte as a GPU run saves them."""
    import torch.serialization
    state = torch.load(path, weights_only=True)
    with monkeypatch.context() as mp:
        mp.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)


@pytest.mark.parametrize("variant", [(), ("--lora-rank", "4"), ("--image-logp", "cfg")], ids=["full", "lora", "cfg"])
def test_bf16_runs_roll_out_update_save_resume_and_evaluate(random_base, redness, tmp_path, monkeypatch, variant):
    """The whole loop under bf16 (rollout, update with gradient checkpointing, sample grids, checkpoint, resume from
    a state saved on cuda:0, evaluation) for a full fine-tune, LoRA and --image-logp cfg. With mu = 1 the ratio is
    exactly 1, and the first step's KL exactly 0: the bf16 reference (the base with its adapters off, under
    LoRA) computes bit for bit what the policy computes before its first update."""
    quiet = dict(log=lambda *a, **k: None)
    (tmp_path / "p.txt").write_text("a red circle\n")
    T.train(T.parse_args(train_args(random_base, tmp_path / "run", *BF16, *variant, "--steps", "1", "--save-every", "1",
                                    "--sample-every", "1", "--eval-prompts", str(tmp_path / "p.txt"), "--eval-n", "2")),
            **quiet)
    saved_as_on_cuda(tmp_path / "run" / "ckpt" / "train_state.pt", monkeypatch)
    policy, metrics = T.train(T.parse_args(["--out", str(tmp_path / "run"), "--resume", "--steps", "2"]), **quiet)
    steps = [m for m in metrics if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2] and all(math.isfinite(m["loss"]) for m in steps)
    assert steps[0]["kl"] == 0 and steps[1]["kl"] > 0, [m["kl"] for m in steps]
    assert all(m["ratio_min"] == m["ratio_max"] == 1 for m in steps)
    assert sorted(os.listdir(tmp_path / "run" / "eval")) == ["test_00000.json", "test_00001.json", "test_00002.json"]
    grids = [f"step_0000{i}.{ext}" for i in (1, 2) for ext in ("jsonl", "png")]
    assert sorted(os.listdir(tmp_path / "run" / "samples")) == grids
    saved = C.from_pretrained(str(tmp_path / "run" / "ckpt"))
    assert not torch.equal(saved.language_model.model.layers[0].mlp.up_proj.weight,
                           C.from_pretrained(random_base).language_model.model.layers[0].mlp.up_proj.weight)
    # the trained tensors are saved in float32, LoRA's merged ones too (over a bf16 base they were rounded to bf16)
    assert final_weights(tmp_path / "run")["language_model.model.layers.0.mlp.up_proj.weight"].dtype == torch.float32


@pytest.mark.parametrize("lora", [False, True])
def test_what_trains_is_float32_and_what_is_frozen_is_held_in_bf16(random_base, redness, tmp_path, lora):
    """Under --dtype bfloat16 the trained weights stay float32 (the optimizer's master copy) and everything frozen
    is held in bf16: the VQ, the image embedding and head, the reference (half a float32 copy's bytes) and,
    under LoRA, the base."""
    cfg = T.resolve_defaults(T.parse_args(train_args(random_base, tmp_path / "run", *BF16,
                                                     *(["--lora-rank", "4"] if lora else []))))
    run = T.start_run(T.prepare(cfg, log=lambda *a: None), log=lambda *a: None)
    trained = {n: p.dtype for n, p in run.policy.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in run.policy.named_parameters() if not p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    assert all(n.startswith(("gen_", "language_model")) for n in frozen)
    assert any(".lora_" in n for n in trained) == lora and any(n.startswith("language_model") for n in frozen) == lora
    if lora:
        assert run.ref is None  # the policy with its adapters off
    else:
        assert {p.dtype for p in run.ref.parameters()} == {torch.bfloat16}
        nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.language_model.parameters())
        assert 2 * nbytes(run.ref) == nbytes(run.policy)
    # decoding under autocast never casts a frozen weight, and casts a trained matrix once for the whole call
    names = {p.data_ptr(): n for n, p in run.policy.named_parameters()}
    casts = CastCounter(names)
    with torch.no_grad(), run.autocast, casts:
        ids, mask = R.pad_tokens([[1, 5, 6, 2], [1, 7, 2]], 0)
        R.generate_images(run.policy, ids, mask, pad_id=0, cfg_weight=2.0)
        R.generate_text(run.policy, ids, mask, eos_id=-1, pad_id=0, max_new_tokens=4)
    assert not [n for n in casts.counts if n in frozen], casts.counts
    assert casts.counts  # the trained weights (LoRA: the adapters), cast by autocast once each
    assert all(k == 1 for n, k in casts.counts.items() if run.policy.get_parameter(n).ndim == 2), casts.counts


def test_every_tensor_of_a_bf16_step_lives_on_the_policy_device(random_base, redness, tmp_path, monkeypatch):
    """GPU defects caught on the CPU (on_device): sampling, decoding images, scoring log-probs and forming the loss
    of a bf16 step with --image-logp cfg, and an evaluation, create no tensor off the policy's device. The linear
    layers are pinned to oneDNN, whose kernel computed in float32 under autocast."""
    monkeypatch.setattr(K, "CPU_KERNEL", "oneDNN" if K.ONEDNN else None)
    for module, name in ((R, "sample_t2i"), (R, "decode_images"), (T, "logprobs"), (R, "grpo_loss")):
        monkeypatch.setattr(module, name, on_device(getattr(module, name)))
    (tmp_path / "p.txt").write_text("a red circle\n")
    _, metrics = T.train(T.parse_args(train_args(random_base, tmp_path / "run", *BF16, "--steps", "1",
                                                 "--image-logp", "cfg", "--eval-prompts", str(tmp_path / "p.txt"),
                                                 "--eval-n", "2")), log=lambda *a, **k: None)
    assert metrics[-1]["step"] == 1 and (tmp_path / "run" / "eval" / "test_00001.json").exists()


def test_default_image_logprobs_are_conditional_as_in_t2i_r1():
    """T2I-R1 samples image tokens with CFG but scores them with the conditional forward alone; that is the
    default, and --image-logp cfg scores them under the guided distribution."""
    m = tiny_model()
    ids, mask = R.pad_tokens(image_prompts(m, lengths=(5, 7)), PAD)
    codes = torch.randint(0, m.cfg.vq.codebook_size, (2, 4), generator=torch.Generator().manual_seed(0))
    batch = R.Rollout(["a", "b"], ["", ""], ids, mask, *R.pad_tokens([[5, 6]] * 2, PAD, side="right"), ids, mask, codes)
    full = torch.ones_like(codes, dtype=torch.bool)
    cond = R.completion_logprobs(m, ids, mask, codes, full, "image")
    guided = R.completion_logprobs(m, ids, mask, codes, full, "image", cfg_weight=5.0,
                                   uncond_ids=R.unconditional(ids, mask, PAD))
    with torch.no_grad():
        default = T.logprobs(m, batch, T.resolve_defaults(T.parse_args(["--levels", "token"])), PAD)[0]
        with_guidance = T.logprobs(m, batch, T.resolve_defaults(T.parse_args(["--levels", "token", "--image-logp",
                                                                             "cfg", "--cfg", "5"])), PAD)[0]
    torch.testing.assert_close(default, cond)
    torch.testing.assert_close(with_guidance, guided)
    assert not torch.allclose(cond, guided)


def test_each_level_is_scored_at_its_own_sampling_temperature():
    """Plan tokens are scored at --text-temperature, image tokens at --temperature, as each was sampled."""
    m = tiny_model()
    ids, mask = R.pad_tokens(image_prompts(m, lengths=(5, 7)), PAD)
    codes = torch.randint(0, m.cfg.vq.codebook_size, (2, 4), generator=torch.Generator().manual_seed(0))
    plan_ids, plan_mask = R.pad_tokens([[5, 6, 7], [8]], PAD, side="right")
    batch = R.Rollout(["a", "b"], ["", ""], ids, mask, plan_ids, plan_mask, ids, mask, codes)
    cfg = T.resolve_defaults(T.parse_args(["--text-temperature", "0.5", "--temperature", "1.7"]))
    with torch.no_grad():
        logp, got_mask = T.logprobs(m, batch, cfg, PAD)
        plan = R.completion_logprobs(m, ids, mask, plan_ids, plan_mask, "text", temperature=0.5)
        image = R.completion_logprobs(m, ids, mask, codes, torch.ones_like(codes, dtype=torch.bool), "image",
                                      temperature=1.7)
        image_at_plan_t = R.completion_logprobs(m, ids, mask, codes, torch.ones_like(codes, dtype=torch.bool),
                                                "image", temperature=0.5)
    assert got_mask.shape == (2, 3 + 4)
    torch.testing.assert_close(logp[:, :3][plan_mask], plan[plan_mask])
    torch.testing.assert_close(logp[:, 3:], image)
    assert not torch.allclose(image, image_at_plan_t)


def test_rollout_samples_keep_plans_with_their_prompts(random_base, redness, tmp_path):
    """Over a step's sampling calls each sample's request, plan and image prompt belong together, and the
    log-prob pass over a micro-batch of different prompts gives each sample the log-probs it gets alone."""
    prompts = [S.colors("red", "circle"), S.counting("square", 3), S.position("triangle", "left of", "circle")]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    cfg = T.resolve_defaults(T.parse_args(train_args(random_base, tmp_path / "run", "--group-size", "3", "--prompts",
                                                     str(tmp_path / "p.jsonl"), "--prompts-per-step", "3")))
    run = T.start_run(T.prepare(cfg, log=lambda *a: None), log=lambda *a: None)
    r, images, metas = T.rollout(run, 0)  # two sampling calls: 2 prompts, then 1
    assert len(r) == 9 and images.shape[0] == 9 and r.prompts == [m["prompt"] for m in metas]
    assert metas[::3] == T.step_prompts(run.train_items, cfg, 0)
    fmt, tok = R.CHAT_FORMATS["janus"], run.tok
    plans, requests = real(r.plan_ids, r.plan_mask), real(r.request_ids, r.request_mask)
    for i, prompt in enumerate(r.prompts):
        assert requests[i] == tok.encode(fmt.request_text(run.reasoning, prompt))
        assert real(r.image_prompt_ids, r.image_prompt_mask)[i] == tok.encode(fmt.image_text(prompt, tok.decode(plans[i])))
        assert r.plans[i] == tok.decode(plans[i]).strip()
    with torch.no_grad():
        together, mask = T.logprobs(run.policy, r, cfg, tok.pad_id)
        for i in range(len(r)):
            alone, m = T.logprobs(run.policy, r.rows(i, i + 1), cfg, tok.pad_id)
            assert int(m.sum()) == len(plans[i]) + r.codes.shape[1]
            torch.testing.assert_close(together[i][mask[i]], alone[0][m[0]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_training_steps_pass_the_reference_models_logprobs(random_base, redness, tmp_path, monkeypatch, lora):
    """Every loss call gets the reference log-probs of its own samples under the starting model (a frozen copy,
    or the same model with its LoRA adapters off); after the first update they differ from the policy's and
    the logged KL is positive."""
    calls, real = [], T.PolicyLoss.forward
    def recording(self, batch, old_logp, ref_logp, n_total):
        calls.append((batch, None if ref_logp is None else ref_logp.clone()))
        return real(self, batch, old_logp, ref_logp, n_total)
    monkeypatch.setattr(T.PolicyLoss, "forward", recording)
    extra = ["--lora-rank", "4", "--lr", "3e-2"] if lora else []
    _, metrics = T.train(T.parse_args(train_args(random_base, tmp_path / "run", "--steps", "3", *extra)),
                            log=lambda *a, **k: None)
    assert all(ref is not None for _, ref in calls)
    base = C.from_pretrained(random_base)
    cfg = T.resolve_defaults(T.parse_args(train_args(random_base, tmp_path / "x")))
    pad = M.Tokenizer.from_pretrained(random_base).pad_id
    with torch.no_grad():
        for batch, ref in calls:
            torch.testing.assert_close(ref, T.logprobs(base, batch, cfg, pad)[0], rtol=0, atol=1e-5)
    assert metrics[0]["kl"] == pytest.approx(0, abs=1e-9)  # the first step's policy is the reference
    assert all(m["kl"] > 1e-6 for m in metrics[1:]), [m["kl"] for m in metrics]


def test_plan_settings_default_per_model_and_cut_plans_are_counted(random_base, redness, tmp_path):
    """Janus-Pro gets T2I-R1's plan settings (1024 tokens, top-k 50, its chat format), the shapes world short
    plans; the step log reports the fraction of plans cut before EOS."""
    janus = tmp_path / "janus"  # a Janus-Pro-like folder: no reasoning_prompt.txt of its own
    os.makedirs(janus)
    (janus / "config.json").write_text((open(os.path.join(random_base, "config.json")).read()))
    defaults = json.dumps(R.MODEL_DEFAULTS)
    c = T.resolve_defaults(T.parse_args(["--ckpt", str(janus)])).sampling
    assert (c.max_plan_tokens, c.text_top_k, c.chat_format, c.cfg_weight) == (1024, 50, "t2i-r1", 5.0)
    c = T.resolve_defaults(T.parse_args(["--ckpt", str(janus), "--max-plan-tokens", "300", "--text-top-k", "0"])).sampling
    assert (c.max_plan_tokens, c.text_top_k) == (300, 0)
    for args in ([], ["--ckpt", random_base]):  # the shapes world's base, and a folder with its own request
        c = T.resolve_defaults(T.parse_args(args)).sampling
        assert (c.max_plan_tokens, c.text_top_k, c.chat_format, c.cfg_weight) == (64, 0, "janus", 2.0)
    assert json.dumps(R.MODEL_DEFAULTS) == defaults  # resolving fills a copy, never the shared table
    lines = []
    _, metrics = T.train(T.parse_args(train_args(random_base, tmp_path / "run", "--steps", "1",
                                                    "--max-plan-tokens", "2")), log=lines.append)
    assert metrics[0]["plan_cut_frac"] > 0.5 and metrics[0]["plan_tokens"] <= 2
    step_line = next(l for l in lines if l.startswith("step 1/1"))
    assert f"{metrics[0]['plan_cut_frac']:.2f} cut" in step_line and "| clip " not in step_line


def test_clip_scores_samples_and_training_evaluations(random_base, tmp_path, monkeypatch, capsys):
    """`--score clip` with several images per prompt (diversity needs the embedding width) in sample.py and in
    train.py's evaluation; the samples are written before scoring, so a failing reward loses none."""
    c = _tiny_cfg()
    _write_hf_clip(tmp_path / "clip", c, _clip_sd(c, seed=1))
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    common = ["--ckpt", random_base, "--prompts", str(tmp_path / "p.txt"), "--n", "2", "--max-plan-tokens", "4",
              "--rewards", "clip", "--reward-ckpt", f"clip={tmp_path / 'clip'}"]
    recs = SA.main(common + ["--out", str(tmp_path / "a")])
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert 0 <= summary["diversity"] <= 2 and summary["images"] == 4
    lines = [json.loads(l) for l in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert [l["scores"]["clip"] for l in lines] == [r["scores"]["clip"] for r in recs]

    def broken(*a, **k):
        raise RuntimeError("reward model died")
    monkeypatch.setattr(SA, "score", broken)
    with pytest.raises(RuntimeError, match="died"):
        SA.main(common + ["--out", str(tmp_path / "b")])
    lines = [json.loads(l) for l in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    assert [l["image_tokens"] for l in lines] == [r["image_tokens"] for r in recs]  # same seed, same samples
    assert all((tmp_path / "b" / l["file"]).exists() for l in lines)
    monkeypatch.undo()

    T.train(T.parse_args(train_args(
        random_base, tmp_path / "run", "--steps", "1", "--rewards", "clip", "--reward-ckpt", f"clip={tmp_path / 'clip'}",
        "--eval-prompts", str(tmp_path / "p.txt"), "--eval-n", "2")), log=lambda *a, **k: None)
    assert sorted(os.listdir(tmp_path / "run" / "eval")) == ["test_00000.json", "test_00001.json"]
    evals = [json.loads((tmp_path / "run" / "eval" / f).read_text()) for f in ("test_00000.json", "test_00001.json")]
    assert all(0 <= s["diversity"] <= 2 and "clip" in s["rewards"] for s in evals)
    err = capsys.readouterr().err  # the evaluation shows its progress, as whole lines in a log
    assert "test evaluation: image tokens" in err and "test evaluation: scoring 4/4" in err
    assert "\r" not in err


def test_janus_pro_recipe_starts_on_t2i_r1_file_with_hps_and_geneval(random_base, tmp_path, capsys):
    """The README's recipe (T2I-R1's prompt file, --rewards hps:1,geneval:1) on tiny published-layout files:
    it reports the prompts the rules cannot check and trains; bad input stops it with one error line before
    any model is loaded."""
    ckpt, _ = _reward_folders(tmp_path / "rw")
    path = tmp_path / "geneval_and_t2i_data_final.json"
    path.write_text("\n".join(json.dumps(r) for r in T2I_R1_ROWS))
    recipe = train_args(random_base, tmp_path / "run", "--prompts", str(path), "--rewards", "hps:1,geneval:1",
                        "--reward-ckpt", f"hps={ckpt['hps']}", f"geneval={ckpt['geneval']}", f"clip={ckpt['clip']}",
                        "--steps", "1", "--sample-every", "1")
    lines = []
    _, metrics = T.train(T.parse_args(recipe), log=lines.append)
    saved = [json.loads(l) for l in (tmp_path / "run" / "samples" / "step_00001.jsonl").read_text().splitlines()]
    by_prompt = {r["prompt"]: r for r in T2I_R1_ROWS}
    for r in saved:  # which samples the geneval rules checked: those whose rows converted
        assert r["checked"]["hps"] and r["checked"]["geneval"] == (by_prompt[r["prompt"]]["task_type"] not in
                                                                  ("texture", "non"))
    assert any(l.startswith("geneval: 2 of the 6 training prompts carry no GenEval metadata") for l in lines), lines
    m = metrics[0]
    assert math.isfinite(m["reward"]) and math.isfinite(m["reward_hps"]) and m["step"] == 1
    # words the shapes world's vocabulary lacks are named
    warning = next(l for l in lines if l.startswith("warning: "))
    assert "'zebra'" in warning and "training prompts" in warning
    # bad input: one command-line error, nothing loaded or written
    out = tmp_path / "bad"
    bad = train_args(random_base, out, "--prompts", str(path), "--rewards", "hps:1,geneval:1")
    assert "needs the 'hps' checkpoint" in cli_error(T.main, bad, capsys, "train.py")
    assert "--levels" in cli_error(T.main, bad + ["--levels", "plans"], capsys, "train.py")
    assert "--group-size must be at least 2" in cli_error(T.main, bad + ["--group-size", "1"], capsys, "train.py")
    assert "unknown reward 'hsp'" in cli_error(T.main, bad + ["--rewards", "hsp"], capsys, "train.py")
    assert "reasoning prompt file" in cli_error(T.main, bad + ["--reasoning-prompt", str(tmp_path / "x.txt")],
                                                 capsys, "train.py")
    (tmp_path / "latin1.txt").write_bytes(b"Plan the image of\n{prompt} \xe9tape par \xe9tape\n")
    assert re.search(re.escape(str(tmp_path / "latin1.txt")) + r":2: not UTF-8 text \(byte 0xe9 at column 10\)",
                     cli_error(T.main, bad + ["--reasoning-prompt", str(tmp_path / "latin1.txt")], capsys, "train.py"))
    assert not out.exists()


def test_t2i_r1_preset_trains_a_step_on_t2i_r1_file(random_base, tmp_path):
    """--rewards t2i-r1 (hps, t2i-r1-detect, git) on tiny published-layout folders and T2I-R1's prompt-file
    format: it prints how many prompts each reward scores and trains one step."""
    ckpt, _ = _reward_folders(tmp_path / "rw")
    git = _write_git_folder(tmp_path / "rw" / "git", _tiny_git_cfg())
    path = tmp_path / "geneval_and_t2i_data_final.json"
    path.write_text("\n".join(json.dumps(r) for r in T2I_R1_ROWS))
    args = train_args(random_base, tmp_path / "run", "--prompts", str(path), "--rewards", "t2i-r1", "--reward-ckpt",
                      f"hps={ckpt['hps']}", f"geneval={ckpt['geneval']}", f"git={git}", "--steps", "1",
                      "--sample-every", "1")
    cfg = T.parse_args(args + ["--t2i-r1-as-released"])
    assert cfg.t2i_r1_as_released and not T.parse_args(args).t2i_r1_as_released
    lines = []
    _, metrics = T.train(cfg, log=lines.append)
    assert "hps: scores all 6 training prompts" in lines
    assert "t2i-r1-detect: scores all 6 training prompts" in lines
    assert any(l.startswith("git: scores 4 of the 6 training prompts; the other 2 (T2I-R1 task types: numeracy 1, "
                            "spatial 1)") for l in lines), lines
    saved = [json.loads(l) for l in (tmp_path / "run" / "samples" / "step_00001.jsonl").read_text().splitlines()]
    task = {r["prompt"]: r["task_type"] for r in T2I_R1_ROWS}
    for r in saved:
        asked = task[r["prompt"]] not in ("spatial", "numeracy")
        assert r["checked"]["t2i-r1-detect"] and r["checked"]["git"] == asked
    m = metrics[0]
    assert all(math.isfinite(m[k]) for k in ("reward", "reward_hps", "reward_t2i-r1-detect", "reward_git"))
    assert 0 < m["reward_git"] < 1 and m["step"] == 1


def test_resume_reads_train_state_with_weights_only_and_reports_without_held_out_prompts(random_base, redness,
                                                                                       tmp_path, monkeypatch):
    """train_state.pt is read with weights_only=True; a run without held-out prompts still writes summary.md
    (its training rewards) and curves.png."""
    quiet = dict(log=lambda *a, **k: None)
    T.train(T.parse_args(train_args(random_base, tmp_path / "a", "--steps", "2", "--save-every", "1")), **quiet)
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "| steps | reward | reward_redness | kl | plan_tokens |" in summary and "| 1-2 |" in summary
    assert Image.open(tmp_path / "a" / "curves.png").size == (640, 360)
    real, seen = torch.load, []
    def recording_load(f, *a, **k):
        if str(f).endswith("train_state.pt"):
            seen.append(k.get("weights_only"))
        return real(f, *a, **k)
    monkeypatch.setattr(torch, "load", recording_load)
    _, metrics = T.train(T.parse_args(["--out", str(tmp_path / "a"), "--resume", "--steps", "3"]), **quiet)
    assert seen and all(w is True for w in seen) and [m["step"] for m in metrics] == [1, 2, 3]
    # a run saved before SamplingConfig kept the sampling settings beside the others ("cfg" the guidance)
    state_file = tmp_path / "a" / "ckpt" / "train_state.pt"
    state = torch.load(state_file, weights_only=True)
    flat = {k: v for k, v in state["config"].items() if k != "sampling"}
    flat.update({("cfg" if k == "cfg_weight" else k): v for k, v in state["config"]["sampling"].items()},
                cfg=3.0, max_plan_tokens=5)
    torch.save({**state, "config": flat}, state_file)
    cfg = T.parse_args(["--out", str(tmp_path / "a"), "--resume", "--text-top-k", "3"])
    assert (cfg.sampling.cfg_weight, cfg.sampling.max_plan_tokens, cfg.sampling.text_top_k) == (3.0, 5, 3)
    assert cfg.ckpt == random_base and cfg.steps == 3
    torch.save({**state, "config": {**state["config"], "no_such_setting": 1}}, state_file)
    with pytest.raises(ValueError, match="train_state.pt: its saved settings do not fit.*no_such_setting"):
        T.parse_args(["--out", str(tmp_path / "a"), "--resume"])


def test_train_table_shows_the_first_and_the_last_steps_once_each():
    steps = [{"step": s, "reward": float(s), "reward_shapes": 2.0 * s, "kl": 0.0, "plan_tokens": 5.0} for s in range(1, 26)]
    rows = [line for line in RN.train_table(steps, k=10).splitlines() if re.match(r"\| \d", line)]
    assert rows == ["| 1-10 | 5.500 | 11.000 | 0.000 | 5.000 |", "| 16-25 | 20.500 | 41.000 | 0.000 | 5.000 |"]
    rows = [line for line in RN.train_table(steps[:3], k=10).splitlines() if re.match(r"\| \d", line)]
    assert rows == ["| 1-3 | 2.000 | 4.000 | 0.000 | 5.000 |"]  # a short run: one span, not the same one twice
