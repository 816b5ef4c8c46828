"""The retrieval evaluation harness behind `recsys eval`: every model on the same data, split and metrics.

`run_eval` loads a data set (`training.data.loaders`), builds one task per protocol (`training.data.splits`), fits
every requested model of `REGISTRY` (`training.fit.registry`) on the task's training events (neural models train on
Ray Train inside their `fit`), ranks the whole catalog for each evaluated user with seen items excluded, computes
the metrics (`training.metrics`) and the sampled protocol (`training.evaluation.protocols`), adds the ranking and
policy sections, and writes the report (`training.evaluation.report`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console

from training import NAMESPACE
from training.data.features import ENGAGEMENTS
from training.data.loaders import FORMATS, load_dataset
from training.data.preprocess import for_format, preprocess
from training.metrics import (HARNESS_KS, brand_diversity, catalog_coverage, evaluate_ranked, novelty_recall,
                              per_user_at_k)
from training.data.splits import RetrievalTask, leave_last_out, temporal
from training.evaluation.protocols import SAMPLERS, SampledTrials, sample_trials, sampled_ranking_metrics
from training.evaluation.report import PROTOCOL_TEXT, write_report
from training.data.schemas import Shop
from training.fit.registry import REGISTRY, RetrievalModel, load_model
from training.fit.train_loop import TrainConfig

PROTOCOLS = ("leave_last_out", "temporal")
K = max(HARNESS_KS)  # every model returns its top 500: the candidate budget, and the deepest metric cut-off
HISTORY_BUCKETS = ((1, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, None))  # distinct items seen before prediction


def build_task(shop: Shop, protocol: str, max_users: int | None, cfg: TrainConfig, dataset: str) -> RetrievalTask:
    """The task of one protocol on a loaded shop."""
    if protocol == "leave_last_out":
        return leave_last_out(shop, max_users=max_users, seed=cfg.seed, history_len=cfg.history_len, dataset=dataset)
    if protocol == "temporal":
        return temporal(shop, test_fraction=cfg.test_fraction, max_users=max_users, seed=cfg.seed,
                        history_len=cfg.history_len, dataset=dataset)
    raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")


def history_breakdown(task: RetrievalTask, recall100: np.ndarray, ndcg10: np.ndarray) -> dict:
    """Mean Recall@100 and NDCG@10 per bucket of history length (distinct items engaged before the prediction)."""
    length = np.array([len(s) for s in task.seen])
    out = {}
    for lo, hi in HISTORY_BUCKETS:
        mask = (length >= lo) & (length <= (hi if hi is not None else np.inf))
        out[f"{lo}-{hi}" if hi else f"{lo}+"] = {
            "users": int(mask.sum()),
            "recall@100": float(np.nanmean(recall100[mask])) if mask.any() else float("nan"),
            "ndcg@10": float(np.nanmean(ndcg10[mask])) if mask.any() else float("nan")}
    return out


def evaluate_model(task: RetrievalTask, ranked: np.ndarray, trials: dict[str, SampledTrials],
                   seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Every metric of one model's (n_users, K) lists, and its per-user arrays for breakdowns across models."""
    if ranked.shape != (len(task.user_ids), K):
        raise ValueError(f"recommend must return shape {(len(task.user_ids), K)}, got {ranked.shape}")
    at100, at500, at10 = (per_user_at_k(ranked, task.targets, k) for k in (100, 500, 10))
    created = task.item_created_ms
    novelty = {}
    for k in (100, 500):
        novelty[f"recall@{k}"], novelty["users"] = novelty_recall(ranked, task.targets, created, task.new_after_ms, k)
    run, unique = brand_diversity(ranked, task.item_features.brand_idx, 10)
    result = {"full": evaluate_ranked(ranked, task.targets, HARNESS_KS), "novelty": novelty,
              "diversity": {"longest_brand_run@10": float(run.mean()), "unique_brands@10": float(unique.mean())},
              "coverage": {f"@{k}": catalog_coverage(ranked, task.space.n_items, k) for k in HARNESS_KS},
              "sampled": {s: sampled_ranking_metrics(task, ranked=ranked, trials=t, seed=seed)
                          for s, t in trials.items()},
              "by_history_length": history_breakdown(task, at100["recall"], at10["ndcg"])}
    return result, {"recall@500": at500["recall"]}


