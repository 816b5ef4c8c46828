"""FAISS shards: sharded search plus merge equals one exact index; removes, replaces and input checks."""

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indexing.shards import FaissShard, merge_top_k, shard_of

DIM = 8


def random_items(seed: int, n: int, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(1, 10 * n + 2), size=n, replace=False).astype(np.int64)
    return ids, rng.normal(size=(n, dim)).astype(np.float32)


def build_shards(ids: np.ndarray, xb: np.ndarray, n_shards: int) -> list[FaissShard]:
    owner = shard_of(ids, n_shards)
    shards = [FaissShard(xb.shape[1]) for _ in range(n_shards)]
    for s, shard in enumerate(shards):
        shard.add(ids[owner == s], xb[owner == s])
    return shards


def search_all(shards: list[FaissShard], xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [shard.search(xq, k) for shard in shards]
    return merge_top_k([d for d, _ in parts], [i for _, i in parts], k)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 120),
    n_shards=st.integers(1, 5),
    k=st.integers(1, 30),
)
def test_sharded_search_then_merge_equals_one_exact_index(seed: int, n: int, n_shards: int, k: int) -> None:
    ids, xb = random_items(seed, n)
    xq = np.random.default_rng(seed + 1).normal(size=(7, DIM)).astype(np.float32)
    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    exact.add_with_ids(xb, ids)
    D_ref, I_ref = exact.search(xq, k)
    D, I = search_all(build_shards(ids, xb, n_shards), xq, k)
    assert D.shape == I.shape == (7, k)
    np.testing.assert_array_equal(I, I_ref)  # random normals: scores are distinct, so the order is unique
    real = I_ref >= 0
    np.testing.assert_allclose(D[real], D_ref[real], rtol=1e-5, atol=1e-5)
    assert np.isneginf(D[~real]).all()


