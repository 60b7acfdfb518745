"""Tests for the procedural shapes world generator."""

from __future__ import annotations

import re
from collections import Counter
from itertools import product

import numpy as np
import pytest

from fluxion.data import shapes as S
from fluxion.data.shapes import (
    BACKGROUNDS,
    BORDER,
    CANVAS,
    COLORS,
    GAP,
    HELDOUT,
    SIZE_RANGES,
    Scene,
    ShapesWorld,
    caption,
    format_spec,
    make_batch,
    parse_caption,
    render,
    sample_scene,
    scene_spec,
)

HELDOUT_RE = re.compile(r"\b(purple triangle|orange circle|green square)s?\b")


def _scenes(n: int, holdout: str = "exclude", seed: int = 0) -> list[Scene]:
    return [sample_scene(np.random.default_rng([seed, i]), holdout) for i in range(n)]


# ----------------------------------------------------------------------------- determinism


def test_make_batch_deterministic_and_resumable() -> None:
    a_img, a_cap = make_batch(7, 3, 12)
    b_img, b_cap = make_batch(7, 3, 12)
    assert a_img.shape == (12, CANVAS, CANVAS, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert a_img.std() > 10  # real, non-constant images
    # Another step or another seed gives different data.
    c_img, c_cap = make_batch(7, 4, 12)
    d_img, d_cap = make_batch(8, 3, 12)
    assert not np.array_equal(a_img, c_img) and a_cap != c_cap
    assert not np.array_equal(a_img, d_img) and a_cap != d_cap
    # Items depend only on (seed, index, item): a smaller batch is a prefix.
    e_img, e_cap = make_batch(7, 3, 5)
    assert np.array_equal(e_img, a_img[:5]) and e_cap == a_cap[:5]


def test_world_api_matches_make_batch() -> None:
    world = ShapesWorld(seed=5)
    img, cap = world.batch(4, step=9)
    ref_img, ref_cap = make_batch(5, 9, 4)
    assert np.array_equal(img, ref_img) and cap == ref_cap
    it = iter(ShapesWorld(seed=5))
    for k in range(3):
        im, c = next(it)
        one_img, one_cap = make_batch(5, k, 1)
        assert np.array_equal(np.asarray(im), one_img[0]) and c == one_cap[0]
    # sample(rng) is a pure function of the rng state.
    assert world.sample(np.random.default_rng(1)) == world.sample(np.random.default_rng(1))
    assert world.scene(2, 1) == world.scene(2, 1) != world.scene(2, 2)
    with pytest.raises(ValueError):
        ShapesWorld(seed=0, holdout="sometimes")  # type: ignore[arg-type]


def test_other_image_sizes() -> None:
    img, _ = make_batch(1, 0, 3, image_size=64)
    assert img.shape == (3, 64, 64, 3)


# ----------------------------------------------------------------------------- scene rules


@pytest.mark.parametrize("holdout", ["exclude", "include", "only"])
def test_scene_geometry_rules(holdout: str) -> None:
    scenes = _scenes(1500, holdout)
    for sc in scenes:
        assert sc.background in BACKGROUNDS
        boxes = [o.bbox for o in sc.objects]
        for o, (x0, y0, x1, y1) in zip(sc.objects, boxes):
            assert BORDER <= x0 and BORDER <= y0 and x1 <= CANVAS - BORDER and y1 <= CANVAS - BORDER
            lo, hi = SIZE_RANGES[o.size_name]
            assert lo <= o.side <= hi and x1 - x0 == o.side == y1 - y0
            assert 0.19 * CANVAS <= o.side <= 0.46 * CANVAS
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                separated = (
                    a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]
                )
                assert separated, (sc, a, b)
        if sc.kind == "single":
            assert len(sc.objects) == 1 and sc.relation is None
        elif sc.kind == "count":
            assert len(sc.objects) in (2, 3)
            assert len({(o.color, o.shape, o.side, o.size_name) for o in sc.objects}) == 1
            assert sc.objects[0].size_name == "small"
        else:
            a, b = sc.objects
            assert (a.color, a.shape) != (b.color, b.shape)
            ax0, ay0, ax1, ay1 = a.bbox
            bx0, by0, bx1, by1 = b.bbox
            dx, dy = b.cx - a.cx, b.cy - a.cy
            if sc.relation == "left of":
                assert ax1 + GAP <= bx0 and abs(dy) < abs(dx)
            elif sc.relation == "right of":
                assert bx1 + GAP <= ax0 and abs(dy) < abs(dx)
            elif sc.relation == "above":
                assert ay1 + GAP <= by0 and abs(dx) < abs(dy)
            elif sc.relation == "below":
                assert by1 + GAP <= ay0 and abs(dx) < abs(dy)
            else:
                pytest.fail(f"bad relation {sc.relation}")


