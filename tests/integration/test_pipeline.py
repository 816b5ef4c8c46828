"""The tiny pipeline end to end on one local Ray: bundles, index shards, real HTTP requests against Serve."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import ray

pytestmark = pytest.mark.integration


def post(stack, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{stack['url']}{path}", json=body, timeout=60.0)


def known_users(stack, n: int) -> list[str]:
    from training.data.schemas import read_shop

    return read_shop(stack["shop"]).users.column("user_id").to_pylist()[:n]


def engaged_user(stack) -> str:
    """A user with at least one engagement (click or deeper) in the shop's history."""
    from training.data.schemas import read_shop

    events = read_shop(stack["shop"]).events.to_pandas()
    return str(events.loc[events["action"] != "view", "user_id"].iloc[0])


def test_bundle_is_sealed_with_checksums_metrics_and_snapshot(tiny_stack):
    from training.fit.bundle import load_bundle, sha256_of

    bundle = load_bundle(tiny_stack["bundles"]["v1"])
    assert bundle.manifest["data_snapshot"]
    for name, digest in bundle.manifest["files"].items():
        assert sha256_of(bundle.path / name) == digest
    retrieval = bundle.metrics["retrieval"]
    assert set(retrieval) == {"two_tower", "popularity"}
    assert retrieval["two_tower"]["users"] == retrieval["popularity"]["users"] > 0
    assert set(bundle.metrics["ranking"]) == {"click", "wishlist", "add_to_cart", "purchase"}
    assert len(bundle.metrics["training"]["retrieval"]) >= 1 and bundle.metrics["retrieval_model"] == "two_tower"
    assert load_bundle(tiny_stack["bundles"]["v2"]).metrics["retrieval_model"] == "multi_interest"


def test_shard_fan_out_and_merge_equals_one_exact_index_over_the_catalog(tiny_stack):
    from indexing.embed import get_shards, read_index_manifest
    from indexing.shards import merge_top_k
    from training.fit.bundle import load_bundle
    from training.fit.offline_metrics import item_vectors

    path = tiny_stack["bundles"]["v2"]
    manifest = read_index_manifest(path)
    shards = get_shards(manifest)
    assert sum(s["ntotal"] for s in manifest["shards"]) == manifest["n_items"] == 2000
    assert set(manifest["phases"]) == {"quantizer_training_s", "embed_and_insert_s", "persist_s"}
    V = item_vectors(load_bundle(path).two_tower())[1:]  # (n_items, D), row i = item index i + 1
    xq = np.random.default_rng(0).standard_normal((5, V.shape[1])).astype(np.float32)
    parts = ray.get([s.search.remote(xq, 50) for s in shards])
    D, I = merge_top_k([p[0] for p in parts], [p[1] for p in parts], 50)
    exact = np.argsort(-(xq @ V.T), axis=1)[:, :50] + 1
    np.testing.assert_array_equal(I, exact)
    np.testing.assert_allclose(D, np.take_along_axis(xq @ V.T, exact - 1, axis=1), rtol=1e-4, atol=1e-5)


