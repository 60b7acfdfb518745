"""Evaluation reporting: per-kind accuracy tables and contact sheets."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Sequence, Union

from PIL import Image, ImageDraw, ImageFont

from fluxion.files import atomic_path
from fluxion.eval.prompts import EVAL_KINDS, EvalItem
from fluxion.eval.scorer import ScoreResult

Results = Sequence[tuple[EvalItem, ScoreResult]]


def _counts(results: Results) -> dict[str, tuple[int, int]]:
    """kind -> (correct, total), known kinds first, then any others, then "overall"."""
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for item, res in results:
        for key in (item.kind, "overall"):
            tally[key][0] += int(bool(res.ok))
            tally[key][1] += 1
    order = [k for k in EVAL_KINDS if k in tally]
    order += sorted(k for k in tally if k not in EVAL_KINDS and k != "overall")
    order += ["overall"] if "overall" in tally else []
    return {k: (tally[k][0], tally[k][1]) for k in order}


def accuracy_table(results: Results) -> dict[str, float]:
    """kind -> accuracy in [0, 1], plus an "overall" entry (absent when there are no results)."""
    return {k: c / n for k, (c, n) in _counts(results).items()}


def format_table(results: Results) -> str:
    """Markdown table: kind | correct | total | accuracy | standard error, with an overall row.

    The standard error is the binomial one, sqrt(p (1 - p) / n) in points: the noise of a kind's score from which
    items happened to be drawn, so two models' scores that differ by less than about two of it are not told apart.
    (With several seeds per prompt the items are not independent in their prompts, so it is then a lower bound.)
    """
    lines = ["| kind | correct | total | accuracy | s.e. |", "|---|---:|---:|---:|---:|"]
    for k, (c, n) in _counts(results).items():
        name = f"**{k}**" if k == "overall" else k
        p = c / n
        lines.append(f"| {name} | {c} | {n} | {100 * p:.1f}% | {100 * (p * (1 - p) / n) ** 0.5:.1f} |")
    return "\n".join(lines)


def _font(size: int) -> Union[ImageFont.FreeTypeFont, ImageFont.ImageFont]:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; the last line is cut with an ellipsis if needed."""
    lines: list[str] = []
    words = text.split()
    cur = ""
    while words:
        trial = f"{cur} {words[0]}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
            words.pop(0)
        else:
            lines.append(cur)
            cur = ""
            if len(lines) == max_lines:
                break
    if cur and len(lines) < max_lines:
        lines.append(cur)
    if words or (lines and draw.textlength(lines[-1], font=font) > width):
        last = lines[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def contact_sheet(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    ok: Sequence[bool],
    path: Union[str, os.PathLike],
    columns: int = 10,
    thumb: int = 128,
    frame: int = 3,
    caption_lines: int = 3,
) -> str:
    """Write a PNG grid: each image in a green (ok) / red frame with its caption below.

    Written to a temp file in the target directory and renamed, so readers never see a
    partial file.
    """
    if not (len(images) == len(captions) == len(ok)):
        raise ValueError("images, captions and ok must have the same length")
    font = _font(10)
    line_h = 12
    pad = 4
    cell_w = thumb + 2 * frame + 2 * pad
    cell_h = thumb + 2 * frame + 2 * pad + caption_lines * line_h
    cols = max(1, min(columns, len(images)))
    rows = max(1, -(-len(images) // cols))
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (img, cap, good) in enumerate(zip(images, captions, ok)):
        x = (i % cols) * cell_w + pad
        y = (i // cols) * cell_h + pad
        color = (30, 160, 60) if good else (210, 30, 30)
        draw.rectangle((x, y, x + thumb + 2 * frame - 1, y + thumb + 2 * frame - 1), fill=color)
        sheet.paste(img.convert("RGB").resize((thumb, thumb), Image.BILINEAR), (x + frame, y + frame))
        ty = y + thumb + 2 * frame + 1
        for j, line in enumerate(_wrap(draw, cap, font, thumb + 2 * frame, caption_lines)):
            draw.text((x, ty + j * line_h), line, fill=(0, 0, 0), font=font)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
