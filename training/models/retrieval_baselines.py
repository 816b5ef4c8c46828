"""Non-neural retrieval baselines for the evaluation harness: popularity, item-KNN and EASE.

Each follows the harness's RetrievalModel protocol (`fit(task, cfg) -> info`, `recommend(task, k) -> (n, k)`):
it learns from `task.train_events` only, represents an evaluated user by the items in `task.seen` (everything they
engaged with before the prediction time), and never recommends a seen item. They need no Ray.

- Popularity: engagement counts in the training events.
- ItemKNN: item-item cosine similarity on the binary user x item engagement matrix X (Sarwar et al., WWW 2001),
  summed over the user's items without neighbourhood truncation.
- EASE: Steck, "Embarrassingly Shallow Autoencoders for Sparse Data" (WWW 2019): B = I - P diag(1 / diag(P)),
  P = (X^T X + lambda I)^-1, restricted to the `top_n` most popular items so the dense N x N inverse fits in memory.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from training.data.features import engagements_of
from training.metrics import top_k_excluding
from training.data.splits import RetrievalTask

if TYPE_CHECKING:  # the fit signature's type only: models never import the training loop
    from training.fit.train_loop import TrainConfig

_SCORE_CELLS = 1 << 23  # rows x items per scoring chunk: 8M float32 = 32 MB, so a 1M-item catalog scores 8 users at once


def recommend_by_chunks(task: RetrievalTask, k: int, score_rows: Callable[[slice], np.ndarray]) -> np.ndarray:
    """(n_users, k) best items per evaluated user, seen items excluded, 0 where fewer than k items are eligible.

    Args:
        score_rows: maps a slice of evaluated users to their (r, n_items + 1) scores; called chunk by chunk so the
            dense score block stays near `_SCORE_CELLS` whatever the catalog size.
    """
    n, m = len(task.user_ids), task.space.n_items + 1
    step = max(1, _SCORE_CELLS // m)
    out = np.zeros((n, k), dtype=np.int64)
    for s in range(0, n, step):
        rows = slice(s, min(s + step, n))
        ranked = top_k_excluding(score_rows(rows), k, task.seen[rows])
        out[rows] = np.maximum(ranked, 0)  # top_k_excluding pads with -1; the harness contract says 0 = no item
    return out


def popularity_tie_break(task: RetrievalTask, scores: np.ndarray) -> np.ndarray:
    """Scores plus 1e-9 x normalised popularity (float64): items a user's profile gives no score rank by popularity.

    Without it the many zero-score items of a short profile would tie and fall back to catalog order; 1e-9 is far
    below any non-zero cosine or EASE score, so it reorders nothing else.
    """
    return scores.astype(np.float64) + 1e-9 * task.popularity / max(float(task.popularity.max()), 1.0)


def _info(seconds: float, interactions: int) -> dict:
    # Under a millisecond the ratio says nothing about throughput, so it is left out (nan) rather than astronomical.
    rate = interactions / seconds if seconds >= 1e-3 else float("nan")
    return {"seconds": seconds, "examples_per_s": rate, "examples": interactions, "history": []}


def engagement_matrix(task: RetrievalTask) -> torch.Tensor:
    """(n_users, n_items + 1) binary sparse COO matrix of the training engagements (column 0 stays empty)."""
    eng = engagements_of(task.train_events, task.space)
    n_cols = task.space.n_items + 1
    pair = np.unique(eng.user_code * n_cols + eng.item_idx)
    pair = pair[pair % n_cols > 0]  # unknown items (index 0) carry no signal
    idx = torch.from_numpy(np.stack([pair // n_cols, pair % n_cols]))
    return torch.sparse_coo_tensor(idx, torch.ones(len(pair)), (max(len(eng.users), 1), n_cols),
                                   check_invariants=True).coalesce()


def seen_matrix(task: RetrievalTask, rows: slice, n_cols: int, columns: np.ndarray | None = None) -> torch.Tensor:
    """(r, n_cols) dense binary profile of the evaluated users in `rows`, from `task.seen`.

    Args:
        columns: optional (n_items + 1,) map from item index to column (-1 = not represented); identity when None.
    """
    seen = task.seen[rows]
    out = torch.zeros(len(seen), n_cols)
    r = np.repeat(np.arange(len(seen)), [len(s) for s in seen])
    c = np.concatenate(seen).astype(np.int64) if len(seen) else np.zeros(0, dtype=np.int64)
    if columns is not None:
        c = columns[c]
    keep = c >= 0
    out[torch.from_numpy(r[keep]), torch.from_numpy(c[keep])] = 1.0
    return out


class Popularity:
    """Recommends the most engaged-with training items, the same list for everyone (minus what they have seen)."""

    name = "popularity"
    needs_ray = False
    deterministic = True  # the same fit for every seed: `recsys eval --seeds` fits it once

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None

    def fit(self, task: RetrievalTask, cfg: TrainConfig) -> dict:
        """Keeps the training engagement counts; `cfg` is unused (nothing to train)."""
        t0 = time.perf_counter()
        self.counts = task.popularity.astype(np.float32)
        return _info(time.perf_counter() - t0, int(task.popularity.sum()))

    def recommend(self, task: RetrievalTask, k: int) -> np.ndarray:
        """(n_users, k) item indices, best first, seen excluded."""
        if self.counts is None:
            raise RuntimeError("popularity: call fit before recommend")
        counts = self.counts
        return recommend_by_chunks(task, k, lambda rows: np.broadcast_to(counts, (len(task.seen[rows]), len(counts))))


class ItemKNN:
    """score(u, j) = sum over i in seen(u) of cos(i, j) = c_ij / sqrt(n_i n_j), c = X^T X co-engagement counts.

    X^T X is never materialised: a chunk of users' profiles P (r, I) is scored as ((P D^-1/2) X^T) X D^-1/2,
    two sparse-dense products, so memory stays O(r * (U + I)) for any catalog size.
    """

    name = "item_knn"
    needs_ray = False
    deterministic = True  # the same fit for every seed: `recsys eval --seeds` fits it once

    def __init__(self) -> None:
        self.X: torch.Tensor | None = None

    def fit(self, task: RetrievalTask, cfg: TrainConfig) -> dict:
        """Builds the sparse engagement matrix and the item norms; `cfg` is unused (no iterative training)."""
        t0 = time.perf_counter()
        self.X = engagement_matrix(task)  # (U, I)
        counts = torch.sparse.sum(self.X, dim=0).to_dense()  # (I,) users per item
        self.inv_sqrt = 1.0 / counts.clamp(min=1.0).sqrt()  # (I,); unengaged items score 0 anyway
        self.Xt = self.X.t().coalesce()  # (I, U)
        return _info(time.perf_counter() - t0, int(self.X._nnz()))

    def scores(self, task: RetrievalTask, rows: slice) -> np.ndarray:
        """(r, n_items + 1) item scores for the evaluated users in `rows`."""
        if self.X is None:
            raise RuntimeError("item_knn: call fit before recommend")
        P = seen_matrix(task, rows, self.X.shape[1]) * self.inv_sqrt  # (r, I)
        overlap = torch.sparse.mm(self.X, P.T)  # (U, r): sum_i p_ui x_vi / sqrt(n_i)
        co = torch.sparse.mm(self.Xt, overlap).T  # (r, I): sum_i p_ui c_ij / sqrt(n_i)
        return popularity_tie_break(task, (co * self.inv_sqrt).numpy())

    def recommend(self, task: RetrievalTask, k: int) -> np.ndarray:
        """(n_users, k) item indices, best first, seen excluded."""
        return recommend_by_chunks(task, k, lambda rows: self.scores(task, rows))


@dataclass(frozen=True)
class EASEConfig:
    l2: float = 500.0  # lambda; Steck reports 200-1000 best on ML-20M/Netflix/MSD-sized data
    top_n: int = 10_000  # items kept: a 10k x 10k float32 inverse is 400 MB and ~30 s on 2 cores (20k: 1.6 GB, ~4 min)


class EASE:
    """Linear item-item autoencoder with a zero diagonal, solved in closed form on the top-N popular items."""

    name = "ease"
    needs_ray = False
    deterministic = True  # the same fit for every seed: `recsys eval --seeds` fits it once

    def __init__(self, l2: float = EASEConfig.l2, top_n: int = EASEConfig.top_n) -> None:
        if l2 <= 0:
            raise ValueError(f"ease: l2 must be > 0, got {l2}")
        if top_n < 1:
            raise ValueError(f"ease: top_n must be >= 1, got {top_n}")
        self.config = EASEConfig(l2=l2, top_n=top_n)
        self.B: torch.Tensor | None = None

    def fit(self, task: RetrievalTask, cfg: TrainConfig) -> dict:
        """Solves B in closed form on the top-N items; `cfg` is unused (no iterative training)."""
        t0 = time.perf_counter()
        X = engagement_matrix(task)
        counts = torch.sparse.sum(X, dim=0).to_dense().numpy()
        self.items = np.argsort(-counts, kind="stable")[:self.config.top_n]  # (N,) item indices, most popular first
        self.items = self.items[counts[self.items] > 0]
        self.column = np.full(task.space.n_items + 1, -1, dtype=np.int64)  # item index -> column of B
        self.column[self.items] = np.arange(len(self.items))
        self.B = self.solve(X, self.column, len(self.items), self.config.l2)
        return _info(time.perf_counter() - t0, int(X._nnz()))

    @staticmethod
    def solve(X: torch.Tensor, column: np.ndarray, n: int, l2: float) -> torch.Tensor:
        """(N, N) EASE weights B = I - P diag(1/diag(P)), P = (X_N^T X_N + l2 I)^-1, for the N kept columns."""
        idx = X.indices()
        col = torch.from_numpy(column)[idx[1]]
        keep = col >= 0
        XN = torch.sparse_coo_tensor(torch.stack([idx[0][keep], col[keep]]), X.values()[keep],
                                     (X.shape[0], n), check_invariants=True).coalesce()  # (U, N)
        G = torch.sparse.mm(XN.t().coalesce(), XN.to_dense()).double()  # (N, N) Gram; float64 for the inverse
        G.diagonal().add_(l2)
        P = torch.cholesky_inverse(torch.linalg.cholesky(G))  # G + l2 I is symmetric positive definite
        B = -P / P.diagonal()[None, :]  # B_ij = -P_ij / P_jj off the diagonal
        B.diagonal().zero_()
        return B.float()

    def scores(self, task: RetrievalTask, rows: slice) -> np.ndarray:
        """(r, n_items + 1) scores; items outside the top N rank after every kept item, by popularity."""
        if self.B is None:
            raise RuntimeError("ease: call fit before recommend")
        x = seen_matrix(task, rows, len(self.items), self.column)  # (r, N)
        out = np.full((x.shape[0], task.space.n_items + 1), -1e6, dtype=np.float32)  # below any EASE score
        out[:, self.items] = (x @ self.B).numpy()
        return popularity_tie_break(task, out)

    def recommend(self, task: RetrievalTask, k: int) -> np.ndarray:
        """(n_users, k) item indices, best first, seen excluded."""
        return recommend_by_chunks(task, k, lambda rows: self.scores(task, rows))
