"""Procedural "shapes world": seeded, infinite (image, caption) pairs for a small text-to-image model.

Everything is generated on the fly from ``numpy.random.Generator`` streams keyed by
``(seed, index, item)``, so a training loop can resume at any step without replaying
earlier batches.  Geometry is kept on a 128x128 canvas (integer boxes); ``render`` scales
it to any output size.

Three colour-shape pairs (``HELDOUT``) never appear in the training sampler; they exist
only for evaluating compositional generalisation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import count as _count
from typing import Iterator, Literal, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- constants

CANVAS = 128

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 50),
    "purple": (140, 70, 190),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
KINDS: tuple[str, ...] = ("single", "count", "relation")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three"}

# Bounding-box side in canvas pixels (inclusive ranges): small ~20-28%, large ~35-45% of 128.
SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (26, 35), "large": (45, 57)}

# Colour-shape pairs that the training sampler must never emit.
HELDOUT: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("green", "square")}
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELDOUT)
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p in HELDOUT)

BORDER = 3  # objects keep this many pixels from the canvas edge (scorer reads the border)
GAP = 4  # minimum empty pixels between two bounding boxes
# For relation scenes the off-axis centre offset is at most this fraction of the on-axis
# offset, so "left of" vs "above" is never ambiguous for a centroid-based scorer.
RELATION_SLOPE = 0.5

# Training mix of scene kinds and how often the background is named in captions.
KIND_PROBS: tuple[float, float, float] = (0.40, 0.25, 0.35)
P_MENTION_BACKGROUND = 0.70
P_MENTION_SIZE = 0.70
P_CANONICAL_WORD = 0.5  # when paraphrasing, chance each phrase keeps its canonical wording
# Shape-only captions ("a square", "three triangles") are off by default; see ``caption``'s ``shape_only``.
# An off-palette colour keeps at least this RGB distance from every palette and background colour: beyond the
# scorer's 70 (fluxion.eval.scorer.COLOR_THRESHOLD), so no such object is ever read as a named colour.
OFF_PALETTE_MIN_DISTANCE = 80.0
_NAMED_RGB = np.array(list(COLORS.values()) + list(BACKGROUNDS.values()), np.float32)  # palette first

Holdout = Literal["exclude", "only", "include"]
HOLDOUT_MODES: tuple[str, ...] = ("exclude", "only", "include")

# ----------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class ShapeObject:
    """One filled, axis-aligned shape; (cx, cy) is the centre of its square bounding box."""

    color: str
    shape: str
    size_name: str
    cx: float
    cy: float
    side: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) with x1/y1 exclusive, in canvas pixels."""
        x0 = int(round(self.cx - self.side / 2))
        y0 = int(round(self.cy - self.side / 2))
        return x0, y0, x0 + self.side, y0 + self.side


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]
    kind: str  # "single" | "count" | "relation"
    relation: Optional[str] = None  # for "relation": objects[0] <relation> objects[1]


@dataclass(frozen=True)
class Spec:
    """Structured content of a caption. ``None`` fields are unconstrained."""

    kind: str
    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    count: int
    relation: Optional[str] = None
    size: Optional[str] = None  # single scenes only
    background: Optional[str] = None

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple(zip(self.colors, self.shapes))

    @property
    def is_heldout(self) -> bool:
        return any(p in HELDOUT for p in self.pairs)


# ----------------------------------------------------------------------------- captions

_PLURAL = {s: s + "s" for s in SHAPES}

# Paraphrase vocabularies; element 0 is always the canonical wording.
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_BG_WORDS = {"white": ("white",), "black": ("black",), "gray": ("gray", "grey")}
_BG_TEMPLATES = ("on a {} background", "against a {} background", "on {}")
_COUNT_VARIANTS = {2: ("two", "2"), 3: ("three", "3")}
_RELATION_WORDS = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "on top of", "over"),
    "below": ("below", "under", "beneath"),
}


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(options: Sequence[str], rng: Optional[np.random.Generator]) -> str:
    # Canonical wording stays the most common so every canonical form is well covered.
    if rng is None or len(options) == 1 or rng.random() < P_CANONICAL_WORD:
        return options[0]
    return options[int(rng.integers(1, len(options)))]


