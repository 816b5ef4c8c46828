"""`recsys loop`: the closed loop as one command. Serve v1, let the synthetic shop's users answer it
(`cluster.simulate`), train v2 on the shop's history plus what v1 served and what the users did with it, evaluate
both offline on the same held-out period, serve both side by side and simulate again: v1 against v2 on simulated
online metrics (clicks and purchases per session, 95% intervals) beside the offline ones.

The served period is the data of the next version, as in a real shop: the loop shop (`loop_shop`) is the original
shop with the simulated events appended (a view per shown item at its position, then the funnel), so v2's ranker
learns from the impressions v1 served (shown and not clicked: the hard negatives of a served list) and its
retrieval from the engagements they led to. The later `HELD_OUT_SHARE` of the served events is held out: both
versions are scored offline on it (engagements in it, and the generator's hidden relevance of their lists).
Offline engagements in the served period can only be with items v1 showed, so that metric favours v1; the hidden
relevance and the online rates do not.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from cluster.config import RecsysConfig

console = Console(width=max(Console().width, 180))  # the loop's table is wide; a log file gets all of it
HELD_OUT_SHARE = 0.5  # the later half of the served events: v2's held-out period, and the offline comparison's
# retrieval models the offline comparison can score: by one dot product, or the multi-interest model's queries
LOOP_MODELS = ("two_tower", "two_tower_in_batch", "multi_interest")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def loop_shop(shop_dir: str | Path, served: pa.Table, out: str | Path, conditions: pa.Table | None = None) -> Path:
    """Writes `out`: the shop at `shop_dir` with the events of its served period `served` (EVENTS_SCHEMA rows, all
    after the shop's last event) appended; its meta records where the served period starts (`served_from`) and ends.
    `conditions`: the served period's logged (condition, user, item) triples
    (`training.data.impressions.condition_triples`), written beside the tables for the multi-interest model.

    Raises:
        ValueError: no served events, or served events before the shop's end (the loop's data must move forward).
    """
    from training.data.impressions import write_condition_triples
    from training.data.schemas import Shop, read_shop, snapshot_id, write_shop

    shop = read_shop(shop_dir)
    if served.num_rows == 0:
        raise ValueError("loop_shop: the served period has no events (every simulated session failed?)")
    t = served["timestamp"].cast(pa.int64())
    first, last = int(pc.min(t).as_py()), int(pc.max(t).as_py())
    end = int(pc.max(shop.events["timestamp"].cast(pa.int64())).as_py())
    if first <= end:
        raise ValueError(f"loop_shop: served events start at {_iso(first)}, not after the shop's end {_iso(end)}: "
                         "the version's serving clock must run on the shop's time line (serving.clock 'auto' or "
                         "'data')")
    events = pa.concat_tables([shop.events, served.select(shop.events.schema.names).cast(shop.events.schema)])
    meta = dict(shop.meta) | {"end_time": _iso(last), "served_from": _iso(first), "served_events": served.num_rows,
                              "loop_of": snapshot_id(shop_dir)}
    if conditions is not None:
        meta["condition_triples"] = conditions.num_rows
    write_shop(Shop(shop.catalog, shop.users, events, meta, dict(shop.hidden)), out)
    if conditions is not None:
        write_condition_triples(conditions, out)
    return Path(out)


def served_log(log: str, prefix: str, answers: int, timeout_s: float = 30.0) -> pa.Table:
    """The impressions of the requests whose id starts with `prefix`, once `answers` of them are in the log (the
    ingress flushes every few seconds, off the request path), or what is there after `timeout_s`.

    Raises:
        FileNotFoundError: a log folder that is still not there after `timeout_s` (nothing was ever logged).
    """
    from training.data.impressions import IMPRESSIONS_SCHEMA, read_impressions

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            logged = read_impressions(log)
        except FileNotFoundError:  # the first flush makes the folder
            if time.monotonic() >= deadline:
                raise
            logged = IMPRESSIONS_SCHEMA.empty_table()
        logged = logged.filter(pc.starts_with(logged["request_id"], prefix))
        if len(pc.unique(logged["request_id"])) >= answers or time.monotonic() >= deadline:
            return logged
        time.sleep(1.0)


def held_out_fraction(n_events: int, n_served: int, share: float = HELD_OUT_SHARE) -> float:
    """The temporal split's test fraction that holds out the later `share` of the served events (the served period
    is the end of the loop shop's `n_events`)."""
    if not 0 < n_served <= n_events or not 0 < share < 1:
        raise ValueError(f"held_out_fraction: need 0 < n_served <= n_events and 0 < share < 1, got "
                         f"{n_served}, {n_events}, {share}")
    return share * n_served / n_events


