"""`fluxion generate`'s image flags choose the pipeline (img2img, inpainting, Fill, Control, Kontext, regional),
read their files before any model loads, and record themselves in the PNG."""
import numpy as np
import pytest
from PIL import Image

from fluxion.cli import main
from fluxion.png import read_parameters

COMMON = ["--steps", "2", "--height", "32", "--width", "32", "--max-sequence-length", "16", "--seed", "3"]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(d / "photo.png")
    mask = np.zeros((40, 36), np.uint8)
    mask[8:30, 10:30] = 255
    Image.fromarray(mask).save(d / "mask.png")
    left = np.zeros((32, 32), np.uint8)
    left[:, :16] = 255
    Image.fromarray(left).save(d / "left.png")
    Image.fromarray(255 - left).save(d / "right.png")
    return d


def generate(model, out, *flags):
    return main(["generate", "a red circle", "--model", str(model), *COMMON, *flags, "--out", str(out)])


def test_image_flags_choose_the_pipeline_and_are_recorded(tiny_dev_dir, pictures, tmp_path):
    plain, i2i, inpaint = tmp_path / "plain.png", tmp_path / "i2i.png", tmp_path / "inpaint.png"
    assert generate(tiny_dev_dir, plain) == 0
    assert generate(tiny_dev_dir, i2i, "--image", str(pictures / "photo.png"), "--strength", "0.5") == 0
    p = read_parameters(i2i)
    assert p["pipeline"] == "FluxImg2ImgPipeline" and p["strength"] == 0.5 and p["image"].endswith("photo.png")
    assert generate(tiny_dev_dir, inpaint, "--image", str(pictures / "photo.png"), "--mask",
                    str(pictures / "mask.png")) == 0
    p = read_parameters(inpaint)
    assert p["pipeline"] == "FluxInpaintPipeline" and p["mask_image"].endswith("mask.png")
    images = [np.asarray(Image.open(f), dtype=float) for f in (plain, i2i, inpaint)]
    assert np.abs(images[0] - images[1]).max() > 1 and np.abs(images[1] - images[2]).max() > 1


def test_fill_control_and_kontext_from_the_command_line(tiny_fill_dir, tiny_control_dir, tiny_dev_dir, pictures,
                                                        tmp_path):
    photo, mask = str(pictures / "photo.png"), str(pictures / "mask.png")
    assert generate(tiny_fill_dir, tmp_path / "fill.png", "--image", photo, "--mask", mask) == 0
    assert read_parameters(tmp_path / "fill.png")["pipeline"] == "FluxFillPipeline"
    assert generate(tiny_control_dir, tmp_path / "c.png", "--control-image", photo, "--control", "canny") == 0
    p = read_parameters(tmp_path / "c.png")
    assert p["pipeline"] == "FluxControlPipeline" and p["control"] == "canny:50:200"
    assert generate(tiny_dev_dir, tmp_path / "k.png", "--reference", photo, "--max-area", str(32 * 32),
                    "--keep-reference-size") == 0
    p = read_parameters(tmp_path / "k.png")
    assert p["pipeline"] == "FluxKontextPipeline" and p["reference"] == photo and p["max_area"] == 1024


def test_regional_and_schedules_from_the_command_line(tiny_dev_dir, pictures, tmp_path):
    out = tmp_path / "r.png"
    assert generate(tiny_dev_dir, out, "--regional", f"a red circle={pictures / 'left.png'}",
                    "--regional", f"a blue square={pictures / 'right.png'}", "--guidance-schedule", "linear:4:2") == 0
    p = read_parameters(out)
    assert p["regional_prompts"] == ["a red circle", "a blue square"] and p["guidance_scale"] == "linear:4:2"


