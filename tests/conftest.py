"""Shared fixtures. Integration tests share one local Ray head node, started once per session with `ray start`, so
the job-submission test talks to a real cluster and every other test reuses it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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


def _wait_for_port(port: int, proc: subprocess.Popen, deadline_s: float = 120.0) -> None:
    """Returns once something listens on the port; fails if the process died or the deadline passed."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"Ray head did not listen on port {port} within {deadline_s:.0f}s")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `redis-server` (installed when missing, append-only persistence on) started by the project's own
    script on a free port: {"port", "dir", "url", "restart"}. `restart()` stops it (it fsyncs and exits) and starts
    it again on the same data folder, as an operator's restart would."""
    from cluster import redis_server as rs

    port, data_dir = free_port(), tmp_path_factory.mktemp("redis")
    state = {"proc": rs.start_foreground(port, data_dir)}

    def restart() -> None:
        rs.stop(port)
        state["proc"].wait(timeout=30)
        state["proc"] = rs.start_foreground(port, data_dir)
    yield {"port": port, "dir": data_dir, "url": f"redis://127.0.0.1:{port}/0", "restart": restart}
    rs.stop(port)
    try:
        state["proc"].wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(state["proc"].pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server["url"]


@pytest.fixture(scope="session")
def ray_cluster():
    """A head node started with `ray start --head` on free ports (logical CPUs: 4, so fractional actors of two
    versions fit on 2 cores), so `ray job submit` talks to a real cluster and every integration test reuses it.

    `--block` keeps `ray start` in the foreground as the leader of a new process group; the teardown signals that
    group, which stops exactly this cluster: never `ray stop`, which would kill every Ray on the machine.
    """
    import ray

    from training import NAMESPACE

    port, dashboard, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp_dir = Path("/tmp") / f"ray-recsys-{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             # a free agent port too: the default 52365 is taken by any other Ray on the machine,
                             # and a node without its agent cannot run submitted jobs
                             f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}",
                             "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, head)
        ray.init(address=f"127.0.0.1:{port}", namespace=NAMESPACE, log_to_driver=False)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env}
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            # Serve is already down and the driver gone; `ray start --block` would spend ~30 s stopping the rest
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