def test_search_pads_with_minus_inf_and_minus_one_when_shard_is_small() -> None:
    shard = FaissShard(DIM)
    ids, xb = random_items(0, 3)
    assert shard.add(ids, xb) == 3
    D, I = shard.search(xb[:2], 5)
    assert D.dtype == np.float32 and I.dtype == np.int64
    assert (I[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()
    assert set(I[0, :3]) == set(ids)
    D_empty, I_empty = FaissShard(DIM).search(xb[:2], 4)
    assert (I_empty == -1).all() and np.isneginf(D_empty).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_removed=st.integers(0, 40))
def test_removed_ids_are_never_returned(seed: int, n_removed: int) -> None:
    ids, xb = random_items(seed, 40)
    shard = FaissShard(DIM)
    shard.add(ids, xb)
    gone = ids[:n_removed]
    assert shard.remove(np.concatenate([gone, [10**9]])) == n_removed  # unknown ids are ignored
    assert shard.ntotal == 40 - n_removed
    _, I = shard.search(xb, 40)
    assert not np.isin(I, gone).any()
    assert set(I[I >= 0].tolist()) == set(ids[n_removed:].tolist())


def test_re_adding_an_id_replaces_its_vector() -> None:
    shard = FaissShard(DIM)
    ids, xb = random_items(3, 10)
    shard.add(ids, xb)
    new = np.zeros((1, DIM), dtype=np.float32)
    new[0, 0] = 100.0
    assert shard.add(ids[:1], new) == 10
    D, I = shard.search(new, 10)
    assert I[0, 0] == ids[0] and D[0, 0] == pytest.approx(10_000.0)
    assert (I[0] == ids[0]).sum() == 1


def test_stats_report_count_dim_and_memory() -> None:
    shard = FaissShard(DIM)
    ids, xb = random_items(4, 6)
    shard.add(ids, xb)
    stats = shard.stats()
    assert (stats["ntotal"], stats["dim"], stats["kind"]) == (6, DIM, "flat")
    assert stats["memory_bytes"] >= 6 * (DIM * 4 + 8)  # vectors and ids, plus what FAISS stores beside them
    shard.add(*random_items(5, 6))
    assert shard.stats()["memory_bytes"] > stats["memory_bytes"]


@pytest.mark.parametrize(
    ("ids", "xb", "match"),
    [
        (np.arange(3), np.zeros((3, DIM + 1), dtype=np.float32), "shape"),
        (np.arange(3), np.zeros((3, DIM), dtype=np.float64), "float32"),
        (np.arange(2), np.zeros((3, DIM), dtype=np.float32), "length"),
        (np.zeros(3), np.zeros((3, DIM), dtype=np.float32), "integer"),
        (np.array([1, 1, 2]), np.zeros((3, DIM), dtype=np.float32), "unique"),
        (np.array([-1, 1, 2]), np.zeros((3, DIM), dtype=np.float32), ">= 0"),
    ],
)
def test_add_rejects_bad_input(ids: np.ndarray, xb: np.ndarray, match: str) -> None:
    shard = FaissShard(DIM)
    with pytest.raises(ValueError, match=match):
        shard.add(ids, xb)
    assert shard.ntotal == 0


def test_search_rejects_wrong_query_dim() -> None:
    with pytest.raises(ValueError, match="shape"):
        FaissShard(DIM).search(np.zeros((2, DIM - 1), dtype=np.float32), 3)


def test_shard_of_is_id_modulo_shard_count() -> None:
    np.testing.assert_array_equal(shard_of(np.array([0, 1, 5, 7, 12]), 3), [0, 1, 2, 1, 0])
    with pytest.raises(ValueError, match="n_shards"):
        shard_of(np.array([1]), 0)


def test_merge_breaks_ties_by_lower_id_and_drops_padding_to_the_end() -> None:
    D_a = np.array([[0.5, 0.5, -np.inf]], dtype=np.float32)
    I_a = np.array([[9, 4, -1]])
    D_b = np.array([[0.7, 0.5, 0.5]], dtype=np.float32)
    I_b = np.array([[3, 6, 2]])
    D, I = merge_top_k([D_a, D_b], [I_a, I_b], 3)
    np.testing.assert_array_equal(I, [[3, 2, 4]])
    np.testing.assert_allclose(D, [[0.7, 0.5, 0.5]])
    D, I = merge_top_k([D_a, D_b], [I_a, I_b], 8)
    np.testing.assert_array_equal(I, [[3, 2, 4, 6, 9, -1, -1, -1]])
    assert np.isneginf(D[0, 5:]).all()


def test_merge_treats_faiss_float_min_padding_as_padding() -> None:
    D_a = np.array([[-3.4e38, -3.4e38]], dtype=np.float32)  # what a raw faiss IP search pads with
    I_a = np.array([[-1, -1]])
    D_b = np.array([[-5.0, -6.0]], dtype=np.float32)
    I_b = np.array([[8, 2]])
    _, I = merge_top_k([D_a, D_b], [I_a, I_b], 3)
    np.testing.assert_array_equal(I, [[8, 2, -1]])


def test_merge_rejects_mismatched_parts() -> None:
    with pytest.raises(ValueError, match="parts"):
        merge_top_k([np.zeros((2, 3))], [np.zeros((2, 3)), np.zeros((2, 3))], 2)
    with pytest.raises(ValueError, match="nq"):
        merge_top_k([np.zeros((2, 3)), np.zeros((1, 3))], [np.zeros((2, 3)), np.zeros((1, 3))], 2)


def test_a_saved_shard_loads_back_with_the_same_answers_and_a_changed_file_is_refused(tmp_path):
    from indexing.embed import index_layout, load_shards

    rng = np.random.default_rng(3)
    shard = FaissShard(8)
    ids = np.arange(1, 301)
    shard.add(ids, rng.standard_normal((300, 8)).astype(np.float32))
    digest = shard.save(str(tmp_path / "s.faiss"))
    xq = rng.standard_normal((4, 8)).astype(np.float32)
    back = FaissShard.load(str(tmp_path / "s.faiss"), digest)
    for a, b in zip(shard.search(xq, 20), back.search(xq, 20)):
        np.testing.assert_array_equal(a, b)
    manifest = {"version": "v1", "shards": [{**shard.stats(), "file": "s.faiss", "sha256": digest}]}
    assert load_shards(tmp_path, manifest)[0].ntotal == 300
    data = bytearray((tmp_path / "s.faiss").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "s.faiss").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_shards(tmp_path, manifest)
    assert index_layout(manifest, "auto", memory_mb=1.0) == "in_process"  # 300 x 8 floats fit
    assert index_layout(manifest, "auto", memory_mb=0.001) == "sharded"
    assert index_layout({"version": "v1", "shards": [shard.stats()]}, "auto", 1.0) == "sharded"  # not persisted
    with pytest.raises(ValueError, match="layout"):
        index_layout(manifest, "nearby", 1.0)


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_sq8", "ivf_pq", "hnsw"])
def test_every_approximate_type_finds_most_of_the_exact_top_k_and_survives_a_save(tmp_path, kind):
    """Seeded clustered vectors (like item vectors: categories are clusters): each type's top 50 against exact
    search, and a saved shard answers the same after loading."""
    from indexing.index_types import IndexSpec, empty_index

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    xb = centres[rng.integers(0, 40, 8000)] + 0.3 * rng.standard_normal((8000, 32)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.integers(0, 8000, 50)] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
    ids = np.arange(1, 8001)
    exact = FaissShard(32)
    exact.add(ids, xb)
    spec = IndexSpec(kind=kind, nlist=64, nprobe=16, pq_m=8, ef_search=100)
    template = faiss.serialize_index(empty_index(spec, 32, xb[:4000])).tobytes() if spec.needs_training else None
    shard = FaissShard(32, spec, template)
    shard.add(ids, xb)
    _, want = exact.search(xq, 50)
    _, got = shard.search(xq, 50)
    recall = np.mean([len(set(g) & set(w)) / 50 for g, w in zip(got, want)])
    assert recall >= (0.6 if kind == "ivf_pq" else 0.9), recall
    digest = shard.save(str(tmp_path / "s.faiss"))
    back = FaissShard.load(str(tmp_path / "s.faiss"), digest, spec)
    np.testing.assert_array_equal(back.search(xq, 50)[1], got)
    assert back.stats()["kind"] == kind and back.ntotal == 8000
    if kind == "hnsw":
        with pytest.raises(ValueError, match="hnsw"):
            back.add(ids[:3], xb[:3])  # the graph cannot replace a vector
        with pytest.raises(ValueError, match="hnsw"):
            back.remove(ids[:3])
    else:
        back.remove(ids[:100])
        assert back.ntotal == 7900 and not np.isin(back.search(xq, 50)[1], ids[:100]).any()
        back.add(ids[:3], xb[:3])  # re-adding replaces, never duplicates
        assert back.ntotal == 7903


def test_tuning_a_built_shard_changes_its_search_knobs_only():
    """Probing every list of an IVF-Flat shard is exact search; probing one finds less; a wider HNSW beam finds at
    least as much; the vectors stay and a bad value is refused."""
    from indexing.index_types import IndexSpec, empty_index

    rng = np.random.default_rng(1)
    xb = rng.standard_normal((3000, 16)).astype(np.float32)
    xq = rng.standard_normal((20, 16)).astype(np.float32)
    ids = np.arange(1, 3001)
    exact = FaissShard(16)
    exact.add(ids, xb)
    _, want = exact.search(xq, 30)

    def recall(shard: FaissShard) -> float:
        return float(np.mean([len(set(g) & set(w)) / 30 for g, w in zip(shard.search(xq, 30)[1], want)]))

    spec = IndexSpec(kind="ivf_flat", nlist=32, nprobe=1)
    ivf = FaissShard(16, spec, faiss.serialize_index(empty_index(spec, 16, xb)).tobytes())
    ivf.add(ids, xb)
    one = recall(ivf)
    ivf.tune(nprobe=32)
    assert ivf.spec.nprobe == 32 and recall(ivf) == 1.0 > one and ivf.ntotal == 3000
    graph = FaissShard(16, IndexSpec(kind="hnsw", hnsw_m=8, ef_construction=20, ef_search=30))
    graph.add(ids, xb)
    narrow = recall(graph)
    graph.tune(ef_search=400)
    assert recall(graph) >= narrow and graph.spec.ef_search == 400
    with pytest.raises(ValueError, match="nprobe"):
        ivf.tune(nprobe=0)


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "hnsw"])
@pytest.mark.parametrize("n_allowed", [60, 6000])
def test_a_filtered_search_returns_only_allowed_items_and_k_of_them_when_k_exist(kind, n_allowed):
    """60 allowed items (fewer than k) are scored directly, all of them returned; 6,000 (above `BRUTE_FORCE_ITEMS`,
    15% of the items) go through the index, where two probed lists or a narrow beam hold fewer than k of them, so
    the search widens until it finds k."""
    from indexing.index_types import IndexSpec, empty_index
    from indexing.shards import BRUTE_FORCE_ITEMS, pack_allowed

    n, k = 40000, 300
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((n, 16)).astype(np.float32)
    ids = np.arange(1, n + 1)
    spec = IndexSpec(kind=kind, nlist=64, nprobe=2, ef_search=40)
    template = faiss.serialize_index(empty_index(spec, 16, xb)).tobytes() if spec.needs_training else None
    shard, exact = FaissShard(16, spec, template), FaissShard(16)
    shard.add(ids, xb)
    exact.add(ids, xb)
    mask = np.zeros(n + 1, dtype=bool)
    mask[rng.choice(ids, n_allowed, replace=False)] = True
    if n_allowed > BRUTE_FORCE_ITEMS and kind == "ivf_flat":
        shard._brute_force = lambda *a: pytest.fail("the widened IVF search should have found k")
    xq = rng.standard_normal((5, 16)).astype(np.float32)
    D, I = shard.search(xq, k, pack_allowed(mask))
    found = min(k, n_allowed)
    assert (I[:, :found] >= 0).all() and mask[I[:, :found]].all() and (I[:, found:] == -1).all()
    brute = np.argsort(-(xq @ xb[mask[1:]].T), axis=1)[:, :found]
    want = ids[mask[1:]][brute]
    recall = np.mean([len(set(a) & set(b)) / found for a, b in zip(I, want)])
    if kind == "flat" or n_allowed < BRUTE_FORCE_ITEMS:
        assert recall == 1.0
    else:  # a filter costs no recall: at least what the same setting finds without one
        unfiltered = np.mean([len(set(a) & set(b)) / k for a, b in zip(shard.search(xq, k)[1], exact.search(xq, k)[1])])
        assert recall >= unfiltered, (recall, unfiltered)
    shard.__dict__.pop("_brute_force", None)  # the spy off: three allowed items are scored directly
    few = np.zeros(n + 1, dtype=bool)
    few[[7, 8, 9]] = True
    _, I = shard.search(xq[:1], 10, pack_allowed(few))
    assert sorted(I[0][I[0] >= 0].tolist()) == [7, 8, 9] and (I[0][3:] == -1).all()


