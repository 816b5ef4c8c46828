"""The Serve config file `recsys serve --emit-config` writes, deployed with `serve deploy` on the session's
`ray start` cluster, serves the same HTTP contract and starts the rollout controller; a changed split in the file
applies in place (the ingress replicas are the same ones), and `recsys status` shows where every replica and shard
runs."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
TOKEN = "deploy-test-token"


def ingress_replicas() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::recsys#Ingress#")}


def serve_deploy(cluster, config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run([str(BIN / "serve"), "deploy", str(path), "--address", cluster["dashboard"]],
                          env=cluster["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def wait_running(timeout_s: float = 300.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        if all(apps[a].status == "RUNNING" for a in ("recsys", "recsys-v1", "recsys-v2") if a in apps) and \
                {"recsys", "recsys-v1", "recsys-v2"} <= set(apps):
            return
        time.sleep(1.0)
    raise TimeoutError({a: s.status for a, s in serve.status().applications.items()})


def test_serve_deploy_of_the_emitted_config_serves_the_api_and_applies_a_new_split_in_place(
        tiny_stack, ray_cluster, tmp_path):
    from cluster.serving import serve_config, wait_healthy

    import ray

    from deployments.rollout import CONTROLLER_NAME
    from training import NAMESPACE

    cfg = tiny_stack["cfg"]
    config = serve_config(tiny_stack["bundles"], {"v1": 90.0, "v2": 10.0}, cfg.policy.to_dict(), cfg.serving,
                          hashlib.sha256(TOKEN.encode()).hexdigest(), tiny_stack["shop"], cfg.index)
    try:  # none left by an earlier test: the deploy alone must start it
        ray.kill(ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE), no_restart=True)
    except ValueError:
        pass
    serve_deploy(ray_cluster, config, tmp_path / "serve.yaml")
    wait_running()
    wait_healthy(tiny_stack["url"])
    deadline = time.monotonic() + 60  # an ingress replica looks the controller up again at most every 10 s
    while True:
        status = httpx.get(f"{tiny_stack['url']}/admin/rollout", headers={"Authorization": f"Bearer {TOKEN}"},
                           timeout=30)
        if status.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    assert status.status_code == 200, status.text
    assert set(status.json()["routing"]["weights"]) == {"v1", "v2"}
    users = [f"u{i}" for i in range(40)]
    answers = [httpx.post(f"{tiny_stack['url']}/recommend", json={"user_id": u, "k": 5}, timeout=60) for u in users]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:2]
    assert {a.json()["version"] for a in answers} == {"v1", "v2"}
    assert all(len(a.json()["items"]) == 5 and set(a.json()["stage_versions"].values()) == {a.json()["version"]}
               for a in answers)
    assert httpx.post(f"{tiny_stack['url']}/recommend", json={"user_id": "u1", "k": 0}, timeout=30).status_code == 422

    before = ingress_replicas()
    config["applications"][-1]["deployments"][0]["user_config"]["versions"] = {"v1": 0.0, "v2": 100.0}
    serve_deploy(ray_cluster, config, tmp_path / "serve.yaml")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        served = {httpx.post(f"{tiny_stack['url']}/recommend", json={"user_id": u, "k": 3}, timeout=60).json()["version"]
                  for u in users}
        if served == {"v2"}:
            break
        time.sleep(1.0)
    assert served == {"v2"}
    assert ingress_replicas() == before  # applied through reconfigure: no replica restarted


def test_recsys_status_shows_where_replicas_and_shards_run(tiny_stack, ray_cluster):
    done = subprocess.run([str(BIN / "recsys"), "status", "--json"], capture_output=True, text=True, timeout=120,
                          env={**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["address"]})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    actors = [a for n in report["nodes"] for a in n["actors"]]
    assert len(report["nodes"]) == 1 and report["nodes"][0]["head"]
    assert "recsys/Ingress replica" in actors and "recsys-v1/Retrieval replica" in actors
    assert any(a.startswith("index shard v1-shard-0 (build ") for a in actors) and "recsys-online-store" in actors
