"""Harness end to end on a tiny shop with the baselines only (they need no Ray), and its error paths."""
import argparse
import json
from pathlib import Path

import pytest
from rich.console import Console

from training.evaluation import harness
from training.evaluation.harness import add_eval_arguments, eval_command, load_model, run_eval
from training.data.schemas import write_shop
from training.data.synthetic import generate_shop
from training.fit.train_loop import TrainConfig

BASELINES = ["popularity", "item_knn", "ease"]


@pytest.fixture(scope="module")
def shop_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shop")
    write_shop(generate_shop("tiny", 0), path)
    return path


def test_run_eval_with_baselines_writes_the_full_report(shop_dir: Path, tmp_path: Path) -> None:
    quiet = Console(file=open(tmp_path / "log.txt", "w"))
    results = run_eval(shop_dir, "synthetic", tmp_path / "out", BASELINES, cfg=TrainConfig(), max_users=200,
                       console=quiet, sections=False)
    assert list(results["protocols"]) == ["leave_last_out", "temporal"]
    llo = results["protocols"]["leave_last_out"]
    assert llo["task"]["evaluated_users"] == 200 and list(llo["models"]) == BASELINES
    for m in llo["models"].values():
        assert set(m["full"]) >= {"recall@10", "recall@500", "ndcg@10", "hr@100"}
        assert m["full"]["recall@500"] >= m["full"]["recall@100"] >= m["full"]["recall@10"]
        assert set(m["sampled"]) == {"popularity", "uniform"}
        assert sum(b["users"] for b in m["by_history_length"].values()) == 200
    assert llo["models"]["ease"]["full"]["ndcg@10"] > llo["models"]["popularity"]["full"]["ndcg@10"]
    assert llo["multi_interest_gain"] == {}  # neither multi_interest nor two_tower ran
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["protocols"]["temporal"]["models"]["item_knn"]["full"]["users"] > 0
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "recall_at_k_temporal.png").is_file()
    assert "temporal: ease NDCG@10" in (tmp_path / "log.txt").read_text()  # progress names model and protocol
    prep = written["dataset"]["preprocessing"]  # the recipe is stated, and the sizes are the kept data's
    assert prep["recipe"]["dedup"] is False and prep["after"]["events"] == written["dataset"]["events"]
    assert "Preprocessing: no dedup" in (tmp_path / "out" / "report.md").read_text()


def test_unknown_model_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="'bm25'"):
        load_model("bm25")


def test_model_that_fails_to_import_is_an_error_naming_it(monkeypatch, shop_dir: Path, tmp_path: Path) -> None:
    monkeypatch.setitem(harness.REGISTRY, "broken", "training.no_such_module:Model")
    with pytest.raises(ImportError, match="model 'broken'"):
        run_eval(shop_dir, "synthetic", tmp_path, ["popularity", "broken"], sections=False)
    assert not (tmp_path / "results.json").exists()  # failed before any work


