"""`recsys status`: the cluster's nodes and where every serving actor runs (Serve replicas by application and
deployment, index shards, the online store, the registries, the rollout controller)."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from rich.console import Console
from rich.table import Table

PROJECT_ACTORS = re.compile(r"^(recsys-.*|.+-shard-\d+|SERVE_REPLICA::.*|SERVE_CONTROLLER_ACTOR|SERVE_PROXY_ACTOR.*)$")


def describe(name: str) -> str:
    """A named actor as a person reads it: "recsys-v1/Retrieval replica", "index shard v1-shard-0 (build ...)", ..."""
    m = re.match(r"SERVE_REPLICA::([^#]+)#([^#]+)#", name)
    if m:
        return f"{m.group(1)}/{m.group(2)} replica"
    if name.startswith("SERVE_PROXY_ACTOR"):
        return "Serve HTTP proxy"
    if name == "SERVE_CONTROLLER_ACTOR":
        return "Serve controller"
    m = re.fullmatch(r"(.+)@(.+)-shard-(\d+)", name)
    if m:
        return f"index shard {m.group(1)}-shard-{m.group(3)} (build {m.group(2)})"
    return name


def placements() -> dict[str, Any]:
    """{"nodes": [{node_id, address, cpus, head, actors: [...]}, ...]} for the live cluster (ray.init first)."""
    import ray
    from ray.util.state import list_actors

    nodes = {n["NodeID"]: {"node_id": n["NodeID"][:12], "address": n["NodeManagerAddress"],
                           "cpus": n["Resources"].get("CPU", 0.0),
                           "head": "node:__internal_head__" in n["Resources"], "actors": []}
             for n in ray.nodes() if n["Alive"]}
    for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False):
        name = a.name or ""
        if PROJECT_ACTORS.match(name) and a.node_id in nodes:
            nodes[a.node_id]["actors"].append(describe(name))
    for n in nodes.values():
        n["actors"].sort()
    return {"nodes": sorted(nodes.values(), key=lambda n: (not n["head"], n["node_id"]))}


def print_placements(report: dict[str, Any]) -> None:
    console = Console()
    table = Table(title="nodes and what runs on them")
    for col in ("node", "address", "CPUs", "runs"):
        table.add_column(col)
    for n in report["nodes"]:
        counts: dict[str, int] = defaultdict(int)
        for a in n["actors"]:
            counts[a] += 1
        runs = "\n".join(f"{k} x{v}" if v > 1 else k for k, v in counts.items()) or "-"
        table.add_row(n["node_id"] + (" (head)" if n["head"] else ""), n["address"], f"{n['cpus']:g}", runs)
    console.print(table)
