"""Data-parallel serving (`ServeConfig.workers = N > 1`, `fluxion serve --workers N`): N model replicas, one
process each, behind the one job queue.

Design. The queue, the batching and the job bookkeeping stay in the app process, unchanged: there are N
`RemoteWorker` threads, each a `worker.Worker` (the same `_loop`: the same batching, `batch_key`, fail-alone
re-runs) bound to one `Replica` process. Only the pipeline call crosses the process boundary: where the
in-process worker calls `_run_call(batch)`, a `RemoteWorker` sends the batch (each job's id, `GenParams` /
edit params with their images, creation time, cancel flag) to its replica, and the replica runs the very same
`Worker._run_call` on its own pipeline (loaded by itself with the same settings, `worker.load_pipeline`), with a
`_ProxyStore` and `_ProxyMetrics` that send every `emit` / `progress` / `finish` / metric back to the app, which
applies them to the real jobs. So per-image seeds, per-sample LoRA and guidance, edits, previews and the result
encoding are one code path whatever N is, and a job's image is the offline image exactly as with one worker.

Rejected alternative: N processes that each take jobs from a shared `multiprocessing` queue and batch by
themselves. Jobs would then be owned by other processes: cancellation, timeouts, queue positions, SSE events and
the TTL would need a shared store (a manager process or a database) and a second batching implementation; a job
taken by a replica that dies would be lost from the app's view. Keeping the jobs in the app makes a replica a
pure function from "a batch" to "its events", so a crash can only cost the batch it held.

Protocol (one duplex `multiprocessing.Pipe` per replica; spawn context): app -> replica `("run", jobs)` or
`("exit",)`; replica -> app `("ready", info)` | `("load_failed", message)` once, then per call any number of
`("emit", id, name, data)`, `("progress", id, step, steps)`, `("finish", id, status, result, error)`,
`("metric", name, labels, method, value)`, and `("step",)` at each step boundary, which the app answers with
`("cancel", ids)`: the jobs of the batch cancelled or asked to stop since (DELETE, shutdown, the synchronous
endpoint's 504), so cancellation and `request_timeout_s` act at step boundaries exactly as in-process; the call
ends with `("done",)` or `("raised", kind, payload)` (the exception, re-raised in the app so the fail-alone
re-run and the error codes are unchanged). Bounded: a worker thread has one call in flight on its pipe and the
replica waits for the answer at every step, so what is in transit is at most one step's messages; the jobs
wait in the job store, bounded by `max_queue`.

Failures. A replica that dies (killed, out of memory, a crash in native code) is seen as the end of its pipe:
the jobs of the batch it held fail with code `worker_crashed` (the message names the replica, its process and
how it ended), the others are untouched, and the replica is restarted before its thread takes another job (the
other replicas go on serving). Shutdown cancels queued jobs, stops running ones at the next step, then asks
each replica to exit (terminated after 10 s).

Threads: each replica sets `torch.set_num_threads(config.threads_per_replica())`: `replica_threads`, else the
usable cores split evenly (so N replicas on a CPU do not fight over the same cores).
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time
from types import SimpleNamespace

from . import jobs as J
from .worker import Worker, _AllCancelled

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 600.0  # a replica that has not loaded its model after this long is given up on
METRIC_NAMES = ("batch_size", "step_latency", "request_latency", "errors")


class ReplicaDied(Exception):
    """The replica's process ended (its pipe closed) while the app waited for it."""


class ReplicaLoadFailed(RuntimeError):
    """The replica could not load the model."""


# ------------------------------------------------------------ the replica process


