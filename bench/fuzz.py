"""Bad-input benchmark (issue 12): Schemathesis reads the live service's OpenAPI spec and sends every operation, admin
ones included, generated requests that fit the schema (positive) and that break it (negative), each one once
without credentials and once with the admin token. Counted: requests, answers by status, 5xx answers (with the
first few inputs that caused them), 4xx answers whose body does not say which field was wrong, and timeouts.

Usage: python -m bench.fuzz --url http://127.0.0.1:8000 --cases 2000 [--admin-token T] [--seed 0] [--out FILE.json]
(prints a table on stderr and the JSON on stdout); fuzz(base_url, max_examples, admin_token, seed) -> the same dict.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from schemathesis import APIOperation, Case, GenerationMode

TIMEOUT_S = 10.0  # per request: the service answers in milliseconds, so 10 s means it hung
EXAMPLES_KEPT = 5  # 5xx inputs kept in the result: enough to reproduce, small enough to read
SNIPPET_CHARS = 300
INPUT_CHARS = 2000  # a generated body past this is kept as its cut repr: the examples are for reading
# A plain-string detail is enough where the status itself says what was wrong (no or a wrong credential, no such
# thing, wrong method, too large); a 400 or 422 must point at the field.
STRING_DETAIL_STATUSES = frozenset({401, 403, 404, 405, 413})
LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})  # where FastAPI says a bad value was


def names_field(status: int, content: bytes) -> bool:
    """Whether a 4xx answer names what was wrong: FastAPI's `{"detail": [{"loc": ["body", "k"], ...}]}` where every
    item locates its field (`["body"]` alone names the whole body: missing, or not a JSON object), or a non-empty
    string detail for the statuses that need no field."""
    try:
        detail = json.loads(content)["detail"]
    except (ValueError, TypeError, KeyError):  # not JSON (UnicodeDecodeError is a ValueError), or no detail
        return False
    if isinstance(detail, str):
        return status in STRING_DETAIL_STATUSES and bool(detail.strip())
    return (isinstance(detail, list) and bool(detail)
            and all(isinstance(d, dict) and isinstance(d.get("loc"), list) and d["loc"]
                    and d["loc"][0] in LOCATIONS for d in detail))


def _jsonable(value: Any) -> Any:
    """The value if JSON can hold it (generated bodies can be raw bytes) in INPUT_CHARS, else its repr, cut short."""
    try:
        if len(json.dumps(value)) <= INPUT_CHARS:
            return value
    except (TypeError, ValueError):
        pass
    return repr(value)[:INPUT_CHARS]


@dataclass
class FuzzTally:
    """What the fuzzer saw, one `record` per answer."""
    requests: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_mode: Counter = field(default_factory=Counter)
    per_operation: Counter = field(default_factory=Counter)
    server_errors: int = 0
    server_errors_per_operation: Counter = field(default_factory=Counter)
    server_error_examples: list[dict] = field(default_factory=list)
    unnamed_4xx: int = 0
    unnamed_4xx_examples: list[dict] = field(default_factory=list)
    timeouts: int = 0
    transport_errors: int = 0  # no answer: connection refused or dropped, a response cut short
    transport_error_examples: list[dict] = field(default_factory=list)
    duplicates_skipped: int = 0
    not_generated: list[str] = field(default_factory=list)  # "GET /healthz negative": nothing to break

    def example(self, case: Case, status: int | None, answer: str, with_token: bool) -> dict:
        from schemathesis.core import NotSet

        return {"method": case.method.upper(), "path": case.path, "status": status, "with_token": with_token,
                "response": answer[:SNIPPET_CHARS], "path_parameters": _jsonable(case.path_parameters),
                "query": _jsonable(case.query), "body": _jsonable(None if isinstance(case.body, NotSet) else case.body)}

    def failed(self, case: Case, error: Exception, with_token: bool) -> None:
        self.transport_errors += 1
        if len(self.transport_error_examples) < EXAMPLES_KEPT:
            self.transport_error_examples.append(self.example(case, None, f"{type(error).__name__}: {error}",
                                                              with_token))

    def sent(self, label: str, mode: str) -> None:
        self.requests += 1
        self.by_mode[mode] += 1
        self.per_operation[label] += 1

    def record(self, label: str, case: Case, response: Any, with_token: bool) -> None:
        status = response.status_code
        self.by_status[status] += 1
        if status >= 500:
            self.server_errors += 1
            self.server_errors_per_operation[label] += 1
            if len(self.server_error_examples) < EXAMPLES_KEPT:
                self.server_error_examples.append(self.example(case, status, response.text_lossy(), with_token))
        elif status >= 400 and not names_field(status, response.content):
            self.unnamed_4xx += 1
            if len(self.unnamed_4xx_examples) < EXAMPLES_KEPT:
                self.unnamed_4xx_examples.append(self.example(case, status, response.text_lossy(), with_token))

    def as_dict(self) -> dict:
        return {"requests": self.requests, "by_status": dict(sorted(self.by_status.items())),
                "by_mode": dict(self.by_mode), "server_errors": self.server_errors,
                "server_errors_per_operation": dict(self.server_errors_per_operation),
                "server_error_examples": self.server_error_examples, "unnamed_4xx": self.unnamed_4xx,
                "unnamed_4xx_examples": self.unnamed_4xx_examples, "timeouts": self.timeouts,
                "transport_errors": self.transport_errors, "transport_error_examples": self.transport_error_examples,
                "duplicates_skipped": self.duplicates_skipped,
                "not_generated": self.not_generated, "per_operation": dict(self.per_operation)}


def _case_key(case: Case) -> str:
    return repr((case.path_parameters, case.query, sorted((case.headers or {}).items()), case.cookies, case.body,
                 case.media_type))


def _send_each(operation: APIOperation, mode: GenerationMode, n: int, seed: int, send: Callable[[Case], None]) -> bool:
    """Draws up to n cases of one operation in one generation mode and hands each to `send`; False when the schema
    leaves nothing to generate (a negative case of an operation without parameters)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as fixed_seed
    from hypothesis.errors import Unsatisfiable

    # Generation only: no example database (runs are reproducible from the seed alone), no shrinking (nothing
    # fails inside the test), no deadline (a request is what takes time here).
    @fixed_seed(seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate], verbosity=Verbosity.quiet,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def send_generated(case: Case) -> None:
        send(case)

    try:
        send_generated()
    except Unsatisfiable:
        return False
    return True


