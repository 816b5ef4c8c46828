"""Off-policy estimates from a served log (training/evaluation/served_replay.py): the log is written by the
ingress's own row builders and sink, the answers by the real policy with the logging shuffle, the outcomes by the
closed-loop shop's users; the estimates must cover the shop's exact truth where the target has support."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from deployments.ingress.impressions import ParquetSink, answer_rows, policy_input_row
from training.data.schemas import TIMESTAMP
from training.data.synthetic import Examination, generate_shop, true_relevance
from training.evaluation.served_replay import load_served, served_replay
from training.evaluation.simulate import draw_interest, session_outcomes
from training.request.contracts import RankedList, UserState
from training.request.policy import apply_policy, policy_rng
from training.request.policy_config import PolicyConfig

K, N_CAND, SESSIONS = 8, 30, 3000
# A user comes back every 400 sessions (400 s), after the outcome window: a later session's click on an item the
# user saw before must not label the earlier impression.
WINDOW_S = 300.0
NOW = 1_790_000_000.0
LOGGING = PolicyConfig(shuffle_epsilon=0.5, shuffle_top=K, explore_epsilon=0.3, explore_slots=(3,))


@pytest.fixture(scope="module")
def shop():
    return generate_shop("tiny", seed=0)


def serve(shop, folder, config: PolicyConfig = LOGGING, sessions: int = SESSIONS) -> pa.Table:
    """Answers `sessions` requests with the policy, logs them as the ingress does, and returns the users' events."""
    rng = np.random.default_rng(7)
    cat = shop.catalog
    ids, brands, cats = (cat[c].to_pylist() for c in ("item_id", "brand", "category"))
    users = shop.users["user_id"].to_pylist()
    examination = Examination.of_meta(shop.meta)
    entries, events = [], []
    for s in range(sessions):
        u = s % len(users)
        pool = rng.choice(len(ids), 10 * N_CAND, replace=False)  # a ranker's order: true relevance plus noise
        noisy = np.log(true_relevance(shop.hidden, u, pool)) + 0.5 * rng.standard_normal(len(pool))
        rows = pool[np.argsort(-noisy)[:N_CAND]]
        created = np.where(rng.random(N_CAND) < 0.2, NOW - 86_400.0, NOW - 300 * 86_400.0)  # a fifth are new
        ranked = RankedList([ids[i] for i in rows], np.linspace(1, 0, N_CAND), [brands[i] for i in rows],
                            [cats[i] for i in rows], ["retrieval"] * N_CAND, created_at=created)
        rid, served_at = f"req-{s}", NOW + s
        final = apply_policy(ranked, UserState({}, NOW), config, policy_rng(config, rid))
        entries.append((answer_rows(rid, users[u], "v1", "home", final, K, served_at),
                        policy_input_row(rid, users[u], "v1", "home", K, config, ranked, {}, NOW)))
        entries[-1][1]["served_at"] = served_at
        shown = [rows[ranked.item_ids.index(i)] for i in final.item_ids[:K]]
        srng = np.random.default_rng([7, s])
        out = session_outcomes(shop.hidden, u, np.array(shown), draw_interest(shop.hidden, u, srng), srng,
                               examination)
        for p in range(K):
            for action, done, delay in (("click", out.click, 10), ("purchase", out.purchase, 100)):
                if done[p]:
                    events.append({"user_id": users[u], "item_id": ids[shown[p]], "action": action,
                                   "timestamp": int((served_at + delay) * 1000)})
    ParquetSink(folder).write(entries)
    return pa.Table.from_pylist(events, schema=pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                                                           ("action", pa.string()), ("timestamp", TIMESTAMP)]))


