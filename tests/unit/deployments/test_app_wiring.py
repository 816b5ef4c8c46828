"""How deployments/app.py wires the applications: every autoscaled deployment's target is reachable under its own
`max_ongoing_requests`, and the delays come from the serving config."""
from __future__ import annotations

from ray.serve import Application

from deployments.app import ServingConfig, build_ingress_app, build_version_app


def deployments_of(app: Application) -> list:
    out, todo = [], [app]
    while todo:
        d = todo.pop()._bound_deployment
        out.append(d)
        todo += [a for a in d.init_args if isinstance(a, Application)]
    return out


def test_autoscaling_targets_sit_below_each_deployments_concurrency_cap():
    cfg = ServingConfig(upscale_delay_s=3.0, downscale_delay_s=20.0)
    found = {}
    for app in (build_version_app("/bundle", "v1", cfg), build_ingress_app({"v1": 1.0}, {}, cfg)):
        for d in deployments_of(app):
            auto = d._deployment_config.autoscaling_config
            if auto is None:
                continue
            found[d.name] = auto.target_ongoing_requests
            assert auto.target_ongoing_requests <= d.max_ongoing_requests / 2, d.name
            assert (auto.upscale_delay_s, auto.downscale_delay_s) == (3.0, 20.0)
    assert set(found) == {"Retrieval", "Ranking", "Ingress"}


def test_replicas_run_on_one_event_loop_and_only_the_ingress_routes_on_it():
    """The one-loop settings reach every replica's environment (not the driver's), and can be switched off."""
    apps = lambda cfg: (build_version_app("/bundle", "v1", cfg), build_ingress_app({"v1": 1.0}, {}, cfg))
    envs = {d.name: d.ray_actor_options["runtime_env"]["env_vars"]
            for app in apps(ServingConfig()) for d in deployments_of(app)}
    assert set(envs) == {"Retrieval", "Ranking", "Version", "Ingress"}
    assert all(e["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0" for e in envs.values())
    assert [n for n, e in envs.items() if "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP" in e] == ["Ingress"]
    for app in apps(ServingConfig(one_loop=False)):
        assert all("runtime_env" not in d.ray_actor_options for d in deployments_of(app))
