"""fluxion vs diffusers on the same weights, in one run: per-step and per-image time, batches, peak RSS.

    .venv/bin/python bench/speed.py                      # all sections, 2 threads
    .venv/bin/python bench/speed.py --sections mini,real --threads 2

Sections:
  mini   fluxion-mini at 128x128 (its defaults: 28 steps, true CFG 3): per image at batch 1, 4, 16;
         per step; peak RSS of a fresh process that loads the model and makes one image.
  real   the FLUX.1-dev layer widths (3072 wide, 24 heads) with 2 double + 2 single blocks, random bf16
         weights, 512x512 (1024 image + 512 text tokens): one transformer step each, and the floor that
         this machine's measured bf16 matmul rate allows.
  cache  fluxion-mini at 28 steps: fbcache thresholds against uncached (s/image, speed-up, PSNR, steps run).
  dtypes fluxion-mini at batch 1 with torch_dtype bf16 and float32, fluxion and diffusers, alternating: what
         bf16 weights cost on this CPU (on one without bf16 units fluxion computes them in float32; see
         fluxion.compute). Run it on an AVX2-only CPU, or as one with
         `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python bench/speed.py --sections dtypes`.
Writes the tables to bench/out/speed.md. diffusers is the peer only here; fluxion never imports it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fluxion import FluxPipeline
from fluxion.eval.prompts import eval_set
from fluxion.eval.speed import (
    bf16_matmul_rate, flux_step_flops, markdown_table, median_seconds, peak_rss_mib, psnr, step_seconds,
)
from fluxion.model.transformer import FluxConfig, FluxTransformer

MINI = "models/fluxion-mini"
MINI_CALL = dict(height=128, width=128, num_inference_steps=28, true_cfg_scale=3.0, negative_prompt="",
                 max_sequence_length=20, guidance_scale=0.0)  # fluxion-mini's defaults, spelled out for diffusers
OUT = Path("bench/out")


def load(kind: str, dtype):
    if kind == "fluxion":
        pipe = FluxPipeline.from_pretrained(MINI, torch_dtype=dtype)
    else:
        import diffusers

        pipe = diffusers.FluxPipeline.from_pretrained(MINI, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_image(pipe, prompt="a red circle on a white background", seed=0, **extra):
    return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **{**MINI_CALL, **extra}).images[0]


def float_image(pipe, prompt, seed, **extra) -> np.ndarray:
    return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                **{**MINI_CALL, **extra}).images[0]


def child_rss(kind: str, dtype: str, threads: int) -> float:
    """Peak RSS (MiB) of a fresh process that imports, loads fluxion-mini and makes one image."""
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--dtype", dtype, "--threads", str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def section_mini(threads: int, repeats: int) -> str:
    rows = []
    prompts = [it.prompt for it in eval_set()[:16]]
    for dtype in (torch.bfloat16, torch.float32):
        pipes = {k: load(k, dtype) for k in ("fluxion", "diffusers")}
        name = str(dtype).replace("torch.", "")
        for batch in (1, 4, 16):
            t = {}
            for k, pipe in pipes.items():  # same prompts, same seeds, same settings
                gens = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
                call = lambda: pipe(prompts[:batch], generator=gens, **MINI_CALL)  # noqa: E731
                t[k] = median_seconds(call, repeats if batch < 16 else max(1, repeats // 2)) / batch
            rows.append([name, batch, f"{1000 * t['fluxion']:.1f}", f"{1000 * t['diffusers']:.1f}",
                         f"{1 / t['fluxion']:.1f}", f"{1 / t['diffusers']:.1f}",
                         f"**{t['diffusers'] / t['fluxion']:.2f}×**"])
        steps = {k: step_seconds(p, "a red circle", generator=torch.Generator("cpu").manual_seed(0), **MINI_CALL)
                 for k, p in pipes.items()}
        rows.append([name, "per step", f"{1000 * steps['fluxion']:.2f}", f"{1000 * steps['diffusers']:.2f}", "", "",
                     f"{steps['diffusers'] / steps['fluxion']:.2f}×"])
    rss = {k: child_rss(k, "bfloat16", threads) for k in ("fluxion", "diffusers")}
    rows.append(["bfloat16", "peak RSS MiB", f"{rss['fluxion']:.0f}", f"{rss['diffusers']:.0f}", "", "",
                 f"{rss['fluxion'] / rss['diffusers']:.2f} (fluxion/diffusers)"])
    header = ["dtype", "batch", "fluxion ms/image", "diffusers ms/image", "fluxion img/s", "diffusers img/s",
              "speed-up"]
    return "### fluxion-mini, 128×128, 28 steps, true CFG 3 (end to end: text, sampling, decode)\n\n" + \
        markdown_table(header, rows)


def section_dtypes(repeats: int) -> str:
    from fluxion import compute

    info = compute.cpu_info()
    pipes = {(k, d): load(k, d) for k in ("fluxion", "diffusers") for d in (torch.bfloat16, torch.float32)}
    seconds = {key: [] for key in pipes}
    for key, pipe in pipes.items():
        one_image(pipe)  # warm-up
    for _ in range(repeats):  # alternate, so drift in machine load hits every row alike
        for key, pipe in pipes.items():
            t0 = time.perf_counter()
            one_image(pipe)
            seconds[key].append(time.perf_counter() - t0)
    t = {key: float(np.median(v)) for key, v in seconds.items()}
    f_bf16, f_f32 = t[("fluxion", torch.bfloat16)], t[("fluxion", torch.float32)]
    d_bf16, d_f32 = t[("diffusers", torch.bfloat16)], t[("diffusers", torch.float32)]
    plan = compute.plan(torch.bfloat16)
    rows = [["fluxion", f"{1000 * f_bf16:.1f}", f"{1000 * f_f32:.1f}", f"**{f_bf16 / f_f32:.2f}**", "1.00"],
            ["diffusers", f"{1000 * d_bf16:.1f}", f"{1000 * d_f32:.1f}", f"{d_bf16 / d_f32:.2f}",
             f"**{d_bf16 / f_bf16:.1f}×** slower"]]
    return (f"### torch_dtype bf16 vs float32, fluxion-mini 128×128, batch 1, 28 steps, true CFG 3\n\n"
            f"CPU: {info.model}, torch capability {info.torch_capability}, oneDNN cap "
            f"{info.onednn_max_isa or 'none'}; fluxion: {plan.describe()}. Median of {repeats}.\n\n"
            + markdown_table(["", "bf16 ms/image", "float32 ms/image", "bf16 / float32", "bf16 vs fluxion bf16"],
                             rows))


def real_width_models(depth=2, single=2):
    from diffusers import FluxTransformer2DModel

    from fluxion.checkpoints.diffusers import transformer_diffusers_config, transformer_to_diffusers

    config = FluxConfig(depth=depth, depth_single_blocks=single, guidance_embed=True)
    torch.manual_seed(0)
    with torch.device("meta"):
        ours = FluxTransformer(config)
    ours = ours.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    d_config = {k: v for k, v in transformer_diffusers_config(config).items() if not k.startswith("_")}
    with torch.device("meta"):
        theirs = FluxTransformer2DModel(**d_config)
    theirs.load_state_dict(transformer_to_diffusers(ours.state_dict(), config), assign=True)
    return config, ours.eval(), theirs.to(torch.bfloat16).eval()


def section_real(repeats: int, compile_too: bool = True) -> str:
    from fluxion.flow import image_ids, text_ids

    config, ours, theirs = real_width_models()
    n_img, n_txt = 1024, 512  # 512x512 -> 64x64 latent -> 32x32 packed tokens
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, n_img, 64, generator=g).bfloat16()
    txt = torch.randn(1, n_txt, 4096, generator=g).bfloat16()
    y = torch.randn(1, 768, generator=g).bfloat16()
    t, guidance = torch.tensor([0.75]), torch.tensor([3.5])  # exact in bf16, as diffusers rounds them
    img_ids, txt_ids = image_ids(64, 64), text_ids(n_txt)
    with torch.no_grad():
        f_ours = lambda: ours(img, img_ids, txt, txt_ids, t, y, guidance)  # noqa: E731
        f_theirs = lambda: theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y,  # noqa: E731
                                  timestep=t, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                                  return_dict=False)[0]
        diff = (f_ours().float() - f_theirs().float()).abs().max().item()
        s_ours, s_theirs = [], []
        for _ in range(repeats):  # alternate, so drift in machine load hits both alike
            s_ours.append(median_seconds(f_ours, 1, 0))
            s_theirs.append(median_seconds(f_theirs, 1, 0))
        compiled = None
        if compile_too:
            ours.compile_repeated_blocks()
            t0 = time.perf_counter()
            f_ours()
            compile_s = time.perf_counter() - t0
            s_compiled = []
            for _ in range(repeats):
                s_compiled.append(median_seconds(f_ours, 1, 0))
                s_theirs.append(median_seconds(f_theirs, 1, 0))
            compiled = float(np.median(s_compiled))
    rate = bf16_matmul_rate()
    flops = flux_step_flops(config, n_img, n_txt)
    floor = flops / rate
    so, st = float(np.median(s_ours)), float(np.median(s_theirs))
    rows = [["fluxion", f"{so:.2f}", f"**{so / st:.2f}**", f"**{so / floor:.2f}**"],
            ["diffusers", f"{st:.2f}", "1.00", f"{st / floor:.2f}"]]
    if compiled:
        rows.insert(1, [f"fluxion, compile_repeated_blocks() (compile {compile_s:.0f} s, once)", f"{compiled:.2f}",
                        f"{compiled / st:.2f}", f"{compiled / floor:.2f}"])
    return ("### Real FLUX.1 widths (3072, 24 heads), 2 double + 2 single blocks, bf16, 512×512, batch 1\n\n"
            + markdown_table(["", "s/step", "× diffusers", "× floor"], rows)
            + f"\n\nFloor: {flops / 1e12:.2f} TFLOP per step ÷ measured bf16 matmul rate {rate / 1e9:.0f} GFLOP/s "
              f"= {floor:.2f} s. Max |fluxion − diffusers| on the output: {diff:.3g} (bf16).")


def section_cache(thresholds, n_prompts: int) -> str:
    pipe = load("fluxion", torch.bfloat16)
    items = eval_set()[:: max(1, len(eval_set()) // n_prompts)][:n_prompts]
    call = dict(num_inference_steps=28)

    def run(threshold):
        extra = dict(call, cache="fbcache", cache_threshold=threshold) if threshold else call
        images, seconds, ran = [], [], []
        for it in items:
            t0 = time.perf_counter()
            out = pipe(it.prompt, generator=torch.Generator("cpu").manual_seed(it.seed), output_type="np",
                       **{**MINI_CALL, **extra})
            images.append(out.images[0])
            seconds.append(time.perf_counter() - t0)
            stats = out.cache_stats
            ran.append(stats["steps"] - stats["skipped"])
        return images, float(np.median(seconds)), float(np.mean(ran))

    one_image(pipe)  # warm-up
    base, base_s, _ = run(0.0)
    rows = [["none", f"{1000 * base_s:.1f}", "1.00×", "28", "inf"]]
    for th in thresholds:
        images, s, ran = run(th)
        rows.append([f"fbcache {th:g}", f"{1000 * s:.1f}", f"**{base_s / s:.2f}×**", f"{ran:.1f}",
                     f"{np.mean([psnr(a, b, peak=1.0) for a, b in zip(images, base)]):.1f}"])
    return (f"### Step caching, fluxion-mini 128×128, 28 steps, true CFG 3, {len(items)} eval prompts and seeds\n\n"
            + markdown_table(["cache", "ms/image", "speed-up", "full steps run (of 28)", "PSNR vs uncached dB"], rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="mini,real,cache")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--thresholds", default="0.1,0.15,0.2,0.3")
    ap.add_argument("--cache-prompts", type=int, default=24)
    ap.add_argument("--child", choices=["fluxion", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        one_image(load(args.child, getattr(torch, args.dtype)))
        print(json.dumps({"peak_rss_mib": peak_rss_mib()}))
        return
    parts = [f"`bench/speed.py --sections {args.sections} --threads {args.threads}` on "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"]
    for section in args.sections.split(","):
        t0 = time.time()
        if section == "mini":
            parts.append(section_mini(args.threads, args.repeats))
        elif section == "real":
            parts.append(section_real(max(3, args.repeats // 2)))
        elif section == "dtypes":
            parts.append(section_dtypes(max(3, args.repeats)))
        elif section == "cache":
            parts.append(section_cache([float(x) for x in args.thresholds.split(",")], args.cache_prompts))
        else:
            raise SystemExit(f"unknown section {section!r}; known: mini, real, cache, dtypes")
        print(parts[-1], f"\n({time.time() - t0:.0f} s)\n", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "speed.md").write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
