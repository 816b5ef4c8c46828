"""The end-to-end demo: data -> Ray Train -> Ray Data indexing -> Ray Serve -> real HTTP requests, printed."""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from cluster.config import RecsysConfig
from cluster.runtime import init_ray
from cluster.serving import (deploy_ingress, deploy_version, seed_online_store, start_redis, start_rollout,
                             start_serve, wait_healthy)
from deployments.store import EMBEDDED
from indexing.embed import INDEX_MANIFEST, embed_catalog
from training.fit.bundle import BUNDLE_FORMAT, MANIFEST, load_bundle
from training.fit.version import train_version
from training.fit.train_loop import TrainConfig
from training.data.schemas import read_shop, snapshot_id, write_shop
from training.data.synthetic import GENERATOR_VERSION, generate_shop

console = Console()
SHED_RETRIES = 5


def ensure_shop(cfg: RecsysConfig) -> Path:
    """Generates the synthetic shop unless one of the same size, seed and generator version is already on disk."""
    out = Path(cfg.data.dir)
    meta = read_shop(out).meta if (out / "shop.json").is_file() else {}
    meta_ok = (meta.get("size"), meta.get("seed"), meta.get("generator")) == (cfg.data.size, cfg.data.seed,
                                                                              GENERATOR_VERSION)
    if meta_ok:
        console.print(f"[bold]data[/] reusing {out} ({cfg.data.size}, seed {cfg.data.seed})")
        return out
    t0 = time.perf_counter()
    with console.status(f"generating the {cfg.data.size} shop (seed {cfg.data.seed})"):
        shop = generate_shop(cfg.data.size, cfg.data.seed)
        write_shop(shop, out)
    console.print(f"[bold]data[/] {len(shop.catalog):,} items, {len(shop.users):,} users, {len(shop.events):,} events "
                  f"-> {out} in {time.perf_counter() - t0:.1f}s")
    return out


def version_train_config(cfg: RecsysConfig, version: str, i: int) -> TrainConfig:
    """The i-th demo version's training config: its own seed and its retrieval model (`demo.retrieval`)."""
    return dataclasses.replace(cfg.train, seed=cfg.train.seed + i,
                               retrieval_model=cfg.demo.retrieval.get(version, cfg.train.retrieval_model))


class Phases:
    """Wall time per demo phase, printed as a table at the end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def table(self) -> Table:
        table = Table(title="time per phase")
        table.add_column("phase")
        table.add_column("seconds", justify="right")
        for name, s in self.seconds.items():
            table.add_row(name, f"{s:.0f}")
        table.add_row("total", f"{sum(self.seconds.values()):.0f}")
        return table


def bundles_root(cfg: RecsysConfig, shop_dir: Path) -> Path:
    """The folder of the demo's bundles of one shop snapshot (and of their catalog change log, `serving.changes`)."""
    return Path(cfg.demo.bundles_dir) / f"shop-{snapshot_id(shop_dir)}-format{BUNDLE_FORMAT}"


def ensure_bundles(cfg: RecsysConfig, shop_dir: Path, phases: Phases) -> dict[str, Path]:
    """Trains (or reuses, for the same data snapshot) one bundle per demo version, then builds each one's index.

    With `demo.share_ranker`, a version after the first takes the first version's ranker instead of training an
    identical one again when it would learn the same (`training.fit.version.shared_ranker`): the same data and ranker
    settings, and, since the ranker learns from retrieval's scores and candidates, the same retrieval model.
    """
    root = bundles_root(cfg, shop_dir)
    bundles: dict[str, Path] = {}
    for i, version in enumerate(cfg.demo.versions):
        path = root / version
        if (path / MANIFEST).is_file():
            console.print(f"[bold]train[/] reusing bundle {path}")
        else:
            train_cfg = version_train_config(cfg, version, i)
            ranker_from = next(iter(bundles.values()), None) if cfg.demo.share_ranker else None
            console.rule(f"training {version} ({train_cfg.retrieval_model} + ranker) on Ray Train "
                         f"({cfg.train.num_workers} workers)")
            with phases.timed(f"train {version}"):
                train_version(shop_dir, root, version, train_cfg, ranker_from=ranker_from)
        console.rule(f"indexing {version} on Ray Data into {cfg.index.n_shards} FAISS shard actors")
        with phases.timed(f"index {version}"):
            manifest = embed_catalog(path, cfg.index)
        console.print(f"[bold]index[/] {version}: {manifest['n_items']:,} items in {len(manifest['shards'])} shards, "
                      f"{manifest['items_per_s']:,.0f} items/s, manifest {path / INDEX_MANIFEST}")
        bundles[version] = path
    return bundles