def format_spec(spec: Spec, rng: Optional[np.random.Generator] = None, name_color: bool = True) -> str:
    """Text for ``spec``: canonical when ``rng`` is None, otherwise with random paraphrase words.
    ``name_color=False`` leaves out the colour of a single or count caption ("a large square")."""
    if not name_color and spec.kind == "relation":
        raise ValueError("name_color=False is for single and count captions; a relation names both colours")
    color = [spec.colors[0]] if name_color else []
    if spec.kind == "single":
        words = color + [spec.shapes[0]]
        if spec.size is not None:
            words.insert(0, _pick(_SIZE_WORDS[spec.size], rng))
        text = _with_article(" ".join(words))
    elif spec.kind == "count":
        text = " ".join([_pick(_COUNT_VARIANTS[spec.count], rng)] + color + [_PLURAL[spec.shapes[0]]])
    elif spec.kind == "relation":
        a = _with_article(f"{spec.colors[0]} {spec.shapes[0]}")
        b = _with_article(f"{spec.colors[1]} {spec.shapes[1]}")
        text = f"{a} {_pick(_RELATION_WORDS[spec.relation], rng)} {b}"
    else:
        raise ValueError(f"unknown kind {spec.kind!r}")
    if spec.background is not None:
        template = _pick(_BG_TEMPLATES, rng)
        text += " " + template.format(_pick(_BG_WORDS[spec.background], rng))
    return text


def scene_spec(scene: Scene) -> Spec:
    """The fully specified spec (size and background included) that ``scene`` depicts."""
    objs = scene.objects
    if scene.kind == "single":
        o = objs[0]
        return Spec("single", (o.color,), (o.shape,), 1, None, o.size_name, scene.background)
    if scene.kind == "count":
        o = objs[0]
        return Spec("count", (o.color,), (o.shape,), len(objs), None, None, scene.background)
    a, b = objs
    return Spec(
        "relation", (a.color, b.color), (a.shape, b.shape), 2, scene.relation, None, scene.background
    )


def caption(scene: Scene, rng: Optional[np.random.Generator] = None, paraphrase: bool = False,
            shape_only: float = 0.0) -> str:
    """Canonical, fully specified caption; with ``paraphrase`` (needs ``rng``) optional parts may
    be dropped (background ~30%, size ~30%) and phrases reworded.

    ``shape_only`` (paraphrase only): the chance that a single or count caption leaves out the colour ("three
    squares"). Such captions tie a shape word to its shape whatever the colour, which is what a held-out pair
    ("a green square", never drawn in training) asks of the model; full captions bind colour and shape together.
    At 0 no extra number is drawn, so the streams of runs without it are unchanged."""
    return _caption(scene, rng, paraphrase, shape_only)[0]


def _caption(scene: Scene, rng: Optional[np.random.Generator], paraphrase: bool,
             shape_only: float) -> tuple[str, bool]:
    """:func:`caption`'s text, and whether it names the colour (make_batch recolours the scenes it does not)."""
    spec = scene_spec(scene)
    if not paraphrase:
        return format_spec(spec), True
    if rng is None:
        raise ValueError("paraphrase=True needs an rng")
    drop_bg = rng.random() >= P_MENTION_BACKGROUND
    drop_size = rng.random() >= P_MENTION_SIZE
    drop_color = shape_only > 0 and spec.kind != "relation" and rng.random() < shape_only
    spec = Spec(
        spec.kind,
        spec.colors,
        spec.shapes,
        spec.count,
        spec.relation,
        None if drop_size else spec.size,
        None if drop_bg else spec.background,
    )
    return format_spec(spec, rng, name_color=not drop_color), not drop_color


# Parser: accepts canonical captions and the paraphrase vocabulary above.
_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_SIZE_LOOKUP = {w: k for k, ws in _SIZE_WORDS.items() for w in ws}
_BG_LOOKUP = {w: k for k, ws in _BG_WORDS.items() for w in ws}
_COUNT_LOOKUP = {w: k for k, ws in _COUNT_VARIANTS.items() for w in ws}
_REL_LOOKUP = {w: k for k, ws in _RELATION_WORDS.items() for w in ws}
_REL_PHRASES = sorted(_REL_LOOKUP, key=len, reverse=True)  # longest first: "to the left of" before "left of"

