"""Scoring of generated answers: VQA-normalised exact match and multiple-choice letters.

An evaluation record is a LLaVA-format record whose first human turn is the question, with a gold
``answer`` (else the first assistant turn) and a ``type``: ``short`` (exact match after
normalisation, the default) or ``mc`` (the option letter).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from llava_platform.benchmarks.rules import evalai_answer
from llava_platform.data.errors import SampleError

_LETTER = re.compile(r"^\s*\(?([A-Z])[\).:\s]|^\s*([A-Z])\s*$|answer is \(?([A-Z])\)?", re.IGNORECASE)


def extract_choice(text: str) -> str | None:
    """The option letter of a multiple-choice answer ("B", "B.", "(B) red", "The answer is B")."""
    match = _LETTER.search(text.strip())
    if not match:
        return None
    return next(group for group in match.groups() if group).upper()


def is_correct(prediction: str, gold: str, kind: str) -> bool:
    """``kind``: ``mc`` compares option letters, anything else exact match after the VQA normalisation
    (``benchmarks.rules.evalai_answer``: the one answer normaliser)."""
    if kind == "mc":
        return extract_choice(prediction) == gold.strip().upper()
    return evalai_answer(prediction) == evalai_answer(gold)


KINDS = ("short", "mc")


class EvalRecordError(SampleError):
    """An evaluation record without a usable question, gold answer or type."""

    reason = "bad_eval_record"


def eval_fields(record: Mapping[str, Any]) -> tuple[str, str, str]:
    """(question without ``<image>``, gold answer, kind) of a parsed evaluation record.

    Raises:
        EvalRecordError: no human question first, no gold answer, or an unknown ``type``.
    """
    turns = record["conversations"]
    first = turns[0] if turns and isinstance(turns[0], dict) else {}
    if first.get("from") != "human" or not isinstance(first.get("value"), str):
        raise EvalRecordError("the first turn must be the human question ({'from': 'human', 'value': ...})")
    answer = record.get("answer")
    if answer is None:
        answer = next((t.get("value") for t in turns[1:] if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if not isinstance(answer, str) or not answer.strip():
        raise EvalRecordError("no gold answer: give 'answer', or a 'gpt' turn after the question")
    kind = record.get("type", "short")
    if kind not in KINDS:
        raise EvalRecordError(f"'type' is {kind!r}; use one of {', '.join(KINDS)}")
    return first["value"].replace("<image>", "").replace("<video>", "").strip(), answer, kind


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Accuracy per kind and overall, and the count per kind, from rows with ``type`` and ``correct``; with
    several-image or video rows (their ``modality``), per modality too."""
    hits: dict[str, list[bool]] = {}
    by_modality: dict[str, list[bool]] = {}
    for row in rows:
        hits.setdefault(row["type"], []).append(bool(row["correct"]))
        by_modality.setdefault(row.get("modality") or "image", []).append(bool(row["correct"]))
    scores: dict[str, float] = {}
    for kind, values in sorted(hits.items()):
        scores[f"accuracy/{kind}"] = sum(values) / len(values)
        scores[f"count/{kind}"] = len(values)
    if by_modality.keys() & {"multi_image", "video"}:  # OneVision: how each kind of input fares
        for modality, values in sorted(by_modality.items()):
            scores[f"accuracy/{modality}"] = sum(values) / len(values)
            scores[f"count/{modality}"] = len(values)
    everything = [v for values in hits.values() for v in values]
    if everything:
        scores["accuracy"] = sum(everything) / len(everything)
    return scores
