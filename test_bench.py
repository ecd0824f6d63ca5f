"""Tests of bench.py, and the command line of every script.
"""

import argparse
import os
import re

import pytest
import torch

import bench
import sample as SA
import shapes as S
import train as T
from conftest import BF16, train_args


def test_bench_train_measures_steps_on_random_weights(capsys):
    args = argparse.Namespace(preset="tiny", steps=2, group_size=4, prompts_per_step=2, micro_batch=4,
                              max_plan_tokens=6, lora_rank=4, grad_checkpointing=True, compile=False, device="cpu",
                              dtype="bfloat16")
    bench.bench_train(args)
    row = capsys.readouterr().out.strip().splitlines()[-1].split("|")
    assert row[1].strip() == "tiny" and row[2].strip() == "LoRA rank 4, bfloat16" and row[3].strip() == "4 x 2"
    sec, roll, peak = (float(x) for x in row[5:8])
    assert 0 < roll <= sec and peak > 0


@pytest.mark.parametrize("lora", [False, True])
def test_bench_memory_counts_the_weights_train_py_holds(random_base, redness, tmp_path, lora, capsys):
    """bench.py memory's weight rows are the bytes train.py's models hold under bf16 (trained float32 weights,
    frozen bf16 ones, the bf16 reference), and its table prints a peak per plan length."""
    cfg = T.resolve_defaults(T.parse_args(train_args(random_base, tmp_path / "run", *BF16,
                                                     *(["--lora-rank", "4"] if lora else []))))
    run = T.start_run(T.prepare(cfg, log=lambda *a: None), log=lambda *a: None)
    est = bench.memory_estimate(run.policy.cfg, lora_rank=4 if lora else 0)
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps) / 2**30
    params = list(run.policy.parameters())
    assert est["trained weights (float32)"] == pytest.approx(nbytes(p for p in params if p.requires_grad))
    assert est["frozen weights (bf16)"] == pytest.approx(nbytes(p for p in params if not p.requires_grad))
    assert est["KL reference (bf16)"] == pytest.approx(0 if lora else nbytes(run.ref.parameters()))
    bench.bench_memory(bench.build_parser().parse_args(["memory", "--preset", "janus-pro-7b", "--lora-rank", "64"]))
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| **peak")]
    assert len(rows) == 2 and all(0 < float(x) < 40 for row in rows for x in row[2:4])


@pytest.mark.slow
def test_bench_gpu_prints_every_part_and_a_failing_column_leaves_the_others(capsys, monkeypatch):
    """`bench.py gpu` end to end on CPU with everything shrunk, so that README's GPU command cannot rot; the
    transformers column fails (as transformers' own Janus generate has), and every other figure still comes."""

    def broken(*a):
        raise TypeError("_prepare_static_cache() missing 1 required positional argument")
    monkeypatch.setattr(bench, "build_hf", broken)
    shapes_flags = "--steps 1 --prompts-per-step 1 --group-size 2 --eval-n 1 --no-test-eval --sample-every 0"
    args = bench.build_parser().parse_args(
        ["gpu", "--device", "cpu", "--preset", "tiny", "--batch", "1", "--backend", "aot_eager", "--hf",
         "--full-preset", "tiny", "--lora-preset", "tiny", "--lora-rank", "4", "--group-size", "2",
         "--max-plan-tokens", "4", f"--shapes-flags={shapes_flags}"])
    bench.bench_gpu(args)
    out = capsys.readouterr().out
    assert "transformers' Janus: failed: TypeError: _prepare_static_cache()" in out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| batch")}
    eager, compiled, hf, images, floor, step, ratio = rows["1"]
    assert hf == "failed" and float(eager) > 0 and float(compiled) > 0
    assert float(step) / float(floor) == pytest.approx(float(ratio), rel=0.02) and float(ratio) > 1
    full, lora = [line for line in out.splitlines() if line.startswith("| tiny |")]
    for line, what in ((full, "full fine-tune"), (lora, "LoRA rank 4")):
        cells = [c.strip() for c in line.split("|")[2:-1]]
        assert cells[0] == f"{what}, float32" and all(float(c) > 0 for c in cells[1:])
    assert float(rows[f"`python train.py {shapes_flags}`"][0]) > 0


def test_every_flag_of_every_script_has_a_help_line_with_its_default(tmp_path):

    def parsers(p):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from parsers(sub)
    seen = 0
    for script in (T, SA, bench, S):
        for p in parsers(script.build_parser()):
            fmt = p._get_formatter()
            for a in p._actions:
                if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                    continue
                text = fmt._expand_help(a) if a.help else ""
                assert a.help and "(default: " in text, (p.prog, a.dest, text)
                # argparse reads a bare % as a format code: "a few % after" came out garbled
                assert "%" not in re.sub(r"%\(\w+\)s", "", fmt._get_help_string(a)), (p.prog, a.dest, a.help)
                seen += 1
    assert seen > 80
    # one name per idea across the scripts
    flags = {s: {o for a in s.build_parser()._actions for o in a.option_strings} for s in (T, SA)}
    for both in ("--rewards", "--reward-ckpt", "--rollout-batch", "--levels", "--dtype", "--text-top-k",
                 "--max-plan-tokens", "--chat-format", "--reasoning-prompt", "--device", "--seed", "--out"):
        assert all(both in f for f in flags.values()), both
    assert not ({"--score", "--no-cot", "--batch-size"} & flags[SA])
    assert bench.build_parser().parse_args(["speed", "--preset", "cpu-768"]).preset == "cpu-768"
    assert "a few percent after ~20 s of compiling" in " ".join(T.build_parser().format_help().split())
    # the examples of sample.py's help read files that exist once the command before them has run
    written = [os.path.relpath(f) for f in S.write_prompt_sets(os.path.join(tmp_path, "data", "shapes"))]
    examples = [e for e in re.findall(r"--prompts (\S+\.jsonl)", SA.__doc__) if "/" in e]  # not a user's own file
    assert examples and all(os.path.join(os.path.relpath(tmp_path), e) in written for e in examples), examples
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert bench.cpu_name().endswith(", 1 thread")
    torch.set_num_threads(threads)