@pytest.fixture(scope="module")
def logged(shop, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    return folder, serve(shop, folder)


@pytest.fixture(scope="module")
def result(shop, logged):
    folder, events = logged
    requests, counts = load_served(folder, events, window_s=WINDOW_S)
    assert counts == {"impressions": SESSIONS * K, "answers_with_inputs": SESSIONS, "answers_without_inputs": 0}
    assert load_served(folder, events, window_s=WINDOW_S, version="v2")[1]["answers_with_inputs"] == 0
    return served_replay(requests, shop, {"no_shuffle": {"shuffle_epsilon": 0.0},
                                          "diversity_off": {"brand_diversity": False, "shuffle_epsilon": 0.0}},
                         bootstrap=200)


def test_every_served_answer_is_reproduced_and_the_served_policy_estimates_its_own_rate(result):
    assert result["replayed"] == SESSIONS and result["unexplained"] == 0
    served = result["policies"]["served"]
    assert served["ctr"]["ips"] == pytest.approx(result["logged"]["ctr"])  # all weights are 1
    assert served["support"]["unsupported_share"] == 0.0
    assert served["ctr"]["ips_lo"] <= served["truth"]["ctr"] <= served["ctr"]["ips_hi"]


def test_a_supported_change_is_estimated_within_its_interval_of_the_truth(result):
    """Without the shuffle the target shows the logger's own top K, so every item it shows had support."""
    p = result["policies"]["no_shuffle"]
    assert p["support"]["unsupported_share"] == 0.0
    for m in ("ctr", "purchase_rate"):
        assert p[m]["ips_lo"] <= p["truth"][m] <= p[m]["ips_hi"], m
        assert p[m]["snips_lo"] <= p["truth"][m] <= p[m]["snips_hi"], m
    # The lists are in (noisy) relevance order, so the shuffle costs clicks; the estimate says so too.
    served = result["policies"]["served"]
    assert p["truth"]["ctr"] > served["truth"]["ctr"] and p["ctr"]["snips"] > served["ctr"]["snips"]


def test_a_change_that_shows_items_the_logger_never_could_reports_its_unsupported_share(result):
    p = result["policies"]["diversity_off"]
    assert 0.0 < p["support"]["unsupported_share"] < 1.0


def test_an_answer_the_policy_cannot_reproduce_is_left_out_and_counted(shop, tmp_path):
    events = serve(shop, tmp_path / "log", sessions=40)
    requests, _ = load_served(tmp_path / "log", events, window_s=WINDOW_S)
    requests[0].shown[0], requests[0].shown[1] = "not-an-item", requests[0].shown[0]
    out = served_replay(requests, shop, {}, bootstrap=20)
    assert out["unexplained"] == 1 and out["replayed"] == 39
    with pytest.raises(ValueError, match="no served answer could be replayed"):
        served_replay(requests[:1], shop, {}, bootstrap=20)


def test_recsys_replay_served_prints_the_estimates_and_names_bad_input(shop, logged, tmp_path, capsys):
    import json

    import pyarrow.parquet as pq

    from cluster.cli import main
    from training.data.schemas import write_shop

    folder, events = logged
    shop_dir, ev = tmp_path / "shop", tmp_path / "events.parquet"
    write_shop(shop, shop_dir)
    pq.write_table(events, ev)
    main(["replay", "--served", str(folder), "--events", str(ev), "--data", str(shop_dir), "--window-s", "300",
          "--changes", '{"no_shuffle": {"shuffle_epsilon": 0}}', "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert f"{SESSIONS} of {SESSIONS} served answers replayed" in out and "no_shuffle" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["log"]["answers_with_inputs"] == SESSIONS and "truth" in saved["policies"]["no_shuffle"]
    for argv, message in ((["--events", str(tmp_path / "none.parquet")], "none.parquet: not a readable Parquet"),
                          ([], "--served needs --events")):
        with pytest.raises(SystemExit):
            main(["replay", "--served", str(folder), *argv])
        assert message in capsys.readouterr().err
    pq.write_table(events.drop(["action"]), tmp_path / "bad.parquet")
    with pytest.raises(SystemExit):
        main(["replay", "--served", str(folder), "--events", str(tmp_path / "bad.parquet")])
    assert "bad.parquet: missing column(s) ['action']" in capsys.readouterr().err