def offline_on(bundle_dir: str | Path, shop, test_fraction: float, max_users: int | None, seed: int,
               k: int = 10) -> dict[str, Any]:
    """One version's offline figures on the loop shop's held-out period, in its own vocabulary (the same events,
    cutoff and users for every version): retrieval's recall and NDCG against the held-out engagements, the NDCG@k of
    the order the version serves (ranker or retrieval, `serving.order`) and of the other, and the mean hidden
    relevance of the top k of each order."""
    import torch

    from training.data.splits import temporal
    from training.evaluation.ranking import true_relevance_of
    from training.fit.bundle import load_bundle
    from training.fit.offline_metrics import KS, ORDER_CANDIDATES, ORDER_USERS, fused_order, ranker_reorder
    from training.fit.retrieval import MultiInterestRetrieval
    from training.metrics import evaluate_ranked, ndcg_at_k
    from training.models.retrieval_baselines import recommend_by_chunks

    b = load_bundle(bundle_dir)
    model = b.config.get("retrieval", {}).get("model")
    if model not in LOOP_MODELS:
        raise ValueError(f"{bundle_dir}: the loop compares versions of {list(LOOP_MODELS)}, not {model!r}")
    task = temporal(shop, test_fraction, max_users=max_users, seed=seed, history_len=b.space.history_len,
                    space=b.space)
    if len(task.user_ids) == 0:
        raise ValueError(f"{bundle_dir}: no user engaged with a new item in the held-out period (test_fraction "
                         f"{test_fraction:.4f}): simulate more sessions")
    tower, ranker = b.two_tower(), b.ranker()
    with torch.inference_mode():
        V = tower.item_tower_by_index(torch.arange(task.space.n_items + 1))

        def score_rows(rows: slice) -> np.ndarray:
            scores = tower.user_tower(*(torch.from_numpy(a) for a in task.user_inputs(rows))) @ V.T
            scores[:, 0] = -torch.inf
            return scores.numpy()

        if model == "multi_interest":  # one query per interest and explicit condition, merged as serving does
            adapter = MultiInterestRetrieval(conditions=b.config["retrieval"].get("conditions"))
            adapter.model = tower
            ranked = adapter.recommend(task, ORDER_CANDIDATES)
        else:
            ranked = recommend_by_chunks(task, ORDER_CANDIDATES, score_rows)
        n = min(len(ranked), ORDER_USERS)
        reranked = ranker_reorder(ranker, ranked[:n], task, tower, slice(0, n))
    orders = {"retrieval": ranked[:n], "ranker": reranked, "fused": fused_order(ranked[:n], reranked)}
    serves = b.config.get("retrieval", {}).get("order", "ranker")
    targets = task.targets[:n]
    out: dict[str, Any] = {"version": b.version, "users": int(n), "serves": serves,
                           "retrieval": evaluate_ranked(ranked, task.targets, KS)}
    for name, lists in orders.items():
        out[f"{name}_ndcg@{k}"] = float(ndcg_at_k(lists, targets, k))
        out[f"{name}_true_relevance@{k}"] = float(true_relevance_of(shop.hidden, task.user_rows[:n],
                                                                    lists[:, :k]).mean())
    out[f"final_ndcg@{k}"], out[f"final_true_relevance@{k}"] = out[f"{serves}_ndcg@{k}"], \
        out[f"{serves}_true_relevance@{k}"]
    return out


def fresh_store(timeout_s: float = 30.0) -> None:
    """Removes the embedded online store (a detached actor that outlives Serve), so the next loop's users start from
    the shop's history, not with the events of an earlier loop in the same cluster."""
    import ray

    from deployments.store import STORE_NAME
    from training import NAMESPACE

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.kill(ray.get_actor(STORE_NAME, namespace=NAMESPACE), no_restart=True)
        except ValueError:  # no such actor: gone
            return
        time.sleep(0.2)
    raise TimeoutError(f"the online store actor {STORE_NAME} did not go within {timeout_s:.0f}s")


def _serve(cfg: RecsysConfig, shop_dir: Path, bundles: list[Path], weights: dict[str, float], seed_store: bool) -> str:
    from cluster.serving import deploy_ingress, deploy_version, seed_online_store, start_serve, wait_healthy

    if seed_store:
        start_serve(cfg.serving)
        fresh_store()
        seed_online_store(shop_dir)
    for path in bundles:
        deploy_version(path, cfg.serving)
    deploy_ingress(weights, cfg.policy.to_dict(), cfg.serving)
    url = f"http://{cfg.serving.host}:{cfg.serving.port}"
    wait_healthy(url)
    return url