class _ProxyStore:
    """What `Worker._run_call` needs of a JobStore, in the replica: each call is sent to the app."""

    def __init__(self, conn):
        self.conn = conn

    def emit(self, job: J.Job, name: str, data: dict) -> None:
        self.conn.send(("emit", job.id, name, data))

    def progress(self, job: J.Job, step: int, steps: int) -> None:
        if not job.finished:
            job.step = step
            self.conn.send(("progress", job.id, step, steps))

    def finish(self, job: J.Job, status: str, result=None, error=None) -> bool:
        if job.finished:
            return False
        job.status, job.result, job.error = status, result, error
        self.conn.send(("finish", job.id, status, result, error))
        return True


class _ProxyMetric:
    def __init__(self, conn, name: str, labels: tuple = ()):
        self.conn, self.name, self.labelvalues = conn, name, labels

    def labels(self, *values):
        return _ProxyMetric(self.conn, self.name, tuple(str(v) for v in values))

    def observe(self, value: float) -> None:
        self.conn.send(("metric", self.name, self.labelvalues, "observe", float(value)))

    def inc(self, value: float = 1.0) -> None:
        self.conn.send(("metric", self.name, self.labelvalues, "inc", float(value)))


class _ProxyMetrics:
    def __init__(self, conn):
        for name in METRIC_NAMES:
            setattr(self, name, _ProxyMetric(conn, name))


class _ReplicaSideWorker(Worker):
    """The replica's worker: no thread of its own; `_run_call` is driven by `replica_main`."""

    def __init__(self, pipe, conn, loras, config):
        super().__init__(pipe, _ProxyStore(conn), loras, config, _ProxyMetrics(conn))
        self.conn = conn
        self.per_sample_lora = hasattr(pipe, "lora_per_sample")

    def _step_boundary(self, batch: list[J.Job]) -> None:
        self.conn.send(("step",))
        kind, ids = self.conn.recv()
        assert kind == "cancel", kind
        for j in batch:
            if j.id in ids:
                j.cancel_requested = True


def _raised(e: BaseException) -> tuple:
    """The `("raised", kind, payload)` message for an exception: pickled when it survives a round trip."""
    if isinstance(e, _AllCancelled):
        return ("raised", "all_cancelled", None)
    try:  # between the server and the replica it spawned (the pipe pickles every message anyway); no file is read
        data = pickle.dumps(e)
        pickle.loads(data)
        return ("raised", "pickled", data)
    except Exception:
        return ("raised", "text", (type(e).__name__, str(e)))


def replica_main(conn, config, index: int, threads: int, init=None) -> None:
    """The replica process: load the model, say ready, then run the calls its worker thread sends."""
    import torch

    from .loras import LoraLibrary
    from .worker import load_pipeline

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the app stops us itself
    try:
        torch.set_num_threads(threads)
        pipe = load_pipeline(config)
        if init is not None:
            init(pipe)
        worker = _ReplicaSideWorker(pipe, conn, LoraLibrary(config.lora_dir, config.lora_cache), config)
        edit_defaults = {}
        for kind in ("img2img", "inpaint"):
            try:
                edit_defaults[kind] = worker.edit_pipe(kind).defaults
            except Exception:  # edits then use the text-to-image defaults
                edit_defaults[kind] = pipe.defaults
        info = {"pid": os.getpid(), "model_path": pipe.model_path, "defaults": pipe.defaults,
                "vae_scale_factor": pipe.vae_scale_factor, "per_sample_lora": worker.per_sample_lora,
                "per_sample_guidance": worker.per_sample_guidance, "edit_defaults": edit_defaults,
                "threads": torch.get_num_threads()}
    except BaseException as e:
        conn.send(("load_failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", info))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the app went away
            return
        if msg[0] != "run":
            return
        jobs = [J.Job(id=i, params=p, created=created, cancel_requested=cancel) for i, p, created, cancel in msg[1]]
        try:
            worker._run_call(jobs)
            reply = ("done",)
        except BaseException as e:  # reported to the app, which fails or re-runs the jobs
            reply = _raised(e)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


# ------------------------------------------------------------ the app's side


