"""Reliability benchmark: what the service does under overload, over a long soak, when its processes die, and when
a fuzzer sends it everything its OpenAPI spec allows and more. Black-box over HTTP on loopback against the demo's
deployment (embedded Ray, every deployment at `--min-replicas` replicas), all in one run:

- unloaded: sequential requests, p50/p99 (the yardstick of the overload goal);
- overload: `--clients` closed-loop clients at once, each waiting the Retry-After of a shed answer before its next
  request: answered, shed (503/429 with Retry-After), hung (no answer
  within the client's timeout), 5xx other than a shed; p50/p99 of the admitted requests against 2x unloaded p99;
- soak: `--soak-clients` clients for `--soak-s` seconds: errors, and the RSS of every Ray process at start and end;
- faults, each under `--fault-clients` clients for `--fault-s` seconds, the kill a third of the way in: a retrieval
  replica, a ranking replica, an ingress replica, an index shard (the version re-deployed with the sharded layout
  for this one), the embedded store actor, and Redis (the ingress on a Redis store, the server restarted): failed
  requests, degraded answers (`partial`, `store_fallback`), seconds from the kill to the last degraded or failed
  answer;
- fuzz: bench.fuzz over every endpoint, with and without the admin token;
- the Redis restart check: events posted, Redis and the ingress restarted, the next answer still reflects them.

Usage: python -m bench.reliability [--soak-s 600] [--out bench/results/reliability.json] (after `make demo`)
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ADMIN_TOKEN = "bench-admin-token"
PARTS = ("overload", "soak", "faults", "redis", "fuzz")
MAX_BACKOFF_S = 1.0  # a shed client waits Retry-After (at most this) before its next request, as a real client does


@dataclass
class Outcome:
    """One request: when it started and ended (seconds since the load began), its status (0: no answer in time,
    -1: connection error), and whether the answer was degraded."""

    t0: float
    t1: float
    status: int
    degraded: bool = False
    retry_after: bool = False
    server_ms: float | None = None  # the ingress's own `timings_ms.total` of an answered request


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


async def _load(url: str, users: list[str], clients: int, seconds: float, timeout_s: float,
                at: Callable[[float], None] | None = None, at_s: float | None = None) -> list[Outcome]:
    """Closed loop: `clients` workers each send POST /recommend back to back for `seconds`; `at(t)` runs once,
    `at_s` seconds in (in a thread, so a slow kill does not stall the load)."""
    import aiohttp

    out: list[Outcome] = []
    start = time.perf_counter()
    stop_at = start + seconds
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def worker(w: int) -> None:
            i = 0
            while time.perf_counter() < stop_at:
                user = users[(w * 7919 + i * 104729) % len(users)]
                i += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{url}/recommend", json={"user_id": user, "k": 10}) as r:
                        body = await r.json(content_type=None) if r.status == 200 else await r.read()
                        degraded = r.status == 200 and bool(body.get("partial") or body.get("store_fallback"))
                        retry_after = r.headers.get("Retry-After")
                        server_ms = body.get("timings_ms", {}).get("total") if r.status == 200 else None
                        out.append(Outcome(t0 - start, time.perf_counter() - start, r.status, degraded,
                                           retry_after is not None, server_ms))
                    if retry_after is not None and r.status in (429, 503):  # a client does as it is told
                        await asyncio.sleep(min(float(retry_after), MAX_BACKOFF_S))
                except asyncio.TimeoutError:
                    out.append(Outcome(t0 - start, time.perf_counter() - start, 0))
                except aiohttp.ClientError:
                    out.append(Outcome(t0 - start, time.perf_counter() - start, -1))
                    await asyncio.sleep(0.05)

        async def trigger() -> None:
            if at is None:
                return
            await asyncio.sleep(at_s)
            await asyncio.get_running_loop().run_in_executor(None, at, time.perf_counter() - start)
        await asyncio.gather(trigger(), *(worker(w) for w in range(clients)))
    return out


def load(url: str, users: list[str], clients: int, seconds: float, timeout_s: float, **kw: Any) -> list[Outcome]:
    return asyncio.run(_load(url, users, clients, seconds, timeout_s, **kw))


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    ok = [o.t1 - o.t0 for o in outcomes if o.status == 200]
    server = [o.server_ms for o in outcomes if o.status == 200 and o.server_ms is not None]
    shed = [o for o in outcomes if o.status in (429, 503)]
    return {"requests": len(outcomes), "answered": len(ok), "shed": len(shed),
            "shed_share": round(len(shed) / max(1, len(outcomes)), 4),
            "shed_with_retry_after": sum(o.retry_after for o in shed),
            "hung": sum(o.status == 0 for o in outcomes), "connection_errors": sum(o.status == -1 for o in outcomes),
            "server_errors_5xx": sum(o.status >= 500 and o.status != 503 for o in outcomes),
            "other_4xx": sum(400 <= o.status < 500 and o.status != 429 for o in outcomes),
            "degraded": sum(o.degraded for o in outcomes),
            "admitted_p50_ms": _pct([x * 1000 for x in ok], 50), "admitted_p99_ms": _pct([x * 1000 for x in ok], 99),
            # the same requests as the ingress timed them: the rest of the client's figure is proxy and client
            "admitted_server_p50_ms": _pct(server, 50), "admitted_server_p99_ms": _pct(server, 99),
            "qps": round(len(ok) / max(1e-9, max((o.t1 for o in outcomes), default=0)), 1)}


def ray_rss_mb() -> dict[str, float]:
    """Resident memory (MB) of every Ray process on this machine, by its process title (ray::<actor> for workers)."""
    out: dict[str, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        name = cmd.split(" ")[0]
        if not (name.startswith("ray::") or any(k in cmd for k in ("raylet", "gcs_server", "redis-server"))):
            continue
        rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        key = f"{Path(name).name}[{pid}]"
        out[key] = round(rss / 1024, 1)
    return out


def _replica_actor(app: str, deployment: str) -> Any:
    """A live replica actor of the deployment, by the name Serve gives it (SERVE_REPLICA::<app>#<deployment>#<id>;
    the GCS lists named actors, no dashboard needed)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    if not named:
        raise RuntimeError(f"no live replica of {app}/{deployment}")
    return ray.get_actor(named[0]["name"], namespace=named[0]["namespace"])


