"""Batch inference with Ray Data: evaluation records -> scored predictions, bad records -> quarantine.

    records = read_records([eval_file])                              # sources.py: JSON / JSONL / Parquet
    predictions, quarantine = predict(records, model="models:/tiny-cpu-demo/1", ...)
    rows = predictions.take_all()                                    # PREDICTION_SCHEMA rows, one per good record
    report = finish(quarantine)                                      # read / kept / quarantined counts

The model replicas are an actor pool: each actor resolves the model URI itself (a folder, ``s3://``,
``models:/``, ``runs:/``; downloads are cached per node) and answers its batches greedily through the
checkpoint's own chat template and processor, on one of two engines: ``transformers`` (the checkpoint
loaded in the actor, one ``generate`` call per batch) or ``vllm`` (the actor starts a vLLM engine actor
in vLLM's own environment, ``serve/engines.py``, and sends each batch there to be batched continuously). A record
that cannot be evaluated (malformed JSON, no question or gold answer, a missing or broken image) is
quarantined with its reason, exactly as in preprocessing, and the run goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from llava_platform.data.errors import SampleError
from llava_platform.data.image_settings import ImageSettings
from llava_platform.data.images import decode_image
from llava_platform.data.records import MalformedRecordError, modality_of, parse_record
from llava_platform.data.video import VideoLimits, sample_video
from llava_platform.evaluation import eval_fields, is_correct
from llava_platform.inference import (
    Media,
    answer_questions,
    engine_video,
    media_parts,
    prompt_token_ids,
    question_conversation,
)
from llava_platform.model.compose import load_pretrained_llava, load_processor
from llava_platform.model.sources import resolve_checkpoint
from llava_platform.storage import filesystem_for
from llava_platform.vllm_engine import SEVERAL_IMAGES_ON_VLLM, EngineRequest, VllmSettings
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
                 s3_endpoint_url: str | None, max_image_pixels: int, max_new_tokens: int, device: str,
                 video: VideoLimits | None = None,
                 quarantine: ray.actor.ActorHandle, engine: str = "transformers", vllm: VllmSettings | None = None):
        self.answer = load_answerer(model, cache_dir=cache_dir, tracking_uri=tracking_uri,
                                    s3_endpoint_url=s3_endpoint_url, device=device, engine=engine, vllm=vllm)
        self.images = ImageReader(image_root, s3_endpoint_url)
        self.max_image_pixels = max_image_pixels
        self.video = video or VideoLimits()
        self.max_new_tokens = max_new_tokens
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
            answers = self.answer(inputs, self.max_new_tokens)
            for row, prediction in zip(good, answers, strict=True):
                row.update(prediction=prediction, correct=is_correct(prediction, row["answer"], row["type"]))
        ray.get(self.quarantine.add.remote(keys, bad))
        return pa.Table.from_pylist(good, schema=PREDICTION_SCHEMA)

    def _media(self, record: dict[str, Any], inline: bytes | None) -> Media:
        """The record's image, images (a list, OneVision) or video's sampled frames, or ``None``."""
        images, video = record_media(record, inline, self.images)
        if video is not None:
            return sample_video(video, self.video)
        decoded = [decode_image(data, self.max_image_pixels) for data in images]
        if not decoded:
            return None
        return decoded if isinstance(record.get("image"), list) else decoded[0]


Answerer = Callable[[Sequence[tuple[Any, str]], int], list[str]]
"""(image or ``None``, prompt) pairs and a token cap -> greedy answers, in order."""


def load_answerer(model: str, *, cache_dir: str, tracking_uri: str | None, s3_endpoint_url: str | None, device: str,
                  engine: str, vllm: VllmSettings | None) -> Answerer:
    """Resolve the model URI (downloads cached per node) and start its engine: the checkpoint loaded here
    (``transformers``), or a vLLM engine actor in vLLM's own environment (``vllm``)."""
    checkpoint = resolve_checkpoint(model, cache_dir, tracking_uri=tracking_uri, s3_endpoint_url=s3_endpoint_url)
    if engine == "vllm":
        return VllmAnswers(checkpoint, vllm or VllmSettings())
    llava, processor = load_pretrained_llava(str(checkpoint))
    llava.to(device).eval()
    return lambda items, max_new_tokens: answer_questions(llava, processor, items, max_new_tokens=max_new_tokens)


class VllmAnswers:
    """Greedy answers from a vLLM engine actor, as ``answer_questions`` gives them from transformers: the same
    prompt (the checkpoint's template, single BOS), and the answer's tokens decoded here, whole, by the
    checkpoint's tokenizer (special tokens dropped, whitespace stripped). vLLM's own text comes from its
    incremental detokenizer, which renders bytes that are not valid UTF-8 differently."""

    def __init__(self, checkpoint, settings: VllmSettings):
        from serve.engines import start_vllm_engine

        self.engine = start_vllm_engine(checkpoint, "evaluate", settings)
        self.processor = load_processor(str(checkpoint))
        self.onevision = ImageSettings.from_processor(self.processor).onevision

    def __call__(self, items: Sequence[tuple[Media, str]], max_new_tokens: int) -> list[str]:
        requests = []
        for i, (media, question) in enumerate(items):
            images, videos = media_parts(media)
            conversation = question_conversation(question, len(images), len(videos))
            if len(images) > 1 and self.onevision:
                raise ValueError(f"question {i} of this batch: {SEVERAL_IMAGES_ON_VLLM}")
            videos = [engine_video(self.processor, frames) for frames in videos]
            requests.append(EngineRequest(request_id=f"q{i}", images=images, videos=videos,
                                          prompt_token_ids=prompt_token_ids(self.processor, conversation),
                                          max_tokens=max_new_tokens, temperature=0.0))
        tokenizer = self.processor.tokenizer
        return [tokenizer.decode(list(result.token_ids), skip_special_tokens=True).strip()
                for result in ray.get(self.engine.answer.remote(requests))]


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
                 max_image_pixels: int, device: str, quarantine: ray.actor.ActorHandle, engine: str = "transformers",
                 vllm: VllmSettings | None = None):
        self.answer = load_answerer(model, cache_dir=cache_dir, tracking_uri=tracking_uri,
                                    s3_endpoint_url=s3_endpoint_url, device=device, engine=engine, vllm=vllm)
        self.s3_endpoint_url = s3_endpoint_url
        self.max_image_pixels = max_image_pixels
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
            replies = self.answer([(image, row["prompt"]) for row, image in items], max_new_tokens)
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


