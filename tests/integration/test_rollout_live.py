"""A versioned rollout on the live tiny stack: a third version deployed beside the two live ones (its own index and
application, no traffic) and gated; shifted to in steps under steady load, then rolled back, with no failed request
and no answer mixing versions; a candidate that fails the gate cannot take traffic; a live guard that trips rolls
back by itself; a retired version's application and index shards are gone."""
from __future__ import annotations

import dataclasses
import hashlib
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.integration
TOKEN = "rollout-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def admin(stack, method: str, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(method, f"{stack['url']}{path}", json=body, headers=AUTH, timeout=120.0)


def wait_idle(stack, timeout_s: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = admin(stack, "GET", "/admin/rollout").json()
        if not status["busy"]:
            return status
        time.sleep(0.5)
    raise TimeoutError(f"rollout still busy after {timeout_s:.0f} s: {status['rollout']['events']}")


def configure(stack, **rollout) -> None:
    from cluster.serving import start_rollout
    from deployments.rollout.gate import RolloutConfig

    cfg = stack["cfg"]
    start_rollout(cfg.serving, cfg.index, RolloutConfig(**{"gate_requests": 30, "retire_grace_s": 1.0, **rollout}),
                  stack["shop"], gate_users=200)


@pytest.fixture(scope="module")
def rollout_stack(tiny_stack):
    """The ingress with an admin token, the rollout controller, and a third bundle `v3` (trained, not indexed)."""
    from ray import serve

    from cluster.demo import version_train_config
    from cluster.serving import INGRESS_APP, deploy_ingress, live_routing_table, wait_healthy
    from deployments.app import QUIET, build_ingress_app
    from tests.integration.conftest import WEIGHTS
    from training.fit.version import train_version

    cfg = tiny_stack["cfg"]
    token = hashlib.sha256(TOKEN.encode()).hexdigest()
    serve.run(build_ingress_app(WEIGHTS, cfg.policy.to_dict(), cfg.serving, token, live_routing_table()),
              name=INGRESS_APP, route_prefix="/", logging_config=QUIET)
    wait_healthy(tiny_stack["url"])
    configure(tiny_stack)
    v3 = train_version(tiny_stack["shop"], tiny_stack["root"] / "bundles", "v3",
                       dataclasses.replace(version_train_config(cfg, "v3", 2), retrieval_model="two_tower"),
                       ranker_from=tiny_stack["bundles"]["v1"])
    yield {**tiny_stack, "v3": str(v3)}
    status = admin(tiny_stack, "GET", "/admin/rollout").json()
    if status["routing"] and "v3" in status["routing"]["weights"]:
        admin(tiny_stack, "POST", "/admin/rollout/rollback")
        admin(tiny_stack, "POST", "/admin/rollout/retire", {"version": "v3"})
    deploy_ingress(WEIGHTS, cfg.policy.to_dict(), cfg.serving)
    wait_healthy(tiny_stack["url"])


@pytest.fixture(scope="module")
def users(rollout_stack):
    from training.data.schemas import read_shop

    return read_shop(rollout_stack["shop"]).users.column("user_id").to_pylist()[:80]


class Load:
    """Clients posting /recommend in a loop; every answer kept (status, version, stage versions). One by default:
    with the test's own requests that is two at once, within what the ingress always admits."""

    def __init__(self, stack, users: list[str], clients: int = 1) -> None:
        self.url, self.users, self.answers, self.stop = stack["url"], users, [], threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(clients)]

    def run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60.0) as client:
            n = i
            while not self.stop.is_set():
                user = self.users[n % len(self.users)]
                r = client.post("/recommend", json={"user_id": user, "k": 5})
                body = r.json() if r.status_code == 200 else {}
                shed = r.status_code == 503 and "Retry-After" in r.headers  # admission control, not a failure
                self.answers.append((r.status_code if not shed else "shed", user, body.get("version"),
                                     body.get("stage_versions")))
                if shed:
                    time.sleep(1.0)
                n += len(self.threads)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def recommend(url: str, body: dict) -> httpx.Response:
    """POST /recommend as a well-behaved client: a shed answer (503 with Retry-After) is sent again after it."""
    for _ in range(5):
        r = httpx.post(f"{url}/recommend", json=body, timeout=60)
        if r.status_code != 503 or "Retry-After" not in r.headers:
            return r
        time.sleep(float(r.headers["Retry-After"]))
    return r


def served(stack, users: list[str]) -> dict[str, str]:
    out = {}
    for u in users:
        r = recommend(stack["url"], {"user_id": u, "k": 3})
        assert r.status_code == 200, r.text
        out[u] = r.json()["version"]
    return out


def test_start_builds_the_index_deploys_beside_the_live_versions_and_gates(rollout_stack, users):
    before = served(rollout_stack, users)
    r = admin(rollout_stack, "POST", "/admin/rollout/start", {"version": "v3", "bundle": rollout_stack["v3"]})
    assert r.status_code == 202, r.text
    status = wait_idle(rollout_stack)
    rollout = status["rollout"]
    assert rollout["phase"] == "ready", rollout
    assert any("follows the catalog change log of v1" in e for e in rollout["events"]), rollout["events"]
    gate = rollout["gate"]
    assert gate["passed"] and gate["blue"] == "v1" and gate["diff"]["requests"] == 30
    names = {c["check"] for c in gate["checks"]}
    assert {"health of every stage", "replay error rate", "replay p99 total (ms)",
            "offline retrieval recall@100", "answer overlap@10 with blue"} <= names
    from deployments.rollout.gate import order_flags
    from training.fit.bundle import load_bundle

    assert gate["flags"] == order_flags(load_bundle(rollout_stack["v3"]).metrics)  # a losing ranker: flagged
    assert status["routing"]["weights"]["v3"] == 0 and status["routing"]["shares"]["v3"] == 0
    assert served(rollout_stack, users) == before  # live at weight 0: no user moved
    forced = recommend(rollout_stack["url"], {"user_id": users[0], "k": 5, "version": "v3"}).json()
    assert forced["version"] == "v3" and set(forced["stage_versions"].values()) == {"v3"}
    again = admin(rollout_stack, "POST", "/admin/rollout/start", {"version": "v3", "bundle": rollout_stack["v3"]})
    assert again.status_code == 409 and "already live" in again.text


