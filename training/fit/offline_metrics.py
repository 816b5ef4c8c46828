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
def evaluate_ranker(model: MultiTaskRanker, imp: Impressions, chunk: int = 65536) -> dict[str, dict[str, float]]:
    """AUC and log-loss per task on held-out impressions."""
    probs = []
    for s in range(0, len(imp), chunk):
        user = model.encode_user(*(torch.from_numpy(a[s:s + chunk])
                                   for a in (imp.hist_items, imp.hist_actions, imp.hist_ages, imp.context)))
        probs.append(torch.sigmoid(model.score(user, torch.from_numpy(imp.item[s:s + chunk]))).numpy())
    p = np.concatenate(probs) if probs else np.zeros((0, len(TASKS)), dtype=np.float32)
    return {task: {"auc": roc_auc(imp.labels[:, j], p[:, j]), "log_loss": log_loss(imp.labels[:, j], p[:, j]),
                   "positives": int(imp.labels[:, j].sum())} for j, task in enumerate(TASKS)}
