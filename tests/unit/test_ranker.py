"""The ranker: task heads, the combined score, and history encoded once per request."""
from __future__ import annotations

import numpy as np
import torch

from tests.unit.test_models import SIZES, _batch
from training.ranker import TASKS, MultiTaskRanker, RankerConfig, score_candidates


def test_ranker_scores_every_task_and_combines_them_with_the_task_weights():
    model = MultiTaskRanker(RankerConfig(**SIZES)).eval()
    logits = model.score(model.encode_user(*_batch(B=4)), torch.arange(1, 5))
    assert logits.shape == (4, len(TASKS))
    expected = torch.sigmoid(logits) @ torch.tensor(model.config.task_weights)
    torch.testing.assert_close(model.combined(logits), expected)


def test_history_encoded_once_per_request_gives_the_same_scores_as_per_candidate_scoring():
    model = MultiTaskRanker(RankerConfig(**SIZES)).eval()
    inputs = _batch(B=2)
    cands = [np.array([3, 7, 9, 11]), np.array([5, 6])]
    batched = score_candidates(model, *(x.numpy() for x in inputs), cands)
    with torch.inference_mode():
        for r, c in enumerate(cands):
            for j, item in enumerate(c):
                user = model.encode_user(*(x[r:r + 1] for x in inputs))
                single = model.combined(model.score(user, torch.tensor([item])))
                assert abs(single.item() - batched[r][j]) < 1e-5
