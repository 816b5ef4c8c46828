"""The ranking section of `recsys eval`: the transformer ranker against its baselines, and the debiasing experiment.

Protocol. Ranking examples are impressions (view events labelled with the actions that followed, see
`training.data.examples.impressions`) built from the task's training events only; the newest 10% of them by time are held
out for per-task AUC and log-loss. Datasets without view events (e.g. MovieLens) have no impressions: each
engagement becomes a positive and `NEGATIVES_PER_POSITIVE` items sampled by popularity become negatives, and the
report says so. Every model then re-ranks each evaluated user's retrieval candidates; NDCG@10 of the final list is
measured against the task's targets.

Given the retrieval model that made the candidates (a two-tower model with `user_tower`), the section trains every
ranker as a version does (`training.fit.ranker_data`): negatives drawn from retrieval's top
`ranker_candidate_depth` for each impression's user state (`train.ranker_negatives: retrieved`) and the candidate's
retrieval score as an input of every model, baselines included (`train.ranker_retrieval_feature`). Without one (or
with `ranker_negatives: uniform`) the negatives are uniform unshown items and no model sees the score.

Debiasing (synthetic shops only, where the generator's relevance r(user, item) is known): the same ranker is trained
with and without the position tower, and each one's order of the retrieval candidates is compared with the order by
true relevance (NDCG@10 with gain r). Logged clicks are r times the examination probability of the display position,
so a model that explains position away should agree better with r.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from training.data.examples import TASKS, Impressions, add_sampled_negatives, impressions, tower_examples
from training.data.features import (ACTION_ID, ENGAGEMENTS, USER_INPUTS, FeatureSpace, ItemFeatures, engagements_of,
                                    item_lookups)
from training.metrics import log_loss, ndcg_at_k, roc_auc
from training.models.rank_baselines import BASELINES, BaselineConfig
from training.fit.ranker_data import item_matrix, retrieval_scores, retrieved_negatives
from training.fit.train_loop import FitSpec, TrainConfig, batch_size_for, build_model, fit_on_ray
from training.models.ranker import MultiTaskRanker, RankerConfig, position_bucket
from training.request.ranking import RRF_K, fuse_with_retrieval

RANKER = "training.models.ranker:MultiTaskRanker"
HOLDOUT_FRACTION = 0.1  # the newest 10% of impressions: the same temporal logic as the retrieval split
NEGATIVES_PER_POSITIVE = 4  # engagement-only data: about the click-through of a shown list (1 in 5)
UNSHOWN_NEGATIVES = 1.0  # per logged view; see add_sampled_negatives
CONTEXT_DROPOUT = 0.5  # share of training rows without category/query context; see drop_query_context
MIN_STEPS_PER_EPOCH = 50  # small data sets get smaller batches rather than a handful of optimiser steps
K = 10


def model_specs() -> dict[str, tuple[str, bool]]:
    """Name -> (class path, uses the position tower) of every model the section trains."""
    return {"transformer_ranker": (RANKER, True), "transformer_no_position": (RANKER, False)} | {
        name: (path, False) for name, path in BASELINES.items()}


def engagement_impressions(events: pa.Table, space: FeatureSpace, item_features: ItemFeatures,
                           popularity: np.ndarray, seed: int, max_rows: int | None = None) -> Impressions:
    """Impressions for data without views: each engagement is a shown, clicked item (its own action's task is
    positive too), and popularity-sampled items the user was "shown" beside it are negatives. Positions unknown."""
    pos = tower_examples(events, space, item_features.category_idx)
    eng = events.filter(pc.is_in(events.column("action"), pa.array(list(ENGAGEMENTS))))
    action = np.fromiter((ACTION_ID[a] for a in eng.column("action").to_pylist()), np.int64, len(eng))
    action = action[space.lookup("item_ids", eng.column("item_id").to_pylist()) > 0]  # the rows tower_examples kept
    labels = np.zeros((len(pos), len(TASKS)), np.float32)
    labels[:, 0] = 1.0
    for j, task in enumerate(TASKS[1:], start=1):
        labels[:, j] = action == ACTION_ID[task]
    rng = np.random.default_rng(seed)
    p = popularity[1:] / popularity[1:].sum()
    n, m = len(pos), NEGATIVES_PER_POSITIVE
    rows = np.concatenate([np.arange(n), np.repeat(np.arange(n), m)])
    item = np.concatenate([pos.target, 1 + rng.choice(len(p), size=n * m, p=p)])
    lab = np.concatenate([labels, np.zeros((n * m, len(TASKS)), np.float32)])
    order = np.argsort(pos.time_ms[rows], kind="stable")
    if max_rows is not None and len(order) > max_rows:
        order = np.sort(rng.choice(order, size=max_rows, replace=False))
    r = rows[order]
    return Impressions(pos.hist_items[r], pos.hist_actions[r], pos.hist_ages[r], pos.context[r], item[order],
                       np.full(len(order), -1, np.int64), lab[order], pos.time_ms[r])


def drop_query_context(imp: Impressions, p: float, seed: int) -> Impressions:
    """Blanks the context's category and query tokens in a random share `p` of impressions.

    On category and search pages these fields name the shown items' category (and brand): a model leans on them and
    learns little from the history, yet many requests (home page, the evaluation users) carry neither."""
    rng = np.random.default_rng(seed)
    context = imp.context.copy()
    context[rng.random(len(imp)) < p, 3:] = 0  # columns 3.. = category, query_0..query_3 (CONTEXT_COLUMNS)
    return Impressions(**(imp.as_dict() | {"context": context}))


def task_impressions(task: Any, cfg: TrainConfig) -> tuple[Impressions, str]:
    """(impressions of the task's training events, sorted by time; how they were built)."""
    history = engagements_of(task.train_events, task.space)
    imp = impressions(task.train_events, task.space, history, max_rows=cfg.ranker_max_impressions, seed=cfg.seed,
                      item_category=task.item_features.category_idx)
    if len(imp) and imp.labels[:, 0].sum() > 0:
        return imp, "logged views labelled with the actions that followed within an hour"
    imp = engagement_impressions(task.train_events, task.space, task.item_features, task.popularity, cfg.seed,
                                 cfg.ranker_max_impressions)
    return imp, (f"no view events: each engagement is a positive with {NEGATIVES_PER_POSITIVE} popularity-sampled "
                 "negatives, positions unknown")


def split_impressions(task: Any, cfg: TrainConfig) -> tuple[Impressions, Impressions, str]:
    """(training impressions, the newest `HOLDOUT_FRACTION` held out, how they were built)."""
    imp, source = task_impressions(task, cfg)
    cut = int(len(imp) * (1.0 - HOLDOUT_FRACTION))
    train, held = imp.subset(np.arange(len(imp)) < cut), imp.subset(np.arange(len(imp)) >= cut)
    if len(train) == 0 or len(held) == 0:
        raise ValueError(f"task {task.dataset!r}: {len(imp)} ranking impressions are too few to train and hold out")
    return train, held, source


def train_model(name: str, imp: Impressions, task: Any, cfg: TrainConfig,
                scores: np.ndarray | None = None) -> tuple[torch.nn.Module, dict]:
    """Trains one model of `model_specs()` on Ray Train; returns it in eval mode and its training info.
    `scores`: the impressions' retrieval scores, for a model with the retrieval feature (None: without it)."""
    path, debias = model_specs()[name]
    sizes = task.space.sizes
    feature = scores is not None
    config = (RankerConfig(**sizes, position_debias=debias, retrieval_feature=feature) if path == RANKER
              else BaselineConfig(**sizes, retrieval_feature=feature))
    batch = batch_size_for(len(imp), cfg.num_workers, cfg.ranker_batch_size, min_batch=64,
                           min_steps=MIN_STEPS_PER_EPOCH)
    inputs = MultiTaskRanker.TRAIN_INPUTS + (("retrieval_score",) if feature else ())
    spec = FitSpec(path, config.to_dict(), inputs, cfg.ranker_epochs, batch, cfg.ranker_lr)
    config = config.to_dict()
    f = task.item_features
    data = imp.as_dict() | item_lookups(f) | ({"retrieval_score": scores} if feature else {})
    t0 = time.perf_counter()
    # A fresh run name per call: the same name would resume another data set's checkpoint.
    state, history = fit_on_ray(spec, data, cfg, f"ranking-{name}-{uuid.uuid4().hex[:8]}")
    seconds = time.perf_counter() - t0
    model = build_model(path, config)
    model.load_state_dict(state)
    return model.eval(), {"seconds": seconds, "batch_size": batch, "examples": len(imp),
                          "examples_per_s": float(np.mean([h["examples_per_s"] for h in history]))}


@torch.inference_mode()
def impression_probs(model: torch.nn.Module, imp: Impressions, chunk: int = 16384,
                     scores: np.ndarray | None = None) -> np.ndarray:
    """(n, T) probabilities per impression, serving path (no position term); `scores`: their retrieval scores."""
    def rs(s: int) -> tuple[torch.Tensor, ...]:
        return (torch.from_numpy(scores[s:s + chunk]),) if scores is not None else ()

    out = [torch.sigmoid(model.scored_logits(*(torch.from_numpy(getattr(imp, k)[s:s + chunk])
                                               for k in USER_INPUTS + ("item",)), *rs(s))).numpy()
           for s in range(0, len(imp), chunk)]
    return np.concatenate(out) if out else np.zeros((0, len(TASKS)), np.float32)


def per_task_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, dict[str, float]]:
    """(n, T) labels and probabilities -> AUC and log-loss per task."""
    return {t: {"auc": roc_auc(labels[:, j], probs[:, j]), "log_loss": log_loss(labels[:, j], probs[:, j]),
                "positives": int(labels[:, j].sum())} for j, t in enumerate(TASKS)}


