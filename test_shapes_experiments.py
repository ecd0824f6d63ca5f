"""Tests of the shapes world's experiments (issue 21): split rewards, diversity, the perfect planner, SFT and
the experiments' tables. CPU only, seconds each.

Run: python -m pytest -q test_shapes_experiments.py
"""

import json
import math
import os

import numpy as np
import pytest
import torch

import checkpoints as C
import model as M
import rewards as RW
import sample as SA
import shapes as S
import train as T
from conftest import cli_error, unit_scale_image_path


def scene(*objects):
    return S.Scene([S.Obj(*o) for o in objects])


def split_scores(images, metas, weights=None):
    """Scores of the dense shapes reward and of its four parts on the same images, and their weighted sum."""
    parts = {f"shapes-{p}": 1.0 for p in RW.DENSE_PARTS}
    parts.update(weights or {})
    ensemble = RW.RewardEnsemble({"shapes": 1.0, **parts}, {})
    scores, _ = ensemble(images, metas)
    return scores, RW.combine_rewards(scores, parts)


# ---- 1. reward weights: the dense reward split into presence, count, colour and position ------------------------


def test_split_rewards_sum_to_the_dense_reward_at_equal_weights():
    # scenes that get every part of the dense reward partly right, so that each part carries weight somewhere
    cases = [
        (S.position("circle", "left of", "square"),                     # subject on the wrong side
         scene(("square", "red", (0, 0, 16, 16)), ("circle", "blue", (40, 0, 56, 16)))),
        (S.position("circle", "left of", "square"),                     # right
         scene(("circle", "red", (0, 0, 16, 16)), ("square", "blue", (40, 0, 56, 16)))),
        (S.colors("red", "circle"), scene(("circle", "blue", (0, 0, 16, 16)))),
        (S.color_attr("red", "circle", "blue", "square"),
         scene(("circle", "red", (0, 0, 16, 16)), ("square", "green", (40, 40, 64, 64)))),
        (S.counting("triangle", 3),                                     # one short
         scene(("triangle", "red", (0, 0, 16, 16)), ("triangle", "red", (40, 40, 56, 56)))),
        (S.counting("triangle", 2),                                     # one too many: the exclude clause fails
         scene(("triangle", "red", (0, 0, 16, 16)), ("triangle", "red", (40, 40, 56, 56)),
               ("triangle", "red", (40, 0, 56, 16)))),
        (S.two_object("circle", "square"), scene(("circle", "red", (0, 0, 16, 16)))),
        (S.riddle("count", "circle", count=4), scene(("circle", "red", (0, 0, 16, 16)))),
        (S.single_object("square"), scene()),
    ]
    metas = [m for m, _ in cases]
    images = np.stack([S.render(s) for _, s in cases])
    scores, summed = split_scores(images, metas)
    assert torch.allclose(summed, scores["shapes"], atol=1e-6), (summed, scores["shapes"])
    # every part moves the sum here: dropping any one of them breaks the equality
    for p in RW.DENSE_PARTS:
        assert scores[f"shapes-{p}"].abs().sum() > 0.1, p
    # the dense reward takes many values on these scenes, not only 0 and 1
    assert len(set(scores["shapes"].tolist())) > 5


