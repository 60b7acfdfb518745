"""Rule-based scorer: does an image show what a shapes-world caption says?

Pipeline (numpy + PIL only): rescale to 128x128, 3x3 box filter -> background from the border ->
per-pixel nearest colour among palette and backgrounds (with a distance cap) -> 3x3
morphological opening (removes 1-2 px edge halos and speckle noise of generated images)
-> connected components per colour -> shape from bounding-box geometry -> caption checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageFilter

from fluxion.data.shapes import BACKGROUNDS, CANVAS, COLORS, RELATIONS, Spec, parse_caption

_PALETTE_NAMES: tuple[str, ...] = tuple(COLORS)
_BG_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
# Object colours first, then backgrounds (which only act as "not an object" attractors).
_REFS = np.array([COLORS[c] for c in _PALETTE_NAMES] + [BACKGROUNDS[b] for b in _BG_NAMES], np.float32)

# A pixel counts as an object colour only if within this RGB distance of it: generated
# colours are only approximately right, but blended edge pixels are further away.
COLOR_THRESHOLD = 70.0
# Components smaller than this fraction of the canvas are noise. The smallest real object
# (a 26 px triangle) covers ~2% of the canvas, so the cut sits at half of that.
MIN_AREA_FRAC = 0.01
# Components filling less of their bounding box than this are halos/arcs, not shapes.
MIN_FILL = 0.3
# Bounding-box side (fraction of canvas) separating "small" from "large".
# Small sides are <= 35 px; large ones (45-57 px) measure >= ~42 px after opening trims
# triangle tips, and ~40 px under heavy blur, so split a little below the nominal midpoint.
SIZE_SPLIT = 0.30  # 38.4 px
BORDER_WIDTH = 2

# Shape prototypes in (fill ratio, top/bottom width ratio, corner fill) feature space:
# square fills its box; a circle fills pi/4 with empty corners; an apex-up triangle fills
# half, is narrow on top and fills only its bottom corners.
_SHAPE_PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "square": (1.0, 1.0, 1.0),
    "circle": (np.pi / 4, 1.0, 0.0),
    "triangle": (0.5, 0.14, 0.375),
}


@dataclass(frozen=True)
class DetectedObject:
    color: str
    shape: str
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), in 128-canvas pixels
    fill: float
    shape_distance: float  # distance to the chosen shape prototype (lower = more certain)

    @property
    def cx(self) -> float:
        return (self.bbox[0] + self.bbox[2]) / 2

    @property
    def cy(self) -> float:
        return (self.bbox[1] + self.bbox[3]) / 2

    @property
    def side(self) -> int:
        return max(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1])

    @property
    def equiv_side(self) -> float:
        """Side implied by the area and shape; steadier than the bbox when blur eats corners."""
        return float(np.sqrt(self.area / _SHAPE_PROTOTYPES[self.shape][0]))

    @property
    def size_name(self) -> str:
        # Blur shrinks both estimates (bbox at thin corners, area at acute ones): take the larger.
        return "small" if max(self.side, self.equiv_side) < SIZE_SPLIT * CANVAS else "large"


@dataclass
class ScoreResult:
    """Per-attribute verdicts; ``None`` means "not constrained by the caption"."""

    ok: bool
    spec: Optional[Spec]
    color: bool = False
    shape: bool = False
    count: bool = False
    relation: Optional[bool] = None
    size: Optional[bool] = None
    background: Optional[bool] = None
    detected_background: str = ""
    objects: list[DetectedObject] = field(default_factory=list)
    reason: str = ""


# ----------------------------------------------------------------------------- image -> objects


def to_canvas(image: Union[Image.Image, np.ndarray]) -> np.ndarray:
    """uint8-range float32 array [128, 128, 3]."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise TypeError(f"expected uint8 array, got {arr.dtype}")
        image = Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr)
    image = image.convert("RGB")
    if image.size != (CANVAS, CANVAS):
        image = image.resize((CANVAS, CANVAS), Image.BILINEAR)
    # A 3x3 box filter cuts per-pixel noise ~3x (generated images are grainy) while moving
    # edges by well under a pixel, so shapes and sizes are unaffected.
    image = image.filter(ImageFilter.BoxBlur(1))
    return np.asarray(image, dtype=np.float32)


