"""`ray job submit` against the session's head node: the same training entry point runs as a cluster job."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_training_job_submitted_to_a_head_node_writes_a_bundle(ray_cluster, tmp_path):
    from training.data.schemas import write_shop
    from training.data.synthetic import generate_shop

    write_shop(generate_shop("tiny", seed=1), tmp_path / "shop")
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [str(ray_bin), "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", str(ROOT),
           "--", "recsys", "train", "--data", str(tmp_path / "shop"), "--bundles", str(tmp_path / "bundles"),
           "--version", "vjob", "--config", "tiny"]
    deadline = time.monotonic() + 120
    while True:  # the node's job agent comes up a little after ray.init returns; the job server says so
        done = subprocess.run(cmd, env=ray_cluster["env"], capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stderr + done.stdout or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout.lower()
    manifest = json.loads((tmp_path / "bundles" / "vjob" / "manifest.json").read_text())
    assert manifest["version"] == "vjob" and "retrieval" in manifest["metrics"]