def fuzz(base_url: str, max_examples: int, admin_token: str | None, seed: int = 0) -> dict:
    """Fuzzes every operation in `{base_url}/openapi.json` with up to `max_examples` cases each (half positive,
    half negative), each sent without credentials and, given `admin_token`, again with `Authorization: Bearer`.
    Returns the counts of `FuzzTally.as_dict` plus "seconds" and the settings; the same seed draws the same cases."""
    import requests
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.config import SchemathesisConfig

    t0 = time.perf_counter()
    base_url = base_url.rstrip("/")
    # An explicit default config: a schemathesis.toml lying around must not change what is generated.
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=SchemathesisConfig(), timeout=TIMEOUT_S)
    tally = FuzzTally()
    credentials = [(False, None)]
    if admin_token:
        credentials.append((True, {"Authorization": f"Bearer {admin_token}"}))
    quotas = {GenerationMode.POSITIVE: max_examples - max_examples // 2, GenerationMode.NEGATIVE: max_examples // 2}
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()  # FastAPI's generated spec is valid; a broken one should stop the run loudly
            label = f"{operation.method.upper()} {operation.path}"
            seen: set[str] = set()
            tally.per_operation[label] = 0  # listed even if nothing could be sent

            def send(case: Case) -> None:
                key = _case_key(case)
                if key in seen:
                    tally.duplicates_skipped += 1
                    return
                seen.add(key)
                mode = str(case.meta.generation.mode) if case.meta else "unknown"
                for with_token, headers in credentials:
                    tally.sent(label, mode)
                    try:
                        response = case.call(base_url=base_url, session=session, headers=headers, timeout=TIMEOUT_S)
                    except requests.Timeout:
                        tally.timeouts += 1
                        continue
                    except requests.RequestException as e:  # refused, dropped, or an answer cut short
                        tally.failed(case, e, with_token)
                        continue
                    finally:
                        session.cookies.clear()  # one request's cookies never leak into the next
                    tally.record(label, case, response, with_token)

            for mode, n in quotas.items():
                if n and not _send_each(operation, mode, n, seed, send):
                    tally.not_generated.append(f"{label} {mode}")
    return {**tally.as_dict(), "seconds": round(time.perf_counter() - t0, 3), "max_examples": max_examples,
            "seed": seed, "with_admin_token": bool(admin_token), "schemathesis": schemathesis.__version__}


def print_table(result: dict) -> None:
    print(f"{'operation':40s} {'requests':>8s}", file=sys.stderr)
    for label, n in result["per_operation"].items():
        print(f"{label:40s} {n:8d}", file=sys.stderr)
    print(f"requests {result['requests']}, 5xx {result['server_errors']}, 4xx not naming a field "
          f"{result['unnamed_4xx']}, timeouts {result['timeouts']}, no answer {result['transport_errors']}, "
          f"{result['seconds']:.1f} s; by status {result['by_status']}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the service's base URL; its spec is at {url}/openapi.json")
    p.add_argument("--cases", type=int, default=200, help="generated cases per operation (half positive)")
    p.add_argument("--admin-token", default=None, help="also send each case with 'Authorization: Bearer <token>'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    result = fuzz(args.url, args.cases, args.admin_token, args.seed)
    print_table(result)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
