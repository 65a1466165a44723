"""What every benchmark is made of: its questions, where its files are, and how its answers are scored.

A benchmark module turns the benchmark's published files (``Source``) into a ``Loaded`` benchmark: the
``Question`` rows a model answers (prompt already in LLaVA-1.5's wording, the image as a URI or bytes) and
a ``score`` function over ``{question_id: reply}``. Question ids are the published ones, prefixed where
the published ids repeat inside one benchmark (POPE ``random/17``, TextVQA ``ocr/34602``, MMBench
``1024/2`` for the third rotation of question 1024, MME ``color/000000012120.jpg/0``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow.fs as pafs

from llava_platform.storage import filesystem_for, join

SHORT_ANSWER = "Answer the question using a single word or phrase."
"""LLaVA-1.5's suffix for short-answer questions (VQAv2, GQA, VizWiz, TextVQA, POPE, MME)."""
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
"""LLaVA-1.5's suffix for multiple-choice questions (ScienceQA, MMBench, SEED-Bench)."""
MULTIPLE_CHOICE_CN = "请直接回答选项字母。"
"""MMBench-CN's multiple-choice suffix (LLaVA's ``--lang cn``)."""
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
"""VizWiz's extra line before the short-answer suffix."""


class BenchmarkFormatError(ValueError):
    """A benchmark file that is missing or not in its published format; names the file and what was expected."""

    def __init__(self, benchmark: str, file: str, expected: str):
        super().__init__(f"{benchmark}: {file}: expected {expected}")
        self.benchmark, self.file, self.expected = benchmark, file, expected


@dataclass(frozen=True)
class Question:
    """One prompt for the model. The image comes first in the user turn, then ``prompt`` (as in training)."""

    question_id: str
    prompt: str
    image: str | None = None
    """The image file's URI (local path or ``s3://``), or ``None`` (embedded in ``image_bytes``, or none)."""
    image_bytes: bytes | None = None
    max_new_tokens: int = 128
    """LLaVA-1.5's cap for this benchmark (``jobs.evaluate --max-new-tokens`` lowers it)."""


class Judge(Protocol):
    """A model that grades replies (``judge.py``: any OpenAI-compatible endpoint)."""

    def complete_all(self, prompts: list[str], max_tokens: int) -> list[str | None]:
        """Each prompt's reply, ``None`` where the endpoint kept failing."""


def _inside(answer: Mapping[str, Any]) -> str | None:
    return None


def _same_id(qid: str) -> dict[str, Any]:
    return {"question_id": qid}


@dataclass(frozen=True)
class LlavaIds:
    """How LLaVA's evaluation scripts name a benchmark's questions, and the way back to our ids.

    LLaVA's ``model_vqa*.py`` write one ``{"question_id", "prompt", "text", ...}`` line per record of
    LLaVA's question files (``llava_pope_test.jsonl``, ``llava_mme.jsonl``, ...); ``jobs.score`` reads those
    files as they are. Where an id alone is ambiguous (TextVQA's and MME's repeat), the answer's
    ``prompt`` tells the questions apart."""

    scheme: str
    """LLaVA's ids in words, for the message that fails a file whose ids match neither scheme."""
    ours: Callable[[Mapping[str, Any]], str | None]
    """A LLaVA answer record (with its question-file record's fields added where ``--question-file`` is
    given) -> our question id, ``None`` where it names none."""
    theirs: Callable[[str], dict[str, Any]] = _same_id
    """Our question id -> the id fields of LLaVA's record (``question_id``, and ``round_id`` or ``category``
    where LLaVA's scripts read them): what ``jobs.evaluate`` writes in ``llava_answers.jsonl``."""
    outside: Callable[[Mapping[str, Any]], str | None] = _inside
    """Why an answer names a question of the benchmark that its headline leaves out (ScienceQA's
    text-only questions, SEED's video questions); ``None`` for the others."""


def same_ids(scheme: str, numbers: bool = False) -> LlavaIds:
    """LLaVA's question ids are ours (VQAv2, GQA, ScienceQA, SEED, LLaVA-Bench); ``numbers``: LLaVA writes them
    as JSON numbers where they are digits."""
    def theirs(qid: str) -> dict[str, Any]:
        return {"question_id": int(qid) if numbers and qid.isdigit() else qid}

    return LlavaIds(scheme, lambda answer: str(answer["question_id"]), theirs)


@dataclass
class Loaded:
    """A benchmark read from its files, ready to be answered and scored."""

    questions: list[Question]
    score: Callable[[Mapping[str, str], Judge | None], dict[str, float]]
    """``{question_id: reply}`` (every question present; missing replies are ``""``) -> metrics."""
    submission: Callable[[Mapping[str, str]], tuple[str, bytes]] | None = None
    """For test splits without answers: replies -> (file name, content) for the evaluation server."""
    notes: list[str] = field(default_factory=list)
    """What the reader decided (split found, variants, files missing), printed with the scores."""
    llava: LlavaIds | None = None
    """LLaVA's ids for these questions (its answer files), where they differ from ours or need checking."""
    scored_on: str = ""
    """The split and modality these questions are ("val; image"), set beside the published figure's."""


@dataclass(frozen=True)
class Reference:
    """LLaVA-1.5-7B's published figure for a benchmark, with what it was measured on."""

    value: float
    """On the headline metric's paper scale."""
    split: str
    """The split and who scored it ("test-dev, EvalAI server"; "val, local")."""
    modality: str
    """What the questions showed ("image"; "image + video, a video as its middle frame")."""
    source: str = "LLaVA-1.5 paper, Table 4 (LLaVA's docs/MODEL_ZOO.md)"

    def describe(self) -> str:
        return f"{self.value:.1f} ({self.split}; {self.modality}; {self.source})"


