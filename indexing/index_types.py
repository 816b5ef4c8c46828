"""FAISS index types a version's shards can use, with their parameters: exact inner product, IVF with flat or
compressed codes (SQ8, PQ), and HNSW. Plain FAISS; `IndexSpec` is the config, `empty_index` builds a (trained,
empty) index every shard of a version starts from, `search_params` sets the recall/speed knobs at search time.

Every approximate type is measured against exact search on the same vectors by `recsys bench index`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import faiss
import numpy as np

KINDS = ("flat", "ivf_flat", "ivf_sq8", "ivf_pq", "hnsw")


@dataclass(frozen=True)
class IndexSpec:
    kind: str = "flat"  # exact by default: 50k items x 64 dims search in ~1 ms, nothing to tune
    # IVF: sqrt(n) to 4 sqrt(n) lists is FAISS's rule of thumb; 1024 suits 100k-1M items per version
    nlist: int = 1024
    nprobe: int = 32  # lists visited per query: the recall knob of every IVF type
    pq_m: int = 16  # PQ sub-quantizers (64 dims / 16 = 4 dims each, 8 bits): 16 bytes per vector instead of 256
    hnsw_m: int = 32  # graph degree; FAISS's default range 16-64
    ef_construction: int = 80
    ef_search: int = 128  # candidates kept while searching: the recall knob of HNSW (must be >= k for full lists)
    train_size: int = 100_000  # vectors the IVF quantizers learn from (a sample of the catalog)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {list(KINDS)}, got {self.kind!r}")
        for name in ("nlist", "nprobe", "pq_m", "hnsw_m", "ef_construction", "ef_search", "train_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"index {name} must be a positive integer, got {value!r}")

    @property
    def needs_training(self) -> bool:
        return self.kind.startswith("ivf")

    def describe(self) -> str:
        return {"flat": "exact inner product (faiss IndexFlatIP)",
                "ivf_flat": f"IVF{self.nlist},Flat nprobe={self.nprobe}",
                "ivf_sq8": f"IVF{self.nlist},SQ8 nprobe={self.nprobe}",
                "ivf_pq": f"IVF{self.nlist},PQ{self.pq_m} nprobe={self.nprobe}",
                "hnsw": f"HNSW{self.hnsw_m} efConstruction={self.ef_construction} efSearch={self.ef_search}",
                }[self.kind]

    def to_dict(self) -> dict:
        return asdict(self)


def empty_index(spec: IndexSpec, dim: int, sample: np.ndarray | None = None) -> faiss.Index:
    """An empty index of the spec's type that stores ids; IVF types are trained on `sample` (n, dim) first.

    Flat and HNSW sit in `IndexIDMap2` (ids kept beside the vectors); IVF indexes store ids themselves and get a
    hash-table direct map, so removing or replacing an id does not scan every list.
    """
    metric = faiss.METRIC_INNER_PRODUCT
    if spec.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if spec.kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, spec.hnsw_m, metric)
        graph.hnsw.efConstruction = spec.ef_construction
        return faiss.IndexIDMap2(graph)
    code = {"ivf_flat": "Flat", "ivf_sq8": "SQ8", "ivf_pq": f"PQ{spec.pq_m}"}[spec.kind]
    if sample is None or len(sample) == 0:
        raise ValueError(f"index kind {spec.kind} needs a training sample of vectors")
    nlist = min(spec.nlist, max(1, len(sample) // 39))  # FAISS wants >= 39 training points per list
    index = faiss.index_factory(dim, f"IVF{nlist},{code}", metric)
    if spec.kind == "ivf_pq":
        # Polysemous training reorders the PQ codes for Hamming-distance filtering, which only a search with
        # polysemous_ht set uses; it was 95% of the PQ build time here (9.7 s of 10 for 4,000 vectors).
        faiss.downcast_index(index).do_polysemous_training = False
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    faiss.extract_index_ivf(index).set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def search_params(index: faiss.Index, spec: IndexSpec) -> None:
    """Sets the search-time knobs of an index built from `spec` (nprobe for IVF, efSearch for HNSW)."""
    if spec.needs_training:
        faiss.extract_index_ivf(index).nprobe = spec.nprobe
    elif spec.kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = spec.ef_search


def stored_ids(index: faiss.Index) -> np.ndarray:
    """(n,) int64 ids an index holds (IDMap2 keeps them in `id_map`, IVF in its inverted lists)."""
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    invlists = faiss.extract_index_ivf(index).invlists
    parts = [faiss.rev_swig_ptr(invlists.get_ids(l), invlists.list_size(l)).copy()
             for l in range(invlists.nlist) if invlists.list_size(l)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
