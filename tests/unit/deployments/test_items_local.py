"""Live catalog changes through the real deployments in Serve's local testing mode: `POST /admin/items` writes the
change log, and the version's Retrieval and Ranking replicas apply it without a rebuild, within a stated bound:
a new item is found by a request aimed at it, a deleted item never comes back (also under concurrent requests),
an item set out of stock leaves in-stock requests."""
from __future__ import annotations

import json
import time

import pyarrow.compute as pc
import pytest
from fastapi import HTTPException
from pydantic import ValidationError

from deployments.schemas import ItemsRequest, RecommendRequest
from indexing.changes import FileChangeLog
from local_stack import TOKEN

APPLIED_WITHIN_S = 10.0  # replicas poll every 0.5 s; the bound is loose for a loaded 2-core machine


@pytest.fixture
def app(local_app):
    recommend(local_app, user_id=local_app["user"], k=5)  # the replicas follow the log from their first request
    return local_app


def recommend(app, **body):
    return app["handle"].recommend.remote(RecommendRequest(**body), None, None, None).result()


def post(app, changes, token=TOKEN):
    return app["handle"].items.remote(ItemsRequest(changes=changes), f"Bearer {token}").result()


def health(app) -> dict:
    return json.loads(app["handle"].healthz.remote().result().body)["stages"]["v1"]


def wait_applied(app, offset: int) -> dict:
    end = time.monotonic() + APPLIED_WITHIN_S
    while True:
        h = health(app)
        if h["retrieval"]["changes"]["offset"] >= offset and h["ranking"]["changes"]["offset"] >= offset:
            return h
        assert time.monotonic() < end, f"offset {offset} not applied within {APPLIED_WITHIN_S} s: {h}"
        time.sleep(0.1)


def test_a_new_item_is_served_within_the_bound_to_a_request_aimed_at_it(app):
    out = post(app, [{"op": "upsert", "item_id": "brand-new-1", "brand": "brand-nova", "category": "cat-nova",
                      "price": 19.5}])
    assert out.accepted == 1 and out.logs == 1 and out.offset == FileChangeLog(app["log"]).end()
    h = wait_applied(app, out.offset)
    assert h["retrieval"]["items"] == len(app["shop"].catalog) + 1 and h["retrieval"]["changes"]["lag"] == 0
    answer = recommend(app, user_id=app["user"], k=10, filters={"categories": ["cat-nova"]})
    assert [(i.item_id, i.brand, i.category) for i in answer.items] == [("brand-new-1", "brand-nova", "cat-nova")]
    cold = recommend(app, user_id="nobody-yet", k=10, filters={"brands": ["brand-nova"]})
    assert [i.item_id for i in cold.items] == ["brand-new-1"]
    wait_applied(app, post(app, [{"op": "delete", "item_id": "brand-new-1"}]).offset)  # the catalog as it was


def test_a_deleted_item_never_comes_back_also_under_concurrent_requests(app):
    shown = recommend(app, user_id=app["user"], k=10).items
    gone = shown[0].item_id
    row = app["shop"].catalog.filter(pc.equal(app["shop"].catalog.column("item_id"), gone)).to_pylist()[0]
    out = post(app, [{"op": "delete", "item_id": gone}])
    wait_applied(app, out.offset)
    users = app["shop"].users.column("user_id").to_pylist()[:30] + [app["user"]] * 10
    answers = []
    for pair in zip(users[::2], users[1::2]):  # two at once: what the ingress always admits
        pending = [app["handle"].recommend.remote(RecommendRequest(user_id=u, k=20), None, None, None) for u in pair]
        answers += [p.result() for p in pending]
    assert len(answers) == 40 and all(gone not in {i.item_id for i in a.items} for a in answers)
    filtered = recommend(app, user_id=app["user"], k=10, filters={"categories": [shown[0].category]})
    assert gone not in {i.item_id for i in filtered.items} and filtered.items
    back = post(app, [{"op": "upsert", "item_id": gone, "brand": row["brand"], "category": row["category"],
                       "price": row["price"],
                       "created_at": row["created_at"].timestamp()}])  # the catalog as it was
    wait_applied(app, back.offset)
    assert gone in {i.item_id for i in recommend(app, user_id=app["user"], k=10).items}


def test_an_item_set_out_of_stock_leaves_in_stock_requests_as_soon_as_it_is_applied(app):
    item = recommend(app, user_id=app["user"], k=10, filters={"in_stock": True}).items[0]
    out = post(app, [{"op": "update", "item_id": item.item_id, "in_stock": False}])
    wait_applied(app, out.offset)
    for _ in range(5):
        answer = recommend(app, user_id=app["user"], k=10, filters={"in_stock": True})
        assert item.item_id not in {i.item_id for i in answer.items} and len(answer.items) == 10
    wait_applied(app, post(app, [{"op": "update", "item_id": item.item_id, "in_stock": True}]).offset)


def test_changes_need_the_admin_token_and_a_bad_change_names_its_field(app):
    with pytest.raises(HTTPException) as e:
        post(app, [{"op": "delete", "item_id": "i1"}], token="wrong")
    assert e.value.status_code in (401, 403)
    for changes, field in (([{"op": "upsert", "item_id": "x", "brand": "b"}], "changes.0"),
                           ([{"op": "update", "item_id": "x", "price": -1}], "price"),
                           ([{"op": "drop", "item_id": "x"}], "op"),
                           ([{"op": "delete", "item_id": "x", "price": 1.0}], "changes.0"),
                           ([], "changes")):
        with pytest.raises(ValidationError) as e:
            ItemsRequest(changes=changes)
        assert field in str(e.value).replace("\n", " ").replace(" ", ".") or field in str(e.value)
