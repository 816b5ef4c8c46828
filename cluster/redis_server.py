"""A real `redis-server` for the online store: installed when missing, started with append-only persistence.

The tests that need Redis, `recsys serve --store redis` and CI all start it through this module, the same way:

    python -m cluster.redis_server start --port 6380 --dir data/redis    # daemonized, returns when it answers PING
    python -m cluster.redis_server stop --port 6380

Persistence: `appendonly yes` with `appendfsync always`, so an event `/events` acknowledged is on disk before the
answer (Redis groups the fsync of one event-loop turn, so a batch of events costs one fsync, not one each). The data
folder holds `appendonlydir/`; starting again on the same folder replays it.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_PORT = 6380  # not 6379: that is the GCS port of `ray start --head`
START_TIMEOUT_S = 30.0


def ensure_installed() -> str:
    """The `redis-server` binary; installs the distribution's package (apt-get, as root) when it is missing."""
    found = shutil.which("redis-server")
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise RuntimeError("redis-server is not installed and apt-get is not available: install Redis 6 or newer")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env={"DEBIAN_FRONTEND": "noninteractive",
                                                                        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("apt-get installed redis-server but it is not on PATH")
    return found


def server_args(port: int, data_dir: Path, daemonize: bool) -> list[str]:
    """The command line of a durable, loopback-only server whose files all live in `data_dir`."""
    data_dir = data_dir.resolve()
    return [ensure_installed(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes",
            "--daemonize", "yes" if daemonize else "no", "--pidfile", str(data_dir / "redis.pid"),
            "--logfile", str(data_dir / "redis.log")]


def answers(port: int, host: str = "127.0.0.1") -> bool:
    """True when a Redis server on the port answers PING (plain RESP over a socket: no client library needed)."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_answering(port: int, timeout_s: float = START_TIMEOUT_S, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if answers(port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode} before answering on port {port}")
        time.sleep(0.05)
    raise RuntimeError(f"redis-server did not answer on port {port} within {timeout_s:.0f} s")


def start(port: int = DEFAULT_PORT, data_dir: str | Path = "data/redis") -> None:
    """Starts a daemonized server unless one answers on the port already; returns once it answers."""
    if answers(port):
        return
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(server_args(port, data_dir, daemonize=True), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"redis-server failed to start ({done.returncode}): {done.stderr.strip()[-500:]}; "
                           f"see {data_dir / 'redis.log'}")
    wait_answering(port)


def start_foreground(port: int, data_dir: str | Path) -> subprocess.Popen:
    """A server as a child process in its own session (tests: the caller stops exactly this one)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(server_args(port, data_dir, daemonize=False), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_answering(port, proc=proc)
    return proc


def stop(port: int = DEFAULT_PORT) -> bool:
    """Asks the server on the port to shut down (it fsyncs the append-only file first); False if none answered."""
    if not answers(port):
        return False
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
        s.sendall(b"SHUTDOWN\r\n")
        try:
            s.recv(64)  # the server closes the connection once it is down
        except OSError:
            pass
    deadline = time.monotonic() + START_TIMEOUT_S
    while answers(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cluster.redis_server", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("install", "start", "stop", "status"))
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--dir", default="data/redis", help="data folder (append-only file, log, pid file)")
    args = p.parse_args(argv)
    try:
        if args.action == "install":
            print(ensure_installed())
        elif args.action == "start":
            start(args.port, args.dir)
            print(f"redis-server answering on 127.0.0.1:{args.port}, data in {Path(args.dir).resolve()}")
        elif args.action == "stop":
            print("stopped" if stop(args.port) else f"no redis-server answered on port {args.port}")
        else:
            up = answers(args.port)
            print(f"redis-server on port {args.port}: {'answering' if up else 'not answering'}")
            sys.exit(0 if up else 1)
    except RuntimeError as e:
        print(f"redis_server {args.action}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
