"""SASRec: causal attention, the last-position shortcut, training windows, and learning a next-item rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.training.models.model_helpers import fit_full_batch
from training.data.features import Engagements
from training.models.sasrec import (FULL_SOFTMAX_MAX_ITEMS, LOSSES, SASRec, SASRecConfig, SelfAttentionBlock,
                                    attention_mask, sequence_windows)

SIZES = dict(n_items=61, n_brands=5, n_categories=4, n_price_buckets=6, n_actions=6)




def _model(**kw) -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(**SIZES, dim=16, dropout=0.0, **kw))


def _engagements(users: list[list[int]], actions: list[list[int]] | None = None) -> Engagements:
    code = np.concatenate([np.full(len(s), u) for u, s in enumerate(users)]).astype(np.int64)
    items = np.concatenate(users).astype(np.int64)
    acts = (np.concatenate(actions) if actions else np.full(len(items), 2)).astype(np.int64)
    t = np.arange(len(items), dtype=np.int64)
    return Engagements(code, t, items, acts, [f"u{u}" for u in range(len(users))], (code << 42) | t)


def test_positions_do_not_see_later_tokens():
    model = _model().eval()
    items = torch.tensor([[0, 3, 4, 5, 6]])
    actions = (items > 0).long() * 2
    h = model.encode(items, actions)
    changed = items.clone()
    changed[0, 4] = 9
    h2 = model.encode(changed, actions)
    torch.testing.assert_close(h[:, :4], h2[:, :4])
    assert not torch.allclose(h[:, 4], h2[:, 4])


def test_last_only_block_equals_the_full_blocks_last_position():
    torch.manual_seed(0)
    block = SelfAttentionBlock(16, 2).eval()
    x = torch.randn(3, 7, 16)
    present = torch.rand(3, 7) > 0.3
    for causal in (True, False):
        allowed = attention_mask(present, causal)
        torch.testing.assert_close(block(x, allowed, last_only=True)[:, 0], block(x, allowed)[:, -1])


def test_attention_mask_lets_padding_rows_attend_to_themselves_only():
    allowed = attention_mask(torch.tensor([[False, True, True]]), causal=True)[0, 0]
    assert allowed.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_user_tower_is_the_last_position_and_ignores_left_padding():
    model = _model().eval()
    items = torch.tensor([[3, 4, 5]])
    actions = torch.full_like(items, 2)
    ctx = torch.zeros(1, 8, dtype=torch.long)
    u = model.user_tower(items, actions, actions, ctx)
    torch.testing.assert_close(u, model.encode(items, actions)[:, -1])
    pad = torch.zeros(1, 4, dtype=torch.long)
    torch.testing.assert_close(u, model.user_tower(torch.cat([pad, items], 1), torch.cat([pad, actions], 1),
                                                   torch.cat([pad, actions], 1), ctx))


def test_windows_cover_each_transition_once_collapse_runs_and_mask_repeats():
    # user 0: 5 5(cart) 6 7 5 -> tokens 5 6 7 5; user 1: 8 9; user 2: a single engagement, nothing to predict.
    eng = _engagements([[5, 5, 6, 7, 5], [8, 9], [3]], [[2, 4, 2, 2, 2], [2, 2], [2]])
    w = sequence_windows(eng, 2)
    pairs = {(int(i), int(t)) for row_i, row_t in zip(w["seq_items"], w["seq_targets"])
             for i, t in zip(row_i, row_t) if t > 0}
    assert pairs == {(5, 6), (6, 7), (8, 9)}  # 7 -> 5 repeats an item the user had: masked
    assert w["seq_items"].shape == (3, 2)
    first = int(np.flatnonzero((w["seq_targets"] == 6).any(1))[0])
    assert w["seq_actions"][first].tolist() == [0, 4]  # the collapsed run keeps its last action (cart)
    long = sequence_windows(_engagements([list(range(1, 12))]), 4)
    targets = long["seq_targets"][long["seq_targets"] > 0]
    assert sorted(targets.tolist()) == list(range(2, 12))  # 10 transitions, each once


def test_sasrec_learns_a_next_item_rule():
    """Sequences walk item j -> j + 1: after training the user vector of a sequence ending in j scores j + 1 first."""
    model = _model(neg_fraction=1.0)
    rng = np.random.default_rng(0)
    starts = rng.integers(1, 40, size=64)
    seqs = [list(range(s, s + 8)) for s in starts]
    w = sequence_windows(_engagements(seqs), 7)
    counts = np.bincount(w["seq_targets"][w["seq_targets"] > 0], minlength=61)
    zeros = np.zeros(61, dtype=np.int64)
    model.prepare({"item_brand": zeros, "item_category": zeros, "item_price": zeros, "item_counts": counts})
    batch = [torch.from_numpy(w[k]) for k in ("seq_items", "seq_actions", "seq_targets")]
    fit_full_batch(model, batch, 150, 1e-2)
    model.eval()
    last = torch.arange(5, 40).unsqueeze(1)
    hist = torch.cat([last - 2, last - 1, last], dim=1)  # (35, 3) ..., j - 1, j
    acts = torch.full_like(hist, 2)
    with torch.no_grad():
        scores = model.user_tower(hist, acts, acts, torch.zeros(35, 8, dtype=torch.long)) @ \
            model.item_tower_by_index(torch.arange(61)).T
    top1 = scores[:, 1:].argmax(1) + 1
    assert (top1 == last.squeeze(1) + 1).float().mean() > 0.8


def test_every_loss_learns_the_next_item_rule_and_auto_picks_by_catalog_size():
    seq = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    actions = torch.full_like(seq, 2)
    targets = torch.tensor([[2, 3, 4, 5], [6, 7, 8, 9]])
    for loss in LOSSES:
        model = _model(loss=loss, gbce_negatives=16)
        first = model(seq, actions, targets).item()
        assert fit_full_batch(model, (seq, actions, targets), steps=80, lr=0.02) < first, loss
    assert SASRecConfig(**SIZES, loss="auto").effective_loss == "full"
    big = dict(SIZES, n_items=FULL_SOFTMAX_MAX_ITEMS + 1)
    assert SASRecConfig(**big, loss="auto").effective_loss == "sampled"
    with pytest.raises(ValueError, match="loss must be one of"):
        SASRecConfig(**SIZES, loss="bpr")
