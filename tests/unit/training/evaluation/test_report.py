"""Report: results.json round-trips (nan -> null), report.md states the protocol, every figure is a PNG."""
import json
import math
from pathlib import Path

from training.metrics import HARNESS_KS
from training.evaluation.report import to_jsonable, write_report


def _model(scale: float) -> dict:
    full = {f"{m}@{k}": scale * k / 500 for k in HARNESS_KS for m in ("recall", "ndcg", "hr")} | {"users": 40}
    sampled = {"hr@1": 0.1, "hr@5": 0.3, "hr@10": 0.5, "ndcg@5": 0.2, "ndcg@10": 0.25, "trials": 40}
    return {"full": full, "novelty": {"recall@100": float("nan"), "recall@500": 0.0, "users": 0},
            "diversity": {"longest_brand_run@10": 1.5, "unique_brands@10": 7.0},
            "coverage": {f"@{k}": 0.01 * k / 10 for k in HARNESS_KS},
            "sampled": {"popularity": sampled | {"sampler": "popularity"}, "uniform": sampled | {"sampler": "uniform"}},
            "training": {"seconds": 12.5, "examples_per_s": 3000.0, "history": [{"epoch": 1, "loss": 2.0}]},
            "recommend_seconds": 0.4,
            "by_history_length": {"1-2": {"users": 10, "recall@100": scale, "ndcg@10": scale / 2},
                                  "3-5": {"users": 30, "recall@100": scale / 2, "ndcg@10": float("nan")}}}


def _results() -> dict:
    gain = {"basis": "true interests",
            "groups": {"1": {"users": 5, "multi_interest": 0.5, "two_tower": 0.6, "gain": -0.1},
                       "3": {"users": 7, "multi_interest": 0.7, "two_tower": 0.5, "gain": 0.2}}}
    task = {"evaluated_users": 40, "targets": 40, "train_events": 1000, "train_engagements": 300, "items": 200}
    return {"dataset": {"name": "toy", "format": "synthetic", "items": 200, "users": 50, "events": 1200,
                        "engagements": 340},
            "config": {"models": ["two_tower", "multi_interest"]},
            "protocols": {"leave_last_out": {"task": task, "description": "leave-last-out",
                                             "models": {"two_tower": _model(0.6), "multi_interest": _model(0.7)},
                                             "multi_interest_gain": gain, "sections": []}}}


def test_report_writes_json_markdown_and_figures(tmp_path: Path) -> None:
    results = _results()
    paths = write_report(results, tmp_path / "out")
    loaded = json.loads(paths["json"].read_text())
    assert loaded == to_jsonable(results | {"figures": loaded["figures"]})
    nov = loaded["protocols"]["leave_last_out"]["models"]["two_tower"]["novelty"]
    assert nov["recall@100"] is None  # nan is not JSON
    assert sorted(loaded["figures"]) == ["by_history_length_leave_last_out.png", "multi_interest_gain_leave_last_out.png",
                                         "recall_at_k_leave_last_out.png"]
    for f in paths["figures"]:
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = paths["markdown"].read_text()
    assert "already-seen items excluded" in md and "ONLY for comparison with papers" in md
    assert "| two_tower | 0.0120 | 0.0600 | 0.1200 | 0.6000 |" in md  # recall@10,50,100,500 = 0.6 * k / 500
    assert "| 3 | 7 | 0.7000 | 0.5000 | 0.2000 | – |" in md


def test_report_without_multi_interest_has_no_gain_plot(tmp_path: Path) -> None:
    results = _results()
    results["protocols"]["leave_last_out"]["multi_interest_gain"] = {}
    paths = write_report(results, tmp_path)
    assert not (tmp_path / "multi_interest_gain_leave_last_out.png").exists()
    assert len(paths["figures"]) == 2


def test_to_jsonable_converts_numpy_and_non_finite() -> None:
    import numpy as np

    out = to_jsonable({"a": np.float32(0.5), "b": [np.int64(3), float("inf")], 4: (1.0, float("nan"))})
    assert out == {"a": 0.5, "b": [3, None], "4": [1.0, None]}
    assert json.dumps(out, allow_nan=False) and not math.isnan(out["a"])


def test_seed_verdict_says_whether_the_seed_model_wins_or_by_how_much_it_falls_short():
    from training.evaluation.report import seed_verdict

    models = {"two_tower": {"full": {"ndcg@10": 0.10, "recall@100": 0.50}},
              "ease": {"full": {"ndcg@10": 0.12, "recall@100": 0.40}}}
    verdict = seed_verdict(models)
    assert "falls short of `ease` (0.1200) by 0.0200" in verdict
    assert "recall@100: `two_tower` beats every other model" in verdict
    assert seed_verdict({"ease": models["ease"]}) == ""