@pytest.mark.parametrize("flags, message", [
    (["--mask", "MASK"], "--mask needs --image"),
    (["--strength", "0.5"], "--strength needs --image"),
    (["--control", "canny"], "--control canny needs --control-image"),
    (["--image", "MISSING"], "--image"),
    (["--regional", "no mask"], "--regional takes PROMPT=MASK.png"),
    (["--guidance-schedule", "wobbly:1"], "guidance schedule"),
    (["--max-area", "100"], "--max-area and --keep-reference-size need --reference"),
])
def test_bad_image_flags_fail_before_any_model_loads(pictures, tmp_path, capsys, monkeypatch, flags, message):
    import fluxion.pipelines.base as base

    monkeypatch.setattr(base.FluxBasePipeline, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    flags = [str(pictures / "mask.png") if f == "MASK" else str(tmp_path / "missing.png") if f == "MISSING" else f
             for f in flags]
    assert main(["generate", "x", *flags, "--out", str(tmp_path / "o.png")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


# ---------------------------------------------------------------- property test over the numeric flags (#16)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NUMBER_TEXT = st.one_of(st.integers(-10, 70).map(str), st.sampled_from(["nan", "inf", "-inf", "1e9", "0.5", "-0"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["--steps", "--height", "--width", "--guidance", "--true-cfg", "--num-images",
                             "--max-sequence-length", "--cache-threshold", "--seed"]), value=NUMBER_TEXT)
def test_numeric_flags_give_an_image_or_one_error_naming_the_flag(tiny_dev_dir, tmp_path, capsys, flag, value):
    out = tmp_path / f"p{abs(hash((flag, value)))}.png"
    base = ["generate", "a red circle", "--model", str(tiny_dev_dir), "--steps", "1", "--height", "16", "--width", "16",
            "--max-sequence-length", "8", "--out", str(out)]
    extra = ["--cache", "fbcache"] if flag == "--cache-threshold" else []
    try:
        code = main(base + extra + [flag, value])
    except SystemExit as e:  # argparse: not a number of the flag's type (its own one-line usage error)
        assert e.code == 2 and flag in capsys.readouterr().err
        return
    err = capsys.readouterr().err
    written = sorted(tmp_path.glob(f"{out.stem}*.png"))  # --num-images N writes stem-0.png ... stem-(N-1).png
    if code == 0:
        assert written and all(np.isfinite(np.asarray(Image.open(f), dtype=float)).all() for f in written)
    else:
        assert code == 2 and flag in err.strip().splitlines()[-1], err
        assert not written


def test_controlnet_flags(tiny_dev_dir, pictures, tmp_path):
    from controlnet_fixtures import save_diffusers_controlnet

    net = save_diffusers_controlnet(tmp_path / "net", seed=1)
    union = save_diffusers_controlnet(tmp_path / "union", seed=2, num_mode=4)
    photo = str(pictures / "photo.png")
    out = tmp_path / "cn.png"
    assert generate(tiny_dev_dir, out, "--controlnet", str(net), "--control-image", photo,
                    "--controlnet-scale", "0.7") == 0
    p = read_parameters(out)
    assert p["pipeline"] == "FluxControlNetPipeline" and p["controlnet"] == [str(net)]
    two = tmp_path / "two.png"
    assert generate(tiny_dev_dir, two, "--controlnet", str(net), "--controlnet", str(union), "--control-image", photo,
                    "--control-mode", "0", "--control-mode", "2", "--controlnet-scale", "0.5",
                    "--controlnet-scale", "0.8", "--image", photo) == 0
    assert read_parameters(two)["pipeline"] == "FluxControlNetImg2ImgPipeline"
    assert np.abs(np.asarray(Image.open(out), float) - np.asarray(Image.open(two), float)).max() > 1


def test_controlnet_flags_are_checked_first(tmp_path, capsys):
    assert main(["generate", "x", "--controlnet", str(tmp_path / "nope"), "--control-image", "x.png",
                 "--out", str(tmp_path / "o.png")]) == 2
    assert "--control" in capsys.readouterr().err
    assert main(["generate", "x", "--control-mode", "1", "--out", str(tmp_path / "o.png")]) == 2
    assert "--control-mode and --controlnet-scale need --controlnet" in capsys.readouterr().err
