"""The shapes world: a synthetic compositional image domain small enough to run T2I-R1 on two CPU cores.

Real T2I-R1 trains Janus-Pro-7B on 7k text prompts with four large reward models. Here the same method runs
end to end on a world we fully control:

- images: flat-coloured circles, squares and triangles (1 to 4, never touching) on a light grey background;
- prompts: GenEval's six templates ("a photo of a red circle and a blue square") with GenEval's metadata,
  split into a train set and a held-out test set of unseen combinations;
- plans: the semantic-level chain of thought of this world, "red circle top left, blue square right";
- an exact detector, which plays the part of GenEval's Mask2Former: it recovers every object of a clean
  render exactly and degrades gracefully on the blurry, colour-drifted images a small VQ decoder produces.

The GenEval rule engine that turns detections + metadata into a reward lives in rewards.py, not here.
Its reward, `shapes` (GenEval's rules on this detector), and its four parts (shapes-presence, -count, -color,
-position) for weighting them are listed in rewards.REWARDS by this module's name.

At the end, before the command line: the machinery of the rebuttal's experiments (diversity, prompt
enrichment, SFT, reward weights; docs/experiments.md) and their tables (`shapes.py compare`).

Departures from GenEval: six colours, not ten (pink is red mixed with the light background, i.e. what a
blurred red edge looks like; brown is a dark orange of the same hue; black and white have no hue and white
is the background), three shapes, and colour is judged from the object's own pixels (no CLIP crop classifier).

Conventions used throughout: image arrays are uint8 (H, W, 3), y grows downwards, and boxes are
(x0, y0, x1, y1) in pixels with x1, y1 EXCLUSIVE, so an object is image[y0:y1, x0:x1].
"""
import argparse
import collections
import contextlib
import functools
import glob
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

import rewards
import t2i_r1 as R
from checkpoints import from_pretrained, load_config, read_json, save_like, save_pretrained, write_json
from model import Janus, JanusConfig, Tokenizer, chat_prompt, image_prompt
from settings import HelpFormatter, check_settings, config_flags, default_device, setting
from rewards import GENEVAL_RELATIONS, GENEVAL_TAGS
from vq import VQConfig, VQModel, from_uint8

# -----------------------------------------------------------------------------
# The world: shapes, colours, relations, places

SHAPES = ("circle", "square", "triangle")
# Hues spread round the colour wheel (red 0, orange 29, yellow 57, green 132, blue 221, purple 278 degrees)
# at high chroma. The detector classifies by hue, which mixing with a neutral background leaves unchanged,
# so blurred edges never read as another colour.
COLORS = {
    "red": (220, 30, 30),
    "orange": (240, 125, 20),
    "yellow": (230, 220, 20),
    "green": (30, 180, 60),
    "blue": (30, 90, 220),
    "purple": (150, 50, 210),
}
BACKGROUND = (240, 240, 240)  # neutral: zero chroma, far from every palette colour
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
TAGS = GENEVAL_TAGS + ("reasoning",)  # reasoning: prompts the plan must resolve (this world's WISE)
# 3x3 grid of places by box centre, row-major; the middle row/column has no word of its own.
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")

# Objects sit on a CELLS x CELLS grid of the image: at 64 pixels one cell is one VQ code (8 x 8 pixels), so
# an object covers whole codes and is drawn by a fixed set of them wherever it stands. Off-grid objects cut
# codes at every offset, and a 2-million-parameter drawer then makes blobs out of them (the first base did).
CELLS = 8
OBJECT_CELLS = (2, 3)  # an object's side, in cells (16 or 24 pixels at 64)
GAP_CELLS = 1          # free cells kept between two objects, so they never touch


@dataclass
class Obj:
    shape: str
    color: str
    box: tuple  # (x0, y0, x1, y1) pixels, x1/y1 exclusive

    @property
    def center(self):
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)


@dataclass
class Scene:
    objects: list  # of Obj
    size: int = 64  # images are size x size

    def detections(self):
        """Ground truth in detect()'s output format (score 1), e.g. to test a rule engine without a detector."""
        return [{"class": o.shape, "color": o.color, "box": tuple(o.box), "score": 1.0} for o in self.objects]


# -----------------------------------------------------------------------------
# Rendering

