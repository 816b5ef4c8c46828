"""The catalog change log, both backends: offsets 1, 2, ... in one order for any number of writers, reads from an
offset, durability of what was acknowledged, and a torn last line cut off."""
from __future__ import annotations

import multiprocessing
import uuid

import pytest

from indexing.changes import FileChangeLog, RedisChangeLog, open_change_log
from training.data.changes import ItemChange


def change(i: int, writer: int = 0) -> ItemChange:
    return ItemChange("update", f"w{writer}-i{i}", price=float(i))


@pytest.fixture(params=["file", "redis"])
def log(request, tmp_path):
    if request.param == "file":
        return FileChangeLog(tmp_path / "changes.jsonl")
    return RedisChangeLog(request.getfixturevalue("redis_url"), stream=f"test:changes:{uuid.uuid4().hex}")


def test_appends_get_consecutive_offsets_and_read_resumes_after_any_offset(log):
    assert log.end() == 0 and log.read(0) == []
    assert log.append([change(1), change(2)]) == 2
    assert log.append([change(3)]) == 3
    assert log.end() == 3
    assert [(o, c.item_id) for o, c in log.read(0)] == [(1, "w0-i1"), (2, "w0-i2"), (3, "w0-i3")]
    assert [o for o, _ in log.read(1)] == [2, 3]
    assert [o for o, _ in log.read(0, limit=2)] == [1, 2]
    assert log.read(3) == []
    assert log.append([]) == 3


def test_an_upsert_is_stamped_with_its_creation_time_once_when_written(log):
    log.append([ItemChange("upsert", "n1", "b", "c", 1.0), ItemChange("upsert", "n2", "b", "c", 1.0, created_at=5.0)])
    (_, first), (_, second) = log.read(0)
    assert first.created_at and first.created_at > 1e9 and second.created_at == 5.0
    assert log.read(0)[0][1].created_at == first.created_at  # every reader sees the same age


def _write(path: str, writer: int, n: int) -> None:
    log = FileChangeLog(path)
    for i in range(n):
        log.append([change(i, writer)])


def test_writers_in_several_processes_share_one_order_with_no_gap(tmp_path):
    path = str(tmp_path / "changes.jsonl")
    procs = [multiprocessing.get_context("fork").Process(target=_write, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = FileChangeLog(path).read(0)
    assert [o for o, _ in entries] == list(range(1, 161))
    for w in range(4):  # each writer's changes in the order it wrote them
        assert [c.price for _, c in entries if c.item_id.startswith(f"w{w}-")] == [float(i) for i in range(40)]


def test_a_line_torn_by_a_crash_is_never_read_and_is_cut_off_by_the_next_append(tmp_path):
    path = tmp_path / "changes.jsonl"
    log = FileChangeLog(path)
    log.append([change(1)])
    with open(path, "ab") as f:
        f.write(b'{"offset":2,"change":{"op":"upd')  # the writer died mid-line: never acknowledged
    assert [o for o, _ in log.read(0)] == [1] and log.end() == 1
    assert log.append([change(2)]) == 2
    assert [(o, c.price) for o, c in FileChangeLog(path).read(0)] == [(1, 1.0), (2, 2.0)]


def test_a_corrupt_line_is_named_and_bad_input_refused(tmp_path):
    path = tmp_path / "changes.jsonl"
    path.write_text('{"offset":1,"change":{"op":"update","item_id":"a","price":1.0}}\n{"offset":2,"change":{"op":"x"}}\n')
    with pytest.raises(ValueError, match=r"changes.jsonl: the line after offset 1 is corrupt"):
        FileChangeLog(path).read(0)
    with pytest.raises(TypeError, match="ItemChange"):
        FileChangeLog(tmp_path / "other.jsonl").append([{"op": "delete", "item_id": "a"}])
    with pytest.raises(ValueError, match="at most 10000 changes"):
        FileChangeLog(tmp_path / "other.jsonl").append([change(i) for i in range(10_001)])


def test_the_spec_picks_the_backend(tmp_path):
    assert isinstance(open_change_log(str(tmp_path / "c.jsonl")), FileChangeLog)
    assert isinstance(open_change_log("redis://127.0.0.1:1/0"), RedisChangeLog)
