"""Preprocessed rows on disk: Parquet shards + ``manifest.json`` + ``quarantine.jsonl``, and their fingerprint.

    shards = StageShards.of(stage.data, processor_path=checkpoint)       # data.preprocessed + fingerprint
    shards.write(rows, quarantine, overwrite=True)                       # jobs.preprocess
    files, manifest = shards.files()                                     # jobs.train: checked, in manifest order

The manifest records the fingerprint of what shaped the rows (the stage's data settings and the
processor's files, ``StageShards.fingerprint``); training refuses shards whose fingerprint differs
from its own stage's, so rows tiled or tokenised for other settings never reach a model.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray
from ray.data import SaveMode

from llava_platform.config.schema import DataConfig
from pipelines.preprocess import ROW_SCHEMA, finish

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja")
"""The files of a checkpoint's processor that decide tiles and tokens (part of the fingerprint)."""


@dataclass(frozen=True)
class StageShards:
    """A stage's preprocessed-rows folder and the fingerprint its manifest must carry."""

    folder: str
    fingerprint: str

    @classmethod
    def of(cls, data: DataConfig, processor_path: str, folder: str | Path | None = None) -> StageShards:
        """The shards of a stage's ``data`` section tiled by ``processor_path``'s processor, in ``folder``
        (default: ``data.preprocessed``)."""
        where = folder if folder is not None else data.preprocessed
        if where is None:
            raise ValueError("the stage has no data.preprocessed folder; pass one")
        return cls(str(where), cls.fingerprint_of(data, processor_path))

    @staticmethod
    def fingerprint_of(data: DataConfig, processor_path: str) -> str:
        """A short stable hash of what shapes the rows: the stage's data settings and the processor's files.

        ``preprocessed`` (where the rows are stored) and ``materialize`` (how training keeps them) are not
        part of it.
        """
        shaping = data.model_dump(exclude={"preprocessed", "materialize"})
        digest = hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode())
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
        return shard_files(self.folder, recipe_hash=self.fingerprint)

    def write(self, rows: ray.data.Dataset, quarantine: ray.actor.ActorHandle, *,
              overwrite: bool = False) -> dict[str, Any]:
        """Materialise ``rows`` here under this fingerprint (see ``write_shards``); returns the manifest."""
        return write_shards(rows, quarantine, self.folder, recipe_hash=self.fingerprint, overwrite=overwrite)


def write_shards(
    rows: ray.data.Dataset, quarantine: ray.actor.ActorHandle, out_dir: str | Path, *, recipe_hash: str,
    overwrite: bool = False, rows_per_file: tuple[int, int] = (256, 1024),
) -> dict[str, Any]:
    """Materialise the rows once as Parquet shards plus ``quarantine.jsonl`` and ``manifest.json``.

    Args:
        overwrite: replace the shards of an earlier run in ``out_dir``; without it such a folder is an error
            (appending would mix two runs' rows under one manifest).
        rows_per_file: (min, max) rows per Parquet file: few enough files to read fast, enough of them
            for every training worker to read its own.

    Returns:
        The manifest: counts, schema, recipe hash, shard files.

    Raises:
        ManifestError: ``out_dir`` already holds shards and ``overwrite`` is false.
    """
    out_dir = Path(out_dir)
    shards = out_dir / "shards"
    if not overwrite and shards.is_dir() and any(shards.iterdir()):
        raise ManifestError(f"{out_dir} already holds shards of an earlier run; pass --overwrite to replace them, "
                            "or write to another folder")
    started = time.perf_counter()
    (out_dir / "manifest.json").unlink(missing_ok=True)  # no manifest describes half-written shards
    rows.write_parquet(str(shards), min_rows_per_file=rows_per_file[0], max_rows_per_file=rows_per_file[1],
                       mode=SaveMode.OVERWRITE if overwrite else SaveMode.APPEND)
    report = finish(quarantine, out_dir / "quarantine.jsonl")
    manifest = {
        "recipe_hash": recipe_hash,
        "counts": {"read": report.read, "kept": report.kept, "quarantined": report.quarantined},
        "schema": {field.name: str(field.type) for field in ROW_SCHEMA},
        "shards": sorted(p.name for p in shards.glob("*.parquet")),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


class ManifestError(ValueError):
    """Materialised shards that do not match what the caller expects."""


def read_shards(out_dir: str | Path, *, recipe_hash: str | None = None) -> ray.data.Dataset:
    """Training rows from ``write_shards`` output, checked against its manifest (see ``shard_files``)."""
    return ray.data.read_parquet(shard_files(out_dir, recipe_hash=recipe_hash)[0])


def shard_files(out_dir: str | Path, *, recipe_hash: str | None = None) -> tuple[list[str], dict[str, Any]]:
    """The Parquet files of ``write_shards`` output, in manifest order, and the manifest.

    Raises:
        ManifestError: no manifest, a different recipe hash, missing shards, or a schema that differs
            from ``ROW_SCHEMA``.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.exists():
        raise ManifestError(f"{out_dir} has no manifest.json; write it with jobs.preprocess")
    manifest = json.loads(manifest_path.read_text())
    if recipe_hash is not None and manifest["recipe_hash"] != recipe_hash:
        raise ManifestError(
            f"{out_dir} was preprocessed for recipe hash {manifest['recipe_hash']}, not {recipe_hash}; re-run "
            "jobs.preprocess for this recipe"
        )
    files = [str(out_dir / "shards" / name) for name in manifest["shards"]]
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        raise ManifestError(f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}")
    on_disk = pq.read_schema(files[0]).names if files else ROW_SCHEMA.names
    if on_disk != ROW_SCHEMA.names:
        raise ManifestError(f"{out_dir} shards have columns {on_disk}; this version expects {ROW_SCHEMA.names}")
    return files, manifest