def interest_groups(task: RetrievalTask) -> tuple[str, np.ndarray] | None:
    """(basis, (n,) group size per evaluated user) for the multi-interest comparison: the number of true interests
    on a synthetic shop, else the history's diversity (distinct categories among the items seen before the
    prediction), the observable proxy on real data. None when neither says anything (every item one category)."""
    if "user_n_interests" in task.hidden:
        return "true interests", np.asarray(task.hidden["user_n_interests"])[task.user_rows]
    category = task.item_features.category_idx
    distinct = np.array([len(np.unique(category[s])) for s in task.seen], dtype=np.int64)
    if distinct.max(initial=0) <= 1:
        return None
    return "distinct categories in the history", distinct


def multi_interest_gain(task: RetrievalTask, per_user: dict[str, dict[str, np.ndarray]]) -> dict:
    """Recall@500 of multi_interest minus two_tower per group of users (`interest_groups`).

    Returns:
        {"basis": ..., "groups": {"1": ..., "2": ..., "3+": ...}}: users, both recalls, the gain, and the mean
        number of interests the multi-interest model used for those users (when it reports them); {} without both
        models or any grouping.
    """
    grouping = interest_groups(task)
    if grouping is None or not {"multi_interest", "two_tower"} <= set(per_user):
        return {}
    basis, n_interests = grouping
    groups = {str(int(n)): n_interests == n for n in np.unique(n_interests) if n < 3 or basis == "true interests"}
    groups["3+"] = n_interests >= 3  # the claim is about users with 3 or more interests
    used = per_user["multi_interest"].get("interests")
    out = {}
    for label, mask in groups.items():
        if not mask.any():
            continue
        mi = float(np.nanmean(per_user["multi_interest"]["recall@500"][mask]))
        tt = float(np.nanmean(per_user["two_tower"]["recall@500"][mask]))
        out[label] = {"users": int(mask.sum()), "multi_interest": mi, "two_tower": tt, "gain": mi - tt,
                      "interests_used": float(np.mean(used[mask])) if used is not None else float("nan")}
    return {"basis": basis, "groups": out}


def _recommend(model: RetrievalModel, task: RetrievalTask) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """The model's top K, its optional extras (reason shares, mean interests) and (n,) interests used per user."""
    extras: dict = {}
    used = None
    if hasattr(model, "recommend_with_reasons"):
        ranked, reasons = model.recommend_with_reasons(task, K)
        kinds, counts = np.unique([r.split(":")[0] for row in reasons for r in row[:10]], return_counts=True)
        extras["reasons@10"] = {str(k): float(c / max(counts.sum(), 1)) for k, c in zip(kinds, counts)}
    else:
        ranked = model.recommend(task, K)
    if hasattr(model, "interests"):
        used = np.asarray(model.interests(task), dtype=np.float64)
        extras["interests_mean"] = float(used.mean()) if used.size else float("nan")
    return np.asarray(ranked, dtype=np.int64), extras, used


def _start_ray_if_needed(models: list[RetrievalModel], sections: bool) -> bool:
    """Starts Ray when a model or a report section trains on Ray Train and none is running; True if this started it.

    Embedded (this process's own local Ray) unless RAY_ADDRESS names a cluster, which ray.init() then joins.
    """
    if not sections and not any(getattr(m, "needs_ray", True) for m in models):  # the ranking section trains
        return False
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if "RAY_ADDRESS" in os.environ:
        ray.init(namespace=NAMESPACE)
    else:
        ray.init(namespace=NAMESPACE, include_dashboard=False)
    return True


def _sections(task: RetrievalTask, candidates: np.ndarray, cfg: TrainConfig, out: Path,
              retriever: Any = None) -> list[dict]:
    """The later stages' report sections on the same users and candidates: ranking and policy. `retriever`: the
    fitted model that made the candidates, whose negatives and scores the rankers learn from when it is a two-tower
    model (`training.evaluation.ranking`)."""
    from training.evaluation.policy import policy_section
    from training.evaluation.ranking import ranking_section

    return [ranking_section(task, candidates, cfg, out, retriever=retriever), policy_section(task, candidates)]


