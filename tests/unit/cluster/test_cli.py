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
