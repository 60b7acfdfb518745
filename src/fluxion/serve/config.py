"""ServeConfig: the settings of `fluxion serve`, checked once before anything loads."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields
from pathlib import Path


def is_loopback(host: str) -> bool:
    """True for localhost / 127.0.0.0/8 / ::1 (a name other than localhost counts as not loopback)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    model: str | None = None  # model folder; None: the shipped fluxion-mini
    host: str = "127.0.0.1"
    port: int = 8000
    lora_dir: str | None = None  # named adapters: <lora_dir>/<name>.safetensors
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer KEY` (or `X-API-Key: KEY`)
    insecure: bool = False  # allow a non-loopback host without an API key
    max_queue: int = 64  # jobs waiting (not running); more -> 429
    max_batch: int = 4  # images per pipeline call
    batch_window_ms: float = 50.0  # how long the worker waits for batch-mates after the first job
    max_pixels: int = 1024 * 1024  # width * height per image
    max_steps: int = 50
    max_n: int = 4  # images per request
    job_ttl_s: float = 600.0  # finished jobs are kept this long, then 410
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 600.0  # a request older than this: 504 on the synchronous endpoint, a job fails (timeout)
    lora_cache: int = 8  # adapters kept loaded (LRU)
    preview_every: int = 0  # a `preview` SSE event every N steps (0: none)
    quantize: str | None = None
    dtype: str | None = None  # weights dtype name ("float32", "bfloat16"); None: float32
    workers: int = 1  # model replicas: 1 = one worker thread in the app process; N > 1 = N replica processes
    replica_threads: int | None = None  # torch threads per replica (workers > 1); None: max(1, cores // workers)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "ServeConfig":
        positive = ("port", "max_queue", "max_batch", "max_pixels", "max_steps", "max_n", "max_body_bytes",
                    "lora_cache", "workers")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.port > 65535:
            raise ValueError(f"port must be at most 65535, got {self.port}")
        for name in ("batch_window_ms", "job_ttl_s", "request_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or v != v:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.replica_threads is not None and (not isinstance(self.replica_threads, int)
                                                 or isinstance(self.replica_threads, bool) or self.replica_threads < 1):
            raise ValueError(f"replica_threads must be an integer >= 1 (or unset), got {self.replica_threads!r}")
        if not isinstance(self.preview_every, int) or self.preview_every < 0:
            raise ValueError(f"preview_every must be an integer >= 0, got {self.preview_every!r}")
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise ValueError(f"lora_dir {self.lora_dir}: no such folder")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset for no key)")
        if not is_loopback(self.host) and not self.api_key and not self.insecure:
            raise ValueError(f"host {self.host} is not a loopback address: give an API key (--api-key) or "
                             "--insecure to serve it without one")
        return self

    def threads_per_replica(self) -> int:
        """Torch threads each replica process sets: `replica_threads`, else the usable cores split evenly."""
        if self.replica_threads is not None:
            return self.replica_threads
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return max(1, cores // self.workers)

    def public(self) -> dict:
        """The settings without the API key."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_key"}
