"""Regional prompts (#15): the attention mask of Regional-Prompting-FLUX, masks resized to the packed token grid,
argument checks before any model runs, the regional pass on the tiny model, and masked attention."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import fluxion
from fluxion.model.layers import attention, position_table
from fluxion.pipelines import regional as R

SEQ = 16
STEPS = 3
SIZE = dict(height=32, width=32)  # tiny VAE scale 2: latents 16x16, packed tokens 8x8


def hand_built_mask(lengths: list[int], regions: list[set[int]], n: int) -> torch.Tensor:
    """The scheme written out element by element: [region texts..., image tokens], True = may attend."""
    owner = [r for r, length in enumerate(lengths) for _ in range(length)]  # region of each text token
    t = len(owner)
    background = {j for j in range(n) if not any(j in reg for reg in regions)}
    mask = torch.zeros(t + n, t + n, dtype=torch.bool)
    for q, k in itertools.product(range(t + n), repeat=2):
        if q < t and k < t:
            ok = owner[q] == owner[k]  # (1) a region's text sees its own text only
        elif q < t:
            ok = (k - t) in regions[owner[q]]  # (2) text -> its region's image tokens
        elif k < t:
            ok = (q - t) in regions[owner[k]]  # (2) image tokens of a region -> its text
        else:
            i, j = q - t, k - t  # (3) image tokens sharing a region, or both background
            ok = any(i in reg and j in reg for reg in regions) or (i in background and j in background)
        mask[q, k] = ok
    return mask


def grid(rows: list[str]) -> torch.Tensor:
    """bool [R, N] from pictures of a token grid: one string per region, rows separated by '/', '#' = inside."""
    return torch.stack([torch.tensor([c == "#" for c in r.replace("/", "")]) for r in rows])


# 4x4 token grid: region 0 the left half, region 1 the middle two columns (overlapping column 1), column 3 and
# the bottom row of column 2 background.
TWO = grid(["##../##../##../##..", ".##./.##./.##./.#.."])


def test_attention_mask_matches_hand_built():
    lengths = [3, 2]
    regions = [set(torch.nonzero(r).reshape(-1).tolist()) for r in TWO]
    got = R.attention_mask(lengths, TWO)
    assert got.dtype == torch.bool and got.shape == (5 + 16, 5 + 16)
    want = hand_built_mask(lengths, regions, 16)
    assert torch.equal(got, want), torch.nonzero(got != want)[:10].tolist()
    assert 0.2 < want.float().mean() < 0.8  # neither all nor nothing: a wrong mask shows
    assert want.any(1).all()  # every query sees something (no all -inf softmax row)


def test_attention_mask_three_regions_and_lengths():
    regions = grid(["#.../#.../..../....", ".##./.##./..../....", "..../..../####/...."])
    lengths = [2, 4, 1]
    sets = [set(torch.nonzero(r).reshape(-1).tolist()) for r in regions]
    assert torch.equal(R.attention_mask(lengths, regions), hand_built_mask(lengths, sets, 16))


def test_every_region_keeps_its_image_block():
    """The known bug: the image-to-image block overwritten per region, so only the last region's survives."""
    mask = R.attention_mask([2, 2], TWO)
    img = mask[4:, 4:]
    for r, inside in enumerate(TWO):
        cols = torch.nonzero(inside).reshape(-1)
        assert img[cols][:, cols].all(), f"region {r} lost its image-to-image block"
    only0 = torch.nonzero(TWO[0] & ~TWO[1]).reshape(-1)
    only1 = torch.nonzero(TWO[1] & ~TWO[0]).reshape(-1)
    assert not img[only0][:, only1].any() and not img[only1][:, only0].any()  # regions do not mix
    background = torch.nonzero(~TWO.any(0)).reshape(-1)
    assert img[background][:, background].all()
    assert not img[background][:, torch.nonzero(TWO.any(0)).reshape(-1)].any()


def test_region_text_sees_only_itself_and_its_region():
    mask = R.attention_mask([3, 2], TWO)
    assert mask[:3, :3].all() and mask[3:5, 3:5].all()
    assert not mask[:3, 3:5].any() and not mask[3:5, :3].any()
    assert torch.equal(mask[0, 5:], TWO[0]) and torch.equal(mask[4, 5:], TWO[1])
    assert torch.equal(mask[5:, 1], TWO[0]) and torch.equal(mask[5:, 3], TWO[1])
    assert not mask[5:, :5][~TWO.any(0)].any()  # background tokens see no region text


# ---------------------------------------------------------------- image-size masks -> token grid


