"""Speed measurement: per-step and per-image times, batch throughput, peak memory, the matmul floor.

Everything takes a diffusers-style pipeline callable, so `bench/speed.py` measures fluxion and its peers
with the same code. `fluxion bench` prints fluxion's own table (no peer needed).
"""
from __future__ import annotations

import math
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..model.transformer import FluxConfig


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status_bytes(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident set now (VmRSS)."""
    value = _status_bytes("VmRSS")
    if value is None:
        raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")
    return value


def peak_rss_bytes() -> int:
    """This process's peak resident set so far.

    VmHWM of the current address space: unlike ru_maxrss, which Linux carries over fork and exec, it does not
    report the parent's peak for a child started by a benchmark.
    """
    value = _status_bytes("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_mib() -> float:
    return peak_rss_bytes() / 2**20


def step_seconds(pipe, prompt, **call) -> float:
    """Median seconds between consecutive denoising steps of one call (diffusers' step-end callback)."""
    stamps = []

    def on_step(_pipe, i, t, tensors):
        stamps.append(time.perf_counter())
        return tensors

    pipe(prompt, callback_on_step_end=on_step, **call)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def bf16_matmul_rate(m: int = 1536, k: int = 3072, n: int = 12288, repeats: int = 3,
                     dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of one large linear layer in `dtype` on this machine."""
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    return 2 * m * k * n / median_seconds(lambda: F.linear(x, w), repeats)


def floor_matmul_rate(**kwargs) -> float:
    """The rate a FLUX step on bf16 (or quantized) weights cannot beat here: a large linear layer in the dtype
    such weights compute in on this CPU (bf16 with bf16 units, float32 without: `fluxion.compute`)."""
    from ..compute import plan

    return bf16_matmul_rate(dtype=plan(torch.bfloat16).compute, **kwargs)


def flux_step_flops(config: FluxConfig, img_tokens: int, txt_tokens: int, batch: int = 1) -> float:
    """FLOPs of one transformer call: the block linears and joint attention (embedders and norms are noise)."""
    h, mlp = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    seq = img_tokens + txt_tokens
    per_token = 2 * (3 * h * h + h * h + 2 * h * mlp)  # qkv, out proj, mlp in+out: same in both block kinds
    attention = 4 * seq * seq * h  # q @ k^T and attn @ v
    blocks = config.depth + config.depth_single_blocks
    return batch * blocks * (seq * per_token + attention)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of two images with values up to `peak` (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def images_per_second(pipe, prompts: list[str], repeats: int = 2, **call) -> float:
    """Throughput with all `prompts` in one call (one batch through the transformer)."""
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
    return len(prompts) / median_seconds(lambda: pipe(prompts, generator=gens, **call), repeats)


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def run_bench(model: str | None = None, dtype=torch.bfloat16, threads: int | None = None, repeats: int = 5,
              cache_threshold: float = 0.2, size: int | None = None) -> str:
    """`fluxion bench`: fluxion's own timings on a model (default fluxion-mini) at its default settings."""
    from ..eval.prompts import eval_set
    from ..pipelines import FluxPipeline

    if threads:
        torch.set_num_threads(threads)
    pipe = FluxPipeline.from_pretrained(model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    prompts = [it.prompt for it in eval_set()[:16]]
    if size:
        pipe.defaults.sample_size = size // pipe.vae_scale_factor
    gen = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    rows = []
    for batch in (1, 4, 16):
        ips = images_per_second(pipe, prompts[:batch], repeats=repeats if batch < 16 else max(1, repeats // 2))
        rows.append([f"batch {batch}", f"{1000 / ips:.1f}", f"{ips:.1f}"])
    steps = pipe.defaults.num_inference_steps
    for name, call in (("per step", {}), (f"per step, fbcache {cache_threshold:g}",
                                          {"cache": "fbcache", "cache_threshold": cache_threshold})):
        s = step_seconds(pipe, prompts[0], generator=gen(), **call)
        rows.append([name, f"{1000 * s:.2f}", ""])
    stats = {}
    cached = median_seconds(lambda: stats.update(pipe(prompts[0], generator=gen(), cache="fbcache",
                                                      cache_threshold=cache_threshold).cache_stats), repeats)
    rows.append([f"batch 1, fbcache {cache_threshold:g} ({stats['skipped']}/{steps} steps reused)",
                 f"{1000 * cached:.1f}", f"{1 / cached:.1f}"])
    title = (f"fluxion bench: {pipe.model_path}, {str(dtype).replace('torch.', '')}, {steps} steps, "
             f"{torch.get_num_threads()} threads; peak RSS {peak_rss_mib():.0f} MiB")
    return title + "\n\n" + markdown_table(["", "ms (per image or step)", "images/s"], rows)