_BG_SUFFIX = re.compile(
    r"^(?P<rest>.*?)\s+(?:on|against)\s+(?:an?\s+)?(?P<bg>" + "|".join(_BG_LOOKUP) + r")(?:\s+background)?$"
)
_NOUN = re.compile(
    r"^(?:a|an|one)\s+(?:(?P<size>" + "|".join(_SIZE_LOOKUP) + r")\s+)?"
    r"(?P<color>" + _COLOR_RE + r")\s+(?P<shape>" + _SHAPE_RE + r")$"
)
_COUNT = re.compile(
    r"^(?P<n>" + "|".join(_COUNT_LOOKUP) + r")\s+(?P<color>" + _COLOR_RE + r")\s+(?P<shape>"
    + _SHAPE_RE + r")s$"
)
# Longest relation phrases first so "to the left of" wins over "left of".
_RELATION = re.compile(
    r"^(?P<a>.+?)\s+(?P<rel>" + "|".join(_REL_PHRASES) + r")\s+(?P<b>.+)$"
)


def parse_caption(text: str) -> Spec:
    """Parse a canonical (or paraphrased) caption into a :class:`Spec`; raises ``ValueError``."""
    t = " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())
    background = None
    m = _BG_SUFFIX.match(t)
    if m:
        t, background = m.group("rest"), _BG_LOOKUP[m.group("bg")]
    m = _NOUN.match(t)
    if m:
        size = _SIZE_LOOKUP[m.group("size")] if m.group("size") else None
        return Spec("single", (m.group("color"),), (m.group("shape"),), 1, None, size, background)
    m = _COUNT.match(t)
    if m:
        n = _COUNT_LOOKUP[m.group("n")]
        return Spec("count", (m.group("color"),), (m.group("shape"),), n, None, None, background)
    m = _RELATION.match(t)
    if m:
        a, b = _NOUN.match(m.group("a")), _NOUN.match(m.group("b"))
        if a and b:
            return Spec(
                "relation",
                (a.group("color"), b.group("color")),
                (a.group("shape"), b.group("shape")),
                2,
                _REL_LOOKUP[m.group("rel")],
                None,
                background,
            )
    raise ValueError(f"cannot parse caption: {text!r}")


# Where each object of a relation caption stands, by the caption's words alone: the text encoder's role targets.
WORD_ROLES: tuple[str, ...] = ("other", "left", "right", "top", "bottom")
_SIDES = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"),
          "below": ("bottom", "top")}


def word_roles(text: str) -> list[int]:
    """One index into WORD_ROLES per whitespace word of ``text``: the colour and shape words of a relation
    caption's two objects get their object's side ("a red circle left of a blue square": red, circle -> left;
    blue, square -> right); every other word, and every word of other captions, is "other".

    A text encoder whose outputs carry these roles tells the transformer which object goes where; one trained
    only through the denoising loss can stay a bag of words, in which "A left of B" and "B left of A" are the
    same caption (issue #20's diagnosis, `bench/caption_swap_loss.py`)."""
    words = text.lower().split()
    roles = [0] * len(words)
    try:
        spec = parse_caption(text)
    except ValueError:
        return roles
    if spec.kind != "relation":
        return roles
    for start in range(len(words)):
        hit = next((p for p in _REL_PHRASES if words[start : start + len(p.split())] == p.split()), None)
        if hit is not None:
            break
    else:
        return roles
    first, second = _SIDES[_REL_LOOKUP[hit]]
    named = set(COLORS) | set(SHAPES)
    for i, w in enumerate(words):
        if w in named:
            roles[i] = WORD_ROLES.index(first if i < start else second)
    return roles


# ----------------------------------------------------------------------------- sampling