def _ensure_index(path: Path, cfg: RecsysConfig) -> None:
    from indexing.embed import INDEX_MANIFEST, embed_catalog

    if not (path / INDEX_MANIFEST).is_file():
        embed_catalog(path, cfg.index)


def run_loop(cfg: RecsysConfig, sessions: int, out: str | Path, seed: int = 1, k: int = 12,
             ranker_views: str = "served", keep_serving: bool = False, shuffle: float = 0.0) -> dict[str, Any]:
    """The loop end to end (module docstring); writes `out/loop.json` and returns the report.

    `shuffle` > 0 serves round 1 with the policy's logging shuffle at that epsilon (`PolicyConfig.shuffle_epsilon`)
    and then estimates policy changes from round 1's served log against the shop's truth
    (`training.evaluation.served_replay`, the report's "replay"); round 2 serves without it.

    v1 is the shop's version trained on its own history (the demo's v1 when it exists); `seed` varies the rest of
    the loop: round 1's and round 2's simulated users (`seed`, `seed + 1000`) and v2's training seed. v2's ranker
    learns from the views of the served period only (`ranker_views` "served") or from all logged views ("all").
    """
    from ray import serve

    from cluster.demo import Phases, ensure_shop, version_train_config
    from cluster.runtime import init_ray
    from cluster.simulate import events_table, format_summary, paired, simulate, write_result
    from deployments.store import EMBEDDED
    from training.data.impressions import condition_triples, read_impressions
    from training.data.schemas import read_shop
    from training.fit.bundle import MANIFEST
    from training.fit.train_loop import RANKER_VIEWS
    from training.fit.version import train_version, training_run_id

    if sessions < 2:
        raise ValueError(f"--sessions must be >= 2 (half of the served period is held out), got {sessions}")
    if cfg.train.retrieval_model not in LOOP_MODELS:
        raise ValueError(f"train.retrieval_model: the loop compares versions of {list(LOOP_MODELS)}, got "
                         f"{cfg.train.retrieval_model!r}")
    if not 0.0 <= shuffle <= 1.0:
        raise ValueError(f"--shuffle must be in [0, 1], got {shuffle}")
    if ranker_views not in RANKER_VIEWS:
        raise ValueError(f"--ranker-views must be one of {list(RANKER_VIEWS)}, got {ranker_views!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "impressions", ignore_errors=True)  # this run's impression log only
    phases = Phases()
    # The loop's own log, and the embedded store, fresh each loop: a Redis store keeps what earlier runs posted.
    cfg = dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, impressions=str(out / "impressions"),
                                                               store=EMBEDDED))
    with phases.timed("data"):
        shop_dir = ensure_shop(cfg)
    with phases.timed("ray start"):
        init_ray()

    v1_cfg = dataclasses.replace(version_train_config(cfg, "v1", 0), retrieval_model=cfg.train.retrieval_model)
    v1 = _v1_path(cfg, shop_dir, v1_cfg)
    with phases.timed("train v1"):
        if not (v1 / MANIFEST).is_file():
            console.rule(f"training v1 ({v1_cfg.retrieval_model} + ranker) on the shop's own history")
            train_version(shop_dir, v1.parent, "v1", v1_cfg)
        _ensure_index(v1, cfg)
    round1_cfg = dataclasses.replace(cfg, policy=cfg.policy.with_overrides({"shuffle_epsilon": shuffle})) \
        if shuffle > 0 else cfg
    with phases.timed("serve v1"):
        url = _serve(round1_cfg, shop_dir, [v1], {"v1": 100.0}, seed_store=True)
    try:
        console.rule(f"round 1: {sessions} simulated sessions against v1 alone at {url}")
        with phases.timed("simulate round 1"):
            r1 = simulate(url, shop_dir, sessions, seed=seed, k=k, prefix="loop1")
        console.print(format_summary(r1))
        write_result(r1, shop_dir, out / "round1")
        served = events_table(r1, shop_dir)
        replayed = None
        if shuffle > 0:
            with phases.timed("replay round 1"):
                replayed = replay_round(cfg.serving.impressions, served, shop_dir, out / "round1" / "replay.json",
                                        r1["all"]["sessions"])

        # what v1's explicit conditions led to (none when v1 is a two-tower model): the multi-interest model's data
        triples = condition_triples(served_log(cfg.serving.impressions, f"loop1-{seed}-", r1["all"]["sessions"]),
                                    served)
        loop_dir = loop_shop(shop_dir, served, out / "shop-loop", conditions=triples)
        loop = read_shop(loop_dir)
        frac = held_out_fraction(loop.events.num_rows, served.num_rows)
        v2_cfg = dataclasses.replace(v1_cfg, seed=cfg.train.seed + seed, test_fraction=frac,
                                     ranker_views=ranker_views, **v2_schedule(v1))
        v2 = out / f"v2-{training_run_id(loop_dir, v2_cfg)}" / "v2"  # one per loop shop and training settings
        with phases.timed("train v2"):
            if not (v2 / MANIFEST).is_file():
                console.rule(f"training v2 on the shop plus what v1 served ({served.num_rows:,} events; the later "
                             f"{HELD_OUT_SHARE:.0%} held out, test_fraction {frac:.4f})")
                train_version(loop_dir, v2.parent, "v2", v2_cfg)
            _ensure_index(v2, cfg)
        with phases.timed("offline"):
            offline = {name: offline_on(path, loop, frac, cfg.train.eval_users, cfg.train.seed)
                       for name, path in (("v1", v1), ("v2", v2))}

        with phases.timed("serve v2"):
            _serve(cfg, shop_dir, [v2], {"v1": 50.0, "v2": 50.0}, seed_store=False)
        console.rule(f"round 2: {sessions} simulated sessions, v1 and v2 at 50/50 (sticky per user)")
        with phases.timed("simulate round 2"):
            r2 = simulate(url, shop_dir, sessions, seed=seed + 1000, k=k, prefix="loop2")
        console.print(format_summary(r2))
        write_result(r2, shop_dir, out / "round2")
        console.rule(f"paired: the same {sessions} sessions against v1 and against v2 (pinned, no events posted)")
        with phases.timed("simulate paired"):
            pair = paired(url, shop_dir, sessions, ("v1", "v2"), seed=seed + 2000, k=k, prefix="loop3")
        console.print(paired_line(pair))
        logged = read_impressions(cfg.serving.impressions)
        round1_logged = int(pc.sum(pc.starts_with(logged["request_id"], f"loop1-{seed}-")).as_py() or 0)
    finally:
        if not keep_serving:
            serve.shutdown()
    report = {"sessions": sessions, "k": k, "seed": seed, "ranker_views": ranker_views, "shop": str(shop_dir),
              "retrieval_model": v1_cfg.retrieval_model,
              "loop_shop": str(loop_dir), "bundles": {"v1": str(v1), "v2": str(v2)}, "held_out_share": HELD_OUT_SHARE,
              "test_fraction": frac, "served_events": served.num_rows,
              "served_views": int(pc.sum(pc.equal(served["action"], "view")).as_py()),
              "round1_impressions_logged": round1_logged, "condition_triples": triples.num_rows,
              "shuffle": shuffle, "replay": replayed,
              "offline": offline, "round1": {k_: v for k_, v in r1.items() if k_ not in ("events", "per_session")},
              "round2": {k_: v for k_, v in r2.items() if k_ not in ("events", "per_session")}, "paired": pair,
              "phases_s": phases.seconds}
    (out / "loop.json").write_text(json.dumps(report, indent=2, default=float))
    console.print(loop_table(report))
    console.print(paired_line(pair))
    console.print(phases.table())
    return report


