"""Procedural scenes and questions of the ``shapes`` task.

A scene is a 192 x 192 px image with a noisy grey background split into a 4 x 4 grid of 48 px cells.
Each of 1-6 objects (circle / square / triangle in one of 6 colours, small or large) sits at the
centre of its own cell (jittered by a few pixels); optionally a white seven-segment digit occupies
another cell. Questions have one-word answers and come in families that need different visual
evidence (see `EVAL_FAMILIES`); extra position-addressed "bridge" families (`TRAIN_ONLY_FAMILIES`)
exist only for training the embedded model.

Everything is seeded through ``numpy.random.default_rng([domain, seed, index])`` so any sample can be
regenerated from its (domain, seed, index) alone; the evaluation domain is never used for training.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 192
GRID = 4  # cells per side
CELL = IMAGE_SIZE // GRID  # 48 px
SHAPES = ["circle", "square", "triangle"]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 195),
    "orange": (245, 140, 30),
}
COLOUR_NAMES = list(COLOURS)
SIZES = {"small": 11, "large": 18}  # half-extent in px
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_COLOUR = (245, 245, 245)
MAX_OBJECTS = 6
MAX_COUNT = 3  # count questions ask about 0..3 objects of a colour

EVAL_FAMILIES = ["colour", "shape", "count", "exists", "digit", "relation"]
TRAIN_ONLY_FAMILIES = ["pos_colour", "pos_occupied", "pos_digit", "where_row", "where_col"]
ALL_FAMILIES = EVAL_FAMILIES + TRAIN_ONLY_FAMILIES

# Seed domains: the first entropy word of every rng. EVAL is reserved for the fixed eval split.
DOMAIN_EVAL = 1_000_003
DOMAIN_VAL = 2_000_003
DOMAIN_TRAIN = 3_000_017

# Seven-segment layout: segment -> ((x0, y0), (x1, y1)) in units of (width, height) of the digit box.
_SEGMENTS = {
    "a": ((0, 0), (1, 0)),
    "b": ((1, 0), (1, 0.5)),
    "c": ((1, 0.5), (1, 1)),
    "d": ((0, 1), (1, 1)),
    "e": ((0, 0.5), (0, 1)),
    "f": ((0, 0), (0, 0.5)),
    "g": ((0, 0.5), (1, 0.5)),
}
_DIGIT_SEGMENTS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]
DIGIT_W, DIGIT_H, DIGIT_STROKE = 18, 30, 4


def vocabulary() -> list[str]:
    """Every word that can appear in a prompt, question, answer or caption (for word tokenizers)."""
    words = (
        "USER ASSISTANT : ? , what is the colour of shape at row column how many objects are there "
        "a an object left or right digit shown in which and small large yes no"
    ).split()
    words += SHAPES + COLOUR_NAMES + NUMBER_WORDS
    out: list[str] = []
    for w in words:
        if w not in out:
            out.append(w)
    return out


# ----------------------------------------------------------------------------------------- scenes


def _new_object(rng: np.random.Generator, cell: int, colour: str | None = None, shape: str | None = None) -> dict:
    row, col = divmod(int(cell), GRID)
    jx, jy = (int(v) for v in rng.integers(-3, 4, size=2))
    return {
        "shape": shape if shape is not None else SHAPES[int(rng.integers(len(SHAPES)))],
        "colour": colour if colour is not None else COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))],
        "size": "small" if rng.random() < 0.5 else "large",
        "row": row,
        "col": col,
        "cx": col * CELL + CELL // 2 + jx,
        "cy": row * CELL + CELL // 2 + jy,
        "shade": [int(v) for v in rng.integers(-12, 13, size=3)],
    }


def random_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    digit: bool | None = None,
    colours: list[str | None] | None = None,
) -> dict:
    """A random scene (JSON-serialisable dict). ``colours`` optionally fixes the colour of the first
    objects (None entries stay random); the rest is random."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    has_digit = bool(rng.random() < 0.5) if digit is None else digit
    cells = rng.choice(GRID * GRID, size=n + int(has_digit), replace=False)
    objects = []
    for i in range(n):
        c = colours[i] if colours is not None and i < len(colours) else None
        objects.append(_new_object(rng, int(cells[i]), colour=c))
    scene: dict[str, Any] = {
        "objects": objects,
        "digit": None,
        "background": int(rng.integers(90, 161)),
        "noise_seed": int(rng.integers(2**31 - 1)),
    }
    if has_digit:
        row, col = divmod(int(cells[n]), GRID)
        jx, jy = (int(v) for v in rng.integers(-3, 4, size=2))
        scene["digit"] = {
            "value": int(rng.integers(10)),
            "row": row,
            "col": col,
            "cx": col * CELL + CELL // 2 + jx,
            "cy": row * CELL + CELL // 2 + jy,
        }
    return scene


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict, fill: Any) -> None:
    h = SIZES[obj["size"]]
    cx, cy = obj["cx"], obj["cy"]
    if obj["shape"] == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif obj["shape"] == "square":
        s = round(h * 0.85)  # same visual weight as the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif obj["shape"] == "triangle":
        draw.polygon([(cx, cy - h), (cx - h, cy + h - 2), (cx + h, cy + h - 2)], fill=fill)
    else:
        raise ValueError(f"object shape must be one of {SHAPES}, got {obj['shape']!r}")