def test_split_rewards_by_hand_and_weighted():
    """Hand-computed parts: the dense reward is the mean over clauses of the mean of each clause's parts."""
    meta = S.position("circle", "left of", "square")  # clause 0: square (count); clause 1: circle (count, position)
    wrong_side = scene(("square", "red", (0, 0, 16, 16)), ("circle", "blue", (40, 0, 56, 16)))
    red_as_blue = scene(("circle", "blue", (0, 0, 16, 16)))
    two_of_three = scene(("triangle", "red", (0, 0, 16, 16)), ("triangle", "red", (40, 40, 56, 56)))
    metas = [meta, S.colors("red", "circle"), S.counting("triangle", 3)]
    images = np.stack([S.render(s) for s in (wrong_side, red_as_blue, two_of_three)])
    scores, _ = split_scores(images, metas)
    expect = {"presence": [1 / 2 + 1 / 4, 1 / 2, 0], "count": [0, 0, 2 / 3], "color": [0, 0, 0],
              "position": [0, 0, 0]}
    for p, values in expect.items():
        assert scores[f"shapes-{p}"].tolist() == pytest.approx(values), p
    assert scores["shapes"].tolist() == pytest.approx([0.75, 0.5, 2 / 3])
    # colour x5 moves only the colour part: a right colour on a found circle
    right = np.stack([S.render(scene(("circle", "red", (0, 0, 16, 16))))])
    scores, weighted = split_scores(right, [S.colors("red", "circle")], {"shapes-color": 5.0})
    assert scores["shapes-color"].item() == pytest.approx(0.5) and weighted.item() == pytest.approx(0.5 + 5 * 0.5)
    # the four are listed beside `shapes`, one per part of the dense reward
    assert {RW.reward_class(f"shapes-{p}").part for p in RW.DENSE_PARTS} == set(RW.DENSE_PARTS)
    # the names work on the command line, with weights
    assert RW.parse_rewards("shapes-presence:1,shapes-count:5,shapes-color,shapes-position:1") == {
        "shapes-presence": 1.0, "shapes-count": 5.0, "shapes-color": 1.0, "shapes-position": 1.0}
    cfg = T.parse_args(["--rewards", "shapes-presence,shapes-count,shapes-color,shapes-position",
                        "--reward-combine", "group"])
    assert cfg.reward_combine == "group" and RW.parse_rewards(cfg.rewards).keys() == {
        f"shapes-{p}" for p in RW.DENSE_PARTS}


# ---- 2. diversity over what a prompt leaves open -----------------------------------------------------------------


def test_vendi_score_known_sets():
    same = [("top left", 2, "red")] * 5
    assert S.vendi_score(same) == pytest.approx(1.0)                    # all identical: the minimum, 1
    distinct = [("top left", 2, "red"), ("top", 3, "blue"), ("right", None, "green"), ("center", 4, "purple")]
    assert S.vendi_score(distinct) == pytest.approx(4.0)                # no shared attribute: the maximum, n
    # two pairs of identical scenes: K / n has eigenvalues 1/2, 1/2, 0, 0, so exp(log 2) = 2
    pairs = [("top", 2), ("top", 2), ("left", 3), ("left", 3)]
    assert S.vendi_score(pairs) == pytest.approx(2.0)
    # two scenes sharing one of two attributes, a third sharing none: K = [[1, .5, 0], [.5, 1, 0], [0, 0, 1]],
    # K / 3 has eigenvalues 1/2, 1/6, 1/3
    mixed = [("top", "red"), ("top", "blue"), ("left", "green")]
    lam = np.array([1 / 2, 1 / 6, 1 / 3])
    assert S.vendi_score(mixed) == pytest.approx(math.exp(-(lam * np.log(lam)).sum()))
    assert S.vendi_score(mixed) == pytest.approx(2.749, abs=1e-3)
    assert S.vendi_score([(), ()]) == 1.0                               # nothing left open: all alike


def test_open_descriptor_keeps_only_what_the_prompt_leaves_open():
    objs = [("circle", "red", "top left", 2), ("square", "blue", "bottom", 3), ("triangle", "green", "center", 2)]
    # "a red circle": place and size are open, its colour is not; the extra triangle is not asked for
    assert S.open_descriptor(objs, S.colors("red", "circle")) == ("top left", 2)
    # "a circle": the colour is open too
    assert S.open_descriptor(objs, S.single_object("circle")) == ("top left", 2, "red")
    # a clause takes its objects in reading order; an object not drawn has None for each open attribute
    three = [("circle", "red", "right", 2), ("circle", "blue", "top", 3)]
    assert S.open_descriptor(three, S.counting("circle", 3)) == ("top", 3, "blue", "right", 2, "red",
                                                                None, None, None)
    # plans name no size
    assert S.open_descriptor(S.planned_objects("red circle top left , blue square"), S.two_object("circle", "square"),
                             S.PLAN_ATTRIBUTES) == ("top left", "red", None, "blue")