def test_a_candidate_that_fails_the_gate_cannot_take_traffic(rollout_stack):
    configure(rollout_stack, gate_p99_budget_ms={"total": 0.001})  # no answer is that fast
    try:
        assert admin(rollout_stack, "POST", "/admin/rollout/gate").status_code == 202
        status = wait_idle(rollout_stack)
    finally:
        configure(rollout_stack)
    assert status["rollout"]["phase"] == "failed"
    assert [c["check"] for c in status["rollout"]["gate"]["checks"] if not c["passed"]] == ["replay p99 total (ms)"]
    refused = admin(rollout_stack, "POST", "/admin/rollout/shift", {"version": "v3", "to": [100], "every_s": 0})
    assert refused.status_code == 409 and "passed the gate" in refused.text
    assert admin(rollout_stack, "POST", "/admin/rollout/gate").status_code == 202
    assert wait_idle(rollout_stack)["rollout"]["phase"] == "ready"  # the same candidate, the usual thresholds


def test_a_shift_under_load_and_a_rollback_fail_no_request_and_mix_no_versions(rollout_stack, users):
    from cluster.serving import live_routing_table
    from deployments.ingress.routing import choose_version, decode_table

    before = decode_table(live_routing_table())
    with Load(rollout_stack, users) as load:
        time.sleep(2.0)
        r = admin(rollout_stack, "POST", "/admin/rollout/shift", {"version": "v3", "to": [50, 100], "every_s": 2})
        assert r.status_code == 202, r.text
        status = wait_idle(rollout_stack)
        assert status["rollout"]["phase"] == "live", status["rollout"]["events"]
        assert [s["percent"] for s in status["rollout"]["steps"]] == [50, 100]
        assert status["routing"]["shares"]["v3"] == 1.0
        time.sleep(1.0)
        assert set(served(rollout_stack, users[:20]).values()) == {"v3"}
        r = admin(rollout_stack, "POST", "/admin/rollout/rollback")
        assert r.status_code == 200 and r.json()["rollout"]["phase"] == "rolled_back"
        after = served(rollout_stack, users)  # the next request already follows the old routing
        time.sleep(1.0)
    assert after == {u: choose_version(u, before) for u in users}  # every user back on their own version
    codes = [a[0] for a in load.answers]
    assert len(codes) > 20 and set(codes) <= {200, "shed"}, {c: codes.count(c) for c in set(codes)}
    assert codes.count(200) > 20
    assert all(set(sv.values()) == {v} for c, _, v, sv in load.answers if c == 200)  # no answer mixes versions
    assert {"v3"} < {a[2] for a in load.answers}


def test_a_tripped_guard_rolls_back_by_itself(rollout_stack, users):
    configure(rollout_stack, guard_max_p99_ms=0.001, guard_min_requests=1)  # any answer is too slow
    try:
        with Load(rollout_stack, users):
            r = admin(rollout_stack, "POST", "/admin/rollout/shift", {"version": "v3", "to": [100], "every_s": 30})
            assert r.status_code == 202, r.text
            status = wait_idle(rollout_stack, timeout_s=60)
    finally:
        configure(rollout_stack)
    step = status["rollout"]["steps"][-1]
    assert status["rollout"]["phase"] == "rolled_back" and step["status"] == "tripped", status["rollout"]
    assert "p99" in step["reason"] and status["routing"]["shares"]["v3"] == 0


def test_retire_removes_the_application_and_the_index_shards(rollout_stack):
    from ray import serve

    from indexing.embed import get_shards, read_index_manifest

    manifest = read_index_manifest(rollout_stack["v3"])
    busy = admin(rollout_stack, "POST", "/admin/rollout/retire", {"version": "v1"})
    assert busy.status_code == 409 and "shift the traffic away" in busy.text
    r = admin(rollout_stack, "POST", "/admin/rollout/retire", {"version": "v3"})
    assert r.status_code == 200, r.text
    assert r.json()["index_shards_stopped"] == rollout_stack["cfg"].index.n_shards
    assert "recsys-v3" not in serve.status().applications
    with pytest.raises(ValueError):
        get_shards(manifest)
    forced = recommend(rollout_stack["url"], {"user_id": "u1", "k": 3, "version": "v3"})
    assert forced.status_code == 404


def test_rollout_endpoints_need_the_admin_token_and_name_bad_fields(rollout_stack):
    url = rollout_stack["url"]
    assert httpx.get(f"{url}/admin/rollout", timeout=30).status_code == 401
    assert httpx.get(f"{url}/admin/rollout", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 403
    bad = admin(rollout_stack, "POST", "/admin/rollout/shift", {"version": "v3", "to": [50, 10]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "to"]
    bad = admin(rollout_stack, "POST", "/admin/rollout/start", {"version": "v9", "bundle": "/nonexistent"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "bundle"]
    bad = admin(rollout_stack, "POST", "/admin/rollout/start", {"version": "../x", "bundle": "/b"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "version"]
