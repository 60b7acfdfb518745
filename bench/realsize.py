"""FLUX.1-schnell at real size on a small CPU machine: one 512x512 image in 4 steps, in bounded memory.

Full run (writes ~25 GB of files to the cache dir, then generates two or three times; on the 2-core, 24 GB
machine: writing ~4-5 min, each generation ~5-6 min at 1 thread / ~3-4 at 2 threads, about 15-25 minutes in
all, estimated from the smoke test; it needs up to ~14 GB of RAM):

    .venv/bin/python bench/realsize.py

Smoke test (real widths, one block of each kind, one T5 layer; ~1.8 GB of files, ~1.5 min on one core; it
also prints an estimate of the full run from its per-block timings):

    OMP_NUM_THREADS=1 .venv/bin/python bench/realsize.py --depth 1 --single 1 --t5-layers 1 --threads 1

What it builds (random weights, N(0, 0.02^2) seeded per tensor name, norm scales ~1; never a whole model in
memory: each tensor is generated on request and written, quantized, straight to disk by `write_gguf`):

* the FLUX.1-schnell transformer (19 double + 38 single blocks, hidden 3072, 24 heads, no guidance embedder,
  in_channels 64, context 4096, vec 768) as a Q8_0 and a Q4_0 GGUF file, modulation linears quantized too
  (keep=KEEP_EMBEDDERS, as the community's files: kept in bf16 they would cost 3.2 B x 2 bytes);
* the T5 v1.1 XXL encoder (4096 / 10240 / 24 layers / 64 heads, vocab 32128) as a Q8_0 GGUF in llama.cpp's
  names (`fluxion.checkpoints.t5.write_t5_gguf`); tokenizer: fluxion-mini's tokenizer_2 (a small T5-style
  tokenizer; any ids < 32128 exercise the same model, and the 256 positions are what costs);
* the CLIP-L text encoder (transformers CLIPTextModel: hidden 768, 12 layers, 12 heads, 77 positions; bf16)
  with fluxion-mini's CLIP tokenizer, and the FLUX VAE (ch 128, ch_mult 1,2,4,4, 2 res blocks, z 16; bf16).

Files go to --cache-dir (default /tmp/fluxion-realsize) and are reused when their recorded config matches.
Then, for each --types entry, a fresh subprocess loads everything as a FluxPipeline (schnell schedule),
turns on the CPU memory sequencing of `FluxPipeline.enable_model_cpu_offload` (each part's mapped pages given
back after it runs) and generates one 512x512 image in 4 steps with max_sequence_length 256. --offload auto
(default) runs that first and, when its peak RSS is over the issue's target (Q8_0 <= 14 GB, Q4_0 <= 9 GB,
decimal GB), runs again with `enable_sequential_cpu_offload` (the transformer's and T5's blocks stream
through memory); both rows are reported.

Reported per run: file sizes (transformer + T5), peak RSS of the child (VmHWM, which unlike ru_maxrss does not
carry over the parent's peak), peak RSS per phase (sampled every 20 ms), load seconds, T5 encode seconds,
seconds per step (step-end callback timestamps; the first step separately), VAE decode seconds, and the floor
flux_step_flops(config, 1024, 256) / floor_matmul_rate() (bf16, or float32 on a CPU without bf16
units) measured in the same child. Plus a table of
relative_error_vs_bf16 of each weight type on real-width layers. The markdown goes to stdout and to --out
(default bench/out/realsize.md). A run with fewer blocks than the real model also prints an estimate of the
full run (per-block times x 57, T5 layer time x 24, measured write rates x full sizes).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "models" / "fluxion-mini"
GB, GIB = 1e9, 2**30
TARGETS_GB = {"q8_0": 14.0, "q4_0": 9.0}  # the peak-RSS targets
FULL = dict(depth=19, single=38, t5_layers=24)
FORMAT = 1  # bump when the generated tensors change
PROMPT = "a red fox in fresh snow, morning light, photograph"


# ---------------------------------------------------------------- configs


def flux_config(depth: int, single: int):
    from fluxion.model.transformer import FluxConfig

    return FluxConfig(depth=depth, depth_single_blocks=single, guidance_embed=False)  # schnell, real widths


def t5_config(layers: int):
    from transformers import T5Config

    return T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=layers, num_heads=64,
                    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)


def clip_config():
    from transformers import CLIPTextConfig

    special = json.loads((MINI / "text_encoder" / "config.json").read_text())  # the mini tokenizer's ids
    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                          hidden_act="quick_gelu", bos_token_id=special["bos_token_id"],
                          eos_token_id=special["eos_token_id"], pad_token_id=special["pad_token_id"])


def flux_shapes(config) -> dict[str, tuple[int, ...]]:
    import torch

    from fluxion.model.transformer import FluxTransformer

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in FluxTransformer(config).state_dict().items()}


def t5_shapes(config) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import T5EncoderModel

    with torch.device("meta"):
        state = T5EncoderModel(config).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if k != "encoder.embed_tokens.weight"}  # tied


# ---------------------------------------------------------------- the lazy random store


class RandomStore:
    """keys / shape / dtype / get over tensors made on request: N(0, std^2), seeded by the tensor's name.

    1-D tensors named like norms are scales around 1 (a random 0.02 scale would shrink every activation).
    `dtype` (bf16) is what write_gguf keeps unquantized tensors in; values are generated in float32.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0, std: float = 0.02):
        import torch

        self.shapes, self.seed, self.std, self._dtype = shapes, seed, std, torch.bfloat16

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dtype(self, name: str):
        return self._dtype

    def get(self, name: str, dtype=None):
        import torch

        gen = torch.Generator().manual_seed((zlib.crc32(name.encode()) << 8) ^ self.seed)
        t = torch.randn(self.shapes[name], generator=gen).mul_(self.std)
        if t.ndim == 1 and "norm" in name:
            t += 1.0
        return t if dtype is None else t.to(dtype)

    def values(self) -> int:
        import math

        return sum(math.prod(s) for s in self.shapes.values())


