"""Shared fixtures. Integration tests share one local Ray, started once per session with its dashboard, so the
job-submission test submits to a real job server and every other test reuses the cluster."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # unit tests are tiny: more threads only contend (on a busy 2-core box, 60x slower)
BIN = Path(sys.executable).parent  # the venv's bin: `ray` and `recsys` live here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_port() -> int:
    """A free port for Serve's HTTP proxy, so tests never collide with a running `make serve` on 8000."""
    return free_port()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session (logical CPUs: 4, so fractional actors of two versions fit on 2 cores).

    It is started by this process (`ray.init`) with its dashboard and job server on free ports, so `ray job submit`
    reaches it like any head node, and `ray.shutdown()` stops exactly this cluster: never `ray stop`, which would
    kill every Ray on the machine.
    """
    import ray

    dashboard = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "PATH")})  # job entrypoints
    # run in the cluster's environment: `recsys` must be on its PATH
    temp_dir = Path("/tmp") / f"ray-recsys-{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    ctx = ray.init(num_cpus=4, namespace="recsys", log_to_driver=False, include_dashboard=True,
                   dashboard_host="127.0.0.1", dashboard_port=dashboard, _temp_dir=str(temp_dir))
    yield {"address": ctx.address_info["address"], "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
