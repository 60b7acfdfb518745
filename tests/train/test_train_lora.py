"""`fluxion train-lora`: trains only the adapter, writes a diffusers-layout file, resumes, rejects bad data."""
import numpy as np
import pytest
import torch
from PIL import Image

from fluxion import FluxPipeline
from fluxion.cli import main
from fluxion.train.lora import LoraTrainConfig, read_dataset, train_lora
from fluxion.train.state import load_checkpoint
from fluxion.train.trainer import CHECKPOINT


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("a photo of sks")
    return folder


def test_dataset_reading_and_errors(image_folder, tmp_path):
    pairs = read_dataset(image_folder, "a sks")
    assert [c for _, c in pairs] == ["a photo of sks", "a sks", "a sks"]
    with pytest.raises(ValueError, match="no caption"):
        read_dataset(image_folder, None)
    with pytest.raises(ValueError, match="no images"):
        read_dataset(tmp_path, None)
    with pytest.raises(ValueError, match="no such folder"):
        read_dataset(tmp_path / "missing", "x")
    (image_folder / "img1.txt").write_text("")  # an empty caption file: that image trains the empty prompt
    assert [c for _, c in read_dataset(image_folder, "a sks")] == ["a photo of sks", "", "a sks"]


def test_train_lora_writes_a_loadable_adapter_and_resumes(tiny_dev_dir, image_folder, tmp_path):
    out = tmp_path / "lora"
    cfg = LoraTrainConfig(model=str(tiny_dev_dir), data=str(image_folder), output=str(out), instance_prompt="a sks",
                          steps=2, grad_accum=2, lr=1e-2, resolution=32, validation_every=0, checkpoint_every=1)
    train_lora(cfg)
    file = out / "pytorch_lora_weights.safetensors"
    assert file.is_file()
    first = load_checkpoint(out / CHECKPOINT)
    assert first["info"]["step"] == 2
    # resume to 4 steps: starts at 2
    cfg.steps = 4
    train_lora(cfg)
    assert load_checkpoint(out / CHECKPOINT)["info"]["step"] == 4

    pipe = FluxPipeline.from_pretrained(tiny_dev_dir)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")
    base = pipe("a sks", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    tuned = pipe("a sks", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(tuned - base).max() > 1e-4  # the adapter learned something (B moved from zero)


def test_cli_rejects_missing_data_before_loading(tmp_path, capsys):
    code = main(["train-lora", "--data", str(tmp_path / "none"), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "no such folder" in capsys.readouterr().err


def _adapter(out):
    from safetensors.torch import load_file
    return load_file(out / "pytorch_lora_weights.safetensors")


def test_prior_preservation_generates_class_images_and_changes_training(tiny_dev_dir, image_folder, tmp_path):
    common = dict(model=str(tiny_dev_dir), data=str(image_folder), instance_prompt="a sks", steps=2, grad_accum=1,
                  lr=1e-2, resolution=32, validation_every=0)
    train_lora(LoraTrainConfig(output=str(tmp_path / "plain"), **common))
    classes = tmp_path / "classes"
    cfg = LoraTrainConfig(output=str(tmp_path / "prior"), class_data=str(classes), class_prompt="a dog",
                          num_class_images=3, **common)
    train_lora(cfg)
    made = sorted(p.name for p in classes.glob("*.png"))
    assert made == ["class-0000.png", "class-0001.png", "class-0002.png"]
    first = Image.open(classes / made[0]).size
    assert first == (32, 32)
    # a full folder is reused, not regenerated
    stamp = (classes / made[0]).stat().st_mtime_ns
    train_lora(LoraTrainConfig(output=str(tmp_path / "prior2"), class_data=str(classes), class_prompt="a dog",
                               num_class_images=3, **common), resume=False)
    assert (classes / made[0]).stat().st_mtime_ns == stamp
    plain, prior = _adapter(tmp_path / "plain"), _adapter(tmp_path / "prior")
    assert any(not torch.equal(plain[k], prior[k]) for k in plain)  # the class half entered the loss


def test_caption_dropout_and_flips_change_training_and_bad_options_fail_early(tiny_dev_dir, image_folder, tmp_path):
    common = dict(model=str(tiny_dev_dir), data=str(image_folder), instance_prompt="a sks", steps=2, grad_accum=1,
                  batch_size=4, lr=1e-2, resolution=32, validation_every=0)
    train_lora(LoraTrainConfig(output=str(tmp_path / "a"), **common))
    train_lora(LoraTrainConfig(output=str(tmp_path / "b"), caption_dropout=0.5, **common))
    train_lora(LoraTrainConfig(output=str(tmp_path / "f"), random_flip=True, **common))
    a, b, f = _adapter(tmp_path / "a"), _adapter(tmp_path / "b"), _adapter(tmp_path / "f")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], f[k]) for k in a)  # mirrored latents entered training
    with pytest.raises(ValueError, match="caption_dropout"):
        train_lora(LoraTrainConfig(output=str(tmp_path / "c"), caption_dropout=1.5, **common))
    with pytest.raises(ValueError, match="--class-data"):
        train_lora(LoraTrainConfig(output=str(tmp_path / "c"), class_prompt="a dog", **common))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="--class-data .*no images"):
        train_lora(LoraTrainConfig(output=str(tmp_path / "c"), class_data=str(empty), **common))


