"""`recsys simulate`: the closed-loop shop. Users of a synthetic shop, whose hidden interests are known, ask the
live service for recommendations over HTTP, see its answers, and respond through `POST /events` with the
generator's own behaviour model (`training.evaluation.simulate`): a view per shown item at its position, then
clicks, wishlists, carts and purchases. What the service served (its impression log) and these events are the
training data of the next version; the per-session click and purchase rates are the simulated online metrics.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training.data.schemas import EVENTS_SCHEMA, TIMESTAMP, read_shop, validate_table
from training.data.synthetic import Examination
from training.evaluation.simulate import draw_interest, rate_interval, session_outcomes

FUNNEL = ("click", "wishlist", "add_to_cart", "purchase")
# When each step happens after the answer: the order of the generator's sessions (a scan per slot, then the
# funnel), on a timeline a thousand times faster. Simulated sessions come tens of milliseconds apart on the serving
# clock; with delays of seconds (a 1.5 s scan, a purchase 200 s on) every click of a session would fall after the
# views of hundreds of later sessions, and a time split of the served period (the loop's held-out half) would put
# the views in training and their clicks, carts and purchases in the held-out part.
SCAN_S = 0.0015
STEP_DELAY_S = {"view": 0.0, "click": 0.02, "wishlist": 0.05, "add_to_cart": 0.08, "purchase": 0.2}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
RETRIES = 5  # a shed answer (503/429 with Retry-After) is asked again, as a well-behaved client does


def _post(client: httpx.Client, path: str, body: dict) -> httpx.Response:
    for _ in range(RETRIES):
        r = client.post(path, json=body)
        if r.status_code not in (429, 503) or "Retry-After" not in r.headers:
            return r
        time.sleep(min(float(r.headers["Retry-After"]), 2.0))
    return r


def simulate(url: str, shop_dir: str | Path, sessions: int, seed: int = 0, k: int = 12, page: str = "home",
             concurrency: int = 4, prefix: str = "sim", version: str | None = None,
             post_events: bool = True) -> dict[str, Any]:
    """Runs `sessions` sessions against the service at `url`; returns the figures (and per-version rates), and
    per session ("per_session", in session order) its user, clicks and purchases.

    `version` pins every request to that live version (the request's `version` field) instead of the split.
    `post_events` False keeps the users' responses out of the service (nothing reaches `/events`): sessions that
    only measure, and leave every user's state as it was (`paired`).

    Raises:
        ValueError: the shop has no hidden truth (not a synthetic shop), or bad arguments.
    """
    if sessions < 1 or k < 1 or concurrency < 1:
        raise ValueError(f"--sessions, k and concurrency must be >= 1, got {sessions}, {k}, {concurrency}")
    shop = read_shop(shop_dir)
    if "user_interest_weight" not in shop.hidden:
        raise ValueError(f"--data {shop_dir}: simulate needs a synthetic shop (its hidden truth drives the users)")
    users = shop.users["user_id"].to_pylist()
    row_of_item = {item: i for i, item in enumerate(shop.catalog["item_id"].to_pylist())}
    examination = Examination.of_meta(shop.meta)  # the users look at positions as the shop's own users did
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(users))  # every user once before anyone comes back
    plan = [(s, int(order[s % len(users)])) for s in range(sessions)]

    def one(session: int, user_row: int, client: httpx.Client) -> dict[str, Any]:
        srng = np.random.default_rng([seed, session])
        user = users[user_row]
        request_id = f"{prefix}-{seed}-{session}"
        body = {"user_id": user, "k": k, "request_id": request_id, "context": {"page": page}}
        r = _post(client, "/recommend", body | ({"version": version} if version else {}))
        if r.status_code != 200:
            return {"error": f"/recommend HTTP {r.status_code}"}
        answer = r.json()
        shown = [i["item_id"] for i in answer["items"]]
        out = session_outcomes(shop.hidden, user_row, np.array([row_of_item.get(i, -1) for i in shown]),
                               draw_interest(shop.hidden, user_row, srng), srng, examination)
        served = datetime.fromisoformat(answer["served_at"].replace("Z", "+00:00")).timestamp()
        events = []
        for action in ("view", *FUNNEL):
            done = np.ones(len(shown), bool) if action == "view" else getattr(out, action)
            events += [{"user_id": user, "item_id": shown[p], "action": action, "position": int(p),
                        "context": {"page": page},
                        "timestamp": _iso(served + SCAN_S * (p + 1) + STEP_DELAY_S[action])}
                       for p in np.flatnonzero(done)]
        e = _post(client, "/events", {"events": events}) if events and post_events else None
        if e is not None and e.status_code != 200:
            return {"error": f"/events HTTP {e.status_code}"}
        return {"session": session, "user": user, "version": answer["version"], "clicks": int(out.click.sum()), "purchases": int(out.purchase.sum()),
                "shown": len(shown), "relevance@k": float(out.relevance.mean()) if len(shown) else 0.0,
                "events": events}

    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=30.0) as client, ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda p: one(p[0], p[1], client), plan))
    seconds = time.perf_counter() - t0
    done = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]

    def figures(rows: list[dict]) -> dict[str, Any]:
        clicks = np.array([r["clicks"] for r in rows], dtype=np.float64)
        buys = np.array([r["purchases"] for r in rows], dtype=np.float64)
        return {"sessions": len(rows), "clicks_per_session": rate_interval(clicks),
                "purchases_per_session": rate_interval(buys),
                "sessions_with_click": rate_interval(clicks > 0), "sessions_with_purchase": rate_interval(buys > 0),
                "mean_relevance@k": float(np.mean([r["relevance@k"] for r in rows])) if rows else float("nan")}

    versions = sorted({r["version"] for r in done})
    return {"url": url, "sessions": sessions, "k": k, "page": page, "seed": seed, "seconds": seconds,
            "errors": len(errors), "error_kinds": sorted(set(errors)), "all": figures(done),
            "by_version": {v: figures([r for r in done if r["version"] == v]) for v in versions},
            "per_session": [{k_: r[k_] for k_ in ("session", "user", "version", "clicks", "purchases")}
                            for r in done],
            "events": [e for r in done for e in r["events"]]}


def paired(url: str, shop_dir: str | Path, sessions: int, versions: tuple[str, str], seed: int = 0, k: int = 12,
           page: str = "home", concurrency: int = 4, prefix: str = "pair") -> dict[str, Any]:
    """A paired online comparison: every session runs once against each of two versions (pinned), with the same
    user, the same interest and the same random numbers for the funnel (common random numbers), and posts no
    events, so neither answer changes what the other version knows about the user. The per-session difference
    (second minus first) carries no user-to-user variance, unlike a split where each version gets other users.

    Returns per version its figures, and "difference": clicks and purchases per session, second minus first, each
    with its 95% interval, and the share of sessions where the second had more clicks / fewer.
    """
    runs = {v: simulate(url, shop_dir, sessions, seed=seed, k=k, page=page, concurrency=concurrency,
                        prefix=f"{prefix}-{v}", version=v, post_events=False) for v in versions}
    a, b = ({r["session"]: r for r in runs[v]["per_session"]} for v in versions)
    both = sorted(set(a) & set(b))
    diff = {m: np.array([b[s][m] - a[s][m] for s in both], dtype=np.float64) for m in ("clicks", "purchases")}
    return {"versions": list(versions), "sessions": len(both), "seed": seed,
            "by_version": {v: runs[v]["all"] for v in versions},
            "errors": {v: runs[v]["errors"] for v in versions},
            "difference": {f"{m}_per_session": rate_interval(d) for m, d in diff.items()}
            | {"second_ahead_share": float((diff["clicks"] > 0).mean()) if both else float("nan"),
               "second_behind_share": float((diff["clicks"] < 0).mean()) if both else float("nan")}}


def events_table(result: dict[str, Any], shop_dir: str | Path) -> pa.Table:
    """The events the simulated users posted, as EVENTS_SCHEMA rows (country and device from the shop's users)."""
    rows = result["events"]
    users = read_shop(shop_dir).users
    where = dict(zip(users["user_id"].to_pylist(), zip(users["country"].to_pylist(), users["device"].to_pylist())))
    table = pa.table({
        "user_id": [e["user_id"] for e in rows], "item_id": [e["item_id"] for e in rows],
        "timestamp": pa.array([int(datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp() * 1000)
                               for e in rows], type=TIMESTAMP),
        "action": [e["action"] for e in rows], "position": pa.array([e["position"] for e in rows], pa.int32()),
        "country": [where[e["user_id"]][0] for e in rows], "device": [where[e["user_id"]][1] for e in rows],
        "page": [e["context"]["page"] for e in rows], "query": pa.nulls(len(rows), pa.string())})
    return validate_table(table.sort_by("timestamp"), EVENTS_SCHEMA, "simulated events")


def format_summary(result: dict[str, Any]) -> str:
    lines = [f"{result['sessions']} sessions in {result['seconds']:.0f}s against {result['url']} "
             f"({result['errors']} failed)"]
    for name, f in [("all", result["all"])] + list(result["by_version"].items()):
        c, p = f["clicks_per_session"], f["purchases_per_session"]
        lines.append(f"  {name:>8}: {f['sessions']:5d} sessions, clicks/session {c['mean']:.3f} "
                     f"[{c['lo']:.3f}, {c['hi']:.3f}], purchases/session {p['mean']:.4f} [{p['lo']:.4f}, "
                     f"{p['hi']:.4f}], mean true relevance of the shown items {f['mean_relevance@k']:.3f}")
    return "\n".join(lines)


def write_result(result: dict[str, Any], shop_dir: str | Path, folder: str | Path) -> Path:
    """`folder/simulate.json` (the figures) and `folder/events.parquet` (what the users did)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "simulate.json").write_text(json.dumps({k: v for k, v in result.items() if k != "events"}, indent=2,
                                                     default=float))
    pq.write_table(events_table(result, shop_dir), folder / "events.parquet")
    return folder
