"""The Ray Data preprocessing pipeline: raw records -> training rows (Arrow), bad records -> quarantine.

    records = read_records(files)                       # sources.py: JSON / JSONL / Parquet, disk or s3://
    rows = preprocess(records, processor_path=..., ...) # decode -> tile (uint8) -> tokenise + labels
    # either stream `rows` into Ray Train (TorchTrainer(datasets={"train": rows})) ...
    # ... or materialise it once:  write_shards(rows, out_dir, ...) -> Parquet shards + manifest.json

Decoding and tiling run in an actor pool on any CPU of the cluster; each actor loads the
checkpoint's processor once, so tiles and tokens are exactly what that checkpoint expects. Bad
records never fail the run: each is sent to a ``QuarantineLog`` actor with its reason and counted
once. The output schema is ``ROW_SCHEMA`` (documented in ``pipelines/README.md``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, SaveMode
from ray.data.extensions import ArrowVariableShapedTensorArray, ArrowVariableShapedTensorType

from llava_platform.data.errors import SampleError
from llava_platform.data.records import (
    MalformedRecordError,
    MissingImageError,
    RowBuilder,
    parse_record,
    record_id_of,
)
from llava_platform.model.compose import load_processor
from pipelines.quarantine import PreprocessReport, QuarantineLog, write_quarantine
from pipelines.storage import ImageReader

TILES_TYPE = ArrowVariableShapedTensorType(pa.uint8(), 4)
ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("modality", pa.string()),  # "image" or "text"
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),  # -100 where the loss ignores the token
    ("length", pa.int32()),
    ("tiles", TILES_TYPE),  # uint8 (num_tiles, 3, T, T); num_tiles = 0 for text-only rows
    ("image_size", pa.list_(pa.int32(), 2)),  # original [height, width]; [0, 0] for text-only rows
    ("truncated", pa.bool_()),
])


class Preprocessor:
    """The per-actor callable of ``map_batches``: raw record rows -> ``ROW_SCHEMA`` rows."""

    def __init__(
        self,
        *,
        processor_path: str,
        template: str,
        image_mode: str,
        max_length: int,
        truncation: str,
        max_image_pixels: int,
        image_root: str | None,
        s3_endpoint_url: str | None,
        quarantine: ray.actor.ActorHandle,
    ):
        self.builder = RowBuilder.from_processor(
            load_processor(processor_path), template=template, image_mode=image_mode,
            max_length=max_length, truncation=truncation, max_image_pixels=max_image_pixels,
        )
        self.images = ImageReader(image_root, s3_endpoint_url)
        self.quarantine = quarantine

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, keys, bad = [], [], []
        for raw in batch.to_pylist():
            key = record_key(raw)
            try:
                if raw["error"]:
                    raise MalformedRecordError(raw["error"])
                record = parse_record(raw["record"])
                rows.append(self.builder.build(record, record_image_bytes(record, raw["image_bytes"], self.images)))
            except SampleError as err:
                bad.append(quarantine_entry(raw, err))
            keys.append(key)
        # Acknowledged, not fire-and-forget: once a batch's rows are out, its quarantine entries are in.
        ray.get(self.quarantine.add.remote(keys, bad))
        return rows_to_table(rows)


def record_key(raw: dict[str, Any]) -> str:
    """Identity of a raw record across retries and epochs: its file and position in the file."""
    return f"{raw['source']}:{raw['index']}"


def record_image_bytes(record: dict[str, Any], inline: bytes | None, images: ImageReader) -> bytes | None:
    """The record's encoded image: inline bytes (Parquet sources), its file, or ``None`` for text-only records.

    Raises:
        MissingImageError: the record names a file that does not exist.
    """
    if inline is not None:
        return inline
    if not record.get("image"):
        return None
    try:
        return images.read(record["image"])
    except FileNotFoundError as err:
        raise MissingImageError(f"image {record['image']!r} not found: {err}") from err


def quarantine_entry(raw: dict[str, Any], error: SampleError) -> dict[str, Any]:
    """What the quarantine keeps of a bad raw record: where it is, its id, the reason and the message."""
    return {"key": record_key(raw), "id": record_id_of(raw["record"]), "source": raw["source"], "index": raw["index"],
            "reason": error.reason, "message": str(error)[:500]}


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Training rows as an Arrow table of ``ROW_SCHEMA`` (also when ``rows`` is empty)."""
    if rows:
        tiles = ArrowVariableShapedTensorArray.from_numpy([row["tiles"] for row in rows])
    else:
        tiles = TILES_TYPE.wrap_array(pa.array([], TILES_TYPE.storage_type))
    columns = {name: [row[name] for row in rows] for name in ROW_SCHEMA.names if name != "tiles"}
    arrays = [tiles if name == "tiles" else pa.array(columns[name], ROW_SCHEMA.field(name).type)
              for name in ROW_SCHEMA.names]
    return pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)


