"""`fluxion serve`: an HTTP service (FastAPI + uvicorn) around one pipeline owned by one worker thread, or
(`ServeConfig.workers = N > 1`) N model replicas, one process each, behind the same queue.

`create_app(config, pipe=None)` builds the app; `serve(config)` runs it. See `app.py` for the endpoints,
`jobs.py` for job states and SSE events, `worker.py` for batching and cancellation, `replicas.py` for the
replica processes, `loras.py` for adapters.
"""
from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]


def __getattr__(name):  # FastAPI is imported only when the app is wanted
    if name in ("create_app", "serve"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
