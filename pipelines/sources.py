"""Read LLaVA-format sources into one raw-record dataset with a fixed schema.

Sources: JSON arrays, JSON lines, and Parquet with image bytes inline, from local paths or
``s3://``. Every source becomes rows of ``RAW_SCHEMA``; parsing and validation happen later, per
record, so that one bad row is quarantined instead of failing its file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from llava_platform.data.mixture import MixtureError, SourcePlan, expand_sources, is_mixture
from llava_platform.storage import filesystem_for, read_bytes

RAW_SCHEMA = pa.schema([
    ("source", pa.string()),  # file the record came from
    ("index", pa.int64()),  # position in that file (JSON: element, JSONL: line, Parquet: row); -1: the whole file
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


def _split_json_files(batch: dict[str, np.ndarray], names: dict[str, str]) -> pa.Table:
    rows = {name: [] for name in RAW_SCHEMA.names}
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        for index, record, error in _json_records(str(path), bytes(data)):
            rows["source"].append(names.get(str(path), str(path)))
            rows["index"].append(index)
            rows["record"].append(record)
            rows["image_bytes"].append(None)
            rows["error"].append(error)
    return pa.table(rows, schema=RAW_SCHEMA)


def _read_parquet_files(batch: dict[str, np.ndarray], s3_endpoint_url: str | None) -> Iterator[pa.Table]:
    """Raw rows of whole Parquet files, one row group at a time, with each row's position in its file."""
    for path in batch["path"]:
        filesystem, inner = filesystem_for(str(path), s3_endpoint_url)
        position = 0
        for table in pq.ParquetFile(filesystem.open_input_file(inner)).iter_batches(batch_size=256):
            yield _parquet_to_raw(pa.Table.from_batches([table]), str(path), position)
            position += table.num_rows


def _parquet_to_raw(table: pa.Table, path: str, start: int) -> pa.Table:
    # The record JSON holds every column but the image bytes and other binary columns.
    columns = [f.name for f in table.schema if f.name != "image_bytes" and not pa.types.is_binary(f.type)]
    records = [json.dumps(row) for row in table.select(columns).to_pylist()]
    images = table["image_bytes"] if "image_bytes" in table.column_names else pa.nulls(len(table), pa.binary())
    return pa.table({
        "source": pa.array([path] * len(table), pa.string()),
        "index": pa.array(np.arange(start, start + len(table), dtype=np.int64)),
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
            .map_batches(_split_json_files, batch_size=1, batch_format="numpy", num_cpus=cpus_per_task,
                         fn_kwargs={"names": {_listed_as(f): f for f in json_files}})
        )
    if parquet_files:  # file by file, so that every row keeps its position (its identity for the quarantine)
        parts.append(
            ray.data.from_items([{"path": f} for f in parquet_files])
            .map_batches(_read_parquet_files, batch_size=1, batch_format="numpy", num_cpus=cpus_per_task,
                         fn_kwargs={"s3_endpoint_url": s3_endpoint_url})
        )
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])



def _listed_as(path: str) -> str:
    """How ``read_binary_files`` names ``path`` in its rows (an ``s3://`` URI without its scheme)."""
    return path.removeprefix("s3://")


def plan_sources(files: Sequence[str], *, seed: int, s3_endpoint_url: str | None = None) -> list[SourcePlan]:
    """A stage's sources (plain files, and the entries of LLaVA-NeXT data YAMLs among them) with their row counts
    and the rows each strategy takes (``llava_platform.data.mixture``).

    Files are counted on the cluster, one task each (Parquet from its footer, JSON lines by line, a JSON array
    parsed there), once per version of the file (``RowCounts``): the driver holds the plans only (a
    ``random:N`` source: N positions).

    Raises:
        MixtureError: a bad YAML or entry, a source named twice, N larger than its source.
    """
    sources = expand_sources(files, lambda path: _read_text(path, s3_endpoint_url))
    cache = RowCounts.load()
    keys = [cache.key(source.path, s3_endpoint_url) for source in sources]
    counting = {i: _count_rows.remote(source.path, s3_endpoint_url)
                for i, (source, key) in enumerate(zip(sources, keys, strict=True)) if key not in cache.counts}
    plans = []
    for position, (source, key) in enumerate(zip(sources, keys, strict=True)):
        if position in counting:
            try:
                rows = ray.get(counting[position])
            except FileNotFoundError:
                raise MixtureError(f"{source.where()}: the source does not exist") from None
            cache.forget(source.path)  # an earlier version of the file
            cache.counts[key] = rows
        plans.append(SourcePlan.of(source, rows=cache.counts[key], seed=seed, position=position))
    if counting:
        cache.save()
    return plans


