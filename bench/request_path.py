"""Request-path benchmark: `POST /recommend` over HTTP on loopback, the project's deployment against a no-op copy of
the request path the project had before the one-orchestrator change (`../shared/tools/noop_topology.py`: the same
hops and payload sizes, every stage answering at once), one after the other in one run, with the same closed-loop
load generator (`../shared/tools/load_users.py`, demo-shop users).

Usage: python -m bench.request_path [--requests 400] [--layouts in_process,sharded] [--out FILE.json] (after
`make demo`); with --layouts, the project is deployed and measured once per index layout, one after the other.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1].parent / "shared" / "tools"


def _load_users() -> ModuleType:
    path = TOOLS / "load_users.py"
    if not path.is_file():
        raise SystemExit(f"bench request_path: {path} not found (the shared tools sit beside the project)")
    spec = importlib.util.spec_from_file_location("load_users", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def noop_topology(port: int, requests: int, optimized: bool) -> dict:
    """Runs the no-op copy of the old topology in its own process (its own embedded Ray) and returns its figures;
    with Serve's defaults as the tool runs them, or in the throughput-optimized mode the project serves with."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if optimized else "0"}
    out = subprocess.run([sys.executable, str(TOOLS / "noop_topology.py"), str(port), str(requests)],
                         capture_output=True, text=True, timeout=900, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"noop_topology.py failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def project(port: int, requests: int, config: str, layout: str | None = None) -> dict:
    """Deploys the demo's bundles as `make serve` does (embedded Ray) and measures the same load against it; with
    `layout`, every retrieval replica searches that way (`in_process`: the index in its own memory, one hop;
    `sharded`: a fan-out to the shard actors)."""
    import dataclasses

    from ray import serve

    import ray
    from cluster.config import load_config
    from cluster.demo import deploy, ensure_bundles, ensure_shop, Phases
    from cluster.runtime import init_ray

    cfg = load_config(config)
    cfg = dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, port=port,
                                                               index_layout=layout or cfg.serving.index_layout))
    shop_dir = ensure_shop(cfg)
    init_ray()
    try:
        url = deploy(cfg, shop_dir, ensure_bundles(cfg, shop_dir, Phases()))
        return _load_users().measure(f"{url}/recommend", requests)
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    p.add_argument("--config", default="demo", help="the deployment's config (its bundles must exist: make demo)")
    p.add_argument("--noop-port", type=int, default=8011)
    p.add_argument("--port", type=int, default=8012)
    p.add_argument("--layouts", default="", help="comma-separated index layouts (in_process, sharded) to measure "
                   "the project with, one deployment each; default: the config's serving.index_layout")
    p.add_argument("--out", type=Path, default=Path("bench/results/request_path.json"))
    args = p.parse_args(argv)
    layouts = [x for x in args.layouts.split(",") if x]
    bad = sorted(set(layouts) - {"in_process", "sharded"})
    if bad:
        raise SystemExit(f"bench request_path --layouts: unknown {bad}; known: ['in_process', 'sharded']")
    t0 = time.perf_counter()
    noop = noop_topology(args.noop_port, args.requests, optimized=False)
    noop_opt = noop_topology(args.noop_port, args.requests, optimized=True)
    by_layout = {layout: project(args.port, args.requests, args.config, layout) for layout in layouts}
    ours = next(iter(by_layout.values())) if by_layout else project(args.port, args.requests, args.config)
    result = {"noop_old_topology": noop, "noop_old_topology_throughput_optimized": noop_opt, "project": ours,
              "project_by_layout": by_layout,
              "serve_throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1",
              "requests": args.requests, "seconds": time.perf_counter() - t0,
              "ratio_p50": {c: ours[c]["p50_ms"] / noop[c]["p50_ms"] for c in ours if c in noop},
              "ratio_p99": {c: ours[c]["p99_ms"] / noop[c]["p99_ms"] for c in ours if c in noop},
              "ratio_p50_same_serve_mode": {c: ours[c]["p50_ms"] / noop_opt[c]["p50_ms"] for c in ours if c in noop_opt}}
    print(f"{'POST /recommend':40s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>7s} {'errors':>6s}")
    rows = [("no-op old topology", noop), ("no-op old topology, optimized Serve", noop_opt)]
    rows += [(f"project, {layout}", f) for layout, f in by_layout.items()] if by_layout else [("project", ours)]
    for name, figures in rows:
        for c, f in figures.items():
            print(f"{name + ' ' + c:40s} {f['p50_ms']:8.1f} {f['p99_ms']:8.1f} {f['qps']:7.1f} {f['errors']:6d}")
    print("project / no-op (Serve defaults), p50: " + ", ".join(f"{c} {r:.2f}x" for c, r in result["ratio_p50"].items())
          + " (goal at concurrency 1: at most 0.70x)")
    print("project / no-op in the same Serve mode, p50: "
          + ", ".join(f"{c} {r:.2f}x" for c, r in result["ratio_p50_same_serve_mode"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
