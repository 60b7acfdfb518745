"""Does the text encoder tell the transformer which shape a held-out pair names? (issue #20's held-out pairs)

For every colour-shape pair, the T5 output at the shape word of "a {colour} {shape}" is compared (cosine) with the
same shape word after each other colour. If a held-out pair ("a green square", never in training) gave "square" a
vector unlike the trained colours' "square", the encoder would be where the shape is lost; if it is as close as a
trained pair's, the encoder hands the transformer the right shape and the colour-shape binding sits downstream.

    .venv/bin/python bench/shape_word_vectors.py [--model DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fluxion.data.shapes import ALL_PAIRS, COLORS, HELDOUT, SHAPES
from fluxion.pipelines import FluxPipeline


@torch.no_grad()
def shape_word_vectors(pipe: FluxPipeline) -> dict[tuple[str, str], torch.Tensor]:
    tok = pipe.tokenizer_2
    prompts = [f"a {c} {s}" for c, s in ALL_PAIRS]
    encoded = pipe.encode_prompt(prompts)[0].float()
    vectors = {}
    for (c, s), text, out in zip(ALL_PAIRS, prompts, encoded):
        tokens = tok.convert_ids_to_tokens(tok(text).input_ids)
        vectors[(c, s)] = out[tokens.index("\u2581" + s)]
    return vectors


def table(vectors: dict) -> list[dict]:
    cos = torch.nn.functional.cosine_similarity
    rows = []
    for c, s in ALL_PAIRS:
        same_shape = [float(cos(vectors[(c, s)], vectors[(o, s)], dim=0)) for o in COLORS if o != c]
        other_shapes = [float(cos(vectors[(c, s)], vectors[(c, o)], dim=0)) for o in SHAPES if o != s]
        rows.append({"pair": f"{c} {s}", "held_out": (c, s) in HELDOUT, "same_shape_other_colours": sum(same_shape) / len(same_shape),
                     "same_shape_min": min(same_shape), "same_colour_other_shapes_max": max(other_shapes)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="out/bench/shape_word_vectors.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = table(shape_word_vectors(FluxPipeline.from_pretrained(args.model)))
    print("| pair | held out | cosine to the same shape word after other colours (mean / min) "
          "| to the other shapes after this colour (max) |\n|---|---|---:|---:|")
    for r in sorted(rows, key=lambda r: (not r["held_out"], r["pair"])):
        print(f"| {r['pair']} | {'yes' if r['held_out'] else ''} | {r['same_shape_other_colours']:.3f} / "
              f"{r['same_shape_min']:.3f} | {r['same_colour_other_shapes_max']:.3f} |")
    for held in (True, False):
        mean = [r["same_shape_other_colours"] for r in rows if r["held_out"] == held]
        print(f"{'held-out' if held else 'trained'} pairs: mean cosine {sum(mean) / len(mean):.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