def v2_schedule(v1: Path) -> dict[str, int]:
    """v2's retrieval schedule: v1's best epoch count, with no validation split of its own.

    A validation split of the loop shop would be its newest training events, which are the served period's first
    half (the second is held out): v2 would validate on the few users who engaged with a new item there and never
    learn from what v1 served, the data the loop is for. v1's validation on the shop's own history chose the epochs.
    """
    from training.fit.bundle import MANIFEST

    validation = json.loads((v1 / MANIFEST).read_text())["metrics"].get("training", {}).get("retrieval_validation")
    best = (validation or {}).get("best_epoch")
    return {"val_users": 0} | ({"tower_epochs": int(best)} if best else {})


def _v1_path(cfg: RecsysConfig, shop_dir: Path, v1_cfg: Any) -> Path:
    """Where the loop's v1 lives: the demo's v1 when that is (or will be) the same retrieval model on the same data,
    else a folder of its own training settings, so loops of different models never reuse each other's v1."""
    from cluster.demo import bundles_root
    from training.fit.bundle import MANIFEST
    from training.fit.version import training_run_id

    demo_v1 = bundles_root(cfg, shop_dir) / "v1"
    trained = json.loads((demo_v1 / MANIFEST).read_text()).get("metrics", {}).get("retrieval_model") \
        if (demo_v1 / MANIFEST).is_file() else None
    demo_model = cfg.demo.retrieval.get("v1", cfg.train.retrieval_model)
    if demo_model == v1_cfg.retrieval_model and trained in (None, v1_cfg.retrieval_model):
        return demo_v1
    return demo_v1.parent / f"v1-{training_run_id(shop_dir, v1_cfg)}" / "v1"


