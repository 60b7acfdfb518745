"""LoRA adapters on the Linear layers of a model, several named adapters at once.

How it works
------------
An adapted layer keeps its class, its parameters and its `state_dict` keys: we register a forward hook
that adds the active adapters' low-rank updates to the layer's output, and keep the adapters in a plain
(unregistered) object on the layer. So `model.state_dict()` stays the base model's, and no load or switch
ever touches, copies or reloads the base weights (only `fuse_lora` writes into them, and keeps the
original rows to restore them bit-exactly).

An adapter on a layer is a list of `LoraPiece`s. A piece is one low-rank update `scale * B @ A` on a
block of ROWS of the layer's output (`rows=None`: all rows). This is how FLUX's fused layers are handled
exactly: a diffusers LoRA on `attn.to_k` of a double block is a piece on rows [h:2h] of our fused
`img_attn.qkv`; LoRAs on to_q/to_k/to_v of a single block are three pieces on rows [0:h], [h:2h], [2h:3h]
of `linear1`, leaving its mlp rows alone; a kohya LoRA on the fused qkv is one piece on all rows.
Pieces with different A matrices stay separate, so nothing is approximated and saving splits back exactly.

Forward of an adapted layer:  y = base(x) + sum over active, unfused adapters a of
    weight_a * sum over pieces p of a:  (p.scale * (x @ p.A.T) @ p.B.T)  added to rows p.rows of y
with `weight_a` the user weight from `set_adapters` and `p.scale = alpha / rank`.

Mixed-adapter batching: while `SAMPLE_WEIGHTS` is set (`LoraMixin.lora_per_sample`), `weight_a` is a
per-sample vector instead (one value per image; rows of the layer's batch dim, repeated when true CFG stacks
[cond; uncond]), the adapters applied are those it names, and unset (the common path) nothing changes.

State lives in an `AdapterRegistry` on the model's root module (shared by all its adapted layers):
the adapters' descriptions, the active list and weights, the enabled flag and what is fused.
"""
from __future__ import annotations

import logging
import math
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

LAYER_ATTR = "_fluxion_lora"
REGISTRY_ATTR = "_fluxion_lora_registry"

#: The targets of diffusers' FLUX DreamBooth-LoRA recipe (train_dreambooth_lora_flux.py, its default
#: `target_modules` when --lora_layers is not given), as diffusers module-name suffixes. PEFT matches a
#: suffix against every module, so `attn.to_q/to_k/to_v` also hit the single blocks' q/k/v projections.
#: In fluxion's fused layout this is: double blocks' img_attn.qkv, txt_attn.qkv (three q/k/v pieces each),
#: img_attn.proj, txt_attn.proj, img_mlp.0, img_mlp.2, txt_mlp.0, txt_mlp.2, and the q/k/v row blocks of
#: single blocks' linear1 (not its mlp rows, not linear2, not the modulations or embedders).
DEFAULT_TARGETS: tuple[str, ...] = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


# ---------------------------------------------------------------- data


@dataclass
class LoraPiece:
    """`scale * B @ A` added to output rows `rows` (a (start, stop) pair; None = all rows) of one layer."""

    A: Tensor  # [rank, in_features]
    B: Tensor  # [rows, rank]
    scale: float = 1.0  # alpha / rank (already including rsLoRA's sqrt when a file asks for it)
    rows: tuple[int, int] | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def alpha(self) -> float:
        """The alpha that gives this piece's scale with the usual `alpha / rank` rule."""
        return self.scale * self.rank

    def row_span(self, out_features: int) -> tuple[int, int]:
        return self.rows if self.rows is not None else (0, out_features)

    def delta_weight(self) -> Tensor:
        """scale * B @ A in float32 (rows of this piece only)."""
        return (self.B.float() @ self.A.float()) * self.scale

    def _follow(self, device: torch.device) -> None:
        # the pipeline moved the model (e.g. to a GPU): adapters follow on first use; `.data` keeps the
        # Parameter objects (and so an optimizer's references) the same
        if self.A.device != device:
            self.A.data = self.A.data.to(device)
        if self.B.device != device:
            self.B.data = self.B.data.to(device)