def half(h, w, side, kind="np"):
    m = np.zeros((h, w), np.float32)
    if side == "left":
        m[:, : w // 2] = 1
    elif side == "right":
        m[:, w // 2 :] = 1
    elif side == "top-left":
        m[: h // 2, : w // 2] = 1
    if kind == "pil":
        return Image.fromarray((m * 255).astype(np.uint8)).convert("RGB")
    if kind == "tensor":
        return torch.from_numpy(m)[None]
    if kind == "uint8":
        return (m * 255).astype(np.uint8)
    return m


@pytest.mark.parametrize("kind", ["np", "pil", "tensor", "uint8"])
def test_token_regions_resize_image_masks(kind):
    regions = R.check(["a", "b"], [half(32, 32, "left", kind), half(32, 32, "right", kind)], 0.2, None, 3)
    got = R.token_regions(regions.masks, 16, 16)  # 32x32 image, VAE scale 2 -> 16x16 latents -> 8x8 tokens
    assert got.shape == (2, 64) and got.dtype == torch.bool
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    assert torch.equal(got[0], left.reshape(-1)) and torch.equal(got[1], ~left.reshape(-1))


def test_token_regions_non_square_and_other_sizes():
    got = R.token_regions([half(32, 48, "top-left")], 16, 24)  # 32x48 image -> 8x12 tokens
    want = torch.zeros(8, 12, dtype=torch.bool)
    want[:4, :6] = True
    assert torch.equal(got[0], want.reshape(-1))
    got = R.token_regions([half(100, 100, "left")], 16, 16)  # any mask size is resized to the grid
    assert torch.equal(got[0], torch.zeros(8, 8, dtype=torch.bool).index_fill_(1, torch.arange(4), True).reshape(-1))
    soft = np.full((32, 32), 0.4, np.float32)
    soft[:, :16] = 0.6  # thresholded at 0.5
    assert torch.equal(R.token_regions([soft], 16, 16)[0].reshape(8, 8)[:, :4].all(), torch.tensor(True))
    assert not R.token_regions([soft], 16, 16)[0].reshape(8, 8)[:, 4:].any()


# ---------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def dev(tiny_dev_dir):
    pipe = fluxion.FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPTS = ["a photo of a red cat", "a painting of a blue dragon"]


def call(pipe, seed=5, **kw):
    kw = {"prompt": "a red cat next to a blue dragon", "num_inference_steps": STEPS, "max_sequence_length": SEQ,
          "output_type": "np", "guidance_scale": 3.5, **SIZE, **kw}
    return pipe(generator=torch.Generator().manual_seed(seed), **kw)


def regional(**kw):
    return {"regional_prompts": PROMPTS, "regional_masks": [half(32, 32, "left"), half(32, 32, "right")], **kw}


@pytest.fixture
def no_model(dev, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model ran before the arguments were checked")

    monkeypatch.setattr(dev, "encode_prompt", refuse)
    monkeypatch.setattr(dev.transformer, "forward", refuse)
    return dev


BAD = {
    "prompts without masks": (dict(regional_prompts=PROMPTS), "both regional_prompts and regional_masks"),
    "masks without prompts": (dict(regional_masks=[half(32, 32, "left")]), "both regional_prompts and regional_masks"),
    "fewer masks": (regional(regional_masks=[half(32, 32, "left")]), "2 prompts, got 1 masks"),
    "more masks": (regional(regional_masks=[half(32, 32, "left")] * 3), "2 prompts, got 3 masks"),
    "one mask not in a list": (regional(regional_masks=half(32, 32, "left")), "one mask per regional prompt"),
    "a str as prompts": (regional(regional_prompts="a cat"), "regional_prompts must be"),
    "an int as prompts": (regional(regional_prompts=3), "regional_prompts must be"),
    "empty prompts": (regional(regional_prompts=[], regional_masks=[]), "regional_prompts must be"),
    "a non-str prompt": (regional(regional_prompts=["a cat", 7]), "regional_prompts must be"),
    "base ratio above 1": (regional(regional_base_ratio=1.5), "regional_base_ratio"),
    "base ratio below 0": (regional(regional_base_ratio=-0.1), "regional_base_ratio"),
    "base ratio nan": (regional(regional_base_ratio=float("nan")), "regional_base_ratio"),
    "base ratio bool": (regional(regional_base_ratio=True), "regional_base_ratio"),
    "base ratio str": (regional(regional_base_ratio="0.2"), "regional_base_ratio"),
    "negative steps": (regional(regional_steps=-1), "regional_steps"),
    "fractional steps": (regional(regional_steps=1.5), "regional_steps"),
    "bool steps": (regional(regional_steps=True), "regional_steps"),
    "a str mask": (regional(regional_masks=["left.png", half(32, 32, "right")]), r"regional_masks\[0\]"),
    "a nan mask": (regional(regional_masks=[half(32, 32, "left"), np.full((32, 32), np.nan)]), r"regional_masks\[1\]"),
    "a 4-d mask": (regional(regional_masks=[np.ones((2, 3, 32, 32)), half(32, 32, "right")]), r"regional_masks\[0\]"),
    "an empty mask": (regional(regional_masks=[np.ones((0, 32)), half(32, 32, "right")]), r"regional_masks\[0\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_regional_arguments_fail_before_any_model_runs(no_model, case):
    kw, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        call(no_model, **kw)


def test_regional_call_differs_and_zero_steps_equals_plain(dev):
    plain = call(dev).images
    assert plain.std() > 0.01
    out = call(dev, **regional())
    assert out.images.shape == plain.shape
    assert np.abs(out.images - plain).max() > 1e-3
    assert out.parameters[0]["regional_prompts"] == PROMPTS
    assert out.parameters[0]["regional_steps"] == 1  # default: a third of the steps, at least one
    assert np.array_equal(call(dev, **regional(regional_steps=0)).images, plain)
    assert np.array_equal(call(dev, **regional(regional_base_ratio=1.0)).images, plain)  # base pass only
    more = call(dev, **regional(regional_steps=STEPS)).images
    assert not np.array_equal(more, out.images)
    other = call(dev, **regional(regional_masks=[half(32, 32, "right"), half(32, 32, "left")])).images
    assert not np.array_equal(other, out.images)  # the masks matter


def test_one_whole_image_region_with_the_base_prompt_is_the_plain_call(dev):
    """One region covering the image, with the base prompt as its prompt: the mask lets everything attend, so
    the regional pass is the base pass (same text, ids, pooled vector), even with no base share at all."""
    prompt = "a red cat next to a blue dragon"
    plain = call(dev, prompt=prompt).images
    whole = call(dev, prompt=prompt, regional_prompts=[prompt], regional_masks=[np.ones((32, 32), np.float32)],
                 regional_base_ratio=0.0, regional_steps=STEPS).images
    assert np.allclose(whole, plain, atol=1e-5, rtol=0)
    other = call(dev, prompt=prompt, regional_prompts=["a painting of a green frog"],
                 regional_masks=[np.ones((32, 32), np.float32)], regional_base_ratio=0.0, regional_steps=STEPS).images
    assert np.abs(other - plain).max() > 1e-3  # the region's prompt is what the pass follows


def test_regional_pass_gets_the_mask(dev):
    """The transformer sees the mask built for this call's size, over [region texts, image tokens]."""
    masks = []
    h = dev.transformer.register_forward_pre_hook(lambda m, a, k: masks.append(k.get("attn_mask")), with_kwargs=True)
    try:
        call(dev, **regional(regional_steps=2))
    finally:
        h.remove()
    got = [m for m in masks if m is not None]
    assert len(got) == 2 and len(masks) == STEPS + 2  # base pass every step, regional pass the first two
    regions = R.token_regions([half(32, 32, "left"), half(32, 32, "right")], 16, 16)
    assert torch.equal(got[0], R.attention_mask([SEQ, SEQ], regions))


def test_regional_with_true_cfg_and_batch(dev):
    kw = dict(negative_prompt="blurry", true_cfg_scale=2.0, num_images_per_prompt=2)
    plain = call(dev, **kw).images
    out = call(dev, **kw, **regional()).images
    assert out.shape == (2, 32, 32, 3)
    assert np.abs(out - plain).max() > 1e-3
    assert np.array_equal(call(dev, **kw, **regional(regional_steps=0)).images, plain)


# ---------------------------------------------------------------- masked attention


def _qkv(dtype, b=2, h=3, length=40, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g) for _ in range(3))
    ids = torch.randint(0, 20, (length, 3), generator=g).float()
    table = position_table(ids, (2, 2, 4), 10000.0)
    return q.to(dtype), k.to(dtype), v.to(dtype), table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_true_mask_equals_unmasked_attention(dtype):
    q, k, v, table = _qkv(dtype)
    plain = attention(q, k, v, table)
    masked = attention(q, k, v, table, mask=torch.ones(40, 40, dtype=torch.bool))
    assert masked.dtype == plain.dtype == dtype and masked.shape == (2, 40, 3 * 8)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(masked.float(), plain.float(), atol=tol, rtol=0)
    assert plain.float().abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_restricts_attention(dtype):
    """A block mask equals attention run separately on each block (RoPE rotates by position, so it commutes)."""
    q, k, v, table = _qkv(dtype)
    blocks = [slice(0, 15), slice(15, 40)]
    mask = torch.zeros(40, 40, dtype=torch.bool)
    for s in blocks:
        mask[s, s] = True
    masked = attention(q, k, v, table, mask=mask)
    for s in blocks:
        alone = attention(q[:, :, s], k[:, :, s], v[:, :, s], table[:, :, s])
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(masked[:, s].float(), alone.float(), atol=tol, rtol=0)
    assert not torch.allclose(masked.float(), attention(q, k, v, table).float(), atol=0.05)


def test_bf16_cpu_masked_path_is_taken():
    """bf16 on CPU runs fluxion's own attention (not torch's kernel): its masked branch must mask."""
    from fluxion.model import layers

    q, k, v, _ = _qkv(torch.bfloat16)
    mask = torch.ones(40, 40, dtype=torch.bool)
    mask[:, 20:] = False
    out = layers.bf16_cpu_attention(q, k, v, mask=mask)
    ref = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * 8**-0.5 + torch.where(mask, 0.0, -torch.inf),
                        -1) @ v.float()
    assert torch.allclose(out.float(), ref, atol=3e-2, rtol=0)
    assert torch.equal(layers.bf16_cpu_attention(q, k, v, mask=torch.ones(40, 40, dtype=torch.bool)),
                       layers.bf16_cpu_attention(q, k, v))
