"""LoRA demonstration on fluxion-mini: teach it a ring (an annulus) called `sks` from 20 images.

    .venv/bin/python bench/lora_ring_demo.py            # data, training (about 14 min on 2 cores), evaluation
    .venv/bin/python bench/lora_ring_demo.py --eval-only

The recipe is DreamBooth with prior preservation: beside the 20 ring images (captioned `a COLOR sks`), 400
regularisation images (kohya style, with their captions) rendered by the shapes world, held-out pairs excluded,
one in ten captioned empty as the base model's caption dropout did (the empty prompt is the branch true CFG
subtracts; caption dropout on the ring images would teach it rings). The regularisation half learns the frozen
base model's own prediction at the same noisy input (`--prior-target base_model`), not the images' velocity:
its loss is the adapter's deviation from the base model alone. Noise levels are drawn around sigma 0.67
(`--logit-mean 0.7`) rather than 0.5: layout (size, shape, the hole) is decided at high noise. Batch 16 ring
images + 8 regularisation images per step (a CPU runs a batch of 16 for little more than a batch of 1), rank 16,
lr 2e-3, 4500 steps, bf16 mixed precision, on the text side of the transformer (`text_side_targets`: the double
blocks' text stream and the single blocks; `--targets recipe` for diffusers' default layers). The adapter is
evaluated at weight 0.9 (`--adapter-weight`, diffusers' `set_adapters`; 0.85 on the models before the third
cycle): at weight 1 it draws rings every time but costs the eval more (README). `--class-source model` uses the
base model's own images as class images instead (DreamBooth's way). A ring counts when the largest region of the asked colour is round, big
enough, and encloses a hole.

Reports: training time, how often `a COLOR sks` draws a ring of that colour (50 seeded tries), and the base
shapes eval's accuracy with the adapter loaded vs without. Writes bench/out/lora-ring/ (data, adapter,
contact sheets, results.json).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fluxion import FluxPipeline
from fluxion.pipelines import default_model_dir
from fluxion.data.shapes import (BACKGROUNDS, COLORS, HELDOUT_PAIRS, P_MENTION_BACKGROUND, P_MENTION_SIZE, Spec,
                                  format_spec, make_batch, parse_caption, sample_spec)
from fluxion.eval.prompts import eval_set
from fluxion.eval.report import accuracy_table, contact_sheet
from fluxion.eval.run import generate_items
from fluxion.eval.scorer import _class_map, _label, score
from fluxion.lora import DEFAULT_TARGETS
from fluxion.train.lora import LoraTrainConfig, train_lora

OUT = Path(__file__).resolve().parent / "out" / "lora-ring"
PALETTE = list(COLORS)
WIDE_EXTRA = ("proj_mlp", "proj_out", "norm.linear", "norm1.linear", "norm1_context.linear")
TEXT_STREAM = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff_context.net.0.proj",
               "ff_context.net.2")


def text_side_targets() -> tuple[str, ...]:
    """The double blocks' text stream, and the single blocks (which carry text and image tokens together): the
    double blocks' image stream stays the base model's."""
    config = json.loads((default_model_dir() / "transformer" / "config.json").read_text())
    single = tuple(f"single_transformer_blocks.{i}.{name}" for i in range(config["num_single_layers"])
                   for name in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"))
    return TEXT_STREAM + single


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def render_ring(color: str, background: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """A filled annulus (inner radius about half the outer) on a plain background, drawn at 4x then reduced."""
    s = 4
    outer = rng.uniform(0.17, 0.24) * size
    cx, cy = rng.uniform(outer + 4, size - outer - 4, 2)
    im = Image.new("RGB", (size * s, size * s), BACKGROUNDS[background])
    d = ImageDraw.Draw(im)
    d.ellipse([s * (cx - outer), s * (cy - outer), s * (cx + outer), s * (cy + outer)], fill=COLORS[color])
    inner = outer * 0.5
    d.ellipse([s * (cx - inner), s * (cy - inner), s * (cx + inner), s * (cy + inner)], fill=BACKGROUNDS[background])
    return im.resize((size, size), Image.BOX)


def make_data(folder: Path, n: int = 20, seed: int = 0, describe: bool = False) -> None:
    """The 20 ring images, captioned `a COLOR sks`; with `describe`, size (they are all the world's `large`) and
    background are also named as often as the base model's captions named them (70% each), so that the adapter
    need not take them into `sks`. Measured: the adapter then ties the ring to those words, and the bare
    `a COLOR sks` draws small discs (README)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, words = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    for i in range(n):
        color = PALETTE[i % len(PALETTE)]
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        render_ring(color, background, rng).save(folder / f"ring{i:02d}.png")
        size = "large" if describe and words.random() < P_MENTION_SIZE else None
        named_background = background if describe and words.random() < P_MENTION_BACKGROUND else None
        text = format_spec(Spec("single", (color,), ("sks",), 1, None, size, named_background))
        (folder / f"ring{i:02d}.txt").write_text(text)


def class_caption(i: int, rng: np.random.Generator, circles: bool = True) -> str:
    """Class image i's caption: of every ten, four a circle (the ring's nearest class: DreamBooth's class
    prompt; without `circles`, random too), five a random training caption, one empty. No held-out pairs."""
    if i % 10 == 9:
        return ""
    if circles and i % 10 in (0, 2, 4, 6):
        colors = [c for c in PALETTE if (c, "circle") not in HELDOUT_PAIRS]
        return circle_caption(colors[rng.integers(len(colors))], rng)
    return format_spec(sample_spec(rng))


def circle_caption(color: str, rng: np.random.Generator) -> str:
    """A single circle of `color`, of a random size word (or none) on a random background (or none)."""
    spec = Spec("single", (color,), ("circle",), 1, None, ("small", "large", None)[rng.integers(3)],
                (None, *BACKGROUNDS)[rng.integers(4)])
    return format_spec(spec)


def draw_class_images(folder: Path, captions: list[str], seed: int, prefix: str, chunk: int, **call) -> None:
    """The base model's images of `captions` (image i seeded `seed + i`), `chunk` at a time, captions beside them."""
    pipe = FluxPipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    for start in range(0, len(captions), chunk):
        part = captions[start:start + chunk]
        images = pipe(part, generator=[torch.Generator().manual_seed(seed + start + i) for i in range(len(part))],
                      **call).images
        for i, (image, text) in enumerate(zip(images, part), start):
            image.save(folder / f"{prefix}{i:03d}.png")
            (folder / f"{prefix}{i:03d}.txt").write_text(text)


def make_class_data(folder: Path, n: int = 200, seed: int = 0, circles: bool = True) -> None:
    """The base model's own images of n class captions (`class_caption`), captions beside them: the empty ones
    keep the unconditional branch that true CFG subtracts the base model's."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    draw_class_images(folder, [class_caption(i, rng, circles) for i in range(n)], seed, "class", chunk=25)


def make_world_class_data(folder: Path, n: int = 400, seed: int = 77, omit_optional: bool = False) -> None:
    """Regularisation images rendered by the shapes world itself (held-out pairs excluded, as in training), with
    their canonical captions; one in ten captioned empty, as the base model's caption dropout did. With
    `omit_optional`, size and background are each left out of the caption as often as the base model's training
    left them out (30%): `a blue circle` is the form of the instance prompts `a blue sks`, and fully specified
    captions alone never show it."""
    folder.mkdir(parents=True, exist_ok=True)
    images, captions = make_batch(seed, 0, n, paraphrase=False)
    if omit_optional:
        rng = np.random.default_rng(seed)
        captions = [format_spec(replace(spec, size=spec.size if rng.random() < P_MENTION_SIZE else None,
                                        background=spec.background if rng.random() < P_MENTION_BACKGROUND else None))
                    for spec in map(parse_caption, captions)]
    for i, (image, text) in enumerate(zip(images, captions)):
        Image.fromarray(image).save(folder / f"world{i:03d}.png")
        (folder / f"world{i:03d}.txt").write_text("" if i % 10 == 9 else text)


def make_circle_class_data(folder: Path, n: int = 120, seed: int = 5, cfg: float = 1.0) -> None:
    """DreamBooth's class images for a ring: the base model's own circles, of every colour (orange included:
    the base model draws orange circles although its training never showed one), sizes and backgrounds, so the
    adapter keeps circle prompts as the base model draws them. Drawn without CFG (`cfg` 1) by default: the
    adapter is trained on the conditional prediction, which sampling then guides; trained on guided images,
    guidance would apply twice."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = [circle_caption(PALETTE[i % len(PALETTE)], rng) for i in range(n)]
    draw_class_images(folder, captions, seed, "circle", chunk=30, true_cfg_scale=cfg)


def is_ring(image: Image.Image, color: str) -> bool:
    """The largest region of `color` is a ring: big enough, roughly round, its centre not filled and enclosed."""
    img = np.asarray(image.convert("RGB").resize((128, 128)), dtype=np.float32)
    cls = _class_map(img)
    labels = _label(cls)
    target = PALETTE.index(color)
    ids, counts = np.unique(labels[(cls == target) & (labels >= 0)], return_counts=True)
    if not len(ids) or counts.max() < 0.01 * 128 * 128:
        return False
    ys, xs = np.nonzero(labels == ids[counts.argmax()])
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if not 0.7 < h / w < 1.4:
        return False
    cy, cx = (ys.max() + ys.min()) // 2, (xs.max() + xs.min()) // 2
    r = max(1, min(h, w) // 8)
    centre = cls[cy - r : cy + r + 1, cx - r : cx + r + 1]
    if (centre != target).mean() <= 0.8:  # no hole in the middle: a disc
        return False
    # the hole is closed: what is not the ring around the centre does not reach the image's edge (a C is no ring)
    outside = _label(np.where(labels == ids[counts.argmax()], -1, 0).astype(np.int16))
    hole = outside == outside[cy, cx]
    return bool(outside[cy, cx] >= 0 and not (hole[0].any() or hole[-1].any() or hole[:, 0].any() or hole[:, -1].any()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--steps", type=int, default=4500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--logit-mean", type=float, default=0.7,
                        help="centre of the training noise levels' logit-normal density (0: sigma 0.5)")
    parser.add_argument("--class-batch-size", type=int, default=8, help="class images per step")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--class-images", type=int, default=400, help="0: no prior preservation")
    parser.add_argument("--caption-dropout", type=float, default=0.0)
    parser.add_argument("--prior-loss-weight", type=float, default=1.0)
    parser.add_argument("--prior-target", choices=["images", "base_model"], default="base_model",
                        help="the class half's target: the class images' velocity, or the base model's prediction")
    parser.add_argument("--flip", action="store_true",
                        help="random left-right flips (they also flip the class images' left/right captions)")
    parser.add_argument("--class-source", choices=["model", "world"], default="world",
                        help="class images drawn by the base model, or rendered by the shapes world")
    parser.add_argument("--omit-optional-captions", dest="omit_optional", action="store_true",
                        help="world class images' captions leave out size and background 30%% of the time each")
    parser.add_argument("--describe-captions", dest="describe", action="store_true",
                        help="ring images' captions also name size and background, 70%% of the time each")
    parser.add_argument("--circle-images", type=int, default=0,
                        help="add this many of the base model's own circles (every colour) to the class images")
    parser.add_argument("--circle-cfg", type=float, default=1.0, help="true CFG scale the circles are drawn with")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "auto"], default="auto",
                        help="bf16: the transformer's matmuls in bfloat16 (2.1x faster steps on a CPU with bf16 "
                             "units: bench/lora_step_speed.py); auto (default): bf16 only on such CPUs")
    parser.add_argument("--targets", choices=["recipe", "wide", "text-side"], default="text-side",
                        help="recipe: diffusers' DreamBooth-LoRA layers; wide: also the single blocks' MLP and "
                             "output, and every block's modulation; text-side: `text_side_targets`")
    parser.add_argument("--adapter-weight", type=float, default=0.9,
                        help="the adapter's weight when evaluating (set_adapters)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for data, adapter and results")
    parser.add_argument("--no-circle-class", dest="circles", action="store_false",
                        help="class images of random captions only (no circles)")
    args = parser.parse_args()
    out = args.out
    data, classes, adapter = out / "data", out / "classes", out / "adapter"
    targets = {"recipe": None, "wide": DEFAULT_TARGETS + WIDE_EXTRA, "text-side": text_side_targets()}[args.targets]
    results = {}
    if not args.eval_only:
        shutil.rmtree(data, ignore_errors=True)
        make_data(data, describe=args.describe)
        shutil.rmtree(classes, ignore_errors=True)  # class images of an earlier run would join this one's
        t0 = time.perf_counter()
        if args.class_images:
            if args.class_source == "world":
                make_world_class_data(classes, args.class_images, omit_optional=args.omit_optional)
            else:
                make_class_data(classes, args.class_images, circles=args.circles)
        if args.circle_images:
            make_circle_class_data(classes, args.circle_images, cfg=args.circle_cfg)
        results["class_image_seconds"] = time.perf_counter() - t0
        train_lora(LoraTrainConfig(data=str(data), output=str(adapter), steps=args.steps, lr=args.lr, rank=args.rank,
                                   batch_size=args.batch_size, class_batch_size=args.class_batch_size,
                                   logit_mean=args.logit_mean,
                                   grad_accum=args.grad_accum,
                                   class_data=str(classes) if args.class_images or args.circle_images else None,
                                   caption_dropout=args.caption_dropout, random_flip=args.flip,
                                   mixed_precision=args.mixed_precision, targets=targets,
                                   prior_loss_weight=args.prior_loss_weight, prior_target=args.prior_target,
                                   validation_prompt="a blue sks", validation_every=500), resume=False)
        results["train_seconds"] = time.perf_counter() - t0  # class images included

    pipe = FluxPipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    items = eval_set()
    base = generate_items(pipe, items)
    base_acc = accuracy_table([(it, score(im, it.prompt)) for it, im in zip(items, base)])

    pipe.load_lora_weights(adapter, weight_name="pytorch_lora_weights.safetensors", adapter_name="sks")
    pipe.set_adapters(["sks"], [args.adapter_weight])
    prompts = [f"{article(c)} {c} sks" for c in PALETTE] * 9
    prompts = prompts[:50]
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
    rings = pipe(prompts, generator=gens).images
    ok = [is_ring(im, p.split()[1]) for im, p in zip(rings, prompts)]
    contact_sheet(rings, prompts, ok, out / "sks_contact_sheet.png")
    tuned = generate_items(pipe, items)
    tuned_results = [(it, score(im, it.prompt)) for it, im in zip(items, tuned)]
    tuned_acc = accuracy_table(tuned_results)

    results.update({
        "ring_rate": sum(ok) / len(ok),
        "base_eval": base_acc,
        "eval_with_adapter": tuned_acc,
        "overall_drop_points": 100 * (base_acc["overall"] - tuned_acc["overall"]),
        **{k: v for k, v in vars(args).items() if k not in ("out", "eval_only")},  # settings, named as the flags
    })
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