def _choice(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _side(rng: np.random.Generator, size_name: str) -> int:
    lo, hi = SIZE_RANGES[size_name]
    return int(rng.integers(lo, hi + 1))


def _pairs_for(holdout: Holdout) -> tuple[tuple[str, str], ...]:
    return {"exclude": TRAIN_PAIRS, "only": HELDOUT_PAIRS, "include": ALL_PAIRS}[holdout]


def check_kind_probs(kind_probs: Sequence[float]) -> tuple[float, float, float]:
    """The training mix as three non-negative shares of (single, count, relation) summing to 1, or one ValueError."""
    probs = tuple(kind_probs) if isinstance(kind_probs, (list, tuple)) else ()
    if (len(probs) != 3 or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1
                                   for p in probs) or abs(sum(probs) - 1) > 1e-6):
        raise ValueError(f"kind_probs must be three shares of (single, count, relation) scenes in [0, 1] summing "
                         f"to 1, e.g. {list(KIND_PROBS)}; got {kind_probs!r}")
    return tuple(float(p) for p in probs)


def sample_spec(rng: np.random.Generator, holdout: Holdout = "exclude",
                kind_probs: tuple[float, float, float] = KIND_PROBS) -> Spec:
    """A fully specified spec (size for single scenes, background always) from the training mix.

    ``holdout``: "exclude" never uses a held-out pair; "only" always uses at least one;
    "include" draws from all pairs. ``kind_probs``: the shares of single, count and relation scenes.
    """
    u = rng.random()
    kind = "single" if u < kind_probs[0] else "count" if u < kind_probs[0] + kind_probs[1] else "relation"
    background = _choice(rng, tuple(BACKGROUNDS))
    pairs = _pairs_for(holdout)
    if kind == "single":
        c, s = _choice(rng, pairs)
        return Spec("single", (c,), (s,), 1, None, _choice(rng, ("small", "large")), background)
    if kind == "count":
        c, s = _choice(rng, pairs)
        return Spec("count", (c,), (s,), int(rng.integers(2, 4)), None, None, background)
    if holdout == "only":
        # One held-out object plus any other (distinct) pair, in random order.
        first = _choice(rng, HELDOUT_PAIRS)
        second = _choice(rng, tuple(p for p in ALL_PAIRS if p != first))
        a, b = (first, second) if rng.random() < 0.5 else (second, first)
    else:
        i, j = rng.choice(len(pairs), size=2, replace=False)
        a, b = pairs[int(i)], pairs[int(j)]
    return Spec("relation", (a[0], b[0]), (a[1], b[1]), 2, _choice(rng, RELATIONS), None, background)


def _boxes_clear(boxes: Sequence[tuple[int, int, int]], x0: int, y0: int, side: int) -> bool:
    """True if the new box is at least GAP pixels from every existing (x0, y0, side) box."""
    for bx, by, bs in boxes:
        if x0 < bx + bs + GAP and bx < x0 + side + GAP and y0 < by + bs + GAP and by < y0 + side + GAP:
            return False
    return True


def _place_free(rng: np.random.Generator, sides: Sequence[int]) -> list[tuple[int, int, int]]:
    """Non-overlapping random positions for boxes of the given sides (rejection sampling)."""
    while True:
        boxes: list[tuple[int, int, int]] = []
        for side in sides:
            hi = CANVAS - BORDER - side
            for _ in range(200):
                x0, y0 = (int(v) for v in rng.integers(BORDER, hi + 1, size=2))
                if _boxes_clear(boxes, x0, y0, side):
                    boxes.append((x0, y0, side))
                    break
            else:
                break  # could not fit this one: restart the whole layout
        if len(boxes) == len(sides):
            return boxes


def _place_pair_along_x(rng: np.random.Generator, s_first: int, s_second: int) -> tuple[
    tuple[int, int], tuple[int, int]
]:
    """Top-left corners for two boxes, the first entirely left of the second, with a small
    vertical centre offset (|dy| <= RELATION_SLOPE * dx)."""
    hi = CANVAS - BORDER
    while True:
        xa = int(rng.integers(BORDER, hi - s_first - GAP - s_second + 1))
        xb = int(rng.integers(xa + s_first + GAP, hi - s_second + 1))
        dx = (xb + s_second / 2) - (xa + s_first / 2)
        ya = int(rng.integers(BORDER, hi - s_first + 1))
        cya = ya + s_first / 2
        r = RELATION_SLOPE * dx
        lo_b = max(BORDER, int(np.ceil(cya - r - s_second / 2)))
        hi_b = min(hi - s_second, int(np.floor(cya + r - s_second / 2)))
        if lo_b <= hi_b:
            yb = int(rng.integers(lo_b, hi_b + 1))
            return (xa, ya), (xb, yb)