# ---------------------------------------------------------------- files (cached)


class Cache:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def manifest(self, path: Path) -> dict | None:
        side = path.with_name(path.name + ".json")
        if not path.exists() or not side.exists():
            return None
        return json.loads(side.read_text())

    def fresh(self, path: Path, key: dict) -> dict | None:
        """The recorded manifest if `path` was written with this exact `key` (and is complete), else None."""
        m = self.manifest(path)
        if m is None or m.get("key") != key:
            return None
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        return m if m.get("bytes") == size else None

    def record(self, path: Path, key: dict, seconds: float, values: int) -> dict:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        m = {"key": key, "seconds": seconds, "values": values, "bytes": size}
        path.with_name(path.name + ".json").write_text(json.dumps(m, indent=1))
        return m


def _progress(desc: str):
    from tqdm.auto import tqdm

    return functools.partial(tqdm, desc=desc, unit="tensor", file=sys.stderr, mininterval=2.0)


def build_files(args, cache: Cache) -> dict:
    """Write (or reuse) every file; returns {name: (path, manifest)}."""
    import torch

    from fluxion.checkpoints import save_autoencoder, write_gguf
    from fluxion.checkpoints.t5 import write_t5_gguf
    from fluxion.quant import KEEP_EMBEDDERS

    fcfg, tcfg = flux_config(args.depth, args.single), t5_config(args.t5_layers)
    files: dict[str, tuple[Path, dict]] = {}

    def ensure(name: str, path: Path, key: dict, write, values: int):
        key = json.loads(json.dumps({"format": FORMAT, "seed": args.seed, **key}, sort_keys=True))  # as recorded
        m = cache.fresh(path, key)
        if m is None:
            if args.skip_write:
                raise SystemExit(f"--skip-write: {path} is missing or was written with another config")
            print(f"writing {path} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            write(path)
            m = cache.record(path, key, time.perf_counter() - t0, values)
            print(f"  {m['bytes'] / GB:.2f} GB in {m['seconds']:.0f} s", file=sys.stderr, flush=True)
        files[name] = (path, m)

    flux_store = RandomStore(flux_shapes(fcfg), seed=args.seed)
    for qtype in args.types:
        path = cache.root / f"flux1-schnell-synthetic-d{args.depth}-s{args.single}-{qtype.upper()}.gguf"
        ensure(f"transformer-{qtype}", path, {"config": fcfg.to_dict(), "qtype": qtype, "keep": list(KEEP_EMBEDDERS)},
               lambda p, q=qtype: write_gguf(flux_store, p, q.upper(), keep=KEEP_EMBEDDERS, config=fcfg.to_dict(),
                                             progress=_progress(p.name)),
               flux_store.values())
    t5_store = RandomStore(t5_shapes(tcfg), seed=args.seed)
    path = cache.root / f"t5-v1_1-xxl-synthetic-l{args.t5_layers}-Q8_0.gguf"
    ensure("t5", path, {"config": tcfg.to_dict(), "qtype": "Q8_0"},
           lambda p: write_t5_gguf(t5_store, p, "Q8_0", progress=_progress(p.name)), t5_store.values())

    def write_clip(folder: Path):
        from transformers import CLIPTextModel

        torch.manual_seed(args.seed)
        model = CLIPTextModel(clip_config()).to(torch.bfloat16)
        model.save_pretrained(str(folder))

    ccfg = clip_config()
    ensure("clip", cache.root / "clip-l", {"config": ccfg.to_dict()}, write_clip,
           sum(p.numel() for p in _meta_clip(ccfg).parameters()))

    def write_vae(path: Path):
        torch.manual_seed(args.seed)
        save_autoencoder(AutoEncoder(AutoEncoderConfig()).to(torch.bfloat16), path)

    from fluxion.model.autoencoder import AutoEncoder, AutoEncoderConfig

    with torch.device("meta"):
        vae_values = sum(p.numel() for p in AutoEncoder(AutoEncoderConfig()).parameters())
    ensure("vae", cache.root / "ae.safetensors", {"config": AutoEncoderConfig().to_dict()}, write_vae, vae_values)
    return files


def _meta_clip(config):
    import torch
    from transformers import CLIPTextModel

    with torch.device("meta"):
        return CLIPTextModel(config)


# ---------------------------------------------------------------- one generation (fresh subprocess)


class RssMonitor:
    """Peak RSS per phase, sampled from /proc/self/statm every `interval` seconds on a thread."""

    def __init__(self, interval: float = 0.02):
        self.phase, self.peaks, self.at_end, self.interval = "start", {}, {}, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        r, p = self.rss(), self.phase
        if r > self.peaks.get(p, 0):
            self.peaks[p] = r

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def enter(self, phase: str) -> None:
        self._sample()
        self.at_end[self.phase] = self.rss()
        self.phase = phase
        self._sample()

    def stop(self) -> None:
        self.enter("end")
        self._stop.set()


def child(spec: dict) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    from fluxion.checkpoints import load_autoencoder, load_transformer
    from fluxion.eval.speed import floor_matmul_rate, flux_step_flops, peak_rss_bytes
    from fluxion.model.text_encoders import CLIPEmbedder, T5Embedder
    from fluxion.pipelines import FluxPipeline
    from fluxion.png import save_png
    from fluxion.flow import SCHNELL_SCHEDULE

    mon = RssMonitor()
    rate = floor_matmul_rate()  # before loading: the floor's rate, on the same threads
    mon.enter("load")
    t0 = time.perf_counter()
    transformer = load_transformer(spec["transformer"], torch.bfloat16)
    t5 = T5Embedder.from_checkpoint(spec["t5"], MINI / "tokenizer_2", torch.bfloat16)
    clip = CLIPEmbedder.from_folders(Path(spec["clip"]), MINI / "tokenizer", torch.bfloat16)
    vae = load_autoencoder(spec["vae"], torch.bfloat16)
    pipe = FluxPipeline(transformer, vae, clip, t5, SCHNELL_SCHEDULE)
    if spec["mode"] == "sequential":
        pipe.enable_sequential_cpu_offload()
    elif spec["mode"] == "model":
        pipe.enable_model_cpu_offload()
    pipe.set_progress_bar_config(file=sys.stderr)
    load_s = time.perf_counter() - t0

    marks: dict[str, float] = {}
    blocks: dict[str, list[float]] = {"double": [], "single": [], "t5": []}

    def span(module, name):
        module.register_forward_pre_hook(lambda m, a: marks.__setitem__(f"{name}:start", time.perf_counter()))
        module.register_forward_hook(lambda m, a, o: marks.__setitem__(f"{name}:end", time.perf_counter()))

    def timed_blocks(mods, kind):
        for b in mods:
            b.register_forward_pre_hook(lambda m, a: marks.__setitem__("b", time.perf_counter()))
            b.register_forward_hook(lambda m, a, o, k=kind: blocks[k].append(time.perf_counter() - marks["b"]))

    span(clip.model, "clip")
    span(t5.model, "t5")
    timed_blocks(transformer.double_blocks, "double")
    timed_blocks(transformer.single_blocks, "single")
    timed_blocks(t5.model.encoder.block, "t5")

    def first_denoise(m, a):
        if "denoise0" not in marks:
            marks["denoise0"] = time.perf_counter()
            mon.enter("denoise")

    transformer.register_forward_pre_hook(first_denoise)
    clip.model.register_forward_pre_hook(lambda m, a: mon.enter("text"))
    decode = pipe.decode

    def timed_decode(*a, **k):
        mon.enter("decode")
        marks["decode0"] = time.perf_counter()
        out = decode(*a, **k)
        marks["decode1"] = time.perf_counter()
        return out

    pipe.decode = timed_decode
    stamps: list[float] = []

    def on_step(_pipe, i, t, tensors):
        stamps.append(time.perf_counter())
        return tensors

    t0 = time.perf_counter()
    image = pipe(PROMPT, height=512, width=512, num_inference_steps=4, max_sequence_length=256,
                 generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step).images[0]
    total_s = time.perf_counter() - t0
    mon.stop()
    save_png(image, spec["png"], {"prompt": PROMPT, "bench": "realsize", "type": spec["type"], "mode": spec["mode"]})
    steps = [b - a for a, b in zip([marks["denoise0"], *stamps], stamps)]
    arr = torch.from_numpy(np.array(image)).float()
    return {
        "type": spec["type"], "mode": spec["mode"], "threads": spec["threads"],
        "peak_rss": peak_rss_bytes(), "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "phase_peaks": mon.peaks, "phase_end_rss": mon.at_end,
        "load_s": load_s, "clip_s": marks["clip:end"] - marks["clip:start"],
        "t5_s": marks["t5:end"] - marks["t5:start"],
        "step_s": steps, "decode_s": marks["decode1"] - marks["decode0"], "total_s": total_s,
        "block_s": {k: statistics.median(v) if v else None for k, v in blocks.items()},
        "matmul_rate": rate, "step_flops": flux_step_flops(transformer.config, 1024, 256),
        "image_std": float(arr.std()), "image_finite": bool(torch.isfinite(arr).all()),
    }


def run_child(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"generation subprocess ({spec['type']}, {spec['mode']}) failed with code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the report


def error_table(threads: int) -> tuple[list[str], list[list]]:
    import torch

    from fluxion.quant import relative_error_vs_bf16

    torch.set_num_threads(threads)
    shapes = [(3072, 3072), (12288, 3072), (3072, 12288)]  # attention out, MLP in, MLP out (out, in)
    bits = {"int8": "8 + row scale", "fp8": "8 + tensor scale", "q8_0": 8.5, "q5_1": 6.0, "q5_0": 5.5, "q4_1": 5.0,
            "q4_0": 4.5}
    rows = []
    for qtype, b in bits.items():
        errs = [relative_error_vs_bf16(qtype, o, i, tokens=256) for o, i in shapes]
        rows.append([qtype, b, *[f"{100 * e:.2f}%" for e in errs]])
    header = ["type", "bits/weight", *[f"{i}→{o}" for o, i in shapes]]
    return header, rows


def gbs(n: float) -> str:
    return f"{n / GB:.2f} GB ({n / GIB:.2f} GiB)"


def report(args, files: dict, results: list[dict], errors, est: str | None) -> str:
    import torch

    from fluxion.eval.speed import markdown_table

    full = (args.depth, args.single, args.t5_layers) == (FULL["depth"], FULL["single"], FULL["t5_layers"])
    t5_bytes = files["t5"][1]["bytes"]
    rows = []
    for r in results:
        tb = files[f"transformer-{r['type']}"][1]["bytes"]
        target = TARGETS_GB[r["type"]]
        met = r["peak_rss"] / GB <= target
        mode = {"model": "full residency (model offload)", "sequential": "block streaming (sequential offload)",
                "none": "no offload"}[r["mode"]]
        floor = r["step_flops"] / r["matmul_rate"]
        rows.append([r["type"].upper(), mode, f"{tb / GB:.2f} + {t5_bytes / GB:.2f}", f"{r['peak_rss'] / GB:.2f}",
                     "-" if target != target else (f"≤ {target:g}" + (" ✓" if met else " ✗") if full
                                                   else f"({target:g} at full size)"),
                     f"{r['load_s']:.1f}", f"{r['t5_s']:.1f}", f"{statistics.mean(r['step_s']):.2f}",
                     f"{r['step_s'][0]:.2f}", f"{floor:.2f}", f"{r['decode_s']:.1f}", f"{r['total_s']:.1f}"])
    lines = [
        f"`bench/realsize.py {' '.join(sys.argv[1:])}`: {args.threads} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        f"### FLUX.1-schnell architecture, {'real size' if full else 'REDUCED DEPTH (smoke test)'}: "
        f"{args.depth} double + {args.single} single blocks, T5-XXL {args.t5_layers} layers; 512×512, 4 steps, "
        "max_sequence_length 256",
        "",
        markdown_table(["type", "memory mode", "files GB (transformer + T5 Q8_0)", "peak RSS GB", "target GB",
                        "load s", "T5 encode s", "s/step", "first step s", "floor s/step", "VAE decode s",
                        "total s"], rows),
        "",
        "Peak RSS: VmHWM of the generating subprocess (whole pipeline: load, CLIP + T5, 4 steps, VAE decode); "
        "GB = 10^9 bytes. Floor: flux_step_flops(config, 1024, 256) / floor_matmul_rate() "
        "(the compute dtype's) of the same process. "
        "s/step: mean of the 4 steps (step-end callback stamps; the first counted from the transformer's first "
        "call). Weights are random (N(0, 0.02²)), so the images are noise; they are in "
        f"{args.cache_dir}.",
        "",
        "Per-phase peak RSS GB (sampled every 20 ms) and RSS at the end of each phase:",
        "",
    ]
    phase_rows = []
    for r in results:
        peaks = r["phase_peaks"]
        ends = r["phase_end_rss"]
        phase_rows.append([r["type"].upper(), r["mode"]] + [
            f"{peaks.get(p, 0) / GB:.2f} / {ends.get(p, 0) / GB:.2f}" for p in ("load", "text", "denoise", "decode")]
            + [f"{r['ru_maxrss'] / GB:.2f}"])
    lines += [markdown_table(["type", "mode", "load", "CLIP + T5", "denoise", "VAE decode", "ru_maxrss"],
                             phase_rows),
              "", "(ru_maxrss also counts the parent's resident set at the fork, which Linux carries into the child; "
              "VmHWM does not.)", ""]
    if errors is not None:
        header, erows = errors
        lines += ["### Weight types at real widths: relative_error_vs_bf16 (256 tokens, 8 outlier input channels)",
                  "", markdown_table(header, erows), ""]
    if est:
        lines += [est, ""]
    return "\n".join(lines)


def estimate(args, files: dict, results: list[dict]) -> str:
    """What the full-size run will take, from this reduced run's per-block times and write rates."""
    import math

    from fluxion.checkpoints.gguf import tensor_type
    from fluxion.eval.speed import flux_step_flops
    from fluxion.quant import KEEP_EMBEDDERS, ggml

    fcfg, tcfg = flux_config(FULL["depth"], FULL["single"]), t5_config(FULL["t5_layers"])
    fshapes, tshapes = flux_shapes(fcfg), t5_shapes(tcfg)

    def gguf_bytes(shapes, qtype, keep):
        import torch

        return sum(ggml.nbytes(tensor_type(n, s, torch.bfloat16, qtype, keep), s) for n, s in shapes.items())

    t5_full = sum(ggml.nbytes("F32" if (len(s) == 1 or "relative" in n) else "Q8_0", s) for n, s in tshapes.items())
    t5_values = sum(math.prod(s) for s in tshapes.values())
    f_values = sum(math.prod(s) for s in fshapes.values())
    rows, total_min, disk = [], 0.0, t5_full + files["clip"][1]["bytes"] + files["vae"][1]["bytes"]
    t5m = files["t5"][1]
    write_s = t5_values / (t5m["values"] / t5m["seconds"])
    total_min += write_s / 60
    rows.append(["write T5 Q8_0", f"{t5_full / GB:.2f}", f"{write_s / 60:.1f}", ""])
    red = (args.depth, args.single, args.t5_layers)
    for r in results:
        q = r["type"]
        fb = gguf_bytes(fshapes, q.upper(), KEEP_EMBEDDERS)
        m = files[f"transformer-{q}"][1]
        w = f_values / (m["values"] / m["seconds"])
        b = r["block_s"]
        step = statistics.mean(r["step_s"]) + (FULL["depth"] - red[0]) * b["double"] + \
            (FULL["single"] - red[1]) * b["single"]
        t5 = r["t5_s"] + (FULL["t5_layers"] - red[2]) * b["t5"]
        gen = r["load_s"] + r["clip_s"] + t5 + 4 * step + r["decode_s"] + 5
        overhead = r["phase_peaks"].get("denoise", 0) - (m["bytes"] if r["mode"] == "model" else 0)
        peak = (fb if r["mode"] == "model" else 0) + overhead
        if r["mode"] == "model":
            total_min += w / 60
            disk += fb
            rows.append([f"write transformer {q.upper()}", f"{fb / GB:.2f}", f"{w / 60:.1f}", ""])
        floor = flux_step_flops(fcfg, 1024, 256) / r["matmul_rate"]
        rows.append([f"generate {q.upper()} ({r['mode']})", "", f"{gen / 60:.1f}",
                     f"step ≈ {step:.1f} s (floor {floor:.1f} s), T5 ≈ {t5:.1f} s, denoise peak RSS ≈ "
                     f"{peak / GB:.1f} GB{' + one block' if r['mode'] == 'sequential' else ''}"])
        total_min += gen / 60
        if r["mode"] == "model" and peak / GB > TARGETS_GB[q]:
            rows.append([f"generate {q.upper()} (sequential, auto: model run over target)", "", f"{gen / 60:.1f}",
                         "streaming re-reads the file every step (page cache)"])
            total_min += gen / 60
    from fluxion.eval.speed import markdown_table

    return (f"### Full-size estimate from this run ({args.threads} threads; per-block times × 19 / 38, "
            f"T5 layer time × 24, write rates × full sizes)\n\n"
            + markdown_table(["part", "GB on disk", "minutes", "notes"], rows)
            + f"\n\nTotal ≈ {total_min:.0f} minutes at {args.threads} thread(s) (more threads: the compute parts "
            f"shrink roughly in proportion); disk ≈ {disk / GB:.0f} GB in {args.cache_dir}.")


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--types", default="q8_0,q4_0", help="transformer GGML types, comma-separated (q8_0, q4_0, q5_0...)")
    p.add_argument("--depth", type=int, default=FULL["depth"], help="double blocks (19 in FLUX.1)")
    p.add_argument("--single", type=int, default=FULL["single"], help="single blocks (38 in FLUX.1)")
    p.add_argument("--t5-layers", dest="t5_layers", type=int, default=FULL["t5_layers"], help="T5 layers (24)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", dest="cache_dir", default="/tmp/fluxion-realsize")
    p.add_argument("--skip-write", dest="skip_write", action="store_true", help="use the cached files; fail if absent")
    p.add_argument("--write-only", dest="write_only", action="store_true", help="write the files and stop")
    p.add_argument("--offload", choices=["auto", "model", "sequential"], default="auto",
                   help="auto: model offload, and sequential too when the model run is over the target")
    p.add_argument("--skip-errors", dest="skip_errors", action="store_true", help="leave out the error table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "realsize.md"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    args.types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    for t in args.types:
        TARGETS_GB.setdefault(t, float("nan"))
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    cache = Cache(Path(args.cache_dir))
    files = build_files(args, cache)
    if args.write_only:
        return
    results = []
    for qtype in args.types:
        spec = {"type": qtype, "threads": args.threads, "transformer": str(files[f"transformer-{qtype}"][0]),
                "t5": str(files["t5"][0]), "clip": str(files["clip"][0]), "vae": str(files["vae"][0])}
        modes = ["sequential"] if args.offload == "sequential" else ["model"]
        for mode in modes:
            print(f"generating: {qtype}, {mode} offload ...", file=sys.stderr, flush=True)
            r = run_child({**spec, "mode": mode, "png": str(cache.root / f"realsize-{qtype}-{mode}.png")})
            results.append(r)
            print(f"  peak RSS {r['peak_rss'] / GB:.2f} GB, {statistics.mean(r['step_s']):.2f} s/step, image std "
                  f"{r['image_std']:.1f}", file=sys.stderr)
            if not r["image_finite"] or r["image_std"] == 0:
                print("  WARNING: the image is constant (non-finite latents?)", file=sys.stderr)
            if args.offload == "auto" and mode == "model" and r["peak_rss"] / GB > TARGETS_GB[qtype]:
                modes.append("sequential")
    errors = None if args.skip_errors else error_table(args.threads)
    reduced = (args.depth, args.single, args.t5_layers) != tuple(FULL.values())
    text = report(args, files, results, errors, estimate(args, files, results) if reduced else None)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
