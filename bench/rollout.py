"""Rollout benchmark: blue -> green under steady load on loopback, then a rollback, and the gate's report for a
candidate that passes and one that fails it. Against the demo's bundles (run `make demo` first), one run:

1. blue = v2 (the multi-interest version) takes all traffic; the rollout controller runs;
2. `start v1`: v1 deployed beside it with its own index, gated (a pass: its offline metrics are within the margin);
3. under `--clients` closed-loop clients: `shift v1 --to 10,50,100 --every <step-s>`, a hold, a `rollback`, a hold;
   every answer is checked (status, the version it names, the versions of its retrieval, index and ranking);
4. `shift v1 --now`, `retire v2`, `start v2` against blue v1: the gate's report of a candidate that fails it.

Prints and writes (`--out`) per phase (each step, the hold, the rollback): requests, failed requests (any answer
but a 200), shed (503 with Retry-After), answers mixing versions, the versions served, p50/p99.

Usage: python -m bench.rollout [--step-s 20] [--clients 2] [--out bench/results/rollout.json]
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ADMIN_TOKEN = "bench-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Load:
    """Closed-loop clients on their own event loop in a thread; every answer kept with its time."""

    def __init__(self, url: str, users: list[str], clients: int) -> None:
        self.url, self.users, self.clients = url, users, clients
        self.answers: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.start = time.time()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0)) as session:
            async def worker(w: int) -> None:
                i = 0
                while not self.stop.is_set():
                    user = self.users[(w * 7919 + i * 104729) % len(self.users)]
                    i += 1
                    t0 = time.time()
                    try:
                        async with session.post(f"{self.url}/recommend", json={"user_id": user, "k": 10}) as r:
                            body = await r.json(content_type=None) if r.status == 200 else {}
                            shed = r.status == 503 and "Retry-After" in r.headers
                    except (asyncio.TimeoutError, aiohttp.ClientError):
                        body, shed, status = {}, False, 0
                    else:
                        status = r.status
                    self.answers.append({"t0": t0, "t1": time.time(), "status": status, "shed": shed,
                                         "version": body.get("version"),
                                         "stage_versions": body.get("stage_versions") or {}})
                    if shed:
                        await asyncio.sleep(1.0)
            await asyncio.gather(*(worker(w) for w in range(self.clients)))

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def phase_figures(answers: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """The answers that started in [t0, t1): requests, failed, shed, mixed, versions served, p50/p99 (ms)."""
    mine = [a for a in answers if t0 <= a["t0"] < t1]
    ok = [a for a in mine if a["status"] == 200]
    ms = [(a["t1"] - a["t0"]) * 1000.0 for a in ok]
    mixed = [a for a in ok if set(a["stage_versions"].values()) != {a["version"]}]
    return {"requests": len(mine), "failed": sum(a["status"] != 200 and not a["shed"] for a in mine),
            "shed": sum(a["shed"] for a in mine), "mixed_versions": len(mixed),
            "served": dict(Counter(a["version"] for a in ok)),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if ms else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if ms else None}


def admin(url: str, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
    r = httpx.request(method, f"{url}{path}", json=body, headers=AUTH, timeout=120.0)
    if r.status_code >= 400:
        raise RuntimeError(f"{method} {path}: HTTP {r.status_code}: {r.text}")
    return r.json()


def wait_idle(url: str, timeout_s: float = 900.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = admin(url, "GET", "/admin/rollout")
        if not status["busy"]:
            return status
        time.sleep(0.5)
    raise TimeoutError("the rollout stayed busy")


def gate_summary(status: dict[str, Any]) -> dict[str, Any]:
    rollout = status["rollout"]
    return {"candidate": rollout["green"], "phase": rollout["phase"], **rollout["gate"], "events": rollout["events"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    from cluster.config import load_config
    from cluster.demo import Phases, ensure_bundles, ensure_shop
    from cluster.runtime import init_ray
    from cluster.serving import deploy_ingress, deploy_version, seed_online_store, start_rollout, start_serve, \
        wait_healthy
    from training.data.schemas import read_shop

    cfg = load_config(args.config)
    cfg = dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, port=args.port))
    shop = ensure_shop(cfg)
    init_ray()
    bundles = ensure_bundles(cfg, shop, Phases())
    if not {"v1", "v2"} <= set(bundles):
        raise SystemExit("bench rollout needs the demo's versions v1 and v2 (make demo)")
    users = read_shop(shop).users.column("user_id").to_pylist()
    url = f"http://{cfg.serving.host}:{cfg.serving.port}"
    start_serve(cfg.serving)
    seed_online_store(shop, cfg.serving.store)
    deploy_version(bundles["v2"], cfg.serving)
    deploy_ingress({"v2": 100.0}, cfg.policy.to_dict(), cfg.serving, hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest())
    start_rollout(cfg.serving, cfg.index, cfg.rollout, shop)
    wait_healthy(url)
    result: dict[str, Any] = {"config": {**{k: str(v) for k, v in vars(args).items()},
                                         "rollout": cfg.rollout.to_dict()}}

    t = time.time()
    admin(url, "POST", "/admin/rollout/start", {"version": "v1", "bundle": str(bundles["v1"])})
    result["gate_pass"] = gate_summary(wait_idle(url))
    result["gate_pass"]["seconds"] = round(time.time() - t, 1)
    print(json.dumps(result["gate_pass"]["checks"], indent=1), flush=True)
    if result["gate_pass"]["phase"] != "ready":
        raise SystemExit(f"v1 did not pass the gate: {result['gate_pass']}")

    with Load(url, users, args.clients) as load:
        marks = [("blue only", time.time())]
        time.sleep(args.hold_s)
        admin(url, "POST", "/admin/rollout/shift", {"version": "v1", "to": args.steps, "every_s": args.step_s})
        status = wait_idle(url)
        for step in status["rollout"]["steps"]:
            marks.append((f"step {step['percent']:g}%", step["started_at"]))
        marks.append(("hold at 100%", status["rollout"]["steps"][-1]["ended_at"]))
        time.sleep(args.hold_s)
        t_rb = time.time()
        admin(url, "POST", "/admin/rollout/rollback")
        result["rollback_call_ms"] = round((time.time() - t_rb) * 1000.0, 1)
        marks.append(("during the rollback call", t_rb))  # requests that started before it was acknowledged
        marks.append(("after rollback", time.time()))
        time.sleep(args.hold_s)
        marks.append(("end", time.time()))
    phases = {name: phase_figures(load.answers, a, b) for (name, a), (_, b) in zip(marks, marks[1:])}
    result["shift_under_load"] = {"phases": phases, "controller_steps": status["rollout"]["steps"],
                                  "total": phase_figures(load.answers, marks[0][1], marks[-1][1])}

    admin(url, "POST", "/admin/rollout/shift", {"version": "v1", "to": [100], "every_s": 0})
    wait_idle(url)
    result["retire_v2"] = {k: v for k, v in admin(url, "POST", "/admin/rollout/retire", {"version": "v2"}).items()
                           if k in ("retired", "index_shards_stopped")}
    t = time.time()
    admin(url, "POST", "/admin/rollout/start", {"version": "v2", "bundle": str(bundles["v2"])})
    result["gate_fail"] = gate_summary(wait_idle(url))
    result["gate_fail"]["seconds"] = round(time.time() - t, 1)
    serve.shutdown()
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ["| phase | requests | failed | shed | mixed versions | served | p50 ms | p99 ms |", "|---" * 8 + "|"]
    for name, f in result["shift_under_load"]["phases"].items():
        served = ", ".join(f"{v} {n}" for v, n in sorted(f["served"].items()))
        lines.append(f"| {name} | {f['requests']} | {f['failed']} | {f['shed']} | {f['mixed_versions']} | {served} "
                     f"| {f['p50_ms']} | {f['p99_ms']} |")
    for key in ("gate_pass", "gate_fail"):
        g = result[key]
        lines += ["", f"gate for {g['candidate']} against {g['blue']}: {'passed' if g['passed'] else 'FAILED'} "
                  f"({g['diff']['requests']} replayed requests {g['sources']}, {g['seconds']} s from start)", "",
                  "| check | value | threshold | passed |", "|---|---|---|---|"]
        for c in g["checks"]:
            v = f"{c['value']:.4g}" if isinstance(c["value"], float) else c["value"]
            lines.append(f"| {c['check']} | {v} | {c['threshold']} | {'yes' if c['passed'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo")
    p.add_argument("--port", type=int, default=8014)
    p.add_argument("--clients", type=int, default=2, help="steady load: the sustainable one on a 2-core machine")
    p.add_argument("--steps", type=lambda s: [float(x) for x in s.split(",")], default=[10.0, 50.0, 100.0])
    p.add_argument("--step-s", type=float, default=20.0)
    p.add_argument("--hold-s", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=Path("bench/results/rollout.json"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(markdown(result))


if __name__ == "__main__":
    main()