@pytest.fixture
def saved_shard(tmp_path):
    shard = FaissShard(DIM)
    shard.add(*random_items(6, 50))
    path = tmp_path / "shard-0.faiss"
    return path, shard.save(str(path))


@pytest.mark.parametrize("damage", ["one changed byte", "truncated", "emptied"])
def test_a_changed_or_truncated_shard_file_is_refused_naming_it(saved_shard, damage):
    path, digest = saved_shard
    data = bytearray(path.read_bytes())
    if damage == "one changed byte":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[:len(data) // 2] if damage == "truncated" else bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"index shard .*{path.name}: checksum does not match"):
        FaissShard.load(str(path), digest)
    if damage != "one changed byte":  # without a checksum FAISS itself notices a short file
        with pytest.raises(ValueError, match=rf"index shard .*{path.name}: FAISS cannot read it"):
            FaissShard.load(str(path))


def test_a_missing_shard_file_is_refused_naming_it(saved_shard):
    from indexing.embed import load_shards

    path, digest = saved_shard
    path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"index shard .*{path.name}: missing"):
        FaissShard.load(str(path), digest)
    manifest = {"version": "v1", "shards": [{"file": path.name, "sha256": digest, "ntotal": 50}]}
    with pytest.raises(FileNotFoundError, match=rf"index shard .*{path.name}: missing"):
        load_shards(path.parent, manifest)
