"""Guidance over time: `guidance_scale` (distilled guidance) and `true_cfg_scale` as a number, a list with one
value per step, a callable `(step, sigma) -> value`, or a named preset.

Presets ("high guidance early to anchor the composition, lower late"): `constant(v)`, `linear(start, end)`,
`cosine(start, end)`, `step(high, low, at=0.5)`; on the command line "linear:7:2", "cosine:7:2",
"step:7:2:0.4", "constant:3.5" (`parse`). Progress runs from 0 at the first step run to 1 at the last.
`guidance_start` / `guidance_end` (fractions of the steps, as diffusers' guiders) switch true CFG off outside
the window: there the negative prompt is not run at all.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Preset:
    kind: str  # constant, linear, cosine, step
    start: float
    end: float
    at: float = 0.5  # step presets: the fraction of the steps after which `end` applies

    def value(self, progress: float) -> float:
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return self.start + (self.end - self.start) * progress
        if self.kind == "cosine":  # eases out of start and into end
            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.start if progress < self.at else self.end

    def __str__(self) -> str:
        if self.kind == "constant":
            return f"constant:{self.start:g}"
        return f"{self.kind}:{self.start:g}:{self.end:g}" + (f":{self.at:g}" if self.kind == "step" else "")


def constant(value: float) -> Preset:
    return Preset("constant", float(value), float(value))


def linear(start: float, end: float) -> Preset:
    return Preset("linear", float(start), float(end))


def cosine(start: float, end: float) -> Preset:
    return Preset("cosine", float(start), float(end))


def step(high: float, low: float, at: float = 0.5) -> Preset:
    if not 0 <= at <= 1:
        raise ValueError(f"a step schedule switches at a fraction in [0, 1], got {at!r}")
    return Preset("step", float(high), float(low), float(at))


PRESETS = {"constant": (constant, 1), "linear": (linear, 2), "cosine": (cosine, 2), "step": (step, 3)}
GuidanceValue = float | Sequence[float] | Callable[[int, float], float] | Preset | str


def parse(text: str) -> Preset:
    """'linear:7:2' -> linear(7, 2); a plain number -> constant."""
    kind, *nums = str(text).strip().split(":")
    try:
        if not nums and kind not in PRESETS:
            nums, kind = [kind], "constant"
        make, most = PRESETS[kind]
        values = [float(n) for n in nums]
        if not 1 <= len(values) <= most or (kind in ("linear", "cosine") and len(values) != 2):
            raise ValueError
        if not all(math.isfinite(v) for v in values):  # "nan", "linear:inf:2"
            raise ValueError
        return make(*values)
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"guidance schedule {text!r} is not one of: a number, constant:V, linear:START:END, "
                         f"cosine:START:END, step:HIGH:LOW[:AT]") from None


def per_step(value: GuidanceValue, schedule: Tensor, t_start: int, name: str) -> list[float]:
    """One float per step run (schedule[t_start:-1]); a list may have one value per step run, or one per step of
    the full schedule (then the run's tail is used)."""
    if isinstance(value, str):
        value = parse(value)
    n_all = len(schedule) - 1
    run = n_all - t_start
    sigmas = schedule[t_start:-1].tolist()
    if isinstance(value, Preset):
        out = [value.value(i / (run - 1) if run > 1 else 0.0) for i in range(run)]
    elif callable(value):
        out = [float(value(i, s)) for i, s in enumerate(sigmas)]
    elif isinstance(value, (list, tuple)):
        out = [float(v) for v in (value if len(value) == run else value[t_start:])]
    else:
        out = [float(value)] * run
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name} must give finite numbers at every step, got {bad[0]!r}")
    return out


def check(value: GuidanceValue, steps: int, run: int, name: str) -> None:
    """Argument check before any model runs (a callable is checked when it is evaluated): a list has one value
    per step run (`run`), or one per step of the full schedule (`steps`)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, a list, a callable or a preset, got {value!r}")
    if isinstance(value, str):
        try:
            parse(value)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    elif isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    elif isinstance(value, (list, tuple)):
        if len(value) not in (steps, run):
            also = f" ({run} run after the strength cut)" if run != steps else ""
            raise ValueError(f"{name} has {len(value)} values but there are {steps} steps{also}: give one value "
                             "per step")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise ValueError(f"{name} values must be finite numbers, got {list(value)!r}")
    elif isinstance(value, Preset):
        if not all(math.isfinite(v) for v in (value.start, value.end, value.at)):
            raise ValueError(f"{name} must be finite, got the preset {value}")
    elif not callable(value):
        raise ValueError(f"{name} must be a number, a list, a callable (step, sigma) -> value or a preset, "
                         f"got {type(value).__name__}")


def check_window(start: float, end: float) -> None:
    if not (isinstance(start, (int, float)) and isinstance(end, (int, float)) and 0 <= start < end <= 1):
        raise ValueError(f"guidance_start and guidance_end must be fractions with 0 <= start < end <= 1, "
                         f"got {start!r} and {end!r}")


def window(values: list[float], start: float, end: float) -> list[float]:
    """True-CFG values with 1 (off) outside [start, end]: step i is inside unless i/N < start or (i+1)/N > end."""
    n = len(values)
    return [v if not (i / n < start or (i + 1) / n > end) else 1.0 for i, v in enumerate(values)]


def may_exceed_one(value: GuidanceValue) -> bool:
    """Whether true CFG may run at some step (decided before the schedule exists)."""
    if isinstance(value, str):
        value = parse(value)
    if isinstance(value, Preset):
        return max(value.start, value.end) > 1
    if isinstance(value, (list, tuple)):
        return any(float(v) > 1 for v in value)
    if callable(value):
        return True
    return float(value) > 1


def describe(value: GuidanceValue):
    """The value as the PNG metadata records it."""
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (str, Preset)):
        return str(parse(value) if isinstance(value, str) else value)
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return getattr(value, "__name__", "callable")
