"""Position debiasing on shops with different examination curves: when does the ranker's position tower help?

For each examination curve (`training.data.synthetic.Examination`) and seed: a synthetic shop generated with that
curve; the ranking section's impressions (its logged views labelled with what followed, the newest 10% held out;
`training.evaluation.ranking`); EASE's top `--candidates` per evaluated user as the list to order; the transformer
ranker trained on Ray Train with and without its position tower on the same impressions. Side by side, per curve:
NDCG@10 of each order against the hidden true relevance (EASE's own order, the ranker's combined score, its click
head), click AUC on the held-out impressions, and how far the learned position effect is from the curve's true
log examination (mean absolute error over the positions logged). Mean ± std over seeds and the per-seed
difference (with - without), so a gain smaller than its spread reads as none.

Usage: recsys bench debiasing [--curves power:0.8,exponential:0.6] [--seeds 0,1,2] [--size tiny] [--epochs 5]
       --out FILE.json        (or python -m bench.debiasing ...); main(argv) -> results.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import spread, write_results

K = 10
MODELS = ("transformer_ranker", "transformer_no_position")  # with / without the position tower


def one_shop(curve: str, seed: int, size: str, epochs: int, candidates: int, users: int,
             storage: str) -> dict[str, Any]:
    """Trains both rankers on one shop of `curve` and scores them against its hidden relevance."""
    from training.data.examples import add_sampled_negatives
    from training.data.splits import leave_last_out
    from training.data.synthetic import Examination, generate_shop
    from training.evaluation.ranking import (CONTEXT_DROPOUT, UNSHOWN_NEGATIVES, drop_query_context, evaluate_model,
                                             graded_ndcg, learned_position_effect, split_impressions,
                                             train_model, true_relevance_of)
    from training.fit.train_loop import TrainConfig
    from training.models.retrieval_baselines import EASE

    examination = Examination.parse(curve)
    shop = generate_shop(size, seed, examination)
    task = leave_last_out(shop, max_users=users, seed=seed, dataset=f"synthetic-{size}-{examination.spec}")
    cfg = TrainConfig(num_workers=2, cpus_per_worker=0.25, ranker_epochs=epochs, progress=False, seed=seed,
                      storage_path=storage, eval_users=users)
    ease = EASE()
    ease.fit(task, cfg)
    cands = ease.recommend(task, candidates)
    logged, held, _ = split_impressions(task, cfg)
    train = drop_query_context(add_sampled_negatives(logged, task.space.n_items, UNSHOWN_NEGATIVES, seed),
                               CONTEXT_DROPOUT, seed)
    rows = np.arange(len(task.user_ids))
    relevance = true_relevance_of(task.hidden, np.asarray(task.user_rows), cands)
    valid = cands > 0
    shown = int(np.clip(logged.position.max() + 1, 1, 20))
    truth = np.asarray(examination.log_effect(shown))
    out: dict[str, Any] = {"curve": examination.spec, "seed": seed, "train_impressions": len(logged),
                           "users": len(rows), "true_log_examination": truth.tolist(),
                           "retrieval_true_ndcg": graded_ndcg(-np.arange(cands.shape[1], dtype=np.float64)[None]
                                                              .repeat(len(cands), 0), relevance, valid),
                           "models": {}}
    for name in MODELS:
        model, info = train_model(name, train, task, cfg)
        m = evaluate_model(model, held, task.user_inputs(rows), cands, [task.targets[i] for i in rows], relevance)
        row = {"true_ndcg": m[f"true_ndcg@{K}"]["combined"], "true_ndcg_click": m[f"true_ndcg@{K}"]["click"],
               "click_auc": m["tasks"]["click"]["auc"], "seconds": info["seconds"]}
        if model.config.position_debias:
            learned = np.asarray(learned_position_effect(model, shown))
            row["learned_log_examination"] = learned.tolist()
            row["position_mae"] = float(np.mean(np.abs(learned - truth)))
        out["models"][name] = row
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per curve: mean/std of every figure over seeds and the per-seed gain of the position tower."""
    out = {}
    for curve in dict.fromkeys(r["curve"] for r in runs):
        mine = [r for r in runs if r["curve"] == curve]
        w, wo = ([r["models"][m] for r in mine] for m in MODELS)
        gain = [a["true_ndcg"] - b["true_ndcg"] for a, b in zip(w, wo)]
        out[curve] = {"seeds": [r["seed"] for r in mine],
                      "retrieval_true_ndcg": spread([r["retrieval_true_ndcg"] for r in mine]),
                      "with_position_true_ndcg": spread([a["true_ndcg"] for a in w]),
                      "without_position_true_ndcg": spread([b["true_ndcg"] for b in wo]),
                      "with_position_click_auc": spread([a["click_auc"] for a in w]),
                      "without_position_click_auc": spread([b["click_auc"] for b in wo]),
                      "position_mae": spread([a["position_mae"] for a in w]),
                      "gain_per_seed": gain, "gain": spread(gain),
                      # a verdict needs 3 seeds agreeing in sign and a mean gain beyond the gains' own spread
                      "helps": bool(len(gain) >= 3 and min(gain) > 0 and np.mean(gain) > np.std(gain, ddof=1)),
                      "hurts": bool(len(gain) >= 3 and max(gain) < 0 and -np.mean(gain) > np.std(gain, ddof=1))}
    return out


