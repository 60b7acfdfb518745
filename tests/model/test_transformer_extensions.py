"""FluxTransformer.forward's extension points: block residuals (ControlNets) and attention masks."""
import math

import pytest
import torch

from fluxion.flow import image_ids, text_ids
from fluxion.model.transformer import BlockResiduals, FluxConfig, FluxTransformer

CONFIG = FluxConfig(in_channels=16, vec_in_dim=12, context_in_dim=20, hidden_size=32, num_heads=2, depth=3,
                    depth_single_blocks=4, axes_dim=(4, 6, 6), guidance_embed=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = FluxTransformer(CONFIG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(2, 16, 16, generator=g), img_ids=image_ids(8, 8), txt=torch.randn(2, 5, 20, generator=g),
                txt_ids=text_ids(5), timesteps=torch.rand(2, generator=g), y=torch.randn(2, 12, generator=g))


def with_hooks(model, x, double, single, repeat):
    """The residual rule written out with forward hooks on the blocks."""
    handles = []
    for i, block in enumerate(model.double_blocks):
        r = double[i % len(double)] if repeat else double[i // math.ceil(CONFIG.depth / len(double))]
        handles.append(block.register_forward_hook(lambda m, a, out, r=r: (out[0] + r, out[1])))
    for i, block in enumerate(model.single_blocks):
        r = single[i // math.ceil(CONFIG.depth_single_blocks / len(single))]
        handles.append(block.register_forward_hook(
            lambda m, a, out, r=r: torch.cat([out[:, :5], out[:, 5:] + r], 1)))
    try:
        return model(**x)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
@pytest.mark.parametrize("n_double, n_single, repeat", [(2, 3, False), (2, 1, True), (1, 4, False)])
def test_block_residuals_follow_the_interval_and_repeat_rules(model, n_double, n_single, repeat):
    x = inputs()
    g = torch.Generator().manual_seed(1)
    double = [torch.randn(2, 16, 32, generator=g) for _ in range(n_double)]
    single = [torch.randn(2, 16, 32, generator=g) for _ in range(n_single)]
    got = model(**x, residuals=BlockResiduals(double, single, repeat))
    torch.testing.assert_close(got, with_hooks(model, x, double, single, repeat))
    assert (got - model(**x)).abs().max() > 1e-3


@torch.no_grad()
def test_an_all_true_attention_mask_changes_nothing_and_a_mask_is_applied(model):
    x = inputs(2)
    n = 5 + 16
    torch.testing.assert_close(model(**x, attn_mask=torch.ones(n, n, dtype=torch.bool)), model(**x))
    blocked = torch.ones(n, n, dtype=torch.bool)
    blocked[5:, :5] = False  # image tokens may not see the text
    assert (model(**x, attn_mask=blocked) - model(**x)).abs().max() > 1e-3
