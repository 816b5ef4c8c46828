"""Counterfactual replay on the synthetic shop: log impressions with a stochastic policy, then estimate what a
policy change would do with inverse propensity scoring (IPS, and self-normalised SNIPS), and compare with the truth.

The simulator is the generator's own click model (training/data/synthetic.py): a session has a user, one of the user's
hidden interests and a page; the true relevance of an item is ``r = sigmoid(A * <interest, latent> + B * pop_z + C)``;
the item shown at 0-based position k is clicked with probability ``r * position_bias(k)``, and a click becomes a
purchase with probability ``P_CART_SCALE * r * P_PURCHASE``. The ground truth is re-derived exactly from the shop's
size and seed (``ground_truth``), because ``shop.hidden`` keeps the interests but not the brand vectors and
popularity the relevance needs.

Each session draws ``candidates`` items (popularity-weighted from the interest's category; home pages also from
the whole catalog), scores them with a noisy "production ranker" (the true logit plus Gaussian noise), and the
policy turns that ranked list into the shown slate of ``slate`` items.

Logging policy (epsilon-greedy over slates): with probability ``1 - eps`` show the production policy's slate D,
with probability ``eps`` a uniformly random ordered slate of the candidates. Its marginal propensity is exact:
``mu(item i at position k) = (1 - eps) * [D_k = i] + eps / N`` for N candidates.

Estimators (item-position model, valid because clicks are independent per position given item and position):
with w_sk = [T_sk = L_sk] / mu(L_sk at k) for the target slate T and the logged slate L, and y a click or purchase,
IPS = mean_s sum_k w_sk y_sk / K and SNIPS = sum_k (sum_s w_sk y_sk / sum_s w_sk) / K (E[w_sk] = 1 per position).
IPS gets a normal-approximation 95% interval over sessions, SNIPS a percentile bootstrap over sessions.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training.data import synthetic
from training.data.features import in_stock
from training.request.contracts import RankedList, UserState
from training.request.policy import apply_policy, request_rng
from training.request.policy_config import PolicyConfig
from training.data.schemas import Shop

Z95 = 1.959964


@dataclass(frozen=True)
class ReplayConfig:
    n_sessions: int = 4000  # ~3,000 logged impressions per 1% of CTR: intervals of a few tenths of a percent
    slate: int = 12  # one screen, as in the generator
    candidates: int = 40  # the ranked list the policy sees per session
    logging_epsilon: float = 0.3  # share of random slates: more = lower-variance estimates, worse logged CTR
    ranker_noise: float = 1.0  # std of the production ranker's error on the true logit (the logit spans ~6)
    bootstrap: int = 400  # resamples for the SNIPS interval
    seed: int = 0


def catalog_arrays(catalog: pa.Table) -> dict[str, object]:
    """Columns the policy needs, in catalog order: item_id/brand/category lists, created_at (n,) unix seconds,
    in_stock (n,) bool (the "in_stock" attribute; a missing attribute means in stock)."""
    return {"item_id": catalog.column("item_id").to_pylist(), "brand": catalog.column("brand").to_pylist(),
            "category": catalog.column("category").to_pylist(),
            "created_at": catalog.column("created_at").cast(pa.int64()).to_numpy() / 1000.0,
            "in_stock": in_stock(catalog)}


def purchases_by_user(events: pa.Table) -> dict[str, dict[str, float]]:
    """user_id -> {item_id: unix seconds of the latest purchase}, from an event log."""
    bought = events.filter(pc.equal(events.column("action"), "purchase"))
    out: dict[str, dict[str, float]] = {}
    ts = bought.column("timestamp").cast(pa.int64()).to_numpy() / 1000.0
    for u, i, t in zip(bought.column("user_id").to_pylist(), bought.column("item_id").to_pylist(), ts):
        items = out.setdefault(u, {})
        items[i] = max(t, items.get(i, 0.0))
    return out


def shop_now(shop: Shop) -> float:
    """Unix seconds of the shop's last event: "now" for replayed requests."""
    return datetime.fromisoformat(shop.meta["end_time"].replace("Z", "+00:00")).timestamp()


