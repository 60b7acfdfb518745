"""`fluxion train-controlnet`: an InstantX-style Canny ControlNet for fluxion-mini, on the one trainer."""
import numpy as np
import pytest
import torch
import yaml

from fluxion.cli import main
from fluxion.data.shapes import TRAIN_PAIRS
from fluxion.model.controlnet import FluxControlNetModel
from fluxion.pipelines import FluxPipeline, default_model_dir
from fluxion.pipelines.controlnet import FluxControlNetPipeline
from fluxion.train.config import ControlNetTrainConfig, load_controlnet_config
from fluxion.train.controlnet import controlnet_from_transformer, edge_maps, edges_to_images, heldout_examples, recolour
from fluxion.train.trainer import CHECKPOINT, train
from fluxion.train.state import load_checkpoint

MINI = default_model_dir()
pytestmark = pytest.mark.skipif(not (MINI / "model_index.json").is_file(), reason="fluxion-mini not shipped here")


def cfg_for(tmp_path, name="run", **kw) -> ControlNetTrainConfig:
    base = dict(kind="controlnet", output=str(tmp_path / name), base_model=str(MINI), steps=4, batch_size=2,
                lr=1e-3, warmup_steps=1, checkpoint_every=2, sample_every=0, log_every=1, threads=1,
                max_sequence_length=20, ema_decay=0.9, sample_steps=2, controlnet={"depth": 1})
    return ControlNetTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def mini():
    pipe = FluxPipeline.from_pretrained(MINI)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_fresh_net_copies_the_first_blocks_and_adds_nothing(mini):
    t = mini.transformer
    net = controlnet_from_transformer(t, depth=2, depth_single_blocks=1)
    ours, theirs = net.state_dict(), t.state_dict()
    for name in ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "double_blocks.1.img_attn.qkv.weight",
                 "single_blocks.0.linear1.weight"):
        assert torch.equal(ours[name], theirs[name]), name
    for name, value in ours.items():
        if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
            assert not value.any(), name
    x = torch.randn(1, 64, 64)
    txt, pooled, txt_ids = mini.encode_prompt("a red circle")
    from fluxion.flow import image_ids
    r = net(x, image_ids(16, 16), txt, txt_ids, torch.tensor([0.5]), pooled, cond=torch.randn(1, 64, 64))
    assert len(r.double) == 2 and len(r.single) == 1 and all(not s.any() for s in r.double + r.single)
    with pytest.raises(ValueError, match="cannot start from a transformer"):
        controlnet_from_transformer(t, depth=t.config.depth + 1)