def _candidate_source(ranked: dict[str, np.ndarray], models: dict) -> str:
    """The retrieval model whose top 500 feed the ranking section: the seed two-tower, else the best Recall@500."""
    if "two_tower" in ranked:
        return "two_tower"
    return max(models, key=lambda n: models[n]["full"]["recall@500"] or 0.0)


def _fit_and_evaluate(name: str, task: RetrievalTask, cfg: TrainConfig, trials: dict[str, SampledTrials],
                      log) -> tuple[dict, dict[str, np.ndarray], np.ndarray, Any]:
    """Fits one model on the task and evaluates its top K: (results entry, per-user arrays, ranked lists, the
    fitted torch module or None)."""
    model = load_model(name)  # a fresh instance per protocol: nothing learnt under one split leaks into another
    log(f"{task.protocol}: fitting {name}")
    training = model.fit(task, cfg)
    log(f"{task.protocol}: ranking the catalog with {name}")
    t0 = time.perf_counter()
    ranked, extras, used = _recommend(model, task)
    seconds = time.perf_counter() - t0
    result, per_user = evaluate_model(task, ranked, trials, cfg.seed)
    if used is not None:
        per_user["interests"] = used
    full = result["full"]
    log(f"{task.protocol}: {name} NDCG@10 {full['ndcg@10']:.4f} Recall@100 {full['recall@100']:.4f} "
        f"Recall@500 {full['recall@500']:.4f}")
    return (result | {"training": training, "recommend_seconds": seconds} | extras, per_user, ranked,
            getattr(model, "model", None))


SEED_METRICS = ("ndcg@10", "recall@100", "recall@500")  # the figures stated with their spread over seeds


def seed_spread(runs: list[dict], seeds: list[int]) -> dict:
    """Per-seed values, mean and sample standard deviation of `SEED_METRICS` and of the training time."""
    values = {m: [float(r["full"][m]) for r in runs] for m in SEED_METRICS}
    values["train_seconds"] = [float(r["training"].get("seconds") or 0.0) for r in runs]
    ddof = 1 if len(runs) > 1 else 0
    return {"seeds": list(seeds), "values": values, "mean": {m: float(np.mean(v)) for m, v in values.items()},
            "std": {m: float(np.std(v, ddof=ddof)) for m, v in values.items()}}


def run_protocol(task: RetrievalTask, model_names: list[str], cfg: TrainConfig, out: Path, console: Console,
                 t_start: float, with_sections: bool, seeds: tuple[int, ...] | None = None) -> dict:
    """Fits and evaluates every model on one task; the results entry of this protocol.

    With several `seeds`, every model that is not `deterministic` (the neural ones) is fitted once per
    seed (initialisation, batch order, negatives, validation sample; the evaluated users stay the same) and its entry
    gains "seeds" (`seed_spread`); its other figures are the first seed's. Deterministic baselines run once.

    A model whose training or ranking raises is recorded under "failed" with its error and the others go on, so one
    broken model does not throw away the hours the others took; `run_eval` raises once the report is written.
    """
    def log(msg: str, style: str | None = None) -> None:
        console.log(f"[{time.perf_counter() - t_start:,.0f}s] {msg}", style=style)

    models, per_user, ranked_by, failed, fitted, runs_of = {}, {}, {}, {}, {}, {}
    trials = {s: sample_trials(task, 100, s, cfg.seed) for s in SAMPLERS}  # the same negatives for every model
    seeds = tuple(seeds or (cfg.seed,))
    for name in model_names:
        try:
            random = not getattr(load_model(name), "deterministic", False)
            runs = [_fit_and_evaluate(name, task, dataclasses.replace(cfg, seed=s), trials, log)
                    for s in (seeds if random else seeds[:1])]
            runs_of[name] = runs
            models[name], per_user[name], ranked_by[name], fitted[name] = runs[0]
            models[name]["seeds"] = seed_spread([r[0] for r in runs], list(seeds if random else seeds[:1]))
        except Exception as exc:  # noqa: BLE001 - recorded in the report and re-raised by run_eval at the end
            failed[name] = f"{type(exc).__name__}: {exc}"[:2000]
            log(f"{task.protocol}: {name} FAILED: {failed[name][:300]}", style="bold red")
    result = {"task": task.describe(), "description": PROTOCOL_TEXT[task.protocol], "models": models,
              "failed": failed, "multi_interest_gain": multi_interest_gain(task, per_user), "sections": []}
    if with_sections and models:
        source = _candidate_source(ranked_by, models)
        result["sections"] = _sections(task, ranked_by[source], dataclasses.replace(cfg, seed=seeds[0]), out,
                                       fitted.get(source))
        result["section_candidates"] = source
        if len(runs_of[source]) > 1:  # the ranking section once more per further seed of its candidates' model
            _ranking_over_seeds(result["sections"][0], task, runs_of[source], seeds, cfg, out, log)
    return result


