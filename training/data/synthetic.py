"""A deterministic synthetic shop whose ground truth is known, so models can be checked against it.

The generative story (all vectorised NumPy; the same seed gives byte-identical tables):

1. Latent space of dimension 16. Each category has a unit centre; a brand belongs to one or two categories and has a
   unit vector; an item's latent is ``normalise(centre + 0.5 * brand + 0.35 * noise)``. Items get a Zipf-ish
   category, a brand of that category, a lognormal price around a per-category level and a heavy-tailed base
   popularity. A share of items is created during the last days of the window (new items, for cold start).
2. Each user has 1-4 hidden interests, each a (category, preferred brand or none) pair with a Dirichlet weight.
3. Each session picks an interest by weight and a page: home (60% of slots from the interest's category, 40%
   globally popular), category (all from the category) or search (from the category, half from the preferred
   brand when there is one). The shown list is ordered by a noisy logging score and logged as view events.
4. True relevance ``r = sigmoid(A * <interest, item latent> + B * popularity_z + C)``; a click happens with
   probability ``r * position_bias(position)``; a click may be followed by wishlist, add_to_cart and purchase.

Because clicks follow the hidden interests and the examination probability is known, the data tests both that a
model learns user taste (it must beat global popularity) and that position-bias corrections recover `r`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from training.data.schemas import ACTIONS, CATALOG_SCHEMA, EVENTS_SCHEMA, TIMESTAMP, USERS_SCHEMA, Shop, validate_table

LATENT_DIM = 16
POSITION_BIAS_ETA: float = 0.8
# A fixed epoch, so the output does not depend on today's date.
END_TIME = datetime(2026, 10, 1, tzinfo=timezone.utc)
MAX_INTERESTS = 4

# Relevance r = sigmoid(A * match + B * popularity_z + C): with A = 6 the interest match dominates (same brand ~0.95
# -> r ~0.5, same category ~0.75 -> r ~0.2, unrelated ~0 -> r < 0.01) and C sets the overall click-through near 8%.
RELEVANCE_A, RELEVANCE_B, RELEVANCE_C = 6.0, 0.3, -6.0
P_WISHLIST = 0.1  # given a click
P_CART_SCALE = 0.4  # add_to_cart given a click = 0.4 * r
P_PURCHASE = 0.5  # given add_to_cart

COUNTRIES, COUNTRY_P = ("DE", "FR", "GB", "US", "PL", "ES"), (0.30, 0.15, 0.15, 0.25, 0.08, 0.07)
DEVICES, DEVICE_P = ("app", "web", "mobile_web"), (0.40, 0.35, 0.25)
PAGES, PAGE_P = ("home", "category", "search"), (0.5, 0.3, 0.2)
COLORS = ("black", "white", "red", "blue", "green", "grey")
DAY_MS = 86_400_000
# Bumped when a shop of the same size and seed would differ (tables or hidden truth); 2 added the interest vectors
# and item popularity to `hidden`.
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class ShopSize:
    """How big a synthetic shop is and how its traffic looks."""

    n_items: int
    n_users: int
    n_brands: int  # ~20-50 items per brand: enough for brand preference to be learnable, few enough to matter
    n_categories: int  # ~100-2500 items per category, like a real shop's leaf categories
    sessions_per_user: float = 5.0  # Poisson mean; every user gets at least one so nobody is absent from training
    items_per_session: int = 12  # one screen of results; positions 0..11 span the steep part of the position bias
    days: int = 60  # long enough for a temporal train/test split with several sessions on each side
    new_item_fraction: float = 0.03  # a few percent of new items, as in a shop that adds stock weekly
    new_item_days: int = 7  # "new" = created in the last week, the cold-start window


SIZES: dict[str, ShopSize] = {
    "tiny": ShopSize(n_items=2_000, n_users=400, n_brands=80, n_categories=20),  # unit tests, < 1 s
    # About the size of the public sets the harness is compared on (MovieLens-100K: 1.7k items, 943 users, 100k
    # ratings; ~40 engagements per user here): a few minutes per neural model on 2 cores, for `recsys eval --seeds`.
    "small": ShopSize(n_items=5_000, n_users=1_000, n_brands=200, n_categories=30, sessions_per_user=30.0),
    "demo": ShopSize(n_items=50_000, n_users=20_000, n_brands=2_000, n_categories=100),  # ~1.2M events, the demo
    "large": ShopSize(n_items=1_000_000, n_users=100_000, n_brands=20_000, n_categories=400),  # the 1M-item budget
}


def position_bias(position: np.ndarray, eta: float = POSITION_BIAS_ETA) -> np.ndarray:
    """Examination probability of a 0-based position: ``(1 / (1 + position)) ** eta``."""
    return (1.0 / (1.0 + np.asarray(position, dtype=np.float64))) ** eta


EXAMINATION_CURVES = ("power", "log", "exponential")


@dataclass(frozen=True)
class Examination:
    """How likely a user looks at a 0-based display position, the shop's position bias.

    "power" (the default): ``(1 / (1 + p)) ** param``; "log": ``(1 / log2(2 + p)) ** param``, DCG's discount, a
    slow decay; "exponential": ``param ** p``, a cascade-like steep drop. Shops made with different curves test
    whether a position correction learns the curve it was given or the one it was designed on.
    """

    curve: str = "power"
    param: float = POSITION_BIAS_ETA

    def __post_init__(self) -> None:
        if self.curve not in EXAMINATION_CURVES:
            raise ValueError(f"examination curve {self.curve!r}: valid curves are {list(EXAMINATION_CURVES)}")
        ok = 0.0 < self.param < 1.0 if self.curve == "exponential" else self.param >= 0.0
        if not ok:
            need = "in (0, 1)" if self.curve == "exponential" else ">= 0"
            raise ValueError(f"examination {self.curve}:{self.param}: the parameter must be {need}")

    @classmethod
    def parse(cls, spec: str) -> "Examination":
        """``"curve:param"`` (e.g. ``exponential:0.7``) or ``"curve"`` with its default parameter."""
        curve, _, param = str(spec).partition(":")
        default = {"power": POSITION_BIAS_ETA, "log": 1.0, "exponential": 0.7}.get(curve.strip(), 0.0)
        try:
            value = float(param) if param else default
        except ValueError:
            raise ValueError(f"examination {spec!r}: the parameter after ':' must be a number") from None
        return cls(curve.strip(), value)

    @classmethod
    def of_meta(cls, meta: dict) -> "Examination":
        """The curve a shop was generated with (shops from before the curve was recorded: power, their eta)."""
        if "examination" in meta:
            return cls.parse(meta["examination"])
        return cls("power", float(meta.get("position_bias_eta", POSITION_BIAS_ETA)))

    @property
    def spec(self) -> str:
        return f"{self.curve}:{self.param:g}"

    def probability(self, position: np.ndarray) -> np.ndarray:
        p = np.asarray(position, dtype=np.float64)
        if self.curve == "power":
            return position_bias(p, self.param)
        if self.curve == "log":
            return (1.0 / np.log2(2.0 + p)) ** self.param
        return self.param ** p

    def log_effect(self, positions: int) -> list[float]:
        """log examination of positions 0..positions-1 relative to position 0 (what a position tower should learn)."""
        return np.log(self.probability(np.arange(positions))).tolist()


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ids(prefix: str, n: int) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pa.array(np.arange(n)).cast(pa.string()), "")


def _sample_within(group: np.ndarray, u: np.ndarray, cum: np.ndarray, start: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Popularity-weighted draws of one member of each `group[j]`, vectorised by inverse-CDF.

    `cum` is the cumulative popularity of members sorted by group (`order`), `start[g]` the cumulative popularity
    before group g (length n_groups + 1); u ~ U[0, 1).
    """
    target = start[group] + u * (start[group + 1] - start[group])
    idx = np.searchsorted(cum, target, side="right")
    return order[np.minimum(idx, len(order) - 1)]