def _draw_digit(draw: ImageDraw.ImageDraw, digit: dict, fill: Any) -> None:
    x0, y0 = digit["cx"] - DIGIT_W // 2, digit["cy"] - DIGIT_H // 2
    for seg in _DIGIT_SEGMENTS[digit["value"]]:
        (ax, ay), (bx, by) = _SEGMENTS[seg]
        draw.line(
            [(x0 + ax * DIGIT_W, y0 + ay * DIGIT_H), (x0 + bx * DIGIT_W, y0 + by * DIGIT_H)],
            fill=fill,
            width=DIGIT_STROKE,
        )


def render(scene: dict) -> Image.Image:
    """The RGB image of ``scene`` (deterministic: the noise comes from ``scene['noise_seed']``)."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (scene["background"],) * 3)
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        base = COLOURS[obj["colour"]]
        fill = tuple(int(np.clip(b + s, 0, 255)) for b, s in zip(base, obj["shade"]))
        _draw_object(draw, obj, fill)
    if scene["digit"] is not None:
        _draw_digit(draw, scene["digit"], DIGIT_COLOUR)
    arr = np.asarray(img, dtype=np.int16)
    noise = np.random.default_rng(scene["noise_seed"]).integers(-14, 15, size=arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")


def label_map(scene: dict) -> np.ndarray:
    """[H, W] uint8 map: 0 background, i+1 for object i, 255 for digit strokes (for training targets
    and relevant patches)."""
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(img)
    for i, obj in enumerate(scene["objects"]):
        _draw_object(draw, obj, i + 1)
    if scene["digit"] is not None:
        _draw_digit(draw, scene["digit"], 255)
    return np.asarray(img)


def caption(scene: dict) -> str:
    """A word-level caption listing the objects in raster order, e.g. "large red circle , small blue
    square , digit seven" (the text side of the contrastive CLIP objective)."""
    items = sorted(
        [(o["row"], o["col"], f"{o['size']} {o['colour']} {o['shape']}") for o in scene["objects"]]
        + ([(scene["digit"]["row"], scene["digit"]["col"], f"digit {NUMBER_WORDS[scene['digit']['value']]}")]
           if scene["digit"] is not None else [])
    )
    return " , ".join(t for _, _, t in items)


# ---------------------------------------------------------------------------------------- questions


def _combo_counts(scene: dict) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for o in scene["objects"]:
        counts[(o["colour"], o["shape"])] = counts.get((o["colour"], o["shape"]), 0) + 1
    return counts


def _pos(row: int, col: int) -> str:
    return f"row {NUMBER_WORDS[row + 1]} column {NUMBER_WORDS[col + 1]}"


def make_question(rng: np.random.Generator, family: str) -> tuple[dict, str, str, dict]:
    """A family-suited scene and a question of ``family`` about it.

    Returns (scene, question, answer, info) where info holds ``relevant_objects`` (object indices the
    answer depends on), ``relevant_digit`` (bool) and family-specific facts (e.g. ``neg_type``).
    """
    if family not in ALL_FAMILIES:
        raise ValueError(f"parameter 'family' must be one of {ALL_FAMILIES}, got {family!r}")
    for _ in range(1000):
        out = _try_question(rng, family)
        if out is not None:
            return out
    raise RuntimeError(f"could not build a {family!r} question in 1000 tries")  # pragma: no cover


def question_about(rng: np.random.Generator, scene: dict, family: str) -> tuple[str, str, dict] | None:
    """A ``family`` question about an existing ``scene`` (several turns per image in training), or
    None if the scene cannot support that family."""
    if family not in ALL_FAMILIES:
        raise ValueError(f"parameter 'family' must be one of {ALL_FAMILIES}, got {family!r}")
    for _ in range(5):
        out = _try_question(rng, family, scene)
        if out is not None:
            return out[1], out[2], out[3]
    return None