def _obj(color: str, shape: str, size_name: str, x0: int, y0: int, side: int) -> ShapeObject:
    return ShapeObject(color, shape, size_name, x0 + side / 2, y0 + side / 2, side)


def scene_from_spec(spec: Spec, rng: np.random.Generator) -> Scene:
    """A random scene satisfying ``spec``; unconstrained fields (None) are drawn at random."""
    background = spec.background or _choice(rng, tuple(BACKGROUNDS))
    if spec.kind == "single":
        size_name = spec.size or _choice(rng, ("small", "large"))
        side = _side(rng, size_name)
        (x0, y0, _), = _place_free(rng, [side])
        obj = _obj(spec.colors[0], spec.shapes[0], size_name, x0, y0, side)
        return Scene(background, (obj,), "single")
    if spec.kind == "count":
        side = _side(rng, "small")  # identical objects: one shared small size so three always fit
        boxes = _place_free(rng, [side] * spec.count)
        objs = tuple(_obj(spec.colors[0], spec.shapes[0], "small", x, y, s) for x, y, s in boxes)
        return Scene(background, objs, "count")
    if spec.kind != "relation":
        raise ValueError(f"unknown kind {spec.kind!r}")
    sizes = [_choice(rng, ("small", "large")) for _ in range(2)]
    sides = [_side(rng, n) for n in sizes]
    # Lay out along x with the "first" box left/top; map to the requested relation.
    a_first = spec.relation in ("left of", "above")
    s_first, s_second = (sides[0], sides[1]) if a_first else (sides[1], sides[0])
    p_first, p_second = _place_pair_along_x(rng, s_first, s_second)
    pa, pb = (p_first, p_second) if a_first else (p_second, p_first)
    if spec.relation in ("above", "below"):  # transpose the horizontal layout
        pa, pb = (pa[1], pa[0]), (pb[1], pb[0])
    a = _obj(spec.colors[0], spec.shapes[0], sizes[0], pa[0], pa[1], sides[0])
    b = _obj(spec.colors[1], spec.shapes[1], sizes[1], pb[0], pb[1], sides[1])
    return Scene(background, (a, b), "relation", spec.relation)


def sample_scene(rng: np.random.Generator, holdout: Holdout = "exclude",
                 kind_probs: tuple[float, float, float] = KIND_PROBS) -> Scene:
    return scene_from_spec(sample_spec(rng, holdout, kind_probs), rng)


# ----------------------------------------------------------------------------- rendering


