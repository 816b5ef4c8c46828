"""Offline evaluation of a trained version on the held-out split: two-tower against popularity, ranker per task.

Protocol: global temporal split; each evaluated user has engagements before the cutoff (their history) and new
items engaged with after it (the targets). The whole catalog is ranked ("full ranking") and items the user already
engaged with before the cutoff are excluded from the ranking.
"""
from __future__ import annotations

import numpy as np
import torch

from training.data.examples import EvalSet, Impressions
from training.metrics import log_loss, roc_auc, top_k_excluding
from training.models.ranker import TASKS, MultiTaskRanker
from training.models.two_tower import TwoTower

KS = (10, 50, 100)


@torch.inference_mode()
def item_vectors(model: TwoTower) -> np.ndarray:
    """(n_items, D) vectors of every bundle item; row 0 (padding) is zero."""
    idx = torch.arange(model.config.n_items)
    out = torch.cat([model.item_tower_by_index(chunk) for chunk in idx.split(65536)])
    out[0] = 0.0
    return out.numpy()


def popularity_ranked(popularity: np.ndarray, ev: EvalSet, k: int = max(KS)) -> np.ndarray:
    """(n_users, k) most popular items (training counts) per user, seen items excluded."""
    scores = np.broadcast_to(popularity.astype(np.float32), (len(ev.user_ids), len(popularity)))
    return top_k_excluding(scores, k, ev.seen)


@torch.inference_mode()
def evaluate_ranker(model: MultiTaskRanker, imp: Impressions, chunk: int = 65536,
                    retrieval_score: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """AUC and log-loss per task on held-out impressions (`retrieval_score`: theirs, for a ranker that takes it)."""
    probs = []
    for s in range(0, len(imp), chunk):
        user = model.encode_user(*(torch.from_numpy(a[s:s + chunk])
                                   for a in (imp.hist_items, imp.hist_actions, imp.hist_ages, imp.context)))
        rs = None if retrieval_score is None else torch.from_numpy(retrieval_score[s:s + chunk])
        probs.append(torch.sigmoid(model.score(user, torch.from_numpy(imp.item[s:s + chunk]), rs)).numpy())
    p = np.concatenate(probs) if probs else np.zeros((0, len(TASKS)), dtype=np.float32)
    return {task: {"auc": roc_auc(imp.labels[:, j], p[:, j]), "log_loss": log_loss(imp.labels[:, j], p[:, j]),
                   "positives": int(imp.labels[:, j].sum())} for j, task in enumerate(TASKS)}


ORDER_USERS = 1000  # users the serving-order check scores: 500 candidates each through the ranker
ORDER_CANDIDATES = 500


@torch.inference_mode()
def ranker_reorder(ranker: torch.nn.Module, cands: np.ndarray, task, retriever: torch.nn.Module | None = None,
                   rows: slice = slice(None)) -> np.ndarray:
    """(n, M) retrieval's candidates `cands` (best first, 0 = none) re-ordered by the ranker's score, for the task's
    users `rows` (their `user_inputs`); a ranker with `retrieval_feature` takes `retriever`'s scores."""
    from training.fit.ranker_data import item_matrix, retrieval_scores
    from training.models.ranker import score_candidates

    cands = np.asarray(cands, dtype=np.int64)
    n = len(cands)
    inputs = tuple(a[:n] for a in task.user_inputs(rows))
    reranked = np.zeros_like(cands)
    uses_score = getattr(getattr(ranker, "config", None), "retrieval_feature", False)
    if uses_score and retriever is None:
        raise ValueError("serving_order: this ranker takes retrieval scores; pass the version's retriever")
    V = item_matrix(retriever, task.space.n_items) if uses_score else None
    for s in range(0, n, 64):
        chunk = slice(s, min(s + 64, n))
        lists = [c[c > 0] for c in cands[chunk]]
        rs = None
        if uses_score:
            dots = retrieval_scores(retriever, tuple(a[chunk] for a in inputs), cands[chunk], V)
            rs = [d[c > 0] for d, c in zip(dots, cands[chunk])]
        scores = score_candidates(ranker, *(a[chunk] for a in inputs), lists, rs)
        for r, (c, sc) in enumerate(zip(cands[chunk], scores)):
            valid = c[c > 0]
            reranked[s + r, :len(valid)] = valid[np.argsort(-sc, kind="stable")]
    return reranked


def fused_order(cands: np.ndarray, reranked: np.ndarray) -> np.ndarray:
    """(n, M) retrieval's lists and the ranker's re-ordering of them (0 = none) -> (n, M) their reciprocal-rank
    fusion (`training.request.ranking.fuse_with_retrieval`), the order a version serves as "fused"."""
    from training.request.ranking import RRF_K

    out = np.zeros_like(cands)
    for r, (c, rr) in enumerate(zip(cands, reranked)):
        valid = c[c > 0]
        ranker_rank = {int(i): j + 1 for j, i in enumerate(rr[rr > 0])}
        score = np.array([1.0 / (RRF_K + ranker_rank[int(i)]) + 1.0 / (RRF_K + j + 1) for j, i in enumerate(valid)])
        out[r, :len(valid)] = valid[np.argsort(-score, kind="stable")]
    return out


def best_order(ndcg: dict[str, float]) -> str:
    """The order to serve from each order's offline NDCG: the best; on a tie the ranker's, then the fused one."""
    return max(("ranker", "fused", "retrieval"), key=lambda o: (ndcg[o], -("ranker", "fused", "retrieval").index(o)))


def serving_order(ranker: torch.nn.Module, ranked: np.ndarray, task, k: int = 10,
                  max_users: int = ORDER_USERS, retriever: torch.nn.Module | None = None) -> dict:
    """Which order a version serves: the ranker's order of retrieval's candidates, their fusion with retrieval's
    order, or retrieval's own order, whichever is best offline (NDCG@k against the held-out targets, same users
    and candidates; `best_order`).

    Args:
        ranker: the version's ranker (eval mode); ranked: (n_users, >= ORDER_CANDIDATES) retrieval's lists for the
            task's users, best first, 0 = none; task: the held-out task (`user_inputs`, `targets`).
        retriever: the version's retrieval model, whose scores a ranker with `retrieval_feature` takes.
    Returns:
        {"serve": "ranker" | "fused" | "retrieval", "ranker_ndcg@10", "fused_ndcg@10", "retrieval_ndcg@10",
        "users", "candidates"}.
    """
    from training.metrics import ndcg_at_k

    n = min(len(ranked), max_users)
    cands = np.asarray(ranked[:n, :ORDER_CANDIDATES], dtype=np.int64)
    reranked = ranker_reorder(ranker, cands, task, retriever, slice(0, n))
    targets = task.targets[:n]
    ndcg = {"ranker": float(ndcg_at_k(reranked, targets, k)), "fused": float(ndcg_at_k(fused_order(cands, reranked),
                                                                                         targets, k)),
            "retrieval": float(ndcg_at_k(cands, targets, k))}
    return {"serve": best_order(ndcg), **{f"{o}_ndcg@{k}": v for o, v in ndcg.items()},
            "users": int(n), "candidates": int(cands.shape[1])}