@torch.inference_mode()
def candidate_logits(model: torch.nn.Module, users: tuple[np.ndarray, ...], candidates: np.ndarray,
                     chunk: int = 64, scores: np.ndarray | None = None) -> np.ndarray:
    """(n_users, M, T) logits of every user's candidates (invalid ids <= 0 are scored as item 0); `scores`:
    (n_users, M) their retrieval scores, for a model with the retrieval feature.

    The transformer ranker encodes each history once; the baselines have no user-side cache and see one row per
    (user, candidate)."""
    n, M = candidates.shape
    cand = torch.from_numpy(np.maximum(candidates, 0).astype(np.int64))
    out = []
    for s in range(0, n, chunk):
        inputs = [torch.from_numpy(a[s:s + chunk]) for a in users]
        items = cand[s:s + chunk]  # (c, M)
        rs = torch.from_numpy(scores[s:s + chunk]) if scores is not None else None
        if isinstance(model, MultiTaskRanker):
            out.append(model.score(model.encode_user(*inputs), items, rs).numpy())
        else:
            rows = torch.arange(len(items)).repeat_interleave(M)  # (c * M,) one row per (user, candidate)
            flat = rs.reshape(-1) if rs is not None else None
            out.append(model.scored_logits(*(x[rows] for x in inputs), items.reshape(-1), flat)
                       .view(-1, M, len(TASKS)).numpy())
    return np.concatenate(out) if out else np.zeros((0, M, len(TASKS)), np.float32)