def test_bf16_mixed_precision_and_wider_targets(tiny_dev_dir, image_folder, tmp_path):
    common = dict(model=str(tiny_dev_dir), data=str(image_folder), instance_prompt="a sks", steps=3, grad_accum=1,
                  batch_size=4, lr=1e-2, resolution=32, validation_every=0)
    train_lora(LoraTrainConfig(output=str(tmp_path / "f32"), **common))
    train_lora(LoraTrainConfig(output=str(tmp_path / "bf16"), mixed_precision="bf16", **common))
    f32, bf16 = _adapter(tmp_path / "f32"), _adapter(tmp_path / "bf16")
    assert f32.keys() == bf16.keys()
    assert all(v.dtype == torch.float32 for v in bf16.values())  # the adapter itself stays float32
    a, b = (torch.cat([d[k].flatten() for k in sorted(d) if "lora_B" in k]) for d in (f32, bf16))
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    assert not torch.equal(a, b) and cosine > 0.9  # bf16 matmuls: the same training, slightly different numbers

    train_lora(LoraTrainConfig(output=str(tmp_path / "wide"), targets=("attn.to_q", "proj_mlp", "norm.linear"),
                               **common))
    wide = _adapter(tmp_path / "wide")
    names = {k.rsplit(".lora_", 1)[0].split(".", 3)[-1] for k in wide}  # transformer.BLOCKS.I.NAME
    assert names == {"attn.to_q", "proj_mlp", "norm.linear"}
    with pytest.raises(ValueError, match="mixed_precision"):
        train_lora(LoraTrainConfig(output=str(tmp_path / "c"), mixed_precision="fp16", **common))


def test_cli_passes_precision_and_layers(tiny_dev_dir, image_folder, tmp_path):
    import json
    out = tmp_path / "o"
    code = main(["train-lora", "--model", str(tiny_dev_dir), "--data", str(image_folder), "--instance-prompt", "a sks",
                 "--output", str(out), "--steps", "1", "--grad-accum", "1", "--resolution", "32",
                 "--validation-every", "0", "--mixed-precision", "bf16", "--lora-layers", "attn.to_q, proj_out",
                 "--logit-mean", "0.7", "--logit-std", "0.5", "--prior-target", "base_model"])
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mixed_precision"] == "bf16" and cfg["targets"] == ["attn.to_q", "proj_out"]
    assert (cfg["logit_mean"], cfg["logit_std"], cfg["prior_target"]) == (0.7, 0.5, "base_model")
    assert {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in _adapter(out)} == {"to_q", "proj_out"}


def test_base_model_prior_target_measures_only_the_adapters_deviation(tiny_dev_dir, image_folder, tmp_path):
    classes = tmp_path / "classes"
    classes.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(classes / f"c{i}.png")
        (classes / f"c{i}.txt").write_text(f"a dog number {i}")
    common = dict(model=str(tiny_dev_dir), data=str(image_folder), instance_prompt="a sks", grad_accum=1,
                  batch_size=2, lr=1e-2, resolution=32, validation_every=0, class_data=str(classes))

    def run(name, steps, target, weight):
        train_lora(LoraTrainConfig(output=str(tmp_path / name), steps=steps, prior_target=target,
                                   prior_loss_weight=weight, **common))
        return _adapter(tmp_path / name)

    def gap(a, b):
        return torch.cat([(a[k] - b[k]).flatten() for k in a]).abs().mean().item()

    # step 1 starts from a zero adapter: the student is the base model, so the base-model prior has no gradient
    # (but for rounding: the two forwards see batches of different sizes, which flips Adam's first step on a few
    # weights whose gradient is near zero) and its weight does not matter; the images' prior has one, and it does
    assert gap(run("b1", 1, "base_model", 1.0), run("b1x", 1, "base_model", 30.0)) < 1e-5  # measured 1.4e-7
    assert gap(run("i1", 1, "images", 1.0), run("i1x", 1, "images", 30.0)) > 1e-4  # measured 1.2e-3
    # once the adapter has moved, the base model pulls it back: the weight matters
    b3, b3x = run("b3", 3, "base_model", 1.0), run("b3x", 3, "base_model", 30.0)
    assert gap(b3, b3x) > 1e-3  # measured 9.6e-3
    def b_norm(adapter):
        return sum(v.norm() for k, v in adapter.items() if "lora_B" in k)
    assert b_norm(b3x) < b_norm(b3)
    with pytest.raises(ValueError, match="prior_target"):
        run("bad", 1, "teacher", 1.0)
    with pytest.raises(ValueError, match="class_batch_size"):  # 0 is no batch, not the default
        train_lora(LoraTrainConfig(output=str(tmp_path / "bad"), steps=1, class_batch_size=0, **common))


