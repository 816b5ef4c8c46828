"""Neural retrieval models behind the evaluation harness's RetrievalModel protocol (`training.evaluation.harness`).

Each adapter builds its training arrays from `task.train_events` only, trains on Ray Train through
`training.fit.train_loop.fit_on_ray` (the caller has initialised Ray), and ranks the whole catalog exactly for every
evaluated user (chunked matrix product), never returning an item in `task.seen`.

- `InBatchTwoTower`: the foundation `TwoTower` (mean pooling, in-batch softmax + logQ).
- `SeedTwoTowerRetrieval`: seed 000, `SeedTwoTower` (transformer user tower, log-uniform sampled softmax + logQ).
- `SASRecRetrieval`: `SASRec`, causal self-attention over the engagement sequence, next-item prediction; full
  softmax where the catalog allows it. `SASRecSampled` and `SASRecGBCE` fix its other losses.
- `LightGCNRetrieval`: `LightGCN`, propagation over the user-item graph with users aggregated from their history.
"""
from __future__ import annotations

import copy
import itertools
import time
import uuid
from dataclasses import fields

import numpy as np
import pyarrow as pa
import torch

from training.data.examples import tower_examples
from training.data.impressions import CONDITIONS_SCHEMA
from training.data.features import engagements_of, item_lookups
from training.data.splits import RetrievalTask
from training.fit.offline_metrics import item_vectors
from training.fit.validation import VAL_METRIC, training_summary, validation_arrays, validation_task
from training.fit.train_loop import MIN_BATCH_SIZE, FitSpec, TrainConfig, batch_size_for, build_model, fit_on_ray
from training.metrics import top_k_excluding
from training.models.lightgcn import LightGCNConfig
from training.models.multi_interest import MultiInterestConfig
from training.models.retrieval_baselines import recommend_by_chunks
from training.models.sasrec import SEQUENCE_INPUTS, SASRecConfig, sequence_windows
from training.models.two_tower import TOWER_INPUTS, SeedTwoTowerConfig, TwoTowerConfig
from training.request.interests import ConditionConfig, category_query_buckets, merge_queries, user_queries

TWO_TOWER_CLASS = "training.models.two_tower:TwoTower"
SEED_TWO_TOWER_CLASS = "training.models.two_tower:SeedTwoTower"
SASREC_CLASS = "training.models.sasrec:SASRec"


def tower_data(task: RetrievalTask, drop_repeats: bool = True,
               conditions: pa.Table | None = None) -> dict[str, np.ndarray]:
    """Two-tower training arrays (`TOWER_INPUTS`, lookups, `item_counts`) from the task's training events.

    With `drop_repeats`, only a user's first engagement with an item is an example (the purchase after the click
    is dropped): every protocol excludes seen items from the ranking, so learning to repeat them is wasted capacity.
    With `conditions` (logged triples, `training.data.impressions.CONDITIONS_SCHEMA`), a "condition" array gives
    each example the category index of the explicit condition that retrieved its target, 0 where none did.
    """
    ex = tower_examples(task.train_events, task.space, task.item_features.category_idx)
    keep = np.ones(len(ex), dtype=bool)
    if drop_repeats:
        order = np.argsort(ex.time_ms, kind="stable")
        pair = ex.user_code[order] * (task.space.n_items + 1) + ex.target[order]
        keep = np.zeros(len(ex), dtype=bool)
        keep[order[np.unique(pair, return_index=True)[1]]] = True  # np.unique returns each pair's first index
    data = {k: getattr(ex, k)[keep] for k in TOWER_INPUTS}
    if conditions is not None:
        data["condition"] = logged_conditions(task, conditions, ex.user_code[keep], data["target"],
                                              ex.time_ms[keep])
    counts = np.bincount(data["target"], minlength=task.space.n_items + 1)
    return data | item_lookups(task.item_features) | {"item_counts": counts}


