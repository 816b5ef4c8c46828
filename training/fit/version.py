"""Trains one model version end to end: shop -> temporal split -> Ray Train (retrieval, ranker) -> eval -> bundle."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from training.fit.bundle import BUNDLE_FORMAT, check_version, load_bundle, write_bundle
from training.data.examples import add_sampled_negatives, impressions
from training.data.features import engagements_of, in_stock, item_feature_table, item_lookups
from training.fit.ranker_data import item_matrix, retrieved_negatives, with_retrieval_scores
from training.fit.registry import load_model
from training.metrics import evaluate_ranked
from training.fit.offline_metrics import KS, ORDER_CANDIDATES, evaluate_ranker, popularity_ranked, serving_order
from training.data.splits import temporal
from training.models.embeddings import ITEM_INIT
from training.models.ranker import MultiTaskRanker, RankerConfig
from training.request.clock import parse_iso
from training.data.impressions import read_condition_triples
from training.data.schemas import read_shop, snapshot_id
from training.fit.train_loop import RANKER, FitSpec, TrainConfig, build_model, fit_on_ray


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


RANKER_SETTINGS = ("ranker_epochs", "ranker_batch_size", "ranker_lr", "ranker_max_impressions",
                   "ranker_negatives_per_view", "ranker_negatives", "ranker_candidate_depth",
                   "ranker_retrieval_feature", "ranker_views", "ranker_item_init", "history_len",
                   "test_fraction")  # what a shared ranker must match


def train_ranker(task, history, cfg: TrainConfig, run_name: str, retriever: torch.nn.Module | None = None,
                 served_from_ms: int | None = None) -> tuple[torch.nn.Module, list[dict]]:
    """The multi-task ranker on the task's logged views, each with `ranker_negatives_per_view` unshown items:
    drawn from `retriever`'s top candidates for the view's user state (`cfg.ranker_negatives` "retrieved") or from
    the catalog, and with `retriever`'s score of every example as a feature when `cfg.ranker_retrieval_feature`.
    With `cfg.ranker_views` "served", only the views from `served_from_ms` on: what the previous version served."""
    space, feats = task.space, task.item_features
    needs_retriever = cfg.ranker_negatives == "retrieved" or cfg.ranker_retrieval_feature or \
        cfg.ranker_item_init == "tower"
    if needs_retriever and retriever is None:
        raise ValueError("train_ranker: retrieved negatives, the retrieval feature and the item-tower init need the "
                         "version's retriever")
    train_events = task.train_events
    if cfg.ranker_views == "served":
        if served_from_ms is None:
            raise ValueError("ranker_views 'served' needs a shop with a served period (shop.json `served_from`, "
                             "written by `recsys loop`)")
        train_events = train_events.filter(pc.greater_equal(train_events["timestamp"].cast(pa.int64()),
                                                            served_from_ms))
    if not pc.any(pc.equal(train_events["action"], "view")).as_py():
        raise ValueError(f"train_ranker: no logged view before the cutoff to learn from (ranker_views "
                         f"{cfg.ranker_views!r})")
    views = impressions(train_events, space, history, max_rows=cfg.ranker_max_impressions, seed=cfg.seed,
                        item_category=feats.category_idx)
    # Unshown items as negatives: logged views all come from the user's interests, so without them a ranker never
    # learns that an off-interest candidate is bad (exposure bias; see training.evaluation.ranking); drawn from
    # retrieval's candidates, they are what the ranker has to order at serving (training.fit.ranker_data).
    if cfg.ranker_negatives == "retrieved":
        with torch.inference_mode():
            ranker_data = retrieved_negatives(views, retriever.eval(), space.n_items, cfg.ranker_negatives_per_view,
                                              cfg.ranker_candidate_depth, cfg.seed)
    else:
        ranker_data = add_sampled_negatives(views, space.n_items, cfg.ranker_negatives_per_view, cfg.seed)
    _log(f"{len(ranker_data):,} ranker examples ({len(views):,} views and their {cfg.ranker_negatives} negatives)")
    config = RankerConfig(**space.sizes, retrieval_feature=cfg.ranker_retrieval_feature)
    arrays = (with_retrieval_scores(ranker_data, retriever.eval(), space.n_items) if cfg.ranker_retrieval_feature
              else ranker_data.as_dict())
    if cfg.ranker_item_init == "tower":
        arrays = arrays | {ITEM_INIT: item_matrix(retriever.eval(), space.n_items).numpy()}
    spec = FitSpec(RANKER, config.to_dict(), MultiTaskRanker.train_inputs(config),
                   cfg.ranker_epochs, cfg.ranker_batch_size, cfg.ranker_lr)
    state, hist = fit_on_ray(spec, arrays | item_lookups(feats), cfg, run_name)
    ranker = build_model(spec.model, spec.model_config)
    ranker.load_state_dict(state)
    return ranker, hist


def shared_ranker(bundle_dir: str | Path, shop_dir: str | Path,
                  cfg: TrainConfig) -> tuple[torch.nn.Module, list[dict]] | None:
    """The ranker of an earlier bundle when it was trained on the same data with the same ranker settings, and,
    when it learns from retrieval (its negatives or its score feature), with the same retrieval model too."""
    other = load_bundle(bundle_dir)
    keys = RANKER_SETTINGS
    if cfg.ranker_negatives == "retrieved" or cfg.ranker_retrieval_feature or cfg.ranker_item_init == "tower":
        keys = tuple(k for k in cfg.to_dict() if k not in ("storage_path", "progress"))  # the whole training run
    same = other.manifest["data_snapshot"] == snapshot_id(shop_dir) and all(
        other.config["train"].get(k) == getattr(cfg, k) for k in keys)
    if not same:
        return None
    return other.ranker(), other.metrics.get("training", {}).get("ranker", [])


RETRIEVAL_MODELS = ("two_tower", "two_tower_in_batch", "multi_interest", "lightgcn")  # registry names a bundle can carry


def train_version(shop_dir: str | Path, bundles_dir: str | Path, version: str, cfg: TrainConfig,
                  ranker_from: str | Path | None = None) -> Path:
    """Trains the retrieval model (`cfg.retrieval_model`) and the ranker on Ray Train; writes `bundles_dir/<version>/`.

    Both learn from the events before a global temporal cutoff; the metrics in the bundle come from the events
    after it (the harness's temporal protocol), with popularity as the reference.

    `ranker_from` names a bundle of the same data whose ranker this version may share: when its data snapshot and
    ranker settings match, its ranker is copied instead of trained again (the ranker does not depend on the
    retrieval model), and the bundle records where it came from.
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
    if hasattr(retriever, "logged_conditions"):  # the multi-interest model learns from what conditions led to
        retriever.logged_conditions = read_condition_triples(shop_dir)
    tower_info = retriever.fit(task, cfg)
    if "condition_examples" in tower_info:
        _log(f"{tower_info['condition_examples']:,} examples trained their logged explicit condition")
    tower = retriever.model

    history = engagements_of(task.train_events, space)
    shared = shared_ranker(ranker_from, shop_dir, cfg) if ranker_from else None
    if shared is not None:
        ranker, ranker_hist = shared
        _log(f"ranker shared from {ranker_from} (same data and ranker settings): not trained again")
    else:
        served_from = shop.meta.get("served_from")
        ranker, ranker_hist = train_ranker(task, history, cfg, f"{version}-ranker-{run_id}", tower,
                                           int(parse_iso(served_from) * 1000) if served_from else None)

    _log("evaluating on the held-out split")
    with torch.inference_mode():
        ranked = retriever.recommend(task, ORDER_CANDIDATES)
        retrieval = {cfg.retrieval_model: evaluate_ranked(ranked, task.targets, KS),
                     "popularity": evaluate_ranked(popularity_ranked(task.popularity, task), task.targets, KS)}
        test_imp = impressions(shop.events, space, history, max_rows=200_000, seed=cfg.seed,
                               item_category=feats.category_idx)
        # Views after the cutoff, with histories frozen at the cutoff so nothing leaks from the test period.
        test_imp = test_imp.subset(test_imp.time_ms >= int(task.new_after_ms))
        test_scores = (with_retrieval_scores(test_imp, tower.eval(), space.n_items)["retrieval_score"]
                       if ranker.config.retrieval_feature else None)
        ranking = evaluate_ranker(ranker.eval(), test_imp, retrieval_score=test_scores)
        # The version serves the best order offline: the ranker's, the fused one or retrieval's.
        order = serving_order(ranker, ranked, task, retriever=tower)
    if order["ranker_ndcg@10"] < order["retrieval_ndcg@10"]:
        _log(f"WARNING: the ranker makes the list worse offline (NDCG@10 {order['ranker_ndcg@10']:.4f} against "
             f"retrieval's own order {order['retrieval_ndcg@10']:.4f}, fused {order['fused_ndcg@10']:.4f}): the "
             f"version serves the {order['serve']} order")
    metrics = {"retrieval": retrieval, "ranking": ranking, "eval_users": len(task.user_ids),
               "retrieval_model": cfg.retrieval_model,
               "protocol": "global temporal split, full-catalog ranking, already-seen items excluded",
               "training": {"retrieval": tower_info["history"], "ranker": ranker_hist,
                            "retrieval_validation": tower_info.get("validation"),
                            "condition_examples": tower_info.get("condition_examples")},
               "ranker_shared_from": str(ranker_from) if shared is not None else None, "serving_order": order,
               "train_seconds": time.perf_counter() - t_start,
               "data_end_time": shop.meta.get("end_time")}  # serving's clock (training.request.clock)
    conditions = getattr(retriever, "conditions", None)  # the multi-interest model's explicit-condition settings
    serving = {"model": cfg.retrieval_model, "conditions": conditions.to_dict() if conditions else {},
               "order": order["serve"]}
    path = write_bundle(bundles_dir, version, space, items_table(shop.catalog, space, task.popularity), tower, ranker,
                        metrics, snapshot_id(shop_dir), cfg.to_dict(), serving)
    _log(f"bundle {path} written in {time.perf_counter() - t_start:.0f}s")
    return path
