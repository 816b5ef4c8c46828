"""In-process latency of the policy stage on one thread: p50/p99 per configuration and per rule, for 500 items.

Inputs are realistic ranked lists from the synthetic shop: for each of 64 users, the top items by the hidden true
relevance (plus noise), with their brands, categories, creation times and stock flags, and the user's purchases.
Side by side in one run: the base config, each surface preset, a config with every rule on, and each rule alone.
Usage: recsys bench policy --out FILE.json  (or python -m bench.policy --out FILE.json); main(argv) -> results.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from training.request.contracts import RankedList, UserState
from training.request.policy import RULES, apply_policy, request_rng
from training.request.policy_config import PolicyConfig
from training.evaluation.replay import catalog_arrays, purchases_by_user, shop_now
from training.data.synthetic import generate_shop

GOAL_P99_MS = 1.0  # the budget for 500 items


def build_requests(size: str, seed: int, n_items: int, n_users: int) -> list[tuple[RankedList, UserState]]:
    """(ranked list of n_items, user state) for n_users users of the synthetic shop."""
    shop = generate_shop(size, seed)
    cat = catalog_arrays(shop.catalog)
    hidden = shop.hidden
    now = shop_now(shop)
    bought = purchases_by_user(shop.events)
    user_ids = shop.users.column("user_id").to_pylist()
    rng = np.random.default_rng(seed)
    out = []
    for u in rng.choice(len(user_ids), n_users, replace=False):
        interest = hidden["user_interest_weight"][u] @ hidden["category_centre"][
            np.maximum(hidden["user_interest_category"][u], 0)]  # (16,) the user's taste, roughly
        score = hidden["item_latent"] @ interest + 0.1 * rng.standard_normal(len(cat["item_id"]))
        top = np.argsort(-score)[:n_items]
        ranked = RankedList([cat["item_id"][i] for i in top], score[top], [cat["brand"][i] for i in top],
                            [cat["category"][i] for i in top], ["retrieval"] * len(top),
                            created_at=cat["created_at"][top], in_stock=cat["in_stock"][top])
        out.append((ranked, UserState(bought.get(user_ids[u], {}), now)))
    return out


def timed(fn: Callable[[RankedList, UserState], object], requests: list, runs: int) -> dict[str, float]:
    """Wall-clock and thread-CPU p50/p99 in ms of fn over `runs` calls cycling through the requests (after a
    warm-up pass). CPU time excludes time the thread was descheduled, so it stays meaningful on a shared machine
    where other processes preempt the benchmark; wall-clock is what a request sees on an idle core."""
    for ranked, user in requests:
        fn(ranked, user)
    wall, cpu = np.empty(runs), np.empty(runs)
    for j in range(runs):
        ranked, user = requests[j % len(requests)]
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        fn(ranked, user)
        wall[j], cpu[j] = (time.perf_counter_ns() - t0) / 1e6, (time.thread_time_ns() - c0) / 1e6
    return {"p50_ms": float(np.percentile(wall, 50)), "p99_ms": float(np.percentile(wall, 99)),
            "cpu_p50_ms": float(np.percentile(cpu, 50)), "cpu_p99_ms": float(np.percentile(cpu, 99)),
            "mean_ms": float(wall.mean()), "runs": runs}


def configs(requests: list) -> dict[str, PolicyConfig]:
    """The configurations measured: base, presets, and every rule on at once (a sponsored list drawn from the
    requests' items so sponsored slots are filled)."""
    base = PolicyConfig()
    pool = sorted({i for ranked, _ in requests for i in ranked.item_ids[100:400:25]})
    everything = base.with_overrides({"explore_epsilon": 1.0, "sponsored_items": pool, "max_per_category": 6,
                                      "min_new": 2, "blocked_brands": ["b1", "b2"]})
    return {"default": base, "home": base.for_page("home"), "category": base.for_page("category"),
            "search": base.for_page("search"), "all_rules": everything}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="recsys bench policy", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("bench/results/policy.json"))
    p.add_argument("--size", default="tiny", help="synthetic shop size the lists come from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--runs", type=int, default=3000)
    args = p.parse_args(argv)
    requests = build_requests(args.size, args.seed, args.items, args.users)
    rng_for = {id(r): request_rng(f"bench-{j}") for j, (r, _) in enumerate(requests)}
    load_before = os.getloadavg()[0]
    results: dict = {"items": args.items, "users": args.users, "shop": args.size, "threads": 1,
                     "cpus": os.cpu_count(), "load_avg_1m_before": load_before,
                     "goal_p99_ms": GOAL_P99_MS, "configs": {}, "rules": {}}
    for name, cfg in configs(requests).items():
        # A fresh generator per call would cost ~20 us; the ingress builds one per request only when exploring.
        results["configs"][name] = timed(lambda r, u, c=cfg: apply_policy(r, u, c, rng_for[id(r)]), requests, args.runs)
    every = configs(requests)["all_rules"]
    for name, rule in RULES.items():
        results["rules"][name] = timed(lambda r, u, f=rule: f(r, u, every, rng_for[id(r)]), requests, args.runs)
    results["load_avg_1m_after"] = os.getloadavg()[0]
    default = results["configs"]["default"]
    results["meets_goal_wall"] = default["p99_ms"] < GOAL_P99_MS
    results["meets_goal_cpu"] = default["cpu_p99_ms"] < GOAL_P99_MS
    print(f"{'policy stage':24s} {'p50 ms':>8s} {'p99 ms':>8s} {'cpu p50':>8s} {'cpu p99':>8s}   "
          f"({args.items} items, 1 thread, {args.runs} runs, load {load_before:.1f} on {os.cpu_count()} cpus)")
    for group in ("configs", "rules"):
        for name, r in results[group].items():
            print(f"{group[:-1] + ':' + name:24s} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} "
                  f"{r['cpu_p50_ms']:8.3f} {r['cpu_p99_ms']:8.3f}")
    print(f"default p99 < {GOAL_P99_MS} ms: wall {results['meets_goal_wall']}, cpu {results['meets_goal_cpu']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
