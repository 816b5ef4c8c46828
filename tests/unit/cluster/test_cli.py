"""The command line reports bad input as an error naming it, with no traceback."""
from __future__ import annotations

import subprocess
import sys


def test_cli_reports_a_bad_size_as_an_error_naming_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--size", "huge", "--out",
                           str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "huge" in done.stderr and "Traceback" not in done.stderr


def test_rollout_command_parses_durations_steps_and_refuses_bad_ones(capsys):
    import argparse

    import pytest

    from cluster.cli import build_parser
    from cluster.rollout_cli import parse_duration, parse_steps

    assert parse_duration("60s") == 60 and parse_duration("2m") == 120 and parse_duration("0.5") == 0.5
    assert parse_steps("10,50,100") == [10, 50, 100]
    for bad in ("5x", "-1s"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)
    args = build_parser().parse_args(["rollout", "shift", "v3", "--to", "10,100", "--every", "30s", "--token", "t"])
    assert (args.op, args.version, args.to, args.every, args.token) == ("shift", "v3", [10, 100], 30, "t")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["rollout", "shift", "v3", "--every", "soon"])
    assert "--every" in capsys.readouterr().err


def test_items_apply_writes_a_parquet_file_of_changes_to_the_log_and_names_a_bad_row(tmp_path, capsys):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from cluster.cli import main
    from indexing.changes import FileChangeLog

    good, bad, log = tmp_path / "changes.parquet", tmp_path / "bad.parquet", tmp_path / "item-changes.jsonl"
    pq.write_table(pa.table({"op": ["upsert", "update", "delete"], "item_id": ["n1", "i2", "i3"],
                             "brand": ["b", None, None], "category": ["c", None, None], "price": [1.0, None, None],
                             "in_stock": [None, False, None]}), good)
    main(["items", "apply", str(good), "--log", str(log)])
    assert json.loads(capsys.readouterr().out)["offset"] == 3
    assert [(c.op, c.item_id) for _, c in FileChangeLog(log).read(0)] == [("upsert", "n1"), ("update", "i2"),
                                                                         ("delete", "i3")]
    pq.write_table(pa.table({"op": ["delete", "update"], "item_id": ["a", "b"]}), bad)
    with pytest.raises(SystemExit):
        main(["items", "apply", str(bad), "--log", str(log)])
    assert "bad.parquet: row 1: " in capsys.readouterr().err and FileChangeLog(log).end() == 3  # nothing written
    (tmp_path / "not.parquet").write_text("op,item_id\n")
    with pytest.raises(SystemExit):
        main(["items", "apply", str(tmp_path / "not.parquet"), "--log", str(log)])
    assert "not a readable Parquet file" in capsys.readouterr().err


def test_items_applied_from_the_cli_are_new_on_the_serving_clock_of_the_shops_bundles(tmp_path):
    import json
    import time

    from cluster.cli import _stamped_on_serving_clock
    from training.data.changes import ItemChange
    from training.request.clock import parse_iso

    changes = [ItemChange("upsert", "n1", "b", "c", 1.0), ItemChange("upsert", "n2", "b", "c", 1.0, created_at=5.0),
               ItemChange("delete", "i3")]
    assert _stamped_on_serving_clock(changes, tmp_path, "auto") == changes  # no bundle yet: left to the log
    (tmp_path / "v1").mkdir()
    trained = time.time() - 3600
    (tmp_path / "v1" / "manifest.json").write_text(json.dumps({
        "version": "v1", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(trained)),
        "metrics": {"data_end_time": "2026-10-01T00:00:00Z"}}))
    out = _stamped_on_serving_clock(changes, tmp_path, "auto")
    want = parse_iso("2026-10-01T00:00:00Z") + 3600  # an hour after the data's end: the bundle is an hour old
    assert abs(out[0].created_at - want) < 5 and out[1].created_at == 5.0 and out[2] == changes[2]