def preprocess(
    records: ray.data.Dataset,
    *,
    processor_path: str,
    template: str,
    image_mode: str,
    max_length: int,
    truncation: str = "drop",
    max_image_pixels: int = 50_000_000,
    image_root: str | None = None,
    s3_endpoint_url: str | None = None,
    quarantine: ray.actor.ActorHandle | None = None,
    num_actors: int | tuple[int, int] = (1, 4),
    cpus_per_actor: float = 1.0,
    batch_size: int = 16,
) -> tuple[ray.data.Dataset, ray.actor.ActorHandle]:
    """Lazily map raw records to training rows; returns (rows, the quarantine log actor).

    Args:
        records: raw rows from ``read_records``.
        processor_path: the checkpoint (or ``jobs.compose`` output) whose processor tiles and tokenises.
        template, image_mode, max_length, truncation, max_image_pixels: the stage's ``data`` settings.
        image_root: folder or ``s3://`` prefix of the records' relative image paths.
        s3_endpoint_url: S3-compatible endpoint (default: ``AWS_ENDPOINT_URL``).
        quarantine: an existing ``QuarantineLog`` to add to (one is created otherwise).
        num_actors: actor pool size, fixed or (min, max).
        cpus_per_actor: logical CPUs each actor reserves; below 1 shares cores with training workers
            on a single machine (Ray Train leaves Ray Data only the CPUs its workers do not reserve).
        batch_size: records per task; keeps blocks far below Arrow's 2 GiB offset limit
            (an anyres row at 336 px is 1.7 MB).
    """
    quarantine = quarantine or QuarantineLog.remote()
    low, high = num_actors if isinstance(num_actors, tuple) else (num_actors, num_actors)
    rows = records.map_batches(
        Preprocessor,
        fn_constructor_kwargs=dict(
            processor_path=processor_path, template=template, image_mode=image_mode, max_length=max_length,
            truncation=truncation, max_image_pixels=max_image_pixels, image_root=image_root,
            s3_endpoint_url=s3_endpoint_url, quarantine=quarantine,
        ),
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ActorPoolStrategy(min_size=low, max_size=high),
        num_cpus=cpus_per_actor,
    )
    return rows, quarantine


def finish(quarantine: ray.actor.ActorHandle, quarantine_path: str | Path | None = None) -> PreprocessReport:
    """After the rows were consumed: write the quarantine file, print and return the counts."""
    report = ray.get(quarantine.report.remote())
    if quarantine_path is not None:
        write_quarantine(ray.get(quarantine.rows.remote()), quarantine_path)
    print(f"preprocessing summary\n{report.table()}", flush=True)
    return report


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


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja")


def stage_fingerprint(data_settings: dict[str, Any], processor_path: str) -> str:
    """A short stable hash of what shapes the rows: the stage's data settings and the processor's files.

    ``preprocessed`` (where the rows are stored) and ``materialize`` (how training keeps them) are not part of it.
    """
    shaping = {key: value for key, value in data_settings.items() if key not in ("preprocessed", "materialize")}
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode())
    folder = Path(processor_path)
    for name in PROCESSOR_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    if not folder.is_dir():  # a hub id or remote URI: its name is all we can see from here
        digest.update(processor_path.encode())
    return digest.hexdigest()[:16]