def kill_replica(app: str, deployment: str) -> Callable[[float], None]:
    import ray

    return lambda t: ray.kill(_replica_actor(app, deployment), no_restart=True)


def fault_figures(outcomes: list[Outcome], kill_t: float) -> dict[str, Any]:
    """A fault's cost: failed requests (any non-200 but a shed), sheds (503/429 with Retry-After: the admission
    limit at work while the survivors are slower), degraded answers, and the seconds from the kill to the last
    failed or degraded answer."""
    shed = [o for o in outcomes if o.status in (429, 503) and o.retry_after]
    failed = [o for o in outcomes if o.status != 200 and o not in shed]
    bad_after = [o for o in failed + [o for o in outcomes if o.degraded] if o.t1 >= kill_t]
    return {**{k: v for k, v in summary(outcomes).items() if k in ("requests", "answered", "admitted_p99_ms")},
            "failed": len(failed), "shed": len(shed), "degraded": sum(o.degraded for o in outcomes),
            "statuses": {str(s): sum(o.status == s for o in outcomes) for s in sorted({o.status for o in outcomes})},
            "seconds_to_full_answers": round(max(o.t1 for o in bad_after) - kill_t, 2) if bad_after else 0.0}


class Stack:
    """The demo's deployment on an embedded Ray, plus a Redis server of its own for the Redis checks."""

    def __init__(self, config: str, port: int, min_replicas: int, workdir: Path) -> None:
        from cluster import redis_server
        from cluster.config import load_config
        from cluster.demo import Phases, ensure_bundles, ensure_shop
        from cluster.runtime import init_ray
        from training.data.schemas import read_shop

        cfg = load_config(config)
        serving = dataclasses.replace(cfg.serving, port=port, min_replicas=min_replicas,
                                      max_replicas=max(cfg.serving.max_replicas, min_replicas))
        self.cfg = dataclasses.replace(cfg, serving=serving)
        self.shop = ensure_shop(self.cfg)
        init_ray()
        self.bundles = ensure_bundles(self.cfg, self.shop, Phases())
        self.users = read_shop(self.shop).users.column("user_id").to_pylist()
        self.url = f"http://{serving.host}:{serving.port}"
        self.redis_port = _free_port()
        self.redis_dir = workdir / "redis"
        self.redis = redis_server.start_foreground(self.redis_port, self.redis_dir)
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"

    def deploy(self, store: str = "embedded", layout: str | None = None) -> None:
        from cluster.serving import deploy_ingress, deploy_version, seed_online_store, start_serve, wait_healthy

        serving = dataclasses.replace(self.cfg.serving, store=store, index_layout=layout or self.cfg.serving.index_layout)
        start_serve(serving)
        seed_online_store(self.shop, store)
        for path in self.bundles.values():
            deploy_version(path, serving)
        deploy_ingress(dict(self.cfg.demo.versions), self.cfg.policy.to_dict(), serving,
                       hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest())
        wait_healthy(self.url, timeout_s=300)

    def restart_redis(self) -> None:
        from cluster import redis_server

        redis_server.stop(self.redis_port)
        self.redis.wait(timeout=60)
        self.redis = redis_server.start_foreground(self.redis_port, self.redis_dir)

    def close(self) -> None:
        import ray
        from ray import serve

        from cluster import redis_server

        serve.shutdown()
        ray.shutdown()
        redis_server.stop(self.redis_port)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_restart_check(stack: Stack) -> dict[str, Any]:
    """Posts a purchase through the Redis-backed service, restarts Redis and the ingress, and checks that the next
    answer still sorts the bought item down and that the store still holds every posted event."""
    import httpx
    from ray import serve

    from cluster.serving import INGRESS_APP, deploy_ingress, seed_online_store, wait_healthy
    from deployments.redis_store import RedisActions

    user, client = "bench-redis-shopper", httpx.Client(base_url=stack.url, timeout=30.0)
    items = [it["item_id"] for it in client.post("/recommend", json={"user_id": stack.users[0], "k": 5}).json()["items"]]
    client.post("/events", json={"events": [{"user_id": user, "item_id": i, "action": "click", "position": p}
                                            for p, i in enumerate(items)]}).raise_for_status()
    top = client.post("/recommend", json={"user_id": user, "k": 10}).json()["items"][0]["item_id"]
    ack = client.post("/events", json={"events": [{"user_id": user, "item_id": top, "action": "purchase"}]}).json()
    stack.restart_redis()
    serve.delete(INGRESS_APP)
    serving = dataclasses.replace(stack.cfg.serving, store=stack.redis_url)
    seed_online_store(stack.shop, serving.store)
    deploy_ingress(dict(stack.cfg.demo.versions), stack.cfg.policy.to_dict(), serving,
                   hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest())
    wait_healthy(stack.url, timeout_s=300)
    after = client.post("/recommend", json={"user_id": user, "k": 10}).json()
    state = asyncio.run(RedisActions(stack.redis_url).get(user))
    ok = (ack.get("durable") is True and top not in [i["item_id"] for i in after["items"]]
          and top in state["bought_at"] and len(state["items"]) == len(items) + 1)
    return {"passed": bool(ok), "acknowledged": ack, "bought_item_in_next_answer": top in [
        i["item_id"] for i in after["items"]], "engagements_after_restart": len(state["items"])}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| check | figures |", "|---|---|",
             f"| unloaded | p50 {result['unloaded']['admitted_p50_ms']} ms, p99 {result['unloaded']['admitted_p99_ms']} ms |"]
    if "overload" in result:
        o = result["overload"]
        lines.append(f"| overload, {o['clients']} clients | {o['requests']} requests, shed {o['shed_share']:.1%} "
                     f"({o['shed_with_retry_after']} with Retry-After), admitted p50 {o['admitted_p50_ms']} / p99 "
                     f"{o['admitted_p99_ms']} ms (goal <= {o['goal_p99_ms']} ms; in the ingress p50 "
                     f"{o['admitted_server_p50_ms']} / p99 {o['admitted_server_p99_ms']} ms), hung {o['hung']}, "
                     f"5xx {o['server_errors_5xx']} |")
    if "soak" in result:
        s = result["soak"]
        lines.append(f"| soak, {s['seconds']:.0f} s x {s['clients']} clients | {s['requests']} requests, errors "
                     f"{s['errors']}, Ray RSS {s['rss_start_mb_total']:.0f} -> {s['rss_end_mb_total']:.0f} MB |")
    for name, f in result.get("faults", {}).items():
        lines.append(f"| fault: {name} | {f.get('requests', 0)} requests, failed {f.get('failed')}, shed "
                     f"{f.get('shed', 0)}, degraded "
                     f"{f.get('degraded')}, full answers again after {f.get('seconds_to_full_answers')} s"
                     f"{' (' + f['error'] + ')' if 'error' in f else ''} |")
    if "fuzz" in result:
        z = result["fuzz"]
        lines.append(f"| fuzz | {z.get('requests')} requests, 5xx {z.get('server_errors')}, 4xx without a field "
                     f"{z.get('unnamed_4xx')} |")
    if "redis_restart" in result:
        lines.append(f"| Redis restart | {'passed' if result['redis_restart'].get('passed') else 'FAILED'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo", help="the deployment's config (its bundles must exist: make demo)")
    p.add_argument("--port", type=int, default=8013)
    p.add_argument("--min-replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--overload-s", type=float, default=30.0)
    p.add_argument("--soak-s", type=float, default=600.0)
    p.add_argument("--soak-clients", type=int, default=2, help="the sustainable load: served without shedding")
    p.add_argument("--fault-s", type=float, default=30.0)
    p.add_argument("--fault-clients", type=int, default=2, help="the sustainable load, as the soak's")
    p.add_argument("--fuzz-cases", type=int, default=300, help="cases per operation (x2: with and without token)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which checks to run, of {','.join(PARTS)}")
    p.add_argument("--out", type=Path, default=Path("bench/results/reliability.json"))
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recsys-reliability-") as tmp:
        stack = Stack(args.config, args.port, args.min_replicas, Path(tmp))
        try:
            result = run_all(stack, args)
        finally:
            stack.close()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(markdown(result))


