"""FAISS shard search and the fan-out merge, free of Ray.

Item ``i`` lives on shard ``i % n_shards`` (``shard_of``); a query asks every shard for its top k and
``merge_top_k`` keeps the k best overall, which equals one exact search over the whole catalog because every item's
exact score is computed on exactly one shard (the faiss ``contrib`` client/server pattern, with one merge).
The Ray actor that serves a ``FaissShard`` lives elsewhere in ``indexing/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexing.index_types import IndexSpec, empty_index, search_params, stored_ids

_NO_ID = -1  # faiss's id for "no result"
# A filter that admits at most this many of a shard's items is answered by scoring them directly: on 250k IVF-Flat
# vectors (2048 lists) that took 0.24 ms for ~75 allowed items against 1.1 ms through the index, and broke even near
# 7,500; above it the index walk wins (500k allowed: 8 ms against 29 ms).
BRUTE_FORCE_ITEMS = 5000


class FaissShard:
    """One shard of an item index: inner-product search over (id, vector) pairs. Exact by default (faiss
    ``IndexIDMap2(IndexFlatIP)``); any type of `indexing.index_types` when built from an `IndexSpec` and, for the IVF
    types, a trained empty index that every shard of a version shares (`empty_index`)."""

    def __init__(self, dim: int, spec: IndexSpec = IndexSpec(), template: bytes | None = None) -> None:
        """Args:
            spec: the index type and its knobs. template: `faiss.serialize_index` of the trained empty index the
                IVF types start from (the flat and HNSW types need none).
        """
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim, self.spec = int(dim), spec
        if template is not None:
            self.index = faiss.deserialize_index(np.frombuffer(template, dtype=np.uint8))
        else:
            self.index = empty_index(spec, self.dim)
        search_params(self.index, spec)
        self._present = np.zeros(0, dtype=bool)  # ids held, so HNSW (which cannot remove) adds new ids only
        self._packed: np.ndarray | None = None  # `_present` as a bitmap, rebuilt after a change, for filter counts
        self._memory = (-1, 0)  # (ntotal, serialized bytes) of the last stats()
        self.changes_offset = 0  # the catalog change log's offset this shard's vectors reflect (indexing.live)

    def tune(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Changes the search-time knobs of the built shard (IVF lists probed, HNSW beam width); its vectors stay, so
        one build serves a whole sweep of settings."""
        knobs = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
        self.spec = dataclasses.replace(self.spec, **knobs)  # IndexSpec validates the values
        search_params(self.index, self.spec)

    def _check_vectors(self, x: np.ndarray, name: str) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise ValueError(f"{name} must be a float32 numpy array, got {getattr(x, 'dtype', type(x))}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (n, {self.dim}), got {x.shape}")
        return np.ascontiguousarray(x)

    def add(self, ids: np.ndarray, xb: np.ndarray) -> int:
        """Adds or replaces vectors.

        Args:
            ids: (n,) non-negative integer ids, unique within the call; an id already stored is replaced.
            xb: (n, dim) float32 vectors.

        Returns:
            ntotal after the add.
        """
        xb = self._check_vectors(xb, "xb")
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 1:
            raise ValueError(f"ids must be a 1-D integer array, got dtype {ids.dtype} and shape {ids.shape}")
        if len(ids) != len(xb):
            raise ValueError(f"ids and xb differ in length: {len(ids)} vs {len(xb)}")
        ids = ids.astype(np.int64)
        if ids.size and ids.min() < 0:
            raise ValueError(f"ids must be >= 0 (-1 means 'no result'), got {ids.min()}")
        if np.unique(ids).size != ids.size:
            raise ValueError("ids must be unique within one add call")
        if ids.size:
            if self.spec.kind == "hnsw":
                if self._holds(ids).any():
                    raise ValueError("an hnsw shard cannot replace stored vectors (the graph has no removal); "
                                     "rebuild the index or use flat or an ivf type")
            elif self._holds(ids).any():  # replace semantics: the index would otherwise keep both copies
                self.remove(ids[self._holds(ids)])
            self.index.add_with_ids(xb, ids)
            self._mark(ids, True)
        return self.ntotal

    def apply_changes(self, changes: Any) -> tuple[bool, int]:
        """Applies an `indexing.live.ShardChanges` that starts at or before this shard's offset and ends after it;
        one already applied is a no-op. Returns (taken, the shard's offset): False when the change set starts
        after it (the changes between are missing: the caller sends a catch-up from the offset returned)."""
        if changes.offset <= self.changes_offset:
            return True, self.changes_offset
        if changes.after > self.changes_offset:
            return False, self.changes_offset
        if len(changes.removed):
            self.remove(changes.removed)
        if len(changes.ids):
            self.add(changes.ids, np.ascontiguousarray(changes.vectors, dtype=np.float32))
        self.changes_offset = changes.offset
        return True, self.changes_offset

    def _holds(self, ids: np.ndarray) -> np.ndarray:
        if len(self._present) == 0:
            return np.zeros(len(ids), dtype=bool)
        inside = ids < len(self._present)
        return inside & self._present[np.where(inside, ids, 0)]

    def _mark(self, ids: np.ndarray, value: bool) -> None:
        if ids.size and ids.max() >= len(self._present):
            grown = np.zeros(max(int(ids.max()) + 1, 2 * len(self._present)), dtype=bool)
            grown[:len(self._present)] = self._present
            self._present = grown
        self._present[ids] = value
        self._packed = None

    def remove(self, ids: np.ndarray) -> int:
        """Removes the given ids (absent ids are ignored) and returns how many were removed."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if ids.size == 0:
            return 0
        if self.spec.kind == "hnsw":
            raise ValueError("an hnsw shard cannot remove vectors; rebuild the index or use flat or an ivf type")
        # IVF's hash-table direct map removes by an explicit id array; IDMap2 tests membership, which a batch (hash
        # set) answers in O(1) where an array would scan.
        selector = faiss.IDSelectorArray(ids.size, faiss.swig_ptr(ids)) if self.spec.needs_training \
            else faiss.IDSelectorBatch(ids)
        removed = int(self.index.remove_ids(selector))
        self._mark(ids[ids >= 0], False)
        return removed

    def search(self, xq: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product (exact for the flat type, approximate for the others).

        Args:
            xq: (nq, dim) float32 queries.
            k: results per query (>= 1).
            allowed: a filter applied inside the search, `pack_allowed` of a bool mask over ids; None admits every
                id. A filter that admits few of the shard's items (`BRUTE_FORCE_ITEMS`) scores them directly;
                an approximate type that finds fewer than k allowed items searches again wider (4x the IVF lists
                until all, a 4k-wide HNSW beam) and then scores directly, so a filter still yields k results when k
                exist.

        Returns:
            D (nq, k) float32 inner products, larger is better, and I (nq, k) int64 ids, best first; when the shard
            holds fewer than k vectors the rest is padded with (-inf, -1).
        """
        xq = self._check_vectors(xq, "xq")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        nq = xq.shape[0]
        if self.ntotal == 0 or nq == 0:
            return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), _NO_ID, dtype=np.int64)
        if allowed is None:
            D, I = self.index.search(xq, k)  # (nq, k) each
        else:
            D, I = self._filtered(xq, k, allowed)
        D[I == _NO_ID] = -np.inf  # faiss pads inner-product results with -FLT_MAX; -inf can never win a merge
        return D.astype(np.float32, copy=False), I.astype(np.int64, copy=False)

    def _filtered(self, xq: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bitmap = np.ascontiguousarray(allowed, dtype=np.uint8)
        if self._allowed_held(bitmap) <= BRUTE_FORCE_ITEMS:  # a selective filter: score its few items directly
            return self._brute_force(xq, k, bitmap)
        selector = faiss.IDSelectorBitmap(len(bitmap) * 8, faiss.swig_ptr(bitmap))
        D, I = self.index.search(xq, k, params=self._params(selector, k, 1))
        width = 1
        while self.spec.kind != "flat" and (I == _NO_ID).any() and self._widens(width):
            width *= 4  # the beam or the probed lists held too few allowed items: 4x as many, not all at once
            D, I = self.index.search(xq, k, params=self._params(selector, k, width))
        if self.spec.kind != "flat" and (I == _NO_ID).any():  # every list probed, the widest beam: score directly
            D, I = self._brute_force(xq, k, bitmap)
        return D, I

    def _allowed_held(self, bitmap: np.ndarray) -> int:
        """How many of the ids this shard holds the filter bitmap admits."""
        if self._packed is None:
            self._packed = np.packbits(self._present, bitorder="little")
        m = min(len(bitmap), len(self._packed))
        return int(np.bitwise_count(bitmap[:m] & self._packed[:m]).sum())

    def _widens(self, width: int) -> bool:
        """Whether a search `width` times as wide as the spec's still visits more than the last one."""
        if self.spec.needs_training:
            return self.spec.nprobe * width < faiss.extract_index_ivf(self.index).nlist
        return width == 1  # HNSW: one wider beam (4k), then direct scoring

    def _brute_force(self, xq: np.ndarray, k: int, bitmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over the allowed items this shard holds, scored from their stored (possibly compressed) vectors."""
        bits = np.unpackbits(bitmap, bitorder="little")[:len(self._present)].astype(bool)
        ids = np.flatnonzero(bits & self._present[:len(bits)]).astype(np.int64)
        D = np.full((len(xq), k), -np.inf, dtype=np.float32)
        I = np.full((len(xq), k), _NO_ID, dtype=np.int64)
        if ids.size:
            scores = xq @ self.index.reconstruct_batch(ids).T  # (nq, m)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            D[:, :top.shape[1]] = np.take_along_axis(scores, top, axis=1)
            I[:, :top.shape[1]] = ids[top]
        return D, I

    def _params(self, selector: faiss.IDSelector, k: int, width: int) -> faiss.SearchParameters:
        spec = self.spec
        if spec.needs_training:
            nlist = faiss.extract_index_ivf(self.index).nlist
            return faiss.SearchParametersIVF(sel=selector, nprobe=min(nlist, spec.nprobe * width))
        if spec.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=max(spec.ef_search, 4 * k) if width > 1
                                              else spec.ef_search)
        return faiss.SearchParameters(sel=selector)

    def save(self, path: str) -> str:
        """Writes the index (vectors and ids) to `path`; returns the file's sha256."""
        faiss.write_index(self.index, str(path))
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    @classmethod
    def load(cls, path: str, sha256: str | None = None, spec: IndexSpec = IndexSpec()) -> "FaissShard":
        """A shard read back from `save` (built from `spec`); with `sha256`, a file that does not match is refused.

        Raises:
            FileNotFoundError: no file at `path`.
            ValueError: the file does not match `sha256`, or FAISS cannot read it (truncated or corrupt).
        """
        if not Path(path).is_file():
            raise FileNotFoundError(f"index shard {path}: missing; run `recsys index` for its bundle")
        data = Path(path).read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"index shard {path}: checksum does not match the index manifest; the file was "
                             "modified or truncated")
        try:
            d = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)).d
        except RuntimeError as exc:  # faiss's read error, e.g. a file cut short
            raise ValueError(f"index shard {path}: FAISS cannot read it (truncated or corrupt?): {exc}") from exc
        shard = cls(d, spec, data)
        shard._mark(stored_ids(shard.index), True)
        return shard

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        return int(self.index.ntotal)

    def stats(self) -> dict:
        """``{"ntotal", "dim", "kind", "memory_bytes"}``; memory is the size of the index as FAISS serializes it
        (codes, ids, quantizers, graph), read from the index itself."""
        if self._memory[0] != self.ntotal:  # serializing costs a copy of the index: only after it changed
            self._memory = (self.ntotal, int(faiss.serialize_index(self.index).size))
        return {"ntotal": self.ntotal, "dim": self.dim, "kind": self.spec.kind, "memory_bytes": self._memory[1],
                "changes_offset": self.changes_offset}


