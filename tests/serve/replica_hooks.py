"""Test helper (not tests): `replica_init` functions for `create_app(..., replica_init=...)`, run in each replica
process after it has loaded the model (importable by the spawned process, so kept free of heavy imports)."""
from __future__ import annotations

import time

STEP_SLEEP_S = 0.03


def slow(pipe) -> None:
    """Make each transformer forward sleep, so a test can act while a replica runs a job."""
    pipe.transformer.register_forward_pre_hook(lambda *a: time.sleep(STEP_SLEEP_S))
