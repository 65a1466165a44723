"""Preprocessed rows on disk: Parquet shards + ``manifest.json`` + ``quarantine.jsonl``, and their fingerprint.

    shards = StageShards.of(stage.data, processor_path=checkpoint)       # data.preprocessed + fingerprint
    shards.write(rows, quarantine, overwrite=True)                       # jobs.preprocess
    files, manifest = shards.files()                                     # jobs.train: checked, in manifest order
    layout = shards.layout()                                             # row groups: what the row ids index
    RowReader(layout.files).read([17, 3, 250])                           # a training worker: rows by id

The manifest records the fingerprint of what shaped the rows (the stage's data settings and the
processor's files, ``StageShards.fingerprint``); training refuses shards whose fingerprint differs
from its own stage's, so rows tiled or tokenised for other settings never reach a model.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import SaveMode
from ray.data.block import BlockAccessor

from llava_platform.config.memory_plan import MANIFEST
from llava_platform.config.schema import DataConfig
from llava_platform.data.mixture import SourcePlan
from llava_platform.train.memory import SampleLengths
from pipelines.preprocess import ROW_SCHEMA, finish
from pipelines.reference import SCORED_SCHEMA
from pipelines.sources import describe_mixture

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja")
"""The files of a checkpoint's processor that decide tiles and tokens (part of the fingerprint)."""
ROWS_PER_ROW_GROUP = 16
"""Rows per Parquet row group in written shards: a training worker reads rows by id a row group at a time
(``RowReader``), so a small group reads few rows it does not need."""


@dataclass(frozen=True)
class StageShards:
    """A stage's preprocessed-rows folder and the fingerprint its manifest must carry."""

    folder: str
    fingerprint: str
    mixture: tuple[str, ...] = ()
    """Each source and its strategy (``describe_mixture``): a manifest of other ones names what changed."""
    schema: pa.Schema = ROW_SCHEMA
    """The rows' columns: ``ROW_SCHEMA``, or stage 3's preference rows with reference log-probabilities."""

    @classmethod
    def of(cls, data: DataConfig, processor_path: str, folder: str | Path | None = None, *,
           seed: int, reference: str | None = None) -> StageShards:
        """The shards of a stage's ``data`` section tiled by ``processor_path``'s processor, in ``folder``
        (default: ``data.preprocessed``); ``seed``: the recipe's (a mixture's ``random:N`` draws with it);
        ``reference``: preference rows scored by a reference pass (``ReferencePass.fingerprint``)."""
        where = folder if folder is not None else data.preprocessed
        if where is None:
            raise ValueError("the stage has no data.preprocessed folder; pass one")
        mixture = describe_mixture(data.train_files, seed=seed, s3_endpoint_url=data.s3_endpoint_url)
        return cls(str(where), cls.fingerprint_of(data, processor_path, mixture, reference), mixture,
                   ROW_SCHEMA if reference is None else SCORED_SCHEMA)

    @staticmethod
    def fingerprint_of(data: DataConfig, processor_path: str, mixture: tuple[str, ...] = (),
                       reference: str | None = None) -> str:
        """A short stable hash of what shapes the rows: the stage's data settings, its sources and their sampling
        strategies (``mixture``: ``describe_mixture``), the processor's files, and for preference rows what their
        reference log-probabilities were computed with (``reference``).

        ``preprocessed`` (where the rows are stored), ``materialize`` (how training keeps them),
        ``shuffle_row_groups`` and ``packing`` (their order, ``DataPosition.order_version``) are not part of it.
        """
        shaping = data.model_dump(exclude={"preprocessed", "materialize", "shuffle_row_groups", "packing"})
        shaped_by = [shaping, list(mixture)] + ([reference] if reference is not None else [])
        digest = hashlib.sha256(json.dumps(shaped_by, sort_keys=True, default=str).encode())
        processor = Path(processor_path)
        for name in PROCESSOR_FILES:
            if (processor / name).is_file():
                digest.update(name.encode() + (processor / name).read_bytes())
        if not processor.is_dir():  # a hub id or remote URI: its name is all we can see from here
            digest.update(processor_path.encode())
        return digest.hexdigest()[:16]

    def files(self) -> tuple[list[str], dict[str, Any]]:
        """The Parquet files, in manifest order, and the manifest (see ``shard_files``).

        Raises:
            ManifestError: no manifest, another fingerprint, missing shards, or another schema.
        """
        return shard_files(self.folder, recipe_hash=self.fingerprint, mixture=self.mixture, schema=self.schema)

    def layout(self) -> ShardLayout:
        """The checked files' row groups (see ``shard_layout``).

        Raises:
            ManifestError: as ``files``.
        """
        files, manifest = self.files()
        return shard_layout(files, manifest)

    def write(self, rows: ray.data.Dataset, quarantine: ray.actor.ActorHandle, *, overwrite: bool = False,
              plans: Sequence[SourcePlan] = ()) -> dict[str, Any]:
        """Materialise ``rows`` here under this fingerprint (see ``write_shards``); returns the manifest."""
        return write_shards(rows, quarantine, self.folder, recipe_hash=self.fingerprint, overwrite=overwrite,
                            mixture=self.mixture, plans=plans, schema=self.schema)


