"""Storage dtype vs compute dtype: which dtype a matmul, convolution or attention should run in on this machine.

Weights are *stored* in the dtype they were loaded in (bf16 halves memory, and memory is why people load
FLUX in bf16). They are *computed* in the dtype the hardware is fast at:

* CPUs with bf16 units (the `avx512_bf16` or `amx_bf16` flags, and torch/oneDNN allowed to use them):
  bf16 weights compute in bf16, two to three times faster than float32;
* CPUs without them (AVX2-only: consumer AMD before Zen 4, Intel client chips, many cloud instances):
  a bf16 matmul falls back to a scalar kernel about 40x slower than float32, and fp16 is slow everywhere
  here. Such weights stay bf16/fp16 in memory, and every Linear, Conv and Embedding upcasts its weight to
  float32 per call (`use_compute_dtype`), as `QuantLinear` dequantizes per call; activations and attention
  then run in float32. `bench/speed.py` measures the result against float32 weights and against diffusers.

The probe honours the settings that make torch behave as on an AVX2 CPU, so the AVX2 path can be tested
on an AVX-512 machine: `ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN, which runs torch's bf16 matmuls and convolutions,
then has no bf16 kernels: `fluxion info --system` under it measures the rates) and `ATEN_CPU_CAPABILITY=avx2`
(torch's own vectorized kernels). `FLUXION_COMPUTE_DTYPE=float32|bfloat16|auto` overrides the choice, as does
the pipelines' `compute_dtype=` argument. `fluxion info --system` prints the choice and why.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

ENV = "FLUXION_COMPUTE_DTYPE"
NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
LOW_PRECISION = (torch.bfloat16, torch.float16)
# oneDNN ISA caps in increasing order; bf16 dot products start at AVX512_CORE_BF16
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
               "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16")


@dataclass(frozen=True)
class CPUInfo:
    """What the CPU offers and what torch is allowed to use of it."""

    model: str
    flags: frozenset[str] = field(repr=False)
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): honours ATEN_CPU_CAPABILITY
    onednn_max_isa: str | None  # ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA), if set

    @property
    def bf16_units(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def fp16_units(self) -> bool:
        return bool({"avx512_fp16", "amx_fp16"} & self.flags)

    def _onednn_allows(self, isa: str) -> bool:
        cap = (self.onednn_max_isa or "ALL").upper()
        if cap in ("ALL", "DEFAULT", ""):
            return True
        return cap in ONEDNN_ISAS and ONEDNN_ISAS.index(cap) >= ONEDNN_ISAS.index(isa)

    @property
    def exact_int8_matmul(self) -> bool:
        """Whether torch._int_mm is exact here. It needs VNNI dot products: without them oneDNN falls back to
        pairwise u8*s8 products summed in saturating int16 (measured: errors of 6e4 on random int8 inputs on a
        Zen 4 capped at AVX2). A CPU with AVX2 and no VNNI at all was exact under torch 2.13
        (tests/test_compute.py), so on such CPUs this answer is on the safe side rather than measured."""
        if not self.torch_capability.upper().startswith(("AVX512", "AVX2")):
            return False
        return ("avx512_vnni" in self.flags and self._onednn_allows("AVX512_CORE_VNNI")) or (
            "avx_vnni" in self.flags and self._onednn_allows("AVX2_VNNI"))

    def fast(self, dtype: torch.dtype) -> tuple[bool, str]:
        """(whether matmuls in `dtype` are fast here, why)."""
        if dtype not in LOW_PRECISION:
            return True, f"{_name(dtype)} runs at full speed everywhere"
        units, isa = (self.bf16_units, "AVX512_CORE_BF16") if dtype == torch.bfloat16 else (self.fp16_units,
                                                                                            "AVX512_CORE_FP16")
        flags = "avx512_bf16/amx_bf16" if dtype == torch.bfloat16 else "avx512_fp16/amx_fp16"
        if not units:
            return False, f"this CPU has no {_name(dtype)} units (no {flags} flag)"
        if not self.torch_capability.upper().startswith("AVX512"):
            return False, f"torch runs at CPU capability {self.torch_capability} (ATEN_CPU_CAPABILITY)"
        if not self._onednn_allows(isa):
            return False, f"oneDNN is capped at {self.onednn_max_isa} (ONEDNN_MAX_CPU_ISA), below {isa}"
        return True, f"this CPU has {_name(dtype)} units ({' '.join(sorted({*flags.split('/')} & self.flags))})"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _cpu_flags() -> tuple[str, frozenset[str]]:
    model, flags = "unknown", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
    except OSError:  # not Linux: torch's capability string is all we know
        pass
    return model, flags


@functools.lru_cache(maxsize=None)
def _cpu_info(aten: str | None, onednn: str | None) -> CPUInfo:
    model, flags = _cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    if aten:  # torch reads ATEN_CPU_CAPABILITY once at start-up; a later change is honoured here too
        capability = aten.upper() if aten.lower() != "default" else "DEFAULT"
    return CPUInfo(model, flags, capability, onednn)


def cpu_info() -> CPUInfo:
    """This machine's CPU (cached per environment setting)."""
    return _cpu_info(os.environ.get("ATEN_CPU_CAPABILITY"),
                     os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"))


def fast_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(whether `dtype` matmuls are fast on `device`, why). Accelerators are taken to be fast in bf16/fp16."""
    if torch.device(device).type != "cpu":
        return True, f"{torch.device(device).type} computes {_name(dtype)} natively"
    return cpu_info().fast(dtype)


@dataclass(frozen=True)
class DtypePlan:
    storage: torch.dtype
    compute: torch.dtype
    reason: str

    @property
    def upcasts(self) -> bool:
        return self.storage != self.compute

    def describe(self) -> str:
        if not self.upcasts:
            return f"{_name(self.storage)} weights compute in {_name(self.compute)}: {self.reason}"
        return (f"{_name(self.storage)} weights stay {_name(self.storage)} in memory and compute in "
                f"{_name(self.compute)}: {self.reason}")


def parse_dtype(value: str | torch.dtype | None, what: str = "compute_dtype") -> torch.dtype | None:
    """None / "auto" -> None; "float32" / "bf16" / a torch dtype -> that dtype; anything else: ValueError."""
    if value is None or isinstance(value, torch.dtype) and value in (torch.float32, torch.bfloat16):
        return value
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if isinstance(value, str) and value.strip().lower() in NAMES:
        return NAMES[value.strip().lower()]
    raise ValueError(f"{what} must be 'auto', 'float32' or 'bfloat16' (or torch.float32 / torch.bfloat16), "
                     f"got {value!r}")


def plan(storage: torch.dtype, device: torch.device | str = "cpu",
         override: str | torch.dtype | None = None) -> DtypePlan:
    """The compute dtype for weights stored in `storage` on `device`.

    `override` (a pipeline's `compute_dtype=`), else $FLUXION_COMPUTE_DTYPE, else the machine decides: low
    precision weights compute in their own dtype where it is fast and in float32 where it is not.
    """
    forced = parse_dtype(override)
    if forced is not None:
        return DtypePlan(storage, forced, "chosen by the caller (compute_dtype=)")
    forced = parse_dtype(os.environ.get(ENV) or None, what=f"${ENV}")
    if forced is not None:
        return DtypePlan(storage, forced, f"chosen by ${ENV}")
    if storage not in LOW_PRECISION:
        return DtypePlan(storage, storage, "full precision")
    fast, why = fast_dtype(storage, device)
    return DtypePlan(storage, storage if fast else torch.float32, why)


_logged: set[tuple] = set()


def log_once(p: DtypePlan) -> None:
    key = (p.storage, p.compute, p.reason)
    if key not in _logged:
        _logged.add(key)
        log.info("compute dtype: %s", p.describe())


@functools.lru_cache(maxsize=None)
def matmul_gflops(dtype: torch.dtype, n: int = 256, seconds: float = 0.05) -> float:
    """Measured n x n matmul rate in `dtype` at the current thread count, GFLOP/s (takes `seconds`)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / elapsed / 1e9


# ---------------------------------------------------------------- layers that upcast per call


#: Models whose upcast weights fit in this many bytes keep them (a small model's per-call conversions cost up to
#: ~15% of its step: fluxion-mini's 21 MB; `bench/speed.py --sections dtypes`); larger ones convert per call.
UPCAST_CACHE_BYTES = 64 << 20


def _upcast_weight(module: nn.Module) -> Tensor:
    """`module.weight` in its compute dtype: converted per call, or kept while the weight is unchanged (small
    models; the kept copy follows in-place edits such as fused LoRA through the tensor's version counter)."""
    w, cd = module.weight, module.compute_dtype
    if not module.keep_upcast or (w.requires_grad and torch.is_grad_enabled()):
        return w.to(cd)
    kept = module.__dict__.get("_upcast")
    if kept is not None and kept[0] is w and kept[1] == w._version and kept[2].dtype == cd:
        return kept[2]
    upcast = w.detach().to(cd)
    module.__dict__["_upcast"] = (w, w._version, upcast)
    return upcast


class UpcastLinear(nn.Linear):
    """nn.Linear whose weight is stored in a low-precision dtype and computes in `compute_dtype`."""

    compute_dtype: torch.dtype = torch.float32
    keep_upcast: bool = False

    def forward(self, x: Tensor) -> Tensor:
        cd = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(cd)
        return F.linear(x.to(cd), _upcast_weight(self), bias)


class UpcastConv2d(nn.Conv2d):
    compute_dtype: torch.dtype = torch.float32
    keep_upcast: bool = False

    def forward(self, x: Tensor) -> Tensor:
        cd = self.compute_dtype
        return self._conv_forward(x.to(cd), _upcast_weight(self), None if self.bias is None else self.bias.to(cd))


class UpcastEmbedding(nn.Embedding):
    compute_dtype: torch.dtype = torch.float32
    keep_upcast: bool = False

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids).to(self.compute_dtype)  # only the looked-up rows are converted


UPCAST = {nn.Linear: UpcastLinear, nn.Conv2d: UpcastConv2d, nn.Embedding: UpcastEmbedding}
PLAIN = {v: k for k, v in UPCAST.items()}


def use_compute_dtype(model: nn.Module, compute: torch.dtype) -> nn.Module:
    """Make `model` compute in `compute` whatever its weights' storage dtype (in place; returns the model).

    Linear, Conv2d and Embedding layers whose weight is in another dtype upcast it per call (their class
    becomes an `Upcast*` subclass: parameters, names and state dict are unchanged; a model whose upcast
    weights fit UPCAST_CACHE_BYTES keeps them instead); one-dimensional
    parameters and floating buffers (norm scales, biases: a few KB) are converted once, so norms see the
    compute dtype too. Quantized layers dequantize into the input's dtype already. Layers already in
    `compute` go back to their plain class, so calling this again with the storage dtype undoes it.
    """
    upcast_bytes = sum(m.weight.numel() for m in model.modules() if PLAIN.get(type(m), type(m)) in UPCAST
                       and m.weight.dtype != compute) * torch.empty((), dtype=compute).element_size()
    for module in model.modules():
        kind = PLAIN.get(type(module), type(module))
        module.__dict__.pop("_upcast", None)
        if kind in UPCAST:
            weight = module.weight
            if weight.dtype != compute and weight.is_floating_point():
                module.__class__ = UPCAST[kind]
                module.compute_dtype = compute
                module.keep_upcast = kind is not nn.Embedding and upcast_bytes <= UPCAST_CACHE_BYTES
            else:
                module.__class__ = kind
        for p in module.parameters(recurse=False):
            if p.ndim <= 1 and p.is_floating_point() and p.dtype != compute:
                p.data = p.data.to(compute)
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and b.ndim <= 1 and b.numel() and b.dtype != compute:
                setattr(module, name, b.to(compute))
    model._fluxion_compute_dtype = compute
    return model


def storage_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `model`'s matrices are stored in: its first floating weight of two or more dimensions (quantized
    layers report the dtype they dequantize into), else its first floating parameter, else float32."""
    for module in model.modules():
        if hasattr(module, "qdata") and hasattr(module, "_dtype_probe"):  # QuantLinear / QuantEmbedding
            return module.dtype
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.ndim >= 2:
                return p.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def compute_dtype_of(model: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype `model`'s activations run in: as set by `use_compute_dtype`, else `default` (its weights')."""
    return getattr(model, "_fluxion_compute_dtype", None) or default