def run_all(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    timeout_s = stack.cfg.serving.request_timeout_s + 5.0  # past the proxy's own limit: a hang, not a slow answer
    stack.deploy()
    load(stack.url, stack.users, 2, 5.0, timeout_s)  # warm-up
    result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "out"}}
    result["config"]["out"] = str(args.out)
    result["unloaded"] = summary(load(stack.url, stack.users, 1, 15.0, timeout_s))
    if "overload" in args.parts:
        over = summary(load(stack.url, stack.users, args.clients, args.overload_s, timeout_s))
        over["clients"] = args.clients
        over["goal_p99_ms"] = round(2 * (result["unloaded"]["admitted_p99_ms"] or 0), 2)
        result["overload"] = over
        print(f"overload: {json.dumps(over)}", flush=True)
    if "soak" in args.parts:
        result["soak"] = soak(stack, args, timeout_s)
    if "faults" in args.parts:
        result["faults"] = faults(stack, args, timeout_s)
    if "redis" in args.parts:
        stack.deploy(store=stack.redis_url)
        result.setdefault("faults", {})["redis restart"] = run_fault(stack, lambda t: stack.restart_redis(), args,
                                                                     timeout_s)
        result["redis_restart"] = redis_restart_check(stack)
        stack.deploy()
    if "fuzz" in args.parts:
        try:
            from bench.fuzz import fuzz

            result["fuzz"] = fuzz(stack.url, args.fuzz_cases, ADMIN_TOKEN)
        except ImportError as e:
            result["fuzz"] = {"error": f"bench.fuzz unavailable: {e}"}
    return result


