"""Ranking baselines on the ranker's features and training inputs: logistic regression, DeepFM, DCNv2, MMoE, PLE,
DLRM and ESMM.

Every baseline is multi-task (one logit per task in `training.models.ranker.TASKS`), reads the same `TRAIN_INPUTS` as the
transformer ranker, ignores the logged position (none of the papers models it), and exposes the same `logits`,
`combined` and `loss`, so one evaluation scores them all. The user side is a bag of features: the mean of the
history's action tokens and the averaged context; the candidate side is its id, brand, category and price.

Papers: DeepFM (Guo et al. 2017), DCN-V2 (Wang et al. 2021), MMoE (Ma et al. 2018), PLE (Tang et al. 2020),
DLRM (Naumov et al. 2019), ESMM (Ma et al. 2018, "Entire Space Multi-Task Model").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
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
    experts: int = 4  # MMoE: as many experts as tasks; PLE: the shared experts
    task_experts: int = 1  # PLE: experts of each task's own, beside the shared ones
    ple_levels: int = 2  # PLE: extraction levels (the paper's progressive layers); 1 is its single-level CGC
    task_weights: tuple[float, ...] = field(default=(1.0, 0.5, 1.0, 2.0))  # same ordering score as the ranker
    # The candidate's retrieval score as an input, added to every task logit through a linear map of its
    # standardised value (the ranker's direct path, `RankerConfig.retrieval_feature`), so a baseline gets the
    # same first-stage signal as the transformer when the two are compared.
    retrieval_feature: bool = False

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


def _expert(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU())


def _tower(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1))


class _MultiTaskBaseline(nn.Module):
    """Shared plumbing: config, item lookups, the training forward and the ordering score; subclasses define
    `logits(hist_items, hist_actions, hist_ages, context, item) -> (N, T)`."""

    TRAIN_INPUTS = MultiTaskRanker.TRAIN_INPUTS

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("task_weights", torch.tensor(config.task_weights, dtype=torch.float32))
        self.register_buffer("loss_weights", torch.ones(len(TASKS)))
        if config.retrieval_feature:
            self.retrieval_logit = nn.Linear(1, len(TASKS))
            self.register_buffer("retrieval_mean", torch.zeros(()))
            self.register_buffer("retrieval_std", torch.ones(()))

    @classmethod
    def from_config(cls, d: dict) -> "_MultiTaskBaseline":
        return cls(BaselineConfig.from_dict(d))

    @classmethod
    def train_inputs(cls, config: BaselineConfig) -> tuple[str, ...]:
        return cls.TRAIN_INPUTS + (("retrieval_score",) if config.retrieval_feature else ())

    def prepare(self, data: dict) -> None:
        """Fills every item lookup from the training arrays (see `training.fit.train_loop`), and with the retrieval
        feature the statistics its scores are standardised with."""
        for m in self.modules():
            if isinstance(m, ItemEmbedding):
                m.fill_item_features(data)
        if self.config.retrieval_feature:
            MultiTaskRanker.prepare_retrieval_statistics(self, data)

    combined = MultiTaskRanker.combined
    loss = MultiTaskRanker.loss

    def scored_logits(self, hist_items: Tensor, hist_actions: Tensor, hist_ages: Tensor, context: Tensor,
                      item: Tensor, retrieval_score: Tensor | None = None) -> Tensor:
        """`logits` plus, with the retrieval feature, the direct path of the candidates' retrieval scores."""
        logits = self.logits(hist_items, hist_actions, hist_ages, context, item)
        if not self.config.retrieval_feature:
            return logits
        if retrieval_score is None:
            raise ValueError("this baseline was trained with retrieval_feature: pass the candidates' retrieval_score")
        s = (retrieval_score.to(logits.dtype).reshape(-1, 1) - self.retrieval_mean) / self.retrieval_std
        return logits + self.retrieval_logit(s)

    def forward(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
                context: torch.Tensor, item: torch.Tensor, position: torch.Tensor,
                labels: torch.Tensor, retrieval_score: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss over `train_inputs`; the position is not a feature of these models."""
        return self.loss(self.scored_logits(hist_items, hist_actions, hist_ages, context, item, retrieval_score),
                         labels)


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
        self.linear = LogisticRegression(dataclasses.replace(c, retrieval_feature=False))  # the score: once, here
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
        self.experts = nn.ModuleList(_expert(d, c.hidden) for _ in range(c.experts))
        self.gates = nn.Linear(d, len(TASKS) * c.experts)
        self.towers = nn.ModuleList(_tower(c.hidden) for _ in TASKS)

    def logits(self, hist_items: Tensor, hist_actions: Tensor, hist_ages: Tensor, context: Tensor,
               item: Tensor) -> Tensor:
        """(N, L) x3, (N, C), (N,) -> (N, T) task logits."""
        x = self.fields(hist_items, hist_actions, hist_ages, context, item).flatten(1)  # (N, F * D)
        h = torch.stack([e(x) for e in self.experts], dim=1)  # (N, E, H)
        g = self.gates(x).view(len(x), len(TASKS), -1).softmax(-1)  # (N, T, E)
        mixed = g @ h  # (N, T, H)
        return torch.cat([tower(mixed[:, t]) for t, tower in enumerate(self.towers)], dim=1)  # (N, T)


class PLE(_MultiTaskBaseline):
    """Progressive layered extraction: per level, each task mixes its own experts and the shared ones with its own
    gate, and a shared gate mixes all of them for the next level's shared experts. Unlike MMoE, where every task
    reads the same experts, a task's own experts keep the rare tasks (purchase) from being pulled toward click."""

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__(config)
        c = config
        if c.ple_levels < 1 or c.experts < 1 or c.task_experts < 1:
            raise ValueError(f"PLE needs ple_levels, experts and task_experts >= 1, got {c.ple_levels}, "
                             f"{c.experts}, {c.task_experts}")
        self.fields = FieldEmbedding(c, c.dim)
        t, own, shared = len(TASKS), c.task_experts, c.experts
        self.levels = nn.ModuleList()
        for level in range(c.ple_levels):
            d_in = N_FIELDS * c.dim if level == 0 else c.hidden
            last = level == c.ple_levels - 1
            self.levels.append(nn.ModuleDict({
                "shared": nn.ModuleList(_expert(d_in, c.hidden) for _ in range(shared)),
                "own": nn.ModuleList(nn.ModuleList(_expert(d_in, c.hidden) for _ in range(own)) for _ in range(t)),
                "task_gates": nn.ModuleList(nn.Linear(d_in, own + shared) for _ in range(t)),
                "shared_gate": nn.Identity() if last else nn.Linear(d_in, t * own + shared)}))
        self.towers = nn.ModuleList(_tower(c.hidden) for _ in TASKS)

    def logits(self, hist_items: Tensor, hist_actions: Tensor, hist_ages: Tensor, context: Tensor,
               item: Tensor) -> Tensor:
        """(N, L) x3, (N, C), (N,) -> (N, T) task logits."""
        x = self.fields(hist_items, hist_actions, hist_ages, context, item).flatten(1)  # (N, F * D)
        task_in, shared_in = [x] * len(TASKS), x
        for level in self.levels:
            shared = [e(shared_in) for e in level["shared"]]
            own = [[e(task_in[t]) for e in experts] for t, experts in enumerate(level["own"])]
            task_out = []
            for t, gate in enumerate(level["task_gates"]):
                h = torch.stack(own[t] + shared, dim=1)  # (N, own + shared, H)
                task_out.append((gate(task_in[t]).softmax(-1).unsqueeze(1) @ h).squeeze(1))  # (N, H)
            if not isinstance(level["shared_gate"], nn.Identity):
                h = torch.stack([e for experts in own for e in experts] + shared, dim=1)  # (N, T * own + shared, H)
                shared_in = (level["shared_gate"](shared_in).softmax(-1).unsqueeze(1) @ h).squeeze(1)
            task_in = task_out
        return torch.cat([tower(task_in[t]) for t, tower in enumerate(self.towers)], dim=1)  # (N, T)


class DLRM(_MultiTaskBaseline):
    """DLRM: the dense side through a bottom MLP, then the dot product of every pair of field vectors, concatenated
    with the dense vector, through a top MLP. The history bag (the mean of its action tokens) is the dense side, as
    DLRM's continuous features are; context and the candidate's id, brand, category and price are its sparse ones."""

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__(config)
        c = config
        self.fields = FieldEmbedding(c, c.dim)
        self.bottom = nn.Sequential(nn.Linear(c.dim, c.hidden), nn.ReLU(), nn.Linear(c.hidden, c.dim), nn.ReLU())
        rows, cols = torch.triu_indices(N_FIELDS, N_FIELDS, offset=1)
        self.register_buffer("pairs_i", rows, persistent=False)
        self.register_buffer("pairs_j", cols, persistent=False)
        self.top = _mlp(c.dim + len(rows), c.hidden, len(TASKS))

    def logits(self, hist_items: Tensor, hist_actions: Tensor, hist_ages: Tensor, context: Tensor,
               item: Tensor) -> Tensor:
        """(N, L) x3, (N, C), (N,) -> (N, T) task logits."""
        e = self.fields(hist_items, hist_actions, hist_ages, context, item)  # (N, F, D); field 0 = the history
        dense = self.bottom(e[:, 0])  # (N, D)
        z = torch.cat([dense.unsqueeze(1), e[:, 1:]], dim=1)  # (N, F, D)
        dots = (z @ z.transpose(1, 2))[:, self.pairs_i, self.pairs_j]  # (N, F * (F - 1) / 2)
        return self.top(torch.cat([dense, dots], dim=1))


def product_logit(a: Tensor, b: Tensor) -> Tensor:
    """logit(sigmoid(a) * sigmoid(b)), computed in log space so neither underflows."""
    log_p = (F.logsigmoid(a) + F.logsigmoid(b)).clamp(max=-1e-7)
    return log_p - torch.log(-torch.expm1(log_p))


class ESMM(_MultiTaskBaseline):
    """Entire-space multi-task model: p(click) and p(task | click) from two towers over shared embeddings; every
    task's output is p(click) * p(task | click), so its loss is taken over all impressions, not only clicked ones
    (no sample-selection bias from training conversion on clicks alone, and the sparse conversion task borrows the
    click task's embeddings). Task 0 must be the click."""

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__(config)
        c = config
        if TASKS[0] != "click":
            raise ValueError(f"ESMM factors every task through the click, but the first task is {TASKS[0]!r}")
        self.fields = FieldEmbedding(c, c.dim)
        self.ctr = _mlp(N_FIELDS * c.dim, c.hidden, 1)
        self.cvr = _mlp(N_FIELDS * c.dim, c.hidden, len(TASKS) - 1)  # p(wishlist / cart / purchase | click)

    def logits(self, hist_items: Tensor, hist_actions: Tensor, hist_ages: Tensor, context: Tensor,
               item: Tensor) -> Tensor:
        """(N, L) x3, (N, C), (N,) -> (N, T) task logits over the entire space (click, click x each task)."""
        x = self.fields(hist_items, hist_actions, hist_ages, context, item).flatten(1)  # (N, F * D)
        click = self.ctr(x)  # (N, 1)
        return torch.cat([click, product_logit(click, self.cvr(x))], dim=1)


BASELINES = {"logistic_regression": "training.models.rank_baselines:LogisticRegression",
             "deepfm": "training.models.rank_baselines:DeepFM",
             "dcnv2": "training.models.rank_baselines:DCNv2",
             "mmoe": "training.models.rank_baselines:MMoE",
             "ple": "training.models.rank_baselines:PLE",
             "dlrm": "training.models.rank_baselines:DLRM",
             "esmm": "training.models.rank_baselines:ESMM"}