def _ended(exitcode) -> str:
    if exitcode is None:
        return "its pipe closed"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class Replica:
    """One replica process and the app's end of its pipe."""

    def __init__(self, config, index: int, init=None):
        self.config, self.index, self.init = config, index, init
        self.proc = None
        self.conn = None
        self.info: dict | None = None  # the last `ready` message's (kept while restarting)
        self.ready = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.ready and self.proc.is_alive()

    def start(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.ready = False
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=replica_main, name=f"fluxion-serve-replica-{self.index}", daemon=True,
                                args=(child, self.config, self.index, self.config.threads_per_replica(), self.init))
        self.proc.start()
        child.close()  # so that the replica's death closes the pipe (EOF here)

    def wait_ready(self, stopping=lambda: False, timeout: float = READY_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stopping():
            try:
                msg = self.recv(0.2)
            except ReplicaDied:
                raise ReplicaLoadFailed(f"replica {self.index} (process {self.pid}) ended while loading the model "
                                        f"({_ended(self.proc.exitcode)})") from None
            if msg is None:
                continue
            if msg[0] == "ready":
                self.info, self.ready = msg[1], True
                return self.info
            raise ReplicaLoadFailed(f"replica {self.index}: loading the model failed: {msg[1]}")
        raise ReplicaLoadFailed(f"replica {self.index}: " + ("the service is stopping" if stopping() else
                                                            f"not ready after {timeout:g} s"))

    def send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except (EOFError, OSError) as e:
            raise ReplicaDied(str(e)) from None

    def recv(self, timeout: float | None = None):
        """The next message; None after `timeout` s (None: wait as long as the process lives); ReplicaDied."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                if self.conn.poll(0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))):
                    return self.conn.recv()
            except (EOFError, OSError):
                raise ReplicaDied("the pipe closed") from None
            if not self.proc.is_alive() and not self._readable():
                raise ReplicaDied("the process ended")
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _readable(self) -> bool:
        try:
            return self.conn.poll(0)
        except (EOFError, OSError):
            return False

    def ended(self) -> str:
        """How the process ended (waits briefly for its exit code)."""
        if self.proc is None:
            return "not started"
        self.proc.join(5)
        return _ended(self.proc.exitcode)

    def close(self, timeout: float = 10.0) -> None:
        """Ask the replica to exit; terminate it after `timeout` s, kill it after 5 more."""
        if self.proc is None:
            return
        try:
            self.conn.send(("exit",))
        except (EOFError, OSError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        try:
            self.conn.close()
        except OSError:
            pass


def pipe_info(info: dict, defaults=None) -> SimpleNamespace:
    """What the app reads of a pipeline (defaults, VAE scale factor, model path), from a replica's `ready`."""
    return SimpleNamespace(defaults=defaults or info["defaults"], vae_scale_factor=info["vae_scale_factor"],
                           model_path=info["model_path"])


class RemoteWorker(Worker):
    """A worker thread of the app (batching as `Worker`) whose pipeline calls run in its replica process."""

    def __init__(self, replica: Replica, store: J.JobStore, loras, config, metrics=None):
        info = replica.info
        super().__init__(pipe_info(info), store, loras, config, metrics)
        self.replica, self.index = replica, replica.index
        self.per_sample_lora = info["per_sample_lora"]
        self.per_sample_guidance = info["per_sample_guidance"]
        self.state = "ready"  # ready | restarting | failed
        self.restarts = 0
        self.last_error: str | None = None
        self.thread.name = f"fluxion-serve-worker-{self.index}"
        self._stop_event = threading.Event()

    def describe(self) -> dict:
        return {"index": self.index, "pid": self.replica.pid, "state": "busy" if self.busy else self.state,
                "restarts": self.restarts, **({"error": self.last_error} if self.last_error else {})}

    def edit_pipe(self, kind: str):
        return pipe_info(self.replica.info, self.replica.info["edit_defaults"][kind])

    def stop(self, timeout: float = 30.0) -> None:
        self._stop_event.set()
        super().stop(timeout)
        self.replica.close()

    # ------------------------------------------------------------ hooks

    def _ensure_ready(self) -> bool:
        if self.replica.alive():
            return True
        if self.stopping:
            return False
        self.state = "restarting"
        self.restarts += 1
        if self.metrics is not None:
            self.metrics.replica_restarts.labels(str(self.index)).inc()
        log.warning("replica %d: restarting", self.index)
        try:
            if self.replica.proc is not None:
                self.replica.close(timeout=1)
            self.replica.start()
            self.replica.wait_ready(lambda: self.stopping)
        except Exception as e:
            self.state, self.last_error = "failed", f"{type(e).__name__}: {e}"
            log.error("replica %d: restart failed: %s", self.index, e)
            self._stop_event.wait(5)  # try again later; the other replicas go on serving
            return False
        self.state, self.last_error = "ready", None
        return True

    def _run_call(self, batch: list[J.Job]) -> None:
        """Run the batch in the replica (see the module docstring); the jobs of a replica that dies fail."""
        by_id = {j.id: j for j in batch}
        for j in batch:
            j.worker = {"index": self.index, "pid": self.replica.pid}
        raised = None
        try:
            self.replica.send(("run", [(j.id, j.params, j.created, j.cancel_requested) for j in batch]))
            while True:
                msg = self.replica.recv()
                kind = msg[0]
                if kind == "step":
                    self.replica.send(("cancel", [j.id for j in batch if j.cancel_requested]))
                elif kind == "emit":
                    self.store.emit(by_id[msg[1]], msg[2], msg[3])
                elif kind == "progress":
                    self.store.progress(by_id[msg[1]], msg[2], msg[3])
                elif kind == "finish":
                    self.store.finish(by_id[msg[1]], msg[2], result=msg[3], error=msg[4])
                elif kind == "metric":
                    self._metric(*msg[1:])
                elif kind == "done":
                    return
                elif kind == "raised":  # the call failed in the replica, which is ready for the next one
                    raised = self._exception(msg[1], msg[2])
                    break
                else:
                    raise RuntimeError(f"replica {self.index}: unexpected message {kind!r}")
        except ReplicaDied:
            how = self.replica.ended()
            err = {"code": "worker_crashed", "field": None,
                   "message": f"the model replica {self.index} (process {self.replica.pid}) running this job ended "
                              f"unexpectedly ({how}); the job was not completed. The replica is being restarted: "
                              "submit the job again."}
            log.error("replica %d (process %s) ended (%s) during a batch of %d job(s)", self.index,
                      self.replica.pid, how, len(batch))
            self.replica.ready = False  # `_ensure_ready` restarts it before this thread takes another job
            for j in batch:
                if not j.finished and self.metrics is not None:
                    self.metrics.errors.labels("worker_crashed").inc()
                self.store.finish(j, J.FAILED, error=err)
            return
        except Exception:  # out of step with the replica (a bug): replace it rather than read stale messages
            log.exception("replica %d: protocol error; restarting it", self.index)
            self.replica.ready = False
            self.replica.close(timeout=1)
            raise
        raise raised

    def _metric(self, name: str, labels: tuple, method: str, value: float) -> None:
        if self.metrics is None or name not in METRIC_NAMES or method not in ("observe", "inc"):
            return
        m = getattr(self.metrics, name)
        if labels:
            m = m.labels(*labels)
        getattr(m, method)(value)

    def _exception(self, kind: str, payload) -> BaseException:
        if kind == "all_cancelled":
            return _AllCancelled()
        if kind == "pickled":
            try:
                return pickle.loads(payload)
            except Exception as e:
                return RuntimeError(f"replica {self.index}: an error that cannot be read back ({e})")
        name, message = payload
        return type(name, (RuntimeError,), {})(message)  # the replica's type name and message, for `_fail`
