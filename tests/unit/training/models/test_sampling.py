"""Log-uniform sampler and sampled softmax: the sampling law, logQ correction, accidental hits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.models.sampling import (LogUniformSampler, full_softmax_loss, gbce_beta, gbce_loss, num_negatives,
                                      sampled_softmax_loss)




def _zipf_counts(n_items: int, seed: int = 0) -> torch.Tensor:
    """(n_items,) counts with Zipf popularity, shuffled so rank order differs from index order; row 0 = padding."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(n_items)
    counts[1:] = rng.permutation(np.round(10_000 / np.arange(1, n_items)) + 1)
    return torch.tensor(counts)


def test_num_negatives_is_a_clipped_fraction_of_the_catalog() -> None:
    assert num_negatives(50_001) == 210
    assert num_negatives(2_001) == 64  # floor
    assert num_negatives(10_000_000) == 4096  # cap
    assert num_negatives(100_000, fraction=0.01) == 1000
    with pytest.raises(ValueError, match="fraction"):
        num_negatives(1000, fraction=0.0)


def test_sampler_matches_the_log_uniform_law_over_popularity_ranks() -> None:
    n_items = 501
    counts = _zipf_counts(n_items)
    sampler = LogUniformSampler(n_items)
    sampler.set_counts(counts)
    draws = 400_000
    items, log_q = sampler.sample(draws, torch.Generator().manual_seed(1))
    assert items.min() >= 1 and items.max() < n_items  # padding is never drawn
    assert torch.allclose(log_q, sampler.log_q(items))
    empirical = torch.bincount(items, minlength=n_items)[1:].double() / draws
    n = n_items - 1
    order = torch.sort(-counts[1:], stable=True).indices  # rank r -> item index - 1
    r = torch.arange(n, dtype=torch.float64)
    law = (torch.log(r + 2) - torch.log(r + 1)) / math.log(n + 1)
    expected = torch.zeros(n, dtype=torch.float64)
    expected[order] = law
    assert abs(expected.sum().item() - 1.0) < 1e-9
    assert torch.allclose(sampler.log_q(torch.arange(1, n_items)).double().exp(), expected, rtol=1e-5)
    # Pearson chi-square with n - 1 = 499 degrees of freedom: mean 499, sd ~32; 650 is ~4.8 sd.
    chi2 = (((empirical - expected) * draws) ** 2 / (expected * draws)).sum().item()
    assert chi2 < 650, chi2
    assert (empirical - expected).abs().max().item() < 0.003
    # The most counted item is the most sampled one.
    assert torch.argmax(empirical).item() + 1 == torch.argmax(counts).item()


def test_sampler_rejects_counts_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="counts"):
        LogUniformSampler(10).set_counts(torch.ones(9))


def test_accidental_hits_are_masked() -> None:
    torch.manual_seed(0)
    user, pos = torch.randn(3, 4), torch.randn(3, 4)
    pos_items = torch.tensor([5, 6, 7])
    neg_items = torch.tensor([5, 5, 5])  # row 0's positive, three times
    neg = pos[0].expand(3, 4)
    zeros = torch.zeros(3)
    loss_rows = [sampled_softmax_loss(user[i:i + 1], pos[i:i + 1], pos_items[i:i + 1], neg, neg_items, 1.0,
                                      zeros[:1], zeros) for i in range(3)]
    assert loss_rows[0].item() == pytest.approx(0.0, abs=1e-7)  # only the positive is left as a candidate
    assert loss_rows[1].item() > 0.0


def test_in_batch_mix_equals_the_explicit_cross_entropy() -> None:
    torch.manual_seed(0)
    B, S, D, t = 4, 3, 8, 0.5
    user, pos, neg = torch.randn(B, D), torch.randn(B, D), torch.randn(S, D)
    pos_items, neg_items = torch.tensor([1, 2, 1, 3]), torch.tensor([9, 3, 8])
    pos_lq, neg_lq = torch.randn(B), torch.randn(S)
    got = sampled_softmax_loss(user, pos, pos_items, neg, neg_items, t, pos_lq, neg_lq, in_batch=True)
    want = 0.0
    for i in range(B):
        logits = []
        for j in range(B):
            if j == i or pos_items[j] != pos_items[i]:
                logits.append(user[i] @ pos[j] / t - pos_lq[j] - math.log(B))
        target = 0 if i == 0 else sum(1 for j in range(i) if pos_items[j] != pos_items[i])
        for s in range(S):
            if neg_items[s] != pos_items[i]:
                logits.append(user[i] @ neg[s] / t - neg_lq[s] - math.log(S))
        want += -torch.log_softmax(torch.stack(logits), 0)[target]
    assert got.item() == pytest.approx((want / B).item(), rel=1e-5)


