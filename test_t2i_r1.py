"""Tests for t2i-r1. CPU only, tiny random models, seconds each; GPU and reference checks skip cleanly.

Run: python -m pytest -q test_t2i_r1.py
"""

# ---- shapes world ----
# The synthetic world of shapes.py: renderer, GenEval prompts and split, plans, detector, T2I-R1 conversion.

import io
import json

import numpy as np
import pytest
from PIL import Image

import shapes as S


def _relations(a, b):
    """GenEval's position arithmetic for box a relative to box b -> ({relations}, dx, dy). Test-only: the rule
    engine proper lives in rewards.py."""
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    dims = np.array([a[2] - a[0] + b[2] - b[0], a[3] - a[1] + b[3] - b[1]], dtype=float)
    offset = ca - cb
    shrunk = np.maximum(np.abs(offset) - 0.1 * dims, 0) * np.sign(offset)
    dx, dy = shrunk / np.linalg.norm(offset)
    tests = (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5), ("below", dy > 0.5))
    rel = {r for r, hit in tests if hit}
    return rel, dx, dy


def _strict_pass(dets, meta):
    """GenEval's strict rule on a list of detections (test-only checker)."""
    chosen = []
    for clause in meta["include"]:
        found = [d for d in dets if d["class"] == clause["class"]][:clause["count"]]
        if len(found) < clause["count"]:
            return False
        if "color" in clause and any(d["color"] != clause["color"] for d in found):
            return False
        if "position" in clause:
            relation, j = clause["position"]
            if not any(relation in _relations(d["box"], t["box"])[0] for d in found for t in chosen[j]):
                return False
        chosen.append(found)
    return all(sum(d["class"] == c["class"] for d in dets) < c["count"] for c in meta.get("exclude", []))


def _same_objects(scene, dets):
    return sorted((o.shape, o.color, tuple(o.box)) for o in scene.objects) == \
        sorted((d["class"], d["color"], d["box"]) for d in dets)


def _iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _found_all(scene, dets, min_iou=0.5):
    """Every object found once with its class and colour, box IoU >= min_iou, and nothing else."""
    left = list(dets)
    for o in scene.objects:
        match = next((d for d in left if d["class"] == o.shape and d["color"] == o.color
                      and _iou(d["box"], o.box) >= min_iou), None)
        if match is None:
            return False
        left.remove(match)
    return not left


def test_shapes_masks_touch_every_side_of_their_box():
    for s in range(S.MIN_PIXELS, 50):
        for shape in S.SHAPES:
            m = S.shape_mask(shape, s)
            assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any(), (shape, s)


def test_shapes_detector_recovers_clean_renders_exactly():
    for size in (64, 32, 96):
        metas = S.all_prompts() if size == 64 else S.all_prompts()[::7]
        scenes = [S.sample_scene(m, seed, size=size) for seed in range(2) for m in metas]
        images = np.stack([S.render(s) for s in scenes])
        for scene, dets in zip(scenes, S.detect_batch(images)):
            assert _same_objects(scene, dets), (scene, dets)
            assert all(0 < d["score"] <= 1 and d["score"] > 0.5 for d in dets)


def test_shapes_scenes_and_images_are_deterministic():
    meta = S.color_attr("red", "circle", "blue", "square")
    a, b = S.sample_scene(meta, 7), S.sample_scene(meta, np.random.default_rng(7))
    assert a == b and np.array_equal(S.render(a), S.render(b)) and S.plan_of(a) == S.plan_of(b)
    others = {S.plan_of(S.sample_scene(meta, seed)) for seed in range(20)}
    assert len(others) > 5  # many scenes, so many plans, satisfy one prompt


def test_shapes_scenes_satisfy_their_metadata():
    for seed in range(3):
        for meta in S.all_prompts():
            scene = S.sample_scene(meta, seed)
            objs = scene.objects
            assert len(objs) == sum(c["count"] for c in meta["include"])  # exactly the prompt's objects
            assert _strict_pass(scene.detections(), meta), (meta, scene)
            gap = round(S.GAP * scene.size)
            for i, a in enumerate(objs):  # no overlap, with a gap
                assert 0 <= a.box[0] < a.box[2] <= scene.size and 0 <= a.box[1] < a.box[3] <= scene.size
                for b in objs[i + 1:]:
                    assert (a.box[0] >= b.box[2] + gap or b.box[0] >= a.box[2] + gap
                            or a.box[1] >= b.box[3] + gap or b.box[1] >= a.box[3] + gap)
            if meta["tag"] == "position":  # the asked relation with margin, and no other
                relation, _ = meta["include"][1]["position"]
                rel, dx, dy = _relations(objs[1].box, objs[0].box)
                assert rel == {relation}
                assert max(abs(dx), abs(dy)) >= 0.7
            if meta["tag"] == "counting":  # one more would fail, one fewer too
                assert not _strict_pass(scene.detections()[1:], meta)
                assert not _strict_pass(scene.detections() + scene.detections()[:1], meta)
    # the checker is not vacuous: the opposite relation fails on the same scene
    scene = S.sample_scene(S.position("circle", "left of", "square"), 0)
    assert not _strict_pass(scene.detections(), S.position("circle", "right of", "square"))


