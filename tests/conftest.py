"""Shared fixtures. Integration tests share one local Ray head node, started once per session with `ray start`, so
the job-submission test talks to a real cluster and every other test reuses it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A head node on free ports (logical CPUs: 4, so fractional actors of two versions fit on 2 cores)."""
    import ray

    port, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    temp_dir = Path("/tmp") / f"ray-recsys-{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=4",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    f"--temp-dir={temp_dir}", "--disable-usage-stats"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address=f"127.0.0.1:{port}", namespace="recsys", log_to_driver=False)
    yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        time.sleep(1)