def _sorted_cumulative(group: np.ndarray, weight: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(group, kind="stable")
    cum = np.cumsum(weight[order])
    totals = np.bincount(group, weights=weight, minlength=n_groups)
    start = np.concatenate([[0.0], np.cumsum(totals)])
    return order, cum, start


def _make_catalog(size: ShopSize, rng: np.random.Generator, start_ms: int, end_ms: int) -> dict:
    n, C, B = size.n_items, size.n_categories, size.n_brands
    if n < C or B < C:
        raise ValueError(f"need n_items >= n_categories and n_brands >= n_categories, got {size}")
    centre = _normalise(rng.normal(size=(C, LATENT_DIM)))
    brand_vec = _normalise(rng.normal(size=(B, LATENT_DIM)))
    cat_p = 1.0 / np.arange(1, C + 1) ** 0.8  # Zipf-ish category sizes
    cat_p /= cat_p.sum()

    # Brands: a primary category (the first C brands cover every category once) and, for half, a second one.
    brand_cat1 = np.concatenate([np.arange(C), rng.choice(C, B - C, p=cat_p)])
    brand_cat2 = np.where(rng.random(B) < 0.5, rng.choice(C, B, p=cat_p), brand_cat1)
    pair_cat = np.concatenate([brand_cat1, brand_cat2[brand_cat2 != brand_cat1]])
    pair_brand = np.concatenate([np.arange(B), np.nonzero(brand_cat2 != brand_cat1)[0]])
    pair_order = np.lexsort((pair_brand, pair_cat))
    cat_brands = pair_brand[pair_order]  # brands grouped by category
    cat_brand_start = np.concatenate([[0], np.cumsum(np.bincount(pair_cat, minlength=C))])

    def brand_of(cat: np.ndarray) -> np.ndarray:
        count = cat_brand_start[cat + 1] - cat_brand_start[cat]
        return cat_brands[cat_brand_start[cat] + (rng.random(len(cat)) * count).astype(np.int64)]

    category = np.concatenate([np.arange(C), rng.choice(C, n - C, p=cat_p)])  # every category non-empty
    brand = brand_of(category)
    noise = rng.normal(size=(n, LATENT_DIM)) / np.sqrt(LATENT_DIM)  # ~unit norm, so 0.35 is its relative weight
    latent = _normalise(centre[category] + 0.5 * brand_vec[brand] + 0.35 * noise).astype(np.float32)
    price_level = rng.normal(3.0, 0.8, C)  # log-price per category: ~20 EUR median, ~5-100 across categories
    price = np.maximum(np.round(np.exp(price_level[category] + 0.5 * rng.normal(size=n)), 2), 0.01)
    popularity = rng.lognormal(0.0, 1.2, n)  # heavy tail: the top 1% of items draw ~10% of traffic

    created = start_ms - (rng.random(n) * 365 * DAY_MS).astype(np.int64)
    new = rng.random(n) < size.new_item_fraction
    created[new] = end_ms - (rng.random(new.sum()) * size.new_item_days * DAY_MS).astype(np.int64)

    in_stock = np.where(rng.random(n) < 0.95, 0, 1)
    color = rng.integers(0, len(COLORS), n)
    keys = pa.array(["in_stock", "color"] * n)
    values = pa.concat_arrays([pa.array(["true", "false"]), pa.array(COLORS)]).take(
        pa.array(np.stack([in_stock, 2 + color], axis=1).ravel())
    )
    attributes = pa.MapArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), keys, values)
    table = pa.table(
        {
            "item_id": _ids("i", n),
            "brand": _ids("b", B).take(pa.array(brand)),
            "category": _ids("c", C).take(pa.array(category)),
            "price": pa.array(price),
            "created_at": pa.array(created, type=TIMESTAMP),
            "attributes": attributes,
        }
    )
    return dict(table=table, centre=centre, brand_vec=brand_vec, cat_p=cat_p, category=category, brand=brand,
                latent=latent, popularity=popularity, created=created, brand_of=brand_of)


