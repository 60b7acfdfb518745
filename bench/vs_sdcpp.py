"""fluxion next to stable-diffusion.cpp: the same synthetic real-width FLUX.1-schnell files, the same machine.

    nice -n 19 .venv/bin/python bench/vs_sdcpp.py --depth 2 --single 4 --t5-layers 2 --threads 1

What it does:

* finds sd-cli (--sd-cli PATH), or builds it once into ${FLUXION_CACHE:-~/.cache/fluxion}/sdcpp/: `pip download
  --no-deps stable-diffusion-cpp-python==0.4.7` (its sdist vendors stable-diffusion.cpp and ggml), then cmake +
  ninja, Release, GGML_NATIVE, `--target sd-cli`, under nice -n 19 with -j1 (--build-jobs): about 35 minutes on
  one core. Nothing is written inside the repository.
* writes (or reuses) the files with bench/realsize.py's writers, in its --cache-dir (default /tmp/fluxion-realsize,
  shared with realsize.py): the transformer (real widths, --depth double + --single single blocks, random weights)
  as Q8_0 and Q4_0 GGUF in the community (city96) layout -- original BFL names, no prefix, modulations quantized,
  embedders and final layer bf16, 1-D tensors F32; the T5-XXL encoder as a Q8_0 GGUF in llama.cpp names
  (`enc.blk.N.attn_q.weight`, ...); CLIP-L as transformers' folder (model.safetensors, bf16); the FLUX VAE
  in the original `ae.safetensors` layout (`encoder.down.0.block.0...`, bf16). stable-diffusion.cpp reads all of
  them as written: --diffusion-model prefixes `model.diffusion_model.` when a name lacks it and counts
  double_blocks / single_blocks from the names (so a reduced file loads), --t5xxl maps llama.cpp's names to
  transformers' (name_conversion.cpp), --vae takes the original layout directly. One layout change: CLIP-L.
  transformers 5 saves CLIPTextModel's tensors without the `text_model.` prefix, and sd.cpp's --clip_l only
  prepends `text_encoders.clip_l.transformer.` and then wants `...transformer.text_model.*` (the community's
  clip_l.safetensors layout), so sd-cli gets a re-keyed copy, clip_l-text_model.safetensors (same tensors).
* runs, for each --types entry, fluxion (realsize.py's generating subprocess: FluxPipeline, schnell schedule,
  --offload model = its CPU memory sequencing, as realsize.py) and then sd-cli, one after the other: 512x512,
  4 steps, batch 1, cfg 1 (sd-cli: --cfg-scale 1 --sampling-method euler, i.e. one transformer call per step, and
  free_params_immediately, which sd-cli always sets), 256 T5 positions in both, --threads threads in both
  (torch.set_num_threads + OMP_NUM_THREADS; sd-cli -t).

Reported: per-step seconds (fluxion: step-end callback stamps, the first step from the transformer's first call;
sd.cpp: the arrival times of its progress lines, which it flushes after every step, the first step from the
line's own average), seconds of text encoding, sampling, VAE decode and the whole generation, the process's
wall time, peak RSS of each engine process (fluxion: its own VmHWM at the end; sd-cli: its VmHWM polled every
10 ms from /proc while it runs), the ratio fluxion / sd.cpp per weight type, and the bf16 matmul floor of the
transformer step (flux_step_flops(config, 1024, 256) / floor_matmul_rate() in the fluxion subprocess, same threads).
Markdown to stdout and bench/out/vs_sdcpp.md, the numbers as JSON next to it; sd-cli's logs and both images go to
--cache-dir.

Caveats:

* A reduced file (--depth/--single below 19/38) compares whole steps of that file: the blocks' linears and
  attention are nearly all of a real-width step (the table gives their share of the FLOPs), so the step ratio is
  the per-block ratio; the full model's step is ~57/(depth+single) times longer in both engines.
* sd.cpp's T5 has 24 layers, fixed (t5.hpp T5Params.num_layers = 24; a tensor the file lacks is a load error).
  With --t5-layers 24 both engines encode the same file. With fewer, sd-cli is run without --t5xxl (a zero
  256x4096 context, the same shape for the transformer), so text-encode times are not comparable and the
  end-to-end ratio is given without text encoding too.
* Load times measure different things (fluxion maps the files and materialises lazily; sd.cpp reads every tensor
  into its own buffers; its figure is its "loading tensors completed" log line), and the files are in the page
  cache (just written) for both. Weights are random, so both images are noise; the numbers say nothing of quality.
* sd.cpp was built with GGML_NATIVE (this CPU's ISA); fluxion runs PyTorch's stock CPU kernels.
* The VAE file is bf16 (realsize.py writes it so; BFL's ae.safetensors is float32). sd.cpp holds the decoder in
  its own type whatever the file's (94.6 MB of params from the bf16 and from a float32 copy alike, and the same
  ~125 s decode at 1 thread), so its decode time does not come from our file type.
* sd.cpp's stock build has ggml's GGML_LLAMAFILE (tinyBLAS matmul kernels) off, and this script builds it so;
  --llamafile builds and runs one with it on (a second ~20-35 min build), which made sd.cpp's steps ~1.8x faster
  here. The header of the report gives the build's options.
* Tokenizers differ (fluxion: fluxion-mini's small ones; sd.cpp: its built-in CLIP BPE and T5 unigram), which
  changes no cost: CLIP always runs 77 positions and T5 256 in both.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realsize  # noqa: E402  (bench/realsize.py: the file writers and the fluxion generating subprocess)

ROOT = realsize.ROOT
GB = realsize.GB
SDCPP_PYPI = "stable-diffusion-cpp-python"
SDCPP_VERSION = "0.4.7"
SDCPP_T5_LAYERS = 24  # fixed in stable-diffusion.cpp's t5.hpp
STEPS, SIZE = 4, 512


# ---------------------------------------------------------------- sd-cli


def cache_root() -> Path:
    return Path(os.environ.get("FLUXION_CACHE") or Path.home() / ".cache" / "fluxion")


def sdcpp_source(base: Path) -> Path:
    return base / f"stable_diffusion_cpp_python-{SDCPP_VERSION}" / "vendor" / "stable-diffusion.cpp"


def find_sd_cli(build: Path) -> Path | None:
    for p in (build / "bin" / "sd-cli", build / "examples" / "cli" / "sd-cli"):
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def build_sd_cli(jobs: int, llamafile: bool = False) -> Path:
    """sd-cli from stable-diffusion-cpp-python's sdist (it vendors stable-diffusion.cpp), built once in the cache.

    The stock build (ggml's defaults: GGML_LLAMAFILE off) in build/; with `llamafile`, GGML_LLAMAFILE=ON (ggml's
    tinyBLAS matmul kernels, which llama.cpp turns on by default) in build-llamafile/.
    """
    base = cache_root() / "sdcpp"
    src = sdcpp_source(base)
    build = src / ("build-llamafile" if llamafile else "build")
    exe = find_sd_cli(build)
    if exe is not None:
        return exe
    base.mkdir(parents=True, exist_ok=True)
    log = base / f"{build.name}.log"
    print(f"building stable-diffusion.cpp's sd-cli ({SDCPP_PYPI}=={SDCPP_VERSION}) into {base}: this takes about "
          f"35 minutes on one core (nice -n 19, -j{jobs}); log: {log}", file=sys.stderr, flush=True)
    if not (src / "CMakeLists.txt").exists():
        dl = base / "dl"
        sdists = sorted(dl.glob(f"stable_diffusion_cpp_python-{SDCPP_VERSION}.tar.gz"))
        if not sdists:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            f"{SDCPP_PYPI}=={SDCPP_VERSION}", "-d", str(dl)], check=True)
            sdists = sorted(dl.glob("stable_diffusion_cpp_python-*.tar.gz"))
        if not sdists:
            raise SystemExit(f"pip download left no sdist in {dl}")
        with tarfile.open(sdists[-1]) as tf:
            try:
                tf.extractall(base, filter="data")
            except TypeError:  # Python without extraction filters
                tf.extractall(base)
    nice = ["nice", "-n", "19"]
    with open(log, "a") as f:
        for cmd in (["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                     "-DSD_BUILD_EXAMPLES=ON", "-DSD_WEBP=OFF", "-DSD_WEBM=OFF", "-DGGML_NATIVE=ON"]
                    + (["-DGGML_LLAMAFILE=ON"] if llamafile else []),
                    ["cmake", "--build", str(build), "--target", "sd-cli", f"-j{jobs}"]):
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            if subprocess.run(nice + cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                raise SystemExit(f"building sd-cli failed; see {log}")
    exe = find_sd_cli(build)
    if exe is None:
        raise SystemExit(f"the build finished but no sd-cli under {build}")
    return exe


def build_flags(exe: Path) -> str:
    """The ggml options sd-cli was built with, from the CMakeCache.txt of its build folder (if it is there)."""
    for cache in (exe.parent.parent / "CMakeCache.txt", exe.parent.parent.parent.parent / "CMakeCache.txt"):
        if cache.is_file():
            found = dict(re.findall(r"^(GGML_NATIVE|GGML_LLAMAFILE|GGML_OPENMP|CMAKE_BUILD_TYPE):\w+=(\S*)$",
                                    cache.read_text(), re.M))
            return ", ".join(f"{k}={v}" for k, v in sorted(found.items()))
    return "build options unknown"


def sdcpp_clip(files: dict, cache) -> Path:
    """CLIP-L for sd.cpp: realsize.py's model.safetensors re-keyed with the `text_model.` prefix.

    transformers 5 saves CLIPTextModel without that prefix (`embeddings.token_embedding.weight`, ...); sd.cpp
    looks for `text_encoders.clip_l.transformer.text_model.*` (the layout of the community's clip_l.safetensors,
    e.g. comfyanonymous/flux_text_encoders), and only prefixes `text_encoders.clip_l.transformer.`. Same tensors.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = Path(files["clip"][0]) / "model.safetensors"
    path = cache.root / "clip_l-text_model.safetensors"
    key = {"source": files["clip"][1]["key"], "prefix": "text_model."}
    if cache.fresh(path, key) is None:
        t0 = time.perf_counter()
        with safe_open(str(src), "pt") as f:
            tensors = {(k if k.startswith("text_model.") else "text_model." + k): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(path))
        cache.record(path, key, time.perf_counter() - t0, sum(t.numel() for t in tensors.values()))
    return path


