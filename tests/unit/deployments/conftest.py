"""One local-testing-mode stack per test session: Serve cannot run a second FastAPI ingress in local testing mode in
the same process (the first run leaves the app unpicklable), so every local-mode test module shares this one."""
from __future__ import annotations

import pytest

from local_stack import build


@pytest.fixture(scope="session")
def local_app(tmp_path_factory):
    """The stack of `local_stack.build`, its stages following a change log of their own (`local_app["log"]`); a
    test that changes the catalog puts it back."""
    log = tmp_path_factory.mktemp("changes") / "item-changes.jsonl"
    out = build(tmp_path_factory, changes=str(log))
    out["log"] = log
    return out