def render(scene: Scene, size: int = CANVAS, supersample: int = 4) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image.

    Drawn at ``supersample`` x resolution and box-downsampled: edges get soft, interiors
    keep the exact palette colour (box averages of identical pixels are exact).
    """
    ss = max(1, int(supersample))
    big = size * ss
    k = big / CANVAS
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        fill = COLORS[o.color] if o.color in COLORS else _hex_rgb(o.color)
        # PIL boxes are inclusive of the last pixel, hence the -1.
        X0, Y0, X1, Y1 = x0 * k, y0 * k, x1 * k - 1, y1 * k - 1
        if o.shape == "square":
            draw.rectangle((X0, Y0, X1, Y1), fill=fill)
        elif o.shape == "circle":
            draw.ellipse((X0, Y0, X1, Y1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon(((X0, Y1), (X1, Y1), ((X0 + X1) / 2, Y0)), fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return img.reduce(ss) if ss > 1 else img


def _hex_rgb(color: str) -> tuple[int, int, int]:
    if not re.fullmatch(r"#[0-9a-f]{6}", color):
        raise ValueError(f"unknown colour {color!r}: a palette name ({', '.join(COLORS)}) or '#rrggbb'")
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def off_palette_color(rng: np.random.Generator, shape: str) -> str:
    """A random '#rrggbb' at least OFF_PALETTE_MIN_DISTANCE from every palette and background colour, whose
    nearest palette colour is not one held out for ``shape`` (no near-green square, say)."""
    palette = tuple(COLORS)
    while True:
        rgb = rng.integers(0, 256, size=3)
        d = np.linalg.norm(_NAMED_RGB - rgb, axis=1)
        if d.min() < OFF_PALETTE_MIN_DISTANCE or (palette[int(d[:len(palette)].argmin())], shape) in HELDOUT:
            continue
        return "#" + "".join(f"{int(v):02x}" for v in rgb)


def recolor_off_palette(scene: Scene, rng: np.random.Generator) -> Scene:
    """``scene`` (single or count) with its objects in one off-palette colour: for shape-only captions, which
    name no colour, so the model sees each shape in many colours without ever seeing a held-out pair."""
    if scene.kind == "relation":
        raise ValueError("recolor_off_palette is for single and count scenes; a relation caption names both colours")
    color = off_palette_color(rng, scene.objects[0].shape)
    objs = tuple(ShapeObject(color, o.shape, o.size_name, o.cx, o.cy, o.side) for o in scene.objects)
    return Scene(scene.background, objs, scene.kind, scene.relation)


# ----------------------------------------------------------------------------- batches


def _item_rng(seed: int, index: int, item: int) -> np.random.Generator:
    # Independent stream per (seed, index, item): resumable and independent of batch size.
    return np.random.default_rng([int(seed), int(index), int(item)])


def make_batch(
    seed: int,
    index: int,
    n: int,
    image_size: int = CANVAS,
    paraphrase: bool = True,
    holdout: Holdout = "exclude",
    kind_probs: tuple[float, float, float] = KIND_PROBS,
    shape_only: float = 0.0,
    off_palette: float = 0.0,
) -> tuple[np.ndarray, list[str]]:
    """Deterministic batch ``index`` of stream ``seed``: uint8 images [n, H, W, 3] and captions
    (``shape_only``: see :func:`caption`; ``off_palette``: the chance that a scene whose caption names no colour
    is drawn in an off-palette colour, :func:`recolor_off_palette`; at 0 no extra number is drawn).

    Item ``i`` depends only on (seed, index, i), so a prefix of a bigger batch equals the
    smaller batch and a run can resume at any step.
    """
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    captions: list[str] = []
    for i in range(n):
        rng = _item_rng(seed, index, i)
        scene = sample_scene(rng, holdout, kind_probs)
        text, names_color = _caption(scene, rng, paraphrase, shape_only)
        if off_palette > 0 and not names_color and rng.random() < off_palette:
            scene = recolor_off_palette(scene, rng)
        images[i] = np.asarray(render(scene, image_size))
        captions.append(text)
    return images, captions


@dataclass
class ShapesWorld:
    """Seeded, infinite shapes world. ``holdout`` selects which colour-shape pairs may appear."""

    seed: int = 0
    holdout: Holdout = "exclude"
    image_size: int = CANVAS
    paraphrase: bool = True

    def __post_init__(self) -> None:
        if self.holdout not in HOLDOUT_MODES:
            raise ValueError(f"holdout must be one of {HOLDOUT_MODES}, got {self.holdout!r}")

    def sample(self, rng: np.random.Generator) -> Scene:
        return sample_scene(rng, self.holdout)

    def scene(self, index: int, item: int = 0) -> Scene:
        """The scene behind item ``item`` of batch ``index`` (same stream as :meth:`batch`)."""
        return self.sample(_item_rng(self.seed, index, item))

    def batch(self, n: int, step: int) -> tuple[np.ndarray, list[str]]:
        return make_batch(self.seed, step, n, self.image_size, self.paraphrase, self.holdout)

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        """Endless (image, caption) pairs; pair k equals ``batch(1, k)``."""
        for k in _count():
            rng = _item_rng(self.seed, k, 0)
            scene = self.sample(rng)
            yield render(scene, self.image_size), caption(scene, rng, paraphrase=self.paraphrase)
