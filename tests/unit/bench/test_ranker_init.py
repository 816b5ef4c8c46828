"""The ranker-init benchmark's summary and its argument errors (the training itself runs in `recsys bench`)."""
from __future__ import annotations

import types

import numpy as np
import pytest

from bench.ranker_init import hidden_relevance_at_10, main, summarise


def test_summary_gives_spreads_and_the_per_seed_difference_of_the_two_inits():
    def run(seed, random, tower):
        return {"seed": seed, "retrieval_ndcg@10": 0.1, "retrieval_hidden_relevance@10": 0.2,
                "inits": {"random": {"ranker_ndcg@10": random, "ranker_hidden_relevance@10": 0.2},
                          "tower": {"ranker_ndcg@10": tower, "ranker_hidden_relevance@10": 0.25}}}

    s = summarise([run(0, 0.10, 0.12), run(1, 0.14, 0.13)])
    assert s["tower_minus_random_ranker_ndcg@10"] == pytest.approx([0.02, -0.01])
    assert s["tower_minus_random_ranker_hidden_relevance@10"] == pytest.approx([0.05, 0.05])
    assert s["random_ranker_ndcg@10"]["mean"] == pytest.approx(0.12)
    assert s["random_ranker_ndcg@10"]["std"] == pytest.approx(np.std([0.10, 0.14], ddof=1))


def test_hidden_relevance_is_nan_without_hidden_truth():
    assert np.isnan(hidden_relevance_at_10(types.SimpleNamespace(hidden={}), np.ones((2, 10), np.int64)))


def test_bad_seeds_are_an_error_naming_the_option(capsys):
    with pytest.raises(SystemExit):
        main(["--seeds", "one"])
    assert "--seeds" in capsys.readouterr().err