def test_class_batch_size_sets_the_class_half(tiny_dev_dir, image_folder, tmp_path, monkeypatch):
    from fluxion.model.transformer import FluxTransformer
    classes = tmp_path / "classes"
    classes.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(classes / "c.png")
    (classes / "c.txt").write_text("a dog")
    batches = []
    forward = FluxTransformer.forward

    def recording(self, hidden, *args, **kwargs):
        if self.training:
            batches.append(hidden.shape[0])
        return forward(self, hidden, *args, **kwargs)

    monkeypatch.setattr(FluxTransformer, "forward", recording)
    common = dict(model=str(tiny_dev_dir), data=str(image_folder), instance_prompt="a sks", steps=2, grad_accum=1,
                  batch_size=3, resolution=32, validation_every=0, class_data=str(classes))
    train_lora(LoraTrainConfig(output=str(tmp_path / "a"), **common))
    assert batches == [6, 6]  # diffusers' way: as many class images as instance images
    batches.clear()
    train_lora(LoraTrainConfig(output=str(tmp_path / "b"), class_batch_size=1, prior_target="base_model", **common))
    assert batches == [4, 1, 4, 1]  # the student's 3 + 1, then the base model's forward of the class image


def test_noise_level_sampling_moves_training_and_unknown_names_fail_early(tiny_dev_dir, image_folder, tmp_path,
                                                                          monkeypatch):
    from fluxion.model.transformer import FluxTransformer
    sigmas = []
    forward = FluxTransformer.forward

    def recording(self, hidden, img_ids, txt, txt_ids, timesteps, *args, **kwargs):
        sigmas.append(timesteps.detach().clone())
        return forward(self, hidden, img_ids, txt, txt_ids, timesteps, *args, **kwargs)

    monkeypatch.setattr(FluxTransformer, "forward", recording)
    common = dict(model=str(tiny_dev_dir), data=str(image_folder), instance_prompt="a sks", steps=4, grad_accum=1,
                  batch_size=16, resolution=32, validation_every=0)
    train_lora(LoraTrainConfig(output=str(tmp_path / "a"), **common))
    centred = torch.cat(sigmas)
    sigmas.clear()
    train_lora(LoraTrainConfig(output=str(tmp_path / "b"), logit_mean=1.5, **common))
    high = torch.cat(sigmas)
    assert centred.median() < 0.6 < 0.7 < high.median()  # sigmoid(0) = 0.5, sigmoid(1.5) = 0.82
    with pytest.raises(ValueError, match="timestep sampling 'cosine'"):
        train_lora(LoraTrainConfig(output=str(tmp_path / "c"), timestep_sampling="cosine", **common))


def test_resume_with_other_adapter_settings_is_refused_before_touching_the_folder(tiny_dev_dir, image_folder,
                                                                                   tmp_path):
    out = tmp_path / "lora"
    cfg = LoraTrainConfig(model=str(tiny_dev_dir), data=str(image_folder), output=str(out), instance_prompt="a sks",
                          steps=1, grad_accum=1, rank=2, resolution=32, validation_every=0, checkpoint_every=1)
    train_lora(cfg)
    saved_config = (out / "config.json").read_text()
    for change, name in (({"rank": 4}, "rank"), ({"targets": ("attn.to_q",)}, "targets")):
        other = LoraTrainConfig(**{**cfg.__dict__, **change, "steps": 2})
        with pytest.raises(ValueError, match=f"cannot resume: {name} was"):
            train_lora(other)
        assert (out / "config.json").read_text() == saved_config


@pytest.mark.parametrize("field,value", [("prior_loss_weight", float("nan")), ("lr", 0.0), ("checkpoint_every", 0),
                                         ("lr", float("inf")), ("num_class_images", 0)])
def test_bad_numbers_fail_before_any_model_loads(image_folder, tmp_path, field, value):
    cfg = LoraTrainConfig(model=str(tmp_path / "no-model"), data=str(image_folder), output=str(tmp_path / "o"),
                          instance_prompt="a sks", **{field: value})
    with pytest.raises(ValueError, match=field):
        train_lora(cfg)
    assert not (tmp_path / "o").exists()