def paired_line(pair: dict[str, Any]) -> str:
    """The paired comparison in one line: second minus first per session, with 95% intervals."""
    a, b = pair["versions"]
    c, p = pair["difference"]["clicks_per_session"], pair["difference"]["purchases_per_session"]
    return (f"paired ({pair['sessions']} sessions each against {a} and {b}): {b} - {a} clicks/session "
            f"{c['mean']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}], purchases/session {p['mean']:+.4f} "
            f"[{p['lo']:+.4f}, {p['hi']:+.4f}]; {b} ahead in {pair['difference']['second_ahead_share']:.0%} of "
            f"the sessions, behind in {pair['difference']['second_behind_share']:.0%}")


def replay_round(log: str, events: Any, shop_dir: Path, path: Path, answers: int) -> dict[str, Any]:
    """Policy changes estimated from round 1's served log (IPS/SNIPS) beside the shop's truth; written to `path`.
    Waits up to 30 s for the ingress to flush the round's `answers` (it writes every 5 s)."""
    from training.data.schemas import read_shop
    from training.evaluation.served_replay import format_served, load_served, served_replay

    deadline = time.monotonic() + 30.0
    requests, counts = load_served(log, events)
    while counts["answers_with_inputs"] < answers and time.monotonic() < deadline:
        time.sleep(1.0)
        requests, counts = load_served(log, events)
    if not requests:
        raise RuntimeError(f"round 1's impression log {log} holds no answer with its policy input ({counts})")
    result = served_replay(requests, read_shop(shop_dir)) | {"log": counts}
    console.print(format_served(result))
    path.write_text(json.dumps(result, indent=2, default=float))
    return result


def loop_table(report: dict[str, Any]) -> Table:
    """v1 against v2: offline on the held-out served period beside the simulated online rates of round 2."""
    table = Table(title=f"closed loop: v2 learned from what v1 served ({report['served_views']:,} impressions); "
                        f"offline on the later {report['held_out_share']:.0%} of the served period, online round 2"
                        + (f"; v2's explicit conditions learned from {report['condition_triples']:,} logged triples"
                           if report.get("condition_triples") else ""))
    for col in ("version", "serves", "recall@100", "final ndcg@10", "retrieval ndcg@10", "ranker ndcg@10",
                "true rel@10", "sessions", "clicks/session [95%]", "purchases/session [95%]"):
        table.add_column(col, justify="left" if col in ("version", "serves") else "right")
    for v, off in report["offline"].items():
        on = report["round2"]["by_version"].get(v)
        c, p = (on["clicks_per_session"], on["purchases_per_session"]) if on else (None, None)
        table.add_row(v, off["serves"], f"{off['retrieval']['recall@100']:.4f}", f"{off['final_ndcg@10']:.4f}",
                      f"{off['retrieval_ndcg@10']:.4f}", f"{off['ranker_ndcg@10']:.4f}",
                      f"{off['final_true_relevance@10']:.3f}", str(on["sessions"]) if on else "0",
                      f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]" if c else "-",
                      f"{p['mean']:.4f} [{p['lo']:.4f}, {p['hi']:.4f}]" if p else "-")
    return table



SEED_FIGURES = {  # name -> how to read it from one loop report's figures of a version
    "final ndcg@10": lambda off, on: off["final_ndcg@10"],
    "ranker order ndcg@10": lambda off, on: off["ranker_ndcg@10"],
    "retrieval order ndcg@10": lambda off, on: off["retrieval_ndcg@10"],
    "true rel@10": lambda off, on: off["final_true_relevance@10"],
    "ranker order true rel@10": lambda off, on: off["ranker_true_relevance@10"],
    "retrieval order true rel@10": lambda off, on: off["retrieval_true_relevance@10"],
    "recall@100": lambda off, on: off["retrieval"]["recall@100"],
    "clicks/session": lambda off, on: on["clicks_per_session"]["mean"] if on else float("nan"),
    "purchases/session": lambda off, on: on["purchases_per_session"]["mean"] if on else float("nan"),
}


