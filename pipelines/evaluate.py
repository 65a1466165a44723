"""Batch inference with Ray Data: evaluation records -> scored predictions, bad records -> quarantine.

    records = read_records([eval_file])                              # sources.py: JSON / JSONL / Parquet
    predictions, quarantine = predict(records, model="models:/tiny-cpu-demo/1", ...)
    rows = predictions.take_all()                                    # PREDICTION_SCHEMA rows, one per good record
    report = finish(quarantine)                                      # read / kept / quarantined counts

The model replicas are an actor pool: each actor resolves the model URI itself (a folder, ``s3://``,
``models:/``, ``runs:/``; downloads are cached per node), opens the plan's engine on it
(``llava_platform.generation``: ``transformers`` in the actor, or a vLLM engine actor in vLLM's own
environment; the same ``GenerationEngine`` calls either way) and answers its batches greedily through the
checkpoint's own chat template and processor. A record that cannot be evaluated (malformed JSON, no
question or gold answer, a missing or broken image) is quarantined with its reason, exactly as in
preprocessing, and the run goes on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from llava_platform.data.errors import SampleError
from llava_platform.data.images import decode_image
from llava_platform.data.records import MalformedRecordError, modality_of, parse_record
from llava_platform.data.video import sample_video
from llava_platform.evaluation import eval_fields, is_correct
from llava_platform.generation.engine import GenerationEngine, answer_questions, engine_kinds, open_engine
from llava_platform.generation.plan import InferencePlan
from llava_platform.inference import Media, media_parts
from llava_platform.model.sources import resolve_checkpoint
from llava_platform.storage import filesystem_for
from pipelines.preprocess import MissingImageError, quarantine_entry, record_key, record_media
from pipelines.quarantine import start_quarantine_log
from pipelines.storage import ImageReader

PREDICTION_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("type", pa.string()),  # "short" or "mc"
    ("question", pa.string()),
    ("answer", pa.string()),  # gold
    ("prediction", pa.string()),
    ("correct", pa.bool_()),
    ("modality", pa.string()),  # "text", "image", "multi_image" or "video"
])


class Predictor:
    """The per-actor callable of ``map_batches``: raw evaluation rows -> ``PREDICTION_SCHEMA`` rows."""

    def __init__(self, *, model: str, cache_dir: str, tracking_uri: str | None, image_root: str | None,
                 s3_endpoint_url: str | None, plan: InferencePlan, quarantine: ray.actor.ActorHandle):
        self.engine = open_replica_engine(model, cache_dir, tracking_uri, s3_endpoint_url, plan)
        self.images = ImageReader(image_root, s3_endpoint_url)
        self.plan = plan
        self.quarantine = quarantine

    def __call__(self, batch: pa.Table) -> pa.Table:
        good: list[dict[str, Any]] = []
        inputs, keys, bad = [], [], []
        for raw in batch.to_pylist():
            keys.append(record_key(raw))
            try:
                if raw["error"]:
                    raise MalformedRecordError(raw["error"])
                record = parse_record(raw["record"])
                question, answer, kind = eval_fields(record)
                media = self._media(record, raw["image_bytes"])
            except SampleError as err:
                bad.append(quarantine_entry(raw, err))
                continue
            images, videos = media_parts(media)
            good.append({"id": str(record["id"]), "type": kind, "question": question, "answer": answer,
                         "modality": modality_of(len(images), bool(videos))})
            inputs.append((media, question))
        if inputs:
            answers = answer_questions(self.engine, inputs, max_new_tokens=self.plan.max_new_tokens)
            for row, prediction in zip(good, answers, strict=True):
                row.update(prediction=prediction, correct=is_correct(prediction, row["answer"], row["type"]))
        ray.get(self.quarantine.add.remote(keys, bad))
        return pa.Table.from_pylist(good, schema=PREDICTION_SCHEMA)

    def _media(self, record: dict[str, Any], inline: bytes | None) -> Media:
        """The record's image, images (a list, OneVision) or video's sampled frames, or ``None``."""
        images, video = record_media(record, inline, self.images)
        if video is not None:
            return sample_video(video, self.plan.video)
        decoded = [decode_image(data, self.plan.max_image_pixels) for data in images]
        if not decoded:
            return None
        return decoded if isinstance(record.get("image"), list) else decoded[0]


def open_replica_engine(model: str, cache_dir: str, tracking_uri: str | None, s3_endpoint_url: str | None,
                        plan: InferencePlan) -> GenerationEngine:
    """Resolve the model URI (downloads cached per node) and open the plan's engine on it, with the replica's
    share of the resources (``replica_pool`` split them: the engine kind says how)."""
    checkpoint = resolve_checkpoint(model, cache_dir, tracking_uri=tracking_uri, s3_endpoint_url=s3_endpoint_url)
    share = engine_kinds()[plan.engine].resources(plan.cpus_per_replica, plan.gpus_per_replica)
    vllm = replace(plan.vllm, num_cpus=share.engine_cpus, num_gpus=share.engine_gpus)
    device = "cuda" if share.caller_gpus > 0 else "cpu"
    return open_engine(plan.engine, checkpoint, model_name="evaluate", device=device, dtype=plan.dtype, vllm=vllm)


ANSWER_SCHEMA = pa.schema([
    ("benchmark", pa.string()),
    ("question_id", pa.string()),
    ("prompt", pa.string()),
    ("text", pa.string()),  # the reply (LLaVA's answer format)
])


class BenchmarkAnswerer:
    """The per-actor callable of ``map_batches`` for benchmark questions: ``Question`` rows (plus their
    ``benchmark``) -> ``ANSWER_SCHEMA`` rows. A question whose image cannot be read or decoded is
    quarantined with its reason (and reported missing by the scoring)."""

    def __init__(self, *, model: str, cache_dir: str, tracking_uri: str | None, s3_endpoint_url: str | None,
                 plan: InferencePlan, quarantine: ray.actor.ActorHandle):
        self.engine = open_replica_engine(model, cache_dir, tracking_uri, s3_endpoint_url, plan)
        self.s3_endpoint_url = s3_endpoint_url
        self.max_image_pixels = plan.max_image_pixels
        self.quarantine = quarantine

    def __call__(self, batch: pa.Table) -> pa.Table:
        groups: dict[int, list[tuple[dict[str, Any], Any]]] = {}
        keys, bad = [], []
        for row in batch.to_pylist():
            key = f"{row['benchmark']}:{row['question_id']}"
            keys.append(key)
            try:
                data = row["image_bytes"] if row["image_bytes"] is not None else self._read(row["image"])
                image = decode_image(data, self.max_image_pixels) if data is not None else None
            except SampleError as err:
                bad.append({"key": key, "id": row["question_id"], "source": row["benchmark"], "index": -1,
                            "reason": err.reason, "message": str(err)[:500]})
                continue
            groups.setdefault(row["max_new_tokens"], []).append((row, image))
        answered = []
        for max_new_tokens, items in groups.items():  # one generate call per token cap
            replies = answer_questions(self.engine, [(image, row["prompt"]) for row, image in items],
                                       max_new_tokens=max_new_tokens)
            answered += [{"benchmark": row["benchmark"], "question_id": row["question_id"], "prompt": row["prompt"],
                          "text": reply} for (row, _), reply in zip(items, replies, strict=True)]
        ray.get(self.quarantine.add.remote(keys, bad))
        return pa.Table.from_pylist(answered, schema=ANSWER_SCHEMA)

    def _read(self, uri: str | None) -> bytes | None:
        if uri is None:
            return None
        filesystem, path = filesystem_for(uri, self.s3_endpoint_url)
        try:
            with filesystem.open_input_stream(path) as stream:
                return stream.readall()
        except (FileNotFoundError, OSError) as err:
            raise MissingImageError(f"{uri}: {err}") from err


def answer_benchmarks(questions: ray.data.Dataset, *, model: str, cache_dir: str, tracking_uri: str | None,
                      s3_endpoint_url: str | None,
                      plan: InferencePlan) -> tuple[ray.data.Dataset, ray.actor.ActorHandle]:
    """Lazily answer benchmark questions greedily; returns (answers, the quarantine log actor).

    Args:
        questions: rows of ``benchmark``, ``question_id``, ``prompt``, ``image`` (URI or ``None``),
            ``image_bytes`` (or ``None``) and ``max_new_tokens``.
        The others: as ``predict``'s.
    """
    return replica_pool(questions, BenchmarkAnswerer, dict(
        model=model, cache_dir=cache_dir, tracking_uri=tracking_uri, s3_endpoint_url=s3_endpoint_url), plan)


def replica_pool(rows: ray.data.Dataset, answerer: type, kwargs: dict[str, Any],
                 plan: InferencePlan) -> tuple[ray.data.Dataset, ray.actor.ActorHandle]:
    """``rows`` mapped by an actor pool of ``answerer`` (built with ``kwargs`` plus the plan and a quarantine log);
    each Ray Data actor takes the resources its engine kind leaves it (all of a replica's for transformers, a
    quarter CPU for an engine actor of its own). Returns (the mapped rows, the quarantine log)."""
    quarantine = start_quarantine_log()
    share = engine_kinds()[plan.engine].resources(plan.cpus_per_replica, plan.gpus_per_replica)
    mapped = rows.map_batches(
        answerer,
        fn_constructor_kwargs=dict(kwargs, plan=plan, quarantine=quarantine),
        batch_format="pyarrow",
        batch_size=plan.batch_size,
        compute=ActorPoolStrategy(size=plan.num_replicas),
        num_cpus=share.caller_cpus,
        num_gpus=share.caller_gpus,
    )
    return mapped, quarantine


def predict(records: ray.data.Dataset, *, model: str, cache_dir: str, tracking_uri: str | None,
            image_root: str | None, s3_endpoint_url: str | None,
            plan: InferencePlan) -> tuple[ray.data.Dataset, ray.actor.ActorHandle]:
    """Lazily answer and score every evaluation record; returns (predictions, the quarantine log actor).

    Args:
        records: raw rows from ``read_records``.
        model: checkpoint URI (folder, ``s3://``, ``models:/<name>/<version>``, ``runs:/<id>/<path>``).
        cache_dir: where each node keeps downloaded checkpoints.
        tracking_uri: MLflow tracking URI for ``models:/`` and ``runs:/``.
        image_root: folder or ``s3://`` prefix of the records' relative image paths.
        s3_endpoint_url: S3-compatible endpoint for ``s3://`` models, records and images.
        plan: the engine, answer length, batch size, replicas and their resources, and the media limits.
    """
    return replica_pool(records, Predictor, dict(
        model=model, cache_dir=cache_dir, tracking_uri=tracking_uri, image_root=image_root,
        s3_endpoint_url=s3_endpoint_url), plan)
