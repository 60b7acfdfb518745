"""fluxion.quant.kernels: the row-chunked quantized matmul against dequantize-then-matmul, on random data."""
import pytest
import torch
import torch.nn.functional as F

from fluxion.quant import QuantLinear, kernels

TYPES = ["int8", "fp8", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qtype", TYPES)
def test_chunked_linear_equals_dequantize_then_matmul(qtype, dtype):
    """Each output column is the same dot product of the same dequantized row with the same input, so the result
    matches the whole-weight product to matmul rounding: float32 within 1e-5 relative (a different blocking of
    the same sums), bf16 within 1e-2 (bf16 outputs round at 2^-8; the two matmuls may accumulate in different
    orders). Tiles of 16 rows over 100 outputs leave a ragged last tile."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(100, 64, generator=g), torch.randn(100, generator=g)
    x = torch.randn(3, 7, 64, generator=g).to(dtype)
    layer = QuantLinear.quantize(w.to(dtype), b.to(dtype), qtype)
    want = F.linear(x, layer.dequantized_weight(dtype), layer.bias)
    got = kernels.chunked_linear(x, layer.qdata, layer.qtype, layer.scale, layer.out_features, layer.bias, rows=16)
    assert got.shape == want.shape == (3, 7, 100) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < tol
    whole = kernels.chunked_linear(x, layer.qdata, layer.qtype, layer.scale, layer.out_features, layer.bias, rows=512)
    torch.testing.assert_close(whole, want, rtol=0, atol=0)  # one tile: exactly the plain product


def test_quant_linear_uses_the_chunked_kernel_without_gradients_and_the_plain_one_with(monkeypatch):
    g = torch.Generator().manual_seed(2)
    layer = QuantLinear.quantize(torch.randn(40, 32, generator=g), None, "q8_0")
    calls = []
    real = kernels.chunked_linear
    monkeypatch.setattr(kernels, "chunked_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(4, 32, generator=g)
    with torch.no_grad():
        layer(x)
    assert calls == [1]
    x.requires_grad_(True)
    layer(x).sum().backward()  # training through a quantized base: autograd sees one plain matmul
    assert calls == [1] and x.grad is not None and x.grad.abs().sum() > 0
