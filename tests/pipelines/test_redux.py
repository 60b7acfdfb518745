"""FLUX.1 Redux prior: parity with diffusers 0.42.1's FluxPriorReduxPipeline on a tiny random SigLIP + embedder
(float32, within 1e-4), the original-layout embedder file, bad input, and `fluxion generate --redux-image`."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from oracle import ATOL

TXT = 32  # the tiny FLUX's joint_attention_dim (T5 d_model)
SIGLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, num_channels=3)


def _picture(seed: int, size=(40, 52)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def redux_dir(tmp_path_factory):
    """A tiny diffusers Redux folder: image_encoder/ (SigLIP), feature_extractor/, image_embedder/."""
    import transformers
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder as RefEncoder
    from fixtures import randomize_parameters_

    root = tmp_path_factory.mktemp("tiny_redux") / "redux"
    torch.manual_seed(0)
    enc = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIGLIP))
    randomize_parameters_(enc, seed=3)
    enc.save_pretrained(root / "image_encoder")
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "feature_extractor")
    emb = RefEncoder(redux_dim=SIGLIP["hidden_size"], txt_in_features=TXT)
    randomize_parameters_(emb, seed=4)
    emb.save_pretrained(root / "image_embedder")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPriorReduxPipeline", "_diffusers_version": "0.42.1",
        "image_encoder": ["transformers", "SiglipVisionModel"],
        "feature_extractor": ["transformers", "SiglipImageProcessor"],
        "image_embedder": ["flux", "ReduxImageEncoder"],
        "text_encoder": [None, None], "tokenizer": [None, None], "text_encoder_2": [None, None],
        "tokenizer_2": [None, None]}))
    return root


def _text_parts(folder):
    import transformers

    return dict(text_encoder=transformers.CLIPTextModel.from_pretrained(str(folder / "text_encoder")),
                tokenizer=transformers.AutoTokenizer.from_pretrained(str(folder / "tokenizer")),
                text_encoder_2=transformers.T5EncoderModel.from_pretrained(str(folder / "text_encoder_2")),
                tokenizer_2=transformers.AutoTokenizer.from_pretrained(str(folder / "tokenizer_2")))


def _ref_prior(redux_dir, **parts):
    import diffusers

    return diffusers.FluxPriorReduxPipeline.from_pretrained(str(redux_dir), torch_dtype=torch.float32, **parts)


def _ours(redux_dir, **kw):
    from fluxion.pipelines import FluxPriorReduxPipeline

    return FluxPriorReduxPipeline.from_pretrained(redux_dir, torch_dtype=torch.float32, **kw)


def _close(ours, ref):
    for name in ("prompt_embeds", "pooled_prompt_embeds"):
        a, b = ours[name], getattr(ref, name)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        err = (a - b).abs().max().item()
        assert err <= ATOL, f"{name}: max abs difference {err:.3g}"
        assert b.abs().max() > 0


class _TinyZeros:
    """diffusers' prior hard-codes zeros [n, 512, 4096] and [n, 768] without text encoders; a tiny model has
    width 32: give its module a `torch` whose zeros use the tiny widths (everything else is torch)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(shape, **kw):
        return torch.zeros(tuple({4096: TXT, 768: 32}.get(s, s) for s in shape), **kw)


def test_prior_with_text_encoders_matches_diffusers(redux_dir, tiny_dev_dir):
    parts = _text_parts(tiny_dev_dir)
    ref, ours = _ref_prior(redux_dir, **parts), _ours(redux_dir, **parts)
    img = _picture(0)
    _close(ours(img, prompt="a red circle"), ref(img, prompt="a red circle"))
    # two images summed, per-image scales, one prompt per image
    imgs = [_picture(1), _picture(2, (64, 30))]
    kw = dict(prompt=["a red circle", "two blue squares"], prompt_embeds_scale=[1.0, 0.5],
              pooled_prompt_embeds_scale=[0.25, 1.5])
    got, want = ours(imgs, **kw), ref(imgs, **kw)
    _close(got, want)
    assert got["prompt_embeds"].shape == (1, 512 + 16, TXT)


