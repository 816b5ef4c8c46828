"""The command line reports bad input as an error naming it, with no traceback."""
from __future__ import annotations

import subprocess
import sys


def test_cli_reports_a_bad_size_as_an_error_naming_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--size", "huge", "--out",
                           str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "huge" in done.stderr and "Traceback" not in done.stderr
