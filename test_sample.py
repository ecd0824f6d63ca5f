"""Tests of sample.py (and settings.py's one check): prompt files, the command line, fidelity of whole
samples, progress.
"""

import io
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints as C
import kernels as K
import model as M
import rewards as RW
import sample as SA
import settings as ST
import shapes as S
import t2i_r1 as R
import train as T
from conftest import T2I_R1_ROWS, cli_error, make_word_tokenizer, settings, tiny_hf_janus, tiny_model


def test_sample_cli_writes_images_grids_and_jsonl(tmp_path, capsys):
    m = tiny_model()
    tok = make_word_tokenizer(tmp_path / "ckpt")
    C.save_pretrained(m, tmp_path / "ckpt", tokenizer=tok)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle", "tag": "colors"}\n\na blue square\n')
    args = ["--ckpt", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "p.jsonl"), "--n", "2",
            "--rollout-batch", "1", "--max-plan-tokens", "4", "--seed", "7"]
    recs = SA.main(args + ["--out", str(tmp_path / "a")])
    assert len(recs) == 4 and recs[0]["metadata"]["tag"] == "colors" and recs[2]["prompt"] == "a blue square"
    lines = [json.loads(l) for l in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert [l["image_tokens"] for l in lines] == [r["image_tokens"] for r in recs]
    from PIL import Image
    img = Image.open(tmp_path / "a" / lines[0]["file"])
    assert img.size == (m.cfg.vq.image_size,) * 2 and img.mode == "RGB"
    assert (tmp_path / "a" / "grid_0000.png").exists() and (tmp_path / "a" / "grid_0001.png").exists()
    again = SA.main(args + ["--out", str(tmp_path / "b")])  # the same seed gives the same output
    assert [r["image_tokens"] for r in again] == [r["image_tokens"] for r in recs]
    assert [r["plan"] for r in again] == [r["plan"] for r in recs]
    (tmp_path / "empty.txt").write_text("\n\n")
    ck = ["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "c")]
    assert "empty.txt holds no prompts" in cli_error(SA.main, ck + ["--prompts", str(tmp_path / "empty.txt")],
                                                     capsys, "sample.py")
    msg = cli_error(SA.main, ck + ["--prompt", "a red circle", "--rewards", "shapes"], capsys, "sample.py")
    assert "carries GenEval metadata" in msg
    assert "--n must be at least 1, got 0" in cli_error(SA.main, ck + ["--n", "0"], capsys, "sample.py")
    assert "no-such-folder does not exist" in cli_error(SA.main, ["--ckpt", str(tmp_path / "no-such-folder")],
                                                        capsys, "sample.py")
    assert not (tmp_path / "c").exists()  # every error came before any sampling
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*\"prompt\""):
        SA.read_prompts(str(tmp_path / "bad.jsonl"))


def test_one_check_of_the_settings_for_every_script(tmp_path, capsys):
    """A bound is declared once, beside its setting, and checked by one function: the same flag out of range is
    the same error from train.py and sample.py (sampling settings too), and shapes.py's diagnose."""
    out = ["--out", str(tmp_path / "o")]
    for flag, value, want in [("--rollout-batch", "0", "--rollout-batch must be at least 1, got 0"),
                              ("--threads", "0", "--threads must be at least 1, got 0"),
                              ("--text-top-p", "1.5", "--text-top-p must lie in (0, 1], got 1.5"),
                              ("--cfg", "inf", "--cfg must be a finite number, got inf")]:
        errors = {cli_error(main, out + [flag, value], capsys, prog).split(": error: ")[1]
                  for main, prog in ((T.main, "train.py"), (SA.main, "sample.py"))}
        assert errors == {want}, (flag, errors)
    assert cli_error(S.main, ["diagnose", "--cfg", "inf"], capsys, "shapes.py").endswith(want)
    with pytest.raises(ValueError, match="--temperature must be at least 0, got -1"):
        ST.check_settings(T.TrainConfig(sampling=R.SamplingConfig(temperature=-1.0)))


def test_sample_refuses_an_out_holding_samples_unless_overwritten_and_names_bad_bytes(tmp_path, capsys):
    m = tiny_model()
    C.save_pretrained(m, tmp_path / "ckpt", tokenizer=make_word_tokenizer(tmp_path / "ckpt"))
    args = ["--ckpt", str(tmp_path / "ckpt"), "--prompt", "a red circle", "--n", "1", "--max-plan-tokens", "2",
            "--out", str(tmp_path / "a")]
    SA.main(args + ["--n", "3"])
    err = cli_error(SA.main, args, capsys, "sample.py")
    assert "already holds samples" in err and "--overwrite" in err
    SA.main(args + ["--overwrite"])  # one image now: none of the three earlier ones stays beside it
    assert sorted(p.name for p in (tmp_path / "a").glob("0000_*.png")) == ["0000_0.png"]
    lock = C.lock_folder(str(tmp_path / "b"), "sample")  # another sample.py writing there
    err = cli_error(SA.main, args[:-1] + [str(tmp_path / "b")], capsys, "sample.py")
    assert "in use by another sample.py process" in err and str(os.getpid()) in err
    lock.close()
    (tmp_path / "p.txt").write_bytes(b"a red circle\na blue \xff square\n")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "p.txt")) + r":2: not UTF-8 .*0xff at column 8"):
        SA.read_prompts(str(tmp_path / "p.txt"))