def _try_question(
    rng: np.random.Generator, family: str, scene: dict | None = None
) -> tuple[dict, str, str, dict] | None:
    """One attempt at a ``family`` question; builds a family-suited scene unless ``scene`` is given.
    Returns None when the scene cannot support the family (the caller retries)."""
    info: dict[str, Any] = {"relevant_objects": [], "relevant_digit": False}
    if family == "count":
        if scene is None:
            k = int(rng.integers(0, MAX_COUNT + 1))
            colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            n = int(rng.integers(max(k, 1), MAX_OBJECTS + 1))
            others = [c for c in COLOUR_NAMES if c != colour]
            cols: list[str | None] = [colour] * k + [others[int(rng.integers(len(others)))] for _ in range(n - k)]
            perm = rng.permutation(n)
            scene = random_scene(rng, n_objects=n, colours=[cols[int(p)] for p in perm])
        else:
            present = sorted({o["colour"] for o in scene["objects"]})
            pool = present if rng.random() < 0.6 else COLOUR_NAMES
            colour = pool[int(rng.integers(len(pool)))]
        idx = [i for i, o in enumerate(scene["objects"]) if o["colour"] == colour]
        if len(idx) >= len(NUMBER_WORDS):
            return None
        # With no object of that colour, every object must be inspected to answer "zero".
        info["relevant_objects"] = idx if idx else list(range(len(scene["objects"])))
        return scene, f"how many {colour} objects are there ?", NUMBER_WORDS[len(idx)], info

    if family in ("digit", "pos_digit"):
        if scene is None:
            scene = random_scene(rng, digit=True)
        d = scene["digit"]
        if d is None:
            return None
        info["relevant_digit"] = True
        q = "what digit is shown ?" if family == "digit" else f"what digit is at {_pos(d['row'], d['col'])} ?"
        return scene, q, NUMBER_WORDS[d["value"]], info

    if scene is None:
        if family == "relation":
            scene = random_scene(rng, n_objects=int(rng.integers(2, MAX_OBJECTS + 1)))
        else:
            scene = random_scene(rng)
    objs = scene["objects"]
    combos = _combo_counts(scene)

    if family == "colour":
        shape_counts = {s: sum(o["shape"] == s for o in objs) for s in SHAPES}
        unique = [i for i, o in enumerate(objs) if shape_counts[o["shape"]] == 1]
        if not unique:
            return None
        i = unique[int(rng.integers(len(unique)))]
        info["relevant_objects"] = [i]
        return scene, f"what is the colour of the {objs[i]['shape']} ?", objs[i]["colour"], info

    if family in ("shape", "pos_colour"):
        i = int(rng.integers(len(objs)))
        info["relevant_objects"] = [i]
        o = objs[i]
        if family == "shape":
            return scene, f"what is the shape at {_pos(o['row'], o['col'])} ?", o["shape"], info
        return scene, f"what is the colour of the object at {_pos(o['row'], o['col'])} ?", o["colour"], info

    if family == "pos_occupied":
        cell = int(rng.integers(GRID * GRID))
        row, col = divmod(cell, GRID)
        hit = [i for i, o in enumerate(objs) if (o["row"], o["col"]) == (row, col)]
        info["relevant_objects"] = hit
        return scene, f"is there an object at {_pos(row, col)} ?", "yes" if hit else "no", info

    if family in ("where_row", "where_col"):
        unique = [i for i, o in enumerate(objs) if combos[(o["colour"], o["shape"])] == 1]
        i = unique[int(rng.integers(len(unique)))] if unique else None
        if i is None:
            return None
        o = objs[i]
        info["relevant_objects"] = [i]
        what = "row" if family == "where_row" else "column"
        ans = NUMBER_WORDS[(o["row"] if family == "where_row" else o["col"]) + 1]
        return scene, f"which {what} is the {o['colour']} {o['shape']} in ?", ans, info

    if family == "exists":
        u = rng.random()
        if u < 0.5:
            i = int(rng.integers(len(objs)))
            info["relevant_objects"] = [i]
            c, s, neg = objs[i]["colour"], objs[i]["shape"], None
        else:
            # POPE-style negatives: half random, the other half "popular" (the shape is in the scene in
            # another colour) or "adversarial" (colour and shape both in the scene, on different objects).
            neg = "random" if u < 0.75 else ("popular" if u < 0.875 else "adversarial")
            absent = pope_negatives(objs, neg)
            if not absent:
                return None
            c, s = absent[int(rng.integers(len(absent)))]
            info["relevant_objects"] = negative_evidence(objs, c, s)
        info["neg_type"] = neg
        return scene, f"is there a {c} {s} ?", "yes" if neg is None else "no", info

    if family == "relation":
        unique = [i for i, o in enumerate(objs) if combos[(o["colour"], o["shape"])] == 1]
        pairs = [(i, j) for i in unique for j in unique if i != j and objs[i]["col"] != objs[j]["col"]]
        if not pairs:
            return None
        i, j = pairs[int(rng.integers(len(pairs)))]
        a, b = objs[i], objs[j]
        info["relevant_objects"] = [i, j]
        ans = "left" if a["col"] < b["col"] else "right"
        q = f"is the {a['colour']} {a['shape']} left or right of the {b['colour']} {b['shape']} ?"
        return scene, q, ans, info

    raise AssertionError(family)  # pragma: no cover


