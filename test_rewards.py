"""Tests of rewards.py: every reward, the GenEval rules, T2I-R1's prompt file and rules, the ensemble.
"""

import json
import math
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

import reward_models as RM
import rewards as RW
import shapes as S
import train as T
from conftest import (T2I_R1_ROWS, _clip_sd, _det, _images, _planted_owlvit, _random_state, _reward_folders,
                      _tiny_cfg, _tiny_git_cfg, _write_git_folder, _write_hf_clip, cli_error, reference_transformers)


def _meta(n, prompt="a photo of a cat"):
    return [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": prompt} for _ in range(n)]


def test_every_reward_loads_and_scores(tmp_path):
    ckpt, head = _reward_folders(tmp_path)
    weights = {"clip": 1, "pickscore": 1, "hps": 1, "aesthetic": 0.5, "geneval": 1}
    ens = RW.RewardEnsemble(weights, ckpt, device="cpu", batch_size=3)
    imgs, meta = _images(5), _meta(5)
    scores, info = ens(imgs, meta)
    for name in weights:
        assert scores[name].shape == (5,) and scores[name].dtype == torch.float32, name
        assert torch.isfinite(scores[name]).all(), name
    # clip = max(100 cos, 0)
    cos = torch.tensor(info["clip"]["cos"])
    assert torch.allclose(scores["clip"], (100 * cos).clamp(min=0), atol=1e-4) and cos.abs().max() <= 1
    # pickscore (logit_scale = ln 100 in the file) = 100 cos; hps holds the same weights in OpenCLIP fp16 layout
    # and, for square images, its preprocessing equals CLIP's: hps = cos of pickscore
    assert torch.allclose(scores["pickscore"], 100 * torch.tensor(info["pickscore"]["cos"]), atol=1e-4)
    assert torch.allclose(scores["hps"], scores["pickscore"] / 100, atol=1e-5)
    # aesthetic = the head applied, by hand here, to the unit ViT-L/14 (clip folder) image embedding
    emb = ens.rewards["clip"].image_embeddings(imgs)
    x = emb
    for k in [0, 2, 4, 6, 7]:
        x = x @ head[f"layers.{k}.weight"].t() + head[f"layers.{k}.bias"]
    assert torch.allclose(scores["aesthetic"], x.squeeze(-1), atol=1e-4)
    assert ens.rewards["aesthetic"].clip is ens.rewards["clip"].clip  # ViT-L/14 loaded once
    assert set(info["geneval"]) >= {"strict", "dense", "detections"} and len(info["geneval"]["dense"]) == 5
    total = ens.combine(scores)
    assert torch.allclose(total, sum(w * scores[n] for n, w in weights.items()))


def test_missing_files_fail_at_construction(tmp_path):
    ckpt, _ = _reward_folders(tmp_path)
    os.remove(os.path.join(ckpt["hps"], "HPS_v2.1_compressed.pt"))
    with pytest.raises(FileNotFoundError) as e:
        RW.RewardEnsemble({"clip": 1, "hps": 1}, ckpt, device="cpu")
    msg = str(e.value)
    assert msg.startswith("hps:") and "HPS_v2.1_compressed.pt" in msg and ckpt["hps"] in msg
    assert "huggingface.co/xswu/HPSv2" in msg
    with pytest.raises(FileNotFoundError, match=r"aesthetic: needs the 'clip' checkpoint.*--reward-ckpt clip="):
        RW.RewardEnsemble({"aesthetic": 1}, {"aesthetic": ckpt["aesthetic"]}, device="cpu")
    os.remove(os.path.join(ckpt["geneval"], "merges.txt"))
    with pytest.raises(FileNotFoundError,
                       match=r"geneval: vocab.json \+ merges.txt or tokenizer.json not found.*owlvit"):
        RW.GenEvalReward(ckpt, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"pickscore: .*yuvalkirstain/PickScore_v1"):
        RW.PickScore({"pickscore": str(tmp_path / "nowhere")}, device="cpu")


def test_weight_file_path_and_bad_images(tmp_path):
    ckpt, _ = _reward_folders(tmp_path)
    ckpt["hps"] = os.path.join(ckpt["hps"], "HPS_v2.1_compressed.pt")  # a file path works as well as its folder
    hps = RW.HPS(ckpt, device="cpu")
    rgb = _images(2, size=48)
    base, _ = hps(rgb, _meta(2))
    gray = rgb[..., 0]
    s_gray, _ = hps(gray, _meta(2))
    s_gray1, _ = hps(gray[..., None], _meta(2))
    s_gray3, _ = hps(gray[..., None].expand(-1, -1, -1, 3).contiguous(), _meta(2))
    assert torch.allclose(s_gray, s_gray3) and torch.allclose(s_gray1, s_gray3)
    rgba = torch.cat([rgb, torch.zeros_like(rgb[..., :1])], -1)  # alpha 0 everywhere: dropped, not composited
    assert torch.allclose(hps(rgba, _meta(2))[0], base)
    assert torch.allclose(hps(rgb.numpy(), _meta(2))[0], base)
    pil = [Image.fromarray(np.full((30, 70, 3), 200, np.uint8)), Image.fromarray(np.zeros((90, 20), np.uint8))]
    assert hps(pil, _meta(2))[0].shape == (2,)
    with pytest.raises(ValueError, match="float32"):
        hps(rgb.float(), _meta(2))
    with pytest.raises(ValueError, match=r"shape \(48, 48\)"):
        hps(rgb[0, ..., 0], _meta(1))  # one grayscale image without the batch axis
    with pytest.raises(ValueError, match=r"images\[0\].*shape \(48, 48, 2\)"):
        hps(rgb[..., :2], _meta(2))
    with pytest.raises(ValueError, match="metadata: expected a list of 48"):
        hps(rgb[0], _meta(1))  # (48, 48, 3) reads as 48 grayscale images; the metadata count catches it
    with pytest.raises(ValueError, match="empty"):
        hps([], [])
    with pytest.raises(ValueError, match="metadata"):
        hps(rgb, _meta(1))
    with pytest.raises(ValueError, match="prompt"):
        hps(rgb, [{"tag": "x"}, {"tag": "y"}])


def test_nan_reward_raises_naming_it(tmp_path):
    c = _tiny_cfg()
    _write_hf_clip(tmp_path / "clip", c, _clip_sd(c))
    ens = RW.RewardEnsemble({"clip": 1}, {"clip": str(tmp_path / "clip")}, device="cpu")
    ens(_images(2), _meta(2))  # loads the model; a NaN in its file is refused at load (the test above)
    with torch.no_grad():
        ens.rewards["clip"].clip.visual_projection.weight[0, 0] = float("nan")  # a model that diverges later
    with pytest.raises(FloatingPointError, match="reward 'clip'"):
        ens(_images(2), _meta(2))
    with pytest.raises(FloatingPointError, match="reward 'hps'"):
        RW.combine_rewards({"hps": torch.tensor([1.0, float("inf")])}, {"hps": 1.0})


def test_detection_pipeline_nms_decides_the_count(tmp_path):
    # a box logit of +20 saturates every patch's box to the same (clamped) whole-image box, so two bright
    # patches give two identical boxes: NMS must merge them, and without NMS the count is 2
    _planted_owlvit(tmp_path / "owl", box_logits=[20.0, 20.0, 20.0, 20.0])
    c = _tiny_cfg()
    _write_hf_clip(tmp_path / "clip", c, _clip_sd(c))
    ckpt = {"geneval": str(tmp_path / "owl"), "clip": str(tmp_path / "clip")}
    img = np.zeros((1, 96, 96, 3), np.uint8)
    img[0, :32, :32] = img[0, 64:, 64:] = 255
    meta = [{"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}],
             "prompt": "a photo of two cups"}]
    with_nms = RW.GenEvalReward(ckpt, device="cpu")
    scores, info = with_nms(img, meta)
    assert len(info["detections"][0]) == 1 and scores.tolist() == [0.5]  # count credit 1 - |2 - 1| / 2
    without = RW.GenEvalReward(ckpt, device="cpu", config=RW.GenEvalConfig(nms_iou=1.01))
    scores, info = without(img, meta)
    assert len(info["detections"][0]) == 2 and scores.tolist() == [1.0] and info["strict"] == [True]
    boxes = [d["box"] for d in info["detections"][0]]
    assert boxes[0] == boxes[1] and np.allclose(boxes[0], (48, 48, 96, 96), atol=0.1)  # centre ~1, size ~1, clamped


def test_relative_position_thresholds():
    b = (0, 0, 10, 10)  # centre (5, 5), size 10 x 10
    assert RW.relative_position((20, 0, 30, 10), b) == {"right of"}
    assert RW.relative_position((-20, 0, -10, 10), b) == {"left of"}
    assert RW.relative_position((0, -20, 10, -10), b) == {"above"}  # y grows downward
    assert RW.relative_position((0, 20, 10, 30), b) == {"below"}
    # shrink = 0.1 * (10 + 10) = 2 per axis: an offset of 2 or less is no relation at all; beyond that the
    # shrunk offset is divided by the ORIGINAL length: (d - 2) / d > 0.5 needs d > 4
    assert RW.relative_position((2, 0, 12, 10), b) == set()
    assert RW.relative_position((3.99, 0, 13.99, 10), b) == set()
    assert RW.relative_position((4.01, 0, 14.01, 10), b) == {"right of"}
    assert RW.relative_position((0, -4.01, 10, 5.99), b) == {"above"}
    # diagonal: offset (10, 10) -> shrunk (8, 8) / |offset| 14.14 = 0.566 > 0.5 on both axes
    assert RW.relative_position((10, 10, 20, 20), b) == {"right of", "below"}
    # offset (10, 7): shrunk (8, 5) / 12.21 = (0.655, 0.410): right only
    assert RW.relative_position((10, 7, 20, 17), b) == {"right of"}
    # just around 0.5 on x with dy = 10: (dx - 2) / sqrt(dx^2 + 100) = 0.5 at dx = 8.6
    assert RW.relative_position((8.7, 10, 18.7, 20), b) == {"right of", "below"}
    assert RW.relative_position((8.5, 10, 18.5, 20), b) == {"below"}
    # big boxes shrink more: 0.1 * (40 + 10) = 5 swallows an offset of 4.9
    assert RW.relative_position((-10.1, -15, 29.9, 25), b) == set()


def test_geneval_counting_is_exact_with_exclude():
    meta = {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}],
            "prompt": "a photo of three dogs"}
    dogs = [_det("dog", (i * 20, 0, i * 20 + 10, 10), 0.9 - i * 0.1) for i in range(5)]
    r = [RW.geneval_score(dogs[:n] + [_det("cat", (0, 0, 5, 5))], meta) for n in range(6)]
    assert [x["strict"] for x in r] == [False, False, False, True, False, False]
    assert [round(x["dense"], 4) for x in r] == [0.0, round(1 / 3, 4), round(2 / 3, 4), 1.0, round(2 / 3, 4),
                                                 round(1 / 3, 4)]
    other = {"tag": "single_object", "include": [{"class": "cup", "count": 1}],
             "exclude": [{"class": "bird", "count": 1}], "prompt": "a cup"}
    assert RW.geneval_score([_det("cup", (0, 0, 1, 1))], other) == {"strict": True, "dense": 1.0, "reasons": []}
    bad = RW.geneval_score([_det("cup", (0, 0, 1, 1)), _det("bird", (0, 0, 1, 1))], other)
    assert not bad["strict"] and bad["dense"] == 0.5  # cup clause 1, bird exclude clause 0