def pack_allowed(mask: np.ndarray) -> np.ndarray:
    """A bool mask over ids (mask[i] admits id i) as the bitmap FAISS's `IDSelectorBitmap` reads: bit i & 7 of byte
    i >> 3. One bit per item: 125 KB for a million items, sent once per request to each shard."""
    return np.packbits(np.asarray(mask, dtype=bool), bitorder="little")


def shard_of(ids: np.ndarray, n_shards: int) -> np.ndarray:
    """(n,) int64 shard number of each id: ``ids % n_shards``."""
    if isinstance(n_shards, bool) or not isinstance(n_shards, (int, np.integer)) or n_shards < 1:
        raise ValueError(f"n_shards must be a positive int, got {n_shards!r}")
    return np.asarray(ids, dtype=np.int64) % n_shards


def merge_top_k(D_parts: Sequence[np.ndarray], I_parts: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merges per-shard results into the k best per query.

    Args:
        D_parts: per shard, (nq, k_i) scores, larger is better.
        I_parts: per shard, (nq, k_i) int ids; -1 marks padding.
        k: results to keep per query.

    Returns:
        D (nq, k) float32 and I (nq, k) int64, best first; equal scores are ordered by lower id so the result is
        deterministic; padding (-inf, -1) goes to the end, also when fewer than k results exist.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(D_parts) == 0 or len(D_parts) != len(I_parts):
        raise ValueError(f"need one or more parts, as many D as I: got {len(D_parts)} D and {len(I_parts)} I")
    shapes = [(np.shape(d), np.shape(i)) for d, i in zip(D_parts, I_parts)]
    nq = shapes[0][0][0] if len(shapes[0][0]) == 2 else -1
    if any(len(sd) != 2 or sd != si or sd[0] != nq for sd, si in shapes):
        raise ValueError(f"every part must be (nq, k_i) with matching D and I shapes, got {shapes}")
    D = np.concatenate([np.asarray(d, dtype=np.float32) for d in D_parts], axis=1)  # (nq, K)
    I = np.concatenate([np.asarray(i, dtype=np.int64) for i in I_parts], axis=1)  # (nq, K)
    pad = I < 0
    D[pad] = -np.inf
    # Tie-break key: padding sorts after every real id.
    tie = np.where(pad, np.iinfo(np.int64).max, I)
    K = D.shape[1]
    if K > k:
        # Partition finds the k-th best score t per row; everything strictly above t is in, and the remaining
        # slots go to the lowest ids scoring exactly t, which keeps the cut deterministic under ties.
        t = -np.partition(-D, k - 1, axis=1)[:, k - 1 : k]  # (nq, 1)
        above = D > t
        key = np.where(above, np.iinfo(np.int64).min, np.where(D == t, tie, np.iinfo(np.int64).max))
        sel = np.argpartition(key, k - 1, axis=1)[:, :k]  # (nq, k)
        D, I, tie = (np.take_along_axis(a, sel, axis=1) for a in (D, I, tie))
    order = np.lexsort((tie, -D), axis=1)  # score desc, then lower id
    D, I = np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)
    if K < k:
        D = np.concatenate([D, np.full((D.shape[0], k - K), -np.inf, dtype=np.float32)], axis=1)
        I = np.concatenate([I, np.full((I.shape[0], k - K), _NO_ID, dtype=np.int64)], axis=1)
    return D, I