def write_shards(
    rows: ray.data.Dataset, quarantine: ray.actor.ActorHandle, out_dir: str | Path, *, recipe_hash: str,
    overwrite: bool = False, rows_per_file: tuple[int, int] = (256, 1024), mixture: Sequence[str] = (),
    plans: Sequence[SourcePlan] = (), schema: pa.Schema = ROW_SCHEMA,
) -> dict[str, Any]:
    """Materialise the rows once as Parquet shards plus ``quarantine.jsonl`` and ``manifest.json``.

    Args:
        overwrite: replace the shards of an earlier run in ``out_dir``; without it such a folder is an error
            (appending would mix two runs' rows under one manifest).
        rows_per_file: (about, at most) rows per Parquet file: few enough files to read fast, enough
            of them for every preprocessing task to write its own. Row groups hold ``ROWS_PER_ROW_GROUP``.
        mixture: the sources and strategies the fingerprint covers (``describe_mixture``), recorded so that
            a later run with other ones is told which changed.
        plans: the sources read (``plan_sources``): the manifest counts each one (``source_counts``).
        schema: the rows' columns (``ROW_SCHEMA``; preference rows: ``reference.SCORED_SCHEMA``).

    Returns:
        The manifest: counts, the rows' lengths (tokens and tiles per row: largest and 99th percentile, what
        the memory planner plans with), schema, recipe hash, shard files.

    Raises:
        ManifestError: ``out_dir`` already holds shards and ``overwrite`` is false.
    """
    out_dir = Path(out_dir)
    shards = out_dir / "shards"
    if not overwrite and shards.is_dir() and any(shards.iterdir()):
        raise ManifestError(f"{out_dir} already holds shards of an earlier run; pass --overwrite to replace them, "
                            "or write to another folder")
    started = time.perf_counter()
    (out_dir / MANIFEST).unlink(missing_ok=True)  # no manifest describes half-written shards
    # Ray clamps row groups to at least min_rows_per_file: blocks of the file size, and no minimum, instead
    rows.repartition(target_num_rows_per_block=rows_per_file[0]).write_parquet(
        str(shards), max_rows_per_file=rows_per_file[1], row_group_size=ROWS_PER_ROW_GROUP,
        mode=SaveMode.OVERWRITE if overwrite else SaveMode.APPEND)
    report = finish(quarantine, out_dir / "quarantine.jsonl")
    files = sorted(shards.glob("*.parquet"))
    pairs = "rejected_length" in schema.names  # a pair's rows are as long as its longer answer's
    counts = pq.read_table(files, columns=["source", "length", "num_tiles", *(["rejected_length"] if pairs else [])]
                           ) if files else None
    tokens = counts["length"].to_numpy() if counts else []
    if pairs and counts:
        tokens = np.maximum(tokens, counts["rejected_length"].to_numpy())
    manifest = {
        "recipe_hash": recipe_hash,
        "counts": {"read": report.read, "kept": report.kept, "quarantined": report.quarantined},
        "lengths": SampleLengths.of(tokens, counts["num_tiles"].to_numpy() if counts else []).as_dict(),
        "sources": source_counts(plans, counts, ray.get(quarantine.rows.remote())),
        "mixture": list(mixture),
        "schema": {field.name: str(field.type) for field in schema},
        "shards": [p.name for p in files],
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


class ManifestError(ValueError):
    """Materialised shards that do not match what the caller expects."""


def read_shards(out_dir: str | Path, *, recipe_hash: str | None = None) -> ray.data.Dataset:
    """Training rows from ``write_shards`` output, checked against its manifest (see ``shard_files``)."""
    return ray.data.read_parquet(shard_files(out_dir, recipe_hash=recipe_hash)[0])


def source_counts(plans: Sequence[SourcePlan], rows: pa.Table | None, quarantined: Sequence[dict]) -> list[dict]:
    """Per source: its records, those its strategy took, kept, quarantined by reason, tokens and tiles kept."""
    kept: dict[str, list[int]] = {}
    if rows is not None:
        grouped = rows.group_by("source").aggregate([("length", "count"), ("length", "sum"), ("num_tiles", "sum")])
        kept = {row["source"]: [row["length_count"], row["length_sum"], row["num_tiles_sum"]]
                for row in grouped.to_pylist()}
    reasons: dict[str, dict[str, int]] = {}
    for entry in quarantined:
        by_reason = reasons.setdefault(entry["source"], {})
        by_reason[entry["reason"]] = by_reason.get(entry["reason"], 0) + 1
    table = []
    for plan in plans:
        path = plan.source.path
        count, tokens, tiles = kept.get(path, [0, 0, 0])
        table.append({"source": path, "strategy": plan.source.rule, "origin": plan.source.origin, "read": plan.rows,
                      "taken": plan.taken, "kept": count, "quarantined": dict(sorted(reasons.get(path, {}).items())),
                      "tokens": tokens, "tiles": tiles})
    return table


def source_metrics(sources: Sequence[dict]) -> dict[str, float]:
    """``source_counts`` as MLflow metrics: ``data/source/<file name>/{read,taken,kept,quarantined,tokens,tiles}``."""
    names = [re.sub(r"[^A-Za-z0-9_.-]", "_", Path(s["source"]).name) for s in sources]
    if len(set(names)) < len(names):  # the same file name in two folders: number them
        names = [f"{i}_{name}" for i, name in enumerate(names)]
    metrics = {}
    for name, counts in zip(names, sources, strict=True):
        for key in ("read", "taken", "kept", "tokens", "tiles"):
            metrics[f"data/source/{name}/{key}"] = counts[key]
        metrics[f"data/source/{name}/quarantined"] = sum(counts["quarantined"].values())
    return metrics


def source_table(sources: Sequence[dict]) -> str:
    """The end summary's per-source table (``source_counts``)."""
    lines = [f"{'source':<40} {'strategy':<14} {'read':>10} {'taken':>10} {'kept':>10} {'quarantined':>11} "
             f"{'tokens':>12} {'tiles':>8}"]
    for s in sources:
        name = s["source"] if len(s["source"]) <= 40 else "..." + s["source"][-37:]
        lines.append(f"{name:<40} {s['strategy']:<14} {s['read']:>10,} {s['taken']:>10,} {s['kept']:>10,} "
                     f"{sum(s['quarantined'].values()):>11,} {s['tokens']:>12,} {s['tiles']:>8,}")
    return "\n".join(lines)


def shard_files(out_dir: str | Path, *, recipe_hash: str | None = None, mixture: Sequence[str] = (),
                schema: pa.Schema = ROW_SCHEMA) -> tuple[list[str], dict[str, Any]]:
    """The Parquet files of ``write_shards`` output, in manifest order (absolute paths: training workers run
    in folders of their own), and the manifest.

    Raises:
        ManifestError: no manifest, a different recipe hash, missing shards, or a schema that differs
            from ``schema``.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    if not manifest_path.exists():
        raise ManifestError(f"{out_dir} has no manifest.json; write it with jobs.preprocess")
    manifest = json.loads(manifest_path.read_text())
    if recipe_hash is not None and manifest["recipe_hash"] != recipe_hash:
        changed = mixture_changes(manifest.get("mixture", []), mixture)
        raise ManifestError(
            f"{out_dir} was preprocessed for recipe hash {manifest['recipe_hash']}, not {recipe_hash}"
            + (f" ({changed})" if changed else "") + "; re-run jobs.preprocess for this recipe"
        )
    files = [str(out_dir.resolve() / "shards" / name) for name in manifest["shards"]]
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        raise ManifestError(f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}")
    on_disk = pq.read_schema(files[0]).names if files else schema.names
    if on_disk != schema.names:
        raise ManifestError(f"{out_dir} shards have columns {on_disk}; this version expects {schema.names}")
    return files, manifest


def mixture_changes(before: Sequence[str], now: Sequence[str]) -> str:
    """What differs between two ``describe_mixture`` lists, in words ('' when nothing does)."""
    old, new = dict(_entry(line) for line in before), dict(_entry(line) for line in now)
    parts = [f"{path}: {old[path]} -> {new[path]}" for path in new if path in old and old[path] != new[path]]
    parts += [f"{path} added" for path in new if path not in old] + [f"{path} removed" for path in old
                                                                      if path not in new]
    return "sampling changed: " + "; ".join(parts) if parts else ""


def _entry(line: str) -> tuple[str, str]:
    path, _, rest = line.partition(" ")
    return path, rest


@dataclass(frozen=True)
class ShardLayout:
    """Where each row id lives: ids ``0 .. rows - 1`` run through the files in manifest order, row group by
    row group (``llava_platform.data.position`` draws the epoch orders over them)."""

    files: tuple[str, ...]
    block_sizes: tuple[int, ...]
    """Rows per row group, over all files in order."""
    fingerprint: str
    """The manifest's recipe hash, the file names and their row groups: a resume checks that its row ids
    mean the same rows (``DataPosition.fingerprint``)."""

    @property
    def rows(self) -> int:
        return sum(self.block_sizes)


def shard_layout(files: Sequence[str], manifest: dict[str, Any]) -> ShardLayout:
    """The row groups of ``files`` (Parquet footers only), fingerprinted with the ``manifest``'s recipe hash."""
    digest = hashlib.sha256(manifest["recipe_hash"].encode())
    sizes: list[int] = []
    for path in files:
        metadata = pq.ParquetFile(path).metadata
        groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        digest.update(json.dumps([Path(path).name, groups]).encode())
        sizes += groups
    return ShardLayout(files=tuple(files), block_sizes=tuple(sizes), fingerprint=digest.hexdigest()[:16])


class RowReader:
    """Rows of Parquet shards by id (``ShardLayout``), a row group at a time, the last ``cache_blocks`` row
    groups kept: a block-shuffled epoch order (``RowOrder``) reads each row group about once per epoch."""

    def __init__(self, files: Sequence[str], *, cache_blocks: int = 64):
        self._files = [pq.ParquetFile(path) for path in files]
        self._blocks = [(f, g) for f, file in enumerate(self._files) for g in range(file.metadata.num_row_groups)]
        sizes = [self._files[f].metadata.row_group(g).num_rows for f, g in self._blocks]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._cache_blocks = cache_blocks

    @property
    def rows(self) -> int:
        return int(self._starts[-1])

    def column(self, name: str) -> np.ndarray:
        """One column of every row, in id order (e.g. ``length`` and ``modality`` for grouping)."""
        return np.concatenate([file.read(columns=[name]).column(name).to_numpy(zero_copy_only=False)
                               for file in self._files])

    def read(self, ids: Sequence[int]) -> dict[str, np.ndarray]:
        """The rows ``ids``, in that order, as Ray Data's ``numpy`` batches hold them, plus ``row_id``.

        Raises:
            IndexError: an id outside ``0 .. rows - 1``.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.rows):
            raise IndexError(f"row ids {ids.min()}..{ids.max()} outside the shards' 0..{self.rows - 1}")
        blocks = np.searchsorted(self._starts, ids, side="right") - 1
        parts, placed = [], []
        for block in np.unique(blocks):
            members = np.flatnonzero(blocks == block)
            parts.append(self._block(int(block)).take(pa.array(ids[members] - self._starts[block])))
            placed.append(members)
        table = pa.concat_tables(parts).take(pa.array(np.argsort(np.concatenate(placed), kind="stable")))
        batch = BlockAccessor.for_block(table).to_batch_format("numpy")
        batch["row_id"] = ids
        return batch

    def _block(self, block: int) -> pa.Table:
        if block in self._cache:
            self._cache.move_to_end(block)
            return self._cache[block]
        file, group = self._blocks[block]
        table = self._files[file].read_row_group(group)
        self._cache[block] = table
        if len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        return table