def classify_background(img: np.ndarray) -> str:
    """Nearest background to the median border colour (robust to an object touching the edge)."""
    b = BORDER_WIDTH
    border = np.concatenate(
        [img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), img[:, :b].reshape(-1, 3), img[:, -b:].reshape(-1, 3)]
    )
    med = np.median(border, axis=0)
    refs = np.array([BACKGROUNDS[n] for n in _BG_NAMES], np.float32)
    return _BG_NAMES[int(np.argmin(((refs - med) ** 2).sum(1)))]


def _shift(a: np.ndarray, dy: int, dx: int, fill: int) -> np.ndarray:
    """out[y, x] = a[y + dy, x + dx], ``fill`` outside."""
    h, w = a.shape
    out = np.full_like(a, fill)
    out[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = a[
        max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)
    ]
    return out


_NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
_NEIGHBOURS_4 = [(-1, 0), (1, 0), (0, -1), (0, 1)]


def _class_map(img: np.ndarray) -> np.ndarray:
    """Palette index per pixel (0..5), or -1 for background / unsure pixels, after opening."""
    d2 = ((img[:, :, None, :] - _REFS[None, None]) ** 2).sum(-1)
    nearest = d2.argmin(-1)
    is_obj = (nearest < len(_PALETTE_NAMES)) & (d2.min(-1) < COLOR_THRESHOLD**2)
    cls = np.where(is_obj, nearest, -1).astype(np.int16)
    # Erosion: keep pixels whose whole 3x3 neighbourhood has the same class.
    eroded = cls.copy()
    for dy, dx in _NEIGHBOURS_8:
        eroded[_shift(cls, dy, dx, -1) != cls] = -1
    # Dilation back (a pixel next to an eroded core necessarily had the same class).
    opened = eroded.copy()
    for dy, dx in _NEIGHBOURS_8:
        s = _shift(eroded, dy, dx, -1)
        take = (opened < 0) & (s >= 0)
        opened[take] = s[take]
    return opened


