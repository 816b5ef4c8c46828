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


def test_autoscaling_targets_come_from_the_config_and_a_bad_one_names_its_field():
    import pytest

    cfg = ServingConfig(autoscale_targets={"retrieval": 0.5})
    assert cfg.autoscale_targets == {"ingress": 2.0, "retrieval": 0.5, "ranking": 8.0}  # the rest keep their default
    targets = {d.name: d._deployment_config.autoscaling_config.target_ongoing_requests
               for app in (build_version_app("/bundle", "v1", cfg), build_ingress_app({"v1": 1.0}, {}, cfg))
               for d in deployments_of(app) if d._deployment_config.autoscaling_config is not None}
    assert targets == {"Retrieval": 0.5, "Ranking": 8.0, "Ingress": 2.0}
    for bad, field in (({"shards": 1}, "autoscale_targets"), ({"ingress": 5}, "autoscale_targets.ingress"),
                       ({"ranking": 0}, "autoscale_targets.ranking"), ({"retrieval": True}, "retrieval")):
        with pytest.raises(ValueError, match=field):
            ServingConfig(autoscale_targets=bad)


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
