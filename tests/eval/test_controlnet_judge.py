"""The ControlNet check's judge (`fluxion.eval.controlnet`): a rendering of the scene itself passes; the same
scene moved by more than the tolerance, or drawn in other colours, does not."""
import dataclasses

import numpy as np

from fluxion.data.shapes import caption, render, sample_scene
from fluxion.eval.controlnet import PLACE_TOL, judge
from fluxion.train.controlnet import recolour


def moved(scene, dx: float):
    return dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, cx=o.cx + dx) for o in scene.objects))


def test_the_scene_itself_passes_and_a_moved_or_recoloured_one_fails():
    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng) for _ in range(12)]
    shift = 2 * PLACE_TOL
    for scene in scenes:
        # keep the moved copy on the canvas: shift away from the nearer edge
        dx = shift if max(o.cx for o in scene.objects) < 128 - shift - 16 else -shift
        assert judge([render(scene)], [(scene, scene, caption(scene))])[0]["pass"], caption(scene)
        away = judge([render(moved(scene, dx))], [(scene, scene, caption(scene))])[0]
        assert away["scorer"] and not away["places"] and not away["pass"], caption(scene)
        other = recolour(scene, rng)
        wrong = judge([render(scene)], [(scene, other, caption(other))])[0]
        assert not wrong["colours"] and not wrong["pass"], caption(other)
