"""Judging an edge-map ControlNet on the shapes world (#19, part 5; `bench/controlnet_mini.py`).

A case passes when the shapes-world scorer (`fluxion.eval.scorer.score`, what `fluxion eval` uses) accepts the
image for the prompt (its colours and shapes, exactly that many objects, size, relation, background) and every
object of the recoloured scene is found, with the prompt's colour and its shape, within PLACE_TOL px (128 canvas)
of its place in the edge map, each matched to a different detection.
"""
from __future__ import annotations

import numpy as np

from .scorer import score

PLACE_TOL = 8.0  # px on the 128 canvas: a third of the smallest object's side (26 px)


def same_places(scene, objects, tol: float = PLACE_TOL) -> bool:
    """Every scene object matched to its own detection of the same colour and shape, centres within tol."""
    free = list(objects)
    for o in scene.objects:
        near = [(np.hypot(d.cx - o.cx, d.cy - o.cy), k) for k, d in enumerate(free)
                if d.color == o.color and d.shape == o.shape]
        if not near or min(near)[0] > tol:
            return False
        free.pop(min(near)[1])
    return True


def judge(images, examples) -> list[dict]:
    """One verdict per (image, (scene, recoloured scene, prompt)): what the scorer and the places say."""
    out = []
    for image, (_, new, prompt) in zip(images, examples):
        res = score(image, prompt)
        placed = same_places(new, res.objects)
        out.append({"scorer": res.ok, "colours": res.color, "shapes": res.shape and res.count, "places": placed,
                    "pass": res.ok and placed, "reason": res.reason})
    return out
