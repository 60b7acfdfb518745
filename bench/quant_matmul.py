"""Quantized Linear kernels at FLUX.1's real widths against the matmul floor, in the compute dtype this CPU uses.

    .venv/bin/python bench/quant_matmul.py --threads 1                   # this CPU as it is
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python bench/quant_matmul.py --threads 1
                                                                         # as on an AVX2-only CPU (float32 compute)

For each weight type and layer shape (3072->12288 and 12288->3072, the MLP layers that hold most of FLUX's
weights; 1280 tokens = a 512x512 image and 256 text tokens) it times, in one process, alternating:

* floor: F.linear with the weight already in the compute dtype (what an unquantized model costs);
* full: dequantize the whole weight, then one matmul (fluxion before this bench);
* chunked: dequantize `--chunk` output rows at a time into a reused buffer and multiply each slice
  (the dequantized tile stays in cache, and memory never holds the whole float weight);
* int4pack (Q4_0, Q4_1): torch's CPU 4-bit kernel `_weight_int4pack_mm_for_cpu`, the GGML blocks repacked
  once at load (w = (q - 8) * scale + zero per 32-value group, exact for both types);
* int8pack (int8): torch's `_weight_int8pack_mm` (int8 weight, one scale per output row).

and the relative error of each against the float32 product of the dequantized weight. Prints a markdown table;
`fluxion.quant.linear`'s docstring states the decision it supports.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fluxion import compute
from fluxion.eval.speed import median_seconds
from fluxion.quant import QuantLinear
from fluxion.quant import ggml, kernels

# ---------------------------------------------------------------- torch's packed CPU kernels, measured here and
# rejected (see fluxion.quant.linear)


@dataclass
class PackedWeight:
    """A weight repacked for one of torch's CPU kernels, with the dtype its scales were made for."""

    kind: str  # "int4" | "int8"
    data: Tensor
    scales: Tensor  # int4: [in/32, out, 2] scale and zero, in `dtype`; int8: [out] in `dtype`
    dtype: torch.dtype
    out_features: int
    group: int = 32


INT4_TYPES = ("Q4_0", "Q4_1")


def pack(qdata: Tensor, qtype: str, scale: Tensor | None, in_features: int, out_features: int,
         dtype: torch.dtype = torch.float32) -> PackedWeight | None:
    """Repack a QuantLinear's storage for torch's kernel, or None where no kernel maps exactly onto the type."""
    if qtype in INT4_TYPES:
        blocks = qdata.reshape(-1, ggml.TYPES[qtype][1])
        body = 2 if qtype == "Q4_0" else 4
        q = ggml._nibbles(blocks[:, body:]).to(torch.int32).reshape(out_features, in_features)
        d = ggml._f16(blocks[:, :2]).reshape(out_features, -1)
        zero = torch.zeros_like(d) if qtype == "Q4_0" else ggml._f16(blocks[:, 2:4]).reshape(out_features, -1) + 8 * d
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        sz = torch.stack([d.t(), zero.t()], dim=-1).to(dtype).contiguous()
        return PackedWeight("int4", packed, sz, dtype, out_features)
    if qtype == "int8":
        return PackedWeight("int8", qdata, scale.to(dtype), dtype, out_features)
    return None


def packed_linear(x: Tensor, packed: PackedWeight, bias: Tensor | None) -> Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if flat.dtype != packed.dtype:
        flat = flat.to(packed.dtype)
    if packed.kind == "int4":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed.data, packed.group, packed.scales)
    else:
        y = torch.ops.aten._weight_int8pack_mm(flat, packed.data, packed.scales)
    y = y.to(x.dtype)
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], packed.out_features)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=1280)
    p.add_argument("--types", default="q8_0,q4_0,q4_1,int8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=kernels.CHUNK_ROWS)
    p.add_argument("--skip-kernels", action="store_true", help="leave out torch's packed kernels (slow in float32)")
    p.add_argument("--shapes", default="3072x12288,12288x3072", help="in x out, comma-separated")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cd = compute.plan(torch.bfloat16).compute
    info = compute.cpu_info()
    print(f"CPU: {info.model}; torch capability {info.torch_capability}, oneDNN cap {info.onednn_max_isa or 'none'}; "
          f"bf16 weights compute in {cd}; {args.threads} thread(s), {args.tokens} tokens\n")
    print("| type | in -> out | floor s | full s | chunked s | torch kernel s | best / floor | kernel rel. error |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        n_in, n_out = (int(v) for v in shape.split("x"))
        w = torch.randn(n_out, n_in, generator=g) * 0.02
        x = torch.randn(args.tokens, n_in, generator=g).to(cd)
        for qtype in args.types.split(","):
            layer = QuantLinear.quantize(w.bfloat16(), None, qtype).to(cd)
            wd = layer.dequantized_weight(torch.float32)
            ref = x.float() @ wd.t()
            floor_w = wd.to(cd)
            floor = median_seconds(lambda: F.linear(x, floor_w), args.repeats)
            del floor_w
            full = median_seconds(lambda: F.linear(x, layer.dequantized_weight(cd)), args.repeats)
            chunked = median_seconds(lambda: kernels.chunked_linear(x, layer.qdata, layer.qtype, layer.scale,
                                                           layer.out_features, None, args.chunk), args.repeats)
            packed = None if args.skip_kernels else pack(layer.qdata, layer.qtype, layer.scale, layer.in_features, layer.out_features, cd)
            kernel_s, err = float("nan"), float("nan")
            if packed is not None:
                kernel_s = median_seconds(lambda: packed_linear(x, packed, None), args.repeats)
                y = packed_linear(x, packed, None).float()
                err = ((y - ref).norm() / ref.norm()).item()
            best = min(v for v in (full, chunked, kernel_s) if v == v)
            print(f"| {qtype} | {n_in} -> {n_out} | {floor:.3f} | {full:.3f} | {chunked:.3f} | "
                  f"{'-' if kernel_s != kernel_s else f'{kernel_s:.3f}'} | {best / floor:.2f} | "
                  f"{'-' if err != err else f'{err:.1e}'} |", flush=True)


if __name__ == "__main__":
    main()
