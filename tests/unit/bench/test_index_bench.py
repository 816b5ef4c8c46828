"""The index benchmark's parts on small vectors: its list counts, one build swept over search settings, and exact
search as its own reference."""
import numpy as np

from bench.index import build, measure, nlist_for, search_all, structures
from indexing.index_types import IndexSpec


def test_ivf_lists_follow_the_catalog_size():
    assert nlist_for(50_000) == 512 and nlist_for(1_000_000) == 2048 and nlist_for(10) == 16
    kinds = [spec.kind for spec, _ in structures(1_000_000, ("hnsw",))]
    assert kinds == ["flat", "hnsw"]  # exact search is always the reference
    ivf = dict((s.kind, s) for s, _ in structures(1_000_000))["ivf_flat"]
    assert ivf.nlist == 2048 and ivf.train_size == 64 * 2048


def test_one_build_serves_its_whole_sweep_and_probing_every_list_is_exact():
    rng = np.random.default_rng(0)
    V = rng.standard_normal((2001, 16)).astype(np.float32)  # row 0 is the padding item
    xq = rng.standard_normal((12, 16)).astype(np.float32)
    truth = search_all(build(IndexSpec("flat"), V, 3)[0], xq, 20)
    spec = IndexSpec("ivf_flat", nlist=16, train_size=2000)
    rows = measure(spec, [{"nprobe": 1}, {"nprobe": 16}], V, xq, truth, 20, 3, 10, {}, lambda i: xq[i:i + 1], 1)
    assert [r["spec"]["nprobe"] for r in rows] == [1, 16]
    assert rows[1]["recall@20"] == 1.0 > rows[0]["recall@20"]
    assert rows[0]["build_s"] == rows[1]["build_s"]  # built once
    assert all(r["retrieval_stage"]["p99_ms"] > 0 and r["memory_mb"] > 0 for r in rows)
