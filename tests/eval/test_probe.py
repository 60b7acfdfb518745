"""`fluxion eval --probe`: swap only the relation (or count) word at fixed seeds and judge whether the layout
follows. Judged here on rendered scenes, where the answer is known: pictures drawn from each prompt follow every
word; one picture reused for every word (a layout decided by the noise alone) changes nothing."""
import json

import numpy as np
import pytest

from fluxion.cli import main
from fluxion.data.shapes import RELATIONS, TRAIN_PAIRS, parse_caption, render, scene_from_spec
from fluxion.eval.probe import observe, probe_items, summarize
from fluxion.eval.scorer import to_canvas, detect_objects


def _observed(items, images):
    return [observe(it, detect_objects(to_canvas(im))) for it, im in zip(items, images)]


def _renders(items, seed=0):
    rng = np.random.default_rng(seed)
    return [render(scene_from_spec(parse_caption(it.prompt), rng)) for it in items]


@pytest.mark.parametrize("kind, words", [("relations", 4), ("counts", 2)])
def test_groups_differ_only_in_the_swapped_word(kind, words):
    items = probe_items(kind, bases=3, seeds=2)
    assert len(items) == 3 * 2 * words
    for g in {it.group for it in items}:
        group = [it for it in items if it.group == g]
        specs = [parse_caption(it.prompt) for it in group]
        assert len({it.seed for it in group}) == 1 and len(group) == words
        assert len({(s.colors, s.shapes, s.background) for s in specs}) == 1  # same objects and background
        assert len({(s.relation, s.count) for s in specs}) == words  # every word once


def test_shape_groups_trade_only_the_shape_words_between_training_pairs():
    items = probe_items("shapes", bases=4, seeds=2)
    assert len(items) == 4 * 2 * 2
    for g in {it.group for it in items}:
        a, b = [parse_caption(it.prompt) for it in items if it.group == g]
        assert (a.colors, a.relation, a.background) == (b.colors, b.relation, b.background)
        assert a.shapes == b.shapes[::-1] and a.shapes[0] != a.shapes[1]
        assert all(pair in TRAIN_PAIRS for spec in (a, b) for pair in zip(spec.colors, spec.shapes))


def test_a_bag_of_words_model_fails_the_shapes_probe():
    """One picture for both orders of the shape words: what a model that does not bind shapes to colours draws."""
    items = probe_items("shapes", bases=4, seeds=2)
    first = {}
    for it, im in zip(items, _renders(items)):
        first.setdefault(it.group, im)
    s = summarize(items, _observed(items, [first[it.group] for it in items]))
    assert s["found"] == 1.0 and s["changes"] == 0.0 and s["swap_follows"] == 0.0
    assert s["follows"] == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["relations", "counts", "shapes"])
def test_pictures_drawn_from_the_words_follow_them(kind):
    items = probe_items(kind, bases=4, seeds=2)
    s = summarize(items, _observed(items, _renders(items)))
    assert s["found"] == 1.0 and s["follows"] == 1.0 and s["changes"] == 1.0 and s["swap_follows"] == 1.0


def test_a_layout_decided_by_the_noise_changes_nothing():
    items = probe_items("relations", bases=4, seeds=2)
    first = {}
    for it, im in zip(items, _renders(items)):
        first.setdefault(it.group, im)  # every word of a group gets its first picture
    s = summarize(items, _observed(items, [first[it.group] for it in items]))
    assert s["changes"] == 0.0 and s["swap_follows"] == 0.0
    assert s["follows"] == pytest.approx(1 / len(RELATIONS))


def test_probe_command_writes_its_record_and_pictures(tmp_path, capsys):
    assert main(["eval", "--probe", "counts", "--probe-bases", "1", "--probe-seeds", "2", "--steps", "2",
                 "--out", str(tmp_path)]) == 0
    assert "| counts | 4 |" in capsys.readouterr().out
    record = json.loads((tmp_path / "probe_counts.json").read_text())
    assert record["settings"] == {"num_inference_steps": 2} and len(record["per_item"]) == 4
    assert (tmp_path / "probe_counts.png").stat().st_size > 0


def test_bad_probe_settings_are_named(capsys):
    assert main(["eval", "--probe", "relations", "--limit", "3"]) == 2
    assert "--probe generates its own prompts" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bases >= 1 and seeds >= 1"):
        probe_items("relations", bases=0)