def ground_truth(shop: Shop) -> dict[str, np.ndarray]:
    """The hidden truth of a synthetic shop, as saved with it: "latent" (n_items, 16), "pop_z" (n_items,), "user_vec"
    (n_users, 4, 16), "weight" (n_users, 4), "icat" (n_users, 4), "category" (n_items,), "popularity" (n_items,).
    Raises ValueError for a shop without it."""
    hidden = shop.hidden
    needed = {"item_latent", "item_popularity", "user_interest_vec", "user_interest_weight", "user_interest_category"}
    if shop.meta.get("source") != "synthetic" or needed - set(hidden):
        raise ValueError(f"replay needs a synthetic shop with its hidden truth; missing {sorted(needed - set(hidden))}")
    return {"latent": hidden["item_latent"], "pop_z": synthetic.popularity_z(hidden["item_popularity"]),
            "user_vec": hidden["user_interest_vec"], "weight": hidden["user_interest_weight"],
            "icat": hidden["user_interest_category"], "category": synthetic.catalog_category_index(shop.catalog),
            "popularity": hidden["item_popularity"], "examination": synthetic.Examination.of_meta(shop.meta)}


@dataclass
class Sessions:
    """Replayed requests: S sessions with N ranked candidates each (rows of the catalog, best first)."""

    user: np.ndarray  # (S,) user row
    page: np.ndarray  # (S,) index into synthetic.PAGES
    cand: np.ndarray  # (S, N) catalog rows, ordered by the production ranker's score
    score: np.ndarray  # (S, N) the ranker's score
    relevance: np.ndarray  # (S, N) true r
    examination: synthetic.Examination = synthetic.Examination()  # the shop's position bias


def draw_sessions(truth: dict[str, np.ndarray], cfg: ReplayConfig) -> Sessions:
    """Draws contexts and candidates, deterministic in ``cfg.seed``."""
    rng = np.random.default_rng([cfg.seed, 1])
    U, S, N = len(truth["weight"]), cfg.n_sessions, cfg.candidates
    user = rng.integers(0, U, S)
    slot = np.minimum((rng.random(S)[:, None] > np.cumsum(truth["weight"][user], axis=1)).sum(axis=1), 3)
    page = rng.choice(len(synthetic.PAGES), S, p=synthetic.PAGE_P)
    icat = truth["icat"][user, slot]
    logpop = np.log(truth["popularity"])
    cand = np.empty((S, N), np.int64)
    for lo in range(0, S, 256):  # Gumbel top-N = popularity-weighted sampling without replacement
        hi = min(lo + 256, S)
        in_cat = truth["category"][None, :] == icat[lo:hi, None]  # (c, n_items)
        bonus = np.where(in_cat, 0.0, np.where(page[lo:hi, None] == 0, np.log(0.4 / 0.6), -np.inf))
        keys = logpop[None, :] + bonus + rng.gumbel(size=in_cat.shape)
        cand[lo:hi] = np.argpartition(-keys, N, axis=1)[:, :N]
    vec = truth["user_vec"][user, slot]  # (S, 16)
    logit = synthetic.relevance_logit(np.einsum("sd,snd->sn", vec, truth["latent"][cand]), truth["pop_z"][cand])
    score = logit + cfg.ranker_noise * rng.standard_normal(logit.shape)
    order = np.argsort(-score, axis=1, kind="stable")
    relevance = 1.0 / (1.0 + np.exp(-logit))
    cand, score, relevance = (np.take_along_axis(a, order, axis=1) for a in (cand, score, relevance))
    return Sessions(user=user, page=page, cand=cand, score=score, relevance=relevance,
                    examination=truth.get("examination", synthetic.Examination()))


def policy_slates(sessions: Sessions, catalog: dict, users: list[str], bought: dict[str, dict[str, float]],
                  now: float, config: PolicyConfig, slate: int, seed: int) -> np.ndarray:
    """(S, slate) candidate columns each session shows under ``config`` (-1 where the policy kept fewer items).
    Exploration draws from ``request_rng("replay-<seed>-<session>")``, the same request ids for every policy."""
    S, N = sessions.cand.shape
    out = np.full((S, slate), -1, np.int64)
    ids, brands, cats = catalog["item_id"], catalog["brand"], catalog["category"]
    for s in range(S):
        rows = sessions.cand[s]
        ranked = RankedList([ids[i] for i in rows], sessions.score[s], [brands[i] for i in rows],
                            [cats[i] for i in rows], ["retrieval"] * N, created_at=catalog["created_at"][rows],
                            in_stock=catalog["in_stock"][rows])
        page = synthetic.PAGES[sessions.page[s]]
        final = apply_policy(ranked, UserState(bought.get(users[sessions.user[s]], {}), now),
                             config.for_page(page), request_rng(f"replay-{seed}-{s}"))
        col = {i: j for j, i in enumerate(ranked.item_ids)}
        shown = [col[i] for i in final.item_ids[:slate]]
        out[s, :len(shown)] = shown
    return out