def test_geneval_colors_and_partial_credit():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 2, "color": "red"},
                                             {"class": "bench", "count": 1, "color": "blue"}], "prompt": "..."}
    cars = [_det("car", (0, 0, 9, 9), 0.9, "red"), _det("car", (20, 0, 29, 9), 0.8, "green"),
            _det("car", (40, 0, 49, 9), 0.3, "red")]  # the third red car is not among the 2 most confident
    bench = [_det("bench", (0, 20, 9, 29), 0.9, "blue")]
    r = RW.geneval_score(cars + bench, meta)
    assert not r["strict"]
    # car: count 1 - |2 - 3| / 2 = 0.5, colour 1/2 -> 0.5; bench: 1 -> dense 0.75
    assert r["dense"] == pytest.approx(0.75)
    cars[1]["color"] = "red"
    r = RW.geneval_score(cars[:2] + bench, meta)
    assert r["strict"] and r["dense"] == 1.0


def test_geneval_position_rules():
    meta = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                           {"class": "cat", "count": 1, "position": ["left of", 0]}], "prompt": "..."}
    dog = _det("dog", (50, 0, 60, 10))
    assert RW.geneval_score([dog, _det("cat", (0, 0, 10, 10))], meta)["strict"]
    wrong = RW.geneval_score([dog, _det("cat", (100, 0, 110, 10))], meta)
    assert not wrong["strict"] and wrong["dense"] == pytest.approx(0.75)  # cat: count 1, position 0
    missing_ref = RW.geneval_score([_det("cat", (0, 0, 10, 10))], meta)
    assert not missing_ref["strict"] and missing_ref["dense"] == pytest.approx(0.25)  # dog 0; cat (1 + 0) / 2
    # count 2: both cats must be left of the dog; one is, so strict fails and position credit is 1/2
    meta2 = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                            {"class": "cat", "count": 2, "position": ["left of", 0]}], "prompt": ""}
    cats = [_det("cat", (0, 0, 10, 10), 0.9), _det("cat", (100, 0, 110, 10), 0.8)]
    r = RW.geneval_score([dog] + cats, meta2)
    assert not r["strict"] and r["dense"] == pytest.approx((1 + (1 + 0.5) / 2) / 2)


