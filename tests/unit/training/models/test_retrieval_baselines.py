"""Retrieval baselines: they beat random on the tiny shop, exclude seen items, and match their closed forms."""
import numpy as np
import pytest

from training.data.features import engagements_of
from training.metrics import recall_at_k
from training.data.splits import leave_last_out
from training.models.retrieval_baselines import EASE, ItemKNN, Popularity, engagement_matrix
from training.data.synthetic import generate_shop
from training.fit.train_loop import TrainConfig

K = 100


@pytest.fixture(scope="module")
def task():
    return leave_last_out(generate_shop("tiny", 0), dataset="tiny")


def _dense_engagements(task) -> np.ndarray:
    """(n_users, n_items + 1) binary matrix built with plain numpy, independently of the torch sparse path."""
    eng = engagements_of(task.train_events, task.space)
    X = np.zeros((len(eng.users), task.space.n_items + 1))
    X[eng.user_code, eng.item_idx] = 1.0
    X[:, 0] = 0.0
    return X


def _profiles(task, rows: slice) -> np.ndarray:
    P = np.zeros((len(task.seen[rows]), task.space.n_items + 1))
    for r, s in enumerate(task.seen[rows]):
        P[r, s] = 1.0
    return P


@pytest.mark.parametrize("model_cls", [Popularity, ItemKNN, EASE])
def test_baseline_beats_random_and_never_returns_seen_items(task, model_cls) -> None:
    model = model_cls()
    info = model.fit(task, TrainConfig())
    assert info["seconds"] >= 0 and info["history"] == []
    ranked = model.recommend(task, K)
    assert ranked.shape == (len(task.user_ids), K) and ranked.dtype == np.int64
    assert ranked.min() >= 0 and ranked.max() <= task.space.n_items
    for row, seen in zip(ranked, task.seen):
        assert not np.isin(row[row > 0], seen).any()
        assert len(np.unique(row[row > 0])) == (row > 0).sum()
    random_recall = K / task.space.n_items  # expected recall@K of a uniformly random list
    assert recall_at_k(ranked, task.targets, K) > 3 * random_recall


def test_personalised_baselines_beat_popularity_on_ndcg(task) -> None:
    from training.metrics import ndcg_at_k

    scores = {}
    for cls in (Popularity, ItemKNN, EASE):
        m = cls()
        m.fit(task, TrainConfig())
        scores[cls.__name__] = ndcg_at_k(m.recommend(task, 10), task.targets, 10)
    assert scores["ItemKNN"] > scores["Popularity"] and scores["EASE"] > scores["Popularity"]


def test_engagement_matrix_matches_the_dense_count(task) -> None:
    np.testing.assert_array_equal(engagement_matrix(task).to_dense().numpy(), _dense_engagements(task))


def test_item_knn_scores_equal_summed_dense_cosine(task) -> None:
    model = ItemKNN()
    model.fit(task, TrainConfig())
    X = _dense_engagements(task)
    norm = np.sqrt(np.maximum(X.sum(axis=0), 1.0))
    S = (X.T @ X) / norm[:, None] / norm[None, :]  # (I, I) item-item cosine
    rows = slice(0, 25)
    expected = _profiles(task, rows) @ S
    np.testing.assert_allclose(model.scores(task, rows), expected, atol=1e-6)


def test_ease_weights_solve_the_constrained_least_squares(task) -> None:
    model = EASE(l2=50.0, top_n=300)
    model.fit(task, TrainConfig())
    X = _dense_engagements(task)[:, model.items]  # (U, N) in the model's column order
    assert np.all(np.diff(X.sum(axis=0)) <= 0)  # most popular first
    G = X.T @ X
    B = model.B.double().numpy()
    np.testing.assert_allclose(np.diag(B), 0.0)
    # Stationarity of ||X - XB||^2 + l2 ||B||^2 under diag(B) = 0: (G + l2 I) B - G is diagonal (the multipliers).
    residual = (G + 50.0 * np.eye(len(G))) @ B - G
    np.testing.assert_allclose(residual - np.diag(np.diag(residual)), 0.0, atol=1e-3)


def test_ease_items_outside_top_n_rank_after_kept_items(task) -> None:
    model = EASE(top_n=50)
    model.fit(task, TrainConfig())
    ranked = model.recommend(task, 60)
    kept = np.isin(ranked, model.items)
    eligible_kept = np.array([len(np.setdiff1d(model.items, s)) for s in task.seen])
    for row, n in zip(kept, eligible_kept):
        assert row[:n].all() and not row[n:].any()


def test_ease_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="l2"):
        EASE(l2=0.0)
    with pytest.raises(ValueError, match="top_n"):
        EASE(top_n=0)


def test_recommend_before_fit_is_an_error(task) -> None:
    with pytest.raises(RuntimeError, match="fit"):
        ItemKNN().recommend(task, 10)
    with pytest.raises(RuntimeError, match="fit"):
        EASE().recommend(task, 10)
