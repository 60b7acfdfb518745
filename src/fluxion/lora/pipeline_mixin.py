"""LoRA methods of FluxPipeline, with diffusers' names and behaviour.

The pipeline's LoRA-capable parts are `self.transformer` ("transformer") and the CLIP text model
`self.clip.model` ("text_encoder"). Adapters are applied by forward hooks (see `fluxion.lora.layers`),
so loading, switching, weighting, disabling and deleting never reload or copy the base model.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from . import layers as L
from .expand import fit_input_lora, restore_input_layer
from .formats import (
    _KNOWN_LOAD_KWARGS,
    LORA_WEIGHT_NAME,
    TEXT_ENCODER,
    TRANSFORMER,
    parse_lora_state_dict,
    read_lora_source,
)
from .io import save_lora_adapter

log = logging.getLogger(__name__)
COMPONENTS = (TRANSFORMER, TEXT_ENCODER)


class LoraMixin:
    @contextlib.contextmanager
    def lora_scale(self, scale: float | None):
        """Scale every unfused adapter by `scale` for the duration (diffusers' `joint_attention_kwargs={"scale": s}`),
        in this thread or task only (`fluxion.lora.layers.CALL_SCALE`)."""
        if scale is None:
            yield
            return
        token = L.CALL_SCALE.set(L.check_scale(scale, 'joint_attention_kwargs["scale"]'))
        try:
            yield
        finally:
            L.CALL_SCALE.reset(token)

    @contextlib.contextmanager
    def lora_per_sample(self, weights):
        """Mixed-adapter batching: one call's images each get their own LoRA set and weights.

        `weights` is a list with one dict {adapter name: weight} per image of the call (batch *
        num_images_per_prompt, in output order); `{}` means no adapter for that image. For the duration, in this
        thread or task only (`fluxion.lora.layers.SAMPLE_WEIGHTS`), every adapted layer adds each adapter's
        delta to each sample's rows scaled by that sample's weight: a sample gets exactly the adapters it names,
        as `set_adapters(names, weights)` would give it alone, and nothing of the others' (the active adapters
        and `set_adapters` weights are ignored meanwhile). With true CFG the transformer sees [cond; uncond]
        stacked: the weights repeat in that order. `joint_attention_kwargs={"scale": s}` still multiplies
        everything; `disable_lora()` still turns every adapter off.

            with pipe.lora_per_sample([{"a": 0.8}, {"b": 0.5}, {}]):
                out = pipe(["p1", "p2", "p3"], generator=[g1, g2, g3])

        Names must be loaded adapters and weights finite (ValueError otherwise). A fused adapter applies to
        every sample, so it cannot be named here (ValueError; `unfuse_lora()` first); adapters fused and not
        named stay baked into every sample, as part of the base weights. A count that does not match the call's
        batch is a ValueError at the first adapted layer. The text encoder runs once per prompt, so images of
        one prompt (num_images_per_prompt > 1) must share the weights of adapters that have text-encoder parts.
        Yields the `SampleWeights` set."""
        parts = self._lora_components()
        known = {n for m in parts.values() for n in L.list_adapters(m)}
        table = L.make_sample_weights(weights, known)
        for model in parts.values():
            reg = L.get_registry(model)
            fused = sorted(n for n in table.weights if reg is not None and n in reg.fused)
            if fused:
                raise ValueError(f"adapter {fused[0]!r} is fused into the weights: a fused adapter applies to every "
                                 "sample and cannot have per-sample weights; call unfuse_lora() first")
        token = L.SAMPLE_WEIGHTS.set(table)
        try:
            yield table
        finally:
            L.SAMPLE_WEIGHTS.reset(token)

    def _check_lora_per_sample(self, total: int) -> None:
        """A call of `total` images (batch * num_images_per_prompt) inside `lora_per_sample`: the count must
        match. (The adapted layers check rows too, but a transformer-only adapter cannot tell 2n stacked true-CFG
        rows from a batch of 2n; call this where the call's batch is known to catch that.)"""
        table = L.SAMPLE_WEIGHTS.get()
        if table is not None and table.n != total:
            raise ValueError(f"per-sample LoRA weights were given for {table.n} images, but this call makes {total} "
                             "(batch * num_images_per_prompt); pass one weights dict per image")

    # ------------------------------------------------------------ parts

    def _lora_components(self, components=None) -> dict:
        found = {TRANSFORMER: getattr(self, "transformer", None)}
        clip = getattr(self, "clip", None)
        found[TEXT_ENCODER] = getattr(clip, "model", None) if clip is not None else None
        if components is not None:
            components = [components] if isinstance(components, str) else list(components)
            bad = [c for c in components if c not in COMPONENTS]
            if bad:
                raise ValueError(f"unknown LoRA component {bad[0]!r}; the components are {list(COMPONENTS)}")
            found = {c: found[c] for c in components}
        return {c: m for c, m in found.items() if m is not None}

    # ------------------------------------------------------------ loading

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict,
        adapter_name: str | None = None,
        hotswap: bool = False,
        weight_name: str | None = None,
        strict: bool = True,
        **kwargs,
    ) -> str:
        """Load a LoRA (a folder + `weight_name`, a file, or a state dict) as adapter `adapter_name`
        (default `default_<n>`), which becomes the active adapter. Layouts: diffusers/PEFT, kohya, XLabs,
        original keys (see `fluxion.lora.formats`). Every key and shape is checked before anything is
        attached. `hotswap=True` replaces the weights of the already loaded adapter `adapter_name` in place.
        Returns the adapter name."""
        unknown = set(kwargs) - _KNOWN_LOAD_KWARGS
        if unknown:
            raise TypeError(f"load_lora_weights() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        state_dict, metadata, source = read_lora_source(
            pretrained_model_name_or_path_or_dict, weight_name, kwargs.get("subfolder")
        )
        if kwargs.get("metadata"):  # diffusers' kwarg: the PEFT config fields ("transformer.r", ...)
            metadata = dict(kwargs["metadata"])
        transformer = self._lora_components()[TRANSFORMER]
        # a control LoRA (Canny / Depth) widens img_in first; undone if the load fails (fluxion.lora.expand)
        state_dict, layer_before = fit_input_lora(state_dict, transformer)
        try:
            return self._attach_lora(state_dict, metadata, source, adapter_name, hotswap, strict)
        except BaseException:
            if layer_before is not None:
                restore_input_layer(transformer, layer_before)
            raise

    def _attach_lora(self, state_dict, metadata, source, adapter_name, hotswap, strict) -> str:
        parts = self._lora_components()
        parsed = parse_lora_state_dict(
            state_dict, parts[TRANSFORMER], parts.get(TEXT_ENCODER), metadata=metadata, strict=strict
        )
        if parsed.skipped:
            log.warning(
                "LoRA %s: skipped %d of %d keys that fluxion cannot apply (T5 text-encoder parts, CLIP layers "
                "the text encoder lacks%s); first skipped: %s",
                source, len(parsed.skipped), len(state_dict), "" if strict else ", unknown keys", parsed.skipped[0],
            )
        if hotswap:
            if adapter_name is None:
                raise ValueError("hotswap=True needs the adapter_name of the loaded adapter to replace")
            for comp, model in parts.items():  # check all parts first: same parts adapted as before
                has = adapter_name in L.list_adapters(model)
                if has != (comp in parsed.pieces):
                    raise ValueError(
                        f"cannot hotswap {adapter_name!r}: " + (
                            f"the new weights have no {comp} part" if has
                            else f"the {comp} has no adapter by that name"
                        )
                    )
            for comp, pieces in parsed.pieces.items():
                L.hotswap_adapter(parts[comp], adapter_name, pieces)
            return adapter_name

        if adapter_name is None:
            taken = {n for m in parts.values() for n in L.list_adapters(m)}
            i = 0
            while f"default_{i}" in taken:
                i += 1
            adapter_name = f"default_{i}"
        for comp, model in parts.items():
            if adapter_name in L.list_adapters(model):
                raise ValueError(
                    f"an adapter named {adapter_name!r} is already loaded; pick another adapter_name "
                    "(or pass hotswap=True to replace its weights)"
                )
        base = getattr(self, "model_path", None)
        info = L.AdapterInfo(adapter_name, source=source, layouts=tuple(sorted(parsed.layouts)), base_model=base)
        attached = []
        previous = {c: (L.active_adapters(m), dict(L.get_registry(m).weights)) for c, m in parts.items()
                    if L.get_registry(m) is not None}
        try:
            for comp, pieces in parsed.pieces.items():
                L.attach_adapter(parts[comp], adapter_name, pieces, info)
                attached.append(comp)
        except Exception:
            for comp in attached:  # keep all-or-nothing
                L.delete_adapters(parts[comp], [adapter_name])
            for comp, (active, weights) in previous.items():
                reg = L.get_registry(parts[comp])
                reg.active, reg.weights = active, weights
            raise
        # as diffusers: the new adapter is the active one, in every part that has adapters
        for comp, model in parts.items():
            if comp not in parsed.pieces and L.get_registry(model) is not None:
                L.get_registry(model).active = []
        return adapter_name

    # ------------------------------------------------------------ selection

    def _loaded_names(self, adapter_names) -> tuple[list[str], dict]:
        """The names as a list (each must be loaded in some part) and the LoRA-capable parts."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        parts = self._lora_components()
        known = {n for m in parts.values() for n in L.list_adapters(m)}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"no adapter named {missing[0]!r} is loaded (loaded: {sorted(known)})")
        return names, parts

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Activate `adapter_names` (a name or a list) with weights (a number, or one per adapter;
        default 1.0). Parts that lack some of the adapters use those they have."""
        names, parts = self._loaded_names(adapter_names)
        weights = L.normalize_weights(names, adapter_weights)
        for model in parts.values():
            have = L.list_adapters(model)
            if not have:
                continue
            sub = [(n, w) for n, w in zip(names, weights) if n in have]
            L.set_adapters(model, [n for n, _ in sub], [w for _, w in sub])

    def get_active_adapters(self) -> list[str]:
        """The active adapters (as diffusers, still listed while disable_lora() is in effect)."""
        out: list[str] = []
        for model in self._lora_components().values():
            out += [n for n in L.active_adapters(model) if n not in out]
        return out

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {c: L.list_adapters(m) for c, m in self._lora_components().items() if L.list_adapters(m)}

    def disable_lora(self) -> None:
        for model in self._lora_components().values():
            L.enable_lora(model, False)

    def enable_lora(self) -> None:
        for model in self._lora_components().values():
            L.enable_lora(model, True)

    def delete_adapters(self, adapter_names) -> None:
        names, parts = self._loaded_names(adapter_names)
        for model in parts.values():
            reg = L.get_registry(model)
            fused = [n for n in names if reg is not None and n in reg.fused]
            if fused:
                raise ValueError(f"adapter {fused[0]!r} is fused into the weights; call unfuse_lora() first")
        for model in parts.values():
            here = [n for n in names if n in L.list_adapters(model)]
            if here:
                L.delete_adapters(model, here)

    def unload_lora_weights(self, reset_to_overwritten_params: bool = False) -> None:
        """Remove all adapters. Unfused, the model is exactly the base model again; adapters fused at this
        point stay baked into the weights (diffusers' fuse_lora + unload_lora_weights idiom).
        A control LoRA widened the transformer's img_in: it stays widened (as diffusers) unless
        `reset_to_overwritten_params=True`, which puts the original layer and config.in_channels back."""
        parts = self._lora_components()
        for model in parts.values():
            L.unload_lora(model)
        if reset_to_overwritten_params:
            restore_input_layer(parts[TRANSFORMER])

    # ------------------------------------------------------------ fusing

    def fuse_lora(self, components=None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names=None, **kwargs) -> None:
        """Add the adapters (default: the active ones, with their weights) times `lora_scale` into the base
        weights of `components` (default: the transformer only, as diffusers' FluxPipeline; pass
        ["transformer", "text_encoder"] for both); they then cost nothing at run time. `unfuse_lora`
        restores the exact original weights."""
        if kwargs:
            raise TypeError(f"fuse_lora() got an unexpected keyword argument {sorted(kwargs)[0]!r}")
        parts = self._lora_components(components or [TRANSFORMER])
        if adapter_names is not None:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            known = {n for m in parts.values() for n in L.list_adapters(m)}
            missing = [n for n in names if n not in known]
            if missing:
                raise ValueError(f"no adapter named {missing[0]!r} is loaded (loaded: {sorted(known)})")
        for model in parts.values():
            reg = L.get_registry(model)
            if reg is None:
                continue
            sub = None if adapter_names is None else [n for n in names if n in reg.adapters]
            if sub == []:
                continue
            L.fuse_lora(model, lora_scale, sub, safe_fusing=safe_fusing)

    def unfuse_lora(self, components=None, **kwargs) -> None:
        for model in self._lora_components(components or list(COMPONENTS)).values():
            L.unfuse_lora(model)

    # ------------------------------------------------------------ saving

    def save_lora_weights(
        self,
        save_directory,
        adapter_name: str | None = None,
        weight_name: str = LORA_WEIGHT_NAME,
        base_model: str | None = None,
        dtype=None,
        **kwargs,
    ) -> Path:
        """Write one adapter (default: the only loaded one, else the only active one) in the diffusers
        layout (`pytorch_lora_weights.safetensors` in `save_directory`, or that path if it ends in
        .safetensors). diffusers' FluxPipeline.load_lora_weights reads it unchanged."""
        parts = self._lora_components()
        if adapter_name is None:
            loaded = sorted({n for m in parts.values() for n in L.list_adapters(m)})
            active = self.get_active_adapters()
            if len(loaded) == 1:
                adapter_name = loaded[0]
            elif len(active) == 1:
                adapter_name = active[0]
            else:
                raise ValueError(f"several adapters are loaded ({loaded}); pass adapter_name=")
        return save_lora_adapter(
            parts[TRANSFORMER], adapter_name, save_directory,
            base_model=base_model if base_model is not None else getattr(self, "model_path", None),
            text_encoder=parts.get(TEXT_ENCODER), weight_name=weight_name, dtype=dtype,
        )
