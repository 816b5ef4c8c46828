"""Indexing stage: catalog re-embedding on Ray Data, the FAISS shard actors and the index manifests.

Shard search and the fan-out merge (``shards.py``) are plain FAISS/NumPy; only the Ray wrappers touch Ray."""
