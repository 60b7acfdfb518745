"""The worker thread that owns the pipeline: takes jobs, batches them, runs them, reports progress.

With `ServeConfig.workers = 1` (the default) one `Worker` thread in the app process owns the pipeline. With
`workers = N > 1` each of N `replicas.RemoteWorker` threads (this class, batching included, unchanged) sends
its batches to one replica process, which runs this same `_run_call` on its own copy of the model (see
`replicas.py`).

Batching. The worker takes the oldest queued job, then waits up to `batch_window_ms` for more jobs whose
`batch_key` matches (size, steps, CFG on/off, LoRA set and weights), up to
`max_batch` images in all, and runs them as ONE pipeline call: a prompt list, a negative-prompt list, and one
`torch.Generator("cpu").manual_seed(seed + k)` per image. Each image is therefore the offline
`pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed + k))` image: bit-identical when it ran alone,
and within float32 rounding of batched matrix products when it ran in a batch (tests: <= 2/255 per pixel).
A job asking for more than `max_batch` images runs alone. With `Worker.per_sample_guidance` (on when the
pipeline has `guidance_per_sample`) requests differing only in guidance_scale / true_cfg_scale share a batch:
the call runs inside `pipe.guidance_per_sample(...)` with each image's own values (without it, they are part
of `batch_key`). An edit (POST /v1/images/edits: params with an
`image`) always runs alone, in a call of its own, through `edit_pipe(kind)` (FluxImg2ImgPipeline /
FluxInpaintPipeline `.from_pipe(pipe)`, made once, sharing the loaded parts); its n images are one call.

Cancellation. DELETE on a running job marks it; at the next step boundary (the pipeline's
`callback_on_step_end`) the job is finished as `cancelled` at once and its images are dropped when the batch
ends; its batch-mates go on unchanged (their samples never depend on the others'). When every job of a batch is
cancelled the callback raises `_AllCancelled`, which stops the call at that step.

Failures. A batch whose call raises is re-run one job at a time, so a request that fails fails alone.

LoRA. With `Worker.per_sample_lora` (on when the pipeline has `lora_per_sample`, i.e. always for fluxion's
pipelines) requests with different LoRA sets and weights share a batch: the adapters any of them names are
loaded (LRU), and the call runs inside `pipe.lora_per_sample([{adapter: weight} per image])`, so each image
gets exactly its own adapters (checked against separate runs). Without it (`per_sample_lora = False`),
requests with different LoRA sets run in separate batches (`batch_key` includes them) and
`LoraLibrary.activate` sets the pipeline's adapters before each call.
"""
from __future__ import annotations

import base64
import contextlib
import io
import logging
import threading
import time

import torch
from PIL import Image

from ..png import png_info
from . import jobs as J
from .loras import LoraLoadError, LoraNotFound

log = logging.getLogger(__name__)


class _AllCancelled(Exception):
    pass