def logged_conditions(task: RetrievalTask, triples: pa.Table, user_code: np.ndarray, target: np.ndarray,
                      time_ms: np.ndarray) -> np.ndarray:
    """(n,) int64 category index of the logged condition of each (user, target, time) example: the triple of the
    same user and item whose engagement is that example's; 0 where no triple is, or its category is unknown."""
    out = np.zeros(len(target), dtype=np.int64)
    if triples.num_rows == 0 or len(target) == 0:
        return out
    umap = engagements_of(task.train_events, task.space).user_map  # the codes `tower_examples` gives
    codes = np.fromiter((umap.get(u, -1) for u in triples["user_id"].to_pylist()), dtype=np.int64,
                        count=triples.num_rows)
    items = task.space.lookup("item_ids", triples["item_id"].to_pylist())
    t = triples["timestamp"].cast(pa.int64()).to_numpy()
    category = task.space.lookup("categories", triples["category"].to_pylist())
    logged = {(int(c), int(i), int(ms)): int(g) for c, i, ms, g in zip(codes, items, t, category)
              if c >= 0 and i > 0 and g > 0}  # a triple naming no known user, item or category trains nothing
    for r, key in enumerate(zip(user_code.tolist(), target.tolist(), time_ms.tolist())):
        out[r] = logged.get(key, 0)
    return out


def sasrec_data(task: RetrievalTask, length: int | None = None) -> dict[str, np.ndarray]:
    """SASRec windows (`SEQUENCE_INPUTS`), lookups and `item_counts` (target counts) from the training events."""
    windows = sequence_windows(engagements_of(task.train_events, task.space), length or task.space.history_len)
    targets = windows["seq_targets"]
    counts = np.bincount(targets[targets > 0], minlength=task.space.n_items + 1)
    return windows | item_lookups(task.item_features) | {"item_counts": counts}


def _config_fields(config_cls: type) -> set[str]:
    return {f.name for f in fields(config_cls)}


SCHEDULE_KEYS = ("lr", "batch_size", "epochs")  # search keys of the schedule; any other is a model config field
MAX_SEARCH = 16  # combinations per model: each is a whole fit


def search_grid(space: dict, model_fields: set[str]) -> tuple[list[dict], list[str]]:
    """Every combination of the search space's values for the keys a model has, and the keys it does not have.

    Args:
        space: {key: [values]} (`TrainConfig.search`), keys of `SCHEDULE_KEYS` or of the model's config.
        model_fields: the model config's field names.
    Raises:
        ValueError: a key without values, or more than `MAX_SEARCH` combinations.
    """
    keys = [k for k in space if k in SCHEDULE_KEYS or k in model_fields]
    skipped = sorted(set(space) - set(keys))
    for k in keys:
        if not isinstance(space[k], (list, tuple)) or not space[k]:
            raise ValueError(f"train.search.{k}: a non-empty list of values, got {space[k]!r}")
    grid = [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))] if keys else []
    if len(grid) > MAX_SEARCH:
        raise ValueError(f"train.search: {len(grid)} combinations, at most {MAX_SEARCH} (each is a whole fit)")
    return grid, skipped