def test_diversity_summary_of_rendered_groups():
    """Scene and plan diversity of groups of clean renders, through the detector: the minimum for identical
    images, the maximum for images that share nothing open, a hand-computed value between."""
    circle = S.single_object("circle")
    a = scene(("circle", "red", (0, 0, 16, 16)))            # top left, 2 cells, red
    b = scene(("circle", "blue", (40, 40, 64, 64)))         # bottom right, 3 cells, blue
    c = scene(("circle", "red", (48, 0, 64, 16)))           # top right, 2 cells, red: shares size and colour with a
    groups = [[a, a, a], [a, b], [a, a, b, b], [a, c]]
    recs, imgs = [], []
    for g in groups:
        imgs += [S.render(s) for s in g]
        recs += [{"metadata": circle, "plan": S.plan_of(s)} for s in g]
    imgs = np.stack(imgs)
    dets = S.detect_batch(imgs)
    # one group size at a time, the groups above being of different sizes
    def summary(first, n):
        return S.diversity_summary(recs[first:first + n], imgs[first:first + n], dets[first:first + n], n)
    assert summary(0, 3)["scene_diversity"]["overall"] == pytest.approx(1.0)
    assert summary(3, 2)["scene_diversity"]["overall"] == pytest.approx(2.0)
    assert summary(5, 4)["scene_diversity"]["overall"] == pytest.approx(2.0)
    # a and c share 2 of 3 attributes: K / 2 = [[1, 2/3], [2/3, 1]] / 2, eigenvalues 5/6 and 1/6
    lam = np.array([5 / 6, 1 / 6])
    s = summary(9, 2)
    assert s["scene_diversity"]["per_tag"] == {"single_object": pytest.approx(math.exp(-(lam * np.log(lam)).sum()))}
    # their plans differ in place only, of two attributes: eigenvalues 3/4 and 1/4
    lam = np.array([3 / 4, 1 / 4])
    assert s["plan_diversity"]["overall"] == pytest.approx(math.exp(-(lam * np.log(lam)).sum()))
    # without plans (the token level) there is no plan diversity
    assert "plan_diversity" not in S.diversity_summary([{**r, "plan": ""} for r in recs[:3]], imgs[:3], dets[:3], 3)


# ---- 3. prompt enrichment: the perfect external planner ----------------------------------------------------------


def test_perfect_planner_plans_satisfy_their_prompts():
    metas = S.all_prompts()
    for seed in range(3):
        plans = S.perfect_plans(metas, seed)
        failed = [(m["prompt"], p) for m, p in zip(metas, plans)
                  if not RW.geneval_score(S.plan_detections(p), m)["strict"]]
        assert not failed, failed[:5]
    # a random true scene each time: an open prompt gets different plans
    plans = S.perfect_plans([S.single_object("circle")] * 16, 0)
    assert len(set(plans)) > 4 and all("circle" in p for p in plans)


def test_enrich_writes_rows_that_compare_reads(tmp_path):
    """End to end on the shipped base with two prompts: both rows sample, are scored with the shapes reward and
    its diversity, and come back through compare."""
    items = [S.single_object("circle"), S.colors("blue", "square")]
    folders = S.enrich(S.BASE_DIR, items, str(tmp_path / "enrich"), n=2, seeds=(0,), log=lambda *a, **k: None)
    assert sorted(os.path.relpath(f, tmp_path) for f in folders) == ["enrich/own-plans/s0", "enrich/perfect-plans/s0"]
    summary = json.load(open(tmp_path / "enrich" / "perfect-plans" / "s0" / "eval" / "test_00000.json"))
    assert set(summary["geneval_shapes"]["per_tag"]) == {"single_object", "colors"}
    for key in ("scene_diversity", "plan_diversity"):
        assert all(1.0 <= v <= 2.0 + 1e-9 for v in summary[key]["per_tag"].values()), summary[key]
    table = S.compare([f"own plans={tmp_path}/enrich/own-plans/s*@base",
                       f"perfect plans={tmp_path}/enrich/perfect-plans/s*@base"])
    assert "| own plans | 1 |" in table and "| perfect plans | 1 |" in table


