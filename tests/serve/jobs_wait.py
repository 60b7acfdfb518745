"""Test helper (not tests): poll a served job until it reaches one of `statuses`."""
from __future__ import annotations

import time

FINAL = ("succeeded", "failed", "cancelled")


def wait_job(client, job_id: str, statuses=FINAL, timeout: float = 60) -> dict:
    t = time.time()
    while True:
        j = client.get(f"/v1/jobs/{job_id}").json()
        if j["status"] in statuses:
            return j
        assert time.time() - t < timeout, j
        time.sleep(0.02)
