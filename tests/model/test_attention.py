"""The bf16 CPU attention path: same result as exact attention within bf16 rounding, at any blocking."""
import pytest
import torch
import torch.nn.functional as F

from fluxion.model.layers import attention, bf16_cpu_attention, position_table


@pytest.mark.parametrize("max_scores", [2**22, 4096, 100])  # one block; blocks of heads; blocks of query rows
def test_bf16_attention_matches_exact_attention(max_scores):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g) for _ in range(3))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ours = bf16_cpu_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), max_scores)
    assert ours.dtype == torch.bfloat16 and ours.shape == q.shape
    assert (ours.double() - exact).abs().max() < 0.03  # bf16 inputs and probabilities: ~2^-8 relative
    assert torch.allclose(ours, bf16_cpu_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()), atol=1e-2)


def test_float32_attention_keeps_the_exact_kernel():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(3))
    table = position_table(torch.randint(0, 5, (12, 3)).float(), (2, 2, 4), 10_000)
    out = attention(q, k, v, table)
    assert out.shape == (1, 12, 16)
    bf = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), table)
    assert bf.dtype == torch.bfloat16 and not torch.equal(bf.float(), out)
    assert torch.allclose(bf.float(), out, atol=0.05)