def rerank(scores: np.ndarray, candidates: np.ndarray, k: int = K) -> np.ndarray:
    """(n, M) scores of (n, M) candidate ids -> (n, k) ids best first; ids <= 0 never placed (-1 pads)."""
    s = np.where(candidates > 0, scores, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(candidates, order, axis=1)
    return np.where(np.take_along_axis(s, order, axis=1) > -np.inf, top, -1)


def fused_with_retrieval(scores: np.ndarray) -> np.ndarray:
    """(n, M) ranker scores of candidates in retrieval order -> (n, M) reciprocal-rank fusion of both orders, the
    order a version serves as "fused" (`training.request.ranking.fuse_with_retrieval`)."""
    return fuse_with_retrieval(scores)


def graded_ndcg(order_scores: np.ndarray, relevance: np.ndarray, valid: np.ndarray, k: int = K) -> float:
    """Mean NDCG@k of the order given by `order_scores` with gains `relevance` (all (n, M); `valid` masks padding);
    the ideal DCG orders the same candidates by relevance itself."""
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    gain = np.where(valid, relevance, 0.0)

    def dcg(scores: np.ndarray) -> np.ndarray:
        order = np.argsort(-np.where(valid, scores, -np.inf), axis=1, kind="stable")[:, :k]
        return np.take_along_axis(gain, order, axis=1) @ discount[:order.shape[1]]

    ideal = dcg(gain)
    keep = ideal > 0
    return float(np.mean(dcg(order_scores)[keep] / ideal[keep])) if keep.any() else float("nan")


def true_relevance_of(hidden: dict, user_rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(n, M) the generator's r(user, item) of each user's (n, M) candidates (0 for padding); (n,) user rows."""
    from training.data.synthetic import true_relevance

    rows = np.asarray(user_rows)[:, None]
    return np.where(candidates > 0, true_relevance(hidden, rows, np.maximum(candidates, 1) - 1), 0.0)


@torch.inference_mode()
def learned_position_effect(model: MultiTaskRanker, positions: int = 20) -> list[float]:
    """Click logit the position tower adds at display positions 0..positions-1, relative to position 0."""
    pos = torch.arange(positions)
    click = model.position(position_bucket(pos, model.config.n_positions))[:, 0]
    return (click - click[0]).tolist()


def evaluate_model(model: torch.nn.Module, held: Impressions, users: tuple[np.ndarray, ...], candidates: np.ndarray,
                   targets: list[np.ndarray], relevance: np.ndarray | None,
                   scores: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Per-task AUC/log-loss on held-out impressions, NDCG@10 of the re-ranked candidates, and with the hidden truth
    the NDCG@10 of the order against true relevance (by the combined score and by the click head alone).
    `scores`: the retrieval scores of the held-out impressions and of the candidates, for a model that takes them."""
    held_scores, cand_scores = scores if scores is not None else (None, None)
    logits = candidate_logits(model, users, candidates, scores=cand_scores)  # (n, M, T)
    combined = model.combined(torch.from_numpy(logits)).numpy()  # (n, M)
    fused = fused_with_retrieval(combined)
    out: dict[str, Any] = {"tasks": per_task_metrics(held.labels, impression_probs(model, held, scores=held_scores)),
                           f"ndcg@{K}": ndcg_at_k(rerank(combined, candidates), targets, K),
                           f"fused_ndcg@{K}": ndcg_at_k(rerank(fused, candidates), targets, K)}
    if relevance is not None:
        valid = candidates > 0
        out[f"true_ndcg@{K}"] = {"combined": graded_ndcg(combined, relevance, valid),
                                 "click": graded_ndcg(logits[..., 0], relevance, valid),
                                 "fused": graded_ndcg(fused, relevance, valid)}
    return out


def section_training_data(task: Any, logged: Impressions, held: Impressions, users: tuple[np.ndarray, ...],
                          cands: np.ndarray, cfg: TrainConfig, negatives_per_view: float,
                          retriever: torch.nn.Module | None) -> tuple[Impressions, str, tuple | None]:
    """The rankers' training impressions (logged views plus negatives, query context dropped on a share), which
    negatives they got ("retrieved" or "uniform"), and with the retrieval feature the retrieval scores of the
    training impressions, the held-out ones and the (n_users, M) candidates (None without it); module docstring."""
    two_tower = retriever is not None and hasattr(retriever, "user_tower") and hasattr(retriever,
                                                                                         "item_tower_by_index")
    negatives = "retrieved" if two_tower and cfg.ranker_negatives == "retrieved" else "uniform"
    if negatives == "retrieved":
        train = retrieved_negatives(logged, retriever.eval(), task.space.n_items, negatives_per_view,
                                    cfg.ranker_candidate_depth, cfg.seed)
    else:
        train = add_sampled_negatives(logged, task.space.n_items, negatives_per_view, cfg.seed)
    train = drop_query_context(train, CONTEXT_DROPOUT, cfg.seed)
    if not (two_tower and cfg.ranker_retrieval_feature):
        return train, negatives, None
    V = item_matrix(retriever.eval(), task.space.n_items)

    def of(imp: Impressions) -> np.ndarray:
        return retrieval_scores(retriever, (imp.hist_items, imp.hist_actions, imp.hist_ages, imp.context),
                                imp.item, V)
    return train, negatives, (of(train), of(held), retrieval_scores(retriever, users, np.maximum(cands, 0), V))


def ranking_section(task: Any, candidates: np.ndarray, cfg: TrainConfig, out_dir: Path,
                    negatives_per_view: float = UNSHOWN_NEGATIVES,
                    retriever: torch.nn.Module | None = None, users_seed: int | None = None) -> dict[str, Any]:
    """Trains the transformer ranker (with and without the position tower) and every baseline on the task's
    impressions and compares them; called by the `recsys eval` harness.

    Args:
        task: the harness's `training.data.splits.RetrievalTask`.
        candidates: (n_users, M) item indices from the retrieval model, aligned with `task.user_ids`; <= 0 = none.
        cfg: training configuration (workers, epochs, batch size, `eval_users` caps the re-ranked users).
        out_dir: where the figure goes.
        negatives_per_view: unshown items added per training impression as negatives.
        retriever: the two-tower model that made `candidates` (module docstring); None for another source.
        users_seed: the seed that samples the re-ranked users when there are more than `cfg.eval_users` (default
            `cfg.seed`): runs of several seeds pass the first one, so that they score the same users.
    Returns:
        {"name": "ranking", "results": JSON-able dict, "markdown": str, "figures": [file names in out_dir]}.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.ndim != 2 or len(candidates) != len(task.user_ids):
        raise ValueError(f"candidates must be (n_users={len(task.user_ids)}, M), got shape {candidates.shape}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logged, held, source = split_impressions(task, cfg)
    rows = np.arange(len(task.user_ids))
    if len(rows) > cfg.eval_users:
        rows = np.sort(np.random.default_rng(cfg.seed if users_seed is None else users_seed).choice(
            rows, size=cfg.eval_users, replace=False))
    users, cands = task.user_inputs(rows), candidates[rows]
    train, negatives, scores = section_training_data(task, logged, held, users, cands, cfg, negatives_per_view,
                                                     retriever)
    targets = [task.targets[i] for i in rows]
    relevance = true_relevance_of(task.hidden, np.asarray(task.user_rows)[rows], cands) if task.hidden else None
    results: dict[str, Any] = {
        "dataset": task.dataset, "protocol": task.protocol, "impressions": source, "train_impressions": len(logged),
        "unshown_negatives_per_view": negatives_per_view, "negatives": negatives,
        "retrieval_feature": scores is not None, "context_dropout": CONTEXT_DROPOUT,
        "heldout_impressions": len(held), "users": len(rows), "candidates_per_user": int(cands.shape[1]),
        f"retrieval_order_ndcg@{K}": ndcg_at_k(np.where(cands[:, :K] > 0, cands[:, :K], -1), targets, K),
        "models": {}}
    shown = int(np.clip(logged.position.max() + 1, 1, 20))  # positions logged in training (the tower's support)
    for name in model_specs():
        model, info = train_model(name, train, task, cfg, scores[0] if scores is not None else None)
        results["models"][name] = evaluate_model(model, held, users, cands, targets, relevance,
                                                 scores[1:] if scores is not None else None) | {"training": info}
        if name == "transformer_ranker" and model.config.position_debias:
            results["learned_position_click_logit"] = learned_position_effect(model, shown)
    figures = []
    if relevance is not None:
        from training.data.synthetic import Examination

        examination = Examination.parse(task.examination) if task.examination else Examination()
        results["examination"] = examination.spec
        results["true_position_log_examination"] = examination.log_effect(shown)
        results[f"true_relevance_order_ndcg@{K}"] = {"retrieval": graded_ndcg(
            -np.arange(cands.shape[1], dtype=np.float64)[None].repeat(len(cands), 0), relevance, cands > 0)}
        figures.append(plot_debiasing(results, out_dir / "ranking_debiasing.png"))
    return {"name": "ranking", "results": results, "markdown": ranking_markdown(results), "figures": figures}


SEED_FIGURES = {  # figure -> how to read it from one model's results (None where a data set has no truth)
    f"ndcg@{K}": lambda m: m[f"ndcg@{K}"],
    f"fused_ndcg@{K}": lambda m: m.get(f"fused_ndcg@{K}"),
    f"true_ndcg@{K}": lambda m: m.get(f"true_ndcg@{K}", {}).get("combined"),
    f"true_fused_ndcg@{K}": lambda m: m.get(f"true_ndcg@{K}", {}).get("fused"),
}


def _spread(values: list[float | None]) -> dict[str, Any] | None:
    if any(v is None for v in values):
        return None
    return {"values": [float(v) for v in values], "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1 if len(values) > 1 else 0))}


def ranking_seed_spread(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Each figure of `SEED_FIGURES` per ranker, and retrieval's own order, over the ranking sections' `runs`
    (their "results", one per seed, on the same users): per-seed values, mean and sample standard deviation; and
    per ranker, whether its own and its fused order beat retrieval's by more than the spread (the mean paired
    difference minus its standard deviation over seeds is above 0)."""
    if len(runs) != len(seeds) or not runs:
        raise ValueError(f"ranking_seed_spread: {len(runs)} runs for {len(seeds)} seeds")
    truth = f"true_relevance_order_ndcg@{K}"
    retrieval = {f"ndcg@{K}": [r[f"retrieval_order_ndcg@{K}"] for r in runs],
                 f"true_ndcg@{K}": [r[truth]["retrieval"] if truth in r else None for r in runs]}
    out: dict[str, Any] = {"seeds": list(seeds), "retrieval": {k: _spread(v) for k, v in retrieval.items()},
                           "models": {}}
    for name in runs[0]["models"]:
        figures = {fig: [read(r["models"][name]) for r in runs] for fig, read in SEED_FIGURES.items()}
        entry = {fig: _spread(v) for fig, v in figures.items()}
        beats = {}
        for fig, base in ((f"ndcg@{K}", f"ndcg@{K}"), (f"fused_ndcg@{K}", f"ndcg@{K}"),
                          (f"true_ndcg@{K}", f"true_ndcg@{K}"), (f"true_fused_ndcg@{K}", f"true_ndcg@{K}")):
            if entry[fig] is None or out["retrieval"][base] is None:
                continue
            diff = np.asarray(figures[fig], dtype=np.float64) - np.asarray(retrieval[base], dtype=np.float64)
            sd = float(np.std(diff, ddof=1)) if len(diff) > 1 else float("nan")
            beats[fig] = {"mean_difference": float(diff.mean()), "std": sd,
                          "beats_retrieval": bool(len(diff) > 1 and diff.mean() - sd > 0)}
        out["models"][name] = entry | {"against_retrieval": beats}
    return out


def seed_spread_markdown(spread: dict[str, Any]) -> str:
    """The ranking table over seeds: mean ± standard deviation of each order's NDCG@10."""
    def cell(x: dict[str, Any] | None) -> str:
        return "n/a" if x is None else f"{x['mean']:.3f} ± {x['std']:.3f}"

    head = ["order", f"NDCG@{K} held out", "same, fused (RRF)", f"NDCG@{K} vs true r", "same, fused"]
    r = spread["retrieval"]
    lines = [f"Over seeds {', '.join(map(str, spread['seeds']))} (mean ± sample standard deviation; the retrieval "
             "model, the rankers and their training samples change with the seed, the users do not):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             f"| retrieval's own | {cell(r[f'ndcg@{K}'])} | - | {cell(r[f'true_ndcg@{K}'])} | - |"]
    for name, m in spread["models"].items():
        lines.append(f"| {name} | {cell(m[f'ndcg@{K}'])} | {cell(m[f'fused_ndcg@{K}'])} | "
                     f"{cell(m[f'true_ndcg@{K}'])} | {cell(m[f'true_fused_ndcg@{K}'])} |")
    ahead = [f"{name} ({', '.join(fig for fig, b in m['against_retrieval'].items() if b['beats_retrieval'])})"
             for name, m in spread["models"].items()
             if any(b["beats_retrieval"] for b in m["against_retrieval"].values())]
    lines += ["", "Beat retrieval's order by more than the spread of the paired difference over seeds: "
              + ("; ".join(ahead) if ahead else "none") + "."]
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"


def ranking_markdown(results: dict[str, Any]) -> str:
    """The comparison table (AUC / log-loss per task, NDCG@10 of the final list, NDCG against the truth)."""
    has_truth = f"true_relevance_order_ndcg@{K}" in results
    head = ["model"] + [f"{t} AUC / LL" for t in TASKS] + [f"NDCG@{K} final list", f"NDCG@{K} fused (RRF)"]
    head += [f"NDCG@{K} vs true r (combined / click / fused)"] if has_truth else []
    head += ["train s"]
    lines = [f"Impressions: {results['impressions']}; {results['train_impressions']:,} train "
             f"(+ {results.get('unshown_negatives_per_view', 0):g} unshown "
             f"{'retrieved' if results.get('negatives') == 'retrieved' else 'random'} negatives per view"
             f"{', every model sees the retrieval score' if results.get('retrieval_feature') else ''}, category/query "
             f"context blanked in {results.get('context_dropout', 0):.0%} of rows), "
             f"{results['heldout_impressions']:,} held out (newest {HOLDOUT_FRACTION:.0%}); {results['users']:,} "
             f"users re-rank {results['candidates_per_user']} retrieval candidates (retrieval order NDCG@{K}: "
             f"{_fmt(results[f'retrieval_order_ndcg@{K}'])}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["models"].items():
        row = [name] + [f"{_fmt(m['tasks'][t]['auc'])} / {_fmt(m['tasks'][t]['log_loss'])}" for t in TASKS]
        row += [_fmt(m[f"ndcg@{K}"]), _fmt(m.get(f"fused_ndcg@{K}"))]
        if has_truth:
            t = m[f"true_ndcg@{K}"]
            row.append(f"{_fmt(t['combined'])} / {_fmt(t['click'])} / {_fmt(t.get('fused'))}")
        row.append(f"{m['training']['seconds']:.0f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Fused: reciprocal-rank fusion (k={RRF_K}) of the ranker's order with the retrieval order."]
    if has_truth:
        lines += ["", f"Retrieval order against true relevance: NDCG@{K} "
                      f"{_fmt(results[f'true_relevance_order_ndcg@{K}']['retrieval'])}. The shop's clicks follow "
                      f"the examination curve {results.get('examination', 'power:0.8')}."]
    return "\n".join(lines)


def plot_debiasing(results: dict[str, Any], path: Path) -> str:
    """Two panels: NDCG@10 against true relevance per model, and the learned vs the true position effect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    names = list(models)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(names))
    for off, head in ((-0.2, "combined"), (0.2, "click")):
        a.bar(x + off, [models[n][f"true_ndcg@{K}"][head] for n in names], width=0.4, label=f"{head} score")
    a.set_xticks(x, names, rotation=30, ha="right")
    lo = min(models[n][f"true_ndcg@{K}"][h] for n in names for h in ("combined", "click"))
    a.set_ylim(max(0.0, lo - 0.05), 1.0)
    a.set_ylabel(f"NDCG@{K} vs generator relevance r")
    a.set_title("Order of retrieval candidates vs true relevance")
    a.legend()
    if "learned_position_click_logit" in results:
        b.plot(results["learned_position_click_logit"], "o-", label="position tower (click logit)")
    b.plot(results["true_position_log_examination"], "s--", label="true log examination prob.")
    b.set_xlabel("display position")
    b.set_ylabel("effect relative to position 0")
    b.set_title("Position effect learned in training (not used at serving)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
