"""Autoscaling under a load that ramps up and back down, on loopback against the demo's deployment: every second,
the replicas of every deployment (RUNNING), requests sent and answered, p50/p99 of the answers that finished in
that second, and errors. Open loop: requests leave at the scheduled rate whether or not earlier ones returned, as
a shop's visitors do. Writes the JSON, the autoscaling settings it ran with, and a plot (PNG).

Usage: python -m bench.autoscaling [--rates 4,12,24,36,24,12,4] [--phase-s 30] [--out bench/results/autoscaling.json]
(after `make demo`)
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def replica_counts() -> dict[str, int]:
    """RUNNING replicas per application/deployment, from Serve's status."""
    from ray import serve

    out = {}
    for app, status in serve.status().applications.items():
        for dep, d in status.deployments.items():
            out[f"{app}/{dep}"] = int(d.replica_states.get("RUNNING", 0))
    return out


async def open_loop(url: str, users: list[str], rates: list[float], phase_s: float,
                    timeout_s: float) -> list[dict[str, Any]]:
    """Sends POST /recommend at each phase's rate (requests per second) for `phase_s` seconds each."""
    import aiohttp

    out: list[dict[str, Any]] = []
    start = time.time()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(i: int, t_sched: float) -> None:
            t0 = time.time()
            try:
                async with session.post(f"{url}/recommend", json={"user_id": users[i % len(users)], "k": 10}) as r:
                    await r.read()
                    status, shed = r.status, r.status == 503 and "Retry-After" in r.headers
            except (asyncio.TimeoutError, aiohttp.ClientError):
                status, shed = 0, False
            out.append({"t_sched": t_sched - start, "t0": t0 - start, "t1": time.time() - start, "status": status,
                        "shed": shed})

        tasks, i = [], 0
        for phase, rate in enumerate(rates):
            n = int(round(rate * phase_s))
            for j in range(n):
                t_sched = start + phase * phase_s + j / rate
                await asyncio.sleep(max(0.0, t_sched - time.time()))
                tasks.append(asyncio.create_task(one(i, t_sched)))
                i += 1
            await asyncio.sleep(max(0.0, start + (phase + 1) * phase_s - time.time()))
        await asyncio.gather(*tasks)
    return out


def per_second(answers: list[dict[str, Any]], replicas: list[tuple[float, dict[str, int]]],
               seconds: int) -> list[dict[str, Any]]:
    sent, done = defaultdict(int), defaultdict(list)
    for a in answers:
        sent[int(a["t0"])] += 1
        done[int(a["t1"])].append(a)
    rows = []
    for s in range(seconds):
        finished = done.get(s, [])
        ok = [(a["t1"] - a["t0"]) * 1000.0 for a in finished if a["status"] == 200]
        snap = next((r for t, r in reversed(replicas) if t <= s + 1), replicas[0][1] if replicas else {})
        rows.append({"second": s, "sent": sent.get(s, 0), "answered": len(ok),
                     "shed": sum(a["shed"] for a in finished),
                     "errors": sum(a["status"] != 200 and not a["shed"] for a in finished),
                     "p50_ms": round(float(np.percentile(ok, 50)), 1) if ok else None,
                     "p99_ms": round(float(np.percentile(ok, 99)), 1) if ok else None, "replicas": snap})
    return rows


