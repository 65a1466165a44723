"""Read LLaVA-format sources into one raw-record dataset with a fixed schema.

Sources: JSON arrays, JSON lines, and Parquet with image bytes inline, from local paths or
``s3://``. Every source becomes rows of ``RAW_SCHEMA``; parsing and validation happen later, per
record, so that one bad row is quarantined instead of failing its file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import ray

from pipelines.storage import filesystem_for

RAW_SCHEMA = pa.schema([
    ("source", pa.string()),  # file the record came from
    ("index", pa.int64()),  # position in that file (JSON: element, JSONL: line); -1 for Parquet rows
    ("record", pa.string()),  # the record as JSON text (Parquet: every column but the image bytes)
    ("image_bytes", pa.binary()),  # inline image (Parquet sources); null: read the record's `image` path
    ("error", pa.string()),  # set when the file itself could not be split into records
])


def _json_records(path: str, data: bytes) -> list[tuple[int, str, str | None]]:
    """(index, record text, error) for a JSON array file or a JSON-lines file."""
    text = data.decode("utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:  # a broken array cannot be split reliably: report the file
            return [(-1, "", f"{path} is not a valid JSON array: {err}")]
        return [(i, json.dumps(record), None) for i, record in enumerate(records)]
    return [(i, line, None) for i, line in enumerate(text.splitlines()) if line.strip()]


def _split_json_files(batch: dict[str, np.ndarray]) -> pa.Table:
    rows = {name: [] for name in RAW_SCHEMA.names}
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        for index, record, error in _json_records(str(path), bytes(data)):
            rows["source"].append(str(path))
            rows["index"].append(index)
            rows["record"].append(record)
            rows["image_bytes"].append(None)
            rows["error"].append(error)
    return pa.table(rows, schema=RAW_SCHEMA)


def _parquet_to_raw(table: pa.Table) -> pa.Table:
    columns = [c for c in table.column_names if c not in ("image_bytes", "path")]
    records = [json.dumps(row) for row in table.select(columns).to_pylist()]
    images = table["image_bytes"] if "image_bytes" in table.column_names else pa.nulls(len(table), pa.binary())
    return pa.table({
        "source": table["path"],
        "index": pa.array(np.full(len(table), -1, dtype=np.int64)),  # Parquet rows are located by id
        "record": pa.array(records, pa.string()),
        "image_bytes": images.cast(pa.binary()),
        "error": pa.nulls(len(table), pa.string()),
    }, schema=RAW_SCHEMA)


def read_records(
    files: Sequence[str], s3_endpoint_url: str | None = None, cpus_per_task: float = 1.0
) -> ray.data.Dataset:
    """All records of ``files`` (``.json``, ``.jsonl``, ``.parquet``; local or ``s3://``) as raw rows.

    ``cpus_per_task`` is what each read task reserves (below 1 to share cores on one machine).
    """
    json_files = [f for f in files if not f.endswith(".parquet")]
    parquet_files = [f for f in files if f.endswith(".parquet")]
    parts = []
    if json_files:
        filesystem, _ = filesystem_for(json_files[0], s3_endpoint_url)
        parts.append(
            ray.data.read_binary_files(
                json_files, include_paths=True, filesystem=filesystem, num_cpus=cpus_per_task
            )
            .map_batches(_split_json_files, batch_size=1, batch_format="numpy", num_cpus=cpus_per_task)
        )
    if parquet_files:
        filesystem, _ = filesystem_for(parquet_files[0], s3_endpoint_url)
        parts.append(
            ray.data.read_parquet(parquet_files, filesystem=filesystem, include_paths=True, num_cpus=cpus_per_task)
            .map_batches(_parquet_to_raw, batch_format="pyarrow", num_cpus=cpus_per_task)
        )
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])

