"""A Ray cluster of several nodes on this machine: a head and worker nodes, each its own `ray start` process with
its own CPU count, for running the demo (or anything else) on more than one node without a second machine.

    python -m cluster.local_cluster start [--workers 2] [--head-cpus 2] [--worker-cpus 1]
    RAY_ADDRESS=127.0.0.1:6390 recsys demo        # unchanged: init_ray connects to RAY_ADDRESS
    RAY_ADDRESS=127.0.0.1:6390 recsys status      # nodes, and where every replica and shard runs
    python -m cluster.local_cluster stop

Every node runs on 127.0.0.1, so each gets its own free ports (the dashboard agent's, the metrics', the runtime
env agent's: the defaults would collide), and Serve runs one HTTP proxy on the head only
(`cluster.serving.start_serve` sees that every node shares one address). Bundles and data are read from this
machine's disk, which every node sees; on machines of their own the nodes need a shared path (NFS) or a synced
object store at the same path.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE = Path("/tmp/recsys-local-cluster.json")  # the nodes' process groups, for `stop`
BIN = Path(sys.executable).parent


_TAKEN: set[int] = set()  # ports handed out by this process: the OS may offer a closed one again


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


def node_command(head: bool, port: int, cpus: float, ports: dict[str, int]) -> list[str]:
    """The `ray start --block` command of one node; `ports` gives it free ports of its own."""
    cmd = [str(BIN / "ray"), "start", "--block", f"--num-cpus={cpus:g}", "--disable-usage-stats",
           f"--dashboard-agent-listen-port={ports['agent']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
           f"--metrics-export-port={ports['metrics']}", f"--runtime-env-agent-port={ports['runtime_env']}",
           f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}"]
    if head:
        return cmd + ["--head", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                      f"--dashboard-port={ports['dashboard']}", "--node-ip-address=127.0.0.1"]
    return cmd + [f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1"]


def _ports() -> dict[str, int]:
    return {k: _free_port() for k in ("agent", "agent_grpc", "metrics", "runtime_env", "node_manager",
                                      "object_manager", "dashboard")}


def _wait_nodes(address: str, n: int, timeout_s: float = 120.0) -> list[dict]:
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive = [node for node in ray.nodes() if node["Alive"]]
            if len(alive) >= n:
                return alive
            time.sleep(1.0)
        raise TimeoutError(f"{len(alive)} of {n} nodes came up within {timeout_s:.0f} s")
    finally:
        ray.shutdown()


def start(workers: int, head_cpus: float, worker_cpus: float, port: int) -> dict:
    if STATE.exists():
        raise ValueError(f"{STATE}: a local cluster runs already; stop it first (python -m cluster.local_cluster stop)")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    head_ports = _ports()
    procs, logs = [], Path("/tmp/recsys-local-cluster-logs")
    logs.mkdir(exist_ok=True)
    for i in range(workers + 1):
        cmd = node_command(i == 0, port, head_cpus if i == 0 else worker_cpus, head_ports if i == 0 else _ports())
        out = open(logs / f"node-{i}.log", "w")
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT))
        STATE.write_text(json.dumps({"pids": [p.pid for p in procs], "port": port}))  # `stop` works even if a node fails
        _wait_nodes(f"127.0.0.1:{port}", i + 1)  # one node at a time: raylets starting together time out
    state = {"address": f"127.0.0.1:{port}", "port": port, "dashboard": f"http://127.0.0.1:{head_ports['dashboard']}",
             "pids": [p.pid for p in procs], "logs": str(logs)}
    STATE.write_text(json.dumps(state))
    nodes = _wait_nodes(state["address"], workers + 1)
    state["nodes"] = [{"node_id": n["NodeID"][:12], "cpus": n["Resources"].get("CPU", 0)} for n in nodes]
    return state


def stop() -> int:
    if not STATE.exists():
        return 0
    state = json.loads(STATE.read_text())
    for pid in reversed(state["pids"]):  # workers first, the head last
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 60.0
    for pid in state["pids"]:
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            os.killpg(pid, signal.SIGKILL)
    STATE.unlink()
    # As `ray stop` does: a plain ray.init() on this machine would otherwise keep trying the stopped head
    current = Path("/tmp/ray/ray_current_cluster")
    if state.get("port") and current.is_file() and current.read_text().strip().endswith(f":{state['port']}"):
        current.unlink()
    return len(state["pids"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="op", required=True)
    s = sub.add_parser("start")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--head-cpus", type=float, default=2.0)
    s.add_argument("--worker-cpus", type=float, default=1.0)
    s.add_argument("--port", type=int, default=6390, help="the head's GCS port (RAY_ADDRESS=127.0.0.1:PORT)")
    sub.add_parser("stop")
    sub.add_parser("status")
    args = p.parse_args(argv)
    try:
        if args.op == "start":
            state = start(args.workers, args.head_cpus, args.worker_cpus, args.port)
            print(json.dumps(state, indent=2))
            print(f"export RAY_ADDRESS={state['address']}")
        elif args.op == "stop":
            print(f"stopped {stop()} nodes")
        else:
            print(STATE.read_text() if STATE.exists() else "no local cluster")
    except (ValueError, TimeoutError) as e:
        print(f"local_cluster {args.op}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