@pytest.mark.parametrize("kernel", [None, *K.CPU_KERNELS])
def test_sample_matches_transformers_janus_generate(tmp_path, monkeypatch, kernel):
    """`sample.py --levels token --temperature 0 --cfg 5` gives exactly the image tokens of transformers' Janus
    `generate` in image mode (guidance 5, greedy), on the same random weights, whichever CPU matmul kernel
    kernels.Linear takes."""
    if kernel == "oneDNN" and not K.ONEDNN:
        pytest.skip("oneDNN's matmul is not available here")
    monkeypatch.setattr(K, "CPU_KERNEL", kernel)
    # large noise: peaked distributions, so a wrong token cannot hide in a near-tie
    ref = tiny_hf_janus(0.3, image_size=96, num_image_tokens=36)
    from transformers import GenerationConfig
    ref.save_pretrained(tmp_path / "ckpt")
    tok = make_word_tokenizer(tmp_path / "ckpt")
    prompts = ["a red circle", "a photo of a blue square"]
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    recs = SA.main(["--ckpt", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "p.txt"), "--levels", "token",
                   "--chat-format", "janus", "--temperature", "0", "--cfg", "5", "--n", "1", "--rollout-batch", "2",
                   "--out", str(tmp_path / "o")])
    gen = GenerationConfig(bos_token_id=tok.bos_id, pad_token_id=tok.pad_id, do_sample=False, guidance_scale=5.0,
                           generation_kwargs={"boi_token_id": tok.boi_id})
    for rec, prompt in zip(recs, prompts):
        ids = torch.tensor([tok.encode(M.image_prompt(prompt))])
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", generation_config=gen)
        assert rec["image_tokens"] == want[0].tolist()


def test_progress_is_rewritten_on_a_terminal_and_whole_lines_elsewhere():
    buf = io.StringIO()  # not a terminal: whole lines, the last one always
    bar = SA.Progress(5, "image tokens", stream=buf, every_line=0)
    for _ in range(5):
        bar.update()
    lines = buf.getvalue().split("\n")
    assert "\r" not in buf.getvalue() and lines[-1] == "" and len(lines) == 6 and lines[-2].startswith("image tokens 5/5")
    buf = io.StringIO()
    bar = SA.Progress(5, "x", stream=buf, every_line=3600)
    for _ in range(5):
        bar.update()
    assert buf.getvalue().count("\n") == 1 and buf.getvalue().startswith("x 5/5")  # a long stage: a few lines

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    buf = Terminal()
    bar = SA.Progress(3, "x", stream=buf, every=0)
    for _ in range(3):
        bar.update()
    assert buf.getvalue().count("\r") == 3 and buf.getvalue().count("\n") == 1