def emit_config(cfg: RecsysConfig, out: Path, admin_token_sha256: str | None = None) -> Path:
    """Writes the Serve config file of the demo's deployment (its trained bundles), for `serve deploy FILE`."""
    import yaml

    from cluster.serving import serve_config

    shop_dir = Path(cfg.data.dir)
    if not (shop_dir / "shop.json").is_file():
        raise FileNotFoundError(f"{shop_dir}: no shop; run `make demo` (or `recsys generate`) first")
    root = Path(cfg.demo.bundles_dir) / f"shop-{snapshot_id(shop_dir)}-format{BUNDLE_FORMAT}"
    bundles = {v: root / v for v in cfg.demo.versions}
    missing = [str(p) for p in bundles.values() if not (p / INDEX_MANIFEST).is_file()]
    if missing:
        raise FileNotFoundError(f"bundles without an index: {missing}; run `make demo` (or recsys train/index) first")
    config = serve_config(bundles, dict(cfg.demo.versions), cfg.policy.to_dict(), cfg.serving, admin_token_sha256,
                          shop_dir, cfg.index, cfg.rollout)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Written by `recsys serve --emit-config`: `serve deploy` this file on a `ray start` cluster.\n"
                   "# Editing applications[recsys].deployments[Ingress].user_config (versions, policy) and deploying\n"
                   "# again applies in place; editing `args` rebuilds that application.\n"
                   + yaml.safe_dump(config, sort_keys=False))
    return out


def deploy(cfg: RecsysConfig, shop_dir: Path, bundles: dict[str, Path]) -> str:
    """Starts Serve, seeds the online store, deploys every version and the ingress; returns the base URL."""
    console.rule("deploying on Ray Serve")
    start_serve(cfg.serving)
    if cfg.serving.store != EMBEDDED:
        start_redis(cfg.serving.store, Path(cfg.data.dir).parent / "redis")
    stats = seed_online_store(shop_dir, cfg.serving.store)
    console.print(f"[bold]features[/] online store ({stats['backend']}, {'durable' if stats['durable'] else 'in memory'}"
                  f"): {stats['users']:,} users, {stats['engagements']:,} recent engagements")
    for path in bundles.values():
        deploy_version(path, cfg.serving)
    deploy_ingress(dict(cfg.demo.versions), cfg.policy.to_dict(), cfg.serving)
    start_rollout(cfg.serving, cfg.index, cfg.rollout, shop_dir)
    url = f"http://{cfg.serving.host}:{cfg.serving.port}"
    wait_healthy(url)
    console.print(f"[bold]serve[/] healthy at {url}: versions {dict(cfg.demo.versions)}")
    return url


def metrics_table(bundles: dict[str, Path]) -> Table:
    table = Table(title="offline metrics, held-out split (full catalog, seen items excluded)")
    for col in ("version", "model", "recall@10", "recall@100", "ndcg@10", "users"):
        table.add_column(col, justify="right" if col not in ("version", "model") else "left")
    for version, path in bundles.items():
        retrieval = load_bundle(path).metrics["retrieval"]
        for model, m in retrieval.items():  # the version's retrieval model, then popularity
            table.add_row(version, model, f"{m['recall@10']:.4f}", f"{m['recall@100']:.4f}", f"{m['ndcg@10']:.4f}",
                          str(int(m["users"])))
    return table


def exploration_example(recommend, user: str, tries: int = 20) -> tuple[str, int, dict] | None:
    """(request id, slot, item) of the first of `tries` home-page answers in which exploration placed a new item.

    The home preset explores each of its 2 slots with probability 0.1, and a request id fixes the draw; items count as
    new against the version's serving clock (`training.request.clock`), so the synthetic shop has new items."""
    for i in range(tries):
        rid = f"demo-explore-{i}"
        items = recommend(user, request_id=rid, context={"page": "home"})["items"]
        slot = next((j for j, it in enumerate(items) if it["reason"] == "policy:explore"), None)
        if slot is not None:
            return rid, slot, items[slot]
    return None


