"""fluxion.compute: the CPU probe and its overrides, the dtype plan, float32 compute over bf16 storage."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from fluxion import compute
from fluxion.compute import CPUInfo, UpcastConv2d, UpcastEmbedding, UpcastLinear, plan, use_compute_dtype

AVX512_BF16 = CPUInfo("fake Zen 4", frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}), "AVX512", None)
AVX2_ONLY = CPUInfo("fake Zen 3", frozenset({"avx2", "fma"}), "AVX2", None)


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to run on a given CPU: cpu(AVX2_ONLY)."""
    monkeypatch.delenv(compute.ENV, raising=False)

    def use(info: CPUInfo):
        monkeypatch.setattr(compute, "cpu_info", lambda: info)

    return use


def test_probe_follows_the_environment_overrides(monkeypatch):
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    native = compute.cpu_info()
    assert native.fast(torch.bfloat16)[0] == (native.bf16_units and native.torch_capability.startswith("AVX512"))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert compute.cpu_info().onednn_max_isa == "AVX2" and not compute.cpu_info().fast(torch.bfloat16)[0]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert compute.cpu_info().torch_capability == "AVX2" and not compute.cpu_info().fast(torch.bfloat16)[0]
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert not compute.cpu_info().fast(torch.bfloat16)[0]
    assert not compute.cpu_info().exact_int8_matmul
    # each gate on its own, on a CPU that has the units
    fast, why = AVX512_BF16.fast(torch.bfloat16)
    assert fast and "avx512_bf16" in why
    capped = CPUInfo("x", AVX512_BF16.flags, "AVX512", "AVX2")
    assert not capped.fast(torch.bfloat16)[0] and "ONEDNN_MAX_CPU_ISA" in capped.fast(torch.bfloat16)[1]
    assert not capped.exact_int8_matmul and AVX512_BF16.exact_int8_matmul
    assert CPUInfo("x", AVX512_BF16.flags, "AVX512", "AVX512_CORE_BF16").fast(torch.bfloat16)[0]
    aten = CPUInfo("x", AVX512_BF16.flags, "AVX2", None)
    assert not aten.fast(torch.bfloat16)[0] and "ATEN_CPU_CAPABILITY" in aten.fast(torch.bfloat16)[1]
    fast, why = AVX2_ONLY.fast(torch.bfloat16)
    assert not fast and "no bfloat16 units" in why


def test_onednn_cap_really_makes_bf16_slow_and_int8_inexact():
    """The override the probe honours is the one that changes torch: under ONEDNN_MAX_CPU_ISA=AVX2 a bf16 matmul
    runs several times slower than float32 (~40x measured), and on a CPU with VNNI torch._int_mm loses its
    exactness. A CPU without VNNI may still be exact (a 2-core EPYC with AVX2 only was, under torch 2.13): there
    the probe must stay on the safe side and report it inexact."""
    script = textwrap.dedent("""
        import torch
        from fluxion import compute
        torch.set_num_threads(1)
        a = torch.randint(-127, 128, (64, 256), dtype=torch.int8); b = torch.randint(-127, 128, (256, 32), dtype=torch.int8)
        wrong = int((torch._int_mm(a, b).long() - a.long() @ b.long()).abs().max())
        ratio = compute.matmul_gflops(torch.float32, 256, 0.2) / compute.matmul_gflops(torch.bfloat16, 256, 0.2)
        vnni = bool({"avx512_vnni", "avx_vnni"} & compute.cpu_info().flags)
        print(ratio, wrong, compute.cpu_info().fast(torch.bfloat16)[0], compute.cpu_info().exact_int8_matmul, vnni)
    """)
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    ratio, wrong, fast, exact, vnni = out.stdout.split()
    assert float(ratio) > 5, out.stdout
    assert fast == "False" and exact == "False", out.stdout
    if vnni == "True":  # the cap is what takes the VNNI dot products away
        assert int(wrong) > 0, out.stdout


def test_plan_upcasts_low_precision_only_where_it_is_slow(cpu, monkeypatch):
    cpu(AVX2_ONLY)
    p = plan(torch.bfloat16)
    assert p.compute == torch.float32 and p.upcasts and "no bfloat16 units" in p.reason
    assert plan(torch.float16).compute == torch.float32
    assert plan(torch.float32).compute == torch.float32 and not plan(torch.float32).upcasts
    assert plan(torch.bfloat16, device="cuda").compute == torch.bfloat16  # accelerators compute bf16 natively
    cpu(AVX512_BF16)
    assert plan(torch.bfloat16).compute == torch.bfloat16 and not plan(torch.bfloat16).upcasts
    assert plan(torch.float16).compute == torch.float32  # no fp16 units on this CPU
    # forced: by argument, then by environment
    assert plan(torch.bfloat16, override="float32").compute == torch.float32
    monkeypatch.setenv(compute.ENV, "float32")
    assert plan(torch.bfloat16).compute == torch.float32 and "FLUXION_COMPUTE_DTYPE" in plan(torch.bfloat16).reason
    assert plan(torch.bfloat16, override="bf16").compute == torch.bfloat16
    monkeypatch.setenv(compute.ENV, "int4")
    with pytest.raises(ValueError, match="FLUXION_COMPUTE_DTYPE"):
        plan(torch.bfloat16)
    with pytest.raises(ValueError, match="compute_dtype must be"):
        plan(torch.bfloat16, override="half")


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.lin = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.gn = nn.GroupNorm(1, 3)

    def forward(self, ids):
        h = self.norm(self.lin(self.emb(ids)))  # [B, 4, 16]
        return self.gn(self.conv(h[:, None]))