def test_prior_without_text_encoders_matches_diffusers(redux_dir, monkeypatch, caplog):
    import diffusers.pipelines.flux.pipeline_flux_prior_redux as ref_module

    monkeypatch.setattr(ref_module, "torch", _TinyZeros())
    ref, ours = _ref_prior(redux_dir), _ours(redux_dir, pooled_dim=32)
    imgs = [_picture(3), _picture(4)]
    kw = dict(prompt_embeds_scale=[0.7, 1.2], pooled_prompt_embeds_scale=[1.0, 1.0])
    want = ref(imgs, **kw)
    got = ours(imgs, **kw)
    assert got["pooled_prompt_embeds"].abs().max() == 0 and want.pooled_prompt_embeds.abs().max() == 0
    err = (got["prompt_embeds"] - want.prompt_embeds).abs().max().item()
    assert got["prompt_embeds"].shape == want.prompt_embeds.shape and err <= ATOL
    assert got["prompt_embeds"][:, :512].abs().max() == 0 and got["prompt_embeds"][:, 512:].abs().max() > 0
    with caplog.at_level(logging.WARNING, logger="fluxion.pipelines.redux"):
        ours(imgs[0], prompt="ignored")
    assert "ignored" in caplog.text
    # the default pooled width is CLIP-L's, as diffusers
    assert _ours(redux_dir)(imgs[0])["pooled_prompt_embeds"].shape == (1, 768)


def test_flux_pipeline_takes_prior_output(redux_dir, tiny_dev_dir):
    import diffusers

    import fluxion

    parts = _text_parts(tiny_dev_dir)
    imgs = [_picture(5), _picture(6)]
    kw = dict(prompt="a green triangle", prompt_embeds_scale=[1.0, 0.8])
    ref_out = _ref_prior(redux_dir, **parts)(imgs, **kw)
    ours_out = _ours(redux_dir, **parts)(imgs, **kw)
    call = dict(num_inference_steps=3, height=32, width=32, output_type="np")
    ref = diffusers.FluxPipeline.from_pretrained(str(tiny_dev_dir), torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    want = ref(**ref_out, generator=torch.Generator().manual_seed(7), **call).images
    pipe = fluxion.FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(**ours_out, generator=torch.Generator().manual_seed(7), **call).images
    assert np.abs(got - want).max() <= ATOL and want.std() > 0.01
    # the parts a FLUX pipeline exposes go straight into the prior
    from_pipe = _ours(redux_dir, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                      text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    _close(from_pipe(imgs, **kw), ref_out)


def test_original_layout_file_loads(redux_dir, tmp_path):
    from fixtures import load_diffusers_state_dict

    from fluxion.checkpoints import CheckpointError
    from fluxion.checkpoints.safetensors_file import save_safetensors
    from fluxion.model.redux import ReduxImageEncoder

    sd = load_diffusers_state_dict(redux_dir, "image_embedder")
    original = tmp_path / "flux1-redux-dev.safetensors"
    save_safetensors({k: v.contiguous() for k, v in sd.items()}, original)
    model = ReduxImageEncoder.from_single_file(original)
    assert (model.config.redux_dim, model.config.txt_in_features) == (SIGLIP["hidden_size"], TXT)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])
    # the original file in place of image_embedder/ (or given as image_embedder=) gives the same prior
    img = _picture(8)
    want = _ours(redux_dir)(img)["prompt_embeds"]
    got = _ours(redux_dir, image_embedder=original)(img)["prompt_embeds"]
    assert torch.equal(got, want)
    alt = tmp_path / "alt"
    for sub in ("image_encoder", "feature_extractor"):
        (alt / sub).mkdir(parents=True)
        for f in (redux_dir / sub).iterdir():
            (alt / sub / f.name).write_bytes(f.read_bytes())
    (alt / original.name).write_bytes(original.read_bytes())
    assert torch.equal(_ours(alt)(img)["prompt_embeds"], want)
    # a wrong layout names the first offending tensor
    bad = tmp_path / "bad.safetensors"
    save_safetensors({**{k: v.contiguous() for k, v in sd.items()}, "img_in.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(CheckpointError, match="img_in.weight"):
        ReduxImageEncoder.from_single_file(bad)
    short = tmp_path / "short.safetensors"
    save_safetensors({**{k: v.contiguous() for k, v in sd.items()}, "redux_down.bias": torch.zeros(5)}, short)
    with pytest.raises(CheckpointError, match="redux_down.bias"):
        ReduxImageEncoder.from_single_file(short)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image="photo.png"), "PIL image"),
    (dict(image=None), "PIL image"),
    (dict(image=[]), "empty"),
    (dict(image=[_picture(0), "x.png"]), "list holding str"),
    (dict(image=[_picture(0), _picture(1)], prompt_embeds_scale=[1.0]), "1 weights for 2 images"),
    (dict(image=_picture(0), pooled_prompt_embeds_scale=[1.0, 2.0]), "2 weights for 1 images"),
    (dict(image=_picture(0), prompt=["a", "b"]), "2 prompts for 1 images"),
    (dict(image=torch.full((3, 8, 8), 2.0)), r"\[0, 1\]"),
    (dict(image=_picture(0), prompt="a", prompt_embeds=torch.zeros(1, 4, TXT)), "not both"),
    (dict(image=_picture(0), prompt_embeds=torch.zeros(1, 4, TXT)), "go together"),
    (dict(image=_picture(0), prompt_embeds_scale="big"), "finite number"),
])
def test_bad_input_fails_before_any_model_runs(redux_dir, monkeypatch, kwargs, match):
    prior = _ours(redux_dir)

    def boom(*a, **k):
        raise AssertionError("a model ran")

    monkeypatch.setattr(prior.image_encoder, "forward", boom)
    monkeypatch.setattr(prior.image_embedder, "forward", boom)
    with pytest.raises(ValueError, match=match):
        prior(**kwargs)


