"""The LoRA demo's ring judge (bench/lora_ring_demo.py): rendered rings pass; discs, C shapes and wrong colours fail."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fluxion.data.shapes import BACKGROUNDS, COLORS

BENCH = Path(__file__).resolve().parents[2] / "bench" / "lora_ring_demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("lora_ring_demo", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rings_pass_and_other_shapes_fail(demo):
    rng = np.random.default_rng(11)
    colours = list(COLORS)
    for i, colour in enumerate(colours):
        background = list(BACKGROUNDS)[i % 3]
        ring = demo.render_ring(colour, background, rng)
        assert demo.is_ring(ring, colour), (colour, background)
        assert not demo.is_ring(ring, colours[(i + 1) % len(colours)])  # a ring, of another colour
        arr = np.asarray(ring)
        ys, xs = np.nonzero((arr != np.array(BACKGROUNDS[background])).any(-1))
        cx, cy = xs.mean(), ys.mean()
        c_shape = ring.copy()  # a wedge cut through the band opens the hole: a C
        ImageDraw.Draw(c_shape).polygon([(cx, cy), (cx + 60, cy - 12 + 4 * i), (cx + 60, cy + 12 + 4 * i)],
                                        fill=BACKGROUNDS[background])
        assert not demo.is_ring(c_shape, colour), (colour, background)
        disc = Image.new("RGB", (128, 128), BACKGROUNDS[background])
        r = rng.uniform(20, 30)
        ImageDraw.Draw(disc).ellipse([64 - r, 64 - r, 64 + r, 64 + r], fill=COLORS[colour])
        assert not demo.is_ring(disc, colour), (colour, background)
