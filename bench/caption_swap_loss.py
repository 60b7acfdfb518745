"""How much does a model use each word of its caption, at each noise level? (issue #20's diagnosis)

Rendered shapes-world scenes with their true captions are noised at fixed noise levels (same noise for every
caption) and the flow-matching loss is measured with the true caption and with captions that change one thing:
the relation word (left of <-> right of, above <-> below), the colour of the first object, the count word
(two <-> three), or no caption at all. A model that uses a word loses more when that word is wrong; a gap near zero
at every noise level means the word is ignored. The gap is shown relative to the empty caption's, so kinds and
noise levels compare.

    .venv/bin/python bench/caption_swap_loss.py [--model DIR] [--scenes 96]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fluxion.data.shapes import COLORS, Spec, format_spec, render, sample_spec, scene_from_spec, scene_spec
from fluxion.flow import flow_loss, image_ids, noised, pack, velocity_target
from fluxion.images import images_to_tensor
from fluxion.pipelines import FluxPipeline

SIGMAS = (0.98, 0.9, 0.75, 0.5, 0.25, 0.1)
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def swapped(spec: Spec, what: str) -> Spec:
    if what == "relation":
        return Spec(spec.kind, spec.colors, spec.shapes, spec.count, _OPPOSITE[spec.relation], spec.size, spec.background)
    if what == "count":
        return Spec(spec.kind, spec.colors, spec.shapes, 5 - spec.count, None, spec.size, spec.background)
    if what == "colour":
        others = [c for c in COLORS if c not in spec.colors]
        return Spec(spec.kind, (others[0], *spec.colors[1:]), spec.shapes, spec.count, spec.relation, spec.size,
                    spec.background)
    raise ValueError(what)


def scenes(kind: str, n: int, seed: int = 0):
    rng = np.random.default_rng([seed, 99])
    out = []
    while len(out) < n:
        spec = sample_spec(rng)
        if spec.kind == kind:
            out.append(scene_from_spec(spec, rng))
    return out


@torch.no_grad()
def loss_table(pipe: FluxPipeline, kind: str, n: int) -> dict:
    sc = scenes(kind, n)
    specs = [scene_spec(s) for s in sc]
    pixels = images_to_tensor(np.stack([np.asarray(render(s)) for s in sc]), "cpu")
    x0 = pack(pipe.encode_image(pixels, sample=False)).float()
    side = int(round(x0.shape[1] ** 0.5)) * 2
    ids = image_ids(side, side)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    target = velocity_target(x0, noise)
    swaps = ["relation", "colour"] if kind == "relation" else ["count", "colour"]
    captions = {"true": [format_spec(s) for s in specs], "empty": [""] * n}
    captions |= {w: [format_spec(swapped(s, w)) for s in specs] for w in swaps}
    encoded = {k: pipe.encode_prompt(v) for k, v in captions.items()}
    rows = {}
    for sigma in SIGMAS:
        s = torch.full((n,), sigma)
        xt = noised(x0, noise, s)
        losses = {k: float(flow_loss(pipe.transformer(xt, ids, txt, tids, s, pooled), target, s))
                  for k, (txt, pooled, tids) in encoded.items()}
        base = losses["empty"] - losses["true"]
        rows[sigma] = {"loss_true": losses["true"], "empty_gap": base,
                       **{f"{w}_gap": losses[w] - losses["true"] for w in swaps},
                       **{f"{w}_share": (losses[w] - losses["true"]) / base if base > 0 else float("nan") for w in swaps}}
    return rows


@torch.no_grad()
def order_sensitivity(pipe: FluxPipeline, n: int = 48) -> float:
    """How much the T5 outputs of the object words change when the two objects of a relation caption trade places
    ("a red circle left of a blue square" -> "a blue square left of a red circle"), relative to their size: near
    zero means the encoder hands the transformer a bag of words, in which the two captions are the same."""
    tok = pipe.tokenizer_2
    changes = []
    for scene in scenes("relation", n, seed=3):
        spec = scene_spec(scene)
        if spec.colors[0] == spec.colors[1] or spec.shapes[0] == spec.shapes[1]:
            continue  # each object word must occur once in both captions
        a = format_spec(Spec(spec.kind, spec.colors, spec.shapes, 2, spec.relation))
        b = format_spec(Spec(spec.kind, spec.colors[::-1], spec.shapes[::-1], 2, spec.relation))
        ea, eb = pipe.encode_prompt([a, b])[0].float()
        ta, tb = (tok.convert_ids_to_tokens(tok(t).input_ids) for t in (a, b))
        for word in (spec.colors[0], spec.shapes[0], spec.colors[1], spec.shapes[1]):
            i, j = ta.index("\u2581" + word), tb.index("\u2581" + word)
            changes.append(float((ea[i] - eb[j]).norm() / ea[i].norm()))
    return float(np.mean(changes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--scenes", type=int, default=96)
    ap.add_argument("--out", default="out/bench/caption_swap_loss.json")
    args = ap.parse_args(argv)
    pipe = FluxPipeline.from_pretrained(args.model)
    order = order_sensitivity(pipe)
    print(f"T5 outputs of the object words when the two objects trade places: {100 * order:.1f}% relative change")
    result = {"t5_order_change": order}
    for kind in ("relation", "count"):
        rows = loss_table(pipe, kind, args.scenes)
        result[kind] = rows
        swaps = [k[:-4] for k in next(iter(rows.values())) if k.endswith("_gap") and k != "empty_gap"]
        print(f"\n{kind} scenes ({args.scenes}): loss with the true caption, and the extra loss of a wrong word "
              f"as a share of the empty caption's extra loss")
        print("| sigma | loss (true caption) | empty caption: extra loss | " + " | ".join(f"wrong {w}" for w in swaps) + " |")
        print("|---:|---:|---:|" + "---:|" * len(swaps))
        for sigma, r in rows.items():
            print(f"| {sigma} | {r['loss_true']:.4f} | {r['empty_gap']:.4f} | "
                  + " | ".join(f"{100 * r[f'{w}_share']:.1f}%" for w in swaps) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": pipe.model_path, "scenes": args.scenes, **{
        k: {str(s): r for s, r in v.items()} if isinstance(v, dict) else v for k, v in result.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