def test_train_resume_export_and_the_net_changes_the_image(tmp_path, mini):
    whole = cfg_for(tmp_path, "whole", export=str(tmp_path / "whole" / "net"))
    summary = train(whole)
    assert summary["finished"] and np.isfinite(summary["loss"])
    assert (tmp_path / "whole" / CHECKPOINT).is_file() and (tmp_path / "whole" / "loss.png").is_file()
    # interrupted after step 2, then resumed: bit-identical to the uninterrupted run (net, EMA, optimizer)
    train(cfg_for(tmp_path, "split", steps=2))
    assert load_checkpoint(tmp_path / "split" / CHECKPOINT)["info"]["step"] == 2
    train(cfg_for(tmp_path, "split", steps=4))
    a, b = load_checkpoint(tmp_path / "whole" / CHECKPOINT), load_checkpoint(tmp_path / "split" / CHECKPOINT)
    assert a["info"]["step"] == b["info"]["step"] == 4
    for part in ("model", "ema", "optimizer"):
        sa, sb = a[part], b[part]
        # a resumed optimizer also holds (zero) state for the weights that never get a gradient (the last block's
        # text-stream outputs feed nothing): torch.distributed.checkpoint initialises every parameter's state
        assert set(sa) <= set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), part
        assert all(".txt_" in k for k in set(sb) - set(sa)), part
    assert a["info"]["history"] == b["info"]["history"]
    # resuming with another net size is refused by name, before the folder changes
    saved = (tmp_path / "split" / "config.json").read_text()
    with pytest.raises(ValueError, match="cannot resume: controlnet was"):
        train(cfg_for(tmp_path, "split", steps=6, controlnet={"depth": 2}))
    assert (tmp_path / "split" / "config.json").read_text() == saved

    # the export: a diffusers ControlNet folder that from_pretrained loads, equal to the EMA weights
    net = FluxControlNetModel.from_pretrained(tmp_path / "whole" / "net")
    assert net.config.depth == 1 and net.config.depth_single_blocks == 0 and not net.config.has_hint_block
    ema = a["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in net.state_dict().items())
    assert any(net.state_dict()[k].abs().max() > 0 for k in ("controlnet_blocks.0.weight",
                                                              "controlnet_x_embedder.weight"))
    scene, new, prompt = heldout_examples(1)[0]
    edges = edge_maps([scene])
    kw = dict(num_inference_steps=2, output_type="pil")
    fresh = FluxControlNetPipeline.from_pipe(mini, controlnet=controlnet_from_transformer(mini.transformer, 1))
    trained = FluxControlNetPipeline.from_pipe(mini, controlnet=net)
    before = np.asarray(edges_to_images(fresh, edges, [prompt], **kw)[0], dtype=np.float32)
    off = np.asarray(edges_to_images(fresh, edges, [prompt], controlnet_conditioning_scale=0.0, **kw)[0],
                     dtype=np.float32)
    after = np.asarray(edges_to_images(trained, edges, [prompt], **kw)[0], dtype=np.float32)
    assert np.array_equal(before, off)  # a fresh net adds exactly nothing: the same draws, the same image
    assert np.abs(after - before).mean() > 0.1  # the trained net changes the image


def test_cli_and_shipped_configs(tmp_path):
    for name in ("mini-controlnet.yaml", "mini-controlnet-gpu.yaml"):
        cfg = load_controlnet_config(f"configs/{name}")
        assert cfg.kind == "controlnet" and cfg.net_depths == (2, 0) and cfg.max_sequence_length == 20
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"kind": "controlnet", "output": str(tmp_path / "cli"), "base_model": str(MINI),
                                    "steps": 1, "batch_size": 1, "warmup_steps": 1, "sample_every": 0,
                                    "checkpoint_every": 1, "max_sequence_length": 20, "threads": 1,
                                    "controlnet": {"depth": 1}}))
    assert main(["train-controlnet", str(path), "--set", f"export={tmp_path / 'cli' / 'net'}"]) == 0
    assert (tmp_path / "cli" / "net" / "config.json").is_file()
    assert load_checkpoint(tmp_path / "cli" / CHECKPOINT)["info"]["step"] == 1


@pytest.mark.parametrize("change,match", [({"kind": "flux"}, "kind 'controlnet'"),
                                          ({"controlnet": {"depht": 2}}, "unknown keys"),
                                          ({"controlnet": {"depth": 0}}, "controlnet.depth"),
                                          ({"canny_low": 300}, "canny_low"),
                                          ({"lr": 0.0}, "lr")])
def test_bad_settings_fail_before_any_model_loads(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        cfg_for(tmp_path, **change)
    assert not (tmp_path / "run").exists()


def test_held_out_examples_keep_the_layout_and_change_every_colour():
    examples = heldout_examples(60, seed=3)
    assert [p for *_, p in examples] == [p for *_, p in heldout_examples(60, seed=3)]  # deterministic
    for scene, new, prompt in examples:
        assert new.background == scene.background and new.kind == scene.kind and new.relation == scene.relation
        for a, b in zip(scene.objects, new.objects):
            assert (a.shape, a.size_name, a.cx, a.cy, a.side) == (b.shape, b.size_name, b.cx, b.cy, b.side)
            assert a.color != b.color and (b.color, b.shape) in TRAIN_PAIRS
            assert b.color in prompt
        if len({o.color for o in scene.objects}) > 1:
            assert len({o.color for o in new.objects}) > 1
    scene = examples[0][0]
    assert recolour(scene, np.random.default_rng(1)).objects[0].color != scene.objects[0].color


def test_the_training_mix_reaches_the_controlnet_batches(tmp_path):
    from fluxion.data.shapes import parse_caption
    from fluxion.train.trainer import make_task
    relations_only = make_task(cfg_for(tmp_path, kind_probs=[0.0, 0.0, 1.0], batch_size=8))  # by chance: 0.35**8
    _, captions = relations_only.batches(0)
    assert {parse_caption(c).kind for c in captions} == {"relation"}