def _ranking_over_seeds(section: dict, task: RetrievalTask, runs: list[tuple], seeds: tuple[int, ...],
                        cfg: TrainConfig, out: Path, log: Callable[[str], None]) -> None:
    """Runs the ranking section on each further seed's candidates and retriever (the rankers trained with that
    seed, on the first seed's users; figures under `out/seed-<s>/`) and adds the spread over all seeds to the first
    seed's section: results "seeds" (`ranking_seed_spread`) and its table."""
    from training.evaluation.ranking import ranking_section, ranking_seed_spread, seed_spread_markdown

    results = [section["results"]]
    for s, (_, _, ranked, fitted) in zip(seeds[1:], runs[1:]):
        log(f"{task.protocol}: ranking section with seed {s}")
        results.append(ranking_section(task, ranked, dataclasses.replace(cfg, seed=s), out / f"seed-{s}",
                                       retriever=fitted, users_seed=seeds[0])["results"])
    spread = ranking_seed_spread(results, list(seeds[:len(results)]))
    section["results"]["seeds"] = spread
    section["markdown"] += "\n\n" + seed_spread_markdown(spread)


def run_eval(data: str | Path, fmt: str, out: str | Path, models: list[str] | None = None,
             protocols: tuple[str, ...] = PROTOCOLS, cfg: TrainConfig = TrainConfig(), max_users: int | None = None,
             console: Console | None = None, sections: bool = True, k_core: int | None = None,
             seeds: tuple[int, ...] | None = None) -> dict:
    """Loads a data set, evaluates every model under every protocol, and writes results.json and report.md.

    Args:
        data: the data set's path. fmt: one of training.data.loaders.FORMATS.
        out: the report folder.
        models: registry names (default: all of `REGISTRY`); a model that fails to import is an error naming it.
        protocols: any of `PROTOCOLS`.
        cfg: training configuration handed to every model's fit (workers, epochs, batch sizes, seed).
        max_users: evaluate at most this many users per protocol (a seeded sample; None: all).
        console: where progress goes (default: a rich console on stderr).
        sections: add the ranking and policy sections (on the first protocol's task); the ranking section trains
            models of its own.
        k_core: override the format's k-core (`training.data.preprocess`; 1 turns it off).
        seeds: train every neural model once per seed and report the spread (`run_protocol`); default cfg.seed.

    Returns:
        The results dict that was written to results.json.
    """
    console = console or Console(stderr=True, soft_wrap=True)  # one line per event, also in log files
    out = Path(out)
    names = list(REGISTRY) if models is None else list(models)
    instances = [load_model(n) for n in names]  # fail before any training when a model cannot be imported
    t_start = time.perf_counter()
    console.log(f"loading {fmt} data from {data}")
    shop, prep = preprocess(load_dataset(data, fmt), for_format(fmt, k_core), fmt)
    console.log(f"preprocessing: {prep['recipe']}; {prep['before']['events']:,} -> {prep['after']['events']:,} "
                f"events, {prep['before']['items']:,} -> {prep['after']['items']:,} items")
    dataset = Path(data).name
    results = {"dataset": {"name": dataset, "format": fmt, "path": str(data), "items": shop.catalog.num_rows,
                           "users": shop.users.num_rows, "events": shop.events.num_rows,
                           "engagements": int(pc.sum(pc.is_in(shop.events["action"],
                                                               pa.array(list(ENGAGEMENTS)))).as_py() or 0),
                           "preprocessing": prep},
               "config": {"train": cfg.to_dict(), "models": names, "protocols": list(protocols),
                          "seeds": list(seeds or (cfg.seed,)),
                          "max_users": max_users, "k": K},
               "protocols": {}}
    started_ray = _start_ray_if_needed(instances, sections)
    try:
        for i, protocol in enumerate(protocols):
            task = build_task(shop, protocol, max_users, cfg, dataset)
            console.log(f"[{time.perf_counter() - t_start:,.0f}s] {protocol}: {len(task.user_ids):,} users, "
                        f"{task.train_events.num_rows:,} training events")
            results["protocols"][protocol] = run_protocol(task, names, cfg, out, console, t_start,
                                                          with_sections=sections and i == 0, seeds=seeds)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    results["seconds"] = time.perf_counter() - t_start
    paths = write_report(results, out)
    console.log(f"[{results['seconds']:,.0f}s] wrote {paths['markdown']} and {paths['json']}")
    failed = {f"{p}/{m}": err for p, r in results["protocols"].items() for m, err in r["failed"].items()}
    if failed:
        raise RuntimeError(f"{len(failed)} model run(s) failed (report written to {out}): "
                           + "; ".join(f"{k}: {v[:200]}" for k, v in failed.items()))
    return results


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The `recsys eval` arguments (the command line in cluster/cli.py wires them to `eval_command`)."""
    parser.add_argument("--data", type=Path, required=True, help="data set path (file or folder)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="report folder (results.json, report.md, figures)")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated subset of {','.join(REGISTRY)} (default: all)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated subset of the protocols")
    parser.add_argument("--max-users", type=int, default=None, help="evaluated users per protocol (default: all)")
    parser.add_argument("--config", default=None, help="YAML config path or built-in name (tiny, demo)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds: every neural model trains once per seed and the report gives "
                             "mean and spread (default: the config's seed)")
    parser.add_argument("--search", default=None,
                        help='a small search over validation, e.g. "lr=0.001,0.003;dropout=0.1,0.3": each neural '
                             "model fits every combination of the keys it has and keeps the best (train.search)")
    parser.add_argument("--k-core", type=int, default=None,
                        help="keep users and items with at least this many engagements (default: the format's, "
                             "5 on MovieLens, Taobao and RetailRocket; 1 turns it off)")
    parser.add_argument("--no-sections", dest="sections", action="store_false",
                        help="skip the other stages' report sections (the ranking comparison)")


def _number(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_search(text: str) -> dict[str, list]:
    """ "lr=0.001,0.003;dropout=0.1,0.3" -> {"lr": [0.001, 0.003], "dropout": [0.1, 0.3]}."""
    out: dict[str, list] = {}
    for part in (p.strip() for p in text.split(";") if p.strip()):
        key, sep, values = part.partition("=")
        vals = [_number(v.strip()) for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ValueError(f"--search: 'key=v1,v2;key=...', got {part!r}")
        out[key.strip()] = vals
    return out


def eval_command(args: argparse.Namespace, cfg: TrainConfig | None = None) -> dict:
    """Runs `recsys eval` from parsed `add_eval_arguments` arguments.

    Args:
        args: the parsed arguments.
        cfg: the train section of the config named by ``--config`` (cluster/cli.py loads it: training/ cannot import
            cluster/); None means the TrainConfig defaults and is only allowed without ``--config``.
    """
    if cfg is None:
        if args.config is not None:
            raise ValueError(f"--config {args.config}: pass its train section as cfg (load_config(...).train)")
        cfg = TrainConfig()
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    protocols = tuple(p.strip() for p in args.protocols.split(",") if p.strip())
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"--protocols: unknown {unknown}; known: {list(PROTOCOLS)}")
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip()) if args.seeds else None
    except ValueError:
        raise ValueError(f"--seeds: comma-separated integers, got {args.seeds!r}") from None
    if args.search:
        cfg = dataclasses.replace(cfg, search=parse_search(args.search))
    return run_eval(args.data, args.fmt, args.out, models, protocols, cfg, args.max_users, sections=args.sections,
                    k_core=args.k_core, seeds=seeds)
