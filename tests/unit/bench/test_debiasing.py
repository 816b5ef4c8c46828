"""The debiasing benchmark's summary: a verdict only where 3 seeds agree beyond the spread of the gains."""
from __future__ import annotations

import pytest

from bench.debiasing import main, summarise


def _run(curve: str, seed: int, with_pos: float, without: float) -> dict:
    model = {"click_auc": 0.6, "true_ndcg_click": 0.2, "seconds": 1.0}
    return {"curve": curve, "seed": seed, "retrieval_true_ndcg": 0.6,
            "models": {"transformer_ranker": model | {"true_ndcg": with_pos, "position_mae": 0.1},
                       "transformer_no_position": model | {"true_ndcg": without}}}


def test_the_position_tower_helps_or_hurts_only_when_every_seed_agrees_beyond_the_spread():
    runs = ([_run("power:0.8", s, 0.30 + d, 0.25) for s, d in enumerate((0.0, 0.01, 0.02))]
            + [_run("log:1", s, 0.25 + d, 0.25) for s, d in enumerate((0.001, 0.03, 0.002))]
            + [_run("exponential:0.6", s, 0.20 - d, 0.25) for s, d in enumerate((0.04, 0.05, 0.06))]
            + [_run("exponential:0.5", 0, 0.3, 0.2)])
    s = summarise(runs)
    assert s["power:0.8"]["helps"] and not s["power:0.8"]["hurts"]
    assert s["power:0.8"]["gain_per_seed"] == pytest.approx([0.05, 0.06, 0.07])
    assert not s["log:1"]["helps"]  # all positive, but the mean gain is within the gains' spread
    assert s["exponential:0.6"]["hurts"]
    assert not s["exponential:0.5"]["helps"]  # one seed decides nothing


def test_bad_curves_and_settings_are_errors_naming_them(capsys):
    for argv, says in ((["--curves", "cascade"], "valid curves"), (["--seeds", "a"], "--seeds"),
                       (["--epochs", "0"], "--epochs")):
        with pytest.raises(SystemExit):
            main(argv)
        assert says in capsys.readouterr().err