# ---- 4. SFT on true examples -------------------------------------------------------------------------------------


def tiny_base(folder, scenes=64):
    """A barely pretrained tiny shapes base whose frozen image path (embedding, aligner, head) has unit-scale
    weights, as conftest's random_base: with GPT-style 0.02 init the image logits would hardly move
    whatever the trainable decoder does, and SFT, like RL, trains the decoder only."""
    S.pretrain(folder, S.PretrainConfig(scenes=scenes, vq_steps=2, vq_batch=4, n_layer=1, n_embd=32, n_head=2,
                                        lm_steps=1, lm_batch=4, cell_steps=1), log=lambda *a, **k: None)
    m, tok = C.from_pretrained(folder), M.Tokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    unit_scale_image_path(m)
    C.save_pretrained(m, folder, tokenizer=tok)
    return folder


def test_sft_lowers_its_loss_and_saves_a_base_train_can_start_from(tmp_path):
    base = tiny_base(str(tmp_path / "base"))
    out = str(tmp_path / "sft")
    losses = S.sft(base, out, S.SFTConfig(scenes=64, steps=80, batch=16, lr=3e-3), log=lambda *a, **k: None)
    for k in ("text", "image"):
        assert np.mean(losses[k][-8:]) < 0.9 * np.mean(losses[k][:8]), (k, losses[k][:8], losses[k][-8:])
    # the base's layout, every file of it; the frozen image path unchanged, the language model trained
    assert set(os.listdir(base)) | {"sft.json"} == set(os.listdir(out)) and not os.path.exists(out + ".tmp")
    before, after = C.from_pretrained(base).state_dict(), C.from_pretrained(out).state_dict()
    for k in before:
        frozen = k.startswith(("gen_vision_model.", "gen_embed.", "gen_aligner.", "gen_head.", "gen_pos_embed."))
        assert torch.equal(before[k], after[k]) == frozen, k
    record = json.load(open(os.path.join(out, "sft.json")))
    assert record["config"]["steps"] == 80 and record["image_nll_last"] < record["image_nll_first"]
    # train.py takes it as its starting checkpoint (sampling as the shapes base samples)
    cfg = T.resolve_defaults(T.TrainConfig(ckpt=out, out=str(tmp_path / "run")))
    assert cfg.sampling.chat_format == "janus" and cfg.sampling.cfg_weight == 2.0
    setup = T.prepare(cfg, log=lambda *a: None)
    with setup["lock"]:  # released on leaving
        assert len(setup["train_items"]) == len(S.prompt_sets()[0])


def test_sft_runs_under_bf16_autocast(tmp_path):
    base = tiny_base(str(tmp_path / "base"), scenes=16)
    losses = S.sft(base, str(tmp_path / "sft"), S.SFTConfig(scenes=16, steps=3, batch=4, dtype="bfloat16"),
                   log=lambda *a, **k: None)
    assert all(np.isfinite(losses[k]).all() and len(losses[k]) for k in ("text", "image"))
    # the saved weights stay float32 master weights
    assert all(v.dtype == torch.float32 for v in C.from_pretrained(str(tmp_path / "sft")).state_dict().values())


# ---- 5. the experiments' tables ----------------------------------------------------------------------------------