@dataclass
class ImpressionLog:
    """What the logging policy showed and what happened: (S, K) arrays."""

    shown: np.ndarray  # candidate column per position
    propensity: np.ndarray  # mu(shown item at this position)
    click: np.ndarray  # bool
    purchase: np.ndarray  # bool


def log_impressions(sessions: Sessions, production: np.ndarray, cfg: ReplayConfig) -> ImpressionLog:
    """Runs the epsilon-greedy logging policy over the production slates (S, K) and samples the user's answers."""
    rng = np.random.default_rng([cfg.seed, 2])
    S, N = sessions.cand.shape
    K = production.shape[1]
    explore = rng.random(S) < cfg.logging_epsilon
    uniform = np.argsort(rng.random((S, N)), axis=1)[:, :K]  # a uniformly random ordered K-subset
    shown = np.where(explore[:, None], uniform, production)
    shown_ok = shown >= 0
    propensity = cfg.logging_epsilon / N + (1.0 - cfg.logging_epsilon) * (shown == production)
    r = np.where(shown_ok, np.take_along_axis(sessions.relevance, np.maximum(shown, 0), axis=1), 0.0)
    click = rng.random((S, K)) < r * sessions.examination.probability(np.arange(K))[None, :]
    purchase = click & (rng.random((S, K)) < synthetic.P_CART_SCALE * r) & (rng.random((S, K)) < synthetic.P_PURCHASE)
    return ImpressionLog(shown=shown, propensity=propensity, click=click, purchase=purchase)


def expected_rates(sessions: Sessions, slates: np.ndarray) -> dict[str, float]:
    """The simulator's exact expected click and purchase rates per impression of the given slates."""
    r = np.where(slates >= 0, np.take_along_axis(sessions.relevance, np.maximum(slates, 0), axis=1), 0.0)
    p_click = r * sessions.examination.probability(np.arange(slates.shape[1]))[None, :]
    p_buy = p_click * synthetic.P_CART_SCALE * r * synthetic.P_PURCHASE
    return {"ctr": float(p_click.mean()), "purchase_rate": float(p_buy.mean())}