def test_array_and_tensor_images(redux_dir):
    prior = _ours(redux_dir, pooled_dim=32)
    pic = _picture(9)
    arr = np.asarray(pic, dtype=np.float32) / 255
    want = prior(pic)["prompt_embeds"]
    assert torch.allclose(prior(arr)["prompt_embeds"], want)
    assert torch.allclose(prior(torch.from_numpy(arr).permute(2, 0, 1))["prompt_embeds"], want)
    two = prior(torch.from_numpy(np.stack([arr, arr])).permute(0, 3, 1, 2))["prompt_embeds"]
    assert torch.allclose(two[:, 512:], 2 * want[:, 512:], atol=1e-5)


def test_cli_redux_image(redux_dir, tiny_dev_dir, tmp_path, capsys):
    from fluxion.cli import main
    from fluxion.png import read_parameters

    pic = tmp_path / "style.png"
    _picture(10).save(pic)
    out = tmp_path / "out.png"
    common = ["--model", str(tiny_dev_dir), "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)]
    assert main(["generate", "a red circle", *common, "--redux-image", str(pic), "--redux-image", str(pic),
                 "--redux-model", str(redux_dir)]) == 0
    assert Image.open(out).size == (32, 32)
    p = read_parameters(out)
    assert p["redux_image"] == [str(pic)] * 2 and p["prompt"] == "a red circle"
    plain = tmp_path / "plain.png"
    assert main(["generate", "a red circle", *common[:-1], str(plain)]) == 0  # the image prompt changes the picture
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(out)))
    capsys.readouterr()
    assert main(["generate", "x", *common, "--redux-image", str(pic)]) == 2
    assert "--redux-model" in capsys.readouterr().err
    assert main(["generate", "x", *common, "--redux-model", str(redux_dir)]) == 2
    assert "--redux-image" in capsys.readouterr().err


def test_no_prompt_is_the_empty_prompt_and_given_embeddings_are_used(redux_dir, tiny_dev_dir):
    parts = _text_parts(tiny_dev_dir)
    prior = _ours(redux_dir, **parts)
    imgs = [_picture(11), _picture(12)]
    ref = _ref_prior(redux_dir, **parts)(imgs, prompt="")  # diffusers needs a prompt with text encoders
    _close(prior(imgs), ref)
    # prompt_embeds given (one row, repeated per image): used with or without text encoders
    embeds, pooled = torch.randn(1, 7, TXT), torch.randn(1, 32)
    for p in (prior, _ours(redux_dir, pooled_dim=32)):
        out = p(imgs, prompt_embeds=embeds, pooled_prompt_embeds=pooled, pooled_prompt_embeds_scale=[0.5, 1.0])
        assert torch.allclose(out["prompt_embeds"][:, :7], 2 * embeds, atol=1e-6)
        assert torch.allclose(out["pooled_prompt_embeds"], 1.5 * pooled, atol=1e-6)
    embeds_t, pooled_t = prior(imgs, return_dict=False)
    assert embeds_t.shape == (1, 512 + 16, TXT) and pooled_t.shape == (1, 32)
