"""Trains one model version end to end: shop -> temporal split -> Ray Train (retrieval, ranker) -> eval -> bundle."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from training.bundle import BUNDLE_FORMAT, check_version, write_bundle
from training.examples import impressions
from training.features import engagements_of, in_stock, item_feature_table
from training.harness import load_model
from training.metrics import evaluate_ranked
from training.offline_eval import KS, evaluate_ranker, popularity_ranked
from training.protocols import temporal
from training.ranker import MultiTaskRanker, RankerConfig
from training.ranking_eval import add_sampled_negatives
from training.schemas import read_shop, snapshot_id
from training.train_loop import RANKER, FitSpec, TrainConfig, build_model, fit_on_ray


def _log(msg: str) -> None:
    print(f"[train] {msg}", flush=True)


def items_table(catalog: pa.Table, space, popularity: np.ndarray) -> pa.Table:
    """The bundle's catalog snapshot in item-index order, with encoded features and training popularity."""
    feats = item_feature_table(catalog, space)
    return catalog.select(["item_id", "brand", "category", "price", "created_at"]).append_column(
        "item_idx", pa.array(feats.item_idx[1:])).append_column(
        "brand_idx", pa.array(feats.brand_idx[1:])).append_column(
        "category_idx", pa.array(feats.category_idx[1:])).append_column(
        "price_bucket", pa.array(feats.price_bucket[1:])).append_column(
        "popularity", pa.array(popularity[1:].astype(np.float32))).append_column(
        "in_stock", pa.array(in_stock(catalog)))


def training_run_id(shop_dir: str | Path, cfg: TrainConfig) -> str:
    """Names the Ray Train runs of one training attempt: the same data, config and bundle format give the same id,
    so an interrupted `recsys train` resumes from its checkpoints, while any other attempt starts fresh."""
    key = json.dumps({"data": snapshot_id(shop_dir), "train": cfg.to_dict(), "format": BUNDLE_FORMAT}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


RETRIEVAL_MODELS = ("two_tower", "two_tower_in_batch", "multi_interest")  # harness registry names a bundle can carry


def train_version(shop_dir: str | Path, bundles_dir: str | Path, version: str, cfg: TrainConfig) -> Path:
    """Trains the retrieval model (`cfg.retrieval_model`) and the ranker on Ray Train; writes `bundles_dir/<version>/`.

    Both learn from the events before a global temporal cutoff; the metrics in the bundle come from the events
    after it (the harness's temporal protocol), with popularity as the reference.
    """
    check_version(version)
    if cfg.retrieval_model not in RETRIEVAL_MODELS:
        raise ValueError(f"retrieval_model must be one of {list(RETRIEVAL_MODELS)}, got {cfg.retrieval_model!r}")
    t_start = time.perf_counter()
    shop = read_shop(shop_dir)
    task = temporal(shop, cfg.test_fraction, max_users=cfg.eval_users, seed=cfg.seed, history_len=cfg.history_len,
                    dataset=Path(shop_dir).name)
    space, feats = task.space, task.item_features
    _log(f"{len(shop.catalog):,} items, {len(shop.users):,} users, {len(shop.events):,} events; "
         f"{task.train_events.num_rows:,} events before the temporal cutoff")

    run_id = training_run_id(shop_dir, cfg)
    retriever = load_model(cfg.retrieval_model)
    retriever.run_name = f"{version}-{cfg.retrieval_model}-{run_id}"
    tower_info = retriever.fit(task, cfg)
    tower = retriever.model

    history = engagements_of(task.train_events, space)
    views = impressions(task.train_events, space, history, max_rows=cfg.ranker_max_impressions, seed=cfg.seed,
                        item_category=feats.category_idx)
    # One unshown item per view as a negative: logged views all come from the user's interests, so without them a
    # ranker never learns that an off-interest candidate is bad (exposure bias; see training.ranking_eval).
    ranker_data = add_sampled_negatives(views, space.n_items, cfg.ranker_negatives_per_view, cfg.seed)
    lookups = {"item_brand": feats.brand_idx, "item_category": feats.category_idx, "item_price": feats.price_bucket}
    _log(f"{len(ranker_data):,} ranker examples ({len(views):,} views and their sampled negatives)")
    ranker_spec = FitSpec(RANKER, RankerConfig(**space.sizes).to_dict(), MultiTaskRanker.TRAIN_INPUTS,
                          cfg.ranker_epochs, cfg.ranker_batch_size, cfg.ranker_lr)
    ranker_state, ranker_hist = fit_on_ray(ranker_spec, ranker_data.as_dict() | lookups, cfg,
                                           f"{version}-ranker-{run_id}")
    ranker = build_model(ranker_spec.model, ranker_spec.model_config)
    ranker.load_state_dict(ranker_state)

    _log("evaluating on the held-out split")
    with torch.inference_mode():
        retrieval = {cfg.retrieval_model: evaluate_ranked(retriever.recommend(task, max(KS)), task.targets, KS),
                     "popularity": evaluate_ranked(popularity_ranked(task.popularity, task), task.targets, KS)}
        test_imp = impressions(shop.events, space, history, max_rows=200_000, seed=cfg.seed,
                               item_category=feats.category_idx)
        # Views after the cutoff, with histories frozen at the cutoff so nothing leaks from the test period.
        ranking = evaluate_ranker(ranker.eval(), test_imp.subset(test_imp.time_ms >= int(task.new_after_ms)))
    metrics = {"retrieval": retrieval, "ranking": ranking, "eval_users": len(task.user_ids),
               "retrieval_model": cfg.retrieval_model,
               "protocol": "global temporal split, full-catalog ranking, already-seen items excluded",
               "training": {"retrieval": tower_info["history"], "ranker": ranker_hist},
               "train_seconds": time.perf_counter() - t_start}
    path = write_bundle(bundles_dir, version, space, items_table(shop.catalog, space, task.popularity), tower, ranker,
                        metrics, snapshot_id(shop_dir), cfg.to_dict())
    _log(f"bundle {path} written in {time.perf_counter() - t_start:.0f}s")
    return path