def _randomized(seed: int) -> Mixed:
    torch.manual_seed(seed)
    m = Mixed()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    return m


def test_float32_compute_over_bf16_storage_is_the_float32_result_of_the_rounded_weights(monkeypatch):
    ids = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(1))
    stored = _randomized(0).to(torch.bfloat16)
    reference = _randomized(0).to(torch.bfloat16).float()  # the same bf16 values, held in float32
    use_compute_dtype(stored, torch.float32)
    assert isinstance(stored.lin, UpcastLinear) and isinstance(stored.conv, UpcastConv2d)
    assert isinstance(stored.emb, UpcastEmbedding)
    # the big weights stay bf16 in memory; the state dict keeps its names
    assert stored.lin.weight.dtype == stored.conv.weight.dtype == stored.emb.weight.dtype == torch.bfloat16
    assert set(stored.state_dict()) == set(reference.state_dict())
    out = stored(ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(ids), rtol=0, atol=0)
    # small models keep the upcast weights; an in-place edit (a fused LoRA) is seen at the next call
    assert stored.lin.keep_upcast and not stored.emb.keep_upcast
    with torch.no_grad():
        stored.lin.weight.mul_(2)
        reference.lin.weight.mul_(2)
    torch.testing.assert_close(stored(ids), reference(ids), rtol=0, atol=0)
    monkeypatch.setattr(compute, "UPCAST_CACHE_BYTES", 64 * 64 * 4 - 1)  # one byte short of this layer's copy
    big = use_compute_dtype(nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16), torch.float32)
    assert isinstance(big[0], UpcastLinear) and not big[0].keep_upcast
    # and back: computing in the storage dtype restores the plain layers
    use_compute_dtype(stored, torch.bfloat16)
    assert type(stored.lin) is nn.Linear and stored(ids).dtype == torch.bfloat16


def test_pipeline_on_a_cpu_without_bf16_units(cpu, tiny_dev_dir):
    """bf16 weights stay bf16, the layers compute in float32, and the images are float32's for the rounded weights."""
    from fluxion import FluxPipeline

    cpu(AVX2_ONLY)
    pipe = FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype=torch.bfloat16)
    assert {p.compute for p in pipe.compute_plans.values()} == {torch.float32}
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.transformer.compute_dtype == torch.float32
    assert isinstance(pipe.transformer.double_blocks[0].img_attn.qkv, UpcastLinear)
    assert isinstance(pipe.vae.decoder.conv_in, UpcastConv2d)
    rounded = FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype=torch.bfloat16)
    rounded.to(torch.float32)  # the bf16-rounded weights, stored as float32: plain layers again
    assert not isinstance(rounded.transformer.double_blocks[0].img_attn.qkv, UpcastLinear)

    embeds, pooled, _ = pipe.encode_prompt("a red circle")
    embeds_ref, pooled_ref, _ = rounded.encode_prompt("a red circle")
    assert embeds.dtype == pooled.dtype == torch.float32
    # T5's feed-forward rounds its hidden activations to its output weight's dtype (transformers' own cast)
    assert (embeds - embeds_ref).norm() / embeds_ref.norm() < 1e-2
    torch.testing.assert_close(pooled, pooled_ref, rtol=1e-5, atol=1e-5)  # CLIP: float32 throughout

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 64, pipe.transformer.config.in_channels, generator=gen).bfloat16().float()
    kw = dict(prompt_embeds=embeds_ref, pooled_prompt_embeds=pooled_ref, latents=latents, height=32, width=32,
              num_inference_steps=2, output_type="np")
    got, want = pipe(**kw).images, rounded(**kw).images
    assert abs(got - want).max() < 1e-5

    with pytest.raises(ValueError, match="compute_dtype must be"):
        FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype=torch.bfloat16, compute_dtype="fp8")

    cpu(AVX512_BF16)
    fast = FluxPipeline.from_pretrained(tiny_dev_dir, torch_dtype=torch.bfloat16)
    assert fast.transformer.compute_dtype == torch.bfloat16
    assert type(fast.transformer.double_blocks[0].img_attn.qkv) is nn.Linear


def test_training_autocast_is_auto_and_forcing_it_on_a_slow_cpu_warns_once(cpu, caplog):
    cpu(AVX2_ONLY)
    compute._warned_autocast.clear()
    assert compute.resolve_bf16_autocast("auto") is False
    assert compute.resolve_bf16_autocast("auto", "cuda") is True
    with caplog.at_level(logging.WARNING, logger="fluxion.compute"):
        assert compute.resolve_bf16_autocast(True) is True
        assert compute.resolve_bf16_autocast(True) is True
    warnings = [r for r in caplog.records if "bf16 autocast was asked for" in r.message]
    assert len(warnings) == 1 and "GFLOP/s" in warnings[0].message
    cpu(AVX512_BF16)
    assert compute.resolve_bf16_autocast("auto") is True
    assert compute.resolve_bf16_autocast(False) is False
    with pytest.raises(ValueError, match="bf16 must be"):
        compute.resolve_bf16_autocast("sometimes")


def test_w8a8_falls_back_to_weight_only_where_int8_matmuls_are_inexact(cpu):
    from fluxion.quant import QuantLinear

    native = compute.cpu_info()

    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    w8a8, int8 = QuantLinear.quantize(w, None, "w8a8"), QuantLinear.quantize(w, None, "int8")
    cpu(AVX2_ONLY)
    torch.testing.assert_close(w8a8(x), int8(x), rtol=0, atol=0)
    if native.exact_int8_matmul:  # the int8 kernel itself, where this CPU has it
        cpu(AVX512_BF16)
        assert not torch.equal(w8a8(x), int8(x))