def test_plan_tokens_have_progress_and_the_image_eta_leaves_the_plans_out(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(SA.time, "time", lambda: clock[0])
    buf = io.StringIO()
    images, plans = SA.Progress(4, "image tokens", stream=buf, every_line=0), SA.Progress(8, "plan tokens", stream=buf,
                                                                                          every_line=0)
    image_cb, plan_cb = SA.stage_progress(images, plans), SA.stage_progress(plans, images)
    for batch in range(2):  # per batch: 2 plan tokens, 50 s each, then every plan has ended (a jump to 4 of 4)
        for i in (1, 2):
            clock[0] += 50
            plan_cb(i, 4)
        plan_cb(4, 4)
        for i in (1, 2)[:2 - batch]:  # then the image tokens, 1 s each
            clock[0] += 1
            image_cb(i, 2)
    lines = buf.getvalue().splitlines()
    assert lines[-1].startswith("image tokens 3/4 [203s, eta 1s]"), lines  # 1 s per image token, plans apart
    assert [l.split(" [")[0] for l in lines if l.startswith("plan")] == [f"plan tokens {n}/8" for n in (1, 2, 4, 5, 6, 8)]
    monkeypatch.undo()  # the real clock again; a real sampler's plans and images
    err, m = io.StringIO(), tiny_model()
    monkeypatch.setattr(SA.sys, "stderr", err)
    SA.generate(m, make_word_tokenizer(tmp_path), [{"prompt": "a red circle"}], settings(max_plan_tokens=3), n=2,
                batch_size=1)
    assert "plan tokens 3/3" in err.getvalue() and f"image tokens {m.cfg.image_tokens}/{m.cfg.image_tokens}" in err.getvalue()


def test_shapes_t2i_r1_file_counts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one hamburger", "nouns": ["hamburger"], "task_type": "numeracy", '
                    '"numeracy_info": [{"obj_name": "hamburger", "num": 1}]}\n\n'
                    '{"task_type": "shape", "prompt": "an oval mirror", "nouns": ["mirror"], '
                    '"attr_nouns": ["oval mirror"]}')
    items = SA.read_prompts(str(path))
    assert [it["task_type"] for it in items] == ["numeracy", "shape"] and "include" not in items[1]
    assert {k: items[0][k] for k in ("tag", "include", "exclude", "prompt")} == {
        "tag": "counting", "include": [{"class": "hamburger", "count": 1}],
        "exclude": [{"class": "hamburger", "count": 2}], "prompt": "one hamburger"}


def test_t2i_r1_prompt_file_reads_as_published_and_rule_rewards_abstain_where_they_cannot_check(tmp_path):
    path = tmp_path / "geneval_and_t2i_data_final.json"
    path.write_text("\n".join(json.dumps(r) for r in T2I_R1_ROWS))  # no final newline, as published
    items = SA.read_prompts(str(path))
    assert [it["prompt"] for it in items] == [r["prompt"] for r in T2I_R1_ROWS]
    assert [it.get("tag") for it in items] == ["position", "counting", None, "color_attr", None, "two_object"]
    assert items[0]["include"][1] == {"class": "car", "count": 1, "position": ["below", 0]}
    assert items[2]["nouns"] == ["desk", "shoe"] and "include" not in items[2]  # its own fields are kept
    # the rules abstain on rows they cannot check: score 0 (a constant within the group), marked unchecked
    shapes_reward = S.ShapesReward()
    shapes_reward.classes = None  # the shapes detector stands in for an open-vocabulary one (T2I-R1's nouns)
    scores, info = shapes_reward(np.full((6, 8, 8, 3), 240, np.uint8), items)
    assert info["checked"] == [True, True, False, True, False, True]
    assert scores[2] == 0 and scores[4] == 0 and info["strict"][2] is None
    ens = RW.RewardEnsemble({"shapes": 1.0}, {})
    report = ens.unchecked_report(items, "training prompts")
    assert report == [report[0]] and report[0].startswith("shapes: 2 of the 6 training prompts carry no GenEval")
    assert "(T2I-R1 task types: non 1, texture 1)" in report[0]
    # a prompt set none of whose rows a rule reward can check is refused
    with pytest.raises(ValueError, match="shapes: none of the 2 prompt"):
        ens.check_metadata([items[2], items[4]])
    # malformed rows: the error names the file, the line and the field
    bad = [({**T2I_R1_ROWS[0], "spatial_info": {"obj1": "car", "locality": "below"}}, "'spatial_info' needs"),
           ({**T2I_R1_ROWS[1], "numeracy_info": [{"obj_name": "plate", "num": "two"}]}, "'numeracy_info' must be"),
           ({"prompt": "a cat", "tag": "single_object", "include": [{"count": 1}]}, r"include\[0\] needs a 'class'"),
           ({"prompt": "a cat", "include": [{"class": "cat", "count": 0}]}, r"include\[0\] needs a 'count'"),
           ({"prompt": "a cat", "include": [{"class": "cat", "count": 1, "position": ["near", 0]}]},
            r"include\[0\]: 'position' must be"),
           # geneval_score places a clause relative to one already matched: a later one cannot be scored
           ({"prompt": "a cat left of a dog", "include": [{"class": "cat", "count": 1, "position": ["left of", 1]},
                                                          {"class": "dog", "count": 1}]},
            r"include\[0\]: 'position' must be")]
    for row, msg in bad:
        path.write_text(json.dumps(T2I_R1_ROWS[0]) + "\n\n" + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=re.escape(str(path)) + ":3: " + msg):
            SA.read_prompts(str(path))
