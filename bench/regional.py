"""Regional prompts on fluxion-mini (#15): does each object land in its region?

Base prompt "a red circle and a blue square on a white background" (both objects, no placement; the caption
style fluxion-mini was trained on), regional prompts "a red circle" on the left half and "a blue square" on the
right half (white = the region). The same seeds without regional prompts are the baseline. fluxion-mini's
defaults: 128x128, 28 steps, true CFG 3 with an empty negative prompt.

An object "lies in its region" when the eval detector (`fluxion.eval.scorer.detect_objects`, what `fluxion eval`
scores with) finds it, colour and shape, and every detection of it has its centre in its half; "both" is the
headline (the issue's target: >= 80% of 50 seeds). Two more columns: "colours" (a red object found and all red
objects in the left half, a blue one and all blue ones in the right half, whatever their shape) and "clean
scene" (`fluxion eval`'s verdict for "a red circle left of a blue square": exactly those two objects, in that
arrangement). Each --sweep row runs the same seeds with other regional_base_ratio / regional_steps, two of them
with "on a white background" added to each regional prompt (each region otherwise picks its own background).

    nohup .venv/bin/python bench/regional.py --sweep > bench/out/regional.log 2>&1 &   # 50 seeds, table, picture
    .venv/bin/python bench/regional.py --seeds 3 --no-write                             # a dry run
    .venv/bin/python bench/regional.py --seeds 16 --first-seed 1000 --sweep --no-write  # tuning seeds
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fluxion import FluxPipeline
from fluxion.data.shapes import CANVAS
from fluxion.eval.report import contact_sheet
from fluxion.eval.scorer import to_canvas, detect_objects, score

ROOT = Path(__file__).resolve().parents[1]
BASE = "a red circle and a blue square on a white background"
REGIONS = (("a red circle", "red", "circle", "left"), ("a blue square", "blue", "square", "right"))
STRICT = "a red circle left of a blue square"
WHITE = " on a white background"
# (regional_base_ratio, regional_steps, added to each regional prompt)
SWEEP = [(0.1, 9, ""), (0.3, 14, ""), (0.5, 28, ""), (0.2, 4, ""), (0.0, 9, ""), (0.2, None, WHITE), (0.3, 14, WHITE)]
COLUMNS = ("red circle", "blue square", "both", "colours", "clean scene")


def half(side: str, size: int = 128) -> np.ndarray:
    """An image-size mask: white (1) on the left or right half."""
    m = np.zeros((size, size), np.float32)
    m[:, : size // 2] = 1
    return m if side == "left" else 1 - m


def _inside(objs, side: str) -> bool:
    return bool(objs) and all((o.cx < CANVAS / 2) == (side == "left") for o in objs)


def judge(image) -> dict:
    objs = detect_objects(to_canvas(image))
    out = {f"{c} {s}": _inside([o for o in objs if o.color == c and o.shape == s], side) for _, c, s, side in REGIONS}
    out["both"] = all(out.values())
    out["colours"] = all(_inside([o for o in objs if o.color == c], side) for _, c, _, side in REGIONS)
    out["clean scene"] = score(image, STRICT).ok
    out["found"] = ", ".join(f"{o.color} {o.shape}@x={o.cx:.0f}" for o in objs) or "nothing"
    return out


def generate(pipe, seeds: list[int], batch: int, **kw) -> list:
    """One image per seed (each its own generator: batching changes nothing)."""
    images = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start : start + batch]
        images += pipe([BASE] * len(chunk), generator=[torch.Generator().manual_seed(s) for s in chunk], **kw).images
    return images


def row(name: str, verdicts: list[dict], seconds: float) -> str:
    n = len(verdicts)
    cells = []
    for k in COLUMNS:
        c = sum(v[k] for v in verdicts)
        cells.append(f"**{100 * c / n:.0f}%** ({c}/{n})" if k == "both" else f"{100 * c / n:.0f}% ({c}/{n})")
    return f"| {name} | " + " | ".join(cells) + f" | {seconds / n:.2f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--base-ratio", type=float, default=0.2, help="regional_base_ratio (default: the pipeline's)")
    ap.add_argument("--regional-steps", type=int, default=None, help="regional_steps (default: the pipeline's, "
                    "a third of the steps)")
    ap.add_argument("--sweep", action="store_true", help="also rows for other base ratios / regional steps")
    ap.add_argument("--batch", type=int, default=10, help="images per call")
    ap.add_argument("--grid-seeds", type=int, default=8, help="seeds shown in the picture")
    ap.add_argument("--no-write", action="store_true", help="print only (dry runs, tuning)")
    args = ap.parse_args()

    pipe = FluxPipeline.from_pretrained()  # the shipped fluxion-mini, with its defaults
    pipe.set_progress_bar_config(disable=True)
    d = pipe.defaults
    side = d.sample_size * pipe.vae_scale_factor
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    masks = [half(s, side) for *_, s in REGIONS]
    configs = [(args.base_ratio, args.regional_steps, "")] + (SWEEP if args.sweep else [])

    t0 = time.perf_counter()
    plain = generate(pipe, seeds, args.batch)
    results = [("without regional prompts (baseline)", [judge(im) for im in plain], time.perf_counter() - t0)]
    print(row(*results[0]), file=sys.stderr, flush=True)
    shown_runs = {}  # picture rows: the first regional run, and the defaults with the background named
    for ratio, steps, suffix in configs:
        t0 = time.perf_counter()
        images = generate(pipe, seeds, args.batch, regional_prompts=[p + suffix for p, *_ in REGIONS],
                          regional_masks=masks, regional_base_ratio=ratio, regional_steps=steps)
        if not shown_runs or (ratio, steps, suffix) == (0.2, None, WHITE):
            shown_runs[len(results)] = images
        used = max(1, d.num_inference_steps // 3) if steps is None else steps
        default = ratio == 0.2 and steps is None and not suffix
        name = f"regional, base ratio {ratio:g}, {used} regional steps" + (" (the defaults)" if default else "") + (
            f", regional prompts + \"{suffix.strip()}\"" if suffix else "")
        results.append((name, [judge(im) for im in images], time.perf_counter() - t0))
        print(row(*results[-1]), file=sys.stderr, flush=True)

    command = " ".join(["python bench/regional.py", *map(shlex.quote, sys.argv[1:])])
    lines = [
        f"# Regional prompts on fluxion-mini: {len(seeds)} seeds ({seeds[0]}-{seeds[-1]})", "",
        f"`{command}`", "",
        f"Base prompt \"{BASE}\"; regional prompts \"{REGIONS[0][0]}\" (left half) and \"{REGIONS[1][0]}\" (right "
        f"half); {side}x{side}, {d.num_inference_steps} steps, true CFG {d.true_cfg_scale:g} with an empty negative "
        f"prompt; {torch.get_num_threads()} threads. An object counts when the eval detector finds it (colour and "
        "shape) with its centre in its half; **both** is the headline (target >= 80%). *colours*: the red objects "
        f"all left and the blue ones all right, any shape. *clean scene*: `fluxion eval`'s verdict for \"{STRICT}\".",
        "",
        "| run | red circle in the left half | blue square in the right half | both | colours | clean scene "
        "| s/image |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(row(*r) for r in results),
    ]
    table = "\n".join(lines)
    print(table)
    for name, verdicts, _ in results:
        print(f"\n{name}:", file=sys.stderr)
        for s, v in zip(seeds, verdicts):
            print(f"  seed {s}: both={v['both']} colours={v['colours']}: {v['found']}", file=sys.stderr)
    if args.no_write:
        return
    out = ROOT / "bench" / "out" / "regional.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    n = min(args.grid_seeds, len(seeds))
    shown = seeds[:n]
    rows = [(0, "", plain), *((i, "regional" + (" + white" if i > 1 else ""), ims) for i, ims in shown_runs.items())]
    picture = contact_sheet(
        [im for _, _, ims in rows for im in ims[:n]],
        [f"seed {s}" + (f", {label}" if label else "") for _, label, _ in rows for s in shown],
        [v["both"] for i, _, _ in rows for v in results[i][1][:n]],
        ROOT / "docs" / "images" / "regional.png", columns=n, caption_lines=1,
    )
    print(f"\nwrote {out.relative_to(ROOT)} and {Path(picture).relative_to(ROOT)}, one row per run: "
          + "; ".join(results[i][0] for i, _, _ in rows) + ". Green frame: both objects in their halves.")


if __name__ == "__main__":
    main()