def test_geneval_include_means_at_least_and_positions_are_checked_against_every_pair():
    # an include clause asks for at least `count` (GenEval): two circles still show "a photo of a circle"
    one = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
    assert RW.geneval_score([_det("circle", (0, 0, 10, 10)), _det("circle", (30, 0, 40, 10), 0.8)], one)["strict"]
    # position credit is over every (clause object, reference object) pair: two cats, two dogs, one cat left of
    # both dogs and the other right of both: 2 of 4 pairs
    meta = {"tag": "position", "include": [{"class": "dog", "count": 2},
                                           {"class": "cat", "count": 2, "position": ["left of", 0]}], "prompt": ""}
    dogs = [_det("dog", (50, 0, 60, 10)), _det("dog", (200, 0, 210, 10), 0.8)]
    cats = [_det("cat", (0, 0, 10, 10)), _det("cat", (300, 0, 310, 10), 0.8)]
    r = RW.geneval_score(dogs + cats, meta)
    assert not r["strict"] and r["dense"] == pytest.approx((1 + (1 + 2 / 4) / 2) / 2)
    # a clause placed relative to itself has nothing matched to compare with: refused at validation
    with pytest.raises(ValueError, match=r"include\[1\]: 'position' must be"):
        RW.check_geneval_metadata({**meta, "include": [meta["include"][0], {**meta["include"][1],
                                                                             "position": ["left of", 1]}]})


def test_geneval_summary():
    recs = [("counting", True), ("counting", False), {"tag": "colors", "strict": True}, ("position", False)]
    s = RW.geneval_summary(recs)
    assert s["per_tag"] == {"counting": 0.5, "colors": 1.0, "position": 0.0}
    assert s["overall"] == pytest.approx(0.5) and s["count"]["counting"] == 2
    # a tag outside GenEval's six (the shapes world's reasoning) is reported beside the overall score, not in it
    s = RW.geneval_summary(recs + [("reasoning", True), ("reasoning", True)])
    assert s["per_tag"]["reasoning"] == 1.0 and s["overall"] == pytest.approx(0.5)
    assert RW.geneval_summary([("reasoning", True), ("reasoning", False)])["overall"] == 0.5


