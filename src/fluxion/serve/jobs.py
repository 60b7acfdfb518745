"""Jobs and the job store: states, queue positions, TTL (then 410), and each job's event log for SSE.

States: queued -> running -> succeeded | failed | cancelled (a queued job may go straight to cancelled).
Every state change and progress step appends an event `(name, data)` to the job's log; SSE readers replay the
log from the start and then follow it, so a late reader misses nothing. Events: `queued` {position},
`running` {batch_size}, `progress` {step, steps}, `preview` {step, b64_png}, `result` {data: [{b64_json, seed}]},
`error` {error: {code, message, field}}, `cancelled` {}.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
TERMINAL_EVENTS = ("result", "error", "cancelled")


class QueueFull(Exception):
    """The queue holds max_queue jobs already."""


@dataclass
class GenParams:
    """One request's generation arguments, defaults filled in (what the worker runs)."""

    prompt: str
    n: int
    width: int
    height: int
    steps: int
    seed: int
    guidance_scale: float
    true_cfg_scale: float
    negative_prompt: str | None
    loras: tuple[tuple[str, float], ...] = ()
    output_format: str = "png"

    @property
    def cfg(self) -> bool:
        return self.true_cfg_scale != 1.0


@dataclass
class Job:
    id: str
    params: GenParams
    created: float = field(default_factory=time.time)
    status: str = QUEUED
    step: int = 0
    finished_at: float | None = None
    result: list[dict] | None = None  # [{b64_json, seed}]
    error: dict | None = None  # {code, message, field}
    events: list[tuple[str, dict]] = field(default_factory=list)
    cancel_requested: bool = False
    last_position: int | None = None
    watchers: list = field(default_factory=list)  # (event loop, asyncio.Event) of async readers
    done: threading.Event = field(default_factory=threading.Event)
    worker: dict | None = None  # with several workers: {index, pid} of the replica that ran it

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class JobStore:
    """All jobs by id, the FIFO of queued ones, and the condition the worker waits on."""

    def __init__(self, max_queue: int, ttl_s: float):
        self.max_queue = max_queue
        self.ttl_s = ttl_s
        self.cond = threading.Condition()
        self.jobs: dict[str, Job] = {}
        self.pending: OrderedDict[str, Job] = OrderedDict()  # queued, oldest first
        self.expired: set[str] = set()
        self.closed = False

    # ------------------------------------------------------------ events

    def _emit(self, job: Job, name: str, data: dict) -> None:  # holding cond
        job.events.append((name, data))
        self.cond.notify_all()
        for loop, ev in job.watchers:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that loop is closed
                pass

    async def next_events(self, job: Job, index: int, timeout: float) -> list[tuple[str, dict]]:
        """For async readers (SSE, the synchronous endpoint): the job's events from `index` on, waiting up to
        `timeout` seconds for one without holding a thread."""
        import asyncio

        ev = asyncio.Event()
        entry = (asyncio.get_running_loop(), ev)
        with self.cond:
            if len(job.events) > index or job.finished:
                return list(job.events[index:])
            job.watchers.append(entry)
        try:
            try:
                await asyncio.wait_for(ev.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            with self.cond:
                return list(job.events[index:])
        finally:
            with self.cond:
                job.watchers.remove(entry)

    def emit(self, job: Job, name: str, data: dict) -> None:
        with self.cond:
            self._emit(job, name, data)

    def _positions_changed(self) -> None:  # holding cond
        for i, j in enumerate(self.pending.values()):
            if j.last_position != i:
                j.last_position = i
                self._emit(j, "queued", {"position": i})

    # ------------------------------------------------------------ clients' side

    def submit(self, params: GenParams) -> Job:
        with self.cond:
            self._expire()
            if self.closed:
                raise QueueFull("the service is shutting down")
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting)")
            job = Job(uuid.uuid4().hex, params)
            self.jobs[job.id] = job
            self.pending[job.id] = job
            job.last_position = len(self.pending) - 1
            self._emit(job, "queued", {"position": job.last_position})
            return job

    def get(self, job_id: str) -> Job | None:
        """The job, or None; raises KeyError('expired') for a job past its TTL."""
        with self.cond:
            self._expire()
            if job_id in self.expired:
                raise KeyError("expired")
            return self.jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        with self.cond:
            if job.status != QUEUED:
                return None
            for i, k in enumerate(self.pending):
                if k == job.id:
                    return i
            return None

    def queue_depth(self) -> int:
        with self.cond:
            return len(self.pending)

    def cancel(self, job: Job) -> bool:
        """Cancel a queued job now, or ask a running one to stop at its next step boundary. False if finished."""
        with self.cond:
            if job.finished:
                return False
            job.cancel_requested = True
            if job.status == QUEUED:
                self.pending.pop(job.id, None)
                self._finish(job, CANCELLED)
                self._positions_changed()
            return True

    # ------------------------------------------------------------ worker's side

    def take(self, timeout: float | None = None) -> Job | None:
        """Wait for the oldest queued job and mark it running (None on timeout or when closed)."""
        with self.cond:
            if not self.pending and not self.closed:
                self.cond.wait(timeout)
            if not self.pending or self.closed:
                return None
            _, job = self.pending.popitem(last=False)
            job.status = RUNNING
            self._positions_changed()
            return job

    def take_matching(self, match, limit: int) -> list[Job]:
        """Take up to `limit` queued jobs (oldest first) for which `match(job)` holds, marking them running."""
        with self.cond:
            out = []
            for job in list(self.pending.values()):
                if len(out) >= limit:
                    break
                if match(job):
                    del self.pending[job.id]
                    job.status = RUNNING
                    out.append(job)
            if out:
                self._positions_changed()
            return out

    def wait_new(self, timeout: float) -> None:
        with self.cond:
            self.cond.wait(timeout)

    def _finish(self, job: Job, status: str, result=None, error=None) -> None:  # holding cond
        job.status = status
        job.finished_at = time.time()
        job.result, job.error = result, error
        if status == SUCCEEDED:
            self._emit(job, "result", {"data": result})
        elif status == FAILED:
            self._emit(job, "error", {"error": error})
        else:
            self._emit(job, "cancelled", {})
        job.done.set()

    def finish(self, job: Job, status: str, result=None, error=None) -> bool:
        """Finish a job unless it already is (False then)."""
        with self.cond:
            if job.finished:
                return False
            self._finish(job, status, result, error)
            return True

    def progress(self, job: Job, step: int, steps: int) -> None:
        with self.cond:
            if not job.finished:
                job.step = step
                self._emit(job, "progress", {"step": step, "steps": steps})

    def close(self) -> list[Job]:
        """Stop taking jobs; cancel the queued ones (returned)."""
        with self.cond:
            self.closed = True
            left = list(self.pending.values())
            self.pending.clear()
            for job in left:
                job.cancel_requested = True
                self._finish(job, CANCELLED)
            self.cond.notify_all()
            return left

    def _expire(self) -> None:  # holding cond
        now = time.time()
        for k, job in list(self.jobs.items()):
            if job.finished_at is not None and now - job.finished_at > self.ttl_s:
                del self.jobs[k]
                self.expired.add(k)