def _make_users(size: ShopSize, rng: np.random.Generator, cat: dict) -> dict:
    U = size.n_users
    country = rng.choice(len(COUNTRIES), U, p=COUNTRY_P)
    device = rng.choice(len(DEVICES), U, p=DEVICE_P)
    n_interests = rng.integers(1, MAX_INTERESTS + 1, U).astype(np.int32)
    used = np.arange(MAX_INTERESTS)[None, :] < n_interests[:, None]  # (U, 4)
    icat = rng.choice(size.n_categories, (U, MAX_INTERESTS), p=cat["cat_p"])
    ibrand = cat["brand_of"](icat.ravel()).reshape(U, MAX_INTERESTS)
    ibrand = np.where(rng.random((U, MAX_INTERESTS)) < 0.6, ibrand, -1)  # 60% of interests prefer a brand
    weight = np.where(used, rng.gamma(1.0, size=(U, MAX_INTERESTS)), 0.0)  # Dirichlet(1) over the used slots
    weight /= weight.sum(axis=1, keepdims=True)
    icat, ibrand = np.where(used, icat, -1), np.where(used, ibrand, -1)
    vec = cat["centre"][np.maximum(icat, 0)] + 0.5 * cat["brand_vec"][np.maximum(ibrand, 0)] * (ibrand >= 0)[..., None]
    table = pa.table(
        {
            "user_id": _ids("u", U),
            "country": pa.array(COUNTRIES).take(pa.array(country)),
            "device": pa.array(DEVICES).take(pa.array(device)),
        }
    )
    return dict(table=table, country=country, device=device, n_interests=n_interests, icat=icat.astype(np.int32),
                ibrand=ibrand.astype(np.int32), weight=weight.astype(np.float32), vec=_normalise(vec))


