"""Offline effect of each policy rule: the final list with all rules, without each one, and with none.

Entry point for the `recsys eval` harness:

    rule_effects(ranked, scores, catalog, users, targets, config=PolicyConfig(), k=10, pages=None,
                 request_ids=None) -> dict[str, dict[str, float]]

    ranked       (U, N) int catalog rows per user, best first; -1 pads short lists
    scores       (U, N) float ranker scores aligned with `ranked`
    catalog      catalog_arrays(catalog_table) from training/evaluation/replay.py: item_id, brand, category lists,
                 created_at (n,) unix seconds, in_stock (n,) bool
    users        length-U list of UserState (purchases and the request time)
    targets      length-U sequence of int arrays of relevant catalog rows (e.g. the held-out engagements)
    config       the policy to measure (the rows below switch its rules off one at a time)
    pages        optional length-U page names: each user's list gets `config.for_page(page)`
    request_ids  optional length-U ids seeding exploration (default "eval-<row>")

It returns one row per variant: "no_policy", "all_rules", and "without:<rule>" for every rule the config turns
on, each with ndcg@k, novelty@k (share of new items), longest_brand_run@k (mean over users), unique_brands@k (mean),
repeat_purchase_share@k (share of shown items the user bought before) and items@k (mean list length after filters).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from training.metrics import ndcg_at_k
from training.request.contracts import RankedList, UserState
from training.request.policy import apply_policy, is_new_item, longest_brand_run, request_rng
from training.request.policy_config import PolicyConfig

# Overrides that switch one rule off; a rule the config leaves off has no "without" row.
RULE_OFF: dict[str, dict[str, object]] = {
    "filter": {"filter_out_of_stock": False, "blocked_brands": [], "blocked_categories": []},
    "bought_down_sort": {"bought_down_sort": False},
    "sponsored": {"sponsored_items": []},
    "explore": {"explore_epsilon": 0.0},
    "quotas": {"min_new": 0, "max_new": None, "max_per_category": None},
    "brand_diversity": {"brand_diversity": False},
}


def _final_rows(ranked: np.ndarray, scores: np.ndarray, catalog: Mapping, users: Sequence[UserState],
                configs: Sequence[PolicyConfig | None], request_ids: Sequence[str], k: int) -> np.ndarray:
    """(U, k) catalog rows each user sees (-1 pads); a None config shows the ranked list as it is."""
    out = np.full((len(users), k), -1, np.int64)
    ids, brands, cats = catalog["item_id"], catalog["brand"], catalog["category"]
    for u, (rows, cfg) in enumerate(zip(ranked, configs)):
        rows = rows[rows >= 0]
        if cfg is None:
            shown = rows[:k]
        else:
            lst = RankedList([ids[i] for i in rows], scores[u, :len(rows)], [brands[i] for i in rows],
                             [cats[i] for i in rows], ["ranked"] * len(rows), created_at=catalog["created_at"][rows],
                             in_stock=catalog["in_stock"][rows])
            col = {i: r for i, r in zip(lst.item_ids, rows)}
            shown = [col[i] for i in apply_policy(lst, users[u], cfg, request_rng(request_ids[u])).item_ids[:k]]
        out[u, :len(shown)] = shown
    return out


def list_metrics(shown: np.ndarray, catalog: Mapping, users: Sequence[UserState], targets: Sequence[np.ndarray],
                 new_item_days: float, k: int) -> dict[str, float]:
    """Metrics of (U, k) shown catalog rows (-1 pads), see the module docstring."""
    valid = shown >= 0
    rows = np.maximum(shown, 0)
    new = np.stack([is_new_item(catalog["created_at"][r], u.now, new_item_days) for r, u in zip(rows, users)])
    ids, brands = catalog["item_id"], catalog["brand"]
    runs, uniq, repeat = [], [], []
    for r, ok, user in zip(rows, valid, users):
        b = [brands[i] for i in r[ok]]
        runs.append(longest_brand_run(b))
        uniq.append(len(set(b)))
        repeat.append(sum(ids[i] in user.bought_at for i in r[ok]))
    n_shown = max(int(valid.sum()), 1)
    return {f"ndcg@{k}": ndcg_at_k(shown, targets, k), f"novelty@{k}": float((new & valid).sum() / n_shown),
            f"longest_brand_run@{k}": float(np.mean(runs)), f"unique_brands@{k}": float(np.mean(uniq)),
            f"repeat_purchase_share@{k}": float(sum(repeat) / n_shown), f"items@{k}": float(valid.sum(1).mean())}


def rule_effects(ranked: np.ndarray, scores: np.ndarray, catalog: Mapping, users: Sequence[UserState],
                 targets: Sequence[np.ndarray], config: PolicyConfig = PolicyConfig(), k: int = 10,
                 pages: Sequence[str | None] | None = None,
                 request_ids: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """The rule effect table, see the module docstring for the arguments and the rows."""
    ranked, scores = np.asarray(ranked), np.asarray(scores, np.float32)
    if ranked.shape != scores.shape or ranked.shape[0] != len(users) or len(targets) != len(users):
        raise ValueError(f"rule_effects: ranked {ranked.shape}, scores {scores.shape}, {len(users)} users and "
                         f"{len(targets)} target rows must agree")
    pages = pages if pages is not None else [None] * len(users)
    request_ids = request_ids if request_ids is not None else [f"eval-{u}" for u in range(len(users))]
    resolved = {p: config.for_page(p) for p in set(pages)}  # the surface preset of each page, then the switch
    on = [name for name, off in RULE_OFF.items() if any(c.with_overrides(off) != c for c in resolved.values())]
    variants: dict[str, dict[str | None, PolicyConfig | None]] = {
        "no_policy": {p: None for p in resolved}, "all_rules": resolved}
    variants.update({f"without:{name}": {p: c.with_overrides(RULE_OFF[name]) for p, c in resolved.items()}
                     for name in on})
    table = {}
    for name, by_page in variants.items():
        shown = _final_rows(ranked, scores, catalog, users, [by_page[p] for p in pages], request_ids, k)
        table[name] = list_metrics(shown, catalog, users, targets, config.new_item_days, k)
    return table


def shop_rule_effects(shop, config: PolicyConfig = PolicyConfig(), n_users: int = 300, candidates: int = 200,
                      k: int = 10, holdout_days: float = 14.0, seed: int = 0) -> dict[str, dict[str, float]]:
    """The effect table on a synthetic shop without a trained model: each user's list is the top ``candidates``
    items by a noisy true relevance (training/evaluation/replay.py's ground truth, noise std 1 on the logit), the targets
    are the items the user clicked or engaged with in the last ``holdout_days``, and the purchases before that
    are the user's history."""
    import pyarrow as pa

    from training.data import synthetic
    from training.evaluation.replay import catalog_arrays, ground_truth, shop_now

    truth, catalog, now = ground_truth(shop), catalog_arrays(shop.catalog), shop_now(shop)
    user_ids = shop.users.column("user_id").to_pylist()
    ev = shop.events
    ts = ev.column("timestamp").cast(pa.int64()).to_numpy() / 1000.0
    cutoff = now - holdout_days * 86_400.0
    row_of = {i: r for r, i in enumerate(catalog["item_id"])}
    ev_user, ev_item, action = (ev.column(c).to_pylist() for c in ("user_id", "item_id", "action"))
    bought: dict[str, dict[str, float]] = {}
    later: dict[str, set[int]] = {}
    for u, i, a, t in zip(ev_user, ev_item, action, ts):
        if t < cutoff and a == "purchase":
            bought.setdefault(u, {})[i] = t
        elif t >= cutoff and a != "view":
            later.setdefault(u, set()).add(row_of[i])
    rng = np.random.default_rng(seed)
    chosen = [u for u in rng.permutation(len(user_ids)) if user_ids[u] in later][:n_users]
    logit = synthetic.relevance_logit(np.einsum("ujd,nd->ujn", truth["user_vec"][chosen], truth["latent"]),
                                      truth["pop_z"][None, None, :])  # (U, 4, n)
    noisy = np.einsum("uj,ujn->un", truth["weight"][chosen], logit) + rng.standard_normal((len(chosen), logit.shape[2]))
    ranked = np.argsort(-noisy, axis=1)[:, :candidates]
    scores = np.take_along_axis(noisy, ranked, axis=1)
    users = [UserState(bought.get(user_ids[u], {}), now) for u in chosen]
    targets = [np.array(sorted(later[user_ids[u]])) for u in chosen]
    # Judged on the home surface: a synthetic user has no single page, and home runs the most rules.
    return rule_effects(ranked, scores, catalog, users, targets, config, k, pages=["home"] * len(chosen))


def policy_section(task, candidates: np.ndarray, config: PolicyConfig = PolicyConfig(), k: int = 10,
                   page: str = "home") -> dict:
    """The `recsys eval` report section: `rule_effects` on the retrieval model's lists for the task's users.

    Args:
        task: the harness's RetrievalTask (catalog, training events, users, targets, prediction times).
        candidates: (n_users, N) item indices best first (0 = none), e.g. the seed two-tower's top 500; their
            order is the score (the ranker is measured in its own section).
        config: the policy; each user's list gets its `page` preset.
    Returns:
        {"name": "policy", "results", "markdown", "figures"}.
    """
    from training.evaluation.replay import catalog_arrays, purchases_by_user

    ranked = np.where(candidates > 0, candidates - 1, -1)  # item index -> catalog row
    n, width = ranked.shape
    scores = np.broadcast_to(-np.arange(width, dtype=np.float32), (n, width)).copy()  # retrieval order as score
    bought = purchases_by_user(task.train_events)
    users = [UserState(bought.get(u, {}), float(t) / 1000.0) for u, t in zip(task.user_ids, task.at_ms)]
    targets = [t - 1 for t in task.targets]
    table = rule_effects(ranked, scores, catalog_arrays(task.catalog), users, targets, config, k,
                         pages=[page] * n)
    cols = list(next(iter(table.values())))
    md = [f"Policy rules on the top {width} of the retrieval model for {n:,} users ({task.protocol}, page preset "
          f"`{page}`): the final top {k} with all rules, without each rule, and with none. Repeat purchases count "
          "items bought in the training period.", "",
          "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    md += [f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |" for name, row in table.items()]
    return {"name": "policy", "results": {"page": page, "k": k, "users": n, "effects": table},
            "markdown": "\n".join(md), "figures": []}