def fake_run(folder, config, base, final, diversity=None, steps=10):
    """A finished run folder: config.json and eval/test_*.json with GenEval accuracies and diversity."""
    os.makedirs(folder / "eval")
    (folder / "config.json").write_text(json.dumps(config))
    for step, acc in ((0, base), (steps, final)):
        g = {"per_tag": acc, "overall": float(np.mean([v for t, v in acc.items() if t in S.GENEVAL_TAGS]))}
        summary = {"rewards": {}, "geneval_shapes": g}
        if diversity is not None:
            summary["scene_diversity"] = {"per_tag": diversity, "overall": 0.0}
        (folder / "eval" / f"test_{step:05d}.json").write_text(json.dumps(summary))


def test_compare_pools_seeds_per_named_row(tmp_path, capsys):
    acc = lambda x: {"single_object": x, "colors": x / 2}  # noqa: E731
    div = {"single_object": 4.0, "two_object": 6.0, "colors": 2.0, "position": 100.0}  # position is not averaged
    for seed, (b, f) in enumerate([(0.4, 0.6), (0.4, 0.8)]):
        fake_run(tmp_path / f"equal-s{seed}", {"seed": seed, "rewards": "x"}, acc(b), acc(f), div)
    fake_run(tmp_path / "color5-s0", {"seed": 0, "rewards": "y"}, acc(0.4), acc(0.78))
    table = S.compare([f"base={tmp_path}/equal-s*@base", f"equal={tmp_path}/equal-s*",
                       f"colour x5={tmp_path}/color5-s0"], spread=True)
    lines = table.splitlines()
    assert lines[0] == "| | runs | single_object | colors | GenEval overall | image diversity | plan diversity |"
    assert lines[2] == "| base | 2 | 0.400 ± 0.000 | 0.200 ± 0.000 | 0.300 ± 0.000 | 4.000 ± 0.000 | – |"
    sd = np.std([0.6, 0.8], ddof=1)
    assert lines[3] == f"| equal | 2 | 0.700 ± {sd:.3f} | 0.350 ± {sd / 2:.3f} | 0.525 ± {0.75 * sd:.3f} | 4.000 ± 0.000 | – |"
    assert lines[4] == "| colour x5 | 1 | 0.780 | 0.390 | 0.585 | – | – |"
    # against the first row (base): single_object 0.7 / 0.4 - 1 = 75%, colors likewise; colour x5 95%
    assert "- equal: 75.0%" in table and "- colour x5: 95.0%" in table and "average over the rows: 85.0%" in table
    # per tag: each of single_object, two_object and colors on its own (the mean above: (4 + 6 + 2) / 3 = 4)
    lines = S.compare([f"equal={tmp_path}/equal-s*"], per_tag=True).splitlines()
    assert lines[0].endswith("| image diversity, single_object | image diversity, two_object | image diversity, colors "
                             "| plan diversity, single_object | plan diversity, two_object | plan diversity, colors |")
    assert lines[2].endswith("| 4.000 ± 0.000 | 6.000 ± 0.000 | 2.000 ± 0.000 | – | – | – |")
    # the runs of one row must be seeds of one setting
    fake_run(tmp_path / "other-s1", {"seed": 1, "rewards": "z"}, acc(0.4), acc(0.5))
    with pytest.raises(ValueError, match="--rewards"):
        S.compare([f"mixed={tmp_path}/equal-s0,{tmp_path}/other-s1"])
    err = cli_error(S.main, ["compare", f"none={tmp_path}/nothing*"], capsys, "shapes.py")
    assert "matches no run folder" in err
    assert "NAME=RUN" in cli_error(S.main, ["compare", str(tmp_path / "equal-s0")], capsys, "shapes.py")


def test_experiment_commands_check_their_inputs_first(tmp_path, capsys):
    def error(argv):
        return cli_error(S.main, argv, capsys, "shapes.py")
    assert "does not exist" in error(["sft", "--base", str(tmp_path / "none"), "--out", "x"])
    assert "at least 1" in error(["sft", "--out", str(tmp_path / "x"), "--steps", "0"])
    assert "--n must be at least 2" in error(["enrich", "--out", str(tmp_path / "x"), "--n", "1"])
    assert not os.path.exists(tmp_path / "x")
