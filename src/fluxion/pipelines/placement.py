"""Where a pipeline's parts live and compute: device moves, compute dtype plans, CPU offload (page release,
block streaming), VAE tiling and slicing, the pipeline-wide step-cache setting and progress bars. A mixin of
`FluxBasePipeline`; it needs the pipeline's `_modules()`, `transformer`, `t5` and `vae`."""
from __future__ import annotations

import contextlib

import torch

from ..checkpoints.pages import release_pages, stream_blocks
from ..compute import DtypePlan, log_once, plan, storage_dtype, use_compute_dtype


class Placement:
    def to(self, device=None, dtype: torch.dtype | None = None):
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if device is not None:
            self._device = torch.device(device)
        for m in self._modules().values():
            m.to(device=self._device, dtype=dtype)
        self.set_compute_dtype(self._compute_override)  # the device or the storage dtype may have changed
        return self

    def set_compute_dtype(self, compute_dtype: str | torch.dtype | None = None) -> dict[str, DtypePlan]:
        """Choose the dtype each part computes in; weights keep their storage dtype (`fluxion.compute`).

        None / "auto": bf16 weights compute in bf16 where the CPU has bf16 units, and in float32 (upcast per
        layer, per call) where it has not; "float32" / "bfloat16" force it ($FLUXION_COMPUTE_DTYPE too).
        Returns the plan per part (also kept as `compute_plans`); the choice is logged once.
        """
        self._compute_override = compute_dtype
        plans = {}
        for name, module in self._modules().items():
            p = plan(storage_dtype(module), self._offload_device or self._device, compute_dtype)
            if p.upcasts or getattr(module, "_fluxion_compute_dtype", None) is not None:
                use_compute_dtype(module, p.compute)
            log_once(p)
            plans[name] = p
        self.compute_plans = plans
        return plans

    @property
    def device(self) -> torch.device:
        return self._device

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None):
        """Keep every part on the CPU and move each to the accelerator only while it runs.

        On a CPU-only machine everything already runs where it lives; there, each part's memory-mapped weights
        (zero-copy .safetensors tensors, GGUF/fp8 quantized weights) give their resident pages back once it has
        run (`fluxion.checkpoints.pages.release_pages`): the text encoders after the prompts are encoded, the
        transformer before the VAE decodes. The page cache keeps the data, so the next call re-reads it from
        memory; weights held as copies (converted dtypes) are not affected.
        """
        target = torch.device(device) if device is not None else (
            torch.device("cuda", gpu_id or 0) if torch.cuda.is_available() else torch.device("cpu")
        )
        self._offload_device = target if target.type != "cpu" else None  # set first: .to() plans for it
        self._release_after_use = target.type == "cpu"
        self.to("cpu")
        self._device = target
        return self

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None):
        """`enable_model_cpu_offload`, and on a CPU-only machine also stream the transformer's and T5's blocks:
        each block gives its mapped pages back right after its forward, so about one block's weights are
        resident at a time (the page cache re-serves them at the next step). With an accelerator, parts move
        whole (per-part placement is the finest we do there)."""
        self.enable_model_cpu_offload(gpu_id, device)
        if self._release_after_use and not self._block_hooks:
            for model in (self.transformer, self.t5.model):
                self._block_hooks += stream_blocks(model)
        return self

    def enable_vae_tiling(self, **kwargs):
        """Decode (and encode) large images in overlapping VAE tiles: see `AutoEncoder.enable_tiling`."""
        self.vae.enable_tiling(**kwargs)
        return self

    def disable_vae_tiling(self):
        self.vae.disable_tiling()
        return self

    def enable_vae_slicing(self):
        """Decode a batch one image at a time: see `AutoEncoder.enable_slicing`."""
        self.vae.enable_slicing()
        return self

    def disable_vae_slicing(self):
        self.vae.disable_slicing()
        return self

    def enable_cache(self, kind: str = "fbcache", threshold: float = 0.1) -> None:
        """Step caching for every later call (a call's `cache=` / `cache_threshold=` still win)."""
        if kind != "fbcache":
            raise ValueError(f"cache kind must be 'fbcache', got {kind!r}")
        self._cache = (kind, threshold)

    def disable_cache(self) -> None:
        self._cache = (None, None)

    def set_progress_bar_config(self, **kwargs):
        self._progress.update(kwargs)

    @contextlib.contextmanager
    def _placed(self, module: torch.nn.Module):
        if self._offload_device is None:
            try:
                yield module
            finally:
                if self._release_after_use:
                    release_pages(module)
            return
        module.to(self._offload_device)
        try:
            yield module
        finally:
            module.to("cpu")

    def _progress_bar(self, steps):
        from tqdm.auto import tqdm

        return tqdm(steps, desc="sampling", unit="step", **self._progress)