def test_shapes_prompts_follow_geneval_layout():
    assert S.position("dog", "right of", "teddy bear") == {
        "tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                       {"class": "dog", "count": 1, "position": ["right of", 0]}],
        "prompt": "a photo of a dog right of a teddy bear"}
    assert S.counting("circle", 3) == {"tag": "counting", "include": [{"class": "circle", "count": 3}],
                                       "exclude": [{"class": "circle", "count": 4}],
                                       "prompt": "a photo of three circles"}
    assert S.colors("orange", "square")["prompt"] == "a photo of an orange square"
    assert S.color_attr("red", "circle", "blue", "square")["prompt"] == "a photo of a red circle and a blue square"
    assert {m["tag"] for m in S.all_prompts()} == set(S.TAGS)


def test_shapes_split_holds_out_what_it_claims(tmp_path):
    train, test = S.prompt_sets()
    everything = S.all_prompts()
    assert len({m["prompt"] for m in everything}) == len(everything)
    # train is exactly the prompts without a held-out combination
    assert [m for m in everything if not S.is_held_out(m)] == train
    train_text = " | ".join(m["prompt"] for m in train)
    for color, shape in S.HELD_OUT_PAIRS:
        assert f"{color} {shape}" not in train_text
        assert any(f"{color} {shape}" in m["prompt"] for m in test)
    for a, relation, b in S.HELD_OUT_LAYOUTS:
        assert S.position(a, relation, b) not in train and S.position(a, relation, b) in test
    for shape, n in S.HELD_OUT_COUNTS:
        assert S.counting(shape, n) not in train and S.counting(shape, n) in test
    # every colour and every shape is still seen in training, just not in the held-out pairs
    assert {c["color"] for m in train if m["tag"] == "colors" for c in m["include"]} == set(S.COLORS)
    assert {c["class"] for m in train if m["tag"] == "colors" for c in m["include"]} == set(S.SHAPES)
    # the tags that can hold out are wholly novel in test; every tag is tested
    assert all(S.is_held_out(m) for m in test if m["tag"] in ("colors", "position", "color_attr"))
    assert {m["tag"] for m in test} == set(S.TAGS)
    # random colours avoid the held-out pairs when asked to
    for seed, meta in enumerate(train):
        for o in S.sample_scene(meta, seed, avoid=S.HELD_OUT_PAIRS).objects:
            assert (o.color, o.shape) not in S.HELD_OUT_PAIRS
    # written files round-trip and are deterministic
    paths = S.write_prompt_sets(tmp_path / "a")
    again = S.write_prompt_sets(tmp_path / "b")
    for p, q, metas in zip(paths, again, (train, test)):
        assert open(p).read() == open(q).read()
        assert [json.loads(line) for line in open(p)] == metas


def test_shapes_plans_describe_the_scene_and_parse_back():
    from tokenizers import pre_tokenizers
    vocab = set(S.vocabulary())
    splitter = pre_tokenizers.Whitespace()
    for seed, meta in enumerate(S.all_prompts()):
        scene = S.sample_scene(meta, seed)
        plan = S.plan_of(scene)
        parsed = S.parse_plan(plan)
        expect = {(o.color, o.shape, S.place_of(o.box, scene.size)) for o in scene.objects}
        assert len(parsed) == len(scene.objects) and set(parsed) == expect
        text = f"{meta['prompt']}. {plan}"
        assert set(S.split_words(text)) <= vocab, text
        assert [w for w, _ in splitter.pre_tokenize_str(text)] == S.split_words(text)  # same word rule
    assert S.place_of((0, 0, 10, 10), 64) == "top left" and S.place_of((27, 27, 37, 37), 64) == "center"
    assert S.place_of((50, 27, 60, 37), 64) == "right" and S.place_of((27, 54, 37, 64), 64) == "bottom"
    # reading order: top row first, then left to right
    scene = S.Scene([S.Obj("square", "blue", (40, 40, 60, 60)), S.Obj("circle", "red", (2, 2, 14, 14))], 64)
    assert S.plan_of(scene) == "red circle top left, blue square bottom right"
    # junk is skipped, plurals and missing places tolerated
    assert S.parse_plan("um red circle top left and ,, blah BLUE squares , green triangle zzz right top") == [
        ("red", "circle", "top left"), ("blue", "square", None), ("green", "triangle", "top right")]
    assert S.parse_plan("") == [] and S.parse_plan("red blue circle center") == [("blue", "circle", "center")]


