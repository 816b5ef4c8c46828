"""The ranker's item table started from the item tower or at random: which orders retrieval's candidates better?

Per seed, on one synthetic shop: the version's temporal split and retrieval model (`train.retrieval_model`, trained
once), then the version's ranker twice on Ray Train with the same data, negatives and retrieval feature, once with
`ranker_item_init: random` and once with `tower` (`training.models.embeddings.ItemEmbedding.init_item_vectors`).
Both order the same retrieval top 500 of the same held-out users (`training.fit.offline_metrics.serving_order`):
NDCG@10 against the held-out engagements and the mean hidden true relevance of the top 10, beside retrieval's own
order; mean ± std over seeds and the per-seed difference (tower - random).

Usage: recsys bench ranker_init [--config loop] [--data DIR] [--seeds 0,1,2] --out FILE.json
       (or python -m bench.ranker_init ...); main(argv) -> results.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import spread, write_results

INITS = ("random", "tower")


def hidden_relevance_at_10(task: Any, order: np.ndarray) -> float:
    """Mean hidden r(user, item) of each user's top 10 (0 for an empty slot); nan without hidden truth."""
    if not task.hidden:
        return float("nan")
    from training.evaluation.ranking import true_relevance_of

    return float(true_relevance_of(task.hidden, np.asarray(task.user_rows)[:len(order)], order[:, :10]).mean())


def one_seed(shop_dir: Path, cfg: Any, seed: int, storage: str) -> dict[str, Any]:
    """Trains retrieval once and the ranker once per init; both order the same candidates."""
    import torch

    from training.data.features import engagements_of
    from training.data.schemas import read_shop
    from training.data.splits import temporal
    from training.fit.offline_metrics import ORDER_CANDIDATES, ranker_reorder, serving_order
    from training.fit.registry import load_model
    from training.fit.version import train_ranker

    cfg = dataclasses.replace(cfg, seed=seed, storage_path=storage, progress=False)
    shop = read_shop(shop_dir)
    task = temporal(shop, cfg.test_fraction, max_users=cfg.eval_users, seed=seed, history_len=cfg.history_len,
                    dataset=shop_dir.name)
    retriever = load_model(cfg.retrieval_model)
    retriever.run_name = f"ranker-init-{cfg.retrieval_model}-{seed}-{time.time_ns()}"
    t0 = time.perf_counter()
    retriever.fit(task, cfg)
    out: dict[str, Any] = {"seed": seed, "retrieval_seconds": time.perf_counter() - t0, "inits": {}}
    tower = retriever.model.eval()
    history = engagements_of(task.train_events, task.space)
    with torch.inference_mode():
        ranked = retriever.recommend(task, ORDER_CANDIDATES)
    for init in INITS:
        t0 = time.perf_counter()
        ranker, _ = train_ranker(task, history, dataclasses.replace(cfg, ranker_item_init=init),
                                 f"ranker-init-{init}-{seed}-{time.time_ns()}", tower)
        with torch.inference_mode():
            order = serving_order(ranker.eval(), ranked, task, retriever=tower)
            n = order["users"]
            reranked = ranker_reorder(ranker, np.asarray(ranked[:n, :ORDER_CANDIDATES], np.int64), task, tower,
                                      slice(0, n))
        out["inits"][init] = {"ranker_ndcg@10": order["ranker_ndcg@10"], "seconds": time.perf_counter() - t0,
                              "ranker_hidden_relevance@10": hidden_relevance_at_10(task, reranked)}
        out["retrieval_ndcg@10"] = order["retrieval_ndcg@10"]
        out["retrieval_hidden_relevance@10"] = hidden_relevance_at_10(task, np.asarray(ranked[:n, :10]))
        out["users"] = n
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"retrieval_ndcg@10": spread([r["retrieval_ndcg@10"] for r in runs]),
                           "retrieval_hidden_relevance@10": spread([r["retrieval_hidden_relevance@10"]
                                                                     for r in runs])}
    for key in ("ranker_ndcg@10", "ranker_hidden_relevance@10"):
        for init in INITS:
            out[f"{init}_{key}"] = spread([r["inits"][init][key] for r in runs])
        out[f"tower_minus_random_{key}"] = [r["inits"]["tower"][key] - r["inits"]["random"][key] for r in runs]
    return out


def print_table(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(x: dict[str, float]) -> str:
        return f"{x['mean']:.4f} ± {x['std']:.4f}"

    t = Table(title="Ranker item table from the item tower vs random (mean ± std over seeds)")
    for col in ("order", "NDCG@10 held out", "hidden relevance@10"):
        t.add_column(col)
    t.add_row("retrieval's own", f(s["retrieval_ndcg@10"]), f(s["retrieval_hidden_relevance@10"]))
    for init in INITS:
        t.add_row(f"ranker, {init} init", f(s[f"{init}_ranker_ndcg@10"]), f(s[f"{init}_ranker_hidden_relevance@10"]))
    t.add_row("tower - random per seed", ", ".join(f"{d:+.4f}" for d in s["tower_minus_random_ranker_ndcg@10"]),
              ", ".join(f"{d:+.4f}" for d in s["tower_minus_random_ranker_hidden_relevance@10"]))
    Console(width=150).print(t)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the comparison, prints the table, writes `--out`; returns the results (`recsys bench ranker_init`)."""
    p = argparse.ArgumentParser(prog="recsys bench ranker_init", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="loop", help="config whose shop size and train settings are used")
    p.add_argument("--data", type=Path, default=None, help="shop folder (default: the config's data, generated)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: comma-separated integers")
    if not seeds:
        p.error("--seeds: at least one seed")
    from cluster.config import load_config
    from cluster.runtime import init_ray
    from training.data.schemas import write_shop
    from training.data.synthetic import generate_shop

    cfg = load_config(args.config)
    init_ray()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ranker-init-") as tmp:
        shop_dir = args.data
        if shop_dir is None:
            shop_dir = Path(tmp) / "shop"
            write_shop(generate_shop(cfg.data.size, cfg.data.seed), shop_dir)
        runs = [one_seed(shop_dir, cfg.train, seed, str(Path(tmp) / "runs")) for seed in seeds]
    summary = summarise(runs)
    results = {"config": args.config, "seconds": time.perf_counter() - t0, "summary": summary, "runs": runs}
    print_table(summary)
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
