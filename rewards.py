"""Rewards for T2I-R1: the reward interface, the GenEval and T2I-R1 rules, the prompt-file reader, the ensemble.

The networks the rewards run (CLIP, OWL-ViT, GIT, their tokenizers and loaders) are in reward_models.py.
Top to bottom:
  1. The GenEval rule engine (strict pass/fail as GenEval computes it, plus a dense score for RL),
     T2I-R1's prompt file read as GenEval metadata where its fields allow, and T2I-R1's own rules read from
     its released reward_git.py and reward_gdino.py (GIT questions; detection scores and position rule).
  2. Rewards, all called as `reward(images, metadata) -> (scores (B,) float32, info dict of per-image lists)`:
     clip, pickscore, hps, aesthetic, geneval, git, t2i-r1-detect, and shapes (the shapes world's detector +
     the GenEval rules, in shapes.py; `reward_class` finds it).
  3. Selection and weights from the command line (and the t2i-r1 preset), the reward ensemble, the weighted
     sum, evaluation extras (diversity). `--reward-combine group` normalises each reward within its group
     before the sum; that happens in the training step (train.py), with the advantages' normalisation.

Where this departs from the reference code, and why:
  - geneval: GenEval detects with Mask2Former; we use OWL-ViT (open vocabulary, torch-only, 613 MB).
    OWL-ViT has no masks, so colour is classified on the box crop without greying the background
    (GenEval's own code path when it has no mask). OWL-ViT's post-processing has no NMS; we add
    class-wise NMS at IoU 0.5. See GenEvalConfig for the score threshold.
  - The rule rewards (geneval, shapes) abstain on a prompt without GenEval metadata: score 0, marked not
    checked (see RuleReward); GenEval has no such prompts, and T2I-R1's GroundingDINO reward scores them by
    object presence.
  - t2i-r1-detect: T2I-R1's GroundingDINO rules on OWL-ViT boxes (a query per object, threshold 0.1, NMS on
    every row); where its code looks wrong ("above" and "on top of" never get position credit, every pair
    is "near", a spatial row naming one object twice scores 0, its counting NMS reads (cx, cy, w, h) boxes as
    corners, a noun of three or more words is never found) T2IR1DetectConfig.as_released keeps it, the
    default does what it means (see t2i_r1_position, t2i_r1_nms). git: an empty attr_nouns list falls back to
    the nouns.
  - The networks' own departures (resizing, text normalisation, HPS padding) are listed in reward_models.py.
"""

import collections
import importlib
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import read_tensors
from settings import default_device
from reward_models import (CLIPTokenizer, WordPieceTokenizer, as_rgb_list, box_iou, clip_preprocess, git_config_from_hf,
                           git_preprocessing, hps_preprocess, load_clip, load_git, load_owlvit, load_weights, nms,
                           owlvit_preprocess, read_config, read_json_object)

# -----------------------------------------------------------------------------------------------------
# 1. GenEval rules
#
# Detection: {"class": str, "box": (x0, y0, x1, y1) pixels, "score": float, "color": str or None}
# Metadata:  {"tag": ..., "prompt": ..., "include": [{"class", "count", "color"?, "position"?: [relation, index]}],
#             "exclude": [{"class", "count"}]?}; y grows downward.

GENEVAL_COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
GENEVAL_COLOR_TEMPLATES = ["a photo of a {c} {o}", "a photo of a {c}-colored {o}", "a photo of a {c} object"]


GENEVAL_RELATIONS = ("left of", "right of", "above", "below")


