"""The ranker's training data as the second stage of a two-stage system: retrieval's scores and retrieval's own
candidates.

A ranker re-orders the top `depth` items of the version's retrieval model. Trained on logged views with uniformly
drawn unshown items as negatives, it learns to tell an on-interest item from a random one, a question retrieval has
already answered, and re-ordering retrieval's candidates with it made the served list worse (demo shop: NDCG@10
0.015-0.018 against retrieval's own 0.116). Two changes make it learn the question it is asked at serving:
- `retrieval_scores`: every example carries the retrieval model's score of its item for its user state (the user
  tower's vector . the item tower's vector), the same number the Retrieval stage sends with its candidates;
- `retrieved_negatives`: negatives drawn from what retrieval brings for that user state (uniformly among its top
  `depth`), the hard negatives a served list is made of, instead of from the whole catalog.

Plain NumPy / PyTorch over the version's trained retrieval model (any model with `user_tower` and
`item_tower_by_index`); `training.fit.version` runs it before the ranker's Ray Train fit.
"""
from __future__ import annotations

import numpy as np
import torch

from training.data.examples import TASKS, Impressions

_SCORE_CELLS = 16_000_000  # user x item scores per chunk of a full-catalog top-k: ~64 MB of float32


@torch.inference_mode()
def item_matrix(model: torch.nn.Module, n_items: int) -> torch.Tensor:
    """(n_items + 1, D) item-tower vectors by item index; row 0 (padding) stays as the tower makes it."""
    return torch.cat([model.item_tower_by_index(c) for c in torch.arange(n_items + 1).split(65536)])


@torch.inference_mode()
def user_matrix(model: torch.nn.Module, inputs: tuple[np.ndarray, ...], chunk: int = 8192) -> torch.Tensor:
    """(n, D) user-tower vectors of n user states (hist_items, hist_actions, hist_ages, context)."""
    n = len(inputs[0])
    if n == 0:
        return torch.zeros(0, 0)
    return torch.cat([model.user_tower(*(torch.from_numpy(np.ascontiguousarray(a[s:s + chunk], dtype=np.int64))
                                         for a in inputs)) for s in range(0, n, chunk)])


@torch.inference_mode()
def retrieval_scores(model: torch.nn.Module, inputs: tuple[np.ndarray, ...], items: np.ndarray,
                     V: torch.Tensor | None = None) -> np.ndarray:
    """(n,) float32 retrieval score of item i for user state i: user_tower . item_tower, as the index ranks by.

    Args:
        inputs: the four user-state arrays, n rows; items: (n,) or (n, M) item indices.
        V: `item_matrix(model, ...)` when the caller has it.
    """
    items = np.asarray(items, dtype=np.int64)
    if len(items) != len(inputs[0]):
        raise ValueError(f"items: {len(items)} rows for {len(inputs[0])} user states")
    if len(items) == 0:
        return np.zeros(items.shape, dtype=np.float32)
    V = item_matrix(model, int(items.max())) if V is None else V
    out = np.zeros(items.shape, dtype=np.float32)
    for s in range(0, len(items), 65536):
        U = user_matrix(model, tuple(a[s:s + 65536] for a in inputs))
        it = torch.from_numpy(items[s:s + 65536])
        out[s:s + 65536] = ((U * V[it]).sum(-1) if it.dim() == 1 else torch.einsum("nd,nmd->nm", U, V[it])).numpy()
    return out


@torch.inference_mode()
def top_retrieved(model: torch.nn.Module, inputs: tuple[np.ndarray, ...], depth: int, V: torch.Tensor) -> np.ndarray:
    """(n, depth) item indices of the top `depth` retrieval scores over the whole catalog (padding excluded)."""
    n, n_items = len(inputs[0]), V.shape[0] - 1
    depth = min(depth, n_items)
    if depth < 1:
        raise ValueError("top_retrieved: the catalog has no item")
    out = np.zeros((n, depth), dtype=np.int64)
    step = max(1, _SCORE_CELLS // max(n_items, 1))
    for s in range(0, n, step):
        U = user_matrix(model, tuple(a[s:s + step] for a in inputs))
        scores = U @ V.T
        scores[:, 0] = -torch.inf
        out[s:s + step] = scores.topk(depth, dim=1).indices.numpy()
    return out


def retrieved_negatives(imp: Impressions, model: torch.nn.Module, n_items: int, ratio: float, depth: int,
                        seed: int) -> Impressions:
    """`imp` plus `ratio` negatives per impression, each drawn uniformly from retrieval's top `depth` for that
    impression's user state (never the impression's own item), with its history and context, all labels 0 and the
    position unknown; kept in time order.

    These are the candidates a served list is made of that the user did not take: the ranker learns to order
    retrieval's candidates instead of telling them from random items.
    """
    if ratio < 0 or depth < 1:
        raise ValueError(f"ratio must be >= 0 and depth >= 1, got {ratio}, {depth}")
    rng = np.random.default_rng(seed)
    src = np.sort(rng.choice(len(imp), size=int(len(imp) * ratio), replace=ratio > 1.0))
    inputs = (imp.hist_items[src], imp.hist_actions[src], imp.hist_ages[src], imp.context[src])
    top = top_retrieved(model, inputs, depth + 1, item_matrix(model, n_items))  # one spare for the own item
    if top.shape[1] < 2:
        raise ValueError(f"retrieved_negatives: a catalog of {n_items} item(s) has no other item to draw")
    pick = rng.integers(0, top.shape[1] - 1, len(src)) if len(src) else np.zeros(0, np.int64)
    item = top[np.arange(len(src)), pick]
    own = item == imp.item[src]
    item[own] = top[np.arange(len(src))[own], top.shape[1] - 1]  # the spare: the own item appears at most once
    neg = Impressions(*inputs, item, np.full(len(src), -1, np.int64), np.zeros((len(src), len(TASKS)), np.float32),
                      imp.time_ms[src])
    both = Impressions(*(np.concatenate([a, b]) for a, b in zip(imp.as_dict().values(), neg.as_dict().values())))
    return both.subset(np.argsort(both.time_ms, kind="stable"))


def with_retrieval_scores(imp: Impressions, model: torch.nn.Module, n_items: int) -> dict[str, np.ndarray]:
    """The impressions' arrays plus `retrieval_score`, the input a ranker with `retrieval_feature` trains on."""
    inputs = (imp.hist_items, imp.hist_actions, imp.hist_ages, imp.context)
    return imp.as_dict() | {"retrieval_score": retrieval_scores(model, inputs, imp.item, item_matrix(model, n_items))}