def _make_sessions(size: ShopSize, rng: np.random.Generator, cat: dict, usr: dict, start_ms: int, end_ms: int) -> dict:
    """Draws sessions and the (S, K) matrix of shown items, ordered by the logging policy."""
    U, K = size.n_users, size.items_per_session
    user = np.repeat(np.arange(U), np.maximum(1, rng.poisson(size.sessions_per_user, U)))
    S = len(user)
    time = start_ms + (rng.random(S) * (end_ms - start_ms - 3_600_000)).astype(np.int64)  # room for follow-ups
    cumw = np.cumsum(usr["weight"][user], axis=1)
    slot = np.minimum((rng.random(S)[:, None] > cumw).sum(axis=1), usr["n_interests"][user] - 1)
    icat, ibrand = usr["icat"][user, slot], usr["ibrand"][user, slot]
    page = rng.choice(len(PAGES), S, p=PAGE_P)

    pop = cat["popularity"]
    c_order, c_cum, c_start = _sorted_cumulative(cat["category"], pop, size.n_categories)
    b_order, b_cum, b_start = _sorted_cumulative(cat["brand"], pop, size.n_brands)
    g_cum = np.cumsum(pop)

    u = rng.random((S, K))
    from_cat = _sample_within(np.repeat(icat, K), u.ravel(), c_cum, c_start, c_order).reshape(S, K)
    from_global = np.minimum(np.searchsorted(g_cum, rng.random((S, K)) * g_cum[-1], side="right"), len(pop) - 1)
    brand_ok = ibrand >= 0
    has_brand_items = brand_ok & (b_start[np.maximum(ibrand, 0) + 1] > b_start[np.maximum(ibrand, 0)])
    from_brand = _sample_within(np.repeat(np.maximum(ibrand, 0), K), u.ravel(), b_cum, b_start, b_order).reshape(S, K)
    mix = rng.random((S, K))
    is_home, is_search = (page == 0)[:, None], (page == 2)[:, None]
    item = np.where(is_home & (mix >= 0.6), from_global, from_cat)
    item = np.where(is_search & has_brand_items[:, None] & (mix < 0.5), from_brand, item)

    # Drop impressions of items not yet created and repeats within a session, then order by a noisy logging score.
    valid = cat["created"][item] <= time[:, None]
    srt = np.sort(item, axis=1)
    first = np.argsort(item, axis=1, kind="stable")
    dup_sorted = np.concatenate([np.zeros((S, 1), bool), srt[:, 1:] == srt[:, :-1]], axis=1)
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, first, dup_sorted, axis=1)
    valid &= ~dup
    score = np.log(pop[item]) + rng.gumbel(size=(S, K))
    score[~valid] = -np.inf
    rank_order = np.argsort(-score, axis=1, kind="stable")
    item = np.take_along_axis(item, rank_order, axis=1)
    valid = np.take_along_axis(valid, rank_order, axis=1)
    position = np.cumsum(valid, axis=1) - 1  # valid ones come first, so positions are 0..m-1
    return dict(user=user, time=time, slot=slot, icat=icat, ibrand=ibrand, page=page, item=item, valid=valid,
                position=position)


def popularity_z(popularity: np.ndarray) -> np.ndarray:
    """(n_items,) z-score of log popularity, the popularity term of the relevance logit."""
    logpop = np.log(popularity)
    return (logpop - logpop.mean()) / logpop.std()