class _ColorStubCLIP:
    """A stand-in CLIP with known behaviour: image embedding = mean RGB of the crop - 0.5, text embedding =
    the RGB of the colour named in the prompt - 0.5, so the right answer is the crop's own colour."""
    RGB = {"red": (1, 0, 0), "orange": (1, .5, 0), "yellow": (1, 1, 0), "green": (0, .5, 0), "blue": (0, 0, 1),
           "purple": (.5, 0, .5), "pink": (1, .75, .8), "brown": (.6, .3, 0), "black": (0, 0, 0), "white": (1, 1, 1)}
    config = types.SimpleNamespace(image_size=16)

    def __init__(self):
        self.prompts = []

    def tokenizer(self, texts):
        self.prompts += list(texts)
        found = [next(i for i, c in enumerate(RW.GENEVAL_COLORS) if f" {c} " in t or f" {c}-" in t) for t in texts]
        return torch.tensor(found)[:, None]

    def encode_text(self, ids):
        return torch.tensor([self.RGB[RW.GENEVAL_COLORS[i]] for i in ids[:, 0].tolist()]) - 0.5

    def encode_image(self, pixels):
        rgb = pixels * torch.tensor(RM.CLIP_STD).view(1, 3, 1, 1) + torch.tensor(RM.CLIP_MEAN).view(1, 3, 1, 1)
        return rgb.mean((2, 3)) - 0.5


def test_geneval_color_step_on_crops(tmp_path):
    img = np.full((60, 150, 3), 128, np.uint8)  # grey background, three coloured blocks left to right
    img[:, 0:50] = (255, 0, 0)
    img[:, 50:100] = (0, 0, 255)
    img[10:50, 100:150] = (255, 255, 255)
    stub = _ColorStubCLIP()
    boxes = [(105, 12, 145, 48), (2, 2, 48, 58), (55, 5, 95, 55), (100, 10, 150, 50)]
    assert RW.classify_colors(stub, stub.tokenizer, img, boxes, "car") == ["white", "red", "blue", "white"]
    assert "a photo of a red car" in stub.prompts and "a photo of a red-colored car" in stub.prompts
    assert "a photo of a red object" in stub.prompts
    # through the reward: only the `count` most confident cars are coloured, and the rules see the colours
    ckpt, _ = _reward_folders(tmp_path)
    reward = RW.GenEvalReward(ckpt, device="cpu")
    reward._ensure_loaded()
    reward.clip, reward.tok = stub, stub.tokenizer
    dets = [_det("car", (105, 12, 145, 48), 0.9), _det("car", (2, 2, 48, 58), 0.8), _det("car", (55, 5, 95, 55), 0.2)]
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 2, "color": "white"}],
            "prompt": "two white cars"}
    reward.add_colors(img, dets, meta)
    assert [d["color"] for d in dets] == ["white", "red", None]
    r = RW.geneval_score(dets, meta)
    assert not r["strict"] and r["dense"] == pytest.approx((1 - 1 / 2 + 1 / 2) / 2)


