"""Word-swap probes (`fluxion eval --probe relations|counts|shapes`): does one word of the prompt steer the picture?

For fixed seeds, prompts that differ only in the relation word ("a red circle left of / right of / above / below a
blue square") or only in the count word ("two / three red circles") are generated from the *same* noise. A model
that lets the text steer the layout changes the picture when the word changes, in the direction the word says; a
model whose layout is decided by the noise alone draws the same arrangement for every word. The `shapes` probe
asks about binding instead: "a red circle left of a blue square" against "a red square left of a blue circle" (the
two shape words traded between the objects; every colour-shape pair a training pair), where a model that reads the
caption as a bag of words draws the same picture twice. The probe reports:

- follows: share of images whose observed arrangement (count, shapes) is the one asked for;
- changes: share of swaps (two prompts of a group, same seed) whose observations differ;
- swap follows: share of swaps where both images follow their words (the issue's ">= 80% of swaps").

The objects are found by colour (the largest blob of each named colour), so a model that draws blobs instead of
the asked shapes still shows whether it places them by the words; the shapes probe reads each blob's shape.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data.shapes import COUNT_WORDS, RELATIONS, TRAIN_PAIRS, Spec, format_spec
from ..files import atomic_path
from .scorer import DetectedObject, arrangement, detect_objects, to_canvas

PROBES = ("relations", "counts", "shapes")
SHAPES_RELATION = "left of"  # the shapes probe's one relation: the swap is in the shape words only
_BASE_RNG_SEED = 4242  # fixes which colour-shape pairs the probe asks for


@dataclass(frozen=True)
class ProbeItem:
    prompt: str
    group: int  # the items of one group share a base (colours, shapes, background) and a seed
    seed: int
    word: str  # the swapped words' meaning: a relation, "2" / "3", or the two objects' shapes "circle,square"
    colors: tuple[str, ...]


def _bases(kind: str, n: int) -> list[tuple]:
    rng = np.random.default_rng(_BASE_RNG_SEED)
    if kind == "relations":  # two objects of different colours, so each is found by its colour
        combos = [(a, b) for a in TRAIN_PAIRS for b in TRAIN_PAIRS if a[0] != b[0]]
    elif kind == "shapes":  # ... and of different shapes, with the traded pairs also seen in training
        combos = [(a, b) for a in TRAIN_PAIRS for b in TRAIN_PAIRS if a[0] != b[0] and a[1] != b[1]
                  and (a[0], b[1]) in TRAIN_PAIRS and (b[0], a[1]) in TRAIN_PAIRS]
    else:
        combos = [(a,) for a in TRAIN_PAIRS]
    picks = rng.choice(len(combos), size=min(n, len(combos)), replace=False)
    return [combos[int(i)] for i in picks]


def probe_items(kind: str, bases: int = 8, seeds: int = 5, background: str | None = "white") -> list[ProbeItem]:
    """The probe's prompts: `bases` colour-shape choices x `seeds` seeds x every word (4 relations, 2 counts, or
    the 2 orders of the shape words)."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}: use one of {', '.join(PROBES)}")
    if bases < 1 or seeds < 1:
        raise ValueError(f"the probe needs bases >= 1 and seeds >= 1, got bases={bases}, seeds={seeds}")
    items = []
    for b, base in enumerate(_bases(kind, bases)):
        colors, shapes = tuple(p[0] for p in base), tuple(p[1] for p in base)
        for s in range(seeds):
            group = b * seeds + s
            if kind == "relations":
                for rel in RELATIONS:
                    text = format_spec(Spec("relation", colors, shapes, 2, rel, None, background))
                    items.append(ProbeItem(text, group, s, rel, colors))
            elif kind == "shapes":
                for order in (shapes, shapes[::-1]):
                    text = format_spec(Spec("relation", colors, order, 2, SHAPES_RELATION, None, background))
                    items.append(ProbeItem(text, group, s, ",".join(order), colors))
            else:
                for n in COUNT_WORDS:
                    text = format_spec(Spec("count", colors, shapes, n, None, None, background))
                    items.append(ProbeItem(text, group, s, str(n), colors))
    return items