def test_eval_command_parses_the_cli_arguments(shop_dir: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(["--data", str(shop_dir), "--format", "synthetic", "--out", str(tmp_path / "r"),
                              "--models", "popularity", "--protocols", "temporal", "--max-users", "30",
                              "--no-sections", "--k-core", "3"])
    results = eval_command(args, TrainConfig())
    assert list(results["protocols"]) == ["temporal"] and results["config"]["max_users"] == 30
    assert results["dataset"]["preprocessing"]["recipe"]["min_item_engagements"] == 3
    bad = parser.parse_args(["--data", str(shop_dir), "--format", "synthetic", "--out", str(tmp_path),
                             "--protocols", "random_split"])
    with pytest.raises(ValueError, match="random_split"):
        eval_command(bad, TrainConfig())
    named = parser.parse_args(["--data", str(shop_dir), "--format", "synthetic", "--out", str(tmp_path),
                               "--config", "tiny"])
    with pytest.raises(ValueError, match="--config tiny"):
        eval_command(named)


class _FailingModel:
    name = "failing"
    needs_ray = False

    def fit(self, task, cfg) -> dict:
        raise FloatingPointError("loss is nan at step 3")

    def recommend(self, task, k):
        raise AssertionError("never reached")


def test_a_model_that_fails_to_train_is_reported_and_raised_after_the_report(monkeypatch, shop_dir: Path,
                                                                              tmp_path: Path) -> None:
    import sys
    import types

    module = types.ModuleType("_failing_model_for_test")
    module.FailingModel = _FailingModel
    monkeypatch.setitem(sys.modules, "_failing_model_for_test", module)
    monkeypatch.setitem(harness.REGISTRY, "failing", "_failing_model_for_test:FailingModel")
    with pytest.raises(RuntimeError, match="leave_last_out/failing: FloatingPointError: loss is nan"):
        run_eval(shop_dir, "synthetic", tmp_path, ["popularity", "failing"], protocols=("leave_last_out",),
                 max_users=50, sections=False, console=Console(file=open(tmp_path / "log.txt", "w")))
    written = json.loads((tmp_path / "results.json").read_text())
    assert list(written["protocols"]["leave_last_out"]["models"]) == ["popularity"]
    assert "loss is nan" in written["protocols"]["leave_last_out"]["failed"]["failing"]
    assert "### Failed models" in (tmp_path / "report.md").read_text()


def test_multi_interest_gain_groups_users_by_true_interest_count() -> None:
    import numpy as np

    from training.evaluation.harness import multi_interest_gain

    class Task:
        hidden = {"user_n_interests": np.array([1, 3, 4, 1, 2])}
        user_rows = np.array([0, 1, 2, 3, 4])

    per_user = {"multi_interest": {"recall@500": np.array([0.0, 1.0, 1.0, 1.0, 0.5]),
                                   "interests": np.array([1, 3, 2, 1, 2])},
                "two_tower": {"recall@500": np.array([1.0, 0.0, 0.5, 1.0, 0.5])}}
    gain = multi_interest_gain(Task(), per_user)
    assert gain["basis"] == "true interests"
    gain = gain["groups"]
    assert list(gain) == ["1", "2", "3", "4", "3+"]
    assert gain["1"]["gain"] == pytest.approx(-0.5) and gain["1"]["users"] == 2
    assert gain["3+"]["gain"] == pytest.approx(0.75) and gain["3+"]["interests_used"] == pytest.approx(2.5)
    assert multi_interest_gain(Task(), {"two_tower": per_user["two_tower"]}) == {}


def test_without_ground_truth_the_gain_groups_users_by_history_diversity() -> None:
    import numpy as np

    from training.data.features import ItemFeatures
    from training.evaluation.harness import multi_interest_gain

    class Task:  # items 1-2 in category 1, 3 in 2, 4 in 3
        hidden = {}
        item_features = ItemFeatures(*(np.array(a) for a in ([0, 1, 2, 3, 4], [0] * 5, [0, 1, 1, 2, 3], [0] * 5)))
        seen = [np.array([1, 2]), np.array([1, 3]), np.array([1, 3, 4]), np.array([2, 3, 4])]

    per_user = {"multi_interest": {"recall@500": np.array([0.0, 1.0, 1.0, 0.5])},
                "two_tower": {"recall@500": np.array([1.0, 1.0, 0.0, 0.5])}}
    gain = multi_interest_gain(Task(), per_user)
    assert gain["basis"] == "distinct categories in the history"
    assert {k: g["users"] for k, g in gain["groups"].items()} == {"1": 1, "2": 1, "3+": 2}
    assert gain["groups"]["3+"]["gain"] == pytest.approx(0.5)


class _SeededPopularity:
    """Popularity plus seeded noise: a model whose figures depend on the seed, without Ray."""

    name = "seeded"
    needs_ray = False

    def fit(self, task, cfg) -> dict:
        import numpy as np

        self.scores = task.popularity + np.random.default_rng(cfg.seed).random(len(task.popularity)) * 50
        return {"seconds": 0.01 * (cfg.seed + 1)}

    def recommend(self, task, k):
        from training.metrics import top_k_excluding
        import numpy as np

        return np.maximum(top_k_excluding(np.tile(self.scores, (len(task.user_ids), 1)), k, task.seen), 0)


def test_seeds_refit_random_models_and_report_their_spread(monkeypatch, shop_dir: Path, tmp_path: Path) -> None:
    monkeypatch.setitem(harness.REGISTRY, "seeded", f"{__name__}:_SeededPopularity")
    results = run_eval(shop_dir, "synthetic", tmp_path, ["ease", "seeded"], protocols=("leave_last_out",),
                       max_users=100, sections=False, seeds=(0, 1, 2))
    models = results["protocols"]["leave_last_out"]["models"]
    seeded, ease = models["seeded"]["seeds"], models["ease"]["seeds"]
    assert seeded["seeds"] == [0, 1, 2] and len(set(seeded["values"]["ndcg@10"])) > 1
    assert seeded["values"]["train_seconds"] == [0.01, 0.02, 0.03] and seeded["std"]["ndcg@10"] > 0
    assert seeded["mean"]["ndcg@10"] == pytest.approx(sum(seeded["values"]["ndcg@10"]) / 3)
    assert ease["seeds"] == [0] and ease["std"]["ndcg@10"] == 0  # deterministic: fitted once
    assert models["seeded"]["full"]["ndcg@10"] == seeded["values"]["ndcg@10"][0]
    assert "### Spread over seeds" in (tmp_path / "report.md").read_text()


def test_the_ranking_section_runs_once_more_per_seed_on_the_first_seeds_users(monkeypatch, tmp_path: Path) -> None:
    import dataclasses

    import numpy as np

    from training.evaluation import ranking
    from training.fit.train_loop import TrainConfig

    calls = []

    def section(task, candidates, cfg, out_dir, retriever=None, users_seed=None):
        calls.append((int(candidates[0, 0]), cfg.seed, users_seed, out_dir.name, retriever))
        return {"results": {"retrieval_order_ndcg@10": 0.1,
                            "models": {"lr": {"ndcg@10": 0.05 * cfg.seed, "fused_ndcg@10": 0.2}}}}

    monkeypatch.setattr(ranking, "ranking_section", section)
    first = {"results": {"retrieval_order_ndcg@10": 0.1, "models": {"lr": {"ndcg@10": 0.1, "fused_ndcg@10": 0.2}}},
             "markdown": "table"}
    runs = [({}, {}, np.full((2, 3), s + 1), f"model-{s}") for s in (4, 5, 6)]
    task = type("Task", (), {"protocol": "temporal"})()
    harness._ranking_over_seeds(first, task, runs, (4, 5, 6), dataclasses.replace(TrainConfig(), seed=4), tmp_path,
                                lambda msg: None)
    assert calls == [(6, 5, 4, "seed-5", "model-5"), (7, 6, 4, "seed-6", "model-6")]
    spread = first["results"]["seeds"]
    assert spread["seeds"] == [4, 5, 6]
    assert spread["models"]["lr"]["ndcg@10"]["values"] == pytest.approx([0.1, 0.25, 0.3])
    assert first["markdown"].startswith("table\n\nOver seeds 4, 5, 6")
