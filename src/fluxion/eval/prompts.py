"""Fixed evaluation prompts for the shapes world.

300 canonical prompts, each with a fixed sampling seed. Kinds "single", "count" and
"relation" use only training colour-shape pairs; "heldout" (just over a third) uses the
held-out pairs in all three forms to measure compositional generalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Optional

import numpy as np

from fluxion.data.shapes import (
    ALL_PAIRS,
    BACKGROUNDS,
    COUNT_WORDS,
    HELDOUT_PAIRS,
    RELATIONS,
    TRAIN_PAIRS,
    Spec,
    format_spec,
)

EVAL_KINDS: tuple[str, ...] = ("single", "count", "relation", "heldout")
_PROMPT_RNG_SEED = 20240601  # fixes which prompts are chosen
_BASE_SEED = 1000  # generation seed of item i is _BASE_SEED + i
_SEED_ROUND = 100_000  # round r of `eval_set(seeds=...)` adds r * _SEED_ROUND to every seed
_N_PER_TRAIN_KIND = 66
_N_HELDOUT_RELATION = 42  # + all 36 single and 24 count held-out prompts = 102

_BGS: tuple[Optional[str], ...] = (None, *BACKGROUNDS)  # None: caption leaves it open
_SIZES: tuple[Optional[str], ...] = (None, "small", "large")


@dataclass(frozen=True)
class EvalItem:
    prompt: str
    kind: str  # "single" | "count" | "relation" | "heldout"
    seed: int  # noise seed for the generator
    form: str = ""  # scene kind of the prompt: "single" | "count" | "relation"


def _single_specs(pairs) -> list[Spec]:
    return [Spec("single", (c,), (s,), 1, None, size, bg) for (c, s), size, bg in product(pairs, _SIZES, _BGS)]


def _count_specs(pairs) -> list[Spec]:
    return [Spec("count", (c,), (s,), n, None, None, bg) for (c, s), n, bg in product(pairs, COUNT_WORDS, _BGS)]


def _relation_specs(heldout: bool) -> list[Spec]:
    if heldout:  # at least one held-out object; the other may be any different pair
        combos = [(a, b) for a in ALL_PAIRS for b in ALL_PAIRS if a != b and (a in HELDOUT_PAIRS or b in HELDOUT_PAIRS)]
    else:
        combos = [(a, b) for a in TRAIN_PAIRS for b in TRAIN_PAIRS if a != b]
    return [
        Spec("relation", (a[0], b[0]), (a[1], b[1]), 2, rel, None, bg)
        for (a, b), rel, bg in product(combos, RELATIONS, _BGS)
    ]


def _pick(rng: np.random.Generator, specs: list[Spec], n: int) -> list[Spec]:
    idx = rng.choice(len(specs), size=min(n, len(specs)), replace=False)
    return [specs[int(i)] for i in idx]


def eval_specs() -> list[tuple[Spec, str]]:
    """(spec, eval kind) for every evaluation item, in a fixed order."""
    rng = np.random.default_rng(_PROMPT_RNG_SEED)
    out: list[tuple[Spec, str]] = []
    out += [(s, "single") for s in _pick(rng, _single_specs(TRAIN_PAIRS), _N_PER_TRAIN_KIND)]
    out += [(s, "count") for s in _pick(rng, _count_specs(TRAIN_PAIRS), _N_PER_TRAIN_KIND)]
    out += [(s, "relation") for s in _pick(rng, _relation_specs(False), _N_PER_TRAIN_KIND)]
    # Every held-out single and count prompt, plus a sample of held-out relations.
    out += [(s, "heldout") for s in _single_specs(HELDOUT_PAIRS)]
    out += [(s, "heldout") for s in _count_specs(HELDOUT_PAIRS)]
    out += [(s, "heldout") for s in _pick(rng, _relation_specs(True), _N_HELDOUT_RELATION)]
    return out


def eval_set(seeds: int = 1) -> list[EvalItem]:
    """The deterministic evaluation set (300 items, 102 held-out), each prompt at ``seeds`` noise seeds: round 0 is
    the standard set, round r adds r * 100000 to every seed (more seeds narrow the estimate, at seeds times the cost).
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1 (noise seeds per prompt), got {seeds!r}")
    specs = eval_specs()
    return [
        EvalItem(format_spec(spec), kind, _BASE_SEED + i + r * _SEED_ROUND, spec.kind)
        for r in range(seeds)
        for i, (spec, kind) in enumerate(specs)
    ]