def shape_mask(shape, w, h=None):
    """Boolean (h, w) mask of `shape` drawn to fill a w x h box (h = w by default): a circle is the inscribed
    ellipse, a triangle stands on the bottom edge with its apex at the top centre. Every shape touches all four
    sides of its box, so the box is exactly the bounding box of the drawn pixels (the detector relies on this)."""
    h = w if h is None else h
    yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")  # (h, w) pixel centres
    if shape == "square":
        return np.ones((h, w), dtype=bool)
    if shape == "circle":
        return ((2 * xx - w) / w) ** 2 + ((2 * yy - h) / h) ** 2 <= 1
    if shape == "triangle":
        # the half-width is taken at each row's lower edge, and the apex row keeps its middle pixel(s) lit
        return np.abs(2 * xx - w) <= np.maximum((yy + 0.5) * w / h, 1)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene):
    """Scene -> uint8 (size, size, 3). Hard edges (no anti-aliasing): a clean render's pixels are exactly the
    palette, which is what lets the detector recover boxes exactly; the VQ decoder will blur them anyway."""
    img = np.empty((scene.size, scene.size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        img[y0:y1, x0:x1][shape_mask(o.shape, x1 - x0, y1 - y0)] = COLORS[o.color]
    return img


# -----------------------------------------------------------------------------
# Prompts with GenEval metadata

def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def single_object(shape):
    return {"tag": "single_object", "include": [{"class": shape, "count": 1}], "prompt": f"a photo of {_a(shape)}"}


def two_object(a, b):
    return {"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {_a(a)} and {_a(b)}"}


def counting(shape, n):
    # the exclude clause makes the count exact, as in GenEval: n + 1 of them fails
    return {"tag": "counting", "include": [{"class": shape, "count": n}],
            "exclude": [{"class": shape, "count": n + 1}], "prompt": f"a photo of {NUMBER_WORDS[n]} {shape}s"}


def colors(color, shape):
    return {"tag": "colors", "include": [{"class": shape, "count": 1, "color": color}],
            "prompt": f"a photo of {_a(color + ' ' + shape)}"}


def position(a, relation, b):
    # GenEval layout: the reference object b is clause 0, the subject a carries [relation, 0]
    return {"tag": "position",
            "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
            "prompt": f"a photo of {_a(a)} {relation} {_a(b)}"}


def color_attr(c1, s1, c2, s2):
    return {"tag": "color_attr",
            "include": [{"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1, "color": c2}],
            "prompt": f"a photo of {_a(c1 + ' ' + s1)} and {_a(c2 + ' ' + s2)}"}


# Reasoning prompts: the objects are described indirectly, by what a reader is expected to know (a triangle has
# three corners, the sky is blue), and the metadata holds what they resolve to. The base learns these
# facts only as text, from reasoning request -> plan pairs; its drawer was trained on direct prompts and
# plans. So the plan is where an indirect prompt becomes an explicit one, as in T2I-R1 on WISE.
CORNERS = {"triangle": "three", "square": "four", "circle": "no"}          # "the shape with three corners"
THINGS = {"red": "a cherry", "orange": "a pumpkin", "yellow": "a lemon",  # "the color of a lemon"
          "green": "grass", "blue": "the sky", "purple": "a plum"}
CORNER_COUNTS = {3: "triangle", 4: "square"}                               # "as many as a square has corners"


def riddle(kind, shape, color=None, count=None):
    """A reasoning prompt and its resolved GenEval metadata (tag "reasoning", `riddle` says what is indirect):
    kind "shape":       "a photo of the shape with three corners"                     -> one triangle
    kind "color":       "a photo of a circle the color of the sky"                    -> one blue circle
    kind "shape+color": "a photo of the shape with four corners, the color of grass"  -> one green square
    kind "count":       "a photo of as many circles as a square has corners"          -> exactly four circles"""
    clause = {"class": shape, "count": 1}
    meta = {"tag": "reasoning", "riddle": kind, "include": [clause]}
    the_shape = f"the shape with {CORNERS[shape]} corners"
    if kind == "shape":
        meta["prompt"] = f"a photo of {the_shape}"
    elif kind == "color":
        clause["color"] = color
        meta["prompt"] = f"a photo of {_a(shape)} the color of {THINGS[color]}"
    elif kind == "shape+color":
        clause["color"] = color
        meta["prompt"] = f"a photo of {the_shape}, the color of {THINGS[color]}"
    elif kind == "count":
        clause["count"] = count
        meta["exclude"] = [{"class": shape, "count": count + 1}]
        meta["prompt"] = f"a photo of as many {shape}s as a {CORNER_COUNTS[count]} has corners"
    else:
        raise ValueError(f"unknown riddle kind {kind!r}")
    return meta


def all_prompts():
    """Every prompt of the world (240 GenEval ones, then 45 reasoning ones), in a fixed order. GenEval's own
    restrictions apply: two_object, position and color_attr name two different shapes, and color_attr two
    different colours."""
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    out = [single_object(s) for s in SHAPES]
    out += [two_object(a, b) for a, b in pairs]
    out += [counting(s, n) for s in SHAPES for n in NUMBER_WORDS]
    out += [colors(c, s) for c in COLORS for s in SHAPES]
    out += [position(a, r, b) for a, b in pairs for r in GENEVAL_RELATIONS]
    out += [color_attr(c1, a, c2, b) for a, b in pairs for c1 in COLORS for c2 in COLORS if c1 != c2]
    out += [riddle("shape", s) for s in SHAPES]
    out += [riddle(kind, s, color=c) for kind in ("color", "shape+color") for c in COLORS for s in SHAPES]
    out += [riddle("count", s, count=n) for s in SHAPES for n in CORNER_COUNTS]
    return out


# What the test set holds out. Each colour loses one shape and each shape two colours, so every colour and
# every shape is still seen in training, only never together.
HELD_OUT_PAIRS = {("red", "triangle"), ("blue", "triangle"), ("orange", "square"), ("green", "square"),
                  ("yellow", "circle"), ("purple", "circle")}
# Three layouts, each in both wordings ("circle left of square" is the same picture as "square right of
# circle", so holding out only one wording would test paraphrase, not composition).
HELD_OUT_LAYOUTS = {("circle", "left of", "square"), ("square", "right of", "circle"),
                    ("triangle", "above", "circle"), ("circle", "below", "triangle"),
                    ("square", "above", "triangle"), ("triangle", "below", "square")}
HELD_OUT_COUNTS = {("triangle", 4)}


def is_held_out(meta):
    """True when a prompt uses a held-out (colour, shape) pair, layout or count: it then never appears in training."""
    inc = meta["include"]
    for c in inc:
        if (c.get("color"), c["class"]) in HELD_OUT_PAIRS or (c["class"], c["count"]) in HELD_OUT_COUNTS:
            return True
        if "position" in c:
            relation, j = c["position"]
            if (c["class"], relation, inc[j]["class"]) in HELD_OUT_LAYOUTS:
                return True
    return False


VAL_FRACTION = 0.2  # of the training prompts of each tag with at least 10 of them


def prompt_sets():
    """(train, val, test) lists of GenEval metadata, deterministic.
    test: every held-out prompt (colors 6, position 6, color_attr 96, counting 1, reasoning 13), plus the
    single_object, two_object, other counting and shape-riddle prompts (21), which cannot hold anything out
    in a world of three shapes and so repeat training prompts; is_held_out() tells the two kinds apart.
    val: a fifth of the other prompts of each large tag (colors, position, color_attr, reasoning), carved
    out for choosing hyperparameters: RL never trains on them (pretraining saw them).
    train: the rest. Score per tag and average the tags, as GenEval does, so color_attr's size does not
    dominate; reasoning is reported beside GenEval's six tags, not inside their mean."""
    train, test = [], []
    for m in all_prompts():
        held = is_held_out(m)
        if not held:
            train.append(m)
        if held or m["tag"] in ("single_object", "two_object", "counting") or m.get("riddle") == "shape":
            test.append(m)
    rng = np.random.default_rng(2024)
    val = []
    for tag in TAGS:
        pool = [i for i, m in enumerate(train) if m["tag"] == tag and m.get("riddle") != "shape"]
        if len(pool) >= 10:
            val += [int(i) for i in rng.choice(pool, round(VAL_FRACTION * len(pool)), replace=False)]
    held = set(val)
    return [m for i, m in enumerate(train) if i not in held], [train[i] for i in sorted(val)], test


def write_prompt_sets(out_dir):
    """Write train.jsonl, val.jsonl and test.jsonl (one metadata dict per line) into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, metas in zip(("train", "val", "test"), prompt_sets()):
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in metas)
        paths.append(path)
    return paths


# -----------------------------------------------------------------------------
# Scenes that satisfy a prompt

def _relation_holds(relation, a, b):
    """A sufficient, margin-keeping condition for GenEval's `relation` of box a to box b: a lies wholly on that
    side of b, and the centre offset across the axis is at most half the offset along it. Then GenEval's shrunk,
    normalised offset is at least 0.8 / sqrt(1.25) = 0.72 along the axis (it needs 0.5) and at most 0.45 across
    it, so exactly the asked relation holds. The rule engine itself is in rewards.py."""
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    ox, oy = (ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2
    if relation == "left of":
        return ax1 <= bx0 and abs(oy) <= -ox / 2
    if relation == "right of":
        return ax0 >= bx1 and abs(oy) <= ox / 2
    if relation == "above":
        return ay1 <= by0 and abs(ox) <= -oy / 2
    if relation == "below":
        return ay0 >= by1 and abs(ox) <= oy / 2
    raise ValueError(f"unknown relation {relation!r}")


def sample_scene(meta, rng, size=64, avoid=()):
    """A random scene holding exactly the objects `meta` asks for, with every unspecified attribute random.
    rng: numpy Generator (or an int seed). avoid: (colour, shape) pairs that random colours never take; pass
    HELD_OUT_PAIRS when making training data so held-out pairs are not seen even in unprompted colours.
    Position clauses are satisfied with margin (see _relation_holds); exclude clauses hold because nothing else
    is drawn. Objects come in include-clause order."""
    rng = np.random.default_rng(rng)
    wanted = []  # (shape, colour or None, clause index) per object
    for i, clause in enumerate(meta["include"]):
        color = clause.get("color")
        if clause["class"] not in SHAPES or (color is not None and color not in COLORS):
            raise ValueError(f"clause {clause} is not in the shapes world")
        wanted += [(clause["class"], color, i)] * clause["count"]
    for clause in meta.get("exclude", []):
        have = sum(w[0] == clause["class"] for w in wanted)
        assert have < clause["count"], f"metadata excludes what it includes: {meta}"
    # (subject object index, relation, reference object index), using each clause's first object
    first = {}
    for k, w in enumerate(wanted):
        first.setdefault(w[2], k)
    relations = [(first[i], c["position"][0], first[c["position"][1]])
                 for i, c in enumerate(meta["include"]) if "position" in c]
    cell = size // CELLS
    for attempt in range(1000):  # rejection sampling: fresh sizes and places until everything fits
        boxes = []  # in cells
        for s in rng.choice(OBJECT_CELLS, size=len(wanted)):
            for drop in range(50):  # drop the box at random until it keeps its distance from the others
                x, y = rng.integers(0, CELLS - s + 1, size=2)
                b = (int(x), int(y), int(x + s), int(y + s))
                if all(b[0] >= o[2] + GAP_CELLS or o[0] >= b[2] + GAP_CELLS or b[1] >= o[3] + GAP_CELLS
                       or o[1] >= b[3] + GAP_CELLS for o in boxes):
                    boxes.append(b)
                    break
            else:
                break
        if len(boxes) == len(wanted) and all(_relation_holds(r, boxes[i], boxes[j]) for i, r, j in relations):
            break
    else:
        raise RuntimeError(f"could not lay out {meta['prompt']!r} at size {size}")
    boxes = [tuple(cell * v for v in b) for b in boxes]
    objects = []
    for (shape, color, _), box in zip(wanted, boxes):
        if color is None:
            choices = [c for c in COLORS if (c, shape) not in avoid]
            color = choices[rng.integers(len(choices))]
        objects.append(Obj(shape, color, box))
    return Scene(objects, size)


# -----------------------------------------------------------------------------
# Plans: the semantic-level chain of thought of this world

def split_words(text):
    """The word-level tokenisation every part of the project shares: runs of letters, and ',' '.' as words."""
    return re.findall(r"[a-z]+|[,.]", text.lower())


def place_of(box, size):
    """Which ninth of the image holds the box centre, as one of PLACES."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return PLACES[3 * min(int(3 * cy / size), 2) + min(int(3 * cx / size), 2)]


def plan_of(scene):
    """The plan describing a scene: 'colour shape place' per object in reading order (grid row, then x),
    joined by ', '. Many scenes satisfy one prompt, so one prompt has many plans."""
    def order(o):
        return (PLACES.index(place_of(o.box, scene.size)) // 3, o.center[0], o.center[1])
    return ", ".join(f"{o.color} {o.shape} {place_of(o.box, scene.size)}" for o in sorted(scene.objects, key=order))


_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}


def parse_plan(text):
    """Plan text -> list of (colour, shape, place or None). An object starts at a colour word followed by a shape
    word; place words after it (until a comma or the next object) give its place. Anything else is skipped,
    so sampled plans with junk in them still parse as far as they make sense."""
    items, open_item = [], False
    words = split_words(text)
    for i, w in enumerate(words):
        if w in COLORS and i + 1 < len(words) and words[i + 1] in _SHAPE_WORDS:
            items.append([w, _SHAPE_WORDS[words[i + 1]], []])
            open_item = True
        elif w == ",":
            open_item = False
        elif open_item and w in ("top", "bottom", "left", "right", "center"):
            items[-1][2].append(w)
    out = []
    for color, shape, where in items:
        row = next((w for w in where if w in ("top", "bottom")), "")
        col = next((w for w in where if w in ("left", "right")), "")
        place = f"{row} {col}".strip() or ("center" if "center" in where else None)
        out.append((color, shape, place))
    return out


def vocabulary():
    """Every word (split_words units) that can appear in a prompt, a plan, or the image prompt
    '{prompt}. {plan}', sorted."""
    words = {w for m in all_prompts() for w in split_words(m["prompt"])}
    words |= set(COLORS) | set(SHAPES) | {w for p in PLACES for w in p.split()} | {",", "."}  # plans, the join
    return sorted(words)


# -----------------------------------------------------------------------------
# The exact detector

def _hue_chroma(rgb):
    """float (..., 3) -> hue in degrees [0, 360) and chroma (max - min), both (...)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    c = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return 60.0 * hue, chroma


_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (K, 3)
_PALETTE_HUE, _PALETTE_CHROMA = _hue_chroma(_PALETTE)
_PALETTE_CONTRAST = np.linalg.norm(_PALETTE - np.array(BACKGROUND, dtype=np.float32), axis=-1)  # (K,)
def _components(fg):
    """4-connected components of a (B, H, W) bool mask -> int64 (B, H, W) labels, -1 off the mask, each
    component labelled by the smallest flat index among its pixels. Min-label propagation to the four
    neighbours plus pointer jumping (a label is the index of a pixel of the same component, so following it
    is a shortcut); converges in a few dozen vectorised sweeps for objects of this size, no scipy needed."""
    big = fg.size
    lab = np.where(fg, np.arange(fg.size).reshape(fg.shape), big)
    while True:
        m = lab.copy()
        np.minimum(m[:, 1:], lab[:, :-1], out=m[:, 1:])
        np.minimum(m[:, :-1], lab[:, 1:], out=m[:, :-1])
        np.minimum(m[:, :, 1:], lab[:, :, :-1], out=m[:, :, 1:])
        np.minimum(m[:, :, :-1], lab[:, :, 1:], out=m[:, :, :-1])
        m[~fg] = big
        flat = m.reshape(-1)
        on = flat < big
        flat[on] = flat[flat[on]]  # pointer jump
        if np.array_equal(m, lab):
            return np.where(fg, lab, -1)
        lab = m


def _object_pixels(rgb, min_chroma, min_contrast):
    """Step 1 of detect_batch: rgb float (B, H, W, 3) -> the object pixels (B, H, W) bool, each pixel's contrast
    to its image's background (B, H, W) and its nearest palette colour (B, H, W)."""
    hue, chroma = _hue_chroma(rgb)  # (B, H, W) each
    dist = np.abs(hue[..., None] - _PALETTE_HUE)  # (B, H, W, K)
    color_idx = np.minimum(dist, 360 - dist).argmin(-1)  # (B, H, W)
    # background = median of the neutral (low-chroma) pixels, so a global colour cast is not contrast
    neutral = chroma < min_chroma * _PALETTE_CHROMA.min()
    bg = np.array([np.median(x[m], axis=0) if m.any() else BACKGROUND for x, m in zip(rgb, neutral)],
                  dtype=np.float32).reshape(len(rgb), 3)
    contrast = np.linalg.norm(rgb - bg[:, None, None, :], axis=-1)  # (B, H, W)
    fg = (chroma >= min_chroma * _PALETTE_CHROMA[color_idx]) & (contrast >= min_contrast * _PALETTE_CONTRAST[color_idx])
    return fg, contrast, color_idx


def detect_batch(images, min_area=0.004, min_chroma=0.2, min_contrast=0.35, min_iou=0.8, min_margin=0.05,
                 min_purity=0.8, max_aspect=1.25):
    """Detect the objects of a batch of images, uint8 (B, H, W, 3) numpy or torch. Returns one list per image
    of {"class", "color", "box", "score"} dicts, highest score first; box is (x0, y0, x1, y1), x1/y1 exclusive.

    1. Each pixel takes the palette colour nearest in hue. It is an object pixel when its chroma is at least
       `min_chroma`, and its distance from the background colour (contrast) at least `min_contrast`, of that
       palette colour's own. Candidates are 4-connected components of object pixels (renders keep a gap
       between objects); components under `min_area` of the image are speckle.
    2. Blur and colour drift move any fixed threshold, so each component is measured against its own strength:
       coverage = contrast / (the component's 90th-percentile contrast). The object is its pixels at half
       coverage or more: a symmetric blur leaves the half-way contour of a straight edge in place, so boxes
       stay put. Contrast, unlike chroma, keeps the luminance edge that JPEG-like codecs preserve best.
    3. Shape: the object's pixels are compared with each ideal shape drawn in its box (shape_mask); the score
       is the best intersection-over-union. Colour: the majority over the object's pixels.
    Only what a person would name is returned: a box about square (aspect <= `max_aspect`; two merged objects
    make a long box), a template IoU of at least `min_iou` that beats the next shape by `min_margin` (a circle
    and a square overlap by 0.785, so a blob between them names neither), and one colour on at least
    `min_purity` of the pixels (no colour bleeding). Everything else is dropped: a blob counts as nothing.
    A clean render has coverage 0 or 1 and exact palette hues, so it is recovered exactly, with score 1."""
    if hasattr(images, "detach"):  # a torch tensor, without importing torch here
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, "expected uint8 (B, H, W, 3)"
    B, H, W, _ = images.shape
    fg, contrast, color_idx = _object_pixels(images.astype(np.float32), min_chroma, min_contrast)
    labels = _components(fg)

    # Per-pixel arrays over object pixels, then per-component reductions over segments sorted by component.
    ys, xs = np.nonzero(fg)[1:]  # (N,) each, C order like labels[fg]
    uniq, inv = np.unique(labels[fg], return_inverse=True)  # n components; inv: (N,) component of each pixel
    n, K = len(uniq), len(COLORS)
    strength, col = contrast[fg], color_idx[fg]
    order = np.lexsort((strength, inv))  # by component, then by contrast
    count = np.bincount(inv, minlength=n)
    starts = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    core = strength[order][starts + ((count - 1) * 0.9).astype(np.int64)] if n else strength[:0]  # (n,)
    half = strength >= 0.5 * core[inv]  # (N,) the object proper

    def seg(reduce, values):  # reduce values over each component's segment
        return reduce.reduceat(values[order], starts) if n else values[:0]
    x0 = seg(np.minimum, np.where(half, xs, W))
    x1 = seg(np.maximum, np.where(half, xs, -1)) + 1
    y0 = seg(np.minimum, np.where(half, ys, H))
    y1 = seg(np.maximum, np.where(half, ys, -1)) + 1
    votes = np.bincount(inv * K + col, weights=half, minlength=n * K).reshape(n, K)
    purity = votes.max(-1) / np.maximum(votes.sum(-1), 1e-6)
    w, h = x1 - x0, y1 - y0
    aspect = np.maximum(w, h) / np.maximum(np.minimum(w, h), 1)

    out = [[] for _ in range(B)]
    candidates = (count >= min_area * H * W) & (purity >= min_purity) & (aspect <= max_aspect) & (w > 1) & (h > 1)
    for k in np.nonzero(candidates)[0]:
        px = order[starts[k]:starts[k] + count[k]]
        found = _shape_of(ys[px[half[px]]] - y0[k], xs[px[half[px]]] - x0[k], int(w[k]), int(h[k]), min_iou, min_margin)
        if found is not None:
            out[uniq[k] // (H * W)].append({"class": found[0], "color": list(COLORS)[votes[k].argmax()],
                                            "box": (int(x0[k]), int(y0[k]), int(x1[k]), int(y1[k])), "score": found[1]})
    return [sorted(dets, key=lambda d: -d["score"]) for dets in out]


def _shape_of(ys, xs, w, h, min_iou, min_margin):
    """Step 3 of detect_batch for one object, its pixels at (ys, xs) in its (h, w) box: (shape, IoU), or None
    when no shape's template matches well enough and clearly better than the next."""
    mask = np.zeros((h, w), dtype=bool)
    mask[ys, xs] = True
    ious = np.array([_iou(mask, _template(s, w, h)) for s in SHAPES])
    best, second = np.sort(ious)[::-1][:2]
    return (SHAPES[int(ious.argmax())], float(best)) if best >= min_iou and best - second >= min_margin else None


@functools.lru_cache(maxsize=None)
def _template(shape, w, h):
    return shape_mask(shape, w, h)


def _iou(a, b):
    inter = np.count_nonzero(a & b)
    return inter / max(np.count_nonzero(a) + np.count_nonzero(b) - inter, 1)


def detect(image, **kwargs):
    """detect_batch for one uint8 (H, W, 3) image."""
    return detect_batch(np.asarray(image)[None], **kwargs)[0]


class ShapesReward(rewards.RuleReward):
    """GenEval's rules on this world's exact detector: `--rewards shapes` in sample.py and train.py."""
    name, classes, colors, tags = "shapes", SHAPES, tuple(COLORS), TAGS

    def score(self, images, metadata):
        return self.rule_scores([detect(img) if rewards.checkable(m) else [] for img, m in zip(images, metadata)],
                                metadata)

    def group_diversity(self, records, images, info, group_size):  # sample.score's hook: see diversity_summary
        return diversity_summary(records, images, info["detections"], group_size)


class ShapesPartReward(ShapesReward):
    """One part of the dense shapes reward (rewards.geneval_score's "parts"): what presence, count, colour or
    position adds to it. At equal weights the four sum to `shapes`; `--rewards shapes-color:5,...` reweighs
    one. A prompt without that kind of clause scores 0, a constant in its group. Each reports the same strict
    GenEval accuracy as `shapes`."""
    part = None

    def score(self, images, metadata):
        _, info = super().score(images, metadata)
        return torch.tensor([p[self.part] if p else 0.0 for p in info["parts"]]), info


class ShapesPresenceReward(ShapesPartReward):
    name, part = "shapes-presence", "presence"


class ShapesCountReward(ShapesPartReward):
    name, part = "shapes-count", "count"


class ShapesColorReward(ShapesPartReward):
    name, part = "shapes-color", "color"


class ShapesPositionReward(ShapesPartReward):
    name, part = "shapes-position", "position"


# -----------------------------------------------------------------------------
# The tiny base: a VQ, a word-level tokenizer and a small Janus, pretrained on rendered scenes.
# Everything is the real machinery (vq.VQModel, model.Janus, model.Tokenizer, saved with save_pretrained),
# only small. The Janus learns three things at once, in one mix:
#   (a) reasoning request about a prompt -> a plan of a scene satisfying it (the semantic level),
#   (b) "prompt. plan" -> the image tokens of that scene (the token level, after a plan),
#   (c) "prompt" -> the image tokens (the token level alone, for --levels token: sampling and the ablation),
# with the prompt replaced by pad tokens 10% of the time, as Janus-Pro's unconditional rows look, so that
# classifier-free guidance works.
# One departure from Janus-Pro's architecture, in a second phase: a learned table of the 8x8 grid's cells
# added to the image inputs (model.JanusConfig.image_positions). From 1-D rotary angles alone the tiny drawer
# mostly put objects in the right row and a wrong column; with the table from the start it placed them well
# but read their colours from the plan badly; added (at zero) after the first phase, it keeps the colours the
# first phase learnt and places better (docs/shapes.md).

# the reasoning request of this world, saved as reasoning_prompt.txt and picked up by the sampler
REASONING_TEMPLATE = "describe the objects of {prompt}"
# the base ships with the repository (7.8 MB, `python shapes.py pretrain` reproduces it); a fresh pretraining
# goes to checkpoints/ unless told otherwise, so it never overwrites the shipped one by accident
BASE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes-base")
PRETRAIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "shapes-base")
VQ_SCENES = 10000  # pretraining renders its scenes in chunks of this many, and trains the VQ on the first


@dataclass
class PretrainConfig:
    seed: int = 0                  # seed of the scenes, the order of the data and the initialisation
    image_size: int = setting(64, low=64, high=64, why=" (8x8 cells of 8 pixels: the VQ's grid)")  # image side in pixels
    scenes: int = setting(200000, low=1)  # rendered training scenes (each used by all three tasks, about once)
    # the VQ: 64x64 pixels -> 8x8 codes, one per cell content
    vq_steps: int = setting(1000, low=1)  # VQ training steps
    vq_batch: int = setting(16, low=1)    # VQ batch size
    vq_lr: float = setting(2e-3, above=0)  # VQ learning rate (Adam)
    codebook_size: int = setting(128, low=109, why=" (cell_contents: 109 distinct cells)")  # VQ codes
    # the Janus
    n_layer: int = setting(4, low=1)      # decoder layers
    n_embd: int = setting(128, low=1)     # hidden size, a multiple of n_head
    n_head: int = setting(4, low=1)       # attention heads
    lm_steps: int = setting(3000, low=1)  # Janus training steps
    lm_batch: int = setting(32, low=1)    # sequences per step
    lm_lr: float = setting(2e-3, above=0)  # peak learning rate (AdamW), cosine to a tenth
    cond_dropout: float = setting(0.1, low=0, high=1)  # fraction of image prompts replaced by pad tokens, so that CFG works
    # then the cells: a learned table of the 8x8 grid's cells (model.JanusConfig.image_positions), zero at
    # first, added to the image inputs and trained with everything else (0 steps: no table)
    cell_steps: int = setting(3000, low=0)  # steps after adding the cell table
    cell_lr: float = setting(1e-3, above=0)  # their peak learning rate, cosine to a tenth

    def check(self):
        """check_settings, and what no single bound says."""
        check_settings(self)
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd must be a multiple of --n-head, got {self.n_embd} and {self.n_head}")


def vq_config(c: PretrainConfig):
    return VQConfig(image_size=c.image_size, codebook_size=c.codebook_size, codebook_embed_dim=8, ch=32,
                    encoder_ch_mult=(1, 1, 2, 2), decoder_ch_mult=(1, 1, 2, 2), z_channels=32, num_res_blocks=1)


def make_tokenizer():
    """A word-level tokenizer.json (through `tokenizers`) with Janus-Pro's special-token strings."""
    specials = [Tokenizer.BOS, Tokenizer.EOS, Tokenizer.PAD, Tokenizer.BOI, Tokenizer.EOI, "<|User|>", "<|Assistant|>"]
    words = ["<unk>", ":"] + sorted(set(vocabulary()) | set(split_words(REASONING_TEMPLATE.replace("{prompt}", ""))))
    tk = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(specials)
    return tk


def render_dataset(c: PretrainConfig, rng, prompts=None):
    """(metadata, plan text, uint8 image) for c.scenes random scenes of training prompts (prompts: unset, the
    train and val splits, as pretraining sees them; SFT passes the train split alone).

    Held-out colour-shape pairs are never named by a training prompt, but they may appear in a scene
    where the prompt leaves the colour free ("a photo of a triangle" drawn red), and so in its plan. The
    VQ has to be able to draw every object, and it is the plan that lets the model carry a new prompt
    ("a red triangle") over to a scene it knows: the semantic level's job in T2I-R1."""
    train, val, _ = prompt_sets()
    by_tag = {}
    for m in prompts or train + val:  # val is carved out of RL's prompts, not out of what the base has seen
        by_tag.setdefault(m["tag"], []).append(m)
    tags, out = sorted(by_tag), []
    for _ in range(c.scenes):  # tags drawn uniformly: color_attr would otherwise be half of the data
        pool = by_tag[tags[rng.integers(len(tags))]]
        meta = pool[rng.integers(len(pool))]
        scene = sample_scene(meta, rng, size=c.image_size)
        out.append((meta, plan_of(scene), render(scene)))
    return out


def cell_contents(size=64):
    """Every distinct cell a scene can hold (uint8 (K, cell, cell, 3), cell = size // CELLS), background
    first: the code vocabulary of the shapes world's VQ, one code per cell content."""
    cell = size // CELLS
    seen = {}
    for patch in [np.full((cell, cell, 3), BACKGROUND, np.uint8)] + [
            render(Scene([Obj(shape, color, (0, 0, k * cell, k * cell))], size))[r * cell:(r + 1) * cell,
                                                                                 q * cell:(q + 1) * cell]
            for k in OBJECT_CELLS for shape in SHAPES for color in COLORS for r in range(k) for q in range(k)]:
        seen.setdefault(patch.tobytes(), patch)
    return np.stack(list(seen.values()))


def tokenize(images, contents):
    """Clean renders, uint8 (N, S, S, 3) -> codes (N, CELLS * CELLS): each cell's index in `contents`, raster
    order. This is the tokenisation the VQ is trained to reproduce and the drawer learns to write."""
    N, S = images.shape[:2]
    cell = S // CELLS
    index = {p.tobytes(): i for i, p in enumerate(contents)}
    cells = images.reshape(N, CELLS, cell, CELLS, cell, 3).transpose(0, 1, 3, 2, 4, 5).reshape(N * CELLS * CELLS, -1)
    try:
        return np.array([index[c.tobytes()] for c in cells], dtype=np.int64).reshape(N, CELLS * CELLS)
    except KeyError:
        raise ValueError("an image holds a cell that is not in the vocabulary: not a clean render of this world")


def train_vq(c: PretrainConfig, images, codes, log=print):
    """A VQ whose codes are fixed in advance: `codes` (N, CELLS * CELLS) give every cell its content's code
    (tokenize). The decoder learns to draw a code grid (L1 + MSE, object pixels weighted 5x), and the encoder
    to find each cell's code (cross-entropy over the cosine similarity to the unit codebook entries, the
    distance VQ-16's nearest-neighbour search uses), so vq.encode of a render gives back its codes.
    A VQ trained only to reconstruct (the first base of this world) spread one cell content over up to 200
    codes depending on the rest of the picture, since VQ-16's GroupNorm and attention see all of it; the tiny
    drawer then had to model that noise and sampled mismatched pieces (blobs). Returns (vq, losses)."""
    torch.manual_seed(c.seed)
    vq = VQModel(vq_config(c))
    opt = torch.optim.Adam(vq.parameters(), lr=c.vq_lr)
    data = from_uint8(torch.as_tensor(np.asarray(images)))  # (N, 3, S, S) in [-1, 1]
    targets = torch.as_tensor(codes)                         # (N, g*g)
    grid = vq.cfg.grid
    g = torch.Generator().manual_seed(c.seed)
    losses = {"vq": [], "vq_code": []}
    for step in range(c.vq_steps):
        idx = torch.randint(len(data), (c.vq_batch,), generator=g)
        x, t = data[idx], targets[idx]
        for p in opt.param_groups:
            p["lr"] = c.vq_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / c.vq_steps))
        recon = vq.decoder(vq.post_quant_conv(vq.quantize.entries(t, grid)))  # (B, 3, S, S)
        # objects are a small part of the picture: weigh their pixels (and a rim around them) 5x, or the
        # loss is spent on the flat background
        fg = (x - x[:, :, :1, :1]).abs().amax(1, keepdim=True).gt(0.05).float()
        wgt = 1 + 4 * F.max_pool2d(fg, 5, stride=1, padding=2)
        err = recon - x
        rec = (wgt * (err.abs() + err * err)).mean() / wgt.mean()
        z = F.normalize(vq.quant_conv(vq.encoder(x)), dim=1)                 # (B, D, g, g)
        e = F.normalize(vq.quantize.embedding.weight, dim=-1).detach()        # (K, D)
        logits = torch.einsum("bdhw,kd->bhwk", z, e) * 10                     # cosine / 0.1
        code_loss = F.cross_entropy(logits.reshape(-1, e.shape[0]), t.reshape(-1))
        loss = rec + code_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses["vq"].append(rec.item())
        losses["vq_code"].append(code_loss.item())
        if (step + 1) % max(1, c.vq_steps // 10) == 0:
            log(f"VQ {step + 1}/{c.vq_steps}: recon {np.mean(losses['vq'][-20:]):.4f}, "
                f"code {np.mean(losses['vq_code'][-20:]):.4f}")
    return vq.eval(), losses


def _sequences(tok, items, c, rng):
    """Token sequences of the three tasks for a batch of (meta, plan, codes) items. Returns {"text": (prompts,
    completions), "image": (prompts, completions)}, each padded with its masks; a tenth of the image prompts
    (c.cond_dropout) unconditional."""
    text_p, text_c, img_p, img_c, dropped = [], [], [], [], []
    for meta, plan, codes in items:
        kind = rng.random()
        # reasoning prompts are never drawn from the prompt alone: the drawer, like Janus-Pro's, learns from
        # explicit captions, and what "the color of the sky" means is known to the text side only
        if meta["tag"] == "reasoning" and kind >= 0.8:
            kind = 0.3 + 0.5 * (kind - 0.8) / 0.2
        if kind < 0.3:      # (a) the plan
            text_p.append(tok.encode(chat_prompt(REASONING_TEMPLATE.format(prompt=meta["prompt"]))))
            text_c.append(tok.encode(plan, bos=False) + [tok.eos_id])
        else:               # (b) after the plan, or (c) from the prompt alone
            img_p.append(tok.encode(image_prompt(R.image_prompt_text(meta["prompt"], plan if kind < 0.8 else ""))))
            dropped.append(rng.random() < c.cond_dropout)
            img_c.append(codes)
    out = {}
    if text_p:
        out["text"] = (*R.pad_tokens(text_p, tok.pad_id), *R.pad_tokens(text_c, tok.pad_id, side="right"))
    if img_p:
        ids, mask = R.pad_tokens(img_p, tok.pad_id)
        ids = torch.where(torch.tensor(dropped)[:, None], R.unconditional(ids, mask, tok.pad_id), ids)
        out["image"] = (ids, mask, *R.pad_tokens(img_c, tok.pad_id, side="right"))
    return out


def train_janus(c: PretrainConfig, tok, vq, data, log=print):
    """The tiny Janus on the three-task mix; the log-likelihoods are t2i_r1.completion_logprobs, the same
    function the RL loss uses."""
    torch.manual_seed(c.seed)
    cfg = JanusConfig(vocab_size=tok.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_kv_head=c.n_head,
                      n_embd=c.n_embd, intermediate_size=int(8 * c.n_embd / 3) // 8 * 8,
                      max_position_embeddings=512, image_positions=c.cell_steps > 0, vq=vq.cfg)
    janus = Janus(cfg)
    janus.gen_vision_model.load_state_dict(vq.state_dict())
    janus.gen_vision_model.requires_grad_(False)
    if not c.cell_steps:
        return janus, fit_janus(janus, tok, data, c, log)
    # first without the cell table (Janus builds it at zero; frozen there): a drawer trained with it from the start places objects
    # well but reads their colours from the plan badly (docs/shapes.md); then with it, so it learns where
    janus.gen_pos_embed.requires_grad_(False)
    losses = fit_janus(janus, tok, data, c, log)
    janus.gen_pos_embed.requires_grad_(True)
    cells = replace(c, lm_steps=c.cell_steps, lm_lr=c.cell_lr, seed=c.seed + 1)  # another order of the data
    more = fit_janus(janus, tok, data, cells, log, what="Janus with cells")
    return janus, {k: losses[k] + more[k] for k in losses}


def fit_janus(janus, tok, data, c: PretrainConfig, log=print, what="Janus", autocast=None):
    """c.lm_steps AdamW steps of the three-task mix (_sequences) on the weights of janus that require grad
    (c.lm_lr peak, warm-up then cosine to a tenth; c.lm_batch sequences a step): pretraining, and SFT on a
    base. autocast: a context to compute in (bf16 over float32 weights), or none. Returns the losses; janus
    is left in eval mode."""
    params = [p for p in janus.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.lm_lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng = np.random.default_rng(c.seed + 1)
    losses = {"text": [], "image": []}
    janus.train()
    for step in range(c.lm_steps):
        for p in opt.param_groups:  # warm-up, then cosine to a tenth
            p["lr"] = c.lm_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.45 * (1 + np.cos(np.pi * step / c.lm_steps)))
        batch = [data[i] for i in rng.integers(len(data), size=c.lm_batch)]
        terms = []
        for kind, (ids, mask, completion, completion_mask) in _sequences(tok, batch, c, rng).items():
            with autocast or contextlib.nullcontext():
                logp = R.completion_logprobs(janus, ids, mask, completion, completion_mask, kind)
            nll = -(logp * completion_mask).sum() / completion_mask.sum()
            terms.append(nll * len(ids) / c.lm_batch)
            losses[kind].append(nll.item())
        loss = sum(terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % max(1, c.lm_steps // 20) == 0:
            log(f"{what} step {step + 1}/{c.lm_steps}: nll of plans {np.mean(losses['text'][-20:]):.3f}, "
                f"of images {np.mean(losses['image'][-20:]):.3f}")
    janus.eval()
    return losses


def pretrain(out_dir=PRETRAIN_DIR, c: PretrainConfig = None, log=print):
    """Render scenes, train the VQ, encode the scenes, train the Janus, save everything with save_pretrained
    (config.json + model.safetensors + tokenizer.json + reasoning_prompt.txt). Returns the losses."""
    c = c or PretrainConfig()
    c.check()
    t0 = time.time()
    rng = np.random.default_rng(c.seed)
    log(f"shapes world: pretraining the tiny base into {out_dir} (seed {c.seed})")
    contents = cell_contents(c.image_size)
    if len(contents) > c.codebook_size:
        raise ValueError(f"codebook_size {c.codebook_size} is smaller than the {len(contents)} distinct cells")
    # rendered and tokenised in chunks, so that many scenes cost their codes' memory, not their pixels'; the VQ
    # learns from the first chunk's images (its 109 cell contents are all in any few thousand scenes)
    data, images, codes = [], None, None
    for start in range(0, c.scenes, VQ_SCENES):
        chunk = render_dataset(replace(c, scenes=min(VQ_SCENES, c.scenes - start)), rng)
        chunk_images = np.stack([img for _, _, img in chunk])
        chunk_codes = tokenize(chunk_images, contents)
        if images is None:
            images, codes = chunk_images, chunk_codes
        data += [(meta, plan, cd.tolist()) for (meta, plan, _), cd in zip(chunk, chunk_codes)]
    log(f"{len(data)} scenes rendered and tokenised in {time.time() - t0:.0f}s")
    vq, vq_losses = train_vq(c, images, codes, log)
    with torch.no_grad():  # how often the trained encoder finds the code of a cell
        probe = slice(0, min(len(images), 512))
        encode_acc = float((vq.encode(from_uint8(torch.as_tensor(images[probe]))).numpy() == codes[probe]).mean())
    log(f"VQ: {len(contents)} cell codes, encoder finds {encode_acc:.4f} of them")
    tmp = out_dir.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    make_tokenizer().save(os.path.join(tmp, "tokenizer.json"))
    tok = Tokenizer(os.path.join(tmp, "tokenizer.json"))
    janus, lm_losses = train_janus(c, tok, vq, data, log)
    save_pretrained(janus, tmp, tokenizer=tok)
    with open(os.path.join(tmp, "reasoning_prompt.txt"), "w") as f:
        f.write(REASONING_TEMPLATE + "\n")
    write_json(os.path.join(tmp, "pretrain.json"), {
        "config": c.__dict__, "seconds": round(time.time() - t0, 1), "vq_recon_last": float(np.mean(vq_losses["vq"][-20:])),
        "vq_encode_accuracy": encode_acc, "plan_nll_last": float(np.mean(lm_losses["text"][-20:])),
        "image_nll_last": float(np.mean(lm_losses["image"][-20:]))})
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log(f"shapes world: base saved to {out_dir} in {time.time() - t0:.0f}s")
    return {**vq_losses, **lm_losses}


def ensure_base(path=BASE_DIR):
    """The shapes base folder, pretrained first (and said so) when it is not there yet."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        print(f"no shapes base at {path}: pretraining it now (about 40 minutes on 2 CPU cores)")
        pretrain(path)
    return path


def example_prompts():
    """One held-out test prompt per tag: sample.py's default prompts."""
    first = {}
    for m in prompt_sets()[2]:
        first.setdefault(m["tag"], m)
    return list(first.values())


# -----------------------------------------------------------------------------
# Diagnostics of a base: where its errors come from


def plan_detections(plan, size=64):
    """A plan read as detections: each (colour, shape, place) becomes a point at the centre of its ninth of
    the image, so the GenEval rules can judge the plan itself (its counts, colours and relations)."""
    dets = []
    for color, shape, place in parse_plan(plan):
        k = PLACES.index(place) if place in PLACES else 4
        cy, cx = (k // 3 + 0.5) * size / 3, (k % 3 + 0.5) * size / 3
        dets.append({"class": shape, "color": color, "box": (cx - 0.5, cy - 0.5, cx + 0.5, cy + 0.5), "score": 1.0})
    return dets


def plan_following(plan, detections, size=64, ignore=()):
    """The fraction of a plan's objects that an image shows as planned: each planned (colour, shape, place)
    claims one detected object of the same colour, shape and place (place_of its box; a planned object with no
    place takes any place, after the placed ones have claimed theirs). None for a plan with no object in it.
    Objects drawn beyond the plan do not lower it: the GenEval rows judge those. ignore: attributes ("color",
    "place") that need not match, to tell which of them a drawer gets wrong."""
    def key(color, shape, place):
        return (None if "color" in ignore else color, shape, None if "place" in ignore else place)
    planned = [key(*p) for p in parse_plan(plan)]
    if not planned:
        return None
    drawn = collections.Counter(key(d["color"], d["class"], place_of(d["box"], size)) for d in detections)
    followed = 0
    for color, shape, place in sorted(planned, key=lambda p: p[2] is None):  # placed objects claim first
        match = (color, shape, place) if place is not None else next(
            (k for k in drawn if k[:2] == (color, shape) and drawn[k] > 0), None)
        if match is not None and drawn[match] > 0:
            drawn[match] -= 1
            followed += 1
    return followed / len(planned)


def following_summary(metas, plans, detections, ignore=()):
    """Mean plan-following (ignore: as plan_following's) per tag and over all images whose plan names an
    object: {"per_tag", "overall"}."""
    by_tag = collections.defaultdict(list)
    for m, plan, dets in zip(metas, plans, detections):
        f = plan_following(plan, dets, ignore=ignore)
        if f is not None:
            by_tag[m["tag"]].append(f)
    every = [f for fs in by_tag.values() for f in fs]
    return {"per_tag": {t: float(np.mean(fs)) for t, fs in by_tag.items()},
            "overall": float(np.mean(every)) if every else float("nan")}


@torch.no_grad()
def colour_reading(janus, tok, metas, scenes, batch_size=64):
    """How well the drawer reads colours from a plan, teacher-forced on true scenes with their true plans: at
    each object's first cell in raster order, where its colour is decided, the probability the image head
    gives the planned colour among the codes that draw an object (the conditional distribution, no guidance).
    For a base pretrained here, whose codes are cell_contents' indices. Returns {"per_tag", "overall",
    "by_objects": {number of objects in the scene: mean}}."""
    size = janus.cfg.vq.image_size
    contents = cell_contents(size)
    palette = {v: k for k, v in COLORS.items()}
    groups = np.zeros((janus.cfg.vq.codebook_size, len(COLORS)), np.float32)  # (K, colours): what a code draws
    for i, patch in enumerate(contents[1:], 1):
        pixel = next(tuple(int(v) for v in px) for px in patch.reshape(-1, 3) if tuple(px) != BACKGROUND)
        groups[i, list(COLORS).index(palette[pixel])] = 1
    groups = torch.as_tensor(groups, device=janus.device)
    codes = torch.as_tensor(tokenize(np.stack([render(s) for s in scenes]), contents), device=janus.device)
    cell = size // CELLS
    found = collections.defaultdict(list)  # (tag, objects in the scene) -> probabilities of the planned colour
    for i in range(0, len(scenes), batch_size):
        ids = [tok.encode(image_prompt(R.image_prompt_text(m["prompt"], plan_of(s))))
               for m, s in zip(metas[i:i + batch_size], scenes[i:i + batch_size])]
        prompt, mask = R.pad_tokens(ids, tok.pad_id, janus.device)
        c = codes[i:i + batch_size]                                            # (b, 64)
        x = torch.cat([janus.embed_text(prompt), janus.embed_image(c[:, :-1])], 1)
        h = janus(x, mask=torch.cat([mask, torch.ones_like(c[:, :-1], dtype=torch.bool)], 1))
        mass = janus.image_logits(h[:, prompt.shape[1] - 1:]).softmax(-1) @ groups  # (b, 64, colours)
        for b, (m, scene) in enumerate(zip(metas[i:i + batch_size], scenes[i:i + batch_size])):
            for o in scene.objects:
                x0, y0, x1, y1 = (v // cell for v in o.box)
                first = min(r * CELLS + q for r in range(y0, y1) for q in range(x0, x1) if c[b, r * CELLS + q] != 0)
                p = mass[b, first]
                found[m["tag"], len(scene.objects)].append(float(p[list(COLORS).index(o.color)] / p.sum()))
    def mean(pick):
        vals = [v for k, vs in found.items() if pick(k) for v in vs]
        return float(np.mean(vals)) if vals else float("nan")
    return {"per_tag": {t: mean(lambda k: k[0] == t) for t in sorted({k[0] for k in found})},
            "overall": mean(lambda k: True),
            "by_objects": {n: mean(lambda k: k[1] == n) for n in sorted({k[1] for k in found})}}


def draw_from_plans(janus, tok, metas, plans, settings, seed=0, desc="image tokens"):
    """One image per (prompt, given plan), drawn by janus at settings' guidance weight, in batches of 64 with
    one progress line: uint8 (len(metas), S, S, 3). The drawer alone, with the plan written by someone else."""
    import sample  # sample.py imports this file: imported here, not at the top
    g = torch.Generator(device=janus.device).manual_seed(seed)
    ids = [tok.encode(image_prompt(R.image_prompt_text(m["prompt"], plan))) for m, plan in zip(metas, plans)]
    bar = sample.Progress(-(-len(ids) // 64) * janus.cfg.image_tokens, desc)
    codes = torch.cat([R.generate_images(janus, *R.pad_tokens(ids[i:i + 64], tok.pad_id, janus.device),
                                         pad_id=tok.pad_id, cfg_weight=settings.cfg_weight, generator=g,
                                         temperature=settings.temperature, top_k=settings.top_k,
                                         progress=sample.stage_progress(bar, None))
                       for i in range(0, len(ids), 64)])
    return R.decode_images(janus, codes)


def diagnose(ckpt, items, n=16, seed=0, cfg_weight=None, log=print, device=None, dtype=None):
    """Strict GenEval per tag of: true scenes rendered (1.0 by construction), the same scenes through the
    base's VQ (the VQ ceiling), the base's images from plans written from those true scenes (the drawer's
    ceiling when every plan is right), the base's own plans judged as text (plan accuracy), and the base's
    images from its own plans and from the prompt alone, all with guidance weight cfg_weight (unset: the
    checkpoint's default, as train.py and sample.py sample), and how closely the images follow their plans
    (plan_following) for the true plans and the base's own. device, dtype: as checkpoints.from_pretrained's.
    Returns {row name: summary with "per_tag" and "overall"}. Progress lines on stderr inside the rows that
    sample."""
    import sample  # sample.py imports this file: imported here, not at the top
    janus, tok = from_pretrained(ckpt, device=device, dtype=dtype), Tokenizer.from_pretrained(ckpt)
    settings = R.SamplingConfig(cfg_weight=cfg_weight).resolved(ckpt)  # as train.py and sample.py sample
    reasoning = R.load_reasoning_prompt(ckpt=ckpt)
    rng = np.random.default_rng(seed)
    metas = [m for m in items for _ in range(n)]
    scenes = [sample_scene(m, rng) for m in metas]
    rows = {}

    def show(name, what):
        log(f"{name:<28} " + " ".join(f"{t} {rows[name]['per_tag'][t]:.3f}" for t in TAGS if t in rows[name]["per_tag"])
            + f" | {what} {rows[name]['overall']:.3f}")

    def judge(name, detections):
        rows[name] = rewards.geneval_summary([(m["tag"], rewards.geneval_score(d, m)["strict"])
                                              for m, d in zip(metas, detections)])
        show(name, "GenEval overall")

    def following(name, plans, detections, ignore=()):
        rows[name] = following_summary(metas, plans, detections, ignore)
        show(name, "all objects")
    clean = np.stack([render(s) for s in scenes])
    judge("true scenes", detect_batch(clean))
    with torch.no_grad():
        codes = torch.cat([janus.vq.encode(from_uint8(torch.as_tensor(clean[i:i + 256], device=janus.device)))
                           for i in range(0, len(clean), 256)])
    judge("VQ ceiling", detect_batch(R.decode_images(janus, codes)))
    drawn = detect_batch(draw_from_plans(janus, tok, metas, [plan_of(s) for s in scenes], settings, seed,
                                         "drawn from true plans: image tokens"))
    judge("drawn from true plans", drawn)
    following("plan-following, true plans", [plan_of(s) for s in scenes], drawn)
    # which attribute the drawer misses: the same, with the colour or the place left free
    following("plan-following, any colour", [plan_of(s) for s in scenes], drawn, ("color",))
    following("plan-following, any place", [plan_of(s) for s in scenes], drawn, ("place",))
    rows["planned colour, first cells"] = colour_reading(janus, tok, metas, scenes)
    show("planned colour, first cells", "all objects")
    log(f"{'':<28} by objects in the scene: " + " ".join(
        f"{k} {v:.3f}" for k, v in rows["planned colour, first cells"]["by_objects"].items()))
    for levels in ("both", "token"):
        row = "own plans" if levels == "both" else "the prompt alone"
        records, images = sample.generate(janus, tok, items, settings, n=n, batch_size=max(1, 64 // n), seed=seed + 1,
                                          levels=levels, reasoning_template=reasoning, desc=f"{row}: image tokens")
        if levels == "both":
            judge("own plans, as text", [plan_detections(r["plan"]) for r in records])
        drawn = detect_batch(images)
        judge(f"drawn from {row}", drawn)
        if levels == "both":
            following("plan-following, own plans", [r["plan"] for r in records], drawn)
    return rows


# -----------------------------------------------------------------------------
# The ablation report: runs of train.py grouped by level, mean and spread over their seeds


def _eval_summary(run, split, which):
    """(path, summary) of a run's first ("base") or last evaluation on split, from the summaries train.py
    writes into run/eval/."""
    folder = os.path.join(run, "eval")
    files = sorted(f for f in os.listdir(folder) if f.startswith(split + "_")) if os.path.isdir(folder) else []
    if not files:
        raise FileNotFoundError(f"{folder} holds no {split} evaluation: is {run} a finished train.py run?")
    path = os.path.join(folder, files[0] if which == "base" else files[-1])
    if which == "final":  # a run still going, or cut short, is not its final result
        steps, last = read_json(os.path.join(run, "config.json")).get("steps"), int(files[-1][len(split) + 1:-5])
        if steps is not None and last < steps:
            raise ValueError(f"{run} has not finished: its last {split} evaluation is at step {last} of {steps} "
                             f"(still running, or stopped early: `train.py --resume` finishes it)")
    return path, read_json(path)


def _scores(run, split, which):
    """Per-tag strict accuracy and GenEval overall of a run's first ("base") or last evaluation on split."""
    return _geneval_scores(run, *_eval_summary(run, split, which))


def _geneval_scores(run, path, summary):
    """Per-tag strict accuracy and GenEval overall of one evaluation summary (read from path)."""
    g = next((v for k, v in summary.items() if k.startswith("geneval_")), None)
    if g is None:
        raise ValueError(f"{path} holds no GenEval accuracy: {run} was scored by no rule reward (shapes, geneval)")
    return {**g["per_tag"], "overall": g["overall"]}


# what may differ between the runs of one table: the seed (the spread is over it), the level (the rows), and
# how each run was laid out on its machine; any other setting would pool unlike runs as seeds of one row
POOLED_OVER = {"seed", "levels", "out", "resume", "overwrite", "resumes", "device", "compile", "threads", "micro_batch",
               "grad_checkpointing", "fsdp", "sample_every", "save_every", "eval_every"}


def check_comparable(configs: dict):
    """{run: its config.json} -> ValueError naming every setting other than POOLED_OVER that differs."""
    def flat(c):
        return {**{k: v for k, v in c.items() if k != "sampling"},
                **{f"sampling.{k}": v for k, v in (c.get("sampling") or {}).items()}}
    flats = {run: flat(c) for run, c in configs.items()}
    names = sorted({k for c in flats.values() for k in c} - POOLED_OVER)
    differ = [k for k in names if len({json.dumps(c.get(k)) for c in flats.values()}) > 1]
    if differ:
        raise ValueError("these runs differ in more than the seed and the level, so their rows would pool unlike "
                         "runs: " + "; ".join(f"--{k.removeprefix('sampling.').replace('_', '-')} ("
                                              + ", ".join(f"{c.get(k)!r} in {run}" for run, c in flats.items()) + ")"
                                              for k in differ))


def report(runs, split="test"):
    """Markdown tables of the paper's ablation from finished train.py run folders: per tag, the mean over the
    runs of each level (their seeds) +- the sample standard deviation. The base rows are the runs' own step-0
    evaluations: with plans for semantic and both, without for token (as each run samples); a semantic and a
    both run of one seed evaluate the same base with the same draws, so each seed counts once there."""
    groups, seeds, configs = {}, {}, {}
    for run in runs:
        if not os.path.isfile(os.path.join(run, "config.json")):
            raise FileNotFoundError(f"{run} is not a train.py run folder (no config.json)")
        config = configs[run] = read_json(os.path.join(run, "config.json"))
        groups.setdefault(config["levels"], []).append(run)
        seeds[run] = config.get("seed", run)
    check_comparable(configs)
    rows = []
    with_plan = list({seeds[r]: r for r in groups.get("semantic", []) + groups.get("both", [])}.values())
    if with_plan:
        rows.append(("base, with its plans", [_scores(r, split, "base") for r in with_plan]))
    if groups.get("token"):
        rows.append(("base, no plan", [_scores(r, split, "base") for r in groups["token"]]))
    final = {levels: [_scores(r, split, "final") for r in rs] for levels, rs in groups.items()}
    for levels, name in (("semantic", "semantic level only"), ("token", "token level only"),
                         ("both", "both levels (T2I-R1)")):
        if levels in final:
            n = len(final[levels])
            rows.append((f"{name}, {n} seed{'s' if n > 1 else ''}", final[levels]))
    cols = [t for t in GENEVAL_TAGS + ("overall", "reasoning") if any(t in s for _, ss in rows for s in ss)]
    def cell(values):
        v = np.array(values)
        return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"
    head = "| | " + " | ".join("GenEval overall" if c == "overall" else c for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + name + " | " + " | ".join(cell([s[c] for s in ss]) for c in cols) + " |" for name, ss in rows]
    if {"both", "token", "semantic"} <= set(final):
        mean = {k: {c: np.mean([s[c] for s in ss]) for c in cols} for k, ss in final.items()}
        lines += ["", "What each level adds (difference of the means):", "", head, lines[1]]
        lines += ["| semantic level (both - token) | " + " | ".join(f"{mean['both'][c] - mean['token'][c]:+.3f}"
                                                                     for c in cols) + " |",
                  "| token level (both - semantic) | " + " | ".join(f"{mean['both'][c] - mean['semantic'][c]:+.3f}"
                                                                    for c in cols) + " |"]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Experiment: diversity over what a prompt leaves open (issue 21; docs/experiments.md has the commands)
#
# A prompt fixes some attributes of its objects and leaves the others open: the place and size of every
# object, and the colour of an object whose colour it does not name. A scene is described by its open
# attributes only, a slot per asked object, and the scenes of one prompt by the Vendi score of those
# descriptors (Friedman and Dieng, 2023): exp of the entropy of the eigenvalues of K / n, K[i, j] the fraction
# of open attributes scenes i and j share. It is 1 when all n scenes are alike and n when no two share an
# open attribute: the number of effectively different scenes. Unlike an entropy per attribute, it judges
# scenes whole: 16 scenes that always pair the same place with the same colour are less diverse than 16
# that mix them, though each attribute on its own is spread alike.

OPEN_ATTRIBUTES = ("place", "side", "color")  # side: the object's width in grid cells
PLAN_ATTRIBUTES = ("place", "color")          # a plan names no size
DIVERSITY_TAGS = ("single_object", "two_object", "colors")  # the table: what these prompts leave open is most


def open_descriptor(objects, meta, attributes=OPEN_ATTRIBUTES):
    """The attributes `meta` leaves open, of the objects it asks for, as a tuple: per include clause and per
    object it asks, the object's `attributes`, colour only where the clause names none. objects: (shape,
    colour, place, side) tuples, best first (detections by score, a plan in its order); a clause takes the
    first `count` of its shape, in reading order; an object that is not there has None for each attribute."""
    where = {"color": 1, "place": 2, "side": 3}
    out = []
    for clause in meta["include"]:
        mine = [o for o in objects if o[0] == clause["class"]][:clause["count"]]
        mine = sorted(mine, key=lambda o: PLACES.index(o[2]) if o[2] in PLACES else len(PLACES))
        for o in mine + [None] * (clause["count"] - len(mine)):
            out += [None if o is None else o[where[a]] for a in attributes if a != "color" or "color" not in clause]
    return tuple(out)


def vendi_score(descriptors):
    """Vendi score of n equal-length descriptors (tuples of attribute values), with the fraction of equal
    attributes as the similarity: from 1 (all alike) to n (no two share a value)."""
    n, width = len(descriptors), len(descriptors[0])
    if width == 0:
        return 1.0
    K = np.array([[sum(a == b for a, b in zip(x, y)) / width for y in descriptors] for x in descriptors])  # (n, n)
    eig = np.linalg.eigvalsh(K / n)
    eig = eig[eig > 1e-12]  # K is positive semi-definite (a sum of one-hot Gram matrices): the rest is rounding
    return float(np.exp(-(eig * np.log(eig)).sum()))


def detected_objects(detections, size):
    """Detections -> (shape, colour, place, side in cells) tuples, best first, as open_descriptor reads them."""
    return [(d["class"], d["color"], place_of(d["box"], size), round((d["box"][2] - d["box"][0]) * CELLS / size))
            for d in detections]


def planned_objects(plan):
    return [(shape, color, place, None) for color, shape, place in parse_plan(plan)]


def diversity_summary(records, images, detections, group_size):
    """Scene and plan diversity (Vendi scores of open_descriptor) of each group of group_size consecutive
    records (one prompt's samples, as sample.generate orders them) with GenEval metadata: {"scene_diversity":
    {"per_tag", "overall"}, "plan_diversity": the same, when every record has a plan}; overall is the mean
    over prompts. records: dicts with "metadata" and "plan"; images: their images (for the size)."""
    size = int(np.asarray(images[0]).shape[0])
    scene, plan = collections.defaultdict(list), collections.defaultdict(list)
    for g in range(0, len(records) - group_size + 1, group_size):
        meta, group = records[g]["metadata"], records[g:g + group_size]
        if not rewards.checkable(meta):
            continue
        tag = meta.get("tag", "untagged")
        scene[tag].append(vendi_score([open_descriptor(detected_objects(d, size), meta)
                                       for d in detections[g:g + group_size]]))
        if all(r.get("plan") for r in group):
            plan[tag].append(vendi_score([open_descriptor(planned_objects(r["plan"]), meta, PLAN_ATTRIBUTES)
                                          for r in group]))
    out = {}
    for name, by_tag in (("scene_diversity", scene), ("plan_diversity", plan)):
        if by_tag:
            out[name] = {"per_tag": {t: float(np.mean(v)) for t, v in by_tag.items()},
                         "overall": float(np.mean([x for v in by_tag.values() for x in v]))}
    return out


# -----------------------------------------------------------------------------
# Experiment: prompt enrichment against joint training. The base draws from (a) its own zero-shot plans,
# (b) the plans of a perfect external planner; (c), T2I-R1's own images, are its train.py runs' evaluations.
# (b) - (a) is what a better plan alone buys; (c) - (b) what a drawer trained to use the plans adds.


def perfect_plans(metas, rng, size=64):
    """The perfect external planner: for each prompt, the plan of a random true scene that satisfies it."""
    rng = np.random.default_rng(rng)
    return [plan_of(sample_scene(m, rng, size=size)) for m in metas]


def enrich(ckpt, items, out, n=16, seeds=(0, 1, 2), split="test", device=None, dtype=None, log=print):
    """Evaluate the base `ckpt` on items drawing from its own plans and from perfect plans, n images per prompt,
    once per seed. Each (row, seed) is written as a run folder, out/{own-plans,perfect-plans}/s{seed} with
    config.json and eval/{split}_00000.json in train.py's format, so `compare` tabulates them beside runs.
    Returns the folders."""
    import sample  # sample.py imports this file: imported here, not at the top
    janus, tok = from_pretrained(ckpt, device=device, dtype=dtype), Tokenizer.from_pretrained(ckpt)
    settings = R.SamplingConfig().resolved(ckpt)  # as train.py's evaluation samples
    reasoning = R.load_reasoning_prompt(ckpt=ckpt)
    scorer = rewards.RewardEnsemble({"shapes": 1.0}, {})
    metas = [m for m in items for _ in range(n)]
    folders = []
    for seed in seeds:
        rows = {"own-plans": sample.generate(janus, tok, items, settings, n=n, batch_size=max(1, 64 // n),
                                             seed=seed + 1, levels="both", reasoning_template=reasoning,
                                             desc=f"own plans, seed {seed}: image tokens")}
        plans = perfect_plans(metas, seed, janus.cfg.vq.image_size)
        rows["perfect-plans"] = ([{"prompt": m["prompt"], "plan": p, "metadata": m} for m, p in zip(metas, plans)],
                                 draw_from_plans(janus, tok, metas, plans, settings, seed + 1,
                                                 f"perfect plans, seed {seed}: image tokens"))
        for row, (records, images) in rows.items():
            folder = os.path.join(out, row, f"s{seed}")
            summary = sample.score(scorer, images, records, group_size=n, desc=f"{row}, seed {seed}: scoring")
            os.makedirs(os.path.join(folder, "eval"), exist_ok=True)
            write_json(os.path.join(folder, "eval", f"{split}_00000.json"), summary)
            write_json(os.path.join(folder, "config.json"), {"seed": seed, "ckpt": ckpt, "plans": row, "eval_n": n})
            folders.append(folder)
            log(f"{row}, seed {seed}: GenEval overall {summary['geneval_shapes']['overall']:.3f}")
    return folders


# -----------------------------------------------------------------------------
# Experiment: SFT against RL against SFT-then-RL. SFT fine-tunes a base on true (prompt, plan, image)
# examples of the training prompts with the pretraining's own mix and loss (fit_janus), on the weights RL
# trains, and saves a base in the same layout, so `train.py --ckpt` starts RL from it.


@dataclass
class SFTConfig:
    seed: int = 0              # seed of the scenes and the order of the data
    scenes: int = setting(10000, low=1)  # true examples: random scenes of the training prompts, rendered
    # about the default RL run's compute: 200 steps x 64 samples, each a plan and an image sequence trained,
    # is 25,600 sequences; SFT trains one sequence (a plan or an image) per example of a batch
    steps: int = setting(800, low=1)     # optimizer steps
    batch: int = setting(32, low=1)      # sequences per step
    lr: float = setting(2e-4, above=0)   # peak learning rate (AdamW), warm-up then cosine to a tenth (base: 2e-4)
    cond_dropout: float = 0.1  # fraction of image prompts replaced by pad tokens, as in pretraining
    dtype: str = setting("float32", choices=("float32", "bfloat16"))  # autocast over the float32 weights


def sft(base, out, c: SFTConfig = None, log=print):
    """Fine-tune the base folder on c.scenes true examples of the train split; save out/ in the base's layout
    (checkpoints.save_like: the trained tensors replaced, every other file and tensor the base's) with sft.json
    (settings and losses). The VQ and the image embedding and head stay frozen, as in RL. Runs on the CPU,
    as pretraining does. Returns the losses."""
    c = c or SFTConfig()
    t0 = time.time()
    janus, tok = from_pretrained(base), Tokenizer.from_pretrained(base)
    for part in janus.image_modules():
        part.requires_grad_(False)
    mix = PretrainConfig(seed=c.seed, scenes=c.scenes, image_size=janus.cfg.vq.image_size, lm_steps=c.steps,
                         lm_batch=c.batch, lm_lr=c.lr, cond_dropout=c.cond_dropout)
    scenes = render_dataset(mix, np.random.default_rng(c.seed), prompts=prompt_sets()[0])
    images = np.stack([img for _, _, img in scenes])
    with torch.no_grad():  # the base's own VQ codes of the true images: what its drawer writes
        codes = torch.cat([janus.vq.encode(from_uint8(torch.as_tensor(images[i:i + 256])))
                           for i in range(0, len(images), 256)])
    data = [(meta, plan, cd.tolist()) for (meta, plan, _), cd in zip(scenes, codes)]
    log(f"SFT of {base} on {len(data)} true examples of the training prompts: {c.steps} steps of {c.batch}")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if c.dtype == "bfloat16" else None
    losses = fit_janus(janus, tok, data, mix, log, what="SFT", autocast=autocast)
    trained = {n for n, p in janus.named_parameters() if p.requires_grad}
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_like(base, tmp, {k: v for k, v in janus.export_state().items() if k in trained})
    write_json(os.path.join(tmp, "sft.json"), {
        "base": os.path.abspath(base), "config": c.__dict__, "seconds": round(time.time() - t0, 1),
        **{f"{k}_nll_{end}": float(np.mean(v[sl])) for k, v in (("plan", losses["text"]), ("image", losses["image"]))
           for end, sl in (("first", slice(0, 20)), ("last", slice(-20, None)))}})
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"SFT: saved to {out} in {time.time() - t0:.0f}s")
    return losses


# -----------------------------------------------------------------------------
# The experiments' tables: named rows of run folders, each row's runs pooled as seeds


def parse_row(spec):
    """'NAME=RUN[,RUN...]' -> (name, [(run, which)]): RUN may be a glob, and ends in @base for the run's first
    (step-0) evaluation instead of its last. FileNotFoundError names a pattern that matches no run folder."""
    name, sep, runs = spec.partition("=")
    if not sep or not name.strip() or not runs.strip():
        raise ValueError(f"a row is NAME=RUN[,RUN...] (RUN a folder or glob, @base for its step-0 evaluation), "
                         f"got {spec!r}")
    out = []
    for item in runs.split(","):
        which = "base" if item.endswith("@base") else "final"
        pattern = os.path.expanduser(item.removesuffix("@base"))
        found = sorted(p for p in glob.glob(pattern) if os.path.isfile(os.path.join(p, "config.json")))
        if not found:
            raise FileNotFoundError(f"row {name!r}: {pattern} matches no run folder (none with a config.json)")
        out += [(run, which) for run in found]
    return name.strip(), out


def _row_values(entries, split):
    """Per run of a row: accuracy per tag and overall, the scene and plan diversity of each of DIVERSITY_TAGS
    ("scene_diversity:colors") and their mean ("scene_diversity"), NaN where the summary has none."""
    values = []
    for run, which in entries:
        path, summary = _eval_summary(run, split, which)
        v = _geneval_scores(run, path, summary)
        for key in ("scene_diversity", "plan_diversity"):
            per_tag = summary.get(key, {}).get("per_tag", {})
            v.update({f"{key}:{t}": per_tag.get(t, float("nan")) for t in DIVERSITY_TAGS})
            v[key] = float(np.mean([per_tag[t] for t in DIVERSITY_TAGS if t in per_tag])) if per_tag else float("nan")
        values.append(v)
    return values


def compare(specs, split="test", spread=False, per_tag=False):
    """A markdown table of named rows of runs (parse_row): strict GenEval accuracy per tag and overall, scene
    and plan diversity (Vendi score of 16 samples, mean over DIVERSITY_TAGS), each the mean over the row's
    runs +- their sample standard deviation. The runs of a row must differ only in the seed and how they ran
    (check_comparable, the starting checkpoint allowed to differ: SFT-then-RL starts each seed from its own
    SFT). spread: below it, each row's mean relative change of the six GenEval tags against the first row,
    as the rebuttal reports reward weights. per_tag: the diversities of each of DIVERSITY_TAGS, not their mean."""
    rows = []
    for spec in specs:
        name, entries = parse_row(spec)
        configs = {run: {k: v for k, v in read_json(os.path.join(run, "config.json")).items() if k != "ckpt"}
                   for run, _ in entries}
        check_comparable(configs)
        rows.append((name, _row_values(entries, split)))
    cols = [t for t in GENEVAL_TAGS + ("overall", "reasoning") if any(t in v for _, vs in rows for v in vs)]
    cols += [f"{k}:{t}" for k in ("scene_diversity", "plan_diversity") for t in DIVERSITY_TAGS] if per_tag \
        else ["scene_diversity", "plan_diversity"]
    def cell(values):
        v = np.array([x for x in values if not np.isnan(x)])
        return "–" if not len(v) else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"
    names = {"overall": "GenEval overall", "scene_diversity": "image diversity", "plan_diversity": "plan diversity",
             **{f"{k}:{t}": f"{k.split('_')[0].replace('scene', 'image')} diversity, {t}"
                for k in ("scene_diversity", "plan_diversity") for t in DIVERSITY_TAGS}}
    lines = ["| | runs | " + " | ".join(names.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    lines += [f"| {name} | {len(vs)} | " + " | ".join(cell([v.get(c, float('nan')) for v in vs]) for c in cols) + " |"
              for name, vs in rows]
    if spread and len(rows) > 1:
        tags = [t for t in GENEVAL_TAGS if t in cols]
        ref = {t: np.mean([v[t] for v in rows[0][1]]) for t in tags}
        moves = [(name, np.mean([abs(np.mean([v[t] for v in vs]) - ref[t]) / ref[t] for t in tags if ref[t] > 0]))
                 for name, vs in rows[1:]]
        lines += ["", f"Mean relative change of the {len(tags)} GenEval tags against {rows[0][0]!r}:"]
        lines += [f"- {name}: {100 * m:.1f}%" for name, m in moves]
        lines += [f"- average over the rows: {100 * np.mean([m for _, m in moves]):.1f}%"]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Command line

def build_parser():
    p = argparse.ArgumentParser(prog="shapes.py", formatter_class=HelpFormatter,
                                description="The shapes world: prompt sets, the tiny pretrained base, its "
                                            "experiments.")
    sub = p.add_subparsers(dest="cmd")
    add = functools.partial(sub.add_parser, formatter_class=HelpFormatter)
    sp = add("prompts", help="write train.jsonl, val.jsonl and test.jsonl")
    sp.add_argument("out_dir", nargs="?", default="data/shapes", help="folder for the three files (default: data/shapes)")
    pp = add("pretrain", help="pretrain the tiny base (the default command)")
    pp.add_argument("--out", default=PRETRAIN_DIR, help="folder of the base (the shipped one is in assets/)")
    config_flags(pp, PretrainConfig)
    def base_flags(sp):  # what diagnose and enrich sample from, and where
        sp.add_argument("--ckpt", default=BASE_DIR, help="the base's folder")
        sp.add_argument("--split", default="test", choices=["train", "val", "test"], help="which prompts")
        sp.add_argument("--n", type=int, default=16, help="images per prompt")
        sp.add_argument("--device", default=None, help="cuda, cpu, ... (unset: CUDA when present)")
        sp.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights' precision (unset: bfloat16 on GPU, float32 on CPU)")
    dp = add("diagnose", help="VQ ceiling, true-plan ceiling and plan accuracy of a base")
    base_flags(dp)
    dp.add_argument("--cfg", dest="cfg_weight", type=float, default=None, help="guidance weight (unset: the checkpoint's default)")
    rp = add("report", help="the ablation table of finished train.py runs (mean and spread over seeds)")
    rp.add_argument("runs", nargs="+", help="run folders (train.py --out) (default: none, name at least one)")
    rp.add_argument("--split", default="test", choices=["test", "val"], help="which evaluation to tabulate")
    # the issue 21 experiments (docs/experiments.md)
    sp = add("sft", help="fine-tune a base on true (prompt, plan, image) examples of the training prompts")
    sp.add_argument("--base", default=BASE_DIR, help="the base's folder")
    sp.add_argument("--out", required=True, help="folder of the fine-tuned base (train.py --ckpt OUT starts RL from "
                                                         "it) (default: none, required)")
    config_flags(sp, SFTConfig)
    ep = add("enrich", help="the base drawing from its own plans and from a perfect planner's, as run folders")
    base_flags(ep)
    ep.add_argument("--out", required=True, help="folder for the rows' run folders (own-plans/s*, "
                                                         "perfect-plans/s*) (default: none, required)")
    ep.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one evaluation per seed")
    ep.add_argument("--limit", type=int, default=None, help="only the first N prompts (smoke tests)")
    cp = add("compare", help="an experiment's table: named rows of run folders, each row's runs as seeds")
    cp.add_argument("rows", nargs="+", help="NAME=RUN[,RUN...]: RUN a folder or glob, @base for its step-0 evaluation "
                                            "(default: none, name at least one)")
    cp.add_argument("--split", default="test", choices=["test", "val"], help="which evaluation to tabulate")
    cp.add_argument("--spread", action="store_true", help="each row's mean relative change against the first row")
    cp.add_argument("--per-tag", action="store_true", help="diversity of each of single_object, two_object and "
                                                           "colors, not their mean")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv if argv is not None else (None if len(sys.argv) > 1 else ["pretrain"]))
    try:  # bad input is a command-line error, found before any model is loaded
        if args.cmd == "diagnose":
            check_settings(R.SamplingConfig(cfg_weight=args.cfg_weight))
            load_config(args.ckpt)
            device = default_device(args.device)
        if args.cmd == "enrich":
            load_config(args.ckpt)
            device = default_device(args.device)
            if args.n < 2:
                raise ValueError(f"--n must be at least 2 (diversity compares a prompt's images), got {args.n}")
        if args.cmd == "pretrain":
            PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)}).check()
        if args.cmd == "sft":
            load_config(args.base)
            check_settings(SFTConfig(**{f.name: getattr(args, f.name) for f in fields(SFTConfig)}))
        table = report(args.runs, args.split) if args.cmd == "report" else None
        table = compare(args.rows, args.split, args.spread, args.per_tag) if args.cmd == "compare" else table
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    if args.cmd == "prompts":
        for path in write_prompt_sets(args.out_dir):
            print("wrote", path)
    elif args.cmd == "diagnose":
        diagnose(args.ckpt, dict(zip(("train", "val", "test"), prompt_sets()))[args.split], args.n,
                 cfg_weight=args.cfg_weight, device=device, dtype=args.dtype and getattr(torch, args.dtype))
    elif args.cmd in ("report", "compare"):
        print(table)
    elif args.cmd == "sft":
        sft(args.base, args.out, SFTConfig(**{f.name: getattr(args, f.name) for f in fields(SFTConfig)}))
    elif args.cmd == "enrich":
        items = dict(zip(("train", "val", "test"), prompt_sets()))[args.split][:args.limit]
        enrich(args.ckpt, items, args.out, args.n, args.seeds, args.split, device,
               args.dtype and getattr(torch, args.dtype))
    else:
        pretrain(args.out, PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)}))


if __name__ == "__main__":
    main()
