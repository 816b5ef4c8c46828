"""Live catalog changes without a rebuild: the forward index's semantics per op, a follower bringing in-process
shards to the log's state, and a shard that restarted from its saved file caught up from its own offset."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from indexing.changes import FileChangeLog
from indexing.live import Follower
from indexing.shards import FaissShard, shard_of
from training.data.changes import ItemChange
from training.request.contracts import ItemFilter
from training.request.forward import ForwardIndex

DIM = 8


def catalog(n: int = 20) -> pa.Table:
    return pa.table({"item_id": [f"i{i}" for i in range(1, n + 1)], "brand": [f"b{i % 3}" for i in range(n)],
                     "category": [f"c{i % 2}" for i in range(n)], "price": np.arange(1.0, n + 1),
                     "in_stock": [True] * n,
                     "created_at": pa.array(np.arange(n) * 1000, pa.timestamp("ms", tz="UTC"))})


def vector_of(forward: ForwardIndex, idx: np.ndarray) -> np.ndarray:
    """A stand-in item tower: a unit vector that depends on the item's current price and brand."""
    rng = [np.random.default_rng(int(forward.price[i] * 1000) + hash(forward.brands[i]) % 997) for i in idx]
    v = np.stack([r.standard_normal(DIM) for r in rng]).astype(np.float32) if len(idx) else np.zeros((0, DIM), np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-9)


def test_each_op_changes_the_forward_index_as_it_says():
    f = ForwardIndex(catalog())
    u = f.apply([ItemChange("upsert", "new-1", "b9", "c9", 5.0, created_at=100.0),
                 ItemChange("update", "i3", price=99.0), ItemChange("update", "i4", in_stock=False),
                 ItemChange("delete", "i5"), ItemChange("update", "nope", price=1.0),
                 ItemChange("upsert", "new-2", "b9", "c9", 5.0), ItemChange("delete", "new-2")])
    assert f.index_of("new-1") == 21 and f.n_trained == 20 and len(f) == 22
    assert u.embed.tolist() == [3, 21]  # a price change re-embeds; a stock change does not
    assert u.deleted.tolist() == [5] and f.index_of("i5") == 0 and f.index_of("new-2") == 0
    assert u.skipped == ("update of nope: not in the catalog (upsert it first)",)
    assert (f.brands[21], f.categories[21], f.price[21], f.in_stock[21], f.created_s[21]) == ("b9", "c9", 5.0, True,
                                                                                             100.0)
    assert not f.in_stock[4] and f.price[3] == 99.0
    mask = f.allowed(ItemFilter(in_stock=True))
    assert not mask[4] and not mask[5] and mask[21] and not mask[22]  # out of stock at once; deleted never
    assert f.allowed(ItemFilter(categories=("c9",))).nonzero()[0].tolist() == [21]
    back = f.apply([ItemChange("upsert", "i5", "b0", "c0", 1.0)])  # a deleted item comes back under its index
    assert back.embed.tolist() == [5] and f.index_of("i5") == 5


def follower(log, n_shards=2):
    f = ForwardIndex(catalog())
    return Follower(log, f, lambda idx: vector_of(f, idx), n_shards)


def built_shards(fw: ForwardIndex, n_shards: int = 2) -> list[FaissShard]:
    ids = np.arange(1, fw.n_trained + 1)
    shards = [FaissShard(DIM) for _ in range(n_shards)]
    for s, shard in enumerate(shards):
        mine = ids[shard_of(ids, n_shards) == s]
        shard.add(mine, vector_of(fw, mine))
    return shards


def apply(shards, parts):
    for shard, part in zip(shards, parts):
        assert shard.apply_changes(part)[0]


def found(shards, query: np.ndarray, k: int = 30) -> list[int]:
    ids = np.concatenate([s.search(query[None], k)[1][0] for s in shards])
    return sorted(int(i) for i in ids if i >= 0)


def test_a_follower_brings_its_shards_to_the_logs_state_and_a_replay_is_a_no_op(tmp_path):
    log = FileChangeLog(tmp_path / "changes.jsonl")
    fol = follower(log)
    shards = built_shards(fol.forward)
    log.append([ItemChange("upsert", "new-1", "b1", "c1", 7.5), ItemChange("delete", "i2"),
                ItemChange("update", "i3", price=42.0)])
    parts = fol.poll()
    apply(shards, parts)
    assert fol.offset == 3 and [s.changes_offset for s in shards] == [3, 3]
    assert 21 in found(shards, np.ones(DIM, np.float32)) and 2 not in found(shards, np.ones(DIM, np.float32))
    target = vector_of(fol.forward, np.asarray([21]))[0]
    assert shards[shard_of(np.asarray([21]), 2)[0]].search(target[None], 1)[1][0, 0] == 21  # aimed at, found
    moved = vector_of(fol.forward, np.asarray([3]))[0]
    assert shards[1].search(moved[None], 1)[1][0, 0] == 3  # re-embedded from its new price
    before = [s.ntotal for s in shards]
    apply(shards, parts)  # a second replica sending the same changes changes nothing
    assert [s.ntotal for s in shards] == before == [9, 11]  # i2 left shard 0, new-1 (21) joined shard 1
    assert fol.poll() == [] and fol.stats()["applied"] == 3


def test_a_shard_restarted_from_its_file_refuses_a_gap_and_is_caught_up(tmp_path):
    log = FileChangeLog(tmp_path / "changes.jsonl")
    fol = follower(log)
    shards = built_shards(fol.forward)
    saved = [str(tmp_path / f"shard-{i}.faiss") for i in range(2)]
    for s, path in zip(shards, saved):
        s.save(path)
    log.append([ItemChange("upsert", f"new-{i}", "b1", "c1", float(i)) for i in range(4)] + [ItemChange("delete", "i1")])
    apply(shards, fol.poll())
    restarted = FaissShard.load(saved[1])  # back at offset 0, without the changes
    log.append([ItemChange("delete", "new-3"), ItemChange("update", "i7", price=70.0)])
    parts = fol.poll()
    taken, at = restarted.apply_changes(parts[1])
    assert not taken and at == 0  # changes 1-5 are missing: it must not take 6-7 alone
    restarted.apply_changes(fol.catch_up(at, 1))
    assert shards[1].apply_changes(parts[1])[0]
    q = np.ones(DIM, np.float32)
    assert found([restarted], q) == found([shards[1]], q) and restarted.changes_offset == 7
    for probe in np.random.default_rng(0).standard_normal((5, DIM)).astype(np.float32):
        assert found([restarted], probe, 5) == found([shards[1]], probe, 5)
    assert fol.catch_up(7, 1) is None




@pytest.mark.parametrize("kind", ["hnsw"])
def test_an_index_that_cannot_remove_says_so(kind, tmp_path):
    from indexing.index_types import IndexSpec
    shard = FaissShard(DIM, IndexSpec(kind=kind))
    shard.add(np.arange(1, 4), np.eye(3, DIM, dtype=np.float32))
    log = FileChangeLog(tmp_path / "changes.jsonl")
    fol = follower(log, n_shards=1)
    log.append([ItemChange("delete", "i1")])
    with pytest.raises(ValueError, match="cannot remove"):
        shard.apply_changes(fol.poll()[0])
