"""The registry of trainable retrieval models: a name (`recsys eval --models`, `train.retrieval_model`) -> the
"module:Class" of its adapter, and the protocol an adapter follows. Add a model here and in `training/models/`."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from training.data.splits import RetrievalTask
    from training.fit.train_loop import TrainConfig

REGISTRY: dict[str, str] = {
    "popularity": "training.models.retrieval_baselines:Popularity",
    "item_knn": "training.models.retrieval_baselines:ItemKNN",
    "ease": "training.models.retrieval_baselines:EASE",
    "two_tower_in_batch": "training.fit.retrieval:InBatchTwoTower",
    "sasrec": "training.fit.retrieval:SASRecRetrieval",  # full softmax up to 20k items, else sampled
    "sasrec_sampled": "training.fit.retrieval:SASRecSampled",
    "sasrec_gbce": "training.fit.retrieval:SASRecGBCE",
    "two_tower": "training.fit.retrieval:SeedTwoTowerRetrieval",  # SeedTwoTower is the nn.Module
    "multi_interest": "training.fit.retrieval:MultiInterestRetrieval",
    "lightgcn": "training.fit.retrieval:LightGCNRetrieval",
}


class RetrievalModel(Protocol):
    """What the harness needs from a model (optional extras: recommend_with_reasons, interests, needs_ray)."""

    name: str

    def fit(self, task: RetrievalTask, cfg: TrainConfig) -> dict: ...  # {"seconds", "examples_per_s", "history"}

    def recommend(self, task: RetrievalTask, k: int) -> np.ndarray: ...  # (n_users, k) item indices, 0 = none


def load_model(name: str) -> RetrievalModel:
    """Instantiates a registry model by name; an unknown name or an import failure is an error naming the model."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {list(REGISTRY)}")
    module, _, cls = REGISTRY[name].partition(":")
    try:
        model_cls = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"model {name!r}: cannot import {REGISTRY[name]}: {exc}") from exc
    return model_cls()