def relevance_logit(match: np.ndarray, pop_z: np.ndarray) -> np.ndarray:
    """The generator's relevance logit A * <interest, item latent> + B * popularity z + C: the one definition that
    the generator, `true_relevance`, the replay and the policy section use."""
    return RELEVANCE_A * match + RELEVANCE_B * pop_z + RELEVANCE_C


def _relevance(user_vec: np.ndarray, item_latent: np.ndarray, pop_z: np.ndarray) -> np.ndarray:
    """The click probability of an examined item: sigmoid of `relevance_logit`."""
    return 1.0 / (1.0 + np.exp(-relevance_logit(np.einsum("...d,...d->...", user_vec, item_latent), pop_z)))


def catalog_category_index(catalog: pa.Table) -> np.ndarray:
    """(n_items,) the generator's category number of each catalog row (its categories are named "c<number>")."""
    return np.array([int(c[1:]) for c in catalog.column("category").to_pylist()], dtype=np.int64)


def true_relevance(hidden: dict[str, np.ndarray], user: np.ndarray, item: np.ndarray,
                   interest: np.ndarray | None = None) -> np.ndarray:
    """The generator's relevance r(user, item) in [0, 1], the click probability once an item is examined.

    Args:
        hidden: a synthetic shop's `hidden` arrays.
        user, item: row indices into the users and catalog tables (item index - 1), broadcastable.
        interest: the session's interest slot; None gives the interest-weighted expectation over the user's interests.
    Returns:
        r with the broadcast shape of `user` and `item`.
    """
    missing = {"user_interest_vec", "item_popularity", "item_latent", "user_interest_weight"} - set(hidden)
    if missing:
        raise ValueError(f"the shop's hidden truth lacks {sorted(missing)}: it was written by an older generator "
                         f"(this one is version {GENERATOR_VERSION}); generate it again with `recsys generate`")
    user, item = np.asarray(user), np.asarray(item)
    vec, latent = hidden["user_interest_vec"], hidden["item_latent"]
    pop_z = popularity_z(hidden["item_popularity"])[item]
    if interest is not None:
        return _relevance(vec[user, np.asarray(interest)], latent[item], pop_z)
    weight = hidden["user_interest_weight"][user]  # (..., 4), zero for unused slots
    r = np.stack([_relevance(vec[user, j], latent[item], pop_z) for j in range(vec.shape[1])], axis=-1)
    return (r * weight[..., :]).sum(-1) / weight.sum(-1)


def _make_events(rng: np.random.Generator, cat: dict, usr: dict, ses: dict, examination: Examination) -> pa.Table:
    S, K = ses["item"].shape
    s_idx, k_idx = np.nonzero(ses["valid"])  # row-major: grouped by session, in display order
    item = ses["item"][s_idx, k_idx]
    position = ses["position"][s_idx, k_idx]
    user = ses["user"][s_idx]
    view_t = ses["time"][s_idx] + position * 1_500  # a scan of ~1.5 s per slot

    r = _relevance(usr["vec"][user, ses["slot"][s_idx]], cat["latent"][item], popularity_z(cat["popularity"])[item])
    click = rng.random(len(item)) < r * examination.probability(position)
    wish = click & (rng.random(len(item)) < P_WISHLIST)
    cart = click & (rng.random(len(item)) < P_CART_SCALE * r)
    buy = cart & (rng.random(len(item)) < P_PURCHASE)

    def delay(mean_s: float) -> np.ndarray:  # at least 1 s, so the funnel order survives sorting by time
        return 1_000 + (rng.exponential(mean_s, len(item)) * 1_000).astype(np.int64)

    click_t = view_t + delay(20)
    times = [view_t, click_t, click_t + delay(30), click_t + delay(60)]
    times.append(times[3] + delay(120))
    masks = [np.ones(len(item), bool), click, wish, cart, buy]
    rows = np.concatenate([np.nonzero(m)[0] for m in masks])
    action = np.concatenate([np.full(m.sum(), a, np.int64) for a, m in enumerate(masks)])
    ts = np.concatenate([t[m] for t, m in zip(times, masks)])
    order = np.lexsort((action, rows, ts))  # by time; ties by impression then funnel step, so it is deterministic
    rows, action, ts = rows[order], action[order], ts[order]

    sess = s_idx[rows]
    ev_user = user[rows]
    # Query: "<category> <brand>" on search pages with a preferred brand, "<category>" otherwise, null off search.
    cat_name = _ids("c", len(cat["centre"])).take(pa.array(np.maximum(ses["icat"], 0)))
    brand_name = _ids("b", len(cat["brand_vec"])).take(pa.array(np.maximum(ses["ibrand"], 0)))
    query = pc.if_else(pa.array(ses["ibrand"] >= 0), pc.binary_join_element_wise(cat_name, brand_name, " "), cat_name)
    query = pc.if_else(pa.array(ses["page"] == 2), query, pa.nulls(S, pa.string()))
    table = pa.table(
        {
            "user_id": usr["table"]["user_id"].take(pa.array(ev_user)),
            "item_id": cat["table"]["item_id"].take(pa.array(item[rows])),
            "timestamp": pa.array(ts, type=TIMESTAMP),
            "action": pa.array(ACTIONS).take(pa.array(action)),
            "position": pa.array(position[rows].astype(np.int32)),
            "country": pa.array(COUNTRIES).take(pa.array(usr["country"][ev_user])),
            "device": pa.array(DEVICES).take(pa.array(usr["device"][ev_user])),
            "page": pa.array(PAGES).take(pa.array(ses["page"][sess])),
            "query": query.take(pa.array(sess)),
        }
    )
    return table