def soak(stack: Stack, args: argparse.Namespace, timeout_s: float) -> dict[str, Any]:
    rss0 = ray_rss_mb()
    outcomes = load(stack.url, stack.users, args.soak_clients, args.soak_s, timeout_s)
    rss1 = ray_rss_mb()
    common = sorted(set(rss0) & set(rss1))
    out = {**summary(outcomes), "seconds": args.soak_s, "clients": args.soak_clients,
           "errors": sum(o.status != 200 for o in outcomes),
           "rss_start_mb_total": sum(rss0[k] for k in common), "rss_end_mb_total": sum(rss1[k] for k in common),
           "rss_mb": {k: [rss0[k], rss1[k]] for k in common}}
    print(f"soak: {out['requests']} requests, {out['errors']} errors", flush=True)
    return out


def faults(stack: Stack, args: argparse.Namespace, timeout_s: float) -> dict[str, Any]:
    from cluster.serving import deploy_version, wait_healthy
    from deployments.ingress.routing import version_app_name
    from deployments.store import STORE_NAME
    from indexing.embed import get_shards, read_index_manifest
    from training import NAMESPACE

    import ray

    first = next(iter(stack.cfg.demo.versions))
    kills: dict[str, Callable[[float], None]] = {
        "retrieval replica": kill_replica(version_app_name(first), "Retrieval"),
        "ranking replica": kill_replica(version_app_name(first), "Ranking"),
        "ingress replica": kill_replica("recsys", "Ingress"),
        "embedded store actor": lambda t: ray.kill(ray.get_actor(STORE_NAME, namespace=NAMESPACE), no_restart=False),
    }
    result: dict[str, Any] = {}
    for name, kill in kills.items():
        result[name] = run_fault(stack, kill, args, timeout_s)
        print(f"fault {name}: {json.dumps(result[name])}", flush=True)
        wait_healthy(stack.url, timeout_s=300)
        time.sleep(5.0)  # Serve replaces the replica; let the next fault start from full strength

    sharded = dataclasses.replace(stack.cfg.serving, index_layout="sharded")
    for path in stack.bundles.values():
        deploy_version(path, sharded)
    wait_healthy(stack.url, timeout_s=300)
    result["index shard (sharded layout)"] = run_fault(
        stack, lambda t: ray.kill(get_shards(read_index_manifest(stack.bundles[first]))[0], no_restart=False),
        args, timeout_s)
    for path in stack.bundles.values():
        deploy_version(path, stack.cfg.serving)
    wait_healthy(stack.url, timeout_s=300)
    return result


def run_fault(stack: Stack, kill: Callable[[float], None], args: argparse.Namespace, timeout_s: float) -> dict:
    kill_at = args.fault_s / 3
    killed: dict[str, Any] = {}

    def at(t: float) -> None:
        killed["t"] = t
        try:
            kill(t)
        except Exception as e:  # noqa: BLE001 - reported with the figures, the load goes on
            killed["error"] = f"{type(e).__name__}: {e}"
    outcomes = load(stack.url, stack.users, args.fault_clients, args.fault_s, timeout_s, at=at, at_s=kill_at)
    figures = fault_figures(outcomes, killed.get("t", kill_at))
    if "error" in killed:
        figures["error"] = killed["error"]
    return figures


if __name__ == "__main__":
    main()