class _NeuralRetrieval:
    """Shared fit/recommend of the neural adapters; subclasses say which model, config and training arrays."""

    name = ""
    model_class = ""
    config_cls: type = TwoTowerConfig
    inputs: tuple[str, ...] = TOWER_INPUTS
    default_batch_size: int | None = None  # None: `TrainConfig.tower_batch_size`
    min_batch_size: int = MIN_BATCH_SIZE  # floor of the small-data batch rule (`batch_size_for`)
    default_model_config: dict = {}  # config fields a registry variant fixes (a SASRec loss); the constructor overrides

    def __init__(self, epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 run_name: str | None = None, **model_config) -> None:
        """Args:
            epochs, batch_size (per worker), lr: override `TrainConfig.tower_*` of the harness's config. A
                batch size given here is used as is; otherwise the configured one is shrunk on small data
                (`batch_size_for`).
            run_name: Ray Train run name; a run of that name under `cfg.storage_path` resumes from its last
                checkpoint. Default: a fresh name per fit, so a finished run is never resumed by accident.
            model_config: fields of the model's config dataclass (dim, temperature, ...); unknown keys are errors.
        """
        unknown = set(model_config) - _config_fields(self.config_cls)
        if unknown:
            raise ValueError(f"{self.name}: unknown model config keys {sorted(unknown)}; "
                             f"known: {sorted(_config_fields(self.config_cls))}")
        self.epochs, self.batch_size, self.lr, self.run_name = epochs, batch_size, lr, run_name
        self.model_config = dict(self.default_model_config) | model_config
        self.model: torch.nn.Module | None = None

    def training_data(self, task: RetrievalTask) -> dict[str, np.ndarray]:
        """The arrays `fit_on_ray` ships to the workers: `inputs`, item lookups and `item_counts`."""
        return tower_data(task)

    def fit_spec(self, task: RetrievalTask, cfg: TrainConfig, n_examples: int | None = None) -> FitSpec:
        """The model class, its config (table sizes from `task.space`, `cfg.dim`, overrides) and the schedule.

        With `n_examples` (rows of the training arrays), a batch size not given to the constructor follows
        `batch_size_for` on `cfg.num_workers` workers.
        """
        sizes = {k: v for k, v in task.space.sizes.items() if k in _config_fields(self.config_cls)}
        config = self.config_cls(**sizes, **({"dim": cfg.dim} | self.model_config))
        batch_size = self.batch_size or self.default_batch_size or cfg.tower_batch_size
        if self.batch_size is None and n_examples is not None:
            batch_size = batch_size_for(n_examples, cfg.num_workers, batch_size, self.min_batch_size)
        return FitSpec(self.model_class, config.to_dict(), self.inputs, self.epochs or cfg.tower_epochs,
                       batch_size, self.lr or cfg.tower_lr)

    def fit(self, task: RetrievalTask, cfg: TrainConfig) -> dict:
        """Trains on Ray Train against a validation split of the task's training events (`training.fit.validation`):
        the epoch budget is an upper bound, training stops after `cfg.patience` epochs without a better validation
        NDCG@10, and the best epoch's weights are kept. With `cfg.search`, one fit per combination of the values
        this model has (`search_grid`), and the one with the best validation NDCG@10 is kept.

        Returns:
            {"seconds", "examples_per_s" (last epoch), "examples", "batch_size", "history" (per epoch, with the
            validation scores), "validation" (`training_summary`: epochs run, best epoch and score, warning),
            "search" (per combination: params, validation score, epochs; with the chosen one) when searched}.
        """
        t0 = time.perf_counter()
        val = validation_task(task, cfg.val_users, cfg.seed, cfg.test_fraction) if cfg.val_users > 0 else None
        data = self.training_data(val or task)  # the validation targets are not learnt from
        if val is not None:
            data |= validation_arrays(val)
        n_examples = len(data[self.inputs[0]])
        grid, skipped = search_grid(cfg.search, _config_fields(self.config_cls))
        if val is None or not grid:
            grid = [{}]  # nothing to choose with (no validation users) or nothing this model has
        run_name = self.run_name or f"{self.name}-{task.dataset or 'data'}-{task.protocol}-{uuid.uuid4().hex[:8]}"
        runs = []
        for i, params in enumerate(grid):
            t1 = time.perf_counter()
            spec = self._with(params).fit_spec(task, cfg, n_examples=n_examples)
            state, history = fit_on_ray(spec, data, cfg, run_name if len(grid) == 1 else f"{run_name}-s{i}")
            summary = training_summary(history, spec.epochs, cfg.patience) | {
                "validation_users": len(val.user_ids) if val is not None else 0}
            runs.append({"params": params, "spec": spec, "state": state, "history": history, "summary": summary,
                         "seconds": time.perf_counter() - t1})
        best = max(runs, key=lambda r: r["summary"].get(VAL_METRIC) or -1.0)  # the first of equal scores
        spec, history, summary = best["spec"], best["history"], best["summary"]
        model = build_model(spec.model, spec.model_config)
        model.load_state_dict(best["state"])
        self.model = model.eval()
        if summary["warning"]:
            print(f"[{self.name}] WARNING: {summary['warning']}", flush=True)
        out = {"seconds": time.perf_counter() - t0, "examples_per_s": float(history[-1]["examples_per_s"]),
               "examples": int(n_examples), "batch_size": spec.batch_size, "history": history,
               "validation": summary}
        if len(runs) > 1 or skipped:
            out["search"] = {"chosen": best["params"], "skipped_keys": skipped,
                             "runs": [{"params": r["params"], VAL_METRIC: r["summary"].get(VAL_METRIC),
                                       "best_epoch": r["summary"]["best_epoch"],
                                       "epochs_run": r["summary"]["epochs_run"], "seconds": r["seconds"]}
                                      for r in runs]}
        return out

    def _with(self, params: dict) -> "_NeuralRetrieval":
        """A copy of this adapter with search `params` applied (schedule keys and model config fields)."""
        clone = copy.copy(self)
        clone.model_config = dict(self.model_config) | {k: v for k, v in params.items() if k not in SCHEDULE_KEYS}
        for key in SCHEDULE_KEYS:
            if key in params:
                setattr(clone, key, params[key])
        return clone

    def _trained(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError(f"{self.name}: call fit(task, cfg) before recommending")
        return self.model

    @torch.inference_mode()
    def recommend(self, task: RetrievalTask, k: int) -> np.ndarray:
        """(n_users, k) int64 item indices best first by exact dot product over the whole catalog; seen excluded."""
        model = self._trained()
        V = model.item_tower_by_index(torch.arange(task.space.n_items + 1))  # (n_items + 1, D)

        def score_rows(rows: slice) -> np.ndarray:
            U = model.user_tower(*(torch.from_numpy(a) for a in task.user_inputs(rows)))  # (r, D)
            scores = U @ V.T  # (r, n_items + 1)
            scores[:, 0] = -torch.inf  # padding
            return scores.numpy()

        return recommend_by_chunks(task, k, score_rows)


class InBatchTwoTower(_NeuralRetrieval):
    """The foundation two-tower: mean-pooled history + context, in-batch softmax with logQ correction."""

    name = "two_tower_in_batch"
    model_class = TWO_TOWER_CLASS
    config_cls = TwoTowerConfig


class SeedTwoTowerRetrieval(_NeuralRetrieval):
    """Seed 000: transformer (or attention-pooling) user tower, log-uniform sampled softmax with logQ correction."""

    name = "two_tower"
    model_class = SEED_TWO_TOWER_CLASS
    config_cls = SeedTwoTowerConfig


class SASRecRetrieval(_NeuralRetrieval):
    """SASRec next-item model trained on windows of each user's engagement sequence."""

    name = "sasrec"
    model_class = SASREC_CLASS
    config_cls = SASRecConfig
    inputs = SEQUENCE_INPUTS
    default_batch_size = 128  # windows hold ~4 targets each on the demo shop: ~540 next-item targets per step
    min_batch_size = 16  # windows, not examples: 16 windows still hold ~60 next-item targets

    def training_data(self, task: RetrievalTask) -> dict[str, np.ndarray]:
        """Next-item windows of every user's training engagements."""
        return sasrec_data(task)


class SASRecSampled(SASRecRetrieval):
    """SASRec trained with the log-uniform sampled softmax + logQ whatever the catalog size."""

    name = "sasrec_sampled"
    default_model_config = {"loss": "sampled"}


class SASRecGBCE(SASRecRetrieval):
    """gSASRec: SASRec trained with gBCE over 256 uniform negatives per position (t = 0.75)."""

    name = "sasrec_gbce"
    default_model_config = {"loss": "gbce"}


def graph_edges(task: RetrievalTask) -> dict[str, np.ndarray]:
    """One edge per distinct engaged (user, item) pair of the training events: `GRAPH_INPUTS` for `LightGCN`."""
    eng = engagements_of(task.train_events, task.space)
    keep = eng.item_idx > 0
    pair = np.unique(eng.user_code[keep].astype(np.int64) * (task.space.n_items + 1) + eng.item_idx[keep])
    return {"graph_user": pair // (task.space.n_items + 1), "graph_item": pair % (task.space.n_items + 1)}


class LightGCNRetrieval(_NeuralRetrieval):
    """`LightGCN`: item embeddings propagated over the engagement graph, users aggregated from their history, so it
    serves like the two-tower (item vectors in the index, a user vector per request)."""

    name = "lightgcn"
    model_class = "training.models.lightgcn:LightGCN"
    config_cls = LightGCNConfig

    def training_data(self, task: RetrievalTask) -> dict[str, np.ndarray]:
        """The two-tower's (history, next item) examples and the graph of the same events."""
        return tower_data(task) | graph_edges(task)


class MultiInterestRetrieval(_NeuralRetrieval):
    """`MultiInterestModel`: recommends by one exact query per interest and explicit condition over the whole
    catalog, merged with quotas, with the same query builder and merge as serving (`training.request.interests`)."""

    name = "multi_interest"
    model_class = "training.models.multi_interest:MultiInterestModel"
    config_cls = MultiInterestConfig
    inputs = (*TOWER_INPUTS, "condition")

    def __init__(self, epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 run_name: str | None = None, conditions: dict | None = None, **model_config) -> None:
        """conditions: `ConditionConfig` fields (where explicit conditions come from, the relevance filter); a
        version trained with this adapter records them in its bundle, so serving runs the same settings.

        `logged_conditions` (set before `fit`): the (condition, user, item) triples of what an earlier version
        served (`training.data.impressions.condition_triples`); each engagement an explicit condition led to
        trains that condition's query. None: the conditions learn from the target's category alone."""
        super().__init__(epochs, batch_size, lr, run_name, **model_config)
        self.conditions = ConditionConfig.from_dict(conditions)
        self.logged_conditions: pa.Table | None = None
        self.condition_examples = 0  # examples of the last fit with a logged condition

    def fit(self, task: RetrievalTask, cfg: TrainConfig) -> dict:
        """`_NeuralRetrieval.fit`, reporting "condition_examples": the examples a logged condition trained."""
        info = super().fit(task, cfg)
        return info | {"condition_examples": self.condition_examples}

    def training_data(self, task: RetrievalTask) -> dict[str, np.ndarray]:
        """The two-tower's examples, each with the condition logged for it ("condition", 0 = none)."""
        data = tower_data(task, conditions=self.logged_conditions if self.logged_conditions is not None
                          else CONDITIONS_SCHEMA.empty_table())
        self.condition_examples = int((data["condition"] > 0).sum())
        return data

    def recommend(self, task: RetrievalTask, k: int) -> np.ndarray:
        """(n_users, k) int64 item indices best first, seen items excluded, 0 = no item."""
        return self.recommend_with_reasons(task, k)[0]

    @torch.inference_mode()
    def recommend_with_reasons(self, task: RetrievalTask, k: int,
                               chunk: int = 256) -> tuple[np.ndarray, list[list[str]]]:
        """The same with the reason of every item ("interest:<i>" or "condition:category=<c>")."""
        model = self._trained()
        V = item_vectors(model)  # (n_items + 1, D)
        item_category = model.items.item_category.numpy()
        qcat = category_query_buckets(task.space.categories)
        out = np.zeros((len(task.user_ids), k), dtype=np.int64)
        reasons: list[list[str]] = []
        for s in range(0, len(task.user_ids), chunk):
            rows = np.arange(s, min(s + chunk, len(task.user_ids)))
            q = user_queries(model, task.user_inputs(rows), item_category, task.space.categories, qcat,
                             self.conditions)
            scores = q.xq @ V.T  # (nq, n_items + 1): exact search over the whole catalog
            I = top_k_excluding(scores, k, [task.seen[s + o] for o in q.owner])
            D = np.take_along_axis(scores, np.maximum(I, 0), axis=1)
            for r, (items, _, why) in enumerate(merge_queries(D, I, q, len(rows), k, item_category,
                                                              self.conditions.min_score)):
                out[s + r, :len(items)] = items
                reasons.append(why)
        return out, reasons

    @torch.inference_mode()
    def interests(self, task: RetrievalTask, chunk: int = 4096) -> np.ndarray:
        """(n_users,) implicit interests used per user."""
        model = self._trained()
        out = [model.user_interests(*(torch.from_numpy(np.ascontiguousarray(a))
                                      for a in task.user_inputs(slice(s, s + chunk))))[2].sum(1).numpy()
               for s in range(0, len(task.user_ids), chunk)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
