"""`fluxion eval`: generate the eval set with a model, score every image, report per-kind accuracy."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..files import atomic_path
from .prompts import EvalItem, eval_set
from .report import accuracy_table, contact_sheet, format_table
from .scorer import score


def generate_items(pipe, items: list[EvalItem], batch_size: int = 25, **call_kwargs) -> list:
    """Images for the items, batched; each image gets its own seeded generator (so batching changes nothing)."""
    images = []
    for start in tqdm(range(0, len(items), batch_size), desc="eval", unit="batch"):
        chunk = items[start : start + batch_size]
        gens = [torch.Generator("cpu").manual_seed(it.seed) for it in chunk]
        images += pipe([it.prompt for it in chunk], generator=gens, **call_kwargs).images
    return images


def _items(limit: int | None, seeds: int) -> list[EvalItem]:
    """The first ``limit`` prompts of the eval set (all when None), each at ``seeds`` noise seeds."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1 (the number of prompts to evaluate), got {limit!r}")
    items = eval_set(seeds)
    per_round = len(items) // seeds
    return [it for i, it in enumerate(items) if limit is None or i % per_round < limit]


def time_single_image(pipe, prompt: str, repeats: int = 10, **call_kwargs) -> float:
    """Median seconds for one image, end to end (text encoding, sampling, decoding) with the model loaded."""
    pipe(prompt, generator=torch.Generator("cpu").manual_seed(0), **call_kwargs)  # warm-up
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        pipe(prompt, generator=torch.Generator("cpu").manual_seed(i), **call_kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_eval(model: str | None = None, out_dir: str = "out/eval", limit: int | None = None, steps: int | None = None,
             guidance: float | None = None, cache: str | None = None, cache_threshold: float | None = None,
             quantize: str | None = None, true_cfg: float | None = None, seeds: int = 1) -> dict:
    from ..pipelines import FluxPipeline

    items = _items(limit, seeds)
    pipe = FluxPipeline.from_pretrained(model, quantize=quantize)
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": steps, "guidance_scale": guidance, "cache": cache, "cache_threshold": cache_threshold,
            "true_cfg_scale": true_cfg}
    t0 = time.perf_counter()
    images = generate_items(pipe, items, **call)
    seconds = time.perf_counter() - t0
    results = [(it, score(im, it.prompt)) for it, im in zip(items, images)]
    table = format_table(results)
    single = time_single_image(pipe, "a red circle on a white background", **call)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = len(items) // seeds  # the sheet shows the first seed of each prompt
    contact_sheet(images[:first], [it.prompt for it in items[:first]], [r.ok for _, r in results[:first]],
                  out / "contact_sheet.png")
    summary = {
        "model": pipe.model_path,
        "items": len(items),
        "seeds_per_prompt": seeds,
        "accuracy": accuracy_table(results),
        "seconds_per_image_batched": seconds / len(items),
        "seconds_single_image": single,
        "settings": {k: v for k, v in {**call, "quantize": quantize}.items() if v is not None},
        "torch_threads": torch.get_num_threads(),
        "per_item": [{"prompt": it.prompt, "kind": it.kind, "seed": it.seed, "ok": r.ok, "reason": r.reason}
                     for it, r in results],
    }
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"\none image end to end (batch 1, model loaded): {single:.3f} s median; "
          f"batched eval: {summary['seconds_per_image_batched']:.3f} s/image; {torch.get_num_threads()} threads")
    print(f"contact sheet: {out / 'contact_sheet.png'}")
    return summary


def parse_steps(text: str) -> list[int]:
    """"1,2,4,8,28" -> [1, 2, 4, 8, 28]; one clear error for anything else."""
    try:
        steps = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        steps = []
    if not steps or any(s < 1 for s in steps):
        raise ValueError(f"--steps-sweep takes whole step counts >= 1 separated by commas (e.g. 1,2,4,8,28), "
                         f"got {text!r}")
    return steps


def run_steps_sweep(model: str | None, steps: list[int], out_dir: str = "out/eval", limit: int | None = None,
                    seeds: int = 1, **settings) -> dict:
    """Accuracy per kind and seconds per image at each step count, one table (`fluxion eval --steps-sweep`):
    how far a model's quality holds as the steps fall (a distilled model should hold at 1-4)."""
    from ..pipelines import FluxPipeline

    items = _items(limit, seeds)
    pipe = FluxPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for n in steps:
        call = {"num_inference_steps": n, **{k: v for k, v in settings.items() if v is not None}}
        t0 = time.perf_counter()
        images = generate_items(pipe, items, **call)
        seconds = (time.perf_counter() - t0) / len(items)
        acc = accuracy_table([(it, score(im, it.prompt)) for it, im in zip(items, images)])
        rows.append({"steps": n, "accuracy": acc, "seconds_per_image_batched": seconds,
                     "seconds_single_image": time_single_image(pipe, "a red circle on a white background", repeats=3,
                                                               **call)})
    kinds = list(rows[0]["accuracy"])
    lines = ["| steps | " + " | ".join(kinds) + " | s/image (batched) | s/image (alone) |",
             "|---:|" + "---:|" * (len(kinds) + 2)]
    for r in rows:
        lines.append(f"| {r['steps']} | " + " | ".join(f"{100 * r['accuracy'][k]:.1f}%" for k in kinds)
                     + f" | {r['seconds_per_image_batched']:.3f} | {r['seconds_single_image']:.3f} |")
    table = "\n".join(lines)
    summary = {"model": pipe.model_path, "items": len(items), "seeds_per_prompt": seeds, "settings": settings, "sweep": rows,
               "torch_threads": torch.get_num_threads()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "steps_sweep.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"\n{len(items)} images ({len(items) // seeds} prompts x {seeds} seeds); {torch.get_num_threads()} threads; {out / 'steps_sweep.json'}")
    return summary
