"""The policy on the live tiny stack: steering through the admin endpoint reaches every ingress replica with no
failed request, a bad config is refused and the old one stays, exploration is reproducible per request id, and the
served answers show up as Prometheus metrics on Ray's metrics export port."""
from __future__ import annotations

import hashlib
import threading
import time

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray

pytestmark = pytest.mark.integration
TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(stack, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{stack['url']}{path}", json=body, headers=headers or {}, timeout=60.0)


def answer(stack, body: dict) -> dict:
    """POST /recommend as a well-behaved client: a shed answer (503 with Retry-After) is sent again after it."""
    for _ in range(5):
        r = post(stack, "/recommend", body)
        if r.status_code != 503 or "Retry-After" not in r.headers:
            break
        time.sleep(float(r.headers["Retry-After"]))
    assert r.status_code == 200, r.text
    return r.json()


def engaged_users(stack, n: int) -> list[str]:
    from training.data.schemas import read_shop

    events = read_shop(stack["shop"]).events.to_pandas()
    return list(events.loc[events["action"] != "view", "user_id"].drop_duplicates().iloc[:n])


@pytest.fixture(scope="module")
def admin_stack(tiny_stack):
    """The ingress redeployed with two replicas and an admin token (its sha256 in the user_config); restored
    afterwards with the stack's own config."""
    from ray import serve

    from cluster.serving import INGRESS_APP, QUIET, deploy_ingress, wait_healthy
    from deployments.ingress.routes import Ingress
    from tests.integration.conftest import WEIGHTS

    cfg = tiny_stack["cfg"]
    user_config = {"versions": dict(WEIGHTS), "policy": cfg.policy.to_dict(), "candidates": cfg.serving.candidates,
                   "admin_token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}
    two = {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 2}
    app = Ingress.options(ray_actor_options={"num_cpus": cfg.serving.replica_cpus}, autoscaling_config=two,
                          user_config=user_config).bind()
    serve.run(app, name=INGRESS_APP, route_prefix="/", logging_config=QUIET)
    wait_healthy(tiny_stack["url"])
    yield tiny_stack
    deploy_ingress(WEIGHTS, cfg.policy.to_dict(), cfg.serving)
    wait_healthy(tiny_stack["url"])


def test_every_answer_is_logged_as_impressions_off_the_request_path(tiny_stack):
    """Runs before the admin tests redeploy the ingress: the stack's own ingress logs to its folder."""
    from training.data.impressions import read_impressions

    users = engaged_users(tiny_stack, 3)
    answers = {f"imp-{u}": post(tiny_stack, "/recommend", {"user_id": u, "k": 5, "request_id": f"imp-{u}"}).json()
               for u in users}
    folder = tiny_stack["cfg"].serving.impressions
    deadline = time.monotonic() + 60  # the log flushes every 5 s, off the request path
    logged = None
    while time.monotonic() < deadline:
        try:
            table = read_impressions(folder)
            logged = table.filter(pc.is_in(table["request_id"], pa.array(list(answers))))
        except FileNotFoundError:
            pass
        if logged is not None and logged.num_rows == 5 * len(answers):
            break
        time.sleep(0.5)
    assert logged is not None and logged.num_rows == 5 * len(answers)
    for rid, a in answers.items():
        rows = logged.filter(pc.equal(logged["request_id"], rid)).sort_by("position")
        assert rows["item_id"].to_pylist() == [i["item_id"] for i in a["items"]]
        assert rows["reason"].to_pylist() == [i["reason"] for i in a["items"]]
        assert set(rows["version"].to_pylist()) == {a["version"]} and set(rows["user_id"].to_pylist()) == {a["user_id"]}
        assert all(0.0 < p <= 1.0 for p in rows["propensity"].to_pylist())


def test_simulated_users_answer_through_events_and_their_sessions_are_logged(tiny_stack):
    from cluster.loop import served_log
    from cluster.simulate import simulate
    from training.data.impressions import label_impressions

    result = simulate(tiny_stack["url"], tiny_stack["shop"], sessions=30, seed=7, k=8, prefix="simtest")
    assert result["errors"] == 0 and result["all"]["sessions"] == 30
    assert set(result["by_version"]) <= {"v1", "v2"} and sum(f["sessions"] for f in result["by_version"].values()) == 30
    c = result["all"]["clicks_per_session"]
    assert c["lo"] <= c["mean"] <= c["hi"] and result["all"]["mean_relevance@k"] > 0
    # the ingress flushes its impression log every 5 s
    logged = served_log(tiny_stack["cfg"].serving.impressions, "simtest-", answers=30, timeout_s=60)
    assert logged.num_rows == 30 * 8
    # The clicks the simulated users posted are the outcomes of what they were shown: joined back point in time
    # (the events are stamped after the answer's served_at, on the serving clock), every click is found.
    from cluster.simulate import events_table

    events = events_table(result, tiny_stack["shop"])
    labelled = label_impressions(logged, events, window_s=600)
    assert sum(labelled["click"].to_pylist()) == round(c["mean"] * 30)
    # Each live answer was logged with what its policy ran on: re-run from the log, the policy makes the very
    # lists that were shown (exploration's draws included), so served-log estimates start from the truth.
    from training.data.schemas import read_shop
    from training.evaluation.served_replay import load_served, served_replay

    requests, _ = load_served(tiny_stack["cfg"].serving.impressions, events, window_s=600)
    requests = [r for r in requests if r.request_id.startswith("simtest-")]
    assert len(requests) == 30
    out = served_replay(requests, read_shop(tiny_stack["shop"]), {"diversity_off": {"brand_diversity": False}},
                        bootstrap=20)
    assert out["unexplained"] == 0 and out["replayed"] == 30
    assert out["policies"]["served"]["ctr"]["ips"] == pytest.approx(sum(labelled["click"].to_pylist()) / (30 * 8))


def test_a_paired_comparison_runs_each_session_against_both_versions_without_posting_events(tiny_stack):
    from cluster.simulate import paired, simulate

    out = paired(tiny_stack["url"], tiny_stack["shop"], 20, ("v1", "v2"), seed=5, k=8, prefix="pairtest")
    assert out["sessions"] == 20 and out["errors"] == {"v1": 0, "v2": 0}
    d, by = out["difference"]["clicks_per_session"], out["by_version"]
    assert d["mean"] == pytest.approx(by["v2"]["clicks_per_session"]["mean"] - by["v1"]["clicks_per_session"]["mean"])
    assert d["lo"] <= d["mean"] <= d["hi"]
    # The same sessions: pinned to one version, each session's user and draws repeat exactly.
    again = simulate(tiny_stack["url"], tiny_stack["shop"], 20, seed=5, k=8, prefix="pairtest-v1", version="v1",
                     post_events=False)
    assert again["per_session"] == simulate(tiny_stack["url"], tiny_stack["shop"], 20, seed=5, k=8,
                                            prefix="pairtest-v1", version="v1", post_events=False)["per_session"]


def test_a_served_period_pinned_to_one_version_becomes_the_next_versions_data(tiny_stack, tmp_path):
    """The loop's data step on the live stack (`recsys loop` runs it end to end): sessions pinned to one version
    against the split, their events on the serving clock after the shop's end, appended as the loop shop, whose
    held-out half scores a version offline."""
    from cluster.loop import held_out_fraction, loop_shop, offline_on, served_log
    from cluster.simulate import events_table, simulate
    from training.data.examples import temporal_split
    from training.data.impressions import condition_triples, read_condition_triples
    from training.data.schemas import read_shop

    result = simulate(tiny_stack["url"], tiny_stack["shop"], sessions=60, seed=11, k=8, prefix="looptest",
                      version="v2")
    assert result["errors"] == 0 and set(result["by_version"]) == {"v2"}  # the split alone sends 90% to v1
    served = events_table(result, tiny_stack["shop"])
    # v2 is the multi-interest version: the engagements its explicit conditions led to are logged as triples
    logged = served_log(tiny_stack["cfg"].serving.impressions, "looptest-11-", answers=60)
    assert len(set(logged["request_id"].to_pylist())) == 60
    triples = condition_triples(logged, served)
    from_condition = logged.filter(pc.starts_with(logged["reason"], "condition:category="))
    assert 0 < triples.num_rows <= from_condition.num_rows
    clicked = {(e["user_id"], e["item_id"]) for e in result["events"] if e["action"] != "view"}
    assert set(zip(triples["user_id"].to_pylist(), triples["item_id"].to_pylist())) <= clicked
    loop_dir = loop_shop(tiny_stack["shop"], served, tmp_path / "loop", conditions=triples)
    shop = read_shop(loop_dir)
    assert shop.events.num_rows == read_shop(tiny_stack["shop"]).events.num_rows + served.num_rows
    assert read_condition_triples(loop_dir).equals(triples) and shop.meta["condition_triples"] == triples.num_rows
    frac = held_out_fraction(shop.events.num_rows, served.num_rows)
    # a session's clicks follow its views closely, so the held-out half splits sessions, not views from clicks
    cutoff = temporal_split(shop.events, frac).cutoff_ms
    t = served["timestamp"].cast(pa.int64()).to_numpy()
    clicked = pc.equal(served["action"], "click").to_numpy(zero_copy_only=False)
    assert 0.25 < (t[clicked] < cutoff).mean() < 0.75 and 0.25 < (t[~clicked] < cutoff).mean() < 0.75
    offline = offline_on(tiny_stack["bundles"]["v1"], shop, frac, max_users=100, seed=0)
    assert offline["users"] > 0 and offline["serves"] in ("ranker", "fused", "retrieval")
    assert offline["final_ndcg@10"] == offline[f"{offline['serves']}_ndcg@10"]


def test_admin_endpoint_refuses_missing_and_wrong_tokens(admin_stack):
    body = {"policy": {"max_brand_run": 2}}
    assert post(admin_stack, "/admin/policy", body).status_code == 401
    assert post(admin_stack, "/admin/policy", body, {"Authorization": "Bearer wrong"}).status_code == 403
    assert httpx.get(f"{admin_stack['url']}/admin/policy", timeout=30).status_code == 401


def test_a_bad_config_gets_a_422_naming_the_field_and_the_old_one_stays(admin_stack):
    before = httpx.get(f"{admin_stack['url']}/admin/policy", headers=AUTH, timeout=30).json()
    r = post(admin_stack, "/admin/policy", {"policy": {"explore_epsilon": 7}}, AUTH)
    assert r.status_code == 422 and "explore_epsilon" in r.text
    r = post(admin_stack, "/admin/policy", {"policy": {"surfaces": {"home": {"max_brand_run": 0}}}}, AUTH)
    assert r.status_code == 422 and "surfaces.home" in r.text and "max_brand_run" in r.text
    after = httpx.get(f"{admin_stack['url']}/admin/policy", headers=AUTH, timeout=30).json()
    assert after["version"] == before["version"] and after["policy"] == before["policy"]


def test_admin_change_reaches_every_replica_at_once_with_no_failed_request(admin_stack):
    users = engaged_users(admin_stack, 8)
    top_brands = {i["brand"] for u in users
                  for i in post(admin_stack, "/recommend", {"user_id": u, "k": 10}).json()["items"][:3]}
    blocked = sorted(top_brands)[:3]
    statuses: list[int | str] = []
    stop = threading.Event()

    def hammer() -> None:  # traffic during the change: every answer a 200, or a shed (503 + Retry-After) to retry
        while not stop.is_set():
            for u in users:
                r = post(admin_stack, "/recommend", {"user_id": u, "k": 10})
                # A shed comes from the ingress's own admission ("overloaded") or, when the ingress replicas' queue
                # is full, from Serve's proxy ("Request dropped due to backpressure"): both 503 with Retry-After.
                shed = r.status_code == 503 and "Retry-After" in r.headers
                statuses.append("shed" if shed else r.status_code if r.status_code == 200 else r.text[:300])
                if shed:
                    time.sleep(float(r.headers["Retry-After"]))

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        # Home pages block the brands; search pages do not (a surface preset set through the same call).
        policy = {"surfaces": {"home": {"blocked_brands": blocked}, "search": {"max_brand_run": 2}}}
        r = post(admin_stack, "/admin/policy", {"policy": policy}, AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["applied_replicas"] == 2 and r.json()["pending_replicas"] == []
        # The very next requests, spread over both replicas, all follow the new config.
        for _ in range(3):
            for u in users:
                items = answer(admin_stack, {"user_id": u, "k": 10})["items"]
                assert not {i["brand"] for i in items} & set(blocked)
        search = [answer(admin_stack, {"user_id": u, "k": 10, "context": {"page": "search"}}) for u in users]
        assert any({i["brand"] for i in s["items"]} & set(blocked) for s in search)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        post(admin_stack, "/admin/policy", {"policy": admin_stack["cfg"].policy.to_dict()}, AUTH)
    assert statuses.count(200) > 10 and set(statuses) <= {200, "shed"}, {s: statuses.count(s) for s in set(statuses)}


def test_exploration_is_reproducible_for_a_request_id(admin_stack):
    user = engaged_users(admin_stack, 1)[0]
    # Every item counts as new (10 years), so that other request ids draw other items from a large pool.
    body = {"user_id": user, "k": 12, "request_id": "req-42",
            "policy": {"explore_epsilon": 1.0, "explore_slots": [2, 5], "new_item_days": 3650}}
    assert post(admin_stack, "/recommend", body).status_code == 403  # exploration is an operator's setting
    a, b = post(admin_stack, "/recommend", body, AUTH).json(), post(admin_stack, "/recommend", body, AUTH).json()
    assert a["request_id"] == "req-42"
    assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
    assert [a["items"][j]["reason"] for j in (2, 5)] == ["policy:explore"] * 2
    others = {tuple(i["item_id"] for i in post(admin_stack, "/recommend", {**body, "request_id": f"r{s}"}, AUTH).json()
                    ["items"]) for s in range(6)}
    assert len(others) > 1


def test_exploration_places_new_items_of_the_data_clock_with_the_default_window(admin_stack):
    """The default new_item_days (7): items are new against the version's serving clock, which runs on the
    synthetic shop's time line (training/request/clock.py), not against today's date, when none would be."""
    from training.data.schemas import read_shop
    from training.request.clock import parse_iso

    shop = read_shop(admin_stack["shop"])
    end_s = parse_iso(shop.meta["end_time"])
    created = dict(zip(shop.catalog.column("item_id").to_pylist(),
                       shop.catalog.column("created_at").cast("int64").to_numpy() / 1000.0))
    body = {"k": 12, "policy": {"explore_epsilon": 1.0, "explore_slots": [2, 5]}}
    explored = [item for u in engaged_users(admin_stack, 4)
                for item in post(admin_stack, "/recommend", {**body, "user_id": u}, AUTH).json()["items"]
                if item["reason"] == "policy:explore"]
    assert explored  # the pool is the ranked list's new items: the tiny shop has one or two per list
    for item in explored:  # created in the shop's last week
        assert created[item["item_id"]] >= end_s - 7 * 86_400


def test_served_answers_are_exported_as_prometheus_metrics(admin_stack):
    for u in engaged_users(admin_stack, 4):
        post(admin_stack, "/recommend", {"user_id": u, "k": 10, "context": {"page": "category"}})
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    deadline, text = time.monotonic() + 60.0, ""
    while time.monotonic() < deadline:  # Ray reports custom metrics every few seconds
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if 'surface="category"' in text and "recsys_policy_unique_brands_bucket" in text and \
                "recsys_stage_ms_bucket" in text:
            break
        time.sleep(2.0)
    answers = [line for line in text.splitlines() if line.startswith("ray_recsys_policy_answers")]
    assert any('surface="category"' in line and "model_version=" in line for line in answers), answers[:5]
    for name in ("unique_brands", "longest_brand_run", "novelty"):
        assert f"ray_recsys_policy_{name}_bucket" in text
    stages = [line for line in text.splitlines() if line.startswith("ray_recsys_stage_ms_bucket")]
    for stage in ("features", "retrieval", "ranking", "policy", "total"):  # per version, as the dashboard plots them
        assert any(f'stage="{stage}"' in line and 'model_version="v' in line for line in stages), stage
    assert any(line.startswith("ray_recsys_requests") and "model_version=" in line for line in text.splitlines())
