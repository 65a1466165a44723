"""The Ray Data preprocessing pipeline: raw records -> training rows (Arrow), bad records -> quarantine.

    records = read_records(files)                             # sources.py: JSON / JSONL / Parquet, disk or s3://
    rows, quarantine = preprocess(records, processor_path=checkpoint, spec=stage.data.row_spec())
    # either stream `rows` into Ray Train (jobs.train gives each rank its own pipeline) ...
    # ... or materialise it once: StageShards.of(...).write(rows, quarantine)  (shards.py: Parquet + manifest)

Decoding and tiling run in an actor pool on any CPU of the cluster; each actor loads the
checkpoint's processor once, so tiles and tokens are exactly what that checkpoint expects. Bad
records never fail the run: each is sent to a ``QuarantineLog`` actor with its reason and counted
once. The output schema is ``ROW_SCHEMA`` (documented in ``pipelines/README.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy
from ray.data.extensions import ArrowVariableShapedTensorArray, ArrowVariableShapedTensorType

from llava_platform.data.errors import SampleError
from llava_platform.data.preference import parse_preference
from llava_platform.data.records import (
    MalformedRecordError,
    MissingImageError,
    MissingVideoError,
    RowBuilder,
    parse_record,
    record_id_of,
    record_images,
)
from llava_platform.data.rows import RowSpec
from llava_platform.model.compose import load_processor
from pipelines.quarantine import PreprocessReport, start_quarantine_log, write_quarantine
from pipelines.storage import ImageReader

TILES_TYPE = ArrowVariableShapedTensorType(pa.uint8(), 4)
ROW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("modality", pa.string()),  # "image", "text", "multi_image" or "video"
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),  # -100 where the loss ignores the token
    ("length", pa.int32()),
    ("tiles", TILES_TYPE),  # uint8 (num_tiles, 3, T, T); num_tiles = 0 for text-only rows
    ("image_size", pa.list_(pa.int32(), 2)),  # original [height, width] of the first image; [0, 0] without
    ("image_sizes", pa.list_(pa.list_(pa.int32(), 2))),  # every image's [height, width], in order ([] without)
    ("frames", TILES_TYPE),  # uint8 (num_frames, 3, T, T) of the record's video; 0 frames without one
    ("num_tiles", pa.int32()),  # tiles + frames: what the vision tower runs for the row (packing budgets it)
    ("truncated", pa.bool_()),
    ("source", pa.string()),  # the file the record came from (per-source counts of a mixture)
])
PREFERENCE_ROW_SCHEMA = pa.schema([
    *ROW_SCHEMA,  # the chosen answer's row (prompt, media, answer)
    ("rejected_input_ids", pa.list_(pa.int32())),  # the same prompt and media, the rejected answer
    ("rejected_labels", pa.list_(pa.int32())),
    ("rejected_length", pa.int32()),
])
"""Rows of preference records (``pairs=True``): one tiling of the media, both answers tokenised."""


class Preprocessor:
    """The per-actor callable of ``map_batches``: raw record rows -> ``ROW_SCHEMA`` rows."""

    def __init__(self, *, processor_path: str, spec: RowSpec, quarantine: ray.actor.ActorHandle,
                 image_roots: dict[str, str] | None = None, pairs: bool = False):
        self.builder = RowBuilder.from_processor(load_processor(processor_path), spec)
        self.images = ImageReader(spec.image_root, spec.s3_endpoint_url)
        self.readers = {source: ImageReader(root, spec.s3_endpoint_url) for source, root in (image_roots or {}).items()}
        self.quarantine = quarantine
        self.pairs = pairs

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, keys, bad = [], [], []
        for raw in batch.to_pylist():
            key = record_key(raw)
            try:
                if raw["error"]:
                    raise MalformedRecordError(raw["error"])
                files = self.readers.get(raw["source"], self.images)
                if self.pairs:
                    chosen, rejected = parse_preference(raw["record"])
                    images, video = record_media(chosen, raw["image_bytes"], files)
                    row = self.builder.build_pair(chosen, rejected, images, video)
                else:
                    record = parse_record(raw["record"])
                    images, video = record_media(record, raw["image_bytes"], files)
                    row = self.builder.build(record, images, video)
                rows.append({**row, "source": raw["source"]})
            except SampleError as err:
                bad.append(quarantine_entry(raw, err))
            keys.append(key)
        # Acknowledged, not fire-and-forget: once a batch's rows are out, its quarantine entries are in.
        ray.get(self.quarantine.add.remote(keys, bad))
        return rows_to_table(rows, PREFERENCE_ROW_SCHEMA if self.pairs else ROW_SCHEMA)


def record_key(raw: dict[str, Any]) -> str:
    """Identity of a raw record across retries and epochs: its file and position in the file."""
    return f"{raw['source']}:{raw['index']}"


def record_media(record: dict[str, Any], inline: bytes | None, files: ImageReader) -> tuple[list[bytes], bytes | None]:
    """The record's encoded images, in placeholder order (inline bytes of Parquet sources, or their files),
    and its encoded video (or ``None``).

    Raises:
        MissingImageError, MissingVideoError: the record names a file that does not exist.
    """
    if inline is not None:
        return [inline], None
    images = []
    for path in record_images(record):
        try:
            images.append(files.read(path))
        except FileNotFoundError as err:
            raise MissingImageError(f"image {path!r} not found: {err}") from err
    video = None
    if record.get("video"):
        try:
            video = files.read(record["video"])
        except FileNotFoundError as err:
            raise MissingVideoError(f"video {record['video']!r} not found: {err}") from err
    return images, video


def quarantine_entry(raw: dict[str, Any], error: SampleError) -> dict[str, Any]:
    """What the quarantine keeps of a bad raw record: where it is, its id, the reason and the message."""
    return {"key": record_key(raw), "id": record_id_of(raw["record"]), "source": raw["source"], "index": raw["index"],
            "reason": error.reason, "message": str(error)[:500]}


def rows_to_table(rows: Sequence[dict[str, Any]], schema: pa.Schema = ROW_SCHEMA) -> pa.Table:
    """Training rows as an Arrow table of ``schema`` (also when ``rows`` is empty)."""
    tensors = {name: tensor_column([row[name] for row in rows]) for name in ("tiles", "frames")}
    arrays = [tensors[name] if name in tensors else
              pa.array([_listed(row[name]) for row in rows], schema.field(name).type)
              for name in schema.names]
    return pa.Table.from_arrays(arrays, schema=schema)


def tensor_column(arrays: Sequence) -> pa.Array:
    """uint8 (n, 3, T, T) arrays of any n as one ``TILES_TYPE`` column (also when there are none)."""
    if arrays:
        return ArrowVariableShapedTensorArray.from_numpy(list(arrays))
    return TILES_TYPE.wrap_array(pa.array([], TILES_TYPE.storage_type))


def _listed(value):
    return value.tolist() if hasattr(value, "ndim") and value.ndim > 1 else value


def preprocess(
    records: ray.data.Dataset,
    *,
    processor_path: str,
    spec: RowSpec,
    quarantine: ray.actor.ActorHandle | None = None,
    num_actors: int | tuple[int, int] = (1, 4),
    cpus_per_actor: float = 1.0,
    records_per_call: int = 16,
    image_roots: dict[str, str] | None = None,
    pairs: bool = False,
) -> tuple[ray.data.Dataset, ray.actor.ActorHandle]:
    """Lazily map raw records to training rows; returns (rows, the quarantine log actor).

    Args:
        records: raw rows from ``read_records``.
        processor_path: the checkpoint (or ``jobs.compose`` output) whose processor tiles and tokenises.
        spec: the stage's row settings (``DataConfig.row_spec()``): template, image mode, limits, image root.
        quarantine: an existing ``QuarantineLog`` to add to (one is created otherwise).
        num_actors: actor pool size, fixed or (min, max).
        cpus_per_actor: logical CPUs each actor reserves; below 1 shares cores with training workers
            on a single machine (Ray Train leaves Ray Data only the CPUs its workers do not reserve).
        records_per_call: records per ``map_batches`` call of an actor; keeps blocks far below Arrow's 2 GiB
            offset limit (an anyres row at 336 px is 1.7 MB).
        image_roots: source file -> its own image root (a data YAML's per-source ``image_root``); the others
            use ``spec.image_root``.
        pairs: the records are preference pairs (``data.preference``): rows of ``PREFERENCE_ROW_SCHEMA``.
    """
    quarantine = quarantine or start_quarantine_log()
    low, high = num_actors if isinstance(num_actors, tuple) else (num_actors, num_actors)
    rows = records.map_batches(
        Preprocessor,
        fn_constructor_kwargs=dict(processor_path=processor_path, spec=spec, quarantine=quarantine,
                                   image_roots=image_roots, pairs=pairs),
        batch_format="pyarrow",
        batch_size=records_per_call,
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
