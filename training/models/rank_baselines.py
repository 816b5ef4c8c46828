"""Ranking baselines on the ranker's features and training inputs: logistic regression, DeepFM, DCNv2, MMoE.

Every baseline is multi-task (one logit per task in `training.models.ranker.TASKS`), reads the same `TRAIN_INPUTS` as the
transformer ranker, ignores the logged position (none of the papers models it), and exposes the same `logits`,
`combined` and `loss`, so one evaluation scores them all. The user side is a bag of features: the mean of the
history's action tokens and the averaged context; the candidate side is its id, brand, category and price.

Papers: DeepFM (Guo et al. 2017), DCN-V2 (Wang et al. 2021), MMoE (Ma et al. 2018).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from training.models.embeddings import ItemEmbedding, input_embeddings, masked_mean
from training.data.features import TableSizes
from training.models.ranker import TASKS, MultiTaskRanker

N_FIELDS = 6  # history, context, item id, brand, category, price


@dataclass(frozen=True)
class BaselineConfig(TableSizes):
    dim: int = 16  # per-field embedding, as in the DeepFM / DCN-V2 papers' CTR setups
    hidden: int = 128
    cross_layers: int = 2  # DCNv2: two full-rank cross layers capture the pairwise and triple interactions
    experts: int = 4  # MMoE: as many experts as tasks
    task_weights: tuple[float, ...] = field(default=(1.0, 0.5, 1.0, 2.0))  # same ordering score as the ranker

    @classmethod
    def from_dict(cls, d: dict) -> "BaselineConfig":
        d = dict(d)
        if "task_weights" in d:
            d["task_weights"] = tuple(d["task_weights"])
        return cls(**d)


class FieldEmbedding(nn.Module):
    """The six feature fields of an impression, each embedded to `dim`."""

    def __init__(self, c: BaselineConfig, dim: int) -> None:
        super().__init__()
        self.items, self.sequence, self.context = input_embeddings(c, dim)

    def forward(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
                context: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """(N, L) x3, (N, C), (N,) -> (N, N_FIELDS, dim)."""
        history = masked_mean(*self.sequence(hist_items, hist_actions, hist_ages))  # (N, dim)
        return torch.stack([history, self.context(context)] + self.items.parts(item), dim=1)


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


class _MultiTaskBaseline(nn.Module):
    """Shared plumbing: config, item lookups, the training forward and the ordering score; subclasses define
    `logits(hist_items, hist_actions, hist_ages, context, item) -> (N, T)`."""

    TRAIN_INPUTS = MultiTaskRanker.TRAIN_INPUTS

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("task_weights", torch.tensor(config.task_weights, dtype=torch.float32))
        self.register_buffer("loss_weights", torch.ones(len(TASKS)))

    @classmethod
    def from_config(cls, d: dict) -> "_MultiTaskBaseline":
        return cls(BaselineConfig.from_dict(d))

    def prepare(self, data: dict) -> None:
        """Fills every item lookup from the training arrays (see `training.fit.train_loop`)."""
        for m in self.modules():
            if isinstance(m, ItemEmbedding):
                m.fill_item_features(data)

    combined = MultiTaskRanker.combined
    loss = MultiTaskRanker.loss

    def forward(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
                context: torch.Tensor, item: torch.Tensor, position: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        """Training loss over `TRAIN_INPUTS`; the position is not a feature of these models."""
        return self.loss(self.logits(hist_items, hist_actions, hist_ages, context, item), labels)


class LogisticRegression(_MultiTaskBaseline):
    """One weight per feature value and task: the fields embedded to width T and summed, plus a bias."""

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__(config)
        self.fields = FieldEmbedding(config, len(TASKS))
        self.bias = nn.Parameter(torch.full((len(TASKS),), -2.0))  # start near the rare-positive base rate

    def logits(self, hist_items: Tensor, hist_actions: Tensor, hist_ages: Tensor, context: Tensor,
               item: Tensor) -> Tensor:
        """(N, L) x3, (N, C), (N,) -> (N, T) task logits."""
        return self.fields(hist_items, hist_actions, hist_ages, context, item).sum(1) + self.bias  # (N, T)


class DeepFM(_MultiTaskBaseline):
    """First-order terms + factorisation-machine pairwise interactions + a deep MLP, over shared field embeddings."""

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__(config)
        c = config
        self.linear = LogisticRegression(c)
        self.fields = FieldEmbedding(c, c.dim)
        self.fm_out = nn.Linear(c.dim, len(TASKS), bias=False)  # the FM sum over dims, learned per task
        self.deep = _mlp(N_FIELDS * c.dim, c.hidden, len(TASKS))

    def logits(self, hist_items: Tensor, hist_actions: Tensor, hist_ages: Tensor, context: Tensor,
               item: Tensor) -> Tensor:
        """(N, L) x3, (N, C), (N,) -> (N, T) task logits."""
        e = self.fields(hist_items, hist_actions, hist_ages, context, item)  # (N, F, D)
        fm = 0.5 * (e.sum(1) ** 2 - (e ** 2).sum(1))  # (N, D): sum over field pairs of e_i * e_j
        return (self.linear.logits(hist_items, hist_actions, hist_ages, context, item) + self.fm_out(fm)
                + self.deep(e.flatten(1)))


class DCNv2(_MultiTaskBaseline):
    """Full-rank cross network x_{l+1} = x_0 * (W x_l + b) + x_l, stacked with a deep MLP."""

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__(config)
        c = config
        d = N_FIELDS * c.dim
        self.fields = FieldEmbedding(c, c.dim)
        self.cross = nn.ModuleList(nn.Linear(d, d) for _ in range(c.cross_layers))
        self.deep = _mlp(d, c.hidden, len(TASKS))

    def logits(self, hist_items: Tensor, hist_actions: Tensor, hist_ages: Tensor, context: Tensor,
               item: Tensor) -> Tensor:
        """(N, L) x3, (N, C), (N,) -> (N, T) task logits."""
        x0 = self.fields(hist_items, hist_actions, hist_ages, context, item).flatten(1)  # (N, F * D)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.deep(x)


class MMoE(_MultiTaskBaseline):
    """Shared experts over the field embeddings; each task mixes them with its own softmax gate and tower."""

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__(config)
        c = config
        d = N_FIELDS * c.dim
        self.fields = FieldEmbedding(c, c.dim)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, c.hidden), nn.ReLU()) for _ in range(c.experts))
        self.gates = nn.Linear(d, len(TASKS) * c.experts)
        self.towers = nn.ModuleList(nn.Sequential(nn.Linear(c.hidden, c.hidden // 2), nn.ReLU(),
                                                  nn.Linear(c.hidden // 2, 1)) for _ in TASKS)

    def logits(self, hist_items: Tensor, hist_actions: Tensor, hist_ages: Tensor, context: Tensor,
               item: Tensor) -> Tensor:
        """(N, L) x3, (N, C), (N,) -> (N, T) task logits."""
        x = self.fields(hist_items, hist_actions, hist_ages, context, item).flatten(1)  # (N, F * D)
        h = torch.stack([e(x) for e in self.experts], dim=1)  # (N, E, H)
        g = self.gates(x).view(len(x), len(TASKS), -1).softmax(-1)  # (N, T, E)
        mixed = g @ h  # (N, T, H)
        return torch.cat([tower(mixed[:, t]) for t, tower in enumerate(self.towers)], dim=1)  # (N, T)


BASELINES = {"logistic_regression": "training.models.rank_baselines:LogisticRegression",
             "deepfm": "training.models.rank_baselines:DeepFM",
             "dcnv2": "training.models.rank_baselines:DCNv2",
             "mmoe": "training.models.rank_baselines:MMoE"}
