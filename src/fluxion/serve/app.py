"""The HTTP app: `create_app(config, pipe=None, replica_init=None) -> FastAPI`.

With `config.workers = 1` one worker thread runs `pipe` (or the model the config names, loaded in a thread) in
this process. With `workers = N > 1` (no `pipe`: each replica loads the model itself) N replica processes run
the batches that N worker threads form from the one queue (`replicas.py`); `replica_init(pipe)`, a picklable
function, runs in each replica after it has loaded (tests use it to slow the model down).

Endpoints (every error is `{"error": {"code", "message", "field"}}`):
- POST /v1/images/generations: OpenAI-compatible, synchronous -> {created, data: [{b64_json, seed}]}
- POST /v1/images/edits: OpenAI-compatible multipart edit (`image`, optional `mask`: white = repaint, `strength`)
  through FluxImg2ImgPipeline / FluxInpaintPipeline `.from_pipe(pipe)` -> the generations answer. Each edit
  request runs in a pipeline call of its own (edits are never batched with other requests; its n images
  are one call, image k seeded seed + k); fields are validated before queueing (400 naming the field).
- GET /v1/models, GET /v1/loras
- POST /v1/jobs -> 202 {id, status, queue_position, poll_url, events_url}
- GET /v1/jobs/{id} -> {id, status, created, progress: {step, steps}, queue_position, result | error}
- GET /v1/jobs/{id}/events: server-sent events (see `jobs.py` for the event names and data)
- DELETE /v1/jobs/{id}: cancel (queued: at once; running: at the next step boundary; batch-mates go on)
- GET /health (503 until the model is loaded: by every replica), GET /metrics (Prometheus), GET / (the web page)
  /health and /v1/models report `workers`; /health also each replica's {index, pid, state, restarts}, a job
  the replica {index, pid} that ran it (`worker`), /metrics `fluxion_worker_busy{worker}` and
  `fluxion_replica_restarts_total{worker}`.
With an API key set, /v1/* needs `Authorization: Bearer KEY` or `X-API-Key: KEY` (or `?api_key=KEY`, for the
browser's EventSource, which cannot send headers).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import jobs as J
from .config import ServeConfig
from .loras import LoraLibrary, LoraNotFound
from .worker import Worker

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
MAX_SEED = 2**63 - 1


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def error_response(status: int, code: str, message: str, field: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status, headers=headers)


# ------------------------------------------------------------ request models


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = 1.0


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=4000)
    n: int = 1
    size: str | None = None  # "WxH"; default: the model's
    response_format: Literal["b64_json"] = "b64_json"
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED - 1024)
    steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = Field(default=None, max_length=4000)
    loras: list[LoraSpec] = Field(default_factory=list)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    # OpenAI fields accepted and ignored
    model: str | None = None
    user: str | None = None
    quality: str | None = None
    style: str | None = None


@dataclass
class EditParams(J.GenParams):
    """An edit's arguments: the generation's plus the init image, the mask (None: img2img) and the strength."""

    image: Any = None  # PIL RGB
    mask: Any = None  # PIL RGB, white = repaint; None = img2img
    strength: float = 0.6

    @property
    def kind(self) -> str:
        return "img2img" if self.mask is None else "inpaint"


EDIT_FIELDS = {"prompt": str, "n": int, "size": str, "response_format": str, "seed": int, "steps": int,
               "guidance_scale": float, "true_cfg_scale": float, "negative_prompt": str, "loras": "json",
               "output_format": str, "model": str, "user": str, "quality": str, "style": str}


def read_upload_image(data: bytes, field: str):
    """The RGB image of an uploaded file; a non-image or corrupt file is a 400 naming the field."""
    import io

    from PIL import Image, UnidentifiedImageError

    from ..images import to_rgb

    if not data:
        raise ApiError(400, "invalid_request", f"{field}: the file is empty", field)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(400, "invalid_request", f"{field}: not a readable image ({type(e).__name__})", field) from None


class Metrics:
    def __init__(self, store: J.JobStore):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("fluxion_queue_depth", "jobs waiting in the queue", registry=r)
        self.queue_depth.set_function(store.queue_depth)
        self.batch_size = Histogram("fluxion_batch_size", "images per pipeline call", registry=r,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.step_latency = Histogram("fluxion_step_seconds", "time per denoising step (one batch)", registry=r)
        self.request_latency = Histogram("fluxion_request_seconds", "time from submission to result", registry=r)
        self.requests = Counter("fluxion_requests", "requests accepted", ["endpoint"], registry=r)
        self.errors = Counter("fluxion_errors", "errors answered or jobs failed", ["code"], registry=r)
        self.rejected = Counter("fluxion_queue_rejections", "requests refused with 429 (queue full)", registry=r)
        self.workers = Gauge("fluxion_workers", "model replicas (worker threads / processes) configured", registry=r)
        self.worker_busy = Gauge("fluxion_worker_busy", "1 while the worker runs a batch", ["worker"], registry=r)
        self.replica_restarts = Counter("fluxion_replica_restarts", "replica processes restarted after ending",
                                        ["worker"], registry=r)


class BodyLimit:
    """ASGI middleware: 413 for a request body over the limit, whether it says its length (Content-Length,
    refused before reading) or streams without one (chunked: counted as it arrives, refused at the limit)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def too_large(self, size: str):
        return error_response(413, "body_too_large", f"the request body is {size} bytes; the limit is {self.limit}",
                              None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                return await self.too_large(str(int(v)))(scope, receive, send)
        state = {"received": 0, "refused": False}

        async def counted():
            message = await receive()
            if message["type"] == "http.request" and not state["refused"]:
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.limit:  # answer 413 now; the app sees the client leave
                    state["refused"] = True
                    await self.too_large(f"more than {self.limit}")(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):  # after the 413, whatever the app still answers is dropped
            if not state["refused"]:
                await send(message)

        await self.app(scope, counted, guarded_send)


def create_app(config: ServeConfig | None = None, pipe=None, replica_init=None) -> FastAPI:
    config = (config or ServeConfig()).validate()
    if config.workers > 1 and pipe is not None:
        raise ValueError(f"workers={config.workers}: each replica process loads the model itself; pass no pipe "
                         "(or use workers=1 to serve the given pipeline in this process)")
    store = J.JobStore(config.max_queue, config.job_ttl_s)
    metrics = Metrics(store)
    metrics.workers.set(config.workers)
    for i in range(config.workers):
        metrics.worker_busy.labels(str(i)).set(0)
    loras = LoraLibrary(config.lora_dir, config.lora_cache)
    state = {"pipe": pipe, "worker": None, "workers": [], "replicas": [], "load_error": None}

    def start_worker(p) -> None:
        worker = Worker(p, store, loras, config, metrics)
        worker.per_sample_lora = hasattr(p, "lora_per_sample")  # mixed-adapter batching
        worker.start()
        state["pipe"], state["worker"] = p, worker

    def load() -> None:
        try:
            from .worker import load_pipeline

            p = load_pipeline(config)
            start_worker(p)
            log.info("model loaded: %s", p.model_path)
        except Exception as e:  # health reports it
            log.exception("loading the model failed")
            state["load_error"] = f"{type(e).__name__}: {e}"

    def load_replicas() -> None:
        """workers > 1: start every replica process (they load in parallel), then one worker thread each."""
        from .replicas import RemoteWorker, Replica

        try:
            replicas = [Replica(config, i, replica_init) for i in range(config.workers)]
            state["replicas"] = replicas
            for r in replicas:
                r.start()
            for r in replicas:
                r.wait_ready(lambda: state.get("stopping", False))
            workers = [RemoteWorker(r, store, loras, config, metrics) for r in replicas]
            for w in workers:
                w.start()
            state["workers"] = workers
            state["pipe"], state["worker"] = workers[0].pipe, workers[0]
            log.info("model loaded by %d replicas (processes %s): %s", len(workers),
                     ", ".join(str(r.pid) for r in replicas), workers[0].pipe.model_path)
        except Exception as e:  # health reports it; the replicas that did load are stopped
            log.exception("starting the replicas failed")
            state["load_error"] = f"{type(e).__name__}: {e}"
            for r in state["replicas"]:
                r.close(timeout=2)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if state["pipe"] is not None:
            start_worker(state["pipe"])
        else:
            target = load_replicas if config.workers > 1 else load
            threading.Thread(target=target, name="fluxion-serve-load", daemon=True).start()
        yield
        state["stopping"] = True
        if state["workers"]:  # graceful: queued jobs cancelled, running ones stop at the next step, replicas exit
            for w in state["workers"]:
                w.stopping = True
            await asyncio.gather(*(asyncio.to_thread(w.stop) for w in state["workers"]))
        elif state["worker"] is not None:
            await asyncio.to_thread(state["worker"].stop)
        else:  # still loading: stop the replicas started so far
            for r in state["replicas"]:
                await asyncio.to_thread(r.close, 2)

    app = FastAPI(title="fluxion", version="1", lifespan=lifespan)
    app.state.store, app.state.metrics, app.state.loras, app.state.serve = store, metrics, loras, state
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    # ------------------------------------------------------------ errors

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        metrics.errors.labels(e.code).inc()
        return error_response(e.status, e.code, e.message, e.field, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        field = ".".join(loc) or None
        metrics.errors.labels("invalid_request").inc()
        return error_response(400, "invalid_request", f"{field or 'body'}: {first.get('msg', 'invalid')}", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(e.status_code, code, str(e.detail), None)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("internal error")
        metrics.errors.labels("internal").inc()
        return error_response(500, "internal", f"{type(e).__name__}: {e}", None)

    # ------------------------------------------------------------ helpers

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
        given = given or request.query_params.get("api_key")
        if not given or not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise ApiError(401, "unauthorized", "a valid API key is required (Authorization: Bearer KEY)", None,
                           {"WWW-Authenticate": "Bearer"})

    def ready_pipe():
        if state["worker"] is None:
            raise ApiError(503, "not_ready", state["load_error"] or "the model is still loading", None,
                           {"Retry-After": "5"})
        return state["pipe"]

    def params_of(req: GenerationRequest, pipe=None) -> J.GenParams:
        base = ready_pipe()
        pipe = pipe or base
        d = pipe.defaults
        if req.n < 1 or req.n > config.max_n:
            raise ApiError(400, "policy_violation", f"n must be between 1 and {config.max_n}, got {req.n}", "n")
        multiple = pipe.vae_scale_factor * 2
        if req.size is None:
            width = height = d.sample_size * pipe.vae_scale_factor
        else:
            m = SIZE.match(req.size)
            if not m:
                raise ApiError(400, "invalid_request", f"size must be 'WIDTHxHEIGHT' such as '512x512', got "
                               f"{req.size!r}", "size")
            width, height = int(m.group(1)), int(m.group(2))
            if width < multiple or height < multiple or width % multiple or height % multiple:
                raise ApiError(400, "invalid_request", f"size: width and height must be positive multiples of "
                               f"{multiple}, got {width}x{height}", "size")
        if width * height > config.max_pixels:
            raise ApiError(400, "policy_violation", f"size {width}x{height} is {width * height} pixels; this server "
                           f"allows at most {config.max_pixels}", "size")
        steps = req.steps if req.steps is not None else d.num_inference_steps
        if steps > config.max_steps:
            raise ApiError(400, "policy_violation", f"steps must be at most {config.max_steps}, got {steps}", "steps")
        g = req.guidance_scale if req.guidance_scale is not None else d.guidance_scale
        cfg = req.true_cfg_scale if req.true_cfg_scale is not None else d.true_cfg_scale
        for name, v in (("guidance_scale", g), ("true_cfg_scale", cfg)):
            if not math.isfinite(v) or v < 0 or v > 100:
                raise ApiError(400, "invalid_request", f"{name} must be a number in [0, 100], got {v}", name)
        names = [s.name for s in req.loras]
        if len(set(names)) != len(names):
            raise ApiError(400, "invalid_request", "loras: each adapter may appear once", "loras")
        for i, s in enumerate(req.loras):
            if not math.isfinite(s.weight) or abs(s.weight) > 10:
                raise ApiError(400, "invalid_request", f"loras[{i}].weight must be a number in [-10, 10]",
                               f"loras.{i}.weight")
            try:
                loras.resolve(s.name)
            except LoraNotFound as e:
                raise ApiError(404, "lora_not_found", str(e), f"loras.{i}.name") from None
        seed = req.seed if req.seed is not None else random.randrange(0, 2**32)
        return J.GenParams(prompt=req.prompt, n=req.n, width=width, height=height, steps=steps, seed=seed,
                           guidance_scale=float(g), true_cfg_scale=float(cfg), negative_prompt=req.negative_prompt,
                           loras=tuple((s.name, float(s.weight)) for s in req.loras),
                           output_format=req.output_format)

    def submit(params: J.GenParams) -> J.Job:
        try:
            return store.submit(params)
        except J.QueueFull as e:
            metrics.rejected.inc()
            raise ApiError(429, "queue_full", str(e), None, {"Retry-After": "2"}) from None

    def find(job_id: str) -> J.Job:
        try:
            job = store.get(job_id)
        except KeyError:
            raise ApiError(410, "job_expired", f"job {job_id} finished more than {config.job_ttl_s:g} s ago and "
                           "was dropped", None) from None
        if job is None:
            raise ApiError(404, "job_not_found", f"no job {job_id}", None)
        return job

    def job_json(job: J.Job) -> dict:
        out = {"id": job.id, "status": job.status, "created": int(job.created),
               "progress": {"step": job.step, "steps": job.params.steps},
               "queue_position": store.position(job), "seed": job.params.seed,
               "cancel_requested": job.cancel_requested}
        if job.worker is not None:
            out["worker"] = job.worker
        if job.status == J.SUCCEEDED:
            out["result"] = {"created": int(job.finished_at), "data": job.result}
        if job.status == J.FAILED:
            out["error"] = job.error
        return out

    # ------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        if state["worker"] is None:
            msg = state["load_error"] or "loading the model"
            if config.workers > 1 and not state["load_error"]:
                ready = sum(r.ready for r in state["replicas"])
                msg += f" ({ready} of {config.workers} replicas ready)"
            return JSONResponse({"status": "error" if state["load_error"] else "loading", "message": msg,
                                 "workers": config.workers}, 503)
        out = {"status": "ok", "model": state["pipe"].model_path, "queue_depth": store.queue_depth(),
               "workers": config.workers}
        if state["workers"]:
            out["replicas"] = [w.describe() for w in state["workers"]]
        return out

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        page = STATIC / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return HTMLResponse("<!doctype html><title>fluxion</title><p>fluxion serve is running; the API is under "
                            "<code>/v1</code> (see <a href='/docs'>/docs</a>).</p>")

    @app.get("/static/{name:path}")
    async def static(name: str):
        from ..files import inside

        try:
            path = inside(STATIC, name, "the static path")
        except ValueError:
            raise ApiError(404, "not_found", f"no static file {name!r}") from None
        if not path.is_file():
            raise ApiError(404, "not_found", f"no static file {name!r}")
        return FileResponse(path)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        pipe = ready_pipe()
        d = pipe.defaults
        side = d.sample_size * pipe.vae_scale_factor
        return {"object": "list", "data": [{
            "id": Path(pipe.model_path or "model").name, "object": "model", "owned_by": "fluxion",
            "path": pipe.model_path,
            "defaults": {"size": f"{side}x{side}", "steps": d.num_inference_steps, "guidance_scale": d.guidance_scale,
                         "true_cfg_scale": d.true_cfg_scale, "negative_prompt": d.negative_prompt},
            "limits": {"max_pixels": config.max_pixels, "max_steps": config.max_steps, "max_n": config.max_n,
                       "max_batch": config.max_batch, "size_multiple": pipe.vae_scale_factor * 2},
            "workers": config.workers,
        }]}

    @app.get("/v1/loras")
    async def list_loras(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"name": n, "loaded": n in loras.loaded} for n in loras.available()]}

    async def answer(job: J.Job) -> dict:
        """Wait for a job submitted by a synchronous endpoint; its result as /v1/images/generations answers."""
        deadline, index = time.monotonic() + config.request_timeout_s, 0
        while not job.finished and time.monotonic() < deadline:
            index += len(await store.next_events(job, index, min(5.0, max(0.0, deadline - time.monotonic()))))
        if not job.finished:
            store.cancel(job)
            raise ApiError(504, "timeout", f"the image was not ready within {config.request_timeout_s:g} s; the "
                           "job was cancelled (use POST /v1/jobs for long work)")
        if job.status == J.SUCCEEDED:
            return {"created": int(job.finished_at), "data": job.result}
        if job.status == J.FAILED:
            e = job.error
            status = {"lora_not_found": 404, "lora_failed": 422, "out_of_memory": 507}.get(e["code"], 500)
            raise ApiError(status, e["code"], e["message"], e.get("field"))
        raise ApiError(503, "cancelled", "the job was cancelled (the service is shutting down)")

    @app.post("/v1/images/generations")
    async def generations(req: GenerationRequest, request: Request):
        check_key(request)
        metrics.requests.labels("generations").inc()
        return await answer(submit(params_of(req)))

    async def edit_params(request: Request) -> EditParams:
        """Parse and check a multipart edit request (image, optional mask, strength, the generation fields)."""
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, "invalid_request", "POST /v1/images/edits takes multipart/form-data (an `image` "
                           "file, an optional `mask` file, `prompt` and the other fields)", "image")
        try:
            form = await request.form(max_files=2, max_fields=64)
        except Exception as e:
            raise ApiError(400, "invalid_request", f"the multipart body cannot be read ({e})", None) from None
        files, fields = {}, {}
        for key, value in form.multi_items():
            if key in files or key in fields:
                raise ApiError(400, "invalid_request", f"{key}: given more than once", key)
            if hasattr(value, "read"):
                if key not in ("image", "mask"):
                    raise ApiError(400, "invalid_request", f"{key}: a file is accepted only as image or mask", key)
                files[key] = await value.read()
            else:
                fields[key] = value
        extra = sorted(set(fields) - set(EDIT_FIELDS) - {"strength", "image", "mask"})
        if extra:
            raise ApiError(400, "invalid_request", f"{extra[0]}: unknown field", extra[0])
        for key in ("image", "mask"):
            if key in fields:
                raise ApiError(400, "invalid_request", f"{key}: must be a file (multipart file part)", key)
        if "image" not in files:
            raise ApiError(400, "invalid_request", "image: an image file is required", "image")
        image = read_upload_image(files["image"], "image")
        mask = read_upload_image(files["mask"], "mask") if "mask" in files else None
        if mask is not None and mask.size != image.size:
            raise ApiError(400, "invalid_request", f"mask: its size {mask.size[0]}x{mask.size[1]} differs from the "
                           f"image's {image.size[0]}x{image.size[1]}", "mask")
        body = {}
        for key, kind in EDIT_FIELDS.items():
            if key not in fields:
                continue
            v = fields[key]
            if kind == "json":
                try:
                    body[key] = json.loads(v) if v.strip() else []
                except ValueError:
                    raise ApiError(400, "invalid_request", f"{key}: not valid JSON (a list of {{name, weight}})",
                                   key) from None
            else:
                body[key] = v
        try:
            req = GenerationRequest(**body)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(x) for x in first.get("loc", ())) or None
            raise ApiError(400, "invalid_request", f"{field or 'body'}: {first.get('msg', 'invalid')}",
                           field) from None
        ready_pipe()
        pipe = state["worker"].edit_pipe("img2img" if mask is None else "inpaint")
        try:
            strength = float(fields["strength"]) if "strength" in fields else float(pipe.defaults.strength)
        except ValueError:
            raise ApiError(400, "invalid_request", f"strength: not a number ({fields['strength']!r})",
                           "strength") from None
        if not math.isfinite(strength) or not 0 < strength <= 1:
            raise ApiError(400, "invalid_request", f"strength must be in (0, 1], got {strength}", "strength")
        p = params_of(req, pipe)
        return EditParams(**{k: getattr(p, k) for k in J.GenParams.__dataclass_fields__}, image=image, mask=mask,
                          strength=strength)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        check_key(request)
        metrics.requests.labels("edits").inc()
        return await answer(submit(await edit_params(request)))

    @app.post("/v1/jobs", status_code=202)
    async def create_job(req: GenerationRequest, request: Request):
        check_key(request)
        metrics.requests.labels("jobs").inc()
        job = submit(params_of(req))
        return JSONResponse({"id": job.id, "status": job.status, "queue_position": store.position(job),
                             "seed": job.params.seed, "poll_url": f"/v1/jobs/{job.id}",
                             "events_url": f"/v1/jobs/{job.id}/events"}, 202)

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request):
        check_key(request)
        return job_json(find(job_id))

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request):
        check_key(request)
        job = find(job_id)
        if not store.cancel(job):
            raise ApiError(409, "job_finished", f"job {job_id} already {job.status}")
        return job_json(job)

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        check_key(request)
        job = find(job_id)

        async def stream():
            index, idle = 0, 0.0
            while True:
                events = await store.next_events(job, index, 1.0)
                if not events:
                    if await request.is_disconnected():
                        return
                    idle += 1.0
                    if idle >= 15:
                        idle = 0.0
                        yield ": keep-alive\n\n"
                    continue
                idle = 0.0
                for name, data in events:
                    index += 1
                    yield f"event: {name}\ndata: {json.dumps({'id': job.id, **data})}\n\n"
                    if name in J.TERMINAL_EVENTS:
                        return

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def serve(config: ServeConfig) -> None:
    """Run the service with uvicorn until interrupted (Ctrl-C: graceful shutdown)."""
    import uvicorn

    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info")