def plot(rows: list[dict[str, Any]], rates: list[float], phase_s: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["second"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    axes[0].step([i * phase_s for i in range(len(rates) + 1)], rates + rates[-1:], where="post", label="offered rps")
    axes[0].plot(t, [r["answered"] for r in rows], label="answered / s")
    axes[0].plot(t, [r["shed"] + r["errors"] for r in rows], label="shed + errors / s")
    axes[0].set_ylabel("requests / s")
    axes[0].legend(loc="upper right")
    axes[1].plot(t, [r["p50_ms"] for r in rows], label="p50")
    axes[1].plot(t, [r["p99_ms"] for r in rows], label="p99")
    axes[1].set_ylabel("ms (answers finishing that second)")
    axes[1].set_yscale("log")
    axes[1].legend(loc="upper right")
    names = sorted({k for r in rows for k in r["replicas"]})
    for name in names:
        axes[2].step(t, [r["replicas"].get(name, 0) for r in rows], where="post", label=name)
    axes[2].set_ylabel("RUNNING replicas")
    axes[2].set_xlabel("seconds")
    axes[2].legend(loc="upper right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    from cluster.config import load_config
    from cluster.demo import Phases, ensure_bundles, ensure_shop
    from cluster.runtime import init_ray
    from cluster.serving import deploy_ingress, deploy_version, seed_online_store, start_serve, wait_healthy
    from deployments.app import MAX_ONGOING, _autoscaling
    from training.data.schemas import read_shop

    cfg = load_config(args.config)
    serving = dataclasses.replace(cfg.serving, port=args.port, min_replicas=1, max_replicas=args.max_replicas,
                                  upscale_delay_s=args.upscale_delay_s, downscale_delay_s=args.downscale_delay_s,
                                  autoscale_targets={**cfg.serving.autoscale_targets, **args.targets})
    cfg = dataclasses.replace(cfg, serving=serving)
    shop = ensure_shop(cfg)
    init_ray()
    bundles = ensure_bundles(cfg, shop, Phases())
    users = read_shop(shop).users.column("user_id").to_pylist()
    url = f"http://{serving.host}:{serving.port}"
    start_serve(serving)
    seed_online_store(shop, serving.store)
    deploy_version(bundles["v1"], serving)
    deploy_ingress({"v1": 100.0}, cfg.policy.to_dict(), serving)
    wait_healthy(url)
    replicas: list[tuple[float, dict[str, int]]] = []
    stop = threading.Event()
    start = time.time()

    def watch() -> None:
        while not stop.is_set():
            replicas.append((time.time() - start, replica_counts()))
            time.sleep(1.0)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    answers = asyncio.run(open_loop(url, users, args.rates, args.phase_s, serving.request_timeout_s + 5.0))
    time.sleep(args.tail_s)  # the downscale after the load
    stop.set()
    watcher.join()
    seconds = int(time.time() - start)
    rows = per_second(answers, replicas, seconds)
    serve.shutdown()
    settings = {dep: _autoscaling(serving, dep.lower()) for dep in ("Retrieval", "Ranking", "Ingress")}
    peak = {k: max(r["replicas"].get(k, 0) for r in rows) for k in rows[0]["replicas"]} if rows else {}
    final = rows[-1]["replicas"] if rows else {}
    return {"config": {"rates": args.rates, "phase_s": args.phase_s, "tail_s": args.tail_s,
                       "autoscaling": settings,
                       "max_ongoing_requests": {dep: MAX_ONGOING[dep.lower()] for dep in settings}},
            "requests": len(answers), "answered": sum(a["status"] == 200 for a in answers),
            "shed": sum(a["shed"] for a in answers),
            "errors": sum(a["status"] != 200 and not a["shed"] for a in answers),
            "peak_replicas": peak, "final_replicas": final, "per_second": rows}


def targets(text: str) -> dict[str, float]:
    """`ingress=1,retrieval=0.5` -> {"ingress": 1.0, "retrieval": 0.5}; ServingConfig checks names and ranges."""
    out = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError(part)
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--targets: {part!r} is not NAME=NUMBER") from None
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo")
    p.add_argument("--port", type=int, default=8015)
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[4, 12, 24, 36, 24, 12, 4])
    p.add_argument("--phase-s", type=float, default=30.0)
    p.add_argument("--tail-s", type=float, default=90.0, help="seconds watched after the load, for the downscale")
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument("--upscale-delay-s", type=float, default=10.0)
    p.add_argument("--downscale-delay-s", type=float, default=60.0)
    p.add_argument("--targets", type=targets, default={},
                   help="autoscaling targets (ongoing requests per replica), e.g. ingress=1,retrieval=0.5,ranking=0.5; "
                        "default: the config's serving.autoscale_targets")
    p.add_argument("--out", type=Path, default=Path("bench/results/autoscaling.json"))
    args = p.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    png = args.out.with_suffix(".png")
    plot(result["per_second"], args.rates, args.phase_s, png,
         f"autoscaling: upscale {args.upscale_delay_s:g} s, downscale {args.downscale_delay_s:g} s, "
         f"max {args.max_replicas} replicas")
    print(json.dumps({k: v for k, v in result.items() if k != "per_second"}, indent=2))
    print(f"plot -> {png}")


if __name__ == "__main__":
    main()