def _blur(img, sigma):
    r = int(3 * sigma)
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    f = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(f, pad, mode="edge")
        f = sum(w * np.take(p, range(i, i + img.shape[axis]), axis=axis) for i, w in enumerate(k))
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def _jpeg(img, quality):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.array(Image.open(buf).convert("RGB"))


def _down_up(img, factor):
    s = img.shape[0]
    small = Image.fromarray(img).resize((s // factor, s // factor), Image.BILINEAR)
    return np.array(small.resize((s, s), Image.BILINEAR))


def test_shapes_detector_survives_degraded_renders():
    rng = np.random.default_rng(0)
    scenes = [S.sample_scene(m, 100 + i) for i, m in enumerate(S.all_prompts()[::2])]
    clean = [S.render(s) for s in scenes]
    degradations = {
        "blur": lambda x: _blur(x, 1.0),
        "noise": lambda x: np.clip(x + rng.normal(0, 15, x.shape), 0, 255).astype(np.uint8),
        "colour shift": lambda x: np.clip(x.astype(int) + rng.integers(-20, 21, 3), 0, 255).astype(np.uint8),
        "desaturate": lambda x: (0.5 * x + 0.5 * x.mean(-1, keepdims=True)).astype(np.uint8),
        "jpeg": lambda x: _jpeg(x, 50),
        "down-up": lambda x: _down_up(x, 2),
        "all at once": lambda x: _jpeg(np.clip(_blur(x, 0.8) + rng.normal(0, 8, x.shape) + rng.integers(-15, 16, 3),
                                               0, 255).astype(np.uint8), 75),
    }
    for name, degrade in degradations.items():
        dets = S.detect_batch(np.stack([degrade(x) for x in clean]))
        ok = np.mean([_found_all(s, d) for s, d in zip(scenes, dets)])
        assert ok >= 0.98, (name, ok)
    # speckle (isolated coloured pixels) is not an object
    speckled = clean[0].copy()
    speckled[rng.integers(0, 64, 40), rng.integers(0, 64, 40)] = S.COLORS["red"]
    assert _found_all(scenes[0], S.detect(speckled))


def test_shapes_detect_batch_api():
    import torch
    scenes = [S.sample_scene(m, i) for i, m in enumerate(S.all_prompts()[:6])]
    images = np.stack([S.render(s) for s in scenes])  # (B, H, W, 3) uint8
    batch = S.detect_batch(torch.from_numpy(images))
    assert batch == [S.detect(x) for x in images] == S.detect_batch(images)
    assert all(set(d) == {"class", "color", "box", "score"} for dets in batch for d in dets)
    assert all([d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True) for dets in batch)
    assert S.detect(np.full((64, 64, 3), 240, np.uint8)) == []
    assert S.detect_batch(np.zeros((0, 64, 64, 3), np.uint8)) == []
    with pytest.raises(AssertionError):
        S.detect(images[0].astype(np.float32))


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
    got = [S.from_t2i_r1(json.loads(line)) for line in lines]
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


def test_shapes_t2i_r1_file_counts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one hamburger", "nouns": ["hamburger"], "task_type": "numeracy", '
                    '"numeracy_info": [{"obj_name": "hamburger", "num": 1}]}\n\n'
                    '{"task_type": "shape", "prompt": "an oval mirror", "nouns": ["mirror"], '
                    '"attr_nouns": ["oval mirror"]}')
    metas, counts = S.load_t2i_r1(path)
    assert counts == {"numeracy": [1, 1], "shape": [0, 1]}
    assert metas == [{"tag": "counting", "include": [{"class": "hamburger", "count": 1}],
                      "exclude": [{"class": "hamburger", "count": 2}], "prompt": "one hamburger"}]