def generate_shop(size: str | ShopSize, seed: int = 0, examination: Examination = Examination()) -> Shop:
    """Generates a synthetic shop; the same size, seed and examination curve give byte-identical tables.

    Args:
        size: a name in `SIZES` ("tiny", "small", "demo", "large") or a `ShopSize`.
        seed: the random seed.
        examination: the position bias of the logged clicks (recorded in the meta as "examination").

    Returns:
        A validated `Shop` whose `hidden` holds the ground truth: "item_latent" (n_items, 16) float32,
        "user_interest_category"/"user_interest_brand" (n_users, 4) int32 (-1 = unused/none),
        "user_interest_weight" (n_users, 4) float32, "user_n_interests" (n_users,) int32,
        "category_centre" (n_categories, 16) float32, "user_interest_vec" (n_users, 4, 16) float32 and
        "item_popularity" (n_items,) float64; `true_relevance` turns them into the generator's r(user, item).

    Raises:
        ValueError: unknown size name.
    """
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"unknown shop size {size!r}; valid names: {sorted(SIZES)}")
        name, size = size, SIZES[size]
    else:
        name = "custom"
    rng = np.random.default_rng(seed)
    end_ms = int(END_TIME.timestamp() * 1000)
    start_ms = end_ms - size.days * DAY_MS
    cat = _make_catalog(size, rng, start_ms, end_ms)
    usr = _make_users(size, rng, cat)
    ses = _make_sessions(size, rng, cat, usr, start_ms, end_ms)
    events = _make_events(rng, cat, usr, ses, examination)

    def iso(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")

    last_ms = int(pc.max(events["timestamp"]).cast(pa.int64()).as_py())
    meta = {
        "source": "synthetic", "generator": GENERATOR_VERSION, "size": name, "seed": seed,
        **({"position_bias_eta": examination.param} if examination.curve == "power" else {}),
        **({} if examination == Examination() else {"examination": examination.spec}),
        "start_time": iso(start_ms), "end_time": iso(last_ms), "new_item_days": size.new_item_days,
        "latent_dim": LATENT_DIM, "n_events": events.num_rows,
    }
    hidden = {
        "item_latent": cat["latent"],
        "user_interest_category": usr["icat"],
        "user_interest_brand": usr["ibrand"],
        "user_interest_weight": usr["weight"],
        "user_n_interests": usr["n_interests"],
        "category_centre": cat["centre"].astype(np.float32),
        "user_interest_vec": usr["vec"].astype(np.float32),
        "item_popularity": cat["popularity"].astype(np.float64),
    }
    return Shop(
        catalog=validate_table(cat["table"], CATALOG_SCHEMA, "synthetic catalog"),
        users=validate_table(usr["table"], USERS_SCHEMA, "synthetic users"),
        events=validate_table(events, EVENTS_SCHEMA, "synthetic events"),
        meta=meta,
        hidden=hidden,
    )
