"""LoRA files out: the diffusers layout, which diffusers' `FluxPipeline.load_lora_weights` reads unchanged.

Keys: `transformer.<diffusers module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] (and
`text_encoder.text_model.<CLIP module>...` for CLIP adapters). Our fused layers are split back into
diffusers' separate modules exactly: a piece on a row block of a fused layer goes to the diffusers
module(s) owning those rows, with its A repeated and its B cut by rows (rows of a module a piece covers
only in part get zero rows in B); pieces of one adapter landing on the same diffusers module are joined
as one LoRA of the summed rank (A stacked, B side by side with each piece's scale folded in).

Safetensors metadata:
* `lora_adapter_metadata`: JSON of PEFT LoraConfig fields per component, as diffusers writes it
  (`transformer.r`, `transformer.lora_alpha`, `transformer.rank_pattern`, `transformer.alpha_pattern`,
  `transformer.target_modules` — a regex matching exactly the adapted modules), so diffusers computes
  the same alpha / r scales;
* `fluxion.adapter_name`, `fluxion.rank`, `fluxion.alpha`, `fluxion.targets` (JSON list of our layer names,
  with row blocks), `fluxion.base_model`, `format: pt`.
The write is atomic (temp file, then os.replace).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.safetensors_file import save_safetensors
from .formats import LORA_WEIGHT_NAME, METADATA_KEY, TEXT_ENCODER, TRANSFORMER, ClipNames, FluxNames
from .layers import LoraPiece, adapter_pieces, get_registry


def _number(x: float):
    return int(round(x)) if abs(x - round(x)) < 1e-9 else float(x)


def _split(
    pieces: dict[str, list[LoraPiece]],
    parts_of,  # module -> [(export name, (row start, row stop), swap)]
    out_features,  # module -> int
    order,  # export name -> sort key
) -> dict[str, tuple[Tensor, Tensor, float]]:
    contrib: dict[str, list[tuple[Tensor, Tensor, float]]] = {}
    for module, plist in pieces.items():
        parts = parts_of(module)
        out_f = out_features(module)
        for p in plist:
            A, B = p.A.detach(), p.B.detach()
            pa, pb = p.row_span(out_f)
            for name, (sa, sb), swap in parts:
                lo, hi = max(pa, sa), min(pb, sb)
                if lo >= hi:
                    continue
                if lo == sa and hi == sb:
                    Bs = B[sa - pa : sb - pa]
                else:
                    Bs = B.new_zeros(sb - sa, B.shape[1])
                    Bs[lo - sa : hi - sa] = B[lo - pa : hi - pa]
                if swap:  # ours (shift; scale) -> diffusers (scale; shift)
                    half = Bs.shape[0] // 2
                    Bs = torch.cat([Bs[half:], Bs[:half]])
                contrib.setdefault(name, []).append((A, Bs, p.scale))
    out = {}
    for name in sorted(contrib, key=order):
        items = contrib[name]
        if len(items) == 1:
            A, B, scale = items[0]
            out[name] = (A.contiguous(), B.contiguous(), scale)
        else:  # several pieces on one module: one LoRA of the summed rank, scales folded into B
            A = torch.cat([a for a, _, _ in items], dim=0)
            B = torch.cat([(b.float() * s).to(b.dtype) for _, b, s in items], dim=1)
            out[name] = (A.contiguous(), B.contiguous(), 1.0)
    return out


def _peft_config(modules: dict[str, tuple[Tensor, Tensor, float]], optional_prefix: str = "") -> dict:
    """PEFT LoraConfig fields for these modules. Patterns are anchored ("^name") so PEFT matches each
    exactly (no suffix matches, e.g. `proj_out` vs `single_transformer_blocks.0.proj_out`);
    `optional_prefix` may be present or not in the model's module names (CLIP's `text_model.`, which
    transformers 5 dropped)."""
    ranks = {n: int(a.shape[0]) for n, (a, _, _) in modules.items()}
    alphas = {n: _number(s * ranks[n]) for n, (_, _, s) in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alphas.values()).most_common(1)[0][0]

    def pattern(n: str) -> str:
        if optional_prefix and n.startswith(optional_prefix):
            return f"(?:{re.escape(optional_prefix)})?{re.escape(n[len(optional_prefix):])}"
        return re.escape(n)

    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {f"^{pattern(n)}": v for n, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{pattern(n)}": v for n, v in alphas.items() if v != lora_alpha},
        "target_modules": "^(?:" + "|".join(pattern(n) for n in modules) + ")$",
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }


def transformer_lora_modules(transformer: nn.Module, adapter_name: str) -> dict[str, tuple[Tensor, Tensor, float]]:
    """{diffusers module: (A, B, scale)} for adapter `adapter_name` of our transformer."""
    flux = FluxNames(transformer)
    pieces = adapter_pieces(transformer, adapter_name)
    missing = [m for m in pieces if m not in flux.by_module]
    if missing:
        raise ValueError(f"{missing[0]} has no diffusers counterpart; this adapter cannot be saved in diffusers layout")
    names = list(flux.diffusers)
    return _split(
        pieces,
        lambda m: flux.by_module[m],
        lambda m: int(flux.linear[m].out_features),
        lambda n: names.index(n),
    )


def text_encoder_lora_modules(text_encoder: nn.Module, adapter_name: str) -> dict[str, tuple[Tensor, Tensor, float]]:
    clip = ClipNames(text_encoder)
    pieces = adapter_pieces(text_encoder, adapter_name)
    names = [ClipNames.export_name(n) for n in clip.linear]
    return _split(
        pieces,
        lambda m: [(ClipNames.export_name(m), (0, int(clip.linear[m].out_features)), False)],
        lambda m: int(clip.linear[m].out_features),
        lambda n: names.index(n),
    )


def lora_state_dict(
    transformer: nn.Module, adapter_name: str, text_encoder: nn.Module | None = None, dtype: torch.dtype | None = None
) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """(diffusers-layout tensors, {component: PEFT config fields}) of one adapter."""
    tensors: dict[str, Tensor] = {}
    configs: dict[str, dict] = {}
    parts = []
    treg = get_registry(transformer)
    if treg is not None and adapter_name in treg.adapters:
        parts.append((TRANSFORMER, transformer_lora_modules(transformer, adapter_name)))
    if text_encoder is not None:
        creg = get_registry(text_encoder)
        if creg is not None and adapter_name in creg.adapters:
            parts.append((TEXT_ENCODER, text_encoder_lora_modules(text_encoder, adapter_name)))
    if not parts:
        raise ValueError(f"no adapter named {adapter_name!r} to save")
    for comp, modules in parts:
        for name, (A, B, _) in modules.items():
            tensors[f"{comp}.{name}.lora_A.weight"] = A if dtype is None else A.to(dtype)
            tensors[f"{comp}.{name}.lora_B.weight"] = B if dtype is None else B.to(dtype)
        configs[comp] = _peft_config(modules, "text_model." if comp == TEXT_ENCODER else "")
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}  # no shared storage
    return tensors, configs


def save_lora_adapter(
    transformer: nn.Module,
    adapter_name: str,
    path: str | Path,
    base_model: str | None = None,
    text_encoder: nn.Module | None = None,
    weight_name: str = LORA_WEIGHT_NAME,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write adapter `adapter_name` as a diffusers LoRA file. `path` is a folder (the file is
    `weight_name` in it, `pytorch_lora_weights.safetensors` by default) or a `.safetensors` file path."""
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / weight_name
    tensors, configs = lora_state_dict(transformer, adapter_name, text_encoder, dtype)
    peft_meta = {f"{comp}.{k}": v for comp, cfg in configs.items() for k, v in cfg.items()}
    targets = []
    for comp, model in ((TRANSFORMER, transformer), (TEXT_ENCODER, text_encoder)):
        reg = get_registry(model) if model is not None else None
        if reg is None or adapter_name not in reg.adapters:
            continue
        for module, plist in adapter_pieces(model, adapter_name).items():
            for p in plist:
                rows = "" if p.rows is None else f"[{p.rows[0]}:{p.rows[1]}]"
                targets.append(f"{comp}.{module}{rows}")
    ranks = Counter(int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_A.weight"))
    metadata = {
        "format": "pt",
        METADATA_KEY: json.dumps(peft_meta, indent=2, sort_keys=True),
        "fluxion.adapter_name": adapter_name,
        "fluxion.rank": str(configs[next(iter(configs))]["r"]),
        "fluxion.ranks": json.dumps(dict(sorted(ranks.items()))),
        "fluxion.alpha": str(configs[next(iter(configs))]["lora_alpha"]),
        "fluxion.targets": json.dumps(targets),
        "fluxion.base_model": "" if base_model is None else str(base_model),
    }
    file.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, file, metadata=metadata)
    return file