def test_render_exact_colours() -> None:
    for sc in _scenes(200, "include", seed=3):
        img = np.asarray(render(sc))
        assert img.shape == (CANVAS, CANVAS, 3)
        assert tuple(img[0, 0]) == BACKGROUNDS[sc.background]
        for o in sc.objects:
            x0, y0, x1, y1 = o.bbox
            # A point well inside every shape: horizontally centred, 70% down the box
            # (inside the apex-up triangle too).
            px, py = int(o.cx), int(y0 + 0.7 * o.side)
            assert tuple(img[py, px]) == COLORS[o.color], (sc, o)
            # The box corner region is background for circles/triangles, colour for squares.
            corner = tuple(img[y0 + 1, x0 + 1])
            if o.shape == "square":
                assert corner == COLORS[o.color]
            else:
                assert corner == BACKGROUNDS[sc.background]


# ----------------------------------------------------------------------------- hold-outs


def test_training_sampler_never_emits_heldout_pairs() -> None:
    n_batches, n = 40, 60  # 2400 samples
    world = ShapesWorld(seed=11)
    for step in range(n_batches):
        _, caps = make_batch(11, step, n, paraphrase=True)
        for i, cap in enumerate(caps):
            assert not HELDOUT_RE.search(cap), cap
            sc = world.scene(step, i)
            assert all((o.color, o.shape) not in HELDOUT for o in sc.objects), sc
        _, canon = make_batch(11, step, 10, paraphrase=False)
        assert not any(HELDOUT_RE.search(c) for c in canon)


def test_holdout_only_always_contains_heldout_pair() -> None:
    scenes = _scenes(600, "only", seed=4)
    for sc in scenes:
        assert any((o.color, o.shape) in HELDOUT for o in sc.objects), sc
        assert HELDOUT_RE.search(caption(sc))
    assert {sc.kind for sc in scenes} == {"single", "count", "relation"}


# ----------------------------------------------------------------------------- captions


def _form(spec) -> tuple:
    if spec.kind == "single":
        return ("single", spec.size, spec.background)
    if spec.kind == "count":
        return ("count", spec.count, spec.background)
    return ("relation", spec.relation, spec.background)


def test_training_sampler_covers_every_canonical_form() -> None:
    bgs = (None, *BACKGROUNDS)
    wanted = (
        {("single", size, bg) for size, bg in product((None, "small", "large"), bgs)}
        | {("count", n, bg) for n, bg in product((2, 3), bgs)}
        | {("relation", r, bg) for r, bg in product(S.RELATIONS, bgs)}
    )
    seen, kinds, bg_named, total = set(), Counter(), 0, 0
    for step in range(40):
        _, caps = make_batch(3, step, 50, paraphrase=True)
        for cap in caps:
            spec = parse_caption(cap)
            total += 1
            kinds[spec.kind] += 1
            bg_named += spec.background is not None
            if format_spec(spec) == cap:  # canonical wording
                seen.add(_form(spec))
    assert wanted <= seen, sorted(wanted - seen, key=str)
    # Kind mix ~40/25/35 and background named ~70% of the time.
    assert abs(kinds["single"] / total - 0.40) < 0.05
    assert abs(kinds["count"] / total - 0.25) < 0.05
    assert abs(kinds["relation"] / total - 0.35) < 0.05
    assert abs(bg_named / total - 0.70) < 0.05


def test_kind_probs_sets_the_training_mix() -> None:
    kinds = Counter(parse_caption(c).kind for step in range(20)
                    for c in make_batch(3, step, 50, kind_probs=(0.1, 0.5, 0.4))[1])
    total = sum(kinds.values())
    assert abs(kinds["single"] / total - 0.1) < 0.04
    assert abs(kinds["count"] / total - 0.5) < 0.05
    assert abs(kinds["relation"] / total - 0.4) < 0.05
    # Only the kind draw moves: the default mix, passed explicitly, is the default stream bit for bit.
    a_img, a_cap = make_batch(4, 2, 8)
    b_img, b_cap = make_batch(4, 2, 8, kind_probs=S.KIND_PROBS)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert make_batch(4, 2, 8, kind_probs=(0.0, 0.0, 1.0))[1] != a_cap


@pytest.mark.parametrize("bad", [(0.5, 0.5), (0.5, 0.6, -0.1), (0.2, 0.2, 0.2), "0.4,0.25,0.35", (True, 0, 0)])
def test_bad_kind_probs_are_refused_by_name(bad) -> None:
    with pytest.raises(ValueError, match="kind_probs must be three shares"):
        S.check_kind_probs(bad)


def test_parse_caption_round_trip_and_paraphrases() -> None:
    rng = np.random.default_rng(0)
    paraphrased = set()
    for sc in _scenes(800, "include", seed=9):
        canon = caption(sc)
        assert parse_caption(canon) == scene_spec(sc), canon
        assert format_spec(scene_spec(sc)) == canon
        para = caption(sc, rng, paraphrase=True)
        paraphrased.add(para)
        p, full = parse_caption(para), scene_spec(sc)
        assert (p.kind, p.colors, p.shapes, p.count, p.relation) == (
            full.kind, full.colors, full.shapes, full.count, full.relation,
        ), para
        assert p.size in (None, full.size) and p.background in (None, full.background)
    joined = " | ".join(paraphrased)
    for phrase in ("to the left of", "on top of", "under", "big", "grey", "against a"):
        assert phrase in joined, phrase