def encode_image(image: Image.Image, fmt: str, parameters: dict | None = None) -> str:
    """base64 of the image as PNG (with the generation parameters in its text chunks), JPEG or WebP."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", pnginfo=png_info(parameters))
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=95)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=95)
    else:
        raise ValueError(f"output_format must be png, jpeg or webp, got {fmt!r}")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _is_edit(params) -> bool:
    return getattr(params, "image", None) is not None


_EDIT_LOCK = threading.Lock()


def load_pipeline(config):
    """The pipeline `config` names (its model, quantization and dtype), progress bar off: what the app loads
    with one worker, and what each replica process loads with several."""
    from ..pipelines import FluxPipeline

    kw = {"quantize": config.quantize} if config.quantize else {}
    if config.dtype:
        kw["torch_dtype"] = getattr(torch, config.dtype)
    pipe = FluxPipeline.from_pretrained(config.model, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Worker:
    def __init__(self, pipe, store: J.JobStore, loras, config, metrics=None):
        self.pipe = pipe
        self.store = store
        self.loras = loras
        self.config = config
        self.metrics = metrics
        self.per_sample_lora = False  # mixed-adapter batching hook (see the module docstring)
        self.per_sample_guidance = hasattr(pipe, "guidance_per_sample")  # mixed-guidance batching (docstring)
        self.thread = threading.Thread(target=self._loop, name="fluxion-serve-worker", daemon=True)
        self.stopping = False
        self.busy = False

    def start(self) -> None:
        self.thread.start()

    # hooks for `replicas.RemoteWorker` (a worker whose pipeline runs in another process); no-ops here

    def _ensure_ready(self) -> bool:
        """Before taking a job: whether this worker can run one now (a replica may be restarting)."""
        return True

    def _step_boundary(self, batch: list[J.Job]) -> None:
        """At each step boundary, before `cancel_requested` is read (a replica learns it from the app here)."""

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        gauge = getattr(self.metrics, "worker_busy", None)
        if gauge is not None:
            gauge.labels(str(getattr(self, "index", 0))).set(1 if busy else 0)

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel queued jobs, ask running ones to stop at the next step, wait for the thread."""
        self.stopping = True
        self.store.close()
        with self.store.cond:
            for job in self.store.jobs.values():
                if job.status == J.RUNNING:
                    job.cancel_requested = True
        self.thread.join(timeout)

    def edit_pipe(self, kind: str):
        """The image-conditioned pipeline of `kind` ("img2img" | "inpaint") on the loaded parts (made once)."""
        with _EDIT_LOCK:
            pipes = self.__dict__.setdefault("_edit_pipes", {})
            if kind not in pipes:
                from ..pipelines.img2img import FluxImg2ImgPipeline
                from ..pipelines.inpaint import FluxInpaintPipeline

                cls = {"img2img": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline}[kind]
                pipes[kind] = cls.from_pipe(self.pipe)
            return pipes[kind]

    # ------------------------------------------------------------ batching

    def batch_key(self, p: J.GenParams) -> tuple:
        key = (p.width, p.height, p.steps, p.cfg)
        if not self.per_sample_guidance:
            key += (p.guidance_scale, p.true_cfg_scale if p.cfg else None)
        return key if self.per_sample_lora else (*key, p.loras)

    def _loop(self) -> None:
        while not self.stopping:
            if not self._ensure_ready():
                continue
            first = self.store.take(timeout=0.5)
            if first is None:
                continue
            batch = [first]
            key = self.batch_key(first.params)
            images = first.params.n
            deadline = time.monotonic() + self.config.batch_window_ms / 1000
            while images < self.config.max_batch and not self.stopping:
                room = self.config.max_batch - images

                def fits(job, room=room):
                    if _is_edit(job.params) or _is_edit(first.params):  # edits run alone
                        return False
                    return self.batch_key(job.params) == key and job.params.n <= room

                more = self.store.take_matching(fits, 1)
                if more:
                    batch += more
                    images += more[0].params.n
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.store.wait_new(left)
            self._set_busy(True)
            try:
                self._run_batch(batch)
            except Exception:  # never let the worker die
                log.exception("batch failed")
            finally:
                self._set_busy(False)

    def _run_batch(self, batch: list[J.Job]) -> None:
        live = [j for j in batch if not j.cancel_requested]
        for j in batch:
            if j.cancel_requested:
                self.store.finish(j, J.CANCELLED)
        if not live:
            return
        try:
            self._run_call(live)
        except _AllCancelled:
            for j in live:
                self.store.finish(j, J.CANCELLED)
        except Exception as e:
            if len(live) > 1:  # fail alone: run each job by itself
                for j in live:
                    self._run_batch([j])
                return
            log.warning("job %s failed: %s", live[0].id, e)
            self._fail(live[0], e)

    def _fail(self, job: J.Job, e: Exception) -> None:
        from .loras import LoraLoadError, LoraNotFound

        if isinstance(e, LoraNotFound):
            err = {"code": "lora_not_found", "message": str(e), "field": "loras"}
        elif isinstance(e, LoraLoadError):
            err = {"code": "lora_failed", "message": str(e), "field": "loras"}
        elif isinstance(e, torch.cuda.OutOfMemoryError if hasattr(torch.cuda, "OutOfMemoryError") else MemoryError):
            err = {"code": "out_of_memory", "message": str(e).splitlines()[0] if str(e) else "out of memory",
                   "field": None}
        else:
            err = {"code": "generation_failed", "message": f"{type(e).__name__}: {e}", "field": None}
        if self.metrics:
            self.metrics.errors.labels(err["code"]).inc()
        self.store.finish(job, J.FAILED, error=err)

    def _run_call(self, batch: list[J.Job]) -> None:
        p0 = batch[0].params
        prompts, negatives, gens, owners = [], [], [], []
        for j in batch:
            p = j.params
            for k in range(p.n):
                prompts.append(p.prompt)
                negatives.append(p.negative_prompt if p.negative_prompt is not None else self.pipe.defaults.negative_prompt)
                gens.append(torch.Generator("cpu").manual_seed(p.seed + k))
                owners.append(j)
        steps = p0.steps
        run, edit_kw, skip = self.pipe, {}, 0
        if _is_edit(p0):  # an edit: alone in its call (see `_loop`)
            from ..flow import strength_start

            run = self.edit_pipe(p0.kind)
            edit_kw = {"image": [p0.image] * len(prompts), "strength": p0.strength}
            if p0.mask is not None:
                edit_kw["mask_image"] = [p0.mask] * len(prompts)
            skip = strength_start(steps, p0.strength)  # steps cut by the strength: progress starts there
        for j in batch:
            self.store.emit(j, "running", {"batch_size": len(prompts)})
            self.store.progress(j, skip, steps)
        if self.metrics:
            self.metrics.batch_size.observe(len(prompts))
        t_last = [time.perf_counter()]
        every = self.config.preview_every

        def on_step(pipe, i, t, tensors):
            now = time.perf_counter()
            if self.metrics:
                self.metrics.step_latency.observe(now - t_last[0])
            t_last[0] = now
            self._step_boundary(batch)
            limit = self.config.request_timeout_s
            for j in batch:
                if j.cancel_requested:
                    self.store.finish(j, J.CANCELLED)  # at this step boundary; its images are dropped
                elif not j.finished and time.time() - j.created > limit:  # its batch-mates go on
                    err = {"code": "timeout", "message": f"the job ran past request_timeout_s={limit:g} s since it "
                           "was submitted and was stopped", "field": None}
                    if self.metrics:
                        self.metrics.errors.labels("timeout").inc()
                    self.store.finish(j, J.FAILED, error=err)
                elif not j.finished:
                    self.store.progress(j, skip + i + 1, steps)
            if all(j.finished for j in batch):
                raise _AllCancelled()
            if every and (i + 1) % every == 0 and skip + i + 1 < steps:
                self._previews(batch, owners, tensors["latents"], p0, skip + i + 1)
            return tensors

        kw = dict(height=p0.height, width=p0.width, num_inference_steps=steps, generator=gens,
                  guidance_scale=p0.guidance_scale, true_cfg_scale=p0.true_cfg_scale,
                  negative_prompt=negatives if p0.cfg else None, callback_on_step_end=on_step, **edit_kw)
        names = sorted({n for j in batch for n, _ in j.params.loras})
        try:
            if self.per_sample_lora:
                self.loras.ensure_loaded(self.pipe, names)
            else:
                self.loras.activate(self.pipe, p0.loras)
        except LoraNotFound:
            raise
        except Exception as e:
            raise LoraLoadError(f"LoRA {names}: cannot be loaded ({type(e).__name__}: {e})") from e
        gs, cs = [j.params.guidance_scale for j in owners], [j.params.true_cfg_scale for j in owners]
        mixed = self.per_sample_guidance and (len(set(gs)) > 1 or len(set(cs)) > 1)  # one value per image
        with self.pipe.guidance_per_sample(guidance_scale=gs, true_cfg_scale=cs if p0.cfg else None) if mixed \
                else contextlib.nullcontext():
            if self.per_sample_lora and names:  # mixed-adapter batch: one {adapter: weight} per image ({} = none)
                per_image = [{self.loras.adapter_name(n): w for n, w in j.params.loras} for j in owners]
                self.pipe.enable_lora()
                with self.pipe.lora_per_sample(per_image):
                    out = run(prompts, **kw)
            else:
                if self.per_sample_lora and self.loras.loaded:
                    self.pipe.disable_lora()
                out = run(prompts, **kw)
        for j in batch:
            if j.finished:
                continue
            data = []
            for k in range(j.params.n):
                idx = owners.index(j) + k
                params = {**out.parameters[idx], "seed": j.params.seed + k,
                          "loras": [{"name": n, "weight": w} for n, w in j.params.loras] or None}
                data.append({"b64_json": encode_image(out.images[idx], j.params.output_format, params),
                             "seed": j.params.seed + k})
            self.store.finish(j, J.SUCCEEDED, result=data)
            if self.metrics:
                self.metrics.request_latency.observe(time.time() - j.created)

    def _previews(self, batch, owners, latents, p0, step) -> None:
        """A small PNG of each live job's first image's current latents (decoded by the VAE)."""
        try:
            for j in batch:
                if j.finished:
                    continue
                idx = owners.index(j)
                with torch.no_grad():
                    img = self.pipe.decode(latents[idx : idx + 1], p0.height, p0.width)[0]
                img.thumbnail((128, 128))
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                self.store.emit(j, "preview", {"step": step, "b64_png": base64.b64encode(buf.getvalue()).decode()})
        except Exception as e:  # a preview never fails a job
            log.debug("preview failed: %s", e)