def _fit_item_scores(targets: torch.Tensor, n_items: int, sampler: LogUniformSampler, correct: bool,
                     in_batch: bool, pos_log_q_table: torch.Tensor, steps: int = 300) -> torch.Tensor:
    """Learns one free score per item (user = 1, item vector = its score) with the sampled softmax; returns (n,)."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.zeros(n_items, 1, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    B, S = 256, 64
    for step in range(steps):
        pos_items = targets[torch.randint(len(targets), (B,), generator=gen)]
        neg_items, neg_lq = sampler.sample(S, gen)
        pos_lq = pos_log_q_table[pos_items]
        if not correct:
            pos_lq, neg_lq = torch.zeros_like(pos_lq), torch.zeros_like(neg_lq)
        loss = sampled_softmax_loss(torch.ones(B, 1), theta[pos_items], pos_items, theta[neg_items], neg_items, 1.0,
                                    pos_lq, neg_lq, in_batch=in_batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return theta.detach()[1:, 0]


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_log_q_correction_removes_popularity_skew_of_sampled_negatives() -> None:
    """Targets uniform over a Zipf-popular catalog: the true preference is flat over items.

    Popular items are drawn as negatives far more often, so the uncorrected model learns scores falling with
    popularity (it estimates p / q); with the correction the scores carry no popularity signal.
    """
    n_items = 201
    counts = _zipf_counts(n_items)
    sampler = LogUniformSampler(n_items)
    sampler.set_counts(counts)
    targets = torch.arange(1, n_items)  # uniform
    corrected = _fit_item_scores(targets, n_items, sampler, True, False, sampler.item_log_q)
    uncorrected = _fit_item_scores(targets, n_items, sampler, False, False, sampler.item_log_q)
    pop = counts[1:]
    assert abs(_spearman(corrected, pop)) < 0.3
    assert _spearman(uncorrected, pop) < -0.8
    # The share the learned softmax gives the 20 most popular items: the truth is 20 / 200 = 0.1.
    top = torch.argsort(-pop)[:20]
    assert abs(torch.softmax(corrected, 0)[top].sum().item() - 0.1) < 0.04
    assert torch.softmax(uncorrected, 0)[top].sum().item() < 0.05


def test_log_q_correction_recovers_zipf_preference_with_in_batch_negatives() -> None:
    """Targets drawn from Zipf popularity p, in-batch + sampled negatives: corrected scores follow log p."""
    n_items = 201
    counts = _zipf_counts(n_items, seed=3)
    sampler = LogUniformSampler(n_items)
    sampler.set_counts(counts)
    p = counts / counts[1:].sum()
    p[0] = 0.0
    targets = torch.multinomial(p, 100_000, replacement=True, generator=torch.Generator().manual_seed(2))
    log_p = torch.log(p.clamp_min(1e-12)).float()
    corrected = _fit_item_scores(targets, n_items, sampler, True, True, log_p, steps=400)
    uncorrected = _fit_item_scores(targets, n_items, sampler, False, True, log_p, steps=400)
    head = torch.argsort(-p[1:])[:50]  # items seen often enough to have learned scores
    slope_c = np.polyfit(log_p[1:][head].numpy(), corrected[head].numpy(), 1)[0]
    slope_u = np.polyfit(log_p[1:][head].numpy(), uncorrected[head].numpy(), 1)[0]
    assert 0.7 < slope_c < 1.3, slope_c
    assert slope_u < 0.5, slope_u


def test_full_softmax_is_the_cross_entropy_over_every_real_item():
    g = torch.Generator().manual_seed(0)
    user, items = torch.randn(5, 4, generator=g), torch.randn(9, 4, generator=g)
    target = torch.tensor([1, 3, 8, 2, 2])
    want = torch.nn.functional.cross_entropy((user @ items[1:].T) / 0.5, target - 1)
    torch.testing.assert_close(full_softmax_loss(user, items, target, temperature=0.5), want)


def test_gbce_beta_spans_bce_to_calibrated_and_the_loss_is_bce_at_beta_one():
    assert gbce_beta(256, 10_001, 0.0) == pytest.approx(1.0)
    assert gbce_beta(256, 10_001, 1.0) == pytest.approx(256 / 10_000)
    assert 256 / 10_000 < gbce_beta(256, 10_001, 0.75) < 1.0
    with pytest.raises(ValueError, match="t must be"):
        gbce_beta(8, 100, 1.5)
    pos, neg = torch.tensor([0.3, -1.0]), torch.tensor([[0.1, 2.0], [-0.5, 0.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    want = (bce(pos, torch.ones(2), reduction="none") + bce(neg, torch.zeros(2, 2), reduction="none").sum(1)).mean()
    torch.testing.assert_close(gbce_loss(pos, neg, beta=1.0), want)
