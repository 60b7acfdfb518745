"""Tests for the shapes-world scorer, the eval prompt set and the report helpers."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fluxion.data.shapes import (
    BACKGROUNDS,
    COLORS,
    HELDOUT,
    SHAPES,
    Scene,
    ShapeObject,
    caption,
    format_spec,
    parse_caption,
    render,
    sample_scene,
    scene_from_spec,
    scene_spec,
)
from fluxion.eval.prompts import EvalItem, eval_set
from fluxion.eval.report import accuracy_table, contact_sheet, format_table
from fluxion.eval.scorer import ScoreResult, score


def _scenes(n: int, holdout: str, seed: int, kind: str | None = None) -> list[Scene]:
    out, i = [], 0
    while len(out) < n:
        sc = sample_scene(np.random.default_rng([seed, i]), holdout)  # type: ignore[arg-type]
        i += 1
        if kind is None or sc.kind == kind:
            out.append(sc)
    return out


def _accuracy(scenes: list[Scene], transform=None) -> float:
    rng = np.random.default_rng(123)
    ok = 0
    for sc in scenes:
        img = render(sc)
        if transform is not None:
            img = transform(img, rng)
        ok += score(img, caption(sc)).ok
    return ok / len(scenes)


# ----------------------------------------------------------------------------- ground truth


def test_scorer_accuracy_on_ground_truth() -> None:
    scenes = _scenes(900, "include", seed=1) + _scenes(300, "only", seed=2)
    assert sum(any((o.color, o.shape) in HELDOUT for o in s.objects) for s in scenes) > 300
    assert _accuracy(scenes) >= 0.99


def _noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(img, np.float32) + rng.normal(0.0, 8.0, (img.height, img.width, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(1))


@pytest.mark.parametrize("transform", [_noise, _blur, lambda im, r: _noise(_blur(im, r), r)])
def test_scorer_robust_to_noise_and_blur(transform) -> None:
    assert _accuracy(_scenes(200, "include", seed=5), transform) >= 0.95


def test_scorer_accepts_arrays_of_any_size() -> None:
    for sc in _scenes(20, "include", seed=6):
        img = render(sc)
        cap = caption(sc)
        assert score(np.asarray(img), cap).ok
        assert score(img.resize((256, 256), Image.BICUBIC), cap).ok
        assert score(np.asarray(render(sc, size=64)), cap).ok


def test_score_result_diagnostics() -> None:
    sc = Scene(
        "gray",
        (
            ShapeObject("red", "circle", "small", 30.0, 60.0, 30),
            ShapeObject("blue", "triangle", "large", 90.0, 64.0, 50),
        ),
        "relation",
        "left of",
    )
    res = score(render(sc), "a red circle left of a blue triangle on a gray background")
    assert res.ok and res.color and res.shape and res.count and res.relation and res.background
    assert res.size is None and res.detected_background == "gray"
    assert [(o.color, o.shape) for o in res.objects] == [("blue", "triangle"), ("red", "circle")]
    bad = score(render(sc), "not a caption")
    assert not bad.ok and bad.spec is None


# ----------------------------------------------------------------------------- wrong images


def _other(options, current, i: int):
    rest = [x for x in options if x != current]
    return rest[i % len(rest)]


def _all_fail(pairs: list[tuple[Image.Image, str]]) -> None:
    assert pairs
    for img, cap in pairs:
        res = score(img, cap)
        assert not res.ok, (cap, res.reason)


def test_fails_on_wrong_colour() -> None:
    pairs = []
    for i, sc in enumerate(_scenes(40, "include", seed=10)):
        objs = tuple(replace(o, color=_other(COLORS, o.color, i)) for o in sc.objects)
        pairs.append((render(replace(sc, objects=objs)), caption(sc)))
    _all_fail(pairs)


def test_fails_on_wrong_shape() -> None:
    pairs = []
    for i, sc in enumerate(_scenes(40, "include", seed=11)):
        # Change one object's shape (all of them in count scenes: they must stay identical).
        objs = tuple(
            replace(o, shape=_other(SHAPES, o.shape, i)) if (j == 0 or sc.kind == "count") else o
            for j, o in enumerate(sc.objects)
        )
        pairs.append((render(replace(sc, objects=objs)), caption(sc)))
    _all_fail(pairs)


def test_fails_on_wrong_count() -> None:
    pairs = []
    for sc in _scenes(30, "include", seed=12, kind="count"):
        fewer = replace(sc, objects=sc.objects[:-1])
        if len(fewer.objects) >= 2:  # caption says n, image shows n-1
            pairs.append((render(fewer), caption(sc)))
        # image shows n, caption says another count
        n = len(sc.objects)
        spec = replace(scene_spec(sc), count=5 - n)
        pairs.append((render(sc), format_spec(spec)))
    for i, sc in enumerate(_scenes(20, "include", seed=13, kind="single")):
        # a single-object caption on an image with a second object in the farthest corner
        first = sc.objects[0]
        corners = [(18.0, 18.0), (110.0, 18.0), (18.0, 110.0), (110.0, 110.0)]
        cx, cy = max(corners, key=lambda c: (c[0] - first.cx) ** 2 + (c[1] - first.cy) ** 2)
        second = ShapeObject(_other(COLORS, first.color, i), SHAPES[i % 3], "small", cx, cy, 28)
        pairs.append((render(replace(sc, objects=(first, second))), caption(sc)))
    _all_fail(pairs)


def test_fails_on_swapped_relation() -> None:
    swap = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    pairs = []
    for sc in _scenes(40, "include", seed=14, kind="relation"):
        spec = scene_spec(sc)
        pairs.append((render(sc), format_spec(replace(spec, relation=swap[spec.relation]))))
        # same relation word, objects swapped in the caption
        swapped = replace(spec, colors=spec.colors[::-1], shapes=spec.shapes[::-1])
        pairs.append((render(sc), format_spec(swapped)))
    _all_fail(pairs)


def test_fails_on_wrong_background() -> None:
    pairs = []
    for i, sc in enumerate(_scenes(30, "include", seed=15)):
        pairs.append((render(replace(sc, background=_other(BACKGROUNDS, sc.background, i))), caption(sc)))
    _all_fail(pairs)


def test_fails_on_wrong_size_and_blank_image() -> None:
    pairs = []
    for sc in _scenes(30, "include", seed=16, kind="single"):
        spec = scene_spec(sc)
        pairs.append((render(sc), format_spec(replace(spec, size="large" if spec.size == "small" else "small"))))
    blank = Image.new("RGB", (128, 128), BACKGROUNDS["white"])
    pairs.append((blank, "a red circle on a white background"))
    pairs.append((blank, "two blue squares"))
    _all_fail(pairs)


# ----------------------------------------------------------------------------- eval prompts


def test_eval_set() -> None:
    items = eval_set()
    assert items == eval_set()  # deterministic
    assert len(items) >= 300
    held = [it for it in items if it.kind == "heldout"]
    assert 3 * len(held) >= len(items)
    assert {it.kind for it in items} == {"single", "count", "relation", "heldout"}
    assert {it.form for it in held} == {"single", "count", "relation"}
    assert len({it.seed for it in items}) == len(items)
    for it in items:
        spec = parse_caption(it.prompt)
        assert format_spec(spec) == it.prompt  # canonical
        assert spec.kind == it.form
        assert spec.is_heldout == (it.kind == "heldout"), it
        if it.kind != "heldout":
            assert it.kind == spec.kind


def test_eval_set_at_several_seeds() -> None:
    one, three = eval_set(), eval_set(seeds=3)
    n = len(one)
    assert len(three) == 3 * n and three[:n] == one  # the first round is the standard set
    for r in (1, 2):
        assert [it.prompt for it in three[r * n:(r + 1) * n]] == [it.prompt for it in one]
        assert [it.seed for it in three[r * n:(r + 1) * n]] == [it.seed + r * 100_000 for it in one]
    assert len({it.seed for it in three}) == 3 * n
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="seeds must be an integer >= 1"):
            eval_set(seeds=bad)


def test_eval_prompts_score_on_matching_renders() -> None:
    results = []
    for it in eval_set():
        sc = scene_from_spec(parse_caption(it.prompt), np.random.default_rng(it.seed))
        results.append((it, score(render(sc), it.prompt)))
    acc = accuracy_table(results)
    assert acc["overall"] >= 0.99 and acc["heldout"] >= 0.99


# ----------------------------------------------------------------------------- report


def _fake(kind: str, ok: bool) -> tuple[EvalItem, ScoreResult]:
    return EvalItem("a red circle", kind, 0, "single"), ScoreResult(ok=ok, spec=None)


def test_accuracy_table_and_format() -> None:
    results = [_fake("single", True)] * 3 + [_fake("single", False)] + [_fake("heldout", False)] * 2
    results += [_fake("heldout", True)]
    acc = accuracy_table(results)
    assert acc == pytest.approx({"single": 0.75, "heldout": 1 / 3, "overall": 4 / 7})
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].startswith("| kind") and len(lines) == 5
    # the last column is the binomial standard error in points: sqrt(p (1 - p) / n)
    assert "| single | 3 | 4 | 75.0% | 21.7 |" in table
    assert "| heldout | 1 | 3 | 33.3% | 27.2 |" in table
    assert "| **overall** | 4 | 7 | 57.1% | 18.7 |" in table


def test_contact_sheet(tmp_path) -> None:
    scenes = _scenes(13, "include", seed=17)
    images = [render(sc) for sc in scenes]
    caps = [caption(sc) for sc in scenes]
    ok = [i % 3 != 0 for i in range(len(scenes))]
    out = tmp_path / "sub" / "sheet.png"
    path = contact_sheet(images, caps, ok, out, columns=5)
    assert os.fspath(out) == path and out.exists()
    assert os.listdir(out.parent) == ["sheet.png"]  # no temp files left behind
    sheet = Image.open(out).convert("RGB")
    assert sheet.width > 5 * 128 and sheet.height > 3 * 128
    a = np.asarray(sheet)
    # Frame pixels (top-left of each cell's frame): red for item 0, green for item 1.
    cell_w = sheet.width // 5
    red, green = a[5, 5], a[5, cell_w + 5]
    assert red[0] > 150 and red[1] < 80 and green[1] > 120 and green[0] < 80
    with pytest.raises(ValueError):
        contact_sheet(images, caps[:-1], ok, tmp_path / "bad.png")
