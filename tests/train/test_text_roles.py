"""The text encoder's word-role loss (a relation caption's object words labelled with their object's side) and
starting a run from a trained model folder (`init_from`)."""
import pytest
import torch

from fluxion.data.shapes import WORD_ROLES, caption, sample_scene, word_roles
from fluxion.train.config import TrainConfig
from fluxion.train.trainer import CHECKPOINT, make_task, step_generator, train
from fluxion.train.state import load_checkpoint

from train.test_training import flux_config, tiny_vae  # noqa: F401  (the fixture)


def _named(text):
    return {w: WORD_ROLES[r] for w, r in zip(text.split(), word_roles(text)) if r}


@pytest.mark.parametrize("text, want", [
    ("a red circle left of a blue square", {"red": "left", "circle": "left", "blue": "right", "square": "right"}),
    ("a red circle to the right of a blue square on a white background",
     {"red": "right", "circle": "right", "blue": "left", "square": "left"}),
    ("a green triangle on top of an orange square against a gray background",
     {"green": "top", "triangle": "top", "orange": "bottom", "square": "bottom"}),
    ("a yellow square beneath a purple circle on grey",
     {"yellow": "bottom", "square": "bottom", "purple": "top", "circle": "top"}),
])
def test_relation_words_get_their_objects_sides(text, want):
    assert _named(text) == want
    assert len(word_roles(text)) == len(text.split())


@pytest.mark.parametrize("text", ["a red circle", "three blue squares on a black background", "not a caption", ""])
def test_other_captions_have_no_roles(text):
    assert word_roles(text) == [0] * len(text.split())


def test_every_training_relation_caption_labels_four_words():
    import numpy as np

    seen = 0
    for i in range(300):
        rng = np.random.default_rng([5, i])
        scene = sample_scene(rng)
        text = caption(scene, rng, paraphrase=True)
        roles = word_roles(text)
        if scene.kind == "relation":
            seen += 1
            assert sum(r > 0 for r in roles) == 4, text
        else:
            assert not any(roles), text
    assert seen > 50


def test_role_targets_follow_the_tokens(tmp_path, tiny_vae):  # noqa: F811
    task = make_task(flux_config(tmp_path, tiny_vae, text_role_weight=0.5, max_sequence_length=12))
    captions = ["a red circle above a blue square", "", "two red circles"]
    t = task.role_targets(captions)
    assert t.shape == (3, 12)
    top, bottom = WORD_ROLES.index("top"), WORD_ROLES.index("bottom")
    assert t[0, :7].tolist() == [0, top, top, 0, 0, bottom, bottom] and (t[0, 7:] == -100).all()  # </s>, padding
    assert (t[1] == -100).all()  # a dropped caption teaches nothing
    assert (t[2, :3] == 0).all()


def test_role_loss_falls_and_stays_out_of_the_export(tmp_path, tiny_vae):  # noqa: F811
    cfg = flux_config(tmp_path, tiny_vae, steps=30, text_role_weight=1.0, lr=3e-3, caption_dropout=0.0,
                      export=str(tmp_path / "export"))

    def role_loss(task):
        with torch.no_grad():
            return sum(task(task.batch(10_000 + i, step_generator(99, i)))[1]["role_loss"] for i in range(3)) / 3

    before = role_loss(make_task(cfg))
    train(cfg)
    task = make_task(cfg)
    task.load_state_dict(load_checkpoint(cfg.run_dir / CHECKPOINT)["model"], strict=False)
    assert role_loss(task) < 0.8 * before
    exported = (tmp_path / "export" / "text_encoder_2").iterdir()
    assert all("role" not in p.name for p in exported)


def test_init_from_starts_at_the_trained_weights(tmp_path, tiny_vae):  # noqa: F811
    first = flux_config(tmp_path / "a", tiny_vae, steps=3, export=str(tmp_path / "a" / "export"))
    train(first)
    trained = load_checkpoint(first.run_dir / CHECKPOINT)["model"]
    again = make_task(flux_config(tmp_path / "b", tiny_vae, init_from=str(tmp_path / "a" / "export")))
    for name, tensor in again.model.named_parameters():
        torch.testing.assert_close(tensor, trained[f"model.{name}"], rtol=0, atol=1e-6, msg=name)
    fresh = make_task(flux_config(tmp_path / "c", tiny_vae))
    assert not torch.equal(fresh.model["t5"].shared.weight, again.model["t5"].shared.weight)


def test_init_from_with_other_shapes_names_them(tmp_path, tiny_vae):  # noqa: F811
    first = flux_config(tmp_path / "a", tiny_vae, steps=1, export=str(tmp_path / "a" / "export"))
    train(first)
    wider = flux_config(tmp_path / "b", tiny_vae, init_from=str(tmp_path / "a" / "export"),
                        transformer={"hidden_size": 64, "num_heads": 4, "depth": 1, "depth_single_blocks": 1,
                                     "axes_dim": [4, 6, 6]})
    with pytest.raises(ValueError, match="shapes differ from the trained model's at .* tensors"):
        make_task(wider)
    with pytest.raises(ValueError, match="init_from must be a trained model folder"):
        TrainConfig(kind="flux", output="x", vae_path="v", init_from=str(tmp_path))


def test_init_from_with_more_single_blocks_grows_the_trained_model(tmp_path, tiny_vae):  # noqa: F811
    first = flux_config(tmp_path / "a", tiny_vae, steps=3, lr=3e-2, export=str(tmp_path / "a" / "export"))
    train(first)
    trained = make_task(flux_config(tmp_path / "b", tiny_vae, init_from=str(tmp_path / "a" / "export")))
    deeper = make_task(flux_config(tmp_path / "c", tiny_vae, init_from=str(tmp_path / "a" / "export"),
                                   transformer={**first.transformer, "depth_single_blocks": 3}))
    assert len(deeper.model["transformer"].single_blocks) == 3
    batch = trained.batch(0, step_generator(0, 0))
    with torch.no_grad():  # the new blocks' zero gates: the grown model computes what the trained one does
        torch.testing.assert_close(deeper(batch)[0], trained(batch)[0], rtol=0, atol=1e-5)
    deeper(batch)[0].mean().backward()
    hidden = first.transformer["hidden_size"]
    gate = deeper.model["transformer"].single_blocks[2].modulation.lin.weight.grad[2 * hidden:]
    assert gate.abs().sum() > 0  # and they learn from the first step
    shallower = flux_config(tmp_path / "d", tiny_vae, init_from=str(tmp_path / "a" / "export"),
                            transformer={**first.transformer, "depth_single_blocks": 0})
    with pytest.raises(ValueError, match="shapes differ from the trained model's"):
        make_task(shallower)


def test_ema_of_tied_text_embeddings_checkpoints_and_resumes(tmp_path, tiny_vae):  # noqa: F811
    """T5's shared embedding is also its encoder's embed_tokens: the EMA copy must save it once and load it back."""
    train(flux_config(tmp_path, tiny_vae, steps=3, ema_decay=0.9))
    state = load_checkpoint(tmp_path / "flux" / CHECKPOINT)
    assert "t5.shared.weight" in state["ema"] and "t5.encoder.embed_tokens.weight" not in state["ema"]
    assert train(flux_config(tmp_path, tiny_vae, steps=5, ema_decay=0.9))["step"] == 5