def observe(item: ProbeItem, objects: list[DetectedObject]) -> str | None:
    """What the image shows for the swapped word: an arrangement (`scorer.arrangement`, the eval's rule), a count
    ("0", "1", ...), or None when a relation's two colours are not both there or neither axis dominates."""
    if item.word in RELATIONS or "," in item.word:
        found = [next((o for o in objects if o.color == c), None) for c in item.colors]  # objects: largest first
        if None in found:
            return None
        return arrangement(found[0], found[1]) if item.word in RELATIONS else ",".join(o.shape for o in found)
    return str(sum(o.color == item.colors[0] for o in objects))


def summarize(items: list[ProbeItem], observed: list[str | None]) -> dict:
    """follows / changes / swap follows (see the module docstring), with the counts behind each share."""
    follows = sum(o == it.word for it, o in zip(items, observed))
    groups: dict[int, list[tuple[ProbeItem, str | None]]] = {}
    for it, o in zip(items, observed):
        groups.setdefault(it.group, []).append((it, o))
    swaps = changed = swap_follow = 0
    for members in groups.values():
        for (ia, oa), (ib, ob) in itertools.combinations(members, 2):
            swaps += 1
            changed += oa is not None and ob is not None and oa != ob
            swap_follow += oa == ia.word and ob == ib.word
    return {"images": len(items), "follows": follows / len(items), "swaps": swaps,
            "changes": changed / swaps if swaps else 0.0, "swap_follows": swap_follow / swaps if swaps else 0.0,
            "found": sum(o is not None for o in observed) / len(items)}


def format_summary(kind: str, s: dict) -> str:
    changes = "shapes change" if kind == "shapes" else "layout changes"
    return "\n".join([
        f"| probe | images | colours found | follows the words | swaps | {changes} | swap follows (target >= 80%) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {kind} | {s['images']} | {100 * s['found']:.1f}% | {100 * s['follows']:.1f}% | {s['swaps']} | "
        f"{100 * s['changes']:.1f}% | {100 * s['swap_follows']:.1f}% |",
    ])


def run_probe(kind: str, model: str | None = None, out_dir: str = "out/eval", bases: int = 8, seeds: int = 5,
              **call_kwargs) -> dict:
    """Generate the probe's images with `model` (the default fluxion-mini when None), judge them, write
    `probe_<kind>.json` and `probe_<kind>.png` (one row per group: the words side by side, same seed)."""
    from ..pipelines import FluxPipeline
    from .report import contact_sheet
    from .run import generate_items

    items = probe_items(kind, bases, seeds)  # validates before the model loads
    pipe = FluxPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    images = generate_items(pipe, items, **{k: v for k, v in call_kwargs.items() if v is not None})
    observed = [observe(it, detect_objects(to_canvas(im))) for it, im in zip(items, images)]
    summary = summarize(items, observed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_group = sum(it.group == items[0].group for it in items)  # the words of one group, side by side
    labels = [f"{it.prompt} (seed {it.seed}) -> {o or 'not found'}" for it, o in zip(items, observed)]
    contact_sheet(images, labels, [o == it.word for it, o in zip(items, observed)], out / f"probe_{kind}.png",
                  columns=per_group * 2)
    record = {"probe": kind, "model": pipe.model_path, "bases": bases, "seeds": seeds,
              "settings": {k: v for k, v in call_kwargs.items() if v is not None}, **summary,
              "per_item": [{**asdict(it), "observed": o} for it, o in zip(items, observed)]}
    with atomic_path(out / f"probe_{kind}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    print(format_summary(kind, summary))
    print(f"\npictures: {out / f'probe_{kind}.png'} (green: follows the word)")
    return record
