"""Rows by id from Parquet shards (``pipelines.shards``): the layout the ids index, and the reader."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.shards import RowReader, shard_layout


@pytest.fixture
def shards(tmp_path) -> list[str]:
    """Two files of 40 and 9 rows in row groups of 16: ids 0-48 are ``r0`` .. ``r48``."""
    files = []
    for name, rows in (("a.parquet", range(0, 40)), ("b.parquet", range(40, 49))):
        table = pa.table({"id": [f"r{i}" for i in rows], "length": pa.array(list(rows), pa.int32()),
                          "input_ids": [[i, i + 1] for i in rows]})
        pq.write_table(table, tmp_path / name, row_group_size=16)
        files.append(str(tmp_path / name))
    return files


def test_the_layout_lists_row_groups_in_order_and_fingerprints_them(shards, tmp_path):
    layout = shard_layout(shards, {"recipe_hash": "h"})
    assert layout.block_sizes == (16, 16, 8, 9) and layout.rows == 49
    assert shard_layout(shards, {"recipe_hash": "other"}).fingerprint != layout.fingerprint
    pq.write_table(pq.read_table(shards[0]), shards[0], row_group_size=20)  # the same rows, other row groups
    assert shard_layout(shards, {"recipe_hash": "h"}).fingerprint != layout.fingerprint


def test_rows_come_back_in_the_order_asked_from_any_row_group(shards):
    reader = RowReader(shards, cache_blocks=2)
    ids = [48, 0, 17, 17, 33, 40]
    rows = reader.read(ids)
    assert list(rows["id"]) == [f"r{i}" for i in ids] and list(rows["row_id"]) == ids
    assert [list(x) for x in rows["input_ids"]] == [[i, i + 1] for i in ids]
    assert list(reader.read(range(49))["id"]) == [f"r{i}" for i in range(49)]
    assert np.array_equal(reader.column("length"), np.arange(49))
    with pytest.raises(IndexError, match="outside the shards' 0..48"):
        reader.read([49])


def test_shard_files_are_absolute_for_a_relative_folder(tmp_path, monkeypatch):
    """Recipes name shard folders relative to the working directory; training workers run elsewhere."""
    import json

    from pipelines.preprocess import ROW_SCHEMA
    from pipelines.shards import shard_files

    (tmp_path / "rel" / "shards").mkdir(parents=True)
    pq.write_table(ROW_SCHEMA.empty_table(), tmp_path / "rel" / "shards" / "x.parquet")
    (tmp_path / "rel" / "manifest.json").write_text(json.dumps({"recipe_hash": "h", "shards": ["x.parquet"]}))
    monkeypatch.chdir(tmp_path)
    files, _ = shard_files("rel", recipe_hash="h")
    assert files == [str(tmp_path / "rel" / "shards" / "x.parquet")]