def check_geneval_metadata(m) -> None:
    """Raise ValueError naming the field when m is not GenEval metadata the rules can read: include clauses
    with a class, a count >= 1, an optional colour and an optional [relation, index of an earlier include
    clause]; optional exclude clauses with a class and a count."""
    def count_ok(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    include, exclude = m.get("include"), m.get("exclude", [])
    if not isinstance(include, list) or not include:
        raise ValueError(f"'include' must be a non-empty list of clauses, got {include!r:.80}")
    if not isinstance(exclude, list):
        raise ValueError(f"'exclude' must be a list of clauses, got {exclude!r:.80}")
    for part, clauses in (("include", include), ("exclude", exclude)):
        for i, c in enumerate(clauses):
            where = f"{part}[{i}]"
            if not isinstance(c, dict):
                raise ValueError(f"{where} must be a dict, got {c!r:.80}")
            if not isinstance(c.get("class"), str) or not c["class"].strip():
                raise ValueError(f"{where} needs a 'class' (a non-empty string), got {c.get('class')!r:.80}")
            if not count_ok(c.get("count")):
                raise ValueError(f"{where} needs a 'count' (an integer >= 1), got {c.get('count')!r:.80}")
            if "color" in c and not isinstance(c["color"], str):
                raise ValueError(f"{where}: 'color' must be a string, got {c['color']!r:.80}")
            if "position" in c:
                pos = c["position"]
                ok = (part == "include" and isinstance(pos, list) and len(pos) == 2 and pos[0] in GENEVAL_RELATIONS
                      and isinstance(pos[1], int) and not isinstance(pos[1], bool) and 0 <= pos[1] < i)
                if not ok:  # geneval_score places a clause relative to one it has already matched
                    raise ValueError(f"{where}: 'position' must be [relation, index of an earlier include clause] "
                                     f"with relation one of {', '.join(GENEVAL_RELATIONS)}, got {pos!r:.80}")


def relative_position(box_a, box_b, shrink=0.1):
    """Relations of A to B as GenEval computes them -> subset of {"left of", "right of", "above", "below"}.

    offset = centre(A) - centre(B); per axis it shrinks towards 0 by shrink * (size of A + size of B) on that
    axis (clamped at 0, sign kept); a shrunk offset of ~0 means no relation; otherwise the shrunk offset is
    divided by the length of the original offset and compared with +-0.5."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    sizes = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    shrunk = np.maximum(np.abs(offset) - shrink * sizes, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    return {r for r, hit in [("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                             ("below", dy > 0.5)] if hit}


def geneval_score(detections, metadata, with_parts=False):
    """Strict GenEval verdict and a dense score in [0, 1] for one image -> {"strict", "dense", "reasons"}.

    Strict (GenEval): include clauses are ANDed. A clause takes the `count` most confident detections of its
    class and fails with fewer; with "color", at least `count` of them must have that colour; with
    "position" [relation, i], every one of them must stand in `relation` to every object matched by include
    clause i, and fails if clause i failed. An exclude clause fails once its class has `count` detections
    (GenEval's counting prompts exclude count + 1, which makes counts exact).

    Dense: per include clause with n = count, found = all detections of the class, top = the n best:
      count    = max(0, 1 - |n - found| / n)               (too many is penalised like too few)
      color    = #(top with the asked colour) / n           (only if the clause asks a colour)
      position = #(pairs (a in top, b in top of clause i) with the relation) / (n * count_i)  (if asked)
      clause   = mean of the parts it has.
    An exclude clause of a class no include clause names scores 1 if found < count else 0 (a class that is
    included already pays for overshooting in its count part). dense = mean over clauses (1 if none).

    with_parts: also "parts", what each kind of part adds to dense (DENSE_PARTS; they sum to dense when there
    is a clause): "presence" the count part of clauses asking for one object (is it there, once), "count"
    the count part of clauses asking for two or more and the exclude clauses, "color" and "position" theirs.
    So a weighted sum of the parts reweighs them (the shapes world's split rewards)."""
    by_class = {}
    for d in sorted(detections, key=lambda d: -float(d["score"])):
        by_class.setdefault(d["class"], []).append(d)
    include, exclude = metadata.get("include", []), metadata.get("exclude", [])
    strict, reasons, matched, clause_scores, clause_parts = True, [], [], [], []
    for c in include:
        ok, top, named = _include_clause(c, include, by_class, matched, reasons)
        strict &= ok
        matched.append(top if ok else None)
        clause_scores.append(sum(v for _, v in named) / len(named))
        clause_parts.append(named)
    included = {c["class"] for c in include}
    for c in exclude:
        found = len(by_class.get(c["class"], []))
        if found >= c["count"]:
            strict = False
            reasons.append(f"expected {c['class']} < {c['count']}, found {found}")
        if c["class"] not in included:
            clause_scores.append(float(found < c["count"]))
            clause_parts.append([("count", clause_scores[-1])])
    dense = sum(clause_scores) / len(clause_scores) if clause_scores else 1.0
    out = {"strict": bool(strict), "dense": float(dense), "reasons": reasons}
    if with_parts:
        out["parts"] = dict.fromkeys(DENSE_PARTS, 0.0)
        for named in clause_parts:  # each clause weighs 1 / (clauses), shared equally among its parts
            for name, v in named:
                out["parts"][name] += v / (len(named) * len(clause_parts))
    return out


def _include_clause(c, include, by_class, matched, reasons):
    """One include clause of geneval_score: (whether it passes, its top detections, [(part name, dense part)]).
    matched: the top detections of the clauses before it (None where they failed); reasons gets why it fails."""
    n, found = c["count"], by_class.get(c["class"], [])
    top, ok = found[:n], len(found) >= n
    if not ok:
        reasons.append(f"expected {c['class']} >= {n}, found {len(found)}")
    named = [("presence" if n == 1 else "count", max(0.0, 1 - abs(n - len(found)) / n))]
    if "color" in c:
        hits = sum(d.get("color") == c["color"] for d in top)
        named.append(("color", hits / n))
        if ok and hits < n:
            ok = False
            reasons.append(f"expected {n} {c['color']} {c['class']}, found {hits}")
    if "position" in c:
        rel, ref = c["position"]
        ref_top = by_class.get(include[ref]["class"], [])[:include[ref]["count"]]
        good = sum(rel in relative_position(a["box"], b["box"]) for a in top for b in ref_top)
        named.append(("position", good / (n * include[ref]["count"])))
        if ok and (matched[ref] is None or good < len(top) * len(matched[ref])):
            ok = False
            reasons.append(f"expected {c['class']} {rel} {include[ref]['class']}")
    return ok, top, named


DENSE_PARTS = ("presence", "count", "color", "position")  # geneval_score's "parts"


GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def geneval_summary(records):
    """records: iterable of (tag, strict) pairs or dicts with "tag" and "strict" ->
    {"per_tag": {tag: accuracy}, "count": {tag: images}, "overall": mean of the accuracies of GenEval's six
    tags (the GenEval score)}. Other tags (the shapes world's "reasoning") are reported per tag beside it and
    stay out of the mean, as WISE stays beside GenEval; with none of GenEval's tags, all tags are averaged."""
    hits, count = {}, {}
    for r in records:
        tag, ok = (r["tag"], r["strict"]) if isinstance(r, dict) else r
        hits[tag] = hits.get(tag, 0) + bool(ok)
        count[tag] = count.get(tag, 0) + 1
    per_tag = {t: hits[t] / count[t] for t in count}
    core = [a for t, a in per_tag.items() if t in GENEVAL_TAGS] or list(per_tag.values())
    return {"per_tag": per_tag, "count": count, "overall": sum(core) / len(core) if core else float("nan")}


@torch.no_grad()
def classify_colors(clip, tokenizer, image, boxes, object_class, device="cpu", dtype=torch.float32, classifier=None):
    """GenEval's colour step: CLIP zero-shot over GENEVAL_COLORS on each box crop -> list of colour names.

    Text side (as GenEval via clip_benchmark): per colour, the three templates are encoded, each normalised,
    averaged and renormalised. Image side: the crop (box clamped to the image, at least 1 px) goes through
    the CLIP preprocessing; prediction = argmax of cosine similarity."""
    if classifier is None:
        classifier = color_classifier(clip, tokenizer, object_class, device)
    if len(boxes) == 0:
        return []
    h, w = image.shape[:2]
    crops = []
    for x0, y0, x1, y1 in boxes:
        x0, y0 = min(max(int(x0), 0), w - 1), min(max(int(y0), 0), h - 1)
        x1, y1 = max(min(int(math.ceil(x1)), w), x0 + 1), max(min(int(math.ceil(y1)), h), y0 + 1)
        crops.append(image[y0:y1, x0:x1])
    size = getattr(getattr(clip, "config", None), "image_size", 224)
    emb = F.normalize(clip.encode_image(clip_preprocess(crops, size).to(device, dtype)).float(), dim=-1)
    return [GENEVAL_COLORS[i] for i in (emb @ classifier.t()).argmax(-1).tolist()]


@torch.no_grad()
def color_classifier(clip, tokenizer, object_class, device="cpu"):  # -> (10, E) unit text embeddings
    rows = []
    for color in GENEVAL_COLORS:
        ids = tokenizer([t.format(c=color, o=object_class) for t in GENEVAL_COLOR_TEMPLATES]).to(device)
        rows.append(F.normalize(F.normalize(clip.encode_text(ids).float(), dim=-1).mean(0), dim=-1))
    return torch.stack(rows)


# ---- T2I-R1's prompt file -> GenEval metadata

# Localities in T2I-R1's file that GenEval's arithmetic can check; "next to", "near" and "on side of" cannot.
# "on top of" (resting on) is read as "above": the object on top has its centre higher in the picture
# (a flat object lying on a much bigger one can still miss GenEval's margin).
_LOCALITIES = {"left of": "left of", "on the left of": "left of", "right of": "right of",
               "on the right of": "right of", "above": "above", "on the top of": "above", "on top of": "above",
               "below": "below", "on the bottom of": "below"}


def check_t2i_r1_row(row):
    """Raise ValueError naming the field when a T2I-R1 prompt-file row (JSON object) cannot be read."""
    def strings(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise ValueError(f"'prompt' must be a non-empty string, got {row.get('prompt')!r:.80}")
    if "task_type" in row and not isinstance(row["task_type"], str):
        raise ValueError(f"'task_type' must be a string, got {row['task_type']!r:.80}")
    for key in ("nouns", "attr_nouns"):
        if row.get(key) is not None and not strings(row[key]):
            raise ValueError(f"'{key}' must be a list of strings, got {row[key]!r:.80}")
    sp = row.get("spatial_info")
    if sp and not (isinstance(sp, dict) and all(isinstance(sp.get(k), str) for k in ("obj1", "obj2", "locality"))):
        raise ValueError(f"'spatial_info' needs the strings obj1, obj2 and locality, got {sp!r:.80}")
    nu = row.get("numeracy_info")
    if nu and not (isinstance(nu, list) and all(isinstance(i, dict) and isinstance(i.get("obj_name"), str)
                                                and isinstance(i.get("num"), int) for i in nu)):
        raise ValueError(f"'numeracy_info' must be a list of {{\"obj_name\": string, \"num\": integer}}, "
                         f"got {nu!r:.80}")


def from_t2i_r1(row):
    """One T2I-R1 prompt-file record (dict) -> GenEval metadata, or None when its fields cannot be checked
    by GenEval's rules. The prompt text is kept as is. Which fields decide:
    spatial_info with a checkable locality and two different objects -> position;
    numeracy_info -> counting (every object counted exactly, as GenEval does);
    attr_nouns that are all '<GenEval colour> <noun>' and appear in the prompt -> colors / color_attr
    (the file has some attr_nouns that contradict their prompt, e.g. 'red towel' for 'a white towel');
    task_type 'object' with one or two nouns -> single_object / two_object. Anything else (shape, texture,
    non-spatial, most complex prompts) -> None. A malformed row raises ValueError naming the field."""
    check_t2i_r1_row(row)
    prompt, text = row["prompt"], row["prompt"].lower()
    meta = None
    if row.get("spatial_info"):
        sp = row["spatial_info"]
        relation = _LOCALITIES.get(sp["locality"].strip().lower())
        if relation and sp["obj1"] != sp["obj2"]:
            meta = {"tag": "position", "include": [{"class": sp["obj2"], "count": 1},
                                                    {"class": sp["obj1"], "count": 1, "position": [relation, 0]}]}
    elif row.get("numeracy_info"):
        info = row["numeracy_info"]
        if len({i["obj_name"] for i in info}) == len(info) and all(int(i["num"]) >= 1 for i in info):
            meta = {"tag": "counting", "include": [{"class": i["obj_name"], "count": int(i["num"])} for i in info],
                    "exclude": [{"class": i["obj_name"], "count": int(i["num"]) + 1} for i in info]}
    elif row.get("attr_nouns"):
        include = []
        for phrase in row["attr_nouns"]:
            color, _, noun = phrase.strip().lower().partition(" ")
            # the phrase must really be in the prompt (singular or plural) with a GenEval colour in front
            in_prompt = re.search(rf"\b{re.escape(phrase.strip().lower())}(s|es)?\b", text)
            if color not in GENEVAL_COLORS or not noun or not in_prompt:
                return None
            include.append({"class": noun, "count": 1, "color": color})
        meta = {"tag": "colors" if len(include) == 1 else "color_attr", "include": include}
    elif row.get("task_type") == "object" and 1 <= len(row.get("nouns", [])) <= 2:
        nouns = row["nouns"]
        if len(set(nouns)) == len(nouns):
            meta = {"tag": "single_object" if len(nouns) == 1 else "two_object",
                    "include": [{"class": c, "count": 1} for c in nouns]}
    if meta is not None:
        meta["prompt"] = prompt
    return meta


# ---- T2I-R1's own rules (CaraJ7/T2I-R1, src/t2i-r1/src/utils/reward_git.py and reward_gdino.py), on its rows

T2I_R1_NOT_ASKED = ("spatial", "numeracy")  # reward_git.py scores these task types 0 without asking GIT
T2I_R1_NO_NOUNS = 1.0  # both reward_git.py and reward_gdino.py: a row with no nouns scores 1


def t2i_r1_row(m) -> bool:
    """Whether a prompt carries T2I-R1's fields (a prompt-file row), which its own rules read."""
    return "task_type" in m or "nouns" in m


def git_questions(m):
    """T2I-R1's GIT questions for one row -> (questions, constant): questions to ask, or a constant score.
    As reward_git.py: task types spatial and numeracy are not asked (constant 0); the phrases are the row's
    attr_nouns when it has them (e.g. "purple elephant"), else its nouns; each is asked as "<phrase>?"; a row
    with neither scores 1. (An empty attr_nouns list falls back to the nouns here; there it averaged nothing.)
    A prompt without T2I-R1's fields is not asked either (constant 0: the reward abstains)."""
    if not t2i_r1_row(m) or m.get("task_type") in T2I_R1_NOT_ASKED:
        return [], 0.0
    phrases = m.get("attr_nouns") or m.get("nouns") or []
    return ([f"{p}?" for p in phrases], None) if phrases else ([], T2I_R1_NO_NOUNS)


@dataclass
class T2IR1DetectConfig:
    # reward_gdino.py keeps GroundingDINO boxes whose phrase score exceeds 0.3; OWL-ViT's sigmoid scores run
    # lower, so the threshold is OWL-ViT's text-query value, as in GenEvalConfig (NOT calibrated on real images)
    threshold: float = 0.1
    nms_iou: float = 0.5  # reward_gdino.py's NMS before counting
    query: str = "a photo of a {}"  # OWL-ViT's prompt style; GroundingDINO reads "noun1 . noun2." spans instead
    # True: reward_gdino.py's behaviour where it looks wrong ("above" and "on top of" get no position credit,
    # every pair is "near", a spatial prompt naming one object twice scores 0, NMS reads (cx, cy, w, h) as
    # corners, a noun of 3+ words is never found); see t2i_r1_position, t2i_r1_nms, t2i_r1_detect_score
    as_released: bool = False


# "near" within 150 px: T2I-CompBench's threshold for its 512 px images, which reward_gdino.py applies to boxes
# normalised to [0, 1] (so every pair is near); here 150 / 512 of the image side
T2I_R1_NEAR = 150 / 512
_T2I_R1_SIDES = {"right of": ("x", -1), "on the right of": ("x", -1), "left of": ("x", 1), "on the left of": ("x", 1),
                 "below": ("y", -1), "on the bottom of": ("y", -1), "on the top of": ("y", 1), "top of": ("y", 1),
                 "above": ("y", 1), "on top of": ("y", 1)}


def t2i_r1_position(locality, box1, box2, as_released=False) -> float:
    """reward_gdino.py's position rule (T2I-CompBench's), box1 = obj1's box, box2 = obj2's, (x0, y0, x1, y1)
    normalised to [0, 1], y down. d = centre(box2) - centre(box1).
    near / next to / on side of: 1 if |dx| or |dy| < T2I_R1_NEAR, else T2I_R1_NEAR / max(|dx|, |dy|);
    left/right/above/below: 0 unless d points the right way along the relation's axis and is longer there than
    on the other axis; then 1 if IoU < 0.1, else 0.1 / IoU (overlapping boxes get partial credit);
    anything else: 0. Its code has no branch for "above" and "on top of" (only "on the top of" and "top of"),
    so they score 0 there; here they use the "on the top of" rule unless as_released."""
    locality = locality.strip().lower()
    c1 = ((box1[0] + box1[2]) / 2, (box1[1] + box1[3]) / 2)
    c2 = ((box2[0] + box2[2]) / 2, (box2[1] + box2[3]) / 2)
    d = {"x": c2[0] - c1[0], "y": c2[1] - c1[1]}
    if locality in ("next to", "on side of", "near"):
        near = 150 if as_released else T2I_R1_NEAR
        return 1.0 if min(abs(d["x"]), abs(d["y"])) < near else near / max(abs(d["x"]), abs(d["y"]))
    if locality not in _T2I_R1_SIDES or (as_released and locality in ("above", "on top of")):
        return 0.0
    axis, sign = _T2I_R1_SIDES[locality]
    other = "y" if axis == "x" else "x"
    if d[axis] * sign <= 0 or abs(d[axis]) <= abs(d[other]):
        return 0.0
    iou = box_iou(torch.tensor([box1], dtype=torch.float64), torch.tensor([box2], dtype=torch.float64)).item()
    return 1.0 if iou < 0.1 else 0.1 / iou


def t2i_r1_nms(boxes, scores, iou_threshold=0.5, as_released=False):
    """Class-wise NMS of one object's boxes (x0, y0, x1, y1) -> kept indices. reward_gdino.py runs it before
    counting, but on GroundingDINO's (cx, cy, w, h) boxes, which torchvision's nms reads as corners: a box
    narrower than its centre's x (or shorter than its y) then overlaps nothing, so most duplicates survive and
    are counted. as_released keeps that; otherwise the boxes are compared as boxes."""
    if as_released:
        boxes = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], -1)  # (N, 4) cx cy w h
    return nms(boxes, scores, iou_threshold)


def t2i_r1_detect_classes(m) -> list:
    """The objects reward_gdino.py looks for in a row: a spatial row's two objects, a numeracy row's counted
    objects, else its nouns."""
    if m.get("task_type") == "spatial" and m.get("spatial_info"):
        return [m["spatial_info"]["obj1"], m["spatial_info"]["obj2"]]
    if m.get("task_type") == "numeracy" and m.get("numeracy_info"):
        return [i["obj_name"] for i in m["numeracy_info"]]
    return list(m.get("nouns") or [])


def t2i_r1_detect_score(detections, m, as_released=False):
    """reward_gdino.py's score for one image -> (score, reason). detections: {"class", "box" (x0, y0, x1, y1)
    in [0, 1], "score"} after the threshold and class-wise NMS.
    no nouns: 1. spatial: 0.2 per object found; with both, + position / 2 of the two most confident boxes
    (at most 0.9). numeracy: per counted object, 1 for the exact count, 0.2 when found with another count,
    0 when absent, averaged over the objects. Other task types: the fraction of nouns found."""
    by_class = {}
    for d in sorted(detections, key=lambda d: -float(d["score"])):
        # reward_gdino.py names a box by its noun's first and last word, so a noun of three or more words
        # ("roll of paper towel") never matches itself there
        if not (as_released and len(d["class"].split()) > 2):
            by_class.setdefault(d["class"], []).append(d["box"])
    if not m.get("nouns"):
        return T2I_R1_NO_NOUNS, "no nouns: T2I-R1's constant"
    task = m.get("task_type")
    if task == "spatial" and m.get("spatial_info"):
        sp = m["spatial_info"]
        a, b = by_class.get(sp["obj1"], []), by_class.get(sp["obj2"], [])
        score = 0.2 * bool(a) + 0.2 * bool(b)
        if a and b:
            if sp["obj1"] == sp["obj2"]:  # reward_gdino.py fails on this pair and scores the image 0
                if as_released:
                    return 0.0, f"{sp['obj1']} twice: 0 as released"
                a, b = a[:1], a[1:2]
            if b:
                score += t2i_r1_position(sp["locality"], a[0], b[0], as_released) / 2
        return score, f"{sp['obj1']} {sp['locality']} {sp['obj2']}: found {len(a)} and {len(b)}"
    if task == "numeracy" and m.get("numeracy_info"):
        info = m["numeracy_info"]
        found = [len(by_class.get(i["obj_name"], [])) for i in info]
        score = sum(1.0 if n == i["num"] else 0.2 if n else 0.0 for n, i in zip(found, info)) / len(info)
        return score, ", ".join(f"{i['obj_name']}: {n} of {i['num']}" for n, i in zip(found, info))
    found = [n for n in m["nouns"] if n in by_class]
    return len(found) / len(m["nouns"]), f"found {len(found)} of {len(m['nouns'])} nouns"


# -----------------------------------------------------------------------------------------------------
# 2. Rewards: reward(images, metadata) -> (scores (B,) float32 on CPU, info {key: list of B values})


@dataclass(frozen=True)
class Checkpoint:
    files: tuple  # one entry per needed file: alternatives, first found wins; "a + b" means both
    where: str  # where it is published


_CLIP_FILES = (("model.safetensors", "pytorch_model.bin"), ("tokenizer.json", "vocab.json + merges.txt"))
CHECKPOINTS = {
    "clip": Checkpoint(_CLIP_FILES, "https://huggingface.co/openai/clip-vit-large-patch14"),
    "pickscore": Checkpoint(_CLIP_FILES, "https://huggingface.co/yuvalkirstain/PickScore_v1"),
    "hps": Checkpoint((("HPS_v2.1_compressed.pt",),
                       ("tokenizer.json", "vocab.json + merges.txt", "bpe_simple_vocab_16e6.txt.gz")),
                      "https://huggingface.co/xswu/HPSv2 (HPS_v2.1_compressed.pt); put the CLIP tokenizer.json of "
                      "https://huggingface.co/openai/clip-vit-large-patch14 beside it (same BPE as OpenCLIP)"),
    "aesthetic": Checkpoint((("sac+logos+ava1-l14-linearMSE.pth",),),
                            "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                            "sac+logos+ava1-l14-linearMSE.pth"),
    "geneval": Checkpoint((("model.safetensors", "pytorch_model.bin"), ("vocab.json + merges.txt", "tokenizer.json")),
                          "https://huggingface.co/google/owlvit-base-patch32"),
    "git": Checkpoint((("model.safetensors", "pytorch_model.bin"), ("tokenizer.json", "vocab.txt"), ("config.json",)),
                      "https://huggingface.co/microsoft/git-large-vqav2 (T2I-R1's choice, 1.6 GB) or "
                      "https://huggingface.co/microsoft/git-base-vqav2 (0.7 GB)"),
}


def reward_files(reward, key, ckpt):
    """Paths of checkpoint `key`'s files for `reward`, from ckpt[key] (a folder, or the weight file itself).
    Raises FileNotFoundError naming the reward, the file and where it is published."""
    spec, path = CHECKPOINTS[key], ckpt.get(key)
    if not path:
        raise FileNotFoundError(f"{reward}: needs the '{key}' checkpoint ({spec.files[0][0]}); pass "
                                f"--reward-ckpt {key}=PATH; download from {spec.where}")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    found = []
    for i, group in enumerate(spec.files):
        if i == 0 and os.path.isfile(path):
            found.append(path)
            continue
        for alt in group:
            names = alt.split(" + ")
            if all(os.path.isfile(os.path.join(folder, n)) for n in names):
                found.append(os.path.join(folder, names[0]))
                break
        else:
            raise FileNotFoundError(f"{reward}: {' or '.join(group)} not found in {path}; download from {spec.where}")
    return found


def default_dtype(device):
    """Precision policy: bf16 (fp16 where bf16 is missing) on GPU, fp32 on CPU."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_batch(images, metadata):
    images = as_rgb_list(images)
    if not isinstance(metadata, (list, tuple)) or len(metadata) != len(images):
        raise ValueError(f"metadata: expected a list of {len(images)} dicts (one per image), got {metadata!r:.120}")
    for i, m in enumerate(metadata):
        if not isinstance(m, dict) or "prompt" not in m:
            raise ValueError(f"metadata[{i}]: expected a dict with a 'prompt' key, got {m!r:.120}")
    return images, list(metadata)


def check_finite(name, scores):
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise FloatingPointError(f"reward '{name}' returned non-finite scores {scores[bad[:8]].tolist()} at batch "
                                 f"positions {bad[:8]}; refusing to train on them")


class Reward:
    """Base: validates files at construction, loads models on first call, checks inputs and outputs."""
    name = ""
    needs = ()  # the checkpoints it reads (CHECKPOINTS keys), each passed as --reward-ckpt KEY=PATH

    def __init__(self, ckpt=None, device=None, dtype=None, cache=None):
        self.device = default_device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.cache = {} if cache is None else cache  # shared by an ensemble so ViT-L/14 loads once
        self.files = {key: reward_files(self.name, key, ckpt or {}) for key in self.needs}
        self.loaded = False

    def __call__(self, images, metadata):
        images, metadata = check_batch(images, metadata)
        self.check_metadata(metadata, require_any=False)  # a batch may hold only prompts a rule cannot check
        self._ensure_loaded()
        with torch.no_grad():
            scores, info = self.score(images, metadata)
        scores = scores.float().cpu()
        check_finite(self.name, scores)
        return scores, info

    def _ensure_loaded(self):
        if not self.loaded:
            self.load()
            self.loaded = True

    def load(self):
        pass

    def check_metadata(self, metadata, require_any=True):
        pass

    def checks(self, m) -> bool:
        """Whether this reward really scores prompt m (rewards that abstain on some prompts say False)."""
        return True

    def owlvit_model(self):  # -> (OwlViT, CLIPTokenizer) from the 'geneval' checkpoint, cached like clip_model
        weights, tok_file = self.files["geneval"]
        cache_key = ("owlvit", weights, str(self.device), self.dtype)
        if cache_key not in self.cache:
            c = read_config(os.path.dirname(weights), "owlvit-base-patch32")
            self.cache[cache_key] = (load_owlvit(weights, c, self.device, self.dtype),
                                     CLIPTokenizer.from_folder(os.path.dirname(tok_file), c.context_length))
        return self.cache[cache_key]

    def owlvit_scores(self, images, classes, query):
        """OWL-ViT on images with one text query per class -> probabilities (B, P, Q) and boxes (B, P, 4) as
        (x0, y0, x1, y1) in [0, 1], float32 on the CPU."""
        owl, tok = self.owlvit_model()
        pixels = owlvit_preprocess(images, owl.config.image_size).to(self.device, self.dtype)
        logits, boxes = owl(pixels, tok([query.format(c) for c in classes]).to(self.device))  # (B, P, Q), (B, P, 4)
        cx, cy, w, h = boxes.float().cpu().unbind(-1)
        return torch.sigmoid(logits.float()).cpu(), torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)

    def clip_model(self, key, preset):  # -> (CLIP, CLIPTokenizer), cached per file, device and dtype
        weights, tok_file = self.files[key]
        cache_key = ("clip", weights, str(self.device), self.dtype)
        if cache_key not in self.cache:
            cfg = read_config(os.path.dirname(weights), preset)
            self.cache[cache_key] = (load_clip(weights, cfg, self.device, self.dtype),
                                     CLIPTokenizer.from_folder(os.path.dirname(tok_file), cfg.context_length))
        return self.cache[cache_key]

    def cosine(self, clip, tok, pixels, prompts):  # -> (B,) float32 cosine of image and prompt embeddings
        img = F.normalize(clip.encode_image(pixels.to(self.device, self.dtype)).float(), dim=-1)
        txt = F.normalize(clip.encode_text(tok(prompts).to(self.device)).float(), dim=-1)
        return (img * txt).sum(-1)


class ClipScore(Reward):
    """CLIPScore, OpenAI CLIP ViT-L/14: max(100 * cos(image, prompt), 0)."""
    name, needs, preset, preprocess = "clip", ("clip",), "clip-vit-large-patch14", staticmethod(clip_preprocess)

    def load(self):
        self.clip, self.tok = self.clip_model(self.name, self.preset)

    def score(self, images, metadata):
        cos = self.cosine(self.clip, self.tok, self.preprocess(images, self.clip.config.image_size),
                          [m["prompt"] for m in metadata]).cpu()
        return self.from_cosine(cos), {"cos": cos.tolist()}

    def from_cosine(self, cos):
        return (100 * cos).clamp(min=0)

    @torch.no_grad()
    def image_embeddings(self, images):  # -> (B, E) float32 unit vectors (for diversity)
        self._ensure_loaded()
        pixels = self.preprocess(images, self.clip.config.image_size).to(self.device, self.dtype)
        return F.normalize(self.clip.encode_image(pixels).float(), dim=-1).cpu()


class PickScore(ClipScore):
    """PickScore_v1 (CLIP ViT-H/14 fine-tuned on Pick-a-Pic): exp(logit_scale) * cos."""
    name, needs, preset = "pickscore", ("pickscore",), "vit-h-14"

    def from_cosine(self, cos):
        return self.clip.logit_scale.float().exp().cpu() * cos


class HPS(ClipScore):
    """HPSv2.1 (OpenCLIP ViT-H/14 fine-tuned on HPD v2): cos(image, prompt), no scale."""
    name, needs, preset, preprocess = "hps", ("hps",), "vit-h-14", staticmethod(hps_preprocess)

    def from_cosine(self, cos):
        return cos


class Aesthetic(Reward):
    """LAION aesthetic predictor v2: a linear MLP on the unit CLIP ViT-L/14 image embedding (AVA 1-10 scale)."""
    name, needs = "aesthetic", ("aesthetic", "clip")  # the MLP reads CLIP ViT-L/14's embedding

    def load(self):
        self.clip, _ = self.clip_model("clip", "clip-vit-large-patch14")
        dims = [self.clip.config.embed_dim, 1024, 128, 64, 16, 1]
        # published keys layers.{0,2,4,6,7}: the Identity slots are the training-time dropouts
        layers = [nn.Linear(dims[0], 1024), nn.Identity(), nn.Linear(1024, 128), nn.Identity(),
                  nn.Linear(128, 64), nn.Identity(), nn.Linear(64, 16), nn.Linear(16, 1)]
        self.head = nn.Module()
        self.head.layers = nn.Sequential(*layers)
        path = self.files["aesthetic"][0]
        load_weights(self.head, dict(read_tensors(path)), path).float().to(self.device)  # tiny: kept in fp32

    def score(self, images, metadata):
        pixels = clip_preprocess(images, self.clip.config.image_size).to(self.device, self.dtype)
        emb = F.normalize(self.clip.encode_image(pixels).float(), dim=-1)
        return self.head.layers(emb).squeeze(-1), {}


@dataclass
class GenEvalConfig:
    # OWL-ViT's sigmoid scores are not on the scale of GenEval's Mask2Former thresholds (0.3, and 0.9 for
    # counting). 0.1 is the text-query threshold of transformers' own OWL-ViT example for base-patch32. It was
    # NOT calibrated on real images in this repo (no weights here): check detections on GenEval prompts (and
    # the counting threshold in particular) before trusting the scores.
    threshold: float = 0.1
    counting_threshold: float = 0.1  # used for tag "counting", as GenEval keeps a separate one
    nms_iou: float = 0.5  # class-wise; OWL-ViT predicts one box per patch, so an object gets several
    max_objects: int = 16  # per class, as GenEval
    query: str = "a photo of a {}"  # text query per class, OWL-ViT's prompt style
    score: str = "dense"  # what the reward returns: "dense" in [0, 1] or "strict" in {0, 1}


def _by_task(items):  # " (T2I-R1 task types: color 2, shape 1)" for the rows that carry a task type, or ""
    tasks = collections.Counter(m["task_type"] for m in items if "task_type" in m)
    return f" (T2I-R1 task types: {', '.join(f'{t} {c}' for t, c in sorted(tasks.items()))})" if tasks else ""


def _clauses(m):
    return m.get("include", []) + m.get("exclude", [])


def checkable(m) -> bool:
    """Whether the GenEval rules can check a prompt: it carries include clauses."""
    return bool(m.get("include"))


class RuleReward(Reward):
    """Base of the rewards scored by the GenEval rule engine.

    A prompt without GenEval metadata (no include clauses) would pass every rule, a silent 1.0. Such a prompt
    is not checked: the reward abstains with a score of 0 and info["checked"] False. Within a prompt's group
    that is a constant, so it moves no advantage (sum: the group mean absorbs it; group: a flat group gets
    exactly 0); the other rewards alone decide. The caller reports how many prompts that concerns
    (RewardEnsemble.unchecked_report); a set of prompts none of which can be checked is refused."""

    # what its metadata may name: a class, colour or tag outside these could never be found, and its prompt
    # would score 0 forever (a misspelt "cirlce"). classes None: an open vocabulary (OWL-ViT reads any name)
    classes, colors, tags = None, tuple(GENEVAL_COLORS), GENEVAL_TAGS

    def __init__(self, ckpt=None, device=None, dtype=None, cache=None, config=None):
        super().__init__(ckpt, device, dtype, cache)
        self.cfg = config or GenEvalConfig()

    def check_vocabulary(self, m):
        """ValueError naming the first class, colour or tag of metadata m that this reward cannot recognise."""
        if "tag" in m and m["tag"] not in self.tags:
            raise ValueError(f"tag {m['tag']!r} is not one of {', '.join(self.tags)}")
        for part in ("include", "exclude"):
            for j, c in enumerate(m.get(part, [])):
                if self.classes is not None and c["class"] not in self.classes:
                    raise ValueError(f"{part}[{j}]: class {c['class']!r} is not one it detects "
                                     f"({', '.join(self.classes)})")
                if "color" in c and c["color"] not in self.colors:
                    raise ValueError(f"{part}[{j}]: color {c['color']!r} is not one it tells apart "
                                     f"({', '.join(self.colors)})")

    def check_metadata(self, metadata, require_any=True):
        for i, m in enumerate(metadata):
            if checkable(m) or "exclude" in m:
                try:
                    check_geneval_metadata(m)
                    self.check_vocabulary(m)
                except ValueError as e:
                    raise ValueError(f"{self.name}: prompt {i} ({m.get('prompt', '')!r:.60}): {e}") from None
        if require_any and metadata and not any(checkable(m) for m in metadata):
            raise ValueError(f"{self.name}: none of the {len(metadata)} prompt(s) carries GenEval metadata (no "
                             f"'include' clauses), e.g. {metadata[0].get('prompt', '')!r}; score this reward on JSON "
                             f"lines with GenEval metadata (the files `python shapes.py prompts` writes, GenEval's "
                             f"evaluation_metadata.jsonl) or T2I-R1's prompt file")

    def checks(self, m) -> bool:
        return checkable(m)

    def unchecked_line(self, bare, items, what):
        return (f"{self.name}: {len(bare)} of the {len(items)} {what} carry no GenEval metadata it can check"
                f"{_by_task(bare)}; it scores them 0 for every sample, a constant within their groups, so the other "
                f"rewards alone set their advantages (and its logged means leave them out)")

    def rule_scores(self, dets, metadata):
        res = [geneval_score(d, m, with_parts=True) if checkable(m) else None for d, m in zip(dets, metadata)]
        scores = torch.tensor([float(r[self.cfg.score]) if r else 0.0 for r in res])
        return scores, {"strict": [r and r["strict"] for r in res], "dense": [r and r["dense"] for r in res],
                        "parts": [r and r["parts"] for r in res],
                        "reasons": [r["reasons"] if r else ["not checked: no GenEval metadata"] for r in res],
                        "detections": dets, "checked": [r is not None for r in res]}


class GenEvalReward(RuleReward):
    """GenEval rules on OWL-ViT detections with CLIP ViT-L/14 colours; see geneval_score for the scores."""
    name, needs = "geneval", ("geneval", "clip")  # OWL-ViT boxes, CLIP ViT-L/14 colours

    def load(self):
        self.owlvit_model()
        self.clip, self.tok = self.clip_model("clip", "clip-vit-large-patch14")
        self.color_heads = {}  # object class -> (10, E) colour classifier

    def detect(self, images, metadata):
        """-> per image, detections of the classes its metadata names (threshold, one class per box, NMS)."""
        classes = sorted({c["class"] for m in metadata for c in _clauses(m)})
        if not classes:
            return [[] for _ in images]
        column = {c: i for i, c in enumerate(classes)}
        probs, boxes = self.owlvit_scores(images, classes, self.cfg.query)  # (B, P, Q), (B, P, 4) x0 y0 x1 y1
        out = []
        for img, m, p, bx in zip(images, metadata, probs, boxes):
            names = sorted({c["class"] for c in _clauses(m)})
            if not names:
                out.append([])
                continue
            # each box goes to its best class among this prompt's classes, as OWL-ViT's post-processing does
            score, label = p[:, [column[n] for n in names]].max(-1)  # (P,)
            thr = self.cfg.counting_threshold if m.get("tag") == "counting" else self.cfg.threshold
            h, w = img.shape[:2]
            xyxy = bx * torch.tensor([w, h, w, h])
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
            dets = []
            for k, name in enumerate(names):
                idx = ((label == k) & (score > thr)).nonzero().flatten()
                for i in idx[nms(xyxy[idx], score[idx], self.cfg.nms_iou)][:self.cfg.max_objects].tolist():
                    dets.append({"class": name, "box": tuple(xyxy[i].tolist()), "score": score[i].item(),
                                 "color": None})
            out.append(dets)
        return out

    def add_colors(self, image, dets, metadata):
        """Colour the `count` best detections of every include clause that asks for a colour (in place)."""
        for c in metadata.get("include", []):
            if "color" not in c:
                continue
            top = sorted([d for d in dets if d["class"] == c["class"]], key=lambda d: -d["score"])[:c["count"]]
            if not top:
                continue
            if c["class"] not in self.color_heads:
                self.color_heads[c["class"]] = color_classifier(self.clip, self.tok, c["class"], self.device)
            colors = classify_colors(self.clip, self.tok, image, [d["box"] for d in top], c["class"],
                                     self.device, self.dtype, self.color_heads[c["class"]])
            for d, color in zip(top, colors):
                d["color"] = color

    def score(self, images, metadata):
        dets = self.detect(images, metadata)
        for img, d, m in zip(images, dets, metadata):
            self.add_colors(img, d, m)
        return self.rule_scores(dets, metadata)


class T2IR1Reward(Reward):
    """Base of the rewards that score T2I-R1's prompt-file rows by its own rules (git, t2i-r1-detect). Where
    those rules give a constant (see git_questions, t2i_r1_detect_score), and on prompts without T2I-R1's
    fields (score 0), the sample is marked not checked: a constant within its group moves no advantage, and
    the logged means leave it out."""

    def check_metadata(self, metadata, require_any=True):
        for i, m in enumerate(metadata):
            if t2i_r1_row(m):
                try:
                    check_t2i_r1_row(m)
                except ValueError as e:
                    raise ValueError(f"{self.name}: prompt {i} ({m.get('prompt', '')!r:.60}): {e}") from None

    def unchecked_line(self, bare, items, what):
        return (f"{self.name}: scores {len(items) - len(bare)} of the {len(items)} {what}; the other {len(bare)}"
                f"{_by_task(bare)} get T2I-R1's constant (0 without its fields), the same for every sample, so the "
                f"other rewards alone set their advantages (and its logged means leave them out)")


class GitVQA(T2IR1Reward):
    """T2I-R1's GIT reward: per question "<phrase>?" (git_questions), p(yes) / (p(yes) + p(no)) of the first
    answer token, averaged over the prompt's questions."""
    name, needs = "git", ("git",)

    def __init__(self, ckpt=None, device=None, dtype=None, cache=None):
        super().__init__(ckpt, device, dtype, cache)
        weights, tok_file, cfg_file = self.files["git"]
        # the small files are read at start-up, so their errors come before any sampling
        self.config = git_config_from_hf(read_json_object(cfg_file), cfg_file)
        self.prep = git_preprocessing(os.path.dirname(weights), self.config)
        self.tok = WordPieceTokenizer(os.path.dirname(tok_file))
        self.yes, self.no = self.tok.word_id("yes"), self.tok.word_id("no")

    def checks(self, m) -> bool:
        return bool(git_questions(m)[0])

    def load(self):
        self.model = load_git(self.files["git"][0], self.config, self.device, self.dtype)

    def yes_probability(self, images, questions):
        """images (K of them), questions [(image index, text)] -> (N,) p(yes) / (p(yes) + p(no)), float32 CPU."""
        tokens = self.model.image_tokens(clip_preprocess(images, **self.prep).to(self.device, self.dtype))  # (K, I, W)
        ids = [[self.tok.cls] + self.tok.encode(q) for _, q in questions]  # GIT's VQA input: [CLS] question
        if max(map(len, ids)) > self.config.max_positions:
            raise ValueError(f"git: a question is longer than GIT's {self.config.max_positions} text positions")
        batch = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)  # right-padded: causal text never
        for j, x in enumerate(ids):                                           # sees the padding after it
            batch[j, :len(x)] = torch.tensor(x)
        rows = torch.tensor([i for i, _ in questions], device=self.device)
        _, h = self.model.hidden(tokens, batch.to(self.device), rows)  # (N, T, W): each image computed once
        last = torch.tensor([len(x) - 1 for x in ids], device=h.device)
        logits = self.model.output(h[torch.arange(len(ids), device=h.device), last]).float()  # (N, vocab)
        # p(yes) / (p(yes) + p(no)) under the softmax is sigmoid(logit_yes - logit_no): no vocabulary-wide sum
        return torch.sigmoid(logits[:, self.yes] - logits[:, self.no]).cpu()

    def score(self, images, metadata):
        asked = [git_questions(m) for m in metadata]
        rows = [i for i, (qs, _) in enumerate(asked) if qs]
        pairs = [(k, q) for k, i in enumerate(rows) for q in asked[i][0]]
        p = self.yes_probability([images[i] for i in rows], pairs).tolist() if rows else []
        yes = [[] for _ in images]
        for (k, _), v in zip(pairs, p):
            yes[rows[k]].append(v)
        scores = torch.tensor([sum(y) / len(y) if y else c for y, (_, c) in zip(yes, asked)])
        return scores, {"questions": [qs for qs, _ in asked], "yes": yes, "checked": [bool(y) for y in yes]}


class T2IR1Detect(T2IR1Reward):
    """T2I-R1's GroundingDINO scoring rules (t2i_r1_detect_score) on OWL-ViT detections: each of a row's
    objects is its own text query, every box above the threshold counts for it, class-wise NMS."""
    name, needs = "t2i-r1-detect", ("geneval",)  # the OWL-ViT folder the geneval reward reads

    def __init__(self, ckpt=None, device=None, dtype=None, cache=None, config=None):
        super().__init__(ckpt, device, dtype, cache)
        self.cfg = config or T2IR1DetectConfig()

    def checks(self, m) -> bool:
        return t2i_r1_row(m) and bool(m.get("nouns"))

    def load(self):
        self.owlvit_model()

    def detect(self, images, metadata):
        """-> per image, detections {"class", "box" (x0, y0, x1, y1) in [0, 1], "score"} of its row's objects."""
        classes = sorted({c for m in metadata if self.checks(m) for c in t2i_r1_detect_classes(m)})
        if not classes:
            return [[] for _ in images]
        probs, boxes = self.owlvit_scores(images, classes, self.cfg.query)  # (B, P, Q), (B, P, 4)
        out = []
        for m, p, bx in zip(metadata, probs, boxes):
            dets = []
            for name in sorted(set(t2i_r1_detect_classes(m))) if self.checks(m) else []:
                q = p[:, classes.index(name)]
                idx = (q > self.cfg.threshold).nonzero().flatten()
                for i in idx[t2i_r1_nms(bx[idx], q[idx], self.cfg.nms_iou, self.cfg.as_released)].tolist():
                    dets.append({"class": name, "box": tuple(bx[i].clamp(0, 1).tolist()), "score": q[i].item()})
            out.append(dets)
        return out

    def score(self, images, metadata):
        dets = self.detect(images, metadata)
        # a T2I-R1 row without nouns gets its constant 1 from t2i_r1_detect_score; other prompts abstain with 0
        res = [t2i_r1_detect_score(d, m, self.cfg.as_released) if t2i_r1_row(m) else (0.0, "no T2I-R1 fields")
               for d, m in zip(dets, metadata)]
        return torch.tensor([r[0] for r in res]), {"reasons": [r[1] for r in res], "detections": dets,
                                                   "checked": [self.checks(m) for m in metadata]}


# -----------------------------------------------------------------------------------------------------
# 3. Selection, weights, combination, evaluation extras

# name -> Reward class, or "module:Class" for a reward that lives in a module importing this one (the shapes
# world's, beside its detector), imported by `reward_class` when first asked for
REWARDS = {"clip": ClipScore, "pickscore": PickScore, "hps": HPS, "aesthetic": Aesthetic, "geneval": GenEvalReward,
           "git": GitVQA, "t2i-r1-detect": T2IR1Detect, "shapes": "shapes:ShapesReward",
           "shapes-presence": "shapes:ShapesPresenceReward", "shapes-count": "shapes:ShapesCountReward",
           "shapes-color": "shapes:ShapesColorReward", "shapes-position": "shapes:ShapesPositionReward"}
# T2I-R1's ensemble minus its 7B LLaVA output reward model (docs/rewards.md): each at weight 1, summed
REWARD_PRESETS = {"t2i-r1": "hps:1,t2i-r1-detect:1,git:1"}


def reward_class(name):
    """The Reward class registered under name; a "module:Class" entry is imported here, so a reward is found
    whatever the caller imported before."""
    cls = REWARDS[name]
    if isinstance(cls, str):
        module, _, attr = cls.partition(":")
        cls = getattr(importlib.import_module(module), attr)
    return cls


def parse_rewards(spec: str) -> dict:
    """'hps:1,geneval:1,aesthetic:0.5' -> {"hps": 1.0, "geneval": 1.0, "aesthetic": 0.5}; weight defaults to 1.
    A preset name (REWARD_PRESETS: t2i-r1) stands for its list."""
    weights = {}
    items = [REWARD_PRESETS.get(item.strip(), item) for item in (spec or "").split(",")]
    for item in ",".join(items).split(","):
        if not item.strip():
            continue
        name, _, w = (s.strip() for s in item.partition(":"))
        if name in REWARD_PRESETS:
            raise ValueError(f"--rewards: the preset '{name}' takes no weight (it is {REWARD_PRESETS[name]})")
        if name not in REWARDS:
            raise ValueError(f"--rewards: unknown reward '{name}'; choose from {', '.join(REWARDS)} or the preset "
                             f"{', '.join(REWARD_PRESETS)}")
        if name in weights:
            raise ValueError(f"--rewards: '{name}' given twice")
        try:
            weights[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"--rewards: weight of '{name}' is not a number: '{w}'") from None
        if not math.isfinite(weights[name]):
            raise ValueError(f"--rewards: weight of '{name}' must be finite, got {w}")
    if not weights:
        raise ValueError("--rewards: no reward given")
    return weights


def parse_reward_ckpt(items) -> dict:
    """['hps=PATH', 'clip=PATH'] (or one string with spaces/commas between them) -> {"hps": PATH, ...}."""
    if isinstance(items, str):
        items = items.replace(",", " ").split()
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--reward-ckpt: expected NAME=PATH, got '{item}'")
        if name not in CHECKPOINTS:
            raise ValueError(f"--reward-ckpt: unknown checkpoint '{name}'; choose from {', '.join(CHECKPOINTS)}")
        out[name] = os.path.expanduser(path)
    return out


def combine_rewards(scores: dict, weights: dict):
    """The weighted sum of per-reward scores (B,) -> (B,): sum_k w_k * r_k (T2I-R1 adds its rewards unweighted)."""
    total = None
    for name, w in weights.items():
        r = scores[name].float()
        check_finite(name, r)
        total = w * r if total is None else total + w * r
    return total


class RewardEnsemble:
    """The chosen rewards with their weights. Construction checks every file (fails at start-up, not at step
    500); models load on first use; scoring runs in batches and refuses NaN/inf."""

    def __init__(self, weights: dict, ckpt: dict, device=None, dtype=None, batch_size=16, geneval=None,
                 t2i_r1_detect=None):
        cache = {}
        self.weights, self.batch_size = dict(weights), batch_size
        self.rewards = {}
        for name in self.weights:
            cls = reward_class(name)
            config = geneval if issubclass(cls, RuleReward) else t2i_r1_detect if name == "t2i-r1-detect" else None
            extra = {"config": config} if config is not None else {}
            self.rewards[name] = cls(ckpt, device, dtype, cache, **extra)

    def check_metadata(self, metadata):
        """Fail before any sampling when a reward cannot score these prompts (malformed GenEval metadata, or
        none at all for a rule reward)."""
        for reward in self.rewards.values():
            reward.check_metadata(metadata)

    def unchecked_report(self, items, what="prompts") -> list:
        """How many of these prompts each reward scores, a line per reward, when some reward abstains on some
        of them (a rule reward without GenEval metadata, git and t2i-r1-detect where T2I-R1 gives a constant):
        how many, by T2I-R1 task type when the rows carry one, and what that means. Nothing when every reward
        scores every prompt."""
        bare = {name: [m for m in items if not r.checks(m)] for name, r in self.rewards.items()}
        if not any(bare.values()):
            return []
        return [r.unchecked_line(bare[name], items, what) if bare[name] else f"{name}: scores all {len(items)} {what}"
                for name, r in self.rewards.items()]

    def __call__(self, images, metadata, progress=None):
        """-> scores {name: (B,) float32}, info {name: {key: list of B values}}. progress(k) is called after
        each batch of k images of each reward."""
        images, metadata = check_batch(images, metadata)
        scores, info = {}, {}
        for name, reward in self.rewards.items():
            parts, merged = [], {}
            for i in range(0, len(images), self.batch_size):
                s, inf = reward(images[i:i + self.batch_size], metadata[i:i + self.batch_size])
                parts.append(s)
                for k, v in inf.items():
                    merged.setdefault(k, []).extend(v)
                if progress is not None:
                    progress(len(s))
            merged.setdefault("checked", [True] * len(images))  # rewards that never abstain check every image
            scores[name], info[name] = torch.cat(parts), merged
        return scores, info

    def combine(self, scores):
        return combine_rewards(scores, self.weights)


def diversity(embeddings_per_prompt) -> float:
    """Mean over prompts of the mean pairwise cosine distance (1 - cos) among one prompt's image embeddings.
    Input: a list of (N_i, E) tensors or one (P, N, E) tensor; prompts with fewer than 2 images are skipped."""
    vals = []
    for e in embeddings_per_prompt:
        if e.shape[0] < 2:
            continue
        e = F.normalize(e.float(), dim=-1)
        i, j = torch.triu_indices(e.shape[0], e.shape[0], 1)
        vals.append((1 - (e[i] * e[j]).sum(-1)).mean())
    if not vals:
        raise ValueError("diversity: needs at least one prompt with 2 or more images")
    return torch.stack(vals).mean().item()
