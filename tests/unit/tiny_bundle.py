"""A tiny shop's bundle with untrained models, for the tests of the request-time cores and the local-mode stack."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.data.features import build_feature_space
from training.data.schemas import Shop
from training.data.synthetic import generate_shop
from training.fit.bundle import write_bundle
from training.fit.version import items_table
from training.models.ranker import MultiTaskRanker, RankerConfig
from training.models.two_tower import SeedTwoTower, SeedTwoTowerConfig


def write_tiny_bundle(folder: Path) -> tuple[Shop, Path]:
    """The tiny shop (seed 0) and a bundle of it, `v1`: a seed two-tower whose item lookups are filled as training
    fills them, so its item tower embeds an item from its attributes as the index does, and a ranker."""
    torch.manual_seed(0)
    shop = generate_shop("tiny", seed=0)
    space = build_feature_space(shop.catalog, shop.users, shop.events)
    sizes = {k: v for k, v in space.sizes.items() if k in SeedTwoTowerConfig.__dataclass_fields__}
    items = items_table(shop.catalog, space, np.ones(space.n_items + 1))
    tower = SeedTwoTower(SeedTwoTowerConfig(**sizes))
    tower.set_item_features(*(torch.from_numpy(np.concatenate([[0], items.column(c).to_numpy()]))
                              for c in ("brand_idx", "category_idx", "price_bucket")))
    path = write_bundle(folder, "v1", space, items, tower, MultiTaskRanker(RankerConfig(**space.sizes)),
                        {"retrieval": {}}, "snap", {}, {"model": "two_tower"})
    return shop, Path(path)