# ---------------------------------------------------------------- training: bf16 autocast


_warned_autocast: set[str] = set()


def resolve_bf16_autocast(setting: bool | str, device: torch.device | str = "cpu") -> bool:
    """Whether training runs under bf16 autocast: "auto" (the default) where bf16 is fast (CUDA, CPUs with bf16
    units); True / False force it. True on a CPU without bf16 units warns once, with the measured rates."""
    if isinstance(setting, str):
        key = setting.strip().lower()
        if key == "auto":
            return fast_dtype(torch.bfloat16, device)[0]
        if key in ("true", "bf16", "yes", "on"):
            setting = True
        elif key in ("false", "no", "off", "fp32", "float32"):
            setting = False
        else:
            raise ValueError(f"bf16 must be 'auto', true or false, got {setting!r}")
    if not isinstance(setting, bool):
        raise ValueError(f"bf16 must be 'auto', true or false, got {setting!r}")
    fast, why = fast_dtype(torch.bfloat16, device)
    if setting and not fast and why not in _warned_autocast:
        _warned_autocast.add(why)
        log.warning("bf16 autocast was asked for, but %s: here a bf16 matmul runs at %.1f GFLOP/s against %.1f in "
                    "float32; 'auto' would train in float32", why, matmul_gflops(torch.bfloat16),
                    matmul_gflops(torch.float32))
    return setting


def system_report(measure: bool = True) -> str:
    """What `fluxion info --system` prints: the CPU, what torch may use of it, and the dtype plan."""
    info = cpu_info()
    lines = [
        f"CPU: {info.model}",
        f"  torch {torch.__version__}, CPU capability {info.torch_capability}, "
        f"oneDNN ISA cap {info.onednn_max_isa or 'none'}, {torch.get_num_threads()} threads",
        "  flags: " + (" ".join(sorted(f for f in info.flags if f.startswith(("avx", "amx", "fma", "f16c"))))
                       or "(none read)"),
    ]
    for storage in (torch.bfloat16, torch.float16):
        lines.append(f"  {plan(storage).describe()}")
    if os.environ.get(ENV):
        lines.append(f"  ${ENV}={os.environ[ENV]}")
    if measure:
        rates = {d: matmul_gflops(d) for d in (torch.float32, torch.bfloat16, torch.float16)}
        lines.append("  measured 256x256 matmul: " + ", ".join(f"{_name(d)} {r:.1f} GFLOP/s" for d, r in rates.items()))
    lines.append(f"  training bf16 autocast ('auto'): {'on' if resolve_bf16_autocast('auto') else 'off'}")
    return "\n".join(lines)