def test_recommend_answers_with_items_version_and_stage_timings(tiny_stack):
    user = engaged_user(tiny_stack)
    r = post(tiny_stack, "/recommend", {"user_id": user, "k": 20,
                                        "context": {"country": "DE", "device": "app", "page": "home"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_id"] == user and body["version"] in {"v1", "v2"} and body["cold_start"] is False
    assert len(body["items"]) == 20 and len({i["item_id"] for i in body["items"]}) == 20
    assert all(i["brand"].startswith("b") and i["category"].startswith("c") and i["reason"] for i in body["items"])
    assert {"retrieval", "ranking", "policy", "total"} <= set(body["timings_ms"])
    brands = [i["brand"] for i in body["items"]]
    assert all(a != b for a, b in zip(brands, brands[1:])), brands  # no two consecutive items of one brand


def test_version_split_is_sticky_per_user_and_follows_the_weights(tiny_stack):
    from cluster.serving import live_routing_table
    from deployments.ingress.routing import choose_version, decode_table

    table = decode_table(live_routing_table())
    assert table.count("v2") == 100  # weights 90/10 of 1000 buckets
    users = known_users(tiny_stack, 100)
    first = {u: post(tiny_stack, "/recommend", {"user_id": u, "k": 1}).json()["version"] for u in users}
    assert first == {u: choose_version(u, table) for u in users}  # each user served by the owner of their bucket
    assert {"v1", "v2"} <= set(first.values())
    again = {u: post(tiny_stack, "/recommend", {"user_id": u, "k": 1}).json()["version"] for u in users[:30]}
    assert all(first[u] == again[u] for u in again)


def test_forced_version_is_served_and_an_unknown_one_is_refused(tiny_stack):
    user = known_users(tiny_stack, 1)[0]
    assert post(tiny_stack, "/recommend", {"user_id": user, "version": "v2"}).json()["version"] == "v2"
    r = post(tiny_stack, "/recommend", {"user_id": user, "version": "v9"})
    assert r.status_code == 404 and "v9" in r.text


def test_unknown_user_gets_a_marked_cold_start_answer(tiny_stack):
    body = post(tiny_stack, "/recommend", {"user_id": "never-seen-before", "k": 30}).json()
    assert body["cold_start"] is True
    reasons = {i["reason"] for i in body["items"]}
    assert {"cold_start:popular", "cold_start:new"} <= reasons


def test_posted_events_are_visible_to_the_next_recommend(tiny_stack):
    user = "fresh-shopper"
    assert post(tiny_stack, "/recommend", {"user_id": user}).json()["cold_start"] is True
    from training.data.schemas import read_shop

    catalog = read_shop(tiny_stack["shop"]).catalog.column("item_id").to_pylist()
    events = [{"user_id": user, "item_id": catalog[i], "action": "click"} for i in range(5)]
    assert post(tiny_stack, "/events", {"events": events}).json() == {"accepted": 5, "durable": False}
    body = post(tiny_stack, "/recommend", {"user_id": user, "k": 50, "version": "v1"}).json()
    assert body["cold_start"] is False
    top = body["items"][0]["item_id"]
    post(tiny_stack, "/events", {"events": [{"user_id": user, "item_id": top, "action": "purchase"}]})
    after = post(tiny_stack, "/recommend", {"user_id": user, "k": 50, "version": "v1"}).json()
    ids = [i["item_id"] for i in after["items"]]
    assert top not in ids[:10]  # bought in the last 60 days: sorted down
    if top in ids:
        assert after["items"][ids.index(top)]["reason"] == "policy:bought_down_sort"


def test_the_user_tower_follows_events_posted_a_moment_ago(tiny_stack):
    """The user vector is computed at request time from the online store: clicks on a second category move the
    answer towards it (no policy rule involved: no page preset, diversity off)."""
    from training.data.schemas import read_shop

    catalog = read_shop(tiny_stack["shop"]).catalog.select(["item_id", "category"]).to_pandas()
    first, second = catalog["category"].value_counts().index[:2]
    user = "tower-shopper"

    def click(category: str, n: int) -> None:
        items = catalog.loc[catalog["category"] == category, "item_id"].iloc[:n]
        post(tiny_stack, "/events", {"events": [{"user_id": user, "item_id": i, "action": "click"} for i in items]})

    def share_of(category: str) -> float:
        body = post(tiny_stack, "/recommend", {"user_id": user, "k": 100, "version": "v1",
                                                "policy": {"brand_diversity": False}}).json()
        assert body["cold_start"] is False
        return float(np.mean([item["category"] == category for item in body["items"]]))

    click(first, 10)
    before = share_of(second)
    click(second, 10)
    assert share_of(second) > before


@pytest.mark.parametrize("body, field", [
    ({"user_id": "u1", "k": 0}, "k"),
    ({"user_id": "u1", "k": 501}, "k"),
    ({"k": 5}, "user_id"),
    ({"user_id": "", "k": 5}, "user_id"),
    ({"user_id": "u1", "context": {"colour": "red"}}, "colour"),
    ({"user_id": "u1", "policy": {"max_brand_run": 0}}, "max_brand_run"),
    ({"user_id": "u1", "policy": {"no_such_rule": True}}, "no_such_rule"),
])
def test_bad_recommend_bodies_get_a_422_naming_the_field(tiny_stack, body, field):
    r = post(tiny_stack, "/recommend", body)
    assert r.status_code == 422, r.text
    assert field in json.dumps(r.json()["detail"])


def test_bad_events_get_a_422_naming_the_field(tiny_stack):
    r = post(tiny_stack, "/events", {"events": [{"user_id": "u1", "item_id": "i1", "action": "teleport"}]})
    assert r.status_code == 422 and "action" in json.dumps(r.json()["detail"])
    r = httpx.post(f"{tiny_stack['url']}/recommend", content=b"{not json", timeout=30.0,
                   headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_health_and_versions_report_every_live_version(tiny_stack):
    from training.fit.offline_metrics import best_order

    assert httpx.get(f"{tiny_stack['url']}/healthz", timeout=30).status_code == 200
    versions = httpx.get(f"{tiny_stack['url']}/versions", timeout=30).json()["versions"]
    assert {v["version"]: v["weight"] for v in versions} == {"v1": 90.0, "v2": 10.0}
    assert all(v["index"]["n_items"] == 2000 for v in versions)
    for v in versions:  # which order each serves, and the offline figures that decided it
        order = v["order"]
        assert order["serve"] in ("ranker", "fused", "retrieval") and order["users"] > 0
        assert order["serve"] == best_order({o: order[f"{o}_ndcg@10"] for o in ("ranker", "fused", "retrieval")})


def test_weights_change_live_without_failed_requests(tiny_stack):
    from cluster.serving import deploy_ingress, live_routing_table
    from deployments.ingress.routing import choose_version, decode_table

    cfg, users = tiny_stack["cfg"], known_users(tiny_stack, 60)
    table = decode_table(live_routing_table())
    assert (table.count("v1"), table.count("v2")) == (900, 100)
    served = {u: post(tiny_stack, "/recommend", {"user_id": u, "k": 3}).json()["version"] for u in users}
    assert served == {u: choose_version(u, table) for u in users}  # the live table is the one requests follow
    try:
        deploy_ingress({"v1": 0.0, "v2": 100.0}, cfg.policy.to_dict(), cfg.serving)
        answers = [post(tiny_stack, "/recommend", {"user_id": u, "k": 3}) for u in users]
        assert all(a.status_code == 200 for a in answers)
        assert {a.json()["version"] for a in answers} == {"v2"}
    finally:
        deploy_ingress({"v1": 90.0, "v2": 10.0}, cfg.policy.to_dict(), cfg.serving)


def test_in_process_and_sharded_index_layouts_give_the_same_candidates(tiny_stack):
    """The live versions hold their small index in process (layout auto); a Retrieval deployment of the same bundle
    that fans out to the shard actors instead returns the same candidates, for the seed and the multi-interest
    model alike."""
    from ray import serve

    from deployments.retrieval import Retrieval
    from deployments.store import STORE_NAME
    from training import NAMESPACE
    from training.data.schemas import read_shop
    from training.request.contracts import RetrievalRequest

    events = read_shop(tiny_stack["shop"]).events.to_pandas()
    users = events.loc[events["action"] != "view", "user_id"].drop_duplicates().iloc[:8].tolist()
    store = ray.get_actor(STORE_NAME, namespace=NAMESPACE)
    states = ray.get([store.get.remote(u) for u in users])
    context = {"country": None, "device": None, "page": "category", "category": "c1", "query": None}
    for version, path in tiny_stack["bundles"].items():
        live = serve.get_deployment_handle("Retrieval", f"recsys-{version}")
        assert live.health.remote().result(timeout_s=60)["layout"] == "in_process"
        name = f"layout-check-{version}"
        app = Retrieval.options(name=name, num_replicas=1, autoscaling_config=None,
                                ray_actor_options={"num_cpus": 0.05}).bind(str(path), 1, "sharded")
        sharded = serve.run(app, name=name, route_prefix=None)
        try:
            assert sharded.health.remote().result(timeout_s=60)["layout"] == "sharded"
            for state in states:
                req = RetrievalRequest(state, context, 100)
                a = live.retrieve.remote(req).result(timeout_s=60)
                b = sharded.retrieve.remote(req).result(timeout_s=60)
                assert a.item_idx.tolist() == b.item_idx.tolist() and a.reasons == b.reasons
                np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
        finally:
            serve.delete(name)


def test_catalog_changes_reach_both_layouts_and_a_restarted_shard_actor_without_a_rebuild(tiny_stack):
    """A new item written to the change log is found, within a bound, by a filtered search of the live version (its
    index in process) and of a sharded Retrieval (on the shard actors); a shard actor killed afterwards restarts from
    its file without the item and is caught up by the sharded replica at the next change."""
    import time

    from ray import serve

    from deployments.app import change_log_spec
    from deployments.retrieval import Retrieval
    from deployments.store import STORE_NAME
    from indexing.changes import open_change_log
    from indexing.embed import get_shards, read_index_manifest
    from indexing.shards import shard_of
    from training import NAMESPACE
    from training.data.changes import ItemChange
    from training.data.schemas import read_shop
    from training.request.contracts import ItemFilter, RetrievalRequest

    path = tiny_stack["bundles"]["v1"]
    spec = change_log_spec(tiny_stack["cfg"].serving, path)
    log = open_change_log(spec)
    events = read_shop(tiny_stack["shop"]).events.to_pandas()
    user = events.loc[events["action"] != "view", "user_id"].iloc[0]
    state = ray.get(ray.get_actor(STORE_NAME, namespace=NAMESPACE).get.remote(user))
    aimed = RetrievalRequest(state, {}, 10, ItemFilter(categories=("cat-it",)))
    live = serve.get_deployment_handle("Retrieval", "recsys-v1")
    name = "changes-check-v1"
    sharded = serve.run(Retrieval.options(name=name, num_replicas=1, autoscaling_config=None,
                                          ray_actor_options={"num_cpus": 0.05}).bind(str(path), 1, "sharded",
                                                                                     changes=spec),
                        name=name, route_prefix=None)

    def applied(handle, offset: int) -> dict:
        end = time.monotonic() + 60
        while True:
            h = handle.health.remote().result(timeout_s=60)
            # the replica's follower moves first, then it sends the shard changes: wait for the shards too
            if h["changes"]["offset"] >= offset and min(h["shard_changes_offsets"]) >= offset:
                return h
            assert time.monotonic() < end, f"offset {offset} not applied in 60 s: {h}"
            time.sleep(0.2)

    try:
        n = sharded.health.remote().result(timeout_s=60)["items"]
        offset = log.append([ItemChange("upsert", "it-new-1", "brand-it", "cat-it", 12.0)])
        new = None
        for handle in (live, sharded):
            assert applied(handle, offset)["changes"]["lag"] == 0
            found = handle.retrieve.remote(aimed).result(timeout_s=60)
            assert len(found.item_idx) == 1 and found.item_idx[0] > n and not found.cold_start
            new = int(found.item_idx[0])
        shard = get_shards(read_index_manifest(path))[int(shard_of(np.asarray([new]), 2)[0])]
        ray.kill(shard, no_restart=False)
        end = time.monotonic() + 120
        while True:
            try:
                if ray.get(shard.stats.remote(), timeout=10)["changes_offset"] == 0:
                    break  # back from its file, without the change
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            assert time.monotonic() < end, "the shard actor did not restart"
            time.sleep(0.5)
        offset = log.append([ItemChange("update", "it-new-1", price=13.0)])
        applied(sharded, offset)
        assert ray.get(shard.stats.remote())["changes_offset"] == offset
        assert sharded.retrieve.remote(aimed).result(timeout_s=60).item_idx.tolist() == [new]
    finally:
        offset = log.append([ItemChange("delete", "it-new-1")])  # the catalog as the other tests know it
        for handle in (live, sharded):
            applied(handle, offset)
        serve.delete(name)
    assert live.retrieve.remote(aimed).result(timeout_s=60).item_idx.tolist() == []


def test_rebuilding_a_live_versions_index_switches_to_it_without_a_failed_request(tiny_stack):
    """`embed_catalog` builds the new index beside the serving one (its own shard actors and files) and switches by
    replacing the manifest; the live replicas load it within seconds while requests to that version go on."""
    import threading
    import time

    import httpx
    from ray import serve

    from indexing.embed import embed_catalog, get_shards, read_index_manifest

    path = tiny_stack["bundles"]["v1"]
    live = serve.get_deployment_handle("Retrieval", "recsys-v1")
    before = read_index_manifest(path)
    assert live.health.remote().result(timeout_s=60)["build"] == before["build"]
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                r = client.post(f"{tiny_stack['url']}/recommend", json={"user_id": f"u{i % 50}", "k": 5,
                                                                         "version": "v1"})
                statuses.append(r.status_code)
                if r.status_code == 503:  # shed: the client retries after Retry-After, as it should
                    time.sleep(float(r.headers.get("Retry-After", "1")))
                i += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        after = embed_catalog(path, tiny_stack["cfg"].index)
        assert after["build"] != before["build"] and after["n_items"] == before["n_items"]
        end = time.monotonic() + 60
        while live.health.remote().result(timeout_s=60)["build"] != after["build"]:
            assert time.monotonic() < end, "the replicas did not switch to the new build in 60 s"
            time.sleep(0.5)
        n = len(statuses)
        while len(statuses) < n + 10:  # answers from the new build
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(60)
    assert statuses and set(statuses) <= {200, 503} and statuses.count(200) >= 10, statuses
    assert len(get_shards(before)) == len(get_shards(after)) == 2  # the previous build stays until the next one


def test_a_killed_shard_actor_comes_back_with_every_vector_it_had(tiny_stack):
    """Ray restarts the shard actor and it reloads its persisted file: the same count and the same answers."""
    import time

    from indexing.embed import get_shards, read_index_manifest

    shard = get_shards(read_index_manifest(tiny_stack["bundles"]["v1"]))[0]
    before = ray.get(shard.stats.remote())
    xq = np.random.default_rng(0).standard_normal((3, before["dim"])).astype(np.float32)
    want = ray.get(shard.search.remote(xq, 20))[1]
    ray.kill(shard, no_restart=False)
    deadline, after = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        try:
            after = ray.get(shard.stats.remote(), timeout=10)
            break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)
    assert after is not None and after["ntotal"] == before["ntotal"] > 0
    np.testing.assert_array_equal(ray.get(shard.search.remote(xq, 20))[1], want)
