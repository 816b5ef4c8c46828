"""The index manifest beside a bundle: written, read back, and refused with the file's name when broken."""
from __future__ import annotations

import pytest

from indexing.embed import INDEX_MANIFEST, IndexConfig, read_index_manifest, write_index_manifest


def test_a_written_manifest_reads_back_and_a_broken_one_is_refused_naming_the_file(tmp_path):
    stats = [{"ntotal": 3, "dim": 4}, {"ntotal": 2, "dim": 4}]
    written = write_index_manifest(tmp_path, "v1", 4, stats, 0.5, IndexConfig())
    assert read_index_manifest(tmp_path)["n_items"] == written["n_items"] == 5
    path = tmp_path / INDEX_MANIFEST
    text = path.read_text()
    for broken in (text[: len(text) // 2], "[]", '{"version": "v1"}', "\udcff"):
        path.write_text(broken, errors="surrogateescape")
        with pytest.raises(ValueError, match=INDEX_MANIFEST):
            read_index_manifest(tmp_path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=INDEX_MANIFEST):
        read_index_manifest(tmp_path)