@dataclass
class AdapterInfo:
    name: str
    source: str = ""  # file path, "state_dict" or "trainable"
    layouts: tuple[str, ...] = ()  # file layouts the weights came in (diffusers, kohya, xlabs, original)
    base_model: str | None = None


@dataclass
class AdapterRegistry:
    """Per model (transformer or text encoder): which adapters exist, which are active, what is fused."""

    layers: dict[str, nn.Module] = field(default_factory=dict)  # adapted layers by module name
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)  # in load order
    active: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    enabled: bool = True
    fused: dict[str, float] = field(default_factory=dict)  # adapter -> factor fused into the weights


# Per-call multiplier of every unfused adapter (diffusers' joint_attention_kwargs={"scale": s}). A context
# variable, not a field of the shared registry: concurrent calls (threads, asyncio tasks) each see their own.
CALL_SCALE: ContextVar[float] = ContextVar("fluxion_lora_call_scale", default=1.0)



class SampleWeights:
    """One call's per-sample adapter weights (mixed-adapter batching; see `SAMPLE_WEIGHTS`).

    `weights[name]` is a float32 CPU tensor [n]: adapter `name`'s weight for image i of the call (0 where a
    sample does not use it). Adapters not named get weight 0 for every sample. The per-layer row vectors
    (moved to the layer's device and dtype, repeated for stacked rows) are cached per call."""

    def __init__(self, weights: dict[str, Tensor], n: int):
        self.weights = weights
        self.n = n
        self._rows: dict[tuple, Tensor] = {}

    def rows(self, name: str, r: int, device: torch.device, dtype: torch.dtype, layer: str) -> Tensor:
        """Adapter `name`'s weight per input row [r] on a layer that sees `r` rows (batch dim 0).

        r == n: one row per image. r a multiple of n: the images stacked r // n times in the same order (true
        CFG's [cond; uncond]), so the weights repeat. r dividing n: each row stands for n // r consecutive
        images (the text encoders run once per prompt before num_images_per_prompt repeats it), which must
        then share their weights."""
        key = (name, r, device, dtype)
        got = self._rows.get(key)
        if got is not None:
            return got
        w, n = self.weights[name], self.n
        if r % n == 0:
            rw = w.repeat(r // n)
        elif n % r == 0:
            groups = w.view(r, n // r)
            if not bool((groups == groups[:, :1]).all()):
                raise ValueError(
                    f"per-sample LoRA weights: {layer} sees {r} rows for {n} images, so each row serves "
                    f"{n // r} consecutive images, but adapter {name!r} has different weights within such a group "
                    f"({w.tolist()}); the text encoders run once per prompt (before num_images_per_prompt), so "
                    "images of one prompt must share their text-encoder adapter weights"
                )
            rw = groups[:, 0].contiguous()
        else:
            raise ValueError(
                f"per-sample LoRA weights were given for {n} images, but {layer} sees a batch of {r} rows; "
                "pass one weights dict per image of the call (batch * num_images_per_prompt)"
            )
        got = rw.to(device=device, dtype=dtype)
        self._rows[key] = got
        return got


# Per-call, per-sample adapter weights (mixed-adapter batching): a `SampleWeights`, or None (the common case:
# the registry's active adapters and weights apply to every sample). A context variable, so concurrent calls
# (threads, asyncio tasks) each see their own; set by `LoraMixin.lora_per_sample`.
SAMPLE_WEIGHTS: ContextVar[SampleWeights | None] = ContextVar("fluxion_lora_sample_weights", default=None)


def make_sample_weights(per_sample, known: set[str] | None = None) -> SampleWeights:
    """A `SampleWeights` from one dict {adapter name: weight} per image (checked: a non-empty list of dicts,
    names strings in `known` when given, weights finite numbers)."""
    if isinstance(per_sample, dict) or not isinstance(per_sample, (list, tuple)):
        raise ValueError("per-sample LoRA weights must be a list with one dict per image, "
                         f"got {type(per_sample).__name__}")
    if not per_sample:
        raise ValueError("per-sample LoRA weights must have one dict per image, got an empty list")
    n = len(per_sample)
    table: dict[str, list[float]] = {}
    for i, d in enumerate(per_sample):
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ValueError(f"per-sample LoRA weights: image {i} must be a dict {{adapter name: weight}}, got {d!r}")
        for name, w in d.items():
            if not isinstance(name, str):
                raise ValueError(f"per-sample LoRA weights: image {i} has a non-string adapter name {name!r}")
            if known is not None and name not in known:
                raise ValueError(f"per-sample LoRA weights: image {i} names adapter {name!r}, which is not loaded "
                                 f"(loaded: {sorted(known)})")
            table.setdefault(name, [0.0] * n)[i] = check_scale(w, f"per-sample LoRA weight of {name!r} for image {i}")
    weights = {k: torch.tensor(v, dtype=torch.float32) for k, v in table.items() if any(x != 0 for x in v)}
    return SampleWeights(weights, n)


class LayerState:
    """Plain (unregistered) holder on an adapted layer: its pieces per adapter and the fuse backup."""

    def __init__(self, registry: AdapterRegistry, name: str, handle):
        self.registry = registry
        self.name = name
        self.handle = handle
        self.adapters: dict[str, list[LoraPiece]] = {}
        self.backup: tuple[int, int, Tensor] | None = None  # (row start, row stop, original rows on CPU)


# ---------------------------------------------------------------- helpers


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a Linear-like layer (quantized ones keep in_features / out_features)."""
    return isinstance(module, nn.Linear) or (
        hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")
    )


def get_registry(model: nn.Module, create: bool = False) -> AdapterRegistry | None:
    reg = model.__dict__.get(REGISTRY_ATTR)
    if reg is None and create:
        reg = AdapterRegistry()
        model.__dict__[REGISTRY_ATTR] = reg  # plain attribute: not a submodule, not in state_dict
    return reg


def _layer_state(module: nn.Module) -> LayerState | None:
    return module.__dict__.get(LAYER_ATTR)


def _lora_hook(module: nn.Module, args, output: Tensor):
    state: LayerState = module.__dict__[LAYER_ATTR]
    reg = state.registry
    per_sample = SAMPLE_WEIGHTS.get()
    if per_sample is not None:
        return _per_sample_hook(state, per_sample, args[0], output) if reg.enabled else None
    if not reg.enabled or not reg.active:
        return None
    x = args[0]
    out = output
    for name in reg.active:
        pieces = state.adapters.get(name)
        if not pieces or name in reg.fused:
            continue
        weight = reg.weights.get(name, 1.0) * CALL_SCALE.get()
        if weight == 0:
            continue
        for p in pieces:
            p._follow(x.device)
            # bf16 adapters on a layer computing in float32 (a CPU without bf16 units) compute in float32 too
            cd = torch.promote_types(p.A.dtype, out.dtype)
            h = F.linear(x.to(cd), p.A.to(cd))
            d = (F.linear(h, p.B.to(cd)) * (weight * p.scale)).to(out.dtype)
            # in place: the base layer's output is ours alone here, and autograd records the add
            # (gradients reach A and B even when the base weights are frozen)
            if p.rows is None:
                out += d
            else:
                out[..., p.rows[0] : p.rows[1]] += d
    return out


def _per_sample_hook(state: LayerState, per_sample: SampleWeights, x: Tensor, out: Tensor):
    """Mixed-adapter batching: every adapter named in `per_sample` (active or not; the registry's active list
    and weights do not apply) adds its delta to each row of the batch scaled by that row's weight (0: none),
    times the call's `CALL_SCALE`."""
    reg = state.registry
    call_scale = CALL_SCALE.get()
    if call_scale == 0:
        return None
    r = x.shape[0] if x.ndim > 1 else 1
    for name in per_sample.weights:
        pieces = state.adapters.get(name)
        if not pieces:
            continue
        if name in reg.fused:
            raise ValueError(f"adapter {name!r} is fused into the weights: a fused adapter applies to every sample "
                             "and cannot have per-sample weights; call unfuse_lora() first")
        for p in pieces:
            p._follow(x.device)
            cd = torch.promote_types(p.A.dtype, out.dtype)
            rw = per_sample.rows(name, r, x.device, cd, state.name)
            rw = rw.view((r,) + (1,) * (out.ndim - 1)) if x.ndim > 1 else rw
            h = F.linear(x.to(cd), p.A.to(cd))
            d = (F.linear(h, p.B.to(cd)) * (rw * (call_scale * p.scale))).to(out.dtype)
            if p.rows is None:
                out += d
            else:
                out[..., p.rows[0] : p.rows[1]] += d
    return out


def _check_piece(module_name: str, module: nn.Module, piece: LoraPiece, what: str) -> None:
    out_f, in_f = int(module.out_features), int(module.in_features)
    a, b = piece.row_span(out_f)
    if not (0 <= a < b <= out_f):
        raise ValueError(f"{what}: rows [{a}:{b}] are outside {module_name}'s {out_f} output rows")
    if piece.A.ndim != 2 or piece.B.ndim != 2:
        raise ValueError(f"{what}: LoRA matrices must be 2-D, got A {list(piece.A.shape)} and B {list(piece.B.shape)}")
    r = piece.A.shape[0]
    if tuple(piece.A.shape) != (r, in_f):
        raise ValueError(f"{what}: A has shape {list(piece.A.shape)}, {module_name} needs [{r}, {in_f}]")
    if tuple(piece.B.shape) != (b - a, r):
        raise ValueError(f"{what}: B has shape {list(piece.B.shape)}, {module_name} rows [{a}:{b}] need [{b - a}, {r}]")


def _modules(model: nn.Module, pieces: dict[str, list[LoraPiece]]) -> dict[str, nn.Module]:
    mods = {}
    for name in pieces:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r}") from None
        if not is_linear(mod):
            raise ValueError(f"{name!r} is a {type(mod).__name__}, not a Linear layer: LoRA adapts Linear layers only")
        mods[name] = mod
    return mods


# ---------------------------------------------------------------- attach / remove


def attach_adapter(
    model: nn.Module,
    name: str,
    pieces: dict[str, list[LoraPiece]],
    info: AdapterInfo | None = None,
    activate: bool = True,
) -> None:
    """Attach adapter `name` (pieces per module name). Everything is checked before anything changes."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
    reg = get_registry(model)
    if reg is not None and name in reg.adapters:
        raise ValueError(f"an adapter named {name!r} is already loaded; pick another adapter_name (or hotswap=True)")
    if not any(pieces.values()):
        raise ValueError(f"adapter {name!r} has no weights")
    mods = _modules(model, pieces)
    for mod_name, plist in pieces.items():
        for p in plist:
            _check_piece(mod_name, mods[mod_name], p, f"adapter {name!r} on {mod_name}")

    reg = get_registry(model, create=True)
    for mod_name, plist in pieces.items():
        if not plist:
            continue
        mod = mods[mod_name]
        state = _layer_state(mod)
        if state is None:
            handle = mod.register_forward_hook(_lora_hook)
            state = LayerState(reg, mod_name, handle)
            mod.__dict__[LAYER_ATTR] = state
            reg.layers[mod_name] = mod
        state.adapters[name] = list(plist)
    reg.adapters[name] = info or AdapterInfo(name)
    if activate:  # as diffusers: a newly loaded adapter becomes the (only) active one
        reg.active = [name]
        reg.weights[name] = 1.0
    else:
        reg.weights.setdefault(name, 1.0)


def hotswap_adapter(model: nn.Module, name: str, pieces: dict[str, list[LoraPiece]]) -> None:
    """Replace adapter `name`'s weights in place (same layers, row blocks and ranks; checked first)."""
    reg = get_registry(model)
    if reg is None or name not in reg.adapters:
        raise ValueError(f"cannot hotswap {name!r}: no adapter by that name is loaded")
    if name in reg.fused:
        raise ValueError(f"cannot hotswap {name!r}: it is fused into the weights; call unfuse_lora() first")
    old = adapter_pieces(model, name)
    if set(old) != {k for k, v in pieces.items() if v}:
        extra = sorted(set(pieces) - set(old)) or sorted(set(old) - set(pieces))
        raise ValueError(f"cannot hotswap {name!r}: the new weights adapt other layers ({extra[0]!r} differs)")
    for mod_name, plist in pieces.items():
        olds = old[mod_name]
        if len(olds) != len(plist) or any(
            o.rows != p.rows or o.A.shape != p.A.shape or o.B.shape != p.B.shape for o, p in zip(olds, plist)
        ):
            raise ValueError(f"cannot hotswap {name!r}: {mod_name} has other shapes or row blocks in the new weights")
    with torch.no_grad():
        for mod_name, plist in pieces.items():
            for o, p in zip(old[mod_name], plist):
                o.A.copy_(p.A)
                o.B.copy_(p.B)
                o.scale = p.scale


def delete_adapters(model: nn.Module, names: list[str] | str) -> None:
    reg = get_registry(model)
    names = [names] if isinstance(names, str) else list(names)
    missing = [n for n in names if reg is None or n not in reg.adapters]
    if missing:
        raise ValueError(f"no adapter named {missing[0]!r} (loaded: {list_adapters(model)})")
    fused = [n for n in names if n in reg.fused]
    if fused:
        raise ValueError(f"adapter {fused[0]!r} is fused into the weights; call unfuse_lora() before deleting it")
    for n in names:
        for mod_name in list(reg.layers):
            mod = reg.layers[mod_name]
            state = _layer_state(mod)
            state.adapters.pop(n, None)
            if not state.adapters and state.backup is None:
                _strip_layer(mod)
                del reg.layers[mod_name]
        del reg.adapters[n]
        reg.weights.pop(n, None)
        if n in reg.active:
            reg.active.remove(n)
    if not reg.adapters and not reg.layers:
        model.__dict__.pop(REGISTRY_ATTR, None)


def _strip_layer(mod: nn.Module) -> None:
    state = mod.__dict__.pop(LAYER_ATTR, None)
    if state is not None:
        state.handle.remove()


def unload_lora(model: nn.Module) -> None:
    """Remove every adapter and hook. As in diffusers, adapters fused at this point stay in the weights
    (fuse_lora + unload_lora_weights is how one bakes a LoRA in); unfuse first to get the base model back."""
    reg = get_registry(model)
    if reg is None:
        return
    if reg.fused:
        log.info("unloading LoRA with %s fused: their effect stays in the weights", sorted(reg.fused))
    for mod in reg.layers.values():
        _strip_layer(mod)
    model.__dict__.pop(REGISTRY_ATTR, None)


# ---------------------------------------------------------------- selection


def list_adapters(model: nn.Module) -> list[str]:
    reg = get_registry(model)
    return list(reg.adapters) if reg is not None else []


def active_adapters(model: nn.Module) -> list[str]:
    reg = get_registry(model)
    return list(reg.active) if reg is not None else []


def check_scale(value, name: str) -> float:
    """A LoRA scale: a finite number (NaN would be written into the weights or the activations)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def normalize_weights(names: list[str], weights) -> list[float]:
    if weights is None:
        return [1.0] * len(names)
    if isinstance(weights, (int, float)):
        return [check_scale(weights, "adapter weights")] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"got {len(weights)} adapter weights for {len(names)} adapters {names}")
    out = []
    for w in weights:
        if w is None:
            w = 1.0
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
            raise ValueError(f"adapter weights must be finite numbers, got {w!r}")
        out.append(float(w))
    return out


def set_adapters(model: nn.Module, names: list[str] | str, weights=None) -> None:
    names = [names] if isinstance(names, str) else list(names)
    ws = normalize_weights(names, weights)
    reg = get_registry(model)
    missing = [n for n in names if reg is None or n not in reg.adapters]
    if missing:
        raise ValueError(f"no adapter named {missing[0]!r} (loaded: {list_adapters(model)})")
    if reg.fused and any(n in reg.fused for n in names):
        log.warning("adapters %s are fused: their weights in the model do not change with set_adapters",
                    sorted(n for n in names if n in reg.fused))
    reg.active = names
    for n, w in zip(names, ws):
        reg.weights[n] = w


def enable_lora(model: nn.Module, enabled: bool = True) -> None:
    reg = get_registry(model)
    if reg is not None:
        reg.enabled = enabled


def adapter_pieces(model: nn.Module, name: str) -> dict[str, list[LoraPiece]]:
    """{module name: pieces} of adapter `name` (the live objects, not copies)."""
    reg = get_registry(model)
    if reg is None or name not in reg.adapters:
        raise ValueError(f"no adapter named {name!r} (loaded: {list_adapters(model)})")
    out = {}
    for mod_name, mod in reg.layers.items():
        plist = _layer_state(mod).adapters.get(name)
        if plist:
            out[mod_name] = plist
    return out


def adapter_parameters(model: nn.Module, name: str) -> list[Tensor]:
    return [t for plist in adapter_pieces(model, name).values() for p in plist for t in (p.A, p.B)]


# ---------------------------------------------------------------- fuse


@torch.no_grad()
def fuse_lora(model: nn.Module, lora_scale: float = 1.0, adapter_names: list[str] | None = None,
              safe_fusing: bool = False) -> list[str]:
    """Add `lora_scale * weight * scale * B @ A` of each adapter (default: the active, unfused ones) into
    the base weights. The original rows are kept (on the CPU) so `unfuse_lora` restores them bit-exactly.
    Returns the names fused."""
    check_scale(lora_scale, "lora_scale")
    reg = get_registry(model)
    if reg is None:
        return []
    if adapter_names is None:
        names = [n for n in reg.active if n not in reg.fused]
    else:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in reg.adapters]
        if missing:
            raise ValueError(f"no adapter named {missing[0]!r} (loaded: {list_adapters(model)})")
        again = [n for n in names if n in reg.fused]
        if again:
            raise ValueError(f"adapter {again[0]!r} is already fused")
    if not names:
        return []
    factors = {n: float(lora_scale) * reg.weights.get(n, 1.0) for n in names}
    for mod_name, mod in reg.layers.items():
        state = _layer_state(mod)
        work = [(n, p) for n in names for p in state.adapters.get(n, ())]
        if not work:
            continue
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.ndim != 2:
            raise ValueError(f"cannot fuse into {mod_name}: its weight is not a plain floating-point matrix "
                             "(quantized?); use the adapters unfused")
        out_f = weight.shape[0]
        lo = min(p.row_span(out_f)[0] for _, p in work)
        hi = max(p.row_span(out_f)[1] for _, p in work)
        new_rows = weight[lo:hi].detach().to(torch.float32, copy=True)  # never a view of the weight
        for n, p in work:
            a, b = p.row_span(out_f)
            new_rows[a - lo : b - lo] += p.delta_weight().to(weight.device) * factors[n]
        if safe_fusing and not torch.isfinite(new_rows).all():
            raise ValueError(f"fusing {names} into {mod_name} gives non-finite weights; nothing was fused there")
        _backup_rows(state, weight, lo, hi)
        weight[lo:hi] = new_rows.to(weight.dtype)
    reg.fused.update(factors)
    return names


def _backup_rows(state: LayerState, weight: Tensor, lo: int, hi: int) -> None:
    """Keep the ORIGINAL values of rows [lo:hi] (merging with an earlier backup: rows outside it are
    still original)."""
    if state.backup is None:
        state.backup = (lo, hi, weight[lo:hi].detach().to("cpu", copy=True))
        return
    a0, b0, saved = state.backup
    if lo >= a0 and hi <= b0:
        return
    na, nb = min(lo, a0), max(hi, b0)
    merged = weight[na:nb].detach().to("cpu", copy=True)
    merged[a0 - na : b0 - na] = saved
    state.backup = (na, nb, merged)


@torch.no_grad()
def unfuse_lora(model: nn.Module) -> None:
    """Restore the exact original weights of every fused layer."""
    reg = get_registry(model)
    if reg is None:
        return
    for mod_name in list(reg.layers):
        mod = reg.layers[mod_name]
        state = _layer_state(mod)
        if state.backup is not None:
            a, b, saved = state.backup
            mod.weight[a:b] = saved.to(mod.weight.device)
            state.backup = None
        if not state.adapters:
            _strip_layer(mod)
            del reg.layers[mod_name]
    reg.fused.clear()


# ---------------------------------------------------------------- training


def add_trainable_adapter(
    transformer: nn.Module,
    name: str,
    rank: int = 4,
    alpha: float | None = None,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[nn.Parameter]:
    """Attach a fresh adapter for training and return its parameters (A then B of every piece).

    `targets` are diffusers module-name suffixes (as in diffusers' scripts: a module matches when its
    diffusers name equals the target or ends with "." + target) or fluxion (original) layer names/suffixes.
    A diffusers target on a fused layer becomes a row-block piece of its own (so `attn.to_q/k/v` give three
    rank-`rank` pieces on the fused qkv, as PEFT gives three LoRAs); an original-name target adapts all rows.
    Initialisation as PEFT's "gaussian" (what the diffusers recipe uses): A ~ N(0, 1/rank), B = 0, so the
    model is unchanged until training moves B. alpha defaults to rank (scale 1). Parameters are `dtype`
    (float32 by default, as trainers keep LoRA weights) on the layer's device; the adapter becomes active.
    """
    from .formats import FluxNames

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    names = FluxNames(transformer)
    plan: dict[str, list[tuple[int, int] | None]] = {}
    for target in targets:
        hits = names.match_target(target)
        if not hits:
            raise ValueError(f"training target {target!r} matches no Linear layer of this transformer")
        for module, rows in hits:
            if rows not in plan.setdefault(module, []):
                plan[module].append(rows)
    pieces: dict[str, list[LoraPiece]] = {}
    params: list[nn.Parameter] = []
    for module in sorted(plan, key=names.order):
        mod = transformer.get_submodule(module)
        device = mod.weight.device
        for rows in sorted(plan[module], key=lambda r: (-1, 0) if r is None else r):
            n_rows = int(mod.out_features) if rows is None else rows[1] - rows[0]
            a = torch.randn(rank, int(mod.in_features), generator=generator, dtype=torch.float32) / rank
            A = nn.Parameter(a.to(device=device, dtype=dtype))
            B = nn.Parameter(torch.zeros(n_rows, rank, device=device, dtype=dtype))
            pieces.setdefault(module, []).append(LoraPiece(A, B, alpha / rank, rows))
            params += [A, B]
    attach_adapter(transformer, name, pieces, AdapterInfo(name, source="trainable"))
    return params