@dataclass(frozen=True)
class Benchmark:
    """A row of the LLaVA-1.5 table: how to read it and which metric the paper reports."""

    name: str
    title: str
    headline: str
    """The metric the paper's table shows (``accuracy``, ``f1``, ``perception``, ...)."""
    published: Reference
    """LLaVA-1.5-7B's figure in the paper (Table 4), on the headline metric's scale, and its split."""
    scale: float
    """Headline metric -> paper scale (100 for fractions; 1 for MME's summed scores)."""
    layout: str
    """The published files this reader expects (for errors and the README)."""
    load: Callable[[Source], Loaded]
    needs_judge: bool = False
    """Judge-based (LLaVA-Bench, MM-Vet): scoring without ``--judge-url`` fails."""


class Source:
    """A benchmark's published files: a folder (or a file in it) locally or under ``s3://``.

    Args:
        benchmark: its name, for error messages.
        annotations: the benchmark's folder, or one of its files (then its folder is the root and the
            file the one to read where a benchmark has alternatives).
        images: where the images are (a folder or ``s3://`` prefix); default: the benchmark's usual
            subfolder of the root.
    """

    def __init__(self, benchmark: str, annotations: str, images: str | None = None,
                 s3_endpoint_url: str | None = None):
        self.benchmark = benchmark
        self.filesystem, path = filesystem_for(annotations, s3_endpoint_url)
        self.scheme = "s3://" if annotations.startswith("s3://") else ""
        info = self.filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise BenchmarkFormatError(benchmark, annotations, "a folder or file in the benchmark's published layout "
                                       "(it does not exist)")
        self.file = path if info.type == pafs.FileType.File else None
        self.root = path.rsplit("/", 1)[0] if self.file else path.rstrip("/")
        self._images = images

    def uri(self, name: str) -> str:
        return self.scheme + join(self.root, name)

    def exists(self, name: str) -> bool:
        return self.filesystem.get_file_info(join(self.root, name)).type == pafs.FileType.File

    def first(self, *names: str) -> str | None:
        """The given file if it is one of ``names``, else the first of ``names`` that exists."""
        if self.file is not None:
            given = self.file.rsplit("/", 1)[1]
            return given if given in names else None
        return next((name for name in names if self.exists(name)), None)

    def files(self, folder: str = "", suffix: str = "") -> list[str]:
        """Names (relative to the root) of the files below ``folder`` ending with ``suffix``, sorted."""
        selector = pafs.FileSelector(join(self.root, folder) if folder else self.root, recursive=True,
                                     allow_not_found=True)
        found = [info.path for info in self.filesystem.get_file_info(selector)
                 if info.type == pafs.FileType.File and info.path.endswith(suffix)]
        return sorted(path[len(self.root) + 1:] for path in found)

    def read_bytes(self, name: str) -> bytes:
        try:
            with self.filesystem.open_input_stream(join(self.root, name)) as stream:
                return stream.readall()
        except FileNotFoundError as error:
            raise BenchmarkFormatError(self.benchmark, self.uri(name), "this file (it does not exist)") from error

    def read_json(self, name: str, expected: str, check: Callable[[Any], bool]) -> Any:
        """The file parsed as JSON; ``BenchmarkFormatError`` naming ``expected`` where it is not JSON or
        ``check`` refuses its shape."""
        try:
            data = json.loads(self.read_bytes(name))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BenchmarkFormatError(self.benchmark, self.uri(name), f"{expected} (not JSON: {error})") from error
        if not _checks(check, data):
            raise BenchmarkFormatError(self.benchmark, self.uri(name), expected)
        return data

    def read_jsonl(self, name: str, expected: str, check: Callable[[Any], bool]) -> list[Any]:
        """One JSON object per line (blank lines skipped), each passing ``check``."""
        rows = []
        for number, line in enumerate(self.read_bytes(name).decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise BenchmarkFormatError(self.benchmark, f"{self.uri(name)} line {number}",
                                           f"{expected} (not JSON: {error})") from error
            if not _checks(check, row):
                raise BenchmarkFormatError(self.benchmark, f"{self.uri(name)} line {number}", expected)
            rows.append(row)
        return rows

    def read_tsv(self, name: str, expected: str, columns: Iterable[str]) -> list[dict[str, str]]:
        """A tab-separated file with a header row holding ``columns`` (empty cells are ``""``)."""
        text = self.read_bytes(name).decode("utf-8", "replace")
        csv.field_size_limit(1 << 30)  # MMBench embeds each image as base64 in a cell
        reader = csv.DictReader(io.StringIO(text), delimiter="\t")
        missing = sorted(set(columns) - set(reader.fieldnames or []))
        if missing:
            raise BenchmarkFormatError(self.benchmark, self.uri(name), f"{expected}; columns missing: {missing}")
        return [{key: value or "" for key, value in row.items()} for row in reader]

    def image(self, default_folder: str, relative: str) -> str:
        """The URI of an image: below ``images`` if given, else below the root's ``default_folder``."""
        if self._images:
            return join(self._images, relative)
        return self.uri(join(default_folder, relative) if default_folder else relative)


def _checks(check: Callable[[Any], bool], data: Any) -> bool:
    try:
        return bool(check(data))
    except (KeyError, TypeError, AttributeError, IndexError):
        return False


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def options_text(options: Mapping[str, str]) -> str:
    """Options as LLaVA-1.5 writes them: one ``"A. red"`` line each."""
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())
