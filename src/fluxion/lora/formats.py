"""LoRA files in: every common layout, mapped onto fluxion's fused (original-layout) layers.

Layouts read (a file may mix them; each key is resolved on its own):

* diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r]
  (also without the `transformer.` prefix, or with PEFT's `base_model.model.`); scale alpha/r from
  per-module `.alpha` keys, else from the safetensors metadata `lora_adapter_metadata` (PEFT LoraConfig
  fields under `transformer.` / `text_encoder.`: r, lora_alpha, rank_pattern, alpha_pattern, use_rslora),
  else 1. Text-encoder parts: `text_encoder.<CLIP module>`.
* kohya (sd-scripts): `lora_unet_<original module, dots as underscores>.lora_down.weight` / `.lora_up.weight`
  / `.alpha` (scale alpha/r, 1 without alpha); `lora_transformer_<diffusers module as underscores>` (files
  diffusers calls "mixture"); CLIP parts `lora_te1_...` / `lora_te_...`.
* XLabs: `double_blocks.i.processor.{qkv,proj}_lora{1,2}.down.weight` / `.up.weight` (1 = image stream,
  2 = text stream), `single_blocks.i.processor.{qkv,proj}_lora` (q/k/v rows of linear1, and linear2); no
  alpha (scale 1, as XLabs' own code and diffusers).
* original keys (ComfyUI and other tools): `[model.]diffusion_model.<original module>.lora_A.weight` /
  `.lora_B.weight`, or `.lora_down.weight` / `.lora_up.weight`, with optional `.alpha`; ComfyUI CLIP
  parts `text_encoders.clip_l.transformer.<CLIP module>`.

T5 parts (`text_encoder_2.`, `lora_te2_`, `text_encoders.t5xxl.`) and CLIP modules the text encoder does
not have are skipped (the caller warns once with the count). Everything else that is not understood, and
every shape that does not fit, is a ValueError naming the first offending key, raised before anything
is attached.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.diffusers import transformer_module_map
from .layers import LoraPiece, is_linear

TRANSFORMER = "transformer"
TEXT_ENCODER = "text_encoder"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (JSON of PEFT config fields)


# ---------------------------------------------------------------- model naming


@dataclass(frozen=True)
class Target:
    module: str  # our (original-layout) module name
    rows: tuple[int, int] | None  # row block of that module, None = all rows
    swap: bool = False  # diffusers stores the two halves of the rows swapped (norm_out.linear)


class FluxNames:
    """The transformer's Linear layers under every name LoRA files use for them."""

    def __init__(self, transformer: nn.Module):
        cfg = transformer.config
        self.linear: dict[str, nn.Module] = {n: m for n, m in transformer.named_modules() if n and is_linear(m)}
        self._order = {n: i for i, n in enumerate(self.linear)}
        self.diffusers: dict[str, Target] = {}
        self.by_module: dict[str, list[tuple[str, tuple[int, int], bool]]] = {}  # ours -> diffusers parts
        module_map = transformer_module_map(cfg.depth, cfg.depth_single_blocks, cfg.guidance_embed)
        for orig, (sources, combine) in module_map.items():
            mod = self.linear.get(orig)
            if mod is None:
                continue
            out_f = int(mod.out_features)
            if combine == "cat":
                if len(sources) == 3:
                    sizes = [out_f // 3] * 3
                else:  # single block linear1: q, k, v (hidden each), then mlp
                    h = int(mod.in_features)
                    sizes = [h, h, h, out_f - 3 * h]
                start = 0
                for src, size in zip(sources, sizes):
                    self.diffusers[src] = Target(orig, (start, start + size))
                    self.by_module.setdefault(orig, []).append((src, (start, start + size), False))
                    start += size
            else:
                swap = combine == "swap_halves"
                self.diffusers[sources[0]] = Target(orig, None, swap)
                self.by_module.setdefault(orig, []).append((sources[0], (0, out_f), swap))
        self.kohya = {n.replace(".", "_"): n for n in self.linear}
        self.kohya_diffusers = {n.replace(".", "_"): n for n in self.diffusers}
        self.hidden = int(cfg.hidden_size)

    def order(self, module: str) -> int:
        return self._order.get(module, len(self._order))

    def original(self, name: str) -> Target | None:
        return Target(name, None) if name in self.linear else None

    def from_diffusers(self, name: str) -> Target | None:
        return self.diffusers.get(name)

    def xlabs(self, name: str) -> Target | None:
        m = re.fullmatch(r"double_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12])", name)
        if m:
            stream = "img" if m.group(3) == "1" else "txt"
            return self.original(f"double_blocks.{m.group(1)}.{stream}_attn.{m.group(2)}")
        m = re.fullmatch(r"single_blocks\.(\d+)\.processor\.(qkv|proj)_lora", name)
        if m:
            i = m.group(1)
            if m.group(2) == "proj":
                return self.original(f"single_blocks.{i}.linear2")
            mod = self.linear.get(f"single_blocks.{i}.linear1")
            return Target(f"single_blocks.{i}.linear1", (0, 3 * int(mod.in_features))) if mod is not None else None
        return None

    def match_target(self, target: str) -> list[tuple[str, tuple[int, int] | None]]:
        """Layers a training target names: diffusers names/suffixes first (row blocks), else ours."""
        hits = [
            (t.module, t.rows) for name, t in self.diffusers.items() if name == target or name.endswith("." + target)
        ]
        if not hits:
            hits = [(n, None) for n in self.linear if n == target or n.endswith("." + target)]
        return hits


class ClipNames:
    """The CLIP text model's Linear layers, found with or without the `text_model.` prefix (transformers 5
    dropped it from CLIPTextModel's module names; files written with transformers 4 have it)."""

    def __init__(self, model: nn.Module | None):
        self.linear: dict[str, nn.Module] = (
            {n: m for n, m in model.named_modules() if n and is_linear(m)} if model is not None else {}
        )
        self.kohya: dict[str, str] = {}
        for n in self.linear:
            for alias in (n, self.export_name(n)):
                self.kohya[alias.replace(".", "_")] = n

    def resolve(self, name: str) -> str | None:
        if name in self.linear:
            return name
        if name.startswith("text_model.") and name[len("text_model."):] in self.linear:
            return name[len("text_model."):]
        if f"text_model.{name}" in self.linear:
            return f"text_model.{name}"
        return None

    @staticmethod
    def export_name(name: str) -> str:
        """The name files use: `text_model.encoder.layers...` (transformers 4 / diffusers / kohya)."""
        return name if name.startswith("text_model.") else f"text_model.{name}"


# ---------------------------------------------------------------- reading sources

_KNOWN_LOAD_KWARGS = {
    "subfolder", "use_safetensors", "local_files_only", "cache_dir", "force_download", "proxies", "token",
    "revision", "low_cpu_mem_usage", "return_lora_metadata", "metadata",
}


def read_lora_source(src, weight_name: str | None = None, subfolder: str | None = None):
    """(tensors, safetensors metadata, description) from a dict, a file, or a folder + weight_name."""
    if isinstance(src, Mapping):
        bad = next((k for k, v in src.items() if not isinstance(k, str) or not isinstance(v, Tensor)), None)
        if bad is not None:
            raise ValueError(f"a LoRA state dict maps key strings to tensors; entry {bad!r} does not")
        return dict(src), {}, "state_dict"
    if not isinstance(src, (str, Path)):
        raise ValueError(f"load a LoRA from a file, a folder or a state dict, not a {type(src).__name__}")
    path = Path(src)
    if subfolder:
        path = path / subfolder
    if path.is_dir():
        if weight_name:
            path = path / weight_name
        elif (path / LORA_WEIGHT_NAME).is_file():
            path = path / LORA_WEIGHT_NAME
        else:
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                raise ValueError(
                    f"{path}: found {len(found)} .safetensors files and no {LORA_WEIGHT_NAME}; pass weight_name="
                )
            path = found[0]
    if not path.is_file():
        raise ValueError(f"{path}: no such LoRA file or folder (fluxion reads local files; download hub repos first)")
    if path.suffix == ".safetensors":
        from ..checkpoints.safetensors_file import SafetensorsFile

        f = SafetensorsFile(path)
        return {k: f.get(k) for k in f.keys()}, dict(f.metadata), str(path)
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a LoRA file we can read"
        raise ValueError(f"{path}: not a readable LoRA file ({type(e).__name__}: {e})") from None
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a LoRA state dict")
    return read_lora_source(sd)[0], {}, str(path)


def peft_configs(metadata: Mapping[str, str] | None) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` split per component: {"transformer": {r, lora_alpha, ...}, ...}."""
    if not metadata:
        return {}
    raw = metadata.get(METADATA_KEY) if METADATA_KEY in metadata else None
    if raw is None:
        # a caller may pass the already-parsed dict (diffusers' `metadata=` kwarg)
        if any(k.startswith((f"{TRANSFORMER}.", f"{TEXT_ENCODER}.")) for k in metadata):
            cfg = dict(metadata)
        else:
            return {}
    else:
        try:
            cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
        except ValueError as e:
            raise ValueError(f"the file's {METADATA_KEY!r} metadata is not valid JSON ({e})") from None
    out: dict[str, dict] = {}
    for k, v in cfg.items():
        comp, _, field_name = k.partition(".")
        if field_name:
            out.setdefault(comp, {})[field_name] = v
    return out


def _pattern_value(patterns: Mapping[str, object] | None, module: str):
    """PEFT's rank/alpha pattern lookup: the first key `k` with re.match(rf"(.*\\.)?({k})$", module)."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            if key == module or module.endswith("." + key):
                return value
    return None


# ---------------------------------------------------------------- parsing

_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_down.weight", "A"),
    (".lora_up.weight", "B"),
    (".alpha", "alpha"),
)
_XLABS_SUFFIXES = ((".down.weight", "A"), (".up.weight", "B"))
_UNSUPPORTED = (  # (test on the key, what it is)
    (lambda k: k.endswith("dora_scale") or "lora_magnitude_vector" in k, "DoRA"),
    (lambda k: k.endswith((".lora_B.bias", ".lora_up.bias", ".lora_A.bias", ".lora_down.bias")), "LoRA biases"),
    (lambda k: ".lora_mid." in k, "LoCon/LyCORIS"),
    (lambda k: ".hada_" in k, "LoHa/LyCORIS"),
    (lambda k: ".lokr_" in k, "LoKr/LyCORIS"),
    (lambda k: k.endswith((".diff", ".diff_b")), "full weight / bias differences"),
)


@dataclass
class _Resolved:
    component: str
    target: Target
    layout: str


@dataclass
class ParsedLora:
    pieces: dict[str, dict[str, list[LoraPiece]]] = field(default_factory=dict)  # component -> module -> pieces
    layouts: set[str] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)  # keys of text-encoder parts that cannot be applied


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, kind in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    if ".processor." in key:
        for suffix, kind in _XLABS_SUFFIXES:
            if key.endswith(suffix):
                return key[: -len(suffix)], kind
    return None


def _resolve(stem: str, flux: FluxNames, clip: ClipNames, has_clip: bool):
    """-> _Resolved, or a str (a reason to skip: a text-encoder part we cannot apply), or None (unknown)."""

    def te(name: str | None, layout: str):
        if not has_clip:
            return "no CLIP text encoder in this pipeline"
        if name is None:
            return "not a Linear layer of the CLIP text encoder"
        return _Resolved(TEXT_ENCODER, Target(name, None), layout)

    def tr(target: Target | None, layout: str):
        return _Resolved(TRANSFORMER, target, layout) if target is not None else None

    if stem.startswith("transformer."):
        rest = stem[len("transformer."):]
        return tr(flux.from_diffusers(rest), "diffusers") or tr(flux.original(rest), "original")
    if stem.startswith("base_model.model."):
        return tr(flux.from_diffusers(stem[len("base_model.model."):]), "diffusers")
    if stem.startswith("text_encoder_2.") or stem.startswith("lora_te2_") or stem.startswith("text_encoders.t5xxl."):
        return "T5 text encoder (fluxion applies LoRA to the transformer and CLIP only)"
    if stem.startswith("text_encoder."):
        return te(clip.resolve(stem[len("text_encoder."):]), "diffusers")
    if stem.startswith("text_encoders.clip_l.transformer."):
        return te(clip.resolve(stem[len("text_encoders.clip_l.transformer."):]), "original")
    if stem.startswith("lora_unet_"):
        name = flux.kohya.get(stem[len("lora_unet_"):])
        return tr(flux.original(name) if name else None, "kohya")
    if stem.startswith("lora_transformer_"):
        name = flux.kohya_diffusers.get(stem[len("lora_transformer_"):])
        return tr(flux.from_diffusers(name) if name else None, "kohya")
    for prefix in ("lora_te1_", "lora_te_"):
        if stem.startswith(prefix):
            return te(clip.kohya.get(stem[len(prefix):]), "kohya")
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            break
    if ".processor." in stem:
        return tr(flux.xlabs(stem), "xlabs")
    return tr(flux.original(stem), "original") or tr(flux.from_diffusers(stem), "diffusers")


def parse_lora_state_dict(
    state_dict: Mapping[str, Tensor],
    transformer: nn.Module,
    text_encoder: nn.Module | None = None,
    metadata: Mapping[str, str] | None = None,
    strict: bool = True,
) -> ParsedLora:
    """Map a LoRA state dict onto the models' layers, checking every key and shape (nothing is attached).

    Raises ValueError naming the first offending key (in the state dict's order) for: a key no layout
    knows (unless strict=False: then it is skipped too), an unsupported kind (DoRA, LyCORIS, biases),
    a lora_A without its lora_B (or the reverse), and shapes that do not fit the layer.
    """
    flux = FluxNames(transformer)
    clip = ClipNames(text_encoder)
    configs = peft_configs(metadata)
    keys = list(state_dict)
    position = {k: i for i, k in enumerate(keys)}
    problems: list[tuple[int, str]] = []
    groups: dict[str, dict] = {}
    parsed = ParsedLora()
    unknown: list[str] = []

    for key in keys:
        bad_kind = next((what for test, what in _UNSUPPORTED if test(key)), None)
        split = _split_key(key) if bad_kind is None else None
        if bad_kind is not None:
            if strict:
                problems.append((position[key], f"{key}: {bad_kind} weights are not supported (plain LoRA only)"))
            else:
                unknown.append(key)
            continue
        resolved = _resolve(split[0], flux, clip, text_encoder is not None) if split else None
        if isinstance(resolved, str):
            parsed.skipped.append(key)
            continue
        if resolved is None:
            if strict:
                problems.append((position[key], (
                    f"{key}: not a LoRA key of any layout fluxion reads (diffusers/PEFT, kohya, XLabs, original "
                    "keys) for a layer of this model"
                )))
            else:
                unknown.append(key)
            continue
        stem, kind = split
        g = groups.setdefault(stem, {"resolved": resolved})
        g[kind] = key

    for stem, g in groups.items():
        res: _Resolved = g["resolved"]
        first = min(position[g[k]] for k in ("A", "B", "alpha") if k in g)
        if "A" not in g or "B" not in g:
            have = g.get("A") or g.get("B") or g.get("alpha")
            need = "up/B" if "A" in g else "down/A" if "B" in g else "down/A and up/B"
            problems.append((first, f"{have}: its LoRA {need} weight is missing from the file"))
            continue
        a_key, b_key = g["A"], g["B"]
        A, B = state_dict[a_key], state_dict[b_key]
        module = (flux.linear if res.component == TRANSFORMER else clip.linear)[res.target.module]
        in_f, out_f = int(module.in_features), int(module.out_features)
        lo, hi = res.target.rows if res.target.rows is not None else (0, out_f)
        where = f"{res.component} layer {res.target.module}" + (
            f" rows [{lo}:{hi}]" if res.target.rows is not None else ""
        )
        rank = A.shape[0] if A.ndim == 2 else None
        if A.ndim != 2 or A.shape[1] != in_f:
            problems.append((position[a_key], (
                f"{a_key}: shape {list(A.shape)} does not fit {where} (expected [rank, {in_f}])"
            )))
            continue
        if B.ndim != 2 or tuple(B.shape) != (hi - lo, rank):
            problems.append((position[b_key], (
                f"{b_key}: shape {list(B.shape)} does not fit {where} (expected [{hi - lo}, {rank}])"
            )))
            continue
        scale = _scale(g, state_dict, res, rank, configs, problems, position)
        if scale is None:
            continue
        weight = getattr(module, "weight", None)
        # A quantized layer's weight is not a tensor but reports the dtype it computes in.
        dtype = getattr(weight, "dtype", torch.float32)
        dtype = dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float32
        device = getattr(weight, "device", torch.device("cpu"))
        A = A.to(device=device, dtype=dtype, copy=True)
        B = B.to(device=device, dtype=dtype, copy=True)
        if res.target.swap:  # diffusers' norm_out.linear: (scale; shift) rows, ours (shift; scale)
            half = B.shape[0] // 2
            B = torch.cat([B[half:], B[:half]])
        piece = LoraPiece(A, B, scale, res.target.rows)
        parsed.pieces.setdefault(res.component, {}).setdefault(res.target.module, []).append(piece)
        parsed.layouts.add(res.layout)

    if problems:
        raise ValueError(min(problems)[1])
    parsed.skipped += unknown
    if not parsed.pieces:
        if parsed.skipped:
            raise ValueError(
                f"nothing to load: all {len(parsed.skipped)} LoRA keys are parts fluxion cannot apply "
                f"(first: {parsed.skipped[0]})"
            )
        raise ValueError("the LoRA state dict is empty" if not keys else f"{keys[0]}: no LoRA weights found")
    return parsed


def _scale(g, state_dict, res: _Resolved, rank: int, configs, problems, position) -> float | None:
    cfg = configs.get(res.component, {}) if res.layout == "diffusers" else {}
    rs = bool(cfg.get("use_rslora", False))
    if "alpha" in g:
        t = state_dict[g["alpha"]]
        if not isinstance(t, Tensor) or t.numel() != 1:
            problems.append((position[g["alpha"]], f"{g['alpha']}: an alpha must be one number, got shape "
                                                   f"{list(getattr(t, 'shape', []))}"))
            return None
        alpha = float(t.float().item())
    elif cfg and ("lora_alpha" in cfg or "alpha_pattern" in cfg):
        # the diffusers/PEFT module name this piece came from
        module = _peft_module_name(g)
        alpha = _pattern_value(cfg.get("alpha_pattern"), module)
        alpha = float(cfg.get("lora_alpha", rank) if alpha is None else alpha)
    else:
        return 1.0
    if not math.isfinite(alpha):
        problems.append((position[g.get("alpha", g["A"])], f"{g.get('alpha', g['A'])}: alpha {alpha} is not finite"))
        return None
    return alpha / math.sqrt(rank) if rs else alpha / rank


def _peft_module_name(g) -> str:
    stem = g["A"][: -len(".lora_A.weight")] if g["A"].endswith(".lora_A.weight") else g["A"].rsplit(".", 2)[0]
    for prefix in ("transformer.", "text_encoder.", "base_model.model."):
        if stem.startswith(prefix):
            return stem[len(prefix):]
    return stem
