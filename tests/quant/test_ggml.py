"""GGML block types in torch against the `gguf` package's own numpy quantize / dequantize (the oracle)."""
import gguf
import numpy as np
import pytest
import torch

from fluxion.quant import ggml

G = gguf.GGMLQuantizationType
WRITABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F32", "F16", "BF16"]
#: byte offsets of each type's f16 scale fields (random bytes there could be NaN / inf)
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
              "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(qtype: str, rows: int, blocks_per_row: int, seed: int = 0) -> torch.Tensor:
    """Arbitrary valid blocks: random bytes, with finite, varied f16 scales."""
    _, ts, _ = ggml.TYPES[qtype]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows, blocks_per_row * ts), dtype=torch.uint8, generator=g)
    blocks = raw.view(-1, ts)
    for off in F16_FIELDS[qtype]:
        scale = torch.randn(blocks.shape[0], 1, generator=g) * 0.02
        blocks[:, off : off + 2] = scale.half().view(torch.uint8)
    return raw


def weights(rows=6, cols=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :32] = 0  # an all-zero block (d = 0)
    w[1, :32] = 0.01  # a constant block (max = min)
    w[2, 32:64] *= 100  # a block of large values
    return w


@pytest.mark.parametrize("qtype", WRITABLE)
def test_quantize_is_bit_exact_with_gguf(qtype):
    w = weights()
    ours = ggml.quantize(w, qtype)
    ref = gguf.quants.quantize(w.numpy(), G[qtype])
    assert ours.dtype == torch.uint8 and ours.shape == (6, ggml.row_bytes(qtype, 256))
    assert np.array_equal(ours.numpy(), ref.view(np.uint8).reshape(ours.shape))


@pytest.mark.parametrize("qtype", WRITABLE + ["Q4_K", "Q5_K", "Q6_K"])
def test_dequantize_float32_is_bit_exact_with_gguf(qtype):
    if qtype in WRITABLE:
        raw = ggml.quantize(weights(), qtype)
    else:
        raw = random_blocks(qtype, rows=3, blocks_per_row=2)
    bs, ts, _ = ggml.TYPES[qtype]
    shape = (raw.shape[0], raw.shape[1] // ts * bs)
    ours = ggml.dequantize(raw, qtype, shape)
    ref = gguf.quants.dequantize(raw.numpy(), G[qtype])
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape == shape
    assert np.array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_half_dtypes_within_rounding(qtype, dtype):
    # scales are rounded to `dtype` before the product: a few roundings of the dtype, relative to the block's values
    raw = random_blocks(qtype, rows=2, blocks_per_row=2, seed=1)
    bs = ggml.block_size(qtype)
    shape = (2, 2 * bs)
    ref = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), G[qtype]))
    ours = ggml.dequantize(raw, qtype, shape, dtype)
    assert ours.dtype == dtype
    eps = torch.finfo(dtype).eps
    block_max = ref.reshape(-1, 16).abs().amax(-1, keepdim=True)  # 16 | every sub-block size
    assert ((ours.float() - ref).reshape(-1, 16).abs() <= 4 * eps * block_max).all()


def test_quantize_roundtrip_errors_shrink_with_bits():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    err = {q: float((ggml.dequantize(ggml.quantize(w, q), q, w.shape) - w).norm() / w.norm())
           for q in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")}
    assert err["Q8_0"] < 0.01 < err["Q5_1"] < err["Q5_0"] < err["Q4_1"] < err["Q4_0"] < 0.12


def test_k_quants_are_read_only_and_bad_widths_are_refused():
    with pytest.raises(ValueError, match="K-quants are read-only"):
        ggml.quantize(torch.randn(2, 256), "Q4_K")
    with pytest.raises(ValueError, match="not a multiple of 32"):
        ggml.quantize(torch.randn(2, 48), "Q8_0")
    with pytest.raises(ValueError, match="needs 68 bytes"):
        ggml.dequantize(torch.zeros(60, dtype=torch.uint8), "Q8_0", (2, 32))
    with pytest.raises(ValueError, match="unsupported GGML type 'Q2_K'"):
        ggml.row_bytes("Q2_K", 256)
