"""The tiny stack, built once: tiny shop -> two versions trained on Ray Train -> indexed on Ray Data -> served."""
from __future__ import annotations

import dataclasses

import pytest

WEIGHTS = {"v1": 90.0, "v2": 10.0}


@pytest.fixture(scope="session")
def tiny_stack(ray_cluster, serve_port: int, tmp_path_factory: pytest.TempPathFactory):
    from cluster.config import load_config
    from cluster.demo import version_train_config
    from cluster.serving import deploy_ingress, deploy_version, seed_online_store, start_serve, wait_healthy
    from indexing.embed import embed_catalog
    from training.fit.version import train_version
    from training.data.schemas import write_shop
    from training.data.synthetic import generate_shop

    root = tmp_path_factory.mktemp("stack")
    cfg = load_config("tiny")
    cfg = dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, port=serve_port,
                                                               impressions=str(root / "impressions")),
                              train=dataclasses.replace(cfg.train, storage_path=str(root / "runs")))
    shop_dir = root / "shop"
    write_shop(generate_shop("tiny", seed=0), shop_dir)
    bundles = {}
    for i, version in enumerate(WEIGHTS):  # v1: the seed two-tower, v2: multi-interest (cluster/configs/tiny.yaml)
        # the versions differ in retrieval; the second shares the first's ranker, as in the demo (one training less)
        bundles[version] = train_version(shop_dir, root / "bundles", version, version_train_config(cfg, version, i),
                                         ranker_from=next(iter(bundles.values()), None))
        embed_catalog(bundles[version], cfg.index)
    start_serve(cfg.serving)
    seed_online_store(shop_dir)
    for path in bundles.values():
        deploy_version(path, cfg.serving)
    deploy_ingress(WEIGHTS, cfg.policy.to_dict(), cfg.serving)
    url = f"http://{cfg.serving.host}:{cfg.serving.port}"
    wait_healthy(url)
    return {"url": url, "shop": shop_dir, "bundles": bundles, "cfg": cfg, "root": root}