def print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(s: dict[str, float]) -> str:
        return f"{s['mean']:.3f} ± {s['std']:.3f}"

    t = Table(title=f"Position tower on/off, NDCG@{K} against hidden true relevance (mean ± std over seeds)")
    for col in ("curve", "retrieval order", "with position", "without", "gain per seed", "click AUC with / without",
                "position curve MAE", "verdict"):
        t.add_column(col)
    for curve, s in summary.items():
        verdict = ("helps" if s["helps"] else "hurts" if s["hurts"] else "no consistent effect"
                   if len(s["seeds"]) >= 3 else "too few seeds")
        t.add_row(curve, f(s["retrieval_true_ndcg"]), f(s["with_position_true_ndcg"]),
                  f(s["without_position_true_ndcg"]), ", ".join(f"{g:+.3f}" for g in s["gain_per_seed"]),
                  f"{s['with_position_click_auc']['mean']:.3f} / {s['without_position_click_auc']['mean']:.3f}",
                  f(s["position_mae"]), verdict)
    Console(width=170).print(t)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the table, writes `--out`; returns the results (for `recsys bench debiasing`)."""
    p = argparse.ArgumentParser(prog="recsys bench debiasing", description=__doc__.split("\n\n")[0])
    p.add_argument("--curves", default="power:0.8,exponential:0.6", help="comma-separated examination specs")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated shop seeds")
    p.add_argument("--size", default="tiny", help="synthetic shop size")
    p.add_argument("--epochs", type=int, default=5, help="ranker epochs per fit")
    p.add_argument("--candidates", type=int, default=100, help="EASE candidates per user to order")
    p.add_argument("--users", type=int, default=400, help="evaluated users per shop")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from training.data.synthetic import Examination

    try:
        curves = [Examination.parse(c).spec for c in args.curves.split(",") if c.strip()]
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as e:
        p.error(f"--curves/--seeds: {e}")
    if len(curves) < 1 or len(seeds) < 1 or args.epochs < 1 or args.candidates < K or args.users < 1:
        p.error("need at least one curve and seed, --epochs >= 1, --candidates >= 10 and --users >= 1")
    from cluster.runtime import init_ray

    init_ray()
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="debiasing-") as storage:
        for curve in curves:
            for seed in seeds:
                runs.append(one_shop(curve, seed, args.size, args.epochs, args.candidates, args.users, storage))
    summary = summarise(runs)
    results = {"size": args.size, "epochs": args.epochs, "candidates": args.candidates,
               "seconds": time.perf_counter() - t0, "summary": summary, "runs": runs}
    print_table(summary)
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
