"""Batches rendered ahead in worker processes equal the ones rendered in place, in any order of asking."""
import numpy as np

from fluxion.data.loader import BatchSource
from fluxion.data.shapes import make_batch


def test_workers_render_the_same_batches_as_the_main_process():
    ahead = BatchSource(seed=3, stop=12, batch_size=5, workers=2)
    for step in [4, 5, 6, 9, 2, 3, 11, 12, 40]:  # in order, a jump ahead, back, the end, past the end
        images, captions = ahead(step)
        want_images, want_captions = make_batch(3, step, 5, paraphrase=True)
        assert images.dtype == np.uint8 and images.std() > 0
        np.testing.assert_array_equal(images, want_images)
        assert captions == want_captions


def test_workers_render_the_mix_they_are_given():
    mix = (0.0, 1.0, 0.0)  # counts only
    ahead = BatchSource(seed=3, stop=4, batch_size=6, workers=1, kind_probs=mix)
    for step in [1, 2]:
        images, captions = ahead(step)
        want_images, want_captions = make_batch(3, step, 6, paraphrase=True, kind_probs=mix)
        np.testing.assert_array_equal(images, want_images)
        assert captions == want_captions and captions != make_batch(3, step, 6, paraphrase=True)[1]


def test_workers_render_shape_only_captions_they_are_asked_for():
    ahead = BatchSource(seed=3, stop=4, batch_size=12, workers=1, shape_only=0.5, off_palette=1.0)
    images, captions = ahead(1)
    want_images, want_captions = make_batch(3, 1, 12, paraphrase=True, shape_only=0.5, off_palette=1.0)
    np.testing.assert_array_equal(images, want_images)
    assert captions == want_captions and captions != make_batch(3, 1, 12, paraphrase=True)[1]
    assert not np.array_equal(images, make_batch(3, 1, 12, paraphrase=True, shape_only=0.5)[0])
