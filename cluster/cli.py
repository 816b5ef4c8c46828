"""The `recsys` command line: generate, train, index, eval, bench, serve, demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.config import load_config
from indexing.index_types import KINDS


def _generate(args: argparse.Namespace) -> None:
    from training.data.schemas import write_shop
    from training.data.synthetic import Examination, generate_shop

    try:
        examination = Examination.parse(args.examination)
    except ValueError as e:
        raise SystemExit(f"recsys generate: --examination: {e}") from None
    shop = generate_shop(args.size, args.seed, examination)
    write_shop(shop, args.out)
    print(json.dumps({"out": str(args.out), "items": len(shop.catalog), "users": len(shop.users),
                      "events": len(shop.events)}))


def _train(args: argparse.Namespace) -> None:
    from cluster.runtime import init_ray
    from training.fit.version import train_version

    cfg = load_config(args.config)
    init_ray()
    train_cfg = cfg.train if args.workers is None else type(cfg.train)(**{**cfg.train.to_dict(),
                                                                          "num_workers": args.workers})
    path = train_version(args.data, args.bundles, args.version, train_cfg)
    from training.fit.bundle import load_bundle

    print(json.dumps({"bundle": str(path), "metrics": load_bundle(path).metrics["retrieval"]}, indent=2))


def _index(args: argparse.Namespace) -> None:
    from cluster.runtime import init_ray
    from indexing.embed import embed_catalog

    import dataclasses

    cfg = load_config(args.config)
    index_cfg = cfg.index
    if args.shards is not None:
        index_cfg = dataclasses.replace(index_cfg, n_shards=args.shards)
    if args.kind is not None:
        index_cfg = dataclasses.replace(index_cfg, ann=dataclasses.replace(index_cfg.ann, kind=args.kind))
    init_ray()
    manifest = embed_catalog(args.bundle, index_cfg)
    print(json.dumps({k: manifest[k] for k in ("version", "index_type", "n_items", "build_seconds", "items_per_s")}))


def _demo(args: argparse.Namespace, keep_serving: bool = False) -> None:
    import dataclasses

    from cluster.demo import run_demo

    cfg = load_config(args.config)
    if args.store == "redis":
        cfg = dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, store=args.redis_url))
    elif args.store == "embedded":
        cfg = dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, store="embedded"))
    if getattr(args, "emit_config", None):
        import hashlib
        import os

        from cluster.demo import emit_config
        from deployments.ingress.admin import ADMIN_TOKEN_ENV

        token = os.environ.get(ADMIN_TOKEN_ENV)
        path = emit_config(cfg, args.emit_config, hashlib.sha256(token.encode()).hexdigest() if token else None)
        print(f"wrote {path}: serve deploy {path}")
        return
    run_demo(cfg, keep_serving=keep_serving)


def _eval(args: argparse.Namespace) -> None:
    from training.evaluation.harness import eval_command

    eval_command(args, load_config(args.config).train)


def _replay_served(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from training.data.schemas import read_shop
    from training.evaluation.served_replay import format_served, load_served, served_replay

    if args.events is None:
        raise ValueError("--served needs --events FILE: the Parquet events that followed the served answers")
    try:
        events = pq.read_table(args.events)
    except (OSError, ValueError) as e:
        raise ValueError(f"--events {args.events}: not a readable Parquet file ({e})") from e
    missing = sorted({"user_id", "item_id", "action", "timestamp"} - set(events.column_names))
    if missing:
        raise ValueError(f"--events {args.events}: missing column(s) {missing}")
    shop = read_shop(args.data) if args.data is not None else None
    if shop is not None and not shop.hidden:
        raise ValueError(f"--data {args.data}: not a synthetic shop: no hidden truth to check the estimates with")
    requests, counts = load_served(args.served, events, args.window_s, args.version)
    if not requests:
        raise ValueError(f"--served {args.served}: no answer with its policy input in the log ({counts})")
    changes = json.loads(args.changes) if args.changes else None
    result = served_replay(requests, shop, changes, seed=args.seed) | {"log": counts}
    print(format_served(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=float))


def _replay(args: argparse.Namespace) -> None:
    from training.evaluation.replay import ReplayConfig, format_table, replay, write_impressions
    from training.data.schemas import read_shop

    if args.served is not None:
        return _replay_served(args)
    if args.data is None:
        raise ValueError("--data is required: the synthetic shop whose hidden truth simulates each policy "
                         "(or --served LOG --events FILE to replay what a live service served)")
    shop = read_shop(args.data)
    if not shop.hidden:
        raise ValueError(f"--data {args.data}: replay needs a synthetic shop (its hidden truth simulates each policy)")
    changes = json.loads(args.changes) if args.changes else None
    result = replay(shop, changes, ReplayConfig(n_sessions=args.sessions, seed=args.seed),
                    load_config(args.config).policy)
    print(format_table(result))
    if args.impressions:
        print(f"logged impressions with propensities -> {write_impressions(result, shop, args.impressions)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({k: v for k, v in result.items() if k not in ("log", "sessions")}, indent=2,
                                       default=float))


BENCHMARKS = ("stages", "ranking", "policy", "training", "request_path", "index", "reembed", "reliability",
              "rollout", "autoscaling", "debiasing", "ranker_init")  # modules of bench/, each with main(argv)


def _bench(args: argparse.Namespace) -> None:
    import importlib

    importlib.import_module(f"bench.{args.name}").main(args.args)


def _status(args: argparse.Namespace) -> None:
    import os

    from cluster.runtime import init_ray
    from cluster.status import placements, print_placements

    if not os.environ.get("RAY_ADDRESS"):
        raise ValueError("recsys status reads a running cluster: set RAY_ADDRESS (e.g. 127.0.0.1:6390)")
    init_ray()
    report = placements()
    print(json.dumps(report, indent=2)) if args.json else print_placements(report)


def _simulate(args: argparse.Namespace) -> None:
    from cluster.simulate import format_summary, simulate, write_result

    result = simulate(args.url, args.data, args.sessions, seed=args.seed, k=args.k, page=args.page,
                      concurrency=args.concurrency, version=args.version)
    print(format_summary(result))
    if args.out:
        print(f"wrote {write_result(result, args.data, args.out)}/simulate.json and events.parquet")
    if result["errors"] == result["sessions"]:
        raise RuntimeError(f"every session failed: {result['error_kinds']}")


def _loop(args: argparse.Namespace) -> None:
    import dataclasses

    from cluster.loop import run_loop, run_seeds

    cfg = load_config(args.config)
    if args.port is not None:
        cfg = dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, port=args.port))
    if args.seeds:
        try:
            seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            raise ValueError(f"--seeds: a comma-separated list of integers, got {args.seeds!r}") from None
        run_seeds(cfg, args.sessions, args.out, seeds, k=args.k, ranker_views=args.ranker_views,
                  shuffle=args.shuffle)
        return
    run_loop(cfg, args.sessions, args.out, seed=args.seed, k=args.k, ranker_views=args.ranker_views,
             keep_serving=args.keep_serving, shuffle=args.shuffle)


def _stamped_on_serving_clock(changes: list, root: Path, mode: str) -> list:
    """New items without a creation time are created now on the serving clock of the shop's newest bundle (as
    `POST /admin/items` stamps them), so a version on its data's time line counts them new for a week."""
    import dataclasses

    from training.request.clock import version_clock

    manifests = sorted(root.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not manifests:
        return changes  # no bundle yet: the change log stamps the wall clock
    now = version_clock(json.loads(manifests[-1].read_text()), mode).now()
    return [dataclasses.replace(c, created_at=now) if c.op == "upsert" and c.created_at is None else c
            for c in changes]


def _items(args: argparse.Namespace) -> None:
    """`recsys items apply FILE.parquet`: the file's changes into the change log the shop's live versions follow."""
    import pyarrow.parquet as pq

    from deployments.app import change_log_spec
    from indexing.changes import MAX_CHANGES, open_change_log
    from training.data.changes import changes_from_table

    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's many read errors: name the file
        raise ValueError(f"{path}: not a readable Parquet file: {e}") from e
    changes = changes_from_table(table, str(path))
    spec = args.log
    if spec is None:
        from cluster.demo import bundles_root

        cfg = load_config(args.config)
        if not Path(cfg.data.dir).is_dir():
            raise FileNotFoundError(f"{cfg.data.dir}: no shop here (run `make demo`, or pass --log)")
        root = bundles_root(cfg, Path(cfg.data.dir))
        spec = change_log_spec(cfg.serving, root / "any-version")
        changes = _stamped_on_serving_clock(changes, root, cfg.serving.clock)
    if not spec:
        raise ValueError("serving.changes is off in this config: pass --log PATH_OR_REDIS_URL")
    log = open_change_log(spec)
    offset = log.end()
    for start in range(0, len(changes), MAX_CHANGES):
        offset = log.append(changes[start:start + MAX_CHANGES])
    print(json.dumps({"file": str(path), "changes": len(changes), "log": spec if "://" not in spec else "redis",
                      "offset": offset}))


def _rollout(args: argparse.Namespace) -> None:
    from cluster.rollout_cli import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recsys", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write a synthetic shop (catalog, users, events) as Parquet")
    g.add_argument("--size", default="tiny", help="tiny | small | demo | large")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--examination", default="power:0.8",
                   help="position bias of the clicks: power:ETA (default), log:ETA or exponential:GAMMA")
    g.add_argument("--out", type=Path, required=True)
    g.set_defaults(func=_generate)

    t = sub.add_parser("train", help="train the two-tower model and the ranker on Ray Train into a bundle")
    t.add_argument("--data", type=Path, required=True, help="shop folder (catalog/users/events Parquet)")
    t.add_argument("--bundles", type=Path, default=Path("bundles"))
    t.add_argument("--version", required=True)
    t.add_argument("--workers", type=int, default=None, help="Ray Train workers (default from config)")
    t.add_argument("--config", default=None, help="YAML config path or built-in name (demo, tiny)")
    t.set_defaults(func=_train)

    i = sub.add_parser("index", help="re-embed a bundle's catalog on Ray Data into FAISS shard actors")
    i.add_argument("--bundle", type=Path, required=True)
    i.add_argument("--shards", type=int, default=None)
    i.add_argument("--kind", choices=KINDS, default=None, help="index type (default from config: index.ann.kind)")
    i.add_argument("--config", default=None)
    i.set_defaults(func=_index)

    e = sub.add_parser("eval", help="train every retrieval model and baseline on a data set (on Ray Train), evaluate "
                       "them, and write results.json, report.md and plots")
    from training.evaluation.harness import add_eval_arguments  # one definition of the arguments, beside eval_command

    add_eval_arguments(e)
    e.set_defaults(func=_eval)

    sim = sub.add_parser("simulate", help="the closed-loop shop: a synthetic shop's users ask the live service over "
                         "HTTP and respond through /events with the generator's behaviour model")
    sim.add_argument("--url", default="http://127.0.0.1:8000", help="the service's HTTP endpoint")
    sim.add_argument("--data", type=Path, required=True, help="the synthetic shop folder the service was trained on")
    sim.add_argument("--sessions", type=int, default=500)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--k", type=int, default=12, help="items per answer (one screen)")
    sim.add_argument("--page", default="home", help="the surface every request is for")
    sim.add_argument("--version", default=None, help="pin every request to this live version (default: the split)")
    sim.add_argument("--concurrency", type=int, default=4)
    sim.add_argument("--out", type=Path, default=None,
                     help="folder for simulate.json (the figures) and events.parquet (what the users did)")
    sim.set_defaults(func=_simulate)

    lp = sub.add_parser("loop", help="the closed loop: serve v1, simulate, train v2 on what v1 served, evaluate "
                        "both offline, serve both and simulate again; v1 vs v2 offline and online")
    lp.add_argument("--config", default="demo", help="YAML config path or built-in name (demo, tiny): its shop and "
                    "training settings")
    lp.add_argument("--sessions", type=int, default=2000, help="simulated sessions per round")
    lp.add_argument("--seed", type=int, default=1, help="the simulated users' and v2's training seed (v1 stays)")
    lp.add_argument("--seeds", default=None, help="comma-separated seeds: one loop each into OUT/seed-S, then "
                    "every figure over them (OUT/loop-seeds.json)")
    lp.add_argument("--k", type=int, default=12, help="items per answer (one screen)")
    lp.add_argument("--port", type=int, default=None, help="HTTP port (default from config: serving.port)")
    lp.add_argument("--out", type=Path, default=Path("loop"), help="folder for loop.json, both rounds, the loop shop, "
                    "v2's bundle and the impression log")
    lp.add_argument("--ranker-views", choices=("served", "all"), default="served",
                    help="v2's ranker learns from the served period's views only (default) or from every logged view")
    lp.add_argument("--keep-serving", action="store_true", help="leave v1 and v2 deployed at the end")
    lp.add_argument("--shuffle", type=float, default=0.0,
                    help="serve round 1 with the logging shuffle at this epsilon, then estimate policy changes "
                         "from its served log against the shop's truth (recsys replay --served)")
    lp.set_defaults(func=_loop)

    r = sub.add_parser("replay", help="counterfactual replay on a synthetic shop: log impressions with propensities, "
                       "estimate policy changes with IPS/SNIPS, compare with the simulated truth")
    r.add_argument("--data", type=Path, default=None,
                   help="synthetic shop folder (recsys generate); with --served, optional: the shop the served "
                        "users came from, whose hidden truth checks each estimate")
    r.add_argument("--served", default=None,
                   help="an impression log of a live service (a folder or redis:// URL, serving.impressions): "
                        "estimate the changes from what it served instead of from simulated logs")
    r.add_argument("--events", type=Path, default=None,
                   help="with --served: Parquet events that followed the answers (user_id, item_id, action, "
                        "timestamp), e.g. recsys simulate --out's events.parquet")
    r.add_argument("--version", default=None, help="with --served: only this version's answers")
    r.add_argument("--window-s", type=float, default=3600.0,
                   help="with --served: how long after an answer an action still counts as its outcome")
    r.add_argument("--changes", default=None,
                   help='JSON {"name": {policy overrides}} (default: stronger exploration, brand diversity off, '
                        'at most 2 per category; with --served: no shuffle, brand diversity off, at most 2 per '
                        'category, exploration off)')
    r.add_argument("--sessions", type=int, default=4000)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--config", default=None, help="config whose policy section is the base policy")
    r.add_argument("--out", type=Path, default=None, help="write every estimate as JSON")
    r.add_argument("--impressions", type=Path, default=None, help="write the logged impressions as Parquet")
    r.set_defaults(func=_replay)

    b = sub.add_parser("bench", help="run a benchmark of bench/ (its own options follow, e.g. --out FILE.json)")
    b.add_argument("name", choices=BENCHMARKS)
    b.add_argument("args", nargs=argparse.REMAINDER, help="options of that benchmark (see recsys bench NAME --help)")
    b.set_defaults(func=_bench)

    st = sub.add_parser("status", help="the cluster's nodes and where every replica, shard and store runs "
                        "(RAY_ADDRESS)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)

    ro = sub.add_parser("rollout", help="versioned rollout over the admin endpoints: start (deploy + gate), status, "
                        "shift, rollback, retire, shadow")
    from cluster.rollout_cli import add_arguments as add_rollout_arguments

    add_rollout_arguments(ro)
    ro.set_defaults(func=_rollout)

    it = sub.add_parser("items", help="catalog changes into the change log the live versions follow (no rebuild)")
    it_sub = it.add_subparsers(dest="items_command", required=True)
    ap = it_sub.add_parser("apply", help="apply a Parquet file of changes: columns op (upsert | update | delete), "
                           "item_id, and brand, category, price, in_stock, created_at (null keeps the value)")
    ap.add_argument("file", metavar="FILE.parquet")
    ap.add_argument("--config", default="demo", help="whose shop's log (default: demo's; see serving.changes)")
    ap.add_argument("--log", default=None, help="the change log itself: a file path or a redis:// URL")
    ap.set_defaults(func=_items)

    for name, keep in (("demo", False), ("serve", True)):
        d = sub.add_parser(name, help="data, training, indexing, serving and real HTTP requests" if not keep
                           else "the demo's deployment, then keep serving and print the URL")
        d.add_argument("--config", default="demo", help="YAML config path or built-in name (demo, tiny)")
        d.add_argument("--store", choices=("embedded", "redis"), default=None,
                       help="online store (default from config: serving.store): embedded (in memory, lost on "
                            "restart) or redis (durable; a local redis-server is installed and started if none answers)")
        d.add_argument("--redis-url", default="redis://127.0.0.1:6380/0", help="with --store redis")
        if keep:
            d.add_argument("--emit-config", type=Path, default=None, metavar="FILE.yaml",
                           help="write the Serve config file of this deployment (for `serve deploy`) and exit; "
                                "the admin token's digest is taken from $RECSYS_ADMIN_TOKEN")
        d.set_defaults(func=lambda a, keep=keep: _demo(a, keep_serving=keep))
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message naming it, no traceback
        print(f"recsys {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
