"""A version's real deployments over a tiny shop's untrained bundle, wired for Serve's local testing mode: the
shared builder of the local-mode tests (`test_ingress_local.py`, `test_items_local.py`)."""
from __future__ import annotations

import hashlib

import numpy as np
from ray import serve

from deployments.calls import LocalCalls
from deployments.ingress.admin import SteeringRegistry
from deployments.ingress.routes import Ingress
from deployments.ranking import Ranking
from deployments.retrieval import Retrieval
from deployments.store import RecentActions, local_store
from deployments.version import Version
from indexing.embed import IndexConfig, write_index_manifest
from indexing.shards import FaissShard, shard_of
from tests.unit.tiny_bundle import write_tiny_bundle
from training.fit.bundle import load_bundle
from training.fit.offline_metrics import item_vectors

TOKEN = "local-admin-token"


def build(tmp_path_factory, changes: str = "") -> dict:
    """A tiny shop's bundle (untrained seed two-tower and ranker), its index in two in-process shards, the store
    seeded with the shop's events, and the ingress wired to them; `serve.run` in local testing mode. `changes`: the
    catalog change log the stages follow ("" none)."""
    shop, path = write_tiny_bundle(tmp_path_factory.mktemp("bundle"))
    bundle = load_bundle(path)
    V = item_vectors(bundle.two_tower())
    ids = np.arange(1, bundle.space.n_items + 1)
    shards = [FaissShard(V.shape[1]) for _ in range(2)]
    for s, shard in enumerate(shards):
        mine = ids[shard_of(ids, 2) == s]
        shard.add(mine, V[mine])
    write_index_manifest(path, "v1", V.shape[1], [s.stats() for s in shards], 0.0, IndexConfig())
    state = RecentActions()
    state.load_events(shop.events)
    retrieval = Retrieval.bind(str(path), 1, shards=[LocalCalls(s) for s in shards], changes=changes)
    # @serve.batch needs a real replica: local mode scores one by one
    ranking = Ranking.bind(str(path), 1, False, changes=changes)
    version = Version.bind(retrieval, ranking, str(path), "v1", changes)
    user_config = {"versions": {"v1": 100}, "policy": {}, "candidates": 200,
                   "admin_token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}
    app = Ingress.options(user_config=user_config).bind(
        local_store(state), SteeringRegistry(), {"v1": {"retrieval": retrieval, "ranking": ranking, "version": version}},
        routing_registry=SteeringRegistry())
    handle = serve.run(app, _local_testing_mode=True)
    engaged = [u for u in shop.events.column("user_id").to_pylist()[:200] if state.get(u)["items"]]
    return {"handle": handle, "shop": shop, "user": engaged[0], "shards": shards, "bundle": str(path), "state": state}