def send_traffic(url: str, cfg: RecsysConfig, shop_dir: Path) -> dict[str, Any]:
    """Real HTTP requests: the weighted split, one answer, cold start, an event changing the next answer, a 422."""
    users = read_shop(shop_dir).users.column("user_id").to_pylist()
    rng = np.random.default_rng(0)
    sample = [users[i] for i in rng.choice(len(users), size=min(cfg.demo.users, len(users)), replace=False)]
    requests = [sample[i % len(sample)] for i in range(cfg.demo.requests)]
    client = httpx.Client(base_url=url, timeout=30.0)

    shed = Counter()

    def recommend(user: str, **extra: Any) -> dict[str, Any]:
        """One answer, as a well-behaved client gets it: a shed request (503/429) is sent again after its
        Retry-After, a few times."""
        for _ in range(SHED_RETRIES):
            r = client.post("/recommend", json={"user_id": user, "k": 10, **extra})
            if r.status_code not in (429, 503) or "Retry-After" not in r.headers:
                break
            shed["retried"] += 1
            time.sleep(min(float(r.headers["Retry-After"]), 2.0))
        r.raise_for_status()
        return r.json()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(recommend, requests))
    seconds = time.perf_counter() - t0
    split = Counter(a["version"] for a in answers)
    stage = {s: np.array([a["timings_ms"][s] for a in answers]) for s in answers[0]["timings_ms"]}
    console.rule(f"{len(answers)} POST /recommend over HTTP ({len(answers) / seconds:.0f} req/s, 8 clients)")
    table = Table(title="per-stage milliseconds (server side)")
    for col in ("stage", "p50", "p99"):
        table.add_column(col)
    for s, v in stage.items():
        table.add_row(s, f"{np.percentile(v, 50):.1f}", f"{np.percentile(v, 99):.1f}")
    console.print(table)
    if shed:
        console.print(f"[bold]shed[/] {shed['retried']} answers came after a 503 with Retry-After (admission control)")
    console.print(f"[bold]split[/] configured {dict(cfg.demo.versions)}, observed over {len(answers)} requests: "
                  + ", ".join(f"{v}: {n / len(answers):.0%}" for v, n in sorted(split.items())))

    one = recommend(sample[0])
    table = Table(title=f"POST /recommend user {one['user_id']} -> version {one['version']}")
    for col in ("#", "item", "score", "brand", "category", "reason"):
        table.add_column(col)
    for i, it in enumerate(one["items"]):
        table.add_row(str(i + 1), it["item_id"], f"{it['score']:.3f}", it["brand"], it["category"], it["reason"])
    console.print(table)

    explored = exploration_example(recommend, sample[0])
    if explored:
        rid, slot, item = explored
        console.print(f"[bold]exploration[/] home page, request_id {rid}: slot {slot + 1} holds new item "
                      f"{item['item_id']} ({item['brand']}, {item['category']}), reason {item['reason']}")
    else:
        console.print("[bold]exploration[/] no answer of 20 placed a new item (the home page explores 10% of 2 slots)")

    cold = recommend("new-visitor-1")
    console.print(f"[bold]cold start[/] unknown user -> cold_start={cold['cold_start']}, reasons "
                  f"{sorted(Counter(i['reason'] for i in cold['items']).items())}")
    bought = one["items"][0]["item_id"]
    r = client.post("/events", json={"events": [{"user_id": sample[0], "item_id": bought, "action": "purchase"}]})
    after = recommend(sample[0])
    pos = [i["item_id"] for i in after["items"]].index(bought) + 1 if bought in [i["item_id"] for i in after["items"]] \
        else None
    console.print(f"[bold]events[/] POST /events purchase of {bought} -> {r.json()}; next answer places it at "
                  f"{pos if pos else 'beyond the top 10'} (bought items sort down)")
    bad = client.post("/recommend", json={"user_id": sample[0], "k": 0})
    console.print(f"[bold]bad input[/] k=0 -> HTTP {bad.status_code} {bad.json()['detail'][0]['loc']}: "
                  f"{bad.json()['detail'][0]['msg']}")
    return {"split": dict(split), "requests": len(answers), "req_per_s": len(answers) / seconds,
            "stage_p50_ms": {s: float(np.percentile(v, 50)) for s, v in stage.items()}}


def run_demo(cfg: RecsysConfig, keep_serving: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    phases = Phases()
    with phases.timed("data"):
        shop_dir = ensure_shop(cfg)
    with phases.timed("ray start"):
        init_ray()
    bundles = ensure_bundles(cfg, shop_dir, phases)
    console.print(metrics_table(bundles))
    with phases.timed("deploy"):
        url = deploy(cfg, shop_dir, bundles)
    with phases.timed("http requests"):
        try:
            report = send_traffic(url, cfg, shop_dir)
        except (httpx.HTTPError, KeyError, ValueError) as e:
            if not keep_serving:
                raise
            # `recsys serve`: a failed warm-up request is reported, never the end of the service (and of the
            # embedded cluster that lives in this process)
            console.print(f"[bold red]warm-up[/] a request failed ({type(e).__name__}: {e}); still serving")
            report = {"error": f"{type(e).__name__}: {e}"}
    console.print(phases.table())
    console.rule(f"demo done in {time.perf_counter() - t0:.0f}s")
    if keep_serving:
        serve_forever(url)
    return report


def serve_forever(url: str) -> None:
    console.print(f"serving at {url} (Ctrl-C to stop). Try:\n  curl -s -X POST {url}/recommend "
                  "-H 'content-type: application/json' -d '{\"user_id\": \"u1\", \"k\": 5}'\n"
                  f"  curl -s {url}/versions\n  open {url}/docs for the OpenAPI page")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