def _label(cls: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative class; label = min flat index, -1 elsewhere.

    Min-label propagation with pointer jumping: converges in a few dozen vectorised steps.
    """
    h, w = cls.shape
    mask = cls >= 0
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    same = [(dy, dx, _shift(cls, dy, dx, -1) == cls) for dy, dx in _NEIGHBOURS_4]
    while True:
        new = lab.copy()
        for dy, dx, ok in same:
            np.minimum(new, np.where(ok, _shift(lab, dy, dx, big), big), out=new)
        flat = new.ravel()
        m = mask.ravel()
        flat[m] = flat[flat[m]]  # pointer jumping: a label names a pixel of the same component
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(mask, lab, -1)


def _shape_features(sub: np.ndarray) -> tuple[float, float, float]:
    """(fill, top/bottom width ratio, mean corner fill) of a component's bbox crop."""
    h, w = sub.shape
    fill = float(sub.mean())
    q = max(1, h // 4)
    top, bottom = float(sub[:q].mean()), float(sub[-q:].mean())
    ratio = top / max(bottom, 1e-6)
    k = max(1, int(round(0.15 * min(h, w))))
    corners = (sub[:k, :k].mean() + sub[:k, -k:].mean() + sub[-k:, :k].mean() + sub[-k:, -k:].mean()) / 4
    return fill, min(ratio, 1.5), float(corners)


def classify_shape(sub: np.ndarray) -> tuple[str, float]:
    """Nearest shape prototype for a boolean bbox crop, and its distance."""
    f = np.array(_shape_features(sub))
    best, best_d = "", np.inf
    for name, proto in _SHAPE_PROTOTYPES.items():
        d = float(np.linalg.norm(f - np.array(proto)))
        if d < best_d:
            best, best_d = name, d
    return best, best_d


def detect_objects(img: np.ndarray) -> list[DetectedObject]:
    """Significant coloured components (area and fill above thresholds), largest first."""
    cls = _class_map(img)
    lab = _label(cls)
    flat = lab.ravel()
    ids, areas = np.unique(flat[flat >= 0], return_counts=True)
    min_area = MIN_AREA_FRAC * cls.size
    objs: list[DetectedObject] = []
    for lid, area in zip(ids, areas):
        if area < min_area:
            continue
        ys, xs = np.nonzero(lab == lid)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        sub = lab[y0:y1, x0:x1] == lid
        fill = float(sub.mean())
        if fill < MIN_FILL:
            continue
        shape, dist = classify_shape(sub)
        color = _PALETTE_NAMES[int(cls.ravel()[lid])]
        objs.append(DetectedObject(color, shape, int(area), (x0, y0, x1, y1), fill, dist))
    objs.sort(key=lambda o: -o.area)
    return objs


# ----------------------------------------------------------------------------- checks


def arrangement(a: DetectedObject, b: DetectedObject) -> Optional[str]:
    """Where ``a`` is relative to ``b`` by bbox centres, on the dominant axis ("left of", "right of", "above",
    "below"); None when neither axis dominates."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # image y grows downwards
    if abs(dx) > abs(dy):
        return "left of" if dx > 0 else "right of"
    if abs(dy) > abs(dx):
        return "above" if dy > 0 else "below"
    return None


def relation_holds(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    """``a <relation> b`` by bbox centres: right direction on the dominant axis."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}")
    return arrangement(a, b) == relation


def _matches(o: DetectedObject, color: str, shape: str) -> bool:
    return o.color == color and o.shape == shape


def _check(spec: Spec, objs: list[DetectedObject], res: ScoreResult) -> None:
    reasons: list[str] = []
    if spec.kind in ("single", "count"):
        c, s = spec.colors[0], spec.shapes[0]
        hits = [o for o in objs if _matches(o, c, s)]
        if spec.kind == "single":
            res.color = any(o.color == c for o in objs)
            res.shape = bool(hits)
        else:
            res.color = bool(objs) and all(o.color == c for o in objs)
            res.shape = bool(objs) and all(o.shape == s for o in objs)
        # Exactly the requested objects and nothing else of significant size.
        res.count = len(hits) == spec.count and len(objs) == spec.count
        if spec.size is not None:
            res.size = len(hits) == 1 and hits[0].size_name == spec.size
    else:
        (ca, cb), (sa, sb) = spec.colors, spec.shapes
        res.color = any(o.color == ca for o in objs) and any(o.color == cb for o in objs)
        a_hits = [o for o in objs if _matches(o, ca, sa)]
        b_hits = [o for o in objs if _matches(o, cb, sb)]
        res.shape = bool(a_hits) and bool(b_hits)
        if (ca, sa) == (cb, sb):  # degenerate caption: two of the same object, either order
            res.count = len(a_hits) == 2 and len(objs) == 2
            res.relation = res.count and (
                relation_holds(a_hits[0], a_hits[1], spec.relation)
                or relation_holds(a_hits[1], a_hits[0], spec.relation)
            )
        else:
            res.count = len(a_hits) == 1 and len(b_hits) == 1 and len(objs) == 2
            res.relation = res.count and relation_holds(a_hits[0], b_hits[0], spec.relation)
    if spec.background is not None:
        res.background = res.detected_background == spec.background
    for name in ("color", "shape", "count", "relation", "size", "background"):
        if getattr(res, name) is False:
            reasons.append(name)
    res.ok = not reasons
    found = ", ".join(f"{o.size_name} {o.color} {o.shape}@({o.cx:.0f},{o.cy:.0f})" for o in objs) or "none"
    res.reason = ("ok" if res.ok else "failed: " + ", ".join(reasons)) + f"; found [{found}] on {res.detected_background}"


def score(image: Union[Image.Image, np.ndarray], caption: str) -> ScoreResult:
    """Judge whether ``image`` (PIL or uint8 [H, W, 3], any size) matches a canonical ``caption``."""
    try:
        spec = parse_caption(caption)
    except ValueError as e:
        return ScoreResult(ok=False, spec=None, reason=str(e))
    img = to_canvas(image)
    res = ScoreResult(ok=False, spec=spec, detected_background=classify_background(img))
    res.objects = detect_objects(img)
    _check(spec, res.objects, res)
    return res
