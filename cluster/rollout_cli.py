"""`recsys rollout ...`: the admin rollout endpoints from a terminal (any machine that reaches the HTTP endpoint).

    recsys rollout start v3 --bundle /shared/bundles/v3      deploy beside the live versions, gate, wait
    recsys rollout status
    recsys rollout gate                                      the gate again (after a change of thresholds)
    recsys rollout shift v3 --to 10,50,100 --every 60s      (or --now); waits, printing each step
    recsys rollout rollback
    recsys rollout retire v2
    recsys rollout shadow v3 --share 0.1
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from deployments.ingress.admin import ADMIN_TOKEN_ENV

console = Console()
BUSY_PHASES = ("indexing", "deploying", "validating", "shifting")


def parse_duration(text: str) -> float:
    """'60s', '2m', '0.5s', '90' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--every: a duration like 60s, 2m or 0.5s, got {text!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def parse_steps(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--to: percentages separated by commas, e.g. 10,50,100, got {text!r}")


class Admin:
    def __init__(self, url: str, token: str | None) -> None:
        if not token:
            raise ValueError(f"no admin token: pass --token or set {ADMIN_TOKEN_ENV}")
        self.client = httpx.Client(base_url=url, timeout=60.0, headers={"Authorization": f"Bearer {token}"})

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            r = self.client.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise ValueError(f"{self.client.base_url}{path}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            raise ValueError(f"{method} {path}: HTTP {r.status_code}: {r.text}")
        return r.json()

    def wait(self, every_s: float = 1.0, on_change: Any = None) -> dict[str, Any]:
        """Polls the status until no operation runs; returns the last one."""
        last = None
        while True:
            status = self.call("GET", "/admin/rollout")
            rollout = status.get("rollout") or {}
            key = (rollout.get("phase"), len(rollout.get("steps", [])), len(rollout.get("events", [])))
            if on_change and key != last:
                on_change(status)
                last = key
            if not status.get("busy") and rollout.get("phase") not in BUSY_PHASES:
                return status
            time.sleep(every_s)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)


def print_status(status: dict[str, Any]) -> None:
    routing = status.get("routing") or {}
    console.print("[bold]routing[/] users per version: "
                  + ", ".join(f"{v} {s:.1%}" for v, s in (routing.get("shares") or {}).items())
                  + (f"; shadow {routing['shadow']}" if routing.get("shadow") else ""))
    rollout = status.get("rollout")
    if not rollout:
        console.print("no rollout")
        return
    console.print(f"[bold]rollout[/] {rollout['green']} from {rollout['bundle']}: [bold]{rollout['phase']}[/]"
                  + (f" ({rollout['error']})" if rollout.get("error") else ""))
    gate = rollout.get("gate")
    if gate:
        table = Table(title=f"gate against {gate.get('blue')}: {'passed' if gate['passed'] else 'FAILED'} "
                            f"({gate['diff']['requests']} replayed requests: {gate.get('sources')})")
        for col in ("check", "value", "threshold", "passed", "detail"):
            table.add_column(col)
        for c in gate["checks"]:
            table.add_row(c["check"], _fmt(c["value"]), _fmt(c["threshold"]), "yes" if c["passed"] else "NO",
                          c.get("detail", ""))
        console.print(table)
        for flag in gate.get("flags", []):
            console.print(f"[bold yellow]flag[/] {flag}")
    if rollout.get("steps"):
        table = Table(title="shift steps (live figures of the candidate)")
        for col in ("step", "status", "requests", "errors", "mixed", "p50 ms", "p99 ms", "reason"):
            table.add_column(col)
        for s in rollout["steps"]:
            f = (s.get("figures") or {}).get(rollout["green"], {})
            table.add_row(f"{s['percent']:g}%", s["status"], _fmt(f.get("requests")), _fmt(f.get("errors")),
                          _fmt(f.get("mixed")), _fmt(f.get("p50_ms")), _fmt(f.get("p99_ms")), s.get("reason", ""))
        console.print(table)
    for line in rollout.get("events", [])[-5:]:
        console.print(f"  {line}")


def run(args: argparse.Namespace) -> None:
    admin = Admin(args.url, args.token or os.environ.get(ADMIN_TOKEN_ENV))
    show = (lambda s: print(json.dumps(s, indent=2))) if args.json else print_status
    op = args.op
    if op == "status":
        show(admin.call("GET", "/admin/rollout"))
        return
    if op == "start":
        admin.call("POST", "/admin/rollout/start", {"version": args.version, "bundle": args.bundle})
    elif op == "shift":
        steps, every = ([100.0], 0.0) if args.now else (args.to, args.every)
        admin.call("POST", "/admin/rollout/shift", {"version": args.version, "to": steps, "every_s": every})
    elif op == "gate":
        admin.call("POST", "/admin/rollout/gate")
    elif op == "rollback":
        admin.call("POST", "/admin/rollout/rollback")
    elif op == "retire":
        out = admin.call("POST", "/admin/rollout/retire", {"version": args.version})
        console.print(f"retired {out['retired']}: application deleted, {out['index_shards_stopped']} index shard "
                      "actors stopped")
    elif op == "shadow":
        admin.call("POST", "/admin/rollout/shadow", {"version": args.version, "share": args.share})
    waits = op in ("start", "shift", "gate") and not args.no_wait
    status = admin.wait() if waits else admin.call("GET", "/admin/rollout")
    show(status)
    phase = (status.get("rollout") or {}).get("phase")
    if waits and phase in ("failed", "rolled_back"):
        sys.exit(1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default="http://127.0.0.1:8000", help="the Serve HTTP endpoint")
    common.add_argument("--token", default=None, help=f"admin token (default: ${ADMIN_TOKEN_ENV})")
    common.add_argument("--json", action="store_true", help="print the status as JSON")
    ops = p.add_subparsers(dest="op", required=True)
    ops.add_parser("status", parents=[common], help="routing, the rollout's phase, gate report and steps")
    s = ops.add_parser("start", parents=[common], help="deploy a version beside the live ones (own index, no traffic) and gate it")
    s.add_argument("version")
    s.add_argument("--bundle", required=True, help="the version's bundle folder, on storage every node reads")
    s.add_argument("--no-wait", action="store_true")
    g = ops.add_parser("gate", parents=[common], help="run the gate again on the deployed candidate")
    g.add_argument("--no-wait", action="store_true")
    sh = ops.add_parser("shift", parents=[common], help="move traffic to a version in steps, halting and rolling back on a guard")
    sh.add_argument("version")
    sh.add_argument("--to", type=parse_steps, default=[10.0, 50.0, 100.0], help="percent steps, e.g. 10,50,100")
    sh.add_argument("--every", type=parse_duration, default=60.0, help="time per step, e.g. 60s")
    sh.add_argument("--now", action="store_true", help="all traffic at once")
    sh.add_argument("--no-wait", action="store_true")
    ops.add_parser("rollback", parents=[common], help="all traffic back to the versions before the rollout, for the next request")
    r = ops.add_parser("retire", parents=[common], help="remove a version without traffic: its applications and index shards")
    r.add_argument("version")
    sd = ops.add_parser("shadow", parents=[common], help="also answer a share of live requests with a version (answers not returned)")
    sd.add_argument("version")
    sd.add_argument("--share", type=float, required=True, help="0..1; 0 stops it")