def over_seeds(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure of each version over the loop's seeds (mean, std, min, max, per seed), and v2 - v1 per seed."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in reports], "versions": {}, "v2_minus_v1": {}}
    for v in ("v1", "v2"):
        out["versions"][v] = {}
        for name, read in SEED_FIGURES.items():
            xs = np.array([read(r["offline"][v], r["round2"]["by_version"].get(v)) for r in reports], dtype=float)
            out["versions"][v][name] = {"mean": float(np.mean(xs)), "std": float(np.std(xs)),
                                        "min": float(np.min(xs)), "max": float(np.max(xs)), "per_seed": xs.tolist()}
    for name in SEED_FIGURES:
        d = np.array(out["versions"]["v2"][name]["per_seed"]) - np.array(out["versions"]["v1"][name]["per_seed"])
        out["v2_minus_v1"][name] = {"mean": float(np.mean(d)), "std": float(np.std(d)), "per_seed": d.tolist(),
                                    "positive_seeds": int((d > 0).sum())}
    pairs = [r["paired"]["difference"] for r in reports if r.get("paired")]
    if pairs:  # the paired round's v2 - v1 per seed, and in how many seeds its interval excludes 0
        out["paired"] = {m: {"per_seed": [d[m]["mean"] for d in pairs],
                             "interval_above_zero": sum(d[m]["lo"] > 0 for d in pairs),
                             "interval_below_zero": sum(d[m]["hi"] < 0 for d in pairs)}
                         for m in ("clicks_per_session", "purchases_per_session")}
    return out


def seeds_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"closed loop over seeds {summary['seeds']}: mean ± std (min-max)")
    table.add_column("figure")
    for col in ("v1", "v2", "v2 - v1 (seeds v2 ahead)"):
        table.add_column(col, justify="right")
    for name in SEED_FIGURES:
        cells = [f"{f['mean']:.4f} ± {f['std']:.4f} ({f['min']:.4f}-{f['max']:.4f})"
                 for f in (summary["versions"]["v1"][name], summary["versions"]["v2"][name])]
        d = summary["v2_minus_v1"][name]
        table.add_row(name, *cells, f"{d['mean']:+.4f} ± {d['std']:.4f} ({d['positive_seeds']}/{len(d['per_seed'])})")
    for m, f in summary.get("paired", {}).items():
        n = len(f["per_seed"])
        table.add_row(f"paired v2 - v1 {m.replace('_per_session', '')}/session", "", "",
                      f"{np.mean(f['per_seed']):+.4f} (interval > 0 in {f['interval_above_zero']}/{n}, "
                      f"< 0 in {f['interval_below_zero']}/{n})")
    return table


def finished_loop(folder: Path, cfg: RecsysConfig, sessions: int, seed: int, k: int = 12,
                  ranker_views: str = "served", shuffle: float = 0.0) -> dict[str, Any] | None:
    """The report of a loop already run into `folder` with the same shop, sessions, seed, k, ranker views and
    shuffle."""
    try:
        report = json.loads((folder / "loop.json").read_text())
    except (OSError, ValueError):
        return None
    same = (report.get("shop"), report.get("sessions"), report.get("seed"), report.get("k"),
            report.get("ranker_views"), report.get("shuffle", 0.0), report.get("retrieval_model", "two_tower")) == (
        cfg.data.dir, sessions, seed, k, ranker_views, shuffle, cfg.train.retrieval_model)
    return report if same else None


def run_seeds(cfg: RecsysConfig, sessions: int, out: str | Path, seeds: list[int], **kwargs: Any) -> dict[str, Any]:
    """`run_loop` once per seed into `out/seed-<s>/`, then the figures over seeds in `out/loop-seeds.json`."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must name distinct seeds, got {seeds}")
    out = Path(out)
    reports = []
    for s in seeds:
        done = finished_loop(out / f"seed-{s}", cfg, sessions, s, **kwargs)
        if done:
            console.print(f"[bold]loop[/] seed {s}: reusing {out / f'seed-{s}' / 'loop.json'}")
        reports.append(done or run_loop(cfg, sessions, out / f"seed-{s}", seed=s, **kwargs))
    summary = over_seeds(reports)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loop-seeds.json").write_text(json.dumps(summary, indent=2))
    console.print(seeds_table(summary))
    return summary
