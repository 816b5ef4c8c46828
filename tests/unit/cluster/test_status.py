"""`recsys status` names every actor as a person reads it."""
from __future__ import annotations

from cluster.status import PROJECT_ACTORS, describe


def test_actors_are_named_for_a_person():
    assert describe("SERVE_REPLICA::recsys-v1#Retrieval#abc") == "recsys-v1/Retrieval replica"
    assert describe("v1@20261202T062457-ab12cd-shard-3") == "index shard v1-shard-3 (build 20261202T062457-ab12cd)"
    assert describe("SERVE_CONTROLLER_ACTOR") == "Serve controller"
    assert PROJECT_ACTORS.match("v1@20261202T062457-ab12cd-shard-3") and not PROJECT_ACTORS.match("someone-else")