class HwmPoller:
    """The peak VmHWM of another process, read from /proc/<pid>/status every `interval` s until it is gone."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.path, self.peak, self.interval = f"/proc/{pid}/status", 0, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with open(self.path) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
                            break
                    else:
                        return  # a zombie: no memory left to measure
            except (FileNotFoundError, ProcessLookupError):
                return
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


_PROGRESS = re.compile(rb"(\d+)/(\d+) - ([0-9.]+)(s/it|it/s)")
_LOG = {
    "load_s": r"loading tensors completed, taking ([0-9.]+)s",
    "text_s": r"get_learned_condition completed, taking ([0-9.]+)s",
    "sampling_s": r"sampling completed, taking ([0-9.]+)s",
    "decode_s": r"decode_first_stage completed, taking ([0-9.]+)s",
    "total_s": r"generate_image completed in ([0-9.]+)s",
}


def run_sdcpp(exe: Path, spec: dict, extra: list[str]) -> dict:
    cmd = [str(exe), "--diffusion-model", spec["transformer"], "--vae", spec["vae"], "--clip_l", spec["clip"]]
    if spec.get("t5"):
        cmd += ["--t5xxl", spec["t5"]]
    cmd += ["-p", realsize.PROMPT, "-W", str(SIZE), "-H", str(SIZE), "--steps", str(STEPS), "--cfg-scale", "1.0",
            "--sampling-method", "euler", "-s", "0", "-b", "1", "-t", str(spec["threads"]), "-o", spec["png"], "-v",
            *extra]
    if shutil.which("stdbuf"):  # line-buffered logs (progress lines are flushed by sd-cli itself)
        cmd = ["stdbuf", "-oL", "-eL", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    chunks: list[tuple[float, bytes]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    hwm = HwmPoller(proc.pid)
    fd = proc.stdout.fileno()
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            break
        chunks.append((time.perf_counter(), data))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = hwm.stop()
    text = b"".join(c for _, c in chunks)
    Path(spec["log"]).write_bytes(text)
    log = text.decode("utf-8", "replace")
    if proc.returncode != 0:
        tail = "\n".join(log.replace("\r", "\n").splitlines()[-25:])
        raise SystemExit(f"sd-cli ({spec['type']}) failed with code {proc.returncode}; log {spec['log']}:\n{tail}")
    r = {"type": spec["type"], "threads": spec["threads"], "wall_s": wall, "peak_rss": peak,
         "ru_maxrss": usage.ru_maxrss * 1024, "cmd": cmd, "t5": bool(spec.get("t5"))}
    for key, pattern in _LOG.items():
        m = re.findall(pattern, log)
        r[key] = float(m[-1]) if m else None
    m = re.search(r"flux: depth = (\d+), depth_single_blocks = (\d+)", log)
    r["depth"], r["single"] = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    # per step: sd-cli prints "k/steps - v s/it" (v = mean since sampling began) and flushes after every step
    arrivals: dict[int, tuple[float, float]] = {}
    for t, c in chunks:
        for pm in _PROGRESS.finditer(c):
            k, n, v, unit = int(pm.group(1)), int(pm.group(2)), float(pm.group(3)), pm.group(4)
            if n == STEPS and k not in arrivals:
                arrivals[k] = (t, v if unit == b"s/it" else 1.0 / v)
    if sorted(arrivals) == list(range(1, STEPS + 1)):
        r["step_s"] = [arrivals[1][1]] + [arrivals[k][0] - arrivals[k - 1][0] for k in range(2, STEPS + 1)]
        r["step_s_from_log"] = [k * arrivals[k][1] - (k - 1) * arrivals[k - 1][1] if k > 1 else arrivals[1][1]
                                for k in range(1, STEPS + 1)]
    else:
        r["step_s"] = [r["sampling_s"] / STEPS] * STEPS if r["sampling_s"] else None
        r["step_s_from_log"] = None
    r["image_std"] = image_std(spec["png"])
    return r


def image_std(path: str) -> float | None:
    try:
        import numpy as np
        from PIL import Image

        return float(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).std())
    except Exception:  # noqa: BLE001 -- an unreadable image shows as "-"
        return None


# ---------------------------------------------------------------- the report


def cpu_line() -> str:
    model, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{model} ({', '.join(isa) or 'no AVX2'}), {os.cpu_count()} logical CPUs"


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def report(args, sizes: dict[str, int], pairs, block_share: float, exe: Path) -> tuple[str, dict]:
    import torch

    from fluxion.eval.speed import markdown_table

    same_t5 = args.t5_layers == SDCPP_T5_LAYERS
    rows, rrows, out = [], [], []
    for fx, sd in pairs:
        q = fx["type"]
        floor = fx["step_flops"] / fx["matmul_rate"]
        fx_step, sd_step = statistics.mean(fx["step_s"]), statistics.mean(sd["step_s"]) if sd["step_s"] else None
        fx_sampling = sum(fx["step_s"])
        fx_text = fx["clip_s"] + fx["t5_s"]
        size = sizes[q]
        rows.append([q.upper(), "fluxion", f"{size / GB:.2f}", fmt(fx["load_s"]), fmt(fx_text), fmt(fx_step),
                     fmt(fx["step_s"][0]), fmt(fx_sampling), fmt(fx["decode_s"]), fmt(fx["total_s"]),
                     fmt(fx["wall_s"], ".1f"), fmt(fx["peak_rss"] / GB)])
        rows.append([q.upper(), "sd.cpp", f"{size / GB:.2f}", fmt(sd["load_s"]), fmt(sd["text_s"]), fmt(sd_step),
                     fmt(sd["step_s"][0] if sd["step_s"] else None), fmt(sd["sampling_s"]), fmt(sd["decode_s"]),
                     fmt(sd["total_s"]), fmt(sd["wall_s"], ".1f"), fmt(sd["peak_rss"] / GB)])
        fx_gen_notext = fx["total_s"] - fx_text
        sd_gen_notext = None if sd["total_s"] is None or sd["text_s"] is None else sd["total_s"] - sd["text_s"]
        rrows.append([q.upper(), ratio(fx_step, sd_step), ratio(fx_sampling, sd["sampling_s"]),
                      ratio(fx["decode_s"], sd["decode_s"]),
                      ratio(fx["total_s"], sd["total_s"]) if same_t5 else "- (T5 differs)",
                      ratio(fx_gen_notext, sd_gen_notext), ratio(fx["peak_rss"], sd["peak_rss"]), fmt(floor),
                      ratio(fx_step, floor), ratio(sd_step, floor)])
        out.append({"type": q, "transformer_bytes": size, "fluxion": fx, "sdcpp": sd, "floor_s_per_step": floor,
                    "ratio_step": None if not sd_step else fx_step / sd_step,
                    "ratio_generate_without_text": None if not sd_gen_notext else fx_gen_notext / sd_gen_notext,
                    "ratio_peak_rss": fx["peak_rss"] / sd["peak_rss"] if sd["peak_rss"] else None})
    t5_note = (f"T5-XXL {args.t5_layers} layers (Q8_0 GGUF) in both engines" if same_t5 else
               f"T5-XXL {args.t5_layers} layers in fluxion; sd.cpp without T5 (its T5 is fixed at 24 layers), a zero "
               "256×4096 context")
    lines = [
        f"`bench/vs_sdcpp.py {' '.join(args.argv)}`: {args.threads} thread(s) in both engines, "
        f"{args.date}; CPU: {args.cpu}",
        f"fluxion: torch {torch.__version__}, memory mode `{args.offload}`; sd.cpp: stable-diffusion.cpp vendored in "
        f"{SDCPP_PYPI} {SDCPP_VERSION} (ggml CPU backend; {args.sd_build}), `{exe}`",
        "",
        "sd-cli command (" + pairs[0][1]["type"] + "): `" + " ".join(shlex.quote(a) for a in pairs[0][1]["cmd"]) + "`",
        "",
        f"### FLUX.1-schnell at real widths, {args.depth} double + {args.single} single blocks (the real model: "
        f"19 + 38); {t5_note}; 512×512, 4 steps, batch 1, cfg 1, 256 text positions",
        "",
        markdown_table(["type", "engine", "transformer GB", "load s", "text encode s", "s/step", "first step s",
                        "sampling s", "VAE decode s", "generate s", "process wall s", "peak RSS GB"], rows),
        "",
        markdown_table(["type", "s/step fluxion/sd.cpp", "sampling", "VAE decode", "generate",
                        "generate without text encoding", "peak RSS", "floor s/step", "fluxion step / floor",
                        "sd.cpp step / floor"], rrows),
        "",
        f"Both engines load the same files (in {args.cache_dir}). s/step: mean of the 4 steps (fluxion: step-end "
        "callback stamps, the first from the transformer's first call; sd.cpp: arrival of its per-step progress lines, "
        "the first from its own timing). generate: text encoding + sampling + VAE decode (fluxion: the pipeline call; "
        "sd.cpp: its `generate_image completed` line); process wall: the engine's process from start to exit "
        "(fluxion's includes importing torch and measuring the matmul rate). Load: fluxion maps the files, sd.cpp "
        "reads them into its buffers (its `loading tensors completed` line). Peak RSS: VmHWM of each engine's "
        "process (sd-cli's polled every 10 ms), GB = 10^9 bytes. Floor: flux_step_flops(config, 1024, 256) / "
        "floor_matmul_rate() (the compute dtype's rate) in the fluxion process, same threads; it counts the blocks' linears and attention, "
        f"which are {100 * block_share:.1f}% of this file's step FLOPs, so the step ratio is the per-block ratio. "
        "Weights are random: the images are noise.",
    ]
    data = {"argv": args.argv, "date": args.date, "cache_dir": args.cache_dir, "threads": args.threads,
            "depth": args.depth, "single": args.single,
            "t5_layers": args.t5_layers, "same_t5": same_t5, "offload": args.offload, "cpu": args.cpu,
            "torch": torch.__version__, "sdcpp": f"{SDCPP_PYPI} {SDCPP_VERSION}", "sd_cli": str(exe),
            "sd_build": args.sd_build,
            "block_flop_share": block_share, "results": out}
    return "\n".join(lines), data


def block_flop_share(depth: int, single: int) -> float:
    """Share of the blocks in a step's FLOPs: blocks (flux_step_flops) over blocks + the embedders and final layer."""
    from fluxion.eval.speed import flux_step_flops

    cfg = realsize.flux_config(depth, single)
    h, img, txt = cfg.hidden_size, 1024, 256
    macs = (img * 64 * h + txt * 4096 * h  # img_in, txt_in
            + 256 * h + h * h + 768 * h + h * h  # time_in, vector_in (one row)
            + h * 2 * h + img * h * 64  # final layer: modulation (one row), linear
            + depth * 2 * 6 * h * h + single * 3 * h * h)  # the blocks' modulations (one row each)
    rest = 2 * macs
    blocks = flux_step_flops(cfg, img, txt)
    return blocks / (blocks + rest)


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--types", default="q8_0,q4_0", help="transformer GGML types, comma-separated")
    p.add_argument("--depth", type=int, default=2, help="double blocks (19 in FLUX.1)")
    p.add_argument("--single", type=int, default=4, help="single blocks (38 in FLUX.1)")
    p.add_argument("--t5-layers", dest="t5_layers", type=int, default=SDCPP_T5_LAYERS,
                   help="T5 layers (24; fewer: sd.cpp runs without T5, see the caveats)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", dest="cache_dir", default="/tmp/fluxion-realsize")
    p.add_argument("--skip-write", dest="skip_write", action="store_true", help="use the cached files; fail if absent")
    p.add_argument("--offload", choices=["model", "none"], default="model",
                   help="fluxion's memory mode (model: its CPU memory sequencing, as realsize.py; sd-cli always "
                        "frees each part's weights after use)")
    p.add_argument("--sd-cli", dest="sd_cli", help="path to a built sd-cli (default: build it into the cache once)")
    p.add_argument("--build-jobs", dest="build_jobs", type=int, default=1)
    p.add_argument("--llamafile", action="store_true",
                   help="build / use sd-cli with GGML_LLAMAFILE=ON (ggml's tinyBLAS kernels; off in the stock build)")
    p.add_argument("--sd-args", dest="sd_args", default="", help="extra sd-cli arguments (e.g. '--fa'), one string")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "vs_sdcpp.md"))
    p.add_argument("--from-json", dest="from_json", help="only re-render the markdown of a saved JSON (no runs)")
    args = p.parse_args()
    args.types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    args.argv, args.date, args.cpu = sys.argv[1:], time.strftime("%Y-%m-%d"), cpu_line()
    if args.from_json:
        rerender(Path(args.from_json), Path(args.out))
        return

    exe = Path(args.sd_cli) if args.sd_cli else build_sd_cli(args.build_jobs, args.llamafile)
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise SystemExit(f"{exe}: no executable sd-cli there")
    args.sd_build = build_flags(exe)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    cache = realsize.Cache(Path(args.cache_dir))
    files = realsize.build_files(args, cache)
    same_t5 = args.t5_layers == SDCPP_T5_LAYERS
    pairs = []
    for q in args.types:
        base = {"type": q, "threads": args.threads, "transformer": str(files[f"transformer-{q}"][0]),
                "vae": str(files["vae"][0])}
        print(f"{q}: fluxion ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        fx = realsize.run_child({**base, "t5": str(files["t5"][0]), "clip": str(files["clip"][0]),
                                 "mode": args.offload, "png": str(cache.root / f"vs_sdcpp-fluxion-{q}.png")})
        fx["wall_s"] = time.perf_counter() - t0
        print(f"  {statistics.mean(fx['step_s']):.2f} s/step, peak RSS {fx['peak_rss'] / GB:.2f} GB", file=sys.stderr)
        print(f"{q}: sd.cpp ...", file=sys.stderr, flush=True)
        sd = run_sdcpp(exe, {**base, "t5": str(files["t5"][0]) if same_t5 else None,
                             "clip": str(sdcpp_clip(files, cache)),
                             "png": str(cache.root / f"vs_sdcpp-sdcpp-{q}.png"),
                             "log": str(cache.root / f"vs_sdcpp-sdcpp-{q}.log")}, args.sd_args.split())
        if (sd["depth"], sd["single"]) != (args.depth, args.single):
            raise SystemExit(f"sd.cpp built a transformer of {sd['depth']} + {sd['single']} blocks from the file, "
                             f"not {args.depth} + {args.single}; see its log")
        step = statistics.mean(sd["step_s"]) if sd["step_s"] else float("nan")
        print(f"  {step:.2f} s/step, peak RSS {sd['peak_rss'] / GB:.2f} GB", file=sys.stderr)
        pairs.append((fx, sd))
    sizes = {q: files[f"transformer-{q}"][1]["bytes"] for q in args.types}
    text, data = report(args, sizes, pairs, block_flop_share(args.depth, args.single), exe)
    write_outputs(text, data, Path(args.out))


def write_outputs(text: str, data: dict, out: Path) -> None:
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")


def rerender(path: Path, out: Path) -> None:
    """The markdown (and JSON) of a run saved as JSON, by the current report code."""
    data = json.loads(path.read_text())
    args = argparse.Namespace(argv=data["argv"], threads=data["threads"], depth=data["depth"], single=data["single"],
                              t5_layers=data["t5_layers"], offload=data["offload"],
                              cache_dir=data.get("cache_dir", "/tmp/fluxion-realsize"), date=data.get("date", "?"),
                              cpu=data["cpu"], sd_build=data.get("sd_build") or build_flags(Path(data["sd_cli"])))
    pairs = [(r["fluxion"], r["sdcpp"]) for r in data["results"]]
    sizes = {r["type"]: r.get("transformer_bytes") or Path(r["sdcpp"]["cmd"][r["sdcpp"]["cmd"].index(
        "--diffusion-model") + 1]).stat().st_size for r in data["results"]}
    text, new = report(args, sizes, pairs, block_flop_share(args.depth, args.single), Path(data["sd_cli"]))
    write_outputs(text, new, out)


if __name__ == "__main__":
    main()
