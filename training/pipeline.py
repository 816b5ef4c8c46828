"""Trains one model version end to end: shop -> split -> examples -> Ray Train (towers, ranker) -> eval -> bundle."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from training.bundle import check_version, write_bundle
from training.examples import eval_set, impressions, temporal_split, tower_examples
from training.features import build_feature_space, engagements_of, in_stock, item_feature_table
from training.metrics import popularity_counts
from training.offline_eval import evaluate_ranker, evaluate_retrieval
from training.ranker import MultiTaskRanker, RankerConfig
from training.ranking_eval import add_sampled_negatives
from training.schemas import read_shop, snapshot_id
from training.train_loop import RANKER, TWO_TOWER, FitSpec, TrainConfig, build_model, fit_on_ray
from training.two_tower import TwoTowerConfig


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


def train_version(shop_dir: str | Path, bundles_dir: str | Path, version: str, cfg: TrainConfig) -> Path:
    """Trains the two-tower model and the ranker on Ray Train and writes `bundles_dir/<version>/`."""
    check_version(version)
    t_start = time.perf_counter()
    shop = read_shop(shop_dir)
    space = build_feature_space(shop.catalog, shop.users, shop.events, history_len=cfg.history_len)
    split = temporal_split(shop.events, cfg.test_fraction)
    _log(f"{len(shop.catalog):,} items, {len(shop.users):,} users, {len(shop.events):,} events; "
         f"train {len(split.train):,} / test {len(split.test):,} events (temporal split)")

    feats = item_feature_table(shop.catalog, space)
    lookups = {"item_brand": feats.brand_idx, "item_category": feats.category_idx, "item_price": feats.price_bucket}
    tower_data = tower_examples(split.train, space, feats.category_idx)
    history = engagements_of(split.train, space)
    popularity = popularity_counts(history.item_idx, space.n_items)
    views = impressions(split.train, space, history, max_rows=cfg.ranker_max_impressions, seed=cfg.seed,
                        item_category=feats.category_idx)
    # One unshown item per view as a negative: logged views all come from the user's interests, so without them a
    # ranker never learns that an off-interest candidate is bad (exposure bias; see training.ranking_eval).
    ranker_data = add_sampled_negatives(views, space.n_items, cfg.ranker_negatives_per_view, cfg.seed)
    _log(f"{len(tower_data):,} two-tower examples, {len(ranker_data):,} ranker impressions")

    sizes = space.sizes
    tower_cfg = TwoTowerConfig(**sizes, dim=cfg.dim)
    ranker_cfg = RankerConfig(**sizes)
    tower_inputs = tower_data.as_dict() | lookups | {"item_counts": np.bincount(tower_data.target,
                                                                                minlength=space.n_items + 1)}
    tower_spec = FitSpec(TWO_TOWER, tower_cfg.to_dict(), ("hist_items", "hist_actions", "hist_ages", "context", "target"),
                         cfg.tower_epochs, cfg.tower_batch_size, cfg.tower_lr)
    ranker_spec = FitSpec(RANKER, ranker_cfg.to_dict(), MultiTaskRanker.TRAIN_INPUTS, cfg.ranker_epochs,
                          cfg.ranker_batch_size, cfg.ranker_lr)
    tower_state, tower_hist = fit_on_ray(tower_spec, tower_inputs, cfg, f"{version}-two_tower")
    ranker_state, ranker_hist = fit_on_ray(ranker_spec, ranker_data.as_dict() | lookups, cfg, f"{version}-ranker")
    tower = build_model(tower_spec.model, tower_spec.model_config)
    tower.load_state_dict(tower_state)
    ranker = build_model(ranker_spec.model, ranker_spec.model_config)
    ranker.load_state_dict(ranker_state)

    _log("evaluating on the held-out split")
    ev = eval_set(split, space, max_users=cfg.eval_users, seed=cfg.seed)
    with torch.inference_mode():
        retrieval = evaluate_retrieval(tower.eval(), popularity, ev)
        test_imp = impressions(shop.events, space, history, max_rows=200_000, seed=cfg.seed,
                               item_category=feats.category_idx)
        # Views after the cutoff, with histories frozen at the cutoff so nothing leaks from the test period.
        ranking = evaluate_ranker(ranker.eval(), test_imp.subset(test_imp.time_ms >= split.cutoff_ms))
    metrics = {"retrieval": retrieval, "ranking": ranking, "eval_users": len(ev.user_ids),
               "protocol": "global temporal split, full-catalog ranking, already-seen items excluded",
               "training": {"two_tower": tower_hist, "ranker": ranker_hist},
               "train_seconds": time.perf_counter() - t_start}
    path = write_bundle(bundles_dir, version, space, items_table(shop.catalog, space, popularity), tower, ranker,
                        metrics, snapshot_id(shop_dir), cfg.to_dict())
    _log(f"bundle {path} written in {time.perf_counter() - t_start:.0f}s")
    return path

