"""`tanh_gelu`: the tanh-approximate GELU of FLUX's MLPs, by an in-place chain on small tensors without autograd
and by torch's kernel otherwise; every path computes torch's function, and training still gets its gradient."""
import torch
import torch.nn.functional as F

from fluxion.model import layers
from fluxion.model.layers import TanhGELU, tanh_gelu


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 4


def test_the_chain_computes_torchs_tanh_gelu_and_leaves_its_input_alone():
    x = _x(2, 84, 2048)[..., -512:]  # a strided view, as the single block's MLP half is
    kept = x.clone()
    with torch.no_grad():
        out = tanh_gelu(x)
    torch.testing.assert_close(out, F.gelu(kept, approximate="tanh"), rtol=0, atol=2e-6)
    assert torch.equal(x, kept)
    assert (out - F.gelu(kept)).abs().max() > 1e-4  # and it is the tanh GELU, not the erf one


def test_large_tensors_and_autograd_take_torchs_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(layers, "tanh_gelu_chain", lambda x: calls.append(x.shape) or F.gelu(x, approximate="tanh"))
    with torch.no_grad():
        tanh_gelu(_x(4, 8))
        tanh_gelu(_x(layers._GELU_CHAIN_MAX + 1))
    assert calls == [torch.Size([4, 8])]

    x = _x(3, 16).requires_grad_()
    TanhGELU()(x).sum().backward()
    y = x.detach().clone().requires_grad_()
    F.gelu(y, approximate="tanh").sum().backward()
    assert calls == [torch.Size([4, 8])] and torch.equal(x.grad, y.grad)