def test_caption_articles_and_examples() -> None:
    o = S.ShapeObject("orange", "square", "large", 40.0, 40.0, 50)
    sc = Scene("black", (o,), "single")
    assert caption(sc) == "a large orange square on a black background"
    sc = Scene("gray", (S.ShapeObject("orange", "square", "small", 30.0, 30.0, 30),), "single")
    assert caption(sc) == "a small orange square on a gray background"
    assert format_spec(S.Spec("single", ("orange",), ("square",), 1)) == "an orange square"
    assert format_spec(S.Spec("count", ("red",), ("triangle",), 3, background="white")) == (
        "three red triangles on a white background"
    )
    rel = S.Spec("relation", ("blue", "orange"), ("circle", "triangle"), 2, "below", None, None)
    assert format_spec(rel) == "a blue circle below an orange triangle"
    assert parse_caption("An orange square.") == S.Spec("single", ("orange",), ("square",), 1)
    for bad in ("a pink circle", "four red squares", "a red circle near a blue square", ""):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_shape_only_captions_leave_out_the_colour_of_single_and_count_scenes() -> None:
    n = 400
    _, full = make_batch(21, 0, n, paraphrase=True)
    _, none = make_batch(21, 0, n, paraphrase=True, shape_only=0.0)
    assert none == full  # at 0 the stream is the one runs before shape_only drew
    _, half = make_batch(21, 0, n, paraphrase=True, shape_only=0.5)
    colour = re.compile(r"\b(" + "|".join(S.COLORS) + r")\b")
    world = ShapesWorld(seed=21)
    kinds = [world.scene(0, i).kind for i in range(n)]
    relation = [c for c, k in zip(half, kinds) if k == "relation"]
    others = [c for c, k in zip(half, kinds) if k != "relation"]
    assert relation and all(len(colour.findall(c)) == 2 for c in relation)  # relations always name both colours
    colourless = [c for c in others if not colour.search(c)]
    assert 0.35 < len(colourless) / len(others) < 0.65, (len(colourless), len(others))
    for c in colourless:  # the shape is still named: "a large square", "3 triangles on grey"
        assert re.search(r"\b(circle|square|triangle)s?\b", c), c
    with pytest.raises(ValueError, match="name_color=False is for single and count captions"):
        S.format_spec(S.Spec("relation", ("red", "blue"), ("circle", "square"), 2, "above"), name_color=False)


def test_off_palette_scenes_keep_their_captions_and_never_draw_a_named_or_held_out_colour() -> None:
    from fluxion.eval.scorer import COLOR_THRESHOLD
    n = 300
    images0, captions0 = make_batch(22, 0, n, paraphrase=True, shape_only=0.5)
    images, captions = make_batch(22, 0, n, paraphrase=True, shape_only=0.5, off_palette=1.0)
    assert captions == captions0  # recolouring draws after the caption: the words are the same
    world = ShapesWorld(seed=22)
    named = np.array(list(S.COLORS.values()) + list(S.BACKGROUNDS.values()), np.float32)
    colour = re.compile(r"\b(" + "|".join(S.COLORS) + r")\b")
    recoloured = 0
    for i, text in enumerate(captions):
        scene = world.scene(0, i)
        o = scene.objects[0]
        x0, y0, x1, y1 = o.bbox
        centre = images[i, (y0 + y1) // 2 + (o.side // 4 if o.shape == "triangle" else 0), (x0 + x1) // 2]
        if scene.kind == "relation" or colour.search(text):  # colour named: drawn exactly as before
            np.testing.assert_array_equal(images[i], images0[i])
            continue
        recoloured += 1
        distance = np.linalg.norm(named - centre.astype(np.float32), axis=1)
        assert distance.min() > COLOR_THRESHOLD, (text, centre)  # the scorer never reads it as a named colour
        nearest = (list(S.COLORS) + list(S.BACKGROUNDS))[int(distance.argmin())]
        assert (nearest, o.shape) not in S.HELDOUT, (text, centre)
    assert recoloured > 40
    # Every recoloured object of a count scene shares one colour, and relation scenes refuse.
    rng = np.random.default_rng(0)
    count = S.scene_from_spec(S.Spec("count", ("red",), ("square",), 3), rng)
    again = S.recolor_off_palette(count, rng)
    assert len({o.color for o in again.objects}) == 1 and again.objects[0].color.startswith("#")
    assert [o.bbox for o in again.objects] == [o.bbox for o in count.objects]
    relation = S.scene_from_spec(S.Spec("relation", ("red", "blue"), ("circle", "square"), 2, "above"), rng)
    with pytest.raises(ValueError, match="for single and count scenes"):
        S.recolor_off_palette(relation, rng)
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        S.render(S.Scene("white", (S.ShapeObject("pink", "square", "small", 64, 64, 30),), "single"))