def test_rule_rewards_refuse_classes_colours_and_tags_they_cannot_recognise(tmp_path, capsys):
    """A misspelt class, an unknown colour or tag could never be found: its prompt scored 0 forever."""
    reward = S.ShapesReward()
    good = {"prompt": "a photo of a red circle", "tag": "colors", "include": [{"class": "circle", "count": 1,
                                                                              "color": "red"}]}
    reward.check_metadata([good])
    for bad, msg in [({"class": "cirlce"}, "include\\[0\\]: class 'cirlce' is not one it detects \\(circle, square, triangle\\)"),
                     ({"color": "cyan"}, "include\\[0\\]: color 'cyan' is not one it tells apart"),
                     ({"color": "pink"}, "color 'pink'")]:  # a GenEval colour, but not one of this world's
        m = {**good, "include": [{**good["include"][0], **bad}]}
        with pytest.raises(ValueError, match="shapes: prompt 0 .*" + msg):
            reward.check_metadata([m])
    with pytest.raises(ValueError, match="tag 'colours' is not one of"):
        reward.check_metadata([{**good, "tag": "colours"}])
    assert RW.GenEvalReward.classes is None and "pink" in RW.GenEvalReward.colors  # OWL-ViT: any class name
    (tmp_path / "p.jsonl").write_text(json.dumps({**good, "include": [{"class": "cirlce", "count": 1}]}) + "\n")
    err = cli_error(T.main, ["--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "run")], capsys, "train.py")
    assert "class 'cirlce'" in err and not (tmp_path / "run").exists()


def test_reward_args_parsing():
    assert RW.parse_rewards("hps:1,geneval, aesthetic:0.5") == {"hps": 1.0, "geneval": 1.0, "aesthetic": 0.5}
    assert RW.parse_reward_ckpt(["hps=/a/b", "clip=~/c"]) == {"hps": "/a/b", "clip": os.path.expanduser("~/c")}
    assert RW.parse_reward_ckpt("hps=/a,clip=/b") == {"hps": "/a", "clip": "/b"}
    assert T.parse_args([]).reward_combine == "sum"
    for bad, match in [("hps:x", "not a number"), ("nope:1", "unknown reward"), ("hps,hps", "twice"), ("", "no reward"),
                       ("hps:nan", "finite")]:
        with pytest.raises(ValueError, match=match):
            RW.parse_rewards(bad)
    with pytest.raises(ValueError, match="NAME=PATH"):
        RW.parse_reward_ckpt(["hps"])
    with pytest.raises(ValueError, match="unknown checkpoint"):
        RW.parse_reward_ckpt(["foo=/x"])


def test_diversity():
    e = torch.eye(3)
    assert RW.diversity([e]) == pytest.approx(1.0)  # orthogonal: distance 1
    assert RW.diversity([torch.ones(4, 3)]) == pytest.approx(0.0, abs=1e-6)  # identical
    assert RW.diversity(torch.stack([torch.tensor([[1.0, 0], [-1.0, 0]]), torch.ones(2, 2)])) == pytest.approx(1.0)
    assert RW.diversity([e, e[:1]]) == pytest.approx(1.0)  # a prompt with one image is skipped
    with pytest.raises(ValueError):
        RW.diversity([e[:1]])


def test_shapes_t2i_r1_prompts_convert_to_geneval():
    lines = [
        '{"prompt": "a photo of a car below a zebra", "nouns": ["car", "zebra"], "spatial_info": {"obj1": "car", '
        '"obj2": "zebra", "locality": "below"}, "task_type": "spatial"}',
        '{"task_type": "spatial", "prompt": "a bowl on the left of a man", "nouns": ["bowl", "man"], '
        '"spatial_info": {"obj1": "bowl", "obj2": "man", "locality": "on the left of"}}',
        '{"task_type": "complex", "prompt": "The black mug was on top of the white coaster.", '
        '"nouns": ["mug", "coaster"], "spatial_info": {"obj1": "mug", "obj2": "coaster", "locality": "on top of"}}',
        '{"task_type": "spatial", "prompt": "a mouse next to a backpack", "nouns": ["mouse", "backpack"], '
        '"spatial_info": {"obj1": "mouse", "obj2": "backpack", "locality": "next to"}}',
        '{"task_type": "numeracy", "prompt": "two plates and three microphones", "nouns": ["plate", "microphone"], '
        '"numeracy_info": [{"obj_name": "plate", "num": 2}, {"obj_name": "microphone", "num": 3}]}',
        '{"task_type": "color", "prompt": "a green duck and a yellow frog", "nouns": ["duck", "frog"], '
        '"attr_nouns": ["green duck", "yellow frog"]}',
        '{"task_type": "color", "prompt": "A red bathroom has a white towel on the bar.", '
        '"nouns": ["bathroom", "towel", "bar"], "attr_nouns": ["red towel"]}',
        '{"task_type": "color", "prompt": "a gold clock and a red train", "nouns": ["clock", "train"], '
        '"attr_nouns": ["gold clock", "red train"]}',
        '{"task_type": "color", "prompt": "A room with white walls.", "nouns": ["room", "wall"], '
        '"attr_nouns": ["white wall"]}',
        '{"prompt": "a photo of a bottle and a teddy bear", "nouns": ["bottle", "teddy bear"], "task_type": "object"}',
        '{"task_type": "texture", "prompt": "a wooden desk and a leather shoes", "nouns": ["desk", "shoe"], '
        '"attr_nouns": ["wooden desk", "leather shoe"]}',
        '{"task_type": "non", "prompt": "A child is jumping on a trampoline.", "nouns": ["child", "trampoline"]}',
    ]
    got = [RW.from_t2i_r1(json.loads(line)) for line in lines]
    assert got[0] == {"tag": "position", "include": [{"class": "zebra", "count": 1},
                                                     {"class": "car", "count": 1, "position": ["below", 0]}],
                      "prompt": "a photo of a car below a zebra"}
    assert got[1]["include"][1] == {"class": "bowl", "count": 1, "position": ["left of", 0]}
    assert got[2]["include"] == [{"class": "coaster", "count": 1},
                                 {"class": "mug", "count": 1, "position": ["above", 0]}]
    assert got[3] is None  # "next to" has no GenEval relation
    assert got[4] == {"tag": "counting",
                      "include": [{"class": "plate", "count": 2}, {"class": "microphone", "count": 3}],
                      "exclude": [{"class": "plate", "count": 3}, {"class": "microphone", "count": 4}],
                      "prompt": "two plates and three microphones"}
    assert got[5] == {"tag": "color_attr", "include": [{"class": "duck", "count": 1, "color": "green"},
                                                       {"class": "frog", "count": 1, "color": "yellow"}],
                      "prompt": "a green duck and a yellow frog"}
    assert got[6] is None  # attr_nouns contradict the prompt
    assert got[7] is None  # gold is not a GenEval colour
    assert got[8] == {"tag": "colors", "include": [{"class": "wall", "count": 1, "color": "white"}],
                      "prompt": "A room with white walls."}
    assert got[9]["tag"] == "two_object" and got[9]["include"][1] == {"class": "teddy bear", "count": 1}
    assert got[10] is None and got[11] is None


def test_git_questions_follow_t2i_r1():
    rows = [{"task_type": "color", "prompt": "a purple elephant and a blue teddy bear",
             "nouns": ["elephant", "teddy bear"], "attr_nouns": ["purple elephant", "blue teddy bear"]},
            {"task_type": "complex", "prompt": "The rectangular mirror was hung above the marble sink.",
             "nouns": ["mirror", "sink"]},
            {"task_type": "spatial", "prompt": "a car below a zebra", "nouns": ["car", "zebra"],
             "spatial_info": {"obj1": "car", "obj2": "zebra", "locality": "below"}},
            {"task_type": "numeracy", "prompt": "two plates", "nouns": ["plate"],
             "numeracy_info": [{"obj_name": "plate", "num": 2}]},
            {"task_type": "non", "prompt": "A quiet street.", "nouns": []},
            {"task_type": "shape", "prompt": "an oval mirror", "nouns": ["mirror"], "attr_nouns": []},
            {"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]}]
    assert [RW.git_questions(r) for r in rows] == [
        (["purple elephant?", "blue teddy bear?"], None), (["mirror?", "sink?"], None), ([], 0.0), ([], 0.0),
        ([], 1.0), (["mirror?"], None), ([], 0.0)]


def _planted_git(folder, yes_logit, no_logit):
    """A tiny GIT whose output layer ignores the hidden state for 'yes' and 'no': their logits are biases."""
    c = _tiny_git_cfg()
    sd = _random_state(RM.GIT(c), seed=3)
    sd["output.weight"][[5, 6]] = 0.0
    sd["output.bias"][5], sd["output.bias"][6] = yes_logit, no_logit
    return _write_git_folder(folder, c, sd)


def test_git_reward_is_yes_over_yes_plus_no_as_t2i_r1_computes_it_with_transformers(tmp_path):
    # a known answer: p(yes) / (p(yes) + p(no)) = 3 / (3 + 1) when the logits differ by ln 3, whatever the rest
    folder = _planted_git(tmp_path / "planted", math.log(3.0), 0.0)
    rows = [dict(r) for r in T2I_R1_ROWS]
    scores, info = RW.GitVQA({"git": folder}, device="cpu")(_images(len(rows), 40), rows)
    asked = [bool(RW.git_questions(r)[0]) for r in rows]  # spatial and numeracy are not asked
    assert asked == [False, False, True, True, True, True] and info["checked"] == asked
    assert torch.allclose(scores, torch.tensor([0.0, 0.0, 0.75, 0.75, 0.75, 0.75]), atol=1e-6)
    assert info["questions"][2] == ["wooden desk?", "leather shoe?"] and len(info["yes"][2]) == 2
    # against T2I-R1's own procedure, one question at a time on transformers' GitForCausalLM: [CLS] + question,
    # softmax over the vocabulary at the last position, p(yes) / (p(yes) + p(no)), mean over the questions
    transformers = reference_transformers()
    folder = _write_git_folder(tmp_path / "random", _tiny_git_cfg(), seed=7)
    ref = transformers.GitForCausalLM.from_pretrained(folder).eval()
    reward = RW.GitVQA({"git": folder}, device="cpu")
    images = _images(len(rows), 40)
    scores, info = reward(images, rows)
    tok = RM.WordPieceTokenizer(folder)
    for i, r in enumerate(rows):
        qs = RW.git_questions(r)[0]
        if not qs:
            continue
        px = RM.clip_preprocess(images[i:i + 1], 32)
        ps = []
        for q in qs:
            with torch.no_grad():
                p = ref(input_ids=torch.tensor([[2] + tok.encode(q)]), pixel_values=px).logits[0, -1].softmax(-1)
            ps.append((p[5] / (p[5] + p[6])).item())
        err = abs(scores[i].item() - sum(ps) / len(ps))
        print(f"\ngit score vs T2I-R1's procedure on GitForCausalLM ({r['prompt']!r}): abs err {err:.2e}")
        assert err <= 1e-5, r["prompt"]
    # bf16 (the GPU precision policy) stays close
    bf16 = RW.GitVQA({"git": folder}, device="cpu", dtype=torch.bfloat16)(images, rows)[0]
    assert (bf16 - scores).abs().max() < 0.05


def test_t2i_r1_position_rule_on_hand_boxes():
    left, right = (0.0, 0.4, 0.2, 0.6), (0.8, 0.4, 1.0, 0.6)  # same height, far apart
    top, bottom = (0.4, 0.0, 0.6, 0.2), (0.4, 0.8, 0.6, 1.0)
    pos = RW.t2i_r1_position
    assert pos("left of", left, right) == 1 and pos("on the left of", left, right) == 1
    assert pos("right of", left, right) == 0 and pos("right of", right, left) == 1
    assert pos("below", bottom, top) == 1 and pos("on the bottom of", top, bottom) == 0
    assert pos("on the top of", top, bottom) == 1 and pos("top of", bottom, top) == 0
    # "above" and "on top of" have no branch in T2I-R1's code: 0 as released, the "on the top of" rule here
    for rel in ("above", "on top of"):
        assert pos(rel, top, bottom) == 1 and pos(rel, top, bottom, as_released=True) == 0
        assert pos(rel, bottom, top) == 0
    # the other axis dominates: no credit
    assert pos("left of", (0.0, 0.0, 0.2, 0.2), (0.1, 0.8, 0.3, 1.0)) == 0
    # overlapping boxes: 0.1 / IoU; here IoU = (0.1 * 0.2) / (2 * 0.04 - 0.02) = 1/3
    assert pos("left of", (0.0, 0.4, 0.2, 0.6), (0.1, 0.4, 0.3, 0.6)) == pytest.approx(0.3)
    # near: 1 when either offset is under 150/512 of the side, else that threshold over the larger offset;
    # T2I-R1 compares normalised boxes with 150 (pixels), so every pair is near as released
    assert pos("next to", left, right) == 1  # same row: dy = 0
    far = (0.8, 0.8, 1.0, 1.0)
    assert pos("near", (0.0, 0.0, 0.2, 0.2), far) == pytest.approx((150 / 512) / 0.8)
    assert pos("on side of", (0.0, 0.0, 0.2, 0.2), far, as_released=True) == 1
    assert pos("inside", left, right) == 0


def test_t2i_r1_detect_rules_on_hand_boxes():
    box = lambda x0, y0=0.4: (x0, y0, x0 + 0.2, y0 + 0.2)
    det = lambda cls, b, s=0.5: {"class": cls, "box": b, "score": s}
    score = lambda dets, row, **kw: RW.t2i_r1_detect_score(dets, row, **kw)[0]
    obj = {"task_type": "object", "prompt": "a bottle and a teddy bear", "nouns": ["bottle", "teddy bear"]}
    assert score([det("bottle", box(0))], obj) == 0.5 and score([], obj) == 0
    assert score([det("bottle", box(0)), det("teddy bear", box(0.5))], obj) == 1
    num = {"task_type": "numeracy", "prompt": "two plates and three cups", "nouns": ["plate", "cup"],
           "numeracy_info": [{"obj_name": "plate", "num": 2}, {"obj_name": "cup", "num": 3}]}
    plates = [det("plate", box(0)), det("plate", box(0.5))]
    assert score(plates, num) == 0.5  # plates exact (1), cups absent (0)
    assert score(plates + [det("cup", box(0.1, 0))], num) == pytest.approx(0.6)  # cups present, wrong count: 0.2
    assert score(plates + [det("cup", box(x, 0)) for x in (0, 0.3, 0.6)], num) == 1
    assert score(plates[:1], num) == pytest.approx(0.1)
    sp = {"task_type": "spatial", "prompt": "a car left of a zebra", "nouns": ["car", "zebra"],
          "spatial_info": {"obj1": "car", "obj2": "zebra", "locality": "left of"}}
    assert score([], sp) == 0 and score([det("car", box(0))], sp) == pytest.approx(0.2)
    assert score([det("car", box(0)), det("zebra", box(0.7))], sp) == pytest.approx(0.9)  # 0.4 + 1 / 2
    assert score([det("car", box(0.7)), det("zebra", box(0))], sp) == pytest.approx(0.4)
    # the most confident box of each object decides the position
    dets = [det("car", box(0.7), 0.9), det("car", box(0), 0.2), det("zebra", box(0.4))]
    assert score(dets, sp) == pytest.approx(0.4)
    above = {**sp, "spatial_info": {"obj1": "car", "obj2": "zebra", "locality": "above"}}
    stacked = [det("car", box(0.4, 0)), det("zebra", box(0.4, 0.7))]
    assert score(stacked, above) == pytest.approx(0.9)
    assert score(stacked, above, as_released=True) == pytest.approx(0.4)
    # one object named twice: the two most confident boxes of it; T2I-R1's code fails there and scores 0
    twice = {**sp, "nouns": ["car", "car"], "spatial_info": {"obj1": "car", "obj2": "car", "locality": "left of"}}
    pair = [det("car", box(0), 0.9), det("car", box(0.7), 0.8)]
    assert score(pair, twice) == pytest.approx(0.9) and score(pair, twice, as_released=True) == 0
    # a complex row with spatial_info is scored by object presence, as T2I-R1 does; no nouns: 1
    cx = {**sp, "task_type": "complex"}
    assert score([det("car", box(0.7)), det("zebra", box(0))], cx) == 1
    assert score([], {"task_type": "non", "prompt": "A quiet street.", "nouns": []}) == 1


def test_t2i_r1_detect_as_released_keeps_its_nms_on_centre_size_boxes_and_its_phrase_match():
    # reward_gdino.py hands GroundingDINO's (cx, cy, w, h) boxes to torchvision's nms, which reads them as
    # corners: two copies of one small cup survive it (they count as two cups), a large box near the top-left
    # corner still suppresses its copy
    cups = torch.tensor([[0.6, 0.6, 0.8, 0.8], [0.61, 0.6, 0.81, 0.8]])  # (x0, y0, x1, y1), IoU 0.9
    big = torch.tensor([[0.0, 0.0, 0.9, 0.9], [0.0, 0.0, 0.88, 0.9]])
    scores = torch.tensor([0.9, 0.8])
    assert RW.t2i_r1_nms(cups, scores, 0.5).tolist() == [0]
    assert RW.t2i_r1_nms(cups, scores, 0.5, as_released=True).tolist() == [0, 1]
    assert RW.t2i_r1_nms(big, scores, 0.5, as_released=True).tolist() == [0]
    # its detection phrase for a noun is the noun's first and last word, so a noun of three or more words
    # ("roll of paper towel", four rows of the file) is never matched as released
    row = {"task_type": "shape", "prompt": "a tissue box and a roll of paper towel",
           "nouns": ["tissue box", "roll of paper towel"]}
    dets = [{"class": n, "box": (0.1, 0.1, 0.3, 0.3), "score": 0.5} for n in row["nouns"]]
    assert RW.t2i_r1_detect_score(dets, row)[0] == 1
    assert RW.t2i_r1_detect_score(dets, row, as_released=True)[0] == 0.5


def test_t2i_r1_detect_reward_counts_duplicate_boxes_as_released(tmp_path):
    # two bright patches whose boxes the planted box head puts on one spot, a third of the side wide, at the
    # bottom-right corner: one cup after NMS on boxes, two after NMS on (cx, cy, w, h) read as corners
    _planted_owlvit(tmp_path / "owl", box_logits=[10.0, 10.0, 0.0, 0.0])
    img = np.zeros((1, 96, 96, 3), np.uint8)
    img[0, 32:64, 32:96] = 255
    rows = [{"task_type": "numeracy", "prompt": "one cup", "nouns": ["cup"],
             "numeracy_info": [{"obj_name": "cup", "num": 1}]}]
    for as_released, want in ((False, 1.0), (True, 0.2)):
        cfg = RW.T2IR1DetectConfig(as_released=as_released)
        scores, info = RW.T2IR1Detect({"geneval": str(tmp_path / "owl")}, device="cpu", config=cfg)(img, rows)
        assert scores.tolist() == pytest.approx([want]), info["reasons"]


def test_t2i_r1_detect_reward_scores_a_row_without_nouns_with_t2i_r1s_constant(tmp_path):
    _planted_owlvit(tmp_path / "owl")
    reward = RW.T2IR1Detect({"geneval": str(tmp_path / "owl")}, device="cpu")
    rows = [{"task_type": "non", "prompt": "A quiet street.", "nouns": []}, {"prompt": "a cat"}]
    scores, info = reward(np.zeros((2, 96, 96, 3), np.uint8), rows)
    assert scores.tolist() == [1.0, 0.0] and info["checked"] == [False, False]
    assert info["reasons"][0].startswith("no nouns") and info["reasons"][1] == "no T2I-R1 fields"


def test_t2i_r1_detect_reward_on_planted_owlvit(tmp_path):
    # the planted detector finds every queried object on the bright patch (row 1, column 2), none elsewhere
    _planted_owlvit(tmp_path / "owl")
    reward = RW.T2IR1Detect({"geneval": str(tmp_path / "owl")}, device="cpu")
    img = np.zeros((2, 96, 96, 3), np.uint8)
    img[0, 32:64, 64:96] = 255
    rows = [{"task_type": "numeracy", "prompt": "one cup", "nouns": ["cup"],
             "numeracy_info": [{"obj_name": "cup", "num": 1}]},
            {"task_type": "numeracy", "prompt": "two cups", "nouns": ["cup"],
             "numeracy_info": [{"obj_name": "cup", "num": 2}]}]
    scores, info = reward(np.stack([img[0], img[0], img[1]]), rows + [rows[0]])
    assert scores.tolist() == pytest.approx([1.0, 0.2, 0.0])
    d = info["detections"][0]
    assert len(d) == 1 and d[0]["class"] == "cup" and np.allclose(d[0]["box"], (2 / 3, 1 / 3, 1, 2 / 3), atol=1e-3)
    rows = [dict(r) for r in T2I_R1_ROWS]
    scores, info = reward(np.repeat(img[:1], len(rows), 0), rows)
    # spatial: both found on the same box, so no position credit; objects all found; every row checked
    assert scores.tolist() == pytest.approx([0.4, 0.2, 1.0, 1.0, 1.0, 1.0]) and all(info["checked"])
    # the preset, and how many prompts each reward scores
    assert RW.parse_rewards("t2i-r1") == {"hps": 1.0, "t2i-r1-detect": 1.0, "git": 1.0}
    assert RW.parse_rewards("t2i-r1,aesthetic:0.5")["aesthetic"] == 0.5
    with pytest.raises(ValueError, match="the preset 't2i-r1' takes no weight"):
        RW.parse_rewards("t2i-r1:2")
    ens = RW.RewardEnsemble({"t2i-r1-detect": 1, "git": 1}, {"geneval": str(tmp_path / "owl"),
                                                             "git": _planted_git(tmp_path / "git", 0.0, 0.0)})
    bare = [{"prompt": "a cat"}, {"task_type": "non", "prompt": "A quiet street.", "nouns": []}]
    report = ens.unchecked_report(rows + bare, "training prompts")
    assert report == [
        "t2i-r1-detect: scores 6 of the 8 training prompts; the other 2 (T2I-R1 task types: non 1) get T2I-R1's "
        "constant (0 without its fields), the same for every sample, so the other rewards alone set their "
        "advantages (and its logged means leave them out)",
        "git: scores 4 of the 8 training prompts; the other 4 (T2I-R1 task types: non 1, numeracy 1, spatial 1) get "
        "T2I-R1's constant (0 without its fields), the same for every sample, so the other rewards alone set their "
        "advantages (and its logged means leave them out)"]
    assert RW.RewardEnsemble({"t2i-r1-detect": 1}, {"geneval": str(tmp_path / "owl")}).unchecked_report(rows) == []
    with pytest.raises(ValueError, match=r"t2i-r1-detect: prompt 1 .*'numeracy_info' must be"):
        ens.check_metadata([rows[0], {**rows[1], "numeracy_info": [{"obj_name": "cup", "num": "two"}]}])
