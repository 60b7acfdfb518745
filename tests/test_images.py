"""fluxion.images: every PIL mode to the RGB it shows; bad files named before any model loads."""
import numpy as np
import pytest
from PIL import Image

from fluxion.images import load_image, to_rgb
from fluxion.train.lora import read_dataset

RED = (200, 30, 60)


def _modes(tmp_path):
    """{name: (file, expected RGB)} of one-colour images in the modes PIL gives."""
    rgb = Image.new("RGB", (6, 4), RED)
    grey = round(0.299 * RED[0] + 0.587 * RED[1] + 0.114 * RED[2])  # PIL's L conversion
    files = {}
    files["rgb"] = (rgb, RED)
    files["rgba"] = (rgb.convert("RGBA"), RED)
    files["palette"] = (rgb.convert("P", palette=Image.ADAPTIVE), RED)
    files["grey"] = (rgb.convert("L"), (grey,) * 3)
    files["grey_alpha"] = (rgb.convert("LA"), (grey,) * 3)
    files["cmyk"] = (rgb.convert("CMYK"), RED)
    files["grey16"] = (Image.fromarray(np.full((4, 6), 76 * 257, dtype=np.uint16)), (76, 76, 76))
    out = {}
    for name, (im, want) in files.items():
        path = tmp_path / f"{name}.{'jpg' if name == 'cmyk' else 'png'}"
        im.save(path) if name != "cmyk" else im.save(path, quality=100)
        out[name] = (path, want)
    return out


def test_every_mode_loads_as_the_rgb_it_shows(tmp_path):
    for name, (path, want) in _modes(tmp_path).items():
        with Image.open(path) as raw:
            mode = raw.mode
        got = load_image(path)
        assert got.mode == "RGB", name
        err = np.abs(np.asarray(got).astype(int) - np.array(want)).max()
        assert err <= (3 if name == "cmyk" else 1), (name, mode, np.asarray(got)[0, 0], want)
    # the 16-bit grey really is a wide mode (the case PIL's own convert clips to white)
    with Image.open(tmp_path / "grey16.png") as raw:
        assert raw.mode.startswith("I")
        assert np.asarray(raw.convert("RGB"))[0, 0, 0] == 255  # what a plain convert gives


def test_float_images_scale_from_their_range():
    unit = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), "F")
    assert np.asarray(to_rgb(unit))[0, 0, 0] == 128


def test_bad_image_files_are_named_before_any_model_loads(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8), RED).save(data / "good.png")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        read_dataset(data, "a red square")
    with pytest.raises(ValueError, match="no such file"):
        load_image(tmp_path / "absent.png")