def answer_benchmarks(
    questions: ray.data.Dataset,
    *,
    model: str,
    cache_dir: str,
    tracking_uri: str | None = None,
    s3_endpoint_url: str | None = None,
    max_image_pixels: int = 50_000_000,
    batch_size: int = 16,
    num_replicas: int = 1,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    engine: str = "transformers",
    vllm: VllmSettings | None = None,
) -> tuple[ray.data.Dataset, ray.actor.ActorHandle]:
    """Lazily answer benchmark questions greedily; returns (answers, the quarantine log actor).

    Args:
        questions: rows of ``benchmark``, ``question_id``, ``prompt``, ``image`` (URI or ``None``),
            ``image_bytes`` (or ``None``) and ``max_new_tokens``.
        The others: as ``predict``'s.
    """
    return replica_pool(questions, BenchmarkAnswerer, dict(
        model=model, cache_dir=cache_dir, tracking_uri=tracking_uri, s3_endpoint_url=s3_endpoint_url,
        max_image_pixels=max_image_pixels), batch_size=batch_size, num_replicas=num_replicas,
        cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica, engine=engine, vllm=vllm)


def replica_pool(rows: ray.data.Dataset, answerer: type, kwargs: dict[str, Any], *, batch_size: int,
                 num_replicas: int, cpus_per_replica: float, gpus_per_replica: float, engine: str,
                 vllm: VllmSettings | None) -> tuple[ray.data.Dataset, ray.actor.ActorHandle]:
    """``rows`` mapped by an actor pool of ``answerer`` (built with ``kwargs`` plus the device, engine and a
    quarantine log); with vLLM the replica's resources go to its engine actor and the Ray Data actor that
    feeds it takes a quarter CPU. Returns (the mapped rows, the quarantine log)."""
    quarantine = start_quarantine_log()
    if engine == "vllm":
        vllm = replace(vllm or VllmSettings(), num_cpus=cpus_per_replica, num_gpus=gpus_per_replica)
        cpus_per_replica, gpus_per_replica = 0.25, 0.0
    mapped = rows.map_batches(
        answerer,
        fn_constructor_kwargs=dict(kwargs, device="cuda" if gpus_per_replica > 0 else "cpu",
                                   quarantine=quarantine, engine=engine, vllm=vllm),
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=num_replicas),
        num_cpus=cpus_per_replica,
        num_gpus=gpus_per_replica,
    )
    return mapped, quarantine


def predict(
    records: ray.data.Dataset,
    *,
    model: str,
    cache_dir: str,
    tracking_uri: str | None = None,
    image_root: str | None = None,
    s3_endpoint_url: str | None = None,
    max_image_pixels: int = 50_000_000,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    num_replicas: int = 1,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
    engine: str = "transformers",
    vllm: VllmSettings | None = None,
    video: VideoLimits | None = None,
) -> tuple[ray.data.Dataset, ray.actor.ActorHandle]:
    """Lazily answer and score every evaluation record; returns (predictions, the quarantine log actor).

    Args:
        records: raw rows from ``read_records``.
        model: checkpoint URI (folder, ``s3://``, ``models:/<name>/<version>``, ``runs:/<id>/<path>``).
        cache_dir: where each node keeps downloaded checkpoints.
        tracking_uri: MLflow tracking URI for ``models:/`` and ``runs:/``.
        image_root: folder or ``s3://`` prefix of the records' relative image paths.
        max_new_tokens: answer length cap (short answers and option letters need few).
        batch_size: questions per ``generate`` call.
        num_replicas: model replicas (actors); each holds one copy of the model.
        cpus_per_replica, gpus_per_replica: resources per replica; with GPUs the model runs on ``cuda``.
        engine: ``transformers`` or ``vllm``; with vLLM the resources go to each replica's engine actor
            (``vllm``'s other settings apply) and the Ray Data actor that feeds it takes a quarter CPU.
        video: frames sampled per video record (the frame count the model trained with) and the video limits.
    """
    return replica_pool(records, Predictor, dict(
        model=model, cache_dir=cache_dir, tracking_uri=tracking_uri, image_root=image_root,
        s3_endpoint_url=s3_endpoint_url, max_image_pixels=max_image_pixels, max_new_tokens=max_new_tokens,
        video=video),
        batch_size=batch_size, num_replicas=num_replicas, cpus_per_replica=cpus_per_replica,
        gpus_per_replica=gpus_per_replica, engine=engine, vllm=vllm)