class RowCounts:
    """Each source file's record count, kept between runs (``LLAVA_CACHE_DIR``, default ``~/.cache/llava_platform``)
    under its path, size and modification time: a JSON array is parsed once to count it, not at every plan."""

    FILE = "source_row_counts.json"

    def __init__(self, path: Path, counts: dict[str, int]):
        self.path, self.counts = path, counts

    @classmethod
    def load(cls) -> RowCounts:
        path = Path(os.environ.get("LLAVA_CACHE_DIR", Path.home() / ".cache" / "llava_platform")) / cls.FILE
        try:
            return cls(path, json.loads(path.read_text()))
        except (OSError, ValueError):
            return cls(path, {})

    @staticmethod
    def key(path: str, s3_endpoint_url: str | None) -> str:
        """``path|size|mtime``; a file that does not exist gets a key no count is stored under."""
        filesystem, inner = filesystem_for(path, s3_endpoint_url)
        info = filesystem.get_file_info(inner)
        mtime = info.mtime_ns if info.mtime_ns is not None else ""
        return f"{path}|{info.size}|{mtime}" if info.size is not None else f"{path}|missing"

    def forget(self, path: str) -> None:
        for key in [key for key in self.counts if key.startswith(f"{path}|")]:
            del self.counts[key]

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(self.counts))
            partial.replace(self.path)
        except OSError:
            pass  # a read-only home: counted again next time


@ray.remote(num_cpus=0.25)
def _count_rows(path: str, s3_endpoint_url: str | None) -> int:
    """Raw rows ``read_records([path])`` yields (a broken JSON array: its one error row)."""
    filesystem, inner = filesystem_for(path, s3_endpoint_url)
    if path.endswith(".parquet"):
        return pq.ParquetFile(filesystem.open_input_file(inner)).metadata.num_rows
    return len(_json_records(path, read_bytes(path, s3_endpoint_url)))


def describe_mixture(files: Sequence[str], *, seed: int, s3_endpoint_url: str | None = None) -> tuple[str, ...]:
    """What of a stage's sources shapes its rows, one line each: ``path rule [image_root]`` (the seed too
    where a ``random:N`` draws with it). Plain files only: ``()`` (their names are already in the data
    settings). Reads the data YAMLs, not the sources."""
    if not any(is_mixture(path) for path in files):
        return ()
    sources = expand_sources(files, lambda path: _read_text(path, s3_endpoint_url))
    lines = tuple(" ".join(filter(None, (s.path, s.rule, s.image_root))) for s in sources)
    return lines + ((f"seed {seed}",) if any(s.strategy == "random" for s in sources) else ())


def source_image_roots(files: Sequence[str], s3_endpoint_url: str | None = None) -> dict[str, str]:
    """Source file -> its own ``image_root`` (data YAML entries that set one; ``Preprocessor``'s ``image_roots``)."""
    if not any(is_mixture(path) for path in files):
        return {}
    sources = expand_sources(files, lambda path: _read_text(path, s3_endpoint_url))
    return {source.path: source.image_root for source in sources if source.image_root}


def _read_text(path: str, s3_endpoint_url: str | None) -> str:
    try:
        return read_bytes(path, s3_endpoint_url).decode()
    except FileNotFoundError:
        raise MixtureError(f"{path}: the data YAML does not exist") from None


def read_planned(plans: Sequence[SourcePlan], s3_endpoint_url: str | None = None,
                 cpus_per_task: float = 1.0) -> ray.data.Dataset:
    """The raw rows of ``plans``' sources that their strategies take (a file's own error row always)."""
    records = read_records([plan.source.path for plan in plans], s3_endpoint_url, cpus_per_task)
    if all(plan.source.strategy == "all" for plan in plans):
        return records
    selections = {plan.source.path: plan.selection for plan in plans}
    return records.map_batches(_taken, batch_format="pyarrow", fn_kwargs={"selections": selections},
                               num_cpus=cpus_per_task)


def _taken(batch: pa.Table, selections) -> pa.Table:
    sources, indices = batch["source"].to_numpy(zero_copy_only=False), batch["index"].to_numpy()
    keep = indices < 0  # a file that could not be split: its error row reaches the quarantine
    for source in set(sources):
        here = sources == source
        keep[here] |= selections[source].contains(indices[here])
    return batch.filter(pa.array(keep))


def count_records(files: Sequence[str], s3_endpoint_url: str | None = None) -> int:
    """How many raw rows ``read_records(files)`` yields: Parquet files from their footers (no image bytes read),
    JSON files split on the cluster, one task per file."""
    return sum(ray.get([_count_rows.remote(path, s3_endpoint_url) for path in files]))
