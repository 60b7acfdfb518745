"""Load test of `fluxion serve`: N concurrent clients send a fixed number of requests to the real service (started
here as a subprocess, on loopback only), once with dynamic batching and once with `--max-batch 1`.

    .venv/bin/python bench/serve_load.py                                  # 32 requests, 8 clients, batch 4 vs 1
    .venv/bin/python bench/serve_load.py --requests 4 --clients 2 --steps 4   # a quick dry run

Every request is `POST /v1/images/generations` (synchronous, n=1, its own prompt and seed). Counted per run:
  lost      requests that got no image (transport error, non-200 other than 429, or the time bound ran out)
  wrong     images that differ from the offline FluxPipeline image for the same prompt and seed
            (`generator=torch.Generator("cpu").manual_seed(seed)`, float32) by more than --tolerance levels
  rejected  429 answers (queue full); the client waits Retry-After (at most 2 s) and sends the request again
  p50/p95   seconds from the first send of a request to its image (retries included)
  img/s     images per second over the run's wall time
Bounded: at most 64 clients and 1000 requests, and each run stops after --time-limit seconds (the rest are lost).
Prints a markdown table with the command line; --out also writes it to a file.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a small red circle on a black background",
    "a yellow square on a white background",
    "three orange triangles on a white background",
    "a green circle right of an orange triangle on a black background",
    "a blue square above a red circle on a white background",
    "two purple triangles on a black background",
]
HOST = "127.0.0.1"  # loopback only


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def fluxion_command() -> list[str]:
    exe = Path(sys.executable).with_name("fluxion")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("fluxion")
    return [found] if found else [sys.executable, "-m", "fluxion.cli"]


def start_server(args, max_batch: int, port: int, log_path: Path) -> subprocess.Popen:
    cmd = fluxion_command() + ["serve", "--host", HOST, "--port", str(port), "--max-batch", str(max_batch),
                               "--batch-window-ms", str(args.batch_window_ms), "--max-queue", str(args.max_queue)]
    if args.model:
        cmd += ["--model", args.model]
    cmd += ["--preview-every", str(args.preview_every)]
    env = dict(os.environ)
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc._fluxion_log = log  # closed in stop_server
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + args.start_timeout
    while True:
        if proc.poll() is not None:
            log.flush()
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except (OSError, urllib.error.HTTPError):
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"the service did not become healthy in {args.start_timeout} s; see {log_path}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # graceful shutdown, as Ctrl-C
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    proc._fluxion_log.close()


def request_body(args, i: int) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": args.seed + i, "steps": args.steps,
            "size": f"{args.size}x{args.size}", "n": 1, "response_format": "b64_json"}


def run_load(args, max_batch: int, log_dir: Path) -> dict:
    port = free_port()
    proc = start_server(args, max_batch, port, log_dir / f"serve_max_batch_{max_batch}.log")
    url = f"http://{HOST}:{port}/v1/images/generations"
    for w in range(args.warmup):  # not timed, not counted: the first calls pay one-time costs
        body = dict(request_body(args, 0), seed=args.seed - 1 - w)
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=args.start_timeout) as r:
                r.read()
        except (OSError, urllib.error.HTTPError) as e:
            stop_server(proc)
            raise RuntimeError(f"the warm-up request failed: {e}") from e
    todo = list(range(args.requests))
    lock = threading.Lock()
    results: dict[int, dict] = {}
    rejected = [0]
    t0 = time.monotonic()
    deadline = t0 + args.time_limit

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            body = json.dumps(request_body(args, i)).encode()
            start = time.monotonic()
            out = {"error": "time limit"}
            while time.monotonic() < deadline:
                req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=max(1.0, deadline - time.monotonic())) as r:
                        data = json.load(r)
                    out = {"latency": time.monotonic() - start, "data": data.get("data") or []}
                    break
                except urllib.error.HTTPError as e:
                    if e.code == 429:
                        with lock:
                            rejected[0] += 1
                        try:
                            wait = float(e.headers.get("Retry-After") or 0.5)
                        except ValueError:
                            wait = 0.5
                        time.sleep(min(max(wait, 0.05), 2.0))
                        continue
                    out = {"error": f"HTTP {e.code}: {e.read()[:300]!r}"}
                    break
                except OSError as e:
                    out = {"error": f"{type(e).__name__}: {e}"}
                    break
            with lock:
                results[i] = out

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
        wall = time.monotonic() - t0
    finally:
        stop_server(proc)
    return {"max_batch": max_batch, "results": results, "rejected": rejected[0], "wall": wall}


def decode(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), np.int16)


def references(args) -> dict[int, np.ndarray]:
    """The offline FluxPipeline image of every request (same prompt, seed, size, steps; float32)."""
    import torch

    from fluxion import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.model) if args.model else FluxPipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    refs = {}
    for i in range(args.requests):
        b = request_body(args, i)
        img = pipe(b["prompt"], height=args.size, width=args.size, num_inference_steps=args.steps,
                   generator=torch.Generator("cpu").manual_seed(b["seed"])).images[0]
        refs[i] = np.asarray(img.convert("RGB"), np.int16)
    return refs


def summarize(args, run: dict, refs: dict[int, np.ndarray] | None) -> dict:
    lost, wrong, lat, worst = [], [], [], 0
    for i in range(args.requests):
        r = run["results"].get(i)
        if r is None or "error" in r or len(r["data"]) != 1 or "b64_json" not in r["data"][0]:
            lost.append((i, (r or {}).get("error", "no answer")))
            continue
        lat.append(r["latency"])
        item = r["data"][0]
        expect_seed = args.seed + i
        if item.get("seed") != expect_seed:
            wrong.append((i, f"seed {item.get('seed')} != {expect_seed}"))
            continue
        if refs is not None:
            img = decode(item["b64_json"])
            if img.shape != refs[i].shape:
                wrong.append((i, f"shape {img.shape} != {refs[i].shape}"))
                continue
            diff = int(np.abs(img - refs[i]).max())
            worst = max(worst, diff)
            if diff > args.tolerance:
                wrong.append((i, f"max |diff| {diff} > {args.tolerance}"))
    ok = args.requests - len(lost)
    return {
        "max_batch": run["max_batch"], "ok": ok, "lost": lost, "wrong": wrong, "rejected": run["rejected"],
        "p50": float(np.percentile(lat, 50)) if lat else float("nan"),
        "p95": float(np.percentile(lat, 95)) if lat else float("nan"),
        "wall": run["wall"], "throughput": ok / run["wall"] if run["wall"] > 0 else float("nan"), "worst": worst,
    }


def table(args, rows: list[dict], command: str) -> str:
    lines = [
        f"`{command}`",
        "",
        f"{args.requests} requests from {args.clients} concurrent clients, {args.size}x{args.size}, {args.steps} steps, "
        f"model {args.model or 'fluxion-mini'}, batch window {args.batch_window_ms} ms, max queue {args.max_queue}, "
        f"{args.warmup} untimed warm-up request(s) per run; "
        f"images checked against the offline pipeline (tolerance {args.tolerance} levels)"
        + ("" if not args.no_check else " — **check skipped (--no-check)**") + ".",
        "",
        "| --max-batch | ok | lost | wrong | 429 rejected | max \\|diff\\| | p50 latency (s) | p95 latency (s) "
        "| wall (s) | images/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        worst = "-" if args.no_check else str(r["worst"])
        lines.append(f"| {r['max_batch']} | {r['ok']} | {len(r['lost'])} | {len(r['wrong'])} | {r['rejected']} | "
                     f"{worst} | {r['p50']:.2f} | {r['p95']:.2f} | {r['wall']:.1f} | {r['throughput']:.2f} |")
    base = next((r for r in rows if r["max_batch"] == 1), None)
    for r in rows:
        if base is not None and r is not base and base["throughput"] > 0:
            lines.append("")
            lines.append(f"Throughput with --max-batch {r['max_batch']}: {r['throughput'] / base['throughput']:.2f}x "
                         "that of --max-batch 1.")
    for r in rows:
        for i, why in r["lost"][:5]:
            lines.append(f"- max-batch {r['max_batch']}: request {i} lost: {why}")
        for i, why in r["wrong"][:5]:
            lines.append(f"- max-batch {r['max_batch']}: request {i} wrong: {why}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the shipped fluxion-mini)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-batch", type=int, nargs="+", default=[4, 1],
                   help="runs, one per value (1 = one-by-one serving)")
    p.add_argument("--batch-window-ms", type=float, default=50.0)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--tolerance", type=int, default=2, help="max per-pixel difference (0-255 levels) to count as right")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per run; unanswered requests are lost")
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument("--warmup", type=int, default=1, help="untimed requests sent before each run")
    p.add_argument("--preview-every", type=int, default=0, help="the server's --preview-every (0: no previews)")
    p.add_argument("--server-threads", type=int, default=0, help="OMP_NUM_THREADS for the server (0: its default)")
    p.add_argument("--no-check", action="store_true", help="skip the offline reference images")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 64:
        p.error("--clients must be 1..64")
    if not 1 <= args.requests <= 1000:
        p.error("--requests must be 1..1000")
    if args.time_limit <= 0 or args.time_limit > 3600:
        p.error("--time-limit must be in (0, 3600] seconds")

    command = "python bench/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv)
    log_dir = REPO / "bench" / "out"
    log_dir.mkdir(parents=True, exist_ok=True)
    runs = [run_load(args, mb, log_dir) for mb in args.max_batch]
    refs = None if args.no_check else references(args)
    rows = [summarize(args, run, refs) for run in runs]
    text = table(args, rows, command.strip())
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    bad = sum(len(r["lost"]) + len(r["wrong"]) for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