def pope_negatives(objs: list[dict], setting: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs absent from ``objs``, in POPE's ``setting``: ``random`` (any), ``popular``
    (the shape is in the scene in another colour) or ``adversarial`` (colour and shape both in the scene,
    on different objects); colour-major order."""
    present = {(o["colour"], o["shape"]) for o in objs}
    shapes_in, colours_in = {o["shape"] for o in objs}, {o["colour"] for o in objs}
    absent = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in present]
    if setting == "popular":
        return [(c, s) for c, s in absent if s in shapes_in]
    if setting == "adversarial":
        return [(c, s) for c, s in absent if s in shapes_in and c in colours_in]
    return absent


def negative_evidence(objs: list[dict], colour: str, shape: str) -> list[int]:
    """The objects that rule out "a <colour> <shape>" (sharing one attribute; every object if none does)."""
    near = [i for i, o in enumerate(objs) if o["colour"] == colour or o["shape"] == shape]
    return near if near else list(range(len(objs)))


def scene_key(scene: dict) -> tuple:
    """Structural identity of a scene (objects and digit, ignoring noise and shading)."""
    objs = tuple(sorted((o["row"], o["col"], o["shape"], o["colour"], o["size"]) for o in scene["objects"]))
    d = scene["digit"]
    return objs, (None if d is None else (d["row"], d["col"], d["value"]))


# ------------------------------------------------------------------------------------ relevant patches


def relevant_patches(scene: dict, info: dict, grid_hw: tuple[int, int], min_cover: float = 0.1) -> list[int]:
    """Patches of a ``grid_hw`` (rows, cols) grid covered by the answer-relevant objects / digit.

    A patch counts as covered when at least ``min_cover`` of its pixels belong to a relevant item, or
    when it contains the item's centre. Each item's centre patch comes first (in item order), then the
    other covered patches in raster order.
    """
    if len(grid_hw) != 2 or min(grid_hw) < 1:
        raise ValueError(f"parameter 'grid_hw' must be (rows, cols) with positive ints, got {grid_hw!r}")
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    lm = label_map(scene)
    ys = np.minimum((np.arange(IMAGE_SIZE) * gh) // IMAGE_SIZE, gh - 1)  # pixel row -> patch row
    xs = np.minimum((np.arange(IMAGE_SIZE) * gw) // IMAGE_SIZE, gw - 1)
    area = np.bincount(ys, minlength=gh)[:, None] * np.bincount(xs, minlength=gw)[None, :]  # [gh, gw]
    objs = scene["objects"]
    items: list[tuple[int, int, int]] = [(i + 1, objs[i]["cx"], objs[i]["cy"]) for i in info["relevant_objects"]]
    if info.get("relevant_digit") and scene["digit"] is not None:
        items.append((255, scene["digit"]["cx"], scene["digit"]["cy"]))
    centres: list[int] = []
    covered = np.zeros((gh, gw), dtype=bool)
    for label, cx, cy in items:
        mask = lm == label  # [H, W]
        py, px = np.nonzero(mask)
        cover = np.zeros((gh, gw))
        np.add.at(cover, (ys[py], xs[px]), 1)  # pixels of the item per patch
        covered |= cover / area >= min_cover
        c = int(ys[min(cy, IMAGE_SIZE - 1)] * gw + xs[min(cx, IMAGE_SIZE - 1)])
        if c not in centres:
            centres.append(c)
        covered.flat[c] = True
    rest = [int(p) for p in np.flatnonzero(covered) if int(p) not in centres]
    return centres + rest