def estimate(log: ImpressionLog, target: np.ndarray, n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    """IPS and SNIPS estimates of the target slates' click and purchase rates per impression, with 95% CIs."""
    w = (target == log.shown) / log.propensity  # (S, K) importance weights
    return estimate_from_weights(w, log.click, log.purchase, np.ones(w.shape, bool), n_boot, seed) | {
        "support": {"matched_share": float((target == log.shown).mean()), "max_weight": float(w.max())}}


def estimate_from_weights(w: np.ndarray, click: np.ndarray, purchase: np.ndarray, valid: np.ndarray, n_boot: int,
                          seed: int) -> dict[str, dict[str, float]]:
    """IPS and SNIPS of click and purchase rate per impression from (S, K) importance weights w = pi / mu of the
    logged item at each position; `valid` marks the positions an answer had (answers may differ in length)."""
    S = w.shape[0]
    n_pos = valid.sum(0)  # sessions per position
    N = max(int(n_pos.sum()), 1)
    w = np.where(valid, w, 0.0)
    boot = np.random.default_rng([seed, 3]).multinomial(S, np.full(S, 1.0 / S), size=n_boot)  # (B, S) counts
    out = {}
    for name, y in (("ctr", click), ("purchase_rate", purchase)):
        y = np.where(valid, y, 0.0)
        per_session = (w * y).sum(axis=1) * S / N  # (S,): their mean is IPS per impression
        ips, se = per_session.mean(), per_session.std(ddof=1) / np.sqrt(S) if S > 1 else 0.0
        num, den = w * y, w
        snips = float((n_pos * num.sum(0) / np.maximum(den.sum(0), 1e-12)).sum() / N)
        boot_sn = (n_pos * (boot @ num) / np.maximum(boot @ den, 1e-12)).sum(axis=1) / N  # (B,)
        out[name] = {"ips": float(ips), "ips_lo": float(ips - Z95 * se), "ips_hi": float(ips + Z95 * se),
                     "snips": snips, "snips_lo": float(np.percentile(boot_sn, 2.5)),
                     "snips_hi": float(np.percentile(boot_sn, 97.5)), "logged": float(y.sum() / N)}
    return out


DEFAULT_CHANGES: dict[str, dict] = {
    "stronger_exploration": {"explore_epsilon": 0.5, "explore_slots": [1, 3, 5, 7, 9], "new_item_days": 30.0},
    "brand_diversity_off": {"brand_diversity": False},
    "category_cap_2": {"max_per_category": 2, "quota_k": 12},
}


def replay(shop: Shop, changes: dict[str, dict] | None = None, cfg: ReplayConfig = ReplayConfig(),
           base: PolicyConfig = PolicyConfig()) -> dict:
    """Logs ``cfg.n_sessions`` sessions under ``base`` with epsilon-greedy exploration, then for the base and each
    change (overrides of ``base``): IPS/SNIPS estimates with CIs against the simulator's exact expected rates
    ("truth") on the same contexts. Returns {"config", "logged", "policies": {name: {...}}, "log": ImpressionLog,
    "sessions": Sessions} (the last two for ``write_impressions``)."""
    changes = DEFAULT_CHANGES if changes is None else changes
    truth = ground_truth(shop)
    catalog = catalog_arrays(shop.catalog)
    users = shop.users.column("user_id").to_pylist()
    bought, now = purchases_by_user(shop.events), shop_now(shop)
    sessions = draw_sessions(truth, cfg)

    def slates(config: PolicyConfig) -> np.ndarray:
        return policy_slates(sessions, catalog, users, bought, now, config, cfg.slate, cfg.seed)

    production = slates(base)
    log = log_impressions(sessions, production, cfg)
    policies = {}
    for name, overrides in {"base": {}, **changes}.items():
        target = production if not overrides else slates(base.with_overrides(overrides))
        policies[name] = {"overrides": overrides, "truth": expected_rates(sessions, target),
                          **estimate(log, target, cfg.bootstrap, cfg.seed)}
    return {"config": asdict(cfg), "logged": {"ctr": float(log.click.mean()),
                                               "purchase_rate": float(log.purchase.mean())},
            "policies": policies, "log": log, "sessions": sessions}


def write_impressions(result: dict, shop: Shop, path: str | Path) -> Path:
    """Writes the logged impressions as Parquet (one row per shown item): session, user_id, page, item_id, position,
    score, propensity, click, purchase; the replay config is in the file's metadata. Usually
    ``<shop dir>/impressions.parquet``."""
    log, sessions = result["log"], result["sessions"]
    S, K = log.shown.shape
    s_idx, k_idx = np.nonzero(log.shown >= 0)
    rows = sessions.cand[s_idx, log.shown[s_idx, k_idx]]
    users = shop.users.column("user_id").take(pa.array(sessions.user[s_idx]))
    table = pa.table({
        "session": pa.array(s_idx.astype(np.int64)), "user_id": users,
        "page": pa.array(synthetic.PAGES).take(pa.array(sessions.page[s_idx])),
        "item_id": shop.catalog.column("item_id").take(pa.array(rows)),
        "position": pa.array(k_idx.astype(np.int32)),
        "score": pa.array(sessions.score[s_idx, log.shown[s_idx, k_idx]].astype(np.float32)),
        "propensity": pa.array(log.propensity[s_idx, k_idx]),
        "click": pa.array(log.click[s_idx, k_idx]), "purchase": pa.array(log.purchase[s_idx, k_idx]),
    }).replace_schema_metadata({"replay_config": json.dumps(result["config"])})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def format_table(result: dict) -> str:
    """The replay's estimates against the truth, one line per policy and metric."""
    lines = [f"{'policy':22s} {'metric':14s} {'truth':>8s} {'IPS [95% CI]':>26s} {'SNIPS [95% CI]':>26s}"]
    for name, p in result["policies"].items():
        for m in ("ctr", "purchase_rate"):
            e = p[m]
            lines.append(f"{name:22s} {m:14s} {p['truth'][m]:8.4f} "
                         f"{e['ips']:8.4f} [{e['ips_lo']:.4f}, {e['ips_hi']:.4f}] "
                         f"{e['snips']:8.4f} [{e['snips_lo']:.4f}, {e['snips_hi']:.4f}]")
    return "\n".join(lines)
