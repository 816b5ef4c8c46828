"""Off-policy estimates from what the live service served: IPS and SNIPS of policy changes on the impression log,
checked against the closed-loop shop's truth for the same change.

`training.evaluation.replay` simulates its own logging policy; this module reads the service's log instead
(`training.data.impressions`): for every answer the items shown at each position with the events that followed
(`label_impressions`), and what its policy ran on (the ranked list, the user's purchases, the resolved policy).

Where the randomness is. A served answer is the policy's list D, a deterministic function of the logged input and
the request id (exploration draws from `policy_rng(config, request_id)`), then, with probability
`shuffle_epsilon`, its first `shuffle_top` items in a uniformly random order (the logging shuffle,
`training.request.policy`). Re-running the logged policy on the logged input with the shuffle off gives D again,
so the probability that the shown item L_k was at position k is exact: mu_k = `shuffle_marginal(D, L)[k]`. A
position where mu_k = 0 is one the replay could not reproduce (the input or the code changed since): its request
is left out and counted ("unexplained").

A target policy (the logged one with overrides) re-runs on the same input with the same request id, so its
exploration uses the same draws (common random numbers, valid because those draws are independent of the
shuffle), and puts L_k at k with probability pi_k = `shuffle_marginal(T, L)[k]` (its own shuffle, if any). With
clicks independent per position given the item and the position (the simulator's model: r x examination), the
item-position estimators of `training.evaluation.replay.estimate_from_weights` apply with w = pi / mu. They are
unbiased only where the target's items have support: an item the target shows at k that the logger could never
show there (outside D's shuffled top) has mu = 0 and is missed; `support.unsupported_share` says how much of the
target's mass that is, so a biased estimate is visible.

Truth. For a synthetic shop the expected click rate of any list is known: the item at position k is clicked with
probability r(user, interest, item) x examination(k), and bought with probability
r x examination(k) x min(1, P_CART_SCALE r) x P_PURCHASE, both averaged over the user's interests by their weights
(`item_values`, the funnel of `training.evaluation.simulate`). The truth of a target is its expected rate on the
same requests, with their own exploration draws, over its own shuffle (`expected_rates`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from training.data import synthetic
from training.data.impressions import label_impressions, read_impressions, read_policy_inputs
from training.data.schemas import Shop
from training.evaluation.replay import estimate_from_weights
from training.request.contracts import RankedList, UserState
from training.request.policy import apply_policy, request_rng, shuffle_marginal
from training.request.policy_config import PolicyConfig

DEFAULT_CHANGES: dict[str, dict] = {
    "no_shuffle": {"shuffle_epsilon": 0.0},
    "brand_diversity_off": {"brand_diversity": False, "shuffle_epsilon": 0.0},
    "category_cap_2": {"max_per_category": 2, "quota_k": 12, "shuffle_epsilon": 0.0},
    "exploration_off": {"explore_epsilon": 0.0, "shuffle_epsilon": 0.0},
}


@dataclass
class ServedRequest:
    """One logged answer: what its policy ran on and what it showed."""

    request_id: str
    user_id: str
    ranked: RankedList
    user: UserState
    config: PolicyConfig
    shown: list[str]  # item per position 0..k-1
    click: np.ndarray  # (k,) bool, from the events that followed
    purchase: np.ndarray


def load_served(log: str | Path, events: pa.Table, window_s: float = 3600.0,
                version: str | None = None) -> tuple[list[ServedRequest], dict[str, int]]:
    """The log's answers that have their policy input (optionally of one version), labelled with the events, and
    counts of what was read and left out."""
    imp = read_impressions(log)
    inputs = read_policy_inputs(log)
    if version is not None:
        imp = imp.filter(pc.equal(imp["version"], version))
        inputs = inputs.filter(pc.equal(inputs["version"], version))
    labelled = label_impressions(imp, events, window_s)
    shown: dict[str, dict[int, tuple[str, bool, bool]]] = {}
    for rid, pos, item, click, buy in zip(*(labelled[c].to_pylist() for c in
                                            ("request_id", "position", "item_id", "click", "purchase"))):
        shown.setdefault(rid, {})[pos] = (item, click, buy)
    out = []
    for row in inputs.to_pylist():
        slots = shown.pop(row["request_id"], None)
        if not slots or sorted(slots) != list(range(len(slots))):
            continue
        ranked = RankedList(row["items"], np.asarray(row["scores"], np.float32), row["brands"], row["categories"],
                            row["reasons"], created_at=row["created_at"], in_stock=row["in_stock"])
        bought = {k: float(v) for k, v in json.loads(row["bought_at"]).items()}
        items, clicks, buys = zip(*(slots[p] for p in range(len(slots))))
        out.append(ServedRequest(row["request_id"], row["user_id"], ranked, UserState(bought, row["now"]),
                                 PolicyConfig.from_dict(json.loads(row["policy"])), list(items),
                                 np.array(clicks, bool), np.array(buys, bool)))
    counts = {"impressions": imp.num_rows, "answers_with_inputs": len(out),
              "answers_without_inputs": len(shown)}
    return out, counts


def unshuffled(req: ServedRequest, config: PolicyConfig) -> list[str]:
    """The list `config` makes for the request before its shuffle, with the request's own draws (serving's
    generator, `policy_rng`, whenever a rule of the logged policy was random; without one nothing drew)."""
    base = config.with_overrides({"shuffle_epsilon": 0.0})
    return apply_policy(req.ranked, req.user, base, request_rng(req.request_id)).item_ids


def expected_rates(per_item: list[tuple[np.ndarray, np.ndarray]], lists: list[list[int]], configs: list[PolicyConfig],
                   k: list[int], examination: synthetic.Examination) -> dict[str, float]:
    """Expected click and purchase rate per impression of each request's list under its config's shuffle.

    Args:
        per_item: per request, (click value, purchase value) of each ranked item before examination
            (`item_values`).
        lists: per request, the unshuffled list as indices into the ranked items.
        k: the positions shown per request.
    """
    clicks = buys = shown = 0.0
    for (c, b), lst, cfg, kk in zip(per_item, lists, configs, k):
        exam = examination.probability(np.arange(kk))
        idx = np.asarray(lst[:kk])
        cv, bv = c[idx], b[idx]
        n = min(cfg.shuffle_top, len(lst)) if cfg.shuffle_epsilon > 0 else 0
        if n:  # the shuffle's branch: any of the top n at each of the first n positions
            top = np.arange(kk) < n
            mean_c, mean_b = c[np.asarray(lst[:n])].mean(), b[np.asarray(lst[:n])].mean()
            cv = np.where(top, (1 - cfg.shuffle_epsilon) * cv + cfg.shuffle_epsilon * mean_c, cv)
            bv = np.where(top, (1 - cfg.shuffle_epsilon) * bv + cfg.shuffle_epsilon * mean_b, bv)
        clicks += float((cv * exam).sum())
        buys += float((bv * exam).sum())
        shown += kk
    return {"ctr": clicks / max(shown, 1), "purchase_rate": buys / max(shown, 1)}


def item_values(shop: Shop, req: ServedRequest, rows: dict[str, int], users: dict[str, int]) -> tuple[np.ndarray, ...]:
    """(click value, purchase value) per ranked item of the request from the shop's hidden truth (0 for an item or
    user the shop does not know)."""
    n = len(req.ranked)
    c, b = np.zeros(n), np.zeros(n)
    u = users.get(req.user_id)
    item = np.array([rows.get(i, -1) for i in req.ranked.item_ids])
    known = item >= 0
    if u is None or not known.any():
        return c, b
    hidden = shop.hidden
    w = np.asarray(hidden["user_interest_weight"][u], np.float64)
    w = w / w.sum()
    for j in np.flatnonzero(w > 0):
        r = synthetic.true_relevance(hidden, np.full(known.sum(), u), item[known], np.full(known.sum(), j))
        c[known] += w[j] * r
        b[known] += w[j] * r * np.minimum(1.0, synthetic.P_CART_SCALE * r) * synthetic.P_PURCHASE
    return c, b


def served_replay(requests: list[ServedRequest], shop: Shop | None = None, changes: dict[str, dict] | None = None,
                  bootstrap: int = 400, seed: int = 0) -> dict:
    """IPS/SNIPS of the served policy and of each change (overrides of each request's logged policy), with the
    shop's truth when it is a synthetic shop. Returns {"requests", "unexplained", "logged", "policies"}."""
    changes = DEFAULT_CHANGES if changes is None else changes
    kept, bases, unexplained = [], [], 0
    for req in requests:
        base = unshuffled(req, req.config)
        mu = shuffle_marginal(base, req.shown, req.config)
        if (mu <= 0).any():
            unexplained += 1
            continue
        kept.append((req, mu))
        bases.append(base)
    if not kept:
        raise ValueError(f"no served answer could be replayed ({len(requests)} read, {unexplained} not reproduced)")
    S, K = len(kept), max(len(r.shown) for r, _ in kept)
    mu = np.ones((S, K))
    click, buy = np.zeros((S, K), bool), np.zeros((S, K), bool)
    valid = np.zeros((S, K), bool)
    for s, (req, m) in enumerate(kept):
        kk = len(req.shown)
        mu[s, :kk], click[s, :kk], buy[s, :kk], valid[s, :kk] = m, req.click, req.purchase, True
    truth_ok = shop is not None and "user_interest_weight" in (shop.hidden or {})
    if truth_ok:
        rows = {i: j for j, i in enumerate(shop.catalog["item_id"].to_pylist())}
        users = {u: j for j, u in enumerate(shop.users["user_id"].to_pylist())}
        values = [item_values(shop, req, rows, users) for req, _ in kept]
        examination = synthetic.Examination.of_meta(shop.meta)
    policies = {}
    for name, overrides in {"served": {}, **changes}.items():
        configs = [req.config.with_overrides(overrides) for req, _ in kept]
        lists = [bases[s] if not overrides else unshuffled(req, cfg)
                 for s, ((req, _), cfg) in enumerate(zip(kept, configs))]
        pi = np.zeros((S, K))
        unsupported = total = 0.0
        for s, ((req, _), cfg, lst) in enumerate(zip(kept, configs, lists)):
            kk = len(req.shown)
            pi[s, :kk] = shuffle_marginal(lst, req.shown, cfg)
            # The target's own top: every item it could show at each position, and whether the logger could too.
            target_items = lst[:kk]
            logger_p = shuffle_marginal(bases[s], target_items, req.config)
            unsupported += float((logger_p <= 0).sum())
            total += kk
        w = np.where(valid, pi / mu, 0.0)
        p = {"overrides": overrides,
             **estimate_from_weights(w, click, buy, valid, bootstrap, seed),
             "support": {"unsupported_share": unsupported / max(total, 1.0), "max_weight": float(w.max()),
                         "matched_share": float((pi[valid] > 0).mean())}}
        if truth_ok:
            index = [{i: j for j, i in enumerate(req.ranked.item_ids)} for req, _ in kept]
            p["truth"] = expected_rates(values, [[ix[i] for i in lst] for ix, lst in zip(index, lists)], configs,
                                        [len(req.shown) for req, _ in kept], examination)
        policies[name] = p
    return {"requests": len(requests), "replayed": S, "unexplained": unexplained,
            "logged": {"ctr": float(click[valid].mean()), "purchase_rate": float(buy[valid].mean())},
            "policies": policies}


def format_served(result: dict) -> str:
    """One line per policy and metric: truth (when known), IPS and SNIPS with their intervals, and support."""
    lines = [f"{result['replayed']} of {result['requests']} served answers replayed "
             f"({result['unexplained']} not reproduced); logged ctr {result['logged']['ctr']:.4f}",
             f"{'policy':22s} {'metric':14s} {'truth':>8s} {'IPS [95% CI]':>26s} {'SNIPS [95% CI]':>26s} "
             f"{'unsupported':>11s}"]
    for name, p in result["policies"].items():
        for m in ("ctr", "purchase_rate"):
            e = p[m]
            truth = f"{p['truth'][m]:8.4f}" if "truth" in p else f"{'-':>8s}"
            lines.append(f"{name:22s} {m:14s} {truth} {e['ips']:8.4f} [{e['ips_lo']:.4f}, {e['ips_hi']:.4f}] "
                         f"{e['snips']:8.4f} [{e['snips_lo']:.4f}, {e['snips_hi']:.4f}] "
                         f"{p['support']['unsupported_share']:11.3f}")
    return "\n".join(lines)
